//! TLS from the broker to PostgreSQL targets and to the PostgreSQL store,
//! against a throwaway server of this file's own that refuses every
//! connection without TLS (`hostnossl … reject`): the broker connects with
//! `verify-full`, leased DSNs carry the client's TLS settings and log in
//! over TLS, a wrong CA or host name stops the broker at start, client
//! certificate authentication works, and so does the store. Also MariaDB
//! with `require_secure_transport`, and the modes of the files a broker
//! creates (issue 13's process items).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use credbroker::config::Config;
use credbroker::daemon::Daemon;
use credbroker::dbtls::{self, Dialect};
use credbroker_testkit::pki::{ClientSpec, DevCa};
use credbroker_testkit::throwaway::{PostgresOptions, ServerTls, ThrowawayPostgres};

use crate::support::*;

/// The role that logs in with a client certificate (`hostssl … cert`).
const CERT_ADMIN: &str = "cb_cert_admin";
/// The only DNS name in the server's certificate (besides IP 127.0.0.1):
/// `localhost` reaches the server but is the wrong name.
const SERVER_NAME: &str = "db.credbroker.test";

struct TlsCluster {
    pg: ThrowawayPostgres,
    /// The CA that signed the server's and the client's certificates.
    ca: PathBuf,
    /// A CA that signed nothing here.
    other_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    _dir: tempfile::TempDir,
}

static TLS_CLUSTER: OnceLock<TlsCluster> = OnceLock::new();

/// A PostgreSQL with `ssl = on` whose pg_hba.conf refuses plaintext TCP:
/// started once for this file's tests (each takes its own database and
/// name prefix). Missing binaries fail with instructions, as in support/mod.rs.
fn tls_cluster() -> &'static TlsCluster {
    TLS_CLUSTER.get_or_init(|| {
        // The shared cluster's check, for the same message on missing binaries.
        assert!(
            credbroker_testkit::throwaway::postgres_binaries_present(),
            "PostgreSQL server binaries are missing: install them with `apt-get install -y postgresql`"
        );
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("credbroker test database CA").unwrap();
        let other = DevCa::generate("some other CA").unwrap();
        let server = ca
            .server_cert(&[SERVER_NAME], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
            .unwrap();
        let client = ca
            .client_cert(&ClientSpec::common_name(CERT_ADMIN))
            .unwrap();
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(path("other-ca.pem"), other.cert_pem()).unwrap();
        std::fs::write(path("client.pem"), &client.cert_pem).unwrap();
        credbroker::fsutil::write_secret_file(&path("client-key.pem"), client.key_pem.as_bytes())
            .unwrap();
        let opts = PostgresOptions {
            timezone: Some(FAR_TIMEZONE.into()),
            tls: Some(ServerTls {
                cert_pem: server.cert_pem.clone(),
                key_pem: server.key_pem.clone(),
                client_ca_pem: Some(ca.cert_pem()),
            }),
            hba: Some(vec![
                "hostnossl all all 0.0.0.0/0 reject".into(),
                "hostnossl all all ::/0 reject".into(),
                format!("hostssl all {CERT_ADMIN} 127.0.0.1/32 cert"),
                "hostssl all all 127.0.0.1/32 scram-sha-256".into(),
                "hostssl all all ::1/128 scram-sha-256".into(),
            ]),
            ..PostgresOptions::default()
        };
        let pg = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let pg = ThrowawayPostgres::start(opts).await?;
                // Over the Unix socket: pg_hba.conf refuses plaintext TCP.
                pg.connect("postgres")
                    .await?
                    .batch_execute(&format!("CREATE ROLE {CERT_ADMIN} LOGIN SUPERUSER"))
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(pg)
            })
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start the TLS throwaway PostgreSQL: {e}"));
        TlsCluster {
            pg,
            ca: path("ca.pem"),
            other_ca: path("other-ca.pem"),
            client_cert: path("client.pem"),
            client_key: path("client-key.pem"),
            _dir: dir,
        }
    })
}

