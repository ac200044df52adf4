//! One conformance suite for every algorithm, run against `MemoryStore` (manual clock)
//! and `RedisStore` (a test-owned redis-server, real time with 1 s windows). Both stores
//! must give the same decisions for the same sequence.

#[cfg(feature = "cluster")]
#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::sync::Arc;
use std::time::Duration;

use tower_llm_ratelimit::store::StateKey;
use tower_llm_ratelimit::{
    Algorithm, FixedWindow, ManualClock, MemoryStore, Ratelimit, RedisStore, SlidingWindow, Store,
    TokenBucket,
};

const W: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Fixed,
    Sliding,
    Bucket,
}

impl Kind {
    /// Limit 5 per 1 s window; the bucket holds 5 and refills 5 every second.
    fn algorithm(self) -> Algorithm {
        match self {
            Kind::Fixed => FixedWindow::new(5, W).unwrap().into(),
            Kind::Sliding => SlidingWindow::new(5, W).unwrap().into(),
            Kind::Bucket => TokenBucket::new(5, 5, W).unwrap().into(),
        }
    }

    /// The longest a key of this algorithm may live after a write within the budget:
    /// fixed one window, sliding two, bucket the time to refill to full.
    fn ttl_bound(self) -> Duration {
        match self {
            Kind::Fixed => W,
            Kind::Sliding => 2 * W,
            Kind::Bucket => W,
        }
    }

    /// How long a state written just after a window starts (as `align_to_window`
    /// leaves the Redis runs) surely stays as written: until the window ends, or the
    /// bucket's first whole interval after its first draw ends (a little less than the
    /// window, either way).
    fn steady_for(self) -> Duration {
        W - Duration::from_millis(50)
    }

    /// After this long without writes, the budget is full again.
    fn full_reset(self) -> Duration {
        match self {
            Kind::Fixed | Kind::Bucket => W,
            Kind::Sliding => 2 * W,
        }
    }
}

struct Env {
    store: Arc<dyn Store>,
    memory: Option<(MemoryStore, ManualClock)>,
    redis_url: Option<String>,
    #[cfg(feature = "cluster")]
    cluster: bool,
    prefix: String,
}

impl Env {
    async fn memory(name: &str) -> Env {
        // 20 ms into a whole second, like the Redis runs after alignment.
        let clock = ManualClock::new(Duration::from_millis(1_700_000_000_020));
        let store = MemoryStore::with_clock(clock.clone());
        Env {
            store: Arc::new(store.clone()),
            memory: Some((store, clock)),
            redis_url: None,
            #[cfg(feature = "cluster")]
            cluster: false,
            prefix: common::unique_prefix(name),
        }
    }

    async fn redis(name: &str) -> Env {
        let url = common::redis_url();
        let store = RedisStore::connect(&url)
            .await
            .expect("connect to test redis");
        common::align_to_window(W).await;
        Env {
            store: Arc::new(store),
            memory: None,
            redis_url: Some(url),
            #[cfg(feature = "cluster")]
            cluster: false,
            prefix: common::unique_prefix(name),
        }
    }

    #[cfg(feature = "cluster")]
    async fn cluster(name: &str) -> Env {
        let store = cluster::shared_store().await;
        common::align_to_window(W).await;
        Env {
            store: Arc::new(store),
            memory: None,
            redis_url: None,
            cluster: true,
            prefix: common::unique_prefix(name),
        }
    }

    fn limit(&self, kind: Kind) -> Ratelimit {
        Ratelimit::with_shared_store(kind.algorithm(), self.store.clone(), &self.prefix).unwrap()
    }

    /// Let `d` pass: exactly on the manual clock, with a small margin in real time.
    async fn sleep(&self, d: Duration) {
        match &self.memory {
            Some((_, clock)) => clock.advance(d),
            None => tokio::time::sleep(d + Duration::from_millis(30)).await,
        }
    }

