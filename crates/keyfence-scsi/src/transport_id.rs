//! TransportIDs (SPC-4 7.6.4): how a PERSISTENT RESERVE OUT parameter list
//! names an initiator port, and how READ FULL STATUS reports one.
//!
//! iSCSI TransportIDs are produced and parsed in both formats:
//! 00b (iSCSI name only, meaning every initiator port with that name) and
//! 01b (iSCSI name, the separator `",i,0x"` and the ISID in hex: exactly one
//! initiator port). Fibre Channel (N_Port name) and SAS (SAS address)
//! TransportIDs are parsed and produced too, so a client can relay them; the
//! keyfence target itself only accepts iSCSI ones.

use std::fmt;

use crate::nexus::InitiatorPort;

/// Protocol identifier values (SPC-4 table 362) that have a TransportID
/// format defined here.
pub const PROTOCOL_FC: u8 = 0x0;
pub const PROTOCOL_SAS: u8 = 0x6;
pub const PROTOCOL_ISCSI: u8 = 0x5;

/// The iSCSI TransportID format 01b separator between name and ISID.
pub const ISCSI_ISID_SEPARATOR: &str = ",i,0x";

/// Smallest value of the ADDITIONAL LENGTH field of an iSCSI TransportID
/// (SPC-4 7.6.4.6: "at least 20").
const ISCSI_MIN_ADDITIONAL_LENGTH: usize = 20;
/// Largest iSCSI name (RFC 7143 3.2.6.1: 223 bytes).
const ISCSI_NAME_MAX: usize = 223;

/// An initiator port as named in a TransportID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TransportId {
    /// iSCSI initiator: format 00b when `isid` is `None`, else format 01b.
    /// The name is normalised to lowercase (iSCSI names compare
    /// case-insensitively).
    Iscsi { name: String, isid: Option<u64> },
    /// Fibre Channel initiator port: 8-byte N_Port name.
    FibreChannel { n_port_name: u64 },
    /// SAS initiator port: 8-byte SAS address.
    Sas { sas_address: u64 },
}

/// Why a TransportID could not be parsed. `offset` is the byte offset of
/// the wrong field relative to the start of the TransportID, so a caller
/// can build a field pointer into its parameter list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransportIdError {
    #[error("TransportID truncated: needs {needed} bytes, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("TransportID protocol identifier {0:#x} is not supported")]
    UnsupportedProtocol(u8),
    #[error("TransportID format code {format:#x} invalid for protocol {protocol:#x}")]
    InvalidFormat { protocol: u8, format: u8 },
    #[error("invalid TransportID field at byte {offset}")]
    InvalidField { offset: usize },
}

impl TransportIdError {
    /// Byte offset (relative to the TransportID) of the field to point at.
    pub fn offset(&self) -> usize {
        match *self {
            TransportIdError::Truncated { .. } => 2,
            TransportIdError::UnsupportedProtocol(_) => 0,
            TransportIdError::InvalidFormat { .. } => 0,
            TransportIdError::InvalidField { offset } => offset,
        }
    }
}

impl TransportId {
    /// The format 01b TransportID naming exactly this initiator port.
    pub fn for_port(port: &InitiatorPort) -> Self {
        TransportId::Iscsi {
            name: port.name.to_string(),
            isid: Some(port.isid),
        }
    }

    /// iSCSI TransportID from `name` or `name,i,0xISID` text (the form
    /// sg_persist accepts and RFC 7143 uses for initiator port names).
    pub fn parse_iscsi_text(text: &str) -> Result<Self, TransportIdError> {
        let lower = text.to_ascii_lowercase();
        let (name, isid) = match lower.find(ISCSI_ISID_SEPARATOR) {
            Some(pos) => {
                let hex = &lower[pos + ISCSI_ISID_SEPARATOR.len()..];
                (
                    &lower[..pos],
                    Some(
                        parse_isid_hex(hex)
                            .ok_or(TransportIdError::InvalidField { offset: 4 + pos })?,
                    ),
                )
            }
            None => (lower.as_str(), None),
        };
        validate_iscsi_name(name.as_bytes(), 4)?;
        Ok(TransportId::Iscsi {
            name: name.to_string(),
            isid,
        })
    }

    pub fn protocol(&self) -> u8 {
        match self {
            TransportId::Iscsi { .. } => PROTOCOL_ISCSI,
            TransportId::FibreChannel { .. } => PROTOCOL_FC,
            TransportId::Sas { .. } => PROTOCOL_SAS,
        }
    }

