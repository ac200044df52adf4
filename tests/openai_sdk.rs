//! The official OpenAI Python SDK (from PyPI) against the gateway over loopback. The
//! venv is `.venv` (created by `.ci/run`, or here if it lacks the SDKs).

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio::net::TcpListener;

/// The venv's python, with the SDKs the checks import (made here, once per test process,
/// if `.venv` lacks any of them: the tests run in parallel).
fn venv_python() -> PathBuf {
    static READY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    READY
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let python = root.join(".venv/bin/python");
            let has_sdks = |p: &Path| {
                Command::new(p)
                    .args(["-c", "import openai, anthropic, brotli"])
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !has_sdks(&python) {
                let ok = Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(root.join(".venv"))
                    .status()
                    .is_ok_and(|s| s.success())
                    && Command::new(root.join(".venv/bin/pip"))
                        .args(["install", "-q", "openai", "anthropic", "brotli"])
                        .status()
                        .is_ok_and(|s| s.success());
                assert!(
                    ok && has_sdks(&python),
                    "could not create .venv with the SDKs (python3 -m venv .venv && .venv/bin/pip install openai anthropic brotli)"
                );
            }
            python
        })
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_sees_rate_limits() {
    let python = venv_python();
    let config = gateway::parse_args(
        // Sliding windows: a window boundary during the run changes no count.
        [
            "--requests",
            "10",
            "--tokens",
            "100000",
            "--algorithm",
            "sliding",
            "--prefix",
            "sdk",
        ]
        .map(String::from),
    )
    .unwrap();
    let service = gateway::build(&config).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gateway::serve(listener, service));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(format!("http://{addr}/v1"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the SDK checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    query: Option<String>,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

/// The mock upstream behind a recorder of every request it receives.
async fn recording_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
) {
    use http_body_util::BodyExt;
    let seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>> = Default::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = seen.clone();
    let svc = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            record.lock().unwrap().push(Seen {
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().map(str::to_owned),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
            let req = http::Request::from_parts(parts, http_body_util::Full::new(body));
            Ok::<_, std::convert::Infallible>(gateway::mock_upstream(req).await)
        }
    });
    tokio::spawn(gateway::serve(listener, svc));
    (addr, seen)
}

