use std::sync::Arc;

use tower_layer::Layer;

use super::reliability::{Breaker, SettlementQueue, StoreErrorPolicy};
use super::{CostFn, HttpConfig, LimitConfig, Limits, MissingUsage, Ratelimited, TokenMode};
use crate::algorithm::{Algorithm, ConcurrencyLimit, MAX_UNITS};
use crate::error::Error;
use crate::identifier::FromRequest;
use crate::llm::Usage;
use crate::store::{MemoryStore, Store, identifier_tag, validate_prefix};

/// Applies [`Ratelimited`] to a service. Built with [`RatelimitLayer::builder`].
///
/// Clones share the limiter state (the same store and configuration).
pub struct RatelimitLayer<X = FromRequest> {
    limits: Arc<Limits>,
    extractor: X,
}

impl<X: Clone> Clone for RatelimitLayer<X> {
    fn clone(&self) -> Self {
        Self {
            limits: self.limits.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<X: std::fmt::Debug> std::fmt::Debug for RatelimitLayer<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RatelimitLayer")
            .field("requests", &self.limits.requests)
            .field("tokens", &self.limits.tokens)
            .field("token_mode", &self.limits.token_mode)
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
        self.limits.queue.len()
    }

    /// Settlements given up because the retry queue was full.
    pub fn dropped_settlements(&self) -> u64 {
        self.limits.queue.dropped()
    }

    /// Every configured limit's limit, remaining and reset for `identifier`, read without
    /// taking anything.
    pub async fn usage(
        &self,
        identifier: impl AsRef<[u8]>,
    ) -> Result<Vec<super::LimitUsage>, Error> {
        self.limits.usage(identifier.as_ref()).await
    }

    /// Give `identifier` a full budget on every limit (its state is deleted from the
    /// store, so every instance sees the reset) and drop its cached denials here.
    pub async fn reset(&self, identifier: impl AsRef<[u8]>) -> Result<(), Error> {
        self.limits.reset(identifier.as_ref()).await
    }

    /// Graceful shutdown: wait up to `deadline` for queued settlements to land. Returns
    /// how many are still pending (0: nothing was lost).
    pub async fn flush(&self, deadline: std::time::Duration) -> usize {
        self.limits.queue.flush(deadline).await
    }
}

impl<S, X: Clone> Layer<S> for RatelimitLayer<X> {
    type Service = Ratelimited<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        Ratelimited::new(inner, self.limits.clone(), self.extractor.clone())
    }
}

/// Everything a builder holds but the extractor (which sets its type).
struct Settings {
    store: Option<Arc<dyn Store>>,
    prefix: String,
    requests: Option<Algorithm>,
    tokens: Option<Algorithm>,
    concurrency: Option<Algorithm>,
    store_timeout: std::time::Duration,
    on_store_error: StoreErrorPolicy,
    queue_capacity: usize,
    cache_denials: bool,
    denial_cache_max_age: std::time::Duration,
    token_mode: TokenMode,
    include_output_tokens: bool,
    cost_fn: Option<CostFn>,
    missing_usage: MissingUsage,
    default_estimate: u64,
    fallback_identifier: Option<Vec<u8>>,
    http: HttpConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            store: None,
            prefix: "llm-ratelimit".to_owned(),
            requests: None,
            tokens: None,
            concurrency: None,
            store_timeout: std::time::Duration::from_secs(1),
            on_store_error: StoreErrorPolicy::default(),
            queue_capacity: 100_000,
            cache_denials: true,
            denial_cache_max_age: std::time::Duration::from_secs(1),
            token_mode: TokenMode::default(),
            include_output_tokens: false,
            cost_fn: None,
            missing_usage: MissingUsage::default(),
            default_estimate: 1,
            fallback_identifier: None,
            http: HttpConfig {
                usage_format: Arc::new(crate::http::OpenAiAnthropic),
                inject_stream_usage: true,
                max_request_body: 4 * 1024 * 1024,
            },
        }
    }
}

/// Configures a [`RatelimitLayer`]; [`build`](Self::build) checks the configuration.
#[must_use = "call .build() to get the layer"]
pub struct RatelimitLayerBuilder<X> {
    settings: Settings,
    extractor: X,
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

