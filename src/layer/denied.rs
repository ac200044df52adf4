//! A local cache of identifiers known to be denied until a given instant, so the store
//! is not asked again for them (issue: fast paths). Only denials that nothing but time
//! can lift are cached: request-limit denials (requests are never given back) and
//! `CheckRemaining` token denials (the budget is spent; only time restores it).
//!
//! An entry lives until the denial's `retry_after` or the cache's `max_age` (1 s by
//! default), whichever is sooner: a reset or refund made by another process shows here
//! within `max_age`. A reset or refund made through this process drops the identifier's
//! entries at once.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, LimitExceeded};

const SHARDS: usize = 16;
/// Entries per shard before expired ones are swept (and, if still full, all dropped).
const MAX_PER_SHARD: usize = 8192;

struct Entry {
    /// The entry is used until then.
    until: Instant,
    /// The denial's own end (its `retry_after`), reported to callers.
    retry_at: Instant,
    name: &'static str,
    exceeded: LimitExceeded,
    at: Instant,
}

pub(crate) struct DeniedCache {
    shards: Vec<Mutex<HashMap<String, Entry>>>,
    hasher: RandomState,
    max_age: Duration,
}

impl DeniedCache {
    pub(crate) fn new(max_age: Duration) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            max_age,
        }
    }

    /// Drop every entry of `tag`.
    pub(crate) fn forget(&self, tag: &str) {
        self.shard(tag).remove(tag);
    }

    fn shard(&self, tag: &str) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        let i = self.hasher.hash_one(tag) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The denial still in force for `tag`, if any, with the time left.
    pub(crate) fn check(&self, tag: &str) -> Option<(&'static str, Error)> {
        let now = Instant::now();
        let mut shard = self.shard(tag);
        let entry = shard.get(tag)?;
        if entry.until <= now {
            shard.remove(tag);
            return None;
        }
        let elapsed = now - entry.at;
        let exceeded = LimitExceeded {
            remaining: 0,
            retry_after: Some(
                entry
                    .retry_at
                    .saturating_duration_since(now)
                    .max(Duration::from_micros(1)),
            ),
            reset_after: entry.exceeded.reset_after.saturating_sub(elapsed),
            ..entry.exceeded
        };
        let error = match entry.name {
            "tokens" => Error::TokenLimitReached(exceeded),
            _ => Error::RequestLimitReached(exceeded),
        };
        Some((entry.name, error))
    }

    /// Remember a denial of limit `name` for `tag` until its `retry_after`.
    pub(crate) fn record(&self, tag: &str, name: &'static str, exceeded: &LimitExceeded) {
        let Some(wait) = exceeded.retry_after.filter(|d| *d > Duration::ZERO) else {
            return;
        };
        if self.max_age.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut shard = self.shard(tag);
        if shard.len() >= MAX_PER_SHARD {
            shard.retain(|_, e| e.until > now);
            if shard.len() >= MAX_PER_SHARD {
                shard.clear();
            }
        }
        shard.insert(
            tag.to_owned(),
            Entry {
                until: now + wait.min(self.max_age),
                retry_at: now + wait,
                name,
                exceeded: *exceeded,
                at: now,
            },
        );
    }
}
