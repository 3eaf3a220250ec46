//! The raw PDU and the fields of the 48-byte Basic Header Segment that
//! every PDU shares (RFC 7143 §11.2).

use bytes::{Bytes, BytesMut};

use super::{Opcode, PduError, BHS_LEN, MAX_DATA_SEGMENT_LEN};

// ---------------------------------------------------------------------------
// Field helpers on the fixed 48-byte header (constant offsets: no panics).

#[inline]
pub(super) fn get32(b: &[u8; BHS_LEN], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
#[inline]
pub(super) fn put32(b: &mut [u8; BHS_LEN], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
#[inline]
pub(super) fn get16(b: &[u8; BHS_LEN], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
#[inline]
pub(super) fn put16(b: &mut [u8; BHS_LEN], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
#[inline]
pub(super) fn get_lun(b: &[u8; BHS_LEN]) -> Lun {
    let mut l = [0u8; 8];
    l.copy_from_slice(&b[8..16]);
    Lun(l)
}
#[inline]
pub(super) fn put_lun(b: &mut [u8; BHS_LEN], lun: Lun) {
    b[8..16].copy_from_slice(&lun.0);
}
#[inline]
pub(super) fn get_isid(b: &[u8; BHS_LEN]) -> u64 {
    let mut v = [0u8; 8];
    v[2..8].copy_from_slice(&b[8..14]);
    u64::from_be_bytes(v)
}
#[inline]
pub(super) fn put_isid(b: &mut [u8; BHS_LEN], isid: u64) {
    b[8..14].copy_from_slice(&isid.to_be_bytes()[2..8]);
}

pub(super) fn header(op: Opcode, immediate: bool, flags: u8) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = op as u8 | if immediate { 0x40 } else { 0 };
    b[1] = flags;
    b
}

pub(super) fn expect(pdu: &Pdu, op: Opcode) -> Result<(), PduError> {
    let found = pdu.opcode_raw();
    if found != op as u8 {
        return Err(PduError::WrongOpcode {
            expected: op,
            found,
        });
    }
    Ok(())
}

/// A logical unit number in its 8-byte SAM encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Lun(pub [u8; 8]);

impl Lun {
    /// Encodes LUN `n`: peripheral device addressing for n < 256, flat
    /// space addressing (0x40 | high bits) up to 16383; `None` above.
    pub fn from_number(n: u16) -> Option<Lun> {
        let mut l = [0u8; 8];
        if n < 256 {
            l[1] = n as u8;
        } else if n < 0x4000 {
            l[0] = 0x40 | (n >> 8) as u8;
            l[1] = (n & 0xff) as u8;
        } else {
            return None;
        }
        Some(Lun(l))
    }

    /// Decodes a single-level peripheral (bus 0) or flat space LUN;
    /// `None` for other address methods or a non-zero second level.
    pub fn number(&self) -> Option<u16> {
        if self.0[2..].iter().any(|&b| b != 0) {
            return None;
        }
        match self.0[0] >> 6 {
            0b00 if self.0[0] == 0 => Some(u16::from(self.0[1])),
            0b01 => Some((u16::from(self.0[0] & 0x3f) << 8) | u16::from(self.0[1])),
            _ => None,
        }
    }

    /// The 8 bytes as a big-endian integer.
    pub fn to_u64(self) -> u64 {
        u64::from_be_bytes(self.0)
    }

    /// From a big-endian integer.
    pub fn from_u64(v: u64) -> Lun {
        Lun(v.to_be_bytes())
    }
}

/// A framed PDU: the 48-byte BHS, the AHS bytes (a multiple of 4, without
/// the header digest) and the data segment (without padding and digest).
///
/// The TotalAHSLength and DataSegmentLength fields of `bhs` are kept in step
/// by [`Pdu::new`]; the codec also writes them from the real lengths.
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Bytes,
    pub data: Bytes,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("opcode", &format_args!("0x{:02x}", self.opcode_raw()))
            .field("itt", &format_args!("0x{:08x}", self.itt()))
            .field("ahs_len", &self.ahs.len())
            .field("data_len", &self.data.len())
            .finish()
    }
}

impl Pdu {
    /// Builds a PDU, setting TotalAHSLength and DataSegmentLength from the
    /// given segments. AHS bytes not a multiple of 4 are zero-padded.
    pub fn new(mut bhs: [u8; BHS_LEN], ahs: Bytes, data: Bytes) -> Pdu {
        let ahs = if ahs.len() % 4 != 0 {
            let mut v = BytesMut::with_capacity(ahs.len() + 3);
            v.extend_from_slice(&ahs);
            v.resize(ahs.len().div_ceil(4) * 4, 0);
            v.freeze()
        } else {
            ahs
        };
        bhs[4] = u8::try_from(ahs.len() / 4).unwrap_or(u8::MAX);
        let dsl = data.len().min(MAX_DATA_SEGMENT_LEN) as u32;
        bhs[5..8].copy_from_slice(&dsl.to_be_bytes()[1..4]);
        Pdu { bhs, ahs, data }
    }

    /// A PDU with only a BHS.
    pub fn from_bhs(bhs: [u8; BHS_LEN]) -> Pdu {
        Pdu::new(bhs, Bytes::new(), Bytes::new())
    }

    /// The raw 6-bit opcode.
    #[inline]
    pub fn opcode_raw(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    /// The decoded opcode.
    #[inline]
    pub fn opcode(&self) -> Result<Opcode, PduError> {
        Opcode::from_u8(self.opcode_raw())
    }
    /// The I (immediate delivery) bit.
    #[inline]
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }
    /// The F (final) bit.
    #[inline]
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }
    /// Byte 1 (opcode-specific flags).
    #[inline]
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    /// TotalAHSLength in 4-byte words, as found in the header.
    #[inline]
    pub fn total_ahs_length(&self) -> u8 {
        self.bhs[4]
    }
    /// DataSegmentLength as found in the header.
    #[inline]
    pub fn data_segment_length(&self) -> u32 {
        u32::from_be_bytes([0, self.bhs[5], self.bhs[6], self.bhs[7]])
    }
    /// Bytes 8..16 as a LUN (meaningful only for PDUs that carry one).
    #[inline]
    pub fn lun(&self) -> Lun {
        get_lun(&self.bhs)
    }
    /// Initiator Task Tag.
    #[inline]
    pub fn itt(&self) -> u32 {
        get32(&self.bhs, 16)
    }
    /// Bytes 20..24: TTT for PDUs that carry one.
    #[inline]
    pub fn ttt(&self) -> u32 {
        get32(&self.bhs, 20)
    }
    /// Bytes 24..28: CmdSN in requests, StatSN in responses.
    #[inline]
    pub fn cmd_sn(&self) -> u32 {
        get32(&self.bhs, 24)
    }
    /// Bytes 24..28 in a target PDU.
    #[inline]
    pub fn stat_sn(&self) -> u32 {
        get32(&self.bhs, 24)
    }
    /// Bytes 28..32: ExpStatSN in requests, ExpCmdSN in responses.
    #[inline]
    pub fn exp_stat_sn(&self) -> u32 {
        get32(&self.bhs, 28)
    }
    /// Bytes 28..32 in a target PDU.
    #[inline]
    pub fn exp_cmd_sn(&self) -> u32 {
        get32(&self.bhs, 28)
    }
    /// Bytes 32..36 in a target PDU.
    #[inline]
    pub fn max_cmd_sn(&self) -> u32 {
        get32(&self.bhs, 32)
    }
    /// Sets the I bit.
    pub fn set_immediate(&mut self, on: bool) {
        if on {
            self.bhs[0] |= 0x40;
        } else {
            self.bhs[0] &= !0x40;
        }
    }
    /// Overwrites StatSN / ExpCmdSN / MaxCmdSN (bytes 24..36) of a target PDU.
    pub fn set_target_sns(&mut self, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
        put32(&mut self.bhs, 24, stat_sn);
        put32(&mut self.bhs, 28, exp_cmd_sn);
        put32(&mut self.bhs, 32, max_cmd_sn);
    }
    /// Overwrites CmdSN / ExpStatSN (bytes 24..32) of an initiator PDU.
    pub fn set_initiator_sns(&mut self, cmd_sn: u32, exp_stat_sn: u32) {
        put32(&mut self.bhs, 24, cmd_sn);
        put32(&mut self.bhs, 28, exp_stat_sn);
    }
}
