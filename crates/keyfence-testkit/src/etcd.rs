//! A multi-member etcd cluster on loopback, from Debian's `etcd` binary
//! (package etcd-server). Every member gets its own data directory and
//! free client and peer ports; start-up waits (bounded) until every
//! member reports healthy; every member still running is killed by PID
//! when the value drops.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::port::with_free_ports;

/// Bound on the start-up of the whole cluster.
pub const STARTUP: Duration = Duration::from_secs(30);

/// The etcd binary; the test fails saying how to install it if absent.
pub fn etcd_bin() -> PathBuf {
    crate::tool::require("etcd")
}

/// One member.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The member's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// A running etcd cluster.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Start `n` members with fast timings (50 ms heartbeat, 500 ms
    /// election timeout, so leases down to 1 s are allowed).
    pub fn start(n: usize) -> EtcdCluster {
        let bin = etcd_bin();
        with_free_ports(2 * n, "etcd cluster", |ports| {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let token = format!("kf-{}-{}", std::process::id(), ports[0]);
            let initial: Vec<String> = (0..n)
                .map(|i| format!("m{}=http://127.0.0.1:{}", i + 1, ports[n + i]))
                .collect();
            let mut members = Vec::new();
            for i in 0..n {
                let name = format!("m{}", i + 1);
                let (cp, pp) = (ports[i], ports[n + i]);
                let log = dir.path().join(format!("{name}.log"));
                let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
                let err = out.try_clone().map_err(|e| e.to_string())?;
                let child = Command::new(&bin)
                    .args(["--name", &name])
                    .arg("--data-dir")
                    .arg(dir.path().join(&name))
                    .args(["--listen-client-urls", &format!("http://127.0.0.1:{cp}")])
                    .args(["--advertise-client-urls", &format!("http://127.0.0.1:{cp}")])
                    .args(["--listen-peer-urls", &format!("http://127.0.0.1:{pp}")])
                    .args([
                        "--initial-advertise-peer-urls",
                        &format!("http://127.0.0.1:{pp}"),
                    ])
                    .args(["--initial-cluster", &initial.join(",")])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", &token])
                    .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                    .args(["--logger", "zap", "--log-level", "warn"])
                    .env_remove("ETCD_NAME")
                    .env_remove("ETCD_DATA_DIR")
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .spawn()
                    .map_err(|e| format!("spawning etcd: {e}"))?;
                members.push(Member {
                    name,
                    client_port: cp,
                    peer_port: pp,
                    child: Some(child),
                    log,
                });
            }
            let mut cluster = EtcdCluster { members, _dir: dir };
            cluster.wait_healthy(STARTUP)?;
            Ok(cluster)
        })
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Client URLs of every member started (killed ones included: a
    /// client must cope with them).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    fn wait_healthy(&mut self, bound: Duration) -> Result<(), String> {
        let deadline = Instant::now() + bound;
        loop {
            for m in &mut self.members {
                if let Some(c) = m.child.as_mut() {
                    if let Ok(Some(status)) = c.try_wait() {
                        m.child = None;
                        let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(5).collect();
                        return Err(format!(
                            "{} exited ({status}): {}",
                            m.name,
                            tail.join(" | ")
                        ));
                    }
                }
            }
            if self.members.iter().all(|m| healthy(m.client_port)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("etcd cluster not healthy within {bound:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&self, i: usize, sig: i32) {
        if let Some(pid) = self.members[i].pid() {
            crate::cmd::signal(pid, sig);
        }
    }

    /// kill -9 member `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freeze member `i` (SIGSTOP).
    pub fn freeze(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// Thaw member `i` (SIGCONT).
    pub fn thaw(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }
}

/// GET /health answers `"health":"true"`.
fn healthy(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            // SIGKILL ends stopped processes too; the thaw is for order.
            self.thaw(i);
            self.kill(i);
        }
    }
}
