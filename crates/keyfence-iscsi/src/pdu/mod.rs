//! iSCSI PDUs (RFC 7143 §11): the raw [`Pdu`] (BHS + AHS + data segment) and
//! one typed struct per PDU, each with `parse(&Pdu)` and `to_pdu()`.
//!
//! Parsing checks the opcode and every field whose value the RFC constrains;
//! a failure is a [`PduError`] that knows which Reject reason it maps to.
//!
//! Layout: this file holds the limits, [`PduError`] and the code tables
//! both directions use ([`Opcode`], [`RejectReason`], [`Stage`]); `header`
//! the raw [`Pdu`] and the BHS field accessors; `initiator` the PDUs an
//! initiator sends, with [`InitiatorPdu`]; `target` those a target sends,
//! with [`TargetPdu`]. Everything is re-exported here, so a type's path is
//! `keyfence_iscsi::pdu::X` whichever file it lives in.

use keyfence_scsi::wire_enum;
use thiserror::Error;

mod header;
mod initiator;
mod target;

pub use header::{Lun, Pdu};
pub use initiator::{
    Cdb, DataOut, InitiatorPdu, LoginRequest, LogoutReason, LogoutRequest, NopOut, ScsiCommand,
    SnackRequest, SnackType, TaskAttr, TaskMgmtRequest, TextRequest, TmfFunction,
};
pub use target::{
    AsyncMessage, DataIn, LoginResponse, LogoutResponse, LogoutResponseCode, NopIn, R2t, Reject,
    Residual, ScsiResponse, TargetPdu, TaskMgmtResponse, TextResponse, TmfResponse,
};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Largest value the 24-bit DataSegmentLength field can hold.
pub const MAX_DATA_SEGMENT_LEN: usize = 0x00ff_ffff;
/// The reserved ITT / TTT value 0xffffffff.
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Largest CDB carried (16 in the BHS plus an extended-CDB AHS).
pub const MAX_CDB_LEN: usize = 260;

/// Errors found while interpreting a (correctly framed) PDU.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PduError {
    /// The opcode field holds a value RFC 7143 does not define.
    #[error("unknown opcode 0x{0:02x}")]
    UnknownOpcode(u8),
    /// `parse` was called on a PDU of another type.
    #[error("expected opcode {expected:?}, found 0x{found:02x}")]
    WrongOpcode { expected: Opcode, found: u8 },
    /// A field holds a value the RFC forbids.
    #[error("invalid {field}: {detail}")]
    InvalidField {
        field: &'static str,
        detail: &'static str,
    },
    /// The data segment does not have the layout the PDU requires.
    #[error("malformed data segment: {0}")]
    BadDataSegment(&'static str),
    /// An Additional Header Segment is malformed.
    #[error("malformed AHS: {0}")]
    BadAhs(&'static str),
    /// A Task Management Function Request with an undefined function
    /// code: a target answers with a Task Management Function Response
    /// "function not supported" (5), RFC 7143 §11.6.1, not with a Reject.
    #[error("undefined task management function {0}")]
    UnknownTmfFunction(u8),
}

impl PduError {
    /// The Reject reason a target sends for this error (RFC 7143 §11.17.1).
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            PduError::UnknownOpcode(_) => RejectReason::CommandNotSupported,
            PduError::WrongOpcode { .. } => RejectReason::ProtocolError,
            PduError::InvalidField { .. }
            | PduError::BadDataSegment(_)
            | PduError::BadAhs(_)
            | PduError::UnknownTmfFunction(_) => RejectReason::InvalidPduField,
        }
    }
}

pub(super) fn invalid(field: &'static str, detail: &'static str) -> PduError {
    PduError::InvalidField { field, detail }
}

wire_enum! {
    /// iSCSI opcodes (RFC 7143 §11.2.1.2).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Opcode: u8 else PduError::UnknownOpcode {
        NopOut = 0x00 => "NOP-Out",
        ScsiCommand = 0x01 => "SCSI Command",
        TaskMgmtRequest = 0x02 => "SCSI Task Management Function Request",
        LoginRequest = 0x03 => "Login Request",
        TextRequest = 0x04 => "Text Request",
        DataOut = 0x05 => "SCSI Data-Out",
        LogoutRequest = 0x06 => "Logout Request",
        SnackRequest = 0x10 => "SNACK Request",
        NopIn = 0x20 => "NOP-In",
        ScsiResponse = 0x21 => "SCSI Response",
        TaskMgmtResponse = 0x22 => "SCSI Task Management Function Response",
        LoginResponse = 0x23 => "Login Response",
        TextResponse = 0x24 => "Text Response",
        DataIn = 0x25 => "SCSI Data-In",
        LogoutResponse = 0x26 => "Logout Response",
        R2t = 0x31 => "Ready To Transfer (R2T)",
        AsyncMessage = 0x32 => "Asynchronous Message",
        Reject = 0x3f => "Reject",
    }
}

impl Opcode {
    /// True for opcodes sent by an initiator (0x00..=0x1f).
    pub fn is_initiator(self) -> bool {
        (self as u8) < 0x20
    }

    /// True for opcodes sent by a target (0x20..=0x3f).
    pub fn is_target(self) -> bool {
        !self.is_initiator()
    }
}

wire_enum! {
    /// The Reject reason codes (RFC 7143 §11.17.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum RejectReason: u8 {
        /// The initiator may retransmit.
        DataDigestError = 0x02 => "data (payload) digest error",
        SnackReject = 0x03 => "SNACK reject",
        /// E.g. a PDU type the receiver must never get.
        ProtocolError = 0x04 => "protocol error",
        CommandNotSupported = 0x05 => "command not supported",
        /// Too many immediate commands.
        ImmediateCommandReject = 0x06 => "immediate command reject",
        TaskInProgress = 0x07 => "task in progress",
        InvalidDataAck = 0x08 => "invalid data ack",
        InvalidPduField = 0x09 => "invalid PDU field",
        /// Long operation reject: can't generate a target transfer tag.
        OutOfResources = 0x0a => "long operation reject",
        /// Formerly "negotiation reset".
        NegotiationReset = 0x0b => "deprecated",
        WaitingForLogout = 0x0c => "waiting for logout",
    }
    /// Any other value.
    other Other => "reserved";
}

wire_enum! {
    /// Login stage (CSG / NSG, RFC 7143 §11.12.3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Stage: u8 {
        Security = 0 => "SecurityNegotiation",
        Operational = 1 => "LoginOperationalNegotiation",
        FullFeature = 3 => "FullFeaturePhase",
    }
}

impl Stage {
    /// The stage in the low two bits of `v`; 2 is reserved.
    pub(super) fn from_bits(v: u8, field: &'static str) -> Result<Stage, PduError> {
        Stage::from_u8(v & 3).ok_or(invalid(field, "reserved stage 2"))
    }
}

pub(super) fn stage_flags(transit: bool, cont: bool, csg: Stage, nsg: Stage) -> u8 {
    let mut f = ((csg as u8) << 2) | if transit { 0x80 | nsg as u8 } else { 0 };
    if cont {
        f |= 0x40;
    }
    f
}
