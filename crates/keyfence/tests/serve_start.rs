//! `keyfence serve` at start-up: one server per data directory and per
//! backing file, failed starts leave nothing behind, and bad arguments get
//! one precise line.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `keyfence serve`, SIGKILLed when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[&str], port: u16) -> Serve {
    let child = Command::new(KF)
        .arg("serve")
        .args(args)
        .args(["--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn keyfence serve");
    let mut s = Serve(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            matches!(s.0.try_wait(), Ok(None)),
            "keyfence serve exited before listening"
        );
        assert!(Instant::now() < deadline, "keyfence serve did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

/// Run `keyfence serve ARGS` expecting it to fail within 15 s.
fn run_failing(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(KF)
        .arg("serve")
        .args(args)
        .args(["--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyfence serve");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keyfence serve {args:?} kept running; it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Output { status, stderr, .. } = child.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&stderr).trim().to_string();
    (status.code().unwrap_or(-1), err)
}

fn one_line(e: &str) {
    assert_eq!(e.lines().count(), 1, "want one line, got: {e}");
}

#[test]
fn a_data_dir_and_a_backing_file_are_served_by_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data_s = data.to_str().unwrap();
    let p1 = free_port();
    let first = start(
        &[
            "--data-dir",
            data_s,
            "--listen",
            &format!("127.0.0.1:{p1}"),
            "--size",
            "16M",
        ],
        p1,
    );
    let pid = first.0.id();
    let lock = std::fs::read_to_string(data.join("keyfence.lock")).unwrap();
    assert_eq!(lock.trim(), pid.to_string());

    // Same data directory, another port.
    let p2 = free_port();
    let (code, err) = run_failing(&[
        "--data-dir",
        data_s,
        "--listen",
        &format!("127.0.0.1:{p2}"),
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
             portals = [\"127.0.0.1:{}\"]\n[[target.lun]]\nid = 0\npath = \"{}\"\n",
            free_port(),
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
    let p3 = free_port();
    let again = start(
        &["--data-dir", data_s, "--listen", &format!("127.0.0.1:{p3}")],
        p3,
    );
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
             portals = [\"127.0.0.1:{}\"]\n[[target.lun]]\nid = 0\npath = \"sub/l0.img\"\nsize = \"1M\"\n\
             [[target.lun]]\nid = 1\ndevice = \"{}\"\n",
            free_port(),
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
        format!(
            "data_dir = \"inside\"\n[[target]]\nname = \"iqn.2026-11.io.keyfence:x\"\n\
             portals = [\"127.0.0.1:{}\"]\n[[target.lun]]\nid = 0\npath = \"../outside/l.img\"\n",
            free_port()
        ),
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
