//! Live reconfiguration (SIGHUP, `keyfence reload`): read the
//! configuration again, check all of it, and apply what changed without
//! disturbing sessions it does not concern.
//!
//! A reload happens in two phases. The first does everything that can
//! fail — reading and validating the file, refusing changes that need a
//! restart, opening the LUs that are new, growing backing files whose
//! `size` was raised — without changing what the server serves; any error
//! undoes what it created and leaves the old configuration running. The
//! second publishes the new [`Live`] and tells every session
//! ([`SessionCtl::Reconfigure`]); each session then takes its target and
//! LUN view from it, queues REPORTED LUNS DATA HAS CHANGED for itself when
//! what it sees changed, or is asked to log out when its initiator lost
//! access. Grown LUs queue CAPACITY DATA HAS CHANGED for their nexuses.
//!
//! A LUN whose configuration is unchanged keeps its [`LogicalUnit`] and so
//! its persistent reservations, unit attentions and sessions. A removed
//! LUN's APTPL state stays in the data directory and is read back when the
//! LUN is added again.
//!
//! Portals: the first phase binds every listen address that is new (a
//! bind failure rejects the reload); the commit starts accepting on them,
//! hands every LU of a target whose portal groups changed its new target
//! ports (REPORT TARGET PORT GROUPS, Device Identification, ALL_TG_PT),
//! stops accepting on the addresses no target uses any more, and asks
//! the sessions that came through a removed portal to log out. A portal
//! is its (TPGT, address): one that stays keeps its listener and its
//! sessions; one whose address stays but whose TPGT would change (its
//! position in `portals`, or `first_tpgt`, moved) is refused, since its
//! sessions' I_T nexuses name the old TPGT.
//!
//! Limits: every `[limits]` key applies. The admission limits
//! (`max_login_connections`, `max_login_connections_per_source`,
//! `first_pdu_timeout_secs`) govern the connections accepted from the
//! commit on; connections already logging in keep their slot and
//! first-PDU deadline, and when a limit is lowered below the number in
//! use new connections are refused until it is below again (nobody is
//! dropped).
//!
//! The metrics endpoint (`metrics`): a new address is bound in the first
//! phase (a busy one rejects the reload); the commit serves it and stops
//! the old one. Added, it turns per-LU counting on; removed, off.
//!
//! Cluster mode: an added LU is followed (`Gateway::serve_lu`, read,
//! install, ack: [`super::cluster::Registry`]) before the new
//! configuration is published, and the reload is rejected if it does not
//! come into service in time; a removed LU, once the new configuration is
//! published, stops serving, waits for its commands in flight and then
//! leaves (`Gateway::leave_lu`), so fencing changes through other gateways
//! no longer wait for this one. A served clustered LU may not change (one
//! identity and backing cluster-wide).
//!
//! Cluster mode, portals: this gateway's change by the rules above, and
//! its registration follows (docs/cluster.md, "Reloading a gateway").
//! Portal groups added are registered (`Gateway::update_portals`, under
//! the lease) before the configuration is published, so before anyone
//! can log in through them: survivors commit a dead gateway's nexus loss
//! for the TPGTs it registered. A TPGT another live gateway registers is
//! refused, and so is the reload when the registration cannot be
//! written. Portal groups removed stay registered, and the followers
//! keep delivering unit attentions for their nexuses, until their
//! sessions have gone and the logins in progress at the publication have
//! finished; then [`retire_portals`] drops them. `[[cluster.gateways]]`
//! applies too: it is what this gateway advertises for the others
//! (SendTargets, and every LU's target ports as for its own portals); a
//! kept address of another gateway may not change its TPGT either.
//!
//! What needs a restart is refused with a message saying so: `data_dir`,
//! `admin_socket`, `[cluster]` but its gateway list (naming the keys
//! that changed), a LUN's block size, backing, read-only or direct flag
//! or identity while it is served (remove it in one reload and add it
//! back in the next).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use std::net::SocketAddr;

use keyfence_lu::{LogicalUnit, TargetLuns, UaScope};
use keyfence_scsi::sense::asc;
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::cluster::{portal_groups, portal_set, EtcdPrState, Followed, PortalSet, Registry};
use super::session::SessionCtl;
use super::{
    acl, datadir, open_lu, BindHooks, ListenerInfo, Live, MetricsListener, Portal, Shared, TargetRt,
};
use crate::config::{Backing, Config, LunConfig, TargetConfig};

/// Reads the configuration for a reload: the file `keyfence serve` was
/// started with, with its command-line overrides applied. Errors are one
/// line.
pub type Reloader = Arc<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Where reloads read the configuration from (set once serving).
#[derive(Default)]
pub(crate) struct Source(std::sync::Mutex<Option<Reloader>>);

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.get().is_some() {
            "Source(set)"
        } else {
            "Source(none)"
        })
    }
}

impl Source {
    pub fn set(&self, r: Reloader) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    pub fn get(&self) -> Option<Reloader> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this server was started without a configuration file (--config); there is nothing to reload")]
    NoSource,
    #[error("new configuration rejected: {0}")]
    Invalid(String),
    #[error("new configuration rejected: {0}; restart keyfence serve to apply it")]
    NeedsRestart(String),
}

