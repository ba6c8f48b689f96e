//! kvmha-agent: the daemon on every KVM host (ARCHITECTURE.md §2).
//!
//! - [`join`]: `kvmha agent join`: checks the manager's CA against the join token, sends
//!   a CSR, writes the signed certificate and `agent.toml`.
//! - [`run`]: `kvmha agent run`: pings the manager every ping interval, serves the
//!   manager's commands over mutual TLS, says goodbye on SIGTERM.
//!
//! - [`heartbeat`], [`watchdog`], [`self_fence`]: heartbeat records on every pool, the
//!   watchdog client and the self-fence decision (docs/daemons.md).
//! - [`vms`]: the hypervisor driver, VM leases (taken before every start, renewed
//!   independently of the manager), what the agent remembers of its VMs across restarts.
//! - [`commands`]: the manager's commands (VMs, neighbour ping and heartbeat checks).

pub mod commands;
pub mod config;
pub mod error;
pub mod heartbeat;
pub mod neighbour_watch;
pub mod self_fence;
pub mod vms;
pub mod watchdog;

pub use config::AgentConfig;
pub use error::AgentError;

use kvmha_core::event::{Ping, StorageHealth};
use kvmha_core::model::{BootId, Resources};
use kvmha_core::HostName;
use kvmha_proto::pki;
use kvmha_proto::{path, GoodbyeMessage, JoinRequest, JoinResponse, PingMessage, PingReply, PROTOCOL_VERSION};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Bound on each join request.
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on the goodbye at a clean stop: a manager that does not answer must not keep
/// the host from stopping.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long each HA VM is given to shut down gracefully at a planned stop under the
/// `failover` policy before it is destroyed: the stop must finish well inside a service
/// manager's stop timeout (systemd's default is 90 s).
const SHUTDOWN_GRACEFUL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct JoinOptions {
    pub manager_url: String,
    pub token: String,
    pub name: String,
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// Where the manager and the neighbours reach this agent, when not `listen` (several
    /// networks, NAT). An unspecified IP is replaced by the address the join came from.
    pub advertise: Option<SocketAddr>,
    pub hypervisor: Option<String>,
    /// The capacity the manager places VMs against, when not this machine's own
    /// (the lab's hosts share one machine but each declares its own size).
    pub capacity: Option<Resources>,
}

/// The two parts of a join token: the secret, and the CA certificate's fingerprint.
fn parse_token(token: &str) -> Result<(String, String), AgentError> {
    let mut parts = token.trim().split('.');
    let (Some("kvmha1"), Some(secret), Some(fingerprint), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AgentError::JoinToken {
            reason: "expected kvmha1.SECRET.CA_SHA256 (as printed by manager init)".into(),
        });
    };
    if fingerprint.len() != 64 || !fingerprint.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(AgentError::JoinToken { reason: "the CA fingerprint part is not a SHA-256 hex digest".into() });
    }
    Ok((secret.to_owned(), fingerprint.to_ascii_lowercase()))
}

