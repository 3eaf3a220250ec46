//! Cluster mode under faults: a three-member etcd on loopback (Debian's
//! etcd-server) and two or three `keyfence serve` gateways on one shared
//! backing file, each with its own portal group, driven over iSCSI by the
//! initiator library. Lease TTL 3 s, safety margin 500 ms, request timeout
//! 1 s, so every fault settles within seconds. Every wait is bounded; the
//! tests run one at a time (they measure time, and the machine is small).
//!
//! * PREEMPT AND ABORT naming the issuer's own nexus completes.
//! * A gateway whose lease is revoked joins again and serves the current
//!   state.
//! * A departed gateway's nexus loss is committed once, by one survivor;
//!   a clean shutdown revokes the lease at once.
//! * kill -9 of a gateway, SIGSTOP of a gateway during PREEMPT AND ABORT,
//!   kill of one etcd member, loss of the etcd quorum, one gateway cut off
//!   from etcd.

mod initiator_support;

use std::time::{Duration, Instant};

use initiator_support::{io, ready, uas, write, Io, TRANSITION};
use keyfence_cluster::{Cluster, ClusterConfig, LuId};
use keyfence_initiator::commands::Command;
use keyfence_initiator::{Bytes, Device, Error, PrType, RegisterOptions, SenseKey};
use keyfence_testkit::{ClusterOptions, ClusterRig, Lease};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:faults";
const BLOCK: usize = 512;
const TTL: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_millis(500);
/// The test kit's etcd members run with a 500 ms election timeout.
const ETCD_ELECTION_TIMEOUT: Duration = Duration::from_millis(500);
const TEST_LIMIT: Duration = Duration::from_secs(120);
const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);
/// Gateways gwa, gwb, gwc (TPGT 1, 2, 3).
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// The tests measure time against the lease TTL: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Two 16 MiB LUNs, lease TTL 3 s, margin 500 ms, request timeout 1 s.
fn options() -> ClusterOptions {
    ClusterOptions::new(KF, IQN).luns(2).lease(Lease {
        ttl_secs: TTL.as_secs(),
        safety_margin_ms: MARGIN.as_millis() as u64,
        request_timeout_ms: 1000,
    })
}

fn start(opts: ClusterOptions) -> ClusterRig {
    tokio::task::block_in_place(|| ClusterRig::start(opts))
}

/// A client of the cluster for the test's own look-ups.
async fn client(rig: &ClusterRig) -> Cluster {
    Cluster::connect(&ClusterConfig::new(rig.endpoints(), "tester"))
        .await
        .expect("connect to etcd")
}

/// Block `lba` of LUN `lun`, read from the backing file.
fn block(rig: &ClusterRig, lun: usize, lba: u64) -> Vec<u8> {
    rig.read_backing(lun, lba * BLOCK as u64, BLOCK)
}

fn lu_id(lun: u64) -> LuId {
    LuId::for_lun(IQN, lun).expect("LU id")
}

/// Log in as `name` through gateway `gw`, LUN `lun`, and wait (bounded)
/// until the gateway serves the LU; unit attentions consumed.
async fn login(rig: &ClusterRig, gw: usize, lun: usize, name: &str) -> Device {
    initiator_support::login(&rig.url(gw, lun), name, 0x23d0_0000_0001).await
}

/// SPC-2 RESERVE(6).
async fn reserve6(dev: &Device) -> Io {
    let r = dev
        .execute(&Command::none(vec![0x16, 0, 0, 0, 0, 0]))
        .await
        .map(drop);
    io("RESERVE(6)", r)
}

async fn gateway_names(c: &Cluster) -> Vec<String> {
    let mut v: Vec<String> = c
        .gateways()
        .await
        .expect("list gateways")
        .into_iter()
        .map(|g| g.record.name)
        .collect();
    v.sort();
    v
}

fn none() -> RegisterOptions {
    RegisterOptions::default()
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {TEST_LIMIT:?}"))
}

