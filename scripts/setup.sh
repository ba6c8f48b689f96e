#!/usr/bin/env bash
# Installs everything kvmha's build, tests and lab need on a fresh Debian 12 machine (as root).
# Idempotent: packages already present are skipped quickly.
set -euo pipefail

# One package per line so that branches merge without conflicts.
packages=(
  build-essential
  pkg-config
  libvirt-dev      # hypervisor: the virt crate links libvirt.so (test:///default needs no daemon)
  strace           # hypervisor: the writer test checks each heartbeat line is fsynced
  bindfs   # storage: a FUSE mount the hung-pool test freezes (SIGSTOP) to hang a pool
  fuse3    # storage: fusermount for that test's cleanup
  openssh-server  # storage: a loopback sshd serving the sshfs pool tests
  sshfs    # storage: two mounts of one directory stand in for two hosts
  iproute2
  nftables
  procps
  psmisc
  openipmi
  ipmitool
  python3
  python3-pip
  openssl
  iputils-ping    # lab: reachability checks between lab namespaces (lab also needs openipmi, ipmitool, openssh-server, sshfs above)
  openssh-client  # lab: ssh-keygen for per-lab keys, the ssh under sshfs
  chromium        # dashboard: browser tests drive headless Chromium (crates/kvmha/tests/dashboard.rs)
  protobuf-compiler  # `protoc`: the etcd-client crate (manager HA, gRPC) compiles etcd's .proto files in its build
  etcd-server     # manager HA: the etcd store backend tests start a real etcd (crates/kvmha/tests/manager_ha.rs)
  qemu-system-x86             # lab vm_driver = "libvirt": real guests under TCG (crates/lab/src/guest.rs)
  libvirt-daemon-system       # lab: libvirtd run by hand per lab host (and its libvirt-qemu user)
  libvirt-daemon-driver-qemu  # lab: libvirtd's QEMU driver
  busybox-static              # lab: the guest's initramfs userland
  linux-image-cloud-amd64     # lab: the guest's kernel (+ its virtio modules); booted by QEMU only
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

# PyPI: sushy-tools provides sushy-emulator, the Redfish BMC the bmc crate's
# tests run against (its fake driver; crates/bmc/tests/redfish_sushy.rs).
# Debian 12 marks the system Python as externally managed, hence the flag;
# it is only ever installed for root on a CI or lab machine.
if ! python3 -c 'import sushy_tools' >/dev/null 2>&1; then
  echo "setup: installing sushy-tools (PyPI)" >&2
  python3 -m pip install --quiet --break-system-packages sushy-tools
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
# cargo-fuzz runs the fuzz targets of fuzz/ (scripts/fuzz.sh; stable toolchain, --sanitizer none).
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi
