//! The `llm-gateway` binary as an operator runs it: config files, exit codes, the admin
//! API, /metrics and /healthz, several windows on Redis, SIGTERM during a stream,
//! SIGHUP reloads and `hash-key`.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const BIN: &str = env!("CARGO_BIN_EXE_llm-gateway");

/// A running gateway process; killed when dropped.
struct Gw {
    child: Child,
    addr: SocketAddr,
}

impl Gw {
    fn start(args: &[&str]) -> Gw {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(addr) = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
        else {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the gateway did not start: {line} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        };
        Gw { child, addr }
    }

    fn signal(&self, name: &str) {
        Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client
        .request(
            request
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello there"}]}"#;

async fn chat(addr: SocketAddr, user: &str) -> Reply {
    send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {user}"))],
        CHAT,
    )
    .await
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{name}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn bad_configs_exit_2_naming_the_field() {
    for (text, field) in [
        ("[[limits]]\nname=\"a\"\nkind=\"apples\"\nquota=1\n", "kind"),
        (
            "[[limits]]\nname=\"a\"\nkind=\"requests\"\nquota=-1\n",
            "quota",
        ),
        (
            "[[limits]]\nname=\"a\"\nkind=\"requests\"\nquota=1\nwindow=\"soon\"\n",
            "window",
        ),
        (
            "[[limits]]\nname=\"a\"\nkind=\"requests\"\nquota=1\n[[limits]]\nname=\"a\"\nkind=\"tokens\"\nquota=1\n",
            "twice",
        ),
        (
            "[[limits]]\nname=\"a\"\nkind=\"requests\"\nquota=1\n[tiers.pro]\nquotas = { b = 2 }\n",
            "tiers.pro.quotas.b",
        ),
        (
            "upstream_api_key_env = \"NO_SUCH_VARIABLE_HERE\"\n",
            "NO_SUCH_VARIABLE_HERE",
        ),
    ] {
        let path = write_config("bad", text);
        let out = Command::new(BIN)
            .args([
                "--config",
                path.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{field}: {stderr}");
        assert!(stderr.contains(field), "{field}: {stderr}");
        assert!(out.stdout.is_empty(), "it never listened");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_request_windows_on_redis() {
    common::align_to_window(Duration::from_secs(10)).await;
    let prefix = common::unique_prefix("gw-windows");
    let config = write_config(
        "windows",
        &format!(
            "redis = \"{}\"\nprefix = \"{prefix}\"\n[[limits]]\nname = \"short\"\nkind = \"requests\"\nquota = 3\nwindow = \"10s\"\n[[limits]]\nname = \"hourly\"\nkind = \"requests\"\nquota = 5\nwindow = \"1h\"\n",
            common::redis_url()
        ),
    );
    let gw = Gw::start(&["--config", config.to_str().unwrap()]);
    for _ in 0..3 {
        assert_eq!(chat(gw.addr, "sk-win").await.status, StatusCode::OK);
    }
    let r = chat(gw.addr, "sk-win").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers["x-ratelimit-limit-name"], "short");
    common::align_to_window(Duration::from_secs(10)).await;
    for _ in 0..2 {
        assert_eq!(chat(gw.addr, "sk-win").await.status, StatusCode::OK);
    }
    let r = chat(gw.addr, "sk-win").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers["x-ratelimit-limit-name"], "hourly");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        retry > 10 && retry <= 3600,
        "Retry-After {retry} is the hour's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_reads_and_resets_across_processes() {
    let prefix = common::unique_prefix("gw-admin");
    let args = [
        "--redis",
        &common::redis_url(),
        "--prefix",
        &prefix,
        "--requests",
        "1",
        "--window",
        "1h",
        "--admin-token",
        "admin-secret",
    ];
    let a = Gw::start(&args);
    let b = Gw::start(&args);
    assert_eq!(chat(a.addr, "sk-adm").await.status, StatusCode::OK);
    assert_eq!(
        chat(a.addr, "sk-adm").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let id = tower_llm_ratelimit::identifier::hash_api_key(b"sk-adm");
    let path = format!("/admin/usage/{id}");
    assert_eq!(
        send(b.addr, "GET", &path, &[], "").await.status,
        StatusCode::UNAUTHORIZED
    );
    let wrong = [("authorization", "Bearer nope")];
    assert_eq!(
        send(b.addr, "GET", &path, &wrong, "").await.status,
        StatusCode::UNAUTHORIZED
    );
    let auth = [("authorization", "Bearer admin-secret")];
    let usage = send(b.addr, "GET", &path, &auth, "").await;
    assert_eq!(usage.status, StatusCode::OK);
    let json = usage.json();
    assert_eq!(json["identifier"], id.as_str());
    assert_eq!(json["limits"][0]["name"], "requests");
    assert_eq!(json["limits"][0]["kind"], "requests");
    assert_eq!(json["limits"][0]["limit"], 1);
    assert_eq!(json["limits"][0]["remaining"], 0);
    assert!(json["limits"][0]["reset_ms"].as_u64().unwrap() > 0);
    // Reset on B; A (which cached the denial) lets the user through within a second.
    let reset = send(b.addr, "DELETE", &path, &auth, "").await;
    assert_eq!(reset.status, StatusCode::NO_CONTENT);
    let started = Instant::now();
    loop {
        if chat(a.addr, "sk-adm").await.status == StatusCode::OK {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "still denied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Without an admin token, /admin does not exist.
    let plain = Gw::start(&["--requests", "1"]);
    assert_eq!(
        send(plain.addr, "GET", &path, &auth, "").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_follow_traffic_and_redis() {
    let mut server = common::RedisServer::start();
    let gw = Gw::start(&[
        "--redis",
        &server.url,
        "--requests",
        "2",
        "--tokens",
        "100000",
        "--window",
        "1h",
        "--store-timeout",
        "300ms",
    ]);
    for _ in 0..3 {
        chat(gw.addr, "sk-met").await;
    }
    let metrics = send(gw.addr, "GET", "/metrics", &[], "").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(r#"llm_ratelimit_decisions_total{limit="requests",outcome="allowed"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"llm_ratelimit_decisions_total{limit="requests",outcome="denied"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"llm_ratelimit_tokens_charged_total{limit="tokens"}"#),
        "{text}"
    );
    assert_eq!(
        send(gw.addr, "GET", "/healthz", &[], "").await.status,
        StatusCode::OK
    );
    server.kill9();
    let down = send(gw.addr, "GET", "/healthz", &[], "").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(down.json()["reason"].is_string());
    server.restart();
    let started = Instant::now();
    while send(gw.addr, "GET", "/healthz", &[], "").await.status != StatusCode::OK {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not healthy again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_stream_finish_and_flushes_its_charge() {
    let prefix = common::unique_prefix("gw-term");
    let args = [
        "--redis",
        &common::redis_url(),
        "--prefix",
        &prefix,
        "--tokens",
        "100000",
        "--include-output-tokens",
        "--window",
        "1h",
    ];
    let mut gw = Gw::start(&args);
    let stream_body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let addr = gw.addr;
    let call = tokio::spawn(async move {
        send(
            addr,
            "POST",
            "/v1/chat/completions",
            &[
                ("authorization", "Bearer sk-term"),
                ("x-mock-delay-ms", "200"),
            ],
            stream_body,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");
    let reply = call.await.unwrap();
    let text = String::from_utf8_lossy(&reply.body);
    assert!(text.contains("[DONE]"), "the whole stream arrived: {text}");
    let status = gw.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    // A second gateway on the same Redis sees the charge.
    let other = Gw::start(&args);
    let r = chat(other.addr, "sk-term").await;
    let remaining: u64 = r.headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining < 100_000 - 20,
        "the stream's tokens were charged: {remaining}"
    );
}

fn hash_key(key: &str) -> String {
    let mut child = Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_keys_and_keeps_counters() {
    let keys = |names: &[&str]| {
        names
            .iter()
            .map(|n| {
                format!(
                    "[[keys]]\nname = \"{n}\"\n{}\n",
                    hash_key(&format!("gk-{n}"))
                )
            })
            .collect::<String>()
    };
    let base = "[[limits]]\nname = \"rpm\"\nkind = \"requests\"\nquota = 5\nwindow = \"1h\"\n";
    let path = write_config("hup", &format!("{base}{}", keys(&["ann", "bob"])));
    let gw = Gw::start(&["--config", path.to_str().unwrap()]);
    assert_eq!(chat(gw.addr, "gk-ann").await.status, StatusCode::OK);
    assert_eq!(
        chat(gw.addr, "gk-cat").await.status,
        StatusCode::UNAUTHORIZED
    );
    // Add cat, remove bob.
    std::fs::write(&path, format!("{base}{}", keys(&["ann", "cat"]))).unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(chat(gw.addr, "gk-cat").await.status, StatusCode::OK);
    assert_eq!(
        chat(gw.addr, "gk-bob").await.status,
        StatusCode::UNAUTHORIZED
    );
    // Ann's count survived the reload: 2 used of 5.
    let r = chat(gw.addr, "gk-ann").await;
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "3");
    // A broken file leaves the running configuration intact.
    std::fs::write(&path, "[[limits]]\nname = 5\n").unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(chat(gw.addr, "gk-cat").await.status, StatusCode::OK);
    assert_eq!(
        chat(gw.addr, "gk-bob").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[test]
fn gen_key_prints_a_key_whose_line_authenticates() {
    let out = Command::new(BIN).arg("gen-key").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .unwrap()
        .to_owned();
    let line = text.lines().find(|l| l.starts_with("sha256 = ")).unwrap();
    assert_eq!(line, hash_key(&key), "hash-key agrees with gen-key");
}
