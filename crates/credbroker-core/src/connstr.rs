//! PostgreSQL connection strings as libpq takes them, for `store.url` and
//! every PostgreSQL `admin_url`: a URL with one host or several
//! (`postgres://u@db1:5432,db2:5432/db?target_session_attrs=read-write`)
//! or key=value words (`host=db1,db2 port=5432,5433 dbname=db …`).
//!
//! Several hosts and `target_session_attrs=read-write` are how a client
//! follows a primary/standby pair without a proxy: tokio-postgres tries the
//! hosts in order and keeps the first that takes writes, so after a
//! failover a new connection finds the promoted standby by itself.
//!
//! tokio-postgres parses both forms, but its errors name neither the key
//! nor the part that is wrong ("invalid value for option `port`"), its URL
//! reader takes an `@` in a parameter value for the end of the user name,
//! and it knows none of libpq's TLS file parameters. So the string is read
//! here into key/value pairs, each checked with a message that names the
//! key and the part; the TLS parameters go to [`dbtls::tls_params`]; the
//! rest is handed to tokio-postgres as quoted key=value words it cannot
//! misread. MySQL's `admin_url` stays a single-host URL (mysql_async
//! connects to one server): [`mysql_host_count_error`] says so.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use percent_encoding::percent_decode_str;

use crate::dbtls::{self, Dialect, TlsParams};

/// A checked PostgreSQL connection string.
#[derive(Debug, Clone)]
pub struct PgConnStr {
    /// Everything but the TLS parameters (and never a password: those are
    /// refused), ready for a connector; callers add timeouts and the password.
    pub config: tokio_postgres::Config,
    pub tls: TlsParams,
    /// Every server, in the order they are tried.
    pub hosts: Vec<HostPort>,
    pub user: Option<String>,
    pub dbname: Option<String>,
    /// `target_session_attrs` as written (`any` when absent).
    pub target_session_attrs: String,
}

/// One server of a connection string: a host name, an IP address or a
/// Unix socket directory, and its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl PgConnStr {
    /// `db1:5432, db2:5433`, for messages.
    pub fn hosts_label(&self) -> String {
        self.hosts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Why a connection string cannot be used. `Password` is its own case so
/// each reader can say where the password goes instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnStrError {
    Password,
    Invalid(String),
}

impl fmt::Display for ConnStrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnStrError::Password => f.write_str("must not contain a password"),
            ConnStrError::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ConnStrError {}

impl From<String> for ConnStrError {
    fn from(m: String) -> Self {
        ConnStrError::Invalid(m)
    }
}

impl From<dbtls::TlsSetupError> for ConnStrError {
    fn from(e: dbtls::TlsSetupError) -> Self {
        ConnStrError::Invalid(e.to_string())
    }
}

type Result<T> = std::result::Result<T, ConnStrError>;

/// Whether `s` is written as a PostgreSQL URL (else it is read as key=value).
pub fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Whether `s` looks like a PostgreSQL connection string of either form
/// (a URL with a PostgreSQL scheme, or words with `=` and no scheme).
pub fn looks_like_postgres(s: &str) -> bool {
    is_url(s) || (!s.contains("://") && s.contains('='))
}

/// Reads and checks a connection string of either form.
pub fn parse(s: &str) -> Result<PgConnStr> {
    check(&pairs(s)?)
}

/// Checks `s` and makes relative TLS file paths in it absolute against
/// `base` (the config file's directory), so every later reader sees the
/// same files whatever its working directory. A URL keeps its text; a
/// key=value string comes back as quoted key=value words.
pub fn normalize(s: &str, base: &Path) -> Result<String> {
    parse(s)?;
    if is_url(s) {
        return Ok(dbtls::normalize_url(s, Dialect::Postgres, base)?);
    }
    let words: Vec<String> = pairs(s)?
        .into_iter()
        .map(|(key, value)| {
            let path = Path::new(&value);
            let value = if dbtls::is_path_key(&key, Dialect::Postgres)
                && value != "system"
                && !path.is_absolute()
            {
                base.join(path).to_string_lossy().into_owned()
            } else {
                value
            };
            word(&key, &value)
        })
        .collect();
    Ok(words.join(" "))
}

/// The start-up warning for a connection string whose TLS is not both
/// encrypted and verified, to a server off this machine; none for a
/// string that does not parse (the config reports that).
pub fn tls_warning(what: &str, s: &str) -> Option<String> {
    let c = parse(s).ok()?;
    let hosts: Vec<String> = c.hosts.iter().map(|h| h.host.clone()).collect();
    dbtls::weak_tls_warning(what, &hosts, &c.tls)
}

