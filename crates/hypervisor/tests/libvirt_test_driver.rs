//! The libvirt driver against libvirt's own `test:///default` driver (in-process, no
//! daemon). Each test runs its whole sequence on one `LibvirtDriver` (one connection).
//! `test:///default` shares its state among the connections of one process, so tests use
//! distinct domain names and UUIDs and stay correct when a runner (`cargo test`) runs them
//! as threads of one process.

use std::time::Duration;

use kvmha_hypervisor::libvirt::LibvirtDriver;
use kvmha_hypervisor::{
    DomainState, Error, Hypervisor, MigrateRequest, ShutOffReason, ShutdownOutcome, ShutdownRequest,
};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A UUID of its own per domain name (FNV-1a of the name in the last group).
fn uuid_of(name: &str) -> String {
    let hash =
        name.bytes().fold(0xcbf29ce484222325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x100000001b3));
    format!("8d0a6c3e-5b1f-4f0e-9a57-{:012x}", hash & 0xffff_ffff_ffff)
}

fn domain_xml(name: &str) -> String {
    let uuid = uuid_of(name);
    format!(
        "<domain type='test'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  \
         <memory unit='MiB'>256</memory>\n  <currentMemory unit='MiB'>128</currentMemory>\n  \
         <vcpu>2</vcpu>\n  <os>\n    <type>hvm</type>\n  </os>\n</domain>\n"
    )
}

async fn test_driver() -> LibvirtDriver {
    LibvirtDriver::connect("test:///default", CALL_TIMEOUT).await.expect("test:///default opens without a daemon")
}

#[tokio::test]
async fn define_start_list_destroy_undefine() {
    let driver = test_driver().await;
    assert_eq!(driver.driver_name(), "libvirt");

    let name = driver.define(&domain_xml("ha-web")).await.unwrap();
    assert_eq!(name, "ha-web");
    let defined = driver.domain("ha-web").await.unwrap();
    assert_eq!(defined.state, DomainState::ShutOff(ShutOffReason::Unknown));
    assert!(!defined.active);
    assert!(defined.persistent);
    assert_eq!(defined.uuid, Some(uuid_of("ha-web")));

    driver.start("ha-web").await.unwrap();
    let listed: Vec<_> = driver
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|info| ["ha-web", "test"].contains(&info.name.as_str()))
        .collect();
    let names: Vec<&str> = listed.iter().map(|info| info.name.as_str()).collect();
    // "test" is the domain the test driver ships with.
    assert_eq!(names, ["ha-web", "test"]);
    let running = &listed[0];
    assert_eq!(running.state, DomainState::Running);
    assert!(running.active);
    assert!(running.state.may_be_running());
    assert_eq!(running.vcpus, 2);
    assert_eq!(running.memory_kib, 128 * 1024);
    assert_eq!(running.max_memory_kib, 256 * 1024);

    driver.destroy("ha-web").await.unwrap();
    let destroyed = driver.domain("ha-web").await.unwrap();
    assert_eq!(destroyed.state, DomainState::ShutOff(ShutOffReason::Destroyed));
    assert!(!destroyed.active);
    assert!(!destroyed.state.may_be_running());

    driver.undefine("ha-web").await.unwrap();
    let error = driver.domain("ha-web").await.unwrap_err();
    assert!(matches!(&error, Error::NoSuchDomain { domain } if domain == "ha-web"), "{error}");
    let names: Vec<String> = driver.list().await.unwrap().into_iter().map(|info| info.name).collect();
    assert!(names.contains(&"test".to_string()), "{names:?}");
    assert!(!names.contains(&"ha-web".to_string()), "{names:?}");
}

#[tokio::test]
async fn unknown_domain_is_a_fatal_no_such_domain() {
    let driver = test_driver().await;
    let expect_no_such = |operation: &str, result: Result<(), Error>| {
        let error = result.expect_err(operation);
        assert!(matches!(&error, Error::NoSuchDomain { domain } if domain == "ghost"), "{operation}: {error}");
        assert!(error.is_fatal(), "{operation}");
    };
    expect_no_such("domain", driver.domain("ghost").await.map(drop));
    expect_no_such("start", driver.start("ghost").await);
    expect_no_such("destroy", driver.destroy("ghost").await);
    expect_no_such("undefine", driver.undefine("ghost").await);
    expect_no_such("domain_xml", driver.domain_xml("ghost").await.map(drop));
    let shutdown = ShutdownRequest { timeout: Duration::from_secs(1), destroy_on_timeout: true };
    expect_no_such("shutdown", driver.shutdown("ghost", shutdown).await.map(drop));
}

