//! The accounting core shared by the Tower layer and the HTTP adapter: a call's limits
//! planned into one atomic store operation, its settlement, the reliability machinery
//! (timeouts, breaker, fallback, settlement queue), the denial cache, tenants' quotas
//! and waiting for budget.

pub(crate) mod call;
pub(crate) mod denied;
pub(crate) mod limit;
pub(crate) mod metrics;
pub(crate) mod quota;
pub(crate) mod reliability;
pub(crate) mod settlement;

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use smallvec::SmallVec;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::algorithm::{
    Algorithm, ConcurrencyLimit, FixedWindow, MAX_UNITS, SlidingWindow, TokenBucket,
};
use crate::error::{Error, LimitExceeded};
use crate::llm::Usage;
use crate::store::{
    Decision, IdentifierKeys, LimitCheck, MemoryStore, Rule, SharedKeys, StateKey, Store, Tag,
    identifier_tag, state_key,
};

use limit::{LimitKind, LimitSpec, TokenCount};
use quota::{QuotaResolver, Quotas};
use reliability::{Breaker, SettlementQueue, StoreErrorPolicy, with_timeout};

/// How token limits are applied before a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenMode {
    /// A call passes while the identifier has any tokens left; its usage is charged
    /// after the call. Calls running at the same time can overshoot the budget (the
    /// overshoot is recorded as debt).
    #[default]
    CheckRemaining,
    /// Reserve the request's estimate before the call (allowed iff it fits), settle to the
    /// real usage after it. A hard cap under concurrency.
    Reserve,
}

/// What to charge when a complete response reports no usage. The response is always
/// delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissingUsage {
    /// Keep the reservation charged (nothing when there was none), with a warning.
    #[default]
    ChargeReservation,
    /// Refund the reservation, with a warning.
    ChargeNothing,
    /// Charge this many tokens in place of usage, with a warning.
    ChargeFixed(u64),
}

/// A function from reported usage to the tokens to charge.
pub(crate) type CostFn = Arc<dyn Fn(&Usage) -> u64 + Send + Sync>;

/// One limit's state for one identifier, as `usage` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitUsage {
    /// The limit's name.
    pub name: String,
    /// What it counts.
    pub kind: LimitKind,
    /// The quota (the identifier's own, when a quota resolver sets one).
    pub limit: u64,
    /// Units left (0 while in debt).
    pub remaining: u64,
    /// Time until the budget is fully restored (fixed window: until it rolls).
    pub reset_after: Duration,
}

/// A limit a call takes from, as its settlement needs to know it afterwards.
#[derive(Clone, Debug)]
pub(crate) struct Taken {
    /// Index into [`Engine::limits`].
    pub limit: usize,
    /// The rule with the identifier's quota.
    pub rule: Rule,
    /// Concurrency: this call's slot id; else 0.
    pub slot: u64,
    /// Tokens reserved before the call (token limits in `Reserve` mode).
    pub reserved: u64,
}

/// The store operation for one call, before dispatch: one check per applicable limit,
/// in the same order as `taken`.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// The identifier's hash tag (a slice of the keys' buffer).
    pub tag: StateKey,
    pub model: Option<String>,
    /// The request's estimate (prompt and output), if known: reserved from token limits
    /// in `Reserve` mode, and charged if the call ends before its usage arrives.
    pub estimate: Option<Usage>,
    /// Inline for the usual few limits: a plan is one allocation.
    pub checks: SmallVec<[LimitCheck; 4]>,
    pub taken: SmallVec<[Taken; 4]>,
    /// A limit whose quota for this identifier is 0 (a suspended tenant): every call is
    /// refused by it.
    pub suspended: Option<usize>,
}

