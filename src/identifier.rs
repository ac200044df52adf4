//! Identifier extractors: how the layer learns whose budget a request uses.

use std::borrow::Cow;
use std::sync::Arc;

use crate::llm::HasIdentifier;

/// Takes the identifier out of a request.
pub trait ExtractIdentifier<R>: Clone + Send + Sync + 'static {
    /// The identifier, or `None` if the request has none.
    fn extract<'r>(&self, request: &'r R) -> Option<Cow<'r, [u8]>>;
}

/// The first identifier `A` finds, else `B`'s (e.g. a user header, else the API key).
#[derive(Clone, Debug, Default)]
pub struct Or<A, B>(pub A, pub B);

impl<R, A, B> ExtractIdentifier<R> for Or<A, B>
where
    A: ExtractIdentifier<R>,
    B: ExtractIdentifier<R>,
{
    fn extract<'r>(&self, request: &'r R) -> Option<Cow<'r, [u8]>> {
        self.0.extract(request).or_else(|| self.1.extract(request))
    }
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

/// The value of a request header (any bytes); absent or empty headers give no identifier.
#[derive(Clone, Debug)]
pub struct Header(http::HeaderName);

impl Header {
    /// Read the identifier from header `name` (e.g. `x-user-id`).
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name; use [`Header::try_new`] for names from
    /// configuration.
    pub fn new(name: &'static str) -> Self {
        Self(http::HeaderName::from_static(name))
    }

    /// Like [`new`](Self::new), for names not known at compile time.
    pub fn try_new(name: &str) -> Result<Self, crate::Error> {
        http::HeaderName::try_from(name.to_ascii_lowercase())
            .map(Self)
            .map_err(|e| crate::Error::InvalidInput(format!("invalid header name {name:?}: {e}")))
    }
}

impl<B> ExtractIdentifier<http::Request<B>> for Header {
    fn extract<'r>(&self, request: &'r http::Request<B>) -> Option<Cow<'r, [u8]>> {
        request
            .headers()
            .get(&self.0)
            .map(|v| v.as_bytes())
            .filter(|v| !v.is_empty())
            .map(Cow::Borrowed)
    }
}

/// The API key of the request, hashed: `Authorization: Bearer <key>` (OpenAI) or
/// `x-api-key: <key>` (Anthropic). The identifier is `key-` and the hex SHA-256 of the
/// key, so raw keys never reach store keys or logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApiKey;

/// Hex SHA-256 of an API key, prefixed with `key-`.
pub fn hash_api_key(key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let digest = Sha256::digest(key);
    let mut out = String::with_capacity(68);
    out.push_str("key-");
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl<B> ExtractIdentifier<http::Request<B>> for ApiKey {
    fn extract<'r>(&self, request: &'r http::Request<B>) -> Option<Cow<'r, [u8]>> {
        let headers = request.headers();
        let bearer = || {
            headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes())
                .and_then(|v| {
                    let (scheme, rest) = v.split_at(v.len().min(7));
                    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
                })
        };
        let x_api_key = || headers.get("x-api-key").map(|v| v.as_bytes());
        // The credential the provider authenticates with comes first: Anthropic's
        // Messages API reads `x-api-key`, OpenAI's reads the bearer token. A client
        // cannot pick new budgets by varying the header the provider ignores.
        let key = if request.uri().path().contains("/messages") {
            x_api_key().or_else(bearer)
        } else {
            bearer().or_else(x_api_key)
        };
        let key = key.map(|k| k.trim_ascii()).filter(|k| !k.is_empty())?;
        Some(Cow::Owned(hash_api_key(key).into_bytes()))
    }
}

/// HTTP requests are identified by their hashed API key by default (see [`ApiKey`]):
/// something a client cannot choose freely. A header the client sets itself (such as
/// `x-user-id`) must be chosen explicitly with [`Header`], and only behind a trusted
/// proxy that sets it.
impl<B> HasIdentifier for http::Request<B> {
    fn identifier(&self) -> Option<Cow<'_, [u8]>> {
        ApiKey.extract(self)
    }
}

/// A value the application put in the request's extensions (e.g. an authenticated user
/// id set by an auth middleware earlier in the stack).
#[derive(Debug)]
pub struct Extension<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Extension<T> {
    /// Read the identifier from the request extension of type `T`.
    pub fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T> Default for Extension<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Extension<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<B, T> ExtractIdentifier<http::Request<B>> for Extension<T>
where
    T: AsRef<[u8]> + Clone + Send + Sync + 'static,
{
    fn extract<'r>(&self, request: &'r http::Request<B>) -> Option<Cow<'r, [u8]>> {
        request
            .extensions()
            .get::<T>()
            .map(|v| Cow::Borrowed(v.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_are_hashed() {
        let req = http::Request::builder()
            .header("authorization", "Bearer sk-secret")
            .body(())
            .unwrap();
        let id = ApiKey.extract(&req).unwrap();
        assert_eq!(&*id, hash_api_key(b"sk-secret").as_bytes());
        assert!(!String::from_utf8_lossy(&id).contains("secret"));
        let anthropic = http::Request::builder()
            .header("x-api-key", "sk-ant")
            .body(())
            .unwrap();
        assert_eq!(
            &*ApiKey.extract(&anthropic).unwrap(),
            hash_api_key(b"sk-ant").as_bytes()
        );
        let none = http::Request::builder()
            .header("authorization", "Basic x")
            .body(())
            .unwrap();
        assert!(ApiKey.extract(&none).is_none());
    }

    #[test]
    fn header_bytes_need_not_be_utf8() {
        let value = http::HeaderValue::from_bytes(&[0xff, b'a']).unwrap();
        let req = http::Request::builder()
            .header("x-user-id", value)
            .body(())
            .unwrap();
        assert_eq!(
            &*Header::new("x-user-id").extract(&req).unwrap(),
            &[0xff, b'a']
        );
        assert!(Header::try_new("bad header").is_err());
    }
}
