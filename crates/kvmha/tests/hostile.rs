//! Hostile and broken input against real processes (issue 10): malformed configs, bad
//! API requests, agents speaking for other hosts, damaged or foreign heartbeat records,
//! writer clocks that jump. Each must yield a clear error or a dropped message, never a
//! panic, a wrong verdict or lost state.

mod common;

use common::*;
use kvmha_agent::AgentConfig;
use kvmha_core::event::RecordState;
use kvmha_manager::ManagerConfig;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

// ----- configs ------------------------------------------------------------------------

type Edit = fn(&mut toml::Table);

fn table<'a>(root: &'a mut toml::Table, path: &[&str]) -> &'a mut toml::Table {
    let mut here = root;
    for key in path {
        here = here
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("a table");
    }
    here
}

fn set(root: &mut toml::Table, path: &[&str], key: &str, value: impl Into<toml::Value>) {
    table(root, path).insert(key.to_owned(), value.into());
}

/// Writes `edit(base)` next to the original and returns what loading it said.
fn edited(original: &Path, base: &toml::Table, edit: Edit) -> std::path::PathBuf {
    let mut config = base.clone();
    edit(&mut config);
    let file = original.with_file_name("edited.toml");
    std::fs::write(&file, toml::to_string(&config).expect("toml")).expect("write");
    file
}

