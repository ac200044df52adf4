//! One Redis decision round trip (EVALSHA of acquire.lua), sequential and with 64 in
//! flight over the one multiplexed connection. Uses `REDIS_URL` or 127.0.0.1:6379.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tower_llm_ratelimit::{FixedWindow, Ratelimit, RedisStore};

fn round_trip(c: &mut Criterion) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = match rt.block_on(RedisStore::connect(&url)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skipping the Redis benchmark: {e} (set REDIS_URL)");
            return;
        }
    };
    let rl = Arc::new(
        Ratelimit::new(
            FixedWindow::new(1 << 40, Duration::from_secs(60)).unwrap(),
            store,
            "bench:redis",
        )
        .unwrap(),
    );
    let ids: Arc<Vec<String>> = Arc::new((0..100).map(|i| format!("user-{i}")).collect());
    let mut group = c.benchmark_group("redis_store");
    let mut i = 0usize;
    group.bench_function("decision_round_trip", |b| {
        b.iter(|| {
            i = (i + 1) % ids.len();
            black_box(rt.block_on(rl.limit(&ids[i], 1)).unwrap())
        })
    });
    // 64 decisions in flight: time per decision.
    group.bench_function("decision_64_in_flight", |b| {
        b.iter_custom(|iters| {
            let rl = rl.clone();
            let ids = ids.clone();
            rt.block_on(async move {
                let start = Instant::now();
                let per_task = iters.div_ceil(64);
                let tasks: Vec<_> = (0..64)
                    .map(|t| {
                        let rl = rl.clone();
                        let ids = ids.clone();
                        tokio::spawn(async move {
                            for j in 0..per_task {
                                let id = &ids[(t * 7 + j as usize) % ids.len()];
                                black_box(rl.limit(id, 1).await.unwrap());
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed() * iters as u32 / (per_task * 64) as u32
            })
        })
    });
    group.finish();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
