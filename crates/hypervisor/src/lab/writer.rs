//! The lab VM's "guest": a loop that appends one heartbeat line per tick to the VM's disk
//! log on shared storage and fsyncs it (ARCHITECTURE.md §9).
//!
//! Line format, one per 100 ms: `<unix_ms> <host> <vm> <boot_id> <seq>\n`, where `seq`
//! counts this boot's lines from 1. Two boot ids whose lines interleave in time on one
//! disk log are two writers on one disk: split brain, visible to anyone reading the file.
//!
//! A write that fails (storage cut, EIO) is retried on the next tick with a fresh file
//! handle; because a failed write may have left part of a line, the next line then
//! starts with a newline, so a torn line always stands alone and readers skip it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The period between two heartbeat lines.
pub const WRITE_INTERVAL: Duration = Duration::from_millis(100);

/// Where a lab VM's disk log lives under the shared storage root.
pub fn disk_log_path(storage_root: &Path, vm: &str) -> PathBuf {
    storage_root.join("vms").join(vm).join("disk.log")
}

/// What one writer writes, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterConfig {
    pub storage_root: PathBuf,
    pub host: String,
    pub vm: String,
    pub boot_id: String,
    pub interval: Duration,
}

impl WriterConfig {
    /// Fields are space-separated in the log line, so none may be empty or hold spaces.
    pub fn validate(&self) -> io::Result<()> {
        for (field, value) in [("host", &self.host), ("vm", &self.vm), ("boot_id", &self.boot_id)] {
            let plain = !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_graphic());
            if !plain {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{field} {value:?} must be non-empty printable ascii without spaces"),
                ));
            }
        }
        if self.vm.contains('/') || self.vm.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("vm {:?} must be a plain file name", self.vm),
            ));
        }
        if self.interval.is_zero() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "interval must be positive"));
        }
        Ok(())
    }
}

/// One parsed heartbeat line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatLine {
    pub unix_ms: u64,
    pub host: String,
    pub vm: String,
    pub boot_id: String,
    pub seq: u64,
}

impl HeartbeatLine {
    /// Parses one line (without its newline); `None` for a torn or foreign line.
    pub fn parse(line: &str) -> Option<Self> {
        let mut fields = line.split(' ');
        let unix_ms = fields.next()?.parse().ok()?;
        let host = fields.next()?.to_string();
        let vm = fields.next()?.to_string();
        let boot_id = fields.next()?.to_string();
        let seq = fields.next()?.parse().ok()?;
        if fields.next().is_some() || host.is_empty() || vm.is_empty() || boot_id.is_empty() {
            return None;
        }
        Some(HeartbeatLine { unix_ms, host, vm, boot_id, seq })
    }

    fn render(&self) -> String {
        format!("{} {} {} {} {}\n", self.unix_ms, self.host, self.vm, self.boot_id, self.seq)
    }
}

/// How a writer loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterSummary {
    /// Lines written and fsynced.
    pub lines_written: u64,
    /// Ticks whose write or fsync failed.
    pub failed_writes: u64,
}

/// Writes heartbeat lines until `stop` becomes true; checks `stop` once per tick.
///
/// Only an invalid configuration is an error: storage failures are counted, reported on
/// stderr and retried, as a guest keeps running while its disk misbehaves.
pub fn run_writer(config: &WriterConfig, stop: &AtomicBool) -> io::Result<WriterSummary> {
    config.validate()?;
    let path = disk_log_path(&config.storage_root, &config.vm);
    let mut file: Option<File> = None;
    let mut previous_write_failed = false;
    let mut summary = WriterSummary { lines_written: 0, failed_writes: 0 };
    let mut seq: u64 = 0;
    let mut next_tick = Instant::now();

    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let line = HeartbeatLine {
            unix_ms: unix_ms_now(),
            host: config.host.clone(),
            vm: config.vm.clone(),
            boot_id: config.boot_id.clone(),
            seq,
        };
        let mut bytes = line.render();
        if previous_write_failed {
            bytes.insert(0, '\n');
        }
        match append_and_sync(&mut file, &path, bytes.as_bytes()) {
            Ok(()) => {
                summary.lines_written += 1;
                previous_write_failed = false;
            }
            Err(error) => {
                summary.failed_writes += 1;
                previous_write_failed = true;
                // A dead handle (EIO on a network mount) is not reused.
                file = None;
                eprintln!("kvmha-lab-vm: write to {} failed (seq {seq}): {error}", path.display());
            }
        }

        // Fixed-rate ticks; after a stall (hung storage) skip the missed ticks rather
        // than burst, as a guest's timer would.
        next_tick += config.interval;
        let now = Instant::now();
        if next_tick < now {
            next_tick = now;
        }
        sleep_until(next_tick, stop);
    }
    Ok(summary)
}

fn append_and_sync(file: &mut Option<File>, path: &Path, bytes: &[u8]) -> io::Result<()> {
    if file.is_none() {
        if let Some(directory) = path.parent() {
            std::fs::create_dir_all(directory)?;
        }
        *file = Some(OpenOptions::new().create(true).append(true).open(path)?);
    }
    let handle = file.as_mut().expect("opened above");
    // One write call per line: with O_APPEND the line lands whole or fails.
    handle.write_all(bytes)?;
    handle.sync_all()
}

fn sleep_until(deadline: Instant, stop: &AtomicBool) {
    // Short naps so a stop request is noticed within a few milliseconds.
    const NAP: Duration = Duration::from_millis(10);
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(NAP));
    }
}

fn unix_ms_now() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_parse_accepts_only_whole_lines() {
        let line = HeartbeatLine::parse("1700000000000 node1 vm1 ab12 7").unwrap();
        assert_eq!(line.seq, 7);
        assert_eq!(line.boot_id, "ab12");
        assert_eq!(line.render(), "1700000000000 node1 vm1 ab12 7\n");
        for torn in [
            "",
            "1700000000000 node1 vm1 ab12",
            "1700000000000 node1 vm1 ab12 7 8",
            "17000 node1 vm1 ab12 x",
            "node1 vm1 ab12 7 8",
        ] {
            assert_eq!(HeartbeatLine::parse(torn), None, "{torn:?}");
        }
    }

    #[test]
    fn config_rejects_fields_that_would_break_the_line() {
        let good = WriterConfig {
            storage_root: PathBuf::from("/tmp"),
            host: "node1".into(),
            vm: "vm1".into(),
            boot_id: "ab".into(),
            interval: WRITE_INTERVAL,
        };
        assert!(good.validate().is_ok());
        let mut spaced = good.clone();
        spaced.host = "node 1".into();
        assert!(spaced.validate().is_err());
        let mut escaping = good.clone();
        escaping.vm = "../x".into();
        assert!(escaping.validate().is_err());
        let mut empty = good;
        empty.boot_id = String::new();
        assert!(empty.validate().is_err());
    }
}
