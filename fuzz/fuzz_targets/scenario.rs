//! Lab scenario files: parsing never panics; every refusal is a clear error.

#![no_main]

use kvmha_lab::scenario::{parse_duration, Scenario};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let _ = parse_duration(text);
    if let Ok(scenario) = Scenario::parse(text) {
        assert!(!scenario.lab.hosts.is_empty(), "a lab without hosts parsed");
        assert!(scenario.faults.windows(2).all(|pair| pair[0].at <= pair[1].at), "faults out of order");
    }
});
