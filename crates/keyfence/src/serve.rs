//! `keyfence serve`: run the iSCSI target.
//!
//! With no arguments it exports `iqn.2026-11.io.keyfence:default` on
//! 127.0.0.1:3260 with `./keyfence-data/lun0.img` (1 GiB, created sparse when
//! missing) as LUN 0. `--config FILE` describes several targets, portals
//! and LUNs instead. SIGINT or SIGTERM stops it cleanly: no new connections,
//! in-flight commands finish, backends are flushed, exit status 0. SIGHUP
//! (or `keyfence reload`) re-reads the --config file and applies what
//! changed; `keyfence status` reads the admin socket.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use keyfence_target::config::{
    ByteSize, Config, LunConfig, TargetConfig, DEFAULT_DATA_DIR, DEFAULT_LUN_SIZE, DEFAULT_PORTAL,
    DEFAULT_TARGET_NAME,
};
use keyfence_target::server::Server;

/// Run the keyfence iSCSI target. Without --config: one target with LUN 0
/// backed by DATA_DIR/lun0.img (created sparse when missing). SIGINT or
/// SIGTERM stops it after in-flight commands finish and data is flushed.
#[derive(Debug, Clone, Parser)]
#[command(name = "keyfence serve", version)]
struct Args {
    /// Listen on ADDR:PORT; repeat for more portal groups (TPGT 1, 2, ... in order)
    /// [default: 127.0.0.1:3260].
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    listen: Vec<String>,
    /// Directory holding backing files [default: ./keyfence-data].
    #[arg(long = "data-dir", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// iSCSI name of the exported target [default: iqn.2026-11.io.keyfence:default].
    #[arg(long = "target-name", value_name = "IQN")]
    target_name: Option<String>,
    /// Size of a backing file that has to be created: bytes, or 512M, 1G, ... [default: 1G].
    #[arg(
        long = "size",
        value_name = "BYTES",
        value_parser = parse_size,
        allow_hyphen_values = true
    )]
    size: Option<ByteSize>,
    /// TOML file describing targets, portals, LUNs and limits.
    #[arg(
        long = "config",
        value_name = "FILE",
        conflicts_with_all = ["listen", "target_name", "size"]
    )]
    config: Option<PathBuf>,
    /// Cluster mode: comma-separated etcd client URLs
    /// (http://127.0.0.1:2379,...); needs --gateway. Overrides [cluster]
    /// endpoints of --config.
    #[arg(long = "cluster", value_name = "ENDPOINTS", requires = "gateway")]
    cluster: Option<String>,
    /// Cluster mode: this gateway's name, unique among live gateways.
    #[arg(long = "gateway", value_name = "NAME", requires = "cluster")]
    gateway: Option<String>,
    /// TPGT of the first --listen portal [default: 1]; in cluster mode
    /// every gateway needs TPGTs of its own.
    #[arg(long = "first-tpgt", value_name = "N", conflicts_with = "config")]
    first_tpgt: Option<u16>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (port 0: a free
    /// port, printed at start). Overrides `metrics` of --config.
    #[arg(long = "metrics", value_name = "ADDR:PORT", value_parser = parse_metrics)]
    metrics: Option<std::net::SocketAddr>,
    /// Cluster mode: another gateway's portal groups, as
    /// NAME:FIRST_TPGT:ADDR[,ADDR...] (repeat per gateway). With it, this
    /// gateway's --listen portals must be real addresses (not port 0), and
    /// SendTargets, REPORT TARGET PORT GROUPS and ALL_TG_PT cover every
    /// gateway. In a --config file: [[cluster.gateways]].
    #[arg(
        long = "peer",
        value_name = "NAME:FIRST_TPGT:ADDRS",
        requires = "cluster",
        conflicts_with = "config",
        value_parser = parse_peer
    )]
    peers: Vec<keyfence_cluster::GatewayPortals>,
    /// Admin socket for `keyfence status` and `keyfence reload` (mode 0600)
    /// [default: DATA_DIR/keyfence.sock]. Overrides admin_socket of --config.
    #[arg(long = "admin-socket", value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace or a tracing directive);
    /// RUST_LOG is used when this is not given.
    #[arg(long = "log-level", value_name = "LEVEL")]
    log_level: Option<String>,
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse()
}

