//! A running lab: namespaces, bridges, BMC simulators, shared storage, faults.
//!
//! State directory of one lab, `<base>/<lab id>/` (base: `/run/kvmha-lab` unless
//! configured):
//!
//! ```text
//! owner                      "pid start_ticks" of the process that owns the lab
//! lab.json                   id, host count, BMC password: what LabHandle::open reads
//! faults/<namespace>.json    the drop rules of one namespace (partition, loss, bmc-fail)
//! events.log                 "<unix_ms> <event>" lines: power, faults, watchdog resets
//! chassis.sh                 the BMCs' chassis-control script (see scripts.rs)
//! ssh/                       per-lab host and client keys, sshd and ssh configs
//! storage/                   the directory the storage server exports (vms/<vm>/disk.log)
//! hosts/hostN/init           "pid start_ticks" of the host's PID-namespace init; absent = off
//! hosts/hostN/boot.sh        run inside the host after each power-on (agent, VMs, ...)
//! hosts/hostN/mnt/           mount point of the shared storage, inside the host only
//!                            (over a read-only tmpfs, so no storage means EROFS)
//! hosts/hostN/power-request  "on", left by the chassis script for the controller
//! hosts/hostN/watchdog       the host's watchdog file (see watchdog.rs)
//! hosts/hostN/console.log    output of the host's init and boot.sh
//! bmc/hostN/                 ipmi_sim's lan.conf, emu.cmds, state dir and log (Redfish:
//!                             redfish_bmc.py, sushy.conf, htpasswd, state dir, sushy-emulator.log)
//! ```
//!
//! Every long-lived process (host inits, ipmi_sim, sshd, boot scripts) is a child of
//! the owning process and is reaped by the controller thread: PID 1 of this machine
//! reaps nobody quickly, so an orphan would linger as a zombie. The owner runs two
//! threads: the controller (power requests from the BMCs, watchdogs, reaping, every
//! 50 ms) and the mounter (storage mounts of hosts that booted without storage).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::process::{
    self, kill_namespace_processes, named_netns_identity, namespace_of, proc_stat, processes_in_namespace, run,
    run_args, wait_until, ProcessId,
};
use crate::scripts::{self, INIT_FILE, POWER_LOCK_FILE, POWER_REQUEST_FILE};
use crate::topology::{host_index, host_name, LabId, Network, Node, HOSTS_MAX, IPMI_PORT, PREFIX_LEN, REDFISH_PORT};
use crate::watchdog::{Watchdog, WatchdogAction};

/// Where labs keep their state unless told otherwise.
pub const DEFAULT_BASE_DIR: &str = "/run/kvmha-lab";
/// The BMC user every lab BMC accepts (the password is random per lab).
pub const BMC_USER: &str = "admin";
/// How long one external command (ip, nft, ssh-keygen, sshfs) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
/// The controller's polling period: power requests, watchdogs, reaping.
const CONTROLLER_TICK: Duration = Duration::from_millis(50);

/// What to build.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Number of hosts, named host1..hostN.
    pub hosts: usize,
    pub base_dir: PathBuf,
    /// Silence after which an armed lab watchdog resets its host.
    pub watchdog_timeout: Duration,
    /// Copy the state directory (logs, events, shared storage with every
    /// `vms/<vm>/disk.log`) here at teardown, once everything is down
    /// (`kvmha lab run --keep DIR`). The state directory itself always goes: a
    /// directory left behind would read as a crashed lab.
    pub keep_in: Option<PathBuf>,
    /// Run (by bash) inside every host after each power-on, once its storage is
    /// mounted; it gets KVMHA_LAB_HOST, KVMHA_LAB_STORAGE_DIR, KVMHA_LAB_WATCHDOG,
    /// KVMHA_LAB_MGMT_ADDRESS, KVMHA_LAB_MANAGER_ADDRESS, ... in its environment.
    /// This is where the agent starts. Per host: [`LabHandle::set_boot_script`].
    pub boot_script: String,
    /// Hosts whose BMC is a Redfish emulator (sushy-emulator) instead of ipmi_sim
    /// (`bmc = "redfish"`); both act on their host alike.
    pub redfish_hosts: BTreeSet<String>,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            hosts: 3,
            base_dir: PathBuf::from(DEFAULT_BASE_DIR),
            watchdog_timeout: Duration::from_secs(10),
            keep_in: None,
            boot_script: String::new(),
            redfish_hosts: BTreeSet::new(),
        }
    }
}

/// Whether a boot fails when the shared storage cannot be mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageAtBoot {
    /// The lab's first boot: storage that never worked is a broken lab.
    Required,
    /// Later boots: a host with a cut storage link still boots, as a real one would.
    BestEffort,
}

/// Power state as the BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    On,
    Off,
}

/// Which of a host's networks a partition or loss applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetSelector {
    One(Network),
    All,
}

impl NetSelector {
    pub fn parse(text: &str) -> Option<NetSelector> {
        if text == "all" {
            return Some(NetSelector::All);
        }
        Network::parse(text).map(NetSelector::One)
    }

    fn networks(self) -> Vec<Network> {
        match self {
            NetSelector::One(network) => vec![network],
            NetSelector::All => Network::ALL.to_vec(),
        }
    }
}

/// How to reach one host's BMC from the manager namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcEndpoint {
    pub protocol: BmcProtocol,
    pub address: Ipv4Addr,
    pub port: u16,
    pub user: String,
    pub password: String,
}

/// What a lab BMC speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BmcProtocol {
    /// IPMI 2.0 over LAN (ipmi_sim), UDP 623.
    Ipmi,
    /// Redfish over plain HTTP (sushy-emulator), one system named after the host.
    Redfish,
}

impl BmcEndpoint {
    /// The Redfish service root's base, `http://ADDRESS:PORT` (Redfish BMCs only).
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.address, self.port)
    }
}

/// Packet drops configured in one namespace, rendered as one nftables table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct NamespaceFaults {
    /// Interface → percentage of packets dropped (100 = partition).
    drop_percent: BTreeMap<Network, u8>,
    /// The BMC is "dead": all its traffic is dropped, independently of partitions.
    bmc_failed: bool,
    /// The host hangs: a frozen machine's kernel answers nobody either (its
    /// processes are stopped, but a namespace's TCP stack would still accept).
    #[serde(default)]
    frozen: bool,
}

impl NamespaceFaults {
    fn ruleset(&self) -> String {
        let mut input = String::new();
        let mut output = String::new();
        let mut add = |interface: &str, verdict: String| {
            input.push_str(&format!("    iifname \"{interface}\" {verdict}\n"));
            output.push_str(&format!("    oifname \"{interface}\" {verdict}\n"));
        };
        if self.bmc_failed {
            add(Network::Oob.name(), "drop".to_string());
        }
        if self.frozen {
            add(Network::Mgmt.name(), "drop".to_string());
            add(Network::Storage.name(), "drop".to_string());
        }
        for (network, percent) in &self.drop_percent {
            let verdict = if *percent >= 100 {
                "drop".to_string()
            } else {
                // Decided per packet, independently in each direction.
                format!("numgen random mod 100 < {percent} drop")
            };
            add(network.name(), verdict);
        }
        // "add + delete" first makes the replacement atomic whether or not the table exists.
        let mut text = String::from("add table inet kvmha_lab\ndelete table inet kvmha_lab\n");
        if !input.is_empty() {
            text.push_str(&format!(
                "table inet kvmha_lab {{\n  chain input {{\n    type filter hook input priority filter; policy accept;\n{input}  }}\n  chain output {{\n    type filter hook output priority filter; policy accept;\n{output}  }}\n}}\n"
            ));
        }
        text
    }
}

