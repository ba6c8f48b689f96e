//! The HA engine: `step(now, event) -> commands`.
//!
//! The engine owns the manager's view of the cluster and decides; it never acts. The
//! manager persists the engine's state, then executes the commands it returned, then feeds
//! the outcomes back as events. Every decision is an [`AuditEvent`] with its evidence,
//! emitted before the command that carries it out.

use crate::event::{
    Alert, AuditEvent, AuditKind, Command, Directives, Event, FenceOutcome, FenceResult, Finding, InvestigatorKind,
    InvestigatorReport, OperatorAction, Ping, Release, RequestId, Severity, StorageHealth, VmReport, VmRunState,
    VmStartOutcome, VmStartResult, VmStopOutcome, VmStopResult,
};
use crate::model::{BootId, HostName, HostSpec, Resources, ShutdownPolicy, VmName, VmSpec};
use crate::planner::{self, Candidate, PlacementRequest};
use crate::safety::{self, DeathProof, FenceConfirmation, HeartbeatSeen, OperatorConfirmation, SafetyInputs};
use crate::state::{HostState, VmState};
use crate::time::{format_duration, Instant};
use crate::timing::Timing;
use crate::verdict::{self, Verdict};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Policy that is not timing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub timing: Timing,
    /// How many neighbours are asked to ping a silent host.
    pub neighbour_checks: usize,
    pub shutdown_policy: ShutdownPolicy,
}

impl EngineConfig {
    pub fn new(timing: Timing) -> EngineConfig {
        EngineConfig { timing, neighbour_checks: 2, shutdown_policy: ShutdownPolicy::Freeze }
    }
}

/// A deliberately broken engine, for proving that the simulator catches real bugs.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PlantedBug {
    /// Treat an unknown verdict as proof of death: the classic false failover.
    RecoverWithoutProof,
}

/// The engine's state. Serializable as a whole: the manager persists it, and a restarted
/// manager rebuilds the engine from it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Engine {
    config: EngineConfig,
    hosts: BTreeMap<HostName, HostRecord>,
    vms: BTreeMap<VmName, VmRecord>,
    next_request: u64,
    grace_until: Instant,
    cluster_ha: bool,
    disarmed: bool,
    storage_hold: bool,
    manager_isolated: bool,
    /// VMs in `PendingCapacity`: kept so that a ping costs nothing when none wait.
    pending: BTreeSet<VmName>,
    /// Every VM bound to each host (`VmRecord::host`), so that a host's failure costs its
    /// own VMs rather than a scan of the cluster's (200,000 VMs at issue 9's scale). Not
    /// persisted: rebuilt from the VM records before the first step of a loaded engine.
    #[serde(skip)]
    vms_by_host: VmIndex,
    /// Set by [`Engine::step_batch`]: placements wait for the end of the batch.
    #[serde(skip)]
    placement_deferred: bool,
    #[serde(skip)]
    placement_due: bool,
    #[cfg(test)]
    #[serde(skip)]
    pub(crate) planted_bug: Option<PlantedBug>,
}

/// How many earlier boots of a host the engine remembers to refuse their pings.
const PAST_BOOTS_MAX: usize = 8;

/// The VMs bound to each host. `built` is false in an engine just deserialized: the
/// first step rebuilds it from the VM records.
#[derive(Clone, Debug, Default)]
struct VmIndex {
    built: bool,
    by_host: BTreeMap<HostName, BTreeSet<VmName>>,
}

impl VmIndex {
    fn rebuild(vms: &BTreeMap<VmName, VmRecord>) -> VmIndex {
        let mut index = VmIndex { built: true, by_host: BTreeMap::new() };
        for (name, record) in vms {
            if let Some(host) = &record.host {
                index.by_host.entry(host.clone()).or_default().insert(name.clone());
            }
        }
        index
    }

    /// `vm`'s host changed from `from` to `to`.
    fn rebind(&mut self, vm: &VmName, from: Option<&HostName>, to: Option<&HostName>) {
        if from == to {
            return;
        }
        if let Some(from) = from {
            if let Some(vms) = self.by_host.get_mut(from) {
                vms.remove(vm);
                if vms.is_empty() {
                    self.by_host.remove(from);
                }
            }
        }
        if let Some(to) = to {
            self.by_host.entry(to.clone()).or_default().insert(vm.clone());
        }
    }
}

/// The engine's record of one host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRecord {
    pub spec: HostSpec,
    pub state: HostState,
    pub state_since: Instant,
    pub ha_enabled: bool,
    pub boot_id: Option<BootId>,
    pub last_ping: Option<Instant>,
    last_ping_seq: Option<u64>,
    /// Boots of this host before `boot_id`, newest last (at most [`PAST_BOOTS_MAX`]): a
    /// ping from one of them is a delayed message or someone else using the host's
    /// certificate, never the host itself, and is dropped.
    #[serde(default)]
    past_boots: Vec<BootId>,
    /// Last ping, or the manager's start if later: silence is measured from here.
    silent_since: Instant,
    pub storage: StorageHealth,
    goodbye_since_last_ping: bool,
    storage_hold_granted_until: Option<Instant>,
    investigation: Option<Investigation>,
    unknown_rounds: u32,
    next_recheck: Option<Instant>,
    fencing: Option<Fencing>,
    heartbeat: Option<HeartbeatSeen>,
    operator_confirmation: Option<OperatorConfirmation>,
    pub proof: Option<DeathProof>,
    /// An alert was raised for the current episode (cleared when the host is Up again).
    pub alerted: bool,
    noted_ping_while_fencing: bool,
    /// Maintenance was asked for and the host's VMs are being moved off it first.
    #[serde(default)]
    evacuation: Option<Evacuation>,
    /// Its agent stopped its VMs for a planned stop (failover policy): no restart target
    /// until then, by which time its goodbye has made it `Disconnected` (or its silence
    /// `Suspect`), or it pings on and is a host like any other.
    #[serde(default)]
    leaving_until: Option<Instant>,
}

