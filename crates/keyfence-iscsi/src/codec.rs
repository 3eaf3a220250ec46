//! PDU framing (RFC 7143 §11.2): BHS, AHS, optional header digest, data
//! segment padded to 4 bytes, optional data digest. Digests are CRC32C
//! (RFC 7143 §13.1 / Appendix B.4), sent least significant byte first.
//!
//! [`PduCodec::decode`] is incremental: it returns `Ok(None)` until a whole
//! PDU is buffered, then consumes exactly that PDU. The AHS and data of a
//! decoded PDU are zero-copy slices of the input buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::pdu::{Opcode, Pdu, RejectReason, BHS_LEN, MAX_DATA_SEGMENT_LEN};

/// Length of a digest on the wire.
pub const DIGEST_LEN: usize = 4;
/// RFC 7143 default MaxRecvDataSegmentLength, used during login.
pub const DEFAULT_MAX_RECV_DATA_SEGMENT_LEN: u32 = 8192;

/// Framing errors.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The header digest does not match: the framing can no longer be
    /// trusted, the connection must be dropped (RFC 7143 §7.8).
    #[error("header digest mismatch (expected 0x{expected:08x}, got 0x{received:08x})")]
    HeaderDigest { expected: u32, received: u32 },
    /// The data digest does not match. The PDU has been consumed; a target
    /// answers with a Reject (reason 0x02) carrying `bhs` and goes on.
    #[error("data digest mismatch (expected 0x{expected:08x}, got 0x{received:08x})")]
    DataDigest {
        bhs: Box<[u8; BHS_LEN]>,
        expected: u32,
        received: u32,
    },
    /// DataSegmentLength exceeds what we declared we can receive. Nothing
    /// has been consumed; this is a protocol error (Reject 0x04) after
    /// which the connection should be dropped.
    #[error("data segment of {length} bytes exceeds the limit of {limit}")]
    DataSegmentTooLong {
        bhs: Box<[u8; BHS_LEN]>,
        length: u32,
        limit: u32,
    },
    /// An undefined opcode. The PDU has been consumed; a target answers
    /// with a Reject (reason 0x05, command not supported) carrying `bhs`.
    #[error("unknown opcode 0x{opcode:02x}")]
    UnknownOpcode { bhs: Box<[u8; BHS_LEN]>, opcode: u8 },
    /// Encoding: the data segment is longer than the peer accepts.
    #[error("cannot send a data segment of {length} bytes (limit {limit})")]
    SendTooLong { length: usize, limit: usize },
    /// Encoding: the AHS is not a multiple of 4 or longer than 1020 bytes.
    #[error("invalid AHS length {0}")]
    BadAhsLength(usize),
}

impl CodecError {
    /// True when the connection cannot continue.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            CodecError::HeaderDigest { .. } | CodecError::DataSegmentTooLong { .. }
        )
    }

    /// The Reject a target should send, with the rejected header, if any.
    pub fn reject(&self) -> Option<(RejectReason, &[u8; BHS_LEN])> {
        match self {
            CodecError::DataDigest { bhs, .. } => Some((RejectReason::DataDigestError, bhs)),
            CodecError::DataSegmentTooLong { bhs, .. } => Some((RejectReason::ProtocolError, bhs)),
            CodecError::UnknownOpcode { bhs, .. } => Some((RejectReason::CommandNotSupported, bhs)),
            _ => None,
        }
    }
}

/// CRC32C of `data`, the iSCSI digest.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[inline]
fn pad_len(n: usize) -> usize {
    (4 - (n & 3)) & 3
}

/// The PDU framer of one connection.
#[derive(Debug, Clone)]
pub struct PduCodec {
    header_digest: bool,
    data_digest: bool,
    max_recv_data_segment_length: u32,
    max_send_data_segment_length: u32,
}

impl Default for PduCodec {
    fn default() -> Self {
        PduCodec::new()
    }
}

