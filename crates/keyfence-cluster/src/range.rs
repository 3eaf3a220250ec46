//! The LBA range of a COMPARE AND WRITE, held on every gateway
//! (docs/cluster.md, *COMPARE AND WRITE*).
//!
//! The lock (lock.rs) orders COMPARE AND WRITEs among themselves; this
//! orders them against every other command that modifies the medium
//! through another gateway. The lock's holder publishes the range it is
//! about to compare and write in `locks/<lu>/range` under its lease
//! ([`Gateway::publish_range`]), and waits until every other live gateway
//! serving the LU (as [`Cluster::wait_applied`] counts them) acknowledged it ([`Cluster::wait_range_acked`]; the acks live in
//! `locks/<lu>/range-acks/<name>` under each acknowledging gateway's
//! lease, and a gateway that does not acknowledge is waited out exactly as
//! in [`Cluster::wait_applied`]: until its lease is gone). A gateway
//! acknowledges once it holds the range: its writes there that were
//! already in flight have finished and new ones wait until it sees the
//! range released (deleted, by [`Gateway::release_range`] or
//! [`Gateway::unlock`], or with the holder's lease). Gateways follow the
//! key with [`Cluster::watch_range`].

use etcd_client::{EventType, KeyValue, PutOptions, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::fence::Applied;
use crate::keys::LuId;
use crate::lock::LockHeld;
use crate::watch::{Resumable, Subject};
use crate::{Cluster, Error, Gateway};

/// The `format` of a range record.
pub const RANGE_FORMAT: &str = "keyfence-cluster-caw-range/1";

/// A published COMPARE AND WRITE range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CawRange {
    /// The gateway holding the lock (it does not hold its own range: its
    /// own writes are ordered by its local range locks).
    pub gateway: String,
    pub lba: u64,
    pub blocks: u64,
    /// The revision that published it: what acknowledgements name.
    pub revision: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeRecord {
    format: String,
    gateway: String,
    lba: u64,
    blocks: u64,
}

fn decode(key: &[u8], value: &[u8], revision: i64) -> Result<CawRange, Error> {
    let corrupt = |reason: String| Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    let r: RangeRecord = serde_json::from_slice(value).map_err(|e| corrupt(e.to_string()))?;
    if r.format != RANGE_FORMAT {
        return Err(corrupt(format!("unknown format {:?}", r.format)));
    }
    Ok(CawRange {
        gateway: r.gateway,
        lba: r.lba,
        blocks: r.blocks,
        revision,
    })
}

impl Gateway {
    /// Publish the range `blocks` blocks from `lba` of the lock `held`
    /// (the key is written only while this gateway's lock key is the one
    /// taken then, under its lease). Returns the revision to wait for
    /// with [`Cluster::wait_range_acked`].
    pub async fn publish_range(
        &self,
        held: &LockHeld,
        lba: u64,
        blocks: u64,
    ) -> Result<i64, Error> {
        if !self.may_serve() || held.lease != self.lease() {
            return Err(Error::LeaseLost(self.name().to_owned()));
        }
        let value = serde_json::to_vec(&RangeRecord {
            format: RANGE_FORMAT.to_owned(),
            gateway: self.name().to_owned(),
            lba,
            blocks,
        })
        .map_err(|e| Error::Etcd(e.to_string()))?;
        let t = held.txn([TxnOp::put(
            held.range.clone(),
            value,
            Some(PutOptions::new().with_lease(held.lease)),
        )]);
        let r = self
            .txn_under_lease("publishing the COMPARE AND WRITE range", t)
            .await?;
        if !r.succeeded() {
            // The lock key is gone: it went with our lease.
            return Err(Error::LeaseLost(self.name().to_owned()));
        }
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// Withdraw the range published under `held` (the lock stays held).
    pub async fn release_range(&self, held: &LockHeld) -> Result<(), Error> {
        let t = held.txn([TxnOp::delete(held.range.clone(), None)]);
        self.cluster()
            .txn_write("releasing the COMPARE AND WRITE range", t)
            .await
            .map(drop)
    }

    /// Acknowledge the range published at `revision`: this gateway holds
    /// it (its writes there in flight finished; new ones wait).
    pub async fn ack_range(&self, lu: &LuId, revision: i64) -> Result<(), Error> {
        let key = self.cluster().keys().caw_range_ack(lu, self.name());
        self.put_under_lease(
            key,
            revision.to_string(),
            "acknowledging a COMPARE AND WRITE range",
        )
        .await
    }
}

impl Cluster {
    /// The range published for `lu` now, if any, and the revision read at.
    pub async fn read_range(&self, lu: &LuId) -> Result<(Option<CawRange>, i64), Error> {
        let key = self.keys().caw_range(lu);
        let r = self
            .call("reading the COMPARE AND WRITE range", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let at = r.header().map_or(0, |h| h.revision());
        let range = match r.kvs().first() {
            None => None,
            Some(kv) => Some(decode(kv.key(), kv.value(), kv.mod_revision())?),
        };
        Ok((range, at))
    }

    /// Wait until every live gateway but `holder` acknowledged the range
    /// published at `revision` (or its lease is gone), as
    /// [`Cluster::wait_applied`] does for a PR change.
    pub async fn wait_range_acked(
        &self,
        lu: &LuId,
        revision: i64,
        deadline: Instant,
        holder: &str,
    ) -> Result<Applied, Error> {
        self.wait_acked(
            lu,
            self.keys().caw_range_acks(lu),
            revision,
            deadline,
            Some(holder),
        )
        .await
    }

    /// Follow `lu`'s range after revision `after` (the `read_range` the
    /// caller started from).
    pub fn watch_range(&self, lu: &LuId, after: i64) -> RangeWatch {
        let subject = RangeKey {
            lu: lu.clone(),
            key: self.keys().caw_range(lu),
        };
        RangeWatch(Resumable::new(self, subject, after))
    }
}

/// What a [`RangeWatch`] delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeEvent {
    /// A range was published (replacing any before it).
    Held(CawRange),
    /// The range was released (or went with its holder's lease).
    Released { revision: i64 },
    /// History was compacted: the range now (a full read).
    Resync(Option<CawRange>),
}

/// A resumable watch of one LU's range key, like [`crate::LuWatch`].
#[derive(Debug)]
pub struct RangeWatch(Resumable<RangeKey>);

/// The subject of a [`RangeWatch`].
#[derive(Debug)]
struct RangeKey {
    lu: LuId,
    key: String,
}

impl Subject for RangeKey {
    type Event = RangeEvent;
    const WHAT: &'static str = "COMPARE AND WRITE range watch";

    fn key(&self) -> &str {
        &self.key
    }

    fn event(&self, event_type: EventType, kv: &KeyValue) -> Result<RangeEvent, Error> {
        match event_type {
            EventType::Delete => Ok(RangeEvent::Released {
                revision: kv.mod_revision(),
            }),
            EventType::Put => decode(kv.key(), kv.value(), kv.mod_revision()).map(RangeEvent::Held),
        }
    }

    async fn resync(&self, cluster: &Cluster) -> Result<(RangeEvent, i64), Error> {
        let (range, at) = cluster.read_range(&self.lu).await?;
        Ok((RangeEvent::Resync(range), at))
    }
}

impl RangeWatch {
    /// The next event; errors leave the watch usable (the next call
    /// reconnects from where it stopped).
    pub async fn next(&mut self) -> Result<RangeEvent, Error> {
        self.0.next().await
    }
}
