//! What the layer reads from a JSON request body: the token estimate for `Reserve`
//! mode, and whether to ask an OpenAI upstream for streamed usage.

use bytes::Bytes;
use serde_json::Value;

/// The outcome of reading one request body.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Inspection {
    /// Estimated prompt + output tokens, if the body is a JSON object.
    pub estimate: Option<u64>,
    /// Estimated prompt tokens alone, if the body is a JSON object.
    pub prompt: Option<u64>,
    /// The `"model"` the request names.
    pub model: Option<String>,
    /// The body to send instead (with `stream_options.include_usage` added).
    pub rewritten: Option<Bytes>,
    /// The client did not ask for the usage chunk: remove it from the stream.
    pub filter_usage_chunk: bool,
}

/// Fields whose text makes up the prompt, across OpenAI (chat, completions, Responses)
/// and Anthropic request shapes.
const PROMPT_FIELDS: [&str; 7] = [
    "messages",
    "prompt",
    "input",
    "instructions",
    "system",
    "tools",
    "functions",
];

/// The tokens one image (or other media: audio, a file) is estimated at, instead of the
/// length of its base64 text. A 1024×1024 image is 765 tokens at OpenAI's high detail
/// and about 1,400 at Anthropic's; 1,000 is a middle.
pub(crate) const MEDIA_TOKENS: u64 = 1000;

/// Base64 this long or longer, under a `data` key, is media rather than text.
const MIN_MEDIA_BASE64: usize = 256;

/// What a part of a request body adds to the prompt: text bytes and media items.
#[derive(Default)]
struct PromptSize {
    text_bytes: usize,
    media: u64,
}

impl PromptSize {
    fn add(&mut self, v: &Value, key: Option<&str>) {
        match v {
            // Data URLs (`data:image/png;base64,…`) and long base64 under `data` (Anthropic
            // image sources, OpenAI audio) are media, however long their text.
            Value::String(s) if s.starts_with("data:") => self.media += 1,
            Value::String(s)
                if key == Some("data")
                    && s.len() >= MIN_MEDIA_BASE64
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+/=\n\r".contains(&b)) =>
            {
                self.media += 1
            }
            Value::String(s) => self.text_bytes += s.len(),
            Value::Array(a) => a.iter().for_each(|x| self.add(x, None)),
            Value::Object(o) => o.iter().for_each(|(k, x)| self.add(x, Some(k))),
            _ => {}
        }
    }
}

/// Read `body`: estimate = prompt text / 4 + media × [`MEDIA_TOKENS`] + output, where
/// output is `max_completion_tokens`, `max_tokens` or `max_output_tokens` (else
/// `default_output`), times `n`. With `inject_usage`, a streamed OpenAI chat or
/// completions request that does not ask for usage gets
/// `stream_options.include_usage = true`.
pub(crate) fn inspect(body: &[u8], default_output: u64, inject_usage: bool) -> Inspection {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else {
        return Inspection::default();
    };
    let per_choice = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_u64))
        .unwrap_or(default_output);
    let choices = obj
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 128);
    let output = per_choice.saturating_mul(choices);
    let mut size = PromptSize::default();
    for field in PROMPT_FIELDS {
        if let Some(v) = obj.get(field) {
            size.add(v, None);
        }
    }
    // The rule of `estimate_prompt_tokens` (4 bytes a token) on the prompt's text.
    let prompt = (size.text_bytes as u64)
        .div_ceil(4)
        .saturating_add(size.media.saturating_mul(MEDIA_TOKENS));
    let mut inspection = Inspection {
        estimate: Some(prompt.saturating_add(output)),
        prompt: Some(prompt),
        model: obj.get("model").and_then(Value::as_str).map(str::to_owned),
        ..Inspection::default()
    };
    let streamed = obj.get("stream").and_then(Value::as_bool) == Some(true);
    if inject_usage && streamed {
        let options = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        // `"stream_options": null` asks for nothing: the same as leaving it out.
        if options.is_null() {
            *options = Value::Object(Default::default());
        }
        if let Value::Object(options) = options
            && options.get("include_usage").and_then(Value::as_bool) != Some(true)
        {
            options.insert("include_usage".into(), Value::Bool(true));
            inspection.filter_usage_chunk = true;
            inspection.rewritten = serde_json::to_vec(&obj).ok().map(Bytes::from);
        }
    }
    inspection
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_prompt_and_output() {
        let body =
            br#"{"model":"m","messages":[{"role":"user","content":"12345678"}],"max_tokens":100}"#;
        let i = inspect(body, 7, true);
        // "user" + "12345678" = 12 bytes = 3 tokens, + 100.
        assert_eq!(i.estimate, Some(103));
        assert_eq!(i.rewritten, None);
        let i = inspect(br#"{"prompt":"abcd"}"#, 7, true);
        assert_eq!(i.estimate, Some(8));
    }

    #[test]
    fn streamed_requests_ask_for_usage_once() {
        let i = inspect(br#"{"messages":[],"stream":true}"#, 0, true);
        assert!(i.filter_usage_chunk);
        let v: Value = serde_json::from_slice(&i.rewritten.unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        let null = inspect(br#"{"stream":true,"stream_options":null}"#, 0, true);
        assert!(null.filter_usage_chunk && null.rewritten.is_some());
        let asked = inspect(
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            0,
            true,
        );
        assert!(!asked.filter_usage_chunk && asked.rewritten.is_none());
        assert!(inspect(br#"{"stream":true}"#, 0, false).rewritten.is_none());
        // A non-object stream_options is left alone rather than clobbered.
        assert!(
            inspect(br#"{"stream":true,"stream_options":5}"#, 0, true)
                .rewritten
                .is_none()
        );
    }

    #[test]
    fn responses_api_n_and_media_are_estimated() {
        let i = inspect(
            br#"{"model":"gpt-4o","instructions":"abcd","input":"efgh","max_output_tokens":50}"#,
            7,
            true,
        );
        assert_eq!((i.prompt, i.estimate), (Some(2), Some(52)));
        let i = inspect(br#"{"messages":[],"max_tokens":10,"n":3}"#, 7, true);
        assert_eq!(i.estimate, Some(30));
        let image = "A".repeat(1_100_000);
        let openai = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"what is this"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}],"max_tokens":100}}"#
        );
        let i = inspect(openai.as_bytes(), 0, false);
        // "user" + "what is this" + "text" + "image_url" text, one image, 100 output.
        assert!(i.prompt.unwrap() >= MEDIA_TOKENS && i.prompt.unwrap() < MEDIA_TOKENS + 20);
        let anthropic = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{image}"}}}}]}}],"max_tokens":100}}"#
        );
        let i = inspect(anthropic.as_bytes(), 0, false);
        assert!(i.prompt.unwrap() >= MEDIA_TOKENS && i.prompt.unwrap() < MEDIA_TOKENS + 20);
    }

    #[test]
    fn malformed_bodies_are_ignored() {
        for body in [
            &b"not json"[..],
            b"[1,2]",
            b"",
            b"{\"max_tokens\":-5}",
            &[0xff, 0xfe],
        ] {
            let i = inspect(body, 3, true);
            assert!(i.rewritten.is_none());
            assert!(i.estimate.is_none() || i.estimate == Some(3));
        }
    }
}
