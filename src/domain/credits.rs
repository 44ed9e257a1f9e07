use std::fmt;

use serde::{Deserialize, Serialize};

/// A non-negative whole number of credits. Money is never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Credits(u64);

impl Credits {
    pub const ZERO: Credits = Credits(0);

    pub const fn new(n: u64) -> Self {
        Credits(n)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The value as the database stores it (BIGINT), if it fits.
    pub fn to_db(self) -> crate::Result<i64> {
        i64::try_from(self.0)
            .map_err(|_| crate::Error::bad_request(format!("credits: {} exceeds {}", self.0, i64::MAX)))
    }

    /// A stored balance; a negative one would be a broken invariant.
    pub fn from_db(v: i64) -> crate::Result<Self> {
        u64::try_from(v)
            .map(Credits)
            .map_err(|_| crate::Error::Internal(anyhow::anyhow!("negative credit value {v} in storage")))
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
