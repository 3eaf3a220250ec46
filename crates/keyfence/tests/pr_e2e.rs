//! Persistent reservations end to end: the real `keyfence serve` binary
//! with two portal groups (relative target ports 1 and 2) on loopback,
//! driven over iSCSI by the initiator library from several initiator
//! names and ISIDs.
//!
//! * APTPL through `kill -9` and restart (and its loss once a PR OUT
//!   carries APTPL=0), with `keyfence pr show --data-dir` while the
//!   target is down;
//! * READ / WRITE access of holder, registrant and non-registrant under
//!   each of the six reservation types (SPC-4 table 65), ownership when
//!   the holder leaves, and which I_T nexus gets which unit attention;
//! * I_T nexus identity: same ISID after logout, new ISID, other portal
//!   group, ALL_TG_PT;
//! * takeover from a new ISID with PREEMPT AND ABORT;
//! * `keyfence pr show --url` against the live target;
//! * RELEASE / RESERVE / PREEMPT error paths, preempting a non-holder, a
//!   type-changing preempt, REGISTER AND MOVE, SPEC_I_PT, and a holder
//!   preempted while logged out.
//!
//! Unit attentions are read with TEST UNIT READY until none is pending
//! (sessions use `unit_attention_retries: 0`, so no call consumes one
//! silently); every expectation is exact.

mod initiator_support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use initiator_support::{io, uas, Io};
use keyfence_initiator::{
    Device, Error, FullStatus, IscsiUrl, Isid, PrType, ReadKeys, ReadReservation, RegisterOptions,
    ReservationDescriptor, SessionConfig, TransportId,
};
use serde_json::{json, Value};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:e2e";
const BLOCK: usize = 512;

/// ASC/ASCQ pairs of the unit attentions the tests expect.
/// New I_T nexus: POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
const POWER_ON: (u8, u8) = (0x29, 0x00);
const NEXUS_LOSS: (u8, u8) = (0x29, 0x07);
const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x03);
const RESERVATIONS_RELEASED: (u8, u8) = (0x2a, 0x04);
const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);

/// Bound on every test body.
const TEST_LIMIT: Duration = Duration::from_secs(45);

/// A running `keyfence serve` with two portal groups (from the workspace
/// test kit).
struct Target(keyfence_testkit::Serve);

impl Target {
    fn start(data_dir: &Path) -> Target {
        Target(
            keyfence_testkit::Serve::builder(KF)
                .data_dir(data_dir)
                .portals(2)
                .target_name(IQN)
                .size("64MiB")
                .log_level("error")
                .start(),
        )
    }

    /// URL of LUN 0 through portal group `pg` (1 or 2).
    fn url(&self, pg: usize) -> String {
        self.0.url(pg - 1)
    }

    /// SIGKILL: no shutdown code runs, like a power cut of the target.
    fn kill9(mut self) {
        self.0.kill();
    }
}

/// An initiator port: iSCSI name plus ISID.
#[derive(Clone, Copy)]
struct Port {
    name: &'static str,
    isid: u64,
}

impl Port {
    const fn new(name: &'static str, isid: u64) -> Port {
        Port { name, isid }
    }

    fn text(&self) -> String {
        format!("{},i,0x{:012x}", self.name, self.isid)
    }

    fn tid(&self) -> TransportId {
        TransportId::Iscsi {
            name: self.name.to_string(),
            isid: Some(self.isid),
        }
    }
}

/// Log in as `port` through `url`, expecting exactly the unit attentions
/// `first` on the new session (POWER ON for a nexus new to the LU, I_T
/// NEXUS LOSS for one that logged out before).
async fn login(url: &str, port: Port, first: &[(u8, u8)]) -> Device {
    let cfg = SessionConfig {
        initiator_name: Some(port.name.to_string()),
        isid: Some(Isid::new(port.isid).expect("48-bit ISID")),
        login_timeout: Duration::from_secs(5),
        unit_attention_retries: 0,
        ..SessionConfig::default()
    };
    let url = IscsiUrl::parse(url).expect("URL");
    let dev = Device::connect(&url, &cfg)
        .await
        .unwrap_or_else(|e| panic!("login of {}: {e}", port.text()));
    assert_eq!(uas(&dev).await, first, "first UAs of {}", port.text());
    dev.capacity().await.expect("READ CAPACITY");
    dev
}

use Io::{Conflict, Good};

async fn read_io(dev: &Device) -> Io {
    io(
        "READ",
        dev.read(0, 1).await.map(|d| assert_eq!(d.len(), BLOCK)),
    )
}

async fn write_io(dev: &Device) -> Io {
    initiator_support::write(dev, 1, 0x5a).await
}

/// (READ, WRITE) access of `dev`.
async fn access(dev: &Device) -> (Io, Io) {
    (read_io(dev).await, write_io(dev).await)
}

/// SPC-4 table 65 for READ and WRITE: what a nexus that does not hold
/// the reservation gets, by type and by whether it is registered.
fn table65(t: PrType, registered: bool) -> (Io, Io) {
    use PrType::*;
    match (t, registered) {
        (WriteExclusive, _) => (Good, Conflict),
        (ExclusiveAccess, _) => (Conflict, Conflict),
        (WriteExclusiveRegistrantsOnly | WriteExclusiveAllRegistrants, false) => (Good, Conflict),
        (ExclusiveAccessRegistrantsOnly | ExclusiveAccessAllRegistrants, false) => {
            (Conflict, Conflict)
        }
        (_, true) => (Good, Good),
    }
}

fn all_registrants(t: PrType) -> bool {
    matches!(
        t,
        PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
    )
}

fn registrants_only(t: PrType) -> bool {
    matches!(
        t,
        PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
    )
}

fn keys(generation: u32, keys: &[u64]) -> ReadKeys {
    ReadKeys {
        generation,
        keys: keys.to_vec(),
    }
}

