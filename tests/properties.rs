//! Property tests: the stores against each other and a small reference model, and the
//! usage readers on arbitrary bytes at arbitrary chunk boundaries.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tower_llm_ratelimit::http::{JsonUsage, SseUsage, UsageParser};
use tower_llm_ratelimit::{
    Algorithm, FixedWindow, ManualClock, MemoryStore, Ratelimit, RedisStore, SlidingWindow, Store,
    TokenBucket, Usage, store::Adjustment,
};

#[derive(Clone, Copy, Debug)]
enum Op {
    Limit(u64),
    Charge(u64),
    Refund(u64),
    /// Refund units into the window `1` windows back (0: the current one), as a
    /// settlement does for a reservation taken in that window.
    RefundInto(u64, i64),
    Reset,
    Step(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..8).prop_map(Op::Limit),
        2 => (0u64..12).prop_map(Op::Charge),
        1 => (0u64..12).prop_map(Op::Refund),
        2 => (0u64..12, 0i64..3).prop_map(|(n, back)| Op::RefundInto(n, back)),
        1 => Just(Op::Reset),
        3 => (0u64..2500).prop_map(Op::Step),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Fixed,
    Sliding,
    Bucket,
}

const LIMIT: i64 = 6;
const W_MS: i64 = 1000;

impl Kind {
    fn algorithm(self) -> Algorithm {
        let w = Duration::from_millis(W_MS as u64);
        match self {
            Kind::Fixed => FixedWindow::new(LIMIT as u64, w).unwrap().into(),
            Kind::Sliding => SlidingWindow::new(LIMIT as u64, w).unwrap().into(),
            Kind::Bucket => TokenBucket::new(LIMIT as u64, 2, w).unwrap().into(),
        }
    }
}

/// The reference model: the SPEC §3 rules written plainly, in microseconds.
#[derive(Debug)]
struct Model {
    kind: Kind,
    /// fixed/sliding: (window index, count) pairs; bucket: unused.
    windows: Vec<(i64, i64)>,
    /// bucket: None = full; Some((tokens, last refill)).
    bucket: Option<(i64, i64)>,
}

