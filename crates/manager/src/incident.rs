//! Incidents: one per host failure episode, derived from the audit log alone.
//!
//! An incident opens when a host becomes `Suspect` and collects, in order, every audit line
//! about that host and about the VMs it lost: investigation rounds and each investigator's
//! finding with its evidence, fence attempts with their read-back, the proof, and each VM's
//! restart with its target host and how long it took. It ends when
//!
//! - the host is `Fenced` and every HA VM it lost runs again (recovered),
//! - the host turns out alive: `Degraded` (a false alarm; its periodic re-investigations
//!   stay in the same incident) or back `Up`,
//! - or an operator takes the host into maintenance.
//!
//! [`IncidentBook::apply`] folds one audit line at a time, so the manager keeps one book
//! and feeds it new lines as they are written; [`incidents`] is the same fold over a slice.
//! Nothing here reads the engine: the audit log is the record of what happened and why,
//! and an incident is exactly that record, grouped.
//!
//! The engine's audit details are sentences for people; the few shapes parsed here
//! (`round N #ID: Verdict: evidence`, `attempt A/M #ID: why`, `released: HOST proven dead`,
//! ...) are pinned by the tests below, which drive the real engine.

use kvmha_core::event::{AuditEvent, AuditKind, InvestigatorKind};
use kvmha_core::HostState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One audit line with where the store put it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The audit row id: increasing, stable across restarts.
    pub id: i64,
    /// Wall clock when written (ms since the Unix epoch).
    pub unix_ms: u64,
    pub event: AuditEvent,
}

/// Where an incident stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IncidentStatus {
    /// Suspect or investigators running.
    Investigating,
    /// BMC power-off or lease expiry in progress.
    Fencing,
    /// Nothing could prove the host dead: its VMs stay down until an operator decides.
    FenceFailed,
    /// Proven dead; some of its HA VMs do not run yet.
    Recovering,
    /// Proven dead and every HA VM it lost runs elsewhere.
    Recovered,
    /// The host is alive but its agent is not heard: nothing was touched.
    FalseAlarm,
    /// The host came back `Up` (or went into maintenance).
    Resolved,
}

impl IncidentStatus {
    pub const ALL: [IncidentStatus; 7] = [
        IncidentStatus::Investigating,
        IncidentStatus::Fencing,
        IncidentStatus::FenceFailed,
        IncidentStatus::Recovering,
        IncidentStatus::Recovered,
        IncidentStatus::FalseAlarm,
        IncidentStatus::Resolved,
    ];

    pub fn name(self) -> &'static str {
        match self {
            IncidentStatus::Investigating => "investigating",
            IncidentStatus::Fencing => "fencing",
            IncidentStatus::FenceFailed => "fence-failed",
            IncidentStatus::Recovering => "recovering",
            IncidentStatus::Recovered => "recovered",
            IncidentStatus::FalseAlarm => "false-alarm",
            IncidentStatus::Resolved => "resolved",
        }
    }

    /// Whether kvmha is still acting (or waiting for a human) on this incident.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            IncidentStatus::Investigating
                | IncidentStatus::Fencing
                | IncidentStatus::FenceFailed
                | IncidentStatus::Recovering
        )
    }
}

/// What one timeline line is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    HostState,
    Investigation,
    Verdict,
    FenceIntent,
    FenceOutcome,
    VmReleased,
    VmStartIntent,
    VmStartOutcome,
    VmState,
    Alert,
    Operator,
}

/// One investigator's answer, as the verdict line reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingEntry {
    /// `neighbour-ping`, `heartbeat`, `vm-activity`, `bmc`.
    pub investigator: String,
    /// `alive`, `dead` or `unknown` (as counted by the verdict rule).
    pub finding: String,
    pub evidence: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub audit_id: i64,
    /// Engine clock (ms).
    pub at_ms: u64,
    /// Since the incident opened.
    pub offset_ms: u64,
    pub unix_ms: u64,
    pub kind: EntryKind,
    pub vm: Option<String>,
    /// The host the line names (the target host for VM starts).
    pub host: Option<String>,
    /// The audit line without its time.
    pub text: String,
    /// `Alive`, `Dead` or `Unknown` for a verdict line.
    pub verdict: Option<String>,
    /// Each investigator's finding, for a verdict line.
    pub findings: Vec<FindingEntry>,
}