    fn is_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// Every key under the prefix has a TTL in (0, bound].
    fn check_ttls(&self, bound: Duration) -> usize {
        let ttls: Vec<(String, Duration)> = match (&self.memory, &self.redis_url) {
            (Some((store, _)), _) => store
                .entries()
                .into_iter()
                .filter(|(k, _)| k.starts_with(&self.prefix))
                .collect(),
            (None, Some(url)) => common::redis_keys(url, &self.prefix)
                .into_iter()
                .map(|(k, ttl)| {
                    assert!(ttl > 0, "key {k} has PTTL {ttl}: every key must expire");
                    (k, Duration::from_millis(ttl as u64))
                })
                .collect(),
            #[cfg(feature = "cluster")]
            _ if self.cluster => cluster::shared()
                .keys(&self.prefix)
                .into_iter()
                .map(|(k, ttl)| {
                    assert!(ttl > 0, "key {k} has PTTL {ttl}: every key must expire");
                    (k, Duration::from_millis(ttl as u64))
                })
                .collect(),
            _ => unreachable!(),
        };
        for (k, ttl) in &ttls {
            assert!(!ttl.is_zero(), "key {k} has no TTL");
            assert!(
                *ttl <= bound + Duration::from_millis(1),
                "key {k} lives {ttl:?} > {bound:?}"
            );
        }
        ttls.len()
    }

    /// The raw stored state of `key` (Redis value, or the memory entry's TTL).
    fn raw(&self, key: &str) -> Option<String> {
        match (&self.memory, &self.redis_url) {
            (Some((store, _)), _) => store
                .entries()
                .into_iter()
                .find(|(k, _)| k == key)
                .map(|(_, ttl)| format!("{ttl:?}")),
            (None, Some(url)) => {
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut c = client.get_connection().unwrap();
                // The state is binary (packed doubles): compare its bytes.
                redis::cmd("GET")
                    .arg(key)
                    .query::<Option<Vec<u8>>>(&mut c)
                    .unwrap()
                    .map(|bytes| format!("{bytes:?}"))
            }
            #[cfg(feature = "cluster")]
            _ if self.cluster => cluster::shared().get(key),
            _ => unreachable!(),
        }
    }
}

mod cases {
    use super::*;

    pub async fn allow_up_to_limit_then_deny(env: Env, kind: Kind) {
        let rl = env.limit(kind);
        for expected in (0..5).rev() {
            let d = rl.limit("alice", 1).await.unwrap();
            assert!(d.allowed, "{kind:?}: {d:?}");
            assert_eq!(d.remaining, expected);
            assert_eq!(d.limit, 5);
            assert_eq!(d.retry_after, None);
            assert_eq!(env.check_ttls(kind.ttl_bound()), 1);
        }
        let d = rl.limit("alice", 1).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        let retry = d.retry_after.expect("cost 1 can pass later");
        assert!(
            !retry.is_zero() && retry <= kind.full_reset(),
            "{kind:?}: {retry:?}"
        );
        // Another identifier is untouched.
        assert_eq!(rl.remaining("bob").await.unwrap(), 5);
    }

