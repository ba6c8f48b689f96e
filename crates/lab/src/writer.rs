//! The lab VM: a process that writes its "disk" on shared storage like a guest would.
//!
//! Every interval it appends `<unix_ms> <host> <vm> <boot_id> <seq>\n` to
//! `vms/<vm>/disk.log` and fsyncs, so the disk logs alone prove who ran where and
//! when (ARCHITECTURE.md §9). A failing disk does not stop the VM: like a guest
//! seeing I/O errors, it reports each failure on stderr and keeps trying, so it
//! resumes when the storage comes back.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{LabError, Result};
use crate::lab::unix_ms_now;

/// One lab VM run.
#[derive(Debug, Clone)]
pub struct VmWriterConfig {
    /// The shared storage mount as seen by this host.
    pub storage_dir: PathBuf,
    pub host: String,
    pub vm: String,
    /// Unique per start of the VM; two boot ids writing at once is split brain.
    pub boot_id: String,
    pub interval: Duration,
    /// Stop after this many successful writes (None: until `stop`).
    pub writes_max: Option<u64>,
}

impl VmWriterConfig {
    pub fn disk_path(&self) -> PathBuf {
        disk_log_path(&self.storage_dir, &self.vm)
    }
}

/// `<storage>/vms/<vm>/disk.log`.
pub fn disk_log_path(storage_dir: &Path, vm: &str) -> PathBuf {
    storage_dir.join("vms").join(vm).join("disk.log")
}

/// A fresh random boot id (16 hex digits).
pub fn new_boot_id() -> Result<String> {
    let mut bytes = [0u8; 8];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut bytes))
        .map_err(|error| LabError::io("/dev/urandom", error))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

fn valid_word(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(char::is_whitespace)
}

/// Writes until `stop` is set or `writes_max` lines went through; returns the number
/// of successful writes. Only a malformed config is an error: I/O failures are retried.
pub fn run_vm_writer(config: &VmWriterConfig, stop: &AtomicBool) -> Result<u64> {
    for (field, value) in [("host", &config.host), ("vm", &config.vm), ("boot_id", &config.boot_id)] {
        if !valid_word(value) {
            return Err(LabError::Config(format!("vm writer {field} must be one word, got {value:?}")));
        }
    }
    let path = config.disk_path();
    let mut sequence: u64 = 0;
    let mut written: u64 = 0;
    let mut next_tick = Instant::now();
    while !stop.load(Ordering::SeqCst) && config.writes_max.is_none_or(|max| written < max) {
        let line = format!("{} {} {} {} {}\n", unix_ms_now(), config.host, config.vm, config.boot_id, sequence);
        match append_line(&path, &line) {
            Ok(()) => written += 1,
            Err(error) => eprintln!("vm writer {}: write of seq {sequence} failed: {error}", config.vm),
        }
        sequence += 1;
        next_tick += config.interval;
        let now = Instant::now();
        if next_tick > now {
            thread::sleep(next_tick - now);
        } else {
            // Fell behind (slow storage): do not burst to catch up.
            next_tick = now;
        }
    }
    Ok(written)
}

/// One line in one write(2) with O_APPEND, then fsync: the line is on the server or
/// the call failed.
fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(line.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::parse_disk_log;

    #[test]
    fn writes_parseable_lines_with_increasing_sequence() {
        let dir = std::env::temp_dir().join(format!("kvmha-lab-writer-{}", std::process::id()));
        let config = VmWriterConfig {
            storage_dir: dir.clone(),
            host: "host1".to_string(),
            vm: "vm1".to_string(),
            boot_id: new_boot_id().expect("boot id"),
            interval: Duration::from_millis(1),
            writes_max: Some(5),
        };
        let written = run_vm_writer(&config, &AtomicBool::new(false)).expect("writer");
        assert_eq!(written, 5);
        let text = std::fs::read_to_string(config.disk_path()).expect("disk log");
        let parsed = parse_disk_log(&text);
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(parsed.records.len(), 5);
        assert_eq!(parsed.malformed_lines, 0);
        let sequences: Vec<u64> = parsed.records.iter().map(|record| record.seq).collect();
        assert_eq!(sequences, vec![0, 1, 2, 3, 4]);
        assert!(parsed.records.iter().all(|record| record.boot_id == config.boot_id));
    }

    #[test]
    fn rejects_names_that_would_break_the_line_format() {
        let config = VmWriterConfig {
            storage_dir: PathBuf::from("/nonexistent"),
            host: "host 1".to_string(),
            vm: "vm1".to_string(),
            boot_id: "b".to_string(),
            interval: Duration::from_millis(1),
            writes_max: Some(1),
        };
        assert!(run_vm_writer(&config, &AtomicBool::new(false)).is_err());
    }
}
