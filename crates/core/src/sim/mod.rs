//! Deterministic simulation of a whole cluster around the real engine.
//!
//! One seed derives the cluster (hosts, BMCs, watchdogs, pools, VMs, clock drift), the
//! timing profile and the fault schedule. The simulated world plays the agents (pings,
//! heartbeat and lease renewal, self-fencing, watchdog petting, clean stops), the hosts
//! (power, hangs, reboots), the networks (management, storage and out-of-band, cut per host,
//! lossy), the BMCs (unreachable, failing, slow) and the shared storage (VM leases), and
//! executes every command the engine returns. After every step a checker looks at the
//! ground truth:
//!
//! - `no_double_run`: no VM runs on two hosts at once (a hung host's VMs still count: they
//!   resume when it does);
//! - `start_only_with_proof`: the engine never asks to start a VM that still runs elsewhere;
//! - `no_false_fence`: no host is fenced while it, its agent and its storage were healthy;
//! - after every fault is healed, `recovery`: every HA VM that has room runs again, and
//!   `no_silent_stall`: no host sits in a transient state without an alert.
//!
//! A failing seed replays exactly with `kvmha simulate --seed N`.

mod invariants;
pub mod rng;

use crate::engine::{Engine, EngineConfig};
use crate::event::{
    Command, Event, FenceOutcome, FenceResult, Finding, HeartbeatObservation, InvestigatorKind, InvestigatorReport,
    OperatorAction, Ping, PoolObservation, RecordState, Release, RequestId, StorageHealth, VmReport, VmRunState,
    VmStartOutcome, VmStartResult, VmStopOutcome, VmStopResult,
};
use crate::model::{BootId, HostName, HostSpec, PoolName, Resources, RestartBudget, VmName, VmSpec};
use crate::safety::ProofKind;
use crate::state::{HostState, VmState};
use crate::time::{duration_ms, Instant};
use crate::timing::{Profile, Timing, TimingSettings};
use rng::SimRng;
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;
use std::time::Duration;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    /// Number of hosts; derived from the seed when `None` (3 to 6).
    pub hosts: Option<usize>,
    /// Timing profile; derived from the seed when `None`.
    pub profile: Option<Profile>,
    /// Keep a readable timeline (slower; for `kvmha simulate` and failure reports).
    pub record_trace: bool,
    /// Test-only: run a deliberately broken engine to prove the checker can fail.
    #[cfg(test)]
    pub(crate) planted_bug: Option<crate::engine::PlantedBug>,
}

impl SimOptions {
    pub fn new(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            hosts: None,
            profile: None,
            record_trace: false,
            #[cfg(test)]
            planted_bug: None,
        }
    }
}

/// One line of the timeline.
#[derive(Clone, Debug, Serialize)]
pub struct TraceLine {
    pub at_ms: u64,
    /// `fault`, `event`, `command`, `audit`, `world` or `violation`.
    pub source: &'static str,
    pub text: String,
}

/// A broken invariant, with when and what.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub at_ms: u64,
    pub invariant: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms {}: {}", self.at_ms, self.invariant, self.detail)
    }
}

/// What a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct SimOutcome {
    pub seed: u64,
    pub hosts: usize,
    pub vms: usize,
    pub profile: Profile,
    pub faults: Vec<TraceLine>,
    pub violations: Vec<Violation>,
    /// Events fed to the engine.
    pub steps: u64,
    /// Maintenance evacuations that ended with the host in maintenance, its VMs moved.
    pub evacuations_finished: u32,
    pub final_hosts: BTreeMap<String, String>,
    pub final_vms: BTreeMap<String, String>,
    pub trace: Vec<TraceLine>,
}

impl SimOutcome {
    pub fn replay_command(&self) -> String {
        format!("kvmha simulate --seed {} --hosts {} --profile {}", self.seed, self.hosts, self.profile)
    }
}

// ----- the schedule -------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    Mgmt,
    /// Only manager-to-agent requests are blocked.
    MgmtInbound,
    /// Only the agent's own connections (pings) are blocked.
    MgmtOutbound,
    Storage,
    Oob,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BmcCondition {
    Ok,
    Unreachable,
    /// Answers every command with an error completion code.
    Failing,
    /// Answers after the engine's deadline; its power-off still lands.
    Slow,
}

#[derive(Clone, Debug, PartialEq)]
enum Fault {
    PowerOff(usize),
    PowerOn(usize),
    Hang(usize),
    Resume(usize),
    AgentKill(usize),
    AgentStop(usize),
    AgentStart(usize),
    Partition(usize, Net),
    Loss(usize, u64),
    HealHost(usize),
    Bmc(usize, BmcCondition),
    VmCrash(usize),
    ManagerRestart {
        down_ms: u64,
    },
    StorageOutage,
    StorageBack,
    ConfirmDown(usize),
    /// The seed's hard case: management partition while the agent is down.
    PartitionAndAgentKill(usize),
    /// Two hosts lose power together.
    DoublePowerOff(usize, usize),
    /// Every host's management link drops: from the manager, the whole cluster went quiet.
    ManagerCutOff,
    Maintenance(usize, bool),
    Disarm,
    Arm,
    HealAll,
}

// ----- the world ----------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct SimHost {
    spec: HostSpec,
    powered: bool,
    hung: bool,
    boot: u32,
    /// The boot's agent starts at this time (after power-on or reset).
    boots_at: Option<Instant>,
    agent_running: bool,
    agent_epoch: u32,
    /// Last successful heartbeat write by this boot's agent, remembered across agent
    /// restarts within a boot (the agent keeps it in /run).
    last_renew_ok: Option<Instant>,
    last_renew_failed: bool,
    hold_until: Option<Instant>,
    disarmed: bool,
    self_fenced: bool,
    watchdog_armed: bool,
    last_pet: Instant,
    /// Clock rate offset in parts per million: local = global * (1 + ppm/1e6).
    drift_ppm: i64,
    /// Agent-initiated traffic (pings and their replies, goodbyes).
    mgmt_up: bool,
    /// Manager-initiated requests to the agent (VM starts, neighbour checks): a firewall
    /// can block these while the agent's own connections still work.
    commands_up: bool,
    storage_up: bool,
    oob_up: bool,
    mgmt_loss: u64,
    bmc: BmcCondition,
    /// Heartbeat record on storage: (boot, counter, armed, stopped cleanly), and when it last changed.
    record: Option<(u32, u64, bool, bool)>,
    record_changed_at: Instant,
    /// VMs this boot's agent reports as not running, with why and which instance.
    reported_down: BTreeMap<usize, (VmRunState, Option<RequestId>)>,
    ping_seq: u64,
    /// Healthy (powered, running, agent up, storage up) continuously since.
    healthy_since: Option<Instant>,
}

