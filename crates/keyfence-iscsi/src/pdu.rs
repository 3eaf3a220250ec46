//! iSCSI PDUs (RFC 7143 §11): the raw [`Pdu`] (BHS + AHS + data segment) and
//! one typed struct per PDU, each with `parse(&Pdu)` and `to_pdu()`.
//!
//! Parsing checks the opcode and every field whose value the RFC constrains;
//! a failure is a [`PduError`] that knows which Reject reason it maps to.

use bytes::{BufMut, Bytes, BytesMut};
use keyfence_scsi::wire_enum;
use thiserror::Error;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Largest value the 24-bit DataSegmentLength field can hold.
pub const MAX_DATA_SEGMENT_LEN: usize = 0x00ff_ffff;
/// The reserved ITT / TTT value 0xffffffff.
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Largest CDB carried (16 in the BHS plus an extended-CDB AHS).
pub const MAX_CDB_LEN: usize = 260;

/// Errors found while interpreting a (correctly framed) PDU.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PduError {
    /// The opcode field holds a value RFC 7143 does not define.
    #[error("unknown opcode 0x{0:02x}")]
    UnknownOpcode(u8),
    /// `parse` was called on a PDU of another type.
    #[error("expected opcode {expected:?}, found 0x{found:02x}")]
    WrongOpcode { expected: Opcode, found: u8 },
    /// A field holds a value the RFC forbids.
    #[error("invalid {field}: {detail}")]
    InvalidField {
        field: &'static str,
        detail: &'static str,
    },
    /// The data segment does not have the layout the PDU requires.
    #[error("malformed data segment: {0}")]
    BadDataSegment(&'static str),
    /// An Additional Header Segment is malformed.
    #[error("malformed AHS: {0}")]
    BadAhs(&'static str),
    /// A Task Management Function Request with an undefined function
    /// code: a target answers with a Task Management Function Response
    /// "function not supported" (5), RFC 7143 §11.6.1, not with a Reject.
    #[error("undefined task management function {0}")]
    UnknownTmfFunction(u8),
}

impl PduError {
    /// The Reject reason a target sends for this error (RFC 7143 §11.17.1).
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            PduError::UnknownOpcode(_) => RejectReason::CommandNotSupported,
            PduError::WrongOpcode { .. } => RejectReason::ProtocolError,
            PduError::InvalidField { .. }
            | PduError::BadDataSegment(_)
            | PduError::BadAhs(_)
            | PduError::UnknownTmfFunction(_) => RejectReason::InvalidPduField,
        }
    }
}

fn invalid(field: &'static str, detail: &'static str) -> PduError {
    PduError::InvalidField { field, detail }
}

wire_enum! {
    /// iSCSI opcodes (RFC 7143 §11.2.1.2).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Opcode: u8 else PduError::UnknownOpcode {
        NopOut = 0x00 => "NOP-Out",
        ScsiCommand = 0x01 => "SCSI Command",
        TaskMgmtRequest = 0x02 => "SCSI Task Management Function Request",
        LoginRequest = 0x03 => "Login Request",
        TextRequest = 0x04 => "Text Request",
        DataOut = 0x05 => "SCSI Data-Out",
        LogoutRequest = 0x06 => "Logout Request",
        SnackRequest = 0x10 => "SNACK Request",
        NopIn = 0x20 => "NOP-In",
        ScsiResponse = 0x21 => "SCSI Response",
        TaskMgmtResponse = 0x22 => "SCSI Task Management Function Response",
        LoginResponse = 0x23 => "Login Response",
        TextResponse = 0x24 => "Text Response",
        DataIn = 0x25 => "SCSI Data-In",
        LogoutResponse = 0x26 => "Logout Response",
        R2t = 0x31 => "Ready To Transfer (R2T)",
        AsyncMessage = 0x32 => "Asynchronous Message",
        Reject = 0x3f => "Reject",
    }
}

impl Opcode {
    /// True for opcodes sent by an initiator (0x00..=0x1f).
    pub fn is_initiator(self) -> bool {
        (self as u8) < 0x20
    }

    /// True for opcodes sent by a target (0x20..=0x3f).
    pub fn is_target(self) -> bool {
        !self.is_initiator()
    }
}

wire_enum! {
    /// The Reject reason codes (RFC 7143 §11.17.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum RejectReason: u8 {
        /// The initiator may retransmit.
        DataDigestError = 0x02 => "data (payload) digest error",
        SnackReject = 0x03 => "SNACK reject",
        /// E.g. a PDU type the receiver must never get.
        ProtocolError = 0x04 => "protocol error",
        CommandNotSupported = 0x05 => "command not supported",
        /// Too many immediate commands.
        ImmediateCommandReject = 0x06 => "immediate command reject",
        TaskInProgress = 0x07 => "task in progress",
        InvalidDataAck = 0x08 => "invalid data ack",
        InvalidPduField = 0x09 => "invalid PDU field",
        /// Long operation reject: can't generate a target transfer tag.
        OutOfResources = 0x0a => "long operation reject",
        /// Formerly "negotiation reset".
        NegotiationReset = 0x0b => "deprecated",
        WaitingForLogout = 0x0c => "waiting for logout",
    }
    /// Any other value.
    other Other => "reserved";
}

// ---------------------------------------------------------------------------
// Field helpers on the fixed 48-byte header (constant offsets: no panics).

