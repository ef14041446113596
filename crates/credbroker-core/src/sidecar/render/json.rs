//! The `json` format: every field of the credential, the host list and
//! the client TLS settings as one pretty-printed object.

use zeroize::Zeroizing;

use super::dsn::{client_tls, servers};
use super::{rfc3339, Credential};

pub(super) fn json(c: &Credential) -> Zeroizing<String> {
    let tls = client_tls(c);
    let servers = servers(c);
    let hosts: Vec<serde_json::Value> = servers
        .list
        .iter()
        .map(|(host, port)| serde_json::json!({ "host": host, "port": port }))
        .collect();
    let v = serde_json::json!({
        "hosts": hosts,
        "target_session_attrs": servers.target_session_attrs,
        "sslmode": tls.mode,
        "sslrootcert": tls.rootcert,
        "lease_id": c.lease_id,
        "kind": c.kind,
        "username": c.username,
        "password": c.password.expose(),
        "host": c.host,
        "port": c.port,
        "database": c.database,
        "dsn": c.dsn.as_str(),
        "expires_at": rfc3339(c),
        "max_expires_at": c.max_expires_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    // The Value's own strings are dropped unwiped: serde_json has no
    // zeroizing mode; the copy we keep is.
    Zeroizing::new(s)
}
