//! MemoryStore decisions: ns per decision over a keyed workload (100 identifiers).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tower::{Service, ServiceExt, service_fn};
use tower_llm_ratelimit::store::{LimitCheck, identifier_tag, state_key};
use tower_llm_ratelimit::{
    Algorithm, FixedWindow, Limit, LlmRequest, LlmResponse, MemoryStore, Ratelimit, RatelimitLayer,
    SlidingWindow, TokenBucket, Usage,
};

fn algorithms() -> [(&'static str, Algorithm); 3] {
    // Quotas large enough that the benchmark measures allowed decisions.
    let w = Duration::from_secs(3600);
    [
        ("fixed", FixedWindow::new(1 << 40, w).unwrap().into()),
        ("sliding", SlidingWindow::new(1 << 40, w).unwrap().into()),
        (
            "bucket",
            TokenBucket::new(1 << 40, 1 << 30, w).unwrap().into(),
        ),
    ]
}

fn decisions(c: &mut Criterion) {
    let keys: Vec<std::sync::Arc<str>> = (0..100)
        .map(|i| {
            state_key(
                "bench",
                &identifier_tag(format!("user-{i}").as_bytes()).unwrap(),
            )
            .into()
        })
        .collect();
    let mut group = c.benchmark_group("memory_store");
    for (name, algorithm) in algorithms() {
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
    for (name, algorithm) in algorithms() {
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
    let llm = service_fn(|_: LlmRequest| async {
        Ok::<_, std::convert::Infallible>(LlmResponse {
            text: String::new(),
            usage: Some(Usage::new(1, 1)),
        })
    });
    let request = LlmRequest::new("user-1", "hello");
    let mut group = c.benchmark_group("layer");
    group.bench_function("bare_service", |b| {
        let mut svc = llm;
        b.iter(|| {
            rt.block_on(async {
                black_box(
                    svc.ready()
                        .await
                        .unwrap()
                        .call(request.clone())
                        .await
                        .unwrap(),
                )
            })
        })
    });
    let window = Duration::from_secs(3600);
    let requests_only = RatelimitLayer::builder()
        .request_limit(FixedWindow::new(1 << 40, window).unwrap())
        .build()
        .unwrap();
    let requests_and_tokens = RatelimitLayer::builder()
        .request_limit(FixedWindow::new(1 << 40, window).unwrap())
        .token_limit(SlidingWindow::new(1 << 40, window).unwrap())
        .build()
        .unwrap();
    let day = Duration::from_secs(86_400);
    let four_limits = RatelimitLayer::builder()
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
        .unwrap();
    for (name, layer) in [
        ("ratelimited_requests", requests_only),
        ("ratelimited_requests_and_tokens", requests_and_tokens),
        ("ratelimited_four_limits", four_limits),
    ] {
        let mut svc = tower::Layer::layer(&layer, llm);
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    black_box(
                        svc.ready()
                            .await
                            .unwrap()
                            .call(request.clone())
                            .await
                            .unwrap(),
                    )
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decisions, layer_overhead);
criterion_main!(benches);
