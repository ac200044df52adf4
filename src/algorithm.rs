//! The three rate-limiting algorithms and their exact arithmetic.
//!
//! Every store evaluates the same functions: [`MemoryStore`](crate::MemoryStore) calls
//! them directly, and the Lua scripts under `src/store/lua/` are line-for-line ports
//! (Redis Lua numbers are IEEE doubles, so every quantity stays below 2^53 and the one
//! fractional step, the sliding-window weight, is computed with the same operations in
//! the same order on both sides).
//!
//! # Units
//!
//! Time is in microseconds since the Unix epoch (`now`), durations in microseconds.
//! Quotas and costs are whole units (requests or tokens), at most [`MAX_UNITS`].
//! Counters are signed so that `charge` can record debt; they saturate at
//! ±[`MAX_COUNTER`].
//!
//! # The rules (all algorithms)
//!
//! * A take of `cost` is allowed iff it fits: `used + cost <= limit` (bucket:
//!   `tokens >= cost`). A denied take writes nothing. A take of cost 0 is a read.
//! * `charge(n)` always records, past the limit if need be (debt).
//! * `refund(n)` gives units back, never beyond a full budget.
//! * Every state written carries a TTL no longer than the state can matter:
//!   fixed window: until the window ends; sliding window: until the end of the next
//!   window; bucket: until it has refilled to full. A state equal to "absent" is deleted.

use std::time::Duration;

use crate::error::Error;

/// The largest quota or cost accepted: 2^40 (about 1.1 × 10^12) units.
///
/// Keeps every intermediate value of the Lua port exact in an IEEE double.
pub const MAX_UNITS: u64 = 1 << 40;

/// Counters (usage or bucket tokens, including debt) saturate at ± this value (2^52).
pub const MAX_COUNTER: i64 = 1 << 52;

/// The shortest window or refill interval accepted: 1 ms.
pub const MIN_WINDOW: Duration = Duration::from_millis(1);

/// The longest window or refill interval accepted: 10 years of 365 days.
pub const MAX_WINDOW: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// TTLs are capped here (about 140 years, in ms) so a huge debt still expires.
const MAX_TTL_US: i64 = 1 << 52;

fn check_units(what: &str, value: u64) -> Result<(), Error> {
    if value == 0 || value > MAX_UNITS {
        return Err(Error::invalid_input(format!(
            "{what} must be between 1 and {MAX_UNITS}, got {value}"
        )));
    }
    Ok(())
}

fn check_window(what: &str, window: Duration) -> Result<u64, Error> {
    if window < MIN_WINDOW || window > MAX_WINDOW {
        return Err(Error::invalid_input(format!(
            "{what} must be between {MIN_WINDOW:?} and {MAX_WINDOW:?}, got {window:?}"
        )));
    }
    // In range, so the microsecond count fits easily in u64 (and below 2^53).
    Ok(window.as_micros() as u64)
}

/// Windows aligned to multiples of `window` since the Unix epoch; at most `limit` units
/// per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FixedWindow {
    limit: u64,
    window_us: u64,
}

impl FixedWindow {
    /// `limit` units per `window`. Errors if `limit` is 0 or above [`MAX_UNITS`], or the
    /// window is outside [`MIN_WINDOW`]..=[`MAX_WINDOW`].
    pub fn new(limit: u64, window: Duration) -> Result<Self, Error> {
        check_units("fixed window limit", limit)?;
        let window_us = check_window("fixed window length", window)?;
        Ok(Self { limit, window_us })
    }

    /// The quota per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        Duration::from_micros(self.window_us)
    }
}

/// A sliding window: the current window's count plus the previous window's count
/// weighted by the share of the previous window still inside the sliding span.
///
/// With elapsed time `e` into the current window of length `W`:
/// `used = current + ceil(previous × (W − e) / W)`. Rounding up never lets more
/// through than the exact weighted count would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlidingWindow {
    limit: u64,
    window_us: u64,
}

impl SlidingWindow {
    /// `limit` units per sliding `window`. Same bounds as [`FixedWindow::new`].
    pub fn new(limit: u64, window: Duration) -> Result<Self, Error> {
        check_units("sliding window limit", limit)?;
        let window_us = check_window("sliding window length", window)?;
        Ok(Self { limit, window_us })
    }

    /// The quota per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        Duration::from_micros(self.window_us)
    }
}

/// A token bucket that starts full with `capacity` units and gains `refill` units every
/// `interval` (in whole intervals), capped at `capacity`.
///
/// The refill clock starts when a full bucket is first drawn from: a bucket that is full
/// has nothing to refill, so its phase is irrelevant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenBucket {
    capacity: u64,
    refill: u64,
    interval_us: u64,
}

