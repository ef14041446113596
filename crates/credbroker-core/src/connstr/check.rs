//! Each key/value pair checked, with a message that names the key and the
//! part that is wrong, then handed on to tokio-postgres as quoted words.

use std::net::IpAddr;

use super::read::{nth, parse_port};
use super::{dbtls, ConnStrError, Dialect, HostPort, PgConnStr, Result, LIBPQ_UNSUPPORTED};

/// A comma list's entries, each checked by `ok`; names the entry and its
/// place when one is wrong.
fn list<'a>(
    key: &str,
    value: &'a str,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> Result<Vec<&'a str>> {
    let entries: Vec<&str> = value.split(',').collect();
    let n = entries.len();
    for (i, e) in entries.iter().enumerate() {
        if !ok(e) {
            let place = if n == 1 {
                String::new()
            } else {
                format!(" (the {} of {n})", nth(i))
            };
            let shown = if e.is_empty() {
                "an empty entry".to_string()
            } else {
                format!("{e:?}")
            };
            return Err(format!("{key}: {shown}{place} is not {what}").into());
        }
    }
    Ok(entries)
}

fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        return Ok(());
    }
    let (last, rest) = allowed.split_last().unwrap_or((&"", &[]));
    let choices = if rest.is_empty() {
        last.to_string()
    } else {
        format!("{} or {last}", rest.join(", "))
    };
    Err(format!("{key}={value:?}: expected {choices}").into())
}

fn seconds(key: &str, value: &str) -> Result<()> {
    if !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_digit())
        && value.parse::<u32>().is_ok()
    {
        return Ok(());
    }
    Err(format!("{key}={value:?}: expected a whole number of seconds").into())
}

/// One quoted word for tokio-postgres's key=value reader.
pub(super) fn word(key: &str, value: &str) -> String {
    format!(
        "{key}='{}'",
        value.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

pub(super) fn check(pairs: &[(String, String)]) -> Result<PgConnStr> {
    // A later key wins, as in libpq (a URL's `?host=` over its authority).
    let mut last: Vec<(&str, &str)> = Vec::new();
    for (k, v) in pairs {
        last.retain(|(key, _)| key != k);
        last.push((k.as_str(), v.as_str()));
    }
    let get = |k: &str| last.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let mut words = Vec::new();
    for &(key, value) in &last {
        match key {
            "password" => return Err(ConnStrError::Password),
            k if dbtls::is_tls_key(k, Dialect::Postgres) => continue,
            "host" => {
                list(
                    key,
                    value,
                    "a host name, IP address or socket directory",
                    |h| !h.is_empty() && !h.chars().any(|c| c.is_whitespace() || c.is_control()),
                )?;
            }
            "hostaddr" => {
                list(key, value, "an IP address", |h| h.parse::<IpAddr>().is_ok())?;
            }
            "port" => {
                list(key, value, "a port number (1-65535)", |p| {
                    p.is_empty() || parse_port(p).is_some()
                })?;
            }
            "user" | "dbname" | "options" | "application_name" => {}
            "connect_timeout"
            | "tcp_user_timeout"
            | "keepalives_idle"
            | "keepalives_interval"
            | "keepalives_retries" => seconds(key, value)?,
            "keepalives" => one_of(key, value, &["0", "1"])?,
            "target_session_attrs" => match value {
                "primary" | "standby" | "prefer-standby" => {
                    return Err(format!(
                        "target_session_attrs={value:?}: not supported by this broker's driver; \
                         expected any, read-write or read-only (read-write finds the primary)"
                    )
                    .into())
                }
                _ => one_of(key, value, &["any", "read-write", "read-only"])?,
            },
            "channel_binding" => one_of(key, value, &["disable", "prefer", "require"])?,
            "load_balance_hosts" => one_of(key, value, &["disable", "random"])?,
            "sslnegotiation" => one_of(key, value, &["postgres", "direct"])?,
            k if LIBPQ_UNSUPPORTED.contains(&k) => {
                return Err(format!(
                    "{k:?}: a libpq parameter this broker's PostgreSQL driver does not support; \
                     remove it"
                )
                .into())
            }
            k => {
                return Err(format!(
                    "{k:?}: not a libpq connection parameter (a typo? see the libpq manual, \
                     \"Parameter Key Words\")"
                )
                .into())
            }
        }
        words.push(word(key, value));
    }
    let tls = dbtls::tls_params(last.iter().copied(), Dialect::Postgres)?;
    let hosts: Vec<&str> = get("host")
        .map(|h| h.split(',').collect())
        .unwrap_or_default();
    let addrs: Vec<&str> = get("hostaddr")
        .map(|h| h.split(',').collect())
        .unwrap_or_default();
    let ports: Vec<&str> = get("port")
        .map(|p| p.split(',').collect())
        .unwrap_or_default();
    if hosts.is_empty() && addrs.is_empty() {
        return Err(
            "no host: name the server (postgres://user@HOST:PORT/db, or host=HOST)"
                .to_string()
                .into(),
        );
    }
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(format!(
            "hostaddr: {} addresses for {} hosts: give one per host",
            addrs.len(),
            hosts.len()
        )
        .into());
    }
    let servers = hosts.len().max(addrs.len());
    if ports.len() > 1 && ports.len() != servers {
        return Err(format!(
            "port: {} ports for {servers} hosts: give one port for all, or one per host",
            ports.len()
        )
        .into());
    }
    let hosts: Vec<HostPort> = (0..servers)
        .map(|i| HostPort {
            host: hosts
                .get(i)
                .or(addrs.get(i))
                .map(|h| h.to_string())
                .unwrap_or_default(),
            port: ports
                .get(i)
                .or(ports.first())
                .and_then(|p| parse_port(p))
                .unwrap_or(5432),
        })
        .collect();
    let config: tokio_postgres::Config = words
        .join(" ")
        .parse()
        .map_err(|e| format!("not accepted by the PostgreSQL driver: {e}"))?;
    Ok(PgConnStr {
        config,
        tls,
        hosts,
        user: get("user").map(str::to_string),
        dbname: get("dbname").map(str::to_string),
        target_session_attrs: get("target_session_attrs").unwrap_or("any").to_string(),
    })
}
