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

/// Fields whose text makes up the prompt, across OpenAI and Anthropic request shapes.
const PROMPT_FIELDS: [&str; 6] = [
    "messages",
    "prompt",
    "input",
    "system",
    "tools",
    "functions",
];

fn text_len(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(text_len).sum(),
        Value::Object(o) => o.values().map(text_len).sum(),
        _ => 0,
    }
}

/// Read `body`: estimate = prompt text / 4 + (`max_completion_tokens` or `max_tokens`, or
/// `default_output`). With `inject_usage`, a streamed OpenAI request that does not ask for
/// usage gets `stream_options.include_usage = true`.
pub(crate) fn inspect(body: &[u8], default_output: u64, inject_usage: bool) -> Inspection {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else {
        return Inspection::default();
    };
    let output = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_u64))
        .unwrap_or(default_output);
    let prompt_bytes: usize = PROMPT_FIELDS
        .iter()
        .filter_map(|k| obj.get(*k))
        .map(text_len)
        .sum();
    // The rule of `estimate_prompt_tokens` (4 bytes a token), on the prompt's text.
    let prompt = (prompt_bytes as u64).div_ceil(4);
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
