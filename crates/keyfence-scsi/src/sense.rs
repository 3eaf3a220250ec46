//! Sense data (SPC-4 4.5): sense keys, additional sense codes, and the
//! fixed-format encoding a device server returns with CHECK CONDITION.

use std::fmt;

crate::wire_enum! {
    /// Sense key (SPC-4 table 48).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum SenseKey: u8 {
        NoSense = 0x0 => "NO SENSE",
        RecoveredError = 0x1 => "RECOVERED ERROR",
        NotReady = 0x2 => "NOT READY",
        MediumError = 0x3 => "MEDIUM ERROR",
        HardwareError = 0x4 => "HARDWARE ERROR",
        IllegalRequest = 0x5 => "ILLEGAL REQUEST",
        UnitAttention = 0x6 => "UNIT ATTENTION",
        DataProtect = 0x7 => "DATA PROTECT",
        BlankCheck = 0x8 => "BLANK CHECK",
        VendorSpecific = 0x9 => "VENDOR SPECIFIC",
        CopyAborted = 0xa => "COPY ABORTED",
        AbortedCommand = 0xb => "ABORTED COMMAND",
        VolumeOverflow = 0xd => "VOLUME OVERFLOW",
        Miscompare = 0xe => "MISCOMPARE",
    }
}

impl SenseKey {
    /// The key in the low four bits of `v`. The two values without a
    /// variant, 0xc (obsolete) and 0xf (reserved), read as MISCOMPARE.
    fn from_sense_byte(v: u8) -> Self {
        Self::from_u8(v & 0x0f).unwrap_or(Self::Miscompare)
    }
}

/// An additional sense code and qualifier pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asc(pub u8, pub u8);

