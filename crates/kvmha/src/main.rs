use clap::{Parser, Subcommand};

/// kvmha: high availability for KVM clusters.
#[derive(Debug, Parser)]
#[command(name = "kvmha", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Power control of one host through its BMC (IPMI, Redfish, ipmitool).
    Bmc(kvmha_bmc::cli::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bmc(args) => Ok(kvmha_bmc::cli::run_blocking(args)?),
    }
}
