//! The real server over real TCP on 127.0.0.1 (ephemeral ports), driven by
//! raw PDUs built with the `iscsi` crate and by libiscsi's command-line
//! tools (which must be installed: the tests fail, saying how, without them).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::keys::TextBuilder;
use keyfence_iscsi::pdu::{
    Cdb, DataIn, DataOut, InitiatorPdu, LoginRequest, LoginResponse, R2t, Reject, ScsiCommand,
    ScsiResponse, Stage, TargetPdu, TaskAttr, TextRequest, TextResponse,
};
use keyfence_iscsi::{Lun, Pdu};
use keyfence_target::config::{ChapConfig, Config, Limits, Secret};
use keyfence_target::server::ServerError;
use keyfence_testkit::fdinfo::{open_flags, opened_direct};
use keyfence_testkit::raw::{read10, write10};
use keyfence_testkit::{InProcessServer, LoginKeys, RawClient, ServerOptions};

const IQN: &str = "iqn.2026-11.io.keyfence:test";
const INITIATOR: &str = "iqn.2026-11.io.keyfence:test-initiator";
const SIZE: u64 = 16 << 20;

/// The server under test, in this process (from the workspace test kit).
struct TestServer {
    inner: InProcessServer,
    portals: Vec<SocketAddr>,
}

impl TestServer {
    fn start(portals: usize, limits: Limits) -> TestServer {
        Self::start_with_chap(portals, limits, None, None)
    }

    fn start_with_chap(
        portals: usize,
        limits: Limits,
        chap: Option<ChapConfig>,
        discovery_chap: Option<ChapConfig>,
    ) -> TestServer {
        let inner = InProcessServer::start(ServerOptions {
            iqn: IQN.into(),
            portals,
            size: SIZE,
            limits,
            chap,
            discovery_chap,
        });
        let portals = inner.portals();
        TestServer { inner, portals }
    }

    fn image(&self) -> PathBuf {
        self.inner.image()
    }

    fn url(&self, i: usize) -> String {
        self.inner.url(i)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.inner.block_on(f)
    }

    /// Stop as SIGTERM would and wait for the server to finish.
    fn shutdown(&mut self) {
        self.inner.shutdown();
    }
}

/// The raw-PDU initiator of the test kit, logged in the way these tests
/// expect: MaxBurstLength 256 KiB, FirstBurstLength 64 KiB.
type Client = RawClient;

fn connect(addr: SocketAddr) -> Client {
    RawClient::connect(addr, Duration::from_secs(10))
}

/// Log in (operational stage straight to full feature phase); a discovery
/// session when `target` is `None`.
fn login(c: &mut Client, isid: u64, target: Option<&str>) -> LoginResponse {
    login_with(c, isid, target, false)
}

/// Log in, optionally asking for CRC32C header and data digests.
fn login_with(c: &mut Client, isid: u64, target: Option<&str>, digests: bool) -> LoginResponse {
    c.login(&LoginKeys {
        initiator: INITIATOR,
        target,
        isid,
        digests,
        max_burst: 262_144,
        first_burst: 65_536,
    })
}

fn quick_limits() -> Limits {
    Limits {
        nop_in_interval_secs: 1,
        nop_in_timeout_secs: 1,
        ..Limits::default()
    }
}

#[test]
fn login_read_write_and_residuals() {
    let srv = TestServer::start(1, Limits::default());
    let mut c = connect(srv.portals[0]);
    let r = login(&mut c, 0x23d0_0000_0001, Some(IQN));
    assert_eq!(r.status_class, 0, "login accepted");
    assert_ne!(r.tsih, 0);
    c.clear_ua();

    // Write 2 blocks with immediate data, read them back.
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    c.command(
        &write10(8, 2),
        false,
        true,
        1024,
        Bytes::from(pattern.clone()),
    );
    let (_, st, res) = c.collect();
    assert_eq!((st, res), (0, keyfence_iscsi::pdu::Residual::None));
    c.command(&read10(8, 2), true, false, 1024, Bytes::new());
    let (data, st, res) = c.collect();
    assert_eq!((st, res), (0, keyfence_iscsi::pdu::Residual::None));
    assert_eq!(data, pattern);

    // EDTL larger than the transfer: underflow; smaller: overflow.
    c.command(&read10(8, 1), true, false, 10000, Bytes::new());
    let (data, st, res) = c.collect();
    assert_eq!(
        (data.len(), st, res),
        (
            512,
            0,
            keyfence_iscsi::pdu::Residual::Underflow(10000 - 512)
        )
    );
    c.command(&read10(8, 1), true, false, 200, Bytes::new());
    let (data, st, res) = c.collect();
    assert_eq!(
        (data.len(), st, res),
        (200, 0, keyfence_iscsi::pdu::Residual::Overflow(512 - 200))
    );
    assert_eq!(&data[..], &pattern[..200]);
}

