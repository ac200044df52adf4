//! An OpenAI-compatible rate-limiting proxy.
//!
//! ```sh
//! cargo run --example gateway                      # built-in mock upstream, in-memory store
//! cargo run --example gateway -- --upstream http://127.0.0.1:9000/v1 \
//!     --redis redis://127.0.0.1:6379/ --requests 10 --tokens 1000 --reserve
//! ```
//!
//! Flags: `--listen ADDR` (default 127.0.0.1:8080), `--upstream URL` (omit for the
//! built-in mock upstream), `--redis URL` (omit for in-memory), `--requests N`,
//! `--tokens N`, `--window SECS` (default 60), `--algorithm fixed|sliding|bucket`,
//! `--include-output-tokens`, `--reserve`, `--identifier-header NAME` (default
//! `x-user-id`; requests without it are identified by their hashed API key),
//! `--on-store-error closed|open|local`, `--prefix P`, `--upstream-ca PEM` (trust this CA
//! for an `https://` upstream instead of the web PKI roots), `--concurrency N` (calls in
//! flight per identifier, held until the response body ends).
//!
//! Forwards `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and
//! `/v1/messages`, streamed or not, without buffering streams; passes the client's
//! headers and the upstream's status codes through.
#![allow(dead_code)] // tests include this file as a module and use parts of it

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::{ConfigBuilderExt, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::{BoxError, Layer, Service};
use tower_llm_ratelimit::http::{HttpRatelimited, RatelimitBody, RequestBody};
use tower_llm_ratelimit::identifier::{ApiKey, Header, Or};
use tower_llm_ratelimit::{
    Algorithm, ConcurrencyLimit, FixedWindow, MemoryStore, RatelimitLayer, RedisStore,
    SlidingWindow, Store, StoreErrorPolicy, TokenBucket, TokenMode,
};

/// The gateway's command line.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: Option<String>,
    pub redis: Option<String>,
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
    pub window: u64,
    pub algorithm: String,
    pub include_output_tokens: bool,
    pub reserve: bool,
    pub identifier_header: String,
    pub on_store_error: String,
    pub prefix: String,
    pub upstream_ca: Option<String>,
    pub concurrency: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().unwrap(),
            upstream: None,
            redis: None,
            requests: None,
            tokens: None,
            window: 60,
            algorithm: "fixed".into(),
            include_output_tokens: false,
            reserve: false,
            identifier_header: "x-user-id".into(),
            on_store_error: "closed".into(),
            prefix: "gateway".into(),
            upstream_ca: None,
            concurrency: None,
        }
    }
}

const USAGE: &str = "usage: gateway [--listen ADDR] [--upstream URL] [--redis URL] [--requests N] \
[--tokens N] [--window SECS] [--algorithm fixed|sliding|bucket] [--include-output-tokens] \
[--reserve] [--identifier-header NAME] [--on-store-error closed|open|local] [--prefix P] \
[--upstream-ca PEM] [--concurrency N]";

/// Parse the flags (not the program name).
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Config, String> {
    let mut config = Config::default();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        let number = |v: String, flag: &str| {
            v.parse::<u64>()
                .map_err(|e| format!("{flag}: {v:?} is not a whole number: {e}"))
        };
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                config.listen = v.parse().map_err(|e| format!("--listen {v:?}: {e}"))?;
            }
            "--upstream" => config.upstream = Some(value()?),
            "--redis" => config.redis = Some(value()?),
            "--requests" => config.requests = Some(number(value()?, "--requests")?),
            "--tokens" => config.tokens = Some(number(value()?, "--tokens")?),
            "--window" => config.window = number(value()?, "--window")?,
            "--algorithm" => config.algorithm = value()?,
            "--include-output-tokens" => config.include_output_tokens = true,
            "--reserve" => config.reserve = true,
            "--identifier-header" => config.identifier_header = value()?,
            "--on-store-error" => config.on_store_error = value()?,
            "--prefix" => config.prefix = value()?,
            "--upstream-ca" => config.upstream_ca = Some(value()?),
            "--concurrency" => config.concurrency = Some(number(value()?, "--concurrency")?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other:?}\n{USAGE}")),
        }
    }
    if !["closed", "open", "local"].contains(&config.on_store_error.as_str()) {
        return Err(format!(
            "--on-store-error must be closed, open or local, not {:?}",
            config.on_store_error
        ));
    }
    Ok(config)
}

