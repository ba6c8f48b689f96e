#!/usr/bin/env bash
# Installs everything kvmha's build, tests and lab need on a fresh Debian 12 machine (as root).
# Idempotent: packages already present are skipped quickly.
set -euo pipefail

# One package per line so that branches merge without conflicts.
packages=(
  build-essential
  pkg-config
  iproute2
  nftables
  procps
  psmisc
  iputils-ping
  openipmi
  ipmitool
  openssh-client
  openssh-server
  sshfs
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
