//! Wire messages between agents and the manager, JSON over HTTPS.
//!
//! Agent → manager: `POST /v1/join` ([`JoinRequest`], the only call without a client
//! certificate), `POST /v1/agent/ping` ([`PingMessage`] → [`PingReply`]),
//! `POST /v1/agent/goodbye` ([`GoodbyeMessage`]). Manager → agent:
//! `POST /v1/command` ([`CommandRequest`] → [`CommandResponse`]).
//! Every message carries `version`; a peer speaking another version is refused.

use crate::error::ProtoError;
use kvmha_core::event::{Directives, Ping, PoolObservation, VmReport};
use kvmha_core::model::{BootId, HostName, Resources, VmName};
use kvmha_core::{Profile, TimingSettings};
use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;

/// Paths of the agent-facing endpoints.
pub mod path {
    pub const JOIN: &str = "/v1/join";
    pub const JOIN_CA: &str = "/v1/join/ca";
    pub const PING: &str = "/v1/agent/ping";
    pub const GOODBYE: &str = "/v1/agent/goodbye";
    pub const COMMAND: &str = "/v1/command";
}

/// Messages that carry a protocol version.
pub trait Versioned {
    fn version(&self) -> u32;
}

pub fn check_version(got: u32) -> Result<(), ProtoError> {
    if got != PROTOCOL_VERSION {
        return Err(ProtoError::Version { got, supported: PROTOCOL_VERSION });
    }
    Ok(())
}

macro_rules! versioned {
    ($($name:ident),*) => {
        $(impl Versioned for $name {
            fn version(&self) -> u32 {
                self.version
            }
        })*
    };
}

versioned!(
    JoinRequest,
    JoinResponse,
    PingMessage,
    PingReply,
    GoodbyeMessage,
    CommandRequest,
    CommandResponse,
    ErrorBody
);

/// An agent asks to join: the join token's secret, its name and a CSR for its key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub version: u32,
    /// The secret part of the join token (never logged).
    pub secret: String,
    pub name: HostName,
    /// PEM certificate signing request for the agent's own key pair.
    pub csr_pem: String,
    /// `IP:PORT` where the manager and the neighbours reach the agent's command
    /// listener. An unspecified IP (0.0.0.0) is replaced by the address the join came from.
    pub listen: String,
    pub hypervisor: Option<String>,
    pub capacity: Resources,
}

/// The manager's answer: the agent's certificate and what it needs to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinResponse {
    pub version: u32,
    pub cluster_id: String,
    /// The agent's certificate, signed by the cluster CA.
    pub cert_pem: String,
    pub ca_pem: String,
    /// SHA-256 of the manager's certificate (DER, hex): the agent serves commands to
    /// this certificate only.
    pub manager_cert_sha256: String,
    /// The address the manager will send commands to.
    pub advertised: String,
    pub profile: Profile,
    pub timing: TimingSettings,
}