/// Every field of manager.toml, each given a bad value: the load is refused, and the
/// error names the field (the leaf key at least: serde's type errors point at a line).
#[test]
fn every_bad_manager_config_field_is_refused_naming_it() {
    let cluster = Cluster::init();
    let dir = cluster.config().parent().unwrap().to_path_buf();
    let password = dir.join("bmc.pass");
    std::fs::write(&password, "hunter2-pw").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let open_password = dir.join("open.pass");
    std::fs::write(&open_password, "hunter2-pw").unwrap();
    std::fs::set_permissions(&open_password, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir_all(dir.join("pool-a")).unwrap();
    let mut base: toml::Table = std::fs::read_to_string(cluster.config()).unwrap().parse().unwrap();
    set(&mut base, &["pools", "a"], "path", "pool-a");
    set(&mut base, &["hosts", "host1"], "pools", toml::Value::Array(vec!["a".into()]));
    set(&mut base, &["hosts", "host1"], "watchdog", true);
    set(&mut base, &["hosts", "host1", "bmc"], "kind", "ipmi");
    set(&mut base, &["hosts", "host1", "bmc"], "address", "127.0.0.1:623");
    set(&mut base, &["hosts", "host1", "bmc"], "username", "admin");
    set(&mut base, &["hosts", "host1", "bmc"], "password_file", "bmc.pass");
    let good = edited(&cluster.config(), &base, |_| {});
    let loaded = ManagerConfig::load(&good).expect("the base config is valid");
    assert_eq!(loaded.hosts.len(), 1);

    let cases: Vec<(&str, Edit)> = vec![
        ("cluster_id", |c| set(c, &[], "cluster_id", "no spaces allowed")),
        ("listen", |c| set(c, &[], "listen", "nonsense")),
        ("listen", |c| set(c, &[], "listen", 7300)),
        ("api_listen", |c| set(c, &[], "api_listen", "127.0.0.1")),
        ("data_dir", |c| set(c, &[], "data_dir", 5)),
        ("profile", |c| set(c, &[], "profile", "turbo")),
        ("timing", |c| set(c, &["timing"], "ping_timeout_ms", 1)),
        ("warp_factor", |c| set(c, &["timing"], "warp_factor", 9)),
        ("tls.ca_cert", |c| set(c, &["tls"], "ca_cert", "missing.pem")),
        ("tls.ca_key", |c| set(c, &["tls"], "ca_key", "bmc.pass")),
        ("tls.cert", |c| set(c, &["tls"], "cert", "bmc.pass")),
        ("tls.key", |c| set(c, &["tls"], "key", "missing.key")),
        ("api.operator_token_sha256", |c| set(c, &["api"], "operator_token_sha256", toml::Value::Array(vec![]))),
        ("api.readonly_token_sha256", |c| {
            set(c, &["api"], "readonly_token_sha256", toml::Value::Array(vec!["abc".into()]))
        }),
        ("api.join_token_sha256", |c| set(c, &["api"], "join_token_sha256", "not hex")),
        ("hosts.bad host!", |c| {
            let host = table(c, &["hosts"]).remove("host1").unwrap();
            table(c, &["hosts"]).insert("bad host!".into(), host);
        }),
        ("hosts.host1.pools", |c| set(c, &["hosts", "host1"], "pools", toml::Value::Array(vec!["bad pool".into()]))),
        ("hosts.host1.bmc.address", |c| set(c, &["hosts", "host1", "bmc"], "address", "admin:hunter2@10.0.0.1")),
        ("watchdog", |c| set(c, &["hosts", "host1"], "watchdog", "yes")),
        ("kind", |c| set(c, &["hosts", "host1", "bmc"], "kind", "telnet")),
        ("hosts.host1.bmc.address", |c| set(c, &["hosts", "host1", "bmc"], "address", "")),
        ("hosts.host1.bmc.address", |c| set(c, &["hosts", "host1", "bmc"], "address", "10.0.0.1:notaport")),
        ("hosts.host1.bmc.password_file", |c| set(c, &["hosts", "host1", "bmc"], "password_file", "missing")),
        ("hosts.host1.bmc.password_file", |c| set(c, &["hosts", "host1", "bmc"], "password_file", "open.pass")),
        ("pools.bad pool", |c| {
            let pool = table(c, &["pools"]).remove("a").unwrap();
            table(c, &["pools"]).insert("bad pool".into(), pool);
        }),
        ("path", |c| set(c, &["pools", "a"], "path", 5)),
        ("colour", |c| set(c, &[], "colour", "blue")),
    ];
    for (field, edit) in cases {
        let file = edited(&cluster.config(), &base, edit);
        let error = ManagerConfig::load(&file).expect_err(field).to_string();
        assert!(error.contains(field), "{field}: {error}");
        assert!(!error.contains("hunter2"), "{field}: the password leaked: {error}");
    }
    let file = edited(&cluster.config(), &base, |c| set(c, &["hosts", "host1", "bmc"], "password_file", "open.pass"));
    let error = ManagerConfig::load(&file).unwrap_err().to_string();
    assert!(error.contains("open.pass") && error.contains("every user"), "{error}");
}

/// Every field of agent.toml (as `kvmha agent join` wrote it), each given a bad value.
#[test]
fn every_bad_agent_config_field_is_refused_naming_it() {
    let mut cluster = Cluster::init();
    cluster.start_manager();
    let agent_toml = cluster.join("host1");
    let pools = cluster.dir.path().join("pools");
    std::fs::create_dir_all(pools.join("a")).unwrap();
    let mut base: toml::Table = std::fs::read_to_string(&agent_toml).unwrap().parse().unwrap();
    let pool = |name: &str| {
        let mut pool = toml::Table::new();
        pool.insert("name".into(), name.into());
        pool.insert("path".into(), pools.join("a").display().to_string().into());
        toml::Value::Table(pool)
    };
    base.insert("pools".into(), toml::Value::Array(vec![pool("a")]));
    let good = edited(&agent_toml, &base, |_| {});
    AgentConfig::load(&good).expect("the base config is valid");
    let with_second_pool = {
        let mut twice = base.clone();
        twice.insert("pools".into(), toml::Value::Array(vec![pool("a"), pool("a")]));
        twice
    };
    let error = AgentConfig::load(&edited(&agent_toml, &with_second_pool, |_| {})).unwrap_err().to_string();
    assert!(error.contains("pools[1].name"), "{error}");

    let cases: Vec<(&str, Edit)> = vec![
        ("name", |c| set(c, &[], "name", "not a host name")),
        ("name", |c| set(c, &[], "name", 5)),
        ("cluster_id", |c| set(c, &[], "cluster_id", "no spaces allowed")),
        ("manager_url", |c| set(c, &[], "manager_url", "http://127.0.0.1:1")),
        ("listen", |c| set(c, &[], "listen", "127.0.0.1")),
        ("hypervisor", |c| set(c, &[], "hypervisor", 5)),
        ("profile", |c| set(c, &[], "profile", "turbo")),
        ("timing", |c| set(c, &["timing"], "ping_interval_ms", 0)),
        ("tls.ca_cert", |c| set(c, &["tls"], "ca_cert", "missing.pem")),
        ("tls.cert", |c| set(c, &["tls"], "cert", "missing.pem")),
        ("tls.key", |c| set(c, &["tls"], "key", "agent.toml")),
        ("tls.manager_cert_sha256", |c| set(c, &["tls"], "manager_cert_sha256", "abc")),
        ("pools[0].name", |c| {
            let pools = c.get_mut("pools").unwrap().as_array_mut().unwrap();
            pools[0].as_table_mut().unwrap().insert("name".into(), "bad pool".into());
        }),
        ("path", |c| {
            let pools = c.get_mut("pools").unwrap().as_array_mut().unwrap();
            pools[0].as_table_mut().unwrap().insert("path".into(), 5.into());
        }),
        ("watchdog.armed", |c| {
            c.remove("pools");
            set(c, &["watchdog"], "device", "watchdog");
            set(c, &["watchdog"], "armed", true);
        }),
        ("armed", |c| set(c, &["watchdog"], "armed", "yes")),
        ("colour", |c| set(c, &[], "colour", "blue")),
    ];
    for (field, edit) in cases {
        let file = edited(&agent_toml, &base, edit);
        let error = AgentConfig::load(&file).expect_err(field).to_string();
        assert!(error.contains(field), "{field}: {error}");
    }
}

// ----- the operator API ---------------------------------------------------------------

/// One HTTP/1.1 request over a plain socket (so that any body, of any size, can be sent).
fn http(api_url: &str, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, String) {
    let address = api_url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // A server that refuses early may close before the whole body is sent.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
fn the_api_refuses_bad_json_wrong_types_huge_bodies_and_unknown_hosts() {
    let mut cluster = Cluster::init();
    cluster.start_manager();
    cluster.join("host1");
    cluster.start_agent("host1");
    cluster.wait_state("host1", &["Up"]);
    let operator = Some(cluster.operator_token.as_str());
    let post = |path: &str, token: Option<&str>, body: &[u8]| http(&cluster.api_url, "POST", path, token, body);
    let maintenance = "/v1/hosts/host1/maintenance";
    for (body, why) in [
        (&b"{"[..], "bad json"),
        (b"{\"on\": \"yes\"}", "wrong type"),
        (b"{\"on\": true, \"now\": true}", "unknown field"),
        (b"[true]", "wrong shape"),
        (b"", "empty body"),
        (b"\xff\xfe", "not utf-8"),
    ] {
        let (status, answer) = post(maintenance, operator, body);
        assert_eq!(status, 400, "{why}: {answer}");
        assert!(answer.contains("error"), "{why}: {answer}");
    }
    let huge = vec![b' '; 3 << 20];
    let (status, answer) = post(maintenance, operator, &huge);
    assert_eq!(status, 413, "a 3 MiB body: {answer}");
    let (status, answer) = post("/v1/hosts/ghost/maintenance", operator, b"{\"on\": true}");
    assert_eq!(status, 404, "{answer}");
    assert!(answer.contains("ghost"), "{answer}");
    let (status, answer) = post("/v1/hosts/ghost/confirm-down", operator, b"");
    assert_eq!(status, 404, "{answer}");
    assert!(answer.contains("ghost"), "{answer}");
    let (status, answer) = http(&cluster.api_url, "GET", "/v1/hosts/ghost", operator, b"");
    assert_eq!(status, 404, "{answer}");
    assert!(answer.contains("ghost"), "{answer}");
    let (status, answer) = http(&cluster.api_url, "GET", "/v1/events?after=yesterday", operator, b"");
    assert_eq!(status, 400, "{answer}");
    // Tokens: none, unknown, read-only for a change.
    assert_eq!(post(maintenance, None, b"{\"on\": true}").0, 401);
    assert_eq!(post(maintenance, Some("kvmha-not-a-token"), b"{\"on\": true}").0, 401);
    assert_eq!(post(maintenance, Some(&cluster.readonly_token), b"{\"on\": true}").0, 403);
    assert_eq!(http(&cluster.api_url, "GET", "/v1/hosts", Some(&cluster.readonly_token), b"").0, 200);
    // Nothing of that changed anything: host1 is still Up, not in maintenance.
    assert_eq!(cluster.states().get("host1").map(String::as_str), Some("Up"));
    let manager = cluster.manager.as_ref().unwrap().log_text();
    assert!(!manager.contains("panicked"), "{manager}");
}

// ----- agents ---------------------------------------------------------------------------

/// What an agent's certificate lets its holder send to the manager's agent endpoint.
struct AgentIdentity {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    manager_url: String,
}

impl AgentIdentity {
    fn of(config: &Path) -> AgentIdentity {
        let config = AgentConfig::load(config).expect("agent config");
        let client = kvmha_proto::transport::client(
            &config.ca_pem,
            Some((&config.cert_pem, &config.key_pem)),
            Duration::from_secs(10),
        )
        .expect("client");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        AgentIdentity { runtime, client, manager_url: config.manager_url }
    }

    fn post(&self, path: &str, body: Vec<u8>) -> (u16, String) {
        self.try_post(path, body).expect("the manager answers")
    }

    fn try_post(&self, path: &str, body: Vec<u8>) -> Result<(u16, String), reqwest::Error> {
        self.runtime.block_on(async {
            let response = self
                .client
                .post(format!("{}{}", self.manager_url, path))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            Ok((response.status().as_u16(), response.text().await.unwrap_or_default()))
        })
    }
}

fn ping_body(host: &str, boot: &str, seq: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "version": 1,
        "ping": {"host": host, "boot_id": boot, "seq": seq, "vms": [], "storage": "Ok"}
    }))
    .unwrap()
}