/// Read the configuration again and apply it; see the module doc. Returns
/// a one-line summary of what changed.
pub(crate) async fn reload(shared: &Arc<Shared>) -> Result<String, ReloadError> {
    let _one_at_a_time = shared.reload_lock.lock().await;
    let result = reload_locked(shared).await;
    match &result {
        Ok(summary) => info!("configuration reloaded: {summary}"),
        Err(e) => warn!("{e}"),
    }
    result
}

async fn reload_locked(shared: &Arc<Shared>) -> Result<String, ReloadError> {
    let source = shared.reloader.get().ok_or(ReloadError::NoSource)?;
    let old = shared.live();
    let clustered = shared.clustered;
    let old2 = old.clone();
    let hooks = shared.hooks.clone();
    let metrics_bound = shared.acceptors().metrics_addr();
    let cluster = shared.cluster.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let new = source().map_err(ReloadError::Invalid)?;
        prepare(
            &old2,
            new,
            clustered,
            metrics_bound,
            &hooks,
            cluster.as_ref(),
        )
    })
    .await
    .map_err(|e| ReloadError::Invalid(format!("reload task failed: {e}")))??;
    let Prepared {
        live,
        lun_lists,
        grown,
        summary,
        fresh,
        ports_changed,
        metrics,
        joining,
        created,
    } = prepared;
    // Cluster mode: the portal groups this gateway serves from now on are
    // registered before anyone can log in through them (survivors commit
    // its nexus loss for the TPGTs registered); those removed stay
    // registered until their sessions have gone (`retire_portals`).
    if let Some(reg) = &shared.cluster {
        let widened = match register_portals(reg, &live).await {
            Ok(w) => w,
            Err(e) => {
                created.undo();
                return Err(e);
            }
        };
        // Every added LU reads the committed state and takes part in
        // acknowledging changes before anyone can reach it.
        if let Err(e) = join_cluster(shared, reg, joining).await {
            created.undo();
            if widened {
                // Registered for nothing: retire them again.
                retire_portals(shared, reg);
            }
            return Err(e);
        }
    }
    // Commit: nothing below fails.
    for (list, luns) in lun_lists {
        list.set(luns);
    }
    if let Some(reg) = &shared.cluster {
        // Unit attentions and aborts for nexuses through the new portal
        // groups are delivered here before the first login through one;
        // those through removed ones until their sessions have gone.
        for i in &ports_changed {
            let tpgts: HashSet<u16> = [old.target(*i), live.target(*i)]
                .into_iter()
                .flatten()
                .flat_map(|t| t.portals.iter().map(|p| p.tpgt))
                .collect();
            reg.set_tpgts(*i, &tpgts);
        }
    }
    for t in ports_changed.iter().filter_map(|i| live.target(*i)) {
        let ports: Vec<_> = t
            .portals
            .iter()
            .chain(t.peer_portals.iter().map(|(_, p)| p))
            .map(|p| keyfence_scsi::TargetPort::new(&t.name, p.tpgt, p.tpgt))
            .collect();
        for lu in t.luns.values() {
            lu.set_target_ports(ports.clone());
        }
    }
    let live = Arc::new(live);
    shared.live.store(live.clone());
    apply_limits(shared, &old, &live);
    // Accept on the new portals; stop on those no target uses any more.
    let retired: Vec<_> = {
        let mut acc = shared.acceptors();
        for (addr, l) in fresh {
            acc.add(shared, l, addr);
        }
        old.listeners
            .iter()
            .filter(|o| !live.listeners.iter().any(|l| l.addr == o.addr))
            .filter_map(|o| acc.remove(o.addr))
            .collect()
    };
    for task in retired {
        // The socket is closed when its loop ends (at once): a later
        // reload can listen on the address again.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    // The metrics endpoint: the new socket is served from now on, the
    // old one closes (scrapes in progress on it are cut short).
    if let MetricsPlan::Replace(new) = metrics {
        let old = shared.acceptors().replace_metrics(shared, new);
        if let Some(t) = old {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                tokio::task::spawn_blocking(move || t.join()),
            )
            .await;
        }
    }
    let counting = live
        .config
        .as_ref()
        .is_some_and(|c| c.metrics_addr.is_some());
    if shared.metrics.counts_lus() != counting {
        // The LUs' counters came with the configuration just published.
        shared.metrics.set_counts_lus(counting);
    }
    super::publish_lu_metrics(&shared.metrics, &live.targets);
    for lu in &grown {
        lu.queue_unit_attention(UaScope::All, asc::CAPACITY_DATA_HAS_CHANGED);
    }
    shared
        .sessions()
        .broadcast(&SessionCtl::Reconfigure(live.clone()));
    if let Some(reg) = &shared.cluster {
        retire_portals(shared, reg);
    }
    // Cluster mode: the removed LUs stop serving here, then leave.
    if let Some(reg) = &shared.cluster {
        for (_, t) in old.targets() {
            for (lun, lu) in &t.luns {
                let kept = live
                    .targets()
                    .any(|(_, n)| n.luns.values().any(|x| Arc::ptr_eq(x, lu)));
                if kept {
                    continue;
                }
                if let Ok(id) = keyfence_cluster::LuId::for_lun(&t.name, *lun) {
                    reg.remove(&id).await;
                }
            }
        }
    }
    Ok(summary)
}

