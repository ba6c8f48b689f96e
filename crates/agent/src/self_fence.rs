//! When the agent self-fences (ARCHITECTURE.md §6): pure, time comes in as arguments.
//!
//! The agent self-fences only with an armed watchdog, only if the host may run HA VMs,
//! and only when no heartbeat write landed on ANY pool for `self_fence_after`, measured
//! on its own monotonic clock from the later of the last landed write and the expiry of
//! a storage hold the manager granted.

use std::path::Path;
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

/// Time since boot (`/proc/uptime`): a clock that survives an agent restart within
/// one boot, unlike the process's `Instant`s.
pub(crate) fn uptime() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64(seconds))
}

/// Remembers `last_renewal` for this boot in `path` (written aside, then renamed), so
/// that a restarted agent does not restart its self-fence clock.
pub fn remember(path: &Path, boot_id: &str, last_renewal: Instant) -> std::io::Result<()> {
    let up = uptime().ok_or_else(|| std::io::Error::other("/proc/uptime unreadable"))?;
    let at = up.saturating_sub(last_renewal.elapsed());
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, format!("{boot_id} {}\n", at.as_millis()))?;
    std::fs::rename(&temporary, path)
}

/// The last renewal remembered in `path` by an earlier run in this same boot.
pub fn recall(path: &Path, boot_id: &str) -> Option<Instant> {
    let text = std::fs::read_to_string(path).ok()?;
    let (boot, millis) = text.trim().split_once(' ')?;
    if boot != boot_id {
        return None;
    }
    let at = Duration::from_millis(millis.parse().ok()?);
    let age = uptime()?.checked_sub(at)?;
    Instant::now().checked_sub(age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_renewal_is_remembered_within_one_boot_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("self-fence.state");
        assert_eq!(recall(&path, "boot-1"), None);
        let last = Instant::now() - Duration::from_secs(3);
        remember(&path, "boot-1", last).unwrap();
        let recalled = recall(&path, "boot-1").expect("remembered");
        // /proc/uptime has 10 ms resolution.
        let error = recalled.max(last) - recalled.min(last);
        assert!(error < Duration::from_millis(100), "{error:?}");
        assert_eq!(recall(&path, "boot-2"), None, "another boot's clock counts for nothing");
    }

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
