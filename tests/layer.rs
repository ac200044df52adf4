//! The middleware end to end over `Service<LlmRequest>`, on both stores.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_llm_ratelimit::{
    Error, ErrorKind, FixedWindow, LlmRequest, LlmResponse, MemoryStore, MissingUsage, Ratelimit,
    RatelimitLayer, RedisStore, SlidingWindow, Store, TokenBucket, TokenMode, Usage,
    identifier::FromFn,
};

/// Fixed windows are aligned to multiples of their length since the epoch: with the
/// longest window allowed (10 years), no test run straddles a boundary.
const MINUTE: Duration = tower_llm_ratelimit::algorithm::MAX_WINDOW;

/// Both stores, each with a fresh key prefix for this test.
async fn stores(name: &str) -> Vec<(Arc<dyn Store>, String)> {
    let redis = RedisStore::connect(&common::redis_url()).await.unwrap();
    vec![
        (
            Arc::new(MemoryStore::new()) as Arc<dyn Store>,
            common::unique_prefix(name),
        ),
        (
            Arc::new(redis) as Arc<dyn Store>,
            common::unique_prefix(name),
        ),
    ]
}

/// A mock LLM that counts its calls, waits `delay`, then answers with `usage`.
fn mock_llm(
    calls: Arc<AtomicUsize>,
    usage: Option<Usage>,
    delay: Duration,
) -> impl Service<LlmRequest, Response = LlmResponse, Error = BoxError, Future: Send> + Clone + Send
{
    service_fn(move |req: LlmRequest| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, BoxError>(LlmResponse {
                text: format!("answer to {}", req.prompt),
                usage,
            })
        }
    })
}

fn reader(
    store: &Arc<dyn Store>,
    prefix: &str,
    what: &str,
    alg: impl Into<tower_llm_ratelimit::Algorithm>,
) -> Ratelimit {
    Ratelimit::with_shared_store(alg, store.clone(), &format!("{prefix}:{what}")).unwrap()
}

#[tokio::test]
async fn twelve_calls_under_ten_per_minute() {
    for (store, prefix) in stores("twelve").await {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RatelimitLayer::builder()
            .shared_store(store.clone())
            .prefix(&prefix)
            .request_limit(FixedWindow::new(10, MINUTE).unwrap())
            .build()
            .unwrap();
        let mut svc = ServiceBuilder::new().layer(layer).service(mock_llm(
            calls.clone(),
            Some(Usage::new(5, 5)),
            Duration::ZERO,
        ));
        let mut ok = 0;
        let mut denied = Vec::new();
        for i in 0..12 {
            match svc
                .ready()
                .await
                .unwrap()
                .call(LlmRequest::new("alice", format!("q{i}")))
                .await
            {
                Ok(_) => ok += 1,
                Err(e) => denied.push(e),
            }
        }
        assert_eq!(ok, 10);
        assert_eq!(denied.len(), 2);
        for e in &denied {
            assert_eq!(e.kind(), ErrorKind::RequestLimitReached);
            assert!(e.to_string().contains("Request limit reached"), "{e}");
            let l = e.limit_exceeded().unwrap();
            assert_eq!((l.limit, l.remaining), (10, 0));
            assert!(l.retry_after.unwrap() <= MINUTE);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            10,
            "denied calls must not reach the LLM"
        );
        // Another user has their own budget.
        assert!(
            svc.ready()
                .await
                .unwrap()
                .call(LlmRequest::new("bob", "hi"))
                .await
                .is_ok()
        );
    }
}

