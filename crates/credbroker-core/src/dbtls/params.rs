//! The TLS parameters of a connection URL (libpq's and the `mysql`
//! client's names), read and checked here into `TlsParams`, with the
//! config's path normalisation and the query a leased DSN carries. Apart
//! from the connectors: this is text in, text or values out, no files read
//! and no crypto.

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// How hard to insist on TLS, in libpq's terms (MySQL's names map onto
/// the same five).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// libpq names, and MySQL's (`DISABLED`, `PREFERRED`, `REQUIRED`,
    /// `VERIFY_CA`, `VERIFY_IDENTITY`, any case).
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "disable" | "disabled" => SslMode::Disable,
            "prefer" | "preferred" => SslMode::Prefer,
            "require" | "required" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" | "verify-identity" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn libpq(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub fn mysql(self) -> &'static str {
        match self {
            SslMode::Disable => "DISABLED",
            SslMode::Prefer => "PREFERRED",
            SslMode::Require => "REQUIRED",
            SslMode::VerifyCa => "VERIFY_CA",
            SslMode::VerifyFull => "VERIFY_IDENTITY",
        }
    }

    /// Whether a connection in this mode is encrypted or not made at all.
    pub fn insists(self) -> bool {
        self >= SslMode::Require
    }
}

/// Which client's parameter names a URL uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Mysql,
}

impl Dialect {
    fn role(self, key: &str) -> Option<Param> {
        let key = key.to_ascii_lowercase().replace('_', "-");
        match (self, key.as_str()) {
            (Dialect::Postgres, "sslmode") => Some(Param::Mode),
            (Dialect::Postgres, "sslrootcert") => Some(Param::Root),
            (Dialect::Postgres, "sslcert") => Some(Param::Cert),
            (Dialect::Postgres, "sslkey") => Some(Param::Key),
            (Dialect::Mysql, "ssl-mode" | "sslmode") => Some(Param::Mode),
            (Dialect::Mysql, "ssl-ca" | "sslrootcert") => Some(Param::Root),
            (Dialect::Mysql, "ssl-cert" | "sslcert") => Some(Param::Cert),
            (Dialect::Mysql, "ssl-key" | "sslkey") => Some(Param::Key),
            _ => None,
        }
    }

    pub(super) fn names(self) -> [&'static str; 4] {
        match self {
            Dialect::Postgres => ["sslmode", "sslrootcert", "sslcert", "sslkey"],
            Dialect::Mysql => ["ssl-mode", "ssl-ca", "ssl-cert", "ssl-key"],
        }
    }

