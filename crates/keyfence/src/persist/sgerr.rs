//! sg3_utils exit statuses ("sense categories", `SG_LIB_CAT_*` in
//! sg_lib.h) and their one-line descriptions, so that `keyfence persist`
//! exits and complains exactly like sg_persist.

use keyfence_scsi::{Sense, SenseKey};

/// An sg3_utils exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SgCat(pub u8);

impl SgCat {
    pub const CLEAN: SgCat = SgCat(0);
    pub const SYNTAX_ERROR: SgCat = SgCat(1);
    pub const NOT_READY: SgCat = SgCat(2);
    pub const MEDIUM_HARD: SgCat = SgCat(3);
    pub const ILLEGAL_REQ: SgCat = SgCat(5);
    pub const UNIT_ATTENTION: SgCat = SgCat(6);
    pub const DATA_PROTECT: SgCat = SgCat(7);
    pub const INVALID_OP: SgCat = SgCat(9);
    pub const COPY_ABORTED: SgCat = SgCat(10);
    pub const ABORTED_COMMAND: SgCat = SgCat(11);
    pub const MISCOMPARE: SgCat = SgCat(14);
    pub const FILE_ERROR: SgCat = SgCat(15);
    pub const NO_SENSE: SgCat = SgCat(20);
    pub const RECOVERED: SgCat = SgCat(21);
    pub const LBA_OUT_OF_RANGE: SgCat = SgCat(22);
    pub const RES_CONFLICT: SgCat = SgCat(24);
    pub const CONDITION_MET: SgCat = SgCat(25);
    pub const BUSY: SgCat = SgCat(26);
    pub const TS_FULL: SgCat = SgCat(27);
    pub const ACA_ACTIVE: SgCat = SgCat(28);
    pub const TASK_ABORTED: SgCat = SgCat(29);
    pub const CONTRADICT: SgCat = SgCat(31);
    pub const TIMEOUT: SgCat = SgCat(33);
    pub const PROTECTION: SgCat = SgCat(40);
    pub const MALFORMED: SgCat = SgCat(97);
    pub const SENSE: SgCat = SgCat(98);
    pub const OTHER: SgCat = SgCat(99);

    /// Category of a CHECK CONDITION's sense data (sg_err_category_sense).
    pub fn from_sense(sense: Option<&Sense>) -> SgCat {
        let Some(s) = sense else {
            return SgCat::SENSE;
        };
        match s.key {
            SenseKey::NoSense => SgCat::NO_SENSE,
            SenseKey::RecoveredError => SgCat::RECOVERED,
            SenseKey::NotReady => SgCat::NOT_READY,
            SenseKey::MediumError | SenseKey::HardwareError | SenseKey::BlankCheck => {
                SgCat::MEDIUM_HARD
            }
            SenseKey::UnitAttention => SgCat::UNIT_ATTENTION,
            SenseKey::IllegalRequest => match (s.asc, s.ascq) {
                (0x20, 0x00) => SgCat::INVALID_OP,
                (0x21, 0x00) => SgCat::LBA_OUT_OF_RANGE,
                _ => SgCat::ILLEGAL_REQ,
            },
            SenseKey::AbortedCommand if s.asc == 0x10 => SgCat::PROTECTION,
            SenseKey::AbortedCommand => SgCat::ABORTED_COMMAND,
            SenseKey::Miscompare => SgCat::MISCOMPARE,
            SenseKey::DataProtect => SgCat::DATA_PROTECT,
            SenseKey::CopyAborted => SgCat::COPY_ABORTED,
            SenseKey::VolumeOverflow | SenseKey::VendorSpecific => SgCat::SENSE,
        }
    }

    /// Category of a SCSI status byte other than GOOD / CHECK CONDITION.
    pub fn from_status(status: u8) -> SgCat {
        match status {
            0x00 => SgCat::CLEAN,
            0x04 => SgCat::CONDITION_MET,
            0x08 => SgCat::BUSY,
            0x18 => SgCat::RES_CONFLICT,
            0x28 => SgCat::TS_FULL,
            0x30 => SgCat::ACA_ACTIVE,
            0x40 => SgCat::TASK_ABORTED,
            _ => SgCat::OTHER,
        }
    }