#[tokio::test]
async fn a_denied_call_consumes_nothing_from_any_limit() {
    for (store, prefix) in stores("denied-nothing").await {
        let requests = FixedWindow::new(10, MINUTE).unwrap();
        let tokens = SlidingWindow::new(100, MINUTE).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RatelimitLayer::builder()
            .shared_store(store.clone())
            .prefix(&prefix)
            .request_limit(requests)
            .token_limit(tokens)
            .token_mode(TokenMode::Reserve)
            // Reservations then include the output the call may generate.
            .include_output_tokens(true)
            // A key per limit, as earlier releases kept them: the test reads and spends
            // each limit through a `Ratelimit` on its key.
            .group_states(false)
            .build()
            .unwrap();
        let mut svc = layer.layer_service(mock_llm(
            calls.clone(),
            Some(Usage::new(10, 0)),
            Duration::ZERO,
        ));
        // The token limit denies an estimate of 150 > 100: the request limit keeps its 10.
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(LlmRequest::new("alice", "").with_max_tokens(150))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TokenLimitReached);
        assert!(err.to_string().contains("Token limit reached"), "{err}");
        assert_eq!(err.retry_after(), None, "150 > 100 can never pass");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        let req_reader = reader(&store, &prefix, "requests", requests);
        let tok_reader = reader(&store, &prefix, "tokens", tokens);
        assert_eq!(req_reader.remaining("alice").await.unwrap(), 10);
        assert_eq!(tok_reader.remaining("alice").await.unwrap(), 100);

        // Spend the request budget; a request denial then takes no tokens either.
        req_reader.charge("alice", 10).await.unwrap();
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(LlmRequest::new("alice", "").with_max_tokens(50))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RequestLimitReached);
        assert_eq!(tok_reader.remaining("alice").await.unwrap(), 100);
    }
}

/// `layer.layer(svc)` without importing `Layer` everywhere.
trait LayerService<S> {
    type Out;
    fn layer_service(&self, s: S) -> Self::Out;
}
impl<S, L: tower::Layer<S>> LayerService<S> for L {
    type Out = L::Service;
    fn layer_service(&self, s: S) -> L::Service {
        self.layer(s)
    }
}

#[tokio::test]
async fn token_charges_equal_reported_usage() {
    for (store, prefix) in stores("charges").await {
        for include_output in [false, true] {
            let prefix = format!("{prefix}-{include_output}");
            let tokens = FixedWindow::new(1000, MINUTE).unwrap();
            let layer = RatelimitLayer::builder()
                .shared_store(store.clone())
                .prefix(&prefix)
                .token_limit(tokens)
                .include_output_tokens(include_output)
                .build()
                .unwrap();
            let calls = Arc::new(AtomicUsize::new(0));
            let svc =
                layer.layer_service(mock_llm(calls, Some(Usage::new(30, 70)), Duration::ZERO));
            for _ in 0..3 {
                svc.clone()
                    .oneshot(LlmRequest::new("alice", "hello"))
                    .await
                    .unwrap();
            }
            let per_call = if include_output { 100 } else { 30 };
            let remaining = reader(&store, &prefix, "tokens", tokens)
                .remaining("alice")
                .await
                .unwrap();
            assert_eq!(
                remaining,
                1000 - 3 * per_call,
                "include_output_tokens={include_output}"
            );
        }
    }
}

#[tokio::test]
async fn cost_fn_decides_the_charge() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let tokens = TokenBucket::new(1000, 10, Duration::from_secs(1)).unwrap();
    let layer = RatelimitLayer::builder()
        .shared_store(store.clone())
        .token_limit(tokens)
        .cost_fn(|u: &Usage| u.prompt_tokens + 4 * u.completion_tokens)
        .build()
        .unwrap();
    let svc = layer.layer_service(mock_llm(
        Default::default(),
        Some(Usage::new(10, 20)),
        Duration::ZERO,
    ));
    svc.oneshot(LlmRequest::new("alice", "x")).await.unwrap();
    let r = reader(&store, "llm-ratelimit", "tokens", tokens);
    assert_eq!(r.remaining("alice").await.unwrap(), 1000 - 90);
}

