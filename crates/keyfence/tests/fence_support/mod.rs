//! Shared helpers of the fencing integration tests: real `keyfence serve`
//! targets on 127.0.0.1 and bounded child processes (both from the
//! workspace test kit), the monotonic clock.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_keyfence");

/// A `keyfence serve` process exporting one LUN (from the workspace test
/// kit); stopped on drop.
pub struct Target {
    serve: keyfence_testkit::Serve,
}

impl Target {
    pub fn start(iqn: &str, size: &str) -> Target {
        Target::start_portals(iqn, size, 1)
    }

    /// A target listening on `portals` ports (portal groups 1, 2, ...).
    pub fn start_portals(iqn: &str, size: &str, portals: usize) -> Target {
        let serve = keyfence_testkit::Serve::builder(BIN)
            .portals(portals)
            .target_name(iqn)
            .size(size)
            .log_level("error")
            .start();
        Target { serve }
    }

    pub fn url(&self) -> String {
        self.serve.url(0)
    }

    /// URLs of every portal.
    pub fn urls(&self) -> Vec<String> {
        self.serve.urls()
    }

    /// Kill the target (SIGKILL: the device becomes unreachable).
    pub fn stop(&mut self) {
        self.serve.kill();
    }
}

/// Run to completion, killing the child after `limit`.
pub fn run_bounded(cmd: &mut Command, stdin: Option<&str>, limit: Duration) -> Output {
    keyfence_testkit::run_bounded(cmd, stdin.map(str::as_bytes), limit)
}

/// `keyfence ARGS...`, bounded to 60 s.
pub fn keyfence(args: &[&str]) -> Output {
    keyfence_testkit::run(Command::new(BIN).args(args))
}

pub use keyfence_testkit::{code, text};

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
