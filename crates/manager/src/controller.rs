//! The engine thread: owns the [`Engine`] and the [`Store`], steps events one at a time,
//! persists intent, and hands commands to the [`Executor`].
//!
//! A plain thread rather than a task: SQLite writes block, and async code must never
//! block. Everyone else talks to it through a bounded channel of [`Request`]s; pings
//! come through their own queue, one slot per host ([`crate::ping_queue`]).
//!
//! Group commit: the thread takes every request waiting (up to [`BATCH_MAX`]), steps
//! them, then persists once (engine state and every audit line of the batch, one
//! transaction) before it runs any command of the batch or answers any step: intent is
//! still written before action, but a burst of events (a rack failing at once) costs one
//! write rather than one per event.

use crate::error::ManagerError;
use crate::executor::Executor;
use crate::leader::Leadership;
use crate::registry::{SharedRegistry, VmRow};
use crate::store::{HostRow, Store};
use kvmha_core::event::{AuditEvent, AuditKind, Directives, Ping};
use kvmha_core::{Command, Engine, Event, HostName, HostSpec, HostState, Instant, VmName, VmState};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Steps without commands are caught up by a snapshot this often (see store.rs), or less
/// often when a snapshot is slow: see [`SNAPSHOT_BUDGET_SHARE`].
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(3);
/// Catch-up snapshots take at most 1/this of the engine thread's time: a snapshot of a
/// large cluster (10,000 hosts, 200,000 VMs) takes a good part of a second, which every
/// 3 s would be most of a core.
pub const SNAPSHOT_BUDGET_SHARE: u32 = 20;
/// Bound on queued requests other than pings: a sender waits rather than lose one.
pub const QUEUE_CAPACITY: usize = 4096;
/// Requests stepped before one persist at most (group commit).
pub const BATCH_MAX: usize = 1024;

/// The pings waiting for the engine thread, newest per host.
pub type PingQueue = crate::ping_queue::CoalescingQueue<HostName, Ping, oneshot::Sender<StepOutcome>>;

