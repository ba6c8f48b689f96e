//! VM recovery end to end (issue 6): a real manager and real agents on loopback, VMs run
//! by the lab process driver (each VM a `kvmha-lab-vm` process appending
//! `<unix_ms> <host> <vm> <boot_id> <seq>` to `vms/<vm>/disk.log` on shared storage), VM
//! leases on a shared pool. Operators drive everything through the `kvmha` CLI.
//!
//! "Exactly once" is read from the disks: after a recovery every VM's disk has lines of
//! one new instance (one boot id) on one host, all after the old instance's last line.

mod common;

use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn lab_state(cluster: &Cluster, host: &str) -> PathBuf {
    cluster.agent_dir(host).join("lab")
}

/// Joins `host` with the lab driver and the shared pools `a` (VM leases) and `b`.
fn join_lab(cluster: &Cluster, host: &str) {
    std::fs::create_dir_all(lab_storage(cluster)).expect("lab storage");
    let uri = format!(
        "lab:{}?state={}&host={host}&vm_binary={}",
        lab_storage(cluster).display(),
        lab_state(cluster, host).display(),
        lab_vm_binary().display()
    );
    cluster.join_with(host, &["--hypervisor", &uri]);
    add_agent_pools(cluster, host);
}

/// A manager and `hosts` lab agents, all `Up`.
fn lab_cluster(hosts: &[&str]) -> Cluster {
    let mut cluster = Cluster::init();
    cluster.start_manager();
    for host in hosts {
        join_lab(&cluster, host);
        cluster.start_agent(host);
    }
    for host in hosts {
        cluster.wait_state(host, &["Up"]);
    }
    cluster
}

/// `kvmha ARGS --json` as the operator; panics with stderr on failure.
fn cli(cluster: &Cluster, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let output = cluster.api_output(&args, &cluster.operator_token);
    assert!(output.status.success(), "kvmha {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("json")
}

/// `kvmha ARGS` expected to fail; returns stderr.
fn cli_refused(cluster: &Cluster, args: &[&str]) -> String {
    let output = cluster.api_output(args, &cluster.operator_token);
    assert!(!output.status.success(), "kvmha {args:?} should have failed: {}", String::from_utf8_lossy(&output.stdout));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn define(cluster: &Cluster, vm: &str, host: &str, vcpus: u32) -> Value {
    let file = cluster.dir.path().join(format!("{vm}.xml"));
    std::fs::write(&file, kvmha_hypervisor_xml(vm, vcpus)).expect("xml");
    cli(cluster, &["vm", "define", "--host", host, file.to_str().unwrap(), "--start"])
}

/// The lab's minimal domain XML (as `kvmha_hypervisor::definition::lab_domain_xml`).
fn kvmha_hypervisor_xml(vm: &str, vcpus: u32) -> String {
    format!(
        "<domain type='lab'>\n  <name>{vm}</name>\n  <memory unit='MiB'>64</memory>\n  <vcpu>{vcpus}</vcpu>\n  <os>\n    <type>hvm</type>\n  </os>\n</domain>\n"
    )
}

/// (host, boot id) of every line of the VM's disk, in file order.
fn disk(cluster: &Cluster, vm: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(lab_storage(cluster).join("vms").join(vm).join("disk.log")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.len() == 5).then(|| (fields[1].to_owned(), fields[3].to_owned()))
        })
        .collect()
}

/// Instances (host, boot) in the order their first line appears, and whether any
/// instance wrote after the next one had started (two writers at once).
fn instances(lines: &[(String, String)]) -> (Vec<(String, String)>, bool) {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut overlapped = false;
    for line in lines {
        match order.iter().position(|seen| seen == line) {
            None => order.push(line.clone()),
            Some(index) if index + 1 != order.len() => overlapped = true,
            Some(_) => {}
        }
    }
    (order, overlapped)
}