#[inline]
fn get32(b: &[u8; BHS_LEN], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
#[inline]
fn put32(b: &mut [u8; BHS_LEN], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
#[inline]
fn get16(b: &[u8; BHS_LEN], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
#[inline]
fn put16(b: &mut [u8; BHS_LEN], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
#[inline]
fn get_lun(b: &[u8; BHS_LEN]) -> Lun {
    let mut l = [0u8; 8];
    l.copy_from_slice(&b[8..16]);
    Lun(l)
}
#[inline]
fn put_lun(b: &mut [u8; BHS_LEN], lun: Lun) {
    b[8..16].copy_from_slice(&lun.0);
}
#[inline]
fn get_isid(b: &[u8; BHS_LEN]) -> u64 {
    let mut v = [0u8; 8];
    v[2..8].copy_from_slice(&b[8..14]);
    u64::from_be_bytes(v)
}
#[inline]
fn put_isid(b: &mut [u8; BHS_LEN], isid: u64) {
    b[8..14].copy_from_slice(&isid.to_be_bytes()[2..8]);
}

fn header(op: Opcode, immediate: bool, flags: u8) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = op as u8 | if immediate { 0x40 } else { 0 };
    b[1] = flags;
    b
}

fn expect(pdu: &Pdu, op: Opcode) -> Result<(), PduError> {
    let found = pdu.opcode_raw();
    if found != op as u8 {
        return Err(PduError::WrongOpcode {
            expected: op,
            found,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Initiator → target

/// NOP-Out (RFC 7143 §11.18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: Lun,
    /// 0xffffffff when answering a NOP-In (no response wanted).
    pub itt: u32,
    /// The NOP-In's TTT when answering one, else 0xffffffff.
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// Ping data.
    pub data: Bytes,
}

impl NopOut {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::NopOut)?;
        let b = &pdu.bhs;
        if !pdu.final_bit() {
            return Err(invalid("NOP-Out F bit", "must be 1"));
        }
        Ok(NopOut {
            immediate: pdu.immediate(),
            lun: get_lun(b),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
            data: pdu.data.clone(),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(Opcode::NopOut, self.immediate, 0x80);
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        Pdu::new(b, Bytes::new(), self.data.clone())
    }
}

wire_enum! {
    /// SCSI task attribute (RFC 7143 §11.3.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub enum TaskAttr: u8 {
        Untagged = 0 => "untagged",
        #[default]
        Simple = 1 => "simple",
        Ordered = 2 => "ordered",
        HeadOfQueue = 3 => "head of queue",
        Aca = 4 => "ACA",
    }
}

/// A CDB of up to [`MAX_CDB_LEN`] bytes; up to 16 bytes are stored inline.
#[derive(Clone, PartialEq, Eq)]
pub struct Cdb {
    inline: [u8; 16],
    len: u8,
    long: Option<Bytes>,
}

impl std::fmt::Debug for Cdb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cdb(")?;
        for b in self.as_slice() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl Cdb {
    /// A CDB from its bytes; `None` if empty or longer than [`MAX_CDB_LEN`].
    pub fn new(cdb: &[u8]) -> Option<Cdb> {
        if cdb.is_empty() || cdb.len() > MAX_CDB_LEN {
            return None;
        }
        if cdb.len() <= 16 {
            let mut inline = [0u8; 16];
            inline[..cdb.len()].copy_from_slice(cdb);
            Some(Cdb {
                inline,
                len: cdb.len() as u8,
                long: None,
            })
        } else {
            let mut inline = [0u8; 16];
            inline.copy_from_slice(&cdb[..16]);
            Some(Cdb {
                inline,
                len: 16,
                long: Some(Bytes::copy_from_slice(cdb)),
            })
        }
    }

    /// The CDB bytes. A CDB received in the BHS alone is 16 bytes long
    /// (the wire does not say how much of the field is used).
    pub fn as_slice(&self) -> &[u8] {
        match &self.long {
            Some(b) => b,
            None => &self.inline[..usize::from(self.len)],
        }
    }

    /// The SCSI operation code.
    pub fn opcode(&self) -> u8 {
        self.inline[0]
    }
}

/// The residual condition of a SCSI Response or final Data-In.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    #[default]
    None,
    /// O bit: the command wanted this many bytes more than EDTL.
    Overflow(u32),
    /// U bit: this many bytes of EDTL were not transferred.
    Underflow(u32),
}

impl Residual {
    /// From the O / U flag bits and the ResidualCount field.
    fn decode(over: bool, under: bool, count: u32, what: &'static str) -> Result<Self, PduError> {
        match (over, under) {
            (true, true) => Err(invalid(what, "both overflow and underflow set")),
            (true, false) => Ok(Residual::Overflow(count)),
            (false, true) => Ok(Residual::Underflow(count)),
            (false, false) => Ok(Residual::None),
        }
    }
    /// Residual count (0 for `None`).
    pub fn count(self) -> u32 {
        match self {
            Residual::None => 0,
            Residual::Overflow(c) | Residual::Underflow(c) => c,
        }
    }
    /// Computes the residual from the expected transfer length and the
    /// length the command actually wanted.
    pub fn from_lengths(expected: u32, wanted: u32) -> Residual {
        use std::cmp::Ordering::*;
        match wanted.cmp(&expected) {
            Equal => Residual::None,
            Greater => Residual::Overflow(wanted - expected),
            Less => Residual::Underflow(expected - wanted),
        }
    }
}

/// SCSI Command (RFC 7143 §11.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F: no unsolicited Data-Out follows this PDU.
    pub final_bit: bool,
    pub read: bool,
    pub write: bool,
    pub attr: TaskAttr,
    pub lun: Lun,
    pub itt: u32,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: Cdb,
    /// Bidirectional Read Expected Data Transfer Length AHS, if present.
    pub bidi_read_length: Option<u32>,
    /// Immediate data.
    pub data: Bytes,
}

const AHS_EXTENDED_CDB: u8 = 0x01;
const AHS_BIDI_READ_LEN: u8 = 0x02;

impl ScsiCommand {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::ScsiCommand)?;
        let b = &pdu.bhs;
        let flags = b[1];
        let mut cdb_inline = [0u8; 16];
        cdb_inline.copy_from_slice(&b[32..48]);
        let mut cdb = Cdb {
            inline: cdb_inline,
            len: 16,
            long: None,
        };
        let mut bidi_read_length = None;
        let mut rest: &[u8] = &pdu.ahs;
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(PduError::BadAhs("truncated AHS header"));
            }
            let ahs_len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            let ahs_type = rest[2];
            // AHSLength counts the bytes after the 3-byte header... the
            // specific field starts at byte 3 (reserved byte included).
            let body_end = 3 + ahs_len;
            let padded = body_end.div_ceil(4) * 4;
            if padded > rest.len() {
                return Err(PduError::BadAhs("AHS length beyond TotalAHSLength"));
            }
            let body = &rest[3..body_end];
            match ahs_type {
                AHS_EXTENDED_CDB => {
                    if cdb.long.is_some() {
                        return Err(PduError::BadAhs("two extended CDB AHS"));
                    }
                    // body[0] reserved, then CDB bytes 16..
                    if body.len() < 2 {
                        return Err(PduError::BadAhs("empty extended CDB"));
                    }
                    let ext = &body[1..];
                    if 16 + ext.len() > MAX_CDB_LEN {
                        return Err(PduError::BadAhs("extended CDB too long"));
                    }
                    let mut full = BytesMut::with_capacity(16 + ext.len());
                    full.extend_from_slice(&cdb.inline);
                    full.extend_from_slice(ext);
                    cdb.long = Some(full.freeze());
                }
                AHS_BIDI_READ_LEN => {
                    if ahs_len != 5 {
                        return Err(PduError::BadAhs("bidi read length AHS length must be 5"));
                    }
                    bidi_read_length =
                        Some(u32::from_be_bytes([body[1], body[2], body[3], body[4]]));
                }
                _ => return Err(PduError::BadAhs("unknown AHS type")),
            }
            rest = &rest[padded..];
        }
        let read = flags & 0x40 != 0;
        let write = flags & 0x20 != 0;
        let final_bit = flags & 0x80 != 0;
        if !write && !final_bit {
            return Err(invalid("SCSI Command F bit", "must be 1 without W"));
        }
        if bidi_read_length.is_some() && !(read && write) {
            return Err(PduError::BadAhs("bidi read length AHS without R and W"));
        }
        if !write && !pdu.data.is_empty() {
            return Err(invalid("SCSI Command", "immediate data without W bit"));
        }
        Ok(ScsiCommand {
            immediate: pdu.immediate(),
            final_bit,
            read,
            write,
            attr: TaskAttr::from_u8(flags & 0x07)
                .ok_or(invalid("ATTR", "reserved task attribute"))?,
            lun: get_lun(b),
            itt: get32(b, 16),
            expected_data_transfer_length: get32(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
            cdb,
            bidi_read_length,
            data: pdu.data.clone(),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut flags = self.attr as u8;
        if self.final_bit {
            flags |= 0x80;
        }
        if self.read {
            flags |= 0x40;
        }
        if self.write {
            flags |= 0x20;
        }
        let mut b = header(Opcode::ScsiCommand, self.immediate, flags);
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.expected_data_transfer_length);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        b[32..48].copy_from_slice(&self.cdb.inline);
        let mut ahs = BytesMut::new();
        if let Some(long) = &self.cdb.long {
            let ext = &long[16..];
            let ahs_len = ext.len() + 1;
            ahs.put_u16(ahs_len as u16);
            ahs.put_u8(AHS_EXTENDED_CDB);
            ahs.put_u8(0);
            ahs.extend_from_slice(ext);
            let padded = ahs.len().div_ceil(4) * 4;
            ahs.resize(padded, 0);
        }
        if let Some(len) = self.bidi_read_length {
            ahs.put_u16(5);
            ahs.put_u8(AHS_BIDI_READ_LEN);
            ahs.put_u8(0);
            ahs.put_u32(len);
        }
        Pdu::new(b, ahs.freeze(), self.data.clone())
    }
}

wire_enum! {
    /// Task management function codes (RFC 7143 §11.5.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum TmfFunction: u8 else PduError::UnknownTmfFunction {
        AbortTask = 1 => "ABORT TASK",
        AbortTaskSet = 2 => "ABORT TASK SET",
        ClearAca = 3 => "CLEAR ACA",
        ClearTaskSet = 4 => "CLEAR TASK SET",
        LogicalUnitReset = 5 => "LOGICAL UNIT RESET",
        TargetWarmReset = 6 => "TARGET WARM RESET",
        TargetColdReset = 7 => "TARGET COLD RESET",
        TaskReassign = 8 => "TASK REASSIGN",
    }
}

/// Task Management Function Request (RFC 7143 §11.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: TmfFunction,
    pub lun: Lun,
    pub itt: u32,
    /// Referenced Task Tag (ABORT TASK / TASK REASSIGN), else 0xffffffff.
    pub referenced_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

impl TaskMgmtRequest {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::TaskMgmtRequest)?;
        let b = &pdu.bhs;
        if !pdu.final_bit() {
            return Err(invalid("TMF F bit", "must be 1"));
        }
        Ok(TaskMgmtRequest {
            immediate: pdu.immediate(),
            function: TmfFunction::from_u8(b[1] & 0x7f)?,
            lun: get_lun(b),
            itt: get32(b, 16),
            referenced_task_tag: get32(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
            ref_cmd_sn: get32(b, 32),
            exp_data_sn: get32(b, 36),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(
            Opcode::TaskMgmtRequest,
            self.immediate,
            0x80 | self.function as u8,
        );
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.referenced_task_tag);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        put32(&mut b, 32, self.ref_cmd_sn);
        put32(&mut b, 36, self.exp_data_sn);
        Pdu::from_bhs(b)
    }
}

wire_enum! {
    /// Login stage (CSG / NSG, RFC 7143 §11.12.3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Stage: u8 {
        Security = 0 => "SecurityNegotiation",
        Operational = 1 => "LoginOperationalNegotiation",
        FullFeature = 3 => "FullFeaturePhase",
    }
}

