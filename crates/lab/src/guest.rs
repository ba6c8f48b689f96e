//! Real QEMU guests for `[lab] vm_driver = "libvirt"`: the guest image, its domain XML,
//! its disk, the per-host libvirtd configuration and the clock the guests read.
//!
//! The image is built here from Debian packages that `scripts/setup.sh` installs, never
//! downloaded: the kernel is the installed `/boot/vmlinuz-*` (Debian's cloud kernel,
//! `linux-image-cloud-amd64`), the initramfs holds `busybox` (busybox-static), the
//! virtio modules of that kernel, and `heartbeat`, compiled static with `cc` from
//! `crates/lab/guest/heartbeat.c`. It is cached under `/var/cache/kvmha-lab/` (or
//! `$KVMHA_LAB_CACHE`), keyed by the kernel, the writer's source and the init script.
//!
//! Every host sees the same paths, so a definition registered with the manager runs
//! anywhere: `<lab>/view/` is a tmpfs of each host's own mount namespace, with
//! `storage` linking to that host's sshfs mount and `clock.sock` to that host's clock
//! socket. The disk is `<lab>/view/storage/vms/<vm>/disk.raw` (sparse, [`DISK_BYTES`]).
//!
//! Time: under TCG a guest's clock starts from the RTC in whole seconds and drifts, so
//! the lab runs a [`ClockServer`] per host (a thread of the lab process on a unix
//! socket); the guest asks it over a virtio-serial port before every line ("t <n>",
//! answered "<unix_ms> <host> t <n>") and writes the host's `unix_ms` and name (the
//! definition is the same on every host, so the guest learns where it runs this way).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{LabError, Result};

/// The guest's heartbeat writer, compiled into every image.
pub const HEARTBEAT_SOURCE: &str = include_str!("../guest/heartbeat.c");
/// Where images are cached between runs (`$KVMHA_LAB_CACHE` overrides).
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/kvmha-lab";
/// A guest's disk: 64 regions, sparse on the storage.
pub const DISK_BYTES: u64 = 64 * 1024 * 1024;
/// Each boot of a guest writes its own region (REGION in heartbeat.c).
pub const REGION_BYTES: usize = 1024 * 1024;
/// The least memory the guest kernel boots in (64 MiB was seen too small).
pub const GUEST_MEMORY_MIB_MIN: u64 = 128;
/// The kernel modules the guest loads (with their dependencies, from `modules.dep`):
/// virtio for the disk and the clock port, the ACPI button and evdev for acpid.
const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_console", "button", "evdev"];
/// QEMU for x86 guests (qemu-system-x86).
pub const EMULATOR: &str = "/usr/bin/qemu-system-x86_64";

/// The guest's PID 1: mounts, modules, then the writer (restarted should it exit).
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /etc/acpi/PWRF
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /lib/modules/order); do insmod /lib/modules/$module.ko; done
# libvirt's graceful shutdown is the ACPI power button.
printf '#!/bin/sh\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /dev/null -p /acpid.pid
while true; do /bin/heartbeat; sleep 1; done
"#;

/// A built guest: kernel and initramfs, both in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The cache directory images live in.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("KVMHA_LAB_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR))
}

/// The installed guest kernel: Debian's cloud kernel if there is one, else the newest
/// `/boot/vmlinuz-*`; with its version (the `/lib/modules` directory name).
pub fn find_kernel(boot: &Path) -> Result<(PathBuf, String)> {
    let entries = std::fs::read_dir(boot).map_err(|error| LabError::io(boot, error))?;
    let mut kernels: Vec<(bool, String)> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            entry.file_name().to_str().and_then(|name| name.strip_prefix("vmlinuz-")).map(str::to_string)
        })
        .map(|version| (version.ends_with("-cloud-amd64"), version))
        .collect();
    kernels.sort();
    let (_, version) = kernels.pop().ok_or_else(|| {
        LabError::Config(format!(
            "no kernel in {} for lab guests: install linux-image-cloud-amd64 (scripts/setup.sh)",
            boot.display()
        ))
    })?;
    Ok((boot.join(format!("vmlinuz-{version}")), version))
}