    /// Whether this TransportID designates `port` (format 00b matches any
    /// ISID of the name).
    pub fn matches(&self, port: &InitiatorPort) -> bool {
        match self {
            TransportId::Iscsi { name, isid } => {
                name.eq_ignore_ascii_case(&port.name)
                    && match isid {
                        None => true,
                        Some(i) => *i == port.isid,
                    }
            }
            _ => false,
        }
    }

    /// The initiator port this TransportID designates, when it designates
    /// exactly one iSCSI initiator port (format 01b).
    pub fn initiator_port(&self) -> Option<InitiatorPort> {
        match self {
            TransportId::Iscsi {
                name,
                isid: Some(isid),
            } => Some(InitiatorPort::new(name, *isid)),
            _ => None,
        }
    }

    /// Encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            TransportId::Iscsi { name, isid } => 4 + iscsi_additional_length(name, isid.is_some()),
            _ => 24,
        }
    }

    /// Encode. iSCSI names are NUL-terminated and padded with NULs to a
    /// multiple of four bytes (additional length at least 20).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Append the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            TransportId::Iscsi { name, isid } => {
                let add = iscsi_additional_length(name, isid.is_some());
                let format: u8 = if isid.is_some() { 0x40 } else { 0x00 };
                out.push(format | PROTOCOL_ISCSI);
                out.push(0);
                // Additional length is bounded by the 223-byte name limit
                // for names we produced; saturate for absurd inputs.
                let add16 = u16::try_from(add).unwrap_or(0xfffc);
                out.extend_from_slice(&add16.to_be_bytes());
                let start = out.len();
                out.extend_from_slice(name.as_bytes());
                if let Some(isid) = isid {
                    out.extend_from_slice(ISCSI_ISID_SEPARATOR.as_bytes());
                    out.extend_from_slice(format!("{:012x}", isid & 0xffff_ffff_ffff).as_bytes());
                }
                out.resize(start + add, 0);
            }
            TransportId::FibreChannel { n_port_name } => {
                out.push(PROTOCOL_FC);
                out.extend_from_slice(&[0u8; 7]);
                out.extend_from_slice(&n_port_name.to_be_bytes());
                out.extend_from_slice(&[0u8; 8]);
            }
            TransportId::Sas { sas_address } => {
                out.push(PROTOCOL_SAS);
                out.extend_from_slice(&[0u8; 3]);
                out.extend_from_slice(&sas_address.to_be_bytes());
                out.extend_from_slice(&[0u8; 12]);
            }
        }
    }

    /// Parse one TransportID from the start of `buf`, returning it and the
    /// number of bytes it occupies.
    pub fn parse(buf: &[u8]) -> Result<(TransportId, usize), TransportIdError> {
        let b0 = *buf.first().ok_or(TransportIdError::Truncated {
            needed: 4,
            available: 0,
        })?;
        let format = b0 >> 6;
        let protocol = b0 & 0x0f;
        match protocol {
            PROTOCOL_ISCSI => {
                if buf.len() < 4 {
                    return Err(TransportIdError::Truncated {
                        needed: 4,
                        available: buf.len(),
                    });
                }
                let add = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                if add % 4 != 0 || add < ISCSI_MIN_ADDITIONAL_LENGTH {
                    return Err(TransportIdError::InvalidField { offset: 2 });
                }
                let total = 4 + add;
                let body = buf.get(4..total).ok_or(TransportIdError::Truncated {
                    needed: total,
                    available: buf.len(),
                })?;
                // The name (and ISID) end at the first NUL; everything after
                // it is padding.
                let text_len = body
                    .iter()
                    .position(|&c| c == 0)
                    .ok_or(TransportIdError::InvalidField { offset: 4 })?;
                let text = &body[..text_len];
                let tid = match format {
                    0 => {
                        validate_iscsi_name(text, 4)?;
                        TransportId::Iscsi {
                            name: ascii_lower(text),
                            isid: None,
                        }
                    }
                    1 => {
                        let sep = find_separator(text)
                            .ok_or(TransportIdError::InvalidField { offset: 4 })?;
                        validate_iscsi_name(&text[..sep], 4)?;
                        let hex_at = sep + ISCSI_ISID_SEPARATOR.len();
                        let hex = std::str::from_utf8(&text[hex_at..])
                            .ok()
                            .and_then(parse_isid_hex)
                            .ok_or(TransportIdError::InvalidField { offset: 4 + hex_at })?;
                        TransportId::Iscsi {
                            name: ascii_lower(&text[..sep]),
                            isid: Some(hex),
                        }
                    }
                    f => {
                        return Err(TransportIdError::InvalidFormat {
                            protocol,
                            format: f,
                        })
                    }
                };
                Ok((tid, total))
            }
            PROTOCOL_FC | PROTOCOL_SAS => {
                if format != 0 {
                    return Err(TransportIdError::InvalidFormat { protocol, format });
                }
                if buf.len() < 24 {
                    return Err(TransportIdError::Truncated {
                        needed: 24,
                        available: buf.len(),
                    });
                }
                let at = if protocol == PROTOCOL_FC { 8 } else { 4 };
                let mut v = [0u8; 8];
                v.copy_from_slice(&buf[at..at + 8]);
                let value = u64::from_be_bytes(v);
                let tid = if protocol == PROTOCOL_FC {
                    TransportId::FibreChannel { n_port_name: value }
                } else {
                    TransportId::Sas { sas_address: value }
                };
                Ok((tid, 24))
            }
            other => Err(TransportIdError::UnsupportedProtocol(other)),
        }
    }

    /// Parse a list of TransportIDs that exactly fills `buf` (the
    /// TransportIDs of a SPEC_I_PT parameter list). Errors carry offsets
    /// relative to `buf`.
    pub fn parse_list(buf: &[u8]) -> Result<Vec<TransportId>, (usize, TransportIdError)> {
        let mut out = Vec::new();
        let mut at = 0usize;
        while at < buf.len() {
            let (tid, used) = TransportId::parse(&buf[at..]).map_err(|e| (at, e))?;
            out.push(tid);
            at += used;
        }
        Ok(out)
    }
}