/// This gateway's portal groups as `live` serves them.
fn own_portals(live: &Live) -> PortalSet {
    live.targets()
        .flat_map(|(_, t)| t.portals.iter().map(|p| (p.tpgt, p.addr.to_string())))
        .collect()
}

/// Cluster mode: register the portal groups of `live` (to be published)
/// in addition to those registered now. A TPGT another gateway still
/// registers is refused: TPGTs are unique cluster-wide, and a survivor
/// would commit the nexus loss of that gateway's nexuses for this one's.
/// True if the registration changed.
async fn register_portals(reg: &Arc<Registry>, live: &Live) -> Result<bool, ReloadError> {
    let m = &reg.membership;
    let registered = portal_set(&m.portal_groups().await);
    let want = own_portals(live);
    let wider: PortalSet = registered.union(&want).cloned().collect();
    if wider == registered {
        return Ok(false);
    }
    let had: HashSet<u16> = registered.iter().map(|(t, _)| *t).collect();
    let new_tpgts: HashSet<u16> = want
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| !had.contains(t))
        .collect();
    let cluster = m.cluster();
    if !new_tpgts.is_empty() {
        let others = cluster.gateways().await.map_err(|e| {
            ReloadError::Invalid(format!(
                "cannot read the other gateways' registrations to check the new portal groups: {e}"
            ))
        })?;
        for g in others.iter().filter(|g| g.record.name != cluster.gateway()) {
            if let Some(pg) = g
                .record
                .portal_groups
                .iter()
                .find(|pg| new_tpgts.contains(&pg.tpgt))
            {
                return Err(ReloadError::Invalid(format!(
                    "TPGT {} is registered by gateway {:?} ({}); TPGTs are unique cluster-wide: reload that gateway without it first",
                    pg.tpgt,
                    g.record.name,
                    pg.portals.join(", ")
                )));
            }
        }
    }
    m.set_portal_groups(portal_groups(&wider))
        .await
        .map_err(|e| {
            ReloadError::Invalid(format!(
                "cannot register this gateway's new portal groups with the cluster: {e}"
            ))
        })?;
    Ok(true)
}

