//! Cluster mode end to end: a three-member etcd on loopback (Debian's
//! etcd-server) and two `keyfence serve` gateways on one shared backing
//! file, each with its own portal group (TPGT 1 and 2), driven over iSCSI
//! by the initiator library.
//!
//! A reservation taken through gateway A binds gateway B at once; a
//! PREEMPT through B delivers REGISTRATIONS PREEMPTED to the victim's
//! nexus on A and takes its write access away there; a write through one
//! gateway is read through the other. Three initiators on three gateways
//! see the access rules and unit attentions of all six reservation types.
//! A logout releases its SCSI-2 reservation before the Logout Response;
//! COMPARE AND WRITE races through two gateways have one winner each.

mod initiator_support;

use std::time::{Duration, Instant};

use initiator_support::{uas, write, Io, BLOCK};
use keyfence_initiator::{Bytes, Device, Error, PrType, RegisterOptions, SenseKey};
use keyfence_testkit::{opened_direct, ClusterOptions, ClusterRig};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:cluster";
const TEST_LIMIT: Duration = Duration::from_secs(90);
const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);

/// A three-member etcd and `n` gateways (TPGT 1, 2, ...) serving one
/// 64 MiB backing file, configured with command-line flags (`--cluster`,
/// `--gateway`, `--first-tpgt`).
fn start(n: usize) -> ClusterRig {
    let opts = ClusterOptions::new(KF, IQN)
        .gateways(n)
        .lun_size(64 << 20)
        .flags();
    tokio::task::block_in_place(|| ClusterRig::start(opts))
}

