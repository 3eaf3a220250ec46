//! `keyfence serve` as a separate process.
//!
//! Portals are `--listen 127.0.0.1:0`: the kernel picks free ports and
//! `serve` prints the bound addresses in its start-up banner
//! (`  portal 127.0.0.1:PORT (TPGT N)`), which the fixture reads back. No
//! port is guessed, so nothing can take it first.
//!
//! The binary must be the one cargo built for the running test profile:
//! the keyfence package's own tests pass `env!("CARGO_BIN_EXE_keyfence")`;
//! tests of other packages use [`keyfence_bin`], which looks next to the
//! test executable (never in another profile's directory).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cmd::{terminate, wait_until};

/// How long `serve` may take to print its banner.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a SIGTERMed `serve` may take to exit before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// The `keyfence` binary of the running test profile, for tests outside the
/// keyfence package: `target/PROFILE/keyfence` next to this test's
/// `target/PROFILE/deps/` directory. Fails the test when it is not there:
/// cargo builds it only for the keyfence package's own tests.
pub fn keyfence_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let mut dir = exe.parent().expect("test executable has a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("profile directory");
    }
    let bin = dir.join("keyfence");
    assert!(
        bin.is_file(),
        "keyfence binary not found at {}: build it in the same profile as the tests \
         (`cargo build --bin keyfence`, plus the same --release or --profile)",
        bin.display()
    );
    bin
}

/// Options of a `keyfence serve` start; see [`Serve::builder`].
#[derive(Debug, Clone)]
pub struct ServeBuilder {
    bin: PathBuf,
    portals: usize,
    target_name: Option<String>,
    size: Option<String>,
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    log_level: Option<String>,
    listen: Vec<SocketAddr>,
    args: Vec<OsString>,
}

impl ServeBuilder {
    /// Number of `--listen 127.0.0.1:0` portals (portal groups 1..=n);
    /// with [`ServeBuilder::config`], the number of portals the file
    /// defines. Default 1.
    pub fn portals(mut self, n: usize) -> Self {
        self.portals = n;
        self
    }

    /// `--target-name`.
    pub fn target_name(mut self, iqn: &str) -> Self {
        self.target_name = Some(iqn.into());
        self
    }

    /// `--size` (bytes or 16M, 1G, ...).
    pub fn size(mut self, size: &str) -> Self {
        self.size = Some(size.into());
        self
    }

    /// `--data-dir`; default: a fresh temporary directory.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// `--config FILE` instead of `--listen`/`--target-name`/`--size`; the
    /// file's portals should be on `127.0.0.1:0`. Set the number of portals
    /// it defines with [`ServeBuilder::portals`].
    pub fn config(mut self, file: &Path) -> Self {
        self.config = Some(file.to_path_buf());
        self
    }

    /// `--listen` on these addresses (portal groups in this order) instead
    /// of `127.0.0.1:0`, for a program that must know a portal before the
    /// server starts (a cluster peer). Pick them with
    /// [`crate::port::with_free_ports`] and start with
    /// [`ServeBuilder::try_start`].
    pub fn listen(mut self, addrs: &[SocketAddr]) -> Self {
        self.listen = addrs.to_vec();
        self.portals = addrs.len();
        self
    }

    /// `--log-level`.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = Some(level.into());
        self
    }

    /// Any further argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Start `serve` and wait (bounded) until it has printed its portals.
    /// Fails the test, with serve's log, when it exits or does not start.
    pub fn start(self) -> Serve {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`ServeBuilder::start`] that reports a failed start (with serve's
    /// log) instead of failing the test: for a caller that can retry with
    /// other ports.
    pub fn try_start(self) -> Result<Serve, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let log_path = dir.path().join("serve.log");
        let log = std::fs::File::create(&log_path).expect("serve log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve").arg("--data-dir").arg(&data_dir);
        match &self.config {
            Some(file) => {
                cmd.arg("--config").arg(file);
            }
            None => {
                if self.listen.is_empty() {
                    for _ in 0..self.portals {
                        cmd.args(["--listen", "127.0.0.1:0"]);
                    }
                } else {
                    for a in &self.listen {
                        cmd.arg("--listen").arg(a.to_string());
                    }
                }
                if let Some(n) = &self.target_name {
                    cmd.args(["--target-name", n]);
                }
                if let Some(s) = &self.size {
                    cmd.args(["--size", s]);
                }
            }
        }
        if let Some(l) = &self.log_level {
            cmd.args(["--log-level", l]);
        }
        cmd.args(&self.args)
            .env_remove("KEYFENCE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let lines = banner_lines(&mut child, dir.path().join("serve.out"));
        let mut s = Serve {
            child: Some(child),
            portals: Vec::new(),
            iqn: String::new(),
            data_dir,
            dir,
        };
        let deadline = Instant::now() + START_LIMIT;
        while s.portals.len() < self.portals {
            let line = match lines.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => l,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Some(st) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                        return Err(s.failure(&format!("keyfence serve exited at start-up ({st})")));
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(s.failure(&format!(
                        "keyfence serve printed no portals within {START_LIMIT:?}"
                    )))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(
                        s.failure("keyfence serve closed its stdout before printing its portals")
                    )
                }
            };
            if let Some(name) = line.strip_prefix("target ") {
                if s.iqn.is_empty() {
                    s.iqn = name.trim().to_string();
                }
            } else if let Some(addr) = parse_portal(&line) {
                s.portals.push(addr);
            }
        }
        Ok(s)
    }
}

