//! What Vault clients send: a JSON object body (or none), a lease id of
//! the form `<mount>/creds/<role>/<id>`, an `increment` given as seconds
//! or as a duration string. Each bad value is a clear `InvalidArgument`.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::lease::LeaseId;

/// Largest increment taken, before any role's limit applies: anything
/// beyond is surely a mistake, and keeps arithmetic far from overflow.
const MAX_INCREMENT: Duration = Duration::from_secs(366 * 24 * 3600);
/// Longest lease id taken: `<mount ≤ 64>/creds/<role ≤ 64>/<28>`.
const MAX_LEASE_ID_LEN: usize = 200;

/// A request body: a JSON object, or nothing at all (hvac sends `{}`,
/// curl often nothing).
pub struct Body(Map<String, Value>);

impl Body {
    pub fn parse(bytes: &[u8]) -> Result<Body> {
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Body(Map::new()));
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => Ok(Body(m)),
            Ok(_) => Err(Error::invalid("the request body must be a JSON object")),
            Err(e) => Err(Error::invalid(format!(
                "the request body is not valid JSON: {e}"
            ))),
        }
    }

    /// An optional string field; `null` counts as absent.
    pub fn string(&self, field: &str) -> Result<Option<String>> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Error::invalid(format!("{field} must be a string"))),
        }
    }

    /// `increment` (or another duration field): a number of seconds, or a
    /// string — digits (seconds) or a duration such as `"1h"`, `"90m"`,
    /// `"1h30m"`. Absent, `null` or 0: None (the default applies, as in
    /// Vault).
    pub fn duration(&self, field: &str) -> Result<Option<Duration>> {
        let d = match self.0.get(field) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(s) if s.is_finite() && s >= 0.0 && s <= MAX_INCREMENT.as_secs_f64() => {
                    Duration::from_secs(s as u64)
                }
                Some(s) if s < 0.0 => {
                    return Err(Error::invalid(format!("{field} must not be negative")))
                }
                _ => return Err(Error::invalid(format!("{field} is absurdly large"))),
            },
            Some(Value::String(s)) => parse_duration(field, s)?,
            Some(_) => {
                return Err(Error::invalid(format!(
                    "{field} must be a number of seconds or a duration string such as \"1h\""
                )))
            }
        };
        if d > MAX_INCREMENT {
            return Err(Error::invalid(format!("{field} is absurdly large")));
        }
        Ok((!d.is_zero()).then_some(d))
    }
}

fn parse_duration(field: &str, s: &str) -> Result<Duration> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| Error::invalid(format!("{field} is absurdly large")));
    }
    if s.starts_with('-') {
        return Err(Error::invalid(format!("{field} must not be negative")));
    }
    humantime::parse_duration(s).map_err(|_| {
        Error::invalid(format!(
            "{field} {:?} is not a duration; use seconds or e.g. \"1h\"",
            s.chars().take(40).collect::<String>()
        ))
    })
}

/// A lease as Vault clients name it: `<mount>/creds/<role>/<lease id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRef {
    pub role: String,
    pub id: LeaseId,
}

impl LeaseRef {
    pub fn new(role: &str, id: &LeaseId) -> Self {
        LeaseRef {
            role: role.to_string(),
            id: id.clone(),
        }
    }

    /// The name a client gets and sends back.
    pub fn to_vault(&self, mount: &str) -> String {
        format!("{mount}/creds/{}/{}", self.role, self.id)
    }

    /// Parses caller text; the role part is checked against the lease
    /// later (a mismatch is "no such lease").
    pub fn parse(mount: &str, s: &str) -> Result<LeaseRef> {
        if s.is_empty() {
            return Err(Error::invalid("lease_id is required"));
        }
        if s.len() > MAX_LEASE_ID_LEN {
            return Err(Error::invalid("lease_id is too long"));
        }
        let shape = || {
            Error::invalid(format!(
                "lease_id is not a lease of this broker (expected {mount}/creds/<role>/<id>)"
            ))
        };
        let rest = s
            .strip_prefix(mount)
            .and_then(|r| r.strip_prefix("/creds/"))
            .ok_or_else(shape)?;
        let (role, id) = rest.rsplit_once('/').ok_or_else(shape)?;
        if role.is_empty() || role.contains('/') {
            return Err(shape());
        }
        Ok(LeaseRef {
            role: role.to_string(),
            id: LeaseId::parse(id)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> Body {
        Body::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn bodies_are_objects_or_nothing() {
        assert!(Body::parse(b"").is_ok());
        assert!(Body::parse(b"  \n").is_ok());
        assert!(Body::parse(b"{}").is_ok());
        for bad in ["[1]", "\"x\"", "{", "nul"] {
            let e = Body::parse(bad.as_bytes()).err().unwrap();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        }
        assert_eq!(
            body(r#"{"name":"web"}"#).string("name").unwrap().as_deref(),
            Some("web")
        );
        assert_eq!(body(r#"{"name":null}"#).string("name").unwrap(), None);
        assert!(body(r#"{"name":3}"#).string("name").is_err());
    }

    #[test]
    fn increments_are_seconds_or_durations() {
        let inc = |s: &str| body(s).duration("increment");
        assert_eq!(inc("{}").unwrap(), None);
        assert_eq!(inc(r#"{"increment":null}"#).unwrap(), None);
        assert_eq!(inc(r#"{"increment":0}"#).unwrap(), None, "0: the default");
        assert_eq!(
            inc(r#"{"increment":3600}"#).unwrap(),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            inc(r#"{"increment":"3600"}"#).unwrap(),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            inc(r#"{"increment":"1h"}"#).unwrap(),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            inc(r#"{"increment":"1h30m"}"#).unwrap(),
            Some(Duration::from_secs(5400))
        );
        for bad in [
            r#"{"increment":-5}"#,
            r#"{"increment":"-5m"}"#,
            r#"{"increment":"soon"}"#,
            r#"{"increment":true}"#,
            r#"{"increment":1e30}"#,
            r#"{"increment":"99999999999999999999"}"#,
            r#"{"increment":"100000d"}"#,
        ] {
            let e = inc(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn lease_ids_round_trip_and_strangers_are_refused() {
        let id = LeaseId::generate();
        let r = LeaseRef::new("orders-ro", &id);
        let text = r.to_vault("database");
        assert_eq!(text, format!("database/creds/orders-ro/{id}"));
        assert_eq!(LeaseRef::parse("database", &text).unwrap(), r);
        for bad in [
            String::new(),
            format!("other/creds/orders-ro/{id}"),
            format!("database/static-creds/orders-ro/{id}"),
            format!("database/creds/{id}"),
            format!("database/creds//{id}"),
            format!("database/creds/a/b/{id}"),
            "database/creds/orders-ro/l_short".to_string(),
            format!("database/creds/{}/{id}", "x".repeat(300)),
        ] {
            let e = LeaseRef::parse("database", &bad)
                .err()
                .unwrap_or_else(|| panic!("{bad}"));
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        }
    }
}
