//! The lab process driver: a VM is a real process ([`writer`], binary `kvmha-lab-vm`)
//! that appends heartbeat lines to its disk log on shared storage.
//!
//! State lives in files so that an agent restarted on the same host finds its VMs again:
//!
//! ```text
//! <state>/domains/<vm>.xml   the definition, as given to define (returned by domain_xml)
//! <state>/run/<vm>.pid       "<pid> <start_ticks> <boot_id> <started_unix_ms>" while started
//! <state>/run/<vm>.stop      "destroyed" or "shutdown": the driver's intent to stop it,
//!                            written before the signal is sent
//! <state>/run/<vm>.log       the VM process's stderr
//! ```
//!
//! A VM is running while the process in its pid file is alive: same pid, same start time
//! (`/proc/<pid>/stat` field 22, so a reused pid is not mistaken for it), not a zombie.
//! A pid file whose process is gone means the VM stopped; if no `.stop` intent was written
//! it stopped without the driver asking, and the VM is [`DomainState::Crashed`].
//!
//! Every VM runs in its own process group (its pid), so `destroy` is SIGKILL of that group
//! and a signal to the agent's group does not reach the VMs. Dropping the driver leaves
//! the VMs running, as a restarting agent must; [`kill_all`] tears them down.

pub mod writer;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rustix::process::{kill_process_group, Pid, Signal};

use crate::definition::{validate_domain_name, DomainDefinition};
use crate::{
    CrashReason, DomainInfo, DomainState, Error, Hypervisor, MigrateRequest, Result, ShutOffReason, ShutdownOutcome,
    ShutdownRequest,
};

const DRIVER: &str = "lab";

/// Name of the VM binary looked up next to the running executable.
pub const VM_BINARY_NAME: &str = "kvmha-lab-vm";

/// How often a shutdown or destroy re-checks whether the VM process is gone.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Where the lab driver keeps its state and what it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfig {
    /// Shared storage root; VM disk logs go to `<storage_root>/vms/<vm>/disk.log`.
    pub storage_root: PathBuf,
    /// Local state directory (definitions, pid files). One per host.
    pub state_dir: PathBuf,
    /// The host name written into every heartbeat line.
    pub host: String,
    /// The program run as a VM and its leading arguments; the driver appends
    /// `--storage-root R --host H --vm V --boot-id B`.
    pub vm_command: Vec<OsString>,
}

impl LabConfig {
    /// True for URIs the lab driver owns (`lab:...`).
    pub fn is_lab_uri(uri: &str) -> bool {
        uri.starts_with("lab:")
    }

    /// Parses `lab:<storage_root>?state=<dir>[&host=<name>][&vm_binary=<path>]`.
    ///
    /// `storage_root` and `state` are required absolute paths. `host` defaults to the
    /// kernel's host name. `vm_binary` defaults to `$KVMHA_LAB_VM_BINARY`, else
    /// `kvmha-lab-vm` next to the running executable (or one directory up, as for
    /// cargo's test binaries). No percent-decoding: paths must not contain `?` or `&`.
    pub fn from_uri(uri: &str) -> Result<Self> {
        let invalid = |message: String| Error::InvalidUri { uri: uri.to_string(), message };
        let rest = uri.strip_prefix("lab:").ok_or_else(|| invalid("does not start with lab:".to_string()))?;
        let (root, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut state_dir = None;
        let mut host = None;
        let mut vm_binary = None;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| invalid(format!("parameter {pair:?} has no '='")))?;
            let slot = match key {
                "state" => &mut state_dir,
                "host" => &mut host,
                "vm_binary" => &mut vm_binary,
                other => return Err(invalid(format!("unknown parameter {other:?}"))),
            };
            if slot.replace(value.to_string()).is_some() {
                return Err(invalid(format!("parameter {key:?} given twice")));
            }
        }
        let storage_root = PathBuf::from(root);
        if !storage_root.is_absolute() {
            return Err(invalid(format!("storage root {root:?} is not an absolute path")));
        }
        let state_dir = PathBuf::from(state_dir.ok_or_else(|| invalid("no state=<dir>".to_string()))?);
        if !state_dir.is_absolute() {
            return Err(invalid(format!("state dir {} is not an absolute path", state_dir.display())));
        }
        let host = match host {
            Some(host) => host,
            None => kernel_host_name().map_err(|error| invalid(format!("no host= and {error}")))?,
        };
        let vm_binary = match vm_binary {
            Some(path) => PathBuf::from(path),
            None => default_vm_binary().ok_or_else(|| {
                invalid(format!(
                    "no vm_binary=, no $KVMHA_LAB_VM_BINARY and no {VM_BINARY_NAME} next to this executable"
                ))
            })?,
        };
        Ok(LabConfig { storage_root, state_dir, host, vm_command: vec![vm_binary.into_os_string()] })
    }

    fn definition_path(&self, name: &str) -> PathBuf {
        self.state_dir.join("domains").join(format!("{name}.xml"))
    }

    fn run_path(&self, name: &str, extension: &str) -> PathBuf {
        self.state_dir.join("run").join(format!("{name}.{extension}"))
    }
}

