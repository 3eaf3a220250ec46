//! keyfence's iSCSI initiator: a tokio client for RFC 7143 targets with a
//! typed SCSI and persistent-reservation API.
//!
//! This crate owns the initiator side of the wire: URL parsing ([`url`]),
//! initiator identity and ISID choice ([`identity`]), login and discovery
//! ([`login`]), sessions over TCP with many outstanding commands
//! ([`session`]), and typed SCSI ([`device`]) and persistent-reservation
//! ([`pr`]) calls. PDU encoding, parameter negotiation and CHAP live in the
//! sans-IO `iscsi` crate; SCSI byte layouts in `scsi`.
//!
//! ```no_run
//! # async fn demo() -> keyfence_initiator::Result<()> {
//! use keyfence_initiator::{Device, IscsiUrl, SessionConfig, PrType, RegisterOptions};
//! let url = IscsiUrl::parse("iscsi://127.0.0.1/iqn.2026-11.io.keyfence:default/0")?;
//! let dev = Device::connect(&url, &SessionConfig::default()).await?;
//! dev.register(0, 0x1234, &RegisterOptions::default()).await?;
//! dev.reserve(0x1234, PrType::WriteExclusive).await?;
//! println!("{:?}", dev.read_reservation().await?);
//! dev.close().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod device;
pub mod error;
pub mod identity;
pub mod login;
pub mod pr;
pub mod session;
pub mod url;

pub use bytes::Bytes;
pub use config::SessionConfig;
pub use device::Device;
pub use error::{Error, Result};
pub use identity::{InitiatorName, Isid};
pub use keyfence_iscsi::params::{Digest, OperationalPrefs};
pub use keyfence_iscsi::pdu::Residual;
pub use keyfence_scsi::pr_data::{
    Capabilities, FullStatus, FullStatusDescriptor, PrType, ReadKeys, ReadReservation,
    ReservationDescriptor,
};
pub use keyfence_scsi::transport_id::TransportId;
pub use keyfence_scsi::{Sense, SenseKey};
pub use login::{discover, DiscoveredTarget};
pub use pr::{MoveTarget, RegisterOptions};
pub use session::{Limits, ScsiResult, Session, SessionInfo};
pub use url::IscsiUrl;
