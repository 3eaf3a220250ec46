//! Reservation gate of a logical unit: SPC-4 persistent reservations and
//! SPC-2 RESERVE/RELEASE.
//!
//! Placeholder with no state: every command passes the gate and the
//! reservation commands are not supported. The PR engineer replaces this
//! file; the LU depends only on the signatures below.

use scsi::sense::asc;
use scsi::{Nexus, Sense};

use super::{CommandOutcome, ReservationContext};

/// Reservation state of one logical unit.
#[derive(Debug)]
pub struct Reservations {
    #[allow(dead_code)]
    ctx: ReservationContext,
}

impl Reservations {
    pub fn new(ctx: ReservationContext) -> Self {
        Reservations { ctx }
    }

    /// May `nexus` run `cdb` given the reservations held? false: the LU
    /// answers RESERVATION CONFLICT.
    pub fn check(&self, _nexus: &Nexus, _cdb: &[u8]) -> bool {
        true
    }

    /// Run PERSISTENT RESERVE IN/OUT, RESERVE(6/10) or RELEASE(6/10).
    pub fn execute(&self, _nexus: &Nexus, _cdb: &[u8], _data_out: &[u8]) -> CommandOutcome {
        CommandOutcome::check_condition(Sense::illegal_request(asc::INVALID_COMMAND_OPERATION_CODE))
    }

    /// The I_T nexus is gone (session closed or dropped).
    pub fn on_nexus_loss(&self, _nexus: &Nexus) {}

    /// LOGICAL UNIT RESET.
    pub fn on_lu_reset(&self) {}

    /// TARGET WARM/COLD RESET.
    pub fn on_target_reset(&self) {}
}