fn kernel_host_name() -> std::result::Result<String, String> {
    let text = fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|error| format!("cannot read the host name: {error}"))?;
    let host = text.trim().to_string();
    if host.is_empty() {
        return Err("the kernel host name is empty".to_string());
    }
    Ok(host)
}

fn default_vm_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KVMHA_LAB_VM_BINARY") {
        return Some(PathBuf::from(path));
    }
    let executable = std::env::current_exe().ok()?;
    let directory = executable.parent()?;
    // Not a chained expression: the iterator borrows `executable` (a local).
    for candidate_directory in [Some(directory), directory.parent()].into_iter().flatten() {
        let candidate = candidate_directory.join(VM_BINARY_NAME);
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    None
}

/// What a pid file records about a started VM.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RunRecord {
    pid: i32,
    /// Process start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    start_ticks: u64,
    boot_id: String,
    started_unix_ms: u64,
}

impl RunRecord {
    fn render(&self) -> String {
        format!("{} {} {} {}\n", self.pid, self.start_ticks, self.boot_id, self.started_unix_ms)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut fields = text.split_whitespace();
        let record = RunRecord {
            pid: fields.next()?.parse().ok()?,
            start_ticks: fields.next()?.parse().ok()?,
            boot_id: fields.next()?.to_string(),
            started_unix_ms: fields.next()?.parse().ok()?,
        };
        // Never 0 or 1: kill(-1) signals every process we may signal, and a VM is never
        // anyone's init.
        (record.pid > 1 && fields.next().is_none()).then_some(record)
    }
}

/// The driver's intent to stop a VM, recorded before the signal goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopIntent {
    Destroyed,
    Shutdown,
}

impl StopIntent {
    fn as_str(self) -> &'static str {
        match self {
            StopIntent::Destroyed => "destroyed",
            StopIntent::Shutdown => "shutdown",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "destroyed" => Some(StopIntent::Destroyed),
            "shutdown" => Some(StopIntent::Shutdown),
            _ => None,
        }
    }

    fn shut_off_reason(self) -> ShutOffReason {
        match self {
            StopIntent::Destroyed => ShutOffReason::Destroyed,
            StopIntent::Shutdown => ShutOffReason::Shutdown,
        }
    }
}

/// The lab process driver.
#[derive(Debug, Clone)]
pub struct LabDriver {
    /// Immutable; a copy lives in `inner` for the blocking work.
    config: LabConfig,
    inner: Arc<Mutex<Inner>>,
    call_timeout: Duration,
}

