//! `llm-gateway` (the workspace member under `examples/gateway`) in a test process: its
//! flags parsed, the service built, served on a listener, and the mock upstream.
#![allow(dead_code)]

use std::convert::Infallible;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{BoxError, Service};

pub use llm_gateway::Gateway;
pub use llm_gateway::config::Settings;
#[allow(unused_imports)]
pub use llm_mock_upstream::mock_upstream;

/// The gateway's flags, as the binary parses them.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Settings, String> {
    let cli = llm_gateway::config::Cli::try_parse_from(
        std::iter::once("llm-gateway".to_string()).chain(args),
    )
    .map_err(|e| e.to_string())?;
    llm_gateway::config::load(&cli).map_err(|e| e.to_string())
}

/// The gateway for these settings.
pub async fn build(settings: &Settings) -> Result<Gateway, BoxError> {
    Gateway::new(settings.clone()).await
}

/// Serve `service` on `listener` until the test ends.
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

/// Settings from a config file's text, with `env` standing in for the environment.
pub fn settings_from_toml(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, String> {
    let file: llm_gateway::config::File = toml::from_str(text).map_err(|e| e.to_string())?;
    llm_gateway::config::settings(&Default::default(), file, env).map_err(|e| e.to_string())
}