/// An agent may only speak for itself: host1's certificate pinging or saying goodbye as
/// host2 is refused, and host2 (joined, its agent never started) stays Connecting.
/// Garbage and huge bodies from a joined agent are refused too.
#[test]
fn an_agent_certificate_speaks_only_for_its_own_host() {
    let mut cluster = Cluster::init();
    cluster.start_manager();
    let host1 = cluster.join("host1");
    cluster.join("host2");
    let identity = AgentIdentity::of(&host1);
    for seq in 1..=5 {
        let (status, answer) = identity.post(kvmha_proto::path::PING, ping_body("host2", "stolen-boot", seq));
        assert_eq!(status, 403, "{answer}");
        assert!(answer.contains("host1") && answer.contains("host2"), "{answer}");
    }
    let goodbye = serde_json::json!({"version": 1, "host": "host2", "boot_id": "stolen-boot"});
    let (status, answer) = identity.post(kvmha_proto::path::GOODBYE, serde_json::to_vec(&goodbye).unwrap());
    assert_eq!(status, 403, "{answer}");
    for (body, why) in [(b"{".to_vec(), "bad json"), (b"{\"version\": 2}".to_vec(), "other version")] {
        let (status, answer) = identity.post(kvmha_proto::path::PING, body);
        assert_eq!(status, 400, "{why}: {answer}");
    }
    // The manager answers 413 as soon as the length is known and closes the connection:
    // the client may see the answer or a broken pipe while it still writes.
    match identity.try_post(kvmha_proto::path::PING, vec![b' '; 3 << 20]) {
        Ok((status, answer)) => assert_eq!(status, 413, "{answer}"),
        Err(error) => assert!(format!("{error:?}").contains("BrokenPipe") || error.is_request(), "{error:?}"),
    }
    // host1's own ping is taken: the refusals above were about the name, not the channel.
    // A fresh client: the pooled connection may be the one the 413 closed.
    let identity = AgentIdentity::of(&host1);
    let (status, answer) = identity.post(kvmha_proto::path::PING, ping_body("host1", "boot-1", 1));
    assert_eq!(status, 200, "{answer}");
    cluster.wait_state("host1", &["Up"]);
    assert_eq!(cluster.states().get("host2").map(String::as_str), Some("Connecting"));
}

