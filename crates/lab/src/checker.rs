//! The checker: what the disk logs prove, computed from the files alone.
//!
//! Pure functions over parsed lines; no clock, no I/O except [`read_disk_logs`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::error::{LabError, Result};

/// One line `<unix_ms> <host> <vm> <boot_id> <seq>` of a disk log: the line type of
/// the writer every lab VM runs, so the format has one definition and one parser.
pub use kvmha_hypervisor::lab::writer::HeartbeatLine as DiskRecord;

/// A parsed disk log. Malformed lines are counted, not fatal: a host that loses
/// power mid-write may leave a torn last line, and QEMU disks are NUL-padded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedLog {
    pub records: Vec<DiskRecord>,
    pub malformed_lines: usize,
}

pub fn parse_disk_log(text: &str) -> ParsedLog {
    let mut parsed = ParsedLog::default();
    for line in text.split('\n') {
        let line = line.trim_matches(|c: char| c == '\0' || c.is_whitespace());
        if line.is_empty() {
            continue;
        }
        match DiskRecord::parse(line) {
            Some(record) => parsed.records.push(record),
            None => parsed.malformed_lines += 1,
        }
    }
    parsed
}

/// Reads every `vms/<vm>/disk.log` (lab process VMs) or `vms/<vm>/disk.raw` (real
/// QEMU guests, [`crate::guest`]) under the storage directory, keyed by VM name.
pub fn read_disk_logs(storage_dir: &Path) -> Result<BTreeMap<String, ParsedLog>> {
    let vms_dir = storage_dir.join("vms");
    let mut logs = BTreeMap::new();
    let entries = match std::fs::read_dir(&vms_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(logs),
        Err(error) => return Err(LabError::io(&vms_dir, error)),
    };
    for entry in entries {
        let entry = entry.map_err(|error| LabError::io(&vms_dir, error))?;
        let path = entry.path().join("disk.log");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(_) => {
                match read_disk_raw(&crate::guest::disk_path(storage_dir, &entry.file_name().to_string_lossy())) {
                    Ok(bytes) => bytes,
                    Err(_) => continue,
                }
            }
        };
        let vm = entry.file_name().to_string_lossy().into_owned();
        logs.insert(vm, parse_disk_log(&String::from_utf8_lossy(&bytes)));
    }
    Ok(logs)
}

/// The written part of a guest's disk: its regions (one per boot, see
/// `crates/lab/guest/heartbeat.c`) up to the first one never written, NULs dropped.
/// Reading only those keeps a poll cheap: the rest of the disk is sparse zeros.
pub fn read_disk_raw(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut text = Vec::new();
    let mut region = vec![0u8; crate::guest::REGION_BYTES];
    loop {
        let mut filled = 0;
        while filled < region.len() {
            match file.read(&mut region[filled..])? {
                0 => break,
                read => filled += read,
            }
        }
        if filled == 0 || region[0] == 0 {
            return Ok(text);
        }
        text.extend(region[..filled].iter().filter(|byte| **byte != 0));
        if filled < region.len() {
            return Ok(text);
        }
    }
}

/// One run of a VM: the writes of one boot id on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub host: String,
    pub boot_id: String,
    pub first_ms: u64,
    pub last_ms: u64,
    pub writes: usize,
}

/// The runs found in one VM's records, ordered by first write.
pub fn runs(records: &[DiskRecord]) -> Vec<Run> {
    let mut by_boot: BTreeMap<(&str, &str), Run> = BTreeMap::new();
    for record in records {
        let run = by_boot.entry((record.host.as_str(), record.boot_id.as_str())).or_insert_with(|| Run {
            host: record.host.clone(),
            boot_id: record.boot_id.clone(),
            first_ms: record.unix_ms,
            last_ms: record.unix_ms,
            writes: 0,
        });
        run.first_ms = run.first_ms.min(record.unix_ms);
        run.last_ms = run.last_ms.max(record.unix_ms);
        run.writes += 1;
    }
    let mut runs: Vec<Run> = by_boot.into_values().collect();
    runs.sort_by_key(|run| (run.first_ms, run.last_ms));
    runs
}

