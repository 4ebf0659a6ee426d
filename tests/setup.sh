#!/usr/bin/env bash
# Installs the programs berth's end-to-end tests run, on Debian 12 as root. Idempotent: when
# every program is already there it does nothing (no apt at all). It leaves no daemon running:
# package scripts may not start services while it installs (policy-rc.d answers 101), and the
# tests start private instances of their own on free loopback ports.
set -euo pipefail

packages=(docker.io docker-registry containerd runc podman skopeo nginx wrk prometheus jq curl
  openssl apache2-utils iproute2 ca-certificates git)
# One program per package above, to tell whether it is installed.
programs=(dockerd docker containerd runc podman skopeo nginx wrk promtool jq curl
  openssl htpasswd ip update-ca-certificates git docker-registry)

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

missing=()
for program in "${programs[@]}"; do have "$program" || missing+=("$program"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup.sh: all test programs present"
  exit 0
fi
echo "setup.sh: missing ${missing[*]}; installing packages"
if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: must run as root" >&2
  exit 1
fi

# Forbid service starts during the install (invoke-rc.d and deb-systemd-invoke obey this).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${packages[@]}"

# Under systemd, also keep them from starting at boot (docker-registry would hold port 5000).
if [ -d /run/systemd/system ]; then
  for unit in docker.socket docker containerd docker-registry nginx prometheus; do
    systemctl disable --now "$unit" >/dev/null 2>&1 || true
  done
fi

for program in "${programs[@]}"; do
  have "$program" || { echo "setup.sh: $program still missing after install" >&2; exit 1; }
done
echo "setup.sh: done"
