//! Access tokens (seed 004's token exchange): an app id (the key's id) and
//! user key (its secret) buy a short-lived bearer token that carries the
//! organisation, the key and the scopes, signed with HMAC-SHA256 by the
//! process's signing key (shared by every node: `storage.signing_key`).
//!
//! `vxt_<payload>.<mac>`, both base64url: the payload is JSON
//! `{"kid","org","scopes","iat","exp"}`. A token is only as good as its key:
//! every use looks the key up, so revoking it ends its tokens at once.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::Mac;
use serde::{Deserialize, Serialize};

use crate::domain::{KeyId, OrgId, Scopes};
use crate::jobs::storage::Storage;
use crate::{Error, Result};

pub const TOKEN_PREFIX: &str = "vxt_";
/// The longest (and default) life of a token: 24 hours.
pub const MAX_TTL_SECS: u64 = 86_400;
pub const MIN_TTL_SECS: u64 = 60;
/// Longer than any token we issue: refuse before decoding.
const MAX_TOKEN_LEN: usize = 4096;

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub kid: KeyId,
    pub org: OrgId,
    pub scopes: Scopes,
    /// Issued and expiry times, Unix seconds.
    pub iat: i64,
    pub exp: i64,
}

fn mac(signer: &Storage, payload: &str) -> hmac::Hmac<sha2::Sha256> {
    signer.mac_of(&["access-token", "v1", payload])
}

/// A signed token for `claims`.
pub fn issue(signer: &Storage, claims: &Claims) -> Result<String> {
    let json = serde_json::to_vec(claims).map_err(|e| Error::Internal(e.into()))?;
    let payload = B64.encode(json);
    let sig = B64.encode(mac(signer, &payload).finalize().into_bytes());
    Ok(format!("{TOKEN_PREFIX}{payload}.{sig}"))
}

/// The claims of a token we signed that has not expired at `now_secs`; 401
/// otherwise (a tampered and an unknown token look the same).
pub fn verify(signer: &Storage, token: &str, now_secs: i64) -> Result<Claims> {
    const INVALID: Error = Error::Unauthorized("Invalid access token");
    if token.len() > MAX_TOKEN_LEN {
        return Err(INVALID);
    }
    let body = token.strip_prefix(TOKEN_PREFIX).ok_or(INVALID)?;
    let (payload, sig) = body.split_once('.').ok_or(INVALID)?;
    let sig = B64.decode(sig).map_err(|_| INVALID)?;
    // Constant-time comparison.
    mac(signer, payload).verify_slice(&sig).map_err(|_| INVALID)?;
    let json = B64.decode(payload).map_err(|_| INVALID)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| INVALID)?;
    if claims.exp <= now_secs {
        return Err(Error::Unauthorized("Access token has expired; exchange the key for a new one"));
    }
    Ok(claims)
}

/// True when the presented credential is an access token, not a key.
pub fn is_token(presented: &str) -> bool {
    presented.starts_with(TOKEN_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::storage::StorageConfig;

    fn signer(key: &str) -> Storage {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig { root: dir.path().to_owned(), signing_key: Some(key.into()), ..Default::default() };
        Storage::open(&config, "http://127.0.0.1").unwrap()
    }

    fn claims(exp: i64) -> Claims {
        Claims { kid: KeyId::new(), org: OrgId::new(), scopes: Scopes::parse_list("calls,agents").unwrap(), iat: 1000, exp }
    }

    #[test]
    fn a_token_round_trips_until_it_expires() {
        let s = signer("0123456789abcdef0123");
        let c = claims(2000);
        let t = issue(&s, &c).unwrap();
        assert!(is_token(&t));
        assert_eq!(verify(&s, &t, 1999).unwrap(), c);
        let err = verify(&s, &t, 2000).unwrap_err().to_string();
        assert!(err.contains("expired"), "{err}");
    }

    #[test]
    fn tampered_or_foreign_tokens_are_refused() {
        let s = signer("0123456789abcdef0123");
        let t = issue(&s, &claims(2000)).unwrap();
        // Another signing key.
        assert!(verify(&signer("fedcba9876543210fedc"), &t, 1500).is_err());
        // A payload changed (wider scopes, later expiry) with the old signature.
        let (payload, sig) = t.strip_prefix(TOKEN_PREFIX).unwrap().split_once('.').unwrap();
        let mut c: Claims = serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
        c.exp = 9_999_999_999;
        c.scopes = Scopes::parse_list("*").unwrap();
        let forged = format!("{TOKEN_PREFIX}{}.{sig}", B64.encode(serde_json::to_vec(&c).unwrap()));
        assert!(matches!(verify(&s, &forged, 1500), Err(Error::Unauthorized("Invalid access token"))));
        for junk in ["vxt_", "vxt_a.b", "vxt_...", &format!("{t}x"), &"vxt_a".repeat(2000)] {
            assert!(verify(&s, junk, 1500).is_err(), "{junk}");
        }
    }
}
