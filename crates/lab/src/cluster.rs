//! The kvmha cluster inside a lab: the manager in the manager namespace, one agent
//! per host, VMs created through the manager's operator API.
//!
//! Files, under the lab's state directory (so `--keep` keeps them):
//!
//! ```text
//! cluster/manager/           manager init's output: manager.toml, CA, tokens, manager.db
//! cluster/manager.log        the manager's log (every run appends)
//! cluster/bmc/hostN.password the BMC password the manager reads (0600, never logged)
//! cluster/join.token         the join token the hosts' boot scripts read (0600)
//! cluster/bin/kvmha-lab-vm   the lab VM: a link to kvmha, which runs the VM writer
//!                            when called by that name
//! hosts/hostN/boot.sh        joins once, then runs agent.sh
//! hosts/hostN/agent.sh       runs the agent (also `agent-start`)
//! hosts/hostN/agent-extra.toml  pools and watchdog, appended to agent.toml after the join
//! hosts/hostN/local/         the host's own disk: agent/ (identity, agent.toml) and
//!                            vmstate/ (the lab driver's definitions; run/ is cleared
//!                            at every boot, as /run is)
//! hosts/hostN/agent.log      the agent's log
//! ```
//!
//! With `vm_driver = "libvirt"` (see [`crate::guest`]) also:
//!
//! ```text
//! view/                      empty here; inside each host a tmpfs of its own with
//!                            `storage` (-> its mount) and `clock.sock` (-> its clock)
//! hosts/hostN/clock.sock     the host's clock server (a thread of the lab process)
//! hosts/hostN/libvirt-sock/  the host's libvirtd sockets (the agent's URI)
//! hosts/hostN/libvirtd.log   the host's libvirtd log
//! hosts/hostN/local/libvirt/ bind-mounted over /etc/libvirt, /var/lib/libvirt,
//!                            /var/cache/libvirt, /var/log/libvirt and /run/libvirt
//!                            (run/ is cleared at every boot)
//! ```
//!
//! The manager reads the pool's heartbeats at the storage server's side
//! (`<lab>/storage`): a manager on the storage network whose link is never cut
//! (the scenarios cut hosts, not the manager). See docs/lab.md.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::api::ApiClient;
use crate::error::{LabError, Result};
use crate::guest::{ClockServer, GuestImage};
use crate::lab::{wait_for, BmcProtocol, Lab, LabHandle};
use crate::process::ProcessId;
use crate::scenario::{BmcKind, HostSpec, Profile, VmDriver, VmSpec};
use crate::topology::{host_index, Network, Node};

/// The manager's agent listener (mgmt) and operator API (loopback of its namespace).
pub const MANAGER_PORT: u16 = 7443;
pub const API_PORT: u16 = 7444;
/// Each agent's command listener.
pub const AGENT_PORT: u16 = 7445;
/// The pool every host and the manager use: the lab's shared storage.
pub const POOL_NAME: &str = "shared";
/// The name under which kvmha runs as a lab VM (see [`lab_vm_main`](crate::cli::lab_vm_main)).
pub const LAB_VM_NAME: &str = "kvmha-lab-vm";

/// What cluster to run inside a lab.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The kvmha binary (manager, agents and lab VMs all run it).
    pub kvmha: PathBuf,
    pub profile: Profile,
    pub hosts: Vec<HostSpec>,
    /// Agents open the lab watchdog and self-fence; the manager may use lease expiry.
    pub watchdog: bool,
    /// Lab process VMs, or real QEMU guests through a libvirtd per host.
    pub vm_driver: VmDriver,
}

pub fn profile_name(profile: Profile) -> &'static str {
    match profile {
        Profile::Fast => "fast",
        Profile::Balanced => "balanced",
        Profile::Conservative => "conservative",
    }
}

/// The watchdog timeout of a timing profile, which the lab watchdogs use.
pub fn profile_watchdog_timeout(profile: Profile) -> Duration {
    let core = match profile {
        Profile::Fast => kvmha_core::Profile::Fast,
        Profile::Balanced => kvmha_core::Profile::Balanced,
        Profile::Conservative => kvmha_core::Profile::Conservative,
    };
    Duration::from_millis(core.settings().watchdog_timeout_ms.unwrap_or(10_000))
}