/// One fence attempt and what the BMC read back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceAttempt {
    /// The engine's request id, `#N`.
    pub request: String,
    /// `1/3`.
    pub attempt: String,
    pub sent_at_ms: u64,
    pub why: String,
    /// `None` while in flight.
    pub confirmed_off: Option<bool>,
    /// The read-back on success, the error on failure.
    pub outcome: Option<String>,
    pub outcome_at_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmRecovery {
    /// Released, waiting for a host with room (or for its lease).
    Pending,
    Starting,
    Running,
    /// Not HA (or HA off): left stopped.
    NotRestarted,
    /// Restart budget spent: a human must look.
    Error,
}

/// One VM the failed host lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRestart {
    pub vm: String,
    pub state: VmRecovery,
    pub released_at_ms: u64,
    /// The host of the last start sent.
    pub target: Option<String>,
    pub start_attempts: u32,
    pub started_at_ms: Option<u64>,
    /// From the incident's start (the host turning `Suspect`) to the VM running again.
    pub recovery_ms: Option<u64>,
    /// From the last start sent to the VM running.
    pub start_ms: Option<u64>,
    last_intent_at_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// The audit id of the line that opened it.
    pub id: i64,
    pub host: String,
    pub status: IncidentStatus,
    pub opened_at_ms: u64,
    pub opened_unix_ms: u64,
    /// When it ended (see the module doc); `None` while open.
    pub ended_at_ms: Option<u64>,
    /// The host's last state within the incident.
    pub host_state: HostState,
    /// One line: what happened in the end.
    pub summary: String,
    /// The proof line when the host was proven dead.
    pub proof: Option<String>,
    pub rounds: u32,
    pub fence_attempts: Vec<FenceAttempt>,
    pub vms: Vec<VmRestart>,
    pub timeline: Vec<TimelineEntry>,
}

impl Incident {
    pub fn duration_ms(&self, now_ms: u64) -> u64 {
        self.ended_at_ms.unwrap_or(now_ms).saturating_sub(self.opened_at_ms)
    }

    /// The verdict lines, in order.
    pub fn verdicts(&self) -> impl Iterator<Item = &TimelineEntry> {
        self.timeline.iter().filter(|entry| entry.kind == EntryKind::Verdict && entry.verdict.is_some())
    }
}

/// The incidents of an audit log, folded one line at a time.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IncidentBook {
    incidents: Vec<Incident>,
    /// The incident each host's new lines go to, until it is closed.
    current: BTreeMap<String, usize>,
    /// VMs released by an incident and not running yet.
    vm_owner: BTreeMap<String, usize>,
    last_id: i64,
}

/// Every incident of `records` (in audit order), oldest first.
pub fn incidents(records: &[AuditRecord]) -> Vec<Incident> {
    let mut book = IncidentBook::default();
    for record in records {
        book.apply(record);
    }
    book.into_incidents()
}

impl IncidentBook {
    pub fn incidents(&self) -> &[Incident] {
        &self.incidents
    }

    pub fn into_incidents(self) -> Vec<Incident> {
        self.incidents
    }

    pub fn get(&self, id: i64) -> Option<&Incident> {
        self.incidents.iter().find(|incident| incident.id == id)
    }

    /// The id of the last line applied (0 before any).
    pub fn last_id(&self) -> i64 {
        self.last_id
    }

