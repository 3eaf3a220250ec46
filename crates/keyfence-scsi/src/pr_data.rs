//! PERSISTENT RESERVE IN / OUT wire formats (SPC-4 6.15, 6.16; SPC-5 adds
//! REPLACE LOST RESERVATION): CDB fields, the PR OUT parameter lists (basic
//! with optional SPEC_I_PT TransportIDs, and REGISTER AND MOVE), and the PR
//! IN parameter data of READ KEYS, READ RESERVATION, REPORT CAPABILITIES and
//! READ FULL STATUS. Everything is both encoded and decoded, so the target
//! and the initiator share one definition.
//!
//! Encoders produce the full parameter data; truncation to the CDB's
//! ALLOCATION LENGTH is the caller's job (SPC-4 4.2.5.6).

use crate::sense::{asc, Sense};
use crate::transport_id::{TransportId, TransportIdError};

pub const OPCODE_PR_IN: u8 = 0x5e;
pub const OPCODE_PR_OUT: u8 = 0x5f;

/// Only LU_SCOPE (0h) exists in SPC-4.
pub const LU_SCOPE: u8 = 0;

/// Length of the basic PR OUT parameter list without SPEC_I_PT data.
pub const BASIC_PARAM_LEN: usize = 24;

crate::wire_enum! {
    /// Persistent reservation type (SPC-4 table 169).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum PrType: u8 {
        WriteExclusive = 1 => "Write Exclusive",
        ExclusiveAccess = 3 => "Exclusive Access",
        WriteExclusiveRegistrantsOnly = 5 => "Write Exclusive, registrants only",
        ExclusiveAccessRegistrantsOnly = 6 => "Exclusive Access, registrants only",
        WriteExclusiveAllRegistrants = 7 => "Write Exclusive, all registrants",
        ExclusiveAccessAllRegistrants = 8 => "Exclusive Access, all registrants",
    }
}

impl PrType {
    /// The TYPE field value ([`Self::to_u8`]; the name the PR code and its
    /// tests use).
    pub const fn code(self) -> u8 {
        self.to_u8()
    }

    /// Write Exclusive family (reads allowed for others).
    pub fn write_exclusive(self) -> bool {
        matches!(
            self,
            Self::WriteExclusive
                | Self::WriteExclusiveRegistrantsOnly
                | Self::WriteExclusiveAllRegistrants
        )
    }

    pub fn registrants_only(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveRegistrantsOnly | Self::ExclusiveAccessRegistrantsOnly
        )
    }

    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants-only or all-registrants ("RR" in SPC-4 table 65).
    pub fn registrants_type(self) -> bool {
        self.registrants_only() || self.all_registrants()
    }

    /// Short name as sg_persist prints it.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::WriteExclusive => "WE",
            Self::ExclusiveAccess => "EA",
            Self::WriteExclusiveRegistrantsOnly => "WE_RO",
            Self::ExclusiveAccessRegistrantsOnly => "EA_RO",
            Self::WriteExclusiveAllRegistrants => "WE_AR",
            Self::ExclusiveAccessAllRegistrants => "EA_AR",
        }
    }
}

crate::wire_enum! {
    /// PERSISTENT RESERVE OUT service actions (SPC-5 table 213).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum PrOutAction: u8 {
        Register = 0 => "REGISTER",
        Reserve = 1 => "RESERVE",
        Release = 2 => "RELEASE",
        Clear = 3 => "CLEAR",
        Preempt = 4 => "PREEMPT",
        PreemptAndAbort = 5 => "PREEMPT AND ABORT",
        RegisterAndIgnoreExistingKey = 6 => "REGISTER AND IGNORE EXISTING KEY",
        RegisterAndMove = 7 => "REGISTER AND MOVE",
        ReplaceLostReservation = 8 => "REPLACE LOST RESERVATION",
    }
}

crate::wire_enum! {
    /// PERSISTENT RESERVE IN service actions (SPC-4 table 160).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum PrInAction: u8 {
        ReadKeys = 0 => "READ KEYS",
        ReadReservation = 1 => "READ RESERVATION",
        ReportCapabilities = 2 => "REPORT CAPABILITIES",
        ReadFullStatus = 3 => "READ FULL STATUS",
    }
}

