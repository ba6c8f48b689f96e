//! systemd's notification protocol (`sd_notify(3)`), for `Type=notify` units: one
//! datagram per state change to the socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name written `@name`). Without `$NOTIFY_SOCKET` (not under systemd) every call
//! is a no-op.
//!
//! - `READY=1` once the daemon serves (the manager: listeners bound, engine stepping);
//! - `WATCHDOG=1` at half of `$WATCHDOG_USEC` while the daemon is healthy (the manager
//!   sends it only after the engine thread answered, so a wedged engine gets restarted);
//! - `STOPPING=1` on a clean stop; `STATUS=...` for `systemctl status`.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` to `$NOTIFY_SOCKET`. `Ok(false)` when there is no such socket.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var("NOTIFY_SOCKET") {
        Ok(socket) if !socket.is_empty() => notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the socket `socket` (a path, or `@abstract-name`).
pub fn notify_to(socket: &str, state: &str) -> io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sender.send_to_addr(state.as_bytes(), &address)?;
    } else {
        sender.send_to(state.as_bytes(), socket)?;
    }
    Ok(())
}

/// Logs instead of failing: a lost notification must never stop the daemon (systemd
/// then times the start out or restarts it, which is the right outcome).
pub fn notify_or_log(state: &str) {
    if let Err(error) = notify(state) {
        tracing::warn!(%error, state, "sd_notify failed");
    }
}

/// How often to send `WATCHDOG=1`: half the interval systemd expects, if it expects one
/// from this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_arrives_as_one_datagram_on_a_path_and_on_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=serving").unwrap();
        let mut buffer = [0u8; 256];
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("kvmha-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        notify_to(&format!("@{name}"), "WATCHDOG=1").unwrap();
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"WATCHDOG=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_the_caller_sees() {
        let dir = tempfile::tempdir().unwrap();
        assert!(notify_to(dir.path().join("absent").to_str().unwrap(), "READY=1").is_err());
    }
}