fn reservation(generation: u32, held: Option<(u64, PrType)>) -> ReadReservation {
    ReadReservation {
        generation,
        reservation: held.map(|(key, t)| ReservationDescriptor {
            key,
            scope: 0,
            pr_type: t.code(),
        }),
    }
}

/// READ FULL STATUS as comparable rows: (key, initiator port, relative
/// target port, ALL_TG_PT, R_HOLDER, TYPE when holder).
type Row = (u64, String, u16, bool, bool, Option<u8>);

fn rows(fs: &FullStatus) -> Vec<Row> {
    let mut r: Vec<Row> = fs
        .descriptors
        .iter()
        .map(|d| {
            assert_eq!(d.scope, 0, "LU_SCOPE");
            (
                d.key,
                d.transport_id.to_string(),
                d.relative_target_port,
                d.all_tg_pt,
                d.r_holder,
                d.r_holder.then_some(d.pr_type),
            )
        })
        .collect();
    r.sort();
    r
}

fn row(key: u64, p: Port, rel: u16, atp: bool, holder: Option<PrType>) -> Row {
    (
        key,
        p.text(),
        rel,
        atp,
        holder.is_some(),
        holder.map(PrType::code),
    )
}

fn sorted(mut v: Vec<Row>) -> Vec<Row> {
    v.sort();
    v
}

fn aptpl() -> RegisterOptions {
    RegisterOptions {
        aptpl: true,
        ..RegisterOptions::default()
    }
}

fn plain() -> RegisterOptions {
    RegisterOptions::default()
}

fn all_tg_pt(aptpl: bool) -> RegisterOptions {
    RegisterOptions {
        all_tg_pt: true,
        aptpl,
        ..RegisterOptions::default()
    }
}

/// Run `keyfence pr show ARGS` (blocking, bounded by its own timeout).
fn pr_show(args: &[&str]) -> Output {
    keyfence_testkit::run(
        Command::new(KF)
            .args(["pr", "show"])
            .args(args)
            .env_remove("KEYFENCE_CONFIG"),
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show_json(args: &[&str]) -> Value {
    let o = pr_show(args);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stderr), "");
    serde_json::from_slice(&o.stdout).expect("pr show --json output")
}

/// The JSON `pr show` prints for one registration.
fn reg_json(key: u64, p: Port, rel: u16, atp: bool, holder: bool) -> Value {
    json!({
        "key": format!("0x{key:016x}"),
        "initiator_port": p.text(),
        "relative_target_port": rel,
        "all_tg_pt": atp,
        "holder": holder,
    })
}

fn sorted_regs(v: &Value) -> Vec<Value> {
    let mut r = v.as_array().expect("registrations array").clone();
    r.sort_by_key(|x| x.to_string());
    r
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test did not finish in time");
}

// ----------------------------------------------------------------- a ---

const NODE_A: Port = Port::new("iqn.2026-11.io.keyfence.test:node-a", 0x8000_0000_a001);
const NODE_B: Port = Port::new("iqn.2026-11.io.keyfence.test:node-b", 0x8000_0000_b001);
const NODE_C: Port = Port::new("iqn.2026-11.io.keyfence.test:node-c", 0x8000_0000_c001);

