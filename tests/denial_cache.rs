//! The denial cache through the HTTP layer: a 429 answered from the cache reports every
//! limit as it is, not as it was when the store denied.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_llm_ratelimit::http::RequestBody;
use tower_llm_ratelimit::identifier::Fixed;
use tower_llm_ratelimit::{FixedWindow, Limit, RatelimitLayer, TokenBucket, TokenMode};

#[path = "common/late_replies.rs"]
mod late_replies;
use late_replies::LateReplies;

const LONG: Duration = tower_llm_ratelimit::algorithm::MAX_WINDOW;

/// An OpenAI-style upstream that answers after `delay`, reporting 100 prompt tokens.
fn upstream(
    delay: Duration,
) -> impl tower::Service<
    Request<RequestBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone {
    service_fn(move |_: Request<RequestBody<Full<Bytes>>>| async move {
        tokio::time::sleep(delay).await;
        let body = r#"{"id":"x","object":"chat.completion","model":"m","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":1,"total_tokens":101}}"#;
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
    })
}

fn chat() -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap()
}

fn header(r: &Response<impl Sized>, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no {name} header in {:?}", r.headers()))
}

/// A charge this process makes while a denial is cached (a call that was in flight
/// ends) shows in the next 429: it reported the tokens left before the charge.
#[tokio::test]
async fn a_cached_denial_reports_a_charge_made_since() {
    let layer = RatelimitLayer::builder()
        .limit("rpm", Limit::requests(FixedWindow::new(2, LONG).unwrap()))
        .limit("tpm", Limit::tokens(FixedWindow::new(1000, LONG).unwrap()))
        .identifier(Fixed::new("ada"))
        .build_http()
        .unwrap();
    let fast = layer.layer(upstream(Duration::ZERO));
    let slow = layer.layer(upstream(Duration::from_millis(300)));
    let in_flight = tokio::spawn(slow.oneshot(chat()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = fast.clone().oneshot(chat()).await.unwrap();
    second.into_body().collect().await.unwrap();
    for _ in 0..2 {
        let denied = fast.clone().oneshot(chat()).await.unwrap();
        assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    let ended = in_flight.await.unwrap().unwrap();
    ended.into_body().collect().await.unwrap();
    let left = layer.usage("ada").await.unwrap()[1].remaining;
    assert_eq!(left, 800, "both calls charged");
    let denied = fast.oneshot(chat()).await.unwrap();
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&denied, "x-ratelimit-remaining-tokens"), "800");
}

/// A cached denial is not used past the first time one of the call's limits restores
/// (its window rolls): the 429s after that report the new window, not a reset counted
/// down to 0.
#[tokio::test]
async fn a_cached_denial_ends_when_another_limits_window_rolls() {
    let layer = RatelimitLayer::builder()
        .limit(
            "rps",
            Limit::requests(TokenBucket::new(1, 1, Duration::from_millis(1500)).unwrap()),
        )
        .limit(
            "tpm",
            Limit::tokens(FixedWindow::new(1000, Duration::from_millis(400)).unwrap()),
        )
        .identifier(Fixed::new("bo"))
        .build_http()
        .unwrap();
    let svc = layer.layer(upstream(Duration::ZERO));
    let first = svc.clone().oneshot(chat()).await.unwrap();
    first.into_body().collect().await.unwrap();
    let mut denials = 0;
    for _ in 0..12 {
        let r = svc.clone().oneshot(chat()).await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            denials += 1;
            let reset = header(&r, "x-ratelimit-reset-tokens");
            assert_ne!(
                reset, "0ms",
                "a rolled token window reported as resetting now"
            );
            assert_ne!(header(&r, "retry-after"), "0");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(denials >= 8, "{denials} denials");
}

/// A denial decided before a charge of this process landed, but answered after it, is
/// not cached: the cache was dropped for the charge while the acquire was in flight.
/// (Cached, its 429s reported the tokens left before the charge; for a refund, it would
/// outlive budget given back through this process.)
#[tokio::test]
async fn a_denial_decided_before_a_charge_is_not_cached_after_it() {
    let layer = RatelimitLayer::builder()
        .store(LateReplies::new(Duration::from_millis(100), Duration::ZERO))
        .store_timeout(Duration::from_secs(5))
        .limit("rpm", Limit::requests(FixedWindow::new(2, LONG).unwrap()))
        .limit("tpm", Limit::tokens(FixedWindow::new(1000, LONG).unwrap()))
        .identifier(Fixed::new("cy"))
        .build_http()
        .unwrap();
    let fast = layer.layer(upstream(Duration::ZERO));
    let slow = layer.layer(upstream(Duration::from_millis(300)));
    let started = tokio::time::Instant::now();
    // Decided at 0 ms, answered at 100 ms, charged at about 400 ms.
    let in_flight = tokio::spawn(async move {
        let r = slow.oneshot(chat()).await.unwrap();
        r.into_body().collect().await.unwrap();
    });
    let quick = fast.clone().oneshot(chat()).await.unwrap();
    quick.into_body().collect().await.unwrap();
    // Denied at 350 ms, answered at 450 ms: across the charge.
    tokio::time::sleep_until(started + Duration::from_millis(350)).await;
    let denied = fast.clone().oneshot(chat()).await.unwrap();
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    in_flight.await.unwrap();
    let left = layer.usage("cy").await.unwrap()[1].remaining;
    assert_eq!(left, 800);
    for _ in 0..3 {
        let r = fast.clone().oneshot(chat()).await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "800");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A denial cached while a charge of this process was on its way to the store (sent,
/// not landed) is dropped when the charge lands: the 429s after that report the tokens
/// left after it, not the ones cached before it.
#[tokio::test]
async fn a_denial_cached_while_a_charge_was_on_its_way_is_dropped_when_it_lands() {
    let layer = RatelimitLayer::builder()
        .store(LateReplies::new(Duration::ZERO, Duration::from_millis(300)))
        .store_timeout(Duration::from_secs(5))
        .limit("rpm", Limit::requests(FixedWindow::new(1, LONG).unwrap()))
        .limit("tpm", Limit::tokens(FixedWindow::new(1000, LONG).unwrap()))
        .identifier(Fixed::new("dee"))
        // Tokens are only charged after the call (nothing reserved), when the charge lands.
        .token_mode(TokenMode::CheckRemaining)
        .build_http()
        .unwrap();
    let svc = layer.layer(upstream(Duration::ZERO));
    let first = svc.clone().oneshot(chat()).await.unwrap();
    // Its charge is sent when its body has been read, and lands 300 ms later (the body's
    // end waits for it).
    let reading = tokio::spawn(first.into_body().collect());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = svc.clone().oneshot(chat()).await.unwrap();
    assert_eq!(before.status(), StatusCode::TOO_MANY_REQUESTS);
    let cached_tokens = header(&before, "x-ratelimit-remaining-tokens");
    reading.await.unwrap().unwrap();
    let left = layer.usage("dee").await.unwrap()[1].remaining;
    assert_ne!(
        cached_tokens,
        left.to_string(),
        "the charge changed the tokens left"
    );
    let after = svc.oneshot(chat()).await.unwrap();
    assert_eq!(after.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&after, "x-ratelimit-remaining-tokens"),
        left.to_string()
    );
}

/// Calls of another model that take from a limit shared with a cached denial's model
/// show in that denial's next 429: it reported the requests left before them.
#[tokio::test]
async fn a_cached_denial_reports_a_shared_limit_as_other_models_use_it() {
    let layer = RatelimitLayer::builder()
        .limit("rpm", Limit::requests(FixedWindow::new(10, LONG).unwrap()))
        .limit(
            "gpt4-tpm",
            Limit::tokens(FixedWindow::new(100, LONG).unwrap()).models(["gpt-4*"]),
        )
        .identifier(Fixed::new("mo"))
        .build_http()
        .unwrap();
    let svc = layer.layer(upstream(Duration::ZERO));
    let chat_with = |model: &str| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#
            ))))
            .unwrap()
    };
    let first = svc.clone().oneshot(chat_with("gpt-4o")).await.unwrap();
    first.into_body().collect().await.unwrap();
    let denied = svc.clone().oneshot(chat_with("gpt-4o")).await.unwrap();
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    for _ in 0..3 {
        let r = svc
            .clone()
            .oneshot(chat_with("gpt-3.5-turbo"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.into_body().collect().await.unwrap();
    }
    let left = layer.usage_for_model("mo", "gpt-4o").await.unwrap()[0].remaining;
    assert_eq!(left, 6);
    let denied = svc.oneshot(chat_with("gpt-4o")).await.unwrap();
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&denied, "x-ratelimit-remaining-requests"), "6");
}