/// A maintenance evacuation in progress: the host stays `Up` (its VMs still run there)
/// until the last one has moved, then it becomes `Maintenance`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Evacuation {
    by: String,
    started: Instant,
    /// The VM being moved now. One at a time, highest priority first: each VM is down only
    /// between its stop here and its start elsewhere, and a failure stops the evacuation
    /// with everything not yet touched still running.
    moving: Option<VmName>,
    moved: Vec<VmName>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Investigation {
    id: RequestId,
    round: u32,
    deadline: Instant,
    expected: Vec<InvestigatorKind>,
    reports: Vec<InvestigatorReport>,
    purpose: RoundPurpose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum RoundPurpose {
    /// A round of the investigation of a silent host.
    Verdict,
    /// A storage-only look during fencing, feeding the lease-expiry proof.
    LeaseCheck,
    /// A periodic look at a host whose fencing failed: alive, or fence again.
    Recheck,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Fencing {
    started: Instant,
    attempts: u32,
    in_flight: Option<(RequestId, Instant)>,
    next_attempt_at: Option<Instant>,
    bmc_exhausted: bool,
    /// Every fence id of this episode: a late success of any of them is still proof.
    fence_ids: Vec<RequestId>,
    confirmation: Option<FenceConfirmation>,
    next_lease_check: Instant,
}

/// The engine's record of one VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    /// The one host that may be running the VM. Cleared only by a [`Release`].
    pub host: Option<HostName>,
    pub state: VmState,
    pub state_since: Instant,
    /// Why the VM may start elsewhere, once its previous host is proven not to run it.
    pub release: Option<Release>,
    /// Where the VM last ran or was last started: a start elsewhere is a relocation.
    pub last_host: Option<HostName>,
    /// The start that created the running instance (`None`: found running, not started by us).
    pub instance: Option<RequestId>,
    work: Option<WorkItem>,
    starts: Vec<(Instant, HostName)>,
    relocations: Vec<Instant>,
    not_before: Option<Instant>,
    /// A stop for maintenance evacuation in flight.
    #[serde(default)]
    stop: Option<StopWork>,
    /// An operator stop sent to the VM's host whose outcome is not known yet: reports of
    /// this instance running are older than the stop and do not bring it back.
    #[serde(default)]
    operator_stop: Option<OperatorStop>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct OperatorStop {
    by: String,
    instance: Option<RequestId>,
}

impl HostRecord {
    /// The host now runs `boot`; the one it replaces joins the remembered earlier boots.
    /// Returns the boot it had before.
    fn set_boot(&mut self, boot: BootId) -> Option<BootId> {
        let previous = self.boot_id.replace(boot);
        if let Some(previous) = previous.as_ref().filter(|previous| Some(*previous) != self.boot_id.as_ref()) {
            self.past_boots.push(previous.clone());
            if self.past_boots.len() > PAST_BOOTS_MAX {
                self.past_boots.remove(0);
            }
        }
        previous
    }
}

impl VmRecord {
    /// Starts (per host, summed) and relocations within the restart budget's window: what
    /// the budget has spent so far.
    pub fn budget_spent(&self, now: Instant) -> (u32, u32) {
        let window_start = now - self.spec.budget.window;
        let starts = self.starts.iter().filter(|(at, _)| *at >= window_start).count() as u32;
        let relocations = self.relocations.iter().filter(|at| **at >= window_start).count() as u32;
        (starts, relocations)
    }

    /// The host and id of the start in flight, if any.
    pub fn work_in_flight(&self) -> Option<(RequestId, &HostName)> {
        self.work.as_ref().map(|work| (work.id, &work.target))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StopWork {
    id: RequestId,
    host: HostName,
    deadline: Instant,
    attempts: u32,
}

/// Attempts at one evacuation stop before the evacuation is given up.
const STOP_ATTEMPTS: u32 = 3;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct WorkItem {
    id: RequestId,
    target: HostName,
    deadline: Instant,
    /// What this start did to the budget, so a start refused by the lease ("not yet") can
    /// be taken back out of it.
    counted_relocation: bool,
    previous_last_host: Option<HostName>,
    /// A move for maintenance: not a failure, so not counted in the restart budget.
    #[serde(default)]
    budget_exempt: bool,
}

/// Collects what one step decides.
struct Effects {
    now: Instant,
    commands: Vec<Command>,
}

impl Effects {
    fn audit(&mut self, host: Option<&HostName>, vm: Option<&VmName>, kind: AuditKind, detail: impl Into<String>) {
        self.commands.push(Command::Audit(AuditEvent {
            at: self.now,
            host: host.cloned(),
            vm: vm.cloned(),
            kind,
            detail: detail.into(),
        }));
    }

    fn alert(&mut self, severity: Severity, host: Option<&HostName>, message: impl Into<String>) {
        let message = message.into();
        self.audit(host, None, AuditKind::Alert, format!("{severity:?}: {message}"));
        self.commands.push(Command::Alert(Alert { severity, host: host.cloned(), message }));
    }
}

/// Why a self-fenced VM is not running: its host lost its storage, so it restarts elsewhere.
const SELF_FENCED: &str = "stopped by self-fencing";
/// Why an evacuated VM is not running: kvmha stopped it to move it off a host entering
/// maintenance.
const EVACUATED: &str = "stopped for maintenance evacuation";
/// Why a VM of a host stopped on purpose under the `failover` policy is not running.
const SHUTDOWN_FAILOVER: &str = "stopped by its agent before a planned host stop (failover policy)";

const ACTIVE_VM_STATES: [VmState; 3] = [VmState::Running, VmState::Starting, VmState::AwaitingProof];

impl Engine {
    pub fn new(config: EngineConfig, now: Instant) -> Engine {
        let grace_until = now + config.timing.reconnect_grace();
        Engine {
            config,
            hosts: BTreeMap::new(),
            vms: BTreeMap::new(),
            next_request: 1,
            grace_until,
            cluster_ha: true,
            disarmed: false,
            storage_hold: false,
            manager_isolated: false,
            pending: BTreeSet::new(),
            vms_by_host: VmIndex { built: true, by_host: BTreeMap::new() },
            placement_deferred: false,
            placement_due: false,
            #[cfg(test)]
            planted_bug: None,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
    /// Agents learn it from the directives of their next ping reply.
    pub fn set_shutdown_policy(&mut self, policy: ShutdownPolicy) {
        self.config.shutdown_policy = policy;
    }
    pub fn timing(&self) -> &Timing {
        &self.config.timing
    }
    pub fn hosts(&self) -> &BTreeMap<HostName, HostRecord> {
        &self.hosts
    }
    pub fn vms(&self) -> &BTreeMap<VmName, VmRecord> {
        &self.vms
    }
    pub fn host_state(&self, host: &HostName) -> Option<HostState> {
        self.hosts.get(host).map(|record| record.state)
    }
    pub fn vm_state(&self, vm: &VmName) -> Option<VmState> {
        self.vms.get(vm).map(|record| record.state)
    }
    pub fn directives(&self) -> Directives {
        Directives {
            disarmed: self.disarmed,
            storage_hold: self.storage_hold,
            shutdown_policy: self.config.shutdown_policy,
        }
    }
    pub fn manager_isolated(&self) -> bool {
        self.manager_isolated
    }
    pub fn cluster_ha(&self) -> bool {
        self.cluster_ha
    }

    /// Feeds one event in; returns what to do, audit lines first.
    pub fn step(&mut self, now: Instant, event: Event) -> Vec<Command> {
        let mut fx = Effects { now, commands: Vec::new() };
        if !self.vms_by_host.built {
            self.vms_by_host = VmIndex::rebuild(&self.vms);
        }
        self.handle(&mut fx, event);
        #[cfg(test)]
        self.check_index();
        fx.commands
    }

    /// Feeds several events in at one instant, in order, as `step` would one by one,
    /// except that VMs waiting for a host are placed once, after the last event: a rack
    /// of hosts proven dead in one batch is planned in one pass over the cluster's free
    /// capacity rather than one pass per host. Returns every command, in order.
    pub fn step_batch(&mut self, now: Instant, events: impl IntoIterator<Item = Event>) -> Vec<Command> {
        let mut fx = Effects { now, commands: Vec::new() };
        if !self.vms_by_host.built {
            self.vms_by_host = VmIndex::rebuild(&self.vms);
        }
        self.placement_deferred = true;
        for event in events {
            self.handle(&mut fx, event);
        }
        self.placement_deferred = false;
        if std::mem::take(&mut self.placement_due) {
            self.place_pending(&mut fx);
        }
        #[cfg(test)]
        self.check_index();
        fx.commands
    }

    /// The index of VMs by host holds exactly the VM records' bindings.
    #[cfg(test)]
    fn check_index(&self) {
        let rebuilt = VmIndex::rebuild(&self.vms);
        assert_eq!(rebuilt.by_host, self.vms_by_host.by_host, "vm index out of step with the vm records");
    }

    fn handle(&mut self, fx: &mut Effects, event: Event) {
        match event {
            Event::ManagerStarted => self.on_manager_started(fx),
            Event::HostAdded(spec) => self.on_host_added(fx, spec),
            Event::VmAdded { spec, host } => self.on_vm_added(fx, spec, host),
            Event::Ping(ping) => self.on_ping(fx, ping),
            Event::AgentGoodbye { host, boot_id } => self.on_goodbye(fx, &host, &boot_id),
            Event::Tick => self.on_tick(fx),
            Event::Report(report) => self.on_report(fx, report),
            Event::FenceResult(result) => self.on_fence_result(fx, result),
            Event::VmStartResult(result) => self.on_vm_start_result(fx, result),
            Event::VmStopResult(result) => self.on_vm_stop_result(fx, result),
            Event::Operator(action) => self.on_operator(fx, action),
        }
    }

    fn next_id(&mut self) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        id
    }

    fn set_host_state(&mut self, fx: &mut Effects, host: &HostName, to: HostState, detail: impl Into<String>) {
        let Some(record) = self.hosts.get_mut(host) else {
            return;
        };
        let from = record.state;
        if from == to {
            return;
        }
        assert!(from.may_become(to), "illegal host transition {from:?} -> {to:?} for {host}");
        record.state = to;
        record.state_since = fx.now;
        fx.audit(Some(host), None, AuditKind::HostState { from, to }, detail);
    }

    fn set_vm_state(&mut self, fx: &mut Effects, vm: &VmName, to: VmState, detail: impl Into<String>) {
        let Some(record) = self.vms.get_mut(vm) else {
            return;
        };
        if record.state == to {
            return;
        }
        record.state = to;
        record.state_since = fx.now;
        if to == VmState::PendingCapacity {
            self.pending.insert(vm.clone());
        } else {
            self.pending.remove(vm);
        }
        let host = record.host.clone();
        fx.audit(host.as_ref(), Some(vm), AuditKind::VmState, format!("{to}: {}", detail.into()));
    }

    // ----- cluster membership -------------------------------------------------------------

    fn on_manager_started(&mut self, fx: &mut Effects) {
        self.grace_until = fx.now + self.config.timing.reconnect_grace();
        fx.audit(
            None,
            None,
            AuditKind::Manager,
            format!(
                "manager started; agents have until {} to reconnect before anyone can become suspect ({})",
                self.grace_until,
                self.config.timing.summary()
            ),
        );
        let names: Vec<HostName> = self.hosts.keys().cloned().collect();
        for name in &names {
            let record = self.hosts.get_mut(name).expect("listed");
            record.silent_since = fx.now;
            // Answers to requests of the previous run will never come: ask again. Every
            // request is idempotent (a fence of a host already off is a success; a start
            // of a VM already running with the same work id is a success).
            if record.investigation.take().is_some() && record.state == HostState::Investigating {
                self.start_round(fx, name);
            }
            let record = self.hosts.get_mut(name).expect("listed");
            if let Some(fencing) = record.fencing.as_mut() {
                if fencing.in_flight.take().is_some() {
                    fencing.attempts = fencing.attempts.saturating_sub(1);
                    fencing.next_attempt_at = Some(fx.now);
                }
            }
        }
        let starting: Vec<VmName> =
            self.vms.iter().filter(|(_, vm)| vm.state == VmState::Starting).map(|(name, _)| name.clone()).collect();
        for vm in starting {
            self.resend_start(fx, &vm, "manager restarted before the outcome was known");
        }
        fx.commands.push(Command::Directives(self.directives()));
        self.on_tick(fx);
    }

    fn on_host_added(&mut self, fx: &mut Effects, spec: HostSpec) {
        if let Some(record) = self.hosts.get_mut(&spec.name) {
            record.spec = spec.clone();
            fx.audit(Some(&spec.name), None, AuditKind::Manager, "host configuration updated");
            return;
        }
        fx.audit(
            Some(&spec.name),
            None,
            AuditKind::Manager,
            format!(
                "host added: {} cpus, {} MiB, bmc {}, watchdog {}, pools [{}]",
                spec.capacity.cpus,
                spec.capacity.memory_mb,
                if spec.has_bmc { "yes" } else { "no" },
                if spec.has_watchdog { "yes" } else { "no" },
                spec.pools.iter().map(|pool| pool.as_str()).collect::<Vec<_>>().join(",")
            ),
        );
        let record = HostRecord {
            state: HostState::Connecting,
            state_since: fx.now,
            ha_enabled: true,
            boot_id: None,
            last_ping: None,
            last_ping_seq: None,
            past_boots: Vec::new(),
            silent_since: fx.now,
            storage: StorageHealth::Ok,
            goodbye_since_last_ping: false,
            storage_hold_granted_until: None,
            investigation: None,
            unknown_rounds: 0,
            next_recheck: None,
            fencing: None,
            heartbeat: None,
            operator_confirmation: None,
            proof: None,
            alerted: false,
            noted_ping_while_fencing: false,
            evacuation: None,
            leaving_until: None,
            spec,
        };
        self.hosts.insert(record.spec.name.clone(), record);
    }

    fn on_vm_added(&mut self, fx: &mut Effects, spec: VmSpec, host: Option<HostName>) {
        if let Some(record) = self.vms.get_mut(&spec.name) {
            let ha_turned_off = record.spec.ha && !spec.ha;
            record.spec = spec;
            // A VM waiting for a restart whose HA was just turned off is not restarted.
            if ha_turned_off && record.state == VmState::PendingCapacity {
                let name = record.spec.name.clone();
                record.release = None;
                self.set_vm_state(fx, &name, VmState::Stopped, "HA turned off while waiting for a restart");
            }
            return;
        }
        let state = if host.is_some() { VmState::Running } else { VmState::Stopped };
        fx.audit(
            host.as_ref(),
            Some(&spec.name),
            AuditKind::VmState,
            format!("{state}: vm added (ha {}, priority {})", if spec.ha { "on" } else { "off" }, spec.priority),
        );
        let record = VmRecord {
            last_host: host.clone(),
            instance: None,
            host,
            state,
            state_since: fx.now,
            release: None,
            work: None,
            starts: Vec::new(),
            relocations: Vec::new(),
            not_before: None,
            stop: None,
            operator_stop: None,
            spec,
        };
        self.vms_by_host.rebind(&record.spec.name, None, record.host.as_ref());
        self.vms.insert(record.spec.name.clone(), record);
    }

    // ----- agent traffic ------------------------------------------------------------------

    fn on_ping(&mut self, fx: &mut Effects, ping: Ping) {
        let hold_validity = self.config.timing.storage_hold_validity();
        let storage_hold = self.storage_hold;
        let Some(record) = self.hosts.get_mut(&ping.host) else {
            fx.audit(Some(&ping.host), None, AuditKind::Dropped, "ping from a host that is not in the cluster");
            return;
        };
        let same_boot = record.boot_id.as_ref() == Some(&ping.boot_id);
        if same_boot && record.last_ping_seq.is_some_and(|seq| ping.seq <= seq) {
            // Overtaken by a newer ping: what it says is already out of date.
            return;
        }
        if !same_boot && record.past_boots.contains(&ping.boot_id) {
            // A host never goes back to an earlier boot: taking this ping would let a
            // stale view (or an impostor) overwrite the fresh one.
            let detail = format!(
                "ping from an earlier boot {} (current boot {}): a delayed message or another machine using this host's certificate",
                ping.boot_id,
                record.boot_id.as_ref().map(ToString::to_string).unwrap_or_default()
            );
            fx.audit(Some(&ping.host), None, AuditKind::Dropped, detail);
            return;
        }
        record.last_ping_seq = Some(ping.seq);
        // The same boot as before (nearly every ping): nothing to record, nothing to copy.
        let rebooted =
            !same_boot && record.set_boot(ping.boot_id.clone()).as_ref().is_some_and(|boot| *boot != ping.boot_id);
        record.last_ping = Some(fx.now);
        record.silent_since = fx.now;
        record.goodbye_since_last_ping = false;
        if storage_hold {
            record.storage_hold_granted_until = Some(fx.now + hold_validity);
        }
        let storage_changed = record.storage != ping.storage;
        record.storage = ping.storage.clone();
        let state = record.state;
        let host = ping.host.clone();

        match state {
            HostState::Connecting
            | HostState::Disconnected
            | HostState::Suspect
            | HostState::Investigating
            | HostState::Degraded
            | HostState::FenceFailed => {
                let detail = match state {
                    HostState::Connecting => "first ping".to_owned(),
                    HostState::Disconnected => "agent back after a clean stop".to_owned(),
                    _ => format!("agent back (boot {})", ping.boot_id),
                };
                self.back_up(fx, &host, detail);
            }
            HostState::Fenced => {
                if !rebooted {
                    let proof = record.proof.as_ref().map(DeathProof::describe).unwrap_or_default();
                    fx.alert(
                        Severity::Critical,
                        Some(&host),
                        format!("host pings with the same boot {} after it was fenced ({proof}): check its BMC and its VMs now", ping.boot_id),
                    );
                }
                self.back_up(fx, &host, format!("agent back after fencing (boot {})", ping.boot_id));
            }
            HostState::Fencing => {
                let in_flight = record.fencing.as_ref().is_some_and(|fencing| fencing.in_flight.is_some());
                if !in_flight {
                    // Nothing sent can still land: stop before the next attempt.
                    self.back_up(
                        fx,
                        &host,
                        format!(
                            "agent back while fencing, no fence in flight: fencing stopped (boot {})",
                            ping.boot_id
                        ),
                    );
                } else if !record.noted_ping_while_fencing {
                    record.noted_ping_while_fencing = true;
                    fx.audit(Some(&host), None, AuditKind::Verdict, "ping received while a fence is in flight: it cannot be called back; fencing stops after its outcome if pings go on");
                }
            }
            HostState::Up | HostState::Maintenance => {}
        }

        if rebooted {
            let taken = self.vms_on(&host, &ACTIVE_VM_STATES);
            for vm in taken {
                self.vm_not_running(fx, &vm, &host, &ping.boot_id, "host rebooted");
            }
        }
        for report in &ping.vms {
            self.on_vm_report(fx, &host, &ping.boot_id, report);
        }
        if storage_changed || self.storage_hold {
            self.update_storage_hold(fx);
        }
        self.place_pending(fx);
    }

    fn back_up(&mut self, fx: &mut Effects, host: &HostName, detail: String) {
        let record = self.hosts.get_mut(host).expect("caller checked");
        record.investigation = None;
        record.unknown_rounds = 0;
        record.next_recheck = None;
        record.fencing = None;
        record.heartbeat = None;
        record.operator_confirmation = None;
        record.alerted = false;
        record.noted_ping_while_fencing = false;
        record.proof = None;
        self.set_host_state(fx, host, HostState::Up, detail);
        // VMs we stopped believing in while the host was being fenced are its again.
        self.resume_held_vms(fx, host, "its host is back");
    }

    /// The VMs bound to `host` whose state is one of `states`.
    fn vms_on(&self, host: &HostName, states: &[VmState]) -> Vec<VmName> {
        self.vms_bound_to(host).filter(|(_, vm)| states.contains(&vm.state)).map(|(name, _)| name.clone()).collect()
    }

    /// The VMs bound to `host`, by name, from the index.
    fn vms_bound_to<'a>(&'a self, host: &'a HostName) -> impl Iterator<Item = (&'a VmName, &'a VmRecord)> + 'a {
        self.vms_by_host
            .by_host
            .get(host)
            .into_iter()
            .flatten()
            .filter_map(|name| self.vms.get_key_value(name))
            .filter(move |(_, vm)| vm.host.as_ref() == Some(host))
    }

    /// VMs held while their host was being fenced go back to what they were.
    fn resume_held_vms(&mut self, fx: &mut Effects, host: &HostName, why: &str) {
        for vm in self.vms_on(host, &[VmState::AwaitingProof]) {
            self.resume_vm(fx, &vm, why);
        }
    }

    /// A VM held while its host was being fenced goes back to what it was: starting (the
    /// same work item is sent again when due) or running.
    fn resume_vm(&mut self, fx: &mut Effects, vm: &VmName, why: &str) {
        let starting = self.vms[vm].work.is_some();
        let to = if starting { VmState::Starting } else { VmState::Running };
        self.set_vm_state(fx, vm, to, why);
    }

    fn on_vm_report(&mut self, fx: &mut Effects, host: &HostName, boot_id: &BootId, report: &VmReport) {
        let vm = &report.name;
        let Some(record) = self.vms.get(vm) else {
            return;
        };
        let owner = record.host.clone();
        match report.state {
            VmRunState::Running
                if record.operator_stop.as_ref().is_some_and(|stop| stop.instance == report.instance) =>
            {
                // Built before the operator's stop landed: not news.
            }
            VmRunState::Running => match owner {
                Some(owner) if owner == *host => {
                    if record.state != VmState::Running {
                        let record = self.vms.get_mut(vm).expect("checked");
                        if let Some(work) = record.work.take() {
                            fx.audit(
                                Some(host),
                                Some(vm),
                                AuditKind::VmStartOutcome,
                                format!("work {} seen running in a ping", work.id),
                            );
                        }
                        self.set_vm_state(fx, vm, VmState::Running, "reported running by its host");
                    }
                    self.vms.get_mut(vm).expect("checked").instance = report.instance;
                }
                // Its last host said it stopped (or it gave up): a start elsewhere (an
                // operator's) is news, not a double run.
                Some(_) if matches!(record.state, VmState::Stopped | VmState::Error) => {
                    self.found_running(fx, vm, host, report.instance)
                }
                Some(owner) => {
                    fx.alert(
                        Severity::Critical,
                        Some(host),
                        format!("vm {vm} reported running on {host} but kvmha placed it on {owner}: possible double run, check both hosts"),
                    );
                }
                // The very instance its host just said is not running: a ping built before
                // that news and delivered after it. Believing it would bind the VM to a host
                // where it is off, and nothing would restart it.
                None if matches!(&record.release, Some(Release::ReportedNotRunning { host: released_by, .. })
                    if released_by == host && record.instance == report.instance) =>
                {
                    fx.audit(
                        Some(host),
                        Some(vm),
                        AuditKind::Dropped,
                        format!("stale report: {vm} running on {host}, which already said it is not running"),
                    );
                }
                None => self.found_running(fx, vm, host, report.instance),
            },
            VmRunState::Crashed | VmRunState::SelfFenced | VmRunState::Stopped | VmRunState::StoppedForShutdown => {
                if owner.as_ref() == Some(host)
                    && record.operator_stop.as_ref().is_some_and(|stop| stop.instance == report.instance)
                {
                    // The operator's stop landed.
                    self.vms.get_mut(vm).expect("checked").operator_stop = None;
                    return;
                }
                // Only news about the instance we believe runs there counts; while a start
                // is in flight its outcome decides, not a report that may predate it.
                let current = owner.as_ref() == Some(host)
                    && record.state == VmState::Running
                    && record.instance == report.instance;
                if !current {
                    return;
                }
                let evacuating = record.stop.as_ref().is_some_and(|stop| stop.host == *host);
                match report.state {
                    VmRunState::Crashed => self.vm_not_running(fx, vm, host, boot_id, "crashed"),
                    VmRunState::SelfFenced => self.vm_not_running(fx, vm, host, boot_id, SELF_FENCED),
                    VmRunState::StoppedForShutdown => {
                        let until = fx.now + self.config.timing.ping_timeout();
                        self.hosts.get_mut(host).expect("pinging host").leaving_until = Some(until);
                        self.vm_not_running(fx, vm, host, boot_id, SHUTDOWN_FAILOVER)
                    }
                    // Our own evacuation stop, seen before (or instead of) its answer.
                    _ if evacuating => self.vm_stopped_for_evacuation(fx, vm, host, boot_id.clone(), "in a ping"),
                    _ => self.set_vm_state(fx, vm, VmState::Stopped, "shut down on purpose"),
                }
            }
        }
    }

    /// A VM kvmha does not bind to any running host is reported running: it runs there now.
    fn found_running(&mut self, fx: &mut Effects, vm: &VmName, host: &HostName, instance: Option<RequestId>) {
        let record = self.vms.get_mut(vm).expect("caller checked");
        let previous = record.host.replace(host.clone());
        self.vms_by_host.rebind(vm, previous.as_ref(), Some(host));
        record.last_host = Some(host.clone());
        record.release = None;
        record.work = None;
        record.instance = instance;
        self.set_vm_state(fx, vm, VmState::Running, format!("found running on {host}"));
    }

    /// The VM's own host, alive, says the VM is not running: it may start again.
    fn vm_not_running(&mut self, fx: &mut Effects, vm: &VmName, host: &HostName, boot_id: &BootId, why: &str) {
        let cluster_ha = self.cluster_ha;
        let record = self.vms.get_mut(vm).expect("caller checked");
        record.work = None;
        let previous = record.host.take();
        self.vms_by_host.rebind(vm, previous.as_ref(), None);
        record.stop = None;
        if !record.spec.ha || !cluster_ha {
            self.set_vm_state(fx, vm, VmState::Stopped, format!("{why} on {host}; not restarted (HA off)"));
            return;
        }
        record.release =
            Some(Release::ReportedNotRunning { host: host.clone(), boot_id: boot_id.clone(), state: why.to_owned() });
        self.set_vm_state(fx, vm, VmState::PendingCapacity, format!("{why} on {host}; to be restarted"));
    }

    fn on_goodbye(&mut self, fx: &mut Effects, host: &HostName, boot_id: &BootId) {
        let Some(record) = self.hosts.get_mut(host) else {
            fx.audit(Some(host), None, AuditKind::Dropped, "goodbye from a host that is not in the cluster");
            return;
        };
        record.goodbye_since_last_ping = true;
        let state = record.state;
        match state {
            HostState::Up | HostState::Connecting => self.set_host_state(
                fx,
                host,
                HostState::Disconnected,
                format!(
                    "agent stopped cleanly (boot {boot_id}); host stays watched and becomes suspect if it stays silent"
                ),
            ),
            _ => fx.audit(Some(host), None, AuditKind::Manager, format!("agent stopped cleanly while {state}")),
        }
    }

    // ----- time ---------------------------------------------------------------------------

    fn on_tick(&mut self, fx: &mut Effects) {
        self.update_isolation(fx);
        let names: Vec<HostName> = self.hosts.keys().cloned().collect();
        for name in &names {
            self.tick_host(fx, name);
        }
        self.tick_vms(fx);
        self.update_storage_hold(fx);
        // Now, not at the end of a batch: an evacuation waits for its VM's placement.
        self.place_pending_now(fx);
        self.advance_evacuations(fx);
    }

    fn is_silent(&self, record: &HostRecord, now: Instant) -> bool {
        now.saturating_since(record.silent_since) > self.config.timing.ping_timeout()
    }

    fn tick_host(&mut self, fx: &mut Effects, name: &HostName) {
        let now = fx.now;
        let record = &self.hosts[name];
        match record.state {
            HostState::Connecting | HostState::Up | HostState::Disconnected => {
                if now >= self.grace_until && self.is_silent(record, now) {
                    let silence = now.saturating_since(record.silent_since);
                    let detail = if record.state == HostState::Disconnected {
                        format!("agent stopped cleanly and has been silent for {}", format_duration(silence))
                    } else {
                        format!(
                            "no ping for {} (timeout {})",
                            format_duration(silence),
                            format_duration(self.config.timing.ping_timeout())
                        )
                    };
                    self.set_host_state(fx, name, HostState::Suspect, detail);
                    self.start_round(fx, name);
                }
            }
            HostState::Suspect => self.start_round(fx, name),
            HostState::Investigating => match &record.investigation {
                Some(investigation) if now >= investigation.deadline => self.conclude(fx, name),
                Some(_) => {}
                None => {
                    if record.next_recheck.is_none_or(|at| now >= at) {
                        self.start_round(fx, name);
                    }
                }
            },
            HostState::Degraded => {
                if record.next_recheck.is_some_and(|at| now >= at) {
                    self.set_host_state(fx, name, HostState::Suspect, "periodic re-investigation of a degraded host");
                    self.start_round(fx, name);
                }
            }
            HostState::Fencing => self.tick_fencing(fx, name),
            HostState::FenceFailed => {
                if let Some(fencing) = self.hosts.get_mut(name).and_then(|record| record.fencing.as_mut()) {
                    if fencing.in_flight.is_some_and(|(_, deadline)| now >= deadline) {
                        fencing.in_flight = None;
                    }
                }
                // The lease path may still prove the host dead (storage came back).
                if self.fence_if_proven(fx, name) {
                    return;
                }
                let record = &self.hosts[name];
                let round_over = record.investigation.as_ref().is_some_and(|round| now >= round.deadline);
                if round_over {
                    self.conclude_recheck(fx, name);
                } else if record.investigation.is_none() && record.next_recheck.is_some_and(|at| now >= at) {
                    let recheck = now + self.config.timing.degraded_recheck();
                    self.hosts.get_mut(name).expect("listed").next_recheck = Some(recheck);
                    // Look before fencing again: the host may have come back to life.
                    self.start_round_for(fx, name, RoundPurpose::Recheck);
                }
            }
            HostState::Fenced | HostState::Maintenance => {}
        }
    }

    fn update_isolation(&mut self, fx: &mut Effects) {
        let now = fx.now;
        let monitored: Vec<&HostRecord> = self
            .hosts
            .values()
            .filter(|record| {
                !matches!(
                    record.state,
                    HostState::Maintenance | HostState::Fenced | HostState::FenceFailed | HostState::Connecting
                )
            })
            .collect();
        // A host under investigation counts as quiet even right after a manager restart
        // (whose grace period resets every silence clock): only a ping makes it heard.
        let quiet = monitored
            .iter()
            .filter(|record| {
                self.is_silent(record, now)
                    || matches!(
                        record.state,
                        HostState::Suspect | HostState::Investigating | HostState::Degraded | HostState::Fencing
                    )
            })
            .count();
        let isolated = monitored.len() >= 2 && quiet * 2 > monitored.len();
        if isolated && !self.manager_isolated {
            self.manager_isolated = true;
            fx.alert(
                Severity::Critical,
                None,
                format!(
                    "{quiet} of {} hosts went quiet at once: this manager is probably the one cut off; fencing nobody on unknown verdicts",
                    monitored.len()
                ),
            );
        } else if !isolated && self.manager_isolated {
            self.manager_isolated = false;
            fx.audit(
                None,
                None,
                AuditKind::Manager,
                format!("{quiet} of {} hosts quiet: normal operation resumes", monitored.len()),
            );
        }
    }

    fn update_storage_hold(&mut self, fx: &mut Effects) {
        let now = fx.now;
        let reporting: Vec<&HostRecord> = self
            .hosts
            .values()
            .filter(|record| {
                record.state == HostState::Up && !record.spec.pools.is_empty() && !self.is_silent(record, now)
            })
            .collect();
        let reporting_count = reporting.len();
        let all_failing =
            reporting_count >= 2 && reporting.iter().all(|record| record.storage == StorageHealth::AllFailing);
        let any_healthy = reporting.iter().any(|record| record.storage != StorageHealth::AllFailing);
        if all_failing && !self.storage_hold {
            self.storage_hold = true;
            let validity = self.config.timing.storage_hold_validity();
            for record in self.hosts.values_mut() {
                if record.state == HostState::Up {
                    record.storage_hold_granted_until = Some(now + validity);
                }
            }
            fx.alert(
                Severity::Critical,
                None,
                format!("all {} reporting hosts lost the shared storage: agents hold their VMs instead of self-fencing; no failover is possible until it returns", reporting_count),
            );
            fx.commands.push(Command::Directives(self.directives()));
        } else if self.storage_hold && any_healthy {
            self.storage_hold = false;
            fx.audit(
                None,
                None,
                AuditKind::Manager,
                "shared storage is back: storage hold lifted, self-fencing rules apply again",
            );
            fx.commands.push(Command::Directives(self.directives()));
        }
    }

    // ----- investigation ------------------------------------------------------------------

    fn start_round(&mut self, fx: &mut Effects, name: &HostName) {
        self.start_round_for(fx, name, RoundPurpose::Verdict);
    }

    fn start_round_for(&mut self, fx: &mut Effects, name: &HostName, purpose: RoundPurpose) {
        let id = self.next_id();
        let record = &self.hosts[name];
        let round = record.unknown_rounds + 1;
        let mut kinds = Vec::new();
        // Counted, then walked again for the few asked: a rack failing at once must not
        // copy every host's name once per failed host.
        let up_neighbours = self
            .hosts
            .values()
            .filter(|other| other.spec.name != *name && other.state == HostState::Up)
            .map(|other| &other.spec.name);
        let up_count = up_neighbours.clone().count();
        let neighbours: Vec<HostName> = if up_count == 0 {
            Vec::new()
        } else {
            let start = (round as usize) % up_count;
            up_neighbours.cycle().skip(start).take(self.config.neighbour_checks.min(up_count)).cloned().collect()
        };
        if !neighbours.is_empty() {
            kinds.push(InvestigatorKind::NeighbourPing);
        }
        if !record.spec.pools.is_empty() {
            kinds.push(InvestigatorKind::StorageHeartbeat);
            if self.vms_bound_to(name).next().is_some() {
                kinds.push(InvestigatorKind::VmActivity);
            }
        }
        if record.spec.has_bmc {
            kinds.push(InvestigatorKind::BmcPower);
        }
        let deadline = fx.now + self.config.timing.investigation_round();
        if self.hosts[name].state == HostState::Suspect {
            self.set_host_state(fx, name, HostState::Investigating, format!("round {round}"));
        }
        let record = self.hosts.get_mut(name).expect("listed");
        record.investigation =
            Some(Investigation { id, round, deadline, expected: kinds.clone(), reports: Vec::new(), purpose });
        if purpose == RoundPurpose::Verdict {
            record.next_recheck = None;
        }
        fx.audit(
            Some(name),
            None,
            AuditKind::InvestigationStarted,
            format!(
                "round {round} {id}: {} via [{}]",
                kinds.iter().map(|kind| kind.name()).collect::<Vec<_>>().join(", "),
                neighbours.iter().map(HostName::as_str).collect::<Vec<_>>().join(",")
            ),
        );
        let evidence_after = self.evidence_after(name);
        fx.commands.push(Command::Investigate {
            host: name.clone(),
            investigation: id,
            round,
            kinds,
            neighbours,
            evidence_after,
            deadline,
        });
    }

    fn start_lease_check(&mut self, fx: &mut Effects, name: &HostName) {
        let id = self.next_id();
        let deadline = fx.now + self.config.timing.investigation_round();
        let kinds = vec![InvestigatorKind::StorageHeartbeat];
        let evidence_after = self.evidence_after(name);
        let record = self.hosts.get_mut(name).expect("listed");
        record.investigation = Some(Investigation {
            id,
            round: 0,
            deadline,
            expected: kinds.clone(),
            reports: Vec::new(),
            purpose: RoundPurpose::LeaseCheck,
        });
        fx.commands.push(Command::Investigate {
            host: name.clone(),
            investigation: id,
            round: 0,
            kinds,
            neighbours: Vec::new(),
            evidence_after,
            deadline,
        });
    }

    /// A sign of life must be newer than the host's silence by more than one ping
    /// interval: a dead host's last heartbeat may land just after its last ping.
    fn evidence_after(&self, name: &HostName) -> Instant {
        self.hosts[name].silent_since + self.config.timing.ping_interval()
    }

    fn on_report(&mut self, fx: &mut Effects, report: InvestigatorReport) {
        let Some(record) = self.hosts.get_mut(&report.host) else {
            return;
        };
        let Some(investigation) = record.investigation.as_mut().filter(|current| current.id == report.investigation)
        else {
            // An answer to a round that is over: its time has passed, and a decision was made without it.
            return;
        };
        if let Some(observation) = &report.heartbeat {
            record.heartbeat = Some(HeartbeatSeen { received_at: fx.now, observation: observation.clone() });
        }
        let rebooted_to = report.heartbeat.as_ref().and_then(|observation| {
            observation
                .pools
                .iter()
                .filter(|pool| pool.record == crate::event::RecordState::Advancing)
                .filter_map(|pool| pool.boot_id.clone())
                .find(|boot| record.boot_id.as_ref().is_some_and(|last| last != boot))
        });
        let purpose = investigation.purpose;
        let alive = report.finding == Finding::Alive;
        investigation.reports.push(report.clone());
        let settled = verdict::is_settled(&investigation.reports, &investigation.expected);
        if let Some(new_boot) = rebooted_to {
            self.rebooted_unheard(fx, &report.host, new_boot);
        }
        let record = self.hosts.get_mut(&report.host).expect("checked");
        let host = report.host.clone();
        match record.state {
            HostState::Investigating if settled && purpose == RoundPurpose::Verdict => self.conclude(fx, &host),
            HostState::FenceFailed if settled && purpose == RoundPurpose::Recheck => self.conclude_recheck(fx, &host),
            HostState::Fencing | HostState::FenceFailed if purpose == RoundPurpose::Recheck => {
                // A fresh heartbeat look may complete the lease proof before the round ends.
                self.fence_if_proven(fx, &host);
            }
            HostState::Fencing | HostState::FenceFailed if purpose == RoundPurpose::LeaseCheck => {
                record.investigation = None;
                let fencing_idle = record.fencing.as_ref().is_none_or(|fencing| fencing.in_flight.is_none());
                if alive && fencing_idle {
                    let evidence = report.evidence.clone();
                    self.set_host_state(fx, &host, HostState::Degraded, format!("heartbeat advancing while fencing: host alive ({evidence}); fence abandoned, touching nothing"));
                    self.enter_degraded(fx, &host);
                    return;
                }
                self.fence_if_proven(fx, &host);
            }
            _ => {}
        }
    }

    /// The seed's hard case: a host we cannot hear (management cut, agent dead) was reset
    /// by its watchdog and writes its heartbeat again from a new boot. A reboot takes every
    /// VM with it, so the VMs of the boot it last pinged from are not running: they may
    /// start elsewhere (their leases still guard the start), though the host is alive.
    fn rebooted_unheard(&mut self, fx: &mut Effects, host: &HostName, new_boot: BootId) {
        let record = self.hosts.get_mut(host).expect("caller checked");
        // A late ping from the old boot is dropped like any ping from an earlier boot; pings,
        // when they come back, count from the new boot.
        let old_boot = record.set_boot(new_boot.clone());
        record.last_ping_seq = None;
        fx.audit(
            Some(host),
            None,
            AuditKind::Verdict,
            format!(
                "heartbeat advancing from boot {new_boot}, not boot {} it last pinged from: the host rebooted, \
                 the VMs of the old boot are gone",
                old_boot.map_or("?".to_owned(), |boot| boot.to_string())
            ),
        );
        let taken = self.vms_on(host, &ACTIVE_VM_STATES);
        for vm in taken {
            self.vm_not_running(fx, &vm, host, &new_boot, "host rebooted (seen in its heartbeat)");
        }
        self.place_pending(fx);
    }

    fn fencing_allowed(&self, name: &HostName) -> Result<(), String> {
        if !self.cluster_ha {
            return Err("cluster HA is switched off".to_owned());
        }
        if self.disarmed {
            return Err("cluster is disarmed".to_owned());
        }
        if !self.hosts[name].ha_enabled {
            return Err("HA is switched off for this host".to_owned());
        }
        Ok(())
    }

    fn conclude(&mut self, fx: &mut Effects, name: &HostName) {
        let record = self.hosts.get_mut(name).expect("listed");
        let Some(investigation) = record.investigation.take() else {
            return;
        };
        let (verdict, evidence) = verdict::combine(&investigation.reports, &investigation.expected);
        fx.audit(
            Some(name),
            None,
            AuditKind::Verdict,
            format!("round {} {}: {verdict:?}: {evidence}", investigation.round, investigation.id),
        );
        #[cfg(test)]
        if self.planted_bug == Some(PlantedBug::RecoverWithoutProof) && verdict == Verdict::Unknown {
            let proof = DeathProof::forged_for_test(name, fx.now);
            self.set_host_state(fx, name, HostState::Fencing, "planted bug: unknown taken for dead");
            self.mark_fenced(fx, name, proof);
            return;
        }
        match verdict {
            Verdict::Alive => {
                self.set_host_state(fx, name, HostState::Degraded, format!("alive: {evidence}"));
                self.enter_degraded(fx, name);
            }
            Verdict::Dead => match self.fencing_allowed(name) {
                Ok(()) => self.begin_fencing(fx, name, format!("dead: {evidence}")),
                Err(why) => self.wait_without_fencing(fx, name, &why),
            },
            Verdict::Unknown => {
                let limit = self.config.timing.unknown_rounds_before_fence();
                let record = self.hosts.get_mut(name).expect("listed");
                record.unknown_rounds += 1;
                if record.unknown_rounds < limit {
                    self.start_round(fx, name);
                    return;
                }
                if self.manager_isolated {
                    self.wait_without_fencing(
                        fx,
                        name,
                        "the manager itself looks cut off (more than half of the hosts are quiet)",
                    );
                    return;
                }
                if !Self::heartbeat_seen_stale(&investigation) {
                    // "Unknown" because we could not look is not "unknown" because the host
                    // stopped writing: the manager may be the one cut off from the storage.
                    self.wait_without_fencing(
                        fx,
                        name,
                        "its heartbeat could not be read on any pool, so its silence is not established",
                    );
                    return;
                }
                match self.fencing_allowed(name) {
                    Ok(()) => self.begin_fencing(fx, name, format!("unknown after {limit} rounds: {evidence}")),
                    Err(why) => self.wait_without_fencing(fx, name, &why),
                }
            }
        }
    }

    /// Whether the round read the host's heartbeat record and found it stale on some pool.
    /// A host without pools has no heartbeat to read: its silence rests on the other
    /// investigators alone.
    fn heartbeat_seen_stale(investigation: &Investigation) -> bool {
        if !investigation.expected.contains(&InvestigatorKind::StorageHeartbeat) {
            return true;
        }
        investigation.reports.iter().filter_map(|report| report.heartbeat.as_ref()).any(|observation| {
            observation.pools.iter().any(|pool| matches!(pool.record, crate::event::RecordState::Unchanged { .. }))
        })
    }

    /// The periodic look at a host whose fencing failed is in: alive means degraded, not
    /// dead; anything else is worth another fence attempt, since its BMC may be back.
    fn conclude_recheck(&mut self, fx: &mut Effects, name: &HostName) {
        let record = self.hosts.get_mut(name).expect("listed");
        let Some(investigation) = record.investigation.take() else { return };
        let (verdict, evidence) = verdict::combine(&investigation.reports, &investigation.expected);
        fx.audit(
            Some(name),
            None,
            AuditKind::Verdict,
            format!("recheck {}: {verdict:?}: {evidence}", investigation.id),
        );
        if verdict == Verdict::Alive {
            self.set_host_state(fx, name, HostState::Degraded, format!("alive after fencing failed: {evidence}"));
            self.enter_degraded(fx, name);
            return;
        }
        if self.fence_if_proven(fx, name) {
            return;
        }
        // A manager that looks cut off fences nobody on unknown verdicts, retries included:
        // the silence may be its own.
        if self.hosts[name].spec.has_bmc && self.fencing_allowed(name).is_ok() && !self.manager_isolated {
            self.send_fence(fx, name, "retry after fencing failed: the BMC may be reachable again");
        }
    }

    fn enter_degraded(&mut self, fx: &mut Effects, name: &HostName) {
        let recheck = fx.now + self.config.timing.degraded_recheck();
        let record = self.hosts.get_mut(name).expect("listed");
        record.next_recheck = Some(recheck);
        record.unknown_rounds = 0;
        record.fencing = None;
        let first = !record.alerted;
        record.alerted = true;
        self.resume_held_vms(fx, name, "its host is alive");
        if first {
            fx.alert(
                Severity::Warning,
                Some(name),
                "host is alive but its agent cannot be heard: touching nothing, looking again periodically",
            );
        }
    }

    fn wait_without_fencing(&mut self, fx: &mut Effects, name: &HostName, why: &str) {
        let recheck = fx.now + self.config.timing.degraded_recheck();
        let record = self.hosts.get_mut(name).expect("listed");
        record.next_recheck = Some(recheck);
        let first = !record.alerted;
        record.alerted = true;
        if first {
            fx.alert(
                Severity::Critical,
                Some(name),
                format!("host may be dead but will not be fenced: {why}; its VMs stay where they are"),
            );
        }
    }

    // ----- fencing ------------------------------------------------------------------------

    fn begin_fencing(&mut self, fx: &mut Effects, name: &HostName, reason: String) {
        let now = fx.now;
        self.set_host_state(fx, name, HostState::Fencing, reason);
        let record = self.hosts.get_mut(name).expect("listed");
        record.noted_ping_while_fencing = false;
        let has_bmc = record.spec.has_bmc;
        let has_watchdog = record.spec.has_watchdog;
        record.fencing = Some(Fencing {
            started: now,
            attempts: 0,
            in_flight: None,
            next_attempt_at: has_bmc.then_some(now),
            bmc_exhausted: !has_bmc,
            fence_ids: Vec::new(),
            confirmation: None,
            next_lease_check: now,
        });
        let held = self.vms_on(name, &[VmState::Running, VmState::Starting]);
        for vm in held {
            self.set_vm_state(fx, &vm, VmState::AwaitingProof, format!("host {name} is being fenced"));
        }
        if !has_bmc && !has_watchdog {
            self.fence_failed(fx, name, "no BMC and no watchdog: nothing can prove this host dead".to_owned());
            return;
        }
        self.tick_fencing(fx, name);
    }

    fn tick_fencing(&mut self, fx: &mut Effects, name: &HostName) {
        let now = fx.now;
        if self.hosts[name].state != HostState::Fencing {
            return;
        }
        if self.fence_if_proven(fx, name) {
            return;
        }
        let timing = self.config.timing.clone();
        let disarmed = self.disarmed;
        let record = self.hosts.get_mut(name).expect("listed");
        let has_watchdog = record.spec.has_watchdog;
        let Some(fencing) = record.fencing.as_mut() else {
            return;
        };

        if let Some((id, deadline)) = fencing.in_flight {
            if now >= deadline {
                self.fence_attempt_failed(fx, name, id, "no answer before the deadline".to_owned());
                return self.tick_fencing(fx, name);
            }
        }
        let record = self.hosts.get_mut(name).expect("listed");
        let fencing = record.fencing.as_mut().expect("checked");
        if fencing.in_flight.is_none()
            && !fencing.bmc_exhausted
            && !disarmed
            && fencing.next_attempt_at.is_some_and(|at| now >= at)
        {
            fencing.next_attempt_at = None;
            self.send_fence(fx, name, "power off through the BMC, then read back");
        }
        let record = self.hosts.get_mut(name).expect("listed");
        if record.investigation.as_ref().is_some_and(|round| now >= round.deadline) {
            // The storage look got no answer in time (a hung pool): look again.
            record.investigation = None;
        }
        let fencing = record.fencing.as_mut().expect("checked");
        if has_watchdog && now >= fencing.next_lease_check && record.investigation.is_none() {
            fencing.next_lease_check = now + timing.investigation_round();
            self.start_lease_check(fx, name);
        }
        let record = &self.hosts[name];
        let fencing = record.fencing.as_ref().expect("checked");
        // A host told to hold its VMs through a storage outage gets the whole bound again
        // from the moment its hold lapses.
        let bound_from = record.storage_hold_granted_until.map_or(fencing.started, |hold| hold.max(fencing.started));
        if fencing.bmc_exhausted && fencing.in_flight.is_none() && now >= bound_from + timing.fencing_bound() {
            let reasons = self.no_proof_reasons(name, now);
            self.fence_failed(
                fx,
                name,
                format!("no proof within {}: {reasons}", format_duration(timing.fencing_bound())),
            );
        }
    }

    fn send_fence(&mut self, fx: &mut Effects, name: &HostName, why: &str) {
        let id = self.next_id();
        let deadline = fx.now + self.config.timing.fence_attempt_timeout();
        let attempts_max = self.config.timing.fence_attempts_max();
        let record = self.hosts.get_mut(name).expect("listed");
        let Some(fencing) = record.fencing.as_mut() else {
            return;
        };
        if fencing.in_flight.is_some() {
            return;
        }
        fencing.attempts += 1;
        let attempt = fencing.attempts;
        fencing.in_flight = Some((id, deadline));
        fencing.fence_ids.push(id);
        fx.audit(Some(name), None, AuditKind::FenceIntent, format!("attempt {attempt}/{attempts_max} {id}: {why}"));
        fx.commands.push(Command::Fence { host: name.clone(), fence: id, attempt, deadline });
    }

    fn fence_attempt_failed(&mut self, fx: &mut Effects, name: &HostName, id: RequestId, error: String) {
        let timing = self.config.timing.clone();
        let record = self.hosts.get_mut(name).expect("listed");
        let has_watchdog = record.spec.has_watchdog;
        let Some(fencing) = record.fencing.as_mut() else {
            return;
        };
        if fencing.in_flight.is_some_and(|(current, _)| current == id) {
            fencing.in_flight = None;
        }
        fx.audit(
            Some(name),
            None,
            AuditKind::FenceOutcome,
            format!("attempt {} {id} failed: {error}", fencing.attempts),
        );
        if fencing.attempts < timing.fence_attempts_max() {
            fencing.next_attempt_at = Some(fx.now + timing.fence_backoff(fencing.attempts + 1));
            return;
        }
        fencing.bmc_exhausted = true;
        let attempts = fencing.attempts;
        if has_watchdog {
            record.alerted = true;
            fx.alert(
                Severity::Warning,
                Some(name),
                format!("BMC fencing failed {attempts} times ({error}); waiting for the host's leases to expire (watchdog path)"),
            );
        } else {
            self.fence_failed(
                fx,
                name,
                format!("BMC fencing failed {attempts} times ({error}) and the host has no watchdog"),
            );
        }
    }

    fn on_fence_result(&mut self, fx: &mut Effects, result: FenceResult) {
        let Some(record) = self.hosts.get_mut(&result.host) else {
            return;
        };
        let in_episode = record.fencing.as_ref().is_some_and(|fencing| fencing.fence_ids.contains(&result.fence));
        if !in_episode || !matches!(record.state, HostState::Fencing | HostState::FenceFailed) {
            fx.audit(
                Some(&result.host),
                None,
                AuditKind::Dropped,
                format!("fence result {} for no current fencing: {:?}", result.fence, result.outcome),
            );
            return;
        }
        let host = result.host.clone();
        match result.outcome {
            FenceOutcome::PoweredOff { evidence } | FenceOutcome::AlreadyOff { evidence } => {
                fx.audit(
                    Some(&host),
                    None,
                    AuditKind::FenceOutcome,
                    format!("{}: power off confirmed: {evidence}", result.fence),
                );
                let fencing = record.fencing.as_mut().expect("checked");
                if fencing.in_flight.is_some_and(|(id, _)| id == result.fence) {
                    fencing.in_flight = None;
                }
                fencing.confirmation = Some(FenceConfirmation { fence: result.fence, at: fx.now, evidence });
                self.fence_if_proven(fx, &host);
            }
            FenceOutcome::Failed { error } => {
                if record.state == HostState::FenceFailed {
                    if let Some(fencing) = record.fencing.as_mut() {
                        fencing.in_flight = None;
                    }
                    fx.audit(
                        Some(&host),
                        None,
                        AuditKind::FenceOutcome,
                        format!("retry {} failed: {error}", result.fence),
                    );
                } else {
                    self.fence_attempt_failed(fx, &host, result.fence, error);
                    if self.hosts[&host].state == HostState::Fencing {
                        self.tick_fencing(fx, &host);
                    }
                }
            }
        }
    }

    fn safety_inputs<'a>(&'a self, record: &'a HostRecord) -> SafetyInputs<'a> {
        SafetyInputs {
            host: &record.spec,
            last_boot: record.boot_id.as_ref(),
            fence_confirmation: record.fencing.as_ref().and_then(|fencing| fencing.confirmation.as_ref()),
            heartbeat: record.heartbeat.as_ref(),
            operator: record.operator_confirmation.as_ref(),
            goodbye_since_last_ping: record.goodbye_since_last_ping,
            storage_hold_granted_until: record.storage_hold_granted_until,
        }
    }

    /// Asks the safety rule about `name` now; with a proof, the host is `Fenced` and its VMs
    /// are released. Every path to `Fenced` but the planted test bug goes through here.
    fn fence_if_proven(&mut self, fx: &mut Effects, name: &HostName) -> bool {
        let record = &self.hosts[name];
        match safety::prove_dead(&self.safety_inputs(record), fx.now, &self.config.timing) {
            Ok(proof) => {
                self.mark_fenced(fx, name, proof);
                true
            }
            Err(_) => false,
        }
    }

    fn no_proof_reasons(&self, name: &HostName, now: Instant) -> String {
        let record = &self.hosts[name];
        match safety::prove_dead(&self.safety_inputs(record), now, &self.config.timing) {
            Ok(_) => "a proof exists".to_owned(),
            Err(no_proof) => no_proof.to_string(),
        }
    }

    fn fence_failed(&mut self, fx: &mut Effects, name: &HostName, why: String) {
        let recheck = fx.now + self.config.timing.degraded_recheck();
        self.set_host_state(fx, name, HostState::FenceFailed, why.clone());
        let record = self.hosts.get_mut(name).expect("listed");
        record.next_recheck = Some(recheck);
        record.investigation = None;
        record.alerted = true;
        fx.alert(
            Severity::Critical,
            Some(name),
            format!("cannot prove the host dead ({why}); its VMs stay down. If you have checked it is off: kvmha host confirm-down {name}"),
        );
    }

    fn mark_fenced(&mut self, fx: &mut Effects, name: &HostName, proof: DeathProof) {
        let detail = proof.describe();
        self.set_host_state(fx, name, HostState::Fenced, detail);
        let record = self.hosts.get_mut(name).expect("listed");
        record.investigation = None;
        record.proof = Some(proof.clone());
        let cluster_ha = self.cluster_ha;
        let owned: Vec<VmName> = self.vms_bound_to(name).map(|(vm, _)| vm.clone()).collect();
        for vm in owned {
            let record = self.vms.get_mut(&vm).expect("listed");
            let previous = record.host.take();
            self.vms_by_host.rebind(&vm, previous.as_ref(), None);
            record.work = None;
            if record.spec.ha && cluster_ha && record.state != VmState::Stopped {
                record.release = Some(Release::HostDead(proof.clone()));
                self.set_vm_state(fx, &vm, VmState::PendingCapacity, format!("released: {name} proven dead"));
            } else if record.state != VmState::Stopped {
                self.set_vm_state(fx, &vm, VmState::Stopped, format!("{name} proven dead; not HA, not restarted"));
            }
        }
        self.place_pending(fx);
    }

    // ----- VM starts ----------------------------------------------------------------------

    fn tick_vms(&mut self, fx: &mut Effects) {
        // One pass over every VM for both (a resend touches no stop).
        let mut overdue = Vec::new();
        let mut overdue_stops = Vec::new();
        for (name, vm) in &self.vms {
            if vm.state == VmState::Starting && vm.work.as_ref().is_some_and(|work| fx.now >= work.deadline) {
                overdue.push(name.clone());
            }
            if vm.stop.as_ref().is_some_and(|stop| fx.now >= stop.deadline) {
                overdue_stops.push(name.clone());
            }
        }
        for vm in overdue {
            self.resend_start(fx, &vm, "no outcome before the deadline");
        }
        for vm in overdue_stops {
            self.stop_overdue(fx, &vm);
        }
    }

    /// Sends the same work item again to the same host. The VM stays bound to that host
    /// (the start may have happened), so it can never be started anywhere else meanwhile.
    fn resend_start(&mut self, fx: &mut Effects, vm: &VmName, why: &str) {
        let deadline = fx.now + self.config.timing.vm_start_timeout();
        let record = self.vms.get_mut(vm).expect("caller checked");
        let (Some(work), Some(release)) = (record.work.as_mut(), record.release.clone()) else {
            return;
        };
        let target_up = self.hosts.get(&work.target).is_some_and(|host| host.state == HostState::Up);
        if !target_up {
            // The target's own failure handling decides; extend so we do not spin.
            work.deadline = deadline;
            return;
        }
        work.deadline = deadline;
        let (id, target) = (work.id, work.target.clone());
        fx.audit(Some(&target), Some(vm), AuditKind::VmStartIntent, format!("work {id} sent again: {why}"));
        fx.commands.push(Command::StartVm { work: id, vm: vm.clone(), target, release, deadline });
    }

    fn on_vm_start_result(&mut self, fx: &mut Effects, result: VmStartResult) {
        let Some(record) = self.vms.get_mut(&result.vm) else {
            return;
        };
        let current = record.work.as_ref().is_some_and(|work| work.id == result.work && work.target == result.host);
        if !current || record.state != VmState::Starting {
            fx.audit(
                Some(&result.host),
                Some(&result.vm),
                AuditKind::Dropped,
                format!("start result {} for no current work: {:?}", result.work, result.outcome),
            );
            return;
        }
        let vm = result.vm.clone();
        let host = result.host.clone();
        match result.outcome {
            VmStartOutcome::Started | VmStartOutcome::AlreadyRunning => {
                record.work = None;
                record.instance = Some(result.work);
                fx.audit(Some(&host), Some(&vm), AuditKind::VmStartOutcome, format!("work {} started", result.work));
                self.set_vm_state(fx, &vm, VmState::Running, format!("started on {host}"));
            }
            VmStartOutcome::LeaseHeld { owner } => {
                // Not a failed start: the lease says "not yet" (it has not expired on the
                // target's clock, or its owner has not released it). It does not spend the
                // restart budget; the start is retried after two renewal intervals.
                if let Some(work) = record.work.take() {
                    if !work.budget_exempt {
                        record.starts.pop();
                    }
                    if work.counted_relocation {
                        record.relocations.pop();
                    }
                    record.last_host = work.previous_last_host;
                }
                let previous = record.host.take();
                self.vms_by_host.rebind(&vm, previous.as_ref(), None);
                record.not_before = Some(fx.now + self.config.timing.lease_renew_interval() * 2);
                fx.audit(
                    Some(&host),
                    Some(&vm),
                    AuditKind::VmStartOutcome,
                    format!(
                        "work {} refused: lease held by {owner}; retry after it expires or is released",
                        result.work
                    ),
                );
                self.set_vm_state(fx, &vm, VmState::PendingCapacity, "lease still held; retry later");
            }
            VmStartOutcome::Failed { reason } => {
                record.work = None;
                let previous = record.host.take();
                self.vms_by_host.rebind(&vm, previous.as_ref(), None);
                fx.audit(
                    Some(&host),
                    Some(&vm),
                    AuditKind::VmStartOutcome,
                    format!("work {} failed: {reason}", result.work),
                );
                self.set_vm_state(fx, &vm, VmState::PendingCapacity, format!("start failed on {host}"));
            }
        }
        self.place_pending(fx);
    }

    /// Hosts a VM must not be started on now, from its restart budget; `None` if the budget
    /// is spent everywhere (the VM goes to `Error`).
    fn budget_avoid(&self, record: &VmRecord, now: Instant) -> Option<BTreeSet<HostName>> {
        let budget = record.spec.budget;
        let window_start = now - budget.window;
        let mut avoid = BTreeSet::new();
        let mut per_host: BTreeMap<&HostName, u32> = BTreeMap::new();
        for (at, host) in &record.starts {
            if *at >= window_start {
                *per_host.entry(host).or_default() += 1;
            }
        }
        for (host, count) in per_host {
            if count >= budget.max_restarts {
                avoid.insert(host.clone());
            }
        }
        let relocations = record.relocations.iter().filter(|at| **at >= window_start).count() as u32;
        if relocations >= budget.max_relocations {
            // Only a restart where it last was is left.
            let Some(last) = &record.last_host else {
                return None;
            };
            if avoid.contains(last) {
                return None;
            }
            for host in self.hosts.keys() {
                if host != last {
                    avoid.insert(host.clone());
                }
            }
        }
        let any_left = self.hosts.keys().any(|host| !avoid.contains(host) && record.spec.allows_host(host));
        any_left.then_some(avoid)
    }

    /// Whether the VM's restart budget lets it start on `host` now.
    pub fn restart_budget_allows(&self, vm: &VmName, host: &HostName, now: Instant) -> bool {
        let Some(record) = self.vms.get(vm) else {
            return false;
        };
        if record.not_before.is_some_and(|at| now < at) {
            return false;
        }
        self.budget_avoid(record, now).is_some_and(|avoid| !avoid.contains(host))
    }

    /// Places the VMs waiting for a host, or, inside [`Engine::step_batch`], notes that
    /// the batch must do so when it ends.
    fn place_pending(&mut self, fx: &mut Effects) {
        if self.placement_deferred {
            self.placement_due = true;
            return;
        }
        self.place_pending_now(fx);
    }

    fn place_pending_now(&mut self, fx: &mut Effects) {
        let now = fx.now;
        let mut requests_owned: Vec<(VmName, BTreeSet<HostName>)> = Vec::new();
        let mut spent: Vec<VmName> = Vec::new();
        if self.pending.is_empty() {
            return;
        }
        for name in &self.pending {
            let record = &self.vms[name];
            if record.host.is_some() || record.not_before.is_some_and(|at| now < at) {
                continue;
            }
            // With HA switched off nothing is restarted, but a VM kvmha itself stopped to
            // move it for maintenance is still started again: the operator asked for a move.
            if !self.cluster_ha && !Self::evacuated(record) {
                continue;
            }
            if Self::evacuated(record) {
                // A move the operator asked for is not a failure: no budget applies.
                requests_owned.push((name.clone(), BTreeSet::new()));
                continue;
            }
            match self.budget_avoid(record, now) {
                Some(avoid) => requests_owned.push((name.clone(), avoid)),
                None => spent.push(name.clone()),
            }
        }
        for vm in spent {
            let budget = self.vms[&vm].spec.budget;
            self.set_vm_state(
                fx,
                &vm,
                VmState::Error,
                format!(
                    "restart budget spent ({} restarts per host, {} relocations per {})",
                    budget.max_restarts,
                    budget.max_relocations,
                    format_duration(budget.window)
                ),
            );
            let last = self.vms[&vm].last_host.clone();
            fx.alert(Severity::Critical, last.as_ref(), format!("vm {vm} gave up: restart budget spent"));
        }
        if requests_owned.is_empty() {
            return;
        }
        let candidates = self.candidates(fx.now);
        let requests: Vec<PlacementRequest<'_>> = requests_owned
            .iter()
            .map(|(name, avoid)| {
                let record = &self.vms[name];
                let prefer = match &record.release {
                    // Back where it was after a crash; elsewhere when its host is going away.
                    Some(Release::ReportedNotRunning { host, state, .. })
                        if ![SELF_FENCED, EVACUATED, SHUTDOWN_FAILOVER].contains(&state.as_str()) =>
                    {
                        Some(host)
                    }
                    _ => None,
                };
                PlacementRequest { spec: &record.spec, avoid, prefer }
            })
            .collect();
        let plan = planner::plan(&requests, candidates);
        for (vm, target) in plan.placements {
            self.issue_start(fx, &vm, &target);
        }
    }

    fn candidates(&self, now: Instant) -> Vec<Candidate> {
        let mut candidates: BTreeMap<&HostName, Candidate> = self
            .hosts
            .values()
            .filter(|host| {
                host.state == HostState::Up
                    && host.ha_enabled
                    && host.storage != StorageHealth::AllFailing
                    && host.evacuation.is_none()
                    && host.leaving_until.is_none_or(|until| now >= until)
            })
            .map(|host| {
                (
                    &host.spec.name,
                    Candidate {
                        host: host.spec.name.clone(),
                        capacity: host.spec.capacity,
                        used: Resources::default(),
                        groups: BTreeSet::new(),
                    },
                )
            })
            .collect();
        for vm in self.vms.values() {
            let Some(host) = &vm.host else { continue };
            if !ACTIVE_VM_STATES.contains(&vm.state) {
                continue;
            }
            if let Some(candidate) = candidates.get_mut(host) {
                candidate.used = candidate.used.plus(vm.spec.demand);
                if let Some(group) = &vm.spec.group {
                    candidate.groups.insert(group.clone());
                }
            }
        }
        candidates.into_values().collect()
    }

    fn issue_start(&mut self, fx: &mut Effects, vm: &VmName, target: &HostName) {
        let id = self.next_id();
        let deadline = fx.now + self.config.timing.vm_start_timeout();
        let window = self.vms[vm].spec.budget.window;
        let record = self.vms.get_mut(vm).expect("planned");
        let Some(release) = record.release.clone() else {
            // Unreachable by construction: only released VMs are PendingCapacity. Refuse loudly.
            fx.alert(Severity::Critical, Some(target), format!("refusing to start {vm}: no release recorded"));
            return;
        };
        assert!(record.host.is_none(), "a VM bound to a host is never started elsewhere");
        let window_start = fx.now - window;
        record.starts.retain(|(at, _)| *at >= window_start);
        record.relocations.retain(|at| *at >= window_start);
        let budget_exempt = matches!(&release, Release::ReportedNotRunning { state, .. } if state == EVACUATED);
        let counted_relocation = !budget_exempt && record.last_host.as_ref() != Some(target);
        if counted_relocation {
            record.relocations.push(fx.now);
        }
        if !budget_exempt {
            record.starts.push((fx.now, target.clone()));
        }
        let previous_last_host = record.last_host.replace(target.clone());
        record.host = Some(target.clone());
        self.vms_by_host.rebind(vm, None, Some(target));
        record.not_before = None;
        record.work = Some(WorkItem {
            id,
            target: target.clone(),
            deadline,
            counted_relocation,
            previous_last_host,
            budget_exempt,
        });
        fx.audit(
            Some(target),
            Some(vm),
            AuditKind::VmStartIntent,
            format!("work {id}: start on {target} ({})", release.describe()),
        );
        self.set_vm_state(fx, vm, VmState::Starting, format!("starting on {target}"));
        fx.commands.push(Command::StartVm { work: id, vm: vm.clone(), target: target.clone(), release, deadline });
    }

    // ----- maintenance evacuation ---------------------------------------------------------

    fn evacuated(record: &VmRecord) -> bool {
        matches!(&record.release, Some(Release::ReportedNotRunning { state, .. }) if state == EVACUATED)
    }

    /// Maintenance on a host that runs VMs: move them off first, or refuse if they cannot
    /// all be placed elsewhere (an operator expects "maintenance" to leave every VM running).
    fn begin_evacuation(&mut self, fx: &mut Effects, host: &HostName, by: String) {
        let mut vms = self.vms_on(host, &ACTIVE_VM_STATES);
        let avoid: BTreeSet<HostName> = [host.clone()].into();
        let requests: Vec<PlacementRequest<'_>> =
            vms.iter().map(|vm| PlacementRequest { spec: &self.vms[vm].spec, avoid: &avoid, prefer: None }).collect();
        let plan = planner::plan(&requests, self.candidates(fx.now));
        if !plan.pending.is_empty() {
            let names: Vec<&str> = plan.pending.iter().map(VmName::as_str).collect();
            fx.audit(
                Some(host),
                None,
                AuditKind::OperatorRefused,
                format!(
                    "maintenance on by {by} refused: no other host has room for {} (free capacity or move them first)",
                    names.join(", ")
                ),
            );
            return;
        }
        self.sort_by_priority(&mut vms);
        let order: Vec<&str> = vms.iter().map(VmName::as_str).collect();
        fx.audit(
            Some(host),
            None,
            AuditKind::Evacuation,
            format!(
                "maintenance on by {by}: moving {} VMs off first, highest priority first: {}",
                vms.len(),
                order.join(", ")
            ),
        );
        let record = self.hosts.get_mut(host).expect("caller checked");
        record.evacuation = Some(Evacuation { by, started: fx.now, moving: None, moved: Vec::new() });
        self.advance_evacuation(fx, host);
    }

    fn sort_by_priority(&self, vms: &mut [VmName]) {
        vms.sort_by(|a, b| self.vms[b].spec.priority.cmp(&self.vms[a].spec.priority).then_with(|| a.cmp(b)));
    }

    fn advance_evacuations(&mut self, fx: &mut Effects) {
        let evacuating: Vec<HostName> =
            self.hosts.iter().filter(|(_, host)| host.evacuation.is_some()).map(|(name, _)| name.clone()).collect();
        for host in evacuating {
            self.advance_evacuation(fx, &host);
        }
    }

    /// Next step of one evacuation: wait for the VM in flight, stop the next one, or
    /// finish when no VM is left on the host.
    fn advance_evacuation(&mut self, fx: &mut Effects, host: &HostName) {
        let Some(record) = self.hosts.get(host) else {
            return;
        };
        let Some(evacuation) = &record.evacuation else {
            return;
        };
        if record.state != HostState::Up {
            // Its failure handling owns its VMs now: a stop still in flight means nothing.
            for vm in self.vms.values_mut() {
                if vm.stop.as_ref().is_some_and(|stop| stop.host == *host) {
                    vm.stop = None;
                }
            }
            let why = format!("the host became {}", record.state);
            self.cancel_evacuation(fx, host, &why);
            return;
        }
        if let Some(moving) = evacuation.moving.clone() {
            let in_flight = self
                .vms
                .get(&moving)
                .is_some_and(|vm| vm.stop.is_some() || vm.host.as_ref() == Some(host) || vm.state == VmState::Starting);
            if in_flight {
                return;
            }
            let target = self.vms.get(&moving).and_then(|vm| vm.host.clone());
            let state = self.vms.get(&moving).map(|vm| vm.state);
            let evacuation = self.hosts.get_mut(host).and_then(|record| record.evacuation.as_mut()).expect("checked");
            evacuation.moving = None;
            evacuation.moved.push(moving.clone());
            let detail = match (state, target) {
                (Some(VmState::Running), Some(target)) => format!("{moving} moved to {target}"),
                (state, _) => format!(
                    "{moving} left the host but is not running elsewhere ({}); it waits like any HA restart",
                    state.map_or("removed".to_owned(), |state| state.to_string())
                ),
            };
            fx.audit(Some(host), Some(&moving), AuditKind::Evacuation, detail);
        }
        let mut left = self.vms_on(host, &ACTIVE_VM_STATES);
        if left.is_empty() {
            let evacuation = self.hosts.get_mut(host).and_then(|record| record.evacuation.take()).expect("checked");
            let took = fx.now.saturating_since(evacuation.started);
            self.set_host_state(
                fx,
                host,
                HostState::Maintenance,
                format!(
                    "maintenance on by {}: {} VMs moved off in {}; HA suspended for this host",
                    evacuation.by,
                    evacuation.moved.len(),
                    format_duration(took)
                ),
            );
            return;
        }
        // A start or a fence decision about a VM here is in flight: let it settle first.
        if left.iter().any(|vm| self.vms[vm].state != VmState::Running) {
            return;
        }
        self.sort_by_priority(&mut left);
        let next = left.remove(0);
        self.issue_stop(fx, &next, host);
    }

    fn issue_stop(&mut self, fx: &mut Effects, vm: &VmName, host: &HostName) {
        let id = self.next_id();
        let deadline = fx.now + self.config.timing.vm_start_timeout();
        let record = self.hosts.get_mut(host).expect("caller checked");
        let evacuation = record.evacuation.as_mut().expect("caller checked");
        evacuation.moving = Some(vm.clone());
        let by = evacuation.by.clone();
        self.vms.get_mut(vm).expect("listed").stop = Some(StopWork { id, host: host.clone(), deadline, attempts: 1 });
        fx.audit(
            Some(host),
            Some(vm),
            AuditKind::VmStopIntent,
            format!("work {id}: stop on {host} to move it off for maintenance (asked by {by})"),
        );
        fx.commands.push(Command::StopVm { work: id, vm: vm.clone(), host: host.clone(), deadline });
    }

    fn stop_overdue(&mut self, fx: &mut Effects, vm: &VmName) {
        let deadline = fx.now + self.config.timing.vm_start_timeout();
        if self.current_stop(vm).is_none() {
            self.vms.get_mut(vm).expect("caller checked").stop = None;
            return;
        }
        let record = self.vms.get_mut(vm).expect("caller checked");
        let Some(stop) = record.stop.as_mut() else {
            return;
        };
        let host = stop.host.clone();
        if stop.attempts >= STOP_ATTEMPTS {
            // The VM may well still run there: it stays bound to its host, nothing starts
            // it elsewhere.
            let attempts = stop.attempts;
            record.stop = None;
            fx.audit(
                Some(&host),
                Some(vm),
                AuditKind::VmStopOutcome,
                format!("no answer to {attempts} stops; the VM is still taken as running on {host}"),
            );
            self.cancel_evacuation(fx, &host, &format!("{vm} did not stop"));
            return;
        }
        stop.attempts += 1;
        stop.deadline = deadline;
        let id = stop.id;
        fx.audit(Some(&host), Some(vm), AuditKind::VmStopIntent, format!("work {id} sent again: no outcome in time"));
        fx.commands.push(Command::StopVm { work: id, vm: vm.clone(), host, deadline });
    }

    /// The VM's evacuation stop, if it still means something: the VM is running, bound to
    /// the host the stop was sent to.
    fn current_stop(&self, vm: &VmName) -> Option<&StopWork> {
        let record = self.vms.get(vm)?;
        let stop = record.stop.as_ref()?;
        (record.state == VmState::Running && record.host.as_ref() == Some(&stop.host)).then_some(stop)
    }

    fn on_vm_stop_result(&mut self, fx: &mut Effects, result: VmStopResult) {
        let current =
            self.current_stop(&result.vm).is_some_and(|stop| stop.id == result.work && stop.host == result.host);
        if !current {
            fx.audit(
                Some(&result.host),
                Some(&result.vm),
                AuditKind::Dropped,
                format!("stop result {} for no current stop: {:?}", result.work, result.outcome),
            );
            return;
        }
        match result.outcome {
            VmStopOutcome::Stopped => {
                let boot_id = self.hosts.get(&result.host).and_then(|host| host.boot_id.clone());
                let boot_id = boot_id.unwrap_or_else(|| BootId("unknown".to_owned()));
                self.vm_stopped_for_evacuation(fx, &result.vm, &result.host, boot_id, "answered");
            }
            VmStopOutcome::Failed { reason } => {
                self.vms.get_mut(&result.vm).expect("checked").stop = None;
                fx.audit(
                    Some(&result.host),
                    Some(&result.vm),
                    AuditKind::VmStopOutcome,
                    format!("work {} failed: {reason}; the VM is still taken as running there", result.work),
                );
                let why = format!("{} could not be stopped: {reason}", result.vm);
                self.cancel_evacuation(fx, &result.host, &why);
            }
        }
    }

    /// Our evacuation stop is done: the VM is off on `host` and its lease released, so it
    /// may start elsewhere (the agent's lease check still guards that start).
    fn vm_stopped_for_evacuation(
        &mut self,
        fx: &mut Effects,
        vm: &VmName,
        host: &HostName,
        boot_id: BootId,
        how: &str,
    ) {
        let record = self.vms.get_mut(vm).expect("caller checked");
        let Some(stop) = record.stop.take() else {
            return;
        };
        let previous = record.host.take();
        self.vms_by_host.rebind(vm, previous.as_ref(), None);
        record.work = None;
        record.release = Some(Release::ReportedNotRunning { host: host.clone(), boot_id, state: EVACUATED.to_owned() });
        fx.audit(Some(host), Some(vm), AuditKind::VmStopOutcome, format!("work {} stopped on {host} ({how})", stop.id));
        self.set_vm_state(fx, vm, VmState::PendingCapacity, format!("{EVACUATED} on {host}; starting elsewhere"));
        self.place_pending(fx);
    }

    fn cancel_evacuation(&mut self, fx: &mut Effects, host: &HostName, why: &str) {
        let Some(evacuation) = self.hosts.get_mut(host).and_then(|record| record.evacuation.take()) else {
            return;
        };
        fx.alert(
            Severity::Warning,
            Some(host),
            format!(
                "maintenance evacuation of {host} (asked by {}) stopped: {why}; the host does not enter maintenance, \
                 the {} VMs already moved stay where they are",
                evacuation.by,
                evacuation.moved.len()
            ),
        );
    }

    // ----- operators ----------------------------------------------------------------------

    fn on_operator(&mut self, fx: &mut Effects, action: OperatorAction) {
        match action {
            OperatorAction::ConfirmDown { host, by } => {
                let Some(record) = self.hosts.get_mut(&host) else {
                    fx.audit(
                        Some(&host),
                        None,
                        AuditKind::OperatorRefused,
                        format!("confirm-down by {by}: no such host"),
                    );
                    return;
                };
                let state = record.state;
                if !matches!(
                    state,
                    HostState::Suspect
                        | HostState::Investigating
                        | HostState::Degraded
                        | HostState::Fencing
                        | HostState::FenceFailed
                ) {
                    fx.audit(
                        Some(&host),
                        None,
                        AuditKind::OperatorRefused,
                        format!("confirm-down by {by} refused: host is {state}, not failed"),
                    );
                    return;
                }
                record.operator_confirmation = Some(OperatorConfirmation { by: by.clone(), at: fx.now });
                fx.audit(Some(&host), None, AuditKind::Operator, format!("confirm-down by {by}"));
                self.fence_if_proven(fx, &host);
            }
            OperatorAction::Maintenance { host, on, by } => {
                let Some(record) = self.hosts.get(&host) else {
                    fx.audit(
                        Some(&host),
                        None,
                        AuditKind::OperatorRefused,
                        format!("maintenance by {by}: no such host"),
                    );
                    return;
                };
                let state = record.state;
                if on {
                    if record.evacuation.is_some() {
                        fx.audit(
                            Some(&host),
                            None,
                            AuditKind::OperatorRefused,
                            format!("maintenance on by {by} refused: the host is already being evacuated"),
                        );
                        return;
                    }
                    if !state.may_become(HostState::Maintenance) {
                        fx.audit(
                            Some(&host),
                            None,
                            AuditKind::OperatorRefused,
                            format!("maintenance on by {by} refused: host is {state}"),
                        );
                        return;
                    }
                    if state == HostState::Up && !self.vms_on(&host, &ACTIVE_VM_STATES).is_empty() {
                        self.begin_evacuation(fx, &host, by);
                        return;
                    }
                    self.set_host_state(
                        fx,
                        &host,
                        HostState::Maintenance,
                        format!("maintenance on by {by}: HA suspended for this host"),
                    );
                } else if record.evacuation.is_some() {
                    self.cancel_evacuation(fx, &host, &format!("maintenance off by {by}"));
                } else if state == HostState::Maintenance {
                    let silent = self.is_silent(record, fx.now);
                    let to = if silent { HostState::Suspect } else { HostState::Up };
                    self.set_host_state(fx, &host, to, format!("maintenance off by {by}"));
                    if silent {
                        self.start_round(fx, &host);
                    }
                }
            }
            OperatorAction::HostHa { host, enabled, by } => {
                if let Some(record) = self.hosts.get_mut(&host) {
                    record.ha_enabled = enabled;
                    fx.audit(
                        Some(&host),
                        None,
                        AuditKind::Operator,
                        format!("host HA {} by {by}", if enabled { "enabled" } else { "disabled" }),
                    );
                }
            }
            OperatorAction::ClusterHa { enabled, by } => {
                self.cluster_ha = enabled;
                fx.audit(
                    None,
                    None,
                    AuditKind::Operator,
                    format!("cluster HA {} by {by}", if enabled { "enabled" } else { "disabled" }),
                );
                self.place_pending(fx);
            }
            OperatorAction::Disarm { by } => {
                self.disarmed = true;
                fx.alert(
                    Severity::Warning,
                    None,
                    format!("cluster disarmed by {by}: watchdogs released, nobody is fenced, VMs keep running"),
                );
                fx.commands.push(Command::Directives(self.directives()));
            }
            OperatorAction::Arm { by } => {
                self.disarmed = false;
                fx.audit(None, None, AuditKind::Operator, format!("cluster armed by {by}: protection restored"));
                fx.commands.push(Command::Directives(self.directives()));
            }
            OperatorAction::VmStop { vm, by } => self.operator_vm_stop(fx, &vm, by),
            OperatorAction::RemoveHost { host, by } => self.remove_host(fx, &host, &by),
            OperatorAction::VmStopOutcome { vm, by, refused } => self.operator_vm_stop_outcome(fx, &vm, &by, refused),
        }
    }

    /// `kvmha host remove`: forgets the host. Only one that no VM depends on: a VM bound
    /// to it may run there (or its restart waits for the host's proof of death), and a
    /// fence or an evacuation in flight must finish first.
    fn remove_host(&mut self, fx: &mut Effects, host: &HostName, by: &str) {
        let Some(record) = self.hosts.get(host) else {
            fx.audit(Some(host), None, AuditKind::OperatorRefused, format!("remove by {by}: no such host"));
            return;
        };
        let state = record.state;
        let bound: Vec<&str> =
            self.vms.iter().filter(|(_, vm)| vm.host.as_ref() == Some(host)).map(|(name, _)| name.as_str()).collect();
        let refusal = if !bound.is_empty() {
            Some(format!(
                "VMs are bound to it ({}): move them off (maintenance), stop them, or prove the host dead first",
                bound.join(", ")
            ))
        } else if record.evacuation.is_some() {
            Some("it is being evacuated".to_owned())
        } else if state == HostState::Fencing {
            Some("it is being fenced".to_owned())
        } else {
            None
        };
        if let Some(why) = refusal {
            fx.audit(Some(host), None, AuditKind::OperatorRefused, format!("remove by {by} refused: {why}"));
            return;
        }
        self.hosts.remove(host);
        fx.audit(
            Some(host),
            None,
            AuditKind::Operator,
            format!("host removed from the cluster by {by} (was {state}); its agent certificate is revoked"),
        );
    }

    /// `kvmha vm stop`, before the stop goes to the host. A running VM becomes `Stopped`
    /// at once, still bound to its host (it may run there until the stop lands): if the
    /// host dies now, fencing finds it `Stopped` and restarts nothing. A VM whose restart
    /// is pending (its host failed) has that restart cancelled. A start in flight or an
    /// evacuation move is not interrupted: refused, to be retried once it settled.
    fn operator_vm_stop(&mut self, fx: &mut Effects, vm: &VmName, by: String) {
        let Some(record) = self.vms.get_mut(vm) else {
            fx.audit(None, Some(vm), AuditKind::OperatorRefused, format!("stop by {by}: no such vm"));
            return;
        };
        let host = record.host.clone();
        let state = record.state;
        match state {
            VmState::Running if record.stop.is_some() => {
                fx.audit(
                    host.as_ref(),
                    Some(vm),
                    AuditKind::OperatorRefused,
                    format!("stop by {by} refused: it is being moved off its host for maintenance; retry once moved"),
                );
            }
            VmState::Running => {
                record.operator_stop = Some(OperatorStop { by: by.clone(), instance: record.instance });
                let on = host.as_ref().map_or_else(|| "its host".to_owned(), ToString::to_string);
                self.set_vm_state(
                    fx,
                    vm,
                    VmState::Stopped,
                    format!("stop by {by} sent to {on}: not restarted, whatever happens to {on}, until started again"),
                );
            }
            VmState::Starting => {
                let target = record.work.as_ref().map(|work| work.target.to_string()).unwrap_or_default();
                fx.audit(
                    host.as_ref(),
                    Some(vm),
                    AuditKind::OperatorRefused,
                    format!("stop by {by} refused: a start on {target} is in flight; retry once it settled"),
                );
            }
            VmState::AwaitingProof | VmState::PendingCapacity => {
                // Nothing runs anywhere that kvmha started (its old host is failed or said
                // it is off): cancelling means not starting it. The binding to a failed host
                // stays until that host is fenced or back.
                let release = record.release.as_ref().map(Release::describe);
                record.work = None;
                record.not_before = None;
                let why = match release {
                    Some(release) => format!("released: {release}"),
                    None => "waiting for its failed host to be proven dead".to_owned(),
                };
                fx.audit(
                    host.as_ref(),
                    Some(vm),
                    AuditKind::Operator,
                    format!("pending restart cancelled by an operator stop by {by} (was {state}, {why})"),
                );
                self.set_vm_state(fx, vm, VmState::Stopped, format!("stopped by {by}: its restart is cancelled"));
            }
            VmState::Stopped | VmState::Error => {
                fx.audit(host.as_ref(), Some(vm), AuditKind::Operator, format!("stop by {by}: already {state}"));
            }
        }
    }

    fn operator_vm_stop_outcome(&mut self, fx: &mut Effects, vm: &VmName, by: &str, refused: Option<String>) {
        let Some(record) = self.vms.get_mut(vm) else {
            return;
        };
        let Some(stop) = record.operator_stop.take() else {
            return;
        };
        let Some(reason) = refused else {
            return;
        };
        // The host answered that the VM still runs: bound to it as before, protected again.
        let still_bound = record.state == VmState::Stopped && record.host.is_some();
        if !still_bound {
            return;
        }
        record.instance = stop.instance;
        let host = record.host.clone();
        fx.audit(
            host.as_ref(),
            Some(vm),
            AuditKind::Operator,
            format!("stop by {by} failed on its host ({reason}): it still runs there and HA protects it again"),
        );
        self.set_vm_state(fx, vm, VmState::Running, "an operator stop failed: still running");
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
