//! Named limits: what a limit counts, over which scope, for which models.

use std::sync::Arc;

use wildmatch::WildMatch;

use crate::algorithm::{Algorithm, ConcurrencyLimit, MAX_UNITS};
use crate::error::Error;
use crate::llm::Usage;
use crate::store::Rule;

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitKind {
    /// Calls: each call takes 1 before it is dispatched.
    Requests,
    /// Tokens: checked or reserved before the call, settled to the reported usage after.
    Tokens,
    /// Calls in flight: a slot taken before the call, released when it ends.
    Concurrency,
}

impl LimitKind {
    /// `requests`, `tokens` or `concurrency`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::Concurrency => "concurrency",
        }
    }
}

/// Per-token weights of a weighted token count: the units one token of each sort costs.
///
/// With a price table in micro-dollars per token, a token limit becomes a spending
/// budget: `quota = 2_000_000` is $2 per window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenWeights {
    /// Each prompt token not read from a cache.
    pub input: f64,
    /// Each prompt token read from a cache.
    pub cached_input: f64,
    /// Each output token that is not a reasoning token.
    pub output: f64,
    /// Each reasoning token (part of the output).
    pub reasoning: f64,
}

impl TokenWeights {
    /// `input` per prompt token (cached or not) and `output` per output token.
    pub fn new(input: f64, output: f64) -> Self {
        Self {
            input,
            cached_input: input,
            output,
            reasoning: output,
        }
    }

    /// Set the weight of cached prompt tokens.
    pub fn cached_input(mut self, weight: f64) -> Self {
        self.cached_input = weight;
        self
    }

    /// Set the weight of reasoning tokens.
    pub fn reasoning(mut self, weight: f64) -> Self {
        self.reasoning = weight;
        self
    }

    /// `ceil(input × uncached prompt + cached_input × cached prompt + output × plain
    /// output + reasoning × reasoning)`, clamped to the largest cost accepted.
    ///
    /// The sum is taken as the decimal weights write it: a weight such as 1.1 has no
    /// exact binary form (1.1 × 100 comes out as 110.00000000000001), so a sum within
    /// one part in 10^12 of a whole number counts as that number.
    ///
    /// ```
    /// use tower_llm_ratelimit::{TokenWeights, Usage};
    ///
    /// assert_eq!(TokenWeights::new(1.1, 0.0).cost(&Usage::new(100, 7)), 110);
    /// assert_eq!(TokenWeights::new(0.15, 0.6).cost(&Usage::new(1000, 100)), 210);
    /// assert_eq!(TokenWeights::new(0.15, 0.6).cost(&Usage::new(1, 1)), 1);
    /// ```
    pub fn cost(&self, usage: &Usage) -> u64 {
        let cached = usage.cached_prompt_tokens.min(usage.prompt_tokens);
        let reasoning = usage.reasoning_tokens.min(usage.completion_tokens);
        let units = self.input * (usage.prompt_tokens - cached) as f64
            + self.cached_input * cached as f64
            + self.output * (usage.completion_tokens - reasoning) as f64
            + self.reasoning * reasoning as f64;
        if units.is_nan() || units <= 0.0 {
            return 0;
        }
        // The products and sums are each within a few parts in 10^16 of the exact ones.
        let whole = units.round();
        let units = if (units - whole).abs() <= units * 1e-12 {
            whole
        } else {
            units.ceil()
        };
        (units as u64).min(MAX_UNITS)
    }

    fn check(&self) -> Result<(), Error> {
        let all = [self.input, self.cached_input, self.output, self.reasoning];
        if all.iter().all(|w| w.is_finite() && *w >= 0.0) {
            Ok(())
        } else {
            Err(Error::invalid_input(format!(
                "token weights must be finite and not negative, got {self:?}"
            )))
        }
    }
}

/// Weights per model (glob patterns, first match wins), with a default.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    default: TokenWeights,
    models: Vec<(String, TokenWeights)>,
}

impl Weights {
    /// These weights for every model not listed with [`model`](Self::model).
    pub fn new(default: TokenWeights) -> Self {
        Self {
            default,
            models: Vec::new(),
        }
    }

    /// These weights for models matching `pattern` (`*` any run, `?` one character).
    pub fn model(mut self, pattern: impl Into<String>, weights: TokenWeights) -> Self {
        self.models.push((pattern.into(), weights));
        self
    }

    /// The weights that apply to `model`.
    pub fn for_model(&self, model: Option<&str>) -> &TokenWeights {
        model
            .and_then(|m| {
                self.models
                    .iter()
                    .find(|(p, _)| WildMatch::new(p).matches(m))
            })
            .map_or(&self.default, |(_, w)| w)
    }
}

/// What a token limit counts from a call's usage.
#[derive(Clone, Debug, PartialEq, Default)]
#[non_exhaustive]
pub enum TokenCount {
    /// Prompt (input) tokens only.
    #[default]
    Prompt,
    /// Prompt + completion tokens.
    Total,
    /// A weighted sum per model (see [`Weights`]).
    Weighted(Weights),
}

impl TokenCount {
    /// Units this count charges for `usage` of `model`.
    pub fn cost(&self, usage: &Usage, model: Option<&str>) -> u64 {
        let units = match self {
            TokenCount::Prompt => usage.prompt_tokens,
            TokenCount::Total => usage.prompt_tokens.saturating_add(usage.completion_tokens),
            TokenCount::Weighted(w) => w.for_model(model).cost(usage),
        };
        units.min(MAX_UNITS)
    }
}

