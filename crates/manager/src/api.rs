//! The operator API: JSON over plain HTTP on `api_listen` (a loopback address by
//! default; see docs/daemons.md for why it is not on the agents' TLS listener).
//!
//! Bearer tokens, stored as SHA-256 in manager.toml, with two roles: read-only (GET) and
//! operator (GET and POST). Handlers turn a request into an engine [`Event`] or a query;
//! they never touch state directly. `/openapi.json` is generated from [`ROUTES`], the
//! same table the router is checked against in tests.

use crate::controller::{ClusterView, Controller, HostView, VmView};
use crate::store::{EventRow, Store};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvmha_core::event::{AuditKind, OperatorAction};
use kvmha_core::{Event, HostName};
use kvmha_proto::pki::sha256_hex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The longest a long-poll of `/v1/events` waits.
const EVENTS_WAIT_MAX: Duration = Duration::from_secs(30);
const EVENTS_PAGE_MAX: u32 = 1000;
/// The largest request body the operator API reads.
pub const API_BODY_MAX_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    ReadOnly,
    Operator,
}

#[derive(Debug)]
pub struct OperatorApi {
    pub controller: Controller,
    /// Joined agents and revoked certificates (`host remove` changes both).
    pub directory: crate::controller::SharedDirectory,
    /// A second connection for reads (WAL lets it read while the engine thread writes).
    pub store: Mutex<Store>,
    pub last_event: watch::Receiver<i64>,
    pub operator_token_sha256: Vec<String>,
    pub readonly_token_sha256: Vec<String>,
    /// Sends the operator's VM commands to agents ([`crate::vm_api`]).
    pub executor: Arc<crate::executor::Executor>,
    pub registry: crate::registry::SharedRegistry,
}

/// One route: what the OpenAPI document says about it.
#[derive(Debug)]
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub role: Role,
    pub summary: &'static str,
    pub body: Option<&'static str>,
}

pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/v1/hosts",
        role: Role::ReadOnly,
        summary: "every host with its state",
        body: None,
    },
    RouteDoc { method: "get", path: "/v1/hosts/{name}", role: Role::ReadOnly, summary: "one host", body: None },
    RouteDoc { method: "get", path: "/v1/vms", role: Role::ReadOnly, summary: "every VM with its state", body: None },
    RouteDoc { method: "get", path: "/v1/vms/{name}", role: Role::ReadOnly, summary: "one VM", body: None },
    RouteDoc {
        method: "post",
        path: "/v1/vms",
        role: Role::Operator,
        summary: "define a VM on a host from its domain XML (the registry keeps it) and optionally start it there",
        body: Some("{\"host\": string, \"xml\": string, \"start\": bool (default false)}"),
    },
    RouteDoc {
        method: "post",
        path: "/v1/vms/{name}/start",
        role: Role::Operator,
        summary: "start a stopped VM (lease only if free); default host: where it last ran",
        body: Some("{\"host\": string (optional)}"),
    },
    RouteDoc {
        method: "post",
        path: "/v1/vms/{name}/stop",
        role: Role::Operator,
        summary: "stop a VM on purpose: it is not restarted until an operator starts it",
        body: Some("{\"graceful_ms\": int (optional, default 0: hard stop)}"),
    },
    RouteDoc {
        method: "post",
        path: "/v1/vms/{name}/ha",
        role: Role::Operator,
        summary: "HA settings of one VM",
        body: Some(
            "{\"enabled\": bool, \"priority\": int, \"group\": string, \"hosts\": [string], \"max_restarts\": int, \"max_relocations\": int} (all but enabled optional; unchanged when absent)",
        ),
    },
    RouteDoc {
        method: "get",
        path: "/v1/events",
        role: Role::ReadOnly,
        summary: "audit log after ?after=ID; ?wait_ms=N long-polls for new lines",
        body: None,
    },
    RouteDoc { method: "get", path: "/v1/cluster", role: Role::ReadOnly, summary: "cluster-wide switches", body: None },
    RouteDoc {
        method: "post",
        path: "/v1/hosts/{name}/maintenance",
        role: Role::Operator,
        summary: "maintenance mode on or off",
        body: Some("{\"on\": bool}"),
    },
    RouteDoc {
        method: "post",
        path: "/v1/hosts/{name}/confirm-down",
        role: Role::Operator,
        summary: "an operator confirms the host is off (proof 3 of the safety rule)",
        body: None,
    },
    RouteDoc {
        method: "post",
        path: "/v1/hosts/{name}/remove",
        role: Role::Operator,
        summary: "remove a host no VM depends on from the cluster and revoke its agent certificate for good",
        body: None,
    },
    RouteDoc {
        method: "post",
        path: "/v1/hosts/{name}/ha",
        role: Role::Operator,
        summary: "HA for one host on or off",
        body: Some("{\"enabled\": bool}"),
    },
    RouteDoc {
        method: "post",
        path: "/v1/cluster/disarm",
        role: Role::Operator,
        summary: "release watchdogs, fence nobody",
        body: None,
    },
    RouteDoc { method: "post", path: "/v1/cluster/arm", role: Role::Operator, summary: "end a disarm", body: None },
    RouteDoc {
        method: "get",
        path: "/openapi.json",
        role: Role::ReadOnly,
        summary: "this document (no token)",
        body: None,
    },
];

