//! One delivery attempt over HTTP/1.1: a fresh connection (TCP, then TLS
//! for https), one POST, the status line. hyper's own connection API, as
//! the bench's Vault client uses, so no second HTTP stack enters the tree;
//! no pool, since events are rare and a kept connection would mostly be
//! found closed by the receiver.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use url::{Host, Position, Url};

use super::{Attempt, Event, Transport, WebhookOptions};
use crate::error::{Error, Result};

/// `User-Agent` of every request: receivers can tell (and allow-list)
/// the broker and its version.
pub const USER_AGENT: &str = concat!("credbroker/", env!("CARGO_PKG_VERSION"));

/// The header carrying the event id, the same on every attempt.
pub const EVENT_ID_HEADER: &str = "Idempotency-Key";

/// A checked webhook URL. `Debug` and [`Target::label`] show its scheme,
/// host and port only: the path and query may hold a token.
#[derive(Clone)]
pub struct Target {
    url: Url,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Target").field(&self.label()).finish()
    }
}

impl Target {
    /// Takes `http://` and `https://` URLs with a host and no user info.
    /// Errors never repeat the URL (it may hold a token).
    pub fn parse(url: &str) -> Result<Target> {
        let url = Url::parse(url)
            .map_err(|e| Error::config(format!("webhook url: not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::config(format!(
                "webhook url: scheme {:?}: expected http or https",
                url.scheme()
            )));
        }
        let target = Target { url };
        if target.url.host().is_none() {
            return Err(Error::config("webhook url: no host"));
        }
        if !target.url.username().is_empty() || target.url.password().is_some() {
            return Err(Error::config(format!(
                "webhook url for {}: user info (user:password@) is not supported; \
                 receivers take their token in the path or query",
                target.label()
            )));
        }
        Ok(target)
    }

    /// `https://chat.example.org` or `http://127.0.0.1:8080`: what logs,
    /// metrics and errors name.
    pub fn label(&self) -> String {
        format!(
            "{}://{}",
            self.url.scheme(),
            &self.url[Position::BeforeHost..Position::AfterPort]
        )
    }

    pub fn is_https(&self) -> bool {
        self.url.scheme() == "https"
    }

    /// Whether the host is this machine (plain http is then no exposure).
    pub fn is_loopback(&self) -> bool {
        match self.url.host() {
            Some(Host::Domain(d)) => d == "localhost",
            Some(Host::Ipv4(ip)) => ip.is_loopback(),
            Some(Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        }
    }

    fn port(&self) -> u16 {
        self.url.port_or_known_default().unwrap_or(443)
    }

    /// The `Host` header: host, and port when not the scheme's default.
    fn authority(&self) -> &str {
        &self.url[Position::BeforeHost..Position::AfterPort]
    }

    /// Path and query, as the request line carries them (never logged).
    fn path_and_query(&self) -> &str {
        let p = &self.url[Position::BeforePath..Position::AfterQuery];
        if p.is_empty() {
            "/"
        } else {
            p
        }
    }
}

/// The real transport: rustls (ring) over tokio's TCP.
pub(crate) struct HttpTransport {
    target: Target,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl HttpTransport {
    pub(crate) fn new(target: Target, options: &WebhookOptions) -> Result<Self> {
        let tls = if target.is_https() {
            Some(tokio_rustls::TlsConnector::from(client_config(options)?))
        } else {
            if options.ca_file.is_some() {
                tracing::warn!(
                    webhook = %target.label(),
                    "webhook ca_file is set but the URL is plain http: it is not used"
                );
            }
            None
        };
        Ok(HttpTransport { target, tls })
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        let port = self.target.port();
        let tcp = match self.target.url.host() {
            Some(Host::Ipv4(ip)) => TcpStream::connect(SocketAddr::new(IpAddr::V4(ip), port)).await,
            Some(Host::Ipv6(ip)) => TcpStream::connect(SocketAddr::new(IpAddr::V6(ip), port)).await,
            Some(Host::Domain(d)) => TcpStream::connect((d, port)).await,
            None => Err(std::io::Error::other("no host")),
        }?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    fn server_name(&self) -> std::result::Result<ServerName<'static>, String> {
        match self.target.url.host() {
            Some(Host::Ipv4(ip)) => Ok(ServerName::IpAddress(IpAddr::V4(ip).into())),
            Some(Host::Ipv6(ip)) => Ok(ServerName::IpAddress(IpAddr::V6(ip).into())),
            Some(Host::Domain(d)) => {
                ServerName::try_from(d.to_string()).map_err(|e| format!("server name: {e}"))
            }
            None => Err("no host".into()),
        }
    }

    async fn exchange<S>(&self, io: S, event: &Event) -> Attempt
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut send, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
            Ok(pair) => pair,
            Err(e) => return retry(format!("http: {e}")),
        };
        // Driven beside the request; aborted with it if the attempt times
        // out, so no connection outlives its attempt.
        let conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let request = Request::post(self.target.path_and_query())
            .header(header::HOST, self.target.authority())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, USER_AGENT)
            .header(EVENT_ID_HEADER, event.id.as_str())
            .header(header::CONTENT_LENGTH, event.body.len())
            .body(event.body.clone());
        let request = match request {
            Ok(r) => r,
            // Only a malformed header value could land here; the URL was
            // checked when parsed, so say what without it.
            Err(e) => return retry(format!("request: {e}")),
        };
        let answer = send.send_request(request).await;
        drop(conn);
        match answer {
            Ok(resp) => classify(resp.status().as_u16(), resp.headers()),
            Err(e) => retry(format!("http: {e}")),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn retry(why: String) -> Attempt {
    Attempt::Retry {
        why,
        retry_after: None,
    }
}

/// What a status means for the event.
pub(crate) fn classify(status: u16, headers: &http::HeaderMap) -> Attempt {
    match status {
        200..=299 => Attempt::Delivered,
        429 | 500..=599 => Attempt::Retry {
            why: format!("status {status}"),
            retry_after: headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, chrono::Utc::now())),
        },
        _ => Attempt::Refused { status },
    }
}

/// `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3); a
/// date in the past is 0; anything else is ignored (backoff applies).
pub(crate) fn retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or_default(),
    )
}

#[async_trait::async_trait]
impl Transport for HttpTransport {
    async fn post(&self, event: &Event) -> Attempt {
        let tcp = match self.connect().await {
            Ok(tcp) => tcp,
            Err(e) => return retry(format!("connect: {e}")),
        };
        let Some(tls) = &self.tls else {
            return self.exchange(tcp, event).await;
        };
        let name = match self.server_name() {
            Ok(n) => n,
            Err(e) => return retry(e),
        };
        match tls.connect(name, tcp).await {
            Ok(stream) => self.exchange(stream, event).await,
            // A certificate the roots do not vouch for is retried too: it
            // is as likely a receiver mid-renewal as a wrong CA, and the
            // give-up bound ends it either way.
            Err(e) => retry(format!("TLS: {e}")),
        }
    }
}

/// rustls on ring, the tree's one provider, trusting either the
/// configured CA file or the Mozilla roots compiled into `webpki-roots`.
pub(crate) fn client_config(options: &WebhookOptions) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match &options.ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| Error::config(format!("webhook ca_file {}: {e}", path.display())))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| {
                    Error::config(format!(
                        "webhook ca_file {}: not PEM certificates: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(Error::config(format!(
                    "webhook ca_file {}: no certificate in the file",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    Error::config(format!("webhook ca_file {}: {e}", path.display()))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::dbtls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("webhook TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
