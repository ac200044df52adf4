//! Where limiter state lives: [`MemoryStore`] (embedded, the default) and
//! [`RedisStore`] (Lua scripts, shared by every instance of an application).
//!
//! A store answers three operations, each atomic and, on Redis, one round trip:
//!
//! * [`Store::acquire`]: evaluate several limits at once, all-or-nothing. If any denies,
//!   nothing is written to any of them.
//! * [`Store::adjust`]: charge (forced debit, may create debt) or refund units.
//! * [`Store::delete`]: forget keys (used by [`Ratelimit::reset`](crate::Ratelimit::reset)).
//!
//! Both stores evaluate the exact same arithmetic, in [`crate::algorithm`], and the
//! conformance suite (`tests/conformance.rs`) checks that they agree decision for
//! decision.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::algorithm::{Algorithm, ConcurrencyLimit, Outcome};

use crate::error::{Error, StoreError};

mod key;
mod memory;
#[cfg(feature = "redis")]
mod redis;

pub(crate) use key::SharedKeys;
pub use key::StateKey;
pub use memory::{Clock, ManualClock, MemoryStore, SystemClock};
#[cfg(feature = "redis")]
pub use redis::{RedisOptions, RedisStore};

/// What a [`Store`] operation returns: the answer itself, when the store has it at once
/// (in-process stores decide when called, with no allocation and nothing left to poll),
/// or a boxed, `'static` future (so it can outlive its caller when a call is cancelled
/// and its settlement must still finish).
///
/// Callers await it like any future, or take a ready answer without polling with
/// [`into_ready`](Self::into_ready). Like tower's response futures, it panics if polled
/// again after it completed.
#[must_use = "a store operation's answer is lost unless the future is awaited"]
pub struct StoreFuture<T> {
    state: Answer<T>,
}

enum Answer<T> {
    /// Decided when the operation was called; `None` once taken.
    Ready(Option<Result<T, StoreError>>),
    /// Decided when the future completes.
    Pending(Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>),
}

impl<T> StoreFuture<T> {
    /// An answer the store already has: the operation was applied when it was called.
    pub fn ready(answer: Result<T, StoreError>) -> Self {
        Self {
            state: Answer::Ready(Some(answer)),
        }
    }

    /// An answer that `future` will produce (boxed once, here).
    pub fn new(future: impl Future<Output = Result<T, StoreError>> + Send + 'static) -> Self {
        Self {
            state: Answer::Pending(Box::pin(future)),
        }
    }

    /// The answer, if the store already has it (see [`ready`](Self::ready)); else the
    /// future, unchanged, to await.
    pub fn into_ready(self) -> Result<Result<T, StoreError>, Self> {
        match self.state {
            Answer::Ready(Some(answer)) => Ok(answer),
            state => Err(Self { state }),
        }
    }
}

// The answer is moved out, never pinned in place, and the pending future is boxed: a
// `StoreFuture` may move between polls whatever `T` is.
impl<T> Unpin for StoreFuture<T> {}

impl<T> Future for StoreFuture<T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            Answer::Ready(answer) => {
                Poll::Ready(answer.take().expect("StoreFuture polled after completion"))
            }
            Answer::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

impl<T> std::fmt::Debug for StoreFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            Answer::Ready(Some(_)) => "ready",
            Answer::Ready(None) => "taken",
            Answer::Pending(_) => "pending",
        };
        f.debug_tuple("StoreFuture").field(&state).finish()
    }
}

/// The result of trying to take a cost from one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the cost fit (for charges and refunds: whether the budget is within its
    /// limit afterwards).
    pub allowed: bool,
    /// The limit's quota.
    pub limit: u64,
    /// Units left after this decision, clamped at 0.
    pub remaining: u64,
    /// Time until the budget is fully restored, or the fixed window rolls.
    pub reset_after: Duration,
    /// When denied: the earliest time the same cost could pass if nothing else is taken;
    /// `None` when allowed, or when the cost exceeds the limit and can never pass.
    pub retry_after: Option<Duration>,
    /// Decided without the store (it failed): by letting the call through
    /// ([`StoreErrorPolicy::FailOpen`](crate::layer::StoreErrorPolicy::FailOpen)) or on the
    /// in-process fallback store ([`StoreErrorPolicy::Local`](crate::layer::StoreErrorPolicy::Local)).
    pub fallback: bool,
    /// Fixed and sliding windows: the index of the window the decision was made in
    /// (time since the Unix epoch divided by the window). Pass it back in
    /// [`Adjustment::window`] to refund a reservation only into the window that paid
    /// for it. `None` for token buckets and concurrency slots.
    pub window: Option<i64>,
}

