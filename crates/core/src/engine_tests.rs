//! Engine tests in openraft's style: a known state, one event in, the exact commands out.
//! Timing is the `fast` profile: ping 200ms / timeout 700ms, round 300ms, 2 unknown rounds,
//! fence attempt 1.5s x3 with 200ms back-off, renew 500ms, takeover 14s, grace 3s,
//! degraded recheck 5s.

use super::*;
use crate::event::{HeartbeatObservation, PoolObservation, RecordState, VmReport};
use crate::model::{PoolName, RestartBudget, ShutdownPolicy};
use crate::safety::ProofKind;
use crate::timing::{Profile, TimingSettings};
use std::time::Duration;

fn timing() -> Timing {
    Timing::from_profile(Profile::Fast, &TimingSettings::default()).expect("fast is valid")
}

fn host_spec(name: &str, has_bmc: bool, has_watchdog: bool) -> HostSpec {
    HostSpec {
        name: HostName::from(name),
        networks: vec!["mgmt".to_owned(), "storage".to_owned()],
        capacity: Resources { cpus: 8, memory_mb: 8192 },
        has_bmc,
        has_watchdog,
        pools: vec![PoolName::from("pool-a")],
    }
}

fn vm_spec(name: &str, priority: i32) -> VmSpec {
    VmSpec {
        name: VmName::from(name),
        ha: true,
        priority,
        demand: Resources { cpus: 1, memory_mb: 1024 },
        group: None,
        affinity: BTreeSet::new(),
        budget: RestartBudget::default(),
    }
}

fn h(name: &str) -> HostName {
    HostName::from(name)
}

fn v(name: &str) -> VmName {
    VmName::from(name)
}

struct Harness {
    engine: Engine,
    now: Instant,
    seq: BTreeMap<HostName, u64>,
    boots: BTreeMap<HostName, String>,
}

impl Harness {
    /// host1 (BMC, watchdog) runs vm-low (priority 1) and vm-high (priority 5); host2 and
    /// host3 (BMC, watchdog) are empty. All are Up at t = 3s, the end of the start grace.
    fn new() -> Harness {
        Harness::with_hosts(&[("host1", true, true), ("host2", true, true), ("host3", true, true)])
    }

    fn with_hosts(hosts: &[(&str, bool, bool)]) -> Harness {
        // Far from zero, so that "unchanged for 14s" can lie in the past.
        let start = Instant::from_millis(100_000);
        let mut harness = Harness {
            engine: Engine::new(EngineConfig::new(timing()), start),
            now: start,
            seq: BTreeMap::new(),
            boots: BTreeMap::new(),
        };
        for (name, has_bmc, has_watchdog) in hosts {
            harness.step(Event::HostAdded(host_spec(name, *has_bmc, *has_watchdog)));
        }
        harness.step(Event::VmAdded { spec: vm_spec("vm-low", 1), host: Some(h("host1")) });
        harness.step(Event::VmAdded { spec: vm_spec("vm-high", 5), host: Some(h("host1")) });
        let all: Vec<&str> = hosts.iter().map(|(name, _, _)| *name).collect();
        harness.advance(3_000, &all);
        for name in &all {
            assert_eq!(harness.state(name), HostState::Up);
        }
        harness
    }

    fn step(&mut self, event: Event) -> Vec<Command> {
        self.engine.step(self.now, event)
    }

    fn state(&self, host: &str) -> HostState {
        self.engine.host_state(&h(host)).expect("known host")
    }

    fn vm(&self, vm: &str) -> &VmRecord {
        &self.engine.vms()[&v(vm)]
    }

    fn boot(&self, host: &str) -> BootId {
        BootId(self.boots.get(&h(host)).cloned().unwrap_or_else(|| format!("{host}-boot1")))
    }

    fn reboot(&mut self, host: &str) {
        let next = format!("{host}-boot{}", self.boots.len() + 2);
        self.boots.insert(h(host), next);
        self.seq.remove(&h(host));
    }

    /// A ping listing, as running, every VM the engine places on the host.
    fn ping(&mut self, host: &str) -> Vec<Command> {
        let vms: Vec<VmReport> = self
            .engine
            .vms()
            .values()
            .filter(|vm| vm.host.as_ref() == Some(&h(host)) && vm.state == VmState::Running)
            .map(|vm| VmReport { name: vm.spec.name.clone(), state: VmRunState::Running, instance: vm.instance })
            .collect();
        self.ping_with(host, vms, StorageHealth::Ok)
    }

    fn ping_with(&mut self, host: &str, vms: Vec<VmReport>, storage: StorageHealth) -> Vec<Command> {
        let boot_id = self.boot(host);
        let seq = self.seq.entry(h(host)).or_default();
        *seq += 1;
        let ping = Ping { host: h(host), boot_id, seq: *seq, vms, storage };
        self.step(Event::Ping(ping))
    }

    /// Moves time forward by `ms` in 100ms steps, ticking, with `pinging` hosts pinging
    /// every 200ms. Returns everything the engine said.
    fn advance(&mut self, ms: u64, pinging: &[&str]) -> Vec<Command> {
        let mut commands = Vec::new();
        let end = self.now.as_millis() + ms;
        while self.now.as_millis() < end {
            self.now = Instant::from_millis(self.now.as_millis() + 100);
            if self.now.as_millis() % 200 == 0 {
                for host in pinging {
                    commands.extend(self.ping(host));
                }
            }
            commands.extend(self.step(Event::Tick));
        }
        commands
    }

    fn report(
        &mut self,
        host: &str,
        kind: InvestigatorKind,
        finding: Finding,
        heartbeat: Option<HeartbeatObservation>,
    ) -> Vec<Command> {
        let investigation = self.current_investigation(host);
        self.step(Event::Report(InvestigatorReport {
            host: h(host),
            investigation,
            kind,
            finding,
            evidence: format!("{kind:?} said {finding:?}"),
            heartbeat,
        }))
    }

    /// Lets time pass (others pinging) until a round about `host` is under way.
    fn until_investigating(&mut self, host: &str) -> Vec<Command> {
        let others = self.others(host);
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        let mut commands = Vec::new();
        for _ in 0..600 {
            if self.engine.hosts()[&h(host)].investigation.is_some() {
                return commands;
            }
            commands.extend(self.advance(100, &others));
        }
        panic!("no investigation of {host} within a minute");
    }

    fn current_investigation(&self, host: &str) -> RequestId {
        self.engine.hosts()[&h(host)].investigation.as_ref().expect("an investigation is running").id
    }

    fn stale(&self, host: &str, unchanged_ms: u64, armed: bool, stopped_cleanly: bool) -> HeartbeatObservation {
        HeartbeatObservation {
            pools: vec![PoolObservation {
                pool: PoolName::from("pool-a"),
                record: RecordState::Unchanged {
                    unchanged_for: Duration::from_millis(unchanged_ms),
                    boot_id: self.boot(host),
                    watchdog_armed: armed,
                    stopped_cleanly,
                },
                boot_id: Some(self.boot(host)),
            }],
        }
    }

    /// Every investigator of the current round answers "unknown", the heartbeat stale.
    fn all_unknown(&mut self, host: &str, unchanged_ms: u64) -> Vec<Command> {
        let mut commands = self.report(host, InvestigatorKind::NeighbourPing, Finding::Unknown, None);
        let stale = self.stale(host, unchanged_ms, true, false);
        commands.extend(self.report(host, InvestigatorKind::StorageHeartbeat, Finding::Dead, Some(stale)));
        commands.extend(self.report(host, InvestigatorKind::VmActivity, Finding::Unknown, None));
        if self.engine.hosts()[&h(host)].spec.has_bmc {
            commands.extend(self.report(host, InvestigatorKind::BmcPower, Finding::Unknown, None));
        }
        commands
    }

    fn others(&self, host: &str) -> Vec<String> {
        self.engine.hosts().keys().filter(|name| name.as_str() != host).map(|name| name.to_string()).collect()
    }

    /// host goes silent (the others keep pinging) until it is investigated.
    fn silence(&mut self, host: &str) -> Vec<Command> {
        let others: Vec<String> =
            self.engine.hosts().keys().filter(|name| name.as_str() != host).map(|name| name.to_string()).collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        self.advance(800, &others)
    }

    fn drive_to_fencing(&mut self, host: &str) -> Vec<Command> {
        self.silence(host);
        let mut commands = self.report(host, InvestigatorKind::BmcPower, Finding::Dead, None);
        commands.extend(self.report(host, InvestigatorKind::NeighbourPing, Finding::Unknown, None));
        let stale = self.stale(host, 900, true, false);
        commands.extend(self.report(host, InvestigatorKind::StorageHeartbeat, Finding::Dead, Some(stale)));
        commands.extend(self.report(host, InvestigatorKind::VmActivity, Finding::Unknown, None));
        assert_eq!(self.state(host), HostState::Fencing, "{commands:#?}");
        commands
    }

    fn current_fence(&self, host: &str) -> RequestId {
        let fencing = self.engine.hosts()[&h(host)].fencing.as_ref().expect("fencing");
        *fencing.fence_ids.last().expect("a fence was sent")
    }

    fn fence_result(&mut self, host: &str, outcome: FenceOutcome) -> Vec<Command> {
        let fence = self.current_fence(host);
        self.step(Event::FenceResult(FenceResult { host: h(host), fence, outcome }))
    }