/// The `.ko` files (paths relative to the modules directory) to load for `wanted`, in
/// load order: each module after its dependencies, none twice. In `modules.dep` a
/// module's dependencies are listed so that the last must be loaded first.
pub fn module_load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for module in wanted {
        let file = format!("{module}.ko");
        let line = modules_dep
            .lines()
            .find(|line| line.split(':').next().is_some_and(|path| path == file || path.ends_with(&format!("/{file}"))))
            .ok_or_else(|| LabError::Config(format!("kernel module {module} not in modules.dep")))?;
        let (path, dependencies) = line.split_once(':').unwrap_or((line, ""));
        for dependency in dependencies.split_whitespace().rev().chain(std::iter::once(path)) {
            if seen.insert(dependency.to_string()) {
                order.push(dependency.to_string());
            }
        }
    }
    Ok(order)
}

/// One member of a cpio archive.
#[derive(Debug, Clone)]
pub enum CpioEntry {
    Directory(String),
    File { name: String, mode: u32, data: Vec<u8> },
}

/// The "newc" cpio format the kernel unpacks as an initramfs.
pub fn cpio_newc(entries: &[CpioEntry]) -> Vec<u8> {
    fn member(archive: &mut Vec<u8>, inode: usize, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{inode:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}{major:08X}{minor:08X}\
             {rmajor:08X}{rminor:08X}{namesize:08X}{check:08X}",
            uid = 0,
            gid = 0,
            nlink = 1,
            mtime = 0,
            size = data.len(),
            major = 0,
            minor = 0,
            rmajor = 0,
            rminor = 0,
            namesize = name.len() + 1,
            check = 0,
        );
        archive.extend_from_slice(header.as_bytes());
        archive.extend_from_slice(name.as_bytes());
        archive.push(0);
        while archive.len() % 4 != 0 {
            archive.push(0);
        }
        archive.extend_from_slice(data);
        while archive.len() % 4 != 0 {
            archive.push(0);
        }
    }
    let mut archive = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        match entry {
            CpioEntry::Directory(name) => member(&mut archive, index + 1, name, 0o040_755, &[]),
            CpioEntry::File { name, mode, data } => member(&mut archive, index + 1, name, 0o100_000 | mode, data),
        }
    }
    member(&mut archive, 0, "TRAILER!!!", 0, &[]);
    archive
}

/// FNV-1a: a stable cache key (std's hasher may change between Rust releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for byte in part.iter().chain(&[0xff]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| LabError::io(path, error))
}

/// The guest image, built into the cache on first use.
pub fn prepare_image(cache: &Path) -> Result<GuestImage> {
    let (kernel, version) = find_kernel(Path::new("/boot"))?;
    let busybox = Path::new("/bin/busybox");
    let busybox_bytes = read(busybox)
        .map_err(|error| LabError::Config(format!("{error}: install busybox-static (scripts/setup.sh)")))?;
    let kernel_size = std::fs::metadata(&kernel).map_err(|error| LabError::io(&kernel, error))?.len();
    let key = fnv1a(&[
        version.as_bytes(),
        &kernel_size.to_le_bytes(),
        HEARTBEAT_SOURCE.as_bytes(),
        INIT_SCRIPT.as_bytes(),
        &(busybox_bytes.len() as u64).to_le_bytes(),
    ]);
    let dir = cache.join(format!("guest-{key:016x}"));
    let image = GuestImage { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img") };
    if image.kernel.exists() && image.initrd.exists() {
        return Ok(image);
    }
    let building = cache.join(format!("guest-{key:016x}.building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    std::fs::create_dir_all(&building).map_err(|error| LabError::io(&building, error))?;
    let result = build_image(&building, &kernel, &version, busybox_bytes);
    if let Err(error) = result {
        let _ = std::fs::remove_dir_all(&building);
        return Err(error);
    }
    // Another run may have finished the same image first: then theirs is as good.
    if std::fs::rename(&building, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&building);
    }
    if image.kernel.exists() && image.initrd.exists() {
        Ok(image)
    } else {
        Err(LabError::Config(format!("guest image {} incomplete", dir.display())))
    }
}

fn build_image(dir: &Path, kernel: &Path, version: &str, busybox: Vec<u8>) -> Result<()> {
    let source = dir.join("heartbeat.c");
    std::fs::write(&source, HEARTBEAT_SOURCE).map_err(|error| LabError::io(&source, error))?;
    let writer = dir.join("heartbeat");
    let output =
        Command::new("cc").args(["-static", "-O2", "-o"]).arg(&writer).arg(&source).output().map_err(|error| {
            LabError::Command { command: "cc -static heartbeat.c".to_string(), detail: error.to_string() }
        })?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: "cc -static heartbeat.c".to_string(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let modules_dir = Path::new("/lib/modules").join(version);
    let modules_dep = String::from_utf8_lossy(&read(&modules_dir.join("modules.dep"))?).into_owned();
    let modules = module_load_order(&modules_dep, GUEST_MODULES)?;
    let mut entries = vec![
        CpioEntry::Directory("bin".to_string()),
        CpioEntry::Directory("dev".to_string()),
        CpioEntry::Directory("proc".to_string()),
        CpioEntry::Directory("sys".to_string()),
        CpioEntry::Directory("lib".to_string()),
        CpioEntry::Directory("lib/modules".to_string()),
        CpioEntry::File { name: "bin/busybox".to_string(), mode: 0o755, data: busybox },
        CpioEntry::File { name: "bin/heartbeat".to_string(), mode: 0o755, data: read(&writer)? },
        CpioEntry::File { name: "init".to_string(), mode: 0o755, data: INIT_SCRIPT.as_bytes().to_vec() },
    ];
    let mut order = String::new();
    for module in &modules {
        let name = Path::new(module).file_stem().and_then(|stem| stem.to_str()).unwrap_or_default().to_string();
        let data = read(&modules_dir.join(module))?;
        entries.push(CpioEntry::File { name: format!("lib/modules/{name}.ko"), mode: 0o644, data });
        order.push_str(&name);
        order.push('\n');
    }
    entries.push(CpioEntry::File { name: "lib/modules/order".to_string(), mode: 0o644, data: order.into_bytes() });
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, cpio_newc(&entries)).map_err(|error| LabError::io(&initrd, error))?;
    let kernel_copy = dir.join("vmlinuz");
    std::fs::copy(kernel, &kernel_copy).map_err(|error| LabError::io(&kernel_copy, error))?;
    for path in [&initrd, &kernel_copy] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|error| LabError::io(path, error))?;
    }
    Ok(())
}

