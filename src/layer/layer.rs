use std::sync::Arc;

use tower_layer::Layer;

use super::Ratelimited;
use crate::algorithm::{Algorithm, ConcurrencyLimit, MAX_UNITS};
use crate::engine::limit::{Limit, LimitKind, LimitSpec};
use crate::engine::quota::QuotaResolver;
use crate::engine::reliability::{Breaker, SettlementQueue, StoreErrorPolicy};
use crate::engine::{CostFn, Engine, LimitGroup, LimitUsage, MissingUsage, TokenMode, Waiters};
use crate::error::Error;
use crate::identifier::FromRequest;
use crate::llm::Usage;
use crate::store::{MemoryStore, Store, identifier_tag, validate_prefix};

/// Applies [`Ratelimited`] to a service. Built with [`RatelimitLayer::builder`].
///
/// Clones share the limiter state (the same store and configuration).
pub struct RatelimitLayer<X = FromRequest> {
    engine: Arc<Engine>,
    extractor: X,
}

impl<X: Clone> Clone for RatelimitLayer<X> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<X: std::fmt::Debug> std::fmt::Debug for RatelimitLayer<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RatelimitLayer")
            .field("engine", &self.engine)
            .field("extractor", &self.extractor)
            .finish_non_exhaustive()
    }
}

impl RatelimitLayer<FromRequest> {
    /// Start configuring a layer. Defaults: in-memory store, key prefix
    /// `llm-ratelimit`, identifiers from the request ([`FromRequest`]),
    /// [`TokenMode::CheckRemaining`], prompt tokens only, [`MissingUsage::ChargeReservation`].
    pub fn builder() -> RatelimitLayerBuilder<FromRequest> {
        RatelimitLayerBuilder {
            settings: Settings::default(),
            extractor: FromRequest,
        }
    }
}

impl<X> RatelimitLayer<X> {
    /// Settlements waiting for the store to come back.
    pub fn pending_settlements(&self) -> usize {
        self.engine.queue.len()
    }

    /// Settlements given up because the retry queue was full.
    pub fn dropped_settlements(&self) -> u64 {
        self.engine.queue.dropped()
    }

    /// Every configured limit's limit, remaining and reset for `identifier`, read without
    /// taking anything.
    pub async fn usage(&self, identifier: impl AsRef<[u8]>) -> Result<Vec<LimitUsage>, Error> {
        self.engine.usage(identifier.as_ref(), None).await
    }

    /// As [`usage`](Self::usage), for calls of `model`: per-model limits are read for
    /// that model, and limits with a model filter only if it matches.
    pub async fn usage_for_model(
        &self,
        identifier: impl AsRef<[u8]>,
        model: &str,
    ) -> Result<Vec<LimitUsage>, Error> {
        self.engine.usage(identifier.as_ref(), Some(model)).await
    }

    /// Give `identifier` a full budget on the limit named `limit` (for every model),
    /// and drop its cached denials and the charges of that limit still queued here for a
    /// store that failed them.
    pub async fn reset_limit(
        &self,
        identifier: impl AsRef<[u8]>,
        limit: &str,
    ) -> Result<(), Error> {
        self.engine.reset(identifier.as_ref(), Some(limit)).await
    }

    /// Give `identifier` a full budget on every limit and every model (its state is
    /// deleted from the store, so every instance sees the reset, and from this
    /// instance's fallback store) and drop its cached denials and its charges still
    /// queued here for a store that failed them (other instances drop their cached
    /// denials within their denial-cache max age). Fails with the store's error, or a
    /// timeout after `store_timeout`; finding the states of per-model limits may take
    /// longer (on a single Redis it scans the database, about a second per million keys,
    /// and waits up to five minutes for it), and is done first, so that a reset that
    /// fails there has reset nothing.
    pub async fn reset(&self, identifier: impl AsRef<[u8]>) -> Result<(), Error> {
        self.engine.reset(identifier.as_ref(), None).await
    }