/// A running cluster; [`Cluster::stop`] (or Drop) kills the manager. Agents and VMs
/// live inside the hosts and go with the lab.
#[derive(Debug)]
pub struct Cluster {
    spec: ClusterSpec,
    dir: PathBuf,
    lab_dir: PathBuf,
    manager_namespace: String,
    manager: Mutex<Option<Child>>,
    operator_token: String,
    api: ApiClient,
    storage_dir: PathBuf,
    /// The guest image (`vm_driver = "libvirt"` only).
    guest: Option<GuestImage>,
    /// One per host (`vm_driver = "libvirt"` only); held so they answer until the
    /// cluster is dropped.
    _clocks: Vec<ClockServer>,
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| LabError::io(path, error))?;
    std::io::Write::write_all(&mut file, contents.as_bytes()).map_err(|error| LabError::io(path, error))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|error| LabError::io(path, error))
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|error| LabError::io(path, error))
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|error| LabError::io(path, error))
}

/// Single-quotes `text` for bash.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn address(node: Node, network: Network) -> Ipv4Addr {
    node.address(network).expect("the address plan covers this node and network")
}

impl Cluster {
    /// Initialises the manager, starts it, writes every host's boot script and runs it
    /// (the agents join and start). Returns once the operator API answers; hosts come
    /// `Up` on their own (see [`Cluster::wait_hosts_up`]).
    pub fn start(lab: &Lab, spec: ClusterSpec) -> Result<Cluster> {
        let lab_dir = lab.dir().to_path_buf();
        let dir = lab_dir.join("cluster");
        create_dir(&dir.join("bmc"))?;
        create_dir(&dir.join("bin"))?;
        let vm_link = dir.join("bin").join(LAB_VM_NAME);
        std::os::unix::fs::symlink(&spec.kvmha, &vm_link).map_err(|error| LabError::io(&vm_link, error))?;
        let manager_dir = dir.join("manager");
        let mgmt = address(Node::Manager, Network::Mgmt);
        let mut init = Command::new(&spec.kvmha);
        init.args(["manager", "init", "--dir"])
            .arg(&manager_dir)
            .args(["--listen", &SocketAddr::from((mgmt, MANAGER_PORT)).to_string()])
            .args(["--api-listen", &SocketAddr::from((Ipv4Addr::LOCALHOST, API_PORT)).to_string()])
            .args(["--profile", profile_name(spec.profile)]);
        let output = crate::process::run(&mut init, None, Duration::from_secs(60))?;
        let join_token = output.lines().last().unwrap_or("").trim().to_string();
        if !join_token.starts_with("kvmha1.") {
            return Err(LabError::Command {
                command: "kvmha manager init".to_string(),
                detail: "its last line is not a join token".to_string(),
            });
        }
        write_private(&dir.join("join.token"), &join_token)?;
        let operator_token_path = manager_dir.join("operator.token");
        let operator_token = std::fs::read_to_string(&operator_token_path)
            .map_err(|error| LabError::io(&operator_token_path, error))?
            .trim()
            .to_string();
        let mut hosts = toml::Table::new();
        for host in &spec.hosts {
            hosts.insert(host.name.clone(), toml::Value::Table(Self::manager_host_entry(lab, &dir, host, &spec)?));
        }
        let config_path = manager_dir.join("manager.toml");
        let text = std::fs::read_to_string(&config_path).map_err(|error| LabError::io(&config_path, error))?;
        let mut config: toml::Table =
            text.parse().map_err(|error| LabError::Config(format!("{}: {error}", config_path.display())))?;
        config.insert("hosts".to_string(), toml::Value::Table(hosts));
        let mut pools = toml::Table::new();
        let mut pool = toml::Table::new();
        pool.insert("path".to_string(), toml::Value::String(lab.storage_dir().display().to_string()));
        pools.insert(POOL_NAME.to_string(), toml::Value::Table(pool));
        config.insert("pools".to_string(), toml::Value::Table(pools));
        let rendered = toml::to_string_pretty(&config).map_err(|error| LabError::Config(error.to_string()))?;
        write_file(&config_path, &format!("# Generated by kvmha lab from `kvmha manager init`.\n{rendered}"))?;
        let api = ApiClient::new(
            &lab.namespace(&Node::Manager),
            SocketAddr::from((Ipv4Addr::LOCALHOST, API_PORT)),
            &operator_token,
        );
        let (guest, clocks) = match spec.vm_driver {
            VmDriver::Process => (None, Vec::new()),
            VmDriver::Libvirt => {
                let image = crate::guest::prepare_image(&crate::guest::cache_dir())?;
                create_dir(&lab_dir.join("view"))?;
                let mut clocks = Vec::new();
                for host in &spec.hosts {
                    let host_dir = lab_dir.join("hosts").join(&host.name);
                    let etc = host_dir.join("local").join("libvirt").join("etc");
                    create_dir(&etc)?;
                    create_dir(&host_dir.join("libvirt-sock"))?;
                    write_file(
                        &etc.join("libvirtd.conf"),
                        &crate::guest::libvirtd_conf(&host_dir.join("libvirt-sock")),
                    )?;
                    write_file(&etc.join("qemu.conf"), crate::guest::QEMU_CONF)?;
                    clocks.push(ClockServer::start(&host_dir.join("clock.sock"), &host.name)?);
                }
                (Some(image), clocks)
            }
        };
        let cluster = Cluster {
            spec,
            dir,
            lab_dir,
            manager_namespace: lab.namespace(&Node::Manager),
            manager: Mutex::new(None),
            operator_token,
            api,
            storage_dir: lab.storage_dir(),
            guest,
            _clocks: clocks,
        };
        cluster.start_manager()?;
        for host in &cluster.spec.hosts {
            cluster.write_host_scripts(lab, host)?;
            lab.run_boot_script(&host.name)?;
        }
        Ok(cluster)
    }

