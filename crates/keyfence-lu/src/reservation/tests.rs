//! Integration of the PR engine into the LU gate, and the file store.

use super::*;
use crate::ua::UnitAttentions;
use keyfence_pr::MemoryStore;
use keyfence_scsi::pr_data::{PrInAction, PrOutParams, ReadKeys, ReadReservation};
use keyfence_scsi::{InitiatorPort, ScsiStatus, TargetPort};

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

#[test]
fn preempt_and_abort_queues_uas_and_aborts() {
    let c = ctx(None);
    let ua = c.unit_attentions.clone();
    let r = Reservations::with_store(c, None);
    let (a, b, x) = (nexus("iqn.a", 1), nexus("iqn.b", 1), nexus("iqn.c", 1));
    for n in [&a, &b, &x] {
        // Consume the POWER ON OCCURRED of a new nexus.
        assert_eq!(ua.take(n), Some(crate::ua::NEW_NEXUS_UA));
    }
    out(&r, &a, PrOutAction::Register, None, keyed(0, 1, false));
    out(&r, &b, PrOutAction::Register, None, keyed(0, 2, false));
    out(
        &r,
        &a,
        PrOutAction::Reserve,
        Some(PrType::WriteExclusive),
        keyed(1, 0, false),
    );
    let write = [0x2au8, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    assert!(r.check(&a, &write));
    assert!(!r.check(&b, &write));
    assert!(r
        .gate(&x, &write)
        .is_some_and(|o| o.status == ScsiStatus::ReservationConflict));
    let o = out(
        &r,
        &b,
        PrOutAction::PreemptAndAbort,
        Some(PrType::ExclusiveAccess),
        keyed(2, 1, false),
    );
    assert_eq!(o.status, ScsiStatus::Good);
    assert_eq!(o.effects, vec![LuEffect::AbortTasks { nexus: a.clone() }]);
    assert_eq!(ua.take(&a), Some(asc::REGISTRATIONS_PREEMPTED));
    assert_eq!(ua.take(&b), None);
    assert_eq!(ua.take(&x), None, "non-registrants get no unit attention");
    assert!(r.check(&b, &write) && !r.check(&a, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]));
    // PR IN answers are cut to the allocation length.
    let cdb = PrInCdb::new(PrInAction::ReadKeys, 12).encode();
    let o = r.execute(&a, &cdb, &[]);
    assert_eq!(o.data_in.len(), 12);
    assert_eq!(
        &o.data_in[4..8],
        &[0, 0, 0, 8],
        "ADDITIONAL LENGTH is not truncated"
    );
}

fn not_superseded() -> super::Superseded {
    Arc::new(|| false)
}

#[test]
fn nexus_loss_leaves_the_reservation_of_a_superseding_session_alone() {
    let r = Reservations::with_store(ctx(None), None);
    let (a, b) = (nexus("iqn.a", 1), nexus("iqn.b", 1));
    let reserve6 = [0x16u8, 0, 0, 0, 0, 0];
    let tur = [0u8; 6];
    // A new session of nexus a (a reinstatement that stopped waiting for
    // the old one) holds the reservation when the old session's loss is
    // applied: it stays.
    assert_eq!(r.execute(&a, &reserve6, &[]).status, ScsiStatus::Good);
    r.on_nexus_loss(&a, &(Arc::new(|| true) as super::Superseded));
    assert!(!r.check(&b, &tur), "the new session's reservation stays");
    r.on_nexus_loss(&a, &not_superseded());
    assert!(r.check(&b, &tur));
}

