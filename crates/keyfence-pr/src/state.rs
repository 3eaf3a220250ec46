//! The persistent-reservation state of one logical unit and its stable
//! (serde) representation.

use serde::{Deserialize, Serialize};

use keyfence_scsi::pr_data::PrType;
use keyfence_scsi::{InitiatorPort, Nexus, TargetPort};

/// One registered I_T nexus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub nexus: Nexus,
    pub key: u64,
    /// Created by a registration with ALL_TG_PT set (reported in READ
    /// FULL STATUS).
    pub all_tg_pt: bool,
}

/// The persistent reservation (scope is always LU_SCOPE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub pr_type: PrType,
    /// The holding I_T nexus; `None` for the all-registrants types, where
    /// every registered I_T nexus is a holder (SPC-4 5.12.10).
    pub holder: Option<Nexus>,
}

/// PR state of one logical unit. Cheap to clone; the engine never mutates
/// a state in place but returns the successor, so a caller whose store
/// fails simply keeps the old one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "StateRecord", from = "StateRecord")]
pub struct PrState {
    /// PRgeneration (SPC-4 6.15.2), a wrapping 32-bit counter.
    pub generation: u32,
    /// The last valid APTPL bit received (persist through power loss).
    pub aptpl: bool,
    /// Registrations in the order they were made (READ KEYS order).
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
    /// Recoverable lost persistent reservation condition (SPC-5
    /// 5.13.5.3.2): set when persisted state could not be restored;
    /// cleared by REPLACE LOST RESERVATION. Not persisted.
    pub lost: bool,
    /// SPC-2 RESERVE(6)/(10) reservation holder. Not persisted: SPC-2
    /// reservations end with nexus loss and resets.
    pub spc2: Option<Nexus>,
}

impl PrState {
    pub fn registration(&self, nexus: &Nexus) -> Option<&Registration> {
        self.registrations.iter().find(|r| &r.nexus == nexus)
    }

    pub fn is_registered(&self, nexus: &Nexus) -> bool {
        self.registration(nexus).is_some()
    }

    /// Is `nexus` a persistent reservation holder (SPC-4 5.12.10)?
    pub fn is_holder(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            None => false,
            Some(Reservation { holder: None, .. }) => self.is_registered(nexus),
            Some(Reservation {
                holder: Some(h), ..
            }) => h == nexus,
        }
    }

    /// The part of the state that persists through power loss with
    /// APTPL: equal iff a store would write the same thing.
    pub fn durable_eq(&self, other: &PrState) -> bool {
        self.generation == other.generation
            && self.aptpl == other.aptpl
            && self.registrations == other.registrations
            && self.reservation == other.reservation
    }

    /// The part a store keeps: the durable part when APTPL is set,
    /// nothing otherwise. The generation is kept as a record of the last
    /// change; [`PrState::after_power_loss`] is what a power on restores.
    pub fn durable(&self) -> PrState {
        if self.aptpl {
            PrState {
                generation: self.generation,
                aptpl: true,
                registrations: self.registrations.clone(),
                reservation: self.reservation.clone(),
                lost: false,
                spc2: None,
            }
        } else {
            PrState::default()
        }
    }

    /// The state as it is after a power cycle: the durable part when
    /// APTPL is set, nothing otherwise, with PRgeneration zero ("Regardless
    /// of the APTPL bit value the PRgeneration value shall be set to zero
    /// by a power on", SPC-4 6.15.2).
    pub fn after_power_loss(&self) -> PrState {
        PrState {
            generation: 0,
            ..self.durable()
        }
    }
}

// ------------------------------------------------------------- serde ---

/// An I_T nexus as stored: names and identifiers, no shared pointers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NexusRecord {
    pub initiator: String,
    /// ISID as 12 hex digits.
    pub isid: String,
    pub target: String,
    pub tpgt: u16,
    pub relative_target_port: u16,
}

impl From<&Nexus> for NexusRecord {
    fn from(n: &Nexus) -> Self {
        NexusRecord {
            initiator: n.initiator.name.to_string(),
            isid: format!("{:012x}", n.initiator.isid),
            target: n.target.name.to_string(),
            tpgt: n.target.tpgt,
            relative_target_port: n.target.relative_id,
        }
    }
}

