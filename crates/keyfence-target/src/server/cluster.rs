//! Cluster mode in the server (docs/cluster.md): the etcd-backed
//! [`SharedPrState`] of each clustered LU, and the follower task that
//! applies every committed change on this gateway — install the state,
//! establish the unit attentions of this gateway's I_T nexuses, abort and
//! drain the tasks a PREEMPT AND ABORT aborts, then acknowledge.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keyfence_cluster::{
    Change, Cluster, Error, Gateway, LuEvent, LuId, LuState, UaCatchUp, UpdateError,
};
use keyfence_lu::reservation::{SharedChange, SharedPrState};
use keyfence_lu::{LogicalUnit, UaScope};
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
    gateway: Arc<Gateway>,
    lu: LuId,
    runtime: Handle,
    /// How long a commit waits for every live gateway to apply it: beyond
    /// lease TTL + margin + a request timeout, so that a dead gateway's
    /// lease runs out first.
    apply_wait: Duration,
}

impl EtcdPrState {
    pub fn new(cluster: Cluster, gateway: Arc<Gateway>, lu: LuId, runtime: Handle) -> Self {
        let apply_wait = gateway.ttl()
            + gateway.safety_margin()
            + cluster.request_timeout() * 2
            + Duration::from_secs(1);
        EtcdPrState {
            cluster,
            gateway,
            lu,
            runtime,
            apply_wait,
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
        self.gateway.may_serve()
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

    fn gateway(&self) -> Option<&str> {
        Some(self.cluster.gateway())
    }
}

/// Install `s` on this gateway's LU and deliver what it carries for the
/// nexuses logged in here; returns whether it could (false: the unit
/// attention log has a gap and this gateway's sessions were ended).
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
    // PREEMPT AND ABORT: abort the preempted nexuses' tasks here and wait
    // for the commands that passed the old check. After a resync the
    // aborts missed are unknown: wait for everything in flight.
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
    let lu2 = lu.clone();
    let done = tokio::task::spawn_blocking(move || {
        let ua = lu2.unit_attentions();
        let d = ua.begin_drain();
        ua.wait_drained(d, &victims, DRAIN_LIMIT)
    })
    .await
    .unwrap_or(false);
    if !done {
        tracing::error!(
            lun = lu.lun(),
            "preempted commands did not finish in {DRAIN_LIMIT:?}"
        );
    }
}

/// Follow one clustered LU: read, install, ack, then apply and ack every
/// committed change in order. Ends when the gateway loses its lease (the
/// LU then stops serving: it is unsynchronised).
pub(crate) async fn follow(
    shared: Arc<Shared>,
    target: usize,
    lu: Arc<LogicalUnit>,
    cluster: Cluster,
    gateway: Arc<Gateway>,
    id: LuId,
    tpgts: HashSet<u16>,
) {
    let result: Result<(), Error> = async {
        let first = cluster.read(&id).await?;
        // A fresh start: no unit attentions of the past to deliver.
        apply(
            &shared,
            target,
            &lu,
            &tpgts,
            gateway.name(),
            &first,
            first.seq,
            false,
        )
        .await;
        let mut applied_seq = first.seq;
        ack(&gateway, &id, first.revision).await?;
        tracing::info!(gateway = gateway.name(), lu = %id, revision = first.revision, "clustered LU in service");
        let mut watch = cluster.watch_lu(&id, first.read_at);
        loop {
            let ev = watch.next().await?;
            let resync = matches!(ev, LuEvent::Resync(_));
            let s = ev.state();
            apply(
                &shared,
                target,
                &lu,
                &tpgts,
                gateway.name(),
                s,
                applied_seq,
                resync,
            )
            .await;
            applied_seq = applied_seq.max(s.seq);
            ack(&gateway, &id, s.revision).await?;
        }
    }
    .await;
    if let Err(e) = result {
        lu.reservations().unsync();
        tracing::error!(gateway = gateway.name(), lu = %id, error = %e, "stopped following the clustered LU; it is not served here any more");
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
