//! The engine thread: owns the [`Engine`] and the [`Store`], steps events one at a time,
//! persists intent, and hands commands to the [`Executor`].
//!
//! A plain thread rather than a task: SQLite writes block (one fsync per persisted
//! step), and async code must never block. Everyone else talks to it through a bounded
//! channel of [`Request`]s.

use crate::error::ManagerError;
use crate::executor::Executor;
use crate::store::{HostRow, Store};
use kvmha_core::event::{AuditEvent, AuditKind, Directives};
use kvmha_core::{Command, Engine, Event, HostName, HostSpec, HostState, Instant, VmState};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Steps without commands are caught up by a snapshot this often (see store.rs).
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(3);
/// Bound on queued requests: a flood of pings waits rather than eating memory.
pub const QUEUE_CAPACITY: usize = 4096;

/// The engine's clock: monotonic across restarts. It continues from the clock value of
/// the last snapshot, so time "stands still" between a crash and the restart rather than
/// jumping: silence measured across a restart is never longer than real silence.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base_ms: u64,
    started: std::time::Instant,
}

impl Clock {
    pub fn starting_at(base_ms: u64) -> Clock {
        Clock { base_ms, started: std::time::Instant::now() }
    }
    pub fn now(&self) -> Instant {
        Instant::from_millis(self.base_ms + self.started.elapsed().as_millis() as u64)
    }
    /// The process's monotonic instant of `at` (instants before this process started
    /// map to its start: evidence from before then counts, which errs toward "alive").
    pub fn to_std(&self, at: Instant) -> std::time::Instant {
        match at.as_millis().checked_sub(self.base_ms) {
            Some(after) => self.started + Duration::from_millis(after),
            None => self.started,
        }
    }
    /// Time left until `deadline` on this clock.
    pub fn until(&self, deadline: Instant) -> Duration {
        deadline.saturating_since(self.now())
    }
}

/// Agents by name and by certificate fingerprint: how the TLS server knows who pings.
#[derive(Debug, Default)]
pub struct Directory {
    pub by_name: HashMap<HostName, HostRow>,
    pub by_cert: HashMap<String, HostName>,
}

impl Directory {
    fn insert(&mut self, row: HostRow) {
        self.by_cert.retain(|_, name| *name != row.name);
        self.by_cert.insert(row.cert_sha256.clone(), row.name.clone());
        self.by_name.insert(row.name.clone(), row);
    }
}

pub type SharedDirectory = Arc<RwLock<Directory>>;

/// What one step produced, for the caller that asked for it.
#[derive(Debug)]
pub struct StepOutcome {
    pub now: Instant,
    pub directives: Directives,
    pub audits: Vec<AuditEvent>,
}

#[derive(Debug)]
pub enum Request {
    Step { event: Event, reply: Option<oneshot::Sender<StepOutcome>> },
    Join { row: HostRow, spec: HostSpec, reply: oneshot::Sender<Result<(), String>> },
    View { reply: oneshot::Sender<ClusterView> },
    Shutdown,
}

/// A handle to the engine thread.
#[derive(Clone, Debug)]
pub struct Controller {
    sender: mpsc::Sender<Request>,
}

impl Controller {
    /// A controller whose requests the caller reads itself: for tests and tools that
    /// drive an [`Executor`] without an engine thread.
    pub fn detached() -> (Controller, mpsc::Receiver<Request>) {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        (Controller { sender }, receiver)
    }

    pub async fn step(&self, event: Event) -> Result<StepOutcome, ManagerError> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Request::Step { event, reply: Some(reply) }).await.map_err(|_| ManagerError::EngineGone)?;
        answer.await.map_err(|_| ManagerError::EngineGone)
    }
    /// Steps without waiting for the outcome (investigator reports, results).
    pub async fn feed(&self, event: Event) {
        if self.sender.send(Request::Step { event, reply: None }).await.is_err() {
            tracing::warn!("engine thread gone: event dropped");
        }
    }
    pub async fn join(&self, row: HostRow, spec: HostSpec) -> Result<Result<(), String>, ManagerError> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Request::Join { row, spec, reply }).await.map_err(|_| ManagerError::EngineGone)?;
        answer.await.map_err(|_| ManagerError::EngineGone)
    }
    pub async fn view(&self) -> Result<ClusterView, ManagerError> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Request::View { reply }).await.map_err(|_| ManagerError::EngineGone)?;
        answer.await.map_err(|_| ManagerError::EngineGone)
    }
    pub async fn shutdown(&self) {
        let _ = self.sender.send(Request::Shutdown).await;
    }
}

