//! The `credbroker` binary: the command line (`cli`, one file per
//! subcommand) and the bench (`bench`) over the core library (`credbroker`,
//! crates/credbroker-core) and the dev kit (`credbroker_testkit`).

#![forbid(unsafe_code)]

mod bench;
mod cli;

use std::process::ExitCode;

/// The daemon allocates per request (HTTP/2 frames, protobuf messages,
/// rows, audit lines) on two cores shared with its database; malloc and
/// free were ~11 % of the broker's CPU at 16 callers with the system
/// allocator (BENCHMARKS.md). Secrets are wiped by `zeroize` before they
/// are freed, whatever the allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::main()
}
