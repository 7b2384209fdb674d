//! Proving who a connection is: JWT HS256 tokens and anonymous visitor keys.
//!
//! Two kinds of credentials arrive in `connect` (PROTOCOL.md, "Identity"):
//!
//! - A **token**, signed by the business system (or by `kefu token`) with
//!   the shared secret `auth.jwt_secret`. [`JwtKey::verify`] accepts exactly
//!   one algorithm, HS256: the header's `alg` must be the string `"HS256"`,
//!   so `none` and every other algorithm are refused before the signature
//!   is looked at, and the signature is compared in constant time (by the
//!   `hmac` crate) before the claims are parsed at all. `exp` is required and
//!   checked with `auth.exp_leeway_s` of leeway (at most 60 s); `nbf`, if
//!   present, with the same leeway.
//! - A **visitor key**: an anonymous visitor is given an id and a
//!   [`VisitorKey`] (128 random bits the gateway draws; the core has no
//!   RNG), and comes back by presenting both. Only the key's SHA-256
//!   ([`VisitorKeyHash`]) is stored, so a copy of the database does not let
//!   anyone impersonate a visitor. The key is random, not a password, so a
//!   fast unsalted hash is enough; the comparison is constant-time anyway.
//!
//! [`Credentials::classify`] decides which path a `connect` takes, and
//! refuses a visitor id without its key (PROTOCOL.md: "a visitor id is
//! never accepted without its key or a valid token").
//!
//! Every refusal is an [`AuthError`]; all of them are `unauthorized` on the
//! wire (close 4500), and their messages say what was wrong without echoing
//! secrets.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use kefu_proto::ids::{ErrorCode, Role};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::AuthPolicy;
use crate::identity::{GroupName, Identity, Meta, UserId};

type HmacSha256 = Hmac<Sha256>;

/// The prefix of server-issued anonymous visitor ids. Token subjects may
/// not start with it, so an anonymous visitor's conversations can never be
/// reached through a token, even by accident.
pub const ANONYMOUS_ID_PREFIX: &str = "anon-";

/// Longest `sub` accepted, in bytes.
pub const SUB_BYTES_MAX: usize = 256;

/// The only header a token signed here carries.
const HEADER_JSON: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// Why credentials were refused. Every variant is `unauthorized` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is longer than `auth.max_token_bytes`.
    #[error("token is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not three base64url parts, or a part is not what it should be.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is not `HS256` (`none` included).
    #[error("token algorithm {0:?} is not accepted (only HS256)")]
    Algorithm(String),
    /// The header asks for extensions (`crit`) this server does not know.
    #[error("token header has critical extensions, which are not supported")]
    Critical,
    /// The signature does not match: forged, or signed with another secret.
    #[error("token signature does not verify")]
    BadSignature,
    /// The payload is not a JSON object of the expected shape.
    #[error("token claims are not valid: {0}")]
    Claims(String),
    /// A required claim is absent.
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(&'static str),
    /// A claim has a value that is not allowed.
    #[error("token claim `{claim}` is invalid: {reason}")]
    InvalidClaim {
        /// The claim.
        claim: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// `exp` (plus leeway) is in the past.
    #[error("token expired at {exp_s} (now {now_s}, leeway {leeway_s} s)")]
    Expired {
        /// The claim.
        exp_s: u64,
        /// The time of the check, seconds.
        now_s: u64,
        /// The leeway applied.
        leeway_s: u64,
    },
    /// `nbf` (minus leeway) is in the future.
    #[error("token is not valid before {nbf_s}")]
    NotYetValid {
        /// The claim.
        nbf_s: u64,
    },
    /// The secret to sign or verify with is empty.
    #[error("the JWT secret is empty")]
    EmptySecret,
    /// `visitor_id` without `visitor_key`.
    #[error("visitor_id needs its visitor_key (or a token)")]
    KeylessVisitor,
    /// `visitor_key` without `visitor_id`.
    #[error("visitor_key needs its visitor_id")]
    MissingVisitorId,
    /// `visitor_key` is not 32 hex digits.
    #[error("visitor_key must be 32 hex digits")]
    BadVisitorKey,
    /// No visitor with this id is known (the gateway's storage says so).
    #[error("unknown visitor")]
    UnknownVisitor,
    /// The key does not match the visitor's.
    #[error("visitor_key does not match")]
    VisitorKeyMismatch,
    /// `auth.allow_anonymous = false` and no token was given.
    #[error("anonymous visitors are not allowed here; connect with a token")]
    AnonymousDisabled,
}

impl AuthError {
    /// The wire code: always `unauthorized` (fatal, close 4500).
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Unauthorized
    }
}

