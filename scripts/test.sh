#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the PostgreSQL and
# MariaDB server binaries, and Prometheus' tools, if they are missing (tests start throwaway servers
# from them; nothing needs to be running) and the Vault client (hvac) venv,
# then lints and tests. Long fault
# tests (`#[ignore = "long"]`) run in a second step of their own.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-db-binaries.sh
scripts/ensure-vault-venv.sh
scripts/ensure-console-deps.sh
# promtool, prometheus and alertmanager: tests/it/alerts.rs checks and
# unit-tests deploy/prometheus/ and pages through a real Prometheus.
scripts/ensure-prometheus.sh
# SQLAlchemy, HikariCP and node-postgres: tests/it/pools.rs runs real pools
# through the sidecar across handovers.
scripts/ensure-pool-deps.sh
# strace: tests/it/faults/synced.rs reads the broker's system calls to
# check that no issue is answered before its store writes are synced.
command -v strace >/dev/null 2>&1 || scripts/apt-install.sh "the syscall-order test" strace

cargo fmt --all -- --check
# The whole workspace (ARCHITECTURE.md, "Crates"): core, testkit, the binary.
cargo clippy --workspace --all-targets -- -D warnings
echo "== fast tier: unit tests, in-memory store and fake databases, no servers"
# core's unit tests (--lib) and the binary's (cli, bench: --bins)
cargo test --workspace --lib --bins
# Its own binary: a scanning global allocator (no key copy freed unwiped).
cargo test --test secret_memory
# Its own binary: no import cycle among core's top-level modules (reads
# crates/credbroker-core/src/).
cargo test --test layers
echo "== integration tests: real PostgreSQL and MariaDB, real mTLS, the real binary"
cargo test --test it
echo "== long tests"
cargo test --test it -- --ignored --nocapture
