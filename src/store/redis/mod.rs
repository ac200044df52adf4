//! The Redis store: every operation is one Lua script, one round trip.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::{
    Adjustment, Decision, LimitCheck, Rule, StateKey, Store, StoreFuture, undo_adjustments,
};
use crate::algorithm::{self, State};
use crate::error::StoreError;

mod shaped;

use shaped::Carrier;

/// The scripts' clock and TTLs: the server's time, or in `test-util` builds only, a
/// test's "now" when one is sent (and TTLs padded to outlast the test).
#[cfg(not(feature = "test-util"))]
const CLOCK: &str = include_str!("../lua/clock.lua");
#[cfg(feature = "test-util")]
const CLOCK: &str = concat!(
    include_str!("../lua/clock.lua"),
    include_str!("../lua/test_clock.lua")
);

/// The whole text of a script: the clock, `state.lua` (what the scripts share) and its
/// body.
fn source(body: &str) -> String {
    [CLOCK, include_str!("../lua/state.lua"), body].concat()
}

/// The script of this body (see [`source`]).
fn script(body: &str) -> Script {
    Script::new(&source(body))
}

/// The body of the script for the acquires of any limits.
const ACQUIRE_BODY: &str = include_str!("../lua/acquire.lua");

/// The acquires of one call, or of a batch of calls, of any limits (calls of a shape
/// that has a generated script use that instead: see `shaped`).
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| script(ACQUIRE_BODY));

/// Most acquires (or settlements) sent in one batch script.
const MAX_BATCH: usize = 32;
/// Batches in flight at once; while all are out, new work queues up and goes together.
const MAX_BATCHES_IN_FLIGHT: usize = 4;

static ADJUST: LazyLock<Script> = LazyLock::new(|| script(include_str!("../lua/adjust.lua")));

/// Connection settings of a [`RedisStore`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RedisOptions {
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How long one store operation may take before it fails with a timeout
    /// ([`StoreError::is_timeout`]). The script may still have run in Redis.
    pub response_timeout: Duration,
    /// Send the acquires and settlements of concurrent calls together in one script
    /// when Redis is already busy with earlier ones (single Redis only; default on). A
    /// call that finds Redis idle goes alone at once, so batching adds no latency.
    pub batching: bool,
    /// How long a settlement id is remembered, so that a settlement retried after an
    /// ambiguous failure (sent, but no answer) is applied once (default 10 s), however
    /// many settlements of its identifier came in between. Each id is a small key of its
    /// own (100–130 bytes) that expires after this long, so Redis holds about
    /// settlements per second × this many of them. A retry that comes later than this
    /// after the lost answer (the layer retries queued settlements until Redis answers,
    /// so after an outage this long) may apply again: raise it if outages can last
    /// longer. Taken between 1 ms and about 142 years (2^52 µs).
    pub settlement_dedupe: Duration,
}

/// The longest TTL the scripts set (their `MAX`, 2^52 µs, about 142 years).
const MAX_TTL: Duration = Duration::from_micros(1 << 52);

/// How long the connection waits for any reply. An acquire whose caller stopped waiting
/// (its own timeout, or cancellation) keeps waiting this long in the background, so
/// that whatever it took can be given back when the answer comes.
const REPLY_WAIT: Duration = Duration::from_secs(30);

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            batching: true,
            settlement_dedupe: Duration::from_secs(10),
        }
    }
}

impl RedisOptions {
    /// Set [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Set [`batching`](Self::batching).
    pub fn batching(mut self, batching: bool) -> Self {
        self.batching = batching;
        self
    }

    /// Set [`settlement_dedupe`](Self::settlement_dedupe).
    pub fn settlement_dedupe(mut self, d: Duration) -> Self {
        self.settlement_dedupe = d;
        self
    }

    /// Set [`response_timeout`](Self::response_timeout).
    pub fn response_timeout(mut self, t: Duration) -> Self {
        self.response_timeout = t;
        self
    }
}

/// One multiplexed connection (reconnecting) or a cluster connection (slot-aware,
/// follows MOVED/ASK and failovers).
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

type ReplySender = tokio::sync::oneshot::Sender<Result<Vec<Decision>, StoreError>>;
/// Where a queued acquire's answer goes.
type AcquireSender = tokio::sync::oneshot::Sender<AcquireAnswer>;

/// A batched acquire's answer on its way to its caller. Whatever took it leaves no trace
/// if the caller never does: dropped unread (the caller left after it was sent, or before
/// it could be sent), it gives back what the acquire took.
struct AcquireAnswer {
    result: Option<Result<Vec<Decision>, StoreError>>,
    /// The store and checks to undo with, until the caller takes the answer.
    undo: Option<(RedisStore, Vec<LimitCheck>)>,
}

impl AcquireAnswer {
    fn take(mut self) -> Result<Vec<Decision>, StoreError> {
        self.undo = None;
        self.result
            .take()
            .unwrap_or_else(|| Err(StoreError::new("acquire answer taken twice")))
    }
}

impl Drop for AcquireAnswer {
    fn drop(&mut self) {
        if let (Some(result), Some((store, checks))) = (self.result.take(), self.undo.take()) {
            let runtime = store.shared.runtime.clone();
            spawn_undo(runtime, reconcile(store, checks, result));
        }
    }
}

/// Run an undo in the background: on the current runtime, or, when the future that
/// needs it is dropped on a thread without one, on the runtime the store was made on.
fn spawn_undo(
    store_runtime: Option<tokio::runtime::Handle>,
    undo: impl Future<Output = ()> + Send + 'static,
) {
    match tokio::runtime::Handle::try_current().ok().or(store_runtime) {
        Some(runtime) => {
            runtime.spawn(undo);
        }
        None => tracing::error!(
            "an abandoned acquire could not be undone: no Tokio runtime to run it on"
        ),
    }
}

/// One call's acquire or settlement waiting for a batch.
enum Queued {
    Acquire {
        checks: Vec<LimitCheck>,
        reply: AcquireSender,
    },
    Adjust {
        adjustments: Vec<Adjustment>,
        settlement_id: Option<u64>,
        reply: ReplySender,
    },
}

impl Queued {
    /// An acquire whose caller left before it was sent: never send it. (A settlement
    /// is sent anyway: its caller retries under the same id, which then finds it applied.)
    fn abandoned(&self) -> bool {
        matches!(self, Queued::Acquire { reply, .. } if reply.is_closed())
    }
}

type ReplyFuture = Pin<Box<dyn Future<Output = Result<ScriptReply, StoreError>> + Send>>;

struct Shared {
    conn: Connection,
    /// Where acquires go to be batched; `None`: each is sent on its own.
    batcher: Option<tokio::sync::mpsc::UnboundedSender<Queued>>,
    response_timeout: Duration,
    settlement_dedupe: Duration,
    /// The runtime the store was made on: undoes of acquires whose future is dropped on
    /// a thread without one run there.
    runtime: Option<tokio::runtime::Handle>,
    /// Tests only: decide at this clock's time instead of the server's.
    #[cfg(feature = "test-util")]
    clock: Option<crate::store::ManualClock>,
}

