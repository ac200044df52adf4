//! Bodies: [`RatelimitBody`] (responses, metered as they stream) and [`RequestBody`]
//! (requests, passed on as they came or re-built after the layer read them).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem;
use pin_project_lite::pin_project;

use super::decode::Encoding;
use super::usage::UsageParser;
use crate::engine::settlement::{Ending, Settlement};
use crate::error::BoxError;
use crate::llm::Usage;

/// What the response body still owes the store, and how it reads usage.
pub(crate) struct Meter {
    parser: Option<Box<dyn UsageParser>>,
    settlement: Option<Settlement>,
    /// Whether the upstream answered with success (2xx): otherwise, without usage, the
    /// call is settled like a failed call (the reservation is refunded).
    success: bool,
    filter: Option<UsageChunkFilter>,
    /// The last frames, held until the settlement is written.
    pending: VecDeque<Frame<Bytes>>,
    ended: bool,
    settled: bool,
    /// Prompt tokens estimated from the request (charged if the usage never arrives).
    prompt_estimate: u64,
    /// Output seen so far: SSE events (providers stream about one token per event), or,
    /// for other bodies, bytes.
    events: u64,
    /// Bytes of the SSE line in progress at the end of the last frame.
    line_carry: usize,
    bytes: u64,
    event_stream: bool,
    /// The body's `Content-Encoding`: usage is read from a decoded view.
    encoding: Encoding,
    /// The body could not be decoded: its usage is unreadable.
    unreadable: bool,
    /// Bytes decoded so far (compressed bodies).
    decoded: u64,
    /// Bytes of the body that were never read as output: those of a body in an encoding
    /// this crate cannot read or after it failed to decode, and compressed bytes that
    /// had produced no output yet when it failed or was cut short. Charged at 4 bytes a
    /// token on top of what was read, if the usage never arrives.
    unread: u64,
    /// Compressed bytes fed to the decoder since it last produced output (a zstd block
    /// produces nothing until it is whole: up to 128 KiB).
    fed_since_output: u64,
}

/// Compressed input decoded at a time (its output is at most ~1,000 times larger).
const DECODE_PIECE: usize = 256;
/// The most a compressed body is decoded to for metering: LLM answers are far smaller;
/// beyond, the body counts as unreadable (charged its estimate).
const MAX_DECODED: u64 = 64 * 1024 * 1024;

/// The estimate charged for a call whose usage never arrived: the prompt estimate, and
/// one output token per streamed event (or per 4 bytes of any other body) read, plus one
/// per 4 bytes of the body that could not be read.
fn incomplete_estimate(
    prompt: u64,
    event_stream: bool,
    events: u64,
    bytes: u64,
    unread: u64,
    seen: Option<Usage>,
) -> Usage {
    // Streams: one token per event; other bodies, and what could not be read: 4 bytes a
    // token.
    let read = if event_stream && events > 0 {
        events
    } else {
        bytes.div_ceil(4)
    };
    let output = read.saturating_add(unread.div_ceil(4));
    let mut usage = Usage::new(prompt, output);
    if let Some(seen) = seen {
        // A partial usage (e.g. Anthropic's `message_start`) is real: keep the larger.
        usage.prompt_tokens = usage.prompt_tokens.max(seen.prompt_tokens);
        usage.completion_tokens = usage.completion_tokens.max(seen.completion_tokens);
    }
    usage
}

impl Meter {
    pub(crate) fn new(
        parser: Option<Box<dyn UsageParser>>,
        settlement: Settlement,
        success: bool,
        filter_usage_chunk: bool,
        event_stream: bool,
        prompt_estimate: u64,
        encoding: Encoding,
    ) -> Self {
        let unreadable = match &encoding {
            Encoding::Unknown(name) => {
                tracing::warn!(
                    encoding = %name,
                    "response body in an encoding the rate limiter cannot read; charging the estimate"
                );
                true
            }
            _ => false,
        };
        Self {
            encoding,
            unreadable,
            decoded: 0,
            unread: 0,
            fed_since_output: 0,
            parser,
            settlement: Some(settlement),
            success,
            filter: filter_usage_chunk.then(UsageChunkFilter::default),
            pending: VecDeque::new(),
            ended: false,
            settled: false,
            prompt_estimate,
            events: 0,
            line_carry: 0,
            bytes: 0,
            event_stream,
        }
    }