    /// Graceful shutdown: wait up to `deadline` for queued settlements to land. Returns
    /// how many are still pending (0: nothing was lost).
    pub async fn flush(&self, deadline: std::time::Duration) -> usize {
        self.engine.queue.flush(deadline).await
    }
}

impl<S, X: Clone> Layer<S> for RatelimitLayer<X> {
    type Service = Ratelimited<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        Ratelimited::new(inner, self.engine.clone(), self.extractor.clone())
    }
}

/// Everything a builder holds but the extractor (which sets its type).
struct Settings {
    store: Option<Arc<dyn Store>>,
    prefix: String,
    limits: Vec<(String, Limit)>,
    store_timeout: std::time::Duration,
    on_store_error: StoreErrorPolicy,
    queue_capacity: usize,
    cache_denials: bool,
    group_states: bool,
    denial_cache_max_age: std::time::Duration,
    token_mode: TokenMode,
    include_output_tokens: bool,
    cost_fn: Option<CostFn>,
    missing_usage: MissingUsage,
    default_estimate: u64,
    fallback_identifier: Option<Vec<u8>>,
    quotas: Option<Arc<dyn QuotaResolver>>,
    quota_timeout: std::time::Duration,
    wait_up_to: Option<std::time::Duration>,
    #[cfg(feature = "http")]
    http: crate::http::HttpConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            store: None,
            prefix: "llm-ratelimit".to_owned(),
            limits: Vec::new(),
            store_timeout: std::time::Duration::from_secs(1),
            on_store_error: StoreErrorPolicy::default(),
            queue_capacity: 100_000,
            cache_denials: true,
            group_states: true,
            denial_cache_max_age: std::time::Duration::from_secs(1),
            token_mode: TokenMode::default(),
            include_output_tokens: false,
            cost_fn: None,
            missing_usage: MissingUsage::default(),
            default_estimate: 1,
            fallback_identifier: None,
            quotas: None,
            quota_timeout: std::time::Duration::from_secs(1),
            wait_up_to: None,
            #[cfg(feature = "http")]
            http: crate::http::HttpConfig::default(),
        }
    }
}

/// Configures a [`RatelimitLayer`]; [`build`](Self::build) checks the configuration.
#[must_use = "call .build() to get the layer"]
pub struct RatelimitLayerBuilder<X> {
    settings: Settings,
    extractor: X,
}

impl<X> std::fmt::Debug for RatelimitLayerBuilder<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RatelimitLayerBuilder")
            .field("limits", &self.settings.limits)
            .finish_non_exhaustive()
    }
}

impl<X> RatelimitLayerBuilder<X> {
    /// Keep state in `store` (default: a new [`MemoryStore`]).
    pub fn store(mut self, store: impl Store) -> Self {
        self.settings.store = Some(Arc::new(store));
        self
    }

