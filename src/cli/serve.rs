//! `credbroker serve --config FILE`

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::CliResult;
use credbroker::config::Config;
use credbroker::daemon::{termination_signal, Daemon, Listeners};

#[derive(clap::Args)]
pub struct Args {
    /// Broker configuration (TOML)
    #[arg(long, short, env = "CREDBROKER_CONFIG")]
    config: PathBuf,
}

pub async fn run(args: Args) -> CliResult {
    // Before any secret is read: a core dump would hold them all.
    if let Err(e) = credbroker::hardening::disable_core_dumps() {
        eprintln!("credbroker: WARNING: cannot turn core dumps off: {e}");
    }
    let config = Config::load(&args.config)?;
    // Before the ports listen: from then on a SIGHUP (logrotate's, a
    // deployment's right after start) reaches the reloader below instead
    // of ending the process, SIGHUP's default.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let listeners = Listeners::bind(&config).await?;
    let daemon = Daemon::open(config).await?;
    // `Daemon::open` logged each warning once (a second, bare copy on the
    // same stderr read as two problems); the summary below counts them.
    // One summary of what was loaded, so an operator sees at a glance
    // whether the broker runs the config they meant.
    let config = daemon.broker.config();
    let databases: Vec<String> = config
        .databases
        .values()
        .map(|d| format!("{} ({})", d.name, d.kind.as_str()))
        .collect();
    let roles: Vec<String> = config
        .roles
        .values()
        .map(|r| format!("{} on {}", r.name, r.database))
        .collect();
    let metrics = listeners
        .metrics
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .unwrap_or_else(|| "off".to_string());
    let console = listeners
        .console
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| format!("https://{a}/"))
        .unwrap_or_else(|| "off".to_string());
    tracing::info!(
        listen = %listeners.grpc.local_addr()?,
        metrics = %metrics,
        console = %console,
        databases = %databases.join(", "),
        roles = %roles.join(", "),
        warnings = daemon.warnings.len(),
        "credbroker serving"
    );
    let reloader = daemon.reloader();
    let path = args.config.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = hup else {
            return;
        };
        while hup.recv().await.is_some() {
            match reloader.reload(&path) {
                Ok(_) => tracing::info!(config = %path.display(), "configuration reloaded"),
                // A bad edit keeps the running config: say why and carry on.
                Err(e) => {
                    tracing::error!(error = %credbroker::error::chain(&e), "reload failed; keeping the running configuration")
                }
            }
        }
    });
    daemon.run(listeners, termination_signal()).await?;
    // The last line of a clean shutdown: the log says it ended, not died.
    tracing::info!("credbroker stopped");
    Ok(ExitCode::SUCCESS)
}
