//! The Tower middleware (SPEC §5): [`RatelimitLayer`] and [`Ratelimited`].
//!
//! Per call:
//!
//! 1. **Before dispatch**, one atomic store operation (one Redis round trip) evaluates all
//!    configured limits, all-or-nothing: the request limit takes 1; the token limit either
//!    checks that some tokens remain ([`TokenMode::CheckRemaining`], the default) or
//!    reserves an estimate ([`TokenMode::Reserve`]). If any limit denies, nothing is
//!    taken from any of them and the inner service is not called: the call fails with
//!    [`Error::RequestLimitReached`](crate::Error::RequestLimitReached) or
//!    [`Error::TokenLimitReached`](crate::Error::TokenLimitReached), with `limit`,
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
//!   counts. A denial is an [`Error`](crate::Error) the retry policy can inspect
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

mod future;
#[allow(clippy::module_inception)]
mod layer;
mod service;
mod settlement;

pub use future::ResponseFuture;
pub use layer::{RatelimitLayer, RatelimitLayerBuilder};
pub use service::Ratelimited;

use std::sync::Arc;

use crate::algorithm::{Algorithm, MAX_UNITS};
use crate::llm::Usage;
use crate::store::Store;

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
    pub requests: Option<LimitConfig>,
    pub tokens: Option<LimitConfig>,
    pub token_mode: TokenMode,
    pub include_output_tokens: bool,
    pub cost_fn: Option<CostFn>,
    pub missing_usage: MissingUsage,
    pub default_estimate: u64,
    pub fallback_identifier: Option<Vec<u8>>,
}

impl Limits {
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
