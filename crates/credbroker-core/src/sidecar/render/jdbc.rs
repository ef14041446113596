//! The `jdbc` format: a JDBC URL for PgJDBC or Connector/J, user and
//! password as percent-encoded parameters, TLS and the server type in
//! each driver's own names.

use std::fmt::Write as _;

use zeroize::Zeroizing;

use super::dsn::{client_tls, servers};
use super::{is_mysql, Credential};

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn pct(out: &mut String, v: &str) {
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

pub(super) fn jdbc(c: &Credential) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    let scheme = if is_mysql(c) { "mysql" } else { "postgresql" };
    let servers = servers(c);
    let _ = write!(out, "jdbc:{scheme}://{}/", servers.host_ports());
    pct(&mut out, &c.database);
    out.push_str("?user=");
    pct(&mut out, &c.username);
    out.push_str("&password=");
    pct(&mut out, c.password.expose());
    let tls = client_tls(c);
    if let Some(mode) = &tls.mode {
        if is_mysql(c) {
            // Connector/J 8's name and values; it takes a CA only as a
            // trust store, not a PEM file, so ssl-ca has no place here.
            out.push_str("&sslMode=");
            pct(&mut out, mode);
        } else {
            // pgjdbc: `ssl=true` alone would mean verify-full; sslmode
            // says which.
            if mode != "disable" {
                out.push_str("&ssl=true");
            }
            out.push_str("&sslmode=");
            pct(&mut out, mode);
            if let Some(root) = &tls.rootcert {
                out.push_str("&sslrootcert=");
                pct(&mut out, root);
            }
        }
    }
    if let Some(server_type) = servers
        .target_session_attrs
        .as_deref()
        .and_then(pgjdbc_target_server_type)
    {
        out.push_str("&targetServerType=");
        out.push_str(server_type);
    }
    out.push('\n');
    out
}

/// libpq's `target_session_attrs` as PgJDBC's `targetServerType`. Both
/// decide by the same test (`transaction_read_only`, or
/// `pg_is_in_recovery()` for primary/standby): `read-write` ↔ `primary`,
/// `read-only`/`standby` ↔ `secondary`, `prefer-standby` ↔
/// `preferSecondary`; `any` is PgJDBC's default, so nothing is written.
pub(super) fn pgjdbc_target_server_type(attrs: &str) -> Option<&'static str> {
    match attrs {
        "read-write" | "primary" => Some("primary"),
        "read-only" | "standby" => Some("secondary"),
        "prefer-standby" => Some("preferSecondary"),
        _ => None,
    }
}
