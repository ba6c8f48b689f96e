//! Executes the engine's commands against the world and feeds the outcomes back.
//!
//! Every external call is bounded by the command's deadline. The storage heartbeat is
//! read directly on the pools the manager mounts ([`crate::heartbeat`]) and through
//! neighbours for pools it does not ([`crate::neighbour_heartbeat`]); VM activity reads
//! the hosts' VM leases on the mounted pools ([`crate::vm_activity`]).

use crate::config::{BmcConfig, BmcKind, ManagerConfig};
use crate::controller::{Clock, Controller, SharedDirectory};
use crate::ManagerError;
use kvmha_bmc::ipmi::{IpmiClient, IpmiConfig};
use kvmha_bmc::redfish::{RedfishClient, RedfishConfig, RedfishTls};
use kvmha_bmc::{PowerControl, PowerState};
use kvmha_core::event::{
    FenceOutcome, FenceResult, Finding, HeartbeatObservation, InvestigatorKind, InvestigatorReport, VmStartOutcome,
    VmStartResult,
};
use kvmha_core::model::Resources;
use kvmha_core::{Command, Event, HostName, HostSpec, Instant};
use kvmha_proto::{AgentCommand, CommandRequest, CommandResponse, CommandResult, PROTOCOL_VERSION};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Smallest budget given to any external call, so that a deadline already passed still
/// gets one quick try rather than none.
const MIN_CALL_BUDGET: Duration = Duration::from_millis(50);

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
}

impl Executor {
    pub fn new(
        config: ManagerConfig,
        clock: Clock,
        directory: SharedDirectory,
    ) -> Result<Executor, crate::ManagerError> {
        let agents = kvmha_proto::transport::client(
            &config.ca_cert_pem,
            Some((&config.cert_pem, &config.key_pem)),
            Duration::from_secs(30),
        )?;
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
        })
    }

    pub fn set_controller(&self, controller: Controller) {
        let _ = self.controller.set(controller);
    }

    /// The spec of a joining host, from what manager.toml says about it.
    pub fn host_spec(&self, name: &HostName) -> HostSpec {
        let configured = self.config.hosts.get(name);
        HostSpec {
            name: name.clone(),
            networks: vec!["mgmt".to_owned()],
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
                tracing::info!(%host, %fence, attempt, "fencing");
                let outcome = self.fence(&host, deadline).await;
                self.feed(Event::FenceResult(FenceResult { host, fence, outcome })).await;
            }
            Command::StartVm { work, vm, target, release, deadline } => {
                tracing::info!(%vm, %target, %work, release = %release.describe(), "starting vm");
                // Not wired yet (issue 6): no definition and no lease break for a proven death.
                let command = AgentCommand::StartVm {
                    vm: vm.clone(),
                    work: work.0,
                    xml: None,
                    lease: kvmha_proto::LeaseGrant::IfFree,
                };
                let outcome = match self.send(&target, command, deadline).await {
                    Ok(CommandResult::Done) => VmStartOutcome::Started,
                    Ok(CommandResult::Unsupported { reason }) | Ok(CommandResult::Failed { reason }) => {
                        VmStartOutcome::Failed { reason }
                    }
                    Ok(other) => VmStartOutcome::Failed { reason: format!("unexpected answer {other:?}") },
                    Err(reason) => VmStartOutcome::Failed { reason },
                };
                self.feed(Event::VmStartResult(VmStartResult { work, vm, host: target, outcome })).await;
            }
            // Agents receive directives with every ping reply.
            Command::Directives(directives) => tracing::info!(?directives, "cluster directives changed"),
            Command::Alert(alert) => {
                tracing::warn!(severity = ?alert.severity, host = ?alert.host, "alert: {}", alert.message)
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
