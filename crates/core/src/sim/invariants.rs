//! The invariants the simulator checks against ground truth, one per function, each
//! saying why it must hold.

use super::*;

impl World {
    /// `no_false_fence`: a host that is powered, running, with its agent up and its storage
    /// reachable keeps writing its heartbeat, so every investigation finds it alive. Fencing
    /// it would kill healthy VMs: the failure that makes operators switch HA off. The window
    /// allows for a fence decided just before the host recovered and its last retries.
    pub(super) fn check_fence(&mut self, target: usize) {
        let host = &self.hosts[target];
        let Some(since) = host.healthy_since else {
            return;
        };
        let healthy_for = self.now.saturating_since(since);
        let bound = self.timing.lease_renew_interval() * 3
            + self.timing.investigation_round() * 2
            + self.timing.fence_attempt_timeout() * 2
            + self.timing.ping_timeout();
        if healthy_for > bound {
            let detail = format!(
                "{} fenced while powered, running, agent up and storage reachable for {}ms",
                host.spec.name,
                duration_ms(healthy_for)
            );
            self.violation("no_false_fence", detail);
        }
    }

    /// `start_only_with_proof`: asking to start a VM that still runs elsewhere is the first
    /// half of a split brain. The agent's lease check is the last line of defence; the
    /// engine must never lean on it.
    pub(super) fn check_start(&mut self, vm: usize, target: usize, release: &Release) {
        let elsewhere: Vec<String> = self.vms[vm]
            .running_on
            .iter()
            .filter(|(host, _)| *host != target)
            .map(|(host, boot)| format!("{}-b{boot}", self.hosts[*host].spec.name))
            .collect();
        if !elsewhere.is_empty() {
            let detail = format!(
                "start of {} on {} requested while it runs on {} (release: {})",
                self.vms[vm].spec.name,
                self.hosts[target].spec.name,
                elsewhere.join(","),
                release.describe()
            );
            self.violation("start_only_with_proof", detail);
        }
    }

    /// `no_double_run`: two writers on one disk image corrupt it. This is the property kvmha
    /// exists for; a hung host's VMs count, since they resume when the host does.
    pub(super) fn check_double_run(&mut self, vm: usize) {
        if self.vms[vm].running_on.len() > 1 {
            let on: Vec<String> = self.vms[vm]
                .running_on
                .iter()
                .map(|(host, boot)| format!("{}-b{boot}", self.hosts[*host].spec.name))
                .collect();
            let detail = format!("{} runs on {}", self.vms[vm].spec.name, on.join(" and "));
            self.violation("no_double_run", detail);
        }
    }

    /// After every fault is healed, `recovery`: every HA VM that has room runs again (or
    /// ended in `Error` after spending its budget, or waits behind a host a human was paged
    /// about); and `no_silent_stall`: no host sits in a transient state without an alert.
    /// Safety alone is easy (never restart anything); this is what makes it HA.
    pub(super) fn check_liveness(&mut self) {
        let Some(engine) = self.engine.clone() else {
            self.violation("recovery", "manager still down at the end".to_owned());
            return;
        };
        for (index, host) in self.hosts.iter().enumerate() {
            let state = engine.host_state(&host.spec.name).expect("registered");
            if state.is_transient() && !self.alerted_hosts.contains(&index) {
                let detail = format!("{} still {state} after healing, without an alert", host.spec.name);
                self.violations.push(Violation { at_ms: self.now.as_millis(), invariant: "no_silent_stall", detail });
            }
        }
        for vm in &self.vms {
            if !vm.spec.ha {
                continue;
            }
            let running: Vec<usize> = vm
                .running_on
                .iter()
                .filter(|(host, boot)| self.hosts[*host].powered && self.hosts[*host].boot == *boot)
                .map(|(host, _)| *host)
                .collect();
            if running.len() == 1 {
                continue;
            }
            let record = &engine.vms()[&vm.spec.name];
            let excused = match record.state {
                VmState::Error | VmState::Stopped => true,
                VmState::AwaitingProof | VmState::Starting | VmState::Running => {
                    record.host.as_ref().is_some_and(|host| {
                        let state = engine.host_state(host);
                        let index = self.host_index(host).expect("known");
                        matches!(
                            state,
                            Some(
                                HostState::FenceFailed
                                    | HostState::Maintenance
                                    | HostState::Degraded
                                    | HostState::Investigating
                            )
                        ) && self.alerted_hosts.contains(&index)
                            || state == Some(HostState::Maintenance)
                    })
                }
                VmState::PendingCapacity => !self.has_room_for(&engine, vm),
            };
            if !excused {
                let detail = format!(
                    "HA vm {} not running after healing: engine says {} on {:?}",
                    vm.spec.name,
                    record.state,
                    record.host.as_ref().map(|host| (host.as_str(), engine.host_state(host)))
                );
                self.violations.push(Violation { at_ms: self.now.as_millis(), invariant: "recovery", detail });
            }
        }
    }

    /// Whether some healthy host, by the ground truth, has room for `vm` and budget left.
    fn has_room_for(&self, engine: &Engine, vm: &SimVm) -> bool {
        self.hosts.iter().enumerate().any(|(index, host)| {
            if !host.agent_alive() || !host.storage_up || !host.mgmt_up {
                return false;
            }
            if engine.host_state(&host.spec.name) != Some(HostState::Up) || !vm.spec.allows_host(&host.spec.name) {
                return false;
            }
            let used = self
                .vms
                .iter()
                .filter(|other| other.running_on.contains(&(index, host.boot)))
                .fold(Resources::default(), |used, other| used.plus(other.spec.demand));
            vm.spec.demand.fits_in(host.spec.capacity.saturating_sub(used))
                && engine.restart_budget_allows(&vm.spec.name, &host.spec.name, self.now)
        })
    }
}
