use clap::{Parser, Subcommand};

/// kvmha: high availability for KVM clusters.
#[derive(Debug, Parser)]
#[command(name = "kvmha", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