fn capacity() -> Resources {
    let cpus = std::thread::available_parallelism().map(|count| count.get() as u32).unwrap_or(1);
    let memory_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024);
    Resources { cpus, memory_mb }
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), AgentError> {
    let io = |source| AgentError::Io { what: format!("writing {}", path.display()), source };
    std::fs::write(path, contents).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

/// Joins the cluster and writes `DIR/agent.toml`; returns its path.
pub async fn join(options: &JoinOptions) -> Result<PathBuf, AgentError> {
    let (secret, ca_fingerprint) = parse_token(&options.token)?;
    let url = options.manager_url.trim_end_matches('/').to_owned();
    let manager_error = |reason: String| AgentError::Manager { url: url.clone(), reason };
    // The CA is fetched without verification, then checked against the token: a
    // man in the middle cannot present a CA whose fingerprint matches.
    let unverified = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .timeout(JOIN_TIMEOUT)
        .build()
        .map_err(|error| manager_error(error.to_string()))?;
    let ca_pem = unverified
        .get(format!("{url}{}", path::JOIN_CA))
        .send()
        .await
        .and_then(|response| response.error_for_status())
        .map_err(|error| manager_error(error.to_string()))?
        .text()
        .await
        .map_err(|error| manager_error(error.to_string()))?;
    if pki::cert_fingerprint_pem(&ca_pem)? != ca_fingerprint {
        return Err(AgentError::JoinToken {
            reason: "the manager's CA does not match the token's fingerprint: refusing to join".into(),
        });
    }
    let client = kvmha_proto::transport::client(&ca_pem, None, JOIN_TIMEOUT)?;
    let csr = pki::generate_csr(&options.name)?;
    let request = JoinRequest {
        version: PROTOCOL_VERSION,
        secret,
        name: HostName::new(options.name.clone()),
        csr_pem: csr.cert_pem.clone(),
        listen: options.advertise.unwrap_or(options.listen).to_string(),
        hypervisor: options.hypervisor.clone(),
        capacity: options.capacity.unwrap_or_else(capacity),
    };
    let response = client
        .post(format!("{url}{}", path::JOIN))
        .json(&request)
        .send()
        .await
        .map_err(|error| manager_error(error.to_string()))?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|error| manager_error(error.to_string()))?;
    if !status.is_success() {
        let reason = serde_json::from_slice::<kvmha_proto::ErrorBody>(&bytes)
            .map(|body| body.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        return Err(AgentError::JoinRefused { reason: format!("http {status}: {reason}") });
    }
    let answer: JoinResponse = kvmha_proto::decode(&bytes)?;
    let dir = &options.dir;
    std::fs::create_dir_all(dir)
        .map_err(|source| AgentError::Io { what: format!("creating {}", dir.display()), source })?;
    write_file(&dir.join("ca.pem"), &answer.ca_pem, false)?;
    write_file(&dir.join("agent.pem"), &answer.cert_pem, false)?;
    write_file(&dir.join("agent.key"), &csr.key_pem, true)?;
    let raw = config::RawConfig {
        name: options.name.clone(),
        cluster_id: answer.cluster_id,
        manager_url: url.clone(),
        manager_urls: Vec::new(),
        listen: options.listen.to_string(),
        hypervisor: options.hypervisor.clone(),
        profile: answer.profile.name().to_owned(),
        timing: answer.timing,
        tls: config::RawTls {
            ca_cert: "ca.pem".into(),
            cert: "agent.pem".into(),
            key: "agent.key".into(),
            manager_cert_sha256: answer.manager_cert_sha256,
        },
        pools: Vec::new(),
        lease_pool: None,
        watchdog: None,
    };
    let text = toml::to_string_pretty(&raw).map_err(|error| AgentError::Config {
        file: dir.join("agent.toml"),
        field: "(all)".into(),
        problem: error.to_string(),
    })?;
    let file = dir.join("agent.toml");
    write_file(&file, &format!("# kvmha agent configuration, written by `kvmha agent join`.\n\n{text}"), false)?;
    Ok(file)
}

/// This boot of the host: the kernel's boot id, which changes on every reboot.
fn boot_id() -> BootId {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|text| text.trim().to_owned());
    BootId(id.unwrap_or_else(|_| "unknown-boot".to_owned()))
}

/// Ping sequence numbers start at the time since boot in µs: an agent restarted within
/// the same boot keeps counting up, so the manager never drops its pings as stale. Not
/// the wall clock: set back (NTP step, an operator's `date`) between two runs of the
/// agent, it made every ping of the new run look older than the last one, and the
/// manager dropped them all until the clock caught up (issue 10).
fn first_seq() -> u64 {
    let since_boot = self_fence::uptime().unwrap_or_default();
    u64::try_from(since_boot.as_micros()).unwrap_or(u64::MAX / 2)
}

