//! Exactness under real concurrency on Redis: many tasks in one process, and several OS
//! processes, racing on one identifier.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tower_llm_ratelimit::{
    Algorithm, FixedWindow, Ratelimit, RedisStore, SlidingWindow, TokenBucket,
};

const LIMIT: u64 = 50;

fn algorithms() -> Vec<(&'static str, Algorithm)> {
    let minute = tower_llm_ratelimit::algorithm::MAX_WINDOW;
    vec![
        ("fixed", FixedWindow::new(LIMIT, minute).unwrap().into()),
        ("sliding", SlidingWindow::new(LIMIT, minute).unwrap().into()),
        ("bucket", TokenBucket::new(LIMIT, 1, minute).unwrap().into()),
    ]
}

fn algorithm(name: &str) -> Algorithm {
    algorithms()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
}

/// Run `tasks` concurrent decisions of cost 1; returns how many were allowed.
async fn race(url: &str, prefix: &str, alg: Algorithm, tasks: usize) -> u64 {
    let store = RedisStore::connect(url).await.unwrap();
    let rl = Arc::new(Ratelimit::new(alg, store, prefix).unwrap());
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let rl = rl.clone();
            tokio::spawn(async move { rl.limit("shared-user", 1).await.unwrap().allowed })
        })
        .collect();
    let mut allowed = 0;
    for h in handles {
        allowed += h.await.unwrap() as u64;
    }
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tasks_exactly_fifty_allowed() {
    let url = common::redis_url();
    for (name, alg) in algorithms() {
        let prefix = common::unique_prefix(&format!("tasks-{name}"));
        let allowed = race(&url, &prefix, alg, 200).await;
        assert_eq!(
            allowed, LIMIT,
            "{name}: {allowed} allowed under a limit of {LIMIT}"
        );
    }
}

/// The child side of the multi-process test: run only when the parent sets the variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by four_processes_exactly_fifty_allowed as a child process"]
async fn child_process_race() {
    let (Ok(url), Ok(prefix), Ok(alg)) = (
        std::env::var("TLR_CHILD_URL"),
        std::env::var("TLR_CHILD_PREFIX"),
        std::env::var("TLR_CHILD_ALGORITHM"),
    ) else {
        panic!("child_process_race is started by four_processes_exactly_fifty_allowed");
    };
    // Start together: wait for the go file the parent creates once all children are up.
    let go = std::path::PathBuf::from(std::env::var("TLR_CHILD_GO").unwrap());
    while !go.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let allowed = race(&url, &prefix, algorithm(&alg), 50).await;
    println!("\nALLOWED={allowed}");
}