fn parse_metrics(s: &str) -> Result<std::net::SocketAddr, String> {
    keyfence_target::config::parse_metrics_addr(s)
}

/// `NAME:FIRST_TPGT:ADDR[,ADDR...]` (the addresses are checked with the
/// rest of the cluster configuration).
fn parse_peer(s: &str) -> Result<keyfence_cluster::GatewayPortals, String> {
    let mut it = s.splitn(3, ':');
    let (Some(name), Some(tpgt), Some(addrs)) = (it.next(), it.next(), it.next()) else {
        return Err(format!("{s:?}: expected NAME:FIRST_TPGT:ADDR[,ADDR...]"));
    };
    let first_tpgt = tpgt
        .parse::<u16>()
        .map_err(|_| format!("{s:?}: FIRST_TPGT {tpgt:?} is not a number in 1..=65535"))?;
    Ok(keyfence_cluster::GatewayPortals {
        name: name.to_string(),
        portals: addrs.split(',').map(|a| a.trim().to_string()).collect(),
        first_tpgt,
    })
}

pub fn run(args: &[OsString]) -> ExitCode {
    let args: Args = match crate::cli::parse("keyfence serve", args, 2) {
        Ok(a) => a,
        Err(code) => return code,
    };
    init_tracing(args.log_level.as_deref());
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyfence serve: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }
    .unwrap_or_else(|e| {
        eprintln!("keyfence serve: bad log filter ({e}); using 'info'");
        EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Build the configuration from the command line.
fn config_from_args(args: &Args) -> Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => {
            let portals = if args.listen.is_empty() {
                vec![DEFAULT_PORTAL.to_string()]
            } else {
                args.listen.clone()
            };
            let mut cfg = Config {
                data_dir: PathBuf::from(DEFAULT_DATA_DIR),
                limits: Default::default(),
                discovery_chap: None,
                admin_socket: None,
                targets: vec![TargetConfig {
                    name: args
                        .target_name
                        .clone()
                        .unwrap_or_else(|| DEFAULT_TARGET_NAME.to_string()),
                    portals,
                    luns: vec![LunConfig {
                        id: 0,
                        path: Some(PathBuf::from("lun0.img")),
                        device: None,
                        size: Some(args.size.unwrap_or(ByteSize(DEFAULT_LUN_SIZE))),
                        block_size: 512,
                        read_only: false,
                        direct: false,
                        serial: None,
                        naa: None,
                    }],
                    chap: None,
                    // The quick start serves any initiator (on loopback unless
                    // --listen says otherwise), as it always has.
                    open: true,
                    acls: Vec::new(),
                    portal_addrs: Vec::new(),
                    first_tpgt: args.first_tpgt.unwrap_or(1),
                }],
                cluster: None,
                metrics: None,
                metrics_addr: None,
            };
            cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            cfg
        }
    };
    if let Some(dir) = &args.data_dir {
        cfg.data_dir = dir.clone();
    }
    if let Some(sock) = &args.admin_socket {
        cfg.admin_socket = Some(sock.clone());
        cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    // After the validation above, which sets metrics_addr from the file.
    if let Some(m) = args.metrics {
        cfg.metrics_addr = Some(m);
    }
    if let (Some(endpoints), Some(gateway)) = (&args.cluster, &args.gateway) {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        let c = match cfg.cluster.take() {
            Some(mut c) => {
                c.endpoints = endpoints;
                c.gateway = gateway.clone();
                c
            }
            None => keyfence_cluster::ClusterConfig::new(endpoints, gateway),
        };
        let mut c = c;
        if !args.peers.is_empty() {
            // This gateway's entry is its own (only) target's portals.
            let own = &cfg.targets[0];
            c.gateways = std::iter::once(keyfence_cluster::GatewayPortals {
                name: gateway.clone(),
                portals: own.portal_addrs.iter().map(|a| a.to_string()).collect(),
                first_tpgt: own.first_tpgt,
            })
            .chain(args.peers.iter().cloned())
            .collect();
        }
        cfg.cluster = Some(c);
        cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(cfg)
}

fn serve(args: Args) -> Result<()> {
    // The server creates (and locks) the data directory once its portals
    // are bound, and removes what it created if the start fails.
    let cfg = config_from_args(&args)?;
    // A reload reads the file again, with the same command-line overrides.
    let reloader: Option<keyfence_target::server::Reloader> = args.config.is_some().then(|| {
        let args = args.clone();
        let r: keyfence_target::server::Reloader =
            std::sync::Arc::new(move || config_from_args(&args).map_err(|e| format!("{e:#}")));
        r
    });
    keyfence_target::server::tune_allocator();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyfence")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let stop = shutdown_signal()?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot install SIGHUP handler")?;
        let server = Server::bind(cfg).await?;
        if let Some(r) = reloader {
            server.set_reload_source(r);
        }
        let handle = server.reload_handle();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                // The outcome is logged by the reload itself.
                let _ = handle.reload().await;
            }
        });
        print!("{}", server.describe());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // Bound, listening and every LU open: tell systemd (Type=notify).
        crate::systemd::ready(&server);
        crate::systemd::spawn_watchdog();
        let stop = async move {
            stop.await;
            crate::systemd::stopping();
        };
        server.run(stop).await?;
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(())
}

