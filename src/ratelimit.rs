//! [`Ratelimit`]: one algorithm with its quota, a store and a key prefix.

use std::sync::Arc;
use std::time::Duration;

use crate::algorithm::{Algorithm, MAX_UNITS};
use crate::error::Error;
use crate::store::{
    Adjustment, Decision, LimitCheck, Store, identifier_tag, state_key, validate_prefix,
};

/// One limit: an algorithm with its quota, applied per identifier, with its state in a
/// store under a key prefix.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_llm_ratelimit::Error> {
/// use std::time::Duration;
/// use tower_llm_ratelimit::{FixedWindow, MemoryStore, Ratelimit};
///
/// let limit = Ratelimit::new(
///     FixedWindow::new(10, Duration::from_secs(60))?,
///     MemoryStore::new(),
///     "chat:requests",
/// )?;
/// let decision = limit.limit("user-1", 1).await?;
/// assert!(decision.allowed);
/// assert_eq!(decision.remaining, 9);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Ratelimit {
    algorithm: Algorithm,
    store: Arc<dyn Store>,
    prefix: Arc<str>,
}

impl std::fmt::Debug for Ratelimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ratelimit")
            .field("algorithm", &self.algorithm)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

pub(crate) fn check_cost(cost: u64) -> Result<i64, Error> {
    if cost > MAX_UNITS {
        return Err(Error::invalid_input(format!(
            "cost {cost} is more than the maximum of {MAX_UNITS}"
        )));
    }
    Ok(cost as i64)
}

impl Ratelimit {
    /// A limit with `algorithm`, its state in `store` under `prefix` (1 to 128 bytes of
    /// printable ASCII without braces).
    pub fn new(
        algorithm: impl Into<Algorithm>,
        store: impl Store,
        prefix: &str,
    ) -> Result<Self, Error> {
        Self::with_shared_store(algorithm, Arc::new(store), prefix)
    }

    /// Like [`new`](Self::new), for a store already behind an `Arc`.
    pub fn with_shared_store(
        algorithm: impl Into<Algorithm>,
        store: Arc<dyn Store>,
        prefix: &str,
    ) -> Result<Self, Error> {
        validate_prefix(prefix)?;
        Ok(Self {
            algorithm: algorithm.into(),
            store,
            prefix: prefix.into(),
        })
    }

    /// The algorithm and quota.
    pub fn algorithm(&self) -> &Algorithm {
        &self.algorithm
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The store key holding `identifier`'s state under this limit.
    pub fn key(&self, identifier: impl AsRef<[u8]>) -> Result<String, Error> {
        Ok(state_key(
            &self.prefix,
            &identifier_tag(identifier.as_ref())?,
        ))
    }

    /// Try to take `cost` units for `identifier`. Denied decisions take nothing; cost 0
    /// only reads.
    pub async fn limit(&self, identifier: impl AsRef<[u8]>, cost: u64) -> Result<Decision, Error> {
        check_cost(cost)?;
        let check = LimitCheck {
            key: self.key(identifier)?.into(),
            rule: self.algorithm.into(),
            cost,
            take: true,
            slot: 0,
        };
        first(self.store.acquire(&[check]).await?)
    }

    /// Units `identifier` has left (0 while in debt).
    pub async fn remaining(&self, identifier: impl AsRef<[u8]>) -> Result<u64, Error> {
        Ok(self.limit(identifier, 0).await?.remaining)
    }

    /// Forget everything about `identifier` under this limit: a full budget again.
    pub async fn reset(&self, identifier: impl AsRef<[u8]>) -> Result<(), Error> {
        let key = self.key(identifier)?;
        Ok(self.store.delete(vec![key]).await?)
    }

    /// Record `units` already used, even past the limit (the debt blocks later decisions
    /// until time pays it back).
    pub async fn charge(
        &self,
        identifier: impl AsRef<[u8]>,
        units: u64,
    ) -> Result<Decision, Error> {
        let delta = check_cost(units)?;
        self.adjust(identifier, delta).await
    }

    /// Give `units` back, never beyond a full budget.
    pub async fn refund(
        &self,
        identifier: impl AsRef<[u8]>,
        units: u64,
    ) -> Result<Decision, Error> {
        let delta = check_cost(units)?;
        self.adjust(identifier, -delta).await
    }

    async fn adjust(&self, identifier: impl AsRef<[u8]>, delta: i64) -> Result<Decision, Error> {
        let adjustment = Adjustment {
            key: self.key(identifier)?.into(),
            rule: self.algorithm.into(),
            delta,
            slot: 0,
            window: None,
        };
        first(self.store.adjust(&[adjustment], None).await?)
    }

    /// Take `cost` units, waiting (by the decisions' `retry_after`) up to `timeout` for
    /// them to become available. Returns the last decision: allowed, or denied when the
    /// wait would exceed `timeout` or the cost can never pass.
    pub async fn block_until_ready(
        &self,
        identifier: impl AsRef<[u8]>,
        cost: u64,
        timeout: Duration,
    ) -> Result<Decision, Error> {
        let identifier = identifier.as_ref();
        let deadline = crate::engine::deadline_after(timeout);
        loop {
            let decision = self.limit(identifier, cost).await?;
            let Some(wait) = decision.retry_after.filter(|_| !decision.allowed) else {
                return Ok(decision);
            };
            if deadline.saturating_duration_since(tokio::time::Instant::now()) < wait {
                return Ok(decision);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

fn first(decisions: Vec<Decision>) -> Result<Decision, Error> {
    decisions
        .into_iter()
        .next()
        .ok_or_else(|| Error::Store(crate::error::StoreError::new("store returned no decision")))
}
