//! Settlement of one call: exactly once on every path, including cancellation and store
//! outages.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use super::reliability::{Decider, fallback_decisions, next_id, with_timeout};
use super::{Limits, MissingUsage, Plan};
use crate::algorithm::Algorithm;
use crate::error::StoreError;
use crate::llm::Usage;
use crate::store::{Adjustment, Decision, LimitCheck};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type AcquireFuture = BoxFuture<Result<(Vec<Decision>, Decider), StoreError>>;

/// Where a call's settlement stands. Whatever phase it is in when dropped, [`Drop`]
/// finishes it in the background, so dropping a call never leaks a reservation or slot.
enum Phase {
    /// The pre-dispatch acquire is in flight; if it turns out allowed, the reservation
    /// must be refunded (and the slot released) should the call not continue.
    Acquiring(AcquireFuture),
    /// An in-process store already answered (no future needed).
    Acquired(Option<Result<(Vec<Decision>, Decider), StoreError>>),
    /// Acquired; the call is running. Dropped here: refund and release.
    Armed,
    /// The settling write is in flight (it queues itself if the store fails).
    Writing(BoxFuture<()>),
    /// Nothing left to do.
    Done,
}

/// A call's debt to the store: the token reservation and concurrency slot taken before
/// dispatch, settled against the reported usage after it.
pub(crate) struct Settlement {
    limits: Arc<Limits>,
    /// Key of the token limit for this identifier, when a token limit is configured.
    token_key: Option<String>,
    /// Concurrency key, limit and this call's slot, when a concurrency limit is configured.
    slot: Option<(String, Algorithm, u64)>,
    /// Tokens taken before dispatch (`Reserve` mode), 0 otherwise.
    reserved: u64,
    /// Dedupes retried writes of this settlement in the store.
    id: u64,
    decider: Decider,
    phase: Phase,
}

/// The acquire for `checks`: on the store (with a timeout), else per the failure policy.
fn acquire(limits: Arc<Limits>, checks: Vec<LimitCheck>) -> AcquireFuture {
    Box::pin(async move {
        if limits.store_is_local {
            return Ok((limits.store.acquire(checks).await?, Decider::Store));
        }
        let (error, checks) = if limits.breaker.is_open() {
            // Recently failed: the policy decides without waiting for another timeout.
            let error = StoreError::new("store unavailable (recent failures; retrying shortly)");
            (error, checks)
        } else {
            // Kept only when a fallback may need the checks.
            let retained = if limits.on_store_error == super::StoreErrorPolicy::FailClosed {
                Vec::new()
            } else {
                checks.clone()
            };
            match with_timeout(limits.store_timeout, limits.store.acquire(checks)).await {
                Ok(decisions) => {
                    limits.breaker.reset();
                    return Ok((decisions, Decider::Store));
                }
                Err(error) => {
                    limits.breaker.trip();
                    tracing::error!(%error, policy = ?limits.on_store_error, "rate-limit store failed");
                    (error, retained)
                }
            }
        };
        let (decisions, decider) =
            fallback_decisions(limits.on_store_error, &limits.local, &checks).ok_or(error)?;
        tracing::warn!(?decider, "rate limit decided without the store");
        Ok((decisions, decider))
    })
}

impl Settlement {
    pub(crate) fn new(limits: Arc<Limits>, plan: Plan) -> Self {
        let sync = if limits.store_is_local {
            limits.store.acquire_sync(&plan.checks)
        } else {
            None
        };
        let phase = match sync {
            Some(decisions) => Phase::Acquired(Some(Ok((decisions, Decider::Store)))),
            None => Phase::Acquiring(acquire(limits.clone(), plan.checks)),
        };
        Self {
            limits,
            token_key: plan.token_key,
            slot: plan.slot,
            reserved: plan.reserved,
            id: next_id(),
            decider: Decider::Store,
            phase,
        }
    }

    /// How the acquire was decided (known once it finished).
    pub(crate) fn decider(&self) -> Decider {
        self.decider
    }

