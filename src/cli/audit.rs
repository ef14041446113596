//! `credbroker audit verify FILE...`

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::CliResult;
use credbroker::audit::{rotated_files, verify_files, Verdict, GENESIS};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check every record's hash and its link to the one before, across
    /// rotated files
    Verify {
        /// The audit log (`[audit] path` of the config) and, oldest first,
        /// files rotated from it; with --all, only the log itself
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also check the files `[audit] rotate_size` rotated the log to
        /// (`<path>.<last seq>`), in order, before the log itself
        #[arg(long)]
        all: bool,
    },
}

pub fn run(cmd: Command) -> CliResult {
    let Command::Verify { files, all } = cmd;
    let files = if all {
        if files.len() != 1 {
            return Err(anyhow::anyhow!("--all takes the one current log file").into());
        }
        let found = rotated_files(&files[0])
            .map_err(|e| anyhow::anyhow!("cannot list {}: {e}", files[0].display()))?;
        if found.is_empty() {
            return Err(anyhow::anyhow!("{}: no such file", files[0].display()).into());
        }
        found
    } else {
        files
    };
    // Named here: the reader's own error does not say which file.
    for f in &files {
        std::fs::File::open(f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
    }
    let verdict = verify_files(&files).map_err(|e| anyhow::anyhow!("cannot read: {e}"))?;
    match verdict {
        Verdict::Intact {
            records,
            last_hash,
            first_seq,
            first_prev,
        } => {
            let n = files.len();
            let of = if n == 1 {
                String::new()
            } else {
                format!(" in {n} files")
            };
            println!("ok: {records} records{of}, chain intact, last hash {last_hash}");
            if first_seq > 1 || first_prev != GENESIS {
                println!(
                    "note: the chain starts at record {first_seq}, continuing a file not given \
                     (its last hash {first_prev}); give the earlier files first to check the link"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Broken { file, line, reason } => {
            println!("BROKEN at {} line {line}: {reason}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}
