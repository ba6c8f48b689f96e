//! The lab process driver with real `kvmha-lab-vm` processes in a temporary directory.

mod common;

use std::time::{Duration, Instant};

use common::{assert_one_boot, process_running, Lab};
use kvmha_hypervisor::definition::lab_domain_xml;
use kvmha_hypervisor::{
    CrashReason, DomainInfo, DomainState, Error, Hypervisor, MigrateRequest, OpenOptions, ShutOffReason,
    ShutdownOutcome, ShutdownRequest,
};
use rustix::process::{kill_process, Pid, Signal};

fn kill(pid: u32, signal: Signal) {
    kill_process(Pid::from_raw(pid as i32).unwrap(), signal).expect("signal the vm process");
}

async fn define_and_start(lab: &Lab, vm: &str) -> (u32, String) {
    assert_eq!(lab.driver.define(&lab_domain_xml(vm, 2, 128)).await.unwrap(), vm);
    lab.driver.start(vm).await.unwrap();
    let pid = lab.driver.pid(vm).await.unwrap().expect("running vm has a pid");
    let boot_id = lab.driver.boot_id(vm).await.unwrap().expect("running vm has a boot id");
    (pid, boot_id)
}

#[tokio::test]
async fn start_writes_heartbeat_lines_and_destroy_stops_them() {
    let lab = Lab::new();
    let (pid, boot_id) = define_and_start(&lab, "vm1").await;
    assert_eq!(boot_id.len(), 16);

    let info = lab.driver.domain("vm1").await.unwrap();
    assert_eq!(info.state, DomainState::Running);
    assert!(info.active);
    assert_eq!((info.vcpus, info.memory_kib), (2, 128 * 1024));

    let lines = lab.wait_for_lines("vm1", 6);
    assert_one_boot(&lines, "vm1", &boot_id);
    // One line per ~100 ms: the span of the first six lines is five intervals.
    let span_ms = lines[5].unix_ms - lines[0].unix_ms;
    // Generous upper bound: a loaded CI machine may stall fsync, never speed it up.
    assert!((400..=3000).contains(&span_ms), "5 intervals took {span_ms} ms");

    lab.driver.destroy("vm1").await.unwrap();
    assert!(!process_running(pid), "SIGKILL of the group ends the process");
    let info = lab.driver.domain("vm1").await.unwrap();
    assert_eq!(info.state, DomainState::ShutOff(ShutOffReason::Destroyed));
    assert!(!info.active);
    assert_eq!(lab.driver.pid("vm1").await.unwrap(), None);

    let written = lab.lines("vm1").len();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(lab.lines("vm1").len(), written, "no writes after destroy");

    let error = lab.driver.destroy("vm1").await.unwrap_err();
    assert!(matches!(error, Error::InvalidState { .. }), "{error}");
}

#[tokio::test]
async fn a_vm_killed_from_outside_is_crashed_and_restarts_with_a_new_boot() {
    let lab = Lab::new();
    let (pid, first_boot) = define_and_start(&lab, "vm1").await;
    lab.wait_for_lines("vm1", 2);

    kill(pid, Signal::KILL);
    let crashed = wait_for_state(&lab.driver, "vm1", |state| state != DomainState::Running).await;
    assert_eq!(crashed.state, DomainState::Crashed(CrashReason::ProcessExited));
    assert!(!crashed.active);
    assert!(!crashed.state.may_be_running());

    // A crashed VM is not running: a shutdown is refused, a start begins a new boot.
    let error = lab
        .driver
        .shutdown("vm1", ShutdownRequest { timeout: Duration::from_secs(1), destroy_on_timeout: false })
        .await
        .unwrap_err();
    assert!(matches!(error, Error::InvalidState { .. }), "{error}");
    let lines_before_restart = lab.lines("vm1").len();
    lab.driver.start("vm1").await.unwrap();
    let second_boot = lab.driver.boot_id("vm1").await.unwrap().unwrap();
    assert_ne!(second_boot, first_boot);
    let lines = lab.wait_for_lines("vm1", lines_before_restart + 3);
    assert_one_boot(&lines[..lines_before_restart], "vm1", &first_boot);
    assert_one_boot(&lines[lines_before_restart..], "vm1", &second_boot);
    assert_eq!(lab.driver.domain("vm1").await.unwrap().state, DomainState::Running);
}

