//! `credbroker demo`: the whole path on this machine, narrated. Starts a
//! throwaway PostgreSQL that checks passwords, makes dev certificates,
//! starts the broker in-process, leases a credential, uses it, revokes it,
//! shows the login now fails, checks the audit chain, and cleans up.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::cli::CliResult;
use crate::config::Config;
use crate::daemon::{Daemon, Listeners};
use crate::devenv::DevEnv;
use crate::pb;
use crate::throwaway::{postgres_binaries_present, PostgresOptions, ThrowawayPostgres};

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
         grants = [\"GRANT SELECT ON orders TO {{name}}\"]\n",
    );
    std::fs::write(&env.config_path, &text)?;
    let config = Config::load(&env.config_path)?;
    let daemon = Daemon::open(config).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(daemon.run(
        Listeners {
            grpc,
            metrics: None,
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    println!("    {addr}, config {}", env.config_path.display());

    step(
        4,
        "leasing role shop-readonly as spiffe://credbroker.dev/ns/demo/app (ttl 2m)",
    );
    let client = env.client(&addr, "app");
    let mut broker = client.broker()?;
    let lease = broker
        .issue_lease(pb::IssueLeaseRequest {
            role: "shop-readonly".into(),
            ttl_seconds: 120,
        })
        .await
        .map_err(|s| anyhow::anyhow!("issue: {}", crate::client::describe(&s)))?
        .into_inner();
    println!("    lease    {}", lease.lease_id);
    println!("    username {}", lease.username);
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
    broker
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("revoke: {}", crate::client::describe(&s)))?;
    match as_lease.query_one("SELECT 1", &[]).await {
        Err(e) => println!("    the open session's next query -> {}", db_message(&e)),
        Ok(_) => anyhow::bail!("the revoked role's session still runs queries"),
    }
    let _ = conn_task.await;
    match cfg.connect(tokio_postgres::NoTls).await {
        Err(e) => println!("    a new login -> refused: {}", db_message(&e)),
        Ok(_) => anyhow::bail!("the revoked credential still logs in"),
    }

    step(7, "checking the audit trail and the server log");
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .context("broker shutdown")???;
    match crate::audit::verify(&env.audit_path)? {
        crate::audit::Verdict::Intact { records, .. } => {
            println!(
                "    audit log {}: {records} records, hash chain intact",
                env.audit_path.display()
            )
        }
        crate::audit::Verdict::Broken { line, reason } => {
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
    println!(
        "\ndone: throwaway PostgreSQL stopped{}",
        if args.keep {
            format!("; files kept in {}", dir.display())
        } else {
            ", files removed".into()
        }
    );
    Ok(())
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}