/// What a token says about its bearer (PROTOCOL.md, "Identity").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// `agent` or `visitor`.
    pub role: Role,
    /// Display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Agent: groups served; visitor: group requested.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Visitor profile (`vip_level`, `plan`, …).
    #[serde(skip_serializing_if = "Meta::is_empty")]
    pub meta: Meta,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

impl Claims {
    /// The identity these claims prove. A missing `name` shows as the id.
    pub fn into_identity(self) -> Identity {
        let name: Arc<str> = Arc::from(self.name.as_deref().unwrap_or(&self.sub));
        let groups: Arc<[GroupName]> = self.groups.iter().map(|g| GroupName::from(g.as_str())).collect();
        Identity {
            role: self.role,
            id: UserId::from(self.sub),
            name,
            groups,
            meta: self.meta,
            anonymous: false,
        }
    }
}

/// The payload as it may arrive: every field optional, so that a missing
/// claim is reported by name rather than as a parse error.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    role: Option<String>,
    name: Option<String>,
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    meta: Option<serde_json::Map<String, serde_json::Value>>,
    exp: Option<serde_json::Number>,
    nbf: Option<serde_json::Number>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<serde_json::Value>,
    crit: Option<serde_json::Value>,
}

/// A NumericDate (RFC 7519): seconds, possibly fractional; negatives clamp to 0.
fn numeric_date(n: &serde_json::Number, claim: &'static str) -> Result<u64, AuthError> {
    if let Some(v) = n.as_u64() {
        return Ok(v);
    }
    match n.as_f64() {
        Some(f) if f.is_finite() => Ok(f.max(0.0).floor() as u64),
        _ => Err(AuthError::InvalidClaim { claim, reason: "not a number of seconds" }),
    }
}

