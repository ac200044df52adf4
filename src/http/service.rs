use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::HttpConfig;
use super::body::RequestBody;
use super::future::HttpResponseFuture;
use super::headers::Api;
use crate::engine::{Engine, TokenMode};
use crate::error::BoxError;
use crate::identifier::ExtractIdentifier;

/// An `http::Request` service rate-limited by an
/// [`HttpRatelimitLayer`](super::HttpRatelimitLayer).
///
/// `poll_ready` forwards to the inner service. All clones share the limiter state.
pub struct HttpRatelimited<S, X> {
    inner: S,
    engine: Arc<Engine>,
    http: Arc<HttpConfig>,
    extractor: X,
}

impl<S: Clone, X: Clone> Clone for HttpRatelimited<S, X> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            engine: self.engine.clone(),
            http: self.http.clone(),
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
    pub(crate) fn new(inner: S, engine: Arc<Engine>, http: Arc<HttpConfig>, extractor: X) -> Self {
        Self {
            inner,
            engine,
            http,
            extractor,
        }
    }

    crate::inner_service_accessors!();
}

/// Whether a body may be JSON the layer can read: anything but uploads (multipart, as
/// audio and file endpoints take). The content type is not trusted further: upstreams
/// accept JSON under other types, and a mislabelled body must not escape metering.
fn may_be_json<B>(request: &Request<B>) -> bool {
    !request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("multipart/"))
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
        let api = api_of(&request);
        let extracted = self.extractor.extract(&request);
        let identifier = match self.engine.identifier(extracted.as_deref()) {
            Ok(id) => id.to_vec(),
            Err(error) => return HttpResponseFuture::rejected(&error, api),
        };
        drop(extracted);
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        let engine = self.engine.clone();
        let tokens = engine.has_token_limit();
        let needs_estimate = tokens && engine.token_mode == TokenMode::Reserve;
        let wants_body =
            needs_estimate || (tokens && self.http.inject_stream_usage) || engine.needs_model();
        let read_body = api != Api::Grpc
            && request.method() == http::Method::POST
            && may_be_json(&request)
            && wants_body;
        let http = self.http.clone();
        if read_body {
            HttpResponseFuture::reading(
                service,
                request,
                engine,
                http,
                identifier,
                api,
                needs_estimate,
            )
        } else {
            let request = request.map(RequestBody::streaming);
            HttpResponseFuture::calling(service, request, engine, http, identifier, api)
        }
    }
}

/// The API whose error shape the layer's own responses take.
fn api_of<B>(request: &Request<B>) -> Api {
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("application/grpc") {
        Api::Grpc
    } else if request.uri().path().ends_with("/messages") {
        // By path only: a header the client sets must not change how the call is read.
        Api::Anthropic
    } else {
        Api::OpenAi
    }
}
