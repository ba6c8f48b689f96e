//! A Redfish BMC (sushy-emulator) in the lab acts on its host like ipmi_sim does,
//! driven by kvmha_bmc's own client and fencer from the manager's namespace.

mod common;

use std::fs::File;
use std::thread;
use std::time::Duration;

use common::*;
use kvmha_bmc::redfish::{RedfishClient, RedfishConfig, RedfishTls, ResetType};
use kvmha_bmc::{FenceOutcome, Fencer, PowerControl, PowerState, Secret};
use kvmha_lab::lab::{wait_for, BmcProtocol};
use kvmha_lab::topology::Node;
use kvmha_lab::{Lab, LabConfig};

/// Runs `work` on a thread inside the manager's network namespace, with a tokio
/// runtime on that thread, so every socket it opens is the manager's.
fn in_manager_netns<T: Send>(lab: &Lab, work: impl FnOnce(&tokio::runtime::Runtime) -> T + Send) -> T {
    let path = format!("/run/netns/{}", lab.namespace(&Node::Manager));
    thread::scope(|scope| {
        scope
            .spawn(|| {
                let netns = File::open(&path).expect("manager netns");
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                work(&runtime)
            })
            .join()
            .expect("the manager-side thread")
    })
}

#[test]
fn redfish_bmc_fences_its_host_from_the_manager_namespace() {
    let lab = build_with(LabConfig { hosts: 2, redfish_hosts: ["host1".to_string()].into(), ..LabConfig::default() });
    let endpoint = lab.bmc("host1").unwrap();
    assert_eq!(endpoint.protocol, BmcProtocol::Redfish);
    assert_eq!(lab.bmc("host2").unwrap().protocol, BmcProtocol::Ipmi);
    let mut writer = spawn_writer(&lab, "host1", "vm-r");
    wait_writes(&lab, "vm-r", 2);
    let processes = lab.host_processes("host1").unwrap();
    assert!(processes.len() >= 2, "init and the VM at least: {processes:?}");

    let mut config = RedfishConfig::new(endpoint.url(), endpoint.user.clone(), Secret::new(endpoint.password.clone()));
    config.timeout = Duration::from_secs(2);
    // The lab's emulated BMC speaks plain HTTP on the lab's own out-of-band network: the
    // client must be told so explicitly.
    config.tls = RedfishTls::Insecure;
    let client = RedfishClient::new(config).expect("client");

    in_manager_netns(&lab, |runtime| {
        assert_eq!(runtime.block_on(client.status()).expect("status over oob"), PowerState::On);

        // A dead BMC answers nothing; healed, it answers again.
        lab.bmc_fail("host1").unwrap();
        let failed = runtime.block_on(client.status());
        assert!(failed.is_err(), "a failed BMC must not answer: {failed:?}");
        lab.bmc_heal("host1").unwrap();

        let fencer = Fencer { deadline: Duration::from_secs(10), ..Fencer::default() };
        let report = runtime.block_on(fencer.fence(&client)).expect("fence");
        assert_eq!(report.outcome, FenceOutcome::PoweredOff, "{}", report.evidence);
    });
    // Off was read back, so the host is already dead: no waiting here.
    assert_eq!(lab.power_state("host1").unwrap(), kvmha_lab::PowerState::Off);
    for process in &processes {
        assert!(!process.is_alive(), "{process:?} outlived the power-off");
    }
    assert!(exits_within(&mut writer, SOON), "the VM died with its host");
    assert_eq!(lab.power_state("host2").unwrap(), kvmha_lab::PowerState::On, "the other host is untouched");

    // On boots the host; a restart gives it a new init.
    in_manager_netns(&lab, |runtime| runtime.block_on(client.power_on()).expect("power on"));
    wait_for("host1 to boot", SOON, || lab.host_init("host1").unwrap().is_some()).unwrap();
    let before = lab.host_init("host1").unwrap().unwrap();
    in_manager_netns(&lab, |runtime| runtime.block_on(client.reset(ResetType::ForceRestart)).expect("ForceRestart"));
    wait_for("host1 to come back with a new init", SOON, || {
        lab.host_init("host1").unwrap().is_some_and(|init| init != before)
    })
    .unwrap();
    assert!(!before.is_alive(), "the reset killed the old init");
    lab.teardown().expect("teardown");
}