#[tokio::test]
async fn xml_round_trip_defines_the_same_domain_elsewhere() {
    let source = test_driver().await;
    source.define(&domain_xml("ha-db")).await.unwrap();
    let xml = source.domain_xml("ha-db").await.unwrap();
    assert!(xml.contains("<name>ha-db</name>"), "{xml}");
    assert!(xml.contains(&uuid_of("ha-db")), "{xml}");

    // test:///default shares its state between the connections of one process, so the
    // other "host" is a test driver started from its own (empty) node file.
    let directory = tempfile::tempdir().unwrap();
    let node_file = directory.path().join("node.xml");
    std::fs::write(&node_file, "<node/>\n").unwrap();
    let target = LibvirtDriver::connect(&format!("test://{}", node_file.display()), CALL_TIMEOUT).await.unwrap();
    assert!(matches!(target.domain("ha-db").await, Err(Error::NoSuchDomain { .. })));
    assert_eq!(target.define(&xml).await.unwrap(), "ha-db");
    let copy = target.domain("ha-db").await.unwrap();
    let original = source.domain("ha-db").await.unwrap();
    assert_eq!(copy, original);
    assert_eq!(target.domain_xml("ha-db").await.unwrap(), xml);

    // Defining the same definition again replaces it (libvirt semantics), no error.
    assert_eq!(source.define(&xml).await.unwrap(), "ha-db");
    target.start("ha-db").await.unwrap();
    assert_eq!(target.domain("ha-db").await.unwrap().state, DomainState::Running);
}

#[tokio::test]
async fn requests_that_do_not_fit_the_state_are_refused() {
    let driver = test_driver().await;
    driver.define(&domain_xml("ha-app")).await.unwrap();
    let error = driver.destroy("ha-app").await.unwrap_err();
    assert!(matches!(error, Error::InvalidState { .. }), "{error}");
    assert!(error.is_fatal());

    driver.start("ha-app").await.unwrap();
    let error = driver.start("ha-app").await.unwrap_err();
    assert!(matches!(error, Error::InvalidState { .. }), "{error}");
}

#[tokio::test]
async fn graceful_shutdown_ends_shut_off() {
    let driver = test_driver().await;
    driver.define(&domain_xml("ha-calm")).await.unwrap();
    driver.start("ha-calm").await.unwrap();
    let outcome = driver
        .shutdown("ha-calm", ShutdownRequest { timeout: Duration::from_secs(5), destroy_on_timeout: false })
        .await
        .unwrap();
    assert_eq!(outcome, ShutdownOutcome::Graceful);
    assert_eq!(driver.domain("ha-calm").await.unwrap().state, DomainState::ShutOff(ShutOffReason::Shutdown));
}

#[tokio::test]
async fn bad_definitions_are_rejected() {
    let driver = test_driver().await;
    for xml in ["not xml at all", "<domain type='test'><name>x</name></domain>"] {
        let error = driver.define(xml).await.unwrap_err();
        assert!(matches!(error, Error::InvalidDefinition { .. }), "{xml}: {error}");
        assert!(error.is_fatal());
    }
}

#[tokio::test]
async fn migration_is_unsupported_by_the_test_driver() {
    let driver = test_driver().await;
    assert!(!driver.supports_migration());
    let request =
        MigrateRequest { destination_uri: "test:///default".to_string(), live: true, timeout: Duration::from_secs(5) };
    let error = driver.migrate("test", &request).await.unwrap_err();
    assert!(matches!(error, Error::Unsupported { operation: "migrate", driver: "libvirt" }), "{error}");
}

#[tokio::test]
async fn an_unknown_uri_fails_to_connect() {
    let error = LibvirtDriver::connect("nosuchdriver:///nowhere", CALL_TIMEOUT).await.unwrap_err();
    assert!(!matches!(error, Error::Timeout { .. }), "{error}");
}

/// A libvirt server that accepts the connection and never answers: the call must come
/// back with a timeout at its deadline instead of hanging the caller.
#[tokio::test]
async fn a_silent_server_yields_a_timeout_at_the_deadline() {
    let directory = tempfile::tempdir().unwrap();
    let socket = directory.path().join("libvirt-sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    // Accept and hold connections without ever replying.
    let silent = std::thread::spawn(move || {
        let mut held = Vec::new();
        if let Ok((stream, _)) = listener.accept() {
            held.push(stream);
            std::thread::sleep(Duration::from_secs(3));
        }
    });
    let uri = format!("qemu+unix:///system?socket={}", socket.display());
    let started = std::time::Instant::now();
    let error = LibvirtDriver::connect(&uri, Duration::from_millis(700)).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(error, Error::Timeout { operation: "connect", .. }), "{error}");
    assert!(error.is_retryable());
    assert!(elapsed >= Duration::from_millis(700), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(2700), "returned only with the server: {elapsed:?}");
    silent.join().unwrap();
}
