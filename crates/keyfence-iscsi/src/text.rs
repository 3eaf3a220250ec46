//! Full feature phase text negotiation: SendTargets discovery (RFC 7143
//! §11.10, §11.11, Appendix C) with responses split over several Text
//! Responses (C bit and Target Transfer Tag continuation).
//!
//! Target side: [`TextResponder`] turns Text Requests into Text Responses.
//! Initiator side: [`send_targets_request`], [`TextCollector`] and
//! [`parse_send_targets`].
//!
//! StatSN / ExpCmdSN / MaxCmdSN of the PDUs built here are left 0: the
//! connection's sequencing layer fills them in (see `Pdu::set_target_sns`
//! and `Pdu::set_initiator_sns`).

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::keys::{self, KeyError};
use crate::pdu::{Lun, TextRequest, TextResponse, RESERVED_TAG};

/// Default iSCSI TCP port.
pub const DEFAULT_PORT: u16 = 3260;

/// Text phase errors.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextError {
    /// A continuation carried a TTT we did not issue (Reject: protocol error).
    #[error("text request with unknown target transfer tag 0x{0:08x}")]
    UnknownTtt(u32),
    /// The peer's text is malformed.
    #[error("malformed text: {0}")]
    Keys(#[from] KeyError),
    /// The assembled text is too long.
    #[error("text exchange longer than {} bytes", keys::MAX_TEXT_LEN)]
    TooLong,
    /// A response does not belong to the exchange.
    #[error("text response for ITT 0x{got:08x}, expected 0x{expected:08x}")]
    WrongItt { expected: u32, got: u32 },
    /// Malformed SendTargets answer.
    #[error("malformed SendTargets response: {0}")]
    BadSendTargets(String),
}

/// One target of a SendTargets text (RFC 7143 §13.3): its TargetName and
/// TargetAddress values, as a target advertises them or an initiator
/// parses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendTargetsEntry {
    pub name: String,
    /// `(address, tpgt)`: address is `host:port`, IPv6 hosts in brackets.
    pub addresses: Vec<(String, u16)>,
}

/// Formats a socket address the way TargetAddress wants it (IPv6 in brackets).
pub fn format_address(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// Builds the SendTargets answer text.
///
/// `value` is the SendTargets value: `All`, empty, or a target name.
/// `targets` are the targets this initiator may be told about (the caller
/// decides). In a discovery session (`session_target` is `None`) `All`
/// lists them all, a name lists that target and empty lists nothing. In a
/// normal session empty means the session's own target, a name lists that
/// target, and `All` lists every target given, as Linux's target does. A
/// value that is none of these (`all`, text that is not an iSCSI name) is
/// answered `SendTargets=Reject` (RFC 7143 §6.2: an invalid value is
/// rejected, the exchange and the connection go on).
pub fn send_targets_text(
    value: &str,
    targets: &[SendTargetsEntry],
    session_target: Option<&str>,
) -> Bytes {
    let mut b = keys::TextBuilder::new();
    let emit = |b: &mut keys::TextBuilder, t: &SendTargetsEntry| {
        b.push("TargetName", &t.name);
        for (addr, tpgt) in &t.addresses {
            b.push("TargetAddress", &format!("{addr},{tpgt}"));
        }
    };
    if !(value == "All" || value.is_empty() || looks_like_iscsi_name(value)) {
        b.push("SendTargets", "Reject");
        return b.finish();
    }
    let wanted: Option<&str> = match session_target {
        _ if value == "All" => None,
        None if value.is_empty() => return b.finish(),
        Some(own) if value.is_empty() => Some(own),
        _ => Some(value),
    };
    for t in targets {
        if wanted.is_none_or(|w| t.name.eq_ignore_ascii_case(w)) {
            emit(&mut b, t);
        }
    }
    b.finish()
}

/// Could `v` be an iSCSI name (RFC 7143 §4.2.7: `iqn.`, `eui.` or `naa.`
/// form, at most 223 bytes, no spaces or control characters)?
pub fn looks_like_iscsi_name(v: &str) -> bool {
    let lower = v.get(..4).map(str::to_ascii_lowercase);
    matches!(lower.as_deref(), Some("iqn.") | Some("eui.") | Some("naa."))
        && v.len() > 4
        && v.len() <= 223
        && v.bytes().all(|b| b.is_ascii_graphic())
}

/// Context a [`TextResponder`] answers in.
#[derive(Debug, Clone, Copy)]
pub struct TextContext<'a> {
    /// Targets to advertise.
    pub targets: &'a [SendTargetsEntry],
    /// The session's target in a normal session; `None` in discovery.
    pub session_target: Option<&'a str>,
    /// The initiator's MaxRecvDataSegmentLength (most data per response).
    pub max_send_data_segment_length: u32,
}

