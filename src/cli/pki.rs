//! `credbroker pki dev --out DIR`

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::CliResult;

#[derive(clap::Subcommand)]
pub enum Command {
    /// A development CA, a server certificate for localhost, and client
    /// certificates with SPIFFE IDs (app, other, and an admin)
    Dev {
        #[arg(long, default_value = "pki")]
        out: PathBuf,
    },
}

pub fn run(cmd: Command) -> CliResult {
    let Command::Dev { out } = cmd;
    let files = crate::pki::write_dev_pki(&out)?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}
