//! The mTLS gRPC client shared by `lease`, `admin`, `sidecar` and `demo`.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity as TlsIdentity};

use crate::error::{Error, Result};
use crate::pb;

/// Where the broker is and which certificate we present.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOpts {
    /// Broker address, e.g. https://127.0.0.1:7443
    #[arg(
        long,
        env = "CREDBROKER_ADDR",
        default_value = "https://127.0.0.1:7443"
    )]
    pub addr: String,
    /// CA certificate that signed the broker's server certificate (PEM)
    #[arg(long, env = "CREDBROKER_CA")]
    pub ca: PathBuf,
    /// Our client certificate (PEM)
    #[arg(long, env = "CREDBROKER_CERT")]
    pub cert: PathBuf,
    /// Our client key (PEM)
    #[arg(long, env = "CREDBROKER_KEY")]
    pub key: PathBuf,
}

fn read(what: &str, path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::config(format!("--{what} {}: {e}", path.display())))
}

impl ClientOpts {
    /// Opens a channel. The connection is made lazily, so this only fails
    /// on bad files or a malformed address.
    pub fn channel(&self) -> Result<Channel> {
        crate::server::tls::install_crypto_provider();
        let addr = if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("https://{}", self.addr)
        };
        let uri: http::Uri = addr
            .parse()
            .map_err(|e| Error::config(format!("--addr {addr:?}: {e}")))?;
        // Plain HTTP/2 to a TLS port fails later as "frame with invalid
        // size": say it here.
        if uri.scheme_str() != Some("https") {
            return Err(Error::config(format!(
                "--addr {addr}: the broker speaks only TLS: use https://{}",
                uri.authority().map(|a| a.as_str()).unwrap_or("HOST:PORT")
            )));
        }
        let host = uri
            .host()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_string();
        let (cert, key) = (read("cert", &self.cert)?, read("key", &self.key)?);
        self.key_matches_cert(&cert, &key)?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca", &self.ca)?))
            .identity(TlsIdentity::from_pem(cert, key))
            .domain_name(host);
        let channel = Channel::builder(uri)
            .tls_config(tls)
            .map_err(|e| Error::config(format!("client TLS: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .connect_lazy();
        Ok(channel)
    }

    /// The files parse and the key is the certificate's: tonic would only
    /// say "transport error" at the first call.
    fn key_matches_cert(&self, cert: &[u8], key: &[u8]) -> Result<()> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let (c, k) = (self.cert.display(), self.key.display());
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<std::result::Result<Vec<_>, _>>()
            .ok()
            .filter(|chain| !chain.is_empty())
            .ok_or_else(|| Error::config(format!("--cert {c}: no PEM certificate in it")))?;
        let der = PrivateKeyDer::from_pem_slice(key)
            .map_err(|_| Error::config(format!("--key {k}: no PEM private key in it")))?;
        let provider = rustls::crypto::ring::default_provider();
        match rustls::sign::CertifiedKey::from_der(chain, der, &provider) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InconsistentKeys(_)) => Err(Error::config(format!(
                "--key {k} does not belong to --cert {c} (their public keys differ): pass the \
                 key that was made with this certificate"
            ))),
            Err(e) => Err(Error::config(format!("--key {k} / --cert {c}: {e}"))),
        }
    }

    pub fn broker(&self) -> Result<pb::broker_client::BrokerClient<Channel>> {
        Ok(pb::broker_client::BrokerClient::new(self.channel()?))
    }

    pub fn admin(&self) -> Result<pb::admin_client::AdminClient<Channel>> {
        Ok(pb::admin_client::AdminClient::new(self.channel()?))
    }

    pub fn access(&self) -> Result<pb::access_client::AccessClient<Channel>> {
        Ok(pb::access_client::AccessClient::new(self.channel()?))
    }
}

