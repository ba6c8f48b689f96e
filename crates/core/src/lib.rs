//! kvmha-core: pure HA logic.
