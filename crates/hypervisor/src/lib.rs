//! kvmha-hypervisor: see ARCHITECTURE.md §2. Not built yet.