#[derive(Debug)]
struct Inner {
    config: LabConfig,
    /// VMs this driver instance spawned, so it can reap them (no zombies). VMs found
    /// through pid files after a restart are not our children and are watched by pid.
    children: HashMap<String, Child>,
}

impl LabDriver {
    /// Creates the state directories; finds VMs started by an earlier driver on its own.
    pub fn new(config: LabConfig, call_timeout: Duration) -> Result<Self> {
        if config.vm_command.is_empty() {
            return Err(Error::InvalidUri {
                uri: format!("lab:{}", config.storage_root.display()),
                message: "empty vm command".to_string(),
            });
        }
        for directory in [config.state_dir.join("domains"), config.state_dir.join("run")] {
            fs::create_dir_all(&directory).map_err(|error| Error::io("create state dir", &directory, error))?;
        }
        Ok(LabDriver {
            config: config.clone(),
            inner: Arc::new(Mutex::new(Inner { config, children: HashMap::new() })),
            call_timeout,
        })
    }

    /// The configuration this driver runs with.
    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    /// The pid of a running VM's process (the lab's `vm-crash` fault kills it).
    pub async fn pid(&self, name: &str) -> Result<Option<u32>> {
        let name = name.to_string();
        self.blocking("pid", move |inner| {
            let running = inner.status(&name)?.running;
            Ok(running.and_then(|record| u32::try_from(record.pid).ok()))
        })
        .await
    }

    /// The boot id of a running VM (the one its disk log lines carry).
    pub async fn boot_id(&self, name: &str) -> Result<Option<String>> {
        let name = name.to_string();
        self.blocking("boot id", move |inner| Ok(inner.status(&name)?.running.map(|record| record.boot_id))).await
    }

    /// Runs `work` on a blocking thread (file I/O, process waits) within the deadline.
    async fn blocking<T, F>(&self, operation: &'static str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let task = tokio::task::spawn_blocking(move || {
            let mut guard = inner.lock().unwrap_or_else(|poison| poison.into_inner());
            work(&mut guard)
        });
        match tokio::time::timeout(self.call_timeout, task).await {
            Err(_) => Err(Error::Timeout {
                operation,
                timeout_ms: u64::try_from(self.call_timeout.as_millis()).unwrap_or(u64::MAX),
            }),
            Ok(Err(join_error)) => std::panic::resume_unwind(join_error.into_panic()),
            Ok(Ok(result)) => result,
        }
    }
}

/// What the files and /proc say about one VM right now.
#[derive(Debug)]
struct Status {
    /// The pid file, when present.
    record: Option<RunRecord>,
    /// The pid file's record when its process is alive.
    running: Option<RunRecord>,
    intent: Option<StopIntent>,
}

impl Status {
    fn state(&self) -> DomainState {
        match (&self.record, &self.running, self.intent) {
            (_, Some(_), Some(StopIntent::Shutdown)) => DomainState::ShuttingDown,
            // A destroy in progress: SIGKILL sent, the process not yet reaped.
            (_, Some(_), Some(StopIntent::Destroyed)) => DomainState::Running,
            (_, Some(_), None) => DomainState::Running,
            (Some(_), None, None) => DomainState::Crashed(CrashReason::ProcessExited),
            (_, None, Some(intent)) => DomainState::ShutOff(intent.shut_off_reason()),
            (None, None, None) => DomainState::ShutOff(ShutOffReason::Unknown),
        }
    }
}

