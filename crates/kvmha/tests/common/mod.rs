//! Shared by the multi-process integration tests: `kvmha` processes (manager, agents) on
//! loopback, each cluster in its own temporary directory with its own ports. Every process
//! is killed when its guard drops, also when a test panics.
#![allow(dead_code)] // each test binary uses a different part

pub mod etcd;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const KVMHA: &str = env!("CARGO_BIN_EXE_kvmha");
/// Generous: the machine is shared and builds run next to the tests.
pub const WAIT_LIMIT: Duration = Duration::from_secs(60);
pub const POLL: Duration = Duration::from_millis(100);

/// Set on every process a test starts (and inherited by everything those start: the lab
/// VMs an agent spawns, a manager's helpers). Cleanup finds them by it in
/// `/proc/PID/environ` and kills each by its recorded pid, never by process group or name.
pub const MARKER_ENV: &str = "KVMHA_TEST_MARKER";

/// A process as recorded at a scan: its pid and start time (`/proc/PID/stat` field 22), so
/// that a pid reused by another process since is never signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub pid: i32,
    pub start_ticks: u64,
}

/// `(process group, start ticks)` of a live, non-zombie process.
pub fn proc_group_and_start(pid: i32) -> Option<(i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state), fields[2] field 5 (pgrp), fields[19] field 22 (starttime).
    if matches!(*fields.first()?, "Z" | "X") {
        return None;
    }
    Some((fields.get(2)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

impl Recorded {
    pub fn of(pid: i32) -> Option<Recorded> {
        proc_group_and_start(pid).map(|(_, start_ticks)| Recorded { pid, start_ticks })
    }

    pub fn is_alive(&self) -> bool {
        proc_group_and_start(self.pid).is_some_and(|(_, start)| start == self.start_ticks)
    }

    /// SIGKILLs this one process if it is still the one recorded.
    pub fn kill(&self) {
        if self.pid > 1 && self.pid != std::process::id() as i32 && self.is_alive() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Live processes (not this test process) whose environment carries `MARKER_ENV=marker`.
pub fn marked_processes(marker: &str) -> Vec<Recorded> {
    let needle = format!("{MARKER_ENV}={marker}\0");
    let own = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid == own {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        if !environ.windows(needle.len()).any(|window| window == needle.as_bytes()) {
            continue;
        }
        if let Some(recorded) = Recorded::of(pid) {
            found.push(recorded);
        }
    }
    found
}

/// Kills every process carrying `marker`, one recorded pid at a time, until none is
/// left (an agent still alive at one pass may start a VM before the next). Bounded.
/// Returns how many were killed.
pub fn reap_marked(marker: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut killed = 0;
    loop {
        let found = marked_processes(marker);
        if found.is_empty() || Instant::now() > deadline {
            return killed;
        }
        for process in &found {
            process.kill();
        }
        killed += found.len();
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh marker: unique on this machine for the life of a test.
pub fn new_marker(what: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{what}-{}-{next}-{nanos}", std::process::id())
}

/// SIGKILLs the process group a lab VM's pid file names, only if that group is the one
/// the lab driver made: the pid file's process is alive with the recorded start time, it
/// leads its own group, the group is not this test's own, and the process carries
/// `marker`. A stale pid file (the VM crashed, its pid since reused, on a busy machine
/// with pid_max 32768 within minutes) must never turn into a kill of somebody's group:
/// that is how a test once killed the interactive shell that ran it. True if killed.
pub fn kill_lab_vm_group(pid_file: &Path, marker: &str) -> bool {
    let text = std::fs::read_to_string(pid_file).unwrap_or_default();
    let mut fields = text.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(start_ticks))) =
        (fields.next().map(str::parse::<i32>), fields.next().map(str::parse::<u64>))
    else {
        return false;
    };
    let own_group = nix::unistd::getpgrp().as_raw();
    let Some((group, start)) = proc_group_and_start(pid) else { return false };
    if pid <= 1 || group != pid || group == own_group || start != start_ticks {
        return false;
    }
    if !marked_processes(marker).iter().any(|process| process.pid == pid) {
        return false;
    }
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(group), nix::sys::signal::Signal::SIGKILL).is_ok()
}

/// A child process that is killed (SIGKILL) and reaped when dropped. It runs in a process
/// group of its own, so nothing it or its children do to their group reaches the test.
/// With a private marker (`spawn`), whatever it started is reaped on drop too; a cluster's
/// processes share the cluster's marker and the cluster reaps them.
pub struct Guard {
    pub child: Option<Child>,
    pub log: PathBuf,
    /// Reaped on drop: set when the marker is this guard's alone.
    pub private_marker: Option<String>,
}

impl Guard {
    pub fn spawn(args: &[&str], log: PathBuf) -> Guard {
        let marker = new_marker("guard");
        let mut guard = Guard::spawn_marked(args, log, &marker);
        guard.private_marker = Some(marker);
        guard
    }

    /// Spawned with `MARKER_ENV=marker`; the owner of the marker reaps what it started.
    pub fn spawn_marked(args: &[&str], log: PathBuf, marker: &str) -> Guard {
        use std::os::unix::process::CommandExt;
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(KVMHA)
            .args(args)
            .env("KVMHA_LOG", "info")
            .env(MARKER_ENV, marker)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .process_group(0)
            .spawn()
            .expect("spawning kvmha");
        Guard { child: Some(child), log, private_marker: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal to this one process (never a group).
    pub fn signal(&self, name: &str) {
        let signal: nix::sys::signal::Signal = format!("SIG{name}").parse().expect("a signal name");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).expect("kill");
    }

    /// Waits for the process to exit; returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT_LIMIT;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "process did not exit; log:\n{}", self.log_text());
            std::thread::sleep(POLL);
        }
    }

    /// Kills this process only (a host's agent dying leaves its VMs running).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
        if let Some(marker) = &self.private_marker {
            reap_marked(marker);
        }
    }
}

/// A loopback address where connections hang as they do to a powered-off machine: a
/// listener with a backlog of one, whose queue is filled and never accepted from, so the
/// kernel drops further SYNs.
pub struct SilentAddress {
    pub address: std::net::SocketAddr,
    pub _listener: tokio::net::TcpListener,
    pub _fillers: Vec<std::net::TcpStream>,
    pub _runtime: tokio::runtime::Runtime,
}

impl SilentAddress {
    pub fn new() -> SilentAddress {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime");
        let listener = {
            let _context = runtime.enter();
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
            socket.listen(1).expect("listen")
        };
        let address = listener.local_addr().expect("address");
        let mut fillers = Vec::new();
        while let Ok(stream) = std::net::TcpStream::connect_timeout(&address, Duration::from_millis(300)) {
            fillers.push(stream);
            assert!(fillers.len() < 64, "the accept queue never filled up");
        }
        SilentAddress { address, _listener: listener, _fillers: fillers, _runtime: runtime }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

pub fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(KVMHA);
    command.args(args).env_remove("KVMHA_MANAGER").env_remove("KVMHA_TOKEN").env("RUST_BACKTRACE", "0");
    for (key, value) in envs {
        command.env(key, value);
    }
    command.output().expect("running kvmha")
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub manager: Option<Guard>,
    pub agents: BTreeMap<String, Guard>,
    pub manager_url: String,
    pub api_url: String,
    pub operator_token: String,
    pub readonly_token: String,
    pub join_token: String,
    pub manager_runs: u32,
    /// Carried by every process of this cluster (manager, agents, their VMs).
    pub marker: String,
}

impl Drop for Cluster {
    /// The manager goes first (it would restart VMs killed under it), then everything
    /// else carrying the cluster's marker, by pid; the directory goes last (field drop).
    fn drop(&mut self) {
        if let Some(manager) = self.manager.as_mut() {
            manager.kill();
        }
        for agent in self.agents.values_mut() {
            agent.kill();
        }
        reap_marked(&self.marker);
    }
}

impl Cluster {
    /// `manager init` with the fast profile; the manager is not started yet.
    pub fn init() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listen, api) = (free_port(), free_port());
        let manager_dir = dir.path().join("manager");
        let output = run(
            &[
                "manager",
                "init",
                "--dir",
                manager_dir.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{listen}"),
                "--api-listen",
                &format!("127.0.0.1:{api}"),
                "--profile",
                "fast",
            ],
            &[],
        );
        assert!(output.status.success(), "init failed: {}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8(output.stdout).expect("utf-8");
        let join_token = stdout.lines().last().expect("a last line").trim().to_owned();
        assert!(join_token.starts_with("kvmha1."), "last line is not a join token: {stdout}");
        let read = |name: &str| std::fs::read_to_string(manager_dir.join(name)).expect(name).trim().to_owned();
        Cluster {
            manager: None,
            agents: BTreeMap::new(),
            manager_url: format!("https://127.0.0.1:{listen}"),
            api_url: format!("http://127.0.0.1:{api}"),
            operator_token: read("operator.token"),
            readonly_token: read("readonly.token"),
            join_token,
            manager_runs: 0,
            marker: new_marker("cluster"),
            dir,
        }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("manager/manager.toml")
    }

    pub fn start_manager(&mut self) {
        self.manager_runs += 1;
        let log = self.dir.path().join(format!("manager-{}.log", self.manager_runs));
        let config = self.config();
        self.manager =
            Some(Guard::spawn_marked(&["manager", "run", "--config", config.to_str().unwrap()], log, &self.marker));
        self.wait("the operator API answers", |cluster| cluster.try_api(&["host", "list", "--json"]).is_some());
    }

    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.join_with(name, &[])
    }

    pub fn join_with(&self, name: &str, extra: &[&str]) -> PathBuf {
        let dir = self.agent_dir(name);
        let listen = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "agent",
            "join",
            "--manager",
            &self.manager_url,
            "--token",
            &self.join_token,
            "--name",
            name,
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        let output = run(&args, &[]);
        assert!(output.status.success(), "join of {name} failed: {}", String::from_utf8_lossy(&output.stderr));
        dir.join("agent.toml")
    }

    pub fn start_agent(&mut self, name: &str) {
        let config = self.agent_dir(name).join("agent.toml");
        let log = self.dir.path().join(format!("{name}.log"));
        let agent = Guard::spawn_marked(&["agent", "run", "--config", config.to_str().unwrap()], log, &self.marker);
        self.agents.insert(name.to_owned(), agent);
    }

    pub fn api_output(&self, args: &[&str], token: &str) -> Output {
        run(args, &[("KVMHA_MANAGER", &self.api_url), ("KVMHA_TOKEN", token)])
    }

    pub fn try_api(&self, args: &[&str]) -> Option<Value> {
        let output = self.api_output(args, &self.operator_token);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    pub fn states(&self) -> BTreeMap<String, String> {
        let Some(Value::Array(hosts)) = self.try_api(&["host", "list", "--json"]) else {
            return BTreeMap::new();
        };
        hosts
            .iter()
            .map(|host| {
                (host["name"].as_str().unwrap_or("").to_owned(), host["state"].as_str().unwrap_or("").to_owned())
            })
            .collect()
    }

    /// Every audit line so far, as `kvmha events --json` prints them.
    pub fn events(&self) -> Vec<Value> {
        let output = self.api_output(&["events", "--json"], &self.operator_token);
        assert!(output.status.success(), "events failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("json line"))
            .collect()
    }

    pub fn has_event(&self, needle: &str) -> bool {
        self.events().iter().any(|event| event["line"].as_str().unwrap_or("").contains(needle))
    }

    pub fn wait(&self, what: &str, condition: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + WAIT_LIMIT;
        while !condition(self) {
            if Instant::now() > deadline {
                let log = self.manager.as_ref().map(Guard::log_text).unwrap_or_default();
                panic!("timed out waiting for {what}; states {:?}\nmanager log:\n{log}", self.states());
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn wait_state(&self, host: &str, accepted: &[&str]) {
        self.wait(&format!("{host} in {accepted:?}"), |cluster| {
            cluster.states().get(host).is_some_and(|state| accepted.contains(&state.as_str()))
        });
    }

    /// A manager and three agents, all `Up`.
    pub fn three_up() -> Cluster {
        let mut cluster = Cluster::init();
        cluster.start_manager();
        for name in ["host1", "host2", "host3"] {
            cluster.join(name);
            cluster.start_agent(name);
        }
        for name in ["host1", "host2", "host3"] {
            cluster.wait_state(name, &["Up"]);
        }
        cluster
    }
}

pub fn add_manager_pools(cluster: &Cluster, host: &str) {
    let pools = cluster.dir.path().join("pools");
    for pool in ["a", "b"] {
        std::fs::create_dir_all(pools.join(pool)).expect("pool dir");
    }
    let mut text = std::fs::read_to_string(cluster.config()).expect("config");
    text.push_str(&format!(
        "\n[pools.a]\npath = \"{0}/a\"\n\n[pools.b]\npath = \"{0}/b\"\n\n[hosts.{host}]\npools = [\"a\", \"b\"]\nwatchdog = true\n",
        pools.display()
    ));
    std::fs::write(cluster.config(), text).expect("write");
}

/// Adds pools `a` and `b` to `host`'s agent config, with an armed watchdog whose device
/// is a plain file (returned).
pub fn add_agent_pools(cluster: &Cluster, host: &str) -> PathBuf {
    let pools = cluster.dir.path().join("pools");
    let watchdog = cluster.agent_dir(host).join("watchdog");
    let agent_toml = cluster.agent_dir(host).join("agent.toml");
    let mut text = std::fs::read_to_string(&agent_toml).unwrap_or_default();
    text.push_str(&format!(
        "\n[[pools]]\nname = \"a\"\npath = \"{0}/a\"\n\n[[pools]]\nname = \"b\"\npath = \"{0}/b\"\n\n[watchdog]\ndevice = \"{1}\"\narmed = true\n",
        pools.display(),
        watchdog.display()
    ));
    std::fs::write(&agent_toml, text).expect("write");
    watchdog
}

/// The manager's heartbeat investigator, run in the test against the manager's config.
pub struct Investigator {
    pub runtime: tokio::runtime::Runtime,
    pub reader: kvmha_manager::heartbeat::HeartbeatReader,
}

impl Investigator {
    pub fn new(config: &Path) -> Investigator {
        let config = kvmha_manager::config::ManagerConfig::load(config).expect("manager config");
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let reader = {
            let _context = runtime.enter();
            kvmha_manager::heartbeat::HeartbeatReader::start(&config).expect("reader")
        };
        Investigator { runtime, reader }
    }

    pub fn look(&self, host: &str, evidence_after: Instant) -> Vec<kvmha_core::event::RecordState> {
        let host = kvmha_core::HostName::from(host);
        let (_, _, observation) =
            self.runtime.block_on(self.reader.investigate(&host, evidence_after)).expect("host has pools");
        observation.pools.into_iter().map(|pool| pool.record).collect()
    }

    pub fn wait(
        &self,
        what: &str,
        host: &str,
        evidence_after: Instant,
        ok: impl Fn(&[kvmha_core::event::RecordState]) -> bool,
    ) {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let states = self.look(host, evidence_after);
            if ok(&states) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {states:?}");
            std::thread::sleep(POLL);
        }
    }
}

pub fn unchanged(state: &kvmha_core::event::RecordState, armed: bool, clean: bool, at_least: Duration) -> bool {
    matches!(state, kvmha_core::event::RecordState::Unchanged { watchdog_armed, stopped_cleanly, unchanged_for, .. }
        if *watchdog_armed == armed && *stopped_cleanly == clean && *unchanged_for >= at_least)
}

pub fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Makes a pool unwritable for everyone, root included: its directory becomes a file.
pub fn break_pool(cluster: &Cluster, pool: &str) {
    let path = cluster.dir.path().join("pools").join(pool);
    std::fs::rename(&path, path.with_extension("gone")).expect("rename");
    std::fs::write(&path, "not a directory").expect("write");
}

pub fn host_storage(cluster: &Cluster, host: &str) -> String {
    let Some(Value::Array(hosts)) = cluster.try_api(&["host", "list", "--json"]) else {
        return String::new();
    };
    hosts.iter().find(|row| row["name"] == host).map(|row| row["storage"].to_string()).unwrap_or_default()
}

// ----- VMs on agents: the lab process driver, commands as the manager sends them -----

/// The lab VM program (`kvmha-lab-vm`, a bin of kvmha-hypervisor): built once if this
/// test run has not built it (a run of one package's tests builds only its own bins).
pub fn lab_vm_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let next_to_kvmha = Path::new(KVMHA).with_file_name("kvmha-lab-vm");
            if next_to_kvmha.is_file() {
                return next_to_kvmha;
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let status = Command::new(cargo)
                .current_dir(&workspace)
                .args(["build", "-p", "kvmha-hypervisor", "--bin", "kvmha-lab-vm"])
                .status()
                .expect("cargo build kvmha-lab-vm");
            assert!(status.success(), "building kvmha-lab-vm failed");
            let built = workspace.join("target/debug/kvmha-lab-vm");
            assert!(built.is_file(), "{} missing after the build", built.display());
            built
        })
        .clone()
}

/// Shared storage of the lab VMs: their disks are `<this>/vms/<vm>/disk.log`.
pub fn lab_storage(cluster: &Cluster) -> PathBuf {
    cluster.dir.path().join("lab-storage")
}

/// Joins `name` with the lab process driver as its hypervisor (local state in its
/// agent directory, disks on the cluster's lab storage).
pub fn join_lab_agent(cluster: &Cluster, name: &str) -> PathBuf {
    let storage = lab_storage(cluster);
    std::fs::create_dir_all(&storage).expect("lab storage");
    let uri = format!(
        "lab:{}?state={}&host={name}&vm_binary={}",
        storage.display(),
        cluster.agent_dir(name).join("lab").display(),
        lab_vm_binary().display()
    );
    cluster.join_with(name, &["--hypervisor", &uri])
}

/// A minimal lab VM definition.
pub fn lab_vm_xml(vm: &str) -> String {
    format!("<domain type='lab'>\n  <name>{vm}</name>\n  <memory unit='MiB'>64</memory>\n  <vcpu>1</vcpu>\n</domain>\n")
}

/// Sends commands to agents with the manager's own certificate, as the manager does.
pub struct Commander {
    pub runtime: tokio::runtime::Runtime,
    pub client: reqwest::Client,
    next: std::sync::atomic::AtomicU64,
}

impl Commander {
    pub fn new(cluster: &Cluster) -> Commander {
        let config = kvmha_manager::config::ManagerConfig::load(&cluster.config()).expect("manager config");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let client = kvmha_proto::transport::client(
            &config.ca_cert_pem,
            Some((&config.cert_pem, &config.key_pem)),
            Duration::from_secs(120),
        )
        .expect("client");
        Commander { runtime, client, next: std::sync::atomic::AtomicU64::new(1) }
    }

    pub fn send(
        &self,
        cluster: &Cluster,
        host: &str,
        command: kvmha_proto::AgentCommand,
        timeout: Duration,
    ) -> kvmha_proto::CommandResult {
        let config = std::fs::read_to_string(cluster.agent_dir(host).join("agent.toml")).expect("agent.toml");
        let listen = config
            .lines()
            .find_map(|line| line.strip_prefix("listen = \""))
            .and_then(|rest| rest.strip_suffix('"'))
            .expect("listen in agent.toml")
            .to_owned();
        let request = kvmha_proto::CommandRequest {
            version: kvmha_proto::PROTOCOL_VERSION,
            request_id: self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            timeout_ms: timeout.as_millis() as u64,
            command,
        };
        self.runtime.block_on(async {
            // An agent just (re)started may not listen yet.
            let give_up = Instant::now() + WAIT_LIMIT;
            let response = loop {
                let sent = self
                    .client
                    .post(format!("https://{listen}{}", kvmha_proto::path::COMMAND))
                    .timeout(timeout + Duration::from_secs(5))
                    .json(&request)
                    .send()
                    .await;
                match sent {
                    Ok(response) => break response,
                    Err(error) if !error.is_timeout() && Instant::now() < give_up => tokio::time::sleep(POLL).await,
                    Err(error) => panic!("{host} does not answer: {error}"),
                }
            };
            assert!(response.status().is_success(), "http {}", response.status());
            let answer: kvmha_proto::CommandResponse = response.json().await.expect("a command response");
            answer.result
        })
    }

    pub fn start_vm(
        &self,
        cluster: &Cluster,
        host: &str,
        vm: &str,
        work: u64,
        lease: kvmha_proto::LeaseGrant,
    ) -> kvmha_proto::CommandResult {
        let command = kvmha_proto::AgentCommand::StartVm { vm: vm.into(), work, xml: Some(lab_vm_xml(vm)), lease };
        self.send(cluster, host, command, Duration::from_secs(60))
    }

    pub fn vms(&self, cluster: &Cluster, host: &str) -> Vec<kvmha_proto::VmInventory> {
        match self.send(cluster, host, kvmha_proto::AgentCommand::ListVms, Duration::from_secs(10)) {
            kvmha_proto::CommandResult::Vms { vms } => vms,
            other => panic!("ListVms answered {other:?}"),
        }
    }
}

/// One line of a lab VM's disk log: `(unix_ms, host, boot_id)`.
pub fn disk_lines(cluster: &Cluster, vm: &str) -> Vec<(u64, String, String)> {
    let path = lab_storage(cluster).join("vms").join(vm).join("disk.log");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.len() == 5).then(|| (fields[0].parse().ok(), fields[1].to_owned(), fields[3].to_owned()))
        })
        .filter_map(|(ms, host, boot)| Some((ms?, host, boot)))
        .collect()
}