/// Limiter state in Redis (or any server speaking its protocol with Lua scripting).
///
/// * One shared multiplexed connection ([`ConnectionManager`]) that reconnects by itself;
///   concurrent operations are pipelined over it.
/// * Every decision is one `EVALSHA` (the script is loaded again on `NOSCRIPT`, e.g.
///   after a Redis restart).
/// * Time is the Redis server's clock (`TIME` inside the script), so every application
///   instance agrees whatever its own clock says.
/// * All keys of one script share one hash tag; every key written has a TTL.
///
/// Cloning is cheap and clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("response_timeout", &self.shared.response_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connect to `url` (`redis://[user:password@]host:port[/db]`) with default options.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connect to `url` with these options.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, StoreError> {
        let client = Client::open(url)
            .map_err(|e| StoreError::with_source(format!("invalid Redis URL {url:?}"), e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout.max(REPLY_WAIT)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| StoreError::with_source("cannot connect to Redis", e))?;
        let mut store = Self::from_connection_manager(conn, options.response_timeout);
        store.set_settlement_dedupe(options.settlement_dedupe);
        Ok(if options.batching {
            store.with_batching()
        } else {
            store
        })
    }

    /// Connect to a Redis Cluster through any of its nodes (`redis://host:port`, or
    /// `rediss://` with the `tls` feature). The same scripts run there: every key one
    /// script touches carries the identifier's hash tag, so it lives in one slot.
    #[cfg(feature = "cluster")]
    pub async fn connect_cluster(
        nodes: &[&str],
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        let client = redis::cluster::ClusterClient::builder(nodes.iter().copied())
            .connection_timeout(options.connect_timeout)
            .response_timeout(options.response_timeout.max(REPLY_WAIT))
            .retries(2)
            .build()
            .map_err(|e| StoreError::with_source(format!("invalid cluster nodes {nodes:?}"), e))?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(|e| StoreError::with_source("cannot connect to the Redis Cluster", e))?;
        let mut store = Self::with_connection(Connection::Cluster(conn), options.response_timeout);
        store.set_settlement_dedupe(options.settlement_dedupe);
        Ok(store)
    }

    fn set_settlement_dedupe(&mut self, d: Duration) {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            // At most what every TTL the scripts set is capped at: Redis rejects a TTL
            // that overflows its clock, and an id recorded whose TTL then failed would
            // turn the settlement's every retry into a duplicate of one never applied.
            shared.settlement_dedupe = d.clamp(Duration::from_millis(1), MAX_TTL);
        }
    }

    /// Use an existing connection manager; each operation may take `response_timeout`.
    pub fn from_connection_manager(conn: ConnectionManager, response_timeout: Duration) -> Self {
        Self::with_connection(Connection::Single(conn), response_timeout)
    }

    /// Batch concurrent acquires (see [`RedisOptions::batching`]). Needs a Tokio runtime
    /// (without one, acquires are sent one by one).
    fn with_batching(self) -> Self {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return self;
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let unbatched = self.clone();
        handle.spawn(batch_worker(unbatched, rx));
        let shared = Shared {
            conn: self.shared.conn.clone(),
            batcher: Some(tx),
            response_timeout: self.shared.response_timeout,
            settlement_dedupe: self.shared.settlement_dedupe,
            runtime: self.shared.runtime.clone(),
            #[cfg(feature = "test-util")]
            clock: self.shared.clock.clone(),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    fn with_connection(conn: Connection, response_timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                conn,
                batcher: None,
                response_timeout,
                settlement_dedupe: Duration::from_secs(10),
                runtime: tokio::runtime::Handle::try_current().ok(),
                #[cfg(feature = "test-util")]
                clock: None,
            }),
        }
    }

    /// Tests only (feature `test-util`): decide at `clock`'s time instead of the Redis
    /// server's, so a test can
    /// step time (the differential property test compares stores at the same instants).
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn with_test_clock(self, clock: crate::store::ManualClock) -> Self {
        let shared = Shared {
            conn: self.shared.conn.clone(),
            batcher: None,
            response_timeout: self.shared.response_timeout,
            settlement_dedupe: self.shared.settlement_dedupe,
            runtime: self.shared.runtime.clone(),
            clock: Some(clock),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Benchmarks only (feature `test-util`): the whole Lua script an acquire of
    /// `checks` runs, the one generated for their shape or the one for any limits (for
    /// counting what Redis spends on it).
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn acquire_script_source(checks: &[LimitCheck]) -> String {
        source(
            shaped::source_for(checks)
                .as_deref()
                .unwrap_or(ACQUIRE_BODY),
        )
    }

    /// A test's "now" (`test-util` builds with a test clock only).
    fn test_now(&self) -> Option<i64> {
        #[cfg(feature = "test-util")]
        if let Some(clock) = &self.shared.clock {
            use crate::store::Clock;
            return Some(clock.now_micros());
        }
        None
    }

    fn push_test_clock(&self, args: &mut ScriptArgs) {
        args.tail.extend(self.test_now());
    }

    /// Send `script` and wait for its reply as long as the connection does (no timeout
    /// of its own: callers put theirs around it, and may leave it to run on).
    fn invoke(
        shared: Arc<Shared>,
        script: &'static Script,
        keys: Vec<StateKey>,
        args: ScriptArgs,
    ) -> ReplyFuture {
        Box::pin(async move {
            let mut conn = shared.conn.clone();
            let invocation = prepare(script, &keys, &args);
            script_reply(invocation.invoke_async(&mut conn).await, REPLY_WAIT)
        })
    }

    async fn run(
        shared: Arc<Shared>,
        script: &'static Script,
        keys: Vec<StateKey>,
        args: ScriptArgs,
    ) -> Result<ScriptReply, StoreError> {
        let mut conn = shared.conn.clone();
        let invocation = prepare(script, &keys, &args);
        match tokio::time::timeout(shared.response_timeout, invocation.invoke_async(&mut conn))
            .await
        {
            Ok(reply) => script_reply(reply, shared.response_timeout),
            Err(_) => Err(StoreError::timeout(shared.response_timeout)),
        }
    }
}

/// A script's reply (see the scripts' headers): the time the script decided at, then
/// each call's (or settlement's) part, a flag and one value per limit.
struct ScriptReply {
    now: i64,
    parts: std::vec::IntoIter<redis::Value>,
}

/// A script's reply, or the error (a timeout after `waited`).
fn script_reply(
    reply: redis::RedisResult<redis::Value>,
    waited: Duration,
) -> Result<ScriptReply, StoreError> {
    match reply {
        Ok(redis::Value::Array(parts)) => {
            let mut parts = parts.into_iter();
            match parts.next() {
                // The server's clock in µs since the epoch, below 2^52 until the year 2112:
                // anything else is no Redis of ours (and would overflow the arithmetic
                // the decisions are computed with).
                Some(redis::Value::Int(now)) if (0..=algorithm::MAX_COUNTER).contains(&now) => {
                    Ok(ScriptReply { now, parts })
                }
                _ => Err(StoreError::new(
                    "malformed script reply: it does not start with the script's time",
                )),
            }
        }
        Ok(_) => Err(StoreError::new("malformed script reply: not an array")),
        Err(e) if e.is_timeout() => Err(StoreError::timeout(waited)),
        Err(e) => Err(StoreError::with_source("Redis script failed", e)),
    }
}

/// `script` with these KEYS and ARGV.
fn prepare<'a>(
    script: &'a Script,
    keys: &[StateKey],
    args: &ScriptArgs,
) -> redis::ScriptInvocation<'a> {
    let mut invocation = script.prepare_invoke();
    for k in keys {
        invocation.key(&**k);
    }
    for a in &args.head {
        invocation.arg(*a);
    }
    invocation.arg(&args.records[..]);
    for a in &args.tail {
        invocation.arg(*a);
    }
    invocation
}

