use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("The id of ", $what, " (a UUID v4).")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            pub fn new() -> Self {
                $name(Uuid::new_v4())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> crate::Result<Self> {
                Uuid::parse_str(s)
                    .map($name)
                    .map_err(|_| crate::Error::bad_request(format!("{} '{}' is not a UUID", $what, s)))
            }
        }
    };
}

uuid_id!(OrgId, "organisation");
uuid_id!(KeyId, "API key");
uuid_id!(AgentId, "agent");
uuid_id!(CallId, "call");
