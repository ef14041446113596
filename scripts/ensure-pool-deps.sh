#!/usr/bin/env bash
# The connection-pool tests (tests/it/pools.rs) drive real pools through the
# sidecar: SQLAlchemy + psycopg 3 / PyMySQL from a venv in target/pool-venv,
# HikariCP + the PostgreSQL JDBC driver from Debian (compiled with javac),
# node-postgres from tests/pools/node_modules. Installs what is missing;
# quiet and quick when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: $1 — install it (e.g. sudo apt-get install -y $2)" >&2
    exit 1
  fi
}

pkgs=()
for jar in HikariCP.jar postgresql.jar slf4j-api.jar; do
  [ -f "/usr/share/java/$jar" ] || case $jar in
    HikariCP.jar) pkgs+=(libhikaricp-java) ;;
    postgresql.jar) pkgs+=(libpostgresql-jdbc-java) ;;
    slf4j-api.jar) pkgs+=(libslf4j-java) ;;
  esac
done
command -v javac >/dev/null 2>&1 || pkgs+=(default-jdk-headless)
command -v node >/dev/null 2>&1 || pkgs+=(nodejs)
command -v npm >/dev/null 2>&1 || pkgs+=(npm)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
if [ ${#pkgs[@]} -gt 0 ]; then
  need_root "${pkgs[*]}" "${pkgs[*]}"
  echo "installing ${pkgs[*]} (connection-pool tests)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

venv=target/pool-venv
req=tests/pools/requirements.txt
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/.requirements"; then
  echo "creating $venv (SQLAlchemy, psycopg, PyMySQL for the pool tests)" >&2
  rm -rf "$venv"
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  cp "$req" "$venv/.requirements"
fi

lock=tests/pools/package-lock.json
stamp=tests/pools/node_modules/.installed-from-lock
# Reinstall only when the lock file changed since the last install.
if [ ! -f "$stamp" ] || ! cmp -s "$lock" "$stamp"; then
  (cd tests/pools && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$lock" "$stamp"
fi
