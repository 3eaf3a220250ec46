//! Shared helpers of the fencing integration tests: real `keyfence serve`
//! targets on 127.0.0.1 and bounded child processes (both from the
//! workspace test kit), the monotonic clock.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

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

/// One line of a `keyfence fence writer` log: `ack|err SEQ LBA T_ISSUE T_DONE [ERROR]`.
pub struct LogLine {
    pub acked: bool,
    pub seq: u64,
    pub lba: u64,
    pub t_issue: u64,
    pub t_done: u64,
    pub error: String,
}

impl LogLine {
    pub fn conflict(&self) -> bool {
        !self.acked && self.error == "RESERVATION CONFLICT"
    }

    /// NOT READY, ASYMMETRIC ACCESS STATE TRANSITION: the gateway is not
    /// serving (lease in doubt, rejoining).
    pub fn transition(&self) -> bool {
        !self.acked && self.error.contains("(asc 0x04 ascq 0x0a)")
    }
}

/// The writer log at `path` (lines that do not parse are passed over).
pub fn parse_log(path: &Path) -> Vec<LogLine> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.splitn(6, ' ').collect();
            let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
            Some(LogLine {
                acked: *f.first()? == "ack",
                seq: num(1)?,
                lba: num(2)?,
                t_issue: num(3)?,
                t_done: num(4)?,
                error: f.get(5).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

/// The writer's last heartbeat (monotonic ns).
pub fn heartbeat(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// A record `keyfence fence scan` found on disk.
pub struct Rec {
    pub lba: u64,
    pub node: u32,
    pub seq: u64,
    pub t_ns: u64,
}

/// The records in `blocks` blocks from `lba` of `url`, read back with
/// `keyfence fence scan`.
pub fn scan(url: &str, lba: u64, blocks: u64) -> Vec<Rec> {
    let o = keyfence(&[
        "fence",
        "scan",
        "--device",
        url,
        "--region-lba",
        &lba.to_string(),
        "--region-blocks",
        &blocks.to_string(),
        "--initiator-name",
        &iname("reader"),
    ]);
    assert_eq!(code(&o), 0, "scan: {}", text(&o.stderr));
    text(&o.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            assert!(v.get("corrupt").is_none(), "corrupt block: {l}");
            Rec {
                lba: v["lba"].as_u64().unwrap(),
                node: v["node"].as_u64().unwrap() as u32,
                seq: v["seq"].as_u64().unwrap(),
                t_ns: v["t_ns"].as_u64().unwrap(),
            }
        })
        .collect()
}

/// Wait (bounded, 20 s) until the heartbeat file `hb` has not changed for
/// `silence`: the survivors' membership layer deciding that its node is
/// gone.
pub fn wait_silent(hb: &Path, silence: Duration) {
    let mut last = heartbeat(hb);
    let mut since = Instant::now();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let now = heartbeat(hb);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= silence {
            return;
        }
        assert!(
            Instant::now() < end,
            "heartbeat {} never fell silent",
            hb.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The moment (monotonic ns) PREEMPT AND ABORT completed, from the output
/// of a successful `fence_keyfence -o off -v`.
pub fn preempt_time(round: usize, o: &Output) -> u64 {
    assert_eq!(
        code(o),
        0,
        "round {round}: fence_keyfence: {}",
        text(&o.stderr)
    );
    assert!(text(&o.stdout).contains("Success: Powered OFF"));
    text(&o.stderr)
        .split("completed at monotonic ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no preempt time in {}", text(&o.stderr)))
}

/// The survivor `node` (initiator `initiator`, key `key`) takes the
/// region of `blocks` blocks at `lba` over with one write through `url`
/// (`keyfence fence stamp`), its records tagged `node`.
pub fn stamp(url: &str, node: u32, key: &str, lba: u64, blocks: u64, initiator: &str) {
    let o = keyfence(&[
        "fence",
        "stamp",
        "--device",
        url,
        "--node",
        &node.to_string(),
        "--key",
        key,
        "--region-lba",
        &lba.to_string(),
        "--region-blocks",
        &blocks.to_string(),
        "--initiator-name",
        &iname(initiator),
    ]);
    assert_eq!(code(&o), 0, "stamp: {}", text(&o.stderr));
}

/// Create the file `stop` and wait (bounded, 20 s each) until every writer
/// has exited successfully.
pub fn stop_writers(round: usize, stop: &Path, writers: &mut [Child]) {
    std::fs::write(stop, b"").expect("stop file");
    for (n, w) in writers.iter_mut().enumerate() {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = w.try_wait().expect("wait for writer") {
                assert!(s.success(), "round {round}: writer {n} failed");
                break;
            }
            if Instant::now() > end {
                let _ = w.kill();
                panic!("round {round}: writer {n} did not stop");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The round's check of a node that was not fenced (`n`, its writer log
/// `log`, the records found in its region `recs`): every record there is
/// its own, every write it got GOOD for is on the disk (or overwritten by a
/// later write to the same block), and it still wrote after fencing
/// returned at `t_fenced`.
pub fn check_survivor(round: usize, n: usize, log: &[LogLine], recs: &[Rec], t_fenced: u64) {
    assert!(
        recs.iter().all(|r| r.node as usize == n),
        "round {round}: records in the wrong region"
    );
    let mut newest: HashMap<u64, u64> = HashMap::new();
    for l in log.iter().filter(|l| l.acked) {
        let e = newest.entry(l.lba).or_default();
        *e = (*e).max(l.seq);
    }
    for (lba, seq) in &newest {
        let r = recs.iter().find(|r| r.lba == *lba);
        assert!(
            r.is_some_and(|r| r.seq >= *seq),
            "round {round}: node {n}: acknowledged seq {seq} at lba {lba} lost"
        );
    }
    assert!(
        log.iter().any(|l| l.acked && l.t_issue > t_fenced),
        "round {round}: surviving node{n} could not write after fencing"
    );
}

/// The victim's writes acknowledged although issued after PREEMPT AND
/// ABORT completed at `t_preempted`: there must be none. Returns the
/// victim's acknowledgements read after fencing returned at `t_fenced`
/// (writes completed before the preempt whose response came later: the
/// processes' clocks order them, not the target), printed with `what`.
pub fn check_victim_acks(what: &str, log: &[LogLine], t_preempted: u64, t_fenced: u64) -> usize {
    let rel = |t: u64| (t as f64 - t_preempted as f64) / 1e6;
    let late: Vec<&LogLine> = log
        .iter()
        .filter(|l| l.acked && l.t_done > t_fenced)
        .collect();
    for l in &late {
        println!(
            "{what}: ack seen late: seq {} issued {:.3} ms, acknowledged {:.3} ms after the preempt completed; fence returned {:.3} ms after it",
            l.seq,
            rel(l.t_issue),
            rel(l.t_done),
            rel(t_fenced)
        );
    }
    let acked_after_preempt = log
        .iter()
        .filter(|l| l.acked && l.t_issue > t_preempted)
        .count();
    assert_eq!(
        acked_after_preempt, 0,
        "{what}: a write of the victim issued after the preempt completed was acknowledged"
    );
    late.len()
}
