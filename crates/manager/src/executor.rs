//! Executes the engine's commands against the world and feeds the outcomes back.
//!
//! Every external call is bounded by the command's deadline. The storage heartbeat is
//! read directly on the pools the manager mounts ([`crate::heartbeat`]) and through
//! neighbours for pools it does not ([`crate::neighbour_heartbeat`]); VM activity reads
//! the hosts' VM leases on the mounted pools ([`crate::vm_activity`]).

use crate::config::{BmcConfig, BmcKind, ManagerConfig};
use crate::controller::{Clock, Controller, Note, SharedDirectory};
use crate::leader::Leadership;
use crate::registry::{SharedRegistry, VmRow};
use crate::ManagerError;
use kvmha_bmc::ipmi::{IpmiClient, IpmiConfig};
use kvmha_bmc::redfish::{RedfishClient, RedfishConfig, RedfishTls};
use kvmha_bmc::{PowerControl, PowerState};
use kvmha_core::event::{AuditKind, Ping, Release, RequestId, VmRunState};
use kvmha_core::event::{
    FenceOutcome, FenceResult, Finding, HeartbeatObservation, InvestigatorKind, InvestigatorReport, VmStartOutcome,
    VmStartResult, VmStopOutcome, VmStopResult,
};
use kvmha_core::model::Resources;
use kvmha_core::{Command, Event, HostName, HostSpec, Instant, VmName};
use kvmha_proto::{AgentCommand, CommandRequest, CommandResponse, CommandResult, LeaseGrant, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// VM starts in flight at once. The engine emits starts in priority order; the worker
/// begins them in that order and lets this many run side by side.
pub const MAX_CONCURRENT_STARTS: usize = 4;
/// Budget of one registry sync call to an agent (`ListVms`, `GetVmDefinition`).
const SYNC_BUDGET: Duration = Duration::from_secs(10);
/// A host's inventory is read again at most this often while its pings name VMs the
/// registry does not know (or knows without a definition).
const SYNC_EVERY: Duration = Duration::from_secs(15);

/// Smallest budget given to any external call, so that a deadline already passed still
/// gets one quick try rather than none.
const MIN_CALL_BUDGET: Duration = Duration::from_millis(50);
/// Longest graceful shutdown a maintenance move waits for before the hard stop.
const MAX_GRACEFUL_STOP: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Executor {
    config: ManagerConfig,
    clock: Clock,
    directory: SharedDirectory,
    /// HTTPS client presenting the manager's certificate to agents.
    agents: reqwest::Client,
    controller: OnceLock<Controller>,
    next_request: AtomicU64,
    heartbeats: crate::heartbeat::HeartbeatReader,
    vm_activity: crate::vm_activity::VmActivityReader,
    registry: SharedRegistry,
    /// The recovery worker's queue: `StartVm` commands in the engine's order.
    starts: mpsc::UnboundedSender<Command>,
    start_queue: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
    /// When each host's inventory was last read (registry sync).
    synced: Mutex<BTreeMap<HostName, std::time::Instant>>,
    /// etcd backend: every fence and VM start is first recorded under the leader's epoch.
    leadership: OnceLock<Leadership>,
}

/// What the leader records (etcd `intent/fence/<host>`) before it fences, and after.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FenceIntent {
    pub fence: RequestId,
    pub epoch: i64,
    /// `None`: about to fence (or fencing, or died while fencing: outcome unknown).
    pub outcome: Option<FenceOutcome>,
}

/// What the leader records (etcd `intent/start/<vm>`) before it starts a VM, and after.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StartIntent {
    pub work: RequestId,
    pub target: HostName,
    pub epoch: i64,
    pub outcome: Option<VmStartOutcome>,
}

/// Whether the leader may go ahead with an action.
#[derive(Debug)]
enum Gate<T> {
    /// Intent recorded under a current epoch: act.
    Go(i64),
    /// The same work item already has a confirmed outcome: feed it, do not act again.
    Done(T),
    Refused(String),
}

