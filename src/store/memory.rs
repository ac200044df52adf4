//! The embedded store: sharded hash maps behind mutexes, no setup, one process.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::HashTable;
use smallvec::SmallVec;
use std::time::Duration;

use super::{Adjustment, Decision, LimitCheck, Rule, Store, StoreFuture};
use crate::algorithm::{self, Algorithm, Slots, State, Write};

/// A source of "now" in microseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Microseconds since the Unix epoch.
    fn now_micros(&self) -> i64;
}

/// The system's wall clock, read fast.
///
/// Asking the OS for the time costs more than a whole decision of the memory store, so
/// each thread reads the wall clock once a second and counts the microseconds in between
/// with the CPU's time-stamp counter (through `quanta`, which falls back to the OS's
/// monotonic clock where there is no usable counter). The reading is the wall clock at
/// most one second of counter drift ago (microseconds), never more.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        wall::now_micros()
    }
}

mod wall {
    use std::cell::Cell;
    use std::sync::LazyLock;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// How long a thread extrapolates from one reading of the wall clock, in µs.
    const REANCHOR_US: u128 = 1_000_000;
    /// The most µs between the counter readings around an anchor's OS clock reading
    /// (it takes well under one), and how often a wider pair is read again.
    const ANCHOR_GAP_US: u128 = 20;
    const ANCHOR_ATTEMPTS: usize = 4;

    /// The counter and its rate, read off once per process.
    struct Counter {
        clock: quanta::Clock,
        /// Microseconds per 2^40 counter ticks (40 bits of fraction: exact to a few parts
        /// in a billion; a second of ticks times this fits in 64 bits).
        us_per_2_40_ticks: u64,
        /// Ticks in `REANCHOR_US`.
        reanchor_ticks: u64,
        /// Ticks in `ANCHOR_GAP_US`.
        anchor_gap_ticks: u64,
    }

    static COUNTER: LazyLock<Counter> = LazyLock::new(|| {
        let clock = quanta::Clock::new();
        let us_per_2_40_ticks = (clock.delta_as_nanos(0, 1 << 40) / 1000).max(1);
        let ticks_in = |us: u128| {
            ((us << 40) / u128::from(us_per_2_40_ticks)).min(u128::from(u64::MAX)) as u64
        };
        Counter {
            clock,
            us_per_2_40_ticks,
            reanchor_ticks: ticks_in(REANCHOR_US),
            anchor_gap_ticks: ticks_in(ANCHOR_GAP_US),
        }
    });

    /// A reading of the wall clock (µs since the Unix epoch), the counter at it, and the
    /// counter reading from which it is too old (0: no reading yet).
    #[derive(Clone, Copy)]
    struct Anchor {
        raw: u64,
        wall_us: i64,
        until: u64,
    }

    thread_local! {
        static ANCHOR: Cell<Anchor> = const { Cell::new(Anchor { raw: 0, wall_us: 0, until: 0 }) };
    }

    /// The wall clock from the OS, in µs since the Unix epoch (0 before it).
    pub(super) fn os_micros() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64 * 1_000_000 + i64::from(d.subsec_micros()))
            .unwrap_or(0)
    }

    /// Start the counter's calibration now (it takes about a millisecond, once per
    /// process), not on the first decision.
    pub(super) fn warm_up() {
        LazyLock::force(&COUNTER);
    }

    pub(super) fn now_micros() -> i64 {
        let counter = &*COUNTER;
        let raw = counter.clock.raw();
        let a = ANCHOR.get();
        if raw < a.until {
            // `raw < a.raw` (another core's counter, slightly behind) reads as no time.
            let ticks = raw.saturating_sub(a.raw);
            let us = (u128::from(ticks) * u128::from(counter.us_per_2_40_ticks)) >> 40;
            return a.wall_us + us as i64;
        }
        let (raw, wall_us) =
            anchor_reading(|| counter.clock.raw(), os_micros, counter.anchor_gap_ticks);
        ANCHOR.set(Anchor {
            raw,
            wall_us,
            until: raw.saturating_add(counter.reanchor_ticks),
        });
        wall_us
    }

    /// Read the OS clock between two counter readings, and pair it with the counter
    /// halfway. A thread held up between the readings (preempted on a busy machine)
    /// would pair a time with a counter read later, and run behind the other threads by
    /// as long as it waited, until its next anchor; so a reading whose counters are more
    /// than `max_gap` ticks apart is taken again (a few times; the closest pair wins).
    pub(super) fn anchor_reading(
        mut raw: impl FnMut() -> u64,
        mut os: impl FnMut() -> i64,
        max_gap: u64,
    ) -> (u64, i64) {
        let mut best = (u64::MAX, 0, 0);
        for _ in 0..ANCHOR_ATTEMPTS {
            let before = raw();
            let wall_us = os();
            let gap = raw().saturating_sub(before);
            if gap < best.0 {
                best = (gap, before + gap / 2, wall_us);
            }
            if gap <= max_gap {
                break;
            }
        }
        (best.1, best.2)
    }
}

