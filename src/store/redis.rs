//! The Redis store: every operation is one Lua script, one round trip.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::{Adjustment, Decision, LimitCheck, Store, StoreFuture};
use crate::error::StoreError;

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/lib.lua"),
        include_str!("lua/acquire.lua")
    ))
});

static ACQUIRE_BATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/lib.lua"),
        include_str!("lua/acquire_batch.lua")
    ))
});

/// Most calls' acquires sent in one batch script.
const MAX_BATCH: usize = 32;
/// Batches in flight at once; while all are out, new acquires queue up and go together.
const MAX_BATCHES_IN_FLIGHT: usize = 4;

static ADJUST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/lib.lua"),
        include_str!("lua/adjust.lua")
    ))
});

/// Connection settings of a [`RedisStore`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RedisOptions {
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How long one store operation may take before it fails with a timeout
    /// ([`StoreError::is_timeout`]). The script may still have run in Redis.
    pub response_timeout: Duration,
    /// Send the acquires of concurrent calls together in one script when Redis is
    /// already busy with earlier ones (single Redis only; default on). A call that finds
    /// Redis idle goes alone at once, so batching adds no latency.
    pub batching: bool,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            batching: true,
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

/// One call's acquire waiting for a batch.
struct Queued {
    checks: Vec<LimitCheck>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Decision>, StoreError>>,
}

struct Shared {
    conn: Connection,
    /// Where acquires go to be batched; `None`: each is sent on its own.
    batcher: Option<tokio::sync::mpsc::UnboundedSender<Queued>>,
    response_timeout: Duration,
    /// Tests only: decide at this clock's time instead of the server's.
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
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| StoreError::with_source("cannot connect to Redis", e))?;
        let store = Self::from_connection_manager(conn, options.response_timeout);
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
            .response_timeout(options.response_timeout)
            .retries(2)
            .build()
            .map_err(|e| StoreError::with_source(format!("invalid cluster nodes {nodes:?}"), e))?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(|e| StoreError::with_source("cannot connect to the Redis Cluster", e))?;
        Ok(Self::with_connection(
            Connection::Cluster(conn),
            options.response_timeout,
        ))
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
                clock: None,
            }),
        }
    }

    /// Tests only: decide at `clock`'s time instead of the Redis server's, so a test can
    /// step time (the differential property test compares stores at the same instants).
    #[doc(hidden)]
    pub fn with_test_clock(self, clock: crate::store::ManualClock) -> Self {
        let shared = Shared {
            conn: self.shared.conn.clone(),
            batcher: None,
            response_timeout: self.shared.response_timeout,
            clock: Some(clock),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    fn push_test_clock(&self, args: &mut Vec<i64>) {
        if let Some(clock) = &self.shared.clock {
            use crate::store::Clock;
            args.push(clock.now_micros());
        }
    }

    async fn run(
        shared: Arc<Shared>,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<i64>,
    ) -> Result<Vec<i64>, StoreError> {
        let mut conn = shared.conn.clone();
        let mut invocation = script.prepare_invoke();
        for k in &keys {
            invocation.key(k.as_str());
        }
        for a in &args {
            invocation.arg(*a);
        }
        match tokio::time::timeout(
            shared.response_timeout,
            invocation.invoke_async::<Vec<i64>>(&mut conn),
        )
        .await
        {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::timeout(shared.response_timeout)),
            Ok(Err(e)) => Err(StoreError::with_source("Redis script failed", e)),
            Err(_) => Err(StoreError::timeout(shared.response_timeout)),
        }
    }
}

/// Parse `count` decisions of five integers each from `fields`.
fn parse_decisions(fields: &[i64], count: usize) -> Result<Vec<Decision>, StoreError> {
    if fields.len() != count * 5 {
        return Err(StoreError::new(format!(
            "unexpected script reply: {} fields for {count} limits",
            fields.len()
        )));
    }
    Ok(fields
        .chunks_exact(5)
        .map(|f| Decision {
            allowed: f[0] == 1,
            limit: f[1].max(0) as u64,
            remaining: f[2].max(0) as u64,
            reset_after: Duration::from_micros(f[3].max(0) as u64),
            retry_after: (f[4] >= 0).then(|| Duration::from_micros(f[4] as u64)),
            fallback: false,
        })
        .collect())
}

/// How long a settlement id is remembered: far longer than any retry of an ambiguous
/// write takes (retries come within seconds; a store that is down fails fast).
const SETTLEMENT_MEMORY: Duration = Duration::from_secs(3600);

/// The four algorithm values of one limit (`[code, p1, p2, p3]`); for concurrency, p3
/// carries the call's slot.
fn algorithm_args(algorithm: &crate::Algorithm, slot: u64, args: &mut Vec<i64>) {
    let mut params = algorithm.script_params();
    if params[0] == 4 {
        params[3] = slot;
    }
    args.extend(params.iter().map(|&p| p as i64));
}

