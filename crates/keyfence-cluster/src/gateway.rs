//! Gateway membership and liveness: one etcd lease per gateway, kept
//! alive in the background, and the local "may I serve" answer derived
//! from it without trusting etcd's clock (docs/cluster.md, "Fencing").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::keys::LuId;
use crate::{Cluster, Error};

/// The `format` of a gateway record.
pub const GATEWAY_FORMAT: &str = "keyfence-cluster-gateway/1";

/// One portal group a gateway serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalGroup {
    pub tpgt: u16,
    /// `host:port` listen addresses.
    pub portals: Vec<String>,
}

/// What `gateways/<name>` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRecord {
    pub format: String,
    pub name: String,
    pub portal_groups: Vec<PortalGroup>,
    /// Lease TTL in seconds as granted by etcd.
    pub ttl_secs: i64,
}

/// A registered gateway as listed by [`Cluster::gateways`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEntry {
    pub record: GatewayRecord,
    pub lease: i64,
    /// Revision at which this incarnation registered.
    pub create_revision: i64,
}

/// The local gateway's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The lease was confirmed; serving is allowed until `until`
    /// (last confirmed keep-alive's send time + TTL - safety margin).
    Serving { until: Instant },
    /// No keep-alive confirmed in time: the lease is in doubt. Commands
    /// on clustered LUs must not run (ALUA transitioning) until the lease
    /// is confirmed again or declared lost.
    Fenced { since: Instant },
    /// etcd says the lease is gone. Stop serving, join again (a new
    /// lease) and resynchronise before serving.
    Lost,
}

/// State shared between the gateway handle and its background tasks.
#[derive(Debug)]
struct Shared {
    base: std::time::Instant,
    /// Serving deadline in nanoseconds after `base`; 0: not serving.
    until_ns: AtomicU64,
    lost: AtomicBool,
    liveness: watch::Sender<Liveness>,
    deadline: watch::Sender<Option<Instant>>,
}

impl Shared {
    fn ns(&self, t: Instant) -> u64 {
        t.into_std()
            .saturating_duration_since(self.base)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64
    }

    /// A keep-alive sent at `sent` was confirmed by etcd: the lease runs
    /// at least until `sent + ttl` on etcd's side.
    fn confirm(&self, until: Instant) {
        if self.lost.load(Ordering::SeqCst) {
            return;
        }
        let ns = self.ns(until).max(1);
        // Never move the deadline backwards (a late answer to an older
        // keep-alive).
        let prev = self.until_ns.fetch_max(ns, Ordering::SeqCst);
        if ns > prev {
            let until = self.base_instant() + Duration::from_nanos(ns);
            self.deadline.send_replace(Some(until));
            if Instant::now() < until {
                self.liveness.send_if_modified(|l| {
                    // Lost in the meantime (by another task): stays lost.
                    if self.lost.load(Ordering::SeqCst) {
                        return false;
                    }
                    let was_serving = matches!(l, Liveness::Serving { .. });
                    *l = Liveness::Serving { until };
                    !was_serving
                });
            }
        }
    }

    fn base_instant(&self) -> Instant {
        Instant::from_std(self.base)
    }

    fn fence(&self) {
        self.until_ns.store(0, Ordering::SeqCst);
        self.deadline.send_replace(None);
        self.liveness.send_if_modified(|l| {
            if matches!(l, Liveness::Serving { .. }) {
                *l = Liveness::Fenced {
                    since: Instant::now(),
                };
                true
            } else {
                false
            }
        });
    }

    /// etcd says the lease is gone: stop serving for good. Idempotent:
    /// true only for the call that made the change (`Lost` is announced
    /// once). Takes no lock but the watch channels' own, held only for
    /// the store, so it may be called from any task.
    fn lose(&self) -> bool {
        if self.lost.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.until_ns.store(0, Ordering::SeqCst);
        self.deadline.send_replace(None);
        self.liveness.send_replace(Liveness::Lost);
        true
    }

    fn may_serve(&self) -> bool {
        let until = self.until_ns.load(Ordering::SeqCst);
        until != 0
            && (self.base.elapsed().as_nanos() as u64) < until
            && !self.lost.load(Ordering::SeqCst)
    }
}

