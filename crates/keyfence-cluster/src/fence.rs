//! Waiting until every live gateway serving an LU applied a revision (or
//! provably stopped serving): what a PREEMPT, PREEMPT AND ABORT, CLEAR or
//! RESERVE waits for before GOOD (docs/cluster.md, "Fencing").

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use etcd_client::{EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use tokio::time::Instant;

use crate::gateway::parse_ack;
use crate::keys::LuId;
use crate::{Cluster, Error};

/// How [`Cluster::wait_applied`] concluded, per gateway.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// Gateways that acknowledged the revision (or a later one).
    pub acked: Vec<String>,
    /// Gateways that did not, and whose registration disappeared from
    /// etcd (lease expired or revoked): they stopped serving before.
    pub gone: Vec<String>,
    /// Gateways that did not, and stopped serving the LU (a reload
    /// removed it: [`crate::Gateway::leave_lu`]).
    pub left: Vec<String>,
}

#[derive(Debug)]
struct Member {
    create_revision: i64,
    lease: i64,
    acked: i64,
    /// Its registration disappeared but its lease still exists (a key
    /// deleted by hand): it may still serve, so it stays pending until
    /// the lease is gone too. Also set when its serving key (its ack key
    /// of the LU's PR state) disappeared.
    key_gone: bool,
    /// It said it no longer serves the LU.
    left: bool,
}

impl Cluster {
    /// Wait until every gateway that serves `lu` when the wait starts —
    /// registered, with an ack key for `lu` under the lease of its
    /// registration that is not [`crate::NOT_SERVING`] — has acknowledged
    /// revision `revision` (an ack ≥ `revision`), or said that it no
    /// longer serves the LU ([`crate::Gateway::leave_lu`]), or its
    /// registration and its lease are gone (the lease expired or was
    /// revoked at etcd, so it stopped serving at least a safety margin
    /// earlier). A registration or ack deleted by hand while its lease
    /// lives does not count. Gateways that start serving the LU later
    /// ([`crate::Gateway::serve_lu`], written before their first read of
    /// the state) read a state at least as new and need no waiting.
    /// [`Error::NotApplied`] at `deadline`, naming the gateways still
    /// pending; use a deadline beyond lease TTL + margin so that a dead
    /// gateway's lease can run out first.
    pub async fn wait_applied(
        &self,
        lu: &LuId,
        revision: i64,
        deadline: Instant,
    ) -> Result<Applied, Error> {
        self.wait_acked(lu, self.keys().acks(lu), revision, deadline, None)
            .await
    }

