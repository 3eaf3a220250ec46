//! `keyfence bench --rw register`: PR OUT latency against a real
//! `keyfence serve` — every command is a REGISTER AND IGNORE EXISTING KEY
//! with a new key, the summary line carries p50 and p99, and the key is
//! gone afterwards.

use std::process::{Command, Output};
use std::time::Duration;

use keyfence_testkit::{code, run_bounded, text, Serve};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");

fn field(line: &str, name: &str) -> f64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

/// `keyfence bench URL ARGS...`, bounded.
fn bench(url: &str, args: &[&str]) -> Output {
    run_bounded(
        Command::new(KF).arg("bench").arg(url).args(args),
        None,
        Duration::from_secs(30),
    )
}

/// The summary line of a bench run that succeeded, which starts with
/// `head` and whose latency percentiles are positive and ordered.
fn summary(o: &Output, head: &str) -> String {
    assert_eq!(code(o), 0, "bench: {}", text(&o.stderr));
    let out = text(&o.stdout);
    let line = out.lines().last().expect("summary line").to_string();
    assert!(line.starts_with(head), "{line}");
    let (p50, p99) = (field(&line, "lat_p50_us"), field(&line, "lat_p99_us"));
    assert!(p50 > 0.0 && p50 <= p99, "{line}");
    line
}

#[test]
fn register_loop_reports_latency_and_leaves_no_key() {
    let serve = Serve::builder(KF).size("16M").log_level("error").start();
    let url = serve.url(0);
    let o = bench(
        &url,
        &[
            "--rw",
            "register",
            "--qd",
            "1",
            "--duration",
            "0.5",
            "--initiator-name",
            "iqn.2026-11.io.keyfence.test:bench-register",
        ],
    );
    let line = &summary(&o, "rw=register ");
    assert!(field(line, "ios") > 0.0, "{line}");
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

/// `keyfence bench --rw caw`: each worker swaps two patterns in its own
/// range with COMPARE AND WRITE; every compare matches, so the run
/// succeeds, and each range ends holding one of its two patterns.
#[test]
fn caw_loop_swaps_each_workers_range_and_reports_latency() {
    let serve = Serve::builder(KF).size("16M").log_level("error").start();
    let url = serve.url(0);
    let o = bench(
        &url,
        &[
            "--rw",
            "caw",
            "--qd",
            "2",
            "--bs",
            "1024",
            "--duration",
            "0.5",
        ],
    );
    let line = &summary(&o, "rw=caw bs=1024 qd=2 ");
    assert!(field(line, "ios") >= 2.0, "{line}");
    // Both ranges hold a pattern and its complement flipped in turn:
    // the two ranges start from the same pattern.
    let img = std::fs::read(serve.data_dir().join("lun0.img")).unwrap();
    let (r0, r1) = (&img[..1024], &img[1024..2048]);
    assert!(r0.iter().any(|&b| b != 0), "range 0 never written");
    let flipped: Vec<u8> = r1.iter().map(|b| !b).collect();
    assert!(r0 == r1 || r0 == &flipped[..], "ranges hold other data");
    assert!(
        img[2048..].iter().all(|&b| b == 0),
        "wrote outside the ranges"
    );
    // A range longer than COMPARE AND WRITE's 255 blocks is refused.
    let o = bench(
        &url,
        &[
            "--rw",
            "caw",
            "--qd",
            "40",
            "--bs",
            "512k",
            "--duration",
            "0.2",
        ],
    );
    assert_ne!(code(&o), 0, "{}", text(&o.stdout));
    assert!(text(&o.stderr).contains("255"), "{}", text(&o.stderr));
}
