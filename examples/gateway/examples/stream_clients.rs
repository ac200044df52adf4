//! Opens N concurrent streamed chat calls against a gateway, over K API keys, reads every
//! stream to its end, and reports how many completed. Used by `benchmarks/stream_rss.sh`
//! to load the gateway while its peak RSS is read.
//!
//! ```sh
//! cargo run --release -p llm-gateway --example stream_clients -- ADDR N KEYS CHUNKS DELAY_MS
//! ```

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, n, keys, chunks, delay] = &args[..] else {
        eprintln!("usage: stream_clients ADDR N KEYS CHUNKS DELAY_MS");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("N");
    let keys: usize = keys.parse().expect("KEYS");
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build::<_, Full<Bytes>>(connector);
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let request = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer sk-stream-{}", i % keys))
                .header("x-mock-completion", chunks.as_str())
                .header("x-mock-delay-ms", delay.as_str())
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            tokio::spawn(async move {
                let response = client.request(request).await.ok()?;
                let ok = response.status().is_success();
                let bytes = response.into_body().collect().await.ok()?.to_bytes();
                (ok && bytes.ends_with(b"data: [DONE]\n\n")).then_some(())
            })
        })
        .collect();
    let mut completed = 0;
    for t in tasks {
        if let Ok(Some(())) = t.await {
            completed += 1;
        }
    }
    println!("completed={completed}/{n}");
}