impl SimHost {
    fn boot_id(&self) -> BootId {
        BootId(format!("{}-b{}", self.spec.name, self.boot))
    }
    fn active(&self) -> bool {
        self.powered && !self.hung
    }
    fn agent_alive(&self) -> bool {
        self.active() && self.agent_running
    }
    /// A global duration as this host's clock measures it.
    fn local(&self, global: Duration) -> Duration {
        let ms = duration_ms(global) as i128;
        Duration::from_millis((ms * (1_000_000 + self.drift_ppm as i128) / 1_000_000).max(0) as u64)
    }
    /// A duration on this host's clock as global time.
    fn global(&self, local: Duration) -> Duration {
        let ms = duration_ms(local) as i128;
        Duration::from_millis((ms * 1_000_000 / (1_000_000 + self.drift_ppm as i128)).max(0) as u64)
    }
}

#[derive(Clone, Debug)]
struct SimVm {
    spec: VmSpec,
    /// Ground truth: every (host, boot) running it. More than one is a double run.
    running_on: Vec<(usize, u32)>,
    /// The VM's lease on shared storage: owner (host, boot) and last renewal.
    lease: Option<(usize, u32, Instant)>,
    /// The start (work id) of the newest instance.
    instance: Option<RequestId>,
}

#[derive(Clone, Debug)]
enum Action {
    WorldTick,
    AgentPing(usize, u32),
    AgentRenew(usize, u32),
    ToManager(Event),
    /// The BMC's power-off reaches the chassis.
    PowerOffLands(usize),
    StartLands {
        host: usize,
        work: RequestId,
        vm: usize,
        release: Release,
    },
    StopLands {
        host: usize,
        work: RequestId,
        vm: usize,
    },
    Fault(Fault),
    ManagerUp,
}

struct Scheduled {
    at: Instant,
    seq: u64,
    action: Action,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse for earliest first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct World {
    rng: SimRng,
    now: Instant,
    timing: Timing,
    engine: Option<Engine>,
    persisted: Option<String>,
    hosts: Vec<SimHost>,
    vms: Vec<SimVm>,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    steps: u64,
    evacuations_finished: u32,
    record_trace: bool,
    trace: Vec<TraceLine>,
    faults: Vec<TraceLine>,
    violations: Vec<Violation>,
    alerted_hosts: BTreeSet<usize>,
    /// Whether the manager can read the shared pools itself.
    manager_storage_up: bool,
    healed: bool,
    #[cfg(test)]
    planted_bug: Option<crate::engine::PlantedBug>,
}

const POOLS: [&str; 2] = ["pool-a", "pool-b"];

/// Runs one seeded schedule to the end and checks it.
pub fn run(options: &SimOptions) -> SimOutcome {
    let mut rng = SimRng::new(options.seed);
    let profile = options.profile.unwrap_or_else(|| match rng.below(10) {
        0..=5 => Profile::Fast,
        6..=8 => Profile::Balanced,
        _ => Profile::Conservative,
    });
    let timing = Timing::from_profile(profile, &TimingSettings::default()).expect("profiles are valid");
    let host_count = options.hosts.unwrap_or_else(|| rng.between(3, 6) as usize).max(1);
    let drift_bound = timing.clock_drift_max_ppm() as i64 / 2;

    let mut hosts = Vec::new();
    for index in 0..host_count {
        let pools: Vec<PoolName> =
            POOLS[..rng.between(1, 2) as usize].iter().map(|pool| PoolName::from(*pool)).collect();
        let spec = HostSpec {
            name: HostName::new(format!("host{}", index + 1)),
            networks: vec!["mgmt".to_owned(), "storage".to_owned()],
            capacity: Resources { cpus: 8, memory_mb: rng.between(4, 8) * 1024 },
            has_bmc: rng.percent(85),
            has_watchdog: rng.percent(85),
            pools,
        };
        let drift_ppm = if drift_bound > 0 { rng.below(2 * drift_bound as u64 + 1) as i64 - drift_bound } else { 0 };
        hosts.push(SimHost {
            spec,
            powered: true,
            hung: false,
            boot: 1,
            boots_at: None,
            agent_running: false,
            agent_epoch: 0,
            last_renew_ok: None,
            last_renew_failed: false,
            hold_until: None,
            disarmed: false,
            self_fenced: false,
            watchdog_armed: false,
            last_pet: Instant::ZERO,
            drift_ppm,
            mgmt_up: true,
            commands_up: true,
            storage_up: true,
            oob_up: true,
            mgmt_loss: 0,
            bmc: BmcCondition::Ok,
            record: None,
            record_changed_at: Instant::ZERO,
            reported_down: BTreeMap::new(),
            ping_seq: 0,
            healthy_since: None,
        });
    }

    let mut vms = Vec::new();
    for (host_index, host) in hosts.iter().enumerate() {
        let mut used = 0;
        for vm_index in 0..rng.between(1, 3) {
            let memory_mb = *rng.pick(&[512, 1024, 2048]);
            if used + memory_mb > host.spec.capacity.memory_mb / 2 {
                break;
            }
            used += memory_mb;
            let group = rng.percent(30).then(|| format!("group{}", rng.below(2)));
            let spec = VmSpec {
                name: VmName::new(format!("{}-vm{}", host.spec.name, vm_index + 1)),
                ha: rng.percent(90),
                priority: rng.below(4) as i32,
                demand: Resources { cpus: 1, memory_mb },
                group,
                affinity: BTreeSet::new(),
                budget: RestartBudget::default(),
            };
            vms.push(SimVm {
                spec,
                running_on: vec![(host_index, 1)],
                lease: Some((host_index, 1, Instant::ZERO)),
                instance: None,
            });
        }
    }

    let mut world = World {
        rng,
        now: Instant::ZERO,
        timing: timing.clone(),
        engine: None,
        persisted: None,
        hosts,
        vms,
        queue: BinaryHeap::new(),
        seq: 0,
        steps: 0,
        evacuations_finished: 0,
        record_trace: options.record_trace,
        trace: Vec::new(),
        faults: Vec::new(),
        violations: Vec::new(),
        alerted_hosts: BTreeSet::new(),
        manager_storage_up: true,
        healed: false,
        #[cfg(test)]
        planted_bug: options.planted_bug,
    };
    world.start(timing);
    world.schedule_faults();
    let end = world.liveness_deadline();
    world.run_until(end);
    world.check_liveness();
    world.outcome(options.seed, profile)
}

impl World {
    fn schedule(&mut self, at: Instant, action: Action) {
        self.seq += 1;
        self.queue.push(Scheduled { at, seq: self.seq, action });
    }

    fn tick_interval(&self) -> Duration {
        (self.timing.ping_interval() / 2).clamp(Duration::from_millis(50), Duration::from_millis(250))
    }