#[test]
fn spc2_reservation_ends_with_nexus_loss_and_resets() {
    let r = Reservations::with_store(ctx(None), None);
    let (a, b) = (nexus("iqn.a", 1), nexus("iqn.b", 1));
    let reserve6 = [0x16u8, 0, 0, 0, 0, 0];
    let tur = [0u8; 6];
    assert_eq!(r.execute(&a, &reserve6, &[]).status, ScsiStatus::Good);
    assert!(!r.check(&b, &tur));
    r.on_nexus_loss(&b, &not_superseded());
    assert!(!r.check(&b, &tur), "another nexus's loss changes nothing");
    r.on_nexus_loss(&a, &not_superseded());
    assert!(r.check(&b, &tur));
    assert_eq!(r.execute(&b, &reserve6, &[]).status, ScsiStatus::Good);
    r.on_lu_reset(keyfence_scsi::sense::asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
    assert!(r.check(&a, &tur));
    assert_eq!(r.execute(&a, &reserve6, &[]).status, ScsiStatus::Good);
    r.on_target_reset();
    assert!(r.check(&b, &tur));
}

#[test]
fn file_store_failure_leaves_disk_and_memory_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(dir.path(), "iqn.2026-11.io.keyfence:t", 0);
    let r = Reservations::new(ctx(Some(path.clone())));
    let a = nexus("iqn.a", 1);
    assert_eq!(
        out(&r, &a, PrOutAction::Register, None, keyed(0, 5, true)).status,
        ScsiStatus::Good
    );
    let on_disk = std::fs::read(&path).unwrap();
    let before = r.snapshot();
    // Make the directory unusable for the temp file + rename: replace the
    // directory by a plain file (root ignores permission bits).
    let pdir = path.parent().unwrap().to_path_buf();
    let moved = dir.path().join("moved");
    std::fs::rename(&pdir, &moved).unwrap();
    std::fs::write(&pdir, b"not a directory").unwrap();
    let o = out(
        &r,
        &a,
        PrOutAction::Reserve,
        Some(PrType::ExclusiveAccess),
        keyed(5, 0, false),
    );
    assert_eq!(o.status, ScsiStatus::CheckCondition);
    assert_eq!(o.sense.unwrap().key, SenseKey::HardwareError);
    assert_eq!(*r.snapshot(), *before, "in-memory state unchanged");
    assert!(r.check(&nexus("iqn.b", 1), &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]));
    // Restore the directory: the old file is intact, and the next command works.
    std::fs::remove_file(&pdir).unwrap();
    std::fs::rename(&moved, &pdir).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), on_disk);
    assert_eq!(
        out(
            &r,
            &a,
            PrOutAction::Reserve,
            Some(PrType::ExclusiveAccess),
            keyed(5, 0, false)
        )
        .status,
        ScsiStatus::Good
    );
    let f = read_state_file(&path).unwrap().unwrap();
    assert_eq!(f.version, 2);
    assert!(f.state.reservation.is_some());
}

#[test]
fn file_store_version_mismatch_fails_and_overwrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(dir.path(), "iqn.2026-11.io.keyfence:t", 0);
    let a = nexus("iqn.a", 1);
    let r = Reservations::new(ctx(Some(path.clone())));
    assert_eq!(
        out(&r, &a, PrOutAction::Register, None, keyed(0, 0xaa, true)).status,
        ScsiStatus::Good
    );
    // Someone else writes the store behind the gate's back (another
    // writer, an operator restoring a copy): a newer version with other
    // content.
    let mut f = read_state_file(&path).unwrap().unwrap();
    assert_eq!(f.version, 1);
    f.version = 7;
    f.state.generation = 99;
    let mut foreign = serde_json::to_vec_pretty(&f).unwrap();
    foreign.push(b'\n');
    std::fs::write(&path, &foreign).unwrap();
    let before = r.snapshot();
    // A change that must be persisted fails; the foreign file stays as it
    // is and the in-memory state does not change.
    let o = out(
        &r,
        &a,
        PrOutAction::Reserve,
        Some(PrType::WriteExclusive),
        keyed(0xaa, 0, false),
    );
    assert_eq!(o.status, ScsiStatus::CheckCondition);
    assert_eq!(o.sense.unwrap().key, SenseKey::HardwareError);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        foreign,
        "nothing overwritten"
    );
    assert_eq!(*r.snapshot(), *before);
    assert!(r.check(&nexus("iqn.b", 1), &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]));
    // The store itself refuses a stale compare-and-swap.
    let store = FileStore::new(path.clone(), "iqn.2026-11.io.keyfence:t", 0);
    assert_eq!(
        store.compare_and_swap(1, Some(&PrState::default())),
        Err(StoreError::VersionMismatch {
            expected: 1,
            found: 7
        })
    );
    assert_eq!(std::fs::read(&path).unwrap(), foreign);
    // A gate started over the file (a restart) loads it and works again.
    let r = Reservations::new(ctx(Some(path.clone())));
    assert_eq!(read_keys(&r, &a).keys, vec![0xaa]);
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
    assert_eq!(read_state_file(&path).unwrap().unwrap().version, 8);
}

