//! `kvmha lab run FILE`: one scenario of SCENARIOS.md, from a parsed [`Scenario`] to
//! its [`ScenarioResult`].
//!
//! Build (lab, cluster, VMs), wait until steady (every host `Up`, every VM running
//! where it was placed and writing its disk), play the faults at their offsets from
//! that moment, observe until `expect.duration`, check, tear down. Anything that goes
//! wrong before the lab is steady is a [`RunError::NotBuilt`] (exit 2); once faults
//! play, problems become failed checks (exit 1), never a missing result.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::checker::{no_double_run, read_disk_logs, recovery_ms, runs, ParsedLog, Run};
use crate::cluster::{fenced_hosts, profile_watchdog_timeout, Cluster, ClusterSpec};
use crate::error::LabError;
use crate::lab::{unix_ms_now, Lab, LabConfig};
use crate::scenario::{
    apart_check, final_host_check, no_double_run_check, not_moved_check, recovered_within_check, BmcKind, CheckResult,
    Fault, FaultAction, Scenario, ScenarioResult,
};

/// How long the hosts may take to join and come `Up`, and the VMs to run.
const STEADY_TIMEOUT: Duration = Duration::from_secs(120);
/// A VM "runs" while its latest disk write is at most this old (it writes every 100 ms).
const FRESH_MS: u64 = 1_000;
/// A fault counts for a VM's interruption if it came at most this long after the VM's
/// last write (a power-off lands a few ms after the last line).
const FAULT_SLACK_MS: u64 = 1_000;

/// Why a run gave no result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The lab could not be built or never became steady (exit 2).
    #[error("the lab could not be built: {0}")]
    NotBuilt(String),
    /// Ctrl-C or SIGTERM (exit 2).
    #[error("interrupted")]
    Interrupted,
}

/// How to run: where kvmha is, where labs live, what to keep.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub kvmha: PathBuf,
    pub base_dir: PathBuf,
    pub keep: Option<PathBuf>,
    /// Progress lines on stderr.
    pub verbose: bool,
}

/// One fault as it was played.
#[derive(Debug, Clone)]
struct Played {
    fault: Fault,
    unix_ms: u64,
    error: Option<String>,
}

fn note(options: &RunOptions, text: &str) {
    if options.verbose {
        eprintln!("kvmha lab run: {text}");
    }
}

/// Sleeps until `deadline`, waking early (false) when `stop` is set.
fn sleep_until(deadline: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}

fn not_built(error: impl std::fmt::Display) -> RunError {
    RunError::NotBuilt(error.to_string())
}

/// Runs `scenario` and tears everything down, whatever happens.
pub fn run(scenario: &Scenario, options: &RunOptions, stop: &AtomicBool) -> Result<ScenarioResult, RunError> {
    let redfish_hosts =
        scenario.lab.hosts.iter().filter(|host| host.bmc == BmcKind::Redfish).map(|host| host.name.clone()).collect();
    note(options, &format!("building a lab of {} hosts", scenario.lab.hosts.len()));
    let lab = Lab::build(LabConfig {
        hosts: scenario.lab.hosts.len(),
        base_dir: options.base_dir.clone(),
        watchdog_timeout: profile_watchdog_timeout(scenario.lab.profile),
        keep_in: options.keep.clone(),
        boot_script: String::new(),
        redfish_hosts,
    })
    .map_err(not_built)?;
    let outcome = run_in_lab(scenario, options, stop, &lab);
    note(options, &format!("tearing {} down", lab.id()));
    if let Err(error) = lab.teardown() {
        eprintln!("kvmha lab run: teardown: {error}");
    }
    outcome
}

fn run_in_lab(
    scenario: &Scenario,
    options: &RunOptions,
    stop: &AtomicBool,
    lab: &Lab,
) -> Result<ScenarioResult, RunError> {
    let cluster = Cluster::start(
        lab,
        ClusterSpec {
            kvmha: options.kvmha.clone(),
            profile: scenario.lab.profile,
            hosts: scenario.lab.hosts.clone(),
            watchdog: scenario.lab.watchdog,
            vm_driver: scenario.lab.vm_driver,
        },
    )
    .map_err(not_built)?;
    let result = observe(scenario, options, stop, lab, &cluster);
    cluster.stop();
    result
}

