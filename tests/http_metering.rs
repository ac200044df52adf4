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

const CHAT: &str = "/v1/chat/completions";

/// The tokens charged for one call to `path` whose upstream answers `body` as it is, labelled
/// with `content_type` and `encoding`.
async fn charged_for_answer(
    path: &'static str,
    content_type: &'static str,
    encoding: &'static str,
    body: Vec<u8>,
) -> u64 {
    let body = Bytes::from(body);
    let layer = layer();
    let svc = layer.layer(service_fn(
        move |_req: Request<RequestBody<Full<Bytes>>>| {
            let body = body.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", content_type)
                        .header("content-encoding", encoding)
                        .body(Full::new(body))
                        .unwrap(),
                )
            }
        },
    ));
    let request = Request::post(path)
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
    BUDGET - layer.usage("meter").await.unwrap()[0].remaining
}

/// An answer in zstd is metered when its window is at most 8 MiB. One asking for a
/// larger window (which its decoder would hold for the whole stream, up to 128 MiB) is
/// not decoded: it is charged by its size, as an unreadable answer is.
#[tokio::test]
async fn a_zstd_answer_is_read_within_an_8_mib_window_only() {
    let answer = br#"{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5000,"total_tokens":5007}}"#;
    let zstd = |window_log: u32| {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.window_log(window_log).unwrap();
        for piece in answer.chunks(16) {
            encoder.write_all(piece).unwrap();
        }
        encoder.finish().unwrap()
    };
    let read = charged_for_answer(CHAT, "application/json", "zstd", zstd(23)).await;
    assert_eq!(read, 5007);
    let unread = charged_for_answer(CHAT, "application/json", "zstd", zstd(24)).await;
    assert!(unread > 0 && unread < 5007, "charged {unread}");
}

/// An answer that fails to decode in its first frame is charged by its size (4 bytes a
/// token), as an unreadable answer is: it was charged nothing.
#[tokio::test]
async fn a_compressed_answer_unreadable_from_its_first_byte_is_charged_by_its_size() {
    let garbage = b"this is not what its coding says it is. ".repeat(25);
    for coding in ["gzip", "deflate", "br", "zstd"] {
        let used = charged_for_answer(CHAT, "application/json", coding, garbage.clone()).await;
        assert!(
            used >= garbage.len() as u64 / 4,
            "{coding}: charged {used} for {} bytes",
            garbage.len()
        );
    }
}

/// ~80 KB of text that does not compress to nothing (no usage in it): one zstd block.
fn prose() -> Vec<u8> {
    (0..12_000u64)
        .flat_map(|i| format!("{} ", i * 2_654_435_761 % 1_000_003).into_bytes())
        .collect()
}

/// An answer cut short is charged at least by its size (4 bytes a token), however its
/// coding decodes. A zstd block produces nothing until it is whole (up to 128 KiB), and
/// a zstd stream cut short did not fail to finish: such an answer was charged 0.
#[tokio::test]
async fn a_compressed_answer_cut_short_is_charged_at_least_by_its_size() {
    let plain = prose();
    let codings = [
        ("gzip", gzip(&plain)),
        ("br", brotli_body(&plain)),
        ("zstd", zstd::encode_all(&plain[..], 3).unwrap()),
    ];
    for (coding, mut body) in codings {
        body.truncate(body.len() - 10);
        let size = body.len() as u64;
        let used = charged_for_answer(CHAT, "application/json", coding, body).await;
        assert!(
            used >= size / 4,
            "{coding}: charged {used} for {size} bytes"
        );
    }
}

/// What could not be read of an answer adds to what was: a readable event (or an
/// Anthropic `message_start`, with its partial usage) before it no longer stands for the
/// whole answer. Such answers were charged 1 token, and 10.
#[tokio::test]
async fn what_could_not_be_read_adds_to_what_was() {
    let garbage = vec![0x42u8; 200_000];
    let then_garbage = |event: &str| {
        let mut body = gzip(event.as_bytes());
        body.extend_from_slice(&garbage);
        body
    };
    let event = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
    let used = charged_for_answer(CHAT, "text/event-stream", "gzip", then_garbage(event)).await;
    assert!(
        used >= garbage.len() as u64 / 4,
        "an event, then garbage: {used}"
    );
    let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n";
    let used = charged_for_answer(
        "/v1/messages",
        "text/event-stream",
        "gzip",
        then_garbage(start),
    )
    .await;
    assert!(
        used >= 9 + garbage.len() as u64 / 4,
        "message_start, then garbage: {used}"
    );
}

