//! CDB decoding: every command the block device server implements, as a
//! typed value, with ILLEGAL REQUEST sense (and a field pointer) for every
//! way a CDB can be wrong on its own.
//!
//! Checks that need the logical unit (capacity, block size limits) are the
//! device server's; this module only knows the CDB bytes.

use crate::opcode::{self as op, CommandInfo};
use crate::sense::{asc, Sense};

/// Protection information and cache control flags of a read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoFlags {
    pub dpo: bool,
    pub fua: bool,
}

/// Which commands a decoded CDB is, with its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cdb {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc_len: u8,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc_len: u16,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc_len: u16,
    },
    ModeSelect {
        ten: bool,
        pf: bool,
        sp: bool,
        param_len: u16,
    },
    StartStopUnit {
        immed: bool,
        power_condition: u8,
        no_flush: bool,
        loej: bool,
        start: bool,
    },
    PreventAllow {
        prevent: u8,
    },
    /// SEND DIAGNOSTIC: only the default self-test is implemented.
    SendDiagnostic {
        self_test_code: u8,
        pf: bool,
        self_test: bool,
        param_len: u16,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc_len: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc_len: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
        flags: IoFlags,
    },
    Write {
        lba: u64,
        blocks: u32,
        flags: IoFlags,
    },
    /// VERIFY; `bytchk` 0: medium only, 1: compare data-out, 3: compare
    /// one block of data-out against every block.
    Verify {
        lba: u64,
        blocks: u32,
        bytchk: u8,
    },
    WriteAndVerify {
        lba: u64,
        blocks: u32,
        bytchk: u8,
    },
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
        sixteen: bool,
    },
    Unmap {
        param_len: u16,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u8,
        flags: IoFlags,
    },
    OrWrite {
        lba: u64,
        blocks: u32,
        flags: IoFlags,
    },
    PreFetch {
        lba: u64,
        blocks: u32,
        immed: bool,
    },
    SynchronizeCache {
        lba: u64,
        blocks: u32,
        immed: bool,
    },
    ReadDefectData {
        twelve: bool,
        plist: bool,
        glist: bool,
        format: u8,
        alloc_len: u32,
    },
    ReportLuns {
        select_report: u8,
        alloc_len: u32,
    },
    ReportTargetPortGroups {
        extended: bool,
        alloc_len: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        service_action: u16,
        alloc_len: u32,
    },
    /// PERSISTENT RESERVE IN/OUT, RESERVE and RELEASE: decoded by the
    /// reservation engine.
    Reservation,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn invalid_opcode() -> Sense {
    Sense::illegal_request(asc::INVALID_COMMAND_OPERATION_CODE)
}

/// The implemented command `cdb` names, or INVALID COMMAND OPERATION CODE
/// (for a bad service action: INVALID FIELD IN CDB at byte 1).
pub fn command_info(cdb: &[u8]) -> Result<&'static CommandInfo, Sense> {
    let &opcode = cdb.first().ok_or_else(invalid_opcode)?;
    if op::has_service_action(opcode) {
        let sa = cdb.get(1).map(|b| b & 0x1f);
        return op::lookup(opcode, sa).ok_or(Sense::invalid_cdb_field(1, Some(4)));
    }
    op::lookup(opcode, None).ok_or_else(invalid_opcode)
}

/// Reject any set bit outside the command's usage bitmap, and NACA.
fn check_usage(cdb: &[u8], info: &CommandInfo) -> Result<(), Sense> {
    let n = info.usage.len();
    for (i, (&b, &mask)) in cdb.iter().zip(info.usage).enumerate() {
        let bad = if i + 1 == n {
            b & !(mask & !0x04)
        } else {
            b & !mask
        };
        if bad != 0 {
            let bit = 7 - bad.leading_zeros() as u8;
            return Err(Sense::invalid_cdb_field(i as u16, Some(bit)));
        }
    }
    Ok(())
}

