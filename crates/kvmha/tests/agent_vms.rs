//! Agents running VMs with the lab process driver: real `kvmha` processes, real
//! `kvmha-lab-vm` writers, leases on real shared directories (issues 5 and 6).

mod common;

use common::*;
use kvmha_core::event::{RequestId, VmRunState};
use kvmha_proto::{AgentCommand, CommandResult, LeaseGrant, VmInventory};
use std::time::{Duration, Instant};

/// The fast profile's lease takeover time: nobody may take a lease over sooner.
const LEASE_TAKEOVER: Duration = Duration::from_millis(14_000);

/// A manager and `hosts`, each with the lab driver and pools `a` (its lease pool) and
/// `b`, with an armed watchdog (a plain file); all `Up`.
fn cluster_with_vm_hosts(hosts: &[&str]) -> Cluster {
    let mut cluster = Cluster::init();
    for pool in ["a", "b"] {
        std::fs::create_dir_all(cluster.dir.path().join("pools").join(pool)).expect("pool dir");
    }
    cluster.start_manager();
    for host in hosts {
        join_lab_agent(&cluster, host);
        add_agent_pools(&cluster, host);
        cluster.start_agent(host);
    }
    for host in hosts {
        cluster.wait_state(host, &["Up"]);
    }
    cluster
}

fn inventory(commander: &Commander, cluster: &Cluster, host: &str, vm: &str) -> Option<VmInventory> {
    commander.vms(cluster, host).into_iter().find(|inventory| inventory.report.name.as_str() == vm)
}

/// Kills a lab VM's process group, as a host's death would.
fn kill_lab_vm(cluster: &Cluster, host: &str, vm: &str) {
    let pid_file = cluster.agent_dir(host).join("lab/run").join(format!("{vm}.pid"));
    assert!(kill_lab_vm_group(&pid_file, &cluster.marker), "{vm} is not running as a lab vm of this cluster");
}

fn stop_vm(commander: &Commander, cluster: &Cluster, host: &str, vm: &str) -> CommandResult {
    commander.send(cluster, host, AgentCommand::StopVm { vm: vm.into(), graceful_ms: 0 }, Duration::from_secs(20))
}

#[test]
fn a_second_start_elsewhere_meets_the_held_lease_and_the_vm_runs_once() {
    let cluster = cluster_with_vm_hosts(&["host1", "host2"]);
    let _vms = LabVmsGuard::new(&cluster);
    let commander = Commander::new(&cluster);

    assert_eq!(commander.start_vm(&cluster, "host1", "vm1", 1, LeaseGrant::IfFree), CommandResult::Done);
    wait_disk_grows(&cluster, "vm1");
    let refused = commander.start_vm(&cluster, "host2", "vm1", 2, LeaseGrant::IfFree);
    assert!(
        matches!(&refused, CommandResult::LeaseHeld { owner } if owner.starts_with("host1")),
        "second start answered {refused:?}"
    );
    // Idempotent on the holder.
    assert_eq!(commander.start_vm(&cluster, "host1", "vm1", 1, LeaseGrant::IfFree), CommandResult::AlreadyRunning);
    wait_disk_grows(&cluster, "vm1");
    let writers = disk_writers(&cluster, "vm1");
    assert_eq!(writers.len(), 1, "more than one writer on vm1's disk: {writers:?}");
    assert_eq!(writers[0].0, "host1");
    // host2 defined it from the definition sent, but never started it.
    let on_host2 = inventory(&commander, &cluster, "host2", "vm1").expect("vm1 defined on host2");
    assert_eq!(on_host2.report.state, VmRunState::Stopped);
    assert!(!on_host2.lease_held);
    let on_host1 = inventory(&commander, &cluster, "host1", "vm1").expect("vm1 on host1");
    assert_eq!(on_host1.report.state, VmRunState::Running);
    assert_eq!(on_host1.report.instance, Some(RequestId(1)));
    assert!(on_host1.lease_held);

    // An operator stop releases the lease: host2 may start it at once, and host1 reports
    // it Stopped (not crashed).
    assert_eq!(stop_vm(&commander, &cluster, "host1", "vm1"), CommandResult::Done);
    let stopped = inventory(&commander, &cluster, "host1", "vm1").expect("vm1 on host1");
    assert_eq!(stopped.report.state, VmRunState::Stopped);
    assert!(!stopped.lease_held);
    let started = Instant::now();
    assert_eq!(commander.start_vm(&cluster, "host2", "vm1", 3, LeaseGrant::IfFree), CommandResult::Done);
    assert!(started.elapsed() < LEASE_TAKEOVER, "a released lease was waited for");
    wait_disk_grows(&cluster, "vm1");
    let writers = disk_writers(&cluster, "vm1");
    assert_eq!(writers.iter().map(|(host, _)| host.as_str()).collect::<Vec<_>>(), ["host1", "host2"]);
    let lines = disk_lines(&cluster, "vm1");
    let last_host1 = lines.iter().filter(|line| line.1 == "host1").map(|line| line.0).max().expect("host1 lines");
    let first_host2 = lines.iter().filter(|line| line.1 == "host2").map(|line| line.0).min().expect("host2 lines");
    assert!(last_host1 < first_host2, "host1 still wrote after host2 started");
}

