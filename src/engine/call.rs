//! One call's way through the limits: resolve the identifier's quotas, acquire (in wait
//! mode: queue and sleep until the budget is back, then acquire again), call the inner
//! service. Shared by the Tower layer's and the HTTP adapter's response futures, which
//! add what is theirs (reading usage, building responses) around it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use smallvec::SmallVec;
use tokio::sync::OwnedMutexGuard;
use tokio::time::{Instant, Sleep};

use tower_service::Service;

use super::denied::counted_down;
use super::quota::{QuotaFuture, Resolution};
use super::reliability::Decider;
use super::settlement::Settlement;
use super::{Engine, Plan, metrics};
use crate::error::Error;
use crate::llm::Usage;
use crate::store::{Decision, StateKey, Tag};

type Turn = Pin<Box<dyn Future<Output = OwnedMutexGuard<()>> + Send>>;
/// A waiting call's sleep: until its denial lifts, or units come back to its budget.
type Wake = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a call needs to plan its acquire.
pub(crate) struct CallRequest<'a> {
    /// The identifier (the request's, or the fallback).
    pub identifier: &'a [u8],
    pub model: Option<&'a str>,
    /// The estimate, for token limits that reserve.
    pub estimate: Option<Usage>,
}

/// What a call takes from its request before the request moves into the call: the
/// identifier's hash tag and quota lookup (so the identifier need not be copied).
pub(crate) struct Prepared {
    tag: Result<Tag, Error>,
    model: Option<String>,
    estimate: Option<Usage>,
    quotas: Option<Resolution>,
}

impl Prepared {
    pub(crate) fn new(engine: &Engine, call: CallRequest<'_>) -> Self {
        let tag = Tag::of(call.identifier);
        let quotas = match &tag {
            Ok(_) => engine.resolve(call.identifier),
            Err(_) => None,
        };
        Self {
            tag,
            model: call.model.map(str::to_owned),
            estimate: call.estimate,
            quotas,
        }
    }
}

/// Where a call ended up.
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) enum Outcome<S: Service<R>, R> {
    /// Refused before the inner service was called: a denial, or the store failed. The
    /// decisions are empty when the refusal did not come from the store.
    Refused {
        error: Error,
        decisions: Vec<Decision>,
        plan: Option<Arc<Plan>>,
        decider: Decider,
    },
    /// The inner service answered; the settlement is armed (or already done) and
    /// holds the acquire's decisions.
    Called {
        result: Result<S::Response, S::Error>,
        settlement: Settlement,
        plan: Arc<Plan>,
    },
}

/// Everything that waits with the call until it is dispatched. Kept small: the call's
/// state moves each time it changes.
struct Pending<S, R> {
    engine: Arc<Engine>,
    service: S,
    request: R,
    /// Wait mode only (boxed: calls that do not wait do not carry it).
    wait: Option<Box<Waiting>>,
}

/// A call in wait mode.
struct Waiting {
    /// The latest instant the call may still be dispatched.
    deadline: Instant,
    /// The queue the call waits in (or holds the turn of): the state key of the limit it
    /// waits for, so that calls competing for one budget keep their arrival order and
    /// calls waiting for different budgets do not hold each other up.
    queue: Option<StateKey>,
    /// This call's turn in that queue, while it holds it.
    turn: Option<OwnedMutexGuard<()>>,
    /// The denial the call waits for.
    denied: Option<Denial>,
    /// Waiting is over for this call (its deadline passed while queued): the next
    /// denial fails it.
    no_more_waiting: bool,
    /// [`Waiters::returns_of`](super::Waiters::returns_of) of each of the call's budgets
    /// (in check order) when its latest acquire began.
    returns_seen: SmallVec<[u64; 4]>,
}

/// A denial a call waits for: the error and every limit's decision, when it was decided,
/// and when the call tries again (when it lifts, or the bound ends).
struct Denial {
    error: Error,
    decisions: Vec<Decision>,
    at: Instant,
    lifts: Instant,
}

