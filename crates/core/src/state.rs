//! Host and VM states as the manager sees them (ARCHITECTURE.md §3).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The manager's view of one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum HostState {
    /// Agent registered, first ping not yet seen.
    Connecting,
    /// Pings fresh.
    Up,
    /// The agent said goodbye cleanly; the host stays watched.
    Disconnected,
    /// Pings missing past the timeout.
    Suspect,
    /// Investigators running.
    Investigating,
    /// Alive, but its agent cannot be heard: alert, touch nothing, look again later.
    Degraded,
    /// Being proven dead: BMC power-off and read-back, or waiting for lease expiry.
    Fencing,
    /// Proven dead; its VMs may run elsewhere.
    Fenced,
    /// Nothing could prove it dead: its VMs stay down until an operator decides.
    FenceFailed,
    /// Taken out of HA by an operator.
    Maintenance,
}

impl HostState {
    pub const ALL: [HostState; 10] = [
        HostState::Connecting,
        HostState::Up,
        HostState::Disconnected,
        HostState::Suspect,
        HostState::Investigating,
        HostState::Degraded,
        HostState::Fencing,
        HostState::Fenced,
        HostState::FenceFailed,
        HostState::Maintenance,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HostState::Connecting => "Connecting",
            HostState::Up => "Up",
            HostState::Disconnected => "Disconnected",
            HostState::Suspect => "Suspect",
            HostState::Investigating => "Investigating",
            HostState::Degraded => "Degraded",
            HostState::Fencing => "Fencing",
            HostState::Fenced => "Fenced",
            HostState::FenceFailed => "FenceFailed",
            HostState::Maintenance => "Maintenance",
        }
    }

    /// States the engine moves out of by itself within a bounded time; a host may stay in
    /// any other state indefinitely (with an alert where a human should look).
    pub fn is_transient(self) -> bool {
        matches!(self, HostState::Suspect | HostState::Investigating | HostState::Fencing)
    }

    /// Whether the transition `self -> to` is one of ARCHITECTURE.md §3's rows. The engine
    /// asserts every transition against this table.
    pub fn may_become(self, to: HostState) -> bool {
        use HostState::*;
        // Maintenance is an operator's decision and may be taken from any state but
        // Fencing (a fence in flight cannot be called back).
        // (Suspect is left within the step that enters it, so it is not a state to take
        // over from.)
        if to == Maintenance {
            return !matches!(self, Fencing | Maintenance | Suspect);
        }
        match self {
            Connecting => matches!(to, Up | Disconnected | Suspect),
            Up => matches!(to, Suspect | Disconnected),
            Disconnected => matches!(to, Up | Suspect),
            Suspect => matches!(to, Investigating),
            Investigating => matches!(to, Degraded | Fencing | Up | Fenced),
            Degraded => matches!(to, Up | Suspect | Fenced),
            // Up: the agent came back while no fence was in flight.
            Fencing => matches!(to, Fenced | FenceFailed | Degraded | Up),
            Fenced => matches!(to, Up),
            FenceFailed => matches!(to, Fenced | Up | Degraded),
            Maintenance => matches!(to, Up | Suspect),
        }
    }
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The manager's view of one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum VmState {
    /// Reported running by its host.
    Running,
    /// A start was sent to its host; the outcome is not known yet.
    Starting,
    /// Not running, and nobody asked for it to run (operator stop, HA off).
    Stopped,
    /// Its host failed: waiting for the safety rule before it may run elsewhere.
    AwaitingProof,
    /// May run elsewhere, but no host has room: retried when capacity appears.
    PendingCapacity,
    /// Start budget spent or start refused for good: a human must look.
    Error,
}

impl VmState {
    pub fn name(self) -> &'static str {
        match self {
            VmState::Running => "Running",
            VmState::Starting => "Starting",
            VmState::Stopped => "Stopped",
            VmState::AwaitingProof => "AwaitingProof",
            VmState::PendingCapacity => "PendingCapacity",
            VmState::Error => "Error",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