#[test]
fn crash_leftovers_and_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(dir.path(), "iqn.2026-11.io.keyfence:t", 0);
    let a = nexus("iqn.a", 1);
    {
        let r = Reservations::new(ctx(Some(path.clone())));
        out(&r, &a, PrOutAction::Register, None, keyed(0, 7, true));
    }
    // A crash after writing the temp file but before the rename leaves a
    // temp file behind: it is ignored, the last committed state loads.
    let tmp = path.parent().unwrap().join(".lun0.json.tmp.999999");
    std::fs::write(&tmp, b"{ half written").unwrap();
    let r = Reservations::new(ctx(Some(path.clone())));
    assert_eq!(read_keys(&r, &a).keys, vec![7]);
    drop(r);

    // An unreadable file is lost PR information: DATA PROTECT for
    // everything but the SPC-5 5.13.5.2 commands, until REPLACE LOST
    // RESERVATION, which persists the replacement.
    std::fs::write(&path, b"garbage").unwrap();
    let r = Reservations::new(ctx(Some(path.clone())));
    let read = [0x28u8, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    let o = r.gate(&a, &read).unwrap();
    let s = o.sense.unwrap();
    assert_eq!((s.key, s.asc, s.ascq), (SenseKey::DataProtect, 0x44, 0x01));
    assert!(r.gate(&a, &[0x12, 0, 0, 0, 36, 0]).is_none());
    let p = PrOutParams {
        service_action_key: 9,
        aptpl: true,
        ..Default::default()
    };
    let o = out(
        &r,
        &a,
        PrOutAction::ReplaceLostReservation,
        Some(PrType::WriteExclusive),
        p,
    );
    assert_eq!(o.status, ScsiStatus::Good);
    assert!(r.gate(&a, &read).is_none());
    let f = read_state_file(&path).unwrap().unwrap();
    assert_eq!(f.state.generation, 0);
    assert_eq!(f.state.registrations[0].key, format!("{:016x}", 9));
}

