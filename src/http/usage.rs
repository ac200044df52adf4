//! Reading token usage out of response bodies as they stream by, in bounded memory.
//!
//! Built in ([`OpenAiAnthropic`]): OpenAI chat/completions/embeddings JSON (`usage`),
//! OpenAI SSE (the chunk carrying `usage`, normally the last), Anthropic Messages JSON
//! (`usage.input_tokens`/`output_tokens`) and SSE (`message_start` input tokens, the last
//! `message_delta` output tokens). Other shapes plug in through [`UsageFormat`].
//!
//! Bad input never panics and never fails the response: malformed JSON or SSE, usage
//! numbers that are negative, fractional, strings or beyond `u64` are ignored with a
//! warning (the call is then charged as one without usage).

use std::collections::VecDeque;
use std::sync::LazyLock;

use bytes::Bytes;
use memchr::memmem;
use serde_json::Value;

use crate::llm::Usage;

/// Reads usage from a body's bytes, fed in whatever chunks the body arrives in.
pub trait UsageParser: Send + 'static {
    /// The next frame of the body (a cheap reference-counted handle: a parser may keep
    /// it instead of copying).
    fn feed(&mut self, chunk: &Bytes);
    /// The usage read so far (also used when the body is dropped mid-stream).
    fn usage(&mut self) -> Option<Usage>;
    /// The body ended: flush anything pending and return the final usage.
    fn finish(&mut self) -> Option<Usage> {
        self.usage()
    }
}

/// Chooses a [`UsageParser`] for a response.
pub trait UsageFormat: Send + Sync + 'static {
    /// A parser for this response, or `None` if this format does not know its shape.
    fn parser(&self, response: &http::response::Parts) -> Option<Box<dyn UsageParser>>;
}

/// OpenAI and Anthropic JSON and SSE bodies, chosen by `Content-Type`.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenAiAnthropic;

impl UsageFormat for OpenAiAnthropic {
    fn parser(&self, response: &http::response::Parts) -> Option<Box<dyn UsageParser>> {
        let content_type = response
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if content_type.starts_with("text/event-stream") {
            Some(Box::new(SseUsage::default()))
        } else if content_type.starts_with("application/json") || content_type.is_empty() {
            Some(Box::new(JsonUsage::default()))
        } else {
            None
        }
    }
}

/// Parse a usage object: OpenAI (`prompt_tokens`, `completion_tokens`, `total_tokens`)
/// or Anthropic (`input_tokens` + cache tokens, `output_tokens`). `Ok(None)` when the
/// value is not a usage object (e.g. `null`); `Err` when its numbers are not
/// non-negative integers.
pub fn usage_from_json(value: &Value) -> Result<Option<Usage>, String> {
    let Some(obj) = value.as_object() else {
        return Ok(None);
    };
    let field = |name: &str| -> Result<Option<u64>, String> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("usage field {name:?} is not a non-negative integer: {v}")),
        }
    };
    let openai_prompt = field("prompt_tokens")?;
    let openai_completion = field("completion_tokens")?;
    let total = field("total_tokens")?;
    let input = field("input_tokens")?;
    let cache_creation = field("cache_creation_input_tokens")?;
    let cache_read = field("cache_read_input_tokens")?;
    let output = field("output_tokens")?;
    if openai_prompt.is_none() && input.is_none() && output.is_none() && total.is_none() {
        return Ok(None);
    }
    let prompt = openai_prompt.unwrap_or(0).saturating_add(
        input
            .unwrap_or(0)
            .saturating_add(cache_creation.unwrap_or(0))
            .saturating_add(cache_read.unwrap_or(0)),
    );
    let completion = openai_completion
        .unwrap_or(0)
        .saturating_add(output.unwrap_or(0));
    let mut usage = Usage::new(prompt, completion);
    if let Some(t) = total {
        usage.total_tokens = t;
    }
    Ok(Some(usage))
}

fn warn_bad_usage(reason: &str) {
    tracing::warn!(reason, "ignoring malformed usage in an LLM response");
}

/// The longest `usage` value the JSON scanner keeps (real ones are under 1 KiB).
const MAX_USAGE_VALUE: usize = 64 * 1024;

