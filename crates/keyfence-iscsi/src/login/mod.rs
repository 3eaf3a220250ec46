//! Login phase state machines (RFC 7143 §6.3, §11.12, §11.13, §12.1.3).
//!
//! [`TargetLogin`] consumes Login Requests and produces Login Responses
//! until the connection reaches full feature phase or the login fails with
//! the right Status-Class/Status-Detail. [`InitiatorLogin`] is the
//! counterpart: it produces the requests and consumes the responses.
//! Both handle security (AuthMethod None or CHAP-MD5, optionally mutual),
//! operational negotiation, stage transitions (T bit), text continuation
//! (C bit) and discovery sessions.
//!
//! Layout: this file holds what both sides share (the version, limits,
//! [`LoginStatus`] and [`SessionType`]); `target` the target's state
//! machine and its helpers for logins it refuses outright; `initiator` the
//! initiator's. Everything is re-exported here, so a type's path is
//! `keyfence_iscsi::login::X` whichever file it lives in.

mod initiator;
mod target;

pub use initiator::{
    InitiatorLogin, InitiatorLoginConfig, InitiatorSession, InitiatorStep, LoginError,
};
pub use target::{
    redirect_login, reject_login, LoginStep, NegotiatedSession, TargetLogin, TargetLoginConfig,
};

/// The iSCSI version we speak (RFC 7143: 0x00).
pub const ISCSI_VERSION: u8 = 0;
/// Data segment limit for login PDUs (the default MaxRecvDataSegmentLength).
pub const LOGIN_MAX_DATA: usize = 8192;
/// Most PDUs either side accepts in one login before giving up.
pub const MAX_LOGIN_PDUS: u32 = 64;

/// Login Status-Class / Status-Detail (RFC 7143 §11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoginStatus {
    pub class: u8,
    pub detail: u8,
}

/// Declares the defined statuses once: a constant each, and the text
/// [`LoginStatus::description`] gives for them. (A two-byte class/detail
/// pair with class-wide fallbacks, so not a [`keyfence_scsi::wire_enum!`].)
macro_rules! login_statuses {
    ($( $name:ident = ($class:literal, $detail:literal) => $desc:literal, )+) => {
        impl LoginStatus {
            $( pub const $name: LoginStatus = LoginStatus::new($class, $detail); )+

            /// The RFC's text for a defined class/detail pair.
            fn defined_description(self) -> Option<&'static str> {
                match (self.class, self.detail) {
                    $( ($class, $detail) => Some($desc), )+
                    _ => None,
                }
            }
        }
    };
}

login_statuses! {
    SUCCESS = (0x00, 0x00) => "success",
    TARGET_MOVED_TEMPORARILY = (0x01, 0x01) => "target moved temporarily",
    TARGET_MOVED_PERMANENTLY = (0x01, 0x02) => "target moved permanently",
    INITIATOR_ERROR = (0x02, 0x00) => "initiator error",
    AUTHENTICATION_FAILURE = (0x02, 0x01) => "authentication failure",
    AUTHORIZATION_FAILURE = (0x02, 0x02) => "authorization failure",
    NOT_FOUND = (0x02, 0x03) => "target not found",
    TARGET_REMOVED = (0x02, 0x04) => "target removed",
    UNSUPPORTED_VERSION = (0x02, 0x05) => "unsupported version",
    TOO_MANY_CONNECTIONS = (0x02, 0x06) => "too many connections",
    MISSING_PARAMETER = (0x02, 0x07) => "missing parameter",
    CANT_INCLUDE_IN_SESSION = (0x02, 0x08) => "can't include in session",
    SESSION_TYPE_NOT_SUPPORTED = (0x02, 0x09) => "session type not supported",
    SESSION_DOES_NOT_EXIST = (0x02, 0x0a) => "session does not exist",
    INVALID_DURING_LOGIN = (0x02, 0x0b) => "invalid request during login",
    TARGET_ERROR = (0x03, 0x00) => "target error",
    SERVICE_UNAVAILABLE = (0x03, 0x01) => "service unavailable",
    OUT_OF_RESOURCES = (0x03, 0x02) => "out of resources",
}

impl LoginStatus {
    pub const fn new(class: u8, detail: u8) -> LoginStatus {
        LoginStatus { class, detail }
    }

    /// The status as `0xCCDD`.
    pub fn code(self) -> u16 {
        u16::from(self.class) << 8 | u16::from(self.detail)
    }

    /// A short description of the status: the RFC's text for a defined
    /// one, else that of its class.
    pub fn description(self) -> &'static str {
        self.defined_description().unwrap_or(match self.class {
            1 => "redirection",
            2 => "initiator error",
            3 => "target error",
            _ => "unknown status",
        })
    }
}

impl std::fmt::Display for LoginStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{:04x} ({})", self.code(), self.description())
    }
}

/// Normal or discovery session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionType {
    Normal,
    Discovery,
}
