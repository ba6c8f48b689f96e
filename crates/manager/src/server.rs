//! The agent-facing mutual-TLS endpoints: join (no client certificate, join token),
//! ping and goodbye (client certificate of a joined agent, matching the host named).

use crate::controller::{Controller, PingRefused, SharedDirectory};
use crate::store::HostRow;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use kvmha_core::event::Ping;
use kvmha_core::{Event, HostName};
use kvmha_proto::pki::{sha256_hex, ClusterCa};
use kvmha_proto::transport::Peer;
use kvmha_proto::{
    path, ErrorBody, GoodbyeMessage, JoinRequest, JoinResponse, PingMessage, PingReply, PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::sync::Arc;

/// The largest request body the agent-facing endpoints read.
pub const AGENT_BODY_MAX_BYTES: usize = 1024 * 1024;

#[derive(Debug)]
pub struct AgentApi {
    pub controller: Controller,
    pub directory: SharedDirectory,
    pub ca: ClusterCa,
    pub ca_pem: String,
    pub manager_cert_sha256: String,
    pub config: crate::config::ManagerConfig,
    pub host_spec: Arc<crate::executor::Executor>,
    /// etcd backend: only the leader takes agents; followers point them at it.
    pub leadership: Option<crate::leader::Leadership>,
}

/// A follower's answer to an agent: 421 with the leader's agent URL when known (agents
/// switch to it, docs/manager-ha.md). `None` on the leader (and without etcd).
fn not_the_leader(api: &AgentApi) -> Option<Response> {
    let hint = api.leadership.as_ref()?.follower_hint()?;
    let body = serde_json::json!({
        "version": PROTOCOL_VERSION,
        "error": "not the leader",
        "leader": hint.map(|leader| leader.agent_url),
    });
    Some((StatusCode::MISDIRECTED_REQUEST, Json(body)).into_response())
}

/// Operator API middleware on a follower: reads are served from the store; writes get
/// 421 and the leader's API URL (logins to the dashboard stay local: read-only pages).
pub async fn writes_to_the_leader(
    leadership: crate::leader::Leadership,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let reads = request.method() == axum::http::Method::GET || request.method() == axum::http::Method::HEAD;
    let session = matches!(request.uri().path(), "/login" | "/logout");
    if let (false, false, Some(hint)) = (reads, session, leadership.follower_hint()) {
        let leader = hint.map(|leader| leader.api_url);
        let body = serde_json::json!({
            "version": PROTOCOL_VERSION,
            "error": format!("not the leader; send writes to {}", leader.as_deref().unwrap_or("the leader (not known yet)")),
            "leader": leader,
        });
        return (StatusCode::MISDIRECTED_REQUEST, Json(body)).into_response();
    }
    next.run(request).await
}

pub fn router(api: Arc<AgentApi>) -> Router {
    Router::new()
        .route(path::JOIN_CA, get(join_ca))
        .route(path::JOIN, post(join))
        .route(path::PING, post(ping))
        .route(path::GOODBYE, post(goodbye))
        // A ping lists every VM of a host; a join carries a CSR. 1 MiB is far above both
        // and bounds what one agent (or anyone with the join token) makes us buffer (413).
        .layer(axum::extract::DefaultBodyLimit::max(AGENT_BODY_MAX_BYTES))
        .with_state(api)
}

fn refuse(status: StatusCode, error: impl Into<String>) -> Response {
    (status, Json(ErrorBody::new(error))).into_response()
}

/// The CA certificate is public; the agent checks it against the fingerprint in its join
/// token before trusting it.
async fn join_ca(State(api): State<Arc<AgentApi>>) -> String {
    api.ca_pem.clone()
}

fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

async fn join(State(api): State<Arc<AgentApi>>, Extension(peer): Extension<Peer>, body: Bytes) -> Response {
    if let Some(redirect) = not_the_leader(&api) {
        return redirect;
    }
    let request: JoinRequest = match kvmha_proto::decode(&body) {
        Ok(request) => request,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, error.to_string()),
    };
    if sha256_hex(request.secret.as_bytes()) != api.config.join_token_sha256 {
        tracing::warn!(remote = %peer.remote, name = %request.name, "join refused: wrong join token");
        return refuse(StatusCode::UNAUTHORIZED, "wrong join token");
    }
    if !valid_host_name(request.name.as_str()) {
        return refuse(StatusCode::BAD_REQUEST, "name: letters, digits and '-' only, at most 63");
    }
    let Ok(mut advertised) = request.listen.parse::<SocketAddr>() else {
        return refuse(StatusCode::BAD_REQUEST, format!("listen: {:?} is not IP:PORT", request.listen));
    };
    if advertised.ip().is_unspecified() {
        advertised.set_ip(peer.remote.ip());
    }
    let names = vec![request.name.to_string(), advertised.ip().to_string(), "localhost".to_owned()];
    let cert_pem = match api.ca.sign_csr(&request.csr_pem, request.name.as_str(), names) {
        Ok(cert) => cert,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let cert_sha256 = match kvmha_proto::pki::cert_fingerprint_pem(&cert_pem) {
        Ok(fingerprint) => fingerprint,
        Err(error) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    };
    let row = HostRow {
        name: request.name.clone(),
        address: advertised.to_string(),
        cert_sha256,
        hypervisor: request.hypervisor.clone(),
    };
    let mut spec = api.host_spec.host_spec(&request.name);
    spec.capacity = request.capacity;
    match api.controller.join(row, spec).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::error!(%error, "join could not be recorded");
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "join could not be recorded");
        }
        Err(_) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "manager is stopping"),
    }
    tracing::info!(host = %request.name, address = %advertised, "agent joined");
    Json(JoinResponse {
        version: PROTOCOL_VERSION,
        cluster_id: api.config.cluster_id.clone(),
        cert_pem,
        ca_pem: api.ca_pem.clone(),
        manager_cert_sha256: api.manager_cert_sha256.clone(),
        advertised: advertised.to_string(),
        profile: api.config.profile,
        timing: api.config.timing_overrides.clone(),
    })
    .into_response()
}

