//! The stored form of one LU's cluster state: the engine's
//! [`StateRecord`] (the whole state, not only the APTPL part), the SPC-2
//! holder and the lost-reservation flag, plus a bounded log of the unit
//! attentions of recent changes. JSON with a `format` tag so that a
//! change of format is detected instead of misread.

use keyfence_pr::state::{NexusRecord, StateRecord};
use keyfence_pr::PrState;
use keyfence_scsi::sense::Asc;
use keyfence_scsi::{InitiatorPort, Nexus, TargetPort};
use serde::{Deserialize, Serialize};

/// The `format` of a state record written by this version.
pub const FORMAT: &str = "keyfence-cluster-pr/1";

/// Changes whose unit attentions a record keeps: a gateway that fell
/// further behind than this cannot deliver the UAs it missed and must
/// treat its nexuses on the LU as lost (see docs/cluster.md).
pub const UA_LOG_CHANGES: u64 = 64;

/// Most unit-attention entries a record keeps (bounds the value size).
pub const UA_LOG_ENTRIES: usize = 4096;

/// A unit attention established by the change numbered `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitAttention {
    pub seq: u64,
    /// The I_T nexus it is for; `None`: every I_T nexus of the LU
    /// (e.g. the power-on condition of a cluster-wide power cycle).
    pub nexus: Option<Nexus>,
    pub asc: Asc,
}

/// One LU's state as committed in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuState {
    /// Mod revision of the state key; `0`: no record (never written, or
    /// removed).
    pub revision: i64,
    /// Revision of the cluster at which this was read (≥ `revision`).
    /// A watch started after a read resumes from `read_at + 1`.
    pub read_at: i64,
    /// Number of committed changes (1 for the first record).
    pub seq: u64,
    /// Gateway that committed it.
    pub writer: String,
    /// The whole PR state: registrations, reservation, APTPL,
    /// PRgeneration, SPC-2 holder, lost-reservation condition.
    pub state: PrState,
    /// Unit attentions of the last [`UA_LOG_CHANGES`] changes, oldest first.
    pub unit_attentions: Vec<UnitAttention>,
    /// Every unit attention of the changes numbered from this one on is
    /// in `unit_attentions`.
    pub ua_complete_from: u64,
    /// I_T nexuses whose tasks the change numbered `seq` aborts (PREEMPT
    /// AND ABORT): each gateway aborts those logged in through it before
    /// it acknowledges the revision.
    pub aborts: Vec<Nexus>,
    /// Identifies the commit (recognises our own write after a lost answer).
    pub(crate) nonce: u64,
}

/// What the unit attentions since a given change are, for a gateway
/// catching up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UaCatchUp<'a> {
    /// Every unit attention of the changes after the one asked for.
    Complete(Vec<&'a UnitAttention>),
    /// The log no longer reaches back that far: some were dropped.
    Gap,
}

impl LuState {
    /// The state of an LU without a record (power-on state, no history).
    pub fn absent(read_at: i64) -> LuState {
        LuState {
            revision: 0,
            read_at,
            seq: 0,
            writer: String::new(),
            state: PrState::default(),
            unit_attentions: Vec::new(),
            ua_complete_from: 1,
            aborts: Vec::new(),
            nonce: 0,
        }
    }

