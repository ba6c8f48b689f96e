//! The VMs of this host: the hypervisor driver, their leases and what the agent remembers
//! about them across restarts (docs/daemons.md, "VMs").
//!
//! - Every start takes the VM's lease first (on the lease pool), then starts the VM; the
//!   lease is renewed every renewal interval by [`Vms::renew_all`], independent of the
//!   manager session. A lease found taken by someone else (`LeaseLost`) means another
//!   host may own the VM now: the VM is destroyed at once.
//! - `vm-marks.json` in the agent's directory remembers, per VM, the start (work id) that
//!   made the running instance and whether the agent expects it to run, was told to stop
//!   it, or stopped it by self-fencing. It is written *before* the hypervisor is asked to
//!   start a VM: an agent killed right after the start still finds the VM as its own
//!   after a restart and re-takes its lease.
//! - A VM that holds a lease whose renewal deadline comes close is stopped hard
//!   ([`Vms::self_fence`]) before any other host could take the lease over.

use crate::config::AgentConfig;
use kvmha_core::event::{RequestId, VmReport, VmRunState};
use kvmha_core::model::VmName;
use kvmha_hypervisor::{DomainInfo, DomainState, Hypervisor, ShutOffReason, ShutdownRequest};
use kvmha_proto::{CommandResult, LeaseGrant, VmInventory};
use kvmha_storage::{HeldLease, HostIdentity, LeaseClient, LeaseState, Name, StorageError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What the agent expects of a VM, remembered across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    /// kvmha started it and nobody asked it to stop: off means crashed.
    Running,
    /// Stopped on purpose (StopVm): reported `Stopped`, never restarted.
    OperatorStopped,
    /// Stopped by this agent because its lease could not be kept.
    SelfFenced,
    /// Stopped by this agent, lease released, for a planned stop of the agent under the
    /// `failover` shutdown policy: reported `StoppedForShutdown`, restarted elsewhere.
    ShutdownFailover,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The work id of the start that made the current instance.
    pub instance: Option<u64>,
    pub expect: Expect,
}

/// The persisted marks: `vm-marks.json`, written aside and renamed.
#[derive(Debug)]
struct Marks {
    path: PathBuf,
    marks: BTreeMap<String, Mark>,
}

impl Marks {
    fn load(path: PathBuf) -> Marks {
        let marks = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|error| {
                tracing::error!(file = %path.display(), %error, "vm marks unreadable: starting without them");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Marks { path, marks }
    }

    fn set(&mut self, vm: &str, mark: Option<Mark>) -> std::io::Result<()> {
        match mark {
            Some(mark) => self.marks.insert(vm.to_owned(), mark),
            None => self.marks.remove(vm),
        };
        let temporary = self.path.with_extension("tmp");
        let text = serde_json::to_string_pretty(&self.marks).map_err(std::io::Error::other)?;
        std::fs::write(&temporary, text)?;
        std::fs::File::open(&temporary)?.sync_all()?;
        std::fs::rename(&temporary, &self.path)
    }
}

/// One lease this agent holds, renewed by [`Vms::renew_all`].
type Held = Arc<tokio::sync::Mutex<HeldLease>>;

/// A VM whose lease an earlier run of this agent held: re-taken at start, or the VM is
/// stopped by `deadline`.
#[derive(Debug, Clone)]
struct Retake {
    vm: String,
    deadline: Instant,
}

#[derive(Debug)]
pub struct Vms {
    hypervisor: Option<Arc<dyn Hypervisor>>,
    leases: Option<LeaseClient>,
    identity: Option<HostIdentity>,
    held: Mutex<BTreeMap<String, Held>>,
    marks: Mutex<Marks>,
    /// VMs with a command in progress: the renewer leaves their leases alone.
    busy: Mutex<BTreeSet<String>>,
    retakes: Mutex<Vec<Retake>>,
    /// Set once the agent self-fenced: no VM starts here any more.
    fenced: AtomicBool,
    /// Set once the agent stops its VMs for a planned stop (failover policy): no VM
    /// starts here any more in this run.
    leaving: AtomicBool,
    /// One VM command at a time: starts and stops are rare, and this keeps a start and a
    /// stop of one VM (or two starts) from interleaving.
    commands: tokio::sync::Mutex<()>,
    self_fence_deadline: Duration,
}

/// Marks a VM busy while a command runs on it.
struct BusyGuard<'a> {
    vms: &'a Vms,
    vm: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.vms.busy.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.vm);
    }
}

