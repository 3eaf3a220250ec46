//! Target → initiator PDUs (RFC 7143 §11.4 – §11.19).

use bytes::{BufMut, Bytes, BytesMut};
use keyfence_scsi::wire_enum;

use super::header::{
    expect, get16, get32, get_isid, get_lun, header, put16, put32, put_isid, put_lun, Lun, Pdu,
};
use super::{
    invalid, stage_flags, Opcode, PduError, RejectReason, Stage, BHS_LEN, MAX_DATA_SEGMENT_LEN,
    RESERVED_TAG,
};

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
