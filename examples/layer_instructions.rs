//! The layer's overhead per call in CPU instructions, deterministic where wall-clock
//! benchmarks on a shared machine drift: `N` calls through the layer on the memory store
//! (`one` limit, `four` limits) or through the bare service (`bare`), counted inside
//! `run_loop` only:
//!
//! ```sh
//! cargo build --release --example layer_instructions --all-features
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null --toggle-collect='*run_loop*' \
//!     target/release/examples/layer_instructions four 20000
//! ```
//!
//! Instructions per call = "Collected" ÷ N. The wall-clock numbers are in
//! `benches/memory_store.rs` (`layer/*`).

use std::time::Duration;
use tower::{Service, ServiceExt, service_fn};
use tower_llm_ratelimit::{
    FixedWindow, Limit, LlmRequest, LlmResponse, RatelimitLayer, SlidingWindow, Usage,
};

#[inline(never)]
fn run_loop<S>(rt: &tokio::runtime::Runtime, svc: &mut S, request: &LlmRequest, n: usize)
where
    S: Service<LlmRequest, Response = LlmResponse>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        rt.block_on(async {
            std::hint::black_box(
                svc.ready()
                    .await
                    .unwrap()
                    .call(request.clone())
                    .await
                    .unwrap(),
            )
        });
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args
        .next()
        .expect("usage: layer_instructions bare|one|four N");
    let n: usize = args
        .next()
        .and_then(|n| n.parse().ok())
        .expect("N: a number of calls");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let llm = service_fn(|_: LlmRequest| async {
        Ok::<_, std::convert::Infallible>(LlmResponse {
            text: String::new(),
            usage: Some(Usage::new(1, 1)),
        })
    });
    let request = LlmRequest::new("user-1", "hello");
    let window = Duration::from_secs(3600);
    let day = Duration::from_secs(86_400);
    let layer = match which.as_str() {
        "bare" => return run_loop(&rt, &mut llm.clone(), &request, n),
        "one" => RatelimitLayer::builder()
            .request_limit(FixedWindow::new(1 << 40, window).unwrap())
            .build()
            .unwrap(),
        "four" => RatelimitLayer::builder()
            .limit(
                "rpm",
                Limit::requests(FixedWindow::new(1 << 40, window).unwrap()),
            )
            .limit(
                "rpd",
                Limit::requests(FixedWindow::new(1 << 40, day).unwrap()),
            )
            .limit(
                "tpm",
                Limit::tokens(SlidingWindow::new(1 << 40, window).unwrap()),
            )
            .limit(
                "tpd",
                Limit::tokens(FixedWindow::new(1 << 40, day).unwrap()),
            )
            .build()
            .unwrap(),
        other => panic!("unknown shape {other:?}: bare, one or four"),
    };
    let mut svc = tower::Layer::layer(&layer, llm);
    run_loop(&rt, &mut svc, &request, n);
}
