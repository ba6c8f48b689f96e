//! The lab against real namespaces, real ipmi_sim, real sshfs (root required).

mod common;

use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use kvmha_lab::lab::wait_for;
use kvmha_lab::topology::{Network, Node};
use kvmha_lab::{LabConfig, NetSelector, PowerState};

#[test]
fn networks_reach_what_they_should_and_nothing_else() {
    let lab = build(3);
    let manager_mgmt = Node::Manager.address(Network::Mgmt).unwrap().to_string();
    let storage_server = Node::Storage.address(Network::Storage).unwrap().to_string();
    for host in lab.host_names() {
        let index: usize = host.trim_start_matches("host").parse().unwrap();
        let host_mgmt = Node::Host(index).address(Network::Mgmt).unwrap().to_string();
        let bmc = Node::Bmc(index).address(Network::Oob).unwrap().to_string();
        assert!(ping(lab.host_command(&host, "ping").unwrap(), &manager_mgmt), "{host} → manager over mgmt");
        assert!(ping(lab.manager_command("ping"), &host_mgmt), "manager → {host} over mgmt");
        assert!(ping(lab.host_command(&host, "ping").unwrap(), &storage_server), "{host} → storage server");
        assert!(!ping(lab.host_command(&host, "ping").unwrap(), &bmc), "{host} must not reach its BMC");
        let status = lab.ipmitool(&host, &["chassis", "power", "status"]).expect("BMC answers over oob");
        assert!(status.contains("Chassis Power is on"), "{status}");
        assert!(is_mounted_in_host(&lab, &host), "{host} mounts the shared storage");
    }
    let host2_mgmt = Node::Host(2).address(Network::Mgmt).unwrap().to_string();
    assert!(ping(lab.host_command("host1", "ping").unwrap(), &host2_mgmt), "host1 → host2 over mgmt");
    assert!(!ping(lab.manager_command("ping"), &storage_server), "the manager is not on storage");
    // The mounts live in the hosts' own mount namespaces, never in ours.
    let root_mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!root_mounts.contains("fuse.sshfs") || !root_mounts.contains(lab.id().as_str()));
    // The root namespace gets none of the lab's interfaces (other work on this
    // shared machine may add its own, so look for ours by name).
    let ours: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| {
            name.starts_with("br-") || ["mgmt", "storage", "oob"].contains(&name.as_str()) || name.starts_with("host")
        })
        .collect();
    assert!(ours.is_empty(), "lab interfaces in the root namespace: {ours:?}");

    // Loss drops a share of packets, not all, not none.
    lab.loss("host1", NetSelector::One(Network::Mgmt), 50).unwrap();
    let host1_mgmt = Node::Host(1).address(Network::Mgmt).unwrap().to_string();
    let output =
        lab.manager_command("ping").args(["-q", "-c", "60", "-i", "0.02", "-W", "1", &host1_mgmt]).output().unwrap();
    let summary = String::from_utf8_lossy(&output.stdout).to_string();
    let received: u32 = summary
        .split(", ")
        .find_map(|part| part.strip_suffix(" received").and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("ping summary: {summary}"));
    assert!(received > 0 && received < 60, "50 % loss each way, got {received}/60");
    lab.heal("host1", None).unwrap();
    assert!(ping(lab.manager_command("ping"), &host1_mgmt), "healed");

    // A partitioned mgmt link isolates the host from the manager only.
    lab.partition("host2", NetSelector::One(Network::Mgmt)).unwrap();
    assert!(!ping(lab.manager_command("ping"), &host2_mgmt));
    assert!(ping(lab.host_command("host2", "ping").unwrap(), &storage_server));
    lab.heal("host2", Some(NetSelector::One(Network::Mgmt))).unwrap();
    assert!(ping(lab.manager_command("ping"), &host2_mgmt));

    // bmc-fail: the BMC stops answering, the host runs on; bmc-heal brings it back.
    lab.bmc_fail("host3").unwrap();
    assert!(lab.ipmitool("host3", &["chassis", "power", "status"]).is_err());
    assert_eq!(lab.power_state("host3").unwrap(), PowerState::On);
    lab.bmc_heal("host3").unwrap();
    assert!(lab.ipmitool("host3", &["chassis", "power", "status"]).is_ok());
    // partition oob cuts the BMC the same way, healed separately from bmc-fail.
    lab.partition("host3", NetSelector::One(Network::Oob)).unwrap();
    assert!(lab.ipmitool("host3", &["chassis", "power", "status"]).is_err());
    lab.heal("host3", Some(NetSelector::All)).unwrap();
    assert!(lab.ipmitool("host3", &["chassis", "power", "status"]).is_ok());
    assert!(lab.bmc_alive("host3").unwrap());

    // A BMC simulator that dies is noticed and restarted.
    let bmc_namespace = kvmha_lab::process::named_netns_identity(&lab.namespace(&Node::Bmc(3))).unwrap();
    for process in kvmha_lab::process::processes_in_namespace("net", &bmc_namespace) {
        process.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    wait_for("ipmi_sim of host3 to die", SOON, || !lab.bmc_alive("host3").unwrap()).unwrap();
    assert_eq!(lab.ensure_bmcs_alive().unwrap(), vec!["host3".to_string()]);
    wait_for("the restarted BMC to answer", SOON, || {
        lab.ipmitool("host3", &["chassis", "power", "status"]).is_ok_and(|status| status.contains("is on"))
    })
    .unwrap();
    assert!(lab.ensure_bmcs_alive().unwrap().is_empty());
    lab.teardown().expect("teardown");
}