#[tokio::test]
async fn reserve_caps_fifty_concurrent_calls() {
    for (store, prefix) in stores("reserve").await {
        let tokens = FixedWindow::new(1000, MINUTE).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RatelimitLayer::builder()
            .shared_store(store.clone())
            .prefix(&prefix)
            .token_limit(tokens)
            .token_mode(TokenMode::Reserve)
            .include_output_tokens(true)
            .build()
            .unwrap();
        // Estimate: empty prompt + max_tokens 100 = 100; usage reported: 40 + 60 = 100.
        let svc = layer.layer_service(mock_llm(
            calls.clone(),
            Some(Usage::new(40, 60)),
            Duration::from_millis(50),
        ));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(svc.oneshot(LlmRequest::new("alice", "").with_max_tokens(100)))
            })
            .collect();
        let mut passed = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => passed += 1,
                Err(e) => assert_eq!(e.kind(), ErrorKind::TokenLimitReached),
            }
        }
        let remaining = reader(&store, &prefix, "tokens", tokens)
            .remaining("alice")
            .await
            .unwrap();
        let charged = 1000 - remaining;
        assert!(charged <= 1000);
        assert_eq!(
            charged,
            100 * passed as u64,
            "charges equal the usage of the calls that passed"
        );
        assert!(passed >= 9, "only {passed} passed");
        assert_eq!(calls.load(Ordering::SeqCst), passed);
    }
}

#[tokio::test]
async fn check_remaining_overshoot_is_bounded_by_calls_in_flight() {
    for (store, prefix) in stores("overshoot").await {
        let tokens = SlidingWindow::new(1000, MINUTE).unwrap();
        let layer = RatelimitLayer::builder()
            .shared_store(store.clone())
            .prefix(&prefix)
            .token_limit(tokens)
            .include_output_tokens(true)
            .build()
            .unwrap();
        let svc = layer.layer_service(mock_llm(
            Default::default(),
            Some(Usage::new(40, 60)),
            Duration::from_millis(50),
        ));
        let in_flight = 50u64;
        let largest_call = 100u64;
        let tasks: Vec<_> = (0..in_flight)
            .map(|_| tokio::spawn(svc.clone().oneshot(LlmRequest::new("alice", "hi"))))
            .collect();
        let mut passed = 0u64;
        for t in tasks {
            if t.await.unwrap().is_ok() {
                passed += 1;
            }
        }
        // The seed's rule lets every call that saw tokens left through; the debt is recorded.
        let r = reader(&store, &prefix, "tokens", tokens);
        let charged = passed * largest_call;
        assert!(charged - 1000.min(charged) <= in_flight * largest_call);
        assert_eq!(r.remaining("alice").await.unwrap(), 0);
        // The debt blocks the next call.
        let err = svc
            .clone()
            .oneshot(LlmRequest::new("alice", "hi"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TokenLimitReached);
        let d = r.charge("alice", 0).await.unwrap();
        assert!(!d.allowed, "the overshoot must be recorded as debt");
    }
}

#[tokio::test]
async fn a_response_without_usage_is_delivered_and_the_reservation_kept() {
    for (store, prefix) in stores("no-usage").await {
        let tokens = FixedWindow::new(1000, MINUTE).unwrap();
        for (policy, expected) in [
            (MissingUsage::ChargeReservation, 900),
            (MissingUsage::ChargeNothing, 1000),
            (MissingUsage::ChargeFixed(250), 750),
        ] {
            let prefix = format!("{prefix}-{}", expected);
            let layer = RatelimitLayer::builder()
                .shared_store(store.clone())
                .prefix(&prefix)
                .token_limit(tokens)
                .token_mode(TokenMode::Reserve)
                .include_output_tokens(true)
                .missing_usage(policy)
                .build()
                .unwrap();
            let svc = layer.layer_service(mock_llm(Default::default(), None, Duration::ZERO));
            let response = svc
                .oneshot(LlmRequest::new("alice", "").with_max_tokens(100))
                .await
                .expect("a response without usage is still delivered");
            assert_eq!(response.text, "answer to ");
            let remaining = reader(&store, &prefix, "tokens", tokens)
                .remaining("alice")
                .await
                .unwrap();
            assert_eq!(remaining, expected, "{policy:?}");
        }
    }
}

#[tokio::test]
async fn a_dropped_future_refunds_its_reservation() {
    for (store, prefix) in stores("dropped").await {
        let requests = FixedWindow::new(10, MINUTE).unwrap();
        let tokens = FixedWindow::new(1000, MINUTE).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RatelimitLayer::builder()
            .shared_store(store.clone())
            .prefix(&prefix)
            .request_limit(requests)
            .token_limit(tokens)
            .token_mode(TokenMode::Reserve)
            .build()
            .unwrap();
        let svc = layer.layer_service(mock_llm(
            calls.clone(),
            Some(Usage::new(10, 10)),
            Duration::from_secs(30),
        ));
        let call = svc.oneshot(LlmRequest::new("alice", "").with_max_tokens(300));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), call)
                .await
                .is_err()
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the call was in flight when dropped"
        );
        let remaining = |name: &'static str| {
            let layer = layer.clone();
            async move {
                let usage = layer.usage("alice").await.unwrap();
                usage.iter().find(|u| u.name == name).unwrap().remaining
            }
        };
        let mut left = 0;
        for _ in 0..100 {
            left = remaining("tokens").await;
            if left == 1000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(left, 1000, "the reservation was not refunded");
        assert_eq!(remaining("requests").await, 9, "the request stays counted");
    }
}