fn algorithm(config: &Config, limit: u64) -> Result<Algorithm, BoxError> {
    let window = Duration::from_secs(config.window);
    Ok(match config.algorithm.as_str() {
        "fixed" => FixedWindow::new(limit, window)?.into(),
        "sliding" => SlidingWindow::new(limit, window)?.into(),
        // Starts full and refills the whole quota over one window.
        "bucket" => TokenBucket::new(limit, limit, window)?.into(),
        other => {
            return Err(
                format!("--algorithm must be fixed, sliding or bucket, not {other:?}").into(),
            );
        }
    })
}

pub type GatewayBody = BoxBody<Bytes, BoxError>;

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<GatewayBody> {
    let mut response = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    response
}

fn json_error(status: StatusCode, message: &str) -> Response<GatewayBody> {
    let body = json!({"error": {"message": message, "type": "gateway_error", "param": null, "code": null}});
    full(status, "application/json", body.to_string())
}

/// A body fed from a channel: how the mock streams SSE with real delays.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn text_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(a) => a.iter().map(text_bytes).sum(),
        Value::Object(o) => o.values().map(text_bytes).sum(),
        _ => 0,
    }
}

/// The mock upstream's answer to one request: OpenAI chat/completions/embeddings and
/// Anthropic messages, JSON or SSE, with realistic usage (prompt = text / 4 + 10,
/// completion = 20 or `max_tokens` if smaller).
///
/// Test knobs (request headers): `x-mock-chunk-bytes: N` sends the body in N-byte
/// frames; `x-mock-delay-ms: N` waits between frames; `x-mock-status: CODE` with
/// `x-mock-raw: TEXT` answers that status and raw text instead. The response header
/// `x-mock-saw-include-usage` says whether the request asked for streamed usage.
pub async fn mock_upstream<B>(request: Request<B>) -> Response<GatewayBody>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let (Some(status), Some(raw)) = (header("x-mock-status"), header("x-mock-raw")) {
        let status = status
            .parse()
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let content_type = if raw.starts_with('{') {
            "application/json"
        } else {
            "text/plain"
        };
        return full(status, content_type, raw);
    }
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("bad body: {e}")),
    };
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = parts.uri.path().to_owned();
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    let prompt_text: u64 = ["messages", "prompt", "input", "system"]
        .iter()
        .filter_map(|k| request.get(*k))
        .map(text_bytes)
        .sum();
    let prompt_tokens = prompt_text.div_ceil(4) + 10;
    let max = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| request.get(*k).and_then(Value::as_u64))
        .unwrap_or(u64::MAX);
    let completion_tokens = 20.min(max);
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let words = ["Hello", " from", " the", " mock", " upstream."];

    let (content_type, payload): (&'static str, String) = if path.ends_with("/embeddings") {
        let v = json!({"object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}});
        ("application/json", v.to_string())
    } else if path.ends_with("/messages") {
        if stream {
            let mut s = String::new();
            let mut event =
                |name: &str, data: Value| s.push_str(&format!("event: {name}\ndata: {data}\n\n"));
            event(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant", "content": [], "model": model, "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": prompt_tokens, "output_tokens": 1}}}),
            );
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            );
            for w in words {
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
                );
            }
            event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            );
            event(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": completion_tokens}}),
            );
            event("message_stop", json!({"type": "message_stop"}));
            ("text/event-stream", s)
        } else {
            let v = json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": words.concat()}], "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}});
            ("application/json", v.to_string())
        }
    } else {
        let chat = path.ends_with("/chat/completions");
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
        if stream {
            let object = if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let mut s = String::new();
            let mut chunk = |choices: Value, usage: Option<Value>| {
                let mut c = json!({"id": "chatcmpl-mock", "object": object, "created": 0, "model": model, "choices": choices});
                if include_usage {
                    c["usage"] = usage.unwrap_or(Value::Null);
                }
                s.push_str(&format!("data: {c}\n\n"));
            };
            for (i, w) in words.iter().enumerate() {
                let choice = if chat {
                    let mut delta = json!({"content": w});
                    if i == 0 {
                        delta["role"] = json!("assistant");
                    }
                    json!([{"index": 0, "delta": delta, "finish_reason": null}])
                } else {
                    json!([{"index": 0, "text": w, "finish_reason": null}])
                };
                chunk(choice, None);
            }
            let last = if chat {
                json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            } else {
                json!([{"index": 0, "text": "", "finish_reason": "stop"}])
            };
            chunk(last, None);
            if include_usage {
                chunk(json!([]), Some(usage));
            }
            s.push_str("data: [DONE]\n\n");
            ("text/event-stream", s)
        } else if chat {
            let v = json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": words.concat()}, "finish_reason": "stop"}],
                "usage": usage});
            ("application/json", v.to_string())
        } else {
            let v = json!({"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": model,
                "choices": [{"index": 0, "text": words.concat(), "finish_reason": "stop"}], "usage": usage});
            ("application/json", v.to_string())
        }
    };

    let chunk_bytes: usize = header("x-mock-chunk-bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let delay_ms: u64 = header("x-mock-delay-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let streamed = content_type == "text/event-stream" || chunk_bytes > 0;
    let mut response = if streamed {
        // Event by event (or N bytes at a time), with the delay between frames.
        let frames: Vec<Bytes> = if chunk_bytes > 0 {
            payload
                .as_bytes()
                .chunks(chunk_bytes)
                .map(Bytes::copy_from_slice)
                .collect()
        } else {
            payload
                .split_inclusive("\n\n")
                .map(|e| Bytes::copy_from_slice(e.as_bytes()))
                .collect()
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for frame in frames {
                if delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
                if tx.send(frame).await.is_err() {
                    return; // the client went away
                }
            }
        });
        let mut r = Response::new(ChannelBody(rx).boxed());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
        r
    } else {
        full(StatusCode::OK, content_type, payload)
    };
    response.headers_mut().insert(
        "x-mock-saw-include-usage",
        HeaderValue::from_static(if include_usage { "true" } else { "false" }),
    );
    response
}

