//! `llm-gateway`: an OpenAI- and Anthropic-compatible rate-limiting proxy built on
//! `tower-llm-ratelimit`. See the README next to this crate.
//!
//! Modules by job: [`config`] (file, flags, checks), [`proxy`] (forwarding and
//! upstream credentials), [`keys`] (gateway-issued client keys), and, here, the routes
//! (`/healthz`, `/metrics`, `/admin/usage/{id}`, everything else forwarded), serving
//! with graceful shutdown, and reloads.

pub mod config;
pub mod keys;
pub mod proxy;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_llm_ratelimit::http::{HttpRatelimitLayer, RequestBody};
use tower_llm_ratelimit::identifier::{ApiKey, ExtractIdentifier, Header};
use tower_llm_ratelimit::{
    ConcurrencyLimit, FixedWindow, Limit, MemoryStore, Quotas, RatelimitLayer, RedisStore,
    SlidingWindow, StaticQuotas, Store, StoreErrorPolicy, TokenBucket, TokenCount, TokenMode,
};

use config::{Identity, Settings};
use keys::ClientName;
use proxy::{Api, GatewayBody, Upstream};

/// How the limiter identifies a request, per the configuration.
#[derive(Clone, Debug)]
pub enum Who {
    /// The hashed API key.
    ApiKey,
    /// A header set by a trusted proxy.
    Header(Header),
    /// The name of the gateway key the request authenticated with.
    KeyName,
}

impl<B> ExtractIdentifier<Request<B>> for Who {
    fn extract<'r>(&self, request: &'r Request<B>) -> Option<std::borrow::Cow<'r, [u8]>> {
        match self {
            Who::ApiKey => ApiKey.extract(request),
            Who::Header(h) => h.extract(request),
            Who::KeyName => request
                .extensions()
                .get::<ClientName>()
                .map(|n| std::borrow::Cow::Borrowed(n.0.as_bytes())),
        }
    }
}

/// What one configuration builds: the limiter and the keys. Replaced whole on reload.
pub struct Runtime {
    pub settings: Settings,
    pub limiter: HttpRatelimitLayer<Who>,
}

fn algorithm(
    spec: &config::LimitSpec,
) -> Result<tower_llm_ratelimit::Algorithm, tower_llm_ratelimit::Error> {
    Ok(match spec.algorithm.as_str() {
        "sliding" => SlidingWindow::new(spec.quota, spec.window)?.into(),
        // Starts full and refills the whole quota over one window.
        "bucket" => TokenBucket::new(spec.quota, spec.quota, spec.window)?.into(),
        _ => FixedWindow::new(spec.quota, spec.window)?.into(),
    })
}

/// Build the limiter for `settings` on `store` (the same store across reloads, so
/// counters survive them).
pub fn runtime(settings: Settings, store: Arc<dyn Store>) -> Result<Runtime, BoxError> {
    let policy = match settings.on_store_error.as_str() {
        "open" => StoreErrorPolicy::FailOpen,
        "local" => StoreErrorPolicy::Local,
        _ => StoreErrorPolicy::FailClosed,
    };
    let mut builder = RatelimitLayer::builder()
        .shared_store(store)
        .prefix(settings.prefix.clone())
        .group_states(settings.group_states)
        .on_store_error(policy)
        .store_timeout(settings.store_timeout)
        .include_output_tokens(settings.include_output_tokens)
        .token_mode(if settings.reserve {
            TokenMode::Reserve
        } else {
            TokenMode::CheckRemaining
        });
    for spec in &settings.limits {
        let mut limit = match spec.kind.as_str() {
            "requests" => Limit::requests(algorithm(spec)?),
            "tokens" => {
                let limit = Limit::tokens(algorithm(spec)?);
                match spec.count.as_str() {
                    "total" => limit.count(TokenCount::Total),
                    _ if settings.include_output_tokens => limit,
                    _ => limit.count(TokenCount::Prompt),
                }
            }
            _ => Limit::concurrency(ConcurrencyLimit::new(spec.quota, spec.window)?),
        };
        if spec.per_model {
            limit = limit.per_model();
        }
        if !spec.models.is_empty() {
            limit = limit.models(spec.models.clone());
        }
        builder = builder.limit(spec.name.clone(), limit);
    }
    let mut quotas = StaticQuotas::new();
    for (identifier, tier) in &settings.tier_of {
        if let Some(q) = settings.tiers.get(tier) {
            quotas = quotas.insert(
                identifier,
                q.iter().map(|(k, v)| (k.clone(), *v)).collect::<Quotas>(),
            );
        }
    }
    let who = if !settings.keys.is_empty() {
        Who::KeyName
    } else {
        match &settings.identity {
            Identity::ApiKey => Who::ApiKey,
            Identity::Header(h) => Who::Header(Header::try_new(h)?),
        }
    };
    let limiter = builder.quotas(quotas).identifier(who).build_http()?;
    Ok(Runtime { settings, limiter })
}