/// Run `bin serve ARGS --log-level error` for a start that must fail,
/// bounded by 15 s: its exit code and what it wrote to stderr, trimmed.
pub fn failed_start(bin: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> (i32, String) {
    let o = crate::cmd::run_bounded(
        Command::new(bin)
            .arg("serve")
            .args(args)
            .args(["--log-level", "error"]),
        None,
        Duration::from_secs(15),
    );
    (
        crate::cmd::code(&o),
        crate::cmd::text(&o.stderr).trim().to_string(),
    )
}

/// The address of a banner line `  portal ADDR (TPGT N)`.
fn parse_portal(line: &str) -> Option<SocketAddr> {
    let rest = line.trim_start().strip_prefix("portal ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Read `child`'s stdout on a thread: every line goes to the returned
/// channel (while someone listens) and to the file `keep`.
fn banner_lines(child: &mut Child, keep: PathBuf) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut file = std::fs::File::create(keep).ok();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            let _ = tx.send(line);
        }
    });
    rx
}

/// A running `keyfence serve`. Dropping it sends SIGTERM and waits (bounded)
/// for the exit; SIGKILL follows if it does not come.
pub struct Serve {
    child: Option<Child>,
    portals: Vec<SocketAddr>,
    iqn: String,
    data_dir: PathBuf,
    dir: tempfile::TempDir,
}

impl Serve {
    /// A builder for `bin serve` with one portal.
    pub fn builder(bin: impl Into<PathBuf>) -> ServeBuilder {
        ServeBuilder {
            bin: bin.into(),
            portals: 1,
            target_name: None,
            size: None,
            data_dir: None,
            config: None,
            log_level: None,
            listen: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Bound portal addresses, in portal-group order (as printed).
    pub fn portals(&self) -> &[SocketAddr] {
        &self.portals
    }

    /// TCP port of portal `i` (0-based).
    pub fn port(&self, i: usize) -> u16 {
        self.portals[i].port()
    }

    /// Name of the (first) target, as printed.
    pub fn iqn(&self) -> &str {
        &self.iqn
    }

    /// `iscsi://ADDR/IQN/0` through portal `i` (0-based).
    pub fn url(&self, i: usize) -> String {
        format!("iscsi://{}/{}/0", self.portals[i], self.iqn)
    }

    /// URLs of LUN 0 through every portal.
    pub fn urls(&self) -> Vec<String> {
        (0..self.portals.len()).map(|i| self.url(i)).collect()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A temporary directory that lives as long as the fixture.
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// What serve printed on stdout so far (its banner).
    pub fn banner(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.out")).unwrap_or_default()
    }

    /// The metrics address serve printed (`--metrics`); fails the test
    /// when it printed none.
    pub fn metrics_addr(&self) -> SocketAddr {
        crate::metrics::address_in_banner(&self.banner())
    }

    /// What serve wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// PID of the running serve.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether serve is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGKILL (no shutdown code runs: a crash or power cut of the target).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit; fails the test when serve does not
    /// exit within 10 s (then it is killed).
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("keyfence serve is running");
        terminate(&c);
        match wait_until(&mut c, STOP_LIMIT) {
            Some(st) => st,
            None => {
                let _ = c.kill();
                let _ = c.wait();
                panic!("keyfence serve did not exit within {STOP_LIMIT:?} of SIGTERM");
            }
        }
    }

    fn failure(&mut self, why: &str) -> String {
        self.kill();
        format!("{why}\nserve log:\n{}", self.log())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&c);
            if wait_until(&mut c, STOP_LIMIT).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portal_lines() {
        assert_eq!(
            parse_portal("  portal 127.0.0.1:4321 (TPGT 2)"),
            Some("127.0.0.1:4321".parse().unwrap())
        );
        assert_eq!(
            parse_portal("  portal [::1]:3260 (TPGT 1)"),
            Some("[::1]:3260".parse().unwrap())
        );
        assert_eq!(parse_portal("target iqn.x"), None);
        assert_eq!(parse_portal("  LUN 0: 16 MiB"), None);
    }
}
