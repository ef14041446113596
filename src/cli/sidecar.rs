//! `credbroker sidecar`: keep a credential file fresh next to an application.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::CliResult;
use credbroker::client::ClientOpts;
use credbroker::sidecar::notify::Notify;
use credbroker::sidecar::render::Format;
use credbroker::sidecar::Options;

#[derive(clap::Args)]
pub struct Args {
    /// Role to lease
    #[arg(
        long,
        env = "CREDBROKER_ROLE",
        required_unless_present = "static_role",
        conflicts_with = "static_role"
    )]
    role: Option<String>,
    /// Static role to keep the credential of (an existing user whose
    /// password the broker rotates): re-read after each rotation, the app
    /// notified; nothing to renew or revoke
    #[arg(long, env = "CREDBROKER_STATIC_ROLE", conflicts_with_all = ["ttl", "grace"])]
    static_role: Option<String>,
    /// File to keep the credential in (written atomically, mode 0600)
    #[arg(long, env = "CREDBROKER_OUT")]
    out: PathBuf,
    /// dsn (libpq/mysql URI), kv (libpq key=value), jdbc, env, json, or
    /// template:FILE with {{username}} {{password}} {{host}} {{port}}
    /// {{database}} {{dsn}} {{expires_at}} {{lease_id}}
    #[arg(long, env = "CREDBROKER_FORMAT", default_value = "dsn")]
    format: String,
    /// Shell command run once per new credential (env: CREDBROKER_LEASE_ID,
    /// CREDBROKER_USERNAME, CREDBROKER_EXPIRES_AT, CREDBROKER_FILE)
    #[arg(long, conflicts_with = "signal")]
    exec: Option<String>,
    /// Signal a process once per new credential: PID:SIG or PIDFILE:SIG,
    /// e.g. /run/app.pid:HUP
    #[arg(long)]
    signal: Option<String>,
    /// Lease lifetime to ask for, e.g. 10m (default: the role's default_ttl)
    #[arg(long)]
    ttl: Option<humantime::Duration>,
    /// Write one credential and exit; the lease expires on its own
    #[arg(long)]
    once: bool,
    /// Leave the file in place on shutdown
    #[arg(long)]
    keep: bool,
    /// How long an old lease stays valid after its replacement is written;
    /// then it is handed over: logins refused, its sessions drained (ended
    /// as they go idle, busy ones at the broker's drain deadline)
    #[arg(long, default_value = "30s")]
    grace: humantime::Duration,
    /// Exit with an error after holding no valid credential for this long
    #[arg(long, default_value = "60s")]
    give_up_after: humantime::Duration,
    #[command(flatten)]
    client: ClientOpts,
}

pub async fn run(args: Args) -> CliResult {
    // Before any secret is read: a core dump would hold them all.
    if let Err(e) = credbroker::hardening::disable_core_dumps() {
        eprintln!("credbroker: WARNING: cannot turn core dumps off: {e}");
    }
    let notify = match (&args.exec, &args.signal) {
        (Some(cmd), _) => Notify::Exec(cmd.clone()),
        (None, Some(s)) => Notify::parse_signal(s)?,
        (None, None) => Notify::None,
    };
    let out_dir = args
        .out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !out_dir.is_dir() {
        return Err(credbroker::Error::config(format!(
            "--out {}: directory {} does not exist",
            args.out.display(),
            out_dir.display()
        ))
        .into());
    }
    let is_static = args.static_role.is_some();
    let opts = Options {
        role: args.static_role.or(args.role).unwrap_or_default(),
        out: args.out,
        format: Format::parse(&args.format)?,
        notify,
        ttl: args.ttl.map(Into::into),
        once: args.once,
        keep: args.keep,
        grace: args.grace.into(),
        give_up_after: args.give_up_after.into(),
    };
    let client = credbroker::sidecar::connect::Connector::new(args.client)?;
    // Handlers are installed now, before the first lease exists, so a
    // signal at any point takes the clean-up path.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    tracing::info!(
        role = %opts.role,
        out = %opts.out.display(),
        format = %args.format,
        "sidecar starting"
    );
    if is_static {
        credbroker::sidecar::static_loop::run(opts, client, shutdown).await?;
    } else {
        credbroker::sidecar::run(opts, client, shutdown).await?;
    }
    Ok(ExitCode::SUCCESS)
}
