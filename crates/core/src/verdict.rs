//! Combining investigator findings into one verdict (ARCHITECTURE.md §4).
//!
//! Positive evidence only: any `Alive` makes the host alive; only the BMC reading power
//! off makes it dead; everything else is unknown. A neighbour that cannot reach the host,
//! or a stale heartbeat, is never "dead" on its own: that is exactly the seed's trap (a
//! partitioned host whose agent is down looks dead to both while its VMs run on).

use crate::event::{Finding, InvestigatorKind, InvestigatorReport};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Alive,
    Dead,
    Unknown,
}

/// The verdict and the evidence line behind it, e.g.
/// `neighbour-ping=unknown (unreachable from host2); heartbeat=unknown (stale 14.2s); bmc=dead (power off)`.
pub fn combine(reports: &[InvestigatorReport], expected: &[InvestigatorKind]) -> (Verdict, String) {
    let mut parts = Vec::new();
    let mut alive = false;
    let mut bmc_off = false;
    for kind in expected {
        let Some(report) = reports.iter().find(|report| report.kind == *kind) else {
            parts.push(format!("{}=unknown (no answer before the deadline)", kind.name()));
            continue;
        };
        let finding = match (report.kind, report.finding) {
            (_, Finding::Alive) => {
                alive = true;
                "alive"
            }
            (InvestigatorKind::BmcPower, Finding::Dead) => {
                bmc_off = true;
                "dead"
            }
            // Only the BMC may say dead; a stale heartbeat is evidence, not proof.
            (_, Finding::Dead) | (_, Finding::Unknown) => "unknown",
        };
        parts.push(format!("{}={finding} ({})", kind.name(), report.evidence));
    }
    let verdict = if alive {
        Verdict::Alive
    } else if bmc_off {
        Verdict::Dead
    } else {
        Verdict::Unknown
    };
    if parts.is_empty() {
        parts.push("no investigator applies to this host".to_owned());
    }
    (verdict, parts.join("; "))
}

/// Whether the round can end before its deadline: an `Alive` settles it; otherwise wait
/// for every investigator, because a late `Alive` overrides a BMC "off".
pub fn is_settled(reports: &[InvestigatorReport], expected: &[InvestigatorKind]) -> bool {
    reports.iter().any(|report| report.finding == Finding::Alive)
        || expected.iter().all(|kind| reports.iter().any(|report| report.kind == *kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::RequestId;
    use crate::model::HostName;
    use InvestigatorKind::*;

    fn report(kind: InvestigatorKind, finding: Finding) -> InvestigatorReport {
        InvestigatorReport {
            host: HostName::from("host1"),
            investigation: RequestId(1),
            kind,
            finding,
            evidence: "e".to_owned(),
            heartbeat: None,
        }
    }

    const ALL: [InvestigatorKind; 4] = [NeighbourPing, StorageHeartbeat, VmActivity, BmcPower];
    const FINDINGS: [Finding; 3] = [Finding::Alive, Finding::Dead, Finding::Unknown];

    /// Every combination of the four investigators' findings (and of each one missing):
    /// the verdict follows the rule of §4 exactly.
    #[test]
    fn every_combination_follows_the_rule() {
        let choices: Vec<Option<Finding>> = std::iter::once(None).chain(FINDINGS.into_iter().map(Some)).collect();
        let mut combinations = 0;
        for a in &choices {
            for b in &choices {
                for c in &choices {
                    for d in &choices {
                        let findings = [*a, *b, *c, *d];
                        let reports: Vec<_> = ALL
                            .iter()
                            .zip(findings)
                            .filter_map(|(kind, finding)| finding.map(|finding| report(*kind, finding)))
                            .collect();
                        let (verdict, evidence) = combine(&reports, &ALL);
                        let expected = if findings.contains(&Some(Finding::Alive)) {
                            Verdict::Alive
                        } else if findings[3] == Some(Finding::Dead) {
                            Verdict::Dead
                        } else {
                            Verdict::Unknown
                        };
                        assert_eq!(verdict, expected, "{findings:?}: {evidence}");
                        for kind in ALL {
                            assert!(evidence.contains(kind.name()), "{evidence} lacks {}", kind.name());
                        }
                        combinations += 1;
                    }
                }
            }
        }
        assert_eq!(combinations, 256);
    }

    #[test]
    fn stale_heartbeat_and_unreachable_neighbours_are_not_death() {
        let reports = [report(NeighbourPing, Finding::Dead), report(StorageHeartbeat, Finding::Dead)];
        let (verdict, evidence) = combine(&reports, &[NeighbourPing, StorageHeartbeat]);
        assert_eq!(verdict, Verdict::Unknown);
        assert_eq!(evidence, "neighbour-ping=unknown (e); heartbeat=unknown (e)");
    }

    #[test]
    fn alive_settles_a_round_early_but_dead_waits_for_everyone() {
        assert!(is_settled(&[report(VmActivity, Finding::Alive)], &ALL));
        assert!(!is_settled(&[report(BmcPower, Finding::Dead)], &ALL));
        let all: Vec<_> = ALL.iter().map(|kind| report(*kind, Finding::Unknown)).collect();
        assert!(is_settled(&all, &ALL));
    }
}
