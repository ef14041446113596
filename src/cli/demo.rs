//! `credbroker demo`: the whole path on this machine, narrated. Starts a
//! throwaway PostgreSQL that checks passwords, makes dev certificates,
//! starts the broker in-process, leases a credential, uses it, revokes it,
//! shows the login now fails, checks the audit chain, and cleans up. Where
//! MariaDB server binaries are installed, it does the same on a throwaway
//! MariaDB, failsafe event included.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::cli::CliResult;
use credbroker::config::Config;
use credbroker::daemon::{Daemon, Listeners};
use credbroker::pb;
use credbroker_testkit::devenv::DevEnv;
use credbroker_testkit::throwaway::{
    mariadb_binaries_present, postgres_binaries_present, MariadbOptions, PostgresOptions,
    ThrowawayMariadb, ThrowawayPostgres,
};
use mysql_async::prelude::Queryable;

#[derive(clap::Args)]
pub struct Args {
    /// Keep the demo's directory (config, certificates, audit log) afterwards
    #[arg(long)]
    keep: bool,
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

pub async fn run(args: Args) -> CliResult {
    demo(args).await?;
    Ok(ExitCode::SUCCESS)
}

async fn demo(args: Args) -> anyhow::Result<()> {
    if !postgres_binaries_present() {
        anyhow::bail!(
            "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin); \
             install them with `apt-get install -y postgresql`"
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("credbroker-demo-")
        .tempdir()?;
    let dir = if args.keep {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };

    step(
        1,
        "starting a throwaway PostgreSQL 15 that checks passwords (scram-sha-256)",
    );
    let pg = ThrowawayPostgres::start(PostgresOptions::default())
        .await
        .context("throwaway PostgreSQL")?;
    pg.create_database("shop").await?;
    let owner = pg.connect("shop").await?;
    owner
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, item text);
             INSERT INTO orders VALUES (1, 'coffee'), (2, 'tea');
             CREATE TABLE payroll (name text, salary int);",
        )
        .await?;
    println!(
        "    postgres at {}:{}, database \"shop\" with tables orders and payroll",
        pg.host(),
        pg.port()
    );

    let maria = if mariadb_binaries_present() {
        println!("    and a throwaway MariaDB 10.11 (event scheduler on, for the failsafe events)");
        let db = ThrowawayMariadb::start(MariadbOptions {
            event_scheduler: true,
            ..MariadbOptions::default()
        })
        .await
        .context("throwaway MariaDB")?;
        let mut root = db.connect().await?;
        root.query_drop(
            "CREATE DATABASE shop;
             CREATE TABLE shop.orders (id INT PRIMARY KEY, item TEXT);
             INSERT INTO shop.orders VALUES (1, 'coffee'), (2, 'tea');
             CREATE TABLE shop.payroll (name TEXT, salary INT);",
        )
        .await?;
        root.disconnect().await?;
        println!(
            "    mariadb at {}:{}, database \"shop\" with tables orders and payroll",
            db.host(),
            db.port()
        );
        Some(db)
    } else {
        println!(
            "    (MariaDB server binaries not found: the MySQL part is left out; \
             `apt-get install -y mariadb-server` to see it)"
        );
        None
    };

    step(
        2,
        "making dev certificates (CA, server, SPIFFE client identities)",
    );
    let env = DevEnv::create(&dir)?;
    println!("    {}", env.pki.display());

    step(3, "starting the broker (mTLS gRPC on a free port)");
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("https://127.0.0.1:{}", grpc.local_addr()?.port());
    let mut text = env.config_head(&grpc.local_addr()?.to_string(), None);
    text.push_str(&env.pg_database("shop", &pg, "shop")?);
    text.push_str(
        "[roles.shop-readonly]\ndatabase = \"shop\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\n\
         allowed = [\"spiffe://credbroker.dev/ns/demo/*\"]\n\
         grants = [\"GRANT SELECT ON orders TO {{name}}\"]\n\n",
    );
    if let Some(db) = &maria {
        text.push_str(&env.mysql_database(
            "shop-mysql",
            db.port(),
            "shop",
            Some(db.root_password()),
        )?);
        text.push_str(
            "[roles.shop-mysql-readonly]\ndatabase = \"shop-mysql\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\n\
             allowed = [\"spiffe://credbroker.dev/ns/demo/*\"]\n\
             host = \"127.0.0.1\"\n\
             grants = [\"GRANT SELECT ON shop.orders TO {{name}}\"]\n",
        );
    }
    std::fs::write(&env.config_path, &text)?;
    let config = Config::load(&env.config_path)?;
    let daemon = Daemon::open(config).await?;
    for w in &daemon.warnings {
        println!("    WARNING: {w}");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(daemon.run(Listeners::grpc_only(grpc), async {
        let _ = stop_rx.await;
    }));
    println!("    {addr}, config {}", env.config_path.display());

    step(
        4,
        "leasing role shop-readonly as spiffe://credbroker.dev/ns/demo/app (ttl 2m)",
    );
    let client = env.client(&addr, "app");
    let mut broker = client.broker()?;
    let lease = issue(&mut broker, "shop-readonly").await?;
    println!(
        "    password ({} characters, shown only to the caller)",
        lease.password.len()
    );
    println!(
        "    expires  {}",
        crate::cli::lease::rfc3339(&lease.expires_at)
    );

    step(5, "connecting to PostgreSQL AS the leased credential");
    let mut cfg = pg.config("shop");
    cfg.user(&lease.username).password(&lease.password);
    let (as_lease, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .context("login with the leased credential")?;
    let conn_task = tokio::spawn(conn);
    let row = as_lease
        .query_one(
            "SELECT current_user::text, (SELECT count(*) FROM orders)",
            &[],
        )
        .await?;
    println!(
        "    current_user = {}, orders visible = {}",
        row.get::<_, String>(0),
        row.get::<_, i64>(1)
    );
    match as_lease.query("SELECT * FROM payroll", &[]).await {
        Err(e) => println!("    SELECT * FROM payroll -> refused: {}", db_message(&e)),
        Ok(_) => anyhow::bail!("the leased role could read payroll: grants are not applied"),
    }

    step(
        6,
        "revoking the lease: the open session is cut, the role dropped",
    );
    revoke(&mut broker, &lease.lease_id).await?;
    match as_lease.query_one("SELECT 1", &[]).await {
        Err(e) => println!("    the open session's next query -> {}", db_message(&e)),
        Ok(_) => anyhow::bail!("the revoked role's session still runs queries"),
    }
    let _ = conn_task.await;
    match cfg.connect(tokio_postgres::NoTls).await {
        Err(e) => println!("    a new login -> refused: {}", db_message(&e)),
        Ok(_) => anyhow::bail!("the revoked credential still logs in"),
    }

    if let Some(db) = &maria {
        step(
            7,
            "the same on MariaDB: role shop-mysql-readonly (user pinned to host 127.0.0.1)",
        );
        mysql_part(&mut broker, db).await?;
    }

    step(8, "checking the audit trail and the server log");
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .context("broker shutdown")???;
    match credbroker::audit::verify(&env.audit_path)? {
        credbroker::audit::Verdict::Intact { records, .. } => {
            println!(
                "    audit log {}: {records} records, hash chain intact",
                env.audit_path.display()
            )
        }
        credbroker::audit::Verdict::Broken { line, reason, .. } => {
            anyhow::bail!("audit chain broken at line {line}: {reason}")
        }
    }
    let log = pg.read_log()?;
    if log.contains(&lease.password) {
        anyhow::bail!("the password appears in PostgreSQL's statement log");
    }
    println!("    PostgreSQL statement log (log_statement=all): the password appears 0 times");

    drop(owner);
    drop(pg);
    drop(maria);
    println!(
        "\ndone: throwaway databases stopped{}",
        if args.keep {
            format!("; files kept in {}", dir.display())
        } else {
            ", files removed".into()
        }
    );
    Ok(())
}

/// Leases `role` for two minutes and prints what a caller is told.
async fn issue(
    broker: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    role: &str,
) -> anyhow::Result<pb::Lease> {
    let lease = broker
        .issue_lease(pb::IssueLeaseRequest {
            role: role.into(),
            ttl_seconds: 120,
        })
        .await
        .map_err(|s| anyhow::anyhow!("issue: {}", credbroker::client::describe(&s)))?
        .into_inner();
    println!("    lease    {}", lease.lease_id);
    println!("    username {}", lease.username);
    Ok(lease)
}

/// Revokes the lease through the holder's door, as an application would.
async fn revoke(
    broker: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    lease_id: &str,
) -> anyhow::Result<()> {
    broker
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease_id.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("revoke: {}", credbroker::client::describe(&s)))?;
    Ok(())
}

/// Leases a MariaDB user, uses it, shows its failsafe event, revokes it.
async fn mysql_part(
    broker: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    db: &ThrowawayMariadb,
) -> anyhow::Result<()> {
    let lease = issue(broker, "shop-mysql-readonly").await?;
    let mut root = db.connect().await?;
    let (plugin, hash_len): (String, u64) = root
        .exec_first(
            "SELECT plugin, LENGTH(authentication_string) FROM mysql.user WHERE User = ?",
            (&lease.username,),
        )
        .await?
        .context("the leased user does not exist")?;
    println!(
        "    created as '{}'@'127.0.0.1' IDENTIFIED BY PASSWORD '<{hash_len}-character {plugin} hash>': \
         the plaintext never reached the server",
        lease.username
    );
    let failsafe: Option<String> = root
        .exec_first(
            "SELECT CAST(EXECUTE_AT AS CHAR) FROM information_schema.EVENTS \
             WHERE EVENT_SCHEMA = 'credbroker' AND EVENT_NAME = ?",
            (&lease.username,),
        )
        .await?;
    match failsafe {
        Some(at) => println!(
            "    failsafe event credbroker.{} locks (and drops) the user at {at} (server time) even if the broker dies",
            lease.username
        ),
        None => println!("    WARNING: no failsafe event: the user has no database-side expiry"),
    }
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(db.host())
        .tcp_port(db.port())
        .user(Some(lease.username.clone()))
        .pass(Some(lease.password.clone()))
        .db_name(Some("shop"))
        .prefer_socket(false);
    let mut as_lease = mysql_async::Conn::new(opts.clone())
        .await
        .context("login with the leased MariaDB credential")?;
    let (user, orders): (String, u64) = as_lease
        .query_first("SELECT CURRENT_USER(), (SELECT COUNT(*) FROM orders)")
        .await?
        .context("no row")?;
    println!("    CURRENT_USER() = {user}, orders visible = {orders}");
    match as_lease.query_drop("SELECT * FROM payroll").await {
        Err(e) => println!(
            "    SELECT * FROM payroll -> refused: {}",
            mysql_message(&e)
        ),
        Ok(()) => anyhow::bail!("the leased MariaDB user could read payroll"),
    }
    revoke(broker, &lease.lease_id).await?;
    println!(
        "    revoked: ACCOUNT LOCK, KILL of its sessions, DEFINERs moved, DROP USER, failsafe event dropped"
    );
    match as_lease.query_drop("SELECT 1").await {
        Err(e) => println!("    the open session's next query -> {}", mysql_message(&e)),
        Ok(()) => anyhow::bail!("the revoked MariaDB user's session still runs queries"),
    }
    match mysql_async::Conn::new(opts).await {
        Err(e) => println!("    a new login -> refused: {}", mysql_message(&e)),
        Ok(_) => anyhow::bail!("the revoked MariaDB credential still logs in"),
    }
    root.disconnect().await?;
    Ok(())
}

fn mysql_message(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => s.message.clone(),
        // The driver nests "Input/output error: …" twice; the innermost
        // cause is what a person wants to read.
        other => {
            let mut cause: &dyn std::error::Error = other;
            while let Some(next) = cause.source() {
                cause = next;
            }
            cause.to_string()
        }
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}
