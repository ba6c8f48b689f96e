//! Multi-process tests of the daemons: a manager and agents as real `kvmha` processes on
//! loopback, each test in its own temporary directory with its own ports. Every process
//! is killed when its guard drops, also when a test panics.
//!
//! Tests assert behaviour (states, audit lines, exit codes), never durations: every wait
//! is a bounded poll with a generous limit.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn three_agents_come_up_a_clean_stop_disconnects_then_suspects_and_a_kill_suspects() {
    let mut cluster = Cluster::three_up();
    let listed = cluster.api_output(&["host", "list"], &cluster.readonly_token);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(table.starts_with("NAME") && table.contains("host2") && table.contains("Up"), "{table}");

    // Clean stop: goodbye first, so Disconnected, then Suspect once the timeout passes.
    let agent = cluster.agents.get_mut("host1").expect("host1");
    agent.signal("TERM");
    let status = agent.wait_exit();
    assert!(status.success(), "agent did not exit cleanly: {status:?}");
    cluster.wait("host1 Up -> Disconnected", |cluster| cluster.has_event("host1 Up -> Disconnected"));
    cluster.wait("host1 Disconnected -> Suspect", |cluster| cluster.has_event("host1 Disconnected -> Suspect"));
    cluster.wait("host1 investigated", |cluster| cluster.has_event("host1 Suspect -> Investigating"));

    // SIGKILL: no goodbye, so straight from Up to Suspect, then an investigation.
    cluster.agents.get_mut("host2").expect("host2").kill();
    cluster.wait("host2 Up -> Suspect", |cluster| cluster.has_event("host2 Up -> Suspect"));
    cluster.wait("host2 investigated", |cluster| cluster.has_event("host2 Suspect -> Investigating"));
    cluster.wait_state("host2", &["Suspect", "Investigating", "Degraded", "FenceFailed", "Fencing"]);
    assert_eq!(cluster.states().get("host3").map(String::as_str), Some("Up"));

    // The killed agent comes back in the same boot: its pings count on from where the
    // last ones stopped (never dropped as stale), and the host is Up again.
    cluster.start_agent("host2");
    cluster.wait_state("host2", &["Up"]);
}

#[test]
fn manager_killed_and_restarted_keeps_hosts_and_audit_log_and_repeats_nothing() {
    let mut cluster = Cluster::three_up();
    cluster.agents.get_mut("host3").expect("host3").kill();
    cluster.wait("host3 investigated", |cluster| cluster.has_event("host3 Suspect -> Investigating"));
    let before = cluster.events();
    let last_before = before.last().expect("events")["id"].as_i64().expect("id");

    cluster.manager.as_mut().expect("manager").kill();
    cluster.start_manager();
    // Hosts are still known, the live agents come back Up, the log continues.
    let states = cluster.states();
    assert_eq!(states.keys().cloned().collect::<Vec<_>>(), vec!["host1", "host2", "host3"], "{states:?}");
    cluster.wait_state("host1", &["Up"]);
    cluster.wait_state("host2", &["Up"]);
    cluster.wait("host3 investigated again", |cluster| {
        cluster.events().iter().any(|event| {
            event["id"].as_i64() > Some(last_before)
                && event["line"].as_str().unwrap_or("").contains("host3 Suspect -> Investigating")
        })
    });
    let after = cluster.events();
    assert_eq!(&after[..before.len()], &before[..], "the audit log before the restart changed");
    let restarted =
        after.iter().skip(before.len()).any(|event| event["line"].as_str().unwrap_or("").contains("manager started"));
    assert!(restarted, "no 'manager started' line after the restart");
    // No action repeated: every investigation id is started once, across the restart.
    let mut started = BTreeMap::new();
    for event in &after {
        let line = event["line"].as_str().unwrap_or("");
        if event["kind"] == "InvestigationStarted" {
            let id = line.split_whitespace().find(|word| word.starts_with('#')).expect("an id").to_owned();
            *started.entry(id).or_insert(0) += 1;
        }
    }
    assert!(!started.is_empty());
    assert!(started.values().all(|count| *count == 1), "an investigation was started twice: {started:?}");
    // The clock kept going forward: no audit line is older than one before it.
    let times: Vec<u64> = after.iter().map(|event| event["at_ms"].as_u64().expect("at_ms")).collect();
    assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "engine clock went backwards: {times:?}");
}