/// Pings that arrive out of order (seq going backwards) or from an earlier boot are
/// dropped: they never bring back a host whose agent has gone silent.
#[test]
fn replayed_and_reordered_pings_do_not_keep_a_silent_host_alive() {
    let mut cluster = Cluster::init();
    cluster.start_manager();
    let host1 = cluster.join("host1");
    let identity = AgentIdentity::of(&host1);
    assert_eq!(identity.post(kvmha_proto::path::PING, ping_body("host1", "boot-1", 100)).0, 200);
    cluster.wait_state("host1", &["Up"]);
    // The host reboots: boot-2 pings. From now on boot-1 is the past.
    assert_eq!(identity.post(kvmha_proto::path::PING, ping_body("host1", "boot-2", 1)).0, 200);
    assert_eq!(identity.post(kvmha_proto::path::PING, ping_body("host1", "boot-2", 50)).0, 200);
    // Then only stale pings come: an older seq of the current boot, or the old boot. The
    // manager answers them (the transport is fine) but they are no sign of life.
    let deadline = Instant::now() + WAIT_LIMIT;
    let mut seq = 100;
    loop {
        seq += 1;
        identity.post(kvmha_proto::path::PING, ping_body("host1", "boot-2", 49));
        identity.post(kvmha_proto::path::PING, ping_body("host1", "boot-1", seq));
        let state = cluster.states().get("host1").cloned().unwrap_or_default();
        if state != "Up" {
            break;
        }
        assert!(Instant::now() < deadline, "stale pings kept host1 Up");
        std::thread::sleep(POLL);
    }
    assert!(cluster.has_event("earlier boot boot-1"), "no audit line for the dropped ping");
}

