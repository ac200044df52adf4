//! The layer's overhead per call in CPU instructions, deterministic where wall-clock
//! benchmarks on a shared machine drift: `N` calls through the layer on the memory store
//! (`one` limit, `four` limits) or through the bare service (`bare`); or `N` keyed
//! decisions over 100 keys of `MemoryStore::decide` (`decide`) and of governor's keyed
//! limiter (`governor`), as `benches/vs_governor.rs` runs them. Counted inside
//! `run_loop`/`decide_loop` only:
//!
//! ```sh
//! cargo build --release --example layer_instructions --all-features
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null --toggle-collect='*run_loop*' \
//!     target/release/examples/layer_instructions four 20000
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null --toggle-collect='*decide_loop*' \
//!     target/release/examples/layer_instructions governor 200000
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

#[inline(never)]
fn decide_loop(n: usize, mut decide: impl FnMut(usize) -> bool) {
    for i in 0..n {
        std::hint::black_box(decide(i % 100));
    }
}

fn keyed(which: &str, n: usize) {
    let keys: Vec<String> = (0..100)
        .map(|i| {
            let tag = tower_llm_ratelimit::store::identifier_tag(format!("user-{i}").as_bytes());
            tower_llm_ratelimit::store::state_key("bench", &tag.expect("a valid identifier"))
        })
        .collect();
    if which == "governor" {
        let quota = governor::Quota::per_second(std::num::NonZeroU32::MAX);
        let limiter = governor::RateLimiter::keyed(quota);
        decide_loop(n, |i| limiter.check_key(&keys[i]).is_ok());
    } else {
        let store = tower_llm_ratelimit::MemoryStore::new();
        let algorithm = FixedWindow::new(1 << 40, Duration::from_secs(3600))
            .expect("a valid window")
            .into();
        decide_loop(n, |i| store.decide(&keys[i], &algorithm, 1).allowed);
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
    if matches!(which.as_str(), "decide" | "governor") {
        return keyed(&which, n);
    }
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
        other => panic!("unknown shape {other:?}: bare, one, four, decide or governor"),
    };
    let mut svc = tower::Layer::layer(&layer, llm);
    run_loop(&rt, &mut svc, &request, n);
}