/// State shared between the lab's owner and its controller thread.
#[derive(Debug)]
struct Shared {
    handle: LabHandle,
    stop: AtomicBool,
    /// Every child process we must reap: host inits, boot scripts.
    children: Mutex<Vec<Child>>,
    /// Long-lived daemons by name ("sshd", "bmc1", ...).
    daemons: Mutex<HashMap<String, Child>>,
    watchdogs: Mutex<Vec<Watchdog>>,
    /// Per host, the init whose boot finished (its first mount attempt done): the
    /// mounter only retries mounts of finished boots, never races a boot's own.
    booted: Mutex<Vec<Option<ProcessId>>>,
    /// Per host, whether its links were brought up by a boot and not yet taken
    /// down: the controller takes them down when a BMC cut the power.
    links_up: Mutex<Vec<bool>>,
}

impl std::ops::Deref for Shared {
    type Target = LabHandle;

    fn deref(&self) -> &LabHandle {
        &self.handle
    }
}

/// What any process needs to drive a running lab, kept in `<dir>/lab.json`: the
/// owner holds one, and `kvmha lab fault` opens one from another process. Every
/// operation here works across processes: state lives in files (init pids, fault
/// tables) guarded by flock, and power-on goes through the owner's controller.
#[derive(Debug, Clone)]
pub struct LabHandle {
    id: LabId,
    dir: PathBuf,
    hosts: usize,
    bmc_password: String,
    /// Indexes of the hosts with a Redfish BMC.
    redfish: BTreeSet<usize>,
}

/// A running lab; dropping it tears everything down.
#[derive(Debug)]
pub struct Lab {
    shared: Arc<Shared>,
    /// The controller and the storage mounter.
    threads: Vec<JoinHandle<()>>,
    keep_in: Option<PathBuf>,
    torn_down: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not stop teardown: take the data even if poisoned.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|error| LabError::io(path, error))
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|error| LabError::io(path, error))
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|error| LabError::io(path, error))
}

pub(crate) fn random_hex(bytes: usize) -> Result<String> {
    let mut buffer = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut buffer))
        .map_err(|error| LabError::io("/dev/urandom", error))?;
    Ok(buffer.iter().map(|byte| format!("{byte:02x}")).collect())
}

fn ip(args: &[&str]) -> Result<String> {
    run_args("ip", args, COMMAND_TIMEOUT)
}

/// Runs `ip -n NAMESPACE -batch -` with one command per line: one process per namespace.
fn ip_batch(namespace: &str, commands: &[String]) -> Result<()> {
    let text = commands.join("\n") + "\n";
    run(Command::new("ip").args(["-n", namespace, "-batch", "-"]), Some(&text), COMMAND_TIMEOUT).map(|_| ())
}

/// Names of every network namespace on the machine.
pub fn list_netns() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    entries.filter_map(|entry| entry.ok()?.file_name().into_string().ok()).collect()
}

impl Lab {
    /// Builds a lab: namespaces, bridges, storage server, BMCs, and boots every host.
    /// On failure everything already created is torn down before the error returns.
    pub fn build(config: LabConfig) -> Result<Lab> {
        let started = std::time::Instant::now();
        let uid = nix::unistd::geteuid().as_raw();
        if uid != 0 {
            return Err(LabError::NotRoot { uid });
        }
        if config.hosts == 0 || config.hosts > HOSTS_MAX {
            return Err(LabError::Config(format!("hosts must be 1..={HOSTS_MAX}, got {}", config.hosts)));
        }
        create_dir(&config.base_dir)?;
        // Someone else's leftovers must not stop our lab: report and go on.
        if let Err(error) = clean_stale_labs(&config.base_dir) {
            eprintln!("kvmha-lab: cleaning stale labs: {error}");
        }
        let id = LabId::random()?;
        let dir = config.base_dir.join(id.as_str());
        create_dir(&dir)?;
        let me = ProcessId::of(std::process::id() as i32)
            .ok_or_else(|| LabError::Config("cannot read own /proc/self/stat".to_string()))?;
        write_file(&dir.join("owner"), &me.to_line())?;
        let watchdog_timeout_ms = config.watchdog_timeout.as_millis().max(1) as u64;
        let mut redfish = BTreeSet::new();
        for host in &config.redfish_hosts {
            match host_index(host).filter(|index| *index <= config.hosts) {
                Some(index) => redfish.insert(index),
                None => return Err(LabError::UnknownHost(host.clone())),
            };
        }
        let handle = LabHandle { id, dir, hosts: config.hosts, bmc_password: random_hex(6)?, redfish };
        handle.save()?;
        let shared = Arc::new(Shared {
            handle,
            stop: AtomicBool::new(false),
            children: Mutex::new(Vec::new()),
            daemons: Mutex::new(HashMap::new()),
            watchdogs: Mutex::new(vec![Watchdog::new(watchdog_timeout_ms); config.hosts]),
            booted: Mutex::new(vec![None; config.hosts]),
            links_up: Mutex::new(vec![false; config.hosts]),
        });
        // From here on, Drop cleans up whatever the build got to.
        let mut lab = Lab { shared, threads: Vec::new(), keep_in: config.keep_in.clone(), torn_down: false };
        let hosts = lab.shared.hosts;
        progress(&format!("lab {}: networks (management, storage, out-of-band bridges)", lab.shared.id));
        lab.shared.build_networks()?;
        progress("shared storage (sshd in the storage namespace)");
        lab.shared.start_storage()?;
        for index in 1..=hosts {
            progress(&format!("host{index} ({index}/{hosts}): namespaces and BMC simulator"));
            lab.shared.prepare_host(index, &config.boot_script)?;
            lab.shared.start_bmc(index)?;
        }
        for index in 1..=hosts {
            progress(&format!("host{index} ({index}/{hosts}): booting (storage mount, boot script)"));
            lab.shared.boot_at(index, StorageAtBoot::Required)?;
        }
        for index in 1..=hosts {
            lab.shared.wait_bmc_ready(index)?;
            progress(&format!("BMCs answering: {index}/{hosts}"));
        }
        progress(&format!("plumbing up in {:.1}s", started.elapsed().as_secs_f64()));
        let shared = Arc::clone(&lab.shared);
        lab.threads.push(
            thread::Builder::new()
                .name(format!("lab-{}", lab.shared.id))
                .spawn(move || shared.controller_loop())
                .map_err(|error| LabError::io("controller thread", error))?,
        );
        let shared = Arc::clone(&lab.shared);
        lab.threads.push(
            thread::Builder::new()
                .name(format!("mounter-{}", lab.shared.id))
                .spawn(move || shared.mounter_loop())
                .map_err(|error| LabError::io("mounter thread", error))?,
        );
        lab.shared.event("lab-up");
        Ok(lab)
    }

    pub fn power_on(&self, host: &str) -> Result<()> {
        let index = self.shared.index(host)?;
        self.shared.event(&format!("power-on {host}"));
        self.shared.boot_at(index, StorageAtBoot::BestEffort)
    }

    pub fn reset(&self, host: &str) -> Result<()> {
        let index = self.shared.index(host)?;
        self.shared.event(&format!("reset {host}"));
        self.shared.power_off_at(index)?;
        self.shared.boot_at(index, StorageAtBoot::BestEffort)
    }

