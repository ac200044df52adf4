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
//!
//! A call that passes counts `allowed` on each of its limits; a refused call counts
//! `denied` once, on the limit its refusal is named after (as its error and headers
//! are), whether the store, the denial cache or a quota of 0 refused it.
//! Tokens count as charged when their call settles, whether or not the write reaches the
//! store (one that a full settlement queue drops is counted by
//! `RatelimitLayer::dropped_settlements`).

use std::sync::Arc;
use std::time::Duration;

use super::reliability::StoreErrorPolicy;
use super::{Engine, Taken};
use crate::store::Decision;

/// A limit's metric keys, built once with the limit: recording a decision then looks
/// its counter up by reference, with no label allocation per call.
#[cfg(feature = "metrics")]
#[derive(Clone, Debug)]
pub(crate) struct LimitKeys {
    allowed: ::metrics::Key,
    denied: ::metrics::Key,
    tokens_charged: ::metrics::Key,
}

#[cfg(feature = "metrics")]
impl LimitKeys {
    pub(crate) fn new(name: &Arc<str>) -> Self {
        let limit = || ::metrics::Label::new("limit", ::metrics::SharedString::from(name.clone()));
        let decision = |outcome: &'static str| {
            ::metrics::Key::from_parts(
                "llm_ratelimit_decisions_total",
                vec![limit(), ::metrics::Label::new("outcome", outcome)],
            )
        };
        Self {
            allowed: decision("allowed"),
            denied: decision("denied"),
            tokens_charged: ::metrics::Key::from_parts(
                "llm_ratelimit_tokens_charged_total",
                vec![limit()],
            ),
        }
    }
}

/// What the `metrics` macros would attach to the counters registered by key here.
#[cfg(feature = "metrics")]
static METADATA: ::metrics::Metadata<'static> =
    ::metrics::Metadata::new(module_path!(), ::metrics::Level::INFO, Some(module_path!()));

/// One call's decision: `allowed` for every limit when the call passed; when it was
/// refused, `denied` for the one limit its refusal is named after (see
/// [`denying`](super::denying)).
#[cfg(feature = "metrics")]
pub(crate) fn decisions(engine: &Engine, taken: &[Taken], decisions: &[Decision], allowed: bool) {
    ::metrics::with_recorder(|recorder| {
        if allowed {
            for t in taken {
                let keys = &engine.limits[t.limit].metrics;
                recorder
                    .register_counter(&keys.allowed, &METADATA)
                    .increment(1);
            }
        } else if let Some(i) = super::denying(decisions) {
            let keys = &engine.limits[taken[i].limit].metrics;
            recorder
                .register_counter(&keys.denied, &METADATA)
                .increment(1);
        }
    });
}

/// A refusal decided without asking the store, named after limit `name`: answered from
/// the denial cache, or an identifier whose quota for the limit is 0.
#[cfg(feature = "metrics")]
pub(crate) fn denied_without_store(name: &str) {
    ::metrics::counter!(
        "llm_ratelimit_decisions_total",
        "limit" => name.to_owned(),
        "outcome" => "denied"
    )
    .increment(1);
}

#[cfg(feature = "metrics")]
pub(crate) fn tokens_charged(keys: &LimitKeys, units: u64) {
    if units > 0 {
        ::metrics::with_recorder(|recorder| {
            recorder
                .register_counter(&keys.tokens_charged, &METADATA)
                .increment(units)
        });
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

/// Settlements queued (positive) or written or given up (negative) by one queue: the
/// gauge moves by each queue's changes, so it reads the sum over every layer of the
/// process (setting it to one queue's length would hide the others').
#[cfg(feature = "metrics")]
pub(crate) fn pending_settlements_changed(by: i64) {
    let gauge = ::metrics::gauge!("llm_ratelimit_pending_settlements");
    if by >= 0 {
        gauge.increment(by as f64);
    } else {
        gauge.decrement(by.unsigned_abs() as f64);
    }
}

#[cfg(not(feature = "metrics"))]
pub(crate) fn decisions(_: &Engine, _: &[Taken], _: &[Decision], _: bool) {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn denied_without_store(_: &str) {}
#[cfg(not(feature = "metrics"))]
#[derive(Clone, Debug)]
pub(crate) struct LimitKeys;
#[cfg(not(feature = "metrics"))]
impl LimitKeys {
    pub(crate) fn new(_: &Arc<str>) -> Self {
        Self
    }
}
#[cfg(not(feature = "metrics"))]
pub(crate) fn tokens_charged(_: &LimitKeys, _: u64) {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn store_error() {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn store_latency(_: Duration) {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn fallback(_: StoreErrorPolicy) {}
#[cfg(not(feature = "metrics"))]
pub(crate) fn pending_settlements_changed(_: i64) {}
