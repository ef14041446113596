//! TLS from the broker to its databases and to the PostgreSQL store.
//!
//! Operators paste the connection strings they already have, so the TLS
//! settings are libpq's URL parameters (`sslmode`, `sslrootcert`,
//! `sslcert`, `sslkey`) for PostgreSQL and the `mysql` client's
//! (`ssl-mode`, `ssl-ca`, `ssl-cert`, `ssl-key`) for MySQL/MariaDB. The
//! drivers understand only some of them (tokio-postgres rejects
//! `verify-full` and every path parameter), so they are taken out of the
//! URL here and turned into a rustls client configuration on the ring
//! provider, the one crypto provider in the tree.
//!
//! Modes follow libpq: `disable` never encrypts; `prefer` (libpq's default,
//! and ours for PostgreSQL) encrypts when the server offers it and checks
//! nothing; `require` insists on TLS, and with `sslrootcert` also checks
//! the chain, as libpq does; `verify-ca` checks the chain; `verify-full`
//! also the host name (or IP address) in the URL.

use std::error::Error as StdError;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

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

    fn names(self) -> [&'static str; 4] {
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

/// The ring provider, always: never the process default, which another
/// crate could have installed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The operating system's CA bundle: `SSL_CERT_FILE`, else the usual
/// Debian/Fedora/Alpine locations.
fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let candidates: Vec<PathBuf> = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .map(PathBuf::from),
        )
        .collect();
    let path = candidates
        .iter()
        .find(|p| p.is_file())
        .ok_or("sslrootcert=system: no CA bundle found (set SSL_CERT_FILE)")?;
    pem_certs("sslrootcert=system", path)
}

