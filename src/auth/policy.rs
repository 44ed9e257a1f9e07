//! A key's own limits, beyond its scopes (the gateway conventions of seed
//! 002): the models it may use, the client addresses it is accepted from,
//! and how many credits it may spend per UTC day. Absent means unlimited.
//!
//! A key can only hand out limits at least as tight as its own
//! ([`KeyPolicy::narrow`]): a key restricted to one model, one network or a
//! budget cannot mint a key without them.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::Credits;
use crate::{Error, Result};

const MAX_MODELS: usize = 50;
const MAX_NETWORKS: usize = 50;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyPolicy {
    /// Model ids the key may use (generation models, an agent's `llmModel`
    /// and `ttsModel`, `/v1` models). Absent: every model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_models: Option<Vec<String>>,
    /// Client networks (CIDR, or a bare address) the key is accepted from.
    /// Absent: any address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>)]
    pub ip_allowlist: Option<Vec<IpNet>>,
    /// Credits the key may spend per UTC day (generation and call minutes).
    /// Absent: no cap besides the organisation's balance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub daily_credit_cap: Option<Credits>,
}

impl KeyPolicy {
    /// Checks the bounds of a policy that came from outside.
    pub fn validate(self) -> Result<KeyPolicy> {
        if let Some(models) = &self.allowed_models {
            if models.is_empty() || models.len() > MAX_MODELS {
                return Err(Error::bad_request(format!(
                    "allowedModels must list 1-{MAX_MODELS} models (omit it to allow every model), got {}",
                    models.len()
                )));
            }
            if let Some(bad) = models.iter().find(|m| m.is_empty() || m.len() > 100 || m.chars().any(char::is_control)) {
                return Err(Error::bad_request(format!("allowedModels: '{bad}' is not a model id (1-100 printable characters)")));
            }
        }
        if let Some(nets) = &self.ip_allowlist {
            if nets.is_empty() || nets.len() > MAX_NETWORKS {
                return Err(Error::bad_request(format!(
                    "ipAllowlist must list 1-{MAX_NETWORKS} networks (omit it to allow any address), got {}",
                    nets.len()
                )));
            }
        }
        if self.daily_credit_cap == Some(Credits::ZERO) {
            return Err(Error::bad_request("dailyCreditCap must be at least 1 (omit it for no cap)"));
        }
        Ok(KeyPolicy { ip_allowlist: self.ip_allowlist.map(|n| n.into_iter().map(|n| n.trunc()).collect()), ..self })
    }

    /// A network from the command line or config: a CIDR or a bare address.
    pub fn parse_network(s: &str) -> Result<IpNet> {
        let s = s.trim();
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map(|n| n.trunc())
            .map_err(|_| Error::bad_request(format!("'{s}' is not an IP network (e.g. 10.0.0.0/8 or 203.0.113.7)")))
    }

    /// The policy of a key created by a holder of `self` that asked for
    /// `wanted`: what it leaves out is inherited, what it asks for must fit
    /// inside `self` (403 otherwise).
    pub fn narrow(&self, wanted: KeyPolicy) -> Result<KeyPolicy> {
        let allowed_models = match (&self.allowed_models, wanted.allowed_models) {
            (Some(own), Some(w)) => {
                if let Some(m) = w.iter().find(|m| !own.contains(m)) {
                    return Err(Error::Forbidden(format!("this key may not use model '{m}', so it cannot grant it")));
                }
                Some(w)
            }
            (own, w) => w.or_else(|| own.clone()),
        };
        let ip_allowlist = match (&self.ip_allowlist, wanted.ip_allowlist) {
            (Some(own), Some(w)) => {
                if let Some(n) = w.iter().find(|n| !own.iter().any(|o| o.contains(*n))) {
                    return Err(Error::Forbidden(format!("network {n} is outside this key's ipAllowlist, so it cannot grant it")));
                }
                Some(w)
            }
            (own, w) => w.or_else(|| own.clone()),
        };
        let daily_credit_cap = match (self.daily_credit_cap, wanted.daily_credit_cap) {
            (Some(own), Some(w)) if w > own => {
                return Err(Error::Forbidden(format!("dailyCreditCap {w} is above this key's own cap of {own}")));
            }
            (own, w) => w.or(own),
        };
        Ok(KeyPolicy { allowed_models, ip_allowlist, daily_credit_cap })
    }

    /// 403 unless the key may use `model`.
    pub fn require_model(&self, model: &str) -> Result<()> {
        match &self.allowed_models {
            Some(list) if !list.iter().any(|m| m == model) => Err(Error::Forbidden(format!(
                "this API key may not use model '{model}'; it is limited to: {}",
                list.join(", ")
            ))),
            _ => Ok(()),
        }
    }

    /// 403 unless the key is accepted from `ip`.
    pub fn require_ip(&self, ip: IpAddr) -> Result<()> {
        let ip = ip.to_canonical();
        match &self.ip_allowlist {
            Some(nets) if !nets.iter().any(|n| n.contains(&ip)) => {
                Err(Error::Forbidden(format!("this API key is not accepted from {ip} (see the key's ipAllowlist)")))
            }
            _ => Ok(()),
        }
    }