/// One limit's state as a script read it: the 25-byte packed form (a byte 1, then three
/// little-endian doubles), or the text `a:b:c` of earlier releases. Anything else reads
/// as no state, as the scripts read it.
///
/// The scripts write every number within ±2^52, but a key may hold anything (a state
/// written by hand or by something else): each number is clamped to ±2^52, where every
/// decision about it is the same as the scripts' (a count that large never fits; a window
/// or refill time that large lies centuries ahead), so the arithmetic cannot overflow.
fn parse_state(raw: &[u8]) -> Option<State> {
    const LIMIT: f64 = algorithm::MAX_COUNTER as f64;
    // NaN (a byte pattern no script writes) reads as 0.
    let number = |v: f64| v.clamp(-LIMIT, LIMIT) as i64;
    if raw.len() == 25 && raw[0] == 1 {
        let at = |i: usize| {
            let bytes: [u8; 8] = raw[i..i + 8].try_into().unwrap_or([0; 8]);
            number(f64::from_le_bytes(bytes))
        };
        return Some(State {
            a: at(1),
            b: at(9),
            c: at(17),
        });
    }
    // `^(-?%d+):(-?%d+):(-?%d+)$`, each number read as the script reads it (a double).
    let text = std::str::from_utf8(raw).ok()?;
    let mut fields = text.split(':').map(|f| {
        let digits = f.strip_prefix('-').unwrap_or(f);
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| f.parse::<f64>().ok().map(number))
            .flatten()
    });
    let (a, b, c) = (fields.next()??, fields.next()??, fields.next()??);
    fields.next().is_none().then_some(State { a, b, c })
}

fn short_reply() -> StoreError {
    StoreError::new("short script reply")
}

/// Why a call of grouped limits that no generated script carries fails (a layer never
/// plans one: it groups limits only when every call can have its script).
fn ungroupable() -> StoreError {
    StoreError::new(
        "a call of grouped limits that no generated acquire script can carry (more than \
         eight limits, a concurrency limit, or too many shapes of calls)",
    )
}

/// A grouped limit's state in its group's value as a script read it (see `state.lua`):
/// a byte 2, then each member's first number, each one's second, each one's third, as
/// little-endian doubles. Its three numbers, clamped as
/// [`parse_state`] clamps them; none if the value is not one of `members` members (the
/// scripts read that as no state, and replace it) or the member's place is three zeros.
fn member_state(raw: &[u8], member: u8, members: u8) -> Option<State> {
    const LIMIT: f64 = algorithm::MAX_COUNTER as f64;
    if raw.len() != 1 + 24 * usize::from(members) || raw[0] != 2 || member >= members {
        return None;
    }
    let at = |i: usize| {
        let start = 1 + 8 * (i * usize::from(members) + usize::from(member));
        let bytes: [u8; 8] = raw[start..start + 8].try_into().unwrap_or([0; 8]);
        // NaN (a byte pattern no script writes) reads as 0.
        f64::from_le_bytes(bytes).clamp(-LIMIT, LIMIT) as i64
    };
    let state = State {
        a: at(0),
        b: at(1),
        c: at(2),
    };
    (state != State { a: 0, b: 0, c: 0 }).then_some(state)
}

/// A concurrency limit's decision as the scripts send it: six little-endian doubles,
/// allowed, max, held, reset_after_us, retry_after_us (-1: none), -1.
fn parse_slots(raw: &[u8]) -> Result<Decision, StoreError> {
    if raw.len() != 48 {
        return Err(StoreError::new(format!(
            "malformed script reply: a concurrency decision of {} bytes",
            raw.len()
        )));
    }
    let f = |i: usize| {
        let bytes: [u8; 8] = raw[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]);
        f64::from_le_bytes(bytes) as i64
    };
    Ok(Decision {
        allowed: f(0) == 1,
        limit: f(1).max(0) as u64,
        remaining: f(1).saturating_sub(f(2)).max(0) as u64,
        reset_after: Duration::from_micros(f(3).max(0) as u64),
        retry_after: (f(4) >= 0).then(|| Duration::from_micros(f(4) as u64)),
        fallback: false,
        window: None,
    })
}

/// The state a script read for one rate limit, or why the reply is not one.
fn state_of(value: redis::Value) -> Result<Option<State>, StoreError> {
    match value {
        redis::Value::Nil => Ok(None),
        redis::Value::BulkString(raw) => Ok(parse_state(&raw)),
        _ => Err(StoreError::new(
            "malformed script reply: a limit without its state",
        )),
    }
}

/// The state of a grouped limit at `place`, from its group's value as a script sent it.
fn grouped_state_of(
    value: &redis::Value,
    place: super::key::GroupPlace,
) -> Result<Option<State>, StoreError> {
    match value {
        redis::Value::Nil => Ok(None),
        redis::Value::BulkString(raw) => Ok(member_state(raw, place.member, place.members)),
        _ => Err(StoreError::new(
            "malformed script reply: a grouped limit without its group's value",
        )),
    }
}

/// The concurrency decision a script sent for one limit.
fn slots_of(value: redis::Value) -> Result<Decision, StoreError> {
    match value {
        redis::Value::BulkString(raw) => parse_slots(&raw),
        _ => Err(StoreError::new(
            "malformed script reply: a concurrency limit without its decision",
        )),
    }
}