    fn drive_to_fenced(&mut self, host: &str) -> Vec<Command> {
        self.drive_to_fencing(host);
        let commands = self.fence_result(host, FenceOutcome::PoweredOff { evidence: "read back off".to_owned() });
        assert_eq!(self.state(host), HostState::Fenced);
        commands
    }

    fn fail_every_fence(&mut self, host: &str) -> Vec<Command> {
        let mut commands = Vec::new();
        for _ in 0..timing().fence_attempts_max() {
            commands.extend(self.fence_result(host, FenceOutcome::Failed { error: "unreachable".to_owned() }));
            // Past the back-off, the next attempt goes out.
            let others = self.others(host);
            let others: Vec<&str> = others.iter().map(String::as_str).collect();
            commands.extend(self.advance(1_000, &others));
        }
        commands
    }

    fn operator(&mut self, action: OperatorAction) -> Vec<Command> {
        self.step(Event::Operator(action))
    }
}

fn transitions(commands: &[Command]) -> Vec<(String, HostState, HostState)> {
    commands
        .iter()
        .filter_map(|command| match command {
            Command::Audit(AuditEvent { host: Some(host), kind: AuditKind::HostState { from, to }, .. }) => {
                Some((host.to_string(), *from, *to))
            }
            _ => None,
        })
        .collect()
}

fn details(commands: &[Command], kind: impl Fn(&AuditKind) -> bool) -> Vec<String> {
    commands
        .iter()
        .filter_map(|command| match command {
            Command::Audit(audit) if kind(&audit.kind) => Some(audit.detail.clone()),
            _ => None,
        })
        .collect()
}

fn actions(commands: &[Command]) -> Vec<Command> {
    commands.iter().filter(|command| !matches!(command, Command::Audit(_))).cloned().collect()
}

fn alerts(commands: &[Command]) -> Vec<(Severity, String)> {
    commands
        .iter()
        .filter_map(|command| match command {
            Command::Alert(alert) => Some((alert.severity, alert.message.clone())),
            _ => None,
        })
        .collect()
}

fn starts(commands: &[Command]) -> Vec<(String, String, Option<ProofKind>)> {
    commands
        .iter()
        .filter_map(|command| match command {
            Command::StartVm { vm, target, release, .. } => {
                let proof = match release {
                    Release::HostDead(proof) => Some(proof.kind()),
                    Release::ReportedNotRunning { .. } => None,
                };
                Some((vm.to_string(), target.to_string(), proof))
            }
            _ => None,
        })
        .collect()
}

fn t(host: &str, from: HostState, to: HostState) -> (String, HostState, HostState) {
    (host.to_owned(), from, to)
}

use HostState::*;

// ----- rows of the state table ------------------------------------------------------------

#[test]
fn silent_host_becomes_suspect_then_investigated_by_every_investigator() {
    let mut harness = Harness::new();
    let commands = harness.silence("host1");
    assert_eq!(transitions(&commands), vec![t("host1", Up, Suspect), t("host1", Suspect, Investigating)]);
    let investigation = harness.current_investigation("host1");
    let last_ping = harness.engine.hosts()[&h("host1")].last_ping.expect("pinged before");
    let round_started = commands
        .iter()
        .find_map(|command| match command {
            Command::Investigate { deadline, .. } => Some(*deadline - timing().investigation_round()),
            _ => None,
        })
        .expect("an investigation");
    assert_eq!(
        actions(&commands),
        vec![Command::Investigate {
            host: h("host1"),
            investigation,
            round: 1,
            kinds: vec![
                InvestigatorKind::NeighbourPing,
                InvestigatorKind::StorageHeartbeat,
                InvestigatorKind::VmActivity,
                InvestigatorKind::BmcPower
            ],
            neighbours: vec![h("host3"), h("host2")],
            evidence_after: last_ping + timing().ping_interval(),
            deadline: round_started + timing().investigation_round(),
        }]
    );
}

#[test]
fn clean_stop_disconnects_and_still_becomes_suspect() {
    let mut harness = Harness::new();
    let boot_id = harness.boot("host1");
    let commands = harness.step(Event::AgentGoodbye { host: h("host1"), boot_id });
    assert_eq!(transitions(&commands), vec![t("host1", Up, Disconnected)]);
    assert_eq!(actions(&commands), vec![]);
    // Within the timeout nothing happens; past it, the clean stop does not hide silence.
    assert_eq!(transitions(&harness.advance(600, &["host2", "host3"])), vec![]);
    let commands = harness.advance(200, &["host2", "host3"]);
    assert_eq!(transitions(&commands), vec![t("host1", Disconnected, Suspect), t("host1", Suspect, Investigating)]);
}

#[test]
fn disconnected_host_that_pings_again_is_up() {
    let mut harness = Harness::new();
    let boot_id = harness.boot("host1");
    harness.step(Event::AgentGoodbye { host: h("host1"), boot_id });
    assert_eq!(transitions(&harness.ping("host1")), vec![t("host1", Disconnected, Up)]);
}

#[test]
fn alive_finding_degrades_touches_nothing_and_alerts_once() {
    let mut harness = Harness::new();
    harness.silence("host1");
    let commands = harness.report("host1", InvestigatorKind::NeighbourPing, Finding::Alive, None);
    assert_eq!(transitions(&commands), vec![t("host1", Investigating, Degraded)]);
    assert_eq!(alerts(&commands).len(), 1);
    assert!(actions(&commands).iter().all(|command| matches!(command, Command::Alert(_))));
    assert_eq!(harness.vm("vm-high").state, VmState::Running);
    // Re-investigated after the recheck interval, without a second page.
    let commands = harness.advance(5_000, &["host2", "host3"]);
    assert_eq!(transitions(&commands), vec![t("host1", Degraded, Suspect), t("host1", Suspect, Investigating)]);
    let commands = harness.report("host1", InvestigatorKind::VmActivity, Finding::Alive, None);
    assert_eq!(transitions(&commands), vec![t("host1", Investigating, Degraded)]);
    assert_eq!(alerts(&commands), vec![]);
    assert_eq!(transitions(&harness.ping("host1")), vec![t("host1", Degraded, Up)]);
}

#[test]
fn bmc_power_off_fences_and_restarts_vms_by_priority_on_the_least_loaded_hosts() {
    let mut harness = Harness::new();
    let commands = harness.drive_to_fencing("host1");
    assert_eq!(transitions(&commands), vec![t("host1", Investigating, Fencing)]);
    let fence = harness.current_fence("host1");
    // The BMC fence, and, since host1 has a watchdog, the lease path's first storage look.
    let lease_check = harness.current_investigation("host1");
    assert_eq!(
        actions(&commands),
        vec![
            Command::Fence {
                host: h("host1"),
                fence,
                attempt: 1,
                deadline: harness.now + timing().fence_attempt_timeout()
            },
            Command::Investigate {
                host: h("host1"),
                investigation: lease_check,
                round: 0,
                kinds: vec![InvestigatorKind::StorageHeartbeat],
                neighbours: vec![],
                evidence_after: harness.engine.hosts()[&h("host1")].last_ping.expect("pinged")
                    + timing().ping_interval(),
                deadline: harness.now + timing().investigation_round(),
            },
        ]
    );
    assert_eq!(harness.vm("vm-high").state, VmState::AwaitingProof);

    let commands = harness.fence_result("host1", FenceOutcome::PoweredOff { evidence: "read back off".to_owned() });
    assert_eq!(transitions(&commands), vec![t("host1", Fencing, Fenced)]);
    assert_eq!(
        starts(&commands),
        vec![
            ("vm-high".to_owned(), "host2".to_owned(), Some(ProofKind::BmcPowerOff)),
            ("vm-low".to_owned(), "host3".to_owned(), Some(ProofKind::BmcPowerOff)),
        ]
    );
    assert_eq!(harness.vm("vm-high").state, VmState::Starting);
}

#[test]
fn unknown_verdicts_escalate_to_fencing_after_the_configured_rounds() {
    let mut harness = Harness::new();
    harness.silence("host1");
    let commands = harness.all_unknown("host1", 900);
    assert_eq!(transitions(&commands), vec![]);
    assert!(matches!(actions(&commands).as_slice(), [Command::Investigate { round: 2, .. }]), "{commands:#?}");
    let commands = harness.all_unknown("host1", 1_200);
    assert_eq!(transitions(&commands), vec![t("host1", Investigating, Fencing)]);
}

#[test]
fn an_unreadable_heartbeat_never_lets_unknown_escalate() {
    let mut harness = Harness::new();
    harness.silence("host1");
    let unreadable = HeartbeatObservation {
        pools: vec![PoolObservation {
            pool: PoolName::from("pool-a"),
            record: RecordState::Unreadable { reason: "pool unreachable".to_owned() },
            boot_id: None,
        }],
    };
    let mut commands = Vec::new();
    for _ in 0..2 {
        commands.extend(harness.report("host1", InvestigatorKind::NeighbourPing, Finding::Unknown, None));
        commands.extend(harness.report(
            "host1",
            InvestigatorKind::StorageHeartbeat,
            Finding::Unknown,
            Some(unreadable.clone()),
        ));
        commands.extend(harness.report("host1", InvestigatorKind::VmActivity, Finding::Unknown, None));
        commands.extend(harness.report("host1", InvestigatorKind::BmcPower, Finding::Unknown, None));
    }
    assert_eq!(harness.state("host1"), Investigating);
    assert!(!commands.iter().any(|command| matches!(command, Command::Fence { .. })));
    let pages = alerts(&commands);
    assert_eq!(pages.len(), 1);
    assert!(pages[0].1.contains("heartbeat could not be read"), "{pages:?}");
}

