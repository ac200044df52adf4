//! Settlement of one call: exactly once on every path, including cancellation and store
//! outages.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use super::limit::LimitKind;
use super::reliability::{Decider, OnLanded, fallback_decisions, next_id, with_timeout};

use super::{Engine, MissingUsage, Plan, Taken, metrics};
use crate::error::StoreError;
use crate::llm::Usage;
use crate::store::{Adjustment, Decision, LimitCheck, undo_adjustments};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type AcquireFuture = BoxFuture<Result<(Vec<Decision>, Decider), StoreError>>;

/// Where a call's settlement stands. Whatever phase it is in when dropped, [`Drop`]
/// finishes it in the background, so dropping a call never leaks a reservation or slot.
enum Phase {
    /// The pre-dispatch acquire is in flight. Dropped here, the store undoes it (see
    /// [`Store::acquire`](crate::Store::acquire)).
    Acquiring(AcquireFuture),
    /// Answered at once (an in-process store, or the failure policy while the breaker
    /// is open): no future needed.
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
    /// A complete response was delivered without usage; this is what it is estimated
    /// at (the prompt estimate and the output seen), for the missing-usage policy.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    Unreported(Usage),
    /// The call failed without producing output (an inner error, an error status
    /// without usage): the reservation is refunded.
    Failed,
    /// The call ended before its usage arrived (the client left mid-stream, the
    /// upstream cut the stream, a body error): charged this estimate.
    Incomplete(Usage),
}

/// A call's debt to the store: the requests, token reservations and concurrency slots
/// taken before dispatch, settled against the reported usage after it.
pub(crate) struct Settlement {
    engine: Arc<Engine>,
    /// What the call took: shared with the call itself (no copy per call).
    plan: Arc<Plan>,
    /// Prompt tokens charged if the call is dropped before it ends.
    prompt_estimate: u64,
    /// The acquire's decisions, once it answered (each limit's window is settled in the
    /// window its units were taken in).
    decisions: Vec<Decision>,
    /// Decided by `FailOpen`: nothing was taken anywhere (no reservation, no slot).
    open: bool,
    /// Dedupes retried writes of this settlement in the store.
    id: u64,
    /// The denial cache's epoch for the identifier when the acquire began.
    denial_epoch: u64,
    decider: Decider,
    phase: Phase,
    /// Renews the slots' leases while the call runs.
    renewal: Option<tokio::task::AbortHandle>,
}

/// The acquire of `plan`'s checks: the store's answer if it has one at once, else its
/// pending answer with a timeout, and per the failure policy if the store fails (or is
/// skipped while the breaker is open).
///
/// A timed-out store acquire is dropped; the store undoes it if it lands late, so a call
/// decided by the fallback is not also counted by it.
fn acquire(engine: &Arc<Engine>, plan: &Arc<Plan>) -> Phase {
    if engine.breaker.is_open() {
        // Recently failed: the policy decides without waiting for another timeout.
        let error = StoreError::new("store unavailable (recent failures; retrying shortly)");
        return Phase::Acquired(Some(decide_without_store(engine, &plan.checks, error)));
    }
    let pending = match engine.store.acquire(&plan.checks).into_ready() {
        Ok(Ok(decisions)) => return Phase::Acquired(Some(Ok((decisions, Decider::Store)))),
        Ok(Err(error)) => {
            return Phase::Acquired(Some(store_failed(engine, &plan.checks, error)));
        }
        Err(pending) => pending,
    };
    let (engine, plan) = (engine.clone(), plan.clone());
    Phase::Acquiring(Box::pin(async move {
        let started = std::time::Instant::now();
        let result = with_timeout(engine.store_timeout, pending).await;
        metrics::store_latency(started.elapsed());
        match result {
            Ok(decisions) => {
                engine.breaker.reset();
                Ok((decisions, Decider::Store))
            }
            Err(error) => store_failed(&engine, &plan.checks, error),
        }
    }))
}

/// The store failed an acquire: open the breaker and decide per the failure policy.
fn store_failed(
    engine: &Engine,
    checks: &[LimitCheck],
    error: StoreError,
) -> Result<(Vec<Decision>, Decider), StoreError> {
    engine.breaker.trip();
    metrics::store_error();
    tracing::error!(%error, policy = ?engine.on_store_error, "rate-limit store failed");
    decide_without_store(engine, checks, error)
}