// ----- storage ------------------------------------------------------------------------

/// Heartbeat records that are truncated, damaged or written by another cluster are
/// `Unreadable`, never a basis for Alive or Dead; and the writer's wall clock (10 years
/// ahead, then 0) changes nothing: only the counter counts.
#[test]
fn damaged_foreign_and_clock_skewed_heartbeat_records() {
    use kvmha_storage::{AgentState, BootId, HeartbeatRecord, Name};
    let cluster = Cluster::init();
    add_manager_pools(&cluster, "host1");
    let config = ManagerConfig::load(&cluster.config()).expect("config");
    let ours = Name::new(&config.cluster_id).unwrap();
    let host = Name::new("host1").unwrap();
    let pool = cluster.dir.path().join("pools/a");
    let path = kvmha_storage::layout::heartbeat_path(&pool, &ours, &host);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let record = |cluster: &Name, counter: u64, writer_unix_ms: u64| HeartbeatRecord {
        cluster: cluster.clone(),
        host: host.clone(),
        boot_id: BootId([7; 16]),
        counter,
        writer_unix_ms,
        agent_state: AgentState::Running,
        watchdog_armed: true,
    };
    let investigator = Investigator::new(&cluster.config());
    let pool_a = |states: &[RecordState]| states[0].clone();

    let ten_years_ahead = 1_764_000_000_000 + 10 * 365 * 24 * 3_600_000;
    std::fs::write(&path, record(&ours, 1, ten_years_ahead).encode()).unwrap();
    investigator.wait("a readable record", "host1", Instant::now(), |states| {
        matches!(pool_a(states), RecordState::Unchanged { .. })
    });
    // The counter moves on while the writer's clock jumps between 1970 and ten years
    // ahead: the reader sees it advancing all the same.
    let before_change = Instant::now();
    let deadline = Instant::now() + WAIT_LIMIT;
    let mut counter = 2;
    loop {
        let writer_unix_ms = if counter % 2 == 0 { 0 } else { ten_years_ahead };
        std::fs::write(&path, record(&ours, counter, writer_unix_ms).encode()).unwrap();
        if pool_a(&investigator.look("host1", before_change)) == RecordState::Advancing {
            break;
        }
        assert!(Instant::now() < deadline, "an advancing counter was never seen advancing");
        std::thread::sleep(POLL);
        counter += 1;
    }

    let foreign = Name::new("someone-else").unwrap();
    let mut damaged = record(&ours, 3, 0).encode();
    damaged[100] ^= 0x40;
    for (bytes, expected) in [
        (record(&ours, 3, 0).encode()[..100].to_vec(), "100 bytes"),
        (damaged.to_vec(), "checksum"),
        (record(&foreign, 3, 0).encode().to_vec(), "someone-else"),
        (vec![0; 256], "magic"),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        investigator.wait(
            expected,
            "host1",
            Instant::now(),
            |states| matches!(pool_a(states), RecordState::Unreadable { reason } if reason.contains(expected)),
        );
    }
}

