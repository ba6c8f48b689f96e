//! Where records live on a pool (documented for operators in docs/storage.md).
//!
//! ```text
//! <pool>/kvmha/<cluster>/hosts/<host>.hb                 heartbeat of <host>
//! <pool>/kvmha/<cluster>/hosts/.<host>.hb.tmp            being written (transient)
//! <pool>/kvmha/<cluster>/leases/<vm>.lease               lease of <vm>
//! <pool>/kvmha/<cluster>/leases/.<vm>.lease.<host>.tmp   claim or renewal by <host> being written
//! ```
//!
//! Temporary names start with a dot, which no [`Name`] may, so they never collide
//! with a record. Each writer has its own temporary name, so two hosts writing one
//! lease never write into the same temporary file.

use std::path::{Path, PathBuf};

use crate::record::Name;

const TOP_DIRECTORY: &str = "kvmha";

pub fn cluster_directory(pool_root: &Path, cluster: &Name) -> PathBuf {
    pool_root.join(TOP_DIRECTORY).join(cluster.as_str())
}

pub fn hosts_directory(pool_root: &Path, cluster: &Name) -> PathBuf {
    cluster_directory(pool_root, cluster).join("hosts")
}

pub fn leases_directory(pool_root: &Path, cluster: &Name) -> PathBuf {
    cluster_directory(pool_root, cluster).join("leases")
}

pub fn heartbeat_path(pool_root: &Path, cluster: &Name, host: &Name) -> PathBuf {
    hosts_directory(pool_root, cluster).join(format!("{host}.hb"))
}

pub fn heartbeat_temporary_path(pool_root: &Path, cluster: &Name, host: &Name) -> PathBuf {
    hosts_directory(pool_root, cluster).join(format!(".{host}.hb.tmp"))
}

pub fn lease_path(pool_root: &Path, cluster: &Name, vm: &Name) -> PathBuf {
    leases_directory(pool_root, cluster).join(format!("{vm}.lease"))
}

pub fn lease_temporary_path(pool_root: &Path, cluster: &Name, vm: &Name, writer: &Name) -> PathBuf {
    leases_directory(pool_root, cluster).join(format!(".{vm}.lease.{writer}.tmp"))
}
