//! The response-body wrapper on a large SSE stream vs the same body unwrapped: the
//! throughput cost of reading usage as frames go by.

use std::convert::Infallible;
use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_llm_ratelimit::http::RequestBody;
use tower_llm_ratelimit::identifier::Fixed;
use tower_llm_ratelimit::{FixedWindow, RatelimitLayer};

/// A pre-built SSE stream served frame by frame (one event per frame, like upstreams).
struct Frames(std::vec::IntoIter<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.next().map(|b| Ok(Frame::data(b))))
    }
}

fn sse_events(n: usize) -> Vec<Bytes> {
    let mut events: Vec<Bytes> = (0..n)
        .map(|i| Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} \"}},\"finish_reason\":null}}]}}\n\n"
        )))
        .collect();
    events.push(Bytes::from_static(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":4000,\"total_tokens\":4010}}\n\ndata: [DONE]\n\n"));
    events
}

/// An upstream answering every request with the whole stream.
fn upstream<B>(
    events: Vec<Bytes>,
) -> impl Service<Request<B>, Response = Response<Frames>, Error = Infallible, Future: Send> + Clone
{
    service_fn(move |_: Request<B>| {
        let events = events.clone();
        async move {
            let mut r = Response::new(Frames(events.into_iter()));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            Ok::<_, Infallible>(r)
        }
    })
}

/// The same stream cut into `size`-byte frames, as a socket read delivers a fast stream.
fn reframe(events: &[Bytes], size: usize) -> Vec<Bytes> {
    let all: Vec<u8> = events.iter().flat_map(|e| e.iter().copied()).collect();
    all.chunks(size).map(Bytes::copy_from_slice).collect()
}

fn body_throughput(c: &mut Criterion) {
    for (name, events) in [
        ("one_event_per_frame", sse_events(4000)),
        ("16KiB_frames", reframe(&sse_events(4000), 16 * 1024)),
    ] {
        bench_stream(c, name, events);
    }
}

fn bench_stream(c: &mut Criterion, name: &str, events: Vec<Bytes>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let bytes: usize = events.iter().map(|e| e.len()).sum();
    let bare = upstream::<Empty<Bytes>>(events.clone());
    let layer = RatelimitLayer::builder()
        .token_limit(FixedWindow::new(1 << 40, Duration::from_secs(3600)).unwrap())
        .identifier(Fixed::new("bench"))
        .build_http()
        .unwrap();
    let wrapped = layer.layer(upstream::<RequestBody<Empty<Bytes>>>(events.clone()));
    let mut group = c.benchmark_group(format!("sse_body/{name}"));
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("unwrapped", |b| {
        b.iter(|| {
            rt.block_on(async {
                let r = bare
                    .clone()
                    .oneshot(Request::new(Empty::<Bytes>::new()))
                    .await
                    .unwrap();
                black_box(r.into_body().collect().await.unwrap().to_bytes().len())
            })
        })
    });
    group.bench_function("ratelimit_body", |b| {
        b.iter(|| {
            rt.block_on(async {
                let r = wrapped
                    .clone()
                    .oneshot(Request::new(Empty::<Bytes>::new()))
                    .await
                    .unwrap();
                black_box(r.into_body().collect().await.unwrap().to_bytes().len())
            })
        })
    });
    group.finish();
}

/// Serve `svc` on a loopback port with hyper; returns the address.
async fn serve<S, B>(svc: S) -> std::net::SocketAddr
where
    S: Service<Request<hyper::body::Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            // SSE is many small writes: without NODELAY, Nagle + delayed ACKs stall them.
            let _ = stream.set_nodelay(true);
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    addr
}

/// The same comparison through a real HTTP hop on loopback, as a gateway serves it.
fn loopback_throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let events = sse_events(4000);
    let bytes: usize = events.iter().map(|e| e.len()).sum();
    let layer = RatelimitLayer::builder()
        .token_limit(FixedWindow::new(1 << 40, Duration::from_secs(3600)).unwrap())
        .identifier(Fixed::new("bench"))
        .build_http()
        .unwrap();
    let (bare, wrapped) = rt.block_on(async {
        (
            serve(upstream::<hyper::body::Incoming>(events.clone())).await,
            serve(layer.layer(upstream::<RequestBody<hyper::body::Incoming>>(
                events.clone(),
            )))
            .await,
        )
    });
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<Bytes>>(connector);
    let mut group = c.benchmark_group("sse_body/loopback_http");
    group.throughput(Throughput::Bytes(bytes as u64));
    for (name, addr) in [("unwrapped", bare), ("ratelimit_body", wrapped)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let uri = format!("http://{addr}/v1/chat/completions");
                    let r = client.get(uri.parse().unwrap()).await.unwrap();
                    black_box(r.into_body().collect().await.unwrap().to_bytes().len())
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, body_throughput, loopback_throughput);
criterion_main!(benches);
