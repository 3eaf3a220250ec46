//! Operational parameter negotiation (RFC 7143 §6.2, §13).
//!
//! [`Negotiation`] plays either side of a negotiation: it answers the
//! peer's offers (list selection, min/max, OR/AND, declarations), checks
//! answers to its own offers against the key's result function, answers
//! `NotUnderstood` for unknown keys and `Irrelevant` for keys that do not
//! apply (discovery sessions, FirstBurstLength without unsolicited data),
//! and yields the [`SessionParams`] in force at the end.

use thiserror::Error;

use crate::keys::parse_number;

/// The negotiated operational parameters of a session/connection, with the
/// RFC 7143 defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// HeaderDigest=CRC32C negotiated.
    pub header_digest: bool,
    /// DataDigest=CRC32C negotiated.
    pub data_digest: bool,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// The MaxRecvDataSegmentLength we declared: the most we accept per PDU.
    pub max_recv_data_segment_length: u32,
    /// The MaxRecvDataSegmentLength the peer declared: the most we may send per PDU.
    pub max_send_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_recv_data_segment_length: 8192,
            max_send_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// A digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Digest {
    None,
    Crc32c,
}

impl Digest {
    pub fn as_str(self) -> &'static str {
        match self {
            Digest::None => "None",
            Digest::Crc32c => "CRC32C",
        }
    }
    fn parse(s: &str) -> Option<Digest> {
        match s {
            "None" => Some(Digest::None),
            "CRC32C" => Some(Digest::Crc32c),
            _ => None,
        }
    }
}

/// Our side's limits and preferences for operational keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationalPrefs {
    /// Acceptable header digests, most preferred first.
    pub header_digest: Vec<Digest>,
    /// Acceptable data digests, most preferred first.
    pub data_digest: Vec<Digest>,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// What we declare we can receive per PDU (512..=2^24-1).
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    /// Highest level we accept; this crate implements 0.
    pub error_recovery_level: u8,
}

impl Default for OperationalPrefs {
    fn default() -> Self {
        OperationalPrefs {
            header_digest: vec![Digest::None, Digest::Crc32c],
            data_digest: vec![Digest::None, Digest::Crc32c],
            max_connections: 1,
            initial_r2t: false,
            immediate_data: true,
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// A negotiation failure: the login must fail with an initiator error
/// (Status 0x0200) when the target detects it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NegotiationError {
    #[error("key {0} negotiated twice")]
    Renegotiated(String),
    #[error("answer {key}={value} violates the result function")]
    BadAnswer { key: String, value: String },
    #[error("invalid declaration {key}={value}")]
    BadDeclaration { key: String, value: String },
}

/// Which side we play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    HeaderDigest,
    DataDigest,
    Min { lo: u32, hi: u32 },
    Max { lo: u32, hi: u32 },
    Or,
    And,
    MaxRecvDsl,
    Marker,
    MarkInt,
    ProtocolLevel,
    TaskReporting,
}

struct KeyDef {
    name: &'static str,
    kind: Kind,
    /// Irrelevant in a discovery session.
    normal_only: bool,
}

const LEN_LO: u32 = 512;
const LEN_HI: u32 = 16_777_215;

const KEYS: &[KeyDef] = &[
    KeyDef {
        name: "HeaderDigest",
        kind: Kind::HeaderDigest,
        normal_only: false,
    },
    KeyDef {
        name: "DataDigest",
        kind: Kind::DataDigest,
        normal_only: false,
    },
    KeyDef {
        name: "MaxConnections",
        kind: Kind::Min { lo: 1, hi: 65535 },
        normal_only: true,
    },
    KeyDef {
        name: "InitialR2T",
        kind: Kind::Or,
        normal_only: true,
    },
    KeyDef {
        name: "ImmediateData",
        kind: Kind::And,
        normal_only: true,
    },
    KeyDef {
        name: "MaxRecvDataSegmentLength",
        kind: Kind::MaxRecvDsl,
        normal_only: false,
    },
    KeyDef {
        name: "MaxBurstLength",
        kind: Kind::Min {
            lo: LEN_LO,
            hi: LEN_HI,
        },
        normal_only: true,
    },
    KeyDef {
        name: "FirstBurstLength",
        kind: Kind::Min {
            lo: LEN_LO,
            hi: LEN_HI,
        },
        normal_only: true,
    },
    KeyDef {
        name: "DefaultTime2Wait",
        kind: Kind::Max { lo: 0, hi: 3600 },
        normal_only: false,
    },
    KeyDef {
        name: "DefaultTime2Retain",
        kind: Kind::Min { lo: 0, hi: 3600 },
        normal_only: false,
    },
    KeyDef {
        name: "MaxOutstandingR2T",
        kind: Kind::Min { lo: 1, hi: 65535 },
        normal_only: true,
    },
    KeyDef {
        name: "DataPDUInOrder",
        kind: Kind::Or,
        normal_only: true,
    },
    KeyDef {
        name: "DataSequenceInOrder",
        kind: Kind::Or,
        normal_only: true,
    },
    KeyDef {
        name: "ErrorRecoveryLevel",
        kind: Kind::Min { lo: 0, hi: 2 },
        normal_only: false,
    },
    KeyDef {
        name: "IFMarker",
        kind: Kind::Marker,
        normal_only: false,
    },
    KeyDef {
        name: "OFMarker",
        kind: Kind::Marker,
        normal_only: false,
    },
    KeyDef {
        name: "IFMarkInt",
        kind: Kind::MarkInt,
        normal_only: false,
    },
    KeyDef {
        name: "OFMarkInt",
        kind: Kind::MarkInt,
        normal_only: false,
    },
    KeyDef {
        name: "iSCSIProtocolLevel",
        kind: Kind::ProtocolLevel,
        normal_only: false,
    },
    KeyDef {
        name: "TaskReporting",
        kind: Kind::TaskReporting,
        normal_only: true,
    },
];

/// The iSCSIProtocolLevel this crate implements (RFC 7144: 1 = RFC 7143).
pub const PROTOCOL_LEVEL: u32 = 1;

fn def(name: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|d| d.name == name)
}

