//! The `credbroker` binary: the command line (`cli`, one file per
//! subcommand) and the bench (`bench`) over the core library (`credbroker`,
//! crates/credbroker-core) and the dev kit (`credbroker_testkit`).

#![forbid(unsafe_code)]

mod bench;
mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