/// Runs the agent until SIGTERM or SIGINT; says goodbye before returning.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let config = Arc::new(config);
    let ping_interval = config.timing.ping_interval();
    // A ping may take longer than one interval on a loaded machine; the manager only
    // suspects a host after `ping_timeout` of silence, so a ping is given what is left
    // of that after one interval (the next ping waits for this one).
    let ping_deadline = ping_interval.max(config.timing.ping_timeout().saturating_sub(ping_interval));
    let client =
        kvmha_proto::transport::client(&config.ca_pem, Some((&config.cert_pem, &config.key_pem)), ping_deadline)?;
    let tls = pki::server_config(&config.cert_pem, &config.key_pem, &config.ca_pem, pki::ClientAuth::Required)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Io { what: format!("binding {}", config.listen), source })?;
    let boot_id = boot_id();
    let state_file = config.file.parent().unwrap_or(Path::new(".")).join("self-fence.state");
    let last_renewal = self_fence::recall(&state_file, &boot_id.0);
    let vms = Arc::new(vms::Vms::open(&config, heartbeat::storage_boot_id(&boot_id.0), last_renewal).await?);
    let command_state = Arc::new(commands::CommandState::new(config.clone(), vms.clone())?);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let server =
        tokio::spawn(kvmha_proto::transport::serve_tls(listener, tls, commands::router(command_state), async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
    let guard = Arc::new(Guard::arm(&config)?);
    let heartbeats = Arc::new(heartbeat::Heartbeats::start(
        &config,
        heartbeat::storage_boot_id(&boot_id.0),
        guard.watchdog_open(),
        last_renewal,
    )?);
    let renewer = tokio::spawn(renew_leases(vms.clone(), config.lease.renewal_interval));
    let guard_task =
        tokio::spawn(guard.clone().run(heartbeats.clone(), vms.clone(), config.clone(), state_file, boot_id.0.clone()));
    let mut seq = first_seq();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| AgentError::Io { what: "installing the SIGTERM handler".into(), source })?;
    let mut interval = tokio::time::interval(ping_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(name = %config.name, manager = %config.manager_url, listen = %config.listen, "agent running");
    let mut failing = false;
    let mut managers = Managers::new(&config.manager_urls);
    // What to do with the VMs at a planned stop: the manager's word from the last ping
    // answered (freeze until one is).
    let mut shutdown_policy = kvmha_core::model::ShutdownPolicy::Freeze;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = interval.tick() => {}
        }
        seq += 1;
        // A slow hypervisor must not delay the ping: past half its deadline the ping goes
        // without VMs (a missing report tells the manager nothing; a late ping would).
        let vm_reports = match tokio::time::timeout(ping_deadline / 2, vms.reports()).await {
            Ok(reports) => reports,
            Err(_) => {
                tracing::warn!("the hypervisor did not list the domains in time: ping sent without VMs");
                Vec::new()
            }
        };
        let message = PingMessage {
            version: PROTOCOL_VERSION,
            ping: Ping {
                host: config.name.clone(),
                boot_id: boot_id.clone(),
                seq,
                vms: vm_reports,
                storage: if heartbeats.is_empty() {
                    StorageHealth::Ok
                } else {
                    heartbeats.health(std::time::Instant::now())
                },
            },
        };
        let result =
            post::<_, PingReply>(&client, &format!("{}{}", managers.current(), path::PING), &message, ping_deadline)
                .await;
        let result = result.map_err(|failure| managers.failed(failure));
        match result {
            Ok(reply) => {
                if failing {
                    tracing::info!("manager reachable again");
                    failing = false;
                }
                tracing::trace!(manager_time_ms = reply.manager_time_ms, ?reply.directives, "ping answered");
                shutdown_policy = reply.directives.shutdown_policy;
                guard.obey(&reply.directives, &heartbeats, &config).await;
            }
            Err(reason) if !failing => {
                tracing::warn!(%reason, "ping failed");
                failing = true;
            }
            Err(reason) => tracing::debug!(%reason, "ping failed"),
        }
    }
    if shutdown_policy == kvmha_core::model::ShutdownPolicy::Failover {
        seq += 1;
        shutdown_failover(&config, managers.current(), &client, &vms, &boot_id, seq, ping_deadline).await;
    }
    guard_task.abort();
    let _ = guard_task.await;
    // The VMs keep running; their leases are no longer renewed. A restart within the
    // self-fence deadline re-takes them; a later one stops the VMs (docs/daemons.md).
    renewer.abort();
    let _ = renewer.await;
    if !heartbeats.is_empty() {
        if heartbeats.stop_cleanly().await {
            tracing::info!("wrote \"stopped cleanly, watchdog disarmed\" to every pool");
            guard.release();
        } else {
            // The watchdog stays armed (closed without the magic character): the
            // records do not say this host stopped cleanly.
            tracing::warn!("could not write \"stopped cleanly\" to every pool: the watchdog stays armed");
        }
    }
    tracing::info!("stopping: goodbye to the manager");
    let goodbye = GoodbyeMessage { version: PROTOCOL_VERSION, host: config.name.clone(), boot_id };
    let url = format!("{}{}", managers.current(), path::GOODBYE);
    let sent = client.post(url).timeout(GOODBYE_TIMEOUT).json(&goodbye).send().await;
    match sent {
        Ok(response) if response.status().is_success() => tracing::info!("goodbye acknowledged"),
        Ok(response) => tracing::warn!(status = %response.status(), "goodbye refused"),
        Err(error) => tracing::warn!(%error, "goodbye not delivered"),
    }
    let _ = stop.send(true);
    let _ = server.await;
    Ok(())
}

