//! What every format reads back from the broker's DSN: the client TLS
//! settings (`client_tls`) and the list of servers with libpq's
//! `target_session_attrs` (`servers`). Apart from the formats because each
//! of them writes the same facts in its own way.

use super::{is_mysql, Credential};

/// The TLS clients should use, as the broker put it into the DSN's query
/// (`[databases.X] client_sslmode`, `client_sslrootcert`): libpq's
/// `sslmode`/`sslrootcert`, or MySQL's `ssl-mode`/`ssl-ca`. Neither is
/// secret; every format carries them, so no client falls back to
/// plaintext because its format had no room for them.
pub(super) struct ClientTls {
    pub(super) mode: Option<String>,
    pub(super) rootcert: Option<String>,
}

pub(super) fn client_tls(c: &Credential) -> ClientTls {
    let (mode_key, root_key) = if is_mysql(c) {
        ("ssl-mode", "ssl-ca")
    } else {
        ("sslmode", "sslrootcert")
    };
    let mut tls = ClientTls {
        mode: None,
        rootcert: None,
    };
    let query = c.dsn.split_once('?').map(|(_, q)| q).unwrap_or("");
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned();
        if k == mode_key {
            tls.mode = Some(v);
        } else if k == root_key {
            tls.rootcert = Some(v);
        }
    }
    tls
}
/// The servers a credential reaches, in the order clients try them.
pub(super) struct Servers {
    pub(super) list: Vec<(String, u32)>,
    pub(super) target_session_attrs: Option<String>,
}

impl Servers {
    /// libpq's host list: `h1,h2`.
    pub(super) fn hosts(&self) -> String {
        let hosts: Vec<&str> = self.list.iter().map(|(h, _)| h.as_str()).collect();
        hosts.join(",")
    }

    /// libpq's port list, one per host: `5432,5433`.
    pub(super) fn ports(&self) -> String {
        let ports: Vec<String> = self.list.iter().map(|(_, p)| p.to_string()).collect();
        ports.join(",")
    }

    /// A URL authority's list: `h1:5432,[::1]:5433`.
    pub(super) fn host_ports(&self) -> String {
        let list: Vec<String> = self
            .list
            .iter()
            .map(|(h, p)| {
                if h.contains(':') {
                    format!("[{h}]:{p}")
                } else {
                    format!("{h}:{p}")
                }
            })
            .collect();
        list.join(",")
    }
}

/// Every host of the credential: read from the broker's DSN when it names
/// several (`postgresql://user:pw@h1:p1,h2:p2/db?target_session_attrs=…`,
/// as `backend/postgres` writes it), else the reply's `host` and `port`.
/// The user and password are known, so they are stripped as the exact
/// prefix they are, not by looking for an `@` a password could hold.
pub(super) fn servers(c: &Credential) -> Servers {
    let target_session_attrs = if is_mysql(c) {
        None
    } else {
        query_param(c, "target_session_attrs")
    };
    let single = || Servers {
        list: vec![(c.host.clone(), c.port)],
        target_session_attrs: target_session_attrs.clone(),
    };
    if is_mysql(c) {
        return single();
    }
    let Some(rest) = ["postgresql://", "postgres://"]
        .iter()
        .find_map(|scheme| c.dsn.strip_prefix(scheme))
    else {
        return single();
    };
    let with_password = format!("{}:{}@", c.username, c.password.expose());
    let Some(rest) = rest
        .strip_prefix(with_password.as_str())
        .or_else(|| rest.strip_prefix(&format!("{}@", c.username)))
    else {
        return single();
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if !authority.contains(',') {
        return single();
    }
    let mut list = Vec::new();
    for part in authority.split(',') {
        let (host, port) = match part.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((h, p)) => (h, p.strip_prefix(':')),
                None => return single(),
            },
            None => match part.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (part, None),
            },
        };
        // libpq's default for a host without its own port.
        let port = match port.map(str::parse::<u32>) {
            None => 5432,
            Some(Ok(p)) => p,
            Some(Err(_)) => return single(),
        };
        if host.is_empty() {
            return single();
        }
        let host = percent_encoding::percent_decode_str(host)
            .decode_utf8_lossy()
            .into_owned();
        list.push((host, port));
    }
    Servers {
        list,
        target_session_attrs,
    }
}

/// A query parameter of the DSN, decoded.
fn query_param(c: &Credential, key: &str) -> Option<String> {
    let query = c.dsn.split_once('?').map(|(_, q)| q).unwrap_or("");
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}
