//! Debian's tgtd as a peer target on loopback.
//!
//! Each [`Tgtd`] is its own `tgtd -f -C CONTROL --iscsi portal=127.0.0.1:PORT`
//! with target 1 exporting LUN 1 from a sparse file, so several run side by
//! side. tgtd cannot bind port 0, so the portal port comes from
//! [`crate::port::with_free_port`]; when tgtd cannot bind it (it then falls
//! back to its default portals) or the control port is in use, that tgtd
//! is killed and the start retried. Teardown: tgtd ignores SIGTERM while
//! it has targets, so the target is deleted, then the system
//! (`tgtadm -C N --op delete --mode system`), and only a tgtd that does not
//! exit after that is killed (by its PID).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::cmd::{run_bounded, status_within, text, wait_until};
use crate::port::with_free_port;
use crate::tool::require;

/// The LUN the fixture exports.
pub const LUN: u32 = 1;

/// What the tgtd under test exports and accepts.
#[derive(Debug, Clone)]
pub struct TgtdOptions {
    /// Name of target 1.
    pub iqn: String,
    /// Size of LUN 1 in bytes.
    pub size: u64,
    /// Accept CRC32C header and data digests (tgtd's default is None only).
    pub digests: bool,
    /// A CHAP account (user, secret) the target requires.
    pub chap: Option<(String, String)>,
    /// Ping idle connections with NOP-In every this many seconds.
    pub nop_interval: Option<u32>,
}

impl Default for TgtdOptions {
    fn default() -> Self {
        TgtdOptions {
            iqn: "iqn.2026-11.io.keyfence:tgtd-test".into(),
            size: 16 << 20,
            digests: false,
            chap: None,
            nop_interval: None,
        }
    }
}