/// Two runs of one VM whose write spans intersect: the VM ran twice at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub vm: String,
    pub first: Run,
    pub second: Run,
}

/// Outcome of `no_double_run` over every VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoubleRunReport {
    pub vms: usize,
    pub overlaps: Vec<Overlap>,
}

impl DoubleRunReport {
    pub fn passed(&self) -> bool {
        self.overlaps.is_empty()
    }

    /// The check's detail line, in the words of SCENARIOS.md.
    pub fn detail(&self) -> String {
        let mut text = format!("{} VMs, {} overlapping writers", self.vms, self.overlaps.len());
        for overlap in &self.overlaps {
            text.push_str(&format!(
                "; {}: {}@{} [{}..{}] and {}@{} [{}..{}]",
                overlap.vm,
                overlap.first.boot_id,
                overlap.first.host,
                overlap.first.first_ms,
                overlap.first.last_ms,
                overlap.second.boot_id,
                overlap.second.host,
                overlap.second.first_ms,
                overlap.second.last_ms,
            ));
        }
        text
    }
}

/// No VM may have two boot ids writing its disk in overlapping time: the span from
/// a run's first to its last write is when it ran; two spans that intersect (even in
/// one millisecond) are a double run. A clean handover (old run's last write before
/// the new run's first) passes. A run that stops and later resumes (a host unfrozen
/// after its VM was restarted elsewhere) spans the other run and is caught.
pub fn no_double_run(logs: &BTreeMap<String, ParsedLog>) -> DoubleRunReport {
    let mut overlaps = Vec::new();
    for (vm, log) in logs {
        let runs = runs(&log.records);
        for (position, first) in runs.iter().enumerate() {
            for second in &runs[position + 1..] {
                let intersect = first.first_ms <= second.last_ms && second.first_ms <= first.last_ms;
                if intersect {
                    overlaps.push(Overlap { vm: vm.clone(), first: first.clone(), second: second.clone() });
                }
            }
        }
    }
    DoubleRunReport { vms: logs.len(), overlaps }
}

/// Time from a fault to the VM's first write by a new run: a boot id that had not
/// written before the fault, on a host other than `failed_host` (when given; a
/// crashed VM may come back on its own host). `None`: not recovered (yet).
pub fn recovery_ms(records: &[DiskRecord], fault_unix_ms: u64, failed_host: Option<&str>) -> Option<u64> {
    let before_fault: BTreeSet<(&str, &str)> = records
        .iter()
        .filter(|record| record.unix_ms < fault_unix_ms)
        .map(|record| (record.host.as_str(), record.boot_id.as_str()))
        .collect();
    records
        .iter()
        .filter(|record| record.unix_ms >= fault_unix_ms)
        .filter(|record| Some(record.host.as_str()) != failed_host)
        .filter(|record| !before_fault.contains(&(record.host.as_str(), record.boot_id.as_str())))
        .map(|record| record.unix_ms - fault_unix_ms)
        .min()
}