/// A layer's identifier-wide rate limits (no model filter, not per model), when it has
/// at least two and no concurrency limit: they apply to every call, so a store may keep
/// their states for one identifier in one value (the Redis store does: one read and one
/// write per call however many there are). Each member still has its own key, which
/// names it everywhere else (the memory store, the denial cache, wait mode's queues).
#[derive(Clone, Debug)]
pub(crate) struct LimitGroup {
    /// Indices into [`Engine::limits`], in the order of their places in the value.
    pub members: Vec<usize>,
    /// `<layer prefix>:+<fingerprint of the members' names>:{`: what the shared
    /// values' keys start with (a limit's name cannot contain `+`).
    pub key_head: Box<str>,
}

/// The most limits a layer may have for its identifier-wide ones to be grouped (the
/// Redis store decides a call of up to this many rate limits with a script generated
/// for it; see `store::redis::shaped`).
pub(crate) const MAX_GROUPED_LIMITS: usize = 8;

impl LimitGroup {
    /// The group of `limits` of the layer with key prefix `prefix`, if they have one.
    pub(crate) fn of(limits: &[LimitSpec], prefix: &str) -> Option<Self> {
        if limits.len() > MAX_GROUPED_LIMITS || limits.iter().any(|l| l.rule.is_concurrency()) {
            return None;
        }
        let mut members: Vec<usize> = (0..limits.len())
            .filter(|&i| !limits[i].per_model && limits[i].models.is_empty())
            .collect();
        // Request limits first: every call takes from them, and the value keeps the
        // members' counts side by side, so their takes rewrite one run of bytes.
        members.sort_by_key(|&i| limits[i].kind != LimitKind::Requests);
        if members.len() < 2 {
            return None;
        }
        // The members' names, in order, fingerprinted: a layer whose identifier-wide
        // limits change (one added, removed, renamed or moved) uses values of its own,
        // never one laid out for other members.
        let mut names = Sha256::new();
        for &i in &members {
            names.update(limits[i].name.as_bytes());
            names.update([0]);
        }
        let digest = names.finalize();
        let fingerprint: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Some(Self {
            members,
            key_head: [prefix, ":+", &fingerprint, ":{"].concat().into(),
        })
    }

    /// The place of limit `index` of the engine among the members, if it is one.
    fn member(&self, index: usize) -> Option<u8> {
        self.members
            .iter()
            .position(|&m| m == index)
            .map(|p| p as u8)
    }
}

/// Where each applicable limit's key is in a plan's key buffer: (limit index, range).
type KeyRanges = SmallVec<[(usize, Range<usize>); 4]>;

/// Everything the middleware shares across clones.
pub(crate) struct Engine {
    pub store: Arc<dyn Store>,
    pub limits: Vec<LimitSpec>,
    /// The identifier-wide limits whose states a store may keep together.
    pub group: Option<LimitGroup>,
    pub store_timeout: Duration,
    pub on_store_error: StoreErrorPolicy,
    /// Decides under [`StoreErrorPolicy::Local`].
    pub local: MemoryStore,
    pub breaker: Breaker,
    pub queue: Arc<SettlementQueue>,
    /// Identifiers known to be denied until a given instant; `None` when turned off.
    pub denied: Option<denied::DeniedCache>,
    pub token_mode: TokenMode,
    pub include_output_tokens: bool,
    pub cost_fn: Option<CostFn>,
    pub missing_usage: MissingUsage,
    pub default_estimate: u64,
    pub fallback_identifier: Option<Vec<u8>>,
    pub quotas: Option<Arc<dyn QuotaResolver>>,
    /// The longest a resolver's pending answer is waited for.
    pub quota_timeout: Duration,
    /// Wait mode: the longest a denied call waits for budget.
    pub wait_up_to: Option<Duration>,
    pub waiters: Waiters,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("limits", &self.limits)
            .field("token_mode", &self.token_mode)
            .field("on_store_error", &self.on_store_error)
            .finish_non_exhaustive()
    }
}