/// The cluster as the operator API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterView {
    pub now_ms: u64,
    pub cluster_ha: bool,
    pub disarmed: bool,
    pub storage_hold: bool,
    pub manager_isolated: bool,
    pub hosts: Vec<HostView>,
    pub vms: Vec<VmView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HostView {
    pub name: String,
    /// One of core's `HostState` names: Up, Disconnected, Suspect, ...
    pub state: HostState,
    /// How long the host has been in `state`.
    pub state_for_ms: u64,
    pub ha_enabled: bool,
    pub boot_id: Option<String>,
    /// Time since the last ping, if any was seen.
    pub last_ping_ms_ago: Option<u64>,
    pub address: Option<String>,
    pub has_bmc: bool,
    pub storage: String,
    pub proof: Option<String>,
    /// What the host offers VMs, and what the VMs kvmha places there take of it.
    pub capacity: kvmha_core::Resources,
    pub used: kvmha_core::Resources,
}

#[derive(Clone, Debug, Serialize)]
pub struct VmView {
    pub name: String,
    pub state: VmState,
    pub state_for_ms: u64,
    pub host: Option<String>,
    pub ha: bool,
    pub priority: i32,
}

struct EngineThread {
    engine: Engine,
    store: Store,
    clock: Clock,
    directory: SharedDirectory,
    executor: Arc<Executor>,
    runtime: tokio::runtime::Handle,
    last_event: watch::Sender<i64>,
    dirty: bool,
    last_persist: std::time::Instant,
}

/// Everything the engine thread starts from.
#[derive(Debug)]
pub struct Startup {
    pub engine: Engine,
    pub store: Store,
    pub clock: Clock,
    pub directory: SharedDirectory,
    pub executor: Arc<Executor>,
    pub last_event: watch::Sender<i64>,
}

/// Starts the engine thread. It first re-adds hosts the store knows but the engine does
/// not (a crash between the two writes of a join), then steps `ManagerStarted`.
pub fn spawn(startup: Startup) -> (Controller, std::thread::JoinHandle<Result<(), ManagerError>>) {
    let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
    let controller = Controller { sender };
    let runtime = tokio::runtime::Handle::current();
    let handle = std::thread::Builder::new()
        .name("kvmha-engine".into())
        .spawn(move || {
            let mut thread = EngineThread {
                engine: startup.engine,
                store: startup.store,
                clock: startup.clock,
                directory: startup.directory,
                executor: startup.executor,
                runtime,
                last_event: startup.last_event,
                dirty: false,
                last_persist: std::time::Instant::now(),
            };
            thread.run(receiver)
        })
        .expect("spawning the engine thread");
    (controller, handle)
}

impl EngineThread {
    fn run(&mut self, mut receiver: mpsc::Receiver<Request>) -> Result<(), ManagerError> {
        for row in self.store.hosts()? {
            self.directory.write().expect("directory lock").insert(row.clone());
            if !self.engine.hosts().contains_key(&row.name) {
                tracing::warn!(host = %row.name, "host known to the store but not the engine: adding it");
                let spec = self.executor.host_spec(&row.name);
                self.step(Event::HostAdded(spec))?;
            }
        }
        self.step(Event::ManagerStarted)?;
        self.persist(&[])?;
        while let Some(request) = receiver.blocking_recv() {
            match request {
                Request::Step { event, reply } => {
                    let outcome = self.step(event)?;
                    if let Some(reply) = reply {
                        let _ = reply.send(outcome);
                    }
                }
                Request::Join { row, spec, reply } => {
                    let result = self.join(row, spec);
                    let answer = result.as_ref().map(|_| ()).map_err(|error| error.to_string());
                    let _ = reply.send(answer);
                    result?;
                }
                Request::View { reply } => {
                    let _ = reply.send(self.view());
                }
                Request::Shutdown => break,
            }
            if self.dirty && self.last_persist.elapsed() >= SNAPSHOT_INTERVAL {
                self.persist(&[])?;
            }
        }
        if self.dirty {
            self.persist(&[])?;
        }
        Ok(())
    }

