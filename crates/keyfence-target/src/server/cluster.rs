//! Cluster mode in the server (docs/cluster.md): the etcd-backed
//! [`SharedPrState`] of each clustered LU, and the follower task that
//! applies every committed change on this gateway — install the state,
//! establish the unit attentions of this gateway's I_T nexuses, abort and
//! drain the tasks a PREEMPT AND ABORT aborts, then acknowledge — and the
//! supervisor of this gateway's membership: it drains the commands in
//! flight when the lease is in doubt, re-joins with a new lease and
//! resynchronises every LU after the lease was lost, and commits the
//! nexus-loss effects of gateways that departed.
//!
//! The clustered LUs served here are kept in a [`Registry`]: a reload adds
//! LUs to it (each is followed — `Gateway::serve_lu`, read, install, ack —
//! before the reload publishes it) and removes them (the follower stops,
//! the LU stops serving, the commands in flight on it finish, then
//! `Gateway::leave_lu` tells fencers not to wait for this gateway on it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use keyfence_cluster::{
    CawRange, Change, Cluster, Error, Gateway, GatewayEntry, GatewayEvent, Liveness, LockHeld,
    LuEvent, LuId, LuState, PortalGroup, RangeEvent, UaCatchUp, UpdateError,
};
use keyfence_lu::reservation::{SharedChange, SharedPrState};
use keyfence_lu::{HeldRange, LogicalUnit, UaScope};
use keyfence_pr::{PrState, Refusal};
use keyfence_scsi::sense::{asc, Asc};
use keyfence_scsi::{Nexus, Sense, SenseKey};
use tokio::runtime::Handle;

use super::session::SessionCtl;
use super::Shared;

/// How long a follower waits for the aborted nexuses' commands that had
/// passed the reservation check.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// The reservation state of one clustered LU, kept in etcd.
#[derive(Debug)]
pub(crate) struct EtcdPrState {
    cluster: Cluster,
    membership: Arc<Membership>,
    lu: LuId,
    runtime: Handle,
    /// How long a commit waits for every live gateway to apply it: beyond
    /// lease TTL + margin + a request timeout, so that a dead gateway's
    /// lease runs out first.
    apply_wait: Duration,
    /// The LU's cluster-wide COMPARE AND WRITE lock, as this gateway uses it.
    caw: CawLock,
}

/// Most COMPARE AND WRITEs of this gateway in a row under one take of the
/// cluster-wide lock while more of its own wait: then it is released, so
/// a gateway waiting in line gets its turn.
const CAW_STREAK: u32 = 8;

/// This gateway's side of an LU's COMPARE AND WRITE lock: its own
/// commands take turns locally (one at a time); the first of a run takes
/// the etcd lock (`Gateway::lock`), which is handed on to the next local
/// one while some wait (up to [`CAW_STREAK`] in a row) and released
/// otherwise.
#[derive(Debug, Default)]
struct CawLock {
    state: std::sync::Mutex<CawState>,
    turn: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct CawState {
    /// A COMPARE AND WRITE of this gateway holds the turn.
    busy: bool,
    /// Local commands waiting for the turn.
    waiting: usize,
    /// The etcd lock, while this gateway holds it.
    held: Option<LockHeld>,
    /// COMPARE AND WRITEs since it was taken.
    streak: u32,
}

impl EtcdPrState {
    pub fn new(membership: Arc<Membership>, lu: LuId, runtime: Handle) -> Self {
        let cluster = membership.cluster.clone();
        let apply_wait = membership.ttl
            + membership.margin
            + cluster.request_timeout() * 2
            + Duration::from_secs(1);
        EtcdPrState {
            cluster,
            membership,
            lu,
            runtime,
            apply_wait,
            caw: CawLock::default(),
        }
    }

    async fn commit_async(
        cluster: Cluster,
        lu: LuId,
        apply_wait: Duration,
        mut change: SharedChange,
    ) -> Result<PrState, Refusal> {
        let committed = cluster
            .update(&lu, |s: &LuState| change(&s.state).map(Change::from))
            .await
            .map_err(|e| match e {
                UpdateError::Rejected(r) => r,
                UpdateError::Cluster(e) => {
                    tracing::error!(gateway = cluster.gateway(), lu = %lu, error = %e, "PR change not committed");
                    Refusal::Check(cluster_sense(&e))
                }
            })?;
        if committed.changed {
            // Every change, not only the fencing ones, waits until every
            // live gateway applied it: a REGISTER through one gateway is
            // then in force on all of them when it returns GOOD.
            let deadline = tokio::time::Instant::now() + apply_wait;
            let rev = committed.state.revision;
            match cluster.wait_applied(&lu, rev, deadline).await {
                Ok(a) => tracing::info!(
                    gateway = cluster.gateway(),
                    lu = %lu,
                    revision = rev,
                    seq = committed.state.seq,
                    acked = ?a.acked,
                    gone = ?a.gone,
                    "PR change committed and applied"
                ),
                Err(e) => {
                    tracing::error!(gateway = cluster.gateway(), lu = %lu, revision = rev, error = %e, "PR change committed but not confirmed applied");
                    return Err(Refusal::Check(cluster_sense(&e)));
                }
            }
        }
        Ok(committed.state.state)
    }
}

/// The sense for a change the cluster could not commit or confirm: NOT
/// READY, ASYMMETRIC ACCESS STATE TRANSITION while etcd is unavailable
/// (the initiator retries), HARDWARE ERROR otherwise.
fn cluster_sense(e: &Error) -> Sense {
    if e.is_unavailable() || matches!(e, Error::NotApplied { .. } | Error::LeaseLost(_)) {
        Sense::new(SenseKey::NotReady, asc::ASYMMETRIC_ACCESS_STATE_TRANSITION)
    } else {
        Sense::new(SenseKey::HardwareError, asc::INTERNAL_TARGET_FAILURE)
    }
}

impl SharedPrState for EtcdPrState {
    fn may_serve(&self) -> bool {
        self.membership.may_serve()
    }

