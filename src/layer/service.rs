use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::settlement::Settlement;
use super::{Limits, ResponseFuture};
use crate::error::{BoxError, Error};
use crate::identifier::ExtractIdentifier;
use crate::llm::{ReportsUsage, TokenEstimate};

/// A service rate-limited by a [`RatelimitLayer`](super::RatelimitLayer).
///
/// `poll_ready` forwards to the inner service. All clones share the limiter state.
pub struct Ratelimited<S, X> {
    inner: S,
    limits: Arc<Limits>,
    extractor: X,
}

impl<S: Clone, X: Clone> Clone for Ratelimited<S, X> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limits: self.limits.clone(),
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
        let tag = match self
            .limits
            .tag_for(self.extractor.extract(&request).as_deref())
        {
            Ok(tag) => tag,
            Err(error) => return ResponseFuture::failed(error),
        };
        let limits = &self.limits;
        if let Some((_, error)) = limits.cached_denial(&tag) {
            return ResponseFuture::failed(error);
        }
        let plan = limits.plan(&tag, || request.estimated_tokens());
        let settlement = Settlement::new(limits.clone(), plan);
        // The service that was driven to readiness goes into the future; this one keeps
        // a fresh clone (tower's usual pattern for deferred calls).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::acquiring(ready, request, settlement, limits.clone(), tag)
    }
}
