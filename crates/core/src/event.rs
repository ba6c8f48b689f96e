//! What goes into the engine ([`Event`]) and what comes out ([`Command`]).

use crate::model::{BootId, HostName, HostSpec, PoolName, ShutdownPolicy, VmName, VmSpec};
use crate::safety::DeathProof;
use crate::state::HostState;
use crate::time::Instant;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Identifies one investigation round, fence attempt or VM start, so that a late answer
/// to an old request is recognised and never mistaken for an answer to a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Everything the engine reacts to. Time comes with the call to `step`, never in here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// The manager (re)started with this engine: agents get a reconnect grace period and
    /// any work in flight is resumed.
    ManagerStarted,
    /// A host joined the cluster (or was loaded from the store).
    HostAdded(HostSpec),
    /// A VM became known, running on `host` if given.
    VmAdded { spec: VmSpec, host: Option<HostName> },
    /// An agent's periodic ping.
    Ping(Ping),
    /// An agent said goodbye before a clean stop.
    AgentGoodbye { host: HostName, boot_id: BootId },
    /// Time passed. The manager sends one at least every ping interval / 4.
    Tick,
    /// One investigator's answer about a host.
    Report(InvestigatorReport),
    /// The outcome of a `Command::Fence`.
    FenceResult(FenceResult),
    /// The outcome of a `Command::StartVm`.
    VmStartResult(VmStartResult),
    /// The outcome of a `Command::StopVm`.
    VmStopResult(VmStopResult),
    /// An operator's decision.
    Operator(OperatorAction),
}

/// One agent ping: who it is, which boot, what runs there, how its storage is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ping {
    pub host: HostName,
    pub boot_id: BootId,
    /// Counts up with every ping of this boot's agent: an older ping arriving late is
    /// dropped, so a stale view never overwrites a fresh one.
    pub seq: u64,
    pub vms: Vec<VmReport>,
    pub storage: StorageHealth,
}

/// One VM as an agent sees it on its own host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    pub name: VmName,
    pub state: VmRunState,
    /// The start (work id) that created this instance, if kvmha started it. A report about
    /// an older instance than the one kvmha last started says nothing about the new one.
    pub instance: Option<RequestId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmRunState {
    Running,
    /// Died without anyone asking it to stop.
    Crashed,
    /// Stopped by the agent's self-fencing because its leases could not be renewed.
    SelfFenced,
    /// Shut down on purpose (operator, guest shutdown): not restarted.
    Stopped,
    /// Stopped by its agent, lease released, before a planned stop of the host under the
    /// `failover` shutdown policy: restarted elsewhere.
    StoppedForShutdown,
}

/// How the agent's heartbeat writes to its pools go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageHealth {
    /// Every pool renewed within the renewal interval.
    Ok,
    /// Some pools fail; the others keep the host safe (a warning, not a self-fence).
    Degraded { failing: Vec<PoolName> },
    /// No pool can be written.
    AllFailing,
}

/// The four ways kvmha looks at a silent host (ARCHITECTURE.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum InvestigatorKind {
    NeighbourPing,
    StorageHeartbeat,
    VmActivity,
    BmcPower,
}

impl InvestigatorKind {
    pub fn name(self) -> &'static str {
        match self {
            InvestigatorKind::NeighbourPing => "neighbour-ping",
            InvestigatorKind::StorageHeartbeat => "heartbeat",
            InvestigatorKind::VmActivity => "vm-activity",
            InvestigatorKind::BmcPower => "bmc",
        }
    }
}

/// What one investigator concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finding {
    Alive,
    Dead,
    Unknown,
}

/// One investigator's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InvestigatorReport {
    pub host: HostName,
    pub investigation: RequestId,
    pub kind: InvestigatorKind,
    pub finding: Finding,
    /// What was seen, for people: "unreachable from host2,host3", "power on".
    pub evidence: String,
    /// The heartbeat records as read, for the storage investigator: the lease-expiry proof
    /// is built from these.
    pub heartbeat: Option<HeartbeatObservation>,
}

/// The host's heartbeat records on its pools, as one reader saw them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatObservation {
    pub pools: Vec<PoolObservation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolObservation {
    pub pool: PoolName,
    pub record: RecordState,
    /// The boot that wrote the record, when it could be read. A record seen advancing in a
    /// boot other than the one the host last pinged from says the host rebooted since.
    #[serde(default)]
    pub boot_id: Option<BootId>,
}

/// One heartbeat record, judged on the reader's own monotonic clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordState {
    /// The counter moved while the reader watched.
    Advancing,
    /// The counter has not moved for `unchanged_for` on the reader's clock.
    Unchanged {
        unchanged_for: Duration,
        boot_id: BootId,
        /// The agent wrote "my watchdog is armed and I self-fence" with its last renewal.
        watchdog_armed: bool,
        /// The agent's last write said it stopped cleanly (and disarmed its watchdog).
        stopped_cleanly: bool,
    },
    /// The record could not be read (pool unreachable from the reader, torn record, ...).
    Unreadable { reason: String },
}

/// The outcome of one fence attempt through the BMC.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FenceResult {
    pub host: HostName,
    pub fence: RequestId,
    pub outcome: FenceOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FenceOutcome {
    /// Power off sent and the power state read back as off.
    PoweredOff { evidence: String },
    /// The power state read back as off before anything was sent.
    AlreadyOff { evidence: String },
    /// Nothing proved the host off: authentication, unreachable, refused, timeout.
    Failed { error: String },
}