/// Why PR data could not be decoded. Offsets are into the parameter list
/// (or parameter data) being decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrDataError {
    #[error("parameter list length error")]
    ParameterListLength,
    #[error("invalid field in parameter list at byte {byte}")]
    InvalidField { byte: usize, bit: Option<u8> },
    #[error("invalid field in CDB at byte {byte}")]
    InvalidCdbField { byte: usize, bit: Option<u8> },
    #[error("invalid TransportID at byte {at}: {err}")]
    TransportId { at: usize, err: TransportIdError },
    #[error("PR IN data truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },
}

impl PrDataError {
    /// The sense data a device server returns for this error.
    pub fn to_sense(&self) -> Sense {
        let clamp = |b: usize| u16::try_from(b).unwrap_or(u16::MAX);
        match *self {
            PrDataError::ParameterListLength | PrDataError::Truncated { .. } => {
                Sense::illegal_request(asc::PARAMETER_LIST_LENGTH_ERROR)
            }
            PrDataError::InvalidField { byte, bit } => Sense::invalid_param_field(clamp(byte), bit),
            PrDataError::InvalidCdbField { byte, bit } => {
                Sense::invalid_cdb_field(clamp(byte), bit)
            }
            PrDataError::TransportId { at, err } => match err {
                // A TransportID running past the TRANSPORTID PARAMETER DATA
                // LENGTH is a truncation: SPC-4 6.16.3 b).
                TransportIdError::Truncated { .. } => {
                    Sense::invalid_param_field(clamp(at.saturating_add(2)), None)
                }
                e => Sense::invalid_param_field(clamp(at.saturating_add(e.offset())), None),
            },
        }
    }
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------- CDBs ---

/// The fields of a PERSISTENT RESERVE OUT CDB (10 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrOutCdb {
    /// Raw SERVICE ACTION (byte 1 bits 4-0).
    pub service_action: u8,
    /// Raw SCOPE (byte 2 bits 7-4).
    pub scope: u8,
    /// Raw TYPE (byte 2 bits 3-0).
    pub pr_type: u8,
    /// PARAMETER LIST LENGTH (bytes 5-8).
    pub param_len: u32,
}

impl PrOutCdb {
    pub fn new(action: PrOutAction, pr_type: Option<PrType>, param_len: u32) -> Self {
        PrOutCdb {
            service_action: action as u8,
            scope: LU_SCOPE,
            pr_type: pr_type.map_or(0, PrType::code),
            param_len,
        }
    }

    /// Decode; `None` if `cdb` is not a 10-byte PR OUT CDB.
    pub fn parse(cdb: &[u8]) -> Option<Self> {
        if cdb.len() < 10 || cdb[0] != OPCODE_PR_OUT {
            return None;
        }
        Some(PrOutCdb {
            service_action: cdb[1] & 0x1f,
            scope: cdb[2] >> 4,
            pr_type: cdb[2] & 0x0f,
            param_len: be_u32(cdb, 5),
        })
    }

    pub fn encode(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = OPCODE_PR_OUT;
        c[1] = self.service_action & 0x1f;
        c[2] = (self.scope << 4) | (self.pr_type & 0x0f);
        c[5..9].copy_from_slice(&self.param_len.to_be_bytes());
        c
    }
}

/// The fields of a PERSISTENT RESERVE IN CDB (10 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrInCdb {
    pub service_action: u8,
    pub allocation_length: u16,
}

impl PrInCdb {
    pub fn new(action: PrInAction, allocation_length: u16) -> Self {
        PrInCdb {
            service_action: action as u8,
            allocation_length,
        }
    }

    pub fn parse(cdb: &[u8]) -> Option<Self> {
        if cdb.len() < 10 || cdb[0] != OPCODE_PR_IN {
            return None;
        }
        Some(PrInCdb {
            service_action: cdb[1] & 0x1f,
            allocation_length: u16::from_be_bytes([cdb[7], cdb[8]]),
        })
    }

