use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::ResponseFuture;
use crate::engine::Engine;
use crate::engine::call::{Call, CallRequest, Prepared};
use crate::error::{BoxError, Error};
use crate::identifier::ExtractIdentifier;
use crate::llm::{ReportsUsage, TokenEstimate};

/// A service rate-limited by a [`RatelimitLayer`](super::RatelimitLayer).
///
/// `poll_ready` forwards to the inner service. All clones share the limiter state.
pub struct Ratelimited<S, X> {
    inner: S,
    engine: Arc<Engine>,
    extractor: X,
}

impl<S: Clone, X: Clone> Clone for Ratelimited<S, X> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            engine: self.engine.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<S: std::fmt::Debug, X: std::fmt::Debug> std::fmt::Debug for Ratelimited<S, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ratelimited")
            .field("inner", &self.inner)
            .field("extractor", &self.extractor)
            .finish_non_exhaustive()
    }
}

impl<S, X> Ratelimited<S, X> {
    pub(crate) fn new(inner: S, engine: Arc<Engine>, extractor: X) -> Self {
        Self {
            inner,
            engine,
            extractor,
        }
    }

    crate::inner_service_accessors!();
}

impl<S, X, R> Service<R> for Ratelimited<S, X>
where
    S: Service<R> + Clone,
    S::Error: Into<BoxError>,
    S::Response: ReportsUsage,
    R: TokenEstimate,
    X: ExtractIdentifier<R>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| Error::Inner(e.into()))
    }

    fn call(&mut self, request: R) -> Self::Future {
        let engine = &self.engine;
        // Everything the call needs from the request's identifier is taken while the
        // request is borrowed (no copy of the identifier).
        let prepared = {
            let extracted = self.extractor.extract(&request);
            let identifier = match engine.identifier(extracted.as_deref()) {
                Ok(id) => id,
                Err(error) => return ResponseFuture::failed(error),
            };
            // Reserved in `Reserve` mode, and charged in any mode if the call is dropped.
            let estimate = if engine.has_token_limit() {
                request.estimated_usage()
            } else {
                None
            };
            Prepared::new(
                engine,
                CallRequest {
                    identifier,
                    model: request.model(),
                    estimate,
                },
            )
        };
        // The service that was driven to readiness goes into the future; this one keeps
        // a fresh clone (tower's usual pattern for deferred calls).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let call = Call::start(engine.clone(), ready, request, prepared);
        ResponseFuture::new(call)
    }
}