#[tokio::test]
async fn destroy_acknowledges_a_crash() {
    let lab = Lab::new();
    let (pid, _) = define_and_start(&lab, "vm1").await;
    kill(pid, Signal::KILL);
    wait_for_state(&lab.driver, "vm1", |state| matches!(state, DomainState::Crashed(_))).await;
    lab.driver.destroy("vm1").await.unwrap();
    assert_eq!(lab.driver.domain("vm1").await.unwrap().state, DomainState::ShutOff(ShutOffReason::Destroyed));
}

#[tokio::test]
async fn a_restarted_driver_finds_running_vms_and_their_crashes() {
    let lab = Lab::new();
    let (pid1, boot1) = define_and_start(&lab, "vm1").await;
    let (pid2, _) = define_and_start(&lab, "vm2").await;
    lab.wait_for_lines("vm1", 2);

    // The agent restarts: a new driver on the same state dir, the VMs keep running.
    let restarted = lab.restarted_driver();
    let listed = restarted.list().await.unwrap();
    let states: Vec<(&str, DomainState)> = listed.iter().map(|info| (info.name.as_str(), info.state)).collect();
    assert_eq!(states, [("vm1", DomainState::Running), ("vm2", DomainState::Running)]);
    assert_eq!(restarted.pid("vm1").await.unwrap(), Some(pid1));
    assert_eq!(restarted.boot_id("vm1").await.unwrap(), Some(boot1));
    let error = restarted.start("vm1").await.unwrap_err();
    assert!(matches!(error, Error::InvalidState { .. }), "{error}");

    // vm2 dies while not a child of the new driver: seen through /proc, still a crash.
    kill(pid2, Signal::KILL);
    let crashed = wait_for_state(&restarted, "vm2", |state| matches!(state, DomainState::Crashed(_))).await;
    assert_eq!(crashed.state, DomainState::Crashed(CrashReason::ProcessExited));

    // And it can stop what the old driver started.
    restarted.destroy("vm1").await.unwrap();
    assert!(!process_running(pid1));
    assert_eq!(restarted.domain("vm1").await.unwrap().state, DomainState::ShutOff(ShutOffReason::Destroyed));
}