    /// Key prefix (default `llm-ratelimit`); the request limit's keys are
    /// `<prefix>:requests:{id}`, the token limit's `<prefix>:tokens:{id}`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
        self
    }

    /// Count requests: each call takes 1 before dispatch.
    pub fn request_limit(mut self, algorithm: impl Into<Algorithm>) -> Self {
        self.settings.requests = Some(algorithm.into());
        self
    }

    /// Count tokens: checked or reserved before dispatch ([`TokenMode`]), settled to the
    /// reported usage after.
    pub fn token_limit(mut self, algorithm: impl Into<Algorithm>) -> Self {
        self.settings.tokens = Some(algorithm.into());
        self
    }

    /// Limit calls in flight per identifier, taken in the same store operation as the
    /// other limits and released when the call ends (response, error, cancellation, end
    /// or drop of the response body), or when its lease runs out.
    pub fn concurrency_limit(mut self, limit: ConcurrencyLimit) -> Self {
        self.settings.concurrency = Some(limit.into());
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

    /// Remember identifiers denied by a limit that only time can lift (the request
    /// limit; the token limit in `CheckRemaining` mode) and deny them locally without
    /// asking the store (default on). An entry lives until the denial's `retry_after` or
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

    /// How the token limit is applied before a call (default
    /// [`TokenMode::CheckRemaining`]).
    pub fn token_mode(mut self, mode: TokenMode) -> Self {
        self.settings.token_mode = mode;
        self
    }

    /// Charge prompt + completion tokens instead of prompt tokens only.
    pub fn include_output_tokens(mut self, include: bool) -> Self {
        self.settings.include_output_tokens = include;
        self
    }

    /// Charge `f(&usage)` tokens instead (overrides `include_output_tokens`).
    pub fn cost_fn(mut self, f: impl Fn(&Usage) -> u64 + Send + Sync + 'static) -> Self {
        self.settings.cost_fn = Some(Arc::new(f));
        self
    }

    /// What to charge when a response reports no usage.
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
    pub fn usage_format(mut self, format: impl crate::http::UsageFormat) -> Self {
        self.settings.http.usage_format = Arc::new(format);
        self
    }

    /// HTTP: add `stream_options.include_usage=true` to streamed OpenAI requests that do
    /// not ask for usage, and remove the usage chunk from their response (default on).
    pub fn inject_stream_usage(mut self, inject: bool) -> Self {
        self.settings.http.inject_stream_usage = inject;
        self
    }

    /// HTTP: the largest request body the layer reads to estimate tokens (default
    /// 4 MiB); larger requests get `413 Payload Too Large`.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.settings.http.max_request_body = bytes;
        self
    }

    /// Build the layer for `http::Request` services (axum, hyper, tonic): denials become
    /// 429 responses (or gRPC statuses) and usage is read from response bodies.
    pub fn build_http(self) -> Result<crate::http::HttpRatelimitLayer<X>, Error> {
        let layer = self.build()?;
        Ok(crate::http::HttpRatelimitLayer::new(
            layer.limits,
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

    /// Check the configuration and build the layer. Fails if no limit is configured, the
    /// prefix is invalid, the default estimate is out of range, or the fallback
    /// identifier is invalid.
    pub fn build(self) -> Result<RatelimitLayer<X>, Error> {
        let s = self.settings;
        if s.requests.is_none() && s.tokens.is_none() && s.concurrency.is_none() {
            return Err(Error::invalid_input(
                "configure a request_limit, a token_limit or a concurrency_limit",
            ));
        }
        validate_prefix(&s.prefix)?;
        let requests_prefix = format!("{}:requests", s.prefix);
        let tokens_prefix = format!("{}:tokens", s.prefix);
        validate_prefix(&requests_prefix)?;
        validate_prefix(&tokens_prefix)?;
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
        let concurrency_prefix = format!("{}:inflight", s.prefix);
        let store = s.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        let limits = Limits {
            store_is_local: store.is_local(),
            store,
            concurrency: s.concurrency.map(|algorithm| LimitConfig {
                algorithm,
                prefix: concurrency_prefix,
            }),
            store_timeout: s.store_timeout,
            on_store_error: s.on_store_error,
            local: MemoryStore::new(),
            breaker: Breaker::new(std::time::Duration::from_secs(1)),
            queue: Arc::new(SettlementQueue::new(s.queue_capacity.max(1))),
            denied: s
                .cache_denials
                .then(|| super::denied::DeniedCache::new(s.denial_cache_max_age)),
            requests: s.requests.map(|algorithm| LimitConfig {
                algorithm,
                prefix: requests_prefix,
            }),
            tokens: s.tokens.map(|algorithm| LimitConfig {
                algorithm,
                prefix: tokens_prefix,
            }),
            token_mode: s.token_mode,
            include_output_tokens: s.include_output_tokens,
            cost_fn: s.cost_fn,
            missing_usage: s.missing_usage,
            default_estimate: s.default_estimate,
            fallback_identifier: s.fallback_identifier,
            http: s.http,
        };
        Ok(RatelimitLayer {
            limits: Arc::new(limits),
            extractor: self.extractor,
        })
    }
}
