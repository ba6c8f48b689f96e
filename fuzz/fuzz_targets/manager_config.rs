//! `manager.toml` as an operator (or a broken deploy script) may write it:
//! parsing and validation never panic; every refusal names a field.
//!
//! Validation reads the certificate and password files the config names;
//! the target only validates configs whose paths are relative (to a
//! directory that does not exist), so that it never reads a device such
//! as /dev/zero.

#![no_main]

use kvmha_manager::config::{parse_toml, RawConfig};
use kvmha_manager::{ManagerConfig, ManagerError};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let file = Path::new("/nonexistent/kvmha-fuzz/manager.toml");
    let raw: RawConfig = match parse_toml(file, text) {
        Ok(raw) => raw,
        Err(ManagerError::Config { .. }) => return,
        Err(other) => panic!("a parse error must name the field: {other:?}"),
    };
    let tls = &raw.tls;
    let mut paths = vec![&raw.data_dir, &tls.ca_cert, &tls.ca_key, &tls.cert, &tls.key];
    // The etcd store's TLS files are read at validation too.
    paths.extend([&raw.store.ca_cert, &raw.store.cert, &raw.store.key].into_iter().flatten());
    for host in raw.hosts.values() {
        if let Some(bmc) = &host.bmc {
            paths.push(&bmc.password_file);
        }
    }
    if paths.iter().any(|path| !path.is_relative() || path.components().any(|part| part.as_os_str() == "..")) {
        return;
    }
    match ManagerConfig::validate(file, raw) {
        Ok(_) | Err(ManagerError::Config { .. }) => {}
        Err(other) => panic!("a validation error must name the field: {other:?}"),
    }
});