    /// Is the BMC process (ipmi_sim or sushy-emulator) of `host` still running? (LAB-FACTS: one died silently once.)
    pub fn bmc_alive(&self, host: &str) -> Result<bool> {
        let index = self.shared.index(host)?;
        let mut daemons = lock(&self.shared.daemons);
        Ok(match daemons.get_mut(&format!("bmc{index}")) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        })
    }

    /// Restarts every BMC simulator that died (LAB-FACTS: one ipmi_sim once died
    /// silently under heavy probing), with a fresh state directory; check before each
    /// scenario. Returns the hosts whose BMC was restarted.
    pub fn ensure_bmcs_alive(&self) -> Result<Vec<String>> {
        let mut restarted = Vec::new();
        for host in self.host_names() {
            if self.bmc_alive(&host)? {
                continue;
            }
            let index = self.shared.index(&host)?;
            if let Some(mut dead) = lock(&self.shared.daemons).remove(&format!("bmc{index}")) {
                let _ = dead.wait();
            }
            self.shared.event(&format!("bmc-restart {host}"));
            self.shared.start_bmc(index)?;
            restarted.push(host);
        }
        Ok(restarted)
    }

    /// Runs the host's `boot.sh` now, as at a power-on (for a boot script written
    /// after the lab was built).
    pub fn run_boot_script(&self, host: &str) -> Result<()> {
        let index = self.shared.index(host)?;
        self.shared.spawn_boot_script(index)
    }

    /// Runs `bash SCRIPT ARGS...` inside `host` in the background (dies with the
    /// host; reaped by the lab), its output in the host's console log.
    pub fn spawn_in_host(&self, host: &str, script: &Path, args: &[&str]) -> Result<()> {
        let index = self.shared.index(host)?;
        let mut all = vec![script.display().to_string()];
        all.extend(args.iter().map(|arg| arg.to_string()));
        self.shared.spawn_in_host_at(index, &script.display().to_string(), &all)
    }

    /// Hands a process started outside the lab's helpers (the manager) to the
    /// controller, which reaps it once it exits.
    pub fn adopt(&self, child: Child) {
        lock(&self.shared.children).push(child);
    }

    /// Tears the lab down now and reports errors (Drop does the same, silently).
    pub fn teardown(mut self) -> Result<()> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.shared.event("lab-down");
        self.shared.teardown(self.keep_in.as_deref())
    }
}

/// The owner drives its lab through the same handle any other process would.
impl std::ops::Deref for Lab {
    type Target = LabHandle;

    fn deref(&self) -> &LabHandle {
        &self.shared.handle
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(error) = self.teardown_inner() {
            eprintln!("kvmha-lab: teardown of {}: {error}", self.shared.id);
        }
    }
}

/// The on-disk form of a [`LabHandle`] (`lab.json`).
#[derive(Debug, Serialize, Deserialize)]
struct LabMeta {
    id: String,
    hosts: usize,
    bmc_password: String,
    #[serde(default)]
    redfish: BTreeSet<usize>,
}

impl LabHandle {
    /// Opens the lab whose state directory is `dir`.
    pub fn open(dir: &Path) -> Result<LabHandle> {
        let path = dir.join("lab.json");
        let text = std::fs::read_to_string(&path).map_err(|error| LabError::io(&path, error))?;
        let meta: LabMeta =
            serde_json::from_str(&text).map_err(|error| LabError::Config(format!("{}: {error}", path.display())))?;
        let id = LabId::parse(&meta.id)
            .ok_or_else(|| LabError::Config(format!("{}: bad lab id {:?}", path.display(), meta.id)))?;
        Ok(LabHandle {
            id,
            dir: dir.to_path_buf(),
            hosts: meta.hosts,
            bmc_password: meta.bmc_password,
            redfish: meta.redfish,
        })
    }

    fn save(&self) -> Result<()> {
        let meta = LabMeta {
            id: self.id.to_string(),
            hosts: self.hosts,
            bmc_password: self.bmc_password.clone(),
            redfish: self.redfish.clone(),
        };
        let text = serde_json::to_string_pretty(&meta).expect("strings and numbers serialise");
        write_file(&self.dir.join("lab.json"), &text)
    }

    /// Is the process that owns this lab (and reaps its processes) still running?
    pub fn owner_alive(&self) -> bool {
        ProcessId::read(&self.dir.join("owner")).is_some_and(|owner| owner.is_alive())
    }

    /// Powers the host on through its owner's controller (the same path as an IPMI
    /// power-on) and waits until it runs; the owner must be alive.
    pub fn request_power_on(&self, host: &str) -> Result<()> {
        let index = self.index(host)?;
        if self.init(index).is_some() {
            return Ok(());
        }
        let dir = self.host_dir(index);
        let temporary = dir.join(format!("{POWER_REQUEST_FILE}.tmp"));
        write_file(&temporary, "on\n")?;
        std::fs::rename(&temporary, dir.join(POWER_REQUEST_FILE))
            .map_err(|error| LabError::io(dir.join(POWER_REQUEST_FILE), error))?;
        wait_for(&format!("{host} to power on"), Duration::from_secs(20), || self.init(index).is_some())
    }

    pub fn id(&self) -> &LabId {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn host_names(&self) -> Vec<String> {
        (1..=self.hosts).map(host_name).collect()
    }

    /// The exported directory as seen from the root namespace (`vms/<vm>/disk.log`).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.join("storage")
    }

    /// Where the shared storage is mounted inside `host` (and only there).
    pub fn host_mount_dir(&self, host: &str) -> Result<PathBuf> {
        Ok(self.host_dir(self.index(host)?).join("mnt"))
    }

    /// The file the host's agent writes to as if it were /dev/watchdog.
    pub fn watchdog_path(&self, host: &str) -> Result<PathBuf> {
        Ok(self.host_dir(self.index(host)?).join("watchdog"))
    }

    /// Sets the script run inside `host` (bash) after every power-on.
    pub fn set_boot_script(&self, host: &str, script: &str) -> Result<()> {
        let path = self.host_dir(self.index(host)?).join("boot.sh");
        write_file(&path, script)
    }

    pub fn console_log(&self, host: &str) -> Result<PathBuf> {
        Ok(self.host_dir(self.index(host)?).join("console.log"))
    }

    pub fn namespace(&self, node: &Node) -> String {
        self.id.namespace(node)
    }

    pub fn bmc(&self, host: &str) -> Result<BmcEndpoint> {
        let index = self.index(host)?;
        Ok(self.bmc_endpoint(index))
    }

    /// A command that runs `program` inside `host`: its network, mount and PID namespaces.
    pub fn host_command(&self, host: &str, program: &str) -> Result<Command> {
        let index = self.index(host)?;
        self.host_command_at(index, program)
    }

