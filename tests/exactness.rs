//! Exact at every edge: a store stall takes nothing from calls that never reached the
//! model, reservations go back only to the window that paid, streams cut short are
//! charged their estimate, settlement ids do not grow Redis, cached denials do not
//! outlive a reset, and slots outlive their lease while the call runs.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use proxy::{FaultProxy, Mode};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_llm_ratelimit::identifier::Fixed;
use tower_llm_ratelimit::store::LimitCheck;
use tower_llm_ratelimit::{
    ConcurrencyLimit, ErrorKind, FixedWindow, LimitUsage, LlmRequest, LlmResponse, ManualClock,
    MemoryStore, RatelimitLayer, RedisOptions, RedisStore, SlidingWindow, Store, StoreErrorPolicy,
    TokenMode, Usage,
};

/// No test run straddles a window this long.
const LONG: Duration = tower_llm_ratelimit::algorithm::MAX_WINDOW;
const TIMEOUT: Duration = Duration::from_millis(200);

fn remaining(usage: &[LimitUsage], name: &str) -> u64 {
    usage.iter().find(|u| u.name == name).unwrap().remaining
}

fn llm(
    delay: Duration,
    usage: Usage,
) -> impl Service<LlmRequest, Response = LlmResponse, Error = BoxError, Future: Send> + Clone + Send
{
    service_fn(move |_: LlmRequest| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, BoxError>(LlmResponse {
            text: "ok".into(),
            usage: Some(usage),
        })
    })
}

fn stalled_layer(store: RedisStore, prefix: &str, policy: StoreErrorPolicy) -> RatelimitLayer {
    RatelimitLayer::builder()
        .store(store)
        .prefix(prefix)
        .request_limit(FixedWindow::new(5, LONG).unwrap())
        .token_limit(FixedWindow::new(10_000, LONG).unwrap())
        .token_mode(TokenMode::Reserve)
        .default_estimate(1000)
        .include_output_tokens(true)
        .concurrency_limit(ConcurrencyLimit::new(1, Duration::from_secs(600)).unwrap())
        .on_store_error(policy)
        .store_timeout(TIMEOUT)
        .build()
        .unwrap()
}

/// A Redis of this test's own, reached through a fault proxy, and a store on it that
/// times out after [`TIMEOUT`].
async fn behind_a_proxy(batching: bool) -> (common::RedisServer, FaultProxy, RedisStore) {
    let server = common::RedisServer::start();
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", server.port).parse().unwrap()).await;
    let options = RedisOptions::default()
        .response_timeout(TIMEOUT)
        .batching(batching);
    let store = RedisStore::connect_with(&proxy.url(), options)
        .await
        .unwrap();
    (server, proxy, store)
}

