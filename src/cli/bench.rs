//! `credbroker bench`: measures the lease path against PostgreSQL's own
//! limits on a throwaway server (see `bench` in the library).
//!
//! Build with `--release`: a debug build measures the compiler, not us.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::bench::{console, lease, outside, outside_mysql, reaper, scale, scaleout};
use crate::cli::CliResult;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    what: Option<What>,
    #[command(flatten)]
    lease: LeaseArgs,
}

#[derive(clap::Subcommand)]
enum What {
    /// (a) plaintext, (b) 1-round verifier, (c) credbroker: issue + revoke
    /// (the default)
    Lease(LeaseArgs),
    /// The same four columns on a throwaway MariaDB: (a) IDENTIFIED BY
    /// plaintext, (b) by hash, (b′) credbroker's statements, (c) credbroker
    Mysql(LeaseArgs),
    /// As users meet it: a `credbroker serve` process driven from a separate
    /// client process over mTLS gRPC and the Vault API, beside (a)
    /// plaintext, (b′) the same SQL and OpenBao (when `bao` is on the PATH);
    /// PostgreSQL with fsync on
    Outside(OutsideArgs),
    /// Issue + revoke per second with 1, 2, 3 `credbroker serve` replicas
    /// on one PostgreSQL store, and the CPU of brokers, store, target and
    /// clients
    Scaleout(scaleout::Args),
    /// Many leases due at once: time until every role is gone
    Reaper(ReaperArgs),
    /// Many live leases and a million store rows: memory, restart, sweep,
    /// admin listings, reaper order, teardown
    Scale(ScaleArgs),
    /// The web console's pages over many live leases: ms per page request
    Console(ConsoleArgs),
}

#[derive(clap::Args)]
struct ConsoleArgs {
    /// Synthetic live leases in the store
    #[arg(long, default_value_t = 100_000)]
    leases: u64,
    /// Timed requests per page
    #[arg(long, default_value_t = 50)]
    requests: usize,
    /// The lease store the pages read: sqlite or postgres
    #[arg(long, default_value = "sqlite")]
    store: String,
    #[command(flatten)]
    out: Out,
}

#[derive(clap::Args, Clone)]
struct LeaseArgs {
    /// Concurrent callers, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 16, 64])]
    callers: Vec<usize>,
    /// How long each run lasts (per scenario and caller count)
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// A fixed number of leases per run instead of --duration
    #[arg(long)]
    leases: Option<u64>,
    /// Scenarios to run: a (plaintext), b (verifier), p (b′: credbroker's
    /// own SQL, no broker), c (credbroker)
    #[arg(long, value_delimiter = ',', default_values_t = vec!['a', 'b', 'p', 'c'])]
    scenarios: Vec<char>,
    /// The broker's backend pool size (default: the broker's default)
    #[arg(long)]
    pool: Option<usize>,
    /// How leased roles get privileges: member (GRANT group TO role) or
    /// table (GRANT SELECT ON table TO role; concurrent grants race on the
    /// table's ACL and are retried)
    #[arg(long, default_value = "member")]
    grant: String,
    /// Time issuance alone (roles dropped / leases revoked after the run)
    #[arg(long)]
    issue_only: bool,
    /// Run PostgreSQL with fsync and synchronous_commit on (the throwaway
    /// default is off), so (a) and (b) pay for durable commits as (c)'s
    /// lease store does
    #[arg(long)]
    pg_durable: bool,
    #[command(flatten)]
    out: Out,
}