    /// Folds one audit line in. Lines at or before the last one applied are ignored.
    pub fn apply(&mut self, record: &AuditRecord) {
        if record.id <= self.last_id {
            return;
        }
        self.last_id = record.id;
        let event = &record.event;
        let host = event.host.as_ref().map(|host| host.to_string());
        let vm = event.vm.as_ref().map(|vm| vm.to_string());
        match &event.kind {
            AuditKind::HostState { to, .. } => {
                let Some(host) = host else { return };
                self.host_state(record, &host, *to);
            }
            AuditKind::InvestigationStarted => self.host_line(record, host, EntryKind::Investigation),
            AuditKind::Verdict => self.host_line(record, host, EntryKind::Verdict),
            AuditKind::FenceIntent => self.host_line(record, host, EntryKind::FenceIntent),
            AuditKind::FenceOutcome => self.host_line(record, host, EntryKind::FenceOutcome),
            AuditKind::Alert => self.host_line(record, host, EntryKind::Alert),
            AuditKind::Operator | AuditKind::OperatorRefused => self.host_line(record, host, EntryKind::Operator),
            AuditKind::VmState => {
                if let Some(vm) = vm {
                    self.vm_state(record, &vm);
                }
            }
            AuditKind::VmStartIntent | AuditKind::VmStartOutcome => {
                let Some(vm) = vm else { return };
                let Some(&index) = self.vm_owner.get(&vm) else { return };
                let kind = if event.kind == AuditKind::VmStartIntent {
                    EntryKind::VmStartIntent
                } else {
                    EntryKind::VmStartOutcome
                };
                self.push(index, record, kind);
                let incident = &mut self.incidents[index];
                let Some(restart) = incident.vms.iter_mut().find(|restart| restart.vm == vm) else { return };
                let at = event.at.as_millis();
                if kind == EntryKind::VmStartIntent {
                    restart.target = host;
                    restart.start_attempts += 1;
                    restart.state = VmRecovery::Starting;
                    restart.last_intent_at_ms = Some(at);
                } else if event.detail.ends_with(" started") || event.detail.contains("seen running") {
                    restart.state = VmRecovery::Running;
                    restart.started_at_ms = Some(at);
                    restart.recovery_ms = Some(at.saturating_sub(incident.opened_at_ms));
                    restart.start_ms = restart.last_intent_at_ms.map(|intent| at.saturating_sub(intent));
                    if host.is_some() {
                        restart.target = host;
                    }
                    self.vm_owner.remove(&vm);
                    self.settle(index, at);
                } else {
                    restart.state = VmRecovery::Pending;
                }
            }
            // Maintenance moves are planned work, not part of a failure episode.
            AuditKind::Manager
            | AuditKind::Dropped
            | AuditKind::VmStopIntent
            | AuditKind::VmStopOutcome
            | AuditKind::Evacuation => {}
        }
    }

    fn open_index(&self, host: &str) -> Option<usize> {
        self.current.get(host).copied()
    }

    fn push(&mut self, index: usize, record: &AuditRecord, kind: EntryKind) {
        let event = &record.event;
        let incident = &mut self.incidents[index];
        let (verdict, findings) =
            if kind == EntryKind::Verdict { parse_verdict(&event.detail) } else { (None, Vec::new()) };
        if verdict.is_some() {
            incident.rounds += 1;
        }
        incident.timeline.push(TimelineEntry {
            audit_id: record.id,
            at_ms: event.at.as_millis(),
            offset_ms: event.at.as_millis().saturating_sub(incident.opened_at_ms),
            unix_ms: record.unix_ms,
            kind,
            vm: event.vm.as_ref().map(|vm| vm.to_string()),
            host: event.host.as_ref().map(|host| host.to_string()),
            text: event.describe(),
            verdict,
            findings,
        });
    }

    fn host_line(&mut self, record: &AuditRecord, host: Option<String>, kind: EntryKind) {
        let Some(index) = host.as_deref().and_then(|host| self.open_index(host)) else { return };
        self.push(index, record, kind);
        let detail = &record.event.detail;
        let at = record.event.at.as_millis();
        let incident = &mut self.incidents[index];
        match kind {
            EntryKind::FenceIntent => {
                // "attempt 1/3 #12: why"
                let rest = detail.strip_prefix("attempt ").unwrap_or(detail);
                let (head, why) = rest.split_once(": ").unwrap_or((rest, ""));
                let (attempt, request) = head.split_once(' ').unwrap_or((head, ""));
                incident.fence_attempts.push(FenceAttempt {
                    request: request.to_owned(),
                    attempt: attempt.to_owned(),
                    sent_at_ms: at,
                    why: why.to_owned(),
                    confirmed_off: None,
                    outcome: None,
                    outcome_at_ms: None,
                });
            }
            EntryKind::FenceOutcome => {
                // "#12: power off confirmed: evidence", "attempt 1 #12 failed: error",
                // "retry #12 failed: error"
                let request = detail
                    .split_whitespace()
                    .find(|word| word.starts_with('#'))
                    .map(|word| word.trim_end_matches(':').to_owned());
                let confirmed = detail.contains("power off confirmed");
                let rest = detail.split_once(": ").map_or(detail.as_str(), |(_, rest)| rest);
                let outcome = rest.strip_prefix("power off confirmed: ").unwrap_or(rest).to_owned();
                if let Some(attempt) =
                    incident.fence_attempts.iter_mut().rev().find(|attempt| Some(&attempt.request) == request.as_ref())
                {
                    attempt.confirmed_off = Some(confirmed);
                    attempt.outcome = Some(outcome);
                    attempt.outcome_at_ms = Some(at);
                }
            }
            _ => {}
        }
    }

