//! The connection to etcd and the linearizable read / compare-and-swap of
//! one LU's state.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use keyfence_pr::{Applied, PrState};
use keyfence_scsi::sense::{asc, Asc};
use keyfence_scsi::Nexus;

use crate::keys::{check_gateway_name, Keys, LuId};
use crate::record::{self, Contents, LuState, UnitAttention};
use crate::{ClusterConfig, Error};

/// Attempts of [`Cluster::update`] before it reports [`Error::Contended`].
pub const UPDATE_ATTEMPTS: u32 = 32;

/// A change to commit: the successor state, the unit attentions it
/// establishes (`None`: for every I_T nexus of the LU) and the I_T
/// nexuses whose tasks it aborts (PREEMPT AND ABORT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub state: PrState,
    pub unit_attentions: Vec<(Option<Nexus>, Asc)>,
    pub aborts: Vec<Nexus>,
}

impl From<PrState> for Change {
    fn from(state: PrState) -> Self {
        Change {
            state,
            unit_attentions: Vec::new(),
            aborts: Vec::new(),
        }
    }
}

impl From<Applied> for Change {
    /// The engine's successor state, its unit attentions and the nexuses
    /// whose tasks it aborts.
    fn from(a: Applied) -> Self {
        Change {
            state: a.state,
            aborts: a.effects.abort_tasks_of,
            unit_attentions: a
                .effects
                .unit_attentions
                .into_iter()
                .map(|(n, a)| (Some(n), a))
                .collect(),
        }
    }
}

/// Result of a commit: the state now in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub state: LuState,
    /// `false` when the change was a no-op and nothing was written.
    pub changed: bool,
}

/// Why [`Cluster::update`] failed: the cluster, or the caller's closure.
#[derive(Debug)]
pub enum UpdateError<E> {
    Cluster(Error),
    Rejected(E),
}

impl<E: std::fmt::Display> std::fmt::Display for UpdateError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpdateError::Cluster(e) => e.fmt(f),
            UpdateError::Rejected(e) => e.fmt(f),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for UpdateError<E> {}

impl<E> From<Error> for UpdateError<E> {
    fn from(e: Error) -> Self {
        UpdateError::Cluster(e)
    }
}

/// A connection to the etcd cluster on behalf of one gateway. Cheap to
/// clone; every request is bounded by the configured request timeout.
#[derive(Clone)]
pub struct Cluster {
    pool: Arc<Pool>,
    keys: Keys,
    gateway: String,
    timeout: Duration,
}