#[test]
fn an_agent_with_a_certificate_from_another_ca_is_refused() {
    let mut cluster = Cluster::init();
    cluster.start_manager();
    cluster.join("host1");
    // Same name, same trust in the manager, but its own certificate from a foreign CA.
    let foreign = kvmha_proto::pki::ClusterCa::generate("foreign").expect("ca");
    let issued = foreign.issue("host1", vec!["host1".into(), "127.0.0.1".into()]).expect("issue");
    let dir = cluster.agent_dir("host1");
    std::fs::write(dir.join("agent.pem"), &issued.cert_pem).expect("write");
    std::fs::write(dir.join("agent.key"), &issued.key_pem).expect("write");
    cluster.start_agent("host1");
    let manager_log = |cluster: &Cluster| cluster.manager.as_ref().map(Guard::log_text).unwrap_or_default();
    cluster.wait("the handshake refused", |cluster| manager_log(cluster).contains("tls handshake refused"));
    cluster.wait("the agent sees its pings fail", |cluster| cluster.agents["host1"].log_text().contains("ping failed"));
    assert_eq!(cluster.states().get("host1").map(String::as_str), Some("Connecting"));
    assert!(!cluster.has_event("host1 Connecting -> Up"));
}

#[test]
fn tokens_are_checked_with_their_roles() {
    let mut cluster = Cluster::init();
    cluster.start_manager();
    cluster.join("host1");

    let wrong = cluster.api_output(&["host", "list"], "not-a-token");
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("401") && stderr.contains("unknown token"), "{stderr}");

    let read_only = cluster.api_output(&["host", "list", "--json"], &cluster.readonly_token);
    assert!(read_only.status.success());
    let hosts: Value = serde_json::from_slice(&read_only.stdout).expect("json");
    assert_eq!(hosts[0]["name"], "host1");
    assert_eq!(hosts[0]["state"], "Connecting");

    let refused = cluster.api_output(&["host", "maintenance", "host1", "on"], &cluster.readonly_token);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("403") && stderr.contains("read-only"), "{stderr}");

    // The engine refuses to take a host that is not failed for dead: 409 with its reason.
    let conflict = cluster.api_output(&["host", "confirm-down", "host1"], &cluster.operator_token);
    assert!(!conflict.status.success());
    let stderr = String::from_utf8_lossy(&conflict.stderr);
    assert!(stderr.contains("409") && stderr.contains("not failed"), "{stderr}");

    let unknown = cluster.api_output(&["host", "show", "nohost"], &cluster.readonly_token);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"));

    // A follower started before the action sees its audit line arrive.
    let follower_log = cluster.dir.path().join("follow.log");
    let follower = Guard::spawn(
        &["events", "--follow", "--manager", &cluster.api_url, "--token", &cluster.readonly_token],
        follower_log,
    );
    cluster.wait("the follower prints the log so far", |_| follower.log_text().contains("host added"));
    let accepted = cluster.api_output(&["cluster", "disarm", "--json"], &cluster.operator_token);
    assert!(accepted.status.success(), "{}", String::from_utf8_lossy(&accepted.stderr));
    assert!(cluster.has_event("cluster disarmed by operator-token"));
    cluster.wait("the follower prints the new line", |_| follower.log_text().contains("cluster disarmed by"));
    let armed = cluster.api_output(&["cluster", "arm"], &cluster.operator_token);
    assert!(String::from_utf8_lossy(&armed.stdout).contains("cluster armed by operator-token"));

    // Every route the OpenAPI document names exists and asks for a token (401), and a
    // route it does not name does not exist (404).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let document: Value =
            client.get(format!("{}/openapi.json", cluster.api_url)).send().await.unwrap().json().await.unwrap();
        let paths = document["paths"].as_object().expect("paths");
        assert!(paths.len() >= 10, "{paths:?}");
        for (path, operations) in paths {
            if path == "/openapi.json" {
                continue;
            }
            let url = format!("{}{}", cluster.api_url, path.replace("{name}", "host1"));
            for method in operations.as_object().expect("operations").keys() {
                let request = match method.as_str() {
                    "get" => client.get(&url),
                    "post" => client.post(&url).json(&serde_json::json!({})),
                    other => panic!("unexpected method {other}"),
                };
                let status = request.send().await.unwrap().status().as_u16();
                assert_eq!(status, 401, "{method} {path}");
            }
        }
        let missing = client.get(format!("{}/v1/nothing", cluster.api_url)).send().await.unwrap();
        assert_eq!(missing.status().as_u16(), 404);
    });

    // No secret in any log line.
    let log = cluster.manager.as_ref().expect("manager").log_text();
    for secret in [&cluster.operator_token, &cluster.readonly_token] {
        assert!(!log.contains(secret.as_str()));
    }
    let secret_part = cluster.join_token.split('.').nth(1).expect("secret");
    assert!(!log.contains(secret_part));
}