#[tokio::test]
async fn aptpl_state_survives_kill_9_until_a_pr_out_clears_aptpl() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().to_path_buf();
        let (ka, kb, kc) = (0xa1a1_0000_0000_0001u64, 0xb2b2_0000_0000_0002, 0xc3c3_0003);
        let we_ro = PrType::WriteExclusiveRegistrantsOnly;

        let t = Target::start(&data);
        let a = login(&t.url(1), NODE_A, &[POWER_ON]).await;
        let b = login(&t.url(2), NODE_B, &[POWER_ON]).await;
        let caps = a.report_capabilities().await.unwrap();
        assert!(caps.ptpl_c && !caps.ptpl_a, "{caps:?}");
        a.register(0, ka, &aptpl()).await.unwrap();
        b.register(0, kb, &all_tg_pt(true)).await.unwrap();
        a.reserve(ka, we_ro).await.unwrap();
        let expect_rows = sorted(vec![
            row(ka, NODE_A, 1, false, Some(we_ro)),
            row(kb, NODE_B, 1, true, None),
            row(kb, NODE_B, 2, true, None),
        ]);
        let before_keys = a.read_keys().await.unwrap();
        assert_eq!(before_keys.generation, 2);
        let mut ks = before_keys.keys.clone();
        ks.sort();
        assert_eq!(ks, vec![ka, kb, kb]);
        assert_eq!(
            a.read_reservation().await.unwrap(),
            reservation(2, Some((ka, we_ro)))
        );
        let before_full = b.read_full_status().await.unwrap();
        assert_eq!(before_full.generation, 2);
        assert_eq!(rows(&before_full), expect_rows);
        assert!(b.report_capabilities().await.unwrap().ptpl_a);
        t.kill9();
        drop((a, b));

        // Target down: the persisted state, as `pr show` reads it.
        let v = show_json(&["--data-dir", data.to_str().unwrap(), "--json"]);
        let lu = &v.as_array().expect("array")[0];
        assert_eq!(v.as_array().unwrap().len(), 1);
        assert_eq!(lu["target"], IQN);
        assert_eq!(lu["lun"], 0);
        assert_eq!(lu["generation"], 2);
        assert_eq!(lu["aptpl"], true);
        assert_eq!(
            lu["reservation"],
            json!({"key": format!("0x{ka:016x}"), "type": "WE_RO", "type_code": 5, "scope": "LU"})
        );
        let expect_regs = sorted_regs(&json!([
            reg_json(ka, NODE_A, 1, false, true),
            reg_json(kb, NODE_B, 1, true, false),
            reg_json(kb, NODE_B, 2, true, false),
        ]));
        assert_eq!(sorted_regs(&lu["registrations"]), expect_regs);
        let table = pr_show(&["--data-dir", data.to_str().unwrap()]);
        assert_eq!(table.status.code(), Some(0));
        let out = text(&table.stdout);
        assert!(out.starts_with(&format!("Target {IQN}  LUN 0\n  PRgeneration 0x2  APTPL on  store version 3  (")), "{out}");
        assert!(
            out.contains(&format!(
                "  Reservation: Write Exclusive, registrants only (WE_RO), LU scope, key 0x{ka:016x}, held by {} via relative target port 1\n",
                NODE_A.text()
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!("  0x{kb:016x}  {}         2        yes  \n", NODE_B.text())),
            "{out}"
        );

        // Power on: same registrations and reservation, POWER ON OCCURRED
        // on every nexus, PRgeneration zero (SPC-4 6.15.2: "Regardless of
        // the APTPL bit value the PRgeneration value shall be set to zero
        // by a power on").
        let t = Target::start(&data);
        let a = login(&t.url(1), NODE_A, &[POWER_ON]).await;
        let b = login(&t.url(2), NODE_B, &[POWER_ON]).await;
        let c = login(&t.url(1), NODE_C, &[POWER_ON]).await;
        let ks = a.read_keys().await.unwrap();
        assert_eq!(
            ks,
            ReadKeys {
                generation: 0,
                ..before_keys
            }
        );
        assert_eq!(
            b.read_reservation().await.unwrap(),
            reservation(0, Some((ka, we_ro)))
        );
        let full = c.read_full_status().await.unwrap();
        assert_eq!(full.generation, 0);
        assert_eq!(rows(&full), expect_rows);
        assert_eq!(full.descriptors, before_full.descriptors, "same order too");
        assert!(c.report_capabilities().await.unwrap().ptpl_a);
        // The restored reservation is enforced.
        assert_eq!(access(&a).await, (Good, Good));
        assert_eq!(access(&b).await, (Good, Good));
        assert_eq!(access(&c).await, (Good, Conflict));

        // The live view equals the persisted one (but for the source,
        // the store version and the generation).
        let url2 = t.url(2);
        let live = tokio::task::spawn_blocking(move || {
            show_json(&[
                "--url",
                url2.as_str(),
                "--initiator-name",
                "iqn.2026-11.io.keyfence.test:observer",
                "--json",
            ])
        })
        .await
        .unwrap();
        let mut filed = lu.clone();
        filed["source"] = json!(t.url(2));
        filed["generation"] = json!(0);
        filed.as_object_mut().unwrap().remove("store_version");
        let mut live0 = live[0].clone();
        live0["registrations"] = json!(sorted_regs(&live0["registrations"]));
        filed["registrations"] = json!(expect_regs);
        assert_eq!(live0, filed);

        // A PR OUT with APTPL=0 makes the whole state volatile: the file
        // goes at once, and a power on forgets everything.
        c.register(0, kc, &plain()).await.unwrap();
        assert_eq!(c.read_keys().await.unwrap().generation, 1);
        assert!(!c.report_capabilities().await.unwrap().ptpl_a);
        let o = pr_show(&["--data-dir", data.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0));
        assert_eq!(
            text(&o.stdout),
            format!(
                "no persisted PR state under {} (APTPL never set, or cleared)\n",
                data.join("pr").display()
            )
        );
        t.kill9();
        drop((a, b, c));
        let t = Target::start(&data);
        let a = login(&t.url(1), NODE_A, &[POWER_ON]).await;
        assert_eq!(a.read_keys().await.unwrap(), keys(0, &[]));
        assert_eq!(a.read_reservation().await.unwrap(), reservation(0, None));
        assert_eq!(a.read_full_status().await.unwrap(), FullStatus::default());
        assert!(!a.report_capabilities().await.unwrap().ptpl_a);
        let c = login(&t.url(1), NODE_C, &[POWER_ON]).await;
        assert_eq!(access(&c).await, (Good, Good));
    })
    .await;
}

// ----------------------------------------------------------------- b ---

const HOLDER: Port = Port::new("iqn.2026-11.io.keyfence.test:holder", 0x8000_0000_0101);
const REGISTRANT: Port = Port::new("iqn.2026-11.io.keyfence.test:registrant", 0x8000_0000_0202);
const OUTSIDER: Port = Port::new("iqn.2026-11.io.keyfence.test:outsider", 0x8000_0000_0303);