impl Stage {
    /// The stage in the low two bits of `v`; 2 is reserved.
    fn from_bits(v: u8, field: &'static str) -> Result<Stage, PduError> {
        Stage::from_u8(v & 3).ok_or(invalid(field, "reserved stage 2"))
    }
}

fn stage_flags(transit: bool, cont: bool, csg: Stage, nsg: Stage) -> u8 {
    let mut f = ((csg as u8) << 2) | if transit { 0x80 | nsg as u8 } else { 0 };
    if cont {
        f |= 0x40;
    }
    f
}

/// Login Request (RFC 7143 §11.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    /// T bit.
    pub transit: bool,
    /// C bit: the text is continued in the next PDU.
    pub cont: bool,
    pub csg: Stage,
    /// Meaningful only with `transit`.
    pub nsg: Stage,
    pub version_max: u8,
    pub version_min: u8,
    /// 48-bit ISID.
    pub isid: u64,
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// Text key=value pairs.
    pub data: Bytes,
}

impl LoginRequest {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::LoginRequest)?;
        let b = &pdu.bhs;
        let transit = b[1] & 0x80 != 0;
        let cont = b[1] & 0x40 != 0;
        if transit && cont {
            return Err(invalid("Login T/C bits", "T and C both set"));
        }
        let csg = Stage::from_bits(b[1] >> 2, "CSG")?;
        let nsg = if transit {
            Stage::from_bits(b[1], "NSG")?
        } else {
            csg
        };
        Ok(LoginRequest {
            transit,
            cont,
            csg,
            nsg,
            version_max: b[2],
            version_min: b[3],
            isid: get_isid(b),
            tsih: get16(b, 14),
            itt: get32(b, 16),
            cid: get16(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
            data: pdu.data.clone(),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        // Login requests always carry the I bit.
        let mut b = header(
            Opcode::LoginRequest,
            true,
            stage_flags(self.transit, self.cont, self.csg, self.nsg),
        );
        b[2] = self.version_max;
        b[3] = self.version_min;
        put_isid(&mut b, self.isid);
        put16(&mut b, 14, self.tsih);
        put32(&mut b, 16, self.itt);
        put16(&mut b, 20, self.cid);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        Pdu::new(b, Bytes::new(), self.data.clone())
    }
}

/// Text Request (RFC 7143 §11.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_bit: bool,
    /// C bit.
    pub cont: bool,
    pub lun: Lun,
    pub itt: u32,
    /// 0xffffffff for a new request, else the TTT of the response being continued.
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Bytes,
}

