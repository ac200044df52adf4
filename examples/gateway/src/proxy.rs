//! Forwarding to the upstreams: every path, with the gateway's own credential on each
//! API (the client's credential headers never leave the gateway when one is configured).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_rustls::{ConfigBuilderExt, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service};
use tower_llm_ratelimit::http::RequestBody;

use crate::config::{Settings, UpstreamTarget};

/// Every response body the gateway sends.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

type HttpsClient = Client<HttpsConnector<HttpConnector>, RequestBody<Incoming>>;

/// Which API a path belongs to: Anthropic's Messages API, or OpenAI's (everything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
}

impl Api {
    pub fn of(path: &str) -> Api {
        if path.starts_with("/v1/messages") {
            Api::Anthropic
        } else {
            Api::OpenAi
        }
    }
}

/// A JSON error in the API's own shape, so each vendor's SDK raises its own error.
pub fn error(api: Api, status: StatusCode, kind: &str, message: &str) -> Response<GatewayBody> {
    let body = match api {
        Api::OpenAi => {
            serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": kind}})
        }
        Api::Anthropic => {
            serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    };
    json(status, body.to_string())
}

pub fn json(status: StatusCode, body: String) -> Response<GatewayBody> {
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where calls go: the built-in mock, or the configured upstreams.
#[derive(Clone)]
pub struct Upstream {
    client: Option<Arc<HttpsClient>>,
    /// Clients hold gateway keys: their credential headers never go upstream.
    strip_client_keys: bool,
    openai: UpstreamTarget,
    anthropic: UpstreamTarget,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Upstream {
    pub fn new(settings: &Settings) -> Result<Self, BoxError> {
        let needs_client = settings.openai.url.is_some() || settings.anthropic.url.is_some();
        let client = if needs_client {
            Some(Arc::new(
                Client::builder(TokioExecutor::new()).build(https_connector(settings)?),
            ))
        } else {
            None
        };
        Ok(Self {
            client,
            strip_client_keys: !settings.keys.is_empty(),
            openai: settings.openai.clone(),
            anthropic: settings.anthropic.clone(),
        })
    }
}

/// `path_and_query` without the query parameters a credential travels in, whatever the
/// case or percent-encoding of their names (`k%65y` is `key` to an upstream), and
/// whether pairs are separated by `&` or `;`. Everything else is kept as it was sent.
fn without_credential_params(path_and_query: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_owned();
    };
    let is_credential = |pair: &str| {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        let name: String = form_urlencoded::parse(name.as_bytes())
            .next()
            .map(|(name, _)| name.into_owned())
            .unwrap_or_default();
        CREDENTIAL_PARAMS
            .iter()
            .any(|p| name.eq_ignore_ascii_case(p))
    };
    let kept: Vec<String> = query
        .split('&')
        .filter_map(|pair| {
            let parts: Vec<&str> = pair.split(';').filter(|p| !is_credential(p)).collect();
            // A pair made only of credentials goes (an empty one, `a=1&&b=2`, stays).
            (!parts.is_empty()).then(|| parts.join(";"))
        })
        .collect();
    match kept.is_empty() {
        true => path.to_owned(),
        false => format!("{path}?{}", kept.join("&")),
    }
}

/// Headers in which the APIs that upstreams speak take a credential: OpenAI's, Anthropic's,
/// Azure OpenAI's and Gemini's.
const CREDENTIAL_HEADERS: [&str; 4] = ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// Query parameters in which some of them take one (Gemini: `?key=`).
const CREDENTIAL_PARAMS: [&str; 3] = ["key", "api-key", "api_key"];

/// Replace the client's credential with the gateway's (`key`, if it has one): every
/// header a credential travels in is dropped, then the gateway's own is set.
fn set_credential(headers: &mut http::HeaderMap, api: Api, key: Option<&str>) {
    for name in CREDENTIAL_HEADERS {
        headers.remove(name);
    }
    let Some(key) = key else { return };
    let value = match api {
        Api::OpenAi => HeaderValue::from_str(&format!("Bearer {key}")),
        Api::Anthropic => HeaderValue::from_str(key),
    };
    if let Ok(mut value) = value {
        value.set_sensitive(true);
        match api {
            Api::OpenAi => headers.insert(http::header::AUTHORIZATION, value),
            Api::Anthropic => headers.insert("x-api-key", value),
        };
    }
}

impl Service<Request<RequestBody<Incoming>>> for Upstream {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<GatewayBody>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody<Incoming>>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let api = Api::of(request.uri().path());
            let target = match api {
                Api::OpenAi => &this.openai,
                Api::Anthropic => &this.anthropic,
            };
            let (mut parts, body) = request.into_parts();
            // The gateway replaces the client's credential when it has one of its own for
            // the upstream, or when clients hold gateway keys, which never go upstream.
            let replace = target.api_key.is_some() || this.strip_client_keys;
            if replace {
                set_credential(&mut parts.headers, api, target.api_key.as_deref());
            }
            let (Some(base), Some(client)) = (&target.url, &this.client) else {
                let response =
                    llm_mock_upstream::mock_upstream(Request::from_parts(parts, body)).await;
                return Ok(response.map(|b| b.boxed_unsync()));
            };
            let base = base.trim_end_matches('/');
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let path = match replace {
                true => without_credential_params(path),
                false => path.to_owned(),
            };
            let path = path.as_str();
            // A base ending in /v1 takes request paths that start with /v1 once.
            let path = match base.ends_with("/v1") {
                true => path.strip_prefix("/v1").unwrap_or(path),
                false => path,
            };
            let uri: Uri = match format!("{base}{path}").parse() {
                Ok(u) => u,
                Err(e) => {
                    return Ok(error(
                        api,
                        StatusCode::BAD_GATEWAY,
                        "api_error",
                        &format!("bad upstream URL: {e}"),
                    ));
                }
            };
            for h in HOP_BY_HOP {
                parts.headers.remove(h);
            }
            parts.headers.remove(http::header::HOST);
            parts.uri = uri;
            match client.request(Request::from_parts(parts, body)).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    for h in HOP_BY_HOP {
                        parts.headers.remove(h);
                    }
                    Ok(Response::from_parts(
                        parts,
                        body.map_err(BoxError::from).boxed_unsync(),
                    ))
                }
                Err(e) => Ok(error(
                    api,
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    &format!("upstream request failed: {}", error_chain(&e)),
                )),
            }
        })
    }
}

