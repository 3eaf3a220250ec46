//! Cluster mode: an N-member etcd on loopback ([`crate::etcd`]), backing
//! files shared by every gateway, and `keyfence serve` gateways over them,
//! each with its own data directory and portal group (TPGT 1, 2, ...),
//! named `gwa`, `gwb`, `gwc`, ...
//!
//! Gateways are configured, by default, with a generated TOML file with a
//! `[cluster]` table (LUN `i` is `lun{i}.img` of the rig's directory), or
//! with the command-line flags `--cluster`, `--gateway`, `--first-tpgt`
//! and `--peer` ([`ClusterOptions::flags`]), so that both ways of
//! configuring a gateway are exercised.
//!
//! Dropped in field order: the gateways first (thawed first, should a test
//! have left one frozen), then etcd, then the files.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::etcd::EtcdCluster;
use crate::port::with_free_ports;
use crate::serve::Serve;

/// Lease timings of a `[cluster]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub ttl_secs: u64,
    pub safety_margin_ms: u64,
    pub request_timeout_ms: u64,
}

/// What [`ClusterRig::start`] starts.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    bin: PathBuf,
    iqn: String,
    etcd_members: usize,
    gateways: usize,
    luns: usize,
    lun_size: u64,
    lease: Option<Lease>,
    log_level: String,
    flags: bool,
    peers: bool,
    endpoints: HashMap<usize, Vec<usize>>,
}

impl ClusterOptions {
    /// `bin serve` gateways of target `iqn`: a three-member etcd, two
    /// gateways, one LUN of 16 MiB, the product's lease timings, log level
    /// info, a configuration file.
    pub fn new(bin: impl Into<PathBuf>, iqn: &str) -> ClusterOptions {
        ClusterOptions {
            bin: bin.into(),
            iqn: iqn.into(),
            etcd_members: 3,
            gateways: 2,
            luns: 1,
            lun_size: 16 << 20,
            lease: None,
            log_level: "info".into(),
            flags: false,
            peers: false,
            endpoints: HashMap::new(),
        }
    }

    /// Number of gateways.
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    /// Number of LUNs (0..n), each its own shared backing file; the
    /// command-line flags serve one.
    pub fn luns(mut self, n: usize) -> Self {
        self.luns = n;
        self
    }

    /// Size of every LUN, bytes.
    pub fn lun_size(mut self, bytes: u64) -> Self {
        self.lun_size = bytes;
        self
    }

    /// Lease TTL, safety margin and etcd request timeout (configuration
    /// file only; otherwise the product's defaults).
    pub fn lease(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Every gateway's `--log-level`.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// Configure the gateways with command-line flags instead of a file.
    pub fn flags(mut self) -> Self {
        self.flags = true;
        self
    }

    /// Tell every gateway the others' portal groups (`--peer`), so that
    /// each reports all of them; the portals are then on ports chosen up
    /// front. Implies [`ClusterOptions::flags`].
    pub fn peers(mut self) -> Self {
        self.flags = true;
        self.peers = true;
        self
    }

    /// Gateway `gw` is given only the endpoints of these etcd members (by
    /// index), in this order; by default every member's.
    pub fn etcd_members_of(mut self, gw: usize, members: impl IntoIterator<Item = usize>) -> Self {
        self.endpoints.insert(gw, members.into_iter().collect());
        self
    }
}

/// The running rig; see the module documentation.
pub struct ClusterRig {
    gateways: Vec<Serve>,
    etcd: EtcdCluster,
    opts: ClusterOptions,
    files: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

impl ClusterRig {
    /// Start etcd (waiting until every member is healthy), create the
    /// backing files, then start every gateway (waiting until each has
    /// printed its portals). Blocks for seconds: in an async test call it
    /// through `tokio::task::block_in_place` or `spawn_blocking`. Fails the
    /// test, with the failing program's log, when something does not start.
    pub fn start(opts: ClusterOptions) -> ClusterRig {
        assert!(
            !(opts.flags && opts.luns != 1),
            "the command-line flags configure one LUN, not {}",
            opts.luns
        );
        assert!(
            !(opts.flags && opts.lease.is_some()),
            "lease timings need the configuration file"
        );
        let etcd = EtcdCluster::start(opts.etcd_members);
        let dir = tempfile::tempdir().expect("tempdir");
        let files: Vec<PathBuf> = (0..opts.luns)
            .map(|i| dir.path().join(format!("lun{i}.img")))
            .collect();
        for f in &files {
            std::fs::File::create(f)
                .and_then(|f| f.set_len(opts.lun_size))
                .expect("shared backing file");
        }
        let mut rig = ClusterRig {
            gateways: Vec::new(),
            etcd,
            opts,
            files,
            dir,
        };
        for gw in 0..rig.opts.gateways {
            let data = rig.data_dir(gw);
            std::fs::create_dir_all(&data).expect("gateway data dir");
            if rig.opts.flags {
                // `serve --size` serves DATA_DIR/lun0.img.
                std::os::unix::fs::symlink(&rig.files[0], data.join("lun0.img"))
                    .expect("symlink to the shared backing file");
            }
        }
        let n = rig.opts.gateways;
        rig.gateways = if rig.opts.peers {
            with_free_ports(n, "cluster gateways", |ports| {
                let addrs: Vec<SocketAddr> = ports
                    .iter()
                    .map(|&p| SocketAddr::from(([127, 0, 0, 1], p)))
                    .collect();
                rig.start_all(Some(&addrs))
            })
        } else {
            rig.start_all(None).unwrap_or_else(|e| panic!("{e}"))
        };
        rig
    }