/// A clock that moves only when told to; for tests of windows and refills.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock standing at `start` after the Unix epoch.
    pub fn new(start: Duration) -> Self {
        Self {
            now: Arc::new(AtomicI64::new(start.as_micros() as i64)),
        }
    }

    /// Move forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_micros() as i64, Ordering::SeqCst);
    }

    /// Set the time to `at` after the Unix epoch.
    pub fn set(&self, at: Duration) {
        self.now.store(at.as_micros() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
}

const SHARDS: usize = 64;
// Multi-key operations keep the shards they lock as bits of a u64.
const _: () = assert!(SHARDS <= 64);

/// A key with its hash, computed once per key and operation: the hash picks the key's
/// shard and its place in the shard's table, so a decision hashes its key once.
#[derive(Clone, Copy)]
struct Hashed<'k> {
    key: &'k str,
    hash: u64,
}

impl Hashed<'_> {
    /// Whether a table's entry is this key's.
    fn is(&self, (key, _): &(Box<str>, Entry)) -> bool {
        **key == *self.key
    }

    /// The shard: bits 32..38 of the hash. A shard's table uses the low bits (bucket)
    /// and the top seven (control byte), so the keys of one shard still spread over
    /// its table.
    fn shard(&self) -> usize {
        ((self.hash >> 32) as usize) % SHARDS
    }
}

/// A shard sweeps out expired entries once it has seen at least this many writes and at
/// least as many writes as it kept at its last sweep: sweeping costs O(1) amortized per
/// write, and a shard holds at most about twice what was live at its last sweep plus
/// this many. (Counting against the entries held now instead, a shard whose writes all
/// insert new keys, one per client address say, grows as fast as its count and never
/// sweeps again.)
const MIN_WRITES_BETWEEN_SWEEPS: usize = 256;

/// How long past its expiry an entry is kept before a sweep drops it, in µs. Threads'
/// clocks differ a little (each extrapolates from its own reading of the OS clock): an
/// entry a thread slightly ahead sees expired can still be live to one slightly behind,
/// which would find it gone and count its window afresh. Reading it expired reads it as
/// absent, which every thread then agrees on; only removing it needs the margin.
const SWEEP_GRACE_US: i64 = 10_000;

#[derive(Clone)]
enum Value {
    Counter(State),
    Slots(Slots),
}

/// How to put back what an acquire wrote in place, if the acquire is denied.
enum Undo {
    Nothing,
    Remove,
    Restore(Value, i64),
}

struct Entry {
    value: Value,
    expires_at: i64,
}

/// Keys come from user identifiers, so the maps use a randomly seeded hasher; foldhash
/// is the fast seeded hasher hashbrown itself defaults to.
type Hasher = foldhash::fast::RandomState;

/// The hash of a table's entry, for the table to move it when it grows or shrinks (the
/// same hash as [`Hashed::hash`]).
fn rehash(hasher: &Hasher) -> impl Fn(&(Box<str>, Entry)) -> u64 + '_ {
    |(key, _)| hasher.hash_one(&**key)
}

struct Shard {
    /// Entries by key, found by [`Hashed::hash`].
    table: HashTable<(Box<str>, Entry)>,
    /// The store's hasher, to rehash keys when the table grows.
    hasher: Hasher,
    writes_since_sweep: usize,
    /// Entries kept by the last sweep.
    kept_at_last_sweep: usize,
}