impl NexusRecord {
    fn to_nexus(&self) -> Nexus {
        // A malformed ISID in a hand-edited file maps to 0 rather than
        // failing the whole load; the registration stays visible.
        let isid = u64::from_str_radix(&self.isid, 16).unwrap_or(0);
        Nexus::new(
            InitiatorPort::new(&self.initiator, isid),
            TargetPort::new(&self.target, self.tpgt, self.relative_target_port),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationRecord {
    pub nexus: NexusRecord,
    /// Reservation key as 16 hex digits (JSON numbers lose 64-bit keys).
    pub key: String,
    #[serde(default)]
    pub all_tg_pt: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRecord {
    /// TYPE code (1, 3, 5, 6, 7 or 8).
    pub pr_type: u8,
    pub holder: Option<NexusRecord>,
}

/// The serialized form of [`PrState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub generation: u32,
    pub aptpl: bool,
    pub registrations: Vec<RegistrationRecord>,
    pub reservation: Option<ReservationRecord>,
}

impl From<PrState> for StateRecord {
    fn from(s: PrState) -> Self {
        StateRecord {
            generation: s.generation,
            aptpl: s.aptpl,
            registrations: s
                .registrations
                .iter()
                .map(|r| RegistrationRecord {
                    nexus: (&r.nexus).into(),
                    key: format!("{:016x}", r.key),
                    all_tg_pt: r.all_tg_pt,
                })
                .collect(),
            reservation: s.reservation.as_ref().map(|r| ReservationRecord {
                pr_type: r.pr_type.code(),
                holder: r.holder.as_ref().map(NexusRecord::from),
            }),
        }
    }
}

impl From<StateRecord> for PrState {
    fn from(r: StateRecord) -> Self {
        let registrations: Vec<Registration> = r
            .registrations
            .iter()
            .map(|g| Registration {
                nexus: g.nexus.to_nexus(),
                key: u64::from_str_radix(&g.key, 16).unwrap_or(0),
                all_tg_pt: g.all_tg_pt,
            })
            .collect();
        let reservation = r.reservation.and_then(|res| {
            let pr_type = PrType::from_u8(res.pr_type)?;
            let holder = if pr_type.all_registrants() {
                None
            } else {
                Some(res.holder?.to_nexus())
            };
            Some(Reservation { pr_type, holder })
        });
        PrState {
            generation: r.generation,
            aptpl: r.aptpl,
            registrations,
            reservation,
            lost: false,
            spc2: None,
        }
    }
}

impl StateRecord {
    /// Check a record read from storage: keys and ISIDs parse, types are
    /// valid, a holder is registered. A record failing this is lost PR
    /// information, not something to guess about.
    pub fn validate(&self) -> Result<(), String> {
        for g in &self.registrations {
            if g.key.len() > 16 || u64::from_str_radix(&g.key, 16).is_err() {
                return Err(format!("bad reservation key {:?}", g.key));
            }
            if g.nexus.isid.len() > 12 || u64::from_str_radix(&g.nexus.isid, 16).is_err() {
                return Err(format!("bad ISID {:?}", g.nexus.isid));
            }
        }
        if let Some(res) = &self.reservation {
            let t = PrType::from_u8(res.pr_type)
                .ok_or_else(|| format!("bad reservation type {}", res.pr_type))?;
            if t.all_registrants() {
                if self.registrations.is_empty() {
                    return Err("all-registrants reservation without registrants".into());
                }
            } else {
                let h = res.holder.as_ref().ok_or("reservation without holder")?;
                if !self.registrations.iter().any(|g| &g.nexus == h) {
                    return Err("reservation holder is not registered".into());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(name: &str) -> Nexus {
        Nexus::new(
            InitiatorPort::new(name, 1),
            TargetPort::new("iqn.2026-11.io.keyfence:t", 1, 1),
        )
    }

    #[test]
    fn power_on_zeroes_the_generation_and_keeps_aptpl_state() {
        let n = nexus("iqn.a");
        let st = PrState {
            generation: 7,
            aptpl: true,
            registrations: vec![Registration {
                nexus: n.clone(),
                key: 0x11,
                all_tg_pt: false,
            }],
            reservation: Some(Reservation {
                pr_type: PrType::WriteExclusiveRegistrantsOnly,
                holder: Some(n.clone()),
            }),
            lost: false,
            spc2: Some(nexus("iqn.b")),
        };
        // The store keeps the generation of the last change ...
        let kept = st.durable();
        assert_eq!(kept.generation, 7);
        assert_eq!(kept.spc2, None);
        assert!(kept.durable_eq(&st));
        // ... a power on reports zero (SPC-4 6.15.2), registrations and
        // reservation intact.
        let on = st.after_power_loss();
        assert_eq!(on.generation, 0);
        assert_eq!((on.aptpl, &on.registrations), (true, &st.registrations));
        assert_eq!(on.reservation, st.reservation);
        assert_eq!(on.spc2, None);
        // Without APTPL nothing survives.
        let plain = PrState { aptpl: false, ..st };
        assert_eq!(plain.durable(), PrState::default());
        assert_eq!(plain.after_power_loss(), PrState::default());
    }
}