/// Escapes text for an XML attribute or element.
fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// The disk of `vm` under a storage root.
pub fn disk_path(storage_root: &Path, vm: &str) -> PathBuf {
    storage_root.join("vms").join(vm).join("disk.raw")
}

/// Creates `vm`'s disk (sparse, all NUL) on the storage server's side, unless it exists.
pub fn create_disk(storage_dir: &Path, vm: &str) -> Result<()> {
    let path = disk_path(storage_dir, vm);
    if path.exists() {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(storage_dir);
    std::fs::create_dir_all(dir).map_err(|error| LabError::io(dir, error))?;
    let file = std::fs::File::create(&path).map_err(|error| LabError::io(&path, error))?;
    file.set_len(DISK_BYTES).map_err(|error| LabError::io(&path, error))
}

/// The domain XML of a lab guest. `view` is `<lab>/view`, the same path on every host.
pub fn domain_xml(name: &str, vcpus: u32, memory_mib: u64, image: &GuestImage, view: &Path) -> String {
    let memory_mib = memory_mib.max(GUEST_MEMORY_MIB_MIN);
    let name = xml_escape(name);
    let disk = xml_escape(&disk_path(&view.join("storage"), &name).display().to_string());
    let clock = xml_escape(&view.join("clock.sock").display().to_string());
    let kernel = xml_escape(&image.kernel.display().to_string());
    let initrd = xml_escape(&image.initrd.display().to_string());
    // type='qemu': TCG. This machine's /dev/kvm (PVM) crashes stock guests.
    // cache='writethrough': every guest write reaches the shared storage before the
    // guest's fdatasync returns (O_DIRECT is not offered by sshfs).
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 kvmha_vm={name}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='writethrough'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='connect' path='{clock}'/>
      <target type='virtio' name='org.kvmha.lab.clock'/>
    </channel>
    <serial type='pty'><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"
    )
}

/// `libvirtd.conf` of one host: its sockets in `socket_dir`, no network listeners.
pub fn libvirtd_conf(socket_dir: &Path) -> String {
    format!(
        "# Generated by kvmha lab: this host's libvirtd (run by its boot.sh).\n\
         unix_sock_dir = \"{}\"\nlisten_tls = 0\nlisten_tcp = 0\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n",
        socket_dir.display()
    )
}

/// `qemu.conf` of one host (LAB-FACTS.md): root, no confinement, no cgroups or
/// namespaces of libvirt's own (QEMU must stay in the host's PID namespace, so the
/// host's power-off kills it), stdio to files (no virtlogd).
pub const QEMU_CONF: &str = "# Generated by kvmha lab.\n\
user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = \"none\"\n\
cgroup_controllers = [ ]\nnamespaces = [ ]\nstdio_handler = \"file\"\n";

/// The libvirt URI of a host's libvirtd.
pub fn libvirt_uri(socket_dir: &Path) -> String {
    format!("qemu:///system?socket={}", socket_dir.join("libvirt-sock").display())
}

