//! The workloads the in-process benchmarks share, so that criterion's wall-clock numbers
//! (`benches/memory_store.rs`, `benches/vs_governor.rs`) and the instruction counts of
//! `examples/layer_instructions.rs` measure the very same thing.

// Each includer uses a part.
#![allow(dead_code)]

use std::convert::Infallible;
use std::fmt::Debug;
use std::time::Duration;

use tower::{Service, ServiceExt};

use tower_llm_ratelimit::store::{identifier_tag, state_key};
use tower_llm_ratelimit::{
    Algorithm, FixedWindow, Limit, LlmRequest, LlmResponse, RatelimitLayer, SlidingWindow,
    TokenBucket, Usage,
};

/// Identifiers a keyed workload spreads over.
pub const KEYS: usize = 100;

/// Quotas large enough that every decision is allowed.
pub const NEVER_DENIES: u64 = 1 << 40;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// One state key per identifier, as the layer builds them.
pub fn keys() -> Vec<String> {
    (0..KEYS)
        .map(|i| {
            let tag = identifier_tag(format!("user-{i}").as_bytes()).expect("a valid identifier");
            state_key("bench", &tag)
        })
        .collect()
}

/// Each algorithm, by name, with a quota that never denies.
pub fn algorithms() -> [(&'static str, Algorithm); 3] {
    [
        (
            "fixed",
            FixedWindow::new(NEVER_DENIES, HOUR).unwrap().into(),
        ),
        (
            "sliding",
            SlidingWindow::new(NEVER_DENIES, HOUR).unwrap().into(),
        ),
        (
            "bucket",
            TokenBucket::new(NEVER_DENIES, 1 << 30, HOUR)
                .unwrap()
                .into(),
        ),
    ]
}

/// governor's keyed limiter with a quota that never denies.
pub fn governor_quota() -> governor::Quota {
    governor::Quota::per_second(std::num::NonZeroU32::MAX)
}

/// The inner service: answers at once, reporting 1 prompt and 1 completion token.
pub async fn answer(_: LlmRequest) -> Result<LlmResponse, Infallible> {
    Ok(LlmResponse {
        text: String::new(),
        usage: Some(Usage::new(1, 1)),
    })
}

/// One request limit.
pub fn requests_only() -> RatelimitLayer {
    RatelimitLayer::builder()
        .request_limit(FixedWindow::new(NEVER_DENIES, HOUR).unwrap())
        .build()
        .unwrap()
}

/// A request limit and a token limit (charged after the call).
pub fn requests_and_tokens() -> RatelimitLayer {
    RatelimitLayer::builder()
        .request_limit(FixedWindow::new(NEVER_DENIES, HOUR).unwrap())
        .token_limit(SlidingWindow::new(NEVER_DENIES, HOUR).unwrap())
        .build()
        .unwrap()
}

/// Two request windows and two token windows.
pub fn four_limits() -> RatelimitLayer {
    RatelimitLayer::builder()
        .limit(
            "rpm",
            Limit::requests(FixedWindow::new(NEVER_DENIES, HOUR).unwrap()),
        )
        .limit(
            "rpd",
            Limit::requests(FixedWindow::new(NEVER_DENIES, DAY).unwrap()),
        )
        .limit(
            "tpm",
            Limit::tokens(SlidingWindow::new(NEVER_DENIES, HOUR).unwrap()),
        )
        .limit(
            "tpd",
            Limit::tokens(FixedWindow::new(NEVER_DENIES, DAY).unwrap()),
        )
        .build()
        .unwrap()
}

/// One call through `svc`, as the layer benchmarks time it: wait until ready, call, and
/// take the answer.
#[inline(always)]
pub fn call_once<S>(rt: &tokio::runtime::Runtime, svc: &mut S, request: &LlmRequest) -> LlmResponse
where
    S: Service<LlmRequest, Response = LlmResponse>,
    S::Error: Debug,
{
    rt.block_on(async {
        svc.ready()
            .await
            .unwrap()
            .call(request.clone())
            .await
            .unwrap()
    })
}