#[tokio::test]
async fn a_second_start_of_a_running_vm_is_refused() {
    let lab = Lab::new();
    let (pid, boot_id) = define_and_start(&lab, "vm1").await;
    let error = lab.driver.start("vm1").await.unwrap_err();
    assert!(matches!(&error, Error::InvalidState { domain, .. } if domain == "vm1"), "{error}");
    assert!(error.is_fatal());
    assert_eq!(lab.driver.pid("vm1").await.unwrap(), Some(pid));
    // Still exactly one writer on the disk.
    let lines = lab.wait_for_lines("vm1", 4);
    assert_one_boot(&lines, "vm1", &boot_id);
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_last_line_and_exits() {
    let lab = Lab::new();
    let (pid, boot_id) = define_and_start(&lab, "vm1").await;
    lab.wait_for_lines("vm1", 2);
    let outcome = lab
        .driver
        .shutdown("vm1", ShutdownRequest { timeout: Duration::from_secs(5), destroy_on_timeout: false })
        .await
        .unwrap();
    assert_eq!(outcome, ShutdownOutcome::Graceful);
    assert!(!process_running(pid));
    assert_eq!(lab.driver.domain("vm1").await.unwrap().state, DomainState::ShutOff(ShutOffReason::Shutdown));
    assert_one_boot(&lab.lines("vm1"), "vm1", &boot_id);
}

#[tokio::test]
async fn a_frozen_vm_times_out_its_shutdown_and_falls_back_to_destroy() {
    let lab = Lab::new();
    let (pid, _) = define_and_start(&lab, "vm1").await;
    // Once it writes, its SIGTERM handler is in place (before that, SIGTERM's default
    // action would kill even a stopped process).
    lab.wait_for_lines("vm1", 1);
    // SIGSTOP: the guest is frozen and cannot act on the shutdown request.
    kill(pid, Signal::STOP);
    let request = ShutdownRequest { timeout: Duration::from_millis(400), destroy_on_timeout: false };
    let error = lab.driver.shutdown("vm1", request).await.unwrap_err();
    assert!(matches!(error, Error::ShutdownTimedOut { .. }), "{error}");
    assert!(error.is_retryable());
    assert!(process_running(pid));
    assert_eq!(lab.driver.domain("vm1").await.unwrap().state, DomainState::ShuttingDown);

    let request = ShutdownRequest { destroy_on_timeout: true, ..request };
    assert_eq!(lab.driver.shutdown("vm1", request).await.unwrap(), ShutdownOutcome::Destroyed);
    assert!(!process_running(pid));
    assert_eq!(lab.driver.domain("vm1").await.unwrap().state, DomainState::ShutOff(ShutOffReason::Destroyed));
}

#[tokio::test]
async fn definitions_round_trip_and_undefine_waits_for_a_stop() {
    let lab = Lab::new();
    let xml = lab_domain_xml("vm1", 1, 256);
    lab.driver.define(&xml).await.unwrap();
    assert_eq!(lab.driver.domain_xml("vm1").await.unwrap(), xml);
    let info = lab.driver.domain("vm1").await.unwrap();
    assert_eq!(info.state, DomainState::ShutOff(ShutOffReason::Unknown));
    assert!(info.persistent);

    let error = lab.driver.define("<domain><name>bad name</name><memory>1</memory></domain>").await.unwrap_err();
    assert!(matches!(error, Error::InvalidDefinition { .. }), "{error}");

    lab.driver.start("vm1").await.unwrap();
    let error = lab.driver.undefine("vm1").await.unwrap_err();
    assert!(matches!(error, Error::InvalidState { .. }), "{error}");
    lab.driver.destroy("vm1").await.unwrap();
    lab.driver.undefine("vm1").await.unwrap();
    assert!(matches!(lab.driver.domain("vm1").await, Err(Error::NoSuchDomain { .. })));
    assert!(lab.driver.list().await.unwrap().is_empty());

    for result in [
        lab.driver.start("ghost").await,
        lab.driver.destroy("ghost").await,
        lab.driver.undefine("ghost").await,
        lab.driver.domain_xml("ghost").await.map(drop),
        lab.driver.start("../escape").await,
    ] {
        assert!(matches!(result, Err(Error::NoSuchDomain { .. })), "{result:?}");
    }
}

#[tokio::test]
async fn migration_is_unsupported() {
    let lab = Lab::new();
    assert!(!lab.driver.supports_migration());
    let request =
        MigrateRequest { destination_uri: "lab:/x?state=/y".into(), live: true, timeout: Duration::from_secs(1) };
    let error = lab.driver.migrate("vm1", &request).await.unwrap_err();
    assert!(matches!(error, Error::Unsupported { operation: "migrate", driver: "lab" }), "{error}");
}

#[tokio::test]
async fn the_factory_picks_the_driver_from_the_uri() {
    let lab = Lab::new();
    let options = OpenOptions::default();
    let hypervisor = kvmha_hypervisor::open(&lab.uri(), options).await.unwrap();
    assert_eq!(hypervisor.driver_name(), "lab");
    hypervisor.define(&lab_domain_xml("vm1", 1, 64)).await.unwrap();
    hypervisor.start("vm1").await.unwrap();
    // The factory's driver and the test's driver share the state dir.
    assert_eq!(lab.driver.domain("vm1").await.unwrap().state, DomainState::Running);
    hypervisor.destroy("vm1").await.unwrap();

    let libvirt = kvmha_hypervisor::open("test:///default", options).await.unwrap();
    assert_eq!(libvirt.driver_name(), "libvirt");
    let error = kvmha_hypervisor::open("lab:relative?state=/x", options).await.unwrap_err();
    assert!(matches!(error, Error::InvalidUri { .. }), "{error}");
}

/// Polls the driver until the domain's state satisfies `wanted` (5 s at most).
async fn wait_for_state(driver: &dyn Hypervisor, vm: &str, wanted: impl Fn(DomainState) -> bool) -> DomainInfo {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = driver.domain(vm).await.unwrap();
        if wanted(info.state) {
            return info;
        }
        assert!(Instant::now() < deadline, "{vm} never reached the wanted state: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
