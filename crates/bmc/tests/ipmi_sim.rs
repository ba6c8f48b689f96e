//! Our IPMI client against OpenIPMI's ipmi_sim, cross-checked with ipmitool
//! and with the chassis script's own record of what it was told to do.

mod common;

use common::*;
use kvmha_bmc::ipmi::commands::Privilege;
use kvmha_bmc::ipmi::{IpmiClient, IpmiConfig};
use kvmha_bmc::{BmcError, PowerControl, PowerState, Secret};
use std::time::Duration;

fn admin_client(bmc: &SimBmc) -> IpmiClient {
    client(bmc, ADMIN_USER, ADMIN_PASSWORD)
}

fn client(bmc: &SimBmc, user: &str, password: &str) -> IpmiClient {
    let mut config = IpmiConfig::new(bmc.address(), user, Secret::new(password));
    config.attempt_timeout = Duration::from_millis(500);
    IpmiClient::new(config).unwrap()
}

#[tokio::test]
async fn status_reads_what_the_chassis_script_reports() {
    let on = SimBmc::start(true).unwrap();
    let off = SimBmc::start(false).unwrap();
    assert_eq!(admin_client(&on).status().await.unwrap(), PowerState::On);
    assert_eq!(admin_client(&off).status().await.unwrap(), PowerState::Off);
    assert_eq!(on.ipmitool_power(), "on");
    assert_eq!(off.ipmitool_power(), "off");
}

#[tokio::test]
async fn presence_ping_is_answered() {
    let bmc = SimBmc::start(true).unwrap();
    let pong = admin_client(&bmc).presence_ping().await.unwrap();
    assert!(pong.ipmi_supported);
}

#[tokio::test]
async fn negotiation_falls_back_from_suite_17_to_3() {
    // ipmi_sim has no SHA-256: the strongest suite is refused and 3 is used.
    let bmc = SimBmc::start(true).unwrap();
    let session = admin_client(&bmc).open_session().await.unwrap();
    assert_eq!(session.cipher_suite(), 3);
    session.close().await.unwrap();
}

#[tokio::test]
async fn power_off_then_on_acts_on_the_chassis_and_ipmitool_agrees() {
    let bmc = SimBmc::start(true).unwrap();
    let client = admin_client(&bmc);

    client.power_off().await.unwrap();
    assert!(!bmc.script_power(), "chassis script was not told to power off");
    assert_eq!(bmc.ipmitool_power(), "off");
    assert_eq!(client.status().await.unwrap(), PowerState::Off);

    client.power_on().await.unwrap();
    assert!(bmc.script_power(), "chassis script was not told to power on");
    assert_eq!(bmc.ipmitool_power(), "on");
    assert_eq!(client.status().await.unwrap(), PowerState::On);

    assert_eq!(bmc.script_log(), vec!["power 0", "power 1"]);
}

#[tokio::test]
async fn reset_reaches_the_chassis_script_and_leaves_power_on() {
    let bmc = SimBmc::start(true).unwrap();
    let client = admin_client(&bmc);
    client.reset().await.unwrap();
    assert!(bmc.script_log().iter().any(|line| line == "reset 1"), "script log: {:?}", bmc.script_log());
    assert_eq!(bmc.ipmitool_power(), "on");
    assert_eq!(client.status().await.unwrap(), PowerState::On);
}

#[tokio::test]
async fn cycle_powers_off_then_back_on_through_the_chassis_script() {
    let bmc = SimBmc::start(true).unwrap();
    let client = admin_client(&bmc);
    client.power_cycle().await.unwrap();
    // ipmi_sim powers off at once and back on from a timer a moment later,
    // so wait (bounded) for the second half instead of assuming its delay.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while bmc.script_log().len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bmc.script_log(), vec!["power 0", "power 1"]);
    assert_eq!(bmc.ipmitool_power(), "on");
    assert_eq!(client.status().await.unwrap(), PowerState::On);
}