    /// A command that runs `program` in the manager's network namespace.
    pub fn manager_command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.id.namespace(&Node::Manager), program]);
        command
    }

    /// `ipmitool` against `host`'s BMC from the manager namespace, over oob.
    pub fn ipmitool(&self, host: &str, args: &[&str]) -> Result<String> {
        let endpoint = self.bmc(host)?;
        let mut command = self.manager_command("ipmitool");
        // -C 3: ipmi_sim has no cipher suite 17 and no cipher-suite discovery (LAB-FACTS).
        command
            .args(["-I", "lanplus", "-C", "3", "-N", "1", "-R", "2"])
            .args(["-H", &endpoint.address.to_string()])
            .args(["-p", &endpoint.port.to_string()])
            .args(["-U", &endpoint.user, "-P", &endpoint.password])
            .args(args);
        run(&mut command, None, COMMAND_TIMEOUT)
    }

    pub fn power_state(&self, host: &str) -> Result<PowerState> {
        let index = self.index(host)?;
        Ok(if self.init(index).is_some() { PowerState::On } else { PowerState::Off })
    }

    /// The host's PID-namespace init, while it is powered.
    pub fn host_init(&self, host: &str) -> Result<Option<ProcessId>> {
        Ok(self.init(self.index(host)?))
    }

    /// Live processes of the host (its PID namespace), init included.
    pub fn host_processes(&self, host: &str) -> Result<Vec<ProcessId>> {
        let index = self.index(host)?;
        Ok(self.host_processes_at(index))
    }

    /// Pulls the plug: every process of the host dies at once.
    pub fn power_off(&self, host: &str) -> Result<()> {
        let index = self.index(host)?;
        self.event(&format!("power-off {host}"));
        self.power_off_at(index)
    }

    /// Freezes every process of the host (SIGSTOP); the BMC still says "on".
    pub fn hang(&self, host: &str) -> Result<()> {
        let index = self.index(host)?;
        self.event(&format!("hang {host}"));
        self.update_faults(&Node::Host(index), |faults| faults.frozen = true)?;
        self.signal_host(index, Signal::SIGSTOP)
    }

    pub fn resume(&self, host: &str) -> Result<()> {
        let index = self.index(host)?;
        self.event(&format!("resume {host}"));
        self.signal_host(index, Signal::SIGCONT)?;
        self.update_faults(&Node::Host(index), |faults| faults.frozen = false)
    }

    /// Drops every packet of `host` on the selected networks (oob = its BMC's link).
    pub fn partition(&self, host: &str, nets: NetSelector) -> Result<()> {
        self.loss(host, nets, 100)
    }

    /// Drops `percent` % of the packets of `host` on the selected networks, each
    /// direction decided per packet.
    pub fn loss(&self, host: &str, nets: NetSelector, percent: u8) -> Result<()> {
        let index = self.index(host)?;
        if percent > 100 {
            return Err(LabError::Config(format!("loss percent {percent} > 100")));
        }
        self.event(&format!("drop {host} {nets:?} {percent}%"));
        for network in nets.networks() {
            let node = self.node_for(index, network);
            self.update_faults(&node, |faults| {
                faults.drop_percent.insert(network, percent);
            })?;
        }
        Ok(())
    }

    /// Removes partitions and loss of `host` (on the selected networks, or all).
    pub fn heal(&self, host: &str, nets: Option<NetSelector>) -> Result<()> {
        let index = self.index(host)?;
        self.event(&format!("heal {host} {nets:?}"));
        for network in nets.unwrap_or(NetSelector::All).networks() {
            let node = self.node_for(index, network);
            self.update_faults(&node, |faults| {
                faults.drop_percent.remove(&network);
            })?;
        }
        Ok(())
    }

    /// Makes the host's BMC unreachable (it drops all its traffic), as a dead BMC.
    pub fn bmc_fail(&self, host: &str) -> Result<()> {
        let index = self.index(host)?;
        self.event(&format!("bmc-fail {host}"));
        self.update_faults(&Node::Bmc(index), |faults| faults.bmc_failed = true)
    }

    pub fn bmc_heal(&self, host: &str) -> Result<()> {
        let index = self.index(host)?;
        self.event(&format!("bmc-heal {host}"));
        self.update_faults(&Node::Bmc(index), |faults| faults.bmc_failed = false)
    }

    fn index(&self, host: &str) -> Result<usize> {
        host_index(host).filter(|index| *index <= self.hosts).ok_or_else(|| LabError::UnknownHost(host.to_string()))
    }

    fn host_dir(&self, index: usize) -> PathBuf {
        self.dir.join("hosts").join(host_name(index))
    }

    fn bmc_dir(&self, index: usize) -> PathBuf {
        self.dir.join("bmc").join(host_name(index))
    }

    fn ssh_dir(&self) -> PathBuf {
        self.dir.join("ssh")
    }

    fn nodes(&self) -> Vec<Node> {
        let mut nodes = vec![Node::Switch, Node::Manager, Node::Storage];
        for index in 1..=self.hosts {
            nodes.push(Node::Host(index));
            nodes.push(Node::Bmc(index));
        }
        nodes
    }

    /// The namespace whose interface carries `network` for host `index`: the host for
    /// mgmt and storage, its BMC for oob.
    fn node_for(&self, index: usize, network: Network) -> Node {
        match network {
            Network::Oob => Node::Bmc(index),
            Network::Mgmt | Network::Storage => Node::Host(index),
        }
    }

    fn event(&self, text: &str) {
        let path = self.dir.join("events.log");
        if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(file, "{} {text}", unix_ms_now());
        }
    }

    fn bmc_endpoint(&self, index: usize) -> BmcEndpoint {
        let (protocol, port) = if self.redfish.contains(&index) {
            (BmcProtocol::Redfish, REDFISH_PORT)
        } else {
            (BmcProtocol::Ipmi, IPMI_PORT)
        };
        BmcEndpoint {
            protocol,
            address: Node::Bmc(index).address(Network::Oob).expect("BMCs are on oob"),
            port,
            user: BMC_USER.to_string(),
            password: self.bmc_password.clone(),
        }
    }

    fn init(&self, index: usize) -> Option<ProcessId> {
        ProcessId::read(&self.host_dir(index).join(INIT_FILE)).filter(|init| init.is_alive())
    }

    fn host_command_at(&self, index: usize, program: &str) -> Result<Command> {
        let init = self.init(index).ok_or_else(|| LabError::NotReady {
            what: format!("{} to be powered on", host_name(index)),
            timeout_ms: 0,
        })?;
        let mut command = Command::new("nsenter");
        // -p makes nsenter fork, so `program` really lives in the host's PID namespace
        // and dies with the host.
        command.args(["-t", &init.pid.to_string(), "-m", "-n", "-p", "--"]).arg(program);
        Ok(command)
    }

    fn host_processes_at(&self, index: usize) -> Vec<ProcessId> {
        let Some(init) = self.init(index) else {
            return Vec::new();
        };
        let Some(pid_namespace) = namespace_of(init.pid, "pid") else {
            return Vec::new();
        };
        processes_in_namespace("pid", &pid_namespace)
    }

    /// Takes the cross-process power lock shared with the chassis script. flock
    /// excludes other open file descriptions, so it serialises threads too.
    fn power_lock(&self, index: usize) -> Result<Flock<File>> {
        flock_file(&self.host_dir(index).join(POWER_LOCK_FILE))
    }

    fn power_off_at(&self, index: usize) -> Result<()> {
        let _power = self.power_lock(index)?;
        let _ = std::fs::remove_file(self.host_dir(index).join(POWER_REQUEST_FILE));
        if let Some(init) = self.init(index) {
            let parents = outside_parents(init);
            init.signal(Signal::SIGKILL)?;
            for parent in parents {
                parent.signal(Signal::SIGCONT)?;
            }
            // The init of a PID namespace exits only after every process in it did.
            if !init.wait_gone(Duration::from_secs(10)) {
                return Err(LabError::NotReady {
                    what: format!("{} to power off", host_name(index)),
                    timeout_ms: 10_000,
                });
            }
        }
        let _ = std::fs::remove_file(self.host_dir(index).join(INIT_FILE));
        self.set_links(index, false)
    }

    /// A host without power must not answer on the network: its namespace (and so
    /// its kernel's TCP stack, which would answer with resets) outlives its processes,
    /// so its links go down with the power and come up with it.
    fn set_links(&self, index: usize, up: bool) -> Result<()> {
        let node = Node::Host(index);
        if !up {
            // A fresh boot is not frozen: a hung host that lost power comes back whole.
            let namespace = self.id.namespace(&node);
            let faults = self.dir.join("faults").join(format!("{namespace}.json"));
            if std::fs::read_to_string(faults).is_ok_and(|text| text.contains("\"frozen\":true")) {
                self.update_faults(&node, |faults| faults.frozen = false)?;
            }
        }
        let state = if up { "up" } else { "down" };
        let commands: Vec<String> =
            node.networks().iter().map(|network| format!("link set {} {state}", network.name())).collect();
        ip_batch(&self.id.namespace(&node), &commands)
    }

    fn signal_host(&self, index: usize, signal: Signal) -> Result<()> {
        let init = self.init(index).ok_or_else(|| LabError::NotReady {
            what: format!("{} to be powered on", host_name(index)),
            timeout_ms: 0,
        })?;
        let pid_namespace = namespace_of(init.pid, "pid").ok_or_else(|| LabError::NotReady {
            what: format!("the PID namespace of {}", host_name(index)),
            timeout_ms: 0,
        })?;
        let stopping = signal == Signal::SIGSTOP;
        let mut signalled = std::collections::HashSet::new();
        // Processes may fork while we go through them: repeat until a pass finds every
        // one in the wanted state. A process blocked in the kernel (D, e.g. on the
        // FUSE mount whose sshfs is already stopped) cannot stop before it returns;
        // once signalled, it is as frozen as the rest and stops when it returns.
        let settled = wait_until(Duration::from_secs(5), || {
            let mut all_settled = true;
            for process in processes_in_namespace("pid", &pid_namespace) {
                let state = proc_stat(process.pid).map(|stat| stat.state);
                let settled = match state {
                    None => true,
                    Some('T' | 't') => stopping,
                    Some('D') => stopping && signalled.contains(&process),
                    Some(_) => !stopping,
                };
                if !settled {
                    all_settled = false;
                    let _ = process.signal(signal);
                    signalled.insert(process);
                }
            }
            all_settled
        });
        if signal == Signal::SIGCONT {
            for parent in outside_parents(init) {
                parent.signal(Signal::SIGCONT)?;
            }
        }
        if settled {
            Ok(())
        } else {
            Err(LabError::NotReady {
                what: format!("{signal} of every process of {}", host_name(index)),
                timeout_ms: 5_000,
            })
        }
    }

    /// Changes the drop rules of one namespace. The rules of each namespace are kept in
    /// `faults/<namespace>.json` under a lock, so `kvmha lab fault` from another
    /// process and the owner compose instead of overwriting each other.
    fn update_faults(&self, node: &Node, change: impl FnOnce(&mut NamespaceFaults)) -> Result<()> {
        let namespace = self.id.namespace(node);
        let faults_dir = self.dir.join("faults");
        create_dir(&faults_dir)?;
        let _lock = flock_file(&faults_dir.join("lock"))?;
        let path = faults_dir.join(format!("{namespace}.json"));
        let mut faults: NamespaceFaults = match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|error| LabError::Config(format!("{}: {error}", path.display())))?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => NamespaceFaults::default(),
            Err(error) => return Err(LabError::io(&path, error)),
        };
        change(&mut faults);
        run(
            Command::new("ip").args(["netns", "exec", &namespace, "nft", "-f", "-"]),
            Some(&faults.ruleset()),
            COMMAND_TIMEOUT,
        )?;
        let text = serde_json::to_string(&faults).expect("maps of numbers serialise");
        write_file(&path, &text)
    }
}

