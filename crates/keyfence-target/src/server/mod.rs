//! The tokio shell of the iSCSI target: one listener per portal, one task
//! per connection, a session table for TSIH assignment and session
//! reinstatement, connection limits and graceful shutdown.
//!
//! Protocol logic lives in the sans-IO crates: `keyfence_iscsi` decodes and
//! encodes PDUs, runs login negotiation and holds the command window and
//! Data-Out/R2T rules, [`keyfence_lu`] executes SCSI commands. The session
//! state RFC 7143 gives the target at ERL 0 (command numbering, data
//! transfer bookkeeping, task management, NOP pings) lives in `ffp`,
//! without sockets: `conn` drives it over TCP, `harness` in memory.

mod acl;
pub mod admin;
mod admission;
mod budget;
mod cluster;
mod conn;
mod datadir;
mod ffp;
pub mod harness;
mod iopool;
mod login;
pub mod metrics;
mod metrics_http;
mod reload;
mod session;
mod wire;

pub use datadir::LOCK_FILE;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use keyfence_scsi::TargetPort;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::config::{Backing, ChapConfig, Config, Limits, LunConfig};
use keyfence_lu::backend::{BackendError, BlockBackend, FileBackend};
use keyfence_lu::reservation::FileStore;
use keyfence_lu::{LogicalUnit, LuConfig, LuError, TargetLuns};
use keyfence_pr::PrStore;

pub use reload::{ReloadError, Reloader};
pub(crate) use session::SessionTable;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {err}")]
    Bind {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("target {target} LUN {lun}: {err}")]
    Backend {
        target: String,
        lun: u64,
        err: BackendError,
    },
    #[error("target {target} LUN {lun}: {err}")]
    Lu {
        target: String,
        lun: u64,
        err: LuError,
    },
    #[error(
        "data directory {} is in use by another keyfence serve{}; stop it or use another data directory",
        .dir.display(),
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    DataDirInUse {
        dir: std::path::PathBuf,
        pid: Option<u32>,
    },
    #[error("cannot create directory for {path}: {err}")]
    DataDir {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
    #[error("cannot listen for metrics on {addr}: {err}")]
    MetricsBind {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("cluster: {0}")]
    Cluster(#[from] keyfence_cluster::Error),
    #[error("admin socket {}: {err}", .path.display())]
    AdminSocket {
        path: std::path::PathBuf,
        err: String,
    },
    #[error("flushing target {target} LUN {lun} failed: {err}")]
    Flush {
        target: String,
        lun: u64,
        err: std::io::Error,
    },
}

/// One portal group of a target as it is actually bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Portal {
    pub tpgt: u16,
    pub addr: SocketAddr,
}

/// A target at run time.
#[derive(Debug)]
pub(crate) struct TargetRt {
    /// The name as configured.
    pub name: String,
    /// Portal groups in TPGT order.
    pub portals: Vec<Portal>,
    /// Cluster mode: the other gateways' portal groups
    /// (`[[cluster.gateways]]`) as (gateway name, portal), in TPGT order.
    /// SendTargets lists them after this gateway's own.
    pub peer_portals: Vec<(String, Portal)>,
    pub luns: BTreeMap<u64, Arc<LogicalUnit>>,
    pub lun_list: Arc<TargetLuns>,
    /// What each LUN is stored on, for `describe`.
    pub backing: BTreeMap<u64, String>,
    /// CHAP normal sessions must pass (secrets redacted in `Debug`).
    pub chap: Option<ChapConfig>,
    /// Which initiators may log in and what each sees.
    pub acl: acl::AclTable,
    /// The counters of each LU (same keys as `luns`); empty when nothing
    /// reads them ([`metrics::Metrics::counts_lus`]).
    pub stats: BTreeMap<u64, Arc<metrics::LuStats>>,
}

impl TargetRt {
    pub fn target_port(&self, tpgt: u16) -> TargetPort {
        TargetPort::new(&self.name, tpgt, tpgt)
    }
}

/// What the server serves under one configuration: replaced as a whole
/// by a reload ([`reload`]). Logins and the admin socket read the current
/// one; a session keeps its own target's [`TargetRt`] and is handed the
/// new one when a reload changes it, so the I/O path reads no shared
/// state at all.
#[derive(Debug)]
pub(crate) struct Live {
    /// Counts reloads applied (0: the configuration started with).
    pub generation: u64,
    /// Targets by index. An index always names the same target (by
    /// name): a removed target leaves `None`, an added one is appended
    /// (or takes back its old index), so session keys stay valid.
    pub targets: Vec<Option<Arc<TargetRt>>>,
    pub limits: Limits,
    /// CHAP discovery sessions must pass.
    pub discovery_chap: Option<ChapConfig>,
    /// The bound listeners with the (target, TPGT) each serves.
    pub listeners: Vec<ListenerInfo>,
    /// The configuration this was built from (for the next reload's
    /// diff); `None` for the in-memory harness.
    pub config: Option<Config>,
}

