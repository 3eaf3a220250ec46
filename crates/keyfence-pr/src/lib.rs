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
//!
//! Where the standard leaves room, the engine decides as follows:
//!
//! * PRgeneration counts every successful REGISTER, REGISTER AND IGNORE
//!   EXISTING KEY (also re-registering the same key, and unregistering),
//!   CLEAR, PREEMPT, PREEMPT AND ABORT and REGISTER AND MOVE; not RESERVE,
//!   RELEASE, failures, nor a REGISTER that "does nothing" (unregistered
//!   nexus, both keys zero). REPLACE LOST RESERVATION sets it to zero.
//! * Order of checks: CDB service action, parameter list length and
//!   layout, APTPL support, reservation key (RESERVATION CONFLICT), then
//!   SCOPE/TYPE (INVALID FIELD IN CDB with field pointer), then the
//!   service action's own rules.
//! * ALL_TG_PT applies the request to the initiator port's I_T nexus on
//!   every target port of the LU (registering, re-keying or unregistering
//!   each); the key is verified on the receiving nexus only.
//! * SPEC_I_PT: format 01b TransportIDs name one initiator port; format 00b
//!   names every initiator port known to the device server with that iSCSI
//!   name (SPC-5 7.6.4.6). All or nothing: one already-registered nexus
//!   fails the command with INVALID FIELD IN PARAMETER LIST pointing at
//!   its TransportID. REGISTER AND MOVE needs exactly one initiator port.
//! * Unit attentions go to I_T nexuses, never to a whole initiator; the
//!   nexus the command came through never gets one; nexuses removed by
//!   the same command get REGISTRATIONS PREEMPTED, not also RESERVATIONS
//!   RELEASED.
//! * PREEMPT AND ABORT aborts the tasks of every nexus registered with the
//!   key (every registered nexus for key zero under all-registrants),
//!   the preemptor's own other tasks included (SPC-5 5.13.11.2.6).
//! * The recoverable lost-reservation condition is entered when persisted
//!   state cannot be read back; only REPLACE LOST RESERVATION and the
//!   SPC-5 5.13.5.2 commands run until then.
#![forbid(unsafe_code)]

pub mod access;
pub mod engine;
pub mod state;
pub mod store;

pub use engine::{
    check_access, full_status, on_nexus_loss, on_reset, pr_in, pr_out, spc2, Access, AccessView,
    Applied, Context, Effects, Features, Persist, Refusal, MAX_REGISTRATIONS, PR_INFORMATION_LOST,
};
pub use keyfence_scsi::pr_data::{PrOutAction, PrType};
pub use state::{PrState, Registration, Reservation, StateRecord};
pub use store::{MemoryStore, PrStore, StoreError, Version};