impl Shard {
    fn new(hasher: Hasher) -> Self {
        Self {
            table: HashTable::new(),
            hasher,
            writes_since_sweep: 0,
            kept_at_last_sweep: 0,
        }
    }

    fn find(&self, k: Hashed<'_>) -> Option<&Entry> {
        self.table.find(k.hash, |e| k.is(e)).map(|(_, e)| e)
    }

    fn find_mut(&mut self, k: Hashed<'_>) -> Option<&mut Entry> {
        self.table.find_mut(k.hash, |e| k.is(e)).map(|(_, e)| e)
    }

    fn insert(&mut self, k: Hashed<'_>, entry: Entry) {
        match self.find_mut(k) {
            Some(e) => *e = entry,
            None => {
                self.table
                    .insert_unique(k.hash, (k.key.into(), entry), rehash(&self.hasher));
            }
        }
    }

    fn remove(&mut self, k: Hashed<'_>) {
        if let Ok(e) = self.table.find_entry(k.hash, |e| k.is(e)) {
            e.remove();
        }
    }

    fn get(&self, k: Hashed<'_>, now: i64) -> Option<State> {
        match self.find(k).filter(|e| e.expires_at > now) {
            Some(Entry {
                value: Value::Counter(state),
                ..
            }) => Some(*state),
            _ => None,
        }
    }

    fn slots(&self, k: Hashed<'_>, now: i64) -> Slots {
        match self.find(k).filter(|e| e.expires_at > now) {
            Some(Entry {
                value: Value::Slots(slots),
                ..
            }) => slots.clone(),
            _ => Vec::new(),
        }
    }

    fn put_slots(&mut self, k: Hashed<'_>, slots: Slots, now: i64) {
        match slots.iter().map(|(_, end)| *end).max() {
            Some(expires_at) => self.insert(
                k,
                Entry {
                    value: Value::Slots(slots),
                    expires_at,
                },
            ),
            None => self.remove(k),
        }
        self.after_write(now);
    }

    /// Read one counter, compute its outcome and write with `f`, and write in place: one
    /// lookup for an existing key. With `UNDO`, also returns how to put the entry back
    /// (should another check of the same acquire deny); else [`Undo::Nothing`], without
    /// copying the entry.
    fn update<const UNDO: bool>(
        &mut self,
        k: Hashed<'_>,
        now: i64,
        f: impl FnOnce(Option<State>) -> (algorithm::Outcome, Write),
    ) -> (algorithm::Outcome, Undo) {
        let Some(entry) = self.find_mut(k) else {
            let (o, w) = f(None);
            let undo = match w {
                Write::Put(..) if UNDO => Undo::Remove,
                _ => Undo::Nothing,
            };
            self.apply(k, w, now);
            return (o, undo);
        };
        let state = match entry.value {
            Value::Counter(s) if entry.expires_at > now => Some(s),
            _ => None,
        };
        let (o, w) = f(state);
        let before = match &w {
            Write::None => return (o, Undo::Nothing),
            // Slots under a counter's key (a limit that changed kind): kept whole.
            _ if UNDO => Undo::Restore(entry.value.clone(), entry.expires_at),
            _ => Undo::Nothing,
        };
        match w {
            Write::Put(s, ttl_us) => {
                entry.value = Value::Counter(s);
                entry.expires_at = now.saturating_add(ttl_us as i64);
            }
            _ => self.remove(k),
        }
        self.after_write(now);
        (o, before)
    }

    /// Put an entry back as it was before [`Shard::update`].
    fn undo(&mut self, k: Hashed<'_>, undo: Undo) {
        match undo {
            Undo::Nothing => {}
            Undo::Remove => self.remove(k),
            Undo::Restore(value, expires_at) => self.insert(k, Entry { value, expires_at }),
        }
    }

    #[inline(always)]
    fn after_write(&mut self, now: i64) {
        self.writes_since_sweep += 1;
        if self.writes_since_sweep >= MIN_WRITES_BETWEEN_SWEEPS.max(self.kept_at_last_sweep) {
            self.sweep(now);
        }
    }