/// How often [`retire_portals`] looks whether the sessions through the
/// portal groups removed have gone.
const RETIRE_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Cluster mode, after a reload was published (or failed after
/// registering new portal groups): bring the registration, and the TPGTs
/// whose unit attentions the followers deliver here, down to the portal
/// groups served now, keeping those some session still uses. A session
/// through a removed portal group was asked to log out and is closed a
/// little later; until it has gone (its nexus loss committed, see
/// docs/cluster.md) its TPGT stays registered, so the survivors would
/// commit its nexus loss were this gateway to die. Logins in progress
/// when the reload was published are waited for too: they may have
/// started under the old configuration. Runs in the background, one task
/// at a time, until done or the server stops; the etcd write is retried
/// while etcd is unreachable.
fn retire_portals(shared: &Arc<Shared>, reg: &Arc<Registry>) {
    let logins = shared.sessions().logins_in_progress();
    {
        let mut r = reg.retiring.lock().unwrap_or_else(|e| e.into_inner());
        r.logins.extend(logins);
        if r.running {
            // It reads the published configuration before it ends.
            return;
        }
        r.running = true;
    }
    let (shared, reg) = (shared.clone(), reg.clone());
    tokio::spawn(async move {
        let mut shutdown = shared.shutdown.clone();
        let mut warned = false;
        loop {
            // Under the reload lock: no reload is between its
            // registration and its publication.
            let guard = shared.reload_lock.lock().await;
            match retire_step(&shared, &reg).await {
                Ok(true) => {
                    reg.retiring
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .running = false;
                    drop(guard);
                    return;
                }
                Ok(false) => {}
                Err(e) if !warned => {
                    warned = true;
                    warn!("cannot retire removed portal groups from this gateway's registration yet (retrying): {e}");
                }
                Err(_) => {}
            }
            drop(guard);
            tokio::select! {
                _ = tokio::time::sleep(RETIRE_POLL) => {}
                _ = shutdown.wait_for(|s| *s) => {
                    reg.retiring.lock().unwrap_or_else(|e| e.into_inner()).running = false;
                    return;
                }
            }
        }
    });
}

/// One look of [`retire_portals`]: true when the registration is the
/// portal groups served now.
async fn retire_step(shared: &Arc<Shared>, reg: &Arc<Registry>) -> Result<bool, String> {
    {
        let now = shared.sessions().logins_in_progress();
        let mut r = reg.retiring.lock().unwrap_or_else(|e| e.into_inner());
        r.logins.retain(|t| now.contains(t));
        if !r.logins.is_empty() {
            return Ok(false);
        }
    }
    let live = shared.live();
    // The TPGTs of the normal sessions, per target.
    let mut in_use: BTreeMap<usize, HashSet<u16>> = BTreeMap::new();
    for (t, info) in shared.sessions().list() {
        if let Some(t) = t {
            in_use.entry(t).or_default().insert(info.tpgt);
        }
    }
    let used: HashSet<u16> = in_use.values().flatten().copied().collect();
    let want = own_portals(&live);
    let registered = portal_set(&reg.membership.portal_groups().await);
    let keep: PortalSet = want
        .iter()
        .cloned()
        .chain(registered.iter().filter(|(t, _)| used.contains(t)).cloned())
        .collect();
    if keep != registered {
        reg.membership
            .set_portal_groups(portal_groups(&keep))
            .await
            .map_err(|e| e.to_string())?;
        let gone: Vec<String> = registered
            .difference(&keep)
            .map(|(t, a)| format!("{a} (TPGT {t})"))
            .collect();
        if !gone.is_empty() {
            info!(
                "portal groups no longer registered with the cluster: {}",
                gone.join(", ")
            );
        }
    }
    for (i, t) in live.targets() {
        let tpgts: HashSet<u16> = t
            .portals
            .iter()
            .map(|p| p.tpgt)
            .chain(in_use.get(&i).into_iter().flatten().copied())
            .collect();
        reg.set_tpgts(i, &tpgts);
    }
    Ok(keep == want)
}

/// Follow the clustered LUs a reload adds and wait (bounded) until each
/// is in service here; if one is not, none of them stays.
async fn join_cluster(
    shared: &Arc<Shared>,
    reg: &Arc<Registry>,
    joining: Vec<Followed>,
) -> Result<(), ReloadError> {
    let mut waits = Vec::new();
    let mut failed = None;
    for f in joining {
        let id = f.id.clone();
        match reg.add(shared, f) {
            Ok(rx) => waits.push((id, rx)),
            Err(msg) => {
                failed = Some(msg);
                break;
            }
        }
    }
    let limit = reg.join_wait();
    let deadline = tokio::time::Instant::now() + limit;
    if failed.is_none() {
        for (id, rx) in &mut waits {
            let r = tokio::time::timeout_at(deadline, rx.wait_for(|s| *s)).await;
            if !matches!(r, Ok(Ok(_))) {
                failed = Some(format!(
                    "clustered LU {id} did not come into service within {limit:?} (is etcd reachable? see the log)"
                ));
                break;
            }
        }
    }
    let Some(msg) = failed else {
        return Ok(());
    };
    for (id, _) in &waits {
        reg.remove(id).await;
    }
    Err(ReloadError::Invalid(msg))
}

/// Limits that live outside [`Live`]: the session table's, the logged-in
/// connection count, the buffer budget and the admission of new
/// connections. Call after `new` is published.
fn apply_limits(shared: &Arc<Shared>, old: &Live, new: &Live) {
    let (o, n) = (&old.limits, &new.limits);
    if (
        o.max_login_connections,
        o.max_login_connections_per_source,
        o.first_pdu_timeout_secs,
    ) != (
        n.max_login_connections,
        n.max_login_connections_per_source,
        n.first_pdu_timeout_secs,
    ) {
        // Not running yet: `Server::run` reads them from the published
        // configuration (under the same lock).
        if let Some(a) = shared.acceptors().admission() {
            a.set_limits(n);
        }
    }
    if o.max_sessions != n.max_sessions {
        shared.sessions().set_max(n.max_sessions);
    }
    if o.max_connections != n.max_connections {
        let sem = shared.connections.clone();
        if n.max_connections > o.max_connections {
            sem.add_permits((n.max_connections - o.max_connections) as usize);
        } else {
            // Take the places away as connections give them back.
            let fewer = o.max_connections - n.max_connections;
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many_owned(fewer).await {
                    p.forget();
                }
            });
        }
    }
    if o.max_buffered_bytes != n.max_buffered_bytes {
        shared.buffers.set_limit(n.max_buffered_bytes.0);
    }
}

/// A reload checked and ready to publish.
struct Prepared {
    live: Live,
    /// REPORT LUNS lists to replace (shared with LUs already serving).
    lun_lists: Vec<(Arc<TargetLuns>, Vec<u64>)>,
    grown: Vec<Arc<LogicalUnit>>,
    summary: String,
    /// Listeners bound for new portals, by bound address.
    fresh: Vec<(SocketAddr, TcpListener)>,
    /// Served targets whose portal groups changed.
    ports_changed: Vec<usize>,
    metrics: MetricsPlan,
    /// Cluster mode: the LUs this reload adds, to bring into service
    /// before it is published.
    joining: Vec<Followed>,
    /// What the first phase created on disk, undone if bringing the new
    /// clustered LUs into service fails.
    created: datadir::Created,
}

