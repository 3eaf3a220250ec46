//! Sans-IO iSCSI (RFC 7143, error recovery level 0) for the keyfence target
//! and initiator.
//!
//! This crate owns the iSCSI wire protocol and nothing else: PDU layouts
//! ([`pdu`]), framing with CRC32C digests ([`codec`]), text key=value
//! encoding ([`keys`]), operational parameter negotiation ([`params`]), the
//! login state machines with CHAP ([`login`], [`chap`]), SendTargets
//! discovery ([`text`]) and serial number arithmetic ([`serial`]). It does
//! no I/O: callers feed bytes or PDUs in and send what comes out.
#![forbid(unsafe_code)]

pub mod chap;
pub mod codec;
pub mod keys;
pub mod login;
pub mod params;
pub mod pdu;
pub mod serial;
pub mod text;

pub use chap::ChapCredential;
pub use codec::{CodecError, PduCodec};
pub use login::{
    InitiatorLogin, InitiatorLoginConfig, InitiatorSession, InitiatorStep, LoginError, LoginStatus,
    LoginStep, NegotiatedSession, SessionType, TargetLogin, TargetLoginConfig,
};
pub use params::{Digest, OperationalPrefs, SessionParams};
pub use pdu::{
    AsyncMessage, Cdb, DataIn, DataOut, InitiatorPdu, LoginRequest, LoginResponse, LogoutReason,
    LogoutRequest, LogoutResponse, LogoutResponseCode, Lun, NopIn, NopOut, Opcode, Pdu, PduError,
    R2t, Reject, RejectReason, Residual, ScsiCommand, ScsiResponse, SnackRequest, SnackType, Stage,
    TargetPdu, TaskAttr, TaskMgmtRequest, TaskMgmtResponse, TextRequest, TextResponse, TmfFunction,
    TmfResponse,
};
pub use text::{DiscoveredTarget, TextCollector, TextProgress, TextResponder};