impl Model {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            windows: Vec::new(),
            bucket: None,
        }
    }

    fn count(&self, idx: i64) -> i64 {
        self.windows
            .iter()
            .filter(|(i, _)| *i == idx)
            .map(|(_, c)| c)
            .sum()
    }

    fn add(&mut self, idx: i64, n: i64) {
        self.windows.push((idx, n));
    }

    fn used(&mut self, now: i64) -> i64 {
        let w = W_MS * 1000;
        let idx = now / w;
        match self.kind {
            Kind::Fixed => self.count(idx),
            Kind::Sliding => {
                let prev = self.count(idx - 1) as f64;
                let elapsed = now - idx * w;
                let weighted = if prev > 0.0 {
                    (prev * ((w - elapsed) as f64) / (w as f64)).ceil() as i64
                } else {
                    0
                };
                self.count(idx) + weighted
            }
            Kind::Bucket => {
                self.refill(now);
                LIMIT - self.bucket.map_or(LIMIT, |(t, _)| t)
            }
        }
    }

    fn refill(&mut self, now: i64) {
        if let Some((tokens, last)) = self.bucket {
            let intervals = (now - last).max(0) / (W_MS * 1000);
            let tokens = tokens + intervals * 2;
            self.bucket = if tokens >= LIMIT {
                None
            } else {
                Some((tokens, last + intervals * W_MS * 1000))
            };
        }
    }

    fn take(&mut self, now: i64, n: i64) {
        match self.kind {
            Kind::Bucket => {
                let (tokens, last) = self.bucket.unwrap_or((LIMIT, now));
                let tokens = tokens - n;
                self.bucket = if tokens >= LIMIT {
                    None
                } else {
                    Some((tokens, last))
                };
            }
            _ => self.add(now / (W_MS * 1000), n),
        }
    }

    fn give_back(&mut self, now: i64, n: i64) {
        match self.kind {
            Kind::Bucket => {
                self.refill(now);
                if let Some((tokens, last)) = self.bucket {
                    let tokens = (tokens + n).min(LIMIT);
                    self.bucket = if tokens >= LIMIT {
                        None
                    } else {
                        Some((tokens, last))
                    };
                }
            }
            Kind::Fixed => {
                let idx = now / (W_MS * 1000);
                let back = n.min(self.count(idx));
                self.add(idx, -back);
            }
            Kind::Sliding => {
                let idx = now / (W_MS * 1000);
                let from_current = n.min(self.count(idx));
                self.add(idx, -from_current);
                let from_previous = (n - from_current).min(self.count(idx - 1));
                self.add(idx - 1, -from_previous);
            }
        }
    }

    /// `(allowed, remaining)` for one op.
    fn apply(&mut self, op: Op, now: i64) -> Option<(bool, u64)> {
        match op {
            Op::Limit(cost) => {
                let used = self.used(now);
                let allowed = used + cost as i64 <= LIMIT;
                if allowed && cost > 0 {
                    self.take(now, cost as i64);
                }
                Some((allowed, (LIMIT - self.used(now)).max(0) as u64))
            }
            Op::Charge(n) => {
                self.used(now);
                self.take(now, n as i64);
                let used = self.used(now);
                Some((used <= LIMIT, (LIMIT - used).max(0) as u64))
            }
            Op::Refund(n) => {
                self.used(now);
                self.give_back(now, n as i64);
                let used = self.used(now);
                Some((used <= LIMIT, (LIMIT - used).max(0) as u64))
            }
            Op::RefundInto(n, back) => {
                self.used(now);
                let idx = now / (W_MS * 1000);
                let n = n as i64;
                match (self.kind, back) {
                    (Kind::Bucket, _) => self.give_back(now, n),
                    // Only the window that paid gets units back, never beyond its count.
                    (Kind::Fixed, 0) | (Kind::Sliding, 0) => {
                        let back = n.min(self.count(idx));
                        self.add(idx, -back);
                    }
                    (Kind::Sliding, 1) => {
                        let back = n.min(self.count(idx - 1));
                        self.add(idx - 1, -back);
                    }
                    _ => {}
                }
                let used = self.used(now);
                Some((used <= LIMIT, (LIMIT - used).max(0) as u64))
            }
            Op::Reset => {
                self.windows.clear();
                self.bucket = None;
                None
            }
            Op::Step(_) => None,
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn redis() -> RedisStore {
    static STORE: OnceLock<RedisStore> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let url = common::redis_url();
            runtime().block_on(RedisStore::connect(&url)).unwrap()
        })
        .clone()
}

async fn run_op(
    rl: &Ratelimit,
    store: &dyn Store,
    now: i64,
    op: Op,
) -> Option<(bool, u64, Option<Duration>)> {
    let d = match op {
        Op::RefundInto(n, back) => {
            let adjustment = Adjustment {
                key: rl.key("p").unwrap().into(),
                rule: (*rl.algorithm()).into(),
                delta: -(n as i64),
                slot: 0,
                window: Some(now / (W_MS * 1000) - back),
            };
            store.adjust(&[adjustment], None).await.unwrap().remove(0)
        }
        Op::Limit(c) => rl.limit("p", c).await.unwrap(),
        Op::Charge(n) => rl.charge("p", n).await.unwrap(),
        Op::Refund(n) => rl.refund("p", n).await.unwrap(),
        Op::Reset => {
            rl.reset("p").await.unwrap();
            return None;
        }
        Op::Step(_) => return None,
    };
    Some((d.allowed, d.remaining, d.retry_after))
}