#[test]
fn four_processes_exactly_fifty_allowed() {
    let url = common::redis_url();
    let exe = std::env::current_exe().unwrap();
    for (name, _) in algorithms() {
        let prefix = common::unique_prefix(&format!("procs-{name}"));
        let go = std::env::temp_dir().join(format!("{prefix}.go"));
        let children: Vec<_> = (0..4)
            .map(|_| {
                Command::new(&exe)
                    .args([
                        "--ignored",
                        "--exact",
                        "child_process_race",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env("TLR_CHILD_URL", &url)
                    .env("TLR_CHILD_PREFIX", &prefix)
                    .env("TLR_CHILD_ALGORITHM", name)
                    .env("TLR_CHILD_GO", &go)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        std::fs::write(&go, b"go").unwrap();
        let mut total = 0u64;
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "child failed: {out:?}");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let allowed: u64 = stdout
                .lines()
                .find_map(|l| l.split_once("ALLOWED=").map(|(_, n)| n))
                .unwrap_or_else(|| panic!("no ALLOWED= line in {stdout}"))
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            total += allowed;
        }
        let _ = std::fs::remove_file(&go);
        assert_eq!(
            total, LIMIT,
            "{name}: 4 processes × 50 calls allowed {total} under {LIMIT}"
        );
    }
}

const LAYER_REQUESTS: u64 = 120;
const LAYER_TOKENS: u64 = 10_000_000;

/// Child side: 50 concurrent calls through the layer; prints ALLOWED= and USAGE=.
/// The layer of `child_layer_race`: a request limit and a token limit on the Redis at
/// `url`.
async fn race_layer(url: &str, prefix: &str) -> tower_llm_ratelimit::RatelimitLayer {
    tower_llm_ratelimit::RatelimitLayer::builder()
        .store(RedisStore::connect(url).await.unwrap())
        .prefix(prefix)
        .request_limit(
            FixedWindow::new(LAYER_REQUESTS, tower_llm_ratelimit::algorithm::MAX_WINDOW).unwrap(),
        )
        .token_limit(
            FixedWindow::new(LAYER_TOKENS, tower_llm_ratelimit::algorithm::MAX_WINDOW).unwrap(),
        )
        .include_output_tokens(true)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by four_processes_through_the_layer as a child process"]
async fn child_layer_race() {
    use tower::{BoxError, ServiceExt, service_fn};
    use tower_llm_ratelimit::{LlmRequest, LlmResponse, Usage};
    let (Ok(url), Ok(prefix), Ok(go)) = (
        std::env::var("TLR_CHILD_URL"),
        std::env::var("TLR_CHILD_PREFIX"),
        std::env::var("TLR_CHILD_GO"),
    ) else {
        panic!("child_layer_race is started by four_processes_through_the_layer");
    };
    let layer = race_layer(&url, &prefix).await;
    // Each call reports its own usage: prompt tokens from the prompt, 3 completion tokens.
    async fn llm(req: LlmRequest) -> Result<LlmResponse, BoxError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let prompt: u64 = req.prompt.parse()?;
        Ok(LlmResponse {
            text: String::new(),
            usage: Some(Usage::new(prompt, 3)),
        })
    }
    let svc = tower::Layer::layer(&layer, service_fn(llm));
    while !std::path::Path::new(&go).exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let tasks: Vec<_> = (0..50u64)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let prompt = 1 + (std::process::id() as u64 + i) % 17;
                svc.oneshot(LlmRequest::new("shared-user", prompt.to_string()))
                    .await
                    .ok()
                    .map(|_| prompt + 3)
            })
        })
        .collect();
    let (mut allowed, mut usage) = (0u64, 0u64);
    for t in tasks {
        if let Some(u) = t.await.unwrap() {
            allowed += 1;
            usage += u;
        }
    }
    println!("\nALLOWED={allowed} USAGE={usage}");
}

fn field(stdout: &str, name: &str) -> u64 {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {stdout}"))
        .parse()
        .unwrap()
}

#[test]
fn four_processes_through_the_layer() {
    let url = common::redis_url();
    let exe = std::env::current_exe().unwrap();
    let prefix = common::unique_prefix("layer-procs");
    let go = std::env::temp_dir().join(format!("{prefix}.go"));
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "child_layer_race",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("TLR_CHILD_URL", &url)
                .env("TLR_CHILD_PREFIX", &prefix)
                .env("TLR_CHILD_GO", &go)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&go, b"go").unwrap();
    let (mut allowed, mut usage) = (0, 0);
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "child failed: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        allowed += field(&stdout, "ALLOWED=");
        usage += field(&stdout, "USAGE=");
    }
    let _ = std::fs::remove_file(&go);
    assert_eq!(
        allowed, LAYER_REQUESTS,
        "200 calls under a limit of {LAYER_REQUESTS}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let charged = rt.block_on(async {
        let usage = race_layer(&url, &prefix)
            .await
            .usage("shared-user")
            .await
            .unwrap();
        let tokens = usage.iter().find(|u| u.name == "tokens").unwrap();
        LAYER_TOKENS - tokens.remaining
    });
    assert_eq!(
        charged, usage,
        "token charges in Redis equal the usage the mock reported"
    );
}