/// One limit: its kind, algorithm (or concurrency limit) and quota, and the calls it
/// applies to. Added to a layer by name with
/// [`RatelimitLayerBuilder::limit`](crate::layer::RatelimitLayerBuilder::limit).
///
/// ```
/// # fn main() -> Result<(), tower_llm_ratelimit::Error> {
/// use std::time::Duration;
/// use tower_llm_ratelimit::{FixedWindow, Limit, SlidingWindow, TokenCount};
///
/// let per_minute = Limit::requests(FixedWindow::new(60, Duration::from_secs(60))?);
/// let gpt4o_tokens = Limit::tokens(SlidingWindow::new(100_000, Duration::from_secs(60))?)
///     .count(TokenCount::Total)
///     .per_model()
///     .models(["gpt-4o*"]);
/// # let _ = (per_minute, gpt4o_tokens);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Limit {
    pub(crate) kind: LimitKind,
    pub(crate) rule: Rule,
    pub(crate) count: Option<TokenCount>,
    pub(crate) per_model: bool,
    pub(crate) models: Vec<String>,
}

impl Limit {
    /// Count calls under `algorithm`: each call takes 1.
    pub fn requests(algorithm: impl Into<Algorithm>) -> Self {
        Self::with(LimitKind::Requests, Rule::Rate(algorithm.into()))
    }

    /// Count tokens under `algorithm` (prompt tokens unless [`count`](Self::count) says
    /// otherwise, or the layer's `include_output_tokens` / `cost_fn`).
    pub fn tokens(algorithm: impl Into<Algorithm>) -> Self {
        Self::with(LimitKind::Tokens, Rule::Rate(algorithm.into()))
    }

    /// Limit calls in flight.
    pub fn concurrency(limit: ConcurrencyLimit) -> Self {
        Self::with(LimitKind::Concurrency, Rule::Concurrency(limit))
    }

    fn with(kind: LimitKind, rule: Rule) -> Self {
        Self {
            kind,
            rule,
            count: None,
            per_model: false,
            models: Vec::new(),
        }
    }

    /// Token limits: what to count (default: prompt tokens, or the layer-wide
    /// `include_output_tokens` / `cost_fn`). An error at `build()` on other kinds.
    pub fn count(mut self, count: TokenCount) -> Self {
        self.count = Some(count);
        self
    }

    /// A separate budget per identifier *and model* (the model comes from the request).
    pub fn per_model(mut self) -> Self {
        self.per_model = true;
        self
    }

    /// Apply only to calls whose model matches one of these glob patterns (`*` any run
    /// of characters, `?` one). Calls without a model do not match.
    pub fn models<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.models.extend(patterns.into_iter().map(Into::into));
        self
    }

    /// The kind.
    pub fn kind(&self) -> LimitKind {
        self.kind
    }
}

/// Longest limit name accepted.
pub(crate) const MAX_LIMIT_NAME: usize = 64;

/// Checks a limit name: 1..=64 bytes of `[A-Za-z0-9_.-]` (it appears in keys, headers
/// and metric labels).
pub(crate) fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LIMIT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "limit name {name:?} must be 1 to {MAX_LIMIT_NAME} bytes of letters, digits, '_', '.' or '-'"
        )))
    }
}

/// A configured limit, ready for the engine.
#[derive(Clone, Debug)]
pub(crate) struct LimitSpec {
    pub name: Arc<str>,
    pub kind: LimitKind,
    pub rule: Rule,
    /// Token limits: what they count, when set on the limit itself (else the layer's
    /// `cost_fn` or `include_output_tokens` decides).
    pub count: Option<TokenCount>,
    pub per_model: bool,
    pub models: Vec<WildMatch>,
    /// `<layer prefix>:<name>`.
    pub prefix: String,
    /// `<prefix>:{`: what the limit's keys start with, but for per-model ones.
    pub key_head: Box<str>,
    /// Its metrics' keys (labelled with its name).
    pub metrics: super::metrics::LimitKeys,
}

impl LimitSpec {
    pub(crate) fn new(name: &str, limit: Limit, layer_prefix: &str) -> Result<Self, Error> {
        validate_name(name)?;
        if limit.count.is_some() && limit.kind != LimitKind::Tokens {
            return Err(Error::invalid_input(format!(
                "limit {name:?}: a token count only applies to token limits"
            )));
        }
        if let Some(TokenCount::Weighted(w)) = &limit.count {
            w.default.check()?;
            for (_, m) in &w.models {
                m.check()?;
            }
        }
        let prefix = format!("{layer_prefix}:{name}");
        crate::store::validate_prefix(&prefix)?;
        let name: Arc<str> = name.into();
        Ok(Self {
            metrics: super::metrics::LimitKeys::new(&name),
            name,
            kind: limit.kind,
            rule: limit.rule,
            count: limit.count,
            per_model: limit.per_model,
            models: limit.models.iter().map(|p| WildMatch::new(p)).collect(),
            key_head: [&prefix, ":{"].concat().into(),
            prefix,
        })
    }

    /// Whether this limit applies to a call for `model`.
    pub(crate) fn applies_to(&self, model: Option<&str>) -> bool {
        self.models.is_empty() || model.is_some_and(|m| self.models.iter().any(|p| p.matches(m)))
    }
}
