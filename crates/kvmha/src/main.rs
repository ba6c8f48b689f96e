use clap::{Parser, Subcommand};

mod simulate;

/// kvmha: high availability for KVM clusters.
#[derive(Debug, Parser)]
#[command(name = "kvmha", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay one seeded incident in the deterministic simulator and print its timeline.
    Simulate(simulate::SimulateArgs),
    /// Power control of one host through its BMC (IPMI, Redfish, ipmitool).
    Bmc(kvmha_bmc::cli::Args),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(Bench),
    /// A real multi-host cluster on this machine: up, status, fault, down.
    #[command(subcommand)]
    Lab(kvmha_lab::cli::LabCommand),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Median latency of status and off-and-verify: kvmha's IPMI client vs ipmitool.
    Bmc(kvmha_bmc::bench::Args),
}

/// Log lines (the fencer's intent and outcome among them) go to stderr,
/// filtered by `KVMHA_LOG`, else `RUST_LOG`, else `warn`; stdout stays the
/// command's output (`--json`).
fn init_logging() {
    let filter = ["KVMHA_LOG", "RUST_LOG"]
        .iter()
        .find_map(|name| std::env::var(name).ok())
        .and_then(|directives| tracing_subscriber::EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Simulate(args) => simulate::run(args),
        Command::Bmc(args) => Ok(kvmha_bmc::cli::run_blocking(args)?),
        Command::Bench(Bench::Bmc(args)) => Ok(kvmha_bmc::bench::run_blocking(args)?),
        Command::Lab(command) => Ok(kvmha_lab::cli::run(command)?),
    }
}
