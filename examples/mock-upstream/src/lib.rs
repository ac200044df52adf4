//! A mock OpenAI / Anthropic upstream: chat completions, completions, embeddings,
//! Responses and Messages, JSON and SSE, with realistic usage. Serves `llm-gateway`'s
//! demo mode (no `--upstream`), and the tests and benches of the workspace. Not a
//! production code path: its `x-mock-*` request headers are test knobs.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The body of a mock response.
pub type MockBody = BoxBody<Bytes, BoxError>;

/// A boxed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<MockBody> {
    let mut response = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    response
}

fn json_error(status: StatusCode, message: &str) -> Response<MockBody> {
    let body = json!({"error": {"message": message, "type": "gateway_error", "param": null, "code": null}});
    full(status, "application/json", body.to_string())
}

/// A body fed from a channel: how the mock streams SSE with real delays.
#[derive(Debug)]
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn text_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(a) => a.iter().map(text_bytes).sum(),
        Value::Object(o) => o.values().map(text_bytes).sum(),
        _ => 0,
    }
}

/// The mock upstream's answer to one request: OpenAI chat/completions/embeddings and
/// Anthropic messages, JSON or SSE, with realistic usage (prompt = text / 4 + 10,
/// completion = 20 or `max_tokens` if smaller).
///
/// Also the OpenAI Responses API (`/v1/responses`, JSON and SSE with a final
/// `response.completed` event) and `GET /v1/models`.
///
/// Test knobs (request headers): `x-mock-chunk-bytes: N` sends the body in N-byte
/// frames; `x-mock-delay-ms: N` waits between frames; `x-mock-status: CODE` with
/// `x-mock-raw: TEXT` answers that status and raw text instead; `x-mock-completion: N`
/// generates N output tokens (one event each when streamed); `x-mock-encoding:
/// gzip|br` compresses the body (whatever the request accepts, as a misbehaving CDN
/// would). The response header `x-mock-saw-include-usage` says whether the request
/// asked for streamed usage.
pub async fn mock_upstream<B>(request: Request<B>) -> Response<MockBody>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let (Some(status), Some(raw)) = (header("x-mock-status"), header("x-mock-raw")) {
        let status = status
            .parse()
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let content_type = if raw.starts_with('{') {
            "application/json"
        } else {
            "text/plain"
        };
        return full(status, content_type, raw);
    }
    if parts.method == http::Method::GET {
        let v = json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}]});
        return full(StatusCode::OK, "application/json", v.to_string());
    }
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("bad body: {e}")),
    };
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = parts.uri.path().to_owned();
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    let prompt_text: u64 = ["messages", "prompt", "input", "system"]
        .iter()
        .filter_map(|k| request.get(*k))
        .map(text_bytes)
        .sum();
    let prompt_tokens = prompt_text.div_ceil(4) + 10;
    let max = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| request.get(*k).and_then(Value::as_u64))
        .unwrap_or(u64::MAX);
    let completion_tokens = header("x-mock-completion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .min(max)
        .min(
            request
                .get("max_output_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(u64::MAX),
        );
    // One word per output token (five distinct words, repeated).
    let word_list = ["Hello", " from", " the", " mock", " upstream."];
    let words: Vec<&str> = if completion_tokens == 20 || completion_tokens == 0 {
        word_list.to_vec()
    } else {
        (0..completion_tokens as usize)
            .map(|i| word_list[i % word_list.len()])
            .collect()
    };
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);

    let (content_type, payload): (&'static str, String) = if path.ends_with("/responses") {
        let text = words.concat();
        let usage = json!({"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt_tokens + completion_tokens});
        let response = |status: &str, usage: Value| {
            json!({"id": "resp_mock", "object": "response", "created_at": 0, "status": status, "model": model,
            "output": [{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": usage})
        };
        if stream {
            let mut s = String::new();
            let mut seq = 0;
            let mut event = |name: &str, mut data: Value| {
                data["sequence_number"] = json!(seq);
                seq += 1;
                s.push_str(&format!("event: {name}\ndata: {data}\n\n"));
            };
            let mut created = response("in_progress", Value::Null);
            created["output"] = json!([]);
            event(
                "response.created",
                json!({"type": "response.created", "response": created}),
            );
            for w in &words {
                event(
                    "response.output_text.delta",
                    json!({"type": "response.output_text.delta", "item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": w}),
                );
            }
            event(
                "response.completed",
                json!({"type": "response.completed", "response": response("completed", usage)}),
            );
            ("text/event-stream", s)
        } else {
            ("application/json", response("completed", usage).to_string())
        }
    } else if path.ends_with("/embeddings") {
        let v = json!({"object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}});
        ("application/json", v.to_string())
    } else if path.ends_with("/messages") {
        if stream {
            let mut s = String::new();
            let mut event =
                |name: &str, data: Value| s.push_str(&format!("event: {name}\ndata: {data}\n\n"));
            event(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant", "content": [], "model": model, "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": prompt_tokens, "output_tokens": 1}}}),
            );
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            );
            for w in &words {
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
                );
            }
            event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            );
            event(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": completion_tokens}}),
            );
            event("message_stop", json!({"type": "message_stop"}));
            ("text/event-stream", s)
        } else {
            let v = json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": words.concat()}], "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}});
            ("application/json", v.to_string())
        }
    } else {
        let chat = path.ends_with("/chat/completions");
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
        if stream {
            let object = if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let mut s = String::new();
            let mut chunk = |choices: Value, usage: Option<Value>| {
                let mut c = json!({"id": "chatcmpl-mock", "object": object, "created": 0, "model": model, "choices": choices});
                if include_usage {
                    c["usage"] = usage.unwrap_or(Value::Null);
                }
                s.push_str(&format!("data: {c}\n\n"));
            };
            for (i, w) in words.iter().enumerate() {
                let choice = if chat {
                    let mut delta = json!({"content": w});
                    if i == 0 {
                        delta["role"] = json!("assistant");
                    }
                    json!([{"index": 0, "delta": delta, "finish_reason": null}])
                } else {
                    json!([{"index": 0, "text": w, "finish_reason": null}])
                };
                chunk(choice, None);
            }
            let last = if chat {
                json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            } else {
                json!([{"index": 0, "text": "", "finish_reason": "stop"}])
            };
            chunk(last, None);
            if include_usage {
                chunk(json!([]), Some(usage));
            }
            s.push_str("data: [DONE]\n\n");
            ("text/event-stream", s)
        } else if chat {
            let v = json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": words.concat()}, "finish_reason": "stop"}],
                "usage": usage});
            ("application/json", v.to_string())
        } else {
            let v = json!({"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": model,
                "choices": [{"index": 0, "text": words.concat(), "finish_reason": "stop"}], "usage": usage});
            ("application/json", v.to_string())
        }
    };

    let chunk_bytes: usize = header("x-mock-chunk-bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let delay_ms: u64 = header("x-mock-delay-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let streamed = content_type == "text/event-stream" || chunk_bytes > 0;
    let encoding = header("x-mock-encoding");
    let payload: Vec<u8> = match encoding.as_deref() {
        Some("gzip") => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let _ = e.write_all(payload.as_bytes());
            e.finish().unwrap_or_default()
        }
        Some("br") => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                let _ = e.write_all(payload.as_bytes());
            }
            out
        }
        _ => payload.into_bytes(),
    };
    let mut response = if streamed {
        // Event by event (or N bytes at a time), with the delay between frames.
        let frames: Vec<Bytes> = if chunk_bytes > 0 {
            payload
                .chunks(chunk_bytes)
                .map(Bytes::copy_from_slice)
                .collect()
        } else if encoding.is_some() {
            // Compressed: in frames of up to 64 bytes, as a compressing proxy flushes.
            payload.chunks(64).map(Bytes::copy_from_slice).collect()
        } else {
            payload
                .split_inclusive(|b| *b == b'\n')
                .fold(Vec::<Vec<u8>>::new(), |mut events, line| {
                    // One frame per SSE event (lines up to and including a blank line).
                    match events.last_mut() {
                        Some(e) if !e.ends_with(b"\n\n") => e.extend_from_slice(line),
                        _ => events.push(line.to_vec()),
                    }
                    events
                })
                .into_iter()
                .map(Bytes::from)
                .collect()
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for frame in frames {
                if delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
                if tx.send(frame).await.is_err() {
                    return; // the client went away
                }
            }
        });
        let mut r = Response::new(ChannelBody(rx).boxed());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
        r
    } else {
        full(StatusCode::OK, content_type, payload)
    };
    if let Some(v) = encoding
        .filter(|e| e == "gzip" || e == "br")
        .and_then(|e| HeaderValue::from_str(&e).ok())
    {
        response
            .headers_mut()
            .insert(http::header::CONTENT_ENCODING, v);
    }
    response.headers_mut().insert(
        "x-mock-saw-include-usage",
        HeaderValue::from_static(if include_usage { "true" } else { "false" }),
    );
    response
}