#[test]
fn a_dead_owners_fresh_lease_is_broken_at_once_and_waited_for_without_the_break() {
    let mut cluster = cluster_with_vm_hosts(&["host1", "host2"]);
    let _vms = LabVmsGuard::new(&cluster);
    let commander = Commander::new(&cluster);
    for (work, vm) in [(1, "vm1"), (2, "vm2")] {
        assert_eq!(commander.start_vm(&cluster, "host1", vm, work, LeaseGrant::IfFree), CommandResult::Done);
        wait_disk_grows(&cluster, vm);
    }
    // host1 dies: its agent and its VMs, all at once. Its leases are as fresh as they get.
    cluster.agents.get_mut("host1").expect("host1").kill();
    kill_lab_vm(&cluster, "host1", "vm1");
    kill_lab_vm(&cluster, "host1", "vm2");
    let died = Instant::now();

    let grant = LeaseGrant::BreakDeadOwner { host: "host1".into(), boot_id: None, proof: "test: killed".into() };
    assert_eq!(commander.start_vm(&cluster, "host2", "vm1", 3, grant), CommandResult::Done);
    let broken_after = died.elapsed();
    // Under the lease expiry: the break did not wait for it.
    assert!(broken_after < LEASE_TAKEOVER, "the break took {broken_after:?}");
    wait_disk_grows(&cluster, "vm1");

    assert_eq!(commander.start_vm(&cluster, "host2", "vm2", 4, LeaseGrant::IfFree), CommandResult::Done);
    let taken_after = died.elapsed();
    assert!(taken_after >= LEASE_TAKEOVER, "an unproven takeover after {taken_after:?}");
    wait_disk_grows(&cluster, "vm2");
    for vm in ["vm1", "vm2"] {
        let writers = disk_writers(&cluster, vm);
        assert_eq!(writers.iter().map(|(host, _)| host.as_str()).collect::<Vec<_>>(), ["host1", "host2"], "{vm}");
    }
    eprintln!("measured: break after {broken_after:?}, IfFree takeover after {taken_after:?}");
}

#[test]
fn an_agent_killed_and_restarted_within_the_grace_keeps_its_vm_and_its_lease() {
    let mut cluster = cluster_with_vm_hosts(&["host1", "host2"]);
    let _vms = LabVmsGuard::new(&cluster);
    let commander = Commander::new(&cluster);
    assert_eq!(commander.start_vm(&cluster, "host1", "vm1", 7, LeaseGrant::IfFree), CommandResult::Done);
    wait_disk_grows(&cluster, "vm1");
    let agent = cluster.agents.get_mut("host1").expect("host1");
    agent.kill();
    cluster.start_agent("host1");
    cluster.wait("host1's restarted agent holds vm1's lease again", |cluster| {
        inventory(&commander, cluster, "host1", "vm1").is_some_and(|vm| vm.lease_held)
    });
    // Well past the self-fence time of the killed run: still running, still leased.
    std::thread::sleep(Duration::from_secs(8));
    let vm = inventory(&commander, &cluster, "host1", "vm1").expect("vm1");
    assert_eq!(vm.report.state, VmRunState::Running);
    assert_eq!(vm.report.instance, Some(RequestId(7)), "the instance was forgotten across the restart");
    assert!(vm.lease_held);
    wait_disk_grows(&cluster, "vm1");
    assert_eq!(disk_writers(&cluster, "vm1").len(), 1, "the vm was restarted");
    let log = cluster.agents["host1"].log_text();
    assert!(!log.contains("SELF-FENCE") && !log.contains("LEASE LOST"), "{log}");
    let refused = commander.start_vm(&cluster, "host2", "vm1", 8, LeaseGrant::IfFree);
    assert!(matches!(refused, CommandResult::LeaseHeld { .. }), "{refused:?}");
}