    /// sg_exit2str(): the short (and, with `longer`, long) description.
    pub fn describe(self, longer: bool) -> Option<String> {
        let (name, extra): (&str, Option<&str>) = match self.0 {
            0 => ("No errors", Some("may also convey true")),
            1 => ("Syntax error", Some("command line options (usually)")),
            2 => ("Device not ready", Some("type: sense key")),
            3 => (
                "Medium or hardware error",
                Some("type: sense key (plus blank check for tape)"),
            ),
            5 => (
                "Illegal request",
                Some("type: sense key, apart from Invalid opcode"),
            ),
            6 => ("Unit attention", Some("type: sense key")),
            7 => (
                "Data protect",
                Some("type: sense key; write protected media?"),
            ),
            9 => (
                "Illegal request, Invalid opcode",
                Some("type: sense key + asc,ascq"),
            ),
            10 => ("Copy aborted", Some("type: sense key")),
            11 => (
                "Aborted command",
                Some("type: sense key, other than protection related (asc=0x10)"),
            ),
            14 => ("Miscompare", Some("type: sense key")),
            15 => ("File error", None),
            17 => ("Illegal request with Info field", None),
            18 => ("Medium or hardware error with Info", None),
            20 => ("No sense key", Some("type: probably additional sense code")),
            21 => ("Recovered error (warning)", Some("tye: sense key")),
            22 => ("LBA out of range", None),
            24 => ("Reservation conflict", Some("type: SCSI status")),
            25 => ("Condition met", Some("type: SCSI status")),
            26 => ("Busy", Some("type: SCSI status")),
            27 => ("Task set full", Some("type: SCSI status")),
            28 => ("ACA aactive", Some("type: SCSI status")),
            29 => ("Task aborted", Some("type: SCSI status")),
            31 => (
                "Contradict",
                Some("command line options contradict or select bad mode"),
            ),
            32 => ("Logic error", Some("unexpected situation, contact author")),
            33 => ("SCSI command timeout", None),
            36 => ("No errors (false)", None),
            40 => ("Aborted command, protection error", None),
            41 => ("Aborted command, protection error with Info field", None),
            97 => ("Malformed SCSI command", Some("trouble building command")),
            98 => (
                "Some other sense error",
                Some("try '-v' option for more information"),
            ),
            99 => (
                "Some other error",
                Some("possible transport of driver issue"),
            ),
            _ => return None,
        };
        Some(match (longer, extra) {
            (true, Some(e)) => format!("{name}, {e}"),
            _ => name.to_string(),
        })
    }

    /// sg_get_category_sense_str().
    pub fn category_str(self, verbose: u32) -> String {
        match self.describe(verbose > 0) {
            Some(s) => s,
            None if verbose == 0 => format!(
                "Sense category: {}, try '-v' option for more information",
                self.0
            ),
            None => format!("Sense category: {}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfence_scsi::sense::asc;

    #[test]
    fn sense_categories() {
        let ua = Sense::unit_attention(asc::RESERVATIONS_PREEMPTED);
        assert_eq!(SgCat::from_sense(Some(&ua)), SgCat::UNIT_ATTENTION);
        let inv = Sense::illegal_request(asc::INVALID_COMMAND_OPERATION_CODE);
        assert_eq!(SgCat::from_sense(Some(&inv)), SgCat::INVALID_OP);
        let bad = Sense::invalid_cdb_field(1, None);
        assert_eq!(SgCat::from_sense(Some(&bad)), SgCat::ILLEGAL_REQ);
        assert_eq!(SgCat::from_sense(None), SgCat::SENSE);
        assert_eq!(SgCat::from_status(0x18), SgCat::RES_CONFLICT);
    }

    #[test]
    fn strings() {
        assert_eq!(SgCat::RES_CONFLICT.category_str(0), "Reservation conflict");
        assert_eq!(
            SgCat::RES_CONFLICT.category_str(1),
            "Reservation conflict, type: SCSI status"
        );
        assert_eq!(
            SgCat(4).category_str(0),
            "Sense category: 4, try '-v' option for more information"
        );
    }
}
