//! What operators look at during an outage, on the operator API's listener:
//!
//! - the dashboard (server-rendered HTML, [`pages`]): overview, hosts, VMs, incidents,
//!   maintenance and HA switches for operator sessions;
//! - `GET /v1/incidents`, `GET /v1/incidents/{id}`: incidents as JSON ([`crate::incident`]);
//! - `GET /metrics`: the Prometheus text format ([`crate::metrics`]).
//!
//! Browsers log in once (`POST /login` with the field `token`) and get an HttpOnly,
//! SameSite=Strict session cookie that stands for the token's role; the token itself is
//! never stored in the cookie, never rendered and never logged. API clients (and
//! Prometheus) send `Authorization: Bearer` as on every other route. Forms carry a
//! per-session CSRF token besides SameSite.
//!
//! State is read through the same paths as the rest of the API: the engine thread's
//! [`crate::controller::ClusterView`] and the store's audit log, which is folded into
//! incidents and counters incrementally (each request reads only the new lines).

mod pages;

use crate::api::Role;
use crate::api::{OperatorApi, RouteDoc};
use crate::config::ManagerConfig;
use crate::controller::ClusterView;
use crate::incident::{Incident, IncidentBook};
use crate::metrics::{self, AuditCounters};
use axum::extract::{Form, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvmha_core::event::{AuditKind, OperatorAction};
use kvmha_core::{Event, HostName};
use kvmha_proto::pki::sha256_hex;
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "kvmha_session";
/// A session lasts this long after login (a shift), then the form asks again.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Audit lines read from the store per query while catching up.
const CATCH_UP_PAGE: u32 = 5000;

/// The routes of this module that belong in `/openapi.json`.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/v1/incidents",
        role: Role::ReadOnly,
        summary: "every incident (host failure episode), newest first, without timelines",
        body: None,
    },
    RouteDoc {
        method: "get",
        path: "/v1/incidents/{id}",
        role: Role::ReadOnly,
        summary: "one incident with its timeline: verdicts and evidence, fence attempts, VM restarts",
        body: None,
    },
    RouteDoc {
        method: "get",
        path: "/metrics",
        role: Role::ReadOnly,
        summary: "Prometheus text format (read-only token, e.g. Prometheus `authorization.credentials_file`)",
        body: None,
    },
];

/// One browser login.
#[derive(Clone, Debug)]
struct Session {
    role: Role,
    /// Sent back with every form: a cross-site request cannot know it.
    csrf: String,
    expires: Instant,
    /// One message for the next page (the outcome of a form).
    flash: Option<String>,
}

/// The audit log folded so far.
#[derive(Debug, Default)]
struct Folded {
    book: IncidentBook,
    counters: AuditCounters,
}

#[derive(Debug)]
pub struct Dashboard {
    api: Arc<OperatorApi>,
    sessions: Mutex<HashMap<String, Session>>,
    folded: tokio::sync::Mutex<Folded>,
    /// BMC driver by host, for the fence metrics and the host tiles.
    drivers: BTreeMap<String, String>,
    /// Pools each host is configured with (storage column of the overview).
    pools: BTreeMap<String, Vec<String>>,
    ping_timeout_ms: u64,
    profile: String,
    cluster_id: String,
}

impl Dashboard {
    pub fn new(api: Arc<OperatorApi>, config: &ManagerConfig) -> Arc<Dashboard> {
        let drivers = config
            .hosts
            .iter()
            .filter_map(|(name, host)| {
                let kind = host.bmc.as_ref()?.kind;
                let driver = match kind {
                    crate::config::BmcKind::Ipmi => "ipmi",
                    crate::config::BmcKind::Redfish => "redfish",
                };
                Some((name.to_string(), driver.to_owned()))
            })
            .collect();
        let pools = config
            .hosts
            .iter()
            .map(|(name, host)| (name.to_string(), host.pools.iter().map(|pool| pool.to_string()).collect()))
            .collect();
        Arc::new(Dashboard {
            api,
            sessions: Mutex::new(HashMap::new()),
            folded: tokio::sync::Mutex::new(Folded::default()),
            drivers,
            pools,
            ping_timeout_ms: kvmha_core::time::duration_ms(config.timing.ping_timeout()),
            profile: config.profile.name().to_owned(),
            cluster_id: config.cluster_id.clone(),
        })
    }
}