    fn trace(&mut self, source: &'static str, text: impl FnOnce() -> String) {
        if self.record_trace {
            self.trace.push(TraceLine { at_ms: self.now.as_millis(), source, text: text() });
        }
    }

    fn violation(&mut self, invariant: &'static str, detail: String) {
        if self.record_trace {
            self.trace.push(TraceLine {
                at_ms: self.now.as_millis(),
                source: "violation",
                text: format!("{invariant}: {detail}"),
            });
        }
        self.violations.push(Violation { at_ms: self.now.as_millis(), invariant, detail });
    }

    fn start(&mut self, timing: Timing) {
        let mut engine = Engine::new(EngineConfig::new(timing), self.now);
        #[cfg(test)]
        {
            engine.planted_bug = self.planted_bug;
        }
        let mut setup = Vec::new();
        for host in &self.hosts {
            setup.push(Event::HostAdded(host.spec.clone()));
        }
        for vm in &self.vms {
            let host = vm.running_on.first().map(|(host, _)| self.hosts[*host].spec.name.clone());
            setup.push(Event::VmAdded { spec: vm.spec.clone(), host });
        }
        self.engine = Some(engine.clone());
        for event in setup {
            let commands = engine.step(self.now, event);
            self.steps += 1;
            self.engine = Some(engine.clone());
            self.execute(commands);
        }
        self.engine = Some(engine);
        for index in 0..self.hosts.len() {
            self.start_agent(index);
        }
        self.schedule(self.now, Action::WorldTick);
    }

    fn schedule_faults(&mut self) {
        let host_count = self.hosts.len();
        let fault_count = self.rng.between(1, 4);
        let ping_timeout = duration_ms(self.timing.ping_timeout());
        let base = 2_000 + ping_timeout;
        let mut at = base;
        for _ in 0..fault_count {
            at += self.rng.between(200, 12_000);
            let host = self.rng.below(host_count as u64) as usize;
            let fault = match self.rng.below(100) {
                0..=17 => Fault::PowerOff(host),
                18..=25 => Fault::Hang(host),
                26..=33 => Fault::AgentKill(host),
                34..=39 => Fault::AgentStop(host),
                40..=51 => Fault::Partition(
                    host,
                    *self.rng.pick(&[Net::Mgmt, Net::MgmtInbound, Net::MgmtOutbound, Net::Storage, Net::Oob, Net::All]),
                ),
                52..=57 => Fault::Loss(host, self.rng.between(10, 50)),
                58..=65 => Fault::Bmc(
                    host,
                    *self.rng.pick(&[BmcCondition::Unreachable, BmcCondition::Failing, BmcCondition::Slow]),
                ),
                66..=71 => Fault::VmCrash(self.rng.below(self.vms.len().max(1) as u64) as usize),
                72..=77 => Fault::ManagerRestart { down_ms: self.rng.between(200, 4_000) },
                78..=81 => Fault::StorageOutage,
                82..=83 => Fault::Maintenance(host, true),
                84..=85 => Fault::Disarm,
                86..=88 => Fault::HealHost(host),
                89..=90 => Fault::PowerOn(host),
                91..=94 => Fault::PartitionAndAgentKill(host),
                95..=97 => Fault::DoublePowerOff(host, (host + 1) % host_count),
                98..=99 => Fault::ManagerCutOff,
                _ => unreachable!("below(100)"),
            };
            // Some faults come with their own follow-up.
            match &fault {
                Fault::Hang(host) if self.rng.percent(50) => {
                    let later = at + self.rng.between(500, 20_000);
                    self.schedule(Instant::from_millis(later), Action::Fault(Fault::Resume(*host)));
                }
                Fault::AgentKill(host) | Fault::AgentStop(host) if self.rng.percent(50) => {
                    let later = at + self.rng.between(300, 8_000);
                    self.schedule(Instant::from_millis(later), Action::Fault(Fault::AgentStart(*host)));
                }
                Fault::PowerOff(host) if self.rng.percent(30) => {
                    let later = at + self.rng.between(5_000, 30_000);
                    self.schedule(Instant::from_millis(later), Action::Fault(Fault::ConfirmDown(*host)));
                }
                Fault::StorageOutage => {
                    let later = at + self.rng.between(1_000, 20_000);
                    self.schedule(Instant::from_millis(later), Action::Fault(Fault::StorageBack));
                }
                Fault::Disarm => {
                    let later = at + self.rng.between(1_000, 10_000);
                    self.schedule(Instant::from_millis(later), Action::Fault(Fault::Arm));
                }
                _ => {}
            }
            self.schedule(Instant::from_millis(at), Action::Fault(fault));
        }
        let heal_at = at + self.rng.between(2_000, 15_000);
        self.schedule(Instant::from_millis(heal_at), Action::Fault(Fault::HealAll));
    }

    fn liveness_deadline(&self) -> Instant {
        let heal = self
            .queue
            .iter()
            .filter(|scheduled| matches!(scheduled.action, Action::Fault(Fault::HealAll)))
            .map(|scheduled| scheduled.at)
            .max()
            .unwrap_or(self.now);
        let settle = self.timing.degraded_recheck().max(self.timing.lease_takeover_after())
            + self.timing.fencing_bound()
            + self.timing.vm_start_timeout() * 2
            + self.timing.reconnect_grace()
            + Duration::from_secs(20);
        heal + settle
    }

    fn run_until(&mut self, end: Instant) {
        while let Some(scheduled) = self.queue.pop() {
            if scheduled.at > end {
                break;
            }
            self.now = scheduled.at;
            self.perform(scheduled.action);
        }
        self.now = end;
    }

    // ----- the manager ----------------------------------------------------------------------

    fn feed(&mut self, event: Event) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        if self.record_trace && !matches!(event, Event::Tick | Event::Ping(_)) {
            let text = format!("{event:?}");
            self.trace.push(TraceLine { at_ms: self.now.as_millis(), source: "event", text });
        }
        let commands = engine.step(self.now, event);
        self.steps += 1;
        self.execute(commands);
    }

    fn latency(&mut self) -> Duration {
        Duration::from_millis(self.rng.between(2, 30))
    }

