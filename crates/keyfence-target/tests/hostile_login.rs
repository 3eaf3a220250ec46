//! Hostile clients before and during login, over real loopback sockets
//! with hand-built PDUs: idle connections must not lock anyone out, CHAP
//! guessing is slowed, target names do not leak through login statuses,
//! and a too-short mutual CHAP challenge is refused. Every loop here is
//! bounded in count and time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::chap;
use keyfence_iscsi::keys::{self, TextBuilder};
use keyfence_iscsi::pdu::{LoginRequest, LoginResponse, Stage, TargetPdu, TextRequest};
use keyfence_iscsi::{Pdu, PduCodec};
use keyfence_target::config::{ChapConfig, Limits, Secret};
use keyfence_testkit::{InProcessServer, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const IQN: &str = "iqn.2026-11.io.keyfence:hostile";
const LEGIT: &str = "iqn.2026-11.io.keyfence:legit";
const ATTACKER: &str = "iqn.2026-11.io.keyfence:attacker";
const USER: &str = "legit-user";
const SECRET: &str = "legit-secret-0123456789";
const TARGET_USER: &str = "the-target";
const TARGET_SECRET: &str = "target-secret-9876543210";
/// Bound on every wait for the target.
const WAIT: Duration = Duration::from_secs(15);

fn chap_config(mutual: bool) -> ChapConfig {
    ChapConfig {
        user: USER.into(),
        secret: Secret::new(SECRET),
        mutual_user: mutual.then(|| TARGET_USER.to_string()),
        mutual_secret: mutual.then(|| Secret::new(TARGET_SECRET)),
    }
}

fn server(
    limits: Limits,
    chap: Option<ChapConfig>,
    discovery_chap: Option<ChapConfig>,
) -> InProcessServer {
    InProcessServer::start(ServerOptions {
        iqn: IQN.into(),
        portals: 1,
        size: 1 << 20,
        limits,
        chap,
        discovery_chap,
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A raw connection speaking PDUs, async. This test keeps its own client
/// instead of the test kit's blocking `RawClient`, which serves one
/// connection per thread with every wait bounded by its socket timeout:
/// here 400 idle connections are held open and watched until the target
/// closes them, and 16 CHAP guessers run at once until a shared 3 s
/// deadline cancels the logins still in flight, which the target holds
/// back on purpose (its backoff after failed attempts grows to seconds).
/// Each connection also comes from a chosen 127.x.y.z source address,
/// the key of the target's per-source admission limits.
struct Raw {
    s: TcpStream,
    codec: PduCodec,
    rbuf: BytesMut,
    itt: u32,
    exp_stat_sn: u32,
}

impl Raw {
    /// Connect to `addr` from `src` (any 127.x.y.z address is ours on
    /// loopback), to act as a distinct source.
    async fn connect_from(src: Ipv4Addr, addr: SocketAddr) -> std::io::Result<Raw> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
        let s = tokio::time::timeout(WAIT, sock.connect(addr))
            .await
            .map_err(|_| std::io::Error::other("connect timed out"))??;
        Ok(Raw {
            s,
            codec: PduCodec::new(),
            rbuf: BytesMut::new(),
            itt: 1,
            exp_stat_sn: 0,
        })
    }

    async fn send(&mut self, pdu: &Pdu) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        self.codec.encode(pdu, &mut out).unwrap();
        self.s.write_all(&out).await
    }

    /// The next PDU; `None` at end of stream, reset or after `WAIT`.
    async fn recv(&mut self) -> Option<Pdu> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(p) = self.codec.decode(&mut self.rbuf).ok()? {
                return Some(p);
            }
            let mut tmp = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.s.read(&mut tmp)).await {
                Ok(Ok(n)) if n > 0 => self.rbuf.extend_from_slice(&tmp[..n]),
                _ => return None,
            }
        }
    }

    /// Wait until the target closes the connection; false if it is still
    /// open after `limit`.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut tmp = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.s.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }

    /// Send one Login Request and return the response.
    async fn login_step(
        &mut self,
        isid: u64,
        csg: Stage,
        nsg: Option<Stage>,
        data: Bytes,
    ) -> Option<LoginResponse> {
        let req = LoginRequest {
            transit: nsg.is_some(),
            cont: false,
            csg,
            nsg: nsg.unwrap_or(csg),
            version_max: 0,
            version_min: 0,
            isid,
            tsih: 0,
            itt: self.itt,
            cid: 1,
            cmd_sn: 1,
            exp_stat_sn: self.exp_stat_sn,
            data,
        };
        self.send(&req.to_pdu()).await.ok()?;
        let p = self.recv().await?;
        let TargetPdu::LoginResponse(r) = TargetPdu::parse(&p).ok()? else {
            return None;
        };
        self.exp_stat_sn = r.stat_sn.wrapping_add(1);
        Some(r)
    }

    /// Operational stage to full feature phase; the final status.
    async fn operational(&mut self, isid: u64, first: Vec<(&str, &str)>) -> Option<(u8, u8)> {
        let mut t = TextBuilder::new();
        for (k, v) in first {
            t.push(k, v);
        }
        t.push("HeaderDigest", "None");
        t.push("DataDigest", "None");
        t.push("MaxRecvDataSegmentLength", "262144");
        let mut data = t.finish();
        for _ in 0..4 {
            let r = self
                .login_step(isid, Stage::Operational, Some(Stage::FullFeature), data)
                .await?;
            if r.status_class != 0 || (r.transit && r.nsg == Stage::FullFeature) {
                self.itt += 1;
                return Some((r.status_class, r.status_detail));
            }
            data = Bytes::new();
        }
        None
    }
}

