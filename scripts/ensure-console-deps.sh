#!/usr/bin/env bash
# The console's browser tests (tests/it/console.rs) drive Debian's headless
# Chromium with playwright-core. Installs what is missing, quietly: the
# chromium package (never a browser download of Playwright's own) and
# tests/console/node_modules from the committed package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ] || ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: chromium and/or nodejs — install them (e.g. sudo apt-get install -y chromium nodejs npm)" >&2
    exit 1
  fi
  echo "installing chromium, nodejs (headless browser tests of the web console)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  pkgs=()
  [ -x /usr/bin/chromium ] || pkgs+=(chromium)
  command -v node >/dev/null 2>&1 || pkgs+=(nodejs)
  command -v npm >/dev/null 2>&1 || pkgs+=(npm)
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

lock=tests/console/package-lock.json
stamp=tests/console/node_modules/.installed-from-lock
# Reinstall only when the lock file changed since the last install.
if [ ! -f "$stamp" ] || ! cmp -s "$lock" "$stamp"; then
  # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing
  # anyway; the tests launch /usr/bin/chromium.
  (cd tests/console && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$lock" "$stamp"
fi