    /// Without `sslmode`: libpq prefers TLS; the `mysql` client does too,
    /// but mysql_async cannot fall back to plaintext, so MySQL URLs
    /// without `ssl-mode` stay as they always were, unencrypted.
    fn default_mode(self) -> SslMode {
        match self {
            Dialect::Postgres => SslMode::Prefer,
            Dialect::Mysql => SslMode::Disable,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Param {
    Mode,
    Root,
    Cert,
    Key,
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// libpq's `sslrootcert=system`: the operating system's CA bundle.
    System,
}

/// The TLS part of a connection URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub dialect: Dialect,
    pub mode: SslMode,
    pub rootcert: Option<RootCert>,
    /// Client certificate and key, for certificate authentication.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsParams {
    /// The mode after libpq's promotions: `sslrootcert=system` is always
    /// `verify-full`, and `require` with a root certificate checks the chain.
    pub fn effective_mode(&self) -> SslMode {
        match (&self.rootcert, self.mode) {
            (Some(RootCert::System), m) if m > SslMode::Disable => SslMode::VerifyFull,
            (Some(_), SslMode::Require) => SslMode::VerifyCa,
            (_, m) => m,
        }
    }

    /// `sslmode=verify-full sslrootcert=…`, for messages.
    pub fn describe(&self) -> String {
        let [mode, root, _, _] = self.dialect.names();
        let shown = match self.dialect {
            Dialect::Postgres => self.mode.libpq(),
            Dialect::Mysql => self.mode.mysql(),
        };
        let mut s = format!("{mode}={shown}");
        match &self.rootcert {
            Some(RootCert::File(p)) => s.push_str(&format!(", {root}={}", p.display())),
            Some(RootCert::System) => s.push_str(&format!(", {root}=system")),
            None => {}
        }
        s
    }
}

/// A [`TlsParams`] shown without its paths' contents (they are not secret,
/// but long).
impl fmt::Display for TlsParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Characters a path keeps unescaped in a query value.
const PATH_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'.')
    .remove(b'-')
    .remove(b'_')
    .remove(b'~');

/// Why a database URL's TLS parameters or the files they name cannot be
/// used: lowercase, naming the parameter (and file), no secret (a URL holds
/// none; a file's contents are never quoted). Its class is the reader's —
/// a config key makes it `Config`, `check` a finding — so it is not an
/// `Error` here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSetupError(String);

impl fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for TlsSetupError {}

/// The text, for a caller that reads it as before (`e.contains(..)`).
impl std::ops::Deref for TlsSetupError {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for TlsSetupError {
    fn from(m: String) -> Self {
        TlsSetupError(m)
    }
}

/// For a test helper that reports by text.
impl From<TlsSetupError> for String {
    fn from(e: TlsSetupError) -> Self {
        e.0
    }
}

/// Takes the TLS parameters out of `url`: the URL without them (every
/// other parameter kept byte for byte), and what they said. Errors are
/// lowercase and name the parameter; a URL holds no secret (the config
/// refuses passwords in it).
pub fn split_url(url: &str, dialect: Dialect) -> Result<(String, TlsParams), TlsSetupError> {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, q),
        None => (url, ""),
    };
    let mut kept: Vec<&str> = Vec::new();
    let mut tls: Vec<(String, String)> = Vec::new();
    for segment in query.split('&').filter(|s| !s.is_empty()) {
        let (raw_key, raw_value) = segment.split_once('=').unwrap_or((segment, ""));
        let key = percent_decode_str(raw_key).decode_utf8_lossy();
        if !is_tls_key(&key, dialect) {
            kept.push(segment);
            continue;
        }
        let value = percent_decode_str(raw_value)
            .decode_utf8()
            .map_err(|_| format!("{key}: not UTF-8"))?
            .into_owned();
        tls.push((key.into_owned(), value));
    }
    let params = tls_params(tls.iter().map(|(k, v)| (k.as_str(), v.as_str())), dialect)?;
    let stripped = if kept.is_empty() {
        head.to_string()
    } else {
        format!("{head}?{}", kept.join("&"))
    };
    Ok((stripped, params))
}

/// Whether `key` is one of the TLS parameters read here (not the driver's).
pub fn is_tls_key(key: &str, dialect: Dialect) -> bool {
    dialect.role(key).is_some()
}

/// Whether `key` names a file (`sslrootcert`, `sslcert`, `sslkey`, and
/// MySQL's names), which the config makes absolute.
pub fn is_path_key(key: &str, dialect: Dialect) -> bool {
    matches!(
        dialect.role(key),
        Some(Param::Root | Param::Cert | Param::Key)
    )
}

