//! `keyfence serve` under systemd's `Type=notify` protocol, against a real
//! notification socket: READY=1 only once the portal accepts connections
//! and the LU is open, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on
//! SIGTERM; a start that fails sends nothing.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");

/// The service manager's end: a datagram socket NOTIFY_SOCKET names.
fn notify_socket(dir: &Path, name: &str) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join(name);
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    (sock, path)
}

/// The next notification, with the time it arrived; None after `wait`.
fn recv(sock: &UnixDatagram, wait: Duration) -> Option<(Instant, Vec<String>)> {
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some((
            Instant::now(),
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_string)
                .collect(),
        )),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            None
        }
        Err(e) => panic!("recv on notify socket: {e}"),
    }
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(data_dir: &Path, notify: &Path, watchdog_usec: u64) -> Serve {
    let child = Command::new(KF)
        .args(["serve", "--listen", "127.0.0.1:0", "--size", "1M"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--log-level", "error"])
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", watchdog_usec.to_string())
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn keyfence serve");
    Serve(child)
}

#[test]
fn ready_watchdog_and_stopping_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path(), "notify.sock");
    let data = dir.path().join("data");
    // 400 ms watchdog: keep-alives every 200 ms.
    let mut serve = spawn(&data, &path, 400_000);

    // The first notification is READY=1, sent once the server is up.
    let (_, first) = recv(&sock, Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "no notification within 30 s (exit status {:?})",
            serve.0.try_wait()
        )
    });
    assert!(first.contains(&"READY=1".to_string()), "{first:?}");
    assert!(
        first
            .iter()
            .any(|l| l.starts_with("STATUS=serving 1 target(s) on 127.0.0.1:")),
        "{first:?}"
    );

    // At that moment the portal accepts connections (one attempt, no
    // retry) and the LU's backing file is open at its size.
    let stdout = serve.0.stdout.take().unwrap();
    let mut port = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("portal 127.0.0.1:") {
            port = rest
                .split_whitespace()
                .next()
                .map(|p| p.parse::<u16>().unwrap());
            break;
        }
    }
    let port = port.expect("banner names the portal");
    std::net::TcpStream::connect(("127.0.0.1", port))
        .expect("READY=1 was sent before the portal accepted connections");
    assert_eq!(
        std::fs::metadata(data.join("lun0.img")).unwrap().len(),
        1 << 20
    );

    // Keep-alives: WATCHDOG=1, more often than the 400 ms timeout.
    let mut times = Vec::new();
    while times.len() < 6 {
        let (at, msg) = recv(&sock, Duration::from_secs(5)).expect("WATCHDOG=1 keeps coming");
        assert_eq!(msg, vec!["WATCHDOG=1".to_string()], "{msg:?}");
        times.push(at);
    }
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    assert!(
        mean >= Duration::from_millis(100) && mean < Duration::from_millis(400),
        "keep-alive every {mean:?} (gaps {gaps:?}); expected about 200 ms"
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = serve.0.id() as libc::pid_t;
    // SAFETY: kill(2) on the child we spawned and still hold.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no STOPPING=1 within 30 s");
        let (_, msg) = recv(&sock, Duration::from_secs(30)).expect("STOPPING=1 after SIGTERM");
        if msg.contains(&"STOPPING=1".to_string()) {
            break;
        }
        assert_eq!(msg, vec!["WATCHDOG=1".to_string()], "{msg:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = serve.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "keyfence serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn failed_start_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path(), "first.sock");
    let data = dir.path().join("data");
    let _first = spawn(&data, &path, 0);
    let (_, msg) = recv(&sock, Duration::from_secs(30)).expect("first server READY=1");
    assert!(msg.contains(&"READY=1".to_string()), "{msg:?}");
    // WATCHDOG_USEC=0 means no watchdog: nothing more arrives.
    assert!(recv(&sock, Duration::from_millis(300)).is_none());

    // A second server on the same data directory cannot lock it: it must
    // exit 1 without ever claiming readiness.
    let (sock2, path2) = notify_socket(dir.path(), "second.sock");
    let mut second = spawn(&data, &path2, 400_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = second.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "second server kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    assert_eq!(recv(&sock2, Duration::from_millis(100)), None);
}