#[tokio::test]
async fn six_types_access_ownership_and_unit_attentions() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Target::start(dir.path());
        // The registrant comes in through the other portal group.
        let h = login(&t.url(1), HOLDER, &[POWER_ON]).await;
        let r = login(&t.url(2), REGISTRANT, &[POWER_ON]).await;
        let n = login(&t.url(1), OUTSIDER, &[POWER_ON]).await;
        let mut gen = 0u32;
        for ty in PrType::ALL {
            let ar = all_registrants(ty);
            let ro = registrants_only(ty);
            let c = u64::from(ty.code());
            let (kh, kr, kn) = (0x1100 + c, 0x2200 + c, 0x3300 + c);
            let ctx = |what: &str| format!("{ty:?}: {what}");

            // Holder and registrant register; the holder reserves.
            h.register(0, kh, &plain()).await.unwrap();
            r.register(0, kr, &plain()).await.unwrap();
            gen += 2;
            h.reserve(kh, ty).await.unwrap();
            // RESERVE of the same type by the holder again: GOOD, no change.
            h.reserve(kh, ty).await.unwrap();
            assert_eq!(
                h.read_keys().await.unwrap(),
                keys(gen, &[kh, kr]),
                "{}",
                ctx("keys")
            );
            assert_eq!(
                n.read_reservation().await.unwrap(),
                reservation(gen, Some((if ar { 0 } else { kh }, ty))),
                "{}",
                ctx("reservation")
            );
            assert_eq!(
                rows(&n.read_full_status().await.unwrap()),
                sorted(vec![
                    row(kh, HOLDER, 1, false, Some(ty)),
                    row(kr, REGISTRANT, 2, false, ar.then_some(ty)),
                ]),
                "{}",
                ctx("full status")
            );
            assert_eq!(access(&h).await, (Good, Good), "{}", ctx("holder"));
            let r_expect = if ar { (Good, Good) } else { table65(ty, true) };
            assert_eq!(access(&r).await, r_expect, "{}", ctx("registrant"));
            assert_eq!(
                access(&n).await,
                table65(ty, false),
                "{}",
                ctx("non-registrant")
            );
            // Another RESERVE while reserved: only a holder with the same
            // type gets GOOD.
            let other = if ty == PrType::WriteExclusive {
                PrType::ExclusiveAccess
            } else {
                PrType::WriteExclusive
            };
            let r_reserve = r.reserve(kr, ty).await;
            if ar {
                r_reserve.unwrap();
            } else {
                assert!(
                    matches!(r_reserve, Err(Error::ReservationConflict)),
                    "{}",
                    ctx("RESERVE by registrant")
                );
            }
            assert!(
                matches!(h.reserve(kh, other).await, Err(Error::ReservationConflict)),
                "{}",
                ctx("RESERVE other type")
            );
            // Nobody has heard anything yet.
            for d in [&h, &r, &n] {
                assert_eq!(uas(d).await, vec![], "{}", ctx("no UA after reserve"));
            }

            // RELEASE by the holder: RESERVATIONS RELEASED to the other
            // registrants for registrants-only and all-registrants types,
            // not to the releaser, not to non-registrants.
            h.release(kh, ty).await.unwrap();
            let released = if ro || ar {
                vec![RESERVATIONS_RELEASED]
            } else {
                vec![]
            };
            assert_eq!(
                uas(&r).await,
                released,
                "{}",
                ctx("UA at registrant after RELEASE")
            );
            assert_eq!(uas(&h).await, vec![], "{}", ctx("UA at releaser"));
            assert_eq!(
                uas(&n).await,
                vec![],
                "{}",
                ctx("UA at non-registrant after RELEASE")
            );
            assert_eq!(h.read_reservation().await.unwrap(), reservation(gen, None));
            assert_eq!(access(&n).await, (Good, Good), "{}", ctx("released"));

            // The holder reserves again, then unregisters.
            h.reserve(kh, ty).await.unwrap();
            h.register(kh, 0, &plain()).await.unwrap();
            gen += 1;
            // (Read through the outsider: the registrant may have a unit
            // attention pending, checked below.)
            assert_eq!(n.read_keys().await.unwrap(), keys(gen, &[kr]));
            if ar {
                // All-registrants: kept while a registrant remains; the
                // registrant is still a holder, the leaver is not.
                assert_eq!(
                    r.read_reservation().await.unwrap(),
                    reservation(gen, Some((0, ty))),
                    "{}",
                    ctx("AR kept")
                );
                assert_eq!(uas(&r).await, vec![], "{}", ctx("AR: no UA"));
                assert_eq!(access(&r).await, (Good, Good));
                assert_eq!(access(&h).await, table65(ty, false), "{}", ctx("AR leaver"));
            } else {
                assert_eq!(
                    n.read_reservation().await.unwrap(),
                    reservation(gen, None),
                    "{}",
                    ctx("released by unregistering")
                );
                let expect = if ro {
                    vec![RESERVATIONS_RELEASED]
                } else {
                    vec![]
                };
                assert_eq!(
                    uas(&r).await,
                    expect,
                    "{}",
                    ctx("UA after holder unregistered")
                );
                assert_eq!(access(&n).await, (Good, Good));
            }
            assert_eq!(
                uas(&h).await,
                vec![],
                "{}",
                ctx("UA at unregistering holder")
            );
            assert_eq!(uas(&n).await, vec![], "{}", ctx("UA at non-registrant"));

            // The outsider registers and preempts the registrant (the
            // holder now): REGISTRATIONS PREEMPTED to it, nobody else.
            n.register(0, kn, &plain()).await.unwrap();
            gen += 1;
            if ar {
                n.preempt(kn, 0, ty).await.unwrap();
            } else {
                r.reserve(kr, ty).await.unwrap();
                n.preempt(kn, kr, ty).await.unwrap();
            }
            gen += 1;
            assert_eq!(
                uas(&r).await,
                vec![REGISTRATIONS_PREEMPTED],
                "{}",
                ctx("preempted")
            );
            assert_eq!(uas(&n).await, vec![], "{}", ctx("preemptor"));
            assert_eq!(uas(&h).await, vec![], "{}", ctx("bystander"));
            assert_eq!(n.read_keys().await.unwrap(), keys(gen, &[kn]));
            assert_eq!(
                n.read_reservation().await.unwrap(),
                reservation(gen, Some((if ar { 0 } else { kn }, ty))),
                "{}",
                ctx("after preempt")
            );
            assert_eq!(
                access(&r).await,
                table65(ty, false),
                "{}",
                ctx("preempted access")
            );
            assert_eq!(access(&n).await, (Good, Good));

            // CLEAR: RESERVATIONS PREEMPTED to every other registrant.
            h.register(0, kh, &plain()).await.unwrap();
            n.clear(kn).await.unwrap();
            gen += 2;
            assert_eq!(
                uas(&h).await,
                vec![RESERVATIONS_PREEMPTED],
                "{}",
                ctx("cleared")
            );
            assert_eq!(uas(&n).await, vec![], "{}", ctx("clearer"));
            assert_eq!(uas(&r).await, vec![], "{}", ctx("unregistered at CLEAR"));
            assert_eq!(h.read_keys().await.unwrap(), keys(gen, &[]));
            assert_eq!(h.read_reservation().await.unwrap(), reservation(gen, None));
        }
    })
    .await;
}