#[test]
fn an_unwritable_lease_pool_stops_the_vms_and_the_watchdog_before_any_takeover() {
    use kvmha_core::event::RecordState;
    let mut cluster = Cluster::init();
    let _vms = LabVmsGuard::new(&cluster);
    add_manager_pools(&cluster, "host1");
    cluster.start_manager();
    join_lab_agent(&cluster, "host1");
    let watchdog = add_agent_pools(&cluster, "host1");
    cluster.start_agent("host1");
    cluster.wait_state("host1", &["Up"]);
    let commander = Commander::new(&cluster);
    assert_eq!(commander.start_vm(&cluster, "host1", "vm1", 1, LeaseGrant::IfFree), CommandResult::Done);
    wait_disk_grows(&cluster, "vm1");
    let investigator = Investigator::new(&cluster.config());
    investigator.wait("advancing on both pools", "host1", Instant::now(), |states| {
        states.len() == 2 && states.iter().all(|state| *state == RecordState::Advancing)
    });

    // The lease pool `a` becomes unwritable; pool `b` stays fine.
    let broken_ms = unix_ms();
    break_pool(&cluster, "a");
    let agent_log = |cluster: &Cluster| cluster.agents["host1"].log_text();
    cluster.wait("host1 self-fences", |cluster| agent_log(cluster).contains("SELF-FENCED"));
    cluster.wait("vm1 reported self-fenced", |cluster| {
        inventory(&commander, cluster, "host1", "vm1").is_some_and(|vm| vm.report.state == VmRunState::SelfFenced)
    });
    let pid_file = cluster.agent_dir("host1").join("lab/run/vm1.pid");
    assert!(!pid_file.exists(), "the vm process is still tracked as running");
    let last_line_ms = disk_lines(&cluster, "vm1").last().expect("lines").0;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(disk_lines(&cluster, "vm1").last().expect("lines").0, last_line_ms, "vm1 still writes");
    let stopped_after = Duration::from_millis(last_line_ms.saturating_sub(broken_ms));
    assert!(stopped_after < LEASE_TAKEOVER, "vm1 wrote {stopped_after:?} after the break");
    // The watchdog is let go: no keepalive after the self-fence, and no magic close.
    let petted_at_fence = std::fs::read(&watchdog).expect("watchdog").len();
    std::thread::sleep(Duration::from_secs(2));
    let after = std::fs::read(&watchdog).expect("watchdog");
    assert!(after.len() <= petted_at_fence + 1, "keepalives continued after the self-fence");
    assert!(!after.contains(&b'V'), "a self-fenced agent released its watchdog");
    // The other pool's heartbeat never stopped advancing.
    investigator.wait("b advancing, a unreadable", "host1", Instant::now(), |states| {
        matches!(states[0], RecordState::Unreadable { .. }) && states[1] == RecordState::Advancing
    });
    let log = agent_log(&cluster);
    let line = strip_ansi(log.lines().find(|line| line.contains("SELF-FENCE:")).expect("line"));
    assert!(line.contains("lease of vm1"), "{line}");
    eprintln!("measured: vm1's last write {stopped_after:?} after the lease pool broke");
    // A self-fenced agent starts nothing.
    let refused = commander.start_vm(&cluster, "host1", "vm2", 2, LeaseGrant::IfFree);
    assert!(matches!(&refused, CommandResult::Failed { reason } if reason.contains("self-fenced")), "{refused:?}");
    cluster.agents.get_mut("host1").expect("host1").kill();
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64
}

