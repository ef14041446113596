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
use std::path::Path;

use crate::dbtls::{self, Dialect, TlsParams};

use check::{check, word};
use read::pairs;

mod check;
mod read;
#[cfg(test)]
mod tests;

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