#[test]
fn write_with_r2t() {
    let srv = TestServer::start(1, Limits::default());
    let mut c = connect(srv.portals[0]);
    assert_eq!(login(&mut c, 0x23d0_0000_0002, Some(IQN)).status_class, 0);
    c.clear_ua();
    // 128 KiB: 64 KiB immediate data (FirstBurstLength), the rest by R2T.
    let blocks = 256u16;
    let len = usize::from(blocks) * 512;
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let first = Bytes::copy_from_slice(&pattern[..65536]);
    let itt = c.command(&write10(100, blocks), false, true, len as u32, first);
    let mut sent = 65536usize;
    while sent < len {
        let TargetPdu::R2t(r2t) = c.recv_target() else {
            panic!("expected R2T")
        };
        let R2t {
            ttt,
            buffer_offset,
            desired_data_transfer_length,
            ..
        } = r2t;
        assert_eq!(buffer_offset as usize, sent);
        let end = sent + desired_data_transfer_length as usize;
        let mut data_sn = 0;
        let mut off = sent;
        while off < end {
            let n = (end - off).min(8192);
            let d = DataOut {
                final_bit: off + n == end,
                lun: Lun::from_number(0).unwrap(),
                itt,
                ttt,
                exp_stat_sn: c.exp_stat_sn,
                data_sn,
                buffer_offset: off as u32,
                data: Bytes::copy_from_slice(&pattern[off..off + n]),
            };
            c.send(&d.to_pdu());
            data_sn += 1;
            off += n;
        }
        sent = end;
    }
    let (_, st, _) = c.collect();
    assert_eq!(st, 0);
    c.command(&read10(100, blocks), true, false, len as u32, Bytes::new());
    let (data, st, _) = c.collect();
    assert_eq!(st, 0);
    assert!(data == pattern, "data read back differs");
}

/// A command with a task attribute, to be sent without waiting.
fn with_attr(c: &mut Client, cdb: &[u8], read: bool, edtl: u32, attr: TaskAttr) -> (u32, Pdu) {
    let itt = c.next_itt();
    let cmd = ScsiCommand {
        immediate: false,
        final_bit: true,
        read,
        write: false,
        attr,
        lun: Lun::from_number(0).unwrap(),
        itt,
        expected_data_transfer_length: edtl,
        cmd_sn: c.cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        cdb: Cdb::new(cdb).unwrap(),
        bidi_read_length: None,
        data: Bytes::new(),
    };
    c.cmd_sn = c.cmd_sn.wrapping_add(1);
    (itt, cmd.to_pdu())
}