/// A broker on a fresh database of the TLS cluster whose admin URL is
/// `url_of(database)`.
async fn broker_with(url_of: impl FnOnce(&str) -> String, extra_db_keys: &str) -> TestBroker {
    let c = tls_cluster();
    let b = TestBroker::prepare_on(&c.pg, &role("ro", "{db}", "1m", "10m", APP)).await;
    let plain = c.pg.url(&b.db);
    let url = url_of(&b.db);
    b.edit_config(|t| {
        assert!(t.contains(&plain), "unexpected config");
        t.replace(
            &format!("admin_url = \"{plain}\"\n"),
            &format!("admin_url = \"{url}\"\n{extra_db_keys}"),
        )
    });
    b
}

fn verify_full_url(host: &str, port: u16, db: &str, ca: &std::path::Path) -> String {
    format!(
        "postgres://postgres@{host}:{port}/{db}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    )
}

/// Opens the daemon on `b`'s config: the start-up error, if any.
async fn open(b: &TestBroker) -> Result<Daemon, credbroker::Error> {
    Daemon::open(Config::load(&b.env.config_path).unwrap()).await
}

/// Whether every session of `user` (or with `application_name = app`)
/// on the TLS cluster is encrypted, and how many there are — from
/// `pg_stat_ssl`, as the server sees them.
async fn ssl_sessions(filter: &str, value: &str) -> (i64, bool, Option<String>) {
    let c = tls_cluster().pg.connect("postgres").await.unwrap();
    let row = c
        .query_one(
            &format!(
                "SELECT count(*), coalesce(bool_and(s.ssl), false), max(s.client_dn) \
                 FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.{filter} = $1"
            ),
            &[&value],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Connects with a leased DSN exactly as the broker handed it out, TLS
/// parameters included, the way our own connections read them.
async fn connect_dsn(dsn: &str) -> Result<tokio_postgres::Client, String> {
    let (url, params) = dbtls::split_url(dsn, Dialect::Postgres)?;
    let mut cfg: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
    let (tls, mode) = dbtls::postgres_connector(&params)?;
    cfg.ssl_mode(mode).connect_timeout(Duration::from_secs(5));
    let (client, conn) = cfg.connect(tls).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test]
async fn verify_full_issues_and_the_leased_dsn_logs_in_over_tls() {
    let c = tls_cluster();
    let port = c.pg.port();
    let ca = c.ca.display().to_string();
    let mut b = broker_with(
        |db| verify_full_url("127.0.0.1", port, db, &c.ca),
        &format!("client_sslmode = \"verify-full\"\nclient_sslrootcert = \"{ca}\"\n"),
    )
    .await;
    let daemon = open(&b).await.expect("the broker starts over verify-full");
    assert!(
        !daemon
            .warnings
            .iter()
            .any(|w| w.contains("TLS") || w.contains("ssl")),
        "no TLS warning for a verified loopback connection: {:?}",
        daemon.warnings
    );
    drop(daemon);
    b.start_in_process().await;

    let lease = issue(&b, "app", "ro", 0).await.expect("issue over TLS");
    let suffix = format!("?sslmode=verify-full&sslrootcert={}", c.ca.display());
    assert!(
        lease.dsn.ends_with(&suffix),
        "the DSN tells clients to verify: {}",
        lease.dsn.replace(&lease.password, "<password>")
    );

    // The broker's own sessions are encrypted.
    let (n, all_ssl, _) = ssl_sessions("application_name", "credbroker").await;
    assert!(n >= 1 && all_ssl, "{n} broker sessions, all TLS: {all_ssl}");

    // The leased DSN, as given, logs in over TLS.
    let client = connect_dsn(&lease.dsn)
        .await
        .expect("leased login over TLS");
    let count: i64 = one_value(&client, "SELECT count(*) FROM orders", &[]).await;
    assert_eq!(count, 1);
    let (n, all_ssl, _) = ssl_sessions("usename", &lease.username).await;
    assert_eq!((n, all_ssl), (1, true), "the leased session in pg_stat_ssl");
    drop(client);

    // libpq (psql) reads the same DSN and verifies the server itself.
    let out = std::process::Command::new("psql")
        .arg(&lease.dsn)
        .args([
            "-Atc",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .env_remove("PGSSLMODE")
        .output()
        .expect("psql (PostgreSQL's client) is needed: `apt-get install -y postgresql-client`");
    assert!(
        out.status.success(),
        "psql with the leased DSN: {}",
        String::from_utf8_lossy(&out.stderr).replace(&lease.password, "<password>")
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");

    // Without TLS the server refuses the same credential: TLS is enforced,
    // not merely offered.
    let mut plain = tokio_postgres::Config::new();
    plain
        .host("127.0.0.1")
        .port(port)
        .dbname(&b.db)
        .user(&lease.username)
        .password(&lease.password)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    let err = plain
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("a plaintext login is refused");
    let msg = err.as_db_error().map(|d| d.message().to_string());
    assert!(
        msg.as_deref()
            .is_some_and(|m| m.contains("pg_hba.conf rejects") && m.contains("no encryption")),
        "{err}: {msg:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_wrong_ca_fails_at_start_naming_the_database_and_the_reason() {
    let c = tls_cluster();
    let port = c.pg.port();
    let b = broker_with(|db| verify_full_url("127.0.0.1", port, db, &c.other_ca), "").await;
    let err = open(&b).await.err().expect("a wrong CA stops the broker");
    let msg = err.to_string();
    assert!(matches!(err, credbroker::Error::Config(_)), "{msg}");
    assert!(msg.contains("database \"main\""), "{msg}");
    assert!(msg.contains("UnknownIssuer"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
}

#[tokio::test]
async fn a_wrong_host_name_fails_at_start_but_verify_ca_accepts_it() {
    let c = tls_cluster();
    let port = c.pg.port();
    // localhost reaches the server, but its certificate names only
    // db.credbroker.test and 127.0.0.1.
    let b = broker_with(|db| verify_full_url("localhost", port, db, &c.ca), "").await;
    let err = open(&b)
        .await
        .err()
        .expect("a wrong host name stops the broker");
    let msg = err.to_string();
    assert!(msg.contains("database \"main\""), "{msg}");
    assert!(msg.contains("not valid for name"), "{msg}");
    assert!(msg.contains("localhost"), "{msg}");

    // verify-ca checks the chain only: the same host is accepted.
    b.edit_config(|t| t.replace("sslmode=verify-full", "sslmode=verify-ca"));
    open(&b).await.expect("verify-ca ignores the name");
}

#[tokio::test]
async fn the_broker_authenticates_with_a_client_certificate() {
    let c = tls_cluster();
    let port = c.pg.port();
    let mut b = broker_with(
        |db| {
            format!(
                "postgres://{CERT_ADMIN}@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
                c.ca.display(),
                c.client_cert.display(),
                c.client_key.display()
            )
        },
        "",
    )
    .await;
    // No password at all: the certificate is the credential.
    b.edit_config(|t| {
        let kept: Vec<&str> = t
            .lines()
            .filter(|l| !l.starts_with("admin_password_file"))
            .collect();
        kept.join("\n") + "\n"
    });
    b.start_in_process().await;
    let lease = issue(&b, "app", "ro", 0)
        .await
        .expect("issue as the certificate's role");
    let client = connect_dsn(&lease.dsn).await.expect("leased login");
    client.query_one("SELECT 1", &[]).await.unwrap();
    let (n, all_ssl, dn) = ssl_sessions("usename", CERT_ADMIN).await;
    assert!(n >= 1 && all_ssl, "{n} sessions of {CERT_ADMIN}");
    assert!(
        dn.as_deref().is_some_and(|d| d.contains(CERT_ADMIN)),
        "the server saw our client certificate: {dn:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn the_postgres_store_works_over_tls_and_refuses_a_wrong_ca() {
    let c = tls_cluster();
    let port = c.pg.port();
    let mut b = broker_with(|db| verify_full_url("127.0.0.1", port, db, &c.ca), "").await;
    let store_db = unique("leases");
    c.pg.create_database(&store_db).await.unwrap();
    let secret = b.env.dir.join("secrets").join("store-password");
    credbroker::fsutil::write_secret_file(&secret, c.pg.superuser_password().as_bytes()).unwrap();
    let sqlite = format!("url = \"sqlite://{}\"\n", b.env.store_path.display());
    let store_url = |ca: &std::path::Path| {
        format!(
            "url = \"{}\"\npassword_file = \"{}\"\n",
            verify_full_url("127.0.0.1", port, &store_db, ca),
            secret.display()
        )
    };
    b.edit_config(|t| t.replace(&sqlite, &store_url(&c.other_ca)));
    let err = open(&b)
        .await
        .err()
        .expect("a wrong store CA stops the broker");
    let msg = err.to_string();
    assert!(msg.contains("store.url: TLS to 127.0.0.1"), "{msg}");
    assert!(msg.contains("UnknownIssuer"), "{msg}");

    b.edit_config(|t| t.replace(&store_url(&c.other_ca), &store_url(&c.ca)));
    b.start_in_process().await;
    let lease = issue(&b, "app", "ro", 0)
        .await
        .expect("issue with the store over TLS");
    let store = c.pg.connect(&store_db).await.unwrap();
    let state: String = one_value(
        &store,
        "SELECT state FROM credbroker_leases WHERE id = $1",
        &[&lease.lease_id],
    )
    .await;
    assert_eq!(state, "active");
    let (n, all_ssl, _) = ssl_sessions("application_name", "credbroker-store").await;
    assert!(n >= 1 && all_ssl, "{n} store sessions, all TLS: {all_ssl}");
    b.stop().await;
}

#[tokio::test]
async fn a_remote_database_without_tls_is_a_loud_start_up_warning() {
    // TEST-NET-1 (RFC 5737): never routed, so nothing answers; the
    // warning comes from the URL alone.
    let b = broker_with(
        |db| format!("postgres://postgres@192.0.2.1:5432/{db}?sslmode=disable"),
        "connect_timeout = \"1s\"\n",
    )
    .await;
    let daemon = open(&b)
        .await
        .expect("an unreachable database is no start-up error");
    let w = daemon.warnings.join("\n");
    assert!(
        w.contains("database \"main\": TLS is OFF to 192.0.2.1"),
        "warnings: {w}"
    );
}

/// Logs in with a leased MySQL DSN as given, TLS parameters included.
async fn mysql_login_dsn(dsn: &str) -> Result<mysql_async::Conn, String> {
    let (url, params) = dbtls::split_url(dsn, Dialect::Mysql)?;
    let opts = mysql_async::Opts::from_url(&url).map_err(|e| e.to_string())?;
    let opts = mysql_async::OptsBuilder::from_opts(opts)
        .prefer_socket(false)
        .ssl_opts(dbtls::mysql_ssl_opts(&params)?);
    mysql_async::Conn::new(opts)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn mariadb_with_require_secure_transport_over_verify_identity() {
    use mysql_async::prelude::Queryable;
    let ca = DevCa::generate("credbroker test MariaDB CA").unwrap();
    let server = ca
        .server_cert(&[SERVER_NAME], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
        .unwrap();
    let maria = credbroker_testkit::throwaway::ThrowawayMariadb::start(
        credbroker_testkit::throwaway::MariadbOptions {
            event_scheduler: true,
            tls: Some(ServerTls {
                cert_pem: server.cert_pem.clone(),
                key_pem: server.key_pem.clone(),
                client_ca_pem: None,
            }),
            require_secure_transport: true,
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!("cannot start a throwaway MariaDB: {e} (`apt-get install -y mariadb-server`)")
    });
    let schema = unique("cbt");
    let mut root = maria.connect().await.unwrap();
    root.query_drop(format!(
        "CREATE DATABASE `{schema}`; CREATE TABLE `{schema}`.orders (id INT PRIMARY KEY); \
         INSERT INTO `{schema}`.orders VALUES (1);"
    ))
    .await
    .unwrap();

    let mut b = TestBroker::prepare(&role("ro", "{db}", "1m", "10m", APP)).await;
    let ca_path = b.env.dir.join("maria-ca.pem");
    let other_ca = b.env.dir.join("other-ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    std::fs::write(&other_ca, DevCa::generate("other").unwrap().cert_pem()).unwrap();
    let section = b
        .env
        .mysql_database("maria", maria.port(), &schema, Some(maria.root_password()))
        .unwrap();
    let plain_url = format!("mysql://root@127.0.0.1:{}/{schema}", maria.port());
    let tls_url = |ca: &std::path::Path| {
        format!(
            "{plain_url}?ssl-mode=VERIFY_IDENTITY&ssl-ca={}\"\nclient_sslmode = \"verify-full\"\nclient_sslrootcert = \"{}\"\nconnect_timeout = \"2s",
            ca.display(),
            ca_path.display()
        )
    };
    let maria_role = format!(
        "[roles.mro]\ndatabase = \"maria\"\ndefault_ttl = \"1m\"\nmax_ttl = \"10m\"\n\
         allowed = [\"{APP}\"]\ngrants = [\"GRANT SELECT ON `{schema}`.orders TO {{{{name}}}}\"]\n\n"
    );
    b.edit_config(|t| t + &section.replace(&plain_url, &tls_url(&other_ca)) + &maria_role);
    let err = open(&b).await.err().expect("a wrong CA stops the broker");
    let msg = err.to_string();
    assert!(
        msg.contains("database \"maria\": TLS to 127.0.0.1"),
        "{msg}"
    );
    assert!(msg.contains("UnknownIssuer"), "{msg}");

    b.edit_config(|t| t.replace(&tls_url(&other_ca), &tls_url(&ca_path)));
    b.start_in_process().await;
    let lease = issue(&b, "app", "mro", 0)
        .await
        .expect("issue on MariaDB over TLS");
    let suffix = format!("?ssl-mode=VERIFY_IDENTITY&ssl-ca={}", ca_path.display());
    assert!(
        lease.dsn.ends_with(&suffix),
        "{}",
        lease.dsn.replace(&lease.password, "<password>")
    );
    let mut leased = mysql_login_dsn(&lease.dsn)
        .await
        .expect("leased login over TLS");
    let cipher: Option<(String, String)> = leased
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .await
        .unwrap();
    assert!(
        cipher.as_ref().is_some_and(|(_, c)| !c.is_empty()),
        "the leased session is encrypted: {cipher:?}"
    );
    let n: Option<i64> = leased
        .query_first(format!("SELECT count(*) FROM `{schema}`.orders"))
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    leased.disconnect().await.unwrap();

    // Every TCP session, the broker's included, is encrypted
    // (require_secure_transport): a plaintext login is refused.
    let plain = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(maria.port())
        .user(Some(lease.username.clone()))
        .pass(Some(lease.password.clone()))
        .prefer_socket(false);
    let err = mysql_async::Conn::new(plain)
        .await
        .expect_err("a plaintext login is refused");
    // MariaDB 10.11 answers a plaintext login under
    // require_secure_transport with "Access denied" (MySQL 8: "insecure
    // transport"); the same credentials just worked over TLS.
    let msg = err.to_string();
    assert!(
        msg.contains("Access denied") || msg.contains("insecure transport"),
        "{msg}"
    );
    b.stop().await;
}

#[tokio::test]
async fn the_audit_log_and_the_sqlite_store_are_created_0600() {
    use std::os::unix::fs::PermissionsExt;
    let mut b = TestBroker::start(&role("ro", "{db}", "1m", "10m", APP)).await;
    issue(&b, "app", "ro", 0).await.expect("issue");
    let store = b.env.store_path.display().to_string();
    for path in [
        b.env.audit_path.display().to_string(),
        store.clone(),
        format!("{store}-wal"),
    ] {
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{path}");
    }
    b.stop().await;
}

#[tokio::test]
async fn the_broker_binary_runs_without_core_dumps() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "1m", "10m", APP)).await;
    b.spawn_binary().await;
    let pid = b.child.as_ref().unwrap().id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("no core limit in {limits}"));
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    b.kill_binary();
}

#[tokio::test]
async fn credbroker_check_connects_over_tls_and_names_a_wrong_ca() {
    let c = tls_cluster();
    let port = c.pg.port();
    let b = broker_with(|db| verify_full_url("127.0.0.1", port, db, &c.ca), "").await;
    let report = |b: &TestBroker| {
        let config = Config::load(&b.env.config_path).unwrap();
        let path = b.env.config_path.clone();
        async move { credbroker::check::run(&config, &path).await.table(false) }
    };
    let good = report(&b).await;
    assert!(
        !good.contains("TLS to") && !good.contains("cannot connect"),
        "{good}"
    );
    b.edit_config(|t| {
        t.replace(
            &c.ca.display().to_string(),
            &c.other_ca.display().to_string(),
        )
    });
    let bad = report(&b).await;
    assert!(
        bad.contains("TLS to postgres@127.0.0.1") && bad.contains("UnknownIssuer"),
        "{bad}"
    );
}
