//! Time as the engine sees it: a monotonic millisecond count handed in by the caller.
//!
//! The core never reads a clock. The manager passes its own monotonic time; the simulator
//! passes a fake one. Durations are `std::time::Duration`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on the manager's monotonic clock, in milliseconds since an origin the caller picks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Instant(u64);

impl Instant {
    pub const ZERO: Instant = Instant(0);

    pub const fn from_millis(ms: u64) -> Instant {
        Instant(ms)
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Time elapsed since `earlier`, or zero if `earlier` is in the future: a caller whose
    /// clock went backwards must never produce a huge "elapsed" that looks like a timeout.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, rhs: Duration) -> Instant {
        Instant(self.0.saturating_add(duration_ms(rhs)))
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, rhs: Duration) -> Instant {
        Instant(self.0.saturating_sub(duration_ms(rhs)))
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

/// Whole milliseconds of a duration, saturating: timings in kvmha are configured in ms.
pub fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Human form of a duration for evidence strings: "14.2s", "350ms".
pub fn format_duration(duration: Duration) -> String {
    let ms = duration_ms(duration);
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturating_since_never_underflows() {
        let early = Instant::from_millis(100);
        let late = Instant::from_millis(350);
        assert_eq!(late.saturating_since(early), Duration::from_millis(250));
        assert_eq!(early.saturating_since(late), Duration::ZERO);
    }

    #[test]
    fn formats_durations_for_people() {
        assert_eq!(format_duration(Duration::from_millis(350)), "350ms");
        assert_eq!(format_duration(Duration::from_millis(14_250)), "14.2s");
    }
}
