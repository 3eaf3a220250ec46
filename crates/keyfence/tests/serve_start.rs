//! `keyfence serve` at start-up: one server per data directory and per
//! backing file, failed starts leave nothing behind, and bad arguments get
//! one precise line.

use std::net::TcpListener;
use std::path::Path;

use keyfence_testkit::Serve;

const KF: &str = env!("CARGO_BIN_EXE_keyfence");

/// `keyfence serve --data-dir DATA [--size SIZE]` on 127.0.0.1:0 (from the
/// workspace test kit), stopped when dropped.
fn start(data: &Path, size: Option<&str>) -> Serve {
    let b = Serve::builder(KF).data_dir(data).log_level("error");
    match size {
        Some(s) => b.size(s),
        None => b,
    }
    .start()
}

/// Run `keyfence serve ARGS` expecting it to fail within 15 s.
fn run_failing(args: &[&str]) -> (i32, String) {
    keyfence_testkit::serve::failed_start(KF, args)
}

fn one_line(e: &str) {
    assert_eq!(e.lines().count(), 1, "want one line, got: {e}");
}

#[test]
fn a_data_dir_and_a_backing_file_are_served_by_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data_s = data.to_str().unwrap();
    let first = start(&data, Some("16M"));
    let pid = first.pid().expect("serve running");
    let lock = std::fs::read_to_string(data.join("keyfence.lock")).unwrap();
    assert_eq!(lock.trim(), pid.to_string());

    // Same data directory, another port.
    let (code, err) = run_failing(&[
        "--data-dir",
        data_s,
        "--listen",
        "127.0.0.1:0",
        "--size",
        "16M",
    ]);
    assert_eq!(code, 1, "{err}");
    one_line(&err);
    assert!(
        err.contains("is in use by another keyfence serve") && err.contains(&format!("pid {pid}")),
        "{err}"
    );

    // Another data directory, but the first one's backing file.
    let cfg = tmp.path().join("other.toml");
    let lun = data.join("lun0.img");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"other\"\n[[target]]\nname = \"iqn.2026-11.io.keyfence:x\"\n\
             portals = [\"127.0.0.1:0\"]\nopen = true\n[[target.lun]]\nid = 0\npath = \"{}\"\n",
            lun.display()
        ),
    )
    .unwrap();
    let (code, err) = run_failing(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    one_line(&err);
    assert!(
        err.contains("lun0.img") && err.contains(&format!("pid {pid}")),
        "{err}"
    );
    // That failed start created its data dir and removed it again.
    assert!(!tmp.path().join("other").exists());
    drop(first);

    // Once the holder is gone the directory can be served again.
    let again = start(&data, None);
    drop(again);
}

#[test]
fn failed_starts_leave_no_data_dir_behind() {
    let tmp = tempfile::tempdir().unwrap();
    // Port in use.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let data = tmp.path().join("fresh/data");
    let (code, err) = run_failing(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    assert_eq!(code, 1, "{err}");
    one_line(&err);
    assert!(err.contains("cannot listen"), "{err}");
    assert!(!tmp.path().join("fresh").exists(), "{err}");

    // Missing device after a LUN file was created.
    let cfg = tmp.path().join("dev.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"d2\"\n[[target]]\nname = \"iqn.2026-11.io.keyfence:x\"\n\
             portals = [\"127.0.0.1:0\"]\nopen = true\n[[target.lun]]\nid = 0\npath = \"sub/l0.img\"\nsize = \"1M\"\n\
             [[target.lun]]\nid = 1\ndevice = \"{}\"\n",
            tmp.path().join("no-such-device").display()
        ),
    )
    .unwrap();
    let (code, err) = run_failing(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    one_line(&err);
    assert!(err.contains("no-such-device"), "{err}");
    assert!(!tmp.path().join("d2").exists(), "{err}");

    // An existing data dir keeps what it had.
    let keep = tmp.path().join("keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("notes"), b"x").unwrap();
    let (code, _) = run_failing(&[
        "--data-dir",
        keep.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    assert_eq!(code, 1);
    let left: Vec<_> = std::fs::read_dir(&keep)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes")]);
    drop(busy);
}

#[test]
fn bad_paths_and_arguments_get_one_precise_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        "data_dir = \"inside\"\n[[target]]\nname = \"iqn.2026-11.io.keyfence:x\"\n\
         portals = [\"127.0.0.1:0\"]\nopen = true\n[[target.lun]]\nid = 0\npath = \"../outside/l.img\"\n",
    )
    .unwrap();
    let (code, err) = run_failing(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    one_line(&err);
    assert!(err.contains("must not contain '..'"), "{err}");
    assert!(!tmp.path().join("outside").exists());
    assert!(!tmp.path().join("inside").exists());

    let (code, err) = run_failing(&["--size", "-5"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("size '-5' is negative"), "{err}");
    assert!(!err.contains("unexpected argument"), "{err}");

    let dir = tmp.path().join("d");
    let (code, err) = run_failing(&[
        "--listen",
        "127.0.0.1:70000",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    one_line(&err);
    assert!(
        err.contains("port 70000 is out of range (0-65535)"),
        "{err}"
    );
    assert!(!Path::new(&dir).exists());
}
