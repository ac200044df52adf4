//! Memory a metered stream holds: frames are slices of large read buffers (as hyper hands
//! them out); whatever the metering keeps of them stays alive. A counting global
//! allocator measures the bytes still allocated after each frame has been passed on and
//! dropped: metering must keep at most 16 KiB per stream, for OpenAI chat SSE, Anthropic
//! SSE and Responses SSE (with a final event far larger than any window).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use tower::{Layer, ServiceExt, service_fn};
use tower_llm_ratelimit::identifier::Fixed;
use tower_llm_ratelimit::{FixedWindow, RatelimitLayer};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counter only
// observes sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The size of each read buffer a frame is a slice of.
const READ_BUFFER: usize = 64 * 1024;
const BOUND: isize = 16 * 1024;

/// An upstream body whose frames are each a slice of a fresh 64 KiB buffer; the rest of
/// the buffer is released at once, so only a kept frame keeps it alive.
struct Frames {
    events: std::vec::IntoIter<Vec<u8>>,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.events.next().map(|event| {
            let mut buffer = BytesMut::zeroed(READ_BUFFER.max(event.len() + 100));
            buffer[100..100 + event.len()].copy_from_slice(&event);
            let frame = buffer.freeze().slice(100..100 + event.len());
            Ok(Frame::data(frame))
        }))
    }
}

fn openai_chat() -> Vec<Vec<u8>> {
    let mut events: Vec<Vec<u8>> = (0..200)
        .map(|i| format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} \"}}}}],\"usage\":null}}\n\n").into_bytes())
        .collect();
    events.push(b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":200,\"total_tokens\":210}}\n\ndata: [DONE]\n\n".to_vec());
    events
}

fn anthropic() -> Vec<Vec<u8>> {
    let mut events = vec![b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"type\":\"message\",\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n".to_vec()];
    events.extend((0..200).map(|i| format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"token {i} \"}}}}\n\n").into_bytes()));
    events.push(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":200}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_vec());
    events
}

/// 199 deltas, then a `response.completed` event of ~300 KiB in 1 KiB frames (the
/// whole output text comes before the usage).
fn responses() -> Vec<Vec<u8>> {
    let mut events: Vec<Vec<u8>> = (0..199)
        .map(|i| format!("event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"token {i} \"}}\n\n").into_bytes())
        .collect();
    let text = "lorem ipsum ".repeat(25_000);
    let completed = format!(
        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{text}\"}}]}}],\"usage\":{{\"input_tokens\":10,\"output_tokens\":200,\"total_tokens\":210}}}}}}\n\n"
    );
    events.extend(completed.as_bytes().chunks(1024).map(<[u8]>::to_vec));
    events
}

/// Stream `events` through the metered body; returns the most bytes the stream kept
/// allocated after any frame, beyond what was allocated before it started, and the
/// tokens charged.
async fn stream(events: Vec<Vec<u8>>) -> (isize, u64) {
    let layer = RatelimitLayer::builder()
        .token_limit(
            FixedWindow::new(1_000_000, tower_llm_ratelimit::algorithm::MAX_WINDOW).unwrap(),
        )
        .include_output_tokens(true)
        .identifier(Fixed::new("mem"))
        .build_http()
        .unwrap();
    let upstream = service_fn(move |_req| {
        let events = events.clone();
        async move {
            let mut response = Response::new(Frames {
                events: events.into_iter(),
            });
            response
                .headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            Ok::<_, Infallible>(response)
        }
    });
    let svc = layer.layer(upstream);
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "text/plain")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = svc.oneshot(request).await.unwrap();
    let mut body = response.into_body();
    // The first frame creates the stream's lasting state; measure from after it.
    let first = body.frame().await.unwrap().unwrap();
    drop(first);
    let baseline = LIVE.load(Ordering::SeqCst);
    let mut peak = 0;
    while let Some(frame) = body.frame().await {
        drop(frame.unwrap());
        peak = peak.max(LIVE.load(Ordering::SeqCst) - baseline);
    }
    drop(body);
    let charged = 1_000_000 - layer.usage("mem").await.unwrap()[0].remaining;
    (peak, charged)
}

/// A gzip body that inflates a thousandfold (100 MB from ~100 KB): decoded in small
/// pieces, read and dropped, so memory stays bounded while it is metered.
async fn bomb() -> isize {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let line = format!(
        "{{\"usage\":{{\"prompt_tokens\":1}},\"pad\":\"{}\"}}\n",
        " ".repeat(1000)
    );
    for _ in 0..100_000 {
        gz.write_all(line.as_bytes()).unwrap();
    }
    let compressed = Bytes::from(gz.finish().unwrap());
    let layer = RatelimitLayer::builder()
        .token_limit(
            FixedWindow::new(1_000_000, tower_llm_ratelimit::algorithm::MAX_WINDOW).unwrap(),
        )
        .identifier(Fixed::new("bomb"))
        .build_http()
        .unwrap();
    let upstream = service_fn(move |_req| {
        let frames: Vec<Vec<u8>> = compressed.chunks(16 * 1024).map(<[u8]>::to_vec).collect();
        async move {
            let mut response = Response::new(Frames {
                events: frames.into_iter(),
            });
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            response
                .headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
            Ok::<_, Infallible>(response)
        }
    });
    let svc = layer.layer(upstream);
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "text/plain")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut body = svc.oneshot(request).await.unwrap().into_body();
    let baseline = LIVE.load(Ordering::SeqCst);
    let mut peak = 0;
    while let Some(frame) = body.frame().await {
        drop(frame.unwrap());
        peak = peak.max(LIVE.load(Ordering::SeqCst) - baseline);
    }
    peak
}

#[test]
fn a_metered_stream_keeps_at_most_16_kib() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (name, events) in [
        ("openai chat", openai_chat()),
        ("anthropic", anthropic()),
        ("responses", responses()),
    ] {
        let (peak, charged) = rt.block_on(stream(events));
        assert_eq!(charged, 210, "{name}: usage read");
        assert!(
            peak <= BOUND,
            "{name}: the stream kept {peak} bytes beyond its start (bound {BOUND})"
        );
    }
    let peak = rt.block_on(bomb());
    assert!(
        peak <= 2 * 1024 * 1024,
        "a decompression bomb held {peak} bytes while metered"
    );
}