impl Executor {
    pub fn new(
        config: ManagerConfig,
        clock: Clock,
        directory: SharedDirectory,
        registry: SharedRegistry,
    ) -> Result<Executor, crate::ManagerError> {
        let agents = kvmha_proto::transport::client(
            &config.ca_cert_pem,
            Some((&config.cert_pem, &config.key_pem)),
            Duration::from_secs(30),
        )?;
        let (starts, start_queue) = mpsc::unbounded_channel();
        let heartbeats = crate::heartbeat::HeartbeatReader::start(&config).map_err(|reason| ManagerError::Config {
            file: config.file.clone(),
            field: "pools".to_owned(),
            problem: reason,
        })?;
        let vm_activity = crate::vm_activity::VmActivityReader::start(&config).map_err(|reason| {
            ManagerError::Config { file: config.file.clone(), field: "pools".to_owned(), problem: reason }
        })?;
        Ok(Executor {
            vm_activity,
            config,
            clock,
            directory,
            agents,
            controller: OnceLock::new(),
            next_request: AtomicU64::new(1),
            heartbeats,
            registry,
            starts,
            start_queue: Mutex::new(Some(start_queue)),
            synced: Mutex::new(BTreeMap::new()),
            leadership: OnceLock::new(),
        })
    }

    /// Sets the engine handle and starts the recovery worker. Call once, in the runtime.
    pub fn set_controller(self: &Arc<Self>, controller: Controller) {
        let _ = self.controller.set(controller);
        if let Some(queue) = self.start_queue.lock().expect("queue lock").take() {
            tokio::spawn(self.clone().recovery_worker(queue));
        }
    }

    pub fn controller(&self) -> Option<&Controller> {
        self.controller.get()
    }

    /// With etcd: fences and starts are gated by this manager's leadership.
    pub fn set_leadership(&self, leadership: Leadership) {
        let _ = self.leadership.set(leadership);
    }

    /// The fence gate: reads the host's intent record first, so that a fence a previous
    /// leader confirmed (same fence id) is fed back instead of repeated.
    async fn fence_gate(&self, leadership: &Leadership, host: &HostName, fence: RequestId) -> Gate<FenceOutcome> {
        let key = format!("intent/fence/{host}");
        let recorded = match leadership.read(&key).await {
            Ok(value) => value.and_then(|bytes| serde_json::from_slice::<FenceIntent>(&bytes).ok()),
            Err(error) => return Gate::Refused(format!("fence intent of {host} unreadable: {error}")),
        };
        if let Some(FenceIntent { outcome: Some(outcome), epoch, .. }) = recorded.filter(|intent| intent.fence == fence)
        {
            if matches!(outcome, FenceOutcome::PoweredOff { .. } | FenceOutcome::AlreadyOff { .. }) {
                tracing::info!(%host, %fence, epoch, "fence already confirmed under an earlier epoch: not repeated");
                return Gate::Done(outcome);
            }
        }
        let Ok(epoch) = leadership.may_act() else { return Gate::Refused("not acting: leadership".into()) };
        let intent = FenceIntent { fence, epoch, outcome: None };
        match leadership.record(&key, serde_json::to_vec(&intent).unwrap_or_default()).await {
            Ok(epoch) => Gate::Go(epoch),
            Err(refused) => Gate::Refused(refused.0),
        }
    }

    /// The start gate: a start of the same work item a previous leader saw succeed is fed
    /// back instead of sent again. A start recorded without an outcome (the leader died
    /// or its answer was lost) is sent again: the agent answers `AlreadyRunning` if it did
    /// start, and the VM's storage lease refuses a second instance anywhere else.
    async fn start_gate(
        &self,
        leadership: &Leadership,
        vm: &VmName,
        work: RequestId,
        target: &HostName,
    ) -> Gate<VmStartOutcome> {
        let key = format!("intent/start/{vm}");
        let recorded = match leadership.read(&key).await {
            Ok(value) => value.and_then(|bytes| serde_json::from_slice::<StartIntent>(&bytes).ok()),
            Err(error) => return Gate::Refused(format!("start intent of {vm} unreadable: {error}")),
        };
        if let Some(StartIntent { outcome: Some(outcome), epoch, .. }) =
            recorded.filter(|intent| intent.work == work && intent.target == *target)
        {
            if matches!(outcome, VmStartOutcome::Started | VmStartOutcome::AlreadyRunning) {
                tracing::info!(%vm, %work, epoch, "start already confirmed under an earlier epoch: not sent again");
                return Gate::Done(outcome);
            }
        }
        let Ok(epoch) = leadership.may_act() else { return Gate::Refused("not acting: leadership".into()) };
        let intent = StartIntent { work, target: target.clone(), epoch, outcome: None };
        match leadership.record(&key, serde_json::to_vec(&intent).unwrap_or_default()).await {
            Ok(epoch) => Gate::Go(epoch),
            Err(refused) => Gate::Refused(refused.0),
        }
    }

