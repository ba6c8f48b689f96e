//! The manager's commands to this agent: `POST /v1/command`, mutual TLS, accepted only
//! from the manager's certificate. Each is bounded by its own `timeout_ms`.

use crate::config::AgentConfig;
use crate::vms::Vms;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use kvmha_core::event::{PoolObservation, RecordState};
use kvmha_core::{HostName, PoolName};
use kvmha_proto::transport::Peer;
use kvmha_proto::{
    AgentCommand, CommandRequest, CommandResponse, CommandResult, ErrorBody, PingTestResult, PROTOCOL_VERSION,
};
use kvmha_storage::{read_heartbeat, AgentState, Name, Pool};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bound on one TCP connect of a ping test, whatever the command's budget.
const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// Most targets one ping test may name.
const TARGETS_MAX: usize = 16;

/// What the command handlers work with.
#[derive(Debug)]
pub struct CommandState {
    pub config: Arc<AgentConfig>,
    pub vms: Arc<Vms>,
    /// This agent's pools, for reading neighbours' heartbeats (their own workers: a
    /// check never queues behind this host's own heartbeat or lease i/o).
    pub pools: Vec<Pool>,
}

impl CommandState {
    pub fn new(config: Arc<AgentConfig>, vms: Arc<Vms>) -> Result<CommandState, crate::AgentError> {
        let mut pools = Vec::new();
        for pool in &config.pools {
            pools.push(Pool::open(&format!("{}-checks", pool.name), &pool.path).map_err(|error| {
                crate::AgentError::Io {
                    what: format!("opening pool {} for heartbeat checks", pool.name),
                    source: std::io::Error::other(error.to_string()),
                }
            })?);
        }
        Ok(CommandState { config, vms, pools })
    }
}

pub fn router(state: Arc<CommandState>) -> Router {
    Router::new().route(kvmha_proto::path::COMMAND, post(command)).with_state(state)
}

fn refuse(status: StatusCode, error: impl Into<String>) -> Response {
    (status, Json(ErrorBody::new(error))).into_response()
}

async fn command(State(state): State<Arc<CommandState>>, Extension(peer): Extension<Peer>, body: Bytes) -> Response {
    if peer.cert_sha256.as_deref() != Some(state.config.manager_cert_sha256.as_str()) {
        return refuse(StatusCode::FORBIDDEN, "commands are accepted from the manager's certificate only");
    }
    let request: CommandRequest = match kvmha_proto::decode(&body) {
        Ok(request) => request,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let budget = Duration::from_millis(request.timeout_ms);
    // The handler runs in its own task: a deadline that passes ends the wait for its
    // answer, never a start or stop half-way (the lease taken, the VM not yet tracked).
    let task = tokio::spawn(handle(state, request.command, budget));
    let result = match tokio::time::timeout(budget, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(error)) => CommandResult::Failed { reason: format!("the command's handler failed: {error}") },
        Err(_) => CommandResult::Failed { reason: "the command's deadline passed".into() },
    };
    Json(CommandResponse { version: PROTOCOL_VERSION, request_id: request.request_id, result }).into_response()
}

pub async fn handle(state: Arc<CommandState>, command: AgentCommand, budget: Duration) -> CommandResult {
    let vms = &state.vms;
    match command {
        AgentCommand::PingTest { host, targets } => {
            if targets.len() > TARGETS_MAX {
                return CommandResult::Failed { reason: format!("at most {TARGETS_MAX} targets") };
            }
            let connect_timeout = budget.min(CONNECT_TIMEOUT_MAX);
            let mut results = Vec::new();
            for target in targets {
                results.push(ping_test(&target, connect_timeout).await);
            }
            tracing::debug!(%host, ?results, "ping test");
            CommandResult::PingTest { results }
        }
        AgentCommand::CheckHeartbeat { host } => check_heartbeat(&state, &host, budget).await,
        AgentCommand::ListVms => vms.list().await,
        AgentCommand::GetVmDefinition { vm } => vms.definition(&vm).await,
        AgentCommand::DefineVm { xml } => vms.define(&xml).await,
        AgentCommand::StartVm { vm, work, xml, lease } => vms.start(&vm, work, xml.as_deref(), &lease).await,
        AgentCommand::StopVm { vm, graceful_ms } => vms.stop(&vm, graceful_ms).await,
        AgentCommand::MigrateVm { vm, work, destination_uri } => vms.migrate(&vm, work, &destination_uri, budget).await,
    }
}