/// Concurrent acquires are batched into fewer scripts, and stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquires_are_batched_and_exact() {
    let server = common::RedisServer::start();
    let evalsha_calls = || {
        let out = Command::new("redis-cli")
            .args(["-p", &server.port.to_string(), "info", "commandstats"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    let allowed = race(
        &server.url,
        &common::unique_prefix("batched"),
        algorithm("fixed"),
        400,
    )
    .await;
    assert_eq!(allowed, LIMIT);
    let calls = evalsha_calls();
    assert!(
        calls < 400,
        "{calls} scripts for 400 decisions: nothing was batched"
    );
}

/// Concurrent settlements are batched too (fewer scripts than acquires + settlements),
/// and every one is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_settlements_are_batched_and_exact() {
    use tower::{BoxError, Layer, ServiceExt, service_fn};
    use tower_llm_ratelimit::{LlmRequest, LlmResponse, Usage};
    let server = common::RedisServer::start();
    let layer = tower_llm_ratelimit::RatelimitLayer::builder()
        .store(RedisStore::connect(&server.url).await.unwrap())
        .prefix(common::unique_prefix("settle-batch"))
        .request_limit(
            FixedWindow::new(1_000_000, tower_llm_ratelimit::algorithm::MAX_WINDOW).unwrap(),
        )
        .token_limit(
            FixedWindow::new(LAYER_TOKENS, tower_llm_ratelimit::algorithm::MAX_WINDOW).unwrap(),
        )
        .include_output_tokens(true)
        .build()
        .unwrap();
    // Every call reports its own usage (1..=17 prompt tokens, 3 output tokens), which the
    // settlement charges.
    async fn llm(req: LlmRequest) -> Result<LlmResponse, BoxError> {
        let prompt: u64 = req.prompt.parse()?;
        Ok(LlmResponse {
            text: String::new(),
            usage: Some(Usage::new(prompt, 3)),
        })
    }
    let svc = layer.clone().layer(service_fn(llm));
    let calls = 400u64;
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let prompt = 1 + i % 17;
                svc.oneshot(LlmRequest::new(
                    format!("user-{}", i % 4),
                    prompt.to_string(),
                ))
                .await
                .map(|_| prompt + 3)
                .map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut usage = 0;
    for t in tasks {
        usage += t.await.unwrap().unwrap();
    }
    // Settlements finish in the background of each call; give the last ones a moment.
    let mut charged = 0;
    for _ in 0..100 {
        charged = 0;
        for user in 0..4 {
            let limits = layer.usage(&format!("user-{user}")).await.unwrap();
            let tokens = limits.iter().find(|l| l.name == "tokens").unwrap();
            charged += tokens.limit - tokens.remaining;
        }
        if charged == usage {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(charged, usage, "every settlement charged exactly once");
    let out = Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "info", "commandstats"])
        .output()
        .unwrap();
    let scripts: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap());
    assert!(
        scripts < calls,
        "{scripts} scripts for {calls} acquires and {calls} settlements: settlements were not batched"
    );
}