/// Where a VM runs at the end of an observation: the host of its latest write, if
/// that write is at most `fresh_ms` older than `end_ms` (a VM that stopped writing
/// runs nowhere). Writes after `end_ms` are ignored.
pub fn running_host(records: &[DiskRecord], end_ms: u64, fresh_ms: u64) -> Option<String> {
    records
        .iter()
        .filter(|record| record.unix_ms <= end_ms)
        .max_by_key(|record| record.unix_ms)
        .filter(|latest| end_ms - latest.unix_ms <= fresh_ms)
        .map(|latest| latest.host.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines of one run writing every 100 ms over [from_ms, to_ms].
    fn run_lines(host: &str, vm: &str, boot_id: &str, from_ms: u64, to_ms: u64) -> String {
        (from_ms..=to_ms)
            .step_by(100)
            .enumerate()
            .map(|(seq, unix_ms)| {
                let (host, vm, boot_id) = (host.to_string(), vm.to_string(), boot_id.to_string());
                DiskRecord { unix_ms, host, vm, boot_id, seq: seq as u64 }.render()
            })
            .collect()
    }

    fn logs_of(vm: &str, text: &str) -> BTreeMap<String, ParsedLog> {
        BTreeMap::from([(vm.to_string(), parse_disk_log(text))])
    }

    /// What the lab VM writes is what the checker reads: seq from 0, every line whole.
    #[test]
    fn the_lab_vm_writer_output_parses() {
        use kvmha_hypervisor::lab::writer::{disk_log_path, run_writer, WriterConfig};
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = std::env::temp_dir().join(format!("kvmha-lab-checker-{}", std::process::id()));
        let config = WriterConfig {
            storage_root: dir.clone(),
            host: "host1".into(),
            vm: "vm1".into(),
            boot_id: "b007".into(),
            interval: std::time::Duration::from_millis(5),
        };
        let stop = AtomicBool::new(false);
        let summary = std::thread::scope(|scope| {
            let writer = scope.spawn(|| run_writer(&config, &stop));
            std::thread::sleep(std::time::Duration::from_millis(60));
            stop.store(true, Ordering::SeqCst);
            writer.join().expect("writer thread").expect("writer")
        });
        let text = std::fs::read_to_string(disk_log_path(&dir, "vm1")).expect("disk log");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        let parsed = parse_disk_log(&text);
        assert_eq!(parsed.malformed_lines, 0);
        assert_eq!(parsed.records.len() as u64, summary.lines_written);
        let seqs: Vec<u64> = parsed.records.iter().map(|record| record.seq).collect();
        assert_eq!(seqs, (0..summary.lines_written).collect::<Vec<u64>>());
        assert!(parsed.records.iter().all(|record| record.host == "host1" && record.boot_id == "b007"));
    }

    #[test]
    fn clean_handover_passes() {
        let text = run_lines("host1", "vm1", "aaaa", 1_000, 5_000) + &run_lines("host2", "vm1", "bbbb", 8_000, 12_000);
        let report = no_double_run(&logs_of("vm1", &text));
        assert!(report.passed(), "{}", report.detail());
        assert_eq!(report.detail(), "1 VMs, 0 overlapping writers");
    }

    #[test]
    fn planted_overlapping_writers_fail() {
        // host1's run goes on while host2's has started: split brain.
        let text = run_lines("host1", "vm1", "aaaa", 1_000, 9_000) + &run_lines("host2", "vm1", "bbbb", 8_000, 12_000);
        let report = no_double_run(&logs_of("vm1", &text));
        assert!(!report.passed());
        assert_eq!(report.overlaps.len(), 1);
        assert_eq!(report.overlaps[0].first.boot_id, "aaaa");
        assert_eq!(report.overlaps[0].second.boot_id, "bbbb");
        assert!(report.detail().contains("1 overlapping writers"), "{}", report.detail());
    }

    #[test]
    fn a_frozen_run_that_resumes_after_the_takeover_fails() {
        // host1 hangs at 5 s, host2 takes over at 8 s, host1 is unfrozen at 20 s and
        // writes once more: its span covers host2's run.
        let text = run_lines("host1", "vm1", "aaaa", 1_000, 5_000)
            + &run_lines("host2", "vm1", "bbbb", 8_000, 12_000)
            + "20000 host1 vm1 aaaa 41\n";
        assert!(!no_double_run(&logs_of("vm1", &text)).passed());
    }

    #[test]
    fn same_boot_id_on_two_hosts_counts_as_two_runs() {
        let text = run_lines("host1", "vm1", "same", 1_000, 3_000) + &run_lines("host2", "vm1", "same", 2_000, 4_000);
        assert!(!no_double_run(&logs_of("vm1", &text)).passed());
    }

    #[test]
    fn torn_and_padded_lines_are_counted_not_fatal() {
        let text = "1000 host1 vm1 aaaa 0\n1100 host1 vm1 aa\0\0\0\n\0\0\0\0";
        let parsed = parse_disk_log(text);
        assert_eq!(parsed.records.len(), 1);
        assert_eq!(parsed.malformed_lines, 1);
    }

    #[test]
    fn a_vm_runs_where_it_wrote_last_if_it_still_writes() {
        let text = run_lines("host1", "vm1", "aaaa", 1_000, 5_000) + &run_lines("host2", "vm1", "bbbb", 8_000, 12_000);
        let records = parse_disk_log(&text).records;
        assert_eq!(running_host(&records, 12_050, 500).as_deref(), Some("host2"));
        assert_eq!(running_host(&records, 6_000, 500), None, "between runs it runs nowhere");
        assert_eq!(running_host(&records, 5_100, 500).as_deref(), Some("host1"));
        assert_eq!(running_host(&records, 20_000, 500), None, "stopped writing");
    }

    #[test]
    fn recovery_is_measured_to_the_first_write_of_a_new_run_elsewhere() {
        let text = run_lines("host1", "vm1", "aaaa", 1_000, 5_000) + &run_lines("host2", "vm1", "bbbb", 8_100, 12_000);
        let records = parse_disk_log(&text).records;
        assert_eq!(recovery_ms(&records, 5_050, Some("host1")), Some(3_050));
        // Writes of the old run after the fault never count as recovery.
        let only_old = parse_disk_log(&run_lines("host1", "vm1", "aaaa", 1_000, 9_000)).records;
        assert_eq!(recovery_ms(&only_old, 5_000, Some("host1")), None);
        // A restart on the same host counts only when the host is not excluded.
        let restarted = parse_disk_log(
            &(run_lines("host1", "vm1", "aaaa", 1_000, 5_000) + &run_lines("host1", "vm1", "cccc", 6_000, 7_000)),
        )
        .records;
        assert_eq!(recovery_ms(&restarted, 5_000, None), Some(1_000));
        assert_eq!(recovery_ms(&restarted, 5_000, Some("host1")), None);
    }

    /// A guest disk as heartbeat.c leaves it: one region per boot, NUL-padded blocks.
    fn guest_disk(dir: &Path, vm: &str, regions: &[String]) {
        let path = crate::guest::disk_path(dir, vm);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut disk = vec![0u8; 4 * crate::guest::REGION_BYTES];
        for (index, text) in regions.iter().enumerate() {
            let start = index * crate::guest::REGION_BYTES;
            // Whole 4 KiB blocks, each NUL-padded after its last full line.
            let mut position = start;
            let mut fill = 0;
            for line in text.split_inclusive('\n') {
                if fill + line.len() > 4096 {
                    position += 4096;
                    fill = 0;
                }
                disk[position + fill..position + fill + line.len()].copy_from_slice(line.as_bytes());
                fill += line.len();
            }
        }
        // A stray write past the first unused region is not read (nothing writes there).
        disk[3 * crate::guest::REGION_BYTES] = b'x';
        std::fs::write(path, disk).unwrap();
    }

    #[test]
    fn guest_disks_are_read_region_by_region_and_two_overlapping_boots_fail() {
        let dir = tempfile::tempdir().unwrap();
        guest_disk(
            dir.path(),
            "vm1",
            &[run_lines("host1", "vm1", "aaaa", 1_000, 90_000), run_lines("host2", "vm1", "bbbb", 95_000, 99_000)],
        );
        guest_disk(
            dir.path(),
            "vm2",
            &[run_lines("host1", "vm2", "cccc", 1_000, 9_000), run_lines("host2", "vm2", "dddd", 5_000, 12_000)],
        );
        let logs = read_disk_logs(dir.path()).unwrap();
        assert_eq!(logs["vm1"].records.len(), 891 + 41);
        assert_eq!(logs["vm1"].malformed_lines, 0);
        assert_eq!(runs(&logs["vm1"].records).len(), 2);
        let report = no_double_run(&logs);
        assert!(!report.passed(), "vm2's boots overlap: {}", report.detail());
        assert!(report.detail().contains("vm2"), "{}", report.detail());
        assert!(!report.detail().contains("vm1"), "{}", report.detail());
    }
}
