//! `kvmha lab ...`: the lab's command line, kept in this crate so the kvmha binary
//! needs one enum variant and one match arm (`Lab(LabCommand)` → [`run`]), and the
//! lab's own tests run the same code through the `kvmha-lab-helper` binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvmha_hypervisor::lab::writer::{run_writer, WriterConfig};
use nix::sys::signal::Signal;

use crate::api::{ApiClient, Forwarder};
use crate::cluster::{Cluster, ClusterSpec};
use crate::error::{LabError, Result};
use crate::lab::{clean_stale_labs, wait_for, BmcProtocol, Lab, LabConfig, LabHandle, DEFAULT_BASE_DIR};
use crate::process::ProcessId;
use crate::runner::RunOptions;
use crate::scenario::{BmcKind, HostSpec, Profile, Scenario, ScenarioResult, VmDriver, VmSpec};
use crate::topology::{LabId, Network, Node};
use crate::NetSelector;

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Build a lab with a kvmha cluster in it (manager, one agent per host, two HA VMs
    /// per host) and keep it up until Ctrl-C or SIGTERM, then tear it down.
    Up {
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Timing profile of the manager and agents: fast, balanced or conservative.
        #[arg(long, default_value = "fast")]
        profile: String,
        /// HA VMs started on every host (hostN-vm1, ...).
        #[arg(long, default_value_t = 2)]
        vms_per_host: usize,
        /// Only the plumbing (namespaces, BMCs, storage), no manager, agents or VMs.
        #[arg(long)]
        no_cluster: bool,
        /// Silence after which an armed lab watchdog resets its host (default: the profile's).
        #[arg(long)]
        watchdog_timeout_ms: Option<u64>,
        #[arg(long, default_value = DEFAULT_BASE_DIR)]
        base_dir: PathBuf,
        /// A host whose BMC speaks Redfish (sushy-emulator) instead of IPMI; repeatable.
        #[arg(long = "redfish", value_name = "HOST")]
        redfish_hosts: Vec<String>,
        /// How VMs run: `process` (lab process VMs) or `libvirt` (real QEMU guests
        /// through a libvirtd per host; docs/lab.md).
        #[arg(long, default_value = "process")]
        vm_driver: String,
    },
    /// Run one scenario file (SCENARIOS.md): build, wait until steady, play the faults,
    /// check, tear down. Exit 0 passed, 1 a check failed, 2 the lab could not be built.
    Run {
        file: PathBuf,
        /// One JSON object on stdout, exactly as SCENARIOS.md specifies.
        #[arg(long)]
        json: bool,
        /// Keep the logs and the shared storage (every vms/VM/disk.log) in DIR.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_BASE_DIR)]
        base_dir: PathBuf,
    },
    /// List the labs on this machine: hosts (power, manager's view) and VMs.
    Status {
        #[arg(long, default_value = DEFAULT_BASE_DIR)]
        base_dir: PathBuf,
    },
    /// Tear a lab down (its owner is asked to stop), and clean labs of crashed runs.
    Down {
        /// The lab id (kh + 6 hex digits); without it only stale labs are cleaned.
        id: Option<String>,
        #[arg(long, default_value = DEFAULT_BASE_DIR)]
        base_dir: PathBuf,
    },
    /// Break a running lab: power-off | power-on | hang | resume | partition | heal |
    /// loss | bmc-fail | bmc-heal | agent-stop | agent-kill | vm-crash, e.g.
    /// `fault partition host2 mgmt`, `fault loss host1 mgmt 30`, `fault vm-crash host1-vm1`.
    Fault {
        action: String,
        /// The host (vm-crash: the VM).
        host: String,
        /// mgmt | storage | oob | all (partition, heal, loss).
        net: Option<String>,
        /// Share of packets dropped (loss).
        percent: Option<u8>,
        /// The lab id; may be left out when exactly one lab runs.
        #[arg(long)]
        lab: Option<String>,
        #[arg(long, default_value = DEFAULT_BASE_DIR)]
        base_dir: PathBuf,
    },
    /// Run one lab VM until killed: append `<unix_ms> <host> <vm> <boot_id> <seq>` to
    /// `STORAGE_DIR/vms/VM/disk.log` and fsync (the hypervisor crate's lab writer).
    #[command(hide = true)]
    VmWriter {
        /// The shared storage as mounted on this host.
        #[arg(long)]
        storage_dir: PathBuf,
        #[arg(long)]
        host: String,
        #[arg(long)]
        vm: String,
        /// Defaults to a fresh random id.
        #[arg(long)]
        boot_id: Option<String>,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
}

pub fn run(command: LabCommand) -> Result<()> {
    match command {
        LabCommand::Up {
            hosts,
            profile,
            vms_per_host,
            no_cluster,
            watchdog_timeout_ms,
            base_dir,
            redfish_hosts,
            vm_driver,
        } => {
            let profile = parse_profile(&profile)?;
            let vm_driver = match vm_driver.as_str() {
                "process" => VmDriver::Process,
                "libvirt" => VmDriver::Libvirt,
                other => return Err(LabError::Config(format!("--vm-driver {other:?}: expected process or libvirt"))),
            };
            let watchdog_timeout = match watchdog_timeout_ms {
                Some(ms) => Duration::from_millis(ms.max(1)),
                None => crate::cluster::profile_watchdog_timeout(profile),
            };
            let config = LabConfig {
                hosts,
                base_dir,
                watchdog_timeout,
                keep_in: None,
                boot_script: String::new(),
                redfish_hosts: redfish_hosts.into_iter().collect(),
            };
            up(config, (!no_cluster).then_some((profile, vms_per_host, vm_driver)))
        }
        LabCommand::Run { file, json, keep, base_dir } => {
            let code = run_file(&file, json, keep, base_dir);
            std::process::exit(code)
        }
        LabCommand::Status { base_dir } => status(&base_dir),
        LabCommand::Down { id, base_dir } => down(id.as_deref(), &base_dir),
        LabCommand::Fault { action, host, net, percent, lab, base_dir } => {
            let handle = find_lab(&base_dir, lab.as_deref())?;
            fault(&handle, &action, &host, net.as_deref(), percent)
        }
        LabCommand::VmWriter { storage_dir, host, vm, boot_id, interval_ms } => {
            let config = WriterConfig {
                storage_root: storage_dir,
                host,
                vm,
                boot_id: match boot_id {
                    Some(boot_id) => boot_id,
                    None => crate::lab::random_hex(8)?,
                },
                interval: Duration::from_millis(interval_ms.max(1)),
            };
            // Runs until killed, as a guest does; only a bad config returns.
            run_writer(&config, &AtomicBool::new(false))
                .map_err(|error| LabError::Config(format!("vm writer: {error}")))?;
            Ok(())
        }
    }
}

fn parse_profile(text: &str) -> Result<Profile> {
    match text {
        "fast" => Ok(Profile::Fast),
        "balanced" => Ok(Profile::Balanced),
        "conservative" => Ok(Profile::Conservative),
        other => Err(LabError::Config(format!("--profile: `{other}` is not one of fast, balanced, conservative"))),
    }
}

/// The kvmha binary the cluster runs: `$KVMHA_LAB_KVMHA`, else this executable.
fn kvmha_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KVMHA_LAB_KVMHA") {
        return Ok(PathBuf::from(path));
    }
    std::env::current_exe().map_err(|error| LabError::io("/proc/self/exe", error))
}