    /// Records an outcome next to its intent (best effort: a lost record only means the
    /// next leader asks the BMC or the agent again, which answers "already off/running").
    async fn record_outcome<T: Serialize>(&self, key: String, record: &T) {
        if let Some(leadership) = self.leadership.get() {
            if let Err(refused) = leadership.record(&key, serde_json::to_vec(record).unwrap_or_default()).await {
                tracing::warn!(key, %refused, "outcome not recorded");
            }
        }
    }

    async fn note(&self, host: Option<HostName>, vm: Option<VmName>, detail: String) {
        if let Some(controller) = self.controller.get() {
            let note = Note { host, vm, kind: AuditKind::Manager, detail };
            if let Err(error) = controller.audit(vec![note]).await {
                tracing::warn!(%error, "audit line not written");
            }
        }
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// Runs one engine command. Called by the engine thread in the engine's order: VM
    /// starts go to the recovery worker's queue so that they begin in that order; every
    /// other command runs at once.
    pub fn dispatch(self: &Arc<Self>, runtime: &tokio::runtime::Handle, command: Command) {
        if matches!(command, Command::StartVm { .. }) {
            if self.starts.send(command).is_err() {
                tracing::error!("recovery worker gone: start dropped (the engine resends it at its deadline)");
            }
            return;
        }
        let executor = self.clone();
        runtime.spawn(async move { executor.execute(command).await });
    }

    /// Begins starts strictly in queue order; at most [`MAX_CONCURRENT_STARTS`] run at
    /// once (the semaphore hands out permits first come, first served).
    async fn recovery_worker(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<Command>) {
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_STARTS));
        while let Some(command) = queue.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let executor = self.clone();
            tokio::spawn(async move {
                executor.execute(command).await;
                drop(permit);
            });
        }
    }

    /// The spec of a joining host, from what manager.toml says about it.
    pub fn host_spec(&self, name: &HostName) -> HostSpec {
        let configured = self.config.hosts.get(name);
        HostSpec {
            name: name.clone(),
            networks: vec!["mgmt".to_owned()],
            // The agent's join reports the capacity (server.rs); a host re-added from the
            // store alone has none until it joins again, so nothing is placed there.
            capacity: Resources { cpus: 0, memory_mb: 0 },
            has_bmc: configured.is_some_and(|host| host.bmc.is_some()),
            has_watchdog: configured.is_some_and(|host| host.watchdog),
            pools: configured.map(|host| host.pools.clone()).unwrap_or_default(),
        }
    }

    async fn feed(&self, event: Event) {
        match self.controller.get() {
            Some(controller) => controller.feed(event).await,
            None => tracing::warn!("executor has no controller: outcome dropped"),
        }
    }

    fn budget(&self, deadline: Instant) -> Duration {
        self.clock.until(deadline).max(MIN_CALL_BUDGET)
    }

    pub async fn execute(self: Arc<Self>, command: Command) {
        match command {
            Command::Audit(_) => {}
            // evidence_after matters to the heartbeat investigator; neighbour pings and BMC
            // reads look at the present.
            Command::Investigate { host, investigation, round, kinds, neighbours, deadline, evidence_after } => {
                let evidence_after = self.clock.to_std(evidence_after);
                tracing::info!(%host, %investigation, round, ?kinds, "investigating");
                for kind in kinds {
                    let executor = self.clone();
                    let (host, neighbours) = (host.clone(), neighbours.clone());
                    tokio::spawn(async move {
                        let Some((finding, evidence, heartbeat)) =
                            executor.investigate(kind, &host, &neighbours, deadline, evidence_after).await
                        else {
                            return;
                        };
                        let report = InvestigatorReport { host, investigation, kind, finding, evidence, heartbeat };
                        executor.feed(Event::Report(report)).await;
                    });
                }
            }
            Command::Fence { host, fence, attempt, deadline } => {
                let mut epoch = None;
                if let Some(leadership) = self.leadership.get() {
                    match self.fence_gate(leadership, &host, fence).await {
                        Gate::Go(current) => epoch = Some(current),
                        Gate::Done(outcome) => {
                            let detail = format!("fence {fence} already confirmed by an earlier leader: not repeated");
                            self.note(Some(host.clone()), None, detail).await;
                            self.feed(Event::FenceResult(FenceResult { host, fence, outcome })).await;
                            return;
                        }
                        Gate::Refused(reason) => {
                            return tracing::warn!(%host, %fence, %reason, "not fencing: intent not recorded");
                        }
                    }
                }
                tracing::info!(%host, %fence, attempt, ?epoch, "fencing");
                let outcome = self.fence(&host, deadline).await;
                if let Some(epoch) = epoch {
                    let record = FenceIntent { fence, epoch, outcome: Some(outcome.clone()) };
                    self.record_outcome(format!("intent/fence/{host}"), &record).await;
                }
                self.feed(Event::FenceResult(FenceResult { host, fence, outcome })).await;
            }
            Command::StartVm { work, vm, target, release, deadline } => {
                let mut epoch = None;
                if let Some(leadership) = self.leadership.get() {
                    match self.start_gate(leadership, &vm, work, &target).await {
                        Gate::Go(current) => epoch = Some(current),
                        Gate::Done(outcome) => {
                            let detail = format!(
                                "start {work} on {target} already confirmed by an earlier leader: not sent again"
                            );
                            self.note(Some(target.clone()), Some(vm.clone()), detail).await;
                            self.feed(Event::VmStartResult(VmStartResult { work, vm, host: target, outcome })).await;
                            return;
                        }
                        Gate::Refused(reason) => {
                            return tracing::warn!(%vm, %work, %reason, "not starting: intent not recorded");
                        }
                    }
                }
                let outcome = self.start_vm(work, vm.clone(), target.clone(), release, deadline).await;
                if let (Some(epoch), Some(outcome)) = (epoch, outcome) {
                    let record = StartIntent { work, target, epoch, outcome: Some(outcome) };
                    self.record_outcome(format!("intent/start/{vm}"), &record).await;
                }
            }
            Command::StopVm { work, vm, host, deadline } => {
                if let Some(Err(refused)) = self.leadership.get().map(Leadership::may_act) {
                    return tracing::warn!(%vm, %host, %refused, "not stopping vm");
                }
                tracing::info!(%vm, %host, %work, "stopping vm to move it off for maintenance");
                // Half the budget for the guest to shut down by itself; the agent then stops
                // it hard, so it is off either way before the deadline.
                let graceful = (self.budget(deadline) / 2).min(MAX_GRACEFUL_STOP);
                let command = AgentCommand::StopVm { vm: vm.clone(), graceful_ms: graceful.as_millis() as u64 };
                let outcome = match self.send(&host, command, deadline).await {
                    Ok(CommandResult::Done) => VmStopOutcome::Stopped,
                    Ok(CommandResult::Unsupported { reason }) | Ok(CommandResult::Failed { reason }) => {
                        VmStopOutcome::Failed { reason }
                    }
                    Ok(other) => VmStopOutcome::Failed { reason: format!("unexpected answer {other:?}") },
                    Err(reason) => VmStopOutcome::Failed { reason },
                };
                self.feed(Event::VmStopResult(VmStopResult { work, vm, host, outcome })).await;
            }
            // Agents receive directives with every ping reply.
            Command::Directives(directives) => tracing::info!(?directives, "cluster directives changed"),
            Command::Alert(alert) => {
                tracing::warn!(severity = ?alert.severity, host = ?alert.host, "alert: {}", alert.message)
            }
        }
    }

    /// One start of the recovery worker: the target agent takes the VM's lease as the
    /// release allows, defines the VM from the registry's XML if it does not know it, and
    /// starts it. An answer is fed back as `VmStartResult`; no answer (timeout, no
    /// connection) feeds nothing: the VM stays bound to the target and the engine sends
    /// the same work item again at its deadline, which the agent answers `AlreadyRunning`
    /// if the first one did start it. So a start is never taken for failed while it may
    /// have happened.
    pub async fn start_vm(
        &self,
        work: kvmha_core::event::RequestId,
        vm: VmName,
        target: HostName,
        release: Release,
        deadline: Instant,
    ) -> Option<VmStartOutcome> {
        let xml = self.registry.read().expect("registry lock").get(&vm).and_then(|row| row.xml.clone());
        let lease = lease_grant(&release);
        tracing::info!(%vm, %target, %work, release = %release.describe(), definition = xml.is_some(), "starting vm");
        let command = AgentCommand::StartVm { vm: vm.clone(), work: work.0, xml, lease };
        let outcome = match self.send(&target, command, deadline).await {
            Ok(answer) => start_outcome(answer),
            Err(reason) => {
                tracing::warn!(%vm, %target, %work, %reason, "no answer to the start: the engine sends it again at its deadline");
                return None;
            }
        };
        if matches!(outcome, VmStartOutcome::Started | VmStartOutcome::AlreadyRunning) {
            self.remember_host(&vm, &target).await;
        }
        self.feed(Event::VmStartResult(VmStartResult { work, vm, host: target, outcome: outcome.clone() })).await;
        Some(outcome)
    }

    /// The registry's last host of `vm` becomes `host` (where it was started).
    pub async fn remember_host(&self, vm: &VmName, host: &HostName) {
        let row = self.registry.read().expect("registry lock").get(vm).cloned();
        let Some(mut row) = row else { return };
        if row.last_host.as_ref() == Some(host) {
            return;
        }
        row.last_host = Some(host.clone());
        if let Some(controller) = self.controller.get() {
            if let Err(error) = controller.upsert_vm(row, None, Vec::new()).await {
                tracing::warn!(%vm, %error, "registry: last host not recorded");
            }
        }
    }

    /// A ping names VMs: those the registry does not know, or knows without a definition,
    /// make the manager read the host's inventory (at most every [`SYNC_EVERY`] per host).
    pub fn learn_from_ping(self: &Arc<Self>, ping: &Ping) {
        let unknown = {
            let registry = self.registry.read().expect("registry lock");
            ping.vms.iter().any(|report| registry.get(&report.name).is_none_or(|row| row.xml.is_none()))
        };
        if !unknown {
            return;
        }
        {
            let mut synced = self.synced.lock().expect("sync lock");
            let now = std::time::Instant::now();
            if synced.get(&ping.host).is_some_and(|at| now.duration_since(*at) < SYNC_EVERY) {
                return;
            }
            synced.insert(ping.host.clone(), now);
        }
        let executor = self.clone();
        let host = ping.host.clone();
        tokio::spawn(async move { executor.sync_host(&host).await });
    }

    /// Reads `host`'s inventory and definitions into the registry. VMs new to it are added
    /// with HA off; a VM the registry knows keeps its HA settings.
    pub async fn sync_host(&self, host: &HostName) {
        let deadline = self.clock.now() + SYNC_BUDGET;
        let inventory = match self.send(host, AgentCommand::ListVms, deadline).await {
            Ok(CommandResult::Vms { vms }) => vms,
            Ok(other) => return tracing::warn!(%host, "registry sync: ListVms answered {other:?}"),
            Err(reason) => return tracing::warn!(%host, %reason, "registry sync: ListVms failed"),
        };
        for found in inventory {
            let name = found.report.name.clone();
            let known = self.registry.read().expect("registry lock").get(&name).cloned();
            if known.as_ref().is_some_and(|row| row.xml.is_some()) {
                continue;
            }
            let xml = match self.send(host, AgentCommand::GetVmDefinition { vm: name.clone() }, deadline).await {
                Ok(CommandResult::Definition { xml }) => Some(xml),
                Ok(other) => {
                    tracing::warn!(%host, vm = %name, "registry sync: GetVmDefinition answered {other:?}");
                    None
                }
                Err(reason) => {
                    tracing::warn!(%host, vm = %name, %reason, "registry sync: GetVmDefinition failed");
                    None
                }
            };
            if known.is_some() && xml.is_none() {
                continue;
            }
            let running = found.report.state == VmRunState::Running;
            let is_new = known.is_none();
            let mut row = known.unwrap_or_else(|| VmRow::new(name.clone()));
            row.vcpus = found.vcpus;
            row.memory_mb = found.memory_mb;
            if xml.is_some() {
                row.xml = xml;
            }
            if running || row.last_host.is_none() {
                row.last_host = Some(host.clone());
            }
            let detail = if is_new {
                format!(
                    "registry: found on {host} ({:?}, {} vcpus, {} MiB, definition {}); HA off until an operator enables it",
                    found.report.state,
                    found.vcpus,
                    found.memory_mb,
                    if row.xml.is_some() { "kept" } else { "not available" }
                )
            } else {
                format!("registry: definition read from {host}")
            };
            let notes =
                vec![Note { host: Some(host.clone()), vm: Some(name.clone()), kind: AuditKind::Manager, detail }];
            let Some(controller) = self.controller.get() else { return };
            if let Err(error) = controller.upsert_vm(row, running.then(|| host.clone()), notes).await {
                tracing::warn!(%host, vm = %name, %error, "registry sync: row not written");
            }
        }
    }

    /// One investigator's finding, or `None` when it cannot run here (not reported).
    async fn investigate(
        self: &Arc<Self>,
        kind: InvestigatorKind,
        host: &HostName,
        neighbours: &[HostName],
        deadline: Instant,
        evidence_after: std::time::Instant,
    ) -> Option<(Finding, String, Option<HeartbeatObservation>)> {
        let without_heartbeat = |(finding, evidence): (Finding, String)| Some((finding, evidence, None));
        match kind {
            InvestigatorKind::NeighbourPing => without_heartbeat(self.neighbour_ping(host, neighbours, deadline).await),
            InvestigatorKind::StorageHeartbeat => {
                let budget = self.budget(deadline);
                let question =
                    crate::neighbour_heartbeat::Question { host, neighbours, deadline, budget, evidence_after };
                crate::neighbour_heartbeat::investigate(self, &self.config, &self.heartbeats, question).await
            }
            InvestigatorKind::BmcPower => without_heartbeat({
                let bmc = self.config.hosts.get(host)?.bmc.as_ref()?;
                let budget = self.budget(deadline);
                let status = match power_control(bmc, budget) {
                    Ok(control) => tokio::time::timeout(budget, control.status()).await,
                    Err(error) => return Some((Finding::Unknown, error, None)),
                };
                match status {
                    Ok(Ok(PowerState::Off)) => (Finding::Dead, "power off".to_owned()),
                    Ok(Ok(PowerState::On)) => (Finding::Unknown, "power on".to_owned()),
                    Ok(Err(error)) => (Finding::Unknown, format!("bmc status failed: {error}")),
                    Err(_) => (Finding::Unknown, "bmc status: no answer before the deadline".to_owned()),
                }
            }),
            InvestigatorKind::VmActivity => {
                let budget = self.budget(deadline);
                let read = tokio::time::timeout(budget, self.vm_activity.investigate(host, evidence_after)).await;
                without_heartbeat(read.unwrap_or((Finding::Unknown, "vm activity: no read before the deadline".into())))
            }
        }
    }

    async fn neighbour_ping(
        self: &Arc<Self>,
        host: &HostName,
        neighbours: &[HostName],
        deadline: Instant,
    ) -> (Finding, String) {
        let Some(address) =
            self.directory.read().expect("directory lock").by_name.get(host).map(|row| row.address.clone())
        else {
            return (Finding::Unknown, "no known address".to_owned());
        };
        if neighbours.is_empty() {
            return (Finding::Unknown, "no neighbour to ask".to_owned());
        }
        let mut asks = tokio::task::JoinSet::new();
        for neighbour in neighbours {
            let executor = self.clone();
            let neighbour = neighbour.clone();
            let command = AgentCommand::PingTest { host: host.clone(), targets: vec![address.clone()] };
            asks.spawn(async move {
                let answer = executor.send(&neighbour, command, deadline).await;
                (neighbour, answer)
            });
        }
        let answers = asks.join_all().await;
        let mut reached = Vec::new();
        let mut not_reached = Vec::new();
        for (neighbour, answer) in answers {
            match answer {
                Ok(CommandResult::PingTest { results }) if results.iter().any(|result| result.reachable) => {
                    let detail = results.iter().map(|result| result.detail.clone()).collect::<Vec<_>>().join("; ");
                    reached.push(format!("{neighbour} ({detail})"));
                }
                Ok(CommandResult::PingTest { .. }) => not_reached.push(neighbour.to_string()),
                Ok(other) => not_reached.push(format!("{neighbour} (answered {other:?})")),
                Err(error) => not_reached.push(format!("{neighbour} (no answer: {error})")),
            }
        }
        if !reached.is_empty() {
            return (Finding::Alive, format!("reached from {}", reached.join(", ")));
        }
        (Finding::Unknown, format!("unreachable from {}", not_reached.join(", ")))
    }

    async fn fence(&self, host: &HostName, deadline: Instant) -> FenceOutcome {
        let Some(bmc) = self.config.hosts.get(host).and_then(|host| host.bmc.as_ref()) else {
            return FenceOutcome::Failed { error: "no bmc configured for this host".to_owned() };
        };
        let budget = self.budget(deadline);
        let control = match power_control(bmc, budget) {
            Ok(control) => control,
            Err(error) => return FenceOutcome::Failed { error },
        };
        let fencer = kvmha_bmc::Fencer { deadline: budget, ..kvmha_bmc::Fencer::default() };
        let result = tokio::time::timeout(budget + MIN_CALL_BUDGET, fencer.fence(control.as_ref())).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), control.close()).await;
        match result {
            Ok(Ok(report)) => match report.outcome {
                kvmha_bmc::FenceOutcome::PoweredOff => FenceOutcome::PoweredOff { evidence: report.evidence },
                kvmha_bmc::FenceOutcome::AlreadyOff => FenceOutcome::AlreadyOff { evidence: report.evidence },
            },
            Ok(Err(error)) => FenceOutcome::Failed { error: error.to_string() },
            Err(_) => FenceOutcome::Failed { error: "fence: no outcome before the deadline".to_owned() },
        }
    }

    /// Sends one command to an agent and waits for its answer until `deadline`.
    pub async fn send(
        &self,
        host: &HostName,
        command: AgentCommand,
        deadline: Instant,
    ) -> Result<CommandResult, String> {
        let address = self
            .directory
            .read()
            .expect("directory lock")
            .by_name
            .get(host)
            .map(|row| row.address.clone())
            .ok_or_else(|| format!("no address known for {host}"))?;
        let budget = self.budget(deadline);
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        // The agent gets three quarters of the budget, so that its answer (also "could not
        // reach it") arrives before our deadline rather than racing it.
        let agent_budget = budget * 3 / 4;
        let request = CommandRequest {
            version: PROTOCOL_VERSION,
            request_id,
            timeout_ms: agent_budget.as_millis() as u64,
            command,
        };
        let url = format!("https://{address}{}", kvmha_proto::path::COMMAND);
        let response = self
            .agents
            .post(url)
            .timeout(budget)
            .json(&request)
            .send()
            .await
            .map_err(|error| format!("{host}: {}", without_url(&error)))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|error| format!("{host}: {}", without_url(&error)))?;
        if !status.is_success() {
            return Err(format!("{host}: http {status}: {}", String::from_utf8_lossy(&bytes)));
        }
        let answer: CommandResponse = kvmha_proto::decode(&bytes).map_err(|error| format!("{host}: {error}"))?;
        if answer.request_id != request_id {
            return Err(format!("{host}: answer to request {} instead of {request_id}", answer.request_id));
        }
        Ok(answer.result)
    }
}

