//! Settlement of one call: exactly once on every path, including cancellation and store
//! outages.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use super::reliability::{Decider, fallback_decisions, next_id, with_timeout};
use super::{Limits, MissingUsage, Plan, Taken};
use crate::algorithm::Algorithm;
use crate::error::StoreError;
use crate::llm::Usage;
use crate::store::{Adjustment, Decision, LimitCheck};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type AcquireFuture = BoxFuture<Result<(Vec<Decision>, Decider), StoreError>>;

/// Where a call's settlement stands. Whatever phase it is in when dropped, [`Drop`]
/// finishes it in the background, so dropping a call never leaks a reservation or slot.
enum Phase {
    /// The pre-dispatch acquire is in flight. Dropped here, the store undoes it (see
    /// [`Store::acquire`](crate::Store::acquire)).
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

/// How a call ended, for its settlement.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ending<'a> {
    /// A response was delivered, with the usage it reported (if any).
    Delivered(Option<&'a Usage>),
    /// The call failed without producing output (an inner error, an error status
    /// without usage): the reservation is refunded.
    Failed,
    /// The call ended before its usage arrived (the client left mid-stream, the
    /// upstream cut the stream, a body error): charged this estimate.
    Incomplete(Usage),
}

/// A call's debt to the store: the request, the token reservation and the concurrency
/// slot taken before dispatch, settled against the reported usage after it.
pub(crate) struct Settlement {
    limits: Arc<Limits>,
    tag: String,
    request: Option<Taken>,
    tokens: Option<Taken>,
    slot: Option<Taken>,
    /// Tokens taken before dispatch (`Reserve` mode), 0 otherwise.
    reserved: u64,
    /// Dedupes retried writes of this settlement in the store.
    id: u64,
    decider: Decider,
    phase: Phase,
    /// Renews the slot's lease while the call runs.
    renewal: Option<tokio::task::AbortHandle>,
}

/// The acquire for `checks`: on the store (with a timeout), else per the failure policy.
///
/// A timed-out store acquire is dropped; the store undoes it if it lands late, so a call
/// decided by the fallback is not also counted by it.
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
            tag: plan.tag,
            request: plan.request,
            tokens: plan.tokens,
            slot: plan.slot,
            reserved: plan.reserved,
            id: next_id(),
            decider: Decider::Store,
            phase,
            renewal: None,
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
        for taken in [&mut self.request, &mut self.tokens, &mut self.slot]
            .into_iter()
            .flatten()
        {
            taken.window = decisions.get(taken.index).and_then(|d| d.window);
        }
        if decisions.iter().all(|d| d.allowed) {
            self.phase = Phase::Armed;
            self.start_renewal();
        }
    }

    /// Calls can outlive their slot's lease (streams of many minutes): while the call
    /// runs, renew the lease every half lease.
    fn start_renewal(&mut self) {
        let Some(slot) = &self.slot else { return };
        let Algorithm::Concurrency(limit) = slot.algorithm else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let every = (limit.lease() / 2).max(std::time::Duration::from_millis(1));
        let renew = Adjustment {
            key: slot.key.clone(),
            algorithm: slot.algorithm,
            delta: 1,
            slot: slot.slot,
            window: None,
        };
        let limits = self.limits.clone();
        let local = self.decider == Decider::Local;
        let task = handle.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if local {
                    limits.local.adjust_now(std::slice::from_ref(&renew));
                    continue;
                }
                let write = limits.store.adjust(vec![renew.clone()], None);
                if let Err(error) = with_timeout(limits.store_timeout, write).await {
                    tracing::warn!(%error, "could not renew a concurrency slot's lease");
                }
            }
        });
        self.renewal = Some(task.abort_handle());
    }

    /// The token delta against the reservation for this ending.
    fn delta(&self, ending: Ending<'_>) -> i64 {
        let reserved = self.reserved as i64;
        if self.tokens.is_none() {
            return 0;
        }
        match ending {
            Ending::Failed => -reserved,
            Ending::Delivered(Some(u)) => self.limits.tokens_for(u) as i64 - reserved,
            Ending::Incomplete(estimate) => {
                let tokens = self.limits.tokens_for(&estimate);
                tracing::warn!(
                    tokens,
                    reserved = self.reserved,
                    "call ended before its usage arrived; charging its estimate"
                );
                tokens as i64 - reserved
            }
            Ending::Delivered(None) => {
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
        let adjust = |taken: &Option<Taken>, delta: i64| {
            let taken = taken.as_ref()?;
            (delta != 0).then(|| Adjustment {
                key: taken.key.clone(),
                algorithm: taken.algorithm,
                delta,
                slot: taken.slot,
                window: taken.window,
            })
        };
        let release = adjust(&self.slot, -1);
        match self.decider {
            Decider::Store => (
                adjust(&self.tokens, delta)
                    .into_iter()
                    .chain(release)
                    .collect(),
                Vec::new(),
            ),
            // Nothing was taken from the store: it gets the request and the usage once
            // it answers again, so the shared budget stays whole across the outage.
            Decider::Open => (
                adjust(&self.request, 1)
                    .into_iter()
                    .chain(adjust(&self.tokens, delta))
                    .collect(),
                Vec::new(),
            ),
            // The local store holds the reservation and slot; the shared store gets the
            // request and the usage itself.
            Decider::Local => {
                let local = adjust(&self.tokens, delta)
                    .into_iter()
                    .chain(release)
                    .collect();
                let used = (delta + self.reserved as i64).max(0);
                let remote = adjust(&self.request, 1)
                    .into_iter()
                    .chain(adjust(&self.tokens, used).map(|mut a| {
                        a.window = None;
                        a
                    }))
                    .collect();
                (remote, local)
            }
        }
    }

    /// The future that writes `delta`: local writes at once, the store's with a timeout,
    /// queued for retry if the store fails. `None` when there is nothing to write.
    fn write_future(&mut self, delta: i64) -> Option<BoxFuture<()>> {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        if delta < 0 {
            // Budget comes back: a denial cached here may no longer hold.
            self.limits.forget_denials(&self.tag);
        }
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

    /// Start the settling write for how the call ended (nothing is sent when there is
    /// nothing to write).
    pub(crate) fn start(&mut self, ending: Ending<'_>) {
        if !matches!(self.phase, Phase::Armed) {
            return;
        }
        let delta = self.delta(ending);
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
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Done | Phase::Acquired(None | Some(Err(_))) | Phase::Acquiring(_) => {
                // Nothing taken, or an acquire in flight: dropping it makes the store
                // skip it or undo it once it lands.
            }
            Phase::Acquired(Some(Ok((decisions, Decider::Store)))) => {
                // An in-process answer nobody took: undo all of it, as a store undoes an
                // acquire whose caller left.
                let undo: Vec<Adjustment> = [&self.request, &self.tokens, &self.slot]
                    .into_iter()
                    .flatten()
                    .filter(|_| decisions.iter().all(|d| d.allowed))
                    .map(|t| Adjustment {
                        key: t.key.clone(),
                        algorithm: t.algorithm,
                        delta: if t.index == self.tokens.as_ref().map_or(usize::MAX, |t| t.index) {
                            -(self.reserved as i64)
                        } else {
                            -1
                        },
                        slot: t.slot,
                        window: decisions.get(t.index).and_then(|d| d.window),
                    })
                    .filter(|a| a.delta != 0)
                    .collect();
                if !undo.is_empty() {
                    self.limits.store.adjust_sync(&undo);
                }
            }
            Phase::Acquired(Some(Ok(_))) => {}
            Phase::Armed => {
                // Cancelled while the call ran: give the reservation and the slot back.
                if let Some(fut) = self.write_future(-(self.reserved as i64)) {
                    finish_in_background(fut);
                }
            }
            Phase::Writing(write) => finish_in_background(write),
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
