#!/usr/bin/env bash
# apt-install.sh WHY PACKAGE…: installs Debian packages the tests need, as
# root, without starting the services they carry (the tests start their
# own); not root, it says what to install and fails. The ensure-*.sh
# scripts decide what is missing and call this.
set -euo pipefail

why=$1
shift
if [ "$(id -u)" -ne 0 ]; then
  echo "missing: $* — install them (e.g. sudo apt-get install -y $*)" >&2
  exit 1
fi
echo "installing $* ($why)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Package install scripts try to start the services; we do not need them to.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -qq "$@" >/dev/null
