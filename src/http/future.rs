use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::HttpConfig;
use super::body::{Meter, RatelimitBody, RequestBody};
use super::decode::{Encoding, Unreadable, decode_request};
use super::headers::{self, Api, LimitInfo};
use super::inspect::inspect;
use crate::engine::call::{Call, CallRequest, Outcome};
use crate::engine::settlement::{Ending, Settlement};
use crate::engine::{Engine, Plan};
use crate::error::{BoxError, Error};
use crate::llm::Usage;
use crate::store::{Decision, Tag};

/// The request body read: all of it (`None`), or its first bytes and the rest unread
/// (the body was larger than the layer reads and the layer needs no estimate).
type ReadFuture<B> =
    Pin<Box<dyn Future<Output = Result<(Bytes, Option<Pin<Box<B>>>), BoxError>> + Send>>;

/// Read up to `max` bytes of `body`. Beyond: with `strict`, an error (413); else the
/// bytes read so far and the rest of the body.
fn read_body<B>(body: B, max: usize, strict: bool) -> ReadFuture<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if strict {
        return Box::pin(
            async move { Ok((Limited::new(body, max).collect().await?.to_bytes(), None)) },
        );
    }
    Box::pin(async move {
        let mut body = Box::pin(body);
        let mut read = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(Into::into)?;
            if let Ok(data) = frame.into_data() {
                read.extend_from_slice(&data);
                if read.len() > max {
                    return Ok((read.freeze(), Some(body)));
                }
            }
        }
        Ok((read.freeze(), None))
    })
}

/// The span of a call the HTTP layer refuses itself before the call starts (no
/// identifier, a body it cannot read): the call's span (`llm_ratelimit_call`), entered,
/// with the decision `error`.
fn refusal_span(identifier: Option<&[u8]>) -> Option<tracing::span::EnteredSpan> {
    tracing::enabled!(tracing::Level::DEBUG).then(|| {
        let identifier = identifier
            .and_then(|id| Tag::of(id).ok())
            .map(|tag| Tag::logged(tag.as_str()));
        tracing::debug_span!(
            "llm_ratelimit_call",
            identifier = identifier.as_ref().map(tracing::field::display),
            decision = "error",
        )
        .entered()
    })
}

/// The layer's answer to a request body it needs to read and cannot: 413 when it
/// decodes to more than the layer reads, 415 for an encoding the layer cannot read, 400
/// for a body that does not decode.
fn unreadable_request<B>(
    api: Api,
    http: &HttpConfig,
    unreadable: Unreadable,
) -> Response<RatelimitBody<B>> {
    tracing::warn!(?unreadable, "could not read a compressed request body");
    let (status, code, message) = match unreadable {
        Unreadable::TooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "request body larger than {} bytes once decoded",
                http.max_request_body
            ),
        ),
        Unreadable::Unsupported(name) => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_encoding",
            format!(
                "request body encoded as {name:?}, which the rate limiter cannot read \
                 (it reads gzip, deflate, br and zstd)"
            ),
        ),
        Unreadable::Corrupt => (
            StatusCode::BAD_REQUEST,
            "unreadable_body",
            "the request body does not decode under its Content-Encoding".to_owned(),
        ),
    };
    headers::api_error(api, status, "invalid_request_error", code, &message)
}

/// What the response needs from the request once the call is on its way.
struct CallInfo {
    engine: Arc<Engine>,
    http: Arc<HttpConfig>,
    api: Api,
    /// Remove the usage-only SSE chunk the layer asked for.
    filter_usage_chunk: bool,
    /// Prompt tokens estimated from the request, charged if the usage never arrives.
    prompt_estimate: u64,
    /// The call needs what its body says (its estimate, or its model): a body the layer
    /// cannot read is refused, not passed on.
    strict: bool,
}

