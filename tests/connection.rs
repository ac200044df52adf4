//! Connection options: ACL user and password, database index, TLS (`rediss://`).

mod common;

use std::process::Command;
use std::time::Duration;

use tower_llm_ratelimit::{FixedWindow, Ratelimit, RedisStore};

fn limit(store: RedisStore, prefix: &str) -> Ratelimit {
    Ratelimit::new(
        FixedWindow::new(5, Duration::from_secs(60)).unwrap(),
        store,
        prefix,
    )
    .unwrap()
}

#[tokio::test]
async fn acl_user_password_and_database_index() {
    let server = common::RedisServer::start_with(&[
        "--user", "default", "off", "--user", "alice", "on", ">s3cret", "~*", "&*", "+@all",
    ]);
    let url = format!("redis://alice:s3cret@127.0.0.1:{}/3", server.port);
    let store = RedisStore::connect(&url).await.unwrap();
    let rl = limit(store, "acl");
    assert_eq!(rl.limit("ann", 2).await.unwrap().remaining, 3);
    // The key is in database 3, not 0.
    let keys = |db: &str| {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &server.port.to_string(),
                "--user",
                "alice",
                "--pass",
                "s3cret",
                "--no-auth-warning",
                "-n",
                db,
                "keys",
                "acl*",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(keys("3"), "acl:{ann}");
    assert_eq!(keys("0"), "");
    // A wrong password is a clear error, not a hang or a panic.
    let bad = format!("redis://alice:wrong@127.0.0.1:{}/", server.port);
    let err = RedisStore::connect(&bad).await.unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn tls_with_rediss_urls() {
    use tower_llm_ratelimit::RedisOptions;
    let dir = std::env::temp_dir().join(format!("tlr-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (apt-get install openssl) makes the test certificate");
    assert!(status.status.success());
    let port = common::free_port();
    let args: Vec<String> = [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--tls-cert-file",
        &cert.display().to_string(),
        "--tls-key-file",
        &key.display().to_string(),
        "--tls-ca-cert-file",
        &cert.display().to_string(),
        "--tls-auth-clients",
        "no",
    ]
    .map(String::from)
    .to_vec();
    let (mut child, _pid) = common::spawn(&args);
    // Self-signed: skip verification with #insecure (production URLs verify).
    let url = format!("rediss://127.0.0.1:{port}/#insecure");
    let mut store = None;
    for _ in 0..100 {
        if let Ok(s) = RedisStore::connect_with(&url, RedisOptions::default()).await {
            store = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let rl = limit(store.expect("connect over TLS"), "tls");
    assert_eq!(rl.limit("tom", 1).await.unwrap().remaining, 4);
    // A plain-text client cannot talk to the TLS port.
    let plain = format!("redis://127.0.0.1:{port}/");
    assert!(
        RedisStore::connect_with(
            &plain,
            RedisOptions::default()
                .response_timeout(Duration::from_millis(300))
                .connect_timeout(Duration::from_millis(300))
        )
        .await
        .is_err()
    );
    drop(child.stdin.take());
    let _ = child.wait();
}