/// The distinct `(host, boot_id)` writers of a VM's disk, in order of first appearance.
pub fn disk_writers(cluster: &Cluster, vm: &str) -> Vec<(String, String)> {
    let mut writers: Vec<(String, String)> = Vec::new();
    for (_, host, boot) in disk_lines(cluster, vm) {
        if !writers.iter().any(|(h, b)| *h == host && *b == boot) {
            writers.push((host, boot));
        }
    }
    writers
}

/// A lab VM's disk log grows: waits until it has more lines than now.
pub fn wait_disk_grows(cluster: &Cluster, vm: &str) {
    let before = disk_lines(cluster, vm).len();
    cluster.wait(&format!("{vm}'s disk log grows"), |cluster| disk_lines(cluster, vm).len() > before + 2);
}

/// Kills every process of the cluster (manager first, then agents and every lab VM they
/// started, found by the cluster's marker and killed by pid) when dropped, also when a
/// test panics. Kept for the tests that declare it; `Cluster`'s own drop does the same.
pub struct LabVmsGuard {
    pub marker: String,
}

impl LabVmsGuard {
    pub fn new(cluster: &Cluster) -> LabVmsGuard {
        LabVmsGuard { marker: cluster.marker.clone() }
    }
}

impl Drop for LabVmsGuard {
    fn drop(&mut self) {
        reap_marked(&self.marker);
    }
}