/// A MySQL `admin_url` with several hosts (`mysql://u@db1,db2/x`): the
/// driver connects to one server, so say so instead of "invalid port".
pub fn mysql_host_count_error(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    hosts.contains(',').then(|| {
        format!(
            "{hosts:?} names several hosts, but a MySQL admin_url takes one: the MySQL driver \
             connects to a single server; point it at the address that follows your primary \
             (a virtual IP, a DNS name your failover tool updates, or a proxy such as ProxySQL)"
        )
    })
}

/// libpq parameters tokio-postgres does not implement: named, so the
/// operator knows it is not a typo but a feature this broker lacks.
const LIBPQ_UNSUPPORTED: &[&str] = &[
    "passfile",
    "service",
    "servicefile",
    "require_auth",
    "fallback_application_name",
    "client_encoding",
    "replication",
    "gssencmode",
    "gsslib",
    "gssdelegation",
    "krbsrvname",
    "sslpassword",
    "sslcertmode",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslkeylogfile",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "min_protocol_version",
    "max_protocol_version",
];

/// The key/value pairs of either form, decoded, in order.
fn pairs(s: &str) -> Result<Vec<(String, String)>> {
    if is_url(s) {
        url_pairs(s)
    } else if s.contains("://") {
        let scheme = s.split("://").next().unwrap_or("");
        Err(format!(
            "scheme {scheme:?}: expected postgres:// or postgresql:// (or key=value words)"
        )
        .into())
    } else {
        keyword_pairs(s)
    }
}

fn decode(what: &str, raw: &str) -> Result<String> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{what}: not UTF-8 after percent-decoding").into())
}

/// `1st`, `2nd`, … for "the 2nd of 3 hosts".
fn nth(i: usize) -> String {
    let n = i + 1;
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// `postgres://[user[:password]@][host[:port][,host[:port]…]][/dbname][?k=v&…]`
fn url_pairs(s: &str) -> Result<Vec<(String, String)>> {
    let rest = s.split_once("://").map_or(s, |(_, r)| r);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i + 1..]),
        None => (before_query, ""),
    };
    let mut out = Vec::new();
    // Host names hold no '@'; a user name holds it only percent-encoded.
    let hostlist = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if password.is_some_and(|p| !p.is_empty()) {
                return Err(ConnStrError::Password);
            }
            if !user.is_empty() {
                out.push(("user".to_string(), decode("user", user)?));
            }
            hosts
        }
        None => authority,
    };
    if !hostlist.is_empty() {
        let chunks: Vec<&str> = hostlist.split(',').collect();
        let n = chunks.len();
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let which = if n == 1 {
                format!("host {chunk:?}")
            } else {
                format!("the {} of {n} hosts, {chunk:?},", nth(i))
            };
            let (host, port) = if let Some(inner) = chunk.strip_prefix('[') {
                let Some((addr, after)) = inner.split_once(']') else {
                    return Err(format!("{which} lacks the ']' closing its IPv6 address").into());
                };
                let port = match after {
                    "" => None,
                    p => Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("{which}: expected \":PORT\" after the ']'"))?,
                    ),
                };
                (addr.to_string(), port)
            } else {
                match chunk.split_once(':') {
                    Some((_, p)) if p.contains(':') => {
                        return Err(format!(
                            "{which}: an IPv6 address goes in brackets, like [::1]:5432"
                        )
                        .into())
                    }
                    Some((h, p)) => (decode("host", h)?, Some(p)),
                    None => (decode("host", chunk)?, None),
                }
            };
            if host.is_empty() {
                return Err(format!("{which} names no host").into());
            }
            let port = match port {
                None => "5432".to_string(),
                Some(p) => {
                    parse_port(p).ok_or_else(|| {
                        format!("{which}: port {p:?} is not a port number (1-65535)")
                    })?;
                    p.to_string()
                }
            };
            hosts.push(host);
            ports.push(port);
        }
        out.push(("host".to_string(), hosts.join(",")));
        out.push(("port".to_string(), ports.join(",")));
    }
    if !path.is_empty() {
        out.push(("dbname".to_string(), decode("dbname", path)?));
    }
    for segment in query.split('&').filter(|s| !s.is_empty()) {
        let Some((k, v)) = segment.split_once('=') else {
            return Err(format!("parameter {segment:?}: expected key=value").into());
        };
        let key = decode("a parameter name", k)?;
        let value = decode(&key, v)?;
        out.push((key, value));
    }
    Ok(out)
}

