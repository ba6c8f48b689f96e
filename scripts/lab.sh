#!/usr/bin/env bash
# The newcomer's first command: installs what the lab needs (scripts/setup.sh), builds
# kvmha, and brings up a lab of real hosts with a kvmha cluster and HA VMs in it.
# Arguments go to `kvmha lab up` (e.g. --hosts 4 --profile balanced). Root only.
# Ctrl-C tears everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "lab: run as root (the lab builds network, PID and mount namespaces)" >&2
  exit 1
fi
bash scripts/setup.sh
cargo build --release -p kvmha
exec target/release/kvmha lab up "$@"