/// The line the manager prints at start: where to point a browser.
pub fn url(api_listen: SocketAddr) -> String {
    let host = if api_listen.ip().is_unspecified() {
        "localhost".to_owned()
    } else if api_listen.is_ipv6() {
        format!("[{}]", api_listen.ip())
    } else {
        api_listen.ip().to_string()
    };
    format!("http://{host}:{}/", api_listen.port())
}

pub fn router(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/incidents", get(incident_list_page))
        .route("/incidents/{id}", get(incident_page))
        .route("/hosts/{name}", get(host_page))
        .route("/hosts/{name}/maintenance", post(host_maintenance))
        .route("/hosts/{name}/ha", post(host_ha))
        .route("/vms/{name}", get(vm_page))
        .route("/static/kvmha.css", get(stylesheet))
        .route("/static/live.js", get(script))
        .route("/v1/incidents", get(list_incidents))
        .route("/v1/incidents/{id}", get(show_incident))
        .route("/metrics", get(metrics_text))
        .with_state(dashboard)
}

// ----- who is asking -----------------------------------------------------------------------

fn bearer_role(dashboard: &Dashboard, headers: &HeaderMap) -> Option<Result<Role, StatusCode>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let token = value.to_str().ok().and_then(|value| value.strip_prefix("Bearer ")).unwrap_or("");
    Some(token_role(dashboard, token).ok_or(StatusCode::UNAUTHORIZED))
}

