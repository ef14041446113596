//! The `template:FILE` format: a user's text with `{{placeholders}}`,
//! checked when loaded and filled for each credential. Apart because it is
//! the only format whose shape the operator writes.

use std::fmt::Write as _;

use zeroize::Zeroizing;

use super::dsn::{client_tls, servers};
use super::{rfc3339, Credential};
use crate::error::{Error, Result};

/// Placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "username",
    "password",
    "host",
    "port",
    "database",
    "dsn",
    "expires_at",
    "lease_id",
    "sslmode",
    "sslrootcert",
    "hosts",
    "ports",
    "target_session_attrs",
];

/// A user template, checked when loaded: an unknown `{{name}}` is a config
/// error at start-up, not a surprise in the file later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
}

impl Template {
    pub fn parse(text: String) -> Result<Self> {
        let mut rest = text.as_str();
        while let Some(open) = rest.find("{{") {
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| Error::config("template: unclosed {{"))?;
            let name = after[..close].trim();
            if !PLACEHOLDERS.contains(&name) {
                return Err(Error::config(format!(
                    "template: unknown placeholder {{{{{name}}}}} (known: {})",
                    PLACEHOLDERS.join(", ")
                )));
            }
            rest = &after[close + 2..];
        }
        Ok(Template { text })
    }

    pub(super) fn render(&self, c: &Credential) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(self.text.len() + 64));
        let mut rest = self.text.as_str();
        while let Some(open) = rest.find("{{") {
            out.push_str(&rest[..open]);
            let after = &rest[open + 2..];
            // parse() saw every placeholder closed.
            let close = after.find("}}").unwrap_or(after.len());
            match after[..close].trim() {
                "username" => out.push_str(&c.username),
                "password" => out.push_str(c.password.expose()),
                "host" => out.push_str(&c.host),
                "port" => {
                    let _ = write!(out, "{}", c.port);
                }
                "database" => out.push_str(&c.database),
                "dsn" => out.push_str(&c.dsn),
                "expires_at" => out.push_str(&rfc3339(c)),
                "lease_id" => out.push_str(&c.lease_id),
                "sslmode" => out.push_str(client_tls(c).mode.as_deref().unwrap_or("")),
                "sslrootcert" => out.push_str(client_tls(c).rootcert.as_deref().unwrap_or("")),
                "hosts" => out.push_str(&servers(c).hosts()),
                "ports" => out.push_str(&servers(c).ports()),
                "target_session_attrs" => {
                    out.push_str(servers(c).target_session_attrs.as_deref().unwrap_or(""))
                }
                _ => {}
            }
            rest = after.get(close + 2..).unwrap_or("");
        }
        out.push_str(rest);
        out
    }
}
