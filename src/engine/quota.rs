//! Tenants: per-identifier quotas (tiers, overrides) from a resolver the application
//! supplies. A changed quota applies on the identifier's next call, without a restart,
//! and keeps what was already used (the state lives under the same key whatever the
//! quota).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// Tokio's clock, so that a runtime with paused time (tests) moves it too.
use tokio::time::Instant;

/// Quotas by limit name, replacing the configured ones for one identifier (a tier).
/// Limits not named keep their configured quota.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quotas(HashMap<String, u64>);

impl Quotas {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the quota of the limit named `limit` (units per window, bucket capacity, or
    /// most calls in flight).
    ///
    /// A token bucket's refill is scaled by the same factor (to the nearest unit, at
    /// least 1), so that its bucket refills in the same time: a bucket of 2 refilled by 2
    /// a second, given a quota of 10, is refilled by 10 a second. A quota of 0 suspends
    /// the identifier: its calls are refused by that limit. A quota above
    /// [`MAX_UNITS`](crate::algorithm::MAX_UNITS) is taken as `MAX_UNITS` (so `u64::MAX`
    /// reads as "unlimited").
    pub fn set(mut self, limit: impl Into<String>, quota: u64) -> Self {
        self.0.insert(limit.into(), quota);
        self
    }

    /// The quota set for `limit`, if any.
    pub fn get(&self, limit: &str) -> Option<u64> {
        self.0.get(limit).copied()
    }

    /// Whether no quota is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>> FromIterator<(K, u64)> for Quotas {
    fn from_iter<I: IntoIterator<Item = (K, u64)>>(iter: I) -> Self {
        Self(iter.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

/// A boxed future resolving one identifier's quotas.
pub type QuotaFuture = Pin<Box<dyn Future<Output = Option<Arc<Quotas>>> + Send + 'static>>;

/// The answer of a [`QuotaResolver`]: at once (tables, caches), or later (a lookup).
#[non_exhaustive]
pub enum Resolution {
    /// Known now; `None`: the configured quotas apply.
    Ready(Option<Arc<Quotas>>),
    /// Known when the future completes.
    Pending(QuotaFuture),
}

impl std::fmt::Debug for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resolution::Ready(q) => f.debug_tuple("Ready").field(q).finish(),
            Resolution::Pending(_) => f.write_str("Pending(..)"),
        }
    }
}

/// Where per-identifier quotas come from. Asked before every call; keep it fast (use
/// [`CachedQuotas`] around a slow lookup).
pub trait QuotaResolver: Send + Sync + 'static {
    /// The quotas of `identifier` (the raw identifier the extractor returned, or the
    /// fallback identifier).
    fn resolve(&self, identifier: &[u8]) -> Resolution;
}

/// A fixed table: identifier → quotas. Build a new one to change it.
#[derive(Clone, Debug, Default)]
pub struct StaticQuotas {
    table: HashMap<Vec<u8>, Arc<Quotas>>,
}

impl StaticQuotas {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// `identifier` gets `quotas`.
    pub fn insert(mut self, identifier: impl AsRef<[u8]>, quotas: Quotas) -> Self {
        self.table
            .insert(identifier.as_ref().to_vec(), Arc::new(quotas));
        self
    }
}

impl QuotaResolver for StaticQuotas {
    fn resolve(&self, identifier: &[u8]) -> Resolution {
        Resolution::Ready(self.table.get(identifier).cloned())
    }
}

/// A resolver from a closure, asked synchronously on every call.
pub struct QuotaFn<F>(F);

/// Quotas from `f(identifier)`, asked on every call (so a change applies at once).
pub fn quota_fn<F>(f: F) -> QuotaFn<F>
where
    F: Fn(&[u8]) -> Option<Quotas> + Send + Sync + 'static,
{
    QuotaFn(f)
}

impl<F> std::fmt::Debug for QuotaFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuotaFn(..)")
    }
}

impl<F> QuotaResolver for QuotaFn<F>
where
    F: Fn(&[u8]) -> Option<Quotas> + Send + Sync + 'static,
{
    fn resolve(&self, identifier: &[u8]) -> Resolution {
        Resolution::Ready((self.0)(identifier).map(Arc::new))
    }
}

type Lookup = Arc<dyn Fn(Vec<u8>) -> QuotaFuture + Send + Sync>;

/// What a lookup answered, and until when that answer is fresh.
struct Answer {
    quotas: Option<Arc<Quotas>>,
    fresh_until: Instant,
}

/// One identifier's entry: the answer, once the lookup that every waiting call shares
/// has finished, the previous answer (kept for a lookup that times out), and when the
/// lookup is given up (one timeout after the entry was made, whichever waiting caller
/// runs it: a caller taking over from one that went away does not start the clock again).
struct Cached {
    answer: Arc<tokio::sync::OnceCell<Answer>>,
    previous: Option<Arc<Quotas>>,
    gives_up: Instant,
}

impl Cached {
    /// Whether this entry answers at once at `now`.
    fn is_fresh(&self, now: Instant) -> bool {
        self.answer.get().is_some_and(|a| now < a.fresh_until)
    }