/// An error and its causes, `: `-separated (hyper's own message is just "client error").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `http://` and `https://` upstreams: TLS verified against the web PKI roots, or only
/// against `upstream_ca` when given (a private CA, or a test's self-signed cert).
fn https_connector(settings: &Settings) -> Result<HttpsConnector<HttpConnector>, BoxError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let mut http = HttpConnector::new();
    // SSE is many small writes: without NODELAY, Nagle + delayed ACKs stall them.
    http.set_nodelay(true);
    http.enforce_http(false);
    let tls = match &settings.upstream_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("upstream_ca {path}: {e}"))?
            {
                roots.add(cert.map_err(|e| format!("upstream_ca {path}: {e}"))?)?;
            }
            ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
        None => ClientConfig::builder()
            .with_webpki_roots()
            .with_no_client_auth(),
    };
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http))
}

#[cfg(test)]
mod tests {
    use super::without_credential_params as strip;

    #[test]
    fn credential_parameters_go_under_any_spelling_and_the_rest_stays_in_order() {
        let cases = [
            ("/v1/x", "/v1/x"),
            ("/v1/x?key=s", "/v1/x"),
            (
                "/v1/x?k%65y=s&api-version=2024-06-01",
                "/v1/x?api-version=2024-06-01",
            ),
            ("/v1/x?%6B%65%79=s", "/v1/x"),
            ("/v1/x?api%5Fkey=s&api%2Dkey=t&API_KEY=u", "/v1/x"),
            ("/v1/x?alt=json;key=s", "/v1/x?alt=json"),
            (
                "/v1/x?key=a&key=b&keyword=kw&api-version=1&KEY=c&x=1",
                "/v1/x?keyword=kw&api-version=1&x=1",
            ),
            ("/v1/x?key&keyword=&a=1", "/v1/x?keyword=&a=1"),
            ("/v1/x?a=1&&b=2&key=s&", "/v1/x?a=1&&b=2&"),
            ("/v1/x?a=%20b+c&keys=1", "/v1/x?a=%20b+c&keys=1"),
        ];
        for (sent, forwarded) in cases {
            assert_eq!(strip(sent), forwarded, "{sent}");
        }
    }
}
