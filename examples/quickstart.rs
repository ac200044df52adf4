//! Two scenarios, a request limit and a token limit, `RatelimitLayer`, with a mock LLM that reports usage.
//!
//! ```sh
//! cargo run --example quickstart                          # in-memory store
//! cargo run --example quickstart -- --redis redis://127.0.0.1:6379/
//! ```
//!
//! Scenario 1: 12 calls under 10 requests / 60 s: ten print `ok`, two print the
//! `Request limit reached!` error. Scenario 2: a 500 tokens / 60 s limit and calls that
//! report their usage, until one prints `Token limit reached!`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tower::{BoxError, ServiceBuilder, ServiceExt, service_fn};
use tower_llm_ratelimit::{
    FixedWindow, LlmRequest, LlmResponse, MemoryStore, RatelimitLayer, RedisStore, Store, Usage,
    estimate_prompt_tokens,
};

/// A stand-in for an LLM client: answers at once and reports realistic usage.
async fn mock_llm(request: LlmRequest) -> Result<LlmResponse, BoxError> {
    let prompt_tokens = estimate_prompt_tokens(&request.prompt) + 20; // system prompt
    let completion_tokens = 90;
    Ok(LlmResponse {
        text: format!("(a thoughtful answer to {:?})", request.prompt),
        usage: Some(Usage::new(prompt_tokens, completion_tokens)),
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let redis_url = args
        .iter()
        .position(|a| a == "--redis")
        .and_then(|i| args.get(i + 1).cloned());
    let store: Arc<dyn Store> = match &redis_url {
        Some(url) => {
            println!("store: Redis at {url}");
            Arc::new(RedisStore::connect(url).await?)
        }
        None => {
            println!("store: in memory");
            Arc::new(MemoryStore::new())
        }
    };
    // Fresh keys per run, so a shared Redis starts every run with full budgets.
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let minute = Duration::from_secs(60);

    println!("\nScenario 1: 10 requests per 60 s, 12 calls");
    let requests = RatelimitLayer::builder()
        .shared_store(store.clone())
        .prefix(format!("quickstart-{run}"))
        .request_limit(FixedWindow::new(10, minute)?)
        .build()?;
    let service = ServiceBuilder::new()
        .layer(requests)
        .service(service_fn(mock_llm));
    for i in 1..=12 {
        let request = LlmRequest::new("user-123", format!("question {i}"));
        match service.clone().oneshot(request).await {
            Ok(_) => println!("call {i:2}: ok"),
            Err(e) => println!("call {i:2}: {e}"),
        }
    }

    println!("\nScenario 2: 500 tokens per 60 s (prompt + completion charged after each call)");
    let tokens = RatelimitLayer::builder()
        .shared_store(store)
        .prefix(format!("quickstart-{run}"))
        .token_limit(FixedWindow::new(500, minute)?)
        .include_output_tokens(true)
        .build()?;
    let service = ServiceBuilder::new()
        .layer(tokens)
        .service(service_fn(mock_llm));
    for i in 1..=20 {
        let request = LlmRequest::new("user-123", "Summarize the plot of Hamlet in two lines.");
        match service.clone().oneshot(request).await {
            Ok(response) => {
                let usage = response.usage.unwrap_or_default();
                println!(
                    "call {i:2}: ok ({} prompt + {} completion tokens charged)",
                    usage.prompt_tokens, usage.completion_tokens
                );
            }
            Err(e) => {
                println!("call {i:2}: {e}");
                break;
            }
        }
    }
    Ok(())
}
