//! What the layer does when the store fails: a timeout on every store call, a
//! failure policy for decisions, a circuit breaker so a dead store costs one timeout and
//! not one per call, and a queue that retries settlements until they land.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::StoreError;
use crate::store::{Adjustment, Decision, LimitCheck, MemoryStore, Store};

/// What a call does when the store cannot decide (error or timeout).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorPolicy {
    /// Fail the call with a store error (HTTP: 503). The default: no limit is ever
    /// exceeded because the store was down.
    #[default]
    FailClosed,
    /// Let the call through, flagged as a fallback decision. Usage is still charged to
    /// the store once it is back (queued).
    FailOpen,
    /// Decide on an in-process [`MemoryStore`] until the store is back: each instance
    /// enforces the limits on its own. Usage is also charged to the store once it is back.
    Local,
}

/// How a call's acquire was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decider {
    Store,
    Open,
    Local,
}

impl Decider {
    /// The `x-ratelimit-fallback` header value.
    #[cfg(feature = "http")]
    pub(crate) fn label(self) -> Option<&'static str> {
        match self {
            Decider::Store => None,
            Decider::Open => Some("open"),
            Decider::Local => Some("local"),
        }
    }
}

pub(crate) use crate::store::next_id;

/// Run a store future with a timeout.
pub(crate) async fn with_timeout<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::timeout(timeout)),
    }
}

/// Skips the store for a short while after it failed, so a dead or black-holed store
/// costs one timeout per cool-down rather than one per call.
#[derive(Debug)]
pub(crate) struct Breaker {
    open_until_ms: AtomicI64,
    cool_down: Duration,
    epoch: Instant,
}

