//! Real peers for the tests: an OpenIPMI `ipmi_sim` per test (launched by
//! `kvmha_bmc::sim`), plus ipmitool as an independent witness.

#![allow(dead_code, unused_imports)]

pub use kvmha_bmc::sim::{IpmiSim as SimBmc, ADMIN_PASSWORD, ADMIN_USER, VIEWER_PASSWORD, VIEWER_USER};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn free_udp_port() -> u16 {
    kvmha_bmc::sim::free_udp_port().expect("free udp port")
}

/// A UDP port that stays bound for as long as the socket lives and never
/// answers: a BMC that is silent (no ICMP refusal either). Unlike a port
/// from `free_udp_port`, no simulator started meanwhile can take it.
pub fn silent_udp_port() -> (std::net::UdpSocket, u16) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind silent udp port");
    let port = socket.local_addr().expect("local address").port();
    (socket, port)
}

/// A UDP port that is certainly closed for as long as the socket lives:
/// the socket holds the port (nobody else can bind it) but is connected to
/// another peer, so the kernel matches no socket for our datagrams and
/// answers ICMP port unreachable, as for a port nothing listens on.
pub fn closed_udp_port() -> (std::net::UdpSocket, u16) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind closed udp port");
    socket.connect("127.0.0.1:9").expect("connect the placeholder socket elsewhere");
    let port = socket.local_addr().expect("local address").port();
    (socket, port)
}

/// Test-only conveniences on a simulated BMC.
pub trait SimBmcExt {
    fn ipmitool(&self, user: &str, password: &str, args: &[&str]) -> Output;
    fn ipmitool_power(&self) -> String;
}

impl SimBmcExt for SimBmc {
    /// Runs ipmitool against this BMC as an independent witness. The
    /// password goes through the environment (`-E`), never argv.
    fn ipmitool(&self, user: &str, password: &str, args: &[&str]) -> Output {
        Command::new("ipmitool")
            .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", user, "-E"])
            .args(args)
            .env("IPMI_PASSWORD", password)
            .output()
            .expect("run ipmitool")
    }

    /// "on"/"off" as ipmitool reads it.
    fn ipmitool_power(&self) -> String {
        let output = self.ipmitool(ADMIN_USER, ADMIN_PASSWORD, &["chassis", "power", "status"]);
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(output.status.success(), "ipmitool failed: {text} {}", String::from_utf8_lossy(&output.stderr));
        if text.contains("is on") {
            "on".into()
        } else if text.contains("is off") {
            "off".into()
        } else {
            panic!("unexpected ipmitool output {text:?}")
        }
    }
}

pub fn password_file(dir: &Path, password: &str) -> PathBuf {
    let path = dir.join(format!("password-{}", free_udp_port()));
    std::fs::write(&path, format!("{password}\n")).unwrap();
    // Secret::from_file refuses a world-readable password file.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}