    /// Drop expired entries (out of the way of the write path, which only counts).
    #[cold]
    #[inline(never)]
    fn sweep(&mut self, now: i64) {
        let held = self.table.len();
        let before = now.saturating_sub(SWEEP_GRACE_US);
        self.table.retain(|(_, e)| e.expires_at > before);
        self.writes_since_sweep = 0;
        let kept = self.table.len();
        self.kept_at_last_sweep = kept;
        // A table grown by a burst keeps its size, and every sweep walks all of it: when
        // a sweep leaves a quarter or less of what it found, give the rest back (the
        // rehash costs less than the sweep did).
        if held > 4 * kept.max(MIN_WRITES_BETWEEN_SWEEPS) {
            self.table.shrink_to(2 * kept, rehash(&self.hasher));
        }
    }

    fn apply(&mut self, k: Hashed<'_>, write: Write, now: i64) {
        match write {
            Write::None => return,
            Write::Delete => self.remove(k),
            Write::Put(state, ttl_us) => self.insert(
                k,
                Entry {
                    value: Value::Counter(state),
                    expires_at: now.saturating_add(ttl_us as i64),
                },
            ),
        }
        self.after_write(now);
    }
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: Hasher,
    clock: Box<dyn Clock>,
}

/// The embedded store: no setup, one process, bounded memory.
///
/// State of an identifier is dropped once it can no longer matter (its TTL passed):
/// reads ignore expired entries and each shard sweeps them out as it is written to.
/// Cloning is cheap and clones share state.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.len())
            .finish()
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding the lock cannot leave a shard half-written (every write is
    // one map operation), so a poisoned lock is safe to keep using.
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryStore {
    /// A store on the system clock.
    pub fn new() -> Self {
        wall::warm_up();
        Self::with_clock(SystemClock)
    }

    /// A store on the given clock (for example a [`ManualClock`] in tests).
    pub fn with_clock(clock: impl Clock) -> Self {
        let hasher = Hasher::default();
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(Shard::new(hasher.clone())))
            .collect();
        Self {
            inner: Arc::new(Inner {
                shards,
                hasher,
                clock: Box::new(clock),
            }),
        }
    }

    fn hashed<'k>(&self, key: &'k str) -> Hashed<'k> {
        Hashed {
            key,
            hash: self.inner.hasher.hash_one(key),
        }
    }

    /// Live (unexpired) entries: `(key, time to live)`. For inspection and tests.
    pub fn entries(&self) -> Vec<(String, Duration)> {
        let now = self.inner.clock.now_micros();
        let mut out = Vec::new();
        for shard in self.inner.shards.iter() {
            let shard = lock(shard);
            for (k, e) in shard.table.iter().filter(|(_, e)| e.expires_at > now) {
                out.push((
                    k.to_string(),
                    Duration::from_micros((e.expires_at - now) as u64),
                ));
            }
        }
        out
    }

    /// Entries held, including expired ones not yet swept out.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).table.len()).sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The single-limit fast path: try to take `cost` from `key` under `algorithm`,
    /// synchronously and without allocating (beyond the key's first insertion). The
    /// same decision as [`Store::acquire`] with one check.
    pub fn decide(&self, key: &str, algorithm: &Algorithm, cost: u64) -> Decision {
        self.decide_counter(key, algorithm, cost, true)
    }

    /// One counter limit (not concurrency) under its shard's lock, with one hash lookup
    /// for an existing key: decide and write in place.
    fn decide_counter(&self, key: &str, algorithm: &Algorithm, cost: u64, take: bool) -> Decision {
        let k = self.hashed(key);
        let mut shard = lock(&self.inner.shards[k.shard()]);
        // Read under the lock: a time read before it could be long stale by the time the
        // lock is held (the thread preempted in between), and a stale time would decide
        // in a window that other threads have already left.
        let now = self.inner.clock.now_micros();
        let (o, _) = shard.update::<false>(k, now, |state| {
            algorithm::decide(algorithm, state, now, cost, take)
        });
        o.into()
    }

    /// Synchronous form of [`Store::acquire`].
    pub fn acquire_now(&self, checks: &[LimitCheck]) -> Vec<Decision> {
        if let [
            LimitCheck {
                rule: Rule::Rate(algorithm),
                ..
            },
        ] = checks
        {
            // The common single-limit case: one lock, no bookkeeping.
            let check = &checks[0];
            return vec![self.decide_counter(&check.key, algorithm, check.cost, check.take)];
        }
        let mut guards = self.lock_all(checks.iter().map(|c| &*c.key));
        // Under the locks, as in decide_counter.
        let now = self.inner.clock.now_micros();
        let mut results = Vec::with_capacity(checks.len());
        // Counters are written as they are decided (one lookup each, the usual case is
        // that every check allows) and put back if one denies; slots are written at the
        // end, only if every check allowed.
        let mut writes: SmallVec<[Pending; 4]> = SmallVec::with_capacity(checks.len());
        for (i, c) in checks.iter().enumerate() {
            // A key named twice is decided, like any other, on its state before this
            // acquire (as the Redis script does); the later write wins. (Hashes first:
            // the keys of one call usually differ only near their start, and comparing
            // their hashes reads no bytes.)
            let k = guards.keys[i];
            let earlier = guards.keys[..i]
                .iter()
                .zip(&writes)
                .filter(|(e, _)| e.hash == k.hash && e.key == k.key);
            let before = state_before_acquire(earlier.map(|(_, w)| w), now);
            let (shard, k) = guards.at(i);
            match &c.rule {
                Rule::Concurrency(limit) => {
                    let mut slots = shard.slots(k, now);
                    let (o, wrote) =
                        algorithm::decide_slots(limit, &mut slots, now, c.slot, c.take);
                    results.push(Decision::from(o));
                    writes.push(Pending::Slots(wrote.then_some(slots)));
                }
                Rule::Rate(alg) => {
                    let (o, undo) = shard.update::<true>(k, now, |state| {
                        algorithm::decide(alg, before.unwrap_or(state), now, c.cost, c.take)
                    });
                    results.push(Decision::from(o));
                    writes.push(Pending::Counter(undo));
                }
            }
        }
        if !results.iter().all(|d| d.allowed) {
            // Put back, last first (so a key named twice ends as it began).
            for (i, w) in writes.into_iter().enumerate().rev() {
                if let Pending::Counter(undo) = w {
                    let (shard, k) = guards.at(i);
                    shard.undo(k, undo);
                }
            }
            // A denial takes nothing: report the limits that would have allowed as they
            // are, not as if their cost had been taken.
            for (i, c) in checks.iter().enumerate() {
                if let (true, Rule::Rate(alg)) = (results[i].allowed && c.take, &c.rule) {
                    let (shard, k) = guards.at(i);
                    let (o, _) = algorithm::decide(alg, shard.get(k, now), now, c.cost, false);
                    results[i] = Decision::from(o);
                } else if let (true, Rule::Concurrency(limit)) =
                    (results[i].allowed && c.take, &c.rule)
                {
                    let (shard, k) = guards.at(i);
                    let mut slots = shard.slots(k, now);
                    let (o, _) = algorithm::decide_slots(limit, &mut slots, now, c.slot, false);
                    results[i] = Decision::from(o);
                }
            }
        } else if checks
            .iter()
            .any(|c| matches!(c.rule, Rule::Concurrency(_)))
        {
            for (i, w) in writes.into_iter().enumerate() {
                if let Pending::Slots(Some(slots)) = w {
                    let (shard, k) = guards.at(i);
                    shard.put_slots(k, slots, now);
                }
            }
        }
        results
    }

    /// Synchronous form of [`Store::adjust`].
    pub fn adjust_now(&self, adjustments: &[Adjustment]) -> Vec<Decision> {
        let mut guards = self.lock_all(adjustments.iter().map(|a| &*a.key));
        // Under the locks, as in decide_counter.
        let now = self.inner.clock.now_micros();
        adjustments
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let (shard, k) = guards.at(i);
                match &a.rule {
                    Rule::Concurrency(limit) => {
                        let mut slots = shard.slots(k, now);
                        let o = if a.delta > 0 {
                            algorithm::renew_slot(limit, &mut slots, now, a.slot)
                        } else {
                            algorithm::release_slot(limit, &mut slots, now, a.slot)
                        };
                        shard.put_slots(k, slots, now);
                        Decision::from(o)
                    }
                    Rule::Rate(alg) => {
                        let (o, _) = shard.update::<false>(k, now, |state| {
                            algorithm::adjust(alg, state, now, a.delta, a.window)
                        });
                        Decision::from(o)
                    }
                }
            })
            .collect()
    }

    /// Synchronous form of [`Store::delete`]: every key at once (their shards locked
    /// together), so a concurrent call sees all of them or none deleted.
    pub fn delete_now(&self, keys: &[String]) {
        let mut guards = self.lock_all(keys.iter().map(String::as_str));
        for i in 0..keys.len() {
            let (shard, k) = guards.at(i);
            shard.remove(k);
        }
    }

    /// Synchronous form of [`Store::delete_identifier`]. An identifier's keys are spread
    /// over the shards, so every shard is locked (in ascending order, as calls lock
    /// theirs) before any is swept: a concurrent call of that identifier is counted on
    /// all of its limits or on none.
    pub fn delete_identifier_now(&self, prefixes: &[String], tag: &str) {
        let keys = super::IdentifierKeys::new(prefixes.to_vec(), tag);
        let mut shards: Vec<_> = self.inner.shards.iter().map(lock).collect();
        for shard in &mut shards {
            shard.table.retain(|(key, _)| !keys.contains(key));
        }
    }

    /// Lock the shards of every key, in ascending shard order (so concurrent calls
    /// cannot deadlock), each once.
    fn lock_all<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Guards<'_, 'k> {
        let mut hashed: SmallVec<[Hashed<'k>; 4]> = SmallVec::new();
        // The shards to lock as a bit set (there are 64): ascending order and no
        // duplicates come from walking its bits, with no sort.
        let mut shards = 0u64;
        for key in keys {
            let k = self.hashed(key);
            shards |= 1 << k.shard();
            hashed.push(k);
        }
        let mut guards = SmallVec::new();
        let mut guard_of = [0u8; SHARDS];
        let mut rest = shards;
        while rest != 0 {
            let i = rest.trailing_zeros() as usize;
            guard_of[i] = guards.len() as u8;
            guards.push(lock(&self.inner.shards[i]));
            rest &= rest - 1;
        }
        Guards {
            keys: hashed,
            guard_of,
            guards,
        }
    }
}