/// Decide an acquire the store did not answer, per the failure policy (`error` if it
/// fails closed).
fn decide_without_store(
    engine: &Engine,
    checks: &[LimitCheck],
    error: StoreError,
) -> Result<(Vec<Decision>, Decider), StoreError> {
    let (decisions, decider) =
        fallback_decisions(engine.on_store_error, &engine.local, checks).ok_or(error)?;
    metrics::fallback(engine.on_store_error);
    tracing::warn!(?decider, "rate limit decided without the store");
    Ok((decisions, decider))
}

impl Settlement {
    pub(crate) fn new(engine: Arc<Engine>, plan: Arc<Plan>) -> Self {
        // Before the acquire begins: a denial it answers is cached only if no budget came
        // back to the identifier meanwhile.
        let denial_epoch = engine.denial_epoch(&plan);
        let phase = acquire(&engine, &plan);
        Self {
            prompt_estimate: plan
                .estimate
                .map_or(engine.default_estimate, |e| e.prompt_tokens),
            decisions: Vec::new(),
            open: false,
            plan,
            id: next_id(),
            decider: Decider::Store,
            denial_epoch,
            phase,
            renewal: None,
            engine,
        }
    }

    /// The denial cache's epoch for the identifier when the acquire began (see
    /// [`Engine::remember_denial`]).
    pub(crate) fn denial_epoch(&self) -> u64 {
        self.denial_epoch
    }

    /// How the acquire was decided (known once it finished).
    pub(crate) fn decider(&self) -> Decider {
        self.decider
    }

    /// Drive the acquire: `Ready(Ok(allowed))` once it answered, with its decisions kept
    /// here ([`Settlement::decisions`]). It arms the settlement if all were allowed (a
    /// denial took nothing, so there is nothing left to settle).
    pub(crate) fn poll_acquire(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, StoreError>> {
        let result = match &mut self.phase {
            Phase::Acquiring(fut) => std::task::ready!(fut.as_mut().poll(cx)),
            Phase::Acquired(result) => result
                .take()
                .unwrap_or_else(|| Err(StoreError::new("acquire polled twice"))),
            _ => return Poll::Ready(Ok(self.decisions.iter().all(|d| d.allowed))),
        };
        self.phase = Phase::Done;
        Poll::Ready(result.map(|(decisions, decider)| self.arm(decisions, decider)))
    }

    /// The acquire's decisions (empty until it answered).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn decisions(&self) -> &[Decision] {
        &self.decisions
    }

    /// The decisions of an acquire that was denied (nothing to settle, nothing kept).
    pub(crate) fn take_decisions(&mut self) -> Vec<Decision> {
        std::mem::take(&mut self.decisions)
    }

    fn arm(&mut self, decisions: Vec<Decision>, decider: Decider) -> bool {
        self.decider = decider;
        // FailOpen: nothing was taken anywhere; the usage is all there is to write.
        self.open = decider == Decider::Open;
        let allowed = decisions.iter().all(|d| d.allowed);
        metrics::decisions(&self.engine, &self.plan.taken, &decisions, allowed);
        self.decisions = decisions;
        if allowed {
            self.phase = Phase::Armed;
            self.start_renewal();
        }
        allowed
    }