/// Formats a gRPC status for a person: code and message, and for a
/// failure of the connection itself the cause found through `source()`
/// (tonic's own text stops at "tcp connect error" or "transport error").
pub fn describe(status: &tonic::Status) -> String {
    match transport_cause(status) {
        Some(cause) => format!("{:?}: {}: {}", status.code(), status.message(), cause.text),
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

impl ClientOpts {
    /// A gRPC failure explained for the person at the terminal: for a
    /// connection that never worked, where we tried to connect, what
    /// failed and what usually causes it.
    pub fn explain(&self, status: &tonic::Status) -> String {
        let Some(cause) = transport_cause(status) else {
            return describe(status);
        };
        let addr = &self.addr;
        match cause.kind {
            TransportKind::Refused => format!(
                "cannot reach the broker at {addr}: connection refused; is `credbroker serve` \
                 running there? (--addr / CREDBROKER_ADDR)"
            ),
            TransportKind::TimedOut => format!(
                "cannot reach the broker at {addr}: connection timed out ({}); check --addr and any \
                 firewall between",
                cause.text
            ),
            TransportKind::ServerCertificate => format!(
                "TLS handshake with the broker at {addr} failed: the broker's certificate was \
                 rejected ({}); likely causes: --ca {} is not the CA that signed the broker's \
                 tls.cert, the broker's certificate expired, or it does not name this host",
                cause.text,
                self.ca.display()
            ),
            TransportKind::ClientRefused => format!(
                "TLS handshake with the broker at {addr} failed: the broker refused our client \
                 certificate --cert {} ({}); likely causes: a client certificate from another CA \
                 than the broker's tls.client_ca, an expired certificate, or one revoked by the \
                 broker's CRL",
                self.cert.display(),
                cause.text
            ),
            // TLS 1.3: our handshake completes before the broker checks
            // our certificate, so its refusal arrives as a closed
            // connection, not as an alert we could read.
            TransportKind::Closed => format!(
                "the broker at {addr} closed the connection right after the TLS handshake: it \
                 most likely refused our client certificate --cert {}; likely causes: a client \
                 certificate from another CA than the broker's tls.client_ca, an expired \
                 certificate, or one revoked by the broker's CRL (the broker's log and audit \
                 say which)",
                self.cert.display()
            ),
            TransportKind::Other => format!(
                "connection to the broker at {addr} failed: {}; likely causes: wrong --ca, a \
                 client certificate --cert {} from another CA than the broker's tls.client_ca, \
                 expired or revoked",
                cause.text,
                self.cert.display()
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransportKind {
    Refused,
    TimedOut,
    /// We rejected the broker's certificate.
    ServerCertificate,
    /// The broker sent a TLS alert: it rejected ours.
    ClientRefused,
    /// The connection closed before any answer.
    Closed,
    Other,
}

struct TransportCause {
    kind: TransportKind,
    text: String,
}

/// The cause of a status that tonic made from a failed connection (not an
/// answer from the broker). `None` for the broker's own answers.
fn transport_cause(status: &tonic::Status) -> Option<TransportCause> {
    use std::error::Error as _;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = status.source();
    cur?;
    let mut deepest = status.message().to_string();
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            // io::Error::source() skips the error it wraps: look inside.
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            let kind = match tls {
                rustls::Error::AlertReceived(_) => TransportKind::ClientRefused,
                rustls::Error::InvalidCertificate(_) => TransportKind::ServerCertificate,
                _ => TransportKind::Other,
            };
            return Some(TransportCause {
                kind,
                text: format!("TLS: {tls}"),
            });
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            let kind = match io.kind() {
                std::io::ErrorKind::ConnectionRefused => TransportKind::Refused,
                std::io::ErrorKind::TimedOut => TransportKind::TimedOut,
                std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof => TransportKind::Closed,
                _ => by_text(&io.to_string()),
            };
            return Some(TransportCause {
                kind,
                text: io.to_string(),
            });
        }
        deepest = err.to_string();
        cur = err.source();
    }
    let kind = by_text(&deepest);
    Some(TransportCause {
        kind,
        text: deepest,
    })
}

/// Classifies by its words an error whose type was lost on the way up
/// (an `io::Error` around an `io::Error` around rustls' error).
fn by_text(text: &str) -> TransportKind {
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if has(&["received fatal alert"]) {
        TransportKind::ClientRefused
    } else if has(&["invalid peer certificate"]) {
        TransportKind::ServerCertificate
    } else if has(&["timed out", "timeout"]) {
        TransportKind::TimedOut
    } else if has(&["connection closed", "broken pipe", "connection reset"]) {
        TransportKind::Closed
    } else {
        TransportKind::Other
    }
}
