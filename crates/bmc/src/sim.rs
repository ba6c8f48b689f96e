//! Launches OpenIPMI's `ipmi_sim` as a throwaway BMC: for this crate's
//! tests and for `kvmha bench bmc`. One process per instance, its own port
//! and state directory, killed (by pid) on drop.

use crate::error::{BmcError, Result};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "fence-me-now";
/// A USER-privilege account: may read status, may not control power.
pub const VIEWER_USER: &str = "viewer";
pub const VIEWER_PASSWORD: &str = "look-only";

fn io(context: &str) -> impl FnOnce(std::io::Error) -> BmcError {
    let context = context.to_string();
    move |source| BmcError::Io { context, source }
}

/// Asks the kernel for a free UDP port. Another process could take it before
/// ipmi_sim binds; the start-up check then fails loudly instead of hanging.
pub fn free_udp_port() -> Result<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(io("bind ephemeral udp port"))?;
    Ok(socket.local_addr().map_err(io("local address"))?.port())
}

/// The chassis script ipmi_sim calls for power control. It keeps the power
/// state in a file and appends every `set` to a log, so tests can prove the
/// simulator really acted (not just answered). It execs nothing long-lived,
/// so no child keeps ipmi_sim's UDP socket open after the test.
///
/// Modes (second argument): `normal`; `stuck` accepts power off but the
/// chassis stays on; `off-then-fail` powers off and then reports failure
/// (ipmi_sim turns that into completion code FFh), like a dying chassis.
const CHASSIS_SCRIPT: &str = r#"#!/bin/sh
state="$1"; mode="$2"; shift 2
case "$1" in
  get)
    if [ -s "$state" ]; then read -r value < "$state"; else value=0; fi
    echo "power:$value"
    ;;
  set)
    echo "$2 $3" >> "$state.log"
    if [ "$2" = power ]; then
      case "$mode" in
        stuck) ;;
        off-then-fail) echo "$3" > "$state"; exit 1 ;;
        *) echo "$3" > "$state" ;;
      esac
    fi
    ;;
esac
exit 0
"#;

#[derive(Debug)]
pub struct IpmiSim {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl IpmiSim {
    /// Starts a simulated BMC whose chassis starts with power `initially_on`.
    pub fn start(initially_on: bool) -> Result<IpmiSim> {
        Self::start_with_priv_limit(initially_on, "admin")
    }

    /// A BMC whose chassis script behaves per `mode` (see [`CHASSIS_SCRIPT`]).
    pub fn start_with_mode(initially_on: bool, mode: &str) -> Result<IpmiSim> {
        Self::start_full(initially_on, "admin", mode)
    }

    pub fn start_with_priv_limit(initially_on: bool, channel_priv_limit: &str) -> Result<IpmiSim> {
        Self::start_full(initially_on, channel_priv_limit, "normal")
    }

    fn start_full(initially_on: bool, channel_priv_limit: &str, mode: &str) -> Result<IpmiSim> {
        let dir = tempfile::tempdir().map_err(io("create ipmi_sim dir"))?;
        let script = dir.path().join("chassis.sh");
        std::fs::write(&script, CHASSIS_SCRIPT).map_err(io("write chassis script"))?;
        set_executable(&script)?;
        let power = dir.path().join("power");
        std::fs::write(&power, if initially_on { "1\n" } else { "0\n" }).map_err(io("write power state"))?;
        let port = free_udp_port()?;
        let lan_conf = format!(
            r#"name "kvmha-test"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit {channel_priv_limit}
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "{script} {power} {mode}"
  user 1 true  ""       "test"   user  10 none md2 md5 straight
  user 2 true  "{ADMIN_USER}"  "{ADMIN_PASSWORD}" admin 10 none md2 md5 straight
  user 3 true  "{VIEWER_USER}" "{VIEWER_PASSWORD}" user 10 none md2 md5 straight
"#,
            script = script.display(),
            power = power.display(),
        );
        let conf_path = dir.path().join("lan.conf");
        std::fs::write(&conf_path, lan_conf).map_err(io("write lan.conf"))?;
        let emu_path = dir.path().join("emu.cmds");
        std::fs::write(
            &emu_path,
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
        )
        .map_err(io("write emu.cmds"))?;
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).map_err(io("create state dir"))?;
        let child = Command::new("ipmi_sim")
            .arg("-n")
            .arg("-c")
            .arg(&conf_path)
            .arg("-f")
            .arg(&emu_path)
            .arg("-s")
            .arg(&state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("start ipmi_sim (Debian package openipmi)"))?;
        let sim = IpmiSim { child, dir, port };
        sim.wait_ready()?;
        Ok(sim)
    }

    /// Waits until the simulator answers an ASF presence ping, built here by
    /// hand so readiness does not depend on the code under test.
    fn wait_ready(&self) -> Result<()> {
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(io("bind probe socket"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50))).map_err(io("set probe timeout"))?;
        let ping = [0x06, 0x00, 0xff, 0x06, 0x00, 0x00, 0x11, 0xbe, 0x80, 0x01, 0x00, 0x00];
        let started = Instant::now();
        let mut buffer = [0u8; 128];
        while started.elapsed() < Duration::from_secs(10) {
            let _ = socket.send_to(&ping, ("127.0.0.1", self.port));
            if let Ok((length, _)) = socket.recv_from(&mut buffer) {
                if length >= 12 && buffer[8] == 0x40 {
                    return Ok(());
                }
            }
        }
        panic!("ipmi_sim on port {} never answered a presence ping", self.port);
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Power as the chassis script recorded it: the ground truth (unreadable = off).
    pub fn script_power(&self) -> bool {
        std::fs::read_to_string(self.dir.path().join("power")).map(|text| text.trim() == "1").unwrap_or(false)
    }

    /// Every `set` the simulator handed to the chassis script, in order.
    pub fn script_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("power.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// ipmi_sim has been seen to die silently under heavy probing: callers
    /// check this before a scenario rather than blame the client.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        // Kill by the pid we recorded, never by name: other engineers run
        // their own simulators on this machine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut permissions = std::fs::metadata(path).map_err(io("stat chassis script"))?.permissions();
    permissions.set_mode(0o755);
    std::fs::set_permissions(path, permissions).map_err(io("chmod chassis script"))
}