impl TokenBucket {
    /// A bucket of `capacity` units refilled by `refill` units every `interval`.
    pub fn new(capacity: u64, refill: u64, interval: Duration) -> Result<Self, Error> {
        check_units("token bucket capacity", capacity)?;
        check_units("token bucket refill", refill)?;
        let interval_us = check_window("token bucket refill interval", interval)?;
        Ok(Self {
            capacity,
            refill,
            interval_us,
        })
    }

    /// The bucket's capacity (its quota).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Units added per interval.
    pub fn refill(&self) -> u64 {
        self.refill
    }

    /// The refill interval.
    pub fn interval(&self) -> Duration {
        Duration::from_micros(self.interval_us)
    }
}

/// At most `max` calls in flight per identifier. Each call holds a slot until it ends,
/// or until its `lease` runs out if the process holding it died (crash safety): choose a
/// lease longer than your longest call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConcurrencyLimit {
    max: u64,
    lease_us: u64,
}

impl ConcurrencyLimit {
    /// The parameters as sent to the Lua scripts: `[4, max, lease µs]` (the slot id
    /// travels apart).
    #[cfg(feature = "redis")]
    pub(crate) fn script_params(&self) -> [u64; 3] {
        [4, self.max, self.lease_us]
    }

    /// At most `max` calls in flight, each slot expiring after `lease` at the latest.
    pub fn new(max: u64, lease: Duration) -> Result<Self, Error> {
        check_units("concurrency limit", max)?;
        let lease_us = check_window("concurrency lease", lease)?;
        Ok(Self { max, lease_us })
    }

    /// Calls allowed in flight.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// How long a slot lives if never released.
    pub fn lease(&self) -> Duration {
        Duration::from_micros(self.lease_us)
    }
}

/// In-flight slots of one identifier: `(slot id, lease end µs)`.
pub(crate) type Slots = Vec<(u64, i64)>;

/// Take (when `take`) slot `slot` if fewer than `max` unexpired slots are held.
/// Expired slots are dropped first. `reset_after` and `retry_after` are the time until
/// the earliest lease ends: an upper bound on when a slot frees up.
pub(crate) fn decide_slots(
    limit: &ConcurrencyLimit,
    slots: &mut Slots,
    now: i64,
    slot: u64,
    take: bool,
) -> (Outcome, bool) {
    slots.retain(|(_, end)| *end > now);
    let held = slots.len() as u64;
    let allowed = held < limit.max;
    let wrote = allowed && take;
    if wrote {
        slots.push((slot, now + limit.lease_us as i64));
    }
    let mut outcome = slots_outcome(limit, slots, now);
    outcome.allowed = allowed;
    outcome.retry_after_us = (!allowed).then_some(outcome.reset_after_us.max(1));
    (outcome, wrote)
}

/// The state of held `slots` at `now` (expired ones already dropped), as an allowed
/// outcome: `reset_after` is the time until the earliest lease ends.
fn slots_outcome(limit: &ConcurrencyLimit, slots: &Slots, now: i64) -> Outcome {
    let earliest = slots
        .iter()
        .map(|(_, end)| *end)
        .min()
        .map_or(0, |end| (end - now).max(0) as u64);
    Outcome {
        allowed: true,
        limit: limit.max,
        remaining: limit.max.saturating_sub(slots.len() as u64),
        reset_after_us: earliest,
        retry_after_us: None,
        window: None,
    }
}

/// Release slot `slot` (a no-op if it already expired).
pub(crate) fn release_slot(
    limit: &ConcurrencyLimit,
    slots: &mut Slots,
    now: i64,
    slot: u64,
) -> Outcome {
    slots.retain(|(id, end)| *end > now && *id != slot);
    slots_outcome(limit, slots, now)
}

/// Extend slot `slot`'s lease to `lease` from `now` (a call still running); a no-op if
/// the slot is no longer held.
pub(crate) fn renew_slot(
    limit: &ConcurrencyLimit,
    slots: &mut Slots,
    now: i64,
    slot: u64,
) -> Outcome {
    slots.retain(|(_, end)| *end > now);
    for (id, end) in slots.iter_mut() {
        if *id == slot {
            *end = now + limit.lease_us as i64;
        }
    }
    slots_outcome(limit, slots, now)
}

/// One of the rate algorithms with its quota. (A [`ConcurrencyLimit`] is not a rate
/// algorithm and cannot be used as one.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// See [`FixedWindow`].
    FixedWindow(FixedWindow),
    /// See [`SlidingWindow`].
    SlidingWindow(SlidingWindow),
    /// See [`TokenBucket`].
    TokenBucket(TokenBucket),
}

impl From<FixedWindow> for Algorithm {
    fn from(a: FixedWindow) -> Self {
        Algorithm::FixedWindow(a)
    }
}
impl From<SlidingWindow> for Algorithm {
    fn from(a: SlidingWindow) -> Self {
        Algorithm::SlidingWindow(a)
    }
}
impl From<TokenBucket> for Algorithm {
    fn from(a: TokenBucket) -> Self {
        Algorithm::TokenBucket(a)
    }
}

