//! Faults, outages and cancellation: a test-owned redis-server behind a test-owned fault
//! proxy; for each store-error policy, the documented outcome, no hang beyond the
//! timeout, and after recovery every queued charge landed exactly once.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proxy::{FaultProxy, Mode};
use tower::{BoxError, Service, ServiceExt, service_fn};
use tower_llm_ratelimit::store::{Adjustment, LimitCheck, StoreFuture};
use tower_llm_ratelimit::{
    ConcurrencyLimit, Decision, ErrorKind, FixedWindow, LlmRequest, LlmResponse, MemoryStore,
    Ratelimit, RatelimitLayer, RedisOptions, RedisStore, Store, StoreError, StoreErrorPolicy,
    TokenMode, Usage,
};

/// Fixed windows are aligned to multiples of their length since the epoch: with the
/// longest window allowed (10 years), no test run straddles a boundary.
const MINUTE: Duration = tower_llm_ratelimit::algorithm::MAX_WINDOW;
const TIMEOUT: Duration = Duration::from_millis(200);
/// Tokens the mock LLM reports per call (prompt + completion, output included).
const PER_CALL: u64 = 15;
const TOKENS: u64 = 1_000_000;

fn mock_llm(
    delay: Duration,
    usage: Usage,
) -> impl Service<LlmRequest, Response = LlmResponse, Error = BoxError, Future: Send> + Clone + Send
{
    service_fn(move |_: LlmRequest| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok::<_, BoxError>(LlmResponse {
            text: "ok".into(),
            usage: Some(usage),
        })
    })
}

async fn redis_via(url: &str) -> RedisStore {
    let options = RedisOptions::default()
        .response_timeout(TIMEOUT)
        .connect_timeout(TIMEOUT);
    RedisStore::connect_with(url, options).await.unwrap()
}

/// The tokens `id` has used of `layer`'s token limit (of `TOKENS`), as its store holds them.
async fn tokens_used<X>(layer: &RatelimitLayer<X>, id: &str) -> u64 {
    let usage = layer.usage(id).await.unwrap();
    TOKENS - usage.iter().find(|u| u.name == "tokens").unwrap().remaining
}

/// Five calls; returns how many passed. Each must finish well within the timeout bound.
async fn five_calls<S>(svc: &S, policy: StoreErrorPolicy, phase: &str, expect_ok: bool) -> u64
where
    S: Service<LlmRequest, Response = LlmResponse, Error = tower_llm_ratelimit::Error> + Clone,
{
    let mut ok = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let result = svc.clone().oneshot(LlmRequest::new("alice", "hi")).await;
        let took = started.elapsed();
        assert!(
            took < TIMEOUT * 5,
            "{policy:?}/{phase}: a call took {took:?}"
        );
        match result {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Store, "{policy:?}/{phase}: {e}");
                assert!(!expect_ok, "{policy:?}/{phase}: failed with {e}");
            }
        }
    }
    if expect_ok {
        assert_eq!(ok, 5, "{policy:?}/{phase}");
    }
    ok
}

