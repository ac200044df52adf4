use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::{Meter, RatelimitBody, RequestBody};
use super::headers::{self, GrpcCode, LimitInfo};
use super::inspect::inspect;
use crate::error::{BoxError, Error};
use crate::layer::Limits;
use crate::layer::settlement::{Ending, Settlement};
use crate::store::Decision;

type ReadFuture = Pin<Box<dyn Future<Output = Result<Bytes, BoxError>> + Send>>;

pin_project! {
    /// Response future of [`HttpRatelimited`](super::HttpRatelimited): read the request
    /// body if needed, acquire, call, and hand back the response with a metered body.
    ///
    /// Dropping it at any point settles the call in the background.
    pub struct HttpResponseFuture<S, B, ResBody>
    where
        S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>,
    {
        #[pin]
        state: State<S, B, ResBody>,
        limits: Option<Arc<Limits>>,
        settlement: Option<Settlement>,
        tag: String,
        grpc: bool,
        filter_usage_chunk: bool,
        decisions: Vec<Decision>,
        fallback: Option<&'static str>,
        prompt_estimate: u64,
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
            read: ReadFuture,
            parts: Option<http::request::Parts>,
            service: Option<S>,
            inject: bool,
        },
        Acquiring { service: Option<S>, request: Option<Request<RequestBody<B>>> },
        Calling { #[pin] future: S::Future },
        Settling { error: Option<S::Error> },
        Done,
    }
}

/// The response for a request the layer refuses before asking the store.
fn refusal<ResBody>(error: &Error, grpc: bool) -> Response<RatelimitBody<ResBody>> {
    let message = error.to_string();
    match (error, grpc) {
        (Error::MissingIdentifier, false) => headers::json_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing_identifier",
            &message,
        ),
        (Error::MissingIdentifier, true) => {
            headers::grpc_error(GrpcCode::Unauthenticated, &message)
        }
        (_, false) => headers::json_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_identifier",
            &message,
        ),
        (_, true) => headers::grpc_error(GrpcCode::InvalidArgument, &message),
    }
}

fn is_anthropic(parts: &http::request::Parts) -> bool {
    parts.headers.contains_key("anthropic-version") || parts.uri.path().ends_with("/messages")
}

fn is_event_stream(parts: &http::response::Parts) -> bool {
    parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"))
}

impl<S, B, ResBody> HttpResponseFuture<S, B, ResBody>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>,
{
    pub(crate) fn rejected(error: &Error, grpc: bool) -> Self {
        tracing::info!(%error, "rate limit refused a request");
        Self::respond(refusal(error, grpc), grpc)
    }

    /// The denial for an identifier the denied-cache still holds: no store call.
    pub(crate) fn denied_from_cache(
        name: &'static str,
        error: &Error,
        limits: &Limits,
        grpc: bool,
    ) -> Self {
        let response = match error.limit_exceeded() {
            Some(exceeded) => {
                let period = limits
                    .names()
                    .find(|(n, _)| *n == name)
                    .map_or(std::time::Duration::ZERO, |(_, p)| p);
                let info = LimitInfo {
                    name,
                    limit: exceeded.limit,
                    remaining: exceeded.remaining,
                    reset_after: exceeded.reset_after,
                    period,
                };
                headers::denial(name, &error.to_string(), exceeded, &[info], grpc)
            }
            None => refusal(error, grpc),
        };
        Self::respond(response, grpc)
    }

    /// A response the layer gives itself, without the store or the inner service.
    fn respond(response: Response<RatelimitBody<ResBody>>, grpc: bool) -> Self {
        let state = State::Respond {
            response: Some(response),
        };
        Self::with_state(state, None, String::new(), grpc)
    }

    fn with_state(
        state: State<S, B, ResBody>,
        limits: Option<Arc<Limits>>,
        tag: String,
        grpc: bool,
    ) -> Self {
        Self {
            state,
            limits,
            settlement: None,
            tag,
            grpc,
            filter_usage_chunk: false,
            decisions: Vec::new(),
            fallback: None,
            prompt_estimate: 0,
        }
    }