// ----------------------------------------------------------------- c ---

const SAME: Port = Port::new("iqn.2026-11.io.keyfence.test:same", 0x8000_0000_5a01);
const SAME_NEW_ISID: Port = Port::new("iqn.2026-11.io.keyfence.test:same", 0x8000_0000_5a02);
const OWNER: Port = Port::new("iqn.2026-11.io.keyfence.test:owner", 0x8000_0000_0e01);
const EVERYWHERE: Port = Port::new("iqn.2026-11.io.keyfence.test:everywhere", 0x8000_0000_0e02);

#[tokio::test]
async fn nexus_identity_isid_and_portal_groups() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Target::start(dir.path());
        let we_ro = PrType::WriteExclusiveRegistrantsOnly;
        let (ko, ks, ks2, ke) = (0x0e01u64, 0x5a01u64, 0x5a02u64, 0x0e02u64);
        let owner = login(&t.url(1), OWNER, &[POWER_ON]).await;
        owner.register(0, ko, &plain()).await.unwrap();
        owner.reserve(ko, we_ro).await.unwrap();

        // Registered through portal group 1.
        let s = login(&t.url(1), SAME, &[POWER_ON]).await;
        assert_eq!(write_io(&s).await, Conflict);
        s.register(0, ks, &plain()).await.unwrap();
        assert_eq!(write_io(&s).await, Good);
        s.close().await.unwrap();

        // Logout and login with the same ISID: the same I_T nexus, still
        // registered; the loss of the nexus is reported first.
        let s = login(&t.url(1), SAME, &[NEXUS_LOSS]).await;
        assert_eq!(write_io(&s).await, Good);
        // REGISTER with the old key proves the target knows us.
        s.register(ks, ks, &plain()).await.unwrap();

        // A new ISID is another initiator port: not registered.
        let s2 = login(&t.url(1), SAME_NEW_ISID, &[POWER_ON]).await;
        assert_eq!(access(&s2).await, (Good, Conflict));
        assert!(matches!(
            s2.register(ks, ks, &plain()).await,
            Err(Error::ReservationConflict)
        ));
        s2.register(0, ks2, &plain()).await.unwrap();
        assert_eq!(access(&s2).await, (Good, Good));

        // The same initiator port through portal group 2 is another I_T
        // nexus: the registration made through group 1 does not cover it.
        let s_pg2 = login(&t.url(2), SAME, &[POWER_ON]).await;
        assert_eq!(access(&s_pg2).await, (Good, Conflict));
        assert!(matches!(
            s_pg2.register(ks, ks, &plain()).await,
            Err(Error::ReservationConflict)
        ));

        // ALL_TG_PT through group 1 registers group 2's nexus as well.
        let e1 = login(&t.url(1), EVERYWHERE, &[POWER_ON]).await;
        e1.register(0, ke, &all_tg_pt(false)).await.unwrap();
        let e2 = login(&t.url(2), EVERYWHERE, &[POWER_ON]).await;
        assert_eq!(access(&e2).await, (Good, Good));

        // Owner, SAME (rel 1), SAME_NEW_ISID, EVERYWHERE on both ports.
        let fs = owner.read_full_status().await.unwrap();
        // REGISTERs: owner, s, s (again), s2, e1.
        assert_eq!(fs.generation, 5);
        assert_eq!(
            rows(&fs),
            sorted(vec![
                row(ko, OWNER, 1, false, Some(we_ro)),
                row(ks, SAME, 1, false, None),
                row(ks2, SAME_NEW_ISID, 1, false, None),
                row(ke, EVERYWHERE, 1, true, None),
                row(ke, EVERYWHERE, 2, true, None),
            ])
        );
        for d in [&owner, &s, &s2, &s_pg2, &e1, &e2] {
            assert_eq!(uas(d).await, vec![]);
        }
    })
    .await;
}

// ------------------------------------------------------------- d + e ---

const NODE: Port = Port::new("iqn.2026-11.io.keyfence.test:node", 0x8000_0000_d001);
const NODE_REBORN: Port = Port::new("iqn.2026-11.io.keyfence.test:node", 0x8000_0000_d002);
const PEER: Port = Port::new("iqn.2026-11.io.keyfence.test:peer", 0x8000_0000_d003);

