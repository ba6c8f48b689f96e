//! The simulated fleet of `kvmha bench scale`: N agents in this process, each with its
//! own certificate from the cluster CA (through the manager's real join endpoint), its
//! own TLS session to the manager for pings, and a command endpoint the manager reaches
//! over mutual TLS; plus a Redfish BMC per host.
//!
//! One listening socket serves every agent's command endpoint (and one every BMC): each
//! host has its own loopback address (127.20.x.y for agents, 127.21.x.y for BMCs; Linux
//! routes all of 127/8 to `lo`), and a connection's local address says which host it
//! reached. So 10,000 hosts cost two listening sockets, not 20,000 (the descriptor limit).

use anyhow::Context;
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kvmha_core::event::{Ping, StorageHealth, VmReport, VmRunState};
use kvmha_core::{BootId, HostName, Resources, VmName};
use kvmha_proto::pki::{self, sha256_hex, ClientAuth};
use kvmha_proto::{
    AgentCommand, CommandRequest, CommandResponse, CommandResult, JoinRequest, JoinResponse, PingMessage,
    PingTestResult, VmInventory, PROTOCOL_VERSION,
};
use rustls::pki_types::ServerName;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Loopback addresses per host: 250 per /24 (no .0, no .255).
const HOSTS_PER_OCTET: usize = 250;
pub const AGENT_NET: u8 = 20;
pub const BMC_NET: u8 = 21;
pub const HOSTS_MAX: usize = HOSTS_PER_OCTET * 256;

pub fn host_ip(net: u8, index: usize) -> Ipv4Addr {
    assert!(index < HOSTS_MAX, "host index {index} beyond the loopback plan");
    Ipv4Addr::new(127, net, (index / HOSTS_PER_OCTET) as u8, (index % HOSTS_PER_OCTET + 1) as u8)
}

/// The host a local address belongs to, if it is one of `net`'s.
pub fn host_index(net: u8, address: IpAddr) -> Option<usize> {
    let IpAddr::V4(address) = address else { return None };
    let [a, b, c, d] = address.octets();
    if a != 127 || b != net || d == 0 || d as usize > HOSTS_PER_OCTET {
        return None;
    }
    Some(c as usize * HOSTS_PER_OCTET + d as usize - 1)
}

pub fn host_name(index: usize) -> HostName {
    HostName::new(format!("host{index:05}"))
}

pub fn vm_name(host: usize, vm: usize) -> VmName {
    VmName::new(format!("host{host:05}-vm{vm:03}"))
}

pub fn vm_xml(name: &VmName) -> String {
    format!("<domain type='kvm'><name>{name}</name><vcpu>1</vcpu><memory unit='MiB'>512</memory></domain>")
}

pub const VM_VCPUS: u32 = 1;
pub const VM_MEMORY_MB: u64 = 512;

/// One simulated host.
#[derive(Debug)]
pub struct SimHost {
    pub name: HostName,
    /// Lost: its agent stopped pinging, its command endpoint drops every connection, its
    /// BMC reads power off.
    pub lost: AtomicBool,
    pub powered_off: AtomicBool,
    /// A ping of its agent was answered.
    pub pinged: AtomicBool,
    pub vms: Mutex<Vec<VmReport>>,
    /// Join answer: the agent's certificate and key.
    pub identity: Mutex<Option<(String, String)>>,
    server: Mutex<Option<Arc<rustls::ServerConfig>>>,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub pings_ok: AtomicU64,
    pub pings_failed: AtomicU64,
    pub commands: AtomicU64,
    pub starts: AtomicU64,
}

#[derive(Debug)]
pub struct Fleet {
    pub hosts: Vec<Arc<SimHost>>,
    pub ca_pem: String,
    pub manager_cert_sha256: String,
    pub counters: Counters,
    pub stop: AtomicBool,
}

impl Fleet {
    pub fn new(count: usize, vms_per_host: usize, ca_pem: String, manager_cert_sha256: String) -> Fleet {
        let hosts = (0..count)
            .map(|index| {
                let vms = (0..vms_per_host)
                    .map(|vm| VmReport { name: vm_name(index, vm), state: VmRunState::Running, instance: None })
                    .collect();
                Arc::new(SimHost {
                    name: host_name(index),
                    lost: AtomicBool::new(false),
                    powered_off: AtomicBool::new(false),
                    pinged: AtomicBool::new(false),
                    vms: Mutex::new(vms),
                    identity: Mutex::new(None),
                    server: Mutex::new(None),
                })
            })
            .collect();
        Fleet { hosts, ca_pem, manager_cert_sha256, counters: Counters::default(), stop: AtomicBool::new(false) }
    }