/// A state left in the text form `"a:b:c"` by earlier releases is still read (an upgrade
/// keeps what was used), whatever its length (24 bytes included: the length of the
/// packed form without its marker), and the next take rewrites it packed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_states_of_earlier_releases_are_read() {
    let server = common::RedisServer::start();
    let window = tower_llm_ratelimit::algorithm::MAX_WINDOW;
    let store = RedisStore::connect(&server.url).await.unwrap();
    let prefix = common::unique_prefix("legacy");
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let index = now_us / window.as_micros();
    // (name, algorithm, text state, remaining after a take of 1)
    let cases: [(&str, Algorithm, String, u64); 3] = [
        (
            "fixed",
            FixedWindow::new(10, window).unwrap().into(),
            format!("{index}:7:0"),
            2,
        ),
        (
            "sliding",
            SlidingWindow::new(10, window).unwrap().into(),
            format!("{index}:7:0"),
            2,
        ),
        (
            // 12345 used of 100 000, refilled 1 per hour: "12345:<16 digits>:0" is
            // exactly 24 bytes.
            "bucket",
            TokenBucket::new(100_000, 1, Duration::from_secs(3600))
                .unwrap()
                .into(),
            format!("12345:{now_us}:0"),
            100_000 - 12_346,
        ),
    ];
    assert_eq!(
        cases[2].2.len(),
        24,
        "the bucket's text state is 24 bytes long"
    );
    for (name, alg, text, want) in cases {
        let rl = Ratelimit::new(alg, store.clone(), &format!("{prefix}-{name}")).unwrap();
        let key = rl.key("old-user").unwrap();
        let out = Command::new("redis-cli")
            .args(["-p", &server.port.to_string(), "SET", &key, &text])
            .args(["PX", "600000"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let decision = rl.limit("old-user", 1).await.unwrap();
        assert!(decision.allowed, "{name}");
        assert_eq!(decision.remaining, want, "{name}: {text:?} read as it was");
        let strlen = Command::new("redis-cli")
            .args(["-p", &server.port.to_string(), "STRLEN", &key])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&strlen.stdout).trim(),
            "25",
            "{name}: rewritten packed"
        );
        assert_eq!(rl.remaining("old-user").await.unwrap(), want, "{name}");
    }
}

/// A packed state no script writes (NaN or an infinity in any field, set by something
/// else) is decided as the client reads it (NaN as 0, the rest clamped to ±2^52), on every
/// algorithm, by acquires and settlements alike, alone or batched with other calls: no
/// error, nothing NaN written back, and the other calls of its batch unharmed. (A NaN
/// refill time used to fail the whole script after the writes of the calls before it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_states_are_decided_not_failed() {
    use tower_llm_ratelimit::Store;
    use tower_llm_ratelimit::store::{Adjustment, LimitCheck};
    let server = common::RedisServer::start();
    let store = RedisStore::connect(&server.url).await.unwrap();
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let prefix = common::unique_prefix("non-finite");
    let window = tower_llm_ratelimit::algorithm::MAX_WINDOW;
    let packed = |a: f64, b: f64, c: f64| -> Vec<u8> {
        let mut raw = vec![1u8];
        for v in [a, b, c] {
            raw.extend(v.to_le_bytes());
        }
        raw
    };
    let algorithms: [(&str, Algorithm); 3] = [
        ("fixed", FixedWindow::new(10, window).unwrap().into()),
        ("sliding", SlidingWindow::new(10, window).unwrap().into()),
        ("bucket", TokenBucket::new(10, 1, window).unwrap().into()),
    ];
    let odd = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
    let mut case = 0;
    for (name, algorithm) in algorithms {
        for field in 0..3 {
            for value in odd {
                case += 1;
                let mut fields = [5.0, 5.0, 0.0];
                fields[field] = value;
                let odd_key = format!("{prefix}:{name}:{case}:{{odd{case}}}");
                let good_key = format!("{prefix}:{name}:{case}:{{good{case}}}");
                let _: () = redis::cmd("SET")
                    .arg(&odd_key)
                    .arg(packed(fields[0], fields[1], fields[2]))
                    .arg("PX")
                    .arg(600_000)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let check = |key: &str| LimitCheck {
                    key: key.into(),
                    rule: algorithm.into(),
                    cost: 1,
                    take: true,
                    slot: 0,
                };
                let what = format!("{name}, field {field} = {value}");
                // Queued together: one batch, the good call first.
                let good = store.acquire(&[check(&good_key)]);
                let odd = store.acquire(&[check(&odd_key)]);
                let good = good
                    .await
                    .unwrap_or_else(|e| panic!("{what}: good call: {e}"));
                odd.await.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(
                    good[0].allowed && good[0].remaining == 9,
                    "{what}: {good:?}"
                );
                let refund = Adjustment {
                    key: odd_key.as_str().into(),
                    rule: algorithm.into(),
                    delta: -1,
                    slot: 0,
                    window: None,
                };
                store
                    .adjust(&[refund], None)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: settlement: {e}"));
                let raw: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&odd_key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if let Some(raw) = raw.filter(|r| r.len() == 25) {
                    for i in 0..3 {
                        let v = f64::from_le_bytes(raw[1 + 8 * i..9 + 8 * i].try_into().unwrap());
                        assert!(v.is_finite(), "{what}: wrote {v} back");
                    }
                }
            }
        }
    }
}