pub fn router(api: Arc<OperatorApi>) -> Router {
    Router::new()
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{name}", get(show_host))
        .route("/v1/vms", get(list_vms).post(crate::vm_api::define))
        .route("/v1/vms/{name}", get(show_vm))
        .route("/v1/vms/{name}/start", post(crate::vm_api::start))
        .route("/v1/vms/{name}/stop", post(crate::vm_api::stop))
        .route("/v1/vms/{name}/ha", post(crate::vm_api::ha))
        .route("/v1/events", get(events))
        .route("/v1/cluster", get(cluster))
        .route("/v1/hosts/{name}/maintenance", post(maintenance))
        .route("/v1/hosts/{name}/confirm-down", post(confirm_down))
        .route("/v1/hosts/{name}/ha", post(host_ha))
        .route("/v1/hosts/{name}/remove", post(remove_host))
        .route("/v1/cluster/disarm", post(disarm))
        .route("/v1/cluster/arm", post(arm))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint (see /openapi.json)") })
        // Operator bodies are a few bytes ({"on": true}): anything bigger is refused (413)
        // before it is buffered.
        .layer(axum::extract::DefaultBodyLimit::max(API_BODY_MAX_BYTES))
        .with_state(api)
}

/// Every refusal: `{"error": "..."}` with a status that says which kind.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A refusal not yet turned into a response (small, so `Result`s stay cheap).
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    message: String,
}

fn refusal(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal { status, message: message.into() }
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        refusal(status, message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.status, self.message)
    }
}

pub(crate) fn authorize(api: &OperatorApi, headers: &HeaderMap, needed: Role) -> Result<Role, Refusal> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(refusal(StatusCode::UNAUTHORIZED, "missing bearer token (Authorization: Bearer TOKEN)"));
    };
    let token = value.to_str().ok().and_then(|value| value.strip_prefix("Bearer ")).unwrap_or("");
    let hash = sha256_hex(token.trim().as_bytes());
    let role = if api.operator_token_sha256.contains(&hash) {
        Role::Operator
    } else if api.readonly_token_sha256.contains(&hash) {
        Role::ReadOnly
    } else {
        return Err(refusal(StatusCode::UNAUTHORIZED, "unknown token"));
    };
    if role < needed {
        return Err(refusal(StatusCode::FORBIDDEN, "this token is read-only: an operator token is needed"));
    }
    Ok(role)
}

pub(crate) async fn view(api: &OperatorApi) -> Result<ClusterView, Refusal> {
    api.controller.view().await.map_err(|_| refusal(StatusCode::SERVICE_UNAVAILABLE, "manager is stopping"))
}

/// What every read-only route starts with: the caller may read, and the cluster as seen now.
async fn read_view(api: &OperatorApi, headers: &HeaderMap) -> Result<ClusterView, Response> {
    authorize(api, headers, Role::ReadOnly).map_err(IntoResponse::into_response)?;
    view(api).await.map_err(IntoResponse::into_response)
}

