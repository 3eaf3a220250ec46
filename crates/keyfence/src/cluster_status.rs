//! `keyfence cluster status`: what etcd says about a keyfence cluster —
//! the live gateways with their leases and portal groups, and per LU the
//! committed revision and each gateway's acknowledged revision.
//!
//! Also the etcd connection options `keyfence pr show` shares
//! ([`EtcdArgs`]). Read-only: nothing is written to etcd.
//! Exit status: 0 shown, 1 etcd could not be read, 2 bad arguments.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use keyfence_cluster::{Cluster, ClusterConfig, LuId};
use keyfence_target::config::Config;
use serde::Serialize;

/// Where etcd is: a `keyfence serve` configuration file with a
/// `[cluster]` table, or endpoints given directly.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// A keyfence serve configuration file; its [cluster] table gives the
    /// etcd endpoints, prefix and request timeout.
    #[arg(long = "cluster-config", value_name = "FILE", conflicts_with = "etcd")]
    pub cluster_config: Option<PathBuf>,
    /// Comma-separated etcd client URLs (http://127.0.0.1:2379,...).
    #[arg(long = "etcd", value_name = "ENDPOINTS")]
    pub etcd: Option<String>,
    /// Root of keyfence's keys in etcd (with --etcd) [default: /keyfence].
    #[arg(long = "prefix", value_name = "PREFIX", requires = "etcd")]
    pub prefix: Option<String>,
}

impl EtcdArgs {
    pub fn given(&self) -> bool {
        self.cluster_config.is_some() || self.etcd.is_some()
    }

    /// The cluster settings to connect with; the gateway name only labels
    /// log lines (nothing is written).
    pub fn config(&self) -> Result<ClusterConfig, String> {
        let mut c = match (&self.cluster_config, &self.etcd) {
            (Some(path), _) => {
                let cfg = Config::load(path).map_err(|e| e.to_string())?;
                let mut c = cfg.cluster.ok_or_else(|| {
                    format!(
                        "{}: no [cluster] table (not a cluster gateway's configuration)",
                        path.display()
                    )
                })?;
                c.gateway = "keyfence-cli".into();
                c.gateways.clear();
                c
            }
            (None, Some(endpoints)) => {
                let endpoints = endpoints
                    .split(',')
                    .map(|e| e.trim().to_string())
                    .filter(|e| !e.is_empty())
                    .collect();
                let mut c = ClusterConfig::new(endpoints, "keyfence-cli");
                if let Some(p) = &self.prefix {
                    c.prefix = p.clone();
                }
                c
            }
            (None, None) => return Err("give --cluster-config FILE or --etcd ENDPOINTS".into()),
        };
        c.gateways.clear();
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// Connect (one linearizable read: fails when etcd has no quorum).
    pub async fn connect(&self) -> Result<Cluster, String> {
        let c = self.config()?;
        Cluster::connect(&c)
            .await
            .map_err(|e| format!("etcd {}: {e}", c.endpoints.join(",")))
    }
}

/// `<target>` and LUN of a cluster LU id (`<target>@lun<N>`).
pub fn split_lu_id(id: &LuId) -> (String, u64) {
    match id.as_str().rsplit_once("@lun") {
        Some((t, n)) => (t.to_string(), n.parse().unwrap_or(u64::MAX)),
        None => (id.as_str().to_string(), u64::MAX),
    }
}

/// A current-thread runtime for a command's few requests.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

#[derive(Debug, Parser)]
#[command(
    name = "keyfence cluster",
    about = "Inspect a keyfence cluster (gateways, leases, per-LU revisions in etcd)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show the live gateways (lease, time left, portal groups) and per LU
    /// the committed revision and each gateway's acknowledged revision.
    Status {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
struct Status {
    prefix: String,
    gateways: Vec<GatewayView>,
    lus: Vec<LuStatus>,
}

#[derive(Debug, Serialize)]
struct GatewayView {
    name: String,
    /// The etcd lease id, hexadecimal as etcdctl prints it.
    lease: String,
    /// TTL granted at join.
    ttl_secs: i64,
    /// Seconds left as etcd counts them (None: the lease just ended).
    ttl_left_secs: Option<i64>,
    /// Revision at which this incarnation registered.
    registered_revision: i64,
    portal_groups: Vec<PortalGroupView>,
}

#[derive(Debug, Serialize)]
struct PortalGroupView {
    tpgt: u16,
    portals: Vec<String>,
}

#[derive(Debug, Serialize)]
struct LuStatus {
    lu: String,
    target: String,
    lun: u64,
    /// Mod revision of the LU's state record (0: no record).
    committed_revision: i64,
    /// Number of committed changes.
    seq: u64,
    /// The gateway that committed the last change.
    writer: String,
    acks: Vec<AckView>,
}

#[derive(Debug, Serialize)]
struct AckView {
    gateway: String,
    /// The revision of this LU the gateway has applied (0: it serves the
    /// LU and is reading its state); None: a live gateway that does not
    /// serve this LU (or no longer: a reload removed it).
    acked_revision: Option<i64>,
    /// acked_revision >= committed_revision.
    current: bool,
}

pub fn run(args: &[OsString]) -> ExitCode {
    let cli: Cli = match crate::cli::parse("keyfence cluster", args, 2) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let Cmd::Status { etcd, json } = cli.cmd;
    if !etcd.given() {
        eprintln!("keyfence cluster status: give --cluster-config FILE or --etcd ENDPOINTS");
        return ExitCode::from(2);
    }
    let status = match runtime().and_then(|rt| rt.block_on(read_status(&etcd))) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keyfence cluster status: {e}");
            return ExitCode::from(1);
        }
    };
    if json {
        match serde_json::to_string_pretty(&status) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("keyfence cluster status: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", table(&status));
    }
    ExitCode::SUCCESS
}