fn wait_disk_lines(cluster: &Cluster, vm: &str, host: &str, at_least: usize) {
    cluster.wait(&format!("{at_least} lines of {vm} from {host}"), |cluster| {
        disk(cluster, vm).iter().filter(|(writer, _)| writer == host).count() >= at_least
    });
}

/// SIGKILLs every live lab VM process group recorded in `host`'s state directory (only
/// groups the lab driver made for this cluster: see `kill_lab_vm_group`).
fn kill_lab_vms(cluster: &Cluster, host: &str, only: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(lab_state(cluster, host).join("run")) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|extension| extension.to_str()) != Some("pid") {
            continue;
        }
        if only.is_some_and(|vm| path.file_stem().and_then(|stem| stem.to_str()) != Some(vm)) {
            continue;
        }
        kill_lab_vm_group(&path, &cluster.marker);
    }
}

/// A host dies: its agent and its VMs are SIGKILLed at once.
fn kill_host(cluster: &mut Cluster, host: &str) {
    cluster.agents.get_mut(host).expect("agent").kill();
    kill_lab_vms(cluster, host, None);
}

/// Audit lines (id, line) containing `needle`, in log order.
fn audit(cluster: &Cluster, needle: &str) -> Vec<(i64, String)> {
    cluster
        .events()
        .iter()
        .filter_map(|event| {
            let line = event["line"].as_str().unwrap_or("");
            line.contains(needle).then(|| (event["id"].as_i64().unwrap_or(0), line.to_owned()))
        })
        .collect()
}

/// Confirms `host` down once the manager suspects it (proof 3 of the safety rule).
fn confirm_down(cluster: &Cluster, host: &str) {
    cluster.wait_state(host, &["Investigating", "Degraded", "Fencing", "FenceFailed"]);
    cli(cluster, &["host", "confirm-down", host]);
    cluster.wait_state(host, &["Fenced"]);
}

/// Every instance after the first is the one recovery started: exactly one, on
/// `expected_host` if given, never overlapping the old one.
fn assert_restarted_once(cluster: &Cluster, vm: &str, dead: &str) -> String {
    let (order, overlapped) = instances(&disk(cluster, vm));
    assert!(!overlapped, "vm {vm}: two instances wrote at once: {order:?}");
    assert_eq!(order.len(), 2, "vm {vm}: expected the old instance and one new one, got {order:?}");
    assert_eq!(order[0].0, dead, "vm {vm}: first instance not on {dead}: {order:?}");
    assert_ne!(order[1].0, dead, "vm {vm}: restarted on the dead host: {order:?}");
    order[1].0.clone()
}

