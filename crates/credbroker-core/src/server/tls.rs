//! Our own TLS acceptor: tonic's `ServerTlsConfig` cannot take CRLs or be
//! reloaded, so we run tokio-rustls ourselves and hand tonic finished
//! `TlsStream`s (which still carry the peer certificates to requests).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
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
use crate::identity::Identity;
use crate::server::shares::{identity_key, Admitted, ListenerOptions, Shares, Source};

/// A handshake that takes longer than this is dropped, so slow or idle
/// clients cannot hold accept slots.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in flight at once.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Most handshakes in flight from one source (an IPv4 address, an IPv6
/// network of `server.ipv6_source_prefix` bits): one host that opens
/// connections and never speaks cannot take every slot from the others,
/// even with a whole /64 of addresses to speak from.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 32;

/// The application protocol a listener speaks: gRPC needs h2; the HTTPS
/// listeners (Vault API, console) speak HTTP/1.1, which is what browsers
/// and Vault clients offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http1,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
        }
    }
}

/// Installs the process-wide rustls crypto provider (ring). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::config_from(format!("tls.{what} {}: {e}", path.display()), e))
}

/// Builds the server config: our certificate, client certificates required
/// and verified against `client_ca` (and the CRL, if any), ALPN h2 only.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>> {
    install_crypto_provider();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read_file("cert", &tls.cert)?)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::config_from(format!("tls.cert {}: {e}", tls.cert.display()), e))?;
    if certs.is_empty() {
        return Err(Error::config(format!(
            "tls.cert {}: no certificate in it",
            tls.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&read_file("key", &tls.key)?)
        .map_err(|e| Error::config_from(format!("tls.key {}: {e}", tls.key.display()), e))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read_file("client_ca", &tls.client_ca)?) {
        let ca = ca.map_err(|e| {
            Error::config_from(format!("tls.client_ca {}: {e}", tls.client_ca.display()), e)
        })?;
        roots.add(ca).map_err(|e| {
            Error::config_from(format!("tls.client_ca {}: {e}", tls.client_ca.display()), e)
        })?;
    }
    if roots.is_empty() {
        return Err(Error::config(format!(
            "tls.client_ca {}: no certificate in it",
            tls.client_ca.display()
        )));
    }
    let mut builder = WebPkiClientVerifier::builder(Arc::new(roots));
    if let Some(crl_path) = &tls.crl {
        let crls: Vec<CertificateRevocationListDer<'static>> =
            CertificateRevocationListDer::pem_slice_iter(&read_file("crl", crl_path)?)
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| {
                    Error::config_from(format!("tls.crl {}: {e}", crl_path.display()), e)
                })?;
        // A CRL past its nextUpdate no longer says which certificates are
        // revoked: refuse every client until a fresh one is in place,
        // rather than trust a list the CA has stopped vouching for —
        // unless the operator chose to be warned instead.
        builder = builder.with_crls(crls);
        if tls.refuse_expired_crl {
            builder = builder.enforce_revocation_expiration();
        }
    }
    let verifier = builder
        .build()
        .map_err(|e| Error::config_from(format!("tls: cannot build client verifier: {e}"), e))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| Error::config_from(format!("tls: certificate and key do not fit: {e}"), e))?;
    config.alpn_protocols = Alpn::H2.protocols();
    Ok(Arc::new(config))
}

/// How often the certificate, key, CA and CRL files are checked for
/// changes: a CA publishes a new CRL, or cert-manager renews the server
/// certificate, without anyone sending SIGHUP.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Reloads the TLS config whenever one of its files changes (modification
/// time, size or inode), until `stop`. `current` gives the paths as the
/// config now names them (a SIGHUP may change them). A file that does not
/// load (half-written, a key that does not fit) keeps the running config;
/// the next change is tried again.
pub async fn watch_files(
    current: impl Fn() -> TlsConfig + Send + 'static,
    tls: SharedTls,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(stop);
    let mut last = stamp(&current());
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(FILE_CHECK_INTERVAL) => {}
        }
        let config = current();
        let now = stamp(&config);
        if now == last {
            continue;
        }
        last = now;
        match server_config(&config) {
            Ok(c) => {
                *tls.write().unwrap_or_else(|p| p.into_inner()) = c;
                tracing::info!("TLS files changed: certificates and CRL reloaded");
                for w in crl_warnings(&config, chrono::Utc::now()) {
                    tracing::warn!("{w}");
                }
            }
            Err(e) => {
                tracing::error!(error = %crate::error::chain(&e), "TLS files changed but do not load; keeping the running ones")
            }
        }
    }
}

type FileStamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(tls: &TlsConfig) -> Vec<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    [
        Some(&tls.cert),
        Some(&tls.key),
        Some(&tls.client_ca),
        tls.crl.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
    })
    .collect()
}

/// What an operator must hear about the CRL at every load: none
/// configured, or one past its `nextUpdate` (refused or, with
/// `crl_expired = "warn"`, used anyway).
pub fn crl_warnings(tls: &TlsConfig, now: chrono::DateTime<chrono::Utc>) -> Vec<String> {
    let Some(path) = &tls.crl else {
        return vec![
            "tls.crl is not set: a leaked client certificate is accepted until it expires; configure the CA's CRL"
                .to_string(),
        ];
    };
    // An unreadable or malformed CRL is server_config's to report.
    let Ok(crls) = read_crls(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for crl in crls.into_iter().flatten() {
        if let Some(next) = crl.next_update.filter(|n| *n < now) {
            let what = if tls.refuse_expired_crl {
                "every client is refused until a fresh CRL is in place"
            } else {
                "it is used anyway (tls.crl_expired = \"warn\"): revocations since then are unknown"
            };
            out.push(format!(
                "tls.crl {} is past its next update ({}): {what}",
                path.display(),
                next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
        }
    }
    out
}

/// What `credbroker check` and the start-up warnings need of one CRL.
#[derive(Debug, Clone, Copy)]
pub struct CrlSummary {
    pub revoked: usize,
    pub next_update: Option<chrono::DateTime<chrono::Utc>>,
}

/// Why one PEM item of a CRL file gives no [`CrlSummary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlItemError {
    NotPem,
    Unparsable,
}

/// Each PEM item of the CRL file at `path`, read and parsed (the
/// file's read error if it cannot be read).
pub fn read_crls(
    path: &Path,
) -> std::io::Result<Vec<std::result::Result<CrlSummary, CrlItemError>>> {
    let pem = std::fs::read(path)?;
    Ok(CertificateRevocationListDer::pem_slice_iter(&pem)
        .map(|der| {
            let der = der.map_err(|_| CrlItemError::NotPem)?;
            let (_, parsed) =
                x509_parser::parse_x509_crl(&der).map_err(|_| CrlItemError::Unparsable)?;
            Ok(CrlSummary {
                revoked: parsed.iter_revoked_certificates().count(),
                next_update: parsed
                    .next_update()
                    .and_then(|t| chrono::DateTime::from_timestamp(t.timestamp(), 0)),
            })
        })
        .collect())
}

/// The earliest `notAfter` among the PEM certificates of the file at
/// `path`, for the expiry metrics (None when it holds none that parse:
/// `server_config` reports that file).
pub fn earliest_expiry(path: &Path) -> Option<chrono::DateTime<chrono::Utc>> {
    let pem = std::fs::read(path).ok()?;
    CertificateDer::pem_slice_iter(&pem)
        .filter_map(|der| {
            let der = der.ok()?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
            chrono::DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
        })
        .min()
}

/// The current TLS config; swapped whole on reload (SIGHUP), so new
/// connections use new certificates and CRLs while open ones continue.
pub type SharedTls = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// A finished handshake, admitted to its listener's connection shares.
pub type AdmittedTls = Admitted<TlsStream<TcpStream>>;

/// Accepts TCP connections and runs their TLS handshakes concurrently, each
/// bounded in time, in total and per source; then admits each finished
/// connection to the listener's shares (per identity, per source, in
/// total — `shares.rs`), closing it when its identity or source holds its
/// share already. Admitted streams come out of the returned channel and
/// hold their place until they close. Every refusal is counted in metrics
/// and audited, aggregated ([`RefusalLog`]).
pub fn incoming(
    listener: TcpListener,
    tls: SharedTls,
    options: ListenerOptions,
    alpn: Alpn,
) -> mpsc::Receiver<std::io::Result<AdmittedTls>> {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let per_source = Arc::new(SourceSlots::default());
    let refusals = RefusalLog::start(options.audit.clone(), options.name, REFUSAL_INTERVAL);
    let shares = Shares::with_gauge(
        options.limits,
        options.metrics.connections_open(options.name),
    );
    let ipv6_prefix = options.limits.ipv6_prefix;
    tokio::spawn(async move {
        let mut acceptors = AcceptorCache::new(alpn);
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
                    tracing::warn!(error = %crate::error::chain(&e), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let source = Source::of(peer.ip(), ipv6_prefix);
            let Some(source_slot) = per_source.acquire(source) else {
                refusals.handshake(
                    &options,
                    source,
                    "source_in_flight",
                    "too many handshakes in flight from this address",
                );
                continue;
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many TLS handshakes in flight; dropping connection");
                refusals.handshake(
                    &options,
                    peer.ip(),
                    "in_flight",
                    "too many handshakes in flight",
                );
                continue;
            };
            let acceptor = acceptors.get(&tls);
            let tx = tx.clone();
            let refusals = refusals.clone();
            let shares = shares.clone();
            let options = options.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    // A refused client certificate ends here; the client
                    // sees the TLS alert. Log without secrets.
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %crate::error::chain(&e), "TLS handshake refused");
                        refusals.handshake(&options, peer.ip(), "refused", &e.to_string());
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        refusals.handshake(&options, peer.ip(), "timeout", "handshake timed out");
                        return;
                    }
                };
                // The handshake is over: its source's slot goes to the
                // next one, whatever admission says. The permit is kept
                // while a refused connection is told so (a write into an
                // empty socket buffer, bounded anyway), so refusals in
                // progress stay within the handshake bound.
                drop(source_slot);
                let (identity, cert_sha256) = leaf_identity(&stream);
                match shares.admit(&identity_key(&identity, &cert_sha256), source) {
                    Ok(held) => {
                        drop(permit);
                        let _ = tx
                            .send(Ok(Admitted::new(stream, identity, cert_sha256, held)))
                            .await;
                    }
                    Err(refusal) => {
                        options
                            .metrics
                            .connection_refused(options.name, refusal.label());
                        let who = match &identity {
                            Ok(id) => id.to_string(),
                            Err(_) => format!("unauthenticated:{source}"),
                        };
                        let reason = refusal.reason(options.name, &options.limits);
                        // Once per caller and interval, like its audit
                        // record: an operator sees a share that is too
                        // small for a real deployment without a flood of
                        // lines from an attack.
                        if refusals.record(who.clone(), "connection", &reason) {
                            tracing::warn!(%peer, who = %who, "{reason} (more this interval are counted in the audit log and credbroker_connections_refused_total)");
                        }
                        refuse(stream, alpn).await;
                        drop(permit);
                    }
                }
            });
        }
    });
    rx
}

