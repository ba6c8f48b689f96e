//! A lab "VM": appends heartbeat lines to `<storage_root>/vms/<vm>/disk.log` every 100 ms
//! until SIGTERM or SIGINT (a graceful shutdown: the current line is finished, exit 0) or
//! SIGKILL (destroy). The lab process driver spawns it; see docs/hypervisor.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use kvmha_hypervisor::lab::writer::{run_writer, WriterConfig, WRITE_INTERVAL};

#[derive(Debug, Parser)]
#[command(about = "kvmha lab VM: a process that writes heartbeat lines to its disk log")]
struct Arguments {
    /// Shared storage root; the disk log is STORAGE_ROOT/vms/VM/disk.log.
    #[arg(long)]
    storage_root: PathBuf,
    /// The host this VM runs on (written into every line).
    #[arg(long)]
    host: String,
    /// The VM's name.
    #[arg(long)]
    vm: String,
    /// This boot's id, fresh for every start.
    #[arg(long)]
    boot_id: String,
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(error) = signal_hook::flag::register(signal, Arc::clone(&stop)) {
            eprintln!("kvmha-lab-vm: cannot handle signal {signal}: {error}");
            return ExitCode::FAILURE;
        }
    }
    let config = WriterConfig {
        storage_root: arguments.storage_root,
        host: arguments.host,
        vm: arguments.vm,
        boot_id: arguments.boot_id,
        interval: WRITE_INTERVAL,
    };
    match run_writer(&config, &stop) {
        Ok(_summary) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvmha-lab-vm: {error}");
            ExitCode::from(2)
        }
    }
}