impl Live {
    pub fn target(&self, i: usize) -> Option<&Arc<TargetRt>> {
        self.targets.get(i).and_then(Option::as_ref)
    }

    /// The targets served now, with their indexes.
    pub fn targets(&self) -> impl Iterator<Item = (usize, &Arc<TargetRt>)> {
        self.targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (i, t)))
    }

    pub fn target_by_name(&self, name: &str) -> Option<usize> {
        self.targets()
            .find(|(_, t)| t.name.eq_ignore_ascii_case(name))
            .map(|(i, _)| i)
    }

    /// The (target, TPGT) pairs served on the listener bound to `addr`.
    pub fn groups_at(&self, addr: SocketAddr) -> &[(usize, u16)] {
        self.listeners
            .iter()
            .find(|l| l.addr == addr)
            .map(|l| l.groups.as_slice())
            .unwrap_or(&[])
    }
}

/// State shared by every task of the server. Nothing here is locked on the
/// I/O path: the session table is touched at login, logout and resets only.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Targets, limits and CHAP as configured now.
    pub live: ArcSwap<Live>,
    pub sessions: std::sync::Mutex<SessionTable>,
    pub connections: Arc<Semaphore>,
    pub shutdown: watch::Receiver<bool>,
    /// Write data held by all sessions (`limits.max_buffered_bytes`).
    pub buffers: Arc<budget::Budget>,
    pub metrics: Arc<metrics::Metrics>,
    /// When the server was bound (for `keyfence status`).
    pub started: std::time::Instant,
    /// Cluster mode.
    pub clustered: bool,
    /// Cluster mode: the clustered LUs served here and their followers
    /// (a reload adds and removes LUs).
    pub cluster: Option<Arc<cluster::Registry>>,
    /// Serialises reloads.
    pub reload_lock: tokio::sync::Mutex<()>,
    /// Where reloads read the configuration from, if anywhere.
    pub reloader: reload::Source,
    /// Applied to the LUs a reload opens, as to those opened at bind.
    pub hooks: BindHooks,
    /// The listening sockets and their accept loops (a reload adds and
    /// removes portals).
    pub acceptors: std::sync::Mutex<Acceptors>,
}

impl Shared {
    /// The configuration in force now.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    pub fn sessions(&self) -> std::sync::MutexGuard<'_, SessionTable> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn acceptors(&self) -> std::sync::MutexGuard<'_, Acceptors> {
        self.acceptors.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The bound listeners: those not yet accepting (before [`Server::run`])
/// and the accept loop of each one that is.
#[derive(Default)]
pub(crate) struct Acceptors {
    /// While the server runs: what an accept loop is started with.
    running: Option<(Arc<admission::Admission>, mpsc::Sender<()>)>,
    pending: Vec<TcpListener>,
    loops: BTreeMap<SocketAddr, (watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    /// The `GET /metrics` endpoint, when configured: bound and waiting
    /// for [`Server::run`], or served.
    metrics: Option<MetricsListener>,
}

/// The metrics endpoint's socket before and while it is served.
#[derive(Debug)]
pub(crate) enum MetricsListener {
    Bound(std::net::TcpListener, SocketAddr),
    Serving(metrics_http::Endpoint),
}

impl MetricsListener {
    pub fn addr(&self) -> SocketAddr {
        match self {
            MetricsListener::Bound(_, a) => *a,
            MetricsListener::Serving(e) => e.addr(),
        }
    }
}

impl std::fmt::Debug for Acceptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptors")
            .field("running", &self.running.is_some())
            .field("pending", &self.pending.len())
            .field("accepting", &self.loops.keys().collect::<Vec<_>>())
            .field("metrics", &self.metrics_addr())
            .finish()
    }
}