#[test]
fn failed_bmc_fencing_falls_back_to_lease_expiry_on_a_watchdog_host() {
    let mut harness = Harness::new();
    harness.drive_to_fencing("host1");
    let commands = harness.fail_every_fence("host1");
    let fences = commands.iter().filter(|command| matches!(command, Command::Fence { .. })).count();
    assert_eq!(fences, 2, "attempts 2 and 3 after the first");
    assert_eq!(harness.state("host1"), Fencing);
    assert!(alerts(&commands)
        .iter()
        .any(|(severity, message)| *severity == Severity::Warning && message.contains("leases to expire")));
    // The storage look during fencing reports the heartbeat unchanged for the takeover time.
    harness.until_investigating("host1");
    let stale = harness.stale("host1", 14_100, true, false);
    let commands = harness.report("host1", InvestigatorKind::StorageHeartbeat, Finding::Dead, Some(stale));
    assert_eq!(transitions(&commands), vec![t("host1", Fencing, Fenced)]);
    assert!(starts(&commands).iter().all(|(_, _, proof)| *proof == Some(ProofKind::LeaseExpired)));
    assert_eq!(starts(&commands).len(), 2);
}

#[test]
fn a_clean_stop_is_never_proven_dead_by_lease_expiry() {
    let mut harness = Harness::with_hosts(&[("host1", false, true), ("host2", true, true), ("host3", true, true)]);
    let boot_id = harness.boot("host1");
    harness.step(Event::AgentGoodbye { host: h("host1"), boot_id });
    harness.silence("host1");
    harness.all_unknown("host1", 900);
    harness.all_unknown("host1", 1_300);
    assert_eq!(harness.state("host1"), Fencing);
    harness.advance(300, &["host2", "host3"]);
    let stopped = harness.stale("host1", 60_000, false, true);
    let commands = harness.report("host1", InvestigatorKind::StorageHeartbeat, Finding::Dead, Some(stopped));
    assert_eq!(harness.state("host1"), Fencing, "{commands:#?}");
    assert_eq!(starts(&commands), vec![]);
    // It ends in FenceFailed with a page, not in a restart.
    let commands = harness.advance(duration_ms_of(timing().fencing_bound()), &["host2", "host3"]);
    assert!(transitions(&commands).contains(&t("host1", Fencing, FenceFailed)));
    assert_eq!(starts(&commands), vec![]);
}

fn duration_ms_of(duration: Duration) -> u64 {
    crate::time::duration_ms(duration)
}

#[test]
fn no_bmc_and_no_watchdog_fails_at_once_and_waits_for_the_operator() {
    let mut harness = Harness::with_hosts(&[("host1", false, false), ("host2", true, true), ("host3", true, true)]);
    harness.silence("host1");
    harness.all_unknown("host1", 900);
    let commands = harness.all_unknown("host1", 1_200);
    assert_eq!(transitions(&commands), vec![t("host1", Investigating, Fencing), t("host1", Fencing, FenceFailed)]);
    assert!(alerts(&commands)
        .iter()
        .any(|(severity, message)| *severity == Severity::Critical && message.contains("confirm-down host1")));
    assert_eq!(starts(&commands), vec![]);
    let commands = harness.operator(OperatorAction::ConfirmDown { host: h("host1"), by: "alice".to_owned() });
    assert_eq!(transitions(&commands), vec![t("host1", FenceFailed, Fenced)]);
    assert_eq!(starts(&commands).len(), 2);
    assert!(starts(&commands).iter().all(|(_, _, proof)| *proof == Some(ProofKind::OperatorConfirmed)));
}

#[test]
fn confirm_down_is_refused_for_a_host_that_pings() {
    let mut harness = Harness::new();
    let commands = harness.operator(OperatorAction::ConfirmDown { host: h("host1"), by: "bob".to_owned() });
    assert_eq!(transitions(&commands), vec![]);
    assert!(matches!(commands.as_slice(), [Command::Audit(AuditEvent { kind: AuditKind::OperatorRefused, .. })]));
}

#[test]
fn a_ping_during_fencing_stops_it_only_when_no_fence_is_in_flight() {
    let mut harness = Harness::new();
    harness.drive_to_fencing("host1");
    let commands = harness.ping("host1");
    assert_eq!(transitions(&commands), vec![], "a fence in flight cannot be called back");
    let commands = harness.fence_result("host1", FenceOutcome::Failed { error: "timeout".to_owned() });
    assert_eq!(transitions(&commands), vec![]);
    let commands = harness.ping("host1");
    assert_eq!(transitions(&commands), vec![t("host1", Fencing, Up)]);
    assert_eq!(harness.vm("vm-high").state, VmState::Running);
}

#[test]
fn a_manager_that_looks_cut_off_does_not_retry_fencing_a_fence_failed_host() {
    // Found by the simulator: the retries after FenceFailed ignored the isolation rule.
    let mut harness = Harness::with_hosts(&[("host1", true, false), ("host2", true, true), ("host3", true, true)]);
    harness.drive_to_fencing("host1");
    harness.fail_every_fence("host1");
    assert_eq!(harness.state("host1"), FenceFailed);
    // Now nobody is heard at all.
    let commands = harness.advance(30_000, &[]);
    assert!(harness.engine.manager_isolated());
    let fences: Vec<&Command> = commands.iter().filter(|command| matches!(command, Command::Fence { .. })).collect();
    assert_eq!(fences, Vec::<&Command>::new());
}

#[test]
fn under_the_failover_policy_a_planned_stop_restarts_the_vms_elsewhere_at_once() {
    let mut harness = Harness::new();
    harness.engine.config.shutdown_policy = ShutdownPolicy::Failover;
    let commands = harness.ping("host1");
    assert_eq!(harness.engine.directives().shutdown_policy, ShutdownPolicy::Failover, "{commands:?}");
    let stopped = |vm: &str| VmReport { name: v(vm), state: VmRunState::StoppedForShutdown, instance: None };
    let commands = harness.ping_with("host1", vec![stopped("vm-high"), stopped("vm-low")], StorageHealth::Ok);
    let started = starts(&commands);
    assert_eq!(started.len(), 2, "{commands:#?}");
    assert!(started.iter().all(|(_, target, proof)| target != "host1" && proof.is_none()), "{started:?}");
    assert_eq!(started[0].0, "vm-high", "priority order");
    let boot_id = harness.boot("host1");
    let commands = harness.step(Event::AgentGoodbye { host: h("host1"), boot_id });
    assert_eq!(transitions(&commands), vec![t("host1", Up, Disconnected)]);
}

#[test]
fn a_late_fence_success_after_fence_failed_still_proves_death() {
    let mut harness = Harness::with_hosts(&[("host1", true, false), ("host2", true, true), ("host3", true, true)]);
    harness.drive_to_fencing("host1");
    let first = harness.current_fence("host1");
    harness.fail_every_fence("host1");
    assert_eq!(harness.state("host1"), FenceFailed);
    let commands = harness.step(Event::FenceResult(FenceResult {
        host: h("host1"),
        fence: first,
        outcome: FenceOutcome::AlreadyOff { evidence: "read back off".to_owned() },
    }));
    assert_eq!(transitions(&commands), vec![t("host1", FenceFailed, Fenced)]);
    assert_eq!(starts(&commands).len(), 2);
}

#[test]
fn fenced_host_back_with_a_new_boot_is_up_and_same_boot_pages() {
    let mut harness = Harness::new();
    harness.drive_to_fenced("host1");
    harness.reboot("host1");
    let commands = harness.ping("host1");
    assert_eq!(transitions(&commands), vec![t("host1", Fenced, Up)]);
    assert_eq!(alerts(&commands), vec![]);

    let mut harness = Harness::new();
    harness.drive_to_fenced("host1");
    let commands = harness.ping_with("host1", vec![], StorageHealth::Ok);
    assert_eq!(transitions(&commands), vec![t("host1", Fenced, Up)]);
    assert_eq!(alerts(&commands).len(), 1);
    assert_eq!(alerts(&commands)[0].0, Severity::Critical);
}

#[test]
fn fence_failed_host_found_alive_on_recheck_is_degraded() {
    let mut harness = Harness::with_hosts(&[("host1", true, false), ("host2", true, true), ("host3", true, true)]);
    harness.drive_to_fencing("host1");
    harness.fail_every_fence("host1");
    assert_eq!(harness.state("host1"), FenceFailed);
    harness.until_investigating("host1");
    let commands = harness.report("host1", InvestigatorKind::NeighbourPing, Finding::Alive, None);
    assert_eq!(transitions(&commands), vec![t("host1", FenceFailed, Degraded)]);
}

#[test]
fn fence_failed_host_whose_agent_returns_is_up() {
    let mut harness = Harness::with_hosts(&[("host1", true, false), ("host2", true, true), ("host3", true, true)]);
    harness.drive_to_fencing("host1");
    harness.fail_every_fence("host1");
    assert_eq!(transitions(&harness.ping("host1")), vec![t("host1", FenceFailed, Up)]);
}

