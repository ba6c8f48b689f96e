//! `/metrics`: the Prometheus text format (version 0.0.4).
//!
//! Gauges come from the cluster as the engine sees it now ([`ClusterView`]); counters and
//! the recovery histogram are folded from the audit log ([`AuditCounters`], the incident
//! book), so they survive manager restarts: a counter only ever grows as the log does.
//! Every label value of a closed set is always written, zeros included, so a dashboard
//! never shows "no data" for a state nobody is in.

use crate::controller::ClusterView;
use crate::incident::{AuditRecord, Incident, IncidentStatus};
use kvmha_core::event::AuditKind;
use kvmha_core::{HostState, VmState};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Upper bounds (seconds) of the recovery-duration histogram: from a host turning Suspect
/// to one of its VMs running elsewhere. The profiles' worst cases lie between 5s and 300s.
pub const RECOVERY_BUCKETS: [f64; 12] = [1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0];

const VM_STATES: [VmState; 6] = [
    VmState::Running,
    VmState::Starting,
    VmState::Stopped,
    VmState::AwaitingProof,
    VmState::PendingCapacity,
    VmState::Error,
];

/// `alive`, `dead`, `unknown`.
pub const VERDICTS: [&str; 3] = ["alive", "dead", "unknown"];
/// `confirmed` (power off read back) or `failed`.
pub const FENCE_OUTCOMES: [&str; 2] = ["confirmed", "failed"];
/// How a VM start sent by kvmha ended.
pub const START_OUTCOMES: [&str; 3] = ["started", "refused", "failed"];

/// Counters folded from the audit log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditCounters {
    pub last_id: i64,
    pub audit_lines: u64,
    pub rounds_started: u64,
    /// By verdict (lower case).
    pub verdicts: BTreeMap<String, u64>,
    /// Fence commands sent, by host.
    pub fence_intents: BTreeMap<String, u64>,
    /// By (host, outcome).
    pub fence_outcomes: BTreeMap<(String, String), u64>,
    pub vm_starts: BTreeMap<String, u64>,
    pub alerts: u64,
}

impl AuditCounters {
    pub fn apply(&mut self, record: &AuditRecord) {
        if record.id <= self.last_id {
            return;
        }
        self.last_id = record.id;
        self.audit_lines += 1;
        let event = &record.event;
        let host = event.host.as_ref().map(|host| host.to_string()).unwrap_or_default();
        match &event.kind {
            AuditKind::InvestigationStarted => self.rounds_started += 1,
            AuditKind::Verdict => {
                // "round 1 #7: Dead: …" / "recheck #9: Alive: …"
                let verdict = event.detail.split(": ").nth(1).unwrap_or_default().to_lowercase();
                if VERDICTS.contains(&verdict.as_str()) {
                    *self.verdicts.entry(verdict).or_default() += 1;
                }
            }
            AuditKind::FenceIntent => *self.fence_intents.entry(host).or_default() += 1,
            AuditKind::FenceOutcome => {
                let outcome = if event.detail.contains("power off confirmed") { "confirmed" } else { "failed" };
                *self.fence_outcomes.entry((host, outcome.to_owned())).or_default() += 1;
            }
            AuditKind::VmStartOutcome => {
                let outcome = if event.detail.ends_with(" started") || event.detail.contains("seen running") {
                    "started"
                } else if event.detail.contains("refused") {
                    "refused"
                } else {
                    "failed"
                };
                *self.vm_starts.entry(outcome.to_owned()).or_default() += 1;
            }
            AuditKind::Alert => self.alerts += 1,
            _ => {}
        }
    }
}

/// What the text needs besides the view.
#[derive(Debug)]
pub struct MetricsInput<'a> {
    pub view: &'a ClusterView,
    pub counters: &'a AuditCounters,
    pub incidents: &'a [Incident],
    /// The BMC driver (`ipmi`, `redfish`) of each host that has one.
    pub drivers: &'a BTreeMap<String, String>,
    pub ping_timeout_ms: u64,
}

struct Out {
    text: String,
}