/// Decode a CDB. `cdb` may be longer than the command (iSCSI pads CDBs to
/// 16 bytes); bytes past the command's length are ignored.
pub fn parse(cdb: &[u8]) -> Result<Cdb, Sense> {
    let info = command_info(cdb)?;
    let len = info.usage.len();
    if cdb.len() < len {
        // The transport delivered fewer bytes than the operation code
        // implies: the CDB is malformed at its end.
        return Err(Sense::invalid_cdb_field(cdb.len() as u16, None));
    }
    let c = &cdb[..len];
    check_usage(c, info)?;
    let opcode = c[0];
    let protect = |byte1: u8| -> Result<(), Sense> {
        // No protection information: any RD/WR/VR/ORPROTECT is invalid.
        if byte1 & 0xe0 != 0 {
            Err(Sense::invalid_cdb_field(1, Some(7)))
        } else {
            Ok(())
        }
    };
    let flags = |byte1: u8| IoFlags {
        dpo: byte1 & 0x10 != 0,
        fua: byte1 & 0x08 != 0,
    };
    let bytchk = |byte1: u8| (byte1 >> 1) & 3;
    Ok(match opcode {
        op::TEST_UNIT_READY => Cdb::TestUnitReady,
        op::REQUEST_SENSE => Cdb::RequestSense {
            desc: c[1] & 1 != 0,
            alloc_len: c[4],
        },
        op::INQUIRY => {
            let evpd = c[1] & 1 != 0;
            if !evpd && c[2] != 0 {
                return Err(Sense::invalid_cdb_field(2, Some(7)));
            }
            Cdb::Inquiry {
                evpd,
                page: c[2],
                alloc_len: be16(c, 3),
            }
        }
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
            let ten = opcode == op::MODE_SENSE_10;
            Cdb::ModeSense {
                ten,
                dbd: c[1] & 0x08 != 0,
                llbaa: ten && c[1] & 0x10 != 0,
                pc: c[2] >> 6,
                page: c[2] & 0x3f,
                subpage: c[3],
                alloc_len: if ten { be16(c, 7) } else { u16::from(c[4]) },
            }
        }
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
            let ten = opcode == op::MODE_SELECT_10;
            Cdb::ModeSelect {
                ten,
                pf: c[1] & 0x10 != 0,
                sp: c[1] & 0x01 != 0,
                param_len: if ten { be16(c, 7) } else { u16::from(c[4]) },
            }
        }
        op::START_STOP_UNIT => Cdb::StartStopUnit {
            immed: c[1] & 1 != 0,
            power_condition: c[4] >> 4,
            no_flush: c[4] & 0x04 != 0,
            loej: c[4] & 0x02 != 0,
            start: c[4] & 0x01 != 0,
        },
        op::PREVENT_ALLOW_MEDIUM_REMOVAL => Cdb::PreventAllow { prevent: c[4] & 3 },
        op::SEND_DIAGNOSTIC => {
            let self_test_code = c[1] >> 5;
            let self_test = c[1] & 0x04 != 0;
            // SPC-4 6.42: a SELF-TEST CODE with SELFTEST set is invalid.
            if self_test && self_test_code != 0 {
                return Err(Sense::invalid_cdb_field(1, Some(7)));
            }
            Cdb::SendDiagnostic {
                self_test_code,
                pf: c[1] & 0x10 != 0,
                self_test,
                param_len: be16(c, 3),
            }
        }
        op::READ_CAPACITY_10 => {
            // SBC-3: with PMI zero the LOGICAL BLOCK ADDRESS must be zero.
            if c[8] & 1 == 0 && be32(c, 2) != 0 {
                return Err(Sense::invalid_cdb_field(2, Some(7)));
            }
            Cdb::ReadCapacity10
        }
        op::READ_6 | op::WRITE_6 => {
            let lba = u64::from(be32(c, 0) & 0x001f_ffff);
            // A TRANSFER LENGTH of zero means 256 blocks.
            let blocks = if c[4] == 0 { 256 } else { u32::from(c[4]) };
            if opcode == op::READ_6 {
                Cdb::Read {
                    lba,
                    blocks,
                    flags: IoFlags::default(),
                }
            } else {
                Cdb::Write {
                    lba,
                    blocks,
                    flags: IoFlags::default(),
                }
            }
        }
        op::READ_10 | op::READ_12 | op::READ_16 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
            protect(c[1])?;
            let (lba, blocks) = lba_len(c);
            let flags = flags(c[1]);
            if matches!(opcode, op::READ_10 | op::READ_12 | op::READ_16) {
                Cdb::Read { lba, blocks, flags }
            } else {
                Cdb::Write { lba, blocks, flags }
            }
        }
        op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::WRITE_AND_VERIFY_10
        | op::WRITE_AND_VERIFY_12
        | op::WRITE_AND_VERIFY_16 => {
            protect(c[1])?;
            let (lba, blocks) = lba_len(c);
            let bytchk = bytchk(c[1]);
            let verify = matches!(opcode, op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16);
            // BYTCHK 10b is reserved; WRITE AND VERIFY knows only 00b
            // (verify the medium) and 01b (compare with the data-out).
            if bytchk == 2 || (!verify && bytchk == 3) {
                return Err(Sense::invalid_cdb_field(1, Some(2)));
            }
            if verify {
                Cdb::Verify {
                    lba,
                    blocks,
                    bytchk,
                }
            } else {
                Cdb::WriteAndVerify {
                    lba,
                    blocks,
                    bytchk,
                }
            }
        }
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            protect(c[1])?;
            let sixteen = opcode == op::WRITE_SAME_16;
            let (lba, blocks) = lba_len(c);
            if c[1] & 0x10 != 0 {
                // ANCHOR: anchored LBAs are not supported (ANC_SUP = 0).
                return Err(Sense::invalid_cdb_field(1, Some(4)));
            }
            let unmap = c[1] & 0x08 != 0;
            let ndob = sixteen && c[1] & 0x01 != 0;
            Cdb::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
                sixteen,
            }
        }
        op::UNMAP => {
            if c[1] & 1 != 0 {
                return Err(Sense::invalid_cdb_field(1, Some(0)));
            }
            Cdb::Unmap {
                param_len: be16(c, 7),
            }
        }
        op::COMPARE_AND_WRITE => {
            protect(c[1])?;
            Cdb::CompareAndWrite {
                lba: be64(c, 2),
                blocks: c[13],
                flags: flags(c[1]),
            }
        }
        op::ORWRITE_16 => {
            protect(c[1])?;
            let (lba, blocks) = lba_len(c);
            Cdb::OrWrite {
                lba,
                blocks,
                flags: flags(c[1]),
            }
        }
        op::PRE_FETCH_10 | op::PRE_FETCH_16 => {
            let (lba, blocks) = lba_len(c);
            Cdb::PreFetch {
                lba,
                blocks,
                immed: c[1] & 2 != 0,
            }
        }
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
            let (lba, blocks) = lba_len(c);
            Cdb::SynchronizeCache {
                lba,
                blocks,
                immed: c[1] & 2 != 0,
            }
        }
        op::READ_DEFECT_DATA_10 => Cdb::ReadDefectData {
            twelve: false,
            plist: c[2] & 0x10 != 0,
            glist: c[2] & 0x08 != 0,
            format: c[2] & 7,
            alloc_len: u32::from(be16(c, 7)),
        },
        op::READ_DEFECT_DATA_12 => Cdb::ReadDefectData {
            twelve: true,
            plist: c[1] & 0x10 != 0,
            glist: c[1] & 0x08 != 0,
            format: c[1] & 7,
            alloc_len: be32(c, 6),
        },
        op::SERVICE_ACTION_IN_16 => {
            if c[1] & 0x1f == op::SAI_READ_CAPACITY_16 {
                if c[14] & 1 == 0 && be64(c, 2) != 0 {
                    return Err(Sense::invalid_cdb_field(2, Some(7)));
                }
                Cdb::ReadCapacity16 {
                    alloc_len: be32(c, 10),
                }
            } else {
                Cdb::GetLbaStatus {
                    lba: be64(c, 2),
                    alloc_len: be32(c, 10),
                }
            }
        }
        op::REPORT_LUNS => {
            let alloc_len = be32(c, 6);
            match c[2] {
                0x00 | 0x01 | 0x02 | 0x10 | 0x11 | 0x12 => {}
                _ => return Err(Sense::invalid_cdb_field(2, Some(7))),
            }
            Cdb::ReportLuns {
                select_report: c[2],
                alloc_len,
            }
        }
        op::MAINTENANCE_IN => {
            if c[1] & 0x1f == op::MI_REPORT_TARGET_PORT_GROUPS {
                let format = c[1] >> 5;
                if format > 1 {
                    return Err(Sense::invalid_cdb_field(1, Some(7)));
                }
                Cdb::ReportTargetPortGroups {
                    extended: format == 1,
                    alloc_len: be32(c, 6),
                }
            } else {
                let options = c[2] & 7;
                if options > 3 {
                    return Err(Sense::invalid_cdb_field(2, Some(2)));
                }
                Cdb::ReportSupportedOpcodes {
                    rctd: c[2] & 0x80 != 0,
                    options,
                    opcode: c[3],
                    service_action: be16(c, 4),
                    alloc_len: be32(c, 6),
                }
            }
        }
        op::PERSISTENT_RESERVE_IN
        | op::PERSISTENT_RESERVE_OUT
        | op::RESERVE_6
        | op::RELEASE_6
        | op::RESERVE_10
        | op::RELEASE_10 => Cdb::Reservation,
        _ => return Err(invalid_opcode()),
    })
}

