//! Tenants: per-identifier quotas (tiers, overrides) from a resolver the application
//! supplies. A changed quota applies on the identifier's next call, without a restart,
//! and keeps what was already used (the state lives under the same key whatever the
//! quota).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// One identifier's entry: the answer, once the lookup that every waiting call shares
/// has finished.
struct Cached {
    answer: Arc<tokio::sync::OnceCell<Option<Arc<Quotas>>>>,
    fetched: Instant,
}

/// An async lookup (a database, a billing API) behind a cache with a time to live: a
/// fresh entry answers at once; a missing or stale one is looked up once, and every call
/// of that identifier meanwhile waits for that one lookup. A lookup that fails should
/// return `None` (the configured quotas apply).
pub struct CachedQuotas {
    lookup: Lookup,
    ttl: Duration,
    cache: Arc<Mutex<HashMap<Vec<u8>, Cached>>>,
    capacity: usize,
}

impl std::fmt::Debug for CachedQuotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedQuotas")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CachedQuotas {
    /// Look quotas up with `lookup`, keeping each answer for `ttl`.
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
            cache: Arc::new(Mutex::new(HashMap::new())),
            capacity: 100_000,
        }
    }

    /// Forget the cached quotas of `identifier` (its next call looks them up again).
    pub fn invalidate(&self, identifier: impl AsRef<[u8]>) {
        self.lock().remove(identifier.as_ref());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl QuotaResolver for CachedQuotas {
    fn resolve(&self, identifier: &[u8]) -> Resolution {
        let answer = {
            let mut cache = self.lock();
            match cache.get(identifier) {
                Some(c) if c.fetched.elapsed() < self.ttl => {
                    if let Some(quotas) = c.answer.get() {
                        return Resolution::Ready(quotas.clone());
                    }
                    // Being looked up: wait for that lookup.
                    c.answer.clone()
                }
                _ => {
                    if cache.len() >= self.capacity {
                        let ttl = self.ttl;
                        cache.retain(|_, c| c.fetched.elapsed() < ttl);
                    }
                    let answer = Arc::new(tokio::sync::OnceCell::new());
                    cache.insert(
                        identifier.to_vec(),
                        Cached {
                            answer: answer.clone(),
                            fetched: Instant::now(),
                        },
                    );
                    answer
                }
            }
        };
        let lookup = self.lookup.clone();
        let id = identifier.to_vec();
        Resolution::Pending(Box::pin(async move {
            // Only the first caller's lookup runs; the others wait for its answer.
            answer.get_or_init(|| lookup(id)).await.clone()
        }))
    }
}
