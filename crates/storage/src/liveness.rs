//! Liveness without synchronised clocks: pure, time comes in as an argument.
//!
//! A writer is alive while the reader sees its record *change* between the reader's
//! own reads, timed on the reader's own monotonic clock (the idea behind sanlock's
//! delta leases). The writer's timestamp is never consulted, so writer clock jumps
//! cannot change a verdict; the counter is compared for equality only, so a counter
//! that wraps (or restarts with a new boot id) still counts as progress.
//!
//! "Unchanged for" is measured from the read that first saw the current value to the
//! latest successful read, never to "now": if our own reads stall (hung pool, paused
//! process) we have no evidence that the record stayed unchanged, so staleness must
//! not grow (sanlock fixed exactly this bug in its dead-host check). Measuring from
//! the *first* read that saw the value also errs the safe way: the real write happened
//! earlier, so we call it stale later than strictly necessary, never sooner.

use std::time::{Duration, Instant};

/// The reader's verdict about one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// No successful read of the record yet.
    NeverSeen,
    /// Seen, but not yet seen changing, and not yet unchanged for the expiry time: no
    /// evidence either way (right after a reader starts, a dead writer and a live one
    /// look the same).
    Undetermined { unchanged_for: Duration },
    /// Seen changing, and the latest change is younger than the expiry time.
    Alive { unchanged_for: Duration },
    /// Unchanged for at least the expiry time on the reader's clock.
    Stale { unchanged_for: Duration },
}

impl Liveness {
    pub fn is_alive(&self) -> bool {
        matches!(self, Self::Alive { .. })
    }

    pub fn is_stale(&self) -> bool {
        matches!(self, Self::Stale { .. })
    }
}

#[derive(Clone, Debug)]
struct Seen<P> {
    progress: P,
    first_seen_at: Instant,
    last_read_at: Instant,
    /// Whether this value replaced a different one under our eyes.
    seen_changing: bool,
}

/// Tracks one record (a host's heartbeat on one pool, or one lease) for one reader.
///
/// `P` is what counts as progress: [`crate::HeartbeatRecord::progress`] for
/// heartbeats, the raw record bytes for leases.
#[derive(Clone, Debug)]
pub struct LivenessTracker<P> {
    expiry: Duration,
    seen: Option<Seen<P>>,
}

impl<P: PartialEq> LivenessTracker<P> {
    /// `expiry`: how long a record must stay unchanged on our clock to be stale.
    pub fn new(expiry: Duration) -> Self {
        assert!(!expiry.is_zero(), "a zero expiry would call every record stale");
        Self { expiry, seen: None }
    }

    pub fn expiry(&self) -> Duration {
        self.expiry
    }

    /// Feeds one successful read made at `read_at` on the reader's monotonic clock and
    /// returns the verdict. A read that failed or timed out is no observation: do not
    /// call this for it (use [`Self::judge`]).
    ///
    /// A `read_at` earlier than a previous read (a caller bug, or instants from two
    /// clocks) is treated as "no time passed": it can neither age nor rejuvenate a
    /// record beyond what the reads show.
    pub fn observe(&mut self, progress: P, read_at: Instant) -> Liveness {
        match &mut self.seen {
            Some(seen) if seen.progress == progress => {
                seen.last_read_at = seen.last_read_at.max(read_at);
            }
            Some(seen) => {
                let read_at = seen.last_read_at.max(read_at);
                *seen = Seen { progress, first_seen_at: read_at, last_read_at: read_at, seen_changing: true };
            }
            None => {
                self.seen =
                    Some(Seen { progress, first_seen_at: read_at, last_read_at: read_at, seen_changing: false });
            }
        }
        self.judge()
    }

    /// The verdict from the reads so far (time since the last read does not count:
    /// no read, no evidence).
    pub fn judge(&self) -> Liveness {
        let Some(seen) = &self.seen else {
            return Liveness::NeverSeen;
        };
        let unchanged_for = seen.last_read_at.saturating_duration_since(seen.first_seen_at);
        if unchanged_for >= self.expiry {
            return Liveness::Stale { unchanged_for };
        }
        if seen.seen_changing {
            return Liveness::Alive { unchanged_for };
        }
        Liveness::Undetermined { unchanged_for }
    }