/// LOGICAL BLOCK ADDRESS and length of a 10-, 12- or 16-byte CDB.
fn lba_len(c: &[u8]) -> (u64, u32) {
    match c.len() {
        10 => (u64::from(be32(c, 2)), u32::from(be16(c, 7))),
        12 => (u64::from(be32(c, 2)), be32(c, 6)),
        _ => (be64(c, 2), be32(c, 10)),
    }
}

/// Data-out bytes the CDB implies for a logical unit with `block_size`.
pub fn data_out_len(cdb: &[u8], block_size: u32) -> Result<u64, Sense> {
    let bs = u64::from(block_size);
    Ok(match parse(cdb)? {
        Cdb::Write { blocks, .. } | Cdb::OrWrite { blocks, .. } => u64::from(blocks) * bs,
        Cdb::WriteAndVerify { blocks, .. } => u64::from(blocks) * bs,
        Cdb::Verify { blocks, bytchk, .. } => match bytchk {
            1 => u64::from(blocks) * bs,
            3 if blocks > 0 => bs,
            _ => 0,
        },
        Cdb::WriteSame { ndob, .. } => {
            if ndob {
                0
            } else {
                bs
            }
        }
        Cdb::CompareAndWrite { blocks, .. } => 2 * u64::from(blocks) * bs,
        Cdb::Unmap { param_len } => u64::from(param_len),
        Cdb::ModeSelect { param_len, .. } => u64::from(param_len),
        Cdb::SendDiagnostic { param_len, .. } => u64::from(param_len),
        Cdb::Reservation => match cdb.first() {
            Some(&op::PERSISTENT_RESERVE_OUT) if cdb.len() >= 9 => u64::from(be32(cdb, 5)),
            Some(&op::RESERVE_10) if cdb.len() >= 9 => u64::from(be16(cdb, 7)),
            _ => 0,
        },
        _ => 0,
    })
}