impl fmt::Display for TransportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportId::Iscsi { name, isid: None } => write!(f, "{name}"),
            TransportId::Iscsi {
                name,
                isid: Some(i),
            } => write!(f, "{name}{ISCSI_ISID_SEPARATOR}{i:012x}"),
            TransportId::FibreChannel { n_port_name } => write!(f, "fc:0x{n_port_name:016x}"),
            TransportId::Sas { sas_address } => write!(f, "sas:0x{sas_address:016x}"),
        }
    }
}

fn iscsi_additional_length(name: &str, with_isid: bool) -> usize {
    let text = name.len()
        + if with_isid {
            ISCSI_ISID_SEPARATOR.len() + 12
        } else {
            0
        };
    // NUL terminator, then round up to a multiple of four.
    let padded = (text + 1).div_ceil(4) * 4;
    padded.max(ISCSI_MIN_ADDITIONAL_LENGTH)
}

fn ascii_lower(b: &[u8]) -> String {
    // Validated as printable ASCII before this is called.
    b.iter()
        .map(|&c| char::from(c.to_ascii_lowercase()))
        .collect()
}

fn find_separator(text: &[u8]) -> Option<usize> {
    let sep = ISCSI_ISID_SEPARATOR.as_bytes();
    text.windows(sep.len())
        .position(|w| w.eq_ignore_ascii_case(sep))
}

