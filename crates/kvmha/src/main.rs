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
    /// A real multi-host cluster on this machine: up, status, fault, down.
    #[command(subcommand)]
    Lab(kvmha_lab::cli::LabCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Lab(command) => Ok(kvmha_lab::cli::run(command)?),
    }
}