/// The gate inside a whole LogicalUnit: reservation conflicts on real
/// READ/WRITE, unit attentions delivered on the next command of the
/// right nexus only.
#[test]
fn through_the_logical_unit() {
    use crate::backend::MemBackend;
    use crate::{CommandRequest, LogicalUnit, LuConfig, TargetLuns};

    let luns = Arc::new(TargetLuns::new(vec![0]));
    let cfg = LuConfig::new("iqn.2026-11.io.keyfence:t", 0, vec![port(1), port(2)], luns);
    let lu = LogicalUnit::new(cfg, Arc::new(MemBackend::new(1 << 20))).unwrap();
    let (a, b, c) = (nexus("iqn.a", 1), nexus("iqn.b", 1), nexus("iqn.c", 1));
    let run = |n: &Nexus, cdb: &[u8], data: &[u8]| {
        lu.execute(&CommandRequest {
            nexus: n,
            cdb,
            data_out: data,
            read_only: false,
            luns: None,
        })
    };
    let tur = [0u8; 6];
    for n in [&a, &b, &c] {
        // POWER ON OCCURRED first, then clean.
        assert_eq!(run(n, &tur, &[]).status, ScsiStatus::CheckCondition);
        assert_eq!(run(n, &tur, &[]).status, ScsiStatus::Good);
    }
    let prout = |n: &Nexus, sa: PrOutAction, t: Option<PrType>, p: PrOutParams| {
        let d = p.encode();
        run(n, &PrOutCdb::new(sa, t, d.len() as u32).encode(), &d)
    };
    assert_eq!(
        prout(&a, PrOutAction::Register, None, keyed(0, 0xa, false)).status,
        ScsiStatus::Good
    );
    assert_eq!(
        prout(&b, PrOutAction::Register, None, keyed(0, 0xb, false)).status,
        ScsiStatus::Good
    );
    assert_eq!(
        prout(
            &a,
            PrOutAction::Reserve,
            Some(PrType::ExclusiveAccessRegistrantsOnly),
            keyed(0xa, 0, false)
        )
        .status,
        ScsiStatus::Good
    );
    let write = [0x2au8, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    let block = vec![0x5au8; 512];
    assert_eq!(run(&a, &write, &block).status, ScsiStatus::Good);
    assert_eq!(
        run(&b, &write, &block).status,
        ScsiStatus::Good,
        "registrant under EA_RO"
    );
    assert_eq!(
        run(&c, &write, &block).status,
        ScsiStatus::ReservationConflict
    );
    assert_eq!(
        run(&c, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]).status,
        ScsiStatus::ReservationConflict
    );
    // INQUIRY and READ CAPACITY pass for anyone.
    assert_eq!(
        run(&c, &[0x12, 0, 0, 0, 36, 0], &[]).status,
        ScsiStatus::Good
    );
    assert_eq!(
        run(&c, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).status,
        ScsiStatus::Good
    );
    // The holder releases: B (registrant) gets RESERVATIONS RELEASED on
    // its next command; A (releasing) and C (not registered) do not.
    assert_eq!(
        prout(
            &a,
            PrOutAction::Release,
            Some(PrType::ExclusiveAccessRegistrantsOnly),
            keyed(0xa, 0, false)
        )
        .status,
        ScsiStatus::Good
    );
    let o = run(&b, &tur, &[]);
    assert_eq!(o.status, ScsiStatus::CheckCondition);
    let s = o.sense.unwrap();
    assert_eq!(
        (s.key, s.asc, s.ascq),
        (SenseKey::UnitAttention, 0x2a, 0x04)
    );
    assert_eq!(run(&b, &tur, &[]).status, ScsiStatus::Good);
    assert_eq!(run(&a, &tur, &[]).status, ScsiStatus::Good);
    assert_eq!(run(&c, &tur, &[]).status, ScsiStatus::Good);
    assert_eq!(run(&c, &write, &block).status, ScsiStatus::Good);
    // Nexus loss keeps registrations (READ KEYS still shows both).
    lu.nexus_lost(&a);
    let o = run(&b, &PrInCdb::new(PrInAction::ReadKeys, 64).encode(), &[]);
    assert_eq!(ReadKeys::decode(&o.data_in).unwrap().keys, vec![0xa, 0xb]);
}

/// SPEC_I_PT with an iSCSI name only (format 00b) registers the initiator
/// ports of that name the LU knows (SPC-5 7.6.4.6).
#[test]
fn spec_i_pt_name_only_uses_known_ports() {
    let c = ctx(None);
    let ua = c.unit_attentions.clone();
    let r = Reservations::with_store(c, None);
    let (a, b1, b2) = (nexus("iqn.a", 1), nexus("iqn.b", 1), nexus("iqn.b", 2));
    // The LU has seen both sessions of iqn.b.
    ua.take(&b1);
    ua.take(&b2);
    let p = PrOutParams {
        service_action_key: 0x77,
        spec_i_pt: true,
        transport_ids: vec![keyfence_scsi::transport_id::TransportId::Iscsi {
            name: "iqn.b".into(),
            isid: None,
        }],
        ..Default::default()
    };
    assert_eq!(
        out(&r, &a, PrOutAction::Register, None, p).status,
        ScsiStatus::Good
    );
    let s = r.snapshot();
    assert!(s.is_registered(&a) && s.is_registered(&b1) && s.is_registered(&b2));
    assert_eq!(read_keys(&r, &a).keys, vec![0x77; 3]);
}

