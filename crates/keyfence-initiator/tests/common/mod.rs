//! Targets under test for the initiator's integration tests: Debian's tgtd
//! (always, when installed) and `keyfence serve` (when the binary is
//! available), each on a free loopback port with one file-backed LUN.
//!
//! * tgtd: `tgtd -f -C <control> --iscsi portal=127.0.0.1:<port>`, then
//!   tgtadm creates target 1 with LUN 1 backed by a sparse file. Stopped by
//!   deleting the target and the system (tgtd ignores SIGTERM while it has
//!   targets), then waited for; killed by PID only if it does not exit.
//! * keyfence: `$KEYFENCE_BIN serve ...` (or the `keyfence` binary built in
//!   this workspace's target directory), LUN 0, stopped with SIGTERM.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use keyfence_initiator::IscsiUrl;

pub const TGT_IQN: &str = "iqn.2026-11.io.keyfence:initiator-test";
pub const KEYFENCE_IQN: &str = "iqn.2026-11.io.keyfence:initiator-test";
pub const LUN_SIZE: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tgtd,
    Keyfence,
}

pub struct TestTarget {
    pub kind: Kind,
    /// Full URL: portal, target name and the LUN holding the test disk.
    pub url: IscsiUrl,
    pub port: u16,
    pub target_name: String,
    child: Option<Child>,
    control: u32,
    _dir: tempfile::TempDir,
}

pub struct Options {
    /// CHAP account required by the target.
    pub chap: Option<(String, String)>,
    pub size: u64,
    /// Let the target accept CRC32C header and data digests.
    pub digests: bool,
    /// Send NOP-In pings to idle connections every this many seconds.
    pub nop_interval: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chap: None,
            size: LUN_SIZE,
            digests: false,
            nop_interval: None,
        }
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn wait_port(port: u16, child: &mut Child, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("exited early with {st}"));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "nothing listens on 127.0.0.1:{port} after {timeout:?}"
    ))
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

static NEXT_CONTROL: AtomicU32 = AtomicU32::new(0);

impl TestTarget {
    pub fn start(kind: Kind, opts: Options) -> Option<TestTarget> {
        match kind {
            Kind::Tgtd => Self::start_tgtd(opts),
            Kind::Keyfence => Self::start_keyfence(opts),
        }
    }