/// The planned stop under the `failover` policy: the HA VMs are stopped here (graceful,
/// then hard), their leases released, and a last ping reports them `StoppedForShutdown`
/// so that the manager restarts them elsewhere at once; the goodbye follows. A VM that
/// could not be stopped keeps its lease and stays reported running: it is not moved.
async fn shutdown_failover(
    config: &AgentConfig,
    manager_url: &str,
    client: &reqwest::Client,
    vms: &Arc<vms::Vms>,
    boot_id: &BootId,
    seq: u64,
    deadline: Duration,
) {
    tracing::info!("stopping under the failover shutdown policy: stopping this host's HA VMs for a restart elsewhere");
    let (stopped, failed) = vms.stop_for_shutdown(SHUTDOWN_GRACEFUL).await;
    if !failed.is_empty() {
        tracing::error!(?failed, "these HA VMs could not be stopped: they stay on this host");
    }
    let message = PingMessage {
        version: PROTOCOL_VERSION,
        ping: Ping {
            host: config.name.clone(),
            boot_id: boot_id.clone(),
            seq,
            vms: vms.reports().await,
            // The heartbeats keep running until the goodbye: the host is fine.
            storage: StorageHealth::Ok,
        },
    };
    let url = format!("{manager_url}{}", path::PING);
    match post::<_, PingReply>(client, &url, &message, deadline).await {
        Ok(_) => tracing::info!(?stopped, "the manager was told: these VMs restart elsewhere"),
        // Their leases are released: the manager restarts them once it hears of the stop
        // (a restart of this agent reports them the same way) or proves the host down.
        Err(reason) => tracing::warn!(?reason, ?stopped, "the last ping with the stopped VMs was not delivered"),
    }
}

/// The watchdog and the self-fence decision. Keepalives come from their own task, so a
/// slow manager or a hung pool never delays them; they stop for good once the agent
/// self-fences.
#[derive(Debug)]
struct Guard {
    watchdog: std::sync::Mutex<Option<watchdog::Watchdog>>,
    /// The manager's storage hold: no self-fence before this.
    hold_until: std::sync::Mutex<Option<std::time::Instant>>,
    fenced: std::sync::atomic::AtomicBool,
}

