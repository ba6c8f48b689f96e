//! Hidden commands the lab runs inside its hosts (`kvmha lab-internal ...`).
//!
//! They live here, not in the kvmha binary, so the binary only needs one enum
//! variant and one match arm, and the lab's own tests can run them through the
//! `kvmha-lab-helper` binary without building all of kvmha.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::error::Result;
use crate::writer::{new_boot_id, run_vm_writer, VmWriterConfig};

#[derive(Debug, clap::Subcommand)]
pub enum InternalCommand {
    /// Run one lab VM: append `<unix_ms> <host> <vm> <boot_id> <seq>` to its disk and fsync.
    VmWriter {
        /// The shared storage as mounted on this host.
        #[arg(long)]
        storage_dir: PathBuf,
        #[arg(long)]
        host: String,
        #[arg(long)]
        vm: String,
        /// Defaults to a fresh random id.
        #[arg(long)]
        boot_id: Option<String>,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Stop after this many successful writes (default: run until killed).
        #[arg(long)]
        writes_max: Option<u64>,
    },
}

pub fn run_internal(command: InternalCommand) -> Result<()> {
    match command {
        InternalCommand::VmWriter {
            storage_dir,
            host,
            vm,
            boot_id,
            interval_ms,
            writes_max,
        } => {
            let config = VmWriterConfig {
                storage_dir,
                host,
                vm,
                boot_id: match boot_id {
                    Some(boot_id) => boot_id,
                    None => new_boot_id()?,
                },
                interval: Duration::from_millis(interval_ms.max(1)),
                writes_max,
            };
            run_vm_writer(&config, &AtomicBool::new(false))?;
            Ok(())
        }
    }
}