impl Denial {
    /// The refusal it makes at `now`: its times counted down.
    fn refusal_at(mut self, now: Instant) -> (Error, Vec<Decision>) {
        let error = counted_down(self.error, &mut self.decisions, now - self.at);
        (error, self.decisions)
    }
}

/// What planning needs while the identifier's quotas are being looked up.
struct Unplanned {
    tag: Tag,
    model: Option<String>,
    estimate: Option<Usage>,
}

pin_project! {
    /// The states of a [`Call`]. Each state owns what it needs; polling it after it
    /// completed panics.
    #[project = CallProj]
    pub(crate) enum CallState<S, R>
    where
        S: Service<R>,
    {
        Resolving { quotas: QuotaFuture, unplanned: Option<Box<Unplanned>>, pending: Option<Pending<S, R>> },
        Queued { turn: Turn, deadline: Option<Pin<Box<Sleep>>>, plan: Option<Arc<Plan>>, pending: Option<Pending<S, R>> },
        Sleeping { wake: Wake, plan: Option<Arc<Plan>>, pending: Option<Pending<S, R>> },
        Acquiring { settlement: Option<Settlement>, plan: Option<Arc<Plan>>, pending: Option<Pending<S, R>> },
        Calling { #[pin] future: S::Future, settlement: Option<Settlement>, plan: Option<Arc<Plan>> },
        Refused { error: Option<Error>, decisions: Vec<Decision>, plan: Option<Arc<Plan>> },
        Done,
    }
}

pin_project! {
    /// The acquire → call state machine of one call, in its `tracing` span
    /// (`llm_ratelimit_call`, at debug level: the identifier, hashed; the model; the
    /// limits that apply; the decision, and the limit that denied).
    pub(crate) struct Call<S, R>
    where
        S: Service<R>,
    {
        #[pin]
        state: CallState<S, R>,
        // Present only while a subscriber listens at debug level: the span, and the
        // engine that names the call's limits.
        span: Option<(tracing::Span, Arc<Engine>)>,
    }
}

impl<S: Service<R>, R> Call<S, R> {
    /// Start a call: `service` has been driven to readiness. (The Tower layer prepares
    /// its calls itself, see [`Call::start`]; the HTTP adapter owns its identifier.)
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn new(engine: Arc<Engine>, service: S, request: R, call: CallRequest<'_>) -> Self {
        let prepared = Prepared::new(&engine, call);
        Self::start(engine, service, request, prepared)
    }

    /// Start a call prepared while its request was still borrowed.
    pub(crate) fn start(engine: Arc<Engine>, service: S, request: R, prepared: Prepared) -> Self {
        // Checked first: building a disabled span still costs (it is offered to the
        // `log` crate when tracing's `log` feature is on).
        let span = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            let identifier = prepared.tag.as_ref().ok().map(|t| Tag::logged(t.as_str()));
            let span = tracing::debug_span!(
                "llm_ratelimit_call",
                identifier = identifier.as_ref().map(tracing::field::display),
                model = prepared.model.as_deref(),
                limits = tracing::field::Empty,
                decision = tracing::field::Empty,
                denied_by = tracing::field::Empty,
            );
            (span, engine.clone())
        });
        let state = match &span {
            Some((span, _)) => {
                span.in_scope(|| CallState::start(engine, service, request, prepared))
            }
            None => CallState::start(engine, service, request, prepared),
        };
        Call { state, span }
    }
}

impl<S: Service<R>, R> Future for Call<S, R> {
    type Output = Outcome<S, R>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some((span, engine)) = this.span else {
            return this.state.poll(cx);
        };
        let _entered = span.enter();
        let outcome = ready!(this.state.poll(cx));
        let (plan, decision, denied_by) = match &outcome {
            Outcome::Called { plan, .. } => (Some(plan), "allowed", None),
            Outcome::Refused { error, plan, .. } => match error.limit_exceeded() {
                Some(e) => (plan.as_ref(), "denied", Some(e.name.clone())),
                None => (plan.as_ref(), "error", None),
            },
        };
        if let Some(plan) = plan {
            span.record("limits", tracing::field::display(LimitNames(engine, plan)));
        }
        span.record("decision", decision);
        if let Some(name) = denied_by {
            span.record("denied_by", &*name);
        }
        Poll::Ready(outcome)
    }
}

