//! `credbroker store migrate --config FILE --to URL`: the configured
//! store's live rows copied into an empty PostgreSQL store
//! (`store::migrate`), with the brokers stopped; then the operator points
//! `store.url` at the target.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::CliResult;
use credbroker::audit::{AuditLog, Event, Outcome};
use credbroker::config::{Config, SecretSource, StoreUrl};
use credbroker::error::Error;
use credbroker::store::postgres::PostgresStore;
use credbroker::store::sqlite::SqliteStore;
use credbroker::store::{migrate, Store};

/// The `application_name` of the migration's own sessions, so the
/// brokers' are told from them.
const SESSION_NAME: &str = "credbroker-store-migrate";

#[derive(clap::Subcommand)]
pub enum Command {
    /// Copy every live lease, lock, Vault-API token and static role (still
    /// sealed) from the configured store into an empty PostgreSQL store,
    /// with every broker on the source stopped; the source is only read
    Migrate(MigrateArgs),
}

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// Broker configuration (TOML) whose `[store]` is the source and
    /// whose `[audit]` log records the move
    #[arg(long, short, env = "CREDBROKER_CONFIG")]
    config: PathBuf,
    /// The target store, as `store.url` takes it (`postgres://user@host/db`
    /// or libpq words), without a password
    #[arg(long, value_name = "URL")]
    to: String,
    /// A file holding the target's password (what `store.password_file`
    /// will name afterwards); without it, libpq's own means (`.pgpass`, a
    /// server that asks for none)
    #[arg(long, value_name = "FILE")]
    to_password_file: Option<PathBuf>,
}

pub async fn run(cmd: Command) -> CliResult {
    let Command::Migrate(args) = cmd;
    migrate_store(args).await
}

/// A `--to` problem as a usage error that names the flag, not the config.
fn to_err(e: Error) -> Error {
    let msg = match &e {
        Error::Config(d) => d.to_string(),
        other => other.to_string(),
    };
    Error::config(format!(
        "--to: {}",
        msg.trim_start_matches("store.url: ")
            .trim_start_matches("store.url ")
            .replace(
                "use store.password_file or store.password_env",
                "give it in a file with --to-password-file"
            )
    ))
}

async fn migrate_store(args: MigrateArgs) -> CliResult {
    let config = Config::load(&args.config)?;
    let cwd = std::env::current_dir().map_err(|e| Error::config(format!("--to: {e}")))?;
    let target_url =
        match StoreUrl::parse(&args.to, &cwd).map_err(to_err)? {
            StoreUrl::Postgres(u) => u,
            StoreUrl::Sqlite(_) => return Err(Error::config(
                "--to: the target must be a PostgreSQL store (postgres://… or host=… dbname=…); \
                 SQLite serves one broker, which is what the source already is",
            )
            .into()),
        };
    if config.store.url == StoreUrl::Postgres(target_url.clone()) {
        return Err(Error::config("--to: is the configured store itself").into());
    }
    let to_password = match &args.to_password_file {
        Some(p) => {
            if !p.is_file() {
                return Err(Error::config(format!(
                    "--to-password-file {}: not a readable file",
                    p.display()
                ))
                .into());
            }
            SecretSource::File(p.clone())
        }
        None => SecretSource::None,
    };

    let (source, source_label) = open_source(&config).await?;
    let target = PostgresStore::open_as(&target_url, &to_password, SESSION_NAME)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the target store: {e}; nothing was written"))?;
    let target: &dyn Store = &target;
    migrate::ensure_empty(target).await?;
    // Opened before the copy: an audit log we cannot write stops the move
    // before a row is written.
    let audit = AuditLog::open(&config.audit.path, config.audit.fsync)?
        .with_rotation(config.audit.rotate_size);

    let moved = migrate::copy_all(source.as_ref(), target).await?;
    let target_label = pg_label(&target_url);
    let mut event = Event::new("credbroker:system", "store_migrated");
    event.outcome = Some(Outcome::Ok);
    event.detail = Some(format!(
        "from {source_label} to {target_label}: {}",
        migrate::summary(&moved)
    ));
    audit.append(event)?;

    println!("copied from {source_label} to {target_label}:");
    for m in &moved {
        println!(
            "  {:<18} {:>8}  (target holds {})",
            m.kind, m.copied, m.in_target
        );
    }
    println!(
        "audit: store_migrated appended to {}",
        config.audit.path.display()
    );
    println!();
    println!("Now, in {}:", args.config.display());
    println!("  [store]");
    println!("  url = {:?}", args.to);
    match &args.to_password_file {
        Some(p) => println!("  password_file = {:?}", absolute(p).display().to_string()),
        None => println!("  # no password_file: the target asked for none"),
    }
    println!("and start the brokers on it. Do not start a broker on the old store again:");
    if let StoreUrl::Sqlite(p) = &config.store.url {
        println!(
            "its leases now live in the new one (two brokers would revoke the same users). \
             Move it aside: mv {} {}.migrated",
            p.display(),
            p.display()
        );
    } else {
        println!("its leases now live in the new one (two brokers would revoke the same users).");
    }
    Ok(ExitCode::SUCCESS)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `postgres host:port,…/db`: where, never who or how (no password is in
/// a store URL anyway).
fn pg_label(url: &str) -> String {
    match credbroker::connstr::parse(url) {
        Ok(c) => format!(
            "postgres {}/{}",
            c.hosts_label(),
            c.dbname.as_deref().unwrap_or("")
        ),
        Err(_) => "postgres".to_string(),
    }
}

/// The configured store, opened so that no broker serves it while the
/// copy runs, or a refusal that says which broker is in the way.
async fn open_source(config: &Config) -> Result<(Box<dyn Store>, String), anyhow::Error> {
    match &config.store.url {
        StoreUrl::Sqlite(path) => {
            if !path.is_file() {
                return Err(anyhow::anyhow!(
                    "the source store {} does not exist; nothing to migrate",
                    path.display()
                ));
            }
            // The broker's own lock on `<file>.lock`: refused while a
            // broker serves the file, and held by us until we exit, so
            // none starts on it mid-copy.
            let store = SqliteStore::open(path)
                .await
                .map_err(|e| anyhow::anyhow!("refused: {e}; nothing was written"))?;
            Ok((Box::new(store), format!("sqlite {}", path.display())))
        }
        StoreUrl::Postgres(url) => {
            let store = PostgresStore::open_as(url, &config.store.password, SESSION_NAME)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open the source store: {e}"))?;
            // Replicas share a PostgreSQL store and hold no lock on it; a
            // running one shows as a session (its pool, its event relay).
            let sessions = store.broker_sessions(SESSION_NAME).await?;
            if !sessions.is_empty() {
                return Err(anyhow::anyhow!(
                    "refused: brokers are connected to the source store ({}); stop every replica \
                     first (a replica cut off from the store is not seen here: stop those too); \
                     nothing was written",
                    sessions.join(", ")
                ));
            }
            Ok((Box::new(store), pg_label(url)))
        }
    }
}
