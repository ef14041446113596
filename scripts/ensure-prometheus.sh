#!/usr/bin/env bash
# The alert tests (tests/it/alerts.rs) need promtool (rule checks and unit
# tests of deploy/prometheus/) and real prometheus and alertmanager binaries
# (the end-to-end alert test runs them as child processes). Debian's
# `prometheus` package carries prometheus and promtool;
# `prometheus-alertmanager` carries alertmanager. Nothing needs to be running.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
exec "$(dirname "$0")/apt-install.sh" "promtool, prometheus and alertmanager for the alert tests" "${missing[@]}"