    pub fn encode(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = OPCODE_PR_IN;
        c[1] = self.service_action & 0x1f;
        c[7..9].copy_from_slice(&self.allocation_length.to_be_bytes());
        c
    }
}

// ------------------------------------------------------ PR OUT params ---

/// The basic PR OUT parameter list (SPC-4 table 172), with the SPEC_I_PT
/// TransportIDs when that bit is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrOutParams {
    pub reservation_key: u64,
    pub service_action_key: u64,
    pub spec_i_pt: bool,
    pub all_tg_pt: bool,
    pub aptpl: bool,
    /// Only encoded/decoded when `spec_i_pt` is set.
    pub transport_ids: Vec<TransportId>,
}

impl PrOutParams {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BASIC_PARAM_LEN];
        b[0..8].copy_from_slice(&self.reservation_key.to_be_bytes());
        b[8..16].copy_from_slice(&self.service_action_key.to_be_bytes());
        b[20] = (u8::from(self.spec_i_pt) << 3)
            | (u8::from(self.all_tg_pt) << 2)
            | u8::from(self.aptpl);
        if self.spec_i_pt {
            let mut tids = Vec::new();
            for t in &self.transport_ids {
                t.encode_into(&mut tids);
            }
            b.extend_from_slice(&len_u32(tids.len()).to_be_bytes());
            b.extend_from_slice(&tids);
        }
        b
    }

    /// Decode a parameter list of exactly `buf.len()` bytes (the CDB's
    /// PARAMETER LIST LENGTH). Length rules of SPC-4 6.16.3: 24 bytes
    /// unless SPEC_I_PT is set, in which case 28 plus the TRANSPORTID
    /// PARAMETER DATA LENGTH.
    pub fn decode(buf: &[u8]) -> Result<Self, PrDataError> {
        if buf.len() < BASIC_PARAM_LEN {
            return Err(PrDataError::ParameterListLength);
        }
        let flags = buf[20];
        let mut p = PrOutParams {
            reservation_key: be_u64(buf, 0),
            service_action_key: be_u64(buf, 8),
            spec_i_pt: flags & 0x08 != 0,
            all_tg_pt: flags & 0x04 != 0,
            aptpl: flags & 0x01 != 0,
            transport_ids: Vec::new(),
        };
        if !p.spec_i_pt {
            if buf.len() != BASIC_PARAM_LEN {
                return Err(PrDataError::ParameterListLength);
            }
            return Ok(p);
        }
        if buf.len() < BASIC_PARAM_LEN + 4 {
            return Err(PrDataError::ParameterListLength);
        }
        let tpdl = usize::try_from(be_u32(buf, 24)).unwrap_or(usize::MAX);
        if Some(buf.len()) != tpdl.checked_add(BASIC_PARAM_LEN + 4) {
            return Err(PrDataError::ParameterListLength);
        }
        let base = BASIC_PARAM_LEN + 4;
        p.transport_ids = TransportId::parse_list(&buf[base..])
            .map_err(|(at, err)| PrDataError::TransportId { at: base + at, err })?;
        Ok(p)
    }
}

/// The REGISTER AND MOVE parameter list (SPC-4 table 174).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterMoveParams {
    pub reservation_key: u64,
    pub service_action_key: u64,
    pub unreg: bool,
    pub aptpl: bool,
    pub relative_target_port: u16,
    pub transport_id: TransportId,
}

impl RegisterMoveParams {
    /// Byte offset of the TransportID in the parameter list.
    pub const TRANSPORT_ID_OFFSET: usize = 24;