    fn execute(&mut self, commands: Vec<Command>) {
        for command in commands {
            match command {
                Command::Audit(audit) => {
                    if matches!(audit.kind, crate::event::AuditKind::HostState { to: HostState::Maintenance, .. })
                        && audit.detail.contains("moved off")
                    {
                        self.evacuations_finished += 1;
                    }
                    if self.record_trace {
                        self.trace.push(TraceLine {
                            at_ms: self.now.as_millis(),
                            source: "audit",
                            text: audit.describe(),
                        });
                    }
                }
                Command::Alert(alert) => {
                    if let Some(host) = &alert.host {
                        if let Some(index) = self.host_index(host) {
                            self.alerted_hosts.insert(index);
                        }
                    }
                }
                Command::Directives(_) => {}
                Command::Investigate { host, investigation, kinds, neighbours, evidence_after, .. } => {
                    self.trace("command", || {
                        format!(
                            "investigate {host} {investigation}: {} via [{}]",
                            kinds.iter().map(|kind| kind.name()).collect::<Vec<_>>().join(", "),
                            neighbours.iter().map(HostName::as_str).collect::<Vec<_>>().join(",")
                        )
                    });
                    let Some(target) = self.host_index(&host) else {
                        continue;
                    };
                    for kind in kinds {
                        self.investigate(target, investigation, kind, &neighbours, evidence_after);
                    }
                }
                Command::Fence { host, fence, attempt, .. } => {
                    self.trace("command", || format!("fence {host} {fence} attempt {attempt}"));
                    let Some(target) = self.host_index(&host) else {
                        continue;
                    };
                    self.check_fence(target);
                    self.fence(target, &host, fence);
                }
                Command::StartVm { work, vm, target, release, .. } => {
                    self.trace("command", || format!("start {vm} on {target} {work}: {}", release.describe()));
                    let (Some(vm_index), Some(target_index)) = (self.vm_index(&vm), self.host_index(&target)) else {
                        continue;
                    };
                    self.check_start(vm_index, target_index, &release);
                    if self.hosts[target_index].agent_alive() && self.hosts[target_index].commands_up {
                        let at = self.now + self.latency() + Duration::from_millis(self.rng.between(20, 200));
                        self.schedule(at, Action::StartLands { host: target_index, work, vm: vm_index, release });
                    }
                }
                Command::StopVm { work, vm, host, .. } => {
                    self.trace("command", || format!("stop {vm} on {host} {work}"));
                    let (Some(vm_index), Some(host_index)) = (self.vm_index(&vm), self.host_index(&host)) else {
                        continue;
                    };
                    if self.hosts[host_index].agent_alive() && self.hosts[host_index].commands_up {
                        let at = self.now + self.latency() + Duration::from_millis(self.rng.between(20, 500));
                        self.schedule(at, Action::StopLands { host: host_index, work, vm: vm_index });
                    }
                }
            }
        }
    }

    fn host_index(&self, name: &HostName) -> Option<usize> {
        self.hosts.iter().position(|host| &host.spec.name == name)
    }

    fn vm_index(&self, name: &VmName) -> Option<usize> {
        self.vms.iter().position(|vm| &vm.spec.name == name)
    }

    fn send_to_manager(&mut self, delay: Duration, event: Event) {
        let at = self.now + delay;
        self.schedule(at, Action::ToManager(event));
    }

    fn investigate(
        &mut self,
        target: usize,
        investigation: RequestId,
        kind: InvestigatorKind,
        neighbours: &[HostName],
        evidence_after: Instant,
    ) {
        let host = self.hosts[target].spec.name.clone();
        let report = |finding, evidence: String, heartbeat| InvestigatorReport {
            host: host.clone(),
            investigation,
            kind,
            finding,
            evidence,
            heartbeat,
        };
        let delay = self.latency();
        match kind {
            InvestigatorKind::NeighbourPing => {
                let mut asked = Vec::new();
                let mut reached = Vec::new();
                for name in neighbours {
                    let Some(index) = self.host_index(name) else {
                        continue;
                    };
                    let neighbour = &self.hosts[index];
                    if !neighbour.agent_alive() || !neighbour.commands_up {
                        continue;
                    }
                    asked.push(name.as_str().to_owned());
                    let target_host = &self.hosts[target];
                    let kernel_up = target_host.active();
                    let via_mgmt = kernel_up && target_host.mgmt_up && target_host.mgmt_loss < 100;
                    let via_storage = kernel_up && target_host.storage_up && neighbour.storage_up;
                    if via_mgmt || via_storage {
                        reached.push(format!("{name} via {}", if via_mgmt { "mgmt" } else { "storage" }));
                    }
                }
                if asked.is_empty() {
                    return;
                }
                let result = if reached.is_empty() {
                    report(Finding::Unknown, format!("unreachable from {}", asked.join(",")), None)
                } else {
                    report(Finding::Alive, format!("reachable from {}", reached.join(", ")), None)
                };
                self.send_to_manager(delay, Event::Report(result));
            }
            InvestigatorKind::StorageHeartbeat => {
                let observation = self.heartbeat_observation(target, evidence_after);
                let advancing = observation.pools.iter().any(|pool| pool.record == RecordState::Advancing);
                let evidence = match &observation.pools[0].record {
                    RecordState::Advancing => "advancing".to_owned(),
                    RecordState::Unchanged { unchanged_for, .. } => {
                        format!("stale {}ms", duration_ms(*unchanged_for))
                    }
                    RecordState::Unreadable { reason } => reason.clone(),
                };
                let finding = if advancing { Finding::Alive } else { Finding::Dead };
                let result = report(finding, evidence, Some(observation));
                self.send_to_manager(delay, Event::Report(result));
            }
            InvestigatorKind::VmActivity => {
                let target_host = &self.hosts[target];
                let writing: Vec<&str> = self
                    .vms
                    .iter()
                    .filter(|vm| vm.running_on.iter().any(|(host, boot)| *host == target && *boot == target_host.boot))
                    .map(|vm| vm.spec.name.as_str())
                    .collect();
                let result = if !self.manager_storage_up {
                    report(Finding::Unknown, "pools unreachable from the manager".to_owned(), None)
                } else if target_host.active() && target_host.storage_up && !writing.is_empty() {
                    report(Finding::Alive, format!("disks of {} being written", writing.join(",")), None)
                } else {
                    report(Finding::Unknown, "no VM disk written".to_owned(), None)
                };
                self.send_to_manager(delay, Event::Report(result));
            }
            InvestigatorKind::BmcPower => {
                let target_host = &self.hosts[target];
                let (finding, evidence) = match (target_host.bmc, target_host.oob_up) {
                    (BmcCondition::Unreachable, _) | (_, false) => return,
                    (BmcCondition::Failing, _) => (Finding::Unknown, "bmc error: completion code 0xd4".to_owned()),
                    _ if target_host.powered => (Finding::Unknown, "power on".to_owned()),
                    _ => (Finding::Dead, "power off".to_owned()),
                };
                let delay =
                    if target_host.bmc == BmcCondition::Slow { self.timing.investigation_round() * 2 } else { delay };
                let result = report(finding, evidence, None);
                self.send_to_manager(delay, Event::Report(result));
            }
        }
    }

