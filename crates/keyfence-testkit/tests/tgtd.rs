//! The tgtd fixture: several side by side, each torn down completely.

use std::net::TcpStream;
use std::time::Duration;

use keyfence_testkit::{Tgtd, TgtdOptions};

#[test]
fn two_tgtds_side_by_side_and_gone_after_drop() {
    let starts: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                Tgtd::start(TgtdOptions {
                    iqn: format!("iqn.2026-11.io.keyfence:testkit-{i}"),
                    ..TgtdOptions::default()
                })
            })
        })
        .collect();
    let ts: Vec<Tgtd> = starts.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(ts[0].port(), ts[1].port());
    assert_ne!(ts[0].control(), ts[1].control());
    for t in &ts {
        TcpStream::connect_timeout(&t.portal(), Duration::from_secs(5)).expect("portal up");
        let o = t.adm(&["--lld", "iscsi", "--op", "show", "--mode", "target"]);
        let shown = keyfence_testkit::text(&o.stdout);
        assert!(shown.contains(&format!("Target 1: {}", t.iqn())), "{shown}");
        assert!(shown.contains("LUN: 1"), "{shown}");
        assert!(t.url().ends_with(&format!("/{}/1", t.iqn())));
    }
    let gone: Vec<_> = ts.iter().map(|t| (t.pid(), t.portal())).collect();
    drop(ts);
    for (pid, portal) in gone {
        // Reaped by the fixture: the PID is free (or already reused by
        // something else).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("tgtd"),
            "tgtd {pid} still there"
        );
        assert!(TcpStream::connect_timeout(&portal, Duration::from_secs(1)).is_err());
    }
}