/// A flag set by SIGINT, SIGTERM or SIGHUP. The signals are caught, never blocked: a
/// blocked mask is inherited through fork and exec, and the agents and VMs the lab
/// starts must stop on SIGTERM like on a real host.
pub(crate) fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .map_err(|error| LabError::Config(format!("cannot handle signal {signal}: {error}")))?;
    }
    Ok(stop)
}

/// Waits until `stop` is set.
fn wait_for_stop(stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn up(config: LabConfig, cluster: Option<(Profile, usize, VmDriver)>) -> Result<()> {
    let stop = stop_flag()?;
    crate::lab::show_progress(true);
    let hosts = config.hosts;
    let redfish = config.redfish_hosts.clone();
    let lab = Lab::build(config)?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "lab {} up in {}", lab.id(), lab.dir().display());
    let _ = writeln!(
        out,
        "manager: ip netns exec {} ...   (mgmt {}, oob {})",
        lab.namespace(&Node::Manager),
        address(Node::Manager, Network::Mgmt),
        address(Node::Manager, Network::Oob),
    );
    for host in lab.host_names() {
        let bmc = lab.bmc(&host)?;
        let init = lab.dir().join("hosts").join(&host).join("init");
        let bmc_command = match bmc.protocol {
            BmcProtocol::Ipmi => format!(
                "ipmitool -I lanplus -C 3 -H {} -U {} -P $(cat {}) chassis power status",
                bmc.address,
                bmc.user,
                lab.dir().join("cluster/bmc").join(format!("{host}.password")).display()
            ),
            BmcProtocol::Redfish => format!("curl -L -u {}:PASSWORD {}/redfish/v1/Systems/{host}", bmc.user, bmc.url()),
        };
        let _ = writeln!(
            out,
            "{host}: mgmt {} | shell: nsenter -t $(cut -d' ' -f1 {}) -m -n -p bash | bmc (from the manager namespace): {bmc_command}",
            address(Node::Host(index_of(&host)), Network::Mgmt),
            init.display(),
        );
    }
    let _ = writeln!(out, "shared storage: {}", lab.storage_dir().display());
    let _ = out.flush();
    drop(out);
    let mut running = None;
    if let Some((profile, vms_per_host, vm_driver)) = cluster {
        let host_specs: Vec<HostSpec> = lab
            .host_names()
            .into_iter()
            .map(|name| HostSpec {
                bmc: if redfish.contains(&name) { BmcKind::Redfish } else { BmcKind::Ipmi },
                name,
                cpus: 4,
                memory_mb: 4096,
            })
            .collect();
        let spec = ClusterSpec { kvmha: kvmha_binary()?, profile, hosts: host_specs, watchdog: true, vm_driver };
        crate::lab::progress("manager: init and start; agents: join and start on every host");
        let cluster = Cluster::start(&lab, spec)?;
        crate::lab::progress("manager: the operator API answers");
        let forwarder = Forwarder::start(
            &lab.namespace(&Node::Manager),
            std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, crate::cluster::API_PORT)),
            crate::cluster::API_PORT,
        )?;
        let mut shown = usize::MAX;
        wait_for("every host Up", Duration::from_secs(120), || {
            let up = cluster.host_states().map_or(0, |states| states.values().filter(|state| *state == "Up").count());
            if up != shown {
                crate::lab::progress(&format!("agents joined and Up: {up}/{hosts}"));
                shown = up;
            }
            up == hosts
        })?;
        let vms_total = hosts * vms_per_host;
        let mut vms_started = 0;
        let mut vm_errors = Vec::new();
        for host in lab.host_names() {
            for number in 1..=vms_per_host {
                let vm = VmSpec {
                    name: format!("{host}-vm{number}"),
                    host: host.clone(),
                    ha: true,
                    priority: 0,
                    cpus: 1,
                    memory_mb: 256,
                    group: None,
                };
                match cluster.create_vm(&vm) {
                    Ok(()) => {
                        vms_started += 1;
                        crate::lab::progress(&format!(
                            "VMs started: {vms_started}/{vms_total} ({} on {host})",
                            vm.name
                        ));
                    }
                    Err(error) => {
                        crate::lab::progress(&format!("VM {} not started: {error}", vm.name));
                        vm_errors.push(format!("{}: {error}", vm.name));
                    }
                }
            }
        }
        let mut out = std::io::stdout().lock();
        let url = forwarder.url();
        let token = cluster.operator_token().to_string();
        let _ = writeln!(out, "\nkvmha is running: {hosts} hosts, profile {}", crate::cluster::profile_name(profile));
        let _ = writeln!(out, "  API (and dashboard): {url}");
        let _ = writeln!(out, "  operator token:      {token}");
        let _ = writeln!(out, "  try: export KVMHA_MANAGER={url} KVMHA_TOKEN={token}");
        let _ = writeln!(out, "       kvmha host list; kvmha vm list; kvmha events --follow");
        for error in &vm_errors {
            let _ = writeln!(out, "  VM not created: {error}");
        }
        let _ = writeln!(out, "  break it: kvmha lab fault power-off host1   (docs/quickstart.md)");
        let _ = writeln!(out, "  Ctrl-C tears everything down.");
        let _ = out.flush();
        running = Some((cluster, forwarder));
    } else {
        // Whoever started us may have stopped reading: never panic on a closed stdout.
        let _ = writeln!(std::io::stdout(), "break it: kvmha lab fault power-off host1 | Ctrl-C tears it down");
    }
    wait_for_stop(&stop);
    eprintln!("kvmha lab: stopping, tearing {} down", lab.id());
    drop(running);
    lab.teardown()
}