/// The names of the limits a plan applies, comma-separated (formatted only if a
/// subscriber records them).
struct LimitNames<'a>(&'a Engine, &'a Plan);

impl std::fmt::Display for LimitNames<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, t) in self.1.taken.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&self.0.limits[t.limit].name)?;
        }
        Ok(())
    }
}

impl<S: Service<R>, R> CallState<S, R> {
    /// Start a call prepared while its request was still borrowed.
    fn start(engine: Arc<Engine>, service: S, request: R, prepared: Prepared) -> Self {
        let Prepared {
            tag,
            model,
            estimate,
            quotas,
        } = prepared;
        let tag = match tag {
            Ok(tag) => tag,
            Err(error) => return Self::refused(error),
        };
        let wait = engine.wait_up_to.map(|d| {
            Box::new(Waiting {
                deadline: super::deadline_after(d),
                queue: None,
                turn: None,
                denied: None,
                no_more_waiting: false,
                returns_seen: SmallVec::new(),
            })
        });
        let pending = Pending {
            engine,
            service,
            request,
            wait,
        };
        let quotas = match quotas {
            None => None,
            Some(Resolution::Ready(q)) => q,
            Some(Resolution::Pending(quotas)) => {
                return CallState::Resolving {
                    quotas,
                    unplanned: Some(Box::new(Unplanned {
                        tag,
                        model,
                        estimate,
                    })),
                    pending: Some(pending),
                };
            }
        };
        let plan = pending
            .engine
            .plan(tag.as_str(), model.as_deref(), quotas.as_deref(), estimate);
        Self::planned(plan, pending)
    }

    fn refused(error: Error) -> Self {
        CallState::Refused {
            error: Some(error),
            decisions: Vec::new(),
            plan: None,
        }
    }

    /// The plan is known: refuse a suspended identifier, answer from the denial cache,
    /// queue behind waiting calls, or acquire.
    fn planned(plan: Arc<Plan>, mut pending: Pending<S, R>) -> Self {
        if let Some(w) = pending.wait.as_deref_mut()
            && plan.checks.iter().any(can_never_pass)
        {
            // No wait lets this call pass: it is decided as without wait mode (from the
            // denial cache or the store, failing at once), not queued behind the calls
            // waiting for its budgets.
            w.no_more_waiting = true;
        }
        let engine = &pending.engine;
        if let Some(error) = engine.suspension(&plan) {
            if let Some(e) = error.limit_exceeded() {
                metrics::denied_without_store(&e.name);
            }
            return CallState::Refused {
                error: Some(error),
                decisions: Vec::new(),
                plan: Some(plan),
            };
        }
        if let Some((error, decisions)) = engine.cached_denial(&plan) {
            // A call that can never pass is refused for that, not for the cached denial
            // (whose retry time would send its client back to fail again).
            let error = engine.never_passes(&plan, &decisions).unwrap_or(error);
            let queue = denying_queue(engine, &plan, &error);
            let Some((error, decisions)) = wait_for(&mut pending, error, decisions) else {
                return Self::queue(plan, pending, queue);
            };
            if let Some(e) = error.limit_exceeded() {
                metrics::denied_without_store(&e.name);
            }
            return CallState::Refused {
                error: Some(error),
                decisions,
                plan: Some(plan),
            };
        }
        if pending.wait.as_deref().is_some_and(|w| !w.no_more_waiting)
            && let Some(busy) = pending
                .engine
                .waiters
                .first_busy(plan.checks.iter().map(|c| &c.key))
        {
            // Calls are waiting for one of this call's budgets: take a turn behind them.
            let queue = busy.clone();
            return Self::queue(plan, pending, queue);
        }
        Self::acquire(plan, pending)
    }

