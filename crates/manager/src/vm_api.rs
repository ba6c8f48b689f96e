//! The operator's VM actions: define, start, stop and HA settings (`/v1/vms/...`).
//!
//! Operator starts and stops are not HA decisions: the engine does not plan them. They go
//! through the same agent commands as the recovery worker's, so the target agent takes
//! the VM's lease (only a free one: `LeaseGrant::IfFree`) and a VM cannot run twice. The
//! engine learns the result from the agent's pings: a VM stopped on purpose is reported
//! `Stopped` and never restarted; a started one is found running. Every action is audited
//! before it is sent (who, what, where) and its outcome after.

use crate::api::{actor, authorize, error, json_body, view, OperatorApi, Refusal, Role};
use crate::controller::{Note, VmView};
use crate::registry::VmRow;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvmha_core::event::{AuditKind, Event, OperatorAction};
use kvmha_core::{HostName, HostState, VmName, VmState};
use kvmha_proto::{AgentCommand, CommandResult, LeaseGrant};
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Budget of a define or start sent to an agent on an operator's behalf.
const OPERATOR_CALL_BUDGET: Duration = Duration::from_secs(30);
/// How long a stop answer waits for the engine to hear of the stop from a ping.
const STOP_SEEN_WAIT: Duration = Duration::from_secs(5);
/// Work ids of operator starts have this bit set: they never collide with the engine's
/// request ids, which count up from 1.
pub const OPERATOR_WORK_BIT: u64 = 1 << 62;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefineBody {
    host: String,
    xml: String,
    #[serde(default)]
    start: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    host: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    graceful_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HaBody {
    enabled: bool,
    priority: Option<i32>,
    /// `""` clears the group.
    group: Option<String>,
    /// `[]` clears the node affinity.
    hosts: Option<Vec<String>>,
    max_restarts: Option<u32>,
    max_relocations: Option<u32>,
}

/// A body that may be empty (all its fields optional).
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    json_body(body)
}

fn note(host: Option<&HostName>, vm: &VmName, kind: AuditKind, detail: String) -> Note {
    Note { host: host.cloned(), vm: Some(vm.clone()), kind, detail }
}

/// What the operator actions need to know of one VM and its cluster, read once.
struct Known {
    view: Option<VmView>,
    row: Option<VmRow>,
    hosts: Vec<crate::controller::HostView>,
}

async fn known(api: &OperatorApi, name: &str) -> Result<Known, Refusal> {
    let cluster = view(api).await?;
    let row = api.registry.read().expect("registry lock").get(&VmName::from(name)).cloned();
    let view = cluster.vms.into_iter().find(|vm| vm.name == name);
    Ok(Known { view, row, hosts: cluster.hosts })
}

impl Known {
    fn exists(&self) -> bool {
        self.view.is_some() || self.row.is_some()
    }
    fn host_state(&self, host: &str) -> Option<HostState> {
        self.hosts.iter().find(|known| known.name == host).map(|known| known.state)
    }
    /// The engine's host, else where it last ran.
    fn host(&self) -> Option<String> {
        let engine = self.view.as_ref().and_then(|vm| vm.host.clone().or_else(|| vm.last_host.clone()));
        engine.or_else(|| self.row.as_ref().and_then(|row| row.last_host.as_ref().map(|host| host.to_string())))
    }
    fn state(&self) -> Option<VmState> {
        self.view.as_ref().map(|vm| vm.state)
    }
}

/// States in which kvmha runs the VM or is about to: operators may not start it too.
fn active(state: VmState) -> bool {
    matches!(state, VmState::Running | VmState::Starting | VmState::AwaitingProof | VmState::PendingCapacity)
}

async fn write_notes(api: &OperatorApi, notes: Vec<Note>) -> Result<(), Refusal> {
    api.controller
        .audit(notes)
        .await
        .map_err(|failure| Refusal::new(StatusCode::SERVICE_UNAVAILABLE, format!("audit not written: {failure}")))
}

