//! Integration of the PR engine into the LU gate, and the file store.

use super::*;
use crate::lu::ua::UnitAttentions;
use pr::MemoryStore;
use scsi::pr_data::{PrInAction, PrOutParams, ReadKeys, ReadReservation};
use scsi::{InitiatorPort, ScsiStatus, TargetPort};

fn port(rel: u16) -> TargetPort {
    TargetPort::new("iqn.2026-11.io.keyfence:t", rel, rel)
}

fn nexus(name: &str, isid: u64) -> Nexus {
    Nexus::new(InitiatorPort::new(name, isid), port(1))
}

fn ctx(path: Option<PathBuf>) -> ReservationContext {
    ReservationContext {
        lun: 0,
        target_ports: vec![port(1), port(2)],
        unit_attentions: Arc::new(UnitAttentions::new()),
        state_path: path,
    }
}

fn out(
    r: &Reservations,
    n: &Nexus,
    sa: PrOutAction,
    t: Option<PrType>,
    p: PrOutParams,
) -> CommandOutcome {
    let data = p.encode();
    let cdb = PrOutCdb::new(sa, t, data.len() as u32).encode();
    r.execute(n, &cdb, &data)
}

fn keyed(rk: u64, sark: u64, aptpl: bool) -> PrOutParams {
    PrOutParams {
        reservation_key: rk,
        service_action_key: sark,
        aptpl,
        ..Default::default()
    }
}

fn read_keys(r: &Reservations, n: &Nexus) -> ReadKeys {
    let cdb = PrInCdb::new(PrInAction::ReadKeys, 1024).encode();
    let o = r.execute(n, &cdb, &[]);
    assert_eq!(o.status, ScsiStatus::Good);
    ReadKeys::decode(&o.data_in).unwrap()
}

#[test]
fn aptpl_state_survives_restart_and_is_erased_when_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(dir.path(), "iqn.2026-11.io.keyfence:t", 0);
    let a = nexus("iqn.a", 1);
    {
        let r = Reservations::new(ctx(Some(path.clone())));
        assert_eq!(
            out(&r, &a, PrOutAction::Register, None, keyed(0, 0xaa, true)).status,
            ScsiStatus::Good
        );
        assert_eq!(
            out(
                &r,
                &a,
                PrOutAction::Reserve,
                Some(PrType::WriteExclusive),
                keyed(0xaa, 0, false)
            )
            .status,
            ScsiStatus::Good
        );
        assert!(path.exists());
    }
    // "Power cycle": a new gate over the same file.
    let r = Reservations::new(ctx(Some(path.clone())));
    assert_eq!(read_keys(&r, &a).keys, vec![0xaa]);
    let cdb = PrInCdb::new(PrInAction::ReadReservation, 64).encode();
    let rr = ReadReservation::decode(&r.execute(&a, &cdb, &[]).data_in).unwrap();
    assert_eq!(rr.reservation.unwrap().key, 0xaa);
    // Re-register with APTPL=0: the file goes, a restart starts empty.
    assert_eq!(
        out(
            &r,
            &a,
            PrOutAction::Register,
            None,
            keyed(0xaa, 0xbb, false)
        )
        .status,
        ScsiStatus::Good
    );
    assert!(!path.exists());
    let r = Reservations::new(ctx(Some(path.clone())));
    assert!(read_keys(&r, &a).keys.is_empty());
}

#[test]
fn store_failure_fails_command_and_keeps_state() {
    let store = Arc::new(MemoryStore::new());
    let r = Reservations::with_store(ctx(None), Some(store.clone()));
    let a = nexus("iqn.a", 1);
    assert_eq!(
        out(&r, &a, PrOutAction::Register, None, keyed(0, 1, true)).status,
        ScsiStatus::Good
    );
    let before = r.snapshot();
    store.fail_writes(true);
    let o = out(
        &r,
        &a,
        PrOutAction::Reserve,
        Some(PrType::ExclusiveAccess),
        keyed(1, 0, false),
    );
    assert_eq!(o.status, ScsiStatus::CheckCondition);
    let s = o.sense.unwrap();
    assert_eq!(
        (s.key, s.asc, s.ascq),
        (SenseKey::HardwareError, 0x44, 0x00)
    );
    assert_eq!(*r.snapshot(), *before);
    assert!(r.snapshot().reservation.is_none());
    store.fail_writes(false);
    assert_eq!(
        out(
            &r,
            &a,
            PrOutAction::Reserve,
            Some(PrType::ExclusiveAccess),
            keyed(1, 0, false)
        )
        .status,
        ScsiStatus::Good
    );
    assert_eq!(
        store.load().unwrap().unwrap().1.reservation,
        r.snapshot().reservation
    );
}

#[test]
fn without_store_aptpl_is_refused() {
    let r = Reservations::with_store(ctx(None), None);
    let a = nexus("iqn.a", 1);
    let o = out(&r, &a, PrOutAction::Register, None, keyed(0, 1, true));
    assert_eq!(o.status, ScsiStatus::CheckCondition);
    let s = o.sense.unwrap();
    assert_eq!((s.asc, s.ascq), (0x26, 0x00));
    assert_eq!(s.field.unwrap().byte, 20);
    assert!(read_keys(&r, &a).keys.is_empty());
}
