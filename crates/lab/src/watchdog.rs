//! The lab watchdog: what /dev/watchdog is to a real host, minus the hardware.
//!
//! The machine has no watchdog device, so each lab host gets a plain file (outside
//! its namespaces, reachable from inside through the shared mount tree) that the
//! agent writes to exactly as it would write to /dev/watchdog: any write pets it,
//! a write ending in the magic character 'V' disarms it. The controller polls the
//! file's length and last byte; once armed, a silence longer than the timeout resets
//! the host (power off, power on), as a hardware watchdog would. After a reset the
//! watchdog is disarmed until the new boot writes again, like a freshly booted board.
//!
//! This module is the pure state machine; the lab controller feeds it observations.

/// The magic-close character of the Linux watchdog API.
pub const MAGIC_DISARM: u8 = b'V';

/// What the controller must do after an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogAction {
    Nothing,
    /// The host stopped petting in time: reset it.
    Reset,
}

/// One host's watchdog.
#[derive(Debug, Clone)]
pub struct Watchdog {
    timeout_ms: u64,
    armed: bool,
    last_length: u64,
    last_pet_ms: u64,
}

impl Watchdog {
    pub fn new(timeout_ms: u64) -> Watchdog {
        assert!(timeout_ms > 0, "a zero watchdog timeout would reset at once");
        Watchdog { timeout_ms, armed: false, last_length: 0, last_pet_ms: 0 }
    }

    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// The host lost power: the watchdog stops and stays disarmed until the next
    /// write after power returns (`length` is the file's length now, so that old
    /// writes do not count as new).
    pub fn power_lost(&mut self, length: u64) {
        self.armed = false;
        self.last_length = length;
    }

    /// Feeds the file's current length and last byte at time `now_ms`.
    ///
    /// Any change of length counts as a write (the file may also have been truncated
    /// and rewritten by a new agent).
    pub fn observe(&mut self, now_ms: u64, length: u64, last_byte: Option<u8>) -> WatchdogAction {
        if length != self.last_length {
            self.last_length = length;
            self.last_pet_ms = now_ms;
            self.armed = last_byte != Some(MAGIC_DISARM);
            return WatchdogAction::Nothing;
        }
        let silent_ms = now_ms.saturating_sub(self.last_pet_ms);
        if self.armed && silent_ms > self.timeout_ms {
            self.armed = false;
            return WatchdogAction::Reset;
        }
        WatchdogAction::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unarmed_watchdog_never_resets() {
        let mut watchdog = Watchdog::new(1_000);
        for now_ms in (0..10_000).step_by(100) {
            assert_eq!(watchdog.observe(now_ms, 0, None), WatchdogAction::Nothing);
        }
    }

    #[test]
    fn petting_keeps_the_host_and_silence_resets_it_once() {
        let mut watchdog = Watchdog::new(1_000);
        let mut length = 0;
        for now_ms in (0..5_000).step_by(500) {
            length += 1;
            assert_eq!(watchdog.observe(now_ms, length, Some(b'1')), WatchdogAction::Nothing);
        }
        assert!(watchdog.is_armed());
        assert_eq!(watchdog.observe(5_400, length, Some(b'1')), WatchdogAction::Nothing);
        assert_eq!(watchdog.observe(5_600, length, Some(b'1')), WatchdogAction::Reset);
        // Disarmed after the reset: the rebooted host must write again to arm it.
        assert_eq!(watchdog.observe(9_000, length, Some(b'1')), WatchdogAction::Nothing);
        assert!(!watchdog.is_armed());
    }

    #[test]
    fn power_loss_stops_the_watchdog_until_the_next_write() {
        let mut watchdog = Watchdog::new(1_000);
        watchdog.observe(0, 1, Some(b'1'));
        watchdog.power_lost(1);
        assert!(!watchdog.is_armed());
        assert_eq!(watchdog.observe(5_000, 1, Some(b'1')), WatchdogAction::Nothing);
        watchdog.observe(6_000, 2, Some(b'1'));
        assert_eq!(watchdog.observe(7_100, 2, Some(b'1')), WatchdogAction::Reset);
    }

    #[test]
    fn magic_v_disarms_and_a_later_write_rearms() {
        let mut watchdog = Watchdog::new(1_000);
        watchdog.observe(0, 1, Some(b'1'));
        watchdog.observe(100, 2, Some(MAGIC_DISARM));
        assert_eq!(watchdog.observe(10_000, 2, Some(MAGIC_DISARM)), WatchdogAction::Nothing);
        watchdog.observe(10_100, 3, Some(b'1'));
        assert_eq!(watchdog.observe(11_200, 3, Some(b'1')), WatchdogAction::Reset);
    }
}
