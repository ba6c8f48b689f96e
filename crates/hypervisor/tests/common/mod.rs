//! A lab driver over a temporary storage root and state dir, with real VM processes.
//!
//! [`Lab`]'s Drop kills every VM process group recorded in the state dir, so no child
//! outlives a test, also when the test panics.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvmha_hypervisor::lab::writer::{disk_log_path, HeartbeatLine};
use kvmha_hypervisor::lab::{kill_all, LabConfig, LabDriver};

pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
pub const HOST: &str = "node1";

pub struct Lab {
    pub storage_root: PathBuf,
    pub state_dir: PathBuf,
    pub driver: LabDriver,
    // Dropped after Drop::drop ran, so the processes die before their files go.
    _directory: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Lab {
        let directory = tempfile::tempdir().expect("temp dir");
        let storage_root = directory.path().join("shared");
        let state_dir = directory.path().join("state");
        let driver = LabDriver::new(config(&storage_root, &state_dir), CALL_TIMEOUT).expect("driver");
        Lab { storage_root, state_dir, driver, _directory: directory }
    }

    /// A second driver on the same state dir: the agent after a restart.
    pub fn restarted_driver(&self) -> LabDriver {
        LabDriver::new(config(&self.storage_root, &self.state_dir), CALL_TIMEOUT).expect("driver")
    }

    pub fn uri(&self) -> String {
        format!(
            "lab:{}?state={}&host={HOST}&vm_binary={}",
            self.storage_root.display(),
            self.state_dir.display(),
            vm_binary().display()
        )
    }

    pub fn disk_log(&self, vm: &str) -> PathBuf {
        disk_log_path(&self.storage_root, vm)
    }

    /// Every line of a VM's disk log, each required to be a whole heartbeat line.
    pub fn lines(&self, vm: &str) -> Vec<HeartbeatLine> {
        read_lines(&self.disk_log(vm))
    }

    /// Waits until the disk log holds at least `count` lines.
    pub fn wait_for_lines(&self, vm: &str, count: usize) -> Vec<HeartbeatLine> {
        wait_until(Duration::from_secs(10), || {
            let lines = self.lines(vm);
            (lines.len() >= count).then_some(lines)
        })
        .unwrap_or_else(|| panic!("{vm} did not write {count} lines in time"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        kill_all(&self.state_dir);
    }
}

pub fn vm_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kvmha-lab-vm"))
}

pub fn config(storage_root: &Path, state_dir: &Path) -> LabConfig {
    LabConfig {
        storage_root: storage_root.to_path_buf(),
        state_dir: state_dir.to_path_buf(),
        host: HOST.to_string(),
        vm_command: vec![vm_binary().into_os_string()],
    }
}

pub fn read_lines(path: &Path) -> Vec<HeartbeatLine> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(error) => panic!("read {}: {error}", path.display()),
    };
    assert!(text.is_empty() || text.ends_with('\n'), "a partial line is visible: {text:?}");
    text.lines().map(|line| HeartbeatLine::parse(line).unwrap_or_else(|| panic!("malformed line {line:?}"))).collect()
}

/// Polls `probe` every 20 ms until it returns `Some`, or gives up after `limit`.
pub fn wait_until<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while a process with this pid exists and is not a zombie.
pub fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().next().unwrap_or("X").to_string();
            state != "Z" && state != "X"
        }
    }
}

/// Asserts one boot's lines: consecutive seq from 0, one boot id, time never backwards.
pub fn assert_one_boot(lines: &[HeartbeatLine], vm: &str, boot_id: &str) {
    assert!(!lines.is_empty());
    for (index, line) in lines.iter().enumerate() {
        assert_eq!(line.host, HOST);
        assert_eq!(line.vm, vm);
        assert_eq!(line.boot_id, boot_id);
        assert_eq!(line.seq, index as u64, "seq must advance by one: {lines:?}");
    }
    for pair in lines.windows(2) {
        assert!(pair[1].unix_ms >= pair[0].unix_ms, "time went backwards: {pair:?}");
    }
}
