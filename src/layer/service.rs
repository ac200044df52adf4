use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::settlement::Settlement;
use super::{Limits, ResponseFuture, TokenMode};
use crate::algorithm::MAX_UNITS;
use crate::error::{BoxError, Error};
use crate::identifier::ExtractIdentifier;
use crate::llm::{ReportsUsage, TokenEstimate};
use crate::store::{LimitCheck, identifier_tag, state_key};

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
        let tag = match self.extractor.extract(&request) {
            Some(id) => identifier_tag(&id),
            None => match &self.limits.fallback_identifier {
                Some(id) => identifier_tag(id),
                None => Err(Error::MissingIdentifier),
            },
        };
        let tag = match tag {
            Ok(tag) => tag,
            Err(error) => return ResponseFuture::failed(error),
        };
        let limits = &self.limits;
        let mut checks = Vec::with_capacity(2);
        if let Some(requests) = &limits.requests {
            checks.push(LimitCheck {
                key: state_key(&requests.prefix, &tag),
                algorithm: requests.algorithm,
                cost: 1,
                take: true,
            });
        }
        let mut reserved = 0;
        let token_key = limits.tokens.as_ref().map(|tokens| {
            let key = state_key(&tokens.prefix, &tag);
            let (cost, take) = match limits.token_mode {
                // "Allowed iff remaining > 0" is "a cost of 1 fits", without taking it.
                TokenMode::CheckRemaining => (1, false),
                TokenMode::Reserve => {
                    let estimate = request
                        .estimated_tokens()
                        .unwrap_or(limits.default_estimate)
                        .clamp(1, MAX_UNITS);
                    reserved = estimate;
                    (estimate, true)
                }
            };
            checks.push(LimitCheck {
                key: key.clone(),
                algorithm: tokens.algorithm,
                cost,
                take,
            });
            key
        });
        let acquire = limits.store.acquire(checks);
        let settlement = Settlement::new(limits.clone(), token_key, reserved, acquire);
        // The service that was driven to readiness goes into the future; this one keeps
        // a fresh clone (tower's usual pattern for deferred calls).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::acquiring(ready, request, settlement, limits.clone(), tag)
    }
}
