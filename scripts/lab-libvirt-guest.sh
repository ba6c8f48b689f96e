#!/usr/bin/env bash
# Boots one kvmha lab guest (a real QEMU/TCG guest) under a libvirtd run by hand inside
# fresh PID and mount namespaces, as a lab host runs it, and shows its disk lines.
# A manual check of the pieces `vm_driver = "libvirt"` uses (docs/lab.md); the lab
# itself builds the same image and configuration in Rust (crates/lab/src/guest.rs).
#   bash scripts/lab-libvirt-guest.sh [WORKDIR]     (root; scripts/setup.sh first)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/kvmha-libvirt-guest.XXXXXX)}"
mkdir -p "$work"
cd "$work"

kernel="$(ls /boot/vmlinuz-*-cloud-amd64 /boot/vmlinuz-* 2>/dev/null | head -1)"
version="${kernel#/boot/vmlinuz-}"
echo "kernel $kernel"

# The initramfs: busybox, the virtio modules, the heartbeat writer, /init.
rm -rf root && mkdir -p root/bin root/dev root/proc root/sys root/lib/modules
cp /bin/busybox root/bin/busybox
gcc -static -O2 -o root/bin/heartbeat "$here/crates/lab/guest/heartbeat.c"
for module in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console; do
  path="$(grep -E "(^|/)$module\.ko:" "/lib/modules/$version/modules.dep" | cut -d: -f1)"
  cp "/lib/modules/$version/$path" root/lib/modules/
  echo "$module" >> root/lib/modules/order
done
cat > root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /lib/modules/order); do insmod /lib/modules/$module.ko; done
while true; do /bin/heartbeat; sleep 1; done
INIT
chmod +x root/init
(cd root && find . | cpio -o -H newc --quiet | gzip -1) > initrd.img
cp "$kernel" vmlinuz

# The host side: a clock server on a unix socket (python for this manual check).
cat > clock.py <<'PY'
import os, socket, sys, threading, time
path = sys.argv[1]
if os.path.exists(path): os.unlink(path)
server = socket.socket(socket.AF_UNIX); server.bind(path); server.listen(16)
def serve(connection):
    with connection, connection.makefile("rb") as questions:
        for question in questions:  # "t <n>": echoed, as the lab's ClockServer does
            connection.sendall(b"%d host1 %s\n" % (int(time.time() * 1000), question.strip()))
while True:
    connection, _ = server.accept()
    threading.Thread(target=serve, args=(connection,), daemon=True).start()
PY
python3 clock.py "$work/clock.sock" & clock_pid=$!
trap 'kill $clock_pid 2>/dev/null || true' EXIT

mkdir -p disk && truncate -s 256M disk/disk.raw
for dir in etc lib run log cache sock; do mkdir -p "libvirt/$dir"; done
cat > libvirt/etc/libvirtd.conf <<CONF
unix_sock_dir = "$work/libvirt/sock"
listen_tls = 0
listen_tcp = 0
auth_unix_rw = "none"
auth_unix_ro = "none"
CONF
cat > libvirt/etc/qemu.conf <<'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
CONF
cat > domain.xml <<XML
<domain type='qemu'>
  <name>lab-guest</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$work/vmlinuz</kernel>
    <initrd>$work/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet printk.time=1 kvmha_vm=lab-guest</cmdline>
  </os>
  <features><acpi/></features>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='writethrough'/>
      <source file='$work/disk/disk.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='connect' path='$work/clock.sock'/>
      <target type='virtio' name='org.kvmha.lab.clock'/>
    </channel>
    <serial type='file'><source path='$work/console.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
XML

cat > host.sh <<HOST
set -eu
mount --bind $work/libvirt/etc /etc/libvirt
mkdir -p /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /run/libvirt
mount --bind $work/libvirt/lib /var/lib/libvirt
mount --bind $work/libvirt/run /run/libvirt
mount --bind $work/libvirt/log /var/log/libvirt
mount --bind $work/libvirt/cache /var/cache/libvirt
libvirtd -f /etc/libvirt/libvirtd.conf > $work/libvirtd.log 2>&1 &
uri="qemu:///system?socket=$work/libvirt/sock/libvirt-sock"
for i in \$(seq 100); do [ -S $work/libvirt/sock/libvirt-sock ] && break; sleep 0.1; done
start=\$(date +%s%3N)
virsh -c "\$uri" define $work/domain.xml
virsh -c "\$uri" start lab-guest
until tr -d '\0' < $work/disk/disk.raw | grep -q lab-guest; do sleep 0.1; done
echo "first disk line after \$(( \$(date +%s%3N) - start )) ms"
sleep 5
pid=\$(pgrep -f 'guest=lab-guest' | head -1)
echo "qemu RSS \$(awk '/VmRSS/ {print \$2}' /proc/\$pid/status) KiB"
tr -d '\0' < $work/disk/disk.raw | tail -3
now=\$(date +%s%3N); last=\$(tr -d '\0' < $work/disk/disk.raw | tail -1 | cut -d' ' -f1)
echo "host now - last line: \$(( now - last )) ms"
virsh -c "\$uri" destroy lab-guest
HOST
unshare --pid --fork --kill-child --mount --mount-proc bash host.sh
echo "console: $work/console.log"