/// The rule with its quota replaced (a tenant's override; a bucket's refill scaled by the
/// same factor, rounded to the nearest unit, at least 1). An override above the
/// largest quota accepted is that quota (an "unlimited" tier written as `u64::MAX` gets
/// the most there is, not the configured quota).
fn with_quota(rule: Rule, quota: u64, name: &str) -> Rule {
    let quota = quota.min(MAX_UNITS);
    let replaced = match rule {
        Rule::Rate(Algorithm::FixedWindow(a)) => {
            FixedWindow::new(quota, a.window()).map(|a| Rule::Rate(a.into()))
        }
        Rule::Rate(Algorithm::SlidingWindow(a)) => {
            SlidingWindow::new(quota, a.window()).map(|a| Rule::Rate(a.into()))
        }
        Rule::Rate(Algorithm::TokenBucket(b)) => {
            // The refill scales with the capacity, so that the tier's bucket refills in
            // the same time: a quota 5 times the configured one is 5 times the rate too.
            let refill = u128::from(b.refill()) * u128::from(quota);
            let refill = (refill + u128::from(b.capacity()) / 2) / u128::from(b.capacity());
            let refill = u64::try_from(refill)
                .unwrap_or(MAX_UNITS)
                .clamp(1, MAX_UNITS);
            TokenBucket::new(quota, refill, b.interval()).map(|b| Rule::Rate(b.into()))
        }
        Rule::Concurrency(c) => ConcurrencyLimit::new(quota, c.lease()).map(Rule::Concurrency),
    };
    replaced.unwrap_or_else(|error| {
        tracing::warn!(limit = name, quota, %error, "ignoring an invalid quota override");
        rule
    })
}

/// Which of a denied call's `decisions` its refusal is named after (its error, headers
/// and denial metric): the denying limit whose denial lasts longest (no retry time is
/// longest of all), the last of equals.
pub(crate) fn denying(decisions: &[Decision]) -> Option<usize> {
    decisions
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.allowed)
        .max_by_key(|(_, d)| d.retry_after.map_or(Duration::MAX, |r| r))
        .map(|(i, _)| i)
}

/// The error of a denial by a limit of `kind`.
fn limit_error(kind: LimitKind, exceeded: LimitExceeded) -> Error {
    match kind {
        LimitKind::Requests => Error::RequestLimitReached(exceeded),
        LimitKind::Tokens => Error::TokenLimitReached(exceeded),
        LimitKind::Concurrency => Error::ConcurrencyLimitReached(exceeded),
    }
}

/// `after` from now on Tokio's clock; a duration too large to add (`Duration::MAX` for
/// "no bound") is a century from now.
pub(crate) fn deadline_after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// The per-model part of a key: the model as it is when short and plain, else a hash
/// (also of the empty model and of one longer than any identifier, which are no
/// identifiers but still name a budget of their own).
fn model_tag(model: &str) -> String {
    identifier_tag(model.as_bytes())
        .unwrap_or_else(|_| Tag::hashed(model.as_bytes()).as_str().to_owned())
}

impl Engine {
    /// The identifier a request is limited under: its own, or the fallback.
    pub(crate) fn identifier<'a>(
        &'a self,
        from_request: Option<&'a [u8]>,
    ) -> Result<&'a [u8], Error> {
        match (from_request, &self.fallback_identifier) {
            (Some(id), _) => Ok(id),
            (None, Some(fallback)) => Ok(fallback),
            (None, None) => Err(Error::MissingIdentifier),
        }
    }

    /// Whether any limit needs to know the request's model.
    #[cfg(feature = "http")]
    pub(crate) fn needs_model(&self) -> bool {
        self.limits
            .iter()
            .any(|l| l.per_model || !l.models.is_empty())
            || self
                .limits
                .iter()
                .any(|l| matches!(&l.count, Some(TokenCount::Weighted(_))))
    }

    /// Whether any token limit is configured.
    pub(crate) fn has_token_limit(&self) -> bool {
        self.limits.iter().any(|l| l.kind == LimitKind::Tokens)
    }

    /// Whether the response must be followed to its end (token usage, or a slot held
    /// until the body is done).
    #[cfg(feature = "http")]
    pub(crate) fn settles_after_body(&self) -> bool {
        self.limits
            .iter()
            .any(|l| matches!(l.kind, LimitKind::Tokens | LimitKind::Concurrency))
    }

    /// The checks for one call of the identifier with hash tag `tag`, for `model`.
    /// `estimate` is asked for only when a token limit reserves.
    pub(crate) fn plan(
        &self,
        tag: &str,
        model: Option<&str>,
        quotas: Option<&Quotas>,
        estimate: Option<Usage>,
    ) -> Arc<Plan> {
        // The tag and every key of the call (`<prefix>:{<tag>}`, or for a per-model limit
        // `<prefix>:m.<model tag>:{<tag>}`, see `state_key`), in one allocation.
        SharedKeys::build(|buffer| {
            let tag_at = buffer.push(&[tag]);
            let group_at = self
                .group
                .as_ref()
                .map(|g| buffer.push_key(&g.key_head, tag));
            let mut model_part = None;
            let mut at: SmallVec<[(usize, Range<usize>); 4]> = SmallVec::new();
            for (i, spec) in self.limits.iter().enumerate() {
                if !spec.applies_to(model) {
                    continue;
                }
                let range = match model.filter(|_| spec.per_model) {
                    Some(model) => {
                        let part = model_part.get_or_insert_with(|| model_tag(model));
                        buffer.push(&[&spec.prefix, ":m.", part, ":{", tag, "}"])
                    }
                    None => buffer.push_key(&spec.key_head, tag),
                };
                at.push((i, range));
            }
            let text = buffer.share();
            self.plan_checks(
                SharedKeys::key(&text, tag_at),
                &text,
                (at, group_at),
                model,
                quotas,
                estimate,
            )
        })
    }

    /// [`Engine::plan`] once the keys are written: limit `i` at `range` of `text`, the
    /// group's value's key (if the layer groups limits) at `group_at`. (The
    /// plan is put in its `Arc` here: returned by value through the key buffer's closure,
    /// it would be copied at each step.)
    #[inline(always)]
    fn plan_checks(
        &self,
        tag: StateKey,
        text: &Arc<str>,
        (at, group_at): (KeyRanges, Option<Range<usize>>),
        model: Option<&str>,
        quotas: Option<&Quotas>,
        estimate: Option<Usage>,
    ) -> Arc<Plan> {
        let mut checks = SmallVec::with_capacity(at.len());
        let mut taken = SmallVec::with_capacity(at.len());
        let mut suspended = None;
        for (i, range) in at {
            let spec = &self.limits[i];
            let rule = match quotas.and_then(|q| q.get(&spec.name)) {
                Some(0) => {
                    suspended.get_or_insert(i);
                    spec.rule
                }
                Some(quota) => with_quota(spec.rule, quota, &spec.name),
                None => spec.rule,
            };
            let place = self
                .group
                .as_ref()
                .and_then(|g| Some((g.member(i)?, g.members.len() as u8)));
            let key = match (place, &group_at) {
                (Some((member, members)), Some(group)) => {
                    SharedKeys::grouped_key(text, range, group.clone(), member, members)
                }
                _ => SharedKeys::key(text, range),
            };
            let (cost, take, slot, reserved) = match spec.kind {
                LimitKind::Requests => (1, true, 0, 0),
                LimitKind::Concurrency => (1, true, reliability::next_id(), 0),
                // "Allowed iff remaining > 0" is "a cost of 1 fits", without taking it.
                LimitKind::Tokens if self.token_mode == TokenMode::CheckRemaining => {
                    (1, false, 0, 0)
                }
                LimitKind::Tokens => {
                    let usage = estimate.unwrap_or_else(|| Usage::new(self.default_estimate, 0));
                    let reserved = self.cost(i, &usage, model).clamp(1, MAX_UNITS);
                    (reserved, true, 0, reserved)
                }
            };
            checks.push(LimitCheck {
                key,
                rule,
                cost,
                take,
                slot,
            });
            taken.push(Taken {
                limit: i,
                rule,
                slot,
                reserved,
            });
        }
        Arc::new(Plan {
            tag,
            model: model.map(str::to_owned),
            estimate,
            checks,
            taken,
            suspended,
        })
    }

    /// The refusal of a call whose identifier has a quota of 0 on one of its limits.
    pub(crate) fn suspension(&self, plan: &Plan) -> Option<Error> {
        let spec = &self.limits[plan.suspended?];
        let exceeded = LimitExceeded {
            name: spec.name.clone(),
            limit: 0,
            remaining: 0,
            retry_after: None,
            reset_after: Duration::ZERO,
        };
        Some(limit_error(spec.kind, exceeded))
    }

    /// Units token limit `index` charges for `usage` of `model`.
    pub(crate) fn cost(&self, index: usize, usage: &Usage, model: Option<&str>) -> u64 {
        let spec = &self.limits[index];
        let units = match (&spec.count, &self.cost_fn) {
            (Some(count), _) => count.cost(usage, model),
            (None, Some(f)) => f(usage),
            (None, None) if self.include_output_tokens => TokenCount::Total.cost(usage, model),
            (None, None) => TokenCount::Prompt.cost(usage, model),
        };
        if units > MAX_UNITS {
            tracing::warn!(
                units,
                max = MAX_UNITS,
                limit = &*spec.name,
                "reported usage is absurdly large; charging the maximum"
            );
            MAX_UNITS
        } else {
            units
        }
    }

    /// The error for a denied acquire: the denying limit whose wait is longest (a cost
    /// that can never pass first), with its own numbers.
    pub(crate) fn denial(&self, plan: &Plan, decisions: &[Decision]) -> Error {
        let denied = denying(decisions).map(|i| (&self.limits[plan.taken[i].limit], &decisions[i]));
        let Some((spec, d)) = denied else {
            return Error::Store(crate::error::StoreError::new(
                "store denied without a denying decision",
            ));
        };
        let exceeded = LimitExceeded {
            name: spec.name.clone(),
            limit: d.limit,
            remaining: d.remaining,
            retry_after: d.retry_after,
            reset_after: d.reset_after,
        };
        limit_error(spec.kind, exceeded)
    }

    /// The refusal of a call one of whose costs exceeds its limit's quota (no wait lets
    /// it pass), by the last such limit (the one [`denying`] names: the last of the
    /// limits that deny for longest), with its numbers from `decisions` (the
    /// identifier's limits as last decided); `None` if every cost fits its quota.
    pub(crate) fn never_passes(&self, plan: &Plan, decisions: &[Decision]) -> Option<Error> {
        let i = plan.checks.iter().rposition(call::can_never_pass)?;
        let spec = &self.limits[plan.taken[i].limit];
        let (remaining, reset_after) = decisions
            .get(i)
            .map_or((0, Duration::ZERO), |d| (d.remaining, d.reset_after));
        let exceeded = LimitExceeded {
            name: spec.name.clone(),
            limit: plan.checks[i].rule.limit(),
            remaining,
            retry_after: None,
            reset_after,
        };
        Some(limit_error(spec.kind, exceeded))
    }

    /// Where the denial cache stands for `plan` when its acquire begins (see
    /// [`remember_denial`](Self::remember_denial)).
    pub(crate) fn denial_epoch(&self, plan: &Plan) -> u64 {
        self.denied
            .as_ref()
            .map_or(0, |cache| cache.epoch(&plan.tag))
    }

    /// Remember a denial that only time can lift (see [`denied`]), with the acquire's
    /// `decisions` (every limit of the call, reported again with the cached denial),
    /// unless budget came back to the identifier through this process since the acquire
    /// began (`epoch`: [`denial_epoch`](Self::denial_epoch) then).
    pub(crate) fn remember_denial(
        &self,
        plan: &Plan,
        error: &Error,
        decisions: &[Decision],
        epoch: u64,
    ) {
        let cacheable = match error {
            Error::RequestLimitReached(_) => true,
            Error::TokenLimitReached(_) => self.token_mode == TokenMode::CheckRemaining,
            _ => false,
        };
        if let (true, Some(cache)) = (cacheable, &self.denied) {
            cache.record(&plan.tag, plan.model.as_deref(), error, decisions, epoch);
        }
    }

    /// A cached denial still in force for this call, with every limit's decision as
    /// the denied acquire answered it, unless a quota changed since (a tenant's new tier
    /// applies on the next call).
    pub(crate) fn cached_denial(&self, plan: &Plan) -> Option<(Error, Vec<Decision>)> {
        let cache = self.denied.as_ref()?;
        let (error, decisions) = cache.check(&plan.tag, plan.model.as_deref())?;
        let same_quotas = decisions.len() == plan.taken.len()
            && plan
                .taken
                .iter()
                .zip(&decisions)
                .all(|(t, d)| t.rule.limit() == d.limit);
        if same_quotas {
            Some((error, decisions))
        } else {
            cache.forget(&plan.tag);
            None
        }
    }

    /// Drop `tag`'s cached denials: budget was given back through this process.
    pub(crate) fn forget_denials(&self, tag: &str) {
        if let Some(cache) = &self.denied {
            cache.forget(tag);
        }
    }

    /// The name and period of limit `index`.
    #[cfg(feature = "http")]
    pub(crate) fn spec(&self, index: usize) -> &LimitSpec {
        &self.limits[index]
    }

    /// `identifier`'s quotas from the resolver, if there is one: a pending answer is
    /// waited for at most `quota_timeout`, after which the configured quotas apply.
    pub(crate) fn resolve(&self, identifier: &[u8]) -> Option<quota::Resolution> {
        let resolution = self.quotas.as_ref()?.resolve(identifier);
        Some(match resolution {
            quota::Resolution::Pending(answer) => {
                let timeout = self.quota_timeout;
                quota::Resolution::Pending(Box::pin(async move {
                    tokio::time::timeout(timeout, answer)
                        .await
                        .unwrap_or_else(|_| {
                            tracing::warn!(
                                ?timeout,
                                "quota resolver did not answer in time; the configured \
                                 quotas apply"
                            );
                            None
                        })
                }))
            }
            ready => ready,
        })
    }

    /// `identifier`'s quotas, asking the resolver (and waiting for it if need be).
    async fn quotas_for(&self, identifier: &[u8]) -> Option<Arc<Quotas>> {
        match self.resolve(identifier)? {
            quota::Resolution::Ready(q) => q,
            quota::Resolution::Pending(f) => f.await,
        }
    }

    /// Forget what limit `name` (every limit if `None`) holds for `identifier`, for every
    /// model, and drop its cached denials.
    pub(crate) async fn reset(&self, identifier: &[u8], name: Option<&str>) -> Result<(), Error> {
        let tag = identifier_tag(identifier)?;
        let specs: Vec<&LimitSpec> = self
            .limits
            .iter()
            .filter(|l| name.is_none_or(|n| *l.name == *n))
            .collect();
        if let (Some(name), true) = (name, specs.is_empty()) {
            return Err(Error::invalid_input(format!("no limit named {name:?}")));
        }
        self.forget_denials(&tag);
        let mut keys: Vec<String> = specs.iter().map(|s| state_key(&s.prefix, &tag)).collect();
        // Grouped limits: every one reset, their shared value goes; some, their places in
        // it are refunded to a full budget (which is what a state that is gone reads as).
        let mut refunds = Vec::new();
        if let Some(group) = &self.group {
            let group_key = [&*group.key_head, &tag, "}"].concat();
            let reset: Vec<usize> = (0..self.limits.len())
                .filter(|&i| group.members.contains(&i))
                .filter(|&i| name.is_none_or(|n| *self.limits[i].name == *n))
                .collect();
            if reset.len() == group.members.len() {
                keys.push(group_key);
            } else {
                for i in reset {
                    let spec = &self.limits[i];
                    let own = state_key(&spec.prefix, &tag);
                    let text: Arc<str> = [own.as_str(), &group_key].concat().into();
                    let member = group.member(i).unwrap_or_default();
                    refunds.push(crate::store::Adjustment {
                        key: SharedKeys::grouped_key(
                            &text,
                            0..own.len(),
                            own.len()..text.len(),
                            member,
                            group.members.len() as u8,
                        ),
                        rule: spec.rule,
                        // Beyond any count a state can hold (2^52): a full budget.
                        delta: -(1 << 53),
                        slot: 0,
                        window: None,
                    });
                }
            }
        }
        let per_model: Vec<String> = specs
            .iter()
            .filter(|s| s.per_model)
            .map(|s| format!("{}:m.", s.prefix))
            .collect();
        // The in-process fallback store too: the next outage starts from the reset.
        self.local.delete_now(&keys);
        if !per_model.is_empty() {
            self.local.delete_identifier_now(&per_model, &tag);
        }
        // Per-model states first: finding them may scan (a single Redis has no index of
        // an identifier's keys), so it is the step likelier to fail, and then nothing is
        // reset. It waits as long as the scan takes, within `IDENTIFIER_SCAN_WAIT`, not
        // `store_timeout`: its time grows with the database, not with the identifier.
        if !per_model.is_empty() {
            let deleted = self.store.delete_identifier(per_model.clone(), tag.clone());
            with_timeout(self.store_timeout.max(IDENTIFIER_SCAN_WAIT), deleted).await?;
        }
        with_timeout(self.store_timeout, self.store.delete(keys.clone())).await?;
        if !refunds.is_empty() {
            with_timeout(self.store_timeout, self.store.adjust(&refunds, None)).await?;
        }
        // Charges of before the reset still queued for the store must not land after it
        // (dropped once the reset has landed: a reset that fails leaves them queued).
        let per_model = IdentifierKeys::new(per_model, &tag);
        self.queue
            .forget(|key| keys.iter().any(|k| k == key) || per_model.contains(key));
        // A denial cached while the delete was in flight is stale too.
        self.forget_denials(&tag);
        // Calls sleeping until their budget comes back: it just did.
        self.waiters.returned_all(&tag);
        Ok(())
    }

    /// Every limit's state for `identifier` (per-model limits for `model`, and only
    /// limits whose model filter matches it), read without taking anything.
    pub(crate) async fn usage(
        &self,
        identifier: &[u8],
        model: Option<&str>,
    ) -> Result<Vec<LimitUsage>, Error> {
        let tag = identifier_tag(identifier)?;
        let quotas = self.quotas_for(identifier).await;
        let plan = self.plan(&tag, model, quotas.as_deref(), None);
        let checks = plan
            .checks
            .iter()
            .map(|c| LimitCheck {
                cost: 0,
                take: false,
                slot: 0,
                ..c.clone()
            })
            .collect::<Vec<_>>();
        let decisions = with_timeout(self.store_timeout, self.store.acquire(&checks)).await?;
        Ok(plan
            .taken
            .iter()
            .zip(decisions)
            .map(|(t, d)| {
                let spec = &self.limits[t.limit];
                // A quota of 0 (a suspended identifier) keeps the configured rule in the
                // plan, but refuses every call: report it as the refusals do.
                let suspended = quotas.as_deref().and_then(|q| q.get(&spec.name)) == Some(0);
                let (limit, remaining, reset_after) = if suspended {
                    (0, 0, Duration::ZERO)
                } else {
                    (d.limit, d.remaining, d.reset_after)
                };
                LimitUsage {
                    name: spec.name.to_string(),
                    kind: spec.kind,
                    limit,
                    remaining,
                    reset_after,
                }
            })
            .collect())
    }
}