/// One client per endpoint, used one at a time: the current one until
/// it fails, then the next. (A single balanced channel over all endpoints
/// keeps routing requests to a dead member.)
struct Pool {
    clients: Vec<(String, Client)>,
    current: AtomicUsize,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.keys.prefix())
            .field("gateway", &self.gateway)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Cluster {
    /// Connect with a validated configuration. Fails with
    /// [`Error::Unavailable`] when no member answers a linearizable read
    /// in time (none reachable, or no quorum).
    pub async fn connect(config: &ClusterConfig) -> Result<Cluster, Error> {
        config.validate()?;
        let timeout = config.request_timeout();
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout)
            .with_keep_alive_while_idle(true)
            // A member without a leader answers at once instead of
            // holding the request until its own timeout.
            .with_require_leader(true);
        let mut clients = Vec::new();
        let mut last = None;
        for e in &config.endpoints {
            // Channels connect lazily: this fails only for a malformed
            // endpoint, not for a member that is down.
            match tokio::time::timeout(timeout, Client::connect([e], Some(options.clone()))).await {
                Ok(Ok(c)) => clients.push((e.clone(), c)),
                Ok(Err(err)) => last = Some(Error::from(err)),
                Err(_) => last = Some(Error::timeout(timeout, "connecting to etcd")),
            }
        }
        if clients.is_empty() {
            return Err(last.unwrap_or_else(|| Error::Config("no etcd endpoint".into())));
        }
        let cluster = Cluster {
            pool: Arc::new(Pool {
                clients,
                current: AtomicUsize::new(0),
            }),
            keys: config.keys(),
            gateway: config.gateway.clone(),
            timeout,
        };
        // Channels connect lazily; one linearizable read proves that a
        // member answers and the cluster has a quorum.
        let probe = cluster.keys.gateways();
        cluster
            .call("checking etcd", |mut c| {
                let probe = probe.clone();
                async move {
                    c.get(
                        probe,
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await
                }
            })
            .await?;
        tracing::info!(gateway = %config.gateway, endpoints = ?config.endpoints, prefix = %config.prefix, "connected to etcd");
        Ok(cluster)
    }

    /// The LUs that have a state record.
    pub async fn lus(&self) -> Result<Vec<LuId>, Error> {
        let prefix = format!("{}/lu/", self.keys.prefix());
        let resp = self
            .call("listing LUs", |mut c| {
                let prefix = prefix.clone();
                async move {
                    c.get(
                        prefix,
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await
                }
            })
            .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let id = key
                .strip_prefix(&prefix)
                .and_then(|k| k.strip_suffix("/state"));
            match id.map(LuId::new) {
                Some(Ok(lu)) => out.push(lu),
                _ => tracing::warn!(key = %key, "ignoring a key that is not an LU state"),
            }
        }
        Ok(out)
    }

    /// A handle for another gateway name over the same connection (tools
    /// and tests that act for several gateways).
    pub fn as_gateway(&self, name: &str) -> Result<Cluster, Error> {
        check_gateway_name(name).map_err(Error::Config)?;
        Ok(Cluster {
            gateway: name.to_owned(),
            ..self.clone()
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// The client in use, for operations this crate does not wrap.
    pub fn client(&self) -> Client {
        self.pick().1
    }

    /// The endpoint in use and its client.
    pub(crate) fn pick(&self) -> (usize, Client) {
        let i = self.pool.current.load(Ordering::SeqCst) % self.pool.clients.len();
        (i, self.pool.clients[i].1.clone())
    }

    /// The client `i` failed: move on to the next endpoint (unless
    /// someone already did).
    pub(crate) fn failed(&self, i: usize) {
        let n = self.pool.clients.len();
        if n > 1
            && self
                .pool
                .current
                .compare_exchange(i, (i + 1) % n, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            tracing::debug!(from = %self.pool.clients[i].0, to = %self.pool.clients[(i + 1) % n].0, "switching etcd endpoint");
        }
    }

    /// Run one read-only request, bounded by the request timeout; on a
    /// member that cannot serve it (down, frozen, without leader) move to
    /// the next endpoint and try again while time remains.
    pub(crate) async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_with(what, true, f).await
    }

    /// [`Cluster::call`] for a write: retried only when it certainly was
    /// not executed (no connection, or refused for want of a leader);
    /// an attempt that timed out is reported, not repeated.
    pub(crate) async fn call_write<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_with(what, false, f).await
    }

    /// Run the read-only transaction `t` as [`Cluster::call`] does.
    pub(crate) async fn txn_read(&self, what: &str, t: Txn) -> Result<TxnResponse, Error> {
        self.call(what, |mut c| {
            let t = t.clone();
            async move { c.txn(t).await }
        })
        .await
    }

    /// Run the transaction `t`, which writes, as [`Cluster::call_write`]
    /// does.
    pub(crate) async fn txn_write(&self, what: &str, t: Txn) -> Result<TxnResponse, Error> {
        self.call_write(what, |mut c| {
            let t = t.clone();
            async move { c.txn(t).await }
        })
        .await
    }

    async fn call_with<T, F, Fut>(&self, what: &str, idempotent: bool, mut f: F) -> Result<T, Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        // A frozen member must not eat the whole budget of a read.
        let per_attempt = if idempotent && self.pool.clients.len() > 1 {
            (self.timeout / 2).max(Duration::from_millis(200))
        } else {
            self.timeout
        };
        loop {
            let (i, client) = self.pick();
            let attempt_end = (tokio::time::Instant::now() + per_attempt).min(deadline);
            let e = match tokio::time::timeout_at(attempt_end, f(client)).await {
                Ok(Ok(t)) => return Ok(t),
                Ok(Err(e)) => Error::from(e),
                Err(_) => Error::timeout(per_attempt, what),
            };
            let retry = match &e {
                Error::Unavailable {
                    kind: crate::Unavailability::NoLeader,
                    ..
                } => true,
                Error::Unavailable {
                    kind: crate::Unavailability::Unreachable,
                    detail,
                } => idempotent || detail.contains("connect"),
                Error::Unavailable {
                    kind: crate::Unavailability::Timeout,
                    ..
                } => idempotent,
                _ => false,
            };
            if !retry {
                return Err(e);
            }
            self.failed(i);
            if tokio::time::Instant::now() + Duration::from_millis(50) >= deadline {
                return Err(e);
            }
            tracing::debug!(what, error = %e, "etcd request failed; retrying on the next endpoint");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The committed state of `lu` (linearizable read).
    pub async fn read(&self, lu: &LuId) -> Result<LuState, Error> {
        let key = self.keys.state(lu);
        let resp = self
            .call("reading PR state", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let read_at = resp.header().map_or(0, |h| h.revision());
        match resp.kvs().first() {
            None => Ok(LuState::absent(read_at)),
            Some(kv) => record::decode(lu.as_str(), kv.value(), kv.mod_revision(), read_at)
                .map_err(|reason| Error::Corrupt { key, reason }),
        }
    }

    /// Commit `change` on top of `base` (a state read before) if the LU's
    /// record still is at `base.revision`; [`Error::Conflict`] otherwise.
    /// A no-op change writes nothing.
    pub async fn commit(
        &self,
        lu: &LuId,
        base: &LuState,
        change: Change,
    ) -> Result<Committed, Error> {
        if change.state == base.state
            && change.unit_attentions.is_empty()
            && change.aborts.is_empty()
        {
            return Ok(Committed {
                state: base.clone(),
                changed: false,
            });
        }
        let mut next = self.successor(base, change);
        let value = encode_state(lu, &next);
        let revision = self.cas(lu, base, value, next.nonce).await?;
        next.revision = revision;
        next.read_at = revision;
        self.log_commit(lu, &next);
        Ok(Committed {
            state: next,
            changed: true,
        })
    }

    /// The record that commits `change` on top of `base` (revision not
    /// yet known).
    fn successor(&self, base: &LuState, change: Change) -> LuState {
        let seq = base.seq + 1;
        let new: Vec<UnitAttention> = change
            .unit_attentions
            .into_iter()
            .map(|(nexus, asc)| UnitAttention { seq, nexus, asc })
            .collect();
        let (log, complete_from) =
            record::next_ua_log(&base.unit_attentions, base.ua_complete_from, seq, new);
        LuState {
            revision: 0,
            read_at: 0,
            seq,
            writer: self.gateway.clone(),
            state: change.state,
            unit_attentions: log,
            ua_complete_from: complete_from,
            aborts: change.aborts,
            nonce: rand::random(),
        }
    }

    fn log_commit(&self, lu: &LuId, next: &LuState) {
        let seq = next.seq;
        tracing::info!(
            gateway = %self.gateway, lu = %lu, revision = next.revision, seq,
            generation = next.state.generation,
            registrations = next.state.registrations.len(),
            reservation = ?next.state.reservation.as_ref().map(|r| r.pr_type),
            unit_attentions = next.unit_attentions.iter().filter(|u| u.seq == seq).count(),
            aborts = next.aborts.len(),
            "PR state committed"
        );
    }

    /// Commit `f`'s change of `lu` at most once per `marker`: the change
    /// and the creation of the key `marker` (under `marker_lease`, 0 for
    /// none) are one transaction that requires `marker` not to exist, so
    /// of any number of callers with the same marker — also ones that
    /// retry after a lost answer, or a claimant that died halfway and its
    /// successor — exactly one commits. `Ok(None)` when the marker
    /// already exists (done before). Conflicts on the state are retried as
    /// in [`Cluster::update`]; a no-op change still creates the marker.
    pub async fn commit_once<E, F>(
        &self,
        lu: &LuId,
        marker: &str,
        marker_lease: i64,
        mut f: F,
    ) -> Result<Option<Committed>, UpdateError<E>>
    where
        F: FnMut(&LuState) -> Result<Change, E>,
    {
        let key = self.keys.state(lu);
        let patience = Instant::now() + self.timeout * 3;
        for attempt in 1..=UPDATE_ATTEMPTS {
            let read =
                Txn::new().and_then([TxnOp::get(key.clone(), None), TxnOp::get(marker, None)]);
            let r = match self.txn_read("reading PR state and marker", read).await {
                Err(Error::Unavailable { .. }) if Instant::now() < patience => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                other => other?,
            };
            let read_at = r.header().map_or(0, |h| h.revision());
            let mut gets = r.op_responses().into_iter().filter_map(|op| match op {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            });
            let (Some(state), Some(done)) = (gets.next(), gets.next()) else {
                return Err(UpdateError::Cluster(Error::Etcd(
                    "malformed transaction answer".into(),
                )));
            };
            if !done.kvs().is_empty() {
                return Ok(None);
            }
            let base = match state.kvs().first() {
                None => LuState::absent(read_at),
                Some(kv) => record::decode(lu.as_str(), kv.value(), kv.mod_revision(), read_at)
                    .map_err(|reason| Error::Corrupt {
                        key: key.clone(),
                        reason,
                    })?,
            };
            let change = f(&base).map_err(UpdateError::Rejected)?;
            let changed = !(change.state == base.state
                && change.unit_attentions.is_empty()
                && change.aborts.is_empty());
            let mut next = if changed {
                self.successor(&base, change)
            } else {
                base.clone()
            };
            let mut ops = Vec::new();
            if changed {
                ops.push(TxnOp::put(key.clone(), encode_state(lu, &next), None));
            }
            let opts = (marker_lease != 0).then(|| PutOptions::new().with_lease(marker_lease));
            ops.push(TxnOp::put(marker, self.gateway.clone(), opts));
            let t = Txn::new()
                .when([
                    Compare::mod_revision(key.clone(), CompareOp::Equal, base.revision),
                    Compare::create_revision(marker, CompareOp::Equal, 0),
                ])
                .and_then(ops);
            match self.txn_write("committing PR state once", t).await {
                Ok(resp) if resp.succeeded() => {
                    if changed {
                        next.revision = resp.header().map_or(0, |h| h.revision());
                        next.read_at = next.revision;
                        self.log_commit(lu, &next);
                    }
                    return Ok(Some(Committed {
                        state: next,
                        changed,
                    }));
                }
                // Another commit, or the marker: read again to see which.
                Ok(_) => {
                    let jitter = rand::random::<u64>() % (u64::from(attempt) * 4 + 1);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                // Not made, or its answer lost: the next read finds the
                // marker if it was made (and a lost proposal applied later
                // fails on the marker a retry created, and vice versa).
                Err(Error::Unavailable { .. }) if Instant::now() < patience => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(UpdateError::Cluster(e)),
            }
        }
        Err(UpdateError::Cluster(Error::Contended {
            lu: lu.to_string(),
            attempts: UPDATE_ATTEMPTS,
        }))
    }

    /// The compare-and-swap itself. When the answer is lost, the outcome
    /// is settled by reading back (our nonce: applied) or by *sealing*
    /// the old revision — rewriting `base` unchanged under the same
    /// comparison — so a proposal still in flight can no longer apply.
    async fn cas(
        &self,
        lu: &LuId,
        base: &LuState,
        value: Vec<u8>,
        nonce: u64,
    ) -> Result<i64, Error> {
        let key = self.keys.state(lu);
        let txn = |value: Vec<u8>| {
            Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    base.revision,
                )])
                .and_then([TxnOp::put(key.clone(), value, None)])
                .or_else([TxnOp::get(key.clone(), None)])
        };
        let first = {
            let t = txn(value);
            self.txn_write("committing PR state", t).await
        };
        let err = match first {
            Ok(resp) => return txn_outcome(lu, base.revision, &resp),
            Err(e @ Error::Unavailable { .. }) => e,
            Err(e) => return Err(e),
        };
        tracing::warn!(gateway = %self.gateway, lu = %lu, error = %err, "PR commit outcome unknown; settling it");
        let give_up = Instant::now() + self.timeout * 3;
        let mut last = err.to_string();
        while Instant::now() < give_up {
            match self.read(lu).await {
                Ok(now) if now.revision != base.revision => {
                    return if now.nonce == nonce {
                        Ok(now.revision)
                    } else {
                        Err(Error::Conflict {
                            lu: lu.to_string(),
                            expected: base.revision,
                            found: now.revision,
                        })
                    };
                }
                Ok(_) => {
                    // Still at base: seal it so the lost proposal cannot
                    // apply later.
                    let seal = LuState {
                        nonce: rand::random(),
                        ..base.clone()
                    };
                    let t = txn(encode_state(lu, &seal));
                    match self.txn_write("sealing PR state", t).await {
                        Ok(resp) if resp.succeeded() => return Err(err),
                        Ok(_) => continue, // moved: read again to see by whom
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::Unknown { key, detail: last })
    }

    /// Read, apply `f`, commit; on a conflict read again and retry, up to
    /// [`UPDATE_ATTEMPTS`] times (and for up to three request timeouts
    /// while etcd is unavailable). `f` may run several times and must be
    /// a pure function of the state it is given.
    pub async fn update<E, F>(&self, lu: &LuId, mut f: F) -> Result<Committed, UpdateError<E>>
    where
        F: FnMut(&LuState) -> Result<Change, E>,
    {
        // A transient unavailability (a leader election after a member
        // died) is retried for up to three request timeouts: an
        // `Unavailable` out of `read` or `commit` means nothing was
        // written (an undecided write is `Unknown`, never retried).
        let patience = Instant::now() + self.timeout * 3;
        for attempt in 1..=UPDATE_ATTEMPTS {
            let base = match self.read(lu).await {
                Err(e @ Error::Unavailable { .. }) if Instant::now() < patience => {
                    tracing::debug!(gateway = %self.gateway, lu = %lu, attempt, error = %e, "PR read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                other => other?,
            };
            let change = f(&base).map_err(UpdateError::Rejected)?;
            match self.commit(lu, &base, change).await {
                Err(Error::Conflict {
                    expected, found, ..
                }) => {
                    tracing::debug!(gateway = %self.gateway, lu = %lu, attempt, expected, found, "PR commit conflict; retrying");
                    // A little jitter breaks lock-step retries.
                    let jitter = rand::random::<u64>() % (u64::from(attempt) * 4 + 1);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(e @ Error::Unavailable { .. }) if Instant::now() < patience => {
                    tracing::debug!(gateway = %self.gateway, lu = %lu, attempt, error = %e, "PR commit not made; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other.map_err(UpdateError::Cluster),
            }
        }
        Err(UpdateError::Cluster(Error::Contended {
            lu: lu.to_string(),
            attempts: UPDATE_ATTEMPTS,
        }))
    }

    /// Remove the LU's record if it is at `expected` (`0`: absent, a no-op).
    /// Returns the cluster revision after the removal.
    pub async fn remove(&self, lu: &LuId, expected: i64) -> Result<i64, Error> {
        let key = self.keys.state(lu);
        let t = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([TxnOp::delete(key.clone(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self.txn_write("removing PR state", t).await?;
        txn_outcome(lu, expected, &resp)?;
        tracing::info!(gateway = %self.gateway, lu = %lu, "PR state removed");
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// A cluster-wide power cycle of the LU: the state becomes what a
    /// power on leaves (APTPL part only, PRgeneration 0) and every I_T
    /// nexus gets POWER ON OCCURRED.
    pub async fn power_cycle(&self, lu: &LuId) -> Result<Committed, Error> {
        self.update(lu, |s| {
            Ok::<_, std::convert::Infallible>(Change {
                state: s.state.after_power_loss(),
                unit_attentions: vec![(None, asc::POWER_ON_OCCURRED)],
                aborts: Vec::new(),
            })
        })
        .await
        .map_err(|e| match e {
            UpdateError::Cluster(e) => e,
            UpdateError::Rejected(never) => match never {},
        })
    }
}

fn encode_state(lu: &LuId, s: &LuState) -> Vec<u8> {
    record::encode(&Contents {
        lu: lu.as_str(),
        seq: s.seq,
        writer: &s.writer,
        nonce: s.nonce,
        state: &s.state,
        unit_attentions: &s.unit_attentions,
        ua_complete_from: s.ua_complete_from,
        aborts: &s.aborts,
    })
}

/// Revision of a successful compare-and-swap, or the conflict.
fn txn_outcome(lu: &LuId, expected: i64, resp: &etcd_client::TxnResponse) -> Result<i64, Error> {
    if resp.succeeded() {
        return Ok(resp.header().map_or(0, |h| h.revision()));
    }
    let found = resp
        .op_responses()
        .into_iter()
        .find_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map_or(0, |kv| kv.mod_revision())),
            _ => None,
        })
        .unwrap_or(0);
    Err(Error::Conflict {
        lu: lu.to_string(),
        expected,
        found,
    })
}