#[test]
fn a_dead_hosts_ha_vms_restart_elsewhere_in_priority_order_each_exactly_once() {
    let mut cluster = lab_cluster(&["host1", "host2", "host3"]);
    let _cleanup = LabVmsGuard::new(&cluster);
    let defined = define(&cluster, "db1", "host1", 1);
    assert_eq!(defined["definition"], true, "{defined}");
    define(&cluster, "db2", "host1", 1);
    define(&cluster, "web", "host1", 1);
    define(&cluster, "scratch", "host1", 1);
    cli(&cluster, &["vm", "ha", "db1", "enable", "--priority", "10", "--group", "db-tier"]);
    cli(&cluster, &["vm", "ha", "db2", "enable", "--priority", "5", "--group", "db-tier"]);
    let shown = cli(&cluster, &["vm", "ha", "web", "enable", "--priority", "1", "--max-restarts", "2"]);
    assert_eq!(
        (shown["ha"].as_bool(), shown["priority"].as_i64(), shown["max_restarts"].as_u64()),
        (Some(true), Some(1), Some(2))
    );
    for vm in ["db1", "db2", "web", "scratch"] {
        wait_vm(&cluster, vm, |state, host| state == "Running" && host == "host1");
        wait_disk_lines(&cluster, vm, "host1", 3);
    }

    kill_host(&mut cluster, "host1");
    confirm_down(&cluster, "host1");
    for vm in ["db1", "db2", "web"] {
        wait_vm(&cluster, vm, |state, host| state == "Running" && host != "host1");
    }
    wait_vm(&cluster, "scratch", |state, _| state == "Stopped");
    // Let every new instance write a while: a second writer would show up now.
    for vm in ["db1", "db2", "web"] {
        let host = vms(&cluster)[vm].1.clone();
        wait_disk_lines(&cluster, vm, &host, 10);
    }
    let db1 = assert_restarted_once(&cluster, "db1", "host1");
    let db2 = assert_restarted_once(&cluster, "db2", "host1");
    assert_restarted_once(&cluster, "web", "host1");
    assert_ne!(db1, db2, "anti-affinity group db-tier put db1 and db2 together on {db1}");
    let (order, _) = instances(&disk(&cluster, "scratch"));
    assert_eq!(order.len(), 1, "the HA-off VM was restarted: {order:?}");

    // Priority order and every step in the audit log.
    let intents = audit(&cluster, "VmStartIntent");
    let position = |vm: &str| {
        intents
            .iter()
            .position(|(_, line)| line.contains(&format!("vm {vm} ")))
            .unwrap_or_else(|| panic!("no start intent for {vm}: {intents:?}"))
    };
    assert!(position("db1") < position("db2") && position("db2") < position("web"), "{intents:?}");
    for vm in ["db1", "db2", "web"] {
        let starts = intents.iter().filter(|(_, line)| line.contains(&format!("vm {vm} "))).count();
        assert_eq!(starts, 1, "vm {vm} start intents: {intents:?}");
        assert!(intents[position(vm)].1.contains("host1 proven dead (OperatorConfirmed)"), "{intents:?}");
        let started: Vec<(i64, String)> = audit(&cluster, &format!("vm {vm} VmStartOutcome"))
            .into_iter()
            .filter(|(_, line)| !line.contains("operator start"))
            .collect();
        assert_eq!(started.len(), 1, "{started:?}");
        assert!(started[0].1.contains("started") || started[0].1.contains("seen running"), "{started:?}");
    }
    assert!(!audit(&cluster, "confirm-down by operator-token").is_empty());
    // Measured, not asserted: engine time from the confirmation to the last start.
    let events = cluster.events();
    let at = |needle: &str| {
        events
            .iter()
            .filter(|event| event["line"].as_str().unwrap_or("").contains(needle))
            .filter_map(|event| event["at_ms"].as_u64())
            .collect::<Vec<_>>()
    };
    let confirmed = at("confirm-down by operator-token")[0];
    let last_start = at("VmStartOutcome").into_iter().max().unwrap_or(confirmed);
    eprintln!("recovery: last of 3 VMs started {} ms after confirm-down", last_start - confirmed);
    assert!(!audit(&cluster, "vm db1 Operator: HA enabled by operator-token: priority 10, group db-tier").is_empty());
    assert!(!audit(&cluster, "vm scratch VmState: Stopped: host1 proven dead; not HA").is_empty());
}

#[test]
fn vms_that_fit_nowhere_wait_in_pending_capacity_and_start_when_a_host_joins() {
    let mut cluster = lab_cluster(&["host1", "host2"]);
    let _cleanup = LabVmsGuard::new(&cluster);
    let cpus = cli(&cluster, &["host", "show", "host2"])["cpus"].as_u64().expect("cpus") as u32;
    assert!(cpus >= 1);
    // Each VM needs a whole host: host2 takes one, the other waits.
    define(&cluster, "big1", "host1", cpus);
    define(&cluster, "big2", "host1", cpus);
    cli(&cluster, &["vm", "ha", "big1", "enable", "--priority", "10"]);
    cli(&cluster, &["vm", "ha", "big2", "enable", "--priority", "5"]);
    for vm in ["big1", "big2"] {
        wait_vm(&cluster, vm, |state, host| state == "Running" && host == "host1");
    }
    kill_host(&mut cluster, "host1");
    confirm_down(&cluster, "host1");
    wait_vm(&cluster, "big1", |state, host| state == "Running" && host == "host2");
    wait_vm(&cluster, "big2", |state, _| state == "PendingCapacity");
    // Still waiting a while later: nothing forced it anywhere.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vms(&cluster)["big2"].0, "PendingCapacity");
    assert_eq!(instances(&disk(&cluster, "big2")).0.len(), 1);

    join_lab(&cluster, "host3");
    cluster.start_agent("host3");
    wait_vm(&cluster, "big2", |state, host| state == "Running" && host == "host3");
    wait_disk_lines(&cluster, "big2", "host3", 5);
    assert_eq!(assert_restarted_once(&cluster, "big2", "host1"), "host3");
    assert_eq!(assert_restarted_once(&cluster, "big1", "host1"), "host2");
    assert!(!audit(&cluster, "vm big2 VmState: PendingCapacity").is_empty());
}