    fn commit(&self, change: SharedChange) -> Result<PrState, Refusal> {
        // Called on the threads that run PR OUT and RESERVE/RELEASE
        // (spawn_blocking: LogicalUnit::is_blocking), never on a worker.
        let (tx, rx) = std::sync::mpsc::channel();
        let fut = Self::commit_async(
            self.cluster.clone(),
            self.lu.clone(),
            self.apply_wait,
            change,
        );
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(self.apply_wait * 4 + Duration::from_secs(10))
            .unwrap_or_else(|_| {
                Err(Refusal::Check(Sense::new(
                    SenseKey::HardwareError,
                    asc::INTERNAL_TARGET_FAILURE,
                )))
            })
    }

    fn commit_detached(&self, change: SharedChange) {
        let fut = Self::commit_async(
            self.cluster.clone(),
            self.lu.clone(),
            self.apply_wait,
            change,
        );
        self.runtime.spawn(async move {
            let _ = fut.await;
        });
    }

    fn unit_attention_elsewhere(&self, asc: Asc) {
        // One committed change with no state change and one unit attention
        // for every nexus; this gateway's follower skips it (it queued its
        // own at once). Waited for (as far as the thread may wait) until
        // every live gateway applied it, so that a command through another
        // gateway right after the reset's response sees it.
        let (cluster, lu, wait) = (self.cluster.clone(), self.lu.clone(), self.apply_wait);
        let fut = async move {
            let r = async {
                let c = cluster
                    .update(&lu, |s: &LuState| {
                        Ok::<_, Refusal>(Change {
                            state: s.state.clone(),
                            unit_attentions: vec![(None, asc)],
                            aborts: Vec::new(),
                        })
                    })
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                let rev = c.state.revision;
                cluster
                    .wait_applied(&lu, rev, tokio::time::Instant::now() + wait)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<i64, String>(rev)
            }
            .await;
            match &r {
                Ok(rev) => {
                    tracing::info!(gateway = cluster.gateway(), lu = %lu, revision = rev, asc = ?asc, "unit attention for every gateway's nexuses committed and applied")
                }
                Err(e) => {
                    tracing::error!(gateway = cluster.gateway(), lu = %lu, error = %e, "unit attention for the other gateways not confirmed")
                }
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            fut.await;
            let _ = tx.send(());
        });
        // A worker of a multi-thread runtime waits in block_in_place (the
        // commit runs on the other workers); a current-thread runtime
        // cannot wait; a plain thread just waits.
        use tokio::runtime::RuntimeFlavor;
        let limit = self.apply_wait * 2 + Duration::from_secs(5);
        match Handle::try_current() {
            Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
                let _ = tokio::task::block_in_place(|| rx.recv_timeout(limit));
            }
            Ok(_) => {}
            Err(_) => {
                let _ = rx.recv_timeout(limit);
            }
        }
    }

    fn offers_compare_and_write(&self) -> bool {
        true
    }

    fn lock_compare_and_write(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        // Called on the blocking pool (every medium command runs there).
        let limit = self.apply_wait * 2;
        let give_up = std::time::Instant::now() + limit;
        let transition = || Sense::new(SenseKey::NotReady, asc::ASYMMETRIC_ACCESS_STATE_TRANSITION);
        let lock = || self.caw.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = lock();
        st.waiting += 1;
        while st.busy {
            let left = give_up.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                st.waiting -= 1;
                return Err(transition());
            }
            st = self
                .caw
                .turn
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.waiting -= 1;
        st.busy = true;
        let gw = self.membership.gateway();
        if st.held.as_ref().is_some_and(|h| h.lease() != gw.lease()) {
            // Taken by an incarnation whose lease is gone.
            st.held = None;
        }
        let held = match st.held.clone() {
            Some(h) => h,
            None => {
                drop(st);
                let lu = self.lu.clone();
                let gw2 = gw.clone();
                let deadline = tokio::time::Instant::now() + limit;
                let r = self.block_on(async move { gw2.lock(&lu, deadline).await }, limit);
                st = lock();
                match r {
                    Some(Ok(h)) => {
                        st.held = Some(h.clone());
                        st.streak = 0;
                        h
                    }
                    other => {
                        let e = other
                            .map_or_else(|| "no answer".to_string(), |r| format!("{:?}", r.err()));
                        tracing::warn!(gateway = gw.name(), lu = %self.lu, error = %e, "COMPARE AND WRITE lock not taken");
                        st.busy = false;
                        self.caw.turn.notify_one();
                        return Err(transition());
                    }
                }
            }
        };
        st.streak += 1;
        drop(st);
        // Publish the range and wait until every other live gateway holds
        // back its writes there (or provably stopped serving).
        let (lu, gw2, cluster, h) = (
            self.lu.clone(),
            gw.clone(),
            self.cluster.clone(),
            held.clone(),
        );
        let wait = self.apply_wait;
        let r = self.block_on(
            async move {
                let rev = gw2.publish_range(&h, lba, blocks).await?;
                let deadline = tokio::time::Instant::now() + wait;
                cluster
                    .wait_range_acked(&lu, rev, deadline, gw2.name())
                    .await
                    .map(|a| (rev, a))
            },
            wait + self.cluster.request_timeout(),
        );
        match r {
            Some(Ok((rev, a))) => {
                tracing::debug!(gateway = gw.name(), lu = %self.lu, lba, blocks, revision = rev, acked = ?a.acked, gone = ?a.gone, "COMPARE AND WRITE range held cluster-wide");
                Ok(())
            }
            other => {
                let e = other.map_or_else(|| "no answer".to_string(), |r| format!("{:?}", r.err()));
                tracing::warn!(gateway = gw.name(), lu = %self.lu, lba, blocks, error = %e, "COMPARE AND WRITE range not held by every gateway");
                // Give the lock (and the range) up: the next one starts over.
                self.release_caw(true);
                Err(transition())
            }
        }
    }

