//! Random PR OUT sequences from several I_T nexuses, run through the
//! engine and through a small reference model written directly from the
//! SPC-5 tables (67, 68, 70, 71, 72, figure 9) and the access table columns
//! for READ/WRITE; every response, unit attention, READ KEYS / READ
//! RESERVATION answer and access decision must agree.

mod common;

use common::*;
use keyfence_scsi::pr_data::PrOutAction;
use keyfence_scsi::sense::asc;
use keyfence_scsi::Nexus;
use proptest::prelude::*;

const N: usize = 4;

fn nexus(i: usize) -> Nexus {
    nx(&format!("iqn.2026-11.test:i{i}"), 0x100 + i as u64, 1)
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Register {
        rk: u64,
        sark: u64,
    },
    Riek {
        sark: u64,
    },
    Reserve {
        rk: u64,
        t: u8,
    },
    Release {
        rk: u64,
        t: u8,
    },
    Clear {
        rk: u64,
    },
    Preempt {
        rk: u64,
        sark: u64,
        t: u8,
        abort: bool,
    },
    Move {
        rk: u64,
        sark: u64,
        dest: usize,
        unreg: bool,
    },
}

/// Sentinel keys resolved against the model's state before a step runs,
/// so that sequences reach deep states: the acting nexus's own key, or
/// the key of nexus `j`.
const OWN: u64 = 0xdead_0000_0000_0000;
const KEY_OF: u64 = 0xdead_0000_0000_0100;

fn resolve_key(k: u64, m: &Model, who: usize) -> u64 {
    if k == OWN {
        m.key(who).unwrap_or(0)
    } else if (KEY_OF..KEY_OF + N as u64).contains(&k) {
        let j = (k - KEY_OF) as usize;
        m.key(j).unwrap_or(j as u64 + 1)
    } else {
        k
    }
}

fn resolve(op: Op, m: &Model, who: usize) -> Op {
    let r = |k| resolve_key(k, m, who);
    match op {
        Op::Register { rk, sark } => Op::Register {
            rk: r(rk),
            sark: r(sark),
        },
        Op::Riek { sark } => Op::Riek { sark: r(sark) },
        Op::Reserve { rk, t } => Op::Reserve { rk: r(rk), t },
        Op::Release { rk, t } => Op::Release { rk: r(rk), t },
        Op::Clear { rk } => Op::Clear { rk: r(rk) },
        Op::Preempt { rk, sark, t, abort } => Op::Preempt {
            rk: r(rk),
            sark: r(sark),
            t,
            abort,
        },
        Op::Move {
            rk,
            sark,
            dest,
            unreg,
        } => Op::Move {
            rk: r(rk),
            sark: r(sark),
            dest,
            unreg,
        },
    }
}

fn op() -> impl Strategy<Value = Op> {
    let key = prop_oneof![
        3 => 0u64..4,
        1 => Just(u64::MAX),
        4 => Just(OWN),
        3 => (0..N as u64).prop_map(|j| KEY_OF + j),
    ];
    let ty = prop_oneof![8 => prop::sample::select(vec![1u8, 3, 5, 6, 7, 8]), 1 => Just(2u8)];
    prop_oneof![
        (key.clone(), key.clone()).prop_map(|(rk, sark)| Op::Register { rk, sark }),
        key.clone().prop_map(|sark| Op::Riek { sark }),
        (key.clone(), ty.clone()).prop_map(|(rk, t)| Op::Reserve { rk, t }),
        (key.clone(), ty.clone()).prop_map(|(rk, t)| Op::Release { rk, t }),
        key.clone().prop_map(|rk| Op::Clear { rk }),
        (key.clone(), key.clone(), ty, any::<bool>())
            .prop_map(|(rk, sark, t, abort)| Op::Preempt { rk, sark, t, abort }),
        (key.clone(), key, 0..N, any::<bool>()).prop_map(|(rk, sark, dest, unreg)| Op::Move {
            rk,
            sark,
            dest,
            unreg
        }),
    ]
}

/// The reference model: registrations as (nexus index, key) in order of
/// registration; the reservation as (type code, holder index or None for
/// all-registrants).
#[derive(Debug, Default, Clone)]
struct Model {
    regs: Vec<(usize, u64)>,
    res: Option<(u8, Option<usize>)>,
    generation: u32,
}