#[test]
fn ipmi_power_off_kills_the_vm_and_power_on_boots_the_host_again() {
    let lab = build(2);
    let mut writer = spawn_writer(&lab, "host1", "vm-a");
    wait_writes(&lab, "vm-a", 3);
    let old_init = lab.host_init("host1").unwrap().expect("host1 on");

    let started = Instant::now();
    let reply = lab.ipmitool("host1", &["chassis", "power", "off"]).expect("power off");
    assert!(reply.contains("Down/Off"), "{reply}");
    let status = lab.ipmitool("host1", &["chassis", "power", "status"]).unwrap();
    assert!(status.contains("is off"), "read back at once: {status}");
    eprintln!("ipmi power off + read back: {} ms", started.elapsed().as_millis());
    assert!(exits_within(&mut writer, SOON), "the VM died with its host");
    assert!(!old_init.is_alive());
    assert!(lab.host_processes("host1").unwrap().is_empty());
    let writes_after_off = records(&lab, "vm-a").len();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(records(&lab, "vm-a").len(), writes_after_off, "nobody writes any more");
    // host2 did not notice.
    assert_eq!(lab.power_state("host2").unwrap(), PowerState::On);

    let reply = lab.ipmitool("host1", &["chassis", "power", "on"]).expect("power on");
    assert!(reply.contains("Up/On"), "{reply}");
    let started = Instant::now();
    wait_for("host1 to boot with its storage", SOON, || is_mounted_in_host(&lab, "host1")).unwrap();
    eprintln!("ipmi power on → storage mounted: {} ms", started.elapsed().as_millis());
    let new_init = lab.host_init("host1").unwrap().expect("host1 on again");
    assert_ne!(new_init, old_init);
    assert!(lab.ipmitool("host1", &["chassis", "power", "status"]).unwrap().contains("is on"));

    // A VM started on the new boot writes with a new boot id.
    let mut writer = spawn_writer(&lab, "host1", "vm-a");
    wait_writes(&lab, "vm-a", writes_after_off + 3);
    let boot_ids: std::collections::BTreeSet<String> =
        records(&lab, "vm-a").into_iter().map(|record| record.boot_id).collect();
    assert_eq!(boot_ids.len(), 2);

    // Reset: off and on again, through the BMC.
    lab.ipmitool("host1", &["chassis", "power", "reset"]).expect("reset");
    assert!(exits_within(&mut writer, SOON));
    wait_for("host1 to come back after reset", SOON, || {
        lab.host_init("host1").unwrap().is_some_and(|init| init != new_init) && is_mounted_in_host(&lab, "host1")
    })
    .unwrap();
    lab.teardown().expect("teardown");
}

