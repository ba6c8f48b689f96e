//! Helpers of the lab's integration tests: real namespaces, real processes, root only.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvmha_hypervisor::lab::writer::disk_log_path;
use kvmha_lab::checker::{parse_disk_log, DiskRecord};
use kvmha_lab::lab::wait_for;
use kvmha_lab::{Lab, LabConfig};

pub const HELPER: &str = env!("CARGO_BIN_EXE_kvmha-lab-helper");
/// Generous bound for anything that normally takes well under a second.
pub const SOON: Duration = Duration::from_secs(15);

pub fn build(hosts: usize) -> Lab {
    build_with(LabConfig { hosts, ..LabConfig::default() })
}

pub fn build_with(config: LabConfig) -> Lab {
    assert!(nix::unistd::geteuid().is_root(), "the lab integration tests need root (CI runs as root)");
    let started = Instant::now();
    let lab = Lab::build(config).expect("lab builds");
    eprintln!("lab {} built in {} ms", lab.id(), started.elapsed().as_millis());
    lab
}

/// Starts a lab VM inside `host`; its stderr goes to `<lab>/<vm>.stderr`.
pub fn spawn_writer(lab: &Lab, host: &str, vm: &str) -> Child {
    let stderr = std::fs::File::create(writer_stderr(lab, vm)).expect("stderr file");
    lab.host_command(host, HELPER)
        .expect("host is on")
        .args(["lab", "vm-writer"])
        .arg("--storage-dir")
        .arg(lab.host_mount_dir(host).expect("host"))
        .args(["--host", host, "--vm", vm])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("writer spawns")
}

pub fn writer_stderr(lab: &Lab, vm: &str) -> PathBuf {
    lab.dir().join(format!("{vm}.stderr"))
}

pub fn records(lab: &Lab, vm: &str) -> Vec<DiskRecord> {
    let text = std::fs::read_to_string(disk_log_path(&lab.storage_dir(), vm)).unwrap_or_default();
    parse_disk_log(&text).records
}

pub fn wait_writes(lab: &Lab, vm: &str, count: usize) {
    wait_for(&format!("{count} writes of {vm}"), SOON, || records(lab, vm).len() >= count).expect("the VM writes");
}

/// Waits for a child to exit; true if it did in time.
pub fn exits_within(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Three quick pings from inside a host or the manager; true if any is answered, so
/// one reply lost on a loaded machine does not fail a test (ping exits 0 then).
pub fn ping(mut command: Command, address: &str) -> bool {
    command
        .args(["-c", "3", "-i", "0.2", "-W", "1", address])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

pub fn is_mounted_in_host(lab: &Lab, host: &str) -> bool {
    let Some(init) = lab.host_init(host).expect("host") else {
        return false;
    };
    let mount_dir = lab.host_mount_dir(host).expect("host");
    std::fs::read_to_string(format!("/proc/{}/mounts", init.pid))
        .map(|mounts| mounts.lines().any(|line| line.contains(&format!(" {} fuse.sshfs ", mount_dir.display()))))
        .unwrap_or(false)
}
