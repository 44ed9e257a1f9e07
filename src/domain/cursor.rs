use base64::Engine as _;

use crate::{Error, Result};

/// Where a page of a newest-first list ends: the last row's creation time
/// and id, opaque to clients (base64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: i64,
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}|{}", self.created_at, self.id))
    }

    pub fn decode(s: &str) -> Result<Cursor> {
        let bad = || Error::bad_request("cursor is not one this API returned");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let (at, id) = text.split_once('|').ok_or_else(bad)?;
        let id = uuid::Uuid::parse_str(id).map_err(|_| bad())?;
        Ok(Cursor { created_at: at.parse().map_err(|_| bad())?, id: id.to_string() })
    }
}