/// SPC-4 5.12.11.2.6: PREEMPT AND ABORT aborts the tasks of every nexus
/// registered with the preempted key, the issuer's too when that is its
/// own key, but not the PERSISTENT RESERVE OUT command itself. In cluster
/// mode the issuer's own gateway applies the change through its follower;
/// the command must still complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_and_abort_of_the_issuers_own_key_completes() {
    let _one = SERIAL.lock().await;
    let rig = start(options());
    bounded("test", async {
        let x = login(&rig, A, 0, "iqn.2026-11.test:x").await;
        let z = login(&rig, B, 0, "iqn.2026-11.test:z").await;
        // x (through A) and z (through B) share key 0xaa; x reserves.
        x.register(0, 0xaa, &none()).await.expect("REGISTER x");
        z.register(0, 0xaa, &none()).await.expect("REGISTER z");
        x.reserve(0xaa, PrType::WriteExclusive)
            .await
            .expect("RESERVE");
        // x preempts its own key: z's registration goes, x's tasks other
        // than this command are aborted, and the command completes.
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            x.preempt_and_abort(0xaa, 0xaa, PrType::WriteExclusive),
        )
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("PREEMPT AND ABORT of the issuer's own key: {e}"),
            Err(_) => panic!("PREEMPT AND ABORT of the issuer's own key never completed (aborted with the preempted tasks?)"),
        }
        eprintln!("PREEMPT AND ABORT (own key) took {:?}", t.elapsed());
        assert_eq!(uas(&z).await, vec![REGISTRATIONS_PREEMPTED]);
        assert_eq!(x.read_keys().await.expect("READ KEYS").keys, vec![0xaa]);
        assert_eq!(write(&z, 3, 0x22).await, Io::Conflict);
        assert_eq!(write(&x, 3, 0x33).await, Io::Good);
        let r = z.read_reservation().await.expect("READ RESERVATION on B");
        assert_eq!(r.reservation.map(|d| d.key), Some(0xaa));
        // The session that issued it is still usable, and so is B.
        assert_eq!(&x.read(3, 1).await.expect("READ")[..], &[0x33; BLOCK][..]);
        for d in [x, z] {
            let _ = d.close().await;
        }
    })
    .await;
}