impl Algorithm {
    /// The quota: units per window, or the bucket's capacity.
    pub fn limit(&self) -> u64 {
        match self {
            Algorithm::FixedWindow(a) => a.limit,
            Algorithm::SlidingWindow(a) => a.limit,
            Algorithm::TokenBucket(a) => a.capacity,
        }
    }

    /// The time over which the quota applies: the window, or the time a bucket takes to
    /// refill from empty (used for `RateLimit-Policy` headers).
    pub fn period(&self) -> Duration {
        match self {
            Algorithm::FixedWindow(a) => a.window(),
            Algorithm::SlidingWindow(a) => a.window(),
            Algorithm::TokenBucket(a) => {
                let intervals = a.capacity.div_ceil(a.refill);
                Duration::from_micros(intervals.saturating_mul(a.interval_us))
            }
        }
    }

    /// The parameters as sent to the Lua scripts: `[code, p1, p2, p3]`.
    #[cfg(feature = "redis")]
    pub(crate) fn script_params(&self) -> [u64; 4] {
        match self {
            Algorithm::FixedWindow(a) => [1, a.limit, a.window_us, 0],
            Algorithm::SlidingWindow(a) => [2, a.limit, a.window_us, 0],
            Algorithm::TokenBucket(a) => [3, a.capacity, a.refill, a.interval_us],
        }
    }
}

/// Persisted state of one key. Field meaning depends on the algorithm:
///
/// | algorithm | `a`          | `b`            | `c`              |
/// |-----------|--------------|----------------|------------------|
/// | fixed     | window index | used           | –                |
/// | sliding   | window index | used (current) | used (previous)  |
/// | bucket    | used (capacity − tokens; > capacity is debt) | last refill µs | – |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct State {
    pub a: i64,
    pub b: i64,
    pub c: i64,
}

/// What one evaluation concluded, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    pub reset_after_us: u64,
    /// `None`: the cost can never pass (cost > limit), or the decision was allowed.
    pub retry_after_us: Option<u64>,
    /// Fixed and sliding windows: the index of the window the decision was made in
    /// (`now / window`). A reservation taken here is refunded only into this window.
    pub window: Option<i64>,
}

/// The write an evaluation asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Write {
    /// Leave the key as it is.
    None,
    /// Store this state with this TTL (µs, > 0).
    Put(State, u64),
    /// The new state equals "absent": delete the key.
    Delete,
}

fn clamp_counter(v: i64) -> i64 {
    v.clamp(-MAX_COUNTER, MAX_COUNTER)
}

fn remaining_of(limit: u64, used: i64) -> u64 {
    (limit as i64 - used).max(0) as u64
}

fn ttl(us: i64) -> u64 {
    us.clamp(1, MAX_TTL_US) as u64
}

/// `ceil(previous × (W − e) / W)` with the exact double operations the Lua port uses.
fn sliding_weighted(previous: i64, window_us: i64, elapsed_us: i64) -> i64 {
    if previous <= 0 {
        return previous.max(0);
    }
    let w = (previous as f64) * ((window_us - elapsed_us) as f64) / (window_us as f64);
    w.ceil() as i64
}

/// Normalized per-algorithm view at time `now`.
struct View {
    /// fixed/sliding: current-window used; bucket: tokens.
    current: i64,
    /// sliding: previous-window used.
    previous: i64,
    /// fixed/sliding: window index; bucket: last refill time.
    anchor: i64,
}

/// The state a decision reads and the time it is made at: `now`, or the start of the
/// state's window (fixed and sliding) or its last refill (bucket) if that is later.
///
/// A state from "the future" was written by a caller whose clock read later than this
/// one's (two threads whose clock reads and lock acquisitions are ordered differently,
/// clocks of different processes, a Redis failover to a server whose clock is behind).
/// Deciding at the state's time counts this call in the window the state is in, and
/// writes it back there; deciding at the earlier `now` would write the state back under
/// the older window, and the newer window would lose its count.
///
/// But a window state starting more than one window after `now` is not explained by
/// clocks, which differ by far less than a window: it was written under another window
/// length (the limit was reconfigured, say from a minute to an hour), and its window
/// index means nothing under this one. It is read as absent, so a changed window length
/// starts its count afresh; read as "the future", it would hold its count until a window
/// centuries away. The Lua port applies the same rules.
#[inline(always)]
fn effective(alg: &Algorithm, state: Option<State>, now: i64) -> (Option<State>, i64) {
    let Some(s) = state else {
        return (None, now);
    };
    match alg {
        Algorithm::FixedWindow(FixedWindow { window_us, .. })
        | Algorithm::SlidingWindow(SlidingWindow { window_us, .. }) => {
            let w = *window_us as i64;
            let from = s.a.saturating_mul(w);
            if from <= now {
                (state, now)
            } else if from <= now.saturating_add(w) {
                (state, from)
            } else {
                (None, now)
            }
        }
        Algorithm::TokenBucket(_) => (state, now.max(s.b)),
    }
}

