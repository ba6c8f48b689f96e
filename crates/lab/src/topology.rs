//! Names and addresses of a lab: everything that must be unique per lab or fixed by plan.
//!
//! Naming: every lab has an id `kh` + 6 hex digits. Its network namespaces are
//! `<id>-switch`, `<id>-manager`, `<id>-storage`, `<id>-hostN` and `<id>-bmcN`, so
//! several labs (and other people's work) coexist on one machine, and a stale lab is
//! recognised by its prefix. The root namespace is never touched: bridges live in the
//! switch namespace and each veth pair is created there with its peer moved straight
//! into the node's namespace.
//!
//! Addressing (the same in every lab; the namespaces keep labs apart):
//!
//! | network | subnet        | manager  | storage server | hostN       | bmcN        |
//! |---------|---------------|----------|----------------|-------------|-------------|
//! | mgmt    | 10.77.1.0/24  | .2       | -              | .(10+N)     | -           |
//! | storage | 10.77.2.0/24  | -        | .2             | .(10+N)     | -           |
//! | oob     | 10.77.3.0/24  | .2       | -              | -           | .(10+N)     |
//!
//! Hosts have no oob interface: the out-of-band network reaches only BMCs and the
//! manager, so a BMC is unreachable over mgmt, as in a real data centre.

use std::fmt;
use std::io::Read;
use std::net::Ipv4Addr;

use crate::error::{LabError, Result};

/// Prefix of every lab id; stale-lab cleanup only ever touches names with it.
pub const LAB_ID_PREFIX: &str = "kh";
/// Hosts are numbered 1..=HOSTS_MAX so that .(10+N) stays inside the /24.
pub const HOSTS_MAX: usize = 200;
/// The UDP port every simulated BMC listens on (the IPMI standard port).
pub const IPMI_PORT: u16 = 623;
/// The TCP port every Redfish BMC (sushy-emulator, plain HTTP) listens on.
pub const REDFISH_PORT: u16 = 8000;

/// `kh` + 6 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabId(String);

impl LabId {
    /// A fresh id from the kernel's random source.
    pub fn random() -> Result<LabId> {
        let mut bytes = [0u8; 3];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut file| file.read_exact(&mut bytes))
            .map_err(|error| LabError::io("/dev/urandom", error))?;
        Ok(LabId(format!("{LAB_ID_PREFIX}{:02x}{:02x}{:02x}", bytes[0], bytes[1], bytes[2])))
    }

    /// Accepts exactly the shape [`LabId::random`] produces.
    pub fn parse(text: &str) -> Option<LabId> {
        let hex = text.strip_prefix(LAB_ID_PREFIX)?;
        let well_formed = hex.len() == 6 && hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        well_formed.then(|| LabId(text.to_string()))
    }

    /// The lab id a namespace name belongs to, if it is one of ours.
    pub fn of_namespace(name: &str) -> Option<LabId> {
        let (id, _node) = name.split_once('-')?;
        LabId::parse(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn namespace(&self, node: &Node) -> String {
        format!("{}-{}", self.0, node.name())
    }
}

impl fmt::Display for LabId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The three lab networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    Mgmt,
    Storage,
    Oob,
}

impl Network {
    pub const ALL: [Network; 3] = [Network::Mgmt, Network::Storage, Network::Oob];

    /// Also the interface name inside a node and part of the bridge's name.
    pub fn name(self) -> &'static str {
        match self {
            Network::Mgmt => "mgmt",
            Network::Storage => "storage",
            Network::Oob => "oob",
        }
    }

    pub fn parse(text: &str) -> Option<Network> {
        Network::ALL.into_iter().find(|net| net.name() == text)
    }

    fn third_octet(self) -> u8 {
        match self {
            Network::Mgmt => 1,
            Network::Storage => 2,
            Network::Oob => 3,
        }
    }

    pub fn bridge(self) -> String {
        format!("br-{}", self.name())
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A namespace of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    Switch,
    Manager,
    Storage,
    /// 1-based host number.
    Host(usize),
    /// The BMC of host N.
    Bmc(usize),
}

impl Node {
    pub fn name(&self) -> String {
        match self {
            Node::Switch => "switch".to_string(),
            Node::Manager => "manager".to_string(),
            Node::Storage => "storage".to_string(),
            Node::Host(index) => host_name(*index),
            Node::Bmc(index) => format!("bmc{index}"),
        }
    }

    /// The networks this node is plugged into.
    pub fn networks(&self) -> &'static [Network] {
        match self {
            Node::Switch => &[],
            Node::Manager => &[Network::Mgmt, Network::Oob],
            Node::Storage => &[Network::Storage],
            Node::Host(_) => &[Network::Mgmt, Network::Storage],
            Node::Bmc(_) => &[Network::Oob],
        }
    }

    /// The node's address on `network`, if it is plugged into it.
    pub fn address(&self, network: Network) -> Option<Ipv4Addr> {
        if !self.networks().contains(&network) {
            return None;
        }
        let last_octet = match self {
            Node::Manager | Node::Storage => 2,
            Node::Host(index) | Node::Bmc(index) => 10 + *index as u8,
            Node::Switch => return None,
        };
        Some(Ipv4Addr::new(10, 77, network.third_octet(), last_octet))
    }

    /// Name of the switch-side veth end; short enough for IFNAMSIZ (15).
    pub fn switch_port(&self, network: Network) -> String {
        let short = match network {
            Network::Mgmt => "m",
            Network::Storage => "s",
            Network::Oob => "o",
        };
        format!("{}-{short}", self.name())
    }
}

pub const PREFIX_LEN: u8 = 24;

pub fn host_name(index: usize) -> String {
    format!("host{index}")
}

/// `host7` → 7.
pub fn host_index(name: &str) -> Option<usize> {
    let index: usize = name.strip_prefix("host")?.parse().ok()?;
    (1..=HOSTS_MAX).contains(&index).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_ids_are_recognised_and_foreign_names_are_not() {
        let id = LabId::random().expect("random");
        assert_eq!(LabId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(LabId::of_namespace(&id.namespace(&Node::Host(3))), Some(id.clone()));
        for foreign in ["kh12345", "kh12345g-host1", "xx123456-host1", "kh123456"] {
            assert_eq!(LabId::of_namespace(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn addresses_follow_the_plan_and_bmcs_are_off_mgmt() {
        assert_eq!(Node::Host(1).address(Network::Mgmt), Some(Ipv4Addr::new(10, 77, 1, 11)));
        assert_eq!(Node::Bmc(2).address(Network::Oob), Some(Ipv4Addr::new(10, 77, 3, 12)));
        assert_eq!(Node::Bmc(2).address(Network::Mgmt), None);
        assert_eq!(Node::Host(2).address(Network::Oob), None);
        assert!(Node::Host(HOSTS_MAX).switch_port(Network::Storage).len() <= 15);
        assert_eq!(host_index("host12"), Some(12));
        assert_eq!(host_index("host0"), None);
    }
}