    pub async fn denied_decision_writes_nothing(env: Env, kind: Kind) {
        let rl = env.limit(kind);
        assert!(rl.limit("alice", 3).await.unwrap().allowed);
        let key = rl.key("alice").unwrap();
        let before = env.raw(&key);
        let d = rl.limit("alice", 3).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 2);
        assert_eq!(env.raw(&key), before, "a denial changed the stored state");
        assert_eq!(rl.remaining("alice").await.unwrap(), 2);
        let d = rl.limit("alice", 2).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        env.check_ttls(kind.ttl_bound());
    }

    /// A key named twice in one acquire: each check is decided on the state before the
    /// acquire and the later write wins (what the Redis script does); a denial by either
    /// takes nothing.
    pub async fn a_key_named_twice_is_decided_on_its_state_before_the_acquire(
        env: Env,
        kind: Kind,
    ) {
        let rl = env.limit(kind);
        let key: StateKey = rl.key("dup").unwrap().into();
        let check = |cost| tower_llm_ratelimit::store::LimitCheck {
            key: key.clone(),
            rule: kind.algorithm().into(),
            cost,
            take: true,
            slot: 0,
        };
        let d = env.store.acquire(&[check(2), check(2)]).await.unwrap();
        assert!(d[0].allowed && d[1].allowed, "{kind:?}: {d:?}");
        assert_eq!((d[0].remaining, d[1].remaining), (3, 3), "{kind:?}");
        assert_eq!(rl.remaining("dup").await.unwrap(), 3, "{kind:?}");
        let before = env.raw(&key);
        let d = env.store.acquire(&[check(1), check(4)]).await.unwrap();
        assert!(d[0].allowed && !d[1].allowed, "{kind:?}: {d:?}");
        assert_eq!((d[0].remaining, d[1].remaining), (3, 3), "{kind:?}");
        assert_eq!(
            env.raw(&key),
            before,
            "{kind:?}: a denial changed the state"
        );
        assert_eq!(rl.remaining("dup").await.unwrap(), 3, "{kind:?}");
    }

    /// A limit whose window grows (reconfigured from a second to an hour under the same
    /// name) starts its count afresh: the old state's window index means nothing under
    /// the new length. Read as a window "from the future", it held the count until a
    /// window centuries away and denied every call until then. (A bucket keeps what was
    /// used across a change: its state holds no window index.)
    pub async fn a_window_that_grows_starts_its_count_afresh(env: Env, kind: Kind) {
        const HOUR: Duration = Duration::from_secs(3600);
        let grown: Algorithm = match kind {
            Kind::Fixed => FixedWindow::new(5, HOUR).unwrap().into(),
            Kind::Sliding => SlidingWindow::new(5, HOUR).unwrap().into(),
            Kind::Bucket => return,
        };
        let rl = env.limit(kind);
        let key: StateKey = rl.key("grow").unwrap().into();
        let take = |rule: Algorithm| {
            vec![tower_llm_ratelimit::store::LimitCheck {
                key: key.clone(),
                rule: rule.into(),
                cost: 1,
                take: true,
                slot: 0,
            }]
        };
        for _ in 0..5 {
            assert!(env.store.acquire(&take(kind.algorithm())).await.unwrap()[0].allowed);
        }
        for i in 0..5 {
            let d = env.store.acquire(&take(grown)).await.unwrap().remove(0);
            assert!(
                d.allowed,
                "{kind:?}: call {i} under the grown window: {d:?}"
            );
            assert_eq!(d.remaining, 4 - i, "{kind:?}");
            assert!(d.reset_after <= 2 * HOUR, "{kind:?}: {d:?}");
        }
        let d = env.store.acquire(&take(grown)).await.unwrap().remove(0);
        assert!(!d.allowed, "{kind:?}: {d:?}");
        assert!(
            d.retry_after.is_some_and(|r| r <= 2 * HOUR),
            "{kind:?}: {d:?}"
        );
        assert_eq!(
            env.check_ttls(2 * HOUR),
            1,
            "{kind:?}: one key, living at most two hours"
        );
    }

    pub async fn cost_above_limit_never_passes(env: Env, kind: Kind) {
        let rl = env.limit(kind);
        let d = rl.limit("alice", 6).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, None, "cost > limit can never pass");
        assert_eq!(rl.remaining("alice").await.unwrap(), 5);
        assert_eq!(env.check_ttls(kind.ttl_bound()), 0, "a denial wrote a key");
        // Cost 0 is a read: allowed, nothing written.
        let d = rl.limit("alice", 0).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 5);
        assert_eq!(env.check_ttls(kind.ttl_bound()), 0, "a read wrote a key");
    }

    pub async fn charge_creates_debt_until_time_pays_it(env: Env, kind: Kind) {
        let rl = env.limit(kind);
        let d = rl.charge("alice", 8).await.unwrap();
        assert!(!d.allowed, "8 > 5 is over the limit");
        assert_eq!(d.remaining, 0);
        env.check_ttls(2 * W);
        let d = rl.limit("alice", 1).await.unwrap();
        assert!(!d.allowed);
        let retry = d.retry_after.unwrap();
        assert!(retry <= 2 * W, "{retry:?}");
        if env.is_memory() {
            env.sleep(retry - Duration::from_micros(1)).await;
            assert!(
                !rl.limit("alice", 1).await.unwrap().allowed,
                "passed before retry_after"
            );
            env.sleep(Duration::from_micros(1)).await;
        } else {
            env.sleep(retry).await;
        }
        let d = rl.limit("alice", 1).await.unwrap();
        assert!(
            d.allowed,
            "{kind:?} still blocked after retry_after {retry:?}: {d:?}"
        );
        env.check_ttls(2 * W);
    }

    pub async fn refund_never_exceeds_full_budget(env: Env, kind: Kind) {
        let rl = env.limit(kind);
        assert!(rl.limit("alice", 2).await.unwrap().allowed);
        let d = rl.refund("alice", 10).await.unwrap();
        assert_eq!(d.remaining, 5);
        for _ in 0..5 {
            assert!(rl.limit("alice", 1).await.unwrap().allowed);
        }
        assert!(!rl.limit("alice", 1).await.unwrap().allowed);
        env.check_ttls(kind.ttl_bound());
    }

    pub async fn windows_roll_and_buckets_refill(env: Env, kind: Kind) {
        let rl = env.limit(kind);
        assert!(rl.limit("alice", 5).await.unwrap().allowed);
        assert!(!rl.limit("alice", 1).await.unwrap().allowed);
        env.sleep(kind.full_reset()).await;
        let d = rl.limit("alice", 1).await.unwrap();
        assert!(d.allowed, "{kind:?}: {d:?}");
        assert_eq!(d.remaining, 4);
        env.check_ttls(kind.ttl_bound());
    }

    pub async fn reset_clears_the_identifier(env: Env, kind: Kind) {
        let rl = env.limit(kind);
        assert!(rl.limit("alice", 5).await.unwrap().allowed);
        assert!(rl.limit("bob", 1).await.unwrap().allowed);
        rl.reset("alice").await.unwrap();
        assert_eq!(
            env.check_ttls(kind.ttl_bound()),
            1,
            "only bob's key is left"
        );
        let d = rl.limit("alice", 1).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 4);
        assert_eq!(rl.remaining("bob").await.unwrap(), 4);
    }

    pub async fn bad_input_is_an_error(env: Env, kind: Kind) {
        let rl = env.limit(kind);
        assert!(rl.limit("", 1).await.is_err(), "empty identifier");
        assert!(
            rl.limit(vec![b'x'; 2 << 20], 1).await.is_err(),
            "2 MiB identifier"
        );
        assert!(rl.limit("alice", u64::MAX).await.is_err(), "huge cost");
        assert!(rl.charge("alice", u64::MAX).await.is_err(), "huge charge");
        assert!(rl.refund("alice", u64::MAX).await.is_err(), "huge refund");
        // Odd but valid identifiers work, hashed into one safe key each.
        for id in [&b"a}{b:c"[..], &[0xff, 0, 0xfe][..], &[b'k'; 10_000][..]] {
            let d = rl.limit(id, 1).await.unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, 4);
        }
        assert_eq!(env.check_ttls(kind.ttl_bound()), 3);
    }
}

