//! Our own TLS acceptor: tonic's `ServerTlsConfig` cannot take CRLs or be
//! reloaded, so we run tokio-rustls ourselves and hand tonic finished
//! `TlsStream`s (which still carry the peer certificates to requests).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::audit::{AuditLog, Event, Outcome};
use crate::config::TlsConfig;
use crate::error::{Error, Result};

/// A handshake that takes longer than this is dropped, so slow or idle
/// clients cannot hold accept slots.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in flight at once.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Installs the process-wide rustls crypto provider (ring). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Config(format!("tls.{what} {}: {e}", path.display())))
}

/// Builds the server config: our certificate, client certificates required
/// and verified against `client_ca` (and the CRL, if any), ALPN h2 only.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>> {
    install_crypto_provider();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read_file("cert", &tls.cert)?)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Config(format!("tls.cert {}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "tls.cert {}: no certificate in it",
            tls.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&read_file("key", &tls.key)?)
        .map_err(|e| Error::Config(format!("tls.key {}: {e}", tls.key.display())))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read_file("client_ca", &tls.client_ca)?) {
        let ca = ca.map_err(|e| {
            Error::Config(format!("tls.client_ca {}: {e}", tls.client_ca.display()))
        })?;
        roots.add(ca).map_err(|e| {
            Error::Config(format!("tls.client_ca {}: {e}", tls.client_ca.display()))
        })?;
    }
    if roots.is_empty() {
        return Err(Error::Config(format!(
            "tls.client_ca {}: no certificate in it",
            tls.client_ca.display()
        )));
    }
    let mut builder = WebPkiClientVerifier::builder(Arc::new(roots));
    if let Some(crl_path) = &tls.crl {
        let crls: Vec<CertificateRevocationListDer<'static>> =
            CertificateRevocationListDer::pem_slice_iter(&read_file("crl", crl_path)?)
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::Config(format!("tls.crl {}: {e}", crl_path.display())))?;
        // A CRL past its nextUpdate no longer says which certificates are
        // revoked: refuse every client until a fresh one is in place,
        // rather than trust a list the CA has stopped vouching for.
        builder = builder.with_crls(crls).enforce_revocation_expiration();
    }
    let verifier = builder
        .build()
        .map_err(|e| Error::Config(format!("tls: cannot build client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| Error::Config(format!("tls: certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The current TLS config; swapped whole on reload (SIGHUP), so new
/// connections use new certificates and CRLs while open ones continue.
pub type SharedTls = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// Accepts TCP connections and runs their TLS handshakes concurrently, each
/// bounded in time; finished streams come out of the returned channel.
pub fn incoming(
    listener: TcpListener,
    tls: SharedTls,
    audit: Arc<AuditLog>,
) -> mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            // When the server stops it drops the receiver; stop accepting
            // then, so the listening socket is released.
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many TLS handshakes in flight; dropping connection");
                continue;
            };
            let acceptor = TlsAcceptor::from(tls.read().unwrap_or_else(|p| p.into_inner()).clone());
            let tx = tx.clone();
            let audit = audit.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    // A refused client certificate ends here; the client
                    // sees the TLS alert. Log without secrets.
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        audit_refusal(&audit, peer, &e.to_string());
                    }
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// A refused certificate is a denied request like any other: audited, with
/// the peer address as the only identity we have.
fn audit_refusal(audit: &AuditLog, peer: std::net::SocketAddr, reason: &str) {
    let mut e = Event::new(format!("unauthenticated:{}", peer.ip()), "tls_handshake");
    e.outcome = Some(Outcome::Denied);
    e.detail = Some(reason.chars().take(200).collect());
    if let Err(err) = audit.append(e) {
        tracing::error!(error = %err, "audit write failed");
    }
}