    fn count(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        if self.event_stream {
            // SSE events end with a blank line: count those (the line in progress may
            // have begun in an earlier frame).
            let mut start = 0;
            for nl in memchr::memchr_iter(b'\n', data) {
                let line = &data[start..nl];
                let carried = if start == 0 { self.line_carry } else { 0 };
                if carried + line.len() == 0 || (carried == 0 && line == b"\r") {
                    self.events += 1;
                }
                start = nl + 1;
                self.line_carry = 0;
            }
            self.line_carry += data.len() - start;
        }
    }

    /// Read a frame of the body (decoded if it is compressed).
    fn observe(&mut self, data: &Bytes) {
        if self.unreadable {
            // Unreadable: its bytes still stand for output (4 bytes a token).
            self.unread += data.len() as u64;
            return;
        }
        let mut encoding = std::mem::replace(&mut self.encoding, Encoding::Identity);
        match &mut encoding {
            Encoding::Identity => {
                self.count(data);
                if let Some(p) = &mut self.parser {
                    p.feed(data);
                }
            }
            Encoding::Unknown(_) => self.unread += data.len() as u64,
            Encoding::Known(decoder) => {
                // Small pieces of input at a time: a piece decodes to a bounded amount
                // of output (one that decodes to more than the total read fails: see
                // `Bounded`), read and dropped before the next (a body that inflates a
                // thousandfold costs time, not memory), up to a total.
                for (i, piece) in data.chunks(DECODE_PIECE).enumerate() {
                    let mut out = Vec::new();
                    let result = decoder.write(piece, &mut out);
                    self.fed_since_output += piece.len() as u64;
                    if !out.is_empty() {
                        self.fed_since_output = 0;
                    }
                    self.decoded += out.len() as u64;
                    self.read_decoded(out);
                    let failed = match result {
                        Err(error) => {
                            tracing::warn!(%error, "cannot decode a compressed response body; charging the estimate");
                            true
                        }
                        Ok(()) if self.decoded > MAX_DECODED => {
                            tracing::warn!(
                                max = MAX_DECODED,
                                "a compressed response body decodes to more than the rate limiter reads; charging the estimate"
                            );
                            true
                        }
                        Ok(()) => false,
                    };
                    if failed {
                        // What had produced no output yet, this piece at least (how much
                        // of it was read is not known) and the rest of this frame are
                        // not read: they stand for output by their size.
                        self.unreadable = true;
                        let fed = std::mem::take(&mut self.fed_since_output);
                        let rest = data.len() - (i * DECODE_PIECE + piece.len());
                        self.unread += fed.max(piece.len() as u64) + rest as u64;
                        break;
                    }
                }
            }
        }
        if !self.unreadable {
            self.encoding = encoding;
        }
        // Else the decoder is dropped here, its window with it: nothing more is decoded
        // (the rest of the body is counted by its bytes).
    }

    fn read_decoded(&mut self, decoded: Vec<u8>) {
        if decoded.is_empty() {
            return;
        }
        self.count(&decoded);
        if let Some(p) = &mut self.parser {
            p.feed(&Bytes::from(decoded));
        }
    }

    /// The body ended (`finished`) or was cut: flush the decoder, once.
    fn end_of_body(&mut self, finished: bool) {
        if self.unreadable {
            return;
        }
        if let Encoding::Known(mut decoder) =
            std::mem::replace(&mut self.encoding, Encoding::Identity)
        {
            let mut out = Vec::new();
            let result = decoder.finish(&mut out);
            if !out.is_empty() {
                self.fed_since_output = 0;
            }
            self.read_decoded(out);
            if let Err(error) = result {
                tracing::warn!(%error, "a compressed response body ended early; charging the estimate");
                self.unreadable = true;
            }
            if self.unreadable || !finished {
                // Input that never produced output (a zstd block cut short): its size.
                self.unread += std::mem::take(&mut self.fed_since_output);
            }
        }
    }