/// The ITT whose status arrives next.
fn next_status_itt(c: &mut Client) -> u32 {
    loop {
        match c.recv_target() {
            TargetPdu::DataIn(d) if d.status.is_some() => return d.itt,
            TargetPdu::DataIn(_) => {}
            TargetPdu::ScsiResponse(r) => return r.itt,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn ordered_task_waits_for_older_tasks() {
    let srv = TestServer::start(1, Limits::default());
    let mut c = connect(srv.portals[0]);
    assert_eq!(login(&mut c, 0x23d0_0000_0009, Some(IQN)).status_class, 0);
    c.clear_ua();
    // SYNCHRONIZE CACHE runs on the blocking pool; a READ with ORDERED
    // attribute sent right behind it must not complete before it.
    let sync = [0x35u8, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for _ in 0..5 {
        let (s, p1) = with_attr(&mut c, &sync, false, 0, TaskAttr::Simple);
        let (r, p2) = with_attr(&mut c, &read10(0, 8), true, 4096, TaskAttr::Ordered);
        // One TCP write: the target decodes both before executing either,
        // so a SIMPLE READ would finish while the flush is still running.
        let mut out = BytesMut::new();
        c.encode(&p1, &mut out);
        c.encode(&p2, &mut out);
        c.stream.write_all(&out).unwrap();
        assert_eq!(
            next_status_itt(&mut c),
            s,
            "SYNCHRONIZE CACHE completes first"
        );
        assert_eq!(next_status_itt(&mut c), r);
    }
}

#[test]
fn crc32c_digests_on_every_pdu() {
    let srv = TestServer::start(1, Limits::default());
    let mut c = connect(srv.portals[0]);
    let r = login_with(&mut c, 0x23d0_0000_000a, Some(IQN), true);
    assert_eq!(r.status_class, 0);
    c.clear_ua();
    // 8 KiB goes out as its own iovec, 512 bytes is copied: both must
    // carry the right padding and data digest (the client's codec checks).
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 1) as u8).collect();
    c.command(
        &write10(64, 16),
        false,
        true,
        8192,
        Bytes::from(pattern.clone()),
    );
    assert_eq!(c.collect().1, 0);
    c.command(&read10(64, 16), true, false, 8192, Bytes::new());
    let (data, st, _) = c.collect();
    assert_eq!((st, data.len()), (0, 8192));
    assert!(data == pattern);
    c.command(&read10(64, 1), true, false, 512, Bytes::new());
    let (data, st, _) = c.collect();
    assert_eq!((st, &data[..]), (0, &pattern[..512]));
}

#[test]
fn data_digest_error_gets_reject_and_the_session_goes_on() {
    let srv = TestServer::start(1, Limits::default());
    let mut c = connect(srv.portals[0]);
    assert_eq!(
        login_with(&mut c, 0x23d0_0000_000f, Some(IQN), true).status_class,
        0
    );
    c.clear_ua();
    // A NOP-Out ping with 8 bytes of data whose data digest is wrong.
    let mut bhs = [0u8; 48];
    bhs[0] = 0x40;
    bhs[1] = 0x80;
    bhs[16..20].copy_from_slice(&9u32.to_be_bytes());
    bhs[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    let pdu = Pdu::new(bhs, Bytes::new(), Bytes::from_static(b"pingdata"));
    let mut out = BytesMut::new();
    c.encode(&pdu, &mut out);
    let last = out.len() - 1;
    out[last] ^= 0xff;
    c.stream.write_all(&out).unwrap();
    let TargetPdu::Reject(r) = c.recv_target() else {
        panic!("expected Reject")
    };
    assert_eq!(r.reason, keyfence_iscsi::RejectReason::DataDigestError);
    assert_eq!(r.rejected_itt(), Some(9));
    c.command(&read10(0, 1), true, false, 512, Bytes::new());
    assert_eq!(c.collect().1, 0, "the session still works");
}

fn prout(c: &mut Client, sa: u8, prtype: u8, key: u64, sa_key: u64) -> u8 {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5f;
    cdb[1] = sa;
    cdb[2] = prtype;
    cdb[8] = 24;
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    c.command(&cdb, false, true, 24, Bytes::from(p));
    c.collect().1
}

#[test]
fn preempt_and_abort_aborts_the_preempted_nexus_tasks() {
    let srv = TestServer::start(1, Limits::default());
    let mut a = connect(srv.portals[0]);
    assert_eq!(login(&mut a, 0x23d0_0000_0010, Some(IQN)).status_class, 0);
    a.clear_ua();
    let mut b = connect(srv.portals[0]);
    assert_eq!(login(&mut b, 0x23d0_0000_0011, Some(IQN)).status_class, 0);
    b.clear_ua();
    assert_eq!(prout(&mut a, 0x00, 0, 0, 0xaa), 0, "A registers");
    assert_eq!(prout(&mut b, 0x00, 0, 0, 0xbb), 0, "B registers");
    assert_eq!(
        prout(&mut b, 0x01, 0x01, 0xbb, 0),
        0,
        "B reserves (Write Exclusive)"
    );
    // A starts a 64 KiB write without immediate data: it waits for Data-Out.
    let itt = a.command(&write10(0, 128), false, true, 65536, Bytes::new());
    let TargetPdu::R2t(r2t) = a.recv_target() else {
        panic!("expected R2T")
    };
    // B preempts A's registration and aborts A's tasks.
    assert_eq!(
        prout(&mut b, 0x05, 0x01, 0xbb, 0xaa),
        0,
        "PREEMPT AND ABORT"
    );
    // A's data arrives for an aborted task: dropped, no status for it.
    let d = DataOut {
        final_bit: true,
        lun: Lun::from_number(0).unwrap(),
        itt,
        ttt: r2t.ttt,
        exp_stat_sn: a.exp_stat_sn,
        data_sn: 0,
        buffer_offset: 0,
        data: Bytes::from(vec![0x77u8; 65536]),
    };
    a.send(&d.to_pdu());
    let tur = a.command(&[0u8; 6], false, false, 0, Bytes::new());
    assert_eq!(
        next_status_itt(&mut a),
        tur,
        "the aborted write never completes"
    );
}

fn login_tpgt(r: &LoginResponse) -> Option<u16> {
    r.data
        .split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("TargetPortalGroupTag="))
        .and_then(|v| v.parse().ok())
}

#[test]
fn config_file_with_two_targets_sharing_a_portal() {
    let dir = tempfile::tempdir().unwrap();
    // Two targets share a portal, so its port must be written into the
    // file: take free ports and retry when one is taken before the bind.
    let (mut srv, p, q) = keyfence_testkit::port::with_free_ports(2, "the server", |ports| {
        let (p, q) = (ports[0], ports[1]);
        let text = format!(
            r#"
data_dir = "data"
[[target]]
name = "iqn.2026-11.io.keyfence:a"
portals = ["127.0.0.1:{p}", "127.0.0.1:{q}"]
open = true
[[target.lun]]
id = 0
size = "4M"
[[target]]
name = "iqn.2026-11.io.keyfence:b"
portals = ["127.0.0.1:{q}"]
open = true
[[target.lun]]
id = 3
path = "b3.img"
size = "8M"
block_size = 4096
"#
        );
        let path = dir.path().join("kf.toml");
        std::fs::write(&path, text).unwrap();
        let cfg = Config::load(&path).unwrap();
        match InProcessServer::from_config(cfg) {
            Ok(srv) => Ok((srv, p, q)),
            Err(e @ ServerError::Bind { .. }) => Err(e.to_string()),
            Err(e) => panic!("{e}"),
        }
    });
    let text = srv.describe();
    assert!(
        text.contains("portal 127.0.0.1:") && text.contains("(TPGT 2)"),
        "{text}"
    );
    assert!(dir.path().join("data/lun0.img").exists());
    assert_eq!(
        std::fs::metadata(dir.path().join("data/b3.img"))
            .unwrap()
            .len(),
        8 << 20
    );
    let shared: SocketAddr = format!("127.0.0.1:{q}").parse().unwrap();
    let mut a = connect(shared);
    let r = login(&mut a, 0x23d0_0000_0012, Some("iqn.2026-11.io.keyfence:a"));
    assert_eq!((r.status_class, login_tpgt(&r)), (0, Some(2)));
    let mut b = connect(shared);
    let r = login(&mut b, 0x23d0_0000_0012, Some("iqn.2026-11.io.keyfence:b"));
    assert_eq!((r.status_class, login_tpgt(&r)), (0, Some(1)));
    // B is not served on A's first portal.
    let mut c = connect(format!("127.0.0.1:{p}").parse().unwrap());
    let r = login(&mut c, 0x23d0_0000_0013, Some("iqn.2026-11.io.keyfence:b"));
    assert_eq!(
        (r.status_class, r.status_detail),
        (2, 2),
        "a target this portal does not serve: authorization failure, as for a forbidden one"
    );
    srv.shutdown();
}

#[test]
fn session_limit_refuses_logins_beyond_it() {
    let srv = TestServer::start(
        1,
        Limits {
            max_sessions: 1,
            ..Limits::default()
        },
    );
    let mut a = connect(srv.portals[0]);
    assert_eq!(login(&mut a, 0x23d0_0000_000b, Some(IQN)).status_class, 0);
    let mut b = connect(srv.portals[0]);
    let r = login(&mut b, 0x23d0_0000_000c, Some(IQN));
    assert_eq!(
        (r.status_class, r.status_detail),
        (3, 2),
        "out of resources"
    );
    // Reinstating the existing session is still allowed at the limit.
    let mut c = connect(srv.portals[0]);
    assert_eq!(login(&mut c, 0x23d0_0000_000b, Some(IQN)).status_class, 0);
    assert!(a.recv().is_none());
}

#[test]
fn connection_limit_closes_extra_connections() {
    let srv = TestServer::start(
        1,
        Limits {
            max_connections: 1,
            ..Limits::default()
        },
    );
    let mut a = connect(srv.portals[0]);
    assert_eq!(login(&mut a, 0x23d0_0000_000d, Some(IQN)).status_class, 0);
    // max_connections counts logged-in connections: a second one may
    // log in (it holds a login slot meanwhile) but is refused a place.
    let mut b = connect(srv.portals[0]);
    let r = login(&mut b, 0x23d0_0000_00dd, Some(IQN));
    assert_eq!(
        (r.status_class, r.status_detail),
        (3, 2),
        "out of resources"
    );
    assert!(b.recv().is_none(), "refused connection closed");
    // The first one is unaffected.
    a.clear_ua();
}

#[test]
fn oversized_data_segment_is_rejected_and_the_connection_dropped() {
    let srv = TestServer::start(1, Limits::default());
    let mut c = connect(srv.portals[0]);
    assert_eq!(login(&mut c, 0x23d0_0000_000e, Some(IQN)).status_class, 0);
    // A NOP-Out announcing 1 MiB of ping data: more than the 256 KiB we
    // declared as MaxRecvDataSegmentLength.
    let mut bhs = [0u8; 48];
    bhs[0] = 0x40; // NOP-Out, immediate
    bhs[1] = 0x80;
    bhs[5..8].copy_from_slice(&[0x10, 0x00, 0x00]);
    bhs[16..20].copy_from_slice(&7u32.to_be_bytes());
    bhs[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    c.stream.write_all(&bhs).unwrap();
    let TargetPdu::Reject(r) = c.recv_target() else {
        panic!("expected Reject")
    };
    assert_eq!(r.reason, keyfence_iscsi::RejectReason::ProtocolError);
    assert!(c.recv().is_none(), "connection dropped");
}

#[test]
fn malformed_pdu_gets_reject() {
    let srv = TestServer::start(1, Limits::default());
    let mut c = connect(srv.portals[0]);
    assert_eq!(login(&mut c, 0x23d0_0000_0003, Some(IQN)).status_class, 0);
    c.clear_ua();
    // SNACK at ERL 0: Reject (protocol error) carrying our header.
    let mut bhs = [0u8; 48];
    bhs[0] = 0x10;
    bhs[1] = 0x80;
    bhs[16..20].copy_from_slice(&0x55u32.to_be_bytes());
    c.send(&Pdu::new(bhs, Bytes::new(), Bytes::new()));
    let TargetPdu::Reject(r) = c.recv_target() else {
        panic!("expected Reject")
    };
    assert_eq!(r.reason, keyfence_iscsi::RejectReason::ProtocolError);
    assert_eq!(&r.rejected_header[..], &bhs[..]);
    // Undefined opcode 0x1f: Reject (command not supported).
    let mut bhs = [0u8; 48];
    bhs[0] = 0x1f;
    c.send(&Pdu::new(bhs, Bytes::new(), Bytes::new()));
    let TargetPdu::Reject(r) = c.recv_target() else {
        panic!("expected Reject")
    };
    assert_eq!(r.reason, keyfence_iscsi::RejectReason::CommandNotSupported);
    // The session still works.
    c.command(&read10(0, 1), true, false, 512, Bytes::new());
    assert_eq!(c.collect().1, 0);
    let _ = Reject::parse;
}

#[test]
fn unknown_lun_and_report_luns() {
    let srv = TestServer::start(1, Limits::default());
    let mut c = connect(srv.portals[0]);
    assert_eq!(login(&mut c, 0x23d0_0000_0004, Some(IQN)).status_class, 0);
    // TEST UNIT READY to LUN 5: CHECK CONDITION, LOGICAL UNIT NOT SUPPORTED.
    let itt = c.next_itt();
    let cmd = ScsiCommand {
        immediate: false,
        final_bit: true,
        read: false,
        write: false,
        attr: TaskAttr::Simple,
        lun: Lun::from_number(5).unwrap(),
        itt,
        expected_data_transfer_length: 0,
        cmd_sn: c.cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        cdb: Cdb::new(&[0u8; 6]).unwrap(),
        bidi_read_length: None,
        data: Bytes::new(),
    };
    c.cmd_sn += 1;
    c.send(&cmd.to_pdu());
    let TargetPdu::ScsiResponse(ScsiResponse { status, sense, .. }) = c.recv_target() else {
        panic!("expected SCSI Response")
    };
    assert_eq!(status, 2);
    let s = keyfence_scsi::Sense::parse(&sense).unwrap();
    assert_eq!((s.key as u8, s.asc, s.ascq), (5, 0x25, 0));
}

#[test]
fn discovery_lists_every_portal_with_tpgt() {
    let srv = TestServer::start(2, Limits::default());
    let mut c = connect(srv.portals[1]);
    assert_eq!(login(&mut c, 0x23d0_0000_0005, None).status_class, 0);
    let itt = c.next_itt();
    let req = TextRequest {
        immediate: true,
        final_bit: true,
        cont: false,
        lun: Lun::default(),
        itt,
        ttt: 0xffff_ffff,
        cmd_sn: c.cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        data: {
            let mut t = TextBuilder::new();
            t.push("SendTargets", "All");
            t.finish()
        },
    };
    c.send(&req.to_pdu());
    let TargetPdu::TextResponse(TextResponse {
        data, final_bit, ..
    }) = c.recv_target()
    else {
        panic!("expected Text Response")
    };
    assert!(final_bit);
    // TargetAddress repeats, so split the text by hand.
    let pairs: Vec<(String, String)> = data
        .split(|&b| b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(pairs[0], ("TargetName".to_string(), IQN.to_string()));
    let addrs: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "TargetAddress")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        addrs,
        vec![
            format!("{},1", srv.portals[0]),
            format!("{},2", srv.portals[1])
        ]
    );
}

#[test]
fn reinstatement_replaces_the_old_session() {
    let srv = TestServer::start(1, Limits::default());
    let mut a = connect(srv.portals[0]);
    assert_eq!(login(&mut a, 0x23d0_0000_0006, Some(IQN)).status_class, 0);
    let mut b = connect(srv.portals[0]);
    let r = login(&mut b, 0x23d0_0000_0006, Some(IQN));
    assert_eq!(r.status_class, 0);
    assert_ne!(r.tsih, a.tsih, "a new session");
    // The old connection is closed by the target.
    assert!(a.recv().is_none(), "old connection dropped");
    // The new one works and first reports the nexus loss of the old one.
    b.command(&[0u8; 6], false, false, 0, Bytes::new());
    let (_, st, _) = b.collect();
    assert!(st == 0 || st == 2);
}

#[test]
fn idle_connection_is_pinged_and_dropped_when_silent() {
    let srv = TestServer::start(1, quick_limits());
    let mut c = connect(srv.portals[0]);
    assert_eq!(login(&mut c, 0x23d0_0000_0007, Some(IQN)).status_class, 0);
    let TargetPdu::NopIn(n) = c.recv_target() else {
        panic!("expected a NOP-In ping")
    };
    assert_eq!(n.itt, 0xffff_ffff);
    assert_ne!(n.ttt, 0xffff_ffff);
    // We do not answer: the target drops the connection.
    assert!(c.recv().is_none());
}

#[test]
fn shutdown_flushes_written_data() {
    let mut srv = TestServer::start(1, Limits::default());
    let mut c = connect(srv.portals[0]);
    assert_eq!(login(&mut c, 0x23d0_0000_0008, Some(IQN)).status_class, 0);
    c.clear_ua();
    let data = vec![0x5au8; 4096];
    c.command(
        &write10(2048, 8),
        false,
        true,
        4096,
        Bytes::from(data.clone()),
    );
    assert_eq!(c.collect().1, 0);
    srv.shutdown();
    let mut f = std::fs::File::open(srv.image()).unwrap();
    let mut buf = vec![0u8; 4096];
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(2048 * 512)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, data);
    // The connection was closed by the shutdown.
    assert!(c.recv().is_none());
}

/// A LUN with `direct = true`: its backing file is open O_DIRECT, an
/// acknowledged WRITE (no SYNCHRONIZE CACHE) is on the file for another
/// reader, and READs come back. A file system that refuses direct I/O
/// stops the start with one line naming the target and LUN.
#[test]
fn a_direct_lun_is_served_uncached_and_needs_direct_io() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerOptions::default().config(dir.path());
    // 4096-byte blocks meet every file system's direct-I/O alignment.
    cfg.targets[0].luns[0].direct = true;
    cfg.targets[0].luns[0].block_size = 4096;
    let mut srv = InProcessServer::from_config(cfg).unwrap();
    let me = std::process::id();
    assert!(
        opened_direct(me, &srv.image()),
        "backing file open flags {:?}",
        open_flags(me, &srv.image())
    );
    let mut c = connect(srv.portals()[0]);
    assert_eq!(login(&mut c, 0x23d0_0000_0031, Some(IQN)).status_class, 0);
    c.clear_ua();
    let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 249) as u8).collect();
    c.command(
        &write10(5, 3),
        false,
        true,
        3 * 4096,
        Bytes::from(data.clone()),
    );
    assert_eq!(c.collect().1, 0);
    let mut on_file = vec![0u8; data.len()];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(srv.image()).unwrap(),
        &mut on_file,
        5 * 4096,
    )
    .unwrap();
    assert_eq!(on_file, data, "an acknowledged write is on the file");
    for (lba, blocks) in [(5u32, 3u16), (6, 1), (4, 5)] {
        c.command(
            &read10(lba, blocks),
            true,
            false,
            u32::from(blocks) * 4096,
            Bytes::new(),
        );
        let (got, st, _) = c.collect();
        assert_eq!(st, 0);
        let want: Vec<u8> = (lba..lba + u32::from(blocks))
            .flat_map(|b| match b {
                5..=7 => data[(b as usize - 5) * 4096..(b as usize - 4) * 4096].to_vec(),
                _ => vec![0u8; 4096],
            })
            .collect();
        assert_eq!(got, want, "READ {blocks} at {lba}");
    }
    srv.shutdown();

    // procfs refuses O_DIRECT (as tmpfs did before Linux 6.6).
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerOptions::default().config(dir.path());
    let lun = &mut cfg.targets[0].luns[0];
    (lun.path, lun.size, lun.read_only, lun.direct) =
        (Some("/proc/version".into()), None, true, true);
    match InProcessServer::from_config(cfg) {
        Err(e @ ServerError::Backend { .. }) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(
                text.starts_with(&format!("target {IQN} LUN 0: /proc/version: "))
                    && text.contains("O_DIRECT"),
                "{text}"
            );
        }
        Err(e) => panic!("not a backend error: {e}"),
        Ok(_) => panic!("a LUN on procfs served with direct = true"),
    }
}

