//! CDB builders and response decoders for the commands the initiator issues
//! (SPC-4 / SBC-3). Pure functions: no I/O.

use crate::error::{Error, Result};

/// Data transfer direction and size of one SCSI command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The CDB (6..=16 bytes; longer CDBs would need an AHS).
    pub cdb: Vec<u8>,
    /// Bytes the initiator is prepared to receive (Data-In).
    pub data_in_len: u32,
    /// Bytes sent to the target (Data-Out).
    pub data_out: bytes::Bytes,
    pub attr: TaskAttr,
}

pub use keyfence_iscsi::pdu::TaskAttr;

impl Command {
    /// A command with no data transfer.
    pub fn none(cdb: Vec<u8>) -> Command {
        Command {
            cdb,
            data_in_len: 0,
            data_out: bytes::Bytes::new(),
            attr: TaskAttr::Simple,
        }
    }
    /// A command reading up to `len` bytes.
    pub fn read(cdb: Vec<u8>, len: u32) -> Command {
        Command {
            data_in_len: len,
            ..Command::none(cdb)
        }
    }
    /// A command writing `data`.
    pub fn write(cdb: Vec<u8>, data: bytes::Bytes) -> Command {
        Command {
            data_out: data,
            ..Command::none(cdb)
        }
    }
}

pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const INQUIRY: u8 = 0x12;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_CAPACITY_16_SA: u8 = 0x10;
}

pub fn test_unit_ready() -> Command {
    Command::none(vec![opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0])
}

/// INQUIRY; `page` = Some(code) sets EVPD.
pub fn inquiry(page: Option<u8>, alloc: u16) -> Command {
    let mut cdb = vec![opcode::INQUIRY, 0, 0, 0, 0, 0];
    if let Some(p) = page {
        cdb[1] = 0x01;
        cdb[2] = p;
    }
    cdb[3..5].copy_from_slice(&alloc.to_be_bytes());
    Command::read(cdb, u32::from(alloc))
}

pub fn read_capacity16() -> Command {
    let mut cdb = vec![0u8; 16];
    cdb[0] = opcode::SERVICE_ACTION_IN_16;
    cdb[1] = opcode::READ_CAPACITY_16_SA;
    cdb[10..14].copy_from_slice(&32u32.to_be_bytes());
    Command::read(cdb, 32)
}

pub fn report_luns(alloc: u32) -> Command {
    let mut cdb = vec![0u8; 12];
    cdb[0] = opcode::REPORT_LUNS;
    cdb[6..10].copy_from_slice(&alloc.to_be_bytes());
    Command::read(cdb, alloc)
}

/// READ(16) of `blocks` blocks of `block_size` bytes at `lba`.
pub fn read16(lba: u64, blocks: u32, block_size: u32) -> Result<Command> {
    let len = blocks.checked_mul(block_size).ok_or_else(|| {
        Error::InvalidArgument(format!("{blocks} blocks of {block_size} bytes overflow"))
    })?;
    let mut cdb = vec![0u8; 16];
    cdb[0] = opcode::READ_16;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Ok(Command::read(cdb, len))
}

/// WRITE(16) of `data` (a whole number of blocks) at `lba`; `fua` forces
/// the data to the medium before GOOD status.
pub fn write16(lba: u64, data: bytes::Bytes, block_size: u32, fua: bool) -> Result<Command> {
    if block_size == 0 || !data.len().is_multiple_of(block_size as usize) {
        return Err(Error::InvalidArgument(format!(
            "write of {} bytes is not a multiple of the {block_size}-byte block size",
            data.len()
        )));
    }
    let blocks = u32::try_from(data.len() / block_size as usize)
        .map_err(|_| Error::InvalidArgument("write too large".into()))?;
    let mut cdb = vec![0u8; 16];
    cdb[0] = opcode::WRITE_16;
    if fua {
        cdb[1] = 0x08;
    }
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Ok(Command::write(cdb, data))
}

/// SYNCHRONIZE CACHE(10) of the whole medium.
pub fn synchronize_cache() -> Command {
    Command::none(vec![
        opcode::SYNCHRONIZE_CACHE_10,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ])
}

/// Standard INQUIRY data (SPC-4 6.6.2), the fields people look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandardInquiry {
    pub peripheral_qualifier: u8,
    pub device_type: u8,
    pub removable: bool,
    pub version: u8,
    pub response_data_format: u8,
    pub hisup: bool,
    pub normaca: bool,
    /// TPGS field (ALUA support).
    pub tpgs: u8,
    pub protect: bool,
    pub cmdque: bool,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

