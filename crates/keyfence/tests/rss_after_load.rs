//! Memory comes back after load: 16 sessions each keep 32 READ(10)s of
//! 1 MiB in flight for a while, then leave; the spawned `keyfence serve`'s
//! RSS must fall back near its idle size (the allocator keeps freed memory
//! during load and gives it back once the server is idle).
//!
//! `KEYFENCE_RSS_BIN=/path/to/keyfence` runs it against another build to
//! compare; figures are printed on stderr (`-- --nocapture`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::keys::TextBuilder;
use keyfence_iscsi::pdu::{LoginRequest, ScsiCommand, Stage, TargetPdu, TaskAttr};
use keyfence_iscsi::{Cdb, Lun, Pdu, PduCodec};

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

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Raw {
    s: TcpStream,
    codec: PduCodec,
    rbuf: BytesMut,
    cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw {
            s,
            codec: PduCodec::new(),
            rbuf: BytesMut::with_capacity(1 << 20),
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 0,
        }
    }

    fn send(&mut self, pdu: &Pdu) {
        let mut out = BytesMut::new();
        self.codec.encode(pdu, &mut out).unwrap();
        self.s.write_all(&out).expect("send");
    }

    fn recv(&mut self) -> TargetPdu {
        loop {
            if let Some(p) = self.codec.decode(&mut self.rbuf).expect("decode") {
                return TargetPdu::parse(&p).expect("parse");
            }
            let mut tmp = vec![0u8; 1 << 18];
            let n = self.s.read(&mut tmp).expect("read");
            assert!(n > 0, "target closed the connection");
            self.rbuf.extend_from_slice(&tmp[..n]);
        }
    }

    fn login(&mut self, isid: u64) {
        let mut t = TextBuilder::new();
        t.push("InitiatorName", &format!("{IQN}-initiator-{isid}"));
        t.push("SessionType", "Normal");
        t.push("TargetName", IQN);
        t.push("HeaderDigest", "None");
        t.push("DataDigest", "None");
        t.push("MaxRecvDataSegmentLength", "262144");
        t.push("MaxBurstLength", "1048576");
        let mut data = t.finish();
        for _ in 0..4 {
            let req = LoginRequest {
                transit: true,
                cont: false,
                csg: Stage::Operational,
                nsg: Stage::FullFeature,
                version_max: 0,
                version_min: 0,
                isid,
                tsih: 0,
                itt: self.itt,
                cid: 1,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                data,
            };
            self.send(&req.to_pdu());
            let TargetPdu::LoginResponse(r) = self.recv() else {
                panic!("no login response");
            };
            assert_eq!(r.status_class, 0, "login refused");
            self.exp_stat_sn = r.stat_sn.wrapping_add(1);
            if r.transit && r.nsg == Stage::FullFeature {
                self.itt += 1;
                self.codec.set_max_send_data_segment_length(262_144);
                self.codec.set_max_recv_data_segment_length(262_144);
                return;
            }
            data = Bytes::new();
        }
        panic!("login did not complete");
    }

    fn command(&mut self, cdb: &[u8], edtl: u32) {
        self.itt += 1;
        let cmd = ScsiCommand {
            immediate: false,
            final_bit: true,
            read: edtl > 0,
            write: false,
            attr: TaskAttr::Simple,
            lun: Lun::from_number(0).unwrap(),
            itt: self.itt,
            expected_data_transfer_length: edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: Cdb::new(cdb).unwrap(),
            bidi_read_length: None,
            data: Bytes::new(),
        };
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&cmd.to_pdu());
    }

    /// Wait for `n` command completions (status), ignoring data.
    fn completions(&mut self, mut n: usize) -> Vec<u8> {
        let mut st = Vec::new();
        while n > 0 {
            match self.recv() {
                TargetPdu::DataIn(d) => {
                    if let Some(s) = d.status {
                        self.exp_stat_sn = d.stat_sn.wrapping_add(1);
                        st.push(s);
                        n -= 1;
                    }
                }
                TargetPdu::ScsiResponse(r) => {
                    self.exp_stat_sn = r.stat_sn.wrapping_add(1);
                    st.push(r.status);
                    n -= 1;
                }
                _ => {}
            }
        }
        st
    }
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// One session: log in, clear the unit attention, keep DEPTH 1 MiB reads
/// in flight (reading the answers slowly) until `until`.
fn reader(addr: SocketAddr, isid: u64, until: Instant) -> usize {
    let mut c = Raw::connect(addr);
    c.login(isid);
    for _ in 0..4 {
        c.command(&[0u8; 6], 0);
        if c.completions(1) == [0] {
            break;
        }
    }
    let mut done = 0;
    let blocks_total = (64u32 << 20) / 512;
    while Instant::now() < until {
        for k in 0..DEPTH {
            let lba = ((done + k) as u32 * u32::from(READ_BLOCKS)) % blocks_total;
            c.command(&read10(lba, READ_BLOCKS), u32::from(READ_BLOCKS) * 512);
        }
        // Let the target build up its data-in before reading it.
        std::thread::sleep(Duration::from_millis(50));
        let st = c.completions(DEPTH);
        assert!(st.iter().all(|s| *s == 0), "read status {st:?}");
        done += DEPTH;
    }
    done
}

#[test]
fn rss_returns_near_idle_after_large_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--target-name",
            IQN,
            "--size",
            "64M",
            "--log-level",
            "error",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn keyfence serve");
    let mut serve = Serve(child);
    let pid = serve.0.id();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(addr).is_err() {
        assert!(matches!(serve.0.try_wait(), Ok(None)), "serve exited");
        assert!(Instant::now() < deadline, "serve did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
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
