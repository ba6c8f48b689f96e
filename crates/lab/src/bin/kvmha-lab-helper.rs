//! `kvmha lab ...` as a small stand-alone binary, so the lab's integration tests
//! run lab VMs inside lab hosts, and the lab command line, without building all of
//! kvmha. Production runs the same code as `kvmha lab ...`.

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "kvmha-lab-helper")]
struct Helper {
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, clap::Subcommand)]
enum Top {
    #[command(subcommand)]
    Lab(kvmha_lab::cli::LabCommand),
}

fn main() -> ExitCode {
    let Top::Lab(command) = Helper::parse().command;
    match kvmha_lab::cli::run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvmha lab: {error}");
            ExitCode::FAILURE
        }
    }
}
