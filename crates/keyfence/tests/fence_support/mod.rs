//! Shared helpers of the fencing integration tests: real `keyfence serve`
//! targets on 127.0.0.1, bounded child processes, the monotonic clock.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_keyfence");

/// A `keyfence serve` process exporting one LUN; killed on drop.
pub struct Target {
    pub child: Option<Child>,
    pub port: u16,
    /// Further portals (one per extra `--listen`), for multipath.
    pub more_ports: Vec<u16>,
    pub iqn: String,
    pub dir: tempfile::TempDir,
}

impl Target {
    pub fn start(iqn: &str, size: &str) -> Target {
        Target::start_portals(iqn, size, 1)
    }

    /// A target listening on `portals` ports (portal groups 1, 2, ...).
    pub fn start_portals(iqn: &str, size: &str, portals: usize) -> Target {
        for _ in 0..20 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let more_ports: Vec<u16> = (1..portals).map(|_| free_port()).collect();
            let mut cmd = Command::new(BIN);
            cmd.args(["serve", "--data-dir"])
                .arg(dir.path())
                .args(["--listen", &format!("127.0.0.1:{port}")]);
            for p in &more_ports {
                cmd.args(["--listen", &format!("127.0.0.1:{p}")]);
            }
            let child = cmd
                .args(["--target-name", iqn, "--size", size, "--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn keyfence serve");
            let mut t = Target {
                child: Some(child),
                port,
                more_ports,
                iqn: iqn.to_string(),
                dir,
            };
            if t.wait_listening(Duration::from_secs(10)) {
                return t;
            }
            t.stop();
        }
        panic!("could not start keyfence serve");
    }

    fn wait_listening(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return false;
                }
            }
            let up = |p: u16| TcpStream::connect(("127.0.0.1", p)).is_ok();
            if up(self.port) && self.more_ports.iter().all(|p| up(*p)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{}/0", self.port, self.iqn)
    }

    /// URLs of every portal.
    pub fn urls(&self) -> Vec<String> {
        std::iter::once(self.port)
            .chain(self.more_ports.iter().copied())
            .map(|p| format!("iscsi://127.0.0.1:{p}/{}/0", self.iqn))
            .collect()
    }

    /// Kill the target (SIGKILL: the device becomes unreachable).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Run to completion, killing the child after `limit`.
pub fn run_bounded(cmd: &mut Command, stdin: Option<&str>, limit: Duration) -> Output {
    use std::io::Write as _;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("spawn");
    if let Some(text) = stdin {
        let mut i = child.stdin.take().expect("stdin");
        i.write_all(text.as_bytes()).expect("write stdin");
    }
    let end = Instant::now() + limit;
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if Instant::now() >= end => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "{cmd:?} did not finish within {limit:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// `keyfence ARGS...`, bounded to 60 s.
pub fn keyfence(args: &[&str]) -> Output {
    run_bounded(Command::new(BIN).args(args), None, Duration::from_secs(60))
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A directory with `fence_keyfence` -> keyfence, to run the agent by name.
pub fn agent_link(dir: &Path) -> PathBuf {
    let p = dir.join("fence_keyfence");
    if !p.exists() {
        std::os::unix::fs::symlink(BIN, &p).expect("symlink");
    }
    p
}

/// CLOCK_MONOTONIC in ns, the clock the writer logs with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn iname(n: &str) -> String {
    format!("iqn.2026-11.io.keyfence.test:{n}")
}

/// `fence agent -o on` for one node.
pub fn unfence(devices: &str, key: &str, node: &str, store: &Path) {
    let o = keyfence(&[
        "fence",
        "agent",
        "-o",
        "on",
        "-k",
        key,
        "-d",
        devices,
        "--initiator-name",
        &iname(node),
        "--store-path",
        store.to_str().expect("utf8"),
        "--timeout",
        "5",
    ]);
    assert_eq!(code(&o), 0, "unfence {node}: {}", text(&o.stderr));
}
