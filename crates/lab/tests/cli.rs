//! `kvmha lab up | fault | status | down` as separate processes, as an operator
//! uses them (root required).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use kvmha_lab::lab::{list_netns, wait_for, LabHandle, DEFAULT_BASE_DIR};
use kvmha_lab::process::{all_pids, ProcessId};
use kvmha_lab::topology::{LabId, Network, Node};
use kvmha_lab::PowerState;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Starts `lab up` (the plumbing only: the helper is not kvmha, it runs no cluster;
/// `kvmha lab run`'s tests cover the cluster) and returns it with the id it printed.
fn lab_up(hosts: usize) -> (Child, LabId) {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    // Progress goes to stderr, here a file (not a terminal): plain lines, no escapes.
    let stderr_path = std::env::temp_dir().join(format!("kvmha-lab-up-{}-{hosts}.stderr", std::process::id()));
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = Command::new(HELPER)
        .args(["lab", "up", "--no-cluster", "--hosts", &hosts.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("lab up starts");
    let stdout = child.stdout.take().expect("piped");
    let mut first_line = String::new();
    BufReader::new(stdout).read_line(&mut first_line).expect("lab up prints");
    let progress = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    for step in ["networks", "shared storage", &format!("host{hosts} ({hosts}/{hosts}): booting"), "BMCs answering"] {
        assert!(progress.contains(step), "no progress step {step:?} on stderr:\n{progress}");
    }
    assert!(!progress.contains('\u{1b}'), "terminal escapes in non-terminal output:\n{progress}");
    let id = first_line
        .split_whitespace()
        .nth(1)
        .and_then(LabId::parse)
        .unwrap_or_else(|| panic!("lab up said {first_line:?}"));
    (child, id)
}

fn lab(args: &[&str]) -> bool {
    Command::new(HELPER).arg("lab").args(args).stdout(Stdio::null()).status().expect("helper runs").success()
}

fn namespaces_of(id: &LabId) -> Vec<String> {
    list_netns().into_iter().filter(|name| name.starts_with(id.as_str())).collect()
}

fn live_processes_mentioning(needle: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|pid| ProcessId::of(*pid).is_some_and(|process| process.is_alive()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|bytes| String::from_utf8_lossy(&bytes).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn faults_from_another_process_act_on_a_running_lab_and_ctrl_c_tears_it_down() {
    let (mut up, id) = lab_up(2);
    let handle = LabHandle::open(&PathBuf::from(DEFAULT_BASE_DIR).join(id.as_str())).expect("lab.json");
    let lab_arg = ["--lab", id.as_str()];
    let fault = |args: &[&str]| lab(&[&["fault"], args, &lab_arg].concat());

    assert!(fault(&["power-off", "host1"]));
    assert_eq!(handle.power_state("host1").unwrap(), PowerState::Off);
    assert!(fault(&["power-on", "host1"]), "booted by the owner's controller");
    assert_eq!(handle.power_state("host1").unwrap(), PowerState::On);

    let host2 = Node::Host(2).address(Network::Mgmt).unwrap().to_string();
    assert!(fault(&["partition", "host2", "mgmt"]));
    assert!(fault(&["loss", "host2", "storage", "10"]), "composes with the partition");
    assert!(!ping(handle.manager_command("ping"), &host2));
    assert!(fault(&["heal", "host2"]));
    assert!(ping(handle.manager_command("ping"), &host2));
    assert!(!fault(&["explode", "host2"]), "unknown faults are refused");

    kill(Pid::from_raw(up.id() as i32), Signal::SIGINT).unwrap();
    assert!(exits_within(&mut up, Duration::from_secs(60)), "lab up ends on Ctrl-C");
    assert!(up.wait().unwrap().success());
    assert_eq!(namespaces_of(&id), Vec::<String>::new());
    assert!(!handle.dir().exists());
    assert_eq!(live_processes_mentioning(id.as_str()), Vec::<i32>::new());
}

#[test]
fn a_crashed_lab_is_cleaned_by_lab_down() {
    // Orphans of the crashed owner come to us, so we can reap them once killed
    // (this machine's PID 1 reaps nobody).
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let (mut up, id) = lab_up(1);
    up.kill().unwrap();
    up.wait().unwrap();
    assert!(!namespaces_of(&id).is_empty(), "a crash leaves the lab behind");

    assert!(lab(&["down"]));
    // Another test's lab build may have cleaned it first: only the end state counts.
    wait_for("the stale lab to be gone", SOON, || {
        namespaces_of(&id).is_empty() && live_processes_mentioning(id.as_str()).is_empty()
    })
    .unwrap();
    assert!(!PathBuf::from(DEFAULT_BASE_DIR).join(id.as_str()).exists());
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == nix::sys::wait::WaitStatus::StillAlive {
            break;
        }
    }
}
