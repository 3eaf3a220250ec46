//! SCSI wire formats shared by the keyfence target, PR engine and initiator.
//!
//! This crate owns the byte layouts only: CDB decoding, sense data, status
//! codes, VPD pages, persistent-reservation parameter lists and TransportIDs,
//! and the identity of an I_T nexus. It does no I/O and holds no state.
//! It also exports [`wire_enum!`], the one macro the SCSI and iSCSI crates
//! use to declare their tables of one-byte codes.
#![forbid(unsafe_code)]

pub mod cdb;
pub mod nexus;
pub mod opcode;
pub mod pr_data;
pub mod sense;
pub mod status;
pub mod transport_id;
pub mod vpd;
mod wire_enum;

pub use nexus::{InitiatorPort, Nexus, TargetPort};
pub use sense::{Sense, SenseKey};
pub use status::ScsiStatus;