/// Where allowed requests go: the built-in mock, or an upstream over HTTP.
#[derive(Clone)]
pub enum Upstream {
    Mock,
    Proxy {
        client: Arc<Client<HttpsConnector<HttpConnector>, RequestBody<Incoming>>>,
        base: String,
    },
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl Service<Request<RequestBody<Incoming>>> for Upstream {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<GatewayBody>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody<Incoming>>) -> Self::Future {
        match self.clone() {
            Upstream::Mock => Box::pin(async move { Ok(mock_upstream(request).await) }),
            Upstream::Proxy { client, base } => Box::pin(async move {
                let (mut parts, body) = request.into_parts();
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                // A base ending in /v1 takes request paths that start with /v1 once.
                let path = match base.ends_with("/v1") {
                    true => path.strip_prefix("/v1").unwrap_or(path),
                    false => path,
                };
                let uri: Uri = match format!("{base}{path}").parse() {
                    Ok(u) => u,
                    Err(e) => {
                        return Ok(json_error(
                            StatusCode::BAD_GATEWAY,
                            &format!("bad upstream URL: {e}"),
                        ));
                    }
                };
                for h in HOP_BY_HOP {
                    parts.headers.remove(h);
                }
                parts.headers.remove(http::header::HOST);
                parts.uri = uri;
                match client.request(Request::from_parts(parts, body)).await {
                    Ok(response) => {
                        let (mut parts, body) = response.into_parts();
                        for h in HOP_BY_HOP {
                            parts.headers.remove(h);
                        }
                        Ok(Response::from_parts(
                            parts,
                            body.map_err(BoxError::from).boxed(),
                        ))
                    }
                    Err(e) => Ok(json_error(
                        StatusCode::BAD_GATEWAY,
                        &format!("upstream request failed: {}", error_chain(&e)),
                    )),
                }
            }),
        }
    }
}

/// An error and its causes, `: `-separated (hyper's own message is just "client error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The gateway service: the four LLM routes, rate-limited; anything else is a 404.
#[derive(Clone)]
pub struct Gateway {
    limited: HttpRatelimited<Upstream, Or<Header, ApiKey>>,
}

const ROUTES: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
];