/// The engine's clock: monotonic across restarts. It continues from the clock value of
/// the last snapshot, so time "stands still" between a crash and the restart rather than
/// jumping: silence measured across a restart is never longer than real silence.
///
/// With etcd, a follower's clock is moved forward to each snapshot it loads
/// ([`Clock::advance_to`]), so that the leader it becomes continues the old leader's clock
/// rather than running behind the instants in the state it took over. Clones share that.
#[derive(Clone, Debug)]
pub struct Clock {
    base_ms: u64,
    started: std::time::Instant,
    /// Added to `base_ms`; only grows.
    skew_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Clock {
    pub fn starting_at(base_ms: u64) -> Clock {
        Clock { base_ms, started: std::time::Instant::now(), skew_ms: Default::default() }
    }
    fn base(&self) -> u64 {
        self.base_ms + self.skew_ms.load(std::sync::atomic::Ordering::Relaxed)
    }
    pub fn now(&self) -> Instant {
        Instant::from_millis(self.base() + self.started.elapsed().as_millis() as u64)
    }
    /// Moves the clock forward to `at_ms` if it is behind (never backward).
    pub fn advance_to(&self, at_ms: u64) {
        let now = self.now().as_millis();
        if at_ms > now {
            self.skew_ms.fetch_add(at_ms - now, std::sync::atomic::Ordering::Relaxed);
        }
    }
    /// The process's monotonic instant of `at` (instants before this process started
    /// map to its start: evidence from before then counts, which errs toward "alive").
    pub fn to_std(&self, at: Instant) -> std::time::Instant {
        match at.as_millis().checked_sub(self.base()) {
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
    /// Certificates of removed hosts (`kvmha host remove`), refused for good.
    pub revoked: HashMap<String, HostName>,
}

impl Directory {
    fn insert(&mut self, row: HostRow) {
        self.by_cert.retain(|_, name| *name != row.name);
        self.by_cert.insert(row.cert_sha256.clone(), row.name.clone());
        self.by_name.insert(row.name.clone(), row);
    }

    /// A removed host: its certificate is no longer a joined agent's, and is revoked.
    pub fn remove(&mut self, name: &HostName) {
        if let Some(row) = self.by_name.remove(name) {
            self.revoked.insert(row.cert_sha256, name.clone());
        }
        self.by_cert.retain(|_, known| known != name);
    }
}

pub type SharedDirectory = Arc<RwLock<Directory>>;

/// What one step produced, for the caller that asked for it.
#[derive(Clone, Debug)]
pub struct StepOutcome {
    pub now: Instant,
    pub directives: Directives,
    pub audits: Vec<AuditEvent>,
}

#[derive(Debug)]
pub enum Request {
    Step {
        event: Event,
        reply: Option<oneshot::Sender<StepOutcome>>,
    },
    /// The ping queue went from empty to not empty: drain it.
    PingsWaiting,
    Join {
        row: HostRow,
        spec: HostSpec,
        reply: oneshot::Sender<Result<(), String>>,
    },
    View {
        reply: oneshot::Sender<ClusterView>,
    },
    /// Writes a registry row (with the audit lines that explain it) and tells the engine
    /// its spec (`VmAdded`; `host`: where it runs, for a VM the engine does not know yet).
    UpsertVm {
        row: VmRow,
        host: Option<HostName>,
        notes: Vec<Note>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Audit lines the manager itself writes (operator VM starts and stops, their outcome).
    Audit {
        notes: Vec<Note>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Shutdown,
}

/// An audit line written by the manager rather than the engine; stamped with the engine
/// clock when written.
#[derive(Clone, Debug)]
pub struct Note {
    pub host: Option<HostName>,
    pub vm: Option<VmName>,
    pub kind: AuditKind,
    pub detail: String,
}

/// A handle to the engine thread.
#[derive(Clone, Debug)]
pub struct Controller {
    sender: mpsc::Sender<Request>,
    pings: Arc<PingQueue>,
}

/// Why a ping got no outcome.
#[derive(Debug, thiserror::Error)]
pub enum PingRefused {
    #[error("ping queue full ({} hosts waiting): ping again at the next interval", crate::ping_queue::PING_SLOTS_MAX)]
    QueueFull,
    #[error("engine thread gone")]
    EngineGone,
}

impl Controller {
    fn new(sender: mpsc::Sender<Request>) -> Controller {
        Controller { sender, pings: Arc::new(PingQueue::new(crate::ping_queue::PING_SLOTS_MAX)) }
    }

    /// A controller whose requests the caller reads itself: for tests and tools that
    /// drive an [`Executor`] without an engine thread.
    pub fn detached() -> (Controller, mpsc::Receiver<Request>) {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        (Controller::new(sender), receiver)
    }

    /// Steps a ping through the ping queue: a ping still waiting when the same host's
    /// next one arrives is replaced by it, and both callers get the newer one's outcome.
    pub async fn ping(&self, ping: Ping) -> Result<StepOutcome, PingRefused> {
        let (reply, answer) = oneshot::channel();
        let host = ping.host.clone();
        match self.pings.push(host, ping, reply) {
            crate::ping_queue::Pushed::Queued { wake: true } => {
                self.sender.send(Request::PingsWaiting).await.map_err(|_| PingRefused::EngineGone)?;
            }
            crate::ping_queue::Pushed::Queued { wake: false } | crate::ping_queue::Pushed::Coalesced => {}
            crate::ping_queue::Pushed::Refused(_) => return Err(PingRefused::QueueFull),
        }
        answer.await.map_err(|_| PingRefused::EngineGone)
    }

    /// The ping path's `/metrics` lines.
    pub fn ping_metrics(&self) -> String {
        crate::ping_queue::render_metrics(&self.pings)
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
    pub async fn upsert_vm(&self, row: VmRow, host: Option<HostName>, notes: Vec<Note>) -> Result<(), ManagerError> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Request::UpsertVm { row, host, notes, reply }).await.map_err(|_| ManagerError::EngineGone)?;
        answer.await.map_err(|_| ManagerError::EngineGone)?.map_err(|reason| ManagerError::Snapshot { reason })
    }
    pub async fn audit(&self, notes: Vec<Note>) -> Result<(), ManagerError> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Request::Audit { notes, reply }).await.map_err(|_| ManagerError::EngineGone)?;
        answer.await.map_err(|_| ManagerError::EngineGone)?.map_err(|reason| ManagerError::Snapshot { reason })
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
    /// As the agent reported at join.
    pub cpus: u32,
    pub memory_mb: u64,
    /// What the host offers VMs, and what the VMs kvmha places there take of it.
    pub capacity: kvmha_core::Resources,
    pub used: kvmha_core::Resources,
}

#[derive(Clone, Debug, Serialize)]
pub struct VmView {
    pub name: String,
    pub state: VmState,
    pub state_for_ms: u64,
    /// The one host that may be running it (engine).
    pub host: Option<String>,
    /// Where it last ran or was last started.
    pub last_host: Option<String>,
    /// The work id of the start that created the running instance.
    pub instance: Option<u64>,
    /// `id@host` of a start in flight.
    pub starting: Option<String>,
    pub ha: bool,
    pub priority: i32,
    pub group: Option<String>,
    /// Node affinity: the hosts it may run on (empty: any).
    pub hosts: Vec<String>,
    pub max_restarts: u32,
    pub max_relocations: u32,
    /// Starts and relocations within the restart budget's window.
    pub restarts: u32,
    pub relocations: u32,
    pub vcpus: u32,
    pub memory_mb: u64,
    /// The registry holds its domain XML (needed to start it on another host).
    pub definition: bool,
}

struct EngineThread {
    pings: Arc<PingQueue>,
    /// Events nobody waits an answer for (investigator reports, fence and start results,
    /// ticks), stepped together when another request or the end of the batch comes.
    unanswered: Vec<Event>,
    /// What the steps of the current batch decided, run after the batch is persisted.
    pending_commands: Vec<Command>,
    pending_audits: Vec<AuditEvent>,
    /// Answers to the batch's steps, sent after the batch is persisted.
    pending_replies: Vec<(oneshot::Sender<StepOutcome>, StepOutcome)>,
    last_persist_took: Duration,
    engine: Engine,
    store: Store,
    clock: Clock,
    directory: SharedDirectory,
    registry: SharedRegistry,
    executor: Arc<Executor>,
    runtime: tokio::runtime::Handle,
    last_event: watch::Sender<i64>,
    dirty: bool,
    last_persist: std::time::Instant,
    leadership: Option<Leadership>,
}

/// Everything the engine thread starts from.
#[derive(Debug)]
pub struct Startup {
    pub engine: Engine,
    pub store: Store,
    pub clock: Clock,
    pub directory: SharedDirectory,
    pub registry: SharedRegistry,
    pub executor: Arc<Executor>,
    pub last_event: watch::Sender<i64>,
    /// etcd backend: the engine thread follows (serves views of the stored state, acts on
    /// nothing) until this manager is elected, then takes over from the store.
    pub leadership: Option<Leadership>,
}

/// How often a follower reads the leader's state from the store.
pub const FOLLOWER_RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Starts the engine thread. It first re-adds hosts the store knows but the engine does
/// not (a crash between the two writes of a join), tells the engine every registry VM's
/// spec (the registry is written first; a crash may have kept the engine from hearing of
/// a change), then steps `ManagerStarted`.
pub fn spawn(startup: Startup) -> (Controller, std::thread::JoinHandle<Result<(), ManagerError>>) {
    let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
    let controller = Controller::new(sender);
    let pings = controller.pings.clone();
    let runtime = tokio::runtime::Handle::current();
    let handle = std::thread::Builder::new()
        .name("kvmha-engine".into())
        .spawn(move || {
            let mut thread = EngineThread {
                pings,
                unanswered: Vec::new(),
                pending_commands: Vec::new(),
                pending_audits: Vec::new(),
                pending_replies: Vec::new(),
                last_persist_took: Duration::ZERO,
                engine: startup.engine,
                store: startup.store,
                clock: startup.clock,
                directory: startup.directory,
                registry: startup.registry,
                executor: startup.executor,
                runtime,
                last_event: startup.last_event,
                dirty: false,
                last_persist: std::time::Instant::now(),
                leadership: startup.leadership,
            };
            thread.run(receiver)
        })
        .expect("spawning the engine thread");
    (controller, handle)
}

impl EngineThread {
    fn run(&mut self, mut receiver: mpsc::Receiver<Request>) -> Result<(), ManagerError> {
        if let Some(leadership) = self.leadership.clone() {
            if !self.follow(&mut receiver, &leadership)? {
                return Ok(());
            }
        }
        for row in self.store.hosts()? {
            self.directory.write().expect("directory lock").insert(row.clone());
            if !self.engine.hosts().contains_key(&row.name) {
                tracing::warn!(host = %row.name, "host known to the store but not the engine: adding it");
                let spec = self.executor.host_spec(&row.name);
                self.step(Event::HostAdded(spec))?;
            }
        }
        for row in self.store.vms()? {
            self.registry.write().expect("registry lock").insert(row.name.clone(), row.clone());
            // A VM new to the engine is added as not running: a ping that reports it
            // running places it, so nothing is assumed from a registry row.
            self.step(Event::VmAdded { spec: row.spec(), host: None })?;
        }
        self.step(Event::ManagerStarted)?;
        self.flush()?;
        self.persist(&[])?;
        while let Some(request) = receiver.blocking_recv() {
            let mut stop = self.handle(request)?;
            let mut handled = 1;
            while !stop && handled < BATCH_MAX {
                let Ok(request) = receiver.try_recv() else { break };
                stop = self.handle(request)?;
                handled += 1;
            }
            self.flush()?;
            if stop {
                break;
            }
            if self.dirty && self.last_persist.elapsed() >= self.snapshot_every() {
                self.persist(&[])?;
            }
        }
        self.flush()?;
        if self.dirty {
            self.persist(&[])?;
        }
        Ok(())
    }

    /// Follower mode: answers views from the state last read from the store and refuses
    /// everything that would change it. Returns `true` once elected (the engine, the
    /// registry and the directory then hold the store's state as it is after the election:
    /// the old leader's epoch can no longer write), `false` on shutdown.
    fn follow(
        &mut self,
        receiver: &mut mpsc::Receiver<Request>,
        leadership: &Leadership,
    ) -> Result<bool, ManagerError> {
        let mut role = leadership.watch();
        let mut last_reload: Option<std::time::Instant> = None;
        loop {
            if let Some(epoch) = leadership.epoch() {
                let started = std::time::Instant::now();
                self.reload()?;
                tracing::info!(
                    epoch,
                    hosts = self.engine.hosts().len(),
                    vms = self.engine.vms().len(),
                    read_ms = started.elapsed().as_millis() as u64,
                    "taking over as leader: engine rebuilt from the store"
                );
                return Ok(true);
            }
            if last_reload.is_none_or(|at| at.elapsed() >= FOLLOWER_RELOAD_EVERY) {
                if let Err(error) = self.reload() {
                    tracing::warn!(%error, "follower: could not read the leader's state");
                }
                last_reload = Some(std::time::Instant::now());
            }
            let next = self.runtime.block_on(async {
                tokio::select! {
                    request = receiver.recv() => Some(request),
                    _ = role.changed() => None,
                    _ = tokio::time::sleep(FOLLOWER_RELOAD_EVERY) => None,
                }
            });
            let refusal = || {
                let leader = leadership.follower_hint().flatten();
                format!("not the leader (leader: {})", leader.map_or("unknown".to_owned(), |info| info.api_url))
            };
            match next {
                None => {}
                Some(None) | Some(Some(Request::Shutdown)) => return Ok(false),
                Some(Some(request)) => match request {
                    Request::View { reply } => {
                        let _ = reply.send(self.view());
                    }
                    // Dropped unanswered: the caller sees the engine as unavailable (the
                    // servers redirect agents and writes before they get here).
                    Request::Step { .. } | Request::PingsWaiting => {}
                    Request::Join { reply, .. } => {
                        let _ = reply.send(Err(refusal()));
                    }
                    Request::UpsertVm { reply, .. } => {
                        let _ = reply.send(Err(refusal()));
                    }
                    Request::Audit { reply, .. } => {
                        let _ = reply.send(Err(refusal()));
                    }
                    Request::Shutdown => return Ok(false),
                },
            }
        }
    }

    /// Replaces the engine, the directory and the registry with what the store holds.
    fn reload(&mut self) -> Result<(), ManagerError> {
        if let Some((mut engine, clock_ms)) = self.store.load_engine()? {
            engine.set_shutdown_policy(self.executor.config().shutdown_policy);
            self.clock.advance_to(clock_ms);
            self.engine = engine;
        }
        let hosts = self.store.hosts()?;
        let vms = self.store.vms()?;
        {
            let mut directory = self.directory.write().expect("directory lock");
            for row in hosts {
                directory.insert(row);
            }
        }
        {
            let mut registry = self.registry.write().expect("registry lock");
            for row in vms {
                registry.insert(row.name.clone(), row);
            }
        }
        self.last_event.send_replace(self.store.last_event_id()?);
        Ok(())
    }

    /// How long steps without commands may go unpersisted: [`SNAPSHOT_INTERVAL`], or
    /// longer when a snapshot is slow, so that catch-up snapshots stay within
    /// 1/[`SNAPSHOT_BUDGET_SHARE`] of the thread's time.
    fn snapshot_every(&self) -> Duration {
        SNAPSHOT_INTERVAL.max(self.last_persist_took * SNAPSHOT_BUDGET_SHARE)
    }

    /// One request; `true` when it asks the thread to stop.
    fn handle(&mut self, request: Request) -> Result<bool, ManagerError> {
        if let Request::Step { event, reply: None } = request {
            if matches!(event, Event::Tick) {
                // Silence is judged on the newest pings the manager has received, not on
                // the ones the engine got round to: a thread held up (a long write) must
                // not make every host look silent.
                self.step_unanswered();
                self.step_pings();
            }
            self.unanswered.push(event);
            return Ok(false);
        }
        self.step_unanswered();
        match request {
            Request::Step { event, reply } => {
                let outcome = self.step(event)?;
                if let Some(reply) = reply {
                    self.pending_replies.push((reply, outcome));
                }
            }
            Request::PingsWaiting => self.step_pings(),
            Request::Join { row, spec, reply } => {
                let result = self.join(row, spec);
                let answer = result.as_ref().map(|_| ()).map_err(|error| error.to_string());
                let _ = reply.send(answer);
                result?;
            }
            Request::View { reply } => {
                let _ = reply.send(self.view());
            }
            Request::UpsertVm { row, host, notes, reply } => {
                let result = self.upsert_vm(row, host, notes);
                let answer = result.as_ref().map(|_| ()).map_err(|error| error.to_string());
                let _ = reply.send(answer);
                result?;
            }
            Request::Audit { notes, reply } => {
                let result = self.write_notes(&notes);
                let answer = result.as_ref().map(|_| ()).map_err(|error| error.to_string());
                let _ = reply.send(answer);
                result?;
            }
            Request::Shutdown => return Ok(true),
        }
        Ok(false)
    }

    /// Steps every ping waiting, as one batch: VMs a ping releases are placed once, after
    /// the last ping. A ping's answer carries only the directives and the time, the same
    /// for all, and not the batch's audit lines: a first ping of every host lists every VM
    /// found running, and a copy of those for each of a thousand waiters was gigabytes
    /// (measured: 2 GiB resident at 1,000 hosts).
    fn step_pings(&mut self) {
        let mut waiting = Vec::new();
        let pings: Vec<Event> = self
            .pings
            .drain()
            .into_iter()
            .map(|(ping, waiters)| {
                waiting.extend(waiters);
                Event::Ping(ping)
            })
            .collect();
        if pings.is_empty() {
            return;
        }
        let outcome = StepOutcome { audits: Vec::new(), ..self.step_batch(pings) };
        for waiter in waiting {
            self.pending_replies.push((waiter, outcome.clone()));
        }
    }

    fn step_unanswered(&mut self) {
        if !self.unanswered.is_empty() {
            let events = std::mem::take(&mut self.unanswered);
            self.step_batch(events);
        }
    }

    /// Ends a batch: persists its intent (state and audit lines) if any step decided
    /// something, then runs its commands in the engine's order and answers its steps.
    fn flush(&mut self) -> Result<(), ManagerError> {
        self.step_unanswered();
        if !self.pending_commands.is_empty() || !self.pending_audits.is_empty() {
            let audits = std::mem::take(&mut self.pending_audits);
            self.persist(&audits.iter().collect::<Vec<_>>())?;
            for command in std::mem::take(&mut self.pending_commands) {
                // In the engine's order: starts keep their priority order (executor.rs).
                self.executor.dispatch(&self.runtime, command);
            }
        }
        for (reply, outcome) in self.pending_replies.drain(..) {
            let _ = reply.send(outcome);
        }
        Ok(())
    }

    fn join(&mut self, row: HostRow, spec: HostSpec) -> Result<(), ManagerError> {
        // The host row first: a crash before the engine step is repaired at start.
        self.store.upsert_host(&row)?;
        self.directory.write().expect("directory lock").insert(row.clone());
        // A host joining again (new machine, new capacity, BMC added to manager.toml)
        // updates its spec: capacity is what the planner fills.
        if self.engine.hosts().get(&row.name).is_none_or(|known| known.spec != spec) {
            self.step(Event::HostAdded(spec))?;
        }
        Ok(())
    }

    fn stamp(&self, notes: &[Note]) -> Vec<AuditEvent> {
        let at = self.clock.now();
        notes
            .iter()
            .map(|note| AuditEvent {
                at,
                host: note.host.clone(),
                vm: note.vm.clone(),
                kind: note.kind.clone(),
                detail: note.detail.clone(),
            })
            .collect()
    }

    fn upsert_vm(&mut self, row: VmRow, host: Option<HostName>, notes: Vec<Note>) -> Result<(), ManagerError> {
        let audits = self.stamp(&notes);
        let last_id = self.store.upsert_vm(&row, &audits.iter().collect::<Vec<_>>())?;
        for audit in &audits {
            tracing::info!(at = %audit.at, "{}", audit.describe());
        }
        self.last_event.send_replace(last_id);
        let spec = row.spec();
        self.registry.write().expect("registry lock").insert(row.name.clone(), row);
        self.step(Event::VmAdded { spec, host })?;
        Ok(())
    }

    fn write_notes(&mut self, notes: &[Note]) -> Result<(), ManagerError> {
        let audits = self.stamp(notes);
        let last_id = self.store.append_audits(&audits.iter().collect::<Vec<_>>())?;
        for audit in &audits {
            tracing::info!(at = %audit.at, "{}", audit.describe());
        }
        self.last_event.send_replace(last_id);
        Ok(())
    }

    /// One engine step. Its audit lines and commands join the batch's: persisted, then
    /// run, when the batch ends ([`EngineThread::flush`]).
    fn step(&mut self, event: Event) -> Result<StepOutcome, ManagerError> {
        let now = self.clock.now();
        let commands = self.engine.step(now, event);
        Ok(self.decided(now, commands))
    }

    /// Several events at one instant (`Engine::step_batch`): VMs they release are placed
    /// once, after the last of them.
    fn step_batch(&mut self, events: Vec<Event>) -> StepOutcome {
        let now = self.clock.now();
        let commands = self.engine.step_batch(now, events);
        self.decided(now, commands)
    }

    fn decided(&mut self, now: Instant, commands: Vec<Command>) -> StepOutcome {
        self.dirty = true;
        let mut audits = Vec::new();
        for command in commands {
            match command {
                Command::Audit(audit) => audits.push(audit),
                command => self.pending_commands.push(command),
            }
        }
        for audit in &audits {
            match &audit.kind {
                AuditKind::HostState { .. } | AuditKind::Alert | AuditKind::FenceIntent | AuditKind::Verdict => {
                    tracing::info!(at = %audit.at, "{}", audit.describe());
                }
                _ => tracing::debug!(at = %audit.at, "{}", audit.describe()),
            }
        }
        // Most steps (pings) decide nothing: cloning an empty list allocates nothing.
        let outcome = StepOutcome { now, directives: self.engine.directives(), audits: audits.clone() };
        self.pending_audits.extend(audits);
        outcome
    }

    fn persist(&mut self, audits: &[&AuditEvent]) -> Result<(), ManagerError> {
        let started = std::time::Instant::now();
        let last_id = self.store.commit(&self.engine, self.clock.now().as_millis(), audits)?;
        self.dirty = false;
        self.last_persist = std::time::Instant::now();
        self.last_persist_took = self.last_persist - started;
        self.last_event.send_replace(last_id);
        Ok(())
    }

    fn view(&self) -> ClusterView {
        let now = self.clock.now();
        let directory = self.directory.read().expect("directory lock");
        // One pass over the VMs, not one per host: 10,000 hosts × 200,000 VMs would hold
        // the engine thread for seconds (the systemd watchdog asks for a view).
        let mut used: HashMap<&HostName, kvmha_core::Resources> = HashMap::new();
        for vm in self.engine.vms().values() {
            if let Some(host) = &vm.host {
                if matches!(vm.state, VmState::Running | VmState::Starting | VmState::AwaitingProof) {
                    let entry = used.entry(host).or_default();
                    *entry = entry.plus(vm.spec.demand);
                }
            }
        }
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
                cpus: record.spec.capacity.cpus,
                memory_mb: record.spec.capacity.memory_mb,
                capacity: record.spec.capacity,
                used: used.get(name).copied().unwrap_or_default(),
            })
            .collect();
        let registry = self.registry.read().expect("registry lock");
        let vms = self
            .engine
            .vms()
            .iter()
            .map(|(name, record)| {
                let (restarts, relocations) = record.budget_spent(now);
                let row = registry.get(name);
                VmView {
                    name: name.to_string(),
                    state: record.state,
                    state_for_ms: now.saturating_since(record.state_since).as_millis() as u64,
                    host: record.host.as_ref().map(|host| host.to_string()),
                    last_host: record.last_host.as_ref().map(|host| host.to_string()),
                    instance: record.instance.map(|id| id.0),
                    starting: record.work_in_flight().map(|(id, host)| format!("{}@{host}", id.0)),
                    ha: record.spec.ha,
                    priority: record.spec.priority,
                    group: record.spec.group.clone(),
                    hosts: record.spec.affinity.iter().map(|host| host.to_string()).collect(),
                    max_restarts: record.spec.budget.max_restarts,
                    max_relocations: record.spec.budget.max_relocations,
                    restarts,
                    relocations,
                    vcpus: record.spec.demand.cpus,
                    memory_mb: record.spec.demand.memory_mb,
                    definition: row.is_some_and(|row| row.xml.is_some()),
                }
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
