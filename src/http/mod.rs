//! HTTP integration: [`HttpRatelimitLayer`] for `http::Request` services —
//! axum routers, hyper services, tonic servers.
//!
//! * A denial is a **response**, not an error, so it works on an axum `Router` without
//!   `HandleErrorLayer`: `429 Too Many Requests` with `Retry-After` (whole seconds,
//!   rounded up, the real time left), OpenAI-style `x-ratelimit-*` headers, IETF
//!   `RateLimit-Policy`/`RateLimit`, and an OpenAI-shaped JSON error body, so OpenAI SDKs
//!   raise their `RateLimitError`. gRPC requests (`content-type: application/grpc`) get
//!   `RESOURCE_EXHAUSTED` with `retry-after` metadata instead.
//! * Allowed responses carry the same `x-ratelimit-*` and `RateLimit*` headers.
//! * Usage is read from the response body as it streams ([`RatelimitBody`]): OpenAI
//!   JSON and SSE, Anthropic JSON and SSE, or your own [`UsageFormat`]. The call is
//!   settled before the end of the body is handed on; a body dropped early is settled on
//!   what was seen.
//! * In `Reserve` mode the estimate comes from the JSON request body
//!   (`max_completion_tokens`/`max_tokens`, or the default, plus prompt text / 4).
//! * Streamed OpenAI requests that do not ask for usage get
//!   `stream_options.include_usage=true`; the usage-only chunk this produces is removed
//!   from what the client receives.
//! * Missing identifier: `401` with a JSON error (gRPC `UNAUTHENTICATED`), unless a
//!   fallback identifier is configured.
//!
//! The inner service receives `Request<RequestBody<B>>`: the original body, or the bytes
//! the layer read. axum's `Router`, tonic's `Routes` and any service generic over the
//! body accept it.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_llm_ratelimit::BoxError> {
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use tower::ServiceBuilder;
//! use tower_llm_ratelimit::{FixedWindow, RatelimitLayer, identifier::Header};
//!
//! let ratelimit = RatelimitLayer::builder()
//!     .request_limit(FixedWindow::new(10, Duration::from_secs(60))?)
//!     .token_limit(FixedWindow::new(10_000, Duration::from_secs(60))?)
//!     .identifier(Header::new("x-user-id"))
//!     .build_http()?;
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "..." }))
//!     .layer(ServiceBuilder::new().layer(ratelimit));
//! # let _ = app;
//! # Ok(())
//! # }
//! ```

mod body;
mod decode;
mod future;
mod headers;
mod inspect;
mod service;
mod usage;

pub use body::{RatelimitBody, RequestBody};
pub use future::HttpResponseFuture;
pub use service::HttpRatelimited;
pub use usage::{JsonUsage, OpenAiAnthropic, SseUsage, UsageFormat, UsageParser, usage_from_json};

use std::sync::Arc;

use tower_layer::Layer;

use crate::engine::{Engine, LimitUsage};
use crate::identifier::FromRequest;

/// Settings only the HTTP adapter uses.
#[derive(Clone)]
pub(crate) struct HttpConfig {
    pub usage_format: Arc<dyn UsageFormat>,
    pub inject_stream_usage: bool,
    pub max_request_body: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            usage_format: Arc::new(OpenAiAnthropic),
            inject_stream_usage: true,
            max_request_body: 4 * 1024 * 1024,
        }
    }
}

/// Applies [`HttpRatelimited`] to an `http::Request` service. Built with
/// [`RatelimitLayerBuilder::build_http`](crate::layer::RatelimitLayerBuilder::build_http).
pub struct HttpRatelimitLayer<X = FromRequest> {
    engine: Arc<Engine>,
    http: Arc<HttpConfig>,
    extractor: X,
}

impl<X> HttpRatelimitLayer<X> {
    pub(crate) fn new(engine: Arc<Engine>, http: Arc<HttpConfig>, extractor: X) -> Self {
        Self {
            engine,
            http,
            extractor,
        }
    }

    /// Every limit's limit, remaining and reset for `identifier`, read without taking
    /// anything.
    pub async fn usage(
        &self,
        identifier: impl AsRef<[u8]>,
    ) -> Result<Vec<LimitUsage>, crate::Error> {
        self.engine.usage(identifier.as_ref(), None).await
    }

    /// As [`usage`](Self::usage), for calls of `model`.
    pub async fn usage_for_model(
        &self,
        identifier: impl AsRef<[u8]>,
        model: &str,
    ) -> Result<Vec<LimitUsage>, crate::Error> {
        self.engine.usage(identifier.as_ref(), Some(model)).await
    }

    /// Give `identifier` a full budget on every limit and model (its state is deleted
    /// from the store, so every instance sees the reset) and drop its cached denials
    /// here. Waits as [`RatelimitLayer::reset`](crate::RatelimitLayer::reset) does.
    pub async fn reset(&self, identifier: impl AsRef<[u8]>) -> Result<(), crate::Error> {
        self.engine.reset(identifier.as_ref(), None).await
    }

    /// Give `identifier` a full budget on the limit named `limit`.
    pub async fn reset_limit(
        &self,
        identifier: impl AsRef<[u8]>,
        limit: &str,
    ) -> Result<(), crate::Error> {
        self.engine.reset(identifier.as_ref(), Some(limit)).await
    }

    /// Settlements waiting for the store to come back.
    pub fn pending_settlements(&self) -> usize {
        self.engine.queue.len()
    }

    /// Graceful shutdown: wait up to `deadline` for queued settlements to land. Returns
    /// how many are still pending (0: nothing was lost).
    pub async fn flush(&self, deadline: std::time::Duration) -> usize {
        self.engine.queue.flush(deadline).await
    }

    /// The names of the configured limits, in order.
    pub fn limit_names(&self) -> Vec<String> {
        self.engine
            .limits
            .iter()
            .map(|l| l.name.to_string())
            .collect()
    }
}

impl<X: Clone> Clone for HttpRatelimitLayer<X> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            http: self.http.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<X: std::fmt::Debug> std::fmt::Debug for HttpRatelimitLayer<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRatelimitLayer")
            .field("engine", &self.engine)
            .field("extractor", &self.extractor)
            .finish_non_exhaustive()
    }
}

impl<S, X: Clone> Layer<S> for HttpRatelimitLayer<X> {
    type Service = HttpRatelimited<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpRatelimited::new(
            inner,
            self.engine.clone(),
            self.http.clone(),
            self.extractor.clone(),
        )
    }
}