#[derive(clap::Args, Clone)]
struct Out {
    /// Where the Markdown and JSON reports go
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct OutsideArgs {
    /// Concurrent callers, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 16])]
    callers: Vec<usize>,
    /// How long each run lasts (per column and caller count)
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// A fixed number of leases per run instead of --duration
    #[arg(long)]
    leases: Option<u64>,
    /// Columns: a (plaintext), p (b′: the same SQL), c (gRPC), v (c-v: the
    /// Vault API), o (OpenBao; needs `bao` on the PATH)
    #[arg(long, value_delimiter = ',', default_values_t = vec!['a', 'p', 'c', 'v', 'o'])]
    columns: Vec<char>,
    /// Runs of each column and caller count; the fastest is kept
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// On a throwaway MariaDB instead of PostgreSQL: columns a, p, c, v
    #[arg(long)]
    mysql: bool,
    /// The broker's `[vault_api] token_cache` (off: every Vault request
    /// reads its token from the store, to measure the cache's effect)
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    vault_token_cache: String,
    #[command(flatten)]
    out: Out,
}

#[derive(clap::Args)]
struct ReaperArgs {
    /// Leases falling due at the same instant
    #[arg(long, default_value_t = 10_000)]
    leases: u64,
    /// Concurrent callers while issuing them
    #[arg(long, default_value_t = 32)]
    callers: usize,
    /// Reaper batch size (default: the broker's default)
    #[arg(long)]
    batch_size: Option<usize>,
    /// The broker's backend pool size (default: the broker's default)
    #[arg(long)]
    pool: Option<usize>,
    #[command(flatten)]
    out: Out,
}

#[derive(clap::Args)]
struct ScaleArgs {
    /// Live leases with real roles (0 skips this part)
    #[arg(long, default_value_t = 100_000)]
    live: u64,
    /// Synthetic store rows (0 skips this part)
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Concurrent callers while issuing the live leases
    #[arg(long, default_value_t = 32)]
    callers: usize,
    #[command(flatten)]
    out: Out,
}

pub async fn run(args: Args) -> CliResult {
    match args.what {
        None => lease_bench(args.lease, false).await?,
        Some(What::Lease(a)) => lease_bench(a, false).await?,
        Some(What::Mysql(a)) => lease_bench(a, true).await?,
        Some(What::Outside(a)) => {
            let columns = a
                .columns
                .iter()
                .map(|c| {
                    outside::Column::parse(&c.to_string()).ok_or_else(|| {
                        credbroker::Error::config(format!(
                            "--columns: unknown {c:?}; use a, p, c, v, o"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if a.callers.is_empty() || a.callers.contains(&0) {
                return Err(
                    credbroker::Error::config("--callers: give counts of at least 1").into(),
                );
            }
            let opts = outside::Options {
                callers: a.callers,
                duration: a.duration,
                leases: a.leases,
                columns,
                rounds: a.rounds.max(1),
                out_dir: a.out.out,
                vault_token_cache: a.vault_token_cache == "on",
            };
            if a.mysql {
                let report = outside_mysql::run(&opts)
                    .await
                    .context("outside benchmark on MariaDB")?;
                let markdown = outside_mysql::markdown(&report);
                publish(&opts.out_dir, "outside-mysql", &markdown, &report)?;
            } else {
                let report = outside::run(&opts).await.context("outside benchmark")?;
                publish(&opts.out_dir, "outside", &report.markdown(), &report)?;
            }
        }
        Some(What::Scaleout(a)) => {
            let report = scaleout::run(&a).await.context("scale-out benchmark")?;
            publish(&a.out, "scaleout", &report.markdown(), &report)?;
        }
        Some(What::Reaper(a)) => {
            let opts = reaper::Options {
                leases: a.leases,
                callers: a.callers,
                batch_size: a.batch_size,
                pool: a.pool,
                out_dir: a.out.out,
            };
            let report = reaper::run(&opts).await.context("reaper benchmark")?;
            publish(&opts.out_dir, "reaper", &report.markdown(), &report)?;
        }
        Some(What::Scale(a)) => {
            let opts = scale::Options {
                live: a.live,
                rows: a.rows,
                callers: a.callers,
                out_dir: a.out.out,
            };
            let report = scale::run(&opts).await.context("scale benchmark")?;
            publish(&opts.out_dir, "scale", &report.markdown(), &report)?;
        }
        Some(What::Console(a)) => {
            if a.requests == 0 {
                return Err(credbroker::Error::config("--requests: at least 1").into());
            }
            let store = console::StoreKind::parse(&a.store).ok_or_else(|| {
                credbroker::Error::config(format!("--store {:?}: use sqlite or postgres", a.store))
            })?;
            let opts = console::Options {
                leases: a.leases,
                store,
                requests: a.requests,
                out_dir: a.out.out,
            };
            let report = console::run(&opts).await.context("console benchmark")?;
            publish(&opts.out_dir, "console", &report.markdown(), &report)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `credbroker bench-client`: see `bench::client`.
pub async fn client() -> CliResult {
    crate::bench::client::run().await?;
    Ok(ExitCode::SUCCESS)
}

async fn lease_bench(a: LeaseArgs, mysql: bool) -> anyhow::Result<()> {
    let scenarios = a
        .scenarios
        .iter()
        .map(|c| {
            lease::Scenario::parse(&c.to_string()).ok_or_else(|| {
                credbroker::Error::config(format!("--scenarios: unknown {c:?}; use a, b, p, c"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if a.callers.is_empty() || a.callers.contains(&0) {
        return Err(credbroker::Error::config("--callers: give counts of at least 1").into());
    }
    let grant = crate::bench::setup::Grant::parse(&a.grant).ok_or_else(|| {
        credbroker::Error::config(format!("--grant {:?}: use member or table", a.grant))
    })?;
    let opts = lease::Options {
        grant,
        issue_only: a.issue_only,
        pg_durable: a.pg_durable,
        callers: a.callers,
        duration: a.duration,
        leases: a.leases,
        scenarios,
        pool: a.pool,
        out_dir: a.out.out,
    };
    if mysql && (opts.issue_only || opts.pg_durable || a.grant != "member") {
        return Err(credbroker::Error::Config(
            "bench mysql: --issue-only, --pg-durable and --grant are PostgreSQL options".into(),
        )
        .into());
    }
    let report = if mysql {
        crate::bench::mysql::run(&opts)
            .await
            .context("MySQL lease benchmark")?
    } else {
        lease::run(&opts).await.context("lease benchmark")?
    };
    publish(&opts.out_dir, report.file, &report.markdown(), &report)
}

/// A bench's report written into `dir` as `name.md` and `name.json`, and
/// printed with where it went.
fn publish(
    dir: &Path,
    name: &str,
    markdown: &str,
    json: &impl serde::Serialize,
) -> anyhow::Result<()> {
    crate::bench::write_report(dir, name, markdown, json)?;
    println!("{markdown}");
    println!(
        "written: {}/{name}.md, {}/{name}.json",
        dir.display(),
        dir.display()
    );
    Ok(())
}