impl Guard {
    /// Opens (arms) the watchdog first when the config says armed: records say "armed"
    /// only once it is.
    fn arm(config: &AgentConfig) -> Result<Guard, AgentError> {
        let watchdog = match &config.watchdog {
            Some(watchdog) if watchdog.armed => Some(watchdog::Watchdog::open(&watchdog.device).map_err(|source| {
                AgentError::Io { what: format!("opening the watchdog {}", watchdog.device.display()), source }
            })?),
            _ => None,
        };
        Ok(Guard {
            watchdog: std::sync::Mutex::new(watchdog),
            hold_until: std::sync::Mutex::new(None),
            fenced: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<watchdog::Watchdog>> {
        self.watchdog.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn watchdog_open(&self) -> bool {
        self.lock().is_some()
    }

    /// Disarms with the magic close (after the records say "not armed").
    fn release(&self) {
        if let Some(watchdog) = self.lock().take() {
            let device = watchdog_path(&watchdog);
            match watchdog.magic_close() {
                Ok(()) => tracing::info!(%device, "watchdog released"),
                Err(error) => tracing::error!(%error, "watchdog magic close failed"),
            }
        }
    }

    async fn run(
        self: Arc<Self>,
        heartbeats: Arc<heartbeat::Heartbeats>,
        vms: Arc<vms::Vms>,
        config: Arc<AgentConfig>,
        state_file: PathBuf,
        boot_id: String,
    ) {
        use std::sync::atomic::Ordering;
        let mut remembered = None;
        let every = (config.timing.lease_renew_interval() / 2).min(config.timing.watchdog_timeout() / 4);
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if self.fenced.load(Ordering::SeqCst) {
                continue;
            }
            let now = std::time::Instant::now();
            let last_success = heartbeats.last_success();
            if last_success.is_some() && last_success != remembered {
                // Kept across an agent restart within this boot (small, local, not shared).
                match self_fence::remember(&state_file, &boot_id, last_success.unwrap_or(now)) {
                    Ok(()) => remembered = last_success,
                    Err(error) => tracing::debug!(%error, "remembering the last renewal failed"),
                }
            }
            let inputs = self_fence::SelfFenceInputs {
                watchdog_armed: self.watchdog_open(),
                // Without a hypervisor driver the agent cannot tell: it assumes HA VMs
                // may run here.
                ha_vms: config.hypervisor.as_ref().map(|_| vms.leased_count()),
                last_renewal: last_success.unwrap_or(heartbeats.started()),
                hold_until: *self.hold_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
                self_fence_after: config.timing.self_fence_after(),
            };
            // A lease must be given up (its VM stopped) before its self-fence deadline:
            // start two ticks early so that the hard stop is done by then.
            let lease_due = vms.lease_deadline_near(now, every * 2);
            if self_fence::self_fence_due(&inputs, now) || lease_due.is_some() {
                let cause = match &lease_due {
                    Some(vm) => format!("the lease of {vm} could not be renewed within the self-fence deadline"),
                    None => "no heartbeat landed on any pool for the self-fence time".to_owned(),
                };
                tracing::error!(
                    self_fence_after_ms = config.timing.self_fence_after().as_millis() as u64,
                    silent_ms = now.saturating_duration_since(inputs.last_renewal).as_millis() as u64,
                    "SELF-FENCE: {cause}; stopping every VM that holds a lease, then the watchdog keepalives"
                );
                // No keepalive while the VMs are stopped (this loop waits), none after:
                // if a stop hangs, the watchdog resets the host.
                let all_stopped = vms.self_fence().await;
                self.fenced.store(true, Ordering::SeqCst);
                tracing::error!(
                    all_stopped,
                    watchdog_armed = self.watchdog_open(),
                    "SELF-FENCED: watchdog keepalives stopped for good"
                );
                continue;
            }
            if let Some(watchdog) = self.lock().as_mut() {
                if let Err(error) = watchdog.keepalive() {
                    tracing::warn!(%error, "watchdog keepalive failed");
                }
            }
        }
    }

    /// The manager's directives from a ping reply: storage hold and disarm/re-arm.
    async fn obey(
        &self,
        directives: &kvmha_core::event::Directives,
        heartbeats: &heartbeat::Heartbeats,
        config: &AgentConfig,
    ) {
        use std::sync::atomic::Ordering;
        if directives.storage_hold {
            let until = std::time::Instant::now() + config.timing.storage_hold_validity();
            *self.hold_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(until);
        }
        let configured = config.watchdog.as_ref().filter(|watchdog| watchdog.armed);
        if directives.disarmed && self.watchdog_open() {
            // The records say "not armed" first; only then is the watchdog released.
            if heartbeats.write_armed(false).await {
                self.release();
            }
        } else if !directives.disarmed && !self.watchdog_open() && !self.fenced.load(Ordering::SeqCst) {
            if let Some(watchdog) = configured {
                // Re-arm: the watchdog first, then the records.
                match watchdog::Watchdog::open(&watchdog.device) {
                    Ok(opened) => {
                        *self.lock() = Some(opened);
                        heartbeats.write_armed(true).await;
                    }
                    Err(error) => tracing::warn!(%error, "re-arming the watchdog failed"),
                }
            }
        }
    }
}

fn watchdog_path(watchdog: &watchdog::Watchdog) -> String {
    watchdog.path().display().to_string()
}

/// Renews this host's VM leases every renewal interval, whatever the manager does.
async fn renew_leases(vms: Arc<vms::Vms>, every: Duration) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        vms.renew_all().await;
    }
}

/// Why a request to a manager failed.
#[derive(Debug)]
enum PostFailure {
    /// A follower (421): the leader's agent URL if it knows it.
    NotLeader {
        leader: Option<String>,
    },
    Other(String),
}

/// The managers this agent knows and the one it talks to. Several managers (etcd): one
/// leader takes pings, followers answer 421 with the leader's URL.
#[derive(Debug)]
struct Managers {
    urls: Vec<String>,
    current: usize,
}

impl Managers {
    fn new(urls: &[String]) -> Managers {
        Managers { urls: urls.to_vec(), current: 0 }
    }

