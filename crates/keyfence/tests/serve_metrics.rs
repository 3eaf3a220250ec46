//! `keyfence serve --metrics`: the address printed at start answers
//! `GET /metrics`, and a bad address (flag or config key) or a busy port
//! gets one precise line and a failing exit status.

use std::net::TcpListener;

use keyfence_testkit::{metrics, Serve};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");

fn run_failing(args: &[&str]) -> (i32, String) {
    keyfence_testkit::serve::failed_start(KF, args)
}

#[test]
fn the_printed_address_serves_metrics() {
    let serve = Serve::builder(KF)
        .size("1M")
        .log_level("error")
        .arg("--metrics")
        .arg("127.0.0.1:0")
        .start();
    // The body of a 200 answer, after the line break that ends the head.
    let got = format!("\n{}", metrics::scrape(serve.metrics_addr()));
    assert!(
        got.contains("\nkeyfence_sessions{kind=\"normal\"} 0\n"),
        "{got}"
    );
    assert!(
        got.contains(
            "\nkeyfence_lu_reads_total{target=\"iqn.2026-11.io.keyfence:default\",lun=\"0\"} 0\n"
        ),
        "{got}"
    );
}

#[test]
fn bad_metrics_addresses_get_one_precise_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let data = data.to_str().unwrap();

    // The flag: a usage error (clap's exit status 2), one line naming it.
    let (code, err) = run_failing(&["--data-dir", data, "--metrics", "localhost:9750"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "'localhost:9750': 'localhost' is not an IP address (give a numeric address, IPv6 as [addr]:port)"
        ) && err.contains("--metrics"),
        "{err}"
    );

    // The config key.
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        "metrics = \"127.0.0.1:99999\"\ndata_dir = \"inside\"\n[[target]]\n\
         name = \"iqn.2026-11.io.keyfence:x\"\nportals = [\"127.0.0.1:0\"]\nopen = true\n\
         [[target.lun]]\nid = 0\nsize = \"1M\"\n",
    )
    .unwrap();
    let (code, err) = run_failing(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!(
            "keyfence serve: {}: metrics: '127.0.0.1:99999': port 99999 is out of range (0-65535)",
            cfg.display()
        )
    );

    // A port someone else holds: nothing is created.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let (code, err) = run_failing(&[
        "--data-dir",
        data,
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        &format!("127.0.0.1:{port}"),
    ]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "keyfence serve: cannot listen for metrics on 127.0.0.1:{port}: "
        )),
        "{err}"
    );
    assert!(!std::path::Path::new(data).exists());
}