/// A backend whose writes wait at a gate the test opens, to hold a command
/// between the reservation check and the end of its medium access.
#[derive(Debug)]
struct GatedBackend {
    inner: crate::backend::MemBackend,
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
    entered: std::sync::atomic::AtomicBool,
}

impl GatedBackend {
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl crate::backend::BlockBackend for GatedBackend {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.entered
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn mapped_ranges(
        &self,
        range: std::ops::Range<u64>,
        limit: usize,
    ) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        self.inner.mapped_ranges(range, limit)
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

/// PREEMPT AND ABORT completes only after the preempted nexus's write that
/// was already past the reservation check has finished: a fencer's GOOD
/// means nothing of the victim lands afterwards. The victim's next write
/// is refused.
#[test]
fn preempt_and_abort_waits_for_victims_commands_in_flight() {
    use crate::backend::MemBackend;
    use crate::{CommandRequest, LogicalUnit, LuConfig, TargetLuns};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    let backend = Arc::new(GatedBackend {
        inner: MemBackend::new(1 << 20),
        open: std::sync::Mutex::new(true),
        cv: std::sync::Condvar::new(),
        entered: std::sync::atomic::AtomicBool::new(false),
    });
    let luns = Arc::new(TargetLuns::new(vec![0]));
    let cfg = LuConfig::new("iqn.2026-11.io.keyfence:t", 0, vec![port(1), port(2)], luns);
    let lu = Arc::new(LogicalUnit::new(cfg, backend.clone()).unwrap());
    let (fencer, victim) = (nexus("iqn.fencer", 1), nexus("iqn.victim", 1));
    fn run(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], data: &[u8]) -> CommandOutcome {
        lu.execute(&CommandRequest {
            nexus: n,
            cdb,
            data_out: data,
            read_only: false,
            luns: None,
        })
    }
    fn prout(
        lu: &LogicalUnit,
        n: &Nexus,
        sa: PrOutAction,
        t: Option<PrType>,
        p: PrOutParams,
    ) -> CommandOutcome {
        let d = p.encode();
        run(lu, n, &PrOutCdb::new(sa, t, d.len() as u32).encode(), &d)
    }
    for (n, key) in [(&fencer, 0xf1), (&victim, 0x71)] {
        run(&lu, n, &[0u8; 6], &[]); // POWER ON OCCURRED
        let o = prout(&lu, n, PrOutAction::Register, None, keyed(0, key, false));
        assert_eq!(o.status, ScsiStatus::Good);
    }
    let wero = Some(PrType::WriteExclusiveRegistrantsOnly);
    assert_eq!(
        prout(
            &lu,
            &fencer,
            PrOutAction::Reserve,
            wero,
            keyed(0xf1, 0, false)
        )
        .status,
        ScsiStatus::Good
    );
    let write = [0x2au8, 0, 0, 0, 0, 8, 0, 0, 1, 0];

    // The victim's write passes the check, then stalls in the backend.
    *backend.open.lock().unwrap() = false;
    let (lu2, v2) = (lu.clone(), victim.clone());
    let victim_write = std::thread::spawn(move || run(&lu2, &v2, &write, &[0x77; 512]));
    while !backend.entered.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (lu3, f3) = (lu.clone(), fencer.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let fence = std::thread::spawn(move || {
        let o = prout(
            &lu3,
            &f3,
            PrOutAction::PreemptAndAbort,
            wero,
            keyed(0xf1, 0x71, false),
        );
        tx.send(()).unwrap();
        o
    });
    // While the victim's write is in flight, the preempt may not complete.
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "PREEMPT AND ABORT completed while the preempted nexus still had a write in flight"
    );
    backend.release();
    let w = victim_write.join().unwrap();
    assert_eq!(
        w.status,
        ScsiStatus::Good,
        "it passed the check before the preempt"
    );
    let o = fence.join().unwrap();
    assert_eq!(o.status, ScsiStatus::Good);
    assert_eq!(
        o.effects,
        vec![LuEffect::AbortTasks {
            nexus: victim.clone()
        }]
    );
    // The victim hears REGISTRATIONS PREEMPTED, then every write conflicts.
    let o = run(&lu, &victim, &write, &[0x77; 512]);
    let s = o.sense.expect("unit attention");
    assert_eq!(
        (s.key, s.asc, s.ascq),
        (SenseKey::UnitAttention, 0x2a, 0x05)
    );
    assert_eq!(
        run(&lu, &victim, &write, &[0x77; 512]).status,
        ScsiStatus::ReservationConflict
    );
}

/// Cluster mode, the LU side: two gates (two gateways) over one committed
/// state. The test double commits under a mutex and applies every change
/// to each gate the way a gateway's follower does (install, then the unit
/// attentions of its own nexuses: those on its TPGT), before returning.
mod cluster {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Weak;