fn status(r: &LoginResponse) -> (u8, u8) {
    (r.status_class, r.status_detail)
}

fn text(pairs: &[(&str, &str)]) -> Bytes {
    let mut t = TextBuilder::new();
    for (k, v) in pairs {
        t.push(k, v);
    }
    t.finish()
}

/// A login to [`IQN`] without authentication: the final status.
async fn plain_login(
    src: Ipv4Addr,
    addr: SocketAddr,
    initiator: &str,
    isid: u64,
) -> Option<(u8, u8)> {
    login_to(src, addr, initiator, IQN, isid).await
}

/// A normal session's login to `target` that offers no authentication
/// and goes straight to the operational stage: the final status.
async fn login_to(
    src: Ipv4Addr,
    addr: SocketAddr,
    initiator: &str,
    target: &str,
    isid: u64,
) -> Option<(u8, u8)> {
    let mut c = Raw::connect_from(src, addr).await.ok()?;
    let first = vec![
        ("InitiatorName", initiator),
        ("SessionType", "Normal"),
        ("TargetName", target),
    ];
    c.operational(isid, first).await
}

/// Security stage up to the target's challenge: (connection, CHAP_I,
/// CHAP_C), or the status that ended it.
async fn chap_challenge(
    src: Ipv4Addr,
    addr: SocketAddr,
    initiator: &str,
    target: &str,
    isid: u64,
) -> Result<(Raw, u8, Vec<u8>), Option<(u8, u8)>> {
    let mut c = Raw::connect_from(src, addr).await.map_err(|_| None)?;
    let r = c
        .login_step(
            isid,
            Stage::Security,
            None,
            text(&[
                ("InitiatorName", initiator),
                ("SessionType", "Normal"),
                ("TargetName", target),
                ("AuthMethod", "CHAP,None"),
            ]),
        )
        .await
        .ok_or(None)?;
    if r.status_class != 0 {
        return Err(Some(status(&r)));
    }
    let r = c
        .login_step(isid, Stage::Security, None, text(&[("CHAP_A", "5")]))
        .await
        .ok_or(None)?;
    if r.status_class != 0 {
        return Err(Some(status(&r)));
    }
    let pairs = keys::parse(&r.data).map_err(|_| None)?;
    let id: u8 = keys::get(&pairs, "CHAP_I")
        .and_then(|v| v.parse().ok())
        .ok_or(None)?;
    let c_hex = keys::get(&pairs, "CHAP_C").ok_or(None)?;
    let challenge = decode_hex(c_hex).ok_or(None)?;
    Ok((c, id, challenge))
}

