//! `kvmha simulate`: one seeded incident, told as a timeline; or many, as a tally.

use anyhow::{bail, Context};
use clap::Args;
use kvmha_core::sim::{self, SimOptions, SimOutcome};
use kvmha_core::Profile;

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The seed: it derives the cluster, the faults and the timing.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Number of hosts (default: derived from the seed, 3 to 6).
    #[arg(long)]
    hosts: Option<usize>,
    /// Timing profile: fast, balanced or conservative (default: derived from the seed).
    #[arg(long)]
    profile: Option<String>,
    /// Run this many schedules from the seed and print the tally instead of one timeline.
    #[arg(long)]
    count: Option<u64>,
    /// Also show every event fed to the engine (investigator reports, results).
    #[arg(long)]
    verbose: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let profile = match &args.profile {
        Some(name) => Some(name.parse::<Profile>().context("--profile")?),
        None => None,
    };
    if let Some(count) = args.count {
        return run_many(args.seed, count, args.json);
    }
    if args.hosts == Some(0) {
        bail!("--hosts must be at least 1");
    }
    let mut options = SimOptions::new(args.seed);
    options.hosts = args.hosts;
    options.profile = profile;
    options.record_trace = true;
    let outcome = sim::run(&options);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print_timeline(&outcome, args.verbose);
    }
    if !outcome.violations.is_empty() {
        bail!("{} invariant(s) broken; reproduce with: {}", outcome.violations.len(), outcome.replay_command());
    }
    Ok(())
}

fn print_timeline(outcome: &SimOutcome, verbose: bool) {
    println!(
        "seed {}: {} hosts, {} VMs, profile {}, {} faults",
        outcome.seed,
        outcome.hosts,
        outcome.vms,
        outcome.profile,
        outcome.faults.len()
    );
    for line in &outcome.trace {
        if line.source == "event" && !verbose {
            continue;
        }
        println!("{:>8.3}s  {:<9} {}", line.at_ms as f64 / 1000.0, line.source, line.text);
    }
    println!();
    let hosts: Vec<String> = outcome.final_hosts.iter().map(|(host, state)| format!("{host} {state}")).collect();
    println!("hosts at the end: {}", hosts.join(", "));
    let vms: Vec<String> = outcome.final_vms.iter().map(|(vm, state)| format!("{vm} {state}")).collect();
    println!("vms at the end:   {}", vms.join(", "));
    if outcome.violations.is_empty() {
        println!("checks: no double run, no start without proof, no false fence, recovered after healing");
    }
    for violation in &outcome.violations {
        println!("VIOLATION {violation}");
    }
}

fn run_many(first: u64, count: u64, json: bool) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map(|threads| threads.get()).unwrap_or(1);
    let started = std::time::Instant::now();
    let (schedules, steps, failures) = sim::run_many(first, count, threads);
    let violations: usize = failures.iter().map(|failure| failure.violations.len()).sum();
    let elapsed_ms = started.elapsed().as_millis();
    if json {
        let failing: Vec<serde_json::Value> = failures
            .iter()
            .map(|failure| {
                serde_json::json!({
                    "seed": failure.seed,
                    "violations": failure.violations,
                    "reproduce": failure.replay_command(),
                })
            })
            .collect();
        let summary = serde_json::json!({
            "schedules": schedules, "steps": steps, "violations": violations,
            "elapsed_ms": elapsed_ms, "failing": failing,
        });
        println!("{summary}");
    } else {
        println!("sim: {schedules} schedules, {steps} steps, {violations} violations ({elapsed_ms} ms)");
        for failure in &failures {
            println!("seed {}: {}", failure.seed, failure.violations[0]);
            println!("  reproduce with: {}", failure.replay_command());
        }
    }
    if !failures.is_empty() {
        bail!("{} of {schedules} schedules broke an invariant", failures.len());
    }
    Ok(())
}