/// Log in as `name` through `url` and wait (bounded) until the gateway
/// serves the clustered LU; the unit attentions of the new nexus are
/// consumed.
async fn login(url: &str, name: &str) -> Device {
    initiator_support::login(url, name, 0x23d0_0000_0001).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_through_one_gateway_binds_the_other() {
    let cluster = start(2);
    let shared = cluster.backing_file(0);
    let [a, b] = cluster.gateways() else {
        unreachable!()
    };
    let (url_a, url_b) = (cluster.url(0, 0), cluster.url(1, 0));
    // Gateways on different hosts share no page cache: each serves the
    // clustered LU uncached.
    for (g, name) in [(a, "A"), (b, "B")] {
        let pid = g.pid().expect("gateway pid");
        assert!(
            opened_direct(pid, shared),
            "gateway {name} has not opened the backing file O_DIRECT"
        );
    }
    tokio::time::timeout(TEST_LIMIT, async {
        let x = login(&url_a, "iqn.2026-11.test:x").await;
        let y = login(&url_b, "iqn.2026-11.test:y").await;
        let z = login(&url_b, "iqn.2026-11.test:z").await;
        let none = RegisterOptions::default();

        // x registers and reserves Write Exclusive - Registrants Only
        // through A.
        x.register(0, 0xa1, &none).await.expect("REGISTER x on A");
        x.reserve(0xa1, PrType::WriteExclusiveRegistrantsOnly)
            .await
            .expect("RESERVE on A");
        assert_eq!(write(&x, 1, 0x11).await, Io::Good);
        // Through B: unregistered initiators may read but not write.
        assert_eq!(write(&z, 1, 0x22).await, Io::Conflict);
        assert_eq!(write(&y, 1, 0x22).await, Io::Conflict);
        assert_eq!(z.read(1, 1).await.expect("READ z on B")[..], [0x11; BLOCK]);
        let r = z.read_reservation().await.expect("READ RESERVATION on B");
        assert_eq!(r.reservation.map(|d| d.key), Some(0xa1));
        // y registers through B and may write; B sees both keys.
        y.register(0, 0xb1, &none).await.expect("REGISTER y on B");
        assert_eq!(write(&y, 2, 0x33).await, Io::Good);
        assert_eq!(x.read(2, 1).await.expect("READ x on A")[..], [0x33; BLOCK]);
        assert_eq!(
            y.read_keys().await.expect("READ KEYS").keys,
            vec![0xa1, 0xb1]
        );
        // y preempts x through B: x's nexus on A gets REGISTRATIONS
        // PREEMPTED and loses write access; z on B gets nothing.
        y.preempt(0xb1, 0xa1, PrType::WriteExclusiveRegistrantsOnly)
            .await
            .expect("PREEMPT on B");
        assert_eq!(uas(&x).await, vec![REGISTRATIONS_PREEMPTED]);
        assert_eq!(write(&x, 1, 0x44).await, Io::Conflict);
        assert_eq!(uas(&z).await, vec![]);
        assert_eq!(write(&y, 1, 0x55).await, Io::Good);
        assert_eq!(x.read(1, 1).await.expect("READ x on A")[..], [0x55; BLOCK]);
        let r = x.read_reservation().await.expect("READ RESERVATION on A");
        assert_eq!(r.reservation.map(|d| d.key), Some(0xb1));
        for d in [x, y, z] {
            let _ = d.close().await;
        }
    })
    .await
    .expect("test bounded");
}

const RESERVATIONS_RELEASED: (u8, u8) = (0x2a, 0x04);

/// What SPC-4's access rules (5.12.1, the table of commands allowed under
/// each type) give a registered non-holder and an unregistered initiator:
/// (registrant read, registrant write, stranger read, stranger write).
fn access(t: PrType) -> (bool, bool, bool, bool) {
    match t {
        PrType::WriteExclusive => (true, false, true, false),
        PrType::ExclusiveAccess => (false, false, false, false),
        PrType::WriteExclusiveRegistrantsOnly | PrType::WriteExclusiveAllRegistrants => {
            (true, true, true, false)
        }
        PrType::ExclusiveAccessRegistrantsOnly | PrType::ExclusiveAccessAllRegistrants => {
            (true, true, false, false)
        }
    }
}

async fn can_read(dev: &Device) -> bool {
    match dev.read(3, 1).await {
        Ok(_) => true,
        Err(Error::ReservationConflict) => false,
        Err(e) => panic!("READ: unexpected {e}"),
    }
}

/// Three initiators, each on its own gateway, under each of the six
/// reservation types: x (gateway 1) holds, y (gateway 2) is registered,
/// z (gateway 3) is not. Access on every gateway follows the type, READ
/// RESERVATION through a third gateway shows it, RELEASE and PREEMPT
/// deliver their unit attentions to the right nexus on another gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_types_three_initiators_three_gateways() {
    let cluster = start(3);
    let urls: Vec<String> = (0..3).map(|gw| cluster.url(gw, 0)).collect();
    tokio::time::timeout(TEST_LIMIT, async {
        let x = login(&urls[0], "iqn.2026-11.test:x").await;
        let y = login(&urls[1], "iqn.2026-11.test:y").await;
        let z = login(&urls[2], "iqn.2026-11.test:z").await;
        let none = RegisterOptions::default();
        for t in [
            PrType::WriteExclusive,
            PrType::ExclusiveAccess,
            PrType::WriteExclusiveRegistrantsOnly,
            PrType::ExclusiveAccessRegistrantsOnly,
            PrType::WriteExclusiveAllRegistrants,
            PrType::ExclusiveAccessAllRegistrants,
        ] {
            let all_registrants = matches!(
                t,
                PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
            );
            x.register(0, 0xa1, &none).await.expect("REGISTER x");
            y.register(0, 0xb1, &none).await.expect("REGISTER y");
            x.reserve(0xa1, t).await.expect("RESERVE x");
            let r = z
                .read_reservation()
                .await
                .expect("READ RESERVATION on gateway 3");
            let d = r
                .reservation
                .expect("a reservation, seen through gateway 3");
            assert_eq!(d.pr_type, t as u8, "{t:?}");
            assert_eq!(d.key, if all_registrants { 0 } else { 0xa1 }, "{t:?}");

            let (reg_r, reg_w, str_r, str_w) = access(t);
            assert!(can_read(&x).await, "{t:?}: holder read");
            assert_eq!(write(&x, 3, 0x10).await, Io::Good, "{t:?}: holder write");
            assert_eq!(can_read(&y).await, reg_r, "{t:?}: registrant read");
            assert_eq!(
                write(&y, 3, 0x20).await == Io::Good,
                reg_w,
                "{t:?}: registrant write"
            );
            assert_eq!(can_read(&z).await, str_r, "{t:?}: stranger read");
            assert_eq!(
                write(&z, 3, 0x30).await == Io::Good,
                str_w,
                "{t:?}: stranger write"
            );

            // RELEASE through gateway 1: the other registrant hears of it
            // on gateway 2 for the registrants-only and all-registrants
            // types (SPC-4 5.12.11.2.2), nobody for the others.
            x.release(0xa1, t).await.expect("RELEASE x");
            let released = !matches!(t, PrType::WriteExclusive | PrType::ExclusiveAccess);
            assert_eq!(
                uas(&y).await,
                if released {
                    vec![RESERVATIONS_RELEASED]
                } else {
                    vec![]
                },
                "{t:?}: y after RELEASE"
            );
            assert_eq!(uas(&x).await, vec![], "{t:?}: x after its RELEASE");
            assert_eq!(uas(&z).await, vec![], "{t:?}: z after RELEASE");
            assert_eq!(
                write(&z, 3, 0x40).await,
                Io::Good,
                "{t:?}: no reservation left"
            );

            // PREEMPT of x's key through gateway 2: x, on gateway 1, loses
            // its registration and hears REGISTRATIONS PREEMPTED.
            x.reserve(0xa1, t).await.expect("RESERVE x again");
            y.preempt(0xb1, 0xa1, t).await.expect("PREEMPT by y");
            assert_eq!(
                uas(&x).await,
                vec![REGISTRATIONS_PREEMPTED],
                "{t:?}: x after PREEMPT"
            );
            assert_eq!(uas(&z).await, vec![], "{t:?}: z after PREEMPT");
            assert_eq!(uas(&y).await, vec![], "{t:?}: y after its PREEMPT");
            assert_eq!(
                write(&x, 3, 0x50).await,
                Io::Conflict,
                "{t:?}: preempted x writes"
            );
            assert_eq!(
                write(&y, 3, 0x60).await,
                Io::Good,
                "{t:?}: y writes after PREEMPT"
            );
            let keys = x.read_keys().await.expect("READ KEYS on gateway 1").keys;
            assert_eq!(keys, vec![0xb1], "{t:?}: keys after PREEMPT");

            // Leave nothing behind for the next type.
            y.clear(0xb1).await.expect("CLEAR by y");
            for d in [&x, &y, &z] {
                assert_eq!(uas(d).await, vec![], "{t:?}: after CLEAR");
            }
        }
        for d in [x, y, z] {
            let _ = d.close().await;
        }
    })
    .await
    .expect("test bounded");
}

