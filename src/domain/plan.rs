use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The subscription tier of an account. Some features need a minimum tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    Free,
    Creator,
    Pro,
    Enterprise,
}

impl Plan {
    pub const ALL: [Plan; 4] = [Plan::Free, Plan::Creator, Plan::Pro, Plan::Enterprise];

    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Creator => "creator",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Plan {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Plan::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| {
            crate::Error::bad_request(format!("plan '{s}' is not one of free, creator, pro, enterprise"))
        })
    }
}
