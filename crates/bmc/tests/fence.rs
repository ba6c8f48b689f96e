//! The fencer against real simulated BMCs, through each PowerControl driver.

mod common;

use common::*;
use kvmha_bmc::ipmi::commands::Privilege;
use kvmha_bmc::ipmi::{IpmiClient, IpmiConfig};
use kvmha_bmc::ipmitool::{Ipmitool, IpmitoolConfig};
use kvmha_bmc::{BmcError, FenceOutcome, Fencer, PowerControl, Secret};
use std::time::Duration;

fn ipmi(bmc_address: String, user: &str, password: &str) -> IpmiClient {
    let mut config = IpmiConfig::new(bmc_address, user, Secret::new(password));
    config.attempt_timeout = Duration::from_millis(300);
    config.operation_timeout = Duration::from_secs(5);
    IpmiClient::new(config).unwrap()
}

fn quick_fencer() -> Fencer {
    Fencer {
        deadline: Duration::from_secs(5),
        poll_interval: Duration::from_millis(50),
        power_off_attempts_max: 2,
        resend_after: Duration::from_secs(1),
        ..Fencer::default()
    }
}

#[tokio::test]
async fn fencing_a_running_host_powers_it_off_and_reads_off_back() {
    let bmc = SimBmc::start(true).unwrap();
    let client = ipmi(bmc.address(), ADMIN_USER, ADMIN_PASSWORD);
    let report = quick_fencer().fence(&client).await.unwrap();
    assert_eq!(report.outcome, FenceOutcome::PoweredOff);
    assert_eq!(report.power_off_attempts, 1);
    assert!(report.status_reads >= 2, "{report:?}");
    assert!(
        report.evidence.starts_with(&format!("bmc {} ipmi: power off sent, read back off after ", bmc.address())),
        "{}",
        report.evidence
    );
    assert!(!bmc.script_power());
    assert_eq!(bmc.script_log(), vec!["power 0"]);
    assert_eq!(bmc.ipmitool_power(), "off");
}

#[tokio::test]
async fn fencing_a_host_that_is_off_is_already_off_without_a_command() {
    let bmc = SimBmc::start(false).unwrap();
    let client = ipmi(bmc.address(), ADMIN_USER, ADMIN_PASSWORD);
    let report = quick_fencer().fence(&client).await.unwrap();
    assert_eq!(report.outcome, FenceOutcome::AlreadyOff);
    assert_eq!(report.power_off_attempts, 0);
    assert!(bmc.script_log().is_empty());
}

#[tokio::test]
async fn a_failed_power_off_on_a_chassis_that_went_off_counts_as_already_off() {
    // The chassis drops power but the BMC answers FFh: the error must not be
    // trusted, the read-back decides.
    let bmc = SimBmc::start_with_mode(true, "off-then-fail").unwrap();
    let client = ipmi(bmc.address(), ADMIN_USER, ADMIN_PASSWORD);
    let error = client.power_off().await.unwrap_err();
    assert!(matches!(error, BmcError::Refused { code: 0xff, .. }), "{error:?}");
    // Power it back on by hand (the script honours "on") and fence for real.
    std::fs::write(bmc.dir().join("power"), "1\n").unwrap();
    let report = quick_fencer().fence(&client).await.unwrap();
    assert_eq!(report.outcome, FenceOutcome::AlreadyOff);
    assert!(report.evidence.contains("not accepted"), "{}", report.evidence);
    assert_eq!(bmc.ipmitool_power(), "off");
}

#[tokio::test]
async fn a_chassis_that_stays_on_is_state_never_reached() {
    let bmc = SimBmc::start_with_mode(true, "stuck").unwrap();
    let client = ipmi(bmc.address(), ADMIN_USER, ADMIN_PASSWORD);
    let fencer = Fencer {
        deadline: Duration::from_millis(1500),
        poll_interval: Duration::from_millis(50),
        power_off_attempts_max: 2,
        resend_after: Duration::from_millis(500),
        ..Fencer::default()
    };
    let error = fencer.fence(&client).await.unwrap_err();
    assert!(matches!(error, BmcError::StateNeverReached { .. }), "{error:?}");
    assert!(error.to_string().contains("never read back off"), "{error}");
    // Both power-off attempts reached the chassis.
    assert_eq!(bmc.script_log(), vec!["power 0", "power 0"]);
    assert_eq!(bmc.ipmitool_power(), "on");
}

#[tokio::test]
async fn fencing_with_a_wrong_password_fails_fast_as_authentication() {
    let bmc = SimBmc::start(true).unwrap();
    let client = ipmi(bmc.address(), ADMIN_USER, "wrong-password");
    let error = quick_fencer().fence(&client).await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");
    assert!(bmc.script_power());
}

#[tokio::test]
async fn fencing_without_privilege_is_refused_with_the_code() {
    let bmc = SimBmc::start(true).unwrap();
    let mut config = IpmiConfig::new(bmc.address(), VIEWER_USER, Secret::new(VIEWER_PASSWORD));
    config.privilege = Privilege::User;
    let client = IpmiClient::new(config).unwrap();
    let error = quick_fencer().fence(&client).await.unwrap_err();
    assert!(matches!(error, BmcError::Refused { code: 0xd4, .. }), "{error:?}");
    assert!(bmc.script_power());
}