/// host3's pools are not mounted on the manager, so its heartbeat is read through the
/// neighbours. Its pings stop reaching the manager and nobody reaches its address, but
/// its agent keeps writing heartbeats: the neighbours see them advance, and the verdict
/// in the audit log says so.
#[test]
fn a_heartbeat_only_neighbours_can_read_makes_the_verdict_alive_in_the_audit_log() {
    let mut cluster = Cluster::init();
    for pool in ["a", "b"] {
        std::fs::create_dir_all(cluster.dir.path().join("pools").join(pool)).expect("pool dir");
    }
    let mut text = std::fs::read_to_string(cluster.config()).expect("config");
    text.push_str("\n[hosts.host3]\npools = [\"a\", \"b\"]\nwatchdog = true\n");
    std::fs::write(cluster.config(), text).expect("write");
    cluster.start_manager();
    cluster.join("host1");
    cluster.join("host2");
    let silent = SilentAddress::new();
    cluster.join_with("host3", &["--advertise", &silent.address.to_string()]);
    for host in ["host1", "host2", "host3"] {
        add_agent_pools(&cluster, host);
        cluster.start_agent(host);
    }
    for host in ["host1", "host2", "host3"] {
        cluster.wait_state(host, &["Up"]);
    }
    // host3's agent restarts pointing at a manager address where nobody listens: it goes
    // on writing heartbeats, the manager hears nothing.
    cluster.agents.get_mut("host3").expect("host3").kill();
    let agent_toml = cluster.agent_dir("host3").join("agent.toml");
    let text = std::fs::read_to_string(&agent_toml).expect("agent.toml");
    let text = text.replace(&cluster.manager_url, &format!("https://127.0.0.1:{}", free_port()));
    std::fs::write(&agent_toml, text).expect("write");
    cluster.start_agent("host3");
    cluster.wait("a verdict on host3 with its heartbeat alive through neighbours", |cluster| {
        cluster.events().iter().any(|event| {
            let line = event["line"].as_str().unwrap_or("");
            line.contains("host3") && line.contains("heartbeat=alive") && line.contains("via neighbours")
        })
    });
    let lines: Vec<String> =
        cluster.events().iter().map(|event| event["line"].as_str().unwrap_or("").to_owned()).collect();
    let verdict = lines.iter().find(|line| line.contains("heartbeat=alive")).expect("verdict");
    assert!(verdict.contains("Alive"), "{verdict}");
    assert!(verdict.contains("read a: advancing") || verdict.contains("read b: advancing"), "{verdict}");
    assert!(!lines.iter().any(|line| line.contains("host3") && line.contains("Fenced")), "{lines:#?}");
    eprintln!("verdict: {verdict}");
}