/// The index of the window holding `now`, `now / window_us`, found without dividing
/// when `now` lies in the state's window or the next one (the usual case: a 64-bit
/// division takes longer than the rest of a decision). The same result as the division
/// for every input: the shortcut is taken only where both are `floor(now / window_us)`.
#[inline(always)]
fn window_index(now: i64, window_us: i64, state: Option<State>) -> i64 {
    if let Some(s) = state
        && s.a >= 0
        && let Some(start) = s.a.checked_mul(window_us)
        && now >= start
    {
        // 0 <= start <= now: no overflow. a·w <= now < (a+1)·w  ⇔  floor(now / w) = a.
        let into = now - start;
        if into < window_us {
            return s.a;
        }
        // (a+1)·w <= now < (a+2)·w: a + 1 <= now / w, so it does not overflow.
        if into - window_us < window_us {
            return s.a + 1;
        }
    }
    now / window_us
}

/// `elapsed / interval` for `elapsed >= 0`, `interval > 0`, without dividing when less
/// than one interval has passed (a bucket decided again within its refill interval).
fn whole_intervals(elapsed: i64, interval: i64) -> i64 {
    if elapsed < interval {
        0
    } else {
        elapsed / interval
    }
}

/// `ceil(missing / refill)` for `refill > 0`, without dividing when one refill covers it.
fn refills_to_cover(missing: u64, refill: u64) -> u64 {
    if missing <= refill {
        u64::from(missing > 0)
    } else {
        missing.div_ceil(refill)
    }
}

#[inline(always)]
fn view(alg: &Algorithm, state: Option<State>, now: i64) -> View {
    match alg {
        Algorithm::FixedWindow(a) => {
            let idx = window_index(now, a.window_us as i64, state);
            let current = match state {
                // Never later than `effective`: a state is from this window or older.
                Some(s) if s.a >= idx => s.b,
                _ => 0,
            };
            View {
                current,
                previous: 0,
                anchor: idx,
            }
        }
        Algorithm::SlidingWindow(a) => {
            let idx = window_index(now, a.window_us as i64, state);
            let (current, previous) = match state {
                Some(s) if s.a >= idx => (s.b, s.c),
                Some(s) if s.a == idx - 1 => (0, s.b),
                _ => (0, 0),
            };
            View {
                current,
                previous,
                anchor: idx,
            }
        }
        Algorithm::TokenBucket(b) => {
            let cap = b.capacity as i64;
            let (tokens, last) = match state {
                None => (cap, now),
                Some(s) => {
                    // The state keeps what is *used* (not what is left), so a changed
                    // capacity (a tenant's new quota) keeps what was used.
                    let intervals = whole_intervals((now - s.b).max(0), b.interval_us as i64);
                    let (used, last) = if intervals == 0 {
                        // Decided again within the refill interval: nothing refilled.
                        (s.a, s.b)
                    } else {
                        let refilled = intervals as i128 * b.refill as i128;
                        let used = (s.a as i128 - refilled).max(0) as i64;
                        (used, s.b + intervals * b.interval_us as i64)
                    };
                    if used <= 0 {
                        (cap, now)
                    } else {
                        (cap - used, last)
                    }
                }
            };
            View {
                current: tokens,
                previous: 0,
                anchor: last,
            }
        }
    }
}

/// Units in use at `now` for a window view (sliding: weighted).
#[inline(always)]
fn used(alg: &Algorithm, v: &View, now: i64) -> i64 {
    match alg {
        Algorithm::FixedWindow(_) => v.current,
        Algorithm::SlidingWindow(a) => {
            let w = a.window_us as i64;
            v.current + sliding_weighted(v.previous, w, now - v.anchor * w)
        }
        Algorithm::TokenBucket(b) => b.capacity as i64 - v.current,
    }
}

/// Time until the budget is fully restored (fixed window: until the window rolls).
#[inline(always)]
fn reset_after(alg: &Algorithm, v: &View, now: i64) -> i64 {
    match alg {
        Algorithm::FixedWindow(a) => (v.anchor + 1) * a.window_us as i64 - now,
        Algorithm::SlidingWindow(a) => {
            let w = a.window_us as i64;
            if v.current > 0 {
                (v.anchor + 2) * w - now
            } else if v.previous > 0 {
                (v.anchor + 1) * w - now
            } else {
                0
            }
        }
        Algorithm::TokenBucket(b) => {
            let missing = b.capacity as i64 - v.current;
            if missing <= 0 {
                0
            } else {
                // Saturating: a huge debt under a long interval is "practically never".
                let intervals = refills_to_cover(missing as u64, b.refill) as i64;
                intervals
                    .saturating_mul(b.interval_us as i64)
                    .saturating_add(v.anchor)
                    .saturating_sub(now)
            }
        }
    }
}

