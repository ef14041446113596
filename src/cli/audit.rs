//! `credbroker audit verify FILE`

use std::path::PathBuf;
use std::process::ExitCode;

use crate::audit::{verify, Verdict};
use crate::cli::CliResult;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check every record's hash and its link to the one before
    Verify {
        /// The audit log (`[audit] path` of the config), JSON lines
        file: PathBuf,
    },
}

pub fn run(cmd: Command) -> CliResult {
    let Command::Verify { file } = cmd;
    let verdict =
        verify(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    match verdict {
        Verdict::Intact { records, last_hash } => {
            println!("ok: {records} records, chain intact, last hash {last_hash}");
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Broken { line, reason } => {
            println!("BROKEN at line {line}: {reason}");
            Ok(ExitCode::FAILURE)
        }
    }
}
