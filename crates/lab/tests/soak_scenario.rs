//! scenarios/soak.toml (issue 10) is not run in CI, but it must always parse: a soak that
//! fails on a typo after half an hour of setup is a wasted night.

use kvmha_lab::scenario::Scenario;
use std::time::Duration;

#[test]
fn the_soak_scenario_parses_and_lasts_thirty_minutes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scenarios/soak.toml");
    let text = std::fs::read_to_string(path).expect("scenarios/soak.toml");
    let scenario = Scenario::parse(&text).expect("soak.toml parses");
    assert_eq!(scenario.lab.hosts.len(), 4);
    assert!(scenario.expect.duration >= Duration::from_secs(30 * 60));
    assert!(scenario.faults.len() >= 20, "only {} faults", scenario.faults.len());
    let last = scenario.faults.last().expect("faults").at;
    assert!(last <= scenario.expect.duration, "a fault at {last:?} after the observation ends");
}