/// What the target agent may do to the VM's lease: break a lease of the host the safety
/// rule proved dead, or take only a free lease when the VM's own (live) host reported it
/// not running.
pub fn lease_grant(release: &Release) -> LeaseGrant {
    match release {
        Release::HostDead(proof) => LeaseGrant::BreakDeadOwner {
            host: proof.host().clone(),
            boot_id: proof.boot_id().cloned(),
            proof: proof.describe(),
        },
        Release::ReportedNotRunning { .. } => LeaseGrant::IfFree,
    }
}

/// An agent's answer to `StartVm`, as the engine counts it.
pub fn start_outcome(answer: CommandResult) -> VmStartOutcome {
    match answer {
        CommandResult::Done => VmStartOutcome::Started,
        CommandResult::AlreadyRunning => VmStartOutcome::AlreadyRunning,
        CommandResult::LeaseHeld { owner } => VmStartOutcome::LeaseHeld { owner },
        CommandResult::Unsupported { reason } | CommandResult::Failed { reason } => VmStartOutcome::Failed { reason },
        other => VmStartOutcome::Failed { reason: format!("unexpected answer {other:?}") },
    }
}

fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if error.is_timeout() {
        text = "no answer before the deadline".to_owned();
    } else if error.is_connect() {
        text = "connection failed".to_owned();
    }
    text
}

