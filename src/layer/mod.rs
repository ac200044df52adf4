//! The Tower middleware for any `Service<LlmRequest>` (or any request and response types
//! implementing [`TokenEstimate`](crate::TokenEstimate) and
//! [`ReportsUsage`](crate::ReportsUsage)): [`RatelimitLayer`] and [`Ratelimited`].
//!
//! Per call:
//!
//! 1. **Before dispatch**, one atomic store operation (one Redis round trip) evaluates every
//!    limit that applies to the call, all-or-nothing, however many there are: request
//!    limits take 1; token limits either check that some tokens remain
//!    ([`TokenMode::CheckRemaining`], the default) or reserve an estimate
//!    ([`TokenMode::Reserve`]); concurrency limits take a slot. If any limit denies,
//!    nothing is taken from any of them and the inner service is not called: the call
//!    fails with [`Error::RequestLimitReached`](crate::Error::RequestLimitReached), [`Error::TokenLimitReached`](crate::Error::TokenLimitReached) or
//!    [`Error::ConcurrencyLimitReached`](crate::Error::ConcurrencyLimitReached), naming the limit, with its `limit`,
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
//! # Many limits, scopes and tenants
//!
//! [`RatelimitLayerBuilder::limit`] adds a named [`Limit`](crate::Limit): e.g. 60
//! requests a minute *and* 1000 a day *and* 100k tokens a minute. A limit can apply per
//! identifier and model ([`Limit::per_model`](crate::Limit::per_model)) or only to some
//! models ([`Limit::models`](crate::Limit::models)), and count prompt, total or
//! weighted tokens ([`TokenCount`](crate::TokenCount)). Per-identifier quotas (tiers)
//! come from a [`QuotaResolver`](crate::QuotaResolver). With
//! [`wait_up_to`](RatelimitLayerBuilder::wait_up_to), a denied call whose budget comes
//! back soon enough waits for it (in arrival order among the calls waiting for that
//! budget) instead of failing.
//!
//! # `CheckRemaining` overshoot
//!
//! `CheckRemaining` lets a call pass while the identifier has any token
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

pub use future::ResponseFuture;
pub use layer::{RatelimitLayer, RatelimitLayerBuilder};
pub use service::Ratelimited;

pub use crate::engine::reliability::StoreErrorPolicy;
pub use crate::engine::{LimitUsage, MissingUsage, TokenMode};