async fn read_status(etcd: &EtcdArgs) -> Result<Status, String> {
    let c = etcd.connect().await?;
    let e = |e: keyfence_cluster::Error| e.to_string();
    let mut gws = c.gateways().await.map_err(e)?;
    gws.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    let mut gateways = Vec::with_capacity(gws.len());
    for g in &gws {
        gateways.push(GatewayView {
            name: g.record.name.clone(),
            lease: format!("{:x}", g.lease),
            ttl_secs: g.record.ttl_secs,
            ttl_left_secs: c.lease_time_left(g.lease).await.map_err(e)?,
            registered_revision: g.create_revision,
            portal_groups: g
                .record
                .portal_groups
                .iter()
                .map(|p| PortalGroupView {
                    tpgt: p.tpgt,
                    portals: p.portals.clone(),
                })
                .collect(),
        });
    }
    let mut lus = Vec::new();
    let mut ids = c.lus().await.map_err(e)?;
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    for id in ids {
        let s = c.read(&id).await.map_err(e)?;
        let acked = c.acks(&id).await.map_err(e)?;
        let mut names: Vec<String> = gws.iter().map(|g| g.record.name.clone()).collect();
        names.extend(acked.iter().map(|(n, _)| n.clone()));
        names.sort();
        names.dedup();
        let acks = names
            .into_iter()
            .map(|n| {
                let rev = acked
                    .iter()
                    .find(|(g, _)| *g == n)
                    .map(|(_, r)| *r)
                    .filter(|r| *r != keyfence_cluster::NOT_SERVING);
                AckView {
                    current: rev.is_some_and(|r| r >= s.revision),
                    gateway: n,
                    acked_revision: rev,
                }
            })
            .collect();
        let (target, lun) = split_lu_id(&id);
        lus.push(LuStatus {
            lu: id.as_str().to_string(),
            target,
            lun,
            committed_revision: s.revision,
            seq: s.seq,
            writer: s.writer.clone(),
            acks,
        });
    }
    Ok(Status {
        prefix: c.keys().prefix().to_string(),
        gateways,
        lus,
    })
}

fn table(s: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "Gateways ({}) under {}", s.gateways.len(), s.prefix);
    if s.gateways.is_empty() {
        let _ = writeln!(o, "  none live");
    } else {
        let _ = writeln!(
            o,
            "  {:<16}  {:<16}  {:>8}  {:>10}  PORTAL GROUPS",
            "NAME", "LEASE", "TTL LEFT", "REGISTERED"
        );
        for g in &s.gateways {
            let left = match g.ttl_left_secs {
                Some(t) => format!("{t}/{}s", g.ttl_secs),
                None => "ended".into(),
            };
            let groups: Vec<String> = g
                .portal_groups
                .iter()
                .map(|p| format!("{}: {}", p.tpgt, p.portals.join(" ")))
                .collect();
            let _ = writeln!(
                o,
                "  {:<16}  {:<16}  {:>8}  {:>10}  {}",
                g.name,
                g.lease,
                left,
                format!("rev {}", g.registered_revision),
                groups.join(", ")
            );
        }
    }
    let _ = writeln!(o, "LUs ({})", s.lus.len());
    for l in &s.lus {
        let _ = writeln!(
            o,
            "  {}  committed revision {} (seq {}, by {})",
            l.lu,
            l.committed_revision,
            l.seq,
            if l.writer.is_empty() { "-" } else { &l.writer }
        );
        for a in &l.acks {
            let _ = writeln!(
                o,
                "    {:<16}  {}",
                a.gateway,
                match a.acked_revision {
                    Some(r) if a.current => format!("acked {r} (current)"),
                    Some(r) => format!("acked {r} (behind)"),
                    None => "does not serve it".into(),
                }
            );
        }
    }
    o
}

/// The clap definition of this command (for manual pages and completions).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lu_ids_split_into_target_and_lun() {
        let id = LuId::for_lun("iqn.2026-11.io.keyfence:Default", 3).unwrap();
        assert_eq!(
            split_lu_id(&id),
            ("iqn.2026-11.io.keyfence:default".to_string(), 3)
        );
    }

    #[test]
    fn connection_options_are_checked() {
        let none = EtcdArgs {
            cluster_config: None,
            etcd: None,
            prefix: None,
        };
        assert!(none.config().unwrap_err().contains("--etcd"));
        let bad = EtcdArgs {
            etcd: Some("127.0.0.1:2379".into()),
            ..none.clone()
        };
        assert!(bad.config().unwrap_err().contains("expected http://"));
        let ok = EtcdArgs {
            etcd: Some("http://127.0.0.1:2379, http://127.0.0.1:2380".into()),
            prefix: Some("/kf2".into()),
            ..none
        };
        let c = ok.config().unwrap();
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.prefix, "/kf2");
    }
}
