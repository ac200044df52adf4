//! A store behind a slow network: acquires are decided at once and answered `reply_delay`
//! later; writes land `write_delay` after they are sent. Unlike a real store it does not
//! undo an acquire whose future is dropped before its answer: only for tests that await
//! every call.

use std::time::Duration;

use tower_llm_ratelimit::store::{Adjustment, LimitCheck, StoreFuture};
use tower_llm_ratelimit::{Decision, MemoryStore, Store};

#[derive(Clone)]
pub struct LateReplies {
    pub inner: MemoryStore,
    pub reply_delay: Duration,
    pub write_delay: Duration,
}

impl LateReplies {
    pub fn new(reply_delay: Duration, write_delay: Duration) -> Self {
        Self {
            inner: MemoryStore::new(),
            reply_delay,
            write_delay,
        }
    }
}

impl Store for LateReplies {
    fn acquire(&self, checks: &[LimitCheck]) -> StoreFuture<Vec<Decision>> {
        let decided = self.inner.acquire(checks);
        let delay = self.reply_delay;
        StoreFuture::new(async move {
            let decided = decided.await;
            tokio::time::sleep(delay).await;
            decided
        })
    }

    fn adjust(&self, adjustments: &[Adjustment], id: Option<u64>) -> StoreFuture<Vec<Decision>> {
        if self.write_delay.is_zero() {
            return self.inner.adjust(adjustments, id);
        }
        let (inner, delay, adjustments) =
            (self.inner.clone(), self.write_delay, adjustments.to_vec());
        StoreFuture::new(async move {
            tokio::time::sleep(delay).await;
            inner.adjust(&adjustments, id).await
        })
    }

    fn delete(&self, keys: Vec<String>) -> StoreFuture<()> {
        self.inner.delete(keys)
    }
}