#[tokio::test]
async fn an_inner_error_refunds_the_reservation() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let tokens = FixedWindow::new(1000, MINUTE).unwrap();
    let layer = RatelimitLayer::builder()
        .shared_store(store.clone())
        .token_limit(tokens)
        .token_mode(TokenMode::Reserve)
        .build()
        .unwrap();
    let failing =
        service_fn(|_: LlmRequest| async { Err::<LlmResponse, BoxError>("upstream 500".into()) });
    let err = layer
        .layer_service(failing)
        .oneshot(LlmRequest::new("alice", "").with_max_tokens(400))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inner);
    // The inner error is the source, not repeated in the message.
    assert_eq!(
        std::error::Error::source(&err).unwrap().to_string(),
        "upstream 500"
    );
    assert!(!err.to_string().contains("upstream 500"), "{err}");
    assert_eq!(
        reader(&store, "llm-ratelimit", "tokens", tokens)
            .remaining("alice")
            .await
            .unwrap(),
        1000
    );
}

#[tokio::test]
async fn missing_identifier_fails_or_uses_the_fallback() {
    let layer = RatelimitLayer::builder()
        .request_limit(FixedWindow::new(1, MINUTE).unwrap())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer_service(mock_llm(calls.clone(), None, Duration::ZERO));
    let anonymous = LlmRequest {
        prompt: "hi".into(),
        ..Default::default()
    };
    let err = svc.clone().oneshot(anonymous.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingIdentifier);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let layer = RatelimitLayer::builder()
        .request_limit(FixedWindow::new(1, MINUTE).unwrap())
        .fallback_identifier("anonymous")
        .build()
        .unwrap();
    let svc = layer.layer_service(mock_llm(calls.clone(), None, Duration::ZERO));
    assert!(svc.clone().oneshot(anonymous.clone()).await.is_ok());
    let err = svc.oneshot(anonymous).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::RequestLimitReached,
        "all anonymous calls share one budget"
    );
}

