//! `credbroker check --config FILE`: verify a set-up before serving it.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::CliResult;
use credbroker::config::Config;

#[derive(clap::Args)]
pub struct Args {
    /// Broker configuration (TOML) to check
    #[arg(long, short, env = "CREDBROKER_CONFIG")]
    config: PathBuf,
}

/// Exit 0 when no check failed (warnings alone included), 1 when one did,
/// 64 when the config cannot be read or parsed (through `Failure::Usage`),
/// so CI can gate a deploy on it.
pub async fn run(args: Args) -> CliResult {
    let config = Config::load(&args.config)?;
    let report = credbroker::check::run(&config, &args.config).await;
    print!("{}", report.table(super::use_color(&std::io::stdout())));
    Ok(if report.errors() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
