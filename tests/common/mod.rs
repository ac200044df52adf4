//! Test harness: a `redis-server` owned by the test binary, unique key prefixes, and
//! helpers to inspect keys.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A `redis-server` child process that dies with the test binary: it runs under a shell
/// that kills it as soon as our end of its stdin closes (which the OS does when the test
/// process exits, however it exits).
pub struct RedisServer {
    pub port: u16,
    pub url: String,
    pid: u32,
    args: Vec<String>,
    child: Child,
}

impl RedisServer {
    /// Start a fresh server on a free loopback port.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Start a fresh server with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tlr-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a temp dir for redis-server");
        let mut args = vec![
            "--port".to_string(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, pid) = spawn(&args);
        let url = format!("redis://127.0.0.1:{port}/");
        wait_for_ping(&url);
        RedisServer {
            port,
            url,
            pid,
            args,
            child,
        }
    }

    /// `kill -9` the server (no shutdown, no final save).
    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Start the server again on the same port and directory.
    pub fn restart(&mut self) {
        let (child, pid) = spawn(&self.args);
        drop(std::mem::replace(&mut self.child, child).stdin.take());
        self.pid = pid;
        wait_for_ping(&self.url);
    }
}

/// Run redis-server under a shell that kills it when our end of its stdin closes; returns
/// the shell and redis-server's pid.
pub fn spawn(args: &[String]) -> (Child, u32) {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "redis-server {} >/dev/null 2>&1 & pid=$!; echo $pid; read _; kill -9 $pid 2>/dev/null",
        quoted.join(" ")
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "cannot run redis-server: install it (apt-get install redis-server) or set REDIS_URL",
        );
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = line.trim().parse().expect("redis-server pid");
    (child, pid)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_ping(url: &str) {
    let client = redis::Client::open(url).unwrap();
    for _ in 0..200 {
        match client.get_connection() {
            Ok(mut c) => match redis::cmd("PING").query::<String>(&mut c) {
                Ok(_) => return,
                // Up, but wants a password (ACL tests): that is an answer too.
                Err(e) if e.to_string().to_ascii_lowercase().contains("auth") => return,
                Err(_) => {}
            },
            Err(e) if e.to_string().to_ascii_lowercase().contains("auth") => return,
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("redis at {url} did not answer PING within 5 s");
}

/// The Redis URL tests use: `REDIS_URL` if set, else one server started for this test
/// binary (shared by its tests; each test uses its own key prefix).
pub fn redis_url() -> String {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    if let Ok(url) = std::env::var("REDIS_URL") {
        wait_for_ping(&url);
        return url;
    }
    SERVER.get_or_init(RedisServer::start).url.clone()
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "t-{name}-{}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `redis-cli -p <port> <args>`'s answer, trimmed (tests only).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every key under `prefix` with its PTTL (ms), by SCAN (tests only).
pub fn redis_keys(url: &str, prefix: &str) -> Vec<(String, i64)> {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut c)
        .unwrap();
    keys.into_iter()
        .map(|k| {
            let ttl: i64 = redis::cmd("PTTL").arg(&k).query(&mut c).unwrap();
            (k, ttl)
        })
        .collect()
}

/// Sleep until just after the next multiple of `window` since the epoch, so a test has a
/// whole fresh window ahead of it.
pub async fn align_to_window(window: Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let w = window.as_micros();
    let wait = w - now % w + 20_000;
    tokio::time::sleep(Duration::from_micros(wait as u64)).await;
}

/// A xorshift generator: the same "random" numbers on every run.
pub struct Xorshift(pub u64);

impl Xorshift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
