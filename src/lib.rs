//! Rate-limit LLM calls per user or API key, by request count and by token count, as a
//! Tower middleware, with state in Redis (Lua scripts, shared by every instance) or in
//! memory.
//!
//! * [`Ratelimit`]: one limit ([`FixedWindow`], [`SlidingWindow`] or [`TokenBucket`]) in a
//!   store, per identifier: `limit`, `remaining`, `charge`, `refund`, `reset`,
//!   `block_until_ready`.
//! * [`RatelimitLayer`]: the middleware for any `Service<LlmRequest>` (or any request and
//!   response types implementing [`TokenEstimate`] and [`ReportsUsage`]): a request limit
//!   and a token limit, checked in one atomic store operation before the call and
//!   settled to the reported usage after it.
//! * Stores: [`MemoryStore`] (default) and [`RedisStore`] (feature `redis`, on by
//!   default).
//!
//! See the [`layer`] module for the per-call semantics, and the README for a tour.
#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// `get_ref`, `get_mut` and `into_inner` for a service wrapper whose inner service is
/// the field `inner`.
macro_rules! inner_service_accessors {
    () => {
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
    };
}
pub(crate) use inner_service_accessors;

pub mod algorithm;
mod engine;
mod error;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod identifier;
pub mod layer;
mod llm;
mod ratelimit;
pub mod store;

pub use algorithm::{Algorithm, ConcurrencyLimit, FixedWindow, SlidingWindow, TokenBucket};
pub use engine::limit::{Limit, LimitKind, TokenCount, TokenWeights, Weights};
pub use engine::quota::{
    CachedQuotas, QuotaFn, QuotaFuture, QuotaResolver, Quotas, Resolution, StaticQuotas, quota_fn,
};
pub use error::{BoxError, Error, ErrorKind, LimitExceeded, StoreError};
#[cfg(feature = "http")]
pub use http::{HttpRatelimitLayer, HttpRatelimited};
pub use layer::{
    LimitUsage, MissingUsage, RatelimitLayer, Ratelimited, StoreErrorPolicy, TokenMode,
};
pub use llm::{
    HasIdentifier, LlmRequest, LlmResponse, ReportsUsage, TokenEstimate, Usage,
    estimate_prompt_tokens,
};
pub use ratelimit::Ratelimit;
pub use store::{Decision, ManualClock, MemoryStore, Rule, Store};
#[cfg(feature = "redis")]
pub use store::{RedisOptions, RedisStore};

/// The README's code blocks, compiled as doctests.
#[cfg(all(doctest, feature = "redis", feature = "http"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