#[tokio::test]
async fn takeover_from_a_new_isid_then_pr_show_url() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Target::start(dir.path());
        let we = PrType::WriteExclusive;
        let (kold, knew, kpeer) = (0xdead_0001u64, 0xbeef_0002u64, 0x9e9e_0003u64);
        let old = login(&t.url(1), NODE, &[POWER_ON]).await;
        old.register(0, kold, &plain()).await.unwrap();
        old.reserve(kold, we).await.unwrap();
        let peer = login(&t.url(2), PEER, &[POWER_ON]).await;
        peer.register(0, kpeer, &all_tg_pt(false)).await.unwrap();
        assert_eq!(access(&peer).await, (Good, Conflict));

        // The node comes back with a new ISID (its old session is still
        // logged in): a new I_T nexus, which must take over.
        let new = login(&t.url(1), NODE_REBORN, &[POWER_ON]).await;
        assert_eq!(access(&new).await, (Good, Conflict));
        new.register(0, knew, &plain()).await.unwrap();
        let fs = new.read_full_status().await.unwrap();
        assert_eq!(fs.generation, 3);
        let mine: Vec<_> = fs
            .descriptors
            .iter()
            .filter(|d| {
                matches!(&d.transport_id, TransportId::Iscsi { name, isid }
                    if name == NODE.name && *isid != Some(NODE_REBORN.isid))
            })
            .collect();
        assert_eq!(mine.len(), 1, "{fs:?}");
        assert_eq!(
            (mine[0].key, mine[0].r_holder, mine[0].pr_type, &mine[0].transport_id),
            (kold, true, we.code(), &NODE.tid())
        );
        new.preempt_and_abort(knew, mine[0].key, we).await.unwrap();
        assert_eq!(new.read_keys().await.unwrap().keys.iter().filter(|&&k| k == kold).count(), 0);
        assert_eq!(
            new.read_reservation().await.unwrap(),
            reservation(4, Some((knew, we)))
        );
        assert_eq!(access(&new).await, (Good, Good));

        // The old nexus: REGISTRATIONS PREEMPTED, then conflicts.
        assert_eq!(uas(&old).await, vec![REGISTRATIONS_PREEMPTED]);
        assert_eq!(access(&old).await, (Good, Conflict));
        assert!(matches!(old.register(kold, kold, &plain()).await, Err(Error::ReservationConflict)));
        assert!(matches!(old.release(kold, we).await, Err(Error::ReservationConflict)));
        assert_eq!(uas(&peer).await, vec![]);
        assert_eq!(uas(&new).await, vec![]);

        // e: `pr show --url` shows exactly this, through either portal.
        let expect = json!([{
            "source": t.url(2),
            "target": IQN,
            "lun": 0,
            "generation": 4,
            "aptpl": false,
            "reservation": {
                "key": format!("0x{knew:016x}"),
                "type": "WE",
                "type_code": 1,
                "scope": "LU",
            },
            "registrations": sorted_regs(&json!([
                reg_json(kpeer, PEER, 1, true, false),
                reg_json(kpeer, PEER, 2, true, false),
                reg_json(knew, NODE_REBORN, 1, false, true),
            ])),
        }]);
        let url2 = t.url(2);
        let observer = "iqn.2026-11.io.keyfence.test:observer";
        let mut got = tokio::task::spawn_blocking(move || {
            show_json(&["--url", url2.as_str(), "--initiator-name", observer, "--json"])
        })
            .await
            .unwrap();
        got[0]["registrations"] = json!(sorted_regs(&got[0]["registrations"]));
        assert_eq!(got, expect);

        let url1 = t.url(1);
        let o = tokio::task::spawn_blocking(move || {
            pr_show(&["--url", url1.as_str(), "--initiator-name", observer])
        })
        .await
        .unwrap();
        assert_eq!((o.status.code(), text(&o.stderr)), (Some(0), String::new()));
        let out = text(&o.stdout);
        let head = format!(
            "Target {IQN}  LUN 0\n  PRgeneration 0x4  APTPL off  ({})\n  Reservation: Write Exclusive (WE), LU scope, key 0x{knew:016x}, held by {} via relative target port 1\n",
            t.url(1),
            NODE_REBORN.text()
        );
        assert!(out.starts_with(&head), "{out}");
        assert!(
            out.contains(&format!("  0x{knew:016x}  {}         1         no  WE\n", NODE_REBORN.text())),
            "{out}"
        );
        assert_eq!(out.lines().count(), 3 + 1 + 3 + 1, "{out}");

        // A target that is not there: one line, exit status 1.
        let closed = keyfence_testkit::port::ClosedPort::new();
        let dead = format!("iscsi://127.0.0.1:{}/{IQN}/0", closed.port());
        let o = tokio::task::spawn_blocking(move || {
            pr_show(&["--url", dead.as_str(), "--initiator-name", observer])
        })
        .await
        .unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(o.stdout, b"");
        let err = text(&o.stderr);
        assert!(err.starts_with("keyfence pr show: iscsi://127.0.0.1:"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    })
    .await;
}

// ----------------------------------------------------------------- f ---

const MOVER: Port = Port::new("iqn.2026-11.io.keyfence.test:mover", 0x8000_0000_f001);
const STAYER: Port = Port::new("iqn.2026-11.io.keyfence.test:stayer", 0x8000_0000_f002);
const TAKER: Port = Port::new("iqn.2026-11.io.keyfence.test:taker", 0x8000_0000_f003);
const HEIR: Port = Port::new("iqn.2026-11.io.keyfence.test:heir", 0x8000_0000_f004);

fn illegal_request(r: Result<(), Error>) -> (u8, u8) {
    match r {
        Err(Error::CheckCondition(s)) if s.key == keyfence_initiator::SenseKey::IllegalRequest => {
            (s.asc, s.ascq)
        }
        other => panic!("expected ILLEGAL REQUEST, got {other:?}"),
    }
}

