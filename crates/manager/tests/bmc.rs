//! The executor against a real IPMI BMC (OpenIPMI's `ipmi_sim`): the BMC-power
//! investigator and `Command::Fence`, mapped onto core's events.

use kvmha_bmc::sim::{IpmiSim, ADMIN_PASSWORD, ADMIN_USER};
use kvmha_core::event::{FenceOutcome, Finding, InvestigatorKind, RequestId};
use kvmha_core::{Command, Event, HostName, Profile};
use kvmha_manager::controller::{Clock, Controller, Request, SharedDirectory};
use kvmha_manager::executor::Executor;
use kvmha_manager::{InitOptions, ManagerConfig};
use std::sync::Arc;
use std::time::Duration;

fn executor_with_bmc(
    dir: &std::path::Path,
    bmc_address: &str,
) -> (Arc<Executor>, tokio::sync::mpsc::Receiver<Request>) {
    let options = InitOptions {
        dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        profile: Profile::Fast,
    };
    let output = kvmha_manager::init(&options).expect("init");
    std::fs::write(dir.join("bmc.pass"), ADMIN_PASSWORD).unwrap();
    std::fs::set_permissions(dir.join("bmc.pass"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut text = std::fs::read_to_string(&output.config_file).unwrap();
    text.push_str(&format!(
        "\n[hosts.host1.bmc]\nkind = \"ipmi\"\naddress = \"{bmc_address}\"\nusername = \"{ADMIN_USER}\"\npassword_file = \"bmc.pass\"\n"
    ));
    std::fs::write(&output.config_file, text).unwrap();
    let config = ManagerConfig::load(&output.config_file).expect("config");
    assert!(!format!("{config:?}").contains(ADMIN_PASSWORD), "the BMC password shows in Debug output");
    let executor = Arc::new(
        Executor::new(config, Clock::starting_at(0), SharedDirectory::default(), Default::default()).expect("executor"),
    );
    let (controller, requests) = Controller::detached();
    executor.set_controller(controller);
    (executor, requests)
}

async fn next_event(requests: &mut tokio::sync::mpsc::Receiver<Request>) -> Event {
    let request = tokio::time::timeout(Duration::from_secs(30), requests.recv()).await.expect("an outcome in time");
    match request.expect("a request") {
        Request::Step { event, .. } => event,
        other => panic!("unexpected request {other:?}"),
    }
}

fn investigate_bmc() -> Command {
    Command::Investigate {
        host: HostName::from("host1"),
        investigation: RequestId(3),
        round: 1,
        kinds: vec![InvestigatorKind::BmcPower],
        neighbours: vec![],
        evidence_after: kvmha_core::Instant::ZERO,
        // The executor's clock starts at zero when the test starts.
        deadline: kvmha_core::Instant::from_millis(5_000),
    }
}

#[tokio::test]
async fn bmc_investigator_and_fence_drive_a_real_bmc() {
    let sim = IpmiSim::start(true).expect("ipmi_sim (scripts/setup.sh installs openipmi)");
    let dir = tempfile::tempdir().unwrap();
    let (executor, mut requests) = executor_with_bmc(dir.path(), &sim.address());

    executor.clone().execute(investigate_bmc()).await;
    let Event::Report(report) = next_event(&mut requests).await else { panic!("not a report") };
    assert_eq!(
        (report.kind, report.finding, report.evidence.as_str()),
        (InvestigatorKind::BmcPower, Finding::Unknown, "power on")
    );

    let fence = Command::Fence {
        host: HostName::from("host1"),
        fence: RequestId(7),
        attempt: 1,
        deadline: kvmha_core::Instant::from_millis(10_000),
    };
    executor.clone().execute(fence).await;
    let Event::FenceResult(result) = next_event(&mut requests).await else { panic!("not a fence result") };
    assert_eq!(result.fence, RequestId(7));
    assert!(matches!(result.outcome, FenceOutcome::PoweredOff { .. }), "{:?}", result.outcome);
    assert!(!sim.script_power(), "the chassis is still on");

    executor.clone().execute(investigate_bmc()).await;
    let Event::Report(report) = next_event(&mut requests).await else { panic!("not a report") };
    assert_eq!((report.finding, report.evidence.as_str()), (Finding::Dead, "power off"));

    // Fencing a host that is already off proves it off without powering anything.
    let again = Command::Fence {
        host: HostName::from("host1"),
        fence: RequestId(8),
        attempt: 2,
        deadline: kvmha_core::Instant::from_millis(10_000),
    };
    executor.clone().execute(again).await;
    let Event::FenceResult(result) = next_event(&mut requests).await else { panic!("not a fence result") };
    assert!(matches!(result.outcome, FenceOutcome::AlreadyOff { .. }), "{:?}", result.outcome);
}

#[tokio::test]
async fn fencing_a_host_without_a_bmc_fails_with_a_reason_and_no_password_leaks() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: the investigator must answer unknown before its deadline.
    let (executor, mut requests) = executor_with_bmc(dir.path(), "127.0.0.1:9");
    let fence = Command::Fence {
        host: HostName::from("host2"),
        fence: RequestId(1),
        attempt: 1,
        deadline: kvmha_core::Instant::from_millis(2_000),
    };
    executor.clone().execute(fence).await;
    let Event::FenceResult(result) = next_event(&mut requests).await else { panic!("not a fence result") };
    assert_eq!(result.outcome, FenceOutcome::Failed { error: "no bmc configured for this host".into() });

    let investigate = Command::Investigate {
        host: HostName::from("host1"),
        investigation: RequestId(2),
        round: 1,
        kinds: vec![InvestigatorKind::BmcPower],
        neighbours: vec![],
        evidence_after: kvmha_core::Instant::ZERO,
        deadline: kvmha_core::Instant::from_millis(1_000),
    };
    executor.clone().execute(investigate).await;
    let Event::Report(report) = next_event(&mut requests).await else { panic!("not a report") };
    assert_eq!(report.finding, Finding::Unknown);
    assert!(!report.evidence.contains(ADMIN_PASSWORD), "{}", report.evidence);
}
