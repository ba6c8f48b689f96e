//! `kvmha bench scale` end to end, small: the real binary starts a real manager process
//! and 20 simulated agents; one host (5 %) loses power; every one of its HA VMs must be
//! planned again, through the real investigation, BMC fence and read-back. Behaviour
//! only: the numbers are checked for presence and sense, never against a time.

use std::process::Command;

#[test]
fn a_small_fleet_reports_every_number_and_plans_every_vm_of_the_lost_host() {
    let output = Command::new(env!("CARGO_BIN_EXE_kvmha"))
        .args(["bench", "scale", "--hosts", "20", "--vms-per-host", "3", "--json"])
        .args(["--profile", "fast", "--measure-secs", "2"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run kvmha bench scale");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}\nstdout: {stdout}\nstderr: {stderr}", output.status);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one JSON object: {stdout}");
    let result: serde_json::Value = serde_json::from_str(lines[0]).expect("one JSON object");

    for key in ["hosts", "vms", "manager_rss_mb", "manager_cpu_cores", "pings_per_s", "mass_failure_plan_ms"] {
        assert!(result.get(key).is_some_and(|value| value.is_number()), "{key} missing or not a number: {result}");
    }
    assert_eq!(result["hosts"], 20);
    assert_eq!(result["vms"], 60);
    assert!(result["manager_rss_mb"].as_f64().unwrap() > 0.0, "{result}");
    assert!(result["pings_per_s"].as_f64().unwrap() > 0.0, "{result}");
    // 5 % of 20 hosts: one host and its three VMs, every one planned again.
    assert_eq!(result["lost_hosts"], 1, "{result}");
    assert_eq!(result["affected_vms"], 3, "{result}");
    assert_eq!(result["planned_vms"], 3, "{result}");
    // 19 survivors with room for three more VMs each: all three get a start work item,
    // and the survivors' agents receive the starts.
    assert_eq!(result["start_work_items"], 3, "{result}");
}