impl TextRequest {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::TextRequest)?;
        let b = &pdu.bhs;
        let final_bit = b[1] & 0x80 != 0;
        let cont = b[1] & 0x40 != 0;
        if final_bit && cont {
            return Err(invalid("Text F/C bits", "F and C both set"));
        }
        Ok(TextRequest {
            immediate: pdu.immediate(),
            final_bit,
            cont,
            lun: get_lun(b),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
            data: pdu.data.clone(),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let flags = if self.final_bit { 0x80 } else { 0 } | if self.cont { 0x40 } else { 0 };
        let mut b = header(Opcode::TextRequest, self.immediate, flags);
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        Pdu::new(b, Bytes::new(), self.data.clone())
    }
}

/// SCSI Data-Out (RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    pub final_bit: bool,
    pub lun: Lun,
    pub itt: u32,
    /// The R2T's TTT, or 0xffffffff for unsolicited data.
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub data: Bytes,
}

impl DataOut {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::DataOut)?;
        let b = &pdu.bhs;
        Ok(DataOut {
            final_bit: pdu.final_bit(),
            lun: get_lun(b),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            exp_stat_sn: get32(b, 28),
            data_sn: get32(b, 36),
            buffer_offset: get32(b, 40),
            data: pdu.data.clone(),
        })
    }

    /// The BHS alone (for sending `data` without copying it).
    pub fn header(&self) -> [u8; BHS_LEN] {
        let mut b = header(
            Opcode::DataOut,
            false,
            if self.final_bit { 0x80 } else { 0 },
        );
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 28, self.exp_stat_sn);
        put32(&mut b, 36, self.data_sn);
        put32(&mut b, 40, self.buffer_offset);
        b
    }

    pub fn to_pdu(&self) -> Pdu {
        Pdu::new(self.header(), Bytes::new(), self.data.clone())
    }
}

wire_enum! {
    /// Logout reason codes (RFC 7143 §11.14.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum LogoutReason: u8 {
        CloseSession = 0 => "close the session",
        CloseConnection = 1 => "close the connection",
        RemoveConnectionForRecovery = 2 => "remove the connection for recovery",
    }
}

/// Logout Request (RFC 7143 §11.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: LogoutReason,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl LogoutRequest {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::LogoutRequest)?;
        let b = &pdu.bhs;
        if !pdu.final_bit() {
            return Err(invalid("Logout F bit", "must be 1"));
        }
        let reason = LogoutReason::from_u8(b[1] & 0x7f)
            .ok_or(invalid("Logout reason", "undefined reason code"))?;
        Ok(LogoutRequest {
            immediate: pdu.immediate(),
            reason,
            itt: get32(b, 16),
            cid: get16(b, 20),
            cmd_sn: get32(b, 24),
            exp_stat_sn: get32(b, 28),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(
            Opcode::LogoutRequest,
            self.immediate,
            0x80 | self.reason as u8,
        );
        put32(&mut b, 16, self.itt);
        put16(&mut b, 20, self.cid);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        Pdu::from_bhs(b)
    }
}

wire_enum! {
    /// SNACK types (RFC 7143 §11.16.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum SnackType: u8 {
        DataR2t = 0 => "Data/R2T SNACK",
        Status = 1 => "Status SNACK",
        DataAck = 2 => "DataACK",
        RDataSnack = 3 => "R-Data SNACK",
    }
}

