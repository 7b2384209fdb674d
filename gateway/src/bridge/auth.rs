//! API keys: who may call the control plane.
//!
//! Every gRPC call and every `/api/v1` request carries `authorization:
//! Bearer <key>` with one of `[admin] api_keys`; `/healthz`, `/readyz` and
//! `/metrics` need none. The check runs before routing, so an unknown path
//! without a key learns nothing but "unauthenticated".
//!
//! Keys are compared in constant time. Both sides are hashed with SHA-256
//! first, so the comparison is always 32 bytes against 32 bytes, whatever
//! the presented key's length, and every configured key is compared (no
//! early exit), so timing says neither which key nor how much of one
//! matched. Only the digests are kept in memory after start.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a request was refused. The messages never echo what was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `[admin] api_keys` are configured: the API is closed.
    #[error("the API is disabled: no [admin] api_keys are configured")]
    NoKeysConfigured,
    /// No `authorization` header.
    #[error("missing `authorization: Bearer <key>`")]
    Missing,
    /// An `authorization` header that is not `Bearer <key>`.
    #[error("`authorization` must be `Bearer <key>`")]
    Malformed,
    /// A key that is none of the configured ones.
    #[error("unknown API key")]
    Unknown,
}

/// The configured keys, as digests.
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys").field("keys", &self.digests.len()).finish()
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl ApiKeys {
    /// The keys of `[admin] api_keys` (validated by the config).
    pub fn new(keys: &[String]) -> ApiKeys {
        ApiKeys { digests: keys.iter().map(|k| digest(k.as_bytes())).collect() }
    }

    /// Checks an `authorization` header value (`None`: absent).
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        if self.digests.is_empty() {
            return Err(Refusal::NoKeysConfigured);
        }
        let header = authorization.ok_or(Refusal::Missing)?;
        let key = bearer(header).ok_or(Refusal::Malformed)?;
        let presented = digest(key);
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&presented);
        }
        if bool::from(found) { Ok(()) } else { Err(Refusal::Unknown) }
    }
}

/// The key of `Bearer <key>` (the scheme is case-insensitive, RFC 9110).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if header.len() <= SCHEME.len() || !header[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let key = header[SCHEME.len()..].trim_ascii();
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        ApiKeys::new(&["first-key-0123456789".into(), "second-key-0123456789".into()])
    }

    #[test]
    fn each_configured_key_is_accepted() {
        let k = keys();
        assert_eq!(k.check(Some(b"Bearer first-key-0123456789")), Ok(()));
        assert_eq!(k.check(Some(b"Bearer second-key-0123456789")), Ok(()));
        assert_eq!(k.check(Some(b"bearer  second-key-0123456789 ")), Ok(()));
    }

    #[test]
    fn wrong_missing_and_malformed_keys_are_refused() {
        let k = keys();
        assert_eq!(k.check(None), Err(Refusal::Missing));
        assert_eq!(k.check(Some(b"Bearer first-key-012345678")), Err(Refusal::Unknown), "a prefix");
        assert_eq!(k.check(Some(b"Bearer first-key-01234567890")), Err(Refusal::Unknown), "longer");
        assert_eq!(k.check(Some(b"Bearer FIRST-KEY-0123456789")), Err(Refusal::Unknown), "keys are exact");
        assert_eq!(k.check(Some(b"Basic first-key-0123456789")), Err(Refusal::Malformed));
        assert_eq!(k.check(Some(b"first-key-0123456789")), Err(Refusal::Malformed));
        assert_eq!(k.check(Some(b"Bearer ")), Err(Refusal::Malformed));
        assert_eq!(k.check(Some(b"Bearer    ")), Err(Refusal::Malformed));
    }

    #[test]
    fn no_configured_keys_refuses_everything_and_says_why() {
        let k = ApiKeys::new(&[]);
        assert_eq!(k.check(Some(b"Bearer anything-at-all-here")), Err(Refusal::NoKeysConfigured));
        assert!(Refusal::NoKeysConfigured.to_string().contains("[admin] api_keys"));
    }

    #[test]
    fn refusals_never_echo_the_key() {
        let k = keys();
        let sent = "Bearer my-secret-guess-0123";
        let err = k.check(Some(sent.as_bytes())).unwrap_err();
        assert!(!err.to_string().contains("my-secret-guess"), "{err}");
    }
}
