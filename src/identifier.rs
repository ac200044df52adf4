//! Identifier extractors: how the layer learns whose budget a request uses (SPEC §5.5).

use std::borrow::Cow;
use std::sync::Arc;

use crate::llm::HasIdentifier;

/// Takes the identifier out of a request.
pub trait ExtractIdentifier<R>: Clone + Send + Sync + 'static {
    /// The identifier, or `None` if the request has none.
    fn extract<'r>(&self, request: &'r R) -> Option<Cow<'r, [u8]>>;
}

/// The request's own identifier ([`HasIdentifier`]); the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct FromRequest;

impl<R: HasIdentifier> ExtractIdentifier<R> for FromRequest {
    fn extract<'r>(&self, request: &'r R) -> Option<Cow<'r, [u8]>> {
        request.identifier()
    }
}

/// The same identifier for every request (one budget shared by all callers).
#[derive(Clone, Debug)]
pub struct Fixed(Arc<[u8]>);

impl Fixed {
    /// Always `identifier`.
    pub fn new(identifier: impl AsRef<[u8]>) -> Self {
        Self(identifier.as_ref().into())
    }
}

impl<R> ExtractIdentifier<R> for Fixed {
    fn extract<'r>(&self, _: &'r R) -> Option<Cow<'r, [u8]>> {
        Some(Cow::Owned(self.0.to_vec()))
    }
}

/// An identifier computed by a closure.
#[derive(Clone)]
pub struct FromFn<F>(F);

impl<F> FromFn<F> {
    /// Use `f(&request)` as the identifier.
    pub fn new(f: F) -> Self {
        Self(f)
    }
}

impl<F> std::fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FromFn(..)")
    }
}

impl<R, F, I> ExtractIdentifier<R> for FromFn<F>
where
    F: Fn(&R) -> Option<I> + Clone + Send + Sync + 'static,
    I: AsRef<[u8]>,
{
    fn extract<'r>(&self, request: &'r R) -> Option<Cow<'r, [u8]>> {
        (self.0)(request).map(|i| Cow::Owned(i.as_ref().to_vec()))
    }
}