/// SNACK Request (RFC 7143 §11.16). Only meaningful at ERL > 0; a target at
/// ERL 0 rejects it, but it still parses so that the Reject can be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnackRequest {
    pub snack_type: SnackType,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

impl SnackRequest {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::SnackRequest)?;
        let b = &pdu.bhs;
        let snack_type =
            SnackType::from_u8(b[1] & 0x0f).ok_or(invalid("SNACK type", "undefined type"))?;
        Ok(SnackRequest {
            snack_type,
            lun: get_lun(b),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            exp_stat_sn: get32(b, 28),
            beg_run: get32(b, 40),
            run_length: get32(b, 44),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(Opcode::SnackRequest, false, 0x80 | self.snack_type as u8);
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 28, self.exp_stat_sn);
        put32(&mut b, 40, self.beg_run);
        put32(&mut b, 44, self.run_length);
        Pdu::from_bhs(b)
    }
}

// ---------------------------------------------------------------------------
// Target → initiator

/// NOP-In (RFC 7143 §11.19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopIn {
    pub lun: Lun,
    /// The NOP-Out's ITT when answering, else 0xffffffff.
    pub itt: u32,
    /// 0xffffffff when answering; a tag when the target wants an answer.
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data: Bytes,
}

impl NopIn {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::NopIn)?;
        let b = &pdu.bhs;
        let itt = get32(b, 16);
        let ttt = get32(b, 20);
        if itt != RESERVED_TAG && ttt != RESERVED_TAG {
            return Err(invalid("NOP-In tags", "ITT and TTT both set"));
        }
        Ok(NopIn {
            lun: get_lun(b),
            itt,
            ttt,
            stat_sn: get32(b, 24),
            exp_cmd_sn: get32(b, 28),
            max_cmd_sn: get32(b, 32),
            data: pdu.data.clone(),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(Opcode::NopIn, false, 0x80);
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 24, self.stat_sn);
        put32(&mut b, 28, self.exp_cmd_sn);
        put32(&mut b, 32, self.max_cmd_sn);
        Pdu::new(b, Bytes::new(), self.data.clone())
    }
}

/// SCSI Response (RFC 7143 §11.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    /// 0x00 command completed at target, 0x01 target failure.
    pub response: u8,
    /// SCSI status (meaningful when `response` is 0).
    pub status: u8,
    pub residual: Residual,
    /// Bidirectional read residual (o / u bits).
    pub bidi_read_residual: Residual,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    /// Sense data (without the 2-byte SenseLength prefix).
    pub sense: Bytes,
    /// Response data following the sense data (rarely used).
    pub response_data: Bytes,
}

impl ScsiResponse {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::ScsiResponse)?;
        let b = &pdu.bhs;
        let f = b[1];
        if f & 0x80 == 0 {
            return Err(invalid("SCSI Response F bit", "must be 1"));
        }
        let residual = Residual::decode(f & 0x04 != 0, f & 0x02 != 0, get32(b, 44), "O/U bits")?;
        let bidi_read_residual =
            Residual::decode(f & 0x10 != 0, f & 0x08 != 0, get32(b, 40), "o/u bits")?;
        let (sense, response_data) = split_sense(&pdu.data)?;
        Ok(ScsiResponse {
            response: b[2],
            status: b[3],
            residual,
            bidi_read_residual,
            itt: get32(b, 16),
            snack_tag: get32(b, 20),
            stat_sn: get32(b, 24),
            exp_cmd_sn: get32(b, 28),
            max_cmd_sn: get32(b, 32),
            exp_data_sn: get32(b, 36),
            sense,
            response_data,
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut f = 0x80;
        match self.residual {
            Residual::Overflow(_) => f |= 0x04,
            Residual::Underflow(_) => f |= 0x02,
            Residual::None => {}
        }
        match self.bidi_read_residual {
            Residual::Overflow(_) => f |= 0x10,
            Residual::Underflow(_) => f |= 0x08,
            Residual::None => {}
        }
        let mut b = header(Opcode::ScsiResponse, false, f);
        b[2] = self.response;
        b[3] = self.status;
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.snack_tag);
        put32(&mut b, 24, self.stat_sn);
        put32(&mut b, 28, self.exp_cmd_sn);
        put32(&mut b, 32, self.max_cmd_sn);
        put32(&mut b, 36, self.exp_data_sn);
        put32(&mut b, 40, self.bidi_read_residual.count());
        put32(&mut b, 44, self.residual.count());
        Pdu::new(
            b,
            Bytes::new(),
            join_sense(&self.sense, &self.response_data),
        )
    }
}

fn split_sense(data: &Bytes) -> Result<(Bytes, Bytes), PduError> {
    if data.is_empty() {
        return Ok((Bytes::new(), Bytes::new()));
    }
    if data.len() < 2 {
        return Err(PduError::BadDataSegment("sense data without SenseLength"));
    }
    let sl = usize::from(u16::from_be_bytes([data[0], data[1]]));
    if 2 + sl > data.len() {
        return Err(PduError::BadDataSegment("SenseLength beyond data segment"));
    }
    Ok((data.slice(2..2 + sl), data.slice(2 + sl..)))
}

fn join_sense(sense: &[u8], rest: &[u8]) -> Bytes {
    if sense.is_empty() && rest.is_empty() {
        return Bytes::new();
    }
    let sl = sense.len().min(usize::from(u16::MAX));
    let mut v = BytesMut::with_capacity(2 + sl + rest.len());
    v.put_u16(sl as u16);
    v.extend_from_slice(&sense[..sl]);
    v.extend_from_slice(rest);
    v.freeze()
}

wire_enum! {
    /// Task management response codes (RFC 7143 §11.6.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum TmfResponse: u8 {
        FunctionComplete = 0 => "function complete",
        TaskDoesNotExist = 1 => "task does not exist",
        LunDoesNotExist = 2 => "LUN does not exist",
        TaskStillAllegiant = 3 => "task still allegiant",
        ReassignmentNotSupported = 4 => "task allegiance reassignment not supported",
        FunctionNotSupported = 5 => "task management function not supported",
        AuthorizationFailed = 6 => "function authorization failed",
        Rejected = 255 => "function rejected",
    }
    /// Any other value.
    other Other => "reserved";
}