#[test]
fn storage_cut_fails_writes_with_eio_and_heal_restores_them() {
    let lab = build(1);
    let mut writer = spawn_writer(&lab, "host1", "vm-s");
    wait_writes(&lab, "vm-s", 3);
    let stderr_path = writer_stderr(&lab, "vm-s");
    let cut = Instant::now();
    lab.partition("host1", NetSelector::One(Network::Storage)).unwrap();
    wait_for("the writer to see I/O errors", Duration::from_secs(30), || {
        std::fs::read_to_string(&stderr_path).unwrap_or_default().contains("os error 5")
    })
    .unwrap_or_else(|error| panic!("{error}: {}", std::fs::read_to_string(&stderr_path).unwrap_or_default()));
    eprintln!("storage cut → first EIO: {} ms", cut.elapsed().as_millis());
    // The host itself is up and still on mgmt.
    let manager = Node::Manager.address(Network::Mgmt).unwrap().to_string();
    assert!(ping(lab.host_command("host1", "ping").unwrap(), &manager));

    let writes_during_cut = records(&lab, "vm-s").len();
    let healed = Instant::now();
    lab.heal("host1", None).unwrap();
    wait_for("writes to resume after heal", Duration::from_secs(30), || {
        records(&lab, "vm-s").len() > writes_during_cut + 2
    })
    .unwrap();
    eprintln!("storage healed → writes again: {} ms", healed.elapsed().as_millis());

    // A host reset while its storage link is cut boots without storage, its BMC
    // answering all along, and gets the storage back once the link heals.
    let probe = |name: &str| -> bool {
        let mount = lab.host_mount_dir("host1").unwrap();
        let written = lab
            .host_command("host1", "timeout")
            .unwrap()
            .args(["10", "sh", "-c", &format!("echo probe > {}/{name}", mount.display())])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        written && lab.storage_dir().join(name).exists()
    };
    let old_init = lab.host_init("host1").unwrap();
    lab.partition("host1", NetSelector::One(Network::Storage)).unwrap();
    lab.ipmitool("host1", &["chassis", "power", "reset"]).unwrap();
    wait_for("host1 to boot again", SOON, || {
        lab.host_init("host1").unwrap().is_some_and(|init| Some(init) != old_init)
    })
    .unwrap();
    let status = lab.ipmitool("host1", &["chassis", "power", "status"]).unwrap();
    assert!(status.contains("is on"), "the BMC answers while the host boots: {status}");
    assert!(!probe("during-cut"), "no storage while the link is cut");
    let healed = Instant::now();
    lab.heal("host1", None).unwrap();
    let mut attempt = 0;
    wait_for("the storage to come back after heal", Duration::from_secs(30), || {
        attempt += 1;
        probe(&format!("after-heal-{attempt}"))
    })
    .unwrap();
    eprintln!("storage healed → writable again after a boot without it: {} ms", healed.elapsed().as_millis());
    lab.teardown().expect("teardown");
    assert!(exits_within(&mut writer, SOON), "teardown kills the VM");
}