/// `kvmha lab run FILE`: the exit code of SCENARIOS.md (0 passed, 1 failed, 2 not built).
fn run_file(file: &Path, json: bool, keep: Option<PathBuf>, base_dir: PathBuf) -> i32 {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(error) => {
            eprintln!("kvmha lab run: {}: {error}", file.display());
            return 2;
        }
    };
    let scenario = match Scenario::parse(&text) {
        Ok(scenario) => scenario,
        Err(error) => {
            eprintln!("kvmha lab run: {}: {error}", file.display());
            return 2;
        }
    };
    let kvmha = match kvmha_binary() {
        Ok(kvmha) => kvmha,
        Err(error) => {
            eprintln!("kvmha lab run: {error}");
            return 2;
        }
    };
    let stop = match stop_flag() {
        Ok(stop) => stop,
        Err(error) => {
            eprintln!("kvmha lab run: {error}");
            return 2;
        }
    };
    let options = RunOptions { kvmha, base_dir, keep, verbose: true };
    match crate::runner::run(&scenario, &options, &stop) {
        Ok(result) => {
            if json {
                println!("{}", result.to_json());
            } else {
                print_result(&result);
            }
            result.exit_code()
        }
        Err(error) => {
            eprintln!("kvmha lab run: {}: {error}", scenario.name);
            2
        }
    }
}