    /// Whether its lookup may still be running at `now`: it has no answer yet, and has
    /// not been given up. (Every lookup ends by then; one without an answer after it was
    /// abandoned by every caller waiting for it, and its entry is stale.)
    fn is_looking_up(&self, now: Instant) -> bool {
        self.answer.get().is_none() && now < self.gives_up
    }

    /// The last answer this entry holds or carries.
    fn last_answer(&self) -> Option<Arc<Quotas>> {
        match self.answer.get() {
            Some(answer) => answer.quotas.clone(),
            None => self.previous.clone(),
        }
    }
}

/// An async lookup (a database, a billing API) behind a cache with a time to live: a
/// fresh entry answers at once; a missing or stale one is looked up once, and every call
/// of that identifier meanwhile waits for that one lookup. An answer stays fresh for the
/// time to live from when it arrives.
///
/// A lookup that fails should return `None` (the configured quotas apply). One that has
/// not answered within [`timeout`](Self::timeout) (500 ms unless set) is abandoned: its
/// callers go on with the identifier's previous answer if there is one (a tenant keeps
/// its tier while the lookup is down), else with the configured quotas, and that answer
/// is kept for one more timeout (at most the time to live) before the next lookup is
/// tried, so that an outage slows one call of an identifier at a time, not every call.
///
/// The cache holds up to 100 000 identifiers; when it is full, it drops its stale
/// entries and then as many others as needed to keep half.
pub struct CachedQuotas {
    lookup: Lookup,
    ttl: Duration,
    timeout: Duration,
    cache: Arc<Mutex<HashMap<Vec<u8>, Cached>>>,
    capacity: usize,
}