/// Runs `case` on a fresh environment. On the stores that run in real time (Redis and
/// the cluster, 1 s windows), a case that failed after running longer than `kind` keeps
/// a state unchanged by itself (a token refilled, a window rolled) is run again on a
/// fresh prefix, at most three times in all: on a loaded machine its calls can straddle a
/// refill, which says nothing about the store. A failure within that time, and any
/// failure on the manual clock, fails at once.
async fn run_case<E, F, Fut>(env: fn() -> E, kind: Kind, case: F)
where
    E: std::future::Future<Output = Env>,
    F: Fn(Env, Kind) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    const ATTEMPTS: u32 = 3;
    for attempt in 1..=ATTEMPTS {
        let env = env().await;
        let real_time = !env.is_memory();
        let started = std::time::Instant::now();
        let Err(failure) = tokio::spawn(case(env, kind)).await else {
            return;
        };
        let took = started.elapsed();
        if !failure.is_panic() {
            panic!("{failure}");
        }
        if !real_time || took < kind.steady_for() || attempt == ATTEMPTS {
            std::panic::resume_unwind(failure.into_panic());
        }
        eprintln!(
            "{kind:?}: attempt {attempt} failed after {took:?}, longer than a state \
             stays unchanged ({:?}); again on a fresh prefix",
            kind.steady_for()
        );
    }
}