    /// Joins host `index` through the manager's join endpoint: a fresh key and CSR, the
    /// join token's secret, the agent's command address and capacity.
    pub async fn join(
        &self,
        client: &reqwest::Client,
        manager: SocketAddr,
        secret: &str,
        index: usize,
        command_port: u16,
        capacity: Resources,
    ) -> anyhow::Result<()> {
        let host = &self.hosts[index];
        let csr = pki::generate_csr(host.name.as_str())?;
        let request = JoinRequest {
            version: PROTOCOL_VERSION,
            secret: secret.to_owned(),
            name: host.name.clone(),
            csr_pem: csr.cert_pem.clone(),
            listen: SocketAddr::new(IpAddr::V4(host_ip(AGENT_NET, index)), command_port).to_string(),
            hypervisor: Some("bench".to_owned()),
            capacity,
        };
        let response = client
            .post(format!("https://127.0.0.1:{}{}", manager.port(), kvmha_proto::path::JOIN))
            .json(&request)
            .send()
            .await
            .with_context(|| format!("join of {}", host.name))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        anyhow::ensure!(
            status.is_success(),
            "join of {} refused: {status} {}",
            host.name,
            String::from_utf8_lossy(&bytes)
        );
        let answer: JoinResponse = kvmha_proto::decode(&bytes)?;
        *host.identity.lock().expect("identity lock") = Some((answer.cert_pem, csr.key_pem));
        Ok(())
    }
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One agent's ping loop: one TLS session to the manager (reopened when it breaks), a
/// ping every `interval` from a random phase, until the host is lost or the fleet stops.
pub async fn ping_loop(fleet: Arc<Fleet>, index: usize, manager: SocketAddr, interval: Duration) {
    let host = fleet.hosts[index].clone();
    let Some((cert_pem, key_pem)) = host.identity.lock().expect("identity lock").clone() else { return };
    let client_config = match client_config(&fleet.ca_pem, &cert_pem, &key_pem) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(host = %host.name, %error, "no client configuration");
            return;
        }
    };
    let boot_id = BootId(format!("bench-{index}"));
    let phase = Duration::from_micros(rand::random::<u64>() % interval.as_micros().max(1) as u64);
    tokio::time::sleep(phase).await;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut session: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    let mut seq = 0u64;
    loop {
        ticks.tick().await;
        if host.lost.load(Ordering::Relaxed) || fleet.stop.load(Ordering::Relaxed) {
            return;
        }
        seq += 1;
        let ping = Ping {
            host: host.name.clone(),
            boot_id: boot_id.clone(),
            seq,
            vms: host.vms.lock().expect("vms lock").clone(),
            storage: StorageHealth::Ok,
        };
        let body = match serde_json::to_vec(&PingMessage { version: PROTOCOL_VERSION, ping }) {
            Ok(body) => body,
            Err(_) => return,
        };
        if session.as_ref().is_none_or(|sender| sender.is_closed()) {
            session = connect(manager, client_config.clone()).await.ok();
        }
        let Some(sender) = session.as_mut() else {
            fleet.counters.pings_failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let request = Request::post(kvmha_proto::path::PING)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static request parts");
        let answered = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        };
        let answered = tokio::time::timeout(interval * 3, answered).await;
        match answered {
            Ok(Ok(status)) if status.is_success() => {
                fleet.counters.pings_ok.fetch_add(1, Ordering::Relaxed);
                host.pinged.store(true, Ordering::Relaxed);
            }
            Ok(Ok(_)) => {
                fleet.counters.pings_failed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                fleet.counters.pings_failed.fetch_add(1, Ordering::Relaxed);
                session = None;
            }
        }
    }
}

fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pki::parse_certs(ca_pem)? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(pki::parse_certs(cert_pem)?, pki::parse_key(key_pem)?)?;
    Ok(Arc::new(config))
}