async fn outage_for(policy: StoreErrorPolicy) {
    let server = common::RedisServer::start();
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", server.port).parse().unwrap()).await;
    let store = redis_via(&proxy.url()).await;
    let prefix = common::unique_prefix(&format!("outage-{policy:?}"));
    let layer = RatelimitLayer::builder()
        .store(store)
        .prefix(prefix.clone())
        .request_limit(FixedWindow::new(1000, MINUTE).unwrap())
        .token_limit(FixedWindow::new(TOKENS, MINUTE).unwrap())
        .include_output_tokens(true)
        .on_store_error(policy)
        .store_timeout(TIMEOUT)
        .build()
        .unwrap();
    let svc = tower::Layer::layer(&layer, mock_llm(Duration::ZERO, Usage::new(10, 5)));
    let degraded_ok = policy != StoreErrorPolicy::FailClosed;
    let mut ok = five_calls(&svc, policy, "healthy", true).await;

    proxy.set_delay(TIMEOUT * 3);
    ok += five_calls(&svc, policy, "latency", degraded_ok).await;
    proxy.set(Mode::BlackHole);
    ok += five_calls(&svc, policy, "black hole", degraded_ok).await;
    proxy.set(Mode::Refuse);
    proxy.drop_connections();
    ok += five_calls(&svc, policy, "dropped", degraded_ok).await;

    // Heal; the breaker lets the store be tried again within its cool-down.
    proxy.set(Mode::Pass);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut recovered = false;
    for _ in 0..50 {
        if svc
            .clone()
            .oneshot(LlmRequest::new("alice", "hi"))
            .await
            .is_ok()
        {
            ok += 1;
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "{policy:?}: the layer did not recover");
    ok += five_calls(&svc, policy, "recovered", true).await;
    assert_eq!(
        layer.flush(Duration::from_secs(10)).await,
        0,
        "{policy:?}: settlements still queued"
    );
    assert_eq!(layer.dropped_settlements(), 0);
    // Every call that passed was charged exactly once, outage or not.
    let used = tokens_used(&layer, "alice").await;
    assert_eq!(used, PER_CALL * ok, "{policy:?}: {ok} calls passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fail_closed() {
    outage_for(StoreErrorPolicy::FailClosed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fail_open() {
    outage_for(StoreErrorPolicy::FailOpen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_local() {
    outage_for(StoreErrorPolicy::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_policy_enforces_limits_in_process_and_flags_decisions() {
    let server = common::RedisServer::start();
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", server.port).parse().unwrap()).await;
    let layer = RatelimitLayer::builder()
        .store(redis_via(&proxy.url()).await)
        .prefix(common::unique_prefix("local"))
        .request_limit(FixedWindow::new(3, MINUTE).unwrap())
        .on_store_error(StoreErrorPolicy::Local)
        .store_timeout(TIMEOUT)
        .identifier(tower_llm_ratelimit::identifier::Header::new("x-user-id"))
        .build_http()
        .unwrap();
    let svc = tower::Layer::layer(
        &layer,
        service_fn(|_: http::Request<_>| async {
            Ok::<_, BoxError>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from("{}"),
            )))
        }),
    );
    proxy.set(Mode::BlackHole);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let req = http::Request::builder()
            .header("x-user-id", "zoe")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(response.headers()["x-ratelimit-fallback"], "local");
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "the local store enforces the limit"
    );
    proxy.set(Mode::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_redis_under_load_loses_no_charge() {
    // Persist every write, so what Redis acknowledged survives kill -9.
    let mut server =
        common::RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let url = server.url.clone();
    let prefix = common::unique_prefix("kill9");
    let layer = RatelimitLayer::builder()
        .store(redis_via(&url).await)
        .prefix(prefix.clone())
        .request_limit(FixedWindow::new(100_000, MINUTE).unwrap())
        .token_limit(FixedWindow::new(TOKENS, MINUTE).unwrap())
        .include_output_tokens(true)
        .on_store_error(StoreErrorPolicy::Local)
        .store_timeout(TIMEOUT)
        .build()
        .unwrap();
    let svc = tower::Layer::layer(
        &layer,
        mock_llm(Duration::from_millis(5), Usage::new(10, 5)),
    );
    let ok = Arc::new(AtomicUsize::new(0));
    let load = {
        let (svc, ok) = (svc.clone(), ok.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut tasks = tokio::task::JoinSet::new();
            while Instant::now() < deadline {
                for _ in 0..8 {
                    let (svc, ok) = (svc.clone(), ok.clone());
                    tasks.spawn(async move {
                        if svc.oneshot(LlmRequest::new("alice", "hi")).await.is_ok() {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::block_in_place(|| server.kill9());
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::block_in_place(|| server.restart());
    load.await.unwrap();
    assert_eq!(
        layer.flush(Duration::from_secs(15)).await,
        0,
        "settlements still queued"
    );
    let ok = ok.load(Ordering::SeqCst) as u64;
    assert!(ok > 50, "only {ok} calls passed");
    assert_eq!(tokens_used(&layer, "alice").await, PER_CALL * ok);
    // And the layer works normally again (scripts reloaded after the restart).
    let response = svc.oneshot(LlmRequest::new("alice", "hi")).await.unwrap();
    assert_eq!(response.text, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_holds_and_releases_on_every_path() {
    let redis: Arc<dyn Store> = Arc::new(RedisStore::connect(&common::redis_url()).await.unwrap());
    for store in [Arc::new(MemoryStore::new()) as Arc<dyn Store>, redis] {
        let prefix = common::unique_prefix("inflight");
        let layer = RatelimitLayer::builder()
            .shared_store(store.clone())
            .prefix(prefix.clone())
            .concurrency_limit(ConcurrencyLimit::new(2, MINUTE).unwrap())
            .build()
            .unwrap();
        let svc = tower::Layer::layer(
            &layer,
            mock_llm(Duration::from_millis(200), Usage::new(1, 1)),
        );
        let tasks: Vec<_> = (0..5)
            .map(|_| tokio::spawn(svc.clone().oneshot(LlmRequest::new("bob", "hi"))))
            .collect();
        let mut kinds = Vec::new();
        for t in tasks {
            kinds.push(t.await.unwrap().err().map(|e| e.kind()));
        }
        assert_eq!(kinds.iter().filter(|k| k.is_none()).count(), 2, "{kinds:?}");
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == Some(ErrorKind::ConcurrencyLimitReached))
                .count(),
            3
        );
        // Released on success: two more pass.
        for _ in 0..2 {
            svc.clone()
                .oneshot(LlmRequest::new("bob", "hi"))
                .await
                .unwrap();
        }
        // Released on cancellation.
        for _ in 0..4 {
            let call = svc.clone().oneshot(LlmRequest::new("bob", "hi"));
            let _ = tokio::time::timeout(Duration::from_millis(20), call).await;
        }
        // Released on inner error.
        let failing = tower::Layer::layer(
            &layer,
            service_fn(|_: LlmRequest| async { Err::<LlmResponse, BoxError>("boom".into()) }),
        );
        for _ in 0..4 {
            assert_eq!(
                failing
                    .clone()
                    .oneshot(LlmRequest::new("bob", "x"))
                    .await
                    .unwrap_err()
                    .kind(),
                ErrorKind::Inner
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let usage = layer.usage("bob").await.unwrap();
        assert_eq!(usage[0].name, "concurrency");
        assert_eq!(usage[0].remaining, 2, "every slot was released");
    }
}

#[tokio::test]
async fn a_slot_of_a_dead_process_expires_after_its_lease() {
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&common::redis_url()).await.unwrap());
    let prefix = common::unique_prefix("lease");
    let limit = ConcurrencyLimit::new(1, Duration::from_millis(300)).unwrap();
    // A "crashed" holder: takes the only slot and never releases it.
    let crashed = store
        .acquire(&[tower_llm_ratelimit::store::LimitCheck {
            key: format!("{prefix}:concurrency:{{carl}}").into(),
            rule: limit.into(),
            cost: 1,
            take: true,
            slot: 42,
        }])
        .await
        .unwrap();
    assert!(crashed[0].allowed);
    let layer = RatelimitLayer::builder()
        .shared_store(store)
        .prefix(prefix)
        .concurrency_limit(limit)
        .build()
        .unwrap();
    let svc = tower::Layer::layer(&layer, mock_llm(Duration::ZERO, Usage::new(1, 1)));
    let err = svc
        .clone()
        .oneshot(LlmRequest::new("carl", "hi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConcurrencyLimitReached);
    assert!(err.retry_after().unwrap() <= Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(350)).await;
    svc.oneshot(LlmRequest::new("carl", "hi")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_dropped_at_random_points_leave_nothing_behind() {
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&common::redis_url()).await.unwrap());
    let prefix = common::unique_prefix("cancel");
    let layer = RatelimitLayer::builder()
        .shared_store(store.clone())
        .prefix(prefix.clone())
        .token_limit(FixedWindow::new(TOKENS, MINUTE).unwrap())
        .token_mode(TokenMode::Reserve)
        .concurrency_limit(ConcurrencyLimit::new(1000, MINUTE).unwrap())
        .build()
        .unwrap();
    // Usage 0: any token still missing at the end is a leaked reservation.
    let svc = tower::Layer::layer(&layer, mock_llm(Duration::from_millis(2), Usage::new(0, 0)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300u64 {
        let svc = svc.clone();
        tasks.spawn(async move {
            let timeout = Duration::from_micros((i * 7919) % 5000);
            let call = svc.oneshot(LlmRequest::new("dora", "").with_max_tokens(100));
            let _ = tokio::time::timeout(timeout, call).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    let tokens = Ratelimit::with_shared_store(
        FixedWindow::new(TOKENS, MINUTE).unwrap(),
        store.clone(),
        &format!("{prefix}:tokens"),
    )
    .unwrap();
    let mut remaining = 0;
    for _ in 0..100 {
        remaining = tokens.remaining("dora").await.unwrap();
        if remaining == TOKENS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(remaining, TOKENS, "a reservation was left behind");
    let inflight = format!("{prefix}:inflight");
    let keys = common::redis_keys(&common::redis_url(), &inflight);
    assert!(
        keys.is_empty(),
        "a concurrency slot was left behind: {keys:?}"
    );
}

#[tokio::test]
async fn an_http_slot_is_held_until_the_body_ends_or_is_dropped() {
    use http_body_util::BodyExt;
    let layer = RatelimitLayer::builder()
        .concurrency_limit(ConcurrencyLimit::new(1, MINUTE).unwrap())
        .identifier(tower_llm_ratelimit::identifier::Header::new("x-user-id"))
        .build_http()
        .unwrap();
    let svc = tower::Layer::layer(
        &layer,
        service_fn(|_: http::Request<_>| async {
            let body = http_body_util::StreamBody::new(tokio_stream::iter(
                ["data: a\n\n", "data: b\n\n"]
                    .map(|s| Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from(s)))),
            ));
            Ok::<_, BoxError>(http::Response::new(body))
        }),
    );
    let request = || {
        http::Request::builder()
            .header("x-user-id", "eve")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let first = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(first.status(), 200);
    // The first body is still open: its slot is held.
    let second = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(second.status(), 429);
    assert!(
        String::from_utf8_lossy(&second.into_body().collect().await.unwrap().to_bytes())
            .contains("Concurrency limit reached")
    );
    // Read to the end: released.
    first.into_body().collect().await.unwrap();
    let third = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(third.status(), 200);
    // Dropped mid-stream: released too.
    drop(third);
    assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_settlement_id_is_applied_once() {
    use tower_llm_ratelimit::store::Adjustment;
    let store = RedisStore::connect(&common::redis_url()).await.unwrap();
    let rl = Ratelimit::new(
        FixedWindow::new(100, MINUTE).unwrap(),
        store.clone(),
        &common::unique_prefix("dedupe"),
    )
    .unwrap();
    let charge = |id| {
        let adjustment = Adjustment {
            key: rl.key("fay").unwrap().into(),
            rule: (*rl.algorithm()).into(),
            delta: 7,
            slot: 0,
            window: None,
        };
        store.adjust(&[adjustment], id)
    };
    // A retry of the same settlement (as after a timeout) lands once…
    charge(Some(42)).await.unwrap();
    charge(Some(42)).await.unwrap();
    assert_eq!(rl.remaining("fay").await.unwrap(), 93);
    // …while distinct settlements, or writes without an id, all land.
    charge(Some(43)).await.unwrap();
    charge(None).await.unwrap();
    charge(None).await.unwrap();
    assert_eq!(rl.remaining("fay").await.unwrap(), 72);
    // The dedupe key expires like every other key.
    let keys = common::redis_keys(&common::redis_url(), rl.prefix());
    assert!(keys.iter().all(|(_, ttl)| *ttl > 0), "{keys:?}");
}

/// A memory store whose operations can be made to fail at once with a ready error
/// (acquires and deletes, or adjusts), or to never answer.
#[derive(Clone, Default)]
struct Flaky {
    inner: MemoryStore,
    acquire_fails: Arc<AtomicBool>,
    adjust_fails: Arc<AtomicBool>,
    hang: Arc<AtomicBool>,
}

impl Flaky {
    fn failing() -> Self {
        let store = Self::default();
        store.acquire_fails.store(true, Ordering::SeqCst);
        store.adjust_fails.store(true, Ordering::SeqCst);
        store
    }

    /// Call `svc` with `request` and drop the call before it is polled, while this store
    /// fails writes (and goes on failing them): the undo of what the call took when it
    /// was called fails, and is queued for retry.
    async fn drop_unpolled_while_writes_fail<S>(&self, svc: &mut S, request: LlmRequest)
    where
        S: Service<LlmRequest>,
        S::Error: std::fmt::Debug,
    {
        let unpolled = svc.ready().await.unwrap().call(request);
        self.adjust_fails.store(true, Ordering::SeqCst);
        drop(unpolled);
    }

    fn answer<T: Send + 'static>(
        &self,
        fails: &AtomicBool,
        answer: impl FnOnce() -> StoreFuture<T>,
    ) -> StoreFuture<T> {
        if self.hang.load(Ordering::SeqCst) {
            StoreFuture::new(std::future::pending())
        } else if fails.load(Ordering::SeqCst) {
            StoreFuture::ready(Err(StoreError::new("down")))
        } else {
            answer()
        }
    }
}

impl Store for Flaky {
    fn acquire(&self, checks: &[LimitCheck]) -> StoreFuture<Vec<Decision>> {
        self.answer(&self.acquire_fails, || self.inner.acquire(checks))
    }

    fn adjust(&self, adjustments: &[Adjustment], id: Option<u64>) -> StoreFuture<Vec<Decision>> {
        self.answer(&self.adjust_fails, || self.inner.adjust(adjustments, id))
    }

    fn delete(&self, keys: Vec<String>) -> StoreFuture<()> {
        self.answer(&self.acquire_fails, || self.inner.delete(keys))
    }

    fn delete_identifier(&self, prefixes: Vec<String>, tag: String) -> StoreFuture<()> {
        self.answer(&self.acquire_fails, || {
            self.inner.delete_identifier(prefixes, tag)
        })
    }
}

/// A store failing with a ready answer goes to the failure policy like one that times
/// out; and while the breaker is open, a call decided by the in-process fallback at once
/// and dropped before it was polled gives its units back to that fallback store.
#[tokio::test]
async fn a_call_decided_by_the_fallback_and_dropped_unpolled_takes_nothing() {
    let layer = RatelimitLayer::builder()
        .store(Flaky::failing())
        .prefix(common::unique_prefix("readyfail"))
        .request_limit(FixedWindow::new(2, MINUTE).unwrap())
        .on_store_error(StoreErrorPolicy::Local)
        .build()
        .unwrap();
    let mut svc = tower::Layer::layer(&layer, mock_llm(Duration::ZERO, Usage::new(1, 1)));
    let request = || LlmRequest::new("ursula", "hi");
    // Trips the breaker; the fallback takes one of two.
    svc.ready().await.unwrap().call(request()).await.unwrap();
    // Decided by the fallback when called (the breaker is open), dropped unpolled.
    drop(svc.ready().await.unwrap().call(request()));
    let second = svc.ready().await.unwrap().call(request()).await;
    assert!(
        second.is_ok(),
        "the dropped call gave its request back: {second:?}"
    );
    let third = svc
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap_err();
    assert_eq!(third.kind(), ErrorKind::RequestLimitReached, "{third}");
}

/// A call dropped before it was polled gives back what the store took when it was
/// called, and the denial cached meanwhile (for the unit it held) goes with it.
#[tokio::test]
async fn a_call_dropped_unpolled_drops_the_denial_its_unit_caused() {
    let layer = RatelimitLayer::builder()
        .request_limit(FixedWindow::new(1, MINUTE).unwrap())
        .build()
        .unwrap();
    let mut svc = tower::Layer::layer(&layer, mock_llm(Duration::ZERO, Usage::new(1, 1)));
    let request = || LlmRequest::new("vic", "hi");
    let unpolled = svc.ready().await.unwrap().call(request());
    let denied = svc
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap_err();
    assert_eq!(denied.kind(), ErrorKind::RequestLimitReached);
    drop(unpolled);
    assert_eq!(layer.usage("vic").await.unwrap()[0].remaining, 1);
    let next = svc.ready().await.unwrap().call(request()).await;
    assert!(next.is_ok(), "refused from the cache: {next:?}");
}

/// An undo the store fails (a call dropped unpolled, its slot taken when it was called)
/// is queued and retried like a settlement: the slot comes back once the store does.
#[tokio::test]
async fn a_failed_undo_is_retried_until_it_lands() {
    let store = Flaky::default();
    let layer = RatelimitLayer::builder()
        .store(store.clone())
        .concurrency_limit(ConcurrencyLimit::new(1, MINUTE).unwrap())
        .build()
        .unwrap();
    let mut svc = tower::Layer::layer(&layer, mock_llm(Duration::ZERO, Usage::new(1, 1)));
    let request = || LlmRequest::new("wes", "hi");
    store
        .drop_unpolled_while_writes_fail(&mut svc, request())
        .await;
    store.adjust_fails.store(false, Ordering::SeqCst);
    assert_eq!(layer.flush(Duration::from_secs(5)).await, 0);
    // The breaker the failure tripped closes after its cool-down (1 s).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let next = svc.ready().await.unwrap().call(request()).await;
    assert!(
        next.is_ok(),
        "the dropped call's slot was never released: {next:?}"
    );
}

/// A reset clears the in-process fallback store too: in the next outage the identifier
/// starts afresh there, not from the counts of the last one.
#[tokio::test]
async fn a_reset_clears_the_fallback_store() {
    let store = Flaky::default();
    let layer = RatelimitLayer::builder()
        .store(store.clone())
        .request_limit(FixedWindow::new(2, MINUTE).unwrap())
        .on_store_error(StoreErrorPolicy::Local)
        .cache_denials(false)
        .build()
        .unwrap();
    let svc = tower::Layer::layer(&layer, mock_llm(Duration::ZERO, Usage::new(1, 1)));
    let request = || LlmRequest::new("xan", "hi");
    store.acquire_fails.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        svc.clone().oneshot(request()).await.unwrap();
    }
    store.acquire_fails.store(false, Ordering::SeqCst);
    layer.reset("xan").await.unwrap();
    store.acquire_fails.store(true, Ordering::SeqCst);
    let after = svc.clone().oneshot(request()).await;
    assert!(
        after.is_ok(),
        "refused by the fallback's counts from before the reset: {after:?}"
    );
}

/// A reset drops what its identifier's calls still have queued for a store that failed
/// their settlements (per-model limits too; with `reset_limit`, only that limit's part):
/// a charge from before the reset used to land after it, taking back the fresh budget.
/// Other identifiers' queued charges still land.
#[tokio::test]
async fn a_reset_drops_the_charges_queued_before_it() {
    let store = Flaky::default();
    let tokens =
        |limit| tower_llm_ratelimit::Limit::tokens(FixedWindow::new(limit, MINUTE).unwrap());
    let layer = RatelimitLayer::builder()
        .store(store.clone())
        .limit("tpm", tokens(1000))
        .limit("tpm-model", tokens(1000).per_model())
        .build()
        .unwrap();
    let svc = tower::Layer::layer(
        &layer,
        mock_llm(Duration::from_millis(50), Usage::new(300, 0)),
    );
    let call = |id: &str| {
        svc.clone()
            .oneshot(LlmRequest::new(id, "hi").with_model("m1"))
    };
    store.adjust_fails.store(true, Ordering::SeqCst);
    // At once, so that every acquire is in before the first failed settlement trips the
    // breaker.
    let (a, b, c) = tokio::join!(call("amy"), call("zed"), call("bo"));
    for call in [a, b, c] {
        call.unwrap();
    }
    assert_eq!(layer.pending_settlements(), 3);
    layer.reset("zed").await.unwrap();
    assert_eq!(layer.pending_settlements(), 2);
    layer.reset_limit("bo", "tpm").await.unwrap();
    assert_eq!(
        layer.pending_settlements(),
        2,
        "bo's per-model charge stays queued"
    );
    store.adjust_fails.store(false, Ordering::SeqCst);
    assert_eq!(layer.flush(Duration::from_secs(5)).await, 0);
    let left = |id: &'static str| {
        let layer = layer.clone();
        async move {
            let usage = layer.usage_for_model(id, "m1").await.unwrap();
            (usage[0].remaining, usage[1].remaining)
        }
    };
    assert_eq!(
        left("zed").await,
        (1000, 1000),
        "a charge from before the reset landed"
    );
    assert_eq!(left("bo").await, (1000, 700));
    assert_eq!(left("amy").await, (700, 700));
}

/// `usage` and `reset` wait for the store no longer than calls do (`store_timeout`).
#[tokio::test]
async fn usage_and_reset_are_bounded_by_the_store_timeout() {
    let store = Flaky::default();
    store.hang.store(true, Ordering::SeqCst);
    let layer = RatelimitLayer::builder()
        .store(store)
        .request_limit(FixedWindow::new(2, MINUTE).unwrap())
        .store_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let bound = Duration::from_secs(3);
    let usage = tokio::time::timeout(bound, layer.usage("yul")).await;
    assert!(matches!(usage, Ok(Err(_))), "usage: {usage:?}");
    let reset = tokio::time::timeout(bound, layer.reset("yul")).await;
    assert!(matches!(reset, Ok(Err(_))), "reset: {reset:?}");
}

/// A write that lands through the retry queue does what one that lands at once does: a
/// released slot wakes the call waiting for it (not its bound, 5 s), and returned units
/// drop the identifier's cached denials.
#[tokio::test]
async fn a_write_that_lands_from_the_queue_wakes_waiters_and_drops_cached_denials() {
    let store = Flaky::default();
    let layer = RatelimitLayer::builder()
        .store(store.clone())
        .concurrency_limit(ConcurrencyLimit::new(1, Duration::from_secs(30)).unwrap())
        .wait_up_to(Duration::from_secs(5))
        .build()
        .unwrap();
    let svc = tower::Layer::layer(
        &layer,
        mock_llm(Duration::from_millis(50), Usage::new(1, 1)),
    );
    let started = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(LlmRequest::new("zed", "a")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiting = tokio::spawn(svc.clone().oneshot(LlmRequest::new("zed", "b")));
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The first call's release fails when it ends (at 50 ms) and is queued.
    store.adjust_fails.store(true, Ordering::SeqCst);
    first.await.unwrap().unwrap();
    // The failure opened the breaker for 1 s (the waiting call would fail to try before
    // it closes); then the queued release lands.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    store.adjust_fails.store(false, Ordering::SeqCst);
    assert_eq!(layer.flush(Duration::from_secs(2)).await, 0);
    waiting.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the waiting call passed after {:?}",
        started.elapsed()
    );

    // A denial cached while an undo waited in the queue goes when the undo lands.
    let store = Flaky::default();
    let layer = RatelimitLayer::builder()
        .store(store.clone())
        .request_limit(FixedWindow::new(1, MINUTE).unwrap())
        .build()
        .unwrap();
    let mut svc = tower::Layer::layer(&layer, mock_llm(Duration::ZERO, Usage::new(1, 1)));
    let request = || LlmRequest::new("zoe", "hi");
    store
        .drop_unpolled_while_writes_fail(&mut svc, request())
        .await;
    // The breaker the failed undo tripped closes after 1 s; then the store denies, and
    // the denial is cached.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let denied = svc
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap_err();
    assert_eq!(denied.kind(), ErrorKind::RequestLimitReached);
    store.adjust_fails.store(false, Ordering::SeqCst);
    assert_eq!(layer.flush(Duration::from_secs(2)).await, 0);
    let next = svc.ready().await.unwrap().call(request()).await;
    assert!(
        next.is_ok(),
        "refused from the cache after the undo landed: {next:?}"
    );
}

/// A store whose future panics does not stop the retry queue: the next queued write
/// starts another worker, and every charge lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_store_future_does_not_stop_the_retry_queue() {
    #[derive(Clone, Default)]
    struct Panicky {
        inner: Flaky,
        adjusts: Arc<AtomicUsize>,
    }
    impl Store for Panicky {
        fn acquire(&self, checks: &[LimitCheck]) -> StoreFuture<Vec<Decision>> {
            self.inner.acquire(checks)
        }
        fn adjust(&self, a: &[Adjustment], id: Option<u64>) -> StoreFuture<Vec<Decision>> {
            // The second adjust (the queue's first retry) panics.
            if self.adjusts.fetch_add(1, Ordering::SeqCst) == 1 {
                return StoreFuture::new(async { panic!("a store future that panics") });
            }
            self.inner.adjust(a, id)
        }
        fn delete(&self, keys: Vec<String>) -> StoreFuture<()> {
            self.inner.delete(keys)
        }
    }
    let store = Panicky::default();
    let layer = RatelimitLayer::builder()
        .store(store.clone())
        .token_limit(FixedWindow::new(1000, MINUTE).unwrap())
        .build()
        .unwrap();
    let svc = tower::Layer::layer(&layer, mock_llm(Duration::ZERO, Usage::new(100, 0)));
    store.inner.adjust_fails.store(true, Ordering::SeqCst);
    svc.clone()
        .oneshot(LlmRequest::new("pam", "x"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    svc.clone()
        .oneshot(LlmRequest::new("pam", "x"))
        .await
        .unwrap();
    store.inner.adjust_fails.store(false, Ordering::SeqCst);
    assert_eq!(layer.flush(Duration::from_secs(5)).await, 0);
    let used = 1000 - layer.usage("pam").await.unwrap()[0].remaining;
    assert_eq!(used, 200, "both calls charged");
}