#[test]
fn advancing_heartbeat_while_waiting_for_the_lease_abandons_the_fence() {
    let mut harness = Harness::new();
    harness.drive_to_fencing("host1");
    harness.fail_every_fence("host1");
    harness.advance(300, &["host2", "host3"]);
    let advancing = HeartbeatObservation {
        pools: vec![PoolObservation { pool: PoolName::from("pool-a"), record: RecordState::Advancing, boot_id: None }],
    };
    let commands = harness.report("host1", InvestigatorKind::StorageHeartbeat, Finding::Alive, Some(advancing));
    assert_eq!(transitions(&commands), vec![t("host1", Fencing, Degraded)]);
    assert_eq!(starts(&commands), vec![]);
}

#[test]
fn confirm_down_from_investigating_and_degraded() {
    let mut harness = Harness::new();
    harness.silence("host1");
    let commands = harness.operator(OperatorAction::ConfirmDown { host: h("host1"), by: "alice".to_owned() });
    assert_eq!(transitions(&commands), vec![t("host1", Investigating, Fenced)]);

    let mut harness = Harness::new();
    harness.silence("host1");
    harness.report("host1", InvestigatorKind::NeighbourPing, Finding::Alive, None);
    let commands = harness.operator(OperatorAction::ConfirmDown { host: h("host1"), by: "alice".to_owned() });
    assert_eq!(transitions(&commands), vec![t("host1", Degraded, Fenced)]);
}

#[test]
fn investigating_host_that_pings_is_up_again() {
    let mut harness = Harness::new();
    harness.silence("host1");
    assert_eq!(transitions(&harness.ping("host1")), vec![t("host1", Investigating, Up)]);
}

#[test]
fn connecting_host_rows() {
    let mut harness = Harness::new();
    harness.step(Event::HostAdded(host_spec("host4", true, true)));
    assert_eq!(harness.state("host4"), Connecting);
    assert_eq!(transitions(&harness.ping("host4")), vec![t("host4", Connecting, Up)]);

    harness.step(Event::HostAdded(host_spec("host5", true, true)));
    let boot_id = harness.boot("host5");
    let commands = harness.step(Event::AgentGoodbye { host: h("host5"), boot_id });
    assert_eq!(transitions(&commands), vec![t("host5", Connecting, Disconnected)]);

    harness.step(Event::HostAdded(host_spec("host6", true, true)));
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host6"), on: true, by: "ops".to_owned() });
    assert_eq!(transitions(&commands), vec![t("host6", Connecting, Maintenance)]);

    harness.step(Event::HostAdded(host_spec("host7", true, true)));
    let commands = harness.advance(800, &["host1", "host2", "host3", "host4"]);
    assert!(transitions(&commands).contains(&t("host7", Connecting, Suspect)), "{:?}", transitions(&commands));
}

#[test]
fn maintenance_suspends_ha_and_returns_by_the_pings() {
    // host2 runs nothing: it enters maintenance at once.
    let mut harness = Harness::new();
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host2"), on: true, by: "ops".to_owned() });
    assert_eq!(transitions(&commands), vec![t("host2", Up, Maintenance)]);
    // Silent in maintenance: nobody investigates, nobody fences.
    let commands = harness.advance(3_000, &["host1", "host3"]);
    assert_eq!(transitions(&commands), vec![]);
    assert_eq!(actions(&commands), vec![]);
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host2"), on: false, by: "ops".to_owned() });
    assert_eq!(transitions(&commands), vec![t("host2", Maintenance, Suspect), t("host2", Suspect, Investigating)]);

    let mut harness = Harness::new();
    harness.operator(OperatorAction::Maintenance { host: h("host2"), on: true, by: "ops".to_owned() });
    harness.advance(400, &["host1", "host2", "host3"]);
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host2"), on: false, by: "ops".to_owned() });
    assert_eq!(transitions(&commands), vec![t("host2", Maintenance, Up)]);
}

fn stops(commands: &[Command]) -> Vec<(String, String, RequestId)> {
    commands
        .iter()
        .filter_map(|command| match command {
            Command::StopVm { vm, host, work, .. } => Some((vm.to_string(), host.to_string(), *work)),
            _ => None,
        })
        .collect()
}

fn start_work(commands: &[Command]) -> (RequestId, HostName, Release) {
    match commands.iter().find(|command| matches!(command, Command::StartVm { .. })) {
        Some(Command::StartVm { work, target, release, .. }) => (*work, target.clone(), release.clone()),
        _ => panic!("no start in {commands:?}"),
    }
}

impl Harness {
    fn stopped(&mut self, vm: &str, host: &str, work: RequestId) -> Vec<Command> {
        self.step(Event::VmStopResult(VmStopResult { work, vm: v(vm), host: h(host), outcome: VmStopOutcome::Stopped }))
    }

    fn started(&mut self, vm: &str, host: &HostName, work: RequestId) -> Vec<Command> {
        self.step(Event::VmStartResult(VmStartResult {
            work,
            vm: v(vm),
            host: host.clone(),
            outcome: VmStartOutcome::Started,
        }))
    }
}

#[test]
fn maintenance_moves_the_vms_off_one_at_a_time_highest_priority_first_then_enters_maintenance() {
    let mut harness = Harness::new();
    // A spent budget does not keep a VM from being moved: a move is not a failure.
    let mut spec = vm_spec("vm-low", 1);
    spec.budget.max_relocations = 0;
    harness.step(Event::VmAdded { spec, host: Some(h("host1")) });
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() });
    assert_eq!(transitions(&commands), vec![], "the host stays Up while its VMs run there");
    let first = stops(&commands);
    assert_eq!(
        first.iter().map(|(vm, host, _)| (vm.as_str(), host.as_str())).collect::<Vec<_>>(),
        [("vm-high", "host1")]
    );

    let commands = harness.stopped("vm-high", "host1", first[0].2);
    let (work, target, release) = start_work(&commands);
    assert_ne!(target, h("host1"), "never back onto the host being emptied");
    assert!(matches!(&release, Release::ReportedNotRunning { host, .. } if *host == h("host1")), "{release:?}");
    assert_eq!(harness.vm("vm-low").state, VmState::Running, "the next VM waits for the first to run elsewhere");
    assert_eq!(stops(&commands), vec![]);

    let commands = harness.started("vm-high", &target, work);
    assert_eq!(stops(&commands), vec![]);
    let commands = harness.advance(100, &["host1", "host2", "host3"]);
    let second = stops(&commands);
    assert_eq!(second.iter().map(|(vm, _, _)| vm.as_str()).collect::<Vec<_>>(), ["vm-low"]);

    let commands = harness.stopped("vm-low", "host1", second[0].2);
    let (work, low_target, _) = start_work(&commands);
    harness.started("vm-low", &low_target, work);
    let commands = harness.advance(100, &["host1", "host2", "host3"]);
    assert_eq!(transitions(&commands), vec![t("host1", Up, Maintenance)]);
    assert_eq!(harness.vm("vm-high").host, Some(target));
    assert_eq!(harness.vm("vm-low").state, VmState::Running);
    assert!(harness.vm("vm-low").starts.is_empty(), "moves are not restarts: {:?}", harness.vm("vm-low").starts);
}

#[test]
fn maintenance_is_refused_when_the_vms_would_have_nowhere_to_go() {
    let mut harness = Harness::with_hosts(&[("host1", true, true), ("host2", true, true)]);
    let mut big = vm_spec("vm-big", 0);
    big.demand = Resources { cpus: 8, memory_mb: 8192 };
    harness.step(Event::VmAdded { spec: big, host: Some(h("host2")) });
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() });
    assert_eq!(stops(&commands), vec![]);
    assert_eq!(transitions(&commands), vec![]);
    let refused = details(&commands, |kind| *kind == AuditKind::OperatorRefused);
    assert!(refused.len() == 1 && refused[0].contains("vm-high") && refused[0].contains("vm-low"), "{refused:?}");
}

#[test]
fn a_failed_stop_ends_the_evacuation_and_the_host_stays_up_with_its_vm() {
    let mut harness = Harness::new();
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() });
    let work = stops(&commands)[0].2;
    let commands = harness.step(Event::VmStopResult(VmStopResult {
        work,
        vm: v("vm-high"),
        host: h("host1"),
        outcome: VmStopOutcome::Failed { reason: "libvirt: timed out".to_owned() },
    }));
    assert_eq!(starts(&commands), vec![]);
    assert!(alerts(&commands).iter().any(|(_, message)| message.contains("could not be stopped")), "{commands:?}");
    assert_eq!(harness.vm("vm-high").host, Some(h("host1")));
    let commands = harness.advance(2_000, &["host1", "host2", "host3"]);
    assert_eq!((transitions(&commands), stops(&commands)), (vec![], vec![]));
    assert_eq!(harness.state("host1"), Up);
}

#[test]
fn an_unanswered_stop_is_sent_again_then_given_up_without_starting_the_vm_elsewhere() {
    let mut harness = Harness::new();
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() });
    let work = stops(&commands)[0].2;
    let commands = harness.advance(60_000, &["host1", "host2", "host3"]);
    let again = stops(&commands);
    assert_eq!(again.len(), 2, "{again:?}");
    assert!(again.iter().all(|(_, _, id)| *id == work), "the same work is repeated: {again:?}");
    assert_eq!(starts(&commands), vec![]);
    assert_eq!(harness.vm("vm-high").host, Some(h("host1")));
    assert_eq!(harness.state("host1"), Up);
    // An answer that comes after giving up changes nothing.
    let commands = harness.stopped("vm-high", "host1", work);
    assert_eq!(starts(&commands), vec![]);
}