/// The caller of a finished handshake: the leaf certificate's identity (or
/// why it names none) and its SHA-256. The verifier required a certificate,
/// so there is one; a leaf missing anyway is refused like any certificate
/// without identity.
fn leaf_identity(
    stream: &TlsStream<TcpStream>,
) -> (std::result::Result<Identity, crate::error::Error>, [u8; 32]) {
    use sha2::{Digest, Sha256};
    match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
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
    }
}

/// Closes a connection that was not admitted. An HTTP/1.1 client is told
/// why first (503, `Connection: close`); an h2 client sees the close.
async fn refuse(mut stream: TlsStream<TcpStream>, alpn: Alpn) {
    use tokio::io::AsyncWriteExt;
    if alpn == Alpn::Http1 {
        let body = "too many connections from this caller: close some and try again\n";
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }
}

/// The acceptor for the current TLS config with this listener's ALPN,
/// rebuilt only when a reload swapped the config.
struct AcceptorCache {
    alpn: Alpn,
    source: Option<Arc<rustls::ServerConfig>>,
    acceptor: Option<TlsAcceptor>,
}

impl AcceptorCache {
    fn new(alpn: Alpn) -> Self {
        AcceptorCache {
            alpn,
            source: None,
            acceptor: None,
        }
    }

    fn get(&mut self, tls: &SharedTls) -> TlsAcceptor {
        let current = tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let fresh = self
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &current));
        if !fresh || self.acceptor.is_none() {
            let config = if current.alpn_protocols == self.alpn.protocols() {
                current.clone()
            } else {
                let mut c = (*current).clone();
                c.alpn_protocols = self.alpn.protocols();
                Arc::new(c)
            };
            self.acceptor = Some(TlsAcceptor::from(config));
            self.source = Some(current);
        }
        self.acceptor.clone().expect("set above")
    }
}

/// Handshakes in flight per source (IPv6 grouped by its prefix).
#[derive(Default)]
struct SourceSlots {
    inner: Mutex<HashMap<Source, usize>>,
}

impl SourceSlots {
    fn acquire(self: &Arc<Self>, ip: Source) -> Option<SourceSlot> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            slots: self.clone(),
            ip,
        })
    }
}

