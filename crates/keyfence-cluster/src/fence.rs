//! Waiting until every live gateway applied a revision (or provably
//! stopped serving): what a PREEMPT, PREEMPT AND ABORT, CLEAR or RESERVE
//! waits for before GOOD (docs/cluster.md, "Fencing").

use std::collections::BTreeMap;
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
}

#[derive(Debug)]
struct Member {
    create_revision: i64,
    acked: i64,
}

impl Cluster {
    /// Wait until every gateway registered when the wait starts has
    /// acknowledged revision `revision` of `lu` (an ack ≥ `revision`), or
    /// its registration is gone (its lease expired at etcd, so it stopped
    /// serving at least a safety margin earlier). Gateways that register
    /// later read the state after registering and need no waiting.
    /// [`Error::NotApplied`] at `deadline`, naming the gateways still
    /// pending; use a deadline beyond lease TTL + margin so that a dead
    /// gateway's lease can run out first.
    pub async fn wait_applied(
        &self,
        lu: &LuId,
        revision: i64,
        deadline: Instant,
    ) -> Result<Applied, Error> {
        let started = Instant::now();
        let gw_prefix = self.keys().gateways();
        let ack_prefix = self.keys().acks(lu);
        let mut members: Option<BTreeMap<String, Member>> = None;
        let mut outcome = Applied::default();
        loop {
            // A consistent snapshot of registrations and acks.
            let t = Txn::new().and_then([
                TxnOp::get(gw_prefix.clone(), Some(GetOptions::new().with_prefix())),
                TxnOp::get(ack_prefix.clone(), Some(GetOptions::new().with_prefix())),
            ]);
            let snap = tokio::time::timeout_at(
                deadline,
                self.call("reading gateways and acks", |mut c| {
                    let t = t.clone();
                    async move { c.txn(t).await }
                }),
            )
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
            let (gws, acks) = match (gets.next(), gets.next()) {
                (Some(g), Some(a)) => (g, a),
                _ => {
                    return Err(Error::Etcd(
                        "transaction answered without both reads".into(),
                    ))
                }
            };
            let mut now_registered = BTreeMap::new();
            for kv in gws.kvs() {
                let name = String::from_utf8_lossy(kv.key())
                    .trim_start_matches(gw_prefix.as_str())
                    .to_owned();
                now_registered.insert(name, kv.create_revision());
            }
            let mut ack_of = BTreeMap::new();
            for kv in acks.kvs() {
                let (name, rev) = parse_ack(&ack_prefix, kv.key(), kv.value())?;
                ack_of.insert(name, rev);
            }
            let ms = members.get_or_insert_with(|| {
                now_registered
                    .iter()
                    .map(|(n, c)| {
                        (
                            n.clone(),
                            Member {
                                create_revision: *c,
                                acked: 0,
                            },
                        )
                    })
                    .collect()
            });
            // A member whose registration vanished or was replaced by a
            // new incarnation is gone.
            ms.retain(|name, m| {
                if now_registered.get(name) == Some(&m.create_revision) {
                    m.acked = ack_of.get(name).copied().unwrap_or(0);
                    true
                } else {
                    outcome.gone.push(name.clone());
                    false
                }
            });
            settle(ms, revision, &mut outcome);
            if ms.is_empty() {
                return Ok(finish(lu, revision, outcome));
            }
            // Follow both prefixes from the snapshot on.
            let options = WatchOptions::new()
                .with_start_revision(at + 1)
                .with_prefix();
            let watch = tokio::time::timeout_at(
                deadline,
                self.call("watching gateways and acks", |mut c| {
                    let (gp, ap, o) = (gw_prefix.clone(), ack_prefix.clone(), options.clone());
                    async move {
                        let mut w = c.watch(gp, Some(o.clone())).await?;
                        w.watch(ap, Some(o)).await?;
                        Ok(w)
                    }
                }),
            )
            .await;
            let mut w = match watch {
                Err(_) => return Err(not_applied(lu, revision, members.as_ref(), started)),
                Ok(w) => w?,
            };
            loop {
                let msg = match tokio::time::timeout_at(deadline, w.message()).await {
                    Err(_) => return Err(not_applied(lu, revision, members.as_ref(), started)),
                    Ok(Ok(Some(m))) => m,
                    // Stream trouble: take a new snapshot.
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                };
                if msg.canceled() || msg.compact_revision() > 0 {
                    break;
                }
                let Some(ms) = members.as_mut() else { break };
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    if let Some(name) = key.strip_prefix(gw_prefix.as_str()) {
                        let replaced = ev.event_type() == EventType::Put
                            && ms
                                .get(name)
                                .is_some_and(|m| m.create_revision != kv.create_revision());
                        if (ev.event_type() == EventType::Delete || replaced)
                            && ms.remove(name).is_some()
                        {
                            tracing::info!(gateway = name, lu = %lu, revision, "gateway gone while waiting for its ack");
                            outcome.gone.push(name.to_owned());
                        }
                    } else if ev.event_type() == EventType::Put {
                        let (name, rev) = parse_ack(&ack_prefix, kv.key(), kv.value())?;
                        if let Some(m) = ms.get_mut(&name) {
                            m.acked = m.acked.max(rev);
                        }
                    }
                }
                settle(ms, revision, &mut outcome);
                if ms.is_empty() {
                    return Ok(finish(lu, revision, outcome));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn settle(ms: &mut BTreeMap<String, Member>, revision: i64, outcome: &mut Applied) {
    ms.retain(|name, m| {
        if m.acked >= revision {
            outcome.acked.push(name.clone());
            false
        } else {
            true
        }
    });
}

fn finish(lu: &LuId, revision: i64, mut outcome: Applied) -> Applied {
    outcome.acked.sort();
    outcome.gone.sort();
    tracing::info!(lu = %lu, revision, acked = ?outcome.acked, gone = ?outcome.gone, "revision applied cluster-wide");
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
