//! Real HTTP over loopback: the gateway example in front of a test-owned mock upstream,
//! and the layer on an axum router.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tower_llm_ratelimit::algorithm::MAX_WINDOW;
use tower_llm_ratelimit::{FixedWindow, Ratelimit, RedisStore, identifier::Header};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn start_mock_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = tower::service_fn(|req: Request<hyper::body::Incoming>| async move {
        Ok::<_, Infallible>(gateway::mock_upstream(req).await)
    });
    tokio::spawn(gateway::serve(listener, svc));
    addr
}

/// Start the gateway with these flags in front of a fresh mock upstream, on Redis with a
/// fresh prefix. Returns its address and the prefix.
/// A `start_gateway` flag: identify callers by their API key (the gateway's default)
/// instead of the `x-user-id` these tests set.
const API_KEY_IDENTITY: &str = "(api-key identity)";

async fn start_gateway(flags: &[&str]) -> (SocketAddr, String) {
    let upstream = start_mock_upstream().await;
    let prefix = common::unique_prefix("gw");
    let mut args: Vec<String> = flags
        .iter()
        .filter(|f| **f != API_KEY_IDENTITY)
        .map(|s| s.to_string())
        .collect();
    if !flags.contains(&"--window") {
        // The longest fixed window: no test run straddles a window boundary.
        args.extend(["--window".into(), MAX_WINDOW.as_secs().to_string()]);
    }
    if !flags.contains(&"--identifier-header") && !flags.contains(&API_KEY_IDENTITY) {
        // These tests play a trusted proxy that sets x-user-id (not the default).
        args.extend(["--identifier-header".into(), "x-user-id".into()]);
    }
    args.extend([
        "--upstream".into(),
        format!("http://{upstream}/v1"),
        "--redis".into(),
        common::redis_url(),
        "--prefix".into(),
        prefix.clone(),
    ]);
    let config = gateway::parse_args(args).unwrap();
    let service = gateway::build(&config).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gateway::serve(listener, service));
    (addr, prefix)
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: Value) -> Reply {
    let mut req =
        Request::post(format!("http://{addr}{path}")).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = client()
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn chat(content: &str) -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": content}]})
}

/// Tokens the mock charges for one chat call with `content`: prompt = text / 4 + 10.
fn mock_prompt_tokens(content: &str) -> u64 {
    ("user".len() as u64 + content.len() as u64).div_ceil(4) + 10
}

async fn tokens_remaining(prefix: &str, limit: u64, id: &str) -> u64 {
    let store = RedisStore::connect(&common::redis_url()).await.unwrap();
    let rl = Ratelimit::new(
        FixedWindow::new(limit, MAX_WINDOW).unwrap(),
        store,
        &format!("{prefix}:tokens"),
    )
    .unwrap();
    rl.remaining(id).await.unwrap()
}

/// Wait until at least 5 s remain in the current minute, so a 60 s fixed window does not
/// roll during the test.
async fn away_from_minute_boundary() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into = now.as_secs_f64() % 60.0;
    if into > 54.0 {
        tokio::time::sleep(Duration::from_secs_f64(60.0 - into + 0.2)).await;
    }
}