/// Task Management Function Response (RFC 7143 §11.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: TmfResponse,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

impl TaskMgmtResponse {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::TaskMgmtResponse)?;
        let b = &pdu.bhs;
        Ok(TaskMgmtResponse {
            response: TmfResponse::from_u8(b[2]),
            itt: get32(b, 16),
            stat_sn: get32(b, 24),
            exp_cmd_sn: get32(b, 28),
            max_cmd_sn: get32(b, 32),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(Opcode::TaskMgmtResponse, false, 0x80);
        b[2] = self.response.to_u8();
        put32(&mut b, 16, self.itt);
        put32(&mut b, 24, self.stat_sn);
        put32(&mut b, 28, self.exp_cmd_sn);
        put32(&mut b, 32, self.max_cmd_sn);
        Pdu::from_bhs(b)
    }
}

/// Login Response (RFC 7143 §11.13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: u64,
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Bytes,
}

impl LoginResponse {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::LoginResponse)?;
        let b = &pdu.bhs;
        let transit = b[1] & 0x80 != 0;
        let cont = b[1] & 0x40 != 0;
        if transit && cont {
            return Err(invalid("Login T/C bits", "T and C both set"));
        }
        let status_class = b[36];
        // Reject responses may carry any stage values; be lenient on them.
        let csg = Stage::from_bits(b[1] >> 2, "CSG").or_else(|e| {
            if status_class != 0 {
                Ok(Stage::Security)
            } else {
                Err(e)
            }
        })?;
        let nsg = if transit {
            Stage::from_bits(b[1], "NSG")?
        } else {
            csg
        };
        Ok(LoginResponse {
            transit,
            cont,
            csg,
            nsg,
            version_max: b[2],
            version_active: b[3],
            isid: get_isid(b),
            tsih: get16(b, 14),
            itt: get32(b, 16),
            stat_sn: get32(b, 24),
            exp_cmd_sn: get32(b, 28),
            max_cmd_sn: get32(b, 32),
            status_class,
            status_detail: b[37],
            data: pdu.data.clone(),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(
            Opcode::LoginResponse,
            false,
            stage_flags(self.transit, self.cont, self.csg, self.nsg),
        );
        b[2] = self.version_max;
        b[3] = self.version_active;
        put_isid(&mut b, self.isid);
        put16(&mut b, 14, self.tsih);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 24, self.stat_sn);
        put32(&mut b, 28, self.exp_cmd_sn);
        put32(&mut b, 32, self.max_cmd_sn);
        b[36] = self.status_class;
        b[37] = self.status_detail;
        Pdu::new(b, Bytes::new(), self.data.clone())
    }
}

/// Text Response (RFC 7143 §11.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextResponse {
    pub final_bit: bool,
    pub cont: bool,
    pub lun: Lun,
    pub itt: u32,
    /// 0xffffffff on the final response, else a tag the initiator echoes.
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data: Bytes,
}

impl TextResponse {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::TextResponse)?;
        let b = &pdu.bhs;
        let final_bit = b[1] & 0x80 != 0;
        let cont = b[1] & 0x40 != 0;
        if final_bit && cont {
            return Err(invalid("Text F/C bits", "F and C both set"));
        }
        Ok(TextResponse {
            final_bit,
            cont,
            lun: get_lun(b),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            stat_sn: get32(b, 24),
            exp_cmd_sn: get32(b, 28),
            max_cmd_sn: get32(b, 32),
            data: pdu.data.clone(),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let flags = if self.final_bit { 0x80 } else { 0 } | if self.cont { 0x40 } else { 0 };
        let mut b = header(Opcode::TextResponse, false, flags);
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 24, self.stat_sn);
        put32(&mut b, 28, self.exp_cmd_sn);
        put32(&mut b, 32, self.max_cmd_sn);
        Pdu::new(b, Bytes::new(), self.data.clone())
    }
}

/// SCSI Data-In (RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIn {
    pub final_bit: bool,
    /// A bit: acknowledge request (ERL > 0 only).
    pub ack: bool,
    /// S bit set: this PDU carries the SCSI status (phase collapse).
    pub status: Option<u8>,
    /// Residual (valid only with `status`).
    pub residual: Residual,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    /// StatSN (valid only with `status`; otherwise sent as 0).
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub data: Bytes,
}

impl DataIn {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::DataIn)?;
        let b = &pdu.bhs;
        let f = b[1];
        let final_bit = f & 0x80 != 0;
        let s = f & 0x01 != 0;
        if s && !final_bit {
            return Err(invalid("Data-In S bit", "S without F"));
        }
        let residual = if s {
            Residual::decode(f & 0x04 != 0, f & 0x02 != 0, get32(b, 44), "O/U bits")?
        } else {
            Residual::None
        };
        Ok(DataIn {
            final_bit,
            ack: f & 0x40 != 0,
            status: if s { Some(b[3]) } else { None },
            residual,
            lun: get_lun(b),
            itt: get32(b, 16),
            ttt: get32(b, 20),
            // StatSN is only meaningful with the S bit.
            stat_sn: if s { get32(b, 24) } else { 0 },
            exp_cmd_sn: get32(b, 28),
            max_cmd_sn: get32(b, 32),
            data_sn: get32(b, 36),
            buffer_offset: get32(b, 40),
            data: pdu.data.clone(),
        })
    }

    /// The BHS alone with DataSegmentLength = `data.len()` (for sending the
    /// data without copying it, see `PduCodec::encode_header`).
    pub fn header(&self) -> [u8; BHS_LEN] {
        let mut f = if self.final_bit { 0x80 } else { 0 };
        if self.ack {
            f |= 0x40;
        }
        let mut b = header(Opcode::DataIn, false, 0);
        if let Some(st) = self.status {
            f |= 0x01 | 0x80;
            b[3] = st;
            match self.residual {
                Residual::Overflow(_) => f |= 0x04,
                Residual::Underflow(_) => f |= 0x02,
                Residual::None => {}
            }
            put32(&mut b, 44, self.residual.count());
            put32(&mut b, 24, self.stat_sn);
        }
        b[1] = f;
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 28, self.exp_cmd_sn);
        put32(&mut b, 32, self.max_cmd_sn);
        put32(&mut b, 36, self.data_sn);
        put32(&mut b, 40, self.buffer_offset);
        let dsl = self.data.len().min(MAX_DATA_SEGMENT_LEN) as u32;
        b[5..8].copy_from_slice(&dsl.to_be_bytes()[1..4]);
        b
    }

    pub fn to_pdu(&self) -> Pdu {
        Pdu::new(self.header(), Bytes::new(), self.data.clone())
    }
}