impl ScriptReply {
    /// The next part: a call's or settlement's flag and its `count` values (taken whole,
    /// so that a malformed part leaves the next one where it is).
    fn next_part(&mut self, count: usize) -> Result<(i64, Vec<redis::Value>), StoreError> {
        let flag = match self.parts.next() {
            Some(redis::Value::Int(flag)) => flag,
            Some(_) => {
                return Err(StoreError::new(
                    "malformed script reply: no flag where one belongs",
                ));
            }
            None => return Err(StoreError::new("short script reply")),
        };
        let values: Vec<redis::Value> = self.parts.by_ref().take(count).collect();
        if values.len() != count {
            return Err(StoreError::new("short script reply"));
        }
        if flag == -1 {
            return Err(StoreError::new(
                "a key of this call holds another Redis type (is the key prefix shared with \
                 other data?); nothing was written for it",
            ));
        }
        Ok((flag, values))
    }

    /// One call's decisions, computed from the states the script read as the memory store
    /// computes its own (`algorithm::decide`): what the script took, it took by the same
    /// arithmetic, so each limit reads as if decided here. A denied call reports every
    /// limit as it is (nothing was taken).
    fn acquire(&mut self, checks: &[LimitCheck]) -> Result<Vec<Decision>, StoreError> {
        // Grouped limits: one value for all of them, after the others' values.
        let own = checks.iter().filter(|c| c.key.group().is_none()).count();
        let grouped = own < checks.len();
        let (flag, values) = self.next_part(own + usize::from(grouped))?;
        let all = flag == 1;
        let mut values = values.into_iter();
        let group_value = if grouped { values.next_back() } else { None };
        let mut decisions = Vec::with_capacity(checks.len());
        for c in checks {
            decisions.push(match &c.rule {
                Rule::Rate(alg) => {
                    let state = match (c.key.group(), &group_value) {
                        (Some((_, place)), Some(group)) => grouped_state_of(group, place)?,
                        _ => state_of(values.next().ok_or_else(short_reply)?)?,
                    };
                    let (outcome, _) =
                        algorithm::decide(alg, state, self.now, c.cost, c.take && all);
                    Decision::from(outcome)
                }
                Rule::Concurrency(_) => slots_of(values.next().ok_or_else(short_reply)?)?,
            });
        }
        let allowed = decisions.iter().all(|d| d.allowed);
        if allowed != all {
            // Both run the same arithmetic; a difference would be a bug. What Redis did
            // stands: a call it allowed had its costs taken (so it is allowed, and settles
            // them); one it denied took nothing, and is denied (not an error, which a
            // fail-open policy would let through).
            tracing::error!(
                script = all,
                client = allowed,
                "the acquire script and the client disagree on a decision"
            );
            for d in &mut decisions {
                d.allowed = all;
                d.retry_after = None;
            }
        }
        Ok(decisions)
    }

    /// One settlement's outcomes, computed from the states the script read
    /// (`algorithm::adjust`, as the memory store does): after the settlement if it was
    /// applied, as they are if its id had been applied before.
    fn adjust(&mut self, adjustments: &[Adjustment]) -> Result<Vec<Decision>, StoreError> {
        let (flag, values) = self.next_part(adjustments.len())?;
        let applied = flag == 1;
        adjustments
            .iter()
            .zip(values)
            .map(|(a, value)| {
                Ok(match &a.rule {
                    Rule::Rate(alg) => {
                        let delta = if applied { a.delta } else { 0 };
                        let state = match a.key.group() {
                            Some((_, place)) => grouped_state_of(&value, place)?,
                            None => state_of(value)?,
                        };
                        let (outcome, _) = algorithm::adjust(alg, state, self.now, delta, a.window);
                        Decision::from(outcome)
                    }
                    Rule::Concurrency(_) => slots_of(value)?,
                })
            })
            .collect()
    }
}

/// Give back what an abandoned acquire took once its reply is known (see
/// [`Store::acquire`]). Without a reply the outcome is unknown: its slots are released
/// anyway (releasing a slot that was never taken does nothing); counts are left alone.
async fn reconcile(
    store: RedisStore,
    checks: Vec<LimitCheck>,
    reply: Result<Vec<Decision>, StoreError>,
) {
    let undo = match reply {
        Ok(decisions) => undo_adjustments(&checks, &decisions),
        Err(error) => {
            tracing::warn!(%error, "an abandoned acquire got no answer; releasing its slots only");
            checks
                .iter()
                .filter(|c| c.take && c.rule.is_concurrency())
                .map(|c| Adjustment {
                    key: c.key.clone(),
                    rule: c.rule,
                    delta: -1,
                    slot: c.slot,
                    window: None,
                })
                .collect()
        }
    };
    if undo.is_empty() {
        return;
    }
    // One id for every attempt: an attempt whose reply was lost but which landed is not
    // applied again by the next one.
    let id = super::next_id();
    let mut backoff = Duration::from_millis(50);
    let give_up = tokio::time::Instant::now() + REPLY_WAIT;
    loop {
        match store.adjust(&undo, Some(id)).await {
            Ok(_) => {
                tracing::debug!(
                    limits = undo.len(),
                    "undid an acquire whose caller had stopped waiting"
                );
                return;
            }
            Err(error) if tokio::time::Instant::now() + backoff < give_up => {
                tracing::debug!(%error, "could not undo an abandoned acquire yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(error) => {
                tracing::error!(%error, "could not undo an abandoned acquire");
                return;
            }
        }
    }
}

/// An acquire sent on its own. Dropped after it went out and before its answer came
/// (a timeout, a cancelled caller), it hands its reply to [`reconcile`] in the
/// background.
struct InFlightAcquire {
    reply: Option<ReplyFuture>,
    sent: bool,
    store: RedisStore,
    checks: Vec<LimitCheck>,
}

impl Future for InFlightAcquire {
    type Output = Result<Vec<Decision>, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(reply) = self.reply.as_mut() else {
            return Poll::Ready(Err(StoreError::new("acquire polled after completion")));
        };
        let result = reply.as_mut().poll(cx);
        self.sent = true;
        let reply = std::task::ready!(result);
        self.reply = None;
        Poll::Ready(reply.and_then(|mut r| r.acquire(&self.checks)))
    }
}

impl Drop for InFlightAcquire {
    fn drop(&mut self) {
        let (Some(reply), true) = (self.reply.take(), self.sent) else {
            return;
        };
        let store = self.store.clone();
        let checks = std::mem::take(&mut self.checks);
        let runtime = store.shared.runtime.clone();
        spawn_undo(runtime, async move {
            let decisions = reply.await.and_then(|mut r| r.acquire(&checks));
            reconcile(store, checks, decisions).await;
        });
    }
}