    /// The columns `(allowed_models, ip_allowlist, daily_credit_cap)`.
    pub fn to_db(&self) -> Result<(Option<String>, Option<String>, Option<i64>)> {
        Ok((
            self.allowed_models.as_ref().map(|m| serde_json::Value::from(m.clone()).to_string()),
            self.ip_allowlist.as_ref().map(|n| n.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")),
            self.daily_credit_cap.map(Credits::to_db).transpose()?,
        ))
    }

    pub fn from_db(models: Option<String>, nets: Option<String>, cap: Option<i64>) -> Result<KeyPolicy> {
        let corrupt = |what: &str| Error::Internal(anyhow::anyhow!("stored key {what} is corrupt"));
        Ok(KeyPolicy {
            allowed_models: models.map(|m| serde_json::from_str(&m).map_err(|_| corrupt("allowed_models"))).transpose()?,
            ip_allowlist: nets
                .map(|n| n.split(',').map(|s| s.parse::<IpNet>().map_err(|_| corrupt("ip_allowlist"))).collect())
                .transpose()?,
            daily_credit_cap: cap.map(Credits::from_db).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Option<Vec<IpNet>> {
        Some(list.iter().map(|s| KeyPolicy::parse_network(s).unwrap()).collect())
    }

    #[test]
    fn addresses_outside_the_allowlist_are_refused() {
        let p = KeyPolicy { ip_allowlist: nets(&["10.0.0.0/8", "203.0.113.7"]), ..Default::default() };
        assert!(p.require_ip("10.1.2.3".parse().unwrap()).is_ok());
        assert!(p.require_ip("203.0.113.7".parse().unwrap()).is_ok());
        // An IPv4 client seen through an IPv6 socket is still that client.
        assert!(p.require_ip("::ffff:10.9.9.9".parse().unwrap()).is_ok());
        assert!(matches!(p.require_ip("203.0.113.8".parse().unwrap()), Err(Error::Forbidden(_))));
        assert!(KeyPolicy::default().require_ip("192.0.2.1".parse().unwrap()).is_ok());
    }

    #[test]
    fn models_outside_the_list_are_refused() {
        let p = KeyPolicy { allowed_models: Some(vec!["flux-pro".into()]), ..Default::default() };
        assert!(p.require_model("flux-pro").is_ok());
        let msg = p.require_model("veo-3").unwrap_err().to_string();
        assert!(msg.contains("veo-3") && msg.contains("flux-pro"), "{msg}");
    }

    #[test]
    fn a_key_cannot_grant_more_than_it_has() {
        let own = KeyPolicy {
            allowed_models: Some(vec!["a".into(), "b".into()]),
            ip_allowlist: nets(&["10.0.0.0/8"]),
            daily_credit_cap: Some(Credits::new(100)),
        };
        // Left out: inherited.
        assert_eq!(own.narrow(KeyPolicy::default()).unwrap(), own);
        let tighter = KeyPolicy {
            allowed_models: Some(vec!["a".into()]),
            ip_allowlist: nets(&["10.1.0.0/16"]),
            daily_credit_cap: Some(Credits::new(50)),
        };
        assert_eq!(own.narrow(tighter.clone()).unwrap(), tighter);
        for wider in [
            KeyPolicy { allowed_models: Some(vec!["c".into()]), ..Default::default() },
            KeyPolicy { ip_allowlist: nets(&["0.0.0.0/0"]), ..Default::default() },
            KeyPolicy { daily_credit_cap: Some(Credits::new(101)), ..Default::default() },
        ] {
            assert!(matches!(own.narrow(wider), Err(Error::Forbidden(_))));
        }
        // An unlimited key grants anything.
        assert_eq!(KeyPolicy::default().narrow(tighter.clone()).unwrap(), tighter);
    }

    #[test]
    fn bounds_and_storage() {
        assert!(KeyPolicy { allowed_models: Some(vec![]), ..Default::default() }.validate().is_err());
        assert!(KeyPolicy { daily_credit_cap: Some(Credits::ZERO), ..Default::default() }.validate().is_err());
        assert!(KeyPolicy::parse_network("10.0.0.300/8").is_err());
        assert_eq!(KeyPolicy::parse_network("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        let p = KeyPolicy {
            allowed_models: Some(vec!["x,y".into()]),
            ip_allowlist: nets(&["10.0.0.0/8", "::1"]),
            daily_credit_cap: Some(Credits::new(7)),
        };
        let (m, n, c) = p.to_db().unwrap();
        assert_eq!(KeyPolicy::from_db(m, n, c).unwrap(), p);
        let parsed: KeyPolicy = serde_json::from_str(r#"{"ipAllowlist":["10.0.0.0/8"],"dailyCreditCap":5}"#).unwrap();
        assert_eq!(parsed.daily_credit_cap, Some(Credits::new(5)));
    }
}
