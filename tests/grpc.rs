//! tonic: a real gRPC server (tonic-health, no protoc needed) behind the HTTP layer and a
//! real tonic client over loopback. A denial is `RESOURCE_EXHAUSTED` with retry metadata.

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_llm_ratelimit::{FixedWindow, RatelimitLayer, identifier::Header};

#[tokio::test]
async fn a_denial_is_resource_exhausted_with_retry_metadata() {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let layer = RatelimitLayer::builder()
        .request_limit(FixedWindow::new(2, tower_llm_ratelimit::algorithm::MAX_WINDOW).unwrap())
        .identifier(Header::new("x-user-id"))
        .build_http()
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let request = |user: &str| {
        let mut r = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        r.metadata_mut().insert("x-user-id", user.parse().unwrap());
        r
    };
    for remaining in ["1", "0"] {
        let response = client.check(request("ivy")).await.unwrap();
        assert_eq!(
            response
                .metadata()
                .get("x-ratelimit-remaining-requests")
                .unwrap(),
            remaining
        );
    }
    let status = client.check(request("ivy")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("Request limit reached"),
        "{}",
        status.message()
    );
    let retry: u64 = status
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "retry-after {retry}");
    assert_eq!(
        status
            .metadata()
            .get("x-ratelimit-remaining-requests")
            .unwrap(),
        "0"
    );
    // Another caller is unaffected; a caller without an identifier is unauthenticated.
    assert!(client.check(request("jack")).await.is_ok());
    let anonymous = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    assert_eq!(
        client.check(anonymous).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}
