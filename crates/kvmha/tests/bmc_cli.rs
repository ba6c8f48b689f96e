//! `kvmha bmc …` end to end: the real binary against a real ipmi_sim,
//! with ipmitool as the independent witness.

#[path = "../../bmc/tests/common/mod.rs"]
mod common;

use common::*;
use std::process::{Command, Output};

fn kvmha_bmc(bmc: &SimBmc, password: &str, args: &[&str]) -> Output {
    let password_file = password_file(bmc.dir(), password);
    Command::new(env!("CARGO_BIN_EXE_kvmha"))
        .arg("bmc")
        .args(args)
        .args(["--address", &bmc.address(), "--user", ADMIN_USER, "--password-file"])
        .arg(&password_file)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run kvmha")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn status_json_prints_exactly_the_power_object() {
    let on = SimBmc::start(true).unwrap();
    let off = SimBmc::start(false).unwrap();
    for driver in ["ipmi", "ipmitool"] {
        let output = kvmha_bmc(&on, ADMIN_PASSWORD, &["status", "--json", "--driver", driver]);
        assert!(output.status.success(), "{output:?}");
        assert_eq!(stdout(&output), r#"{"power":"on"}"#);
        let output = kvmha_bmc(&off, ADMIN_PASSWORD, &["status", "--json", "--driver", driver]);
        assert_eq!(stdout(&output), r#"{"power":"off"}"#);
    }
}

#[test]
fn fence_powers_off_and_ipmitool_confirms() {
    let bmc = SimBmc::start(true).unwrap();
    let output = kvmha_bmc(&bmc, ADMIN_PASSWORD, &["fence", "--cipher-suite", "3"]);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("power off sent, read back off after"), "{}", stdout(&output));
    assert_eq!(bmc.ipmitool_power(), "off");
    assert_eq!(bmc.script_log(), vec!["power 0"]);
}

#[test]
fn on_off_reset_through_the_cli_reach_the_chassis() {
    let bmc = SimBmc::start(false).unwrap();
    for action in ["on", "reset", "off"] {
        let output = kvmha_bmc(&bmc, ADMIN_PASSWORD, &[action]);
        assert!(output.status.success(), "{action}: {output:?}");
    }
    assert_eq!(bmc.script_log(), vec!["power 1", "reset 1", "power 0"]);
    assert_eq!(bmc.ipmitool_power(), "off");
}

#[test]
fn wrong_password_exits_non_zero_saying_authentication_failed() {
    let bmc = SimBmc::start(true).unwrap();
    let wrong = "definitely-wrong-pw";
    for driver in ["ipmi", "ipmitool"] {
        let output = kvmha_bmc(&bmc, wrong, &["off", "--driver", driver]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("authentication failed"), "{driver}: {stderr}");
        assert!(!stderr.contains(wrong) && !stdout(&output).contains(wrong));
    }
    assert!(bmc.script_power());
}

#[test]
fn unreachable_bmc_exits_non_zero_within_the_timeout() {
    let password_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(password_file.path(), ADMIN_PASSWORD).unwrap();
    // Both held by this test, so no simulator can take them meanwhile: a
    // closed port (ICMP refusal) and a silent one (only the timeout ends it).
    let (_closed, closed_port) = closed_udp_port();
    let (_silent, silent_port) = silent_udp_port();
    let timeout = std::time::Duration::from_millis(1500);
    for (port, expected) in [(closed_port, "unreachable"), (silent_port, "")] {
        let started = std::time::Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_kvmha"))
            .args(["bmc", "status", "--timeout-ms", &timeout.as_millis().to_string(), "--address"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--user", ADMIN_USER, "--password-file"])
            .arg(password_file.path())
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let elapsed = started.elapsed();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("unreachable") || stderr.contains("timed out"), "{stderr}");
        // Generous for a loaded machine (process start included), but a bound.
        assert!(elapsed < timeout + std::time::Duration::from_secs(5), "took {elapsed:?} with a {timeout:?} timeout");
    }
}