/// Earliest time from `now` at which `cost` (≤ limit) would fit, if nothing else happens.
fn retry_after(alg: &Algorithm, v: &View, now: i64, cost: i64) -> i64 {
    match alg {
        Algorithm::FixedWindow(a) => (v.anchor + 1) * a.window_us as i64 - now,
        Algorithm::SlidingWindow(a) => {
            let w = a.window_us as i64;
            let wf = w as f64;
            let limit = a.limit as i64;
            let elapsed = now - v.anchor * w;
            let room = limit - cost - v.current;
            if room >= 0 {
                // Wait in this window until ceil(previous × (W − e)/W) ≤ room.
                let e = (wf - (room as f64) * wf / (v.previous as f64)).ceil() as i64;
                (e - elapsed).max(1)
            } else {
                // Next window: the current count becomes the previous one.
                let to_next = (v.anchor + 1) * w - now;
                let room_next = limit - cost;
                if v.current <= room_next {
                    to_next.max(1)
                } else {
                    let e = (wf - (room_next as f64) * wf / (v.current as f64)).ceil() as i64;
                    to_next + e.max(0)
                }
            }
        }
        Algorithm::TokenBucket(b) => {
            let missing = (cost - v.current) as u64;
            let intervals = missing.div_ceil(b.refill) as i64;
            intervals
                .saturating_mul(b.interval_us as i64)
                .saturating_add(v.anchor)
                .saturating_sub(now)
                .max(1)
        }
    }
}

fn state_of(alg: &Algorithm, v: &View) -> State {
    match alg {
        Algorithm::FixedWindow(_) => State {
            a: v.anchor,
            b: v.current,
            c: 0,
        },
        Algorithm::SlidingWindow(_) => State {
            a: v.anchor,
            b: v.current,
            c: v.previous,
        },
        Algorithm::TokenBucket(b) => State {
            a: clamp_counter(b.capacity as i64 - v.current),
            b: v.anchor,
            c: 0,
        },
    }
}

fn is_empty_state(alg: &Algorithm, v: &View) -> bool {
    match alg {
        Algorithm::FixedWindow(_) => v.current == 0,
        Algorithm::SlidingWindow(_) => v.current == 0 && v.previous == 0,
        Algorithm::TokenBucket(b) => v.current >= b.capacity as i64,
    }
}

/// The write of state `v`, whose budget is fully restored `reset` µs after the decision
/// was made at `now`: the state matters exactly until then. The store counts its TTL from
/// its own clock, `store_now`, which is earlier than `now` when the decision was made in
/// a state's window that the caller's clock has not reached yet.
#[inline(always)]
fn write_of(alg: &Algorithm, v: &View, reset: i64, now: i64, store_now: i64) -> Write {
    if is_empty_state(alg, v) {
        Write::Delete
    } else {
        Write::Put(state_of(alg, v), ttl(reset + (now - store_now)))
    }
}

fn outcome(alg: &Algorithm, v: &View, now: i64, allowed: bool, retry: Option<i64>) -> Outcome {
    outcome_of(
        alg,
        v,
        used(alg, v, now),
        reset_after(alg, v, now),
        allowed,
        retry,
    )
}

/// The window index a view stands in (fixed and sliding windows only).
fn window_of(alg: &Algorithm, v: &View) -> Option<i64> {
    match alg {
        Algorithm::FixedWindow(_) | Algorithm::SlidingWindow(_) => Some(v.anchor),
        Algorithm::TokenBucket(_) => None,
    }
}

/// The outcome from values already computed (the hot path computes each once).
#[inline(always)]
fn outcome_of(
    alg: &Algorithm,
    v: &View,
    used: i64,
    reset_after_us: i64,
    allowed: bool,
    retry: Option<i64>,
) -> Outcome {
    let limit = alg.limit();
    Outcome {
        window: window_of(alg, v),
        allowed,
        limit,
        remaining: remaining_of(limit, used),
        // Capped like TTLs (about 140 years), the same in the Lua port.
        reset_after_us: reset_after_us.clamp(0, MAX_TTL_US) as u64,
        retry_after_us: retry.map(|r| r.clamp(1, MAX_TTL_US) as u64),
    }
}

/// `$body` (which uses `$alg`) in one copy per algorithm: within each copy the compiler
/// knows which algorithm `$alg` is and drops the per-step `match`es on it (a fifth of a
/// decision). A macro: a function taking the body as a closure measured 26 instructions
/// slower per decision, its copies not kept apart.
macro_rules! per_algorithm {
    ($alg:expr, $body:expr) => {
        match $alg {
            Algorithm::FixedWindow(_) => $body,
            Algorithm::SlidingWindow(_) => $body,
            Algorithm::TokenBucket(_) => $body,
        }
    };
}

