//! Scenario files (SCENARIOS.md, an external contract) and the JSON result.
//!
//! A file is deserialised into raw structs that reject unknown keys, then validated
//! into [`Scenario`], which cannot hold a fault against a missing host, a loss without
//! a percentage, or a duration without a unit. Every error names the field, e.g.
//! `fault[1].percent`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::checker::{running_host, runs, DoubleRunReport, ParsedLog};
use crate::error::{LabError, Result};
use crate::lab::NetSelector;
use crate::topology::{host_name, HOSTS_MAX};

/// The most generated VMs per host (`vms_per_host`); explicit `[[lab.vm]]` come on top.
pub const VMS_PER_HOST_MAX: usize = 64;

// ---------------------------------------------------------------- raw file

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    #[serde(default)]
    description: String,
    lab: RawLab,
    #[serde(default)]
    fault: Vec<RawFault>,
    expect: RawExpect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLab {
    hosts: usize,
    profile: Option<String>,
    bmc: Option<String>,
    watchdog: Option<bool>,
    vm_driver: Option<String>,
    vms_per_host: Option<usize>,
    #[serde(default)]
    host: Vec<RawHost>,
    #[serde(default)]
    vm: Vec<RawVm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    bmc: Option<String>,
    cpus: Option<u32>,
    memory_mb: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    host: String,
    ha: Option<bool>,
    priority: Option<i32>,
    cpus: Option<u32>,
    memory_mb: Option<u64>,
    group: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    at: String,
    action: String,
    host: Option<String>,
    net: Option<String>,
    percent: Option<u8>,
    vm: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    duration: String,
    recovered_within: Option<String>,
    #[serde(default)]
    fenced: Vec<String>,
    #[serde(default)]
    not_fenced: Vec<String>,
    #[serde(default)]
    not_moved: Vec<String>,
    #[serde(default)]
    final_state: BTreeMap<String, String>,
    #[serde(default)]
    final_host: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    apart: Vec<Vec<String>>,
}

// ---------------------------------------------------------------- typed

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Fast,
    Balanced,
    Conservative,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BmcKind {
    Ipmi,
    Redfish,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmDriver {
    Process,
    Libvirt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub name: String,
    pub bmc: BmcKind,
    pub cpus: u32,
    pub memory_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub host: String,
    pub ha: bool,
    pub priority: i32,
    pub cpus: u32,
    pub memory_mb: u64,
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    pub hosts: Vec<HostSpec>,
    pub profile: Profile,
    pub watchdog: bool,
    pub vm_driver: VmDriver,
    /// Generated `hostN-vmK` VMs first, then the explicit ones.
    pub vms: Vec<VmSpec>,
}

/// One action of the fault list, with exactly the fields it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    PowerOff {
        host: String,
    },
    PowerOn {
        host: String,
    },
    Hang {
        host: String,
    },
    AgentStop {
        host: String,
    },
    AgentKill {
        host: String,
    },
    AgentStart {
        host: String,
    },
    Partition {
        host: String,
        net: NetSelector,
    },
    /// Without `net`: every partition and loss of the host.
    Heal {
        host: String,
        net: Option<NetSelector>,
    },
    Loss {
        host: String,
        net: NetSelector,
        percent: u8,
    },
    BmcFail {
        host: String,
    },
    BmcHeal {
        host: String,
    },
    VmCrash {
        vm: String,
    },
    ManagerRestart,
    MaintenanceOn {
        host: String,
    },
    MaintenanceOff {
        host: String,
    },
    Reboot {
        host: String,
    },
    Disarm,
    Arm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Offset from the moment the lab is steady.
    pub at: Duration,
    pub action: FaultAction,
}

/// Host states of ARCHITECTURE.md §3, the words `final_state` may use.
pub const HOST_STATES: [&str; 10] = [
    "Connecting",
    "Up",
    "Disconnected",
    "Suspect",
    "Investigating",
    "Degraded",
    "Fencing",
    "Fenced",
    "FenceFailed",
    "Maintenance",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub duration: Duration,
    pub recovered_within: Option<Duration>,
    pub fenced: Vec<String>,
    pub not_fenced: Vec<String>,
    pub not_moved: Vec<String>,
    pub final_state: BTreeMap<String, String>,
    pub final_host: BTreeMap<String, Vec<String>>,
    pub apart: Vec<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub lab: LabSpec,
    /// Ordered by `at` (stable: equal times keep file order).
    pub faults: Vec<Fault>,
    pub expect: Expect,
}

