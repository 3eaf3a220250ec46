//! `keyfence bench --rw register`: PR OUT latency against a real
//! `keyfence serve` — every command is a REGISTER AND IGNORE EXISTING KEY
//! with a new key, the summary line carries p50 and p99, and the key is
//! gone afterwards.

use std::process::Command;
use std::time::Duration;

use keyfence_testkit::{code, run_bounded, text, Serve};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");

fn field(line: &str, name: &str) -> f64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

#[test]
fn register_loop_reports_latency_and_leaves_no_key() {
    let serve = Serve::builder(KF).size("16M").log_level("error").start();
    let url = serve.url(0);
    let o = run_bounded(
        Command::new(KF).args([
            "bench",
            &url,
            "--rw",
            "register",
            "--qd",
            "1",
            "--duration",
            "0.5",
            "--initiator-name",
            "iqn.2026-11.io.keyfence.test:bench-register",
        ]),
        None,
        Duration::from_secs(30),
    );
    assert_eq!(code(&o), 0, "bench: {}", text(&o.stderr));
    let out = text(&o.stdout);
    let line = out.lines().last().expect("summary line");
    assert!(line.starts_with("rw=register "), "{line}");
    assert!(field(line, "ios") > 0.0, "{line}");
    let (p50, p99) = (field(line, "lat_p50_us"), field(line, "lat_p99_us"));
    assert!(p50 > 0.0 && p50 <= p99, "{line}");
    assert_eq!(field(line, "mbps"), 0.0, "{line}");
    // Every command changed the state: PRgeneration counts them all (and
    // the final unregistration).
    let o = run_bounded(
        Command::new(KF).args(["persist", "-n", "-k", &url]),
        None,
        Duration::from_secs(30),
    );
    assert_eq!(code(&o), 0, "persist: {}", text(&o.stderr));
    let keys = text(&o.stdout);
    assert!(
        keys.contains("there are NO registered reservation keys"),
        "{keys}"
    );
    let generation: f64 = keys
        .split("PR generation=0x")
        .nth(1)
        .and_then(|s| s.split([',', ' ', '\n']).next())
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("no PR generation in {keys}")) as f64;
    assert_eq!(generation, field(line, "ios") + 1.0, "{line}\n{keys}");
}
