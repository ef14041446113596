//! The `kv` format: libpq's `key=value` pairs (the same keys for MySQL),
//! quoted as libpq reads them.

use zeroize::Zeroizing;

use super::dsn::{client_tls, servers};
use super::{is_mysql, Credential};

/// libpq quoting: bare when safe, else single quotes with `\'` and `\\`.
fn kv_value(out: &mut String, v: &str) {
    let bare = !v.is_empty()
        && !v
            .chars()
            .any(|ch| ch.is_whitespace() || ch == '\'' || ch == '\\');
    if bare {
        out.push_str(v);
    } else {
        out.push('\'');
        for ch in v.chars() {
            if ch == '\'' || ch == '\\' {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('\'');
    }
}

pub(super) fn kv(c: &Credential) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    let db_key = if is_mysql(c) { "database" } else { "dbname" };
    let servers = servers(c);
    let (host, port) = (servers.hosts(), servers.ports());
    let pairs: [(&str, &str); 5] = [
        ("host", &host),
        ("port", &port),
        ("user", &c.username),
        ("password", c.password.expose()),
        (db_key, &c.database),
    ];
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(k);
        out.push('=');
        kv_value(&mut out, v);
    }
    let tls = client_tls(c);
    let (mode_key, root_key) = if is_mysql(c) {
        ("ssl-mode", "ssl-ca")
    } else {
        ("sslmode", "sslrootcert")
    };
    for (k, v) in [
        (mode_key, &tls.mode),
        (root_key, &tls.rootcert),
        ("target_session_attrs", &servers.target_session_attrs),
    ] {
        if let Some(v) = v {
            out.push(' ');
            out.push_str(k);
            out.push('=');
            kv_value(&mut out, v);
        }
    }
    out.push('\n');
    out
}
