//! `keyfence_target::server::Server` inside the test process, for tests
//! that need a real target over TCP but not a separate process.
//!
//! The server runs on its own multi-threaded runtime owned by the fixture,
//! so the fixture can be started and dropped from plain `#[test]`s and from
//! inside `#[tokio::test]`s alike.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use keyfence_target::config::{ByteSize, ChapConfig, Config, Limits, LunConfig, TargetConfig};
use keyfence_target::server::{BindHooks, Portal, Server, ServerError};

/// How long binding and a graceful shutdown may take.
const LIMIT: Duration = Duration::from_secs(40);

/// One target with LUN 0 backed by `lun0.img` in a temporary data directory.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub iqn: String,
    /// Portal groups, each on `127.0.0.1:0`.
    pub portals: usize,
    /// Size of LUN 0 in bytes.
    pub size: u64,
    pub limits: Limits,
    /// CHAP the target's normal sessions must pass.
    pub chap: Option<ChapConfig>,
    /// CHAP discovery sessions must pass.
    pub discovery_chap: Option<ChapConfig>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            iqn: "iqn.2026-11.io.keyfence:test".into(),
            portals: 1,
            size: 16 << 20,
            limits: Limits::default(),
            chap: None,
            discovery_chap: None,
        }
    }
}

impl ServerOptions {
    /// The configuration these options describe, with `data_dir`.
    pub fn config(&self, data_dir: &Path) -> Config {
        let mut cfg = Config {
            data_dir: data_dir.to_path_buf(),
            limits: self.limits.clone(),
            discovery_chap: self.discovery_chap.clone(),
            admin_socket: None,
            targets: vec![TargetConfig {
                name: self.iqn.clone(),
                portals: vec!["127.0.0.1:0".to_string(); self.portals],
                luns: vec![LunConfig {
                    id: 0,
                    path: Some("lun0.img".into()),
                    device: None,
                    size: Some(ByteSize(self.size)),
                    block_size: 512,
                    read_only: false,
                    direct: false,
                    serial: None,
                    naa: None,
                }],
                chap: self.chap.clone(),
                open: true,
                acls: vec![],
                portal_addrs: vec![],
                first_tpgt: 1,
            }],
            cluster: None,
            metrics: None,
            metrics_addr: None,
        };
        cfg.validate().expect("test server configuration");
        cfg
    }
}

/// A running in-process server; shut down gracefully on drop.
pub struct InProcessServer {
    rt: Option<tokio::runtime::Runtime>,
    targets: Vec<(String, Vec<Portal>)>,
    describe: String,
    metrics: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<mpsc::Receiver<Result<(), ServerError>>>,
    data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl InProcessServer {
    /// Start with `opts` in a fresh temporary data directory.
    pub fn start(opts: ServerOptions) -> InProcessServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = opts.config(dir.path());
        let mut s = Self::from_config(cfg).unwrap_or_else(|e| panic!("start test server: {e}"));
        s._dir = Some(dir);
        s
    }

    /// Start from a complete configuration (its data directory is the
    /// caller's). Bind errors are returned, for callers that retry them.
    pub fn from_config(cfg: Config) -> Result<InProcessServer, ServerError> {
        Self::from_config_with_hooks(cfg, BindHooks::default())
    }

    /// Start with `opts`, every LU's backend and APTPL store passed
    /// through `hooks` (e.g. a device or store that is slow on demand).
    pub fn start_with_hooks(opts: ServerOptions, hooks: BindHooks) -> InProcessServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = opts.config(dir.path());
        let mut s = Self::from_config_with_hooks(cfg, hooks)
            .unwrap_or_else(|e| panic!("start test server: {e}"));
        s._dir = Some(dir);
        s
    }

    /// [`InProcessServer::from_config`] with hooks (see
    /// `Server::bind_with_hooks`).
    pub fn from_config_with_hooks(
        cfg: Config,
        hooks: BindHooks,
    ) -> Result<InProcessServer, ServerError> {
        let data_dir = cfg.data_dir.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-server")
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (bound_tx, bound_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        // Bind on the runtime too: `start` may be called inside another
        // runtime, where `block_on` is not allowed.
        rt.spawn(async move {
            match Server::bind_with_hooks(cfg, hooks).await {
                Ok(server) => {
                    let _ = bound_tx.send(Ok((
                        server.portals(),
                        server.describe(),
                        server.metrics_addr(),
                    )));
                    let r = server
                        .run(async move {
                            let _ = stop_rx.await;
                        })
                        .await;
                    let _ = done_tx.send(r);
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                }
            }
        });
        let (targets, describe, metrics) = match bound_rx.recv_timeout(LIMIT) {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                rt.shutdown_background();
                return Err(e);
            }
            Err(_) => panic!("test server did not bind within {LIMIT:?}"),
        };
        Ok(InProcessServer {
            rt: Some(rt),
            targets,
            describe,
            metrics,
            stop: Some(stop_tx),
            done: Some(done_rx),
            data_dir,
            _dir: None,
        })
    }

    /// Bound portal addresses of the first target, in TPGT order.
    pub fn portals(&self) -> Vec<SocketAddr> {
        self.targets[0].1.iter().map(|p| p.addr).collect()
    }

    /// Every target with its bound portals.
    pub fn targets(&self) -> &[(String, Vec<Portal>)] {
        &self.targets
    }

    /// What `keyfence serve` would print at start-up.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Where `GET /metrics` is served (when the configuration set
    /// `metrics_addr`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// Name of the first target.
    pub fn iqn(&self) -> &str {
        &self.targets[0].0
    }

    /// `iscsi://ADDR/IQN/0` through portal `i` (0-based) of the first target.
    pub fn url(&self, i: usize) -> String {
        format!("iscsi://{}/{}/0", self.targets[0].1[i].addr, self.iqn())
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The backing file of LUN 0 as [`ServerOptions`] creates it.
    pub fn image(&self) -> PathBuf {
        self.data_dir.join("lun0.img")
    }

    /// Run `f` to completion on the server's runtime (from sync tests only).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().expect("server runtime").block_on(f)
    }

    /// Stop as SIGTERM would and wait (bounded) for the server to finish;
    /// fails the test if it reports an error or does not stop in time.
    pub fn shutdown(&mut self) {
        if let Some(r) = self.stop_and_wait() {
            r.expect("test server stopped with an error");
        }
    }

    fn stop_and_wait(&mut self) -> Option<Result<(), ServerError>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let done = self.done.take()?;
        let r = done
            .recv_timeout(LIMIT)
            .unwrap_or_else(|_| panic!("test server did not stop within {LIMIT:?}"));
        Some(r)
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            match done.recv_timeout(LIMIT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) if !std::thread::panicking() => {
                    panic!("test server stopped with an error: {e}")
                }
                Err(_) if !std::thread::panicking() => {
                    panic!("test server did not stop within {LIMIT:?}")
                }
                _ => {}
            }
        }
        // Allowed inside another runtime, unlike dropping it.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
