//! HTTP/1.1 over the broker's mTLS acceptor, for the listeners that speak
//! HTTP rather than gRPC (the Vault-compatible API, the web console), and
//! the plain-HTTP serving loop the metrics listener shares with them.
//!
//! The same server certificate and the same *required*, verified client
//! certificates as gRPC: handlers get the caller as a [`Peer`] request
//! extension and never see a request without a verified certificate.
//! Before a request is read nothing grows without bound: handshakes are
//! capped by `tls::incoming`, connections in total here, and a client gets
//! `HEADER_READ_TIMEOUT` to send its request head.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditLog;
use crate::identity::Identity;
use crate::server::tls::{self, Alpn, SharedTls};

/// A client that has not sent its request head by then is dropped.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most open connections per HTTP listener; more are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// The caller of one HTTPS connection, from its verified leaf certificate.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The identity, or why the certificate gives none (two SPIFFE IDs, a
    /// malformed one…). Handlers refuse and audit the latter through
    /// `Broker::refuse_unauthenticated`, as the gRPC layer does.
    pub identity: std::result::Result<Identity, crate::error::Error>,
    /// SHA-256 of the leaf certificate's DER: what binds a token or a CSRF
    /// token to one certificate, not merely to one identity.
    pub cert_sha256: [u8; 32],
}

impl Peer {
    /// `cert_sha256` in lowercase hex.
    pub fn cert_fingerprint(&self) -> String {
        hex::encode(self.cert_sha256)
    }
}

/// Serves `router` over mTLS HTTP/1.1 until `shutdown`; then stops
/// accepting and lets open connections finish their current request.
/// A connection older than `max_age` is closed after its current request,
/// as gRPC's are (`server.max_connection_age`): a client whose certificate
/// a new CRL revoked must handshake again, and fails then.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    tls: SharedTls,
    audit: Arc<AuditLog>,
    max_age: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut streams = tls::incoming(listener, tls, audit, Alpn::Http1);
    let stop = CancellationToken::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            s = streams.recv() => match s {
                Some(Ok(s)) => s,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!("too many HTTPS connections; closing one");
            continue;
        };
        let (tcp, session) = stream.get_ref();
        let Ok(addr) = tcp.peer_addr() else { continue };
        // The verifier required a certificate, so there is one; a leaf
        // missing anyway is refused like any certificate without identity.
        let (identity, cert_sha256) = match session.peer_certificates().and_then(|c| c.first()) {
            Some(leaf) => (
                Identity::from_cert_der(leaf.as_ref()),
                Sha256::digest(leaf.as_ref()).into(),
            ),
            None => (
                Err(crate::error::Error::Unauthenticated(
                    "a client certificate is required".into(),
                )),
                [0; 32],
            ),
        };
        let peer = Peer {
            addr,
            identity,
            cert_sha256,
        };
        let app = router.clone().layer(axum::Extension(peer));
        tokio::spawn(serve_connection(
            stream,
            app,
            stop.clone(),
            permit,
            Some(max_age),
        ));
    }
    stop.cancel();
}

/// Serves `router` over plain HTTP/1.1 (the metrics listener), with the
/// same header timeout and connection cap as the HTTPS listeners.
pub async fn serve_plain(
    router: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let stop = CancellationToken::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!("too many HTTP connections; closing one");
            continue;
        };
        tokio::spawn(serve_connection(
            tcp,
            router.clone(),
            stop.clone(),
            permit,
            None,
        ));
    }
    stop.cancel();
}

async fn serve_connection<S>(
    io: S,
    app: Router,
    stop: CancellationToken,
    _permit: tokio::sync::OwnedSemaphorePermit,
    max_age: Option<Duration>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let aged = async {
        match max_age {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %crate::error::chain(&e), "HTTP connection ended with an error");
            }
        }
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        }
        _ = aged => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        }
    }
}
