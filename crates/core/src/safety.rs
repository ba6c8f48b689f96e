//! The safety rule (ARCHITECTURE.md §5), in one place.
//!
//! A VM of a failed host may be started elsewhere only with a [`DeathProof`], and the only
//! way to get one is [`prove_dead`]. The proof travels with the start command down to the
//! agent, which still has to win the VM's lease on shared storage: the last line of defence.

use crate::event::{HeartbeatObservation, RecordState, RequestId};
use crate::model::{BootId, HostName, HostSpec};
use crate::time::{format_duration, Instant};
use crate::timing::Timing;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Positive proof that a host no longer runs any of its VMs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeathProof {
    host: HostName,
    /// The boot whose VMs are proven gone, when known.
    boot_id: Option<BootId>,
    kind: ProofKind,
    established_at: Instant,
    evidence: String,
    #[serde(skip)]
    _sealed: Sealed,
}

/// Only this module can make a `Sealed`, so only `prove_dead` can make a `DeathProof`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Sealed;

/// The three proofs of §5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProofKind {
    /// The BMC read back "power off" after our fence command.
    BmcPowerOff,
    /// The host's leases stayed unchanged longer than its self-fence plus watchdog could
    /// take, and its last record says its watchdog was armed.
    LeaseExpired,
    /// An operator ran `host confirm-down`.
    OperatorConfirmed,
}

impl DeathProof {
    pub fn host(&self) -> &HostName {
        &self.host
    }
    pub fn boot_id(&self) -> Option<&BootId> {
        self.boot_id.as_ref()
    }
    pub fn kind(&self) -> ProofKind {
        self.kind
    }
    pub fn established_at(&self) -> Instant {
        self.established_at
    }
    pub fn evidence(&self) -> &str {
        &self.evidence
    }
    pub fn describe(&self) -> String {
        format!("{} proven dead ({:?}): {}", self.host, self.kind, self.evidence)
    }

    /// For tests of code downstream of the rule (planner, executors): a proof that did not
    /// come from `prove_dead`. Never compiled into a release build of the core's users.
    #[cfg(test)]
    pub(crate) fn forged_for_test(host: &HostName, at: Instant) -> DeathProof {
        DeathProof {
            host: host.clone(),
            boot_id: None,
            kind: ProofKind::OperatorConfirmed,
            established_at: at,
            evidence: "forged by a test".to_owned(),
            _sealed: Sealed,
        }
    }
}

/// A confirmed power-off read back from the BMC after one of our fence commands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceConfirmation {
    pub fence: RequestId,
    pub at: Instant,
    pub evidence: String,
}

/// The latest heartbeat observation of a host and when the engine received it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatSeen {
    pub received_at: Instant,
    pub observation: HeartbeatObservation,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorConfirmation {
    pub by: String,
    pub at: Instant,
}

/// Everything the rule looks at for one host.
#[derive(Clone, Copy, Debug)]
pub struct SafetyInputs<'a> {
    pub host: &'a HostSpec,
    /// The boot id the host last pinged with.
    pub last_boot: Option<&'a BootId>,
    /// Set only from a fence command of the current fencing episode.
    pub fence_confirmation: Option<&'a FenceConfirmation>,
    pub heartbeat: Option<&'a HeartbeatSeen>,
    pub operator: Option<&'a OperatorConfirmation>,
    /// The agent said goodbye after its last ping: its watchdog is disarmed.
    pub goodbye_since_last_ping: bool,
    /// Until when the host may believe it holds its VMs through a storage outage.
    pub storage_hold_granted_until: Option<Instant>,
}

/// Why no proof could be made, one reason per path, for the audit log and the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoProof {
    pub reasons: Vec<String>,
}

impl fmt::Display for NoProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reasons.join("; "))
    }
}