    fn host_state(&mut self, record: &AuditRecord, host: &str, to: HostState) {
        let at = record.event.at.as_millis();
        let index = match self.open_index(host) {
            Some(index) => index,
            None if to == HostState::Suspect => {
                self.incidents.push(Incident {
                    id: record.id,
                    host: host.to_owned(),
                    status: IncidentStatus::Investigating,
                    opened_at_ms: at,
                    opened_unix_ms: record.unix_ms,
                    ended_at_ms: None,
                    host_state: to,
                    summary: format!("{host} suspect: {}", record.event.detail),
                    proof: None,
                    rounds: 0,
                    fence_attempts: Vec::new(),
                    vms: Vec::new(),
                    timeline: Vec::new(),
                });
                let index = self.incidents.len() - 1;
                self.current.insert(host.to_owned(), index);
                index
            }
            None => return,
        };
        self.push(index, record, EntryKind::HostState);
        let detail = record.event.detail.clone();
        let incident = &mut self.incidents[index];
        incident.host_state = to;
        match to {
            HostState::Suspect | HostState::Investigating | HostState::Connecting => {
                if incident.status != IncidentStatus::FalseAlarm || to == HostState::Investigating {
                    incident.status = IncidentStatus::Investigating;
                }
            }
            HostState::Degraded => {
                incident.status = IncidentStatus::FalseAlarm;
                incident.ended_at_ms.get_or_insert(at);
                incident.summary = format!("false alarm: {host} is alive ({detail}); nothing was touched");
            }
            HostState::Fencing => {
                incident.status = IncidentStatus::Fencing;
                incident.summary = format!("{host} fencing: {detail}");
            }
            HostState::FenceFailed => {
                incident.status = IncidentStatus::FenceFailed;
                incident.ended_at_ms = None;
                incident.summary = format!("{host} could not be proven dead: {detail}");
            }
            HostState::Fenced => {
                incident.proof = Some(detail.clone());
                incident.status = IncidentStatus::Recovering;
                incident.ended_at_ms = None;
                incident.summary = detail;
                self.settle(index, at);
            }
            HostState::Up | HostState::Disconnected | HostState::Maintenance => {
                let was_fenced = incident.proof.is_some();
                incident.status = IncidentStatus::Resolved;
                incident.ended_at_ms.get_or_insert(at);
                incident.summary = match (to, was_fenced) {
                    (HostState::Maintenance, _) => format!("{host} taken into maintenance: {detail}"),
                    (_, true) => format!("{host} rejoined after it was fenced: {detail}"),
                    (_, false) => format!("false alarm: {host} came back ({detail})"),
                };
                self.current.remove(host);
            }
        }
    }

    fn vm_state(&mut self, record: &AuditRecord, vm: &str) {
        let event = &record.event;
        let detail = &event.detail;
        let at = event.at.as_millis();
        // "PendingCapacity: released: host1 proven dead", "Stopped: host1 proven dead; not HA, ..."
        let released_by = detail
            .strip_prefix("PendingCapacity: released: ")
            .and_then(|rest| rest.strip_suffix(" proven dead"))
            .map(|host| (host, VmRecovery::Pending))
            .or_else(|| {
                detail
                    .strip_prefix("Stopped: ")
                    .and_then(|rest| rest.split_once(" proven dead; not HA"))
                    .map(|(host, _)| (host, VmRecovery::NotRestarted))
            });
        if let Some((host, state)) = released_by {
            let Some(index) = self.open_index(host) else { return };
            self.push(index, record, EntryKind::VmReleased);
            let incident = &mut self.incidents[index];
            incident.vms.retain(|restart| restart.vm != vm);
            incident.vms.push(VmRestart {
                vm: vm.to_owned(),
                state,
                released_at_ms: at,
                target: None,
                start_attempts: 0,
                started_at_ms: None,
                recovery_ms: None,
                start_ms: None,
                last_intent_at_ms: None,
            });
            if state == VmRecovery::Pending {
                self.vm_owner.insert(vm.to_owned(), index);
            }
            self.settle(index, at);
            return;
        }
        let Some(&index) = self.vm_owner.get(vm) else { return };
        if detail.starts_with("Error") {
            self.push(index, record, EntryKind::VmState);
            if let Some(restart) = self.incidents[index].vms.iter_mut().find(|restart| restart.vm == vm) {
                restart.state = VmRecovery::Error;
            }
            self.vm_owner.remove(vm);
        } else if detail.starts_with("PendingCapacity") {
            self.push(index, record, EntryKind::VmState);
        }
    }

