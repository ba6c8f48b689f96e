use super::*;
use crate::topology::Network;

/// The example file of SCENARIOS.md, verbatim.
const EXAMPLE: &str = r#"
name = "power loss, BMC reachable"
description = "host1 loses power; its VMs must run elsewhere, nobody else is touched"

[lab]
hosts = 3               # host1 .. host3
profile = "fast"        # timing profile handed to manager and agents
bmc = "ipmi"            # ipmi | redfish | none (default for every host)
watchdog = true         # lab watchdog armed on every host
vm_driver = "process"   # process (default) | libvirt (real QEMU guests through a libvirtd per host)
vms_per_host = 2        # VMs named host1-vm1, host1-vm2, ...: HA on, priority 0, 1 vCPU, 256 MiB

[[lab.host]]            # optional per-host overrides (defaults: bmc from [lab], cpus = 4,
                        # memory_mb = 4096)
name = "host3"
bmc = "none"
cpus = 4
memory_mb = 2048

[[lab.vm]]              # optional explicit VMs (in addition to vms_per_host); only name and
                        # host are required: ha = true, priority = 0, cpus = 1,
                        # memory_mb = 256, no group by default
name = "db"
host = "host1"
ha = true
priority = 10           # higher restarts first
cpus = 1
memory_mb = 512
group = "db-tier"       # anti-affinity group: members prefer different hosts

[[fault]]
at = "2s"               # offset from the moment the lab is steady
action = "power-off"    # power-off | power-on | hang | agent-stop | agent-kill | agent-start
host = "host1"          # | partition | heal | loss | bmc-fail | bmc-heal | vm-crash | manager-restart
                        # operator actions, played the same way: maintenance-on | maintenance-off
                        # | reboot (planned: agent stops cleanly, host restarts) | disarm | arm

[[fault]]
at = "40s"
action = "partition"
host = "host2"
net = "mgmt"            # mgmt | storage | oob | all   (partition, heal, loss)
# percent = 30          # loss only
# vm = "host2-vm1"      # vm-crash only

[expect]
duration = "60s"                 # observation time after steady
recovered_within = "30s"         # every HA VM whose host failed, or which crashed, runs again within this, from its fault
fenced = ["host1"]               # hosts that must have been fenced
not_fenced = ["host2", "host3"]  # hosts that must never be fenced
not_moved = ["host2-vm1"]        # VMs that must keep running where they are, never restarted
final_state = { host1 = "Fenced", host2 = "Degraded", host3 = "Up" }
final_host = { db = ["host2", "host3"] }   # where a VM must be running at the end
apart = [["db", "host2-vm1"]]             # VMs that must end on different hosts
"#;

const MINIMAL: &str = "name = \"m\"\n[lab]\nhosts = 2\nvms_per_host = 1\n[expect]\nduration = \"10s\"\n";

fn field_of(text: &str) -> String {
    match Scenario::parse(text) {
        Err(LabError::Scenario { field, .. }) => field,
        other => panic!("expected a scenario error, got {other:?}"),
    }
}