/// The safety rule. Returns the proof that `inputs.host` runs none of its VMs, or why not.
pub fn prove_dead(inputs: &SafetyInputs<'_>, now: Instant, timing: &Timing) -> Result<DeathProof, NoProof> {
    let host = &inputs.host.name;
    let proof = |kind, evidence: String| DeathProof {
        host: host.clone(),
        boot_id: inputs.last_boot.cloned(),
        kind,
        established_at: now,
        evidence,
        _sealed: Sealed,
    };
    let mut reasons = Vec::new();

    match inputs.fence_confirmation {
        Some(confirmation) => {
            return Ok(proof(
                ProofKind::BmcPowerOff,
                format!("fence {} read back power off: {}", confirmation.fence, confirmation.evidence),
            ))
        }
        None if inputs.host.has_bmc => reasons.push("bmc: no power-off confirmed by a fence of ours yet".to_owned()),
        None => reasons.push("bmc: none configured".to_owned()),
    }

    match inputs.operator {
        Some(confirmation) => {
            return Ok(proof(ProofKind::OperatorConfirmed, format!("confirmed down by {}", confirmation.by)));
        }
        None => reasons.push("operator: no confirm-down".to_owned()),
    }

    match lease_expired(inputs, now, timing) {
        Ok(evidence) => return Ok(proof(ProofKind::LeaseExpired, evidence)),
        Err(reason) => reasons.push(format!("lease: {reason}")),
    }
    Err(NoProof { reasons })
}