/// What an acquire did or will do to one key: a counter written in place (and how to
/// undo it), or slots to write only if every check allowed.
enum Pending {
    Counter(Undo),
    Slots(Option<Slots>),
}

/// A counter's state before the acquire, from what the acquire's earlier checks of the
/// same key wrote over it (the first write kept it in its undo); `None` when none of
/// them wrote, so the stored state still is that.
fn state_before_acquire<'a>(
    mut earlier: impl Iterator<Item = &'a Pending>,
    now: i64,
) -> Option<Option<State>> {
    earlier.find_map(|w| match w {
        Pending::Counter(Undo::Remove) => Some(None),
        Pending::Counter(Undo::Restore(Value::Counter(s), expires_at)) => {
            Some((*expires_at > now).then_some(*s))
        }
        Pending::Counter(Undo::Restore(Value::Slots(_), _)) => Some(None),
        Pending::Counter(Undo::Nothing) | Pending::Slots(_) => None,
    })
}

/// Shard guards held for one multi-key operation, taken in ascending shard order so
/// concurrent operations cannot deadlock.
struct Guards<'a, 'k> {
    keys: SmallVec<[Hashed<'k>; 4]>,
    /// Where each locked shard's guard is in `guards` (in ascending shard order).
    guard_of: [u8; SHARDS],
    guards: SmallVec<[MutexGuard<'a, Shard>; 4]>,
}

impl<'k> Guards<'_, 'k> {
    /// The `i`th key of the operation and its (locked) shard.
    fn at(&mut self, i: usize) -> (&mut Shard, Hashed<'k>) {
        let k = self.keys[i];
        (&mut self.guards[usize::from(self.guard_of[k.shard()])], k)
    }
}

impl Store for MemoryStore {
    // Every operation is decided when called: the answer is ready, with nothing to poll.