    /// Wait for this call's turn in `queue` (if it does not hold it yet), then for its
    /// denial to lift, then acquire again.
    fn queue(plan: Arc<Plan>, mut pending: Pending<S, R>, queue: StateKey) -> Self {
        if let Some(w) = &pending.wait
            && w.turn.is_some()
        {
            if w.queue.as_deref() == Some(&*queue) {
                return Self::after_turn(plan, pending);
            }
            // Now waiting for another budget: give up this turn, queue for that one.
            release_turn(&mut pending);
        }
        if let Some(w) = &mut pending.wait {
            w.queue = Some(queue.clone());
        }
        let turn = Box::pin(pending.engine.waiters.queue(&queue).turn.lock_owned());
        let deadline = pending
            .wait
            .as_ref()
            .map(|w| Box::pin(tokio::time::sleep_until(w.deadline)));
        CallState::Queued {
            turn,
            deadline,
            plan: Some(plan),
            pending: Some(pending),
        }
    }

    /// This call holds its turn: sleep until its denial lifts (or units come back to its
    /// budget), else acquire now.
    fn after_turn(plan: Arc<Plan>, mut pending: Pending<S, R>) -> Self {
        let now = Instant::now();
        let denied = pending.wait.as_mut().and_then(|w| w.denied.take());
        match denied {
            // (A denial is waited for only up to the bound: `lifts` is within it.)
            Some(Denial { lifts, .. })
                if lifts > now && !returned_since_acquire(&pending, &plan) =>
            {
                // Woken early when units come back to the budget through this process:
                // a refund, a released slot (whose return no retry_after can tell) or a
                // reset.
                let returned = pending
                    .wait
                    .as_ref()
                    .and_then(|w| w.queue.as_deref())
                    .map(|key| pending.engine.waiters.queue(key).returned.notified_owned());
                let sleep = tokio::time::sleep_until(lifts);
                let wake: Wake = match returned {
                    Some(returned) => Box::pin(async move {
                        tokio::select! {
                            () = sleep => {}
                            () = returned => {}
                        }
                    }),
                    None => Box::pin(sleep),
                };
                CallState::Sleeping {
                    wake,
                    plan: Some(plan),
                    pending: Some(pending),
                }
            }
            _ => Self::acquire(plan, pending),
        }
    }

    fn acquire(plan: Arc<Plan>, mut pending: Pending<S, R>) -> Self {
        if let Some(w) = &mut pending.wait {
            // Before the acquire: a denial it answers is waited out only if no units came
            // back to the denying budget since (else the call tries again at once).
            w.returns_seen.clear();
            let waiters = &pending.engine.waiters;
            let seen = plan.checks.iter().map(|c| waiters.returns_of(&c.key));
            w.returns_seen.extend(seen);
        }
        // Even an in-process store's answer is taken up on the first poll, not here: a
        // future dropped before it is polled must take nothing, and the slots' lease
        // renewal needs the runtime that polls.
        let settlement = Settlement::new(pending.engine.clone(), plan.clone());
        CallState::Acquiring {
            settlement: Some(settlement),
            plan: Some(plan),
            pending: Some(pending),
        }
    }
}

/// Whether this check's cost exceeds its limit's quota, so that no wait could let it
/// pass.
pub(super) fn can_never_pass(check: &crate::store::LimitCheck) -> bool {
    !check.rule.is_concurrency() && check.cost > check.rule.limit()
}

/// The queue a denied call waits in: the state key of the limit that denied it (one
/// identifier's, or one identifier and model's), shared by every call that competes for
/// that budget whatever model it names.
fn denying_queue(engine: &Engine, plan: &Plan, error: &Error) -> StateKey {
    let denying = error.limit_exceeded().map(|e| &*e.name);
    plan.taken
        .iter()
        .zip(&plan.checks)
        .find(|(t, _)| Some(&*engine.limits[t.limit].name) == denying)
        .map_or_else(|| plan.tag.clone(), |(_, c)| c.key.clone())
}

