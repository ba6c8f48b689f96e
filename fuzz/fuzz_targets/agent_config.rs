//! `agent.toml` as written by `kvmha agent join` and then edited by hand:
//! parsing and validation never panic; every refusal names a field.
//!
//! Certificates are read relative to a directory that does not exist; a
//! config naming an absolute path is parsed only, never validated, so that
//! the target never reads a device such as /dev/zero.

#![no_main]

use kvmha_agent::config::RawConfig;
use kvmha_agent::{AgentConfig, AgentError};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(raw) = toml::from_str::<RawConfig>(text) {
        let tls = &raw.tls;
        let paths = [&tls.ca_cert, &tls.cert, &tls.key];
        if paths.iter().any(|path| !path.is_relative() || path.components().any(|part| part.as_os_str() == "..")) {
            return;
        }
    }
    let file = Path::new("/nonexistent/kvmha-fuzz/agent.toml");
    match AgentConfig::parse(file, text) {
        Ok(_) | Err(AgentError::Config { .. }) => {}
        Err(other) => panic!("a config error must name the field: {other:?}"),
    }
});
