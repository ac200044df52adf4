//! Reading token usage out of response bodies as they stream by, in bounded memory.
//!
//! Built in ([`OpenAiAnthropic`]): OpenAI chat/completions/embeddings and Responses JSON
//! (`usage`), OpenAI chat SSE (the chunk carrying `usage`, normally the last), OpenAI
//! Responses SSE (`response.completed` → `response.usage`, however long that event),
//! Anthropic Messages JSON (`usage.input_tokens`/`output_tokens` and cache tokens) and SSE
//! (`message_start` input tokens, the last `message_delta` output tokens). Cached and
//! reasoning tokens are read too. Other shapes plug in through [`UsageFormat`].
//!
//! Bad input never panics and never fails the response: malformed JSON or SSE, usage
//! numbers that are negative, fractional, strings or beyond `u64` are ignored with a
//! warning (the call is then charged as one without usage).

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
    /// Whether the usage read so far is the answer's final count, not a partial one
    /// (as Anthropic's `message_start` is, before `message_delta` gives the output
    /// tokens). A final usage is charged as it is when bytes after it cannot be read (a
    /// compressed body with trailing bytes, which clients ignore); a partial one only
    /// as a minimum. `false` unless a parser says so.
    fn is_final(&self) -> bool {
        false
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
    // OpenAI: `prompt_tokens_details` / `input_tokens_details` (Responses) carry
    // `cached_tokens`, `completion_tokens_details` / `output_tokens_details` carry
    // `reasoning_tokens`. Anthropic: cache reads are `cache_read_input_tokens`.
    let detail = |outer: &str, inner: &str| -> Result<Option<u64>, String> {
        match obj.get(outer).and_then(|d| d.get(inner)) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                format!("usage field {outer}.{inner} is not a non-negative integer: {v}")
            }),
        }
    };
    let cached = detail("prompt_tokens_details", "cached_tokens")?
        .or(detail("input_tokens_details", "cached_tokens")?)
        .or(cache_read);
    let reasoning = detail("completion_tokens_details", "reasoning_tokens")?
        .or(detail("output_tokens_details", "reasoning_tokens")?);
    usage.cached_prompt_tokens = cached.unwrap_or(0).min(prompt);
    usage.reasoning_tokens = reasoning.unwrap_or(0).min(completion);
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

    /// A JSON body holds one usage, the answer's.
    fn is_final(&self) -> bool {
        self.usage.is_some()
    }
}

/// What the SSE scanner is doing at the current byte of a line.
#[derive(Clone, Debug, Default)]
enum Scan {
    /// Looking for a `"usage"` or `"type"` key.
    #[default]
    Idle,
    /// After a key: skipping whitespace up to its `:`.
    AfterKey(Key),
    /// After the `:`: skipping whitespace up to the value.
    AfterColon(Key),
    /// Inside the `usage` object: its bytes, with the nesting and string state.
    Usage {
        bytes: Vec<u8>,
        depth: u32,
        in_string: bool,
        escaped: bool,
    },
    /// Inside a `type` string: its first bytes (only two short values matter).
    Type {
        bytes: [u8; MAX_TYPE],
        len: usize,
        escaped: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Usage,
    Type,
}

/// The longest `type` value kept (the two that matter are 13 bytes).
const MAX_TYPE: usize = 16;

static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));

static TYPE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"type\""));

/// Reads usage from an OpenAI (chat or Responses) or Anthropic `text/event-stream` body.
///
/// A streaming scanner over each line: it looks for `"usage"` keys (with `memmem`, so
/// most bytes are skipped by a vectorised search) and keeps only the usage object's
/// bytes and the line's event `type`. Nothing else of the stream is kept: memory stays
/// a few hundred bytes whatever the length of the stream or of one event (a Responses
/// API `response.completed` event carries the whole output text before its usage). A
/// key counts only when its opening quote is not escaped (text inside strings is never
/// mistaken for a key: in valid JSON a quote after a backslash never opens a key).
#[derive(Default)]
pub struct SseUsage {
    scan: Scan,
    /// Whether the current line has a `"type"` of `message_start` / `message_delta`
    /// (the event's own, in whatever order its keys come).
    line_start: bool,
    line_delta: bool,
    /// The last usage object of the current line, applied when the line ends (when its
    /// event type is known).
    line_usage: Option<Usage>,
    /// The last bytes of the current line (for keys split across frames), and whether
    /// the byte before them was a backslash.
    carry: Vec<u8>,
    usage: Option<Usage>,
    /// Anthropic: input (and cached) tokens from `message_start`.
    anthropic_input: Option<(u64, u64)>,
    /// The usage read last came from `message_start` (only its input tokens are final).
    partial: bool,
}