/// Decide whether `cost` fits at `now`; when `take` is set and it fits, take it.
///
/// `take = false` evaluates the same condition without writing (the `CheckRemaining`
/// mode uses it with cost 1: "allowed iff remaining > 0").
pub(crate) fn decide(
    alg: &Algorithm,
    state: Option<State>,
    now: i64,
    cost: u64,
    take: bool,
) -> (Outcome, Write) {
    // Beyond 2^53 every cost is the same (more than any limit, it never fits), and none
    // overflows the arithmetic below; the Redis scripts take costs as doubles, exact to
    // 2^53, the same.
    let cost = cost.min(1 << 53);
    per_algorithm!(alg, decide_as(alg, state, now, cost, take))
}

#[inline(always)]
fn decide_as(
    alg: &Algorithm,
    state: Option<State>,
    now: i64,
    cost: u64,
    take: bool,
) -> (Outcome, Write) {
    let store_now = now;
    let (state, now) = effective(alg, state, now);
    let mut v = view(alg, state, now);
    let cost_i = cost as i64;
    let used_now = used(alg, &v, now);
    let fits = used_now + cost_i <= alg.limit() as i64;
    if !fits {
        let retry = if cost > alg.limit() {
            None
        } else {
            Some(retry_after(alg, &v, now, cost_i))
        };
        return (outcome(alg, &v, now, false, retry), Write::None);
    }
    if !take || cost == 0 {
        let reset = reset_after(alg, &v, now);
        return (
            outcome_of(alg, &v, used_now, reset, true, None),
            Write::None,
        );
    }
    match alg {
        Algorithm::TokenBucket(_) => v.current -= cost_i,
        _ => v.current += cost_i,
    }
    // Taking adds exactly `cost` to what is used (the previous window's weight and the
    // bucket's refill do not change), so `used` is not computed again.
    let reset = reset_after(alg, &v, now);
    let write = write_of(alg, &v, reset, now, store_now);
    (
        outcome_of(alg, &v, used_now + cost_i, reset, true, None),
        write,
    )
}

/// Apply a forced debit (`delta > 0`, may create debt) or a refund (`delta < 0`, never
/// beyond a full budget). The outcome's `allowed` says whether the budget is within its
/// limit afterwards (`used <= limit`).
///
/// A refund with `window = Some(w)` gives units back only to window `w`, the window that
/// paid for them (a reservation taken at 0:59 and settled at 1:01 must not make room in
/// the window starting at 1:00):
///
/// * fixed window: into the current window if it is `w`; dropped once `w` has rolled;
/// * sliding window: from the current count if it is `w` (never more than that count),
///   from the previous window's count if `w` is the previous window, dropped if older;
/// * token bucket: refunds are capped at a full bucket; `window` is ignored.
///
/// Without `window`, a refund comes off the current window first, then the previous one.
/// Charges always land in the current window.
pub(crate) fn adjust(
    alg: &Algorithm,
    state: Option<State>,
    now: i64,
    delta: i64,
    window: Option<i64>,
) -> (Outcome, Write) {
    per_algorithm!(alg, adjust_as(alg, state, now, delta, window))
}