#[test]
fn a_vm_that_keeps_crashing_is_restarted_on_its_host_until_its_budget_is_spent_then_error() {
    let cluster = lab_cluster(&["host1", "host2"]);
    let _cleanup = LabVmsGuard::new(&cluster);
    define(&cluster, "flaky", "host1", 1);
    cli(&cluster, &["vm", "ha", "flaky", "enable", "--max-restarts", "1", "--max-relocations", "0"]);
    wait_vm(&cluster, "flaky", |state, host| state == "Running" && host == "host1");
    wait_disk_lines(&cluster, "flaky", "host1", 3);

    // First crash: restarted on the same host (VM-level HA, same host first).
    kill_lab_vms(&cluster, "host1", Some("flaky"));
    cluster.wait("flaky restarted once", |cluster| instances(&disk(cluster, "flaky")).0.len() == 2);
    wait_vm(&cluster, "flaky", |state, host| state == "Running" && host == "host1");
    let (order, overlapped) = instances(&disk(&cluster, "flaky"));
    assert!(!overlapped && order.iter().all(|(host, _)| host == "host1"), "{order:?}");
    let shown = cli(&cluster, &["vm", "show", "flaky"]);
    assert_eq!(shown["restarts"], 1, "{shown}");

    // Second crash: one restart per host, no relocation allowed: Error, not restarted.
    wait_disk_lines(&cluster, "flaky", "host1", 6);
    kill_lab_vms(&cluster, "host1", Some("flaky"));
    wait_vm(&cluster, "flaky", |state, _| state == "Error");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(instances(&disk(&cluster, "flaky")).0.len(), 2, "restarted after its budget was spent");
    assert!(!audit(&cluster, "vm flaky VmState: Error: restart budget spent").is_empty());
    assert!(!audit(&cluster, "crashed on host1; to be restarted").is_empty());
}

