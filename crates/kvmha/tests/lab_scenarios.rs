//! `kvmha lab run`, the real command: a malformed file is refused before anything
//! starts; a scenario runs end to end (lab, manager, agents, faults, checks) and
//! leaves nothing behind; and the CI subset of the scenario library (docs/lab.md).
//! Root only, like every lab test: real namespaces, ipmi_sim, sshfs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const KVMHA: &str = env!("CARGO_BIN_EXE_kvmha");

/// The library scenarios CI runs (a few minutes on 2 cores); `scripts/lab-scenarios.sh`
/// runs them all.
const CI_SUBSET: [&str; 3] = ["power-loss-bmc.toml", "mgmt-cut.toml", "vm-crash.toml"];

fn library(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios").join(name)
}

fn lab_run(file: &Path, base_dir: &Path, extra: &[&str]) -> Output {
    Command::new(KVMHA)
        .args(["lab", "run"])
        .arg(file)
        .arg("--base-dir")
        .arg(base_dir)
        .args(extra)
        .env("KVMHA_LOG", "info")
        .output()
        .expect("running kvmha lab run")
}

fn assert_root() {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").expect("/proc/self").uid();
    assert_eq!(uid, 0, "the lab tests need root (CI runs as root)");
}

/// Nothing of a lab may outlive its run: namespaces, FUSE mounts, BMC simulators,
/// processes started from the lab's state directory.
fn assert_nothing_left(base_dir: &Path) {
    let leftovers: Vec<String> = std::fs::read_dir(base_dir)
        .map(|entries| entries.flatten().map(|entry| entry.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "lab directories left: {leftovers:?}");
    let base = base_dir.display().to_string();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    assert!(!mounts.lines().any(|line| line.contains(&base)), "mounts left under {base}:\n{mounts}");
    for pid in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(pid.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains(&base), "process {} left: {cmdline}", pid.file_name().to_string_lossy());
    }
}

fn result_of(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints exactly one line; stdout:\n{stdout}");
    serde_json::from_str(lines[0]).unwrap_or_else(|error| panic!("not JSON ({error}): {stdout}"))
}

#[test]
fn a_malformed_scenario_is_refused_naming_the_field_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "name = \"bad\"\n[lab]\nhosts = 2\n[[fault]]\nat = \"2s\"\naction = \"loss\"\nhost = \"host1\"\nnet = \"mgmt\"\n\
         [expect]\nduration = \"10s\"\n",
    )
    .expect("write");
    let base_dir = dir.path().join("labs");
    let output = lab_run(&file, &base_dir, &["--json"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("fault[0].percent"), "the error names the field: {stderr}");
    assert!(output.stdout.is_empty(), "no result for a file that never ran");
    assert!(!base_dir.exists(), "nothing was built");
}