/// A whole compressed answer followed by bytes its coding cannot read (a newline, zero
/// padding: clients ignore them) is charged its usage exactly. Those bytes made the body
/// unreadable, and the usage counted as a minimum only: a 20 KB embeddings answer of 8
/// tokens was charged 5038.
#[tokio::test]
async fn trailing_bytes_after_a_whole_compressed_answer_do_not_change_its_charge() {
    let floats: Vec<String> = (0..1536).map(|i| format!("-0.0{:08}", i * 7919)).collect();
    let embeddings = format!(
        r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":[{}]}}],"model":"e","usage":{{"prompt_tokens":8,"total_tokens":8}}}}"#,
        floats.join(",")
    );
    let openai_sse = format!(
        "{}data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":50,\"completion_tokens\":23,\"total_tokens\":73}}}}\n\ndata: [DONE]\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"word \"}}],\"usage\":null}\n\n".repeat(300)
    );
    let anthropic_sse = format!(
        "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"usage\":{{\"input_tokens\":60,\"output_tokens\":1}}}}}}\n\n{}event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":25}}}}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"word \"}}\n\n".repeat(300)
    );
    let answers = [
        (CHAT, "application/json", embeddings, 8),
        (CHAT, "text/event-stream", openai_sse, 73),
        ("/v1/messages", "text/event-stream", anthropic_sse, 85),
    ];
    for (path, content_type, plain, usage) in answers {
        let plain = plain.as_bytes();
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(plain).unwrap();
        let codings = [
            ("gzip", gzip(plain)),
            ("deflate", zlib.finish().unwrap()),
            ("br", brotli_body(plain)),
            ("zstd", zstd::encode_all(plain, 3).unwrap()),
        ];
        for (coding, whole) in codings {
            for trailing in [&b""[..], b"\n", b"\r\n", &[0u8; 8]] {
                let mut body = whole.clone();
                body.extend_from_slice(trailing);
                let used = charged_for_answer(path, content_type, coding, body).await;
                assert_eq!(used, usage, "{path} {content_type} {coding} + {trailing:?}");
            }
        }
    }
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
    let mut compressed = gzip(sse.as_bytes());
    compressed.truncate(compressed.len() - 30);
    let used = charged_for_answer(CHAT, "text/event-stream", "gzip", compressed).await;
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

type Received = Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>;