/// Finds the top-level `"usage"` member of a JSON object streamed in chunks, keeping only
/// that member's bytes: memory stays bounded however large the body (embeddings
/// responses run to megabytes).
#[derive(Default)]
pub struct JsonUsage {
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// The string being read at depth 1 (a candidate key), up to 8 bytes.
    key: Vec<u8>,
    key_overflow: bool,
    /// A depth-1 string equal to "usage" just closed; a ':' makes it the key.
    after_usage_key: bool,
    /// Bytes of the usage value being captured.
    capture: Option<Vec<u8>>,
    usage: Option<Usage>,
}

impl JsonUsage {
    fn end_capture(&mut self) {
        if let Some(bytes) = self.capture.take() {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => match usage_from_json(&v) {
                    Ok(u) => self.usage = u.or(self.usage),
                    Err(reason) => warn_bad_usage(&reason),
                },
                Err(e) => warn_bad_usage(&format!("usage is not valid JSON: {e}")),
            }
        }
    }

    fn step(&mut self, b: u8) {
        if let Some(cap) = &mut self.capture {
            // Inside the usage value: the value ends at ',' or '}' back at depth 1.
            if !self.in_string && self.depth == 1 && (b == b',' || b == b'}') {
                self.end_capture();
            } else if cap.len() < MAX_USAGE_VALUE {
                cap.push(b);
            } else {
                warn_bad_usage("usage value too large");
                self.capture = None;
            }
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 1 && self.capture.is_none() {
                    self.after_usage_key = !self.key_overflow && self.key == b"usage";
                }
            } else if self.depth == 1 && self.capture.is_none() {
                if self.key.len() < 8 {
                    self.key.push(b);
                } else {
                    self.key_overflow = true;
                }
            }
            return;
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.key.clear();
                self.key_overflow = false;
            }
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b':' if self.depth == 1 && self.after_usage_key && self.capture.is_none() => {
                self.capture = Some(Vec::new());
            }
            b' ' | b'\t' | b'\n' | b'\r' => return,
            _ => {}
        }
        if b != b'"' {
            self.after_usage_key = false;
        }
    }
}

impl UsageParser for JsonUsage {
    fn feed(&mut self, chunk: &Bytes) {
        for &b in chunk.iter() {
            self.step(b);
        }
    }

    fn usage(&mut self) -> Option<Usage> {
        self.usage
    }

    fn finish(&mut self) -> Option<Usage> {
        if self.capture.is_some() {
            // A truncated body: try what was captured.
            self.end_capture();
        }
        self.usage
    }
}

/// The longest SSE line kept; longer lines are skipped (usage lines are short).
const MAX_SSE_LINE: usize = 1024 * 1024;

/// Reads usage from SSE lines. Only `data:` lines with a `"usage"` object are parsed.
#[derive(Clone, Default)]
struct SseLines {
    line: Vec<u8>,
    skipping_long_line: bool,
    usage: Option<Usage>,
    /// Anthropic: input tokens from `message_start`.
    anthropic_input: Option<u64>,
}

impl SseLines {
    fn line_done(&mut self) {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        self.handle_line(&line);
        line.clear();
        self.line = line;
    }

    fn handle_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if !mentions_usage_object(data) {
            return;
        }
        let event: Value = match serde_json::from_slice(data) {
            Ok(v) => v,
            Err(e) => {
                warn_bad_usage(&format!("SSE data is not valid JSON: {e}"));
                return;
            }
        };
        match event.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let usage = event.get("message").and_then(|m| m.get("usage"));
                match usage.map(usage_from_json) {
                    Some(Ok(Some(u))) => {
                        self.anthropic_input = Some(u.prompt_tokens);
                        self.usage = Some(Usage::new(u.prompt_tokens, u.completion_tokens));
                    }
                    Some(Err(reason)) => warn_bad_usage(&reason),
                    _ => {}
                }
            }
            Some("message_delta") => match event.get("usage").map(usage_from_json) {
                Some(Ok(Some(u))) => {
                    // Output tokens in message_delta are cumulative: the last one wins.
                    // Input tokens come from message_start unless the delta restates them.
                    let input = if u.prompt_tokens > 0 {
                        u.prompt_tokens
                    } else {
                        self.anthropic_input.unwrap_or(0)
                    };
                    self.usage = Some(Usage::new(input, u.completion_tokens));
                }
                Some(Err(reason)) => warn_bad_usage(&reason),
                _ => {}
            },
            _ => match event.get("usage").map(usage_from_json) {
                Some(Ok(Some(u))) => self.usage = Some(u),
                Some(Err(reason)) => warn_bad_usage(&reason),
                _ => {}
            },
        }
    }
}