impl Service<Request<Incoming>> for Gateway {
    type Response = Response<RatelimitBody<GatewayBody>>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        if request.method() != Method::POST || !ROUTES.contains(&request.uri().path()) {
            let body = json!({"error": {"message": "no such route", "type": "invalid_request_error", "param": null, "code": null}});
            let mut response = Response::new(RatelimitBody::full(body.to_string()));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Box::pin(async move { Ok(response) });
        }
        Box::pin(self.limited.call(request))
    }
}

/// `http://` and `https://` upstreams: TLS verified against the web PKI roots, or only
/// against `--upstream-ca` when given (a private CA, or a test's self-signed cert).
fn https_connector(config: &Config) -> Result<HttpsConnector<HttpConnector>, BoxError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let mut http = HttpConnector::new();
    // SSE is many small writes: without NODELAY, Nagle + delayed ACKs stall them.
    http.set_nodelay(true);
    http.enforce_http(false);
    let tls = match &config.upstream_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("--upstream-ca {path}: {e}"))?
            {
                roots.add(cert.map_err(|e| format!("--upstream-ca {path}: {e}"))?)?;
            }
            ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
        None => ClientConfig::builder()
            .with_webpki_roots()
            .with_no_client_auth(),
    };
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http))
}

/// Build the gateway service from its configuration.
pub async fn build(config: &Config) -> Result<Gateway, BoxError> {
    let store: Arc<dyn Store> = match &config.redis {
        Some(url) => Arc::new(RedisStore::connect(url).await?),
        None => Arc::new(MemoryStore::new()),
    };
    if config.on_store_error != "closed" {
        eprintln!(
            "note: --on-store-error {} behaves as closed in this version",
            config.on_store_error
        );
    }
    let policy = match config.on_store_error.as_str() {
        "open" => StoreErrorPolicy::FailOpen,
        "local" => StoreErrorPolicy::Local,
        _ => StoreErrorPolicy::FailClosed,
    };
    let mut builder = RatelimitLayer::builder()
        .shared_store(store)
        .on_store_error(policy)
        .prefix(config.prefix.clone())
        .include_output_tokens(config.include_output_tokens)
        .token_mode(if config.reserve {
            TokenMode::Reserve
        } else {
            TokenMode::CheckRemaining
        });
    if let Some(n) = config.requests {
        builder = builder.request_limit(algorithm(config, n)?);
    }
    if let Some(n) = config.tokens {
        builder = builder.token_limit(algorithm(config, n)?);
    }
    if let Some(n) = config.concurrency {
        // A slot outlives its call by at most this lease if the gateway dies mid-call.
        builder = builder.concurrency_limit(ConcurrencyLimit::new(n, Duration::from_secs(600))?);
    }
    if config.requests.is_none() && config.tokens.is_none() && config.concurrency.is_none() {
        return Err("give --requests N, --tokens N or --concurrency N".into());
    }
    let layer = builder
        .identifier(Or(Header::try_new(&config.identifier_header)?, ApiKey))
        .build_http()?;
    let upstream = match &config.upstream {
        None => Upstream::Mock,
        Some(url) => {
            let client =
                Arc::new(Client::builder(TokioExecutor::new()).build(https_connector(config)?));
            Upstream::Proxy {
                client,
                base: url.trim_end_matches('/').to_owned(),
            }
        }
    };
    Ok(Gateway {
        limited: layer.layer(upstream),
    })
}

/// Serve `service` on `listener` until the process ends.
pub async fn serve<S, B>(listener: TcpListener, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // SSE is many small writes: without NODELAY, Nagle + delayed ACKs stall them.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[tokio::main]
async fn main() {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut config = config;
    if config.requests.is_none() && config.tokens.is_none() {
        // Defaults that make the offline demo show both limits.
        config.requests = Some(10);
        config.tokens = Some(10_000);
    }
    let gateway = match build(&config).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gateway: {e}");
            std::process::exit(1);
        }
    };
    let listener = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gateway: cannot listen on {}: {e}", config.listen);
            std::process::exit(1);
        }
    };
    let upstream = config.upstream.as_deref().unwrap_or("built-in mock");
    println!(
        "listening on http://{} (upstream: {upstream})",
        listener.local_addr().unwrap()
    );
    serve(listener, gateway).await;
}
