//! `kvmha bench scale`: one real manager (`kvmha manager run`, a child process measured
//! on its own) against N simulated agents in this process ([`fleet`]), M HA VMs each.
//!
//! 1. A fresh cluster: `manager init`, every host configured with a Redfish BMC that
//!    this process simulates, and the VM registry seeded with N×M HA VMs (each with a
//!    definition, last seen on its host) straight into the store before the manager
//!    starts: through the operator API that would be 2 requests and 2 fsyncs per VM.
//! 2. The manager starts; every agent joins through the real join endpoint (its own key,
//!    a certificate from the cluster CA), then pings at the profile's interval over its
//!    own mutual-TLS session, reporting its M VMs running.
//! 3. Steady state, once every host has pinged and the reconnect grace is over: the
//!    manager's CPU (utime+stime from /proc/PID/stat) and resident memory (VmRSS) over
//!    `--measure-secs`, and the pings it answered per second.
//! 4. Mass failure: 5 % of the hosts (every 20th) lose power at once: their agents stop,
//!    their command endpoints drop connections, their BMCs read power off. The manager
//!    must notice (ping timeout), investigate (neighbour ping, BMC power), fence through
//!    the BMC (power off, read back: the safety rule's first proof) and plan every HA VM
//!    of those hosts: a start work item, or PendingCapacity. `mass_failure_plan_ms` is
//!    from the first lost host turning Suspect to the last of their VMs planned, both read
//!    from the audit log (engine clock).

mod fleet;

use anyhow::Context;
use fleet::{Fleet, BMC_NET};
use kvmha_core::{Profile, Resources, Timing, TimingSettings};
use kvmha_manager::registry::{HaSettings, VmRow};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Simulated hosts (agents).
    #[arg(long)]
    hosts: usize,
    /// HA VMs per host.
    #[arg(long)]
    vms_per_host: usize,
    /// Timing profile: fast, balanced or conservative.
    #[arg(long, default_value = "balanced")]
    profile: String,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Length of the steady-state measurement.
    #[arg(long, default_value_t = 20)]
    measure_secs: u64,
    /// Give up waiting for the lost hosts' VMs to be planned after this long.
    #[arg(long, default_value_t = 180)]
    plan_timeout_secs: u64,
    /// Keep the cluster directory (config, store, manager log) here instead of deleting it.
    #[arg(long)]
    keep: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct ScaleResult {
    pub hosts: usize,
    pub vms: usize,
    pub profile: String,
    pub ping_interval_ms: u64,
    /// Manager resident memory at the end of the steady window (VmRSS).
    pub manager_rss_mb: f64,
    /// Its peak over the whole run (VmHWM), start-up included.
    pub manager_peak_rss_mb: f64,
    /// Manager CPU time over the steady window / wall time of the window.
    pub manager_cpu_cores: f64,
    pub pings_per_s: f64,
    /// hosts / ping interval: what every agent pinging on time would give.
    pub expected_pings_per_s: f64,
    pub pings_failed: u64,
    pub lost_hosts: usize,
    pub affected_vms: usize,
    /// Affected VMs with a start work item issued or in PendingCapacity.
    pub planned_vms: usize,
    pub start_work_items: usize,
    pub pending_capacity: usize,
    /// First lost host Suspect → last affected VM planned (engine clock, audit log).
    pub mass_failure_plan_ms: Option<u64>,
    /// The slowest lost host's own Suspect → its last VM planned.
    pub slowest_host_plan_ms: Option<u64>,
    /// Power loss (wall clock) → every lost host Suspect; at least the ping timeout.
    pub detection_ms: Option<u64>,
    /// Starts the surviving agents received by the end of the run.
    pub starts_received: u64,
    pub setup_s: f64,
    pub measure_s: f64,
    /// /proc/loadavg at the start and at the end of the steady window.
    pub load_average: [String; 2],
}