#[test]
fn the_example_of_scenarios_md_parses_into_typed_values() {
    let scenario = Scenario::parse(EXAMPLE).expect("the contract's own example is valid");
    assert_eq!(scenario.name, "power loss, BMC reachable");
    assert_eq!(scenario.lab.profile, Profile::Fast);
    assert_eq!(scenario.lab.hosts.len(), 3);
    assert_eq!(scenario.lab.hosts[2].bmc, BmcKind::None);
    assert_eq!(scenario.lab.hosts[2].memory_mb, 2048);
    assert_eq!(scenario.lab.hosts[0].bmc, BmcKind::Ipmi);
    assert_eq!(scenario.lab.hosts[0].cpus, 4);
    let names: Vec<&str> = scenario.lab.vms.iter().map(|vm| vm.name.as_str()).collect();
    assert_eq!(names, ["host1-vm1", "host1-vm2", "host2-vm1", "host2-vm2", "host3-vm1", "host3-vm2", "db"]);
    let db = scenario.lab.vms.last().unwrap();
    assert_eq!((db.priority, db.memory_mb, db.group.as_deref()), (10, 512, Some("db-tier")));
    assert_eq!(
        scenario.faults,
        vec![
            Fault { at: Duration::from_secs(2), action: FaultAction::PowerOff { host: "host1".into() } },
            Fault {
                at: Duration::from_secs(40),
                action: FaultAction::Partition { host: "host2".into(), net: NetSelector::One(Network::Mgmt) }
            },
        ]
    );
    assert_eq!(scenario.expect.duration, Duration::from_secs(60));
    assert_eq!(scenario.expect.recovered_within, Some(Duration::from_secs(30)));
    assert_eq!(scenario.expect.final_state["host2"], "Degraded");
    assert_eq!(scenario.expect.final_host["db"], ["host2", "host3"]);
    assert_eq!(scenario.expect.apart, [["db", "host2-vm1"]]);
}

#[test]
fn defaults_apply_when_only_the_required_fields_are_given() {
    let scenario = Scenario::parse(MINIMAL).expect("minimal file");
    assert_eq!(scenario.lab.profile, Profile::Balanced);
    assert_eq!(scenario.lab.vm_driver, VmDriver::Process);
    assert!(scenario.lab.watchdog);
    assert!(scenario.faults.is_empty());
    assert_eq!(scenario.expect.recovered_within, None);
}

#[test]
fn durations_take_the_usual_units() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    for bad in ["", "5", "5 s", "s", "2x", "-1s", "1.2.3s"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} must be rejected");
    }
}

/// Found by review for issue 10: a thousand huge terms summed past `Duration::MAX`
/// and panicked instead of refusing the field.
#[test]
fn an_absurdly_long_duration_is_refused_not_a_panic() {
    let huge = "99999999999999999999h".repeat(1001);
    assert!(parse_duration(&huge).unwrap_err().contains("longer than a year"));
    assert!(parse_duration("9999999h").is_err());
    assert_eq!(parse_duration("365d").map_err(|_| ()), Err(()));
    let scenario = MINIMAL.replace("duration = \"", "duration = \"99999999999999999999h");
    assert!(Scenario::parse(&scenario).is_err());
}

/// Found by the `scenario` fuzz target (fuzz/corpus/scenario/oom-vms-per-host): six
/// million generated VM specs ran the parser out of memory.
#[test]
fn a_huge_vms_per_host_is_refused_not_generated() {
    let text = "name = \"m\"\n[lab]\nhosts = 80\nvms_per_host = 76547\n[expect]\nduration = \"20s\"\n";
    assert_eq!(field_of(text), "lab.vms_per_host");
    let at_the_limit = MINIMAL.replace("vms_per_host = 1", &format!("vms_per_host = {VMS_PER_HOST_MAX}"));
    assert_eq!(Scenario::parse(&at_the_limit).expect("at the limit").lab.vms.len(), 2 * VMS_PER_HOST_MAX);
}

#[test]
fn unknown_keys_are_rejected_naming_where() {
    assert_eq!(field_of(&format!("{MINIMAL}colour = 1\n")), "expect.colour");
    assert_eq!(field_of(&MINIMAL.replace("hosts = 2", "hosts = 2\nhostz = 3")), "lab.hostz");
    let with_fault = format!("{MINIMAL}[[fault]]\nat = \"1s\"\naction = \"hang\"\nhost = \"host1\"\nwhen = 3\n");
    assert_eq!(field_of(&with_fault), "fault[0].when");
    assert_eq!(field_of(&MINIMAL.replace("hosts = 2", "hosts = \"two\"")), "lab.hosts");
    assert_eq!(field_of("name = \"m\"\n[lab]\nhosts = 2\n"), "(file)");
}

