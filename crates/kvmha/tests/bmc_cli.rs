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

/// Debug logging on, every driver, success and failure: the password shows
/// up in neither stdout nor stderr, while the fencer's log lines do (so the
/// test would notice logging being off).
#[test]
fn debug_logging_never_shows_the_password() {
    let bmc = SimBmc::start(true).unwrap();
    let password_file = password_file(bmc.dir(), ADMIN_PASSWORD);
    let wrong_file = bmc.dir().join("wrong-password");
    std::fs::write(&wrong_file, "leaky-wrong-pw-42").unwrap();
    let run = |file: &std::path::Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kvmha"))
            .arg("bmc")
            .args(args)
            .args(["--address", &bmc.address(), "--user", ADMIN_USER, "--password-file"])
            .arg(file)
            .env("KVMHA_LOG", "trace")
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run kvmha")
    };
    let fenced = run(&password_file, &["fence", "--cipher-suite", "3"]);
    assert!(fenced.status.success(), "{fenced:?}");
    let stderr = String::from_utf8_lossy(&fenced.stderr);
    assert!(stderr.contains("fence verified"), "the fencer's info line must show: {stderr}");
    assert!(stderr.contains("DEBUG"), "debug lines must show: {stderr}");
    let mut outputs = vec![fenced];
    for driver in ["ipmi", "ipmitool"] {
        outputs.push(run(&password_file, &["status", "--driver", driver]));
        outputs.push(run(&wrong_file, &["off", "--driver", driver]));
    }
    for output in &outputs {
        let shown = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(!shown.contains(ADMIN_PASSWORD), "password leaked: {shown}");
        assert!(!shown.contains("leaky-wrong-pw-42"), "wrong password leaked: {shown}");
    }
}
