//! Sans-IO SCSI-3 persistent reservation engine (SPC-4 5.12 / SPC-5 5.13,
//! including REPLACE LOST RESERVATION) for one logical unit.
//!
//! This crate owns the *rules*: [`PrState`] is the reservation state of a
//! LU (registrations keyed by I_T nexus, the reservation, APTPL,
//! PRgeneration, SPC-2 reservation); [`pr_out`], [`pr_in`], [`spc2`] and
//! the reset hooks are pure functions from a state to its successor plus
//! [`Effects`] (unit attentions per I_T nexus, tasks to abort, what to
//! persist); [`check_access`] is the reservation gate, driven by one table
//! ([`access::TABLE`]). [`PrStore`] is the shape of durable storage; no
//! I/O happens here.
#![forbid(unsafe_code)]

pub mod access;
pub mod engine;
pub mod state;
pub mod store;

pub use engine::{
    check_access, full_status, on_nexus_loss, on_reset, pr_in, pr_out, spc2, Access, AccessView,
    Applied, Context, Effects, Features, Persist, Reject, MAX_REGISTRATIONS, PR_INFORMATION_LOST,
};
pub use scsi::pr_data::{PrOutAction, PrType};
pub use state::{PrState, Registration, Reservation, StateRecord};
pub use store::{MemoryStore, PrStore, StoreError, Version};