/// A BMC client for one call, bounded by `budget`. The password stays inside [`Secret`].
fn power_control(bmc: &BmcConfig, budget: Duration) -> Result<Box<dyn PowerControl>, String> {
    match bmc.kind {
        BmcKind::Ipmi => {
            let mut config = IpmiConfig::new(bmc.address.clone(), bmc.username.clone(), bmc.password.clone());
            config.operation_timeout = budget;
            config.attempt_timeout = (budget / 3).max(MIN_CALL_BUDGET);
            IpmiClient::new(config)
                .map(|client| Box::new(client) as Box<dyn PowerControl>)
                .map_err(|error| error.to_string())
        }
        BmcKind::Redfish => {
            let mut config = RedfishConfig::new(bmc.address.clone(), bmc.username.clone(), bmc.password.clone());
            config.timeout = budget;
            config.tls = match (&bmc.ca_bundle, bmc.insecure) {
                (_, true) => RedfishTls::Insecure,
                (Some(bundle), false) => RedfishTls::CaBundle(bundle.clone()),
                (None, false) => RedfishTls::WebRoots,
            };
            RedfishClient::new(config)
                .map(|client| Box::new(client) as Box<dyn PowerControl>)
                .map_err(|error| error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_start_answer_maps_to_what_the_engine_counts() {
        assert_eq!(start_outcome(CommandResult::Done), VmStartOutcome::Started);
        assert_eq!(start_outcome(CommandResult::AlreadyRunning), VmStartOutcome::AlreadyRunning);
        assert_eq!(
            start_outcome(CommandResult::LeaseHeld { owner: "host1 (boot b)".into() }),
            VmStartOutcome::LeaseHeld { owner: "host1 (boot b)".into() }
        );
        assert_eq!(
            start_outcome(CommandResult::Failed { reason: "no disk".into() }),
            VmStartOutcome::Failed { reason: "no disk".into() }
        );
        assert!(matches!(start_outcome(CommandResult::Vms { vms: vec![] }), VmStartOutcome::Failed { .. }));
    }

    #[test]
    fn a_vm_its_own_live_host_reported_stopped_may_take_only_a_free_lease() {
        let release = Release::ReportedNotRunning {
            host: HostName::from("host1"),
            boot_id: kvmha_core::model::BootId("b1".into()),
            state: "crashed".into(),
        };
        assert_eq!(lease_grant(&release), LeaseGrant::IfFree);
    }
}