    /// A fenced host's incident ends when none of its VMs is still on its way back.
    fn settle(&mut self, index: usize, at: u64) {
        let incident = &mut self.incidents[index];
        if incident.host_state != HostState::Fenced {
            return;
        }
        let waiting =
            incident.vms.iter().any(|restart| matches!(restart.state, VmRecovery::Pending | VmRecovery::Starting));
        if waiting {
            incident.status = IncidentStatus::Recovering;
            incident.ended_at_ms = None;
            return;
        }
        incident.status = IncidentStatus::Recovered;
        incident.ended_at_ms = Some(at);
        let running = incident.vms.iter().filter(|restart| restart.state == VmRecovery::Running).count();
        let failed = incident.vms.iter().filter(|restart| restart.state == VmRecovery::Error).count();
        let proof = incident.proof.clone().unwrap_or_default();
        incident.summary = if incident.vms.is_empty() {
            format!("{proof}; it ran no VM kvmha knows")
        } else if failed > 0 {
            format!("{proof}; {running} VM(s) restarted, {failed} in Error")
        } else {
            format!("{proof}; {running} VM(s) restarted")
        };
    }
}

/// Splits `round 2 #7: Dead: neighbour-ping=unknown (…); bmc=dead (power off)` into the
/// verdict and each investigator's finding.
fn parse_verdict(detail: &str) -> (Option<String>, Vec<FindingEntry>) {
    let Some((_, rest)) = detail.split_once(": ") else { return (None, Vec::new()) };
    let Some((verdict, evidence)) = rest.split_once(": ") else { return (None, Vec::new()) };
    if !matches!(verdict, "Alive" | "Dead" | "Unknown") {
        return (None, Vec::new());
    }
    (Some(verdict.to_owned()), parse_findings(evidence))
}

fn parse_findings(evidence: &str) -> Vec<FindingEntry> {
    const KINDS: [InvestigatorKind; 4] = [
        InvestigatorKind::NeighbourPing,
        InvestigatorKind::StorageHeartbeat,
        InvestigatorKind::VmActivity,
        InvestigatorKind::BmcPower,
    ];
    // An evidence text may itself contain "; ": a part starts only where an investigator's
    // name and "=" follow.
    let starts_part = |text: &str| KINDS.iter().any(|kind| text.starts_with(&format!("{}=", kind.name())));
    let mut parts: Vec<String> = Vec::new();
    for piece in evidence.split("; ") {
        match parts.last_mut() {
            Some(last) if !starts_part(piece) => {
                last.push_str("; ");
                last.push_str(piece);
            }
            _ => parts.push(piece.to_owned()),
        }
    }
    parts
        .into_iter()
        .filter_map(|part| {
            let (investigator, rest) = part.split_once('=')?;
            let (finding, evidence) = rest.split_once(" (").unwrap_or((rest, ""));
            Some(FindingEntry {
                investigator: investigator.to_owned(),
                finding: finding.to_owned(),
                evidence: evidence.strip_suffix(')').unwrap_or(evidence).to_owned(),
            })
        })
        .collect()
}