#[test]
fn a_stop_seen_in_a_ping_before_its_answer_counts_and_maintenance_off_cancels_the_rest() {
    let mut harness = Harness::new();
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() });
    let work = stops(&commands)[0].2;
    let instance = harness.vm("vm-high").instance;
    let low = VmReport { name: v("vm-low"), state: VmRunState::Running, instance: None };
    let high = VmReport { name: v("vm-high"), state: VmRunState::Stopped, instance };
    let commands = harness.ping_with("host1", vec![low, high], StorageHealth::Ok);
    let (start, target, _) = start_work(&commands);
    // The late answer is dropped, nothing is started twice.
    let commands = harness.stopped("vm-high", "host1", work);
    assert_eq!(starts(&commands), vec![]);
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host1"), on: false, by: "ops".to_owned() });
    assert!(alerts(&commands).iter().any(|(_, message)| message.contains("maintenance off by ops")), "{commands:?}");
    harness.started("vm-high", &target, start);
    let commands = harness.advance(2_000, &["host1", "host2", "host3"]);
    assert_eq!((transitions(&commands), stops(&commands)), (vec![], vec![]));
    assert_eq!(harness.vm("vm-low").host, Some(h("host1")));
    assert_eq!(harness.vm("vm-high").state, VmState::Running);
}

#[test]
fn a_stop_that_outlives_its_evacuation_never_starts_the_vm_twice() {
    // Found by the simulator: the host fails during its evacuation, its VMs restart
    // elsewhere after the fence, then the old stop's answer arrives.
    let mut harness = Harness::new();
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() });
    let work = stops(&commands)[0].2;
    let commands = harness.drive_to_fenced("host1");
    let restarted = starts(&commands);
    assert_eq!(restarted.len(), 2, "{restarted:?}");
    for command in &commands {
        if let Command::StartVm { work, vm, target, .. } = command {
            harness.started(vm.as_str(), target, *work);
        }
    }
    let commands = harness.stopped("vm-high", "host1", work);
    assert_eq!(starts(&commands), vec![]);
    let commands = harness.advance(60_000, &["host2", "host3"]);
    assert_eq!((starts(&commands), stops(&commands)), (vec![], vec![]));
}

#[test]
fn a_ping_built_before_its_host_said_the_vm_stopped_does_not_bind_the_vm_again() {
    let mut harness = Harness::new();
    let crashed = VmReport { name: v("vm-high"), state: VmRunState::Crashed, instance: None };
    let low = VmReport { name: v("vm-low"), state: VmRunState::Running, instance: None };
    let commands = harness.ping_with("host1", vec![crashed, low.clone()], StorageHealth::Ok);
    let (work, target, _) = start_work(&commands);
    harness.step(Event::VmStartResult(VmStartResult {
        work,
        vm: v("vm-high"),
        host: target,
        outcome: VmStartOutcome::LeaseHeld { owner: "host1 (boot host1-boot1)".to_owned() },
    }));
    assert_eq!((harness.vm("vm-high").state, harness.vm("vm-high").host.clone()), (VmState::PendingCapacity, None));
    // The ping host1 built before the crash, delivered late.
    let stale = VmReport { name: v("vm-high"), state: VmRunState::Running, instance: None };
    let commands = harness.ping_with("host1", vec![stale, low], StorageHealth::Ok);
    assert_eq!(details(&commands, |kind| *kind == AuditKind::Dropped).len(), 1, "{commands:#?}");
    assert_eq!((harness.vm("vm-high").state, harness.vm("vm-high").host.clone()), (VmState::PendingCapacity, None));
}

#[test]
fn the_seeds_hard_case_a_host_cut_off_and_reset_by_its_watchdog_gets_its_vms_restarted_elsewhere() {
    // host1: management cut and agent dead. Its neighbours still reach it over the storage
    // network, so it is alive: Degraded, nothing touched.
    let mut harness = Harness::new();
    harness.silence("host1");
    let commands = harness.report("host1", InvestigatorKind::NeighbourPing, Finding::Alive, None);
    assert_eq!(harness.state("host1"), Degraded, "{commands:#?}");
    assert_eq!(starts(&commands), vec![]);
    // Its watchdog resets it; the new boot writes its heartbeat, still unheard.
    let mut commands = Vec::new();
    for _ in 0..200 {
        if harness.engine.hosts()[&h("host1")].investigation.is_some() {
            break;
        }
        commands.extend(harness.advance(100, &["host2", "host3"]));
    }
    assert_eq!(starts(&commands), vec![]);
    let rebooted = HeartbeatObservation {
        pools: vec![PoolObservation {
            pool: PoolName::from("pool-a"),
            record: RecordState::Advancing,
            boot_id: Some(BootId("host1-boot9".to_owned())),
        }],
    };
    let commands = harness.report("host1", InvestigatorKind::StorageHeartbeat, Finding::Alive, Some(rebooted));
    let started = starts(&commands);
    assert_eq!(started.len(), 2, "{commands:#?}");
    assert!(started.iter().all(|(_, target, proof)| target != "host1" && proof.is_none()), "{started:?}");
    // The same boot advancing says nothing of the kind.
    let mut harness = Harness::new();
    harness.silence("host1");
    let same = HeartbeatObservation {
        pools: vec![PoolObservation {
            pool: PoolName::from("pool-a"),
            record: RecordState::Advancing,
            boot_id: Some(harness.boot("host1")),
        }],
    };
    let commands = harness.report("host1", InvestigatorKind::StorageHeartbeat, Finding::Alive, Some(same));
    assert_eq!(starts(&commands), vec![]);
}

#[test]
fn maintenance_is_refused_while_fencing() {
    let mut harness = Harness::new();
    harness.drive_to_fencing("host1");
    let commands = harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() });
    assert_eq!(transitions(&commands), vec![]);
    assert!(matches!(commands.as_slice(), [Command::Audit(AuditEvent { kind: AuditKind::OperatorRefused, .. })]));
}

/// Every row of the state table (HostState::may_become) is driven by a test: this lists
/// them and fails on any transition the table allows that no scenario here produces.
#[test]
fn every_transition_of_the_table_is_exercised() {
    let mut seen: BTreeSet<(HostState, HostState)> = BTreeSet::new();
    let mut record = |commands: &[Command]| {
        for (_, from, to) in transitions(commands) {
            seen.insert((from, to));
        }
    };
    // Each block replays a scenario of the tests above, keeping every command.
    let mut harness = Harness::new();
    record(&harness.silence("host1"));
    record(&harness.ping("host1"));
    let boot_id = harness.boot("host1");
    record(&harness.step(Event::AgentGoodbye { host: h("host1"), boot_id }));
    record(&harness.ping("host1"));
    let boot_id = harness.boot("host1");
    record(&harness.step(Event::AgentGoodbye { host: h("host1"), boot_id }));
    record(&harness.silence("host1"));
    record(&harness.report("host1", InvestigatorKind::NeighbourPing, Finding::Alive, None));
    record(&harness.advance(5_000, &["host2", "host3"]));
    record(&harness.report("host1", InvestigatorKind::NeighbourPing, Finding::Alive, None));
    record(&harness.ping("host1"));
    for from in [Up, Disconnected] {
        let mut harness = Harness::new();
        if from == Disconnected {
            let boot_id = harness.boot("host1");
            record(&harness.step(Event::AgentGoodbye { host: h("host1"), boot_id }));
        }
        record(&harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() }));
        record(&harness.advance(400, &["host1", "host2", "host3"]));
        record(&harness.operator(OperatorAction::Maintenance { host: h("host1"), on: false, by: "ops".to_owned() }));
        record(&harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() }));
        record(&harness.advance(1_000, &["host2", "host3"]));
        record(&harness.operator(OperatorAction::Maintenance { host: h("host1"), on: false, by: "ops".to_owned() }));
    }
    for degraded in [false, true] {
        let mut harness = Harness::new();
        record(&harness.silence("host1"));
        if degraded {
            record(&harness.report("host1", InvestigatorKind::NeighbourPing, Finding::Alive, None));
        }
        record(&harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() }));
        let mut harness = Harness::new();
        record(&harness.silence("host1"));
        if degraded {
            record(&harness.report("host1", InvestigatorKind::NeighbourPing, Finding::Alive, None));
        }
        record(&harness.operator(OperatorAction::ConfirmDown { host: h("host1"), by: "alice".to_owned() }));
        record(&harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() }));
    }
    let mut harness = Harness::new();
    record(&harness.drive_to_fenced("host1"));
    harness.reboot("host1");
    record(&harness.ping("host1"));
    let mut harness = Harness::new();
    record(&harness.drive_to_fencing("host1"));
    record(&harness.fence_result("host1", FenceOutcome::Failed { error: "timeout".to_owned() }));
    record(&harness.ping("host1"));
    let mut harness = Harness::new();
    record(&harness.drive_to_fencing("host1"));
    record(&harness.fail_every_fence("host1"));
    record(&harness.advance(300, &["host2", "host3"]));
    let advancing = HeartbeatObservation {
        pools: vec![PoolObservation { pool: PoolName::from("pool-a"), record: RecordState::Advancing, boot_id: None }],
    };
    record(&harness.report("host1", InvestigatorKind::StorageHeartbeat, Finding::Alive, Some(advancing)));
    for ending in 0..4 {
        let mut harness = Harness::with_hosts(&[("host1", true, false), ("host2", true, true), ("host3", true, true)]);
        record(&harness.drive_to_fencing("host1"));
        record(&harness.fail_every_fence("host1"));
        match ending {
            0 => record(&harness.ping("host1")),
            1 => record(&harness.operator(OperatorAction::ConfirmDown { host: h("host1"), by: "alice".to_owned() })),
            2 => record(&harness.operator(OperatorAction::Maintenance {
                host: h("host1"),
                on: true,
                by: "ops".to_owned(),
            })),
            _ => {
                record(&harness.until_investigating("host1"));
                record(&harness.report("host1", InvestigatorKind::NeighbourPing, Finding::Alive, None));
            }
        }
    }
    let mut harness = Harness::new();
    record(&harness.drive_to_fenced("host1"));
    record(&harness.operator(OperatorAction::Maintenance { host: h("host1"), on: true, by: "ops".to_owned() }));
    let mut harness = Harness::new();
    record(&harness.operator(OperatorAction::Maintenance { host: h("host2"), on: true, by: "ops".to_owned() }));
    harness.advance(3_000, &["host1", "host3"]);
    record(&harness.operator(OperatorAction::Maintenance { host: h("host2"), on: false, by: "ops".to_owned() }));
    let mut harness = Harness::new();
    harness.step(Event::HostAdded(host_spec("host4", true, true)));
    record(&harness.ping("host4"));
    for name in ["host5", "host6", "host7"] {
        harness.step(Event::HostAdded(host_spec(name, true, true)));
    }
    let boot_id = harness.boot("host5");
    record(&harness.step(Event::AgentGoodbye { host: h("host5"), boot_id }));
    record(&harness.operator(OperatorAction::Maintenance { host: h("host6"), on: true, by: "ops".to_owned() }));
    record(&harness.advance(800, &["host1", "host2", "host3", "host4"]));

    let allowed: BTreeSet<(HostState, HostState)> = HostState::ALL
        .iter()
        .flat_map(|from| HostState::ALL.iter().map(move |to| (*from, *to)))
        .filter(|(from, to)| from != to && from.may_become(*to))
        .collect();
    let missing: Vec<_> = allowed.difference(&seen).collect();
    let outside: Vec<_> = seen.difference(&allowed).collect();
    assert!(missing.is_empty(), "transitions of the table no test drives: {missing:?}");
    assert!(outside.is_empty(), "transitions outside the table: {outside:?}");
}