    pub fn encode(&self) -> Vec<u8> {
        let tid = self.transport_id.encode();
        let mut b = vec![0u8; 24];
        b[0..8].copy_from_slice(&self.reservation_key.to_be_bytes());
        b[8..16].copy_from_slice(&self.service_action_key.to_be_bytes());
        b[17] = (u8::from(self.unreg) << 1) | u8::from(self.aptpl);
        b[18..20].copy_from_slice(&self.relative_target_port.to_be_bytes());
        b[20..24].copy_from_slice(&len_u32(tid.len()).to_be_bytes());
        b.extend_from_slice(&tid);
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, PrDataError> {
        if buf.len() < 24 {
            return Err(PrDataError::ParameterListLength);
        }
        let tlen = usize::try_from(be_u32(buf, 20)).unwrap_or(usize::MAX);
        if Some(buf.len()) != tlen.checked_add(24) {
            return Err(PrDataError::ParameterListLength);
        }
        let (transport_id, used) = TransportId::parse(&buf[24..])
            .map_err(|err| PrDataError::TransportId { at: 24, err })?;
        if used != tlen {
            // The TRANSPORTID PARAMETER DATA LENGTH must describe exactly
            // one TransportID.
            return Err(PrDataError::InvalidField {
                byte: 20,
                bit: None,
            });
        }
        Ok(RegisterMoveParams {
            reservation_key: be_u64(buf, 0),
            service_action_key: be_u64(buf, 8),
            unreg: buf[17] & 0x02 != 0,
            aptpl: buf[17] & 0x01 != 0,
            relative_target_port: u16::from_be_bytes([buf[18], buf[19]]),
            transport_id,
        })
    }
}

// ------------------------------------------------------ PR IN data ---

fn check_total(buf: &[u8], header: usize) -> Result<usize, PrDataError> {
    if buf.len() < header {
        return Err(PrDataError::Truncated {
            needed: header,
            available: buf.len(),
        });
    }
    let add = usize::try_from(be_u32(buf, 4)).unwrap_or(usize::MAX);
    let total = add.saturating_add(8);
    if buf.len() < total {
        return Err(PrDataError::Truncated {
            needed: total,
            available: buf.len(),
        });
    }
    Ok(total)
}

/// READ KEYS parameter data (SPC-4 table 163).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadKeys {
    pub generation: u32,
    pub keys: Vec<u64>,
}

impl ReadKeys {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 8 * self.keys.len());
        b.extend_from_slice(&self.generation.to_be_bytes());
        b.extend_from_slice(&len_u32(8 * self.keys.len()).to_be_bytes());
        for k in &self.keys {
            b.extend_from_slice(&k.to_be_bytes());
        }
        b
    }

    /// Decode; `Truncated` tells how large an allocation length is needed.
    pub fn decode(buf: &[u8]) -> Result<Self, PrDataError> {
        let total = check_total(buf, 8)?;
        if (total - 8) % 8 != 0 {
            return Err(PrDataError::InvalidField { byte: 4, bit: None });
        }
        Ok(ReadKeys {
            generation: be_u32(buf, 0),
            keys: buf[8..total]
                .chunks_exact(8)
                .map(|c| be_u64(c, 0))
                .collect(),
        })
    }
}

/// The persistent reservation as READ RESERVATION reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationDescriptor {
    /// Holder's key, or zero for an all-registrants reservation.
    pub key: u64,
    pub scope: u8,
    /// Raw TYPE; see [`PrType::from_u8`].
    pub pr_type: u8,
}

/// READ RESERVATION parameter data (SPC-4 tables 164/165).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadReservation {
    pub generation: u32,
    pub reservation: Option<ReservationDescriptor>,
}

impl ReadReservation {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&self.generation.to_be_bytes());
        match &self.reservation {
            None => b.extend_from_slice(&0u32.to_be_bytes()),
            Some(r) => {
                b.extend_from_slice(&16u32.to_be_bytes());
                b.extend_from_slice(&r.key.to_be_bytes());
                b.extend_from_slice(&[0u8; 4]); // obsolete
                b.push(0);
                b.push((r.scope << 4) | (r.pr_type & 0x0f));
                b.extend_from_slice(&[0u8; 2]); // obsolete
            }
        }
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, PrDataError> {
        let total = check_total(buf, 8)?;
        let generation = be_u32(buf, 0);
        if total == 8 {
            return Ok(ReadReservation {
                generation,
                reservation: None,
            });
        }
        if total < 24 {
            return Err(PrDataError::InvalidField { byte: 4, bit: None });
        }
        Ok(ReadReservation {
            generation,
            reservation: Some(ReservationDescriptor {
                key: be_u64(buf, 8),
                scope: buf[21] >> 4,
                pr_type: buf[21] & 0x0f,
            }),
        })
    }
}