    /// Start every gateway at once, on `addrs` (one each) or port 0.
    fn start_all(&self, addrs: Option<&[SocketAddr]>) -> Result<Vec<Serve>, String> {
        std::thread::scope(|s| {
            let starting: Vec<_> = (0..self.opts.gateways)
                .map(|gw| s.spawn(move || self.start_gateway(gw, addrs)))
                .collect();
            starting
                .into_iter()
                .map(|t| t.join().expect("gateway start thread"))
                .collect()
        })
    }

    fn start_gateway(&self, gw: usize, addrs: Option<&[SocketAddr]>) -> Result<Serve, String> {
        let o = &self.opts;
        let name = gateway_name(gw);
        let tpgt = gw + 1;
        let data = self.data_dir(gw);
        let endpoints: Vec<String> = match o.endpoints.get(&gw) {
            Some(members) => members
                .iter()
                .map(|&m| self.etcd.members()[m].endpoint())
                .collect(),
            None => self.etcd.endpoints(),
        };
        let b = Serve::builder(&o.bin)
            .data_dir(&data)
            .log_level(&o.log_level);
        if !o.flags {
            let quoted: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
            let mut toml = format!(
                "[[target]]\nname = \"{}\"\nportals = [\"127.0.0.1:0\"]\nfirst_tpgt = {tpgt}\nopen = true\n",
                o.iqn
            );
            for (i, f) in self.files.iter().enumerate() {
                toml += &format!(
                    "[[target.lun]]\nid = {i}\npath = \"{}\"\nsize = \"{}\"\n",
                    f.display(),
                    o.lun_size
                );
            }
            toml += &format!(
                "[cluster]\nendpoints = [{}]\ngateway = \"{name}\"\n",
                quoted.join(", ")
            );
            if let Some(l) = o.lease {
                toml += &format!(
                    "lease_ttl_secs = {}\nsafety_margin_ms = {}\nrequest_timeout_ms = {}\n",
                    l.ttl_secs, l.safety_margin_ms, l.request_timeout_ms
                );
            }
            let cfg = data.join("keyfence.toml");
            std::fs::write(&cfg, toml).expect("gateway configuration file");
            return b.config(&cfg).try_start();
        }
        let mut b = b
            .target_name(&o.iqn)
            .size(&o.lun_size.to_string())
            .arg("--cluster")
            .arg(endpoints.join(","))
            .arg("--gateway")
            .arg(&name)
            .arg("--first-tpgt")
            .arg(tpgt.to_string());
        if let Some(addrs) = addrs {
            // Peers: this gateway's portal, then every other one's group.
            b = b.listen(&[addrs[gw]]);
            for (other, addr) in addrs.iter().enumerate().filter(|(i, _)| *i != gw) {
                let peer = format!("{}:{}:{addr}", gateway_name(other), other + 1);
                b = b.arg("--peer").arg(peer);
            }
        }
        b.try_start()
    }

    /// The gateways, in TPGT order.
    pub fn gateways(&self) -> &[Serve] {
        &self.gateways
    }

