//! Child processes run to completion within a time limit, output captured.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The limit of [`run`].
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(60);

/// Run `cmd` with no stdin, bounded by [`DEFAULT_LIMIT`].
pub fn run(cmd: &mut Command) -> Output {
    run_bounded(cmd, None, DEFAULT_LIMIT)
}

/// Run `cmd` to completion with `stdin` (or none) and its stdout and stderr
/// captured. When it is still running after `limit` it is killed and the
/// test fails with what it printed so far. A program that cannot be started
/// fails the test too, with an install hint when the program is a known
/// external tool.
pub fn run_bounded(cmd: &mut Command, stdin: Option<&[u8]>, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        let prog = cmd.get_program().to_string_lossy().into_owned();
        let name = prog.rsplit('/').next().unwrap_or(&prog).to_string();
        if e.kind() == std::io::ErrorKind::NotFound {
            panic!("{name} not found: {}", crate::tool::install_hint(&name));
        }
        panic!("cannot run {prog}: {e}")
    });
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let data = data.to_vec();
        // A child that exits without reading its input closes the pipe:
        // that is its business, not an error of the test kit.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_until(&mut child, limit);
    let timed_out = status.is_none();
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait for child");
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let output = Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    };
    if timed_out {
        panic!(
            "{cmd:?} did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
            text(&output.stdout),
            text(&output.stderr)
        );
    }
    output
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Wait (polling) for `child` to exit, at most `limit`.
pub fn wait_until(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => return None,
            Err(e) => panic!("wait for pid {}: {e}", child.id()),
        }
    }
}

/// Run `cmd` with all output discarded; its exit status, or None when it
/// could not be started or was killed after `limit`. Never panics (for
/// teardown code in `Drop`).
pub fn status_within(cmd: &mut Command, limit: Duration) -> Option<ExitStatus> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let st = wait_until(&mut child, limit);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    st
}

/// Send SIGTERM to `child` (a process this test started and still holds).
pub fn terminate(child: &Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on the PID of our own unreaped child: the PID cannot
    // have been reused while the Child is not waited for.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Send `sig` to `pid`, a process this test started and still holds
/// (not reaped), so the PID cannot have been reused.
pub fn signal(pid: u32, sig: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory effects; the caller holds the child.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// SIGSTOP `pid` (see [`signal`]) and wait until every thread of it has
/// stopped, as the signal is delivered asynchronously; fails the test
/// after `limit`.
pub fn freeze(pid: u32, limit: Duration) {
    signal(pid, libc::SIGSTOP);
    let deadline = Instant::now() + limit;
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc task list");
        let all_stopped = tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit(')')
                        .next()
                        .map(|r| r.trim_start().starts_with('T'))
                })
                .unwrap_or(true)
        });
        if all_stopped {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} not stopped within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Exit code, or -1 when the process was killed by a signal.
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Bytes as text, invalid UTF-8 replaced.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_stdin() {
        let o = run_bounded(
            Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]),
            Some(b"hello"),
            Duration::from_secs(10),
        );
        assert_eq!(
            (code(&o), text(&o.stdout), text(&o.stderr)),
            (3, "hello".into(), "err\n".into())
        );
    }

    #[test]
    fn large_output_does_not_deadlock() {
        let o = run(Command::new("sh").args(["-c", "head -c 1000000 /dev/zero"]));
        assert_eq!(o.stdout.len(), 1_000_000);
    }

    #[test]
    fn a_hanging_command_fails_within_its_limit() {
        let t = Instant::now();
        let r = std::panic::catch_unwind(|| {
            run_bounded(
                Command::new("sleep").arg("30"),
                None,
                Duration::from_millis(200),
            )
        });
        let msg = r.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("did not finish within"), "{msg}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_missing_program_fails_with_install_hint() {
        let r = std::panic::catch_unwind(|| run(&mut Command::new("sg_persist-not-here")));
        let msg = r.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("sg_persist-not-here not found"), "{msg}");
    }
}
