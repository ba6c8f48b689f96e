//! `kvmha lab ...`: the lab's command line, kept in this crate so the kvmha binary
//! needs one enum variant and one match arm (`Lab(LabCommand)` → [`run`]), and the
//! lab's own tests run the same code through the `kvmha-lab-helper` binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kvmha_hypervisor::lab::writer::{run_writer, WriterConfig};
use nix::sys::signal::{SigSet, Signal};

use crate::error::{LabError, Result};
use crate::lab::{clean_stale_labs, wait_for, BmcProtocol, Lab, LabConfig, LabHandle, DEFAULT_BASE_DIR};
use crate::process::ProcessId;
use crate::topology::{LabId, Network, Node};
use crate::NetSelector;

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Build a lab and keep it up until Ctrl-C or SIGTERM, then tear it down.
    Up {
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Silence after which an armed lab watchdog resets its host.
        #[arg(long, default_value_t = 10_000)]
        watchdog_timeout_ms: u64,
        #[arg(long, default_value = DEFAULT_BASE_DIR)]
        base_dir: PathBuf,
        /// A host whose BMC speaks Redfish (sushy-emulator) instead of IPMI; repeatable.
        #[arg(long = "redfish", value_name = "HOST")]
        redfish_hosts: Vec<String>,
    },
    /// List the labs on this machine with their hosts' power state.
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
    /// loss | bmc-fail | bmc-heal, e.g. `fault partition host2 mgmt`, `fault loss host1 mgmt 30`.
    Fault {
        action: String,
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
        LabCommand::Up { hosts, watchdog_timeout_ms, base_dir, redfish_hosts } => up(LabConfig {
            hosts,
            base_dir,
            watchdog_timeout: Duration::from_millis(watchdog_timeout_ms.max(1)),
            keep_in: None,
            boot_script: String::new(),
            redfish_hosts: redfish_hosts.into_iter().collect(),
        }),
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

fn up(config: LabConfig) -> Result<()> {
    // Blocked before any thread or child exists, so the signals wait for sigwait
    // below (threads inherit the mask; std resets it in children).
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals.thread_block().map_err(|errno| LabError::Config(format!("cannot block signals: {errno}")))?;
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
                "ipmitool -I lanplus -C 3 -H {} -U {} -P {} chassis power status",
                bmc.address, bmc.user, bmc.password
            ),
            BmcProtocol::Redfish => {
                format!("curl -L -u {}:{} {}/redfish/v1/Systems/{host}", bmc.user, bmc.password, bmc.url())
            }
        };
        let _ = writeln!(
            out,
            "{host}: mgmt {} | shell: nsenter -t $(cut -d' ' -f1 {}) -m -n -p bash | bmc: {bmc_command}",
            address(Node::Host(index_of(&host)), Network::Mgmt),
            init.display(),
        );
    }
    let _ = writeln!(out, "shared storage: {}", lab.storage_dir().display());
    let _ = writeln!(out, "break it: kvmha lab fault power-off host1 | Ctrl-C tears it down");
    let _ = out.flush();
    drop(out);
    let signal = signals.wait().map_err(|errno| LabError::Config(format!("waiting for a signal: {errno}")))?;
    eprintln!("kvmha lab: {signal}, tearing {} down", lab.id());
    lab.teardown()
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
        let mut line = format!("{} {owner}", handle.id());
        for host in handle.host_names() {
            let power = match handle.power_state(&host)? {
                crate::PowerState::On => "on",
                crate::PowerState::Off => "off",
            };
            line.push_str(&format!(" {host}={power}"));
        }
        let _ = writeln!(out, "{line}");
    }
    Ok(())
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
        other => Err(LabError::Config(format!("unknown fault `{other}`"))),
    }
}