#[tokio::test]
async fn closure_extractor_and_bad_identifiers() {
    let layer = RatelimitLayer::builder()
        .request_limit(FixedWindow::new(2, MINUTE).unwrap())
        .identifier(FromFn::new(|r: &LlmRequest| r.model.clone()))
        .build()
        .unwrap();
    let svc = layer.layer_service(mock_llm(Default::default(), None, Duration::ZERO));
    let req = |model: &str| LlmRequest {
        model: Some(model.into()),
        ..Default::default()
    };
    assert!(svc.clone().oneshot(req("gpt")).await.is_ok());
    assert!(svc.clone().oneshot(req("gpt")).await.is_ok());
    assert!(svc.clone().oneshot(req("gpt")).await.is_err());
    assert!(svc.clone().oneshot(req("claude")).await.is_ok());
    // An empty identifier is a clear error, not a panic or a shared key.
    let err = svc.oneshot(req("")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn absurd_usage_is_clamped_not_a_panic() {
    let store = MemoryStore::new();
    let tokens = TokenBucket::new(1000, 1000, MINUTE).unwrap();
    let layer = RatelimitLayer::builder()
        .store(store.clone())
        .token_limit(tokens)
        .include_output_tokens(true)
        .build()
        .unwrap();
    let huge = Usage::new(u64::MAX, u64::MAX);
    let svc = layer.layer_service(mock_llm(Default::default(), Some(huge), Duration::ZERO));
    assert!(
        svc.clone()
            .oneshot(LlmRequest::new("alice", "x"))
            .await
            .is_ok()
    );
    let err = svc
        .oneshot(LlmRequest::new("alice", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TokenLimitReached);
    let entries = store.entries();
    assert_eq!(entries.len(), 1);
    assert!(
        !entries[0].1.is_zero(),
        "the debt's key still has a finite TTL"
    );
}

#[tokio::test]
async fn builder_rejects_bad_configuration() {
    assert!(RatelimitLayer::builder().build().is_err(), "no limit");
    let fw = FixedWindow::new(1, MINUTE).unwrap();
    assert!(
        RatelimitLayer::builder()
            .request_limit(fw)
            .prefix("")
            .build()
            .is_err()
    );
    assert!(
        RatelimitLayer::builder()
            .request_limit(fw)
            .prefix("a{b}")
            .build()
            .is_err()
    );
    assert!(
        RatelimitLayer::builder()
            .request_limit(fw)
            .fallback_identifier("")
            .build()
            .is_err()
    );
    assert!(
        RatelimitLayer::builder()
            .request_limit(fw)
            .default_estimate(u64::MAX)
            .build()
            .is_err()
    );
}

/// Retry policy: retry up to `attempts` times on any error except rate-limit denials.
#[derive(Clone)]
struct RetryErrors {
    attempts: usize,
}

impl tower::retry::Policy<LlmRequest, LlmResponse, Error> for RetryErrors {
    type Future = std::future::Ready<()>;
    fn retry(
        &mut self,
        _: &mut LlmRequest,
        result: &mut Result<LlmResponse, Error>,
    ) -> Option<Self::Future> {
        match result {
            Err(e) if e.kind() == ErrorKind::Inner && self.attempts > 0 => {
                self.attempts -= 1;
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }
    fn clone_request(&mut self, req: &LlmRequest) -> Option<LlmRequest> {
        Some(req.clone())
    }
}

impl tower::retry::Policy<LlmRequest, LlmResponse, BoxError> for RetryErrors {
    type Future = std::future::Ready<()>;
    fn retry(
        &mut self,
        _: &mut LlmRequest,
        result: &mut Result<LlmResponse, BoxError>,
    ) -> Option<Self::Future> {
        match result {
            Err(_) if self.attempts > 0 => {
                self.attempts -= 1;
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }
    fn clone_request(&mut self, req: &LlmRequest) -> Option<LlmRequest> {
        Some(req.clone())
    }
}

/// Fails the first two attempts of every call, then answers.
fn flaky_llm(
    attempts: Arc<AtomicUsize>,
) -> impl Service<LlmRequest, Response = LlmResponse, Error = BoxError, Future: Send> + Clone + Send
{
    service_fn(move |_: LlmRequest| {
        let n = attempts.fetch_add(1, Ordering::SeqCst);
        async move {
            if n % 3 < 2 {
                Err::<LlmResponse, BoxError>("transient".into())
            } else {
                Ok(LlmResponse {
                    text: "ok".into(),
                    usage: Some(Usage::new(10, 0)),
                })
            }
        }
    })
}

#[tokio::test]
async fn outside_retries_one_request_per_call_inside_one_per_attempt() {
    let requests = FixedWindow::new(100, MINUTE).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let layer = |prefix: &str| {
        RatelimitLayer::builder()
            .shared_store(store.clone())
            .prefix(prefix)
            .request_limit(requests)
            .build()
            .unwrap()
    };

    // Rate limit outside the retries: one logical call counts one request.
    let attempts = Arc::new(AtomicUsize::new(0));
    let outside = ServiceBuilder::new()
        .layer(layer("outside"))
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)))
        .layer(tower::retry::RetryLayer::new(RetryErrors { attempts: 3 }))
        .service(flaky_llm(attempts.clone()));
    let response = outside
        .oneshot(LlmRequest::new("alice", "q"))
        .await
        .unwrap();
    assert_eq!(response.text, "ok");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(
        reader(&store, "outside", "requests", requests)
            .remaining("alice")
            .await
            .unwrap(),
        99
    );

    // Rate limit inside the retries: every attempt counts.
    let attempts = Arc::new(AtomicUsize::new(0));
    let inside = ServiceBuilder::new()
        .layer(tower::retry::RetryLayer::new(RetryErrors { attempts: 3 }))
        .layer(layer("inside"))
        .service(flaky_llm(attempts.clone()));
    let response = inside.oneshot(LlmRequest::new("alice", "q")).await.unwrap();
    assert_eq!(response.text, "ok");
    assert_eq!(
        reader(&store, "inside", "requests", requests)
            .remaining("alice")
            .await
            .unwrap(),
        97
    );
}

#[tokio::test]
async fn a_timeout_outside_refunds_the_reservation() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let tokens = FixedWindow::new(1000, MINUTE).unwrap();
    let layer = RatelimitLayer::builder()
        .shared_store(store.clone())
        .token_limit(tokens)
        .token_mode(TokenMode::Reserve)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(20)))
        .layer(layer)
        .service(mock_llm(
            Default::default(),
            Some(Usage::new(1, 1)),
            Duration::from_secs(10),
        ));
    let err = svc
        .oneshot(LlmRequest::new("alice", "").with_max_tokens(500))
        .await
        .unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>());
    assert_eq!(
        reader(&store, "llm-ratelimit", "tokens", tokens)
            .remaining("alice")
            .await
            .unwrap(),
        1000
    );
}