/// WRITE SAME ranges longer than this many bytes count as blocking.
const LARGE_WRITE_SAME: u64 = 1 << 20;

/// True when the command may block for long: cache flushes, FUA writes,
/// unmapping, large WRITE SAME, verification reads, MODE SELECT (may
/// flush when disabling the write cache).
pub fn is_blocking(cdb: &[u8], block_size: u32) -> bool {
    match parse(cdb) {
        Ok(Cdb::SynchronizeCache { .. }) | Ok(Cdb::Unmap { .. }) | Ok(Cdb::ModeSelect { .. }) => {
            true
        }
        Ok(Cdb::StartStopUnit { .. }) | Ok(Cdb::SendDiagnostic { .. }) => true,
        Ok(Cdb::Write { flags, .. })
        | Ok(Cdb::OrWrite { flags, .. })
        | Ok(Cdb::CompareAndWrite { flags, .. }) => flags.fua,
        Ok(Cdb::WriteAndVerify { .. }) => true,
        Ok(Cdb::WriteSame { blocks, unmap, .. }) => {
            unmap || blocks == 0 || u64::from(blocks) * u64::from(block_size) > LARGE_WRITE_SAME
        }
        Ok(Cdb::GetLbaStatus { .. }) => true,
        _ => false,
    }
}