fn ascii_field(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

fn bad(what: &'static str, detail: impl Into<String>) -> Error {
    Error::BadData {
        what,
        detail: detail.into(),
    }
}

pub fn decode_standard_inquiry(d: &[u8]) -> Result<StandardInquiry> {
    if d.len() < 36 {
        return Err(bad(
            "standard INQUIRY data",
            format!("{} bytes, need 36", d.len()),
        ));
    }
    Ok(StandardInquiry {
        peripheral_qualifier: d[0] >> 5,
        device_type: d[0] & 0x1f,
        removable: d[1] & 0x80 != 0,
        version: d[2],
        response_data_format: d[3] & 0x0f,
        hisup: d[3] & 0x10 != 0,
        normaca: d[3] & 0x20 != 0,
        tpgs: (d[5] >> 4) & 0x03,
        protect: d[5] & 0x01 != 0,
        cmdque: d[7] & 0x02 != 0,
        vendor: ascii_field(&d[8..16]),
        product: ascii_field(&d[16..32]),
        revision: ascii_field(&d[32..36]),
    })
}

pub use keyfence_scsi::vpd::Designator;

/// Decode VPD page 83h (Device Identification); see
/// [`keyfence_scsi::vpd::decode_device_identification`].
pub fn decode_device_identification(d: &[u8]) -> Result<Vec<Designator>> {
    keyfence_scsi::vpd::decode_device_identification(d)
        .map_err(|e| bad("VPD page 83h", e.to_string()))
}

/// READ CAPACITY(16) parameter data (SBC-3 5.16.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub last_lba: u64,
    pub block_size: u32,
    pub protection_enabled: bool,
    pub logical_per_physical_exp: u8,
    pub thin_provisioned: bool,
}

impl Capacity {
    pub fn blocks(&self) -> u64 {
        self.last_lba.saturating_add(1)
    }
    pub fn bytes(&self) -> u64 {
        self.blocks().saturating_mul(u64::from(self.block_size))
    }
}

pub fn decode_read_capacity16(d: &[u8]) -> Result<Capacity> {
    if d.len() < 12 {
        return Err(bad(
            "READ CAPACITY(16) data",
            format!("{} bytes, need 12", d.len()),
        ));
    }
    let mut lba = [0u8; 8];
    lba.copy_from_slice(&d[0..8]);
    let block_size = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
    if block_size == 0 {
        return Err(bad("READ CAPACITY(16) data", "block size 0"));
    }
    Ok(Capacity {
        last_lba: u64::from_be_bytes(lba),
        block_size,
        protection_enabled: d.get(12).is_some_and(|b| b & 1 != 0),
        logical_per_physical_exp: d.get(13).map_or(0, |b| b & 0x0f),
        thin_provisioned: d.get(14).is_some_and(|b| b & 0x80 != 0),
    })
}

/// REPORT LUNS data: the raw 8-byte LUN fields.
pub fn decode_report_luns(d: &[u8]) -> Result<Vec<[u8; 8]>> {
    if d.len() < 8 {
        return Err(bad("REPORT LUNS data", "shorter than its 8-byte header"));
    }
    let list_len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    let body = &d[8..];
    let n = list_len.min(body.len()) / 8;
    Ok((0..n)
        .map(|i| {
            let mut l = [0u8; 8];
            l.copy_from_slice(&body[i * 8..i * 8 + 8]);
            l
        })
        .collect())
}

/// The LIST LENGTH a REPORT LUNS response announced (to retry with a
/// bigger allocation length when truncated).
pub fn report_luns_needed(d: &[u8]) -> Option<u32> {
    let h = d.get(0..4)?;
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]).checked_add(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdbs() {
        let c = inquiry(Some(0x83), 512);
        assert_eq!(c.cdb, vec![0x12, 1, 0x83, 2, 0, 0]);
        assert_eq!(c.data_in_len, 512);
        let c = read16(0x0102_0304_0506_0708, 8, 512).unwrap();
        assert_eq!(&c.cdb[2..14], &[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 8]);
        assert_eq!(c.data_in_len, 4096);
        assert!(write16(0, bytes::Bytes::from(vec![0; 100]), 512, false).is_err());
        let c = write16(9, bytes::Bytes::from(vec![0; 1024]), 512, true).unwrap();
        assert_eq!(c.cdb[1], 0x08);
        assert_eq!(&c.cdb[10..14], &[0, 0, 0, 2]);
    }

    #[test]
    fn vpd83() {
        let page = [
            0x00, 0x83, 0x00, 0x14, // header, 20 bytes
            0x01, 0x03, 0x00, 0x08, 0x60, 1, 2, 3, 4, 5, 6, 7, // NAA LU
            0x51, 0x94, 0x00, 0x04, 0, 0, 0, 2, // iSCSI, target port, relative port 2
        ];
        let d = decode_device_identification(&page).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].type_name(), "NAA");
        assert_eq!(d[0].value_string(), "6001020304050607");
        assert_eq!(d[1].relative_target_port(), Some(2));
        assert_eq!(d[1].protocol_identifier, Some(5));
        assert_eq!(d[1].association_name(), "target port");
        let mut broken = page;
        broken[7] = 0x30;
        assert!(decode_device_identification(&broken).is_err());
    }

    #[test]
    fn capacity_and_luns() {
        let mut d = [0u8; 32];
        d[7] = 0xff;
        d[10] = 0x02;
        let c = decode_read_capacity16(&d).unwrap();
        assert_eq!((c.blocks(), c.block_size, c.bytes()), (256, 512, 131072));
        assert!(decode_read_capacity16(&d[..8]).is_err());
        let r = [
            0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(decode_report_luns(&r).unwrap().len(), 2);
        assert_eq!(report_luns_needed(&r), Some(24));
    }
}