/// A key that holds another Redis type (a key prefix shared with other data) fails the
/// calls and settlements on it, and only them: the others batched in the same scripts
/// are applied exactly, and nothing is written for the failed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_key_fails_only_its_own_calls_in_a_batch() {
    let server = common::RedisServer::start();
    let store = RedisStore::connect(&server.url).await.unwrap();
    let rl = Arc::new(
        Ratelimit::new(
            FixedWindow::new(1_000_000, tower_llm_ratelimit::algorithm::MAX_WINDOW).unwrap(),
            store,
            &common::unique_prefix("foreign"),
        )
        .unwrap(),
    );
    let foreign = rl.key("foreign").unwrap();
    let cli = |args: &[&str]| common::redis_cli(server.port, args);
    cli(&["ZADD", &foreign, "1", "someone-elses-data"]);
    let tasks: Vec<_> = (0..400u64)
        .map(|i| {
            let rl = rl.clone();
            tokio::spawn(async move {
                let id = if i % 2 == 0 { "good" } else { "foreign" };
                let result = if i % 4 < 2 {
                    rl.limit(id, 2).await.map(|d| d.allowed)
                } else {
                    rl.charge(id, 3).await.map(|_| true)
                };
                (id, result.is_ok())
            })
        })
        .collect();
    let mut ok = std::collections::HashMap::new();
    for t in tasks {
        let (id, fine) = t.await.unwrap();
        *ok.entry((id, fine)).or_insert(0u64) += 1;
    }
    assert_eq!(ok.get(&("good", true)), Some(&200), "{ok:?}");
    assert_eq!(ok.get(&("foreign", false)), Some(&200), "{ok:?}");
    // 100 takes of 2 and 100 charges of 3 for "good", nothing more.
    assert_eq!(rl.remaining("good").await.unwrap(), 1_000_000 - 500);
    assert_eq!(cli(&["TYPE", &foreign]), "zset");
    assert_eq!(cli(&["ZCARD", &foreign]), "1");
}

/// Empty operations are answered without a script, so they cannot disturb the others
/// batched with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_operations_touch_nothing() {
    use tower_llm_ratelimit::Store;
    let server = common::RedisServer::start();
    let store = RedisStore::connect(&server.url).await.unwrap();
    let rl = Ratelimit::new(
        algorithm("fixed"),
        store.clone(),
        &common::unique_prefix("empty"),
    )
    .unwrap();
    assert!(rl.limit("someone", 1).await.unwrap().allowed);
    let (empty_adjust, empty_acquire, take) = tokio::join!(
        store.adjust(&[], Some(5)),
        store.acquire(&[]),
        rl.limit("someone", 1),
    );
    assert!(empty_adjust.unwrap().is_empty());
    assert!(empty_acquire.unwrap().is_empty());
    assert_eq!(take.unwrap().remaining, LIMIT - 2);
}

mod store_edges {
    //! The store interface with any ids: settlement ids and slot ids use all 64 bits.

    use super::*;
    use tower_llm_ratelimit::Store;
    use tower_llm_ratelimit::store::{Adjustment, LimitCheck, Rule};

    fn charge(key: &str, delta: i64) -> Adjustment {
        Adjustment {
            key: key.into(),
            rule: Rule::Rate(algorithm("fixed")),
            delta,
            slot: 0,
            window: None,
        }
    }

