//! kvmha-storage: see ARCHITECTURE.md §2. Not built yet.
