#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the PostgreSQL and
# MariaDB server binaries if they are missing (tests start throwaway servers
# from them; nothing needs to be running), then lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-db-binaries.sh

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets -- --nocapture 2>&1 | tee target/test-output.log | grep -vE '^\s*$' | tail -n 200
status=${PIPESTATUS[0]}
exit "$status"