async fn connect(
    manager: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(manager).await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = connector.connect(ServerName::IpAddress(manager.ip().into()), tcp).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Serves every agent's command endpoint on `listener` (bound to 0.0.0.0): mutual TLS
/// with the agent's own certificate, the manager's certificate required.
pub async fn serve_commands(fleet: Arc<Fleet>, listener: TcpListener) {
    loop {
        let Ok((tcp, remote)) = listener.accept().await else { continue };
        if !remote.ip().is_loopback() {
            continue;
        }
        let Some(index) = tcp.local_addr().ok().and_then(|local| host_index(AGENT_NET, local.ip())) else {
            continue;
        };
        let Some(host) = fleet.hosts.get(index).cloned() else { continue };
        if host.lost.load(Ordering::Relaxed) {
            // A lost host answers nothing: the connection fails at once.
            continue;
        }
        let fleet = fleet.clone();
        tokio::spawn(async move {
            let Some(config) = agent_server_config(&fleet, &host) else { return };
            let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else { return };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| sha256_hex(cert.as_ref()));
            if peer.as_deref() != Some(fleet.manager_cert_sha256.as_str()) {
                return;
            }
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (fleet, host) = (fleet.clone(), host.clone());
                async move { Ok::<_, hyper::Error>(command(&fleet, &host, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

fn agent_server_config(fleet: &Fleet, host: &SimHost) -> Option<Arc<rustls::ServerConfig>> {
    let mut server = host.server.lock().expect("server lock");
    if server.is_none() {
        let (cert_pem, key_pem) = host.identity.lock().expect("identity lock").clone()?;
        *server = pki::server_config(&cert_pem, &key_pem, &fleet.ca_pem, ClientAuth::Required).ok();
    }
    server.clone()
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("static"));
    response
}

/// One manager command, answered as a healthy agent of a host with process VMs would:
/// at once, from what the fleet knows (a neighbour "reaches" a host that is not lost).
async fn command(fleet: &Fleet, host: &SimHost, request: Request<Incoming>) -> Response<Full<Bytes>> {
    fleet.counters.commands.fetch_add(1, Ordering::Relaxed);
    let Ok(body) = request.into_body().collect().await.map(|body| body.to_bytes()) else {
        return reply(StatusCode::BAD_REQUEST, Vec::new());
    };
    let command: CommandRequest = match kvmha_proto::decode(&body) {
        Ok(command) => command,
        Err(error) => return reply(StatusCode::BAD_REQUEST, error.to_string().into_bytes()),
    };
    let result = match command.command {
        AgentCommand::PingTest { host: target, targets } => {
            let index = target.as_str().strip_prefix("host").and_then(|number| number.parse::<usize>().ok());
            let reachable =
                index.and_then(|index| fleet.hosts.get(index)).is_some_and(|host| !host.lost.load(Ordering::Relaxed));
            let results = targets
                .into_iter()
                .map(|target| PingTestResult {
                    target,
                    reachable,
                    method: "tcp".to_owned(),
                    detail: if reachable { "connected (simulated)" } else { "no answer (simulated)" }.to_owned(),
                })
                .collect();
            CommandResult::PingTest { results }
        }
        AgentCommand::CheckHeartbeat { .. } => CommandResult::Heartbeat { pools: Vec::new() },
        AgentCommand::ListVms => {
            let vms = host.vms.lock().expect("vms lock").clone();
            CommandResult::Vms {
                vms: vms
                    .into_iter()
                    .map(|report| VmInventory { report, vcpus: VM_VCPUS, memory_mb: VM_MEMORY_MB, lease_held: true })
                    .collect(),
            }
        }
        AgentCommand::GetVmDefinition { vm } => CommandResult::Definition { xml: vm_xml(&vm) },
        AgentCommand::StartVm { vm, work, .. } => {
            fleet.counters.starts.fetch_add(1, Ordering::Relaxed);
            let mut vms = host.vms.lock().expect("vms lock");
            if vms.iter().any(|report| report.name == vm && report.state == VmRunState::Running) {
                CommandResult::AlreadyRunning
            } else {
                vms.retain(|report| report.name != vm);
                vms.push(VmReport {
                    name: vm,
                    state: VmRunState::Running,
                    instance: Some(kvmha_core::event::RequestId(work)),
                });
                CommandResult::Done
            }
        }
        AgentCommand::StopVm { vm, .. } => {
            host.vms.lock().expect("vms lock").retain(|report| report.name != vm);
            CommandResult::Done
        }
        AgentCommand::DefineVm { .. } => CommandResult::Done,
        AgentCommand::MigrateVm { .. } => {
            CommandResult::Unsupported { reason: "the bench's simulated hosts do not migrate".to_owned() }
        }
    };
    let response = CommandResponse { version: PROTOCOL_VERSION, request_id: command.request_id, result };
    reply(StatusCode::OK, serde_json::to_vec(&response).unwrap_or_default())
}

/// A Redfish BMC per host (plain HTTP, Basic auth; the manager is configured `insecure`
/// for them): a system whose power is on until its host is lost, then off. Enough of
/// Redfish for kvmha's status read, `ComputerSystem.Reset` and read-back.
pub async fn serve_bmcs(fleet: Arc<Fleet>, listener: TcpListener, password: String) {
    let expected = format!("Basic {}", base64_encode(format!("{}:{password}", BMC_USER).as_bytes()));
    let expected = Arc::new(expected);
    loop {
        let Ok((tcp, remote)) = listener.accept().await else { continue };
        if !remote.ip().is_loopback() {
            continue;
        }
        let Some(index) = tcp.local_addr().ok().and_then(|local| host_index(BMC_NET, local.ip())) else { continue };
        let Some(host) = fleet.hosts.get(index).cloned() else { continue };
        let expected = expected.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (host, expected) = (host.clone(), expected.clone());
                async move { Ok::<_, hyper::Error>(redfish(&host, &expected, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

pub const BMC_USER: &str = "bench";
const SYSTEM: &str = "/redfish/v1/Systems/1";
const RESET: &str = "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset";

async fn redfish(host: &SimHost, expected: &str, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let authorized = request.headers().get(hyper::header::AUTHORIZATION).is_some_and(|value| value == expected);
    if !authorized {
        return reply(StatusCode::UNAUTHORIZED, b"{}".to_vec());
    }
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let body = request.into_body().collect().await.map(|body| body.to_bytes()).unwrap_or_default();
    match (method, path.as_str()) {
        (hyper::Method::GET, "/redfish/v1/Systems") => {
            reply(StatusCode::OK, serde_json::json!({"Members": [{"@odata.id": SYSTEM}]}).to_string().into_bytes())
        }
        (hyper::Method::GET, SYSTEM) => {
            let power = if host.powered_off.load(Ordering::Relaxed) { "Off" } else { "On" };
            let system = serde_json::json!({
                "@odata.id": SYSTEM,
                "PowerState": power,
                "Actions": {"#ComputerSystem.Reset": {"target": RESET}},
            });
            reply(StatusCode::OK, system.to_string().into_bytes())
        }
        (hyper::Method::POST, RESET) => {
            let reset: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            match reset["ResetType"].as_str() {
                Some("ForceOff") => {
                    host.powered_off.store(true, Ordering::Relaxed);
                    host.lost.store(true, Ordering::Relaxed);
                    reply(StatusCode::NO_CONTENT, Vec::new())
                }
                Some("On") => {
                    host.powered_off.store(false, Ordering::Relaxed);
                    reply(StatusCode::NO_CONTENT, Vec::new())
                }
                _ => reply(StatusCode::BAD_REQUEST, b"{}".to_vec()),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, b"{}".to_vec()),
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (position, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if position <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_map_back_to_their_host() {
        for index in [0, 1, 249, 250, 9_999, HOSTS_MAX - 1] {
            let ip = host_ip(AGENT_NET, index);
            assert_eq!(host_index(AGENT_NET, IpAddr::V4(ip)), Some(index), "{ip}");
            assert_eq!(host_index(BMC_NET, IpAddr::V4(ip)), None);
        }
        assert_eq!(host_index(AGENT_NET, "127.0.0.1".parse().unwrap()), None);
        assert_eq!(host_index(AGENT_NET, "127.20.0.0".parse().unwrap()), None);
    }

    #[test]
    fn basic_auth_is_standard_base64() {
        assert_eq!(base64_encode(b"bench:pw"), "YmVuY2g6cHc=");
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b"abc"), "YWJj");
    }
}