static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));

/// Whether `hay` has a `"usage"` key followed by an object (not `null`), or one cut off
/// at the end of `hay`. Lets the SSE reader skip most lines without parsing them: with
/// `include_usage`, OpenAI puts `"usage":null` in every chunk.
fn mentions_usage_object(hay: &[u8]) -> bool {
    USAGE_KEY.find_iter(hay).any(|at| {
        let mut rest = hay[at + 7..].iter().filter(|b| !b.is_ascii_whitespace());
        match rest.next() {
            None => true,
            Some(b':') => matches!(rest.next(), None | Some(b'{')),
            Some(_) => false,
        }
    })
}

impl SseLines {
    fn feed(&mut self, mut bytes: &[u8]) {
        if !self.line.is_empty() || self.skipping_long_line {
            // Finish the line carried over from the previous chunk.
            let Some(i) = memchr::memchr(b'\n', bytes) else {
                self.carry(bytes);
                return;
            };
            self.carry(&bytes[..i]);
            if self.skipping_long_line {
                self.skipping_long_line = false;
                self.line.clear();
            } else {
                self.line_done();
            }
            bytes = &bytes[i + 1..];
        }
        // Whole lines inside this chunk are read in place; most are skipped by one scan.
        let (whole, partial) = match memchr::memrchr(b'\n', bytes) {
            Some(i) => (&bytes[..i + 1], &bytes[i + 1..]),
            None => (&[][..], bytes),
        };
        if mentions_usage_object(whole) {
            for line in whole.split(|&b| b == b'\n') {
                // `handle_line` skips lines without a usage object before parsing.
                self.handle_line(line.strip_suffix(b"\r").unwrap_or(line));
            }
        }
        self.carry(partial);
    }

    fn finish(&mut self) -> Option<Usage> {
        if !self.line.is_empty() && !self.skipping_long_line {
            self.line_done();
        }
        self.usage
    }

    /// Keep part of an unfinished line, up to the line limit.
    fn carry(&mut self, bytes: &[u8]) {
        if self.skipping_long_line || bytes.is_empty() {
            return;
        }
        if self.line.len() + bytes.len() <= MAX_SSE_LINE {
            self.line.extend_from_slice(bytes);
        } else {
            warn_bad_usage("SSE line longer than 1 MiB skipped");
            self.line.clear();
            self.skipping_long_line = true;
        }
    }
}

/// Bytes at the start of a stream read as they arrive (Anthropic's `message_start`).
const SSE_HEAD: usize = 4 * 1024;
/// Bytes at the end of a stream kept (as frame handles, not copies) and read at the end
/// (OpenAI's usage chunk, Anthropic's last `message_delta`).
const SSE_TAIL: usize = 8 * 1024;

/// Reads usage from an OpenAI or Anthropic `text/event-stream` body.
///
/// Usage lives at the ends of a stream: Anthropic's input tokens in `message_start` (the
/// first event), OpenAI's usage chunk and Anthropic's final `message_delta` just before
/// the end. So the first 4 KiB are read as they arrive, and the frames of the last
/// 8 KiB are kept by reference and read when the stream ends (or is dropped): memory
/// stays bounded, and the frames in between cost a reference count, not a scan.
#[derive(Default)]
pub struct SseUsage {
    head: SseLines,
    head_seen: usize,
    tail: VecDeque<Bytes>,
    tail_len: usize,
    /// Frames left the tail window: the head's unfinished line does not continue into it.
    evicted: bool,
}

impl SseUsage {
    fn push_tail(&mut self, chunk: Bytes) {
        self.tail_len += chunk.len();
        self.tail.push_back(chunk);
        while self.tail.len() > 1 && self.tail_len - self.tail[0].len() >= SSE_TAIL {
            if let Some(front) = self.tail.pop_front() {
                self.tail_len -= front.len();
            }
            self.evicted = true;
        }
    }