#[test]
fn bad_values_name_their_field() {
    let fault = |body: &str| format!("{MINIMAL}[[fault]]\nat = \"1s\"\n{body}\n");
    assert_eq!(field_of(&fault("action = \"loss\"\nhost = \"host1\"\nnet = \"mgmt\"")), "fault[0].percent");
    assert_eq!(field_of(&fault("action = \"partition\"\nhost = \"host1\"")), "fault[0].net");
    assert_eq!(field_of(&fault("action = \"partition\"\nhost = \"host1\"\nnet = \"wan\"")), "fault[0].net");
    assert_eq!(field_of(&fault("action = \"power-off\"\nhost = \"host9\"")), "fault[0].host");
    assert_eq!(field_of(&fault("action = \"power-off\"\nhost = \"host1\"\npercent = 3")), "fault[0].percent");
    assert_eq!(field_of(&fault("action = \"explode\"\nhost = \"host1\"")), "fault[0].action");
    assert_eq!(field_of(&fault("action = \"vm-crash\"\nvm = \"nope\"")), "fault[0].vm");
    assert_eq!(
        field_of(&fault("action = \"loss\"\nhost = \"host1\"\nnet = \"all\"\npercent = 101")),
        "fault[0].percent"
    );
    let late = format!("{MINIMAL}[[fault]]\nat = \"11s\"\naction = \"arm\"\n");
    assert_eq!(field_of(&late), "fault[0].at");
    assert_eq!(field_of(&MINIMAL.replace("\"10s\"", "\"10\"")), "expect.duration");
    assert_eq!(field_of(&MINIMAL.replace("hosts = 2", "hosts = 2\nprofile = \"turbo\"")), "lab.profile");
    assert_eq!(field_of(&MINIMAL.replace("hosts = 2", "hosts = 0")), "lab.hosts");
    assert_eq!(field_of(&format!("{MINIMAL}fenced = [\"host7\"]\n")), "expect.fenced[0]");
    assert_eq!(field_of(&format!("{MINIMAL}final_state = {{ host1 = \"Dead\" }}\n")), "expect.final_state.host1");
    assert_eq!(field_of(&format!("{MINIMAL}apart = [[\"host1-vm1\"]]\n")), "expect.apart[0]");
    let duplicate_vm = format!("{MINIMAL}[[lab.vm]]\nname = \"host1-vm1\"\nhost = \"host2\"\n");
    assert_eq!(field_of(&duplicate_vm), "lab.vm[0].name");
}

#[test]
fn faults_are_played_in_time_order() {
    let text = format!(
        "{MINIMAL}[[fault]]\nat = \"5s\"\naction = \"disarm\"\n[[fault]]\nat = \"500ms\"\naction = \"heal\"\nhost = \"host2\"\n"
    );
    let scenario = Scenario::parse(&text).unwrap();
    assert_eq!(scenario.faults[0].action, FaultAction::Heal { host: "host2".into(), net: None });
    assert_eq!(scenario.faults[1].action, FaultAction::Disarm);
}

