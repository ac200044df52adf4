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
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, LimitExceeded};
use crate::store::Decision;

const SHARDS: usize = 16;
/// Identifiers per shard before expired entries are swept (and, if still full, all
/// dropped).
const MAX_PER_SHARD: usize = 8192;

struct Entry {
    /// The call's model: a denial is remembered for the calls it applies to.
    model: Option<String>,
    /// The entry is used until then.
    until: Instant,
    /// `Error::RequestLimitReached` or `Error::TokenLimitReached`.
    tokens: bool,
    exceeded: LimitExceeded,
    /// Every limit of the denied call as the store answered (a denial takes nothing, so
    /// this is each limit's state then): reported with the cached denial.
    decisions: Vec<Decision>,
    at: Instant,
}

pub(crate) struct DeniedCache {
    shards: Vec<Shard>,
    /// Per slot of identifiers (by hash), how many times their cached denials were
    /// dropped: a denial whose acquire began before a drop of its identifier (a refund,
    /// a charge or a reset that landed while the acquire was in flight) is not cached.
    forgotten: Box<[AtomicU64]>,
    hasher: Hasher,
    max_age: Duration,
}

/// Slots of [`DeniedCache::forgotten`]: identifiers that share one only cache a little
/// less often (a drop of either skips a denial of the other decided meanwhile).
const FORGET_SLOTS: usize = 1024;

/// Tags come from user identifiers: a randomly seeded hasher (foldhash, as the memory
/// store uses).
type Hasher = foldhash::fast::RandomState;

/// One shard: its identifiers, and how many there are, readable without the lock (most
/// calls find their shard empty and take no lock at all).
#[derive(Default)]
struct Shard {
    map: Mutex<HashMap<String, Vec<Entry>, Hasher>>,
    len: AtomicUsize,
}

/// A shard's map, locked; its length is published when the guard is dropped.
struct Locked<'a> {
    map: MutexGuard<'a, HashMap<String, Vec<Entry>, Hasher>>,
    len: &'a AtomicUsize,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SeqCst, with the loads in `occupied` and the epochs: see `record`.
        self.len.store(self.map.len(), Ordering::SeqCst);
    }
}

