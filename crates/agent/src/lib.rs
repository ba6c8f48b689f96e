//! kvmha-agent: see ARCHITECTURE.md §2. Not built yet.
