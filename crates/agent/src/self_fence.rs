//! When the agent self-fences (ARCHITECTURE.md §6): pure, time comes in as arguments.
//!
//! The agent self-fences only with an armed watchdog, only if the host may run HA VMs,
//! and only when no heartbeat write landed on ANY pool for `self_fence_after`, measured
//! on its own monotonic clock from the later of the last landed write and the expiry of
//! a storage hold the manager granted.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct SelfFenceInputs {
    pub watchdog_armed: bool,
    /// The HA VMs on this host: `None` when the agent cannot tell (no hypervisor driver
    /// yet, issue 6), which counts as "may have some".
    pub ha_vms: Option<usize>,
    /// Start of the latest heartbeat write that landed on any pool; before the first,
    /// when the agent started writing (or the remembered time from an earlier run).
    pub last_renewal: Instant,
    /// Until when the manager's storage hold is valid, if one was received.
    pub hold_until: Option<Instant>,
    pub self_fence_after: Duration,
}

/// Whether the agent must stop its HA VMs and stop petting its watchdog at `now`.
pub fn self_fence_due(inputs: &SelfFenceInputs, now: Instant) -> bool {
    if !inputs.watchdog_armed || inputs.ha_vms == Some(0) {
        return false;
    }
    let since = inputs.hold_until.map_or(inputs.last_renewal, |hold| hold.max(inputs.last_renewal));
    now.saturating_duration_since(since) >= inputs.self_fence_after
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(6);

    fn inputs(base: Instant) -> SelfFenceInputs {
        SelfFenceInputs {
            watchdog_armed: true,
            ha_vms: None,
            last_renewal: base,
            hold_until: None,
            self_fence_after: AFTER,
        }
    }

    #[test]
    fn fires_only_once_self_fence_after_has_passed_since_the_last_renewal() {
        let base = Instant::now();
        let fence = inputs(base);
        assert!(!self_fence_due(&fence, base + AFTER - Duration::from_millis(1)));
        assert!(self_fence_due(&fence, base + AFTER));
    }

    #[test]
    fn never_without_an_armed_watchdog_or_with_no_ha_vms() {
        let base = Instant::now();
        let later = base + AFTER * 10;
        assert!(!self_fence_due(&SelfFenceInputs { watchdog_armed: false, ..inputs(base) }, later));
        assert!(!self_fence_due(&SelfFenceInputs { ha_vms: Some(0), ..inputs(base) }, later));
        assert!(self_fence_due(&SelfFenceInputs { ha_vms: Some(2), ..inputs(base) }, later));
    }

    #[test]
    fn a_storage_hold_moves_the_clock_to_its_expiry() {
        let base = Instant::now();
        let hold_until = base + Duration::from_secs(20);
        let held = SelfFenceInputs { hold_until: Some(hold_until), ..inputs(base) };
        assert!(!self_fence_due(&held, base + AFTER));
        assert!(!self_fence_due(&held, hold_until + AFTER - Duration::from_millis(1)));
        assert!(self_fence_due(&held, hold_until + AFTER));
        // An old hold does not shorten the clock from a later renewal.
        let old_hold = SelfFenceInputs { hold_until: Some(base - Duration::from_secs(1)), ..inputs(base) };
        assert!(!self_fence_due(&old_hold, base + AFTER - Duration::from_millis(1)));
    }
}