    /// The host's heartbeat records as the manager's storage reader sees them: it polls
    /// every renewal interval, so it may notice a change up to one interval late.
    fn heartbeat_observation(&mut self, target: usize, evidence_after: Instant) -> HeartbeatObservation {
        let lag = Duration::from_millis(self.rng.below(duration_ms(self.timing.lease_renew_interval()).max(1)));
        let host = &self.hosts[target];
        let record = match host.record {
            _ if !self.manager_storage_up => {
                RecordState::Unreadable { reason: "pool unreachable from the manager".to_owned() }
            }
            None => RecordState::Unreadable { reason: "no record yet".to_owned() },
            Some((boot, _, armed, stopped_cleanly)) => {
                let unchanged_for = self.now.saturating_since(host.record_changed_at).saturating_sub(lag);
                // The reader only knows the write happened after its previous read.
                let written_after = host.record_changed_at - self.timing.lease_renew_interval();
                if unchanged_for < self.timing.lease_renew_interval() * 2 && written_after > evidence_after {
                    RecordState::Advancing
                } else {
                    RecordState::Unchanged {
                        unchanged_for,
                        boot_id: BootId(format!("{}-b{boot}", host.spec.name)),
                        watchdog_armed: armed,
                        stopped_cleanly,
                    }
                }
            }
        };
        HeartbeatObservation {
            pools: host
                .spec
                .pools
                .iter()
                .map(|pool| PoolObservation { pool: pool.clone(), record: record.clone() })
                .collect(),
        }
    }

    fn fence(&mut self, target: usize, name: &HostName, fence: RequestId) {
        let delay = self.latency() + Duration::from_millis(self.rng.between(30, 200));
        let host = &self.hosts[target];
        if !host.oob_up || host.bmc == BmcCondition::Unreachable {
            return;
        }
        match host.bmc {
            BmcCondition::Failing => {
                let result = FenceResult {
                    host: name.clone(),
                    fence,
                    outcome: FenceOutcome::Failed { error: "completion code 0xd4: insufficient privilege".to_owned() },
                };
                self.send_to_manager(delay, Event::FenceResult(result));
            }
            condition => {
                let was_off = !host.powered;
                let late = if condition == BmcCondition::Slow {
                    self.timing.fence_attempt_timeout() * 2
                } else {
                    Duration::ZERO
                };
                self.schedule(self.now + delay / 2, Action::PowerOffLands(target));
                let outcome = if was_off {
                    FenceOutcome::AlreadyOff { evidence: "chassis power read back off".to_owned() }
                } else {
                    FenceOutcome::PoweredOff { evidence: "power off sent, read back off".to_owned() }
                };
                self.send_to_manager(
                    delay + late,
                    Event::FenceResult(FenceResult { host: name.clone(), fence, outcome }),
                );
            }
        }
    }

    fn outcome(self, seed: u64, profile: Profile) -> SimOutcome {
        let engine = self.engine.as_ref();
        let final_hosts = self
            .hosts
            .iter()
            .map(|host| {
                let state = engine.and_then(|engine| engine.host_state(&host.spec.name)).map(|state| state.to_string());
                (host.spec.name.to_string(), state.unwrap_or_else(|| "?".to_owned()))
            })
            .collect();
        let final_vms = self
            .vms
            .iter()
            .map(|vm| {
                let record = engine.and_then(|engine| engine.vms().get(&vm.spec.name));
                let text = record.map(|record| match &record.host {
                    Some(host) => format!("{} on {host}", record.state),
                    None => record.state.to_string(),
                });
                (vm.spec.name.to_string(), text.unwrap_or_else(|| "?".to_owned()))
            })
            .collect();
        SimOutcome {
            seed,
            hosts: self.hosts.len(),
            vms: self.vms.len(),
            profile,
            faults: self.faults,
            violations: self.violations,
            steps: self.steps,
            evacuations_finished: self.evacuations_finished,
            final_hosts,
            final_vms,
            trace: self.trace,
        }
    }

    // ----- the world at work ------------------------------------------------------------

    fn perform(&mut self, action: Action) {
        match action {
            Action::WorldTick => {
                self.world_tick();
                let next = self.now + self.tick_interval();
                self.schedule(next, Action::WorldTick);
            }
            Action::AgentPing(host, epoch) => {
                if self.hosts[host].agent_epoch != epoch || !self.hosts[host].agent_running {
                    return;
                }
                self.agent_ping(host);
                let next = self.now + self.timing.ping_interval();
                self.schedule(next, Action::AgentPing(host, epoch));
            }
            Action::AgentRenew(host, epoch) => {
                if self.hosts[host].agent_epoch != epoch || !self.hosts[host].agent_running {
                    return;
                }
                self.agent_renew(host);
                let next = self.now + self.timing.lease_renew_interval();
                self.schedule(next, Action::AgentRenew(host, epoch));
            }
            Action::ToManager(event) => self.feed(event),
            Action::PowerOffLands(host) => {
                if self.hosts[host].powered {
                    self.trace("world", || format!("host{} powered off by its BMC", host + 1));
                    self.power_off(host);
                }
            }
            Action::StartLands { host, work, vm, release } => self.start_lands(host, work, vm, release),
            Action::StopLands { host, work, vm } => self.stop_lands(host, work, vm),
            Action::Fault(fault) => self.apply_fault(fault),
            Action::ManagerUp => {
                let Some(snapshot) = self.persisted.take() else {
                    return;
                };
                let mut engine: Engine = serde_json::from_str(&snapshot).expect("engine state round-trips");
                #[cfg(test)]
                {
                    engine.planted_bug = self.planted_bug;
                }
                let commands = engine.step(self.now, Event::ManagerStarted);
                self.steps += 1;
                self.engine = Some(engine);
                self.trace("world", || "manager back".to_owned());
                self.execute(commands);
            }
        }
    }

    fn world_tick(&mut self) {
        for index in 0..self.hosts.len() {
            // Boots finishing.
            if let Some(at) = self.hosts[index].boots_at {
                if self.now >= at && self.hosts[index].powered {
                    self.hosts[index].boots_at = None;
                    self.start_agent(index);
                }
            }
            // Hardware watchdogs run on the host's own clock, hung or not.
            let host = &self.hosts[index];
            if host.powered
                && host.watchdog_armed
                && host.local(self.now.saturating_since(host.last_pet)) > self.timing.watchdog_timeout()
            {
                self.trace("world", || format!("host{} reset by its watchdog", index + 1));
                self.power_off(index);
                self.power_on(index);
            }
            let host = &mut self.hosts[index];
            let healthy = host.agent_alive() && host.storage_up;
            match (healthy, host.healthy_since) {
                (true, None) => host.healthy_since = Some(self.now),
                (false, Some(_)) => host.healthy_since = None,
                _ => {}
            }
        }
        self.feed(Event::Tick);
    }

