//! kvmha-proto: see ARCHITECTURE.md §2. Not built yet.