/// Target-side text request handler for one connection.
#[derive(Debug, Default)]
pub struct TextResponder {
    /// Exchange in progress: ITT, our TTT, chunks left to send (reversed).
    pending: Option<(u32, u32, Vec<Bytes>)>,
    /// Request text assembled from C-bit PDUs: ITT, our TTT and bytes.
    partial: Option<(u32, u32, BytesMut)>,
    next_ttt: u32,
}

impl TextResponder {
    pub fn new() -> TextResponder {
        TextResponder::default()
    }

    fn alloc_ttt(&mut self) -> u32 {
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        self.next_ttt
    }

    fn reply(
        req: &TextRequest,
        final_bit: bool,
        cont: bool,
        ttt: u32,
        data: Bytes,
    ) -> TextResponse {
        TextResponse {
            final_bit,
            cont,
            lun: req.lun,
            itt: req.itt,
            ttt,
            stat_sn: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
            data,
        }
    }

    /// Answers one Text Request. The caller sets the SNs of the response.
    pub fn handle(
        &mut self,
        req: &TextRequest,
        ctx: &TextContext<'_>,
    ) -> Result<TextResponse, TextError> {
        if req.ttt != RESERVED_TAG {
            // Continuation of a response we split.
            if let Some((itt, ttt, chunks)) = &mut self.pending {
                if *itt == req.itt && *ttt == req.ttt {
                    let chunk = chunks.pop().unwrap_or_default();
                    if chunks.is_empty() {
                        self.pending = None;
                        return Ok(Self::reply(req, true, false, RESERVED_TAG, chunk));
                    }
                    let ttt = *ttt;
                    return Ok(Self::reply(req, false, true, ttt, chunk));
                }
            }
            // Or the next part of a request the initiator split.
            let ours = matches!(&self.partial,
                Some((itt, ttt, _)) if *itt == req.itt && *ttt == req.ttt);
            if !ours {
                return Err(TextError::UnknownTtt(req.ttt));
            }
        } else {
            // A new exchange replaces any response in progress.
            self.pending = None;
            if self
                .partial
                .as_ref()
                .is_some_and(|(itt, _, _)| *itt != req.itt)
            {
                self.partial = None;
            }
        }
        let text = match self.partial.take() {
            Some((itt, ttt, mut buf)) => {
                if buf.len() + req.data.len() > keys::MAX_TEXT_LEN {
                    return Err(TextError::TooLong);
                }
                buf.extend_from_slice(&req.data);
                if req.cont {
                    self.partial = Some((itt, ttt, buf));
                    return Ok(Self::reply(req, false, false, ttt, Bytes::new()));
                }
                buf.freeze()
            }
            None if req.cont => {
                let ttt = self.alloc_ttt();
                self.partial = Some((req.itt, ttt, BytesMut::from(&req.data[..])));
                return Ok(Self::reply(req, false, false, ttt, Bytes::new()));
            }
            None => req.data.clone(),
        };
        let pairs = keys::parse(&text)?;
        let mut out = keys::TextBuilder::new();
        for (k, v) in &pairs {
            if k == "SendTargets" {
                let t = send_targets_text(v, ctx.targets, ctx.session_target);
                out.push_text(&t);
            } else if crate::params::is_operational_key(k) {
                // Operational parameters are not renegotiated in full feature phase.
                out.push(k, "Reject");
            } else {
                out.push(k, "NotUnderstood");
            }
        }
        let text = out.finish();
        let max = (ctx.max_send_data_segment_length as usize).max(512);
        if text.len() <= max {
            return Ok(Self::reply(req, true, false, RESERVED_TAG, text));
        }
        let mut chunks = keys::chunks(&text, max);
        chunks.reverse();
        let first = chunks.pop().unwrap_or_default();
        let ttt = self.alloc_ttt();
        self.pending = Some((req.itt, ttt, chunks));
        Ok(Self::reply(req, false, true, ttt, first))
    }
}