/// The six ARGV values of one check in acquire.lua / acquire_batch.lua.
fn check_args(c: &LimitCheck, args: &mut Vec<i64>) {
    algorithm_args(&c.algorithm, c.slot, args);
    args.push(c.cost as i64);
    args.push(c.take as i64);
}

impl RedisStore {
    /// One call's acquire as its own script.
    fn acquire_unbatched(&self, checks: Vec<LimitCheck>) -> StoreFuture<Vec<Decision>> {
        let this = self.clone();
        Box::pin(async move {
            let count = checks.len();
            let mut args = Vec::with_capacity(count * 6);
            let mut keys = Vec::with_capacity(count);
            for c in checks {
                check_args(&c, &mut args);
                keys.push(c.key);
            }
            this.push_test_clock(&mut args);
            let reply = Self::run(this.shared.clone(), &ACQUIRE, keys, args).await?;
            match reply.split_first() {
                Some((_, rest)) => parse_decisions(rest, count),
                None => Err(StoreError::new("empty script reply")),
            }
        })
    }

    /// Several calls' acquires as one script; each call gets its own decisions.
    async fn acquire_batch(&self, batch: Vec<Queued>) {
        let calls = batch.len();
        let total: usize = batch.iter().map(|q| q.checks.len()).sum();
        let mut args = Vec::with_capacity(1 + calls + total * 6);
        let mut keys = Vec::with_capacity(total);
        let mut replies = Vec::with_capacity(calls);
        args.push(calls as i64);
        args.extend(batch.iter().map(|q| q.checks.len() as i64));
        for q in batch {
            for c in &q.checks {
                check_args(c, &mut args);
            }
            replies.push((q.checks.len(), q.reply));
            keys.extend(q.checks.into_iter().map(|c| c.key));
        }
        self.push_test_clock(&mut args);
        match Self::run(self.shared.clone(), &ACQUIRE_BATCH, keys, args).await {
            Ok(reply) => {
                let mut rest = &reply[..];
                for (count, tx) in replies {
                    let size = 1 + count * 5;
                    let result = if rest.len() >= size {
                        let decisions = parse_decisions(&rest[1..size], count);
                        rest = &rest[size..];
                        decisions
                    } else {
                        Err(StoreError::new("short batch reply"))
                    };
                    let _ = tx.send(result);
                }
            }
            Err(error) => {
                for (_, tx) in replies {
                    let each = if error.is_timeout() {
                        StoreError::timeout(self.shared.response_timeout)
                    } else {
                        StoreError::new(format!("batched acquire failed: {error}"))
                    };
                    let _ = tx.send(Err(each));
                }
            }
        }
    }
}

/// Sends queued acquires: alone when Redis is idle, together when earlier batches are
/// still out (up to [`MAX_BATCHES_IN_FLIGHT`] at once). Ends when every store handle
/// that could queue is gone.
async fn batch_worker(store: RedisStore, mut queue: tokio::sync::mpsc::UnboundedReceiver<Queued>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // Everything that queued up while waiting goes in this batch.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            if batch.len() == 1 {
                if let Some(q) = batch.pop() {
                    let result = store.acquire_unbatched(q.checks).await;
                    let _ = q.reply.send(result);
                }
            } else {
                store.acquire_batch(batch).await;
            }
            drop(permit);
        });
    }
}

impl Store for RedisStore {
    fn acquire(&self, checks: Vec<LimitCheck>) -> StoreFuture<Vec<Decision>> {
        if let Some(batcher) = &self.shared.batcher {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if batcher.send(Queued { checks, reply }).is_ok() {
                return Box::pin(async move {
                    answer
                        .await
                        .unwrap_or_else(|_| Err(StoreError::new("the batching task stopped")))
                });
            }
            return Box::pin(std::future::ready(Err(StoreError::new(
                "the batching task stopped",
            ))));
        }
        self.acquire_unbatched(checks)
    }

    fn adjust(
        &self,
        adjustments: Vec<Adjustment>,
        settlement_id: Option<u64>,
    ) -> StoreFuture<Vec<Decision>> {
        let this = self.clone();
        Box::pin(async move {
            let count = adjustments.len();
            let mut args = Vec::with_capacity(2 + count * 5);
            let mut keys = Vec::with_capacity(count + 1);
            // ARGV[1]: the id (-1 for none), ARGV[2]: how long to remember it.
            args.push(settlement_id.map_or(-1, |id| id as i64));
            args.push(SETTLEMENT_MEMORY.as_millis() as i64);
            let dedupe_key = settlement_id
                .zip(adjustments.first())
                .map(|(id, a)| format!("{}:settled:{id}", a.key));
            for a in adjustments {
                algorithm_args(&a.algorithm, a.slot, &mut args);
                args.push(a.delta);
                keys.push(a.key);
            }
            this.push_test_clock(&mut args);
            keys.extend(dedupe_key);
            let reply = Self::run(this.shared.clone(), &ADJUST, keys, args).await?;
            parse_decisions(&reply, count)
        })
    }

    fn delete(&self, keys: Vec<String>) -> StoreFuture<()> {
        let shared = self.shared.clone();
        Box::pin(async move {
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
