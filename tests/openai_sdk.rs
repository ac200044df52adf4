//! The official OpenAI Python SDK (from PyPI) against the gateway over loopback. The
//! venv is `.venv` (created by `.ci/run`, or here if missing).

#[path = "../examples/gateway.rs"]
mod gateway;

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio::net::TcpListener;

fn venv_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    let has_sdk = |p: &Path| {
        Command::new(p)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_sdk(&python) {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(root.join(".venv"))
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(root.join(".venv/bin/pip"))
                .args(["install", "-q", "openai"])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && has_sdk(&python),
            "could not create .venv with the openai package (python3 -m venv .venv && .venv/bin/pip install openai)"
        );
    }
    python
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
