//! The manager's commands to this agent: `POST /v1/command`, mutual TLS, accepted only
//! from the manager's certificate. Each is bounded by its own `timeout_ms`.

use crate::config::AgentConfig;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use kvmha_proto::transport::Peer;
use kvmha_proto::{
    AgentCommand, CommandRequest, CommandResponse, CommandResult, ErrorBody, PingTestResult, PROTOCOL_VERSION,
};
use std::sync::Arc;
use std::time::Duration;

/// Bound on one TCP connect of a ping test, whatever the command's budget.
const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// Most targets one ping test may name.
const TARGETS_MAX: usize = 16;

pub fn router(config: Arc<AgentConfig>) -> Router {
    Router::new().route(kvmha_proto::path::COMMAND, post(command)).with_state(config)
}

fn refuse(status: StatusCode, error: impl Into<String>) -> Response {
    (status, Json(ErrorBody::new(error))).into_response()
}

async fn command(State(config): State<Arc<AgentConfig>>, Extension(peer): Extension<Peer>, body: Bytes) -> Response {
    if peer.cert_sha256.as_deref() != Some(config.manager_cert_sha256.as_str()) {
        return refuse(StatusCode::FORBIDDEN, "commands are accepted from the manager's certificate only");
    }
    let request: CommandRequest = match kvmha_proto::decode(&body) {
        Ok(request) => request,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let budget = Duration::from_millis(request.timeout_ms);
    let result = match tokio::time::timeout(budget, handle(request.command, budget)).await {
        Ok(result) => result,
        Err(_) => CommandResult::Failed { reason: "the command's deadline passed".into() },
    };
    Json(CommandResponse { version: PROTOCOL_VERSION, request_id: request.request_id, result }).into_response()
}

pub async fn handle(command: AgentCommand, budget: Duration) -> CommandResult {
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
        AgentCommand::CheckHeartbeat { .. } => {
            CommandResult::Unsupported { reason: "unsupported: heartbeat checks need issue 5 (storage wiring)".into() }
        }
        // No hypervisor driver yet: nothing runs here that kvmha knows of.
        AgentCommand::ListVms => CommandResult::Vms { vms: Vec::new() },
        AgentCommand::StartVm { .. }
        | AgentCommand::StopVm { .. }
        | AgentCommand::GetVmDefinition { .. }
        | AgentCommand::DefineVm { .. }
        | AgentCommand::MigrateVm { .. } => {
            CommandResult::Unsupported { reason: "unsupported: needs issue 6 (hypervisor drivers)".into() }
        }
    }
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
    async fn vm_commands_answer_unsupported_with_the_issue() {
        let result = handle(AgentCommand::StopVm { vm: "vm1".into(), graceful_ms: 0 }, Duration::from_secs(1)).await;
        assert_eq!(
            result,
            CommandResult::Unsupported { reason: "unsupported: needs issue 6 (hypervisor drivers)".into() }
        );
    }

    #[tokio::test]
    async fn ping_test_reports_listening_and_refusing_ports_as_reachable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().to_string();
        let closed = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap().to_string()
        };
        let targets = vec![open, closed, "not an address".to_owned()];
        let CommandResult::PingTest { results } =
            handle(AgentCommand::PingTest { host: "h".into(), targets }, Duration::from_secs(1)).await
        else {
            panic!("not a ping test result");
        };
        assert_eq!(results.iter().map(|result| result.reachable).collect::<Vec<_>>(), vec![true, true, false]);
    }
}