/// The outcome of one VM start on its target host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStartResult {
    pub work: RequestId,
    pub vm: VmName,
    pub host: HostName,
    pub outcome: VmStartOutcome,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStopResult {
    pub work: RequestId,
    pub vm: VmName,
    pub host: HostName,
    pub outcome: VmStopOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStopOutcome {
    /// The VM is off on that host and its lease released (also: it was already off).
    Stopped,
    /// The VM may still run there.
    Failed { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStartOutcome {
    Started,
    /// The VM already ran there (a repeated start of the same work item).
    AlreadyRunning,
    /// The VM's lease is held by a live owner: the start was refused.
    LeaseHeld {
        owner: String,
    },
    Failed {
        reason: String,
    },
}

/// What an operator can decide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorAction {
    /// "I have checked: this host is off." Proof 3 of the safety rule.
    ConfirmDown {
        host: HostName,
        by: String,
    },
    Maintenance {
        host: HostName,
        on: bool,
        by: String,
    },
    HostHa {
        host: HostName,
        enabled: bool,
        by: String,
    },
    ClusterHa {
        enabled: bool,
        by: String,
    },
    /// Release every watchdog and fence nobody (upgrades, network work).
    Disarm {
        by: String,
    },
    Arm {
        by: String,
    },
    /// An operator stops a VM (`kvmha vm stop`), stepped *before* the stop is sent to its
    /// host: from here on the VM is `Stopped` and nothing restarts it, whatever happens to
    /// its host (operator intent wins). A restart still waiting for proof or capacity is
    /// cancelled.
    VmStop {
        vm: VmName,
        by: String,
    },
    /// `kvmha host remove`: the host leaves the cluster (its agent certificate is revoked
    /// by the manager). Refused while any VM is bound to it or it is being fenced or
    /// evacuated: its VMs must be elsewhere, or proven off, first.
    RemoveHost {
        host: HostName,
        by: String,
    },
    /// How that stop ended on the host. `refused`: the agent answered that it could not
    /// stop the VM, which still runs there and is protected again. `None`: stopped, or no
    /// answer (the host may have died with it): it stays `Stopped`.
    VmStopOutcome {
        vm: VmName,
        by: String,
        refused: Option<String>,
    },
}

/// Everything the engine asks the world to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Append to the audit log. Comes before the action it announces.
    Audit(AuditEvent),
    /// Run these investigators on `host` and report before `deadline`.
    Investigate {
        host: HostName,
        investigation: RequestId,
        round: u32,
        kinds: Vec<InvestigatorKind>,
        /// Agents to ask for neighbour pings and heartbeat reads.
        neighbours: Vec<HostName>,
        /// Only evidence newer than this counts as a sign of life: a heartbeat written, or
        /// a VM disk written, before the host went silent says nothing about it now. A
        /// heartbeat is `Advancing` only if the reader saw it change after this instant
        /// (the write is known to be later than the read before the change).
        evidence_after: Instant,
        deadline: Instant,
    },
    /// Power `host` off through its BMC and read the state back.
    Fence { host: HostName, fence: RequestId, attempt: u32, deadline: Instant },
    /// Start `vm` on `target`. `release` says why no other host can be running it.
    StartVm { work: RequestId, vm: VmName, target: HostName, release: Release, deadline: Instant },
    /// Stop `vm` on `host` on purpose (maintenance evacuation): a graceful shutdown, then a
    /// hard stop, and its lease released. The engine starts it elsewhere once this is done.
    StopVm { work: RequestId, vm: VmName, host: HostName, deadline: Instant },
    /// Tell every agent the cluster-wide directives (sent with each ping reply too).
    Directives(Directives),
    /// Page a human.
    Alert(Alert),
}

/// Why a VM may be started: the previous owner provably does not run it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Release {
    /// Its host failed and the safety rule produced this proof.
    HostDead(DeathProof),
    /// Its host is alive and its agent reports the VM not running (crash, self-fence, a
    /// failed start, or a reboot that took the VM with it).
    ReportedNotRunning { host: HostName, boot_id: BootId, state: String },
}

impl Release {
    pub fn describe(&self) -> String {
        match self {
            Release::HostDead(proof) => proof.describe(),
            Release::ReportedNotRunning { host, boot_id, state } => {
                format!("{host} (boot {boot_id}) reports it not running ({state})")
            }
        }
    }
}

/// Cluster-wide orders to agents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directives {
    /// Watchdogs released; nobody self-fences; nobody is fenced.
    pub disarmed: bool,
    /// Every host lost the shared storage: hold VMs instead of self-fencing.
    pub storage_hold: bool,
    /// What an agent does with its VMs when it is stopped on purpose.
    #[serde(default)]
    pub shutdown_policy: ShutdownPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Severity {
    Warning,
    Critical,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub severity: Severity,
    pub host: Option<HostName>,
    pub message: String,
}

/// One line of the append-only audit log: what happened, why, and on what evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub at: Instant,
    pub host: Option<HostName>,
    pub vm: Option<VmName>,
    pub kind: AuditKind,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditKind {
    HostState {
        from: HostState,
        to: HostState,
    },
    InvestigationStarted,
    Verdict,
    FenceIntent,
    FenceOutcome,
    VmStartIntent,
    VmStartOutcome,
    VmStopIntent,
    VmStopOutcome,
    /// Maintenance evacuation of a host: started, advanced, finished, cancelled.
    Evacuation,
    VmState,
    Operator,
    OperatorRefused,
    Alert,
    Manager,
    Dropped,
}

impl AuditEvent {
    /// The line without its time.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        if let Some(host) = &self.host {
            text.push_str(&format!("{host} "));
        }
        if let Some(vm) = &self.vm {
            text.push_str(&format!("vm {vm} "));
        }
        match &self.kind {
            AuditKind::HostState { from, to } => text.push_str(&format!("{from:?} -> {to:?}: {}", self.detail)),
            kind => text.push_str(&format!("{kind:?}: {}", self.detail)),
        }
        text
    }
}

impl fmt::Display for AuditEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.at, self.describe())
    }
}
