//! Drives N concurrent decisions against Redis (or the memory store) for D seconds and
//! reports throughput and latency.
//!
//! ```sh
//! cargo run --release --example loadgen -- --redis redis://127.0.0.1:6379/ --concurrency 64
//! cargo run --release --example loadgen -- --through layer     # memory store, via the layer
//! ```
//!
//! Flags (`--help`): `--redis URL` (omit for memory), `--concurrency N` (64),
//! `--duration SECS` (5), `--identifiers N` (100), `--through layer|limiter` (limiter: one
//! request limit, fixed window, that never denies), `--batching on|off` (Redis: batch
//! concurrent acquires, default on), `--limits 1|2|4` (through the layer: requests,
//! then tokens, then a second request and token window; every call reports 150 tokens
//! used, so a token limit also costs a settlement write; `--no-usage`: none is reported
//! and nothing settled; `--group-states on|off`: the layer's identifier-wide limits in one
//! value per identifier, its default, or a key each), `--threads N` (runtime worker
//! threads, 1: current-thread). The last line is exactly
//! `decisions_per_sec=<number> p50_us=<number> p99_us=<number> decisions=<number>
//! client_cpu_us_per_decision=<number>` (client CPU: this process's user + system time,
//! from `/proc/self/stat`; 0 where that file does not exist).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tower::{Service, ServiceExt, service_fn};
use tower_llm_ratelimit::{
    FixedWindow, Limit, LlmRequest, LlmResponse, MemoryStore, Ratelimit, RatelimitLayer,
    RedisOptions, RedisStore, Store, Usage,
};

/// Drives N concurrent rate-limit decisions and prints throughput and latency.
#[derive(clap::Parser, Debug)]
struct Cli {
    /// Redis URL (omit for the memory store).
    #[arg(long)]
    redis: Option<String>,
    /// Decisions in flight.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// Seconds to run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Identifiers the decisions are spread over.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    identifiers: u64,
    /// `limiter` (one request limit, never denying) or `layer`.
    #[arg(long, default_value = "limiter", value_parser = ["limiter", "layer"])]
    through: String,
    /// Redis: batch concurrent acquires (`on` or `off`).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    batching: String,
    /// Through the layer: 1 (requests), 2 (+ tokens) or 4 (+ a second window of each).
    #[arg(long, default_value_t = 1)]
    limits: usize,
    /// The service reports no usage, so a call settles nothing (its acquire is all the
    /// store work; without it every call reports 150 tokens, which a token limit charges
    /// in a settlement write).
    #[arg(long)]
    no_usage: bool,
    /// Through the layer on Redis: keep its identifier-wide limits' states in one value
    /// per identifier (`on`, the layer's default) or a key per limit (`off`).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    group_states: String,
    /// Runtime worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
}

struct Args {
    redis: Option<String>,
    concurrency: usize,
    duration: Duration,
    identifiers: usize,
    through_layer: bool,
    batching: bool,
    limits: usize,
    threads: usize,
    no_usage: bool,
    group_states: bool,
}

fn parse() -> Result<Args, String> {
    let cli = <Cli as clap::Parser>::parse();
    if ![1, 2, 4].contains(&cli.limits) {
        return Err(format!("--limits must be 1, 2 or 4, not {}", cli.limits));
    }
    Ok(Args {
        redis: cli.redis,
        concurrency: cli.concurrency as usize,
        duration: Duration::from_secs(cli.duration),
        identifiers: cli.identifiers as usize,
        through_layer: cli.through == "layer",
        batching: cli.batching == "on",
        limits: cli.limits,
        threads: cli.threads as usize,
        no_usage: cli.no_usage,
        group_states: cli.group_states == "on",
    })
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    runtime.expect("a Tokio runtime").block_on(run(args));
}

/// This process's user + system CPU time in microseconds (Linux), or 0.
fn process_cpu_us() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) end with ')'; utime and
    // stime are fields 14 and 15 of the whole line, in clock ticks of 1/100 s.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) * 10_000
}

async fn run(args: Args) {
    let store: Arc<dyn Store> = match &args.redis {
        Some(url) => {
            match RedisStore::connect_with(url, RedisOptions::default().batching(args.batching))
                .await
            {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    eprintln!("loadgen: {e}");
                    std::process::exit(1);
                }
            }
        }
        None => Arc::new(MemoryStore::new()),
    };
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let prefix = format!("loadgen-{run}");
    // A limit that never denies: every decision is a full read-modify-write.
    let never_denies = FixedWindow::new(1 << 40, Duration::from_secs(3600)).unwrap();
    let ids: Arc<Vec<String>> =
        Arc::new((0..args.identifiers).map(|i| format!("user-{i}")).collect());
    let limiter =
        Arc::new(Ratelimit::with_shared_store(never_denies, store.clone(), &prefix).unwrap());
    // Through the layer: 1 limit (requests), 2 (requests + tokens), or 4 (two request
    // windows, two token windows), all never denying.
    let day = FixedWindow::new(1 << 40, Duration::from_secs(86_400)).unwrap();
    let mut builder = RatelimitLayer::builder()
        .shared_store(store)
        .prefix(prefix.clone())
        .group_states(args.group_states)
        .limit("rpm", Limit::requests(never_denies));
    if args.limits >= 2 {
        builder = builder.limit("tpm", Limit::tokens(never_denies));
    }
    if args.limits == 4 {
        builder = builder
            .limit("rpd", Limit::requests(day))
            .limit("tpd", Limit::tokens(day));
    }
    let layer = builder.build().unwrap();
    let usage = (!args.no_usage).then(|| Usage::new(100, 50));
    let inner = service_fn(move |_: LlmRequest| async move {
        Ok::<_, Infallible>(LlmResponse {
            text: String::new(),
            usage,
        })
    });
    let service = tower::Layer::layer(&layer, inner);

    println!(
        "loadgen: {} decisions in flight for {:?} over {} identifiers, through the {}, on {}",
        args.concurrency,
        args.duration,
        args.identifiers,
        if args.through_layer {
            format!("layer ({} limits)", args.limits)
        } else {
            "limiter".to_owned()
        },
        args.redis.as_deref().unwrap_or("the memory store"),
    );
    let cpu_before = process_cpu_us();
    let started = Instant::now();
    let deadline = started + args.duration;
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let (ids, limiter, mut service) = (ids.clone(), limiter.clone(), service.clone());
            let through_layer = args.through_layer;
            tokio::spawn(async move {
                let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                let mut i = w;
                while Instant::now() < deadline {
                    let id = &ids[i % ids.len()];
                    i += 1;
                    let t = Instant::now();
                    let ok = if through_layer {
                        match service.ready().await {
                            Ok(s) => s.call(LlmRequest::new(id.clone(), "")).await.is_ok(),
                            Err(_) => false,
                        }
                    } else {
                        limiter.limit(id, 1).await.is_ok_and(|d| d.allowed)
                    };
                    let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    if ok {
                        latencies.push(us);
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all: Vec<u32> = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = process_cpu_us().saturating_sub(cpu_before);
    all.sort_unstable();
    let pct = |p: f64| -> u32 {
        if all.is_empty() {
            0
        } else {
            all[((all.len() - 1) as f64 * p).round() as usize]
        }
    };
    if errors > 0 {
        println!("loadgen: {errors} decisions failed");
    }
    println!(
        "decisions_per_sec={:.0} p50_us={} p99_us={} decisions={} client_cpu_us_per_decision={:.2}",
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        all.len(),
        cpu as f64 / all.len().max(1) as f64,
    );
}
