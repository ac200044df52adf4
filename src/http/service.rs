use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::RequestBody;
use super::future::HttpResponseFuture;
use crate::error::BoxError;
use crate::identifier::ExtractIdentifier;
use crate::layer::{Limits, TokenMode};

/// An `http::Request` service rate-limited by an
/// [`HttpRatelimitLayer`](super::HttpRatelimitLayer).
///
/// `poll_ready` forwards to the inner service. All clones share the limiter state.
pub struct HttpRatelimited<S, X> {
    inner: S,
    limits: Arc<Limits>,
    extractor: X,
}

impl<S: Clone, X: Clone> Clone for HttpRatelimited<S, X> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limits: self.limits.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<S: std::fmt::Debug, X: std::fmt::Debug> std::fmt::Debug for HttpRatelimited<S, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRatelimited")
            .field("inner", &self.inner)
            .field("extractor", &self.extractor)
            .finish_non_exhaustive()
    }
}

impl<S, X> HttpRatelimited<S, X> {
    pub(crate) fn new(inner: S, limits: Arc<Limits>, extractor: X) -> Self {
        Self {
            inner,
            limits,
            extractor,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

fn is_json<B>(request: &Request<B>) -> bool {
    match request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str())
    {
        None => true,
        Some(Ok(ct)) => ct.to_ascii_lowercase().starts_with("application/json"),
        Some(Err(_)) => false,
    }
}

impl<S, X, B, ResBody> Service<Request<B>> for HttpRatelimited<S, X>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>> + Clone,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    X: ExtractIdentifier<Request<B>>,
{
    type Response = Response<super::RatelimitBody<ResBody>>;
    type Error = S::Error;
    type Future = HttpResponseFuture<S, B, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let grpc = is_grpc(&request);
        let tag = match self
            .limits
            .tag_for(self.extractor.extract(&request).as_deref())
        {
            Ok(tag) => tag,
            Err(error) => return HttpResponseFuture::rejected(&error, grpc),
        };
        if let Some((name, error)) = self.limits.cached_denial(&tag) {
            return HttpResponseFuture::denied_from_cache(name, &error, &self.limits, grpc);
        }
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        let limits = self.limits.clone();
        let wants_estimate = limits.tokens.is_some() && limits.token_mode == TokenMode::Reserve;
        let read_body = !grpc
            && request.method() == http::Method::POST
            && is_json(&request)
            && (wants_estimate || (limits.tokens.is_some() && limits.http.inject_stream_usage));
        if read_body {
            HttpResponseFuture::reading(service, request, limits, tag, grpc)
        } else {
            let request = request.map(RequestBody::streaming);
            HttpResponseFuture::acquiring(service, request, limits, tag, grpc)
        }
    }
}