    fn unlock_compare_and_write(&self) {
        self.release_caw(false);
    }

    fn gateway(&self) -> Option<&str> {
        Some(self.cluster.gateway())
    }
}

impl EtcdPrState {
    /// End this gateway's turn at the COMPARE AND WRITE lock: hand the
    /// lock on to the next local COMPARE AND WRITE (withdrawing the
    /// range), or — with `give_up`, when none waits, after
    /// [`CAW_STREAK`] in a row or when this gateway may not serve —
    /// release it (the range with it).
    fn release_caw(&self, give_up: bool) {
        let lock = || self.caw.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = lock();
        let gw = self.membership.gateway();
        if !give_up && st.waiting > 0 && st.streak < CAW_STREAK && self.membership.may_serve() {
            if let Some(h) = st.held.clone() {
                drop(st);
                let (gw2, h2) = (gw.clone(), h);
                let r = self.block_on(
                    async move { gw2.release_range(&h2).await },
                    self.cluster.request_timeout() * 2,
                );
                if matches!(r, Some(Ok(()))) {
                    // Handed on to the next local COMPARE AND WRITE.
                    st = lock();
                    st.busy = false;
                    self.caw.turn.notify_one();
                    return;
                }
                tracing::warn!(gateway = gw.name(), lu = %self.lu, "COMPARE AND WRITE range not withdrawn; releasing the lock");
                st = lock();
            }
        }
        let held = st.held.take();
        st.streak = 0;
        drop(st);
        if let Some(h) = held {
            let (gw2, h2) = (gw.clone(), h.clone());
            let r = self.block_on(
                async move { gw2.unlock(&h2).await },
                self.cluster.request_timeout() * 2,
            );
            if !matches!(r, Some(Ok(()))) {
                // Its key goes with the lease at the latest.
                tracing::warn!(gateway = gw.name(), lu = %self.lu, "COMPARE AND WRITE lock not released; it ends with the lease");
            }
        }
        let mut st = lock();
        st.busy = false;
        self.caw.turn.notify_one();
    }

    /// Run `fut` on the runtime and wait for it on this (non-worker)
    /// thread for at most `limit` (plus a second); `None` if it did not
    /// finish.
    fn block_on<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
        limit: Duration,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(limit + Duration::from_secs(1)).ok()
    }
}

