//! IPMI command numbers, privilege levels and the meanings of the codes a BMC
//! can answer with. Kept as data so errors can say what a code means.

use crate::error::{BmcError, Result};
use crate::PowerState;

pub const NETFN_CHASSIS: u8 = 0x00;
pub const NETFN_APP: u8 = 0x06;

pub const CMD_GET_CHASSIS_STATUS: u8 = 0x01;
pub const CMD_CHASSIS_CONTROL: u8 = 0x02;
pub const CMD_GET_CHANNEL_AUTH_CAPABILITIES: u8 = 0x38;
pub const CMD_SET_SESSION_PRIVILEGE_LEVEL: u8 = 0x3b;
pub const CMD_CLOSE_SESSION: u8 = 0x3c;

/// "Current channel" in Get Channel Authentication Capabilities.
pub const CHANNEL_CURRENT: u8 = 0x0e;
/// Bit 7 of the channel byte asks for the IPMI v2.0 extended capabilities.
pub const CHANNEL_REQUEST_V2_DATA: u8 = 0x80;

/// RAKP1 role bit 4: look the user up by name only, then apply the
/// requested role against that user's limit (what ipmitool does by default).
pub const ROLE_NAME_ONLY_LOOKUP: u8 = 0x10;

/// Session privilege levels (§22.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Privilege {
    Callback = 1,
    User = 2,
    Operator = 3,
    /// Chassis control needs at least Operator; Administrator is the default
    /// so a fence never fails for want of privilege when the account has it.
    #[default]
    Administrator = 4,
}

impl Privilege {
    pub fn level(self) -> u8 {
        self as u8
    }
}

impl std::str::FromStr for Privilege {
    type Err = BmcError;
    fn from_str(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "callback" => Ok(Privilege::Callback),
            "user" => Ok(Privilege::User),
            "operator" => Ok(Privilege::Operator),
            "administrator" | "admin" => Ok(Privilege::Administrator),
            other => Err(BmcError::Config { reason: format!("unknown privilege level {other:?}") }),
        }
    }
}

/// Chassis Control sub-commands (§28.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChassisControl {
    PowerDown = 0x00,
    PowerUp = 0x01,
    PowerCycle = 0x02,
    HardReset = 0x03,
    SoftShutdown = 0x05,
}

impl ChassisControl {
    pub fn name(self) -> &'static str {
        match self {
            ChassisControl::PowerDown => "power down",
            ChassisControl::PowerUp => "power up",
            ChassisControl::PowerCycle => "power cycle",
            ChassisControl::HardReset => "hard reset",
            ChassisControl::SoftShutdown => "soft shutdown",
        }
    }
}

/// The parts of Get Chassis Status (§28.2) fencing cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChassisStatus {
    pub power: PowerState,
    pub power_overload: bool,
    pub interlock: bool,
    pub power_fault: bool,
    pub power_control_fault: bool,
}

pub fn decode_chassis_status(data: &[u8]) -> Result<ChassisStatus> {
    // Current power state, last power event, misc chassis state are mandatory.
    if data.len() < 3 {
        return Err(BmcError::protocol("get chassis status response too short"));
    }
    let state = data[0];
    Ok(ChassisStatus {
        power: if state & 0x01 != 0 { PowerState::On } else { PowerState::Off },
        power_overload: state & 0x02 != 0,
        interlock: state & 0x04 != 0,
        power_fault: state & 0x08 != 0,
        power_control_fault: state & 0x10 != 0,
    })
}

/// Meaning of an IPMI completion code (§5.2, table 5-2).
pub fn completion_code_meaning(code: u8) -> &'static str {
    match code {
        0x00 => "command completed normally",
        0xc0 => "node busy",
        0xc1 => "invalid command",
        0xc2 => "command invalid for given lun",
        0xc3 => "timeout while processing command",
        0xc4 => "out of space",
        0xc5 => "reservation canceled or invalid reservation id",
        0xc6 => "request data truncated",
        0xc7 => "request data length invalid",
        0xc8 => "request data field length limit exceeded",
        0xc9 => "parameter out of range",
        0xca => "cannot return number of requested data bytes",
        0xcb => "requested sensor, data, or record not present",
        0xcc => "invalid data field in request",
        0xcd => "command illegal for specified sensor or record type",
        0xce => "command response could not be provided",
        0xcf => "cannot execute duplicated request",
        0xd0 => "sdr repository in update mode",
        0xd1 => "device in firmware update mode",
        0xd2 => "bmc initialization in progress",
        0xd3 => "destination unavailable",
        0xd4 => "insufficient privilege level",
        0xd5 => "command not supported in present state",
        0xd6 => "command sub-function disabled or unavailable",
        0xff => "unspecified error",
        0x01..=0x7e => "device specific (oem) completion code",
        0x80..=0xbe => "command specific completion code",
        _ => "reserved completion code",
    }
}

/// Meaning of a Set Session Privilege Level command-specific code (§22.18).
pub fn set_privilege_code_meaning(code: u8) -> &'static str {
    match code {
        0x80 => "requested privilege level not available for this user",
        0x81 => "requested privilege level exceeds user or channel limit",
        0x82 => "cannot disable user level authentication",
        other => completion_code_meaning(other),
    }
}

/// Meaning of an RMCP+ / RAKP status code (§13.24, table 13-15).
pub fn rmcp_plus_status_meaning(code: u8) -> &'static str {
    match code {
        0x00 => "no errors",
        0x01 => "insufficient resources to create a session",
        0x02 => "invalid session id",
        0x03 => "invalid payload type",
        0x04 => "invalid authentication algorithm",
        0x05 => "invalid integrity algorithm",
        0x06 => "no matching authentication payload",
        0x07 => "no matching integrity payload",
        0x08 => "inactive session id",
        0x09 => "invalid role",
        0x0a => "unauthorized role or privilege level requested",
        0x0b => "insufficient resources to create a session at the requested role",
        0x0c => "invalid name length",
        0x0d => "unauthorized name",
        0x0e => "unauthorized guid",
        0x0f => "invalid integrity check value",
        0x10 => "invalid confidentiality algorithm",
        0x11 => "no cipher suite match with proposed security algorithms",
        0x12 => "illegal or unrecognized parameter",
        _ => "reserved status code",
    }
}

/// RMCP+ status codes meaning "this cipher suite is not offered here", after
/// which the next weaker suite is tried.
pub fn status_means_suite_unsupported(code: u8) -> bool {
    matches!(code, 0x03..=0x07 | 0x10 | 0x11)
}

/// RMCP+ status codes that mean the credentials or the account are wrong.
pub fn status_means_bad_credentials(code: u8) -> bool {
    matches!(code, 0x0d | 0x0f)
}

/// Turns a non-zero completion code into the typed refusal.
pub fn check_completion(operation: &str, code: u8, meaning: fn(u8) -> &'static str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    Err(BmcError::Refused {
        operation: operation.to_string(),
        code: u16::from(code),
        meaning: meaning(code).to_string(),
    })
}