    /// Keep state in a store already behind an `Arc`.
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.settings.store = Some(store);
        self
    }

    /// Key prefix (default `llm-ratelimit`); limit `name`'s keys are
    /// `<prefix>:<name>:{<identifier>}` (per-model limits:
    /// `<prefix>:<name>:m.<model>:{<identifier>}`). On Redis, a layer's identifier-wide
    /// limits share one value per identifier instead (see
    /// [`group_states`](Self::group_states)).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
        self
    }

    /// Keep the states of the limits every call has (rate limits with no model filter
    /// and not per model) in one value per identifier on Redis (default on, when there
    /// are at least two of them, no concurrency limit and at most eight limits in all):
    /// `<prefix>:+<16 hex digits>:{<identifier>}`, the hex digits a fingerprint of those
    /// limits' names in order. A call then reads and writes one key for all of them, so
    /// four limits cost Redis about as much as two.
    ///
    /// Decisions are the same either way but in one case: after an identifier's quota
    /// on a token bucket is lowered, a key of its own can expire on the TTL the higher
    /// refill gave it and forget what was used, where the shared value keeps it until
    /// the bucket has refilled at the new rate. Turn it off to keep a key per limit, as
    /// releases before this one did: to run this release beside those during a rolling
    /// upgrade (they count apart otherwise), or to read a limit through a separate
    /// [`Ratelimit`](crate::Ratelimit) on its key. Adding, removing, renaming or
    /// reordering those limits changes the fingerprint: their counts start afresh (a
    /// changed quota keeps them). Two layers on one prefix share a limit only if both
    /// group it the same way or neither does. The memory store and custom stores keep a
    /// state per limit whatever this says.
    pub fn group_states(mut self, group: bool) -> Self {
        self.settings.group_states = group;
        self
    }

    /// Add the limit `limit` under `name` (unique; it appears in errors, headers,
    /// metrics and keys: 1 to 64 bytes of letters, digits, `_`, `.` or `-`). Every
    /// limit that applies to a call is taken in one atomic store operation.
    pub fn limit(mut self, name: impl Into<String>, limit: Limit) -> Self {
        self.settings.limits.push((name.into(), limit));
        self
    }

    /// Shorthand for `.limit("requests", Limit::requests(algorithm))`: each call takes 1.
    pub fn request_limit(self, algorithm: impl Into<Algorithm>) -> Self {
        self.limit("requests", Limit::requests(algorithm))
    }

    /// Shorthand for `.limit("tokens", Limit::tokens(algorithm))`: checked or reserved
    /// before dispatch ([`TokenMode`]), settled to the reported usage after.
    pub fn token_limit(self, algorithm: impl Into<Algorithm>) -> Self {
        self.limit("tokens", Limit::tokens(algorithm))
    }

    /// Shorthand for `.limit("concurrency", Limit::concurrency(limit))`: calls in flight
    /// per identifier, taken in the same store operation as the other limits and
    /// released when the call ends (response, error, cancellation, end or drop of the
    /// response body), or when its lease runs out (leases of running calls are renewed).
    pub fn concurrency_limit(self, limit: ConcurrencyLimit) -> Self {
        self.limit("concurrency", Limit::concurrency(limit))
    }

    /// Per-identifier quotas (tiers, overrides) by limit name, asked before every call;
    /// a changed quota applies on the identifier's next call and keeps what was used.
    pub fn quotas(mut self, resolver: impl QuotaResolver) -> Self {
        self.settings.quotas = Some(Arc::new(resolver));
        self
    }

    /// The longest a call (or [`usage`](RatelimitLayer::usage)) waits for the quota
    /// resolver's answer (default 1 s); beyond it, the configured quotas apply, with a
    /// warning. [`CachedQuotas`](crate::CachedQuotas) bounds its lookups itself, more
    /// gently (see its docs).
    pub fn quota_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.settings.quota_timeout = timeout;
        self
    }

    /// Wait mode: a denied call whose budget comes back within `bound` (from when the
    /// call arrived) sleeps until then and tries again, instead of failing. Calls of
    /// one identifier that wait for the same budget (one limit of the identifier, or of
    /// the identifier and model) take their turns in arrival order within this process,
    /// whatever model they name; a call whose budgets are free does not wait behind calls
    /// waiting for another budget. A call whose wait would exceed the bound fails at
    /// once. Dropping a waiting call leaves nothing behind.
    pub fn wait_up_to(mut self, bound: std::time::Duration) -> Self {
        self.settings.wait_up_to = Some(bound);
        self
    }

    /// What calls do when the store fails or is slower than the store timeout (default
    /// [`StoreErrorPolicy::FailClosed`]).
    pub fn on_store_error(mut self, policy: StoreErrorPolicy) -> Self {
        self.settings.on_store_error = policy;
        self
    }

    /// The longest a store call may take before it counts as failed (default 1 s).
    pub fn store_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.settings.store_timeout = timeout;
        self
    }

    /// Settlements kept for retry while the store is down (default 100 000); beyond,
    /// new ones are dropped with an error log.
    pub fn settlement_queue_capacity(mut self, capacity: usize) -> Self {
        self.settings.queue_capacity = capacity;
        self
    }

    /// Remember identifiers denied by a limit that only time can lift (request limits;
    /// token limits in `CheckRemaining` mode) and deny them locally without asking the
    /// store (default on). An entry lives until the denial's `retry_after` or
    /// [`denial_cache_max_age`](Self::denial_cache_max_age), whichever is sooner, and
    /// is dropped at once by a [`reset`](RatelimitLayer::reset) or refund made through
    /// this layer.
    pub fn cache_denials(mut self, cache: bool) -> Self {
        self.settings.cache_denials = cache;
        self
    }

    /// The longest a cached denial is used (default 1 s): a reset or refund made by
    /// another process (another instance, an admin tool) shows within this time.
    pub fn denial_cache_max_age(mut self, max_age: std::time::Duration) -> Self {
        self.settings.denial_cache_max_age = max_age;
        self
    }

    /// How token limits are applied before a call (default
    /// [`TokenMode::CheckRemaining`]).
    pub fn token_mode(mut self, mode: TokenMode) -> Self {
        self.settings.token_mode = mode;
        self
    }

    /// Token limits without their own [`TokenCount`](crate::TokenCount) charge prompt +
    /// completion tokens instead of prompt tokens only.
    pub fn include_output_tokens(mut self, include: bool) -> Self {
        self.settings.include_output_tokens = include;
        self
    }

    /// Token limits without their own [`TokenCount`](crate::TokenCount) charge
    /// `f(&usage)` (overrides `include_output_tokens`).
    pub fn cost_fn(mut self, f: impl Fn(&Usage) -> u64 + Send + Sync + 'static) -> Self {
        self.settings.cost_fn = Some(Arc::new(f));
        self
    }

    /// What to charge when a complete response reports no usage.
    pub fn missing_usage(mut self, policy: MissingUsage) -> Self {
        self.settings.missing_usage = policy;
        self
    }

    /// The reservation for requests that cannot estimate themselves, in `Reserve` mode
    /// (default 1).
    pub fn default_estimate(mut self, tokens: u64) -> Self {
        self.settings.default_estimate = tokens;
        self
    }

    /// Use this identifier for requests that carry none, instead of failing them with
    /// [`Error::MissingIdentifier`].
    pub fn fallback_identifier(mut self, identifier: impl AsRef<[u8]>) -> Self {
        self.settings.fallback_identifier = Some(identifier.as_ref().to_vec());
        self
    }

    /// HTTP: how usage is read from response bodies (default
    /// [`OpenAiAnthropic`](crate::http::OpenAiAnthropic)).
    #[cfg(feature = "http")]
    pub fn usage_format(mut self, format: impl crate::http::UsageFormat) -> Self {
        self.settings.http.usage_format = Arc::new(format);
        self
    }

    /// HTTP: add `stream_options.include_usage=true` to streamed OpenAI requests that do
    /// not ask for usage, and remove the usage chunk from their response (default on).
    #[cfg(feature = "http")]
    pub fn inject_stream_usage(mut self, inject: bool) -> Self {
        self.settings.http.inject_stream_usage = inject;
        self
    }

    /// HTTP: the largest request body the layer reads (default 4 MiB), decoded if it is
    /// compressed (gzip, deflate, br or zstd). The layer reads the body of a JSON `POST`
    /// for its estimate and its model. A request whose body the call needs (an estimate
    /// in [`TokenMode::Reserve`], or limits that depend on the model) and that is larger
    /// gets `413 Payload Too Large` (an encoding the layer cannot read: `415`; a body that
    /// does not decode: `400`); otherwise a larger body passes through uninspected.
    #[cfg(feature = "http")]
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.settings.http.max_request_body = bytes;
        self
    }

    /// Build the layer for `http::Request` services (axum, hyper, tonic): denials become
    /// 429 responses (or gRPC statuses) and usage is read from response bodies.
    #[cfg(feature = "http")]
    pub fn build_http(mut self) -> Result<crate::http::HttpRatelimitLayer<X>, Error> {
        let http = std::mem::take(&mut self.settings.http);
        let layer = self.build()?;
        Ok(crate::http::HttpRatelimitLayer::new(
            layer.engine,
            Arc::new(http),
            layer.extractor,
        ))
    }

    /// Take identifiers with `extractor` (see [`crate::identifier`]).
    pub fn identifier<Y>(self, extractor: Y) -> RatelimitLayerBuilder<Y> {
        RatelimitLayerBuilder {
            settings: self.settings,
            extractor,
        }
    }

    /// Check the configuration and build the layer. Fails, naming the problem, if no
    /// limit is configured, two limits share a name, a limit or the prefix is invalid,
    /// a setting would do nothing (`Reserve` or `include_output_tokens` without a token
    /// limit), the default estimate is out of range, or the fallback identifier is
    /// invalid.
    pub fn build(self) -> Result<RatelimitLayer<X>, Error> {
        let s = self.settings;
        if s.limits.is_empty() {
            return Err(Error::invalid_input(
                "configure at least one limit (limit, request_limit, token_limit or concurrency_limit)",
            ));
        }
        validate_prefix(&s.prefix)?;
        let mut limits: Vec<LimitSpec> = Vec::with_capacity(s.limits.len());
        for (name, limit) in s.limits {
            if limits.iter().any(|l| *l.name == *name) {
                return Err(Error::invalid_input(format!(
                    "limit {name:?} is configured twice; give each limit its own name"
                )));
            }
            limits.push(LimitSpec::new(&name, limit, &s.prefix)?);
        }
        let has_tokens = limits.iter().any(|l| l.kind == LimitKind::Tokens);
        if !has_tokens && s.token_mode == TokenMode::Reserve {
            return Err(Error::invalid_input(
                "token_mode(Reserve) without a token limit would do nothing",
            ));
        }
        if !has_tokens && (s.include_output_tokens || s.cost_fn.is_some()) {
            return Err(Error::invalid_input(
                "include_output_tokens / cost_fn without a token limit would do nothing",
            ));
        }
        if s.default_estimate > MAX_UNITS {
            return Err(Error::invalid_input(format!(
                "default estimate {} is more than the maximum of {MAX_UNITS}",
                s.default_estimate
            )));
        }
        if let Some(id) = &s.fallback_identifier {
            identifier_tag(id)?;
        }
        if s.store_timeout.is_zero() {
            return Err(Error::invalid_input("store timeout must be more than zero"));
        }
        if s.quota_timeout.is_zero() {
            return Err(Error::invalid_input("quota timeout must be more than zero"));
        }
        let store = s.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        let engine = Engine {
            store,
            group: s
                .group_states
                .then(|| LimitGroup::of(&limits, &s.prefix))
                .flatten(),
            limits,
            store_timeout: s.store_timeout,
            on_store_error: s.on_store_error,
            local: MemoryStore::new(),
            breaker: Breaker::new(std::time::Duration::from_secs(1)),
            queue: Arc::new(SettlementQueue::new(s.queue_capacity.max(1))),
            denied: s
                .cache_denials
                .then(|| crate::engine::denied::DeniedCache::new(s.denial_cache_max_age)),
            token_mode: s.token_mode,
            include_output_tokens: s.include_output_tokens,
            cost_fn: s.cost_fn,
            missing_usage: s.missing_usage,
            default_estimate: s.default_estimate,
            fallback_identifier: s.fallback_identifier,
            quotas: s.quotas,
            quota_timeout: s.quota_timeout,
            wait_up_to: s.wait_up_to,
            waiters: Waiters::default(),
        };
        Ok(RatelimitLayer {
            engine: Arc::new(engine),
            extractor: self.extractor,
        })
    }
}