impl SseUsage {
    /// A usage object ended: keep it until the line ends.
    fn usage_object(&mut self, bytes: &[u8]) {
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => return warn_bad_usage(&format!("usage is not valid JSON: {e}")),
        };
        match usage_from_json(&value) {
            Ok(Some(u)) => self.line_usage = Some(u),
            Ok(None) => {}
            Err(reason) => warn_bad_usage(&reason),
        }
    }

    /// Apply a line's usage according to its event type.
    fn apply(&mut self, u: Usage) {
        let event = if self.line_start {
            Some(&b"message_start"[..])
        } else if self.line_delta {
            Some(&b"message_delta"[..])
        } else {
            None
        };
        match event {
            Some(b"message_start") => {
                self.anthropic_input = Some((u.prompt_tokens, u.cached_prompt_tokens));
                self.usage = Some(u);
                self.partial = true;
            }
            Some(b"message_delta") => {
                // Output tokens in message_delta are cumulative: the last one wins. Input
                // tokens come from message_start unless the delta restates them.
                let (input, cached) = if u.prompt_tokens > 0 {
                    (u.prompt_tokens, u.cached_prompt_tokens)
                } else {
                    self.anthropic_input.unwrap_or((0, 0))
                };
                self.usage = Some(
                    Usage::new(input, u.completion_tokens)
                        .with_cached_prompt_tokens(cached)
                        .with_reasoning_tokens(u.reasoning_tokens),
                );
                self.partial = false;
            }
            _ => {
                self.usage = Some(u);
                self.partial = false;
            }
        }
    }

    /// Feed bytes of one line (no newline in `seg`).
    fn segment(&mut self, seg: &[u8]) {
        let mut i = 0;
        while i < seg.len() {
            match &mut self.scan {
                Scan::Idle => {
                    let rest = &seg[i..];
                    // A key split across frames starts in `carry` and ends in `rest`
                    // (keys wholly inside `carry` were seen with the previous frame).
                    let before = self.carry.last().copied();
                    if !self.carry.is_empty() {
                        let mut joined = self.carry.clone();
                        let carried = joined.len();
                        joined.extend_from_slice(&rest[..rest.len().min(8)]);
                        let mut from = 0;
                        let mut spanning = None;
                        while let Some((at, key, len)) = find_key(&joined, from) {
                            if at >= carried {
                                break;
                            }
                            if at + len > carried {
                                spanning = Some((key, at + len - carried));
                                break;
                            }
                            from = at + 1;
                        }
                        if let Some((key, used)) = spanning {
                            i += used;
                            self.start_key(key);
                            continue;
                        }
                    }
                    let found = match find_key(rest, 0) {
                        // The byte before `rest` was a backslash: not a key.
                        Some((0, _, _)) if before == Some(b'\\') => find_key(rest, 1),
                        found => found,
                    };
                    match found {
                        Some((at, key, len)) => {
                            i += at + len;
                            self.start_key(key);
                        }
                        None => {
                            // Keep the last bytes for a key split across frames.
                            roll(&mut self.carry, rest);
                            return;
                        }
                    }
                }
                Scan::AfterKey(key) => {
                    let (key, b) = (*key, seg[i]);
                    i += 1;
                    self.scan = match b {
                        b':' => Scan::AfterColon(key),
                        b' ' | b'\t' | b'\r' => continue,
                        _ => Scan::Idle,
                    };
                }
                Scan::AfterColon(key) => {
                    let (key, b) = (*key, seg[i]);
                    i += 1;
                    self.scan = match (key, b) {
                        (_, b' ' | b'\t' | b'\r') => continue,
                        (Key::Usage, b'{') => Scan::Usage {
                            bytes: vec![b'{'],
                            depth: 1,
                            in_string: false,
                            escaped: false,
                        },
                        (Key::Type, b'"') => Scan::Type {
                            bytes: [0; MAX_TYPE],
                            len: 0,
                            escaped: false,
                        },
                        _ => Scan::Idle,
                    };
                }
                Scan::Usage {
                    bytes,
                    depth,
                    in_string,
                    escaped,
                } => {
                    let b = seg[i];
                    i += 1;
                    if bytes.len() >= MAX_USAGE_VALUE {
                        warn_bad_usage("usage value too large");
                        self.scan = Scan::Idle;
                        continue;
                    }
                    bytes.push(b);
                    if *in_string {
                        if *escaped {
                            *escaped = false;
                        } else if b == b'\\' {
                            *escaped = true;
                        } else if b == b'"' {
                            *in_string = false;
                        }
                    } else {
                        match b {
                            b'"' => *in_string = true,
                            b'{' | b'[' => *depth += 1,
                            b'}' | b']' => {
                                *depth -= 1;
                                if *depth == 0 {
                                    let object = std::mem::take(bytes);
                                    self.scan = Scan::Idle;
                                    self.usage_object(&object);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Scan::Type {
                    bytes,
                    len,
                    escaped,
                } => {
                    let b = seg[i];
                    i += 1;
                    if *escaped {
                        *escaped = false;
                    } else if b == b'\\' {
                        *escaped = true;
                    } else if b == b'"' {
                        let value = &bytes[..(*len).min(MAX_TYPE)];
                        self.line_start |= value == b"message_start";
                        self.line_delta |= value == b"message_delta";
                        self.scan = Scan::Idle;
                        continue;
                    }
                    if *len < MAX_TYPE {
                        bytes[*len] = b;
                    }
                    *len += 1;
                }
            }
        }
    }

    fn start_key(&mut self, key: Key) {
        self.carry.clear();
        self.scan = Scan::AfterKey(key);
    }

    /// The line ended: whatever it was inside is abandoned.
    fn end_line(&mut self) {
        if matches!(self.scan, Scan::Usage { .. }) {
            warn_bad_usage("usage object cut by the end of its SSE line");
        }
        self.scan = Scan::Idle;
        if let Some(u) = self.line_usage.take() {
            self.apply(u);
        }
        self.line_start = false;
        self.line_delta = false;
        self.carry.clear();
    }

    /// Nothing of the current line is pending: lines up to the next key can be skipped.
    fn line_is_clean(&self) -> bool {
        matches!(self.scan, Scan::Idle)
            && self.line_usage.is_none()
            && !self.line_start
            && !self.line_delta
    }

    /// Where, in `rest`, the line holding the next key starts (`Some(0)`: the current
    /// line, including a key split across the previous frame); `None`: no key.
    fn next_key_line(&self, rest: &[u8]) -> Option<usize> {
        if !self.carry.is_empty() {
            let mut joined = self.carry.clone();
            let carried = joined.len();
            joined.extend_from_slice(&rest[..rest.len().min(8)]);
            let mut from = 0;
            while let Some((at, _, len)) = find_key(&joined, from) {
                if at >= carried {
                    break;
                }
                if at + len > carried {
                    return Some(0);
                }
                from = at + 1;
            }
        }
        let (at, _, _) = find_key(rest, 0)?;
        Some(memchr::memrchr(b'\n', &rest[..at]).map_or(0, |nl| nl + 1))
    }
}

/// Append `bytes` to the window of a line's last bytes, keeping at most 8.
fn roll(window: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.len() >= 8 {
        window.clear();
        window.extend_from_slice(&bytes[bytes.len() - 8..]);
    } else {
        window.extend_from_slice(bytes);
        let excess = window.len().saturating_sub(8);
        window.drain(..excess);
    }
}

/// The first `"usage"` or `"type"` key in `hay` at or after `from` whose opening quote is
/// not escaped: `(position, key, length)`.
fn find_key(hay: &[u8], from: usize) -> Option<(usize, Key, usize)> {
    let mut from = from;
    loop {
        let usage = USAGE_KEY
            .find(&hay[from..])
            .map(|p| (p + from, Key::Usage, 7));
        let kind = TYPE_KEY
            .find(&hay[from..])
            .map(|p| (p + from, Key::Type, 6));
        let found = match (usage, kind) {
            (Some(u), Some(t)) => Some(if u.0 <= t.0 { u } else { t }),
            (u, t) => u.or(t),
        }?;
        if found.0 > 0 && hay[found.0 - 1] == b'\\' {
            from = found.0 + 1;
            continue;
        }
        return Some(found);
    }
}

impl UsageParser for SseUsage {
    fn feed(&mut self, chunk: &Bytes) {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            if self.line_is_clean() {
                // Lines before the next key hold nothing to read: skip them whole.
                match self.next_key_line(rest) {
                    None => {
                        // Keep the current line's last bytes, for a key split across
                        // frames.
                        match memchr::memrchr(b'\n', rest) {
                            Some(nl) => {
                                self.carry.clear();
                                roll(&mut self.carry, &rest[nl + 1..]);
                            }
                            None => roll(&mut self.carry, rest),
                        }
                        return;
                    }
                    Some(0) => {}
                    Some(start) => {
                        self.carry.clear();
                        rest = &rest[start..];
                    }
                }
            }
            match memchr::memchr(b'\n', rest) {
                Some(nl) => {
                    self.segment(&rest[..nl]);
                    self.end_line();
                    rest = &rest[nl + 1..];
                }
                None => {
                    self.segment(rest);
                    return;
                }
            }
        }
    }

    fn usage(&mut self) -> Option<Usage> {
        self.usage
    }

    fn finish(&mut self) -> Option<Usage> {
        self.end_line();
        self.usage
    }

    /// OpenAI's usage chunk and Anthropic's `message_delta` are the answer's count.
    fn is_final(&self) -> bool {
        self.usage.is_some() && !self.partial
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
        for split in [7, 1000, 70_000] {
            let mut p = SseUsage::default();
            assert_eq!(
                parse(&mut p, &body, split),
                Some(Usage::new(9, 20000)),
                "split {split}"
            );
            assert!(p.carry.capacity() <= 64, "nothing of the stream is kept");
        }
    }

    /// A Responses API stream whose `response.completed` event carries 200 KB of output
    /// text before its usage; text that quotes a usage object is not mistaken for one.
    fn responses_stream() -> Vec<u8> {
        let text = "word \\\"usage\\\": {\\\"input_tokens\\\": 999} ".repeat(5000);
        let mut body = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n".to_vec();
        body.extend_from_slice(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"word\"}\n\n");
        body.extend_from_slice(format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"r\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{text}\"}}]}}],\"usage\":{{\"input_tokens\":37,\"input_tokens_details\":{{\"cached_tokens\":5}},\"output_tokens\":4050,\"output_tokens_details\":{{\"reasoning_tokens\":50}},\"total_tokens\":4087}},\"user\":null}}}}\n\n"
        ).as_bytes());
        body
    }

    #[test]
    fn responses_api_usage_after_a_huge_final_event() {
        let body = responses_stream();
        assert!(body.len() > 200_000);
        let want = Usage::new(37, 4050)
            .with_cached_prompt_tokens(5)
            .with_reasoning_tokens(50);
        for split in [1, 3, 7, 8, 9, 100, 4096, 1 << 20] {
            let mut p = SseUsage::default();
            assert_eq!(parse(&mut p, &body, split), Some(want), "split {split}");
        }
    }

    #[test]
    fn cached_and_reasoning_tokens_are_read() {
        let openai = br#"{"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150,"prompt_tokens_details":{"cached_tokens":60},"completion_tokens_details":{"reasoning_tokens":20}}}"#;
        assert_eq!(
            parse(&mut JsonUsage::default(), openai, 7),
            Some(
                Usage::new(100, 50)
                    .with_cached_prompt_tokens(60)
                    .with_reasoning_tokens(20)
            )
        );
        let anthropic = br#"{"usage":{"input_tokens":10,"cache_creation_input_tokens":20,"cache_read_input_tokens":30,"output_tokens":5}}"#;
        assert_eq!(
            parse(&mut JsonUsage::default(), anthropic, 7),
            Some(Usage::new(60, 5).with_cached_prompt_tokens(30))
        );
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
            Some(Usage::new(9, 3).with_cached_prompt_tokens(2))
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