    fn start_agent(&mut self, index: usize) {
        let now = self.now;
        let host = &mut self.hosts[index];
        if !host.powered || host.agent_running {
            return;
        }
        host.agent_running = true;
        host.agent_epoch += 1;
        host.self_fenced = false;
        if host.spec.has_watchdog && !host.disarmed {
            host.watchdog_armed = true;
            host.last_pet = now;
        }
        let epoch = host.agent_epoch;
        let stagger = Duration::from_millis(self.rng.below(duration_ms(self.timing.ping_interval()).max(1)));
        self.schedule(now + stagger, Action::AgentRenew(index, epoch));
        self.schedule(now + stagger, Action::AgentPing(index, epoch));
    }

    fn agent_ping(&mut self, index: usize) {
        let host = &self.hosts[index];
        if !host.active() || !host.mgmt_up {
            return;
        }
        if host.mgmt_loss > 0 && self.rng.percent(host.mgmt_loss) {
            return;
        }
        let host = &self.hosts[index];
        let boot = host.boot;
        let mut vms: Vec<VmReport> = self
            .vms
            .iter()
            .filter(|vm| vm.running_on.contains(&(index, boot)))
            .map(|vm| VmReport { name: vm.spec.name.clone(), state: VmRunState::Running, instance: vm.instance })
            .collect();
        for (vm, (state, instance)) in &host.reported_down {
            vms.push(VmReport { name: self.vms[*vm].spec.name.clone(), state: *state, instance: *instance });
        }
        let storage = if host.last_renew_failed { StorageHealth::AllFailing } else { StorageHealth::Ok };
        let ping = Ping { host: host.spec.name.clone(), boot_id: host.boot_id(), seq: host.ping_seq + 1, vms, storage };
        self.hosts[index].ping_seq += 1;
        let delay = self.latency();
        self.send_to_manager(delay, Event::Ping(ping));
        // The reply carries the directives (a lost reply is modelled by the same loss).
        if let Some(engine) = &self.engine {
            let directives = engine.directives();
            let validity = self.hosts[index].global(self.timing.storage_hold_validity());
            let host = &mut self.hosts[index];
            host.disarmed = directives.disarmed;
            if directives.storage_hold {
                host.hold_until = Some(self.now + validity);
            }
            if !directives.disarmed && host.spec.has_watchdog && !host.watchdog_armed && !host.self_fenced {
                // Arm first, then say so on storage at the next renewal.
                host.watchdog_armed = true;
                host.last_pet = self.now;
            }
        }
    }

    fn agent_renew(&mut self, index: usize) {
        let now = self.now;
        let timing = self.timing.clone();
        let host = &mut self.hosts[index];
        if !host.active() {
            return;
        }
        let boot = host.boot;
        if host.storage_up {
            // Disarming is recorded before the watchdog is released, never after.
            if host.disarmed && host.watchdog_armed {
                host.watchdog_armed = false;
            }
            let counter = host.record.map_or(0, |(_, counter, _, _)| counter) + 1;
            host.record = Some((boot, counter, host.watchdog_armed, false));
            host.record_changed_at = now;
            host.last_renew_ok = Some(now);
            host.last_renew_failed = false;
            for vm in &mut self.vms {
                if vm.running_on.contains(&(index, boot)) {
                    vm.lease = Some((index, boot, now));
                }
            }
        } else {
            host.last_renew_failed = true;
        }
        // Self-fencing: only with an armed watchdog and HA VMs to protect.
        let host = &self.hosts[index];
        let has_ha_vms = self.vms.iter().any(|vm| vm.spec.ha && vm.running_on.contains(&(index, boot)));
        if host.watchdog_armed && !host.self_fenced && has_ha_vms {
            if let Some(last_ok) = host.last_renew_ok {
                let since = host.hold_until.map_or(last_ok, |hold| hold.max(last_ok));
                if host.local(now.saturating_since(since)) > timing.self_fence_after() {
                    self.trace("world", || format!("host{} self-fences: leases not renewed", index + 1));
                    for (vm_index, vm) in self.vms.iter_mut().enumerate() {
                        if vm.running_on.contains(&(index, boot)) {
                            vm.running_on.retain(|entry| *entry != (index, boot));
                            self.hosts[index].reported_down.insert(vm_index, (VmRunState::SelfFenced, vm.instance));
                        }
                    }
                    self.hosts[index].self_fenced = true;
                }
            }
        }
        let host = &mut self.hosts[index];
        if host.watchdog_armed && !host.self_fenced {
            host.last_pet = now;
        }
    }

    fn start_lands(&mut self, index: usize, work: RequestId, vm: usize, release: Release) {
        let delay = self.latency();
        let fails = self.rng.percent(2);
        let host = &self.hosts[index];
        if !host.agent_alive() {
            return;
        }
        let boot = host.boot;
        let name = host.spec.name.clone();
        let vm_name = self.vms[vm].spec.name.clone();
        let reply =
            |outcome| Event::VmStartResult(VmStartResult { work, vm: vm_name.clone(), host: name.clone(), outcome });
        if self.vms[vm].running_on.contains(&(index, boot)) {
            let event = reply(VmStartOutcome::AlreadyRunning);
            if self.hosts[index].commands_up {
                self.send_to_manager(delay, event);
            }
            return;
        }
        let outcome = if !host.storage_up {
            VmStartOutcome::Failed { reason: "shared storage unreachable".to_owned() }
        } else if fails {
            VmStartOutcome::Failed { reason: "qemu exited during start".to_owned() }
        } else if let Some(owner) = self.lease_blocker(index, vm, &release) {
            VmStartOutcome::LeaseHeld { owner }
        } else {
            let vm_record = &mut self.vms[vm];
            vm_record.running_on.push((index, boot));
            vm_record.lease = Some((index, boot, self.now));
            vm_record.instance = Some(work);
            let host = &mut self.hosts[index];
            host.reported_down.remove(&vm);
            host.last_renew_ok = Some(self.now);
            self.trace("world", || format!("{vm_name} started on {name}"));
            self.check_double_run(vm);
            VmStartOutcome::Started
        };
        if self.hosts[index].commands_up {
            self.send_to_manager(delay, reply(outcome));
        }
    }

    /// The agent stops a VM on purpose: the VM is off at once; its lease is released when
    /// the storage can be written, otherwise it expires like any lease nobody renews.
    fn stop_lands(&mut self, index: usize, work: RequestId, vm: usize) {
        let host = &self.hosts[index];
        if !host.agent_alive() {
            return;
        }
        let (boot, storage_up, name) = (host.boot, host.storage_up, host.spec.name.clone());
        let vm_record = &mut self.vms[vm];
        if vm_record.running_on.contains(&(index, boot)) {
            vm_record.running_on.retain(|entry| *entry != (index, boot));
            if storage_up && vm_record.lease.is_some_and(|(owner, owner_boot, _)| (owner, owner_boot) == (index, boot))
            {
                vm_record.lease = None;
            }
            let instance = vm_record.instance;
            let vm_name = vm_record.spec.name.clone();
            self.hosts[index].reported_down.insert(vm, (VmRunState::Stopped, instance));
            self.trace("world", || format!("{vm_name} stopped on {name}"));
        }
        let vm_name = self.vms[vm].spec.name.clone();
        let event =
            Event::VmStopResult(VmStopResult { work, vm: vm_name, host: name, outcome: VmStopOutcome::Stopped });
        if self.hosts[index].commands_up {
            let delay = self.latency();
            self.send_to_manager(delay, event);
        }
    }