    fn current(&self) -> &str {
        &self.urls[self.current]
    }

    /// Picks the manager to try next and returns what to log. A follower's hint is taken
    /// only if it is one of the configured managers (TLS verifies any of them against the
    /// cluster CA; the list keeps a follower from steering agents anywhere else).
    fn failed(&mut self, failure: PostFailure) -> String {
        let from = self.current().to_owned();
        match failure {
            PostFailure::NotLeader { leader: Some(leader) } => {
                let leader = leader.trim_end_matches('/').to_owned();
                match self.urls.iter().position(|url| *url == leader) {
                    Some(index) => self.current = index,
                    None => self.current = (self.current + 1) % self.urls.len(),
                }
                tracing::info!(from, to = self.current(), "manager is a follower: switching to the leader");
                format!("{from} is not the leader")
            }
            PostFailure::NotLeader { leader: None } => {
                self.current = (self.current + 1) % self.urls.len();
                format!("{from} is not the leader and knows none yet")
            }
            PostFailure::Other(reason) => {
                self.current = (self.current + 1) % self.urls.len();
                format!("{from}: {reason}")
            }
        }
    }
}

async fn post<T: serde::Serialize, R: serde::de::DeserializeOwned + kvmha_proto::Versioned>(
    client: &reqwest::Client,
    url: &str,
    body: &T,
    timeout: Duration,
) -> Result<R, PostFailure> {
    let other = |error: reqwest::Error| PostFailure::Other(error.to_string());
    let response = client.post(url).timeout(timeout).json(body).send().await.map_err(other)?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(other)?;
    if status == reqwest::StatusCode::MISDIRECTED_REQUEST {
        let leader = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|body| body.get("leader").and_then(|leader| leader.as_str().map(str::to_owned)));
        return Err(PostFailure::NotLeader { leader });
    }
    if !status.is_success() {
        return Err(PostFailure::Other(format!("http {status}: {}", String::from_utf8_lossy(&bytes))));
    }
    kvmha_proto::decode(&bytes).map_err(|error| PostFailure::Other(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_follows_a_followers_hint_only_to_a_manager_it_knows() {
        let urls: Vec<String> = ["https://m1:7443", "https://m2:7443", "https://m3:7443"].map(String::from).to_vec();
        let mut managers = Managers::new(&urls);
        assert_eq!(managers.current(), "https://m1:7443");
        managers.failed(PostFailure::NotLeader { leader: Some("https://m3:7443/".into()) });
        assert_eq!(managers.current(), "https://m3:7443", "the hint (trailing slash and all) is followed");
        managers.failed(PostFailure::NotLeader { leader: Some("https://elsewhere:7443".into()) });
        assert_eq!(managers.current(), "https://m1:7443", "an unknown hint is not followed: next in the list");
        managers.failed(PostFailure::Other("connection failed".into()));
        assert_eq!(managers.current(), "https://m2:7443");
        managers.failed(PostFailure::NotLeader { leader: None });
        assert_eq!(managers.current(), "https://m3:7443");
    }

    /// Sequence numbers follow the time since boot, which no clock step moves: a second
    /// run of the agent in the same boot starts above the first run's numbers even when
    /// the wall clock was set back in between.
    #[test]
    fn ping_seq_counts_from_the_boot_not_the_wall_clock() {
        let before = self_fence::uptime().expect("/proc/uptime").as_micros() as u64;
        let first = first_seq();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let second = first_seq();
        let after = self_fence::uptime().expect("/proc/uptime").as_micros() as u64;
        assert!(before <= first && first < second && second <= after, "{before} {first} {second} {after}");
    }

    #[test]
    fn token_shapes() {
        let fingerprint = "a".repeat(64);
        assert_eq!(parse_token(&format!("kvmha1.s3cret.{fingerprint}")).unwrap(), ("s3cret".to_owned(), fingerprint));
        for bad in ["", "kvmha1.x", "kvmha2.x.y", &format!("kvmha1.s.{}", "z".repeat(64)), "kvmha1.a.b.c"] {
            let error = parse_token(bad).unwrap_err();
            assert!(!error.to_string().contains("s3cret"), "{error}");
        }
    }
}
