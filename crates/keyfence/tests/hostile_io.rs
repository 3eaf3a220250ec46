//! Hostile clients against `keyfence serve` over loopback, speaking raw
//! PDUs: a full command window of 16 MiB reads that are never read back,
//! and writes that stall just before their last bytes. The server's memory
//! must stay bounded, another session's TEST UNIT READY must stay fast, a
//! legitimate client must still log in, and stalled writes must be timed
//! out. Every loop is bounded in time.
//!
//! `KEYFENCE_HOSTILE_BIN=/path/to/keyfence` runs the same attacks against
//! another build (e.g. one from before the fixes) to compare, and
//! `KEYFENCE_HOSTILE_OLD_CONFIG=1` leaves out the `[limits]` keys such a
//! build does not know; the figures are printed on stderr (`cargo test
//! ... -- --nocapture`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::pdu::{DataOut, TargetPdu, RESERVED_TAG};
use keyfence_iscsi::Lun;
use keyfence_testkit::raw::{read16, write16, Next};
use keyfence_testkit::{LoginKeys, RawClient, Serve};

const INITIATOR: &str = "iqn.2026-11.io.keyfence:hostile";

fn binary() -> (PathBuf, bool) {
    match std::env::var_os("KEYFENCE_HOSTILE_BIN") {
        Some(p) => (PathBuf::from(p), true),
        None => (PathBuf::from(env!("CARGO_BIN_EXE_keyfence")), false),
    }
}

/// The test kit's raw-PDU initiator, connected with a 10 s timeout.
fn connect(addr: SocketAddr) -> RawClient {
    RawClient::connect(addr, Duration::from_secs(10))
}

/// Log in to `target` as this test's initiator; the login must succeed.
fn login(c: &mut RawClient, target: &str, isid: u64) {
    let r = c.login(&LoginKeys::normal(INITIATOR, target, isid));
    assert_eq!(r.status_class, 0, "login refused");
}

/// VmRSS and VmHWM of `pid`, KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Sample the server's RSS until `stop`; returns the peak (KiB).
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        let limit = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < limit {
            peak = peak.max(rss_kib(pid).0);
            std::thread::sleep(Duration::from_millis(20));
        }
        peak.max(rss_kib(pid).1)
    })
}

/// Another initiator's view during an attack: how long a login (and
/// clearing its unit attention) took, and TEST UNIT READY latencies.
struct Bystander {
    login: Duration,
    latencies: Vec<Duration>,
}

fn bystander(addr: SocketAddr, iqn: &str, isid: u64, for_how_long: Duration) -> Bystander {
    let start = Instant::now();
    let mut c = connect(addr);
    login(&mut c, iqn, isid);
    c.clear_ua();
    let login = start.elapsed();
    let latencies = tur_latencies(&mut c, for_how_long);
    Bystander { login, latencies }
}

/// TEST UNIT READY latencies over `for_how_long`.
fn tur_latencies(c: &mut RawClient, for_how_long: Duration) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let end = Instant::now() + for_how_long;
    while Instant::now() < end {
        let t = Instant::now();
        assert_eq!(c.status_of(&[0; 6]), Some(0), "TEST UNIT READY");
        latencies.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    latencies
}