    /// Calls can outlive their slot's lease (streams of many minutes): while the call
    /// runs, renew the leases every half lease.
    fn start_renewal(&mut self) {
        if self.open {
            return;
        }
        let renewals: Vec<Adjustment> = self
            .plan
            .taken
            .iter()
            .zip(&self.plan.checks)
            .filter(|(t, _)| t.rule.is_concurrency())
            .map(|(t, c)| Adjustment {
                key: c.key.clone(),
                rule: t.rule,
                delta: 1,
                slot: t.slot,
                window: None,
            })
            .collect();
        let Some(every) = renewals
            .iter()
            .map(|a| a.rule.period() / 2)
            .min()
            .map(|d| d.max(std::time::Duration::from_millis(1)))
        else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = self.engine.clone();
        let local = self.decider == Decider::Local;
        let task = handle.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if local {
                    engine.local.adjust_now(&renewals);
                    continue;
                }
                let write = engine.store.adjust(&renewals, None);
                if let Err(error) = with_timeout(engine.store_timeout, write).await {
                    tracing::warn!(%error, "could not renew a concurrency slot's lease");
                }
            }
        });
        self.renewal = Some(task.abort_handle());
    }

    /// Units token limit `t` (with `reserved` taken) charges for this ending.
    fn charge(&self, t: &Taken, reserved: u64, ending: Ending<'_>) -> u64 {
        let model = self.plan.model.as_deref();
        match ending {
            Ending::Failed => 0,
            Ending::Delivered(Some(u)) => self.engine.cost(t.limit, u, model),
            Ending::Incomplete(estimate) => self.engine.cost(t.limit, &estimate, model),
            // Without usage, the reservation or the estimate (whichever is larger): never
            // less than what the call is known to have cost.
            Ending::Delivered(None) | Ending::Unreported(_) => match self.engine.missing_usage {
                MissingUsage::ChargeReservation => {
                    let estimate = match ending {
                        Ending::Unreported(estimate) => estimate,
                        _ => Usage::new(self.prompt_estimate, 0),
                    };
                    reserved.max(self.engine.cost(t.limit, &estimate, model))
                }
                MissingUsage::ChargeNothing => 0,
                MissingUsage::ChargeFixed(n) => n.min(crate::algorithm::MAX_UNITS),
            },
        }
    }

    /// The writes for this ending: `(to the store, to the in-process fallback store)`.
    fn writes(&self, ending: Ending<'_>) -> (Vec<Adjustment>, Vec<Adjustment>) {
        let (mut remote, mut local) = (Vec::new(), Vec::new());
        let adjustment = |i: usize, t: &Taken, delta: i64, window: Option<i64>| Adjustment {
            key: self.plan.checks[i].key.clone(),
            rule: t.rule,
            delta,
            slot: t.slot,
            window,
        };
        for (i, t) in self.plan.taken.iter().enumerate() {
            let kind = self.engine.limits[t.limit].kind;
            if self.open && kind == LimitKind::Concurrency {
                continue;
            }
            let reserved = if self.open { 0 } else { t.reserved };
            let window = self.decisions.get(i).and_then(|d| d.window);
            let charge = match kind {
                LimitKind::Tokens => self.charge(t, reserved, ending) as i64,
                _ => 0,
            };
            let delta = charge - reserved as i64;
            if kind == LimitKind::Tokens {
                metrics::tokens_charged(&self.engine.limits[t.limit].metrics, charge as u64);
            }
            match (self.decider, kind) {
                (Decider::Store, LimitKind::Tokens) if delta != 0 => {
                    remote.push(adjustment(i, t, delta, window))
                }
                (Decider::Store, LimitKind::Concurrency) => remote.push(adjustment(i, t, -1, None)),
                // Nothing was taken from the store: it gets the request and the usage
                // once it answers again, so the shared budget stays whole.
                (Decider::Open, LimitKind::Requests) => remote.push(adjustment(i, t, 1, None)),
                (Decider::Open, LimitKind::Tokens) if charge != 0 => {
                    remote.push(adjustment(i, t, charge, None))
                }
                // The local store holds the reservation and slot; the shared store gets
                // the request and the usage itself.
                (Decider::Local, LimitKind::Requests) => remote.push(adjustment(i, t, 1, None)),
                (Decider::Local, LimitKind::Tokens) => {
                    if delta != 0 {
                        local.push(adjustment(i, t, delta, window));
                    }
                    if charge != 0 {
                        remote.push(adjustment(i, t, charge, None));
                    }
                }
                (Decider::Local, LimitKind::Concurrency) => local.push(adjustment(i, t, -1, None)),
                _ => {}
            }
        }
        (remote, local)
    }

    /// The future that writes this ending: local writes at once, the store's with a
    /// timeout, queued for retry if the store fails. `None` when there is nothing to
    /// write.
    fn write_future(&mut self, ending: Ending<'_>) -> Option<BoxFuture<()>> {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        let (remote, local) = self.writes(ending);
        let engine = &self.engine;
        if !local.is_empty() {
            engine.local.adjust_now(&local);
            landed(engine, &self.plan.tag, &local);
        }
        if remote.is_empty() {
            return None;
        }
        write_to_store(engine, &self.plan, remote, self.id)
    }

    /// Start the settling write for how the call ended (nothing is sent when there is
    /// nothing to write).
    pub(crate) fn start(&mut self, ending: Ending<'_>) {
        if !matches!(self.phase, Phase::Armed) {
            return;
        }
        match ending {
            Ending::Delivered(None) | Ending::Unreported(_) => tracing::warn!(
                policy = ?self.engine.missing_usage,
                "LLM response reported no usage; charging per the missing-usage policy"
            ),
            Ending::Incomplete(estimate) => tracing::warn!(
                prompt = estimate.prompt_tokens,
                output = estimate.completion_tokens,
                "call ended before its usage arrived; charging its estimate"
            ),
            _ => {}
        }
        self.phase = match self.write_future(ending) {
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

/// `written` landed in the store for identifier `tag`: a denial cached for it may no
/// longer hold (budget came back) or reports limits as they were (budget was taken), and
/// calls waiting for budget it gave back may go.
fn landed(engine: &Engine, tag: &str, written: &[Adjustment]) {
    if written.iter().any(|a| a.delta != 0) {
        engine.forget_denials(tag);
    }
    if engine.wait_up_to.is_some() {
        let keys = written.iter().filter(|a| a.delta < 0).map(|a| &*a.key);
        engine.waiters.returned(keys);
    }
}

/// Write `remote` (a settlement, or the undo of an acquire nobody took) to the store with
/// the settlement's id: at once if the store answers at once, else through the returned
/// future, with a timeout. A write the store fails, or one made while the breaker is
/// open, is queued and retried until it lands; a landed write does what [`landed`] says.
fn write_to_store(
    engine: &Arc<Engine>,
    plan: &Arc<Plan>,
    remote: Vec<Adjustment>,
    id: u64,
) -> Option<BoxFuture<()>> {
    let pending = match engine.breaker.is_open() {
        true => None,
        false => match engine.store.adjust(&remote, Some(id)).into_ready() {
            Ok(Ok(_)) => {
                landed(engine, &plan.tag, &remote);
                return None;
            }
            Ok(Err(error)) => {
                engine.forget_denials(&plan.tag);
                settlement_failed(engine, plan, &error, remote, id);
                return None;
            }
            Err(pending) => Some(pending),
        },
    };
    // Not landed yet: the denials cached now report the budget as it is until it lands,
    // and are dropped again then (a denial decided before it landed may be answered, and
    // cached, after this).
    if remote.iter().any(|a| a.delta != 0) {
        engine.forget_denials(&plan.tag);
    }
    let Some(pending) = pending else {
        queue_settlement(engine, plan, remote, id);
        return None;
    };
    let (engine, plan) = (engine.clone(), plan.clone());
    Some(Box::pin(async move {
        match with_timeout(engine.store_timeout, pending).await {
            Ok(_) => landed(&engine, &plan.tag, &remote),
            Err(error) => settlement_failed(&engine, &plan, &error, remote, id),
        }
    }))
}

/// A settling write the store failed: open the breaker and queue it for retry.
fn settlement_failed(
    engine: &Arc<Engine>,
    plan: &Arc<Plan>,
    error: &StoreError,
    remote: Vec<Adjustment>,
    id: u64,
) {
    engine.breaker.trip();
    metrics::store_error();
    tracing::warn!(%error, "settlement not written; queued for retry");
    queue_settlement(engine, plan, remote, id);
}

/// Queue a settling write the store did not take, to retry until it lands (and then do
/// what a landed write does: see [`landed`]).
fn queue_settlement(engine: &Arc<Engine>, plan: &Arc<Plan>, remote: Vec<Adjustment>, id: u64) {
    // Weak: the queue belongs to the engine.
    let (weak, plan) = (Arc::downgrade(engine), plan.clone());
    let on_landed: OnLanded = Arc::new(move |written| {
        if let Some(engine) = weak.upgrade() {
            landed(&engine, &plan.tag, written);
        }
    });
    engine.queue.push(
        engine.store.clone(),
        engine.store_timeout,
        remote,
        id,
        on_landed,
    );
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
            Phase::Acquired(Some(Ok((decisions, decider)))) => {
                // An answer nobody took: undo all of it where it was taken, as a store
                // undoes an acquire whose caller left.
                let undo = undo_adjustments(&self.plan.checks, &decisions);
                if undo.is_empty() {
                    return;
                }
                match decider {
                    // With the settlement's id, as a settlement: an undo the store
                    // fails is queued and retried, and lands once.
                    Decider::Store => {
                        let write = write_to_store(&self.engine, &self.plan, undo, self.id);
                        if let Some(write) = write {
                            finish_in_background(write);
                        }
                    }
                    Decider::Local => {
                        self.engine.local.adjust_now(&undo);
                        landed(&self.engine, &self.plan.tag, &undo);
                    }
                    // Nothing was taken.
                    Decider::Open => {}
                }
            }
            Phase::Armed => {
                // Cancelled while the call ran (a timeout, a client gone before the
                // response): the model may have read the prompt, so its estimate is
                // charged (the rest of a reservation is refunded); slots are released.
                let estimate = Usage::new(self.prompt_estimate, 0);
                if let Some(fut) = self.write_future(Ending::Incomplete(estimate)) {
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