    /// Drive the acquire. Ready(Ok(decisions)) arms the settlement if all were allowed
    /// (a denial took nothing, so there is nothing left to settle).
    pub(crate) fn poll_acquire(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Vec<Decision>, StoreError>> {
        let result = match &mut self.phase {
            Phase::Acquiring(fut) => std::task::ready!(fut.as_mut().poll(cx)),
            Phase::Acquired(result) => result
                .take()
                .unwrap_or_else(|| Err(StoreError::new("acquire polled twice"))),
            _ => return Poll::Ready(Ok(Vec::new())),
        };
        self.phase = Phase::Done;
        Poll::Ready(result.map(|(decisions, decider)| {
            self.arm(&decisions, decider);
            decisions
        }))
    }

    fn arm(&mut self, decisions: &[Decision], decider: Decider) {
        self.decider = decider;
        if decider == Decider::Open {
            // Nothing was taken anywhere: the usage is all there is to write.
            self.reserved = 0;
            self.slot = None;
        }
        if decisions.iter().all(|d| d.allowed) {
            self.phase = Phase::Armed;
        }
    }

    /// The token delta against the reservation for this outcome: `Some(usage)` for a
    /// delivered response with usage, `None` for one without; `delivered = false` for an
    /// inner error.
    fn delta(&self, usage: Option<&Usage>, delivered: bool) -> i64 {
        let reserved = self.reserved as i64;
        if !delivered || self.token_key.is_none() {
            return -reserved;
        }
        match usage {
            Some(u) => self.limits.tokens_for(u) as i64 - reserved,
            None => {
                tracing::warn!(
                    reserved = self.reserved,
                    policy = ?self.limits.missing_usage,
                    "LLM response reported no usage; charging per the missing-usage policy"
                );
                match self.limits.missing_usage {
                    MissingUsage::ChargeReservation => 0,
                    MissingUsage::ChargeNothing => -reserved,
                    MissingUsage::ChargeFixed(n) => {
                        n.min(crate::algorithm::MAX_UNITS) as i64 - reserved
                    }
                }
            }
        }
    }

    /// The writes for a token `delta` against the reservation: `(to the store, to the
    /// in-process fallback store)`.
    fn writes(&self, delta: i64) -> (Vec<Adjustment>, Vec<Adjustment>) {
        let token = |delta: i64| {
            let (Some(key), Some(tokens)) = (&self.token_key, &self.limits.tokens) else {
                return None;
            };
            (delta != 0).then(|| Adjustment {
                key: key.clone(),
                algorithm: tokens.algorithm,
                delta,
                slot: 0,
            })
        };
        let release = self.slot.as_ref().map(|(key, algorithm, slot)| Adjustment {
            key: key.clone(),
            algorithm: *algorithm,
            delta: -1,
            slot: *slot,
        });
        match self.decider {
            Decider::Store | Decider::Open => (
                token(delta).into_iter().chain(release).collect(),
                Vec::new(),
            ),
            // The local store holds the reservation and slot; the shared store gets the
            // usage itself, so the shared budget stays whole across the outage.
            Decider::Local => {
                let local = token(delta).into_iter().chain(release).collect();
                let used = delta + self.reserved as i64;
                (token(used.max(0)).into_iter().collect(), local)
            }
        }
    }

    /// The future that writes `delta`: local writes at once, the store's with a timeout,
    /// queued for retry if the store fails. `None` when there is nothing to write.
    fn write_future(&self, delta: i64) -> Option<BoxFuture<()>> {
        let (remote, local) = self.writes(delta);
        if !local.is_empty() {
            self.limits.local.adjust_now(&local);
        }
        if remote.is_empty() {
            return None;
        }
        if self.limits.store_is_local && self.limits.store.adjust_sync(&remote).is_some() {
            return None;
        }
        let limits = self.limits.clone();
        let id = self.id;
        Some(Box::pin(async move {
            if limits.store_is_local {
                if let Err(error) = limits.store.adjust(remote, Some(id)).await {
                    tracing::error!(%error, "could not write a settlement");
                }
                return;
            }
            if !limits.breaker.is_open() {
                match with_timeout(
                    limits.store_timeout,
                    limits.store.adjust(remote.clone(), Some(id)),
                )
                .await
                {
                    Ok(_) => return,
                    Err(error) => {
                        limits.breaker.trip();
                        tracing::warn!(%error, "settlement not written; queued for retry");
                    }
                }
            }
            limits
                .queue
                .push(limits.store.clone(), limits.store_timeout, remote, id);
        }))
    }

    /// Start the settling write for this outcome (nothing is sent when there is nothing
    /// to write).
    pub(crate) fn start(&mut self, usage: Option<&Usage>, delivered: bool) {
        if !matches!(self.phase, Phase::Armed) {
            return;
        }
        let delta = self.delta(usage, delivered);
        self.phase = match self.write_future(delta) {
            Some(fut) => Phase::Writing(fut),
            None => Phase::Done,
        };
    }

    /// Drive the settling write to completion. It never fails: a write the store does not
    /// take is queued and retried.
    pub(crate) fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Phase::Writing(fut) = &mut self.phase else {
            return Poll::Ready(());
        };
        std::task::ready!(fut.as_mut().poll(cx));
        self.phase = Phase::Done;
        Poll::Ready(())
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Done => {}
            Phase::Armed => {
                // Cancelled while the call ran: give the reservation and the slot back.
                if let Some(fut) = self.write_future(-(self.reserved as i64)) {
                    finish_in_background(fut);
                }
            }
            Phase::Writing(write) => finish_in_background(write),
            Phase::Acquired(Some(Ok((decisions, decider)))) => {
                // Taken but never used: give it back now.
                self.arm(&decisions, decider);
                if matches!(self.phase, Phase::Armed)
                    && let Some(fut) = self.write_future(-(self.reserved as i64))
                {
                    finish_in_background(fut);
                }
            }
            Phase::Acquired(_) => {}
            Phase::Acquiring(acquire) => {
                // The acquire may still land: wait for it, then undo it.
                let mut undo = Settlement {
                    limits: self.limits.clone(),
                    token_key: self.token_key.take(),
                    slot: self.slot.take(),
                    reserved: self.reserved,
                    id: self.id,
                    decider: Decider::Store,
                    phase: Phase::Done,
                };
                finish_in_background(async move {
                    if let Ok((decisions, decider)) = acquire.await {
                        undo.arm(&decisions, decider);
                        // Dropping an armed settlement refunds and releases.
                    }
                    drop(undo);
                });
            }
        }
    }
}

/// Run `fut` to completion without anyone awaiting it: poll it once right here (store
/// futures that are already done, like the memory store's, finish at once), otherwise
/// spawn it on the current Tokio runtime.
pub(crate) fn finish_in_background(fut: impl Future<Output = ()> + Send + 'static) {
    let mut fut: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(fut);
    let mut cx = Context::from_waker(Waker::noop());
    if fut.as_mut().poll(&mut cx).is_ready() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(fut);
        }
        Err(_) => tracing::error!(
            "a cancelled call's settlement could not finish: no Tokio runtime to run it on"
        ),
    }
}