/// Wait mode's queues: one per budget (a limit's state key) that has calls waiting, so
/// calls waiting for one budget take their turns in arrival order.
pub(crate) struct Waiters {
    queues: Mutex<HashMap<String, Queue>>,
    /// How often units came back to the budgets of each slot (budgets by hash of their
    /// key). A budget's queue exists only while calls wait for it, so its wake-up signal
    /// cannot tell a call denied *before* it queued that units came back meanwhile (say
    /// a slot released while the call's acquire was in flight): the call compares this
    /// count, read before its acquire, instead.
    returns: Box<[AtomicU64]>,
    hasher: foldhash::fast::RandomState,
}

/// Slots of [`Waiters::returns`]: budgets sharing one only cost each other a retry.
const RETURN_SLOTS: usize = 1024;

/// How long a reset waits for the store to find and delete an identifier's per-model
/// states (a scan of the whole database on a single Redis: about a second per million
/// keys there).
const IDENTIFIER_SCAN_WAIT: Duration = Duration::from_secs(300);

impl Default for Waiters {
    fn default() -> Self {
        Self {
            queues: Mutex::default(),
            returns: (0..RETURN_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

/// One budget's queue: the FIFO lock whose holder is the call whose turn it is, and the
/// signal that wakes that call early when units come back to the budget through this
/// process (a refund, a released slot, a reset).
#[derive(Clone, Default)]
pub(crate) struct Queue {
    pub turn: Arc<tokio::sync::Mutex<()>>,
    pub returned: Arc<tokio::sync::Notify>,
}

impl Waiters {
    fn returns_slot(&self, key: &str) -> &AtomicU64 {
        use std::hash::BuildHasher;
        &self.returns[self.hasher.hash_one(key) as usize % RETURN_SLOTS]
    }

    /// How often units came back to budget `key` (or another of its slot) so far.
    pub(crate) fn returns_of(&self, key: &str) -> u64 {
        self.returns_slot(key).load(Ordering::SeqCst)
    }

    /// The queue of budget `key`, created if none.
    pub(crate) fn queue(&self, key: &str) -> Queue {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if queues.len() > 10_000 {
            queues.retain(|_, q| Arc::strong_count(&q.turn) > 1);
        }
        queues.entry(key.to_owned()).or_default().clone()
    }

    /// The first of `keys` whose budget has calls waiting (a new call then queues behind
    /// them), looked up under one lock.
    pub(crate) fn first_busy<'k>(
        &self,
        mut keys: impl Iterator<Item = &'k StateKey>,
    ) -> Option<&'k StateKey> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if queues.is_empty() {
            return None;
        }
        keys.find(|key| {
            queues
                .get(&***key)
                .is_some_and(|q| Arc::strong_count(&q.turn) > 1)
        })
    }

    /// Units came back to these budgets: wake the call whose turn it is in each (or, if
    /// it is not sleeping yet, let its sleep end at once).
    pub(crate) fn returned<'k>(&self, keys: impl Iterator<Item = &'k str> + Clone) {
        for key in keys.clone() {
            self.returns_slot(key).fetch_add(1, Ordering::SeqCst);
        }
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if queues.is_empty() {
            return;
        }
        for queue in keys.filter_map(|key| queues.get(key)) {
            queue.returned.notify_one();
        }
    }

    /// Every budget of identifier `tag` came back (a reset): wake their sleeping calls.
    pub(crate) fn returned_all(&self, tag: &str) {
        // Its keys (one per model, for per-model limits) are not known here: every slot
        // counts a return (a reset is rare; a call of another identifier denied meanwhile
        // only tries once more).
        for slot in &self.returns {
            slot.fetch_add(1, Ordering::SeqCst);
        }
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        // State keys end in `:{<tag>}` (see `state_key`).
        for (key, q) in queues.iter() {
            if let Some(rest) = key.strip_suffix('}')
                && let Some(rest) = rest.strip_suffix(tag)
                && rest.ends_with(":{")
            {
                q.returned.notify_one();
            }
        }
    }

    /// Drop budget `key`'s queue once nobody uses it.
    pub(crate) fn release(&self, key: &str) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if queues
            .get(key)
            .is_some_and(|q| Arc::strong_count(&q.turn) == 1)
        {
            queues.remove(key);
        }
    }
}