/// REPORT CAPABILITIES parameter data (SPC-5 table 207).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    pub rlr_c: bool,
    pub crh: bool,
    pub sip_c: bool,
    pub atp_c: bool,
    pub ptpl_c: bool,
    pub tmv: bool,
    /// ALLOW COMMANDS (3 bits, SPC-5 table 208).
    pub allow_commands: u8,
    pub ptpl_a: bool,
    /// PERSISTENT RESERVATION TYPE MASK as the 16-bit big-endian value of
    /// bytes 4-5 (see [`Capabilities::type_mask_for`]).
    pub type_mask: u16,
}

impl Capabilities {
    /// The type-mask bit for one reservation type.
    pub fn type_mask_bit(t: PrType) -> u16 {
        match t {
            PrType::WriteExclusiveAllRegistrants => 0x8000,
            PrType::ExclusiveAccessRegistrantsOnly => 0x4000,
            PrType::WriteExclusiveRegistrantsOnly => 0x2000,
            PrType::ExclusiveAccess => 0x0800,
            PrType::WriteExclusive => 0x0200,
            PrType::ExclusiveAccessAllRegistrants => 0x0001,
        }
    }

    pub fn type_mask_for(types: &[PrType]) -> u16 {
        types.iter().fold(0, |m, &t| m | Self::type_mask_bit(t))
    }

    pub fn supports(&self, t: PrType) -> bool {
        self.tmv && self.type_mask & Self::type_mask_bit(t) != 0
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        b[0..2].copy_from_slice(&8u16.to_be_bytes());
        b[2] = (u8::from(self.rlr_c) << 7)
            | (u8::from(self.crh) << 4)
            | (u8::from(self.sip_c) << 3)
            | (u8::from(self.atp_c) << 2)
            | u8::from(self.ptpl_c);
        b[3] = (u8::from(self.tmv) << 7) | ((self.allow_commands & 7) << 4) | u8::from(self.ptpl_a);
        b[4..6].copy_from_slice(&self.type_mask.to_be_bytes());
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, PrDataError> {
        if buf.len() < 8 {
            return Err(PrDataError::Truncated {
                needed: 8,
                available: buf.len(),
            });
        }
        Ok(Capabilities {
            rlr_c: buf[2] & 0x80 != 0,
            crh: buf[2] & 0x10 != 0,
            sip_c: buf[2] & 0x08 != 0,
            atp_c: buf[2] & 0x04 != 0,
            ptpl_c: buf[2] & 0x01 != 0,
            tmv: buf[3] & 0x80 != 0,
            allow_commands: (buf[3] >> 4) & 7,
            ptpl_a: buf[3] & 0x01 != 0,
            type_mask: u16::from_be_bytes([buf[4], buf[5]]),
        })
    }
}

/// One READ FULL STATUS descriptor (SPC-4 table 167).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullStatusDescriptor {
    pub key: u64,
    pub all_tg_pt: bool,
    pub r_holder: bool,
    /// SCOPE and TYPE are meaningful only when `r_holder` is set.
    pub scope: u8,
    pub pr_type: u8,
    pub relative_target_port: u16,
    pub transport_id: TransportId,
}

/// READ FULL STATUS parameter data (SPC-4 table 166).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FullStatus {
    pub generation: u32,
    pub descriptors: Vec<FullStatusDescriptor>,
}

