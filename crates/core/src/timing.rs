//! Timing profiles and the invariants that make them safe.
//!
//! Every timeout of kvmha lives here, validated together: a [`Timing`] value cannot hold a
//! combination in which a cut-off host could still run its VMs when another host may take
//! them over. Settings come from a profile (`fast`, `balanced`, `conservative`) with
//! optional per-field overrides; validation names the fields that conflict.

use crate::time::{duration_ms, format_duration};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A named set of timings. See `docs/timing.md` for what each guarantees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Fast,
    Balanced,
    Conservative,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Fast, Profile::Balanced, Profile::Conservative];

    pub fn name(self) -> &'static str {
        match self {
            Profile::Fast => "fast",
            Profile::Balanced => "balanced",
            Profile::Conservative => "conservative",
        }
    }

    /// The profile's settings, every field filled in.
    pub fn settings(self) -> TimingSettings {
        let ms = |value: u64| Some(value);
        match self {
            Profile::Fast => TimingSettings {
                ping_interval_ms: ms(200),
                ping_timeout_ms: ms(700),
                investigation_round_ms: ms(300),
                unknown_rounds_before_fence: Some(2),
                degraded_recheck_ms: ms(5_000),
                fence_attempt_timeout_ms: ms(1_500),
                fence_attempts_max: Some(3),
                fence_retry_backoff_ms: ms(200),
                lease_renew_interval_ms: ms(500),
                self_fence_after_ms: ms(6_000),
                watchdog_timeout_ms: ms(5_000),
                lease_takeover_after_ms: ms(14_000),
                reconnect_grace_ms: ms(3_000),
                vm_start_timeout_ms: ms(5_000),
                storage_hold_validity_ms: ms(2_000),
                clock_drift_max_ppm: Some(10_000),
            },
            Profile::Balanced => TimingSettings {
                ping_interval_ms: ms(1_000),
                ping_timeout_ms: ms(3_000),
                investigation_round_ms: ms(1_000),
                unknown_rounds_before_fence: Some(2),
                degraded_recheck_ms: ms(15_000),
                fence_attempt_timeout_ms: ms(3_000),
                fence_attempts_max: Some(3),
                fence_retry_backoff_ms: ms(500),
                lease_renew_interval_ms: ms(1_000),
                self_fence_after_ms: ms(10_000),
                watchdog_timeout_ms: ms(10_000),
                lease_takeover_after_ms: ms(25_000),
                reconnect_grace_ms: ms(10_000),
                vm_start_timeout_ms: ms(15_000),
                storage_hold_validity_ms: ms(5_000),
                clock_drift_max_ppm: Some(10_000),
            },
            Profile::Conservative => TimingSettings {
                ping_interval_ms: ms(2_000),
                ping_timeout_ms: ms(6_000),
                investigation_round_ms: ms(2_000),
                unknown_rounds_before_fence: Some(3),
                degraded_recheck_ms: ms(30_000),
                fence_attempt_timeout_ms: ms(5_000),
                fence_attempts_max: Some(4),
                fence_retry_backoff_ms: ms(1_000),
                lease_renew_interval_ms: ms(2_000),
                self_fence_after_ms: ms(20_000),
                watchdog_timeout_ms: ms(20_000),
                lease_takeover_after_ms: ms(50_000),
                reconnect_grace_ms: ms(20_000),
                vm_start_timeout_ms: ms(30_000),
                storage_hold_validity_ms: ms(10_000),
                clock_drift_max_ppm: Some(10_000),
            },
        }
    }
}