    fn join(&mut self, row: HostRow, spec: HostSpec) -> Result<(), ManagerError> {
        // The host row first: a crash before the engine step is repaired at start.
        self.store.upsert_host(&row)?;
        self.directory.write().expect("directory lock").insert(row.clone());
        if !self.engine.hosts().contains_key(&row.name) {
            self.step(Event::HostAdded(spec))?;
        }
        Ok(())
    }

    /// One engine step: persist intent when there is any, then execute.
    fn step(&mut self, event: Event) -> Result<StepOutcome, ManagerError> {
        let now = self.clock.now();
        let commands = self.engine.step(now, event);
        self.dirty = true;
        let audits: Vec<&AuditEvent> = commands
            .iter()
            .filter_map(|command| match command {
                Command::Audit(audit) => Some(audit),
                _ => None,
            })
            .collect();
        if !commands.is_empty() {
            self.persist(&audits)?;
        }
        for audit in &audits {
            match &audit.kind {
                AuditKind::HostState { .. } | AuditKind::Alert | AuditKind::FenceIntent | AuditKind::Verdict => {
                    tracing::info!(at = %audit.at, "{}", audit.describe());
                }
                _ => tracing::debug!(at = %audit.at, "{}", audit.describe()),
            }
        }
        let outcome =
            StepOutcome { now, directives: self.engine.directives(), audits: audits.into_iter().cloned().collect() };
        for command in commands {
            if matches!(command, Command::Audit(_)) {
                continue;
            }
            let executor = self.executor.clone();
            self.runtime.spawn(async move { executor.execute(command).await });
        }
        Ok(outcome)
    }

    fn persist(&mut self, audits: &[&AuditEvent]) -> Result<(), ManagerError> {
        let last_id = self.store.commit(&self.engine, self.clock.now().as_millis(), audits)?;
        self.dirty = false;
        self.last_persist = std::time::Instant::now();
        self.last_event.send_replace(last_id);
        Ok(())
    }

    fn view(&self) -> ClusterView {
        let now = self.clock.now();
        let directory = self.directory.read().expect("directory lock");
        let hosts = self
            .engine
            .hosts()
            .iter()
            .map(|(name, record)| HostView {
                name: name.to_string(),
                state: record.state,
                state_for_ms: now.saturating_since(record.state_since).as_millis() as u64,
                ha_enabled: record.ha_enabled,
                boot_id: record.boot_id.as_ref().map(|boot| boot.to_string()),
                last_ping_ms_ago: record.last_ping.map(|at| now.saturating_since(at).as_millis() as u64),
                address: directory.by_name.get(name).map(|row| row.address.clone()),
                has_bmc: record.spec.has_bmc,
                storage: format!("{:?}", record.storage),
                proof: record.proof.as_ref().map(|proof| proof.describe()),
                capacity: record.spec.capacity,
                used: self
                    .engine
                    .vms()
                    .values()
                    .filter(|vm| vm.host.as_ref() == Some(name))
                    .filter(|vm| matches!(vm.state, VmState::Running | VmState::Starting | VmState::AwaitingProof))
                    .fold(kvmha_core::Resources::default(), |used, vm| used.plus(vm.spec.demand)),
            })
            .collect();
        let vms = self
            .engine
            .vms()
            .iter()
            .map(|(name, record)| VmView {
                name: name.to_string(),
                state: record.state,
                state_for_ms: now.saturating_since(record.state_since).as_millis() as u64,
                host: record.host.as_ref().map(|host| host.to_string()),
                ha: record.spec.ha,
                priority: record.spec.priority,
            })
            .collect();
        let directives = self.engine.directives();
        ClusterView {
            now_ms: now.as_millis(),
            cluster_ha: self.engine.cluster_ha(),
            disarmed: directives.disarmed,
            storage_hold: directives.storage_hold,
            manager_isolated: self.engine.manager_isolated(),
            hosts,
            vms,
        }
    }
}