impl Breaker {
    pub(crate) fn new(cool_down: Duration) -> Self {
        Self {
            open_until_ms: AtomicI64::new(0),
            cool_down,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    pub(crate) fn is_open(&self) -> bool {
        // 0: never tripped, or reset by a success since (the usual case, and all there is
        // for an in-process store): no clock read.
        let until = self.open_until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    pub(crate) fn trip(&self) {
        let until = self.now_ms() + self.cool_down.as_millis() as i64;
        self.open_until_ms.store(until, Ordering::Relaxed);
    }

    pub(crate) fn reset(&self) {
        self.open_until_ms.store(0, Ordering::Relaxed);
    }
}

/// Decide `checks` when the store failed, per `policy`. `None`: fail closed.
pub(crate) fn fallback_decisions(
    policy: StoreErrorPolicy,
    local: &MemoryStore,
    checks: &[LimitCheck],
) -> Option<(Vec<Decision>, Decider)> {
    let mark = |mut d: Vec<Decision>| {
        for x in &mut d {
            x.fallback = true;
        }
        d
    };
    match policy {
        StoreErrorPolicy::FailClosed => None,
        StoreErrorPolicy::FailOpen => {
            let decisions = checks
                .iter()
                .map(|c| Decision {
                    allowed: true,
                    limit: c.rule.limit(),
                    remaining: c.rule.limit(),
                    reset_after: Duration::ZERO,
                    retry_after: None,
                    fallback: true,
                    window: None,
                })
                .collect();
            Some((decisions, Decider::Open))
        }
        StoreErrorPolicy::Local => Some((mark(local.acquire_now(checks)), Decider::Local)),
    }
}

/// What to do once a queued write lands (drop cached denials, wake waiting calls).
pub(crate) type OnLanded = Arc<dyn Fn(&[Adjustment]) + Send + Sync>;

/// A settlement write that has not landed yet.
#[derive(Clone)]
struct Queued {
    adjustments: Vec<Adjustment>,
    id: u64,
    on_landed: OnLanded,
}

struct QueueState {
    items: VecDeque<Queued>,
    worker_running: bool,
}

/// Settlement writes that failed, retried with backoff until they land. Each keeps its
/// settlement id, so a write that did land before its failure was reported is not applied
/// twice (the Redis script deduplicates ids).
pub(crate) struct SettlementQueue {
    state: Mutex<QueueState>,
    capacity: usize,
    dropped: AtomicU64,
    idle: tokio::sync::Notify,
    stopping: AtomicBool,
}

impl std::fmt::Debug for SettlementQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettlementQueue")
            .field("pending", &self.len())
            .finish()
    }
}

impl Drop for SettlementQueue {
    fn drop(&mut self) {
        // Settlements of a layer that is gone are no longer pending anywhere.
        let left = self.lock().items.len();
        if left > 0 {
            super::metrics::pending_settlements_changed(-(left as i64));
        }
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl SettlementQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                worker_running: false,
            }),
            capacity,
            dropped: AtomicU64::new(0),
            idle: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Settlements waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Settlements given up because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queue a failed write and make sure a worker retries it.
    pub(crate) fn push(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        timeout: Duration,
        adjustments: Vec<Adjustment>,
        id: u64,
        on_landed: OnLanded,
    ) {
        let start_worker = {
            let mut state = self.lock();
            if state.items.len() >= self.capacity {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    capacity = self.capacity,
                    "settlement queue full: a charge is lost (the store has been down too long)"
                );
                return;
            }
            state.items.push_back(Queued {
                adjustments,
                id,
                on_landed,
            });
            super::metrics::pending_settlements_changed(1);
            tracing::warn!(
                pending = state.items.len(),
                "queued a settlement the store did not take"
            );
            !std::mem::replace(&mut state.worker_running, true)
        };
        if start_worker {
            let queue = self.clone();
            let worker = async move { queue.drain(store, timeout).await };
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(worker);
                }
                Err(_) => {
                    self.lock().worker_running = false;
                    tracing::error!("no Tokio runtime to retry queued settlements on");
                }
            }
        }
    }

    /// Write queued settlements oldest first, backing off while the store fails.
    async fn drain(self: Arc<Self>, store: Arc<dyn Store>, timeout: Duration) {
        // However else the worker ends (a store future that panics, its task cancelled),
        // the next push starts another.
        struct Running<'a> {
            queue: &'a SettlementQueue,
            ended: bool,
        }
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                if !self.ended {
                    self.queue.lock().worker_running = false;
                }
            }
        }
        let mut running = Running {
            queue: &self,
            ended: false,
        };
        let mut backoff = MIN_BACKOFF;
        loop {
            // The item stays queued (and counted) until its write has landed.
            let next = {
                let mut state = self.lock();
                match state.items.front() {
                    Some(item) => item.clone(),
                    None => {
                        state.worker_running = false;
                        running.ended = true;
                        drop(state);
                        self.idle.notify_waiters();
                        return;
                    }
                }
            };
            let write = store.adjust(&next.adjustments, Some(next.id));
            match with_timeout(timeout, write).await {
                Ok(_) => {
                    (next.on_landed)(&next.adjustments);
                    // Found by its id: a reset may have dropped it (or part of it) while
                    // its write was out.
                    let mut state = self.lock();
                    if let Some(at) = state.items.iter().position(|i| i.id == next.id) {
                        state.items.remove(at);
                        super::metrics::pending_settlements_changed(-1);
                    }
                    drop(state);
                    backoff = MIN_BACKOFF;
                }
                Err(error) => {
                    tracing::debug!(%error, "queued settlement not written yet; retrying");
                    if self.stopping.load(Ordering::Relaxed) {
                        backoff = MIN_BACKOFF;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Drop the queued adjustments of every key `reset` matches, and the settlements
    /// left with none: the identifier they charge has been reset, and a charge from
    /// before a reset must not land after it. (A write already out when this runs is
    /// not called back.)
    pub(crate) fn forget(&self, reset: impl Fn(&str) -> bool) {
        let mut state = self.lock();
        let before = state.items.len();
        for item in state.items.iter_mut() {
            item.adjustments.retain(|a| !reset(&a.key));
        }
        state.items.retain(|item| !item.adjustments.is_empty());
        let gone = before - state.items.len();
        if gone > 0 {
            super::metrics::pending_settlements_changed(-(gone as i64));
        }
    }

    /// Wait until every queued settlement has landed, or `deadline` passes. Returns how
    /// many are still pending.
    pub(crate) async fn flush(&self, deadline: Duration) -> usize {
        self.stopping.store(true, Ordering::Relaxed);
        let until = super::deadline_after(deadline);
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            // Registered before looking, so a drain finishing in between is not missed.
            idle.as_mut().enable();
            if self.len() == 0 {
                self.stopping.store(false, Ordering::Relaxed);
                return 0;
            }
            if tokio::time::timeout_at(until, idle).await.is_err() {
                self.stopping.store(false, Ordering::Relaxed);
                return self.len();
            }
        }
    }
}
