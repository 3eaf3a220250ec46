//! Initiator → target PDUs (RFC 7143 §11.3 – §11.16, §11.18).

use bytes::{BufMut, Bytes, BytesMut};
use keyfence_scsi::wire_enum;

use super::header::{
    expect, get16, get32, get_isid, get_lun, header, put16, put32, put_isid, put_lun, Lun, Pdu,
};
use super::{invalid, stage_flags, Opcode, PduError, Stage, BHS_LEN, MAX_CDB_LEN};

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