impl Inner {
    fn definition(&self, name: &str) -> Result<(String, DomainDefinition)> {
        validate_domain_name(name).map_err(|_| Error::NoSuchDomain { domain: name.to_string() })?;
        let path = self.config.definition_path(name);
        let xml = match fs::read_to_string(&path) {
            Ok(xml) => xml,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoSuchDomain { domain: name.to_string() })
            }
            Err(error) => return Err(Error::io("read definition", &path, error)),
        };
        let definition = DomainDefinition::parse(&xml)?;
        Ok((xml, definition))
    }

    fn status(&mut self, name: &str) -> Result<Status> {
        let pid_path = self.config.run_path(name, "pid");
        let record = match read_optional(&pid_path)? {
            None => None,
            Some(text) => Some(RunRecord::parse(&text).ok_or_else(|| Error::Io {
                operation: "parse pid file",
                path: pid_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, text),
            })?),
        };
        let intent_path = self.config.run_path(name, "stop");
        let intent = read_optional(&intent_path)?.and_then(|text| StopIntent::parse(&text));
        let running = match &record {
            Some(record) if self.is_alive(name, record) => Some(record.clone()),
            _ => None,
        };
        Ok(Status { record, running, intent })
    }

    /// Our own child is reaped here; any other process is checked through /proc.
    fn is_alive(&mut self, name: &str, record: &RunRecord) -> bool {
        if let Some(child) = self.children.get_mut(name) {
            if i64::from(child.id()) == i64::from(record.pid) {
                match child.try_wait() {
                    Ok(None) => return true,
                    Ok(Some(_)) | Err(_) => {
                        self.children.remove(name);
                        return false;
                    }
                }
            }
        }
        process_is_alive(record.pid, record.start_ticks)
    }

    fn info(&mut self, name: &str) -> Result<DomainInfo> {
        let (_, definition) = self.definition(name)?;
        let status = self.status(name)?;
        Ok(DomainInfo {
            name: definition.name,
            uuid: definition.uuid,
            state: status.state(),
            active: status.running.is_some(),
            persistent: true,
            vcpus: definition.vcpus,
            memory_kib: definition.memory_kib,
            max_memory_kib: definition.max_memory_kib,
        })
    }

    fn list(&mut self) -> Result<Vec<DomainInfo>> {
        let directory = self.config.state_dir.join("domains");
        let entries = fs::read_dir(&directory).map_err(|error| Error::io("list definitions", &directory, error))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|error| Error::io("list definitions", &directory, error))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|name| name.strip_suffix(".xml")) else {
                continue;
            };
            if validate_domain_name(name).is_ok() {
                names.push(name.to_string());
            }
        }
        names.sort();
        names.iter().map(|name| self.info(name)).collect()
    }

    fn define(&mut self, xml: &str) -> Result<String> {
        let definition = DomainDefinition::parse(xml)?;
        let path = self.config.definition_path(&definition.name);
        write_atomically(&path, xml.as_bytes())?;
        Ok(definition.name)
    }

    fn start(&mut self, name: &str) -> Result<()> {
        self.definition(name)?;
        let status = self.status(name)?;
        if status.running.is_some() {
            return Err(Error::InvalidState { domain: name.to_string(), message: "already running".to_string() });
        }
        // Forget the previous run first: an agent dying between here and the pid file
        // leaves a plain "shut off", never a stale intent over a new process (which
        // would later hide a crash of the new boot).
        remove_if_present(&self.config.run_path(name, "stop"))?;
        remove_if_present(&self.config.run_path(name, "pid"))?;
        let boot_id = new_boot_id();
        let log_path = self.config.run_path(name, "log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|error| Error::io("open vm log", &log_path, error))?;
        let (program, leading_arguments) =
            self.config.vm_command.split_first().expect("checked non-empty at construction");
        let mut command = Command::new(program);
        command
            .args(leading_arguments)
            .arg("--storage-root")
            .arg(&self.config.storage_root)
            .args(["--host", &self.config.host, "--vm", name, "--boot-id", &boot_id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Its own process group: destroy kills the group, and the agent's own signals
        // (Ctrl-C in a terminal, a group kill of the agent) do not reach the VM.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().map_err(|error| Error::io("spawn vm", PathBuf::from(program), error))?;
        let pid = i32::try_from(child.id()).expect("pids fit in i32");
        let start_ticks = match process_start_ticks(pid) {
            Some(ticks) => ticks,
            None => {
                // Exited already (a broken binary): report, keep no state.
                let mut child = child;
                let exit = child.wait().ok();
                return Err(Error::InvalidState {
                    domain: name.to_string(),
                    message: format!("vm process exited at once ({exit:?}); see {}", log_path.display()),
                });
            }
        };
        let record = RunRecord { pid, start_ticks, boot_id: boot_id.clone(), started_unix_ms: unix_ms_now() };
        let pid_path = self.config.run_path(name, "pid");
        if let Err(error) = write_atomically(&pid_path, record.render().as_bytes()) {
            // Without a pid file nobody could find it again: do not leave it running.
            let _ = kill_vm_group(pid, Signal::KILL);
            let mut child = child;
            let _ = child.wait();
            return Err(error);
        }
        self.children.insert(name.to_string(), child);
        tracing::info!(domain = name, pid, boot_id, "lab vm started");
        Ok(())
    }

    /// Records the intent, signals the group; returns the record of the live process,
    /// or `None` when the VM had already crashed (nothing left to signal).
    fn signal_stop(&mut self, name: &str, intent: StopIntent) -> Result<Option<RunRecord>> {
        self.definition(name)?;
        let status = self.status(name)?;
        let not_running = || Error::InvalidState { domain: name.to_string(), message: "not running".to_string() };
        let Some(record) = status.record else {
            return Err(not_running());
        };
        if status.intent.is_some() && status.running.is_none() {
            // A stop that completed without its cleanup (the agent died in between).
            self.finish_stop(name)?;
            return Err(not_running());
        }
        let crashed = status.running.is_none();
        if crashed && intent == StopIntent::Shutdown {
            return Err(Error::InvalidState {
                domain: name.to_string(),
                message: "crashed; destroy it to acknowledge".to_string(),
            });
        }
        write_atomically(&self.config.run_path(name, "stop"), intent.as_str().as_bytes())?;
        if crashed {
            // Acknowledge the crash: the VM is now shut off by the driver's hand.
            self.finish_stop(name)?;
            return Ok(None);
        }
        let signal = match intent {
            StopIntent::Destroyed => Signal::KILL,
            StopIntent::Shutdown => Signal::TERM,
        };
        match kill_vm_group(record.pid, signal) {
            Ok(()) => {}
            // Gone between the check and the signal.
            Err(rustix::io::Errno::SRCH) => {}
            Err(error) => return Err(Error::io("signal vm", self.config.run_path(name, "pid"), error.into())),
        }
        Ok(Some(record))
    }

    /// The process is gone: forget it (the stop intent stays and names the reason).
    fn finish_stop(&mut self, name: &str) -> Result<()> {
        if let Some(mut child) = self.children.remove(name) {
            let _ = child.try_wait();
        }
        remove_if_present(&self.config.run_path(name, "pid"))
    }

    fn exited(&mut self, name: &str, record: &RunRecord) -> bool {
        !self.is_alive(name, record)
    }

    fn undefine(&mut self, name: &str) -> Result<()> {
        self.definition(name)?;
        let status = self.status(name)?;
        if status.running.is_some() {
            return Err(Error::InvalidState {
                domain: name.to_string(),
                message: "running; destroy it before undefining".to_string(),
            });
        }
        for extension in ["pid", "stop", "log"] {
            remove_if_present(&self.config.run_path(name, extension))?;
        }
        remove_if_present(&self.config.definition_path(name))
    }
}

#[async_trait::async_trait]
impl Hypervisor for LabDriver {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn supports_migration(&self) -> bool {
        false
    }

    async fn list(&self) -> Result<Vec<DomainInfo>> {
        self.blocking("list", |inner| inner.list()).await
    }

    async fn domain(&self, name: &str) -> Result<DomainInfo> {
        let name = name.to_string();
        self.blocking("domain info", move |inner| inner.info(&name)).await
    }

    async fn define(&self, xml: &str) -> Result<String> {
        let xml = xml.to_string();
        self.blocking("define", move |inner| inner.define(&xml)).await
    }

    async fn start(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.blocking("start", move |inner| inner.start(&name)).await
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        let owned_name = name.to_string();
        let call_timeout = self.call_timeout;
        self.blocking("destroy", move |inner| {
            let name = owned_name.as_str();
            let Some(record) = inner.signal_stop(name, StopIntent::Destroyed)? else {
                return Ok(());
            };
            // SIGKILL is not instant for a process blocked in I/O (a hung mount).
            let deadline = Instant::now() + call_timeout;
            while !inner.exited(name, &record) {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        operation: "destroy",
                        timeout_ms: u64::try_from(call_timeout.as_millis()).unwrap_or(u64::MAX),
                    });
                }
                std::thread::sleep(EXIT_POLL_INTERVAL);
            }
            inner.finish_stop(name)?;
            tracing::info!(domain = name, pid = record.pid, "lab vm destroyed");
            Ok(())
        })
        .await
    }

    async fn shutdown(&self, name: &str, request: ShutdownRequest) -> Result<ShutdownOutcome> {
        let owned_name = name.to_string();
        let Some(record) =
            self.blocking("shutdown", move |inner| inner.signal_stop(&owned_name, StopIntent::Shutdown)).await?
        else {
            return Ok(ShutdownOutcome::Graceful);
        };
        let deadline = tokio::time::Instant::now() + request.timeout;
        loop {
            let owned_name = name.to_string();
            let poll_record = record.clone();
            let exited = self
                .blocking("shutdown", move |inner| {
                    let exited = inner.exited(&owned_name, &poll_record);
                    if exited {
                        inner.finish_stop(&owned_name)?;
                    }
                    Ok(exited)
                })
                .await?;
            if exited {
                tracing::info!(domain = name, pid = record.pid, "lab vm shut down");
                return Ok(ShutdownOutcome::Graceful);
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(EXIT_POLL_INTERVAL).await;
        }
        let timeout_ms = u64::try_from(request.timeout.as_millis()).unwrap_or(u64::MAX);
        if !request.destroy_on_timeout {
            return Err(Error::ShutdownTimedOut { domain: name.to_string(), timeout_ms });
        }
        tracing::warn!(domain = name, timeout_ms, "graceful shutdown timed out; destroying");
        self.destroy(name).await?;
        Ok(ShutdownOutcome::Destroyed)
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.blocking("undefine", move |inner| inner.undefine(&name)).await
    }

    async fn migrate(&self, _name: &str, _request: &MigrateRequest) -> Result<()> {
        Err(Error::Unsupported { operation: "migrate", driver: DRIVER })
    }

    async fn domain_xml(&self, name: &str) -> Result<String> {
        let name = name.to_string();
        self.blocking("domain xml", move |inner| Ok(inner.definition(&name)?.0)).await
    }
}