    pub fn start_tgtd(opts: Options) -> Option<TestTarget> {
        let Some(tgtd) = which("tgtd") else {
            eprintln!("\n!!!!! SKIPPING: tgtd is not installed (apt-get install tgt) !!!!!\n");
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("lun1.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(opts.size))
            .expect("create LUN image");
        // Control ports unique per process and test; retry on collision.
        for _ in 0..20 {
            let n = NEXT_CONTROL.fetch_add(1, Ordering::Relaxed);
            // tgtd accepts control ports up to 32767.
            let control = 10_000 + (std::process::id() % 700) * 32 + n % 32;
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("tgtd.log")).expect("log");
            let mut iscsi_opts = format!("portal=127.0.0.1:{port}");
            if let Some(n) = opts.nop_interval {
                iscsi_opts.push_str(&format!(",nop_interval={n},nop_count=2"));
            }
            let mut child = Command::new(&tgtd)
                .args(["-f", "-C", &control.to_string(), "--iscsi", &iscsi_opts])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn tgtd");
            if let Err(e) = wait_port(port, &mut child, Duration::from_secs(15)) {
                eprintln!("tgtd on control port {control}: {e}; retrying");
                let _ = child.kill();
                let _ = child.wait();
                continue;
            }
            let t = TestTarget {
                kind: Kind::Tgtd,
                url: IscsiUrl::parse(&format!("iscsi://127.0.0.1:{port}/{TGT_IQN}/1"))
                    .expect("url"),
                port,
                target_name: TGT_IQN.to_string(),
                child: Some(child),
                control,
                _dir: dir,
            };
            t.tgtadm(&[
                "--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN,
            ]);
            t.tgtadm(&[
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                "1",
                "-b",
                img.to_str().expect("utf-8 path"),
            ]);
            t.tgtadm(&[
                "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
            ]);
            if opts.digests {
                for key in ["HeaderDigest", "DataDigest"] {
                    t.tgtadm(&[
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
                t.tgtadm(&[
                    "--op",
                    "new",
                    "--mode",
                    "account",
                    "--user",
                    user,
                    "--password",
                    secret,
                ]);
                t.tgtadm(&[
                    "--op", "bind", "--mode", "account", "--tid", "1", "--user", user,
                ]);
            }
            return Some(t);
        }
        panic!("could not start tgtd on any control port");
    }

    fn tgtadm(&self, args: &[&str]) {
        let st = Command::new("tgtadm")
            .args(["-C", &self.control.to_string(), "--lld", "iscsi"])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("run tgtadm");
        assert!(st.success(), "tgtadm {args:?} failed: {st}");
    }

    fn keyfence_bin() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("KEYFENCE_BIN") {
            return Some(PathBuf::from(p));
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest.parent()?.parent()?;
        let dirs = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .into_iter()
            .chain([root.join("target")]);
        for d in dirs {
            for prof in ["release", "debug"] {
                let p = d.join(prof).join("keyfence");
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        None
    }

    pub fn start_keyfence(opts: Options) -> Option<TestTarget> {
        let Some(bin) = Self::keyfence_bin() else {
            eprintln!(
                "\n!!!!! SKIPPING keyfence target: no keyfence binary (set KEYFENCE_BIN or build it) !!!!!\n"
            );
            return None;
        };
        if opts.chap.is_some() {
            eprintln!(
                "\n!!!!! SKIPPING: CHAP accounts are configured through tgtd only here !!!!!\n"
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("keyfence.log")).expect("log");
        let mut cmd = Command::new(&bin);
        cmd.arg("serve");
        if let Some(n) = opts.nop_interval {
            // Pinging is configured through the TOML file.
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data).expect("data dir");
            let cfg = dir.path().join("keyfence.toml");
            let text = format!(
                "data_dir = {data:?}\n\n[limits]\nnop_in_interval_secs = {n}\nnop_in_timeout_secs = {n}\n\n\
                 [[target]]\nname = \"{KEYFENCE_IQN}\"\nportals = [\"127.0.0.1:{port}\"]\n\n\
                 [[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"{}M\"\n",
                opts.size >> 20
            );
            std::fs::write(&cfg, text).expect("write config");
            cmd.arg("--config").arg(cfg);
        } else {
            cmd.arg("--data-dir")
                .arg(dir.path().join("data"))
                .args(["--target-name", KEYFENCE_IQN])
                .args(["--size", &opts.size.to_string()])
                .args(["--listen", &format!("127.0.0.1:{port}")]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn keyfence");
        if let Err(e) = wait_port(port, &mut child, Duration::from_secs(30)) {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("keyfence.log")).unwrap_or_default();
            panic!("keyfence serve did not start: {e}\n{log}");
        }
        Some(TestTarget {
            kind: Kind::Keyfence,
            url: IscsiUrl::parse(&format!("iscsi://127.0.0.1:{port}/{KEYFENCE_IQN}/0"))
                .expect("url"),
            port,
            target_name: KEYFENCE_IQN.to_string(),
            child: Some(child),
            control: 0,
            _dir: dir,
        })
    }

    /// The portal URL (no target), for discovery.
    pub fn portal_url(&self) -> IscsiUrl {
        IscsiUrl::parse(&format!("iscsi://127.0.0.1:{}", self.port)).expect("url")
    }
}

impl Drop for TestTarget {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        match self.kind {
            Kind::Tgtd => {
                let c = self.control.to_string();
                let quiet = |args: &[&str]| {
                    let _ = Command::new("tgtadm")
                        .args(["-C", &c])
                        .args(args)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                };
                quiet(&[
                    "--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "1", "--force",
                ]);
                quiet(&["--op", "delete", "--mode", "system"]);
            }
            Kind::Keyfence => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !exited {
            eprintln!("target (pid {}) did not exit; killing it", child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.kind == Kind::Tgtd {
            // tgtd leaves its control socket and lock file behind.
            for suffix in ["", ".lock"] {
                let _ =
                    std::fs::remove_file(format!("/var/run/tgtd/socket.{}{suffix}", self.control));
            }
        }
    }
}