impl FromStr for Profile {
    type Err = TimingError;
    fn from_str(value: &str) -> Result<Profile, TimingError> {
        Profile::ALL
            .into_iter()
            .find(|profile| profile.name() == value)
            .ok_or_else(|| TimingError::UnknownProfile { value: value.to_owned() })
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Raw timing settings as a config file holds them: every field optional, so that a file
/// can override a profile field by field. Validated into [`Timing`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingSettings {
    /// How often an agent pings the manager.
    pub ping_interval_ms: Option<u64>,
    /// Silence after which a host becomes `Suspect`.
    pub ping_timeout_ms: Option<u64>,
    /// How long one investigation round waits for its investigators.
    pub investigation_round_ms: Option<u64>,
    /// Rounds that end `Unknown` before the host is fenced.
    pub unknown_rounds_before_fence: Option<u32>,
    /// How often a `Degraded` host is investigated again.
    pub degraded_recheck_ms: Option<u64>,
    /// Deadline for one power-off-and-verify attempt through the BMC.
    pub fence_attempt_timeout_ms: Option<u64>,
    /// BMC fence attempts before escalating to the lease path or the operator.
    pub fence_attempts_max: Option<u32>,
    /// Pause before the second fence attempt; doubles for each later one.
    pub fence_retry_backoff_ms: Option<u64>,
    /// How often an agent renews its heartbeat and VM leases.
    pub lease_renew_interval_ms: Option<u64>,
    /// Time without a successful renewal after which an agent stops its HA VMs.
    pub self_fence_after_ms: Option<u64>,
    /// Time without a keepalive after which the watchdog resets the host.
    pub watchdog_timeout_ms: Option<u64>,
    /// Time a lease must stay unchanged before another host may take it over.
    pub lease_takeover_after_ms: Option<u64>,
    /// After a manager start, time granted to agents to reconnect before anyone is suspect.
    pub reconnect_grace_ms: Option<u64>,
    /// Deadline for a VM start on its target host.
    pub vm_start_timeout_ms: Option<u64>,
    /// How long a "storage hold" (all paths down) told to an agent stays valid.
    pub storage_hold_validity_ms: Option<u64>,
    /// Largest rate difference between any two hosts' clocks, in parts per million.
    pub clock_drift_max_ppm: Option<u64>,
}

/// Validated timings. Fields are private: the only way in is [`Timing::validate`], so a
/// `Timing` always satisfies the safety invariants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TimingSettings", into = "TimingSettings")]
pub struct Timing {
    ping_interval: Duration,
    ping_timeout: Duration,
    investigation_round: Duration,
    unknown_rounds_before_fence: u32,
    degraded_recheck: Duration,
    fence_attempt_timeout: Duration,
    fence_attempts_max: u32,
    fence_retry_backoff: Duration,
    lease_renew_interval: Duration,
    self_fence_after: Duration,
    watchdog_timeout: Duration,
    lease_takeover_after: Duration,
    reconnect_grace: Duration,
    vm_start_timeout: Duration,
    storage_hold_validity: Duration,
    clock_drift_max_ppm: u64,
}

/// Why timing settings were refused. Each names the fields and numbers at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("unknown timing profile {value:?} (expected fast, balanced or conservative)")]
    UnknownProfile { value: String },
    #[error("{field} must be greater than zero")]
    Zero { field: &'static str },
    #[error("{field} = {value} is out of range: {rule}")]
    OutOfRange { field: &'static str, value: u64, rule: &'static str },
    #[error("unsafe timing: {detail}")]
    Conflict { detail: String },
}

/// The longest any single timing setting may be.
const TIMING_MAX_MS: u64 = 24 * 3600 * 1000;
/// The largest count setting (rounds, attempts).
const COUNT_MAX: u64 = 1000;

impl Timing {
    /// Fills `overrides` from `profile` and checks every invariant.
    pub fn from_profile(profile: Profile, overrides: &TimingSettings) -> Result<Timing, TimingError> {
        let base = profile.settings();
        let pick = |over: Option<u64>, base: Option<u64>| over.or(base);
        let merged = TimingSettings {
            ping_interval_ms: pick(overrides.ping_interval_ms, base.ping_interval_ms),
            ping_timeout_ms: pick(overrides.ping_timeout_ms, base.ping_timeout_ms),
            investigation_round_ms: pick(overrides.investigation_round_ms, base.investigation_round_ms),
            unknown_rounds_before_fence: overrides.unknown_rounds_before_fence.or(base.unknown_rounds_before_fence),
            degraded_recheck_ms: pick(overrides.degraded_recheck_ms, base.degraded_recheck_ms),
            fence_attempt_timeout_ms: pick(overrides.fence_attempt_timeout_ms, base.fence_attempt_timeout_ms),
            fence_attempts_max: overrides.fence_attempts_max.or(base.fence_attempts_max),
            fence_retry_backoff_ms: pick(overrides.fence_retry_backoff_ms, base.fence_retry_backoff_ms),
            lease_renew_interval_ms: pick(overrides.lease_renew_interval_ms, base.lease_renew_interval_ms),
            self_fence_after_ms: pick(overrides.self_fence_after_ms, base.self_fence_after_ms),
            watchdog_timeout_ms: pick(overrides.watchdog_timeout_ms, base.watchdog_timeout_ms),
            lease_takeover_after_ms: pick(overrides.lease_takeover_after_ms, base.lease_takeover_after_ms),
            reconnect_grace_ms: pick(overrides.reconnect_grace_ms, base.reconnect_grace_ms),
            vm_start_timeout_ms: pick(overrides.vm_start_timeout_ms, base.vm_start_timeout_ms),
            storage_hold_validity_ms: pick(overrides.storage_hold_validity_ms, base.storage_hold_validity_ms),
            clock_drift_max_ppm: pick(overrides.clock_drift_max_ppm, base.clock_drift_max_ppm),
        };
        Timing::validate(&merged)
    }