impl From<Outcome> for Decision {
    fn from(o: Outcome) -> Self {
        Decision {
            allowed: o.allowed,
            limit: o.limit,
            remaining: o.remaining,
            reset_after: Duration::from_micros(o.reset_after_us),
            retry_after: o.retry_after_us.map(Duration::from_micros),
            fallback: false,
            window: o.window,
        }
    }
}

/// What one key of a store holds: a rate counter under an [`Algorithm`], or the
/// in-flight slots of a [`ConcurrencyLimit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// A counter under a rate algorithm.
    Rate(Algorithm),
    /// Leased in-flight slots.
    Concurrency(ConcurrencyLimit),
}

impl Rule {
    /// The quota: units per window, a bucket's capacity, or the most slots.
    pub fn limit(&self) -> u64 {
        match self {
            Rule::Rate(a) => a.limit(),
            Rule::Concurrency(c) => c.max(),
        }
    }

    /// The time over which the quota applies (for a concurrency limit, its lease).
    pub fn period(&self) -> Duration {
        match self {
            Rule::Rate(a) => a.period(),
            Rule::Concurrency(c) => c.lease(),
        }
    }

    pub(crate) fn is_concurrency(&self) -> bool {
        matches!(self, Rule::Concurrency(_))
    }
}

impl<A: Into<Algorithm>> From<A> for Rule {
    fn from(a: A) -> Self {
        Rule::Rate(a.into())
    }
}

impl From<ConcurrencyLimit> for Rule {
    fn from(c: ConcurrencyLimit) -> Self {
        Rule::Concurrency(c)
    }
}

/// One limit's part in an [`acquire`](Store::acquire).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitCheck {
    /// The state key (see [`state_key`]); distinct across the checks of one acquire.
    /// Shared: a call's settlement and retries refer to the same key without copying it.
    pub key: StateKey,
    /// The algorithm and quota, or the concurrency limit.
    pub rule: Rule,
    /// Units to take (0 reads).
    pub cost: u64,
    /// Whether to take `cost` when it fits; `false` only checks that it would fit.
    pub take: bool,
    /// For [`Rule::Concurrency`]: this call's slot id (unique per call); else 0.
    pub slot: u64,
}

/// One limit's part in an [`adjust`](Store::adjust).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adjustment {
    /// The state key.
    pub key: StateKey,
    /// The algorithm and quota, or the concurrency limit.
    pub rule: Rule,
    /// Positive: charge (forced debit). Negative: refund. Magnitude at most
    /// [`MAX_UNITS`](crate::algorithm::MAX_UNITS). For [`Rule::Concurrency`], any
    /// negative delta releases `slot` and any positive one renews its lease.
    pub delta: i64,
    /// For [`Rule::Concurrency`]: the slot to release or renew; else 0.
    pub slot: u64,
    /// For refunds on fixed and sliding windows: the window that paid for the units
    /// ([`Decision::window`] of the acquire that took them). The refund goes only there:
    /// dropped once a fixed window has rolled, taken off the previous window's count
    /// once a sliding window has moved on by one. `None`: off the current window first.
    pub window: Option<i64>,
}

/// Unique-enough ids for slots, settlements and undos: a random per-process base plus
/// a counter, odd-multiplied so consecutive ids differ in many bits (63 bits, so they
/// also travel as positive signed integers).
pub(crate) fn next_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    base.wrapping_add(
        COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ) & (u64::MAX >> 1)
}

/// The adjustments that undo an allowed acquire of `checks` (answered by `decisions`):
/// every taken cost refunded into the window that paid for it, every slot released.
/// Used when the caller of an acquire stopped waiting before its answer arrived.
pub(crate) fn undo_adjustments(checks: &[LimitCheck], decisions: &[Decision]) -> Vec<Adjustment> {
    if decisions.len() != checks.len() || !decisions.iter().all(|d| d.allowed) {
        return Vec::new();
    }
    checks
        .iter()
        .zip(decisions)
        .filter(|(c, _)| c.take && (c.cost > 0 || c.rule.is_concurrency()))
        .map(|(c, d)| Adjustment {
            key: c.key.clone(),
            rule: c.rule,
            delta: -(c.cost.max(1) as i64),
            slot: c.slot,
            window: d.window,
        })
        .collect()
}