/// Replies from Redis arrive after the store timeout: ten users' calls all see the stall
/// at once. Afterwards Redis holds exactly what the calls that reached the model used.
async fn stall(policy: StoreErrorPolicy, batching: bool) {
    let (server, proxy, store) = behind_a_proxy(batching).await;
    let prefix = common::unique_prefix(&format!("stall-{policy:?}"));
    let layer = stalled_layer(store, &prefix, policy);
    let svc = layer.layer(llm(Duration::ZERO, Usage::new(10, 5)));

    proxy.set_delay(TIMEOUT * 3);
    let users: Vec<String> = (0..10).map(|i| format!("user-{i}")).collect();
    let calls = users.iter().map(|u| {
        let svc = svc.clone();
        let request = LlmRequest::new(u.as_str(), "hi");
        async move { svc.oneshot(request).await }
    });
    let results = futures_join_all(calls).await;
    let passed = results.iter().filter(|r| r.is_ok()).count() as u64;
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::Store, "{policy:?}: {e}");
        }
    }
    match policy {
        StoreErrorPolicy::FailClosed => assert_eq!(passed, 0),
        _ => assert_eq!(passed, 10, "{policy:?}: {results:?}"),
    }

    // Heal, let the late replies come back and be undone, and queued writes land.
    proxy.set(Mode::Pass);
    tokio::time::sleep(TIMEOUT * 4).await;
    assert_eq!(layer.flush(Duration::from_secs(10)).await, 0);

    // Read through a second layer straight on Redis (no proxy, no cache).
    let direct = RedisStore::connect(&server.url).await.unwrap();
    let observer = stalled_layer(direct, &prefix, StoreErrorPolicy::FailClosed);
    let deadline = Instant::now() + Duration::from_secs(5);
    for user in &users {
        loop {
            let usage = observer.usage(user).await.unwrap();
            // Passed calls used one request and 15 tokens each in Redis; failed ones
            // nothing. No slot is held either way.
            let want = (5 - passed / 10, 10_000 - 15 * (passed / 10), 1);
            let got = (
                remaining(&usage, "requests"),
                remaining(&usage, "tokens"),
                remaining(&usage, "concurrency"),
            );
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{policy:?} batching={batching}: {user} has {got:?} left, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The concurrency-1 users are served right away (past the breaker's cool-down).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for user in &users {
        let r = svc
            .clone()
            .oneshot(LlmRequest::new(user.as_str(), "hi"))
            .await;
        assert!(r.is_ok(), "{policy:?}: {user} after the stall: {r:?}");
    }
}

async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_takes_nothing_fail_closed() {
    stall(StoreErrorPolicy::FailClosed, true).await;
    stall(StoreErrorPolicy::FailClosed, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_counts_calls_once_fail_open() {
    stall(StoreErrorPolicy::FailOpen, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_counts_calls_once_local() {
    stall(StoreErrorPolicy::Local, false).await;
}

/// A acquires 1000 at 0:59, the window rolls, B takes 1000, A settles at 100: the refund
/// of 900 must not make room for C in the new window.
async fn reserve_across_a_boundary(store: Arc<dyn Store>, clock: ManualClock, sliding: bool) {
    let window = Duration::from_secs(60);
    let prefix = common::unique_prefix("cross");
    let mut builder = RatelimitLayer::builder()
        .shared_store(store.clone())
        .prefix(prefix.clone());
    builder = if sliding {
        builder.token_limit(SlidingWindow::new(1000, window).unwrap())
    } else {
        builder.token_limit(FixedWindow::new(1000, window).unwrap())
    };
    let layer = builder
        .token_mode(TokenMode::Reserve)
        .include_output_tokens(true)
        .identifier(Fixed::new("carol"))
        .build()
        .unwrap();
    // A's model answers when told to.
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
    let slow = service_fn(move |_: LlmRequest| {
        let released = released.clone();
        async move {
            if let Some(rx) = released.lock().await.take() {
                let _ = rx.await;
            }
            Ok::<_, BoxError>(LlmResponse {
                text: "a".into(),
                usage: Some(Usage::new(50, 50)),
            })
        }
    });
    let svc = layer.layer(slow);
    clock.set(Duration::from_secs(1_700_000_040 / 60 * 60 + 59));
    let a = tokio::spawn(
        svc.clone()
            .oneshot(LlmRequest::new("carol", "x").with_max_tokens(999)),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    clock.advance(Duration::from_secs(3));
    // Estimates are the prompt ("x": 1 token) plus `max_tokens`.
    let fast_usage = if sliding {
        Usage::new(10, 23)
    } else {
        Usage::new(500, 500)
    };
    let fast = layer.layer(llm(Duration::ZERO, fast_usage));
    let mut passed_in_new_window = 0;
    if sliding {
        // 2 s into the new window, ceil(1000 × 58/60) = 967 of A's window still count.
        let b = fast
            .clone()
            .oneshot(LlmRequest::new("carol", "x").with_max_tokens(32))
            .await;
        assert!(b.is_ok(), "{b:?}");
    } else {
        let b = fast
            .clone()
            .oneshot(LlmRequest::new("carol", "x").with_max_tokens(999))
            .await
            .unwrap();
        assert_eq!(b.text, "ok");
        passed_in_new_window += 1000;
    }
    release.send(()).unwrap();
    a.await.unwrap().unwrap();
    let usage = layer.usage("carol").await.unwrap();
    if sliding {
        // A's refund of 900 came off the previous window (100 left there, weighing
        // ceil(100 × 58/60) = 97), not off B's 33 in the current one.
        assert_eq!(remaining(&usage, "tokens"), 1000 - 33 - 97);
    } else {
        // A's 900 did not land in the new window: C is refused.
        assert_eq!(remaining(&usage, "tokens"), 1000 - passed_in_new_window);
        let c = fast
            .clone()
            .oneshot(LlmRequest::new("carol", "x").with_max_tokens(899))
            .await;
        assert_eq!(c.unwrap_err().kind(), ErrorKind::TokenLimitReached);
    }
}

#[tokio::test]
async fn reservations_go_back_only_to_the_window_that_paid_memory() {
    for sliding in [false, true] {
        let clock = ManualClock::new(Duration::ZERO);
        let store: Arc<dyn Store> = Arc::new(MemoryStore::with_clock(clock.clone()));
        reserve_across_a_boundary(store, clock, sliding).await;
    }
}

#[tokio::test]
async fn reservations_go_back_only_to_the_window_that_paid_redis() {
    for sliding in [false, true] {
        let clock = ManualClock::new(Duration::ZERO);
        let store = redis_on(&clock).await;
        reserve_across_a_boundary(Arc::new(store), clock, sliding).await;
    }
}

type Frames = tokio_stream::wrappers::ReceiverStream<Result<http_body::Frame<Bytes>, Infallible>>;
type UpstreamRequest =
    http::Request<tower_llm_ratelimit::http::RequestBody<http_body_util::Full<Bytes>>>;

/// An SSE upstream that sends `chunks` content events and then hangs (no usage ever).
fn hanging_stream(
    chunks: usize,
) -> impl Service<UpstreamRequest, Response = http::Response<StreamBody<Frames>>, Error = Infallible>
+ Clone {
    service_fn(move |_req| async move {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            for i in 0..chunks {
                let event = format!(
                    "data: {{\"choices\":[{{\"delta\":{{\"content\":\"tok{i}\"}}}}],\"usage\":null}}\n\n"
                );
                let _ = tx
                    .send(Ok(http_body::Frame::data(Bytes::from(event))))
                    .await;
            }
            // Hold the stream open until the client goes away.
            tx.closed().await;
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap(),
        )
    })
}

#[tokio::test]
async fn a_stream_dropped_before_its_usage_is_charged_its_estimate() {
    // A prompt of 4000 bytes: an estimate of 1000 tokens.
    let prompt = "x".repeat(4000);
    let body = serde_json::json!({
        "model": "gpt-4o", "stream": true, "max_tokens": 50,
        "messages": [{"role": "user", "content": prompt}],
    })
    .to_string();
    for mode in [TokenMode::CheckRemaining, TokenMode::Reserve] {
        for inject in [true, false] {
            let layer = RatelimitLayer::builder()
                .token_limit(FixedWindow::new(1_000_000, LONG).unwrap())
                .token_mode(mode)
                .include_output_tokens(true)
                .inject_stream_usage(inject)
                .identifier(Fixed::new("dave"))
                .build_http()
                .unwrap();
            let svc = tower::Layer::layer(&layer, hanging_stream(3));
            let request = http::Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .header("content-length", body.len())
                .body(http_body_util::Full::new(Bytes::from(body.clone())))
                .unwrap();
            let response = svc.oneshot(request).await.unwrap();
            let mut response_body = response.into_body();
            // The first content chunk arrives; then the user clicks "stop".
            let first = response_body.frame().await.unwrap().unwrap();
            assert!(first.is_data());
            drop(response_body);
            tokio::task::yield_now().await;
            let used = 1_000_000 - remaining(&layer.usage("dave").await.unwrap(), "tokens");
            assert!(
                (1000..=1100).contains(&used),
                "{mode:?} inject={inject}: charged {used}, want the prompt estimate (1000) plus the output seen"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_calls_leave_bounded_redis_memory() {
    let server = common::RedisServer::start();
    let horizon = Duration::from_millis(1500);
    let options = RedisOptions::default().settlement_dedupe(horizon);
    let store = RedisStore::connect_with(&server.url, options)
        .await
        .unwrap();
    let prefix = common::unique_prefix("mem");
    let layer = RatelimitLayer::builder()
        .store(store)
        .prefix(prefix.clone())
        .request_limit(FixedWindow::new(1_000_000, LONG).unwrap())
        .token_limit(FixedWindow::new(1_000_000_000, LONG).unwrap())
        .token_mode(TokenMode::Reserve)
        .default_estimate(100)
        .include_output_tokens(true)
        .build()
        .unwrap();
    let svc = layer.layer(llm(Duration::ZERO, Usage::new(10, 5)));
    let calls = 10_000;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let svc = svc.clone();
        tasks.spawn(async move {
            for _ in 0..calls / 32 + 1 {
                svc.clone()
                    .oneshot(LlmRequest::new("erin", "hi"))
                    .await
                    .unwrap();
            }
            worker
        });
    }
    while tasks.join_next().await.is_some() {}
    // Besides the one value of the layer's two states: one key per settlement id, each
    // expiring after the dedupe horizon, none without a TTL, each small.
    let keys = common::redis_keys(&server.url, &prefix);
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    let ids: Vec<&(String, i64)> = keys
        .iter()
        .filter(|(key, _)| key.contains(":settlement:"))
        .collect();
    assert_eq!(
        ids.len() + 1,
        keys.len(),
        "{:?}",
        &keys[..keys.len().min(5)]
    );
    assert!(
        !ids.is_empty() && ids.len() <= calls as usize + 32,
        "{} ids",
        ids.len()
    );
    // (A key listed but gone by the time its TTL was read, -2, expired in between: the
    // listing reads ~10 000 TTLs one after another, for longer than some ids have left.)
    for (key, ttl) in ids.iter().filter(|(_, ttl)| *ttl != -2).take(50) {
        assert!(
            *ttl > 0 && *ttl <= horizon.as_millis() as i64,
            "{key}: TTL {ttl}"
        );
        // None: it expired since.
        let bytes: Option<i64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .query(&mut c)
            .unwrap();
        assert!(bytes.is_none_or(|b| b <= 128), "{key}: {bytes:?} bytes");
    }
    tokio::time::sleep(horizon + Duration::from_millis(500)).await;
    let keys = common::redis_keys(&server.url, &prefix);
    assert_eq!(keys.len(), 1, "after the dedupe horizon: {keys:?}");
    for (key, ttl) in keys {
        assert!(ttl > 0, "{key} has no TTL");
        let bytes: i64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&key)
            .query(&mut c)
            .unwrap();
        assert!(bytes <= 200, "{key}: {bytes} bytes");
    }
}

fn denying_layer(store: RedisStore, prefix: &str) -> RatelimitLayer {
    RatelimitLayer::builder()
        .store(store)
        .prefix(prefix)
        .request_limit(FixedWindow::new(1, LONG).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_reset_lifts_cached_denials_here_at_once_and_elsewhere_within_a_second() {
    let prefix = common::unique_prefix("reset");
    let a = denying_layer(
        RedisStore::connect(&common::redis_url()).await.unwrap(),
        &prefix,
    );
    let b = denying_layer(
        RedisStore::connect(&common::redis_url()).await.unwrap(),
        &prefix,
    );
    let svc_a = a.layer(llm(Duration::ZERO, Usage::new(1, 1)));
    let svc_b = b.layer(llm(Duration::ZERO, Usage::new(1, 1)));

    svc_a
        .clone()
        .oneshot(LlmRequest::new("fay", "hi"))
        .await
        .unwrap();
    // Denied, and the denial (retry after ~10 years) is cached in A.
    let denied = svc_a
        .clone()
        .oneshot(LlmRequest::new("fay", "hi"))
        .await
        .unwrap_err();
    assert_eq!(denied.kind(), ErrorKind::RequestLimitReached);
    assert!(denied.retry_after().unwrap() > Duration::from_secs(3600));
    // A reset through A lifts it at once.
    a.reset("fay").await.unwrap();
    svc_a
        .clone()
        .oneshot(LlmRequest::new("fay", "hi"))
        .await
        .unwrap();

    // Denied again in A (cached); B resets: A serves within a second.
    assert!(
        svc_a
            .clone()
            .oneshot(LlmRequest::new("fay", "hi"))
            .await
            .is_err()
    );
    assert!(
        svc_b
            .clone()
            .oneshot(LlmRequest::new("fay", "hi"))
            .await
            .is_err()
    );
    b.reset("fay").await.unwrap();
    let reset_at = Instant::now();
    loop {
        match svc_a.clone().oneshot(LlmRequest::new("fay", "hi")).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::RequestLimitReached);
                assert!(
                    reset_at.elapsed() < Duration::from_millis(1300),
                    "A still denies from its cache {:?} after B's reset",
                    reset_at.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A call longer than its slot's lease keeps the slot until it ends.
async fn long_call_keeps_its_slot(store: Arc<dyn Store>) {
    let lease = Duration::from_millis(300);
    let layer = RatelimitLayer::builder()
        .shared_store(store)
        .prefix(common::unique_prefix("lease"))
        .concurrency_limit(ConcurrencyLimit::new(1, lease).unwrap())
        .build()
        .unwrap();
    let slow = layer.layer(llm(lease * 5, Usage::new(1, 1)));
    let quick = layer.layer(llm(Duration::ZERO, Usage::new(1, 1)));
    let long = tokio::spawn(slow.oneshot(LlmRequest::new("gus", "hi")));
    for _ in 0..4 {
        tokio::time::sleep(lease).await;
        let r = quick.clone().oneshot(LlmRequest::new("gus", "hi")).await;
        assert_eq!(
            r.unwrap_err().kind(),
            ErrorKind::ConcurrencyLimitReached,
            "the running call lost its slot"
        );
    }
    long.await.unwrap().unwrap();
    quick.oneshot(LlmRequest::new("gus", "hi")).await.unwrap();
}

#[tokio::test]
async fn a_call_longer_than_its_lease_keeps_its_slot() {
    long_call_keeps_its_slot(Arc::new(MemoryStore::new())).await;
    let redis = RedisStore::connect(&common::redis_url()).await.unwrap();
    long_call_keeps_its_slot(Arc::new(redis)).await;
}

#[tokio::test]
async fn an_acquire_dropped_while_queued_for_a_batch_is_never_sent() {
    // Many acquires queued at once, most dropped right away: Redis ends up holding only
    // the ones that were kept.
    let store = RedisStore::connect(&common::redis_url()).await.unwrap();
    let prefix = common::unique_prefix("batchdrop");
    let key: tower_llm_ratelimit::store::StateKey = format!("{prefix}:{{hank}}").into();
    let check = || LimitCheck {
        key: key.clone(),
        rule: FixedWindow::new(1_000_000, LONG).unwrap().into(),
        cost: 1,
        take: true,
        slot: 0,
    };
    let mut kept = Vec::new();
    for i in 0..400 {
        let fut = store.acquire(&[check()]);
        if i % 4 == 0 {
            kept.push(tokio::spawn(fut));
        } else {
            drop(fut);
        }
    }
    for k in kept {
        assert!(k.await.unwrap().unwrap()[0].allowed);
    }
    // Let any late undo land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = store
        .acquire(&[LimitCheck { cost: 0, ..check() }])
        .await
        .unwrap();
    assert_eq!(read[0].remaining, 1_000_000 - 100);
}

/// A stall longer than several undo attempts: the undo of a failed call lands once,
/// however many times it had to be sent (it carries an id the store deduplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stall_undoes_a_failed_call_exactly_once() {
    for batching in [false, true] {
        let (server, proxy, store) = behind_a_proxy(batching).await;
        let prefix = common::unique_prefix("long-stall");
        let layer = stalled_layer(store, &prefix, StoreErrorPolicy::FailClosed);
        let svc = layer.layer(llm(Duration::ZERO, Usage::new(10, 5)));
        for _ in 0..2 {
            svc.clone()
                .oneshot(LlmRequest::new("ivy", "hi"))
                .await
                .unwrap();
        }
        proxy.set_delay(TIMEOUT * 3);
        let err = svc
            .clone()
            .oneshot(LlmRequest::new("ivy", "hi"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Store);
        tokio::time::sleep(Duration::from_secs(3)).await;
        proxy.set(Mode::Pass);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let direct = RedisStore::connect(&server.url).await.unwrap();
        let observer = stalled_layer(direct, &prefix, StoreErrorPolicy::FailClosed);
        let usage = observer.usage("ivy").await.unwrap();
        let got = (
            remaining(&usage, "requests"),
            remaining(&usage, "tokens"),
            remaining(&usage, "concurrency"),
        );
        assert_eq!(got, (3, 10_000 - 30, 1), "batching={batching}");
    }
}

/// A Redis store (the test server) deciding at `clock`'s time.
async fn redis_on(clock: &ManualClock) -> RedisStore {
    RedisStore::connect(&common::redis_url())
        .await
        .unwrap()
        .with_test_clock(clock.clone())
}

/// Under a test clock every key outlives real time, slot sets included, so a Redis
/// store on virtual time decides as the memory store does however slow the test runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_under_a_test_clock_do_not_expire_in_real_time() {
    let clock = ManualClock::new(Duration::from_secs(1_000_000));
    let (redis, memory) = (
        redis_on(&clock).await,
        MemoryStore::with_clock(clock.clone()),
    );
    let key: tower_llm_ratelimit::store::StateKey =
        format!("{}:{{slots}}", common::unique_prefix("test-clock-slots")).into();
    let check = |slot: u64| LimitCheck {
        key: key.clone(),
        rule: tower_llm_ratelimit::store::Rule::Concurrency(
            ConcurrencyLimit::new(1, Duration::from_millis(50)).unwrap(),
        ),
        cost: 1,
        take: true,
        slot,
    };
    for store in [&redis as &dyn Store, &memory] {
        assert!(store.acquire(&[check(1)]).await.unwrap()[0].allowed);
    }
    // Real time passes the lease; virtual time does not.
    tokio::time::sleep(Duration::from_millis(150)).await;
    for store in [&redis as &dyn Store, &memory] {
        let second = store.acquire(&[check(2)]).await.unwrap();
        assert!(
            !second[0].allowed,
            "the first slot is still held at virtual time"
        );
    }
}

/// A caller whose clock reads earlier than the one that last wrote a limit's state (two
/// threads, two processes, a failover to a server whose clock is behind) decides in the
/// state's newer window: it counts there, and that window keeps its count. Memory and
/// Redis alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_behind_the_state_decides_in_the_state_window() {
    let window = Duration::from_millis(10);
    let start = Duration::from_secs(1_000_000);
    for sliding in [false, true] {
        let alg: tower_llm_ratelimit::Algorithm = if sliding {
            SlidingWindow::new(5, window).unwrap().into()
        } else {
            FixedWindow::new(5, window).unwrap().into()
        };
        let clock = ManualClock::new(start);
        let (redis, memory) = (
            redis_on(&clock).await,
            MemoryStore::with_clock(clock.clone()),
        );
        let key: tower_llm_ratelimit::store::StateKey =
            format!("{}:{{behind}}", common::unique_prefix("behind")).into();
        let check = || LimitCheck {
            key: key.clone(),
            rule: tower_llm_ratelimit::store::Rule::Rate(alg),
            cost: 1,
            take: true,
            slot: 0,
        };
        let mut seen = Vec::new();
        for store in [&memory as &dyn Store, &redis] {
            clock.set(start + window); // the first µs of window w+1
            let ahead = store.acquire(&[check()]).await.unwrap().remove(0);
            clock.set(start + window - Duration::from_micros(1)); // the last µs of w
            let behind = store.acquire(&[check()]).await.unwrap().remove(0);
            clock.set(start + window + Duration::from_micros(2));
            let after = store.acquire(&[check()]).await.unwrap().remove(0);
            assert_eq!(
                behind.window, ahead.window,
                "sliding {sliding}: decided in w+1"
            );
            assert_eq!(
                after.remaining, 2,
                "sliding {sliding}: w+1 counts all three"
            );
            seen.push((ahead, behind, after));
        }
        assert_eq!(
            seen[0], seen[1],
            "sliding {sliding}: memory and Redis agree"
        );
    }
}

/// A call whose clock reads behind a state's window decides in that window, and the
/// state it writes back lives to that window's end by the store's clock (not one skew
/// earlier, which let a caller near the window's end start the window's count afresh).
#[test]
fn a_state_written_by_a_clock_behind_lives_to_its_windows_end() {
    let window = Duration::from_millis(10);
    let start = Duration::from_secs(1_000_000); // a window boundary
    for sliding in [false, true] {
        let clock = ManualClock::new(start);
        let store = MemoryStore::with_clock(clock.clone());
        let alg: tower_llm_ratelimit::Algorithm = if sliding {
            SlidingWindow::new(2, window).unwrap().into()
        } else {
            FixedWindow::new(2, window).unwrap().into()
        };
        let key = "behind:{one}";
        // A caller at the window's start takes one unit; one whose clock reads 1 ms
        // behind takes the second, in the same window.
        assert!(store.decide(key, &alg, 1).allowed);
        clock.set(start - Duration::from_millis(1));
        let d = store.decide(key, &alg, 1);
        assert!(d.allowed, "sliding {sliding}");
        assert_eq!(d.remaining, 0, "sliding {sliding}");
        // Just before the window ends the budget is still spent.
        clock.set(start + window - Duration::from_micros(500));
        let d = store.decide(key, &alg, 1);
        assert!(
            !d.allowed,
            "sliding {sliding}: a third call got through in a window of 2"
        );
    }
}

/// Two OS threads hammering one fixed window through the memory store's own clock
/// never let more than the limit through in any window (each decision is counted in
/// the window it reports).
#[test]
fn two_threads_never_overfill_a_window() {
    use std::collections::HashMap;
    let store = Arc::new(MemoryStore::new());
    let alg: tower_llm_ratelimit::Algorithm = FixedWindow::new(100, Duration::from_millis(10))
        .unwrap()
        .into();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut allowed: HashMap<i64, u64> = HashMap::new();
                while Instant::now() < deadline {
                    let d = store.decide("overfill:{one}", &alg, 1);
                    if d.allowed {
                        *allowed.entry(d.window.unwrap()).or_default() += 1;
                    }
                }
                allowed
            })
        })
        .collect();
    let mut per_window: HashMap<i64, u64> = HashMap::new();
    for t in threads {
        for (w, n) in t.join().unwrap() {
            *per_window.entry(w).or_default() += n;
        }
    }
    assert!(per_window.len() > 50, "{} windows", per_window.len());
    let over: Vec<_> = per_window.iter().filter(|(_, n)| **n > 100).collect();
    assert!(over.is_empty(), "windows over the limit: {over:?}");
}

/// An acquire that was answered, its answer not yet read, and whose future is then
/// dropped on a thread without a Tokio runtime: what it took is still given back (on the
/// runtime the store was made on), batched or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_acquire_dropped_off_the_runtime_takes_nothing() {
    for batching in [true, false] {
        let options = RedisOptions::default().batching(batching);
        let store = RedisStore::connect_with(&common::redis_url(), options)
            .await
            .unwrap();
        let prefix = common::unique_prefix("offruntime");
        let rl = tower_llm_ratelimit::Ratelimit::new(
            FixedWindow::new(100, LONG).unwrap(),
            store,
            &prefix,
        )
        .unwrap();
        let mut call = Box::pin(rl.limit("hank", 1));
        // One poll sends the acquire; then its answer arrives and waits, unread.
        std::future::poll_fn(|cx| {
            assert!(call.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        std::thread::scope(|s| {
            s.spawn(move || drop(call));
        });
        let mut remaining = 0;
        for _ in 0..100 {
            remaining = rl.remaining("hank").await.unwrap();
            if remaining == 100 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            remaining, 100,
            "batching {batching}: the dropped acquire kept its unit"
        );
    }
}

/// A reply too long to pack in one go (over 4 000 numbers: one call of 700 limits, then
/// a settlement of them all) arrives whole and in order.
#[tokio::test]
async fn a_call_of_hundreds_of_limits_gets_every_decision() {
    let store = RedisStore::connect(&common::redis_url()).await.unwrap();
    let prefix = common::unique_prefix("wide");
    let checks: Vec<LimitCheck> = (0..700u64)
        .map(|i| LimitCheck {
            key: format!("{prefix}:l{i}:{{wide}}").into(),
            rule: FixedWindow::new(1000 + i, LONG).unwrap().into(),
            cost: 1 + i % 3,
            take: true,
            slot: 0,
        })
        .collect();
    let decisions = store.acquire(&checks).await.unwrap();
    assert_eq!(decisions.len(), 700);
    for (i, (d, c)) in decisions.iter().zip(&checks).enumerate() {
        assert!(d.allowed, "limit {i}");
        assert_eq!(d.limit, 1000 + i as u64, "limit {i}");
        assert_eq!(d.remaining, d.limit - c.cost, "limit {i}");
    }
    let adjustments: Vec<tower_llm_ratelimit::store::Adjustment> = checks
        .iter()
        .zip(&decisions)
        .map(|(c, d)| tower_llm_ratelimit::store::Adjustment {
            key: c.key.clone(),
            rule: c.rule,
            delta: -(c.cost as i64),
            slot: 0,
            window: d.window,
        })
        .collect();
    let settled = store.adjust(&adjustments, Some(7)).await.unwrap();
    assert_eq!(settled.len(), 700);
    for (i, d) in settled.iter().enumerate() {
        assert_eq!(d.remaining, 1000 + i as u64, "limit {i} after the refund");
    }
}

/// One settlement of `delta` on `key`, a fixed window of 1 000 000 that never rolls here.
fn charge(key: &str, delta: i64) -> Vec<tower_llm_ratelimit::store::Adjustment> {
    vec![tower_llm_ratelimit::store::Adjustment {
        key: key.into(),
        rule: FixedWindow::new(1_000_000, LONG).unwrap().into(),
        delta,
        slot: 0,
        window: None,
    }]
}

/// A settlement's id is remembered for the dedupe horizon however many settlements of
/// its identifier come after it: retrying the oldest of 300 changes nothing. (A set of
/// an identifier's 128 newest ids forgot it, and its retry applied again: a busy
/// identifier's retries after an ambiguous timeout double-charged.)
#[tokio::test]
async fn a_retried_settlement_is_not_applied_again_however_many_came_after() {
    let store = RedisStore::connect(&common::redis_url()).await.unwrap();
    let key = format!("{}:t:{{dedupe}}", common::unique_prefix("dedupe"));
    let charge = |delta| charge(&key, delta);
    let remaining = |d: Vec<tower_llm_ratelimit::Decision>| d[0].remaining;
    for id in 1..=300u64 {
        store.adjust(&charge(1), Some(id)).await.unwrap();
    }
    let before = remaining(store.adjust(&charge(0), None).await.unwrap());
    assert_eq!(before, 1_000_000 - 300);
    for id in [300, 299, 250, 2, 1] {
        let after = remaining(store.adjust(&charge(1), Some(id)).await.unwrap());
        assert_eq!(after, before, "settlement {id} was applied twice");
    }
    let after = remaining(store.adjust(&charge(1), Some(301)).await.unwrap());
    assert_eq!(after, before - 1, "a new id is applied");
}

/// Hundreds of settlements of one identifier within one millisecond (a hot identifier on
/// a fast Redis) keep their newest ids: retrying any of the last ten changes nothing.
/// (Scored by the millisecond alone, their ids tied and Redis ordered them by the ids'
/// random digits, evicting some of the newest.)
#[tokio::test]
async fn a_burst_of_settlements_within_a_millisecond_keeps_its_newest_ids() {
    let clock = ManualClock::new(Duration::from_secs(1_800_000_000));
    let store = redis_on(&clock).await;
    let key = format!("{}:t:{{burst}}", common::unique_prefix("burst"));
    let charge = |delta| charge(&key, delta);
    // Random-looking 63-bit ids, as the crate makes them (xorshift).
    let mut rng = common::Xorshift(0x2545_F491_4F6C_DD1D);
    let ids: Vec<u64> = (0..300).map(|_| rng.next() >> 1).collect();
    for &id in &ids {
        clock.advance(Duration::from_micros(2));
        store.adjust(&charge(1), Some(id)).await.unwrap();
    }
    let mut remaining = store.adjust(&charge(0), None).await.unwrap()[0].remaining;
    assert_eq!(remaining, 1_000_000 - 300);
    let mut applied_again = Vec::new();
    for &id in ids[290..].iter().rev() {
        clock.advance(Duration::from_micros(2));
        let after = store.adjust(&charge(1), Some(id)).await.unwrap()[0].remaining;
        if after != remaining {
            applied_again.push(id);
        }
        remaining = after;
    }
    assert!(applied_again.is_empty(), "applied again: {applied_again:?}");
}

/// Settlements of one identifier batched into one script are each remembered: after 100
/// later settlements, retrying any of the batch changes nothing.
#[tokio::test]
async fn a_batch_of_settlements_of_one_identifier_is_remembered_whole() {
    // Batching (on by default) needs the server's clock.
    let store = RedisStore::connect(&common::redis_url()).await.unwrap();
    let key = format!("{}:t:{{batch}}", common::unique_prefix("batch"));
    let charge = |delta| charge(&key, delta);
    // A batching store queues a settlement when it is called; this test's runtime has
    // one thread, so all 32 are queued before the batching task runs, and go out in one
    // script, in this order.
    let batch: Vec<u64> = (1..=32).map(|i| i * 0x9E37_79B9).collect();
    let queued: Vec<_> = batch
        .iter()
        .map(|&id| store.adjust(&charge(1), Some(id)))
        .collect();
    for decided in queued {
        decided.await.unwrap();
    }
    // 100 later settlements.
    for id in 1..=100u64 {
        store.adjust(&charge(1), Some(id)).await.unwrap();
    }
    let mut remaining = store.adjust(&charge(0), None).await.unwrap()[0].remaining;
    assert_eq!(remaining, 1_000_000 - 132);
    let mut applied_again = Vec::new();
    for (place, &id) in batch.iter().enumerate().rev() {
        let after = store.adjust(&charge(1), Some(id)).await.unwrap()[0].remaining;
        if after != remaining {
            applied_again.push(place + 1);
        }
        remaining = after;
    }
    assert!(
        applied_again.is_empty(),
        "places applied again: {applied_again:?}"
    );
}

/// A settlement remembered "forever" (`Duration::MAX`) is applied once and its id key
/// still expires: the TTL is capped where Redis accepts it, batched, alone and on a test
/// clock. (Uncapped, Redis rejected the TTL after recording the id, so the charge was
/// never applied and every retry was taken for a duplicate; on a test clock the TTL
/// wrapped negative and deleted the key, so a retry applied twice.)
#[tokio::test]
async fn a_settlement_remembered_forever_is_applied_once() {
    let clock = ManualClock::new(Duration::from_secs(1_800_000_000));
    for mode in ["batched", "alone", "test clock"] {
        let options = RedisOptions::default()
            .settlement_dedupe(Duration::MAX)
            .batching(mode == "batched");
        let mut store = RedisStore::connect_with(&common::redis_url(), options)
            .await
            .unwrap();
        if mode == "test clock" {
            store = store.with_test_clock(clock.clone());
        }
        let key = format!("{}:t:{{forever}}", common::unique_prefix("forever"));
        for attempt in ["first", "retry"] {
            let d = store.adjust(&charge(&key, 5), Some(42)).await;
            assert_eq!(
                d.map(|d| d[0].remaining).ok(),
                Some(1_000_000 - 5),
                "{mode}: {attempt}"
            );
        }
        let client = redis::Client::open(common::redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("{key}:settlement:42"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{mode}: the id key's PTTL is {ttl}");
    }
}

/// A set of recent settlement ids written by an earlier release (`<key>:settled`, ids
/// scored by the time applied) is left alone: during a rolling upgrade each release
/// keeps its own newest ids, so the retries of either are applied once.
#[tokio::test]
async fn settlements_leave_an_earlier_releases_id_set_alone() {
    let store = RedisStore::connect(&common::redis_url()).await.unwrap();
    let prefix = common::unique_prefix("rolling");
    let key = format!("{prefix}:t:{{rolling}}");
    let earlier = format!("{key}:settled");
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut c = client.get_connection().unwrap();
    // As the earlier release left it: 127 ids, the newest scored highest.
    for id in 1..=127u64 {
        let _: () = redis::cmd("ZADD")
            .arg(&earlier)
            .arg(1_800_000_000_000u64 + id)
            .arg(id)
            .query(&mut c)
            .unwrap();
    }
    let _: () = redis::cmd("PEXPIRE")
        .arg(&earlier)
        .arg(60_000)
        .query(&mut c)
        .unwrap();
    for id in 1_000..1_200u64 {
        store.adjust(&charge(&key, 1), Some(id)).await.unwrap();
    }
    let kept: Vec<u64> = redis::cmd("ZRANGE")
        .arg(&earlier)
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .unwrap();
    assert_eq!(
        kept,
        (1..=127).collect::<Vec<_>>(),
        "the earlier release's ids"
    );
}