impl Shared {
    fn build_networks(&self) -> Result<()> {
        for node in self.nodes() {
            let namespace = self.id.namespace(&node);
            ip(&["netns", "add", &namespace])?;
            ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
        }
        let switch = self.id.namespace(&Node::Switch);
        let mut switch_commands = Vec::new();
        for network in Network::ALL {
            let bridge = network.bridge();
            // No STP, no forwarding delay: ports forward the moment they are up.
            switch_commands.push(format!("link add {bridge} type bridge stp_state 0 forward_delay 0"));
            switch_commands.push(format!("link set {bridge} up"));
        }
        for node in self.nodes() {
            let namespace = self.id.namespace(&node);
            let mut node_commands = Vec::new();
            for network in node.networks() {
                let port = node.switch_port(*network);
                let interface = network.name();
                switch_commands.push(format!("link add {port} type veth peer name {interface} netns {namespace}"));
                switch_commands.push(format!("link set {port} master {} up", network.bridge()));
                if let Some(address) = node.address(*network) {
                    node_commands.push(format!("addr add {address}/{PREFIX_LEN} dev {interface}"));
                }
                node_commands.push(format!("link set {interface} up"));
            }
            if !node_commands.is_empty() {
                // The veths must exist before their addresses: run the switch side first.
                ip_batch(&switch, &std::mem::take(&mut switch_commands))?;
                ip_batch(&namespace, &node_commands)?;
            }
        }
        if !switch_commands.is_empty() {
            ip_batch(&switch, &switch_commands)?;
        }
        Ok(())
    }