/// The VM-activity investigator against a real agent and lab VM: the host's lease
/// advances while its agent runs; once agent and VM are killed, it stays unchanged, and
/// after the lease expiry on the manager's clock the finding is Dead (evidence only).
#[test]
fn vm_activity_sees_a_hosts_leases_advance_and_then_stay_unchanged_for_the_expiry() {
    use kvmha_core::event::Finding;
    let mut cluster = Cluster::init();
    let _vms = LabVmsGuard::new(&cluster);
    add_manager_pools(&cluster, "host1");
    cluster.start_manager();
    join_lab_agent(&cluster, "host1");
    add_agent_pools(&cluster, "host1");
    cluster.start_agent("host1");
    cluster.wait_state("host1", &["Up"]);
    let commander = Commander::new(&cluster);
    assert_eq!(commander.start_vm(&cluster, "host1", "vm1", 1, LeaseGrant::IfFree), CommandResult::Done);

    let config = kvmha_manager::config::ManagerConfig::load(&cluster.config()).expect("manager config");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let reader = {
        let _context = runtime.enter();
        kvmha_manager::vm_activity::VmActivityReader::start(&config).expect("reader")
    };
    let look = |after: Instant| runtime.block_on(reader.investigate(&"host1".into(), after));
    let wait_for = |what: &str, after: Instant, finding: Finding| {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let (found, evidence) = look(after);
            if found == finding {
                return evidence;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {found:?} {evidence}");
            std::thread::sleep(POLL);
        }
    };
    let evidence = wait_for("vm1's lease advancing", Instant::now(), Finding::Alive);
    assert!(evidence.contains("vm1 (a)"), "{evidence}");
    // Another host's question about host2 finds no lease of it.
    let (finding, evidence) = runtime.block_on(reader.investigate(&"host2".into(), Instant::now()));
    assert_eq!(finding, Finding::Unknown, "{evidence}");

    cluster.agents.get_mut("host1").expect("host1").kill();
    kill_lab_vm(&cluster, "host1", "vm1");
    let killed = Instant::now();
    let (finding, evidence) = look(killed + Duration::from_secs(2));
    assert_ne!(finding, Finding::Dead, "dead at once: {evidence}");
    let evidence = wait_for("vm1's lease unchanged for the expiry", killed, Finding::Dead);
    // Unchanged since the last renewal before the kill, on the manager's clock.
    let unchanged_ms: u128 = evidence
        .split("vm1 (a) unchanged for ")
        .nth(1)
        .and_then(|rest| rest.split("ms").next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no unchanged time in {evidence}"));
    assert!(unchanged_ms >= LEASE_TAKEOVER.as_millis(), "{evidence}");
    eprintln!("dead after {:?}: {evidence}", killed.elapsed());
}

/// A lease pool that is not a configured pool, or a hypervisor URI the agent cannot
/// use, refuses to start naming the field and the value.
#[test]
fn a_bad_lease_pool_or_hypervisor_is_refused_naming_the_field() {
    let mut cluster = Cluster::init();
    cluster.start_manager();
    std::fs::create_dir_all(cluster.dir.path().join("pools/a")).expect("pool a");
    std::fs::create_dir_all(cluster.dir.path().join("pools/b")).expect("pool b");
    let file = cluster.join("host1");
    add_agent_pools(&cluster, "host1");
    let good = std::fs::read_to_string(&file).expect("agent.toml");
    let cases = [
        (good.replacen("name = ", "lease_pool = \"zzz\"\nname = ", 1), "lease_pool", "zzz"),
        (good.replacen("name = ", "hypervisor = \"lab:/x?state=/y&colour=red\"\nname = ", 1), "hypervisor", "colour"),
        (good.replacen("name = ", "hypervisor = \"not a uri\"\nname = ", 1), "hypervisor", "not a uri"),
    ];
    for (text, field, value) in cases {
        assert_ne!(text, good, "the case for {field} changed nothing");
        std::fs::write(&file, &text).expect("write");
        let output = run(&["agent", "run", "--config", file.to_str().unwrap()], &[]);
        assert!(!output.status.success(), "a bad {field} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(field) && stderr.contains(value), "{field} {value:?} not named: {stderr}");
        assert!(stderr.contains("agent.toml"), "file not named: {stderr}");
    }
}

/// The manager reads host1's heartbeat on pool `b` only, and `b` breaks; host1's VM lease
/// lives on pool `a`, which the manager mounts too. When host1's pings stop reaching the
/// manager (its agent restarted against a wrong address, its VM running on), only the
/// VM lease shows the host alive, and the verdict in the audit log says so.
#[test]
fn a_host_whose_vm_leases_advance_is_alive_by_vm_activity_in_the_audit_log() {
    let mut cluster = Cluster::init();
    let _vms = LabVmsGuard::new(&cluster);
    let pools = cluster.dir.path().join("pools");
    for pool in ["a", "b"] {
        std::fs::create_dir_all(pools.join(pool)).expect("pool dir");
    }
    let mut text = std::fs::read_to_string(cluster.config()).expect("config");
    text.push_str(&format!(
        "\n[pools.a]\npath = \"{0}/a\"\n\n[pools.b]\npath = \"{0}/b\"\n\n[hosts.host1]\npools = [\"b\"]\nwatchdog = true\n",
        pools.display()
    ));
    std::fs::write(cluster.config(), text).expect("write");
    cluster.start_manager();
    join_lab_agent(&cluster, "host1");
    add_agent_pools(&cluster, "host1");
    cluster.start_agent("host1");
    cluster.wait_state("host1", &["Up"]);
    let xml = cluster.dir.path().join("vm1.xml");
    std::fs::write(&xml, lab_vm_xml("vm1")).expect("xml");
    let output = cluster.api_output(
        &["vm", "define", "--host", "host1", xml.to_str().unwrap(), "--start", "--json"],
        &cluster.operator_token,
    );
    assert!(output.status.success(), "vm define failed: {}", String::from_utf8_lossy(&output.stderr));
    wait_disk_grows(&cluster, "vm1");

    break_pool(&cluster, "b");
    cluster.agents.get_mut("host1").expect("host1").kill();
    let agent_toml = cluster.agent_dir("host1").join("agent.toml");
    let text = std::fs::read_to_string(&agent_toml).expect("agent.toml");
    let text = text.replace(&cluster.manager_url, &format!("https://127.0.0.1:{}", free_port()));
    std::fs::write(&agent_toml, text).expect("write");
    cluster.start_agent("host1");
    cluster.wait("a verdict on host1 alive by its VM lease", |cluster| {
        cluster.events().iter().any(|event| {
            let line = event["line"].as_str().unwrap_or("");
            line.contains("host1") && line.contains("vm-activity=alive")
        })
    });
    let lines: Vec<String> =
        cluster.events().iter().map(|event| event["line"].as_str().unwrap_or("").to_owned()).collect();
    let verdict = lines.iter().find(|line| line.contains("vm-activity=alive")).expect("verdict");
    assert!(verdict.contains("Alive") && verdict.contains("vm1 (a)"), "{verdict}");
    assert!(verdict.contains("heartbeat=unknown"), "the heartbeat was not what made it alive: {verdict}");
    // The VM ran on, once.
    wait_disk_grows(&cluster, "vm1");
    assert_eq!(disk_writers(&cluster, "vm1").len(), 1, "vm1 was restarted");
    eprintln!("verdict: {verdict}");
}

/// Test hygiene: every process a test starts (manager, agents, the lab VMs the agents
/// spawned in their own process groups) is gone once its cluster is dropped, also when
/// the test panics with the VMs running; and a stale pid file never becomes a group kill
/// of a group that is not a lab VM of this cluster (once this killed the shell that ran
/// the tests).
#[test]
fn a_panicking_test_leaves_no_process_behind_and_stale_pid_files_kill_nothing() {
    let marker = std::sync::Mutex::new(String::new());
    let pid_file = std::sync::Mutex::new(std::path::PathBuf::new());
    let outcome = std::panic::catch_unwind(|| {
        let cluster = cluster_with_vm_hosts(&["host1"]);
        *marker.lock().unwrap() = cluster.marker.clone();
        let commander = Commander::new(&cluster);
        assert_eq!(commander.start_vm(&cluster, "host1", "vm1", 1, LeaseGrant::IfFree), CommandResult::Done);
        wait_disk_grows(&cluster, "vm1");
        *pid_file.lock().unwrap() = cluster.agent_dir("host1").join("lab/run/vm1.pid");
        // manager, agent, vm1.
        assert!(marked_processes(&cluster.marker).len() >= 3, "{:?}", marked_processes(&cluster.marker));
        panic!("a test failing with its VMs running");
    });
    assert!(outcome.is_err());
    let marker = marker.into_inner().unwrap();
    assert!(!marker.is_empty(), "the cluster never came up");
    assert_eq!(marked_processes(&marker), Vec::new(), "processes outlived their test");

    // Pid files that name no lab VM of this cluster: ours (our own group), init's, a
    // process that is not a group leader, a live lab VM of another marker.
    let directory = tempfile::tempdir().unwrap();
    let stale = directory.path().join("stale.pid");
    let own = Recorded::of(std::process::id() as i32).expect("own stat");
    for (pid, start_ticks) in [(own.pid, own.start_ticks), (1, 0), (0, 0), (-1, 0)] {
        std::fs::write(&stale, format!("{pid} {start_ticks} 0123456789abcdef 1\n")).unwrap();
        assert!(!kill_lab_vm_group(&stale, &marker), "pid {pid}: a group kill of what is not ours");
    }
    let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
    let sleeper_process = Recorded::of(sleeper.id() as i32).expect("sleep runs");
    std::fs::write(&stale, format!("{} {} 0123456789abcdef 1\n", sleeper_process.pid, sleeper_process.start_ticks))
        .unwrap();
    assert!(!kill_lab_vm_group(&stale, &marker), "a process of our own group, without the marker");
    assert!(sleeper_process.is_alive());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
