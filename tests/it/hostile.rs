//! A hostile network before authentication: junk and idle connections from
//! one host, a scraper that never sends its request, and an audit log that
//! logrotate moves or that rotates itself — nothing may grow without bound,
//! lock other callers out, or break the hash chain.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;

fn roles() -> String {
    demo_role("ro", "1m", "5m")
}

/// A TCP connection to the broker from `source` (another loopback address:
/// Linux answers for all of 127/8), so one "host" can misbehave while the
/// test's own clients on 127.0.0.1 go on.
async fn connect_from(source: &str, port: u16) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse::<SocketAddr>().unwrap())
        .unwrap();
    sock.connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap()
}

/// Sum of the refusals audited for `who`: a record stands for one refusal,
/// or for `N` when its detail reads "N refused: …".
fn refusals_audited(b: &TestBroker, who: &str) -> (usize, u64) {
    let records: Vec<_> = b
        .audit_records()
        .into_iter()
        .filter(|r| r.action == "tls_handshake" && r.identity == who)
        .collect();
    let total = refusals_counted(&records);
    (records.len(), total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_and_idle_connections_from_one_host_neither_lock_others_out_nor_flood_the_audit_log() {
    let mut b = TestBroker::start(&roles()).await;
    // A legitimate client on another address issues all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let legit = {
        let (addr, env, stop) = (b.addr.clone(), b.env.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut c = env.client(&addr, "app").broker().unwrap();
                match c
                    .issue_lease(credbroker::pb::IssueLeaseRequest {
                        role: "ro".into(),
                        ttl_seconds: 0,
                    })
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed)
        })
    };
    // Connections that never speak, more than the broker holds in handshake
    // in total (1,024): without a per-host cap they would lock everyone out.
    const IDLE: u64 = 2_000;
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(connect_from("127.0.0.2", b.port).await);
    }
    // Then connect-and-close junk: something that is not TLS, and a hang-up.
    const JUNK: u64 = 10_000;
    let started = Instant::now();
    for _ in 0..JUNK {
        let mut s = connect_from("127.0.0.2", b.port).await;
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        drop(s);
    }
    let junk_took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failed) = legit.await.unwrap();
    assert!(
        failed.is_empty(),
        "the other host was refused {} time(s) during the flood: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(served >= 5, "only {served} issues during the flood");

    // The junk is audited — not one line per connection. Within the next
    // interval the counts are written, and they add up: no refusal is lost
    // by aggregating (the idle ones beyond the per-host cap are refusals).
    let expected = JUNK + IDLE - 32;
    let counted = eventually(Duration::from_secs(25), || async {
        refusals_audited(&b, "unauthenticated:127.0.0.2").1 >= expected
    })
    .await;
    let (records, total) = refusals_audited(&b, "unauthenticated:127.0.0.2");
    println!(
        "{IDLE} idle + {JUNK} junk connections in {junk_took:?}: {served} issues served to the \
         other host meanwhile, 0 refused; {total} refusals audited in {records} records"
    );
    assert!(
        counted,
        "{total} refusals counted in {records} records, expected at least {expected}"
    );
    assert!(
        records <= 20,
        "{records} audit records for {expected} refusals: not aggregated"
    );
    drop(idle);
    assert!(
        credbroker::audit::verify(&b.env.audit_path)
            .map(|v| matches!(v, credbroker::audit::Verdict::Intact { .. }))
            .unwrap(),
        "audit chain broken"
    );
    b.stop().await;
}

#[tokio::test]
async fn the_metrics_listener_drops_a_client_that_never_sends_its_request() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(credbroker::server::https::serve_plain(
        app,
        listener,
        async {
            let _ = rx.await;
        },
    ));
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // A client that does speak is served meanwhile.
    assert_eq!(http_get(port, "/healthz").await, "ok\n");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf))
        .await
        .expect("a silent connection is held open past 30 s")
        .unwrap_or(0);
    let held = started.elapsed();
    // hyper may answer 408 before closing; either way the socket ends.
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        held >= credbroker::server::https::HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "closed after {held:?}: too early to be the header timeout"
    );
    let _ = tx.send(());
    server.await.unwrap();
}

fn with_audit(text: String, extra: &str) -> String {
    text.replacen("[audit]\n", &format!("[audit]\n{extra}\n"), 1)
}

async fn verify_cli(args: &[&std::path::Path], all: bool) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"));
    cmd.args(["audit", "verify"]);
    if all {
        cmd.arg("--all");
    }
    let out = cmd.args(args).output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn logrotate_then_sighup_continues_the_audit_chain_in_a_new_file() {
    let mut b = TestBroker::prepare(&roles()).await;
    b.spawn_binary().await;
    issue(&b, "app", "ro", 0).await.unwrap();
    // logrotate's default: move the file, then signal.
    let moved = b.env.audit_path.with_extension("log.1");
    std::fs::rename(&b.env.audit_path, &moved).unwrap();
    issue(&b, "app", "ro", 0).await.unwrap();
    b.signal_binary("HUP");
    let reopened = eventually(Duration::from_secs(5), || async {
        b.env.audit_path.exists()
    })
    .await;
    assert!(reopened, "SIGHUP did not reopen the audit log");
    issue(&b, "app", "ro", 0).await.unwrap();
    let new = credbroker::audit::read_records(&b.env.audit_path).unwrap();
    assert_eq!(new[0].action, "audit_reopen");
    assert!(new.iter().any(|r| r.action == "issue"), "{new:?}");
    let old = credbroker::audit::read_records(&moved).unwrap();
    assert_eq!(
        old.iter().filter(|r| r.action == "issue").count(),
        2,
        "records between the move and SIGHUP belong in the moved file"
    );
    let (ok, out) = verify_cli(&[&moved, &b.env.audit_path], false).await;
    assert!(ok && out.contains("in 2 files"), "{out}");
    // The new file alone holds together and says it continues another.
    let (ok, out) = verify_cli(&[&b.env.audit_path], false).await;
    assert!(ok && out.contains("continuing a file not given"), "{out}");
    // In the wrong order the link is refused.
    let (ok, out) = verify_cli(&[&b.env.audit_path, &moved], false).await;
    assert!(!ok && out.contains("BROKEN"), "{out}");
    b.kill_binary();
}

