//! Usage that must not escape metering, through the HTTP layer in front of the mock
//! upstream (in process): requests that do not ask for streamed usage however they say
//! it, mislabelled and oversized bodies, compressed and truncated answers, and identity
//! on Anthropic routes.

use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_llm_ratelimit::http::RequestBody;
use tower_llm_ratelimit::identifier::{Fixed, hash_api_key};
use tower_llm_ratelimit::{FixedWindow, RatelimitLayer};

const LONG: std::time::Duration = tower_llm_ratelimit::algorithm::MAX_WINDOW;
const BUDGET: u64 = 1_000_000;

type Seen = Arc<Mutex<Vec<http::HeaderMap>>>;

/// The mock upstream, recording the headers it receives.
fn upstream(
    seen: Seen,
) -> impl tower::Service<
    Request<RequestBody<Full<Bytes>>>,
    Response = Response<llm_mock_upstream::MockBody>,
    Error = Infallible,
    Future: Send,
> + Clone {
    service_fn(move |req: Request<RequestBody<Full<Bytes>>>| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(req.headers().clone());
            Ok::<_, Infallible>(llm_mock_upstream::mock_upstream(req).await)
        }
    })
}

fn layer() -> tower_llm_ratelimit::HttpRatelimitLayer<Fixed> {
    RatelimitLayer::builder()
        .token_limit(FixedWindow::new(BUDGET, LONG).unwrap())
        .include_output_tokens(true)
        .identifier(Fixed::new("meter"))
        .build_http()
        .unwrap()
}

/// Send `body` with `headers`; returns the tokens charged and the body the client got.
async fn charged(path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> (u64, Bytes) {
    let layer = layer();
    let svc = layer.layer(upstream(Seen::default()));
    let mut request = Request::post(path);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = svc
        .oneshot(request.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let left = layer.usage("meter").await.unwrap()[0].remaining;
    (BUDGET - left, bytes)
}

const CHAT_STREAM: &str =
    r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;

#[tokio::test]
async fn streamed_chat_is_charged_however_it_asks() {
    // Prompt: ("user" + "hello") / 4 + 10 = 13; output: 20. Usage reported only when the
    // request asks for it, as OpenAI does: the layer must ask.
    let json = [("content-type", "application/json")];
    let (plain, _) = charged("/v1/chat/completions", &json, CHAT_STREAM).await;
    assert_eq!(plain, 33);
    let null = CHAT_STREAM.replace("\"stream\":true", "\"stream\":true,\"stream_options\":null");
    assert_eq!(charged("/v1/chat/completions", &json, null).await.0, 33);
    let anthropic_header = [
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
    ];
    assert_eq!(
        charged("/v1/chat/completions", &anthropic_header, CHAT_STREAM)
            .await
            .0,
        33
    );
    let text_plain = [("content-type", "text/plain")];
    assert_eq!(
        charged("/v1/chat/completions", &text_plain, CHAT_STREAM)
            .await
            .0,
        33
    );
    // Larger than the layer reads (4 MiB of padding): it passes through, and is charged
    // at least its estimate (length / 4), never 0.
    let padded = format!(
        "{}{}}}",
        &CHAT_STREAM[..CHAT_STREAM.len() - 1],
        " ".repeat(5 << 20)
    );
    let (big, _) = charged("/v1/chat/completions", &json, padded.clone()).await;
    assert!(
        big >= (padded.len() as u64 / 4).min(BUDGET),
        "charged {big}"
    );
}

#[tokio::test]
async fn compressed_and_truncated_answers_are_charged() {
    let json = [("content-type", "application/json")];
    let (plain, plain_body) = charged("/v1/chat/completions", &json, CHAT_STREAM).await;
    for encoding in ["gzip", "br"] {
        let headers = [
            ("content-type", "application/json"),
            ("x-mock-encoding", encoding),
        ];
        let (tokens, body) = charged("/v1/chat/completions", &headers, CHAT_STREAM).await;
        assert_eq!(tokens, plain, "{encoding}");
        assert_ne!(
            body, plain_body,
            "{encoding}: the client gets the compressed bytes"
        );
    }
}

#[tokio::test]
async fn metered_calls_ask_the_upstream_for_identity() {
    let seen = Seen::default();
    let svc = layer().layer(upstream(seen.clone()));
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, br")
        .body(Full::new(Bytes::from(CHAT_STREAM)))
        .unwrap();
    let _ = svc
        .oneshot(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await;
    assert_eq!(seen.lock().unwrap()[0]["accept-encoding"], "identity");
}

/// A gzip body cut short: what was decoded is still counted, never 0.
#[tokio::test]
async fn a_truncated_compressed_body_is_charged_its_estimate() {
    let sse: String = (0..50u64)
        .map(|i| {
            let word = (i * 2_654_435_761 % 1_000_003).to_string();
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{word}\"}}}}]}}\n\n")
        })
        .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(sse.as_bytes()).unwrap();
    let mut compressed = gz.finish().unwrap();
    compressed.truncate(compressed.len() - 30);
    let body = Bytes::from(compressed);
    let layer = layer();
    let svc = layer.layer(service_fn(
        move |_req: Request<RequestBody<Full<Bytes>>>| {
            let body = body.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .header("content-encoding", "gzip")
                        .body(Full::new(body))
                        .unwrap(),
                )
            }
        },
    ));
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
        .unwrap();
    let _ = svc
        .oneshot(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await;
    let used = BUDGET - layer.usage("meter").await.unwrap()[0].remaining;
    assert!(used >= 40, "charged {used}");
}

#[tokio::test]
async fn anthropic_routes_identify_by_x_api_key() {
    let layer = RatelimitLayer::builder()
        .request_limit(FixedWindow::new(1, LONG).unwrap())
        .build_http()
        .unwrap();
    let svc = layer.layer(upstream(Seen::default()));
    let mut statuses = Vec::new();
    for i in 0..5 {
        let request = Request::post("/v1/messages")
            .header("content-type", "application/json")
            .header("x-api-key", "sk-ant-real")
            .header("authorization", format!("Bearer junk-{i}"))
            .body(Full::new(Bytes::from_static(
                b"{\"model\":\"c\",\"max_tokens\":5,\"messages\":[]}",
            )))
            .unwrap();
        statuses.push(
            svc.clone()
                .oneshot(request)
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 429, 429, 429, 429]);
    assert_eq!(
        layer.usage(hash_api_key(b"sk-ant-real")).await.unwrap()[0].remaining,
        0
    );
}
