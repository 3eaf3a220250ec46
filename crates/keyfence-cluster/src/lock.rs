//! A cluster-wide lock per LU, held by one gateway at a time: COMPARE AND
//! WRITE takes it around its read-compare-write so that two gateways'
//! COMPARE AND WRITEs on the same LU are atomic with respect to each
//! other (docs/cluster.md, *COMPARE AND WRITE*).
//!
//! Each gateway that wants the lock creates `locks/<lu>/caw/<name>` under
//! its lease (one waiter per gateway: the server serialises its own
//! commands first). Waiters are served in the order of their keys' create
//! revisions: a gateway holds the lock when no key under
//! `locks/<lu>/caw/` was created before its own, and otherwise watches the
//! key just before its own until it is deleted. Releasing deletes the key;
//! a gateway that dies releases with its lease. The holder must not write
//! after its serving deadline ([`Gateway::may_serve`]), which ends before
//! its lease (and so its key) can have expired: a stale holder cannot
//! overlap the next one.

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use tokio::time::Instant;

use crate::keys::LuId;
use crate::{Error, Gateway};

/// The lock of one LU, held by this gateway (release it with
/// [`Gateway::unlock`]; if it is dropped instead, the key stays until the
/// lease ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHeld {
    pub(crate) key: String,
    pub(crate) create_revision: i64,
    pub(crate) lease: i64,
    /// The LU's range key (range.rs): the holder's, if any, while held.
    pub(crate) range: String,
}

impl LockHeld {
    /// The lease the lock is held under: it is no longer held once that
    /// lease is gone (a gateway that joined again must lock anew).
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The revision at which this gateway got in line.
    pub fn create_revision(&self) -> i64 {
        self.create_revision
    }

    /// A transaction that does `ops` only while this gateway's lock key
    /// is the one created then (it goes with the lease).
    pub(crate) fn txn(&self, ops: impl Into<Vec<TxnOp>>) -> Txn {
        Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                self.create_revision,
            )])
            .and_then(ops)
    }
}

impl Gateway {
    /// Take the COMPARE AND WRITE lock of `lu`, waiting behind the
    /// gateways that asked before until `deadline` ([`Error::Unavailable`]
    /// with kind `Timeout` after it; this gateway's place in line is given
    /// up then). At most one call per LU at a time per gateway.
    pub async fn lock(&self, lu: &LuId, deadline: Instant) -> Result<LockHeld, Error> {
        if !self.may_serve() {
            return Err(Error::LeaseLost(self.name().to_owned()));
        }
        let key = self.cluster().keys().caw_lock(lu, self.name());
        let range = self.cluster().keys().caw_range(lu);
        let held = self.get_in_line(&key, range).await?;
        match tokio::time::timeout_at(deadline, self.wait_turn(lu, &held)).await {
            Ok(Ok(())) => Ok(held),
            Ok(Err(e)) => {
                let _ = self.unlock(&held).await;
                Err(e)
            }
            Err(_) => {
                let _ = self.unlock(&held).await;
                Err(Error::timeout(
                    deadline.elapsed() + self.cluster().request_timeout(),
                    "waiting for the COMPARE AND WRITE lock",
                ))
            }
        }
    }

    /// Release a lock taken with [`Gateway::lock`] (deletes this
    /// gateway's key if it is still the one created then), and the range
    /// it published, if any ([`Gateway::publish_range`]: only the holder
    /// writes the range key, so while the lock is held it is the holder's).
    pub async fn unlock(&self, held: &LockHeld) -> Result<(), Error> {
        let t = held.txn([
            TxnOp::delete(held.range.clone(), None),
            TxnOp::delete(held.key.clone(), None),
        ]);
        self.cluster()
            .txn_write("releasing the COMPARE AND WRITE lock", t)
            .await
            .map(drop)
    }

    /// Create this gateway's key under its lease, or find the one an
    /// abandoned attempt of this incarnation left (its place in line).
    async fn get_in_line(&self, key: &str, range: String) -> Result<LockHeld, Error> {
        let lease = self.lease();
        let t = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                self.name(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let r = self
            .txn_under_lease("queueing for the COMPARE AND WRITE lock", t)
            .await?;
        if r.succeeded() {
            let create_revision = r.header().map_or(0, |h| h.revision());
            return Ok(LockHeld {
                key: key.to_owned(),
                create_revision,
                lease,
                range,
            });
        }
        let kv = r.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        match kv {
            Some(kv) if kv.lease() == lease => Ok(LockHeld {
                key: key.to_owned(),
                create_revision: kv.create_revision(),
                lease,
                range,
            }),
            Some(kv) => Err(Error::Etcd(format!(
                "{key} is held under lease {:x}, not this gateway's {lease:x}",
                kv.lease()
            ))),
            // Deleted in between (our lease ended): try again later.
            None => Err(Error::LeaseLost(self.name().to_owned())),
        }
    }

    /// Wait until no key under the LU's lock prefix was created before
    /// ours, watching the one just before it.
    async fn wait_turn(&self, lu: &LuId, held: &LockHeld) -> Result<(), Error> {
        let prefix = self.cluster().keys().caw_locks(lu);
        loop {
            let before = GetOptions::new()
                .with_prefix()
                .with_max_create_revision(held.create_revision - 1)
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(1);
            let t = Txn::new().and_then([
                TxnOp::get(prefix.clone(), Some(before)),
                TxnOp::get(held.key.clone(), None),
            ]);
            let r = self
                .cluster()
                .txn_read("reading the COMPARE AND WRITE lock's line", t)
                .await?;
            let at = r.header().map_or(0, |h| h.revision());
            let mut gets = r.op_responses().into_iter().filter_map(|op| match op {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            });
            let (Some(ahead), Some(mine)) = (gets.next(), gets.next()) else {
                return Err(Error::Etcd("malformed lock transaction answer".into()));
            };
            if mine
                .kvs()
                .first()
                .is_none_or(|kv| kv.create_revision() != held.create_revision)
            {
                // Our key is gone: our lease ended.
                return Err(Error::LeaseLost(self.name().to_owned()));
            }
            let Some(prev) = ahead.kvs().first() else {
                return Ok(());
            };
            // Wait until the key ahead is deleted (or the watch ends),
            // then read the line again.
            self.cluster()
                .watch_until_deleted(
                    "watching the COMPARE AND WRITE lock",
                    prev.key().to_vec(),
                    at + 1,
                )
                .await?;
        }
    }
}