/// Entry point of `kvmha bench scale`: the exit code (1 if some VM was never planned).
pub fn main(args: Args) -> anyhow::Result<i32> {
    raise_descriptor_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // On SIGINT or SIGTERM the run is dropped, and with it the manager child (SIGTERM,
    // wait) and the cluster directory.
    let result = runtime.block_on(async {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = run(&args) => result,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            _ = terminate.recv() => anyhow::bail!("terminated"),
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "{} hosts, {} VMs, profile {} (ping every {} ms)",
            result.hosts, result.vms, result.profile, result.ping_interval_ms
        );
        println!(
            "manager: {:.1} MiB resident ({:.1} MiB peak), {:.3} cores over {:.1} s",
            result.manager_rss_mb, result.manager_peak_rss_mb, result.manager_cpu_cores, result.measure_s
        );
        println!(
            "pings: {:.0}/s answered (expected {:.0}/s), {} failed",
            result.pings_per_s, result.expected_pings_per_s, result.pings_failed
        );
        println!(
            "mass failure: {} hosts, {} of {} VMs planned ({} start work items, {} pending capacity) in {} ms from detection",
            result.lost_hosts,
            result.planned_vms,
            result.affected_vms,
            result.start_work_items,
            result.pending_capacity,
            result.mass_failure_plan_ms.map_or("-".to_owned(), |ms| ms.to_string())
        );
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(if result.planned_vms == result.affected_vms { 0 } else { 1 })
}

/// 10,000 agents hold 10,000 sessions here and as many in the manager (which inherits
/// the limit): raise the soft descriptor limit to the hard one.
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, hard, "could not raise the descriptor limit");
            }
        }
    }
}

/// The manager child: SIGTERM and a wait on drop, so no run leaves one behind.
struct ManagerProcess {
    child: Child,
}

impl ManagerProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ManagerProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cluster directory, deleted on drop unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn read_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of `pid`, in seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|text| text.trim().to_owned()).unwrap_or_default()
}

/// manager.toml: every host gets a Redfish BMC at its own loopback address.
fn configure_hosts(config_file: &Path, hosts: usize, bmc_port: u16) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config_file)?;
    let mut config: toml::Table = text.parse()?;
    let mut table = toml::Table::new();
    for index in 0..hosts {
        let mut bmc = toml::Table::new();
        bmc.insert("kind".into(), "redfish".into());
        bmc.insert("username".into(), fleet::BMC_USER.into());
        bmc.insert("password_file".into(), "bmc.password".into());
        bmc.insert("insecure".into(), true.into());
        bmc.insert("address".into(), format!("http://{}:{bmc_port}", fleet::host_ip(BMC_NET, index)).into());
        let mut host = toml::Table::new();
        host.insert("bmc".into(), bmc.into());
        table.insert(fleet::host_name(index).to_string(), host.into());
    }
    config.insert("hosts".into(), table.into());
    std::fs::write(config_file, toml::to_string(&config)?)?;
    Ok(())
}

