//! MemoryStore decisions: ns per decision over a keyed workload (100 identifiers).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tower::service_fn;
use tower_llm_ratelimit::store::LimitCheck;
use tower_llm_ratelimit::{LlmRequest, MemoryStore, Ratelimit};

#[path = "common/shapes.rs"]
mod shapes;

fn decisions(c: &mut Criterion) {
    let keys: Vec<tower_llm_ratelimit::store::StateKey> =
        shapes::keys().into_iter().map(Into::into).collect();
    let mut group = c.benchmark_group("memory_store");
    for (name, algorithm) in shapes::algorithms() {
        let store = MemoryStore::new();
        let mut i = 0usize;
        group.bench_function(format!("acquire_now/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                let check = [LimitCheck {
                    key: keys[i].clone(),
                    rule: algorithm.into(),
                    cost: 1,
                    take: true,
                    slot: 0,
                }];
                black_box(store.acquire_now(&check))
            })
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for (name, algorithm) in shapes::algorithms() {
        let rl = Ratelimit::new(algorithm, MemoryStore::new(), "bench").unwrap();
        let ids: Vec<String> = (0..100).map(|i| format!("user-{i}")).collect();
        let mut i = 0usize;
        group.bench_function(format!("ratelimit_limit/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % ids.len();
                black_box(rt.block_on(rl.limit(&ids[i], 1)).unwrap())
            })
        });
    }
    group.finish();
}

fn layer_overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let llm = service_fn(shapes::answer);
    let request = LlmRequest::new("user-1", "hello");
    let mut group = c.benchmark_group("layer");
    group.bench_function("bare_service", |b| {
        let mut svc = llm;
        b.iter(|| black_box(shapes::call_once(&rt, &mut svc, &request)))
    });
    for (name, layer) in [
        ("ratelimited_requests", shapes::requests_only()),
        (
            "ratelimited_requests_and_tokens",
            shapes::requests_and_tokens(),
        ),
        ("ratelimited_four_limits", shapes::four_limits()),
    ] {
        let mut svc = tower::Layer::layer(&layer, llm);
        group.bench_function(name, |b| {
            b.iter(|| black_box(shapes::call_once(&rt, &mut svc, &request)))
        });
    }
    group.finish();
}

criterion_group!(benches, decisions, layer_overhead);
criterion_main!(benches);