/// The HS256 secret, ready to sign and verify tokens.
///
/// Keying HMAC hashes the secret once; each verify clones that state, so
/// verifying allocates only for the decoded parts of the token.
#[derive(Clone)]
pub struct JwtKey {
    mac: HmacSha256,
    policy: AuthPolicy,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl JwtKey {
    /// A key from the configured secret (its bytes as written in the config).
    pub fn new(secret: &[u8], policy: AuthPolicy) -> Result<JwtKey, AuthError> {
        if secret.is_empty() {
            return Err(AuthError::EmptySecret);
        }
        // HMAC takes keys of any length; this cannot fail for Hmac<Sha256>.
        let mac = HmacSha256::new_from_slice(secret).map_err(|_| AuthError::EmptySecret)?;
        Ok(JwtKey { mac, policy })
    }

    /// Signs `claims` (for `kefu token` and tests).
    pub fn sign(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(HEADER_JSON);
        // Serializing a struct of strings, maps and integers cannot fail.
        let payload_json = serde_json::to_vec(claims).unwrap_or_default();
        let payload = URL_SAFE_NO_PAD.encode(payload_json);
        let mut token = format!("{header}.{payload}");
        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        let sig = mac.finalize().into_bytes();
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig));
        token
    }

    /// Checks `token` at time `now_ms` and returns its claims.
    ///
    /// Order matters: size, shape, algorithm, signature (constant time),
    /// and only then the claims, so nothing a forger wrote is interpreted.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Claims, AuthError> {
        if token.len() > self.policy.max_token_bytes {
            return Err(AuthError::TooLong { len: token.len(), max: self.policy.max_token_bytes });
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("expected three dot-separated parts"));
        };

        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| AuthError::Malformed("header is not base64url"))?;
        let header: RawHeader = serde_json::from_slice(&header_json)
            .map_err(|_| AuthError::Malformed("header is not a JSON object"))?;
        match header.alg {
            Some(serde_json::Value::String(alg)) if alg == "HS256" => {}
            Some(serde_json::Value::String(alg)) => return Err(AuthError::Algorithm(alg)),
            Some(other) => return Err(AuthError::Algorithm(other.to_string())),
            None => return Err(AuthError::Algorithm(String::new())),
        }
        if header.crit.is_some() {
            return Err(AuthError::Critical);
        }

        let sig = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| AuthError::Malformed("signature is not base64url"))?;
        let signed_len = header_b64.len() + 1 + payload_b64.len();
        let mut mac = self.mac.clone();
        mac.update(&token.as_bytes()[..signed_len]);
        // `verify_slice` compares in constant time and refuses wrong lengths.
        mac.verify_slice(&sig).map_err(|_| AuthError::BadSignature)?;

        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| AuthError::Malformed("payload is not base64url"))?;
        let raw: RawClaims =
            serde_json::from_slice(&payload).map_err(|e| AuthError::Claims(e.to_string()))?;
        let claims = validate_claims(raw)?;

        let leeway_ms = self.policy.exp_leeway_s.saturating_mul(1000);
        if now_ms >= self.valid_until_ms(&claims) {
            return Err(AuthError::Expired {
                exp_s: claims.exp,
                now_s: now_ms / 1000,
                leeway_s: self.policy.exp_leeway_s,
            });
        }
        if let Some(nbf) = claims.nbf
            && now_ms.saturating_add(leeway_ms) < nbf.saturating_mul(1000)
        {
            return Err(AuthError::NotYetValid { nbf_s: nbf });
        }
        Ok(claims)
    }

    /// The first millisecond at which `claims` are no longer accepted:
    /// RFC 7519 makes a token valid only *before* `exp`, and the leeway
    /// stretches that. A live session ends here too (see the edge).
    pub fn valid_until_ms(&self, claims: &Claims) -> u64 {
        let leeway_ms = self.policy.exp_leeway_s.saturating_mul(1000);
        claims.exp.saturating_mul(1000).saturating_add(leeway_ms)
    }
}

fn validate_claims(raw: RawClaims) -> Result<Claims, AuthError> {
    let sub = raw.sub.ok_or(AuthError::MissingClaim("sub"))?;
    if sub.is_empty() || sub.len() > SUB_BYTES_MAX {
        return Err(AuthError::InvalidClaim { claim: "sub", reason: "must be 1 to 256 bytes" });
    }
    if sub.starts_with(ANONYMOUS_ID_PREFIX) {
        return Err(AuthError::InvalidClaim { claim: "sub", reason: "the anon- prefix is reserved" });
    }
    let role = match raw.role.as_deref() {
        None => return Err(AuthError::MissingClaim("role")),
        Some("agent") => Role::Agent,
        Some("visitor") => Role::Visitor,
        Some(_) => return Err(AuthError::InvalidClaim { claim: "role", reason: "must be agent or visitor" }),
    };
    let exp = numeric_date(&raw.exp.ok_or(AuthError::MissingClaim("exp"))?, "exp")?;
    let nbf = raw.nbf.as_ref().map(|n| numeric_date(n, "nbf")).transpose()?;
    let groups = raw.groups.unwrap_or_default();
    if groups.iter().any(|g| g.is_empty()) {
        return Err(AuthError::InvalidClaim { claim: "groups", reason: "group names must be non-empty" });
    }
    let mut meta = Meta::new();
    for (k, v) in raw.meta.unwrap_or_default() {
        // PROTOCOL.md says a string map; numbers and booleans are taken as
        // their JSON text (`"vip_level": 3` is common), anything else refused.
        let v = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => return Err(AuthError::InvalidClaim { claim: "meta", reason: "values must be strings" }),
        };
        meta.insert(k, v);
    }
    Ok(Claims { sub, role, name: raw.name, groups, meta, exp, nbf })
}