/// SIGKILLs every live VM process group recorded under `state_dir` (lab teardown, test
/// cleanup). Returns the pids killed. Pid files are left for the next driver to see.
pub fn kill_all(state_dir: &Path) -> Vec<i32> {
    let mut killed = Vec::new();
    let Ok(entries) = fs::read_dir(state_dir.join("run")) else {
        return killed;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|extension| extension.to_str()) != Some("pid") {
            continue;
        }
        let Some(record) = fs::read_to_string(&path).ok().and_then(|text| RunRecord::parse(&text)) else {
            continue;
        };
        if process_is_alive(record.pid, record.start_ticks) && kill_vm_group(record.pid, Signal::KILL).is_ok() {
            killed.push(record.pid);
        }
    }
    killed
}

fn pid_of(pid: i32) -> Pid {
    Pid::from_raw(pid).expect("pid files hold positive pids")
}

/// Signals the process group of a VM: the group `start` made (its leader's pid). Never
/// group 0 or 1, never our own group (that would hit the agent and whoever started it,
/// e.g. an operator's shell or a test runner).
fn kill_vm_group(pid: i32, signal: Signal) -> std::result::Result<(), rustix::io::Errno> {
    let own_group = rustix::process::getpgrp();
    if pid <= 1 || pid == own_group.as_raw_nonzero().get() {
        return Err(rustix::io::Errno::PERM);
    }
    kill_process_group(pid_of(pid), signal)
}