/// The whole path without VMs (which need the recovery and VM work of issue 6): the
/// lab, the manager and agents, a power-off, fencing through ipmi_sim, the checks, the
/// JSON result, `--keep`, and a clean teardown.
#[test]
fn a_power_loss_without_vms_runs_end_to_end_and_leaves_nothing() {
    assert_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("power-loss.toml");
    std::fs::write(
        &file,
        r#"name = "power loss, no VMs"
[lab]
hosts = 2
profile = "fast"
[[fault]]
at = "1s"
action = "power-off"
host = "host1"
[expect]
duration = "12s"
fenced = ["host1"]
not_fenced = ["host2"]
final_state = { host1 = "Fenced", host2 = "Up" }
"#,
    )
    .expect("write");
    let base_dir = dir.path().join("labs");
    let keep = dir.path().join("kept");
    let output = lab_run(&file, &base_dir, &["--json", "--keep", keep.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_nothing_left(&base_dir);
    let result = result_of(&output);
    assert_eq!(output.status.code(), Some(0), "result {result}\nstderr:\n{stderr}");
    assert_eq!(result["scenario"], "power loss, no VMs");
    assert_eq!(result["passed"], true);
    assert_eq!(result["fenced"], serde_json::json!(["host1"]));
    assert_eq!(result["final_state"], serde_json::json!({"host1": "Fenced", "host2": "Up"}));
    assert!(result["events"].as_u64().is_some_and(|events| events > 0), "{result}");
    assert!(result["recovery_ms"].is_object(), "{result}");
    let names: Vec<&str> =
        result["checks"].as_array().expect("checks").iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["no_double_run", "fenced", "not_fenced", "final_state"]);
    assert!(keep.join("cluster/manager.log").is_file(), "--keep keeps the manager's log");
    assert!(keep.join("storage").is_dir(), "--keep keeps the shared storage");
}

/// The same lab with a wrong expectation fails with exit 1, and says which check.
#[test]
fn a_wrong_expectation_fails_with_exit_1() {
    assert_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("wrong.toml");
    std::fs::write(
        &file,
        "name = \"nothing happens\"\n[lab]\nhosts = 1\nprofile = \"fast\"\n[expect]\nduration = \"2s\"\n\
         fenced = [\"host1\"]\n",
    )
    .expect("write");
    let base_dir = dir.path().join("labs");
    let output = lab_run(&file, &base_dir, &["--json"]);
    assert_nothing_left(&base_dir);
    let result = result_of(&output);
    assert_eq!(output.status.code(), Some(1), "{result}");
    let fenced = result["checks"].as_array().expect("checks").iter().find(|check| check["name"] == "fenced").cloned();
    assert_eq!(fenced.as_ref().map(|check| check["passed"].clone()), Some(Value::Bool(false)), "{result}");
}

/// The CI subset of the scenario library (docs/lab.md). Needs VMs created through the
/// manager's API (issue 6).
#[test]
fn the_ci_subset_of_the_scenario_library_passes() {
    assert_root();
    let mut failures = Vec::new();
    for name in CI_SUBSET {
        let dir = tempfile::tempdir().expect("tempdir");
        let base_dir = dir.path().join("labs");
        let output = lab_run(&library(name), &base_dir, &["--json"]);
        assert_nothing_left(&base_dir);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        eprintln!("{name}: exit {:?} {stdout}", output.status.code());
        if output.status.code() != Some(0) {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            failures.push(format!("{name}: exit {:?} {stdout} {tail:?}", output.status.code()));
        }
    }
    assert!(failures.is_empty(), "scenarios failed:\n{}", failures.join("\n"));
}

/// `vm_driver = "libvirt"`: real QEMU guests (TCG) through a libvirtd per host, the
/// production path agent -> libvirt -> QEMU. A power loss moves host1's guest (booted
/// by another host's libvirtd from the manager's copy of its definition), every guest
/// writes honest host time into its own disk, and no QEMU, libvirtd, mount or
/// namespace outlives the run. Needs scripts/setup.sh's kernel, busybox, QEMU, libvirt.
#[test]
fn libvirt_guests_move_after_a_power_loss_and_leave_nothing() {
    assert_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let base_dir = dir.path().join("labs");
    let keep = dir.path().join("kept");
    let output = lab_run(
        &library("libvirt-power-loss-bmc.toml"),
        &base_dir,
        &["--json", "--keep", keep.to_str().expect("utf-8")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_nothing_left(&base_dir);
    let result = result_of(&output);
    assert_eq!(output.status.code(), Some(0), "result {result}\nstderr:\n{stderr}");
    assert!(result["recovery_ms"]["host1-vm1"].as_u64().is_some(), "{result}");
    for vm in ["host1-vm1", "host2-vm1", "host3-vm1"] {
        let disk = keep.join("storage/vms").join(vm).join("disk.raw");
        assert!(disk.is_file(), "{vm} has a disk on the shared storage");
        let text = String::from_utf8_lossy(&std::fs::read(&disk).expect("disk.raw")).replace('\0', "");
        let lines: Vec<Vec<&str>> = text.lines().map(|line| line.split(' ').collect()).collect();
        assert!(lines.len() > 50, "{vm} wrote its disk: {} lines", lines.len());
        for line in &lines {
            assert_eq!(line.len(), 5, "{vm}: {line:?}");
            assert_eq!(line[2], vm, "{vm}: {line:?}");
        }
    }
    assert!(keep.join("hosts/host2/libvirtd.log").is_file(), "--keep keeps each host's libvirtd log");
}
