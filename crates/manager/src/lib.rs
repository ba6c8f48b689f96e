//! kvmha-manager: runs the core engine against real agents (ARCHITECTURE.md §2).
//!
//! - [`init`]: `kvmha manager init`: cluster CA, manager certificate, tokens, manager.toml.
//! - [`run`]: `kvmha manager run`: the engine thread ([`controller`]), the executor of its
//!   commands ([`executor`]), the agents' mutual-TLS endpoints ([`server`]) and the
//!   operator API ([`api`]), persisted in SQLite ([`store`]).

pub mod api;
pub mod config;
pub mod controller;
pub mod dashboard;
pub mod error;
pub mod etcd;
pub mod executor;
pub mod heartbeat;
pub mod incident;
pub mod leader;
pub mod metrics;
pub mod neighbour_heartbeat;
pub mod notify;
pub mod ping_queue;
pub mod registry;
pub mod server;
pub mod store;
pub mod store_etcd;
pub mod vm_activity;
pub mod vm_api;

pub use config::ManagerConfig;
pub use error::ManagerError;

use controller::{Clock, Startup};
use kvmha_core::{Engine, EngineConfig, Instant, Profile, TimingSettings};
use kvmha_proto::pki::{self, ClusterCa};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What `kvmha manager init` writes.
#[derive(Debug)]
pub struct InitOptions {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub profile: Profile,
}

#[derive(Debug)]
pub struct InitOutput {
    pub config_file: PathBuf,
    pub operator_token_file: PathBuf,
    pub readonly_token_file: PathBuf,
    /// `kvmha1.<secret>.<sha256 of the CA certificate>`: the agent checks the CA it is
    /// shown against the fingerprint before it sends anything.
    pub join_token: String,
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), ManagerError> {
    let io = |source| ManagerError::Io { what: format!("writing {}", path.display()), source };
    std::fs::write(path, contents).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

/// Creates a new cluster in `options.dir`. Refuses to overwrite an existing one.
pub fn init(options: &InitOptions) -> Result<InitOutput, ManagerError> {
    let dir = &options.dir;
    let config_file = dir.join("manager.toml");
    if config_file.exists() {
        return Err(ManagerError::Io {
            what: format!("{} exists", config_file.display()),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        });
    }
    std::fs::create_dir_all(dir)
        .map_err(|source| ManagerError::Io { what: format!("creating {}", dir.display()), source })?;
    let cluster_id = random_hex(8);
    let ca = ClusterCa::generate(&cluster_id)?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if !options.listen.ip().is_unspecified() && !options.listen.ip().is_loopback() {
        names.push(options.listen.ip().to_string());
    }
    if let Ok(hostname) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let hostname = hostname.trim().to_owned();
        if !hostname.is_empty() && !names.contains(&hostname) {
            names.push(hostname);
        }
    }
    let manager = ca.issue("kvmha-manager", names)?;
    let operator_token = random_hex(32);
    let readonly_token = random_hex(32);
    let join_secret = random_hex(32);
    write_file(&dir.join("ca.pem"), &ca.cert_pem(), false)?;
    write_file(&dir.join("ca.key"), &ca.key_pem(), true)?;
    write_file(&dir.join("manager.pem"), &manager.cert_pem, false)?;
    write_file(&dir.join("manager.key"), &manager.key_pem, true)?;
    let operator_token_file = dir.join("operator.token");
    let readonly_token_file = dir.join("readonly.token");
    write_file(&operator_token_file, &format!("{operator_token}\n"), true)?;
    write_file(&readonly_token_file, &format!("{readonly_token}\n"), true)?;
    let raw = config::RawConfig {
        cluster_id,
        listen: options.listen.to_string(),
        api_listen: options.api_listen.to_string(),
        data_dir: PathBuf::from("."),
        profile: options.profile.name().to_owned(),
        timing: TimingSettings::default(),
        shutdown_policy: Default::default(),
        tls: config::RawTls {
            ca_cert: "ca.pem".into(),
            ca_key: "ca.key".into(),
            cert: "manager.pem".into(),
            key: "manager.key".into(),
        },
        api: config::RawApi {
            operator_token_sha256: vec![pki::sha256_hex(operator_token.as_bytes())],
            readonly_token_sha256: vec![pki::sha256_hex(readonly_token.as_bytes())],
            join_token_sha256: pki::sha256_hex(join_secret.as_bytes()),
        },
        hosts: Default::default(),
        pools: Default::default(),
        store: Default::default(),
    };
    let text = toml::to_string_pretty(&raw).map_err(|error| ManagerError::Snapshot { reason: error.to_string() })?;
    let header = "# kvmha manager configuration (docs/daemons.md).\n\
                  # BMCs: [hosts.NAME.bmc] kind = \"ipmi\" | \"redfish\", address, username, password_file.\n\n";
    write_file(&config_file, &format!("{header}{text}"), false)?;
    let ca_fingerprint = pki::cert_fingerprint_pem(&ca.cert_pem())?;
    Ok(InitOutput {
        config_file,
        operator_token_file,
        readonly_token_file,
        join_token: format!("kvmha1.{join_secret}.{ca_fingerprint}"),
    })
}