    /// `finished`: the body ended normally (its usage, if any, has been seen).
    fn start_settlement(&mut self, finished: bool) {
        // Also when cut short: what the decoder holds was seen.
        self.end_of_body(finished);
        let usage = match &mut self.parser {
            Some(p) if finished => p.finish(),
            Some(p) => p.usage(),
            None => None,
        };
        let final_usage = self.parser.as_ref().is_some_and(|p| p.is_final());
        let Some(s) = &mut self.settlement else {
            return;
        };
        let ending = match (usage, finished) {
            // A body that could not be read to its end is charged its final usage if it
            // had been read (bytes after it, such as a compressed body's trailing bytes,
            // are ignored, as clients ignore them); a partial one, such as Anthropic's
            // `message_start`, only as a minimum, below.
            (Some(usage), true) if !self.unreadable || final_usage => {
                s.start(Ending::Delivered(Some(&usage)));
                return;
            }
            // An error status without usage: the model produced nothing to charge.
            (None, _) if !self.success => Ending::Failed,
            (None, true) if !self.unreadable => Ending::Unreported(incomplete_estimate(
                self.prompt_estimate,
                self.event_stream,
                self.events,
                self.bytes,
                self.unread,
                None,
            )),
            // Cut short (client gone, upstream cut, body error) or unreadable: never
            // charged 0.
            (seen, _) => Ending::Incomplete(incomplete_estimate(
                self.prompt_estimate,
                self.event_stream,
                self.events,
                self.bytes,
                self.unread,
                seen,
            )),
        };
        s.start(ending);
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if !self.settled && !self.ended {
            // Dropped mid-stream (client went away, or a body error): charge what was
            // seen; the settlement's own drop finishes the write in the background.
            self.start_settlement(false);
        }
    }
}

pin_project! {
    /// The response body of a rate-limited HTTP service: the inner body's frames passed
    /// through unchanged (usage is read as they go by; nothing is buffered beyond the
    /// current SSE line or the `usage` member), or the JSON body of a response the layer
    /// produced itself (429, 401, 413, 503).
    ///
    /// The call is settled before the end of the stream is handed on, so a client that
    /// saw the whole body sees the charge in its next call; if the body errors or is
    /// dropped early, it is settled once, in the background, on the usage seen so far.
    pub struct RatelimitBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { data: Option<Bytes> },
        Metered { #[pin] body: B, meter: Meter },
        Plain { #[pin] body: B },
    }
}

impl<B> RatelimitBody<B> {
    /// A body the layer produced itself.
    pub fn full(data: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Full {
                data: Some(data.into()),
            },
        }
    }

    pub(crate) fn metered(body: B, meter: Meter) -> Self {
        Self {
            kind: Kind::Metered { body, meter },
        }
    }

    pub(crate) fn plain(body: B) -> Self {
        Self {
            kind: Kind::Plain { body },
        }
    }
}

impl<B> Body for RatelimitBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Plain { body } => body.poll_frame(cx),
            KindProj::Metered { mut body, meter } => loop {
                if meter.ended {
                    if !meter.settled {
                        // The charge is written before the last bytes go out: a client
                        // that has the whole body (by length or end of stream) also has
                        // the charge behind it.
                        if let Some(s) = &mut meter.settlement {
                            ready!(s.poll_write(cx));
                        }
                        meter.settled = true;
                    }
                    return Poll::Ready(meter.pending.pop_front().map(Ok));
                }
                match ready!(body.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        let frame = match frame.into_data() {
                            Ok(data) => {
                                meter.observe(&data);
                                match &mut meter.filter {
                                    Some(f) => f.push(data).map(Frame::data),
                                    None => Some(Frame::data(data)),
                                }
                            }
                            Err(frame) => Some(frame),
                        };
                        if body.is_end_stream() {
                            // That was the last frame: hold it until settled.
                            let rest = meter.filter.as_mut().and_then(|f| f.flush());
                            meter.pending.extend(frame);
                            meter.pending.extend(rest.map(Frame::data));
                            meter.start_settlement(true);
                            meter.ended = true;
                            continue;
                        }
                        match frame {
                            Some(frame) => return Poll::Ready(Some(Ok(frame))),
                            None => continue,
                        }
                    }
                    Some(Err(e)) => {
                        meter.start_settlement(false);
                        meter.ended = true;
                        meter.settled = true;
                        // Finish the write in the background: the error goes out now.
                        meter.settlement = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                    None => {
                        let rest = meter.filter.as_mut().and_then(|f| f.flush());
                        meter.pending.extend(rest.map(Frame::data));
                        meter.start_settlement(true);
                        meter.ended = true;
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Plain { body } => body.is_end_stream(),
            // Not until the settlement has been written: the end must be polled for.
            Kind::Metered { meter, .. } => meter.settled && meter.pending.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Plain { body } => body.size_hint(),
            Kind::Metered { body, meter } if meter.filter.is_none() => body.size_hint(),
            Kind::Metered { .. } => SizeHint::default(),
        }
    }
}

