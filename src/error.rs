//! The one error type of the crate.

use std::fmt;
use std::time::Duration;

/// A boxed error, as tower uses for inner services' errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a rate-limit denial reports, so a caller can back off precisely.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitExceeded {
    /// The name of the limit that denied.
    pub name: std::sync::Arc<str>,
    /// The quota of the limit that denied.
    pub limit: u64,
    /// Units left (clamped at 0).
    pub remaining: u64,
    /// When the same cost could pass, if nothing else is taken meanwhile; `None` if it
    /// never can (the cost exceeds the limit).
    pub retry_after: Option<Duration>,
    /// Time until the budget is fully restored (or the window rolls).
    pub reset_after: Duration,
}

impl fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "limit {:?}: quota {}, remaining {}",
            &*self.name, self.limit, self.remaining
        )?;
        match self.retry_after {
            Some(d) => write!(f, ", retry after {:.3}s", d.as_secs_f64()),
            None => write!(f, ", the cost exceeds the limit and can never pass"),
        }
    }
}

/// The case an [`Error`] is, without its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request-count limit denied the call.
    RequestLimitReached,
    /// The token limit denied the call.
    TokenLimitReached,
    /// The concurrency (in-flight) limit denied the call.
    ConcurrencyLimitReached,
    /// The store could not be reached or answered wrongly.
    Store,
    /// No identifier could be taken from the request and no fallback is configured.
    MissingIdentifier,
    /// A bad argument or configuration (zero windows, costs over the maximum, …).
    InvalidInput,
    /// The wrapped service failed.
    Inner,
}

/// Everything that can go wrong in a rate-limited call.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// `Request limit reached!`: the identifier's request budget is spent.
    RequestLimitReached(LimitExceeded),
    /// `Token limit reached!`: the identifier's token budget is spent.
    TokenLimitReached(LimitExceeded),
    /// Too many calls of this identifier are in flight.
    ConcurrencyLimitReached(LimitExceeded),
    /// The store failed (connection, timeout, unexpected reply).
    Store(StoreError),
    /// The request carries no identifier and no fallback identifier is configured.
    MissingIdentifier,
    /// A bad argument or configuration; the message says which and why.
    InvalidInput(String),
    /// The inner service's own error, passed through unchanged.
    Inner(BoxError),
}

impl Error {
    /// The case, for matching without the payload.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::RequestLimitReached(_) => ErrorKind::RequestLimitReached,
            Error::TokenLimitReached(_) => ErrorKind::TokenLimitReached,
            Error::ConcurrencyLimitReached(_) => ErrorKind::ConcurrencyLimitReached,
            Error::Store(_) => ErrorKind::Store,
            Error::MissingIdentifier => ErrorKind::MissingIdentifier,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::Inner(_) => ErrorKind::Inner,
        }
    }

    /// The denial details if this is a rate-limit error.
    pub fn limit_exceeded(&self) -> Option<&LimitExceeded> {
        match self {
            Error::RequestLimitReached(l)
            | Error::TokenLimitReached(l)
            | Error::ConcurrencyLimitReached(l) => Some(l),
            _ => None,
        }
    }

    /// When the call could be retried, for rate-limit errors that can ever pass.
    pub fn retry_after(&self) -> Option<Duration> {
        self.limit_exceeded().and_then(|l| l.retry_after)
    }

    pub(crate) fn invalid_input(message: impl Into<String>) -> Self {
        Error::InvalidInput(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::RequestLimitReached(l) => write!(f, "Request limit reached! ({l})"),
            Error::TokenLimitReached(l) => write!(f, "Token limit reached! ({l})"),
            Error::ConcurrencyLimitReached(l) => write!(f, "Concurrency limit reached! ({l})"),
            Error::Store(_) => f.write_str("rate-limit store error"),
            Error::MissingIdentifier => {
                f.write_str("no rate-limit identifier in the request and no fallback configured")
            }
            Error::InvalidInput(m) => write!(f, "invalid rate-limit input: {m}"),
            Error::Inner(_) => f.write_str("the rate-limited service failed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Store(e) => Some(e),
            Error::Inner(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

/// A store failure: the message, and the underlying error when there is one.
#[derive(Debug)]
pub struct StoreError {
    message: String,
    timeout: bool,
    source: Option<BoxError>,
}

impl StoreError {
    /// A store error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            timeout: false,
            source: None,
        }
    }

    /// A store error caused by another error.
    pub fn with_source(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            message: message.into(),
            timeout: false,
            source: Some(source.into()),
        }
    }

    /// The store did not answer in time. The operation may still have been applied.
    pub fn timeout(after: Duration) -> Self {
        Self {
            message: format!("store did not answer within {after:?}"),
            timeout: true,
            source: None,
        }
    }

    /// Whether this is a timeout (the operation may or may not have been applied).
    pub fn is_timeout(&self) -> bool {
        self.timeout
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cause, if any, is the `source()`: printed by whoever walks the chain.
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e.as_ref() as &(dyn std::error::Error + 'static))
    }
}