impl Acceptors {
    /// Accept on `l` (bound to `addr`): now if the server runs, else
    /// once it does.
    pub fn add(&mut self, shared: &Arc<Shared>, l: TcpListener, addr: SocketAddr) {
        let Some((admission, done)) = &self.running else {
            self.pending.push(l);
            return;
        };
        info!(%addr, "listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            shared.clone(),
            admission.clone(),
            l,
            addr,
            stop_rx,
            done.clone(),
        ));
        self.loops.insert(addr, (stop_tx, task));
    }

    /// Stop accepting on `addr`; the returned task ends (closing the
    /// socket) promptly. Connections accepted on it are not touched.
    pub fn remove(&mut self, addr: SocketAddr) -> Option<tokio::task::JoinHandle<()>> {
        self.pending
            .retain(|l| l.local_addr().map_or(true, |a| a != addr));
        let (stop, task) = self.loops.remove(&addr)?;
        let _ = stop.send(true);
        Some(task)
    }

    /// Where `GET /metrics` is served (or will be, once the server runs).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsListener::addr)
    }

    /// Replace the metrics endpoint by `new` (None: no endpoint). A bound
    /// socket is served at once if the server runs. Returns the old
    /// endpoint's thread, stopping, to be joined.
    pub fn replace_metrics(
        &mut self,
        shared: &Shared,
        new: Option<MetricsListener>,
    ) -> Option<std::thread::JoinHandle<()>> {
        let new = match new {
            Some(MetricsListener::Bound(l, addr)) if self.running.is_some() => {
                match metrics_http::Endpoint::start(
                    l,
                    addr,
                    shared.metrics.clone(),
                    shared.shutdown.clone(),
                ) {
                    Ok(e) => {
                        info!(%addr, "serving metrics at /metrics");
                        Some(MetricsListener::Serving(e))
                    }
                    Err(e) => {
                        warn!(%addr, "metrics endpoint not started: {e}");
                        None
                    }
                }
            }
            other => other,
        };
        match std::mem::replace(&mut self.metrics, new) {
            Some(MetricsListener::Serving(e)) => {
                info!(addr = %e.addr(), "metrics endpoint stopped");
                e.stop()
            }
            _ => None,
        }
    }

    /// The admission control of the accept loops, once the server runs.
    pub fn admission(&self) -> Option<&Arc<admission::Admission>> {
        self.running.as_ref().map(|(a, _)| a)
    }

    /// Start accepting on every pending listener.
    fn start(
        &mut self,
        shared: &Arc<Shared>,
        admission: Arc<admission::Admission>,
        done: mpsc::Sender<()>,
    ) {
        self.running = Some((admission, done));
        for l in std::mem::take(&mut self.pending) {
            if let Ok(addr) = l.local_addr() {
                self.add(shared, l, addr);
            }
        }
    }
}

/// What a listener serves: the targets reachable through it and the TPGT
/// each of them gives this address.
#[derive(Debug, Clone)]
pub(crate) struct ListenerInfo {
    pub addr: SocketAddr,
    pub groups: Vec<(usize, u16)>,
}

/// Wraps a logical unit's backend (target name, LUN, the opened backend):
/// see [`Server::bind_with_hooks`].
pub type BackendHook =
    Arc<dyn Fn(&str, u64, Arc<dyn BlockBackend>) -> Arc<dyn BlockBackend> + Send + Sync>;
/// Wraps a logical unit's APTPL state store (target name, LUN, the file
/// store); not used in cluster mode.
pub type PrStoreHook = Arc<dyn Fn(&str, u64, Arc<dyn PrStore>) -> Arc<dyn PrStore> + Send + Sync>;

/// What [`Server::bind_with_hooks`] passes each LU's parts through.
#[derive(Default, Clone)]
pub struct BindHooks {
    pub backend: Option<BackendHook>,
    pub pr_store: Option<PrStoreHook>,
}

impl std::fmt::Debug for BindHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindHooks")
            .field("backend", &self.backend.is_some())
            .field("pr_store", &self.pr_store.is_some())
            .finish()
    }
}

/// A bound, not yet running, iSCSI target server.
pub struct Server {
    shared: Arc<Shared>,
    admin: Option<admin::AdminSocket>,
    shutdown_tx: watch::Sender<bool>,
    /// Held until the server has stopped and flushed.
    data_dir_lock: datadir::DataDirLock,
    /// Cluster mode: this gateway's membership (dropping it stops the
    /// keep-alives and fences the gateway).
    cluster: Option<Arc<cluster::Membership>>,
}

