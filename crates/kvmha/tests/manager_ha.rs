//! Several managers on one etcd (issue 9, docs/manager-ha.md), end to end: a real `etcd`,
//! three real manager processes with `[store] backend = "etcd"`, real agents running lab
//! VMs (each a `kvmha-lab-vm` process writing `<unix_ms> <host> <vm> <boot_id> <seq>` to
//! its disk log on shared storage), an `ipmi_sim` BMC. And the etcd store backend itself
//! against the real etcd.
//!
//! Times are printed (takeover), never asserted; what is asserted is order: a leader cut
//! off from etcd has exited before any other manager holds the leader key.

mod common;

use common::etcd::{Etcd, Proxy};
use common::*;
use kvmha_manager::etcd::{EtcdClient, EtcdSettings};
use kvmha_manager::leader::{LeaderInfo, Leadership};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const PREFIX: &str = "/kvmha-test/";
const LEASE_TTL_MS: u64 = 5000;

/// One manager process of the cluster.
struct Manager {
    config: PathBuf,
    agent_url: String,
    api_url: String,
    guard: Option<Guard>,
    /// Its own way to etcd, when the test may cut it.
    proxy: Option<Proxy>,
    log: PathBuf,
}

impl Manager {
    fn start(&mut self) {
        let log = self.log.clone();
        self.guard = Some(Guard::spawn(&["manager", "run", "--config", self.config.to_str().unwrap()], log));
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Reads etcd directly (not through any proxy): who holds the leader key.
struct Observer {
    runtime: tokio::runtime::Runtime,
    client: EtcdClient,
}

impl Observer {
    fn new(etcd: &Etcd) -> Observer {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let client = EtcdClient::new(&EtcdSettings {
            endpoints: vec![etcd.client_url.clone()],
            ca_pem: None,
            identity_pem: None,
            request_timeout: Duration::from_secs(5),
        })
        .expect("etcd client");
        Observer { runtime, client }
    }

    /// (epoch, leader) if a leader key exists.
    fn leader(&self) -> Option<(i64, LeaderInfo)> {
        let key = format!("{PREFIX}leader");
        let (kvs, _) = self.runtime.block_on(self.client.range(&key, "", 1)).ok()?;
        let kv = kvs.into_iter().next()?;
        Some((kv.create_revision, serde_json::from_slice(&kv.value).ok()?))
    }

    fn wait_leader(&self, other_than: Option<i64>) -> (i64, LeaderInfo) {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            if let Some((epoch, info)) = self.leader() {
                if other_than != Some(epoch) {
                    return (epoch, info);
                }
            }
            assert!(Instant::now() < deadline, "no (new) leader elected");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn set_line(text: &str, key: &str, value: &str) -> String {
    text.lines()
        .map(
            |line| {
                if line.starts_with(&format!("{key} = ")) {
                    format!("{key} = \"{value}\"")
                } else {
                    line.to_owned()
                }
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `count` managers sharing the cluster's CA, certificate, tokens and BMC settings (the
/// files `manager init` wrote, copied), each with its own ports, on `etcd` (through a
/// cuttable proxy each if `proxied`). All started; the cluster's URLs point at the leader.
fn managers(cluster: &mut Cluster, etcd: &Etcd, count: usize, proxied: bool) -> Vec<Manager> {
    let source = cluster.dir.path().join("manager");
    let mut managers = Vec::new();
    for index in 0..count {
        let dir = cluster.dir.path().join(format!("manager-{index}"));
        std::fs::create_dir_all(&dir).expect("manager dir");
        for entry in std::fs::read_dir(&source).expect("manager files").flatten() {
            if entry.path().is_file() {
                let target = dir.join(entry.file_name());
                std::fs::copy(entry.path(), &target).expect("copy");
            }
        }
        let (listen, api) = (free_port(), free_port());
        let proxy = proxied.then(|| Proxy::start(etcd.address()));
        let endpoint = proxy.as_ref().map_or(etcd.client_url.clone(), Proxy::url);
        let config = dir.join("manager.toml");
        let mut text = std::fs::read_to_string(&config).expect("manager.toml");
        text = set_line(&text, "listen", &format!("127.0.0.1:{listen}"));
        text = set_line(&text, "api_listen", &format!("127.0.0.1:{api}"));
        text.push_str(&format!(
            "\n[store]\nbackend = \"etcd\"\nendpoints = [\"{endpoint}\"]\nprefix = \"{PREFIX}\"\nlease_ttl_ms = {LEASE_TTL_MS}\n"
        ));
        std::fs::write(&config, text).expect("write manager.toml");
        let mut manager = Manager {
            config,
            agent_url: format!("https://127.0.0.1:{listen}"),
            api_url: format!("http://127.0.0.1:{api}"),
            guard: None,
            proxy,
            log: cluster.dir.path().join(format!("manager-{index}.log")),
        };
        manager.start();
        managers.push(manager);
    }
    managers
}

fn leader_index(managers: &[Manager], leader: &LeaderInfo) -> usize {
    managers.iter().position(|manager| manager.agent_url == leader.agent_url).expect("the leader is one of ours")
}

fn point_at(cluster: &mut Cluster, manager: &Manager) {
    cluster.manager_url = manager.agent_url.clone();
    cluster.api_url = manager.api_url.clone();
}

/// Every manager's agent URL in `host`'s agent.toml (the leader's first, from the join).
fn add_manager_urls(cluster: &Cluster, host: &str, managers: &[Manager]) {
    let file = cluster.agent_dir(host).join("agent.toml");
    let text = std::fs::read_to_string(&file).expect("agent.toml");
    let urls: Vec<String> = managers.iter().map(|manager| format!("\"{}\"", manager.agent_url)).collect();
    std::fs::write(&file, format!("manager_urls = [{}]\n{text}", urls.join(", "))).expect("write agent.toml");
}

/// Joins `host` with the lab driver and the shared pools `a` (VM leases) and `b`.
fn join_lab(cluster: &Cluster, host: &str) {
    join_lab_agent(cluster, host);
    add_agent_pools(cluster, host);
}

fn cli(cluster: &Cluster, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let output = cluster.api_output(&args, &cluster.operator_token);
    assert!(output.status.success(), "kvmha {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("json")
}

fn audit_lines(cluster: &Cluster, needle: &str) -> Vec<String> {
    cluster
        .events()
        .iter()
        .filter_map(|event| event["line"].as_str().map(str::to_owned))
        .filter(|line| line.contains(needle))
        .collect()
}

/// (host, boot id) of every line of the VM's disk, in file order.
fn disk(cluster: &Cluster, vm: &str) -> Vec<(String, String)> {
    disk_lines(cluster, vm).into_iter().map(|(_, host, boot)| (host, boot)).collect()
}

/// Exactly one new instance after the one on `dead`, never two writing at once.
fn assert_restarted_once(cluster: &Cluster, vm: &str, dead: &str) {
    let lines = disk(cluster, vm);
    let mut order: Vec<(String, String)> = Vec::new();
    for line in &lines {
        match order.iter().position(|seen| seen == line) {
            None => order.push(line.clone()),
            Some(index) => assert_eq!(index + 1, order.len(), "vm {vm}: two instances wrote at once: {order:?}"),
        }
    }
    assert_eq!(order.len(), 2, "vm {vm}: expected the old instance and one new one, got {order:?}");
    assert_eq!(order[0].0, dead, "vm {vm}: {order:?}");
    assert_ne!(order[1].0, dead, "vm {vm}: restarted on the dead host: {order:?}");
}

/// Connections to `address` hang as to a powered-off machine (as [`SilentAddress`], but on
/// the address a killed agent listened on): a listener with a backlog of one whose queue
/// is filled and never accepted from.
fn silence(address: &str) -> SilentAddress {
    let address: std::net::SocketAddr = address.parse().expect("IP:PORT");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime");
    let listener = {
        let _context = runtime.enter();
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(address).expect("bind the killed agent's address");
        socket.listen(1).expect("listen")
    };
    let mut fillers = Vec::new();
    while let Ok(stream) = std::net::TcpStream::connect_timeout(&address, Duration::from_millis(300)) {
        fillers.push(stream);
        assert!(fillers.len() < 64, "the accept queue never filled up");
    }
    SilentAddress { address, _listener: listener, _fillers: fillers, _runtime: runtime }
}

/// A host dies as a machine does: agent and VMs gone, its address silent.
fn kill_host(cluster: &mut Cluster, host: &str) -> SilentAddress {
    cluster.agents.get_mut(host).expect("agent").kill();
    let config = std::fs::read_to_string(cluster.agent_dir(host).join("agent.toml")).expect("agent.toml");
    let listen = config
        .lines()
        .find_map(|line| line.strip_prefix("listen = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("listen in agent.toml")
        .to_owned();
    let run = cluster.agent_dir(host).join("lab/run");
    for entry in std::fs::read_dir(run).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|extension| extension == "pid") {
            kill_lab_vm_group(&entry.path(), &cluster.marker);
        }
    }
    silence(&listen)
}

#[test]
fn the_leader_killed_mid_recovery_is_replaced_and_no_vm_starts_twice_nor_host_is_fenced_twice() {
    let etcd = Etcd::start();
    let observer = Observer::new(&etcd);
    let bmc = kvmha_bmc::sim::IpmiSim::start(true).expect("ipmi_sim (scripts/setup.sh installs openipmi)");
    let mut cluster = Cluster::init();
    cluster.add_ipmi_bmc("host1", &bmc);
    let mut managers = managers(&mut cluster, &etcd, 3, false);
    let (epoch, leader) = observer.wait_leader(None);
    let first = leader_index(&managers, &leader);
    point_at(&mut cluster, &managers[first]);
    cluster.wait("the leader's API answers", |cluster| cluster.try_api(&["host", "list", "--json"]).is_some());
    let _cleanup = LabVmsGuard::new(&cluster);
    for host in ["host1", "host2", "host3"] {
        join_lab(&cluster, host);
        add_manager_urls(&cluster, host, &managers);
        cluster.start_agent(host);
    }
    for host in ["host1", "host2", "host3"] {
        cluster.wait_state(host, &["Up"]);
    }
    let names = ["r1", "r2", "r3", "r4"];
    for (index, vm) in names.iter().enumerate() {
        let file = cluster.dir.path().join(format!("{vm}.xml"));
        std::fs::write(&file, lab_vm_xml(vm)).expect("xml");
        cli(&cluster, &["vm", "define", "--host", "host1", file.to_str().unwrap(), "--start"]);
        let priority = (10 - index).to_string();
        cli(&cluster, &["vm", "ha", vm, "enable", "--priority", &priority]);
    }
    for vm in names {
        wait_vm(&cluster, vm, |state, host| state == "Running" && host == "host1");
    }
    // A follower serves reads from the store, and refuses writes with the leader's URL.
    let follower = (first + 1) % managers.len();
    point_at(&mut cluster, &managers[follower]);
    cluster.wait("the follower shows the VMs", |reader| {
        let Some(Value::Array(vms)) = reader.try_api(&["vm", "list", "--json"]) else { return false };
        vms.iter().filter(|vm| vm["state"] == "Running").count() == names.len()
    });
    let refused = cluster.api_output(&["cluster", "disarm"], &cluster.operator_token);
    assert!(!refused.status.success(), "a follower took a write");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("not the leader"), "{stderr}");
    point_at(&mut cluster, &managers[first]);

    let _silent = kill_host(&mut cluster, "host1");
    // The moment the first start is decided (recorded before it is sent), the leader dies.
    let deadline = Instant::now() + WAIT_LIMIT;
    while audit_lines(&cluster, "VmStartIntent").is_empty() {
        assert!(Instant::now() < deadline, "no start intent; leader log:\n{}", managers[first].log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Instant::now();
    managers[first].guard.as_mut().expect("leader").kill();
    let (new_epoch, new_leader) = observer.wait_leader(Some(epoch));
    let elected = killed.elapsed();
    assert!(new_epoch > epoch, "epochs only grow: {epoch} then {new_epoch}");
    let second = leader_index(&managers, &new_leader);
    assert_ne!(second, first);
    point_at(&mut cluster, &managers[second]);
    for vm in names {
        wait_vm(&cluster, vm, |state, host| state == "Running" && host != "host1");
    }
    let recovered = killed.elapsed();
    for vm in names {
        let host = vms(&cluster)[vm].1.clone();
        cluster.wait(&format!("10 lines of {vm} from {host}"), |cluster| {
            disk(cluster, vm).iter().filter(|(writer, _)| *writer == host).count() >= 10
        });
        assert_restarted_once(&cluster, vm, "host1");
    }
    // Fenced once: one power-off reached the chassis, one fence intent in the log.
    let offs: Vec<String> = bmc.script_log().into_iter().filter(|line| line == "power 0").collect();
    assert_eq!(offs.len(), 1, "chassis power-offs: {:?}", bmc.script_log());
    let intents = audit_lines(&cluster, "host1 FenceIntent");
    assert_eq!(intents.len(), 1, "{intents:#?}");
    assert!(managers[second].log_text().contains("taking over as leader"));
    let not_repeated = audit_lines(&cluster, "already confirmed by an earlier leader");
    let resent = audit_lines(&cluster, "sent again");
    eprintln!("after the takeover: {} actions not repeated, {} starts sent again", not_repeated.len(), resent.len());
    eprintln!(
        "takeover: leader SIGKILLed -> new leader elected {} ms, -> every VM running again {} ms (lease TTL {LEASE_TTL_MS} ms)",
        elected.as_millis(),
        recovered.as_millis()
    );
}

#[test]
fn a_leader_cut_off_from_etcd_stops_before_its_lease_expires_and_agents_follow_the_new_leader() {
    let etcd = Etcd::start();
    let observer = Observer::new(&etcd);
    let mut cluster = Cluster::init();
    let mut managers = managers(&mut cluster, &etcd, 3, true);
    let (epoch, leader) = observer.wait_leader(None);
    let first = leader_index(&managers, &leader);
    point_at(&mut cluster, &managers[first]);
    cluster.wait("the leader's API answers", |cluster| cluster.try_api(&["host", "list", "--json"]).is_some());
    for host in ["host1", "host2", "host3"] {
        cluster.join(host);
        add_manager_urls(&cluster, host, &managers);
        cluster.start_agent(host);
    }
    for host in ["host1", "host2", "host3"] {
        cluster.wait_state(host, &["Up"]);
    }

    let cut = Instant::now();
    managers[first].proxy.as_ref().expect("proxy").cut();
    // Poll both: the old leader's exit, then the leader key. The key can only change after
    // the old lease expired; the old leader must be gone by then.
    let deadline = Instant::now() + WAIT_LIMIT;
    let mut exited_after = None;
    let (new_epoch, new_leader) = loop {
        let guard = managers[first].guard.as_mut().expect("leader");
        if exited_after.is_none() {
            if let Some(status) = guard.child.as_mut().expect("child").try_wait().expect("try_wait") {
                assert_eq!(status.code(), Some(3), "the cut-off leader did not step down: {status:?}");
                exited_after = Some(cut.elapsed());
            }
        }
        if let Some((new_epoch, info)) = observer.leader().filter(|(current, _)| *current != epoch) {
            assert!(
                exited_after.is_some(),
                "a new leader (epoch {new_epoch}) was elected while the cut-off leader still ran; its log:\n{}",
                managers[first].log_text()
            );
            break (new_epoch, info);
        }
        assert!(Instant::now() < deadline, "no new leader after the cut");
        std::thread::sleep(Duration::from_millis(10));
    };
    let elected_after = cut.elapsed();
    assert!(new_epoch > epoch);
    let log = managers[first].log_text();
    assert!(log.contains("leadership lost"), "{log}");
    let second = leader_index(&managers, &new_leader);
    point_at(&mut cluster, &managers[second]);
    // Agents follow: every host pings the new leader (a fresh ping in its view) and is Up.
    cluster.wait("every agent pings the new leader", |cluster| {
        let Some(Value::Array(hosts)) = cluster.try_api(&["host", "list", "--json"]) else { return false };
        hosts.len() == 3
            && hosts
                .iter()
                .all(|host| host["state"] == "Up" && host["last_ping_ms_ago"].as_u64().is_some_and(|ago| ago < 1000))
    });
    let followed = cut.elapsed();
    assert!(audit_lines(&cluster, "FenceIntent").is_empty(), "the takeover fenced someone");
    for host in ["host1", "host2", "host3"] {
        let log = cluster.agents[host].log_text();
        assert!(log.contains("switching to the leader") || log.contains("manager reachable again"), "{host}: {log}");
    }
    // A clean stop hands over at once: the lease is revoked, not left to run out.
    let stopping = Instant::now();
    let leader = managers[second].guard.as_mut().expect("new leader");
    leader.signal("TERM");
    let status = leader.wait_exit();
    assert!(status.success(), "a clean stop of the leader exited with {status:?}");
    assert!(managers[second].log_text().contains("lease revoked"), "{}", managers[second].log_text());
    let (third_epoch, third) = observer.wait_leader(Some(new_epoch));
    assert!(third_epoch > new_epoch);
    assert_eq!(leader_index(&managers, &third), 3 - first - second, "the one manager left leads");
    let handed_over = stopping.elapsed();
    eprintln!("clean stop of the leader -> next leader elected {} ms", handed_over.as_millis());
    eprintln!(
        "partition: leader cut off -> stepped down {} ms, new leader elected {} ms, every agent on it {} ms (lease TTL {LEASE_TTL_MS} ms)",
        exited_after.expect("exited").as_millis(),
        elected_after.as_millis(),
        followed.as_millis()
    );
}

/// The etcd store backend itself: a large engine in chunks, audit lines over several
/// transactions in order, registry rows, and a deposed leader's writes refused.
#[test]
fn the_etcd_store_round_trips_large_state_and_refuses_a_deposed_leaders_writes() {
    use kvmha_core::event::{AuditEvent, AuditKind, Event};
    use kvmha_core::model::Resources;
    use kvmha_core::{Engine, EngineConfig, HostName, HostSpec, Instant as EngineInstant, Profile, Timing};
    use kvmha_manager::config::EtcdConfig;
    use kvmha_manager::store_etcd::{EtcdStore, CHUNK_BYTES};

    let etcd = Etcd::start();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let config = |agent_url: &str| EtcdConfig {
        settings: EtcdSettings {
            endpoints: vec![etcd.client_url.clone()],
            ca_pem: None,
            identity_pem: None,
            request_timeout: Duration::from_secs(5),
        },
        prefix: "/store-test/".into(),
        lease_ttl: Duration::from_secs(5),
        agent_url: agent_url.into(),
        api_url: "http://127.0.0.1:1".into(),
    };
    let first = Leadership::new(&config("https://a")).expect("leadership");
    let epoch = runtime.block_on(first.elect());
    let (mut store, reader) = {
        let _context = runtime.enter();
        (
            EtcdStore::open(&config("https://a"), Some(first.clone())).expect("store"),
            EtcdStore::open(&config("https://a"), None).expect("reader"),
        )
    };
    assert!(reader.load_engine().expect("read").is_none());

    let timing = Timing::from_profile(Profile::Fast, &Default::default()).expect("timing");
    let mut engine = Engine::new(EngineConfig::new(timing), EngineInstant::ZERO);
    let mut audits = Vec::new();
    for index in 0..4000 {
        let spec = HostSpec {
            name: HostName::new(format!("host-with-a-long-name-{index:05}")),
            networks: vec!["mgmt".into()],
            capacity: Resources { cpus: 64, memory_mb: 512 * 1024 },
            has_bmc: true,
            has_watchdog: true,
            pools: vec![],
        };
        engine.step(EngineInstant::from_millis(index), Event::HostAdded(spec));
        if index < 250 {
            audits.push(AuditEvent {
                at: EngineInstant::from_millis(index),
                host: Some(HostName::new(format!("host-with-a-long-name-{index:05}"))),
                vm: None,
                kind: AuditKind::Manager,
                detail: format!("line {index}"),
            });
        }
    }
    let size = serde_json::to_vec(&engine).expect("json").len();
    assert!(size > 2 * CHUNK_BYTES, "the engine is only {size} bytes: not several chunks");
    let references: Vec<&AuditEvent> = audits.iter().collect();
    let last = store.commit(&engine, 4242, &references).expect("commit");
    assert_eq!(last, 250);
    // Twice: the second generation replaces the first.
    store.commit(&engine, 4343, &[]).expect("second commit");
    let (restored, clock_ms) = reader.load_engine().expect("read").expect("a snapshot");
    assert_eq!(clock_ms, 4343);
    assert_eq!(restored.hosts().len(), 4000);
    let lines = reader.events_after(0, 1000).expect("events");
    assert_eq!(lines.len(), 250);
    assert!(lines
        .iter()
        .enumerate()
        .all(|(index, line)| line.id == index as i64 + 1 && line.line.ends_with(&format!("line {index}"))));
    assert_eq!(reader.events_after(200, 10).expect("events")[0].id, 201);
    assert_eq!(reader.last_event_id().expect("last"), 250);
    let mut row = kvmha_manager::registry::VmRow::new(kvmha_core::VmName::from("db1"));
    row.ha.enabled = true;
    store.upsert_vm(&row, &[]).expect("vm row");
    assert_eq!(reader.vms().expect("vms"), vec![row]);

    // Deposed: the first leader's lease is revoked (as if it expired); a second manager
    // wins with a larger epoch; every write of the first fails, none lands.
    let lease = runtime.block_on(first.client().range("/store-test/leader", "", 1)).expect("leader key").0[0].lease;
    runtime.block_on(first.client().revoke(lease)).expect("revoke");
    let second = Leadership::new(&config("https://b")).expect("leadership");
    let second_epoch = runtime.block_on(second.elect());
    assert!(second_epoch > epoch, "epochs only grow: {epoch} then {second_epoch}");
    assert_eq!(first.epoch(), Some(epoch), "the first still believes it leads");
    let refused = store.commit(&engine, 9999, &references);
    assert!(matches!(refused, Err(kvmha_manager::ManagerError::NotLeader { .. })), "{refused:?}");
    assert_eq!(reader.load_engine().expect("read").expect("snapshot").1, 4343, "a deposed write landed");
    assert_eq!(reader.last_event_id().expect("last"), 250);
    let _ = runtime.block_on(
        second
            .client()
            .revoke(runtime.block_on(second.client().range("/store-test/leader", "", 1)).expect("key").0[0].lease),
    );
}

/// The next request the executor sends its (detached) controller.
async fn next(
    fed: &mut tokio::sync::mpsc::Receiver<kvmha_manager::controller::Request>,
) -> kvmha_manager::controller::Request {
    tokio::time::timeout(Duration::from_secs(20), fed.recv())
        .await
        .expect("the executor fed nothing")
        .expect("channel open")
}

/// The executor's gate, with a real etcd: a fence a previous leader confirmed (same fence
/// id, recorded outcome) is fed back without touching the BMC; a manager that does not
/// lead fences nobody and feeds nothing.
#[test]
fn a_fence_an_earlier_leader_confirmed_is_not_repeated_and_a_follower_fences_nobody() {
    use kvmha_core::event::{FenceOutcome, RequestId};
    use kvmha_core::{Command, Event, HostName, Instant as EngineInstant};
    use kvmha_manager::config::{EtcdConfig, ManagerConfig};
    use kvmha_manager::controller::{Clock, Controller, Request, SharedDirectory};
    use kvmha_manager::executor::{Executor, FenceIntent};

    let etcd = Etcd::start();
    let cluster = Cluster::init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let etcd_config = EtcdConfig {
        settings: EtcdSettings {
            endpoints: vec![etcd.client_url.clone()],
            ca_pem: None,
            identity_pem: None,
            request_timeout: Duration::from_secs(5),
        },
        prefix: "/gate-test/".into(),
        lease_ttl: Duration::from_secs(5),
        agent_url: "https://127.0.0.1:1".into(),
        api_url: "http://127.0.0.1:1".into(),
    };
    runtime.block_on(async {
        let config = ManagerConfig::load(&cluster.config()).expect("manager config");
        let executor = |leadership: &Leadership| {
            let executor = std::sync::Arc::new(
                Executor::new(config.clone(), Clock::starting_at(0), SharedDirectory::default(), Default::default())
                    .expect("executor"),
            );
            executor.set_leadership(leadership.clone());
            let (controller, requests) = Controller::detached();
            executor.set_controller(controller);
            (executor, requests)
        };
        let host = HostName::from("host9");
        let fence = |id: u64| Command::Fence {
            host: host.clone(),
            fence: RequestId(id),
            attempt: 1,
            deadline: EngineInstant::from_millis(60_000),
        };

        // Not elected: the fence is refused before the BMC (none is configured: a call
        // would feed back "no bmc configured").
        let follower = Leadership::new(&etcd_config).expect("leadership");
        let (refusing, mut fed) = executor(&follower);
        refusing.clone().execute(fence(7)).await;
        assert!(fed.try_recv().is_err(), "a manager that does not lead acted on a fence");

        // Elected, and the fence id 7 is on record as confirmed by an earlier epoch.
        let epoch = follower.elect().await;
        let confirmed = FenceOutcome::PoweredOff { evidence: "power off read back".into() };
        let record = FenceIntent { fence: RequestId(7), epoch: epoch - 1, outcome: Some(confirmed.clone()) };
        follower.record("intent/fence/host9", serde_json::to_vec(&record).unwrap()).await.expect("recorded");
        let (leading, mut fed) = executor(&follower);
        let task = tokio::spawn(leading.clone().execute(fence(7)));
        match next(&mut fed).await {
            Request::Audit { notes, reply } => {
                assert!(notes[0].detail.contains("already confirmed by an earlier leader"), "{:?}", notes[0].detail);
                let _ = reply.send(Ok(()));
            }
            other => panic!("expected the audit line first, got {other:?}"),
        }
        match next(&mut fed).await {
            Request::Step { event: Event::FenceResult(result), .. } => {
                assert_eq!(result.outcome, confirmed);
                assert_eq!(result.fence, RequestId(7));
            }
            other => panic!("expected the recorded outcome fed back, got {other:?}"),
        }
        task.await.expect("execute");
        // Another fence id of the same host is a new fence: recorded, then tried (and it
        // fails here for want of a BMC, which is fed back as such).
        leading.clone().execute(fence(8)).await;
        match fed.try_recv() {
            Ok(Request::Step { event: Event::FenceResult(result), .. }) => {
                assert!(matches!(result.outcome, FenceOutcome::Failed { .. }), "{:?}", result.outcome);
            }
            other => panic!("expected a fence attempt's result, got {other:?}"),
        }
        let recorded: FenceIntent =
            serde_json::from_slice(&follower.read("intent/fence/host9").await.unwrap().unwrap()).unwrap();
        assert_eq!((recorded.fence, recorded.epoch), (RequestId(8), epoch));
    });
}