/// `kvmha host remove` (issue 10): a host no VM depends on leaves the cluster and its agent
/// certificate is revoked for good: the running agent's pings are refused with the reason,
/// and after a manager restart too (the revocation is in the store, read before the
/// manager listens). The removal is an audit line; a read-only token cannot do it.
#[test]
fn a_removed_hosts_agent_is_refused_also_after_a_manager_restart() {
    let mut cluster = Cluster::three_up();
    let unknown = cluster.api_output(&["host", "remove", "nohost"], &cluster.operator_token);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"), "{unknown:?}");
    let read_only = cluster.api_output(&["host", "remove", "host3"], &cluster.readonly_token);
    assert!(!read_only.status.success());
    assert_eq!(cluster.states().get("host3").map(String::as_str), Some("Up"));

    let removed = cluster.api_output(&["host", "remove", "host3"], &cluster.operator_token);
    let stdout = String::from_utf8_lossy(&removed.stdout);
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    assert!(stdout.contains("host removed from the cluster by operator-token"), "{stdout}");
    assert!(!cluster.states().contains_key("host3"));
    let agent = &cluster.agents["host3"];
    cluster.wait("host3's agent is told its certificate is revoked", |_| {
        agent.log_text().contains("certificate revoked: this host was removed from the cluster")
    });

    cluster.manager.as_mut().expect("manager").kill();
    cluster.start_manager();
    cluster.wait_state("host1", &["Up"]);
    cluster.wait_state("host2", &["Up"]);
    let identity = AgentIdentity::of(&cluster.agent_dir("host3").join("agent.toml"));
    let (status, answer) = identity.post(kvmha_proto::path::PING, ping_body("host3", "boot-9", u64::MAX / 2));
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("certificate revoked"), "{answer}");
    cluster.wait("the restarted manager refuses host3's running agent too", |cluster| {
        cluster.manager.as_ref().expect("manager").log_text().contains("the certificate of a removed host")
    });
    assert!(!cluster.states().contains_key("host3"), "{:?}", cluster.states());
    assert!(cluster.has_event("host removed from the cluster by operator-token (was Up)"));
    // The other agents were not touched.
    assert_eq!(cluster.states().get("host1").map(String::as_str), Some("Up"));
}