/// What the TLS parameters among `pairs` (decoded keys and values, in
/// order; a later one wins, as in libpq) say, checked together. Other keys
/// are ignored: a URL's query and a key=value string both come here.
pub fn tls_params<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    dialect: Dialect,
) -> Result<TlsParams, TlsSetupError> {
    let mut params = TlsParams {
        dialect,
        mode: dialect.default_mode(),
        rootcert: None,
        cert: None,
        key: None,
    };
    for (key, value) in pairs {
        let Some(param) = dialect.role(key) else {
            continue;
        };
        if value.is_empty() {
            return Err(format!("{key}: empty value").into());
        }
        match param {
            Param::Mode => {
                params.mode = SslMode::parse(value).ok_or_else(|| {
                    format!(
                        "{key}={value:?}: expected disable, prefer, require, verify-ca or verify-full \
                         (MySQL: DISABLED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY)"
                    )
                })?;
            }
            Param::Root if value == "system" => params.rootcert = Some(RootCert::System),
            Param::Root => params.rootcert = Some(RootCert::File(value.into())),
            Param::Cert => params.cert = Some(value.into()),
            Param::Key => params.key = Some(value.into()),
        }
    }
    let [mode_key, root_key, cert_key, key_key] = dialect.names();
    if dialect == Dialect::Mysql && params.mode == SslMode::Prefer {
        return Err(format!(
            "{mode_key}=PREFERRED: the driver cannot fall back to plaintext; use REQUIRED or \
             VERIFY_IDENTITY (or DISABLED)"
        )
        .into());
    }
    if dialect == Dialect::Mysql && params.effective_mode() == SslMode::VerifyCa {
        // mysql_async skips only the name check by matching rustls's error
        // text, which rustls 0.23 no longer prints: it would check the name
        // anyway, or with REQUIRED ignore the CA. Better said at start.
        return Err(format!(
            "{mode_key}=VERIFY_CA (or REQUIRED with {root_key}) is not supported for MySQL: \
             use VERIFY_IDENTITY with {root_key}, or REQUIRED without it"
        )
        .into());
    }
    if params.cert.is_some() != params.key.is_some() {
        return Err(format!("{cert_key} and {key_key}: give both or neither").into());
    }
    if params.mode >= SslMode::VerifyCa && params.rootcert.is_none() {
        return Err(format!(
            "{mode_key}={} needs {root_key}: the CA certificate (PEM) that signed the server's \
             certificate, or {root_key}=system",
            match dialect {
                Dialect::Postgres => params.mode.libpq(),
                Dialect::Mysql => params.mode.mysql(),
            }
        )
        .into());
    }
    if params.mode == SslMode::Disable && (params.rootcert.is_some() || params.cert.is_some()) {
        return Err(format!(
            "{mode_key} disables TLS, but {root_key}/{cert_key} are set: remove them or choose a mode"
        ).into());
    }
    Ok(params)
}

/// Checks the TLS parameters of `url` and makes relative paths in them
/// absolute against `base` (the config file's directory), leaving the
/// rest of the URL as it was: the config is read once, and every later
/// user of the URL sees the same files whatever its working directory.
pub fn normalize_url(url: &str, dialect: Dialect, base: &Path) -> Result<String, TlsSetupError> {
    split_url(url, dialect)?;
    let Some((head, query)) = url.split_once('?') else {
        return Ok(url.to_string());
    };
    let segments: Vec<String> = query
        .split('&')
        .map(|segment| {
            let (raw_key, raw_value) = segment.split_once('=').unwrap_or((segment, ""));
            let key = percent_decode_str(raw_key).decode_utf8_lossy();
            let is_path = is_path_key(&key, dialect);
            let value = percent_decode_str(raw_value).decode_utf8_lossy();
            let path = Path::new(value.as_ref());
            if !is_path || value == "system" || path.is_absolute() {
                return segment.to_string();
            }
            let absolute = base.join(path);
            format!(
                "{raw_key}={}",
                utf8_percent_encode(&absolute.to_string_lossy(), PATH_VALUE)
            )
        })
        .collect();
    Ok(format!("{head}?{}", segments.join("&")))
}

/// The query a leased DSN carries so clients use TLS as configured
/// (`client_sslmode`, `client_sslrootcert`): `?sslmode=verify-full&
/// sslrootcert=…` for libpq, `?ssl-mode=VERIFY_IDENTITY&ssl-ca=…` for
/// MySQL; empty when nothing is configured.
pub fn client_query(dialect: Dialect, mode: Option<SslMode>, rootcert: Option<&str>) -> String {
    let Some(mode) = mode else {
        return String::new();
    };
    let [mode_key, root_key, _, _] = dialect.names();
    let shown = match dialect {
        Dialect::Postgres => mode.libpq(),
        Dialect::Mysql => mode.mysql(),
    };
    let mut q = format!("?{mode_key}={shown}");
    if let Some(root) = rootcert {
        q.push_str(&format!(
            "&{root_key}={}",
            utf8_percent_encode(root, PATH_VALUE)
        ));
    }
    q
}