async fn list_hosts(State(api): State<Arc<OperatorApi>>, headers: HeaderMap) -> Response {
    let view = match read_view(&api, &headers).await {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    Json::<Vec<HostView>>(view.hosts).into_response()
}

async fn show_host(State(api): State<Arc<OperatorApi>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let view = match read_view(&api, &headers).await {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    match view.hosts.into_iter().find(|host| host.name == name) {
        Some(host) => Json(host).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no host named {name:?}")),
    }
}

async fn list_vms(State(api): State<Arc<OperatorApi>>, headers: HeaderMap) -> Response {
    let view = match read_view(&api, &headers).await {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    Json::<Vec<VmView>>(view.vms).into_response()
}

async fn show_vm(State(api): State<Arc<OperatorApi>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let view = match read_view(&api, &headers).await {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    match view.vms.into_iter().find(|vm| vm.name == name) {
        Some(vm) => Json(vm).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no vm named {name:?}")),
    }
}

async fn cluster(State(api): State<Arc<OperatorApi>>, headers: HeaderMap) -> Response {
    let view = match read_view(&api, &headers).await {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    Json(json!({
        "cluster_ha": view.cluster_ha,
        "disarmed": view.disarmed,
        "storage_hold": view.storage_hold,
        "manager_isolated": view.manager_isolated,
        "hosts": view.hosts.len(),
        "vms": view.vms.len(),
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<i64>,
    wait_ms: Option<u64>,
    limit: Option<u32>,
}

#[derive(Debug, Serialize)]
struct EventsPage {
    events: Vec<EventRow>,
    /// Pass as `after` to get what comes next.
    last_id: i64,
}

async fn events(
    State(api): State<Arc<OperatorApi>>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refusal) = authorize(&api, &headers, Role::ReadOnly) {
        return refusal.into_response();
    }
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let after = query.after.unwrap_or(0);
    let limit = query.limit.unwrap_or(EVENTS_PAGE_MAX).min(EVENTS_PAGE_MAX);
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(0)).min(EVENTS_WAIT_MAX);
    let mut last_event = api.last_event.clone();
    if wait > Duration::ZERO && *last_event.borrow_and_update() <= after {
        let _ = tokio::time::timeout(wait, last_event.wait_for(|last| *last > after)).await;
    }
    let api_for_read = api.clone();
    let rows =
        tokio::task::spawn_blocking(move || api_for_read.store.lock().expect("store lock").events_after(after, limit))
            .await;
    match rows {
        Ok(Ok(events)) => {
            let last_id = events.last().map_or(after, |event| event.id);
            Json(EventsPage { events, last_id }).into_response()
        }
        Ok(Err(failure)) => error(StatusCode::INTERNAL_SERVER_ERROR, failure.to_string()),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "event read failed"),
    }
}

/// Steps an operator action and answers with the audit lines it produced; 409 when the
/// engine refused it, 404 when the host is unknown.
async fn operator_action(api: &OperatorApi, host: Option<&str>, action: OperatorAction) -> Response {
    if let Some(name) = host {
        match view(api).await {
            Ok(view) if view.hosts.iter().any(|known| known.name == name) => {}
            Ok(_) => return error(StatusCode::NOT_FOUND, format!("no host named {name:?}")),
            Err(refusal) => return refusal.into_response(),
        }
    }
    let outcome = match api.controller.step(Event::Operator(action)).await {
        Ok(outcome) => outcome,
        Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "manager is stopping"),
    };
    let lines: Vec<String> = outcome.audits.iter().map(|audit| audit.describe()).collect();
    if let Some(refused) = outcome.audits.iter().find(|audit| audit.kind == AuditKind::OperatorRefused) {
        return (StatusCode::CONFLICT, Json(json!({ "error": refused.detail, "audit": lines }))).into_response();
    }
    Json(json!({ "ok": true, "audit": lines })).into_response()
}

/// Who did it, for the audit log: the role, never the token.
pub(crate) fn actor(role: Role) -> String {
    match role {
        Role::Operator => "operator-token".to_owned(),
        Role::ReadOnly => "read-only-token".to_owned(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnBody {
    on: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnabledBody {
    enabled: bool,
}

pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    let invalid = |failure: serde_json::Error| refusal(StatusCode::BAD_REQUEST, format!("invalid body: {failure}"));
    // Only an object: serde would also fill a struct from an array, so `[true]` turned
    // maintenance on (found in issue 10).
    let value: serde_json::Value = serde_json::from_slice(body).map_err(invalid)?;
    if !value.is_object() {
        return Err(refusal(StatusCode::BAD_REQUEST, "invalid body: expected a JSON object"));
    }
    serde_json::from_value(value).map_err(invalid)
}

async fn maintenance(
    State(api): State<Arc<OperatorApi>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let role = match authorize(&api, &headers, Role::Operator) {
        Ok(role) => role,
        Err(refusal) => return refusal.into_response(),
    };
    let body: OnBody = match json_body(&body) {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let action = OperatorAction::Maintenance { host: HostName::new(name.clone()), on: body.on, by: actor(role) };
    operator_action(&api, Some(&name), action).await
}

/// `kvmha host remove`: the engine forgets the host (it refuses while VMs depend on it),
/// then the host's row goes and its certificate is revoked in one store transaction, then
/// the TLS server refuses the certificate. A restart reads the revocation back first.
async fn remove_host(State(api): State<Arc<OperatorApi>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let role = match authorize(&api, &headers, Role::Operator) {
        Ok(role) => role,
        Err(refusal) => return refusal.into_response(),
    };
    let host = HostName::new(name.clone());
    let cert_sha256 =
        api.directory.read().expect("directory lock").by_name.get(&host).map(|row| row.cert_sha256.clone());
    let in_engine = match view(&api).await {
        Ok(view) => view.hosts.iter().any(|known| known.name == name),
        Err(refusal) => return refusal.into_response(),
    };
    if !in_engine && cert_sha256.is_none() {
        return error(StatusCode::NOT_FOUND, format!("no host named {name:?}"));
    }
    let mut lines = Vec::new();
    if in_engine {
        let action = OperatorAction::RemoveHost { host: host.clone(), by: actor(role) };
        let outcome = match api.controller.step(Event::Operator(action)).await {
            Ok(outcome) => outcome,
            Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "manager is stopping"),
        };
        lines.extend(outcome.audits.iter().map(|audit| audit.describe()));
        if let Some(refused) = outcome.audits.iter().find(|audit| audit.kind == AuditKind::OperatorRefused) {
            return (StatusCode::CONFLICT, Json(json!({ "error": refused.detail, "audit": lines }))).into_response();
        }
    }
    let store_api = api.clone();
    let removed = tokio::task::spawn_blocking(move || {
        store_api.store.lock().expect("store lock").remove_host_and_revoke(&host, cert_sha256.as_deref())
    })
    .await;
    match removed {
        Ok(Ok(())) => {}
        Ok(Err(failure)) => return error(StatusCode::INTERNAL_SERVER_ERROR, failure.to_string()),
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "revocation write failed"),
    }
    api.directory.write().expect("directory lock").remove(&HostName::new(name.clone()));
    tracing::warn!(host = %name, "host removed; its agent certificate is revoked");
    Json(json!({ "ok": true, "audit": lines })).into_response()
}

async fn confirm_down(State(api): State<Arc<OperatorApi>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let role = match authorize(&api, &headers, Role::Operator) {
        Ok(role) => role,
        Err(refusal) => return refusal.into_response(),
    };
    let action = OperatorAction::ConfirmDown { host: HostName::new(name.clone()), by: actor(role) };
    operator_action(&api, Some(&name), action).await
}

async fn host_ha(
    State(api): State<Arc<OperatorApi>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let role = match authorize(&api, &headers, Role::Operator) {
        Ok(role) => role,
        Err(refusal) => return refusal.into_response(),
    };
    let body: EnabledBody = match json_body(&body) {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let action = OperatorAction::HostHa { host: HostName::new(name.clone()), enabled: body.enabled, by: actor(role) };
    operator_action(&api, Some(&name), action).await
}

async fn disarm(State(api): State<Arc<OperatorApi>>, headers: HeaderMap) -> Response {
    match authorize(&api, &headers, Role::Operator) {
        Ok(role) => operator_action(&api, None, OperatorAction::Disarm { by: actor(role) }).await,
        Err(refusal) => refusal.into_response(),
    }
}

async fn arm(State(api): State<Arc<OperatorApi>>, headers: HeaderMap) -> Response {
    match authorize(&api, &headers, Role::Operator) {
        Ok(role) => operator_action(&api, None, OperatorAction::Arm { by: actor(role) }).await,
        Err(refusal) => refusal.into_response(),
    }
}

async fn openapi() -> Json<serde_json::Value> {
    Json(openapi_document())
}

/// The OpenAPI 3 document, built from [`ROUTES`].
pub fn openapi_document() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    for route in ROUTES.iter().chain(crate::dashboard::ROUTES) {
        let entry = paths.entry(route.path.to_owned()).or_insert_with(|| json!({}));
        let role = match route.role {
            Role::ReadOnly => "read-only or operator token",
            Role::Operator => "operator token",
        };
        let mut operation = json!({
            "summary": route.summary,
            "description": format!("needs: {role}"),
            "security": [{ "bearer": [] }],
            "responses": {
                "200": { "description": "ok" },
                "400": { "description": "malformed request", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
                "401": { "description": "missing or unknown token" },
                "403": { "description": "read-only token on an operator endpoint" },
                "404": { "description": "no such host or VM" },
                "409": { "description": "the engine refused the action" },
            },
        });
        if let Some(parameter) = route.path.split('{').nth(1).and_then(|rest| rest.split('}').next()) {
            operation["parameters"] =
                json!([{ "name": parameter, "in": "path", "required": true, "schema": { "type": "string" } }]);
        }
        if let Some(body) = route.body {
            operation["requestBody"] = json!({ "description": body, "content": { "application/json": {} } });
        }
        entry[route.method] = operation;
    }
    json!({
        "openapi": "3.0.3",
        "info": { "title": "kvmha manager operator API", "version": env!("CARGO_PKG_VERSION") },
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "properties": { "error": { "type": "string" } }, "required": ["error"] },
                "Host": { "type": "object", "required": ["name", "state"], "properties": {
                    "name": { "type": "string" },
                    "state": { "type": "string", "enum": kvmha_core::HostState::ALL.iter().map(|state| state.name()).collect::<Vec<_>>() },
                } },
            },
        },
    })
}