/// SPC-2 RESERVE(6) / RELEASE(6): GOOD or RESERVATION CONFLICT.
async fn spc2(dev: &Device, opcode: u8) -> Io {
    match dev
        .execute(&keyfence_initiator::commands::Command::none(vec![
            opcode, 0, 0, 0, 0, 0,
        ]))
        .await
    {
        Ok(_) => Io::Good,
        Err(Error::ReservationConflict) => Io::Conflict,
        Err(e) => panic!("{opcode:02x}h: unexpected {e}"),
    }
}

/// A logout ends the SCSI-2 reservation of its I_T nexus cluster-wide
/// before the Logout Response: a RESERVE(6) through the other gateway
/// right after the logout returned is GOOD, every time (libiscsi's
/// Reserve6.Logout across gateways).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_releases_the_scsi2_reservation_before_its_response() {
    const ROUNDS: usize = 12;
    let cluster = start(2);
    let (url_a, url_b) = (cluster.url(0, 0), cluster.url(1, 0));
    tokio::time::timeout(TEST_LIMIT, async {
        let y = login(&url_b, "iqn.2026-11.test:logout-b").await;
        for round in 0..ROUNDS {
            let x = login(&url_a, "iqn.2026-11.test:logout-a").await;
            assert_eq!(
                spc2(&x, 0x16).await,
                Io::Good,
                "round {round}: RESERVE(6) through A"
            );
            assert_eq!(
                spc2(&y, 0x16).await,
                Io::Conflict,
                "round {round}: the reservation through A binds B"
            );
            x.close().await.expect("logout through A");
            assert_eq!(
                spc2(&y, 0x16).await,
                Io::Good,
                "round {round}: RESERVE(6) through B right after A's logout"
            );
            assert_eq!(spc2(&y, 0x17).await, Io::Good, "round {round}: RELEASE(6)");
        }
        let _ = y.close().await;
    })
    .await
    .expect("test within its time limit");
}