#[tokio::test]
async fn release_errors_preempt_variants_and_register_and_move() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Target::start(dir.path());
        let (we_ro, ea_ro) = (
            PrType::WriteExclusiveRegistrantsOnly,
            PrType::ExclusiveAccessRegistrantsOnly,
        );
        let (km, ks, kt, kh) = (0xf1u64, 0xf2u64, 0xf3u64, 0xf4u64);
        let m = login(&t.url(1), MOVER, &[POWER_ON]).await;
        let s = login(&t.url(1), STAYER, &[POWER_ON]).await;
        let k = login(&t.url(2), TAKER, &[POWER_ON]).await;
        m.register(0, km, &plain()).await.unwrap();
        s.register(0, ks, &plain()).await.unwrap();
        k.register(0, kt, &plain()).await.unwrap();
        m.reserve(km, we_ro).await.unwrap();

        // RESERVE from an unregistered nexus, REGISTER with a wrong key:
        // RESERVATION CONFLICT. RELEASE of another type by the holder:
        // INVALID RELEASE OF PERSISTENT RESERVATION. RELEASE by a
        // registrant that does not hold: GOOD, nothing happens.
        let h = login(&t.url(1), HEIR, &[POWER_ON]).await;
        assert!(matches!(
            h.reserve(kh, we_ro).await,
            Err(Error::ReservationConflict)
        ));
        assert!(matches!(
            s.register(ks + 1, 0x99, &plain()).await,
            Err(Error::ReservationConflict)
        ));
        assert_eq!(illegal_request(m.release(km, ea_ro).await), (0x26, 0x04));
        s.release(ks, we_ro).await.unwrap();
        assert_eq!(
            s.read_reservation().await.unwrap(),
            reservation(3, Some((km, we_ro)))
        );
        // PREEMPT with a zero key when the reservation is not
        // all-registrants: INVALID FIELD IN PARAMETER LIST.
        assert_eq!(illegal_request(k.preempt(kt, 0, we_ro).await), (0x26, 0x00));
        // PREEMPT of a key nobody has: RESERVATION CONFLICT.
        assert!(matches!(
            k.preempt(kt, 0x7777, we_ro).await,
            Err(Error::ReservationConflict)
        ));
        for d in [&m, &s, &k, &h] {
            assert_eq!(uas(d).await, vec![]);
        }

        // PREEMPT of a registrant that does not hold: its registration
        // goes, the reservation stays.
        k.preempt(kt, ks, we_ro).await.unwrap();
        assert_eq!(uas(&s).await, vec![REGISTRATIONS_PREEMPTED]);
        assert_eq!(uas(&m).await, vec![]);
        assert_eq!(uas(&k).await, vec![]);
        assert_eq!(
            k.read_reservation().await.unwrap(),
            reservation(4, Some((km, we_ro)))
        );
        assert_eq!(access(&s).await, (Good, Conflict));

        // PREEMPT of the holder with another type: the holder loses
        // registration and reservation (REGISTRATIONS PREEMPTED); the
        // registrants that keep their registration hear RESERVATIONS
        // RELEASED because the type changed (SPC-4 5.12.11.2.4).
        s.register(0, ks, &plain()).await.unwrap();
        k.preempt(kt, km, ea_ro).await.unwrap();
        assert_eq!(uas(&m).await, vec![REGISTRATIONS_PREEMPTED]);
        assert_eq!(uas(&s).await, vec![RESERVATIONS_RELEASED]);
        assert_eq!(uas(&k).await, vec![]);
        assert_eq!(uas(&h).await, vec![]);
        assert_eq!(k.read_keys().await.unwrap(), keys(6, &[kt, ks]));
        assert_eq!(
            k.read_reservation().await.unwrap(),
            reservation(6, Some((kt, ea_ro)))
        );
        assert_eq!(access(&m).await, (Conflict, Conflict));
        assert_eq!(access(&s).await, (Good, Good));

        // REGISTER AND MOVE to an initiator port that has not logged in
        // yet, through the other target port: it is registered with the
        // new key and holds the reservation; the mover stays registered.
        k.register_and_move(
            kt,
            kh,
            ea_ro,
            &keyfence_initiator::MoveTarget {
                transport_id: HEIR.tid(),
                relative_target_port: 2,
                unreg: false,
                aptpl: false,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            rows(&s.read_full_status().await.unwrap()),
            sorted(vec![
                row(kt, TAKER, 2, false, None),
                row(ks, STAYER, 1, false, None),
                row(kh, HEIR, 2, false, Some(ea_ro)),
            ])
        );
        assert_eq!(
            s.read_reservation().await.unwrap(),
            reservation(7, Some((kh, ea_ro)))
        );
        // The heir's nexus through port 1 is not the one moved to.
        assert_eq!(access(&h).await, (Conflict, Conflict));
        let h2 = login(&t.url(2), HEIR, &[POWER_ON]).await;
        assert_eq!(access(&h2).await, (Good, Good));
        // RELEASE by the new holder: EA_RO is a registrants-only type.
        h2.release(kh, ea_ro).await.unwrap();
        assert_eq!(uas(&k).await, vec![RESERVATIONS_RELEASED]);
        assert_eq!(uas(&s).await, vec![RESERVATIONS_RELEASED]);
        assert_eq!(uas(&h2).await, vec![]);
        assert_eq!(uas(&h).await, vec![]);
        assert_eq!(uas(&m).await, vec![]);

        // An all-registrants reservation lasts until its last registrant
        // leaves, then goes without a unit attention to anybody.
        let we_ar = PrType::WriteExclusiveAllRegistrants;
        h2.reserve(kh, we_ar).await.unwrap();
        k.register(kt, 0, &plain()).await.unwrap();
        s.register(ks, 0, &plain()).await.unwrap();
        assert_eq!(
            m.read_reservation().await.unwrap(),
            reservation(9, Some((0, we_ar)))
        );
        assert_eq!(access(&s).await, (Good, Conflict));
        h2.register(kh, 0, &plain()).await.unwrap();
        assert_eq!(m.read_keys().await.unwrap(), keys(10, &[]));
        assert_eq!(m.read_reservation().await.unwrap(), reservation(10, None));
        for d in [&m, &s, &k, &h, &h2] {
            assert_eq!(uas(d).await, vec![]);
        }
        assert_eq!(access(&s).await, (Good, Good));

        // `pr show --url` of an LU without registrations.
        let url1 = t.url(1);
        let o = tokio::task::spawn_blocking(move || {
            pr_show(&[
                "--url",
                url1.as_str(),
                "--initiator-name",
                "iqn.2026-11.io.keyfence.test:observer",
            ])
        })
        .await
        .unwrap();
        assert_eq!(
            (o.status.code(), text(&o.stdout), text(&o.stderr)),
            (
                Some(0),
                format!(
                    "Target {IQN}  LUN 0\n  PRgeneration 0xa  APTPL off  ({})\n  \
                     Reservation: none\n  Registrations: none\n\n",
                    t.url(1)
                ),
                String::new()
            )
        );
    })
    .await;
}

// ----------------------------------------------------------------- g ---

const TWIN_1: Port = Port::new("iqn.2026-11.io.keyfence.test:twin", 0x8000_0000_7101);
const TWIN_2: Port = Port::new("iqn.2026-11.io.keyfence.test:twin", 0x8000_0000_7102);
const SPONSOR: Port = Port::new("iqn.2026-11.io.keyfence.test:sponsor", 0x8000_0000_7103);
const GONE: Port = Port::new("iqn.2026-11.io.keyfence.test:gone", 0x8000_0000_7104);

