//! Settlement of one call: exactly once on every path, including cancellation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use super::{Limits, MissingUsage};
use crate::llm::Usage;
use crate::store::{Adjustment, Decision, StoreFuture};

/// Where a call's settlement stands. Whatever phase it is in when dropped, [`Drop`]
/// finishes it in the background, so dropping a call never leaks a reservation.
enum Phase {
    /// The pre-dispatch acquire is in flight; if it turns out allowed, the reservation
    /// must be refunded should the call not continue.
    Acquiring(StoreFuture<Vec<Decision>>),
    /// Acquired; the call is running. Dropped here: refund the reservation.
    Armed,
    /// The settling write is in flight; dropped here: let it finish.
    Writing(StoreFuture<Vec<Decision>>),
    /// Nothing left to do.
    Done,
}

/// A call's debt to the store: the token reservation taken before dispatch, to be
/// settled against the reported usage after it.
pub(crate) struct Settlement {
    limits: Arc<Limits>,
    /// Key of the token limit for this identifier, when a token limit is configured.
    token_key: Option<String>,
    /// Tokens taken before dispatch (`Reserve` mode), 0 otherwise.
    reserved: u64,
    phase: Phase,
}

impl Settlement {
    pub(crate) fn new(
        limits: Arc<Limits>,
        token_key: Option<String>,
        reserved: u64,
        acquire: StoreFuture<Vec<Decision>>,
    ) -> Self {
        Self {
            limits,
            token_key,
            reserved,
            phase: Phase::Acquiring(acquire),
        }
    }

    /// Drive the acquire. Ready(Ok(decisions)) arms the settlement if all were allowed
    /// (a denial took nothing, so there is nothing left to settle).
    pub(crate) fn poll_acquire(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Vec<Decision>, crate::error::StoreError>> {
        let Phase::Acquiring(fut) = &mut self.phase else {
            return Poll::Ready(Ok(Vec::new()));
        };
        let result = std::task::ready!(fut.as_mut().poll(cx));
        self.phase = match &result {
            Ok(d) if d.iter().all(|d| d.allowed) => Phase::Armed,
            _ => Phase::Done,
        };
        Poll::Ready(result)
    }

    /// The token delta to write for this outcome: `Some(usage)` for a delivered response
    /// with usage, `None` for one without; `delivered = false` for an inner error.
    fn delta(&self, usage: Option<&Usage>, delivered: bool) -> i64 {
        let reserved = self.reserved as i64;
        if !delivered {
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

    /// Start the settling write for this outcome (nothing is sent when the delta is 0).
    pub(crate) fn start(&mut self, usage: Option<&Usage>, delivered: bool) {
        if !matches!(self.phase, Phase::Armed) {
            return;
        }
        let delta = self.delta(usage, delivered);
        self.phase = match self.write(delta) {
            Some(fut) => Phase::Writing(fut),
            None => Phase::Done,
        };
    }

    /// The token adjustment for `delta`, if there is anything to write.
    fn adjustment(&self, delta: i64) -> Option<Adjustment> {
        let (Some(key), Some(tokens)) = (&self.token_key, &self.limits.tokens) else {
            return None;
        };
        (delta != 0).then(|| Adjustment {
            key: key.clone(),
            algorithm: tokens.algorithm,
            delta,
        })
    }

    fn write(&self, delta: i64) -> Option<StoreFuture<Vec<Decision>>> {
        self.adjustment(delta)
            .map(|a| self.limits.store.adjust(vec![a]))
    }

    /// Drive the settling write to completion. A failed write is logged, never turned
    /// into a failure of a response the model already produced.
    pub(crate) fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Phase::Writing(fut) = &mut self.phase else {
            return Poll::Ready(());
        };
        let result = std::task::ready!(fut.as_mut().poll(cx));
        if let Err(error) = result {
            tracing::error!(%error, "could not write the token charge of a call");
        }
        self.phase = Phase::Done;
        Poll::Ready(())
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        // Built lazily: a store may apply an operation as soon as it is asked for it, and
        // the refund must wait until the acquire is known to have been allowed.
        let store = self.limits.store.clone();
        let refund = self
            .adjustment(-(self.reserved as i64))
            .map(|a| async move { store.adjust(vec![a]).await });
        match phase {
            Phase::Done => {}
            Phase::Armed => {
                if let Some(refund) = refund {
                    finish_in_background(async move {
                        if let Err(error) = refund.await {
                            tracing::error!(%error, "could not refund a cancelled call's reservation");
                        }
                    });
                }
            }
            Phase::Writing(write) => finish_in_background(async move {
                if let Err(error) = write.await {
                    tracing::error!(%error, "could not write the token charge of a dropped call");
                }
            }),
            Phase::Acquiring(acquire) => finish_in_background(async move {
                let allowed = matches!(acquire.await, Ok(d) if d.iter().all(|d| d.allowed));
                if let (true, Some(refund)) = (allowed, refund)
                    && let Err(error) = refund.await
                {
                    tracing::error!(%error, "could not refund a cancelled call's reservation");
                }
            }),
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