    fn manager_host_entry(lab: &Lab, dir: &Path, host: &HostSpec, spec: &ClusterSpec) -> Result<toml::Table> {
        let mut entry = toml::Table::new();
        entry.insert("pools".to_string(), toml::Value::Array(vec![toml::Value::String(POOL_NAME.to_string())]));
        entry.insert("watchdog".to_string(), toml::Value::Boolean(spec.watchdog));
        if host.bmc != BmcKind::None {
            let endpoint = lab.bmc(&host.name)?;
            let password_file = dir.join("bmc").join(format!("{}.password", host.name));
            write_private(&password_file, &endpoint.password)?;
            let mut bmc = toml::Table::new();
            let (kind, address) = match endpoint.protocol {
                BmcProtocol::Ipmi => ("ipmi", format!("{}:{}", endpoint.address, endpoint.port)),
                BmcProtocol::Redfish => ("redfish", endpoint.url()),
            };
            bmc.insert("kind".to_string(), toml::Value::String(kind.to_string()));
            bmc.insert("address".to_string(), toml::Value::String(address));
            bmc.insert("username".to_string(), toml::Value::String(endpoint.user.clone()));
            bmc.insert("password_file".to_string(), toml::Value::String(password_file.display().to_string()));
            if endpoint.protocol == BmcProtocol::Redfish {
                // The lab's Redfish BMCs speak plain HTTP on the out-of-band network.
                bmc.insert("insecure".to_string(), toml::Value::Boolean(true));
            }
            entry.insert("bmc".to_string(), toml::Value::Table(bmc));
        }
        Ok(entry)
    }

    /// The hypervisor URI of a host's agent: the lab process driver on the host's mount,
    /// or the host's own libvirtd.
    fn hypervisor_uri(&self, lab: &LabHandle, host: &str) -> Result<String> {
        let host_dir = self.lab_dir.join("hosts").join(host);
        if self.spec.vm_driver == VmDriver::Libvirt {
            return Ok(crate::guest::libvirt_uri(&host_dir.join("libvirt-sock")));
        }
        Ok(format!(
            "lab:{}?state={}&host={host}&vm_binary={}",
            lab.host_mount_dir(host)?.display(),
            host_dir.join("local").join("vmstate").display(),
            self.dir.join("bin").join(LAB_VM_NAME).display(),
        ))
    }