/// Answers "<unix_ms> <host> <question>\n" to every line (question) a guest sends on
/// one host's clock socket.
#[derive(Debug)]
pub struct ClockServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ClockServer {
    pub fn start(path: &Path, host: &str) -> Result<ClockServer> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|error| LabError::io(path, error))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let host = host.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("clock-{host}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let host = host.clone();
                    let _ = std::thread::Builder::new().name(format!("clock-{host}-guest")).spawn(move || {
                        let _ = serve_guest(stream, &host);
                    });
                }
            })
            .map_err(|error| LabError::io("clock server thread", error))?;
        Ok(ClockServer { path: path.to_path_buf(), stop, thread: Some(thread) })
    }
}

fn serve_guest(stream: UnixStream, host: &str) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        // The question ("t <n>") is echoed: the guest matches answers to questions.
        let question = String::from_utf8_lossy(&line);
        writer.write_all(format!("{} {host} {}\n", crate::lab::unix_ms_now(), question.trim()).as_bytes())?;
    }
}

impl Drop for ClockServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = UnixStream::connect(&self.path).map(|stream| stream.set_read_timeout(Some(Duration::from_millis(10))));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULES_DEP: &str = "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";

    #[test]
    fn modules_load_after_their_dependencies_and_once() {
        let order = module_load_order(MODULES_DEP, &["virtio_pci", "virtio_blk"]).expect("order");
        let names: Vec<&str> =
            order.iter().map(|path| path.rsplit('/').next().unwrap().trim_end_matches(".ko")).collect();
        assert_eq!(
            names,
            ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk"]
        );
        let missing = module_load_order(MODULES_DEP, &["virtio_console"]).unwrap_err().to_string();
        assert!(missing.contains("virtio_console"), "{missing}");
    }

    #[test]
    fn cpio_members_are_aligned_and_the_archive_ends_with_a_trailer() {
        let archive = cpio_newc(&[
            CpioEntry::Directory("bin".to_string()),
            CpioEntry::File { name: "init".to_string(), mode: 0o755, data: b"#!/bin/sh\n".to_vec() },
        ]);
        assert_eq!(archive.len() % 4, 0);
        assert!(archive.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&archive);
        assert_eq!(text.matches("070701").count(), 3);
        assert!(text.contains("init\0"));
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.trim_end_matches('\0').ends_with("TRAILER!!!"));
        // The file's header: regular file, mode 755, 10 bytes of data.
        let header_at = text.match_indices("070701").nth(1).expect("the file's header").0;
        let header = &text[header_at..header_at + 110];
        assert_eq!(&header[14..22], "000081ED");
        assert_eq!(&header[54..62], "0000000A");
    }

    #[test]
    fn the_domain_names_the_same_view_paths_on_every_host() {
        let image = GuestImage { kernel: "/cache/vmlinuz".into(), initrd: "/cache/initrd.img".into() };
        let xml = domain_xml("host1-vm1", 1, 64, &image, Path::new("/run/kvmha-lab/x/view"));
        let definition = kvmha_hypervisor::definition::DomainDefinition::parse(&xml).expect("a domain definition");
        assert_eq!(definition.name, "host1-vm1");
        assert_eq!(definition.memory_kib, GUEST_MEMORY_MIB_MIN * 1024, "raised to the minimum the guest boots in");
        assert!(xml.contains("<domain type='qemu'>"));
        assert!(xml.contains("/run/kvmha-lab/x/view/storage/vms/host1-vm1/disk.raw"));
        assert!(xml.contains("/run/kvmha-lab/x/view/clock.sock"));
        assert!(xml.contains("kvmha_vm=host1-vm1"));
    }

    #[test]
    fn the_clock_server_answers_every_line_with_its_time_and_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clock.sock");
        let server = ClockServer::start(&path, "host7").expect("clock server");
        let stream = UnixStream::connect(&path).expect("connect");
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        for _ in 0..2 {
            let before = crate::lab::unix_ms_now();
            writer.write_all(b"t 42\n").expect("ask");
            let mut answer = String::new();
            reader.read_line(&mut answer).expect("answer");
            let fields: Vec<&str> = answer.trim().split(' ').collect();
            let ms: u64 = fields[0].parse().expect("unix_ms");
            assert!(ms >= before && ms <= crate::lab::unix_ms_now(), "{answer}");
            assert_eq!(fields[1..], ["host7", "t", "42"]);
        }
        drop(server);
        assert!(!path.exists());
    }
}
