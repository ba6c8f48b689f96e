//! The lab's hidden commands as a small stand-alone binary, so the lab's integration
//! tests can run lab VMs inside lab hosts without building the whole kvmha binary.
//! Production runs the same code as `kvmha lab-internal ...`.

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "kvmha-lab-helper")]
struct Helper {
    #[command(subcommand)]
    command: kvmha_lab::cli::InternalCommand,
}

fn main() -> ExitCode {
    match kvmha_lab::cli::run_internal(Helper::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvmha-lab-helper: {error}");
            ExitCode::FAILURE
        }
    }
}