fn decode_hex(v: &str) -> Option<Vec<u8>> {
    let h = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"))?;
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A CHAP login: the status after the response (and, when it passed, of
/// the operational stage). `mutual`: our challenge to the target.
async fn chap_login(
    src: Ipv4Addr,
    addr: SocketAddr,
    initiator: &str,
    target: &str,
    isid: u64,
    secret: &str,
    mutual: Option<(u8, Vec<u8>)>,
) -> Option<(u8, u8)> {
    let (mut c, id, challenge) = match chap_challenge(src, addr, initiator, target, isid).await {
        Ok(x) => x,
        Err(s) => return s,
    };
    let resp = chap::response(id, secret.as_bytes(), &challenge);
    let mut pairs = vec![
        ("CHAP_N".to_string(), USER.to_string()),
        ("CHAP_R".to_string(), keys::encode_hex(&resp)),
    ];
    if let Some((mi, mc)) = &mutual {
        pairs.push(("CHAP_I".to_string(), mi.to_string()));
        pairs.push(("CHAP_C".to_string(), keys::encode_hex(mc)));
    }
    let r = c
        .login_step(
            isid,
            Stage::Security,
            Some(Stage::Operational),
            keys::build(&pairs),
        )
        .await?;
    if r.status_class != 0 {
        return Some(status(&r));
    }
    if let Some((mi, mc)) = &mutual {
        let p = keys::parse(&r.data).ok()?;
        let want = chap::response(*mi, TARGET_SECRET.as_bytes(), mc);
        assert_eq!(
            keys::get(&p, "CHAP_R"),
            Some(keys::encode_hex(&want).as_str())
        );
    }
    c.operational(isid, vec![]).await
}

const LOCALHOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

fn attacker_source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1 + (i / 200) as u8, 2 + (i % 200) as u8)
}

/// Open `n` connections that never send anything: `per_source` from each
/// attacker source address.
async fn idle_connections(addr: SocketAddr, n: usize, per_source: usize) -> Vec<Raw> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if let Ok(c) = Raw::connect_from(attacker_source(i / per_source), addr).await {
            out.push(c);
        }
    }
    out
}

fn idle_limits() -> Limits {
    Limits {
        first_pdu_timeout_secs: 2,
        ..Limits::default()
    }
}

#[test]
fn idle_connections_do_not_lock_out_logins() {
    for with_chap in [false, true] {
        let srv = server(idle_limits(), with_chap.then(|| chap_config(false)), None);
        let addr = srv.portals()[0];
        let rt = runtime();
        rt.block_on(async {
            // More idle sockets than max_connections (128), from one
            // attacker source and then from many.
            let opened = Instant::now();
            let mut idle = idle_connections(addr, 200, 200).await;
            idle.extend(idle_connections(addr, 200, 4).await);
            assert_eq!(idle.len(), 400, "the target accepts TCP connections");

            // A legitimate initiator, from its own address, at once.
            let t = Instant::now();
            let st = if with_chap {
                chap_login(LOCALHOST, addr, LEGIT, IQN, 0x23d0_0000_0001, SECRET, None).await
            } else {
                plain_login(LOCALHOST, addr, LEGIT, 0x23d0_0000_0001).await
            };
            let took = t.elapsed();
            assert_eq!(
                st,
                Some((0, 0)),
                "chap={with_chap}: legitimate login while 400 idle"
            );
            eprintln!("chap={with_chap}: legitimate login took {took:?} with 400 idle connections");
            assert!(took < Duration::from_secs(1), "login took {took:?}");

            // Every idle connection is closed by the first-PDU deadline.
            let deadline = Duration::from_secs(2) + Duration::from_millis(1500);
            for (i, c) in idle.iter_mut().enumerate() {
                let left = deadline.saturating_sub(opened.elapsed());
                assert!(
                    c.closed_within(left.max(Duration::from_millis(50))).await,
                    "idle connection {i} still open {:?} after it was opened",
                    opened.elapsed()
                );
            }
            // And the target still serves.
            let st = plain_login(LOCALHOST, addr, LEGIT, 0x23d0_0000_0002).await;
            let want = if with_chap { (2, 1) } else { (0, 0) };
            assert_eq!(st, Some(want));
        });
    }
}