#[tokio::test]
async fn block_until_ready_waits_for_the_window() {
    for (store, prefix) in stores("block").await {
        let rl = Ratelimit::with_shared_store(
            FixedWindow::new(2, Duration::from_millis(300)).unwrap(),
            store,
            &prefix,
        )
        .unwrap();
        // Start just after a window boundary, so the first two checks share a window.
        common::align_to_window(Duration::from_millis(300)).await;
        assert!(rl.limit("alice", 2).await.unwrap().allowed);
        // Too short a timeout: denied without waiting it out.
        let d = rl
            .block_until_ready("alice", 1, Duration::from_millis(1))
            .await
            .unwrap();
        assert!(!d.allowed);
        let d = rl
            .block_until_ready("alice", 1, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(d.allowed);
        // A cost that can never pass returns at once.
        assert!(
            !rl.block_until_ready("alice", 3, Duration::from_secs(10))
                .await
                .unwrap()
                .allowed
        );
    }
}

/// A memory store that counts the acquires that reach it.
#[derive(Clone)]
struct CountingStore {
    inner: MemoryStore,
    acquires: Arc<AtomicUsize>,
}

impl Store for CountingStore {
    fn acquire(
        &self,
        checks: &[tower_llm_ratelimit::store::LimitCheck],
    ) -> tower_llm_ratelimit::store::StoreFuture<Vec<tower_llm_ratelimit::Decision>> {
        self.acquires.fetch_add(1, Ordering::SeqCst);
        self.inner.acquire(checks)
    }
    fn adjust(
        &self,
        a: &[tower_llm_ratelimit::store::Adjustment],
        id: Option<u64>,
    ) -> tower_llm_ratelimit::store::StoreFuture<Vec<tower_llm_ratelimit::Decision>> {
        self.inner.adjust(a, id)
    }
    fn delete(&self, keys: Vec<String>) -> tower_llm_ratelimit::store::StoreFuture<()> {
        self.inner.delete(keys)
    }
}

#[tokio::test]
async fn denied_identifiers_are_not_asked_about_again_until_their_reset() {
    for cache in [true, false] {
        let store = CountingStore {
            inner: MemoryStore::new(),
            acquires: Arc::default(),
        };
        let layer = RatelimitLayer::builder()
            .store(store.clone())
            .request_limit(FixedWindow::new(2, Duration::from_millis(400)).unwrap())
            .cache_denials(cache)
            .build()
            .unwrap();
        let svc = layer.layer_service(mock_llm(Default::default(), None, Duration::ZERO));
        // Start just after a window boundary so the whole sequence fits in one window.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        tokio::time::sleep(Duration::from_millis(400 - now % 400 + 10)).await;
        let mut last_retry = Duration::MAX;
        for i in 0..12 {
            match svc.clone().oneshot(LlmRequest::new("ada", "x")).await {
                Ok(_) => assert!(i < 2),
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::RequestLimitReached);
                    let retry = e.retry_after().unwrap();
                    assert!(retry <= last_retry && !retry.is_zero());
                    last_retry = retry;
                }
            }
        }
        let expected = if cache { 3 } else { 12 };
        assert_eq!(
            store.acquires.load(Ordering::SeqCst),
            expected,
            "cache_denials({cache})"
        );
        // Once the window rolls, the identifier is asked about (and allowed) again.
        tokio::time::sleep(last_retry + Duration::from_millis(5)).await;
        assert!(
            svc.clone()
                .oneshot(LlmRequest::new("ada", "x"))
                .await
                .is_ok()
        );
    }
}

