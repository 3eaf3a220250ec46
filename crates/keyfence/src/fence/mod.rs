//! `keyfence fence`: I/O fencing with SCSI-3 persistent reservations.
//!
//! - [`agent`]: `fence_keyfence`, a fence agent for Pacemaker's stonith
//!   speaking the fence-agents protocol (options on the command line or as
//!   `name=value` lines on stdin), a drop-in for fence_scsi / fence_mpath
//!   that reaches its LUNs over iSCSI itself.
//! - [`check`]: the watchdog check (fence_scsi_check): is this node's key
//!   still registered anywhere? Answers within a hard deadline.
//! - [`acquire`]: take ownership of LUNs and then poll them (failfast): run
//!   a command when a probe finds this node's key or reservation taken
//!   away.
//! - [`race`]: coordinator-disk race between the two halves of a split
//!   cluster without quorum.
//! - [`writer`]: hidden helpers for the split-brain test (a writer that
//!   logs every acknowledged write, and a scanner for its records).
//!
//! The device operations themselves live in keyfence-fence; every one
//! runs under a timeout; devices are worked on in
//! parallel, and results are reported per device.

use std::ffi::OsString;
use std::process::ExitCode;

pub mod acquire;
pub mod agent;
pub mod check;
pub mod race;
pub mod writer;

pub use keyfence_fence::key;
pub use keyfence_fence::session::{connect, connect_any, initiator_name, Role};
pub use keyfence_fence::{fmt_key, monotonic_ns, resolve_devices, FenceDevice};

pub(crate) const USAGE: &str = "\
keyfence fence: I/O fencing with SCSI-3 persistent reservations

Usage: keyfence fence <COMMAND> [ARGS...]

Commands:
  agent    fence agent for Pacemaker (also run as fence_keyfence)
  check    exit 0 while this node's key is registered somewhere, 2 when not
           (watchdog test, like fence_scsi_check)
  acquire  take ownership of LUNs, then poll them and run a command once
           a probe finds ownership lost
  race     coordinator-disk race for a split cluster without quorum

Run `keyfence fence <COMMAND> --help` for a command's options.
";

/// `keyfence fence ...`
pub fn run(args: &[OsString]) -> ExitCode {
    let Some(cmd) = args.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(1);
    };
    let rest = &args[1..];
    match cmd.to_string_lossy().as_ref() {
        "agent" => agent_main(rest),
        "check" => check::run(rest),
        "acquire" => acquire::run(rest),
        "race" => race::run(rest),
        "writer" => writer::run_writer(rest),
        "scan" => writer::run_scan(rest),
        "stamp" => writer::run_stamp(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("keyfence fence: unknown command '{other}'; run `keyfence fence help`");
            ExitCode::from(1)
        }
    }
}

/// `fence_keyfence ...` / `keyfence fence agent ...`
pub fn agent_main(args: &[OsString]) -> ExitCode {
    agent::run(args)
}

/// A single-threaded tokio runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}
