//! The only place IPMI touches the network: one connected UDP socket,
//! bounded attempts, each with its own timeout.

use crate::error::{BmcError, Result};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Transport {
    socket: UdpSocket,
    pub(crate) peer: SocketAddr,
    attempt_timeout: Duration,
    attempts_max: u32,
}

/// What a receive closure says about a datagram.
pub(crate) enum Verdict<T> {
    Done(T),
    /// Not ours, stale, or unverifiable: keep waiting for the real answer.
    Ignore(String),
}

impl Transport {
    pub(crate) async fn connect(peer: SocketAddr, attempt_timeout: Duration, attempts_max: u32) -> Result<Self> {
        let bind: SocketAddr =
            if peer.is_ipv6() { "[::]:0".parse().expect("literal") } else { "0.0.0.0:0".parse().expect("literal") };
        let io = |context: &str| {
            let context = format!("{context} {peer}");
            move |source| BmcError::Io { context, source }
        };
        let socket = UdpSocket::bind(bind).await.map_err(io("bind udp socket for"))?;
        // A connected socket only hears from the BMC, and an ICMP port
        // unreachable surfaces as ECONNREFUSED instead of silence.
        socket.connect(peer).await.map_err(io("connect udp socket to"))?;
        Ok(Transport { socket, peer, attempt_timeout, attempts_max: attempts_max.max(1) })
    }

    /// Sends `packets[attempt]` (the last one again if fewer were given) and
    /// waits for a datagram `judge` accepts, up to `attempts_max` times.
    pub(crate) async fn exchange<T>(
        &self,
        operation: &str,
        packets: &[Vec<u8>],
        mut judge: impl FnMut(&[u8]) -> Result<Verdict<T>>,
    ) -> Result<T> {
        assert!(!packets.is_empty(), "exchange needs a packet to send");
        let started = Instant::now();
        let mut buffer = vec![0u8; super::codec::DATAGRAM_MAX + 1];
        let mut refused = false;
        let mut last_ignored: Option<String> = None;
        for attempt in 0..self.attempts_max {
            let packet = &packets[(attempt as usize).min(packets.len() - 1)];
            if attempt > 0 {
                tracing::debug!(operation, attempt, peer = %self.peer, "ipmi retransmit");
            }
            match self.socket.send(packet).await {
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                    refused = true;
                    // ICMP from an earlier send; give the next attempt a moment.
                    tokio::time::sleep(self.attempt_timeout.min(Duration::from_millis(50))).await;
                    continue;
                }
                Err(source) => {
                    return Err(BmcError::Io { context: format!("send {operation} to {}", self.peer), source })
                }
            }
            let attempt_deadline = Instant::now() + self.attempt_timeout;
            loop {
                let received = tokio::time::timeout_at(attempt_deadline, self.socket.recv(&mut buffer)).await;
                let length = match received {
                    Err(_elapsed) => break,
                    Ok(Ok(length)) => length,
                    Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                        refused = true;
                        tokio::time::sleep_until(
                            attempt_deadline.min(Instant::now() + self.attempt_timeout.min(Duration::from_millis(50))),
                        )
                        .await;
                        break;
                    }
                    Ok(Err(source)) => {
                        return Err(BmcError::Io { context: format!("receive {operation} from {}", self.peer), source })
                    }
                };
                if length > super::codec::DATAGRAM_MAX {
                    last_ignored = Some("oversized datagram".into());
                    continue;
                }
                match judge(&buffer[..length])? {
                    Verdict::Done(value) => return Ok(value),
                    Verdict::Ignore(reason) => {
                        tracing::debug!(operation, peer = %self.peer, reason, "ipmi datagram ignored");
                        last_ignored = Some(reason);
                    }
                }
            }
        }
        let after_ms = started.elapsed().as_millis() as u64;
        if refused {
            return Err(BmcError::Unreachable {
                address: self.peer.to_string(),
                reason: format!("{operation}: port unreachable (connection refused)"),
            });
        }
        if let Some(reason) = last_ignored {
            return Err(BmcError::protocol(format!(
                "{operation}: no valid answer after {} attempts, last datagram ignored: {reason}",
                self.attempts_max
            )));
        }
        Err(BmcError::Timeout { operation: format!("{operation} ({} attempts)", self.attempts_max), after_ms })
    }
}

impl Transport {
    pub(crate) fn attempts_max(&self) -> u32 {
        self.attempts_max
    }
}