#[test]
fn hang_freezes_the_host_while_the_bmc_says_on() {
    let lab = build(1);
    let mut writer = spawn_writer(&lab, "host1", "vm-h");
    wait_writes(&lab, "vm-h", 3);
    lab.hang("host1").unwrap();
    // Give an in-flight write time to land, then the count must stand still.
    thread::sleep(Duration::from_millis(300));
    let frozen = records(&lab, "vm-h").len();
    thread::sleep(Duration::from_millis(700));
    assert_eq!(records(&lab, "vm-h").len(), frozen, "a hung host writes nothing");
    for process in lab.host_processes("host1").unwrap() {
        let state = kvmha_lab::process::proc_stat(process.pid).map(|stat| stat.state);
        // D: blocked in the kernel on the frozen sshfs; it stops when it returns.
        assert!(matches!(state, Some('T' | 't' | 'D') | None), "pid {} is {state:?}", process.pid);
    }
    let status = lab.ipmitool("host1", &["chassis", "power", "status"]).unwrap();
    assert!(status.contains("is on"), "{status}");

    lab.resume("host1").unwrap();
    wait_writes(&lab, "vm-h", frozen + 3);

    // A hung host can still be powered off by its BMC.
    lab.hang("host1").unwrap();
    lab.ipmitool("host1", &["chassis", "power", "off"]).unwrap();
    assert!(lab.ipmitool("host1", &["chassis", "power", "status"]).unwrap().contains("is off"));
    assert!(lab.host_processes("host1").unwrap().is_empty());
    lab.teardown().expect("teardown");
    assert!(exits_within(&mut writer, SOON), "teardown kills the VM");
}

#[test]
fn watchdog_resets_a_host_that_stops_petting_and_v_disarms_it() {
    let lab = build_with(LabConfig { hosts: 2, watchdog_timeout: Duration::from_secs(1), ..LabConfig::default() });
    // The "agents" write from inside their hosts, as to /dev/watchdog.
    let pet = |host: &str, text: &str| {
        let path = lab.watchdog_path(host).unwrap();
        let status = lab
            .host_command(host, "sh")
            .unwrap()
            .args(["-c", &format!("printf {text} >> {}", path.display())])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    };
    let host1_init = lab.host_init("host1").unwrap().unwrap();
    let host2_init = lab.host_init("host2").unwrap().unwrap();
    for _ in 0..4 {
        pet("host1", "1");
        pet("host2", "1");
        thread::sleep(Duration::from_millis(300));
    }
    // host2 closes cleanly with the magic 'V'; host1 just goes silent.
    pet("host2", "V");
    let silent = Instant::now();
    wait_for("the watchdog to reset host1", SOON, || {
        lab.host_init("host1").unwrap().is_some_and(|init| init != host1_init)
    })
    .unwrap();
    eprintln!("watchdog (1 s timeout) silence → host reset: {} ms", silent.elapsed().as_millis());
    let events = std::fs::read_to_string(lab.dir().join("events.log")).unwrap();
    assert!(events.contains("watchdog-reset host1"), "{events}");
    // Three timeouts later the disarmed host2 is untouched.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.host_init("host2").unwrap(), Some(host2_init));
    assert!(!events.contains("watchdog-reset host2"));

    // A host fenced (powered off) while its watchdog is armed stays off: a board
    // without power has no watchdog.
    for _ in 0..3 {
        pet("host2", "1");
        thread::sleep(Duration::from_millis(200));
    }
    lab.ipmitool("host2", &["chassis", "power", "off"]).unwrap();
    thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.power_state("host2").unwrap(), PowerState::Off);
    lab.teardown().expect("teardown");
}