fn wait_steady<T>(
    what: &str,
    stop: &AtomicBool,
    mut probe: impl FnMut() -> std::result::Result<(), T>,
) -> Result<(), RunError>
where
    T: std::fmt::Display,
{
    let deadline = Instant::now() + STEADY_TIMEOUT;
    loop {
        let last = match probe() {
            Ok(()) => return Ok(()),
            Err(why) => why.to_string(),
        };
        if !sleep_until(Instant::now() + Duration::from_millis(250), stop) {
            return Err(RunError::Interrupted);
        }
        if Instant::now() > deadline {
            return Err(RunError::NotBuilt(format!("{what} within {}s: {last}", STEADY_TIMEOUT.as_secs())));
        }
    }
}

fn observe(
    scenario: &Scenario,
    options: &RunOptions,
    stop: &AtomicBool,
    lab: &Lab,
    cluster: &Cluster,
) -> Result<ScenarioResult, RunError> {
    let hosts: Vec<String> = scenario.lab.hosts.iter().map(|host| host.name.clone()).collect();
    note(options, "waiting for every host to be Up");
    wait_steady("every host Up", stop, || -> std::result::Result<(), String> {
        let states = cluster.host_states().map_err(|error| error.to_string())?;
        let not_up: Vec<String> = hosts
            .iter()
            .filter(|host| states.get(*host).map(String::as_str) != Some("Up"))
            .map(|host| format!("{host}={}", states.get(host).map(String::as_str).unwrap_or("unknown")))
            .collect();
        if not_up.is_empty() {
            Ok(())
        } else {
            Err(format!("not Up: {}", not_up.join(", ")))
        }
    })?;
    for vm in &scenario.lab.vms {
        note(options, &format!("creating VM {} on {}", vm.name, vm.host));
        cluster.create_vm(vm).map_err(|error| RunError::NotBuilt(format!("creating VM {}: {error}", vm.name)))?;
    }
    note(options, "waiting for every VM to run");
    wait_steady("every VM running", stop, || -> std::result::Result<(), String> {
        let states = cluster.vm_states().map_err(|error| error.to_string())?;
        let logs = read_disk_logs(&lab.storage_dir()).map_err(|error| error.to_string())?;
        let now = unix_ms_now();
        let mut waiting = Vec::new();
        for vm in &scenario.lab.vms {
            let records = logs.get(&vm.name).map(|log| log.records.as_slice()).unwrap_or_default();
            let writing = crate::checker::running_host(records, now, FRESH_MS);
            let api = states.get(&vm.name);
            let api_running = api.is_some_and(|(state, host)| state == "Running" && host.as_deref() == Some(&vm.host));
            if writing.as_deref() != Some(vm.host.as_str()) || !api_running {
                let api_text = api.map(|(state, host)| format!("{state}@{}", host.as_deref().unwrap_or("-")));
                waiting.push(format!(
                    "{} (api {}, disk {})",
                    vm.name,
                    api_text.unwrap_or_else(|| "unknown".to_string()),
                    writing.unwrap_or_else(|| "silent".to_string())
                ));
            }
        }
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(format!("not running: {}", waiting.join(", ")))
        }
    })?;
    if let Err(error) = lab.ensure_bmcs_alive() {
        return Err(RunError::NotBuilt(format!("BMC simulators: {error}")));
    }
    let steady = Instant::now();
    let steady_ms = unix_ms_now();
    note(options, &format!("steady; observing for {:?}", scenario.expect.duration));
    let mut played = Vec::new();
    for fault in &scenario.faults {
        if !sleep_until(steady + fault.at, stop) {
            return Err(RunError::Interrupted);
        }
        let unix_ms = unix_ms_now();
        note(options, &format!("+{:?} {}", fault.at, describe(&fault.action)));
        let error = play(&fault.action, lab, cluster).err().map(|error| error.to_string());
        if let Some(error) = &error {
            eprintln!("kvmha lab run: fault {} failed: {error}", describe(&fault.action));
        }
        played.push(Played { fault: fault.clone(), unix_ms, error });
    }
    if !sleep_until(steady + scenario.expect.duration, stop) {
        return Err(RunError::Interrupted);
    }
    let end_ms = steady_ms + scenario.expect.duration.as_millis() as u64;
    note(options, "observation over; checking");
    Ok(check(scenario, lab, cluster, &played, steady_ms, end_ms))
}

fn describe(action: &FaultAction) -> String {
    format!("{action:?}")
}