/// Cluster mode: the other gateways' portals (`[[cluster.gateways]]`)
/// follow the rule of this gateway's own: a portal whose address stays
/// may not change its TPGT (the I_T nexuses through it, registrations
/// included, name the old one).
fn check_peer_portals(old: &Config, new: &Config) -> Result<(), ReloadError> {
    let was = super::peer_portals(old);
    for (gw, p) in super::peer_portals(new) {
        if let Some((_, o)) = was
            .iter()
            .find(|(_, o)| o.addr == p.addr && o.tpgt != p.tpgt)
        {
            return Err(ReloadError::Invalid(format!(
                "cluster.gateways: portal {} of gateway {gw:?} would change from TPGT {} to TPGT {} (its position in `portals` or first_tpgt moved); a reload cannot change the TPGT of a served portal: keep its position, or remove it in one reload and add it in the next",
                p.addr, o.tpgt, p.tpgt
            )));
        }
    }
    Ok(())
}

/// What a reload does to the metrics endpoint.
enum MetricsPlan {
    Keep,
    /// Serve this instead (bound already), or none.
    Replace(Option<MetricsListener>),
}

/// Bind the metrics endpoint's new address, if it changed (a busy address
/// rejects the reload). `bound`: where it listens now.
fn plan_metrics(
    old: &Config,
    new: &Config,
    bound: Option<SocketAddr>,
) -> Result<(MetricsPlan, Option<String>), ReloadError> {
    if old.metrics_addr == new.metrics_addr {
        return Ok((MetricsPlan::Keep, None));
    }
    let Some(want) = new.metrics_addr else {
        return Ok((
            MetricsPlan::Replace(None),
            Some("metrics endpoint removed".into()),
        ));
    };
    // The address it is bound to already (the old one named its port 0).
    if want.port() != 0 && bound == Some(want) {
        return Ok((MetricsPlan::Keep, None));
    }
    let err = |e: std::io::Error| {
        ReloadError::Invalid(format!("cannot listen for metrics on {want}: {e}"))
    };
    let l = std::net::TcpListener::bind(want).map_err(err)?;
    let addr = l.local_addr().map_err(err)?;
    Ok((
        MetricsPlan::Replace(Some(MetricsListener::Bound(l, addr))),
        Some(format!("metrics endpoint on {addr}")),
    ))
}

fn restart(msg: impl Into<String>) -> ReloadError {
    ReloadError::NeedsRestart(msg.into())
}