const UA_RES_RELEASED: (u8, u8) = (asc::RESERVATIONS_RELEASED.0, asc::RESERVATIONS_RELEASED.1);
const UA_RES_PREEMPTED: (u8, u8) = (asc::RESERVATIONS_PREEMPTED.0, asc::RESERVATIONS_PREEMPTED.1);
const UA_REG_PREEMPTED: (u8, u8) = (
    asc::REGISTRATIONS_PREEMPTED.0,
    asc::REGISTRATIONS_PREEMPTED.1,
);

fn valid_type(t: u8) -> bool {
    matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
}
fn all_reg(t: u8) -> bool {
    t == 7 || t == 8
}
fn reg_only(t: u8) -> bool {
    t == 5 || t == 6
}

type Uas = Vec<(usize, (u8, u8))>;

impl Model {
    fn key(&self, n: usize) -> Option<u64> {
        self.regs.iter().find(|r| r.0 == n).map(|r| r.1)
    }
    fn holder(&self, n: usize) -> bool {
        match self.res {
            None => false,
            Some((_, None)) => self.key(n).is_some(),
            Some((_, Some(h))) => h == n,
        }
    }
    fn others(&self, n: usize) -> Vec<usize> {
        self.regs.iter().map(|r| r.0).filter(|&x| x != n).collect()
    }
    fn new_res(t: u8, n: usize) -> (u8, Option<usize>) {
        (t, if all_reg(t) { None } else { Some(n) })
    }

    /// Table 67 "unregister" + table 71.
    fn unregister(&mut self, n: usize, uas: &mut Uas) {
        self.regs.retain(|r| r.0 != n);
        match self.res {
            Some((_, None)) if self.regs.is_empty() => self.res = None,
            Some((t, Some(h))) if h == n => {
                self.res = None;
                if reg_only(t) {
                    for o in self.others(n) {
                        uas.push((o, UA_RES_RELEASED));
                    }
                }
            }
            _ => {}
        }
    }

    fn step(&mut self, n: usize, op: Op) -> (St, Uas) {
        let mut uas = Uas::new();
        let st = self.step_inner(n, op, &mut uas);
        uas.sort();
        uas.dedup();
        (st, uas)
    }

