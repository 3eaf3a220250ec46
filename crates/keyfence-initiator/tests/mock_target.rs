//! The session layer against a scripted target on loopback: the login is
//! the real `keyfence_iscsi::login::TargetLogin`, the full feature phase is scripted
//! per test to produce what real targets rarely do on demand — a CmdSN
//! window of one command, a command that never completes, a PDU Reject, a
//! Data-In sequence error.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use keyfence_initiator::{commands, Error, IscsiUrl, Limits, SessionConfig};
use keyfence_iscsi::login::{LoginStep, TargetLogin, TargetLoginConfig};
use keyfence_iscsi::pdu::{
    DataIn, LogoutResponse, LogoutResponseCode, NopIn, Reject, RejectReason, Residual, ScsiCommand,
    ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, TmfFunction, TmfResponse,
};
use keyfence_iscsi::{Opcode, Pdu, PduCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const IQN: &str = "iqn.2026-11.io.keyfence:mock";

/// What the scripted target does with each SCSI command.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Script {
    /// GOOD after a short delay, window of one command.
    NarrowWindow,
    /// Never answer TEST UNIT READY; answer ABORT TASK.
    Hang,
    /// Reject every SCSI command.
    RejectAll,
    /// Answer a READ with Data-In whose DataSN skips one.
    BadDataSn,
    /// Ask the initiator to log out (Async Message event 1) right away.
    AsyncLogout,
    /// BUSY for the first two commands, then GOOD.
    BusyTwice,
}

#[derive(Default)]
struct Seen {
    /// (CmdSN, MaxCmdSN in force when it arrived).
    cmds: Vec<(u32, u32)>,
    aborts: Vec<(u32, u32)>,
    ping_replies: u32,
    logged_out: bool,
}

struct Conn {
    sock: TcpStream,
    codec: PduCodec,
    buf: BytesMut,
}