/// The store the settings name: Redis (or a cluster, with several comma-separated
/// URLs), or memory.
pub async fn store(settings: &Settings) -> Result<Arc<dyn Store>, BoxError> {
    Ok(match &settings.redis {
        None => Arc::new(MemoryStore::new()),
        Some(url) if url.contains(',') => {
            let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
            Arc::new(
                RedisStore::connect_cluster(&nodes, tower_llm_ratelimit::RedisOptions::default())
                    .await?,
            )
        }
        Some(url) => Arc::new(RedisStore::connect(url).await?),
    })
}

/// The Prometheus recorder of this process (installed once).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

/// The gateway service. Clones share the current runtime (swapped on reload).
#[derive(Clone)]
pub struct Gateway {
    runtime: Arc<RwLock<Arc<Runtime>>>,
    store: Arc<dyn Store>,
    upstream: Upstream,
    metrics: PrometheusHandle,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Gateway {
    /// Build the gateway for `settings`.
    pub async fn new(settings: Settings) -> Result<Self, BoxError> {
        let store = store(&settings).await?;
        let upstream = Upstream::new(&settings)?;
        let runtime = runtime(settings, store.clone())?;
        Ok(Self {
            runtime: Arc::new(RwLock::new(Arc::new(runtime))),
            store,
            upstream,
            metrics: prometheus(),
        })
    }

    /// The runtime in force.
    pub fn current(&self) -> Arc<Runtime> {
        self.runtime
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the keys, tiers and limits with those of `settings` (listen address,
    /// store and upstreams are not reloaded). Counters are kept: they live in the store.
    pub fn reload(&self, settings: Settings) -> Result<(), BoxError> {
        let runtime = runtime(settings, self.store.clone())?;
        *self.runtime.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(runtime);
        Ok(())
    }

    async fn health(&self) -> Response<GatewayBody> {
        let rt = self.current();
        let check = rt.limiter.usage("llm-gateway-healthz");
        match tokio::time::timeout(rt.settings.store_timeout, check).await {
            Ok(Ok(_)) => proxy::json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
            Ok(Err(e)) => proxy::json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "unavailable", "reason": proxy::error_chain(&e)})
                    .to_string(),
            ),
            Err(_) => proxy::json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "unavailable", "reason": "the store did not answer in time"}).to_string(),
            ),
        }
    }

    async fn admin(&self, request: Request<Incoming>) -> Response<GatewayBody> {
        let rt = self.current();
        let not_found = || {
            proxy::error(
                Api::OpenAi,
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route",
            )
        };
        let Some(token) = &rt.settings.admin_token else {
            return not_found();
        };
        let presented = keys::bearer(request.headers()).unwrap_or(b"");
        // Constant time: the comparison says nothing about how much of the token matched.
        let ok = presented.len() == token.len() && bool::from(presented.ct_eq(token.as_bytes()));
        if !ok {
            return proxy::error(
                Api::OpenAi,
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "admin token missing or wrong",
            );
        }
        let Some(identifier) = request.uri().path().strip_prefix("/admin/usage/") else {
            return not_found();
        };
        let identifier = percent_decode(identifier);
        match *request.method() {
            Method::GET => match rt.limiter.usage(&identifier).await {
                Ok(limits) => {
                    let limits: Vec<_> = limits
                        .iter()
                        .map(|l| {
                            serde_json::json!({"name": l.name, "kind": l.kind.as_str(), "limit": l.limit,
                                "remaining": l.remaining, "reset_ms": l.reset_after.as_millis() as u64})
                        })
                        .collect();
                    proxy::json(
                        StatusCode::OK,
                        serde_json::json!({"identifier": identifier, "limits": limits}).to_string(),
                    )
                }
                Err(e) => proxy::error(
                    Api::OpenAi,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    &proxy::error_chain(&e),
                ),
            },
            Method::DELETE => match rt.limiter.reset(&identifier).await {
                Ok(()) => {
                    let mut r = proxy::json(StatusCode::NO_CONTENT, String::new());
                    r.headers_mut().remove(http::header::CONTENT_TYPE);
                    r
                }
                Err(e) => proxy::error(
                    Api::OpenAi,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    &proxy::error_chain(&e),
                ),
            },
            _ => proxy::error(
                Api::OpenAi,
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "GET or DELETE",
            ),
        }
    }
}