/// An upstream that records each request's headers and body, answering with usage.
fn recording_upstream(
    received: Received,
) -> impl tower::Service<
    Request<RequestBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone {
    service_fn(move |req: Request<RequestBody<Full<Bytes>>>| {
        let received = received.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            received.lock().unwrap().push((parts.headers, body));
            let answer = r#"{"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
            let mut response = Response::new(Full::new(Bytes::from(answer)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Ok::<_, Infallible>(response)
        }
    })
}

fn brotli_body(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut writer = brotli::CompressorWriter::new(&mut out, 4096, 5, 24);
        writer.write_all(bytes).unwrap();
    }
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// Limits that depend on the model read it from compressed bodies too, and refuse
/// bodies they cannot read (too large, an unknown encoding, corrupt) instead of letting
/// them through with no model: compressing or padding a request used to escape them.
#[tokio::test]
async fn model_limits_are_not_escaped_by_compressed_or_oversized_bodies() {
    let layer = RatelimitLayer::builder()
        .limit(
            "gpt4",
            tower_llm_ratelimit::Limit::requests(FixedWindow::new(1, LONG).unwrap())
                .models(["gpt-4*"]),
        )
        .limit(
            "per-model",
            tower_llm_ratelimit::Limit::requests(FixedWindow::new(1, LONG).unwrap()).per_model(),
        )
        .identifier(Fixed::new("zip"))
        .max_request_body(1024)
        .build_http()
        .unwrap();
    let received = Received::default();
    let svc = layer.layer(recording_upstream(received.clone()));
    let send = |encoding: Option<&'static str>, body: Vec<u8>| {
        let mut request =
            Request::post("/v1/chat/completions").header("content-type", "application/json");
        // Several codings separated by '|' go as several header lines.
        for coding in encoding.into_iter().flat_map(|e| e.split('|')) {
            request = request.header("content-encoding", coding);
        }
        let svc = svc.clone();
        async move {
            svc.oneshot(request.body(Full::new(Bytes::from(body))).unwrap())
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let chat = |model: &str| {
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
    };
    let gpt4 = gzip(chat("gpt-4o").as_bytes());
    assert_eq!(send(Some("gzip"), gpt4.clone()).await, 200);
    {
        let received = received.lock().unwrap();
        let (headers, body) = &received[0];
        assert_eq!(headers["content-encoding"], "gzip", "passed on as it came");
        assert_eq!(&body[..], &gpt4[..]);
    }
    // gpt-4o's limits are spent: compressed or not, padded or not, it is refused.
    assert_eq!(send(Some("gzip"), gpt4.clone()).await, 429);
    assert_eq!(send(None, chat("gpt-4o").into_bytes()).await, 429);
    let padded = format!("{}{}", chat("gpt-4o"), " ".repeat(2000));
    assert_eq!(
        send(None, padded.clone().into_bytes()).await,
        413,
        "larger than the layer reads"
    );
    assert_eq!(
        send(Some("gzip"), gzip(padded.as_bytes())).await,
        413,
        "larger once decoded"
    );
    assert_eq!(
        send(Some("compress"), chat("gpt-4o").into_bytes()).await,
        415
    );
    assert_eq!(send(Some("gzip"), b"not gzip".to_vec()).await, 400);
    // Two header lines are one list: "identity" then "gzip" is gzip.
    assert_eq!(send(Some("identity|gzip"), gpt4.clone()).await, 429);
    assert_eq!(
        send(Some("gzip|br"), gpt4.clone()).await,
        415,
        "stacked codings"
    );
    // Cut short or empty, under any coding: it does not decode.
    let zstd = zstd::encode_all(chat("gpt-4o").as_bytes(), 3).unwrap();
    assert_eq!(
        send(Some("zstd"), zstd[..zstd.len() - 1].to_vec()).await,
        400
    );
    assert_eq!(send(Some("br"), Vec::new()).await, 400);
    // A few hundred bytes of brotli that decode to 64 MiB: stopped at the bound.
    let bomb = brotli_body(&vec![b' '; 64 << 20]);
    assert!(bomb.len() < 4096, "{}", bomb.len());
    assert_eq!(send(Some("br"), bomb).await, 413);
    // JSON this parser does not read (nesting deeper than it goes, a lone surrogate),
    // which another parser may: refused, since its model cannot be read.
    let deep = format!(
        r#"{{"model":"gpt-4o","messages":[{}{}]}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    assert_eq!(send(None, deep.into_bytes()).await, 400);
    let surrogate = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"\ud800"}]}"#;
    assert_eq!(send(None, surrogate.as_bytes().to_vec()).await, 400);
    assert_eq!(
        received.lock().unwrap().len(),
        1,
        "none of them reached the upstream"
    );
    // Another model's budgets are its own, compressed too.
    assert_eq!(
        send(Some("gzip"), gzip(chat("claude-3").as_bytes())).await,
        200
    );
    assert_eq!(
        send(Some("gzip"), gzip(chat("claude-3").as_bytes())).await,
        429
    );
}

/// A streamed chat request sent compressed still gets usage asked for: the upstream
/// receives the rewritten request decoded (no `Content-Encoding`).
#[tokio::test]
async fn a_compressed_streamed_request_is_rewritten_decoded() {
    let layer = layer();
    let received = Received::default();
    let svc = layer.layer(recording_upstream(received.clone()));
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("transfer-encoding", "chunked")
        .body(Full::new(Bytes::from(gzip(CHAT_STREAM.as_bytes()))))
        .unwrap();
    let response = svc.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let received = received.lock().unwrap();
    let (headers, body) = &received[0];
    assert!(headers.get("content-encoding").is_none(), "{headers:?}");
    assert!(headers.get("transfer-encoding").is_none(), "{headers:?}");
    assert_eq!(headers["content-length"], body.len().to_string().as_str());
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(json["stream_options"]["include_usage"], true, "{json}");
    assert_eq!(json["model"], "m");
}
