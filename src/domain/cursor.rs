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

    /// The condition and order of a newest-first page of `(created_at, id)`
    /// rows after `cursor`, appended to a query whose last placeholder is
    /// `$n`; the cursor's two values are then bound next ([`Cursor::bind`]).
    /// One row more than `limit` is fetched, for [`page`] to see whether
    /// another page follows.
    pub fn sql_page(cursor: Option<&Cursor>, n: usize, limit: u32) -> String {
        let after = match cursor {
            Some(_) => format!(" AND (created_at < ${a} OR (created_at = ${a} AND id < ${b}))", a = n + 1, b = n + 2),
            None => String::new(),
        };
        format!("{after} ORDER BY created_at DESC, id DESC LIMIT {}", limit + 1)
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


/// The first `limit` of `rows` (fetched with [`Cursor::sql_page`]) through
/// `convert`, which also gives each row's cursor, and the cursor of the next
/// page when there is one.
pub fn page<R, T>(rows: &[R], limit: u32, mut convert: impl FnMut(&R) -> Result<(T, Cursor)>) -> Result<(Vec<T>, Option<Cursor>)> {
    let more = rows.len() > limit as usize;
    let mut items = Vec::with_capacity(rows.len().min(limit as usize));
    let mut last = None;
    for row in rows.iter().take(limit as usize) {
        let (item, cursor) = convert(row)?;
        items.push(item);
        last = Some(cursor);
    }
    Ok((items, if more { last } else { None }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_ends_with_the_cursor_of_its_last_row_only_when_more_follow() {
        let at = |i: i64| Cursor { created_at: i, id: uuid::Uuid::nil().to_string() };
        let rows = [3, 2, 1];
        let (items, next) = page(&rows, 2, |r| Ok((*r, at(*r)))).unwrap();
        assert_eq!((items, next), (vec![3, 2], Some(at(2))));
        let (items, next) = page(&rows, 3, |r| Ok((*r, at(*r)))).unwrap();
        assert_eq!((items, next), (vec![3, 2, 1], None));
        assert_eq!(Cursor::sql_page(None, 1, 20), " ORDER BY created_at DESC, id DESC LIMIT 21");
        assert!(Cursor::sql_page(Some(&at(1)), 3, 5).starts_with(" AND (created_at < $4 OR (created_at = $4 AND id < $5))"));
    }
}