/// A place to keep limiter state. Implementations must make each operation atomic.
///
/// An operation may be applied when it is called, answering with
/// [`StoreFuture::ready`] (in-process stores do, so a call through them allocates no
/// future and skips the timeouts and fallbacks meant for remote stores), or when its
/// future runs ([`StoreFuture::new`]).
///
/// A store that wraps another, counting the acquires that reach it:
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use tower_llm_ratelimit::store::{Adjustment, LimitCheck, StoreFuture};
/// use tower_llm_ratelimit::{Decision, MemoryStore, Store};
///
/// struct Counted {
///     inner: MemoryStore,
///     acquires: Arc<AtomicU64>,
/// }
///
/// impl Store for Counted {
///     fn acquire(&self, checks: &[LimitCheck]) -> StoreFuture<Vec<Decision>> {
///         self.acquires.fetch_add(1, Ordering::Relaxed);
///         // The memory store's answer is ready: handing it on keeps it so.
///         self.inner.acquire(checks)
///     }
///
///     fn adjust(&self, adjustments: &[Adjustment], id: Option<u64>) -> StoreFuture<Vec<Decision>> {
///         self.inner.adjust(adjustments, id)
///     }
///
///     fn delete(&self, keys: Vec<String>) -> StoreFuture<()> {
///         self.inner.delete(keys)
///     }
/// }
/// ```
pub trait Store: Send + Sync + 'static {
    /// Evaluate every check; if all are allowed, take each `take` check's cost; if any is
    /// denied, write nothing. Returns one decision per check, in order.
    ///
    /// **Dropping a pending future before it completes must leave no trace**: either the
    /// acquire is never applied, or, if it already went out, the store undoes it (refunds
    /// what it took into the windows that paid, releases its slots) once the answer
    /// arrives. Callers rely on this to time out and cancel acquires without losing
    /// budget. A ready answer has been applied: a caller that does not use it undoes it
    /// with [`adjust`](Self::adjust).
    fn acquire(&self, checks: &[LimitCheck]) -> StoreFuture<Vec<Decision>>;

    /// Apply every adjustment (charges always land; refunds stop at a full budget).
    ///
    /// With a `settlement_id`, the store applies the batch at most once per id (for a
    /// while): a retry after an ambiguous failure (a timeout after sending) is then safe.
    fn adjust(
        &self,
        adjustments: &[Adjustment],
        settlement_id: Option<u64>,
    ) -> StoreFuture<Vec<Decision>>;

    /// Delete these keys.
    fn delete(&self, keys: Vec<String>) -> StoreFuture<()>;

    /// Delete every key of the identifier with hash tag `tag` under any of `prefixes`
    /// (keys `<prefix><anything>:{<tag>}`, e.g. one per model). Not on any hot path: it
    /// may scan. The default fails as unsupported.
    fn delete_identifier(&self, prefixes: Vec<String>, tag: String) -> StoreFuture<()> {
        let _ = (prefixes, tag);
        StoreFuture::ready(Err(StoreError::new(
            "this store cannot delete an identifier's keys by prefix",
        )))
    }
}

/// The keys [`Store::delete_identifier`] deletes: those of the identifier with hash tag
/// `tag` under any of `prefixes`, `<prefix><anything>:{<tag>}`.
pub(crate) struct IdentifierKeys {
    prefixes: Vec<String>,
    suffix: String,
}

impl IdentifierKeys {
    pub(crate) fn new(prefixes: Vec<String>, tag: &str) -> Self {
        Self {
            prefixes,
            suffix: [":{", tag, "}"].concat(),
        }
    }

    /// What every one of these keys ends with: `:{<tag>}`.
    #[cfg(feature = "redis")]
    pub(crate) fn suffix(&self) -> &str {
        &self.suffix
    }

    /// Whether `key` is one of them.
    pub(crate) fn contains(&self, key: &str) -> bool {
        key.ends_with(&self.suffix) && self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// Longest identifier kept verbatim in keys; longer ones (and any with bytes outside
/// `[A-Za-z0-9._@-]`) are replaced by a hash.
pub const MAX_VERBATIM_IDENTIFIER: usize = 64;

/// Longest identifier accepted at all (1 MiB): anything larger is a bug upstream.
pub const MAX_IDENTIFIER: usize = 1 << 20;

/// Longest key prefix accepted.
pub const MAX_PREFIX: usize = 128;

/// Checks a key prefix: 1..=128 bytes of printable ASCII without `{` or `}` (which would
/// change the Redis Cluster hash slot).
pub fn validate_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.is_empty() || prefix.len() > MAX_PREFIX {
        return Err(Error::invalid_input(format!(
            "key prefix must be 1 to {MAX_PREFIX} bytes, got {}",
            prefix.len()
        )));
    }
    if let Some(c) = prefix
        .chars()
        .find(|c| !c.is_ascii_graphic() || *c == '{' || *c == '}')
    {
        return Err(Error::invalid_input(format!(
            "key prefix {prefix:?} contains {c:?}; use printable ASCII without braces"
        )));
    }
    Ok(())
}

/// The hash tag that stands for an identifier in keys.
///
/// Short identifiers of safe bytes are kept as they are (readable in `redis-cli`);
/// everything else becomes `#` and 32 hex digits of its SHA-256, so no byte of an
/// identifier can change which keys or which hash slot are used, and raw secrets never
/// reach Redis. `#` is not a safe byte, so the two forms cannot collide.
pub fn identifier_tag(identifier: &[u8]) -> Result<String, Error> {
    Ok(Tag::of(identifier)?.as_str().to_owned())
}

/// [`identifier_tag`] held inline (a call carries its tag until it is planned without
/// allocating for it): at most 64 bytes, every one ASCII.
#[derive(Clone, Copy)]
pub(crate) struct Tag {
    bytes: [u8; MAX_VERBATIM_IDENTIFIER],
    len: u8,
}

impl Tag {
    /// The tag of `identifier`, or why it is not a valid identifier.
    pub(crate) fn of(identifier: &[u8]) -> Result<Self, Error> {
        if identifier.is_empty() {
            return Err(Error::invalid_input("identifier is empty"));
        }
        if identifier.len() > MAX_IDENTIFIER {
            return Err(Error::invalid_input(format!(
                "identifier is {} bytes, more than the maximum of {MAX_IDENTIFIER}",
                identifier.len()
            )));
        }
        let mut tag = Tag {
            bytes: [0; MAX_VERBATIM_IDENTIFIER],
            len: 0,
        };
        let safe = identifier.len() <= MAX_VERBATIM_IDENTIFIER
            && identifier
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
        if safe {
            tag.bytes[..identifier.len()].copy_from_slice(identifier);
            tag.len = identifier.len() as u8;
            return Ok(tag);
        }
        Ok(Self::hashed(identifier))
    }