/// This gateway's membership: its lease, kept alive in the background,
/// and its `gateways/<name>` registration. Dropping it stops the
/// keep-alives (the lease then expires); [`Gateway::leave`] revokes it.
#[derive(Debug)]
pub struct Gateway {
    cluster: Cluster,
    name: String,
    lease: i64,
    ttl: Duration,
    margin: Duration,
    shared: Arc<Shared>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Cluster {
    /// Register this gateway (the connection's gateway name) with a new
    /// lease of `ttl` and start keeping it alive. Serving is allowed until
    /// the last confirmed keep-alive's send time + TTL - `margin`.
    /// Fails with [`Error::NameInUse`] if a live gateway holds the name.
    pub async fn join(
        &self,
        portal_groups: Vec<PortalGroup>,
        ttl: Duration,
        margin: Duration,
    ) -> Result<Gateway, Error> {
        if margin >= ttl {
            return Err(Error::Config(format!(
                "safety margin {margin:?} is not below the lease TTL {ttl:?}"
            )));
        }
        let name = self.gateway().to_owned();
        let sent = Instant::now();
        let ttl_secs = ttl.as_secs().max(1) as i64;
        let grant = self
            .call_write("granting lease", |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await?;
        let lease = grant.id();
        // etcd may raise the TTL to its minimum; never lower it.
        let granted = Duration::from_secs(grant.ttl().max(ttl_secs) as u64);
        let key = self.keys().gateway(&name);
        let record = GatewayRecord {
            format: GATEWAY_FORMAT.into(),
            name: name.clone(),
            portal_groups,
            ttl_secs: granted.as_secs() as i64,
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let t = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let registered = self.txn_write("registering gateway", t);
        match registered.await {
            Ok(r) if r.succeeded() => {}
            other => {
                let _ = self
                    .call("revoking lease", |mut c| async move {
                        c.lease_revoke(lease).await
                    })
                    .await;
                return Err(match other {
                    Ok(_) => Error::NameInUse(name),
                    Err(e) => e,
                });
            }
        }
        let (liveness, _) = watch::channel(Liveness::Fenced { since: sent });
        let (deadline, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            // Any instant before the first deadline, so deadlines are > 0.
            base: {
                let now = std::time::Instant::now();
                now.checked_sub(Duration::from_secs(1)).unwrap_or(now)
            },
            until_ns: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            liveness,
            deadline,
        });
        shared.confirm(sent + granted - margin);
        tracing::info!(gateway = %name, lease = format!("{lease:x}"), ttl = ?granted, margin = ?margin, "gateway joined");
        let tasks = vec![
            tokio::spawn(keep_alive(
                self.clone(),
                lease,
                granted,
                margin,
                shared.clone(),
            )),
            tokio::spawn(fence_timer(shared.clone())),
        ];
        Ok(Gateway {
            cluster: self.clone(),
            name,
            lease,
            ttl: granted,
            margin,
            shared,
            tasks: std::sync::Mutex::new(tasks),
        })
    }

    /// Every registered gateway (live leases only: keys of expired leases
    /// are gone).
    pub async fn gateways(&self) -> Result<Vec<GatewayEntry>, Error> {
        Ok(self.gateways_at().await?.0)
    }

    /// [`Cluster::gateways`] and the revision it was read at.
    pub async fn gateways_at(&self) -> Result<(Vec<GatewayEntry>, i64), Error> {
        let prefix = self.keys().gateways();
        let resp = self
            .call("listing gateways", |mut c| {
                let prefix = prefix.clone();
                async move {
                    c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        let at = resp.header().map_or(0, |h| h.revision());
        let list = resp
            .kvs()
            .iter()
            .map(|kv| {
                let record: GatewayRecord =
                    serde_json::from_slice(kv.value()).map_err(|e| Error::Corrupt {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        reason: e.to_string(),
                    })?;
                Ok(GatewayEntry {
                    record,
                    lease: kv.lease(),
                    create_revision: kv.create_revision(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok((list, at))
    }

    /// The acknowledged revision of `lu` per gateway.
    pub async fn acks(&self, lu: &LuId) -> Result<Vec<(String, i64)>, Error> {
        let prefix = self.keys().acks(lu);
        let resp = self
            .call("listing acks", |mut c| {
                let prefix = prefix.clone();
                async move {
                    c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        resp.kvs()
            .iter()
            .map(|kv| parse_ack(&prefix, kv.key(), kv.value()))
            .collect()
    }
}

/// The value of a gateway's ack key for an LU it stopped serving
/// ([`Gateway::leave_lu`]).
pub const NOT_SERVING: i64 = -1;

/// `(gateway, revision)` of an ack key/value under `prefix`.
pub(crate) fn parse_ack(prefix: &str, key: &[u8], value: &[u8]) -> Result<(String, i64), Error> {
    let key = String::from_utf8_lossy(key).into_owned();
    let name = key.strip_prefix(prefix).unwrap_or(&key).to_owned();
    let rev = std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(|| Error::Corrupt {
            key: key.clone(),
            reason: "ack is not a revision number".into(),
        })?;
    Ok((name, rev))
}

impl Gateway {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The connection this gateway uses.
    pub(crate) fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The lease TTL etcd granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn safety_margin(&self) -> Duration {
        self.margin
    }

    /// May commands on clustered LUs run now? A lock-free check against
    /// the serving deadline, for the I/O path: false once the deadline
    /// passed, even if no task got to run since.
    pub fn may_serve(&self) -> bool {
        self.shared.may_serve()
    }

    /// Changes of standing, for the server to stop and resume serving.
    pub fn liveness(&self) -> watch::Receiver<Liveness> {
        self.shared.liveness.subscribe()
    }

    pub fn current(&self) -> Liveness {
        *self.shared.liveness.borrow()
    }

    /// Record that this gateway applied revision `revision` of `lu` (and
    /// finished or aborted the commands the change preempted). The ack
    /// lives under the lease, so it disappears with it.
    pub async fn ack(&self, lu: &LuId, revision: i64) -> Result<(), Error> {
        self.put_ack(lu, revision.max(0)).await
    }

    /// Say that this gateway serves `lu` from now on, before its first
    /// read of the LU's state: its ack key with revision 0. A fencing
    /// change waits for the gateways whose ack key for the LU exists (and
    /// is not [`NOT_SERVING`]) when its wait starts; one committed after
    /// this put is therefore waited for here, and one committed before it
    /// is in the state this gateway reads next.
    pub async fn serve_lu(&self, lu: &LuId) -> Result<(), Error> {
        self.put_ack(lu, 0).await
    }

    /// Say that this gateway no longer serves `lu` (a reload removed it):
    /// its ack key becomes [`NOT_SERVING`], and fencing changes stop
    /// waiting for it. Call only once no command on the LU runs here any
    /// more.
    pub async fn leave_lu(&self, lu: &LuId) -> Result<(), Error> {
        self.put_ack(lu, NOT_SERVING).await
    }

    async fn put_ack(&self, lu: &LuId, revision: i64) -> Result<(), Error> {
        let key = self.cluster.keys().ack(lu, &self.name);
        self.put_under_lease(key, revision.to_string(), "writing ack")
            .await
    }

    /// Put `key` = `value` under this incarnation's lease.
    pub(crate) async fn put_under_lease(
        &self,
        key: String,
        value: String,
        what: &str,
    ) -> Result<(), Error> {
        let lease = self.lease;
        self.write_under_lease(what, |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await
        .map(drop)
    }

    /// Run `txn`, which writes keys under this incarnation's lease, as
    /// [`Gateway::write_under_lease`] does.
    pub(crate) async fn txn_under_lease(&self, what: &str, txn: Txn) -> Result<TxnResponse, Error> {
        self.write_under_lease(what, |mut c| {
            let t = txn.clone();
            async move { c.txn(t).await }
        })
        .await
    }

    /// A write that puts keys under this incarnation's lease
    /// ([`Cluster::call_write`]). etcd refuses it once the lease is gone
    /// ("lease not found"): then this gateway stops serving at once
    /// ([`Liveness::Lost`], as when its keep-alive learns it), since the
    /// others may already treat it as gone, and the write fails with
    /// [`Error::LeaseLost`]. Once the lease is known to be gone it fails
    /// so at once, without asking etcd.
    async fn write_under_lease<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        if self.shared.lost.load(Ordering::SeqCst) {
            return Err(Error::LeaseLost(self.name.clone()));
        }
        match self.cluster.call_write(what, f).await {
            Err(Error::Etcd(m)) if m.contains("lease not found") => {
                if self.shared.lose() {
                    tracing::error!(
                        gateway = %self.name, lease = format!("{:x}", self.lease), what,
                        "gateway lease not found at etcd; stop serving and join again"
                    );
                }
                Err(Error::LeaseLost(self.name.clone()))
            }
            other => other,
        }
    }

    /// Stop keeping the lease alive and revoke it: the registration and
    /// acks disappear at once. Stop serving first.
    pub async fn leave(self) -> Result<(), Error> {
        self.revoke().await
    }

    /// [`Gateway::leave`] through a shared handle: stop the keep-alives
    /// (the gateway fences itself at once) and revoke the lease, so the
    /// other gateways need not wait out the TTL (a clean shutdown).
    pub async fn revoke(&self) -> Result<(), Error> {
        self.halt();
        let lease = self.lease;
        self.cluster
            .call("revoking lease", |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await?;
        tracing::info!(gateway = %self.name, "gateway left");
        Ok(())
    }

    /// Stop the keep-alives without revoking: the gateway fences itself
    /// now and its lease expires after the TTL (what a crash looks like
    /// to the others).
    pub fn stop(&mut self) {
        self.halt();
    }

    fn halt(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for t in tasks.drain(..) {
            t.abort();
        }
        self.shared.fence();
    }

    /// Claim the nexus-loss work of a departed gateway's incarnation
    /// (`departed`, as last seen registered): true for exactly one
    /// claimant cluster-wide. The claim is a key created under this
    /// gateway's lease only if it does not exist.
    pub async fn claim_departure(&self, departed: &GatewayEntry) -> Result<bool, Error> {
        let key = self
            .cluster
            .keys()
            .departed(&departed.record.name, departed.lease);
        let t = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.name.clone(),
                Some(PutOptions::new().with_lease(self.lease)),
            )]);
        self.txn_under_lease("claiming a departed gateway", t)
            .await
            .map(|r| r.succeeded())
    }
}

impl Gateway {
    /// Wait until nobody holds the claim on `departed`'s nexus-loss work:
    /// its claimant released it when done, or died (the claim lives under
    /// its lease). Then claim again: a claimant that died halfway leaves
    /// the rest to the next one ([`Cluster::commit_once`] makes every LU's
    /// part happen once). Unbounded: the caller bounds it.
    pub async fn wait_departure_claim_released(
        &self,
        departed: &GatewayEntry,
    ) -> Result<(), Error> {
        let key = self
            .cluster
            .keys()
            .departed(&departed.record.name, departed.lease);
        loop {
            let r = self
                .cluster
                .call("reading a departure claim", |mut c| {
                    let k = key.clone();
                    async move { c.get(k, None).await }
                })
                .await?;
            if r.kvs().is_empty() {
                return Ok(());
            }
            let at = r.header().map_or(0, |h| h.revision());
            let deleted = self
                .cluster
                .watch_until_deleted(
                    "watching a departure claim",
                    key.clone().into_bytes(),
                    at + 1,
                )
                .await?;
            if deleted {
                return Ok(());
            }
            // The watch ended without a deletion: read again.
        }
    }

    /// Give up this gateway's claim on `departed` once its work is done,
    /// so the survivors waiting on it claim in turn and find nothing left.
    pub async fn release_departure(&self, departed: &GatewayEntry) -> Result<(), Error> {
        let key = self
            .cluster
            .keys()
            .departed(&departed.record.name, departed.lease);
        let t = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, self.lease)])
            .and_then([TxnOp::delete(key.clone(), None)]);
        self.cluster
            .txn_write("releasing a departure claim", t)
            .await
            .map(drop)
    }
}

impl Cluster {
    /// A lease of `ttl` for keys that must outlive this gateway for a
    /// while but not forever (the departure markers: a day).
    pub async fn grant_lease(&self, ttl: Duration) -> Result<i64, Error> {
        let secs = ttl.as_secs().max(1) as i64;
        self.call_write("granting lease", |mut c| async move {
            c.lease_grant(secs, None).await
        })
        .await
        .map(|g| g.id())
    }

    /// Revoke lease `id` (its keys are deleted).
    pub async fn revoke_lease(&self, id: i64) -> Result<(), Error> {
        self.call(
            "revoking lease",
            |mut c| async move { c.lease_revoke(id).await },
        )
        .await
        .map(drop)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Send a keep-alive every TTL/3 and confirm the lease with the send time
/// of each answered one. One outstanding keep-alive at a time, so an
/// answer belongs to the request just sent.
async fn keep_alive(
    cluster: Cluster,
    lease: i64,
    ttl: Duration,
    margin: Duration,
    shared: Arc<Shared>,
) {
    let interval = ttl / 3;
    let wait = cluster.request_timeout().min(interval);
    let mut stream = None;
    let mut stream_at = 0;
    loop {
        let sent = Instant::now();
        let outcome: Result<i64, String> = async {
            if stream.is_none() {
                // Opening the stream sends the first keep-alive and waits
                // for its answer; "lease not found" means it expired.
                let (i, mut c) = cluster.pick();
                let s = match tokio::time::timeout(wait, c.lease_keep_alive(lease)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let e = e.to_string();
                        if !e.contains("lease not found") {
                            cluster.failed(i);
                        }
                        return Err(e);
                    }
                    Err(_) => {
                        cluster.failed(i);
                        return Err("keep-alive stream: timeout".into());
                    }
                };
                stream = Some(s);
                stream_at = i;
                return Ok(ttl.as_secs() as i64);
            }
            let Some((keeper, answers)) = stream.as_mut() else {
                return Err("no stream".into());
            };
            let answered = tokio::time::timeout(wait, async {
                keeper.keep_alive().await?;
                answers.message().await
            })
            .await;
            match answered {
                Err(_) => Err("keep-alive: timeout".into()),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(None)) => Err("keep-alive stream closed".into()),
                Ok(Ok(Some(r))) => Ok(r.ttl()),
            }
        }
        .await;
        match outcome {
            Ok(t) if t > 0 => {
                shared.confirm(sent + Duration::from_secs(t as u64).min(ttl) - margin);
            }
            Ok(_) => {
                if shared.lose() {
                    tracing::error!(
                        lease = format!("{lease:x}"),
                        "gateway lease expired at etcd; stop serving and join again"
                    );
                }
                return;
            }
            Err(e) if e.contains("lease not found") => {
                if shared.lose() {
                    tracing::error!(
                        lease = format!("{lease:x}"),
                        "gateway lease not found at etcd; stop serving and join again"
                    );
                }
                return;
            }
            Err(e) => {
                if stream.take().is_some() {
                    cluster.failed(stream_at);
                }
                tracing::warn!(lease = format!("{lease:x}"), error = %e, "keep-alive not confirmed");
            }
        }
        // Retry sooner after a failure, but never more than every 100 ms.
        let next = if stream.is_some() {
            sent + interval
        } else {
            sent + Duration::from_millis(100).max(interval / 4)
        };
        tokio::time::sleep_until(next).await;
    }
}

/// Turn Serving into Fenced when the deadline passes without renewal.
async fn fence_timer(shared: Arc<Shared>) {
    let mut deadline = shared.deadline.subscribe();
    loop {
        let current = *deadline.borrow_and_update();
        match current {
            Some(until) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {
                        // Renewed in the meantime?
                        if *deadline.borrow() == Some(until) && !shared.may_serve() {
                            tracing::warn!("lease in doubt: gateway fenced");
                            shared.fence();
                        }
                    }
                    r = deadline.changed() => if r.is_err() { return },
                }
            }
            None => {
                if deadline.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

impl Gateway {
    /// Replace the portal groups in this incarnation's registration (a
    /// reload changed them), keeping it under the same lease: survivors
    /// commit this gateway's nexus loss for the TPGTs its registration
    /// lists when it is gone, and see the new list through
    /// [`Cluster::watch_gateways`] (a [`crate::GatewayEvent::Joined`] with
    /// the same lease). The write is one transaction that requires the
    /// key to be under this incarnation's lease, so a registration that
    /// is gone (lease expired or revoked, key deleted by hand) is never
    /// recreated here.
    pub async fn update_portals(&self, portal_groups: Vec<PortalGroup>) -> Result<(), Error> {
        let key = self.cluster.keys().gateway(&self.name);
        let record = GatewayRecord {
            format: GATEWAY_FORMAT.into(),
            name: self.name.clone(),
            portal_groups,
            ttl_secs: self.ttl.as_secs() as i64,
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let t = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, self.lease)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(self.lease)),
            )]);
        let r = self
            .txn_under_lease("updating the gateway's portal groups", t)
            .await?;
        if r.succeeded() {
            Ok(())
        } else {
            Err(Error::Etcd(format!(
                "the registration of gateway {:?} is no longer under its lease {:x}",
                self.name, self.lease
            )))
        }
    }
}