#[tokio::test]
async fn several_bmcs_are_controlled_independently_at_once() {
    let bmcs: Vec<SimBmc> = (0..4).map(|_| SimBmc::start(true).unwrap()).collect();
    let clients: Vec<IpmiClient> = bmcs.iter().map(admin_client).collect();
    // Power off the even ones concurrently; the odd ones must stay on.
    let offs = clients.iter().enumerate().filter(|(index, _)| index % 2 == 0).map(|(_, client)| client.power_off());
    for outcome in futures_join_all(offs).await {
        outcome.unwrap();
    }
    let statuses = futures_join_all(clients.iter().map(|client| client.status())).await;
    for (index, (bmc, status)) in bmcs.iter().zip(statuses).enumerate() {
        let expected = if index % 2 == 0 { PowerState::Off } else { PowerState::On };
        assert_eq!(status.unwrap(), expected, "bmc {index}");
        assert_eq!(bmc.ipmitool_power(), expected.to_string(), "bmc {index}");
        assert_eq!(bmc.script_power(), expected == PowerState::On, "bmc {index}");
    }
}

/// Polls all futures concurrently in this task (no spawning, so they may
/// borrow), without pulling in the futures crate for one join_all.
async fn futures_join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for future in futures {
        set.push(Box::pin(future));
    }
    let mut outputs = Vec::with_capacity(set.len());
    // Drive them together: select over the remaining ones until all finish.
    let mut pending: Vec<Option<_>> = set.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(output) => {
                        *result = Some(output);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.extend(results.into_iter().map(|result| result.expect("finished")));
    outputs
}

#[tokio::test]
async fn wrong_password_is_an_authentication_error_without_the_password() {
    let bmc = SimBmc::start(true).unwrap();
    let wrong = "not-the-password-xyz";
    let error = client(&bmc, ADMIN_USER, wrong).status().await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("authentication failed"), "{shown}");
    assert!(!shown.contains(wrong), "{shown}");
    assert!(bmc.script_log().is_empty());
}

#[tokio::test]
async fn unknown_user_is_an_authentication_error() {
    let bmc = SimBmc::start(true).unwrap();
    let error = client(&bmc, "nobody", ADMIN_PASSWORD).power_off().await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");
    assert!(bmc.script_power(), "a failed login must not touch power");
}

#[tokio::test]
async fn unreachable_port_fails_as_unreachable_within_the_timeout() {
    let (_closed, port) = closed_udp_port(); // held by us, nothing listens
    let mut config = IpmiConfig::new(format!("127.0.0.1:{port}"), ADMIN_USER, Secret::new(ADMIN_PASSWORD));
    config.attempt_timeout = Duration::from_millis(100);
    config.attempts_max = 2;
    config.operation_timeout = Duration::from_secs(5);
    let error = IpmiClient::new(config).unwrap().status().await.unwrap_err();
    assert!(matches!(error, BmcError::Unreachable { .. }), "{error:?}");
    assert!(error.is_retryable());
}

#[tokio::test]
async fn silent_peer_is_unreachable_not_a_hang() {
    // A bound socket that never answers: no ICMP refusal, only silence.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let mut config = IpmiConfig::new(address, ADMIN_USER, Secret::new(ADMIN_PASSWORD));
    config.attempt_timeout = Duration::from_millis(100);
    config.attempts_max = 2;
    let error = IpmiClient::new(config).unwrap().status().await.unwrap_err();
    assert!(matches!(error, BmcError::Unreachable { .. }), "{error:?}");
}