#[test]
fn a_join_with_a_wrong_secret_or_a_wrong_ca_fingerprint_is_refused() {
    let mut cluster = Cluster::init();
    cluster.start_manager();
    let parts: Vec<&str> = cluster.join_token.split('.').collect();
    let wrong_secret = format!("kvmha1.{}.{}", "0".repeat(64), parts[2]);
    let wrong_ca = format!("kvmha1.{}.{}", parts[1], "0".repeat(64));
    for (token, expected) in [(wrong_secret, "wrong join token"), (wrong_ca, "does not match the token")] {
        let dir = cluster.dir.path().join("intruder");
        let output = run(
            &[
                "agent",
                "join",
                "--manager",
                &cluster.manager_url,
                "--token",
                &token,
                "--name",
                "intruder",
                "--dir",
                dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:1",
            ],
            &[],
        );
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains(parts[1]), "the secret shows in an error: {stderr}");
        assert!(!dir.join("agent.toml").exists());
    }
    assert!(cluster.states().is_empty(), "a refused join added a host");
}

fn start_refused(config: &Path) -> String {
    let output = run(&["manager", "run", "--config", config.to_str().unwrap()], &[]);
    assert!(!output.status.success(), "a bad config was accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_malformed_config_is_refused_with_the_field_and_file_named() {
    let cluster = Cluster::init();
    let file = cluster.config();
    let good = std::fs::read_to_string(&file).expect("config");
    let cases = [
        (good.replace("profile = \"fast\"", "profile = \"fast\"\nbogus_key = 1"), "bogus_key"),
        (good.replace("[timing]\n", "[timing]\nping_interval_ms = \"200ms\"\n"), "ping_interval_ms"),
        (good.replace("[timing]\n", "[timing]\nping_timeout_ms = 300\n"), "ping_timeout_ms"),
        (good.replace("cert = \"manager.pem\"", "cert = \"missing.pem\""), "tls.cert"),
        (good.replace("profile = \"fast\"", "profile = \"turbo\""), "profile"),
    ];
    for (text, field) in cases {
        assert_ne!(text, good, "the case for {field} changed nothing");
        std::fs::write(&file, &text).expect("write");
        let stderr = start_refused(&file);
        assert!(stderr.contains(field), "{field} not named: {stderr}");
        assert!(stderr.contains("manager.toml"), "file not named: {stderr}");
    }
}

#[test]
fn a_silent_host_nobody_can_reach_is_fenced_through_its_bmc_once() {
    let bmc = kvmha_bmc::sim::IpmiSim::start(true).expect("ipmi_sim (scripts/setup.sh installs openipmi)");
    let mut cluster = Cluster::init();
    cluster.add_ipmi_bmc("host3", &bmc);
    cluster.start_manager();
    cluster.join("host1");
    cluster.join("host2");
    // host3's neighbours look for it at an address where nothing answers, as if the
    // whole machine were gone; only its BMC can tell.
    let silent = SilentAddress::new();
    cluster.join_with("host3", &["--advertise", &silent.address.to_string()]);
    for name in ["host1", "host2", "host3"] {
        cluster.start_agent(name);
    }
    for name in ["host1", "host2", "host3"] {
        cluster.wait_state(name, &["Up"]);
    }

    cluster.agents.get_mut("host3").expect("host3").kill();
    cluster.wait_state("host3", &["Fenced"]);
    assert!(!bmc.script_power(), "host3 is Fenced but its chassis is still on");
    let lines: Vec<String> =
        cluster.events().iter().map(|event| event["line"].as_str().unwrap_or("").to_owned()).collect();
    let intent = lines.iter().position(|line| line.contains("host3 FenceIntent")).expect("a fence intent");
    let outcome = lines.iter().position(|line| line.contains("host3 FenceOutcome")).expect("a fence outcome");
    assert!(intent < outcome, "the outcome was logged before the intent: {lines:#?}");
    let fence_intents = |lines: &[String]| lines.iter().filter(|line| line.contains("FenceIntent")).count();
    let intents_before = fence_intents(&lines);

    // A restart fences nobody again: the fence is on disk as done.
    cluster.manager.as_mut().expect("manager").kill();
    cluster.start_manager();
    cluster.wait_state("host1", &["Up"]);
    cluster.wait_state("host2", &["Up"]);
    assert_eq!(cluster.states().get("host3").map(String::as_str), Some("Fenced"));
    let lines: Vec<String> =
        cluster.events().iter().map(|event| event["line"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(fence_intents(&lines), intents_before, "a fence was repeated after the restart");
    let log = cluster.manager.as_ref().expect("manager").log_text();
    assert!(!log.contains(kvmha_bmc::sim::ADMIN_PASSWORD), "the BMC password is in the manager's log");
    // Nor in the log of the run that fenced, nor in any API answer (issue 10).
    let fencing_run = std::fs::read_to_string(cluster.dir.path().join("manager-1.log")).expect("first log");
    assert!(fencing_run.contains("host3"), "not the fencing run's log");
    assert!(!fencing_run.contains(kvmha_bmc::sim::ADMIN_PASSWORD), "the BMC password is in the fencing run's log");
    for args in [
        &["host", "list", "--json"][..],
        &["host", "show", "host3", "--json"],
        &["events", "--json"],
        &["vm", "list", "--json"],
    ] {
        let output = cluster.api_output(args, &cluster.operator_token);
        let shown = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(!shown.contains(kvmha_bmc::sim::ADMIN_PASSWORD), "{args:?} shows the BMC password");
    }
}

#[test]
fn an_agent_takes_commands_from_the_managers_certificate_only() {
    let mut cluster = Cluster::init();
    cluster.start_manager();
    cluster.join("host1");
    cluster.join("host2");
    cluster.start_agent("host1");
    cluster.wait_state("host1", &["Up"]);
    let config = std::fs::read_to_string(cluster.agent_dir("host1").join("agent.toml")).expect("agent.toml");
    let listen = config
        .lines()
        .find_map(|line| line.strip_prefix("listen = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("listen in agent.toml")
        .to_owned();
    let read = |name: &str, file: &str| std::fs::read_to_string(cluster.agent_dir(name).join(file)).expect(file);
    // host2's certificate is from the right CA, so TLS accepts it; the agent does not.
    let client = kvmha_proto::transport::client(
        &read("host1", "ca.pem"),
        Some((&read("host2", "agent.pem"), &read("host2", "agent.key"))),
        Duration::from_secs(10),
    )
    .expect("client");
    let request = kvmha_proto::CommandRequest {
        version: kvmha_proto::PROTOCOL_VERSION,
        request_id: 1,
        timeout_ms: 1000,
        command: kvmha_proto::AgentCommand::ListVms,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (status, body) = runtime.block_on(async {
        let response = client
            .post(format!("https://{listen}{}", kvmha_proto::path::COMMAND))
            .json(&request)
            .send()
            .await
            .expect("the agent answers");
        (response.status(), response.text().await.unwrap_or_default())
    });
    assert_eq!(status.as_u16(), 403, "{body}");
    assert!(body.contains("manager's certificate only"), "{body}");
}

/// Adds heartbeat pools `a` and `b` (two shared directories) to the manager's config,
/// for `host` with a watchdog.
#[test]
fn heartbeats_advance_on_two_pools_go_stale_when_killed_and_say_stopped_cleanly_after_a_clean_stop() {
    use kvmha_core::event::RecordState;
    let mut cluster = Cluster::init();
    add_manager_pools(&cluster, "host1");
    cluster.start_manager();
    cluster.join("host1");
    let watchdog = add_agent_pools(&cluster, "host1");
    cluster.start_agent("host1");
    cluster.wait_state("host1", &["Up"]);
    let investigator = Investigator::new(&cluster.config());
    let after_start = Instant::now();
    investigator.wait("advancing on both pools", "host1", after_start, |states| {
        states.len() == 2 && states.iter().all(|state| *state == RecordState::Advancing)
    });

    // SIGKILL: nobody writes any more; the record stays armed and not stopped cleanly.
    cluster.agents.get_mut("host1").expect("host1").kill();
    let after_kill = Instant::now();
    investigator.wait("unchanged, armed, on both pools", "host1", after_kill, |states| {
        states.len() == 2 && states.iter().all(|state| unchanged(state, true, false, Duration::from_secs(1)))
    });
    let petted = std::fs::read(&watchdog).expect("watchdog file");
    assert!(petted.starts_with(b"k") && !petted.contains(&b'V'), "a killed agent released its watchdog");

    // A restarted agent advances again; a clean stop says so on every pool.
    cluster.start_agent("host1");
    let after_restart = Instant::now();
    investigator.wait("advancing again", "host1", after_restart, |states| {
        states.iter().all(|state| *state == RecordState::Advancing)
    });
    let agent = cluster.agents.get_mut("host1").expect("host1");
    agent.signal("TERM");
    assert!(agent.wait_exit().success(), "agent exit");
    let after_stop = Instant::now();
    investigator.wait("stopped cleanly on both pools", "host1", after_stop, |states| {
        states.len() == 2 && states.iter().all(|state| unchanged(state, false, true, Duration::ZERO))
    });
    // The magic close came last, after "stopped cleanly" was on every pool.
    assert!(std::fs::read(&watchdog).expect("watchdog file").ends_with(b"V"), "no magic close");
}

#[test]
fn a_failing_pool_degrades_without_self_fencing_and_all_failing_self_fences_after_the_configured_time() {
    use kvmha_core::event::RecordState;
    let mut cluster = Cluster::init();
    add_manager_pools(&cluster, "host1");
    cluster.start_manager();
    cluster.join("host1");
    let watchdog = add_agent_pools(&cluster, "host1");
    cluster.start_agent("host1");
    cluster.wait_state("host1", &["Up"]);
    let investigator = Investigator::new(&cluster.config());
    investigator.wait("advancing on both pools", "host1", Instant::now(), |states| {
        states.iter().all(|state| *state == RecordState::Advancing)
    });

    // Pool b fails: pool a keeps advancing, the agent reports Degraded{b}.
    break_pool(&cluster, "b");
    cluster.wait("host1 reports pool b failing", |cluster| {
        let storage = host_storage(cluster, "host1");
        storage.contains("Degraded") && storage.contains('b')
    });
    let after_break = Instant::now();
    investigator.wait("a advancing, b unreadable", "host1", after_break, |states| {
        states[0] == RecordState::Advancing && matches!(states[1], RecordState::Unreadable { .. })
    });
    // Longer than self_fence_after (fast: 6s) with one pool still written: no self-fence.
    std::thread::sleep(Duration::from_secs(7));
    let agent_log = |cluster: &Cluster| cluster.agents["host1"].log_text();
    assert!(!agent_log(&cluster).contains("SELF-FENCE"), "self-fenced with a working pool");
    let petted_before = std::fs::read(&watchdog).expect("watchdog").len();

    // Every pool fails: the agent reports AllFailing, keeps petting for a while, then
    // self-fences and stops petting.
    break_pool(&cluster, "a");
    cluster.wait("host1 reports all pools failing", |cluster| host_storage(cluster, "host1").contains("AllFailing"));
    cluster.wait("host1 self-fences", |cluster| agent_log(cluster).contains("SELF-FENCE"));
    let log = agent_log(&cluster);
    let line = strip_ansi(log.lines().find(|line| line.contains("SELF-FENCE")).expect("line"));
    let silent_ms: u64 = line
        .split("silent_ms=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no silent_ms in {line}"));
    assert!(silent_ms >= 6_000, "self-fenced after {silent_ms}ms of silence: {line}");
    let petted_at_fence = std::fs::read(&watchdog).expect("watchdog").len();
    assert!(petted_at_fence > petted_before, "the watchdog was not petted while the self-fence clock ran");
    // Several keepalive intervals later, not one more keepalive (and no magic close).
    std::thread::sleep(Duration::from_secs(2));
    let after = std::fs::read(&watchdog).expect("watchdog");
    assert!(after.len() <= petted_at_fence + 1, "keepalives continued after the self-fence");
    assert!(!after.contains(&b'V'), "a self-fenced agent released its watchdog");
}

#[test]
fn a_host_without_bmc_whose_agent_is_killed_is_fenced_by_lease_expiry() {
    let mut cluster = Cluster::init();
    // Pools a and b for host3 only, which has an armed watchdog and no BMC.
    add_manager_pools(&cluster, "host3");
    cluster.start_manager();
    cluster.join("host1");
    cluster.join("host2");
    // Neighbours find nothing at host3's address, as if the machine were gone.
    let silent = SilentAddress::new();
    cluster.join_with("host3", &["--advertise", &silent.address.to_string()]);
    let watchdog = add_agent_pools(&cluster, "host3");
    for name in ["host1", "host2", "host3"] {
        cluster.start_agent(name);
    }
    for name in ["host1", "host2", "host3"] {
        cluster.wait_state(name, &["Up"]);
    }
    cluster.wait("host3's watchdog is petted", |_| std::fs::read(&watchdog).is_ok_and(|bytes| bytes.len() > 2));

    cluster.agents.get_mut("host3").expect("host3").kill();
    cluster.wait_state("host3", &["Fenced"]);
    let lines: Vec<String> =
        cluster.events().iter().map(|event| event["line"].as_str().unwrap_or("").to_owned()).collect();
    assert!(
        lines.iter().any(|line| line.contains("host3") && line.contains("LeaseExpired")),
        "no lease-expiry proof in the audit log: {lines:#?}"
    );
    assert!(!lines.iter().any(|line| line.contains("host3 FenceIntent")), "fenced through a BMC it does not have");
}

#[test]
fn a_timing_that_breaks_the_lease_rule_is_refused_naming_the_numbers() {
    let cluster = Cluster::init();
    let file = cluster.config();
    let good = std::fs::read_to_string(&file).expect("config");
    // Core's rules accept renewals every 2.8 s; the storage rule does not: two renewals
    // (plus an i/o timeout) do not fit before the 6 s self-fence.
    let text = good.replace("[timing]\n", "[timing]\nlease_renew_interval_ms = 2800\n");
    assert_ne!(text, good);
    std::fs::write(&file, &text).expect("write");
    let stderr = start_refused(&file);
    assert!(stderr.contains("timing") && stderr.contains("manager.toml"), "{stderr}");
    assert!(stderr.contains("two renewals"), "the rule is not named: {stderr}");
    assert!(stderr.contains("2.8s") && stderr.contains("6s"), "the conflicting numbers are not named: {stderr}");
}
