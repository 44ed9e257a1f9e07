use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What an API key may do. `*` grants everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    All,
    Agents,
    Calls,
    Generate,
    Jobs,
    Keys,
    Settings,
    Usage,
}

impl Scope {
    pub const ALL: [Scope; 8] = [
        Scope::All,
        Scope::Agents,
        Scope::Calls,
        Scope::Generate,
        Scope::Jobs,
        Scope::Keys,
        Scope::Settings,
        Scope::Usage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::All => "*",
            Scope::Agents => "agents",
            Scope::Calls => "calls",
            Scope::Generate => "generate",
            Scope::Jobs => "jobs",
            Scope::Keys => "keys",
            Scope::Settings => "settings",
            Scope::Usage => "usage",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = Scope::ALL.iter().map(|x| x.as_str()).collect();
            crate::Error::bad_request(format!("scope '{s}' is not one of {}", names.join(", ")))
        })
    }
}

/// A non-empty, sorted, de-duplicated set of scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    pub fn all() -> Self {
        Scopes(vec![Scope::All])
    }

    pub fn new(mut v: Vec<Scope>) -> crate::Result<Self> {
        if v.is_empty() {
            return Err(crate::Error::bad_request("scopes: at least one scope is required"));
        }
        v.sort();
        v.dedup();
        if v.contains(&Scope::All) {
            v = vec![Scope::All];
        }
        Ok(Scopes(v))
    }

    pub fn allows(&self, scope: Scope) -> bool {
        self.0.iter().any(|s| *s == Scope::All || *s == scope)
    }

    /// True when every scope of `other` is granted by `self`: a key can only
    /// hand out what it holds itself.
    pub fn covers(&self, other: &Scopes) -> bool {
        other.0.iter().all(|s| if *s == Scope::All { self.0.contains(&Scope::All) } else { self.allows(*s) })
    }

    /// The scopes a holder of `self` hands out for `wanted` (`what`:
    /// "create a key", "issue a token"): its own when none are asked for;
    /// 403 when asked for more than it holds.
    pub fn grant(&self, wanted: Option<Scopes>, what: &str) -> crate::Result<Scopes> {
        let wanted = wanted.unwrap_or_else(|| self.clone());
        if !self.covers(&wanted) {
            return Err(crate::Error::Forbidden(format!(
                "a key with scopes [{}] cannot {what} with scopes [{}]",
                self.to_db(),
                wanted.to_db()
            )));
        }
        Ok(wanted)
    }

    /// Storage form: space-separated names.
    pub fn to_db(&self) -> String {
        self.0.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
    }

    pub fn from_db(s: &str) -> crate::Result<Self> {
        Scopes::new(s.split_whitespace().map(Scope::from_str).collect::<crate::Result<_>>()?)
    }

    /// Parses a comma- or space-separated list (CLI form).
    pub fn parse_list(s: &str) -> crate::Result<Self> {
        Scopes::new(
            s.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|p| !p.is_empty())
                .map(Scope::from_str)
                .collect::<crate::Result<_>>()?,
        )
    }
}

impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|x| x.as_str()))
    }
}

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let scopes = names
            .iter()
            .map(|n| Scope::from_str(n))
            .collect::<crate::Result<Vec<_>>>()
            .map_err(serde::de::Error::custom)?;
        Scopes::new(scopes).map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for Scopes {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type};
        ArrayBuilder::new()
            .items(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::String))
                    .enum_values(Some(Scope::ALL.iter().map(|s| s.as_str()))),
            )
            .min_items(Some(1))
            .into()
    }
}

impl utoipa::ToSchema for Scopes {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_swallows_the_rest() {
        let s = Scopes::parse_list("calls,*,keys").unwrap();
        assert_eq!(s.to_db(), "*");
        assert!(s.allows(Scope::Settings));
    }

    #[test]
    fn a_key_cannot_grant_more_than_it_holds() {
        let holder = Scopes::parse_list("keys,calls").unwrap();
        assert!(holder.covers(&Scopes::parse_list("calls").unwrap()));
        assert!(!holder.covers(&Scopes::parse_list("generate").unwrap()));
        assert!(!holder.covers(&Scopes::all()));
        assert!(Scopes::all().covers(&Scopes::all()));
    }

    #[test]
    fn unknown_and_empty_scopes_are_refused() {
        assert!(Scopes::parse_list("calls,phone").unwrap_err().to_string().contains("phone"));
        assert!(Scopes::parse_list(" , ").is_err());
    }
}
