#!/usr/bin/env bash
# The alert tests need promtool (rule checks and unit tests, tests/it/alerts.rs
# and deploy/prometheus/tests/) and real prometheus and alertmanager binaries
# (the end-to-end alert test runs them as child processes). Debian's
# `prometheus` package carries prometheus and promtool; `prometheus-alertmanager`
# carries alertmanager. Nothing needs to be running.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
# One package may be missing for two reasons.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
  echo "missing: ${missing[*]} — install them (e.g. sudo apt-get install -y --no-install-recommends ${missing[*]})" >&2
  exit 1
fi
echo "installing ${missing[*]} (promtool, prometheus and alertmanager for the alert tests)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Package install scripts try to start the services; the tests start their own.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