impl PduCodec {
    /// A codec without digests and the login-phase limits (8192 bytes each way).
    pub fn new() -> PduCodec {
        PduCodec {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LEN,
            max_send_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LEN,
        }
    }

    /// Enables or disables the CRC32C header digest (both directions).
    pub fn set_header_digest(&mut self, on: bool) {
        self.header_digest = on;
    }
    /// Enables or disables the CRC32C data digest (both directions).
    pub fn set_data_digest(&mut self, on: bool) {
        self.data_digest = on;
    }
    /// Our declared MaxRecvDataSegmentLength: longer incoming data is an error.
    pub fn set_max_recv_data_segment_length(&mut self, n: u32) {
        self.max_recv_data_segment_length = n.min(MAX_DATA_SEGMENT_LEN as u32);
    }
    /// The peer's declared MaxRecvDataSegmentLength: encode refuses more.
    pub fn set_max_send_data_segment_length(&mut self, n: u32) {
        self.max_send_data_segment_length = n.min(MAX_DATA_SEGMENT_LEN as u32);
    }
    pub fn header_digest(&self) -> bool {
        self.header_digest
    }
    pub fn data_digest(&self) -> bool {
        self.data_digest
    }
    pub fn max_recv_data_segment_length(&self) -> u32 {
        self.max_recv_data_segment_length
    }
    pub fn max_send_data_segment_length(&self) -> u32 {
        self.max_send_data_segment_length
    }

    /// Applies the digests and data segment limits of a negotiated session.
    pub fn apply(&mut self, params: &crate::params::SessionParams) {
        self.header_digest = params.header_digest;
        self.data_digest = params.data_digest;
        self.set_max_recv_data_segment_length(params.max_recv_data_segment_length);
        self.set_max_send_data_segment_length(params.max_send_data_segment_length);
    }

