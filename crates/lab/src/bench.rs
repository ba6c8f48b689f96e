//! `kvmha bench failover`: power loss with the BMC reachable, and with the BMC
//! unreachable (lease expiry and watchdog), each run N times in a fresh lab; median
//! and p95 of the recovery time. One run's number is its slowest VM's `recovery_ms`
//! (the moment the failed host's last VM writes again elsewhere), measured from the
//! disk logs like every scenario's.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use crate::error::{LabError, Result};
use crate::lab::DEFAULT_BASE_DIR;
use crate::runner::{self, RunOptions};
use crate::scenario::Scenario;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Timing profile: fast, balanced or conservative.
    #[arg(long, default_value = "fast")]
    profile: String,
    /// Runs of each case.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = DEFAULT_BASE_DIR)]
    base_dir: PathBuf,
}

/// Median, p95 and every run of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub median_ms: Option<u64>,
    pub p95_ms: Option<u64>,
    pub runs_ms: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub profile: String,
    pub power_loss: CaseResult,
    pub bmc_unreachable: CaseResult,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], percent: usize) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

fn case(mut runs_ms: Vec<u64>) -> CaseResult {
    let mut sorted = runs_ms.clone();
    sorted.sort_unstable();
    runs_ms.shrink_to_fit();
    CaseResult { median_ms: percentile(&sorted, 50), p95_ms: percentile(&sorted, 95), runs_ms }
}

fn scenario_text(profile: &str, bmc_unreachable: bool) -> String {
    let bmc_fault =
        if bmc_unreachable { "[[fault]]\nat = \"1s\"\naction = \"bmc-fail\"\nhost = \"host1\"\n" } else { "" };
    format!(
        "name = \"bench: power loss{}\"\n[lab]\nhosts = 3\nprofile = \"{profile}\"\nwatchdog = true\nvms_per_host = 2\n\
         {bmc_fault}[[fault]]\nat = \"2s\"\naction = \"power-off\"\nhost = \"host1\"\n\
         [expect]\nduration = \"{}s\"\nrecovered_within = \"{}s\"\n",
        if bmc_unreachable { ", BMC unreachable" } else { "" },
        if bmc_unreachable { 120 } else { 60 },
        if bmc_unreachable { 110 } else { 50 },
    )
}

pub fn run(args: Args, kvmha: PathBuf, stop: &AtomicBool) -> Result<BenchResult> {
    let options = RunOptions { kvmha, base_dir: args.base_dir.clone(), keep: None, verbose: false };
    let mut cases = Vec::new();
    for bmc_unreachable in [false, true] {
        let scenario = Scenario::parse(&scenario_text(&args.profile, bmc_unreachable))?;
        let mut runs_ms = Vec::new();
        for attempt in 1..=args.repeat.max(1) {
            let result = runner::run(&scenario, &options, stop)
                .map_err(|error| LabError::Config(format!("{} run {attempt}: {error}", scenario.name)))?;
            let slowest = result.recovery_ms.values().max().copied();
            eprintln!(
                "kvmha bench failover: {} run {attempt}: {} ({})",
                scenario.name,
                slowest.map(|ms| format!("{ms} ms")).unwrap_or_else(|| "not recovered".to_string()),
                if result.passed { "passed" } else { "checks failed" }
            );
            if let Some(ms) = slowest.filter(|_| result.passed) {
                runs_ms.push(ms);
            }
        }
        cases.push(case(runs_ms));
    }
    let bmc_unreachable = cases.pop().expect("two cases");
    let power_loss = cases.pop().expect("two cases");
    Ok(BenchResult { profile: args.profile, power_loss, bmc_unreachable })
}

/// Prints the result as `--json` asks (one object) or as two lines.
pub fn print(result: &BenchResult, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(result).expect("numbers serialise"));
        return;
    }
    for (name, case) in [("power loss", &result.power_loss), ("BMC unreachable", &result.bmc_unreachable)] {
        let show = |value: Option<u64>| value.map(|ms| format!("{ms} ms")).unwrap_or_else(|| "-".to_string());
        let _ = writeln!(
            out,
            "{name} ({}): median {}, p95 {}, runs {:?}",
            result.profile,
            show(case.median_ms),
            show(case.p95_ms),
            case.runs_ms
        );
    }
}

/// `kvmha bench failover`: exit 0 when every run recovered, 1 otherwise.
pub fn main(args: Args) -> Result<i32> {
    let json = args.json;
    let repeat = args.repeat.max(1);
    let kvmha = std::env::current_exe().map_err(|error| LabError::io("/proc/self/exe", error))?;
    let stop = crate::cli::stop_flag()?;
    let result = run(args, kvmha, &stop)?;
    print(&result, json);
    let complete = result.power_loss.runs_ms.len() == repeat && result.bmc_unreachable.runs_ms.len() == repeat;
    Ok(if complete { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 95), Some(7));
        let sorted: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&sorted, 50), Some(10));
        assert_eq!(percentile(&sorted, 95), Some(19));
    }

    #[test]
    fn both_bench_scenarios_are_valid() {
        for unreachable in [false, true] {
            let scenario = Scenario::parse(&scenario_text("balanced", unreachable)).expect("valid");
            assert_eq!(scenario.lab.vms.len(), 6);
        }
    }
}
