//! Processes seen through /proc, and external commands with a deadline.
//!
//! Every pid the lab records is stored with its start time (field 22 of
//! /proc/PID/stat) so that a recycled pid is never mistaken for ours: the machine
//! is shared, and we must only ever signal what we started.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{LabError, Result};

/// One line of /proc/PID/stat, the parts the lab needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub parent_pid: i32,
    pub state: char,
    pub start_ticks: u64,
}

/// Reads /proc/PID/stat; `None` when the process is gone.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state); starttime is field 22 overall.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        parent_pid: fields.get(1)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// A pid plus its start time: the identity of one process, immune to pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub pid: i32,
    pub start_ticks: u64,
}

impl ProcessId {
    pub fn of(pid: i32) -> Option<ProcessId> {
        let stat = proc_stat(pid)?;
        Some(ProcessId { pid, start_ticks: stat.start_ticks })
    }

    /// Running (or stopped), not a zombie, and still the same process.
    pub fn is_alive(&self) -> bool {
        match proc_stat(self.pid) {
            Some(stat) => stat.start_ticks == self.start_ticks && !matches!(stat.state, 'Z' | 'X'),
            None => false,
        }
    }

    /// The format of the lab's pid files, read by the generated shell scripts too.
    pub fn to_line(self) -> String {
        format!("{} {}\n", self.pid, self.start_ticks)
    }

    pub fn parse(line: &str) -> Option<ProcessId> {
        let mut parts = line.split_whitespace();
        let pid = parts.next()?.parse().ok()?;
        let start_ticks = parts.next()?.parse().ok()?;
        Some(ProcessId { pid, start_ticks })
    }

    pub fn read(path: &Path) -> Option<ProcessId> {
        ProcessId::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// Signals the process only if it is still the one recorded.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if !self.is_alive() {
            return Ok(());
        }
        match kill(Pid::from_raw(self.pid), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(source) => Err(LabError::Signal { pid: self.pid, signal: signal.as_str(), source }),
        }
    }

    /// Waits until the process is gone or a zombie; true if it went in time.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        wait_until(timeout, || !self.is_alive())
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Every pid currently in /proc.
pub fn all_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// The namespace link of a process, e.g. `net:[4026532290]`; `None` for zombies and the gone.
pub fn namespace_of(pid: i32, kind: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()?;
    Some(link.to_string_lossy().into_owned())
}

/// Live processes whose namespace of `kind` is `namespace` (as from [`namespace_of`]).
pub fn processes_in_namespace(kind: &str, namespace: &str) -> Vec<ProcessId> {
    all_pids()
        .into_iter()
        .filter(|pid| namespace_of(*pid, kind).as_deref() == Some(namespace))
        .filter_map(ProcessId::of)
        .filter(|process| process.is_alive())
        .collect()
}

/// The identity string of a named network namespace, comparable with [`namespace_of`].
pub fn named_netns_identity(name: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(format!("/run/netns/{name}")).ok()?.ino();
    Some(format!("net:[{inode}]"))
}

/// SIGKILLs every live process in the namespace until none is left (bounded),
/// leaves first: a process is killed only once it has no children left, not even
/// zombies. Killing a parent before its children were reaped hands them to PID 1,
/// which on this machine reaps nobody (sshd's per-connection processes did that).
/// Past half the timeout everything left is killed at once.
pub fn kill_namespace_processes(kind: &str, namespace: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let cleared = wait_until(timeout, || {
        let processes = processes_in_namespace(kind, namespace);
        let impatient = started.elapsed() > timeout / 2;
        let parents: std::collections::HashSet<i32> =
            all_pids().into_iter().filter_map(|pid| proc_stat(pid).map(|stat| stat.parent_pid)).collect();
        for process in &processes {
            if impatient || !parents.contains(&process.pid) {
                // Best effort: a process may exit between the scan and the signal.
                let _ = process.signal(Signal::SIGKILL);
            }
        }
        processes.is_empty()
    });
    if cleared {
        Ok(())
    } else {
        Err(LabError::NotReady {
            what: format!("the processes of namespace {namespace} to die"),
            timeout_ms: timeout.as_millis() as u64,
        })
    }
}

/// Renders a command for error messages.
pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs a command to completion with a deadline; returns stdout, or an error carrying stderr.
pub fn run(command: &mut Command, stdin: Option<&str>, timeout: Duration) -> Result<String> {
    let description = describe(command);
    command
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|error| LabError::Command { command: description.clone(), detail: error.to_string() })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Inputs are small (nft rulesets), far below the pipe buffer, so this cannot block.
        let _ = pipe.write_all(text.as_bytes());
    }
    // Drain the pipes on threads so a chatty child never blocks on a full pipe.
    let mut stdout_pipe = child.stdout.take();
    let mut stderr_pipe = child.stderr.take();
    let stdout_reader = thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = stdout_pipe.as_mut() {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let stderr_reader = thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = stderr_pipe.as_mut() {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError::CommandTimeout { command: description, timeout_ms: timeout.as_millis() as u64 });
            }
            Err(error) => return Err(LabError::Command { command: description, detail: error.to_string() }),
        }
    };
    let stdout = stdout_reader.join().unwrap_or_default();
    let stderr = stderr_reader.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(LabError::Command { command: description, detail: format!("{status}: {}", stderr.trim()) })
    }
}

/// Shorthand for [`run`] of a program and its arguments without stdin.
pub fn run_args(program: &str, args: &[&str], timeout: Duration) -> Result<String> {
    run(Command::new(program).args(args), None, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_parses_back() {
        let me = ProcessId::of(std::process::id() as i32).expect("own stat");
        assert!(me.is_alive());
        assert_eq!(ProcessId::parse(&me.to_line()), Some(me));
        let recycled = ProcessId { start_ticks: me.start_ticks + 1, ..me };
        assert!(!recycled.is_alive(), "a different start time is another process");
    }

    #[test]
    fn run_reports_failure_with_stderr_and_times_out() {
        let error = run_args("sh", &["-c", "echo oops >&2; exit 3"], Duration::from_secs(5)).expect_err("must fail");
        assert!(error.to_string().contains("oops"), "{error}");
        let timeout = run_args("sleep", &["5"], Duration::from_millis(100)).expect_err("timeout");
        assert!(matches!(timeout, LabError::CommandTimeout { .. }));
        assert_eq!(run_args("echo", &["hi"], Duration::from_secs(5)).expect("echo"), "hi\n");
    }
}
