//! Wall-clock time as the storage layer keeps it: integer milliseconds since
//! the Unix epoch, rendered as RFC 3339 at the API edge.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// RFC 3339 (UTC, millisecond precision) for a stored millisecond timestamp.
pub fn rfc3339(ms: i64) -> String {
    let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let dt = dt.replace_nanosecond((ms.rem_euclid(1000) as u32) * 1_000_000).unwrap_or(dt);
    dt.format(&Rfc3339).unwrap_or_default()
}

/// The calendar month (UTC) holding `ms`, as `[start, end)` in milliseconds.
pub fn month_bounds(ms: i64) -> (i64, i64) {
    let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let start = dt.date().replace_day(1).expect("day 1 exists in every month").midnight().assume_utc();
    let (y, m) = if dt.month() == time::Month::December {
        (dt.year() + 1, time::Month::January)
    } else {
        (dt.year(), dt.month().next())
    };
    let end = time::Date::from_calendar_date(y, m, 1).expect("day 1 exists").midnight().assume_utc();
    (
        (start.unix_timestamp_nanos() / 1_000_000) as i64,
        (end.unix_timestamp_nanos() / 1_000_000) as i64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_keeps_milliseconds() {
        assert_eq!(rfc3339(1_773_662_400_123), "2026-03-16T12:00:00.123Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn month_bounds_wrap_december() {
        let (s, e) = month_bounds(1_798_675_200_000 - 1); // 2026-12-31T23:59:59.999Z
        assert_eq!(rfc3339(s), "2026-12-01T00:00:00Z");
        assert_eq!(rfc3339(e), "2027-01-01T00:00:00Z");
    }
}