/// The ASC/ASCQ pairs keyfence produces or interprets (SPC-4 table D.1).
pub mod asc {
    use super::Asc;
    pub const NO_ADDITIONAL_SENSE: Asc = Asc(0x00, 0x00);
    pub const LU_NOT_READY_MANUAL_INTERVENTION: Asc = Asc(0x04, 0x03);
    /// LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION.
    pub const ASYMMETRIC_ACCESS_STATE_TRANSITION: Asc = Asc(0x04, 0x0a);
    pub const WRITE_ERROR: Asc = Asc(0x0c, 0x00);
    pub const UNRECOVERED_READ_ERROR: Asc = Asc(0x11, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: Asc = Asc(0x1d, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = Asc(0x1a, 0x00);
    pub const INVALID_COMMAND_OPERATION_CODE: Asc = Asc(0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Asc = Asc(0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Asc = Asc(0x24, 0x00);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Asc = Asc(0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = Asc(0x26, 0x00);
    pub const PARAMETER_NOT_SUPPORTED: Asc = Asc(0x26, 0x01);
    pub const PARAMETER_VALUE_INVALID: Asc = Asc(0x26, 0x02);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Asc = Asc(0x26, 0x04);
    pub const WRITE_PROTECTED: Asc = Asc(0x27, 0x00);
    pub const POWER_ON_RESET_OR_BUS_DEVICE_RESET: Asc = Asc(0x29, 0x00);
    pub const POWER_ON_OCCURRED: Asc = Asc(0x29, 0x01);
    pub const SCSI_BUS_RESET_OCCURRED: Asc = Asc(0x29, 0x02);
    pub const BUS_DEVICE_RESET_FUNCTION_OCCURRED: Asc = Asc(0x29, 0x03);
    pub const DEVICE_INTERNAL_RESET: Asc = Asc(0x29, 0x04);
    pub const I_T_NEXUS_LOSS_OCCURRED: Asc = Asc(0x29, 0x07);
    pub const PARAMETERS_CHANGED: Asc = Asc(0x2a, 0x00);
    pub const MODE_PARAMETERS_CHANGED: Asc = Asc(0x2a, 0x01);
    pub const RESERVATIONS_PREEMPTED: Asc = Asc(0x2a, 0x03);
    pub const RESERVATIONS_RELEASED: Asc = Asc(0x2a, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Asc = Asc(0x2a, 0x05);
    pub const ASYMMETRIC_ACCESS_STATE_CHANGED: Asc = Asc(0x2a, 0x06);
    pub const CAPACITY_DATA_HAS_CHANGED: Asc = Asc(0x2a, 0x09);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Asc = Asc(0x2f, 0x00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = Asc(0x39, 0x00);
    pub const MEDIUM_NOT_PRESENT: Asc = Asc(0x3a, 0x00);
    pub const REPORTED_LUNS_DATA_HAS_CHANGED: Asc = Asc(0x3f, 0x0e);
    pub const INQUIRY_DATA_HAS_CHANGED: Asc = Asc(0x3f, 0x03);
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc(0x44, 0x00);
    pub const INVALID_MESSAGE_ERROR: Asc = Asc(0x49, 0x00);
    pub const COMMAND_PHASE_ERROR: Asc = Asc(0x4a, 0x00);
    pub const DATA_PHASE_ERROR: Asc = Asc(0x4b, 0x00);
    pub const OVERLAPPED_COMMANDS_ATTEMPTED: Asc = Asc(0x4e, 0x00);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Asc = Asc(0x55, 0x04);
    pub const MEDIUM_REMOVAL_PREVENTED: Asc = Asc(0x53, 0x02);
    pub const LOGICAL_UNIT_FAILED_SELF_TEST: Asc = Asc(0x3e, 0x03);
}

/// Sense-key specific information (SPC-4 4.5.2.4.2): field pointer into the
/// CDB or parameter list that was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldPointer {
    /// true: the error is in the CDB; false: in the parameter data.
    pub in_cdb: bool,
    /// Byte offset of the wrong field.
    pub byte: u16,
    /// Bit within the byte, if known.
    pub bit: Option<u8>,
}

/// Sense data describing why a command ended in CHECK CONDITION.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (e.g. the first miscompare offset); sets VALID.
    pub information: Option<u32>,
    pub field: Option<FieldPointer>,
}

impl Sense {
    pub const fn new(key: SenseKey, code: Asc) -> Self {
        Sense {
            key,
            asc: code.0,
            ascq: code.1,
            information: None,
            field: None,
        }
    }

    pub const fn illegal_request(code: Asc) -> Self {
        Self::new(SenseKey::IllegalRequest, code)
    }

    pub const fn unit_attention(code: Asc) -> Self {
        Self::new(SenseKey::UnitAttention, code)
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at `byte` (and `bit`).
    pub const fn invalid_cdb_field(byte: u16, bit: Option<u8>) -> Self {
        let mut s = Self::illegal_request(asc::INVALID_FIELD_IN_CDB);
        s.field = Some(FieldPointer {
            in_cdb: true,
            byte,
            bit,
        });
        s
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST pointing at `byte`.
    pub const fn invalid_param_field(byte: u16, bit: Option<u8>) -> Self {
        let mut s = Self::illegal_request(asc::INVALID_FIELD_IN_PARAMETER_LIST);
        s.field = Some(FieldPointer {
            in_cdb: false,
            byte,
            bit,
        });
        s
    }

    pub const fn with_information(mut self, info: u32) -> Self {
        self.information = Some(info);
        self
    }

    pub fn code(&self) -> Asc {
        Asc(self.asc, self.ascq)
    }

    /// Encode as fixed-format sense data (response code 70h), 18 bytes.
    pub fn to_fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        if let Some(info) = self.information {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key as u8;
        b[7] = 10; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(fp) = self.field {
            b[15] = 0x80 | if fp.in_cdb { 0x40 } else { 0 };
            if let Some(bit) = fp.bit {
                b[15] |= 0x08 | (bit & 0x07);
            }
            b[16..18].copy_from_slice(&fp.byte.to_be_bytes());
        }
        b
    }

    /// Decode fixed (70h/71h) or descriptor (72h/73h) format sense data.
    pub fn parse(buf: &[u8]) -> Option<Sense> {
        let rc = *buf.first()? & 0x7f;
        match rc {
            0x70 | 0x71 => {
                if buf.len() < 14 {
                    // Some devices return short sense; take what is there.
                    if buf.len() < 3 {
                        return None;
                    }
                }
                let key = SenseKey::from_sense_byte(buf[2]);
                let asc = buf.get(12).copied().unwrap_or(0);
                let ascq = buf.get(13).copied().unwrap_or(0);
                let information = if buf[0] & 0x80 != 0 && buf.len() >= 7 {
                    Some(u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]))
                } else {
                    None
                };
                let field = match (buf.get(15), buf.get(16), buf.get(17)) {
                    (Some(&b15), Some(&hi), Some(&lo))
                        if b15 & 0x80 != 0 && matches!(key, SenseKey::IllegalRequest) =>
                    {
                        Some(FieldPointer {
                            in_cdb: b15 & 0x40 != 0,
                            byte: u16::from_be_bytes([hi, lo]),
                            bit: (b15 & 0x08 != 0).then_some(b15 & 0x07),
                        })
                    }
                    _ => None,
                };
                Some(Sense {
                    key,
                    asc,
                    ascq,
                    information,
                    field,
                })
            }
            0x72 | 0x73 => {
                if buf.len() < 4 {
                    return None;
                }
                Some(Sense {
                    key: SenseKey::from_sense_byte(buf[1]),
                    asc: buf[2],
                    ascq: buf[3],
                    information: None,
                    field: None,
                })
            }
            _ => None,
        }
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} asc=0x{:02x} ascq=0x{:02x}",
            self.key, self.asc, self.ascq
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_roundtrip_with_field_pointer() {
        let s = Sense::invalid_cdb_field(2, Some(5));
        let b = s.to_fixed();
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 0x05);
        assert_eq!((b[12], b[13]), (0x24, 0x00));
        assert_eq!(b[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!(Sense::parse(&b), Some(s));
    }

    #[test]
    fn information_sets_valid() {
        let s = Sense::new(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY).with_information(7);
        let b = s.to_fixed();
        assert_eq!(b[0], 0xf0);
        assert_eq!(Sense::parse(&b).unwrap().information, Some(7));
    }
}