/// `s` with Redis glob characters escaped, for `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Every key in the hash slot of the identifier whose keys end with `suffix`
/// (`:{tag}`), from the node that owns that slot.
#[cfg(feature = "cluster")]
async fn cluster_keys_of(conn: &mut Connection, suffix: &str) -> redis::RedisResult<Vec<String>> {
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
    let Connection::Cluster(cluster) = conn else {
        return Ok(Vec::new());
    };
    let key = suffix.trim_start_matches(':');
    let number: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut *cluster)
        .await?;
    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_slot(
        Slot::for_key(key),
        SlotAddr::Master,
    )));
    // Every key of the slot, however many: GETKEYSINSLOT has no cursor and answers the
    // first `count` (newest first), and a busy identifier's slot holds a key per recent
    // settlement besides its states. Asked for more than the slot held a moment ago; a
    // full answer may have been cut short by keys added since, so it is asked again for
    // twice as many.
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("COUNTKEYSINSLOT").arg(number);
    let held: usize = redis::from_redis_value(cluster.route_command(cmd, route.clone()).await?)?;
    let mut count = held.saturating_add(1024);
    loop {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("GETKEYSINSLOT").arg(number).arg(count);
        let keys: Vec<String> =
            redis::from_redis_value(cluster.route_command(cmd, route.clone()).await?)?;
        if keys.len() < count {
            return Ok(keys);
        }
        count = count.saturating_mul(2);
    }
}

/// The key that marks settlement `id` applied, for the settlement whose first state key
/// is `key`: the same hash tag (one Redis Cluster slot with the states it settles).
///
/// Earlier releases kept their identifiers' newest ids in sorted sets (`…:settlements`,
/// and before that `…:settled`), which forgot an id once enough newer ones came: a
/// retry then applied again. Their sets are left alone and expire; a retry comes from
/// the process that first sent it, so each release finds its own ids.
fn settlement_key(key: &str, id: u64) -> StateKey {
    format!("{key}:settlement:{id}").into()
}

/// The six numbers of one limit as the scripts take them: one ARGV value of six
/// little-endian IEEE doubles (`struct.unpack('<dddddd')` in Lua), which Redis's Lua reads
/// with one C call instead of six decimal parses: `[code, p1, p2, p3]` are the rule's,
/// then two values per script. Every value is an integer below 2^53 (quotas ≤ 2^40,
/// windows ≤ 10 years in µs), so each is exact; a larger delta saturates the counters
/// anyway and is clamped first. A concurrency slot id (any u64) travels as its high and
/// low 32 bits: the high half as p3, the low half in the field the script does not use
/// for slots (the cost of an acquire, the window of an adjustment).
type PackedLimit = [u8; 48];

fn packed(values: [f64; 6]) -> PackedLimit {
    let mut out = [0u8; 48];
    for (chunk, v) in out.chunks_exact_mut(8).zip(values) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// `v` as sent: exact below 2^53 (beyond it a delta saturates the counters anyway).
fn exact(v: i64) -> f64 {
    const EXACT: i64 = 1 << 53;
    v.clamp(-EXACT, EXACT) as f64
}

/// A check's cost as sent (costs beyond `i64::MAX` saturate, as every cost beyond 2^53
/// does).
fn cost_sent(c: &LimitCheck) -> f64 {
    exact(c.cost.min(i64::MAX as u64) as i64)
}

/// A slot id's high and low 32 bits.
fn slot_halves(slot: u64) -> (f64, f64) {
    ((slot >> 32) as f64, (slot & 0xffff_ffff) as f64)
}

/// One check of acquire.lua: rule, cost, take (1 or 0).
fn check_packed(c: &LimitCheck) -> PackedLimit {
    let take = f64::from(u8::from(c.take));
    match &c.rule {
        super::Rule::Rate(a) => {
            let [code, p1, p2, p3] = a.script_params().map(|p| p as f64);
            packed([code, p1, p2, p3, cost_sent(c), take])
        }
        super::Rule::Concurrency(l) => {
            let [code, max, lease] = l.script_params().map(|p| p as f64);
            let (high, low) = slot_halves(c.slot);
            packed([code, max, lease, high, low, take])
        }
    }
}

/// One adjustment of adjust.lua: rule, delta, window (-1: none).
fn adjustment_packed(a: &Adjustment) -> PackedLimit {
    match &a.rule {
        super::Rule::Rate(alg) => {
            let [code, p1, p2, p3] = alg.script_params().map(|p| p as f64);
            // A grouped limit's place and its group's size travel in the algorithm field
            // (see adjust.lua).
            let code = match a.key.group() {
                Some((_, place)) => {
                    code + 16.0 * f64::from(place.member + 1) + 256.0 * f64::from(place.members)
                }
                None => code,
            };
            packed([
                code,
                p1,
                p2,
                p3,
                exact(a.delta),
                exact(a.window.unwrap_or(-1)),
            ])
        }
        super::Rule::Concurrency(l) => {
            let [code, max, lease] = l.script_params().map(|p| p as f64);
            let (high, low) = slot_halves(a.slot);
            packed([code, max, lease, high, exact(a.delta), low])
        }
    }
}

/// A script's ARGV: decimal integers, unsigned ids, one binary string of records (each
/// call's or settlement's counts and then its packed limits; one argument for the whole
/// script, as every argument costs Redis a parse and the script a string), decimal
/// integers.
#[derive(Default)]
struct ScriptArgs {
    head: Vec<i64>,
    records: Vec<u8>,
    tail: Vec<i64>,
}

impl ScriptArgs {
    /// Records sized for `counts` counts and `limits` packed limits.
    fn with_records(counts: usize, limits: usize) -> Self {
        Self {
            records: Vec::with_capacity(
                counts * size_of::<f64>() + limits * size_of::<PackedLimit>(),
            ),
            ..Self::default()
        }
    }

    /// Append a count (a little-endian double, as the limits' fields are).
    fn push_count(&mut self, count: usize) {
        self.records
            .extend_from_slice(&(count as f64).to_le_bytes());
    }

    fn push_limit(&mut self, limit: PackedLimit) {
        self.records.extend_from_slice(&limit);
    }

    /// Append one call's acquire: its limit count, then its limits.
    fn push_call(&mut self, checks: &[LimitCheck]) {
        self.push_count(checks.len());
        for c in checks {
            self.push_limit(check_packed(c));
        }
    }

    /// The KEYS and ARGV of one script run for the acquires of these calls (all of one
    /// shape when `shaped`, whose script takes only their quotas and costs).
    fn acquires<'c>(
        calls: impl ExactSizeIterator<Item = &'c [LimitCheck]> + Clone,
        shaped: bool,
    ) -> (Vec<StateKey>, Self) {
        let total: usize = calls.clone().map(<[LimitCheck]>::len).sum();
        let mut args = Self::with_records(1 + calls.len(), total);
        args.push_count(calls.len());
        let mut keys = Vec::with_capacity(total);
        for checks in calls {
            if shaped {
                shaped::push_call(&mut args.records, checks);
                shaped::push_keys(&mut keys, checks);
            } else {
                args.push_call(checks);
                keys.extend(checks.iter().map(|c| c.key.clone()));
            }
        }
        (keys, args)
    }
}

