//! keyfence-target: the iSCSI target shell.
//!
//! This crate owns what is served and how it is reached: `config` (the TOML
//! model and its validation) and `server` (tokio listeners, login, sessions
//! and connections). SCSI command emulation lives in `keyfence-lu`, iSCSI
//! wire rules in the sans-IO `keyfence-iscsi`; this crate wires the two to
//! sockets, disks and timers.

pub mod config;
pub mod server;