fn print_result(result: &ScenarioResult) {
    let mut out = std::io::stdout().lock();
    let verdict = if result.passed { "PASSED" } else { "FAILED" };
    let _ = writeln!(out, "{verdict}: {}", result.scenario);
    for check in &result.checks {
        let mark = if check.passed { "ok  " } else { "FAIL" };
        let _ = writeln!(out, "  [{mark}] {}: {}", check.name, check.detail);
    }
    if !result.recovery_ms.is_empty() {
        let parts: Vec<String> = result.recovery_ms.iter().map(|(vm, ms)| format!("{vm} {ms} ms")).collect();
        let _ = writeln!(out, "  recovery: {}", parts.join(", "));
    }
    let states: Vec<String> = result.final_state.iter().map(|(host, state)| format!("{host} {state}")).collect();
    let _ = writeln!(out, "  hosts at the end: {}", states.join(", "));
    let _ = writeln!(out, "  fenced: {}; {} audit events", result.fenced.join(", "), result.events);
}

/// `kvmha-lab-vm`, the lab VM, when kvmha is called by that name (the lab links it):
/// `--storage-root R --host H --vm V --boot-id B`, as the lab driver runs it. SIGTERM
/// or SIGINT finishes the current line and exits 0 (a graceful shutdown); SIGKILL is
/// a destroy.
pub fn lab_vm_main() -> std::process::ExitCode {
    #[derive(Debug, clap::Parser)]
    #[command(name = "kvmha-lab-vm")]
    struct Arguments {
        #[arg(long)]
        storage_root: PathBuf,
        #[arg(long)]
        host: String,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        boot_id: String,
    }
    let arguments = <Arguments as clap::Parser>::parse();
    let stop = match stop_flag() {
        Ok(stop) => stop,
        Err(error) => {
            eprintln!("kvmha-lab-vm: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let config = WriterConfig {
        storage_root: arguments.storage_root,
        host: arguments.host,
        vm: arguments.vm,
        boot_id: arguments.boot_id,
        interval: kvmha_hypervisor::lab::writer::WRITE_INTERVAL,
    };
    match run_writer(&config, &stop) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvmha-lab-vm: {error}");
            std::process::ExitCode::from(2)
        }
    }
}

fn address(node: Node, network: Network) -> String {
    node.address(network).map(|address| address.to_string()).unwrap_or_default()
}

fn index_of(host: &str) -> usize {
    crate::topology::host_index(host).unwrap_or(0)
}

/// Labs under `base_dir`, live or stale.
fn lab_dirs(base_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(base_dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|entry| entry.file_name().to_str().and_then(LabId::parse).is_some())
        .map(|entry| entry.path())
        .collect();
    dirs.sort();
    dirs
}

/// The lab named `id`, or the only live one.
pub fn find_lab(base_dir: &Path, id: Option<&str>) -> Result<LabHandle> {
    if let Some(id) = id {
        let id = LabId::parse(id).ok_or_else(|| LabError::Config(format!("`{id}` is not a lab id")))?;
        return LabHandle::open(&base_dir.join(id.as_str()));
    }
    let live: Vec<LabHandle> = lab_dirs(base_dir)
        .iter()
        .filter_map(|dir| LabHandle::open(dir).ok())
        .filter(|handle| handle.owner_alive())
        .collect();
    match <[LabHandle; 1]>::try_from(live) {
        Ok([handle]) => Ok(handle),
        Err(live) => Err(LabError::Config(format!("{} labs are running; name one with --lab", live.len()))),
    }
}

