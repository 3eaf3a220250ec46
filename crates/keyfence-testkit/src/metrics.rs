//! The Prometheus endpoint of a keyfence server: one scrape over plain
//! HTTP/1.1, and `promtool check metrics` over the text.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::Command;
use std::time::Duration;

use crate::cmd::{run_bounded, text};

/// How long one scrape or one promtool run may take.
const LIMIT: Duration = Duration::from_secs(10);

/// `GET /metrics` from `addr`: the body of its answer, which must be
/// `200 OK`.
pub fn scrape(addr: impl ToSocketAddrs + std::fmt::Debug) -> String {
    let mut s =
        TcpStream::connect(&addr).unwrap_or_else(|e| panic!("metrics endpoint {addr:?}: {e}"));
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got)
        .unwrap_or_else(|e| panic!("reading the answer of {addr:?}: {e}"));
    let (head, body) = got
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response from {addr:?}: {got:?}"));
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    body.to_string()
}

/// The address `keyfence serve` printed in its banner line
/// `metrics on http://ADDR/metrics`; `banner` is everything it printed.
pub fn address_in_banner(banner: &str) -> SocketAddr {
    banner
        .lines()
        .find_map(|l| {
            l.strip_prefix("metrics on http://")?
                .strip_suffix("/metrics")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no metrics line in:\n{banner}"))
}

/// `promtool check metrics` accepts `exposition` (a missing promtool fails
/// the test with the package to install).
pub fn promtool_check(exposition: &str) {
    let promtool = crate::tool::require("promtool");
    let o = run_bounded(
        Command::new(promtool).args(["check", "metrics"]),
        Some(exposition.as_bytes()),
        LIMIT,
    );
    assert!(
        o.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- text ---\n{exposition}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
}