impl Server {
    /// Open every LUN (creating missing backing files sparse) and bind
    /// every portal. Port 0 binds an ephemeral port; [`Server::portals`]
    /// tells which.
    ///
    /// The data directory is created when missing and locked
    /// ([`LOCK_FILE`], holding this process's pid) for the server's
    /// lifetime; every backing file is locked too. A second server on the
    /// same data directory or file fails with an error naming the holder's
    /// pid. A start that fails removes the directories and files it
    /// created (directories only when empty).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        Self::bind_with_hooks(config, BindHooks::default()).await
    }

    /// [`Server::bind`], with each LU's backend and APTPL store passed
    /// through `hooks` before the LU is built: for instrumentation and for
    /// tests that need a slow or failing device or store.
    pub async fn bind_with_hooks(config: Config, hooks: BindHooks) -> Result<Server, ServerError> {
        let mut created = datadir::Created::default();
        match Self::bind_inner(config, &mut created, &hooks).await {
            Ok(s) => Ok(s),
            Err(e) => {
                created.undo();
                Err(e)
            }
        }
    }

    async fn bind_inner(
        config: Config,
        created: &mut datadir::Created,
        hooks: &BindHooks,
    ) -> Result<Server, ServerError> {
        // Bind first: SendTargets and the LUs' target ports need the real
        // addresses. Nothing is created on disk before this succeeds.
        let mut listeners: Vec<(TcpListener, ListenerInfo)> = Vec::new();
        let mut portals: Vec<Vec<Portal>> = vec![Vec::new(); config.targets.len()];
        for (want, groups) in listener_plan(&config) {
            let l = TcpListener::bind(want)
                .await
                .map_err(|err| ServerError::Bind { addr: want, err })?;
            let addr = l
                .local_addr()
                .map_err(|err| ServerError::Bind { addr: want, err })?;
            for &(t, tpgt) in &groups {
                portals[t].push(Portal { tpgt, addr });
            }
            listeners.push((l, ListenerInfo { addr, groups }));
        }
        let metrics_listener = match config.metrics_addr {
            None => None,
            Some(want) => {
                let err = |err| ServerError::MetricsBind { addr: want, err };
                let l = std::net::TcpListener::bind(want).map_err(err)?;
                let addr = l.local_addr().map_err(err)?;
                Some((l, addr))
            }
        };
        created
            .create_dir_all(&config.data_dir)
            .map_err(|err| ServerError::DataDir {
                path: config.data_dir.clone(),
                err,
            })?;
        let data_dir_lock = datadir::DataDirLock::acquire(&config.data_dir, created)?;
        // Cluster mode: join (register this gateway and its portal groups
        // under a lease) before the first read of any LU's state.
        let membership = match &config.cluster {
            None => None,
            Some(cc) => {
                let c = keyfence_cluster::Cluster::connect(cc).await?;
                let groups = cluster::portal_groups(
                    &portals
                        .iter()
                        .flatten()
                        .map(|p| (p.tpgt, p.addr.to_string()))
                        .collect(),
                );
                Some(
                    cluster::Membership::join(c, groups, cc.lease_ttl(), cc.safety_margin())
                        .await?,
                )
            }
        };
        let peers = peer_portals(&config);
        // Per-LU counters only when an endpoint exports them.
        let count_lus = config.metrics_addr.is_some();
        let mut follow = Vec::new();
        let mut targets = Vec::with_capacity(config.targets.len());
        for (tc, mut tportals) in config.targets.iter().zip(portals) {
            tportals.sort_by_key(|p| p.tpgt);
            let lun_list = Arc::new(TargetLuns::new(
                tc.luns.iter().map(|l| u64::from(l.id)).collect(),
            ));
            let mut luns = BTreeMap::new();
            let mut stats = BTreeMap::new();
            let mut backing_desc = BTreeMap::new();
            for lc in &tc.luns {
                let lun = u64::from(lc.id);
                let shared_pr: Option<Arc<dyn keyfence_lu::reservation::SharedPrState>> =
                    match &membership {
                        Some(m) => {
                            let id = keyfence_cluster::LuId::for_lun(&tc.name, lun)?;
                            let st = Arc::new(cluster::EtcdPrState::new(
                                m.clone(),
                                id.clone(),
                                tokio::runtime::Handle::current(),
                            ));
                            follow.push((targets.len(), lun, id));
                            Some(st)
                        }
                        None => None,
                    };
                let (lu, desc) = open_lu(
                    &config.data_dir,
                    &tc.name,
                    lc,
                    &tportals,
                    &peers,
                    &lun_list,
                    shared_pr,
                    hooks,
                    created,
                )?;
                luns.insert(lun, lu);
                if count_lus {
                    stats.insert(lun, Arc::new(metrics::LuStats::default()));
                }
                backing_desc.insert(lun, desc);
            }
            targets.push(Some(Arc::new(TargetRt {
                name: tc.name.clone(),
                portals: tportals,
                peer_portals: peers.clone(),
                luns,
                lun_list,
                backing: backing_desc,
                chap: tc.chap.clone(),
                acl: acl::AclTable::new(tc),
                stats,
            })));
        }
        let metrics = Arc::new(metrics::Metrics::new(count_lus));
        publish_lu_metrics(&metrics, &targets);
        let admin = match admin::AdminSocket::bind(&config.admin_socket_path()) {
            Ok(a) => a,
            Err(err) => {
                return Err(ServerError::AdminSocket {
                    path: config.admin_socket_path(),
                    err,
                })
            }
        };
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let live = Live {
            generation: 0,
            targets,
            limits: config.limits.clone(),
            discovery_chap: config.discovery_chap.clone(),
            listeners: listeners.iter().map(|(_, i)| i.clone()).collect(),
            config: Some(config),
        };
        let shared = Arc::new(Shared {
            connections: Arc::new(Semaphore::new(live.limits.max_connections as usize)),
            sessions: std::sync::Mutex::new(SessionTable::new(live.limits.max_sessions)),
            buffers: budget::Budget::new(live.limits.max_buffered_bytes.0),
            shutdown: shutdown_rx,
            metrics,
            started: std::time::Instant::now(),
            clustered: membership.is_some(),
            cluster: membership
                .as_ref()
                .map(|m| cluster::Registry::new(m.clone())),
            reload_lock: tokio::sync::Mutex::new(()),
            reloader: reload::Source::default(),
            hooks: hooks.clone(),
            live: ArcSwap::from_pointee(live),
            acceptors: std::sync::Mutex::new(Acceptors {
                pending: listeners.into_iter().map(|(l, _)| l).collect(),
                metrics: metrics_listener.map(|(l, a)| MetricsListener::Bound(l, a)),
                ..Default::default()
            }),
        });
        if let Some(registry) = &shared.cluster {
            let live = shared.live();
            for (t, lun, id) in follow {
                let Some(target) = live.target(t) else {
                    continue;
                };
                let Some(lu) = target.luns.get(&lun) else {
                    continue;
                };
                let tpgts = target.portals.iter().map(|p| p.tpgt).collect();
                // Followed once the supervisor starts.
                if let Err(e) =
                    registry.add(&shared, cluster::Followed::new(t, lu.clone(), id, tpgts))
                {
                    warn!("{e}");
                }
            }
            tokio::spawn(cluster::supervise(shared.clone(), registry.clone()));
        }
        Ok(Server {
            cluster: membership,
            shared,
            admin: Some(admin),
            shutdown_tx,
            data_dir_lock,
        })
    }

    /// Where `GET /metrics` is served, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.shared.acceptors().metrics_addr()
    }

    /// The metrics as `GET /metrics` returns them (Prometheus text). The
    /// per-LU families are counted only when a metrics address is
    /// configured.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.encode()
    }

    /// Re-read the configuration from `source` on `keyfence reload` (the
    /// admin socket) and on [`ReloadHandle::reload`]. Without one, a
    /// reload is refused.
    pub fn set_reload_source(&self, source: Reloader) {
        self.shared.reloader.set(source);
    }

    /// A handle that applies a new configuration to the running server.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            shared: self.shared.clone(),
        }
    }

    /// The admin socket's path.
    pub fn admin_socket(&self) -> Option<&std::path::Path> {
        self.admin.as_ref().map(|a| a.path())
    }

    /// Every target with its portal groups as bound.
    pub fn portals(&self) -> Vec<(String, Vec<Portal>)> {
        self.shared
            .live()
            .targets()
            .map(|(_, t)| (t.name.clone(), t.portals.clone()))
            .collect()
    }

    /// A human-readable account of what is served.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if let Some(a) = self.metrics_addr() {
            let _ = writeln!(s, "metrics on http://{a}/metrics");
        }
        let live = self.shared.live();
        if let Some(c) = &live.discovery_chap {
            let _ = writeln!(s, "discovery sessions require CHAP (user {})", c.user);
        }
        for (_, t) in live.targets() {
            let _ = writeln!(s, "target {}", t.name);
            for p in &t.portals {
                let _ = writeln!(s, "  portal {} (TPGT {})", p.addr, p.tpgt);
            }
            for (gw, p) in &t.peer_portals {
                let _ = writeln!(s, "  gateway {gw}: portal {} (TPGT {})", p.addr, p.tpgt);
            }
            if let Some(c) = &t.chap {
                let _ = writeln!(
                    s,
                    "  CHAP required (user {}{})",
                    c.user,
                    match &c.mutual_user {
                        Some(m) => format!(", mutual as {m}"),
                        None => String::new(),
                    }
                );
            }
            if t.acl.is_open() {
                let _ = writeln!(s, "  open to any initiator");
            } else {
                let _ = writeln!(s, "  {} initiator ACL entries", t.acl.len());
            }
            for (lun, lu) in &t.luns {
                let bs = u64::from(lu.config().block_size);
                let bytes = lu.block_count().saturating_mul(bs);
                let _ = writeln!(
                    s,
                    "  LUN {lun}: {} ({bytes} bytes, {} x {bs}-byte blocks{}), {}",
                    human_size(bytes),
                    lu.block_count(),
                    if lu.config().read_only {
                        ", read-only"
                    } else {
                        ""
                    },
                    t.backing.get(lun).map(String::as_str).unwrap_or("?"),
                );
            }
        }
        if let Some(a) = &self.admin {
            let _ = writeln!(s, "admin socket {}", a.path().display());
        }
        s
    }

    /// Serve until `shutdown` resolves; then stop accepting, let every
    /// connection finish the commands it is executing, flush every
    /// backend and return.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let Server {
            shared,
            admin,
            shutdown_tx,
            data_dir_lock,
            cluster: membership,
        } = self;
        // Scrapes run on a thread of their own, never on the runtime's
        // workers that serve sessions.
        {
            let mut acc = shared.acceptors();
            if let Some(MetricsListener::Bound(l, addr)) = acc.metrics.take() {
                let e = metrics_http::Endpoint::start(
                    l,
                    addr,
                    shared.metrics.clone(),
                    shared.shutdown.clone(),
                )
                .map_err(|err| ServerError::MetricsBind { addr, err })?;
                info!(%addr, "serving metrics at /metrics");
                acc.metrics = Some(MetricsListener::Serving(e));
            }
        }
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let admin_task = admin.map(|a| tokio::spawn(a.serve(shared.clone())));
        {
            // Under the acceptors' lock: a reload that publishes new
            // limits either comes before (and they are read here) or
            // finds the admission running and changes its limits.
            let mut acc = shared.acceptors();
            let admission = admission::Admission::new(&shared.live().limits);
            acc.start(&shared, admission, done_tx.clone());
        }
        drop(done_tx);
        tokio::spawn(trim_when_idle(shared.shutdown.clone()));
        shutdown.await;
        info!("shutting down: no new connections; finishing commands in flight");
        let _ = shutdown_tx.send(true);
        // A reload starts no accept loop from now on.
        let metrics_thread = {
            let mut acc = shared.acceptors();
            acc.running = None;
            acc.replace_metrics(&shared, None)
        };
        // Every accept loop and connection task holds a sender.
        if tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
            .await
            .is_err()
        {
            warn!("connections still open after 30 s; flushing anyway");
        }
        if let Some(t) = admin_task {
            // The socket file is removed when the task's listener drops.
            let _ = t.await;
        }
        let flushed = flush_all(&shared).await;
        if let Some(t) = metrics_thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        // Cluster mode: stop serving and revoke the lease, so the other
        // gateways need not wait out its TTL.
        if let Some(m) = membership {
            m.leave().await;
        }
        drop(data_dir_lock);
        flushed
    }
}