#[tokio::test]
async fn per_user_limits_exact_headers_and_429() {
    away_from_minute_boundary().await;
    let (addr, _) = start_gateway(&["--requests", "3", "--tokens", "1000", "--window", "60"]).await;
    let content = "what is a rate limiter?";
    let per_call = mock_prompt_tokens(content);
    for i in 0..3u64 {
        let r = post(
            addr,
            "/v1/chat/completions",
            &[("x-user-id", "alice")],
            chat(content),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-ratelimit-limit-requests"), "3");
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            (2 - i).to_string()
        );
        assert_eq!(r.header("x-ratelimit-limit-tokens"), "1000");
        // CheckRemaining reports the tokens left before this call's charge.
        assert_eq!(
            r.header("x-ratelimit-remaining-tokens"),
            (1000 - i * per_call).to_string()
        );
        assert_eq!(
            r.header("ratelimit-policy"),
            "\"requests\";q=3;w=60, \"tokens\";q=1000;w=60"
        );
        assert_eq!(r.json()["usage"]["prompt_tokens"], per_call);
    }
    let denied = post(
        addr,
        "/v1/chat/completions",
        &[("x-user-id", "alice")],
        chat(content),
    )
    .await;
    let secs_left = 60
        - SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 60;
    assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = denied.header("retry-after").parse().unwrap();
    assert!(
        retry_after == secs_left || retry_after == secs_left + 1,
        "Retry-After {retry_after} is not the real time left ({secs_left} s)"
    );
    assert_eq!(denied.header("x-ratelimit-remaining-requests"), "0");
    assert_eq!(denied.header("content-type"), "application/json");
    let error = &denied.json()["error"];
    assert_eq!(error["type"], "rate_limit_exceeded");
    assert_eq!(error["code"], "request_limit_reached");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Request limit reached")
    );
    // Denied again from the local denied-cache (no store call): the same response shape,
    // with the time left counting down.
    let again = post(
        addr,
        "/v1/chat/completions",
        &[("x-user-id", "alice")],
        chat(content),
    )
    .await;
    assert_eq!(again.status, StatusCode::TOO_MANY_REQUESTS);
    let retry_again: u64 = again.header("retry-after").parse().unwrap();
    assert!(
        (1..=retry_after).contains(&retry_again),
        "{retry_again} vs {retry_after}"
    );
    assert_eq!(again.header("x-ratelimit-remaining-requests"), "0");
    assert_eq!(again.json()["error"]["code"], "request_limit_reached");
    // ... and every limit's state as the store's denial reported it (a denial takes
    // nothing), not only the denying limit's.
    assert_eq!(again.header("x-ratelimit-limit-tokens"), "1000");
    assert_eq!(
        again.header("x-ratelimit-remaining-tokens"),
        denied.header("x-ratelimit-remaining-tokens")
    );
    assert!(
        again.header("ratelimit").contains("\"tokens\";r="),
        "{}",
        again.header("ratelimit")
    );
    // Bob has his own budget.
    let bob = post(
        addr,
        "/v1/chat/completions",
        &[("x-user-id", "bob")],
        chat(content),
    )
    .await;
    assert_eq!(bob.status, StatusCode::OK);
    assert_eq!(bob.header("x-ratelimit-remaining-requests"), "2");
}

/// Read the whole streamed body; returns it as text.
async fn stream_text(r: &Reply) -> String {
    String::from_utf8(r.body.to_vec()).unwrap()
}

#[tokio::test]
async fn openai_sse_usage_is_charged_and_the_injected_chunk_hidden() {
    let (addr, prefix) = start_gateway(&["--tokens", "10000", "--include-output-tokens"]).await;
    let mut body = chat("stream me");
    body["stream"] = json!(true);
    let r = post(
        addr,
        "/v1/chat/completions",
        &[("x-user-id", "alice")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("x-mock-saw-include-usage"),
        "true",
        "the gateway asks for usage"
    );
    let text = stream_text(&r).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        !text.contains("\"prompt_tokens\""),
        "the usage chunk reached a client that did not ask: {text}"
    );
    let expected = mock_prompt_tokens("stream me") + 20;
    assert_eq!(
        tokens_remaining(&prefix, 10000, "alice").await,
        10000 - expected
    );

    // A client that asks for usage gets the chunk, and is charged the same.
    body["stream_options"] = json!({"include_usage": true});
    let r = post(addr, "/v1/chat/completions", &[("x-user-id", "bob")], body).await;
    assert!(stream_text(&r).await.contains("\"prompt_tokens\""));
    assert_eq!(
        tokens_remaining(&prefix, 10000, "bob").await,
        10000 - expected
    );
}

