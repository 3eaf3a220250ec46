//! keyfence-cluster against a real three-member etcd cluster on loopback
//! (Debian's etcd-server; the tests fail if it is missing).

use std::collections::BTreeSet;
use std::time::Duration;

use keyfence_cluster::{
    Applied, Change, Cluster, ClusterConfig, ClusterPrStore, Error, Gateway, Liveness, LuEvent,
    LuId, PortalGroup,
};
use keyfence_pr::{PrState, PrStore, Registration, StoreError};
use keyfence_scsi::sense::asc;
use keyfence_scsi::{InitiatorPort, Nexus, TargetPort};
use keyfence_testkit::etcd::EtcdCluster;
use tokio::time::{timeout, Instant};

const TTL: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_millis(500);

fn config(etcd: &EtcdCluster, gateway: &str) -> ClusterConfig {
    ClusterConfig {
        lease_ttl_secs: TTL.as_secs(),
        safety_margin_ms: MARGIN.as_millis() as u64,
        request_timeout_ms: 1000,
        prefix: "/kftest".into(),
        ..ClusterConfig::new(etcd.endpoints(), gateway)
    }
}

async fn connect(etcd: &EtcdCluster, gateway: &str) -> Cluster {
    Cluster::connect(&config(etcd, gateway))
        .await
        .expect("connect to etcd")
}

/// Commit [`register`] on `lu`: the revision it committed at.
async fn commit_registration(c: &Cluster, lu: &LuId, initiator: &str, key: u64) -> i64 {
    c.update(lu, |s| Ok::<_, String>(register(&s.state, initiator, key)))
        .await
        .unwrap()
        .state
        .revision
}

/// [`Cluster::wait_applied`] for `revision` of `lu` within `patience`,
/// in a task of its own.
fn spawn_wait_applied(
    c: &Cluster,
    lu: &LuId,
    revision: i64,
    patience: Duration,
) -> tokio::task::JoinHandle<Result<Applied, Error>> {
    let (c, lu) = (c.clone(), lu.clone());
    tokio::spawn(async move {
        c.wait_applied(&lu, revision, Instant::now() + patience)
            .await
    })
}

/// What a [`spawn_wait_applied`] task concluded; it must end within 5 s.
async fn waited(waiter: tokio::task::JoinHandle<Result<Applied, Error>>) -> Applied {
    timeout(Duration::from_secs(5), waiter)
        .await
        .expect("bounded")
        .unwrap()
        .unwrap()
}

/// One portal group `tpgt`, without portals.
fn pg(tpgt: u16) -> Vec<PortalGroup> {
    vec![PortalGroup {
        tpgt,
        portals: vec![],
    }]
}

/// Join as gateway `name` over `c`'s connection, serving portal group
/// `tpgt`.
async fn join_as(c: &Cluster, name: &str, tpgt: u16) -> Gateway {
    c.as_gateway(name)
        .unwrap()
        .join(pg(tpgt), TTL, MARGIN)
        .await
        .unwrap()
}

fn nexus(initiator: &str, isid: u64) -> Nexus {
    Nexus::new(
        InitiatorPort::new(initiator, isid),
        TargetPort::new("iqn.2026-11.io.keyfence:t", 1, 1),
    )
}