/// Largest SSE event held back while looking for its end; beyond, bytes pass through.
const MAX_HELD_EVENT: usize = 1024 * 1024;

/// Removes the usage-only chunk (`"choices":[]` with a `usage` object) that the layer
/// asked for with `stream_options.include_usage` from a client that did not ask for it.
/// Works on whole SSE events, so it holds back at most the current event.
#[derive(Default)]
pub(crate) struct UsageChunkFilter {
    held: BytesMut,
}

fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_usage_only_chunk(event: &[u8]) -> bool {
    if memmem::find(event, b"\"usage\"").is_none() {
        return false;
    }
    event
        .split(|&b| b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .any(|data| {
            let data = data.strip_suffix(b"\r").unwrap_or(data);
            match serde_json::from_slice::<serde_json::Value>(data) {
                Ok(v) => {
                    v.get("choices")
                        .and_then(|c| c.as_array())
                        .is_some_and(|c| c.is_empty())
                        && v.get("usage").is_some_and(|u| u.is_object())
                }
                Err(_) => false,
            }
        })
}

impl UsageChunkFilter {
    /// Add bytes; returns the complete events to pass on, if any.
    fn push(&mut self, data: Bytes) -> Option<Bytes> {
        self.held.extend_from_slice(&data);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.held) {
            let event = self.held.split_to(end);
            if !is_usage_only_chunk(&event) {
                out.extend_from_slice(&event);
            }
        }
        if self.held.len() > MAX_HELD_EVENT {
            out.extend_from_slice(&self.held.split());
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    /// The end of the stream: whatever is held goes out.
    fn flush(&mut self) -> Option<Bytes> {
        let rest = self.held.split();
        (!rest.is_empty() && !is_usage_only_chunk(&rest)).then(|| rest.freeze())
    }
}

pin_project! {
    /// The request body handed to the inner service: the original body untouched, or the
    /// bytes the layer read (to estimate tokens) and possibly rewrote (to ask for usage).
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Streaming { #[pin] body: B },
        Buffered { data: Option<Bytes> },
        Prefixed { prefix: Option<Bytes>, rest: Pin<Box<B>> },
    }
}

impl<B> RequestBody<B> {
    /// The body as it came, passed on untouched (for requests that bypass the layer).
    pub fn streaming(body: B) -> Self {
        Self {
            kind: RequestKind::Streaming { body },
        }
    }

    /// The bytes the layer read, then the rest of the body, unread.
    pub(crate) fn prefixed(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: RequestKind::Prefixed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }

    pub(crate) fn buffered(data: Bytes) -> Self {
        Self {
            kind: RequestKind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            RequestKindProj::Streaming { body } => body.poll_frame(cx).map_err(Into::into),
            RequestKindProj::Buffered { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            RequestKindProj::Prefixed { prefix, rest } => match prefix.take() {
                Some(d) => Poll::Ready(Some(Ok(Frame::data(d)))),
                None => rest.as_mut().poll_frame(cx).map_err(Into::into),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Streaming { body } => body.is_end_stream(),
            RequestKind::Buffered { data } => data.is_none(),
            RequestKind::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Streaming { body } => body.size_hint(),
            RequestKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Prefixed { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_drops_only_the_usage_chunk_at_any_split() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
data: [DONE]\n\n";
        let expected = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut f = UsageChunkFilter::default();
            let mut out = Vec::new();
            for chunk in stream.chunks(split) {
                if let Some(b) = f.push(Bytes::copy_from_slice(chunk)) {
                    out.extend_from_slice(&b);
                }
            }
            if let Some(b) = f.flush() {
                out.extend_from_slice(&b);
            }
            assert_eq!(out, expected.to_vec(), "split {split}");
        }
    }
}
