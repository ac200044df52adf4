//! The request and response types of an LLM client service, and the traits through which
//! any request or response type takes part in rate limiting.

use std::borrow::Cow;

/// Token counts an LLM reported for one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Tokens in the prompt (input).
    pub prompt_tokens: u64,
    /// Tokens generated (output).
    pub completion_tokens: u64,
    /// Total as reported (normally prompt + completion).
    pub total_tokens: u64,
}

impl Usage {
    /// Usage with `total_tokens` = prompt + completion.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// A call to an LLM, the request type of a wrapped LLM client `Service<LlmRequest>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LlmRequest {
    /// Whose budget the call uses (user id, API key hash, team…), read by the default
    /// [`FromRequest`](crate::identifier::FromRequest) extractor.
    pub identifier: Option<String>,
    /// The model to call.
    pub model: String,
    /// The prompt text.
    pub prompt: String,
    /// The most output tokens the model may generate.
    pub max_tokens: Option<u64>,
}

impl LlmRequest {
    /// A request for `identifier` with `prompt`.
    pub fn new(identifier: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            identifier: Some(identifier.into()),
            prompt: prompt.into(),
            ..Self::default()
        }
    }

    /// Set [`max_tokens`](Self::max_tokens).
    pub fn with_max_tokens(mut self, max_tokens: u64) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }
}

/// An LLM's answer, the response type of a wrapped LLM client service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LlmResponse {
    /// The generated text.
    pub text: String,
    /// The usage the model reported, if it did.
    pub usage: Option<Usage>,
}

/// Requests that carry their own identifier.
pub trait HasIdentifier {
    /// The identifier, if the request has one.
    fn identifier(&self) -> Option<Cow<'_, [u8]>>;
}

/// Requests that can estimate the tokens they will use (for `TokenMode::Reserve`).
pub trait TokenEstimate {
    /// Estimated prompt + output tokens, if known.
    fn estimated_tokens(&self) -> Option<u64>;
}

/// Responses that report token usage.
pub trait ReportsUsage {
    /// The usage reported, if any.
    fn reported_usage(&self) -> Option<Usage>;
}

/// A rough prompt estimate without a tokenizer: one token per 4 bytes, rounded up.
/// English text averages about 4 characters per token in OpenAI's tokenizers.
pub fn estimate_prompt_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

impl HasIdentifier for LlmRequest {
    fn identifier(&self) -> Option<Cow<'_, [u8]>> {
        self.identifier
            .as_deref()
            .map(|s| Cow::Borrowed(s.as_bytes()))
    }
}

impl TokenEstimate for LlmRequest {
    fn estimated_tokens(&self) -> Option<u64> {
        let prompt = estimate_prompt_tokens(&self.prompt);
        Some(prompt.saturating_add(self.max_tokens.unwrap_or(0)))
    }
}

impl ReportsUsage for LlmResponse {
    fn reported_usage(&self) -> Option<Usage> {
        self.usage
    }
}