#[test]
fn chap_guessing_is_slowed_and_others_still_log_in() {
    let srv = server(Limits::default(), Some(chap_config(false)), None);
    let addr = srv.portals()[0];
    let rt = runtime();
    rt.block_on(async move {
        // 300 wrong guesses from one source with one name, 16 at a time,
        // for at most 3 s.
        let start = Instant::now();
        let verdicts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
        let tries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for w in 0..16u64 {
            let verdicts = verdicts.clone();
            let tries = tries.clone();
            workers.push(tokio::spawn(async move {
                while start.elapsed() < Duration::from_secs(3)
                    && tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 300
                {
                    let left = Duration::from_secs(3).saturating_sub(start.elapsed());
                    let guess = chap_login(
                        Ipv4Addr::new(127, 0, 0, 2),
                        addr,
                        ATTACKER,
                        IQN,
                        0x23d0_0001_0000 + w,
                        "not-the-secret-at-all",
                        None,
                    );
                    if let Ok(Some((2, 1))) = tokio::time::timeout(left, guess).await {
                        verdicts.lock().unwrap().push(start.elapsed());
                    }
                }
            }));
        }
        // Meanwhile the right initiator, elsewhere, gets in at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        let st = chap_login(LOCALHOST, addr, LEGIT, IQN, 0x23d0_0000_0003, SECRET, None).await;
        let took = t.elapsed();
        assert_eq!(st, Some((0, 0)));
        assert!(took < Duration::from_secs(1), "legitimate CHAP login took {took:?}");
        for w in workers {
            w.await.unwrap();
        }
        let v = verdicts.lock().unwrap().clone();
        let first_second = v.iter().filter(|t| **t < Duration::from_secs(1)).count();
        eprintln!(
            "wrong CHAP responses checked: {} in the first second, {} in 3 s; legitimate login {took:?}",
            first_second,
            v.len()
        );
        assert!(first_second <= 10, "{first_second} guesses checked in one second");
        assert!(v.len() < 30, "{} guesses checked in 3 s", v.len());
    });
}

#[test]
fn login_statuses_do_not_reveal_target_names_under_chap() {
    for (chap, disc) in [
        (Some(chap_config(false)), None),
        (None, Some(chap_config(false))),
        (Some(chap_config(false)), Some(chap_config(false))),
    ] {
        let srv = server(Limits::default(), chap.clone(), disc.clone());
        let addr = srv.portals()[0];
        let rt = runtime();
        rt.block_on(async {
            let unknown = "iqn.2026-11.io.keyfence:no-such-target";
            if chap.is_some() {
                // Wrong secret: the same answer for a real and a made-up name.
                let real =
                    chap_login(LOCALHOST, addr, LEGIT, IQN, 0x1, "wrong-secret-0000", None).await;
                let fake = chap_login(
                    LOCALHOST,
                    addr,
                    LEGIT,
                    unknown,
                    0x2,
                    "wrong-secret-0000",
                    None,
                )
                .await;
                assert_eq!(real, Some((2, 1)));
                assert_eq!(fake, real, "unknown name answered differently");
                // No authentication offered.
                let a = login_to(LOCALHOST, addr, LEGIT, IQN, 0x3).await;
                let b = login_to(LOCALHOST, addr, LEGIT, unknown, 0x4).await;
                assert_eq!(a, Some((2, 1)));
                assert_eq!(b, a);
            } else {
                // Only discovery is protected: a name is still not told
                // apart from the open target's by 0203h.
                let st = plain_login(LOCALHOST, addr, LEGIT, 0x5).await;
                assert_eq!(st, Some((0, 0)));
                let b = login_to(LOCALHOST, addr, LEGIT, unknown, 0x6).await;
                assert_eq!(b, Some((2, 1)), "unknown target with discovery CHAP");
            }
        });
    }
    // Without any CHAP nothing is secret to protect: an unknown name gets
    // 0202h on the first request, as a forbidden one does.
    let srv = server(Limits::default(), None, None);
    let addr = srv.portals()[0];
    runtime().block_on(async {
        let nope = "iqn.2026-11.io.keyfence:nope";
        let b = login_to(LOCALHOST, addr, LEGIT, nope, 0x7).await;
        assert_eq!(b, Some((2, 2)));
    });
}

