//! The Tower middleware (SPEC §5): [`RatelimitLayer`] and [`Ratelimited`].
//!
//! Per call:
//!
//! 1. **Before dispatch**, one atomic store operation (one Redis round trip) evaluates all
//!    configured limits, all-or-nothing: the request limit takes 1; the token limit either
//!    checks that some tokens remain ([`TokenMode::CheckRemaining`], the default) or
//!    reserves an estimate ([`TokenMode::Reserve`]). If any limit denies, nothing is
//!    taken from any of them and the inner service is not called: the call fails with
//!    [`Error::RequestLimitReached`] or
//!    [`Error::TokenLimitReached`], with `limit`,
//!    `remaining` and `retry_after`.
//! 2. **After the response**, the reported usage (prompt tokens; prompt + completion with
//!    [`include_output_tokens`](RatelimitLayerBuilder::include_output_tokens); or a
//!    [`cost function`](RatelimitLayerBuilder::cost_fn)) minus the reservation is
//!    charged, or the difference refunded, before the response is handed back, so the
//!    caller's next call sees it. This happens exactly once per call on every path: on
//!    success, on an inner error (the reservation is refunded), and when the caller drops
//!    the future (the reservation is refunded in the background).
//! 3. A response **without usage** is still delivered: the reservation (if any) stays
//!    charged, and a `tracing` warning is emitted ([`MissingUsage`]).
//!
//! # `CheckRemaining` overshoot
//!
//! `CheckRemaining` is the seed's rule: a call passes while the identifier has any token
//! left, and its usage is charged afterwards. Calls running at the same time all see
//! tokens left, so the budget can be overshot by at most
//! (calls in flight) × (largest call's usage). The overshoot is recorded as debt, which
//! blocks the identifier until time pays it back. Use [`TokenMode::Reserve`] for a hard
//! cap: each call reserves its estimate up front and is settled to its real usage after.
//!
//! # Composition with timeouts and retries
//!
//! The layer counts one request per call *that reaches it*:
//!
//! * `ServiceBuilder::new().layer(ratelimit).layer(RetryLayer::new(..))`: the rate limit
//!   is outside the retries, so one logical call counts one request however many
//!   attempts the retry layer makes.
//! * `ServiceBuilder::new().layer(RetryLayer::new(..)).layer(ratelimit)`: each attempt
//!   counts. A denial is an [`Error`] the retry policy can inspect
//!   ([`Error::retry_after`](crate::Error::retry_after)).
//!
//! A `TimeoutLayer` outside the rate limit that fires drops the call's future: the
//! reservation is refunded, the request stays counted.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_llm_ratelimit::BoxError> {
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_llm_ratelimit::{
//!     FixedWindow, LlmRequest, LlmResponse, RatelimitLayer, SlidingWindow, Usage,
//! };
//!
//! let layer = RatelimitLayer::builder()
//!     .request_limit(FixedWindow::new(10, Duration::from_secs(60))?)
//!     .token_limit(SlidingWindow::new(1000, Duration::from_secs(60))?)
//!     .build()?;
//! let llm = service_fn(|req: LlmRequest| async move {
//!     Ok::<_, std::convert::Infallible>(LlmResponse {
//!         text: format!("echo: {}", req.prompt),
//!         usage: Some(Usage::new(12, 30)),
//!     })
//! });
//! let service = ServiceBuilder::new().layer(layer).service(llm);
//! let response = service.oneshot(LlmRequest::new("user-1", "hello")).await?;
//! assert_eq!(response.text, "echo: hello");
//! # Ok(())
//! # }
//! ```

pub(crate) mod denied;
mod future;
#[allow(clippy::module_inception)]
mod layer;
pub(crate) mod reliability;
mod service;
pub(crate) mod settlement;

pub use future::ResponseFuture;
pub use layer::{RatelimitLayer, RatelimitLayerBuilder};

pub use reliability::StoreErrorPolicy;
pub use service::Ratelimited;

use std::sync::Arc;

use crate::algorithm::{Algorithm, MAX_UNITS};
use crate::error::{Error, LimitExceeded};
use crate::llm::Usage;
use crate::store::{Decision, LimitCheck, Store, state_key};

/// How the token limit is applied before a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TokenMode {
    /// The seed's rule: allowed iff the identifier has any tokens left; usage is charged
    /// after the call. Concurrent calls can overshoot (see the module docs).
    #[default]
    CheckRemaining,
    /// Reserve the request's estimate before the call (allowed iff it fits), settle to the
    /// real usage after it. A hard cap under concurrency.
    Reserve,
}

/// What to charge when a response reports no usage. The response is always delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingUsage {
    /// Keep the reservation charged (nothing when there was none), with a warning.
    #[default]
    ChargeReservation,
    /// Refund the reservation, with a warning.
    ChargeNothing,
    /// Charge this many tokens in place of usage, with a warning.
    ChargeFixed(u64),
}