    /// Decodes one PDU from the front of `buf`.
    ///
    /// `Ok(None)`: more bytes are needed (nothing consumed; `buf` has been
    /// reserved to hold the whole PDU once its length is known).
    /// `Ok(Some(pdu))`: exactly one PDU has been consumed.
    /// `Err(e)`: see [`CodecError`] for what was consumed and what to do.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Pdu>, CodecError> {
        if buf.len() < BHS_LEN {
            return Ok(None);
        }
        let ahs_len = usize::from(buf[4]) * 4;
        let dsl = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]);
        let hd = if self.header_digest { DIGEST_LEN } else { 0 };
        let header_len = BHS_LEN + ahs_len + hd;
        if buf.len() < header_len {
            buf.reserve(header_len - buf.len());
            return Ok(None);
        }
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&buf[..BHS_LEN]);
        if self.header_digest {
            let received = u32::from_le_bytes([
                buf[header_len - 4],
                buf[header_len - 3],
                buf[header_len - 2],
                buf[header_len - 1],
            ]);
            let expected = crc32c(&buf[..BHS_LEN + ahs_len]);
            if expected != received {
                return Err(CodecError::HeaderDigest { expected, received });
            }
        }
        if dsl > self.max_recv_data_segment_length {
            return Err(CodecError::DataSegmentTooLong {
                bhs: Box::new(bhs),
                length: dsl,
                limit: self.max_recv_data_segment_length,
            });
        }
        let dsl = dsl as usize;
        let padded = dsl + pad_len(dsl);
        let dd = if self.data_digest && dsl > 0 {
            DIGEST_LEN
        } else {
            0
        };
        let total = header_len + padded + dd;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let data_digest = if dd > 0 {
            let end = header_len + padded;
            let received = u32::from_le_bytes([buf[end], buf[end + 1], buf[end + 2], buf[end + 3]]);
            let expected = crc32c(&buf[header_len..end]);
            Some((expected, received))
        } else {
            None
        };
        let mut frame = buf.split_to(total);
        if let Some((expected, received)) = data_digest {
            if expected != received {
                return Err(CodecError::DataDigest {
                    bhs: Box::new(bhs),
                    expected,
                    received,
                });
            }
        }
        let opcode = bhs[0] & 0x3f;
        if Opcode::from_u8(opcode).is_err() {
            return Err(CodecError::UnknownOpcode {
                bhs: Box::new(bhs),
                opcode,
            });
        }
        frame.advance(BHS_LEN);
        let frame = frame.freeze();
        let ahs = if ahs_len > 0 {
            frame.slice(..ahs_len)
        } else {
            Bytes::new()
        };
        let data = if dsl > 0 {
            frame.slice(ahs_len + hd..ahs_len + hd + dsl)
        } else {
            Bytes::new()
        };
        Ok(Some(Pdu { bhs, ahs, data }))
    }

    /// Encodes a whole PDU. The length fields are written from the real
    /// AHS and data lengths.
    pub fn encode(&self, pdu: &Pdu, out: &mut BytesMut) -> Result<(), CodecError> {
        let dlen = pdu.data.len();
        out.reserve(self.encoded_len(pdu.ahs.len(), dlen));
        self.encode_header(&pdu.bhs, &pdu.ahs, dlen, out)?;
        if dlen > 0 {
            out.extend_from_slice(&pdu.data);
            let (trailer, n) = self.data_trailer(&pdu.data);
            out.extend_from_slice(&trailer[..n]);
        }
        Ok(())
    }

    /// Total wire length of a PDU with these segment lengths.
    pub fn encoded_len(&self, ahs_len: usize, data_len: usize) -> usize {
        let hd = if self.header_digest { DIGEST_LEN } else { 0 };
        let dd = if self.data_digest && data_len > 0 {
            DIGEST_LEN
        } else {
            0
        };
        BHS_LEN + ahs_len + hd + data_len + pad_len(data_len) + dd
    }

    /// Writes the BHS (with TotalAHSLength and DataSegmentLength =
    /// `data_len`), the AHS and the header digest. The caller then sends
    /// the `data_len` data bytes itself followed by [`Self::data_trailer`].
    pub fn encode_header(
        &self,
        bhs: &[u8; BHS_LEN],
        ahs: &[u8],
        data_len: usize,
        out: &mut BytesMut,
    ) -> Result<(), CodecError> {
        if data_len > self.max_send_data_segment_length as usize {
            return Err(CodecError::SendTooLong {
                length: data_len,
                limit: self.max_send_data_segment_length as usize,
            });
        }
        if ahs.len() % 4 != 0 || ahs.len() > 255 * 4 {
            return Err(CodecError::BadAhsLength(ahs.len()));
        }
        let start = out.len();
        out.reserve(BHS_LEN + ahs.len() + DIGEST_LEN);
        out.extend_from_slice(&bhs[..4]);
        out.put_u8((ahs.len() / 4) as u8);
        let dl = (data_len as u32).to_be_bytes();
        out.extend_from_slice(&dl[1..4]);
        out.extend_from_slice(&bhs[8..]);
        out.extend_from_slice(ahs);
        if self.header_digest {
            let crc = crc32c(&out[start..]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        Ok(())
    }

    /// The bytes that follow a data segment: zero padding to a multiple of
    /// 4 and, if enabled, the data digest (which covers data + padding).
    /// Returns the buffer and how many of its bytes to send.
    pub fn data_trailer(&self, data: &[u8]) -> ([u8; 7], usize) {
        let mut t = [0u8; 7];
        if data.is_empty() {
            return (t, 0);
        }
        let pad = pad_len(data.len());
        let mut n = pad;
        if self.data_digest {
            let mut crc = crc32c::crc32c(data);
            if pad > 0 {
                crc = crc32c::crc32c_append(crc, &[0u8; 3][..pad]);
            }
            t[pad..pad + 4].copy_from_slice(&crc.to_le_bytes());
            n += 4;
        }
        (t, n)
    }
}