#[test]
fn mutual_chap_challenge_must_be_long_enough() {
    let srv = server(Limits::default(), Some(chap_config(true)), None);
    let addr = srv.portals()[0];
    runtime().block_on(async {
        for (len, want) in [
            (1usize, (2, 1)),
            (15, (2, 1)),
            (1025, (2, 1)),
            (16, (0, 0)),
            (64, (0, 0)),
        ] {
            let c: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let st = chap_login(
                LOCALHOST,
                addr,
                LEGIT,
                IQN,
                0x100 + len as u64,
                SECRET,
                Some((9, c)),
            )
            .await;
            assert_eq!(st, Some(want), "mutual challenge of {len} bytes");
        }
    });
}

/// A SendTargets exchange on a logged-in connection: the response text.
async fn send_targets(c: &mut Raw, cmd_sn: u32, data: Bytes) -> Option<TargetPdu> {
    let req = TextRequest {
        immediate: true,
        final_bit: true,
        cont: false,
        lun: Default::default(),
        itt: 0x1000 + cmd_sn,
        ttt: 0xffff_ffff,
        cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        data,
    };
    c.send(&req.to_pdu()).await.ok()?;
    let p = c.recv().await?;
    let t = TargetPdu::parse(&p).ok()?;
    if let TargetPdu::TextResponse(r) = &t {
        c.exp_stat_sn = r.stat_sn.wrapping_add(1);
    }
    Some(t)
}

#[test]
fn send_targets_in_sessions_and_on_wildcard_portals() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerOptions {
        iqn: IQN.into(),
        size: 1 << 20,
        ..ServerOptions::default()
    }
    .config(dir.path());
    // A wildcard portal: advertise the address the connection came to.
    cfg.targets[0].portals = vec!["0.0.0.0:0".into()];
    cfg.validate().unwrap();
    let srv = InProcessServer::from_config(cfg).unwrap();
    let port = srv.portals()[0].port();
    let addr = SocketAddr::from((LOCALHOST, port));
    runtime().block_on(async {
        for (session, isid) in [(None, 0x10u64), (Some(IQN), 0x11)] {
            let mut c = Raw::connect_from(LOCALHOST, addr).await.unwrap();
            let mut first = vec![("InitiatorName", LEGIT)];
            match session {
                Some(t) => {
                    first.push(("SessionType", "Normal"));
                    first.push(("TargetName", t));
                }
                None => first.push(("SessionType", "Discovery")),
            }
            assert_eq!(c.operational(isid, first).await, Some((0, 0)));
            let Some(TargetPdu::TextResponse(r)) =
                send_targets(&mut c, 1, text(&[("SendTargets", "All")])).await
            else {
                panic!("no text response to SendTargets=All");
            };
            let found = keyfence_iscsi::text::parse_send_targets(&r.data).unwrap();
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].name, IQN);
            assert_eq!(found[0].addresses, vec![(format!("127.0.0.1:{port}"), 1)]);

            // Malformed requests get an answer and the connection stays.
            for (bad, want) in [
                (text(&[("sendtargets", "All")]), "sendtargets=NotUnderstood"),
                (text(&[("SendTargetz", "All")]), "SendTargetz=NotUnderstood"),
                (text(&[("SendTargets", "all")]), "SendTargets=Reject"),
                (text(&[("SendTargets", "not a name")]), "SendTargets=Reject"),
            ] {
                match send_targets(&mut c, 1, bad).await {
                    Some(TargetPdu::TextResponse(r)) => {
                        let t = String::from_utf8_lossy(&r.data).replace('\0', " ");
                        assert!(t.contains(want), "{want}: {t}");
                    }
                    other => panic!("{want}: {other:?}"),
                }
            }
            match send_targets(&mut c, 1, Bytes::from_static(b"SendTargets\0")).await {
                Some(TargetPdu::Reject(_)) => {}
                other => panic!("text without '=': {other:?}"),
            }
            // Still in business.
            let Some(TargetPdu::TextResponse(r)) =
                send_targets(&mut c, 1, text(&[("SendTargets", "All")])).await
            else {
                panic!("connection dropped after malformed requests");
            };
            assert!(!r.data.is_empty());
        }
    });
}