    /// Checks a fully specified set of settings.
    pub fn validate(settings: &TimingSettings) -> Result<Timing, TimingError> {
        fn required(field: &'static str, value: Option<u64>) -> Result<u64, TimingError> {
            match value {
                None | Some(0) => Err(TimingError::Zero { field }),
                Some(value) => Ok(value),
            }
        }
        // Upper limits keep every sum and product of timings far from overflow (a panic),
        // and keep loops over attempts short; nothing sensible comes near them.
        fn at_most(field: &'static str, value: u64, limit: u64, rule: &'static str) -> Result<u64, TimingError> {
            if value > limit {
                return Err(TimingError::OutOfRange { field, value, rule });
            }
            Ok(value)
        }
        let ms = |field: &'static str, value: Option<u64>| {
            required(field, value)
                .and_then(|value| at_most(field, value, TIMING_MAX_MS, "at most 86400000 (one day)"))
                .map(Duration::from_millis)
        };
        let count = |field: &'static str, value: Option<u32>| {
            required(field, value.map(u64::from)).and_then(|value| at_most(field, value, COUNT_MAX, "at most 1000"))
        };

        let timing = Timing {
            ping_interval: ms("ping_interval_ms", settings.ping_interval_ms)?,
            ping_timeout: ms("ping_timeout_ms", settings.ping_timeout_ms)?,
            investigation_round: ms("investigation_round_ms", settings.investigation_round_ms)?,
            unknown_rounds_before_fence: count("unknown_rounds_before_fence", settings.unknown_rounds_before_fence)?
                as u32,
            degraded_recheck: ms("degraded_recheck_ms", settings.degraded_recheck_ms)?,
            fence_attempt_timeout: ms("fence_attempt_timeout_ms", settings.fence_attempt_timeout_ms)?,
            fence_attempts_max: count("fence_attempts_max", settings.fence_attempts_max)? as u32,
            fence_retry_backoff: ms("fence_retry_backoff_ms", settings.fence_retry_backoff_ms)?,
            lease_renew_interval: ms("lease_renew_interval_ms", settings.lease_renew_interval_ms)?,
            self_fence_after: ms("self_fence_after_ms", settings.self_fence_after_ms)?,
            watchdog_timeout: ms("watchdog_timeout_ms", settings.watchdog_timeout_ms)?,
            lease_takeover_after: ms("lease_takeover_after_ms", settings.lease_takeover_after_ms)?,
            reconnect_grace: ms("reconnect_grace_ms", settings.reconnect_grace_ms)?,
            vm_start_timeout: ms("vm_start_timeout_ms", settings.vm_start_timeout_ms)?,
            storage_hold_validity: ms("storage_hold_validity_ms", settings.storage_hold_validity_ms)?,
            clock_drift_max_ppm: settings.clock_drift_max_ppm.unwrap_or(0),
        };
        timing.check_invariants()?;
        Ok(timing)
    }

    fn check_invariants(&self) -> Result<(), TimingError> {
        if self.clock_drift_max_ppm > 100_000 {
            return Err(TimingError::OutOfRange {
                field: "clock_drift_max_ppm",
                value: self.clock_drift_max_ppm,
                rule: "at most 100000 (10 %)",
            });
        }
        // Watchdog devices count whole seconds; a fractional timeout would be rounded by
        // the kernel driver to something we did not validate.
        let watchdog_ms = duration_ms(self.watchdog_timeout);
        if watchdog_ms % 1000 != 0 {
            return Err(TimingError::OutOfRange {
                field: "watchdog_timeout_ms",
                value: watchdog_ms,
                rule: "a whole number of seconds (watchdog devices count seconds)",
            });
        }
        // One lost ping must never make a host suspect.
        if self.ping_timeout < self.ping_interval * 2 {
            return Err(conflict(format!(
                "ping_timeout_ms ({}) must be at least twice ping_interval_ms ({}) so one lost ping is tolerated",
                duration_ms(self.ping_timeout),
                duration_ms(self.ping_interval)
            )));
        }
        // One failed renewal must never make a healthy host kill its VMs.
        if self.self_fence_after < self.lease_renew_interval * 2 {
            return Err(conflict(format!(
                "self_fence_after_ms ({}) must be at least twice lease_renew_interval_ms ({}) so one failed renewal is tolerated",
                duration_ms(self.self_fence_after),
                duration_ms(self.lease_renew_interval)
            )));
        }
        // The rule everything rests on: a host that stopped renewing has killed its VMs, or
        // been reset by its watchdog, before any other host may take a lease over, even if
        // its clock runs slower than the reader's by the allowed drift, and even if its
        // last renewal landed just after the reader looked.
        let host_side = self.worst_case_self_fence();
        if host_side >= self.lease_takeover_after {
            return Err(conflict(format!(
                "self_fence_after_ms ({}) + watchdog_timeout_ms ({}), stretched by clock_drift_max_ppm ({}), plus lease_renew_interval_ms ({}) = {}ms must be shorter than lease_takeover_after_ms ({})",
                duration_ms(self.self_fence_after),
                duration_ms(self.watchdog_timeout),
                self.clock_drift_max_ppm,
                duration_ms(self.lease_renew_interval),
                duration_ms(host_side),
                duration_ms(self.lease_takeover_after)
            )));
        }
        // A VM start must be able to fail and be retried before the next takeover window.
        if self.vm_start_timeout < self.ping_interval {
            return Err(conflict(format!(
                "vm_start_timeout_ms ({}) must be at least ping_interval_ms ({})",
                duration_ms(self.vm_start_timeout),
                duration_ms(self.ping_interval)
            )));
        }
        Ok(())
    }

    /// The longest a host may keep running VMs after its last successful renewal, measured
    /// on a reader's clock: self-fence plus watchdog, stretched by clock drift, plus one
    /// renewal interval for a renewal that lands just after a read.
    pub fn worst_case_self_fence(&self) -> Duration {
        let host_side = self.self_fence_after + self.watchdog_timeout;
        let stretch = duration_ms(host_side).saturating_mul(self.clock_drift_max_ppm) / 1_000_000;
        host_side + Duration::from_millis(stretch) + self.lease_renew_interval
    }

    /// Upper bound on how long a host can stay in `Fencing` before it is `Fenced` or
    /// `FenceFailed`: every BMC attempt with its back-off, or the lease path, whichever is
    /// longer, plus one investigation round to observe the lease.
    pub fn fencing_bound(&self) -> Duration {
        let mut bmc = Duration::ZERO;
        for attempt in 0..self.fence_attempts_max {
            bmc += self.fence_attempt_timeout + self.fence_backoff(attempt + 1);
        }
        bmc.max(self.lease_takeover_after + self.investigation_round * 2) + self.investigation_round
    }

    /// Pause before fence attempt `attempt` (1-based): none before the first, then
    /// exponential, capped so that a long series stays bounded.
    pub fn fence_backoff(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (attempt - 2).min(5);
        self.fence_retry_backoff * factor
    }

    pub fn ping_interval(&self) -> Duration {
        self.ping_interval
    }
    pub fn ping_timeout(&self) -> Duration {
        self.ping_timeout
    }
    pub fn investigation_round(&self) -> Duration {
        self.investigation_round
    }
    pub fn unknown_rounds_before_fence(&self) -> u32 {
        self.unknown_rounds_before_fence
    }
    pub fn degraded_recheck(&self) -> Duration {
        self.degraded_recheck
    }
    pub fn fence_attempt_timeout(&self) -> Duration {
        self.fence_attempt_timeout
    }
    pub fn fence_attempts_max(&self) -> u32 {
        self.fence_attempts_max
    }
    pub fn fence_retry_backoff(&self) -> Duration {
        self.fence_retry_backoff
    }
    pub fn lease_renew_interval(&self) -> Duration {
        self.lease_renew_interval
    }
    pub fn self_fence_after(&self) -> Duration {
        self.self_fence_after
    }
    pub fn watchdog_timeout(&self) -> Duration {
        self.watchdog_timeout
    }
    pub fn lease_takeover_after(&self) -> Duration {
        self.lease_takeover_after
    }
    pub fn reconnect_grace(&self) -> Duration {
        self.reconnect_grace
    }
    pub fn vm_start_timeout(&self) -> Duration {
        self.vm_start_timeout
    }
    pub fn storage_hold_validity(&self) -> Duration {
        self.storage_hold_validity
    }
    pub fn clock_drift_max_ppm(&self) -> u64 {
        self.clock_drift_max_ppm
    }

    /// One line for logs and the audit trail.
    pub fn summary(&self) -> String {
        format!(
            "ping {} / timeout {}, round {}, fence attempt {} x{}, renew {}, self-fence {}, watchdog {}, takeover {}",
            format_duration(self.ping_interval),
            format_duration(self.ping_timeout),
            format_duration(self.investigation_round),
            format_duration(self.fence_attempt_timeout),
            self.fence_attempts_max,
            format_duration(self.lease_renew_interval),
            format_duration(self.self_fence_after),
            format_duration(self.watchdog_timeout),
            format_duration(self.lease_takeover_after),
        )
    }
}