fn token_role(dashboard: &Dashboard, token: &str) -> Option<Role> {
    let hash = sha256_hex(token.trim().as_bytes());
    if dashboard.api.operator_token_sha256.contains(&hash) {
        Some(Role::Operator)
    } else if dashboard.api.readonly_token_sha256.contains(&hash) {
        Some(Role::ReadOnly)
    } else {
        None
    }
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The caller's session, if the cookie names a live one.
fn session(dashboard: &Dashboard, headers: &HeaderMap) -> Option<(String, Session)> {
    let id = session_id(headers)?;
    let mut sessions = dashboard.sessions.lock().expect("sessions lock");
    let session = sessions.get(&id)?;
    if session.expires <= Instant::now() {
        sessions.remove(&id);
        return None;
    }
    Some((id, session.clone()))
}

/// Who a page is for: a session, or a bearer token (curl, tests).
#[derive(Debug)]
pub(crate) struct Viewer {
    pub role: Role,
    /// `None` for bearer callers: they get no forms (they have the API).
    pub csrf: Option<String>,
    pub flash: Option<String>,
}

/// Refusals are boxed: a `Response` is large and the happy path should stay small.
fn page_viewer(dashboard: &Dashboard, headers: &HeaderMap) -> Result<Viewer, Box<Response>> {
    if let Some(role) = bearer_role(dashboard, headers) {
        return match role {
            Ok(role) => Ok(Viewer { role, csrf: None, flash: None }),
            Err(status) => Err(Box::new((status, "unknown token").into_response())),
        };
    }
    let Some((id, session)) = session(dashboard, headers) else {
        return Err(Box::new(Redirect::to("/login").into_response()));
    };
    let flash = dashboard.sessions.lock().expect("sessions lock").get_mut(&id).and_then(|stored| stored.flash.take());
    Ok(Viewer { role: session.role, csrf: Some(session.csrf), flash })
}

/// JSON and metrics routes: a bearer token or a session, any role.
fn reader(dashboard: &Dashboard, headers: &HeaderMap) -> Result<Role, Box<Response>> {
    match bearer_role(dashboard, headers) {
        Some(Ok(role)) => Ok(role),
        Some(Err(_)) => Err(Box::new(crate::api::error(StatusCode::UNAUTHORIZED, "unknown token"))),
        None => match session(dashboard, headers) {
            Some((_, session)) => Ok(session.role),
            None => Err(Box::new(crate::api::error(
                StatusCode::UNAUTHORIZED,
                "missing bearer token (Authorization: Bearer TOKEN)",
            ))),
        },
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

// ----- what is read ------------------------------------------------------------------------

async fn view(dashboard: &Dashboard) -> Result<ClusterView, Response> {
    dashboard
        .api
        .controller
        .view()
        .await
        .map_err(|_| crate::api::error(StatusCode::SERVICE_UNAVAILABLE, "manager is stopping"))
}

/// Folds the audit lines written since the last call, then hands the result out.
async fn folded(dashboard: &Arc<Dashboard>) -> Result<tokio::sync::MutexGuard<'_, Folded>, Response> {
    let mut folded = dashboard.folded.lock().await;
    loop {
        let after = folded.book.last_id().max(folded.counters.last_id);
        let api = dashboard.api.clone();
        let page = tokio::task::spawn_blocking(move || {
            api.store.lock().expect("store lock").audit_records_after(after, CATCH_UP_PAGE)
        })
        .await;
        let records = match page {
            Ok(Ok(records)) => records,
            Ok(Err(failure)) => {
                tracing::error!(%failure, "reading the audit log for incidents");
                return Err(crate::api::error(StatusCode::INTERNAL_SERVER_ERROR, failure.to_string()));
            }
            Err(_) => return Err(crate::api::error(StatusCode::INTERNAL_SERVER_ERROR, "audit read failed")),
        };
        for record in &records {
            folded.book.apply(record);
            folded.counters.apply(record);
        }
        if records.len() < CATCH_UP_PAGE as usize {
            return Ok(folded);
        }
    }
}

// ----- JSON and metrics --------------------------------------------------------------------

fn incident_summary(incident: &Incident, now_ms: u64) -> serde_json::Value {
    json!({
        "id": incident.id,
        "host": incident.host,
        "status": incident.status,
        "host_state": incident.host_state,
        "opened_at_ms": incident.opened_at_ms,
        "opened_unix_ms": incident.opened_unix_ms,
        "ended_at_ms": incident.ended_at_ms,
        "duration_ms": incident.duration_ms(now_ms),
        "summary": incident.summary,
        "rounds": incident.rounds,
        "fence_attempts": incident.fence_attempts.len(),
        "vms": incident.vms.len(),
        "vms_running": incident.vms.iter().filter(|vm| vm.state == crate::incident::VmRecovery::Running).count(),
    })
}

async fn list_incidents(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    if let Err(refused) = reader(&dashboard, &headers) {
        return *refused;
    }
    let now_ms = match view(&dashboard).await {
        Ok(view) => view.now_ms,
        Err(refused) => return refused,
    };
    let folded = match folded(&dashboard).await {
        Ok(folded) => folded,
        Err(refused) => return refused,
    };
    let list: Vec<serde_json::Value> =
        folded.book.incidents().iter().rev().map(|incident| incident_summary(incident, now_ms)).collect();
    Json(list).into_response()
}

async fn show_incident(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(refused) = reader(&dashboard, &headers) {
        return *refused;
    }
    let Ok(id) = id.parse::<i64>() else {
        return crate::api::error(StatusCode::BAD_REQUEST, format!("incident id {id:?} is not a number"));
    };
    let now_ms = match view(&dashboard).await {
        Ok(view) => view.now_ms,
        Err(refused) => return refused,
    };
    let folded = match folded(&dashboard).await {
        Ok(folded) => folded,
        Err(refused) => return refused,
    };
    match folded.book.get(id) {
        Some(incident) => {
            let mut value = serde_json::to_value(incident).unwrap_or_default();
            value["duration_ms"] = json!(incident.duration_ms(now_ms));
            Json(value).into_response()
        }
        None => crate::api::error(StatusCode::NOT_FOUND, format!("no incident {id}")),
    }
}

async fn metrics_text(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    if let Err(refused) = reader(&dashboard, &headers) {
        return *refused;
    }
    let view = match view(&dashboard).await {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    let folded = match folded(&dashboard).await {
        Ok(folded) => folded,
        Err(refused) => return refused,
    };
    let mut text = metrics::render(&metrics::MetricsInput {
        view: &view,
        counters: &folded.counters,
        incidents: folded.book.incidents(),
        drivers: &dashboard.drivers,
        ping_timeout_ms: dashboard.ping_timeout_ms,
    });
    text.push_str(&dashboard.api.controller.ping_metrics());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

// ----- pages -------------------------------------------------------------------------------

/// Every HTML answer: no caching, no framing, only our own script and style.
fn html(status: StatusCode, markup: maud::Markup) -> Response {
    let mut response = (status, markup.into_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// What every page shows in its header.
pub(crate) struct Frame<'a> {
    pub viewer: &'a Viewer,
    pub view: &'a ClusterView,
    pub profile: &'a str,
    pub cluster_id: &'a str,
    pub open_incidents: usize,
}

macro_rules! page_inputs {
    ($dashboard:expr, $headers:expr) => {{
        let viewer = match page_viewer(&$dashboard, &$headers) {
            Ok(viewer) => viewer,
            Err(refused) => return *refused,
        };
        let view = match view(&$dashboard).await {
            Ok(view) => view,
            Err(refused) => return refused,
        };
        let folded = match folded(&$dashboard).await {
            Ok(folded) => folded,
            Err(refused) => return refused,
        };
        (viewer, view, folded)
    }};
}

fn frame<'a>(dashboard: &'a Dashboard, viewer: &'a Viewer, view: &'a ClusterView, folded: &Folded) -> Frame<'a> {
    Frame {
        viewer,
        view,
        profile: &dashboard.profile,
        cluster_id: &dashboard.cluster_id,
        open_incidents: folded.book.incidents().iter().filter(|incident| incident.status.is_open()).count(),
    }
}

async fn overview(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    let (viewer, view, folded) = page_inputs!(dashboard, headers);
    let frame = frame(&dashboard, &viewer, &view, &folded);
    let markup = pages::overview(&frame, folded.book.incidents(), &dashboard.drivers, &dashboard.pools);
    html(StatusCode::OK, markup)
}

async fn incident_list_page(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    let (viewer, view, folded) = page_inputs!(dashboard, headers);
    let frame = frame(&dashboard, &viewer, &view, &folded);
    html(StatusCode::OK, pages::incident_list(&frame, folded.book.incidents()))
}

async fn incident_page(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (viewer, view, folded) = page_inputs!(dashboard, headers);
    let frame = frame(&dashboard, &viewer, &view, &folded);
    match id.parse::<i64>().ok().and_then(|id| folded.book.get(id)) {
        Some(incident) => html(StatusCode::OK, pages::incident(&frame, incident)),
        None => html(StatusCode::NOT_FOUND, pages::not_found(&frame, &format!("no incident {id}"))),
    }
}

async fn host_page(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let (viewer, view, folded) = page_inputs!(dashboard, headers);
    let frame = frame(&dashboard, &viewer, &view, &folded);
    match view.hosts.iter().find(|host| host.name == name) {
        Some(host) => {
            let incidents: Vec<&Incident> =
                folded.book.incidents().iter().rev().filter(|incident| incident.host == name).collect();
            let driver = dashboard.drivers.get(&name).map(String::as_str);
            let pools = dashboard.pools.get(&name).cloned().unwrap_or_default();
            html(StatusCode::OK, pages::host(&frame, host, &incidents, driver, &pools))
        }
        None => html(StatusCode::NOT_FOUND, pages::not_found(&frame, &format!("no host named {name:?}"))),
    }
}

async fn vm_page(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let (viewer, view, folded) = page_inputs!(dashboard, headers);
    let frame = frame(&dashboard, &viewer, &view, &folded);
    match view.vms.iter().find(|vm| vm.name == name) {
        Some(vm) => {
            let incidents: Vec<&Incident> = folded
                .book
                .incidents()
                .iter()
                .rev()
                .filter(|incident| incident.vms.iter().any(|restart| restart.vm == name))
                .collect();
            html(StatusCode::OK, pages::vm(&frame, vm, &incidents))
        }
        None => html(StatusCode::NOT_FOUND, pages::not_found(&frame, &format!("no vm named {name:?}"))),
    }
}

async fn login_page(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    if session(&dashboard, &headers).is_some() {
        return Redirect::to("/").into_response();
    }
    html(StatusCode::OK, pages::login(None))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

impl std::fmt::Debug for LoginForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginForm { token: <redacted> }")
    }
}

async fn login(
    State(dashboard): State<Arc<Dashboard>>,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return html(StatusCode::BAD_REQUEST, pages::login(Some("the form needs a token field")));
    };
    let Some(role) = token_role(&dashboard, &form.token) else {
        tracing::warn!("dashboard login refused: unknown token");
        return html(StatusCode::UNAUTHORIZED, pages::login(Some("unknown token")));
    };
    let id = random_hex(32);
    let session = Session { role, csrf: random_hex(16), expires: Instant::now() + SESSION_LIFETIME, flash: None };
    {
        let mut sessions = dashboard.sessions.lock().expect("sessions lock");
        let now = Instant::now();
        sessions.retain(|_, session| session.expires > now);
        sessions.insert(id.clone(), session);
    }
    tracing::info!(role = ?role, "dashboard login");
    let cookie =
        format!("{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}", SESSION_LIFETIME.as_secs());
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap, Form(form): Form<CsrfForm>) -> Response {
    if let Some((id, session)) = session(&dashboard, &headers) {
        if session.csrf == form.csrf {
            dashboard.sessions.lock().expect("sessions lock").remove(&id);
        }
    }
    let mut response = Redirect::to("/login").into_response();
    let expired = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(value) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
struct SwitchForm {
    csrf: String,
    /// `on` / `off`.
    to: String,
}

/// A form post from an operator session: checks role and CSRF, steps the action, leaves
/// the outcome as the next page's message and sends the browser back to the host.
async fn operator_form(
    dashboard: &Dashboard,
    headers: &HeaderMap,
    form: &SwitchForm,
    host: &str,
    action: impl FnOnce(bool) -> OperatorAction,
) -> Response {
    let Some((id, session)) = session(dashboard, headers) else {
        return Redirect::to("/login").into_response();
    };
    if session.csrf != form.csrf {
        return (StatusCode::FORBIDDEN, "stale or forged form: reload the page").into_response();
    }
    if session.role != Role::Operator {
        return (StatusCode::FORBIDDEN, "this session is read-only: log in with an operator token").into_response();
    }
    let on = match form.to.as_str() {
        "on" => true,
        "off" => false,
        other => {
            return (StatusCode::BAD_REQUEST, format!("switch value {other:?} is neither on nor off")).into_response()
        }
    };
    let known = match view(dashboard).await {
        Ok(view) => view.hosts.iter().any(|known| known.name == host),
        Err(refused) => return refused,
    };
    if !known {
        return (StatusCode::NOT_FOUND, format!("no host named {host:?}")).into_response();
    }
    let message = match dashboard.api.controller.step(Event::Operator(action(on))).await {
        Ok(outcome) => match outcome.audits.iter().find(|audit| audit.kind == AuditKind::OperatorRefused) {
            Some(refused) => format!("refused: {}", refused.detail),
            None => {
                let lines: Vec<String> = outcome.audits.iter().map(|audit| audit.describe()).collect();
                if lines.is_empty() {
                    "nothing to change".to_owned()
                } else {
                    lines.join("; ")
                }
            }
        },
        Err(_) => "the manager is stopping".to_owned(),
    };
    if let Some(stored) = dashboard.sessions.lock().expect("sessions lock").get_mut(&id) {
        stored.flash = Some(message);
    }
    Redirect::to(&format!("/hosts/{}", pages::path_segment(host))).into_response()
}

/// Who did it, for the audit log: the role and that it came from the dashboard.
const ACTOR: &str = "operator-session";

async fn host_maintenance(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<SwitchForm>,
) -> Response {
    let host = HostName::new(name.clone());
    operator_form(&dashboard, &headers, &form, &name, |on| OperatorAction::Maintenance {
        host,
        on,
        by: ACTOR.to_owned(),
    })
    .await
}

async fn host_ha(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<SwitchForm>,
) -> Response {
    let host = HostName::new(name.clone());
    operator_form(&dashboard, &headers, &form, &name, |enabled| OperatorAction::HostHa {
        host,
        enabled,
        by: ACTOR.to_owned(),
    })
    .await
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=300")],
        include_str!("static/kvmha.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "max-age=300")],
        include_str!("static/live.js"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announced_url_is_one_a_browser_can_open() {
        assert_eq!(url("127.0.0.1:7444".parse().unwrap()), "http://127.0.0.1:7444/");
        assert_eq!(url("0.0.0.0:7444".parse().unwrap()), "http://localhost:7444/");
        assert_eq!(url("[::1]:7444".parse().unwrap()), "http://[::1]:7444/");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=b; kvmha_session=abc123; c=d"));
        assert_eq!(session_id(&headers).as_deref(), Some("abc123"));
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("kvmha_sessionx=1"));
        assert_eq!(session_id(&headers), None);
    }
}
