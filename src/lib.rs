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
#![warn(missing_docs)]

pub mod algorithm;
mod error;
pub mod http;
pub mod identifier;
pub mod layer;
mod llm;
mod ratelimit;
pub mod store;

pub use algorithm::{Algorithm, ConcurrencyLimit, FixedWindow, SlidingWindow, TokenBucket};
pub use error::{BoxError, Error, ErrorKind, LimitExceeded, StoreError};
pub use http::{HttpRatelimitLayer, HttpRatelimited};
pub use layer::{
    LimitUsage, MissingUsage, RatelimitLayer, Ratelimited, StoreErrorPolicy, TokenMode,
};
pub use llm::{
    HasIdentifier, LlmRequest, LlmResponse, ReportsUsage, TokenEstimate, Usage,
    estimate_prompt_tokens,
};
pub use ratelimit::Ratelimit;
pub use store::{Decision, ManualClock, MemoryStore, Store};
#[cfg(feature = "redis")]
pub use store::{RedisOptions, RedisStore};

/// The README's code blocks, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