fn conflict(detail: String) -> TimingError {
    TimingError::Conflict { detail }
}

impl TryFrom<TimingSettings> for Timing {
    type Error = TimingError;
    fn try_from(settings: TimingSettings) -> Result<Timing, TimingError> {
        Timing::validate(&settings)
    }
}

impl From<Timing> for TimingSettings {
    fn from(timing: Timing) -> TimingSettings {
        let ms = |duration: Duration| Some(duration_ms(duration));
        TimingSettings {
            ping_interval_ms: ms(timing.ping_interval),
            ping_timeout_ms: ms(timing.ping_timeout),
            investigation_round_ms: ms(timing.investigation_round),
            unknown_rounds_before_fence: Some(timing.unknown_rounds_before_fence),
            degraded_recheck_ms: ms(timing.degraded_recheck),
            fence_attempt_timeout_ms: ms(timing.fence_attempt_timeout),
            fence_attempts_max: Some(timing.fence_attempts_max),
            fence_retry_backoff_ms: ms(timing.fence_retry_backoff),
            lease_renew_interval_ms: ms(timing.lease_renew_interval),
            self_fence_after_ms: ms(timing.self_fence_after),
            watchdog_timeout_ms: ms(timing.watchdog_timeout),
            lease_takeover_after_ms: ms(timing.lease_takeover_after),
            reconnect_grace_ms: ms(timing.reconnect_grace),
            vm_start_timeout_ms: ms(timing.vm_start_timeout),
            storage_hold_validity_ms: ms(timing.storage_hold_validity),
            clock_drift_max_ppm: Some(timing.clock_drift_max_ppm),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_is_valid() {
        for profile in Profile::ALL {
            let timing = Timing::from_profile(profile, &TimingSettings::default());
            assert!(timing.is_ok(), "{profile}: {timing:?}");
        }
    }

    /// Found by review for issue 10: `fence_attempts_max = 4000000000` looped four billion
    /// times in `fencing_bound`, and huge timeouts overflowed its sum (a panic in the
    /// engine, long after the config was accepted). Both are refused at load now.
    #[test]
    fn absurdly_large_timings_are_refused_naming_the_field() {
        let attempts = TimingSettings { fence_attempts_max: Some(4_000_000_000), ..TimingSettings::default() };
        let error = Timing::from_profile(Profile::Fast, &attempts).unwrap_err().to_string();
        assert!(error.contains("fence_attempts_max"), "{error}");
        let huge = TimingSettings { fence_attempt_timeout_ms: Some(i64::MAX as u64), ..TimingSettings::default() };
        let error = Timing::from_profile(Profile::Conservative, &huge).unwrap_err().to_string();
        assert!(error.contains("fence_attempt_timeout_ms") && error.contains("one day"), "{error}");
    }

    #[test]
    fn self_fence_slower_than_takeover_is_refused_and_named() {
        let overrides = TimingSettings { self_fence_after_ms: Some(12_000), ..TimingSettings::default() };
        let error = Timing::from_profile(Profile::Fast, &overrides).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("self_fence_after_ms (12000)"), "{message}");
        assert!(message.contains("lease_takeover_after_ms (14000)"), "{message}");
    }

    #[test]
    fn clock_drift_counts_against_the_margin() {
        // 6000 + 5000 + 500 = 11500 fits under 12000 without drift, not with 10 % drift.
        let base = TimingSettings {
            lease_takeover_after_ms: Some(12_000),
            clock_drift_max_ppm: Some(0),
            ..TimingSettings::default()
        };
        assert!(Timing::from_profile(Profile::Fast, &base).is_ok());
        let drifting = TimingSettings { clock_drift_max_ppm: Some(100_000), ..base };
        assert!(matches!(Timing::from_profile(Profile::Fast, &drifting), Err(TimingError::Conflict { .. })));
    }

    #[test]
    fn zero_and_fractional_watchdog_are_refused() {
        let zero = TimingSettings { ping_interval_ms: Some(0), ..TimingSettings::default() };
        assert_eq!(Timing::from_profile(Profile::Fast, &zero), Err(TimingError::Zero { field: "ping_interval_ms" }));
        let fractional = TimingSettings { watchdog_timeout_ms: Some(4_500), ..TimingSettings::default() };
        let error = Timing::from_profile(Profile::Fast, &fractional).unwrap_err();
        assert!(error.to_string().contains("watchdog_timeout_ms = 4500"), "{error}");
    }

    #[test]
    fn ping_timeout_must_tolerate_one_lost_ping() {
        let tight = TimingSettings { ping_timeout_ms: Some(300), ..TimingSettings::default() };
        let error = Timing::from_profile(Profile::Fast, &tight).unwrap_err();
        assert!(error.to_string().contains("ping_timeout_ms (300)"), "{error}");
    }

    #[test]
    fn unknown_profile_is_named() {
        let error = "turbo".parse::<Profile>().unwrap_err();
        assert!(error.to_string().contains("\"turbo\""));
        assert_eq!("balanced".parse::<Profile>(), Ok(Profile::Balanced));
    }

    #[test]
    fn serde_round_trip_revalidates() {
        let timing = Timing::from_profile(Profile::Balanced, &TimingSettings::default()).unwrap();
        let json = serde_json::to_string(&timing).unwrap();
        let back: Timing = serde_json::from_str(&json).unwrap();
        assert_eq!(back, timing);
        let unsafe_json = json.replace("\"lease_takeover_after_ms\":25000", "\"lease_takeover_after_ms\":1000");
        assert!(serde_json::from_str::<Timing>(&unsafe_json).is_err());
    }

    #[test]
    fn backoff_doubles_and_is_bounded() {
        let timing = Timing::from_profile(Profile::Fast, &TimingSettings::default()).unwrap();
        assert_eq!(timing.fence_backoff(1), Duration::ZERO);
        assert_eq!(timing.fence_backoff(2), Duration::from_millis(200));
        assert_eq!(timing.fence_backoff(3), Duration::from_millis(400));
        assert_eq!(timing.fence_backoff(40), Duration::from_millis(200 * 32));
    }
}