#[test]
fn the_boot_script_runs_inside_the_host_at_every_power_on_and_keep_saves_storage() {
    let keep_in = std::env::temp_dir().join(format!("kvmha-lab-keep-{}", std::process::id()));
    let lab = build_with(LabConfig {
        hosts: 1,
        // As an agent would: learn its place from the environment, write to storage.
        boot_script: "echo \"$KVMHA_LAB_HOST $KVMHA_LAB_MANAGER_ADDRESS $(readlink /proc/self/ns/pid)\" \
                      >> \"$KVMHA_LAB_STORAGE_DIR/boots\"\n"
            .to_string(),
        keep_in: Some(keep_in.clone()),
        ..LabConfig::default()
    });
    let boots_path = lab.storage_dir().join("boots");
    let boots = || -> Vec<String> {
        std::fs::read_to_string(&boots_path).unwrap_or_default().lines().map(str::to_string).collect()
    };
    let host_pid_namespace = |lab: &kvmha_lab::Lab| {
        let init = lab.host_init("host1").unwrap().expect("on");
        kvmha_lab::process::namespace_of(init.pid, "pid").expect("pid namespace")
    };
    wait_for("the first boot script", SOON, || boots().len() == 1).unwrap();
    let first_init = lab.host_init("host1").unwrap();
    assert_eq!(boots()[0], format!("host1 10.77.1.2 {}", host_pid_namespace(&lab)));
    lab.power_off("host1").unwrap();
    lab.power_on("host1").unwrap();
    wait_for("the second boot script", SOON, || boots().len() == 2).unwrap();
    assert_ne!(lab.host_init("host1").unwrap(), first_init, "it ran on the new boot");
    assert_eq!(boots()[1], format!("host1 10.77.1.2 {}", host_pid_namespace(&lab)));
    let dir = lab.dir().to_path_buf();
    lab.teardown().expect("teardown");
    let kept = std::fs::read_to_string(keep_in.join("storage").join("boots")).unwrap_or_default();
    let events = std::fs::read_to_string(keep_in.join("events.log")).unwrap_or_default();
    std::fs::remove_dir_all(&keep_in).expect("remove the kept copy");
    assert_eq!(kept.lines().count(), 2, "the shared storage was kept");
    assert!(events.contains("lab-down"), "{events}");
    assert!(!dir.exists(), "the state directory itself is gone");
}

#[test]
fn the_checker_sees_a_clean_handover_and_a_split_brain_on_real_storage() {
    use kvmha_lab::checker::{no_double_run, read_disk_logs, recovery_ms, runs};
    let lab = build(2);
    let mut first = spawn_writer(&lab, "host1", "vm-x");
    wait_writes(&lab, "vm-x", 5);

    // Clean handover: host1 loses power, then the VM starts on host2.
    let fault_ms = kvmha_lab::lab::unix_ms_now();
    lab.ipmitool("host1", &["chassis", "power", "off"]).unwrap();
    assert!(exits_within(&mut first, SOON));
    let before = records(&lab, "vm-x").len();
    let mut second = spawn_writer(&lab, "host2", "vm-x");
    wait_writes(&lab, "vm-x", before + 5);
    let logs = read_disk_logs(&lab.storage_dir()).unwrap();
    let report = no_double_run(&logs);
    assert!(report.passed(), "{}", report.detail());
    let recovered = recovery_ms(&logs["vm-x"].records, fault_ms, Some("host1"));
    eprintln!("handover by hand (power off → start on host2): {recovered:?} ms");
    assert!(recovered.is_some());

    // Split brain: host1 comes back and starts the same VM while host2 still runs it.
    lab.ipmitool("host1", &["chassis", "power", "on"]).unwrap();
    wait_for("host1 back with storage", SOON, || is_mounted_in_host(&lab, "host1")).unwrap();
    let before = records(&lab, "vm-x").len();
    let mut third = spawn_writer(&lab, "host1", "vm-x");
    wait_writes(&lab, "vm-x", before + 10);
    let logs = read_disk_logs(&lab.storage_dir()).unwrap();
    let report = no_double_run(&logs);
    assert!(!report.passed(), "two writers at once must be caught");
    assert_eq!(report.overlaps.len(), 1, "{}", report.detail());
    // Both writers' appends landed whole: each run's sequence has no gap, so
    // O_APPEND over sshfs does not let one writer overwrite the other.
    let log = &logs["vm-x"];
    assert_eq!(log.malformed_lines, 0);
    for run in runs(&log.records) {
        let mut sequences: Vec<u64> =
            log.records.iter().filter(|record| record.boot_id == run.boot_id).map(|record| record.seq).collect();
        sequences.sort_unstable();
        let first_seq = sequences[0];
        assert!(
            sequences.iter().enumerate().all(|(offset, seq)| *seq == first_seq + offset as u64),
            "run {} lost lines: {sequences:?}",
            run.boot_id
        );
    }
    lab.teardown().expect("teardown");
    assert!(exits_within(&mut second, SOON));
    assert!(exits_within(&mut third, SOON));
}