    pub(crate) fn reading(
        service: S,
        request: Request<B>,
        limits: Arc<Limits>,
        tag: String,
        grpc: bool,
    ) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        let max = limits.http.max_request_body;
        let inject = limits.http.inject_stream_usage && !is_anthropic(&parts);
        let read: ReadFuture =
            Box::pin(async move { Ok(Limited::new(body, max).collect().await?.to_bytes()) });
        let state = State::Reading {
            read,
            parts: Some(parts),
            service: Some(service),
            inject,
        };
        Self::with_state(state, Some(limits), tag, grpc)
    }

    /// Straight to the acquire (the request body is not read: no estimate, no rewrite).
    pub(crate) fn acquiring(
        service: S,
        request: Request<RequestBody<B>>,
        limits: Arc<Limits>,
        tag: String,
        grpc: bool,
    ) -> Self {
        // The body is not read: its length stands in for the prompt (4 bytes a token).
        let prompt_estimate = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |len| len.div_ceil(4));
        let settlement = Self::start_acquire(&limits, &tag, None);
        let state = State::Acquiring {
            service: Some(service),
            request: Some(request),
        };
        let mut future = Self::with_state(state, Some(limits), tag, grpc);
        future.settlement = Some(settlement);
        future.prompt_estimate = prompt_estimate;
        future
    }

    fn start_acquire(limits: &Arc<Limits>, tag: &str, estimate: Option<u64>) -> Settlement {
        Settlement::new(limits.clone(), limits.plan(tag, || estimate))
    }
}