/// A gateway whose lease is revoked (etcd says it is gone: `Lost`) joins
/// again with a new lease and resynchronises before it serves: it then
/// serves the state committed meanwhile through the other gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_lease_is_revoked_joins_again_with_the_current_state() {
    let _one = SERIAL.lock().await;
    let rig = start(options());
    let etcd = client(&rig).await;
    bounded("test", async {
        let x = login(&rig, A, 0, "iqn.2026-11.test:x").await;
        let y = login(&rig, B, 0, "iqn.2026-11.test:y").await;
        x.register(0, 0xa1, &none()).await.expect("REGISTER x");
        let old = etcd
            .gateways()
            .await
            .expect("gateways")
            .into_iter()
            .find(|g| g.record.name == "gwa")
            .expect("gwa registered");
        etcd.client()
            .lease_revoke(old.lease)
            .await
            .expect("revoke gwa's lease");
        // Meanwhile y takes the LU through B.
        y.register(0, 0xb1, &none()).await.expect("REGISTER y");
        y.reserve(0xb1, PrType::ExclusiveAccess)
            .await
            .expect("RESERVE y");
        // A comes back: a new incarnation, serving the current state.
        let deadline = Instant::now() + Duration::from_secs(20);
        let new = loop {
            let g = etcd.gateways().await.expect("gateways");
            if let Some(e) = g
                .into_iter()
                .find(|g| g.record.name == "gwa" && g.lease != old.lease)
            {
                break e;
            }
            assert!(
                Instant::now() < deadline,
                "gwa did not join again within 20 s\n{}",
                rig.gateway(A).log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(new.create_revision > old.create_revision);
        ready(&x, Duration::from_secs(20)).await;
        let r = x.read_reservation().await.expect("READ RESERVATION on A");
        let d = r.reservation.expect("a reservation");
        assert_eq!((d.key, d.pr_type), (0xb1, PrType::ExclusiveAccess as u8));
        assert_eq!(
            x.read_keys().await.expect("READ KEYS").keys,
            vec![0xa1, 0xb1]
        );
        assert_eq!(write(&x, 4, 0x44).await, Io::Conflict);
        assert!(
            rig.gateway(A).log().contains("joined again"),
            "gateway A's log does not say it joined again"
        );
        for d in [x, y] {
            let _ = d.close().await;
        }
    })
    .await;
}

/// A crashed gateway's I_T nexuses are lost: one survivor (of two)
/// commits that once for every clustered LU — its SPC-2 reservation ends,
/// its registrations stay, its nexuses get I_T NEXUS LOSS OCCURRED. A
/// gateway shut down cleanly revokes its lease: the survivors' next
/// change does not wait out the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_gateways_nexus_loss_is_committed_once_and_a_clean_stop_revokes_at_once() {
    let _one = SERIAL.lock().await;
    let mut rig = start(options().gateways(3));
    let etcd = client(&rig).await;
    bounded("test", async {
        // LUN 0: w holds an SPC-2 reservation through A.
        let w = login(&rig, A, 0, "iqn.2026-11.test:w").await;
        assert_eq!(reserve6(&w).await, Io::Good);
        // LUN 1: x is registered through A.
        let x = login(&rig, A, 1, "iqn.2026-11.test:x").await;
        x.register(0, 0xa1, &none()).await.expect("REGISTER x");
        let y = login(&rig, B, 0, "iqn.2026-11.test:y").await;
        assert_eq!(write(&y, 5, 0x55).await, Io::Conflict);
        let seq1 = etcd.read(&lu_id(1)).await.expect("read LUN 1").seq;

        rig.gateway_mut(A).kill();
        let killed = Instant::now();
        // Through B the SPC-2 reservation ends once A's lease expired.
        let deadline = killed + Duration::from_secs(20);
        loop {
            match write(&y, 5, 0x55).await {
                Io::Good => break,
                Io::Conflict => {}
                other => panic!("WRITE through B: {other:?}"),
            }
            assert!(
                Instant::now() < deadline,
                "SPC-2 reservation of the dead gateway's nexus still held after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let released = killed.elapsed();
        eprintln!("dead gateway's SPC-2 reservation released {released:?} after kill -9");
        assert!(
            released >= TTL - TTL / 3 - Duration::from_millis(200),
            "released after {released:?}: before the lease could expire"
        );
        // LUN 1: x's registration stays; one I_T NEXUS LOSS entry for it,
        // written by one survivor, in one change.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = etcd.read(&lu_id(1)).await.expect("read LUN 1");
        assert_eq!(
            s.state
                .registrations
                .iter()
                .map(|g| g.key)
                .collect::<Vec<_>>(),
            vec![0xa1],
            "registrations survive the nexus loss"
        );
        let losses: Vec<_> = s
            .unit_attentions
            .iter()
            .filter(|u| u.asc == keyfence_scsi::sense::asc::I_T_NEXUS_LOSS_OCCURRED)
            .collect();
        assert_eq!(losses.len(), 1, "nexus loss committed once: {losses:?}");
        assert_eq!(losses[0].nexus.as_ref().map(|n| n.target.tpgt), Some(1));
        assert_eq!(s.seq, seq1 + 1, "exactly one change for the departure");
        assert!(["gwb", "gwc"].contains(&s.writer.as_str()), "{}", s.writer);
        let s0 = etcd.read(&lu_id(0)).await.expect("read LUN 0");
        assert_eq!(s0.state.spc2, None);

        // A clean stop of B revokes its lease: C's next change waits for
        // no one.
        let _ = y.close().await;
        let _ = x;
        let _ = w;
        let z = login(&rig, C, 0, "iqn.2026-11.test:z").await;
        rig.gateway_mut(B).stop();
        assert_eq!(gateway_names(&etcd).await, vec!["gwc".to_string()]);
        let t = Instant::now();
        z.register(0, 0xc1, &none()).await.expect("REGISTER z");
        z.reserve(0xc1, PrType::WriteExclusive)
            .await
            .expect("RESERVE z");
        let took = t.elapsed();
        eprintln!("PR OUT after a clean stop of a gateway: {took:?}");
        assert!(took < TTL, "waited {took:?} for the stopped gateway");
        let _ = z.close().await;
    })
    .await;
}

/// (i) kill -9 of a gateway whose initiator holds a registration: a
/// PREEMPT through the survivor returns GOOD only once the dead gateway's
/// lease expired, then it is in force; the survivor keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_kill_9_of_a_gateway() {
    let _one = SERIAL.lock().await;
    let mut rig = start(options());
    let etcd = client(&rig).await;
    bounded("test", async {
        let x = login(&rig, A, 0, "iqn.2026-11.test:x").await;
        let y = login(&rig, B, 0, "iqn.2026-11.test:y").await;
        x.register(0, 0xa1, &none()).await.expect("REGISTER x");
        x.reserve(0xa1, PrType::WriteExclusive)
            .await
            .expect("RESERVE x");
        y.register(0, 0xb1, &none()).await.expect("REGISTER y");
        rig.gateway_mut(A).kill();
        let killed = Instant::now();
        y.preempt(0xb1, 0xa1, PrType::WriteExclusive)
            .await
            .expect("PREEMPT through B");
        let took = killed.elapsed();
        let names = gateway_names(&etcd).await;
        eprintln!("PREEMPT after kill -9 of the holder's gateway: GOOD after {took:?}");
        assert!(
            !names.contains(&"gwa".to_string()),
            "GOOD while the dead gateway's lease lives: {names:?}"
        );
        assert!(
            took >= TTL - TTL / 3 - Duration::from_millis(200),
            "GOOD {took:?} after the kill: before the lease could expire"
        );
        assert_eq!(y.read_keys().await.expect("READ KEYS").keys, vec![0xb1]);
        let r = y.read_reservation().await.expect("READ RESERVATION");
        assert_eq!(r.reservation.map(|d| d.key), Some(0xb1));
        assert_eq!(write(&y, 6, 0x66).await, Io::Good);
        assert_eq!(block(&rig, 0, 6), vec![0x66; BLOCK]);
        let _ = y.close().await;
        drop(x);
    })
    .await;
}

/// (ii) A gateway frozen (SIGSTOP) while its initiator is preempted with
/// PREEMPT AND ABORT through another gateway: GOOD only after the frozen
/// gateway's lease expired; the WRITE the fenced initiator queued on the
/// frozen gateway never reaches the backing file, and fails after SIGCONT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_sigstop_of_a_gateway_during_preempt_and_abort() {
    let _one = SERIAL.lock().await;
    let rig = start(options());
    let etcd = client(&rig).await;
    bounded("test", async {
        let x = std::sync::Arc::new(login(&rig, A, 0, "iqn.2026-11.test:x").await);
        let y = login(&rig, B, 0, "iqn.2026-11.test:y").await;
        x.register(0, 0xa1, &none()).await.expect("REGISTER x");
        x.reserve(0xa1, PrType::WriteExclusive)
            .await
            .expect("RESERVE x");
        assert_eq!(write(&x, 8, 0x11).await, Io::Good);
        y.register(0, 0xb1, &none()).await.expect("REGISTER y");

        rig.freeze(A);
        let stopped = Instant::now();
        // x's WRITE waits in the frozen gateway's socket.
        let late = {
            let x = x.clone();
            tokio::spawn(async move { x.write(8, Bytes::from(vec![0xee; BLOCK])).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        y.preempt_and_abort(0xb1, 0xa1, PrType::WriteExclusive)
            .await
            .expect("PREEMPT AND ABORT through B");
        let took = stopped.elapsed();
        let names = gateway_names(&etcd).await;
        eprintln!("PREEMPT AND ABORT with a frozen gateway: GOOD after {took:?}");
        assert!(
            !names.contains(&"gwa".to_string()),
            "GOOD while the frozen gateway's lease lives: {names:?}"
        );
        assert!(
            took >= TTL - TTL / 3 - Duration::from_millis(200),
            "GOOD {took:?} after SIGSTOP: before the lease could expire"
        );
        assert_eq!(block(&rig, 0, 8), vec![0x11; BLOCK]);
        assert_eq!(write(&y, 8, 0x77).await, Io::Good);

        rig.thaw(A);
        let r = tokio::time::timeout(Duration::from_secs(30), late)
            .await
            .expect("the queued WRITE is answered after SIGCONT")
            .expect("task");
        eprintln!("the fenced initiator's queued WRITE: {r:?}");
        match r {
            Ok(()) => panic!("the fenced initiator's queued WRITE succeeded"),
            Err(Error::ReservationConflict) => {}
            Err(Error::CheckCondition(s)) => assert!(
                s.key == SenseKey::NotReady && (s.asc, s.ascq) == TRANSITION
                    || s.key == SenseKey::UnitAttention,
                "unexpected sense {s:?}"
            ),
            Err(e) => eprintln!("(connection-level failure: {e})"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            block(&rig, 0, 8),
            vec![0x77; BLOCK],
            "a late write of the fenced initiator reached the disk"
        );
        let _ = y.close().await;
    })
    .await;
}

/// (iii) One etcd member killed: PR OUT and I/O go on through both
/// gateways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_kill_of_one_etcd_member() {
    let _one = SERIAL.lock().await;
    let mut rig = start(options());
    bounded("test", async {
        let x = login(&rig, A, 0, "iqn.2026-11.test:x").await;
        let y = login(&rig, B, 0, "iqn.2026-11.test:y").await;
        x.register(0, 0xa1, &none()).await.expect("REGISTER x");
        // Every gateway uses the first endpoint first.
        rig.etcd_mut().kill(0);
        let t = Instant::now();
        y.register(0, 0xb1, &none()).await.expect("REGISTER y");
        y.reserve(0xb1, PrType::WriteExclusive)
            .await
            .expect("RESERVE y");
        eprintln!(
            "two PR OUT after the kill of an etcd member: {:?}",
            t.elapsed()
        );
        assert_eq!(uas(&x).await, vec![]);
        assert_eq!(write(&x, 9, 0x91).await, Io::Conflict);
        assert_eq!(write(&y, 9, 0x92).await, Io::Good);
        x.register(0xa1, 0, &none()).await.expect("unREGISTER x");
        y.preempt(0xb1, 0xb1, PrType::ExclusiveAccess)
            .await
            .expect("PREEMPT (type change) y");
        assert_eq!(write(&y, 10, 0x93).await, Io::Good);
        match x.read(9, 1).await {
            Err(Error::ReservationConflict) => {}
            other => panic!("READ of an unregistered initiator under Exclusive Access: {other:?}"),
        }
        let _ = (x.close().await, y.close().await);
    })
    .await;
}

/// (iv) Loss of the etcd quorum (two of three members stopped): a PR OUT
/// fails with NOT READY, ASYMMETRIC ACCESS STATE TRANSITION within its
/// bound; I/O on clustered LUs gets the same sense within TTL - margin;
/// service returns when the members do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_loss_of_the_etcd_quorum() {
    let _one = SERIAL.lock().await;
    let rig = start(options());
    bounded("test", async {
        let x = login(&rig, A, 0, "iqn.2026-11.test:x").await;
        let y = login(&rig, B, 0, "iqn.2026-11.test:y").await;
        x.register(0, 0xa1, &none()).await.expect("REGISTER x");
        let y = std::sync::Arc::new(y);
        rig.etcd().freeze(1);
        rig.etcd().freeze(2);
        let lost = Instant::now();
        // A PR OUT issued now (it passes the check: the gateway still
        // serves) fails in etcd: a precise error, in bounded time.
        let pr_out = {
            let y = y.clone();
            tokio::spawn(async move {
                let r = tokio::time::timeout(Duration::from_secs(30), y.register(0, 0xb1, &none()))
                    .await;
                (r, lost.elapsed())
            })
        };
        // Meanwhile I/O on both gateways: ALUA transition by TTL - margin.
        for (dev, gw) in [(&x, "A"), (&*y, "B")] {
            loop {
                // A write sent after the deadline must not be GOOD.
                let sent = lost.elapsed();
                match write(dev, 11, 0xb0).await {
                    Io::Transition => break,
                    Io::Good => {}
                    Io::Conflict => panic!("conflict through {gw}"),
                }
                // The deadline is the send time of the last answered
                // keep-alive + TTL - margin. A leader that has not yet
                // noticed it lost its quorum still answers keep-alives
                // (etcd renews leases on the leader alone) until it steps
                // down, within one election timeout of the loss.
                assert!(
                    sent < TTL - MARGIN + ETCD_ELECTION_TIMEOUT + Duration::from_millis(300),
                    "gateway {gw} still writes {sent:?} after the quorum loss"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!(
                "gateway {gw} refuses I/O {:?} after the quorum loss",
                lost.elapsed()
            );
        }
        let (r, took) = pr_out.await.expect("PR OUT task");
        let r = r.expect("PR OUT answered within 30 s");
        eprintln!("PR OUT without quorum: {r:?} after {took:?}");
        match r {
            Err(Error::CheckCondition(s)) => {
                assert_eq!((s.key, s.asc, s.ascq), (SenseKey::NotReady, 0x04, 0x0a))
            }
            other => panic!("PR OUT without quorum: {other:?}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(write(&x, 11, 0xb1).await, Io::Transition);
        // Quorum back: service returns.
        rig.etcd().thaw(1);
        rig.etcd().thaw(2);
        let back = Instant::now();
        for dev in [&x, &*y] {
            ready(dev, Duration::from_secs(30)).await;
        }
        y.register(0, 0xb1, &none())
            .await
            .expect("REGISTER y after the quorum returned");
        assert_eq!(write(&x, 11, 0xb2).await, Io::Good);
        assert_eq!(write(&y, 12, 0xb3).await, Io::Good);
        eprintln!(
            "service back {:?} after the quorum returned",
            back.elapsed()
        );
        let _ = x.close().await;
    })
    .await;
}

/// (v) A gateway cut off from etcd (its only endpoint killed) but not
/// from its initiator fences itself; the other gateway keeps serving and
/// its PR OUT completes once the cut-off gateway's lease expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_one_gateway_cut_off_from_etcd() {
    let _one = SERIAL.lock().await;
    // A reaches etcd through the third member only, B through the others.
    let mut rig = start(options().etcd_members_of(A, [2]).etcd_members_of(B, [0, 1]));
    bounded("test", async {
        let x = login(&rig, A, 0, "iqn.2026-11.test:x").await;
        let y = login(&rig, B, 0, "iqn.2026-11.test:y").await;
        assert_eq!(write(&x, 13, 0xc1).await, Io::Good);
        rig.etcd_mut().kill(2);
        let cut = Instant::now();
        let mut last = 0xc1;
        loop {
            let sent = cut.elapsed();
            match write(&x, 13, 0xc2).await {
                Io::Transition => break,
                Io::Good => last = 0xc2,
                Io::Conflict => panic!("conflict through A"),
            }
            assert!(
                sent < TTL - MARGIN + Duration::from_millis(300),
                "the cut-off gateway still writes {sent:?} after the cut"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("cut-off gateway fenced {:?} after the cut", cut.elapsed());
        assert_eq!(write(&y, 14, 0xc3).await, Io::Good);
        let t = Instant::now();
        y.register(0, 0xb1, &none()).await.expect("REGISTER y");
        y.reserve(0xb1, PrType::WriteExclusive)
            .await
            .expect("RESERVE y");
        eprintln!("PR OUT through the connected gateway: {:?}", t.elapsed());
        assert_eq!(write(&y, 14, 0xc4).await, Io::Good);
        assert_eq!(block(&rig, 0, 14), vec![0xc4; BLOCK]);
        // Still fenced: it cannot reach etcd to join again.
        assert_eq!(write(&x, 13, 0xc5).await, Io::Transition);
        assert_eq!(block(&rig, 0, 13), vec![last; BLOCK]);
        let _ = y.close().await;
        drop(x);
    })
    .await;
}