    /// `#` and 32 hex digits of the SHA-256 of `identifier`: the tag of any identifier
    /// not kept verbatim.
    pub(crate) fn hashed(identifier: &[u8]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut tag = Tag {
            bytes: [0; MAX_VERBATIM_IDENTIFIER],
            len: 33,
        };
        let digest = Sha256::digest(identifier);
        tag.bytes[0] = b'#';
        for (i, b) in digest[..16].iter().enumerate() {
            tag.bytes[1 + 2 * i] = HEX[usize::from(b >> 4)];
            tag.bytes[2 + 2 * i] = HEX[usize::from(b & 15)];
        }
        tag
    }

    /// How logs and spans name the identifier of tag `tag`: always hashed (a verbatim
    /// tag is the identifier itself, which may be a secret such as an API key).
    pub(crate) fn logged(tag: &str) -> Self {
        if !tag.starts_with('#') || tag.len() > MAX_VERBATIM_IDENTIFIER {
            return Tag::hashed(tag.as_bytes());
        }
        // Hashed already.
        let mut logged = Tag {
            bytes: [0; MAX_VERBATIM_IDENTIFIER],
            len: tag.len() as u8,
        };
        logged.bytes[..tag.len()].copy_from_slice(tag.as_bytes());
        logged
    }

    /// The tag as text.
    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII is ever written (safe bytes, `#`, hex digits).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("#")
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key of one limit's state for one identifier tag: `<prefix>:{<tag>}`.
///
/// Every key of one identifier carries the same `{tag}`, so all the limits of one call
/// live in one Redis Cluster hash slot and one script can touch them together.
pub fn state_key(prefix: &str, tag: &str) -> String {
    [prefix, ":{", tag, "}"].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_keep_safe_identifiers_and_hash_the_rest() {
        assert_eq!(identifier_tag(b"user-42").unwrap(), "user-42");
        let braces = identifier_tag(b"a}{b:c").unwrap();
        assert!(braces.starts_with('#') && braces.len() == 33);
        assert!(!braces.contains('{') && !braces.contains('}'));
        let long = vec![b'a'; 65];
        assert_ne!(
            identifier_tag(&long).unwrap(),
            String::from_utf8(long).unwrap()
        );
        assert!(identifier_tag(b"").is_err());
        assert!(identifier_tag(&vec![0u8; MAX_IDENTIFIER + 1]).is_err());
        assert_eq!(state_key("p", "t"), "p:{t}");
    }

    #[test]
    fn a_ready_answer_is_taken_without_polling_and_a_pending_one_is_handed_back() {
        let ready = StoreFuture::ready(Ok(7));
        assert_eq!(ready.into_ready().unwrap().unwrap(), 7);
        let pending = StoreFuture::new(async { Ok(8) });
        let pending = pending.into_ready().unwrap_err();
        assert_eq!(format!("{pending:?}"), "StoreFuture(\"pending\")");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut pending = pending;
        assert!(matches!(
            Pin::new(&mut pending).poll(&mut cx),
            Poll::Ready(Ok(8))
        ));
    }

    #[test]
    #[should_panic(expected = "polled after completion")]
    fn a_ready_answer_polled_twice_panics() {
        let mut ready = StoreFuture::ready(Ok(1));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut ready).poll(&mut cx).is_ready());
        let _ = Pin::new(&mut ready).poll(&mut cx);
    }

    #[test]
    fn prefixes_without_braces() {
        assert!(validate_prefix("llm:req").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("a{b").is_err());
        assert!(validate_prefix("a b").is_err());
    }
}
