//! `llm-gateway`: see `--help` and the README next to this crate.

use std::io::Read;

use clap::Parser;
use llm_gateway::config::{self, Cli, Command};
use llm_gateway::{Gateway, keys, serve};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::HashKey) => {
            let mut key = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut key) {
                eprintln!("llm-gateway hash-key: cannot read the key from stdin: {e}");
                std::process::exit(2);
            }
            if key.trim().is_empty() {
                eprintln!("llm-gateway hash-key: give the key on stdin");
                std::process::exit(2);
            }
            println!("{}", keys::sha256_line(&key));
            return;
        }
        Some(Command::GenKey) => match keys::generate() {
            Ok(key) => {
                println!("key: {key}");
                println!("{}", keys::sha256_line(&key));
                return;
            }
            Err(e) => {
                eprintln!("llm-gateway gen-key: no randomness from the OS: {e}");
                std::process::exit(1);
            }
        },
        None => {}
    }
    let settings = match config::load(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("llm-gateway: bad configuration: {e}");
            std::process::exit(2);
        }
    };
    let listen = settings.listen;
    let grace = settings.shutdown_grace;
    let upstream = settings
        .openai
        .url
        .clone()
        .unwrap_or_else(|| "built-in mock".into());
    let gateway = match Gateway::new(settings).await {
        Ok(g) => g,
        Err(e) => {
            // A configuration the crate refuses is a configuration error too.
            let invalid = e
                .downcast_ref::<tower_llm_ratelimit::Error>()
                .is_some_and(|e| e.kind() == tower_llm_ratelimit::ErrorKind::InvalidInput);
            eprintln!("llm-gateway: {}", llm_gateway::proxy::error_chain(&*e));
            std::process::exit(if invalid { 2 } else { 1 });
        }
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("llm-gateway: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "listening on http://{} (upstream: {upstream})",
        listener.local_addr().map_or(listen, |a| a)
    );

    // SIGHUP: reload keys, tiers and limits from the config file.
    if let Ok(mut hup) = signal(SignalKind::hangup()) {
        let (gateway, cli) = (gateway.clone(), cli.clone());
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match config::load(&cli)
                    .map_err(|e| e.to_string())
                    .and_then(|s| gateway.reload(s).map_err(|e| e.to_string()))
                {
                    Ok(()) => tracing::info!("configuration reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "reload failed; the running configuration stays")
                    }
                }
            }
        });
    }
    let shutdown = async {
        let mut term = signal(SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match &mut term { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    serve(listener, gateway, shutdown, grace).await;
}