/// A SendTargets Text Request (`value`: `All`, a target name, or empty).
/// SNs are left 0 for the caller to set.
pub fn send_targets_request(itt: u32, value: &str) -> TextRequest {
    let mut b = keys::TextBuilder::new();
    b.push("SendTargets", value);
    TextRequest {
        immediate: false,
        final_bit: true,
        cont: false,
        lun: Lun::default(),
        itt,
        ttt: RESERVED_TAG,
        cmd_sn: 0,
        exp_stat_sn: 0,
        data: b.finish(),
    }
}

/// What the initiator does after a Text Response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextProgress {
    /// Send this (empty) continuation request, then feed the next response.
    Continue(TextRequest),
    /// The exchange is complete: the whole response text (parse it with
    /// [`parse_send_targets`] or [`keys::parse`]).
    Done(Bytes),
}

/// Initiator-side assembly of a (possibly multi-PDU) text response.
#[derive(Debug)]
pub struct TextCollector {
    itt: u32,
    buf: BytesMut,
}

impl TextCollector {
    pub fn new(itt: u32) -> TextCollector {
        TextCollector {
            itt,
            buf: BytesMut::new(),
        }
    }

    /// Feeds one Text Response.
    pub fn push(&mut self, rsp: &TextResponse) -> Result<TextProgress, TextError> {
        if rsp.itt != self.itt {
            return Err(TextError::WrongItt {
                expected: self.itt,
                got: rsp.itt,
            });
        }
        if self.buf.len() + rsp.data.len() > keys::MAX_TEXT_LEN {
            return Err(TextError::TooLong);
        }
        self.buf.extend_from_slice(&rsp.data);
        if rsp.final_bit && !rsp.cont {
            let text = std::mem::take(&mut self.buf).freeze();
            return Ok(TextProgress::Done(text));
        }
        Ok(TextProgress::Continue(TextRequest {
            immediate: false,
            final_bit: true,
            cont: false,
            lun: rsp.lun,
            itt: self.itt,
            ttt: rsp.ttt,
            cmd_sn: 0,
            exp_stat_sn: 0,
            data: Bytes::new(),
        }))
    }
}

/// Parses `TargetName` / `TargetAddress` pairs. Keys may repeat here, so
/// this takes the raw text rather than de-duplicated pairs.
pub fn parse_send_targets(text: &[u8]) -> Result<Vec<SendTargetsEntry>, TextError> {
    let bad = |s: &str| TextError::BadSendTargets(s.to_string());
    let mut out: Vec<SendTargetsEntry> = Vec::new();
    if text.len() > keys::MAX_TEXT_LEN {
        return Err(TextError::TooLong);
    }
    for item in text.split(|&b| b == 0).filter(|i| !i.is_empty()) {
        let s = std::str::from_utf8(item).map_err(|_| bad("not UTF-8"))?;
        let (k, v) = s.split_once('=').ok_or_else(|| bad("pair without '='"))?;
        match k {
            "TargetName" => {
                if v.is_empty() {
                    return Err(bad("empty TargetName"));
                }
                out.push(SendTargetsEntry {
                    name: v.to_string(),
                    addresses: Vec::new(),
                });
            }
            "TargetAddress" => {
                let t = out
                    .last_mut()
                    .ok_or_else(|| bad("TargetAddress before TargetName"))?;
                t.addresses.push(parse_target_address(v)?);
            }
            "SendTargets" if v == "Reject" => return Err(bad("SendTargets rejected")),
            _ => {}
        }
    }
    Ok(out)
}

/// Parses `host[:port][,tpgt]` (IPv6 host in brackets). A missing port is
/// 3260, a missing tag is 1.
pub fn parse_target_address(v: &str) -> Result<(String, u16), TextError> {
    let bad = |s: &str| TextError::BadSendTargets(format!("{s}: {v}"));
    let (hostport, tag) = match v.rsplit_once(',') {
        Some((hp, t)) => {
            let t: u16 = t.parse().map_err(|_| bad("bad portal group tag"))?;
            (hp, t)
        }
        None => (v, 1),
    };
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None if after.is_empty() => DEFAULT_PORT,
            None => return Err(bad("junk after ']'")),
        };
        (format!("[{h}]"), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (hostport.to_string(), DEFAULT_PORT),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(bad("empty host"));
    }
    Ok((format!("{host}:{port}"), tag))
}