fn status(base_dir: &Path) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for dir in lab_dirs(base_dir) {
        let Ok(handle) = LabHandle::open(&dir) else {
            continue;
        };
        let owner = if handle.owner_alive() { "up" } else { "stale" };
        let _ = writeln!(out, "lab {} {owner} ({})", handle.id(), dir.display());
        let api = cluster_api(&handle);
        let host_states = api.as_ref().and_then(|api| api.get_json("/v1/hosts").ok());
        let vms = api.as_ref().and_then(|api| api.get_json("/v1/vms").ok());
        for host in handle.host_names() {
            let power = match handle.power_state(&host)? {
                crate::PowerState::On => "on",
                crate::PowerState::Off => "off",
            };
            let state = host_states
                .as_ref()
                .and_then(|hosts| hosts.as_array()?.iter().find(|row| row["name"] == host.as_str()).cloned())
                .and_then(|row| row["state"].as_str().map(str::to_string))
                .unwrap_or_else(|| "-".to_string());
            let _ = writeln!(out, "  {host:<8} power {power:<3}  manager says {state}");
        }
        for vm in vms.as_ref().and_then(|vms| vms.as_array().cloned()).unwrap_or_default() {
            let _ = writeln!(
                out,
                "  vm {:<14} {:<16} on {}",
                vm["name"].as_str().unwrap_or("?"),
                vm["state"].as_str().unwrap_or("?"),
                vm["host"].as_str().unwrap_or("-"),
            );
        }
        if api.is_some() && host_states.is_none() {
            let _ = writeln!(out, "  (the manager does not answer)");
        }
    }
    Ok(())
}

/// The operator API of the cluster in a lab, if the lab runs one.
fn cluster_api(handle: &LabHandle) -> Option<ApiClient> {
    let token = std::fs::read_to_string(handle.dir().join("cluster/manager/operator.token")).ok()?;
    Some(ApiClient::new(
        &handle.namespace(&Node::Manager),
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, crate::cluster::API_PORT)),
        token.trim(),
    ))
}

fn down(id: Option<&str>, base_dir: &Path) -> Result<()> {
    if let Some(id) = id {
        let handle = find_lab(base_dir, Some(id))?;
        if let Some(owner) = ProcessId::read(&handle.dir().join("owner")).filter(|owner| owner.is_alive()) {
            // The owner tears down what it started and reaps it; we only ask.
            owner.signal(Signal::SIGTERM)?;
            wait_for(&format!("lab {id} to go down"), Duration::from_secs(60), || !handle.dir().exists())?;
        }
    }
    for cleaned in clean_stale_labs(base_dir)? {
        println!("cleaned stale lab {cleaned}");
    }
    Ok(())
}

fn net_argument(action: &str, net: Option<&str>) -> Result<Option<NetSelector>> {
    net.map(|text| {
        NetSelector::parse(text)
            .ok_or_else(|| LabError::Config(format!("{action}: `{text}` is not one of mgmt, storage, oob, all")))
    })
    .transpose()
}

/// Plays one fault against a running lab.
pub fn fault(handle: &LabHandle, action: &str, host: &str, net: Option<&str>, percent: Option<u8>) -> Result<()> {
    let nets = net_argument(action, net)?;
    let need_nets = || nets.ok_or_else(|| LabError::Config(format!("{action} needs a network")));
    match action {
        "power-off" => handle.power_off(host),
        "power-on" => handle.request_power_on(host),
        "hang" => handle.hang(host),
        "resume" => handle.resume(host),
        "partition" => handle.partition(host, need_nets()?),
        "heal" => handle.heal(host, nets),
        "loss" => {
            let percent = percent.ok_or_else(|| LabError::Config("loss needs a percentage".to_string()))?;
            handle.loss(host, need_nets()?, percent)
        }
        "bmc-fail" => handle.bmc_fail(host),
        "bmc-heal" => handle.bmc_heal(host),
        "agent-stop" => Cluster::signal_agent(handle, host, Signal::SIGTERM),
        "agent-kill" => Cluster::signal_agent(handle, host, Signal::SIGKILL),
        // Here `host` names the VM.
        "vm-crash" => Cluster::crash_vm(handle, host).map(|on| println!("killed {host} on {on}")),
        other => Err(LabError::Config(format!("unknown fault `{other}`"))),
    }
}