    /// The latest value seen.
    pub fn last_seen(&self) -> Option<&P> {
        self.seen.as_ref().map(|seen| &seen.progress)
    }

    /// When (on our clock) the latest read succeeded: lets a caller notice that its
    /// reads themselves have stopped (a hung pool), which is not staleness.
    pub fn last_read_at(&self) -> Option<Instant> {
        self.seen.as_ref().map(|seen| seen.last_read_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPIRY: Duration = Duration::from_secs(10);

    fn at(base: Instant, millis: u64) -> Instant {
        base + Duration::from_millis(millis)
    }

    #[test]
    fn nothing_read_is_never_seen() {
        let tracker: LivenessTracker<u64> = LivenessTracker::new(EXPIRY);
        assert_eq!(tracker.judge(), Liveness::NeverSeen);
    }

    #[test]
    fn a_first_read_is_no_evidence_of_life() {
        let base = Instant::now();
        let mut tracker = LivenessTracker::new(EXPIRY);
        assert!(matches!(tracker.observe(5u64, base), Liveness::Undetermined { .. }));
        assert!(matches!(tracker.observe(5u64, at(base, 9_999)), Liveness::Undetermined { .. }));
        assert!(tracker.observe(5u64, at(base, 10_000)).is_stale());
    }

    #[test]
    fn advancing_counter_is_alive_and_stops_being_alive_after_expiry() {
        let base = Instant::now();
        let mut tracker = LivenessTracker::new(EXPIRY);
        tracker.observe(1u64, base);
        assert!(tracker.observe(2, at(base, 1_000)).is_alive());
        assert!(tracker.observe(3, at(base, 2_000)).is_alive());
        assert!(tracker.observe(3, at(base, 11_999)).is_alive());
        assert_eq!(tracker.observe(3, at(base, 12_000)), Liveness::Stale { unchanged_for: EXPIRY });
        // A write after staleness makes it alive again: stale is a judgement, not a
        // latch (the caller decides what a stale verdict triggers).
        assert!(tracker.observe(4, at(base, 13_000)).is_alive());
    }

    #[test]
    fn staleness_does_not_grow_while_our_own_reads_fail() {
        let base = Instant::now();
        let mut tracker = LivenessTracker::new(EXPIRY);
        tracker.observe(1u64, base);
        tracker.observe(2, at(base, 1_000));
        // No reads for a minute (our pool hung): the verdict stays what the reads showed.
        assert!(tracker.judge().is_alive());
        assert_eq!(tracker.last_read_at(), Some(at(base, 1_000)));
    }

    #[test]
    fn reader_instants_going_backwards_never_age_a_record() {
        let base = at(Instant::now(), 60_000);
        let mut tracker = LivenessTracker::new(EXPIRY);
        tracker.observe(1u64, base);
        tracker.observe(2, at(base, 5_000));
        // An earlier instant than the last read: no time passed, no panic.
        let earlier = base - Duration::from_secs(30);
        assert_eq!(tracker.observe(2, earlier), Liveness::Alive { unchanged_for: Duration::ZERO });
        assert!(tracker.observe(3, earlier).is_alive());
        assert_eq!(tracker.observe(3, at(base, 5_000) + EXPIRY), Liveness::Stale { unchanged_for: EXPIRY });
    }

    #[test]
    fn counter_wrap_counts_as_progress() {
        let base = Instant::now();
        let mut tracker = LivenessTracker::new(EXPIRY);
        tracker.observe(u64::MAX - 1, base);
        assert!(tracker.observe(u64::MAX, at(base, 100)).is_alive());
        assert!(tracker.observe(0, at(base, 200)).is_alive());
        assert!(tracker.observe(1, at(base, 300)).is_alive());
    }
}