/// Installs SIGINT and SIGTERM handlers now (so that a signal arriving
/// while LUNs are being opened is not lost) and returns a future that
/// resolves on the first of them.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    })
}

/// The clap definition of this command (for manual pages and completions).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("keyfence serve").chain(list.iter().copied())).unwrap()
    }

    #[test]
    fn no_arguments_serve_the_default_target() {
        let cfg = config_from_args(&args(&[])).unwrap();
        let t = &cfg.targets[0];
        assert_eq!(t.name, DEFAULT_TARGET_NAME);
        assert_eq!(t.portals, vec![DEFAULT_PORTAL.to_string()]);
        assert_eq!(
            t.luns[0].backing(&cfg.data_dir),
            keyfence_target::config::Backing::File {
                path: PathBuf::from("keyfence-data/lun0.img"),
                size: 1 << 30
            }
        );
    }

    #[test]
    fn repeated_listen_makes_portal_groups_in_order() {
        let cfg = config_from_args(&args(&[
            "--listen",
            "127.0.0.1:3261",
            "--listen",
            "127.0.0.1:3262",
            "--size",
            "64M",
            "--data-dir",
            "/srv/kf",
            "--target-name",
            "iqn.2026-11.io.example:t1",
        ]))
        .unwrap();
        let t = &cfg.targets[0];
        let groups: Vec<_> = t.portal_groups().collect();
        assert_eq!(groups[0], (1, "127.0.0.1:3261".parse().unwrap()));
        assert_eq!(groups[1], (2, "127.0.0.1:3262".parse().unwrap()));
        assert_eq!(t.luns[0].size, Some(ByteSize(64 << 20)));
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/kf"));
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(config_from_args(&args(&["--listen", "localhost"])).is_err());
        assert!(config_from_args(&args(&["--target-name", "target0"])).is_err());
        let e = Args::try_parse_from(["keyfence serve", "--size", "1Q"]).unwrap_err();
        assert!(e.to_string().contains("unknown unit"), "{e}");
        // Not clap's "unexpected argument '-5'".
        let e = Args::try_parse_from(["keyfence serve", "--size", "-5"]).unwrap_err();
        assert!(e.to_string().contains("size '-5' is negative"), "{e}");
        let e =
            Args::try_parse_from(["keyfence serve", "--metrics", "localhost:9750"]).unwrap_err();
        assert!(
            e.to_string().contains(
                "'localhost:9750': 'localhost' is not an IP address (give a numeric address, IPv6 as [addr]:port)"
            ),
            "{e}"
        );
        let cfg = config_from_args(&args(&["--metrics", "127.0.0.1:0"])).unwrap();
        assert_eq!(cfg.metrics_addr, Some("127.0.0.1:0".parse().unwrap()));
        let e = config_from_args(&args(&["--listen", "127.0.0.1:99999"])).unwrap_err();
        assert!(
            e.to_string()
                .contains("port 99999 is out of range (0-65535)"),
            "{e}"
        );
        assert!(Args::try_parse_from([
            "keyfence serve",
            "--config",
            "a.toml",
            "--listen",
            "127.0.0.1:1"
        ])
        .is_err());
    }
}