fn pem_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(&read(what, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// A rustls client configuration for these parameters (ring provider;
/// TLS 1.2 and 1.3). Reads the certificate files now, so a missing or
/// broken file is a start-up error.
pub fn client_config(params: &TlsParams) -> Result<rustls::ClientConfig, TlsSetupError> {
    let [_, root_key, cert_key, key_key] = params.dialect.names();
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let mode = params.effective_mode();
    let verifier: Arc<dyn ServerCertVerifier> = if mode >= SslMode::VerifyCa {
        let certs = match &params.rootcert {
            Some(RootCert::File(path)) => pem_certs(root_key, path)?,
            Some(RootCert::System) => system_roots()?,
            // split_url refuses verify-* without a root certificate.
            None => return Err(format!("{root_key} is missing").into()),
        };
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{root_key}: unusable CA certificate: {e}"))?;
        }
        let roots = Arc::new(roots);
        if mode == SslMode::VerifyFull {
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("{root_key}: {e}"))?
        } else {
            Arc::new(NameUnchecked {
                roots: Some(roots),
                algorithms: provider.signature_verification_algorithms,
            })
        }
    } else {
        Arc::new(NameUnchecked {
            roots: None,
            algorithms: provider.signature_verification_algorithms,
        })
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&params.cert, &params.key) {
        (Some(cert), Some(key)) => {
            let chain = pem_certs(cert_key, cert)?;
            let key = PrivateKeyDer::from_pem_slice(&read(key_key, key)?)
                .map_err(|e| format!("{key_key} {}: not a PEM private key: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{cert_key}/{key_key}: {e}").into())
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// The verifiers for a server whose name is not checked:
/// - `verify-ca` (`roots` set): the chain must lead to a trusted root; the
///   name in it is not checked (libpq's meaning: the CA is private to these
///   servers);
/// - `prefer`/`require` without a root certificate (`roots` unset):
///   encrypted, but any certificate is accepted (libpq's meaning; the
///   start-up warning says so).
///
/// Either way the handshake signature is checked, so the peer holds the
/// key of the certificate it sent.
#[derive(Debug)]
struct NameUnchecked {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NameUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The tokio-postgres connector and mode for these parameters.
pub fn postgres_connector(
    params: &TlsParams,
) -> Result<
    (
        tokio_postgres_rustls::MakeRustlsConnect,
        tokio_postgres::config::SslMode,
    ),
    TlsSetupError,
> {
    use tokio_postgres::config::SslMode as Pg;
    let mode = match params.mode {
        SslMode::Disable => Pg::Disable,
        SslMode::Prefer => Pg::Prefer,
        _ => Pg::Require,
    };
    Ok((
        tokio_postgres_rustls::MakeRustlsConnect::new(client_config(params)?),
        mode,
    ))
}

/// mysql_async's TLS options for these parameters (it builds its own
/// rustls config, on the ring provider: the only one compiled in). The
/// files are read now, so a broken one is a start-up error.
pub fn mysql_ssl_opts(params: &TlsParams) -> Result<Option<mysql_async::SslOpts>, TlsSetupError> {
    use mysql_async::{ClientIdentity, SslOpts};
    let [_, root_key, cert_key, key_key] = params.dialect.names();
    let opts = match params.effective_mode() {
        SslMode::Disable => return Ok(None),
        // REQUIRED: encrypted, any certificate (the warning says so).
        SslMode::Prefer | SslMode::Require => SslOpts::default()
            .with_danger_accept_invalid_certs(true)
            .with_danger_skip_domain_validation(true),
        SslMode::VerifyCa | SslMode::VerifyFull => match &params.rootcert {
            Some(RootCert::File(path)) => {
                // Read here for the error message; the driver reads it again.
                pem_certs(root_key, path)?;
                SslOpts::default()
                    .with_root_certs(vec![path.clone().into()])
                    .with_disable_built_in_roots(true)
            }
            // The driver's built-in (webpki) roots.
            Some(RootCert::System) => SslOpts::default(),
            None => return Err(format!("{root_key} is missing").into()),
        },
    };
    let opts = match (&params.cert, &params.key) {
        (Some(cert), Some(key)) => {
            pem_certs(cert_key, cert)?;
            PrivateKeyDer::from_pem_slice(&read(key_key, key)?)
                .map_err(|e| format!("{key_key} {}: not a PEM private key: {e}", key.display()))?;
            opts.with_client_identity(Some(ClientIdentity::new(
                cert.clone().into(),
                key.clone().into(),
            )))
        }
        _ => opts,
    };
    Ok(Some(opts))
}

/// Why TLS to a server failed, when it did: the certificate was refused
/// (wrong CA, wrong name, expired), the server refused ours, or the
/// server offers no TLS though the mode insists. `None` for anything
/// else (the server is down, a password is wrong): those are for retrying,
/// these for the operator.
pub fn tls_failure(error: &(dyn StdError + 'static)) -> Option<String> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(r) = rustls_error(e) {
            return Some(r.to_string());
        }
        // tokio-postgres and mysql_async say so in words only.
        let text = e.to_string();
        if e.source().is_none()
            && (text.contains("server does not support TLS")
                || text.contains("server does not have this capability"))
        {
            return Some("the server does not support TLS".to_string());
        }
        next = e.source();
    }
    None
}

fn rustls_error<'e>(e: &'e (dyn StdError + 'static)) -> Option<&'e rustls::Error> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(r);
    }
    // io::Error::source() skips the error it wraps: look inside.
    e.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Whether `host` (from a URL, or a Unix socket path) never leaves this machine.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.is_empty()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The start-up warning for a connection to `hosts` that is not both
/// encrypted and verified, if any; `what` names it ("database \"orders\"").
pub fn weak_tls_warning(what: &str, hosts: &[String], params: &TlsParams) -> Option<String> {
    let remote: Vec<&str> = hosts
        .iter()
        .map(String::as_str)
        .filter(|h| !is_loopback(h))
        .collect();
    if remote.is_empty() {
        return None;
    }
    let [mode_key, root_key, _, _] = params.dialect.names();
    let to = remote.join(", ");
    match params.effective_mode() {
        SslMode::Disable => Some(format!(
            "{what}: TLS is OFF to {to} (not loopback): the admin session and every credential it \
             creates cross the network in plaintext; set {mode_key}=verify-full and {root_key} in the URL"
        )),
        SslMode::Prefer => Some(format!(
            "{what}: {mode_key}=prefer to {to} (not loopback) may run in plaintext and checks no \
             certificate; set {mode_key}=verify-full and {root_key} in the URL"
        )),
        SslMode::Require => Some(format!(
            "{what}: {mode_key}=require to {to} (not loopback) encrypts but checks no certificate, \
             so anyone on the path can pose as the server; set {mode_key}=verify-full and {root_key}"
        )),
        SslMode::VerifyCa | SslMode::VerifyFull => None,
    }
}

/// A [`TlsParams`] shown without its paths' contents (they are not secret,
/// but long).
impl fmt::Display for TlsParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
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

/// [`weak_tls_warning`] for a whole URL (its host, or a Unix socket when
/// it names none). A URL that does not parse gets no warning: the config
/// and the backend report it.
pub fn url_warning(what: &str, url: &str, dialect: Dialect) -> Option<String> {
    let (_, params) = split_url(url, dialect).ok()?;
    let parsed = url::Url::parse(url).ok()?;
    let host = parsed.host_str().unwrap_or("").to_string();
    weak_tls_warning(what, &[host], &params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_are_taken_out_and_the_rest_kept_verbatim() {
        let (url, p) = split_url(
            "postgres://a@db:5432/x?options=-c%20x%3D1&sslmode=verify-full&sslrootcert=/etc/ca%20x.pem&application_name=y",
            Dialect::Postgres,
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://a@db:5432/x?options=-c%20x%3D1&application_name=y"
        );
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(p.rootcert, Some(RootCert::File("/etc/ca x.pem".into())));
        let (url, p) = split_url("postgres://a@db/x", Dialect::Postgres).unwrap();
        assert_eq!(
            (url.as_str(), p.mode),
            ("postgres://a@db/x", SslMode::Prefer)
        );
        let (url, p) = split_url("postgres://a@db/x?sslmode=require", Dialect::Postgres).unwrap();
        assert_eq!(
            (url.as_str(), p.mode),
            ("postgres://a@db/x", SslMode::Require)
        );
        assert_eq!(p.effective_mode(), SslMode::Require);
    }

    #[test]
    fn mistakes_name_the_parameter() {
        for (url, want) in [
            ("postgres://h/x?sslmode=verify", "sslmode=\"verify\""),
            ("postgres://h/x?sslmode=verify-full", "needs sslrootcert"),
            ("postgres://h/x?sslmode=require&sslcert=/c.pem", "give both"),
            (
                "postgres://h/x?sslmode=disable&sslrootcert=/c.pem",
                "disables TLS",
            ),
            ("postgres://h/x?sslrootcert=", "empty value"),
        ] {
            let e = split_url(url, Dialect::Postgres).unwrap_err();
            assert!(e.contains(want), "{url}: {e}");
        }
        let e = split_url("mysql://h/x?ssl-mode=PREFERRED", Dialect::Mysql).unwrap_err();
        assert!(e.contains("REQUIRED"), "{e}");
        for q in [
            "ssl-mode=VERIFY_CA&ssl-ca=/ca.pem",
            "ssl-mode=REQUIRED&ssl-ca=/ca.pem",
        ] {
            let e = split_url(&format!("mysql://h/x?{q}"), Dialect::Mysql).unwrap_err();
            assert!(e.contains("VERIFY_IDENTITY"), "{q}: {e}");
        }
    }

    #[test]
    fn mysql_names_map_to_the_same_modes() {
        let (url, p) = split_url(
            "mysql://root@h:3306/db?ssl-mode=VERIFY_IDENTITY&ssl-ca=/ca.pem&prefer_socket=false",
            Dialect::Mysql,
        )
        .unwrap();
        assert_eq!(url, "mysql://root@h:3306/db?prefer_socket=false");
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(p.describe(), "ssl-mode=VERIFY_IDENTITY, ssl-ca=/ca.pem");
        let (_, p) = split_url("mysql://h/db", Dialect::Mysql).unwrap();
        assert_eq!(p.mode, SslMode::Disable);
        assert_eq!(
            split_url("mysql://h/db?ssl_mode=required", Dialect::Mysql)
                .unwrap()
                .1
                .mode,
            SslMode::Require
        );
    }

    #[test]
    fn libpq_promotions() {
        let p = |q: &str| {
            split_url(&format!("postgres://h/x?{q}"), Dialect::Postgres)
                .unwrap()
                .1
        };
        assert_eq!(
            p("sslmode=require&sslrootcert=/ca.pem").effective_mode(),
            SslMode::VerifyCa
        );
        assert_eq!(
            p("sslrootcert=system").effective_mode(),
            SslMode::VerifyFull
        );
        assert_eq!(
            p("sslmode=verify-ca&sslrootcert=/ca.pem").effective_mode(),
            SslMode::VerifyCa
        );
    }

    #[test]
    fn relative_paths_become_absolute_against_the_config_directory() {
        let url = normalize_url(
            "postgres://h/x?sslmode=verify-full&sslrootcert=pki/ca.pem&options=-c%20a%3Db&sslcert=/abs/c.pem&sslkey=k%2Bey.pem",
            Dialect::Postgres,
            Path::new("/etc/credbroker"),
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://h/x?sslmode=verify-full&sslrootcert=/etc/credbroker/pki/ca.pem&options=-c%20a%3Db&sslcert=/abs/c.pem&sslkey=/etc/credbroker/k%2Bey.pem"
        );
        let (_, p) = split_url(&url, Dialect::Postgres).unwrap();
        assert_eq!(p.key, Some("/etc/credbroker/k+ey.pem".into()));
        assert_eq!(
            normalize_url("postgres://h/x", Dialect::Postgres, Path::new("/e")).unwrap(),
            "postgres://h/x"
        );
    }

    #[test]
    fn only_remote_connections_without_verification_are_warned_about() {
        let p = |q: &str| {
            split_url(&format!("postgres://h/x?{q}"), Dialect::Postgres)
                .unwrap()
                .1
        };
        let hosts = |h: &[&str]| h.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let remote = hosts(&["db.internal"]);
        let w = weak_tls_warning("database \"d\"", &remote, &p("sslmode=disable")).unwrap();
        assert!(w.contains("TLS is OFF to db.internal"), "{w}");
        assert!(weak_tls_warning("d", &remote, &p(""))
            .unwrap()
            .contains("prefer"));
        assert!(weak_tls_warning("d", &remote, &p("sslmode=require"))
            .unwrap()
            .contains("checks no certificate"));
        assert!(weak_tls_warning("d", &remote, &p("sslmode=verify-full&sslrootcert=/c")).is_none());
        for local in ["127.0.0.1", "localhost", "[::1]", "/var/run/postgresql", ""] {
            assert!(
                weak_tls_warning("d", &hosts(&[local]), &p("sslmode=disable")).is_none(),
                "{local}"
            );
        }
    }

    #[test]
    fn client_queries_follow_each_dialect() {
        assert_eq!(client_query(Dialect::Postgres, None, Some("/x")), "");
        assert_eq!(
            client_query(
                Dialect::Postgres,
                Some(SslMode::VerifyFull),
                Some("/etc/ssl/db ca.pem")
            ),
            "?sslmode=verify-full&sslrootcert=/etc/ssl/db%20ca.pem"
        );
        assert_eq!(
            client_query(Dialect::Mysql, Some(SslMode::VerifyCa), None),
            "?ssl-mode=VERIFY_CA"
        );
        assert!(url_warning(
            "d",
            "postgres://u@db.example/x?sslmode=disable",
            Dialect::Postgres
        )
        .is_some());
        assert!(url_warning(
            "d",
            "postgres://u@127.0.0.1/x?sslmode=disable",
            Dialect::Postgres
        )
        .is_none());
        assert!(url_warning("d", "mysql://u@10.1.2.3/x", Dialect::Mysql)
            .unwrap()
            .contains("OFF"));
    }

    #[test]
    fn missing_files_are_errors_naming_the_parameter() {
        let (_, p) = split_url(
            "postgres://h/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            Dialect::Postgres,
        )
        .unwrap();
        let e = client_config(&p).unwrap_err();
        assert!(e.starts_with("sslrootcert /nonexistent/ca.pem"), "{e}");
    }
}