#[tokio::test]
async fn user_privilege_reads_status_but_is_refused_power_control() {
    let bmc = SimBmc::start(true).unwrap();
    let mut config = IpmiConfig::new(bmc.address(), VIEWER_USER, Secret::new(VIEWER_PASSWORD));
    config.privilege = Privilege::User;
    let viewer = IpmiClient::new(config).unwrap();
    assert_eq!(viewer.status().await.unwrap(), PowerState::On);
    let error = viewer.power_off().await.unwrap_err();
    match &error {
        BmcError::Refused { code, meaning, .. } => {
            assert_eq!(*code, 0xd4);
            assert_eq!(meaning, "insufficient privilege level");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(error.to_string().contains("code 0xd4 (insufficient privilege level)"), "{error}");
    assert!(bmc.script_power(), "refused power off must leave power on");
    assert_eq!(bmc.ipmitool_power(), "on");
}

#[tokio::test]
async fn one_session_carries_many_commands_with_advancing_sequence_numbers() {
    let bmc = SimBmc::start(false).unwrap();
    let mut session = admin_client(&bmc).open_session().await.unwrap();
    for _ in 0..20 {
        assert_eq!(session.chassis_status().await.unwrap().power, PowerState::Off);
    }
    session.chassis_control(kvmha_bmc::ipmi::commands::ChassisControl::PowerUp).await.unwrap();
    assert_eq!(session.chassis_status().await.unwrap().power, PowerState::On);
    session.close().await.unwrap();
    assert!(bmc.script_power());
}

#[tokio::test]
async fn suite_zero_is_refused_unless_allowed() {
    let bmc = SimBmc::start(true).unwrap();
    let mut config = IpmiConfig::new(bmc.address(), ADMIN_USER, Secret::new(ADMIN_PASSWORD));
    config.cipher_suites = vec![0];
    let error = IpmiClient::new(config).unwrap_err();
    assert!(matches!(error, BmcError::Negotiation { .. }), "{error:?}");
}

#[tokio::test]
async fn soft_shutdown_reaches_the_chassis_script() {
    let bmc = SimBmc::start(true).unwrap();
    admin_client(&bmc).chassis_control(kvmha_bmc::ipmi::commands::ChassisControl::SoftShutdown).await.unwrap();
    assert_eq!(bmc.script_log(), vec!["shutdown 1"]);
}

/// A UDP relay in front of a BMC that drops every other datagram from the
/// client: each exchange only succeeds through a retransmission.
async fn lossy_relay(upstream: String) -> (String, tokio::task::JoinHandle<()>) {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(&upstream).await.unwrap();
    let address = front.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let mut client = None;
        let mut from_client = 0u64;
        let mut buffer = [0u8; 2048];
        let mut reply = [0u8; 2048];
        loop {
            tokio::select! {
                received = front.recv_from(&mut buffer) => {
                    let Ok((length, peer)) = received else { return };
                    client = Some(peer);
                    from_client += 1;
                    if from_client % 2 == 1 {
                        continue; // dropped
                    }
                    let _ = back.send(&buffer[..length]).await;
                }
                received = back.recv(&mut reply) => {
                    let Ok(length) = received else { return };
                    if let Some(peer) = client {
                        let _ = front.send_to(&reply[..length], peer).await;
                    }
                }
            }
        }
    });
    (address, task)
}

#[tokio::test]
async fn retransmissions_get_through_a_network_that_drops_every_other_datagram() {
    let bmc = SimBmc::start(true).unwrap();
    let (relay, task) = lossy_relay(bmc.address()).await;
    let mut config = IpmiConfig::new(relay, ADMIN_USER, Secret::new(ADMIN_PASSWORD));
    config.cipher_suites = vec![3];
    // Generous per-attempt time: a slow answer on a loaded machine would
    // trigger an extra retransmission and shift which datagrams are dropped.
    config.attempt_timeout = Duration::from_millis(500);
    config.attempts_max = 3;
    let client = IpmiClient::new(config).unwrap();
    client.power_off().await.unwrap();
    assert_eq!(client.status().await.unwrap(), PowerState::Off);
    assert_eq!(bmc.script_log(), vec!["power 0"], "power off must run once");
    task.abort();
}

#[tokio::test]
async fn suite_zero_works_only_when_explicitly_allowed() {
    let bmc = SimBmc::start(true).unwrap();
    let mut config = IpmiConfig::new(bmc.address(), ADMIN_USER, Secret::new(ADMIN_PASSWORD));
    config.cipher_suites = vec![0];
    config.allow_suite_zero = true;
    let client = IpmiClient::new(config).unwrap();
    let session = client.open_session().await.unwrap();
    assert_eq!(session.cipher_suite(), 0);
    session.close().await.unwrap();
    assert_eq!(client.status().await.unwrap(), PowerState::On);
}