    /// Any settlement id, `u64::MAX` included, is applied once, in a batch or alone, and
    /// leaves the other settlements of its batch alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settlement_ids_of_all_64_bits_apply_once() {
        let server = common::RedisServer::start();
        let prefix = common::unique_prefix("ids");
        for batching in [true, false] {
            let options = tower_llm_ratelimit::RedisOptions::default().batching(batching);
            let store = Arc::new(
                RedisStore::connect_with(&server.url, options)
                    .await
                    .unwrap(),
            );
            let key = |i: u64| format!("{prefix}-{batching}:{{u{i}}}");
            let id = |i: u64| {
                if i.is_multiple_of(2) {
                    u64::MAX - i
                } else {
                    (1 << 53) + i
                }
            };
            for _round in 0..2 {
                // Twice the same settlements: the second round finds every id applied.
                let tasks: Vec<_> = (0..64u64)
                    .map(|i| {
                        let (store, key) = (store.clone(), key(i));
                        tokio::spawn(
                            async move { store.adjust(&[charge(&key, 3)], Some(id(i))).await },
                        )
                    })
                    .collect();
                for t in tasks {
                    let decisions = t.await.unwrap().unwrap();
                    assert_eq!(decisions[0].remaining, LIMIT - 3, "batching {batching}");
                }
            }
            for i in 0..64 {
                let out = Command::new("redis-cli")
                    .args(["-p", &server.port.to_string(), "TYPE", &key(i)])
                    .output()
                    .unwrap();
                assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "string");
            }
        }
    }

    fn slot_check(key: &str, slot: u64) -> LimitCheck {
        LimitCheck {
            key: key.into(),
            rule: Rule::Concurrency(
                tower_llm_ratelimit::ConcurrencyLimit::new(2, Duration::from_secs(60)).unwrap(),
            ),
            cost: 1,
            take: true,
            slot,
        }
    }

    /// Slot ids that differ only beyond 2^53 (or in the low bits of huge ids) stay
    /// distinct: releasing one frees one slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slot_ids_of_all_64_bits_stay_distinct() {
        let server = common::RedisServer::start();
        let store = RedisStore::connect(&server.url).await.unwrap();
        let prefix = common::unique_prefix("slots");
        for (n, (a, b)) in [((1u64 << 53) + 1, 1 << 53), (u64::MAX, u64::MAX - 1)]
            .into_iter()
            .enumerate()
        {
            let key = format!("{prefix}:{{s{n}}}");
            let first = store.acquire(&[slot_check(&key, a)]).await.unwrap();
            assert_eq!(first[0].remaining, 1);
            let second = store.acquire(&[slot_check(&key, b)]).await.unwrap();
            assert_eq!(second[0].remaining, 0);
            let release = Adjustment {
                key: key.as_str().into(),
                rule: slot_check(&key, a).rule,
                delta: -1,
                slot: a,
                window: None,
            };
            let after = store.adjust(&[release], None).await.unwrap();
            assert_eq!(after[0].remaining, 1, "only slot {a} was released");
        }
    }
}