    /// The unit attentions of changes numbered above `applied_seq`.
    pub fn unit_attentions_after(&self, applied_seq: u64) -> UaCatchUp<'_> {
        if applied_seq >= self.seq {
            return UaCatchUp::Complete(Vec::new());
        }
        if applied_seq + 1 < self.ua_complete_from {
            return UaCatchUp::Gap;
        }
        UaCatchUp::Complete(
            self.unit_attentions
                .iter()
                .filter(|u| u.seq > applied_seq)
                .collect(),
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UaRecord {
    seq: u64,
    nexus: Option<NexusRecord>,
    /// ASC and ASCQ as four hex digits.
    asc: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    format: String,
    lu: String,
    seq: u64,
    writer: String,
    /// 16 hex digits.
    nonce: String,
    state: StateRecord,
    spc2: Option<NexusRecord>,
    lost: bool,
    ua_complete_from: u64,
    unit_attentions: Vec<UaRecord>,
    aborts: Vec<NexusRecord>,
}

#[derive(Deserialize)]
struct FormatOnly {
    format: Option<String>,
}

/// The contents of a record, before it has a revision.
#[derive(Debug, Clone)]
pub(crate) struct Contents<'a> {
    pub lu: &'a str,
    pub seq: u64,
    pub writer: &'a str,
    pub nonce: u64,
    pub state: &'a PrState,
    pub unit_attentions: &'a [UnitAttention],
    pub ua_complete_from: u64,
    pub aborts: &'a [Nexus],
}

pub(crate) fn encode(c: &Contents<'_>) -> Vec<u8> {
    let stored = Stored {
        format: FORMAT.into(),
        lu: c.lu.to_owned(),
        seq: c.seq,
        writer: c.writer.to_owned(),
        nonce: format!("{:016x}", c.nonce),
        state: StateRecord::from(c.state.clone()),
        spc2: c.state.spc2.as_ref().map(NexusRecord::from),
        lost: c.state.lost,
        ua_complete_from: c.ua_complete_from,
        unit_attentions: c
            .unit_attentions
            .iter()
            .map(|u| UaRecord {
                seq: u.seq,
                nexus: u.nexus.as_ref().map(NexusRecord::from),
                asc: format!("{:02x}{:02x}", u.asc.0, u.asc.1),
            })
            .collect(),
        aborts: c.aborts.iter().map(NexusRecord::from).collect(),
    };
    // Serialising plain structs of strings and integers cannot fail.
    serde_json::to_vec(&stored).unwrap_or_default()
}

fn nexus_of(r: &NexusRecord) -> Result<Nexus, String> {
    if r.isid.len() > 12 {
        return Err(format!("bad ISID {:?}", r.isid));
    }
    let isid = u64::from_str_radix(&r.isid, 16).map_err(|_| format!("bad ISID {:?}", r.isid))?;
    Ok(Nexus::new(
        InitiatorPort::new(&r.initiator, isid),
        TargetPort::new(&r.target, r.tpgt, r.relative_target_port),
    ))
}

/// Decode the value of `lu`'s state key. Every failure is a reason string
/// for [`crate::Error::Corrupt`].
pub(crate) fn decode(
    lu: &str,
    value: &[u8],
    revision: i64,
    read_at: i64,
) -> Result<LuState, String> {
    let f: FormatOnly = serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
    match f.format.as_deref() {
        Some(FORMAT) => {}
        Some(other) => {
            return Err(format!(
                "unknown format {other:?} (this build reads {FORMAT:?})"
            ))
        }
        None => return Err("no format field".into()),
    }
    let s: Stored = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    if s.lu != lu {
        return Err(format!("record names LU {:?}", s.lu));
    }
    s.state.validate()?;
    let nonce =
        u64::from_str_radix(&s.nonce, 16).map_err(|_| format!("bad nonce {:?}", s.nonce))?;
    let mut state = PrState::from(s.state);
    state.spc2 = s.spc2.as_ref().map(nexus_of).transpose()?;
    state.lost = s.lost;
    let mut unit_attentions = Vec::with_capacity(s.unit_attentions.len());
    let mut last = 0;
    for u in &s.unit_attentions {
        if u.seq < last || u.seq > s.seq {
            return Err(format!("unit attention log out of order at seq {}", u.seq));
        }
        last = u.seq;
        let code = (u.asc.len() == 4)
            .then(|| u16::from_str_radix(&u.asc, 16).ok())
            .flatten()
            .ok_or_else(|| format!("bad ASC/ASCQ {:?}", u.asc))?;
        unit_attentions.push(UnitAttention {
            seq: u.seq,
            nexus: u.nexus.as_ref().map(nexus_of).transpose()?,
            asc: Asc((code >> 8) as u8, code as u8),
        });
    }
    Ok(LuState {
        revision,
        read_at,
        seq: s.seq,
        writer: s.writer,
        state,
        unit_attentions,
        ua_complete_from: s.ua_complete_from,
        aborts: s.aborts.iter().map(nexus_of).collect::<Result<_, _>>()?,
        nonce,
    })
}

/// The unit-attention log after change `seq` added `new`, and the first
/// change it is complete from: entries of the last [`UA_LOG_CHANGES`]
/// changes, at most [`UA_LOG_ENTRIES`].
pub(crate) fn next_ua_log(
    old: &[UnitAttention],
    old_complete_from: u64,
    seq: u64,
    new: Vec<UnitAttention>,
) -> (Vec<UnitAttention>, u64) {
    let keep_from = seq.saturating_sub(UA_LOG_CHANGES - 1).max(1);
    let mut complete_from = old_complete_from.max(keep_from);
    let mut log: Vec<UnitAttention> = old.iter().filter(|u| u.seq >= keep_from).cloned().collect();
    log.extend(new);
    if log.len() > UA_LOG_ENTRIES {
        log.drain(..log.len() - UA_LOG_ENTRIES);
        // The oldest change left may have lost some of its entries.
        complete_from = complete_from.max(log[0].seq + 1);
    }
    (log, complete_from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfence_pr::{PrType, Registration, Reservation};
    use keyfence_scsi::sense::asc;

    fn nexus(i: &str, isid: u64) -> Nexus {
        Nexus::new(InitiatorPort::new(i, isid), TargetPort::new("iqn.t", 2, 5))
    }

    fn sample() -> PrState {
        let a = nexus("iqn.a", 0x23d000000001);
        PrState {
            generation: 9,
            aptpl: false,
            registrations: vec![Registration {
                nexus: a.clone(),
                key: 0xabc,
                all_tg_pt: true,
            }],
            reservation: Some(Reservation {
                pr_type: PrType::ExclusiveAccess,
                holder: Some(a.clone()),
            }),
            lost: true,
            spc2: Some(nexus("iqn.b", 7)),
        }
    }

    #[test]
    fn whole_state_round_trips_without_aptpl() {
        let st = sample();
        let uas = vec![
            UnitAttention {
                seq: 3,
                nexus: Some(nexus("iqn.c", 1)),
                asc: asc::RESERVATIONS_PREEMPTED,
            },
            UnitAttention {
                seq: 3,
                nexus: None,
                asc: Asc(0x29, 0x01),
            },
        ];
        let bytes = encode(&Contents {
            lu: "lu1",
            seq: 3,
            writer: "gw1",
            nonce: 0xfeed,
            state: &st,
            unit_attentions: &uas,
            ua_complete_from: 1,
            aborts: std::slice::from_ref(&st.registrations[0].nexus),
        });
        let back = decode("lu1", &bytes, 17, 20).unwrap();
        // Not only the APTPL part: a non-APTPL state is kept whole.
        assert_eq!(back.state, st);
        assert_eq!(back.unit_attentions, uas);
        assert_eq!(back.aborts, [st.registrations[0].nexus.clone()]);
        assert_eq!((back.revision, back.read_at, back.seq), (17, 20, 3));
        assert_eq!((back.writer.as_str(), back.nonce), ("gw1", 0xfeed));
    }

    #[test]
    fn format_changes_and_damage_are_detected() {
        let st = sample();
        let good = encode(&Contents {
            lu: "lu1",
            seq: 1,
            writer: "g",
            nonce: 1,
            state: &st,
            unit_attentions: &[],
            ua_complete_from: 1,
            aborts: &[],
        });
        let text = String::from_utf8(good.clone()).unwrap();
        let future = text.replace(FORMAT, "keyfence-cluster-pr/2");
        assert!(decode("lu1", future.as_bytes(), 1, 1)
            .unwrap_err()
            .contains("unknown format"));
        assert!(decode("lu2", &good, 1, 1).unwrap_err().contains("names LU"));
        assert!(decode("lu1", b"{}", 1, 1)
            .unwrap_err()
            .contains("no format"));
        assert!(decode("lu1", b"\xff", 1, 1)
            .unwrap_err()
            .contains("not JSON"));
        let extra = text.replacen('{', "{\"surprise\":1,", 1);
        assert!(decode("lu1", extra.as_bytes(), 1, 1)
            .unwrap_err()
            .contains("surprise"));
        let bad_key = text.replace("0000000000000abc", "zz");
        assert!(decode("lu1", bad_key.as_bytes(), 1, 1)
            .unwrap_err()
            .contains("key"));
    }

    #[test]
    fn ua_log_is_bounded_and_reports_gaps() {
        let mut log = Vec::new();
        let mut from = 1;
        for seq in 1..=200u64 {
            let new = vec![UnitAttention {
                seq,
                nexus: None,
                asc: asc::RESERVATIONS_RELEASED,
            }];
            (log, from) = next_ua_log(&log, from, seq, new);
        }
        assert_eq!(log.len() as u64, UA_LOG_CHANGES);
        assert_eq!(from, 200 - UA_LOG_CHANGES + 1);
        let st = LuState {
            seq: 200,
            unit_attentions: log,
            ua_complete_from: from,
            ..LuState::absent(0)
        };
        match st.unit_attentions_after(190) {
            UaCatchUp::Complete(v) => assert_eq!(
                v.iter().map(|u| u.seq).collect::<Vec<_>>(),
                (191..=200).collect::<Vec<_>>()
            ),
            UaCatchUp::Gap => panic!("gap reported within the log"),
        }
        assert_eq!(st.unit_attentions_after(200), UaCatchUp::Complete(vec![]));
        assert_eq!(
            st.unit_attentions_after(200 - UA_LOG_CHANGES),
            UaCatchUp::Complete(st.unit_attentions.iter().collect())
        );
        assert_eq!(st.unit_attentions_after(100), UaCatchUp::Gap);
        // Truncation by entry count moves the completeness mark.
        let many: Vec<UnitAttention> = (0..UA_LOG_ENTRIES + 10)
            .map(|_| UnitAttention {
                seq: 5,
                nexus: None,
                asc: asc::RESERVATIONS_RELEASED,
            })
            .collect();
        let (log, from) = next_ua_log(&[], 1, 5, many);
        assert_eq!((log.len(), from), (UA_LOG_ENTRIES, 6));
    }
}
