//! Nothing of a lab outlives it: not after teardown, not after a panic, not after a
//! crashed owner (root required).

mod common;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use common::*;
use kvmha_lab::lab::{clean_stale_labs, list_netns};
use kvmha_lab::process::{all_pids, ProcessId};
use kvmha_lab::topology::{LabId, Node};
use kvmha_lab::LabConfig;

/// Live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    all_pids()
        .into_iter()
        .filter(|pid| ProcessId::of(*pid).is_some_and(|process| process.is_alive()))
        .filter_map(|pid| {
            let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let text = String::from_utf8_lossy(&bytes).replace('\0', " ");
            text.contains(needle).then_some((pid, text))
        })
        .collect()
}

#[test]
fn a_panicking_test_leaves_no_namespace_mount_or_process() {
    let stash: Mutex<Option<(LabId, PathBuf, Vec<Child>)>> = Mutex::new(None);
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        // host2's BMC is a Redfish emulator, so its cleanup is covered too.
        let lab =
            build_with(LabConfig { hosts: 2, redfish_hosts: ["host2".to_string()].into(), ..LabConfig::default() });
        let writers = vec![spawn_writer(&lab, "host1", "vm-1"), spawn_writer(&lab, "host2", "vm-2")];
        wait_writes(&lab, "vm-1", 2);
        wait_writes(&lab, "vm-2", 2);
        let running = processes_mentioning(lab.id().as_str());
        assert!(running.iter().any(|(_, command)| command.contains("ipmi_sim")), "{running:?}");
        assert!(running.iter().any(|(_, command)| command.contains("redfish_bmc.py")), "{running:?}");
        *stash.lock().unwrap() = Some((lab.id().clone(), lab.dir().to_path_buf(), writers));
        panic!("planted failure with the lab up");
    }));
    assert!(outcome.is_err(), "the planted panic happened");
    let (id, dir, mut writers) = stash.into_inner().unwrap().expect("stashed");
    for writer in &mut writers {
        assert!(exits_within(writer, SOON), "the VMs died with the lab");
    }
    let leftover_namespaces: Vec<String> =
        list_netns().into_iter().filter(|name| name.starts_with(id.as_str())).collect();
    assert!(leftover_namespaces.is_empty(), "{leftover_namespaces:?}");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(id.as_str()), "{mounts}");
    assert_eq!(processes_mentioning(id.as_str()), vec![]);
    assert!(!dir.exists(), "state directory removed");
}

#[test]
fn stale_labs_of_dead_owners_are_cleaned_and_live_ones_are_left_alone() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let base = PathBuf::from(format!("/run/kvmha-lab-test-stale-{}", std::process::id()));
    let dead_id = LabId::random().unwrap();
    let live_id = LabId::random().unwrap();
    // A pid with a start time that cannot match: its owner is certainly gone.
    let mut exited = Command::new("true").spawn().unwrap();
    exited.wait().unwrap();
    let dead_owner = format!("{} 1\n", exited.id());
    let me = ProcessId::of(std::process::id() as i32).unwrap();
    for (id, owner) in [(&dead_id, dead_owner), (&live_id, me.to_line())] {
        std::fs::create_dir_all(base.join(id.as_str())).unwrap();
        std::fs::write(base.join(id.as_str()).join("owner"), owner).unwrap();
        let namespace = id.namespace(&Node::Host(1));
        assert!(Command::new("ip").args(["netns", "add", &namespace]).status().unwrap().success());
    }
    // What a crashed run leaves: a process still running inside the stale lab.
    let mut leftover = Command::new("ip")
        .args(["netns", "exec", &dead_id.namespace(&Node::Host(1)), "sleep", "600"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Inside means: in the namespace and already `sleep` (before its exec, `ip netns
    // exec ... sleep 600` has the same pid and a matching command line).
    let stale_namespace = kvmha_lab::process::named_netns_identity(&dead_id.namespace(&Node::Host(1))).unwrap();
    kvmha_lab::lab::wait_for("the leftover to enter its namespace", SOON, || {
        let pid = leftover.id() as i32;
        let is_sleep = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|bytes| bytes.starts_with(b"sleep\0"));
        is_sleep && kvmha_lab::process::namespace_of(pid, "net").as_deref() == Some(stale_namespace.as_str())
    })
    .unwrap();

    let cleaned = clean_stale_labs(&base).expect("cleanup");

    let live_namespace = live_id.namespace(&Node::Host(1));
    let namespaces = list_netns();
    let live_survived = namespaces.contains(&live_namespace);
    let dead_survived = namespaces.contains(&dead_id.namespace(&Node::Host(1)));
    let _ = Command::new("ip").args(["netns", "delete", &live_namespace]).status();
    let _ = std::fs::remove_dir_all(&base);
    assert_eq!(cleaned, vec![dead_id.clone()]);
    assert!(exits_within(&mut leftover, SOON), "the stale lab's process was killed");
    assert!(!dead_survived, "the stale namespace is gone");
    assert!(live_survived, "a lab whose owner lives is not touched");
}
