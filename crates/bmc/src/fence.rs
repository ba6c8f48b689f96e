//! Fencing: power a host off and prove it by reading the state back.
//!
//! The safety rule (ARCHITECTURE.md §5) only accepts "the BMC confirmed
//! power off after our command, read back, not assumed". So a fence
//! succeeds only on a status read that says off; an accepted power-off
//! alone proves nothing, and an error from power-off disproves nothing (a
//! dead chassis may refuse the command while being off).

use crate::error::{BmcError, Result};
use crate::{PowerControl, PowerState};
use std::time::Duration;
use tokio::time::Instant;

/// How hard to try. Every wait is bounded by `deadline`.
#[derive(Debug, Clone)]
pub struct Fencer {
    /// Off must be read back within this long from the start of the fence.
    pub deadline: Duration,
    /// Pause between status reads while waiting for off.
    pub poll_interval: Duration,
    /// Power-off commands sent at most (re-sent while the state stays on).
    pub power_off_attempts_max: u32,
    /// Re-send power off when the state still reads on this long after the last one.
    pub resend_after: Duration,
    /// Fence through a BMC whose answers are not authenticated (IPMI
    /// cipher suite 0). Off by default: anyone on the BMC network could
    /// forge the "off" read-back, and a fence would then "succeed" on a
    /// host that is still running. When set, the evidence says so.
    pub allow_unauthenticated_fence: bool,
}

/// Evidence marker of a fence whose read-back nobody authenticated.
pub const UNAUTHENTICATED_SUITE_ZERO: &str = "UNAUTHENTICATED (cipher suite 0)";