/// One limit's state for one identifier, as [`RatelimitLayer::usage`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitUsage {
    /// `"requests"`, `"tokens"` or `"concurrency"`.
    pub name: &'static str,
    /// The quota.
    pub limit: u64,
    /// Units left (0 while in debt).
    pub remaining: u64,
    /// Time until the budget is fully restored (fixed window: until it rolls).
    pub reset_after: std::time::Duration,
}

/// A function from reported usage to the tokens to charge.
pub type CostFn = Arc<dyn Fn(&Usage) -> u64 + Send + Sync>;

/// One configured limit: algorithm and key prefix.
#[derive(Clone, Debug)]
pub(crate) struct LimitConfig {
    pub algorithm: Algorithm,
    pub prefix: String,
}

/// Everything the middleware shares across clones.
pub(crate) struct Limits {
    pub store: Arc<dyn Store>,
    /// The store is in-process: no timeouts, breaker or fallback needed.
    pub store_is_local: bool,
    pub requests: Option<LimitConfig>,
    pub tokens: Option<LimitConfig>,
    pub concurrency: Option<LimitConfig>,
    pub store_timeout: std::time::Duration,
    pub on_store_error: StoreErrorPolicy,
    /// Decides under [`StoreErrorPolicy::Local`].
    pub local: crate::store::MemoryStore,
    pub breaker: reliability::Breaker,
    pub queue: Arc<reliability::SettlementQueue>,
    /// Identifiers known to be denied until a given instant; `None` when turned off.
    pub denied: Option<denied::DeniedCache>,
    pub token_mode: TokenMode,
    pub include_output_tokens: bool,
    pub cost_fn: Option<CostFn>,
    pub missing_usage: MissingUsage,
    pub default_estimate: u64,
    pub fallback_identifier: Option<Vec<u8>>,
    pub http: HttpConfig,
}

/// Settings only the HTTP service uses.
#[derive(Clone)]
pub(crate) struct HttpConfig {
    pub usage_format: Arc<dyn crate::http::UsageFormat>,
    pub inject_stream_usage: bool,
    pub max_request_body: usize,
}

/// A limit a call takes from, as the settlement needs to know it afterwards.
#[derive(Clone, Debug)]
pub(crate) struct Taken {
    /// Position of its check in [`Plan::checks`] (and of its decision).
    pub index: usize,
    pub key: String,
    pub algorithm: Algorithm,
    /// Concurrency: this call's slot id; else 0.
    pub slot: u64,
    /// The window that paid, once the acquire answered (fixed and sliding windows).
    pub window: Option<i64>,
}

/// The store operation for one call, before dispatch.
pub(crate) struct Plan {
    pub tag: String,
    pub checks: Vec<LimitCheck>,
    pub request: Option<Taken>,
    pub tokens: Option<Taken>,
    pub slot: Option<Taken>,
    pub reserved: u64,
}

impl Limits {
    /// The hash tag of the request's identifier, or of the fallback identifier when the
    /// request has none.
    pub(crate) fn tag_for(&self, identifier: Option<&[u8]>) -> Result<String, Error> {
        match (identifier, &self.fallback_identifier) {
            (Some(id), _) => crate::store::identifier_tag(id),
            (None, Some(fallback)) => crate::store::identifier_tag(fallback),
            (None, None) => Err(Error::MissingIdentifier),
        }
    }

    /// The checks for one call of the identifier with hash tag `tag`; `estimate` is
    /// asked for only in `Reserve` mode.
    pub(crate) fn plan(&self, tag: &str, estimate: impl FnOnce() -> Option<u64>) -> Plan {
        let mut checks = Vec::with_capacity(3);
        let mut push = |config: &LimitConfig, cost: u64, take: bool, slot: u64| {
            let key = state_key(&config.prefix, tag);
            let taken = Taken {
                index: checks.len(),
                key: key.clone(),
                algorithm: config.algorithm,
                slot,
                window: None,
            };
            checks.push(LimitCheck {
                key,
                algorithm: config.algorithm,
                cost,
                take,
                slot,
            });
            taken
        };
        let request = self.requests.as_ref().map(|r| push(r, 1, true, 0));
        let mut reserved = 0;
        let tokens = self.tokens.as_ref().map(|tokens| {
            let (cost, take) = match self.token_mode {
                // "Allowed iff remaining > 0" is "a cost of 1 fits", without taking it.
                TokenMode::CheckRemaining => (1, false),
                TokenMode::Reserve => {
                    reserved = estimate()
                        .unwrap_or(self.default_estimate)
                        .clamp(1, MAX_UNITS);
                    (reserved, true)
                }
            };
            push(tokens, cost, take, 0)
        });
        let slot = self
            .concurrency
            .as_ref()
            .map(|c| push(c, 1, true, reliability::next_id()));
        Plan {
            tag: tag.to_owned(),
            checks,
            request,
            tokens,
            slot,
            reserved,
        }
    }