#[tokio::test]
async fn spec_i_pt_and_preempted_while_logged_out() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Target::start(dir.path());
        let we_ro = PrType::WriteExclusiveRegistrantsOnly;
        let (ks, kg) = (0x5501u64, 0x5502u64);
        let t1 = login(&t.url(1), TWIN_1, &[POWER_ON]).await;
        let t2 = login(&t.url(1), TWIN_2, &[POWER_ON]).await;
        let sp = login(&t.url(1), SPONSOR, &[POWER_ON]).await;
        let gone = login(&t.url(2), GONE, &[POWER_ON]).await;
        gone.register(0, kg, &plain()).await.unwrap();
        gone.reserve(kg, we_ro).await.unwrap();
        assert_eq!(write_io(&t1).await, Conflict);

        // SPEC_I_PT with an iSCSI name only (format 00b): every initiator
        // port of that name known to the LU, through this target port.
        let by_name = TransportId::Iscsi {
            name: TWIN_1.name.to_string(),
            isid: None,
        };
        let opts = RegisterOptions {
            spec_i_pt: vec![by_name],
            ..RegisterOptions::default()
        };
        sp.register(0, ks, &opts).await.unwrap();
        assert_eq!(
            rows(&sp.read_full_status().await.unwrap()),
            sorted(vec![
                row(kg, GONE, 2, false, Some(we_ro)),
                row(ks, SPONSOR, 1, false, None),
                row(ks, TWIN_1, 1, false, None),
                row(ks, TWIN_2, 1, false, None),
            ])
        );
        assert_eq!(write_io(&t1).await, Good);
        assert_eq!(write_io(&t2).await, Good);
        // SPEC_I_PT names I_T nexuses through the receiving target port:
        // through port 2, TWIN_2 is not registered yet, so GOOD ...
        let name_twin_2 = RegisterOptions {
            spec_i_pt: vec![TWIN_2.tid()],
            ..RegisterOptions::default()
        };
        let sp2 = login(&t.url(2), SPONSOR, &[POWER_ON]).await;
        sp2.register(0, 0x5503, &name_twin_2).await.unwrap();
        // ... through port 1 it is: INVALID FIELD IN PARAMETER LIST, and
        // nothing changes (all or nothing).
        let sp3 = Port::new(SPONSOR.name, 0x8000_0000_7105);
        let sp3 = login(&t.url(1), sp3, &[POWER_ON]).await;
        assert_eq!(
            illegal_request(sp3.register(0, 0x5504, &name_twin_2).await),
            (0x26, 0x00)
        );
        assert_eq!(sp3.read_keys().await.unwrap().keys.len(), 6);
        assert_eq!(sp.read_keys().await.unwrap().generation, 3);

        // The holder logs out; another node preempts it meanwhile. On its
        // return it hears of the nexus loss, then of the preemption, and
        // its writes conflict. This relies on the target sending the Logout
        // Response only after the nexus loss is applied: a nexus loss
        // replaces whatever unit attentions its nexus had queued, so one
        // applied after the PREEMPT would drop REGISTRATIONS PREEMPTED
        // (before the logout fix, af923e9, it could, and this test then
        // saw I_T NEXUS LOSS OCCURRED alone).
        gone.close().await.unwrap();
        sp.preempt(ks, kg, we_ro).await.unwrap();
        // The registrants sharing the preemptor's key keep it; same type,
        // so they hear nothing.
        assert_eq!(uas(&t1).await, vec![]);
        assert_eq!(uas(&t2).await, vec![]);
        let back = login(&t.url(2), GONE, &[NEXUS_LOSS, REGISTRATIONS_PREEMPTED]).await;
        assert_eq!(access(&back).await, (Good, Conflict));
        assert_eq!(
            back.read_reservation().await.unwrap(),
            reservation(4, Some((ks, we_ro)))
        );
    })
    .await;
}

// ------------------------------------------------------------ logout ---

const RESERVER: Port = Port::new("iqn.2026-11.io.keyfence.test:reserver", 0x8000_0000_1601);
const NEXT: Port = Port::new("iqn.2026-11.io.keyfence.test:next", 0x8000_0000_1602);

/// SPC-2 RESERVE(6) / RELEASE(6).
async fn spc2(dev: &Device, opcode: u8) -> Io {
    let cmd = keyfence_initiator::commands::Command::none(vec![opcode, 0, 0, 0, 0, 0]);
    io("RESERVE/RELEASE(6)", dev.execute(&cmd).await.map(drop))
}

/// The Logout Response is sent only once the nexus loss has been applied:
/// another initiator's RESERVE(6) right after the logout returned is GOOD,
/// every time (libiscsi's Reserve6.Logout).
#[tokio::test]
async fn a_logout_releases_the_scsi2_reservation_before_its_response() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Target::start(dir.path());
        let next = login(&t.url(2), NEXT, &[POWER_ON]).await;
        for round in 0..20 {
            // A nexus that logged in before starts with I_T NEXUS LOSS
            // OCCURRED.
            let first: &[(u8, u8)] = if round == 0 {
                &[POWER_ON]
            } else {
                &[NEXUS_LOSS]
            };
            let r = login(&t.url(1), RESERVER, first).await;
            assert_eq!(spc2(&r, 0x16).await, Good, "round {round}: RESERVE(6)");
            assert_eq!(spc2(&next, 0x16).await, Conflict, "round {round}");
            r.close().await.expect("logout");
            assert_eq!(
                spc2(&next, 0x16).await,
                Good,
                "round {round}: RESERVE(6) right after the holder's logout"
            );
            assert_eq!(spc2(&next, 0x17).await, Good, "round {round}: RELEASE(6)");
        }
    })
    .await;
}