/// Which way a `connect` proves its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials<'a> {
    /// Verify this token with [`JwtKey::verify`].
    Token(&'a str),
    /// A returning anonymous visitor: look up the stored [`VisitorKeyHash`]
    /// of `visitor_id` and check `key` against it.
    Returning {
        /// The server-issued id.
        visitor_id: &'a str,
        /// The key presented.
        key: VisitorKey,
    },
    /// A new anonymous visitor: issue an id and a key, store them, and only
    /// then answer `connected` (PROTOCOL.md, "Guarantees").
    NewAnonymous,
}

impl<'a> Credentials<'a> {
    /// Classifies the credential fields of `connect`. A token wins over
    /// visitor fields; a visitor id is never accepted without its key.
    pub fn classify(
        token: Option<&'a str>,
        visitor_id: Option<&'a str>,
        visitor_key: Option<&'a str>,
        allow_anonymous: bool,
    ) -> Result<Credentials<'a>, AuthError> {
        if let Some(token) = token {
            return Ok(Credentials::Token(token));
        }
        match (visitor_id, visitor_key) {
            (Some(_), None) => Err(AuthError::KeylessVisitor),
            (None, Some(_)) => Err(AuthError::MissingVisitorId),
            _ if !allow_anonymous => Err(AuthError::AnonymousDisabled),
            (Some(visitor_id), Some(key)) => {
                if !visitor_id.starts_with(ANONYMOUS_ID_PREFIX) {
                    // Only server-issued ids have keys; anything else is a
                    // token user's id presented without the token.
                    return Err(AuthError::UnknownVisitor);
                }
                Ok(Credentials::Returning { visitor_id, key: VisitorKey::parse_hex(key)? })
            }
            (None, None) => Ok(Credentials::NewAnonymous),
        }
    }
}

/// A fresh anonymous visitor id, issued at `now_ms` from random bytes the
/// caller drew: `anon-` and 32 hex digits, the first 12 the time (ms since
/// the epoch, 48 bits) and the other 20 ten of the random bytes.
///
/// Time first, so ids sort by when they were issued: the stored profiles
/// and each visitor's conversations are keyed by id, and new visitors then
/// change the same few pages at the end of those B-trees instead of a page
/// anywhere in them, so fewer page copies are alive between two
/// checkpoints (BENCHMARKS.md, "Issue 11: memory per session under 4 KB on
/// a fresh gateway"). An id is not a secret (the visitor's key is); 80
/// random bits keep two issued in the same millisecond apart.
pub fn anonymous_id(now_ms: u64, random: [u8; 16]) -> UserId {
    let mut s = String::with_capacity(ANONYMOUS_ID_PREFIX.len() + 32);
    s.push_str(ANONYMOUS_ID_PREFIX);
    push_hex(&mut s, &(now_ms & 0xffff_ffff_ffff).to_be_bytes()[2..]);
    push_hex(&mut s, &random[..10]);
    UserId::from(s)
}

/// The identity of a new anonymous visitor. Its name is "Visitor" and the
/// last four hex digits of its id (random ones), so agents can tell
/// visitors apart before anyone has a real name; `SyncUser` may change it.
/// A returning visitor keeps the name stored with its profile.
pub fn anonymous_identity(id: UserId, meta: Meta) -> Identity {
    let digits = id.strip_prefix(ANONYMOUS_ID_PREFIX).unwrap_or(&id);
    let tag = digits.get(digits.len().saturating_sub(4)..).unwrap_or("");
    let name = Arc::from(format!("Visitor {tag}").trim_end());
    Identity { role: Role::Visitor, id, name, groups: Arc::from([]), meta, anonymous: true }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
}

/// An anonymous visitor's secret: 128 bits, hex on the wire. Its `Debug`
/// does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct VisitorKey([u8; 16]);

impl std::fmt::Debug for VisitorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VisitorKey(..)")
    }
}

impl VisitorKey {
    /// A key from 16 random bytes the caller drew (the core has no RNG).
    pub fn from_random(bytes: [u8; 16]) -> VisitorKey {
        VisitorKey(bytes)
    }