/// Plays one action of the fault list.
fn play(action: &FaultAction, lab: &Lab, cluster: &Cluster) -> crate::Result<()> {
    let api = cluster.api();
    match action {
        FaultAction::PowerOff { host } => lab.power_off(host),
        FaultAction::PowerOn { host } => lab.power_on(host),
        FaultAction::Hang { host } => lab.hang(host),
        FaultAction::AgentStop { host } => Cluster::signal_agent(lab, host, Signal::SIGTERM),
        FaultAction::AgentKill { host } => Cluster::signal_agent(lab, host, Signal::SIGKILL),
        FaultAction::AgentStart { host } => cluster.start_agent(lab, host),
        FaultAction::Partition { host, net } => lab.partition(host, *net),
        FaultAction::Heal { host, net } => lab.heal(host, *net),
        FaultAction::Loss { host, net, percent } => lab.loss(host, *net, *percent),
        FaultAction::BmcFail { host } => lab.bmc_fail(host),
        FaultAction::BmcHeal { host } => lab.bmc_heal(host),
        FaultAction::VmCrash { vm } => Cluster::crash_vm(lab, vm).map(|_| ()),
        FaultAction::ManagerRestart => cluster.restart_manager(),
        FaultAction::MaintenanceOn { host } => {
            api.post_ok(&format!("/v1/hosts/{host}/maintenance"), &json!({ "on": true })).map(|_| ())
        }
        FaultAction::MaintenanceOff { host } => {
            api.post_ok(&format!("/v1/hosts/{host}/maintenance"), &json!({ "on": false })).map(|_| ())
        }
        FaultAction::Reboot { host } => {
            // Planned: the agent says goodbye, then the host restarts.
            if Cluster::agent_process(lab, host)?.is_some() {
                Cluster::signal_agent(lab, host, Signal::SIGTERM)?;
            }
            lab.reset(host)
        }
        FaultAction::Disarm => api.post_ok("/v1/cluster/disarm", &json!({})).map(|_| ()),
        FaultAction::Arm => api.post_ok("/v1/cluster/arm", &json!({})).map(|_| ()),
    }
}

/// The host or VM a fault breaks, if it breaks one (heals, power-on, agent-start,
/// maintenance-off and arm repair; they interrupt nothing).
fn disrupts(action: &FaultAction, vm: &str, vm_host: &str) -> bool {
    match action {
        FaultAction::VmCrash { vm: crashed } => crashed == vm,
        FaultAction::PowerOff { host }
        | FaultAction::Hang { host }
        | FaultAction::AgentStop { host }
        | FaultAction::AgentKill { host }
        | FaultAction::Partition { host, .. }
        | FaultAction::Loss { host, .. }
        | FaultAction::BmcFail { host }
        | FaultAction::MaintenanceOn { host }
        | FaultAction::Reboot { host } => host == vm_host,
        _ => false,
    }
}

/// The run of a VM that was writing when the lab became steady.
fn steady_run(log: Option<&ParsedLog>, steady_ms: u64) -> Option<Run> {
    let log = log?;
    runs(&log.records)
        .into_iter()
        .filter(|run| run.first_ms <= steady_ms && run.last_ms + FRESH_MS >= steady_ms)
        .max_by_key(|run| run.last_ms)
}

/// For every VM whose steady run stopped during the observation: the fault it is
/// measured from and its recovery (None: never ran again).
fn recoveries(
    scenario: &Scenario,
    logs: &BTreeMap<String, ParsedLog>,
    played: &[Played],
    steady_ms: u64,
    end_ms: u64,
) -> BTreeMap<String, Option<u64>> {
    let mut result = BTreeMap::new();
    for vm in &scenario.lab.vms {
        let Some(run) = steady_run(logs.get(&vm.name), steady_ms) else {
            continue;
        };
        if run.last_ms + FRESH_MS >= end_ms {
            continue; // never interrupted
        }
        let affecting: Vec<&Played> =
            played.iter().filter(|played| disrupts(&played.fault.action, &vm.name, &run.host)).collect();
        // The latest breaking fault before the run went silent; else the first after.
        let fault = affecting
            .iter()
            .rev()
            .find(|played| played.unix_ms <= run.last_ms + FAULT_SLACK_MS)
            .or_else(|| affecting.first())
            .copied();
        let fault_ms = fault.map_or(run.last_ms, |played| played.unix_ms);
        // Any new run counts, on any host: a host reset by its watchdog may be back
        // and run its VMs again before another host would. A frozen run that resumes
        // keeps its boot id and never counts; no_double_run judges the overlap.
        let records = &logs[&vm.name].records;
        result.insert(vm.name.clone(), recovery_ms(records, fault_ms, None));
    }
    result
}