/// Tune the C allocator for the target's allocation pattern: every read
/// allocates its data-in buffer (often 128 KiB or more) and frees it once
/// sent. With glibc's defaults such buffers are served by mmap or the heap
/// top is trimmed after each burst, so every command pays page faults and
/// zeroing of fresh pages. Keeping them on the heap and untrimmed avoids
/// that (measured: about a fifth of the CPU time of 128 KiB reads).
/// Call once, early, from the program that runs the server.
///
/// The price is that memory freed after a burst stays with the process;
/// [`Server::run`] gives it back with `malloc_trim` once the process has
/// been idle for a moment (see [`IDLE_TRIM_CHECK`]), so the tuning helps
/// under load and RSS returns near its idle size afterwards.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called
    // before the runtime starts other threads that allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        // One arena: glibc's malloc_trim gives back the free pages and the
        // top of the main arena, but never shrinks the top chunk of the
        // per-thread arenas, where freed data-in buffers coalesce (tens of
        // MiB each, for good). Data-in buffers are few and large, so the
        // shared lock costs nothing measurable; small allocations are
        // served from the per-thread caches.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// How often the process's CPU use is sampled to decide it is idle.
pub const IDLE_TRIM_CHECK: Duration = Duration::from_secs(1);
/// CPU time (both user and system, in clock ticks of usually 10 ms) below
/// which an [`IDLE_TRIM_CHECK`] interval counts as idle.
const IDLE_TICKS: u64 = 3;

