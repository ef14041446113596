//! What the operator is told about TLS to a database: why a connection's
//! TLS failed (`tls_failure`, read from the driver's error chain) and the
//! start-up warning for a remote connection that is not both encrypted and
//! verified. Apart from the connectors: these read results, they build nothing.

use std::error::Error as StdError;
use std::net::IpAddr;

use super::{split_url, Dialect, SslMode, TlsParams};

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

/// [`weak_tls_warning`] for a whole URL (its host, or a Unix socket when
/// it names none). A URL that does not parse gets no warning: the config
/// and the backend report it.
pub fn url_warning(what: &str, url: &str, dialect: Dialect) -> Option<String> {
    let (_, params) = split_url(url, dialect).ok()?;
    let parsed = url::Url::parse(url).ok()?;
    let host = parsed.host_str().unwrap_or("").to_string();
    weak_tls_warning(what, &[host], &params)
}