#[derive(Debug, PartialEq, Eq)]
enum Caw {
    Good,
    Miscompare,
}

/// COMPARE AND WRITE (89h) at `lba` of as many blocks as `expect` holds:
/// replace `expect` by `new`.
async fn compare_and_write_blocks(dev: &Device, lba: u64, expect: &[u8], new: &[u8]) -> Caw {
    assert_eq!(expect.len(), new.len(), "COMPARE AND WRITE halves differ");
    let mut cdb = vec![0u8; 16];
    cdb[0] = 0x89;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[13] = u8::try_from(expect.len() / BLOCK).expect("at most 255 blocks");
    let mut data = expect.to_vec();
    data.extend_from_slice(new);
    let cmd = keyfence_initiator::commands::Command::write(cdb, Bytes::from(data));
    match dev.execute(&cmd).await {
        Ok(_) => Caw::Good,
        Err(Error::CheckCondition(s))
            if s.key == SenseKey::Miscompare && (s.asc, s.ascq) == (0x1d, 0x00) =>
        {
            Caw::Miscompare
        }
        Err(e) => panic!("COMPARE AND WRITE: unexpected {e}"),
    }
}

/// COMPARE AND WRITE of one block at `lba` filled with `expect` by one
/// filled with `new`.
async fn compare_and_write(dev: &Device, lba: u64, expect: u8, new: u8) -> Caw {
    compare_and_write_blocks(dev, lba, &[expect; BLOCK], &[new; BLOCK]).await
}

/// COMPARE AND WRITE is atomic across gateways: two initiators on two
/// gateways race to replace the same block's contents, round after round;
/// exactly one of them wins each round (the other's compare fails), and
/// the block then holds the winner's data, read through either gateway.
/// Both gateways advertise it (Block Limits VPD).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_write_is_atomic_across_gateways() {
    const ROUNDS: u8 = 40;
    const LBA: u64 = 100;
    let cluster = start(2);
    let (url_a, url_b) = (cluster.url(0, 0), cluster.url(1, 0));
    tokio::time::timeout(TEST_LIMIT, async {
        let x = login(&url_a, "iqn.2026-11.test:caw-x").await;
        let y = login(&url_b, "iqn.2026-11.test:caw-y").await;
        for d in [&x, &y] {
            let limits = d.vpd_page(0xb0).await.expect("Block Limits VPD");
            assert!(limits[5] > 0, "MAXIMUM COMPARE AND WRITE LENGTH is 0");
        }
        assert_eq!(write(&x, LBA, 0).await, Io::Good);
        let (mut wins_x, mut wins_y) = (0, 0);
        let mut current = 0u8;
        for round in 0..ROUNDS {
            // Distinct new contents for each side and round (never 0).
            let (nx, ny) = (2 * round + 1, 2 * round + 2);
            let (rx, ry) = tokio::join!(
                compare_and_write(&x, LBA, current, nx),
                compare_and_write(&y, LBA, current, ny)
            );
            let winner = match (rx, ry) {
                (Caw::Good, Caw::Miscompare) => {
                    wins_x += 1;
                    nx
                }
                (Caw::Miscompare, Caw::Good) => {
                    wins_y += 1;
                    ny
                }
                other => panic!("round {round}: {other:?}: exactly one must win"),
            };
            for d in [&x, &y] {
                let got = d.read(LBA, 1).await.expect("READ");
                assert!(
                    got.iter().all(|&v| v == winner),
                    "round {round}: block holds {} after {winner} won",
                    got[0]
                );
            }
            current = winner;
        }
        eprintln!("COMPARE AND WRITE races: {wins_x} won through A, {wins_y} through B");
        let _ = x.close().await;
        let _ = y.close().await;
    })
    .await
    .expect("test within its time limit");
}