    /// The error for a denied acquire: the request limit if it denied, else the token
    /// limit. Also says which (`"requests"` or `"tokens"`).
    pub(crate) fn denial(&self, decisions: &[Decision]) -> (&'static str, Error) {
        let mut index = 0;
        let mut denied = |configured: bool| -> Option<LimitExceeded> {
            if !configured {
                return None;
            }
            let d = decisions.get(index)?;
            index += 1;
            (!d.allowed).then_some(LimitExceeded {
                limit: d.limit,
                remaining: d.remaining,
                retry_after: d.retry_after,
                reset_after: d.reset_after,
            })
        };
        let requests = denied(self.requests.is_some());
        let tokens = denied(self.tokens.is_some());
        let concurrency = denied(self.concurrency.is_some());
        match (requests, tokens, concurrency) {
            (Some(l), _, _) => ("requests", Error::RequestLimitReached(l)),
            (None, Some(l), _) => ("tokens", Error::TokenLimitReached(l)),
            (None, None, Some(l)) => ("concurrency", Error::ConcurrencyLimitReached(l)),
            (None, None, None) => (
                "requests",
                Error::Store(crate::error::StoreError::new(
                    "store denied without a denying decision",
                )),
            ),
        }
    }

    /// Remember a denial that only time can lift (see [`denied`]).
    pub(crate) fn remember_denial(&self, tag: &str, name: &'static str, error: &Error) {
        let cacheable = match name {
            "requests" => true,
            "tokens" => self.token_mode == TokenMode::CheckRemaining,
            _ => false,
        };
        if let (true, Some(cache), Some(exceeded)) =
            (cacheable, &self.denied, error.limit_exceeded())
        {
            cache.record(tag, name, exceeded);
        }
    }

    /// A cached denial still in force for `tag`.
    pub(crate) fn cached_denial(&self, tag: &str) -> Option<(&'static str, Error)> {
        self.denied.as_ref()?.check(tag)
    }

    /// Every configured limit as `(name, config)`, in decision order.
    fn configured(&self) -> impl Iterator<Item = (&'static str, &LimitConfig)> + '_ {
        [
            ("requests", &self.requests),
            ("tokens", &self.tokens),
            ("concurrency", &self.concurrency),
        ]
        .into_iter()
        .filter_map(|(name, c)| c.as_ref().map(|c| (name, c)))
    }

    /// Forget everything every limit holds for `identifier` (a full budget again) and
    /// drop its cached denials.
    pub(crate) async fn reset(&self, identifier: &[u8]) -> Result<(), Error> {
        let tag = crate::store::identifier_tag(identifier)?;
        let keys = self
            .configured()
            .map(|(_, c)| state_key(&c.prefix, &tag))
            .collect();
        self.forget_denials(&tag);
        let result = self.store.delete(keys).await;
        // A denial cached while the delete was in flight is stale too.
        self.forget_denials(&tag);
        Ok(result?)
    }

    /// Every limit's state for `identifier`, read without taking anything.
    pub(crate) async fn usage(&self, identifier: &[u8]) -> Result<Vec<LimitUsage>, Error> {
        let tag = crate::store::identifier_tag(identifier)?;
        let names: Vec<&'static str> = self.configured().map(|(n, _)| n).collect();
        let checks = self
            .configured()
            .map(|(_, c)| LimitCheck {
                key: state_key(&c.prefix, &tag),
                algorithm: c.algorithm,
                cost: 0,
                take: false,
                slot: 0,
            })
            .collect();
        let decisions = self.store.acquire(checks).await?;
        Ok(names
            .into_iter()
            .zip(decisions)
            .map(|(name, d)| LimitUsage {
                name,
                limit: d.limit,
                remaining: d.remaining,
                reset_after: d.reset_after,
            })
            .collect())
    }

    /// Drop `tag`'s cached denials: budget was given back through this process.
    pub(crate) fn forget_denials(&self, tag: &str) {
        if let Some(cache) = &self.denied {
            cache.forget(tag);
        }
    }

    /// `(name, period)` of each configured limit, in decision order.
    pub(crate) fn names(&self) -> impl Iterator<Item = (&'static str, std::time::Duration)> + '_ {
        self.requests
            .iter()
            .map(|l| ("requests", l.algorithm.period()))
            .chain(self.tokens.iter().map(|l| ("tokens", l.algorithm.period())))
            .chain(
                self.concurrency
                    .iter()
                    .map(|l| ("concurrency", l.algorithm.period())),
            )
    }

    /// Tokens to charge for a reported usage, clamped to [`MAX_UNITS`] with a warning.
    pub(crate) fn tokens_for(&self, usage: &Usage) -> u64 {
        let tokens = match &self.cost_fn {
            Some(f) => f(usage),
            None if self.include_output_tokens => {
                usage.prompt_tokens.saturating_add(usage.completion_tokens)
            }
            None => usage.prompt_tokens,
        };
        if tokens > MAX_UNITS {
            tracing::warn!(
                tokens,
                max = MAX_UNITS,
                "reported usage is absurdly large; charging the maximum"
            );
            MAX_UNITS
        } else {
            tokens
        }
    }
}