    /// Gateway `gw` (0-based; TPGT `gw + 1`).
    pub fn gateway(&self, gw: usize) -> &Serve {
        &self.gateways[gw]
    }

    /// Gateway `gw`, to kill or stop it ([`Serve::kill`], [`Serve::stop`]).
    pub fn gateway_mut(&mut self, gw: usize) -> &mut Serve {
        &mut self.gateways[gw]
    }

    /// The name of gateway `gw` in etcd.
    pub fn gateway_name(&self, gw: usize) -> String {
        gateway_name(gw)
    }

    /// The first portal of gateway `gw`.
    pub fn portal(&self, gw: usize) -> SocketAddr {
        self.gateways[gw].portals()[0]
    }

    /// `iscsi://PORTAL/IQN/LUN` through gateway `gw`.
    pub fn url(&self, gw: usize, lun: usize) -> String {
        format!("iscsi://{}/{}/{lun}", self.portal(gw), self.opts.iqn)
    }

    /// The target's name.
    pub fn iqn(&self) -> &str {
        &self.opts.iqn
    }

    pub fn etcd(&self) -> &EtcdCluster {
        &self.etcd
    }

    /// etcd, to kill a member ([`EtcdCluster::kill`]).
    pub fn etcd_mut(&mut self) -> &mut EtcdCluster {
        &mut self.etcd
    }

    /// Client URLs of every etcd member.
    pub fn endpoints(&self) -> Vec<String> {
        self.etcd.endpoints()
    }

    /// Gateway `gw`'s data directory.
    pub fn data_dir(&self, gw: usize) -> PathBuf {
        self.dir.path().join(gateway_name(gw))
    }

    /// The shared backing file of LUN `lun`.
    pub fn backing_file(&self, lun: usize) -> &Path {
        &self.files[lun]
    }

    /// `len` bytes at `offset` of LUN `lun`'s backing file, read directly.
    pub fn read_backing(&self, lun: usize, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&self.files[lun]).expect("open the backing file");
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, offset)
            .expect("read the backing file");
        b
    }

    fn pid(&self, gw: usize) -> u32 {
        self.gateways[gw].pid().expect("gateway running")
    }

    /// Send `sig` to gateway `gw`.
    pub fn signal(&self, gw: usize, sig: i32) {
        crate::cmd::signal(self.pid(gw), sig);
    }

    /// SIGSTOP gateway `gw` and wait (up to 5 s) until every thread of it
    /// is stopped ([`crate::cmd::freeze`]).
    pub fn freeze(&self, gw: usize) {
        crate::cmd::freeze(self.pid(gw), Duration::from_secs(5));
    }

    /// SIGCONT gateway `gw`.
    pub fn thaw(&self, gw: usize) {
        self.signal(gw, libc::SIGCONT);
    }

    /// Wait (bounded by `bound`) until gateway `gw` answers PERSISTENT
    /// RESERVE IN (READ KEYS, with `keyfence persist`) on every LUN: it has
    /// installed the committed state (after a freeze it may be rejoining).
    pub fn wait_serving(&self, gw: usize, bound: Duration) {
        let end = Instant::now() + bound;
        for lun in 0..self.files.len() {
            let url = self.url(gw, lun);
            loop {
                let o = crate::cmd::run_bounded(
                    Command::new(&self.opts.bin).args([
                        "persist",
                        "--initiator-name",
                        "iqn.2026-11.io.keyfence.test:probe",
                        "-n",
                        "-k",
                        &url,
                    ]),
                    None,
                    Duration::from_secs(10),
                );
                if o.status.success() {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "gateway {} does not serve {url} within {bound:?}: {}\n{}",
                    gateway_name(gw),
                    crate::text(&o.stderr),
                    self.gateways[gw].log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for ClusterRig {
    fn drop(&mut self) {
        // A stopped gateway would not act on SIGTERM.
        for s in &self.gateways {
            if let Some(pid) = s.pid() {
                crate::cmd::signal(pid, libc::SIGCONT);
            }
        }
    }
}

/// `gwa`, `gwb`, ...
fn gateway_name(gw: usize) -> String {
    assert!(gw < 26, "at most 26 gateways");
    format!("gw{}", char::from(b'a' + gw as u8))
}

#[cfg(test)]
mod tests {
    #[test]
    fn gateway_names() {
        assert_eq!(super::gateway_name(0), "gwa");
        assert_eq!(super::gateway_name(2), "gwc");
    }
}