/// What a ping says about a domain: the hypervisor's state, and for one that is off,
/// what the agent expected of it.
pub fn run_state(state: DomainState, mark: Option<Mark>) -> VmRunState {
    match state {
        DomainState::Crashed(_) => VmRunState::Crashed,
        state if state.may_be_running() => VmRunState::Running,
        // Migrated away (or saved) by someone outside kvmha: the guest lives on elsewhere
        // (or in its save file). Calling it crashed once restarted it here while it ran on
        // the migration's target, a double run the lab saw.
        DomainState::ShutOff(ShutOffReason::Migrated | ShutOffReason::Saved) => VmRunState::Stopped,
        _ => match mark.map(|mark| mark.expect) {
            Some(Expect::SelfFenced) => VmRunState::SelfFenced,
            Some(Expect::ShutdownFailover) => VmRunState::StoppedForShutdown,
            Some(Expect::Running) => VmRunState::Crashed,
            Some(Expect::OperatorStopped) | None => VmRunState::Stopped,
        },
    }
}

fn storage_name(vm: &str) -> Result<Name, String> {
    Name::new(vm).map_err(|error| format!("vm name {vm:?}: {error}"))
}

impl Vms {
    /// Opens the hypervisor (if configured) and the lease client (if a pool is).
    /// `origin`: the last heartbeat renewal of an earlier run of this agent in this boot;
    /// leases that run held must be re-taken before its self-fence deadline.
    pub async fn open(
        config: &AgentConfig,
        boot_id: kvmha_storage::BootId,
        origin: Option<Instant>,
    ) -> Result<Vms, crate::AgentError> {
        let hypervisor = match &config.hypervisor {
            Some(uri) => {
                let options = kvmha_hypervisor::OpenOptions { call_timeout: config.timing.vm_start_timeout() };
                let driver = kvmha_hypervisor::open(uri, options).await.map_err(|error| crate::AgentError::Io {
                    what: format!("opening the hypervisor {uri}"),
                    source: std::io::Error::other(error.to_string()),
                })?;
                tracing::info!(driver = driver.driver_name(), %uri, "hypervisor opened");
                Some(driver)
            }
            None => None,
        };
        let io = |what: &str| {
            let what = what.to_owned();
            move |error: kvmha_storage::StorageError| crate::AgentError::Io {
                what,
                source: std::io::Error::other(error.to_string()),
            }
        };
        let (leases, identity) = match &config.lease_pool {
            Some(pool) => {
                let identity = HostIdentity {
                    cluster: Name::new(&config.cluster_id).map_err(io("cluster id as a storage name"))?,
                    host: Name::new(config.name.as_str()).map_err(io("host name as a storage name"))?,
                    boot_id,
                };
                // Its own pool worker: lease i/o never queues behind heartbeat i/o.
                let opened = kvmha_storage::Pool::open(&format!("{}-leases", pool.name), &pool.path)
                    .map_err(io("opening the lease pool"))?;
                let client = LeaseClient::new(opened, identity.clone(), config.lease).map_err(io("lease timings"))?;
                (Some(client), Some(identity))
            }
            None => (None, None),
        };
        let directory = config.file.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        let vms = Vms {
            hypervisor,
            leases,
            identity,
            held: Mutex::new(BTreeMap::new()),
            marks: Mutex::new(Marks::load(directory.join("vm-marks.json"))),
            busy: Mutex::new(BTreeSet::new()),
            retakes: Mutex::new(Vec::new()),
            fenced: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            commands: tokio::sync::Mutex::new(()),
            self_fence_deadline: config.lease.self_fence_deadline,
        };
        vms.plan_retakes(origin.unwrap_or_else(Instant::now)).await;
        Ok(vms)
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mark(&self, vm: &str) -> Option<Mark> {
        self.marks().marks.get(vm).copied()
    }

    fn set_mark(&self, vm: &str, mark: Option<Mark>) -> Result<(), String> {
        self.marks().set(vm, mark).map_err(|error| format!("remembering vm {vm}: {error}"))
    }

    fn held(&self, vm: &str) -> Option<Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).get(vm).cloned()
    }

    fn take_held(&self, vm: &str) -> Option<Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).remove(vm)
    }

    /// How many VMs hold a lease here (the HA VMs the self-fence would stop).
    pub fn leased_count(&self) -> usize {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).len()
            + self.retakes.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    fn busy(&self, vm: &str) -> BusyGuard<'_> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner).insert(vm.to_owned());
        BusyGuard { vms: self, vm: vm.to_owned() }
    }

    /// VMs an earlier run started that still run: their leases are re-taken by the
    /// renewer (same host and boot: claimable at once within the expiry).
    async fn plan_retakes(&self, origin: Instant) {
        let (Some(hypervisor), Some(_)) = (&self.hypervisor, &self.leases) else {
            return;
        };
        let domains = match hypervisor.list().await {
            Ok(domains) => domains,
            Err(error) => {
                tracing::error!(%error, "listing domains at start failed: leases of running VMs cannot be re-taken");
                return;
            }
        };
        // Our leases were last renewed around `origin`: they must be ours again (or
        // their VMs stopped) before the self-fence deadline counted from there.
        let deadline = origin + self.self_fence_deadline.saturating_sub(self.self_fence_deadline / 4);
        let mut retakes = Vec::new();
        for domain in domains {
            let ours = self.mark(&domain.name).is_some_and(|mark| mark.expect == Expect::Running);
            if ours && domain.state.may_be_running() {
                tracing::info!(vm = %domain.name, "vm started by an earlier run still runs: re-taking its lease");
                retakes.push(Retake { vm: domain.name, deadline });
            }
        }
        *self.retakes.lock().unwrap_or_else(PoisonError::into_inner) = retakes;
    }

    // ----- reports ---------------------------------------------------------------------

    fn report(&self, domain: &DomainInfo) -> VmReport {
        let mark = self.mark(&domain.name);
        VmReport {
            name: VmName::from(domain.name.as_str()),
            state: run_state(domain.state, mark),
            instance: mark.and_then(|mark| mark.instance).map(RequestId),
        }
    }

    /// Every domain, for pings. Empty without a hypervisor or when it cannot be listed
    /// (logged): a missing report says nothing to the manager, a wrong one would.
    pub async fn reports(&self) -> Vec<VmReport> {
        let Some(hypervisor) = &self.hypervisor else {
            return Vec::new();
        };
        match hypervisor.list().await {
            Ok(domains) => domains.iter().map(|domain| self.report(domain)).collect(),
            Err(error) => {
                tracing::warn!(%error, "listing domains for the ping failed");
                Vec::new()
            }
        }
    }

    // ----- commands --------------------------------------------------------------------

    fn driver(&self) -> Result<&Arc<dyn Hypervisor>, CommandResult> {
        self.hypervisor.as_ref().ok_or_else(|| CommandResult::Unsupported {
            reason: "no hypervisor configured on this host (agent.toml `hypervisor`)".into(),
        })
    }

    pub async fn list(&self) -> CommandResult {
        let hypervisor = match self.driver() {
            Ok(hypervisor) => hypervisor,
            // No driver: nothing runs here that kvmha knows of.
            Err(_) => return CommandResult::Vms { vms: Vec::new() },
        };
        match hypervisor.list().await {
            Ok(domains) => CommandResult::Vms {
                vms: domains
                    .iter()
                    .map(|domain| VmInventory {
                        report: self.report(domain),
                        vcpus: domain.vcpus,
                        memory_mb: domain.memory_kib / 1024,
                        lease_held: self.held(&domain.name).is_some(),
                    })
                    .collect(),
            },
            Err(error) => CommandResult::Failed { reason: format!("listing domains: {error}") },
        }
    }

    pub async fn definition(&self, vm: &VmName) -> CommandResult {
        let hypervisor = match self.driver() {
            Ok(hypervisor) => hypervisor,
            Err(result) => return result,
        };
        match hypervisor.domain_xml(vm.as_str()).await {
            Ok(xml) => CommandResult::Definition { xml },
            Err(error) => CommandResult::Failed { reason: format!("definition of {vm}: {error}") },
        }
    }

    pub async fn define(&self, xml: &str) -> CommandResult {
        let hypervisor = match self.driver() {
            Ok(hypervisor) => hypervisor,
            Err(result) => return result,
        };
        let name = match kvmha_hypervisor::definition::DomainDefinition::parse(xml) {
            Ok(definition) => definition.name,
            Err(error) => return CommandResult::Failed { reason: format!("definition: {error}") },
        };
        let _one_at_a_time = self.commands.lock().await;
        if let Ok(domain) = hypervisor.domain(&name).await {
            if domain.state.may_be_running() {
                return CommandResult::Failed {
                    reason: format!(
                        "vm {name} runs here ({}): its definition is not replaced while it runs",
                        domain.state
                    ),
                };
            }
        }
        match hypervisor.define(xml).await {
            Ok(_) => CommandResult::Done,
            Err(error) => CommandResult::Failed { reason: format!("defining {name}: {error}") },
        }
    }

    /// StartVm (see the contract in kvmha-proto): define if unknown, lease, start.
    pub async fn start(&self, vm: &VmName, work: u64, xml: Option<&str>, grant: &LeaseGrant) -> CommandResult {
        let hypervisor = match self.driver() {
            Ok(hypervisor) => hypervisor.clone(),
            Err(result) => return result,
        };
        if self.is_fenced() {
            return CommandResult::Failed { reason: "this agent self-fenced: it starts no VM until restarted".into() };
        }
        if self.leaving.load(Ordering::SeqCst) {
            return CommandResult::Failed {
                reason: "this agent is stopping (failover shutdown policy): it starts no VM".into(),
            };
        }
        let Some(leases) = &self.leases else {
            return CommandResult::Failed {
                reason: "no lease pool on this host (agent.toml `pools`): an HA VM is never started without its lease"
                    .into(),
            };
        };
        let lease_name = match storage_name(vm.as_str()) {
            Ok(name) => name,
            Err(reason) => return CommandResult::Failed { reason },
        };
        let _one_at_a_time = self.commands.lock().await;
        let _busy = self.busy(vm.as_str());
        let domain = match hypervisor.domain(vm.as_str()).await {
            Ok(domain) => Some(domain),
            Err(kvmha_hypervisor::Error::NoSuchDomain { .. }) => None,
            Err(error) => return CommandResult::Failed { reason: format!("looking up {vm}: {error}") },
        };
        let running = domain.as_ref().is_some_and(|domain| domain.state.may_be_running());
        if running && self.held(vm.as_str()).is_some() {
            return CommandResult::AlreadyRunning;
        }
        if domain.is_none() {
            let Some(xml) = xml else {
                return CommandResult::Failed {
                    reason: format!("vm {vm} is not defined here and no definition was sent"),
                };
            };
            match kvmha_hypervisor::definition::DomainDefinition::parse(xml) {
                Ok(definition) if definition.name == vm.as_str() => {}
                Ok(definition) => {
                    return CommandResult::Failed {
                        reason: format!("the definition sent for {vm} names the domain {:?}", definition.name),
                    }
                }
                Err(error) => return CommandResult::Failed { reason: format!("definition of {vm}: {error}") },
            }
            if let Err(error) = hypervisor.define(xml).await {
                return CommandResult::Failed { reason: format!("defining {vm}: {error}") };
            }
            tracing::info!(%vm, "defined from the manager's definition");
        }
        // The lease first: nothing starts unless it is ours.
        let held = match self.held(vm.as_str()) {
            Some(held) => held,
            None => {
                let acquired = match grant {
                    LeaseGrant::IfFree => leases.acquire(&lease_name).await,
                    LeaseGrant::BreakDeadOwner { host, boot_id, proof } => {
                        let owner = match storage_name(host.as_str()) {
                            Ok(owner) => owner,
                            Err(reason) => return CommandResult::Failed { reason },
                        };
                        let boot = boot_id.as_ref().and_then(|boot| kvmha_storage::BootId::parse(&boot.0).ok());
                        tracing::warn!(%vm, dead_owner = %host, ?boot_id, %proof, "may take the lease of a proven-dead owner at once");
                        leases.acquire_from_dead_owner(&lease_name, &owner, boot).await
                    }
                };
                match acquired {
                    Ok(lease) => {
                        let held = Arc::new(tokio::sync::Mutex::new(lease));
                        self.held.lock().unwrap_or_else(PoisonError::into_inner).insert(vm.to_string(), held.clone());
                        held
                    }
                    Err(error) => return self.lease_refusal(leases, vm, &lease_name, error).await,
                }
            }
        };
        if running {
            // Running here without our lease (migrated in, or started by hand): it is
            // ours now, as this start.
            if let Err(reason) =
                self.set_mark(vm.as_str(), Some(Mark { instance: Some(work), expect: Expect::Running }))
            {
                tracing::error!(%vm, %reason, "vm runs with its lease, but its instance is not remembered");
            }
            return CommandResult::AlreadyRunning;
        }
        let previous = self.mark(vm.as_str());
        // Remembered before the start: an agent killed right after it finds the VM as
        // its own and keeps its lease.
        if let Err(reason) = self.set_mark(vm.as_str(), Some(Mark { instance: Some(work), expect: Expect::Running })) {
            self.give_back(leases, vm, held).await;
            return CommandResult::Failed { reason };
        }
        match hypervisor.start(vm.as_str()).await {
            Ok(()) => {
                tracing::info!(%vm, work, "vm started with its lease");
                CommandResult::Done
            }
            Err(error) => {
                tracing::warn!(%vm, work, %error, "start failed: releasing the lease");
                // A start that timed out may still have started it: stop it before the
                // lease goes.
                let _ = hypervisor.destroy(vm.as_str()).await;
                let _ = self.set_mark(vm.as_str(), previous);
                self.give_back(leases, vm, held).await;
                CommandResult::Failed { reason: format!("starting {vm}: {error}") }
            }
        }
    }

    async fn lease_refusal(
        &self,
        leases: &LeaseClient,
        vm: &VmName,
        name: &Name,
        error: StorageError,
    ) -> CommandResult {
        match error {
            StorageError::LeaseHeld { owner, boot_id, .. } => {
                tracing::info!(%vm, %owner, "lease held by a live owner: not started");
                CommandResult::LeaseHeld { owner: format!("{owner} (boot {boot_id})") }
            }
            StorageError::LeaseContended { .. } => {
                let owner = match leases.read(name).await {
                    Ok(Some(record)) => format!("{} (boot {})", record.owner_host, record.owner_boot_id),
                    _ => "a concurrent acquirer".to_owned(),
                };
                tracing::info!(%vm, %owner, "lease won by a concurrent acquirer: not started");
                CommandResult::LeaseHeld { owner }
            }
            other => CommandResult::Failed { reason: format!("lease of {vm}: {other}") },
        }
    }

    /// Releases a lease we hold (best effort: a lease not released expires).
    async fn give_back(&self, leases: &LeaseClient, vm: &VmName, held: Held) {
        self.take_held(vm.as_str());
        let lease = held.lock().await.clone();
        if let Err(error) = leases.release(lease).await {
            tracing::warn!(%vm, %error, "lease not released: it will expire");
        }
    }

    /// StopVm: graceful for up to `graceful_ms`, then hard; then the lease goes.
    pub async fn stop(&self, vm: &VmName, graceful_ms: u64) -> CommandResult {
        let hypervisor = match self.driver() {
            Ok(hypervisor) => hypervisor.clone(),
            Err(result) => return result,
        };
        let _one_at_a_time = self.commands.lock().await;
        let _busy = self.busy(vm.as_str());
        let domain = match hypervisor.domain(vm.as_str()).await {
            Ok(domain) => domain,
            Err(error) => return CommandResult::Failed { reason: format!("looking up {vm}: {error}") },
        };
        let previous = self.mark(vm.as_str());
        let instance = previous.and_then(|mark| mark.instance);
        // Said first, so that no ping reports the VM crashed while it goes down.
        if let Err(reason) = self.set_mark(vm.as_str(), Some(Mark { instance, expect: Expect::OperatorStopped })) {
            return CommandResult::Failed { reason };
        }
        if domain.state.may_be_running() || domain.active {
            let stopped = if graceful_ms == 0 {
                hypervisor.destroy(vm.as_str()).await.map(|_| ())
            } else {
                let request = ShutdownRequest { timeout: Duration::from_millis(graceful_ms), destroy_on_timeout: true };
                hypervisor.shutdown(vm.as_str(), request).await.map(|_| ())
            };
            if let Err(error) = stopped {
                let _ = self.set_mark(vm.as_str(), previous);
                return CommandResult::Failed { reason: format!("stopping {vm}: {error}") };
            }
        }
        if let (Some(leases), Some(held)) = (&self.leases, self.held(vm.as_str())) {
            self.give_back(leases, vm, held).await;
        }
        tracing::info!(%vm, graceful_ms, "vm stopped on request; lease released");
        CommandResult::Done
    }

    pub async fn migrate(&self, vm: &VmName, work: u64, destination_uri: &str, budget: Duration) -> CommandResult {
        let hypervisor = match self.driver() {
            Ok(hypervisor) => hypervisor.clone(),
            Err(result) => return result,
        };
        if !hypervisor.supports_migration() {
            return CommandResult::Unsupported {
                reason: format!("the {} driver cannot migrate: stop and start elsewhere", hypervisor.driver_name()),
            };
        }
        let _one_at_a_time = self.commands.lock().await;
        let _busy = self.busy(vm.as_str());
        let request = kvmha_hypervisor::MigrateRequest {
            destination_uri: destination_uri.to_owned(),
            live: true,
            timeout: budget,
        };
        if let Err(error) = hypervisor.migrate(vm.as_str(), &request).await {
            return CommandResult::Failed { reason: format!("migrating {vm}: {error}") };
        }
        // The VM runs there now: its lease is released for the destination to take
        // (its agent takes it over as `work`); nothing of it is left here.
        if let (Some(leases), Some(held)) = (&self.leases, self.held(vm.as_str())) {
            self.give_back(leases, vm, held).await;
        }
        let _ = self.set_mark(vm.as_str(), None);
        tracing::info!(%vm, work, %destination_uri, "vm migrated away");
        CommandResult::Done
    }

    // ----- leases: renewal, loss, self-fence ----------------------------------------------

    /// One renewal round: re-takes leases of an earlier run, renews every held lease
    /// (concurrently: one slow lease does not delay the others), releases leases of VMs
    /// that stopped by themselves, and destroys VMs whose lease was lost.
    pub async fn renew_all(self: &Arc<Self>) {
        let Some(leases) = &self.leases else {
            return;
        };
        if self.is_fenced() {
            return;
        }
        self.retake(leases).await;
        let held: Vec<(String, Held)> = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(vm, held)| (vm.clone(), held.clone()))
            .collect();
        let mut renewals = tokio::task::JoinSet::new();
        for (vm, held) in held {
            let (leases, vms) = (leases.clone(), self.clone());
            renewals.spawn(async move {
                if !vms.busy.lock().unwrap_or_else(PoisonError::into_inner).contains(&vm)
                    && !vms.still_running(&vm).await
                {
                    // Crashed or stopped by itself: the lease goes, so that the VM can
                    // be restarted anywhere at once (the mark still says "crashed").
                    if let Some(held) = vms.take_held(&vm) {
                        let lease = held.lock().await.clone();
                        match leases.release(lease).await {
                            Ok(()) => tracing::info!(%vm, "vm no longer runs: its lease is released"),
                            Err(error) => tracing::warn!(%vm, %error, "vm no longer runs; lease not released"),
                        }
                    }
                    return;
                }
                let result = leases.renew(&mut *held.lock().await).await;
                match result {
                    Ok(()) => {}
                    Err(StorageError::LeaseLost { reason, .. }) => vms.lease_lost(&vm, reason).await,
                    Err(error) => tracing::warn!(%vm, %error, "lease renewal failed; retrying next interval"),
                }
            });
        }
        renewals.join_all().await;
    }

    async fn still_running(&self, vm: &str) -> bool {
        let Some(hypervisor) = &self.hypervisor else {
            return true;
        };
        match hypervisor.domain(vm).await {
            Ok(domain) => domain.state.may_be_running() || domain.active,
            Err(kvmha_hypervisor::Error::NoSuchDomain { .. }) => false,
            // Cannot tell: keep renewing.
            Err(_) => true,
        }
    }

    async fn lease_lost(&self, vm: &str, reason: &str) {
        tracing::error!(
            %vm,
            reason,
            "LEASE LOST: another host may own this VM now; destroying it here at once"
        );
        self.take_held(vm);
        self.destroy_self_fenced(vm).await;
    }

    /// Hard stop, remembered as a self-fence. True if the VM is known stopped.
    async fn destroy_self_fenced(&self, vm: &str) -> bool {
        let instance = self.mark(vm).and_then(|mark| mark.instance);
        if let Err(reason) = self.set_mark(vm, Some(Mark { instance, expect: Expect::SelfFenced })) {
            tracing::error!(%vm, %reason, "self-fence mark not written");
        }
        let Some(hypervisor) = &self.hypervisor else {
            return false;
        };
        match hypervisor.destroy(vm).await {
            Ok(()) => {
                tracing::error!(%vm, "vm destroyed (self-fence)");
                true
            }
            Err(error) => {
                if hypervisor.domain(vm).await.is_ok_and(|domain| !domain.state.may_be_running() && !domain.active) {
                    return true;
                }
                tracing::error!(%vm, %error, "DESTROY FAILED during self-fence: only the watchdog can stop it now");
                false
            }
        }
    }

    async fn retake(&self, leases: &LeaseClient) {
        let pending: Vec<Retake> = self.retakes.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for retake in pending {
            let done = self.retake_one(leases, &retake).await;
            if done {
                self.retakes.lock().unwrap_or_else(PoisonError::into_inner).retain(|other| other.vm != retake.vm);
            }
        }
    }

    /// True when settled: re-taken, or the VM stopped.
    async fn retake_one(&self, leases: &LeaseClient, retake: &Retake) -> bool {
        let vm = retake.vm.as_str();
        if Instant::now() >= retake.deadline {
            tracing::error!(%vm, "lease not re-taken before the self-fence deadline: stopping the vm");
            self.destroy_self_fenced(vm).await;
            return true;
        }
        let Ok(name) = storage_name(vm) else {
            return true;
        };
        let identity = self.identity.as_ref().expect("with a lease client");
        // Read first: only our own, a released or an absent record is claimable at once;
        // anything else means another host may own the VM now.
        match leases.read(&name).await {
            Ok(Some(record))
                if record.state == LeaseState::Held
                    && (record.owner_host != identity.host || record.owner_boot_id != identity.boot_id) =>
            {
                self.lease_lost(vm, "held by another host after this agent restarted").await;
                true
            }
            Ok(_) => match leases.acquire(&name).await {
                Ok(lease) => {
                    tracing::info!(%vm, "lease re-taken after the agent restart; the vm keeps running");
                    self.held
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(vm.to_owned(), Arc::new(lease.into()));
                    true
                }
                Err(StorageError::LeaseHeld { .. } | StorageError::LeaseContended { .. }) => {
                    self.lease_lost(vm, "taken by another host while this agent restarted").await;
                    true
                }
                Err(error) => {
                    tracing::warn!(%vm, %error, "re-taking the lease failed; retrying");
                    false
                }
            },
            Err(error) => {
                tracing::warn!(%vm, %error, "reading the lease to re-take it failed; retrying");
                false
            }
        }
    }

    /// Whether a held lease's self-fence deadline is within `margin` of `now` (or one
    /// re-take is), with the VM's name: the caller self-fences.
    pub fn lease_deadline_near(&self, now: Instant, margin: Duration) -> Option<String> {
        let timings = self.leases.as_ref()?.timings();
        for (vm, held) in self.held.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            // A lease being renewed right now is locked: its deadline is checked next time.
            if let Ok(lease) = held.try_lock() {
                if now + margin >= lease.self_fence_due_at(timings) {
                    return Some(vm.clone());
                }
            }
        }
        None
    }

    /// The planned stop under the `failover` shutdown policy: every VM holding a lease
    /// here (the HA VMs kvmha started) is shut down, gracefully for up to `graceful`, then
    /// hard, all at once; each lease is released after its VM is off, and the VM is
    /// remembered as stopped for the shutdown (`StoppedForShutdown` in the final ping).
    /// No VM starts here afterwards. Returns the VMs stopped and those that could not be.
    pub async fn stop_for_shutdown(self: &Arc<Self>, graceful: Duration) -> (Vec<String>, Vec<String>) {
        self.leaving.store(true, Ordering::SeqCst);
        let (Some(hypervisor), Some(_)) = (self.hypervisor.clone(), self.leases.as_ref()) else {
            return (Vec::new(), Vec::new());
        };
        // Starts and stops already running finish first; none begins after this.
        let _no_more_commands = self.commands.lock().await;
        let mut vms: Vec<String> = self.held.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
        // A lease not re-taken yet after an agent restart: its VM runs and is ours.
        vms.extend(self.retakes.lock().unwrap_or_else(PoisonError::into_inner).drain(..).map(|retake| retake.vm));
        let mut stops = tokio::task::JoinSet::new();
        for vm in vms {
            let (vms, hypervisor) = (self.clone(), hypervisor.clone());
            stops.spawn(async move {
                let stopped = vms.stop_one_for_shutdown(&hypervisor, &vm, graceful).await;
                (vm, stopped)
            });
        }
        let (mut stopped, mut failed) = (Vec::new(), Vec::new());
        for (vm, ok) in stops.join_all().await {
            if ok {
                stopped.push(vm);
            } else {
                failed.push(vm);
            }
        }
        stopped.sort();
        failed.sort();
        (stopped, failed)
    }

    async fn stop_one_for_shutdown(&self, hypervisor: &Arc<dyn Hypervisor>, vm: &str, graceful: Duration) -> bool {
        let _busy = self.busy(vm);
        let previous = self.mark(vm);
        let instance = previous.and_then(|mark| mark.instance);
        // Said first, so that no ping reports the VM crashed while it goes down.
        if let Err(reason) = self.set_mark(vm, Some(Mark { instance, expect: Expect::ShutdownFailover })) {
            tracing::error!(%vm, %reason, "not stopped for the shutdown: its stop could not be remembered");
            return false;
        }
        let request = ShutdownRequest { timeout: graceful, destroy_on_timeout: true };
        let outcome = match hypervisor.domain(vm).await {
            Ok(domain) if domain.state.may_be_running() || domain.active => {
                hypervisor.shutdown(vm, request).await.map(Some)
            }
            Ok(_) | Err(kvmha_hypervisor::Error::NoSuchDomain { .. }) => Ok(None),
            Err(error) => Err(error),
        };
        match outcome {
            Ok(how) => {
                // Off: the lease goes so that another host may start it at once.
                if let (Some(leases), Some(held)) = (&self.leases, self.take_held(vm)) {
                    let lease = held.lock().await.clone();
                    if let Err(error) = leases.release(lease).await {
                        tracing::warn!(%vm, %error, "lease not released: it will expire");
                    }
                }
                tracing::info!(%vm, ?how, "vm stopped for the planned shutdown (failover policy); lease released");
                true
            }
            Err(error) => {
                // Still running (or unknown): it keeps its lease and its mark, and the
                // manager keeps it here.
                let _ = self.set_mark(vm, previous);
                tracing::error!(%vm, %error, "vm could not be stopped for the shutdown: it stays here");
                false
            }
        }
    }

    /// The self-fence: every VM holding a lease here is stopped hard and reported
    /// `SelfFenced`; no VM starts here afterwards. True if every one is known stopped.
    pub async fn self_fence(&self) -> bool {
        self.fenced.store(true, Ordering::SeqCst);
        let mut vms: Vec<String> = self.held.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
        vms.extend(self.retakes.lock().unwrap_or_else(PoisonError::into_inner).drain(..).map(|retake| retake.vm));
        let mut all_stopped = true;
        for vm in &vms {
            all_stopped &= self.destroy_self_fenced(vm).await;
        }
        self.held.lock().unwrap_or_else(PoisonError::into_inner).clear();
        tracing::error!(?vms, all_stopped, "self-fence: every vm holding a lease was stopped hard");
        all_stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmha_hypervisor::{CrashReason, ShutOffReason};

    #[test]
    fn an_off_vm_is_reported_by_what_the_agent_expected_of_it() {
        let mark = |expect| Some(Mark { instance: Some(3), expect });
        let off = DomainState::ShutOff(ShutOffReason::Destroyed);
        assert_eq!(run_state(off, mark(Expect::Running)), VmRunState::Crashed, "off without being asked");
        assert_eq!(run_state(off, mark(Expect::OperatorStopped)), VmRunState::Stopped);
        assert_eq!(run_state(off, mark(Expect::SelfFenced)), VmRunState::SelfFenced);
        assert_eq!(run_state(off, mark(Expect::ShutdownFailover)), VmRunState::StoppedForShutdown);
        assert_eq!(run_state(off, None), VmRunState::Stopped, "never started by kvmha");
        assert_eq!(run_state(DomainState::Running, mark(Expect::OperatorStopped)), VmRunState::Running);
        assert_eq!(run_state(DomainState::Paused, None), VmRunState::Running, "a paused guest holds its disks");
        let crashed = DomainState::Crashed(CrashReason::ProcessExited);
        assert_eq!(run_state(crashed, mark(Expect::OperatorStopped)), VmRunState::Crashed);
        let migrated = DomainState::ShutOff(ShutOffReason::Migrated);
        assert_eq!(run_state(migrated, mark(Expect::Running)), VmRunState::Stopped, "it runs on the target now");
        let saved = DomainState::ShutOff(ShutOffReason::Saved);
        assert_eq!(run_state(saved, mark(Expect::Running)), VmRunState::Stopped);
    }

    #[test]
    fn marks_survive_a_reload_and_a_damaged_file_is_not_fatal() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("vm-marks.json");
        let mut marks = Marks::load(path.clone());
        marks.set("vm1", Some(Mark { instance: Some(7), expect: Expect::Running })).unwrap();
        marks.set("vm2", Some(Mark { instance: None, expect: Expect::OperatorStopped })).unwrap();
        marks.set("vm2", None).unwrap();
        let reloaded = Marks::load(path.clone());
        assert_eq!(reloaded.marks.len(), 1);
        assert_eq!(reloaded.marks["vm1"], Mark { instance: Some(7), expect: Expect::Running });
        std::fs::write(&path, "{ torn").unwrap();
        assert!(Marks::load(path).marks.is_empty());
    }
}