/// The VM's view with the audit lines of the action, or 404 if it vanished.
async fn answer(api: &OperatorApi, name: &str, lines: Vec<String>) -> Response {
    match known(api, name).await {
        Ok(Known { view: Some(vm), .. }) => {
            let mut value = serde_json::to_value(vm).unwrap_or_default();
            value["audit"] = json!(lines);
            Json(value).into_response()
        }
        Ok(_) => error(StatusCode::NOT_FOUND, format!("no vm named {name:?}")),
        Err(refusal) => refusal.into_response(),
    }
}

fn refused(status: StatusCode, message: String, lines: Vec<String>) -> Response {
    (status, Json(json!({ "error": message, "audit": lines }))).into_response()
}

fn operator_work_id() -> u64 {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0);
    OPERATOR_WORK_BIT | (micros & (OPERATOR_WORK_BIT - 1))
}

/// `POST /v1/vms`: define a VM on a host from its domain XML, keep the XML in the
/// registry, and start it there when asked.
pub async fn define(State(api): State<Arc<OperatorApi>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let role = match authorize(&api, &headers, Role::Operator) {
        Ok(role) => role,
        Err(refusal) => return refusal.into_response(),
    };
    let body: DefineBody = match json_body(&body) {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let definition = match kvmha_hypervisor::definition::DomainDefinition::parse(&body.xml) {
        Ok(definition) => definition,
        Err(failure) => return error(StatusCode::BAD_REQUEST, format!("xml: {failure}")),
    };
    let name = VmName::from(definition.name.as_str());
    let host = HostName::from(body.host.as_str());
    let known = match known(&api, name.as_str()).await {
        Ok(known) => known,
        Err(refusal) => return refusal.into_response(),
    };
    if known.host_state(host.as_str()).is_none() {
        return error(StatusCode::NOT_FOUND, format!("host: no host named {:?}", body.host));
    }
    if let Some(vm) = &known.view {
        let elsewhere = vm.host.as_deref().is_some_and(|running| running != host.as_str());
        if elsewhere && matches!(vm.state, VmState::Running | VmState::Starting | VmState::AwaitingProof) {
            return error(
                StatusCode::CONFLICT,
                format!("vm {name} is {} on {}: stop it first", vm.state, vm.host.as_deref().unwrap_or("-")),
            );
        }
    }
    let by = actor(role);
    let memory_mb = definition.memory_kib.div_ceil(1024);
    let mut lines = Vec::new();
    let intent = format!("define on {host} by {by} ({} vcpus, {memory_mb} MiB)", definition.vcpus);
    lines.push(format!("{host} vm {name} Operator: {intent}"));
    if let Err(refusal) = write_notes(&api, vec![note(Some(&host), &name, AuditKind::Operator, intent)]).await {
        return refusal.into_response();
    }
    let deadline = api.executor.clock().now() + OPERATOR_CALL_BUDGET;
    let result = api.executor.send(&host, AgentCommand::DefineVm { xml: body.xml.clone() }, deadline).await;
    let failure = match result {
        Ok(CommandResult::Done) => None,
        Ok(CommandResult::Failed { reason }) | Ok(CommandResult::Unsupported { reason }) => Some(reason),
        Ok(other) => Some(format!("unexpected answer {other:?}")),
        Err(reason) => Some(reason),
    };
    if let Some(reason) = failure {
        let detail = format!("define on {host} failed: {reason}");
        lines.push(format!("{host} vm {name} Operator: {detail}"));
        let _ = write_notes(&api, vec![note(Some(&host), &name, AuditKind::Operator, detail)]).await;
        return refused(StatusCode::BAD_GATEWAY, format!("define on {host} failed: {reason}"), lines);
    }
    let mut row = known.row.clone().unwrap_or_else(|| VmRow::new(name.clone()));
    row.xml = Some(body.xml);
    row.vcpus = definition.vcpus;
    row.memory_mb = memory_mb;
    let running_elsewhere = known.view.as_ref().is_some_and(|vm| vm.host.is_some() && active(vm.state));
    if !running_elsewhere {
        row.last_host = Some(host.clone());
    }
    let detail = format!("defined on {host}; registry keeps its definition (HA {})", on_off(row.ha.enabled));
    lines.push(format!("{host} vm {name} Operator: {detail}"));
    let notes = vec![note(Some(&host), &name, AuditKind::Operator, detail)];
    if let Err(failure) = api.controller.upsert_vm(row, None, notes).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, format!("registry not written: {failure}"));
    }
    if body.start {
        return start_on(&api, &name, Some(host.to_string()), &by, lines).await;
    }
    answer(&api, name.as_str(), lines).await
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// `POST /v1/vms/{name}/start`.
pub async fn start(
    State(api): State<Arc<OperatorApi>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let role = match authorize(&api, &headers, Role::Operator) {
        Ok(role) => role,
        Err(refusal) => return refusal.into_response(),
    };
    let body: StartBody = match optional_body(&body) {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    start_on(&api, &VmName::from(name.as_str()), body.host, &actor(role), Vec::new()).await
}

async fn start_on(
    api: &OperatorApi,
    name: &VmName,
    host: Option<String>,
    by: &str,
    mut lines: Vec<String>,
) -> Response {
    let known = match known(api, name.as_str()).await {
        Ok(known) => known,
        Err(refusal) => return refusal.into_response(),
    };
    if !known.exists() {
        return error(StatusCode::NOT_FOUND, format!("no vm named {name:?}"));
    }
    if let Some(state) = known.state().filter(|state| active(*state)) {
        let host = known.host().unwrap_or_else(|| "-".to_owned());
        return refused(
            StatusCode::CONFLICT,
            format!("vm {name} is {state} (host {host}): kvmha already runs it or is restarting it"),
            lines,
        );
    }
    let Some(target) = host.or_else(|| known.host()) else {
        return error(StatusCode::BAD_REQUEST, format!("host: vm {name} has no last host; name one"));
    };
    match known.host_state(&target) {
        None => return error(StatusCode::NOT_FOUND, format!("host: no host named {target:?}")),
        Some(HostState::Up) => {}
        Some(state) => {
            return refused(StatusCode::CONFLICT, format!("host {target} is {state}, not Up: start refused"), lines)
        }
    }
    let target = HostName::from(target.as_str());
    let xml = known.row.as_ref().and_then(|row| row.xml.clone());
    let work = operator_work_id();
    let intent = format!(
        "start on {target} by {by} (work {work}, lease only if free{})",
        if xml.is_some() { "" } else { "; no definition in the registry: the host must know the VM" }
    );
    lines.push(format!("{target} vm {name} Operator: {intent}"));
    if let Err(refusal) = write_notes(api, vec![note(Some(&target), name, AuditKind::Operator, intent)]).await {
        return refusal.into_response();
    }
    let command = AgentCommand::StartVm { vm: name.clone(), work, xml, lease: LeaseGrant::IfFree };
    let deadline = api.executor.clock().now() + OPERATOR_CALL_BUDGET;
    let result = api.executor.send(&target, command, deadline).await;
    let (status, detail) = match result {
        Ok(CommandResult::Done) => (StatusCode::OK, format!("operator start work {work}: started on {target}")),
        Ok(CommandResult::AlreadyRunning) => {
            (StatusCode::OK, format!("operator start work {work}: already running on {target}"))
        }
        Ok(CommandResult::LeaseHeld { owner }) => {
            (StatusCode::CONFLICT, format!("operator start work {work} refused: lease held by {owner}"))
        }
        Ok(CommandResult::Failed { reason }) | Ok(CommandResult::Unsupported { reason }) => {
            (StatusCode::BAD_GATEWAY, format!("operator start work {work} failed on {target}: {reason}"))
        }
        Ok(other) => (StatusCode::BAD_GATEWAY, format!("operator start work {work}: unexpected answer {other:?}")),
        Err(reason) => (StatusCode::GATEWAY_TIMEOUT, format!("operator start work {work}: no answer: {reason}")),
    };
    lines.push(format!("{target} vm {name} VmStartOutcome: {detail}"));
    let _ = write_notes(api, vec![note(Some(&target), name, AuditKind::VmStartOutcome, detail.clone())]).await;
    if status != StatusCode::OK {
        return refused(status, detail, lines);
    }
    api.executor.remember_host(name, &target).await;
    answer(api, name.as_str(), lines).await
}

/// `POST /v1/vms/{name}/stop`.
pub async fn stop(
    State(api): State<Arc<OperatorApi>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let role = match authorize(&api, &headers, Role::Operator) {
        Ok(role) => role,
        Err(refusal) => return refusal.into_response(),
    };
    let body: StopBody = match optional_body(&body) {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let vm = VmName::from(name.as_str());
    let known = match known(&api, &name).await {
        Ok(known) => known,
        Err(refusal) => return refusal.into_response(),
    };
    if !known.exists() {
        return error(StatusCode::NOT_FOUND, format!("no vm named {name:?}"));
    }
    let graceful_ms = body.graceful_ms.unwrap_or(0);
    let by = actor(role);
    let mut lines = Vec::new();
    let before = known.state();
    if before.is_some() {
        // The engine hears of the stop before the host does: a host dying between the
        // stop and its next ping must not get the VM restarted elsewhere (operator intent
        // wins), and a restart still pending is cancelled here.
        let action = OperatorAction::VmStop { vm: vm.clone(), by: by.clone() };
        let outcome = match api.controller.step(Event::Operator(action)).await {
            Ok(outcome) => outcome,
            Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "manager is stopping"),
        };
        lines.extend(outcome.audits.iter().map(|audit| audit.describe()));
        if let Some(refusal) = outcome.audits.iter().find(|audit| audit.kind == AuditKind::OperatorRefused) {
            return refused(StatusCode::CONFLICT, refusal.detail.clone(), lines);
        }
        if matches!(before, Some(VmState::AwaitingProof | VmState::PendingCapacity)) {
            // Nothing of it runs that kvmha started: the cancelled restart was the stop.
            return answer(&api, &name, lines).await;
        }
    }
    let Some(host) = known.host() else {
        return error(StatusCode::CONFLICT, format!("vm {name} has no host to stop it on"));
    };
    let host = HostName::from(host.as_str());
    let intent = format!("stop on {host} by {by} (graceful {graceful_ms} ms, then hard)");
    lines.push(format!("{host} vm {name} Operator: {intent}"));
    if let Err(refusal) = write_notes(&api, vec![note(Some(&host), &vm, AuditKind::Operator, intent)]).await {
        return refusal.into_response();
    }
    let deadline = api.executor.clock().now() + Duration::from_millis(graceful_ms) + OPERATOR_CALL_BUDGET;
    let result = api.executor.send(&host, AgentCommand::StopVm { vm: vm.clone(), graceful_ms }, deadline).await;
    // Refused: the agent answered and the VM still runs there. No answer: the host may
    // have died with the stop in flight; the VM stays stopped for kvmha either way.
    let (failure, agent_refusal) = match result {
        Ok(CommandResult::Done) => (None, None),
        Ok(CommandResult::Failed { reason }) | Ok(CommandResult::Unsupported { reason }) => {
            (Some(reason.clone()), Some(reason))
        }
        Ok(other) => (Some(format!("unexpected answer {other:?}")), Some(format!("unexpected answer {other:?}"))),
        Err(reason) => (Some(reason), None),
    };
    if before.is_some() {
        let action = OperatorAction::VmStopOutcome { vm: vm.clone(), by: by.clone(), refused: agent_refusal };
        if let Ok(outcome) = api.controller.step(Event::Operator(action)).await {
            lines.extend(outcome.audits.iter().map(|audit| audit.describe()));
        }
    }
    let detail = match &failure {
        None => format!("stopped on {host}: not restarted until an operator starts it"),
        Some(reason) => format!("stop on {host} failed: {reason}"),
    };
    lines.push(format!("{host} vm {name} Operator: {detail}"));
    let _ = write_notes(&api, vec![note(Some(&host), &vm, AuditKind::Operator, detail.clone())]).await;
    if failure.is_some() {
        return refused(StatusCode::BAD_GATEWAY, detail, lines);
    }
    // The engine hears of the stop from the host's next ping; wait for it briefly so that
    // the answer shows the VM stopped.
    let until = std::time::Instant::now() + STOP_SEEN_WAIT;
    while std::time::Instant::now() < until {
        match known_state(&api, &name).await {
            Some(VmState::Running) => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => break,
        }
    }
    answer(&api, &name, lines).await
}

async fn known_state(api: &OperatorApi, name: &str) -> Option<VmState> {
    known(api, name).await.ok().and_then(|known| known.state())
}

/// `POST /v1/vms/{name}/ha`.
pub async fn ha(
    State(api): State<Arc<OperatorApi>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let role = match authorize(&api, &headers, Role::Operator) {
        Ok(role) => role,
        Err(refusal) => return refusal.into_response(),
    };
    let body: HaBody = match json_body(&body) {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let vm = VmName::from(name.as_str());
    let known = match known(&api, &name).await {
        Ok(known) => known,
        Err(refusal) => return refusal.into_response(),
    };
    if !known.exists() {
        return error(StatusCode::NOT_FOUND, format!("no vm named {name:?}"));
    }
    let mut row = known.row.clone().unwrap_or_else(|| {
        let mut row = VmRow::new(vm.clone());
        if let Some(view) = &known.view {
            row.vcpus = view.vcpus;
            row.memory_mb = view.memory_mb;
            row.last_host = view.last_host.as_deref().map(HostName::from);
        }
        row
    });
    if let Some(hosts) = &body.hosts {
        let unknown: Vec<&String> = hosts.iter().filter(|host| known.host_state(host).is_none()).collect();
        if !unknown.is_empty() {
            return error(StatusCode::BAD_REQUEST, format!("hosts: no host named {unknown:?}"));
        }
    }
    if body.max_restarts == Some(0) {
        return error(StatusCode::BAD_REQUEST, "max_restarts: at least 1 (a restart budget of 0 never restarts)");
    }
    row.ha.enabled = body.enabled;
    if let Some(priority) = body.priority {
        row.ha.priority = priority;
    }
    if let Some(group) = body.group {
        row.ha.group = (!group.is_empty()).then_some(group);
    }
    if let Some(hosts) = body.hosts {
        row.ha.hosts = hosts.iter().map(|host| HostName::from(host.as_str())).collect::<BTreeSet<_>>();
    }
    if let Some(max_restarts) = body.max_restarts {
        row.ha.max_restarts = max_restarts;
    }
    if let Some(max_relocations) = body.max_relocations {
        row.ha.max_relocations = max_relocations;
    }
    let mut warning = None;
    if row.ha.enabled && row.xml.is_none() {
        if let Some(host) = known.host() {
            let host = HostName::from(host.as_str());
            let deadline = api.executor.clock().now() + OPERATOR_CALL_BUDGET;
            match api.executor.send(&host, AgentCommand::GetVmDefinition { vm: vm.clone() }, deadline).await {
                Ok(CommandResult::Definition { xml }) => row.xml = Some(xml),
                Ok(other) => warning = Some(format!("definition not read from {host}: {other:?}")),
                Err(reason) => warning = Some(format!("definition not read from {host}: {reason}")),
            }
        }
        if row.xml.is_none() && warning.is_none() {
            warning = Some("no definition known".to_owned());
        }
    }
    let settings = &row.ha;
    let mut detail = format!(
        "HA {} by {}: priority {}, group {}, hosts [{}], max_restarts {}, max_relocations {}",
        if settings.enabled { "enabled" } else { "disabled" },
        actor(role),
        settings.priority,
        settings.group.as_deref().unwrap_or("-"),
        settings.hosts.iter().map(HostName::as_str).collect::<Vec<_>>().join(","),
        settings.max_restarts,
        settings.max_relocations
    );
    if let Some(warning) = &warning {
        detail.push_str(&format!("; {warning}: it can restart only on a host that has it defined"));
    }
    let host = known.host().map(|host| HostName::from(host.as_str()));
    let line =
        format!("{}vm {name} Operator: {detail}", host.as_ref().map(|host| format!("{host} ")).unwrap_or_default());
    let notes = vec![note(host.as_ref(), &vm, AuditKind::Operator, detail)];
    if let Err(failure) = api.controller.upsert_vm(row, None, notes).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, format!("registry not written: {failure}"));
    }
    answer(&api, &name, vec![line]).await
}