struct SourceSlot {
    slots: Arc<SourceSlots>,
    ip: Source,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.slots.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// How often repeated refusals are summed into one audit record.
const REFUSAL_INTERVAL: Duration = Duration::from_secs(10);
/// Distinct (source, reason) pairs counted per interval; beyond that they
/// are summed under one "other sources" record, so a scan from many
/// addresses cannot grow the map either.
const MAX_REFUSAL_KEYS: usize = 1024;
const OTHER_SOURCES: &str = "unauthenticated:other-sources";

/// Refused handshakes are denied requests like any other and are audited,
/// with the peer address as the only identity we have (a connection
/// refused after the handshake, over its share, under its identity) — but
/// junk connections must not fill the disk, so the first refusal of a
/// (who, action, reason) in an interval is written at once and the rest of
/// that interval as one record with their count.
#[derive(Clone)]
struct RefusalLog {
    counts: Arc<Mutex<RefusalCounts>>,
    audit: Arc<AuditLog>,
    /// The listener, in each record's `via`: a connection is refused
    /// before any door is known (the gRPC listener serves two).
    via: &'static str,
}

type RefusalKey = (String, &'static str, String);

#[derive(Default)]
struct RefusalCounts {
    /// (identity, action, reason) → refusals not yet written this interval.
    pending: HashMap<RefusalKey, u64>,
    /// Keys already written once this interval.
    seen: std::collections::HashSet<RefusalKey>,
}

impl RefusalLog {
    fn start(audit: Arc<AuditLog>, via: &'static str, interval: Duration) -> Self {
        let log = RefusalLog {
            counts: Arc::default(),
            audit,
            via,
        };
        let flusher = log.clone();
        let weak = Arc::downgrade(&log.counts);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                flusher.flush();
                // The listener is gone once only this task holds the counts.
                if weak.strong_count() <= 1 {
                    return;
                }
            }
        });
        log
    }

    /// A TLS handshake refused before any identity: counted by `why`
    /// (`refused`, `timeout`, `in_flight`, `source_in_flight`) and
    /// recorded against the address (or source) it came from.
    fn handshake(
        &self,
        options: &ListenerOptions,
        source: impl std::fmt::Display,
        why: &str,
        detail: &str,
    ) {
        options.metrics.handshake_refused(options.name, why);
        self.record(format!("unauthenticated:{source}"), "tls_handshake", detail);
    }

    /// Counts one refusal; true when it is the first of its kind this
    /// interval (written at once).
    fn record(&self, who: String, action: &'static str, reason: &str) -> bool {
        let reason: String = reason.chars().take(200).collect();
        let mut key = (who, action, reason);
        let first = {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            if !c.seen.contains(&key) && c.seen.len() >= MAX_REFUSAL_KEYS {
                key.0 = OTHER_SOURCES.into();
            }
            if c.seen.insert(key.clone()) {
                true
            } else {
                *c.pending.entry(key.clone()).or_insert(0) += 1;
                false
            }
        };
        if first {
            self.write(&key, 1);
        }
        first
    }

    fn flush(&self) {
        let pending = {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            c.seen.clear();
            std::mem::take(&mut c.pending)
        };
        for (key, n) in pending {
            self.write(&key, n);
        }
    }

    fn write(&self, (who, action, reason): &RefusalKey, count: u64) {
        let mut e = Event::new(who.as_str(), action);
        e.outcome = Some(Outcome::Denied);
        e.detail = Some(if count == 1 {
            reason.to_string()
        } else {
            format!("{count} refused: {reason}")
        });
        if let Err(err) = crate::audit::in_via(Some(self.via), || self.audit.append(e)) {
            tracing::error!(error = %crate::error::chain(&err), "audit write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_source_handshake_cap_counts_one_ipv6_64_as_one_source() {
        let slots = Arc::new(SourceSlots::default());
        let source = |ip: &str| Source::of(ip.parse().unwrap(), 64);
        // One host with a /64: every handshake from a new address of it.
        let held: Vec<_> = (1..=MAX_HANDSHAKES_PER_SOURCE)
            .map(|i| {
                slots
                    .acquire(source(&format!("2001:db8:0:1::{i:x}")))
                    .expect("within the cap")
            })
            .collect();
        assert!(
            slots
                .acquire(source("2001:db8:0:1:ffff:ffff:ffff:ffff"))
                .is_none(),
            "another address of the same /64 got past the per-source cap"
        );
        // Another /64, and an IPv4 address, are other sources.
        assert!(slots.acquire(source("2001:db8:0:2::1")).is_some());
        assert!(slots.acquire(source("192.0.2.1")).is_some());
        // A finished handshake gives its slot back.
        drop(held);
        assert!(slots.acquire(source("2001:db8:0:1::99")).is_some());
        assert!(
            slots.inner.lock().unwrap().is_empty(),
            "nothing kept for finished handshakes"
        );
    }
}
