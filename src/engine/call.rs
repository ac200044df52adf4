//! One call's way through the limits: resolve the identifier's quotas, acquire (in wait
//! mode: queue and sleep until the budget is back, then acquire again), call the inner
//! service. Shared by the Tower layer's and the HTTP adapter's response futures, which
//! add what is theirs (reading usage, building responses) around it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::OwnedMutexGuard;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::quota::{QuotaFuture, Resolution};
use super::reliability::Decider;
use super::settlement::Settlement;
use super::{Engine, Plan, metrics};
use crate::error::Error;
use crate::llm::Usage;
use crate::store::{Decision, identifier_tag};

type Turn = Pin<Box<dyn Future<Output = OwnedMutexGuard<()>> + Send>>;

/// What a call needs to plan its acquire.
pub(crate) struct CallRequest<'a> {
    /// The identifier (the request's, or the fallback).
    pub identifier: &'a [u8],
    pub model: Option<&'a str>,
    /// The estimate, for token limits that reserve.
    pub estimate: Option<Usage>,
}

/// Where a call ended up.
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) enum Outcome<S: Service<R>, R> {
    /// Refused before the inner service was called: a denial, or the store failed. The
    /// decisions are empty when the refusal did not come from the store.
    Refused {
        error: Error,
        decisions: Vec<Decision>,
        plan: Option<Plan>,
        decider: Decider,
    },
    /// The inner service answered; the settlement is armed (or already done).
    Called {
        result: Result<S::Response, S::Error>,
        settlement: Settlement,
        decisions: Vec<Decision>,
        plan: Plan,
    },
}

/// Everything that waits with the call until it is dispatched.
struct Pending<S, R> {
    engine: Arc<Engine>,
    service: S,
    request: R,
    identifier: Vec<u8>,
    model: Option<String>,
    estimate: Option<Usage>,
    /// Wait mode: the latest instant the call may still be dispatched.
    deadline: Option<Instant>,
    /// Wait mode: this call's turn in its identifier's queue, while it holds it.
    turn: Option<OwnedMutexGuard<()>>,
}