/// Wait mode: record a denial the call can wait for within its bound (then `None`), or
/// hand it back to be refused.
fn wait_for<S, R>(
    pending: &mut Pending<S, R>,
    error: Error,
    decisions: Vec<Decision>,
) -> Option<(Error, Vec<Decision>)> {
    let Some(waiting) = pending.wait.as_deref_mut().filter(|w| !w.no_more_waiting) else {
        return Some((error, decisions));
    };
    let now = Instant::now();
    let left = waiting.deadline.saturating_duration_since(now);
    let wait = match &error {
        _ if left.is_zero() => None,
        // A slot frees when a call ends, which no retry_after can tell (it says when the
        // earliest lease runs out): wait, within the bound, for a slot released through
        // this process to wake the call, or for that lease's end.
        Error::ConcurrencyLimitReached(_) => {
            Some(error.retry_after().map_or(left, |r| r.min(left)))
        }
        _ => error.retry_after().filter(|wait| *wait <= left),
    };
    let Some(wait) = wait else {
        return Some((error, decisions));
    };
    waiting.denied = Some(Denial {
        error,
        decisions,
        at: now,
        lifts: now + wait,
    });
    None
}

/// Whether units came back to the budget the call waits for since its latest acquire
/// began: a slot released or a refund landed while the acquire was in flight, or while
/// the call waited for its turn (the wake-up then went to the call before it). Nothing
/// will signal those again, so the call tries again now instead of sleeping its denial
/// out. Checked once the call's queue exists: a return after this wakes it through the
/// queue.
fn returned_since_acquire<S, R>(pending: &Pending<S, R>, plan: &Plan) -> bool {
    let Some(w) = pending.wait.as_deref() else {
        return false;
    };
    let Some(queue) = w.queue.as_deref() else {
        return false;
    };
    plan.checks
        .iter()
        .zip(&w.returns_seen)
        .find(|(c, _)| *c.key == *queue)
        .is_some_and(|(_, seen)| pending.engine.waiters.returns_of(queue) != *seen)
}

fn taken<T>(slot: &mut Option<T>) -> T {
    slot.take().expect("call state polled after completion")
}