/// Start time (clock ticks since boot) of a live, non-zombie process.
fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let after_command = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_command.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    let state = *fields.first()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn process_is_alive(pid: i32, start_ticks: u64) -> bool {
    process_start_ticks(pid) == Some(start_ticks)
}

fn new_boot_id() -> String {
    let value: u64 = rand::thread_rng().gen();
    format!("{value:016x}")
}

fn unix_ms_now() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(Error::io("read state file", path, error)),
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(Error::io("remove state file", path, error)),
    }
}

/// Write to a temporary file, fsync, rename: a crash leaves the old or the new content.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    // ".<file name>.tmp": unique per target file (vm1.pid and vm1.stop must not share
    // one), and hidden from the definition listing, which reads only "*.xml".
    let file_name = path.file_name().expect("state paths end in a file name").to_string_lossy();
    let temporary = path.with_file_name(format!(".{file_name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    };
    write().map_err(|error| Error::io("write state file", path, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parses_with_defaults_and_rejects_junk() {
        let config =
            LabConfig::from_uri("lab:/srv/shared?state=/var/lib/kvmha/lab&host=node1&vm_binary=/bin/true").unwrap();
        assert_eq!(config.storage_root, PathBuf::from("/srv/shared"));
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/kvmha/lab"));
        assert_eq!(config.host, "node1");
        assert_eq!(config.vm_command, vec![OsString::from("/bin/true")]);

        for uri in [
            "lab:relative?state=/s&vm_binary=/bin/true",
            "lab:/srv?vm_binary=/bin/true",
            "lab:/srv?state=relative&vm_binary=/bin/true",
            "lab:/srv?state=/s&state=/t&vm_binary=/bin/true",
            "lab:/srv?state=/s&colour=blue&vm_binary=/bin/true",
            "lab:/srv?state",
            "qemu:///system",
        ] {
            assert!(matches!(LabConfig::from_uri(uri), Err(Error::InvalidUri { .. })), "{uri}");
        }
    }

    #[test]
    fn run_record_round_trips() {
        let record =
            RunRecord { pid: 42, start_ticks: 123456, boot_id: "00ff".into(), started_unix_ms: 1_700_000_000_000 };
        assert_eq!(RunRecord::parse(&record.render()), Some(record));
        assert_eq!(RunRecord::parse("0 1 a 2"), None);
        assert_eq!(RunRecord::parse("1 1 a 2"), None, "pid 1: a group kill of it would signal everything");
        assert_eq!(RunRecord::parse("-7 1 a 2"), None);
        assert_eq!(RunRecord::parse("1 2 a"), None);
    }

    /// A stale or forged record never turns into a signal to every process (-1) or to the
    /// group of whoever runs the driver (an operator's shell, a test runner).
    #[test]
    fn vm_group_kills_refuse_init_and_our_own_group() {
        let own_group = rustix::process::getpgrp().as_raw_nonzero().get();
        assert_eq!(kill_vm_group(own_group, Signal::CONT), Err(rustix::io::Errno::PERM));
        assert_eq!(kill_vm_group(1, Signal::CONT), Err(rustix::io::Errno::PERM));
        assert_eq!(kill_vm_group(0, Signal::CONT), Err(rustix::io::Errno::PERM));
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let ticks = process_start_ticks(pid).expect("this process is alive");
        assert!(process_is_alive(pid, ticks));
        assert!(!process_is_alive(pid, ticks + 1));
    }
}
