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
    /// Internal commands the lab runs inside its hosts (lab VMs); not for operators.
    #[command(hide = true, subcommand)]
    LabInternal(kvmha_lab::cli::InternalCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::LabInternal(command) => Ok(kvmha_lab::cli::run_internal(command)?),
    }
}
