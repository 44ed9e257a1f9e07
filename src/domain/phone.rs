//! `PhoneNumber`: a dialable number in E.164 form, checked against the
//! numbering plan of its country (libphonenumber's metadata, through the
//! `phonenumber` crate), not only its shape.

use std::fmt;

use crate::Error;

/// `+` and 8-15 digits that form a valid number of a real numbering plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// Parses `raw` as given by a client; the error names the field and
    /// what is wrong with the number.
    pub fn parse(field: &str, raw: &str) -> crate::Result<Self> {
        let bad = |why: &str| Error::bad_request(format!("{field} '{raw}' is not a valid E.164 number: {why}"));
        let digits = raw.strip_prefix('+').ok_or_else(|| bad("it must start with + and the country code"))?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("after the + only digits are allowed (no spaces or punctuation)"));
        }
        if !(8..=15).contains(&digits.len()) {
            return Err(bad("E.164 numbers have 8 to 15 digits after the +"));
        }
        let parsed = phonenumber::parse(None, raw).map_err(|e| bad(&e.to_string()))?;
        if !phonenumber::is_valid(&parsed) {
            return Err(bad("no such number in its country's numbering plan"));
        }
        Ok(PhoneNumber(parsed.format().mode(phonenumber::Mode::E164).to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_numbers_of_several_countries() {
        for n in ["+14155550123", "+442079460958", "+33142685300", "+4930901820", "+819012345678"] {
            assert_eq!(PhoneNumber::parse("phoneNumber", n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn invalid_numbers_name_the_field_and_the_problem() {
        for (n, why) in [
            ("12345", "must start with +"),
            ("14155550123", "must start with +"),
            ("+1555", "8 to 15 digits"),
            ("+1415555012a", "only digits"),
            ("+1 415 555 0123", "only digits"),
            ("call me", "must start with +"),
            ("+", "only digits"),
            ("+1234567890123456", "8 to 15 digits"),
            ("+10005550123", "numbering plan"),
            ("+999123456789", ""),
        ] {
            let err = PhoneNumber::parse("phoneNumber", n).unwrap_err().to_string();
            assert!(err.starts_with(&format!("phoneNumber '{n}'")), "{err}");
            assert!(err.contains(why), "{n}: {err}");
        }
    }
}