#[tokio::test]
async fn anthropic_json_and_sse_usage_is_charged() {
    let (addr, prefix) = start_gateway(&["--tokens", "10000", "--include-output-tokens"]).await;
    let body = json!({"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "bonjour"}]});
    let per_call = mock_prompt_tokens("bonjour") + 20;
    let headers = [("x-user-id", "carol"), ("anthropic-version", "2023-06-01")];
    let r = post(addr, "/v1/messages", &headers, body.clone()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json()["usage"]["input_tokens"],
        mock_prompt_tokens("bonjour")
    );
    assert_eq!(
        tokens_remaining(&prefix, 10000, "carol").await,
        10000 - per_call
    );
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let r = post(addr, "/v1/messages", &headers, streamed).await;
    assert_eq!(
        r.header("x-mock-saw-include-usage"),
        "false",
        "Anthropic requests are not rewritten"
    );
    assert!(stream_text(&r).await.contains("message_stop"));
    assert_eq!(
        tokens_remaining(&prefix, 10000, "carol").await,
        10000 - 2 * per_call
    );
}

#[tokio::test]
async fn chunk_boundaries_anywhere_parse_the_same() {
    let (addr, prefix) = start_gateway(&["--tokens", "100000", "--include-output-tokens"]).await;
    let cases = [
        (
            "/v1/chat/completions",
            chat("split me"),
            mock_prompt_tokens("split me") + 20,
        ),
        (
            "/v1/chat/completions",
            {
                let mut b = chat("split me");
                b["stream"] = json!(true);
                b
            },
            mock_prompt_tokens("split me") + 20,
        ),
        (
            "/v1/messages",
            json!({"max_tokens": 64, "messages": [{"role": "user", "content": "split me"}], "stream": true}),
            mock_prompt_tokens("split me") + 20,
        ),
        (
            "/v1/embeddings",
            json!({"model": "e", "input": "split me please"}),
            ("split me please".len() as u64).div_ceil(4) + 10,
        ),
    ];
    for (i, (path, body, charge)) in cases.into_iter().enumerate() {
        for (j, split) in ["1", "3", "0"].into_iter().enumerate() {
            let user = format!("user-{i}-{j}");
            let r = post(
                addr,
                path,
                &[("x-user-id", &user), ("x-mock-chunk-bytes", split)],
                body.clone(),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(
                tokens_remaining(&prefix, 100000, &user).await,
                100000 - charge,
                "{path} split {split}"
            );
        }
    }
}

#[tokio::test]
async fn a_body_dropped_mid_stream_settles_exactly_once() {
    let (addr, prefix) =
        start_gateway(&["--tokens", "10000", "--include-output-tokens", "--reserve"]).await;
    let body = json!({"max_tokens": 500, "stream": true, "messages": [{"role": "user", "content": "a long story"}]});
    let req = Request::post(format!("http://{addr}/v1/messages"))
        .header("content-type", "application/json")
        .header("x-user-id", "dave")
        .header("x-mock-delay-ms", "150")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client().request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // Read the first event (message_start, with the input tokens), then hang up.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("message_start"));
    drop(body);
    // Settled on what was seen: input tokens + the 1 output token of message_start,
    // instead of the 500+ reserved. Once: it stays there.
    let expected = 10000 - (mock_prompt_tokens("a long story") + 1);
    let mut remaining = 0;
    for _ in 0..100 {
        remaining = tokens_remaining(&prefix, 10000, "dave").await;
        if remaining == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(remaining, expected);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        tokens_remaining(&prefix, 10000, "dave").await,
        expected,
        "settled twice"
    );
}

#[tokio::test]
async fn upstream_errors_and_malformed_bodies_reach_the_client() {
    let (addr, prefix) = start_gateway(&["--tokens", "10000", "--reserve"]).await;
    let body = json!({"max_tokens": 100, "messages": [{"role": "user", "content": "x"}]});
    // A non-JSON 500: passed through; nothing was produced, the reservation is refunded.
    let r = post(
        addr,
        "/v1/chat/completions",
        &[
            ("x-user-id", "erin"),
            ("x-mock-status", "500"),
            ("x-mock-raw", "upstream exploded"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(&r.body[..], b"upstream exploded");
    assert_eq!(tokens_remaining(&prefix, 10000, "erin").await, 10000);
    // A 200 with malformed JSON and absurd usage: delivered; charged the reservation.
    for raw in [
        r#"{"usage":{"prompt_tokens":-5}"#,
        r#"{"usage":{"prompt_tokens":"many"}}"#,
        r#"{"usage":{"prompt_tokens":1.5}}"#,
        "{not json",
    ] {
        let user = format!("frank-{}", raw.len());
        let r = post(
            addr,
            "/v1/chat/completions",
            &[
                ("x-user-id", &user),
                ("x-mock-status", "200"),
                ("x-mock-raw", raw),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], raw.as_bytes());
        // The token limit counts prompt tokens: the reservation is the prompt estimate,
        // ("user" + "x") / 4 rounded up (max_tokens is output, not counted).
        let reserved = 2;
        assert_eq!(
            tokens_remaining(&prefix, 10000, &user).await,
            10000 - reserved,
            "{raw}"
        );
    }
}

#[tokio::test]
async fn oversized_requests_and_missing_identifiers_are_refused() {
    let (addr, _) = start_gateway(&["--requests", "5", "--tokens", "10000", "--reserve"]).await;
    let huge = "x".repeat(5 * 1024 * 1024);
    let r = post(
        addr,
        "/v1/chat/completions",
        &[("x-user-id", "gina")],
        chat(&huge),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    let r = post(addr, "/v1/chat/completions", &[], chat("who am I")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"]["code"], "missing_identifier");
    // Every POST is forwarded and counted, whatever its route.
    let r = post(addr, "/v1/other", &[("x-user-id", "gina")], json!({})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "4");
    // By default the bearer token identifies the caller, hashed: the raw key never
    // reaches Redis.
    let (addr, prefix) = start_gateway(&["--requests", "5", API_KEY_IDENTITY]).await;
    let r = post(
        addr,
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-very-secret")],
        chat("hi"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let keys = common::redis_keys(&common::redis_url(), &prefix);
    assert!(!keys.is_empty());
    for (key, ttl) in keys {
        assert!(!key.contains("sk-very-secret"), "{key}");
        assert!(ttl > 0, "{key} has no TTL");
    }
}

#[tokio::test]
async fn axum_router_without_handle_error_layer() {
    use axum::{Router, routing::post as axum_post};
    use tower::ServiceBuilder;

    let prefix = common::unique_prefix("axum");
    let layer = tower_llm_ratelimit::RatelimitLayer::builder()
        .store(RedisStore::connect(&common::redis_url()).await.unwrap())
        .prefix(prefix)
        .request_limit(FixedWindow::new(2, MAX_WINDOW).unwrap())
        .token_limit(FixedWindow::new(1000, MAX_WINDOW).unwrap())
        .identifier(Header::new("x-user-id"))
        .build_http()
        .unwrap();
    let app: Router = Router::new()
        .route(
            "/v1/chat/completions",
            axum_post(|| async {
                axum::Json(json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}}))
            }),
        )
        .layer(ServiceBuilder::new().layer(layer));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    for expected in ["1", "0"] {
        let r = post(
            addr,
            "/v1/chat/completions",
            &[("x-user-id", "henry")],
            chat("x"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-ratelimit-remaining-requests"), expected);
    }
    let r = post(
        addr,
        "/v1/chat/completions",
        &[("x-user-id", "henry")],
        chat("x"),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), "986");
}

#[tokio::test]
async fn axum_with_a_timeout_inside_the_limit_refunds_the_reservation() {
    use axum::error_handling::HandleErrorLayer;
    use axum::{Router, routing::post as axum_post};
    use tower::ServiceBuilder;

    let prefix = common::unique_prefix("axum-timeout");
    let layer = tower_llm_ratelimit::RatelimitLayer::builder()
        .store(RedisStore::connect(&common::redis_url()).await.unwrap())
        .prefix(prefix.clone())
        .request_limit(FixedWindow::new(5, MAX_WINDOW).unwrap())
        .token_limit(FixedWindow::new(1000, MAX_WINDOW).unwrap())
        .token_mode(tower_llm_ratelimit::TokenMode::Reserve)
        .identifier(Header::new("x-user-id"))
        .build_http()
        .unwrap();
    // Outermost: the rate limit (one request per call); inside it, a timeout whose error
    // HandleErrorLayer turns into a 504 response.
    let app: Router = Router::new()
        .route(
            "/v1/chat/completions",
            axum_post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "too late"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(layer)
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    StatusCode::GATEWAY_TIMEOUT
                }))
                .timeout(Duration::from_millis(50)),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut body = chat("x");
    body["max_tokens"] = json!(300);
    let r = post(addr, "/v1/chat/completions", &[("x-user-id", "kim")], body).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        r.header("x-ratelimit-remaining-requests"),
        "4",
        "the request counts"
    );
    // Nothing was produced: the 300+ token reservation is back.
    assert_eq!(tokens_remaining(&prefix, 1000, "kim").await, 1000);
}

/// An HTTPS mock upstream with a fresh self-signed certificate for localhost; returns its
/// address and the certificate's PEM path.
async fn start_tls_mock_upstream() -> (SocketAddr, std::path::PathBuf) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;
    let dir = std::env::temp_dir().join(common::unique_prefix("tls-upstream"));
    std::fs::create_dir_all(&dir).unwrap();
    // A test CA, and a certificate for localhost that it signs.
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert, key, csr, ext) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ee.csr"),
        dir.join("ee.ext"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: Vec<std::ffi::OsString>| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl (apt-get install openssl) makes the test certificates");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let os = |parts: &[&dyn AsRef<std::ffi::OsStr>]| {
        parts
            .iter()
            .map(|p| p.as_ref().to_owned())
            .collect::<Vec<_>>()
    };
    openssl(os(&[
        &"req",
        &"-x509",
        &"-newkey",
        &"rsa:2048",
        &"-nodes",
        &"-days",
        &"1",
        &"-subj",
        &"/CN=test-ca",
        &"-keyout",
        &ca_key,
        &"-out",
        &ca,
    ]));
    openssl(os(&[
        &"req",
        &"-newkey",
        &"rsa:2048",
        &"-nodes",
        &"-subj",
        &"/CN=localhost",
        &"-keyout",
        &key,
        &"-out",
        &csr,
    ]));
    openssl(os(&[
        &"x509",
        &"-req",
        &"-in",
        &csr,
        &"-CA",
        &ca,
        &"-CAkey",
        &ca_key,
        &"-CAcreateserial",
        &"-days",
        &"1",
        &"-extfile",
        &ext,
        &"-out",
        &cert,
    ]));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let mut config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = tower::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(gateway::mock_upstream(req).await)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper_util::service::TowerToHyperService::new(svc),
                    )
                    .await;
            });
        }
    });
    (addr, ca)
}