#[tokio::test]
async fn rotate_size_splits_the_audit_log_and_verify_all_checks_every_file() {
    let mut b = TestBroker::prepare(&roles()).await;
    b.edit_config(|t| with_audit(t, "rotate_size = \"4KiB\""));
    b.start_in_process().await;
    for _ in 0..40 {
        issue(&b, "app", "ro", 0).await.unwrap();
    }
    let files = credbroker::audit::rotated_files(&b.env.audit_path).unwrap();
    assert!(
        files.len() >= 3,
        "40 issues did not rotate twice at 4KiB: {files:?}"
    );
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len < 4096 + 2048, "{} is {len} bytes", f.display());
    }
    let (ok, out) = verify_cli(&[&b.env.audit_path], true).await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("in {} files", files.len())), "{out}");
    // Deleting a middle file is found.
    std::fs::remove_file(&files[1]).unwrap();
    let (ok, out) = verify_cli(&[&b.env.audit_path], true).await;
    assert!(!ok && out.contains("does not continue"), "{out}");
    b.stop().await;

    // A bad size is a config error that names the key.
    b.edit_config(|t| t.replace("rotate_size = \"4KiB\"", "rotate_size = \"lots\""));
    let err = credbroker::config::Config::load(&b.env.config_path).unwrap_err();
    assert!(err.to_string().contains("audit.rotate_size"), "{err}");
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test]
async fn no_password_reaches_any_file_the_broker_or_the_databases_write() {
    use mysql_async::prelude::Queryable;
    let mut b = TestBroker::prepare(&roles()).await;
    let schema = unique("pwgrep");
    let mut root = maria_root().await;
    root.query_drop(format!("CREATE DATABASE `{schema}`"))
        .await
        .unwrap();
    let maria = b.maria_section("maria", &schema);
    let maria_role = format!(
        "[roles.mro]\ndatabase = \"maria\"\ndefault_ttl = \"5m\"\nmax_ttl = \"10m\"\n\
         allowed = [\"spiffe://credbroker.dev/ns/demo/*\"]\n\
         grants = [\"GRANT SELECT ON `{schema}`.* TO {{{{name}}}}\"]\n\n"
    );
    b.edit_config(|t| t + &maria + &maria_role);
    // Debug logging: the most the broker ever says.
    b.spawn_binary_with_log_level("debug").await;
    let mut passwords = Vec::new();
    for role in ["ro", "mro"] {
        let lease = issue(&b, "app", role, 0).await.unwrap();
        let mut c = b.client("app").await;
        c.renew_lease(credbroker::pb::RenewLeaseRequest {
            lease_id: lease.lease_id.clone(),
            ttl_seconds: 120,
        })
        .await
        .unwrap();
        passwords.push(lease.password.clone());
        let second = issue(&b, "app", role, 0).await.unwrap();
        b.revoke_as("app", &second.lease_id).await.unwrap();
        passwords.push(second.password);
    }
    let out = cli(&b, "admin", &["admin", "leases", "--format", "json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.kill_binary();

    let mut files = Vec::new();
    files_under(&b.env.dir, &mut files);
    files.push(cluster().log_path());
    files.push(mariadb().log_path());
    let mut read = 0;
    for f in &files {
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        read += 1;
        for p in &passwords {
            assert!(p.len() >= 16, "a password this short proves nothing");
            let found = bytes.windows(p.len()).any(|w| w == p.as_bytes());
            assert!(!found, "a leased password is in {}", f.display());
        }
    }
    // The store, the audit log, the broker's log and both server logs.
    assert!(read >= 5, "only {read} files read: {files:?}");
    let log = b.broker_log();
    assert!(
        log.contains("DEBUG"),
        "the broker did not log at debug level"
    );
}

/// An HTTPS connection (console, Vault API) lives no longer than
/// `server.max_connection_age`, like a gRPC one: a keep-alive connection
/// is closed after its request once it is older, so a client whose
/// certificate a new CRL revoked must handshake again.
#[tokio::test]
async fn an_https_connection_older_than_max_connection_age_is_closed() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut b = TestBroker::prepare(&roles()).await;
    let port = b.enable_console().await;
    b.server_keys("max_connection_age = \"2s\"");
    b.start_in_process().await;
    credbroker::server::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(b.env.pki.join("ca.pem")).unwrap())
        .unwrap();
    let cert = CertificateDer::from_pem_file(b.env.pki.join("admin.pem")).unwrap();
    let key = PrivateKeyDer::from_pem_file(b.env.pki.join("admin-key.pem")).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    // One keep-alive request, read to the end of its body.
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let complete = |raw: &[u8]| {
        let text = String::from_utf8_lossy(raw);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        head.lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .is_some_and(|n| body.len() >= n)
    };
    while !complete(&raw) {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
            .await
            .expect("the console did not answer")
            .unwrap();
        assert!(
            n > 0,
            "closed before the answer: {}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
    // Past the age, the idle connection is closed by the server — well
    // before the 10 s an idle client is otherwise given.
    let n = tokio::time::timeout(Duration::from_secs(6), tls.read(&mut buf))
        .await
        .expect("a connection past max_connection_age is still open");
    assert!(matches!(n, Ok(0) | Err(_)), "unexpected bytes: {n:?}");
    b.stop().await;
}