pin_project! {
    /// Response future of [`HttpRatelimited`](super::HttpRatelimited): read the request
    /// body if needed, acquire, call, and hand back the response with a metered body.
    ///
    /// Dropping it at any point settles the call in the background. Polling it after
    /// it completed panics.
    pub struct HttpResponseFuture<S, B, ResBody>
    where
        S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>,
    {
        #[pin]
        state: State<S, B, ResBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, ResBody>
    where
        S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>,
    {
        Respond { response: Option<Response<RatelimitBody<ResBody>>> },
        Reading {
            read: ReadFuture<B>,
            parts: Option<http::request::Parts>,
            service: Option<S>,
            identifier: Vec<u8>,
            info: Option<CallInfo>,
        },
        Calling { #[pin] call: Call<S, Request<RequestBody<B>>>, info: Option<CallInfo> },
        Settling { settlement: Settlement, error: Option<S::Error> },
        Done,
    }
}

/// The response for a request the layer refuses before asking the store.
fn refusal<ResBody>(error: &Error, api: Api) -> Response<RatelimitBody<ResBody>> {
    let message = error.to_string();
    match error {
        Error::MissingIdentifier => headers::api_error(
            api,
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing_identifier",
            &message,
        ),
        _ => headers::api_error(
            api,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_identifier",
            &message,
        ),
    }
}

fn is_event_stream(parts: &http::response::Parts) -> bool {
    parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"))
}

/// The request's `Content-Length`, 0 when absent or unreadable.
fn content_length(headers: &http::HeaderMap) -> u64 {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Ask the upstream for an uncompressed answer on a metered call: usage is read without
/// a decoder (whose window would cost ~64 KiB per stream), and the usage chunk the layer
/// asked for can be taken out of the stream. The client receives what the upstream
/// sent; an upstream that compresses anyway is still metered, through a decoded view.
fn ask_for_identity(headers: &mut http::HeaderMap) {
    headers.insert(
        http::header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    );
}

/// The error and its causes, each once: `a: b: c`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// Each limit of the call with its decision, for headers.
fn infos(engine: &Engine, plan: &Plan, decisions: &[Decision]) -> Vec<LimitInfo> {
    plan.taken
        .iter()
        .zip(decisions)
        .map(|(t, d)| {
            let spec = engine.spec(t.limit);
            LimitInfo {
                name: spec.name.clone(),
                kind: spec.kind,
                limit: d.limit,
                remaining: Some(d.remaining),
                reset_after: d.reset_after,
                period: t.rule.period(),
            }
        })
        .collect()
}

/// The response for a call refused before the inner service: a denial (429), or the
/// store failing (503).
fn refused<ResBody>(
    engine: &Engine,
    error: &Error,
    plan: Option<&Plan>,
    decisions: &[Decision],
    api: Api,
) -> Response<RatelimitBody<ResBody>> {
    let Some(exceeded) = error.limit_exceeded() else {
        if let Error::Store(e) = error {
            let message = format!("rate limiter unavailable: {}", chain(e));
            return headers::api_error(
                api,
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "ratelimit_store_unavailable",
                &message,
            );
        }
        return refusal(error, api);
    };
    let kind = match error {
        Error::TokenLimitReached(_) => crate::LimitKind::Tokens,
        Error::ConcurrencyLimitReached(_) => crate::LimitKind::Concurrency,
        _ => crate::LimitKind::Requests,
    };
    let infos = match plan {
        // From the store, or from the denial cache (which keeps the denied acquire's
        // decisions of every limit).
        Some(plan) if !decisions.is_empty() => infos(engine, plan, decisions),
        // A suspension (a quota of 0), refused without the store: every limit's policy,
        // and the denying limit's state, which is all that is known.
        Some(plan) => plan
            .taken
            .iter()
            .map(|t| {
                let spec = engine.spec(t.limit);
                let denying = spec.name == exceeded.name;
                LimitInfo {
                    name: spec.name.clone(),
                    kind: spec.kind,
                    limit: if denying {
                        exceeded.limit
                    } else {
                        t.rule.limit()
                    },
                    remaining: denying.then_some(exceeded.remaining),
                    reset_after: if denying {
                        exceeded.reset_after
                    } else {
                        std::time::Duration::ZERO
                    },
                    period: t.rule.period(),
                }
            })
            .collect(),
        None => vec![LimitInfo {
            name: exceeded.name.clone(),
            kind,
            limit: exceeded.limit,
            remaining: Some(exceeded.remaining),
            reset_after: exceeded.reset_after,
            period: std::time::Duration::ZERO,
        }],
    };
    headers::denial(kind, &error.to_string(), exceeded, &infos, api)
}

impl<S, B, ResBody> HttpResponseFuture<S, B, ResBody>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>,
{
    pub(crate) fn rejected(error: &Error, api: Api) -> Self {
        let _span = refusal_span(None);
        tracing::info!(%error, "rate limit refused a request");
        Self::respond(refusal(error, api))
    }

    /// A response the layer gives itself, without the store or the inner service.
    fn respond(response: Response<RatelimitBody<ResBody>>) -> Self {
        Self {
            state: State::Respond {
                response: Some(response),
            },
        }
    }

    pub(crate) fn reading(
        service: S,
        request: Request<B>,
        engine: Arc<Engine>,
        http: Arc<HttpConfig>,
        identifier: Vec<u8>,
        api: Api,
        needs_estimate: bool,
    ) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        // Only an estimate, or limits that depend on the model, need the whole body:
        // otherwise a large body passes through.
        let strict = needs_estimate || engine.needs_model();
        let read = read_body(body, http.max_request_body, strict);
        Self {
            state: State::Reading {
                read,
                parts: Some(parts),
                service: Some(service),
                identifier,
                info: Some(CallInfo {
                    engine,
                    http,
                    api,
                    filter_usage_chunk: false,
                    prompt_estimate: 0,
                    strict,
                }),
            },
        }
    }

    /// Straight to the call (the request body is not read: no estimate, no rewrite).
    pub(crate) fn calling(
        service: S,
        mut request: Request<RequestBody<B>>,
        engine: Arc<Engine>,
        http: Arc<HttpConfig>,
        identifier: Vec<u8>,
        api: Api,
    ) -> Self {
        // The body is not read: its length stands in for the prompt (4 bytes a token).
        let prompt_estimate = content_length(request.headers()).div_ceil(4);
        if engine.settles_after_body() {
            ask_for_identity(request.headers_mut());
        }
        let call = Call::new(
            engine.clone(),
            service,
            request,
            CallRequest {
                identifier: &identifier,
                model: None,
                estimate: Some(Usage::new(prompt_estimate, 0)),
            },
        );
        Self {
            state: State::Calling {
                call,
                info: Some(CallInfo {
                    engine,
                    http,
                    api,
                    filter_usage_chunk: false,
                    prompt_estimate,
                    strict: false,
                }),
            },
        }
    }
}

impl<S, B, ResBody> Future for HttpResponseFuture<S, B, ResBody>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Output = Result<Response<RatelimitBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Respond { response } => {
                    let response = response.take().expect("future polled after completion");
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(response));
                }
                StateProj::Reading {
                    read,
                    parts,
                    service,
                    identifier,
                    info,
                } => {
                    let result = ready!(read.as_mut().poll(cx));
                    let (mut parts, service, mut info) = (
                        parts.take().expect("future polled after completion"),
                        service.take().expect("future polled after completion"),
                        info.take().expect("future polled after completion"),
                    );
                    let (bytes, rest) = match result {
                        Ok(read) => read,
                        Err(e) => {
                            let _span = refusal_span(Some(identifier));
                            let too_large = e.downcast_ref::<LengthLimitError>().is_some();
                            tracing::warn!(error = %e, too_large, "could not read a request body");
                            let response = if too_large {
                                headers::api_error(
                                    info.api,
                                    StatusCode::PAYLOAD_TOO_LARGE,
                                    "invalid_request_error",
                                    "request_too_large",
                                    &format!(
                                        "request body larger than {} bytes",
                                        info.http.max_request_body
                                    ),
                                )
                            } else {
                                headers::api_error(
                                    info.api,
                                    StatusCode::BAD_REQUEST,
                                    "invalid_request_error",
                                    "unreadable_body",
                                    "could not read the request body",
                                )
                            };
                            this.state.set(State::Respond {
                                response: Some(response),
                            });
                            continue;
                        }
                    };
                    if let Some(rest) = rest {
                        // Larger than the layer reads, and no estimate is needed: the
                        // request goes on as it came (no usage injection, no model),
                        // its length standing in for the prompt (4 bytes a token).
                        if info.engine.settles_after_body() {
                            ask_for_identity(&mut parts.headers);
                        }
                        let length = content_length(&parts.headers).max(bytes.len() as u64);
                        info.prompt_estimate = length.div_ceil(4);
                        let estimate = Some(Usage::new(info.prompt_estimate, 0));
                        let request =
                            Request::from_parts(parts, RequestBody::prefixed(bytes, rest));
                        let call = Call::new(
                            info.engine.clone(),
                            service,
                            request,
                            CallRequest {
                                identifier,
                                model: None,
                                estimate,
                            },
                        );
                        this.state.set(State::Calling {
                            call,
                            info: Some(info),
                        });
                        continue;
                    }
                    // A compressed body is read decoded. One the layer cannot read
                    // (an encoding it does not know, corrupt, or larger than it reads
                    // once decoded) is refused if the call needs what it says (its
                    // estimate or its model), else passed on as it came, uninspected.
                    let decoded =
                        match decode_request(&parts.headers, &bytes, info.http.max_request_body) {
                            Ok(decoded) => Some(decoded),
                            Err(unreadable) if info.strict => {
                                let _span = refusal_span(Some(identifier));
                                this.state.set(State::Respond {
                                    response: Some(unreadable_request(
                                        info.api, &info.http, unreadable,
                                    )),
                                });
                                continue;
                            }
                            Err(_) => None,
                        };
                    // Only OpenAI chat and completions accept `stream_options`.
                    let path = parts.uri.path();
                    let inject = info.http.inject_stream_usage
                        && info.api == Api::OpenAi
                        && (path.ends_with("/chat/completions") || path.ends_with("/completions"));
                    let inspection = match &decoded {
                        Some(Some(plain)) => inspect(plain, info.engine.default_estimate, inject),
                        Some(None) => inspect(&bytes, info.engine.default_estimate, inject),
                        None => Default::default(),
                    };
                    if inspection.prompt.is_none() && info.engine.needs_model() {
                        // Limits apply by model, and the model cannot be read: the body
                        // is not a JSON object this parser reads (too deeply nested, a
                        // lone surrogate, not JSON), which the upstream's may still read.
                        // Passing it on would skip those limits.
                        let _span = refusal_span(Some(identifier));
                        tracing::warn!(
                            "a request whose model the limits need is not JSON it can read"
                        );
                        this.state.set(State::Respond {
                            response: Some(headers::api_error(
                                info.api,
                                StatusCode::BAD_REQUEST,
                                "invalid_request_error",
                                "unreadable_body",
                                "the rate limiter could not read the request body as a JSON object",
                            )),
                        });
                        continue;
                    }
                    let body = match inspection.rewritten {
                        Some(rewritten) => {
                            // Sent decoded (the rewrite is of the decoded text), whole,
                            // with its length: no stale encoding or chunked framing.
                            parts.headers.remove(CONTENT_ENCODING);
                            parts.headers.remove(TRANSFER_ENCODING);
                            parts.headers.insert(CONTENT_LENGTH, rewritten.len().into());
                            rewritten
                        }
                        None => bytes,
                    };
                    info.filter_usage_chunk = inspection.filter_usage_chunk;
                    info.prompt_estimate = inspection.prompt.unwrap_or(0);
                    let estimate = inspection
                        .prompt
                        .zip(inspection.estimate)
                        .map(|(p, total)| Usage::new(p, total.saturating_sub(p)));
                    if info.engine.settles_after_body() {
                        ask_for_identity(&mut parts.headers);
                    }
                    let request = Request::from_parts(parts, RequestBody::buffered(body));
                    let call = Call::new(
                        info.engine.clone(),
                        service,
                        request,
                        CallRequest {
                            identifier,
                            model: inspection.model.as_deref(),
                            estimate,
                        },
                    );
                    this.state.set(State::Calling {
                        call,
                        info: Some(info),
                    });
                }
                StateProj::Calling { call, info } => {
                    let outcome = ready!(call.poll(cx));
                    let info = info.take().expect("future polled after completion");
                    let engine = &info.engine;
                    match outcome {
                        Outcome::Refused {
                            error,
                            decisions,
                            plan,
                            decider,
                        } => {
                            if !matches!(error, Error::Store(_)) {
                                tracing::info!(%error, "rate limit denied a request");
                            }
                            let mut response =
                                refused(engine, &error, plan.as_deref(), &decisions, info.api);
                            headers::insert_fallback(response.headers_mut(), decider.label());
                            this.state.set(State::Respond {
                                response: Some(response),
                            });
                        }
                        Outcome::Called {
                            result: Err(error),
                            mut settlement,
                            ..
                        } => {
                            settlement.start(Ending::Failed);
                            this.state.set(State::Settling {
                                settlement,
                                error: Some(error),
                            });
                        }
                        Outcome::Called {
                            result: Ok(response),
                            settlement,
                            plan,
                        } => {
                            let (mut parts, body) = response.into_parts();
                            headers::insert_rate_limit_headers(
                                &mut parts.headers,
                                &infos(engine, &plan, settlement.decisions()),
                            );
                            headers::insert_fallback(
                                &mut parts.headers,
                                settlement.decider().label(),
                            );
                            let body = if engine.settles_after_body() {
                                // Settled at the end of the body: the token charge, and
                                // the concurrency slot, held until the body is done.
                                let parser = info.http.usage_format.parser(&parts);
                                let event_stream = is_event_stream(&parts);
                                let encoding = Encoding::of(&parts.headers);
                                // The usage chunk can only be taken out of a plain stream.
                                let filter = info.filter_usage_chunk
                                    && event_stream
                                    && matches!(encoding, Encoding::Identity);
                                if filter {
                                    parts.headers.remove(CONTENT_LENGTH);
                                }
                                let meter = Meter::new(
                                    parser,
                                    settlement,
                                    parts.status.is_success(),
                                    filter,
                                    event_stream,
                                    info.prompt_estimate,
                                    encoding,
                                );
                                RatelimitBody::metered(body, meter)
                            } else {
                                RatelimitBody::plain(body)
                            };
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(Response::from_parts(parts, body)));
                        }
                    }
                }
                StateProj::Settling { settlement, error } => {
                    ready!(settlement.poll_write(cx));
                    let error = error.take().expect("future polled after completion");
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Done => panic!("future polled after completion"),
            }
        }
    }
}