impl std::fmt::Debug for CachedQuotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedQuotas")
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl CachedQuotas {
    /// Look quotas up with `lookup`, keeping each answer for `ttl` from its arrival.
    pub fn new<F, Fut>(ttl: Duration, lookup: F) -> Self
    where
        F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<Quotas>> + Send + 'static,
    {
        let lookup: Lookup = Arc::new(move |id| {
            let fut = lookup(id);
            Box::pin(async move { fut.await.map(Arc::new) })
        });
        Self {
            lookup,
            ttl,
            timeout: Duration::from_millis(500),
            cache: Arc::new(Mutex::new(HashMap::new())),
            capacity: 100_000,
        }
    }

    /// How long a lookup may take before it is abandoned (see the type's docs). Keep it
    /// below the layer's [`quota_timeout`](crate::layer::RatelimitLayerBuilder::quota_timeout),
    /// which bounds any resolver.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Forget the cached quotas of `identifier` (its next call looks them up again).
    pub fn invalidate(&self, identifier: impl AsRef<[u8]>) {
        self.lock().remove(identifier.as_ref());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Make room in a full cache: drop every stale entry, then, while more than `keep` are
/// left, entries in no particular order (they are looked up again on their next call).
/// Entries still looking up stay: their callers wait on them. Keeping at most half the
/// capacity means the next scan comes only after as many new identifiers again, so a
/// flood of new identifiers costs each one a constant share of a scan. (Lookups take at
/// most `timeout`, so only those begun within the last timeout can keep the cache over
/// half full.)
fn evict(cache: &mut HashMap<Vec<u8>, Cached>, keep: usize, now: Instant) {
    cache.retain(|_, c| c.is_fresh(now) || c.is_looking_up(now));
    let mut excess = cache.len().saturating_sub(keep);
    cache.retain(|_, c| {
        if excess == 0 || c.is_looking_up(now) {
            return true;
        }
        excess -= 1;
        false
    });
}

impl QuotaResolver for CachedQuotas {
    fn resolve(&self, identifier: &[u8]) -> Resolution {
        let now = Instant::now();
        let (answer, previous, gives_up) = {
            let mut cache = self.lock();
            match cache.get(identifier) {
                Some(c) if c.is_fresh(now) => {
                    return Resolution::Ready(c.answer.get().and_then(|a| a.quotas.clone()));
                }
                // Being looked up: wait for that lookup.
                Some(c) if c.is_looking_up(now) => {
                    (c.answer.clone(), c.previous.clone(), c.gives_up)
                }
                stale => {
                    let previous = stale.and_then(Cached::last_answer);
                    if cache.len() >= self.capacity {
                        evict(&mut cache, self.capacity / 2, now);
                    }
                    let answer = Arc::new(tokio::sync::OnceCell::new());
                    let gives_up = super::deadline_after(self.timeout);
                    cache.insert(
                        identifier.to_vec(),
                        Cached {
                            answer: answer.clone(),
                            previous: previous.clone(),
                            gives_up,
                        },
                    );
                    (answer, previous, gives_up)
                }
            }
        };
        let (lookup, ttl, timeout) = (self.lookup.clone(), self.ttl, self.timeout);
        let id = identifier.to_vec();
        Resolution::Pending(Box::pin(async move {
            // Only the first caller's lookup runs; the others wait for its answer. (If
            // that caller goes away, the next waiting one looks up again.)
            let answer = answer
                .get_or_init(|| async move {
                    match tokio::time::timeout_at(gives_up, lookup(id)).await {
                        Ok(quotas) => Answer {
                            quotas,
                            fresh_until: super::deadline_after(ttl),
                        },
                        Err(_) => {
                            tracing::warn!(
                                ?timeout,
                                kept_previous = previous.is_some(),
                                "quota lookup timed out; using the previous answer or the \
                                 configured quotas"
                            );
                            Answer {
                                quotas: previous,
                                fresh_until: super::deadline_after(timeout.min(ttl)),
                            }
                        }
                    }
                })
                .await;
            answer.quotas.clone()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full cache of fresh answers still makes room (it kept every fresh entry, so it
    /// grew without bound and scanned itself whole for every new identifier), and keeps
    /// the entries whose lookups are running.
    #[tokio::test]
    async fn a_full_cache_of_fresh_answers_makes_room_and_keeps_running_lookups() {
        let mut cached = CachedQuotas::new(Duration::from_secs(3600), |id: Vec<u8>| async move {
            if id == b"slow" {
                std::future::pending::<()>().await;
            }
            Some(Quotas::new().set("rpm", 7))
        });
        cached.capacity = 8;
        // However slowly this test runs, the pending lookup stays within its timeout.
        cached.timeout = Duration::from_secs(3600);
        let slow = match cached.resolve(b"slow") {
            Resolution::Pending(f) => f,
            Resolution::Ready(_) => panic!("the first resolve cannot be ready"),
        };
        for i in 0..100u32 {
            if let Resolution::Pending(f) = cached.resolve(&i.to_le_bytes()) {
                assert_eq!(f.await.unwrap().get("rpm"), Some(7));
            }
            let cache = cached.lock();
            assert!(cache.len() <= 8, "{} entries", cache.len());
            assert!(
                cache.get(&b"slow"[..]).is_some(),
                "a running lookup was evicted"
            );
        }
        drop(slow);
        // The newest answer is kept: it answers at once.
        assert!(matches!(
            cached.resolve(&99u32.to_le_bytes()),
            Resolution::Ready(Some(_))
        ));
    }

    /// Lookups whose callers all went away (their futures dropped) do not hold their
    /// places for ever: past their timeout they are stale, and a full cache drops them
    /// (it kept them as running, stayed full and scanned itself for every new identifier).
    #[tokio::test(start_paused = true)]
    async fn lookups_abandoned_by_their_callers_are_dropped_once_timed_out() {
        let mut cached = CachedQuotas::new(Duration::from_secs(3600), |_: Vec<u8>| async {
            Some(Quotas::new().set("rpm", 7))
        });
        cached.capacity = 8;
        for i in 0..8u32 {
            drop(cached.resolve(&i.to_le_bytes()));
        }
        assert_eq!(cached.lock().len(), 8);
        tokio::time::sleep(cached.timeout).await;
        drop(cached.resolve(b"next"));
        assert_eq!(cached.lock().len(), 1, "the abandoned lookups were kept");
        // An abandoned identifier is looked up afresh on its next call.
        match cached.resolve(&0u32.to_le_bytes()) {
            Resolution::Pending(f) => assert_eq!(f.await.unwrap().get("rpm"), Some(7)),
            Resolution::Ready(_) => panic!("an abandoned lookup cannot have answered"),
        }
    }

    /// A caller taking over a lookup from one that went away gives it up when the first
    /// would have (it used to start a timeout of its own, and wait up to twice as long),
    /// and a call arriving after that finds the timed-out answer instead of starting a
    /// second lookup beside the one still running.
    #[tokio::test(start_paused = true)]
    async fn a_lookup_taken_over_keeps_its_first_deadline_and_runs_alone() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (running, most, started) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let counts = (running.clone(), most.clone(), started.clone());
        let cached = CachedQuotas::new(Duration::from_secs(60), move |_: Vec<u8>| {
            let (running, most, started) = counts.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Counted down however the lookup ends (it is dropped when given up).
                struct Done(Arc<AtomicUsize>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _done = Done(running);
                tokio::time::sleep(Duration::from_secs(10)).await;
                Some(Quotas::new().set("rpm", 1))
            }
        })
        .timeout(Duration::from_millis(200));
        let cached = Arc::new(cached);
        let pending = |cached: &CachedQuotas| match cached.resolve(b"id") {
            Resolution::Pending(f) => f,
            Resolution::Ready(_) => panic!("nothing is cached yet"),
        };
        let started_at = Instant::now();
        let first = pending(&cached);
        let first = tokio::spawn(tokio::time::timeout(Duration::from_millis(150), first));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = tokio::spawn(pending(&cached));
        assert!(first.await.unwrap().is_err(), "the first caller went away");
        assert_eq!(second.await.unwrap(), None, "the configured quotas");
        assert_eq!(started_at.elapsed(), Duration::from_millis(200));
        // Its timed-out answer is kept one more timeout: no third lookup.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(cached.resolve(b"id"), Resolution::Ready(None)));
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert_eq!(most.load(Ordering::SeqCst), 1, "two lookups ran at once");
    }
}