// ----- §6 requirements ----------------------------------------------------------------------

#[test]
fn after_a_manager_restart_agents_get_a_grace_period() {
    let mut harness = Harness::new();
    let snapshot = serde_json::to_string(&harness.engine).expect("serializes");
    harness.now = harness.now + Duration::from_secs(30);
    harness.engine = serde_json::from_str(&snapshot).expect("restores");
    let commands = harness.step(Event::ManagerStarted);
    assert!(commands.contains(&Command::Directives(Directives::default())));
    // Nobody pings for the whole grace period: nobody becomes suspect.
    let commands = harness.advance(2_900, &[]);
    assert_eq!(transitions(&commands), vec![]);
    // After it, hosts that stay silent do.
    let commands = harness.advance(300, &["host2", "host3"]);
    assert_eq!(transitions(&commands), vec![t("host1", Up, Suspect), t("host1", Suspect, Investigating)]);
}

#[test]
fn when_most_hosts_go_quiet_the_manager_fences_nobody_on_unknown() {
    let mut harness = Harness::new();
    let commands = harness.advance(800, &["host3"]);
    assert!(alerts(&commands)
        .iter()
        .any(|(severity, message)| *severity == Severity::Critical && message.contains("2 of 3 hosts")));
    assert!(harness.engine.manager_isolated());
    for _ in 0..2 {
        harness.all_unknown("host1", 900);
    }
    assert_eq!(harness.state("host1"), Investigating);
    // A BMC that reads power off is still positive proof.
    harness.all_unknown("host2", 900);
    let mut commands = harness.report("host2", InvestigatorKind::NeighbourPing, Finding::Unknown, None);
    let stale = harness.stale("host2", 1_000, true, false);
    commands.extend(harness.report("host2", InvestigatorKind::StorageHeartbeat, Finding::Dead, Some(stale)));
    commands.extend(harness.report("host2", InvestigatorKind::VmActivity, Finding::Unknown, None));
    commands.extend(harness.report("host2", InvestigatorKind::BmcPower, Finding::Dead, None));
    assert_eq!(transitions(&commands), vec![t("host2", Investigating, Fencing)]);
}

#[test]
fn every_host_losing_storage_holds_vms_and_delays_lease_proofs() {
    let mut harness = Harness::new();
    let mut commands = Vec::new();
    for host in ["host1", "host2", "host3"] {
        commands.extend(harness.ping_with(host, vec![], StorageHealth::AllFailing));
    }
    assert!(commands.contains(&Command::Directives(Directives {
        disarmed: false,
        storage_hold: true,
        ..Directives::default()
    })));
    assert!(alerts(&commands).iter().any(|(severity, _)| *severity == Severity::Critical));
    let hold_until = harness.engine.hosts()[&h("host1")].storage_hold_granted_until.expect("hold granted");
    assert_eq!(hold_until, harness.now + timing().storage_hold_validity());
    // One host reporting healthy storage lifts the hold.
    let commands = harness.ping_with("host2", vec![], StorageHealth::Ok);
    assert!(commands.contains(&Command::Directives(Directives {
        disarmed: false,
        storage_hold: false,
        ..Directives::default()
    })));
}

#[test]
fn a_held_host_is_not_proven_dead_by_its_lease_until_the_hold_lapses() {
    let mut harness = Harness::with_hosts(&[("host1", false, true), ("host2", true, true), ("host3", true, true)]);
    for host in ["host1", "host2", "host3"] {
        harness.ping_with(host, vec![], StorageHealth::AllFailing);
    }
    let held_until = harness.engine.hosts()[&h("host1")].storage_hold_granted_until.expect("hold");
    harness.silence("host1");
    harness.all_unknown("host1", 900);
    harness.all_unknown("host1", 1_200);
    assert_eq!(harness.state("host1"), Fencing);
    // Heartbeat unchanged "for 20s" (longer than the takeover time) yet the hold was
    // granted 1s ago: the host may still be holding its VMs.
    harness.until_investigating("host1");
    let stale = harness.stale("host1", 20_000, true, false);
    let commands = harness.report("host1", InvestigatorKind::StorageHeartbeat, Finding::Dead, Some(stale));
    assert_eq!(harness.state("host1"), Fencing, "{commands:#?}");
    // Once the takeover time has passed since the hold lapsed, it is.
    let wait = held_until + timing().lease_takeover_after();
    while harness.now < wait {
        harness.advance(500, &["host2", "host3"]);
    }
    // The old look does not carry past it: a fresh one is needed.
    assert_ne!(harness.state("host1"), Fenced);
    harness.until_investigating("host1");
    let stale = harness.stale("host1", 40_000, true, false);
    harness.report("host1", InvestigatorKind::StorageHeartbeat, Finding::Dead, Some(stale));
    assert_eq!(harness.state("host1"), Fenced);
}

#[test]
fn a_disarmed_cluster_fences_nobody() {
    let mut harness = Harness::new();
    let commands = harness.operator(OperatorAction::Disarm { by: "ops".to_owned() });
    assert!(commands.contains(&Command::Directives(Directives {
        disarmed: true,
        storage_hold: false,
        ..Directives::default()
    })));
    harness.silence("host1");
    harness.all_unknown("host1", 900);
    let commands = harness.all_unknown("host1", 1_200);
    assert_eq!(harness.state("host1"), Investigating);
    assert!(!commands.iter().any(|command| matches!(command, Command::Fence { .. })));
    assert!(alerts(&commands).iter().any(|(_, message)| message.contains("disarmed")));
    let commands = harness.operator(OperatorAction::Arm { by: "ops".to_owned() });
    assert!(commands.contains(&Command::Directives(Directives::default())));
    let commands = harness.advance(5_100, &["host2", "host3"]);
    assert!(commands.iter().any(|command| matches!(command, Command::Investigate { .. })));
}

#[test]
fn a_crashed_vm_restarts_on_its_host_and_a_stale_report_is_ignored() {
    let mut harness = Harness::new();
    let instance = harness.vm("vm-high").instance;
    let crashed = VmReport { name: v("vm-high"), state: VmRunState::Crashed, instance };
    let running = VmReport { name: v("vm-low"), state: VmRunState::Running, instance: None };
    let commands = harness.ping_with("host1", vec![crashed.clone(), running.clone()], StorageHealth::Ok);
    assert_eq!(starts(&commands), vec![("vm-high".to_owned(), "host1".to_owned(), None)]);
    let work = match actions(&commands).as_slice() {
        [Command::StartVm { work, .. }] => *work,
        other => panic!("expected one start: {other:?}"),
    };
    let commands = harness.step(Event::VmStartResult(VmStartResult {
        work,
        vm: v("vm-high"),
        host: h("host1"),
        outcome: VmStartOutcome::Started,
    }));
    assert_eq!(actions(&commands), vec![]);
    assert_eq!(harness.vm("vm-high").state, VmState::Running);
    // A ping sent before the restart landed still says "crashed" for the old instance.
    let commands = harness.ping_with("host1", vec![crashed, running], StorageHealth::Ok);
    assert_eq!(starts(&commands), vec![]);
    assert_eq!(harness.vm("vm-high").state, VmState::Running);
}

