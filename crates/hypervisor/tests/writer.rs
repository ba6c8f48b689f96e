//! The lab VM writer as a real process: what a reader sees while it writes, and the
//! syscalls behind each line (one write, then fsync, before the next line).

mod common;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{read_lines, vm_binary, wait_until};
use kvmha_hypervisor::lab::writer::disk_log_path;
use rustix::process::{kill_process, kill_process_group, Pid, Signal};

/// Kills the child's whole process group on Drop, so a failing test leaves nothing behind.
struct GroupGuard(Child);

impl GroupGuard {
    fn spawn(command: &mut Command) -> GroupGuard {
        std::os::unix::process::CommandExt::process_group(command, 0);
        GroupGuard(command.stdin(Stdio::null()).stdout(Stdio::null()).spawn().expect("spawn"))
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.0.id() as i32).unwrap()
    }

    fn wait_with_deadline(&mut self, limit: Duration) -> ExitStatus {
        wait_until(limit, || self.0.try_wait().unwrap()).expect("process did not exit in time")
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = kill_process_group(self.pid(), Signal::KILL);
        let _ = self.0.wait();
    }
}

fn vm_arguments(command: &mut Command, storage_root: &Path, vm: &str) {
    command.arg("--storage-root").arg(storage_root).args([
        "--host",
        common::HOST,
        "--vm",
        vm,
        "--boot-id",
        "0123456789abcdef",
    ]);
}

/// A reader polling the disk log while the VM writes only ever sees whole lines, in order,
/// each read extending the previous one.
#[test]
fn a_reader_sees_whole_lines_in_strict_order_while_the_vm_writes() {
    let directory = tempfile::tempdir().unwrap();
    let mut command = Command::new(vm_binary());
    vm_arguments(&mut command, directory.path(), "vmr");
    let mut vm = GroupGuard::spawn(&mut command);
    let log = disk_log_path(directory.path(), "vmr");

    let mut previous = String::new();
    let mut reads = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(text.starts_with(&previous), "the log was rewritten, not appended to");
        let lines = read_lines(&log);
        for (index, line) in lines.iter().enumerate() {
            assert_eq!(line.seq, index as u64, "seq not strictly consecutive: {lines:?}");
        }
        for pair in lines.windows(2) {
            assert!(pair[0].unix_ms <= pair[1].unix_ms, "time went backwards: {pair:?}");
        }
        previous = text;
        reads += 1;
        std::thread::sleep(Duration::from_millis(3));
    }
    let lines = read_lines(&log);
    // ~15 expected; fewer on a loaded machine; never more than one per 100 ms (16),
    // plus one for the final read coming late.
    assert!((5..=17).contains(&lines.len()), "{} lines in 1.5 s", lines.len());
    assert!(reads > 50, "only {reads} reads");

    // SIGTERM is the graceful shutdown: the writer stops after a whole line, exit 0.
    kill_process(vm.pid(), Signal::TERM).unwrap();
    let status = vm.wait_with_deadline(Duration::from_secs(2));
    assert!(status.success(), "{status:?}");
    let count = read_lines(&log).len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read_lines(&log).len(), count, "writes after exit");
}

/// Under strace: every heartbeat line is one write(2) to the disk log followed by an
/// fsync(2) of that descriptor before the next line is written.
#[test]
fn every_line_is_one_write_followed_by_fsync() {
    let directory = tempfile::tempdir().unwrap();
    let trace = directory.path().join("trace.txt");
    let mut command = Command::new("strace");
    command.args(["-qq", "-s", "256", "-e", "trace=write,fsync,fdatasync", "-o"]).arg(&trace).arg(vm_binary());
    vm_arguments(&mut command, directory.path(), "vmf");
    let mut strace = GroupGuard::spawn(&mut command);
    let log = disk_log_path(directory.path(), "vmf");
    wait_until(Duration::from_secs(10), || (read_lines(&log).len() >= 5).then_some(())).expect("5 lines under strace");

    // The VM is strace's only child; stop it gracefully so the trace ends cleanly.
    let children_path = format!("/proc/{}/task/{}/children", strace.0.id(), strace.0.id());
    let children = std::fs::read_to_string(children_path).unwrap();
    let vm_pid: i32 = children.split_whitespace().next().expect("strace has a child").parse().unwrap();
    kill_process(Pid::from_raw(vm_pid).unwrap(), Signal::TERM).unwrap();
    let status = strace.wait_with_deadline(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");

    let lines_written = read_lines(&log).len();
    let trace = std::fs::read_to_string(&trace).unwrap();
    let mut disk_fd: Option<String> = None;
    let mut awaiting_fsync = false;
    let mut synced_lines = 0;
    for call in trace.lines() {
        if let Some(arguments) = call.strip_prefix("write(") {
            let (fd, rest) = arguments.split_once(", ").unwrap();
            if !rest.contains(" vmf 0123456789abcdef ") {
                continue; // stderr or other output, not the disk log
            }
            assert!(!awaiting_fsync, "a line was written before the previous one was fsynced:\n{trace}");
            assert_eq!(*disk_fd.get_or_insert_with(|| fd.to_string()), fd);
            awaiting_fsync = true;
        } else if let Some(arguments) = call.strip_prefix("fsync(") {
            let fd = arguments.split(')').next().unwrap();
            if disk_fd.as_deref() == Some(fd) && awaiting_fsync {
                assert!(call.ends_with("= 0"), "fsync failed: {call}");
                awaiting_fsync = false;
                synced_lines += 1;
            }
        }
    }
    assert!(!awaiting_fsync, "the last line was never fsynced:\n{trace}");
    assert_eq!(synced_lines, lines_written, "every line in the log was fsynced:\n{trace}");
}