fn parse_isid_hex(hex: &str) -> Option<u64> {
    if hex.is_empty() || hex.len() > 12 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// An iSCSI name: 1..=223 bytes of printable ASCII with no comma (the
/// comma would make the separator ambiguous).
fn validate_iscsi_name(name: &[u8], offset: usize) -> Result<(), TransportIdError> {
    if name.is_empty() || name.len() > ISCSI_NAME_MAX {
        return Err(TransportIdError::InvalidField { offset });
    }
    if let Some(bad) = name
        .iter()
        .position(|&c| !(0x21..=0x7e).contains(&c) || c == b',')
    {
        return Err(TransportIdError::InvalidField {
            offset: offset + bad,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn iscsi_format_01_layout() {
        let t = TransportId::Iscsi {
            name: "iqn.a".into(),
            isid: Some(0x23d0_0000_0001),
        };
        let b = t.encode();
        assert_eq!(b[0], 0x45);
        // "iqn.a" + ",i,0x" + 12 hex = 22 chars + NUL = 23 -> 24
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 24);
        assert_eq!(b.len(), 28);
        assert_eq!(&b[4..26], b"iqn.a,i,0x23d000000001");
        assert!(b[26..].iter().all(|&c| c == 0));
        assert_eq!(TransportId::parse(&b).unwrap(), (t, 28));
    }

    #[test]
    fn iscsi_format_00_min_length_and_match() {
        let t = TransportId::Iscsi {
            name: "iqn.x".into(),
            isid: None,
        };
        let b = t.encode();
        assert_eq!(b[0], 0x05);
        assert_eq!(b.len(), 24);
        let (p, n) = TransportId::parse(&b).unwrap();
        assert_eq!((p.clone(), n), (t, 24));
        assert!(p.matches(&InitiatorPort::new("IQN.X", 7)));
        assert!(!p.matches(&InitiatorPort::new("iqn.y", 7)));
        let one = TransportId::parse_iscsi_text("iqn.x,i,0x000000000007").unwrap();
        assert!(one.matches(&InitiatorPort::new("iqn.x", 7)));
        assert!(!one.matches(&InitiatorPort::new("iqn.x", 8)));
    }

    #[test]
    fn fc_and_sas() {
        let fc = TransportId::FibreChannel {
            n_port_name: 0x2100_0024_ff31_4d5e,
        };
        let b = fc.encode();
        assert_eq!(b.len(), 24);
        assert_eq!(&b[8..16], &0x2100_0024_ff31_4d5eu64.to_be_bytes());
        assert_eq!(TransportId::parse(&b).unwrap(), (fc, 24));
        let sas = TransportId::Sas {
            sas_address: 0x5000_c500_1234_5678,
        };
        let b = sas.encode();
        assert_eq!(b[0], 6);
        assert_eq!(&b[4..12], &0x5000_c500_1234_5678u64.to_be_bytes());
        assert_eq!(TransportId::parse(&b).unwrap(), (sas, 24));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            TransportId::parse(&[0x01, 0, 0, 0]),
            Err(TransportIdError::UnsupportedProtocol(1))
        );
        assert!(matches!(
            TransportId::parse(&[0x05, 0, 0, 0x15]),
            Err(TransportIdError::InvalidField { offset: 2 })
        ));
        assert!(matches!(
            TransportId::parse(&[0x05, 0, 0, 20, b'a']),
            Err(TransportIdError::Truncated { .. })
        ));
        // No NUL terminator.
        let mut b = vec![0x05, 0, 0, 20];
        b.extend_from_slice(&[b'a'; 20]);
        assert_eq!(
            TransportId::parse(&b),
            Err(TransportIdError::InvalidField { offset: 4 })
        );
        // Format 01b without separator.
        let mut b = vec![0x45, 0, 0, 20];
        b.extend_from_slice(b"iqn.a");
        b.resize(24, 0);
        assert_eq!(
            TransportId::parse(&b),
            Err(TransportIdError::InvalidField { offset: 4 })
        );
        // Format 10b is reserved.
        let mut b = vec![0x85, 0, 0, 20];
        b.extend_from_slice(b"iqn.a");
        b.resize(24, 0);
        assert!(matches!(
            TransportId::parse(&b),
            Err(TransportIdError::InvalidFormat { .. })
        ));
    }

    #[test]
    fn list_parsing_reports_offset() {
        let a = TransportId::parse_iscsi_text("iqn.a,i,0x1").unwrap();
        let mut buf = a.encode();
        let first = buf.len();
        buf.extend_from_slice(&[0x05, 0, 0]);
        let err = TransportId::parse_list(&buf).unwrap_err();
        assert_eq!(err.0, first);
        buf.truncate(first);
        assert_eq!(TransportId::parse_list(&buf).unwrap(), vec![a]);
    }

    proptest! {
        #[test]
        fn iscsi_roundtrip(name in "[a-z0-9.:-]{1,223}", isid in proptest::option::of(0u64..(1 << 48))) {
            let t = TransportId::Iscsi { name, isid };
            let b = t.encode();
            prop_assert_eq!(b.len() % 4, 0);
            prop_assert_eq!(b.len(), t.encoded_len());
            prop_assert_eq!(TransportId::parse(&b).unwrap(), (t, b.len()));
        }

        #[test]
        fn parse_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = TransportId::parse(&buf);
            let _ = TransportId::parse_list(&buf);
        }
    }
}