    fn acquire(&self, checks: &[LimitCheck]) -> StoreFuture<Vec<Decision>> {
        StoreFuture::ready(Ok(self.acquire_now(checks)))
    }

    fn adjust(&self, adjustments: &[Adjustment], _: Option<u64>) -> StoreFuture<Vec<Decision>> {
        // In-process operations are never ambiguous, so there is nothing to deduplicate.
        StoreFuture::ready(Ok(self.adjust_now(adjustments)))
    }

    fn delete(&self, keys: Vec<String>) -> StoreFuture<()> {
        self.delete_now(&keys);
        StoreFuture::ready(Ok(()))
    }

    fn delete_identifier(&self, prefixes: Vec<String>, tag: String) -> StoreFuture<()> {
        self.delete_identifier_now(&prefixes, &tag);
        StoreFuture::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StateKey;

    /// An identifier deleted while its calls run is deleted from all of its limits at
    /// once: every call is counted on both of its limits or on neither, though the two
    /// keys live in different shards.
    #[test]
    fn an_identifier_is_deleted_from_all_its_limits_at_once() {
        use crate::algorithm::FixedWindow;
        let rule: Rule = FixedWindow::new(1 << 40, Duration::from_secs(3600))
            .unwrap()
            .into();
        let check = |key: &StateKey| LimitCheck {
            key: key.clone(),
            rule,
            cost: 1,
            take: true,
            slot: 0,
        };
        let used = |store: &MemoryStore, key: &StateKey| {
            let mut read = check(key);
            read.take = false;
            (1u64 << 40) - store.acquire_now(&[read])[0].remaining
        };
        let mut torn = Vec::new();
        for trial in 0..40 {
            let store = MemoryStore::new();
            let tag = format!("del{trial}");
            let (rpm, tpm): (StateKey, StateKey) = (
                super::super::state_key("t:rpm", &tag).into(),
                super::super::state_key("t:tpm", &tag).into(),
            );
            // The case under test: the two keys in different shards (the hasher's seed
            // is random; 63 times in 64 they are).
            if store.hashed(&rpm).shard() == store.hashed(&tpm).shard() {
                continue;
            }
            let stop = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        store.acquire_now(&[check(&rpm), check(&tpm)]);
                    }
                });
                s.spawn(|| {
                    for _ in 0..500 {
                        store.delete_identifier_now(&["t:".to_owned()], &tag);
                    }
                    stop.store(true, Ordering::Relaxed);
                });
            });
            let (a, b) = (used(&store, &rpm), used(&store, &tpm));
            if a != b {
                torn.push((trial, a, b));
            }
        }
        assert!(
            torn.is_empty(),
            "(trial, requests, tokens) counted apart: {torn:?}"
        );
    }

    /// A store on a manual clock.
    fn on_a_manual_clock() -> (MemoryStore, ManualClock) {
        let clock = ManualClock::new(Duration::from_secs(1_800_000_000));
        (MemoryStore::with_clock(clock.clone()), clock)
    }

    /// A fixed window of `limit` per millisecond.
    fn per_millisecond(limit: u64) -> Algorithm {
        crate::algorithm::FixedWindow::new(limit, Duration::from_millis(1))
            .unwrap()
            .into()
    }

    /// Expired entries are swept while every write inserts a new key (one identifier per
    /// call, a client address say): the store holds about what is live, not everything
    /// ever written.
    #[test]
    fn expired_entries_are_swept_while_every_write_is_a_new_key() {
        let (store, clock) = on_a_manual_clock();
        let alg = per_millisecond(3);
        let mut most = 0;
        for i in 0..200_000u64 {
            store.decide(&format!("ip:{{{i}}}"), &alg, 1);
            if i % 1000 == 999 {
                // The last 1000 keys were live; they all expire now.
                clock.advance(Duration::from_secs(1));
                most = most.max(store.len());
            }
        }
        // Per shard: what the last sweep kept (~1000 / 64 live), twice, plus 256 writes.
        assert!(
            most <= SHARDS * (2 * 32 + MIN_WRITES_BETWEEN_SWEEPS),
            "held {most}"
        );
    }

    /// A burst of short-lived keys does not leave its tables' capacity behind: once
    /// swept, a shard gives the empty part back, so later sweeps walk what is held.
    #[test]
    fn a_burst_of_keys_gives_its_capacity_back_once_swept() {
        let (store, clock) = on_a_manual_clock();
        let alg = per_millisecond(3);
        for i in 0..100_000u64 {
            store.decide(&format!("burst:{{{i}}}"), &alg, 1);
        }
        clock.advance(Duration::from_secs(1));
        // Then hot keys (enough that every shard has some), written often enough that
        // every shard sweeps.
        let hot = per_millisecond(1 << 40);
        for i in 0..400_000u64 {
            store.decide(&format!("hot:{{{}}}", i % 4096), &hot, 1);
        }
        let bytes: usize = store
            .inner
            .shards
            .iter()
            .map(|s| lock(s).table.allocation_size())
            .sum();
        assert!(store.len() <= 4096 + 1024, "held {}", store.len());
        // 4 096 live entries take about 0.5 MB; the burst's 100 000 took about 8 MB.
        assert!(
            bytes <= 2 << 20,
            "{bytes} bytes of tables left after the burst"
        );
    }

    /// A sweep leaves an entry a little past its expiry alone: a thread whose clock is
    /// a little behind the sweeper's still counts in that entry's window, and finding it
    /// gone would let that window's limit through again.
    #[test]
    fn a_sweep_keeps_what_a_thread_slightly_behind_still_counts_in() {
        let (store, clock) = on_a_manual_clock();
        let alg = per_millisecond(100);
        let start = Duration::from_secs(1_800_000_000);
        // 100 calls at the end of the window [start, start + 1 ms).
        clock.set(start + Duration::from_micros(900));
        for _ in 0..100 {
            assert!(store.decide("behind:{one}", &alg, 1).allowed);
        }
        // A thread 0.3 ms ahead, past the window, sweeps the key's shard.
        clock.set(start + Duration::from_micros(1_200));
        let k = store.hashed("behind:{one}");
        lock(&store.inner.shards[k.shard()]).sweep(clock.now_micros());
        // Then one 0.3 ms behind it, still in the window: the window is full.
        clock.set(start + Duration::from_micros(950));
        let d = store.decide("behind:{one}", &alg, 1);
        assert!(!d.allowed, "a 101st call in a window of 100 got through");
    }

    /// An anchor read across a hold-up (between the counter readings around the OS
    /// clock's) is read again: the anchor pairs the OS time with the counter at it.
    #[test]
    fn an_anchor_read_across_a_hold_up_is_read_again() {
        // Counter readings: 100 and then 5 100 around the first OS reading (held up
        // 5 000 ticks), 6 000 and 6 010 around the second.
        let mut counter = [100u64, 5_100, 6_000, 6_010].into_iter();
        let mut os = [1_000i64, 1_590].into_iter();
        let (raw, wall_us) =
            wall::anchor_reading(|| counter.next().unwrap(), || os.next().unwrap(), 20);
        assert_eq!((raw, wall_us), (6_005, 1_590));
        // Held up on every attempt: the closest pair.
        let mut counter = [0u64, 900, 1_000, 1_300, 2_000, 2_500, 3_000, 3_400].into_iter();
        let mut os = [10i64, 20, 30, 40].into_iter();
        let (raw, wall_us) =
            wall::anchor_reading(|| counter.next().unwrap(), || os.next().unwrap(), 20);
        assert_eq!((raw, wall_us), (1_150, 20));
    }

    /// The fast clock stays with the OS's wall clock: within a millisecond of it on
    /// every read, across sleeps and past a re-anchoring.
    #[test]
    fn system_clock_follows_the_wall_clock() {
        let clock = SystemClock;
        let deadline = std::time::Instant::now() + Duration::from_millis(1300);
        let mut reads = 0;
        while std::time::Instant::now() < deadline {
            let before = wall::os_micros();
            let fast = clock.now_micros();
            let after = wall::os_micros();
            assert!(
                fast >= before - 1000 && fast <= after + 1000,
                "{fast} outside [{before}, {after}] ± 1 ms"
            );
            reads += 1;
            std::thread::sleep(Duration::from_millis(if reads % 2 == 0 { 1 } else { 37 }));
        }
        assert!(reads > 20);
    }
}