/// CPU time this process has used, in clock ticks (utime + stime).
fn process_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Give freed heap memory back to the system once the process is idle
/// after a busy period: the allocator keeps it (see [`tune_allocator`])
/// while commands run, and `malloc_trim` returns it to the kernel when one
/// [`IDLE_TRIM_CHECK`] interval passes with almost no CPU use. Ends at
/// shutdown.
async fn trim_when_idle(mut shutdown: watch::Receiver<bool>) {
    let Some(mut last) = process_cpu_ticks() else {
        return;
    };
    let mut busy_since_trim = false;
    let mut tick = tokio::time::interval(IDLE_TRIM_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let Some(now) = process_cpu_ticks() else {
            return;
        };
        let used = now.saturating_sub(last);
        last = now;
        if used >= IDLE_TICKS {
            busy_since_trim = true;
            continue;
        }
        if !busy_since_trim {
            continue;
        }
        // Memory may still be freed after the first quiet second (sessions
        // winding down): trim again on the next idle interval until a trim
        // finds nothing to release.
        let released = tokio::task::spawn_blocking(release_free_memory)
            .await
            .unwrap_or(false);
        busy_since_trim = released;
        debug!(released, "idle: returned free heap memory to the system");
        // The trim's own CPU time does not make the next interval busy.
        last = process_cpu_ticks().unwrap_or(last);
    }
}