wire_enum! {
    /// Logout response codes (RFC 7143 §11.15.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum LogoutResponseCode: u8 {
        Success = 0 => "connection or session closed successfully",
        CidNotFound = 1 => "CID not found",
        RecoveryNotSupported = 2 => "connection recovery is not supported",
        CleanupFailed = 3 => "cleanup failed",
    }
}

/// Logout Response (RFC 7143 §11.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: LogoutResponseCode,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

impl LogoutResponse {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::LogoutResponse)?;
        let b = &pdu.bhs;
        let response = LogoutResponseCode::from_u8(b[2])
            .ok_or(invalid("Logout response", "undefined response code"))?;
        Ok(LogoutResponse {
            response,
            itt: get32(b, 16),
            stat_sn: get32(b, 24),
            exp_cmd_sn: get32(b, 28),
            max_cmd_sn: get32(b, 32),
            time2wait: get16(b, 40),
            time2retain: get16(b, 42),
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(Opcode::LogoutResponse, false, 0x80);
        b[2] = self.response as u8;
        put32(&mut b, 16, self.itt);
        put32(&mut b, 24, self.stat_sn);
        put32(&mut b, 28, self.exp_cmd_sn);
        put32(&mut b, 32, self.max_cmd_sn);
        put16(&mut b, 40, self.time2wait);
        put16(&mut b, 42, self.time2retain);
        Pdu::from_bhs(b)
    }
}

/// Ready To Transfer (RFC 7143 §11.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R2t {
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_data_transfer_length: u32,
}

impl R2t {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::R2t)?;
        let b = &pdu.bhs;
        let ttt = get32(b, 20);
        if ttt == RESERVED_TAG {
            return Err(invalid("R2T TTT", "reserved value 0xffffffff"));
        }
        let desired = get32(b, 44);
        if desired == 0 {
            return Err(invalid("R2T desired length", "must be non-zero"));
        }
        Ok(R2t {
            lun: get_lun(b),
            itt: get32(b, 16),
            ttt,
            stat_sn: get32(b, 24),
            exp_cmd_sn: get32(b, 28),
            max_cmd_sn: get32(b, 32),
            r2t_sn: get32(b, 36),
            buffer_offset: get32(b, 40),
            desired_data_transfer_length: desired,
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(Opcode::R2t, false, 0x80);
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, self.ttt);
        put32(&mut b, 24, self.stat_sn);
        put32(&mut b, 28, self.exp_cmd_sn);
        put32(&mut b, 32, self.max_cmd_sn);
        put32(&mut b, 36, self.r2t_sn);
        put32(&mut b, 40, self.buffer_offset);
        put32(&mut b, 44, self.desired_data_transfer_length);
        Pdu::from_bhs(b)
    }
}

/// Asynchronous Message (RFC 7143 §11.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: Lun,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    /// 0 SCSI async event, 1 logout request, 2 connection drop, 3 session
    /// drop, 4 renegotiate, 255 vendor specific.
    pub async_event: u8,
    pub async_vcode: u8,
    pub parameter1: u16,
    pub parameter2: u16,
    pub parameter3: u16,
    pub sense: Bytes,
    pub event_data: Bytes,
}

impl AsyncMessage {
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::AsyncMessage)?;
        let b = &pdu.bhs;
        let (sense, event_data) = split_sense(&pdu.data)?;
        Ok(AsyncMessage {
            lun: get_lun(b),
            stat_sn: get32(b, 24),
            exp_cmd_sn: get32(b, 28),
            max_cmd_sn: get32(b, 32),
            async_event: b[36],
            async_vcode: b[37],
            parameter1: get16(b, 38),
            parameter2: get16(b, 40),
            parameter3: get16(b, 42),
            sense,
            event_data,
        })
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(Opcode::AsyncMessage, false, 0x80);
        put_lun(&mut b, self.lun);
        put32(&mut b, 16, RESERVED_TAG);
        put32(&mut b, 24, self.stat_sn);
        put32(&mut b, 28, self.exp_cmd_sn);
        put32(&mut b, 32, self.max_cmd_sn);
        b[36] = self.async_event;
        b[37] = self.async_vcode;
        put16(&mut b, 38, self.parameter1);
        put16(&mut b, 40, self.parameter2);
        put16(&mut b, 42, self.parameter3);
        Pdu::new(b, Bytes::new(), join_sense(&self.sense, &self.event_data))
    }
}

/// Reject (RFC 7143 §11.17).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub reason: RejectReason,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    /// DataSN / R2TSN (only for rejected Data / R2T SNACKs), else 0.
    pub data_sn: u32,
    /// The complete 48-byte header of the rejected PDU.
    pub rejected_header: Bytes,
}