impl Out {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (key, value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", escape_label(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }
}

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn format_value(value: f64) -> String {
    if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

/// The whole `/metrics` body.
pub fn render(input: &MetricsInput<'_>) -> String {
    let view = input.view;
    let mut out = Out { text: String::new() };

    out.header("kvmha_hosts", "gauge", "Hosts by state, as the manager sees them.");
    for state in HostState::ALL {
        let count = view.hosts.iter().filter(|host| host.state == state).count();
        out.sample("kvmha_hosts", &[("state", state.name())], count as f64);
    }
    out.header("kvmha_host_state", "gauge", "1 for the state each host is in.");
    for host in &view.hosts {
        out.sample("kvmha_host_state", &[("host", &host.name), ("state", host.state.name())], 1.0);
    }
    out.header(
        "kvmha_agent_sessions",
        "gauge",
        "Agents whose last ping is younger than the ping timeout (connected agents).",
    );
    let sessions =
        view.hosts.iter().filter(|host| host.last_ping_ms_ago.is_some_and(|age| age <= input.ping_timeout_ms)).count();
    out.sample("kvmha_agent_sessions", &[], sessions as f64);
    out.header("kvmha_host_ping_age_seconds", "gauge", "Time since each host's last ping (absent before the first).");
    for host in &view.hosts {
        if let Some(age) = host.last_ping_ms_ago {
            out.sample("kvmha_host_ping_age_seconds", &[("host", &host.name)], age as f64 / 1000.0);
        }
    }
    out.header("kvmha_host_ha_enabled", "gauge", "1 when HA is on for the host.");
    for host in &view.hosts {
        out.sample("kvmha_host_ha_enabled", &[("host", &host.name)], flag(host.ha_enabled));
    }

    out.header("kvmha_vms", "gauge", "VMs by state.");
    for state in VM_STATES {
        let count = view.vms.iter().filter(|vm| vm.state == state).count();
        out.sample("kvmha_vms", &[("state", state.name())], count as f64);
    }
    out.header("kvmha_vms_pending_capacity", "gauge", "VMs released for a restart that wait for a host with room.");
    let pending = view.vms.iter().filter(|vm| vm.state == VmState::PendingCapacity).count();
    out.sample("kvmha_vms_pending_capacity", &[], pending as f64);
    out.header(
        "kvmha_work_items",
        "gauge",
        "Work in flight: investigations (hosts Suspect or Investigating), fences (hosts Fencing), VM starts (VMs Starting).",
    );
    let hosts_in = |states: &[HostState]| view.hosts.iter().filter(|host| states.contains(&host.state)).count();
    out.sample(
        "kvmha_work_items",
        &[("kind", "investigation")],
        hosts_in(&[HostState::Suspect, HostState::Investigating]) as f64,
    );
    out.sample("kvmha_work_items", &[("kind", "fence")], hosts_in(&[HostState::Fencing]) as f64);
    let starting = view.vms.iter().filter(|vm| vm.state == VmState::Starting).count();
    out.sample("kvmha_work_items", &[("kind", "vm_start")], starting as f64);

    out.header("kvmha_cluster_ha_enabled", "gauge", "1 when cluster-wide HA is on.");
    out.sample("kvmha_cluster_ha_enabled", &[], flag(view.cluster_ha));
    out.header("kvmha_cluster_disarmed", "gauge", "1 while the cluster is disarmed (nobody is fenced).");
    out.sample("kvmha_cluster_disarmed", &[], flag(view.disarmed));
    out.header("kvmha_storage_hold", "gauge", "1 while every host lost the shared storage and agents hold their VMs.");
    out.sample("kvmha_storage_hold", &[], flag(view.storage_hold));
    out.header("kvmha_manager_isolated", "gauge", "1 while more than half of the hosts are quiet at once.");
    out.sample("kvmha_manager_isolated", &[], flag(view.manager_isolated));

    let counters = input.counters;
    out.header("kvmha_audit_events_total", "counter", "Audit log lines written.");
    out.sample("kvmha_audit_events_total", &[], counters.audit_lines as f64);
    out.header("kvmha_investigation_rounds_total", "counter", "Investigation rounds started.");
    out.sample("kvmha_investigation_rounds_total", &[], counters.rounds_started as f64);
    out.header("kvmha_investigations_total", "counter", "Investigation rounds concluded, by verdict.");
    for verdict in VERDICTS {
        let count = counters.verdicts.get(verdict).copied().unwrap_or(0);
        out.sample("kvmha_investigations_total", &[("verdict", verdict)], count as f64);
    }
    let mut drivers: Vec<&str> = input.drivers.values().map(String::as_str).collect();
    for known in ["ipmi", "redfish"] {
        drivers.push(known);
    }
    drivers.sort();
    drivers.dedup();
    let driver_of = |host: &str| input.drivers.get(host).map(String::as_str).unwrap_or("none");
    out.header("kvmha_fence_attempts_total", "counter", "Fence commands sent to BMCs, by driver.");
    for driver in &drivers {
        let count: u64 =
            counters.fence_intents.iter().filter(|(host, _)| driver_of(host) == *driver).map(|(_, n)| n).sum();
        out.sample("kvmha_fence_attempts_total", &[("driver", driver)], count as f64);
    }
    out.header(
        "kvmha_fence_outcomes_total",
        "counter",
        "Fence attempts that ended, by driver and outcome (confirmed: power off read back).",
    );
    for driver in &drivers {
        for outcome in FENCE_OUTCOMES {
            let count: u64 = counters
                .fence_outcomes
                .iter()
                .filter(|((host, seen), _)| driver_of(host) == *driver && seen == outcome)
                .map(|(_, n)| n)
                .sum();
            out.sample("kvmha_fence_outcomes_total", &[("driver", driver), ("outcome", outcome)], count as f64);
        }
    }
    out.header("kvmha_vm_starts_total", "counter", "VM starts sent by kvmha that ended, by outcome.");
    for outcome in START_OUTCOMES {
        let count = counters.vm_starts.get(outcome).copied().unwrap_or(0);
        out.sample("kvmha_vm_starts_total", &[("outcome", outcome)], count as f64);
    }
    out.header("kvmha_alerts_total", "counter", "Alerts raised.");
    out.sample("kvmha_alerts_total", &[], counters.alerts as f64);

    out.header("kvmha_incidents", "gauge", "Incidents (host failure episodes) by status.");
    for status in IncidentStatus::ALL {
        let count = input.incidents.iter().filter(|incident| incident.status == status).count();
        out.sample("kvmha_incidents", &[("status", status.name())], count as f64);
    }

    out.header(
        "kvmha_recovery_duration_seconds",
        "histogram",
        "From a host turning Suspect to each of its HA VMs running on another host.",
    );
    let durations: Vec<f64> = input
        .incidents
        .iter()
        .flat_map(|incident| incident.vms.iter())
        .filter_map(|vm| vm.recovery_ms)
        .map(|ms| ms as f64 / 1000.0)
        .collect();
    for bound in RECOVERY_BUCKETS {
        let count = durations.iter().filter(|seconds| **seconds <= bound).count();
        out.sample("kvmha_recovery_duration_seconds_bucket", &[("le", &format_value(bound))], count as f64);
    }
    out.sample("kvmha_recovery_duration_seconds_bucket", &[("le", "+Inf")], durations.len() as f64);
    out.sample("kvmha_recovery_duration_seconds_sum", &[], durations.iter().sum());
    out.sample("kvmha_recovery_duration_seconds_count", &[], durations.len() as f64);
    out.text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{HostView, VmView};

    fn view() -> ClusterView {
        let host = |name: &str, state: HostState, ping: Option<u64>| HostView {
            name: name.to_owned(),
            state,
            state_for_ms: 0,
            ha_enabled: true,
            boot_id: None,
            last_ping_ms_ago: ping,
            address: None,
            has_bmc: true,
            storage: "Ok".into(),
            proof: None,
            cpus: 0,
            memory_mb: 0,
            capacity: Default::default(),
            used: Default::default(),
        };
        ClusterView {
            now_ms: 0,
            cluster_ha: true,
            disarmed: false,
            storage_hold: false,
            manager_isolated: false,
            hosts: vec![
                host("host1", HostState::Up, Some(150)),
                host("host2", HostState::Up, Some(2500)),
                host("host\"3", HostState::Fenced, None),
            ],
            vms: vec![VmView {
                name: "vm1".into(),
                state: VmState::PendingCapacity,
                state_for_ms: 0,
                host: None,
                last_host: None,
                instance: None,
                starting: None,
                ha: true,
                priority: 0,
                group: None,
                hosts: Vec::new(),
                max_restarts: 3,
                max_relocations: 3,
                restarts: 0,
                relocations: 0,
                vcpus: 1,
                memory_mb: 256,
                definition: true,
            }],
        }
    }

    #[test]
    fn every_state_is_written_with_zeros_and_labels_are_escaped() {
        let view = view();
        let drivers = BTreeMap::from([("host\"3".to_owned(), "ipmi".to_owned())]);
        let text = render(&MetricsInput {
            view: &view,
            counters: &AuditCounters::default(),
            incidents: &[],
            drivers: &drivers,
            ping_timeout_ms: 700,
        });
        assert!(text.contains("kvmha_hosts{state=\"Up\"} 2\n"), "{text}");
        assert!(text.contains("kvmha_hosts{state=\"Fenced\"} 1\n"));
        assert!(text.contains("kvmha_hosts{state=\"Maintenance\"} 0\n"));
        assert!(text.contains("kvmha_agent_sessions 1\n"), "host2's ping is older than the timeout");
        assert!(text.contains("kvmha_host_ping_age_seconds{host=\"host1\"} 0.15\n"));
        assert!(text.contains("kvmha_host_state{host=\"host\\\"3\",state=\"Fenced\"} 1\n"));
        assert!(text.contains("kvmha_vms_pending_capacity 1\n"));
        assert!(text.contains("kvmha_fence_outcomes_total{driver=\"redfish\",outcome=\"failed\"} 0\n"));
        assert!(text.contains("kvmha_recovery_duration_seconds_bucket{le=\"+Inf\"} 0\n"));
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
        }
    }

    #[test]
    fn every_metric_the_grafana_dashboard_queries_exists() {
        let view = view();
        let text = render(&MetricsInput {
            view: &view,
            counters: &AuditCounters::default(),
            incidents: &[],
            drivers: &BTreeMap::new(),
            ping_timeout_ms: 700,
        });
        let dashboard = include_str!("../../../docs/grafana-kvmha.json");
        let mut names: Vec<&str> = dashboard
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("kvmha_"))
            .collect();
        names.sort();
        names.dedup();
        assert!(names.len() >= 10, "{names:?}");
        for name in names {
            assert!(
                text.contains(&format!("\n{name}")) || text.starts_with(name),
                "grafana queries {name}, /metrics lacks it"
            );
        }
    }
}
