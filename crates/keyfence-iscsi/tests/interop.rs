//! Interoperability on loopback with independent implementations:
//! libiscsi's `iscsi-ls` logs in to a tiny blocking target built from this
//! crate (login, CHAP, digests, SendTargets, logout), and this crate's
//! initiator logs in to `tgtd` (discovery, normal session with CRC32C
//! digests, SCSI reads and writes with immediate data and R2T).
//!
//! Both tools are part of the project's machine setup; the tests fail
//! (rather than skip) when they are missing, saying how to install them.
//! tgtd comes from the workspace test kit.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::codec::PduCodec;
use keyfence_iscsi::login::*;
use keyfence_iscsi::params::Digest;
use keyfence_iscsi::pdu::*;
use keyfence_iscsi::text::*;
use keyfence_iscsi::ChapCredential;
use keyfence_testkit::{Tgtd, TgtdOptions};

const TARGET: &str = "iqn.2026-11.org.keyfence.test:interop";

fn read_pdu(s: &mut TcpStream, codec: &mut PduCodec, buf: &mut BytesMut) -> Option<Pdu> {
    let mut chunk = [0u8; 65536];
    loop {
        match codec.decode(buf) {
            Ok(Some(p)) => return Some(p),
            Ok(None) => {}
            Err(e) => panic!("decode error: {e}"),
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn send(s: &mut TcpStream, codec: &PduCodec, p: &Pdu) {
    let mut out = BytesMut::new();
    codec.encode(p, &mut out).unwrap();
    s.write_all(&out).unwrap();
}

/// Serves one connection: login, text, logout.
fn serve(mut s: TcpStream, cfg: TargetLoginConfig, targets: Vec<SendTargetsEntry>) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut codec = PduCodec::new();
    let mut buf = BytesMut::new();
    let mut login = TargetLogin::new(cfg);
    let session = loop {
        let Some(req) = read_pdu(&mut s, &mut codec, &mut buf) else {
            return;
        };
        match login.step(&req) {
            LoginStep::Respond(r) => send(&mut s, &codec, &r),
            LoginStep::Complete { response, session } => {
                send(&mut s, &codec, &response);
                break session;
            }
            LoginStep::Failed { response, .. } => {
                send(&mut s, &codec, &response);
                return;
            }
        }
    };
    codec.apply(&session.params);
    let mut stat_sn = session.next_stat_sn;
    let mut exp_cmd_sn = session.exp_cmd_sn;
    let mut text = TextResponder::new();
    while let Some(p) = read_pdu(&mut s, &mut codec, &mut buf) {
        if !p.immediate() && p.opcode().map(|o| o.is_initiator()).unwrap_or(false) {
            let cmd_sn = p.cmd_sn();
            if cmd_sn == exp_cmd_sn {
                exp_cmd_sn = exp_cmd_sn.wrapping_add(1);
            }
        }
        let mut rsp = match InitiatorPdu::parse(&p) {
            Ok(InitiatorPdu::TextRequest(t)) => {
                let ctx = TextContext {
                    targets: &targets,
                    session_target: session.target_name.as_deref(),
                    max_send_data_segment_length: session.params.max_send_data_segment_length,
                };
                text.handle(&t, &ctx).unwrap().to_pdu()
            }
            Ok(InitiatorPdu::LogoutRequest(l)) => LogoutResponse {
                response: LogoutResponseCode::Success,
                itt: l.itt,
                stat_sn: 0,
                exp_cmd_sn: 0,
                max_cmd_sn: 0,
                time2wait: 0,
                time2retain: 0,
            }
            .to_pdu(),
            Ok(InitiatorPdu::NopOut(n)) if n.itt != RESERVED_TAG => NopIn {
                lun: n.lun,
                itt: n.itt,
                ttt: RESERVED_TAG,
                stat_sn: 0,
                exp_cmd_sn: 0,
                max_cmd_sn: 0,
                data: n.data.clone(),
            }
            .to_pdu(),
            Ok(_) | Err(_) => Reject::new(RejectReason::CommandNotSupported, &p.bhs).to_pdu(),
        };
        rsp.set_target_sns(stat_sn, exp_cmd_sn, exp_cmd_sn.wrapping_add(31));
        stat_sn = stat_sn.wrapping_add(1);
        send(&mut s, &codec, &rsp);
        if p.opcode() == Ok(Opcode::LogoutRequest) {
            return;
        }
    }
}

/// Starts a target accepting `conns` connections; returns its port.
fn start_target(cfg: TargetLoginConfig, conns: usize) -> (u16, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = thread::spawn(move || {
        for _ in 0..conns {
            let (s, _) = l.accept().unwrap();
            let targets = vec![SendTargetsEntry {
                name: TARGET.to_string(),
                addresses: vec![(format!("127.0.0.1:{port}"), 1)],
            }];
            serve(s, cfg.clone(), targets);
        }
    });
    (port, h)
}

fn iscsi_ls(url: &str) -> (bool, String) {
    let out = keyfence_testkit::run_bounded(
        Command::new(keyfence_testkit::require("iscsi-ls")).args([
            "--url",
            "-i",
            "iqn.2026-11.org.keyfence.test:ls",
            url,
        ]),
        None,
        Duration::from_secs(30),
    );
    let text = keyfence_testkit::text(&out.stdout) + &keyfence_testkit::text(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn libiscsi_discovers_through_our_target() {
    let (port, h) = start_target(TargetLoginConfig::default(), 1);
    let (ok, out) = iscsi_ls(&format!("iscsi://127.0.0.1:{port}"));
    h.join().unwrap();
    assert!(ok, "iscsi-ls failed: {out}");
    assert!(
        out.contains(&format!("iscsi://127.0.0.1:{port}/{TARGET}")),
        "unexpected output: {out}"
    );
}

#[test]
fn libiscsi_with_header_digest_and_chap() {
    let mut cfg = TargetLoginConfig::default();
    cfg.prefs.header_digest = vec![Digest::Crc32c];
    cfg.chap_users = vec![ChapCredential::new("lsuser", "ls-secret-123")];
    cfg.chap_for_discovery = true;
    let (port, h) = start_target(cfg.clone(), 1);
    let (ok, out) = iscsi_ls(&format!("iscsi://lsuser%ls-secret-123@127.0.0.1:{port}"));
    h.join().unwrap();
    assert!(ok, "iscsi-ls failed: {out}");
    assert!(out.contains(TARGET), "unexpected output: {out}");

    let (port, h) = start_target(cfg, 1);
    let (ok, out) = iscsi_ls(&format!("iscsi://lsuser%wrong-secret@127.0.0.1:{port}"));
    h.join().unwrap();
    assert!(!ok, "login with a wrong CHAP secret succeeded: {out}");
    assert!(!out.contains(&format!("/{TARGET}")), "{out}");
}

// ---------------------------------------------------------------------------
// Our initiator against tgtd

/// tgtd exporting `TARGET` LUN 1 (4 MiB) and accepting CRC32C digests.
fn start_tgtd() -> Tgtd {
    Tgtd::start(TgtdOptions {
        iqn: TARGET.into(),
        size: 4 << 20,
        digests: true,
        ..TgtdOptions::default()
    })
}

struct Conn {
    s: TcpStream,
    codec: PduCodec,
    buf: BytesMut,
    session: Option<InitiatorSession>,
    cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
}

impl Conn {
    fn login(port: u16, cfg: InitiatorLoginConfig) -> Result<Conn, LoginError> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut codec = PduCodec::new();
        let mut buf = BytesMut::new();
        let mut login = InitiatorLogin::new(cfg);
        let mut req = login.start();
        let session = loop {
            send(&mut s, &codec, &req);
            let rsp = read_pdu(&mut s, &mut codec, &mut buf).expect("connection closed in login");
            match login.step(&rsp)? {
                InitiatorStep::Send(p) => req = p,
                InitiatorStep::Complete(sess) => break sess,
            }
        };
        codec.apply(&session.params);
        Ok(Conn {
            s,
            codec,
            buf,
            cmd_sn: session.cmd_sn,
            exp_stat_sn: session.exp_stat_sn,
            session: Some(*session),
            itt: 0x100,
        })
    }

    fn recv(&mut self) -> TargetPdu {
        let p = read_pdu(&mut self.s, &mut self.codec, &mut self.buf).expect("closed");
        let t = TargetPdu::parse(&p).unwrap();
        // StatSN advances on responses that carry status
        let carries_status = match &t {
            TargetPdu::DataIn(d) => d.status.is_some(),
            TargetPdu::R2t(_) => false,
            TargetPdu::NopIn(n) => n.itt != RESERVED_TAG,
            _ => true,
        };
        if carries_status {
            self.exp_stat_sn = p.stat_sn().wrapping_add(1);
        }
        t
    }

    fn send_pdu(&mut self, mut p: Pdu, advance: bool) {
        p.set_initiator_sns(self.cmd_sn, self.exp_stat_sn);
        if advance {
            self.cmd_sn = self.cmd_sn.wrapping_add(1);
        }
        send(&mut self.s, &self.codec, &p);
    }

    fn send_targets(&mut self, value: &str) -> Vec<SendTargetsEntry> {
        self.itt += 1;
        let mut collector = TextCollector::new(self.itt);
        let mut req = send_targets_request(self.itt, value);
        loop {
            self.send_pdu(req.to_pdu(), true);
            let TargetPdu::TextResponse(r) = self.recv() else {
                panic!("expected text response")
            };
            match collector.push(&r).unwrap() {
                TextProgress::Continue(next) => req = next,
                TextProgress::Done(text) => return parse_send_targets(&text).unwrap(),
            }
        }
    }

    /// Runs one SCSI command; returns (status, data-in, sense).
    fn command(&mut self, cdb: &[u8], read_len: u32, write: Bytes) -> (u8, Vec<u8>, Bytes) {
        self.itt += 1;
        let itt = self.itt;
        let params = self.session.as_ref().unwrap().params.clone();
        let lun = Lun::from_number(1).unwrap();
        let is_write = !write.is_empty();
        let edtl = if is_write {
            write.len() as u32
        } else {
            read_len
        };
        let immediate_len = if is_write && params.immediate_data {
            write
                .len()
                .min(params.first_burst_length as usize)
                .min(params.max_send_data_segment_length as usize)
        } else {
            0
        };
        let unsolicited_more = is_write && !params.initial_r2t && immediate_len < write.len();
        assert!(
            !unsolicited_more,
            "test keeps unsolicited data in the command PDU"
        );
        let cmd = ScsiCommand {
            immediate: false,
            final_bit: true,
            read: read_len > 0,
            write: is_write,
            attr: TaskAttr::Simple,
            lun,
            itt,
            expected_data_transfer_length: edtl,
            cmd_sn: 0,
            exp_stat_sn: 0,
            cdb: Cdb::new(cdb).unwrap(),
            bidi_read_length: None,
            data: write.slice(..immediate_len),
        };
        self.send_pdu(cmd.to_pdu(), true);
        let mut data = vec![0u8; read_len as usize];
        let mut next_data_sn = 0;
        loop {
            match self.recv() {
                TargetPdu::DataIn(d) => {
                    assert_eq!(d.itt, itt);
                    assert_eq!(d.data_sn, next_data_sn);
                    next_data_sn += 1;
                    let off = d.buffer_offset as usize;
                    data[off..off + d.data.len()].copy_from_slice(&d.data);
                    if let Some(st) = d.status {
                        return (st, data, Bytes::new());
                    }
                }
                TargetPdu::R2t(r) => {
                    assert_eq!(r.itt, itt);
                    let mut off = r.buffer_offset as usize;
                    let end = off + r.desired_data_transfer_length as usize;
                    let mut data_sn = 0;
                    while off < end {
                        let n = (end - off).min(params.max_send_data_segment_length as usize);
                        let d = DataOut {
                            final_bit: off + n == end,
                            lun,
                            itt,
                            ttt: r.ttt,
                            exp_stat_sn: 0,
                            data_sn,
                            buffer_offset: off as u32,
                            data: write.slice(off..off + n),
                        };
                        // Data-Out carries no CmdSN: only ExpStatSN matters.
                        let mut p = d.to_pdu();
                        p.bhs[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
                        send(&mut self.s, &self.codec, &p);
                        data_sn += 1;
                        off += n;
                    }
                }
                TargetPdu::ScsiResponse(r) => {
                    assert_eq!(r.itt, itt);
                    return (r.status, data, r.sense);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn logout(&mut self) {
        self.itt += 1;
        let l = LogoutRequest {
            immediate: true,
            reason: LogoutReason::CloseSession,
            itt: self.itt,
            cid: 0,
            cmd_sn: 0,
            exp_stat_sn: 0,
        };
        self.send_pdu(l.to_pdu(), false);
        match self.recv() {
            TargetPdu::LogoutResponse(r) => {
                assert_eq!(r.response, LogoutResponseCode::Success);
                assert_eq!(r.itt, self.itt);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn our_initiator_against_tgtd() {
    let tgt = start_tgtd();

    // discovery session
    let mut d = Conn::login(
        tgt.port(),
        InitiatorLoginConfig::new("iqn.2026-11.org.keyfence.test:init", 0x0002_3d00_0001, None),
    )
    .unwrap();
    let found = d.send_targets("All");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].name, TARGET);
    assert!(found[0]
        .addresses
        .iter()
        .any(|(a, _)| a == &format!("127.0.0.1:{}", tgt.port())));
    d.logout();

    // unknown target
    let e = Conn::login(
        tgt.port(),
        InitiatorLoginConfig::new(
            "iqn.2026-11.org.keyfence.test:init",
            0x0002_3d00_0002,
            Some("iqn.2026-11.org.keyfence.test:nope".into()),
        ),
    )
    .err()
    .expect("login to a missing target succeeded");
    assert!(
        matches!(e, LoginError::Status { status, .. } if status.class == 2),
        "{e:?}"
    );

    // normal session with both digests
    let mut cfg = InitiatorLoginConfig::new(
        "iqn.2026-11.org.keyfence.test:init",
        0x0002_3d00_0003,
        Some(TARGET.into()),
    );
    cfg.prefs.header_digest = vec![Digest::Crc32c];
    cfg.prefs.data_digest = vec![Digest::Crc32c];
    cfg.prefs.max_recv_data_segment_length = 16384;
    let mut c = Conn::login(tgt.port(), cfg).unwrap();
    let p = c.session.as_ref().unwrap().params.clone();
    assert!(p.header_digest && p.data_digest, "{p:?}");
    assert!(c.session.as_ref().unwrap().tsih != 0);

    // TEST UNIT READY may report a unit attention first; retry a few times
    let mut st = 0xff;
    for _ in 0..4 {
        st = c.command(&[0, 0, 0, 0, 0, 0], 0, Bytes::new()).0;
        if st == 0 {
            break;
        }
    }
    assert_eq!(st, 0);

    let (st, inq, _) = c.command(&[0x12, 0, 0, 0, 96, 0], 96, Bytes::new());
    assert_eq!(st, 0);
    assert_eq!(inq[0] & 0x1f, 0); // direct access block device

    // write 192 KiB at LBA 8 (immediate data + R2T), read back (several Data-In)
    let pattern: Vec<u8> = (0..192 * 1024u32)
        .map(|i| (i * 7 + i / 513) as u8)
        .collect();
    let blocks = (pattern.len() / 512) as u16;
    let mut w10 = [0x2a, 0, 0, 0, 0, 8, 0, 0, 0, 0];
    w10[7..9].copy_from_slice(&blocks.to_be_bytes());
    let (st, _, sense) = c.command(&w10, 0, Bytes::from(pattern.clone()));
    assert_eq!(st, 0, "write failed, sense {sense:?}");
    let mut r10 = [0x28, 0, 0, 0, 0, 8, 0, 0, 0, 0];
    r10[7..9].copy_from_slice(&blocks.to_be_bytes());
    let (st, back, _) = c.command(&r10, pattern.len() as u32, Bytes::new());
    assert_eq!(st, 0);
    assert!(back == pattern, "read back differs");

    // a bad LBA gets CHECK CONDITION with sense data (ScsiResponse sense segment)
    let (st, _, sense) = c.command(
        &[0x28, 0, 0x7f, 0xff, 0xff, 0xff, 0, 0, 1, 0],
        512,
        Bytes::new(),
    );
    assert_eq!(st, 2);
    assert!(sense.len() >= 14, "{sense:?}");
    assert_eq!(sense[2] & 0x0f, 0x05); // ILLEGAL REQUEST
    c.logout();
    drop(tgt);
}