/// A running tgtd; torn down on drop.
pub struct Tgtd {
    child: Option<Child>,
    control: u16,
    port: u16,
    iqn: String,
    tgtadm: PathBuf,
    dir: tempfile::TempDir,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A control port (tgtd accepts up to 32767) no live tgtd answers on.
/// Another tgtd may still take it first: tgtd then exits and the caller
/// retries.
fn control_port() -> u16 {
    for _ in 0..1000 {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let c = 20_000 + (std::process::id().wrapping_mul(131).wrapping_add(n) % 12_000) as u16;
        if std::os::unix::net::UnixStream::connect(socket_path(c)).is_err() {
            return c;
        }
    }
    panic!("no free tgtd control port between 20000 and 31999");
}

fn socket_path(control: u16) -> String {
    format!("/var/run/tgtd/socket.{control}")
}

fn tgtadm_output(tgtadm: &Path, control: u16, args: &[&str]) -> Output {
    run_bounded(
        Command::new(tgtadm)
            .args(["-C", &control.to_string()])
            .args(args),
        None,
        Duration::from_secs(30),
    )
}

impl Tgtd {
    /// Start a tgtd exporting LUN 1 of `opts.iqn`. Fails the test when tgt
    /// is not installed or tgtd cannot be started.
    pub fn start(opts: TgtdOptions) -> Tgtd {
        let tgtd = require("tgtd");
        let tgtadm = require("tgtadm");
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("lun1.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(opts.size))
            .expect("create LUN image");
        let (child, control, port) = with_free_port("tgtd", |port| {
            let control = control_port();
            let mut iscsi = format!("portal=127.0.0.1:{port}");
            if let Some(n) = opts.nop_interval {
                iscsi.push_str(&format!(",nop_interval={n},nop_count=2"));
            }
            let log = std::fs::File::create(dir.path().join("tgtd.log")).expect("tgtd log");
            let mut child = Command::new(&tgtd)
                .args(["-f", "-C", &control.to_string(), "--iscsi", &iscsi])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("tgtd log"))
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", tgtd.display()))?;
            match wait_portal(&tgtadm, &mut child, control, port) {
                Ok(()) => Ok((child, control, port)),
                Err((e, owned_control)) => {
                    // Ours and without targets: SIGKILL by its PID is safe.
                    let _ = child.kill();
                    let _ = child.wait();
                    if owned_control {
                        remove_control_files(control);
                    }
                    let log =
                        std::fs::read_to_string(dir.path().join("tgtd.log")).unwrap_or_default();
                    Err(format!("tgtd -C {control}: {e}; log:\n{log}"))
                }
            }
        });
        let t = Tgtd {
            child: Some(child),
            control,
            port,
            iqn: opts.iqn.clone(),
            tgtadm,
            dir,
        };
        let iqn = opts.iqn.as_str();
        t.adm_ok(&[
            "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1", "-T", iqn,
        ]);
        let img = img.to_str().expect("UTF-8 temp path");
        t.adm_ok(&[
            "--lld",
            "iscsi",
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "-b",
            img,
        ]);
        t.adm_ok(&[
            "--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ]);
        if opts.digests {
            for key in ["HeaderDigest", "DataDigest"] {
                t.adm_ok(&[
                    "--lld",
                    "iscsi",
                    "--op",
                    "update",
                    "--mode",
                    "target",
                    "--tid",
                    "1",
                    "--name",
                    key,
                    "--value",
                    "CRC32C,None",
                ]);
            }
        }
        if let Some((user, secret)) = &opts.chap {
            t.adm_ok(&[
                "--lld",
                "iscsi",
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                user,
                "--password",
                secret,
            ]);
            t.adm_ok(&[
                "--lld", "iscsi", "--op", "bind", "--mode", "account", "--tid", "1", "--user", user,
            ]);
        }
        t
    }

    /// The portal's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The portal address.
    pub fn portal(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The name of target 1.
    pub fn iqn(&self) -> &str {
        &self.iqn
    }

    /// PID of the running tgtd.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("tgtd running")
    }

    /// tgtd's control port (`tgtadm -C`).
    pub fn control(&self) -> u16 {
        self.control
    }

    /// `iscsi://127.0.0.1:PORT/IQN/1`.
    pub fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{}/{LUN}", self.port, self.iqn)
    }

    /// `tgtadm -C CONTROL ARGS...`, bounded.
    pub fn adm(&self, args: &[&str]) -> Output {
        tgtadm_output(&self.tgtadm, self.control, args)
    }

    /// [`Tgtd::adm`], failing the test unless it succeeds.
    pub fn adm_ok(&self, args: &[&str]) {
        let o = self.adm(args);
        assert!(
            o.status.success(),
            "tgtadm -C {} {args:?}: {}{}",
            self.control,
            text(&o.stdout),
            text(&o.stderr)
        );
    }

    /// What tgtd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tgtd.log")).unwrap_or_default()
    }
}

/// Wait until the tgtd we started answers on `control` and lists exactly
/// our portal. Err when it exits (control port taken) or lists other
/// portals (it could not bind `port` and fell back to its defaults); the
/// flag says whether our tgtd held the control port (its files are ours).
fn wait_portal(
    tgtadm: &Path,
    child: &mut Child,
    control: u16,
    port: u16,
) -> Result<(), (String, bool)> {
    let not_ours = |e: String| (e, false);
    let deadline = Instant::now() + Duration::from_secs(15);
    let want = format!("Portal: 127.0.0.1:{port},1");
    loop {
        if let Some(st) = child.try_wait().map_err(|e| not_ours(e.to_string()))? {
            return Err(not_ours(format!("exited at start-up ({st})")));
        }
        let o = tgtadm_output(
            tgtadm,
            control,
            &["--lld", "iscsi", "--op", "show", "--mode", "portal"],
        );
        // The answer counts only if it came from our tgtd: still running.
        if o.status.success() && matches!(child.try_wait(), Ok(None)) {
            let out = text(&o.stdout);
            let portals: Vec<&str> = out.lines().filter(|l| l.starts_with("Portal:")).collect();
            if portals == [want.as_str()] {
                break;
            }
            if !portals.is_empty() {
                let e = format!("portal 127.0.0.1:{port} not bound; listening on {portals:?}");
                return Err((e, true));
            }
        }
        if Instant::now() >= deadline {
            return Err(not_ours("no answer on the control port within 15 s".into()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err() {
        if Instant::now() >= deadline {
            return Err((format!("portal {addr} does not accept connections"), true));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // tgtd ignores SIGTERM while it has targets: delete them, then the
        // system, which makes it exit.
        let quiet = |args: &[&str]| {
            let mut cmd = Command::new(&self.tgtadm);
            cmd.args(["-C", &self.control.to_string()]).args(args);
            status_within(&mut cmd, Duration::from_secs(10));
        };
        quiet(&[
            "--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "1", "--force",
        ]);
        quiet(&["--op", "delete", "--mode", "system"]);
        if wait_until(&mut child, Duration::from_secs(10)).is_none() {
            eprintln!("tgtd (pid {}) did not exit; killing it", child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
        // Our tgtd held this control port until now: remove its files.
        remove_control_files(self.control);
    }
}

/// The socket and lock files a tgtd we started left for `control`.
fn remove_control_files(control: u16) {
    let sock = socket_path(control);
    let _ = std::fs::remove_file(format!("{sock}.lock"));
    let _ = std::fs::remove_file(sock);
}
