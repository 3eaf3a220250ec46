//! The keyfence iSCSI target.
//!
//! `backend` is the block storage a logical unit sits on (files, block
//! devices, memory); `lu` is SBC/SPC command emulation over a backend — a
//! synchronous, transport-agnostic device server that also hosts the
//! persistent-reservation gate; `config` describes what is served; `server`
//! is the thin tokio shell: listeners, iSCSI sessions and connections.

pub mod backend;
pub mod config;
pub mod lu;
pub mod server;
