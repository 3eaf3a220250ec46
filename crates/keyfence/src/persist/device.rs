//! The device side of the PR tools: the LUN abstraction and PR commands
//! come from keyfence-fence; what stays here is the mapping of initiator
//! errors to sg3_utils exit statuses and the verbose report of the unit
//! attentions cleared after login.

use keyfence_initiator::Error;

pub use keyfence_fence::lun::{prin_cmd, prout_cmd, IscsiLun, Lun, Target};

use super::sgerr::SgCat;

/// sg3_utils category of a failed command.
pub fn category(e: &Error) -> SgCat {
    match e {
        Error::ReservationConflict => SgCat::RES_CONFLICT,
        Error::UnitAttention(_) => SgCat::UNIT_ATTENTION,
        Error::CheckCondition(s) => SgCat::from_sense(Some(s)),
        Error::CheckConditionNoSense => SgCat::SENSE,
        Error::Status(s) => SgCat::from_status(*s),
        Error::Timeout { .. } => SgCat::TIMEOUT,
        Error::BadData { .. } => SgCat::MALFORMED,
        _ => SgCat::OTHER,
    }
}

/// Consume the unit attentions queued for a new I_T nexus (see
/// [`keyfence_fence::lun::clear_unit_attentions`]); each one is logged to
/// `err` when verbose.
pub async fn clear_unit_attentions<L: Lun>(lun: &L, verbose: u32, err: &mut String) {
    for s in keyfence_fence::lun::clear_unit_attentions(lun).await {
        if verbose > 1 {
            err.push_str(&format!(
                "    cleared unit attention: asc=0x{:02x} ascq=0x{:02x}\n",
                s.asc, s.ascq
            ));
        }
    }
}