/// Blocks of the region [`compare_and_write_is_atomic_against_writes_through_another_gateway`]
/// races on (the COMPARE AND WRITE covers all of them).
const RACE_BLOCKS: usize = 16;

/// A tagged value of one block: its id (`'W'` or `'C'` in the top byte,
/// then a counter) and, for a COMPARE AND WRITE's value, the id it
/// replaced in that block; repeated over the block.
fn tagged(id: u64, replaced: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    while b.len() < BLOCK {
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&replaced.to_be_bytes());
    }
    b
}

/// The id each block of `data` carries.
fn ids(data: &[u8]) -> Vec<u64> {
    data.chunks(BLOCK)
        .map(|b| u64::from_be_bytes(b[..8].try_into().expect("8 bytes")))
        .collect()
}

const W_TAG: u64 = (b'W' as u64) << 56;
const C_TAG: u64 = (b'C' as u64) << 56;

/// COMPARE AND WRITE is atomic against plain WRITEs through another
/// gateway. Initiator X on gateway A reads a region and replaces what it
/// read with COMPARE AND WRITE, over and over; initiator Y on gateway B
/// writes the region with plain WRITEs and reads it back after each.
/// Every value is unique and a COMPARE AND WRITE's value names the value
/// it replaced (per block). Between Y's WRITE of w and Y's next READ only
/// X's COMPARE AND WRITEs can change the region, and each one that wrote
/// replaced exactly what was there, so the value Y reads must lead back
/// through that chain of replacements to w. If a COMPARE AND WRITE
/// compared before w landed and wrote after it (w clobbered), the chain
/// of what Y reads skips w.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_write_is_atomic_against_writes_through_another_gateway() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const LBA: u64 = 400;
    const MAX_CAWS: u64 = 600;
    const MAX_WRITES: u64 = 20_000;
    const RUN: Duration = Duration::from_secs(40);
    let cluster = start(2);
    let (url_a, url_b) = (cluster.url(0, 0), cluster.url(1, 0));
    tokio::time::timeout(TEST_LIMIT, async {
        let x = login(&url_a, "iqn.2026-11.test:caw-w-x").await;
        let y = login(&url_b, "iqn.2026-11.test:caw-w-y").await;
        let first: Vec<u8> = (0..RACE_BLOCKS).flat_map(|_| tagged(W_TAG, 0)).collect();
        y.write(LBA, Bytes::from(first.clone()))
            .await
            .expect("first WRITE");
        // What one COMPARE AND WRITE costs alone (reported, not checked).
        let mut alone = Vec::new();
        let mut cur = first;
        for i in 0..40u64 {
            let new: Vec<u8> = (0..RACE_BLOCKS).flat_map(|_| tagged(i + 1, 0)).collect();
            let t = Instant::now();
            assert_eq!(
                compare_and_write_blocks(&x, LBA, &cur, &new).await,
                Caw::Good
            );
            alone.push(t.elapsed());
            cur = new;
        }
        alone.sort();
        eprintln!(
            "COMPARE AND WRITE alone through A: p50 {:?}, p90 {:?}, max {:?}",
            alone[alone.len() / 2],
            alone[alone.len() * 9 / 10],
            alone[alone.len() - 1]
        );
        let first: Vec<u8> = (0..RACE_BLOCKS).flat_map(|_| tagged(W_TAG, 0)).collect();
        y.write(LBA, Bytes::from(first)).await.expect("first WRITE");
        // What every COMPARE AND WRITE value replaced, per block (also
        // those whose answer was a miscompare: never on the medium then).
        let replaced: Arc<Mutex<HashMap<u64, Vec<u64>>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let cawing = {
            let (replaced, done) = (replaced.clone(), done.clone());
            async move {
                let (mut good, mut miscompare) = (0u64, 0u64);
                for j in 1..=MAX_CAWS {
                    if started.elapsed() > RUN {
                        break;
                    }
                    let seen = x
                        .read(LBA, RACE_BLOCKS as u32)
                        .await
                        .expect("READ through A");
                    let old = ids(&seen);
                    let id = C_TAG | j;
                    replaced.lock().unwrap().insert(id, old.clone());
                    let new: Vec<u8> = old.iter().flat_map(|&r| tagged(id, r)).collect();
                    match compare_and_write_blocks(&x, LBA, &seen, &new).await {
                        Caw::Good => good += 1,
                        Caw::Miscompare => miscompare += 1,
                    }
                }
                done.store(true, Ordering::SeqCst);
                let _ = x.close().await;
                (good, miscompare)
            }
        };
        let writing = {
            let done = done.clone();
            async move {
                // (k, ids Y read right after its WRITE of k)
                let mut seen = Vec::new();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64;
                for k in 1..=MAX_WRITES {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    let data: Vec<u8> = (0..RACE_BLOCKS)
                        .flat_map(|_| tagged(W_TAG | k, 0))
                        .collect();
                    y.write(LBA, Bytes::from(data))
                        .await
                        .expect("WRITE through B");
                    let back = y
                        .read(LBA, RACE_BLOCKS as u32)
                        .await
                        .expect("READ through B");
                    seen.push((k, ids(&back)));
                    // A pause of 0..4 ms, so that some COMPARE AND WRITEs
                    // find what X read still there.
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    tokio::time::sleep(Duration::from_micros(rng % 4000)).await;
                }
                let _ = y.close().await;
                seen
            }
        };
        let ((good, miscompare), seen) = tokio::join!(cawing, writing);
        let replaced = replaced.lock().unwrap();
        let mut lost = Vec::new();
        let mut through_caw = 0;
        for (k, blocks) in &seen {
            for (blk, &start) in blocks.iter().enumerate() {
                let mut id = start;
                while id >> 56 == C_TAG >> 56 {
                    id = replaced
                        .get(&id)
                        .unwrap_or_else(|| panic!("block {blk} holds {id:#x}, never written"))[blk];
                }
                if start != id {
                    through_caw += 1;
                }
                if id != W_TAG | k {
                    lost.push((*k, blk, start, id));
                }
            }
        }
        let mut lost_writes: Vec<u64> = lost.iter().map(|l| l.0).collect();
        lost_writes.dedup();
        eprintln!(
            "COMPARE AND WRITE vs WRITE: {good} good, {miscompare} miscompared, {} writes, \
             {through_caw} block reads after a WRITE went through a COMPARE AND WRITE, \
             {} writes clobbered",
            seen.len(),
            lost_writes.len()
        );
        assert!(
            lost.is_empty(),
            "WRITEs through B clobbered by a COMPARE AND WRITE through A that compared before \
             them (write k, block, id read, chain ends at): {:x?}",
            &lost[..lost.len().min(8)]
        );
        assert!(
            good >= 20,
            "only {good} COMPARE AND WRITEs succeeded: the race was not run"
        );
    })
    .await
    .expect("test within its time limit");
}