/// `%XX` escapes decoded (identifiers in admin paths may be escaped).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (
                (bytes[i + 1] as char).to_digit(16),
                (bytes[i + 2] as char).to_digit(16),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Service<Request<Incoming>> for Gateway {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<GatewayBody>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let method = request.method().clone();
            if method == Method::GET && path == "/healthz" {
                return Ok(this.health().await);
            }
            if method == Method::GET && path == "/metrics" {
                let mut r = Response::new(
                    http_body_util::Full::new(Bytes::from(this.metrics.render()))
                        .map_err(|e| match e {})
                        .boxed_unsync(),
                );
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                return Ok(r);
            }
            if path.starts_with("/admin/") {
                return Ok(this.admin(request).await);
            }
            let rt = this.current();
            let api = Api::of(&path);
            if !rt.settings.keys.is_empty() {
                // Gateway keys: a listed key or nothing reaches the limiter or upstream.
                let client = keys::presented(request.headers())
                    .find_map(|k| keys::authenticate(&rt.settings.keys, k))
                    .map(|k| k.name.clone());
                let Some(name) = client else {
                    let kind = match api {
                        Api::OpenAi => "invalid_api_key",
                        Api::Anthropic => "authentication_error",
                    };
                    return Ok(proxy::error(
                        api,
                        StatusCode::UNAUTHORIZED,
                        kind,
                        "a gateway key is required (Authorization: Bearer or x-api-key)",
                    ));
                };
                request.extensions_mut().insert(ClientName(name));
            }
            if method != Method::POST {
                // Reads (GET /v1/models, …) pass through unmetered.
                let request = request.map(RequestBody::streaming);
                let mut upstream = this.upstream.clone();
                return upstream.call(request).await;
            }
            let service = rt.limiter.layer(this.upstream.clone());
            match service.oneshot(request).await {
                Ok(response) => Ok(response.map(|b| b.boxed_unsync())),
                Err(e) => match e {},
            }
        })
    }
}

/// Serve `gateway` on `listener` until `shutdown` resolves; then stop accepting, let
/// in-flight calls and streams finish (up to `grace`), and flush pending settlements.
/// Accept errors (too many open files, …) back off instead of spinning.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // SSE is many small writes: without NODELAY, Nagle + delayed ACKs stall them.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(gateway.clone());
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    tracing::info!(?grace, "shutting down: letting in-flight calls finish");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing the remaining connections");
    }
    let pending = gateway.current().limiter.flush(grace).await;
    if pending > 0 {
        tracing::error!(pending, "settlements not written before exit");
    }
}