/// A few tries: a scenario may end right after a manager restart.
fn with_retries<T>(mut call: impl FnMut() -> crate::Result<T>) -> crate::Result<T> {
    let mut last = None;
    for _ in 0..20 {
        match call() {
            Ok(value) => return Ok(value),
            Err(error) => last = Some(error),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last.unwrap_or_else(|| LabError::Config("no attempt made".to_string())))
}

fn check(
    scenario: &Scenario,
    lab: &Lab,
    cluster: &Cluster,
    played: &[Played],
    steady_ms: u64,
    end_ms: u64,
) -> ScenarioResult {
    let expect = &scenario.expect;
    let mut checks = Vec::new();
    let logs = match read_disk_logs(&lab.storage_dir()) {
        Ok(logs) => logs,
        Err(error) => {
            checks.push(CheckResult { name: "disk_logs".to_string(), passed: false, detail: error.to_string() });
            BTreeMap::new()
        }
    };
    checks.push(no_double_run_check(&no_double_run(&logs)));
    let interrupted = recoveries(scenario, &logs, played, steady_ms, end_ms);
    let ha_vms: BTreeSet<&str> = scenario.lab.vms.iter().filter(|vm| vm.ha).map(|vm| vm.name.as_str()).collect();
    let crashed: BTreeSet<&str> = played
        .iter()
        .filter_map(|played| match &played.fault.action {
            FaultAction::VmCrash { vm } => Some(vm.as_str()),
            _ => None,
        })
        .collect();
    if let Some(bound) = expect.recovered_within {
        let must_recover: BTreeMap<String, Option<u64>> = interrupted
            .iter()
            .filter(|(vm, _)| ha_vms.contains(vm.as_str()) || crashed.contains(vm.as_str()))
            .map(|(vm, recovery)| (vm.clone(), *recovery))
            .collect();
        checks.push(recovered_within_check(&must_recover, bound));
    }
    let recovery_ms: BTreeMap<String, u64> =
        interrupted.iter().filter_map(|(vm, recovery)| recovery.map(|ms| (vm.clone(), ms))).collect();
    let events = with_retries(|| cluster.events()).unwrap_or_else(|error| {
        checks.push(CheckResult { name: "audit_log".to_string(), passed: false, detail: error.to_string() });
        Vec::new()
    });
    let fenced = fenced_hosts(&events);
    if !expect.fenced.is_empty() {
        let missing: Vec<&String> = expect.fenced.iter().filter(|host| !fenced.contains(host)).collect();
        checks.push(CheckResult {
            name: "fenced".to_string(),
            passed: missing.is_empty(),
            detail: if missing.is_empty() {
                format!("fenced: {}", expect.fenced.join(", "))
            } else {
                format!("never fenced: {}", missing.iter().map(|host| host.as_str()).collect::<Vec<_>>().join(", "))
            },
        });
    }
    if !expect.not_fenced.is_empty() {
        let wrongly: Vec<&String> = expect.not_fenced.iter().filter(|host| fenced.contains(host)).collect();
        checks.push(CheckResult {
            name: "not_fenced".to_string(),
            passed: wrongly.is_empty(),
            detail: if wrongly.is_empty() {
                format!("never fenced: {}", expect.not_fenced.join(", "))
            } else {
                format!("fenced: {}", wrongly.iter().map(|host| host.as_str()).collect::<Vec<_>>().join(", "))
            },
        });
    }
    if !expect.not_moved.is_empty() {
        checks.push(not_moved_check(&logs, &expect.not_moved));
    }
    let final_state = with_retries(|| cluster.host_states()).unwrap_or_else(|error| {
        checks.push(CheckResult { name: "manager_api".to_string(), passed: false, detail: error.to_string() });
        BTreeMap::new()
    });
    if !expect.final_state.is_empty() {
        let mut passed = true;
        let mut parts = Vec::new();
        for (host, wanted) in &expect.final_state {
            let actual = final_state.get(host).map(String::as_str).unwrap_or("unknown");
            if actual == wanted {
                parts.push(format!("{host} {actual}"));
            } else {
                passed = false;
                parts.push(format!("{host} {actual}, expected {wanted}"));
            }
        }
        checks.push(CheckResult { name: "final_state".to_string(), passed, detail: parts.join(", ") });
    }
    if !expect.final_host.is_empty() {
        checks.push(final_host_check(&logs, &expect.final_host, end_ms, FRESH_MS));
    }
    if !expect.apart.is_empty() {
        checks.push(apart_check(&logs, &expect.apart, end_ms, FRESH_MS));
    }
    let failed_faults: Vec<String> = played
        .iter()
        .filter_map(|played| {
            played
                .error
                .as_ref()
                .map(|error| format!("{} at {:?}: {error}", describe(&played.fault.action), played.fault.at))
        })
        .collect();
    if !failed_faults.is_empty() {
        checks.push(CheckResult { name: "faults_played".to_string(), passed: false, detail: failed_faults.join("; ") });
    }
    ScenarioResult::new(&scenario.name, checks, recovery_ms, fenced, final_state, events.len() as u64)
}