/// True for a key this module negotiates.
pub fn is_operational_key(name: &str) -> bool {
    def(name).is_some()
}

fn is_special(v: &str) -> bool {
    matches!(v, "NotUnderstood" | "Irrelevant" | "Reject")
}

fn yes_no(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yn(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// One side of an operational negotiation.
#[derive(Debug, Clone)]
pub struct Negotiation {
    role: Role,
    prefs: OperationalPrefs,
    discovery: bool,
    params: SessionParams,
    /// Keys we offered, with the value offered, awaiting an answer.
    pending: Vec<(&'static str, String)>,
    settled: Vec<&'static str>,
    declared_mrdsl: bool,
}

impl Negotiation {
    /// Starts a negotiation with RFC defaults in force.
    pub fn new(role: Role, prefs: OperationalPrefs, discovery: bool) -> Negotiation {
        let params = SessionParams::default();
        Negotiation {
            role,
            prefs,
            discovery,
            params,
            pending: Vec::new(),
            settled: Vec::new(),
            declared_mrdsl: false,
        }
    }

    /// Switches to discovery mode (SessionType=Discovery seen).
    pub fn set_discovery(&mut self, discovery: bool) {
        self.discovery = discovery;
    }

    /// The values in force now.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// True while some of our offers are unanswered.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn settle(&mut self, name: &'static str) {
        if !self.settled.contains(&name) {
            self.settled.push(name);
        }
    }

    /// Our own offers and declarations not yet sent: the initiator offers
    /// every relevant key; both sides declare MaxRecvDataSegmentLength.
    pub fn offers(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.declared_mrdsl {
            self.declared_mrdsl = true;
            let v = self
                .prefs
                .max_recv_data_segment_length
                .clamp(LEN_LO, LEN_HI);
            self.params.max_recv_data_segment_length = v;
            out.push(("MaxRecvDataSegmentLength".to_string(), v.to_string()));
        }
        if self.role == Role::Target {
            return out;
        }
        let p = self.prefs.clone();
        let list = |l: &[Digest]| -> String {
            let v: Vec<&str> = l.iter().map(|d| d.as_str()).collect();
            if v.is_empty() {
                "None".to_string()
            } else {
                v.join(",")
            }
        };
        let candidates: Vec<(&'static str, String)> = vec![
            ("HeaderDigest", list(&p.header_digest)),
            ("DataDigest", list(&p.data_digest)),
            ("MaxConnections", p.max_connections.to_string()),
            ("InitialR2T", yn(p.initial_r2t)),
            ("ImmediateData", yn(p.immediate_data)),
            ("MaxBurstLength", p.max_burst_length.to_string()),
            ("FirstBurstLength", p.first_burst_length.to_string()),
            ("DefaultTime2Wait", p.default_time2wait.to_string()),
            ("DefaultTime2Retain", p.default_time2retain.to_string()),
            ("MaxOutstandingR2T", p.max_outstanding_r2t.to_string()),
            ("DataPDUInOrder", yn(p.data_pdu_in_order)),
            ("DataSequenceInOrder", yn(p.data_sequence_in_order)),
            ("ErrorRecoveryLevel", p.error_recovery_level.to_string()),
        ];
        for (k, v) in candidates {
            let d = match def(k) {
                Some(d) => d,
                None => continue,
            };
            if (self.discovery && d.normal_only)
                || self.settled.contains(&k)
                || self.pending.iter().any(|(pk, _)| *pk == k)
            {
                continue;
            }
            // FirstBurstLength is irrelevant without unsolicited data.
            if k == "FirstBurstLength" && p.initial_r2t && !p.immediate_data {
                continue;
            }
            self.pending.push((k, v.clone()));
            out.push((k.to_string(), v));
        }
        out
    }

    /// Processes the peer's keys (offers, answers to our offers and
    /// declarations) and returns our answers. Keys this module does not
    /// know are answered `NotUnderstood`; the login layer removes the
    /// login/security keys it handles itself before calling this.
    pub fn process(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, NegotiationError> {
        let mut out = Vec::new();
        let mut deferred: Option<&(String, String)> = None;
        for pair in pairs {
            if pair.0 == "FirstBurstLength" {
                deferred = Some(pair);
                continue;
            }
            self.one(&pair.0, &pair.1, &mut out)?;
        }
        if let Some((k, v)) = deferred {
            self.one(k, v, &mut out)?;
        }
        Ok(out)
    }

    fn one(
        &mut self,
        key: &str,
        value: &str,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), NegotiationError> {
        let d = match def(key) {
            Some(d) => d,
            None => {
                if !is_special(value) {
                    out.push((key.to_string(), "NotUnderstood".to_string()));
                }
                return Ok(());
            }
        };
        let name = d.name;
        if let Some(pos) = self.pending.iter().position(|(k, _)| *k == name) {
            let (_, offered) = self.pending.remove(pos);
            self.settle(name);
            if is_special(value) {
                return Ok(());
            }
            return self.apply_answer(d, &offered, value);
        }
        if d.kind == Kind::MaxRecvDsl {
            // Declarative: each side states its own; a repeat is an error.
            if self.settled.contains(&name) {
                return Err(NegotiationError::Renegotiated(key.to_string()));
            }
            self.settle(name);
            match parse_number(value) {
                Some(n) if (u64::from(LEN_LO)..=u64::from(LEN_HI)).contains(&n) => {
                    self.params.max_send_data_segment_length = n as u32;
                    Ok(())
                }
                _ => Err(NegotiationError::BadDeclaration {
                    key: key.to_string(),
                    value: value.to_string(),
                }),
            }
        } else {
            if self.settled.contains(&name) {
                return Err(NegotiationError::Renegotiated(key.to_string()));
            }
            self.settle(name);
            if is_special(value) {
                // Not an offer; nothing to answer.
                return Ok(());
            }
            let irrelevant = (self.discovery && d.normal_only)
                || (name == "FirstBurstLength"
                    && self.params.initial_r2t
                    && !self.params.immediate_data);
            let answer = if irrelevant {
                "Irrelevant".to_string()
            } else {
                self.answer_offer(d, value)
            };
            out.push((key.to_string(), answer));
            Ok(())
        }
    }

    /// Computes and applies our answer to a peer's offer.
    fn answer_offer(&mut self, d: &KeyDef, value: &str) -> String {
        let reject = || "Reject".to_string();
        match d.kind {
            Kind::HeaderDigest | Kind::DataDigest => {
                let ours = if d.kind == Kind::HeaderDigest {
                    &self.prefs.header_digest
                } else {
                    &self.prefs.data_digest
                };
                let pick = value
                    .split(',')
                    .filter_map(Digest::parse)
                    .find(|dg| ours.contains(dg));
                match pick {
                    Some(dg) => {
                        self.set_digest(d.kind, dg);
                        dg.as_str().to_string()
                    }
                    None => reject(),
                }
            }
            Kind::Min { lo, hi } | Kind::Max { lo, hi } => {
                let n = match parse_number(value) {
                    Some(n) if n >= u64::from(lo) && n <= u64::from(hi) => n as u32,
                    _ => return reject(),
                };
                let ours = self.pref_num(d.name);
                let r = if matches!(d.kind, Kind::Min { .. }) {
                    n.min(ours)
                } else {
                    n.max(ours)
                };
                self.set_num(d.name, r);
                r.to_string()
            }
            Kind::Or | Kind::And => {
                let b = match yes_no(value) {
                    Some(b) => b,
                    None => return reject(),
                };
                let ours = self.pref_bool(d.name);
                let r = if d.kind == Kind::Or {
                    b || ours
                } else {
                    b && ours
                };
                self.set_bool(d.name, r);
                yn(r)
            }
            Kind::Marker => match yes_no(value) {
                Some(_) => "No".to_string(),
                None => reject(),
            },
            Kind::MarkInt => "Irrelevant".to_string(),
            Kind::ProtocolLevel => match parse_number(value) {
                Some(n) if n <= 31 => (n as u32).min(PROTOCOL_LEVEL).to_string(),
                _ => reject(),
            },
            Kind::TaskReporting => {
                if value.split(',').any(|v| v == "RFC3720") {
                    "RFC3720".to_string()
                } else {
                    reject()
                }
            }
            Kind::MaxRecvDsl => reject(),
        }
    }

    /// Checks and applies the peer's answer to our offer.
    fn apply_answer(
        &mut self,
        d: &KeyDef,
        offered: &str,
        value: &str,
    ) -> Result<(), NegotiationError> {
        let bad = || NegotiationError::BadAnswer {
            key: d.name.to_string(),
            value: value.to_string(),
        };
        match d.kind {
            Kind::HeaderDigest | Kind::DataDigest => {
                let dg = Digest::parse(value).ok_or_else(bad)?;
                if !offered.split(',').any(|o| o == value) {
                    // Some targets (tgt) answer None instead of Reject when
                    // they accept none of our digests; None is what a Reject
                    // leaves in force, so that answer is taken as a Reject.
                    if dg == Digest::None {
                        return Ok(());
                    }
                    return Err(bad());
                }
                self.set_digest(d.kind, dg);
            }
            Kind::Min { lo, hi } | Kind::Max { lo, hi } => {
                let n = parse_number(value)
                    .filter(|n| *n >= u64::from(lo) && *n <= u64::from(hi))
                    .ok_or_else(bad)? as u32;
                let o = parse_number(offered).unwrap_or(0) as u32;
                let ok = if matches!(d.kind, Kind::Min { .. }) {
                    n <= o
                } else {
                    n >= o
                };
                if !ok {
                    return Err(bad());
                }
                self.set_num(d.name, n);
            }
            Kind::Or | Kind::And => {
                let b = yes_no(value).ok_or_else(bad)?;
                let o = yes_no(offered).unwrap_or(false);
                if (d.kind == Kind::Or && o && !b) || (d.kind == Kind::And && !o && b) {
                    return Err(bad());
                }
                self.set_bool(d.name, b);
            }
            _ => {}
        }
        Ok(())
    }

    fn set_digest(&mut self, kind: Kind, dg: Digest) {
        let on = dg == Digest::Crc32c;
        if kind == Kind::HeaderDigest {
            self.params.header_digest = on;
        } else {
            self.params.data_digest = on;
        }
    }

    fn pref_num(&self, name: &str) -> u32 {
        let p = &self.prefs;
        match name {
            "MaxConnections" => u32::from(p.max_connections),
            "MaxBurstLength" => p.max_burst_length,
            "FirstBurstLength" => p.first_burst_length,
            "DefaultTime2Wait" => u32::from(p.default_time2wait),
            "DefaultTime2Retain" => u32::from(p.default_time2retain),
            "MaxOutstandingR2T" => u32::from(p.max_outstanding_r2t),
            "ErrorRecoveryLevel" => u32::from(p.error_recovery_level),
            _ => 0,
        }
    }

    fn set_num(&mut self, name: &str, v: u32) {
        let p = &mut self.params;
        let v16 = u16::try_from(v).unwrap_or(u16::MAX);
        match name {
            "MaxConnections" => p.max_connections = v16,
            "MaxBurstLength" => p.max_burst_length = v,
            "FirstBurstLength" => p.first_burst_length = v,
            "DefaultTime2Wait" => p.default_time2wait = v16,
            "DefaultTime2Retain" => p.default_time2retain = v16,
            "MaxOutstandingR2T" => p.max_outstanding_r2t = v16,
            "ErrorRecoveryLevel" => p.error_recovery_level = u8::try_from(v).unwrap_or(u8::MAX),
            _ => {}
        }
    }

    fn pref_bool(&self, name: &str) -> bool {
        let p = &self.prefs;
        match name {
            "InitialR2T" => p.initial_r2t,
            "ImmediateData" => p.immediate_data,
            "DataPDUInOrder" => p.data_pdu_in_order,
            "DataSequenceInOrder" => p.data_sequence_in_order,
            _ => false,
        }
    }

    fn set_bool(&mut self, name: &str, v: bool) {
        let p = &mut self.params;
        match name {
            "InitialR2T" => p.initial_r2t = v,
            "ImmediateData" => p.immediate_data = v,
            "DataPDUInOrder" => p.data_pdu_in_order = v,
            "DataSequenceInOrder" => p.data_sequence_in_order = v,
            _ => {}
        }
    }

    /// The final parameters. FirstBurstLength never exceeds MaxBurstLength.
    pub fn finish(&self) -> SessionParams {
        let mut p = self.params.clone();
        if p.first_burst_length > p.max_burst_length {
            p.first_burst_length = p.max_burst_length;
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn target(prefs: OperationalPrefs) -> Negotiation {
        Negotiation::new(Role::Target, prefs, false)
    }

    #[test]
    fn list_selection_follows_proposer_order() {
        let mut t = target(OperationalPrefs::default());
        let a = t
            .process(&pairs(&[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "None"),
            ]))
            .unwrap();
        assert_eq!(
            a,
            pairs(&[("HeaderDigest", "CRC32C"), ("DataDigest", "None")])
        );
        assert!(t.params().header_digest && !t.params().data_digest);

        let mut t = target(OperationalPrefs {
            header_digest: vec![Digest::None],
            ..OperationalPrefs::default()
        });
        let a = t.process(&pairs(&[("HeaderDigest", "CRC32C")])).unwrap();
        assert_eq!(a, pairs(&[("HeaderDigest", "Reject")]));
        assert!(!t.params().header_digest);
    }

    #[test]
    fn min_max_or_and() {
        let mut t = target(OperationalPrefs {
            max_burst_length: 65536,
            initial_r2t: false,
            immediate_data: true,
            default_time2wait: 5,
            default_time2retain: 10,
            ..OperationalPrefs::default()
        });
        let a = t
            .process(&pairs(&[
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "1048576"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "20"),
                ("MaxOutstandingR2T", "8"),
                ("ErrorRecoveryLevel", "2"),
                ("DataPDUInOrder", "No"),
                ("MaxConnections", "4"),
            ]))
            .unwrap();
        // InitialR2T=Yes and ImmediateData=No: FirstBurstLength irrelevant,
        // even though it came first in the PDU.
        assert_eq!(
            a,
            pairs(&[
                ("MaxBurstLength", "65536"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("DefaultTime2Wait", "5"),
                ("DefaultTime2Retain", "10"),
                ("MaxOutstandingR2T", "1"),
                ("ErrorRecoveryLevel", "0"),
                ("DataPDUInOrder", "Yes"),
                ("MaxConnections", "1"),
                ("FirstBurstLength", "Irrelevant"),
            ])
        );
        let p = t.finish();
        assert_eq!(p.max_burst_length, 65536);
        assert_eq!(p.first_burst_length, 65536); // default clamped to MaxBurstLength
        assert!(p.initial_r2t && !p.immediate_data);
        assert_eq!(p.error_recovery_level, 0);
    }

    #[test]
    fn declarations_unknown_and_bad_values() {
        let mut t = target(OperationalPrefs::default());
        let a = t
            .process(&pairs(&[
                ("MaxRecvDataSegmentLength", "65536"),
                ("X-com.example.Foo", "1"),
                ("MaxBurstLength", "100"),
                ("InitialR2T", "Maybe"),
                ("IFMarker", "No"),
                ("OFMarkInt", "2048~8192"),
            ]))
            .unwrap();
        assert_eq!(
            a,
            pairs(&[
                ("X-com.example.Foo", "NotUnderstood"),
                ("MaxBurstLength", "Reject"),
                ("InitialR2T", "Reject"),
                ("IFMarker", "No"),
                ("OFMarkInt", "Irrelevant"),
            ])
        );
        assert_eq!(t.params().max_send_data_segment_length, 65536);
        assert_eq!(t.params().max_burst_length, 262_144);
        let offers = t.offers();
        assert_eq!(offers, pairs(&[("MaxRecvDataSegmentLength", "262144")]));
        assert!(t.offers().is_empty());
        // repeats are errors
        assert!(matches!(
            t.process(&pairs(&[("MaxBurstLength", "512")])),
            Err(NegotiationError::Renegotiated(_))
        ));
        assert!(matches!(
            t.process(&pairs(&[("MaxRecvDataSegmentLength", "512")])),
            Err(NegotiationError::Renegotiated(_))
        ));
        let mut t = target(OperationalPrefs::default());
        assert!(matches!(
            t.process(&pairs(&[("MaxRecvDataSegmentLength", "100")])),
            Err(NegotiationError::BadDeclaration { .. })
        ));
    }

    #[test]
    fn discovery_irrelevant_keys() {
        let mut t = Negotiation::new(Role::Target, OperationalPrefs::default(), true);
        let a = t
            .process(&pairs(&[
                ("InitialR2T", "No"),
                ("MaxBurstLength", "1024"),
                ("HeaderDigest", "None"),
            ]))
            .unwrap();
        assert_eq!(
            a,
            pairs(&[
                ("InitialR2T", "Irrelevant"),
                ("MaxBurstLength", "Irrelevant"),
                ("HeaderDigest", "None"),
            ])
        );
    }

    #[test]
    fn initiator_checks_answers() {
        let mut i = Negotiation::new(Role::Initiator, OperationalPrefs::default(), false);
        let offers = i.offers();
        assert!(offers.iter().any(|(k, _)| k == "ImmediateData"));
        let mut t = target(OperationalPrefs {
            max_burst_length: 131072,
            ..OperationalPrefs::default()
        });
        let answers = t.process(&offers).unwrap();
        let mut all = answers.clone();
        all.extend(t.offers());
        assert!(i.process(&all).unwrap().is_empty());
        assert!(!i.has_pending());
        let (pi, pt) = (i.finish(), t.finish());
        assert_eq!(pi.max_burst_length, 131072);
        assert_eq!(pt.max_burst_length, 131072);
        assert_eq!(
            pi.max_send_data_segment_length,
            pt.max_recv_data_segment_length
        );
        assert_eq!(
            pt.max_send_data_segment_length,
            pi.max_recv_data_segment_length
        );
        assert_eq!(pi.immediate_data, pt.immediate_data);

        // a target answering more than a Min offer is violating the rules
        let mut i = Negotiation::new(Role::Initiator, OperationalPrefs::default(), false);
        i.offers();
        assert!(matches!(
            i.process(&pairs(&[("MaxBurstLength", "2097152")])),
            Err(NegotiationError::BadAnswer { .. })
        ));
        let mut i = Negotiation::new(Role::Initiator, OperationalPrefs::default(), false);
        i.offers();
        // we offered ImmediateData=Yes, DataPDUInOrder=Yes: No is fine for AND, not for OR
        assert!(i.process(&pairs(&[("ImmediateData", "No")])).is_ok());
        assert!(i.process(&pairs(&[("DataPDUInOrder", "No")])).is_err());
        let mut i = Negotiation::new(Role::Initiator, OperationalPrefs::default(), false);
        i.offers();
        assert!(i.process(&pairs(&[("HeaderDigest", "MD5")])).is_err());
        // CRC32C-only offer answered None: taken as a Reject, digest stays off;
        // answered CRC32C when we offered only None: violation.
        let mut i = Negotiation::new(
            Role::Initiator,
            OperationalPrefs {
                header_digest: vec![Digest::Crc32c],
                data_digest: vec![Digest::None],
                ..OperationalPrefs::default()
            },
            false,
        );
        i.offers();
        assert!(i.process(&pairs(&[("HeaderDigest", "None")])).is_ok());
        assert!(!i.params().header_digest);
        assert!(i.process(&pairs(&[("DataDigest", "CRC32C")])).is_err());
    }
}
