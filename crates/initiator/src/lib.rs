//! keyfence's iSCSI initiator: a tokio client for RFC 7143 targets with a
//! typed SCSI and persistent-reservation API.
//!
//! This crate owns the initiator side of the wire: URL parsing ([`url`]),
//! initiator identity and ISID choice ([`identity`]), sessions over TCP with
//! many outstanding commands, and typed SCSI/PR calls. PDU encoding, login
//! negotiation and CHAP live in the sans-IO `iscsi` crate; SCSI byte layouts
//! in `scsi`.
#![forbid(unsafe_code)]

pub mod commands;
pub mod error;
pub mod identity;
pub mod url;

pub use error::{Error, Result};
pub use identity::{InitiatorName, Isid};
pub use url::IscsiUrl;