    fn start_storage(&self) -> Result<()> {
        let ssh = self.ssh_dir();
        create_dir(&ssh)?;
        create_dir(&self.storage_dir().join("vms"))?;
        for key in ["host_key", "client_key"] {
            let path = ssh.join(key);
            run_args(
                "ssh-keygen",
                &["-q", "-t", "ed25519", "-N", "", "-C", "kvmha-lab", "-f", &path.to_string_lossy()],
                COMMAND_TIMEOUT,
            )?;
        }
        let read = |name: &str| -> Result<String> {
            let path = ssh.join(name);
            std::fs::read_to_string(&path).map_err(|error| LabError::io(path, error))
        };
        write_file(&ssh.join("authorized_keys"), &read("client_key.pub")?)?;
        write_file(&ssh.join("known_hosts"), &format!("kvmha-lab-storage {}", read("host_key.pub")?))?;
        let server = Node::Storage.address(Network::Storage).expect("the storage node is on the storage network");
        let ssh_path = ssh.display();
        write_file(
            &ssh.join("sshd_config"),
            &format!(
                "# Generated by kvmha-lab: the shared storage server (sftp only).\n\
                 ListenAddress {server}\nPort 22\nHostKey {ssh_path}/host_key\n\
                 AuthorizedKeysFile {ssh_path}/authorized_keys\nPidFile none\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 ClientAliveInterval 1\nClientAliveCountMax 3\nMaxStartups 100\n\
                 LogLevel ERROR\nSubsystem sftp internal-sftp\n"
            ),
        )?;
        // ServerAlive 1 s x 3: a cut storage link kills the session within ~3-4 s, so
        // I/O fails with EIO as on a hard NFS error instead of hanging forever.
        write_file(
            &ssh.join("ssh_config"),
            &format!(
                "# Generated by kvmha-lab: how hosts reach the storage server.\n\
                 Host storage\n  HostName {server}\n  User root\n  IdentityFile {ssh_path}/client_key\n\
                 \x20 HostKeyAlias kvmha-lab-storage\n  UserKnownHostsFile {ssh_path}/known_hosts\n\
                 \x20 StrictHostKeyChecking yes\n  BatchMode yes\n  ServerAliveInterval 1\n\
                 \x20 ServerAliveCountMax 3\n  ConnectTimeout 3\n  LogLevel ERROR\n"
            ),
        )?;
        // sshd refuses to start without its privilege-separation directory.
        create_dir(Path::new("/run/sshd"))?;
        let log = self.open_log(&ssh.join("sshd.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.id.namespace(&Node::Storage)])
            .args(["/usr/sbin/sshd", "-D", "-e", "-f"])
            .arg(ssh.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|error| LabError::io("sshd.log", error))?)
            .stderr(log)
            .spawn()
            .map_err(|error| LabError::Command { command: "sshd".to_string(), detail: error.to_string() })?;
        let pid = child.id() as i32;
        lock(&self.daemons).insert("sshd".to_string(), child);
        // Listening on port 22 (0x0016), state LISTEN (0A), seen through sshd's own netns.
        let listening = wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))
                .map(|table| table.lines().any(|line| line.contains(":0016 00000000:0000 0A")))
                .unwrap_or(false)
        });
        if !listening {
            return Err(LabError::NotReady { what: "the storage sshd to listen".to_string(), timeout_ms: 10_000 });
        }
        Ok(())
    }

    fn open_log(&self, path: &Path) -> Result<File> {
        OpenOptions::new().create(true).append(true).open(path).map_err(|error| LabError::io(path, error))
    }

    fn prepare_host(&self, index: usize, boot_script: &str) -> Result<()> {
        let dir = self.host_dir(index);
        create_dir(&dir.join("mnt"))?;
        write_file(&dir.join("watchdog"), "")?;
        write_file(&dir.join("boot.sh"), boot_script)?;
        write_file(&dir.join(POWER_LOCK_FILE), "")?;
        Ok(())
    }

    fn start_bmc(&self, index: usize) -> Result<()> {
        let chassis = self.dir.join("chassis.sh");
        if !chassis.exists() {
            write_file(&chassis, &scripts::chassis_script())?;
            make_executable(&chassis)?;
        }
        let dir = self.bmc_dir(index);
        // Always a fresh state directory (LAB-FACTS), also when restarting a dead BMC.
        let _ = std::fs::remove_dir_all(dir.join("state"));
        create_dir(&dir.join("state"))?;
        let endpoint = self.bmc_endpoint(index);
        if endpoint.protocol == BmcProtocol::Redfish {
            return self.start_redfish_bmc(index, &chassis, &endpoint);
        }
        let name = format!("{}-bmc{index}", self.id);
        write_file(
            &dir.join("lan.conf"),
            &scripts::ipmi_lan_conf(
                &name,
                endpoint.address,
                &chassis,
                &self.host_dir(index),
                &endpoint.user,
                &endpoint.password,
            ),
        )?;
        write_file(&dir.join("emu.cmds"), kvmha_bmc::sim::EMU_CMDS)?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.id.namespace(&Node::Bmc(index))])
            .args(["ipmi_sim", "-n", "-c"])
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("emu.cmds"))
            .arg("-s")
            .arg(dir.join("state"));
        self.spawn_bmc(index, "ipmi_sim", command)
    }

    /// sushy-emulator in the BMC's namespace, acting on the host through `chassis`.
    fn start_redfish_bmc(&self, index: usize, chassis: &Path, endpoint: &BmcEndpoint) -> Result<()> {
        let dir = self.bmc_dir(index);
        let script = dir.join("redfish_bmc.py");
        let htpasswd = dir.join("htpasswd");
        write_file(&script, scripts::REDFISH_BMC_PY)?;
        write_file(
            &dir.join("sushy.conf"),
            &scripts::redfish_conf(endpoint.address, endpoint.port, &host_name(index), &dir.join("state"), &htpasswd),
        )?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.id.namespace(&Node::Bmc(index))])
            .arg("python3")
            .arg(&script)
            .arg(dir.join("sushy.conf"))
            .env("KVMHA_CHASSIS", chassis)
            .env("KVMHA_HOST_DIR", self.host_dir(index))
            .env("KVMHA_HTPASSWD", &htpasswd)
            .env("KVMHA_BMC_USER", &endpoint.user)
            .env("KVMHA_BMC_PASSWORD", &endpoint.password);
        self.spawn_bmc(index, "sushy-emulator", command)
    }

    /// Starts host `index`'s BMC daemon (`what`, also its log's name) as a lab daemon.
    fn spawn_bmc(&self, index: usize, what: &str, mut command: Command) -> Result<()> {
        let log_name = format!("{what}.log");
        let log = self.open_log(&self.bmc_dir(index).join(&log_name))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|error| LabError::io(&log_name, error))?)
            .stderr(log)
            .spawn()
            .map_err(|error| LabError::Command { command: what.to_string(), detail: error.to_string() })?;
        lock(&self.daemons).insert(format!("bmc{index}"), child);
        Ok(())
    }

    /// Waits until the BMC answers a power-status request from the manager namespace
    /// (a Redfish BMC: until it listens).
    fn wait_bmc_ready(&self, index: usize) -> Result<()> {
        let endpoint = self.bmc_endpoint(index);
        if endpoint.protocol == BmcProtocol::Redfish {
            let pid = lock(&self.daemons).get(&format!("bmc{index}")).map(|child| child.id());
            let listen = format!("{}:{:04X} 00000000:0000 0A", hex_address(endpoint.address), endpoint.port);
            let listening = wait_until(Duration::from_secs(20), || {
                pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok())
                    .is_some_and(|table| table.contains(&listen))
            });
            return if listening {
                Ok(())
            } else {
                Err(LabError::NotReady {
                    what: format!("Redfish BMC of {} to listen", host_name(index)),
                    timeout_ms: 20_000,
                })
            };
        }
        let ready = wait_until(Duration::from_secs(10), || {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", &self.id.namespace(&Node::Manager), "ipmitool"])
                .args(["-I", "lanplus", "-C", "3", "-N", "1", "-R", "1"])
                .args(["-H", &endpoint.address.to_string(), "-U", &endpoint.user])
                .args(["-P", &endpoint.password, "chassis", "power", "status"]);
            run(&mut command, None, Duration::from_secs(5)).is_ok()
        });
        if ready {
            Ok(())
        } else {
            Err(LabError::NotReady { what: format!("BMC of {} to answer", host_name(index)), timeout_ms: 10_000 })
        }
    }

    fn boot_at(&self, index: usize, storage: StorageAtBoot) -> Result<()> {
        let power = self.power_lock(index)?;
        let dir = self.host_dir(index);
        let _ = std::fs::remove_file(dir.join(POWER_REQUEST_FILE));
        if self.init(index).is_some() {
            return Ok(());
        }
        self.set_links(index, true)?;
        lock(&self.links_up)[index - 1] = true;
        let console = self.open_log(&dir.join("console.log"))?;
        let console_clone = || console.try_clone().map_err(|error| LabError::io("console.log", error));
        // ip netns exec execs unshare, which forks the init (PID 1 of the new PID
        // namespace) with its own mount namespace and /proc; --kill-child takes the
        // host down should unshare ever die first.
        let unshare = Command::new("ip")
            .args(["netns", "exec", &self.id.namespace(&Node::Host(index))])
            .args(["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"])
            .args(["--propagation", "private", "--", "bash", "-c", scripts::HOST_INIT_LOOP])
            .stdin(Stdio::null())
            .stdout(console_clone()?)
            .stderr(console_clone()?)
            .spawn()
            .map_err(|error| LabError::Command { command: "unshare".to_string(), detail: error.to_string() })?;
        let unshare_pid = unshare.id() as i32;
        lock(&self.children).push(unshare);
        let mut init = None;
        wait_until(Duration::from_secs(5), || {
            init = process::all_pids()
                .into_iter()
                .filter(|pid| proc_stat(*pid).map(|stat| stat.parent_pid) == Some(unshare_pid))
                .find_map(ProcessId::of);
            init.is_some()
        });
        let init = init.ok_or_else(|| LabError::NotReady {
            what: format!("the init of {} to start", host_name(index)),
            timeout_ms: 5_000,
        })?;
        // Written atomically: the chassis script may read it at any moment.
        let init_path = dir.join(INIT_FILE);
        let temporary = dir.join("init.tmp");
        write_file(&temporary, &init.to_line())?;
        std::fs::rename(&temporary, &init_path).map_err(|error| LabError::io(&init_path, error))?;
        // The host is on from here: the BMC must answer (and may power it off) while
        // it boots, even when a cut storage link makes the mount take seconds.
        drop(power);
        // Under the sshfs mount, a read-only tmpfs of the host's own: without storage,
        // writes fail (EROFS) instead of landing in the bare directory on our disk.
        let mount_point = dir.join("mnt");
        let mut placeholder = self.host_command_at(index, "mount")?;
        placeholder.args(["-t", "tmpfs", "-o", "ro,size=4k", "kvmha-lab-no-storage"]).arg(&mount_point);
        run(&mut placeholder, None, COMMAND_TIMEOUT)?;
        // Every boot gets its own boot id, as a real machine's kernel makes one: without it
        // all lab hosts, and every boot of one, would share this machine's, and a reset
        // would look to kvmha like no reboot at all.
        if let Err(error) = self.fresh_boot_id(index, &dir) {
            let mut console = console_clone()?;
            let _ = writeln!(console, "kvmha-lab: no boot id of its own for this boot: {error}");
        }
        // A host that cannot reach its storage still boots, as a real one would; but a
        // lab whose storage never worked is broken, so the first boot insists.
        if let Err(error) = self.mount_storage(index) {
            let mut console = console_clone()?;
            let _ = writeln!(console, "kvmha-lab: storage mount failed: {error}");
            if storage == StorageAtBoot::Required {
                return Err(error);
            }
        }
        lock(&self.booted)[index - 1] = Some(init);
        self.spawn_boot_script(index)
    }

    /// Bind-mounts a new random boot id over the host's `/proc/sys/kernel/random/boot_id`
    /// (its mount namespace is its own, and dies with its init).
    fn fresh_boot_id(&self, index: usize, dir: &Path) -> Result<()> {
        let uuid_path = Path::new("/proc/sys/kernel/random/uuid");
        let uuid = std::fs::read_to_string(uuid_path).map_err(|error| LabError::io(uuid_path, error))?;
        let file = dir.join("boot_id");
        write_file(&file, &format!("{}\n", uuid.trim()))?;
        let mut bind = self.host_command_at(index, "mount")?;
        bind.arg("--bind").arg(&file).arg("/proc/sys/kernel/random/boot_id");
        run(&mut bind, None, COMMAND_TIMEOUT)?;
        Ok(())
    }

    /// Starts `boot.sh` inside the running host, if it has one (non-empty).
    fn spawn_boot_script(&self, index: usize) -> Result<()> {
        let boot_script = self.host_dir(index).join("boot.sh");
        let has_boot_script = std::fs::metadata(&boot_script).map(|metadata| metadata.len() > 0).unwrap_or(false);
        if has_boot_script {
            self.spawn_in_host_at(index, "boot.sh", &[boot_script.display().to_string()])?;
        }
        Ok(())
    }

    /// Runs `bash ARGS...` inside the host in the background, output to its console
    /// log, with the boot environment; the controller reaps it.
    fn spawn_in_host_at(&self, index: usize, what: &str, args: &[String]) -> Result<()> {
        let console = self.open_log(&self.host_dir(index).join("console.log"))?;
        let console_clone = || console.try_clone().map_err(|error| LabError::io("console.log", error));
        let mut command = self.host_command_at(index, "bash")?;
        command.args(args);
        for (name, value) in self.boot_environment(index) {
            command.env(name, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(console_clone()?)
            .stderr(console_clone()?)
            .spawn()
            .map_err(|error| LabError::Command { command: what.to_string(), detail: error.to_string() })?;
        lock(&self.children).push(child);
        Ok(())
    }

    /// What a host's boot script (its agent) needs to know about its place in the lab.
    fn boot_environment(&self, index: usize) -> Vec<(&'static str, String)> {
        let dir = self.host_dir(index);
        let address =
            |node: Node, network: Network| node.address(network).map(|address| address.to_string()).unwrap_or_default();
        vec![
            ("KVMHA_LAB_ID", self.id.to_string()),
            ("KVMHA_LAB_HOST", host_name(index)),
            ("KVMHA_LAB_STORAGE_DIR", dir.join("mnt").display().to_string()),
            ("KVMHA_LAB_WATCHDOG", dir.join("watchdog").display().to_string()),
            ("KVMHA_LAB_MGMT_ADDRESS", address(Node::Host(index), Network::Mgmt)),
            ("KVMHA_LAB_STORAGE_ADDRESS", address(Node::Host(index), Network::Storage)),
            ("KVMHA_LAB_MANAGER_ADDRESS", address(Node::Manager, Network::Mgmt)),
        ]
    }

    fn mount_storage(&self, index: usize) -> Result<()> {
        let mount_point = self.host_dir(index).join("mnt");
        let ssh = self.ssh_dir();
        let remote = format!("storage:{}", self.storage_dir().display());
        let mut command = self.host_command_at(index, "sshfs")?;
        // reconnect: after a healed cut, I/O works again (as NFS recovers), while
        // during the cut every request fails with EIO after the ServerAlive timeout.
        command.arg("-F").arg(ssh.join("ssh_config")).args(["-o", "reconnect"]).arg(&remote).arg(&mount_point);
        run(&mut command, None, COMMAND_TIMEOUT)?;
        Ok(())
    }

    fn is_mounted(&self, index: usize, init: ProcessId) -> bool {
        let mount_point = self.host_dir(index).join("mnt");
        let needle = format!(" {} fuse.sshfs ", mount_point.display());
        std::fs::read_to_string(format!("/proc/{}/mounts", init.pid))
            .map(|mounts| mounts.lines().any(|line| line.contains(&needle)))
            .unwrap_or(false)
    }

    /// Retries the storage mount of hosts that booted without it (their storage link
    /// was cut), about once a second, as an NFS `bg` mount keeps trying: when the
    /// link heals the host gets its storage back. Its own thread, because a mount
    /// attempt over a cut link takes the ssh ConnectTimeout and the controller's
    /// watchdogs must not wait for that.
    fn mounter_loop(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            for index in 1..=self.hosts {
                let Some(init) = self.init(index) else {
                    continue;
                };
                let booted = lock(&self.booted)[index - 1] == Some(init);
                if booted && !self.is_mounted(index, init) && self.mount_storage(index).is_ok() {
                    self.event(&format!("storage-mounted {}", host_name(index)));
                }
            }
            for _ in 0..10 {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn controller_loop(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            for index in 1..=self.hosts {
                if let Err(error) = self.controller_tick(index) {
                    self.event(&format!("controller-error {} {error}", host_name(index)));
                }
            }
            lock(&self.children).retain_mut(|child| matches!(child.try_wait(), Ok(None)));
            thread::sleep(CONTROLLER_TICK);
        }
    }

    fn controller_tick(&self, index: usize) -> Result<()> {
        let dir = self.host_dir(index);
        if dir.join(POWER_REQUEST_FILE).exists() {
            self.event(&format!("bmc-power-on {}", host_name(index)));
            self.boot_at(index, StorageAtBoot::BestEffort)?;
        }
        let (length, last_byte) = watchdog_file_state(&dir.join("watchdog"));
        let mut watchdogs = lock(&self.watchdogs);
        if self.init(index).is_none() {
            // A board without power has no running watchdog: a fenced host stays off.
            watchdogs[index - 1].power_lost(length);
            drop(watchdogs);
            // Powered off by its BMC (the chassis script): take its links down too.
            let links_were_up = std::mem::replace(&mut lock(&self.links_up)[index - 1], false);
            if links_were_up {
                // Under the power lock, as boots are: a boot that brought the links
                // up and has not written its init file yet must keep them.
                let _power = self.power_lock(index)?;
                if self.init(index).is_none() {
                    self.set_links(index, false)?;
                } else {
                    lock(&self.links_up)[index - 1] = true;
                }
            }
            return Ok(());
        }
        let action = watchdogs[index - 1].observe(unix_ms_now(), length, last_byte);
        drop(watchdogs);
        if action == WatchdogAction::Reset {
            self.event(&format!("watchdog-reset {}", host_name(index)));
            self.power_off_at(index)?;
            self.boot_at(index, StorageAtBoot::BestEffort)?;
        }
        Ok(())
    }

    fn teardown(&self, keep_in: Option<&Path>) -> Result<()> {
        let mut first_error = None;
        let mut note = |result: Result<()>| {
            if let Err(error) = result {
                first_error.get_or_insert(error);
            }
        };
        for index in 1..=self.hosts {
            note(self.power_off_at(index));
        }
        for mut child in lock(&self.children).drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // sshd's per-connection processes first, leaves first, while sshd itself still
        // reaps them (killed at once, they would end as zombies of PID 1).
        let storage = self.id.namespace(&Node::Storage);
        let sshd_pid = lock(&self.daemons).get("sshd").map(|child| child.id() as i32);
        if let (Some(identity), Some(sshd_pid)) = (named_netns_identity(&storage), sshd_pid) {
            let sessions_gone = wait_until(Duration::from_secs(5), || {
                let sessions: Vec<ProcessId> = processes_in_namespace("net", &identity)
                    .into_iter()
                    .filter(|process| process.pid != sshd_pid)
                    .collect();
                let parents: Vec<i32> = process::all_pids()
                    .into_iter()
                    .filter_map(|pid| proc_stat(pid).map(|stat| stat.parent_pid))
                    .collect();
                for session in &sessions {
                    if !parents.contains(&session.pid) {
                        let _ = session.signal(Signal::SIGKILL);
                    }
                }
                // Gone means reaped: no child of sshd left, not even a zombie.
                sessions.is_empty() && !parents.contains(&sshd_pid)
            });
            if !sessions_gone {
                self.event("teardown: sshd sessions did not go in 5 s");
            }
        }
        for (_, mut child) in lock(&self.daemons).drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
        note(remove_lab_namespaces(&self.id));
        if let Some(keep_in) = keep_in {
            let copied = create_dir(keep_in).and_then(|()| {
                let mut source = self.dir.clone().into_os_string();
                source.push("/.");
                run(Command::new("cp").arg("-a").arg(source).arg(keep_in), None, Duration::from_secs(120))
            });
            note(copied.map(|_| ()));
        }
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            note(Err(LabError::io(&self.dir, error)));
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// An IPv4 address as /proc/net/tcp prints it (host byte order, here little endian).
fn hex_address(address: Ipv4Addr) -> String {
    format!("{:08X}", u32::from_le_bytes(address.octets()))
}

/// Processes outside the host's PID namespace whose children are inside it: the
/// `nsenter` parents of commands run in the host. nsenter stops itself when its child
/// is stopped (a hung host), and must be continued both on resume and on power-off,
/// where it has to reap its dead child before the host's PID namespace can finish dying.
fn outside_parents(init: ProcessId) -> Vec<ProcessId> {
    let Some(pid_namespace) = namespace_of(init.pid, "pid") else {
        return Vec::new();
    };
    let mut parents: Vec<ProcessId> = processes_in_namespace("pid", &pid_namespace)
        .into_iter()
        .filter_map(|process| proc_stat(process.pid).map(|stat| stat.parent_pid))
        .filter(|parent| namespace_of(*parent, "pid").as_deref() != Some(pid_namespace.as_str()))
        .filter_map(ProcessId::of)
        .collect();
    parents.sort_by_key(|parent| parent.pid);
    parents.dedup();
    parents
}

/// Length and last byte of the watchdog file (0, None if unreadable).
fn watchdog_file_state(path: &Path) -> (u64, Option<u8>) {
    let Ok(mut file) = File::open(path) else {
        return (0, None);
    };
    let length = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
    if length == 0 {
        return (0, None);
    }
    let mut last = [0u8; 1];
    let read_last = file.seek(SeekFrom::Start(length - 1)).and_then(|_| file.read_exact(&mut last));
    (length, read_last.ok().map(|()| last[0]))
}

/// Takes an exclusive flock on `path` (created if missing), blocking.
fn flock_file(path: &Path) -> Result<Flock<File>> {
    let file = OpenOptions::new().create(true).append(true).open(path).map_err(|error| LabError::io(path, error))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| LabError::io(path, std::io::Error::from_raw_os_error(errno as i32)))
}

/// Kills every process in the lab's namespaces, then deletes the namespaces.
fn remove_lab_namespaces(id: &LabId) -> Result<()> {
    let mut first_error = None;
    let ours: Vec<String> =
        list_netns().into_iter().filter(|name| LabId::of_namespace(name).as_ref() == Some(id)).collect();
    for namespace in &ours {
        if let Some(identity) = named_netns_identity(namespace) {
            if let Err(error) = kill_namespace_processes("net", &identity, Duration::from_secs(10)) {
                first_error.get_or_insert(error);
            }
        }
    }
    for namespace in &ours {
        // Another cleaner (a concurrent lab build) may have deleted it meanwhile.
        let result = ip(&["netns", "delete", namespace]);
        if let Err(error) = result {
            if list_netns().contains(namespace) {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

static PROGRESS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the progress lines of long operations (`kvmha lab up`) on.
pub fn show_progress(on: bool) {
    PROGRESS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// One step of a long operation, when progress is on: a plain line on stderr
/// (`kvmha lab: ...`), never colours or cursor movement, so that a pipe, a log file and a
/// terminal read the same.
pub fn progress(step: &str) {
    if PROGRESS.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("kvmha lab: {step}");
    }
}

/// Removes labs under `base_dir` whose owner process is gone (a crashed run).
/// Only directories named like a lab id are considered, and only namespaces with
/// that lab's prefix are touched. Returns the ids cleaned.
pub fn clean_stale_labs(base_dir: &Path) -> Result<Vec<LabId>> {
    let Ok(entries) = std::fs::read_dir(base_dir) else {
        return Ok(Vec::new());
    };
    let mut cleaned = Vec::new();
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().and_then(LabId::parse) else {
            continue;
        };
        let dir = entry.path();
        let owner_alive = ProcessId::read(&dir.join("owner")).map(|owner| owner.is_alive()).unwrap_or(false);
        if owner_alive {
            continue;
        }
        // A lab being built right now has its owner file within microseconds; a
        // directory without one that is younger than a minute may be that.
        let young_without_owner = !dir.join("owner").exists()
            && entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .map(|modified| modified.elapsed().unwrap_or_default() < Duration::from_secs(60))
                .unwrap_or(false);
        if young_without_owner {
            continue;
        }
        remove_lab_namespaces(&id)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            // A concurrent cleaner got there first.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(LabError::io(&dir, error)),
        }
        cleaned.push(id);
    }
    Ok(cleaned)
}

/// Waits until `condition` holds, as a lab error naming `what` otherwise.
pub fn wait_for(what: &str, timeout: Duration, condition: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    if wait_until(timeout, condition) {
        return Ok(());
    }
    Err(LabError::NotReady { what: what.to_string(), timeout_ms: started.elapsed().as_millis() as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_replaces_the_table_and_renders_loss_and_partition() {
        let empty = NamespaceFaults::default().ruleset();
        assert_eq!(empty, "add table inet kvmha_lab\ndelete table inet kvmha_lab\n");
        let mut faults = NamespaceFaults::default();
        faults.drop_percent.insert(Network::Mgmt, 100);
        faults.drop_percent.insert(Network::Storage, 30);
        let text = faults.ruleset();
        assert!(text.contains("iifname \"mgmt\" drop"), "{text}");
        assert!(text.contains("oifname \"mgmt\" drop"), "{text}");
        assert!(text.contains("iifname \"storage\" numgen random mod 100 < 30 drop"), "{text}");
    }

    #[test]
    fn net_selector_parses_the_scenario_words() {
        assert_eq!(NetSelector::parse("all"), Some(NetSelector::All));
        assert_eq!(NetSelector::parse("oob"), Some(NetSelector::One(Network::Oob)));
        assert_eq!(NetSelector::parse("wan"), None);
    }
}