pin_project! {
    /// The acquire → call state machine. Each state owns what it needs; polling it
    /// after it completed panics.
    #[project = CallProj]
    pub(crate) enum Call<S, R>
    where
        S: Service<R>,
    {
        Resolving { quotas: QuotaFuture, pending: Option<Pending<S, R>> },
        Queued { turn: Turn, plan: Option<Plan>, pending: Option<Pending<S, R>>, first_wait: Option<Duration> },
        Sleeping { sleep: Pin<Box<Sleep>>, plan: Option<Plan>, pending: Option<Pending<S, R>> },
        Acquiring { settlement: Option<Settlement>, plan: Option<Plan>, pending: Option<Pending<S, R>> },
        Calling { #[pin] future: S::Future, settlement: Option<Settlement>, decisions: Vec<Decision>, plan: Option<Plan> },
        Refused { outcome: Option<Outcome<S, R>> },
        Done,
    }
}

impl<S: Service<R>, R> Call<S, R> {
    /// Start a call: `service` has been driven to readiness.
    pub(crate) fn new(engine: Arc<Engine>, service: S, request: R, call: CallRequest<'_>) -> Self {
        let tag = match identifier_tag(call.identifier) {
            Ok(tag) => tag,
            Err(error) => return Self::refused(error),
        };
        let deadline = engine.wait_up_to.map(|d| Instant::now() + d);
        let pending = Pending {
            engine: engine.clone(),
            service,
            request,
            identifier: call.identifier.to_vec(),
            model: call.model.map(str::to_owned),
            estimate: call.estimate,
            deadline,
            turn: None,
        };
        let quotas = match &engine.quotas {
            None => None,
            Some(resolver) => match resolver.resolve(call.identifier) {
                Resolution::Ready(q) => q,
                Resolution::Pending(quotas) => {
                    return Call::Resolving {
                        quotas,
                        pending: Some(pending),
                    };
                }
            },
        };
        let plan = engine.plan(tag, call.model, quotas.as_deref(), call.estimate);
        Self::planned(plan, pending)
    }

    fn refused(error: Error) -> Self {
        Call::Refused {
            outcome: Some(Outcome::Refused {
                error,
                decisions: Vec::new(),
                plan: None,
                decider: Decider::Store,
            }),
        }
    }

    /// The plan is known: answer from the denial cache, queue behind waiting calls, or
    /// acquire.
    fn planned(plan: Plan, pending: Pending<S, R>) -> Self {
        let engine = &pending.engine;
        if let Some(error) = engine.cached_denial(&plan.tag, plan.model.as_deref()) {
            if let Some(wait) = waitable(&pending, &error) {
                return Self::queue(plan, pending, Some(wait));
            }
            if let Some(e) = error.limit_exceeded() {
                metrics::cached_denial(&e.name);
            }
            return Call::Refused {
                outcome: Some(Outcome::Refused {
                    error,
                    decisions: Vec::new(),
                    plan: Some(plan),
                    decider: Decider::Store,
                }),
            };
        }
        if pending.deadline.is_some() && engine.waiters.busy(&plan.tag) {
            // Calls of this identifier are waiting: take a turn behind them.
            return Self::queue(plan, pending, None);
        }
        Self::acquire(plan, pending)
    }

    fn queue(plan: Plan, pending: Pending<S, R>, first_wait: Option<Duration>) -> Self {
        if pending.turn.is_some() {
            return Self::sleep(plan, pending, first_wait.unwrap_or_default());
        }
        let turn = Box::pin(pending.engine.waiters.queue(&plan.tag).lock_owned());
        Call::Queued {
            turn,
            plan: Some(plan),
            pending: Some(pending),
            first_wait,
        }
    }

    fn sleep(plan: Plan, pending: Pending<S, R>, wait: Duration) -> Self {
        Call::Sleeping {
            sleep: Box::pin(tokio::time::sleep(wait)),
            plan: Some(plan),
            pending: Some(pending),
        }
    }

    fn acquire(plan: Plan, pending: Pending<S, R>) -> Self {
        let settlement = Settlement::new(pending.engine.clone(), plan.clone());
        Call::Acquiring {
            settlement: Some(settlement),
            plan: Some(plan),
            pending: Some(pending),
        }
    }
}

/// Wait mode: how long to sleep before trying a denied call again, if its wait fits
/// in what is left of the bound.
fn waitable<S, R>(pending: &Pending<S, R>, error: &Error) -> Option<Duration> {
    let deadline = pending.deadline?;
    let wait = error.retry_after()?;
    (Instant::now() + wait <= deadline).then_some(wait)
}

fn taken<T>(slot: &mut Option<T>) -> T {
    slot.take().expect("call state polled after completion")
}

impl<S: Service<R>, R> Future for Call<S, R> {
    type Output = Outcome<S, R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                CallProj::Resolving { quotas, pending } => {
                    let quotas = ready!(quotas.as_mut().poll(cx));
                    let pending = taken(pending);
                    let tag = match identifier_tag(&pending.identifier) {
                        Ok(tag) => tag,
                        Err(error) => return Poll::Ready(refusal(error, None)),
                    };
                    let engine = pending.engine.clone();
                    let plan = engine.plan(
                        tag,
                        pending.model.as_deref(),
                        quotas.as_deref(),
                        pending.estimate,
                    );
                    self.set(Self::planned(plan, pending));
                }
                CallProj::Queued {
                    turn,
                    plan,
                    pending,
                    first_wait,
                } => {
                    let guard = ready!(turn.as_mut().poll(cx));
                    let (plan, mut pending) = (taken(plan), taken(pending));
                    pending.turn = Some(guard);
                    let next = match first_wait.take() {
                        Some(wait) => Self::sleep(plan, pending, wait),
                        // Our turn: budget may have come back while we queued.
                        None => Self::acquire(plan, pending),
                    };
                    self.set(next);
                }
                CallProj::Sleeping {
                    sleep,
                    plan,
                    pending,
                } => {
                    ready!(sleep.as_mut().poll(cx));
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
                    let settlement = taken(settlement);
                    let decider = settlement.decider();
                    let decisions = match acquired {
                        Ok(decisions) => decisions,
                        Err(error) => {
                            release_turn(&mut pending, &plan.tag);
                            return Poll::Ready(Outcome::Refused {
                                error: Error::Store(error),
                                decisions: Vec::new(),
                                plan: Some(plan),
                                decider,
                            });
                        }
                    };
                    if !decisions.iter().all(|d| d.allowed) {
                        let engine = pending.engine.clone();
                        let error = engine.denial(&plan, &decisions);
                        engine.remember_denial(&plan, &error);
                        if let Some(wait) = waitable(&pending, &error) {
                            tracing::debug!(identifier = %plan.tag, ?wait, "waiting for budget");
                            self.set(Self::queue(plan, pending, Some(wait)));
                            continue;
                        }
                        release_turn(&mut pending, &plan.tag);
                        tracing::info!(identifier = %plan.tag, %error, "rate limit denied a call");
                        return Poll::Ready(Outcome::Refused {
                            error,
                            decisions,
                            plan: Some(plan),
                            decider,
                        });
                    }
                    release_turn(&mut pending, &plan.tag);
                    let _span = tracing::debug_span!(
                        "llm_ratelimit_call",
                        identifier = %plan.tag,
                        limits = plan.taken.len(),
                    )
                    .entered();
                    let mut service = pending.service;
                    let future = service.call(pending.request);
                    self.set(Call::Calling {
                        future,
                        settlement: Some(settlement),
                        decisions,
                        plan: Some(plan),
                    });
                }
                CallProj::Calling {
                    future,
                    settlement,
                    decisions,
                    plan,
                } => {
                    let result = ready!(future.poll(cx));
                    let outcome = Outcome::Called {
                        result,
                        settlement: taken(settlement),
                        decisions: std::mem::take(decisions),
                        plan: taken(plan),
                    };
                    self.set(Call::Done);
                    return Poll::Ready(outcome);
                }
                CallProj::Refused { outcome } => {
                    let outcome = taken(outcome);
                    self.set(Call::Done);
                    return Poll::Ready(outcome);
                }
                CallProj::Done => panic!("call state polled after completion"),
            }
        }
    }
}

fn refusal<S: Service<R>, R>(error: Error, plan: Option<Plan>) -> Outcome<S, R> {
    Outcome::Refused {
        error,
        decisions: Vec::new(),
        plan,
        decider: Decider::Store,
    }
}

/// Give up this call's turn, letting the next waiting call of the identifier go.
fn release_turn<S, R>(pending: &mut Pending<S, R>, tag: &str) {
    if pending.turn.take().is_some() {
        pending.engine.waiters.release(tag);
    }
}