    fn read_tail(&self) -> Option<Usage> {
        let mut lines = if self.evicted {
            SseLines {
                usage: self.head.usage,
                anthropic_input: self.head.anthropic_input,
                ..SseLines::default()
            }
        } else {
            self.head.clone()
        };
        for chunk in &self.tail {
            lines.feed(chunk);
        }
        lines.finish()
    }
}

impl UsageParser for SseUsage {
    fn feed(&mut self, chunk: &Bytes) {
        if self.head_seen < SSE_HEAD {
            let take = (SSE_HEAD - self.head_seen).min(chunk.len());
            self.head.feed(&chunk[..take]);
            self.head_seen += take;
            if take < chunk.len() {
                self.push_tail(chunk.slice(take..));
            }
        } else {
            self.push_tail(chunk.clone());
        }
    }

    fn usage(&mut self) -> Option<Usage> {
        self.read_tail()
    }

    fn finish(&mut self) -> Option<Usage> {
        self.read_tail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(p: &mut dyn UsageParser, body: &[u8], split: usize) -> Option<Usage> {
        for chunk in body.chunks(split.max(1)) {
            p.feed(&Bytes::copy_from_slice(chunk));
        }
        p.finish()
    }

    #[test]
    fn sse_usage_at_both_ends_of_a_long_stream() {
        let mut body = b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n".to_vec();
        for i in 0..20_000 {
            body.extend_from_slice(
                format!(
                    "data: {{\"type\":\"content_block_delta\",\"delta\":{{\"text\":\"{i}\"}}}}\n\n"
                )
                .as_bytes(),
            );
        }
        body.extend_from_slice(
            b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":20000}}\n\n",
        );
        assert!(body.len() > SSE_HEAD + SSE_TAIL);
        for split in [7, 1000, 70_000] {
            let mut p = SseUsage::default();
            assert_eq!(
                parse(&mut p, &body, split),
                Some(Usage::new(9, 20000)),
                "split {split}"
            );
            assert!(p.tail_len < SSE_TAIL + split, "the tail window is bounded");
        }
    }

    const OPENAI_JSON: &[u8] = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"the \"usage\": {not this}"}}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42},"system_fingerprint":null}"#;

    #[test]
    fn openai_json_at_every_split() {
        for split in 1..OPENAI_JSON.len() {
            let u = parse(&mut JsonUsage::default(), OPENAI_JSON, split);
            assert_eq!(u, Some(Usage::new(12, 30)), "split {split}");
        }
    }

    #[test]
    fn anthropic_json_and_nested_usage_ignored() {
        let body = br#"{"content":[{"type":"text","text":"hi","usage":{"input_tokens":999}}],"usage":{"input_tokens":7,"output_tokens":3,"cache_read_input_tokens":2}}"#;
        assert_eq!(
            parse(&mut JsonUsage::default(), body, 5),
            Some(Usage::new(9, 3))
        );
    }

    #[test]
    fn bad_numbers_are_ignored() {
        for bad in [
            r#"{"usage":{"prompt_tokens":-1,"completion_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":1.5}}"#,
            r#"{"usage":{"prompt_tokens":"12"}}"#,
            r#"{"usage":{"prompt_tokens":1e400}}"#,
            r#"{"usage":{"prompt_tokens":184467440737095516160}}"#,
            r#"{"usage":null}"#,
            r#"{"usage":{"prompt_tokens":1"#,
            "not json at all",
            "",
        ] {
            assert_eq!(
                parse(&mut JsonUsage::default(), bad.as_bytes(), 3),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn openai_sse_final_chunk() {
        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\r\n\r\n\
data: [DONE]\n\n";
        for split in 1..body.len() {
            assert_eq!(
                parse(&mut SseUsage::default(), body, split),
                Some(Usage::new(5, 2)),
                "split {split}"
            );
        }
    }

    #[test]
    fn anthropic_sse_start_and_last_delta() {
        let body = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"x\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":10}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
        for split in 1..body.len() {
            assert_eq!(
                parse(&mut SseUsage::default(), body, split),
                Some(Usage::new(25, 15)),
                "split {split}"
            );
        }
    }
}
