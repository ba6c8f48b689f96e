//! Everything a Redfish BMC (or whoever answers on its address) sends back
//! goes through these functions: none may panic, and no path taken from an
//! answer may lead the client, with its credentials, away from the BMC.

#![no_main]

use kvmha_bmc::redfish;
use kvmha_bmc::PowerState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let body = String::from_utf8_lossy(bytes);
    for status in [200u16, 204, 400, 401, 404, 409, 500, 501] {
        let status = redfish::StatusCode::from_u16(status).expect("valid status");
        let _ = redfish::check_status("GET /redfish/v1/Systems/1", status, &body);
    }
    let Ok(value) = redfish::parse_json("/redfish/v1/Systems", &body) else {
        return;
    };
    for system_id in [None, Some("1"), Some("")] {
        if let Ok(path) = redfish::system_path_from_collection(&value, system_id) {
            assert!(path.starts_with('/') && !path.starts_with("//") && !path.contains('@'), "{path:?}");
        }
    }
    match redfish::power_state_from_system("/redfish/v1/Systems/1", &value) {
        Ok(PowerState::Off) => assert_eq!(value["PowerState"].as_str(), Some("Off")),
        Ok(PowerState::On) | Err(_) => {}
    }
    if let Ok(target) = redfish::reset_target_from_system("/redfish/v1/Systems/1", &value) {
        assert!(target.starts_with('/') && !target.starts_with("//") && !target.contains('@'), "{target:?}");
    }
});