    #[derive(Debug, Default)]
    struct Committed {
        state: Mutex<PrState>,
        gates: Mutex<Vec<(u16, Weak<Reservations>)>>,
    }

    #[derive(Debug)]
    struct Gw {
        committed: Arc<Committed>,
        serving: AtomicBool,
    }

    impl SharedPrState for Gw {
        fn may_serve(&self) -> bool {
            self.serving.load(Ordering::Acquire)
        }

        fn commit(&self, mut change: SharedChange) -> Result<PrState, Refusal> {
            let mut st = self.committed.state.lock().unwrap();
            let applied = change(&st)?;
            *st = applied.state.clone();
            for (tpgt, gate) in self.committed.gates.lock().unwrap().iter() {
                let Some(gate) = gate.upgrade() else { continue };
                gate.install(applied.state.clone());
                for (n, code) in &applied.effects.unit_attentions {
                    if n.target.tpgt == *tpgt {
                        gate.ctx.unit_attentions.queue(UaScope::Nexus(n), *code);
                    }
                }
            }
            Ok(applied.state)
        }

        fn commit_detached(&self, change: SharedChange) {
            let _ = self.commit(change);
        }
    }

    fn gateway(c: &Arc<Committed>, tpgt: u16) -> (Arc<Reservations>, Arc<Gw>) {
        let gw = Arc::new(Gw {
            committed: c.clone(),
            serving: AtomicBool::new(true),
        });
        let r = Arc::new(Reservations::with_shared(ctx(None), gw.clone()));
        c.gates.lock().unwrap().push((tpgt, Arc::downgrade(&r)));
        r.install(c.state.lock().unwrap().clone());
        (r, gw)
    }

    fn via(name: &str, tpgt: u16) -> Nexus {
        Nexus::new(InitiatorPort::new(name, 1), port(tpgt))
    }

    const WRITE: [u8; 10] = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];