impl<S: Service<R>, R> Future for CallState<S, R> {
    type Output = Outcome<S, R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                CallProj::Resolving {
                    quotas,
                    unplanned,
                    pending,
                } => {
                    let quotas = ready!(quotas.as_mut().poll(cx));
                    let (pending, unplanned) = (taken(pending), taken(unplanned));
                    let plan = pending.engine.plan(
                        unplanned.tag.as_str(),
                        unplanned.model.as_deref(),
                        quotas.as_deref(),
                        unplanned.estimate,
                    );
                    self.set(Self::planned(plan, pending));
                }
                CallProj::Queued {
                    turn,
                    deadline,
                    plan,
                    pending,
                } => {
                    match turn.as_mut().poll(cx) {
                        Poll::Ready(guard) => {
                            let (plan, mut pending) = (taken(plan), taken(pending));
                            if let Some(w) = &mut pending.wait {
                                w.turn = Some(guard);
                            }
                            self.set(Self::after_turn(plan, pending));
                        }
                        Poll::Pending => {
                            let Some(deadline) = deadline else {
                                return Poll::Pending;
                            };
                            ready!(deadline.as_mut().poll(cx));
                            // The bound passed while queued: refused if the denial it
                            // waited for still holds, else one last try, no more waiting.
                            let (plan, mut pending) = (taken(plan), taken(pending));
                            if let Some(w) = &mut pending.wait {
                                w.no_more_waiting = true;
                                let now = Instant::now();
                                if let Some(denial) = w.denied.take()
                                    && denial.lifts > now
                                    && !returned_since_acquire(&pending, &plan)
                                {
                                    let (error, decisions) = denial.refusal_at(now);
                                    return Poll::Ready(refusal(error, decisions, Some(plan)));
                                }
                            }
                            self.set(Self::acquire(plan, pending));
                        }
                    }
                }
                CallProj::Sleeping {
                    wake,
                    plan,
                    pending,
                } => {
                    ready!(wake.as_mut().poll(cx));
                    let (plan, pending) = (taken(plan), taken(pending));
                    self.set(Self::acquire(plan, pending));
                }
                CallProj::Acquiring {
                    settlement,
                    plan,
                    pending,
                } => {
                    let acquired = ready!(
                        settlement
                            .as_mut()
                            .expect("call state polled after completion")
                            .poll_acquire(cx)
                    );
                    let (plan, mut pending) = (taken(plan), taken(pending));
                    let mut settlement = taken(settlement);
                    let decider = settlement.decider();
                    let allowed = match acquired {
                        Ok(allowed) => allowed,
                        Err(error) => {
                            release_turn(&mut pending);
                            return Poll::Ready(Outcome::Refused {
                                error: Error::Store(error),
                                decisions: Vec::new(),
                                plan: Some(plan),
                                decider,
                            });
                        }
                    };
                    if !allowed {
                        let decisions = settlement.take_decisions();
                        let engine = pending.engine.clone();
                        let error = engine.denial(&plan, &decisions);
                        engine.remember_denial(
                            &plan,
                            &error,
                            &decisions,
                            settlement.denial_epoch(),
                        );
                        let queue = denying_queue(&engine, &plan, &error);
                        let Some((error, decisions)) = wait_for(&mut pending, error, decisions)
                        else {
                            tracing::debug!(identifier = %Tag::logged(&plan.tag), "waiting for budget");
                            self.set(Self::queue(plan, pending, queue));
                            continue;
                        };
                        release_turn(&mut pending);
                        tracing::info!(identifier = %Tag::logged(&plan.tag), %error, "rate limit denied a call");
                        return Poll::Ready(Outcome::Refused {
                            error,
                            decisions,
                            plan: Some(plan),
                            decider,
                        });
                    }
                    release_turn(&mut pending);
                    if plan.checks.iter().any(|c| c.take && c.cost > 0) {
                        // Units taken: a denial cached for the identifier (another model's,
                        // sharing a limit with this call) no longer reports it as it is.
                        pending.engine.forget_denials(&plan.tag);
                    }
                    let mut service = pending.service;
                    let future = service.call(pending.request);
                    self.set(CallState::Calling {
                        future,
                        settlement: Some(settlement),
                        plan: Some(plan),
                    });
                }
                CallProj::Calling {
                    future,
                    settlement,
                    plan,
                } => {
                    let result = ready!(future.poll(cx));
                    let outcome = Outcome::Called {
                        result,
                        settlement: taken(settlement),
                        plan: taken(plan),
                    };
                    self.set(CallState::Done);
                    return Poll::Ready(outcome);
                }
                CallProj::Refused {
                    error,
                    decisions,
                    plan,
                } => {
                    let outcome = refusal(taken(error), std::mem::take(decisions), plan.take());
                    self.set(CallState::Done);
                    return Poll::Ready(outcome);
                }
                CallProj::Done => panic!("call state polled after completion"),
            }
        }
    }
}

fn refusal<S: Service<R>, R>(
    error: Error,
    decisions: Vec<Decision>,
    plan: Option<Arc<Plan>>,
) -> Outcome<S, R> {
    Outcome::Refused {
        error,
        decisions,
        plan,
        decider: Decider::Store,
    }
}

/// Give up this call's turn, letting the next call waiting in its queue go.
fn release_turn<S, R>(pending: &mut Pending<S, R>) {
    if let Some(w) = &mut pending.wait
        && w.turn.take().is_some()
        && let Some(queue) = &w.queue
    {
        pending.engine.waiters.release(queue);
    }
}