macro_rules! conformance {
    ($module:ident, $env:expr, $kind:expr) => {
        mod $module {
            use super::*;

            async fn env() -> Env {
                ($env)(stringify!($module)).await
            }

            #[tokio::test]
            async fn allow_up_to_limit_then_deny() {
                run_case(env, $kind, cases::allow_up_to_limit_then_deny).await
            }
            #[tokio::test]
            async fn denied_decision_writes_nothing() {
                run_case(env, $kind, cases::denied_decision_writes_nothing).await
            }
            #[tokio::test]
            async fn a_key_named_twice_is_decided_on_its_state_before_the_acquire() {
                run_case(
                    env,
                    $kind,
                    cases::a_key_named_twice_is_decided_on_its_state_before_the_acquire,
                )
                .await
            }
            #[tokio::test]
            async fn a_window_that_grows_starts_its_count_afresh() {
                run_case(
                    env,
                    $kind,
                    cases::a_window_that_grows_starts_its_count_afresh,
                )
                .await
            }
            #[tokio::test]
            async fn cost_above_limit_never_passes() {
                run_case(env, $kind, cases::cost_above_limit_never_passes).await
            }
            #[tokio::test]
            async fn charge_creates_debt_until_time_pays_it() {
                run_case(env, $kind, cases::charge_creates_debt_until_time_pays_it).await
            }
            #[tokio::test]
            async fn refund_never_exceeds_full_budget() {
                run_case(env, $kind, cases::refund_never_exceeds_full_budget).await
            }
            #[tokio::test]
            async fn windows_roll_and_buckets_refill() {
                run_case(env, $kind, cases::windows_roll_and_buckets_refill).await
            }
            #[tokio::test]
            async fn reset_clears_the_identifier() {
                run_case(env, $kind, cases::reset_clears_the_identifier).await
            }
            #[tokio::test]
            async fn bad_input_is_an_error() {
                run_case(env, $kind, cases::bad_input_is_an_error).await
            }
        }
    };
}

conformance!(memory_fixed, Env::memory, Kind::Fixed);
conformance!(memory_sliding, Env::memory, Kind::Sliding);
conformance!(memory_bucket, Env::memory, Kind::Bucket);
conformance!(redis_fixed, Env::redis, Kind::Fixed);
conformance!(redis_sliding, Env::redis, Kind::Sliding);
conformance!(redis_bucket, Env::redis, Kind::Bucket);

#[cfg(feature = "cluster")]
conformance!(cluster_fixed, Env::cluster, Kind::Fixed);
#[cfg(feature = "cluster")]
conformance!(cluster_sliding, Env::cluster, Kind::Sliding);
#[cfg(feature = "cluster")]
conformance!(cluster_bucket, Env::cluster, Kind::Bucket);

/// Two stores' decisions agree: allowed, limit, remaining, and retry times within a
/// second (the Redis store runs on the server's time here, the memory store on the
/// process's, with hour-long windows).
fn assert_agree(
    on_redis: &[tower_llm_ratelimit::Decision],
    in_memory: &[tower_llm_ratelimit::Decision],
    what: &str,
) {
    let exact = |d: &[tower_llm_ratelimit::Decision]| -> Vec<_> {
        d.iter()
            .map(|d| (d.allowed, d.limit, d.remaining, d.retry_after.is_some()))
            .collect()
    };
    assert_eq!(exact(on_redis), exact(in_memory), "{what}");
    for (r, m) in on_redis.iter().zip(in_memory) {
        if let (Some(r), Some(m)) = (r.retry_after, m.retry_after) {
            assert!(
                r.abs_diff(m) <= Duration::from_secs(1),
                "{what}: retry after {r:?} on Redis, {m:?} in memory"
            );
        }
    }
}

