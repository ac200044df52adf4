//! MemoryStore ns per decision beside governor's keyed limiter, on the same keyed
//! workload (100 keys, quotas that never deny), single thread and on all cores.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use governor::RateLimiter;
use shapes::{KEYS, algorithms, governor_quota, keys};
use tower_llm_ratelimit::MemoryStore;

#[path = "common/shapes.rs"]
mod shapes;

fn single_thread(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("keyed_decision/single_thread");
    let governor = RateLimiter::keyed(governor_quota());
    let mut i = 0usize;
    group.bench_function("governor_keyed", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(governor.check_key(&keys[i]).is_ok())
        })
    });
    for (name, algorithm) in algorithms() {
        let store = MemoryStore::new();
        let mut i = 0usize;
        group.bench_function(format!("memory_store_{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % KEYS;
                black_box(store.decide(&keys[i], &algorithm, 1).allowed)
            })
        });
    }
    group.finish();
}

/// `threads` threads sharing one limiter, `iters` decisions in all: time per decision.
fn all_cores(
    iters: u64,
    threads: usize,
    decide: Arc<dyn Fn(usize) -> bool + Send + Sync>,
) -> Duration {
    let per_thread = iters.div_ceil(threads as u64);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let decide = decide.clone();
            s.spawn(move || {
                for j in 0..per_thread {
                    black_box(decide((t * 31 + j as usize) % KEYS));
                }
            });
        }
    });
    start.elapsed()
}

fn multi_thread(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let keys = Arc::new(keys());
    let mut group = c.benchmark_group(format!("keyed_decision/{threads}_threads"));
    let governor = Arc::new(RateLimiter::keyed(governor_quota()));
    {
        let (governor, keys) = (governor.clone(), keys.clone());
        let decide: Arc<dyn Fn(usize) -> bool + Send + Sync> =
            Arc::new(move |k| governor.check_key(&keys[k]).is_ok());
        group.bench_function("governor_keyed", |b| {
            b.iter_custom(|n| all_cores(n, threads, decide.clone()))
        });
    }
    let (_, algorithm) = algorithms()[0];
    let store = MemoryStore::new();
    let decide: Arc<dyn Fn(usize) -> bool + Send + Sync> = {
        let keys = keys.clone();
        Arc::new(move |k| store.decide(&keys[k], &algorithm, 1).allowed)
    };
    group.bench_function("memory_store_fixed", |b| {
        b.iter_custom(|n| all_cores(n, threads, decide.clone()))
    });
    group.finish();
}

criterion_group!(benches, single_thread, multi_thread);
criterion_main!(benches);
