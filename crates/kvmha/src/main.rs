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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate(args) => simulate::run(args),
        Command::Bmc(args) => Ok(kvmha_bmc::cli::run_blocking(args)?),
        Command::Bench(Bench::Bmc(args)) => Ok(kvmha_bmc::bench::run_blocking(args)?),
        Command::Lab(command) => Ok(kvmha_lab::cli::run(command)?),
    }
}