/// Calls of different shapes (sets of limits) batched together: each shape's calls go
/// in their own script, the generated one for their shape or the one for any limits (a
/// call with a concurrency limit), all sent at once. A limit that every shape shares
/// stays exact across them, and nothing is taken for a denied call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_of_different_shapes_batched_together_are_exact() {
    use tower_llm_ratelimit::store::{LimitCheck, Rule};
    use tower_llm_ratelimit::{ConcurrencyLimit, Store};
    let server = common::RedisServer::start();
    let store = Arc::new(RedisStore::connect(&server.url).await.unwrap());
    let prefix = common::unique_prefix("shapes");
    let minute = tower_llm_ratelimit::algorithm::MAX_WINDOW;
    let key = |name: &str| format!("{prefix}:{name}:{{user}}");
    let check = |name: &str, rule: Rule, take: bool| LimitCheck {
        key: key(name).into(),
        rule,
        cost: 1,
        take,
        slot: 0,
    };
    let shared = || {
        check(
            "shared",
            FixedWindow::new(LIMIT, minute).unwrap().into(),
            true,
        )
    };
    let plenty = 1_000_000;
    let shapes: Vec<Vec<LimitCheck>> = vec![
        vec![shared()],
        vec![
            shared(),
            check(
                "sliding",
                SlidingWindow::new(plenty, minute).unwrap().into(),
                false,
            ),
        ],
        vec![
            check(
                "bucket",
                TokenBucket::new(plenty, 1, minute).unwrap().into(),
                true,
            ),
            shared(),
        ],
        vec![
            shared(),
            check(
                "slots",
                ConcurrencyLimit::new(plenty, minute).unwrap().into(),
                true,
            ),
        ],
    ];
    let tasks: Vec<_> = (0..400usize)
        .map(|i| {
            let store = store.clone();
            let mut checks = shapes[i % shapes.len()].clone();
            for (n, c) in checks.iter_mut().enumerate() {
                c.slot = if matches!(c.rule, Rule::Concurrency(_)) {
                    (i * 8 + n) as u64 + 1
                } else {
                    0
                };
            }
            tokio::spawn(async move {
                let decisions = store.acquire(&checks).await.unwrap();
                (i % 4, decisions.iter().all(|d| d.allowed))
            })
        })
        .collect();
    let mut allowed = [0u64; 4];
    for t in tasks {
        let (shape, ok) = t.await.unwrap();
        allowed[shape] += u64::from(ok);
    }
    assert_eq!(
        allowed.iter().sum::<u64>(),
        LIMIT,
        "allowed per shape: {allowed:?}"
    );
    // What the other limits took: exactly one per allowed call of the shapes that take
    // them (the sliding window only checks).
    let cli = |args: &[&str]| common::redis_cli(server.port, args);
    assert_eq!(cli(&["ZCARD", &key("slots")]), allowed[3].to_string());
    assert_eq!(cli(&["EXISTS", &key("sliding")]), "0");
    let bucket = Rule::from(TokenBucket::new(plenty, 1, minute).unwrap());
    let read = LimitCheck {
        key: key("bucket").into(),
        rule: bucket,
        cost: 0,
        take: false,
        slot: 0,
    };
    let left = store.acquire(&[read]).await.unwrap()[0].remaining;
    assert_eq!(plenty - left, allowed[2], "the bucket's takes");
}

/// A process that meets more shapes of calls than it generates scripts for (one per
/// window here) still decides every one of them exactly: the shapes beyond use the
/// script for any limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shapes_beyond_the_generated_scripts_are_decided_exactly() {
    use tower_llm_ratelimit::Store;
    use tower_llm_ratelimit::store::LimitCheck;
    let server = common::RedisServer::start();
    let store = Arc::new(RedisStore::connect(&server.url).await.unwrap());
    let prefix = common::unique_prefix("many-shapes");
    let tasks: Vec<_> = (0..100u64)
        .flat_map(|shape| (0..5).map(move |call| (shape, call)))
        .map(|(shape, _)| {
            let store = store.clone();
            let window = Duration::from_secs(3600 + shape);
            let check = LimitCheck {
                key: format!("{prefix}:{shape}:{{user}}").into(),
                rule: FixedWindow::new(3, window).unwrap().into(),
                cost: 1,
                take: true,
                slot: 0,
            };
            tokio::spawn(async move { (shape, store.acquire(&[check]).await.unwrap()[0].allowed) })
        })
        .collect();
    let mut allowed = vec![0u64; 100];
    for t in tasks {
        let (shape, ok) = t.await.unwrap();
        allowed[shape as usize] += u64::from(ok);
    }
    assert!(
        allowed.iter().all(|&n| n == 3),
        "allowed per shape: {allowed:?}"
    );
}