/// True for commands that write the medium.
pub fn is_write(cdb: &[u8]) -> bool {
    matches!(
        cdb.first().copied(),
        Some(
            op::WRITE_6
                | op::WRITE_10
                | op::WRITE_12
                | op::WRITE_16
                | op::WRITE_AND_VERIFY_10
                | op::WRITE_AND_VERIFY_12
                | op::WRITE_AND_VERIFY_16
                | op::WRITE_SAME_10
                | op::WRITE_SAME_16
                | op::COMPARE_AND_WRITE
                | op::ORWRITE_16
                | op::UNMAP
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read10_decodes_and_rejects_rdprotect() {
        let c = [0x28, 0x18, 0, 0, 0x10, 0, 0, 0, 8, 0];
        assert_eq!(
            parse(&c).unwrap(),
            Cdb::Read {
                lba: 0x1000,
                blocks: 8,
                flags: IoFlags {
                    dpo: true,
                    fua: true
                }
            }
        );
        let c = [0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(parse(&c).unwrap_err(), Sense::invalid_cdb_field(1, Some(7)));
    }

    #[test]
    fn reserved_bits_and_naca_are_rejected() {
        // WRITE(10) FUA_NV (obsolete bit 1).
        let c = [0x2a, 0x02, 0, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(parse(&c).unwrap_err(), Sense::invalid_cdb_field(1, Some(1)));
        let c = [0x00, 0, 0, 0, 0, 0x04];
        assert_eq!(parse(&c).unwrap_err(), Sense::invalid_cdb_field(5, Some(2)));
        let c = [0x00, 0, 0, 0, 0, 0x00, 0xff, 0xff];
        assert_eq!(parse(&c).unwrap(), Cdb::TestUnitReady);
    }

    #[test]
    fn unknown_opcode_and_service_action() {
        assert_eq!(
            parse(&[0xc0; 16]).unwrap_err().code(),
            asc::INVALID_COMMAND_OPERATION_CODE
        );
        assert_eq!(
            parse(&[]).unwrap_err().code(),
            asc::INVALID_COMMAND_OPERATION_CODE
        );
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x11;
        assert_eq!(parse(&c).unwrap_err(), Sense::invalid_cdb_field(1, Some(4)));
    }

    #[test]
    fn short_cdb_is_invalid_field() {
        assert_eq!(
            parse(&[0x28, 0, 0]).unwrap_err(),
            Sense::invalid_cdb_field(3, None)
        );
    }

    #[test]
    fn data_out_lengths() {
        let w16 = [0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0];
        assert_eq!(data_out_len(&w16, 512).unwrap(), 2048);
        let caw = [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0];
        assert_eq!(data_out_len(&caw, 4096).unwrap(), 16384);
        let ws = [0x93, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0];
        assert_eq!(data_out_len(&ws, 512).unwrap(), 0);
        let v = [0x2f, 0x06, 0, 0, 0, 0, 0, 0, 9, 0];
        assert_eq!(data_out_len(&v, 512).unwrap(), 512);
        let r = [0x28, 0, 0, 0, 0, 0, 0, 0, 9, 0];
        assert_eq!(data_out_len(&r, 512).unwrap(), 0);
        assert!(is_blocking(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 512));
        assert!(!is_blocking(&r, 512));
    }

    #[test]
    fn read6_zero_means_256() {
        assert_eq!(
            parse(&[0x08, 0x01, 0x02, 0x03, 0, 0]).unwrap(),
            Cdb::Read {
                lba: 0x10203,
                blocks: 256,
                flags: IoFlags::default()
            }
        );
    }
}