fn infos(limits: &Limits, decisions: &[Decision]) -> Vec<LimitInfo> {
    limits
        .names()
        .zip(decisions)
        .map(|((name, period), d)| LimitInfo::new(name, d, period))
        .collect()
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
                    let response = response.take();
                    this.state.set(State::Done);
                    match response {
                        Some(r) => return Poll::Ready(Ok(r)),
                        None => continue,
                    }
                }
                StateProj::Reading {
                    read,
                    parts,
                    service,
                    inject,
                } => {
                    let result = ready!(read.as_mut().poll(cx));
                    let (Some(mut parts), Some(service), Some(limits)) =
                        (parts.take(), service.take(), this.limits.clone())
                    else {
                        this.state.set(State::Done);
                        continue;
                    };
                    let bytes = match result {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            let too_large = e.downcast_ref::<LengthLimitError>().is_some();
                            tracing::warn!(error = %e, too_large, "could not read a request body");
                            let response = match (too_large, *this.grpc) {
                                (true, _) => headers::json_error(
                                    StatusCode::PAYLOAD_TOO_LARGE,
                                    "invalid_request_error",
                                    "request_too_large",
                                    &format!(
                                        "request body larger than {} bytes",
                                        limits.http.max_request_body
                                    ),
                                ),
                                (false, _) => headers::json_error(
                                    StatusCode::BAD_REQUEST,
                                    "invalid_request_error",
                                    "unreadable_body",
                                    "could not read the request body",
                                ),
                            };
                            this.state.set(State::Respond {
                                response: Some(response),
                            });
                            continue;
                        }
                    };
                    let inspection = inspect(&bytes, limits.default_estimate, *inject);
                    let body = match inspection.rewritten {
                        Some(rewritten) => {
                            parts.headers.insert(CONTENT_LENGTH, rewritten.len().into());
                            rewritten
                        }
                        None => bytes,
                    };
                    *this.filter_usage_chunk = inspection.filter_usage_chunk;
                    *this.prompt_estimate = inspection.prompt.unwrap_or(0);
                    let request = Request::from_parts(parts, RequestBody::buffered(body));
                    *this.settlement =
                        Some(Self::start_acquire(&limits, this.tag, inspection.estimate));
                    this.state.set(State::Acquiring {
                        service: Some(service),
                        request: Some(request),
                    });
                }
                StateProj::Acquiring { service, request } => {
                    let (Some(settlement), Some(limits)) =
                        (this.settlement.as_mut(), this.limits.clone())
                    else {
                        this.state.set(State::Done);
                        continue;
                    };
                    let acquired = ready!(settlement.poll_acquire(cx));
                    *this.fallback = settlement.decider().label();
                    match acquired {
                        Err(error) => {
                            tracing::error!(identifier = %this.tag, %error, "rate-limit store failed");
                            let message = format!("rate limiter unavailable: {error}");
                            let response = if *this.grpc {
                                headers::grpc_error(GrpcCode::Unavailable, &message)
                            } else {
                                headers::json_error(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "server_error",
                                    "ratelimit_store_unavailable",
                                    &message,
                                )
                            };
                            this.state.set(State::Respond {
                                response: Some(response),
                            });
                        }
                        Ok(decisions) if !decisions.iter().all(|d| d.allowed) => {
                            let (name, error) = limits.denial(&decisions);
                            limits.remember_denial(this.tag, name, &error);
                            tracing::info!(identifier = %this.tag, %error, "rate limit denied a request");
                            let infos = infos(&limits, &decisions);
                            let mut response = match error.limit_exceeded() {
                                Some(exceeded) => headers::denial(
                                    name,
                                    &error.to_string(),
                                    exceeded,
                                    &infos,
                                    *this.grpc,
                                ),
                                None => refusal(&error, *this.grpc),
                            };
                            headers::insert_fallback(response.headers_mut(), *this.fallback);
                            this.state.set(State::Respond {
                                response: Some(response),
                            });
                        }
                        Ok(decisions) => {
                            *this.decisions = decisions;
                            let (Some(mut service), Some(request)) =
                                (service.take(), request.take())
                            else {
                                this.state.set(State::Done);
                                continue;
                            };
                            let future = service.call(request);
                            this.state.set(State::Calling { future });
                        }
                    }
                }
                StateProj::Calling { future } => {
                    let result = ready!(future.poll(cx));
                    let response = match result {
                        Ok(response) => response,
                        Err(error) => {
                            if let Some(s) = this.settlement.as_mut() {
                                s.start(Ending::Failed);
                            }
                            this.state.set(State::Settling { error: Some(error) });
                            continue;
                        }
                    };
                    let (mut parts, body) = response.into_parts();
                    let limits = this.limits.clone();
                    if let Some(limits) = &limits {
                        headers::insert_rate_limit_headers(
                            &mut parts.headers,
                            &infos(limits, this.decisions),
                        );
                    }
                    headers::insert_fallback(&mut parts.headers, *this.fallback);
                    let settlement = this.settlement.take();
                    let body = match (limits, settlement) {
                        // Settled at the end of the body: the token charge, and the
                        // concurrency slot, which is held until the body is done.
                        (Some(limits), Some(settlement))
                            if limits.tokens.is_some() || limits.concurrency.is_some() =>
                        {
                            let parser = limits.http.usage_format.parser(&parts);
                            let event_stream = is_event_stream(&parts);
                            let filter = *this.filter_usage_chunk && event_stream;
                            if filter {
                                parts.headers.remove(CONTENT_LENGTH);
                            }
                            let meter = Meter::new(
                                parser,
                                settlement,
                                parts.status.is_success(),
                                filter,
                                event_stream,
                                *this.prompt_estimate,
                            );
                            RatelimitBody::metered(body, meter)
                        }
                        _ => RatelimitBody::plain(body),
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                StateProj::Settling { error } => {
                    if let Some(s) = this.settlement.as_mut() {
                        ready!(s.poll_write(cx));
                    }
                    let error = error.take();
                    this.state.set(State::Done);
                    if let Some(error) = error {
                        return Poll::Ready(Err(error));
                    }
                }
                StateProj::Done => {
                    // Polled after completion: there is nothing left to give.
                    return Poll::Pending;
                }
            }
        }
    }
}