impl Conn {
    async fn read(&mut self) -> Option<Pdu> {
        loop {
            if let Some(p) = self
                .codec
                .decode(&mut self.buf)
                .expect("valid PDU from initiator")
            {
                return Some(p);
            }
            if self.sock.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }
    async fn write(&mut self, p: Pdu) {
        let mut out = BytesMut::new();
        self.codec.encode(&p, &mut out).unwrap();
        let _ = self.sock.write_all(&out).await;
    }
}

async fn serve(listener: TcpListener, script: Script, seen: Arc<Mutex<Seen>>) {
    let (sock, _) = listener.accept().await.unwrap();
    let mut c = Conn {
        sock,
        codec: PduCodec::new(),
        buf: BytesMut::new(),
    };
    let window = if script == Script::NarrowWindow {
        1
    } else {
        32
    };
    let mut login = TargetLogin::new(TargetLoginConfig {
        targets: vec![IQN.to_string()],
        tsih: 7,
        cmd_window: window,
        ..TargetLoginConfig::default()
    });
    let session = loop {
        let p = c.read().await.expect("login request");
        match login.step(&p) {
            LoginStep::Respond(r) => c.write(r).await,
            LoginStep::Complete { response, session } => {
                c.write(response).await;
                break session;
            }
            LoginStep::Failed { response, .. } => {
                c.write(response).await;
                return;
            }
        }
    };
    c.codec.apply(&session.params);
    let mut stat_sn = session.next_stat_sn;
    let mut exp_cmd_sn = session.exp_cmd_sn;
    let max = |exp: u32| exp.wrapping_add(window - 1);
    // Ping the initiator once; it must answer with our TTT.
    c.write(
        NopIn {
            lun: Default::default(),
            itt: 0xffff_ffff,
            ttt: 0x4242,
            stat_sn,
            exp_cmd_sn,
            max_cmd_sn: max(exp_cmd_sn),
            data: Bytes::new(),
        }
        .to_pdu(),
    )
    .await;
    if script == Script::AsyncLogout {
        c.write(
            keyfence_iscsi::pdu::AsyncMessage {
                lun: Default::default(),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn: max(exp_cmd_sn),
                async_event: 1,
                async_vcode: 0,
                parameter1: 0,
                parameter2: 0,
                parameter3: 5,
                sense: Bytes::new(),
                event_data: Bytes::new(),
            }
            .to_pdu(),
        )
        .await;
        stat_sn += 1;
    }
    while let Some(p) = c.read().await {
        match p.opcode().unwrap() {
            Opcode::NopOut => {
                let n = keyfence_iscsi::pdu::NopOut::parse(&p).unwrap();
                assert_eq!(n.ttt, 0x4242, "NOP-Out must echo the NOP-In TTT");
                assert_eq!(n.itt, 0xffff_ffff);
                seen.lock().unwrap().ping_replies += 1;
            }
            Opcode::ScsiCommand => {
                let cmd = ScsiCommand::parse(&p).unwrap();
                seen.lock()
                    .unwrap()
                    .cmds
                    .push((cmd.cmd_sn, max(exp_cmd_sn)));
                assert_eq!(cmd.cmd_sn, exp_cmd_sn, "CmdSN out of sequence");
                exp_cmd_sn = exp_cmd_sn.wrapping_add(1);
                let busy = script == Script::BusyTwice && seen.lock().unwrap().cmds.len() <= 2;
                let rsp = |stat_sn, exp_cmd_sn| ScsiResponse {
                    response: 0,
                    status: if busy { 0x08 } else { 0 },
                    residual: Residual::None,
                    bidi_read_residual: Residual::None,
                    itt: cmd.itt,
                    snack_tag: 0,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn: max(exp_cmd_sn),
                    exp_data_sn: 0,
                    sense: Bytes::new(),
                    response_data: Bytes::new(),
                };
                match script {
                    Script::NarrowWindow | Script::BusyTwice => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        c.write(rsp(stat_sn, exp_cmd_sn).to_pdu()).await;
                        stat_sn += 1;
                    }
                    Script::Hang | Script::AsyncLogout => {}
                    Script::RejectAll => {
                        let mut r = Reject::new(RejectReason::InvalidPduField, &p.bhs);
                        r.stat_sn = stat_sn;
                        r.exp_cmd_sn = exp_cmd_sn;
                        r.max_cmd_sn = max(exp_cmd_sn);
                        c.write(r.to_pdu()).await;
                        stat_sn += 1;
                    }
                    Script::BadDataSn => {
                        for (sn, off) in [(0u32, 0u32), (2, 512)] {
                            c.write(
                                DataIn {
                                    final_bit: false,
                                    ack: false,
                                    status: None,
                                    residual: Residual::None,
                                    lun: cmd.lun,
                                    itt: cmd.itt,
                                    ttt: 0xffff_ffff,
                                    stat_sn: 0,
                                    exp_cmd_sn,
                                    max_cmd_sn: max(exp_cmd_sn),
                                    data_sn: sn,
                                    buffer_offset: off,
                                    data: Bytes::from(vec![0u8; 512]),
                                }
                                .to_pdu(),
                            )
                            .await;
                        }
                    }
                }
            }
            Opcode::TaskMgmtRequest => {
                let t = TaskMgmtRequest::parse(&p).unwrap();
                assert_eq!(t.function, TmfFunction::AbortTask);
                seen.lock()
                    .unwrap()
                    .aborts
                    .push((t.referenced_task_tag, t.ref_cmd_sn));
                c.write(
                    TaskMgmtResponse {
                        response: TmfResponse::FunctionComplete,
                        itt: t.itt,
                        stat_sn,
                        exp_cmd_sn,
                        max_cmd_sn: max(exp_cmd_sn),
                    }
                    .to_pdu(),
                )
                .await;
                stat_sn += 1;
            }
            Opcode::LogoutRequest => {
                let l = keyfence_iscsi::pdu::LogoutRequest::parse(&p).unwrap();
                c.write(
                    LogoutResponse {
                        response: LogoutResponseCode::Success,
                        itt: l.itt,
                        stat_sn,
                        exp_cmd_sn,
                        max_cmd_sn: max(exp_cmd_sn),
                        time2wait: 0,
                        time2retain: 0,
                    }
                    .to_pdu(),
                )
                .await;
                seen.lock().unwrap().logged_out = true;
                return;
            }
            other => panic!("mock target got unexpected {other:?}"),
        }
    }
}

async fn start(script: Script) -> (IscsiUrl, Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let h = tokio::spawn(serve(l, script, seen.clone()));
    let url = IscsiUrl::parse(&format!("iscsi://127.0.0.1:{port}/{IQN}/0")).unwrap();
    (url, seen, h)
}