#[test]
fn an_overtaken_ping_is_dropped() {
    let mut harness = Harness::new();
    harness.ping("host1");
    let seq = harness.seq[&h("host1")];
    let instance = harness.vm("vm-high").instance;
    let stale = Ping {
        host: h("host1"),
        boot_id: harness.boot("host1"),
        seq: seq - 1,
        vms: vec![VmReport { name: v("vm-high"), state: VmRunState::Crashed, instance }],
        storage: StorageHealth::Ok,
    };
    let commands = harness.step(Event::Ping(stale));
    assert_eq!(commands, vec![]);
    assert_eq!(harness.vm("vm-high").state, VmState::Running);
}

#[test]
fn failed_starts_spend_the_budget_then_error_but_a_held_lease_does_not() {
    let mut harness = Harness::new();
    // One relocation allowed: the move off the dead host. Three starts per host.
    let mut spec = vm_spec("vm-high", 5);
    spec.budget = RestartBudget { max_restarts: 3, max_relocations: 1, window: Duration::from_secs(3600) };
    harness.step(Event::VmAdded { spec, host: Some(h("host1")) });
    let mut commands = harness.drive_to_fenced("host1");
    let mut failures = 0;
    let mut lease_refusals = 0;
    for _ in 0..50 {
        let next = commands.iter().find_map(|command| match command {
            Command::StartVm { work, vm, target, .. } if vm.as_str() == "vm-high" => Some((*work, target.clone())),
            _ => None,
        });
        let Some((work, target)) = next else {
            if harness.vm("vm-high").state == VmState::Error {
                break;
            }
            commands = harness.advance(500, &["host2", "host3"]);
            continue;
        };
        let outcome = if lease_refusals == 0 {
            lease_refusals += 1;
            VmStartOutcome::LeaseHeld { owner: "host1-boot1".to_owned() }
        } else {
            failures += 1;
            VmStartOutcome::Failed { reason: "qemu exited".to_owned() }
        };
        commands = harness.step(Event::VmStartResult(VmStartResult { work, vm: v("vm-high"), host: target, outcome }));
    }
    assert_eq!(harness.vm("vm-high").state, VmState::Error);
    assert_eq!(lease_refusals, 1);
    // The refused start was taken back out of the budget: three real failures, not two.
    assert_eq!(failures, 3);
    assert!(alerts(&commands)
        .iter()
        .any(|(severity, message)| *severity == Severity::Critical && message.contains("budget")));
}

#[test]
fn every_decision_is_audited_before_the_command_that_carries_it_out() {
    let mut harness = Harness::new();
    let commands = harness.drive_to_fenced("host1");
    for (index, command) in commands.iter().enumerate() {
        let announced = |kind: &AuditKind| {
            commands[..index].iter().any(|earlier| matches!(earlier, Command::Audit(audit) if &audit.kind == kind))
        };
        match command {
            Command::StartVm { .. } => assert!(announced(&AuditKind::VmStartIntent)),
            Command::Fence { .. } => assert!(announced(&AuditKind::FenceIntent)),
            _ => {}
        }
    }
    let audit_text: Vec<String> = commands
        .iter()
        .filter_map(|command| match command {
            Command::Audit(audit) => Some(audit.to_string()),
            _ => None,
        })
        .collect();
    assert!(
        audit_text.iter().any(|line| line.contains("Fencing -> Fenced") && line.contains("BmcPowerOff")),
        "{audit_text:#?}"
    );
}

#[test]
fn a_vm_stopped_on_purpose_and_started_elsewhere_moves_without_a_double_run_alert() {
    let mut harness = Harness::new();
    let stopped = VmReport { name: v("vm-low"), state: VmRunState::Stopped, instance: None };
    harness.ping_with("host1", vec![stopped], StorageHealth::Ok);
    assert_eq!(harness.vm("vm-low").state, VmState::Stopped);
    let running = VmReport { name: v("vm-low"), state: VmRunState::Running, instance: Some(RequestId(1 << 62)) };
    let commands = harness.ping_with("host2", vec![running], StorageHealth::Ok);
    assert!(alerts(&commands).is_empty(), "{commands:?}");
    assert_eq!(harness.vm("vm-low").state, VmState::Running);
    assert_eq!(harness.vm("vm-low").host, Some(h("host2")));
    assert_eq!(harness.vm("vm-low").instance, Some(RequestId(1 << 62)));
    // A VM kvmha believes running on host1 still raises the alarm when seen elsewhere.
    let elsewhere = VmReport { name: v("vm-high"), state: VmRunState::Running, instance: None };
    let commands = harness.ping_with("host3", vec![elsewhere], StorageHealth::Ok);
    assert_eq!(alerts(&commands).len(), 1, "{commands:?}");
    assert_eq!(harness.vm("vm-high").host, Some(h("host1")));
}

#[test]
fn turning_ha_off_while_a_vm_waits_for_capacity_stops_it_for_good() {
    let mut harness = Harness::new();
    let mut spec = vm_spec("vm-low", 1);
    spec.demand = Resources { cpus: 100, memory_mb: 1024 };
    harness.step(Event::VmAdded { spec: spec.clone(), host: None });
    let crashed = VmReport { name: v("vm-low"), state: VmRunState::Crashed, instance: None };
    let commands = harness.ping_with("host1", vec![crashed], StorageHealth::Ok);
    assert!(starts(&commands).is_empty(), "{commands:?}");
    assert_eq!(harness.vm("vm-low").state, VmState::PendingCapacity);
    spec.ha = false;
    spec.demand = Resources { cpus: 1, memory_mb: 1024 };
    harness.step(Event::VmAdded { spec, host: None });
    assert_eq!(harness.vm("vm-low").state, VmState::Stopped);
    let commands = harness.advance(2_000, &["host1", "host2", "host3"]);
    assert!(starts(&commands).iter().all(|(vm, _, _)| vm != "vm-low"), "{commands:?}");
}

// ----- hostile and reordered agent traffic (issue 10) -------------------------------------

fn dropped(commands: &[Command]) -> Vec<String> {
    commands
        .iter()
        .filter_map(|command| match command {
            Command::Audit(AuditEvent { kind: AuditKind::Dropped, detail, .. }) => Some(detail.clone()),
            _ => None,
        })
        .collect()
}

/// Pings whose seq goes backwards (reordered, or replayed) neither count as a sign of
/// life nor overwrite what a newer ping said: a silent host still becomes Suspect.
#[test]
fn pings_with_an_old_seq_do_not_keep_a_silent_host_up() {
    let mut harness = Harness::new();
    let stale_seq = harness.seq[&h("host1")] - 1;
    let mut commands = Vec::new();
    for _ in 0..8 {
        commands.extend(harness.advance(100, &["host2", "host3"]));
        let ping = Ping {
            host: h("host1"),
            boot_id: harness.boot("host1"),
            seq: stale_seq,
            vms: Vec::new(),
            storage: StorageHealth::Ok,
        };
        commands.extend(harness.step(Event::Ping(ping)));
    }
    assert_eq!(transitions(&commands)[0], t("host1", Up, Suspect), "{commands:#?}");
    // The stale pings listed no VM: had one counted, both VMs would be gone from host1.
    assert_eq!(harness.vm("vm-low").host, Some(h("host1")));
}

/// A host never returns to an earlier boot: a ping from one is dropped with an audit
/// line, does not change the host's boot, and does not keep the host alive.
#[test]
fn a_ping_from_an_earlier_boot_is_dropped_and_audited() {
    let mut harness = Harness::new();
    let first_boot = harness.boot("host1");
    harness.reboot("host1");
    harness.ping("host1");
    let second_boot = harness.boot("host1");
    assert_ne!(first_boot, second_boot);
    let replayed = Ping {
        host: h("host1"),
        boot_id: first_boot.clone(),
        seq: u64::MAX,
        vms: Vec::new(),
        storage: StorageHealth::Ok,
    };
    let commands = harness.step(Event::Ping(replayed.clone()));
    let lines = dropped(&commands);
    assert_eq!(lines.len(), 1, "{commands:#?}");
    assert!(lines[0].contains("earlier boot") && lines[0].contains(&first_boot.to_string()), "{lines:?}");
    assert_eq!(harness.engine.hosts()[&h("host1")].boot_id.as_ref(), Some(&second_boot));
    let mut commands = Vec::new();
    for _ in 0..8 {
        commands.extend(harness.advance(100, &["host2", "host3"]));
        commands.extend(harness.step(Event::Ping(replayed.clone())));
    }
    assert_eq!(transitions(&commands)[0], t("host1", Up, Suspect), "{commands:#?}");
}

fn vm_stop(vm: &str) -> OperatorAction {
    OperatorAction::VmStop { vm: v(vm), by: "alice".to_owned() }
}

#[test]
fn an_operator_stop_wins_over_a_host_death_right_after_it() {
    let mut harness = Harness::new();
    let commands = harness.operator(vm_stop("vm-high"));
    assert_eq!(harness.vm("vm-high").state, VmState::Stopped, "{commands:#?}");
    // The stop is in flight; a ping built before it landed still says running.
    let running = VmReport { name: v("vm-high"), state: VmRunState::Running, instance: None };
    harness.ping_with("host1", vec![running], StorageHealth::Ok);
    assert_eq!(harness.vm("vm-high").state, VmState::Stopped, "a stale running report undid the stop");
    // No answer to the stop: the host died with it in flight.
    harness.operator(OperatorAction::VmStopOutcome { vm: v("vm-high"), by: "alice".to_owned(), refused: None });
    let commands = harness.drive_to_fenced("host1");
    let started: Vec<String> = starts(&commands).into_iter().map(|(vm, _, _)| vm).collect();
    assert_eq!(started, vec!["vm-low".to_owned()], "the stopped VM was restarted: {commands:#?}");
    assert_eq!(harness.vm("vm-high").state, VmState::Stopped);
    assert_eq!(harness.vm("vm-high").host, None);
}