async fn run_sdk_checks(settings: gateway::Settings, mode: &str) {
    let python = venv_python();
    let service = gateway::build(&settings).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gateway::serve(listener, service));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk_checks.py");
    let mode = mode.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(format!("http://{addr}/v1"))
            .arg(mode)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success() && stdout.contains(" 0 failed"),
        "the SDK checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_meter_responses_compressed_answers_and_anthropic_errors() {
    let (upstream, seen) = recording_upstream().await;
    let prefix = common::unique_prefix("sdk-resp");
    let config = format!(
        r#"
upstream = "http://{upstream}/v1"
redis = "{redis}"
prefix = "{prefix}"
token_mode = "reserve"
include_output_tokens = true
[[limits]]
name = "rpm"
kind = "requests"
quota = 1000
window = "1h"
[[limits]]
name = "tokens"
kind = "tokens"
quota = 1000000
window = "1h"
[[limits]]
name = "claude-rpm"
kind = "requests"
quota = 5
window = "1h"
models = ["claude*"]
"#,
        redis = common::redis_url()
    );
    let settings = gateway::settings_from_toml(&config, &|_| None).unwrap();
    run_sdk_checks(settings, "responses").await;
    let seen = seen.lock().unwrap();
    let responses: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path.ends_with("/responses"))
        .collect();
    assert_eq!(responses.len(), 2, "{seen:?}");
    for r in responses {
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            !body.contains("stream_options"),
            "the Responses API got {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_work_with_gateway_keys_and_never_send_them_upstream() {
    let hash = llm_gateway::keys::sha256_line;
    let (upstream, seen) = recording_upstream().await;
    let prefix = common::unique_prefix("sdk-keys");
    let config = format!(
        r#"
upstream = "http://{upstream}/v1"
upstream_api_key_env = "TEST_UPSTREAM_KEY"
redis = "{redis}"
prefix = "{prefix}"
[[limits]]
name = "rpm"
kind = "requests"
quota = 3
window = "1h"
[[limits]]
name = "tokens"
kind = "tokens"
quota = 1000000
window = "1h"
[tiers.pro]
quotas = {{ rpm = 6 }}
[[keys]]
name = "free-user"
{free}
[[keys]]
name = "pro-user"
{pro}
tier = "pro"
[[keys]]
name = "stream-user"
{stream}
tier = "pro"
"#,
        redis = common::redis_url(),
        free = hash("gk-free"),
        pro = hash("gk-pro"),
        stream = hash("gk-stream"),
    );
    let env = |name: &str| (name == "TEST_UPSTREAM_KEY").then(|| "upstream-secret".to_string());
    let settings = gateway::settings_from_toml(&config, &env).unwrap();
    run_sdk_checks(settings, "keys").await;
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() >= 12,
        "{} requests reached the upstream",
        seen.len()
    );
    for s in seen.iter() {
        for (name, value) in &s.headers {
            let v = value.to_str().unwrap_or("");
            assert!(
                !v.contains("gk-") && !v.contains("sk-provider-key"),
                "{name}: {v} reached the upstream"
            );
        }
        if s.path.starts_with("/v1/messages") {
            assert_eq!(s.headers["x-api-key"], "upstream-secret", "{s:?}");
            assert!(s.headers.get("authorization").is_none());
            assert!(
                s.headers.get("anthropic-version").is_some(),
                "the client's version is kept"
            );
        } else {
            assert_eq!(
                s.headers["authorization"], "Bearer upstream-secret",
                "{s:?}"
            );
            assert!(s.headers.get("x-api-key").is_none());
        }
    }
}

/// With gateway keys, no credential of the client's reaches the upstream in any header or
/// query parameter the upstream APIs read one from (Azure's `api-key`, Gemini's
/// `x-goog-api-key` and `?key=` used to be forwarded); other parameters are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_credential_reaches_the_upstream_in_any_header_or_parameter() {
    use http_body_util::BodyExt;
    let (upstream, seen) = recording_upstream().await;
    let key = "gk-cred";
    let digest = llm_gateway::keys::sha256_line(key);
    let config = format!(
        r#"
upstream = "http://{upstream}/v1"
upstream_api_key_env = "TEST_UPSTREAM_KEY"
prefix = "{prefix}"
[[limits]]
name = "rpm"
kind = "requests"
quota = 100
window = "1h"
[[keys]]
name = "cred-user"
{digest}
"#,
        prefix = common::unique_prefix("sdk-cred"),
    );
    let env = |name: &str| (name == "TEST_UPSTREAM_KEY").then(|| "upstream-secret".to_string());
    let settings = gateway::settings_from_toml(&config, &env).unwrap();
    let service = gateway::build(&settings).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gateway::serve(listener, service));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    for query in [
        "?key=sk-client-q&api-version=2024-06-01",
        "?API_KEY=sk-client-q",
    ] {
        let request = http::Request::post(format!("http://{addr}/v1/chat/completions{query}"))
            .header("authorization", format!("Bearer {key}"))
            .header("api-key", "sk-client-azure")
            .header("x-goog-api-key", "sk-client-goog")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status();
        let answer = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in seen.iter() {
        for (name, value) in &s.headers {
            let v = value.to_str().unwrap_or("");
            assert!(
                !v.contains("sk-client") && !v.contains(key),
                "{name}: {v} reached the upstream"
            );
        }
        assert_eq!(s.headers["authorization"], "Bearer upstream-secret");
        assert!(
            !s.query.as_deref().unwrap_or("").contains("sk-client"),
            "{s:?}"
        );
    }
    assert_eq!(seen[0].query.as_deref(), Some("api-version=2024-06-01"));
    assert_eq!(seen[1].query, None);
}