/// Reads `host`'s heartbeat record on every pool of this agent twice, about one and a
/// half renewal intervals apart (within half the budget), all pools at once.
async fn check_heartbeat(state: &CommandState, host: &HostName, budget: Duration) -> CommandResult {
    if state.pools.is_empty() {
        return CommandResult::Unsupported { reason: "this agent mounts no pool".into() };
    }
    let (cluster, watched) = match (Name::new(&state.config.cluster_id), Name::new(host.as_str())) {
        (Ok(cluster), Ok(watched)) => (cluster, watched),
        (Err(error), _) | (_, Err(error)) => return CommandResult::Failed { reason: error.to_string() },
    };
    let io_timeout = state.config.lease.io_timeout.min(budget / 4);
    let gap = (state.config.lease.renewal_interval * 3 / 2).min(budget / 2);
    let mut reads = tokio::task::JoinSet::new();
    for pool in &state.pools {
        let (pool, cluster, watched) = (pool.clone(), cluster.clone(), watched.clone());
        let name = PoolName::from(pool.name().trim_end_matches("-checks"));
        reads.spawn(async move {
            let first = read_heartbeat(&pool, &cluster, &watched, io_timeout).await;
            let first_at = Instant::now();
            tokio::time::sleep(gap).await;
            let second = read_heartbeat(&pool, &cluster, &watched, io_timeout).await;
            let record = match (first, second) {
                (_, Err(error)) | (Err(error), _) => RecordState::Unreadable { reason: error.to_string() },
                (_, Ok(None)) | (Ok(None), _) => RecordState::Unreadable { reason: "no record written".into() },
                (Ok(Some(before)), Ok(Some(after))) if before.progress() != after.progress() => RecordState::Advancing,
                (Ok(Some(_)), Ok(Some(after))) => RecordState::Unchanged {
                    unchanged_for: first_at.elapsed(),
                    boot_id: kvmha_core::BootId(after.boot_id.to_string()),
                    watchdog_armed: after.watchdog_armed,
                    stopped_cleanly: after.agent_state == AgentState::StoppedCleanly,
                },
            };
            PoolObservation { pool: name, record }
        });
    }
    let mut pools = reads.join_all().await;
    pools.sort_by(|a, b| a.pool.cmp(&b.pool));
    tracing::debug!(%host, ?pools, "heartbeat check");
    CommandResult::Heartbeat { pools }
}

/// TCP connect to `target` (`IP:PORT`). ICMP needs a raw socket or a ping group the agent
/// may not have; TCP works everywhere. A refused connection is an answer from the
/// target's kernel, so the host is up even if nothing listens on the port.
async fn ping_test(target: &str, timeout: Duration) -> PingTestResult {
    let result = |reachable: bool, detail: String| PingTestResult {
        target: target.to_owned(),
        reachable,
        method: "tcp".to_owned(),
        detail,
    };
    let Ok(address) = target.parse::<std::net::SocketAddr>() else {
        return result(false, format!("{target:?} is not IP:PORT"));
    };
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(_)) => result(true, "tcp connect ok".to_owned()),
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            result(true, "tcp connection refused: the host answered".to_owned())
        }
        Ok(Err(error)) => result(false, format!("tcp: {error}")),
        Err(_) => result(false, format!("tcp: no answer within {}ms", timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ping_test_reports_listening_and_refusing_ports_as_reachable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().to_string();
        let closed = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap().to_string()
        };
        let mut results = Vec::new();
        for target in [open, closed, "not an address".to_owned()] {
            results.push(ping_test(&target, Duration::from_secs(1)).await);
        }
        assert_eq!(results.iter().map(|result| result.reachable).collect::<Vec<_>>(), vec![true, true, false]);
    }
}