fn p99(mut v: Vec<Duration>) -> Duration {
    assert!(!v.is_empty());
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[test]
fn read_burst_without_reading_is_bounded_and_stalls_nobody() {
    let (bin, other) = binary();
    let mut serve = Serve::builder(bin).size("256M").start();
    let pid = serve.pid().expect("serve pid");
    let addr = serve.portals()[0];
    let iqn = serve.iqn().to_string();
    let (idle_rss, _) = rss_kib(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let peak = watch_rss(pid, stop.clone());
    // Another session, logged in before the attack, measures throughout.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let measure = {
        let iqn = iqn.clone();
        std::thread::spawn(move || {
            let mut c = connect(addr);
            login(&mut c, &iqn, 0x4000_0000_0002);
            c.clear_ua();
            let _ = ready_tx.send(());
            tur_latencies(&mut c, Duration::from_secs(6))
        })
    };
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("bystander logged in");
    // The attacker: a full window of 16 MiB READ(16)s in one send, never
    // read back.
    let mut a = connect(addr);
    login(&mut a, &iqn, 0x4000_0000_0001);
    a.clear_ua();
    let window = a.max_cmd_sn.wrapping_sub(a.cmd_sn).wrapping_add(1);
    let mut burst = BytesMut::new();
    for k in 0..window {
        let lba = u64::from(k % 16) * 32768;
        let (_, pdu) = a.command_pdu(&read16(lba, 32768), true, false, 16 << 20, Bytes::new());
        a.encode(&pdu, &mut burst);
    }
    std::thread::sleep(Duration::from_millis(200));
    a.stream.write_all(&burst).expect("send the burst");
    // A legitimate client logs in during the attack.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut l = connect(addr);
    login(&mut l, &iqn, 0x4000_0000_0003);
    l.clear_ua();
    let login = t.elapsed();
    let latencies = measure.join().unwrap();
    let b = Bystander { login, latencies };
    stop.store(true, Ordering::SeqCst);
    let peak_kib = peak.join().unwrap();
    let tur_p99 = p99(b.latencies.clone());
    eprintln!(
        "attack 1 (read burst, window {window} x 16 MiB): idle RSS {} MiB, peak RSS {} MiB, \
         login during the attack {:?}, bystander TUR p99 {:?} over {} commands{}",
        idle_rss / 1024,
        peak_kib / 1024,
        b.login,
        tur_p99,
        b.latencies.len(),
        if other { " (KEYFENCE_HOSTILE_BIN)" } else { "" }
    );
    drop(a);
    assert!(serve.is_running(), "the server survived");
    assert!(
        peak_kib < 600 << 10,
        "peak RSS {} MiB under the read burst",
        peak_kib / 1024
    );
    assert!(tur_p99 < Duration::from_millis(100), "TUR p99 {tur_p99:?}");
    assert!(
        b.login < Duration::from_secs(1),
        "login and first commands took {:?}",
        b.login
    );
    serve.stop();
}

/// One attacker session: writes of 16 MiB, every byte the target asks
/// for but the last 512, answering pings; returns whether the target
/// closed the connection before `until`.
fn stalled_writer(addr: SocketAddr, iqn: &str, isid: u64, writes: u32, until: Instant) -> bool {
    let mut c = connect(addr);
    c.stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    login(&mut c, iqn, isid);
    let mut burst = BytesMut::new();
    let mut itts = Vec::new();
    for k in 0..writes {
        let (itt, pdu) = c.command_pdu(
            &write16(u64::from(k) * 32768, 32768),
            false,
            true,
            16 << 20,
            Bytes::new(),
        );
        itts.push(itt);
        c.encode(&pdu, &mut burst);
    }
    if c.stream.write_all(&burst).is_err() {
        return true;
    }
    let chunk = Bytes::from(vec![0xa5u8; 262_144]);
    while Instant::now() < until {
        let p = match c.next_or_quiet() {
            Next::Pdu(p) => p,
            Next::Quiet => continue,
            Next::Closed => return true,
        };
        match p {
            TargetPdu::R2t(r) => {
                let end = r.buffer_offset + r.desired_data_transfer_length;
                // Stop 512 bytes short of the end of the command.
                let stop_at = if end >= 16 << 20 { end - 512 } else { end };
                let mut off = r.buffer_offset;
                let mut sn = 0;
                let mut out = BytesMut::new();
                while off < stop_at {
                    let n = (stop_at - off).min(chunk.len() as u32);
                    let d = DataOut {
                        final_bit: off + n == end,
                        lun: Lun::from_number(0).unwrap(),
                        itt: r.itt,
                        ttt: r.ttt,
                        exp_stat_sn: c.exp_stat_sn,
                        data_sn: sn,
                        buffer_offset: off,
                        data: chunk.slice(..n as usize),
                    };
                    c.encode(&d.to_pdu(), &mut out);
                    off += n;
                    sn += 1;
                }
                if c.stream.write_all(&out).is_err() {
                    return true;
                }
            }
            TargetPdu::NopIn(n) if n.ttt != RESERVED_TAG => c.answer_ping(n.ttt),
            _ => {}
        }
    }
    false
}

#[test]
fn stalled_writes_are_bounded_and_timed_out() {
    let (bin, other) = binary();
    let old_config = std::env::var_os("KEYFENCE_HOSTILE_OLD_CONFIG").is_some();
    let dir = tempfile::tempdir().unwrap();
    let iqn = "iqn.2026-11.io.keyfence:stall";
    let config = dir.path().join("keyfence.toml");
    // A build from before the fixes does not know the new keys.
    let (new_keys, open) = if old_config {
        ("", "")
    } else {
        (
            "data_out_timeout_secs = 5\nmax_buffered_bytes = \"256M\"\n",
            "open = true\n",
        )
    };
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[limits]\n{new_keys}\n[[target]]\nname = \"{iqn}\"\n\
             portals = [\"127.0.0.1:0\"]\n{open}[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"256M\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut serve = Serve::builder(bin).config(&config).start();
    let pid = serve.pid().expect("serve pid");
    let addr = serve.portals()[0];
    let (idle_rss, _) = rss_kib(pid);

    const SESSIONS: u64 = 12;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = watch_rss(pid, stop.clone());
    let until = Instant::now() + Duration::from_secs(14);
    let closed = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..SESSIONS)
        .map(|k| {
            let closed = closed.clone();
            std::thread::spawn(move || {
                if stalled_writer(addr, iqn, 0x4000_0000_0100 + k, 8, until) {
                    closed.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let b = bystander(addr, iqn, 0x4000_0000_0200, Duration::from_secs(3));
    for a in attackers {
        a.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let peak_kib = peak.join().unwrap();
    let tur_p99 = p99(b.latencies.clone());
    let closed = closed.load(Ordering::SeqCst);
    eprintln!(
        "attack 2 ({SESSIONS} sessions x 8 stalled 16 MiB writes): idle RSS {} MiB, peak RSS {} MiB, \
         login during the attack {:?}, bystander TUR p99 {:?}, attacker connections closed by the target: {closed}{}",
        idle_rss / 1024,
        peak_kib / 1024,
        b.login,
        tur_p99,
        match (other, old_config) {
            (true, true) => " (KEYFENCE_HOSTILE_BIN, default limits)",
            (true, false) => " (KEYFENCE_HOSTILE_BIN)",
            (false, true) => " (default limits)",
            (false, false) => "",
        }
    );
    assert!(serve.is_running(), "the server survived");
    assert!(
        peak_kib < 600 << 10,
        "peak RSS {} MiB under stalled writes",
        peak_kib / 1024
    );
    // Sessions whose writes all ended with TASK SET FULL (the server's
    // budget was taken) hold nothing and stay; those that held write data
    // were dropped once their Data-Out stalled.
    assert!(closed >= 1, "no stalled session was timed out");
    assert!(tur_p99 < Duration::from_millis(100), "TUR p99 {tur_p99:?}");
    assert!(b.login < Duration::from_secs(5), "login took {:?}", b.login);
    serve.stop();
}

/// Read data waiting to be sent counts against `max_buffered_bytes`: many
/// sessions that each send a full window of 1 MiB reads and never read
/// back together hold no more than the configured limit (before, each
/// held its own 32 MiB data-in budget whatever the server's limit).
#[test]
fn unread_read_data_counts_in_max_buffered_bytes() {
    let (bin, other) = binary();
    let dir = tempfile::tempdir().unwrap();
    let iqn = "iqn.2026-11.io.keyfence:unread";
    let config = dir.path().join("keyfence.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[limits]\nmax_buffered_bytes = \"24M\"\n\n[[target]]\n\
             name = \"{iqn}\"\nportals = [\"127.0.0.1:0\"]\nopen = true\n[[target.lun]]\n\
             id = 0\npath = \"lun0.img\"\nsize = \"256M\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut serve = Serve::builder(bin).config(&config).start();
    let pid = serve.pid().expect("serve pid");
    let addr = serve.portals()[0];
    let (idle_rss, _) = rss_kib(pid);

    const SESSIONS: u64 = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = watch_rss(pid, stop.clone());
    let mut attackers = Vec::new();
    for k in 0..SESSIONS {
        let mut a = connect(addr);
        login(&mut a, iqn, 0x4000_0000_0300 + k);
        a.clear_ua();
        let window = a.max_cmd_sn.wrapping_sub(a.cmd_sn).wrapping_add(1);
        let mut burst = BytesMut::new();
        for j in 0..window {
            let lba = (k * 64 + u64::from(j)) % 256 * 2048;
            let (_, pdu) = a.command_pdu(&read16(lba, 2048), true, false, 1 << 20, Bytes::new());
            a.encode(&pdu, &mut burst);
        }
        a.stream.write_all(&burst).expect("send the burst");
        attackers.push(a);
    }
    // Let the reads run and their data pile up, then measure another
    // session meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    let b = bystander(addr, iqn, 0x4000_0000_0400, Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let peak_kib = peak.join().unwrap();
    let tur_p99 = p99(b.latencies.clone());
    let growth_mib = peak_kib.saturating_sub(idle_rss) / 1024;
    eprintln!(
        "unread reads ({SESSIONS} sessions x a full window of 1 MiB, limit 24 MiB): idle RSS {} \
         MiB, peak RSS {} MiB (+{growth_mib} MiB), login during it {:?}, bystander TUR p99 {:?}{}",
        idle_rss / 1024,
        peak_kib / 1024,
        b.login,
        tur_p99,
        if other { " (KEYFENCE_HOSTILE_BIN)" } else { "" }
    );
    drop(attackers);
    assert!(serve.is_running(), "the server survived");
    // 24 MiB of read data, plus allocator and runtime slack.
    assert!(
        growth_mib < 24 + 40,
        "RSS grew by {growth_mib} MiB with max_buffered_bytes = 24M"
    );
    assert!(tur_p99 < Duration::from_millis(100), "TUR p99 {tur_p99:?}");
    assert!(b.login < Duration::from_secs(5), "login took {:?}", b.login);
    serve.stop();
}