impl FullStatus {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for d in &self.descriptors {
            let tid = d.transport_id.encode();
            body.extend_from_slice(&d.key.to_be_bytes());
            body.extend_from_slice(&[0u8; 4]);
            body.push((u8::from(d.all_tg_pt) << 1) | u8::from(d.r_holder));
            body.push((d.scope << 4) | (d.pr_type & 0x0f));
            body.extend_from_slice(&[0u8; 4]);
            body.extend_from_slice(&d.relative_target_port.to_be_bytes());
            body.extend_from_slice(&len_u32(tid.len()).to_be_bytes());
            body.extend_from_slice(&tid);
        }
        let mut b = Vec::with_capacity(8 + body.len());
        b.extend_from_slice(&self.generation.to_be_bytes());
        b.extend_from_slice(&len_u32(body.len()).to_be_bytes());
        b.extend_from_slice(&body);
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, PrDataError> {
        let total = check_total(buf, 8)?;
        let mut descriptors = Vec::new();
        let mut at = 8usize;
        while at < total {
            if total - at < 24 {
                return Err(PrDataError::InvalidField {
                    byte: at,
                    bit: None,
                });
            }
            let d = &buf[at..total];
            let add = usize::try_from(be_u32(d, 20)).unwrap_or(usize::MAX);
            let end =
                add.checked_add(24)
                    .filter(|&e| e <= d.len())
                    .ok_or(PrDataError::InvalidField {
                        byte: at + 20,
                        bit: None,
                    })?;
            let (transport_id, _) = TransportId::parse(&d[24..end])
                .map_err(|err| PrDataError::TransportId { at: at + 24, err })?;
            descriptors.push(FullStatusDescriptor {
                key: be_u64(d, 0),
                all_tg_pt: d[12] & 0x02 != 0,
                r_holder: d[12] & 0x01 != 0,
                scope: d[13] >> 4,
                pr_type: d[13] & 0x0f,
                relative_target_port: u16::from_be_bytes([d[18], d[19]]),
                transport_id,
            });
            at += end;
        }
        Ok(FullStatus {
            generation: be_u32(buf, 0),
            descriptors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tid(s: &str) -> TransportId {
        TransportId::parse_iscsi_text(s).unwrap()
    }

    #[test]
    fn cdbs_roundtrip() {
        let c = PrOutCdb::new(PrOutAction::Reserve, Some(PrType::ExclusiveAccess), 24);
        let b = c.encode();
        assert_eq!(b[0], 0x5f);
        assert_eq!(b[1], 1);
        assert_eq!(b[2], 0x03);
        assert_eq!(&b[5..9], &[0, 0, 0, 24]);
        assert_eq!(PrOutCdb::parse(&b), Some(c));
        let i = PrInCdb::new(PrInAction::ReadFullStatus, 8192);
        let b = i.encode();
        assert_eq!((b[1], b[7], b[8]), (3, 0x20, 0));
        assert_eq!(PrInCdb::parse(&b), Some(i));
        assert_eq!(PrInCdb::parse(&b[..9]), None);
    }

    #[test]
    fn basic_params_lengths() {
        let p = PrOutParams {
            reservation_key: 0x1122,
            service_action_key: 0xabcd,
            aptpl: true,
            all_tg_pt: true,
            ..Default::default()
        };
        let b = p.encode();
        assert_eq!(b.len(), 24);
        assert_eq!(b[20], 0x05);
        assert_eq!(PrOutParams::decode(&b).unwrap(), p);
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            PrOutParams::decode(&long),
            Err(PrDataError::ParameterListLength)
        );
        assert_eq!(
            PrOutParams::decode(&b[..23]),
            Err(PrDataError::ParameterListLength)
        );
        assert_eq!(
            PrDataError::ParameterListLength.to_sense().code(),
            asc::PARAMETER_LIST_LENGTH_ERROR
        );
    }

    #[test]
    fn spec_i_pt_params() {
        let p = PrOutParams {
            service_action_key: 7,
            spec_i_pt: true,
            transport_ids: vec![tid("iqn.a,i,0x1"), tid("iqn.b")],
            ..Default::default()
        };
        let b = p.encode();
        assert_eq!(b[20], 0x08);
        let tpdl = be_u32(&b, 24) as usize;
        assert_eq!(b.len(), 28 + tpdl);
        assert_eq!(PrOutParams::decode(&b).unwrap(), p);
        // TRANSPORTID PARAMETER DATA LENGTH larger than the list.
        let mut bad = b.clone();
        bad[27] = bad[27].wrapping_add(4);
        assert_eq!(
            PrOutParams::decode(&bad),
            Err(PrDataError::ParameterListLength)
        );
        // TPDL cutting the last TransportID short.
        let mut cut = b.clone();
        cut.truncate(b.len() - 4);
        let l = (tpdl - 4) as u32;
        cut[24..28].copy_from_slice(&l.to_be_bytes());
        let e = PrOutParams::decode(&cut).unwrap_err();
        assert!(matches!(e, PrDataError::TransportId { .. }));
        assert_eq!(e.to_sense().code(), asc::INVALID_FIELD_IN_PARAMETER_LIST);
    }

    #[test]
    fn register_move_params() {
        let p = RegisterMoveParams {
            reservation_key: 1,
            service_action_key: 2,
            unreg: true,
            aptpl: false,
            relative_target_port: 3,
            transport_id: tid("iqn.dest,i,0x23d000000002"),
        };
        let b = p.encode();
        assert_eq!(b[17], 0x02);
        assert_eq!(&b[18..20], &[0, 3]);
        assert_eq!(RegisterMoveParams::decode(&b).unwrap(), p);
        assert_eq!(
            RegisterMoveParams::decode(&b[..b.len() - 1]),
            Err(PrDataError::ParameterListLength)
        );
    }

    #[test]
    fn pr_in_roundtrips() {
        let k = ReadKeys {
            generation: 9,
            keys: vec![1, 2, 2],
        };
        let b = k.encode();
        assert_eq!(be_u32(&b, 4), 24);
        assert_eq!(ReadKeys::decode(&b).unwrap(), k);
        assert_eq!(
            ReadKeys::decode(&b[..16]),
            Err(PrDataError::Truncated {
                needed: 32,
                available: 16
            })
        );

        let r = ReadReservation {
            generation: 3,
            reservation: Some(ReservationDescriptor {
                key: 0xfeed,
                scope: 0,
                pr_type: 6,
            }),
        };
        let b = r.encode();
        assert_eq!(b.len(), 24);
        assert_eq!(b[21], 6);
        assert_eq!(ReadReservation::decode(&b).unwrap(), r);
        let none = ReadReservation {
            generation: 3,
            reservation: None,
        };
        assert_eq!(none.encode().len(), 8);
        assert_eq!(ReadReservation::decode(&none.encode()).unwrap(), none);

        let c = Capabilities {
            rlr_c: true,
            crh: true,
            sip_c: true,
            atp_c: true,
            ptpl_c: true,
            tmv: true,
            allow_commands: 3,
            ptpl_a: false,
            type_mask: Capabilities::type_mask_for(&PrType::ALL),
        };
        let b = c.encode();
        assert_eq!(b, vec![0, 8, 0x9d, 0xb0, 0xea, 0x01, 0, 0]);
        assert_eq!(Capabilities::decode(&b).unwrap(), c);
        assert!(PrType::ALL.iter().all(|&t| c.supports(t)));

        let f = FullStatus {
            generation: 5,
            descriptors: vec![
                FullStatusDescriptor {
                    key: 0xaa,
                    all_tg_pt: false,
                    r_holder: true,
                    scope: 0,
                    pr_type: 1,
                    relative_target_port: 1,
                    transport_id: tid("iqn.a,i,0x1"),
                },
                FullStatusDescriptor {
                    key: 0xbb,
                    all_tg_pt: true,
                    r_holder: false,
                    scope: 0,
                    pr_type: 0,
                    relative_target_port: 2,
                    transport_id: tid("iqn.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb,i,0x2"),
                },
            ],
        };
        let b = f.encode();
        assert_eq!(b[8 + 12], 0x01);
        assert_eq!(b[8 + 13], 0x01);
        assert_eq!(FullStatus::decode(&b).unwrap(), f);
        assert!(matches!(
            FullStatus::decode(&b[..b.len() - 1]),
            Err(PrDataError::Truncated { .. })
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = PrOutParams::decode(&buf);
            let _ = RegisterMoveParams::decode(&buf);
            let _ = ReadKeys::decode(&buf);
            let _ = ReadReservation::decode(&buf);
            let _ = Capabilities::decode(&buf);
            let _ = FullStatus::decode(&buf);
        }

        #[test]
        fn read_keys_roundtrip(generation: u32, keys in proptest::collection::vec(any::<u64>(), 0..20)) {
            let k = ReadKeys { generation, keys };
            prop_assert_eq!(ReadKeys::decode(&k.encode()).unwrap(), k);
        }
    }
}