    #[test]
    fn a_reservation_taken_through_one_gateway_binds_the_other() {
        let c = Arc::new(Committed::default());
        let (a, _) = gateway(&c, 1);
        let (b, _) = gateway(&c, 2);
        let (x, y, z) = (via("iqn.x", 1), via("iqn.y", 2), via("iqn.z", 2));
        assert_eq!(
            out(&a, &x, PrOutAction::Register, None, keyed(0, 0xa1, false)).status,
            ScsiStatus::Good
        );
        assert_eq!(
            out(&b, &y, PrOutAction::Register, None, keyed(0, 0xb1, false)).status,
            ScsiStatus::Good
        );
        let o = out(
            &a,
            &x,
            PrOutAction::Reserve,
            Some(PrType::WriteExclusiveRegistrantsOnly),
            keyed(0xa1, 0, false),
        );
        assert_eq!(o.status, ScsiStatus::Good);
        // Through B: the unregistered initiator is refused, the registered
        // one may write, and PR IN shows both keys.
        assert!(!b.check(&z, &WRITE));
        assert!(b.check(&y, &WRITE));
        assert_eq!(read_keys(&b, &z).keys, vec![0xa1, 0xb1]);
        // x has been seen on A (its new-nexus unit attention reported).
        let ua_a = &a.ctx.unit_attentions;
        while ua_a.take(&x).is_some() {}
        // y preempts x through B: x gets REGISTRATIONS PREEMPTED on A,
        // the gateway it is logged in through.
        let o = out(
            &b,
            &y,
            PrOutAction::Preempt,
            Some(PrType::WriteExclusiveRegistrantsOnly),
            keyed(0xb1, 0xa1, false),
        );
        assert_eq!(o.status, ScsiStatus::Good);
        assert!(o.effects.is_empty(), "aborts travel through the followers");
        assert_eq!(ua_a.peek(&x), Some(asc::REGISTRATIONS_PREEMPTED));
        assert!(!a.check(&x, &WRITE));
        assert_eq!(read_keys(&a, &x).keys, vec![0xb1]);
        // A refusal by the engine is the command's answer and commits
        // nothing.
        let before = c.state.lock().unwrap().clone();
        let o = out(
            &a,
            &x,
            PrOutAction::Reserve,
            Some(PrType::ExclusiveAccess),
            keyed(0xa1, 0, false),
        );
        assert_eq!(o.status, ScsiStatus::ReservationConflict);
        assert_eq!(*c.state.lock().unwrap(), before);
    }

    #[test]
    fn spc2_reserve_and_its_nexus_loss_are_cluster_wide() {
        let c = Arc::new(Committed::default());
        let (a, _) = gateway(&c, 1);
        let (b, _) = gateway(&c, 2);
        let (x, z) = (via("iqn.x", 1), via("iqn.z", 2));
        let o = a.execute(&x, &[0x16, 0, 0, 0, 0, 0], &[]);
        assert_eq!(o.status, ScsiStatus::Good);
        assert!(!b.check(&z, &WRITE));
        a.on_nexus_loss(&x, &not_superseded());
        assert!(b.check(&z, &WRITE));
        assert_eq!(c.state.lock().unwrap().spc2, None);
    }

    #[test]
    fn a_gateway_that_may_not_serve_answers_transitioning() {
        let c = Arc::new(Committed::default());
        let gw = Arc::new(Gw {
            committed: c.clone(),
            serving: AtomicBool::new(true),
        });
        let r = Reservations::with_shared(ctx(None), gw.clone());
        let x = via("iqn.x", 1);
        let transitioning = |o: Option<CommandOutcome>| {
            let s = o.expect("refused").sense.expect("sense");
            (s.key, s.asc, s.ascq) == (SenseKey::NotReady, 0x04, 0x0a)
        };
        // Not synchronised yet.
        assert!(transitioning(r.gate(&x, &WRITE)));
        assert!(
            r.gate(&x, &[0x12, 0, 0, 0, 36, 0]).is_none(),
            "INQUIRY works"
        );
        r.install(PrState::default());
        assert!(r.gate(&x, &WRITE).is_none());
        // Lease in doubt.
        gw.serving.store(false, Ordering::Release);
        assert!(transitioning(r.gate(&x, &WRITE)));
        assert!(transitioning(
            r.gate(&x, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 8, 0])
        ));
        gw.serving.store(true, Ordering::Release);
        assert!(r.gate(&x, &WRITE).is_none());
        // A resynchronisation is pending.
        r.unsync();
        assert!(transitioning(r.gate(&x, &WRITE)));
        // Single-node gates are not affected.
        let single = Reservations::new(ctx(None));
        assert!(single.may_serve() && single.gate(&x, &WRITE).is_none());
    }
}