    fn write_host_scripts(&self, lab: &Lab, host: &HostSpec) -> Result<()> {
        let index = host_index(&host.name).ok_or_else(|| LabError::UnknownHost(host.name.clone()))?;
        let host_dir = self.lab_dir.join("hosts").join(&host.name);
        let local = host_dir.join("local");
        let agent_dir = local.join("agent");
        let kvmha = quote(&self.spec.kvmha.display().to_string());
        let mut extra = format!(
            "\n# Added by kvmha lab after the join.\n[[pools]]\nname = \"{POOL_NAME}\"\npath = \"{}\"\n",
            lab.host_mount_dir(&host.name)?.display()
        );
        if self.spec.watchdog {
            extra.push_str(&format!(
                "\n[watchdog]\ndevice = \"{}\"\narmed = true\n",
                lab.watchdog_path(&host.name)?.display()
            ));
        }
        write_file(&host_dir.join("agent-extra.toml"), &extra)?;
        let agent_script = format!(
            "# Generated by kvmha lab: {name}'s agent (boot.sh runs it; so does `agent-start`).\n\
             exec env KVMHA_LOG=${{KVMHA_LOG:-info}} {kvmha} agent run --config {config} >> {log} 2>&1\n",
            name = host.name,
            config = quote(&agent_dir.join("agent.toml").display().to_string()),
            log = quote(&host_dir.join("agent.log").display().to_string()),
        );
        write_file(&host_dir.join("agent.sh"), &agent_script)?;
        let libvirt = match self.spec.vm_driver {
            VmDriver::Process => String::new(),
            VmDriver::Libvirt => self.libvirt_boot(lab, &host.name)?,
        };
        let manager_url = format!("https://{}:{MANAGER_PORT}", address(Node::Manager, Network::Mgmt));
        let advertise = SocketAddr::from((address(Node::Host(index), Network::Mgmt), AGENT_PORT));
        let boot = format!(
            r#"# Generated by kvmha lab: {name}'s boot, run inside the host at every power-on.
set -u
local={local}
mkdir -p "$local/vmstate"
# /run does not survive a power cycle: no VM of an earlier boot runs now.
rm -rf "$local/vmstate/run"
{libvirt}if [ ! -s "$local/agent/agent.toml" ]; then
  # Join once; the manager may not be reachable yet.
  until KVMHA_JOIN_TOKEN="$(cat {token})" {kvmha} agent join --manager {manager_url} --name {name} \
      --dir "$local/agent" --listen 0.0.0.0:{AGENT_PORT} --advertise {advertise} \
      --hypervisor {uri} --cpus {cpus} --memory-mb {memory} >> {log} 2>&1; do
    sleep 1
  done
  cat {extra} >> "$local/agent/agent.toml"
fi
exec bash {agent_script}
"#,
            name = host.name,
            local = quote(&local.display().to_string()),
            token = quote(&self.dir.join("join.token").display().to_string()),
            uri = quote(&self.hypervisor_uri(lab, &host.name)?),
            cpus = host.cpus,
            memory = host.memory_mb,
            log = quote(&host_dir.join("agent.log").display().to_string()),
            extra = quote(&host_dir.join("agent-extra.toml").display().to_string()),
            agent_script = quote(&host_dir.join("agent.sh").display().to_string()),
        );
        create_dir(&agent_dir)?;
        lab.set_boot_script(&host.name, &boot)
    }

