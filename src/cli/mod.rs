//! The `credbroker` command line: parse arguments, call the library, print.
//! One file per subcommand.

mod access;
mod admin;
mod audit;
mod bench;
mod check;
mod demo;
mod lease;
mod pki;
mod serve;
mod sidecar;
mod store;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for a bad config or command line (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "credbroker",
    version,
    about = "Short-lived, audited database credentials over mTLS"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text
    #[arg(long, global = true, env = "CREDBROKER_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker
    Serve(serve::Args),
    /// Check a configuration and everything it names: certificates, the
    /// lease store, every database and the admin's privileges there (exit
    /// 0: ok, 1: a check failed, 64: config unreadable)
    Check(check::Args),
    /// Issue, renew, revoke or look up a lease (as a service would)
    #[command(subcommand)]
    Lease(lease::Command),
    /// List and revoke leases, lock and unlock identities, roles and
    /// databases, show and rotate static roles, rotate the database admin
    /// passwords (admin identities only)
    #[command(subcommand)]
    Admin(admin::Command),
    /// Just-in-time database access for people: request, approve, revoke
    #[command(subcommand)]
    Access(access::Command),
    /// Keep a credential file fresh for an application: issue, renew,
    /// re-issue before the hard limit, notify, revoke after a grace period
    Sidecar(sidecar::Args),
    /// Check an audit log's hash chain
    #[command(subcommand)]
    Audit(audit::Command),
    /// Move the lease store: copy its live leases, locks, tokens and static
    /// roles into an empty PostgreSQL store (brokers stopped)
    #[command(subcommand)]
    Store(store::Command),
    /// Make development certificates
    #[command(subcommand)]
    Pki(pki::Command),
    /// Everything end to end on this machine: throwaway PostgreSQL, broker,
    /// a lease used and revoked
    Demo(demo::Args),
    /// Measure issue/revoke against PostgreSQL's own limits, the reaper and
    /// scale, on a throwaway server
    Bench(bench::Args),
    /// The load of `bench outside`, in a process of its own (started by
    /// the bench, spoken to on stdin/stdout)
    #[command(hide = true)]
    BenchClient,
    /// Print a shell completion script (e.g. `credbroker completions bash >
    /// /etc/bash_completion.d/credbroker`)
    Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
        /// Nothing logs here: the global flag, hidden (a subcommand's own
        /// arg is not replaced by the global of the same name)
        #[arg(long = "log-json", id = "log_json", hide = true)]
        _log_json: bool,
    },
    /// Print the man page (roff) for `credbroker`, e.g. `credbroker man |
    /// man -l -`
    Man {
        /// Nothing logs here: the global flag, hidden
        #[arg(long = "log-json", id = "log_json", hide = true)]
        _log_json: bool,
    },
}

/// Errors that decide the exit code.
pub(crate) enum Failure {
    /// Bad config or arguments: exit 64.
    Usage(anyhow::Error),
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let e: anyhow::Error = e.into();
        match e.downcast_ref::<credbroker::Error>() {
            Some(credbroker::Error::Config(_)) => Failure::Usage(e),
            _ => Failure::Other(e),
        }
    }
}

pub(crate) type CliResult = Result<ExitCode, Failure>;

/// The clap definition (completions and the man page come from it).
fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// The man page: one page, so its command list names `credbroker serve`
/// and the others as commands of this page (clap_mangen would point to
/// `credbroker-serve(1)` pages that do not exist).
fn man_page(w: &mut dyn std::io::Write) -> std::io::Result<()> {
    let cmd = command();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    let esc = |t: &str| t.replace('\\', "\\e").replace('-', "\\-");
    writeln!(w, ".SH COMMANDS")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        writeln!(w, ".TP\n\\fBcredbroker {}\\fR", esc(sub.get_name()))?;
        if let Some(about) = sub.get_about() {
            for line in about.to_string().lines() {
                writeln!(w, "{}", esc(line.trim_start_matches(['.', '\''])))?;
            }
        }
    }
    writeln!(
        w,
        ".PP\nEach command's flags: \\fBcredbroker COMMAND \\-\\-help\\fR."
    )?;
    man.render_version_section(w)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(
        cli.log_json,
        matches!(cli.command, Command::Serve(_) | Command::Sidecar(_)),
        matches!(cli.command, Command::Bench(_)),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => serve::run(a).await,
            Command::Check(a) => check::run(a).await,
            Command::Lease(c) => lease::run(c).await,
            Command::Admin(c) => admin::run(c).await,
            Command::Access(c) => access::run(c).await,
            Command::Sidecar(a) => sidecar::run(a).await,
            Command::Audit(c) => audit::run(c),
            Command::Store(c) => store::run(c).await,
            Command::Pki(c) => pki::run(c),
            Command::Demo(a) => demo::run(a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::BenchClient => bench::client().await,
            Command::Completions { shell, .. } => {
                let mut cmd = command();
                clap_complete::generate(shell, &mut cmd, "credbroker", &mut std::io::stdout());
                Ok(ExitCode::SUCCESS)
            }
            Command::Man { .. } => {
                man_page(&mut std::io::stdout()).map_err(anyhow::Error::from)?;
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    // Background tasks (pools, the reaper) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(Failure::Usage(e)) => {
            // A bad flag (`--ca FILE: not found`) is not a config-file
            // problem: no "config:" in front of it.
            match e.downcast_ref::<credbroker::Error>() {
                Some(credbroker::Error::Config(m)) if m.starts_with("--") => {
                    eprintln!("error: {m}")
                }
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr. Client commands log warnings only unless RUST_LOG
/// says otherwise, so their stdout stays parseable; the long-running ones
/// (serve, sidecar) log at info. The bench adds the layer that sums the
/// lease path's step spans (bench/steps.rs), behind a filter of its own:
/// the log's filter stays what RUST_LOG says, and every other command
/// leaves the step spans disabled at their callsites.
fn init_logging(json: bool, server: bool, bench: bool) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let default = if server { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(use_color(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let log = if json {
        log.json().boxed()
    } else {
        log.boxed()
    };
    let steps = bench.then(|| crate::bench::steps::StepTimes::default().filtered());
    tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(steps)
        .init();
}

/// ANSI colours only for a terminal, and never when `NO_COLOR` is set
/// (<https://no-color.org>): logs written to files and pipes stay plain.
pub(crate) fn use_color(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A gRPC failure as a CLI error: code and message, or for a connection
/// that failed, where and why (`ClientOpts::explain`).
pub(crate) fn grpc_error(
    what: &str,
    client: &credbroker::client::ClientOpts,
    status: tonic::Status,
) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", client.explain(&status))
}

/// A `--ttl`/`--for` flag in whole seconds; 0 (the server's default) when
/// not given.
pub(crate) fn secs(d: Option<humantime::Duration>) -> i64 {
    d.map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// What a gRPC call answered, or the failure that names `what` and
/// explains the status (`grpc_error`).
pub(crate) async fn answered<T>(
    client: &credbroker::client::ClientOpts,
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Failure> {
    Ok(call
        .await
        .map_err(|s| grpc_error(what, client, s))?
        .into_inner())
}