fn differential(kind: Kind, start_ms: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    // Both stores read the same manual clock; the model gets the same instants.
    let clock = ManualClock::new(Duration::from_millis(1_700_000_000_000 + start_ms));
    let memory_store = MemoryStore::with_clock(clock.clone());
    let memory = Ratelimit::new(kind.algorithm(), memory_store.clone(), "prop").unwrap();
    let prefix = common::unique_prefix("prop");
    let redis_store = redis().with_test_clock(clock.clone());
    let redis = Ratelimit::new(kind.algorithm(), redis_store.clone(), &prefix).unwrap();
    let mut model = Model::new(kind);
    let mut now = (1_700_000_000_000 + start_ms as i64) * 1000;
    for (i, op) in ops.into_iter().enumerate() {
        if let Op::Step(ms) = op {
            clock.advance(Duration::from_millis(ms));
            now += ms as i64 * 1000;
            continue;
        }
        let (m, r) = runtime().block_on(async {
            (
                run_op(&memory, &memory_store, now, op).await,
                run_op(&redis, &redis_store, now, op).await,
            )
        });
        prop_assert_eq!(m, r, "memory vs redis at op {} {:?}", i, op);
        let expected = model.apply(op, now);
        prop_assert_eq!(
            m.map(|(a, rem, _)| (a, rem)),
            expected,
            "memory vs model at op {} {:?}",
            i,
            op
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn fixed_window_stores_and_model_agree(start in 0u64..1000, ops in prop::collection::vec(op(), 1..40)) {
        differential(Kind::Fixed, start, ops)?;
    }

    #[test]
    fn sliding_window_stores_and_model_agree(start in 0u64..1000, ops in prop::collection::vec(op(), 1..40)) {
        differential(Kind::Sliding, start, ops)?;
    }

    #[test]
    fn token_bucket_stores_and_model_agree(start in 0u64..1000, ops in prop::collection::vec(op(), 1..40)) {
        differential(Kind::Bucket, start, ops)?;
    }
}

fn feed_split(p: &mut dyn UsageParser, body: &[u8], cuts: &[usize]) -> Option<Usage> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    points.sort_unstable();
    let mut last = 0;
    for c in points.into_iter().chain([body.len()]) {
        if c > last {
            p.feed(&Bytes::copy_from_slice(&body[last..c]));
            last = c;
        }
    }
    p.finish()
}

fn openai_json(prompt: u64, completion: u64, filler: &str) -> Vec<u8> {
    serde_json::json!({
        "id": "x", "choices": [{"message": {"content": filler}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    })
    .to_string()
    .into_bytes()
}

fn anthropic_sse(input: u64, output: u64, filler: &str) -> Vec<u8> {
    let mut s = format!(
        "event: message_start\ndata: {}\n\n",
        serde_json::json!({"type": "message_start", "message": {"usage": {"input_tokens": input, "output_tokens": 1}}})
    );
    for _ in 0..3 {
        s.push_str(&format!(
            "data: {}\n\n",
            serde_json::json!({"type": "content_block_delta", "delta": {"text": filler}})
        ));
    }
    s.push_str(&format!(
        "data: {}\r\n\r\n",
        serde_json::json!({"type": "message_delta", "usage": {"output_tokens": output}})
    ));
    s.into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn readers_never_panic_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..2048), cuts in prop::collection::vec(any::<usize>(), 0..12)) {
        let _ = feed_split(&mut JsonUsage::default(), &body, &cuts);
        let _ = feed_split(&mut SseUsage::default(), &body, &cuts);
    }

    #[test]
    fn json_usage_is_the_same_at_any_split(p in 0u64..1_000_000, c in 0u64..1_000_000, filler in "[ -~]{0,200}", cuts in prop::collection::vec(any::<usize>(), 0..12)) {
        let body = openai_json(p, c, &filler);
        let whole = feed_split(&mut JsonUsage::default(), &body, &[]);
        prop_assert_eq!(whole, Some(Usage::new(p, c)));
        prop_assert_eq!(feed_split(&mut JsonUsage::default(), &body, &cuts), whole);
    }

    #[test]
    fn sse_usage_is_the_same_at_any_split(i in 0u64..1_000_000, o in 0u64..1_000_000, filler in "[ -~]{0,200}", cuts in prop::collection::vec(any::<usize>(), 0..12)) {
        let body = anthropic_sse(i, o, &filler);
        let whole = feed_split(&mut SseUsage::default(), &body, &[]);
        prop_assert_eq!(whole, Some(Usage::new(i, o)));
        prop_assert_eq!(feed_split(&mut SseUsage::default(), &body, &cuts), whole);
    }
}

fn extreme_algorithm() -> impl Strategy<Value = Algorithm> {
    use tower_llm_ratelimit::algorithm::{MAX_UNITS, MAX_WINDOW, MIN_WINDOW};
    let units = prop_oneof![Just(1u64), Just(MAX_UNITS), 1u64..=MAX_UNITS];
    let window = prop_oneof![
        Just(MIN_WINDOW),
        Just(MAX_WINDOW),
        (MIN_WINDOW.as_micros() as u64..=MAX_WINDOW.as_micros() as u64)
            .prop_map(Duration::from_micros),
    ];
    (0u8..3, units.clone(), units, window).prop_map(|(kind, a, b, w)| match kind {
        0 => FixedWindow::new(a, w).unwrap().into(),
        1 => SlidingWindow::new(a, w).unwrap().into(),
        _ => TokenBucket::new(a, b, w).unwrap().into(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Extreme quotas, windows, costs, debts and time jumps: never a panic (tests build
    /// with overflow checks), and `remaining` never above the limit.
    #[test]
    fn extreme_inputs_never_panic(
        alg in extreme_algorithm(),
        ops in prop::collection::vec((0u8..4, prop_oneof![Just(0u64), Just(1u64 << 40), any::<u64>()], 0u64..(20 * 365 * 86_400_000)), 1..20),
    ) {
        let clock = ManualClock::new(Duration::from_secs(1_700_000_000));
        let rl = Ratelimit::new(alg, MemoryStore::with_clock(clock.clone()), "x").unwrap();
        runtime().block_on(async {
            for (op, n, step_ms) in ops {
                let d = match op {
                    0 => rl.limit("id", n).await,
                    1 => rl.charge("id", n).await,
                    2 => rl.refund("id", n).await,
                    _ => {
                        clock.advance(Duration::from_millis(step_ms));
                        continue;
                    }
                };
                match d {
                    Ok(d) => assert!(d.remaining <= alg.limit()),
                    Err(e) => assert_eq!(e.kind(), tower_llm_ratelimit::ErrorKind::InvalidInput),
                }
            }
        });
    }
}

/// One multi-limit operation: an acquire with a cost per limit (one limit of each
/// algorithm, in one hash slot), or a step of the clock.
#[derive(Clone, Debug)]
enum MultiOp {
    Acquire([u64; 3]),
    Step(u64),
}

fn multi_op() -> impl Strategy<Value = MultiOp> {
    prop_oneof![
        4 => [0u64..5, 0u64..5, 0u64..5].prop_map(MultiOp::Acquire),
        1 => (0u64..1500).prop_map(MultiOp::Step),
    ]
}

/// Several limits per call: both stores give the same decisions for every limit, and an
/// acquire any limit denies leaves every limit as it was (all-or-nothing).
fn multi_differential(start_ms: u64, ops: Vec<MultiOp>) -> Result<(), TestCaseError> {
    use tower_llm_ratelimit::store::LimitCheck;
    let clock = ManualClock::new(Duration::from_millis(1_700_000_000_000 + start_ms));
    let memory = MemoryStore::with_clock(clock.clone());
    let redis = redis().with_test_clock(clock.clone());
    let prefix = common::unique_prefix("multi");
    let kinds = [Kind::Fixed, Kind::Sliding, Kind::Bucket];
    let checks = |costs: [u64; 3]| -> Vec<LimitCheck> {
        kinds
            .iter()
            .zip(costs)
            .enumerate()
            .map(|(i, (k, cost))| LimitCheck {
                key: format!("{prefix}:l{i}:{{p}}").into(),
                rule: k.algorithm().into(),
                cost,
                take: true,
                slot: 0,
            })
            .collect()
    };
    for (i, op) in ops.into_iter().enumerate() {
        let costs = match op {
            MultiOp::Step(ms) => {
                clock.advance(Duration::from_millis(ms));
                continue;
            }
            MultiOp::Acquire(costs) => costs,
        };
        let (m, r, m_after, r_after) = runtime().block_on(async {
            let m = memory.acquire(&checks(costs)).await.unwrap();
            let r = redis.acquire(&checks(costs)).await.unwrap();
            let m_after = memory.acquire(&checks([0; 3])).await.unwrap();
            let r_after = redis.acquire(&checks([0; 3])).await.unwrap();
            (m, r, m_after, r_after)
        });
        let view = |d: &[tower_llm_ratelimit::Decision]| {
            d.iter()
                .map(|d| (d.allowed, d.remaining, d.retry_after))
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(view(&m), view(&r), "memory vs redis at op {}", i);
        prop_assert_eq!(view(&m_after), view(&r_after), "state after op {}", i);
        let remaining =
            |d: &[tower_llm_ratelimit::Decision]| d.iter().map(|d| d.remaining).collect::<Vec<_>>();
        // Allowed: each limit reports what is left after its cost. Denied: nothing was
        // taken from any limit, and each is reported as it is (not as if taken).
        prop_assert_eq!(remaining(&m), remaining(&m_after), "op {}", i);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn several_limits_per_call_agree_and_are_all_or_nothing(start in 0u64..1000, ops in prop::collection::vec(multi_op(), 1..40)) {
        multi_differential(start, ops)?;
    }
}
