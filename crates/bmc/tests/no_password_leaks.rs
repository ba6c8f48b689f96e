//! The password must never appear in Debug output, errors or logs, on
//! success or failure paths, whichever driver is used.

mod common;

use common::*;
use kvmha_bmc::ipmi::commands::Privilege;
use kvmha_bmc::ipmi::crypto::CipherSuite;
use kvmha_bmc::ipmi::session::{Handshake, HandshakeParams};
use kvmha_bmc::ipmi::{IpmiClient, IpmiConfig};
use kvmha_bmc::ipmitool::{Ipmitool, IpmitoolConfig};
use kvmha_bmc::redfish::{RedfishClient, RedfishConfig};
use kvmha_bmc::{Fencer, PowerControl, Secret};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Collects everything tracing emits, at every level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[test]
fn debug_of_every_config_and_client_is_redacted() {
    let password = "debug-leak-canary";
    let ipmi = IpmiConfig::new("127.0.0.1:623", "admin", Secret::new(password));
    let ipmitool = IpmitoolConfig::new("127.0.0.1:623", "admin", Secret::new(password));
    let redfish = RedfishConfig::new("https://127.0.0.1", "admin", Secret::new(password));
    let handshake = Handshake::new(HandshakeParams {
        username: "admin".into(),
        password: Secret::new(password),
        privilege: Privilege::Administrator,
        suite: CipherSuite::SUITE_3,
        console_session_id: 1,
        console_random: [0; 16],
        tag: 0,
    })
    .unwrap();
    let shown = format!(
        "{ipmi:?} {ipmi:#?} {ipmitool:?} {redfish:?} {handshake:?} {:?} {:?} {:?}",
        IpmiClient::new(ipmi.clone()).unwrap(),
        Ipmitool::new(ipmitool.clone()).unwrap(),
        RedfishClient::new(redfish.clone()).unwrap(),
    );
    assert!(!shown.contains(password), "{shown}");
}

#[tokio::test]
async fn logs_and_errors_never_carry_the_password() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || writer.clone()).finish();
    // The test runtime is single-threaded, so a thread-local default sees
    // every event of the code under test.
    let _guard = tracing::subscriber::set_default(subscriber);

    let bmc = SimBmc::start(true).unwrap();
    let mut shown = String::new();
    let wrong = "wrong-log-canary-1";
    for password in [ADMIN_PASSWORD, wrong] {
        let mut config = IpmiConfig::new(bmc.address(), ADMIN_USER, Secret::new(password));
        config.attempt_timeout = Duration::from_millis(300);
        let ipmi = IpmiClient::new(config).unwrap();
        let ipmitool = Ipmitool::new(IpmitoolConfig::new(bmc.address(), ADMIN_USER, Secret::new(password))).unwrap();
        for driver in [&ipmi as &dyn PowerControl, &ipmitool] {
            match Fencer::default().fence(driver).await {
                Ok(report) => shown.push_str(&format!("{report:?} {}", report.evidence)),
                Err(error) => shown.push_str(&format!("{error} {error:?}")),
            }
            driver.power_on().await.ok();
        }
    }
    let logs = captured.text();
    assert!(logs.contains("fence"), "capture is not working: {logs}");
    for password in [ADMIN_PASSWORD, wrong] {
        assert!(!logs.contains(password), "password in logs: {logs}");
        assert!(!shown.contains(password), "password in output: {shown}");
    }
}
