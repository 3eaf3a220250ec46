//! The initiator's typed errors.

use std::time::Duration;

use keyfence_scsi::{Sense, SenseKey};

use crate::identity::IdentityError;
use crate::url::UrlError;

/// Everything that can go wrong between calling the initiator and getting a
/// good SCSI status back.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The wrapped errors are part of the message and deliberately not
    // exposed as `source()`, so printing the error chain (`{:#}`) does not
    // repeat them.
    /// Socket-level failure (connect, read, write).
    #[error("I/O error: {0}")]
    Io(std::io::Error),

    /// The TCP connection to the portal could not be opened.
    #[error("cannot connect to {portal}: {error}")]
    Connect {
        portal: String,
        error: std::io::Error,
    },

    #[error("invalid iSCSI URL: {0}")]
    Url(UrlError),

    #[error("{0}")]
    Identity(IdentityError),

    /// The target refused the login (RFC 7143 §11.13.5).
    #[error("login to {target} failed: {} (status class 0x{class:02x}, detail 0x{detail:02x})", login_status_text(*.class, *.detail))]
    Login {
        target: String,
        class: u8,
        detail: u8,
    },

    /// CHAP or negotiation problem on our side of the login.
    #[error("login negotiation failed: {0}")]
    Negotiation(String),

    /// The target sent something RFC 7143 does not allow.
    #[error("iSCSI protocol error: {0}")]
    Protocol(String),

    /// The target rejected one of our PDUs (RFC 7143 §11.17).
    #[error("target rejected PDU: reason 0x{reason:02x} ({})", reject_reason_text(*.reason))]
    Rejected { reason: u8 },

    /// A command or login did not finish in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: &'static str, after: Duration },

    /// The connection went away while a command was outstanding; the
    /// command's outcome on the target is unknown.
    #[error("connection lost: {0}")]
    ConnectionLost(String),

    /// The session has been logged out or closed.
    #[error("session is closed")]
    SessionClosed,

    /// SCSI status RESERVATION CONFLICT.
    #[error("RESERVATION CONFLICT")]
    ReservationConflict,

    /// CHECK CONDITION with sense key UNIT ATTENTION.
    #[error("UNIT ATTENTION: {} (asc 0x{:02x} ascq 0x{:02x})", scsi_asc_text(.0.asc, .0.ascq), .0.asc, .0.ascq)]
    UnitAttention(Sense),

    /// CHECK CONDITION with any other sense key.
    #[error("CHECK CONDITION: {:?}, {} (asc 0x{:02x} ascq 0x{:02x})", .0.key, scsi_asc_text(.0.asc, .0.ascq), .0.asc, .0.ascq)]
    CheckCondition(Sense),

    /// CHECK CONDITION without usable sense data.
    #[error("CHECK CONDITION without sense data")]
    CheckConditionNoSense,

    /// Any other non-GOOD status (BUSY, TASK SET FULL, ACA ACTIVE, TASK
    /// ABORTED, or an unknown value).
    #[error("SCSI status 0x{:02x} ({})", .0, status_text(*.0))]
    Status(u8),

    /// The iSCSI response code was not "command completed at target".
    #[error("iSCSI target failure (response 0x{0:02x})")]
    TargetFailure(u8),

    /// Task management function did not complete.
    #[error("task management function failed: response {0}")]
    TaskManagement(u8),

    /// The target returned data we could not decode.
    #[error("malformed {what} from target: {detail}")]
    BadData { what: &'static str, detail: String },

    /// Discovery did not list the target we asked for.
    #[error("target {0} not found on portal {1}")]
    TargetNotFound(String, String),

    /// A caller-supplied argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<UrlError> for Error {
    fn from(e: UrlError) -> Self {
        Error::Url(e)
    }
}

impl From<IdentityError> for Error {
    fn from(e: IdentityError) -> Self {
        Error::Identity(e)
    }
}

impl Error {
    /// The sense data, for CHECK CONDITION errors.
    pub fn sense(&self) -> Option<&Sense> {
        match self {
            Error::UnitAttention(s) | Error::CheckCondition(s) => Some(s),
            _ => None,
        }
    }

    /// True for UNIT ATTENTION (which a retry normally clears).
    pub fn is_unit_attention(&self) -> bool {
        matches!(self, Error::UnitAttention(_))
    }

    /// True when the session can no longer be used and a reconnect is needed.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::Io(_)
                | Error::Connect { .. }
                | Error::ConnectionLost(_)
                | Error::SessionClosed
                | Error::Protocol(_)
        )
    }

    pub(crate) fn from_check_condition(sense: Option<Sense>) -> Error {
        match sense {
            Some(s) if s.key == SenseKey::UnitAttention => Error::UnitAttention(s),
            Some(s) => Error::CheckCondition(s),
            None => Error::CheckConditionNoSense,
        }
    }

    pub(crate) fn protocol(msg: impl Into<String>) -> Error {
        Error::Protocol(msg.into())
    }
}

/// Text for the login status class/detail pairs of RFC 7143 §11.13.5.
pub fn login_status_text(class: u8, detail: u8) -> &'static str {
    keyfence_iscsi::login::LoginStatus { class, detail }.description()
}

/// Text for Reject reasons (RFC 7143 §11.17.1).
pub fn reject_reason_text(reason: u8) -> &'static str {
    keyfence_iscsi::pdu::RejectReason::from_u8(reason).description()
}

fn status_text(s: u8) -> &'static str {
    keyfence_scsi::ScsiStatus::from_u8(s)
        .map_or("unexpected status", keyfence_scsi::ScsiStatus::description)
}

/// Short descriptions of the ASC/ASCQ pairs a PR client meets most.
pub fn scsi_asc_text(asc: u8, ascq: u8) -> &'static str {
    match (asc, ascq) {
        (0x04, _) => "logical unit not ready",
        (0x1a, 0x00) => "parameter list length error",
        (0x20, 0x00) => "invalid command operation code",
        (0x21, 0x00) => "logical block address out of range",
        (0x24, 0x00) => "invalid field in CDB",
        (0x25, 0x00) => "logical unit not supported",
        (0x26, 0x00) => "invalid field in parameter list",
        (0x26, 0x04) => "invalid release of persistent reservation",
        (0x27, 0x00) => "write protected",
        (0x29, 0x00) => "power on, reset, or bus device reset occurred",
        (0x29, 0x01) => "power on occurred",
        (0x29, 0x07) => "I_T nexus loss occurred",
        (0x29, _) => "reset occurred",
        (0x2a, 0x03) => "reservations preempted",
        (0x2a, 0x04) => "reservations released",
        (0x2a, 0x05) => "registrations preempted",
        (0x2a, 0x09) => "capacity data has changed",
        (0x2a, _) => "parameters changed",
        (0x2f, 0x00) => "commands cleared by another initiator",
        (0x3f, 0x0e) => "reported LUNs data has changed",
        (0x3f, _) => "target operating conditions have changed",
        (0x55, 0x04) => "insufficient registration resources",
        _ => "see SPC-4 annex D",
    }
}

/// Shorthand for results of initiator operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