    /// The agent's lease acquisition: the last line of defence. Returns the live owner
    /// that blocks the start, if any.
    fn lease_blocker(&self, index: usize, vm: usize, release: &Release) -> Option<String> {
        let (owner, owner_boot, renewed) = self.vms[vm].lease?;
        if owner == index && owner_boot == self.hosts[index].boot {
            return None;
        }
        let owner_name = &self.hosts[owner].spec.name;
        let owner_boot_id = BootId(format!("{owner_name}-b{owner_boot}"));
        let expired = self.hosts[index].local(self.now.saturating_since(renewed)) >= self.timing.lease_takeover_after();
        if expired {
            return None;
        }
        let released = match release {
            Release::HostDead(proof) => {
                proof.kind() != ProofKind::LeaseExpired
                    && proof.host() == owner_name
                    && proof.boot_id().is_none_or(|boot| *boot == owner_boot_id)
            }
            // The owner's own word frees the lease only for a boot that is gone; a live
            // boot releases its lease itself (or lets it expire) when it stops the VM.
            Release::ReportedNotRunning { host, boot_id, .. } => host == owner_name && *boot_id != owner_boot_id,
        };
        if released {
            None
        } else {
            Some(format!("{owner_boot_id} (renewed {}ms ago)", duration_ms(self.now.saturating_since(renewed))))
        }
    }

    fn power_off(&mut self, index: usize) {
        let host = &mut self.hosts[index];
        host.powered = false;
        host.hung = false;
        host.agent_running = false;
        host.agent_epoch += 1;
        host.watchdog_armed = false;
        host.boots_at = None;
        host.last_renew_ok = None;
        host.last_renew_failed = false;
        host.hold_until = None;
        host.self_fenced = false;
        host.reported_down.clear();
        host.ping_seq = 0;
        host.healthy_since = None;
        for vm in &mut self.vms {
            vm.running_on.retain(|(host, _)| *host != index);
        }
    }

    fn power_on(&mut self, index: usize) {
        let boot_delay = Duration::from_millis(self.rng.between(1_000, 3_000));
        let host = &mut self.hosts[index];
        if host.powered {
            return;
        }
        host.powered = true;
        host.boot += 1;
        host.boots_at = Some(self.now + boot_delay);
    }

    fn describe_fault(&self, fault: &Fault) -> String {
        let name = |index: &usize| self.hosts.get(*index).map_or("?", |host| host.spec.name.as_str()).to_owned();
        match fault {
            Fault::PowerOff(host) => format!("power-off {}", name(host)),
            Fault::PowerOn(host) => format!("power-on {}", name(host)),
            Fault::Hang(host) => format!("hang {}", name(host)),
            Fault::Resume(host) => format!("resume {}", name(host)),
            Fault::AgentKill(host) => format!("agent-kill {}", name(host)),
            Fault::AgentStop(host) => format!("agent-stop {}", name(host)),
            Fault::AgentStart(host) => format!("agent-start {}", name(host)),
            Fault::Partition(host, net) => format!("partition {} {net:?}", name(host)),
            Fault::Loss(host, percent) => format!("loss {} mgmt {percent}%", name(host)),
            Fault::HealHost(host) => format!("heal {}", name(host)),
            Fault::Bmc(host, condition) => format!("bmc {} {condition:?}", name(host)),
            Fault::VmCrash(vm) => format!("vm-crash {}", self.vms.get(*vm).map_or("?", |vm| vm.spec.name.as_str())),
            Fault::ManagerRestart { down_ms } => format!("manager-restart (down {down_ms}ms)"),
            Fault::StorageOutage => "storage outage on every host".to_owned(),
            Fault::StorageBack => "storage back on every host".to_owned(),
            Fault::ConfirmDown(host) => format!("operator confirm-down {}", name(host)),
            Fault::PartitionAndAgentKill(host) => format!("partition {} mgmt + agent-kill", name(host)),
            Fault::DoublePowerOff(first, second) => format!("power-off {} and {}", name(first), name(second)),
            Fault::ManagerCutOff => {
                "manager cut off from management and storage networks (out-of-band kept)".to_owned()
            }
            Fault::Maintenance(host, on) => format!("maintenance {} {}", name(host), if *on { "on" } else { "off" }),
            Fault::Disarm => "cluster disarm".to_owned(),
            Fault::Arm => "cluster arm".to_owned(),
            Fault::HealAll => "heal everything".to_owned(),
        }
    }

