//! Gateway-issued client keys: the config holds only their SHA-256; a request's key
//! (Bearer or `x-api-key`) is hashed and compared in constant time against each.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Key;

/// The name of the client a request authenticated as (the identifier for limits, admin
/// and metrics).
#[derive(Clone, Debug)]
pub struct ClientName(pub String);

impl AsRef<[u8]> for ClientName {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case), trimmed.
pub fn bearer(headers: &http::HeaderMap) -> Option<&[u8]> {
    headers
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            let (scheme, rest) = v.split_at(v.len().min(7));
            scheme
                .eq_ignore_ascii_case(b"bearer ")
                .then_some(rest.trim_ascii())
        })
}

/// The keys a request presents: `Authorization: Bearer <key>` and `x-api-key: <key>`.
pub fn presented(headers: &http::HeaderMap) -> impl Iterator<Item = &[u8]> {
    let x_api_key = headers.get("x-api-key").map(|v| v.as_bytes());
    bearer(headers)
        .into_iter()
        .chain(x_api_key)
        .map(|k| k.trim_ascii())
        .filter(|k| !k.is_empty())
}

/// The client whose key this is, if any. Every configured key is compared (in constant
/// time), so the time taken says nothing about which key matched or how closely.
pub fn authenticate<'k>(keys: &'k [Key], key: &[u8]) -> Option<&'k Key> {
    let digest: [u8; 32] = Sha256::digest(key).into();
    let mut found = None;
    for k in keys {
        if bool::from(k.sha256.ct_eq(&digest)) {
            found = Some(k);
        }
    }
    found
}

/// The `sha256 = "…"` line of a key.
pub fn sha256_line(key: &str) -> String {
    let digest = Sha256::digest(key.trim().as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256 = \"{hex}\"")
}

/// A new random key (256 bits from the operating system's CSPRNG), `llmgw-` + hex.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!(
        "llmgw-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hashed_key_authenticates_and_others_do_not() {
        let line = sha256_line("sk-alice");
        let hex = line.trim_start_matches("sha256 = \"").trim_end_matches('"');
        let keys = vec![Key {
            name: "alice".into(),
            sha256: crate::config::decode_hex32(hex).unwrap(),
            tier: None,
        }];
        assert_eq!(authenticate(&keys, b"sk-alice").unwrap().name, "alice");
        assert!(authenticate(&keys, b"sk-alicf").is_none());
        let a = generate().unwrap();
        assert!(a.starts_with("llmgw-") && a.len() == 70 && a != generate().unwrap());
    }
}