/// libpq's `key = value` words: values may be single-quoted, and a
/// backslash escapes the next character in either kind of value.
fn keyword_pairs(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c.is_whitespace() || c == '=' {
                break;
            }
            key.push(c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if key.is_empty() {
            return Err("a \"=\" with no key before it: expected key=value words"
                .to_string()
                .into());
        }
        if it.next() != Some('=') {
            return Err(format!(
                "{key:?}: expected key=value (no \"=\" after it); a URL starts with postgres://"
            )
            .into());
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut value = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            let mut closed = false;
            while let Some(c) = it.next() {
                match c {
                    '\'' => {
                        closed = true;
                        break;
                    }
                    '\\' => value.extend(it.next()),
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("{key}: the quoted value has no closing '").into());
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                it.next();
                if c == '\\' {
                    value.extend(it.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
    if out.is_empty() {
        return Err("empty: expected postgres://… or key=value words"
            .to_string()
            .into());
    }
    Ok(out)
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&n| n > 0)
}

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
fn word(key: &str, value: &str) -> String {
    format!(
        "{key}='{}'",
        value.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

fn check(pairs: &[(String, String)]) -> Result<PgConnStr> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::{Host, TargetSessionAttrs};

    fn tcp(c: &PgConnStr) -> Vec<(String, u16)> {
        c.hosts.iter().map(|h| (h.host.clone(), h.port)).collect()
    }

    fn hp(list: &[(&str, u16)]) -> Vec<(String, u16)> {
        list.iter().map(|(h, p)| (h.to_string(), *p)).collect()
    }

    #[test]
    fn a_multi_host_url_follows_the_primary() {
        let c = parse(
            "postgres://broker@db1.internal:5432,db2.internal:5433/credbroker?target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(
            tcp(&c),
            hp(&[("db1.internal", 5432), ("db2.internal", 5433)])
        );
        assert_eq!(c.user.as_deref(), Some("broker"));
        assert_eq!(c.dbname.as_deref(), Some("credbroker"));
        assert_eq!(
            c.config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            c.config.get_hosts(),
            &[
                Host::Tcp("db1.internal".into()),
                Host::Tcp("db2.internal".into())
            ]
        );
        assert_eq!(c.config.get_ports(), &[5432, 5433]);
        assert_eq!(c.hosts_label(), "db1.internal:5432, db2.internal:5433");
    }

    #[test]
    fn a_url_with_one_host_ipv6_a_socket_and_defaults() {
        let c = parse("postgresql://u@[::1]:6432,db2/x").unwrap();
        assert_eq!(tcp(&c), hp(&[("::1", 6432), ("db2", 5432)]));
        assert_eq!(c.hosts[0].to_string(), "[::1]:6432");
        let c = parse("postgres://u@%2Fvar%2Frun%2Fpostgresql/x").unwrap();
        assert_eq!(c.hosts[0].host, "/var/run/postgresql");
        assert!(matches!(c.config.get_hosts()[0], Host::Unix(_)));
        // An '@' in a parameter value is not the end of a user name.
        let c = parse("postgres://u@db/x?application_name=a@b").unwrap();
        assert_eq!(c.config.get_application_name(), Some("a@b"));
        assert_eq!(c.user.as_deref(), Some("u"));
    }

    #[test]
    fn key_value_words_with_several_hosts_and_ports() {
        let c = parse(
            "host=db1,db2 port=5432,5433 dbname='cred broker' user=broker target_session_attrs=read-write \
             sslmode=verify-full sslrootcert=/etc/ca.pem application_name='it\\'s'",
        )
        .unwrap();
        assert_eq!(tcp(&c), hp(&[("db1", 5432), ("db2", 5433)]));
        assert_eq!(c.config.get_dbname(), Some("cred broker"));
        assert_eq!(c.config.get_application_name(), Some("it's"));
        assert_eq!(c.tls.mode, dbtls::SslMode::VerifyFull);
        assert_eq!(
            c.config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        // One port for every host.
        let c = parse("host=db1,db2 port=6000 dbname=x").unwrap();
        assert_eq!(tcp(&c), hp(&[("db1", 6000), ("db2", 6000)]));
        let c = parse("hostaddr=10.0.0.1,10.0.0.2 dbname=x").unwrap();
        assert_eq!(tcp(&c), hp(&[("10.0.0.1", 5432), ("10.0.0.2", 5432)]));
    }

    /// Every mistake names the key and the part that is wrong.
    #[test]
    fn mistakes_name_the_key_and_the_part() {
        for (s, want) in [
            // URL form.
            (
                "postgres://u@db1:5432,db2:54x2/x",
                "the 2nd of 2 hosts, \"db2:54x2\",: port \"54x2\" is not a port number",
            ),
            ("postgres://u@db1:0/x", "port \"0\" is not a port number"),
            (
                "postgres://u@db1,,db3/x",
                "the 2nd of 3 hosts, \"\", names no host",
            ),
            (
                "postgres://u@db1,:5433/x",
                "the 2nd of 2 hosts, \":5433\", names no host",
            ),
            ("postgres://u@[::1/x", "lacks the ']'"),
            (
                "postgres://u@[::1]5432/x",
                "expected \":PORT\" after the ']'",
            ),
            ("postgres://u@::1:5432/x", "IPv6 address goes in brackets"),
            (
                "postgres://u@db/x?sslmode",
                "parameter \"sslmode\": expected key=value",
            ),
            (
                "postgres://u@db/x?target_session_attrs=readwrite",
                "target_session_attrs=\"readwrite\": expected any, read-write or read-only",
            ),
            (
                "postgres://u@db/x?target_session_attrs=primary",
                "read-write finds the primary",
            ),
            (
                "postgres://u@db/x?conect_timeout=3",
                "\"conect_timeout\": not a libpq connection parameter",
            ),
            (
                "postgres://u@db/x?connect_timeout=3s",
                "connect_timeout=\"3s\": expected a whole number of seconds",
            ),
            (
                "postgres://u@db/x?service=prod",
                "\"service\": a libpq parameter this broker's PostgreSQL driver does not support",
            ),
            (
                "postgres://u@db/x?sslmode=verify-full",
                "sslmode=verify-full needs sslrootcert",
            ),
            ("postgres:///x", "no host"),
            // key=value form.
            (
                "host=db1,db2 port=5432,5433,5434",
                "port: 3 ports for 2 hosts",
            ),
            (
                "host=db1,,db3",
                "host: an empty entry (the 2nd of 3) is not a host name",
            ),
            (
                "host=db1 port=5432,x",
                "port: \"x\" (the 2nd of 2) is not a port number",
            ),
            (
                "host=db1 port=99999",
                "port: \"99999\" is not a port number",
            ),
            (
                "hostaddr=10.0.0.1,db2",
                "hostaddr: \"db2\" (the 2nd of 2) is not an IP address",
            ),
            (
                "host=a,b hostaddr=10.0.0.1",
                "hostaddr: 1 addresses for 2 hosts",
            ),
            ("host=db1 dbname", "\"dbname\": expected key=value"),
            (
                "host=db1 dbname='x",
                "dbname: the quoted value has no closing '",
            ),
            ("host=db1 =x", "no key before it"),
            (
                "host=db1 keepalives=yes",
                "keepalives=\"yes\": expected 0 or 1",
            ),
            (
                "host=db1 sslmode=verify-ca",
                "sslmode=verify-ca needs sslrootcert",
            ),
            ("host=db1 sslmode=maybe", "sslmode=\"maybe\""),
            (
                "host=db1 channel_binding=always",
                "channel_binding=\"always\"",
            ),
            ("dbname=x", "no host"),
            ("", "empty"),
            ("mysql://u@db/x", "scheme \"mysql\""),
        ] {
            match parse(s) {
                Ok(_) => panic!("{s:?} was accepted"),
                Err(e) => assert!(e.to_string().contains(want), "{s:?}: {e}"),
            }
        }
    }

    #[test]
    fn a_password_in_either_form_is_refused_without_quoting_it() {
        for s in [
            "postgres://u:s3cret@db/x",
            "host=db password=s3cret",
            "postgres://u@db/x?password=s3cret",
        ] {
            let e = parse(s).unwrap_err();
            assert_eq!(e, ConnStrError::Password, "{s}");
            assert!(!e.to_string().contains("s3cret"));
        }
    }

    #[test]
    fn relative_tls_paths_become_absolute_in_both_forms() {
        let base = Path::new("/etc/credbroker");
        assert_eq!(
            normalize(
                "postgres://u@a:1,b:2/x?sslmode=verify-full&sslrootcert=pki/ca.pem",
                base
            )
            .unwrap(),
            "postgres://u@a:1,b:2/x?sslmode=verify-full&sslrootcert=/etc/credbroker/pki/ca.pem"
        );
        let kv = normalize(
            "host=a,b sslmode=verify-full sslrootcert=pki/ca.pem dbname=x",
            base,
        )
        .unwrap();
        assert_eq!(
            kv,
            "host='a,b' sslmode='verify-full' sslrootcert='/etc/credbroker/pki/ca.pem' dbname='x'"
        );
        let c = parse(&kv).unwrap();
        assert_eq!(
            c.tls.rootcert,
            Some(dbtls::RootCert::File("/etc/credbroker/pki/ca.pem".into()))
        );
    }

    #[test]
    fn warnings_cover_every_remote_host() {
        let w = tls_warning(
            "the lease store",
            "host=127.0.0.1,db2.internal sslmode=require",
        )
        .unwrap();
        assert!(
            w.contains("db2.internal") && !w.contains("127.0.0.1"),
            "{w}"
        );
        assert!(tls_warning("s", "postgres://u@127.0.0.1,localhost/x?sslmode=disable").is_none());
    }

    #[test]
    fn a_mysql_url_with_two_hosts_is_told_it_takes_one() {
        let e = mysql_host_count_error("mysql://root@db1:3306,db2:3306/x").unwrap();
        assert!(e.contains("takes one"), "{e}");
        assert!(mysql_host_count_error("mysql://root@db1:3306/x?a=b,c").is_none());
    }
}