/// Proof 2: every pool shows the host's record unchanged for longer than the host could
/// possibly keep its VMs (self-fence + watchdog + drift, folded into `lease_takeover_after`).
fn lease_expired(inputs: &SafetyInputs<'_>, now: Instant, timing: &Timing) -> Result<String, String> {
    if !inputs.host.has_watchdog {
        return Err("host has no watchdog configured, so a silent lease proves nothing".to_owned());
    }
    if inputs.host.pools.is_empty() {
        return Err("host has no heartbeat pools".to_owned());
    }
    if inputs.goodbye_since_last_ping {
        return Err("agent stopped cleanly and disarmed its watchdog".to_owned());
    }
    let Some(seen) = inputs.heartbeat else {
        return Err("no heartbeat observation yet".to_owned());
    };
    // The host's guarantee runs from its latest possible renewal on any pool, so the
    // shortest silence across pools counts.
    let mut shortest_silence: Option<std::time::Duration> = None;
    for pool in &inputs.host.pools {
        let Some(observed) = seen.observation.pools.iter().find(|observed| &observed.pool == pool) else {
            return Err(format!("pool {pool} not observed"));
        };
        match &observed.record {
            RecordState::Advancing => return Err(format!("pool {pool}: heartbeat advancing")),
            RecordState::Unreadable { reason } => return Err(format!("pool {pool} unreadable: {reason}")),
            RecordState::Unchanged { unchanged_for, boot_id, watchdog_armed, stopped_cleanly } => {
                if *stopped_cleanly {
                    return Err(format!("pool {pool}: record says the agent stopped cleanly"));
                }
                if !*watchdog_armed {
                    return Err(format!("pool {pool}: record says the watchdog is not armed"));
                }
                if let Some(last_boot) = inputs.last_boot {
                    if boot_id != last_boot {
                        return Err(format!(
                            "pool {pool}: record is from boot {boot_id}, host last pinged from {last_boot}"
                        ));
                    }
                }
                shortest_silence =
                    Some(shortest_silence.map_or(*unchanged_for, |shortest| shortest.min(*unchanged_for)));
            }
        }
    }
    let silent_since = seen.received_at - shortest_silence.unwrap_or_default();
    let mut since = silent_since;
    if let Some(hold_until) = inputs.storage_hold_granted_until {
        // A host told to hold its VMs through a storage outage starts its self-fence clock
        // only when the hold lapses.
        since = since.max(hold_until);
    }
    let expires_at = since + timing.lease_takeover_after();
    // The look itself must have seen the silence reach the takeover point: an old look
    // says nothing about writes since.
    if seen.received_at < expires_at {
        return Err(format!(
            "silent for {} of the {} needed at the last look",
            format_duration(seen.received_at.saturating_since(since)),
            format_duration(timing.lease_takeover_after())
        ));
    }
    Ok(format!(
        "heartbeat unchanged for {} on every pool (takeover after {}), watchdog armed",
        format_duration(now.saturating_since(silent_since)),
        format_duration(timing.lease_takeover_after())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::PoolObservation;
    use crate::model::{PoolName, Resources};
    use crate::timing::{Profile, TimingSettings};
    use std::time::Duration;

    fn timing() -> Timing {
        Timing::from_profile(Profile::Fast, &TimingSettings::default()).unwrap()
    }

    fn spec(has_bmc: bool, has_watchdog: bool, pools: &[&str]) -> HostSpec {
        HostSpec {
            name: HostName::from("host1"),
            networks: vec![],
            capacity: Resources { cpus: 4, memory_mb: 4096 },
            has_bmc,
            has_watchdog,
            pools: pools.iter().map(|pool| PoolName::from(*pool)).collect(),
        }
    }

    fn boot() -> BootId {
        BootId("b1".to_owned())
    }

    fn unchanged(pool: &str, ms: u64, armed: bool, stopped_cleanly: bool) -> PoolObservation {
        PoolObservation {
            pool: PoolName::from(pool),
            record: RecordState::Unchanged {
                unchanged_for: Duration::from_millis(ms),
                boot_id: boot(),
                watchdog_armed: armed,
                stopped_cleanly,
            },
            boot_id: Some(boot()),
        }
    }

    fn seen(at_ms: u64, pools: Vec<PoolObservation>) -> HeartbeatSeen {
        HeartbeatSeen { received_at: Instant::from_millis(at_ms), observation: HeartbeatObservation { pools } }
    }

    fn inputs<'a>(host: &'a HostSpec, boot: &'a BootId, heartbeat: Option<&'a HeartbeatSeen>) -> SafetyInputs<'a> {
        SafetyInputs {
            host,
            last_boot: Some(boot),
            fence_confirmation: None,
            heartbeat,
            operator: None,
            goodbye_since_last_ping: false,
            storage_hold_granted_until: None,
        }
    }

    const NOW: u64 = 100_000;

    #[test]
    fn bmc_read_back_is_proof() {
        let host = spec(true, false, &[]);
        let boot = boot();
        let confirmation =
            FenceConfirmation { fence: RequestId(7), at: Instant::from_millis(NOW), evidence: "off".into() };
        let mut given = inputs(&host, &boot, None);
        assert!(prove_dead(&given, Instant::from_millis(NOW), &timing()).is_err());
        given.fence_confirmation = Some(&confirmation);
        let proof = prove_dead(&given, Instant::from_millis(NOW), &timing()).unwrap();
        assert_eq!(proof.kind(), ProofKind::BmcPowerOff);
        assert_eq!(proof.boot_id(), Some(&boot));
        assert!(proof.evidence().contains("#7"));
    }

    #[test]
    fn operator_confirmation_is_proof() {
        let host = spec(false, false, &[]);
        let boot = boot();
        let confirmation = OperatorConfirmation { by: "alice".into(), at: Instant::from_millis(NOW) };
        let mut given = inputs(&host, &boot, None);
        given.operator = Some(&confirmation);
        let proof = prove_dead(&given, Instant::from_millis(NOW), &timing()).unwrap();
        assert_eq!(proof.kind(), ProofKind::OperatorConfirmed);
        assert!(proof.evidence().contains("alice"));
    }

    #[test]
    fn lease_silence_past_takeover_with_an_armed_watchdog_is_proof() {
        let host = spec(false, true, &["a", "b"]);
        let boot = boot();
        let look = seen(NOW, vec![unchanged("a", 14_000, true, false), unchanged("b", 15_000, true, false)]);
        let proof = prove_dead(&inputs(&host, &boot, Some(&look)), Instant::from_millis(NOW), &timing()).unwrap();
        assert_eq!(proof.kind(), ProofKind::LeaseExpired);
        // The shortest silence counts: pool a was written 13.9s ago.
        let look = seen(NOW, vec![unchanged("a", 13_900, true, false), unchanged("b", 60_000, true, false)]);
        let refused = prove_dead(&inputs(&host, &boot, Some(&look)), Instant::from_millis(NOW), &timing()).unwrap_err();
        assert!(refused.to_string().contains("13.9s of the 14.0s"), "{refused}");
    }

    #[test]
    fn an_old_look_proves_nothing_about_the_time_since() {
        let host = spec(false, true, &["a"]);
        let boot = boot();
        // At the look the record was 10s old; 20s later we have not looked again.
        let look = seen(NOW, vec![unchanged("a", 10_000, true, false)]);
        let later = Instant::from_millis(NOW + 20_000);
        assert!(prove_dead(&inputs(&host, &boot, Some(&look)), later, &timing()).is_err());
    }

    #[test]
    fn every_reason_to_distrust_the_lease_is_a_refusal() {
        let boot = boot();
        let now = Instant::from_millis(NOW);
        let cases: Vec<(HostSpec, Vec<PoolObservation>, bool, &str)> = vec![
            (spec(false, false, &["a"]), vec![unchanged("a", 60_000, true, false)], false, "no watchdog"),
            (spec(false, true, &["a"]), vec![unchanged("a", 60_000, true, true)], false, "stopped cleanly"),
            (spec(false, true, &["a"]), vec![unchanged("a", 60_000, false, false)], false, "not armed"),
            (spec(false, true, &["a"]), vec![unchanged("a", 60_000, true, false)], true, "stopped cleanly"),
            (
                spec(false, true, &["a", "b"]),
                vec![
                    unchanged("a", 60_000, true, false),
                    PoolObservation { pool: PoolName::from("b"), record: RecordState::Advancing, boot_id: None },
                ],
                false,
                "advancing",
            ),
            (
                spec(false, true, &["a", "b"]),
                vec![
                    unchanged("a", 60_000, true, false),
                    PoolObservation {
                        pool: PoolName::from("b"),
                        record: RecordState::Unreadable { reason: "EIO".into() },
                        boot_id: None,
                    },
                ],
                false,
                "unreadable",
            ),
            (spec(false, true, &["a", "b"]), vec![unchanged("a", 60_000, true, false)], false, "not observed"),
        ];
        for (host, pools, goodbye, reason) in cases {
            let look = seen(NOW, pools);
            let mut given = inputs(&host, &boot, Some(&look));
            given.goodbye_since_last_ping = goodbye;
            let refused = prove_dead(&given, now, &timing()).unwrap_err().to_string();
            assert!(refused.contains(reason), "expected {reason:?} in {refused:?}");
        }
    }

    #[test]
    fn a_record_of_another_boot_is_not_this_boot_dying() {
        let host = spec(false, true, &["a"]);
        let newer = BootId("b2".to_owned());
        let look = seen(NOW, vec![unchanged("a", 60_000, true, false)]);
        let refused =
            prove_dead(&inputs(&host, &newer, Some(&look)), Instant::from_millis(NOW), &timing()).unwrap_err();
        assert!(refused.to_string().contains("record is from boot b1"), "{refused}");
    }

    #[test]
    fn a_storage_hold_restarts_the_clock_when_it_lapses() {
        let host = spec(false, true, &["a"]);
        let boot = boot();
        let hold_until = Instant::from_millis(NOW - 5_000);
        let look = seen(NOW, vec![unchanged("a", 60_000, true, false)]);
        let mut given = inputs(&host, &boot, Some(&look));
        given.storage_hold_granted_until = Some(hold_until);
        let refused = prove_dead(&given, Instant::from_millis(NOW), &timing()).unwrap_err();
        assert!(refused.to_string().contains("silent for 5.0s"), "{refused}");
        let look = seen(NOW + 9_000, vec![unchanged("a", 69_000, true, false)]);
        given.heartbeat = Some(&look);
        assert!(prove_dead(&given, Instant::from_millis(NOW + 9_000), &timing()).is_ok());
    }
}