    /// Parses the wire form: exactly 32 hex digits, either case.
    pub fn parse_hex(s: &str) -> Result<VisitorKey, AuthError> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return Err(AuthError::BadVisitorKey);
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(AuthError::BadVisitorKey),
        };
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (digit(s[2 * i])? << 4) | digit(s[2 * i + 1])?;
        }
        Ok(VisitorKey(out))
    }

    /// The wire form: 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &self.0);
        s
    }

    /// What is stored: SHA-256 of the 16 key bytes.
    pub fn hash(&self) -> VisitorKeyHash {
        VisitorKeyHash(Sha256::digest(self.0).into())
    }
}

/// The stored form of a [`VisitorKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisitorKeyHash(pub [u8; 32]);

impl VisitorKeyHash {
    /// Whether `key` is the key this hash was made from (constant time).
    pub fn verify(&self, key: &VisitorKey) -> bool {
        ct_eq(&self.0, &key.hash().0)
    }

    /// [`Self::verify`] as a `Result`, for `?` in the connect path.
    pub fn check(&self, key: &VisitorKey) -> Result<(), AuthError> {
        if self.verify(key) { Ok(()) } else { Err(AuthError::VisitorKeyMismatch) }
    }
}

/// Compares two byte strings in time that depends only on their length.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimizer from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_800_000_000_000;
    const NOW_S: u64 = NOW_MS / 1000;

    fn key() -> JwtKey {
        JwtKey::new(b"0123456789abcdef0123456789abcdef", AuthPolicy::default()).unwrap()
    }

    fn claims() -> Claims {
        Claims {
            sub: "a1".into(),
            role: Role::Agent,
            name: Some("Alice".into()),
            groups: vec!["sales".into()],
            meta: Meta::new(),
            exp: NOW_S + 3600,
            nbf: None,
        }
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    /// Signs an arbitrary header and payload with `secret`.
    fn forge(secret: &[u8], header: &str, payload: &str) -> String {
        let mut t = format!("{}.{}", b64(header), b64(payload));
        let mut mac = HmacSha256::new_from_slice(secret).unwrap();
        mac.update(t.as_bytes());
        t.push('.');
        t.push_str(&URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
        t
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let k = key();
        let token = k.sign(&claims());
        assert_eq!(k.verify(&token, NOW_MS).unwrap(), claims());
        let id = k.verify(&token, NOW_MS).unwrap().into_identity();
        assert_eq!((&*id.id, &*id.name, id.role, id.groups.len()), ("a1", "Alice", Role::Agent, 1));
    }

    #[test]
    fn forged_tokens_are_refused() {
        let k = key();
        let token = k.sign(&claims());
        // Payload swapped for another one (a visitor claiming to be agent a2).
        let mut parts: Vec<&str> = token.split('.').collect();
        let other = b64(r#"{"sub":"a2","role":"agent","exp":9999999999}"#);
        parts[1] = &other;
        assert_eq!(k.verify(&parts.join("."), NOW_MS), Err(AuthError::BadSignature));
        // Signature truncated, or of another length.
        let short = &token[..token.len() - 2];
        assert!(k.verify(short, NOW_MS).is_err());
        // Signed with another secret.
        let other_key = JwtKey::new(b"another secret", AuthPolicy::default()).unwrap();
        assert_eq!(k.verify(&other_key.sign(&claims()), NOW_MS), Err(AuthError::BadSignature));
        // Junk.
        for junk in ["", "a.b", "a.b.c.d", "!!.!!.!!", "e30.e30.", "e30.e30.e30"] {
            assert!(k.verify(junk, NOW_MS).is_err(), "{junk}");
        }
    }

    #[test]
    fn only_hs256_is_accepted() {
        let k = key();
        let payload = r#"{"sub":"a1","role":"agent","exp":9999999999}"#;
        let secret = b"0123456789abcdef0123456789abcdef";
        // alg none with an empty signature: the classic bypass.
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(payload));
        assert_eq!(k.verify(&none, NOW_MS), Err(AuthError::Algorithm("none".into())));
        // Correct MAC, but the header says another algorithm.
        for alg in ["HS512", "RS256", "hs256", "NONE"] {
            let t = forge(secret, &format!(r#"{{"alg":"{alg}"}}"#), payload);
            assert_eq!(k.verify(&t, NOW_MS), Err(AuthError::Algorithm(alg.into())), "{alg}");
        }
        let missing = forge(secret, r#"{"typ":"JWT"}"#, payload);
        assert!(matches!(k.verify(&missing, NOW_MS), Err(AuthError::Algorithm(_))));
        let crit = forge(secret, r#"{"alg":"HS256","crit":["b64"]}"#, payload);
        assert_eq!(k.verify(&crit, NOW_MS), Err(AuthError::Critical));
        // The same MAC under a plain HS256 header is fine.
        assert!(k.verify(&forge(secret, r#"{"alg":"HS256"}"#, payload), NOW_MS).is_ok());
    }

    #[test]
    fn expiry_is_checked_with_leeway_edges() {
        let k = key();
        let mut c = claims();
        c.exp = NOW_S;
        let t = k.sign(&c);
        // Exactly at exp: still inside the 60 s leeway.
        assert!(k.verify(&t, NOW_MS).is_ok());
        // Last millisecond of the leeway.
        assert!(k.verify(&t, NOW_MS + 60_000 - 1).is_ok());
        // Leeway over.
        assert!(matches!(k.verify(&t, NOW_MS + 60_000), Err(AuthError::Expired { .. })));
        // With no leeway, exp itself is too late.
        let strict = JwtKey::new(
            b"0123456789abcdef0123456789abcdef",
            AuthPolicy { exp_leeway_s: 0, ..Default::default() },
        )
        .unwrap();
        assert!(strict.verify(&t, NOW_MS - 1).is_ok());
        assert!(matches!(strict.verify(&t, NOW_MS), Err(AuthError::Expired { .. })));
        // nbf, same leeway.
        let mut c = claims();
        c.nbf = Some(NOW_S + 60);
        let t = k.sign(&c);
        assert!(k.verify(&t, NOW_MS).is_ok());
        assert_eq!(k.verify(&t, NOW_MS - 1), Err(AuthError::NotYetValid { nbf_s: NOW_S + 60 }));
    }

    #[test]
    fn required_claims_are_named_when_missing_or_wrong() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let k = key();
        let h = r#"{"alg":"HS256"}"#;
        let cases = [
            (r#"{"role":"agent","exp":9999999999}"#, AuthError::MissingClaim("sub")),
            (r#"{"sub":"a1","exp":9999999999}"#, AuthError::MissingClaim("role")),
            (r#"{"sub":"a1","role":"agent"}"#, AuthError::MissingClaim("exp")),
        ];
        for (payload, want) in cases {
            assert_eq!(k.verify(&forge(secret, h, payload), NOW_MS), Err(want), "{payload}");
        }
        for payload in [
            r#"{"sub":"a1","role":"bot","exp":9999999999}"#,
            r#"{"sub":"","role":"agent","exp":9999999999}"#,
            r#"{"sub":"anon-00","role":"visitor","exp":9999999999}"#,
            r#"{"sub":"v1","role":"visitor","exp":9999999999,"meta":{"a":{"b":1}}}"#,
            r#"{"sub":"a1","role":"agent","exp":9999999999,"groups":[""]}"#,
        ] {
            assert!(
                matches!(k.verify(&forge(secret, h, payload), NOW_MS), Err(AuthError::InvalidClaim { .. })),
                "{payload}"
            );
        }
        assert!(matches!(k.verify(&forge(secret, h, "[1]"), NOW_MS), Err(AuthError::Claims(_))));
        // Unknown claims (iat, iss…) are fine; numeric meta becomes text;
        // a fractional exp is accepted.
        let ok =
            r#"{"sub":"v1","role":"visitor","exp":9999999999.5,"iat":1,"iss":"shop","meta":{"vip_level":3}}"#;
        let c = k.verify(&forge(secret, h, ok), NOW_MS).unwrap();
        assert_eq!((c.exp, c.meta["vip_level"].as_str()), (9_999_999_999, "3"));
    }

    #[test]
    fn oversized_tokens_are_refused_before_decoding() {
        let k = JwtKey::new(b"s", AuthPolicy { max_token_bytes: 100, ..Default::default() }).unwrap();
        let t = "a".repeat(101);
        assert_eq!(k.verify(&t, NOW_MS), Err(AuthError::TooLong { len: 101, max: 100 }));
        assert_eq!(JwtKey::new(b"", AuthPolicy::default()).unwrap_err(), AuthError::EmptySecret);
    }

    #[test]
    fn refusals_are_unauthorized() {
        assert_eq!(AuthError::BadSignature.code(), ErrorCode::Unauthorized);
        assert_eq!(AuthError::KeylessVisitor.code(), ErrorCode::Unauthorized);
    }

    #[test]
    fn visitor_keys_round_trip_and_mismatch() {
        let key = VisitorKey::from_random([0xab; 16]);
        let hex = key.to_hex();
        assert_eq!(hex, "ab".repeat(16));
        assert_eq!(VisitorKey::parse_hex(&hex.to_uppercase()).unwrap(), key);
        let stored = key.hash();
        assert!(stored.verify(&VisitorKey::parse_hex(&hex).unwrap()));
        assert!(stored.check(&key).is_ok());
        let mut other = [0xab; 16];
        other[15] = 0xac;
        assert!(!stored.verify(&VisitorKey::from_random(other)));
        assert_eq!(stored.check(&VisitorKey::from_random(other)), Err(AuthError::VisitorKeyMismatch));
        assert_ne!(stored.0[..16], [0xab; 16], "the stored form is a hash, not the key");
        for bad in ["", "ab", &"g".repeat(32), &"a".repeat(33), &"é".repeat(16)] {
            assert_eq!(VisitorKey::parse_hex(bad), Err(AuthError::BadVisitorKey), "{bad}");
        }
        assert_eq!(format!("{key:?}"), "VisitorKey(..)", "Debug never shows the secret");
    }

    #[test]
    fn credentials_are_classified_and_keyless_ids_refused() {
        use Credentials as C;
        let key = "0f".repeat(16);
        assert_eq!(C::classify(Some("t"), Some("anon-x"), None, true), Ok(C::Token("t")));
        assert_eq!(C::classify(None, Some("anon-x"), None, true), Err(AuthError::KeylessVisitor));
        assert_eq!(C::classify(None, None, Some(&key), true), Err(AuthError::MissingVisitorId));
        assert_eq!(C::classify(None, None, None, true), Ok(C::NewAnonymous));
        assert_eq!(C::classify(None, None, None, false), Err(AuthError::AnonymousDisabled));
        assert_eq!(C::classify(None, Some("anon-x"), Some(&key), false), Err(AuthError::AnonymousDisabled));
        assert_eq!(C::classify(None, Some("v1"), Some(&key), true), Err(AuthError::UnknownVisitor));
        assert_eq!(C::classify(None, Some("anon-x"), Some("zz"), true), Err(AuthError::BadVisitorKey));
        assert!(matches!(
            C::classify(None, Some("anon-x"), Some(&key), true),
            Ok(C::Returning { visitor_id: "anon-x", .. })
        ));
    }

    #[test]
    fn anonymous_ids_and_names() {
        let mut random = [0x1f; 16];
        random[9] = 0xa7;
        let id = anonymous_id(0x0123_4567_89ab, random);
        assert_eq!(&*id, &format!("anon-0123456789ab{}a7", "1f".repeat(9)));
        let ident = anonymous_identity(id, Meta::new());
        assert_eq!(&*ident.name, "Visitor 1fa7", "the last four digits, which are random");
        assert!(ident.anonymous && ident.role == Role::Visitor);
    }

    #[test]
    fn anonymous_ids_sort_by_when_they_were_issued() {
        let times = [0, 1, 255, 256, 1_796_000_000_000, 1_796_000_000_001, (1 << 48) - 1];
        let ids: Vec<UserId> = times.iter().map(|&t| anonymous_id(t, [0xff; 16])).collect();
        assert!(ids.iter().all(|id| id.len() == ANONYMOUS_ID_PREFIX.len() + 32));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        // Within one millisecond the random digits order them.
        assert!(anonymous_id(5, [0; 16]) < anonymous_id(5, [1; 16]));
    }
}