impl RedisStore {
    /// One call's acquire as its own script, with the caller-facing timeout.
    fn acquire_unbatched(&self, checks: Vec<LimitCheck>) -> StoreFuture<Vec<Decision>> {
        // A batch of one call.
        let shaped = match shaped::script_for(&checks) {
            Some(Carrier::Shaped(script)) => Some(script),
            Some(Carrier::Any) => None,
            None => return StoreFuture::ready(Err(ungroupable())),
        };
        let (keys, mut args) = ScriptArgs::acquires(std::iter::once(&checks[..]), shaped.is_some());
        self.push_test_clock(&mut args);
        let script = shaped.unwrap_or(&ACQUIRE);
        let in_flight = InFlightAcquire {
            reply: Some(Self::invoke(self.shared.clone(), script, keys, args)),
            sent: false,
            store: self.clone(),
            checks,
        };
        let timeout = self.shared.response_timeout;
        StoreFuture::new(async move {
            tokio::time::timeout(timeout, in_flight)
                .await
                .unwrap_or_else(|_| Err(StoreError::timeout(timeout)))
        })
    }

    /// Several calls' acquires; each call gets its own decisions. Calls of one shape go
    /// in one script (its generated one, or `acquire.lua`); a batch of several shapes
    /// sends one script per shape, all at once.
    async fn acquire_batch(&self, batch: Vec<(Vec<LimitCheck>, AcquireSender)>) {
        // Scripts are compared by address: each shape has one.
        let address = |script: Option<&'static Script>| script.map(std::ptr::from_ref);
        let mut groups: Vec<(Option<&'static Script>, Vec<_>)> = Vec::with_capacity(1);
        for call in batch {
            let script = match shaped::script_for(&call.0) {
                Some(Carrier::Shaped(script)) => Some(script),
                Some(Carrier::Any) => None,
                None => {
                    let _ = call.1.send(AcquireAnswer {
                        result: Some(Err(ungroupable())),
                        undo: None,
                    });
                    continue;
                }
            };
            match groups
                .iter_mut()
                .find(|(s, _)| address(*s) == address(script))
            {
                Some((_, calls)) => calls.push(call),
                None => groups.push((script, vec![call])),
            }
        }
        if groups.len() > 1 {
            // A call alone in its shape goes with the calls for `acquire.lua` instead: a
            // script of its own costs Redis more (its run, its clock) than the generated
            // script saves on one call.
            let mut any = Vec::new();
            groups.retain_mut(|(script, calls)| {
                // (Not a call of grouped limits: only its generated script reads them.)
                let grouped = calls[0].0.iter().any(|c| c.key.group().is_some());
                let keep = script.is_some() && (calls.len() > 1 || grouped);
                if !keep {
                    any.append(calls);
                }
                keep
            });
            if !any.is_empty() {
                groups.push((None, any));
            }
        }
        if groups.is_empty() {
            return;
        }
        let first = groups.swap_remove(0);
        let others: Vec<_> = groups
            .into_iter()
            .map(|(script, calls)| {
                let store = self.clone();
                tokio::spawn(async move { store.acquire_group(script, calls).await })
            })
            .collect();
        self.acquire_group(first.0, first.1).await;
        for other in others {
            // A group's task ends when its answers are sent; it does not panic.
            let _ = other.await;
        }
    }

    /// Calls of one shape as one script (`script`: their generated one; `None`:
    /// `acquire.lua`). A call whose caller left before the reply came has what it took
    /// given back.
    async fn acquire_group(
        &self,
        script: Option<&'static Script>,
        batch: Vec<(Vec<LimitCheck>, AcquireSender)>,
    ) {
        let (keys, mut args) = ScriptArgs::acquires(
            batch.iter().map(|(checks, _)| &checks[..]),
            script.is_some(),
        );
        self.push_test_clock(&mut args);
        let script = script.unwrap_or(&ACQUIRE);
        let reply = Self::invoke(self.shared.clone(), script, keys, args).await;
        let results = self.split_batch_reply(reply, &batch, |r, (checks, _)| r.acquire(checks));
        for ((checks, sender), result) in batch.into_iter().zip(results) {
            // Not taken by the caller (gone before or after the send): undone on drop.
            let _ = sender.send(AcquireAnswer {
                result: Some(result),
                undo: Some((self.clone(), checks)),
            });
        }
    }

    /// Several settlements as one script; each gets its own decisions. A settlement
    /// whose caller left is applied all the same (its caller retries it under the same
    /// id, which then finds it applied).
    async fn adjust_batch(&self, batch: Vec<(Vec<Adjustment>, Option<u64>, ReplySender)>) {
        let settlements: Vec<_> = batch.iter().map(|(a, id, _)| (&a[..], *id)).collect();
        let (keys, args) = self.adjust_script_input(&settlements);
        let reply = Self::invoke(self.shared.clone(), &ADJUST, keys, args).await;
        let results = self.split_batch_reply(reply, &batch, |r, (a, _, _)| r.adjust(a));
        for ((_, _, sender), result) in batch.into_iter().zip(results) {
            let _ = sender.send(result);
        }
    }

    /// A batch script's reply cut into each item's decisions (`decode` reads one item's
    /// part), or each item's share of the script's failure.
    fn split_batch_reply<T>(
        &self,
        reply: Result<ScriptReply, StoreError>,
        items: &[T],
        decode: impl Fn(&mut ScriptReply, &T) -> Result<Vec<Decision>, StoreError>,
    ) -> Vec<Result<Vec<Decision>, StoreError>> {
        let mut reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                let timeout = error.is_timeout();
                let message = format!("batched script failed: {error}");
                return items
                    .iter()
                    .map(|_| {
                        Err(if timeout {
                            StoreError::timeout(self.shared.response_timeout)
                        } else {
                            StoreError::new(message.clone())
                        })
                    })
                    .collect();
            }
        };
        items.iter().map(|item| decode(&mut reply, item)).collect()
    }

    /// KEYS and ARGV of adjust.lua for these settlements.
    fn adjust_script_input(
        &self,
        settlements: &[(&[Adjustment], Option<u64>)],
    ) -> (Vec<StateKey>, ScriptArgs) {
        let limits: usize = settlements.iter().map(|(a, _)| a.len()).sum();
        // Two counts per settlement: its limits, and whether it has an id.
        let mut args = ScriptArgs::with_records(2 * settlements.len(), limits);
        let mut keys = Vec::with_capacity(limits + settlements.len());
        // ARGV[1]: how many settlements; ARGV[2]: how long to remember an id (ms);
        // ARGV[3]: a test's "now" or -1; then one string: per settlement, its limit count
        // and whether it has an id, then its limits.
        args.head.extend([
            settlements.len() as i64,
            self.shared
                .settlement_dedupe
                .as_millis()
                .min(i64::MAX as u128) as i64,
            self.test_now().unwrap_or(-1),
        ]);
        for (adjustments, id) in settlements {
            let first = adjustments.first();
            args.push_count(adjustments.len());
            args.push_count(usize::from(id.is_some() && first.is_some()));
            for a in adjustments.iter() {
                args.push_limit(adjustment_packed(a));
                keys.push(match a.key.group() {
                    Some((group, _)) => StateKey::from(group),
                    None => a.key.clone(),
                });
            }
            if let (Some(id), Some(first)) = (id, first) {
                keys.push(settlement_key(&first.key, *id));
            }
        }
        (keys, args)
    }
}