impl Reject {
    /// A Reject of `bhs` for `reason`; SNs are filled in by the sender.
    pub fn new(reason: RejectReason, bhs: &[u8; BHS_LEN]) -> Reject {
        Reject {
            reason,
            stat_sn: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
            data_sn: 0,
            rejected_header: Bytes::copy_from_slice(bhs),
        }
    }

    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        expect(pdu, Opcode::Reject)?;
        let b = &pdu.bhs;
        if pdu.data.len() < BHS_LEN {
            return Err(PduError::BadDataSegment(
                "Reject must carry the rejected header",
            ));
        }
        Ok(Reject {
            reason: RejectReason::from_u8(b[2]),
            stat_sn: get32(b, 24),
            exp_cmd_sn: get32(b, 28),
            max_cmd_sn: get32(b, 32),
            data_sn: get32(b, 36),
            rejected_header: pdu.data.slice(..BHS_LEN),
        })
    }

    /// ITT of the rejected PDU.
    pub fn rejected_itt(&self) -> Option<u32> {
        let h = self.rejected_header.get(16..20)?;
        Some(u32::from_be_bytes([h[0], h[1], h[2], h[3]]))
    }

    pub fn to_pdu(&self) -> Pdu {
        let mut b = header(Opcode::Reject, false, 0x80);
        b[2] = self.reason.to_u8();
        put32(&mut b, 16, RESERVED_TAG);
        put32(&mut b, 24, self.stat_sn);
        put32(&mut b, 28, self.exp_cmd_sn);
        put32(&mut b, 32, self.max_cmd_sn);
        put32(&mut b, 36, self.data_sn);
        Pdu::new(b, Bytes::new(), self.rejected_header.clone())
    }
}

// ---------------------------------------------------------------------------

/// Any PDU an initiator sends, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiatorPdu {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
}

impl InitiatorPdu {
    /// Parses a PDU received by a target. A target opcode is a protocol
    /// error (Reject 0x04), an undefined one is not supported (Reject 0x05).
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        Ok(match pdu.opcode()? {
            Opcode::NopOut => InitiatorPdu::NopOut(NopOut::parse(pdu)?),
            Opcode::ScsiCommand => InitiatorPdu::ScsiCommand(ScsiCommand::parse(pdu)?),
            Opcode::TaskMgmtRequest => InitiatorPdu::TaskMgmtRequest(TaskMgmtRequest::parse(pdu)?),
            Opcode::LoginRequest => InitiatorPdu::LoginRequest(LoginRequest::parse(pdu)?),
            Opcode::TextRequest => InitiatorPdu::TextRequest(TextRequest::parse(pdu)?),
            Opcode::DataOut => InitiatorPdu::DataOut(DataOut::parse(pdu)?),
            Opcode::LogoutRequest => InitiatorPdu::LogoutRequest(LogoutRequest::parse(pdu)?),
            Opcode::SnackRequest => InitiatorPdu::SnackRequest(SnackRequest::parse(pdu)?),
            other => {
                return Err(PduError::WrongOpcode {
                    expected: Opcode::NopOut,
                    found: other as u8,
                })
            }
        })
    }

    /// Back to a raw PDU.
    pub fn to_pdu(&self) -> Pdu {
        match self {
            InitiatorPdu::NopOut(p) => p.to_pdu(),
            InitiatorPdu::ScsiCommand(p) => p.to_pdu(),
            InitiatorPdu::TaskMgmtRequest(p) => p.to_pdu(),
            InitiatorPdu::LoginRequest(p) => p.to_pdu(),
            InitiatorPdu::TextRequest(p) => p.to_pdu(),
            InitiatorPdu::DataOut(p) => p.to_pdu(),
            InitiatorPdu::LogoutRequest(p) => p.to_pdu(),
            InitiatorPdu::SnackRequest(p) => p.to_pdu(),
        }
    }
}

/// Any PDU a target sends, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPdu {
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

impl TargetPdu {
    /// Parses a PDU received by an initiator.
    pub fn parse(pdu: &Pdu) -> Result<Self, PduError> {
        Ok(match pdu.opcode()? {
            Opcode::NopIn => TargetPdu::NopIn(NopIn::parse(pdu)?),
            Opcode::ScsiResponse => TargetPdu::ScsiResponse(ScsiResponse::parse(pdu)?),
            Opcode::TaskMgmtResponse => TargetPdu::TaskMgmtResponse(TaskMgmtResponse::parse(pdu)?),
            Opcode::LoginResponse => TargetPdu::LoginResponse(LoginResponse::parse(pdu)?),
            Opcode::TextResponse => TargetPdu::TextResponse(TextResponse::parse(pdu)?),
            Opcode::DataIn => TargetPdu::DataIn(DataIn::parse(pdu)?),
            Opcode::LogoutResponse => TargetPdu::LogoutResponse(LogoutResponse::parse(pdu)?),
            Opcode::R2t => TargetPdu::R2t(R2t::parse(pdu)?),
            Opcode::AsyncMessage => TargetPdu::AsyncMessage(AsyncMessage::parse(pdu)?),
            Opcode::Reject => TargetPdu::Reject(Reject::parse(pdu)?),
            other => {
                return Err(PduError::WrongOpcode {
                    expected: Opcode::NopIn,
                    found: other as u8,
                })
            }
        })
    }

    /// Back to a raw PDU.
    pub fn to_pdu(&self) -> Pdu {
        match self {
            TargetPdu::NopIn(p) => p.to_pdu(),
            TargetPdu::ScsiResponse(p) => p.to_pdu(),
            TargetPdu::TaskMgmtResponse(p) => p.to_pdu(),
            TargetPdu::LoginResponse(p) => p.to_pdu(),
            TargetPdu::TextResponse(p) => p.to_pdu(),
            TargetPdu::DataIn(p) => p.to_pdu(),
            TargetPdu::LogoutResponse(p) => p.to_pdu(),
            TargetPdu::R2t(p) => p.to_pdu(),
            TargetPdu::AsyncMessage(p) => p.to_pdu(),
            TargetPdu::Reject(p) => p.to_pdu(),
        }
    }
}
