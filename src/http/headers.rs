//! Rate-limit response headers (OpenAI-style and IETF) and the responses the layer
//! produces itself: 429 (OpenAI error JSON, or gRPC `RESOURCE_EXHAUSTED`), 401, 413, 503.

use std::fmt::Write as _;
use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};

use super::body::RatelimitBody;
use crate::engine::limit::LimitKind;
use crate::error::LimitExceeded;

/// One limit's state as reported in headers.
#[derive(Clone, Debug)]
pub(crate) struct LimitInfo {
    pub name: std::sync::Arc<str>,
    pub kind: LimitKind,
    pub limit: u64,
    /// `None` when not known (a call refused for a quota of 0 never asks the store, so
    /// it knows only the refusing limit's state).
    pub remaining: Option<u64>,
    pub reset_after: Duration,
    /// The quota's period, for `RateLimit-Policy`.
    pub period: Duration,
}

/// Which API's error shape a response the layer makes itself takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    /// `{"error":{"message","type","param","code"}}`.
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`.
    Anthropic,
    /// A trailers-only gRPC status.
    Grpc,
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// OpenAI's duration format for `x-ratelimit-reset-*`: `250ms`, `7s`, `1m0s`, `2h3m4s`.
pub(crate) fn openai_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!(
            "{}ms",
            d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000))
        );
    }
    let total = ceil_secs(d);
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h{m}m{s}s");
    } else if m > 0 {
        let _ = write!(out, "{m}m{s}s");
    } else {
        let _ = write!(out, "{s}s");
    }
    out
}

fn set(headers: &mut HeaderMap, name: &str, value: String) {
    if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
        headers.insert(n, v);
    }
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens,concurrency}` for the most
/// restrictive limit of each kind (the one with the least left), and `RateLimit-Policy`
/// and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) listing every limit by name.
pub(crate) fn insert_rate_limit_headers(headers: &mut HeaderMap, infos: &[LimitInfo]) {
    if infos.is_empty() {
        return;
    }
    for kind in [
        LimitKind::Requests,
        LimitKind::Tokens,
        LimitKind::Concurrency,
    ] {
        let Some((info, remaining)) = infos
            .iter()
            .filter(|i| i.kind == kind)
            .filter_map(|i| Some((i, i.remaining?)))
            .min_by_key(|(i, remaining)| (*remaining, std::cmp::Reverse(i.reset_after)))
        else {
            continue;
        };
        let kind = kind.as_str();
        set(
            headers,
            &format!("x-ratelimit-limit-{kind}"),
            info.limit.to_string(),
        );
        set(
            headers,
            &format!("x-ratelimit-remaining-{kind}"),
            remaining.to_string(),
        );
        set(
            headers,
            &format!("x-ratelimit-reset-{kind}"),
            openai_duration(info.reset_after),
        );
    }
    let mut policy = String::new();
    let mut state = String::new();
    for (i, info) in infos.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(
            policy,
            "{sep}\"{}\";q={};w={}",
            info.name,
            info.limit,
            ceil_secs(info.period)
        );
        if let Some(remaining) = info.remaining {
            let sep = if state.is_empty() { "" } else { ", " };
            let _ = write!(
                state,
                "{sep}\"{}\";r={};t={}",
                info.name,
                remaining,
                ceil_secs(info.reset_after)
            );
        }
    }
    set(headers, "ratelimit-policy", policy);
    if !state.is_empty() {
        set(headers, "ratelimit", state);
    }
}

/// `x-ratelimit-fallback: open|local` when the decision was taken without the store.
pub(crate) fn insert_fallback(headers: &mut HeaderMap, fallback: Option<&'static str>) {
    if let Some(label) = fallback {
        headers.insert("x-ratelimit-fallback", HeaderValue::from_static(label));
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The error type Anthropic uses for a status.
fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 | 415 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// A JSON error in `api`'s shape (gRPC: a status with the message).
pub(crate) fn api_error<B>(
    api: Api,
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
) -> Response<RatelimitBody<B>> {
    let body = match api {
        Api::Grpc => {
            let code = match status.as_u16() {
                401 => GrpcCode::Unauthenticated,
                429 => GrpcCode::ResourceExhausted,
                503 => GrpcCode::Unavailable,
                _ => GrpcCode::InvalidArgument,
            };
            return grpc_error(code, message);
        }
        Api::Anthropic => format!(
            "{{\"type\":\"error\",\"error\":{{\"type\":{},\"message\":{}}}}}",
            json_string(anthropic_type(status)),
            json_string(message)
        ),
        Api::OpenAi => format!(
            "{{\"error\":{{\"message\":{},\"type\":{},\"param\":null,\"code\":{}}}}}",
            json_string(message),
            json_string(kind),
            json_string(code)
        ),
    };
    let mut response = Response::new(RatelimitBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// gRPC status codes the layer answers with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum GrpcCode {
    InvalidArgument = 3,
    ResourceExhausted = 8,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// Percent-encoding of `grpc-message` (gRPC over HTTP/2 spec).
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A trailers-only gRPC error response (HTTP 200 with `grpc-status` in the headers), as
/// tonic clients expect.
pub(crate) fn grpc_error<B>(code: GrpcCode, message: &str) -> Response<RatelimitBody<B>> {
    let mut response = Response::new(RatelimitBody::full(bytes::Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    set(headers, "grpc-status", (code as u8).to_string());
    set(headers, "grpc-message", grpc_message(message));
    response
}

/// The response for a rate-limit denial: 429 with `Retry-After` and the API's error
/// JSON, or gRPC `RESOURCE_EXHAUSTED` with `retry-after` metadata. A call that can
/// never pass (its cost exceeds the quota) gets no `Retry-After` and the code
/// `<kind>_limit_exceeds_quota`.
pub(crate) fn denial<B>(
    kind: LimitKind,
    message: &str,
    exceeded: &LimitExceeded,
    infos: &[LimitInfo],
    api: Api,
) -> Response<RatelimitBody<B>> {
    let singular = kind.as_str().trim_end_matches('s');
    let code = match exceeded.retry_after {
        Some(_) => format!("{singular}_limit_reached"),
        None => format!("{singular}_limit_exceeds_quota"),
    };
    let mut response = api_error(
        api,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
        &code,
        message,
    );
    let headers = response.headers_mut();
    insert_rate_limit_headers(headers, infos);
    set(headers, "x-ratelimit-limit-name", exceeded.name.to_string());
    if exceeded.retry_after.is_none() {
        // The cost exceeds the quota: retrying cannot help. OpenAI's and Anthropic's SDKs
        // honour this header and raise at once instead of retrying.
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
    }
    if let Some(retry) = exceeded.retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(retry)));
        // Rounded up like `Retry-After`: a client that waits exactly this long passes.
        let ms = retry.as_millis() + u128::from(!retry.subsec_nanos().is_multiple_of(1_000_000));
        set(headers, "retry-after-ms", ms.to_string());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_openai_format() {
        assert_eq!(openai_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(openai_duration(Duration::from_micros(250_500)), "251ms");
        assert_eq!(openai_duration(Duration::from_secs(7)), "7s");
        assert_eq!(openai_duration(Duration::from_millis(6_100)), "7s");
        assert_eq!(openai_duration(Duration::from_secs(60)), "1m0s");
        assert_eq!(openai_duration(Duration::from_secs(7384)), "2h3m4s");
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("a b%c\né"), "a b%25c%0A%C3%A9");
    }
}