/// Sends queued acquires and settlements: alone when Redis is idle, together when
/// earlier batches are still out (up to [`MAX_BATCHES_IN_FLIGHT`] at once). Ends when
/// every store handle that could queue is gone.
async fn batch_worker(store: RedisStore, mut queue: tokio::sync::mpsc::UnboundedReceiver<Queued>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        if in_flight.available_permits() + 1 < MAX_BATCHES_IN_FLIGHT {
            // Other batches are out, so Redis is busy: let the callers just woken by a
            // batch's answer queue their next calls first, so this batch carries them
            // (one script for many) instead of leaving with the few already queued.
            tokio::task::yield_now().await;
        }
        // Everything that queued up while waiting goes in this batch, but for acquires
        // whose caller already left: those are never sent.
        let mut acquires = Vec::new();
        let mut adjusts = Vec::new();
        let mut sort = |q: Queued| match q {
            Queued::Acquire { checks, reply } => acquires.push((checks, reply)),
            Queued::Adjust {
                adjustments,
                settlement_id,
                reply,
            } => adjusts.push((adjustments, settlement_id, reply)),
        };
        let mut taken = 0;
        for q in std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok())) {
            if !q.abandoned() {
                sort(q);
            }
            taken += 1;
            if taken == MAX_BATCH {
                break;
            }
        }
        if acquires.is_empty() && adjusts.is_empty() {
            continue;
        }
        let store = store.clone();
        tokio::spawn(async move {
            let acquire = async {
                if !acquires.is_empty() {
                    store.acquire_batch(acquires).await;
                }
            };
            let adjust = async {
                if !adjusts.is_empty() {
                    store.adjust_batch(adjusts).await;
                }
            };
            tokio::join!(acquire, adjust);
            drop(permit);
        });
    }
}

impl RedisStore {
    /// Queue `job` for the batching task and wait for its answer (read by `read`).
    fn enqueue<T: Send + 'static>(
        &self,
        batcher: &tokio::sync::mpsc::UnboundedSender<Queued>,
        job: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Queued,
        read: fn(T) -> Result<Vec<Decision>, StoreError>,
    ) -> StoreFuture<Vec<Decision>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if batcher.send(job(reply)).is_err() {
            return StoreFuture::ready(Err(StoreError::new("the batching task stopped")));
        }
        let timeout = self.shared.response_timeout;
        // Dropping `answer` (timeout, cancellation) tells the batcher to skip an acquire
        // not sent yet; one sent is undone when its answer is dropped unread.
        StoreFuture::new(async move {
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(answer)) => read(answer),
                Ok(Err(_)) => Err(StoreError::new("the batching task stopped")),
                Err(_) => Err(StoreError::timeout(timeout)),
            }
        })
    }
}

impl Store for RedisStore {
    fn acquire(&self, checks: &[LimitCheck]) -> StoreFuture<Vec<Decision>> {
        if checks.is_empty() {
            return StoreFuture::ready(Ok(Vec::new()));
        }
        let checks = checks.to_vec();
        match &self.shared.batcher {
            Some(batcher) => self.enqueue(
                batcher,
                |reply| Queued::Acquire { checks, reply },
                AcquireAnswer::take,
            ),
            None => self.acquire_unbatched(checks),
        }
    }

    fn adjust(
        &self,
        adjustments: &[Adjustment],
        settlement_id: Option<u64>,
    ) -> StoreFuture<Vec<Decision>> {
        if adjustments.is_empty() {
            return StoreFuture::ready(Ok(Vec::new()));
        }
        if let Some(batcher) = &self.shared.batcher {
            let adjustments = adjustments.to_vec();
            return self.enqueue(
                batcher,
                |reply| Queued::Adjust {
                    adjustments,
                    settlement_id,
                    reply,
                },
                std::convert::identity,
            );
        }
        let (keys, args) = self.adjust_script_input(&[(adjustments, settlement_id)]);
        let shared = self.shared.clone();
        let adjustments = adjustments.to_vec();
        StoreFuture::new(async move {
            let mut reply = Self::run(shared, &ADJUST, keys, args).await?;
            reply.adjust(&adjustments)
        })
    }

    fn delete_identifier(&self, prefixes: Vec<String>, tag: String) -> StoreFuture<()> {
        let shared = self.shared.clone();
        StoreFuture::new(async move {
            let of_identifier = super::IdentifierKeys::new(prefixes, &tag);
            let suffix = of_identifier.suffix();
            let keep = |key: &String| of_identifier.contains(key);
            let work = async {
                let mut conn = shared.conn.clone();
                let keys: Vec<String> = match &conn {
                    #[cfg(feature = "cluster")]
                    Connection::Cluster(_) => cluster_keys_of(&mut conn, suffix).await?,
                    Connection::Single(_) => {
                        // One pass over the database for every prefix (each pass reads
                        // every key): the identifier's keys, whatever their prefix, then
                        // filtered here.
                        let pattern = format!("*{}", glob_escape(suffix));
                        let mut found = Vec::new();
                        let mut cursor: u64 = 0;
                        loop {
                            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                                .arg(cursor)
                                .arg("MATCH")
                                .arg(&pattern)
                                .arg("COUNT")
                                .arg(1000)
                                .query_async(&mut conn)
                                .await?;
                            found.extend(batch);
                            if next == 0 {
                                break;
                            }
                            cursor = next;
                        }
                        found
                    }
                };
                let keys: Vec<String> = keys.into_iter().filter(keep).collect();
                // One key per DEL: on a cluster every key is in the identifier's slot
                // anyway, and this is no hot path.
                for key in keys {
                    redis::cmd("DEL")
                        .arg(key)
                        .query_async::<i64>(&mut conn)
                        .await?;
                }
                Ok::<_, redis::RedisError>(())
            };
            // Each reply is awaited within REPLY_WAIT by the connection; the whole takes
            // as long as the scan does (it grows with the database), and the caller
            // bounds it.
            work.await
                .map_err(|e| StoreError::with_source("deleting an identifier's keys failed", e))
        })
    }