/// One ping: core's [`Ping`] with a version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingMessage {
    pub version: u32,
    pub ping: Ping,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingReply {
    pub version: u32,
    pub directives: Directives,
    /// The manager's engine clock, in ms: for logs and drift checks.
    pub manager_time_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoodbyeMessage {
    pub version: u32,
    pub host: HostName,
    pub boot_id: BootId,
}

/// A command from the manager to one agent. The agent answers within `timeout_ms` or the
/// manager stops waiting; each request id is answered once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    pub version: u32,
    pub request_id: u64,
    /// Budget for the whole command, from its receipt.
    pub timeout_ms: u64,
    pub command: AgentCommand,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum AgentCommand {
    /// Can this agent reach a neighbour? `targets` are `IP:PORT` (or `IP`) addresses.
    PingTest { host: HostName, targets: Vec<String> },
    /// Read a neighbour's heartbeat record on the shared pools.
    CheckHeartbeat { host: HostName },
    /// Every domain the host's hypervisor knows, running or only defined.
    ListVms,
    /// The domain's definition (libvirt domain XML), for the manager's registry: another
    /// host defines the VM from it when it restarts the VM.
    GetVmDefinition { vm: VmName },
    /// Store a definition (libvirt domain XML) on this host. Refused (`Failed`) while a VM
    /// of that name runs here with another definition's name or resources in use.
    DefineVm { xml: String },
    /// Start `vm` here: acquire its lease as `lease` allows, define it from `xml` when the
    /// host does not know it, start it, and keep renewing the lease while it runs.
    /// Idempotent for one `work`: a VM already running here (any instance) answers
    /// `AlreadyRunning`. The agent remembers `work` as the VM's instance and reports it in
    /// every ping, across agent restarts.
    StartVm { vm: VmName, work: u64, xml: Option<String>, lease: LeaseGrant },
    /// Stop `vm` on purpose (operator, maintenance): graceful shutdown for up to
    /// `graceful_ms` then hard stop (0: hard stop at once), release its lease, and report
    /// it `Stopped` from then on so nobody restarts it.
    StopVm { vm: VmName, graceful_ms: u64 },
    /// Live-migrate `vm` to the host whose hypervisor is `destination_uri` (maintenance
    /// evacuation). `Unsupported` where the driver cannot migrate; the manager then stops
    /// and starts it elsewhere. The lease moves with the VM: the destination's agent takes
    /// it over as `work` once the VM runs there.
    MigrateVm { vm: VmName, work: u64, destination_uri: String },
}

/// How a starting agent may take a VM's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum LeaseGrant {
    /// Only a free lease: absent, released, held by this very host and boot, or seen
    /// unchanged for the lease expiry on this agent's own clock. A lease that keeps
    /// changing answers `LeaseHeld`.
    IfFree,
    /// The manager proved `host` dead under the safety rule (ARCHITECTURE.md §5): a lease
    /// held by that host (by `boot_id` when given) may be taken at once, even while it
    /// still looks fresh. A lease held by anyone else is treated as under `IfFree`.
    BreakDeadOwner {
        host: HostName,
        boot_id: Option<BootId>,
        /// The proof, for the agent's log: kind and evidence.
        proof: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandResponse {
    pub version: u32,
    pub request_id: u64,
    pub result: CommandResult,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum CommandResult {
    PingTest {
        results: Vec<PingTestResult>,
    },
    Vms {
        vms: Vec<VmInventory>,
    },
    Definition {
        xml: String,
    },
    /// `StartVm`: the VM was already running here; nothing was started.
    AlreadyRunning,
    /// `StartVm`: the VM's lease is held by a live owner; nothing was started.
    LeaseHeld {
        /// `host (boot …)` of the holder, as the lease record says.
        owner: String,
    },
    /// `CheckHeartbeat`: the host's heartbeat record on every pool this agent mounts,
    /// each read twice about one and a half renewal intervals apart on the agent's own
    /// clock: `Advancing` if it moved between the reads; `Unchanged` says how long this
    /// agent watched it (not how long it has been unchanged), so it is never proof of a
    /// death. Added after the first VM commands (additive).
    Heartbeat {
        pools: Vec<PoolObservation>,
    },
    /// The handler needs a later piece of kvmha.
    Unsupported {
        reason: String,
    },
    Failed {
        reason: String,
    },
    Done,
}

/// One domain of `ListVms`: what the manager's registry needs to know of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInventory {
    /// Name, state (Running, Crashed, SelfFenced, Stopped) and instance, as in pings.
    pub report: VmReport,
    pub vcpus: u32,
    pub memory_mb: u64,
    /// The agent holds (and renews) the VM's lease.
    pub lease_held: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingTestResult {
    pub target: String,
    /// Something at the address answered (a refused TCP connection is an answer: the
    /// host's kernel is alive).
    pub reachable: bool,
    /// "icmp" or "tcp".
    pub method: String,
    pub detail: String,
}

/// Every refusal on the wire: what was wrong, for people and logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub version: u32,
    pub error: String,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> ErrorBody {
        ErrorBody { version: PROTOCOL_VERSION, error: error.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode;
    use kvmha_core::event::{StorageHealth, VmRunState};

    fn ping() -> PingMessage {
        PingMessage {
            version: PROTOCOL_VERSION,
            ping: Ping {
                host: HostName::from("host1"),
                boot_id: BootId("b1".to_owned()),
                seq: 7,
                vms: vec![VmReport { name: VmName::from("vm1"), state: VmRunState::Running, instance: None }],
                storage: StorageHealth::Ok,
            },
        }
    }

    #[test]
    fn ping_round_trips() {
        let bytes = serde_json::to_vec(&ping()).unwrap();
        assert_eq!(decode::<PingMessage>(&bytes).unwrap(), ping());
    }

    #[test]
    fn other_version_is_refused_by_number() {
        let mut message = ping();
        message.version = 9;
        let error = decode::<PingMessage>(&serde_json::to_vec(&message).unwrap()).unwrap_err();
        assert!(error.to_string().contains("unsupported protocol version 9"), "{error}");
    }

    #[test]
    fn malformed_and_unknown_fields_are_errors_not_panics() {
        for input in [&b"{"[..], b"null", b"[]", b"{\"version\":1}", b"\xff\xfe", b""] {
            let error = decode::<PingMessage>(input).unwrap_err();
            assert!(error.to_string().starts_with("malformed PingMessage"), "{error}");
        }
        let mut value = serde_json::to_value(ping()).unwrap();
        value["surprise"] = serde_json::json!(1);
        let error = decode::<PingMessage>(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert!(error.to_string().contains("surprise"), "{error}");
    }

    #[test]
    fn commands_round_trip() {
        let commands = [
            AgentCommand::PingTest { host: HostName::from("h2"), targets: vec!["127.0.0.1:1".to_owned()] },
            AgentCommand::CheckHeartbeat { host: HostName::from("h2") },
            AgentCommand::ListVms,
            AgentCommand::StartVm { vm: VmName::from("vm1"), work: 3, xml: None, lease: LeaseGrant::IfFree },
            AgentCommand::StartVm {
                vm: VmName::from("vm1"),
                work: 4,
                xml: Some("<domain/>".to_owned()),
                lease: LeaseGrant::BreakDeadOwner {
                    host: HostName::from("h1"),
                    boot_id: None,
                    proof: "bmc power off".to_owned(),
                },
            },
            AgentCommand::StopVm { vm: VmName::from("vm1"), graceful_ms: 0 },
            AgentCommand::GetVmDefinition { vm: VmName::from("vm1") },
            AgentCommand::DefineVm { xml: "<domain/>".to_owned() },
            AgentCommand::MigrateVm {
                vm: VmName::from("vm1"),
                work: 5,
                destination_uri: "qemu+ssh://h2/system".to_owned(),
            },
        ];
        for command in commands {
            let request = CommandRequest { version: PROTOCOL_VERSION, request_id: 1, timeout_ms: 500, command };
            let bytes = serde_json::to_vec(&request).unwrap();
            assert_eq!(decode::<CommandRequest>(&bytes).unwrap(), request);
        }
        let error =
            decode::<CommandRequest>(br#"{"version":1,"request_id":1,"timeout_ms":1,"command":"reboot"}"#).unwrap_err();
        assert!(error.to_string().contains("reboot"), "{error}");
    }
}