    fn apply_fault(&mut self, fault: Fault) {
        let text = self.describe_fault(&fault);
        self.faults.push(TraceLine { at_ms: self.now.as_millis(), source: "fault", text: text.clone() });
        self.trace("fault", || text);
        match fault {
            Fault::PowerOff(host) => self.power_off(host),
            Fault::PowerOn(host) => self.power_on(host),
            Fault::Hang(host) => self.hosts[host].hung = self.hosts[host].powered,
            Fault::Resume(host) => {
                if self.hosts[host].hung {
                    self.hosts[host].hung = false;
                    // Loops resume where they were; the agent's first renewal checks its
                    // self-fence deadline before anything else.
                    if self.hosts[host].agent_running {
                        let epoch = self.hosts[host].agent_epoch;
                        self.agent_renew(host);
                        self.schedule(self.now, Action::AgentPing(host, epoch));
                    }
                }
            }
            Fault::AgentKill(host) => {
                let host = &mut self.hosts[host];
                host.agent_running = false;
                host.agent_epoch += 1;
            }
            Fault::AgentStop(index) => {
                let host = &mut self.hosts[index];
                if !host.agent_alive() {
                    return;
                }
                // "Stopped cleanly, watchdog disarmed" is written first; if it cannot be
                // written, the watchdog stays armed and will reset the host.
                if host.storage_up {
                    let counter = host.record.map_or(0, |(_, counter, _, _)| counter) + 1;
                    host.record = Some((host.boot, counter, false, true));
                    host.record_changed_at = self.now;
                    host.watchdog_armed = false;
                }
                host.agent_running = false;
                host.agent_epoch += 1;
                if host.mgmt_up {
                    let event = Event::AgentGoodbye { host: host.spec.name.clone(), boot_id: host.boot_id() };
                    let delay = self.latency();
                    self.send_to_manager(delay, event);
                }
            }
            Fault::AgentStart(host) => {
                if self.hosts[host].active() {
                    self.start_agent(host);
                }
            }
            Fault::Partition(index, net) => {
                let host = &mut self.hosts[index];
                match net {
                    Net::Mgmt => {
                        host.mgmt_up = false;
                        host.commands_up = false;
                    }
                    Net::MgmtInbound => host.commands_up = false,
                    Net::MgmtOutbound => host.mgmt_up = false,
                    Net::Storage => host.storage_up = false,
                    Net::Oob => host.oob_up = false,
                    Net::All => {
                        host.mgmt_up = false;
                        host.commands_up = false;
                        host.storage_up = false;
                        host.oob_up = false;
                    }
                }
            }
            Fault::Loss(host, percent) => self.hosts[host].mgmt_loss = percent,
            Fault::HealHost(index) => {
                let host = &mut self.hosts[index];
                host.mgmt_up = true;
                host.commands_up = true;
                host.storage_up = true;
                host.oob_up = true;
                host.mgmt_loss = 0;
            }
            Fault::Bmc(host, condition) => self.hosts[host].bmc = condition,
            Fault::VmCrash(vm) => {
                if let Some(&(host, boot)) = self.vms.get(vm).and_then(|vm| vm.running_on.first()) {
                    self.vms[vm].running_on.retain(|entry| *entry != (host, boot));
                    if self.hosts[host].storage_up {
                        self.vms[vm].lease = None;
                    }
                    let instance = self.vms[vm].instance;
                    self.hosts[host].reported_down.insert(vm, (VmRunState::Crashed, instance));
                }
            }
            Fault::ManagerRestart { down_ms } => {
                if let Some(engine) = self.engine.take() {
                    self.persisted = Some(serde_json::to_string(&engine).expect("engine state serializes"));
                    self.schedule(self.now + Duration::from_millis(down_ms), Action::ManagerUp);
                }
            }
            Fault::StorageOutage => {
                for host in &mut self.hosts {
                    host.storage_up = false;
                }
            }
            Fault::StorageBack => {
                for host in &mut self.hosts {
                    host.storage_up = true;
                }
            }
            Fault::ConfirmDown(index) => {
                // A careful operator: confirms only a host that is really off.
                if !self.hosts[index].powered {
                    let host = self.hosts[index].spec.name.clone();
                    self.feed(Event::Operator(OperatorAction::ConfirmDown { host, by: "sim-operator".to_owned() }));
                }
            }
            Fault::PartitionAndAgentKill(index) => {
                self.apply_fault(Fault::Partition(index, Net::Mgmt));
                self.apply_fault(Fault::AgentKill(index));
            }
            Fault::DoublePowerOff(first, second) => {
                self.power_off(first);
                self.power_off(second);
            }
            Fault::ManagerCutOff => {
                // The manager keeps only its out-of-band link: every BMC still answers it.
                self.manager_storage_up = false;
                for host in &mut self.hosts {
                    host.mgmt_up = false;
                    host.commands_up = false;
                }
            }
            Fault::Maintenance(index, on) => {
                let host = self.hosts[index].spec.name.clone();
                self.feed(Event::Operator(OperatorAction::Maintenance { host, on, by: "sim-operator".to_owned() }));
            }
            Fault::Disarm => self.feed(Event::Operator(OperatorAction::Disarm { by: "sim-operator".to_owned() })),
            Fault::Arm => self.feed(Event::Operator(OperatorAction::Arm { by: "sim-operator".to_owned() })),
            Fault::HealAll => self.heal_all(),
        }
    }

    /// Every fault repaired: networks, BMCs, storage, hung hosts, agents, the manager, the
    /// operator's switches. Powered-off hosts stay off unless the seed powers them on.
    fn heal_all(&mut self) {
        self.healed = true;
        self.manager_storage_up = true;
        if self.engine.is_none() {
            self.perform(Action::ManagerUp);
        }
        for index in 0..self.hosts.len() {
            let power_on = !self.hosts[index].powered && self.rng.percent(50);
            let host = &mut self.hosts[index];
            host.mgmt_up = true;
            host.commands_up = true;
            host.storage_up = true;
            host.oob_up = true;
            host.mgmt_loss = 0;
            host.bmc = BmcCondition::Ok;
            if power_on {
                self.power_on(index);
            }
            if self.hosts[index].hung {
                self.apply_fault(Fault::Resume(index));
            }
            if self.hosts[index].active() && !self.hosts[index].agent_running && self.hosts[index].boots_at.is_none() {
                self.start_agent(index);
            }
            let host = self.hosts[index].spec.name.clone();
            if self.engine.as_ref().and_then(|engine| engine.host_state(&host)) == Some(HostState::Maintenance) {
                self.feed(Event::Operator(OperatorAction::Maintenance {
                    host,
                    on: false,
                    by: "sim-operator".to_owned(),
                }));
            }
        }
        if self.engine.as_ref().is_some_and(|engine| engine.directives().disarmed) {
            self.feed(Event::Operator(OperatorAction::Arm { by: "sim-operator".to_owned() }));
        }
    }
}

/// Runs `count` seeds from `first`, spread over the machine's cores, and returns the
/// outcomes that broke an invariant, with totals.
pub fn run_many(first: u64, count: u64, threads: usize) -> (u64, u64, Vec<SimOutcome>) {
    run_many_with(first, count, threads, &SimOptions::new)
}

/// `run_many` with the options of each seed made by `options`.
pub fn run_many_with(
    first: u64,
    count: u64,
    threads: usize,
    options: &(dyn Fn(u64) -> SimOptions + Sync),
) -> (u64, u64, Vec<SimOutcome>) {
    let threads = threads.max(1) as u64;
    let results: Vec<(u64, u64, Vec<SimOutcome>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|worker| {
                scope.spawn(move || {
                    let mut schedules = 0;
                    let mut steps = 0;
                    let mut failures = Vec::new();
                    let mut seed = first + worker;
                    while seed < first + count {
                        let outcome = run(&options(seed));
                        schedules += 1;
                        steps += outcome.steps;
                        if !outcome.violations.is_empty() {
                            failures.push(outcome);
                        }
                        seed += threads;
                    }
                    (schedules, steps, failures)
                })
            })
            .collect();
        handles.into_iter().map(|handle| handle.join().expect("simulation worker panicked")).collect()
    });
    let mut total = (0, 0, Vec::new());
    for (schedules, steps, failures) in results {
        total.0 += schedules;
        total.1 += steps;
        total.2.extend(failures);
    }
    total.2.sort_by_key(|outcome| outcome.seed);
    total
}

#[cfg(test)]
mod tests;