#[inline(always)]
fn adjust_as(
    alg: &Algorithm,
    state: Option<State>,
    now: i64,
    delta: i64,
    window: Option<i64>,
) -> (Outcome, Write) {
    // Beyond ±2^53 every outcome is the same (counters saturate at ±2^52), and no
    // arithmetic below can overflow: a delta of any size is safe, as it is in Lua.
    let delta = delta.clamp(-(1 << 53), 1 << 53);
    let store_now = now;
    let (state, now) = effective(alg, state, now);
    let mut v = view(alg, state, now);
    let mut changed = delta != 0;
    if delta > 0 {
        match alg {
            Algorithm::TokenBucket(_) => v.current = clamp_counter(v.current - delta),
            Algorithm::FixedWindow(_) | Algorithm::SlidingWindow(_) => {
                v.current = clamp_counter(v.current + delta)
            }
        }
    } else if delta < 0 {
        let back = -delta;
        match (alg, window) {
            (Algorithm::TokenBucket(b), _) => {
                v.current = clamp_counter(v.current + back).min(b.capacity as i64);
            }
            // A window from the future (a clock stepped back) is the current one.
            (Algorithm::FixedWindow(_), Some(w)) if w >= v.anchor => {
                v.current = (v.current - back).max(0);
            }
            (Algorithm::SlidingWindow(_), Some(w)) if w >= v.anchor => {
                v.current -= back.min(v.current.max(0));
            }
            (Algorithm::SlidingWindow(_), Some(w)) if w == v.anchor - 1 => {
                v.previous = (v.previous - back).max(0);
            }
            // The paying window has rolled out of the state: nothing to give back.
            (Algorithm::FixedWindow(_) | Algorithm::SlidingWindow(_), Some(_)) => {
                changed = false;
            }
            (Algorithm::FixedWindow(_), None) => v.current = (v.current - back).max(0),
            (Algorithm::SlidingWindow(_), None) => {
                // Give back from the current window first, then from the previous.
                let from_current = back.min(v.current.max(0));
                v.current -= from_current;
                v.previous = (v.previous - (back - from_current)).max(0);
            }
        }
    }
    let within = used(alg, &v, now) <= alg.limit() as i64;
    let write = if changed {
        write_of(alg, &v, reset_after(alg, &v, now), now, store_now)
    } else {
        Write::None
    };
    (outcome(alg, &v, now, within, None), write)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn run(alg: &Algorithm, st: &mut Option<State>, now: i64, cost: u64) -> Outcome {
        let (o, w) = decide(alg, *st, now, cost, true);
        match w {
            Write::None => {}
            Write::Delete => *st = None,
            Write::Put(s, _) => *st = Some(s),
        }
        o
    }

    /// The division-free window index equals `now / window` everywhere: around window
    /// edges, for states behind, ahead and far off, and at the ends of `i64`.
    /// A state written under a shorter window, read under the longest one, is absent:
    /// no overflow (debug builds panicked) and a full budget, for either window kind.
    #[test]
    fn a_state_from_a_shorter_window_reads_as_absent_under_the_longest() {
        let now = 1_800_000_000 * S;
        let old = Some(State {
            a: now / S,
            b: 3,
            c: 2,
        });
        let longest: [Algorithm; 2] = [
            FixedWindow::new(1 << 40, MAX_WINDOW).unwrap().into(),
            SlidingWindow::new(1 << 40, MAX_WINDOW).unwrap().into(),
        ];
        for alg in longest {
            for take in [false, true] {
                let (o, _) = decide(&alg, old, now, 0, take);
                assert_eq!(o.remaining, 1 << 40, "{alg:?}");
                let (o, _) = decide(&alg, old, now, 1, take);
                assert!(o.allowed, "{alg:?}");
            }
            let (o, _) = adjust(&alg, old, now, -5, Some(now / S));
            assert_eq!(o.remaining, 1 << 40, "{alg:?}");
        }
    }

    #[test]
    fn bucket_shortcuts_are_the_division() {
        let values = [
            0u64,
            1,
            2,
            3,
            7,
            999,
            1_000,
            1_001,
            1 << 40,
            (1 << 53) + 1,
            u64::MAX,
        ];
        for &x in &values {
            for &d in values.iter().filter(|d| **d > 0) {
                assert_eq!(refills_to_cover(x, d), x.div_ceil(d), "{x} / {d}");
                let (x, d) = (x.min(i64::MAX as u64) as i64, d.min(i64::MAX as u64) as i64);
                assert_eq!(whole_intervals(x, d), x / d, "{x} / {d}");
            }
        }
    }

    #[test]
    fn window_index_is_the_division() {
        let windows = [
            1,
            2,
            3,
            7,
            1_000,
            60 * S,
            86_400 * S,
            i64::MAX / 2,
            i64::MAX,
        ];
        let mut nows = vec![0, 1, 2, i64::MAX - 1, i64::MAX];
        for w in windows {
            for k in [0i64, 1, 2, 3, 1_000, 1 << 40] {
                for d in [-1, 0, 1] {
                    if let Some(n) = k.checked_mul(w).and_then(|n| n.checked_add(d)) {
                        nows.push(n);
                    }
                }
            }
        }
        let anchors = [
            i64::MIN,
            -3,
            -1,
            0,
            1,
            2,
            3,
            999,
            1_000,
            1_001,
            1 << 40,
            i64::MAX,
        ];
        for w in windows {
            for &now in nows.iter().filter(|n| **n >= 0) {
                let exact = now / w;
                let around = [-2, -1, 0, 1, 2].map(|d| exact.saturating_add(d));
                for a in anchors.iter().copied().chain(around) {
                    let state = Some(State { a, b: 1, c: 0 });
                    assert_eq!(window_index(now, w, state), exact, "now {now} w {w} a {a}");
                }
                assert_eq!(window_index(now, w, None), exact);
            }
        }
    }

    #[test]
    fn adjustments_of_any_size_saturate_without_overflow() {
        let w = Duration::from_secs(10);
        let algs: [Algorithm; 3] = [
            FixedWindow::new(5, w).unwrap().into(),
            SlidingWindow::new(5, w).unwrap().into(),
            TokenBucket::new(5, 1, w).unwrap().into(),
        ];
        let t0 = 1_000 * 10 * S;
        for alg in &algs {
            let (_, w1) = adjust(alg, None, t0, 3, None);
            let Write::Put(state, _) = w1 else {
                panic!("a charge writes")
            };
            for (huge, bound) in [(i64::MAX, 1 << 53), (i64::MIN, -(1 << 53))] {
                for window in [None, Some(t0 / (10 * S)), Some(t0 / (10 * S) - 1)] {
                    let (o, w) = adjust(alg, Some(state), t0, huge, window);
                    let (o_bound, w_bound) = adjust(alg, Some(state), t0, bound, window);
                    assert_eq!((o, w), (o_bound, w_bound), "{alg:?} {huge} {window:?}");
                }
            }
        }
    }

    #[test]
    fn fixed_window_allows_limit_then_denies_until_roll() {
        let alg: Algorithm = FixedWindow::new(3, Duration::from_secs(10)).unwrap().into();
        let mut st = None;
        let t0 = 1_000 * 10 * S + 2 * S;
        for i in 0..3 {
            let o = run(&alg, &mut st, t0, 1);
            assert!(o.allowed);
            assert_eq!(o.remaining, 2 - i);
        }
        let o = run(&alg, &mut st, t0, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after_us, Some(8 * S as u64));
        assert!(run(&alg, &mut st, t0 + 8 * S, 1).allowed);
    }

    #[test]
    fn sliding_window_weights_previous_window() {
        let alg: Algorithm = SlidingWindow::new(10, Duration::from_secs(10))
            .unwrap()
            .into();
        let mut st = None;
        let t0 = 500 * 10 * S;
        assert!(run(&alg, &mut st, t0, 10).allowed);
        // 2.5 s into the next window, 75% of the previous 10 still counts: 8 used.
        let o = run(&alg, &mut st, t0 + 12 * S + S / 2, 0);
        assert_eq!(o.remaining, 2);
        let o = run(&alg, &mut st, t0 + 12 * S + S / 2, 3);
        assert!(!o.allowed);
        // ceil(10 × (W − e)/W) ≤ 7 ⇔ e ≥ 3 s: 0.5 s from now.
        assert_eq!(o.retry_after_us, Some(S as u64 / 2));
        assert!(run(&alg, &mut st, t0 + 13 * S, 3).allowed);
    }

    #[test]
    fn bucket_refills_in_whole_intervals() {
        let alg: Algorithm = TokenBucket::new(5, 2, Duration::from_secs(1))
            .unwrap()
            .into();
        let mut st = None;
        let t0 = 1_000 * S;
        assert!(run(&alg, &mut st, t0, 5).allowed);
        let o = run(&alg, &mut st, t0 + S / 2, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after_us, Some(S as u64 / 2));
        assert_eq!(o.reset_after_us, 3 * S as u64 - S as u64 / 2);
        assert!(run(&alg, &mut st, t0 + S, 2).allowed);
        assert!(!run(&alg, &mut st, t0 + S, 1).allowed);
    }

    #[test]
    fn charge_creates_debt_and_refund_caps_at_full() {
        let alg: Algorithm = TokenBucket::new(10, 10, Duration::from_secs(1))
            .unwrap()
            .into();
        let (o, w) = adjust(&alg, None, 0, 25, None);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        let Write::Put(s, ttl_us) = w else {
            panic!("{w:?}")
        };
        assert_eq!(
            s.a, 25,
            "the state keeps what is used: 15 of debt beyond 10"
        );
        assert_eq!(ttl_us, 3 * S as u64);
        let (o, w) = adjust(&alg, Some(s), 0, -1000, None);
        assert_eq!(o.remaining, 10);
        assert_eq!(w, Write::Delete);
    }

    /// Every cost above the limit, up to `u64::MAX` (a custom caller's: 2^63 and more
    /// once overflowed into a cost that fits), is denied and never retries, on a fresh
    /// state and on one in use.
    #[test]
    fn cost_above_limit_never_retries() {
        for alg in [
            Algorithm::from(FixedWindow::new(5, Duration::from_secs(1)).unwrap()),
            SlidingWindow::new(5, Duration::from_secs(1))
                .unwrap()
                .into(),
            TokenBucket::new(5, 1, Duration::from_secs(1))
                .unwrap()
                .into(),
        ] {
            for cost in [6, 1 << 53, u64::MAX >> 1, (u64::MAX >> 1) + 1, u64::MAX] {
                for state in [None, Some(State { a: 0, b: 3, c: 0 })] {
                    let (o, w) = decide(&alg, state, 0, cost, true);
                    assert!(!o.allowed, "{alg:?} {cost} {state:?}");
                    assert_eq!(o.retry_after_us, None, "{alg:?} {cost}");
                    assert_eq!(w, Write::None);
                }
            }
        }
    }

    #[test]
    fn bad_quotas_are_rejected() {
        assert!(FixedWindow::new(0, Duration::from_secs(1)).is_err());
        assert!(FixedWindow::new(1, Duration::ZERO).is_err());
        assert!(SlidingWindow::new(u64::MAX, Duration::from_secs(1)).is_err());
        assert!(TokenBucket::new(1, 0, Duration::from_secs(1)).is_err());
        assert!(TokenBucket::new(1, 1, Duration::MAX).is_err());
    }
}
