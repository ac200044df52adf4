//! The `tracing` spans of calls, seen by a subscriber installed for the whole process
//! (a thread's default subscriber races with other tests over which call sites are
//! enabled, so these checks run in a binary of their own, one after the other).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{BoxError, Layer, ServiceExt, service_fn};
use tower_llm_ratelimit::http::RequestBody;
use tower_llm_ratelimit::{FixedWindow, Limit, LlmRequest, LlmResponse, RatelimitLayer, Usage};

const LONG: std::time::Duration = tower_llm_ratelimit::algorithm::MAX_WINDOW;

/// A span's name and every field recorded on it.
type CapturedSpan = (String, HashMap<String, String>);

/// Span fields as a subscriber sees them.
#[derive(Clone, Default)]
struct SpanCapture {
    spans: Arc<Mutex<Vec<CapturedSpan>>>,
    events: Arc<Mutex<Vec<String>>>,
    /// How many spans `take_named` has looked at.
    taken: Arc<Mutex<usize>>,
}

impl SpanCapture {
    /// The fields of every span named `name` made since the last call, in the order
    /// they were made (the spans stay, as their ids index them).
    fn take_named(&self, name: &str) -> Vec<HashMap<String, String>> {
        let spans = self.spans.lock().unwrap();
        let mut taken = self.taken.lock().unwrap();
        let new = spans[*taken..]
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, fields)| fields.clone())
            .collect();
        *taken = spans.len();
        new
    }
}

/// Writes a span's or an event's fields into a map (as text).
struct FieldMap<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for FieldMap<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl tracing::Subscriber for SpanCapture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = HashMap::new();
        attrs.record(&mut FieldMap(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((attrs.metadata().name().to_owned(), fields));
        tracing::span::Id::from_u64(spans.len() as u64)
    }

    fn record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        values.record(&mut FieldMap(&mut spans[id.into_u64() as usize - 1].1));
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = HashMap::new();
        event.record(&mut FieldMap(&mut fields));
        self.events.lock().unwrap().push(format!("{fields:?}"));
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// A model that reports `usage`.
fn llm(
    usage: Usage,
) -> impl tower::Service<LlmRequest, Response = LlmResponse, Error = BoxError, Future: Send> + Clone
{
    service_fn(move |_: LlmRequest| async move {
        Ok::<_, BoxError>(LlmResponse {
            text: "ok".into(),
            usage: Some(usage),
        })
    })
}

/// An upstream that answers every request with usage, reading its body first.
fn upstream() -> impl tower::Service<
    Request<RequestBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone {
    service_fn(|req: Request<RequestBody<Full<Bytes>>>| async move {
        let _ = req.into_body().collect().await;
        let answer = r#"{"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(answer))))
    })
}

#[test]
fn spans() {
    let capture = SpanCapture::default();
    tracing::subscriber::set_global_default(capture.clone()).unwrap();
    each_call_has_a_span_with_its_limits_and_decision_and_no_raw_identifier(&capture);
    refusals_before_the_call_have_a_span(&capture);
}

/// Every call has a span that names its limits and its decision (and the limit that
/// denied it), and names the identifier only hashed: an identifier may be an API key.
fn each_call_has_a_span_with_its_limits_and_decision_and_no_raw_identifier(capture: &SpanCapture) {
    use sha2::{Digest, Sha256};
    let key = "sk-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGhIjKl";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let layer = RatelimitLayer::builder()
            .limit("rpm", Limit::requests(FixedWindow::new(1, LONG).unwrap()))
            .limit("tpm", Limit::tokens(FixedWindow::new(1000, LONG).unwrap()))
            .build()
            .unwrap();
        let svc = layer.layer(llm(Usage::new(1, 1)));
        let call = || {
            svc.clone()
                .oneshot(LlmRequest::new(key, "x").with_model("gpt-4o"))
        };
        call().await.unwrap();
        call().await.unwrap_err();
    });
    let spans = capture.take_named("llm_ratelimit_call");
    assert_eq!(
        spans.len(),
        2,
        "one span per call, allowed or denied: {spans:?}"
    );
    let digest = Sha256::digest(key.as_bytes());
    let hashed: String = std::iter::once("#".to_owned())
        .chain(digest[..16].iter().map(|b| format!("{b:02x}")))
        .collect();
    for span in &spans {
        assert_eq!(span["identifier"], hashed, "{span:?}");
        assert_eq!(span["limits"], "rpm,tpm", "{span:?}");
        assert_eq!(span["model"], "gpt-4o", "{span:?}");
    }
    assert_eq!(spans[0]["decision"], "allowed");
    assert!(!spans[0].contains_key("denied_by"));
    assert_eq!(spans[1]["decision"], "denied");
    assert_eq!(spans[1]["denied_by"], "rpm");
    let events = std::mem::take(&mut *capture.events.lock().unwrap());
    assert!(events.iter().any(|e| e.contains("denied")), "{events:?}");
    let everything = format!("{spans:?} {events:?}");
    assert!(
        !everything.contains(key),
        "the raw identifier reached tracing: {everything}"
    );
}

/// Requests the HTTP layer refuses itself, before a call starts (no identifier, a body it
/// cannot read), have their call's span too, with the decision `error`.
fn refusals_before_the_call_have_a_span(capture: &SpanCapture) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let statuses = rt.block_on(async {
        let layer = RatelimitLayer::builder()
            .limit(
                "gpt4",
                tower_llm_ratelimit::Limit::requests(FixedWindow::new(10, LONG).unwrap())
                    .models(["gpt-4*"]),
            )
            .identifier(tower_llm_ratelimit::identifier::Header::new("x-user"))
            .max_request_body(64)
            .build_http()
            .unwrap();
        let svc = layer.layer(upstream());
        let mut statuses = Vec::new();
        for (user, body) in [
            (None, r#"{"model":"gpt-4o"}"#.to_owned()),
            (
                Some("ann"),
                format!(r#"{{"model":"gpt-4o","x":"{}"}}"#, "y".repeat(100)),
            ),
            (Some("ann"), "not json".to_owned()),
        ] {
            let mut request =
                Request::post("/v1/chat/completions").header("content-type", "application/json");
            if let Some(user) = user {
                request = request.header("x-user", user);
            }
            let response = svc
                .clone()
                .oneshot(request.body(Full::new(Bytes::from(body))).unwrap())
                .await
                .unwrap();
            statuses.push(response.status().as_u16());
        }
        statuses
    });
    assert_eq!(statuses, [401, 413, 400]);
    let spans = capture.take_named("llm_ratelimit_call");
    assert_eq!(spans.len(), 3, "{spans:?}");
    assert!(spans.iter().all(|s| s["decision"] == "error"), "{spans:?}");
    assert!(!spans[0].contains_key("identifier"));
    assert!(spans[1]["identifier"].starts_with('#'), "hashed: {spans:?}");
}