/// `malloc_trim(0)`: release free memory of every arena; true when some
/// was released.
fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it
    // is thread safe and takes no pointers.
    unsafe {
        libc::malloc_trim(0) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

async fn flush_all(shared: &Arc<Shared>) -> Result<(), ServerError> {
    let s = shared.clone();
    tokio::task::spawn_blocking(move || {
        for (_, t) in s.live().targets() {
            for (lun, lu) in &t.luns {
                if lu.config().read_only {
                    continue;
                }
                lu.flush().map_err(|err| ServerError::Flush {
                    target: t.name.clone(),
                    lun: *lun,
                    err,
                })?;
                debug!(target = %t.name, lun, "flushed");
            }
        }
        info!("all logical units flushed");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| {
        Err(ServerError::Flush {
            target: String::new(),
            lun: 0,
            err: std::io::Error::other(e.to_string()),
        })
    })
}

/// Make the per-LU metric families list the LUs of `targets` (those
/// counted: see [`metrics::Metrics::counts_lus`]).
fn publish_lu_metrics(m: &metrics::Metrics, targets: &[Option<Arc<TargetRt>>]) {
    m.set_lus(targets.iter().flatten().flat_map(|t| {
        t.luns.iter().filter_map(|(lun, lu)| {
            Some(metrics::LuSource {
                target: &t.name,
                lun: *lun,
                stats: t.stats.get(lun)?.clone(),
                ua: lu.unit_attentions().clone(),
            })
        })
    }));
}

/// Open (creating a missing file sparse) the backing store of LUN `lc` of
/// target `target` and build its logical unit.
// Everything an LU is built from, at bind and at reload alike.
#[allow(clippy::too_many_arguments)]
fn open_lu(
    data_dir: &std::path::Path,
    target: &str,
    lc: &LunConfig,
    portals: &[Portal],
    peers: &[(String, Portal)],
    lun_list: &Arc<TargetLuns>,
    shared_pr: Option<Arc<dyn keyfence_lu::reservation::SharedPrState>>,
    hooks: &BindHooks,
    created: &mut datadir::Created,
) -> Result<(Arc<LogicalUnit>, String), ServerError> {
    let lun = u64::from(lc.id);
    let clustered = shared_pr.is_some();
    // A clustered LU is always uncached; a single-node one when asked.
    let open_store = |path: &std::path::Path, size| {
        if clustered {
            FileBackend::open_clustered(path, size, lc.read_only)
        } else if lc.direct {
            FileBackend::open_direct(path, size, lc.read_only)
        } else {
            FileBackend::open(path, size, lc.read_only)
        }
    };
    let backend_err = |err| ServerError::Backend {
        target: target.to_string(),
        lun,
        err,
    };
    let (backend, desc) = match lc.backing(data_dir) {
        Backing::File { path, size } => {
            if let Some(dir) = path.parent() {
                created
                    .create_dir_all(dir)
                    .map_err(|err| ServerError::DataDir {
                        path: path.clone(),
                        err,
                    })?;
            }
            let existed = path.exists();
            let b = open_store(&path, Some(size)).map_err(backend_err)?;
            if !existed {
                created.file(path.clone());
            }
            (b, format!("file {}", path.display()))
        }
        Backing::Device(path) => {
            let b = open_store(&path, None).map_err(backend_err)?;
            (b, format!("device {}", path.display()))
        }
    };
    backend
        .check_alignment(lc.block_size)
        .map_err(backend_err)?;
    let mut ports: Vec<TargetPort> = portals
        .iter()
        .chain(peers.iter().map(|(_, p)| p))
        .map(|p| TargetPort::new(target, p.tpgt, p.tpgt))
        .collect();
    ports.sort_by_key(|p| p.tpgt);
    let mut cfg = LuConfig::new(target, lun, ports, lun_list.clone());
    // APTPL persistent-reservation state lives under the data dir.
    cfg.pr_state_path = Some(keyfence_lu::reservation::state_path(data_dir, target, lun));
    if shared_pr.is_some() {
        cfg.pr_state_path = None;
        cfg.shared_pr = shared_pr;
    }
    cfg.block_size = lc.block_size;
    cfg.read_only = lc.read_only;
    if let Some(s) = &lc.serial {
        cfg.serial = s.clone();
    }
    if let Some(naa) = lc.naa_bytes().and_then(|v| <[u8; 16]>::try_from(v).ok()) {
        cfg.naa = naa;
    }
    let mut backend: Arc<dyn BlockBackend> = Arc::new(backend);
    if let Some(h) = &hooks.backend {
        backend = h(target, lun, backend);
    }
    if let (Some(h), Some(path), None) = (&hooks.pr_store, &cfg.pr_state_path, &cfg.shared_pr) {
        let file: Arc<dyn PrStore> = Arc::new(FileStore::new(path.clone(), target, lun));
        cfg.pr_store = Some(h(target, lun, file));
    }
    let lu = LogicalUnit::new(cfg, backend).map_err(|err| ServerError::Lu {
        target: target.to_string(),
        lun,
        err,
    })?;
    Ok((Arc::new(lu), desc))
}

/// Applies a new configuration to a running server (SIGHUP, `keyfence
/// reload`); see [`Server::set_reload_source`].
#[derive(Clone)]
pub struct ReloadHandle {
    shared: Arc<Shared>,
}

impl ReloadHandle {
    /// Read the configuration again and apply what changed. On error
    /// nothing changed; the message is one line.
    pub async fn reload(&self) -> Result<String, ReloadError> {
        reload::reload(&self.shared).await
    }
}

/// Cluster mode: the other gateways' portal groups
/// (`[[cluster.gateways]]`) in TPGT order. Every clustered LU is reached
/// through them too, so its target ports (ALL_TG_PT, READ FULL STATUS,
/// REPORT TARGET PORT GROUPS) include theirs.
fn peer_portals(config: &Config) -> Vec<(String, Portal)> {
    let mut peers: Vec<(String, Portal)> = config
        .cluster
        .iter()
        .flat_map(|c| c.gateways.iter().filter(move |g| g.name != c.gateway))
        .flat_map(|g| {
            g.portal_groups()
                .into_iter()
                .map(|(tpgt, addr)| (g.name.clone(), Portal { tpgt, addr }))
        })
        .collect();
    peers.sort_by_key(|(_, p)| p.tpgt);
    peers
}

/// Distinct addresses to bind, with (target index, TPGT) served on each.
/// Ephemeral (port 0) addresses are never shared.
fn listener_plan(config: &Config) -> Vec<(SocketAddr, Vec<(usize, u16)>)> {
    let mut out: Vec<(SocketAddr, Vec<(usize, u16)>)> = Vec::new();
    for (ti, t) in config.targets.iter().enumerate() {
        for (tpgt, addr) in t.portal_groups() {
            match out.iter_mut().find(|(a, _)| *a == addr && addr.port() != 0) {
                Some((_, v)) => v.push((ti, tpgt)),
                None => out.push((addr, vec![(ti, tpgt)])),
            }
        }
    }
    out
}

/// A byte count as people read it: `100 B`, `1.5 MiB`, `1.0 GiB`.
pub fn human_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Accept connections on `listener` (bound to `addr`) until shutdown or
/// until `stop` (a reload removed the portal).
async fn accept_loop(
    shared: Arc<Shared>,
    admission: Arc<admission::Admission>,
    listener: TcpListener,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let mut shutdown = shared.shutdown.clone();
    let info = Arc::new(ListenerInfo {
        addr,
        groups: Vec::new(),
    });
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = stop.wait_for(|s| *s) => break,
            r = listener.accept() => r,
        };
        let (sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(addr = %info.addr, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A login slot now; a place among logged-in connections
        // (`shared.connections`) once the login succeeds.
        let ticket = match admission.admit(peer.ip()) {
            Ok(t) => t,
            Err(why) => {
                shared.metrics.refused(match why {
                    admission::Refused::PerSource => metrics::Refusal::PerSource,
                    admission::Refused::Full => metrics::Refusal::LoginSlotsFull,
                });
                admission.log_refused.event(|| {
                    let limits = &shared.live().limits;
                    match why {
                        admission::Refused::PerSource => format!(
                            "{peer}: {} connections from {} already logging in",
                            limits.max_login_connections_per_source,
                            peer.ip()
                        ),
                        admission::Refused::Full => format!(
                            "{peer}: all {} login slots busy with logins in progress",
                            limits.max_login_connections
                        ),
                    }
                });
                drop(sock);
                continue;
            }
        };
        if let Err(e) = sock.set_nodelay(true) {
            debug!(%peer, "TCP_NODELAY: {e}");
        }
        let shared = shared.clone();
        let info = info.clone();
        let done = done.clone();
        tokio::spawn(admission::TICKET.scope(ticket, async move {
            let _open = metrics::GaugeGuard::new(&shared.metrics.connections);
            conn::serve_connection(shared, info, sock, peer).await;
            drop(done);
        }));
    }
    drop(listener);
    debug!(addr = %info.addr, "listener closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(1 << 30), "1.0 GiB");
        assert_eq!(human_size(100), "100 B");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
    }
}
