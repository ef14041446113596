//! HTTP/1.1 over the broker's mTLS acceptor, for the listeners that speak
//! HTTP rather than gRPC (the Vault-compatible API, the web console), and
//! the plain-HTTP serving loop the metrics listener shares with them.
//!
//! The same server certificate and the same *required*, verified client
//! certificates as gRPC: handlers get the caller as a [`Peer`] request
//! extension and never see a request without a verified certificate.
//! Before a request is read nothing grows without bound: handshakes are
//! capped by `tls::incoming`, which also admits each connection within the
//! listener's fair shares (per identity, per source, in total:
//! `shares.rs`); a client gets `server.request_timeout` to send its
//! request head, and as long again for its body (`body_deadline`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use axum::response::IntoResponse;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::identity::Identity;
pub use crate::server::shares::ListenerOptions;
use crate::server::tls::{self, Alpn, SharedTls};

/// A client of the metrics listener that has not sent its request head by
/// then is dropped (the mTLS listeners: `server.request_timeout`).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most open connections on the metrics listener; more are closed at once
/// (the mTLS listeners: `server.max_connections`, with shares).
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
/// A connection older than `options.max_age` is closed after its current
/// request, as gRPC's are (`server.max_connection_age`): a client whose
/// certificate a new CRL revoked must handshake again, and fails then.
/// Connections are admitted by `tls::incoming` within the listener's
/// shares; each request must arrive (head, then body) within
/// `options.request_timeout`.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    tls: SharedTls,
    options: ListenerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let request_timeout = options.request_timeout;
    let max_age = options.max_age;
    let mut streams = tls::incoming(listener, tls, options, Alpn::Http1);
    let stop = CancellationToken::new();
    let router = router.layer(axum::middleware::from_fn_with_state(
        request_timeout,
        body_deadline,
    ));
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
        let Ok(addr) = stream.io.get_ref().0.peer_addr() else {
            continue;
        };
        let peer = Peer {
            addr,
            identity: stream.identity.clone(),
            cert_sha256: stream.cert_sha256,
        };
        let app = router.clone().layer(axum::Extension(peer));
        tokio::spawn(serve_connection(
            stream,
            app,
            stop.clone(),
            None,
            request_timeout,
            Some(max_age),
        ));
    }
    stop.cancel();
}

/// Gives a request's body until `timeout` after its head to arrive. A body
/// still arriving then fails its reader (the handler), and whatever the
/// handler made of that, the answer is 408 with `Connection: close`: the
/// connection ends, so a client that sends a head and never its body holds
/// a connection for `timeout` at most, not for as long as it likes.
async fn body_deadline(
    axum::extract::State(timeout): axum::extract::State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::body::HttpBody;
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let expired = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        axum::body::Body::from_stream(DeadlineBody {
            inner: body.into_data_stream(),
            deadline: Box::pin(tokio::time::sleep(timeout)),
            expired: expired.clone(),
        })
    });
    let answer = next.run(req).await;
    if !expired.load(Ordering::Relaxed) {
        return answer;
    }
    tracing::info!(
        ?timeout,
        "a request body did not arrive in time; closing its connection"
    );
    let body = serde_json::json!({
        "errors": [format!(
            "the request body did not arrive within {}",
            humantime::format_duration(timeout)
        )]
    });
    (
        axum::http::StatusCode::REQUEST_TIMEOUT,
        [
            (axum::http::header::CONNECTION, "close"),
            (axum::http::header::CONTENT_TYPE, "application/json"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// A request body that fails once its deadline passes before its end.
struct DeadlineBody {
    inner: axum::body::BodyDataStream,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

/// What a body read past its deadline fails with.
#[derive(Debug)]
struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimedOut {}

impl futures::Stream for DeadlineBody {
    type Item = Result<axum::body::Bytes, axum::BoxError>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.expired.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = std::pin::Pin::new(&mut this.inner).poll_next(cx) {
            return Poll::Ready(item.map(|r| r.map_err(Into::into)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        Poll::Pending
    }
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
            Some(permit),
            HEADER_READ_TIMEOUT,
            None,
        ));
    }
    stop.cancel();
}

async fn serve_connection<S>(
    io: S,
    app: Router,
    stop: CancellationToken,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    header_timeout: Duration,
    max_age: Option<Duration>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
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