/// A change that registers one more nexus and bumps PRgeneration, with a
/// unit attention for the first registrant.
fn register(s: &PrState, initiator: &str, key: u64) -> Change {
    let mut next = s.clone();
    next.generation = next.generation.wrapping_add(1);
    next.registrations.push(Registration {
        nexus: nexus(initiator, key),
        key,
        all_tg_pt: false,
    });
    Change {
        unit_attentions: s
            .registrations
            .first()
            .map(|r| (Some(r.nexus.clone()), asc::REGISTRATIONS_PREEMPTED))
            .into_iter()
            .collect(),
        // Every third change also aborts the first registrant's tasks.
        aborts: s
            .registrations
            .first()
            .filter(|_| s.generation % 3 == 2)
            .map(|r| r.nexus.clone())
            .into_iter()
            .collect(),
        state: next,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_lose_an_update_and_the_store_really_compares() {
    let etcd = EtcdCluster::start(3);
    let lu = LuId::for_lun("iqn.2026-11.io.keyfence:t", 0).unwrap();
    const WRITERS: u64 = 4;
    const EACH: u64 = 8;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        // A separate connection per writer, like separate gateways.
        let c = connect(&etcd, &format!("w{w}")).await;
        let lu = lu.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let key = (w << 8) | (i + 1);
                let init = format!("iqn.w{w}");
                c.update(&lu, |s| Ok::<_, String>(register(&s.state, &init, key)))
                    .await
                    .unwrap_or_else(|e| panic!("writer {w} update {i}: {e}"));
            }
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(60), t)
            .await
            .expect("writers bounded")
            .unwrap();
    }
    let c = connect(&etcd, "check").await;
    let st = c.read(&lu).await.unwrap();
    assert_eq!(
        u64::from(st.state.generation),
        WRITERS * EACH,
        "an update was lost"
    );
    assert_eq!(st.seq, WRITERS * EACH);
    let keys: BTreeSet<u64> = st.state.registrations.iter().map(|r| r.key).collect();
    let want: BTreeSet<u64> = (0..WRITERS)
        .flat_map(|w| (1..=EACH).map(move |i| (w << 8) | i))
        .collect();
    assert_eq!(keys, want);
    // Every change but the first logged one unit attention.
    assert_eq!(st.unit_attentions.len() as u64, WRITERS * EACH - 1);

    // A commit on a stale base is a conflict, not an overwrite.
    let mut stale = st.clone();
    stale.revision -= 1;
    match c
        .commit(&lu, &stale, Change::from(PrState::default()))
        .await
    {
        Err(Error::Conflict {
            expected, found, ..
        }) => assert_eq!((expected, found), (st.revision - 1, st.revision)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(c.read(&lu).await.unwrap().state, st.state);
    assert_eq!(c.lus().await.unwrap(), std::slice::from_ref(&lu));

    // The synchronous PrStore over it, from a blocking thread.
    let store = ClusterPrStore::new(c.clone(), lu.clone(), tokio::runtime::Handle::current());
    let s2 = store.clone();
    let expect_state = st.state.clone();
    let rev = st.revision as u64;
    tokio::task::spawn_blocking(move || {
        let (v, loaded) = s2.load().unwrap().expect("state present");
        assert_eq!((v, &loaded), (rev, &expect_state));
        let mut next = loaded.clone();
        next.generation += 1;
        let v2 = s2.compare_and_swap(v, Some(&next)).unwrap();
        assert!(v2 > v);
        // The old version again: refused, and nothing overwritten.
        match s2.compare_and_swap(v, Some(&PrState::default())) {
            Err(StoreError::VersionMismatch { expected, found }) => {
                assert_eq!((expected, found), (v, v2))
            }
            other => panic!("expected a version mismatch, got {other:?}"),
        }
        assert_eq!(s2.load().unwrap().unwrap(), (v2, next));
        // Removal compares too.
        assert!(matches!(
            s2.compare_and_swap(v, None),
            Err(StoreError::VersionMismatch { .. })
        ));
        assert_eq!(s2.compare_and_swap(v2, None).unwrap(), 0);
        assert_eq!(s2.load().unwrap(), None);
    })
    .await
    .unwrap();
    // On a runtime thread the blocking store refuses instead of stalling.
    match store.load() {
        Err(StoreError::Io(m)) => assert!(m.contains("tokio worker thread"), "{m}"),
        other => panic!("expected a refusal on a runtime thread, got {other:?}"),
    }
}

/// Collect `n` events, tolerating (bounded) transient errors.
async fn collect(w: &mut keyfence_cluster::LuWatch, n: usize) -> Vec<LuEvent> {
    let mut out = Vec::new();
    let mut errors = 0;
    while out.len() < n {
        match timeout(Duration::from_secs(10), w.next())
            .await
            .expect("watch event within 10 s")
        {
            Ok(ev) => out.push(ev),
            Err(e) => {
                errors += 1;
                assert!(errors < 20, "watch keeps failing: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_every_revision_in_order_across_member_loss_and_resyncs_after_compaction() {
    let mut etcd = EtcdCluster::start(3);
    let lu = LuId::new("lu-watch").unwrap();
    let reader = connect(&etcd, "reader").await;
    let writer = connect(&etcd, "writer").await;
    let start = reader.read(&lu).await.unwrap();
    assert_eq!(start.revision, 0);
    let mut w = reader.watch_lu(&lu, start.read_at);
    let mut old = reader.watch_lu(&lu, start.read_at);

    let mut committed = Vec::new();
    for i in 0..20u64 {
        let c = writer
            .update(&lu, |s| Ok::<_, String>(register(&s.state, "iqn.x", i + 1)))
            .await
            .unwrap();
        committed.push(c.state.clone());
    }
    let evs = collect(&mut w, 20).await;
    let got: Vec<(i64, u64)> = evs
        .iter()
        .map(|e| match e {
            LuEvent::Changed(s) => (s.revision, s.seq),
            LuEvent::Resync(s) => panic!("unexpected resync at {}", s.revision),
        })
        .collect();
    let want: Vec<(i64, u64)> = committed.iter().map(|s| (s.revision, s.seq)).collect();
    assert_eq!(got, want, "watch skipped or reordered a revision");
    // Each change after the first carried one unit attention, for the
    // first registrant, under its own seq.
    for ev in &evs[1..] {
        let s = ev.state();
        let mine: Vec<_> = s
            .unit_attentions
            .iter()
            .filter(|u| u.seq == s.seq)
            .collect();
        assert_eq!(mine.len(), 1);
        assert_eq!(
            mine[0].nexus.as_ref(),
            Some(&s.state.registrations[0].nexus)
        );
        assert_eq!(mine[0].asc, asc::REGISTRATIONS_PREEMPTED);
        // The abort list belongs to the change that carries it.
        let first = &s.state.registrations[0].nexus;
        let want: Vec<Nexus> = if (s.state.generation - 1) % 3 == 2 {
            vec![first.clone()]
        } else {
            vec![]
        };
        assert_eq!(s.aborts, want, "aborts of seq {}", s.seq);
    }
    match evs.last().unwrap().state().unit_attentions_after(15) {
        keyfence_cluster::UaCatchUp::Complete(v) => {
            assert_eq!(
                v.iter().map(|u| u.seq).collect::<Vec<_>>(),
                [16, 17, 18, 19, 20]
            )
        }
        gap => panic!("unexpected {gap:?}"),
    }
    assert_eq!(
        evs.last().unwrap().state().state,
        committed.last().unwrap().state
    );

    // kill -9 one member: writes and the watch go on, in order.
    etcd.kill(0);
    let mut more = Vec::new();
    for i in 20..26u64 {
        let c = writer
            .update(&lu, |s| Ok::<_, String>(register(&s.state, "iqn.x", i + 1)))
            .await
            .expect("update with one member down");
        more.push((c.state.revision, c.state.seq));
    }
    let evs = collect(&mut w, 6).await;
    let got: Vec<(i64, u64)> = evs
        .iter()
        .map(|e| (e.state().revision, e.state().seq))
        .collect();
    assert_eq!(got, more);

    // Compact the history the second watch still needs: it resyncs with
    // a full read of the latest state.
    let now = reader.read(&lu).await.unwrap();
    let mut c = reader.client();
    c.compact(now.read_at, None).await.expect("compact");
    match timeout(Duration::from_secs(10), old.next())
        .await
        .expect("bounded")
    {
        Ok(LuEvent::Resync(s)) => {
            assert_eq!((s.revision, s.seq), (now.revision, 26));
            assert_eq!(old.next_revision(), s.read_at + 1);
        }
        other => panic!("expected a resync after compaction, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_fences_itself_before_its_lease_can_expire() {
    let etcd = EtcdCluster::start(3);
    let c = connect(&etcd, "gw-frozen").await;
    let gw = c
        .join(
            vec![PortalGroup {
                tpgt: 1,
                portals: vec!["127.0.0.1:3260".into()],
            }],
            TTL,
            MARGIN,
        )
        .await
        .unwrap();
    assert!(gw.may_serve());
    let names: Vec<String> = c
        .gateways()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.record.name)
        .collect();
    assert_eq!(names, ["gw-frozen"]);
    // Several keep-alive rounds: still serving, deadline moving forward.
    let Liveness::Serving { until: first } = gw.current() else {
        panic!("not serving after join")
    };
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let Liveness::Serving { until: later } = gw.current() else {
        panic!("keep-alive did not hold the lease")
    };
    assert!(later > first, "deadline did not advance");

    // Freeze the whole etcd cluster: no keep-alive can be confirmed.
    let mut live = gw.liveness();
    let stopped = Instant::now();
    for i in 0..3 {
        etcd.freeze(i);
    }
    let Liveness::Serving { until } = gw.current() else {
        panic!("fenced too early")
    };
    // The deadline comes from a keep-alive sent before the freeze, so it
    // ends at least the margin before the lease could expire at etcd.
    assert!(
        until <= stopped + TTL - MARGIN,
        "deadline beyond TTL - margin"
    );
    // Whenever may_serve() says yes, it is before that bound; it turns
    // to no by itself (no etcd answer is needed to stop).
    let limit = stopped + TTL - MARGIN;
    timeout(TTL + Duration::from_secs(2), async {
        loop {
            let asked = Instant::now();
            if !gw.may_serve() {
                break;
            }
            assert!(
                asked < limit,
                "still serving {:?} after TTL - margin",
                asked - limit
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("gateway never stopped serving");
    timeout(Duration::from_secs(2), async {
        while !matches!(*live.borrow_and_update(), Liveness::Fenced { .. }) {
            live.changed().await.unwrap();
        }
    })
    .await
    .expect("no Fenced signal");

    for i in 0..3 {
        etcd.thaw(i);
    }
    // Thawed: either the lease is confirmed again (it had not expired)
    // or etcd reports it gone; never left in between.
    let settled = timeout(Duration::from_secs(15), async {
        loop {
            let now = *live.borrow_and_update();
            match now {
                Liveness::Serving { .. } | Liveness::Lost => return now,
                Liveness::Fenced { .. } => live.changed().await.unwrap(),
            }
        }
    })
    .await
    .expect("liveness did not settle after thaw");
    if settled == Liveness::Lost {
        assert!(!gw.may_serve());
        let c2 = connect(&etcd, "probe").await;
        assert!(
            c2.gateways().await.unwrap().is_empty(),
            "lost lease but key still there"
        );
    } else {
        assert!(gw.may_serve());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_applied_ends_on_acks_or_lease_loss_and_quorum_loss_is_a_typed_error() {
    let mut etcd = EtcdCluster::start(3);
    let lu = LuId::new("lu-fence").unwrap();
    let c = connect(&etcd, "gw1").await;
    let (none, at) = c.gateways_at().await.unwrap();
    assert!(none.is_empty());
    let mut members = c.watch_gateways(at);
    let g1 = c.join(pg(1), TTL, MARGIN).await.unwrap();
    let g2 = join_as(&c, "gw2", 2).await;
    let mut g3 = join_as(&c, "gw3", 3).await;
    // A second gateway cannot take a live name.
    assert!(matches!(
        c.as_gateway("gw2").unwrap().join(pg(9), TTL, MARGIN).await,
        Err(Error::NameInUse(_))
    ));
    // All three serve the LU (a gateway says so before its first read).
    for g in [&g1, &g2, &g3] {
        g.serve_lu(&lu).await.unwrap();
    }

    // 1. Every gateway acks: the wait ends with all of them acked.
    let r1 = commit_registration(&c, &lu, "iqn.a", 1).await;
    let waiter = spawn_wait_applied(&c, &lu, r1, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "returned before any ack");
    for g in [&g1, &g2] {
        g.ack(&lu, r1).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "returned before gw3 acked");
    let t = Instant::now();
    g3.ack(&lu, r1).await.unwrap();
    let done = waited(waiter).await;
    assert_eq!(done.acked, ["gw1", "gw2", "gw3"]);
    assert!(done.gone.is_empty());
    assert!(t.elapsed() < Duration::from_secs(2));
    let mut acks = c.acks(&lu).await.unwrap();
    acks.sort();
    assert_eq!(
        acks,
        [("gw1".into(), r1), ("gw2".into(), r1), ("gw3".into(), r1)]
    );

    // 2. gw3 stops keeping its lease alive and never acks: it stops
    // serving at once; the wait times out while its lease lives, and ends
    // once etcd expired it.
    g3.stop();
    assert!(!g3.may_serve());
    let r2 = commit_registration(&c, &lu, "iqn.b", 2).await;
    g1.ack(&lu, r2).await.unwrap();
    g2.ack(&lu, r2).await.unwrap();
    match c
        .wait_applied(&lu, r2, Instant::now() + Duration::from_millis(300))
        .await
    {
        Err(Error::NotApplied { pending, .. }) => assert_eq!(pending, ["gw3"]),
        other => panic!("expected NotApplied, got {other:?}"),
    }
    let t = Instant::now();
    let done = c
        .wait_applied(&lu, r2, Instant::now() + TTL * 4)
        .await
        .unwrap();
    assert_eq!(
        (done.acked.as_slice(), done.gone.as_slice()),
        (
            &["gw1".to_string(), "gw2".to_string()][..],
            &["gw3".to_string()][..]
        )
    );
    assert!(
        t.elapsed() < TTL * 3,
        "waited {:?} for an expired lease",
        t.elapsed()
    );
    let names: Vec<String> = c
        .gateways()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.record.name)
        .collect();
    assert_eq!(names, ["gw1", "gw2"]);
    // The expired lease took its ack along; the old incarnation cannot
    // ack any more; the name is free for a new one.
    assert!(c.acks(&lu).await.unwrap().iter().all(|(n, _)| n != "gw3"));
    assert!(matches!(g3.ack(&lu, r2).await, Err(Error::LeaseLost(_))));
    // The membership watch saw three joins (tpgt 1, 2, 3) and gw3 leave.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        match timeout(Duration::from_secs(5), members.next())
            .await
            .expect("membership event")
            .unwrap()
        {
            keyfence_cluster::GatewayEvent::Joined(g) => seen.push(format!(
                "+{}/{}",
                g.record.name, g.record.portal_groups[0].tpgt
            )),
            keyfence_cluster::GatewayEvent::Left { name, .. } => seen.push(format!("-{name}")),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["+gw1/1", "+gw2/2", "+gw3/3", "-gw3"]);
    let g3 = c
        .as_gateway("gw3")
        .unwrap()
        .join(pg(3), TTL, MARGIN)
        .await
        .expect("rejoin after expiry");
    g3.leave().await.unwrap();

    // A gateway that does not serve the LU is not waited for; one that
    // serves it is, until it acks or says it left the LU.
    let g6 = join_as(&c, "gw6", 6).await;
    let r = commit_registration(&c, &lu, "iqn.f", 6).await;
    g1.ack(&lu, r).await.unwrap();
    g2.ack(&lu, r).await.unwrap();
    let done = c
        .wait_applied(&lu, r, Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(done.acked, ["gw1", "gw2"]);
    g6.serve_lu(&lu).await.unwrap();
    let r = commit_registration(&c, &lu, "iqn.g", 7).await;
    g1.ack(&lu, r).await.unwrap();
    g2.ack(&lu, r).await.unwrap();
    let waiter = spawn_wait_applied(&c, &lu, r, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "returned before gw6 acked or left");
    g6.leave_lu(&lu).await.unwrap();
    let done = waited(waiter).await;
    assert_eq!(
        (done.acked.as_slice(), done.left.as_slice(), done.gone.len()),
        (
            &["gw1".to_string(), "gw2".to_string()][..],
            &["gw6".to_string()][..],
            0
        )
    );
    g6.leave().await.unwrap();

    // A registration deleted by hand while its lease lives does not count
    // as gone: that gateway may still serve. Its lease ending does.
    let g5 = join_as(&c, "gw5", 5).await;
    // Like a real gateway, it acks the state it read when it joined.
    g5.ack(&lu, c.read(&lu).await.unwrap().revision)
        .await
        .unwrap();
    let r = commit_registration(&c, &lu, "iqn.e", 5).await;
    g1.ack(&lu, r).await.unwrap();
    g2.ack(&lu, r).await.unwrap();
    c.client()
        .delete(c.keys().gateway("gw5"), None)
        .await
        .unwrap();
    match c
        .wait_applied(&lu, r, Instant::now() + Duration::from_millis(600))
        .await
    {
        Err(Error::NotApplied { pending, .. }) => assert_eq!(pending, ["gw5"]),
        other => panic!("a hand-deleted key with a live lease counted: {other:?}"),
    }
    let waiter = spawn_wait_applied(&c, &lu, r, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished());
    g5.leave().await.unwrap();
    let done = waited(waiter).await;
    assert_eq!(
        (done.acked.len(), done.gone.as_slice()),
        (2, &["gw5".to_string()][..])
    );

    // 3. kill -9 one etcd member: commits, acks, waits and keep-alives go on.
    etcd.kill(0);
    let r3 = c
        .update(&lu, |s| Ok::<_, String>(register(&s.state, "iqn.c", 3)))
        .await
        .expect("update with a member down");
    let r3 = r3.state.revision;
    g1.ack(&lu, r3).await.unwrap();
    g2.ack(&lu, r3).await.unwrap();
    let done = c
        .wait_applied(&lu, r3, Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(done.acked, ["gw1", "gw2"]);
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    assert!(
        g1.may_serve() && g2.may_serve(),
        "lease lost with two of three members up"
    );

    // 4. Quorum loss: a clear, typed error within a bounded time, and the
    // gateways stop serving before their leases could expire.
    etcd.kill(1);
    let t = Instant::now();
    let e = c
        .update(&lu, |s| Ok::<_, String>(register(&s.state, "iqn.d", 4)))
        .await
        .expect_err("update without quorum");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "quorum loss took {:?} to report",
        t.elapsed()
    );
    match &e {
        keyfence_cluster::UpdateError::Cluster(e) => {
            assert!(e.is_unavailable(), "not an unavailability: {e:?}")
        }
        other => panic!("unexpected error {other:?}"),
    }
    let stopped = timeout(TTL + Duration::from_secs(1), async {
        while g1.may_serve() || g2.may_serve() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(stopped.is_ok(), "gateways kept serving without quorum");
    assert!(c.read(&lu).await.unwrap_err().is_unavailable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_settled_never_guessed() {
    let etcd = EtcdCluster::start(3);
    let lu = LuId::new("lu-lost").unwrap();
    let c = connect(&etcd, "gw").await;
    let base = c
        .update(&lu, |s| Ok::<_, String>(register(&s.state, "iqn.y", 1)))
        .await
        .unwrap()
        .state;
    // Freeze etcd under the commit: the request sits in the members'
    // sockets, its answer cannot come in time, and once thawed etcd may
    // still execute it.
    for i in 0..3 {
        etcd.freeze(i);
    }
    let change = register(&base.state, "iqn.z", 2);
    let task = {
        let (c, lu, base, change) = (c.clone(), lu.clone(), base.clone(), change.clone());
        tokio::spawn(async move { c.commit(&lu, &base, change).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..3 {
        etcd.thaw(i);
    }
    let outcome = timeout(Duration::from_secs(10), task)
        .await
        .expect("commit settles in bounded time")
        .unwrap();
    // Whatever etcd still had queued has been executed by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now = c.read(&lu).await.unwrap();
    match outcome {
        Ok(done) => {
            assert!(done.changed);
            assert_eq!(now.revision, done.state.revision);
            assert_eq!(now.state, change.state);
        }
        Err(Error::Unavailable { .. }) => {
            // Reported as not made: it must not have happened, not even
            // late (the old revision was sealed).
            assert_eq!(
                (now.seq, &now.state),
                (base.seq, &base.state),
                "a failed commit took effect"
            );
        }
        Err(e) => panic!("not settled although etcd was back: {e}"),
    }
}

/// A departed gateway's nexus loss: the survivor that won the claim dies
/// before committing; the claim goes with its lease, the other survivor
/// (waiting on it) claims in turn and commits — once per LU, however often
/// it is tried (the per-LU marker), also after the first claimant had done
/// part of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departure_claimed_by_a_survivor_that_dies_is_taken_over_and_committed_once() {
    let etcd = EtcdCluster::start(3);
    let (lu1, lu2) = (
        LuId::new("lu-departure-1").unwrap(),
        LuId::new("lu-departure-2").unwrap(),
    );
    let c = connect(&etcd, "gwd").await;
    let mut departed = c.join(pg(1), TTL, MARGIN).await.unwrap();
    let s1 = c.as_gateway("gws1").unwrap();
    let s2 = c.as_gateway("gws2").unwrap();
    let mut g1 = s1.join(pg(2), TTL, MARGIN).await.unwrap();
    let g2 = s2.join(pg(3), TTL, MARGIN).await.unwrap();
    let d = c
        .gateways()
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.record.name == "gwd")
        .expect("departed gateway registered");
    for lu in [&lu1, &lu2] {
        c.update(lu, |s| Ok::<_, String>(register(&s.state, "iqn.d", 7)))
            .await
            .unwrap();
    }
    departed.stop();

    // gws1 wins the claim, commits LU 1 only, and dies.
    assert!(g1.claim_departure(&d).await.unwrap());
    assert!(
        !g2.claim_departure(&d).await.unwrap(),
        "one claimant at a time"
    );
    let change = |s: &keyfence_cluster::LuState| {
        Ok::<_, String>(Change {
            state: s.state.clone(),
            unit_attentions: vec![(None, asc::I_T_NEXUS_LOSS_OCCURRED)],
            aborts: Vec::new(),
        })
    };
    let marker_lease = s1.grant_lease(Duration::from_secs(3600)).await.unwrap();
    let m1 = c.keys().departed_done("gwd", d.lease, &lu1);
    let m2 = c.keys().departed_done("gwd", d.lease, &lu2);
    let seq1 = c.read(&lu1).await.unwrap().seq;
    let seq2 = c.read(&lu2).await.unwrap().seq;
    assert!(s1
        .commit_once(&lu1, &m1, marker_lease, change)
        .await
        .unwrap()
        .is_some());
    let waiting = {
        let g2 = std::sync::Arc::new(g2);
        let w = g2.clone();
        let d = d.clone();
        (
            g2,
            tokio::spawn(async move { w.wait_departure_claim_released(&d).await }),
        )
    };
    let (g2, waiter) = waiting;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "claim released while its holder lives"
    );
    let died = Instant::now();
    g1.stop();
    timeout(TTL * 3 + Duration::from_secs(3), waiter)
        .await
        .expect("claim released within the claimant's lease")
        .unwrap()
        .unwrap();
    let took = died.elapsed();
    assert!(
        took >= TTL - TTL / 3 - Duration::from_millis(200),
        "claim gone after {took:?}: before the claimant's lease could expire"
    );

    // gws2 takes over: LU 1 is already done (its marker), LU 2 is done now;
    // doing it all again changes nothing.
    assert!(g2.claim_departure(&d).await.unwrap());
    let ml = s2.grant_lease(Duration::from_secs(3600)).await.unwrap();
    assert!(s2
        .commit_once(&lu1, &m1, ml, change)
        .await
        .unwrap()
        .is_none());
    assert!(s2
        .commit_once(&lu2, &m2, ml, change)
        .await
        .unwrap()
        .is_some());
    assert!(s2
        .commit_once(&lu2, &m2, ml, change)
        .await
        .unwrap()
        .is_none());
    assert_eq!(c.read(&lu1).await.unwrap().seq, seq1 + 1, "LU 1 once");
    assert_eq!(c.read(&lu2).await.unwrap().seq, seq2 + 1, "LU 2 once");
    g2.release_departure(&d).await.unwrap();
    timeout(Duration::from_secs(2), g2.wait_departure_claim_released(&d))
        .await
        .expect("a released claim is gone at once")
        .unwrap();
}

/// The COMPARE AND WRITE lock: one holder at a time, waiters served in
/// order, and a holder that dies releases it with its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compare_and_write_lock_has_one_holder_and_goes_with_a_dead_holders_lease() {
    let etcd = EtcdCluster::start(3);
    let lu = LuId::new("lu-caw").unwrap();
    let c = connect(&etcd, "gwl1").await;
    let mut g1 = c.join(pg(1), TTL, MARGIN).await.unwrap();
    let g2 = std::sync::Arc::new(join_as(&c, "gwl2", 2).await);
    let far = || Instant::now() + Duration::from_secs(20);
    // g2 asks for the lock in a task of its own.
    let g2_locks = || {
        let (g2, lu) = (g2.clone(), lu.clone());
        tokio::spawn(async move { g2.lock(&lu, far()).await })
    };
    // Taken and released, then taken again.
    let h = g1.lock(&lu, far()).await.unwrap();
    g1.unlock(&h).await.unwrap();
    let h1 = g1.lock(&lu, far()).await.unwrap();
    // g2 waits behind g1 ...
    let w = g2_locks();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!w.is_finished(), "two holders at once");
    // ... a waiter that gives up leaves the line ...
    assert!(g2
        .lock(&LuId::new("lu-other").unwrap(), far())
        .await
        .is_ok());
    // ... and gets it when g1 releases.
    g1.unlock(&h1).await.unwrap();
    let h2 = timeout(Duration::from_secs(5), w)
        .await
        .expect("lock passed on")
        .unwrap()
        .unwrap();
    // g1 waits behind g2 now, with a deadline it cannot meet.
    let short = g1
        .lock(&lu, Instant::now() + Duration::from_millis(300))
        .await;
    assert!(short.is_err(), "got the lock while g2 holds it");
    g2.unlock(&h2).await.unwrap();
    // A holder that dies: the lock goes with its lease.
    let h1 = g1.lock(&lu, far()).await.unwrap();
    let w = g2_locks();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!w.is_finished());
    let died = Instant::now();
    g1.stop();
    let h2 = timeout(TTL * 3 + Duration::from_secs(3), w)
        .await
        .expect("a dead holder's lock is released with its lease")
        .unwrap()
        .unwrap();
    assert!(
        died.elapsed() >= TTL - TTL / 3 - Duration::from_millis(200),
        "lock taken over before the dead holder's lease could expire"
    );
    let _ = h1;
    g2.unlock(&h2).await.unwrap();
}

/// A write under the gateway's lease that etcd refuses for want of the
/// lease ("lease not found": revoked behind the gateway's back) fails with
/// `LeaseLost` and stops the gateway serving at once, before its
/// keep-alive finds out; `Lost` is announced once, also when the
/// keep-alive learns it later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_want_of_the_lease_stops_the_gateway_at_once() {
    let etcd = EtcdCluster::start(1);
    let c = connect(&etcd, "gwx0").await;
    let lu = LuId::new("lu-gone").unwrap();
    let other = join_as(&c, "gwx9", 9).await;
    let departed = c.gateways().await.unwrap().remove(0);
    let writes = ["lock", "claim", "ack"];
    for (i, write) in writes.into_iter().enumerate() {
        let name = format!("gwx{}", i + 1);
        let gw = join_as(&c, &name, i as u16 + 1).await;
        let mut live = gw.liveness();
        live.borrow_and_update();
        assert!(gw.may_serve(), "{write}: a new gateway serves");
        c.revoke_lease(gw.lease()).await.unwrap();
        let t = Instant::now();
        let r = match write {
            "lock" => gw
                .lock(&lu, Instant::now() + Duration::from_secs(5))
                .await
                .map(drop),
            "claim" => gw.claim_departure(&departed).await.map(drop),
            _ => gw.ack(&lu, 1).await,
        };
        assert!(
            matches!(r, Err(Error::LeaseLost(ref n)) if *n == name),
            "{write}: {r:?}"
        );
        // The keep-alive (every TTL / 3) may have found out meanwhile
        // only if the write took that long.
        assert!(
            gw.current() == Liveness::Lost || t.elapsed() >= TTL / 3,
            "{write}: still {:?} after etcd refused the lease",
            gw.current()
        );
        assert!(!gw.may_serve(), "{write}: serving without a lease");
        assert!(live.has_changed().unwrap());
        assert_eq!(*live.borrow_and_update(), Liveness::Lost);
        // The keep-alive meets the missing lease too: no second `Lost`.
        tokio::time::sleep(TTL / 3 + Duration::from_millis(300)).await;
        assert!(
            !live.has_changed().unwrap(),
            "{write}: Lost announced twice"
        );
        assert_eq!(gw.current(), Liveness::Lost);
    }
    drop(other);
}

/// The COMPARE AND WRITE range: published by the lock's holder only,
/// seen by the other gateways' watches, waited for until every other live
/// gateway acknowledged it (an ack of an older range does not count) or
/// its lease is gone, and released by the holder, by `unlock`, or with the
/// holder's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compare_and_write_range_is_acknowledged_by_every_live_gateway_and_goes_with_its_holder(
) {
    use keyfence_cluster::RangeEvent;
    let etcd = EtcdCluster::start(3);
    let lu = LuId::new("lu-range").unwrap();
    let c = connect(&etcd, "gwr1").await;
    let mut g1 = c.join(pg(1), TTL, MARGIN).await.unwrap();
    let g2 = join_as(&c, "gwr2", 2).await;
    let mut g3 = join_as(&c, "gwr3", 3).await;
    // All three serve the LU (range waits count the gateways serving it).
    for g in [&g1, &g2, &g3] {
        g.serve_lu(&lu).await.unwrap();
    }
    let far = || Instant::now() + Duration::from_secs(20);
    let next = |w: &mut keyfence_cluster::RangeWatch| {
        let mut w = std::mem::replace(w, c.watch_range(&lu, i64::MAX - 1));
        async move {
            let ev = timeout(Duration::from_secs(10), w.next())
                .await
                .expect("a range event")
                .expect("range watch");
            (w, ev)
        }
    };
    let (none, at) = c.read_range(&lu).await.unwrap();
    assert_eq!(none, None);
    let mut watch = c.watch_range(&lu, at);
    let h1 = g1.lock(&lu, far()).await.unwrap();
    let rev = g1.publish_range(&h1, 10, 4).await.unwrap();
    let (w, ev) = next(&mut watch).await;
    watch = w;
    let RangeEvent::Held(r) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(
        (r.gateway.as_str(), r.lba, r.blocks, r.revision),
        ("gwr1", 10, 4, rev)
    );
    assert_eq!(c.read_range(&lu).await.unwrap().0, Some(r.clone()));
    // Waits for gwr2 and gwr3, not for the holder itself.
    let wait = {
        let (c, lu) = (c.clone(), lu.clone());
        tokio::spawn(async move { c.wait_range_acked(&lu, rev, far(), "gwr1").await })
    };
    g2.ack_range(&lu, rev).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !wait.is_finished(),
        "range held before gwr3 acknowledged it"
    );
    g3.ack_range(&lu, rev).await.unwrap();
    let a = timeout(Duration::from_secs(5), wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(a.acked, vec!["gwr2".to_string(), "gwr3".to_string()]);
    assert!(a.gone.is_empty());
    // Withdrawn (the lock stays), then the next range: the old acks do
    // not count for it; a gateway that stops is waited out.
    g1.release_range(&h1).await.unwrap();
    let (w, ev) = next(&mut watch).await;
    watch = w;
    assert!(matches!(ev, RangeEvent::Released { .. }), "{ev:?}");
    let rev2 = g1.publish_range(&h1, 12, 1).await.unwrap();
    let (w, ev) = next(&mut watch).await;
    watch = w;
    assert!(
        matches!(ev, RangeEvent::Held(ref r) if r.revision == rev2),
        "{ev:?}"
    );
    let wait = {
        let (c, lu) = (c.clone(), lu.clone());
        tokio::spawn(async move { c.wait_range_acked(&lu, rev2, far(), "gwr1").await })
    };
    g2.ack_range(&lu, rev2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!wait.is_finished(), "an ack of the previous range counted");
    let stopped = Instant::now();
    g3.stop();
    let a = timeout(TTL * 3 + Duration::from_secs(3), wait)
        .await
        .expect("a silent gateway is waited out")
        .unwrap()
        .unwrap();
    assert_eq!(
        (a.acked, a.gone),
        (vec!["gwr2".to_string()], vec!["gwr3".to_string()])
    );
    assert!(
        stopped.elapsed() >= TTL - TTL / 3 - Duration::from_millis(200),
        "went on before the silent gateway's lease could expire"
    );
    // unlock releases the range with the lock; without the lock nothing
    // can be published.
    g1.unlock(&h1).await.unwrap();
    let (w, ev) = next(&mut watch).await;
    watch = w;
    assert!(matches!(ev, RangeEvent::Released { .. }), "{ev:?}");
    assert!(g1.publish_range(&h1, 0, 1).await.is_err());
    assert_eq!(c.read_range(&lu).await.unwrap().0, None);
    // A holder that dies: its range goes with its lease.
    let h1 = g1.lock(&lu, far()).await.unwrap();
    g1.publish_range(&h1, 20, 2).await.unwrap();
    let (w, ev) = next(&mut watch).await;
    watch = w;
    assert!(matches!(ev, RangeEvent::Held(_)), "{ev:?}");
    g1.stop();
    let (_, ev) = timeout(TTL * 3 + Duration::from_secs(3), next(&mut watch))
        .await
        .expect("a dead holder's range is released with its lease");
    assert!(matches!(ev, RangeEvent::Released { .. }), "{ev:?}");
}