impl Cluster {
    /// Gives `host` an IPMI BMC (the simulator `bmc`) in manager.toml, its password in a
    /// 0600 file as the manager demands. Call before the manager starts.
    pub fn add_ipmi_bmc(&self, host: &str, bmc: &kvmha_bmc::sim::IpmiSim) {
        let file_name = format!("bmc-{host}.pass");
        let password_file = self.dir.path().join("manager").join(&file_name);
        std::fs::write(&password_file, kvmha_bmc::sim::ADMIN_PASSWORD).expect("write");
        std::fs::set_permissions(&password_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        let mut text = std::fs::read_to_string(self.config()).expect("config");
        text.push_str(&format!(
            "\n[hosts.{host}.bmc]\nkind = \"ipmi\"\naddress = \"{}\"\nusername = \"{}\"\npassword_file = \"{file_name}\"\n",
            bmc.address(),
            kvmha_bmc::sim::ADMIN_USER
        ));
        std::fs::write(self.config(), text).expect("write");
    }
}

/// name -> (state, host) as the manager the cluster points at sees them.
pub fn vms(cluster: &Cluster) -> BTreeMap<String, (String, String)> {
    let Some(Value::Array(vms)) = cluster.try_api(&["vm", "list", "--json"]) else {
        return BTreeMap::new();
    };
    vms.iter()
        .map(|vm| {
            let field = |key: &str| vm[key].as_str().unwrap_or("-").to_owned();
            (field("name"), (field("state"), field("host")))
        })
        .collect()
}

pub fn wait_vm(cluster: &Cluster, vm: &str, ok: impl Fn(&str, &str) -> bool) {
    cluster.wait(&format!("vm {vm}"), |cluster| {
        vms(cluster).get(vm).is_some_and(|(state, host)| ok(state.as_str(), host.as_str()))
    });
}