#[test]
fn result_serialises_exactly_as_the_contract_shows() {
    let result = ScenarioResult::new(
        "power loss, BMC reachable",
        vec![
            CheckResult { name: "no_double_run".into(), passed: true, detail: "6 VMs, 0 overlapping writers".into() },
            recovered_within_check(
                &BTreeMap::from([("host1-vm1".into(), Some(8123)), ("host1-vm2".into(), Some(8310))]),
                Duration::from_secs(30),
            ),
        ],
        BTreeMap::from([("host1-vm1".into(), 8123), ("host1-vm2".into(), 8310)]),
        vec!["host1".into()],
        BTreeMap::from([
            ("host1".into(), "Fenced".into()),
            ("host2".into(), "Up".into()),
            ("host3".into(), "Up".into()),
        ]),
        42,
    );
    let contract = r#"{
  "scenario": "power loss, BMC reachable",
  "passed": true,
  "checks": [
    {"name": "no_double_run", "passed": true, "detail": "6 VMs, 0 overlapping writers"},
    {"name": "recovered_within", "passed": true, "detail": "host1-vm1 8.1s, host1-vm2 8.3s"}
  ],
  "recovery_ms": {"host1-vm1": 8123, "host1-vm2": 8310},
  "fenced": ["host1"],
  "final_state": {"host1": "Fenced", "host2": "Up", "host3": "Up"},
  "events": 42
}"#;
    let ours = result.to_json();
    let value = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
    assert_eq!(value(&ours), value(contract), "same keys, same values");
    // And the same key order as the contract shows (serde_json's Value sorts keys).
    let keys =
        ["\"scenario\"", "\"passed\"", "\"checks\"", "\"recovery_ms\"", "\"fenced\"", "\"final_state\"", "\"events\""];
    let positions = |text: &str| keys.map(|key| text.find(key).expect("key present"));
    assert!(positions(&ours).is_sorted() && positions(contract).is_sorted());
    assert!(ours.starts_with("{\"scenario\":\"power loss, BMC reachable\",\"passed\":true,\"checks\":[{\"name\":"));
    assert!(!result.to_json().contains('\n'), "one object on one line");
    assert_eq!(result.exit_code(), 0);
}

#[test]
fn one_failed_check_fails_the_run() {
    let late = recovered_within_check(
        &BTreeMap::from([("vm1".into(), Some(31_000)), ("vm2".into(), None)]),
        Duration::from_secs(30),
    );
    assert!(!late.passed);
    assert_eq!(late.detail, "vm1 31.0s, vm2 not recovered");
    let result = ScenarioResult::new("s", vec![late], BTreeMap::new(), vec![], BTreeMap::new(), 0);
    assert!(!result.passed);
    assert_eq!(result.exit_code(), 1);
}

fn logs(text: &str) -> BTreeMap<String, crate::checker::ParsedLog> {
    let parsed = crate::checker::parse_disk_log(text);
    let mut by_vm: BTreeMap<String, crate::checker::ParsedLog> = BTreeMap::new();
    for record in parsed.records {
        by_vm.entry(record.vm.clone()).or_default().records.push(record);
    }
    by_vm
}

const TWO_VMS: &str = "1000 host1 a x1 0\n1100 host1 a x1 1\n\
                       1000 host2 b y1 0\n1100 host2 b y1 1\n\
                       2000 host3 b y2 0\n2100 host3 b y2 1\n";

#[test]
fn not_moved_fails_for_a_vm_with_a_second_run() {
    let logs = logs(TWO_VMS);
    assert!(not_moved_check(&logs, &["a".into()]).passed);
    let moved = not_moved_check(&logs, &["a".into(), "b".into()]);
    assert!(!moved.passed);
    assert_eq!(moved.detail, "a stayed on host1, b had 2 runs (host2, host3)");
    assert!(!not_moved_check(&logs, &["ghost".into()]).passed);
}

#[test]
fn final_host_and_apart_look_at_where_vms_write_at_the_end() {
    let logs = logs(TWO_VMS);
    let expected = BTreeMap::from([("b".to_string(), vec!["host3".to_string()])]);
    assert!(final_host_check(&logs, &expected, 2_150, 500).passed);
    let wrong = BTreeMap::from([("b".to_string(), vec!["host2".to_string()])]);
    assert!(!final_host_check(&logs, &wrong, 2_150, 500).passed);
    // "a" stopped writing at 1.1 s: at 2.15 s it runs nowhere, so apart fails.
    let groups = vec![vec!["a".to_string(), "b".to_string()]];
    assert!(!apart_check(&logs, &groups, 2_150, 500).passed);
    assert!(apart_check(&logs, &groups, 2_150, 1_500).passed);
    let same_host = logs_same_host();
    assert!(!apart_check(&same_host, &groups, 1_150, 500).passed);
}

fn logs_same_host() -> BTreeMap<String, crate::checker::ParsedLog> {
    logs("1000 host1 a x1 0\n1100 host1 b y1 0\n")
}