impl Default for Fencer {
    fn default() -> Self {
        Fencer {
            deadline: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            power_off_attempts_max: 3,
            resend_after: Duration::from_secs(5),
            allow_unauthenticated_fence: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceOutcome {
    /// Our power-off was accepted and a later status read said off.
    PoweredOff,
    /// The host read off without an accepted power-off from us (it was off
    /// before, or it went off while the BMC refused our command).
    AlreadyOff,
}

/// What the manager needs for the safety rule and the audit log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FenceReport {
    pub outcome: FenceOutcome,
    /// `PowerControl::target()` of the BMC used.
    pub target: String,
    /// Power-off commands sent (accepted or not).
    pub power_off_attempts: u32,
    pub status_reads: u32,
    #[serde(rename = "elapsed_ms", serialize_with = "serialize_millis")]
    pub elapsed: Duration,
    /// One line for the audit log, e.g. "bmc 10.0.3.11:623 ipmi: power off
    /// sent, read back off after 180ms".
    pub evidence: String,
}

fn serialize_millis<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(duration.as_millis() as u64)
}

/// Errors no retry can fix: stop at once rather than hammer the BMC (and
/// lock the account) until the deadline.
fn is_fatal(error: &BmcError) -> bool {
    matches!(error, BmcError::Authentication { .. } | BmcError::Config { .. } | BmcError::Negotiation { .. })
}

impl Fencer {
    pub async fn fence(&self, bmc: &dyn PowerControl) -> Result<FenceReport> {
        let started = Instant::now();
        let deadline = started + self.deadline;
        let target = bmc.target();
        let unauthenticated = bmc.unauthenticated();
        if let Some(why) = unauthenticated {
            if !self.allow_unauthenticated_fence {
                return Err(BmcError::Config {
                    reason: format!(
                        "refusing to fence through bmc {target}: {why}; anyone on the bmc network could forge \
                         the power-off read-back (allow it explicitly with allow_unauthenticated_fence)"
                    ),
                });
            }
            tracing::warn!(target = %target, why, "fencing with unauthenticated bmc answers, as explicitly allowed");
        }
        let mut power_off_attempts = 0u32;
        let mut status_reads = 0u32;
        let mut power_off_accepted = false;
        let mut power_off_refusal: Option<BmcError> = None;
        let mut last_error: Option<BmcError> = None;
        let mut last_state: Option<PowerState> = None;
        let mut last_power_off_at: Option<Instant> = None;

        let report = |outcome: FenceOutcome, attempts: u32, reads: u32, note: String| {
            let elapsed = started.elapsed();
            let evidence = match unauthenticated {
                None => format!("bmc {target}: {note}, read back off after {}ms", elapsed.as_millis()),
                Some(why) => format!("bmc {target}: {why}: {note}, read back off after {}ms", elapsed.as_millis()),
            };
            tracing::info!(target = %target, ?outcome, attempts, reads, elapsed_ms = elapsed.as_millis() as u64, "fence verified");
            FenceReport {
                outcome,
                target: target.clone(),
                power_off_attempts: attempts,
                status_reads: reads,
                elapsed,
                evidence,
            }
        };

        // Read first: a host that is already off needs no command, and the
        // read also tells "unreachable" from "refused" early.
        status_reads += 1;
        match bounded(deadline, "status", bmc.status()).await {
            Ok(PowerState::Off) => {
                return Ok(report(FenceOutcome::AlreadyOff, 0, status_reads, "already off, no power off needed".into()))
            }
            Ok(PowerState::On) => last_state = Some(PowerState::On),
            Err(error) if is_fatal(&error) => return Err(error),
            Err(error) => last_error = Some(error),
        }

        loop {
            // A status read that used up the whole budget (an unreachable BMC) must
            // stay the reported cause: a power off sent with nothing left of the
            // deadline could only time out at once and hide it.
            if Instant::now() >= deadline {
                break;
            }
            let resend_due = match last_power_off_at {
                None => true,
                Some(at) => at.elapsed() >= self.resend_after,
            };
            if power_off_attempts < self.power_off_attempts_max && resend_due {
                power_off_attempts += 1;
                last_power_off_at = Some(Instant::now());
                tracing::info!(target = %target, attempt = power_off_attempts, "fence: power off");
                match bounded(deadline, "power off", bmc.power_off()).await {
                    Ok(()) => power_off_accepted = true,
                    Err(error) if is_fatal(&error) => return Err(error),
                    // Not trusted either way: the read-back below decides.
                    Err(error @ BmcError::Refused { .. }) => {
                        tracing::warn!(target = %target, %error, "fence: power off refused, reading state back");
                        power_off_refusal = Some(error);
                    }
                    Err(error) => {
                        tracing::warn!(target = %target, %error, "fence: power off failed, reading state back");
                        last_error = Some(error);
                    }
                }
            }

            if Instant::now() >= deadline {
                break;
            }
            status_reads += 1;
            match bounded(deadline, "status", bmc.status()).await {
                Ok(PowerState::Off) => {
                    let (outcome, note) = if power_off_accepted {
                        (FenceOutcome::PoweredOff, "power off sent".to_string())
                    } else if let Some(refusal) = &power_off_refusal {
                        (FenceOutcome::AlreadyOff, format!("power off not accepted ({refusal})"))
                    } else {
                        (FenceOutcome::AlreadyOff, "power off unanswered".to_string())
                    };
                    return Ok(report(outcome, power_off_attempts, status_reads, note));
                }
                Ok(PowerState::On) => last_state = Some(PowerState::On),
                Err(error) if is_fatal(&error) => return Err(error),
                Err(error) => last_error = Some(error),
            }

            let now = Instant::now();
            if now + self.poll_interval >= deadline {
                break;
            }
            tokio::time::sleep(self.poll_interval).await;
        }

        let after_ms = started.elapsed().as_millis() as u64;
        tracing::warn!(target = %target, power_off_attempts, status_reads, after_ms, "fence failed: off never read back");
        // Pick the error that best explains why off was never proven.
        if let (false, Some(refusal)) = (power_off_accepted, power_off_refusal) {
            return Err(refusal);
        }
        if power_off_accepted && last_state == Some(PowerState::On) {
            return Err(BmcError::StateNeverReached { wanted: PowerState::Off, last: "on".into(), after_ms });
        }
        if let Some(error) = last_error {
            return Err(error);
        }
        Err(BmcError::StateNeverReached {
            wanted: PowerState::Off,
            last: last_state.map_or("unknown".into(), |state| state.to_string()),
            after_ms,
        })
    }
}

/// Bounds one BMC call by what is left of the fence deadline.
async fn bounded<T>(
    deadline: Instant,
    operation: &str,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(remaining, call).await {
        Ok(outcome) => outcome,
        Err(_elapsed) => {
            Err(BmcError::Timeout { operation: format!("fence {operation}"), after_ms: remaining.as_millis() as u64 })
        }
    }
}