/// Install `s` on this gateway's LU and deliver what it carries for the
/// nexuses logged in here: the unit attentions of the changes after
/// `applied_seq` (the sessions on the target are ended when the log has a
/// gap), and the aborts of PREEMPT AND ABORT, whose preempted commands are
/// drained before this returns. After a resync the aborts missed are
/// unknown: every command in flight on the LU is waited for.
#[allow(clippy::too_many_arguments)]
async fn apply(
    shared: &Arc<Shared>,
    target: usize,
    lu: &Arc<LogicalUnit>,
    tpgts: &HashSet<u16>,
    me: &str,
    s: &LuState,
    applied_seq: u64,
    resync: bool,
) {
    // A unit attention for every nexus that this gateway committed as the
    // one change since the last applied (LOGICAL UNIT RESET) was queued
    // for its own nexuses when it was committed.
    let own_broadcast = s.writer == me && s.seq == applied_seq + 1;
    lu.reservations().install(s.state.clone());
    let ua = lu.unit_attentions();
    match s.unit_attentions_after(applied_seq) {
        UaCatchUp::Complete(list) => {
            for u in list {
                match &u.nexus {
                    None if own_broadcast => {}
                    None => ua.queue(UaScope::All, u.asc),
                    Some(n) if tpgts.contains(&n.target.tpgt) => ua.queue(UaScope::Nexus(n), u.asc),
                    Some(_) => {}
                }
            }
        }
        UaCatchUp::Gap => {
            // Which nexus missed which unit attention is unknown: end the
            // sessions on this target (an I_T nexus loss they recover from).
            tracing::warn!(lu = %lu.config().target_name, lun = lu.lun(), "unit attention log gap: ending sessions");
            shared
                .sessions()
                .broadcast_target(target, None, SessionCtl::Close);
        }
    }
    let victims: Vec<Nexus> = if resync {
        ua.known_nexuses()
    } else if s.seq > applied_seq {
        s.aborts
            .iter()
            .filter(|n| tpgts.contains(&n.target.tpgt))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    if victims.is_empty() {
        return;
    }
    if !resync {
        let sessions = shared.sessions();
        for n in &victims {
            sessions.send_to_nexus(
                n,
                None,
                SessionCtl::AbortTasks {
                    lun: Some(lu.lun()),
                },
            );
        }
    }
    if !drain(lu, victims, DRAIN_LIMIT).await {
        tracing::error!(
            lun = lu.lun(),
            "preempted commands did not finish in {DRAIN_LIMIT:?}"
        );
    }
}

/// Wait (off the async workers) until the commands of `nexuses` on `lu`
/// that passed the reservation check have finished.
async fn drain(lu: &Arc<LogicalUnit>, nexuses: Vec<Nexus>, limit: Duration) -> bool {
    let lu = lu.clone();
    tokio::task::spawn_blocking(move || lu.reservations().drain_nexuses(&nexuses, limit))
        .await
        .unwrap_or(false)
}

/// Portal groups as (TPGT, address) pairs, to compare and combine them.
pub(crate) type PortalSet = std::collections::BTreeSet<(u16, String)>;

/// The (TPGT, address) pairs of registered portal groups.
pub(crate) fn portal_set(groups: &[PortalGroup]) -> PortalSet {
    groups
        .iter()
        .flat_map(|g| g.portals.iter().map(|a| (g.tpgt, a.clone())))
        .collect()
}

/// Portal groups to register: one per TPGT with its addresses, in TPGT
/// order.
pub(crate) fn portal_groups(set: &PortalSet) -> Vec<PortalGroup> {
    let mut out: Vec<PortalGroup> = Vec::new();
    for (tpgt, addr) in set {
        match out.last_mut() {
            Some(g) if g.tpgt == *tpgt => g.portals.push(addr.clone()),
            _ => out.push(PortalGroup {
                tpgt: *tpgt,
                portals: vec![addr.clone()],
            }),
        }
    }
    out
}

/// This gateway's membership in the cluster: the current incarnation
/// (lease and registration), replaced by a new one when the lease is lost.
#[derive(Debug)]
pub(crate) struct Membership {
    cluster: Cluster,
    /// The portal groups registered now (in the current incarnation's
    /// record, and the ones a new incarnation registers). Held while the
    /// record is rewritten or a new incarnation joins, so the two never
    /// interleave.
    groups: tokio::sync::Mutex<Vec<PortalGroup>>,
    ttl: Duration,
    margin: Duration,
    current: ArcSwap<Gateway>,
}

impl Membership {
    /// Register this gateway (first incarnation).
    pub async fn join(
        cluster: Cluster,
        groups: Vec<PortalGroup>,
        ttl: Duration,
        margin: Duration,
    ) -> Result<Arc<Membership>, Error> {
        let gw = cluster.join(groups.clone(), ttl, margin).await?;
        Ok(Arc::new(Membership {
            ttl: gw.ttl(),
            margin,
            cluster,
            groups: tokio::sync::Mutex::new(groups),
            current: ArcSwap::from_pointee(gw),
        }))
    }

    /// The portal groups registered now.
    pub async fn portal_groups(&self) -> Vec<PortalGroup> {
        self.groups.lock().await.clone()
    }

    /// Register `groups` instead (a reload changed this gateway's
    /// portals): rewrite the current incarnation's record under its lease
    /// (`Gateway::update_portals`); a later incarnation registers them
    /// too. Nothing changes on error.
    pub async fn set_portal_groups(&self, groups: Vec<PortalGroup>) -> Result<(), Error> {
        let mut now = self.groups.lock().await;
        if *now == groups {
            return Ok(());
        }
        let gw = self.gateway();
        gw.update_portals(groups.clone()).await?;
        tracing::info!(gateway = gw.name(), groups = ?groups, "registered portal groups changed");
        *now = groups;
        Ok(())
    }

    /// The connection to etcd.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// May commands on clustered LUs run now? (A lock-free read.)
    pub fn may_serve(&self) -> bool {
        self.current.load().may_serve()
    }

    fn gateway(&self) -> Arc<Gateway> {
        self.current.load_full()
    }

    /// A clean shutdown: stop serving and revoke the lease, so the other
    /// gateways' fencing changes need not wait out the TTL.
    pub async fn leave(&self) {
        let gw = self.gateway();
        match gw.revoke().await {
            Ok(()) => tracing::info!(gateway = gw.name(), "lease revoked on shutdown"),
            Err(e) => {
                tracing::warn!(gateway = gw.name(), error = %e, "lease not revoked; it expires after its TTL")
            }
        }
    }
}

/// One clustered LU served here.
#[derive(Debug, Clone)]
pub(crate) struct Followed {
    pub target: usize,
    pub lu: Arc<LogicalUnit>,
    pub id: LuId,
    /// The TPGTs of this gateway's portal groups its target is served
    /// on, and of those a reload removed while sessions through them
    /// remain: unit attentions and aborts for nexuses there are this
    /// gateway's to deliver.
    pub tpgts: Arc<ArcSwap<HashSet<u16>>>,
    /// The last change whose unit attentions were delivered here (kept
    /// across re-joins); `u64::MAX` before the first install.
    applied_seq: Arc<AtomicU64>,
    /// True while the LU is in service here: its state read, installed
    /// and acknowledged under the current incarnation.
    in_service: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Followed {
    pub fn new(target: usize, lu: Arc<LogicalUnit>, id: LuId, tpgts: HashSet<u16>) -> Self {
        Followed {
            target,
            lu,
            id,
            tpgts: Arc::new(ArcSwap::from_pointee(tpgts)),
            applied_seq: Arc::new(AtomicU64::new(u64::MAX)),
            in_service: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

/// A followed LU and its tasks under the current incarnation.
#[derive(Debug)]
struct Entry {
    f: Followed,
    /// Asks the follower to stop between two changes.
    stop: tokio::sync::watch::Sender<bool>,
    /// The follower of the PR state.
    task: Option<tokio::task::JoinHandle<()>>,
    /// The follower of the COMPARE AND WRITE range.
    ranges: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    /// The incarnation followers run under; None before the supervisor
    /// starts them and while it joins again.
    gw: Option<Arc<Gateway>>,
    lus: BTreeMap<LuId, Entry>,
    /// LUs removed whose `leave_lu` is not written yet (etcd unreachable):
    /// one may not be added back until it is.
    leaving: HashSet<LuId>,
}

/// The clustered LUs this gateway serves and their followers (see the
/// module doc).
#[derive(Debug)]
pub(crate) struct Registry {
    pub membership: Arc<Membership>,
    inner: std::sync::Mutex<RegistryInner>,
    /// Portal groups a reload removed that are still registered (see
    /// `reload::retire_portals`).
    pub retiring: std::sync::Mutex<Retiring>,
}

/// The state of retiring the portal groups reloads removed from the
/// registration.
#[derive(Debug, Default)]
pub(crate) struct Retiring {
    /// A task is retiring them; it looks at the published configuration
    /// again before it ends.
    pub running: bool,
    /// Logins in progress when a reload was published: they may have
    /// started under the configuration before it.
    pub logins: HashSet<u16>,
}

impl Registry {
    pub fn new(membership: Arc<Membership>) -> Arc<Registry> {
        Arc::new(Registry {
            membership,
            inner: Default::default(),
            retiring: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The LUs followed now.
    pub fn followed(&self) -> Vec<Followed> {
        self.lock().lus.values().map(|e| e.f.clone()).collect()
    }

    /// Deliver unit attentions and aborts of the LUs of `target` to the
    /// nexuses through `tpgts` from now on (a reload changed the target's
    /// portal groups).
    pub fn set_tpgts(&self, target: usize, tpgts: &HashSet<u16>) {
        for e in self.lock().lus.values().filter(|e| e.f.target == target) {
            if **e.f.tpgts.load() != *tpgts {
                e.f.tpgts.store(Arc::new(tpgts.clone()));
            }
        }
    }

    /// How long a reload waits for an added LU to come into service.
    pub fn join_wait(&self) -> Duration {
        let m = &self.membership;
        m.ttl + m.cluster.request_timeout() * 2
    }

    fn spawn(shared: &Arc<Shared>, e: &mut Entry, gw: &Arc<Gateway>, cluster: &Cluster) {
        // No write reaches the LU until this incarnation has read which
        // range another gateway's COMPARE AND WRITE holds there.
        e.f.lu.hold_all_ranges();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        e.stop = stop;
        e.task = Some(tokio::spawn(follow(
            shared.clone(),
            e.f.clone(),
            gw.clone(),
            cluster.clone(),
            stopped,
        )));
        e.ranges = Some(tokio::spawn(follow_ranges(
            e.f.clone(),
            gw.clone(),
            cluster.clone(),
        )));
    }

    /// Follow every LU under incarnation `gw` (the supervisor).
    fn start_all(&self, shared: &Arc<Shared>, gw: Arc<Gateway>) {
        let cluster = self.membership.cluster.clone();
        let mut inner = self.lock();
        for e in inner.lus.values_mut() {
            Self::spawn(shared, e, &gw, &cluster);
        }
        inner.gw = Some(gw);
    }

    /// Stop every follower at once (the incarnation is over).
    fn abort_all(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut inner = self.lock();
        inner.gw = None;
        inner
            .lus
            .values_mut()
            .flat_map(|e| [e.task.take(), e.ranges.take()])
            .flatten()
            .inspect(|t| t.abort())
            .collect()
    }

    /// Follow `f` (at bind, or added by a reload): at once if the
    /// supervisor runs, else when it starts. The receiver turns true once
    /// the LU is in service. Refused while the same LU is still leaving.
    pub fn add(
        &self,
        shared: &Arc<Shared>,
        f: Followed,
    ) -> Result<tokio::sync::watch::Receiver<bool>, String> {
        let mut inner = self.lock();
        if inner.leaving.contains(&f.id) {
            return Err(format!(
                "clustered LU {} was removed by an earlier reload and this gateway could not tell the cluster yet (is etcd reachable?); try again",
                f.id
            ));
        }
        if inner.lus.contains_key(&f.id) {
            return Err(format!("clustered LU {} is served already", f.id));
        }
        let served = f.in_service.subscribe();
        let mut e = Entry {
            f,
            stop: tokio::sync::watch::channel(false).0,
            task: None,
            ranges: None,
        };
        if let Some(gw) = inner.gw.clone() {
            Self::spawn(shared, &mut e, &gw, &self.membership.cluster);
        }
        inner.lus.insert(e.f.id.clone(), e);
        Ok(served)
    }

    /// Stop serving `id` here (a reload removed it, or it did not come
    /// into service): stop its follower, refuse new commands on it, wait
    /// for those in flight, then tell the cluster this gateway no longer
    /// serves it, so fencing changes stop waiting for it.
    pub async fn remove(self: &Arc<Self>, id: &LuId) {
        let Some(e) = self.lock().lus.remove(id) else {
            return;
        };
        let _ = e.stop.send(true);
        if let Some(t) = e.ranges {
            t.abort();
            let _ = t.await;
        }
        if let Some(t) = e.task {
            // It stops between two changes; applying one may drain
            // preempted commands for up to DRAIN_LIMIT.
            let abort = t.abort_handle();
            if tokio::time::timeout(DRAIN_LIMIT + Duration::from_secs(5), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        e.f.lu.reservations().unsync();
        e.f.in_service.send_replace(false);
        let all = e.f.lu.unit_attentions().known_nexuses();
        if !drain(&e.f.lu, all, DRAIN_LIMIT).await {
            tracing::error!(lu = %id, "commands on a removed clustered LU did not finish in {DRAIN_LIMIT:?}");
        }
        let deadline = tokio::time::Instant::now() + self.join_wait();
        loop {
            let gw = self.membership.gateway();
            match gw.leave_lu(id).await {
                Ok(()) => {
                    tracing::info!(gateway = gw.name(), lu = %id, "clustered LU no longer served here");
                    return;
                }
                // Its ack key went with the lease.
                Err(Error::LeaseLost(_)) => return,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(gateway = gw.name(), lu = %id, error = %e, "cannot tell the cluster the LU is no longer served here; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    tracing::error!(gateway = gw.name(), lu = %id, error = %e, "cannot tell the cluster the LU is no longer served here; retrying in the background (fencing changes on it wait for this gateway meanwhile)");
                    break;
                }
            }
        }
        self.lock().leaving.insert(id.clone());
        let (me, id) = (self.clone(), id.clone());
        tokio::spawn(async move {
            loop {
                let gw = me.membership.gateway();
                match gw.leave_lu(&id).await {
                    Ok(()) | Err(Error::LeaseLost(_)) => break,
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
            tracing::info!(lu = %id, "clustered LU no longer served here (told the cluster late)");
            me.lock().leaving.remove(&id);
        });
    }
}

/// Run this gateway's part of the cluster until the server shuts down:
/// follow every clustered LU under the current incarnation; when the
/// lease is in doubt (`Fenced`) wait for the commands in flight; when it
/// is lost, stop the followers, stop serving, join again with a new lease
/// and resynchronise every LU (full read, install, ack) before serving.
pub(crate) async fn supervise(shared: Arc<Shared>, registry: Arc<Registry>) {
    let membership = registry.membership.clone();
    let mut shutdown = shared.shutdown.clone();
    tokio::spawn(departures(shared.clone(), registry.clone()));
    loop {
        let gw = membership.gateway();
        let mut live = gw.liveness();
        registry.start_all(&shared, gw.clone());
        let lost = loop {
            tokio::select! {
                r = live.changed() => {
                    if r.is_err() {
                        break false;
                    }
                    let now = *live.borrow_and_update();
                    match now {
                        Liveness::Lost => break true,
                        Liveness::Fenced { .. } => {
                            tokio::spawn(drain_at_deadline(registry.followed(), membership.margin));
                        }
                        Liveness::Serving { .. } => {
                            tracing::info!(gateway = gw.name(), "lease confirmed again: serving");
                        }
                    }
                }
                _ = shutdown.changed() => break false,
            }
        };
        for f in registry.abort_all() {
            let _ = f.await;
        }
        if !lost || *shutdown.borrow() {
            return;
        }
        // The old incarnation is gone; no follower of it runs any more.
        // Nothing is served until a follower of the new one installed a
        // state read after the new registration.
        for f in registry.followed() {
            f.lu.reservations().unsync();
            f.lu.hold_all_ranges();
            f.in_service.send_replace(false);
        }
        tracing::error!(
            gateway = gw.name(),
            "lease lost: LUs unsynchronised; joining again"
        );
        drop(gw);
        let mut backoff = Duration::from_millis(200);
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Under the lock: a reload does not rewrite the record of the
            // incarnation being replaced meanwhile.
            let groups = membership.groups.lock().await;
            let joined = membership
                .cluster
                .join(groups.clone(), membership.ttl, membership.margin)
                .await;
            match joined {
                Ok(g) => {
                    tracing::info!(
                        gateway = g.name(),
                        lease = format!("{:x}", g.lease()),
                        "joined again; resynchronising"
                    );
                    membership.current.store(Arc::new(g));
                    break;
                }
                Err(e) => {
                    drop(groups);
                    tracing::warn!(error = %e, "joining again failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// The serving deadline passed: new commands are refused at the check,
/// writes already past it are refused before they reach the medium
/// (`LogicalUnit` checks again at submission); wait for what is still in
/// flight, bounded by the safety margin, and say so if it does not end.
async fn drain_at_deadline(lus: Vec<Followed>, margin: Duration) {
    for f in lus {
        let all = f.lu.unit_attentions().known_nexuses();
        if !drain(&f.lu, all, margin).await {
            tracing::error!(lu = %f.id, "commands still in flight a safety margin after the serving deadline");
        } else {
            tracing::warn!(lu = %f.id, "lease in doubt: not serving; commands in flight finished");
        }
    }
}

/// Follow one clustered LU under gateway incarnation `gw`: say that this
/// gateway serves it, read, install, ack, then apply and ack every
/// committed change in order. Ends when `stop` turns true (a reload
/// removed the LU; checked between changes) or is aborted by the
/// supervisor once the lease is lost.
async fn follow(
    shared: Arc<Shared>,
    f: Followed,
    gw: Arc<Gateway>,
    cluster: Cluster,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let result: Result<(), Error> = async {
            // This gateway serves the LU from here on: a fencing change
            // committed from now on waits for its ack; one committed
            // before is in the state read next.
            loop {
                match gw.serve_lu(&f.id).await {
                    Ok(()) => break,
                    Err(e) if e.is_unavailable() => {
                        tracing::warn!(gateway = gw.name(), lu = %f.id, error = %e, "cannot register as serving the LU; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            let first = loop {
                if *stop.borrow() {
                    return Ok(());
                }
                match cluster.read(&f.id).await {
                    Ok(s) => break s,
                    Err(e) if e.is_unavailable() => {
                        tracing::warn!(gateway = gw.name(), lu = %f.id, error = %e, "cannot read the PR state; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let before = f.applied_seq.load(Ordering::SeqCst);
            if before == u64::MAX {
                // A fresh start: no unit attentions of the past to deliver.
                apply(&shared, f.target, &f.lu, &f.tpgts.load_full(), gw.name(), &first, first.seq, false).await;
            } else {
                apply(&shared, f.target, &f.lu, &f.tpgts.load_full(), gw.name(), &first, before, true).await;
            }
            f.applied_seq.store(first.seq, Ordering::SeqCst);
            ack(&gw, &f.id, first.revision).await?;
            f.in_service.send_replace(true);
            tracing::info!(gateway = gw.name(), lu = %f.id, revision = first.revision, "clustered LU in service");
            let mut watch = cluster.watch_lu(&f.id, first.read_at);
            loop {
                let next = tokio::select! {
                    ev = watch.next() => ev,
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                };
                let ev = match next {
                    Ok(ev) => ev,
                    Err(e) if e.is_unavailable() => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let resync = matches!(ev, LuEvent::Resync(_));
                let s = ev.state();
                let applied = f.applied_seq.load(Ordering::SeqCst);
                apply(&shared, f.target, &f.lu, &f.tpgts.load_full(), gw.name(), s, applied, resync).await;
                f.applied_seq.store(applied.max(s.seq), Ordering::SeqCst);
                ack(&gw, &f.id, s.revision).await?;
            }
        }
        .await;
        let e = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        f.lu.reservations().unsync();
        f.in_service.send_replace(false);
        if matches!(e, Error::LeaseLost(_)) {
            tracing::error!(gateway = gw.name(), lu = %f.id, "lease lost: the LU is not served until the gateway joined again");
            // The supervisor sees the loss and replaces this follower.
            let _ = stop.wait_for(|s| *s).await;
            return;
        }
        tracing::error!(gateway = gw.name(), lu = %f.id, error = %e, "cannot follow the clustered LU; not served here; trying again in 5 s");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Follow the range other gateways' COMPARE AND WRITEs hold on one
/// clustered LU under gateway incarnation `gw` (docs/cluster.md, *COMPARE
/// AND WRITE*): read it, hold it (this gateway's writes there in flight
/// finish, new ones wait), acknowledge; then the same for every range
/// published, and let the writes go when it is released. Ends only when
/// the lease is lost (the supervisor holds everything then, and starts a
/// new one after joining again).
async fn follow_ranges(f: Followed, gw: Arc<Gateway>, cluster: Cluster) {
    let me = gw.name().to_owned();
    loop {
        let result: Result<std::convert::Infallible, Error> = async {
            let (now, at) = loop {
                match cluster.read_range(&f.id).await {
                    Ok(x) => break x,
                    Err(e) if e.is_unavailable() => {
                        tracing::warn!(gateway = gw.name(), lu = %f.id, error = %e, "cannot read the COMPARE AND WRITE range; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            hold_range(&gw, &f, &me, now).await?;
            let mut watch = cluster.watch_range(&f.id, at);
            loop {
                let now = match watch.next().await {
                    Ok(RangeEvent::Held(r)) => Some(r),
                    Ok(RangeEvent::Released { .. }) => None,
                    Ok(RangeEvent::Resync(r)) => r,
                    Err(e) if e.is_unavailable() => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                hold_range(&gw, &f, &me, now).await?;
            }
        }
        .await;
        let Err(e) = result;
        if matches!(e, Error::LeaseLost(_)) {
            // The supervisor sees the loss and replaces this follower.
            std::future::pending::<()>().await;
        }
        // Which range is held is unknown (an unreadable record): hold
        // every write until it is known again.
        f.lu.hold_all_ranges();
        tracing::error!(gateway = gw.name(), lu = %f.id, error = %e, "cannot follow the COMPARE AND WRITE range; writes held; trying again in 1 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Hold `range` on this gateway's LU (another gateway's; this gateway's
/// own is ordered by its local range locks) instead of what was held,
/// once the writes to it in flight finished, and acknowledge it.
async fn hold_range(
    gw: &Gateway,
    f: &Followed,
    me: &str,
    range: Option<CawRange>,
) -> Result<(), Error> {
    let range = range.filter(|r| r.gateway != me);
    let held: Vec<HeldRange> = range
        .iter()
        .map(|r| HeldRange {
            id: r.revision,
            lba: r.lba,
            blocks: r.blocks,
        })
        .collect();
    let lu = f.lu.clone();
    tokio::task::spawn_blocking(move || lu.hold_ranges(held))
        .await
        .map_err(|e| Error::Etcd(format!("holding a COMPARE AND WRITE range: {e}")))?;
    let Some(r) = range else { return Ok(()) };
    loop {
        match gw.ack_range(&f.id, r.revision).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(gateway = gw.name(), lu = %f.id, revision = r.revision, error = %e, "range ack not written; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Acknowledge, retrying while etcd is unavailable; only a lost lease
/// (or another permanent error) ends it.
async fn ack(gateway: &Gateway, id: &LuId, revision: i64) -> Result<(), Error> {
    loop {
        match gateway.ack(id, revision).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(gateway = gateway.name(), lu = %id, revision, error = %e, "ack not written; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Watch the gateways' registrations; when one departs (its lease expired
/// or was revoked), one survivor — elected by a transaction — commits the
/// effects of I_T nexus loss for the nexuses of its portal groups on every
/// clustered LU: registrations stay (SPC-4), an SPC-2 reservation held
/// through it ends, and each such nexus gets I_T NEXUS LOSS OCCURRED.
async fn departures(shared: Arc<Shared>, registry: Arc<Registry>) {
    let membership = registry.membership.clone();
    let mut shutdown = shared.shutdown.clone();
    let cluster = membership.cluster.clone();
    let me = cluster.gateway().to_owned();
    let (list, at) = loop {
        match cluster.gateways_at().await {
            Ok(x) => break x,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list gateways; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    let mut known: HashMap<String, GatewayEntry> = list
        .into_iter()
        .map(|e| (e.record.name.clone(), e))
        .collect();
    let mut watch = cluster.watch_gateways(at);
    loop {
        let ev = tokio::select! {
            ev = watch.next() => ev,
            _ = shutdown.changed() => return,
        };
        let departed: Vec<GatewayEntry> = match ev {
            Ok(GatewayEvent::Joined(e)) => {
                // A new incarnation replacing one whose deletion we did
                // not see departs the old one.
                let old = known.insert(e.record.name.clone(), e.clone());
                old.filter(|o| o.lease != e.lease).into_iter().collect()
            }
            Ok(GatewayEvent::Left { name, .. }) => known.remove(&name).into_iter().collect(),
            Ok(GatewayEvent::Resync { gateways, .. }) => {
                let now: HashMap<String, GatewayEntry> = gateways
                    .into_iter()
                    .map(|e| (e.record.name.clone(), e))
                    .collect();
                let gone = known
                    .values()
                    .filter(|o| now.get(&o.record.name).map(|n| n.lease) != Some(o.lease))
                    .cloned()
                    .collect();
                known = now;
                gone
            }
            Err(e) => {
                tracing::debug!(error = %e, "gateway watch failed; resuming");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for d in departed {
            if d.record.name == me {
                continue;
            }
            tokio::spawn(handle_departure(membership.clone(), registry.clone(), d));
        }
    }
}

/// How long a departure's per-LU "done" markers live: far beyond any
/// survivor's retry of the same departure.
const DEPARTURE_MARKER_TTL: Duration = Duration::from_secs(24 * 3600);

/// Commit a departed gateway's nexus-loss effects, once cluster-wide. The
/// survivor that wins the claim does it and then gives the claim up; the
/// others wait until the claim is gone — given up, or gone with the lease
/// of a claimant that died — and claim in turn, so a claimant's death
/// halfway does not leave the work undone. Each LU's part is committed
/// together with a marker (`Cluster::commit_once`), so what a claimant did
/// before it died is not done again.
async fn handle_departure(membership: Arc<Membership>, registry: Arc<Registry>, d: GatewayEntry) {
    let name = d.record.name.clone();
    loop {
        let gw = membership.gateway();
        let claimed = loop {
            match gw.claim_departure(&d).await {
                Ok(c) => break c,
                Err(e) if e.is_unavailable() => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(Error::LeaseLost(_)) => {
                    // This incarnation is gone; the next one (or another
                    // survivor) takes over.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break false;
                }
                Err(e) => {
                    tracing::warn!(departed = %name, error = %e, "cannot claim a departed gateway's nexus loss");
                    return;
                }
            }
        };
        if claimed {
            if commit_departure(&membership, &gw, &registry.followed(), &d).await {
                if let Err(e) = gw.release_departure(&d).await {
                    // It goes with this gateway's lease at the latest.
                    tracing::debug!(departed = %name, error = %e, "departure claim not released");
                }
                return;
            }
            // Not all committed (etcd trouble): try again shortly.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tracing::info!(departed = %name, "another gateway handles the departed gateway's nexus loss; waiting for it to finish");
        match tokio::time::timeout(
            Duration::from_secs(600),
            gw.wait_departure_claim_released(&d),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(departed = %name, error = %e, "watching a departure claim failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(_) => {}
        }
    }
}

/// Commit `d`'s nexus loss on every clustered LU that does not have it
/// yet. False if some LU could not be done now.
async fn commit_departure(
    membership: &Membership,
    gw: &Gateway,
    lus: &[Followed],
    d: &GatewayEntry,
) -> bool {
    let name = &d.record.name;
    let marker_lease = match membership.cluster.grant_lease(DEPARTURE_MARKER_TTL).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(departed = %name, error = %e, "cannot grant the departure markers' lease");
            return false;
        }
    };
    let tpgts: HashSet<u16> = d.record.portal_groups.iter().map(|g| g.tpgt).collect();
    let (mut all, mut used) = (true, false);
    for f in lus {
        let marker = membership
            .cluster
            .keys()
            .departed_done(name, d.lease, &f.id);
        let r = membership
            .cluster
            .commit_once(&f.id, &marker, marker_lease, |s: &LuState| {
                Ok::<_, std::convert::Infallible>(departed_nexus_loss(&s.state, &tpgts))
            })
            .await;
        match r {
            Ok(Some(c)) => {
                used = true;
                if c.changed {
                    tracing::info!(
                        gateway = gw.name(), departed = %name, lu = %f.id,
                        revision = c.state.revision, seq = c.state.seq,
                        "departed gateway's I_T nexus loss committed"
                    );
                }
            }
            Ok(None) => tracing::info!(
                gateway = gw.name(), departed = %name, lu = %f.id,
                "departed gateway's I_T nexus loss was already committed"
            ),
            Err(e) => {
                all = false;
                tracing::error!(gateway = gw.name(), departed = %name, lu = %f.id, error = %e, "departed gateway's nexus loss not committed")
            }
        }
    }
    if !used {
        // Everything was done before: no marker lives under it.
        let _ = membership.cluster.revoke_lease(marker_lease).await;
    }
    all
}

/// The effects of losing every I_T nexus whose target port is in `tpgts`
/// (SPC-4: registrations and persistent reservations stay; an SPC-2
/// reservation held through one of them is released; each of them gets
/// I_T NEXUS LOSS OCCURRED). No change when none is involved.
pub(crate) fn departed_nexus_loss(state: &PrState, tpgts: &HashSet<u16>) -> Change {
    let mut next = state.clone();
    let mut lost: Vec<Nexus> = state
        .registrations
        .iter()
        .map(|g| g.nexus.clone())
        .filter(|n| tpgts.contains(&n.target.tpgt))
        .collect();
    if let Some(h) = state
        .spc2
        .as_ref()
        .filter(|h| tpgts.contains(&h.target.tpgt))
    {
        if let Some(st) = keyfence_pr::on_nexus_loss(state, h) {
            next = st;
        }
        lost.push(h.clone());
    }
    lost.sort();
    lost.dedup();
    Change {
        state: next,
        unit_attentions: lost
            .into_iter()
            .map(|n| (Some(n), asc::I_T_NEXUS_LOSS_OCCURRED))
            .collect(),
        aborts: Vec::new(),
    }
}