fn field_error(field: impl Into<String>, message: impl fmt::Display) -> LabError {
    LabError::Scenario { field: field.into(), message: message.to_string() }
}

/// Parses "500ms", "2s", "1.5s", "2m", "1h", and sums like "1m30s".
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{text}` needs a unit (ms, s, m, h)"))?;
        let (number, after) = rest.split_at(number_len);
        let unit_len = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 2s or 500ms"))?;
        let unit_ms = match unit {
            "ms" => 1.0,
            "s" => 1_000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return Err(format!("`{text}` has unknown unit `{unit}` (ms, s, m, h)")),
        };
        // Saturating: "99999999999999999999h" repeated would overflow a Duration sum
        // (a panic); such a duration is refused below instead.
        total = total.saturating_add(Duration::from_millis((value * unit_ms).round() as u64));
        rest = next;
    }
    // A scenario longer than a year is a typo, and keeps every later sum far from overflow.
    if total > Duration::from_secs(365 * 24 * 3600) {
        return Err(format!("`{text}` is longer than a year"));
    }
    Ok(total)
}

fn duration_field(field: &str, text: &str) -> Result<Duration> {
    parse_duration(text).map_err(|message| field_error(field, message))
}

fn one_of<T: Copy>(field: &str, text: &str, choices: &[(&str, T)]) -> Result<T> {
    choices.iter().find(|(word, _)| *word == text).map(|(_, value)| *value).ok_or_else(|| {
        let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
        field_error(field, format!("`{text}` is not one of {}", words.join(", ")))
    })
}

fn bmc_kind(field: &str, text: &str) -> Result<BmcKind> {
    one_of(field, text, &[("ipmi", BmcKind::Ipmi), ("redfish", BmcKind::Redfish), ("none", BmcKind::None)])
}

impl Scenario {
    /// Parses and validates a scenario file's text.
    pub fn parse(text: &str) -> Result<Scenario> {
        let deserializer = toml::Deserializer::new(text);
        let raw: RawScenario = serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner();
            // toml's message carries the line and a caret; keep its first line short.
            let message = inner.message().to_string();
            field_error(if path == "." { "(file)".to_string() } else { path }, message)
        })?;
        raw.validate()
    }

    pub fn host_names(&self) -> BTreeSet<String> {
        self.lab.hosts.iter().map(|host| host.name.clone()).collect()
    }
}

impl RawScenario {
    fn validate(self) -> Result<Scenario> {
        if self.name.trim().is_empty() {
            return Err(field_error("name", "must not be empty"));
        }
        let lab = self.lab.validate()?;
        let hosts: BTreeSet<String> = lab.hosts.iter().map(|host| host.name.clone()).collect();
        let vms: BTreeSet<String> = lab.vms.iter().map(|vm| vm.name.clone()).collect();
        let expect = self.expect.validate(&hosts, &vms)?;
        let mut faults = Vec::new();
        for (position, raw) in self.fault.into_iter().enumerate() {
            let fault = raw.validate(&format!("fault[{position}]"), &hosts, &vms)?;
            if fault.at > expect.duration {
                return Err(field_error(
                    format!("fault[{position}].at"),
                    format!(
                        "{:?} is after the end of the observation (expect.duration {:?})",
                        fault.at, expect.duration
                    ),
                ));
            }
            faults.push(fault);
        }
        faults.sort_by_key(|fault| fault.at);
        Ok(Scenario { name: self.name, description: self.description, lab, faults, expect })
    }
}

impl RawLab {
    fn validate(self) -> Result<LabSpec> {
        if self.hosts == 0 || self.hosts > HOSTS_MAX {
            return Err(field_error("lab.hosts", format!("must be 1..={HOSTS_MAX}, got {}", self.hosts)));
        }
        let profile = match self.profile.as_deref() {
            None => Profile::Balanced,
            Some(text) => one_of(
                "lab.profile",
                text,
                &[("fast", Profile::Fast), ("balanced", Profile::Balanced), ("conservative", Profile::Conservative)],
            )?,
        };
        let default_bmc = match self.bmc.as_deref() {
            None => BmcKind::Ipmi,
            Some(text) => bmc_kind("lab.bmc", text)?,
        };
        let vm_driver = match self.vm_driver.as_deref() {
            None => VmDriver::Process,
            Some(text) => {
                one_of("lab.vm_driver", text, &[("process", VmDriver::Process), ("libvirt", VmDriver::Libvirt)])?
            }
        };
        let mut hosts: Vec<HostSpec> = (1..=self.hosts)
            .map(|index| HostSpec { name: host_name(index), bmc: default_bmc, cpus: 4, memory_mb: 4096 })
            .collect();
        let mut overridden = BTreeSet::new();
        for (position, raw) in self.host.into_iter().enumerate() {
            let field = format!("lab.host[{position}]");
            let Some(host) = hosts.iter_mut().find(|host| host.name == raw.name) else {
                return Err(field_error(
                    format!("{field}.name"),
                    format!("`{}` is not one of host1..host{}", raw.name, self.hosts),
                ));
            };
            if !overridden.insert(raw.name.clone()) {
                return Err(field_error(format!("{field}.name"), format!("`{}` is overridden twice", raw.name)));
            }
            if let Some(text) = raw.bmc.as_deref() {
                host.bmc = bmc_kind(&format!("{field}.bmc"), text)?;
            }
            if let Some(cpus) = raw.cpus {
                if cpus == 0 {
                    return Err(field_error(format!("{field}.cpus"), "must be at least 1"));
                }
                host.cpus = cpus;
            }
            if let Some(memory_mb) = raw.memory_mb {
                if memory_mb == 0 {
                    return Err(field_error(format!("{field}.memory_mb"), "must be at least 1"));
                }
                host.memory_mb = memory_mb;
            }
        }
        // Bounded like `hosts`: `vms_per_host = 76547` on 80 hosts made six million VM
        // specs and ran the parser out of memory (found by the `scenario` fuzz target).
        let vms_per_host = self.vms_per_host.unwrap_or(0);
        if vms_per_host > VMS_PER_HOST_MAX {
            return Err(field_error("lab.vms_per_host", format!("must be 0..={VMS_PER_HOST_MAX}, got {vms_per_host}")));
        }
        let mut vms = Vec::new();
        for index in 1..=self.hosts {
            for number in 1..=vms_per_host {
                vms.push(VmSpec {
                    name: format!("{}-vm{number}", host_name(index)),
                    host: host_name(index),
                    ha: true,
                    priority: 0,
                    cpus: 1,
                    memory_mb: 256,
                    group: None,
                });
            }
        }
        for (position, raw) in self.vm.into_iter().enumerate() {
            let field = format!("lab.vm[{position}]");
            let valid_name = !raw.name.is_empty() && !raw.name.contains(|c: char| c.is_whitespace() || c == '/');
            if !valid_name {
                return Err(field_error(format!("{field}.name"), "must be one word without '/'"));
            }
            if vms.iter().any(|vm: &VmSpec| vm.name == raw.name) {
                return Err(field_error(format!("{field}.name"), format!("`{}` is defined twice", raw.name)));
            }
            if !hosts.iter().any(|host| host.name == raw.host) {
                return Err(field_error(format!("{field}.host"), format!("no host `{}` in this lab", raw.host)));
            }
            if raw.cpus == Some(0) {
                return Err(field_error(format!("{field}.cpus"), "must be at least 1"));
            }
            if raw.memory_mb == Some(0) {
                return Err(field_error(format!("{field}.memory_mb"), "must be at least 1"));
            }
            vms.push(VmSpec {
                name: raw.name,
                host: raw.host,
                ha: raw.ha.unwrap_or(true),
                priority: raw.priority.unwrap_or(0),
                cpus: raw.cpus.unwrap_or(1),
                memory_mb: raw.memory_mb.unwrap_or(256),
                group: raw.group,
            });
        }
        Ok(LabSpec { hosts, profile, watchdog: self.watchdog.unwrap_or(true), vm_driver, vms })
    }
}

impl RawFault {
    fn validate(self, field: &str, hosts: &BTreeSet<String>, vms: &BTreeSet<String>) -> Result<Fault> {
        let at = duration_field(&format!("{field}.at"), &self.at)?;
        let action_name = self.action.as_str();
        // Which optional fields each action takes; anything else is a mistake worth naming.
        let (takes_host, takes_net, takes_percent, takes_vm) = match action_name {
            "partition" | "loss" => (true, true, action_name == "loss", false),
            "heal" => (true, true, false, false),
            "vm-crash" => (false, false, false, true),
            "manager-restart" | "disarm" | "arm" => (false, false, false, false),
            "power-off" | "power-on" | "hang" | "agent-stop" | "agent-kill" | "agent-start" | "bmc-fail"
            | "bmc-heal" | "maintenance-on" | "maintenance-off" | "reboot" => (true, false, false, false),
            other => return Err(field_error(format!("{field}.action"), format!("unknown action `{other}`"))),
        };
        for (name, present, allowed) in [
            ("host", self.host.is_some(), takes_host),
            ("net", self.net.is_some(), takes_net),
            ("percent", self.percent.is_some(), takes_percent),
            ("vm", self.vm.is_some(), takes_vm),
        ] {
            if present && !allowed {
                return Err(field_error(format!("{field}.{name}"), format!("not used by action `{action_name}`")));
            }
        }
        let host = || -> Result<String> {
            let host = self
                .host
                .clone()
                .ok_or_else(|| field_error(format!("{field}.host"), format!("required by action `{action_name}`")))?;
            if !hosts.contains(&host) {
                return Err(field_error(format!("{field}.host"), format!("no host `{host}` in this lab")));
            }
            Ok(host)
        };
        let net = |required: bool| -> Result<Option<NetSelector>> {
            match self.net.as_deref() {
                None if required => {
                    Err(field_error(format!("{field}.net"), format!("required by action `{action_name}`")))
                }
                None => Ok(None),
                Some(text) => NetSelector::parse(text).map(Some).ok_or_else(|| {
                    field_error(format!("{field}.net"), format!("`{text}` is not one of mgmt, storage, oob, all"))
                }),
            }
        };
        let action = match action_name {
            "power-off" => FaultAction::PowerOff { host: host()? },
            "power-on" => FaultAction::PowerOn { host: host()? },
            "hang" => FaultAction::Hang { host: host()? },
            "agent-stop" => FaultAction::AgentStop { host: host()? },
            "agent-kill" => FaultAction::AgentKill { host: host()? },
            "agent-start" => FaultAction::AgentStart { host: host()? },
            "bmc-fail" => FaultAction::BmcFail { host: host()? },
            "bmc-heal" => FaultAction::BmcHeal { host: host()? },
            "maintenance-on" => FaultAction::MaintenanceOn { host: host()? },
            "maintenance-off" => FaultAction::MaintenanceOff { host: host()? },
            "reboot" => FaultAction::Reboot { host: host()? },
            "partition" => FaultAction::Partition { host: host()?, net: net(true)?.expect("required") },
            "heal" => FaultAction::Heal { host: host()?, net: net(false)? },
            "loss" => {
                let percent =
                    self.percent.ok_or_else(|| field_error(format!("{field}.percent"), "required by action `loss`"))?;
                if percent > 100 {
                    return Err(field_error(format!("{field}.percent"), format!("{percent} is over 100")));
                }
                FaultAction::Loss { host: host()?, net: net(true)?.expect("required"), percent }
            }
            "vm-crash" => {
                let vm = self
                    .vm
                    .clone()
                    .ok_or_else(|| field_error(format!("{field}.vm"), "required by action `vm-crash`"))?;
                if !vms.contains(&vm) {
                    return Err(field_error(format!("{field}.vm"), format!("no VM `{vm}` in this lab")));
                }
                FaultAction::VmCrash { vm }
            }
            "manager-restart" => FaultAction::ManagerRestart,
            "disarm" => FaultAction::Disarm,
            "arm" => FaultAction::Arm,
            _ => unreachable!("action names were checked above"),
        };
        Ok(Fault { at, action })
    }
}

impl RawExpect {
    fn validate(self, hosts: &BTreeSet<String>, vms: &BTreeSet<String>) -> Result<Expect> {
        let duration = duration_field("expect.duration", &self.duration)?;
        if duration.is_zero() {
            return Err(field_error("expect.duration", "must be more than 0"));
        }
        let recovered_within =
            self.recovered_within.as_deref().map(|text| duration_field("expect.recovered_within", text)).transpose()?;
        let check_hosts = |field: &str, names: &[String]| -> Result<()> {
            for (position, name) in names.iter().enumerate() {
                if !hosts.contains(name) {
                    return Err(field_error(format!("{field}[{position}]"), format!("no host `{name}` in this lab")));
                }
            }
            Ok(())
        };
        let check_vms = |field: &str, names: &[String]| -> Result<()> {
            for (position, name) in names.iter().enumerate() {
                if !vms.contains(name) {
                    return Err(field_error(format!("{field}[{position}]"), format!("no VM `{name}` in this lab")));
                }
            }
            Ok(())
        };
        check_hosts("expect.fenced", &self.fenced)?;
        check_hosts("expect.not_fenced", &self.not_fenced)?;
        if let Some(both) = self.fenced.iter().find(|host| self.not_fenced.contains(host)) {
            return Err(field_error("expect.not_fenced", format!("`{both}` is also in expect.fenced")));
        }
        check_vms("expect.not_moved", &self.not_moved)?;
        for (host, state) in &self.final_state {
            let field = format!("expect.final_state.{host}");
            if !hosts.contains(host) {
                return Err(field_error(field, format!("no host `{host}` in this lab")));
            }
            if !HOST_STATES.contains(&state.as_str()) {
                return Err(field_error(field, format!("`{state}` is not one of {}", HOST_STATES.join(", "))));
            }
        }
        for (vm, allowed_hosts) in &self.final_host {
            let field = format!("expect.final_host.{vm}");
            if !vms.contains(vm) {
                return Err(field_error(field, format!("no VM `{vm}` in this lab")));
            }
            if allowed_hosts.is_empty() {
                return Err(field_error(field, "lists no host"));
            }
            check_hosts(&field, allowed_hosts)?;
        }
        for (position, group) in self.apart.iter().enumerate() {
            let field = format!("expect.apart[{position}]");
            if group.len() < 2 {
                return Err(field_error(field, "needs at least two VMs"));
            }
            check_vms(&field, group)?;
        }
        Ok(Expect {
            duration,
            recovered_within,
            fenced: self.fenced,
            not_fenced: self.not_fenced,
            not_moved: self.not_moved,
            final_state: self.final_state,
            final_host: self.final_host,
            apart: self.apart,
        })
    }
}

// ---------------------------------------------------------------- result

/// One named check of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// The `--json` result object, field for field as SCENARIOS.md shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub passed: bool,
    pub checks: Vec<CheckResult>,
    pub recovery_ms: BTreeMap<String, u64>,
    pub fenced: Vec<String>,
    pub final_state: BTreeMap<String, String>,
    pub events: u64,
}

impl ScenarioResult {
    /// `passed` is derived, never set by hand: the run passed iff every check did.
    pub fn new(
        scenario: &str,
        checks: Vec<CheckResult>,
        recovery_ms: BTreeMap<String, u64>,
        fenced: Vec<String>,
        final_state: BTreeMap<String, String>,
        events: u64,
    ) -> ScenarioResult {
        ScenarioResult {
            scenario: scenario.to_string(),
            passed: checks.iter().all(|check| check.passed),
            checks,
            recovery_ms,
            fenced,
            final_state,
            events,
        }
    }

    /// One JSON object on one line, for stdout.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain strings, numbers and maps always serialise")
    }

    /// The process exit code of `kvmha lab run`: 0 passed, 1 a check failed.
    pub fn exit_code(&self) -> i32 {
        if self.passed {
            0
        } else {
            1
        }
    }
}

/// The always-made `no_double_run` check.
pub fn no_double_run_check(report: &DoubleRunReport) -> CheckResult {
    CheckResult { name: "no_double_run".to_string(), passed: report.passed(), detail: report.detail() }
}

/// The `recovered_within` check: every VM that had to recover did, within `bound`.
/// `None` for a VM means it never ran again.
pub fn recovered_within_check(recoveries: &BTreeMap<String, Option<u64>>, bound: Duration) -> CheckResult {
    let bound_ms = bound.as_millis() as u64;
    let mut passed = true;
    let mut parts = Vec::new();
    for (vm, recovery) in recoveries {
        match recovery {
            Some(ms) => {
                passed &= *ms <= bound_ms;
                parts.push(format!("{vm} {:.1}s", *ms as f64 / 1000.0));
            }
            None => {
                passed = false;
                parts.push(format!("{vm} not recovered"));
            }
        }
    }
    CheckResult {
        name: "recovered_within".to_string(),
        passed,
        detail: if parts.is_empty() { "no VM had to recover".to_string() } else { parts.join(", ") },
    }
}

/// `not_moved`, from the disk logs: each VM kept its one run (one boot id on one
/// host) the whole time; a restart in place counts as moved too.
pub fn not_moved_check(logs: &BTreeMap<String, ParsedLog>, vms: &[String]) -> CheckResult {
    let mut passed = true;
    let mut parts = Vec::new();
    for vm in vms {
        let vm_runs = logs.get(vm).map(|log| runs(&log.records)).unwrap_or_default();
        match vm_runs.as_slice() {
            [only] => parts.push(format!("{vm} stayed on {}", only.host)),
            [] => {
                passed = false;
                parts.push(format!("{vm} never ran"));
            }
            many => {
                passed = false;
                let hosts: Vec<&str> = many.iter().map(|run| run.host.as_str()).collect();
                parts.push(format!("{vm} had {} runs ({})", many.len(), hosts.join(", ")));
            }
        }
    }
    CheckResult { name: "not_moved".to_string(), passed, detail: parts.join(", ") }
}

/// `final_host`, from the disk logs: at `end_ms` each VM writes from one of its
/// allowed hosts (see [`running_host`] for `fresh_ms`).
pub fn final_host_check(
    logs: &BTreeMap<String, ParsedLog>,
    expected: &BTreeMap<String, Vec<String>>,
    end_ms: u64,
    fresh_ms: u64,
) -> CheckResult {
    let mut passed = true;
    let mut parts = Vec::new();
    for (vm, allowed) in expected {
        let records = logs.get(vm).map(|log| log.records.as_slice()).unwrap_or_default();
        match running_host(records, end_ms, fresh_ms) {
            Some(host) if allowed.contains(&host) => parts.push(format!("{vm} on {host}")),
            Some(host) => {
                passed = false;
                parts.push(format!("{vm} on {host}, expected one of {}", allowed.join("/")));
            }
            None => {
                passed = false;
                parts.push(format!("{vm} not running"));
            }
        }
    }
    CheckResult { name: "final_host".to_string(), passed, detail: parts.join(", ") }
}

/// `apart`, from the disk logs: at `end_ms` the VMs of each group run on pairwise
/// different hosts (a VM that does not run fails the check).
pub fn apart_check(
    logs: &BTreeMap<String, ParsedLog>,
    groups: &[Vec<String>],
    end_ms: u64,
    fresh_ms: u64,
) -> CheckResult {
    let mut passed = true;
    let mut parts = Vec::new();
    for group in groups {
        let hosts: Vec<Option<String>> = group
            .iter()
            .map(|vm| {
                let records = logs.get(vm).map(|log| log.records.as_slice()).unwrap_or_default();
                running_host(records, end_ms, fresh_ms)
            })
            .collect();
        let distinct: BTreeSet<&String> = hosts.iter().flatten().collect();
        passed &= distinct.len() == group.len();
        let placed: Vec<String> = group
            .iter()
            .zip(&hosts)
            .map(|(vm, host)| format!("{vm}@{}", host.as_deref().unwrap_or("nowhere")))
            .collect();
        parts.push(placed.join(" "));
    }
    CheckResult { name: "apart".to_string(), passed, detail: parts.join("; ") }
}

#[cfg(test)]
mod tests;