/// Run an external tool (failing when it is not installed), bounded;
/// its stdout and stderr, failing unless it succeeds.
fn run(tool: &str, args: &[&str]) -> String {
    let out = keyfence_testkit::run(Command::new(keyfence_testkit::require(tool)).args(args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

#[test]
fn libiscsi_tools_see_the_target() {
    keyfence_testkit::require("iscsi-ls");
    let srv = TestServer::start(2, Limits::default());
    let ls = run("iscsi-ls", &[&format!("iscsi://{}", srv.portals[0])]);
    assert!(ls.contains(IQN), "{ls}");
    let inq = run("iscsi-inq", &[&srv.url(0)]);
    assert!(inq.to_ascii_lowercase().contains("keyfence"), "{inq}");
    let cap = run("iscsi-readcapacity16", &[&srv.url(1)]);
    assert!(cap.contains(&format!("{}", SIZE)), "{cap}");
}

#[test]
fn libiscsi_iscsi_suite() {
    keyfence_testkit::require("iscsi-test-cu");
    let srv = TestServer::start(2, Limits::default());
    for test in [
        "iSCSI.iSCSIResiduals.Read10Residuals",
        "iSCSI.iSCSIResiduals.Read10Invalid",
        "iSCSI.iSCSIcmdsn",
        "iSCSI.iSCSIdatasn",
        "SCSI.TestUnitReady",
        "SCSI.Read10.Simple",
    ] {
        let out = keyfence_testkit::run(Command::new("iscsi-test-cu").args([
            "-d",
            &format!("--test={test}"),
            &srv.url(0),
            &srv.url(1),
        ]));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // CUnit's summary line: "tests Total Ran Passed Failed Inactive".
        let failed = text
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&"tests") && f.len() >= 5).then(|| f[4].parse::<u32>().ok())
            })
            .flatten();
        assert!(
            failed == Some(0) && out.status.success(),
            "{test}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = InitiatorPdu::parse;
    let _ = DataIn::parse;
}

// ---- CHAP ----------------------------------------------------------------

const CHAP_USER: &str = "alice";
const CHAP_SECRET: &str = "alice-secret-0001";
const MUTUAL_USER: &str = "target1";
const MUTUAL_SECRET: &str = "target-secret-002";
const DISC_USER: &str = "discoverer";
const DISC_SECRET: &str = "discovery-secret-3";

fn chap(user: &str, secret: &str, mutual: Option<(&str, &str)>) -> ChapConfig {
    ChapConfig {
        user: user.into(),
        secret: Secret::new(secret),
        mutual_user: mutual.map(|m| m.0.to_string()),
        mutual_secret: mutual.map(|m| Secret::new(m.1)),
    }
}

fn chap_server(discovery: bool) -> TestServer {
    TestServer::start_with_chap(
        1,
        Limits::default(),
        Some(chap(
            CHAP_USER,
            CHAP_SECRET,
            Some((MUTUAL_USER, MUTUAL_SECRET)),
        )),
        discovery.then(|| chap(DISC_USER, DISC_SECRET, None)),
    )
}

fn initiator_config(target_chap: Option<(&str, &str)>) -> keyfence_initiator::SessionConfig {
    keyfence_initiator::SessionConfig {
        initiator_name: Some(INITIATOR.into()),
        target_chap: target_chap.map(|(n, s)| (n.to_string(), s.to_string())),
        login_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

/// Log in with the keyfence initiator library as `user%secret`.
fn library_login(
    srv: &TestServer,
    userinfo: Option<&str>,
    target_chap: Option<(&str, &str)>,
) -> Result<u64, keyfence_initiator::Error> {
    let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let url = keyfence_initiator::IscsiUrl::parse_full(&format!(
        "iscsi://{auth}{}/{IQN}/0",
        srv.portals[0]
    ))
    .unwrap();
    let cfg = initiator_config(target_chap);
    srv.block_on(async {
        let dev = keyfence_initiator::Device::connect(&url, &cfg).await?;
        let blocks = dev.capacity().await?.blocks();
        dev.close().await?;
        Ok(blocks)
    })
}

fn assert_auth_failure<T: std::fmt::Debug>(r: Result<T, keyfence_initiator::Error>) {
    match r {
        Err(keyfence_initiator::Error::Login { class, detail, .. }) => {
            assert_eq!((class, detail), (0x02, 0x01), "authentication failure")
        }
        other => panic!("expected login status 0201h, got {other:?}"),
    }
}

#[test]
fn chap_login_with_the_initiator_library() {
    let srv = chap_server(false);
    let good = format!("{CHAP_USER}%{CHAP_SECRET}");
    assert_eq!(library_login(&srv, Some(&good), None).unwrap(), SIZE / 512);
    assert_auth_failure(library_login(
        &srv,
        Some(&format!("{CHAP_USER}%{CHAP_SECRET}x")),
        None,
    ));
    assert_auth_failure(library_login(
        &srv,
        Some(&format!("bob%{CHAP_SECRET}")),
        None,
    ));
    assert_auth_failure(library_login(&srv, None, None));
    // Mutual CHAP: the target proves it knows its secret.
    assert_eq!(
        library_login(&srv, Some(&good), Some((MUTUAL_USER, MUTUAL_SECRET))).unwrap(),
        SIZE / 512
    );
    // An initiator expecting another target secret refuses the target.
    match library_login(
        &srv,
        Some(&good),
        Some((MUTUAL_USER, "not-the-target-secret")),
    ) {
        Err(keyfence_initiator::Error::Negotiation(m)) => assert!(m.contains("CHAP"), "{m}"),
        other => panic!("mutual CHAP with a wrong secret succeeded: {other:?}"),
    }
}

#[test]
fn chap_mutual_challenge_without_mutual_credentials_is_refused() {
    let srv = TestServer::start_with_chap(
        1,
        Limits::default(),
        Some(chap(CHAP_USER, CHAP_SECRET, None)),
        None,
    );
    let good = format!("{CHAP_USER}%{CHAP_SECRET}");
    assert_eq!(library_login(&srv, Some(&good), None).unwrap(), SIZE / 512);
    // The target has nothing to answer a challenge with.
    assert_auth_failure(library_login(
        &srv,
        Some(&good),
        Some((MUTUAL_USER, MUTUAL_SECRET)),
    ));
}

/// Send one Login Request; the response.
fn login_step(
    c: &mut Client,
    isid: u64,
    csg: Stage,
    transit: bool,
    pairs: &[(&str, &str)],
) -> LoginResponse {
    let mut t = TextBuilder::new();
    for (k, v) in pairs {
        t.push(k, v);
    }
    let req = LoginRequest {
        transit,
        cont: false,
        csg,
        nsg: if transit { Stage::Operational } else { csg },
        version_max: 0,
        version_min: 0,
        isid,
        tsih: 0,
        itt: c.itt,
        cid: 1,
        cmd_sn: c.cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        data: t.finish(),
    };
    c.send(&req.to_pdu());
    let TargetPdu::LoginResponse(r) = c.recv_target() else {
        panic!("expected a login response");
    };
    c.exp_stat_sn = r.stat_sn.wrapping_add(1);
    r
}

fn status(r: &LoginResponse) -> (u8, u8) {
    (r.status_class, r.status_detail)
}

#[test]
fn chap_target_offers_only_chap_and_refuses_bad_responses() {
    let srv = chap_server(false);
    let leading = [
        ("InitiatorName", INITIATOR),
        ("SessionType", "Normal"),
        ("TargetName", IQN),
    ];

    // None and CHAP offered: the target picks CHAP and does not move on.
    let mut c = connect(srv.portals[0]);
    let mut first = leading.to_vec();
    first.push(("AuthMethod", "None,CHAP"));
    let r = login_step(&mut c, 0x0001, Stage::Security, true, &first);
    assert_eq!(status(&r), (0, 0));
    let keys = keyfence_iscsi::keys::parse(&r.data).unwrap();
    assert_eq!(keyfence_iscsi::keys::get(&keys, "AuthMethod"), Some("CHAP"));
    assert!(!r.transit, "no transit before authentication");
    let r = login_step(&mut c, 0x0001, Stage::Security, false, &[("CHAP_A", "5")]);
    assert_eq!(status(&r), (0, 0));
    let keys = keyfence_iscsi::keys::parse(&r.data).unwrap();
    assert_eq!(keyfence_iscsi::keys::get(&keys, "CHAP_A"), Some("5"));
    let id: u8 = keyfence_iscsi::keys::get(&keys, "CHAP_I")
        .unwrap()
        .parse()
        .unwrap();
    let challenge = keyfence_iscsi::keys::get(&keys, "CHAP_C")
        .unwrap()
        .to_string();
    let challenge = keyfence_iscsi::keys::decode_binary(&challenge).unwrap();
    // A response computed with the wrong secret.
    let wrong = keyfence_iscsi::chap::response(id, b"wrong-secret-000", &challenge);
    let r = login_step(
        &mut c,
        0x0001,
        Stage::Security,
        true,
        &[
            ("CHAP_N", CHAP_USER),
            ("CHAP_R", &keyfence_iscsi::keys::encode_hex(&wrong)),
        ],
    );
    assert_eq!(status(&r), (0x02, 0x01));
    assert!(c.recv().is_none(), "connection closed after the failure");

    // AuthMethod=None only.
    let mut c = connect(srv.portals[0]);
    let mut first = leading.to_vec();
    first.push(("AuthMethod", "None"));
    let r = login_step(&mut c, 0x0002, Stage::Security, true, &first);
    assert_eq!(status(&r), (0x02, 0x01));

    // Leaving out the security stage altogether.
    let mut c = connect(srv.portals[0]);
    let r = login(&mut c, 0x0003, Some(IQN));
    assert_eq!(status(&r), (0x02, 0x01));

    // The right response logs in.
    let mut c = connect(srv.portals[0]);
    let mut first = leading.to_vec();
    first.push(("AuthMethod", "CHAP"));
    login_step(&mut c, 0x0004, Stage::Security, true, &first);
    let r = login_step(&mut c, 0x0004, Stage::Security, false, &[("CHAP_A", "5")]);
    let keys = keyfence_iscsi::keys::parse(&r.data).unwrap();
    let id: u8 = keyfence_iscsi::keys::get(&keys, "CHAP_I")
        .unwrap()
        .parse()
        .unwrap();
    let challenge =
        keyfence_iscsi::keys::decode_binary(keyfence_iscsi::keys::get(&keys, "CHAP_C").unwrap())
            .unwrap();
    let right = keyfence_iscsi::chap::response(id, CHAP_SECRET.as_bytes(), &challenge);
    let r = login_step(
        &mut c,
        0x0004,
        Stage::Security,
        true,
        &[
            ("CHAP_N", CHAP_USER),
            ("CHAP_R", &keyfence_iscsi::keys::encode_hex(&right)),
        ],
    );
    assert_eq!(status(&r), (0, 0));
    assert!(r.transit && r.nsg == Stage::Operational);
}

#[test]
fn chap_for_discovery_sessions() {
    let srv = chap_server(true);
    let portal = |auth: &str| {
        keyfence_initiator::IscsiUrl::parse(&format!("iscsi://{auth}{}", srv.portals[0])).unwrap()
    };
    let cfg = initiator_config(None);
    let found = srv
        .block_on(keyfence_initiator::discover(
            &portal(&format!("{DISC_USER}%{DISC_SECRET}@")),
            &cfg,
        ))
        .unwrap();
    assert!(found.iter().any(|t| t.name == IQN), "{found:?}");
    assert_auth_failure(srv.block_on(keyfence_initiator::discover(&portal(""), &cfg)));
    // The target's credentials are not the discovery credentials.
    assert_auth_failure(srv.block_on(keyfence_initiator::discover(
        &portal(&format!("{CHAP_USER}%{CHAP_SECRET}@")),
        &cfg,
    )));
    // Raw: a discovery login that skips security.
    let mut c = connect(srv.portals[0]);
    assert_eq!(status(&login(&mut c, 0x0005, None)), (0x02, 0x01));

    // Without [discovery_chap], discovery stays open while the target
    // itself requires CHAP.
    let open = chap_server(false);
    let mut c = connect(open.portals[0]);
    assert_eq!(status(&login(&mut c, 0x0006, None)), (0, 0));
}

#[test]
fn chap_with_libiscsi_tools() {
    keyfence_testkit::require("iscsi-inq");
    let srv = chap_server(true);
    let url = |auth: &str| format!("iscsi://{auth}@{}/{IQN}/0", srv.portals[0]);
    let inq = run(
        "iscsi-inq",
        &["-i", INITIATOR, &url(&format!("{CHAP_USER}%{CHAP_SECRET}"))],
    );
    assert!(inq.to_ascii_lowercase().contains("keyfence"), "{inq}");
    for bad in [
        format!("{CHAP_USER}%{CHAP_SECRET}0"),
        format!("mallory%{CHAP_SECRET}"),
    ] {
        let out =
            keyfence_testkit::run(Command::new("iscsi-inq").args(["-i", INITIATOR, &url(&bad)]));
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{bad}: {text}");
        assert!(text.contains("Authentication failure"), "{text}");
    }
    let ls = run(
        "iscsi-ls",
        &[
            "-i",
            INITIATOR,
            &format!("iscsi://{DISC_USER}%{DISC_SECRET}@{}", srv.portals[0]),
        ],
    );
    assert!(ls.contains(IQN), "{ls}");
    let out = keyfence_testkit::run(Command::new("iscsi-ls").args([
        "-i",
        INITIATOR,
        &format!("iscsi://{}", srv.portals[0]),
    ]));
    assert!(!out.status.success());
}

/// The credentials are chosen from the first Login Request; a target name
/// that only arrives in a continuation PDU must not bypass the target's CHAP.
#[test]
fn chap_cannot_be_bypassed_by_splitting_the_first_request() {
    let srv = chap_server(false);
    let mut c = connect(srv.portals[0]);
    let mut head = TextBuilder::new();
    head.push("InitiatorName", INITIATOR);
    let mut tail = TextBuilder::new();
    tail.push("SessionType", "Normal");
    tail.push("TargetName", IQN);
    tail.push("HeaderDigest", "None");
    tail.push("DataDigest", "None");
    for (cont, data) in [(true, head.finish()), (false, tail.finish())] {
        let req = LoginRequest {
            transit: !cont,
            cont,
            csg: Stage::Operational,
            nsg: if cont {
                Stage::Operational
            } else {
                Stage::FullFeature
            },
            version_max: 0,
            version_min: 0,
            isid: 0x0007,
            tsih: 0,
            itt: c.itt,
            cid: 1,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
            data,
        };
        c.send(&req.to_pdu());
        let TargetPdu::LoginResponse(r) = c.recv_target() else {
            panic!("expected a login response");
        };
        c.exp_stat_sn = r.stat_sn.wrapping_add(1);
        if cont {
            assert_eq!(status(&r), (0, 0));
        } else {
            assert_eq!(status(&r), (0x02, 0x01));
        }
    }
}
