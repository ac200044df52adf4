//! Metrics through the `metrics` facade (feature `metrics`; the application installs
//! the recorder/exporter). Without the feature every function here is a no-op.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `llm_ratelimit_decisions_total` | counter | `limit`, `outcome` (`allowed` \| `denied`) |
//! | `llm_ratelimit_tokens_charged_total` | counter | `limit` |
//! | `llm_ratelimit_store_errors_total` | counter | |
//! | `llm_ratelimit_store_latency_seconds` | histogram | |
//! | `llm_ratelimit_fallback_decisions_total` | counter | `policy` (`open` \| `local`) |
//! | `llm_ratelimit_pending_settlements` | gauge | |

use std::sync::Arc;
use std::time::Duration;

use super::reliability::StoreErrorPolicy;
use super::{Engine, Taken};
use crate::store::Decision;

/// One call's decision: `allowed` for every limit when the call passed, `denied` for
/// each limit that refused it (the others took nothing and are not counted).
#[cfg(feature = "metrics")]
pub(crate) fn decisions(engine: &Engine, taken: &[Taken], decisions: &[Decision], allowed: bool) {
    for (t, d) in taken.iter().zip(decisions) {
        let outcome = match (allowed, d.allowed) {
            (true, _) => "allowed",
            (false, false) => "denied",
            (false, true) => continue,
        };
        ::metrics::counter!(
            "llm_ratelimit_decisions_total",
            // The name is shared (an `Arc<str>`): no copy per decision.
            "limit" => ::metrics::SharedString::from(engine.limits[t.limit].name.clone()),
            "outcome" => outcome
        )
        .increment(1);
    }
}

/// A denial answered from the denial cache, for limit `name`.
#[cfg(feature = "metrics")]
pub(crate) fn cached_denial(name: &str) {
    ::metrics::counter!(
        "llm_ratelimit_decisions_total",
        "limit" => name.to_owned(),
        "outcome" => "denied"
    )
    .increment(1);
}

#[cfg(feature = "metrics")]
pub(crate) fn tokens_charged(name: &Arc<str>, units: u64) {
    if units > 0 {
        ::metrics::counter!(
            "llm_ratelimit_tokens_charged_total",
            "limit" => ::metrics::SharedString::from(name.clone())
        )
        .increment(units);
    }
}

#[cfg(feature = "metrics")]
pub(crate) fn store_error() {
    ::metrics::counter!("llm_ratelimit_store_errors_total").increment(1);
}

#[cfg(feature = "metrics")]
pub(crate) fn store_latency(took: Duration) {
    ::metrics::histogram!("llm_ratelimit_store_latency_seconds").record(took.as_secs_f64());
}

#[cfg(feature = "metrics")]
pub(crate) fn fallback(policy: StoreErrorPolicy) {
    let policy = match policy {
        StoreErrorPolicy::FailOpen => "open",
        StoreErrorPolicy::Local => "local",
        _ => return,
    };
    ::metrics::counter!("llm_ratelimit_fallback_decisions_total", "policy" => policy).increment(1);
}

#[cfg(feature = "metrics")]
pub(crate) fn pending_settlements(pending: usize) {
    ::metrics::gauge!("llm_ratelimit_pending_settlements").set(pending as f64);
}

#[cfg(not(feature = "metrics"))]
pub(crate) fn decisions(_: &Engine, _: &[Taken], _: &[Decision], _: bool) {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn cached_denial(_: &str) {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn tokens_charged(_: &Arc<str>, _: u64) {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn store_error() {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn store_latency(_: Duration) {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn fallback(_: StoreErrorPolicy) {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn pending_settlements(_: usize) {}