#[tokio::test]
async fn fencing_an_unreachable_bmc_fails_within_the_deadline() {
    // A silent peer, not a closed port: silence is what makes a fencer wait.
    let (_silent, port) = silent_udp_port();
    let client = ipmi(format!("127.0.0.1:{port}"), ADMIN_USER, ADMIN_PASSWORD);
    let deadline = Duration::from_secs(2);
    let fencer = Fencer { deadline, ..quick_fencer() };
    let started = std::time::Instant::now();
    let error = fencer.fence(&client).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(error, BmcError::Unreachable { .. } | BmcError::Timeout { .. }), "{error:?}");
    assert!(error.is_retryable());
    // Generous for a loaded machine, but a bound: the deadline must hold.
    assert!(elapsed < deadline + Duration::from_secs(5), "took {elapsed:?} with a {deadline:?} deadline");
}

#[tokio::test]
async fn a_bmc_silent_for_the_whole_deadline_is_reported_by_its_unanswered_read() {
    // Seen in the soak: the first status read used up the fence deadline, then a power
    // off was "sent" with nothing left and its instant timeout ("after 0 ms") became the
    // reported cause, hiding the silent BMC.
    let (_silent, port) = silent_udp_port();
    let mut config = IpmiConfig::new(format!("127.0.0.1:{port}"), ADMIN_USER, Secret::new(ADMIN_PASSWORD));
    config.attempt_timeout = Duration::from_secs(3);
    config.operation_timeout = Duration::from_secs(10);
    let client = IpmiClient::new(config).unwrap();
    let fencer = Fencer { deadline: Duration::from_millis(800), ..quick_fencer() };
    let error = fencer.fence(&client).await.unwrap_err();
    let text = error.to_string();
    assert!(text.contains("fence status") && !text.contains("after 0 ms"), "{text}");
}

#[tokio::test]
async fn fencing_through_ipmitool_works_the_same() {
    let bmc = SimBmc::start(true).unwrap();
    let driver = Ipmitool::new(IpmitoolConfig::new(bmc.address(), ADMIN_USER, Secret::new(ADMIN_PASSWORD))).unwrap();
    let report = quick_fencer().fence(&driver).await.unwrap();
    assert_eq!(report.outcome, FenceOutcome::PoweredOff);
    assert!(report.evidence.contains("ipmitool"), "{}", report.evidence);
    assert_eq!(bmc.script_log(), vec!["power 0"]);
}

#[tokio::test]
async fn ipmitool_driver_full_matrix_and_typed_errors() {
    let bmc = SimBmc::start(false).unwrap();
    let driver = |user: &str, password: &str| {
        Ipmitool::new(IpmitoolConfig::new(bmc.address(), user, Secret::new(password))).unwrap()
    };
    let admin = driver(ADMIN_USER, ADMIN_PASSWORD);
    assert_eq!(admin.status().await.unwrap(), kvmha_bmc::PowerState::Off);
    admin.power_on().await.unwrap();
    assert_eq!(admin.status().await.unwrap(), kvmha_bmc::PowerState::On);
    admin.reset().await.unwrap();
    admin.power_off().await.unwrap();
    assert_eq!(bmc.script_log(), vec!["power 1", "reset 1", "power 0"]);

    let error = driver(ADMIN_USER, "wrong-password").status().await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");
    assert!(!format!("{error:?}").contains("wrong-password"));
    let error = driver("nobody", ADMIN_PASSWORD).status().await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");

    let mut config = IpmitoolConfig::new(bmc.address(), VIEWER_USER, Secret::new(VIEWER_PASSWORD));
    config.privilege = Privilege::User;
    let error = Ipmitool::new(config).unwrap().power_on().await.unwrap_err();
    assert!(matches!(error, BmcError::Refused { code: 0xd4, .. }), "{error:?}");

    let (_silent, port) = silent_udp_port();
    let mut config = IpmitoolConfig::new(format!("127.0.0.1:{port}"), ADMIN_USER, Secret::new(ADMIN_PASSWORD));
    config.timeout = Duration::from_secs(4);
    let started = std::time::Instant::now();
    let error = Ipmitool::new(config).unwrap().status().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4 + 5), "took {:?}", started.elapsed());
    assert!(matches!(error, BmcError::Unreachable { .. } | BmcError::Timeout { .. }), "{error:?}");
}

fn suite_zero_client(bmc: &SimBmc) -> IpmiClient {
    let mut config = IpmiConfig::new(bmc.address(), ADMIN_USER, Secret::new(ADMIN_PASSWORD));
    config.cipher_suites = vec![0];
    config.allow_suite_zero = true;
    config.attempt_timeout = Duration::from_millis(300);
    config.operation_timeout = Duration::from_secs(5);
    IpmiClient::new(config).unwrap()
}

/// Cipher suite 0 authenticates nothing: anyone on the BMC network could
/// answer "off". Allowing the suite for the client is not enough to fence.
#[tokio::test]
async fn fencing_over_cipher_suite_zero_is_refused_unless_explicitly_allowed() {
    let bmc = SimBmc::start(true).unwrap();
    let client = suite_zero_client(&bmc);
    let error = quick_fencer().fence(&client).await.unwrap_err();
    assert!(matches!(error, BmcError::Config { .. }), "{error:?}");
    assert!(error.to_string().contains("cipher suite 0"), "{error}");
    assert!(bmc.script_log().is_empty(), "nothing may be sent before the refusal");
    assert!(bmc.script_power());
}

#[tokio::test]
async fn an_allowed_unauthenticated_fence_says_so_in_its_evidence() {
    let bmc = SimBmc::start(true).unwrap();
    let client = suite_zero_client(&bmc);
    let fencer = Fencer { allow_unauthenticated_fence: true, ..quick_fencer() };
    let report = fencer.fence(&client).await.unwrap();
    assert_eq!(report.outcome, FenceOutcome::PoweredOff);
    assert!(report.evidence.contains("UNAUTHENTICATED (cipher suite 0)"), "{}", report.evidence);
    assert_eq!(bmc.ipmitool_power(), "off");
}
