#!/usr/bin/env bash
# The tests and `credbroker demo` start their own throwaway PostgreSQL and
# MariaDB servers; they need the server binaries, not running services.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
exec "$(dirname "$0")/apt-install.sh" "database server binaries for throwaway test servers" "${missing[@]}"