/// The host a client certificate belongs to, if it is a joined agent's.
fn authenticated_host(api: &AgentApi, peer: &Peer) -> Result<HostName, (StatusCode, &'static str)> {
    let Some(fingerprint) = &peer.cert_sha256 else {
        return Err((StatusCode::UNAUTHORIZED, "a client certificate is required"));
    };
    let directory = api.directory.read().expect("directory lock");
    if let Some(host) = directory.revoked.get(fingerprint) {
        tracing::warn!(%host, remote = %peer.remote, "refused: the certificate of a removed host");
        return Err((
            StatusCode::FORBIDDEN,
            "certificate revoked: this host was removed from the cluster (kvmha host remove); \
             an operator must join it again (kvmha agent join) before it may take part",
        ));
    }
    directory
        .by_cert
        .get(fingerprint)
        .cloned()
        .ok_or((StatusCode::FORBIDDEN, "certificate of no joined agent (superseded by a later join?)"))
}

async fn ping(State(api): State<Arc<AgentApi>>, Extension(peer): Extension<Peer>, body: Bytes) -> Response {
    if let Some(redirect) = not_the_leader(&api) {
        return redirect;
    }
    let host = match authenticated_host(&api, &peer) {
        Ok(host) => host,
        Err((status, reason)) => return refuse(status, reason),
    };
    let message: PingMessage = match kvmha_proto::decode(&body) {
        Ok(message) => message,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let ping: Ping = message.ping;
    if ping.host != host {
        return refuse(StatusCode::FORBIDDEN, format!("certificate of {host} cannot ping as {}", ping.host));
    }
    api.host_spec.learn_from_ping(&ping);
    match api.controller.ping(ping).await {
        Ok(outcome) => Json(PingReply {
            version: PROTOCOL_VERSION,
            directives: outcome.directives,
            manager_time_ms: outcome.now.as_millis(),
        })
        .into_response(),
        Err(refused @ PingRefused::QueueFull) => refuse(StatusCode::SERVICE_UNAVAILABLE, refused.to_string()),
        Err(PingRefused::EngineGone) => refuse(StatusCode::SERVICE_UNAVAILABLE, "manager is stopping"),
    }
}

async fn goodbye(State(api): State<Arc<AgentApi>>, Extension(peer): Extension<Peer>, body: Bytes) -> Response {
    if let Some(redirect) = not_the_leader(&api) {
        return redirect;
    }
    let host = match authenticated_host(&api, &peer) {
        Ok(host) => host,
        Err((status, reason)) => return refuse(status, reason),
    };
    let message: GoodbyeMessage = match kvmha_proto::decode(&body) {
        Ok(message) => message,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, error.to_string()),
    };
    if message.host != host {
        return refuse(StatusCode::FORBIDDEN, format!("certificate of {host} cannot say goodbye as {}", message.host));
    }
    match api.controller.step(Event::AgentGoodbye { host, boot_id: message.boot_id }).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "manager is stopping"),
    }
}