fn config(timeout_ms: u64) -> SessionConfig {
    SessionConfig {
        initiator_name: Some("iqn.2026-11.io.keyfence.test:mock".into()),
        limits: Limits {
            command_timeout: Duration::from_millis(timeout_ms),
            queue_depth: 32,
        },
        ..SessionConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_never_exceed_max_cmd_sn() {
    let (url, seen, h) = start(Script::NarrowWindow).await;
    let s = keyfence_initiator::login::connect(&url, &config(10_000))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.execute(0, &commands::test_unit_ready())
                .await
                .unwrap()
                .into_result()
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    s.logout().await.unwrap();
    h.await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.cmds.len(), 20);
    for (sn, max) in &seen.cmds {
        assert!(
            keyfence_iscsi::serial::le(*sn, *max),
            "CmdSN {sn} sent beyond MaxCmdSN {max}"
        );
    }
    assert_eq!(seen.ping_replies, 1, "target NOP-In must be answered once");
    assert_eq!(
        s.peak_outstanding(),
        1,
        "a window of one means one command in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_command_is_aborted() {
    let (url, seen, _h) = start(Script::Hang).await;
    let s = keyfence_initiator::login::connect(&url, &config(300))
        .await
        .unwrap();
    match s.execute(0, &commands::test_unit_ready()).await {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    let seen = seen.lock().unwrap();
    let (cmd_sn, _) = seen.cmds[0];
    assert_eq!(seen.aborts.len(), 1, "one ABORT TASK");
    assert_eq!(
        seen.aborts[0].1, cmd_sn,
        "RefCmdSN names the timed-out command"
    );
    assert!(!s.is_closed(), "a completed abort keeps the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_fails_the_command_only() {
    let (url, _seen, _h) = start(Script::RejectAll).await;
    let s = keyfence_initiator::login::connect(&url, &config(5_000))
        .await
        .unwrap();
    match s.execute(0, &commands::test_unit_ready()).await {
        Err(Error::Rejected { reason: 0x09 }) => {}
        other => panic!("expected Reject 0x09, got {other:?}"),
    }
    assert!(!s.is_closed(), "a Reject ends one command, not the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_sn_gap_ends_the_session() {
    let (url, _seen, _h) = start(Script::BadDataSn).await;
    let s = keyfence_initiator::login::connect(&url, &config(5_000))
        .await
        .unwrap();
    match s.execute(0, &commands::read16(0, 2, 512).unwrap()).await {
        Err(Error::ConnectionLost(m)) => assert!(m.contains("DataSN"), "{m}"),
        other => panic!("expected the session to end, got {other:?}"),
    }
    assert!(s.is_closed());
    assert!(matches!(
        s.execute(0, &commands::test_unit_ready()).await,
        Err(Error::ConnectionLost(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_requested_logout_is_honoured() {
    let (url, seen, h) = start(Script::AsyncLogout).await;
    let s = keyfence_initiator::login::connect(&url, &config(5_000))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), h)
        .await
        .expect("mock target sees a Logout Request")
        .unwrap();
    assert!(seen.lock().unwrap().logged_out);
    for _ in 0..100 {
        if s.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("session still open after the target-requested logout");
}

/// Answer the first Login Request with "target moved temporarily" to
/// `to_port` (RFC 7143 §11.13.5, status 0x0101 with TargetAddress).
async fn redirector(listener: TcpListener, to_port: u16) {
    let (sock, _) = listener.accept().await.unwrap();
    let mut c = Conn {
        sock,
        codec: PduCodec::new(),
        buf: BytesMut::new(),
    };
    let p = c.read().await.expect("login request");
    let req = keyfence_iscsi::pdu::LoginRequest::parse(&p).unwrap();
    let text = keyfence_iscsi::keys::build(&[(
        "TargetAddress".to_string(),
        format!("127.0.0.1:{to_port},1"),
    )]);
    c.write(
        keyfence_iscsi::pdu::LoginResponse {
            transit: false,
            cont: false,
            csg: req.csg,
            nsg: req.csg,
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: 0,
            itt: req.itt,
            stat_sn: 0,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn,
            status_class: 1,
            status_detail: 1,
            data: text,
        }
        .to_pdu(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_follows_redirect_and_keeps_isid() {
    let (back_url, _seen, back) = start(Script::NarrowWindow).await;
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_port = front.local_addr().unwrap().port();
    let r = tokio::spawn(redirector(front, back_url.port));
    let url = IscsiUrl::parse(&format!("iscsi://127.0.0.1:{front_port}/{IQN}/0")).unwrap();
    let cfg = config(5_000);
    let s = keyfence_initiator::login::connect(&url, &cfg)
        .await
        .expect("redirected login");
    r.await.unwrap();
    assert_eq!(s.info().portal, back_url.portal());
    let isid = keyfence_initiator::login::isid_for(&url, &cfg).unwrap();
    assert_eq!(
        s.info().isid,
        isid.value(),
        "the ISID of the path asked for"
    );
    s.execute(0, &commands::test_unit_ready())
        .await
        .unwrap()
        .into_result()
        .unwrap();
    s.logout().await.unwrap();
    back.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_is_retried_by_typed_calls() {
    let (url, seen, h) = start(Script::BusyTwice).await;
    let cfg = config(5_000);
    let s = keyfence_initiator::login::connect(&url, &cfg)
        .await
        .unwrap();
    let dev = keyfence_initiator::Device::on_session(s.clone(), &url, 0, &cfg);
    dev.test_unit_ready().await.expect("GOOD after two BUSY");
    assert_eq!(seen.lock().unwrap().cmds.len(), 3);
    // The raw call reports what the target said.
    let r = dev.execute_raw(&commands::test_unit_ready()).await.unwrap();
    assert_eq!(r.status, 0);
    s.logout().await.unwrap();
    h.await.unwrap();
}
