//! The layer's overhead per call in CPU instructions, deterministic where wall-clock
//! benchmarks on a shared machine drift: `N` calls through the layer on the memory store
//! (`one` limit, `four` limits) or through the bare service (`bare`); or `N` keyed
//! decisions over 100 keys of `MemoryStore::decide` (`decide`: fixed window;
//! `decide-sliding`, `decide-bucket`) and of governor's keyed limiter (`governor`), as
//! `benches/vs_governor.rs` runs them. Counted inside
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
//! `benches/memory_store.rs` (`layer/*`) and `benches/vs_governor.rs`, on the same
//! workloads (`benches/common/shapes.rs`).

use tower::{Service, service_fn};
use tower_llm_ratelimit::{LlmRequest, LlmResponse};

#[path = "../benches/common/shapes.rs"]
mod shapes;

#[inline(never)]
fn run_loop<S>(rt: &tokio::runtime::Runtime, svc: &mut S, request: &LlmRequest, n: usize)
where
    S: Service<LlmRequest, Response = LlmResponse>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        std::hint::black_box(shapes::call_once(rt, svc, request));
    }
}

#[inline(never)]
fn decide_loop(n: usize, mut decide: impl FnMut(usize) -> bool) {
    for i in 0..n {
        std::hint::black_box(decide(i % shapes::KEYS));
    }
}

fn keyed(which: &str, n: usize) {
    let keys = shapes::keys();
    if which == "governor" {
        let limiter = governor::RateLimiter::keyed(shapes::governor_quota());
        decide_loop(n, |i| limiter.check_key(&keys[i]).is_ok());
    } else {
        let store = tower_llm_ratelimit::MemoryStore::new();
        // `decide` (fixed window), `decide-sliding`, `decide-bucket`.
        let name = which.strip_prefix("decide-").unwrap_or("fixed");
        let (_, algorithm) = shapes::algorithms()
            .into_iter()
            .find(|(n, _)| *n == name)
            .expect("decide, decide-sliding or decide-bucket");
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
    if which == "governor" || which.starts_with("decide") {
        return keyed(&which, n);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let llm = service_fn(shapes::answer);
    let request = LlmRequest::new("user-1", "hello");
    let layer = match which.as_str() {
        "bare" => return run_loop(&rt, &mut llm.clone(), &request, n),
        "one" => shapes::requests_only(),
        "four" => shapes::four_limits(),
        other => panic!("unknown shape {other:?}: bare, one, four, decide or governor"),
    };
    let mut svc = tower::Layer::layer(&layer, llm);
    run_loop(&rt, &mut svc, &request, n);
}
