//! The request and response types of an LLM client service, and the traits through which
//! any request or response type takes part in rate limiting.

use std::borrow::Cow;

/// Token counts an LLM reported for one call.
///
/// `prompt_tokens` counts every input token, cached or not; `cached_prompt_tokens` is
/// the part of them read from a prompt cache. `completion_tokens` counts every output
/// token; `reasoning_tokens` is the part of them spent reasoning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Usage {
    /// Tokens in the prompt (input), cached ones included.
    pub prompt_tokens: u64,
    /// Tokens generated (output), reasoning ones included.
    pub completion_tokens: u64,
    /// Total as reported (normally prompt + completion).
    pub total_tokens: u64,
    /// Prompt tokens read from a prompt cache (OpenAI `cached_tokens`, Anthropic
    /// `cache_read_input_tokens`).
    pub cached_prompt_tokens: u64,
    /// Output tokens spent reasoning (OpenAI `reasoning_tokens`).
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Usage with `total_tokens` = prompt + completion.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            cached_prompt_tokens: 0,
            reasoning_tokens: 0,
        }
    }

    /// Set how many of the prompt tokens were read from a cache.
    pub fn with_cached_prompt_tokens(mut self, tokens: u64) -> Self {
        self.cached_prompt_tokens = tokens;
        self
    }

    /// Set how many of the output tokens were reasoning.
    pub fn with_reasoning_tokens(mut self, tokens: u64) -> Self {
        self.reasoning_tokens = tokens;
        self
    }
}

/// A call to an LLM, the request type of a wrapped LLM client `Service<LlmRequest>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LlmRequest {
    /// Whose budget the call uses (user id, API key hash, team…), read by the default
    /// [`FromRequest`](crate::identifier::FromRequest) extractor.
    pub identifier: Option<String>,
    /// The model to call, if the client names one (for per-model limits and model
    /// filters).
    pub model: Option<String>,
    /// The prompt text.
    pub prompt: String,
    /// The most output tokens the model may generate.
    pub max_tokens: Option<u64>,
}

impl LlmRequest {
    /// A request for `identifier` with `prompt`. A short identifier of safe characters
    /// appears in store keys as it is: pass a secret (an API key) through
    /// [`hash_api_key`](crate::identifier::hash_api_key) first. (Logs and spans show
    /// identifiers only hashed.)
    pub fn new(identifier: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            identifier: Some(identifier.into()),
            prompt: prompt.into(),
            ..Self::default()
        }
    }

    /// Set [`model`](Self::model).
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
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

/// Requests that can estimate the tokens they will use (for `TokenMode::Reserve`), and
/// name their model.
pub trait TokenEstimate {
    /// Estimated prompt + output tokens, if known.
    fn estimated_tokens(&self) -> Option<u64>;

    /// The estimate split into prompt and output tokens, for limits that count them
    /// differently. By default all of [`estimated_tokens`](Self::estimated_tokens) is
    /// counted as prompt.
    fn estimated_usage(&self) -> Option<Usage> {
        self.estimated_tokens().map(|t| Usage::new(t, 0))
    }

    /// The model the request is for, for per-model limits and model filters. Default:
    /// none (only limits without a model filter apply).
    fn model(&self) -> Option<&str> {
        None
    }
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

    fn estimated_usage(&self) -> Option<Usage> {
        Some(Usage::new(
            estimate_prompt_tokens(&self.prompt),
            self.max_tokens.unwrap_or(0),
        ))
    }

    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

impl ReportsUsage for LlmResponse {
    fn reported_usage(&self) -> Option<Usage> {
        self.usage
    }
}
