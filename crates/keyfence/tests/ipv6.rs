//! `keyfence serve` on the IPv6 loopback address, over real sockets: a
//! portal on `[::1]` is announced by SendTargets in brackets, libiscsi and
//! the PR tools reach the LU through it, the relative target port of a
//! registration made through it is the IPv6 portal group's, and the
//! per-source login limit counts `::1` as a source of its own, apart from
//! 127.0.0.1.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use keyfence_testkit::{code, require, run_bounded, text, Serve};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:ipv6";
const INIT: &str = "iqn.2026-11.io.keyfence.test:ipv6";
const WAIT: Duration = Duration::from_secs(30);

/// `serve` with a portal on `[::1]` (TPGT 1) and one on 127.0.0.1 (TPGT 2).
fn serve(limits: &str) -> Serve {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keyfence.toml");
    std::fs::write(
        &cfg,
        format!(
            "[limits]\n{limits}\n\n\
             [[target]]\nname = \"{IQN}\"\nportals = [\"[::1]:0\", \"127.0.0.1:0\"]\nopen = true\n\n\
             [[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"16M\"\n"
        ),
    )
    .unwrap();
    let s = Serve::builder(KF)
        .config(&cfg)
        .portals(2)
        .log_level("error")
        .start();
    // The config is read at start-up; the directory may go.
    drop(dir);
    assert!(s.portals()[0].is_ipv6(), "portals: {:?}", s.portals());
    assert!(s.portals()[1].is_ipv4(), "portals: {:?}", s.portals());
    s
}

fn kf(args: &[&str]) -> (i32, String) {
    let o = run_bounded(
        Command::new(KF)
            .args(args)
            .env("KEYFENCE_INITIATOR_NAME", INIT)
            .env_remove("KEYFENCE_CONFIG"),
        None,
        WAIT,
    );
    (code(&o), text(&o.stdout) + &text(&o.stderr))
}

fn url(s: &Serve, portal: usize) -> String {
    format!("iscsi://{}/{IQN}/0", s.portals()[portal])
}

#[test]
fn tools_reach_the_lu_through_an_ipv6_portal() {
    let ls = require("iscsi-ls");
    let s = serve("");
    let (v6, v4) = (s.portals()[0], s.portals()[1]);

    // Discovery through the IPv6 portal lists both portal groups, the
    // IPv6 address in brackets (RFC 7143, TargetAddress), and logs in to
    // the LU through each.
    let o = run_bounded(
        Command::new(ls).args(["-s", "-i", INIT, &format!("iscsi://{v6}")]),
        None,
        WAIT,
    );
    let out = text(&o.stdout) + &text(&o.stderr);
    assert_eq!(code(&o), 0, "iscsi-ls -s iscsi://{v6} failed:\n{out}");
    for (portal, tpgt) in [(v6, 1), (v4, 2)] {
        let want = format!("Target:{IQN} Portal:{portal},{tpgt}");
        assert!(
            out.lines().any(|l| l.trim() == want),
            "no line {want:?}:\n{out}"
        );
    }
    assert_eq!(
        out.lines().filter(|l| l.starts_with("Lun:0")).count(),
        2,
        "LUN 0 not reached through both portals:\n{out}"
    );

    // A registration through [::1] is seen through 127.0.0.1, on relative
    // target port 1 (the IPv6 portal group).
    let (c, out) = kf(&[
        "persist",
        "--out",
        "--register",
        "--param-sark=0x6006",
        &url(&s, 0),
    ]);
    assert_eq!(c, 0, "register through [::1]:\n{out}");
    let (c, out) = kf(&["persist", "--in", "--read-full-status", &url(&s, 1)]);
    assert_eq!(c, 0, "read full status through 127.0.0.1:\n{out}");
    let at = out
        .find("Key=0x6006")
        .unwrap_or_else(|| panic!("key 0x6006 not listed:\n{out}"));
    assert!(
        out[at..].contains("Relative port address: 0x1"),
        "registration not on the IPv6 port:\n{out}"
    );
    assert!(
        out[at..].contains(&format!("iSCSI world wide unique port id: {INIT},i,0x")),
        "initiator port not shown:\n{out}"
    );
}

/// What a read of `c` within `limit` shows: the peer closed it (EOF or
/// reset), or it stayed open and silent.
fn closed_within(c: &mut TcpStream, limit: Duration) -> bool {
    c.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 48];
    match c.read(&mut b) {
        Ok(0) => true,
        Ok(n) => panic!("the target sent {n} bytes before any login request"),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

fn idle(addr: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&addr, WAIT).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

#[test]
fn per_source_login_limit_counts_ipv6_loopback_apart() {
    let s = serve("max_login_connections_per_source = 3\nfirst_pdu_timeout_secs = 20");
    let v6 = s.portals()[0];

    // Three idle connections from ::1 take that source's login slots ...
    let mut held: Vec<TcpStream> = (0..3).map(|_| idle(v6)).collect();
    // ... so a fourth from ::1 is closed at once.
    let t = Instant::now();
    let mut extra = idle(v6);
    assert!(
        closed_within(&mut extra, Duration::from_secs(5)),
        "a fourth connection from ::1 was kept open"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // The held ones are still open (the first-PDU deadline is 20 s).
    for c in &mut held {
        assert!(
            !closed_within(c, Duration::from_millis(200)),
            "an idle ::1 connection ended within its deadline"
        );
    }

    // 127.0.0.1 is a source of its own: an initiator there logs in and
    // works while ::1 is at its limit.
    let (c, out) = kf(&["persist", "--in", "--read-keys", &url(&s, 1)]);
    assert_eq!(
        c, 0,
        "login from 127.0.0.1 while ::1 is at its limit:\n{out}"
    );
    assert!(out.contains("PR generation=0x0"), "{out}");

    // Once the idle ones go, ::1 logs in again.
    drop(held);
    let deadline = Instant::now() + WAIT;
    loop {
        let (c, out) = kf(&["persist", "--in", "--read-keys", &url(&s, 0)]);
        if c == 0 {
            assert!(out.contains("PR generation=0x0"), "{out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "::1 cannot log in after its idle connections closed:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
