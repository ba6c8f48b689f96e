//! The storage-heartbeat investigator through neighbours (ARCHITECTURE.md §4): for a
//! host whose pools the manager does not mount (all or some), the neighbours chosen for
//! the round read its heartbeat record on their own pools (`CheckHeartbeat`).
//!
//! A record a neighbour saw advancing makes the host `Alive`. Nothing a neighbour reads
//! makes it dead: a neighbour watches only for a moment, so "unchanged" from it is
//! evidence for people, and the lease-expiry proof comes from the manager's own reads
//! alone (the observation passed on is the direct one).

use crate::config::ManagerConfig;
use crate::executor::Executor;
use crate::heartbeat::HeartbeatReader;
use kvmha_core::event::{Finding, HeartbeatObservation, PoolObservation, RecordState};
use kvmha_core::{HostName, Instant};
use kvmha_proto::{AgentCommand, CommandResult};
use std::sync::Arc;

/// Whether some of `host`'s pools are not mounted on the manager.
pub fn needs_neighbours(config: &ManagerConfig, host: &HostName) -> bool {
    config.hosts.get(host).is_some_and(|host| host.pools.iter().any(|pool| !config.pools.contains_key(pool)))
}

/// What the heartbeat investigator asks about one host in one round.
#[derive(Debug)]
pub struct Question<'a> {
    pub host: &'a HostName,
    pub neighbours: &'a [HostName],
    pub deadline: Instant,
    pub budget: std::time::Duration,
    pub evidence_after: std::time::Instant,
}

/// The heartbeat investigator's finding: the manager's own reads, and the neighbours'
/// where the manager does not mount every pool of the host. `None` when neither applies.
pub async fn investigate(
    executor: &Arc<Executor>,
    config: &ManagerConfig,
    direct: &HeartbeatReader,
    question: Question<'_>,
) -> Option<(Finding, String, Option<HeartbeatObservation>)> {
    let Question { host, neighbours, deadline, budget, evidence_after } = question;
    let direct_read = async {
        match tokio::time::timeout(budget, direct.investigate(host, evidence_after)).await {
            Ok(found) => found.map(|(finding, evidence, observation)| (finding, evidence, Some(observation))),
            Err(_) => Some((Finding::Unknown, "heartbeat: no read before the deadline".into(), None)),
        }
    };
    if !needs_neighbours(config, host) {
        return direct_read.await;
    }
    let (direct, (via_finding, via_evidence)) =
        tokio::join!(direct_read, ask_neighbours(executor, host, neighbours, deadline));
    match direct {
        Some((finding, evidence, observation)) => {
            let alive = finding == Finding::Alive || via_finding == Finding::Alive;
            let finding = if alive { Finding::Alive } else { Finding::Unknown };
            Some((finding, format!("{evidence}; via neighbours: {via_evidence}"), observation))
        }
        None => Some((via_finding, format!("via neighbours: {via_evidence}"), None)),
    }
}

async fn ask_neighbours(
    executor: &Arc<Executor>,
    host: &HostName,
    neighbours: &[HostName],
    deadline: Instant,
) -> (Finding, String) {
    if neighbours.is_empty() {
        return (Finding::Unknown, "no neighbour to ask".to_owned());
    }
    let mut asks = tokio::task::JoinSet::new();
    for neighbour in neighbours {
        let (executor, neighbour, host) = (executor.clone(), neighbour.clone(), host.clone());
        asks.spawn(async move {
            let answer = executor.send(&neighbour, AgentCommand::CheckHeartbeat { host }, deadline).await;
            (neighbour, answer)
        });
    }
    let mut answers = asks.join_all().await;
    answers.sort_by(|a, b| a.0.cmp(&b.0));
    let mut alive = false;
    let mut parts = Vec::new();
    for (neighbour, answer) in answers {
        match answer {
            Ok(CommandResult::Heartbeat { pools }) => {
                alive |= pools.iter().any(|pool| pool.record == RecordState::Advancing);
                let seen = pools.iter().map(describe).collect::<Vec<_>>().join(", ");
                parts.push(format!("{neighbour} read {seen}"));
            }
            Ok(other) => parts.push(format!("{neighbour} answered {other:?}")),
            Err(error) => parts.push(format!("{neighbour} did not answer ({error})")),
        }
    }
    (if alive { Finding::Alive } else { Finding::Unknown }, parts.join("; "))
}

fn describe(pool: &PoolObservation) -> String {
    match &pool.record {
        RecordState::Advancing => format!("{}: advancing", pool.pool),
        RecordState::Unchanged { unchanged_for, stopped_cleanly, .. } => format!(
            "{}: unchanged while watched for {}ms{}",
            pool.pool,
            unchanged_for.as_millis(),
            if *stopped_cleanly { " (stopped cleanly)" } else { "" }
        ),
        RecordState::Unreadable { reason } => format!("{}: unreadable ({reason})", pool.pool),
    }
}