    fn step_inner(&mut self, n: usize, op: Op, uas: &mut Uas) -> St {
        let mine = self.key(n);
        match op {
            Op::Register { rk, sark } => self.register(n, mine, rk, sark, uas),
            Op::Riek { sark } => self.register(n, mine, mine.unwrap_or(0), sark, uas),
            Op::Reserve { rk, t } => {
                if mine != Some(rk) {
                    return St::Conflict;
                }
                if !valid_type(t) {
                    return INVALID_FIELD_CDB;
                }
                match self.res {
                    None => {
                        self.res = Some(Self::new_res(t, n));
                        St::Good
                    }
                    Some((t0, _)) if self.holder(n) && t0 == t => St::Good,
                    Some(_) => St::Conflict,
                }
            }
            Op::Release { rk, t } => {
                if mine != Some(rk) {
                    return St::Conflict;
                }
                if !valid_type(t) {
                    return INVALID_FIELD_CDB;
                }
                match self.res {
                    None => St::Good,
                    Some(_) if !self.holder(n) => St::Good,
                    Some((t0, _)) if t0 != t => INVALID_RELEASE,
                    Some((t0, _)) => {
                        self.res = None;
                        if reg_only(t0) || all_reg(t0) {
                            for o in self.others(n) {
                                uas.push((o, UA_RES_RELEASED));
                            }
                        }
                        St::Good
                    }
                }
            }
            Op::Clear { rk } => {
                if mine != Some(rk) {
                    return St::Conflict;
                }
                for o in self.others(n) {
                    uas.push((o, UA_RES_PREEMPTED));
                }
                self.regs.clear();
                self.res = None;
                self.generation = self.generation.wrapping_add(1);
                St::Good
            }
            Op::Move {
                rk,
                sark,
                dest,
                unreg,
            } => {
                // Table 70 and SPC-5 5.13.8.
                if mine != Some(rk) {
                    return St::Conflict;
                }
                let Some((t, _)) = self.res else {
                    return INVALID_FIELD_CDB;
                };
                if all_reg(t) || !self.holder(n) {
                    return St::Conflict;
                }
                if sark == 0 || dest == n {
                    return INVALID_FIELD_PARAM;
                }
                match self.regs.iter_mut().find(|r| r.0 == dest) {
                    Some(r) => r.1 = sark,
                    None => self.regs.push((dest, sark)),
                }
                self.res = Some((t, Some(dest)));
                if unreg {
                    self.unregister(n, uas);
                }
                self.generation = self.generation.wrapping_add(1);
                St::Good
            }
            Op::Preempt { rk, sark, t, .. } => {
                if mine != Some(rk) {
                    return St::Conflict;
                }
                if !valid_type(t) {
                    return INVALID_FIELD_CDB;
                }
                // Figure 9.
                let preempt_res = match self.res {
                    None => false,
                    Some((_, None)) => sark == 0,
                    Some((_, Some(h))) => self.key(h) == Some(sark),
                };
                if sark == 0 && !preempt_res {
                    return INVALID_FIELD_PARAM;
                }
                if preempt_res {
                    let (t0, _) = self.res.expect("reservation");
                    let victims: Vec<usize> = self
                        .regs
                        .iter()
                        .filter(|r| r.0 != n && (sark == 0 || r.1 == sark))
                        .map(|r| r.0)
                        .collect();
                    self.regs.retain(|r| !victims.contains(&r.0));
                    self.res = Some(Self::new_res(t, n));
                    for &v in &victims {
                        uas.push((v, UA_REG_PREEMPTED));
                    }
                    if t0 != t {
                        for o in self.others(n) {
                            uas.push((o, UA_RES_RELEASED));
                        }
                    }
                } else {
                    let victims: Vec<usize> = self
                        .regs
                        .iter()
                        .filter(|r| r.1 == sark)
                        .map(|r| r.0)
                        .collect();
                    if victims.is_empty() {
                        return St::Conflict;
                    }
                    for &v in &victims {
                        let mut ignore = Uas::new();
                        self.unregister(v, &mut ignore);
                        uas.extend(ignore);
                        if v != n {
                            uas.push((v, UA_REG_PREEMPTED));
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                St::Good
            }
        }
    }

    fn register(&mut self, n: usize, mine: Option<u64>, rk: u64, sark: u64, uas: &mut Uas) -> St {
        match mine {
            None if rk != 0 => St::Conflict,
            None if sark == 0 => St::Good,
            None => {
                self.regs.push((n, sark));
                self.generation = self.generation.wrapping_add(1);
                St::Good
            }
            Some(k) if k != rk => St::Conflict,
            Some(_) => {
                if sark == 0 {
                    self.unregister(n, uas);
                } else {
                    for r in self.regs.iter_mut().filter(|r| r.0 == n) {
                        r.1 = sark;
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                St::Good
            }
        }
    }

    fn can(&self, n: usize, write: bool) -> bool {
        match self.res {
            None => true,
            Some(_) if self.holder(n) => true,
            Some((t, _)) => {
                let registered = self.key(n).is_some();
                match t {
                    1 => !write,
                    3 => false,
                    _ if registered => true,
                    5 | 7 => !write,
                    _ => false,
                }
            }
        }
    }
}

fn run_engine(lu: &mut Lu, n: &Nexus, op: Op) -> (St, Uas, Vec<Nexus>) {
    let params_of = |rk, sark| params(rk, sark);
    let r = match op {
        Op::Register { rk, sark } => lu.out(n, PrOutAction::Register, None, &params_of(rk, sark)),
        Op::Riek { sark } => lu.out(
            n,
            PrOutAction::RegisterAndIgnoreExistingKey,
            None,
            &params_of(0x5555, sark),
        ),
        Op::Reserve { rk, t } | Op::Release { rk, t } => {
            let sa = if matches!(op, Op::Reserve { .. }) {
                PrOutAction::Reserve
            } else {
                PrOutAction::Release
            };
            let data = params_of(rk, 0).encode();
            let mut cdb = keyfence_scsi::pr_data::PrOutCdb::new(sa, None, 24).encode();
            cdb[2] = t;
            lu.raw(n, &cdb, &data)
        }
        Op::Clear { rk } => lu.out(n, PrOutAction::Clear, None, &params_of(rk, 0)),
        Op::Move {
            rk,
            sark,
            dest,
            unreg,
        } => lu.move_to(
            n,
            &keyfence_scsi::pr_data::RegisterMoveParams {
                reservation_key: rk,
                service_action_key: sark,
                unreg,
                aptpl: false,
                relative_target_port: 1,
                transport_id: tid(&nexus(dest)),
            },
        ),
        Op::Preempt { rk, sark, t, abort } => {
            let sa = if abort {
                PrOutAction::PreemptAndAbort
            } else {
                PrOutAction::Preempt
            };
            let data = params_of(rk, sark).encode();
            let mut cdb = keyfence_scsi::pr_data::PrOutCdb::new(sa, None, 24).encode();
            cdb[2] = t;
            lu.raw(n, &cdb, &data)
        }
    };
    let st = st_of(&r);
    let (mut uas, aborts): (Uas, Vec<Nexus>) = match &r {
        Ok(e) => (
            e.unit_attentions
                .iter()
                .map(|(x, c)| {
                    let i = (0..N).find(|&i| &nexus(i) == x).expect("known nexus");
                    (i, (c.0, c.1))
                })
                .collect(),
            e.abort_tasks_of.clone(),
        ),
        Err(_) => (vec![], vec![]),
    };
    uas.sort();
    (st, uas, aborts)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(
        prefix in any::<bool>(),
        steps in prop::collection::vec((0..N, op()), 1..40),
    ) {
        let mut lu = Lu::default();
        let mut m = Model::default();
        // Half the runs start with every nexus registered.
        let start: Vec<(usize, Op)> = if prefix {
            (0..N).map(|i| (i, Op::Register { rk: 0, sark: i as u64 + 1 })).collect()
        } else {
            vec![]
        };
        for (i, (who, op)) in start.into_iter().chain(steps).enumerate() {
            let op = resolve(op, &m, who);
            let n = nexus(who);
            // SPC-5 5.13.11.2.6: PREEMPT AND ABORT aborts the tasks of every
            // nexus registered with the key (all registered nexuses for key
            // zero under an all-registrants reservation).
            let abort_expect: Vec<usize> = match op {
                Op::Preempt { sark, .. } => {
                    let ar_zero = sark == 0 && matches!(m.res, Some((t, _)) if all_reg(t));
                    let mut v: Vec<usize> = m.regs.iter().filter(|r| ar_zero || r.1 == sark).map(|r| r.0).collect();
                    v.sort();
                    v
                }
                _ => vec![],
            };
            let (est, euas, aborts) = run_engine(&mut lu, &n, op);
            let (mst, muas) = m.step(who, op);
            prop_assert_eq!(est, mst, "step {} {:?} from {}", i, op, who);
            prop_assert_eq!(&euas, &muas, "UAs at step {} {:?}", i, op);
            // PREEMPT AND ABORT aborts exactly the preempted nexuses.
            if let (Op::Preempt { abort: true, .. }, St::Good) = (op, est) {
                let mut a: Vec<usize> = aborts.iter().map(|x| (0..N).find(|&k| &nexus(k) == x).unwrap()).collect();
                a.sort();
                prop_assert_eq!(a, abort_expect);
            } else {
                prop_assert!(aborts.is_empty());
            }
            // READ KEYS and READ RESERVATION.
            let k = lu.keys();
            prop_assert_eq!(k.generation, m.generation);
            prop_assert_eq!(k.keys, m.regs.iter().map(|r| r.1).collect::<Vec<_>>());
            let r = lu.reservation().reservation.map(|r| (r.pr_type, r.key));
            let mr = m.res.map(|(t, h)| (t, h.and_then(|h| m.key(h)).unwrap_or(0)));
            prop_assert_eq!(r, mr);
            // Access decisions for every nexus (the indexed view agrees).
            let view = keyfence_pr::AccessView::new(std::sync::Arc::new(lu.st.clone()));
            for j in 0..N {
                let x = nexus(j);
                prop_assert_eq!(view.check(&x, &READ10), lu.access(&x, &READ10));
                prop_assert_eq!(view.check(&x, &WRITE10), lu.access(&x, &WRITE10));
                prop_assert_eq!(lu.can_read(&x), m.can(j, false), "read by {} after {:?}", j, op);
                prop_assert_eq!(lu.can_write(&x), m.can(j, true), "write by {} after {:?}", j, op);
            }
            // Full status agrees with keys and holder flags.
            let f = lu.full();
            prop_assert_eq!(f.descriptors.len(), m.regs.len());
            for (d, (idx, key)) in f.descriptors.iter().zip(m.regs.iter()) {
                prop_assert_eq!(d.key, *key);
                prop_assert_eq!(d.r_holder, m.holder(*idx));
            }
        }
    }
}