#[test]
fn an_operator_stop_is_never_undone_and_a_start_elsewhere_is_refused_while_a_live_lease_is_held() {
    let mut cluster = lab_cluster(&["host1", "host2"]);
    let _cleanup = LabVmsGuard::new(&cluster);
    define(&cluster, "app", "host1", 1);
    cli(&cluster, &["vm", "ha", "app", "enable"]);
    wait_vm(&cluster, "app", |state, host| state == "Running" && host == "host1");

    // A stop on purpose: Stopped, and HA leaves it stopped.
    let stopped = cli(&cluster, &["vm", "stop", "app", "--graceful-ms", "2000"]);
    assert_eq!(stopped["state"], "Stopped", "{stopped}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vms(&cluster)["app"].0, "Stopped");
    let lines = disk(&cluster, "app").len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(disk(&cluster, "app").len(), lines, "the stopped VM still writes");
    assert!(!audit(&cluster, "vm app Operator: stop on host1 by operator-token").is_empty());

    // Started again on another host: the engine follows it there.
    cli(&cluster, &["vm", "start", "app", "--host", "host2"]);
    wait_vm(&cluster, "app", |state, host| state == "Running" && host == "host2");
    wait_disk_lines(&cluster, "app", "host2", 3);

    // A second VM, not HA, runs on host1. Then host1 loses the manager but keeps running:
    // its agent (restarted pointing at a dead manager address) still renews the VM's
    // lease. An operator who wrongly confirms host1 down and starts the VM on host2 is
    // refused by the lease.
    define(&cluster, "legacy", "host1", 1);
    wait_vm(&cluster, "legacy", |state, host| state == "Running" && host == "host1");
    wait_disk_lines(&cluster, "legacy", "host1", 3);
    cluster.agents.get_mut("host1").expect("agent").kill();
    let agent_toml = cluster.agent_dir("host1").join("agent.toml");
    let text = std::fs::read_to_string(&agent_toml).expect("agent.toml");
    let cut_off = text
        .lines()
        .map(|line| {
            if line.starts_with("manager_url") {
                format!("manager_url = \"https://127.0.0.1:{}\"", free_port())
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&agent_toml, cut_off).expect("agent.toml");
    cluster.start_agent("host1");
    confirm_down(&cluster, "host1");
    wait_vm(&cluster, "legacy", |state, _| state == "Stopped");
    let refused = cli_refused(&cluster, &["vm", "start", "legacy", "--host", "host2"]);
    assert!(refused.contains("lease held by host1"), "{refused}");
    let (order, _) = instances(&disk(&cluster, "legacy"));
    assert!(order.iter().all(|(host, _)| host == "host1"), "{order:?}");
    assert!(!audit(&cluster, "refused: lease held by host1").is_empty());
    // The HA VM on host2 was never touched.
    assert_eq!(vms(&cluster)["app"], ("Running".to_owned(), "host2".to_owned()));
}

#[test]
fn a_manager_killed_mid_recovery_resumes_and_starts_no_vm_twice() {
    let mut cluster = lab_cluster(&["host1", "host2", "host3"]);
    let _cleanup = LabVmsGuard::new(&cluster);
    let names = ["r1", "r2", "r3", "r4"];
    for (index, vm) in names.iter().enumerate() {
        define(&cluster, vm, "host1", 1);
        let priority = (10 - index).to_string();
        cli(&cluster, &["vm", "ha", vm, "enable", "--priority", &priority]);
    }
    for vm in names {
        wait_vm(&cluster, vm, |state, host| state == "Running" && host == "host1");
    }
    kill_host(&mut cluster, "host1");
    confirm_down(&cluster, "host1");
    // The moment the first start is decided (persisted before it is sent), the manager dies.
    let deadline = Instant::now() + WAIT_LIMIT;
    while audit(&cluster, "VmStartIntent").is_empty() {
        assert!(Instant::now() < deadline, "no start intent");
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.manager.as_mut().expect("manager").kill();
    cluster.start_manager();
    for vm in names {
        wait_vm(&cluster, vm, |state, host| state == "Running" && host != "host1");
    }
    for vm in names {
        let host = vms(&cluster)[vm].1.clone();
        wait_disk_lines(&cluster, vm, &host, 10);
        assert_restarted_once(&cluster, vm, "host1");
    }
    let resent = audit(&cluster, "sent again: manager restarted");
    eprintln!("starts resent after the manager restart: {}", resent.len());
}

#[test]
fn disarming_and_arming_the_cluster_leaves_running_vms_alone() {
    let cluster = lab_cluster(&["host1", "host2"]);
    let _cleanup = LabVmsGuard::new(&cluster);
    define(&cluster, "steady1", "host1", 1);
    define(&cluster, "steady2", "host2", 1);
    for vm in ["steady1", "steady2"] {
        cli(&cluster, &["vm", "ha", vm, "enable"]);
    }
    wait_vm(&cluster, "steady1", |state, host| state == "Running" && host == "host1");
    wait_vm(&cluster, "steady2", |state, host| state == "Running" && host == "host2");
    let instance = |vm: &str| cli(&cluster, &["vm", "show", vm])["instance"].clone();
    let before = (instance("steady1"), instance("steady2"));
    assert!(before.0.is_u64() && before.1.is_u64(), "{before:?}");

    cli(&cluster, &["cluster", "disarm"]);
    cluster.wait("the agents hear of the disarm", |cluster| {
        cluster.try_api(&["vm", "list", "--json"]).is_some()
            && !audit(cluster, "cluster disarmed by operator-token").is_empty()
    });
    wait_disk_lines(&cluster, "steady1", "host1", disk(&cluster, "steady1").len() + 10);
    cli(&cluster, &["cluster", "arm"]);
    wait_disk_lines(&cluster, "steady2", "host2", disk(&cluster, "steady2").len() + 10);

    assert_eq!((instance("steady1"), instance("steady2")), before);
    for (vm, host) in [("steady1", "host1"), ("steady2", "host2")] {
        assert_eq!(vms(&cluster)[vm], ("Running".to_owned(), host.to_owned()));
        let (order, overlapped) = instances(&disk(&cluster, vm));
        assert!(order.len() == 1 && !overlapped, "vm {vm} restarted: {order:?}");
    }
    assert!(audit(&cluster, "VmStartIntent").is_empty(), "{:?}", audit(&cluster, "VmStartIntent"));
    assert!(!audit(&cluster, "cluster armed by operator-token: protection restored").is_empty());
}

#[test]
fn maintenance_moves_every_vm_off_the_host_by_priority_each_exactly_once() {
    let cluster = lab_cluster(&["host1", "host2", "host3"]);
    let _cleanup = LabVmsGuard::new(&cluster);
    for (vm, priority) in [("m1", "10"), ("m2", "5")] {
        define(&cluster, vm, "host1", 1);
        cli(&cluster, &["vm", "ha", vm, "enable", "--priority", priority]);
    }
    define(&cluster, "m3", "host1", 1);
    for vm in ["m1", "m2", "m3"] {
        wait_vm(&cluster, vm, |state, host| state == "Running" && host == "host1");
        wait_disk_lines(&cluster, vm, "host1", 3);
    }

    // Without --json: the progress on stderr, one plain line per VM moved, until the host
    // is in Maintenance (stderr is a pipe here: no terminal escapes).
    let output = cluster.api_output(&["host", "maintenance", "host1", "on"], &cluster.operator_token);
    let progress = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{progress}");
    assert_eq!(cluster.states()["host1"], "Maintenance", "the command returned before the host was: {progress}");
    let lines: Vec<&str> = progress.lines().collect();
    assert!(lines.first().is_some_and(|line| line.contains("moving 3 VMs off first: m1, m2, m3")), "{progress}");
    for (step, vm) in [(1, "m1"), (2, "m2"), (3, "m3")] {
        let target = vms(&cluster)[vm].1.clone();
        let expected = format!("maintenance host1: [{step}/3] {vm} moved to {target}");
        assert!(lines.contains(&expected.as_str()), "no {expected:?} in:\n{progress}");
    }
    assert!(lines.last().is_some_and(|line| line.starts_with("maintenance host1: in Maintenance (")), "{progress}");
    assert!(!progress.contains('\u{1b}'), "terminal escapes in piped output: {progress:?}");
    for vm in ["m1", "m2", "m3"] {
        wait_vm(&cluster, vm, |state, host| state == "Running" && host != "host1");
    }
    cluster.wait_state("host1", &["Maintenance"]);
    for vm in ["m1", "m2", "m3"] {
        let host = vms(&cluster)[vm].1.clone();
        wait_disk_lines(&cluster, vm, &host, 10);
        assert_restarted_once(&cluster, vm, "host1");
    }
    let stops = audit(&cluster, "VmStopIntent");
    let position = |vm: &str| {
        stops
            .iter()
            .position(|(_, line)| line.contains(&format!("vm {vm} ")))
            .unwrap_or_else(|| panic!("no stop intent for {vm}: {stops:?}"))
    };
    assert!(position("m1") < position("m2"), "{stops:?}");
    assert!(!audit(&cluster, "maintenance on by operator-token: moving 3 VMs off first").is_empty());

    // Back from maintenance: nothing moves back, nothing restarts.
    cli(&cluster, &["host", "maintenance", "host1", "off"]);
    cluster.wait_state("host1", &["Up"]);
    let placed: Vec<String> = ["m1", "m2", "m3"].iter().map(|vm| vms(&cluster)[*vm].1.clone()).collect();
    std::thread::sleep(Duration::from_secs(1));
    let still: Vec<String> = ["m1", "m2", "m3"].iter().map(|vm| vms(&cluster)[*vm].1.clone()).collect();
    assert_eq!(placed, still);
}

/// Sets the cluster's `shutdown_policy` in manager.toml; call before the manager starts.
fn set_shutdown_policy(cluster: &Cluster, policy: &str) {
    let text = std::fs::read_to_string(cluster.config()).expect("config");
    let line = format!("shutdown_policy = \"{policy}\"");
    let text = if text.lines().any(|existing| existing.starts_with("shutdown_policy")) {
        text.lines()
            .map(|existing| if existing.starts_with("shutdown_policy") { line.clone() } else { existing.to_owned() })
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        // A top-level key: before every table.
        format!("{line}\n{text}")
    };
    std::fs::write(cluster.config(), text).expect("write");
}

/// A manager with `policy` and three lab agents, all `Up`; `web` (HA) runs on host1.
fn cluster_for_a_planned_stop(policy: &str) -> Cluster {
    let mut cluster = Cluster::init();
    set_shutdown_policy(&cluster, policy);
    cluster.start_manager();
    for host in ["host1", "host2", "host3"] {
        join_lab(&cluster, host);
        cluster.start_agent(host);
    }
    for host in ["host1", "host2", "host3"] {
        cluster.wait_state(host, &["Up"]);
    }
    define(&cluster, "web", "host1", 1);
    cli(&cluster, &["vm", "ha", "web", "enable", "--priority", "5"]);
    wait_vm(&cluster, "web", |state, host| state == "Running" && host == "host1");
    wait_disk_lines(&cluster, "web", "host1", 3);
    cluster
}

/// Audit ids of host state changes into `to` (e.g. "-> Fenced").
fn transitions_into(cluster: &Cluster, host: &str, to: &str) -> Vec<i64> {
    audit(cluster, &format!("-> {to}:"))
        .into_iter()
        .filter(|(_, line)| line.starts_with(&format!("{host} ")))
        .map(|(id, _)| id)
        .collect()
}

#[test]
fn under_the_failover_policy_a_stopped_agents_ha_vm_runs_on_another_host_exactly_once_and_nobody_is_fenced() {
    let mut cluster = cluster_for_a_planned_stop("failover");
    let agent = cluster.agents.get_mut("host1").expect("agent");
    agent.signal("TERM");
    assert!(agent.wait_exit().success(), "the agent's stop failed:\n{}", agent.log_text());
    let log = cluster.agents["host1"].log_text();
    assert!(log.contains("failover shutdown policy"), "{log}");

    wait_vm(&cluster, "web", |state, host| state == "Running" && host != "host1");
    let (_, target) = vms(&cluster)["web"].clone();
    wait_disk_lines(&cluster, "web", &target, 3);
    assert_eq!(assert_restarted_once(&cluster, "web", "host1"), target);
    // Moved on the agent's word, before any suspicion: the restart's audit line comes
    // before host1 was ever suspect, and nobody was fenced.
    let restarted = audit(&cluster, "vm web VmState: Running")
        .into_iter()
        .filter(|(_, line)| !line.starts_with("host1 "))
        .map(|(id, _)| id)
        .next()
        .expect("the restart's audit line");
    let suspected = transitions_into(&cluster, "host1", "Suspect");
    assert!(suspected.iter().all(|id| *id > restarted), "suspected before the restart: {suspected:?} {restarted}");
    assert!(audit(&cluster, "stopped for a planned stop").len() + audit(&cluster, "failover").len() > 0);
    for host in ["host1", "host2", "host3"] {
        assert_eq!(transitions_into(&cluster, host, "Fenced"), Vec::<i64>::new(), "{host} fenced");
        assert_eq!(transitions_into(&cluster, host, "Fencing"), Vec::<i64>::new(), "{host} being fenced");
    }
}

#[test]
fn under_the_freeze_policy_a_stopped_agents_vm_stays_where_it_is() {
    let mut cluster = cluster_for_a_planned_stop("freeze");
    let agent = cluster.agents.get_mut("host1").expect("agent");
    agent.signal("TERM");
    assert!(agent.wait_exit().success(), "the agent's stop failed:\n{}", agent.log_text());
    // The VM writes on without its agent, and the manager works through its silence.
    cluster.wait_state("host1", &["Suspect", "Investigating", "Degraded", "FenceFailed"]);
    let lines_now = disk(&cluster, "web").len();
    wait_disk_lines(&cluster, "web", "host1", lines_now + 10);
    let (order, overlapped) = instances(&disk(&cluster, "web"));
    assert!(!overlapped);
    assert_eq!(order.len(), 1, "web moved or restarted under the freeze policy: {order:?}");
    let (state, host) = vms(&cluster)["web"].clone();
    assert_eq!(host, "host1", "web is {state} on {host}");
    assert!(transitions_into(&cluster, "host1", "Fenced").is_empty());
}

/// Operator intent wins over recovery: a host dies, and while it is being investigated
/// (its VMs still bound to it) an operator stops one. The stop cannot reach the dead host
/// (the command fails), but the engine took it first: once the host is proven dead the
/// recovery worker restarts the other VM and nothing for the stopped one.
#[test]
fn an_operator_stop_during_recovery_cancels_that_vms_restart() {
    let mut cluster = lab_cluster(&["host1", "host2", "host3"]);
    for vm in ["db", "web"] {
        define(&cluster, vm, "host1", 1);
        cli(&cluster, &["vm", "ha", vm, "enable", "--priority", "5"]);
        wait_vm(&cluster, vm, |state, host| state == "Running" && host == "host1");
        wait_disk_lines(&cluster, vm, "host1", 3);
    }
    kill_host(&mut cluster, "host1");
    cluster.wait_state("host1", &["Investigating", "Degraded", "Fencing", "FenceFailed"]);
    // Sent to a dead host: no answer, so the command reports the failure; the engine
    // keeps the operator's word either way.
    let stop = cluster.api_output(&["vm", "stop", "web"], &cluster.operator_token);
    let said = format!("{}{}", String::from_utf8_lossy(&stop.stdout), String::from_utf8_lossy(&stop.stderr));
    wait_vm(&cluster, "web", |state, _| state == "Stopped");
    let intent = audit(&cluster, "vm web VmState: Stopped: stop by operator-token");
    let cancelled = audit(&cluster, "pending restart cancelled by an operator stop");
    assert!(!intent.is_empty() || !cancelled.is_empty(), "{said}");
    cli(&cluster, &["host", "confirm-down", "host1"]);
    cluster.wait_state("host1", &["Fenced"]);
    wait_vm(&cluster, "db", |state, host| state == "Running" && host != "host1");
    let (_, db_host) = vms(&cluster)["db"].clone();
    wait_disk_lines(&cluster, "db", &db_host, 3);
    assert_restarted_once(&cluster, "db", "host1");
    // The manager's recovery worker started nothing for web.
    assert_eq!(vms(&cluster)["web"].0, "Stopped");
    let (order, _) = instances(&disk(&cluster, "web"));
    assert_eq!(order.len(), 1, "web was restarted after the operator stopped it: {order:?}");
    assert!(audit(&cluster, "vm web VmStartIntent").is_empty());
}
