//! A small harness: one LU's PR state driven through the engine.
// Each test binary (model, robustness, scenarios) uses a different subset
// of these helpers; every one is used by at least one of them.
#![allow(dead_code)]

use keyfence_pr::{Access, Effects, Features, PrState, Refusal};
use keyfence_scsi::pr_data::{
    FullStatus, PrInAction, PrInCdb, PrOutAction, PrOutCdb, PrOutParams, PrType, ReadKeys,
    ReadReservation, RegisterMoveParams,
};
use keyfence_scsi::sense::Asc;
use keyfence_scsi::transport_id::TransportId;
use keyfence_scsi::{InitiatorPort, Nexus, TargetPort};

pub const TARGET: &str = "iqn.2026-11.io.keyfence:t";

pub fn tp(rel: u16) -> TargetPort {
    TargetPort::new(TARGET, rel, rel)
}

pub fn nx(name: &str, isid: u64, rel: u16) -> Nexus {
    Nexus::new(InitiatorPort::new(name, isid), tp(rel))
}

pub fn a() -> Nexus {
    nx("iqn.2026-11.test:a", 1, 1)
}
pub fn b() -> Nexus {
    nx("iqn.2026-11.test:b", 1, 1)
}
pub fn c() -> Nexus {
    nx("iqn.2026-11.test:c", 1, 1)
}

pub const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
pub const WRITE10: [u8; 10] = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];

pub fn params(rk: u64, sark: u64) -> PrOutParams {
    PrOutParams {
        reservation_key: rk,
        service_action_key: sark,
        ..Default::default()
    }
}

/// The outcome of a command as the initiator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum St {
    Good,
    Conflict,
    /// CHECK CONDITION with sense key, ASC, ASCQ.
    Check(u8, u8, u8),
}

pub fn st_of(r: &Result<Effects, Refusal>) -> St {
    match r {
        Ok(_) => St::Good,
        Err(Refusal::Conflict) => St::Conflict,
        Err(Refusal::Check(s)) => St::Check(s.key as u8, s.asc, s.ascq),
    }
}

pub const INVALID_FIELD_CDB: St = St::Check(5, 0x24, 0);
pub const INVALID_FIELD_PARAM: St = St::Check(5, 0x26, 0);
pub const INVALID_RELEASE: St = St::Check(5, 0x26, 4);
pub const PLLE: St = St::Check(5, 0x1a, 0);

pub struct Lu {
    pub st: PrState,
    pub ports: Vec<TargetPort>,
    pub known: Vec<InitiatorPort>,
    pub features: Features,
}

impl Default for Lu {
    fn default() -> Self {
        Lu {
            st: PrState::default(),
            ports: vec![tp(1), tp(2)],
            known: vec![],
            features: Features { ptpl_c: true },
        }
    }
}

impl Lu {
    pub fn ctx(&self) -> keyfence_pr::Context<'_> {
        keyfence_pr::Context {
            target_ports: &self.ports,
            known_initiators: &self.known,
            features: self.features,
        }
    }

    pub fn raw(&mut self, n: &Nexus, cdb: &[u8], data: &[u8]) -> Result<Effects, Refusal> {
        let r = keyfence_pr::pr_out(&self.st, n, &self.ctx(), cdb, data)?;
        self.st = r.state;
        Ok(r.effects)
    }

    pub fn out(
        &mut self,
        n: &Nexus,
        sa: PrOutAction,
        t: Option<PrType>,
        p: &PrOutParams,
    ) -> Result<Effects, Refusal> {
        let data = p.encode();
        let cdb = PrOutCdb::new(sa, t, data.len() as u32).encode();
        self.raw(n, &cdb, &data)
    }

    pub fn register(&mut self, n: &Nexus, key: u64) {
        let r = self.out(
            n,
            PrOutAction::RegisterAndIgnoreExistingKey,
            None,
            &params(0, key),
        );
        assert_eq!(st_of(&r), St::Good);
    }

    pub fn reserve(&mut self, n: &Nexus, key: u64, t: PrType) -> Result<Effects, Refusal> {
        self.out(n, PrOutAction::Reserve, Some(t), &params(key, 0))
    }

    pub fn release(&mut self, n: &Nexus, key: u64, t: PrType) -> Result<Effects, Refusal> {
        self.out(n, PrOutAction::Release, Some(t), &params(key, 0))
    }

    pub fn unregister(&mut self, n: &Nexus, key: u64) -> Result<Effects, Refusal> {
        self.out(n, PrOutAction::Register, None, &params(key, 0))
    }

    pub fn preempt(
        &mut self,
        n: &Nexus,
        key: u64,
        victim: u64,
        t: PrType,
        abort: bool,
    ) -> Result<Effects, Refusal> {
        let sa = if abort {
            PrOutAction::PreemptAndAbort
        } else {
            PrOutAction::Preempt
        };
        self.out(n, sa, Some(t), &params(key, victim))
    }

    pub fn move_to(&mut self, n: &Nexus, p: &RegisterMoveParams) -> Result<Effects, Refusal> {
        let data = p.encode();
        let cdb = PrOutCdb::new(PrOutAction::RegisterAndMove, None, data.len() as u32).encode();
        self.raw(n, &cdb, &data)
    }

    pub fn access(&self, n: &Nexus, cdb: &[u8]) -> Access {
        keyfence_pr::check_access(&self.st, n, cdb)
    }

    pub fn can_read(&self, n: &Nexus) -> bool {
        self.access(n, &READ10) == Access::Allowed
    }

    pub fn can_write(&self, n: &Nexus) -> bool {
        self.access(n, &WRITE10) == Access::Allowed
    }

    pub fn pr_in(&self, sa: PrInAction) -> Vec<u8> {
        keyfence_pr::pr_in(&self.st, &PrInCdb::new(sa, 8192).encode(), self.features)
            .expect("PR IN")
    }

    pub fn keys(&self) -> ReadKeys {
        ReadKeys::decode(&self.pr_in(PrInAction::ReadKeys)).unwrap()
    }

    pub fn reservation(&self) -> ReadReservation {
        ReadReservation::decode(&self.pr_in(PrInAction::ReadReservation)).unwrap()
    }

    pub fn full(&self) -> FullStatus {
        FullStatus::decode(&self.pr_in(PrInAction::ReadFullStatus)).unwrap()
    }
}

pub fn uas(e: &Effects) -> Vec<(Nexus, Asc)> {
    let mut v = e.unit_attentions.clone();
    v.sort_by(|x, y| x.0.cmp(&y.0));
    v
}

pub fn tid(n: &Nexus) -> TransportId {
    TransportId::for_port(&n.initiator)
}
