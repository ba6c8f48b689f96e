//! The lab VM's "guest": a loop that appends one heartbeat line per tick to the VM's disk
//! log on shared storage and fsyncs it (ARCHITECTURE.md §9).
//!
//! Line format, one per 100 ms: `<unix_ms> <host> <vm> <boot_id> <seq>\n`, where `seq`
//! counts this boot's ticks from 0 (a tick whose append failed leaves a gap). Two boot
//! ids whose lines interleave in time on one disk log are two writers on one disk: split
//! brain, visible to anyone reading the file.
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

    /// The line as written, newline included: the one rendering of the format.
    pub fn render(&self) -> String {
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
    let mut line_may_be_torn = false;
    let mut summary = WriterSummary { lines_written: 0, failed_writes: 0 };
    // Ticks of this boot from 0, as the lab crate's writer and checker count them.
    let mut next_seq: u64 = 0;
    let mut next_tick = Instant::now();

    while !stop.load(Ordering::SeqCst) {
        let seq = next_seq;
        next_seq += 1;
        let line = HeartbeatLine {
            unix_ms: unix_ms_now(),
            host: config.host.clone(),
            vm: config.vm.clone(),
            boot_id: config.boot_id.clone(),
            seq,
        };
        let mut bytes = line.render();
        if line_may_be_torn {
            bytes.insert(0, '\n');
        }
        match append_and_sync(&mut file, &path, bytes.as_bytes()) {
            Ok(()) => {
                summary.lines_written += 1;
                line_may_be_torn = false;
            }
            Err(failure) => {
                summary.failed_writes += 1;
                // Only a failed write can leave part of a line behind; a failed open or
                // fsync cannot.
                line_may_be_torn |= matches!(failure, AppendFailure::Write(_));
                // A dead handle (EIO on a network mount) is not reused.
                file = None;
                eprintln!("kvmha-lab-vm: append to {} failed (seq {seq}): {failure}", path.display());
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

/// Which step of an append failed.
#[derive(Debug)]
enum AppendFailure {
    Open(io::Error),
    Write(io::Error),
    Sync(io::Error),
}

impl std::fmt::Display for AppendFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendFailure::Open(error) => write!(formatter, "open: {error}"),
            AppendFailure::Write(error) => write!(formatter, "write: {error}"),
            AppendFailure::Sync(error) => write!(formatter, "fsync: {error}"),
        }
    }
}

fn append_and_sync(file: &mut Option<File>, path: &Path, bytes: &[u8]) -> Result<(), AppendFailure> {
    if file.is_none() {
        let open = || -> io::Result<File> {
            if let Some(directory) = path.parent() {
                std::fs::create_dir_all(directory)?;
            }
            OpenOptions::new().create(true).append(true).open(path)
        };
        *file = Some(open().map_err(AppendFailure::Open)?);
    }
    let handle = file.as_mut().expect("opened above");
    // One write(2) per line on an O_APPEND descriptor: concurrent readers see whole
    // lines; only an error mid-write can leave a partial one.
    handle.write_all(bytes).map_err(AppendFailure::Write)?;
    handle.sync_all().map_err(AppendFailure::Sync)
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

    /// Storage that cannot be written (here: a file where the VM's directory belongs) is
    /// counted and retried; once it is back, lines continue, seq showing the gap.
    #[test]
    fn an_unwritable_disk_is_retried_and_leaves_a_gap_in_seq() {
        let directory = tempfile::tempdir().unwrap();
        let blocker = directory.path().join("vms");
        std::fs::write(&blocker, "not a directory").unwrap();
        let config = WriterConfig {
            storage_root: directory.path().to_path_buf(),
            host: "node1".into(),
            vm: "vm1".into(),
            boot_id: "b0".into(),
            interval: Duration::from_millis(10),
        };
        let stop = AtomicBool::new(false);
        let summary = std::thread::scope(|scope| {
            let writer = scope.spawn(|| run_writer(&config, &stop));
            // Thirty ticks against the blocker; then wait for three lines, however slow the
            // machine is (fsync under load), rather than for a fixed time.
            std::thread::sleep(Duration::from_millis(300));
            std::fs::remove_file(&blocker).unwrap();
            let log = disk_log_path(directory.path(), "vm1");
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::fs::read_to_string(&log).map_or(0, |text| text.lines().count()) < 3 {
                assert!(std::time::Instant::now() < deadline, "the writer never recovered");
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, Ordering::SeqCst);
            writer.join().unwrap().unwrap()
        });
        assert!(summary.failed_writes >= 3, "{summary:?}");
        assert!(summary.lines_written >= 3, "{summary:?}");
        let text = std::fs::read_to_string(disk_log_path(directory.path(), "vm1")).unwrap();
        let seqs: Vec<u64> =
            text.lines().map(|line| HeartbeatLine::parse(line).expect("whole lines only").seq).collect();
        assert_eq!(seqs.len() as u64, summary.lines_written);
        assert!(seqs[0] > 0, "the first ticks failed: {seqs:?}");
        assert!(seqs.windows(2).all(|pair| pair[1] == pair[0] + 1), "{seqs:?}");
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
