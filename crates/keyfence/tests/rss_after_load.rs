//! Memory comes back after load: 16 sessions each keep 32 READ(10)s of
//! 1 MiB in flight for a while, then leave; the spawned `keyfence serve`'s
//! RSS must fall back near its idle size (the allocator keeps freed memory
//! during load and gives it back once the server is idle).
//!
//! `KEYFENCE_RSS_BIN=/path/to/keyfence` runs it against another build to
//! compare; figures are printed on stderr (`-- --nocapture`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyfence_testkit::raw::read10;
use keyfence_testkit::{LoginKeys, RawClient, Serve};

const IQN: &str = "iqn.2026-11.io.keyfence:rss";
const SESSIONS: usize = 16;
const DEPTH: usize = 32;
const READ_BLOCKS: u16 = 2048; // 1 MiB
const LOAD_FOR: Duration = Duration::from_secs(4);
/// RSS after load may exceed the idle RSS by this much.
const SLACK_KIB: u64 = 64 << 10;

fn binary() -> PathBuf {
    std::env::var_os("KEYFENCE_RSS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_keyfence")))
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One session: log in, clear the unit attention, keep DEPTH 1 MiB reads
/// in flight (reading the answers slowly) until `until`.
fn reader(addr: SocketAddr, isid: u64, until: Instant) -> usize {
    let mut c = RawClient::connect(addr, Duration::from_secs(20));
    let initiator = format!("{IQN}-initiator-{isid}");
    let r = c.login(&LoginKeys::normal(&initiator, IQN, isid));
    assert_eq!(r.status_class, 0, "login refused");
    c.clear_ua();
    let mut done = 0;
    let blocks_total = (64u32 << 20) / 512;
    while Instant::now() < until {
        for k in 0..DEPTH {
            let lba = ((done + k) as u32 * u32::from(READ_BLOCKS)) % blocks_total;
            let len = u32::from(READ_BLOCKS) * 512;
            c.command(&read10(lba, READ_BLOCKS), true, false, len, Bytes::new());
        }
        // Let the target build up its data-in before reading it.
        std::thread::sleep(Duration::from_millis(50));
        let st = c.completions(DEPTH).expect("the reads' statuses");
        assert!(st.iter().all(|s| *s == 0), "read status {st:?}");
        done += DEPTH;
    }
    done
}

#[test]
fn rss_returns_near_idle_after_large_reads() {
    let serve = Serve::builder(binary())
        .target_name(IQN)
        .size("64M")
        .log_level("error")
        .start();
    let pid = serve.pid().expect("serve pid");
    let addr = serve.portals()[0];
    // Idle size, with one session having come and gone.
    reader(addr, 0x23d0_0000_0fff, Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let idle = rss_kib(pid);

    let until = Instant::now() + LOAD_FOR;
    let mut peak = 0;
    let handles: Vec<_> = (0..SESSIONS)
        .map(|i| std::thread::spawn(move || reader(addr, 0x23d0_0000_1000 + i as u64, until)))
        .collect();
    while Instant::now() < until {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    let reads: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    peak = peak.max(rss_kib(pid));

    // Back near idle within a few seconds of the last client leaving.
    let left = Instant::now();
    let mut after = rss_kib(pid);
    while after > idle + SLACK_KIB && left.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(200));
        after = rss_kib(pid);
    }
    eprintln!(
        "RSS idle {} MiB, peak {} MiB during {reads} reads of 1 MiB, {} MiB {:.1} s after the load",
        idle >> 10,
        peak >> 10,
        after >> 10,
        left.elapsed().as_secs_f64()
    );
    if std::env::var_os("KEYFENCE_RSS_DUMP").is_some() {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        let mut cur = String::new();
        let mut rows = Vec::new();
        for l in smaps.lines() {
            if l.split_whitespace().next().is_some_and(|f| f.contains('-')) {
                cur = l.to_string();
            } else if let Some(v) = l.strip_prefix("Rss:") {
                let kib: u64 = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
                rows.push((kib, cur.clone()));
            }
        }
        rows.sort();
        for (k, m) in rows.iter().rev().take(12) {
            eprintln!("{k:>8} KiB {m}");
        }
        eprintln!("{} mappings", rows.len());
    }
    assert!(
        peak > idle + 2 * SLACK_KIB,
        "the load did not raise RSS (idle {idle} KiB, peak {peak} KiB)"
    );
    assert!(
        after <= idle + SLACK_KIB,
        "RSS stayed at {after} KiB after the load (idle {idle} KiB, peak {peak} KiB)"
    );
}
