//! The timing rule that makes lease expiry proof of safety, checked up front.
//!
//! Standalone on purpose: the core crate has its own timing profile; it can map its
//! numbers onto [`LeaseTimings`] and call [`LeaseTimings::check`] when a config loads.
//!
//! The clocks involved: the holder times its self-fence deadline from the *start* of
//! its last successful renewal write (the write landed at or after that instant). A
//! would-be taker times the expiry from its first read that saw that renewal (at or
//! after the landing). So if `self_fence_deadline + watchdog_timeout < lease_expiry`,
//! the holder has stopped its VMs (or the watchdog has reset it) before any taker's
//! clock can reach the expiry, whatever the two clocks read. The rule assumes the two
//! monotonic clocks run at about the same rate: keep a margin of a few percent.

use std::time::Duration;

use crate::error::{Result, StorageError};

/// The numbers the agent and the lease algorithm run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How often the holder renews each lease (and writes its heartbeat).
    pub renewal_interval: Duration,
    /// Deadline of one storage operation; an operation not answered by then is
    /// "unknown" and retried at the next renewal.
    pub io_timeout: Duration,
    /// After this long without a successful renewal (on the holder's clock) the agent
    /// *has stopped* its HA VMs: it must start the hard stop early enough for the stop
    /// itself to finish by then. Counted from the start of the last successful renewal
    /// write ([`crate::HeldLease::self_fence_due_at`]).
    pub self_fence_deadline: Duration,
    /// After the agent stops petting it, the watchdog resets the host within this.
    pub watchdog_timeout: Duration,
    /// How long another host must see a lease unchanged (on its clock) before it may
    /// take the lease over.
    pub lease_expiry: Duration,
}

impl LeaseTimings {
    /// How long an acquirer waits between writing its claim and re-reading it. Every
    /// concurrent acquirer that read the record before our claim landed must have its
    /// own claim land within two i/o timeouts of its read (it gives up otherwise), so
    /// waiting longer than that means the re-read sees any claim that could beat ours.
    pub fn acquire_delay(&self) -> Duration {
        self.io_timeout * 2 + self.io_timeout / 2
    }

    /// Ok, or the first rule broken, naming the numbers that conflict.
    pub fn check(&self) -> Result<()> {
        let conflict = |rule, detail: String| Err(StorageError::TimingConflict { rule, detail });
        let Self { renewal_interval, io_timeout, self_fence_deadline, watchdog_timeout, lease_expiry } = *self;
        if renewal_interval.is_zero() || io_timeout.is_zero() {
            return conflict(
                "positive intervals",
                format!("renewal interval {renewal_interval:?} and i/o timeout {io_timeout:?} must be above zero"),
            );
        }
        if io_timeout > renewal_interval {
            return conflict(
                "i/o timeout within renewal interval",
                format!(
                    "i/o timeout {io_timeout:?} exceeds renewal interval {renewal_interval:?}: renewals would queue behind each other on a slow pool"
                ),
            );
        }
        // A healthy host must get at least two renewal attempts in before it
        // self-fences, or one slow write kills its VMs.
        let two_attempts = renewal_interval * 2 + io_timeout;
        if two_attempts >= self_fence_deadline {
            return conflict(
                "self-fence deadline allows two renewals",
                format!(
                    "self-fence deadline {self_fence_deadline:?} must exceed 2 x renewal interval {renewal_interval:?} + i/o timeout {io_timeout:?} = {two_attempts:?}"
                ),
            );
        }
        // An acquirer's self-fence clock starts when its claim write starts; it must
        // still be able to confirm the claim (wait, re-read) and renew before it.
        let acquire_budget = self.acquire_delay() + io_timeout * 2;
        if acquire_budget >= self_fence_deadline {
            return conflict(
                "self-fence deadline allows acquiring",
                format!(
                    "self-fence deadline {self_fence_deadline:?} must exceed the acquire delay {:?} + 2 x i/o timeout {io_timeout:?} = {acquire_budget:?}",
                    self.acquire_delay()
                ),
            );
        }
        // The safety rule (ARCHITECTURE.md §5, §6): the host has stopped its VMs or
        // been reset before anyone else may take its leases.
        let fenced_by = self_fence_deadline + watchdog_timeout;
        if fenced_by >= lease_expiry {
            return conflict(
                "self-fence before takeover",
                format!(
                    "self-fence deadline {self_fence_deadline:?} + watchdog timeout {watchdog_timeout:?} = {fenced_by:?} must be below lease expiry {lease_expiry:?}"
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn balanced() -> LeaseTimings {
        LeaseTimings {
            renewal_interval: ms(1_000),
            io_timeout: ms(500),
            self_fence_deadline: ms(4_000),
            watchdog_timeout: ms(5_000),
            lease_expiry: ms(10_000),
        }
    }

    fn rule_of(timings: LeaseTimings) -> &'static str {
        match timings.check() {
            Err(StorageError::TimingConflict { rule, .. }) => rule,
            other => panic!("expected a timing conflict, got {other:?}"),
        }
    }

    #[test]
    fn a_consistent_profile_passes() {
        balanced().check().unwrap();
    }

    #[test]
    fn takeover_before_the_host_is_fenced_is_refused_naming_the_numbers() {
        let timings = LeaseTimings { lease_expiry: ms(9_000), ..balanced() };
        let error = timings.check().unwrap_err().to_string();
        assert!(error.contains("self-fence before takeover"), "{error}");
        assert!(error.contains("4s") && error.contains("5s") && error.contains("9s"), "{error}");
        // Equality is a conflict too: "before" means strictly before.
        let timings = LeaseTimings { lease_expiry: ms(9_001), ..balanced() };
        timings.check().unwrap();
    }

    #[test]
    fn a_self_fence_deadline_shorter_than_two_renewals_is_refused() {
        let timings = LeaseTimings { renewal_interval: ms(1_800), ..balanced() };
        assert_eq!(rule_of(timings), "self-fence deadline allows two renewals");
    }

    #[test]
    fn a_self_fence_deadline_shorter_than_an_acquisition_is_refused() {
        let timings = LeaseTimings { renewal_interval: ms(1_000), io_timeout: ms(1_000), ..balanced() };
        assert_eq!(rule_of(timings), "self-fence deadline allows acquiring");
    }

    #[test]
    fn zero_and_oversized_intervals_are_refused() {
        let zero = LeaseTimings { renewal_interval: Duration::ZERO, ..balanced() };
        assert_eq!(rule_of(zero), "positive intervals");
        let slow_io = LeaseTimings { io_timeout: ms(1_500), ..balanced() };
        assert_eq!(rule_of(slow_io), "i/o timeout within renewal interval");
    }

    #[test]
    fn acquire_delay_outlasts_two_io_timeouts() {
        let timings = balanced();
        assert!(timings.acquire_delay() > timings.io_timeout * 2);
    }
}