/// Batched scripts decide as the memory store does: batches mixing calls of 1 to 4
/// limits and of 300, of every algorithm and concurrency slots, some calls only
/// checking, denials beside allowed calls, and settlements with and without ids (each
/// retried) mixing charges, refunds, slot releases and renewals. The calls are queued
/// together on a one-thread runtime, so they go out in scripts of many calls; a decoding
/// slip in any call's share of a script's arguments shows as a disagreement.
#[tokio::test]
async fn batched_scripts_decide_as_the_memory_store_does() {
    use tower_llm_ratelimit::ConcurrencyLimit;
    use tower_llm_ratelimit::store::{Adjustment, LimitCheck, Rule};
    let server = common::RedisServer::start();
    let redis = RedisStore::connect(&server.url).await.unwrap();
    let memory = MemoryStore::new();
    let mut rng = common::Xorshift(0x9E37_79B9_7F4A_7C15);
    let hour = Duration::from_secs(3600);
    let calls: Vec<Vec<LimitCheck>> = (0..160)
        .map(|call| {
            let n = if call % 40 == 9 {
                300
            } else {
                1 + rng.below(4)
            };
            (0..n)
                .map(|i| {
                    let limit = 4 + rng.below(10);
                    let rule = match rng.below(4) {
                        0 => Rule::Rate(FixedWindow::new(limit, hour).unwrap().into()),
                        1 => Rule::Rate(SlidingWindow::new(limit, hour).unwrap().into()),
                        2 => Rule::Rate(TokenBucket::new(limit, 1, hour).unwrap().into()),
                        _ => Rule::Concurrency(ConcurrencyLimit::new(3, hour).unwrap()),
                    };
                    let slots = matches!(rule, Rule::Concurrency(_));
                    LimitCheck {
                        key: format!("batched:c{call}:l{i}:{{c{call}}}").into(),
                        rule,
                        cost: if slots { 1 } else { rng.below(3) },
                        take: rng.below(5) != 0,
                        slot: 0,
                    }
                })
                .collect()
        })
        .collect();
    let (mut denied, mut settled) = (0, 0);
    for round in 0..4 {
        // Every call's acquire queued before any is sent.
        let acquires: Vec<_> = calls
            .iter()
            .map(|checks| {
                let mut checks = checks.clone();
                for c in &mut checks {
                    c.slot = rng.below(1 << 62);
                }
                (redis.acquire(&checks), checks)
            })
            .collect();
        let mut allowed = Vec::new();
        for (call, (decided, checks)) in acquires.into_iter().enumerate() {
            let on_redis = decided.await.unwrap();
            let in_memory = memory.acquire(&checks).await.unwrap();
            assert_agree(
                &on_redis,
                &in_memory,
                &format!("round {round}, call {call}"),
            );
            if on_redis.iter().all(|d| d.allowed) {
                allowed.push((call, checks));
            } else {
                denied += 1;
            }
        }
        // Settle half the allowed calls, queued together; then retry those with ids.
        let mut settlements = Vec::new();
        for (call, checks) in &allowed {
            if rng.below(2) == 0 {
                continue;
            }
            let mut adjustments = Vec::with_capacity(checks.len());
            for c in checks {
                let delta = if matches!(c.rule, Rule::Concurrency(_)) {
                    if rng.below(3) == 0 { 1 } else { -1 }
                } else {
                    rng.below(5) as i64 - 2
                };
                adjustments.push(Adjustment {
                    key: c.key.clone(),
                    rule: c.rule,
                    delta,
                    slot: c.slot,
                    window: None,
                });
            }
            let id = (rng.below(2) == 0).then(|| rng.below(1 << 62));
            let decided = redis.adjust(&adjustments, id);
            settlements.push((*call, adjustments, id, decided));
        }
        let mut retries = Vec::new();
        for (call, adjustments, id, decided) in settlements {
            let on_redis = decided.await.unwrap();
            let in_memory = memory.adjust(&adjustments, None).await.unwrap();
            assert_agree(
                &on_redis,
                &in_memory,
                &format!("round {round}, settlement of {call}"),
            );
            settled += 1;
            if id.is_some() {
                retries.push(redis.adjust(&adjustments, id));
            }
        }
        for retried in retries {
            retried.await.unwrap();
        }
        // Read every limit back (the retries must have changed nothing).
        let reads: Vec<_> = calls
            .iter()
            .map(|checks| {
                let checks: Vec<LimitCheck> = checks
                    .iter()
                    .map(|c| LimitCheck {
                        cost: u64::from(matches!(c.rule, Rule::Concurrency(_))),
                        take: false,
                        ..c.clone()
                    })
                    .collect();
                (redis.acquire(&checks), checks)
            })
            .collect();
        for (call, (decided, checks)) in reads.into_iter().enumerate() {
            let on_redis = decided.await.unwrap();
            let in_memory = memory.acquire(&checks).await.unwrap();
            assert_agree(
                &on_redis,
                &in_memory,
                &format!("round {round}, read of {call}"),
            );
        }
    }
    assert!(
        denied > 50 && settled > 100,
        "denied {denied}, settled {settled}"
    );
    // The calls went out together: far fewer scripts than calls.
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let scripts: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    let operations = 4 * (2 * calls.len() as u64) + settled;
    assert!(
        scripts * 4 < operations,
        "{scripts} scripts for {operations} operations"
    );
}