impl DeniedCache {
    pub(crate) fn new(max_age: Duration) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            forgotten: (0..FORGET_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: Hasher::default(),
            max_age,
        }
    }

    fn shard_of(&self, tag: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(tag) as usize % SHARDS]
    }

    fn forgotten_of(&self, tag: &str) -> &AtomicU64 {
        &self.forgotten[self.hasher.hash_one(tag) as usize % FORGET_SLOTS]
    }

    /// Taken when an acquire begins and passed to [`record`](Self::record) with its
    /// denial: tells whether `tag`'s denials were dropped meanwhile.
    pub(crate) fn epoch(&self, tag: &str) -> u64 {
        self.forgotten_of(tag).load(Ordering::SeqCst)
    }

    fn lock(shard: &Shard) -> Locked<'_> {
        Locked {
            map: shard.map.lock().unwrap_or_else(|p| p.into_inner()),
            len: &shard.len,
        }
    }

    /// The shard of `tag`, locked; `None` when it holds nothing (then no lock is taken).
    fn occupied(&self, tag: &str) -> Option<Locked<'_>> {
        Self::if_occupied(self.shard_of(tag))
    }

    /// `shard`, locked; `None` when it holds nothing (then no lock is taken).
    fn if_occupied(shard: &Shard) -> Option<Locked<'_>> {
        (shard.len.load(Ordering::SeqCst) > 0).then(|| Self::lock(shard))
    }

    /// Drop every entry of `tag`, and any denial of it being decided now.
    pub(crate) fn forget(&self, tag: &str) {
        // One hash for both (this runs for every call that takes or gives back units).
        let hash = self.hasher.hash_one(tag) as usize;
        self.forgotten[hash % FORGET_SLOTS].fetch_add(1, Ordering::SeqCst);
        if let Some(mut shard) = Self::if_occupied(&self.shards[hash % SHARDS]) {
            shard.map.remove(tag);
        }
    }

    fn remove(&self, tag: &str) {
        if let Some(mut shard) = self.occupied(tag) {
            shard.map.remove(tag);
        }
    }

    /// The denial still in force for a call of `tag` for `model`, if any, with every
    /// limit's decision as recorded (their times counted down to now).
    pub(crate) fn check(&self, tag: &str, model: Option<&str>) -> Option<(Error, Vec<Decision>)> {
        let mut shard = self.occupied(tag)?;
        let entries = shard.map.get_mut(tag)?;
        // The clock is read only for an identifier with cached denials (the rare case).
        let now = Instant::now();
        entries.retain(|e| e.until > now);
        let entry = entries.iter().find(|e| e.model.as_deref() == model);
        let error = entry.map(|entry| {
            let exceeded = LimitExceeded {
                remaining: 0,
                ..entry.exceeded.clone()
            };
            let error = if entry.tokens {
                Error::TokenLimitReached(exceeded)
            } else {
                Error::RequestLimitReached(exceeded)
            };
            let mut decisions = entry.decisions.clone();
            (
                counted_down(error, &mut decisions, now - entry.at),
                decisions,
            )
        });
        if entries.is_empty() {
            shard.map.remove(tag);
        }
        error
    }

    /// Remember `error` (a request- or token-limit denial, whose acquire answered
    /// `decisions`; `epoch` is [`epoch`](Self::epoch) when it began) for calls of `tag` for
    /// `model`, until its `retry_after` or the cache's max age, whichever is sooner.
    /// Nothing is remembered if `tag`'s denials were dropped since the acquire began.
    pub(crate) fn record(
        &self,
        tag: &str,
        model: Option<&str>,
        error: &Error,
        decisions: &[Decision],
        epoch: u64,
    ) {
        let (tokens, exceeded) = match error {
            Error::RequestLimitReached(e) => (false, e),
            Error::TokenLimitReached(e) => (true, e),
            _ => return,
        };
        let Some(wait) = exceeded.retry_after.filter(|d| *d > Duration::ZERO) else {
            return;
        };
        if self.max_age.is_zero() || self.epoch(tag) != epoch {
            return;
        }
        let now = Instant::now();
        {
            let mut shard = Self::lock(self.shard_of(tag));
            let shard = &mut *shard.map;
            if shard.len() >= MAX_PER_SHARD {
                shard.retain(|_, entries| entries.iter().any(|e| e.until > now));
                if shard.len() >= MAX_PER_SHARD {
                    shard.clear();
                }
            }
            let entries = shard.entry(tag.to_owned()).or_default();
            entries.retain(|e| e.model.as_deref() != model && e.until > now);
            // The entry reports every limit as the denial found it: not past the first
            // time one of them restores (a window rolls), where that would be wrong.
            let first_restored = decisions
                .iter()
                .map(|d| d.reset_after)
                .filter(|r| !r.is_zero())
                .min()
                .unwrap_or(Duration::MAX);
            entries.push(Entry {
                model: model.map(str::to_owned),
                until: now + wait.min(self.max_age).min(first_restored),
                tokens,
                exceeded: exceeded.clone(),
                decisions: decisions.to_vec(),
                at: now,
            });
        }
        // A drop racing this insert: every operation here is SeqCst, so either this
        // load sees its epoch, or its length load (after its epoch) sees the entry
        // published above (before this load) and removes it.
        if self.epoch(tag) != epoch {
            self.remove(tag);
        }
    }
}

/// A denial (`error`, and the `decisions` of every limit of the call) as it reads
/// `elapsed` after it was decided: every time counted down, a retry at least 1 µs away
/// (the denial has not lifted).
pub(crate) fn counted_down(
    mut error: Error,
    decisions: &mut [Decision],
    elapsed: Duration,
) -> Error {
    let retry = |r: Duration| r.saturating_sub(elapsed).max(Duration::from_micros(1));
    if let Error::RequestLimitReached(e)
    | Error::TokenLimitReached(e)
    | Error::ConcurrencyLimitReached(e) = &mut error
    {
        e.retry_after = e.retry_after.map(retry);
        e.reset_after = e.reset_after.saturating_sub(elapsed);
    }
    for d in decisions {
        d.retry_after = d.retry_after.map(retry);
        d.reset_after = d.reset_after.saturating_sub(elapsed);
    }
    error
}