/// Changes no reload can apply.
fn check_restart_only(old: &Config, new: &Config, clustered: bool) -> Result<(), ReloadError> {
    if old.data_dir != new.data_dir {
        return Err(restart(format!(
            "data_dir changed from {} to {}",
            old.data_dir.display(),
            new.data_dir.display()
        )));
    }
    if old.admin_socket_path() != new.admin_socket_path() {
        return Err(restart("admin_socket changed"));
    }
    if let (Some(o), Some(n)) = (&old.cluster, &new.cluster) {
        // Every key but the portal groups of `[[cluster.gateways]]`.
        let changed: Vec<&str> = [
            ("endpoints", o.endpoints != n.endpoints),
            ("gateway", o.gateway != n.gateway),
            ("lease_ttl_secs", o.lease_ttl_secs != n.lease_ttl_secs),
            ("safety_margin_ms", o.safety_margin_ms != n.safety_margin_ms),
            (
                "request_timeout_ms",
                o.request_timeout_ms != n.request_timeout_ms,
            ),
            ("prefix", o.prefix != n.prefix),
        ]
        .into_iter()
        .filter_map(|(k, c)| c.then_some(k))
        .collect();
        if !changed.is_empty() {
            return Err(restart(format!(
                "[cluster] changed ({}; only [[cluster.gateways]] applies live)",
                changed.join(", ")
            )));
        }
    } else if old.cluster.is_some() != new.cluster.is_some() {
        return Err(restart(if new.cluster.is_some() {
            "[cluster] added"
        } else {
            "[cluster] removed"
        }));
    }
    if clustered {
        // A clustered LU is served on every gateway with one identity and
        // the same backing store: while served it stays as it is (it may
        // be removed in one reload and added back in the next).
        for t in &new.targets {
            let Some(o) = find(old, &t.name) else {
                continue;
            };
            for l in &t.luns {
                if o.luns.iter().any(|ol| ol.id == l.id && ol != l) {
                    return Err(restart(format!(
                        "target '{}' LUN {}: in cluster mode a served LUN's configuration cannot change (remove the LUN in one reload and add it back in the next)",
                        t.name, l.id
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Portal groups by lower-case target name, and the listeners bound for
/// them (by bound address).
type PortalPlan = (
    BTreeMap<String, Vec<Portal>>,
    Vec<(SocketAddr, TcpListener)>,
);

/// The portal groups of every target of `new` (by lower-case name), with
/// the listeners bound for the addresses not listened on yet. A portal
/// group that stays (same TPGT and configured address) keeps its bound
/// address; see the module doc for what is refused.
fn plan_portals(old: &Live, old_cfg: &Config, new: &Config) -> Result<PortalPlan, ReloadError> {
    let mut fresh: Vec<(SocketAddr, SocketAddr, TcpListener)> = Vec::new();
    let mut out = BTreeMap::new();
    for tc in &new.targets {
        let old_tc = find(old_cfg, &tc.name);
        let old_rt = old.target_by_name(&tc.name).and_then(|i| old.target(i));
        let mut portals = Vec::new();
        for (tpgt, want) in tc.portal_groups() {
            let was = old_tc.is_some_and(|o| o.portal_groups().any(|g| g == (tpgt, want)));
            let kept = old_rt
                .filter(|_| was)
                .and_then(|rt| rt.portals.iter().find(|p| p.tpgt == tpgt))
                .map(|p| p.addr);
            if kept.is_none() && want.port() != 0 {
                if let Some((from, _)) =
                    old_tc.and_then(|o| o.portal_groups().find(|(_, a)| *a == want))
                {
                    return Err(ReloadError::Invalid(format!(
                        "target '{}': portal {want} would change from TPGT {from} to TPGT {tpgt} (its position in `portals` or first_tpgt moved); a reload cannot change the TPGT of a served portal: keep its position, or remove it in one reload and add it in the next",
                        tc.name
                    )));
                }
            }
            let addr = match kept {
                Some(a) => a,
                // Listened on already (for another target), or bound just
                // now for another portal group of this reload.
                None if want.port() != 0 && old.listeners.iter().any(|l| l.addr == want) => want,
                None => match fresh
                    .iter()
                    .find(|(w, _, _)| *w == want && want.port() != 0)
                {
                    Some((_, a, _)) => *a,
                    None => {
                        let (a, l) = listen(want).map_err(|e| {
                            ReloadError::Invalid(format!(
                                "target '{}': cannot listen on {want}: {e}",
                                tc.name
                            ))
                        })?;
                        fresh.push((want, a, l));
                        a
                    }
                },
            };
            portals.push(Portal { tpgt, addr });
        }
        portals.sort_by_key(|p| p.tpgt);
        out.insert(tc.name.to_ascii_lowercase(), portals);
    }
    Ok((out, fresh.into_iter().map(|(_, a, l)| (a, l)).collect()))
}

/// Bind a listening socket as [`super::Server::bind`] does.
fn listen(addr: SocketAddr) -> std::io::Result<(SocketAddr, TcpListener)> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    let l = sock.listen(1024)?;
    Ok((l.local_addr()?, l))
}

fn find<'a>(c: &'a Config, name: &str) -> Option<&'a TargetConfig> {
    c.targets.iter().find(|t| t.name.eq_ignore_ascii_case(name))
}

/// What happens to one LUN that was served and still is configured.
enum Keep {
    Same,
    /// Same backing, `size` raised beyond the medium: grow to this.
    Grow(u64),
    /// Another backing store: a new LU.
    Replace,
}

fn compare_lun(
    data_dir: &std::path::Path,
    target: &str,
    old: &LunConfig,
    new: &LunConfig,
    lu: &LogicalUnit,
) -> Result<Keep, ReloadError> {
    if old == new {
        return Ok(Keep::Same);
    }
    let (ob, nb) = (old.backing(data_dir), new.backing(data_dir));
    let same_store = match (&ob, &nb) {
        (Backing::File { path: a, .. }, Backing::File { path: b, .. }) => a == b,
        (Backing::Device(a), Backing::Device(b)) => a == b,
        _ => false,
    };
    if !same_store {
        return Ok(Keep::Replace);
    }
    let mut o = old.clone();
    o.size = new.size;
    if o != *new {
        return Err(restart(format!(
            "target '{target}' LUN {}: block_size, read_only, direct, serial or naa changed while it is served (remove the LUN in one reload and add it back in the next)",
            new.id
        )));
    }
    // Only `size` changed.
    let Backing::File { size, .. } = nb else {
        return Ok(Keep::Same);
    };
    let now = lu.block_count() * u64::from(lu.config().block_size);
    if size > now {
        if lu.config().read_only {
            return Err(ReloadError::Invalid(format!(
                "target '{target}' LUN {}: a read-only LUN cannot grow",
                new.id
            )));
        }
        return Ok(Keep::Grow(size));
    }
    if size < now {
        warn!(
            target,
            lun = new.id,
            size,
            now,
            "size lowered: the backing file is not shrunk (LUNs do not shrink while served)"
        );
    }
    Ok(Keep::Same)
}

fn prepare(
    old: &Live,
    new: Config,
    clustered: bool,
    metrics_bound: Option<SocketAddr>,
    hooks: &BindHooks,
    cluster: Option<&Arc<Registry>>,
) -> Result<Prepared, ReloadError> {
    let Some(old_cfg) = &old.config else {
        return Err(ReloadError::NoSource);
    };
    check_restart_only(old_cfg, &new, clustered)?;
    // The metrics endpoint's new address, bound before anything else.
    let (metrics, metrics_note) = plan_metrics(old_cfg, &new, metrics_bound)?;
    // Per-LU counters exactly when an endpoint exports them.
    let count_lus = new.metrics_addr.is_some();
    // Listen on new portals first: a busy address rejects the reload
    // before anything is created (the sockets close when dropped).
    let (portals, fresh) = plan_portals(old, old_cfg, &new)?;
    if clustered {
        check_peer_portals(old_cfg, &new)?;
    }
    let mut created = datadir::Created::default();
    match build(
        old,
        old_cfg,
        &new,
        &portals,
        count_lus,
        hooks,
        cluster,
        &mut created,
    ) {
        Ok((targets, lun_lists, grow, mut summary, ports_changed, joining)) => {
            // Grow last: it cannot be undone (the file stays larger, as
            // its configuration says, if a later one fails).
            let mut grown: Vec<Arc<LogicalUnit>> = Vec::new();
            for (name, lun, lu, size) in grow {
                if let Err(e) = lu.grow(size) {
                    created.undo();
                    // Those grown already report their new capacity.
                    for lu in &grown {
                        lu.queue_unit_attention(UaScope::All, asc::CAPACITY_DATA_HAS_CHANGED);
                    }
                    return Err(ReloadError::Invalid(format!(
                        "target '{name}' LUN {lun}: cannot grow to {size} bytes: {e}"
                    )));
                }
                grown.push(lu);
            }
            // Every listener with the (target, TPGT) pairs it serves now;
            // one serving none is closed at the commit.
            let mut listeners: Vec<ListenerInfo> = Vec::new();
            for (i, t) in targets.iter().enumerate() {
                let Some(t) = t else { continue };
                for p in &t.portals {
                    match listeners.iter_mut().find(|l| l.addr == p.addr) {
                        Some(l) => l.groups.push((i, p.tpgt)),
                        None => listeners.push(ListenerInfo {
                            addr: p.addr,
                            groups: vec![(i, p.tpgt)],
                        }),
                    }
                }
            }
            if let Some(n) = metrics_note {
                if !summary.is_empty() {
                    summary.push_str("; ");
                }
                summary.push_str(&n);
            }
            if summary.is_empty() {
                summary = "no change".into();
            }
            Ok(Prepared {
                live: Live {
                    generation: old.generation + 1,
                    targets,
                    limits: new.limits.clone(),
                    discovery_chap: new.discovery_chap.clone(),
                    listeners,
                    config: Some(new),
                },
                lun_lists,
                grown,
                summary,
                fresh,
                ports_changed,
                metrics,
                joining,
                created,
            })
        }
        Err(e) => {
            created.undo();
            Err(e)
        }
    }
}

type Built = (
    Vec<Option<Arc<TargetRt>>>,
    Vec<(Arc<TargetLuns>, Vec<u64>)>,
    Vec<(String, u16, Arc<LogicalUnit>, u64)>,
    String,
    Vec<usize>,
    Vec<Followed>,
);

#[allow(clippy::too_many_arguments)]
fn build(
    old: &Live,
    old_cfg: &Config,
    new: &Config,
    new_portals: &BTreeMap<String, Vec<Portal>>,
    count_lus: bool,
    hooks: &BindHooks,
    cluster: Option<&Arc<Registry>>,
    created: &mut datadir::Created,
) -> Result<Built, ReloadError> {
    let mut summary = String::new();
    let mut note = |s: String| {
        if !summary.is_empty() {
            summary.push_str("; ");
        }
        summary.push_str(&s);
    };
    let mut targets: Vec<Option<Arc<TargetRt>>> = vec![None; old.targets.len()];
    let mut lun_lists = Vec::new();
    let mut grow = Vec::new();
    let mut ports_changed = Vec::new();
    let mut joining = Vec::new();
    let err = |e: super::ServerError| ReloadError::Invalid(e.to_string());
    // Cluster mode: the other gateways' portal groups; when they changed,
    // every LU's target ports do.
    let peers = super::peer_portals(new);
    let old_peers = super::peer_portals(old_cfg);
    for (gw, p) in peers.iter().filter(|x| !old_peers.contains(x)) {
        note(format!(
            "gateway {gw} portal {} (TPGT {}) added",
            p.addr, p.tpgt
        ));
    }
    for (gw, p) in old_peers.iter().filter(|x| !peers.contains(x)) {
        note(format!(
            "gateway {gw} portal {} (TPGT {}) removed",
            p.addr, p.tpgt
        ));
    }
    for tc in &new.targets {
        let existing = old.target_by_name(&tc.name);
        let portals = new_portals
            .get(&tc.name.to_ascii_lowercase())
            .cloned()
            .unwrap_or_default();
        let (idx, lun_list, old_luns, old_tc) = match existing {
            Some(i) => {
                let rt = old.target(i).expect("index of a served target");
                if rt.portals != portals || rt.peer_portals != peers {
                    ports_changed.push(i);
                }
                if rt.portals != portals {
                    for p in portals.iter().filter(|p| !rt.portals.contains(p)) {
                        note(format!(
                            "{} portal {} (TPGT {}) added",
                            tc.name, p.addr, p.tpgt
                        ));
                    }
                    for p in rt.portals.iter().filter(|p| !portals.contains(p)) {
                        note(format!(
                            "{} portal {} (TPGT {}) removed",
                            tc.name, p.addr, p.tpgt
                        ));
                    }
                }
                (i, rt.lun_list.clone(), Some(rt), find(old_cfg, &tc.name))
            }
            None => {
                targets.push(None);
                note(format!("target {} added", tc.name));
                (
                    targets.len() - 1,
                    Arc::new(TargetLuns::new(Vec::new())),
                    None,
                    None,
                )
            }
        };
        let mut luns = BTreeMap::new();
        let mut backing = BTreeMap::new();
        for lc in &tc.luns {
            let lun = u64::from(lc.id);
            let prev = old_luns.and_then(|rt| {
                let lu = rt.luns.get(&lun)?;
                let olc = old_tc?.luns.iter().find(|l| l.id == lc.id)?;
                Some((lu, olc, rt.backing.get(&lun).cloned().unwrap_or_default()))
            });
            let keep = match &prev {
                Some((lu, olc, _)) => Some(compare_lun(&new.data_dir, &tc.name, olc, lc, lu)?),
                None => None,
            };
            match (prev, keep) {
                (Some((lu, _, desc)), Some(Keep::Same)) => {
                    luns.insert(lun, lu.clone());
                    backing.insert(lun, desc);
                }
                (Some((lu, _, desc)), Some(Keep::Grow(size))) => {
                    note(format!("{} LUN {lun} grows to {size} bytes", tc.name));
                    grow.push((tc.name.clone(), lc.id, lu.clone(), size));
                    luns.insert(lun, lu.clone());
                    backing.insert(lun, desc);
                }
                _ => {
                    // Cluster mode: its state is the cluster's; it is
                    // followed (read, installed, acknowledged) before the
                    // reload publishes it.
                    let shared_pr = match cluster {
                        None => None,
                        Some(reg) => {
                            let id =
                                keyfence_cluster::LuId::for_lun(&tc.name, lun).map_err(|e| {
                                    ReloadError::Invalid(format!(
                                        "target '{}' LUN {lun}: {e}",
                                        tc.name
                                    ))
                                })?;
                            let st: Arc<dyn keyfence_lu::reservation::SharedPrState> =
                                Arc::new(EtcdPrState::new(
                                    reg.membership.clone(),
                                    id.clone(),
                                    tokio::runtime::Handle::current(),
                                ));
                            Some((id, st))
                        }
                    };
                    let (lu, desc) = open_lu(
                        &new.data_dir,
                        &tc.name,
                        lc,
                        &portals,
                        &peers,
                        &lun_list,
                        shared_pr.as_ref().map(|(_, st)| st.clone()),
                        hooks,
                        created,
                    )
                    .map_err(err)?;
                    if existing.is_some() {
                        note(format!("{} LUN {lun} added", tc.name));
                    }
                    if let Some((id, _)) = shared_pr {
                        let tpgts = portals.iter().map(|p| p.tpgt).collect();
                        joining.push(Followed::new(idx, lu.clone(), id, tpgts));
                    }
                    luns.insert(lun, lu);
                    backing.insert(lun, desc);
                }
            }
        }
        if let Some(rt) = old_luns {
            for lun in rt.luns.keys().filter(|l| !luns.contains_key(l)) {
                note(format!("{} LUN {lun} removed", tc.name));
            }
            if old_tc.is_some_and(|o| o.acls != tc.acls || o.open != tc.open) {
                note(format!("{} ACL changed", tc.name));
            }
            if old_tc.is_some_and(|o| o.chap != tc.chap) {
                note(format!("{} CHAP changed", tc.name));
            }
        }
        lun_lists.push((lun_list.clone(), luns.keys().copied().collect()));
        // Kept LUs keep their counters; new ones start at zero and are
        // exported from the commit on.
        let stats = luns
            .iter()
            .filter(|_| count_lus)
            .map(|(lun, lu)| {
                let kept = old_luns.and_then(|rt| {
                    rt.luns
                        .get(lun)
                        .filter(|old| Arc::ptr_eq(old, lu))
                        .and(rt.stats.get(lun).cloned())
                });
                (*lun, kept.unwrap_or_default())
            })
            .collect();
        targets[idx] = Some(Arc::new(TargetRt {
            name: tc.name.clone(),
            portals,
            peer_portals: peers.clone(),
            luns,
            lun_list,
            backing,
            chap: tc.chap.clone(),
            acl: acl::AclTable::new(tc),
            stats,
        }));
    }
    for (_, t) in old.targets() {
        if find(new, &t.name).is_none() {
            note(format!("target {} removed", t.name));
        }
    }
    if old_cfg.limits != new.limits {
        note("limits changed".into());
    }
    if old_cfg.discovery_chap != new.discovery_chap {
        note("discovery CHAP changed".into());
    }
    Ok((targets, lun_lists, grow, summary, ports_changed, joining))
}