    /// [`Cluster::wait_applied`] for the acknowledgements (decimal
    /// revisions, under the acknowledging gateway's lease) kept under
    /// `ack_prefix`, not waiting for gateway `skip`. The gateways waited
    /// for are always those serving the LU (its PR ack keys).
    pub(crate) async fn wait_acked(
        &self,
        lu: &LuId,
        ack_prefix: String,
        revision: i64,
        deadline: Instant,
        skip: Option<&str>,
    ) -> Result<Applied, Error> {
        let started = Instant::now();
        let gw_prefix = self.keys().gateways();
        // Who serves the LU: the PR state's ack keys; `ack_prefix` may be
        // another set of acknowledgements (a COMPARE AND WRITE range's).
        let serving_prefix = self.keys().acks(lu);
        let separate = serving_prefix != ack_prefix;
        let watches = if separate { 3 } else { 2 };
        let mut members: Option<BTreeMap<String, Member>> = None;
        let mut outcome = Applied::default();
        loop {
            // Watch both prefixes from now on, and only then read them:
            // the snapshot covers what came before the watch, the watch
            // what comes after. A watch from the current revision is
            // "synced" at etcd and gets each event at once; one opened
            // from an earlier revision (as from the snapshot's, when an
            // ack landed in between) is caught up by etcd's background
            // sync only every 100 ms, which every PR OUT would wait.
            let watch = tokio::time::timeout_at(
                deadline,
                self.call("watching gateways and acks", |mut c| {
                    let (gp, ap) = (gw_prefix.clone(), ack_prefix.clone());
                    let sp = separate.then(|| serving_prefix.clone());
                    async move {
                        let o = WatchOptions::new().with_prefix();
                        let mut w = c.watch(gp, Some(o.clone())).await?;
                        w.watch(ap, Some(o.clone())).await?;
                        if let Some(sp) = sp {
                            w.watch(sp, Some(o)).await?;
                        }
                        Ok(w)
                    }
                }),
            )
            .await;
            let mut w = match watch {
                Err(_) => return Err(not_applied(lu, revision, members.as_ref(), started)),
                Ok(w) => w?,
            };
            // The watches exist once etcd confirmed them; events that
            // come meanwhile are kept for after the snapshot.
            let mut early = VecDeque::new();
            let mut created = 0;
            while created < watches {
                match tokio::time::timeout_at(deadline, w.message()).await {
                    Err(_) => return Err(not_applied(lu, revision, members.as_ref(), started)),
                    Ok(Ok(Some(m))) => {
                        if m.canceled() {
                            break;
                        }
                        if m.created() {
                            created += 1;
                        }
                        if !m.events().is_empty() {
                            early.push_back(m);
                        }
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                }
            }
            if created < watches {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            // A consistent snapshot of registrations and acks.
            let t = Txn::new().and_then([
                TxnOp::get(gw_prefix.clone(), Some(GetOptions::new().with_prefix())),
                TxnOp::get(ack_prefix.clone(), Some(GetOptions::new().with_prefix())),
                TxnOp::get(
                    serving_prefix.clone(),
                    Some(GetOptions::new().with_prefix()),
                ),
            ]);
            let snap =
                tokio::time::timeout_at(deadline, self.txn_read("reading gateways and acks", t))
                    .await;
            let snap = match snap {
                Err(_) => return Err(not_applied(lu, revision, members.as_ref(), started)),
                Ok(r) => r?,
            };
            let at = snap.header().map_or(0, |h| h.revision());
            let mut gets = snap.op_responses().into_iter().filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            });
            let (gws, acks, serving) = match (gets.next(), gets.next(), gets.next()) {
                (Some(g), Some(a), Some(s)) => (g, a, s),
                _ => {
                    return Err(Error::Etcd(
                        "transaction answered without all three reads".into(),
                    ))
                }
            };
            let mut now_registered = BTreeMap::new();
            for kv in gws.kvs() {
                let name = String::from_utf8_lossy(kv.key())
                    .trim_start_matches(gw_prefix.as_str())
                    .to_owned();
                now_registered.insert(name, (kv.create_revision(), kv.lease()));
            }
            let mut ack_of = BTreeMap::new();
            for kv in acks.kvs() {
                let (name, rev) = parse_ack(&ack_prefix, kv.key(), kv.value())?;
                ack_of.insert(name, (rev, kv.lease()));
            }
            let mut serving_of = BTreeMap::new();
            for kv in serving.kvs() {
                let (name, rev) = parse_ack(&serving_prefix, kv.key(), kv.value())?;
                serving_of.insert(name, (rev, kv.lease()));
            }
            let ms = members.get_or_insert_with(|| {
                // The gateways serving this LU: a PR ack key (written
                // before their first read of its state) that does not say
                // they left it. One under the lease of the registration is
                // that gateway's; one under another lease (no
                // registration, or a registration deleted by hand and
                // taken by a new incarnation) is waited for until that
                // lease is gone.
                let mut ms: BTreeMap<String, Member> = serving_of
                    .iter()
                    .filter(|(_, (rev, _))| *rev != crate::NOT_SERVING)
                    .map(|(n, (_, lease))| {
                        let registered = now_registered.get(n).filter(|(_, l)| l == lease);
                        (
                            n.clone(),
                            Member {
                                create_revision: registered.map_or(0, |(c, _)| *c),
                                lease: *lease,
                                acked: 0,
                                key_gone: registered.is_none(),
                                left: false,
                            },
                        )
                    })
                    .collect();
                if let Some(s) = skip {
                    ms.remove(s);
                }
                ms
            });
            // A member whose registration vanished or was replaced by a
            // new incarnation, or whose serving key vanished, is gone once
            // its lease is; one whose serving key says it left the LU is
            // done.
            for (name, m) in ms.iter_mut() {
                match serving_of.get(name) {
                    Some((rev, lease)) if *lease == m.lease => {
                        if *rev == crate::NOT_SERVING {
                            m.left = true;
                        }
                    }
                    Some(_) => {}
                    None => m.key_gone = true,
                }
                if let Some((rev, lease)) = ack_of.get(name) {
                    if *lease == m.lease && *rev != crate::NOT_SERVING {
                        m.acked = m.acked.max(*rev);
                    }
                }
                if now_registered.get(name).map(|r| r.0) != Some(m.create_revision) {
                    m.key_gone = true;
                }
            }
            self.drop_expired(ms, &mut outcome).await?;
            settle(ms, revision, &mut outcome);
            if ms.is_empty() {
                return Ok(finish(lu, revision, outcome));
            }
            loop {
                // While a member's key is gone but its lease may live,
                // look at the lease again now and then.
                let tick = if members
                    .as_ref()
                    .is_some_and(|m| m.values().any(|m| m.key_gone))
                {
                    (Instant::now() + LEASE_POLL).min(deadline)
                } else {
                    deadline
                };
                let msg = match early.pop_front() {
                    Some(m) => Some(m),
                    None => match tokio::time::timeout_at(tick, w.message()).await {
                        Err(_) if tick < deadline => None,
                        Err(_) => return Err(not_applied(lu, revision, members.as_ref(), started)),
                        Ok(Ok(Some(m))) => Some(m),
                        // Stream trouble: take a new snapshot.
                        Ok(Ok(None)) | Ok(Err(_)) => break,
                    },
                };
                let Some(ms) = members.as_mut() else { break };
                if let Some(msg) = msg {
                    if msg.canceled() || msg.compact_revision() > 0 {
                        break;
                    }
                    for ev in msg.events() {
                        let Some(kv) = ev.kv() else { continue };
                        // The snapshot already shows what this did.
                        if kv.mod_revision() <= at {
                            continue;
                        }
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        if let Some(name) = key.strip_prefix(gw_prefix.as_str()) {
                            if let Some(m) = ms.get_mut(name) {
                                let replaced = ev.event_type() == EventType::Put
                                    && m.create_revision != kv.create_revision();
                                if ev.event_type() == EventType::Delete || replaced {
                                    m.key_gone = true;
                                }
                            }
                        } else if let Some(name) = key.strip_prefix(serving_prefix.as_str()) {
                            let Some(m) = ms.get_mut(name) else { continue };
                            if ev.event_type() == EventType::Delete {
                                // With its lease, or by hand: gone once
                                // the lease is.
                                m.key_gone = true;
                                continue;
                            }
                            let (_, rev) = parse_ack(&serving_prefix, kv.key(), kv.value())?;
                            // Only the incarnation waited for counts.
                            if m.lease != kv.lease() {
                                continue;
                            }
                            if rev == crate::NOT_SERVING {
                                m.left = true;
                            } else if !separate {
                                m.acked = m.acked.max(rev);
                            }
                        } else if ev.event_type() == EventType::Put {
                            let (name, rev) = parse_ack(&ack_prefix, kv.key(), kv.value())?;
                            // Only the incarnation waited for can ack.
                            if let Some(m) = ms.get_mut(&name).filter(|m| m.lease == kv.lease()) {
                                if rev != crate::NOT_SERVING {
                                    m.acked = m.acked.max(rev);
                                }
                            }
                        }
                    }
                }
                settle(ms, revision, &mut outcome);
                self.drop_expired(ms, &mut outcome).await?;
                if ms.is_empty() {
                    return Ok(finish(lu, revision, outcome));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How often the lease of a member whose key vanished is looked at.
const LEASE_POLL: Duration = Duration::from_millis(200);

impl Cluster {
    /// Move members whose key is gone *and* whose lease no longer exists
    /// to `outcome.gone`.
    async fn drop_expired(
        &self,
        ms: &mut BTreeMap<String, Member>,
        outcome: &mut Applied,
    ) -> Result<(), Error> {
        let candidates: Vec<(String, i64)> = ms
            .iter()
            .filter(|(_, m)| m.key_gone)
            .map(|(n, m)| (n.clone(), m.lease))
            .collect();
        for (name, lease) in candidates {
            if self.lease_gone(lease).await? {
                tracing::info!(gateway = %name, lease = format!("{lease:x}"), "gateway's lease is gone; it stopped serving");
                ms.remove(&name);
                outcome.gone.push(name);
            } else {
                tracing::warn!(gateway = %name, lease = format!("{lease:x}"), "gateway key gone but its lease lives; still waiting for it");
            }
        }
        Ok(())
    }

    /// Does etcd no longer know `lease` (expired or revoked)?
    async fn lease_gone(&self, lease: i64) -> Result<bool, Error> {
        if lease == 0 {
            // Registered without a lease (by hand): nothing ever ends it.
            return Ok(false);
        }
        let r = self
            .call("checking a lease", |mut c| async move {
                c.lease_time_to_live(lease, None).await
            })
            .await;
        match r {
            // etcd reports -1 for a lease it does not have.
            Ok(resp) => Ok(resp.ttl() < 0),
            Err(Error::Etcd(m)) if m.contains("lease not found") => Ok(true),
            Err(e) => Err(e),
        }
    }
}

fn settle(ms: &mut BTreeMap<String, Member>, revision: i64, outcome: &mut Applied) {
    ms.retain(|name, m| {
        if m.acked >= revision {
            outcome.acked.push(name.clone());
            false
        } else if m.left {
            outcome.left.push(name.clone());
            false
        } else {
            true
        }
    });
}

fn finish(lu: &LuId, revision: i64, mut outcome: Applied) -> Applied {
    outcome.acked.sort();
    outcome.gone.sort();
    outcome.left.sort();
    tracing::info!(lu = %lu, revision, acked = ?outcome.acked, gone = ?outcome.gone, left = ?outcome.left, "revision applied cluster-wide");
    outcome
}

fn not_applied(
    lu: &LuId,
    revision: i64,
    ms: Option<&BTreeMap<String, Member>>,
    started: Instant,
) -> Error {
    Error::NotApplied {
        lu: lu.to_string(),
        revision,
        pending: ms.map(|m| m.keys().cloned().collect()).unwrap_or_default(),
        waited: started.elapsed(),
    }
}
