//! How a process holds a file open, from `/proc/PID/fd` and
//! `/proc/PID/fdinfo`: for tests that check how a server opened its
//! backing store (cached or `O_DIRECT`).

use std::path::Path;

/// The open flags (`flags:` of fdinfo) of every file description process
/// `pid` holds on `file`, in no particular order; empty when it holds none.
/// Pass `std::process::id()` for the test process itself.
pub fn open_flags(pid: u32, file: &Path) -> Vec<u32> {
    let want = std::fs::canonicalize(file)
        .unwrap_or_else(|e| panic!("canonical path of {}: {e}", file.display()));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"));
    let mut flags = Vec::new();
    for fd in fds.flatten() {
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let name = fd.file_name().to_string_lossy().into_owned();
        // A descriptor closed since the directory was read has no fdinfo.
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{name}")) else {
            continue;
        };
        let f = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or_else(|| panic!("no flags line in /proc/{pid}/fdinfo/{name}:\n{info}"));
        flags.push(f);
    }
    flags
}

/// Whether every open of `file` by process `pid` is `O_DIRECT`. Fails the
/// test when `pid` does not hold `file` open at all.
pub fn opened_direct(pid: u32, file: &Path) -> bool {
    let flags = open_flags(pid, file);
    assert!(
        !flags.is_empty(),
        "process {pid} does not hold {} open",
        file.display()
    );
    flags.iter().all(|f| f & libc::O_DIRECT as u32 != 0)
}
