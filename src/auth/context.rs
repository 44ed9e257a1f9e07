//! Who is calling: the authenticated key (presented itself, or through an
//! access token issued for it), its organisation, scopes and limits. The
//! API guard middleware puts an [`AuthContext`] into the request; handlers
//! take it with the [`Auth`] extractor and state the scope they need.
//!
//! The organisation is an [`OrgId`] that only this context carries: every
//! storage function that reads or changes an organisation's objects takes
//! one, so a handler cannot reach objects without naming whose they are.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};

use super::policy::KeyPolicy;
use crate::domain::{KeyId, OrgId, Plan, Scope, Scopes};
use crate::Error;

#[derive(Debug, Clone)]
pub struct AuthContext {
    pub key_id: KeyId,
    /// The organisation the key belongs to: whose objects this request sees.
    pub org: OrgId,
    pub plan: Plan,
    pub scopes: Scopes,
    /// The key's own limits (models, client networks, daily credits).
    pub policy: KeyPolicy,
    /// When the key was last recorded as used (ms), to throttle that write.
    pub last_used_at: Option<i64>,
    /// Set when the caller presented an access token: its expiry (Unix s).
    pub token_expires: Option<i64>,
}

impl AuthContext {
    /// 403 unless the key holds `scope`.
    pub fn require(&self, scope: Scope) -> crate::Result<()> {
        if self.scopes.allows(scope) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!("API key missing required scope: {scope}")))
        }
    }

    /// 403 unless the key may use `model`.
    pub fn require_model(&self, model: &str) -> crate::Result<()> {
        self.policy.require_model(model)
    }

    /// 403 unless the key may use both models of an agent.
    pub fn require_agent_models(&self, llm_model: &str, tts_model: &str) -> crate::Result<()> {
        self.policy.require_model(llm_model)?;
        self.policy.require_model(tts_model)
    }

    /// The key a debit is made with, with its daily cap if it has one.
    pub fn spender(&self) -> crate::billing::Spender {
        crate::billing::Spender { key: self.key_id, capped: self.policy.daily_credit_cap.is_some() }
    }

    /// 403 unless the account's plan is at least `plan`.
    pub fn require_plan(&self, plan: Plan, feature: &str) -> crate::Result<()> {
        if self.plan >= plan {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "{feature} requires the {plan} plan; this account is on the {} plan",
                self.plan
            )))
        }
    }
}

/// The key from `Authorization: Bearer <key>` or `x-api-key: <key>`.
pub fn presented_key(headers: &HeaderMap) -> crate::Result<&str> {
    let bearer = match headers.get(header::AUTHORIZATION) {
        Some(v) => {
            let v = v.to_str().map_err(|_| Error::Unauthorized("Invalid Authorization header"))?;
            let (scheme, token) = v.split_once(' ').ok_or(Error::Unauthorized("Invalid Authorization header"))?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(Error::Unauthorized("Authorization must use the Bearer scheme"));
            }
            Some(token.trim())
        }
        None => None,
    };
    let x_api_key = match headers.get("x-api-key") {
        Some(v) => Some(v.to_str().map_err(|_| Error::Unauthorized("Invalid x-api-key header"))?.trim()),
        None => None,
    };
    match (bearer, x_api_key) {
        (Some(a), Some(b)) if a != b => {
            Err(Error::Unauthorized("Authorization and x-api-key carry different keys"))
        }
        (Some(k), _) | (None, Some(k)) if !k.is_empty() => Ok(k),
        _ => Err(Error::Unauthorized(
            "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
        )),
    }
}

/// Extractor for handlers behind the API guard.
pub struct Auth(pub AuthContext);

impl<S: Send + Sync> FromRequestParts<S> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<AuthContext>()
            .cloned()
            .map(Auth)
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("route is missing the API guard")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn both_headers_are_accepted() {
        assert_eq!(presented_key(&headers(&[("authorization", "Bearer abc")])).unwrap(), "abc");
        assert_eq!(presented_key(&headers(&[("authorization", "bearer abc")])).unwrap(), "abc");
        assert_eq!(presented_key(&headers(&[("x-api-key", "abc")])).unwrap(), "abc");
        assert_eq!(presented_key(&headers(&[("x-api-key", "abc"), ("authorization", "Bearer abc")])).unwrap(), "abc");
    }

    #[test]
    fn missing_conflicting_or_wrong_scheme_is_401() {
        for h in [
            headers(&[]),
            headers(&[("authorization", "Basic abc")]),
            headers(&[("authorization", "Bearer ")]),
            headers(&[("x-api-key", "a"), ("authorization", "Bearer b")]),
        ] {
            assert!(matches!(presented_key(&h), Err(Error::Unauthorized(_))));
        }
    }
}