    /// The part of a host's boot.sh that starts its libvirtd (before the agent): the
    /// host's view of the lab (same paths on every host), libvirt's directories bound
    /// from the host's own disk, libvirtd, and a wait for its socket.
    fn libvirt_boot(&self, lab: &LabHandle, host: &str) -> Result<String> {
        let host_dir = self.lab_dir.join("hosts").join(host);
        let libvirt = host_dir.join("local").join("libvirt");
        let socket = host_dir.join("libvirt-sock");
        Ok(format!(
            r#"# The lab's view from this host: the same paths on every host, for the guests.
view={view}
mount -t tmpfs -o size=64k,mode=0755 kvmha-lab-view "$view"
ln -s {mount} "$view/storage"
ln -s {clock} "$view/clock.sock"
# libvirt's directories on this host's own disk; /run/libvirt does not survive a power cycle.
libvirt={libvirt}
rm -rf "$libvirt/run" {socket}/*
for dir in lib cache log run; do mkdir -p "$libvirt/$dir"; done
mkdir -p /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /run/libvirt
mount --bind "$libvirt/etc" /etc/libvirt
mount --bind "$libvirt/lib" /var/lib/libvirt
mount --bind "$libvirt/cache" /var/cache/libvirt
mount --bind "$libvirt/log" /var/log/libvirt
mount --bind "$libvirt/run" /run/libvirt
libvirtd --pid-file "$libvirt/run/libvirtd.pid" -f /etc/libvirt/libvirtd.conf >> {log} 2>&1 &
# The agent opens the hypervisor at start: wait for libvirtd (its log says why not).
for _ in $(seq 300); do [ -S {socket}/libvirt-sock ] && break; sleep 0.1; done
[ -S {socket}/libvirt-sock ] || echo "kvmha-lab: libvirtd did not start; see {log}"
"#,
            view = quote(&self.lab_dir.join("view").display().to_string()),
            mount = quote(&lab.host_mount_dir(host)?.display().to_string()),
            clock = quote(&host_dir.join("clock.sock").display().to_string()),
            libvirt = quote(&libvirt.display().to_string()),
            socket = quote(&socket.display().to_string()),
            log = quote(&host_dir.join("libvirtd.log").display().to_string()),
        ))
    }

    /// Starts `kvmha manager run` in the manager namespace and waits for its API.
    pub fn start_manager(&self) -> Result<()> {
        let log_path = self.dir.join("manager.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|error| LabError::io(&log_path, error))?;
        let log_clone = log.try_clone().map_err(|error| LabError::io(&log_path, error))?;
        // ip netns exec execs the program: the child is the manager itself.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.manager_namespace])
            .arg(&self.spec.kvmha)
            .args(["manager", "run", "--config"])
            .arg(self.dir.join("manager").join("manager.toml"))
            .env("KVMHA_LOG", std::env::var("KVMHA_LOG").unwrap_or_else(|_| "info".to_string()))
            .stdin(Stdio::null())
            .stdout(log_clone)
            .stderr(log)
            .spawn()
            .map_err(|error| LabError::Command {
                command: "kvmha manager run".to_string(),
                detail: error.to_string(),
            })?;
        *self.manager.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(child);
        wait_for("the manager's operator API to answer", Duration::from_secs(30), || {
            self.api.get("/v1/hosts").map(|response| response.is_success()).unwrap_or(false)
        })
    }

    /// SIGKILL of the manager (no goodbye, no flush): what a crash does.
    pub fn kill_manager(&self) -> Result<()> {
        let child = self.manager.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// `manager-restart`: SIGKILL, then a fresh start on the same database.
    pub fn restart_manager(&self) -> Result<()> {
        self.kill_manager()?;
        self.start_manager()
    }

    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    pub fn operator_token(&self) -> &str {
        &self.operator_token
    }

    /// The agent process of `host` (`kvmha agent run`), if it runs.
    pub fn agent_process(lab: &LabHandle, host: &str) -> Result<Option<ProcessId>> {
        Ok(lab.host_processes(host)?.into_iter().find(|process| {
            let words = cmdline(process.pid);
            words.iter().any(|word| word == "agent") && words.iter().any(|word| word == "run")
        }))
    }

    /// `agent-stop` (SIGTERM: a goodbye) or `agent-kill` (SIGKILL); waits until it is gone.
    pub fn signal_agent(lab: &LabHandle, host: &str, signal: Signal) -> Result<()> {
        let Some(agent) = Self::agent_process(lab, host)? else {
            return Err(LabError::NotReady { what: format!("an agent running on {host}"), timeout_ms: 0 });
        };
        agent.signal(signal)?;
        wait_for(&format!("the agent of {host} to exit"), Duration::from_secs(30), || !agent.is_alive())
    }

    /// `agent-start`: runs the host's agent script again.
    pub fn start_agent(&self, lab: &Lab, host: &str) -> Result<()> {
        if Self::agent_process(lab, host)?.is_some() {
            return Ok(());
        }
        let script = self.lab_dir.join("hosts").join(host).join("agent.sh");
        lab.spawn_in_host(host, &script, &[])
    }

    /// `vm-crash`: SIGKILL of the VM's process, wherever it runs. Returns its host.
    pub fn crash_vm(lab: &LabHandle, vm: &str) -> Result<String> {
        for host in lab.host_names() {
            for process in lab.host_processes(&host)? {
                let words = cmdline(process.pid);
                let is_lab_vm = words.windows(2).any(|pair| pair[0] == "--vm" && pair[1] == vm)
                    && words.first().is_some_and(|program| program.ends_with(LAB_VM_NAME));
                // QEMU as libvirt starts it: `-name guest=<vm>,debug-threads=on`.
                let is_guest = words.first().is_some_and(|program| program == crate::guest::EMULATOR)
                    && words
                        .windows(2)
                        .any(|pair| pair[0] == "-name" && pair[1].split(',').any(|part| part == format!("guest={vm}")));
                let is_vm = is_lab_vm || is_guest;
                if is_vm {
                    process.signal(Signal::SIGKILL)?;
                    return Ok(host);
                }
            }
        }
        Err(LabError::NotReady { what: format!("a running process of VM {vm}"), timeout_ms: 0 })
    }

    /// Creates a VM on its host through the operator API, started, and sets its HA.
    pub fn create_vm(&self, vm: &VmSpec) -> Result<()> {
        let xml = match &self.guest {
            None => kvmha_hypervisor::definition::lab_domain_xml(&vm.name, vm.cpus, vm.memory_mb),
            Some(image) => {
                crate::guest::create_disk(&self.storage_dir, &vm.name)?;
                crate::guest::domain_xml(&vm.name, vm.cpus, vm.memory_mb, image, &self.lab_dir.join("view"))
            }
        };
        self.api.post_ok("/v1/vms", &json!({ "host": vm.host, "xml": xml, "start": true }))?;
        if vm.ha {
            let mut body = json!({ "enabled": true, "priority": vm.priority });
            if let Some(group) = &vm.group {
                body["group"] = Value::String(group.clone());
            }
            self.api.post_ok(&format!("/v1/vms/{}/ha", vm.name), &body)?;
        }
        Ok(())
    }

    /// Host name → state, as the manager sees them now.
    pub fn host_states(&self) -> Result<BTreeMap<String, String>> {
        let hosts = self.api.get_json("/v1/hosts")?;
        Ok(name_to_field(&hosts, "state"))
    }

    /// VM name → (state, host), as the manager sees them now.
    pub fn vm_states(&self) -> Result<BTreeMap<String, (String, Option<String>)>> {
        let vms = self.api.get_json("/v1/vms")?;
        let mut states = BTreeMap::new();
        for vm in vms.as_array().into_iter().flatten() {
            let name = vm["name"].as_str().unwrap_or_default().to_string();
            let state = vm["state"].as_str().unwrap_or_default().to_string();
            states.insert(name, (state, vm["host"].as_str().map(str::to_string)));
        }
        Ok(states)
    }

    /// Every audit event so far, oldest first.
    pub fn events(&self) -> Result<Vec<Value>> {
        let mut events = Vec::new();
        let mut after = 0i64;
        loop {
            let page = self.api.get_json(&format!("/v1/events?after={after}"))?;
            let rows = page["events"].as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                return Ok(events);
            }
            after = page["last_id"].as_i64().unwrap_or(after);
            events.extend(rows);
        }
    }

    /// Kills the manager; the lab's teardown takes everything else (agents, libvirtds
    /// and QEMU die with their host's init; the clock servers with the cluster).
    pub fn stop(&self) {
        let _ = self.kill_manager();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn name_to_field(rows: &Value, field: &str) -> BTreeMap<String, String> {
    rows.as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            let name = row["name"].as_str().unwrap_or_default().to_string();
            (name, row[field].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

/// A process's command line, word by word (empty when it is gone).
fn cmdline(pid: i32) -> Vec<String> {
    let Ok(bytes) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return Vec::new();
    };
    bytes
        .split(|byte| *byte == 0)
        .filter(|word| !word.is_empty())
        .map(|word| String::from_utf8_lossy(word).into_owned())
        .collect()
}

/// Hosts that were ever fenced, from the audit log: a `HostState` change to `Fenced`.
pub fn fenced_hosts(events: &[Value]) -> Vec<String> {
    let mut fenced: Vec<String> = events
        .iter()
        .filter(|event| event["kind"] == "HostState")
        .filter(|event| event["line"].as_str().is_some_and(|line| line.contains("-> Fenced")))
        .filter_map(|event| event["host"].as_str().map(str::to_string))
        .collect();
    fenced.sort();
    fenced.dedup();
    fenced
}
