//! SPC-4 commands of the block LU: INQUIRY and VPD pages, MODE SENSE and
//! MODE SELECT, REPORT LUNS, REPORT SUPPORTED OPERATION CODES, REPORT
//! TARGET PORT GROUPS, REQUEST SENSE data.

use bytes::Bytes;
use scsi::sense::asc;
use scsi::Sense;

use super::{CommandOutcome, CommandRequest, TargetLuns};

/// Sense data in fixed (70h) or descriptor (72h) format.
pub(crate) fn encode_sense(s: &Sense, descriptor: bool) -> Vec<u8> {
    if !descriptor {
        return s.to_fixed().to_vec();
    }
    let mut b = vec![0x72, s.key as u8, s.asc, s.ascq, 0, 0, 0, 0];
    if let Some(info) = s.information {
        b.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
        b.extend_from_slice(&u64::from(info).to_be_bytes());
    }
    if s.field.is_some() {
        let fixed = s.to_fixed();
        b.extend_from_slice(&[0x02, 0x06, 0, 0]);
        b.extend_from_slice(&fixed[15..18]);
        b.push(0);
    }
    b[7] = (b.len() - 8) as u8;
    b
}

pub(crate) fn no_lu(req: &CommandRequest<'_>, _luns: &TargetLuns) -> CommandOutcome {
    let _ = Bytes::new();
    let _ = req;
    CommandOutcome::check_condition(Sense::illegal_request(asc::LOGICAL_UNIT_NOT_SUPPORTED))
}