/// N×M HA VMs, each with a definition, last seen on its host.
fn seed_registry(db: &Path, hosts: usize, vms_per_host: usize) -> anyhow::Result<()> {
    let mut store = kvmha_manager::store::SqliteStore::open(db)?;
    let mut rows = Vec::with_capacity(hosts * vms_per_host);
    for host in 0..hosts {
        for vm in 0..vms_per_host {
            let name = fleet::vm_name(host, vm);
            rows.push(VmRow {
                xml: Some(fleet::vm_xml(&name)),
                name,
                vcpus: fleet::VM_VCPUS,
                memory_mb: fleet::VM_MEMORY_MB,
                ha: HaSettings { enabled: true, ..HaSettings::default() },
                last_host: Some(fleet::host_name(host)),
            });
        }
    }
    store.import_vms(&rows)?;
    Ok(())
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn run(args: &Args) -> anyhow::Result<ScaleResult> {
    anyhow::ensure!(args.hosts >= 2, "--hosts: at least 2 (one to lose, one to take its VMs)");
    anyhow::ensure!(args.hosts <= fleet::HOSTS_MAX, "--hosts: at most {}", fleet::HOSTS_MAX);
    anyhow::ensure!(args.vms_per_host <= 999, "--vms-per-host: at most 999");
    let profile: Profile = args.profile.parse()?;
    let timing = Timing::from_profile(profile, &TimingSettings::default())?;
    let interval = timing.ping_interval();
    let setup_started = Instant::now();

    let path = match &args.keep {
        Some(path) => path.clone(),
        None => std::env::temp_dir().join(format!("kvmha-bench-scale-{}", std::process::id())),
    };
    anyhow::ensure!(!path.join("manager.toml").exists(), "{} already holds a cluster", path.display());
    let dir = WorkDir { path: path.clone(), keep: args.keep.is_some() };
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let api_listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let init = kvmha_manager::init(&kvmha_manager::InitOptions { dir: dir.path.clone(), listen, api_listen, profile })?;
    let secret = init.join_token.split('.').nth(1).context("join token without a secret")?.to_owned();

    // Both listeners take every loopback address of the plan; peers must be local.
    let commands = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let bmcs = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let command_port = commands.local_addr()?.port();
    let bmc_port = bmcs.local_addr()?.port();
    let bmc_password = format!("{:032x}", rand::random::<u128>());
    let password_file = dir.path.join("bmc.password");
    std::fs::write(&password_file, format!("{bmc_password}\n"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600))?;
    }
    configure_hosts(&init.config_file, args.hosts, bmc_port)?;
    seed_registry(&dir.path.join("manager.db"), args.hosts, args.vms_per_host)?;

    let log = std::fs::File::create(dir.path.join("manager.log"))?;
    let mut manager = ManagerProcess {
        child: std::process::Command::new(std::env::current_exe()?)
            .args(["manager", "run", "--config"])
            .arg(&init.config_file)
            .env("KVMHA_LOG", std::env::var("KVMHA_BENCH_MANAGER_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the manager")?,
    };
    let manager_started = Instant::now();
    let pid = manager.pid();
    let mut exited = None;
    wait_for("the manager's agent endpoint", Duration::from_secs(300), || {
        exited = manager.child.try_wait().ok().flatten();
        exited.is_some() || std::net::TcpStream::connect(listen).is_ok()
    })
    .await?;
    if let Some(status) = exited {
        let log = std::fs::read_to_string(dir.path.join("manager.log")).unwrap_or_default();
        anyhow::bail!("the manager exited ({status}): {}", log.trim());
    }

    let ca_pem = std::fs::read_to_string(dir.path.join("ca.pem"))?;
    let manager_cert_sha256 =
        kvmha_proto::pki::cert_fingerprint_pem(&std::fs::read_to_string(dir.path.join("manager.pem"))?)?;
    let fleet = Arc::new(Fleet::new(args.hosts, args.vms_per_host, ca_pem.clone(), manager_cert_sha256));
    let serving = [
        tokio::spawn(fleet::serve_commands(fleet.clone(), commands)),
        tokio::spawn(fleet::serve_bmcs(fleet.clone(), bmcs, bmc_password)),
    ];

    // Half of each host's room is taken by its own VMs: the survivors have room for the
    // lost hosts' VMs.
    let per_host = args.vms_per_host.max(1) as u64;
    let capacity = Resources { cpus: 2 * per_host as u32, memory_mb: 2 * per_host * fleet::VM_MEMORY_MB };
    let join_client = kvmha_proto::transport::client(&ca_pem, None, Duration::from_secs(120))?;
    let permits = Arc::new(tokio::sync::Semaphore::new(256));
    // Like a real agent, each starts pinging as soon as it has joined: a host that joined
    // and stays silent past the ping timeout is rightly suspected.
    let mut joins = tokio::task::JoinSet::new();
    let pingers = Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
    for index in 0..args.hosts {
        let (fleet, client, secret, permits) = (fleet.clone(), join_client.clone(), secret.clone(), permits.clone());
        let pingers = pingers.clone();
        joins.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            fleet.join(&client, listen, &secret, index, command_port, capacity).await?;
            pingers.lock().expect("pingers lock").spawn(fleet::ping_loop(fleet.clone(), index, listen, interval));
            anyhow::Ok(())
        });
    }
    while let Some(joined) = joins.join_next().await {
        joined??;
    }
    let everyone = args.hosts;
    wait_for("every host's first answered ping", Duration::from_secs(600), || {
        fleet.hosts.iter().filter(|host| host.pinged.load(Ordering::Relaxed)).count() == everyone
    })
    .await?;
    // Suspicion starts only after the reconnect grace; steady state a few pings later.
    let settled = manager_started + timing.reconnect_grace() + interval * 3;
    tokio::time::sleep_until(settled.max(Instant::now() + interval * 3).into()).await;
    let setup_s = setup_started.elapsed().as_secs_f64();

    let load_before = load_average();
    let cpu_before = cpu_seconds(pid).context("reading the manager's cpu time")?;
    let pings_before = fleet.counters.pings_ok.load(Ordering::Relaxed);
    let failed_before = fleet.counters.pings_failed.load(Ordering::Relaxed);
    let window_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.measure_secs)).await;
    let measure_s = window_started.elapsed().as_secs_f64();
    let cpu_after = cpu_seconds(pid).context("reading the manager's cpu time")?;
    let pings_after = fleet.counters.pings_ok.load(Ordering::Relaxed);
    let failed_after = fleet.counters.pings_failed.load(Ordering::Relaxed);
    let load_after = load_average();
    let rss_kb = read_status_kb(pid, "VmRSS:").context("reading the manager's VmRSS")?;

    // The mass failure.
    let events = kvmha_manager::store::SqliteStore::open(&dir.path.join("manager.db"))?;
    let mut after = events.last_event_id()?;
    let lost: Vec<usize> = (0..args.hosts).filter(|index| index % 20 == 10 % args.hosts.min(20)).collect();
    let lost_names: BTreeMap<String, usize> =
        lost.iter().map(|index| (fleet::host_name(*index).to_string(), *index)).collect();
    let mut affected: BTreeSet<String> = BTreeSet::new();
    for index in &lost {
        for report in fleet.hosts[*index].vms.lock().expect("vms lock").iter() {
            affected.insert(report.name.to_string());
        }
    }
    let failed_at = Instant::now();
    for index in &lost {
        fleet.hosts[*index].powered_off.store(true, Ordering::Relaxed);
        fleet.hosts[*index].lost.store(true, Ordering::Relaxed);
    }

    let mut suspect_at: BTreeMap<String, u64> = BTreeMap::new();
    let mut suspect_seen_after: Option<Duration> = None;
    let mut planned_at: BTreeMap<String, u64> = BTreeMap::new();
    let mut start_items = BTreeSet::new();
    let mut pending = BTreeSet::new();
    let plan_deadline = Instant::now() + Duration::from_secs(args.plan_timeout_secs);
    while planned_at.len() < affected.len() && Instant::now() < plan_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        loop {
            let rows = events.events_after(after, 5000)?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            for row in &rows {
                let host = row.host.clone().unwrap_or_default();
                match (row.kind.as_str(), &row.vm) {
                    ("HostState", None) if lost_names.contains_key(&host) && row.line.contains("-> Suspect") => {
                        suspect_at.entry(host).or_insert(row.at_ms);
                        if suspect_at.len() == lost.len() && suspect_seen_after.is_none() {
                            suspect_seen_after = Some(failed_at.elapsed());
                        }
                    }
                    ("VmStartIntent", Some(vm)) if affected.contains(vm) => {
                        start_items.insert(vm.clone());
                        planned_at.entry(vm.clone()).or_insert(row.at_ms);
                    }
                    ("VmState", Some(vm)) if affected.contains(vm) && row.line.contains("VmState: PendingCapacity") => {
                        pending.insert(vm.clone());
                        planned_at.entry(vm.clone()).or_insert(row.at_ms);
                    }
                    _ => {}
                }
            }
        }
    }
    // Which lost host each VM belonged to: its name says.
    let vm_host = |vm: &str| vm.split('-').next().unwrap_or_default().to_owned();
    let first_suspect = suspect_at.values().min().copied();
    let last_planned = planned_at.values().max().copied();
    let mass_failure_plan_ms = match (first_suspect, last_planned) {
        (Some(first), Some(last)) if planned_at.len() == affected.len() => Some(last.saturating_sub(first)),
        _ => None,
    };
    let mut slowest_host_plan_ms = None;
    if planned_at.len() == affected.len() {
        for (vm, at) in &planned_at {
            if let Some(suspect) = suspect_at.get(&vm_host(vm)) {
                let took = at.saturating_sub(*suspect);
                slowest_host_plan_ms = Some(slowest_host_plan_ms.map_or(took, |slowest: u64| slowest.max(took)));
            }
        }
    }
    // Give the recovery worker a moment to hand the starts to the survivors: reported,
    // not part of the plan time.
    tokio::time::sleep(interval * 2).await;
    let peak_kb = read_status_kb(pid, "VmHWM:").unwrap_or(rss_kb);
    fleet.stop.store(true, Ordering::Relaxed);
    for serving in serving {
        serving.abort();
    }
    pingers.lock().expect("pingers lock").abort_all();
    drop(manager);
    drop(dir);

    let window = measure_s.max(f64::MIN_POSITIVE);
    Ok(ScaleResult {
        hosts: args.hosts,
        vms: args.hosts * args.vms_per_host,
        profile: profile.name().to_owned(),
        ping_interval_ms: interval.as_millis() as u64,
        manager_rss_mb: rss_kb as f64 / 1024.0,
        manager_peak_rss_mb: peak_kb as f64 / 1024.0,
        manager_cpu_cores: (cpu_after - cpu_before) / window,
        pings_per_s: (pings_after - pings_before) as f64 / window,
        expected_pings_per_s: args.hosts as f64 / interval.as_secs_f64(),
        pings_failed: failed_after - failed_before,
        lost_hosts: lost.len(),
        affected_vms: affected.len(),
        planned_vms: planned_at.len(),
        start_work_items: start_items.len(),
        pending_capacity: pending.len(),
        mass_failure_plan_ms,
        slowest_host_plan_ms,
        detection_ms: suspect_seen_after.map(|after| after.as_millis() as u64),
        starts_received: fleet.counters.starts.load(Ordering::Relaxed),
        setup_s,
        measure_s,
        load_average: [load_before, load_after],
    })
}