    fn delete(&self, keys: Vec<String>) -> StoreFuture<()> {
        let shared = self.shared.clone();
        StoreFuture::new(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let mut conn = shared.conn.clone();
            let mut cmd = redis::cmd("DEL");
            for k in &keys {
                cmd.arg(k.as_str());
            }
            match tokio::time::timeout(shared.response_timeout, cmd.query_async::<i64>(&mut conn))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(StoreError::with_source("Redis DEL failed", e)),
                Err(_) => Err(StoreError::timeout(shared.response_timeout)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FixedWindow;

    fn packed_state(a: f64, b: f64, c: f64) -> Vec<u8> {
        let mut raw = vec![1u8];
        for v in [a, b, c] {
            raw.extend(v.to_le_bytes());
        }
        raw
    }

    #[test]
    fn states_read_as_the_scripts_read_them() {
        assert_eq!(
            parse_state(&packed_state(7.0, 3.0, 2.0)),
            Some(State { a: 7, b: 3, c: 2 })
        );
        // The text form of earlier releases.
        assert_eq!(parse_state(b"-4:12:0"), Some(State { a: -4, b: 12, c: 0 }));
        // Numbers beyond what the scripts write are clamped to ±2^52 (and in text are
        // read as the scripts read them: as doubles, not as 64-bit integers).
        let max = 1i64 << 52;
        assert_eq!(
            parse_state(&packed_state(1e20, f64::MAX, -1e300)),
            Some(State {
                a: max,
                b: max,
                c: -max
            })
        );
        assert_eq!(
            parse_state(b"1:99999999999999999999:-9223372036854775808"),
            Some(State {
                a: 1,
                b: max,
                c: -max
            })
        );
        assert_eq!(
            parse_state(&packed_state(f64::NAN, 0.0, 0.0)).map(|s| s.a),
            Some(0)
        );
        // Anything else is no state (the scripts' pattern does not match it).
        for raw in [
            &b"1:2"[..],
            b"1:2:3:4",
            b"a:b:c",
            b"1::3",
            b"-:1:2",
            b"",
            &[1u8; 24],
        ] {
            assert_eq!(parse_state(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn members_read_from_their_places_as_the_scripts_read_them() {
        let mut value = vec![2u8];
        // By columns: the members' first numbers, then their second, then their third.
        for v in [7.0, 0.0, f64::NAN, 3.0, 0.0, 1e300, 0.0, 0.0, -1e300] {
            value.extend(f64::to_le_bytes(v));
        }
        let max = 1i64 << 52;
        assert_eq!(member_state(&value, 0, 3), Some(State { a: 7, b: 3, c: 0 }));
        // Three zeros: no state.
        assert_eq!(member_state(&value, 1, 3), None);
        assert_eq!(
            member_state(&value, 2, 3),
            Some(State {
                a: 0,
                b: max,
                c: -max
            })
        );
        // Not a value of three members, another marker, a place beyond: no state.
        assert_eq!(member_state(&value, 0, 2), None);
        assert_eq!(member_state(&value, 3, 3), None);
        value[0] = 1;
        assert_eq!(member_state(&value, 0, 3), None);
        assert_eq!(member_state(b"", 0, 1), None);
    }

    fn reply(parts: Vec<redis::Value>) -> ScriptReply {
        ScriptReply {
            now: 3_600_000_000,
            parts: parts.into_iter(),
        }
    }

    fn check(cost: u64, take: bool) -> LimitCheck {
        LimitCheck {
            key: "t:{u}".into(),
            rule: Rule::Rate(FixedWindow::new(5, Duration::from_secs(60)).unwrap().into()),
            cost,
            take,
            slot: 0,
        }
    }

    #[test]
    fn decisions_come_from_the_states_the_script_read() {
        // Window 60 (the script's "now" is 3 600 s), 4 of 5 used: a cost of 1 fits.
        let state = redis::Value::BulkString(packed_state(60.0, 4.0, 0.0));
        let mut r = reply(vec![redis::Value::Int(1), state.clone()]);
        let d = r.acquire(&[check(1, true)]).unwrap();
        assert_eq!(
            (d[0].allowed, d[0].remaining, d[0].window),
            (true, 0, Some(60))
        );
        // Denied by the script: reported as it is, with nothing taken.
        let mut r = reply(vec![redis::Value::Int(0), state.clone()]);
        let d = r.acquire(&[check(2, true)]).unwrap();
        assert_eq!((d[0].allowed, d[0].remaining), (false, 1));
        assert_eq!(d[0].retry_after, Some(Duration::from_secs(60)));
        // A script that denied what the states allow is reported as a denial.
        let mut r = reply(vec![redis::Value::Int(0), state]);
        assert!(!r.acquire(&[check(1, true)]).unwrap()[0].allowed);
        // A key of another type, and a reply cut short, are errors, not panics.
        let mut r = reply(vec![redis::Value::Int(-1), redis::Value::Nil]);
        assert!(r.acquire(&[check(1, true)]).is_err());
        let mut r = reply(vec![redis::Value::Int(1)]);
        assert!(r.acquire(&[check(1, true)]).is_err());
    }

    /// A reply whose time is no server clock's (out of 0..=2^52 µs) is an error, not a
    /// panic in the arithmetic it would feed.
    #[test]
    fn a_reply_whose_time_is_out_of_range_is_an_error() {
        let with_now = |now: i64| {
            redis::Value::Array(vec![
                redis::Value::Int(now),
                redis::Value::Int(1),
                redis::Value::Nil,
            ])
        };
        for now in [i64::MAX, i64::MIN, -1, (1 << 52) + 1] {
            assert!(
                script_reply(Ok(with_now(now)), Duration::ZERO).is_err(),
                "{now}"
            );
        }
        let mut reply = script_reply(Ok(with_now(1_800_000_000_000_000)), Duration::ZERO).unwrap();
        assert!(reply.acquire(&[check(1, true)]).unwrap()[0].allowed);
        assert!(script_reply(Ok(redis::Value::Int(1)), Duration::ZERO).is_err());
    }

    /// States no script writes (a key set by hand) are decided as the scripts decide
    /// them, without overflowing: a count beyond any limit denies, a huge negative one
    /// allows.
    #[test]
    fn extreme_states_are_decided_without_overflow() {
        let state = |raw: &[u8]| redis::Value::BulkString(raw.to_vec());
        let huge = format!("60:{}:0", i64::MAX);
        let negative = format!("60:{}:0", i64::MIN);
        for (raw, script_allowed) in [
            (state(huge.as_bytes()), 0),
            (state(b"60:99999999999999999999:0"), 0),
            (state(&packed_state(60.0, 1e300, 0.0)), 0),
            (state(negative.as_bytes()), 1),
        ] {
            let mut r = reply(vec![redis::Value::Int(script_allowed), raw.clone()]);
            let d = r.acquire(&[check(1, true)]).unwrap();
            assert_eq!(d[0].allowed, script_allowed == 1, "{raw:?}");
            let mut r = reply(vec![redis::Value::Int(1), raw.clone()]);
            let refund = Adjustment {
                key: "t:{u}".into(),
                rule: check(1, true).rule,
                delta: -1,
                slot: 0,
                window: Some(60),
            };
            let d = r.adjust(&[refund]).unwrap();
            assert_eq!(d[0].allowed, script_allowed == 1, "{raw:?}");
        }
    }
}
