//! Sans-IO iSCSI (RFC 7143, error recovery level 0) for the keyfence target
//! and initiator.
//!
//! This crate owns the iSCSI wire protocol and nothing else: PDU layouts
//! ([`pdu`]), framing with CRC32C digests ([`codec`]), text key=value
//! encoding ([`keys`]), operational parameter negotiation ([`params`]), the
//! login state machines with CHAP ([`login`], [`chap`]), SendTargets
//! discovery ([`text`]), the target's command window and Data-Out/R2T
//! rules ([`sequencing`]) and serial number arithmetic ([`serial`]). It does
//! no I/O: callers feed bytes or PDUs in and send what comes out.
//!
//! # Using it on a connection
//!
//! * Framing: one [`PduCodec`] per connection. Feed received bytes into a
//!   `BytesMut` and call [`PduCodec::decode`] until it returns `Ok(None)`.
//!   On `Err(e)`, [`CodecError::is_fatal`] says whether the connection must
//!   drop and [`CodecError::reject`] gives the Reject reason and header to
//!   answer with ([`pdu::Reject::new`]). Send with [`PduCodec::encode`], or
//!   for large payloads [`PduCodec::encode_header`] + the payload bytes +
//!   [`PduCodec::data_trailer`] to avoid copying.
//! * Typed PDUs: [`pdu::InitiatorPdu::parse`] / [`pdu::TargetPdu::parse`]
//!   (or `X::parse` per type); `x.to_pdu()` back. Builders leave SNs to
//!   the sequencing layer: [`Pdu::set_target_sns`] / [`Pdu::set_initiator_sns`];
//!   compare SNs with [`serial`].
//! * Login: target side [`TargetLogin::step`] per Login Request until
//!   [`LoginStep::Complete`] (then `codec.apply(&session.params)`) or
//!   [`LoginStep::Failed`] (send, then close). Initiator side
//!   [`InitiatorLogin::start`] then [`InitiatorLogin::step`] per response.
//! * Discovery: [`TextResponder::handle`] on the target,
//!   [`text::send_targets_request`] + [`TextCollector`] +
//!   [`text::parse_send_targets`] on the initiator.
#![forbid(unsafe_code)]

pub mod chap;
pub mod codec;
pub mod keys;
pub mod login;
pub mod params;
pub mod pdu;
pub mod sequencing;
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
pub use text::{SendTargetsEntry, TextCollector, TextProgress, TextResponder};