/// Runs the manager until SIGTERM or SIGINT.
pub async fn run(config_file: &Path) -> Result<(), ManagerError> {
    let config = ManagerConfig::load(config_file)?;
    let ca = ClusterCa::load(&config.ca_cert_pem, &config.ca_key_pem)?;
    let leadership = match &config.store {
        config::StoreConfig::Etcd(etcd) => {
            Some(leader::Leadership::new(etcd).map_err(|error| ManagerError::Etcd { reason: error.to_string() })?)
        }
        config::StoreConfig::Sqlite { .. } => None,
    };
    let store = Store::open(&config.store, leadership.clone())?;
    let (mut engine, clock) = match store.load_engine()? {
        Some((engine, clock_ms)) => {
            tracing::info!(clock_ms, hosts = engine.hosts().len(), "engine state restored");
            if engine.timing() != &config.timing {
                tracing::warn!(
                    "timing in the config differs from the stored engine's; the stored timing stays in force"
                );
            }
            (engine, Clock::starting_at(clock_ms))
        }
        None => {
            tracing::info!("new cluster: empty engine");
            (Engine::new(EngineConfig::new(config.timing.clone()), Instant::ZERO), Clock::starting_at(0))
        }
    };
    // Policy, unlike timing, follows the config file at every start.
    engine.set_shutdown_policy(config.shutdown_policy);
    let tick_every = config.timing.ping_interval() / 4;
    let directory = controller::SharedDirectory::default();
    // Revoked before anything listens: a removed host's agent is refused from the first
    // request after a restart.
    directory.write().expect("directory lock").revoked = store.revoked_certs()?.into_iter().collect();
    let registry = registry::SharedRegistry::default();
    let executor =
        Arc::new(executor::Executor::new(config.clone(), clock.clone(), directory.clone(), registry.clone())?);
    if let Some(leadership) = &leadership {
        executor.set_leadership(leadership.clone());
    }
    let (last_event_sender, last_event) = watch::channel(store.last_event_id()?);
    let (controller, engine_thread) = controller::spawn(Startup {
        engine,
        store,
        clock,
        directory: directory.clone(),
        registry: registry.clone(),
        executor: executor.clone(),
        last_event: last_event_sender,
        leadership: leadership.clone(),
    });
    executor.set_controller(controller.clone());

    let bind = |address: SocketAddr| async move {
        TcpListener::bind(address)
            .await
            .map_err(|source| ManagerError::Io { what: format!("binding {address}"), source })
    };
    let agent_listener = bind(config.listen).await?;
    let api_listener = bind(config.api_listen).await?;
    let tls = pki::server_config(&config.cert_pem, &config.key_pem, &config.ca_cert_pem, pki::ClientAuth::Optional)?;
    let agent_api = Arc::new(server::AgentApi {
        controller: controller.clone(),
        directory,
        ca,
        ca_pem: config.ca_cert_pem.clone(),
        manager_cert_sha256: pki::cert_fingerprint_pem(&config.cert_pem)?,
        config: config.clone(),
        host_spec: executor.clone(),
        leadership: leadership.clone(),
    });
    let operator_api = Arc::new(api::OperatorApi {
        controller: controller.clone(),
        directory: agent_api.directory.clone(),
        store: Mutex::new(Store::open(&config.store, None)?),
        last_event,
        operator_token_sha256: config.operator_token_sha256.clone(),
        readonly_token_sha256: config.readonly_token_sha256.clone(),
        executor: executor.clone(),
        registry,
    });
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    tokio::spawn(kvmha_proto::transport::serve_tls(
        agent_listener,
        tls,
        server::router(agent_api),
        until_stopped(stopped.clone()),
    ));
    let dashboard = dashboard::Dashboard::new(operator_api.clone(), &config);
    let mut app = api::router(operator_api).merge(dashboard::router(dashboard));
    if let Some(leadership) = leadership.clone() {
        app = app.layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                server::writes_to_the_leader(leadership.clone(), request, next)
            },
        ));
    }
    let api_server = axum::serve(api_listener, app).with_graceful_shutdown(until_stopped(stopped.clone()));
    tokio::spawn(async move {
        if let Err(error) = api_server.await {
            tracing::error!(%error, "operator api stopped");
        }
    });
    let ticker = controller.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick_every.max(Duration::from_millis(10)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            ticker.feed(kvmha_core::Event::Tick).await;
        }
    });
    if let Some(leadership) = leadership.clone() {
        // Campaigns, then leads until the process ends (a lost lease ends it).
        tokio::spawn(leadership.run());
    }
    tracing::info!(listen = %config.listen, api_listen = %config.api_listen, profile = %config.profile, "manager running");
    println!("dashboard: {}", dashboard::url(config.api_listen));
    notify::notify_or_log("READY=1\nSTATUS=manager running");
    if let Some(every) = notify::watchdog_interval() {
        // WATCHDOG=1 only while the engine thread answers: a wedged engine is restarted.
        let watched = controller.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Ok(Ok(view)) = tokio::time::timeout(every, watched.view()).await {
                    let up = view.hosts.iter().filter(|host| host.state == kvmha_core::HostState::Up).count();
                    notify::notify_or_log(&format!("WATCHDOG=1\nSTATUS={up} of {} hosts up", view.hosts.len()));
                }
            }
        });
    }

    let mut engine_done = tokio::task::spawn_blocking(move || engine_thread.join());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| ManagerError::Io { what: "installing the SIGTERM handler".into(), source })?;
    let result = tokio::select! {
        _ = terminate.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        joined = &mut engine_done => Some(joined),
    };
    notify::notify_or_log("STOPPING=1");
    let _ = stop.send(true);
    let joined = match result {
        Some(joined) => joined,
        None => {
            tracing::info!("stopping: final snapshot");
            controller.shutdown().await;
            let joined = engine_done.await;
            if let Some(leadership) = &leadership {
                leadership.resign().await;
            }
            joined
        }
    };
    if let (Some(leadership), Ok(Ok(Err(error)))) = (&leadership, &joined) {
        // With etcd, a store the engine cannot write to (a deposed epoch, etcd gone past
        // the lease deadline) means this manager may no longer act.
        leadership.step_down(&error.to_string());
    }
    match joined {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => Err(error),
        _ => Err(ManagerError::EngineGone),
    }
}