#[test]
fn an_operator_stop_during_recovery_cancels_the_pending_restart_with_an_audit_event() {
    let mut harness = Harness::new();
    harness.drive_to_fencing("host1");
    assert_eq!(harness.vm("vm-high").state, VmState::AwaitingProof);
    let commands = harness.operator(vm_stop("vm-high"));
    let cancelled = details(&commands, |kind| *kind == AuditKind::Operator);
    assert!(
        cancelled.iter().any(|line| line.contains("pending restart cancelled by an operator stop by alice")),
        "{commands:#?}"
    );
    assert_eq!(harness.vm("vm-high").state, VmState::Stopped);
    let commands = harness.fence_result("host1", FenceOutcome::PoweredOff { evidence: "read back off".to_owned() });
    let started: Vec<String> = starts(&commands).into_iter().map(|(vm, _, _)| vm).collect();
    assert_eq!(started, vec!["vm-low".to_owned()], "{commands:#?}");
    // Nothing later brings it back: ticks, capacity, pings.
    let commands = harness.advance(60_000, &["host2", "host3"]);
    assert!(starts(&commands).iter().all(|(vm, _, _)| vm != "vm-high"), "{commands:#?}");
    assert_eq!(harness.vm("vm-high").state, VmState::Stopped);
}

#[test]
fn an_operator_stop_refused_by_the_host_leaves_the_vm_protected_and_one_in_flight_start_refuses_it() {
    let mut harness = Harness::new();
    harness.operator(vm_stop("vm-high"));
    let refused = Some("domain is locked".to_owned());
    let commands =
        harness.operator(OperatorAction::VmStopOutcome { vm: v("vm-high"), by: "alice".to_owned(), refused });
    assert_eq!(harness.vm("vm-high").state, VmState::Running, "{commands:#?}");
    let commands = harness.drive_to_fenced("host1");
    let commands: Vec<Command> =
        commands.into_iter().chain(harness.advance(5_000, &["host2", "host3"])).collect::<Vec<_>>();
    let mut started: Vec<String> = starts(&commands).into_iter().map(|(vm, _, _)| vm).collect();
    // Unanswered starts are sent again at their deadline: the same work, counted once.
    started.sort();
    started.dedup();
    assert_eq!(started, vec!["vm-high".to_owned(), "vm-low".to_owned()], "{commands:#?}");
    // A start in flight is not interrupted: refused, retried by the operator later.
    assert_eq!(harness.vm("vm-high").state, VmState::Starting);
    let commands = harness.operator(vm_stop("vm-high"));
    assert_eq!(details(&commands, |kind| *kind == AuditKind::OperatorRefused).len(), 1, "{commands:#?}");
    assert_eq!(harness.vm("vm-high").state, VmState::Starting);
}

#[test]
fn a_host_is_removed_only_once_no_vm_depends_on_it() {
    let mut harness = Harness::new();
    let remove = |host: &str| OperatorAction::RemoveHost { host: h(host), by: "alice".to_owned() };
    let commands = harness.operator(remove("host1"));
    let refused = details(&commands, |kind| *kind == AuditKind::OperatorRefused);
    assert!(refused.len() == 1 && refused[0].contains("vm-high, vm-low"), "{commands:#?}");
    assert!(harness.engine.hosts().contains_key(&h("host1")));
    let commands = harness.operator(remove("host3"));
    assert_eq!(details(&commands, |kind| *kind == AuditKind::OperatorRefused), Vec::<String>::new());
    assert!(!harness.engine.hosts().contains_key(&h("host3")));
    // Its pings, reports and silence mean nothing now; nothing is placed on it.
    let commands = harness.advance(30_000, &["host1", "host2"]);
    assert_eq!(transitions(&commands), vec![], "{commands:#?}");
    let commands = harness.drive_to_fenced("host1");
    assert!(starts(&commands).iter().all(|(_, target, _)| target == "host2"), "{commands:#?}");
    let commands = harness.operator(remove("nohost"));
    assert_eq!(details(&commands, |kind| *kind == AuditKind::OperatorRefused).len(), 1);
}

// ----- scale: the VM index and batched steps -------------------------------------------------

#[test]
fn an_engine_restored_from_its_snapshot_finds_the_vms_of_a_host_it_fences() {
    let mut harness = Harness::new();
    let snapshot = serde_json::to_string(&harness.engine).expect("serializes");
    harness.engine = serde_json::from_str(&snapshot).expect("deserializes");
    // The index of VMs by host is not in the snapshot: the first step rebuilds it, so the
    // fence still holds host1's VMs and the proof still releases them.
    harness.drive_to_fencing("host1");
    assert_eq!(harness.vm("vm-high").state, VmState::AwaitingProof);
    assert_eq!(harness.vm("vm-low").state, VmState::AwaitingProof);
    let commands = harness.fence_result("host1", FenceOutcome::PoweredOff { evidence: "read back off".to_owned() });
    assert_eq!(starts(&commands).len(), 2, "{commands:#?}");
}

/// host1 (vm-high 5, vm-low 1) and host2 (vm-mid 3) both in Fencing; three idle hosts.
fn two_hosts_fencing() -> Harness {
    let hosts = [
        ("host1", true, true),
        ("host2", true, true),
        ("host3", true, true),
        ("host4", true, true),
        ("host5", true, true),
    ];
    let mut harness = Harness::with_hosts(&hosts);
    harness.step(Event::VmAdded { spec: vm_spec("vm-mid", 3), host: Some(h("host2")) });
    harness.advance(400, &["host1", "host2", "host3", "host4", "host5"]);
    harness.advance(800, &["host3", "host4", "host5"]);
    for host in ["host1", "host2"] {
        harness.report(host, InvestigatorKind::BmcPower, Finding::Dead, None);
        harness.report(host, InvestigatorKind::NeighbourPing, Finding::Unknown, None);
        let stale = harness.stale(host, 900, true, false);
        harness.report(host, InvestigatorKind::StorageHeartbeat, Finding::Dead, Some(stale));
        harness.report(host, InvestigatorKind::VmActivity, Finding::Unknown, None);
        assert_eq!(harness.state(host), HostState::Fencing);
    }
    harness
}

fn powered_off(harness: &Harness, host: &str) -> Event {
    Event::FenceResult(FenceResult {
        host: h(host),
        fence: harness.current_fence(host),
        outcome: FenceOutcome::PoweredOff { evidence: "read back off".to_owned() },
    })
}

#[test]
fn a_batch_of_hosts_proven_dead_is_planned_once_in_cluster_wide_priority_order() {
    let mut harness = two_hosts_fencing();
    let events = vec![powered_off(&harness, "host1"), powered_off(&harness, "host2")];
    let commands = harness.engine.step_batch(harness.now, events);
    assert_eq!(transitions(&commands), vec![t("host1", Fencing, Fenced), t("host2", Fencing, Fenced)]);
    let planned: Vec<String> = starts(&commands).into_iter().map(|(vm, _, _)| vm).collect();
    assert_eq!(planned, vec!["vm-high", "vm-mid", "vm-low"], "{commands:#?}");
    for (_, target, proof) in starts(&commands) {
        assert!(!["host1", "host2"].contains(&target.as_str()), "a start on a fenced host: {target}");
        assert_eq!(proof, Some(ProofKind::BmcPowerOff));
    }
}

#[test]
fn one_by_one_the_same_events_plan_each_host_as_its_proof_arrives() {
    // The contrast that shows the batch's single placement: stepped alone, host1's VMs
    // are planned before host2's proof is even known.
    let mut harness = two_hosts_fencing();
    let second = powered_off(&harness, "host2");
    let mut commands = harness.step(powered_off(&harness, "host1"));
    commands.extend(harness.step(second));
    let planned: Vec<String> = starts(&commands).into_iter().map(|(vm, _, _)| vm).collect();
    assert_eq!(planned, vec!["vm-high", "vm-low", "vm-mid"]);
}

#[test]
fn a_batch_without_releases_decides_what_the_same_steps_decide_alone() {
    let mut alone = Harness::new();
    let mut batched = Harness::new();
    let mut expected = Vec::new();
    let mut got = Vec::new();
    for _ in 0..3 {
        alone.now = Instant::from_millis(alone.now.as_millis() + 200);
        batched.now = alone.now;
        let pings = |harness: &mut Harness| -> Vec<Event> {
            ["host2", "host3"]
                .iter()
                .map(|host| {
                    let seq = harness.seq.entry(h(host)).or_default();
                    *seq += 1;
                    Event::Ping(Ping {
                        host: h(host),
                        boot_id: BootId(format!("{host}-boot1")),
                        seq: *seq,
                        vms: Vec::new(),
                        storage: StorageHealth::Ok,
                    })
                })
                .collect()
        };
        for event in pings(&mut alone).into_iter().chain([Event::Tick]) {
            expected.extend(alone.step(event));
        }
        let events: Vec<Event> = pings(&mut batched).into_iter().chain([Event::Tick]).collect();
        got.extend(batched.engine.step_batch(batched.now, events));
    }
    assert_eq!(format!("{got:?}"), format!("{expected:?}"));
}