/// The timeline as terminal lines (`kvmha incident show` prints what the API returns the
/// same way; this is the manager-side form, used in logs and tests).
pub fn render_text(incident: &Incident) -> String {
    let mut out =
        format!("incident {} on {}: {} ({})\n", incident.id, incident.host, incident.status.name(), incident.summary);
    for entry in &incident.timeline {
        out.push_str(&format!("  +{:>8.3}s  {}\n", entry.offset_ms as f64 / 1000.0, entry.text));
        for finding in &entry.findings {
            out.push_str(&format!(
                "               {:<15} {:<8} {}\n",
                finding.investigator, finding.finding, finding.evidence
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmha_core::event::{
        FenceOutcome, FenceResult, Finding, InvestigatorReport, Ping, StorageHealth, VmReport, VmRunState,
        VmStartOutcome, VmStartResult,
    };
    use kvmha_core::model::RestartBudget;
    use kvmha_core::{
        BootId, Command, Engine, EngineConfig, Event, HostName, HostSpec, Instant, Profile, Resources, Timing,
        TimingSettings, VmName, VmSpec,
    };

    /// The real engine with three hosts that have a BMC and no pools, host1 running two HA
    /// VMs and one that is not HA; it answers the engine's commands the way `answer` says.
    struct Drive {
        engine: Engine,
        now: u64,
        seq: u64,
        records: Vec<AuditRecord>,
        commands: Vec<Command>,
    }

    impl Drive {
        fn new() -> Drive {
            let timing = Timing::from_profile(Profile::Fast, &TimingSettings::default()).unwrap();
            let mut drive = Drive {
                engine: Engine::new(EngineConfig::new(timing), Instant::from_millis(100_000)),
                now: 100_000,
                seq: 0,
                records: Vec::new(),
                commands: Vec::new(),
            };
            for name in ["host1", "host2", "host3"] {
                drive.step(Event::HostAdded(HostSpec {
                    name: HostName::from(name),
                    networks: vec!["mgmt".into()],
                    capacity: Resources { cpus: 8, memory_mb: 8192 },
                    has_bmc: true,
                    has_watchdog: false,
                    pools: vec![],
                }));
            }
            for (vm, ha) in [("vm-a", true), ("vm-b", true), ("vm-plain", false)] {
                let spec = VmSpec {
                    name: VmName::from(vm),
                    ha,
                    priority: 1,
                    demand: Resources { cpus: 1, memory_mb: 512 },
                    group: None,
                    affinity: Default::default(),
                    budget: RestartBudget::default(),
                };
                drive.step(Event::VmAdded { spec, host: Some(HostName::from("host1")) });
            }
            drive.advance(3_500, &["host1", "host2", "host3"]);
            drive
        }

        fn step(&mut self, event: Event) {
            for command in self.engine.step(Instant::from_millis(self.now), event) {
                match command {
                    Command::Audit(event) => {
                        let id = self.records.len() as i64 + 1;
                        self.records.push(AuditRecord { id, unix_ms: 1_700_000_000_000 + self.now, event });
                    }
                    other => self.commands.push(other),
                }
            }
        }

        fn ping(&mut self, host: &str) {
            self.seq += 1;
            let vms = self
                .engine
                .vms()
                .values()
                .filter(|vm| vm.host.as_ref().map(HostName::as_str) == Some(host))
                .map(|vm| VmReport { name: vm.spec.name.clone(), state: VmRunState::Running, instance: vm.instance })
                .collect();
            self.step(Event::Ping(Ping {
                host: HostName::from(host),
                boot_id: BootId(format!("{host}-boot")),
                seq: self.seq,
                vms,
                storage: StorageHealth::Ok,
            }));
        }

        fn advance(&mut self, ms: u64, pinging: &[&str]) {
            let end = self.now + ms;
            while self.now < end {
                self.now += 100;
                if self.now % 200 == 0 {
                    for host in pinging {
                        self.ping(host);
                    }
                }
                self.step(Event::Tick);
            }
        }

        /// Answers every pending command: investigators with `neighbour` and `bmc`
        /// findings, fences with `fence`, starts with success.
        fn answer(&mut self, neighbour: Finding, bmc: Finding, fence: &FenceOutcome) {
            for command in std::mem::take(&mut self.commands) {
                match command {
                    Command::Investigate { host, investigation, kinds, .. } => {
                        for kind in kinds {
                            let finding = if kind == InvestigatorKind::BmcPower { bmc } else { neighbour };
                            let evidence = match (kind, finding) {
                                (InvestigatorKind::BmcPower, Finding::Dead) => "power off; chassis answered".into(),
                                (InvestigatorKind::BmcPower, _) => "power on".into(),
                                (_, Finding::Alive) => "answers ping from host2".into(),
                                _ => "unreachable from host2; host3".into(),
                            };
                            self.step(Event::Report(InvestigatorReport {
                                host: host.clone(),
                                investigation,
                                kind,
                                finding,
                                evidence,
                                heartbeat: None,
                            }));
                        }
                    }
                    Command::Fence { host, fence: id, .. } => {
                        self.step(Event::FenceResult(FenceResult { host, fence: id, outcome: fence.clone() }))
                    }
                    Command::StartVm { work, vm, target, .. } => {
                        self.now += 250;
                        self.step(Event::VmStartResult(VmStartResult {
                            work,
                            vm,
                            host: target,
                            outcome: VmStartOutcome::Started,
                        }))
                    }
                    _ => {}
                }
            }
        }

        /// Host1 silent; everyone else pings; commands answered as given, for `ms`.
        fn host1_silent(&mut self, ms: u64, neighbour: Finding, bmc: Finding, fence: FenceOutcome) {
            let end = self.now + ms;
            while self.now < end {
                self.advance(100, &["host2", "host3"]);
                self.answer(neighbour, bmc, &fence);
            }
        }
    }

    fn powered_off() -> FenceOutcome {
        FenceOutcome::PoweredOff { evidence: "chassis power is off (read back)".into() }
    }

    #[test]
    fn a_dead_host_is_one_incident_from_suspect_to_its_vms_running_elsewhere() {
        let mut drive = Drive::new();
        assert!(incidents(&drive.records).is_empty(), "no incident while every host pings");
        drive.host1_silent(6_000, Finding::Unknown, Finding::Dead, powered_off());
        let all = incidents(&drive.records);
        assert_eq!(all.len(), 1, "{all:#?}");
        let incident = &all[0];
        assert_eq!(incident.host, "host1");
        assert_eq!(incident.status, IncidentStatus::Recovered, "{}", render_text(incident));
        assert!(incident.proof.as_deref().unwrap().contains("host1 proven dead (BmcPowerOff)"));

        let first = &incident.timeline[0];
        assert_eq!(first.kind, EntryKind::HostState);
        assert!(first.text.contains("Suspect"), "{}", first.text);
        assert_eq!(first.offset_ms, 0);

        let verdict = incident.verdicts().next().expect("a verdict");
        assert_eq!(verdict.verdict.as_deref(), Some("Dead"));
        let investigators: Vec<&str> = verdict.findings.iter().map(|f| f.investigator.as_str()).collect();
        assert_eq!(investigators, ["neighbour-ping", "bmc"]);
        assert_eq!(verdict.findings[0].finding, "unknown");
        assert_eq!(verdict.findings[0].evidence, "unreachable from host2; host3", "a '; ' inside evidence");
        assert_eq!(verdict.findings[1].finding, "dead");

        assert_eq!(incident.fence_attempts.len(), 1, "{:#?}", incident.fence_attempts);
        let fence = &incident.fence_attempts[0];
        assert_eq!(fence.attempt, "1/3");
        assert!(fence.request.starts_with('#'));
        assert_eq!(fence.confirmed_off, Some(true));
        assert!(fence.outcome.as_deref().unwrap().contains("chassis power is off (read back)"));

        let mut vms: Vec<(&str, VmRecovery)> = incident.vms.iter().map(|vm| (vm.vm.as_str(), vm.state)).collect();
        vms.sort();
        assert_eq!(
            vms,
            [("vm-a", VmRecovery::Running), ("vm-b", VmRecovery::Running), ("vm-plain", VmRecovery::NotRestarted)]
        );
        for vm in incident.vms.iter().filter(|vm| vm.state == VmRecovery::Running) {
            let target = vm.target.as_deref().unwrap();
            assert!(target == "host2" || target == "host3", "{target}");
            // Running as soon as a ping or the start's answer (250ms later) says so.
            assert!(vm.start_ms.is_some_and(|ms| ms > 0 && ms <= 250), "{vm:?}");
            let fence_offset = fence.sent_at_ms - incident.opened_at_ms;
            assert!(vm.recovery_ms.unwrap() > fence_offset, "recovery counts from Suspect: {vm:?}");
        }
        // The order of the story: suspect, verdict, fence intent, outcome, proof, restarts.
        let position = |kind: EntryKind| incident.timeline.iter().position(|entry| entry.kind == kind).unwrap();
        assert!(position(EntryKind::Verdict) < position(EntryKind::FenceIntent));
        assert!(position(EntryKind::FenceIntent) < position(EntryKind::FenceOutcome));
        assert!(position(EntryKind::FenceOutcome) < position(EntryKind::VmReleased));
        assert!(position(EntryKind::VmReleased) < position(EntryKind::VmStartOutcome));
        assert_eq!(incident.ended_at_ms, incident.vms.iter().filter_map(|vm| vm.started_at_ms).max());

        // The host rejoining later closes the incident without changing when it ended.
        let ended = incident.ended_at_ms;
        drive.advance(1_000, &["host1", "host2", "host3"]);
        let all = incidents(&drive.records);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].status, IncidentStatus::Resolved);
        assert_eq!(all[0].ended_at_ms, ended);
        let text = render_text(&all[0]);
        assert!(text.contains("bmc") && text.contains("FenceIntent"), "{text}");
    }

    #[test]
    fn an_alive_host_is_a_false_alarm_and_its_rechecks_stay_in_the_same_incident() {
        let mut drive = Drive::new();
        drive.host1_silent(12_000, Finding::Alive, Finding::Unknown, powered_off());
        let all = incidents(&drive.records);
        assert_eq!(all.len(), 1, "rechecks of a degraded host opened new incidents: {all:#?}");
        let incident = &all[0];
        assert_eq!(incident.status, IncidentStatus::FalseAlarm);
        assert!(incident.fence_attempts.is_empty());
        assert!(incident.vms.is_empty());
        assert!(incident.verdicts().count() >= 2, "the periodic re-investigation is in the timeline");
        assert!(incident.verdicts().all(|entry| entry.verdict.as_deref() == Some("Alive")));
        let first_degraded = incident
            .timeline
            .iter()
            .find(|entry| entry.kind == EntryKind::HostState && entry.text.contains("-> Degraded"))
            .unwrap();
        assert_eq!(incident.ended_at_ms, Some(first_degraded.at_ms));

        // Back up: resolved. A later failure is a new incident.
        drive.advance(1_000, &["host1", "host2", "host3"]);
        drive.host1_silent(6_000, Finding::Unknown, Finding::Dead, powered_off());
        let all = incidents(&drive.records);
        assert_eq!(
            all.iter().map(|incident| incident.status).collect::<Vec<_>>(),
            [IncidentStatus::Resolved, IncidentStatus::Recovered]
        );
    }

    #[test]
    fn a_fence_that_keeps_failing_leaves_the_incident_open_with_every_attempt() {
        let mut drive = Drive::new();
        let failed = FenceOutcome::Failed { error: "RAKP authentication failed".into() };
        drive.host1_silent(8_000, Finding::Unknown, Finding::Dead, failed);
        let all = incidents(&drive.records);
        assert_eq!(all.len(), 1);
        let incident = &all[0];
        assert_eq!(incident.status, IncidentStatus::FenceFailed, "{}", render_text(incident));
        assert!(incident.status.is_open());
        assert!(incident.fence_attempts.len() >= 3, "{:#?}", incident.fence_attempts);
        assert!(incident.fence_attempts.iter().all(|attempt| attempt.confirmed_off == Some(false)));
        assert!(incident.fence_attempts[0].outcome.as_deref().unwrap().contains("RAKP authentication failed"));
        assert_eq!(incident.ended_at_ms, None);
        assert!(incident.vms.is_empty(), "nothing released without a proof");
    }

    #[test]
    fn folding_line_by_line_equals_folding_the_whole_log_and_replays_are_ignored() {
        let mut drive = Drive::new();
        drive.host1_silent(6_000, Finding::Unknown, Finding::Dead, powered_off());
        let mut book = IncidentBook::default();
        for record in &drive.records {
            book.apply(record);
            book.apply(record);
        }
        for record in &drive.records[..10] {
            book.apply(record);
        }
        assert_eq!(book.incidents(), incidents(&drive.records).as_slice());
        assert_eq!(book.last_id(), drive.records.len() as i64);
    }
}