/// A response future dropped before it is first polled takes nothing, on both stores
/// (an in-process store answers at once, but that answer is only taken up on the poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_dropped_before_its_first_poll_takes_nothing() {
    for (store, prefix) in stores("unpolled").await {
        let layer = RatelimitLayer::builder()
            .shared_store(store)
            .prefix(prefix)
            .request_limit(FixedWindow::new(10, MINUTE).unwrap())
            .token_limit(FixedWindow::new(1000, MINUTE).unwrap())
            .build()
            .unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        let mut svc = tower::Layer::layer(
            &layer,
            service_fn(move |_: LlmRequest| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, BoxError>(LlmResponse::default())
                }
            }),
        );
        for _ in 0..10 {
            svc.ready().await.unwrap();
            drop(svc.call(LlmRequest::new("unpolled", "hello world prompt")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let usage = layer.usage("unpolled").await.unwrap();
        for limit in &usage {
            assert_eq!(limit.remaining, limit.limit, "{}: {usage:?}", limit.name);
        }
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        svc.oneshot(LlmRequest::new("unpolled", "x")).await.unwrap();
    }
}

/// A call whose future was made outside any runtime (then spawned on one) still keeps
/// its concurrency slot leased for as long as it runs.
#[test]
fn a_call_made_outside_a_runtime_keeps_its_slot() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let layer = RatelimitLayer::builder()
        .store(MemoryStore::new())
        .concurrency_limit(
            tower_llm_ratelimit::ConcurrencyLimit::new(1, Duration::from_millis(100)).unwrap(),
        )
        .build()
        .unwrap();
    let slow = service_fn(|_: LlmRequest| async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        Ok::<_, BoxError>(LlmResponse::default())
    });
    let mut svc = tower::Layer::layer(&layer, slow);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let first = svc.call(LlmRequest::new("outside", "x"));
    rt.block_on(async move {
        let running = tokio::spawn(first);
        // Three leases later the first call still holds the only slot.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = svc.oneshot(LlmRequest::new("outside", "y")).await;
        assert_eq!(
            second.unwrap_err().kind(),
            ErrorKind::ConcurrencyLimitReached
        );
        running.await.unwrap().unwrap();
    });
}