#[tokio::test]
async fn the_gateway_forwards_to_https_upstreams_and_verifies_them() {
    let (upstream, cert) = start_tls_mock_upstream().await;
    let start = |ca: Option<&std::path::Path>| {
        let mut args = vec![
            "--tokens".to_string(),
            "1000".into(),
            "--upstream".into(),
            format!("https://localhost:{}/v1", upstream.port()),
            "--identifier-header".into(),
            "x-user-id".into(),
        ];
        if let Some(ca) = ca {
            args.extend(["--upstream-ca".into(), ca.display().to_string()]);
        }
        async move {
            let service = gateway::build(&gateway::parse_args(args).unwrap())
                .await
                .unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(gateway::serve(listener, service));
            addr
        }
    };
    // Trusting the upstream's CA: forwarded over TLS, usage read, headers added.
    let trusted = start(Some(&cert)).await;
    let r = post(
        trusted,
        "/v1/chat/completions",
        &[("x-user-id", "tina")],
        chat("over tls"),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        r.json()["usage"]["prompt_tokens"],
        mock_prompt_tokens("over tls")
    );
    assert_eq!(r.header("x-ratelimit-limit-tokens"), "1000");
    // With the web PKI roots only, a self-signed upstream is refused: 502, not a panic.
    let untrusted = start(None).await;
    let r = post(
        untrusted,
        "/v1/chat/completions",
        &[("x-user-id", "tina")],
        chat("x"),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn gateway_concurrency_limit_holds_a_slot_until_the_stream_ends() {
    let (addr, _) = start_gateway(&["--concurrency", "1", "--tokens", "100000"]).await;
    let mut body = chat("slow stream");
    body["stream"] = json!(true);
    // The first stream is slow: its slot is held while it flows.
    let first = {
        let body = body.clone();
        tokio::spawn(async move {
            post(
                addr,
                "/v1/chat/completions",
                &[("x-user-id", "una"), ("x-mock-delay-ms", "100")],
                body,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = post(
        addr,
        "/v1/chat/completions",
        &[("x-user-id", "una")],
        body.clone(),
    )
    .await;
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.json()["error"]["code"], "concurrency_limit_reached");
    // Another user is not held up.
    assert_eq!(
        post(
            addr,
            "/v1/chat/completions",
            &[("x-user-id", "vic")],
            body.clone()
        )
        .await
        .status,
        StatusCode::OK
    );
    // Once the first stream has ended, its slot is free again.
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    assert_eq!(
        post(addr, "/v1/chat/completions", &[("x-user-id", "una")], body)
            .await
            .status,
        StatusCode::OK
    );
}
