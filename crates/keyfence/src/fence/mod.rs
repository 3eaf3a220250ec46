//! `keyfence fence`: I/O fencing with SCSI-3 persistent reservations.
//!
//! - [`agent`]: `fence_keyfence`, a fence agent for Pacemaker's stonith
//!   speaking the fence-agents protocol (options on the command line or as
//!   `name=value` lines on stdin), a drop-in for fence_scsi / fence_mpath
//!   that reaches its LUNs over iSCSI itself.
//! - [`check`]: the watchdog check (fence_scsi_check): is this node's key
//!   still registered anywhere? Answers within a hard deadline.
//! - [`acquire`]: take ownership of LUNs and then watch them (failfast): run
//!   a command as soon as this node's key or reservation is taken away.
//! - [`race`]: coordinator-disk race between the two halves of a split
//!   cluster without quorum.
//! - [`writer`]: hidden helpers for the split-brain test (a writer that
//!   logs every acknowledged write, and a scanner for its records).
//!
//! Every device operation runs under a timeout; devices are worked on in
//! parallel, and results are reported per device.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use keyfence_initiator::{Device, IscsiUrl, Isid, SessionConfig};

pub mod acquire;
pub mod agent;
pub mod check;
pub mod key;
pub mod race;
pub mod writer;

use crate::mpathpersist::config::Config;

const USAGE: &str = "\
keyfence fence: I/O fencing with SCSI-3 persistent reservations

Usage: keyfence fence <COMMAND> [ARGS...]

Commands:
  agent    fence agent for Pacemaker (also run as fence_keyfence)
  check    exit 0 while this node's key is registered somewhere, 2 when not
           (watchdog test, like fence_scsi_check)
  acquire  take ownership of LUNs, then run a command the moment it is lost
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

/// One fencing device: an iSCSI LUN reached through one or more paths (a
/// multipath map from keyfence's configuration has several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceDevice {
    /// As the user named it (URL or map name).
    pub name: String,
    pub paths: Vec<IscsiUrl>,
}

/// Resolve a comma-separated device list: iSCSI URLs, or names of
/// multipath maps in keyfence's configuration (`/dev/mapper/` optional).
pub fn resolve_devices(list: &str, config: Option<&Path>) -> Result<Vec<FenceDevice>, String> {
    let names: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        return Err("no devices given".into());
    }
    let mut cfg: Option<Config> = None;
    let mut out: Vec<FenceDevice> = Vec::with_capacity(names.len());
    for n in names {
        let dev = if n.starts_with("iscsi://") {
            let url = IscsiUrl::parse_full(n).map_err(|e| format!("device {n:?}: {e}"))?;
            FenceDevice {
                name: n.to_string(),
                paths: vec![url],
            }
        } else {
            if cfg.is_none() {
                cfg = Some(Config::load(config)?);
            }
            let map_name = n.strip_prefix("/dev/mapper/").unwrap_or(n);
            let m = cfg.as_ref().and_then(|c| c.map(map_name)).ok_or_else(|| {
                format!("device {n:?}: neither an iSCSI URL nor a multipath map in the keyfence configuration")
            })?;
            let paths = m
                .paths
                .iter()
                .map(|p| IscsiUrl::parse_full(p).map_err(|e| format!("map {map_name}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            FenceDevice {
                name: map_name.to_string(),
                paths,
            }
        };
        if out.iter().any(|d| d.name == dev.name) {
            return Err(format!("device {:?} is listed twice", dev.name));
        }
        out.push(dev);
    }
    Ok(out)
}

/// Which initiator port (I_T nexus) a tool logs in as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The fence agent's own port: ISID derived from (name, portal, target,
    /// "fence"), so it never reinstates (and thereby kills) the session of
    /// an application on the same host, and the same on every run.
    Agent,
    /// `fence acquire`'s long-lived port (ISID derived with "acquire"), so
    /// neither the agent nor the application reinstates it.
    Failfast,
    /// The application's port: ISID derived from (name, portal, target), the
    /// same as `keyfence persist` / `mpathpersist` use.
    App,
    /// Read-only probes: a random ISID (PR IN needs no registration).
    Probe,
}

/// Session settings for `role` on `url`, where every login and command is
/// bounded by `timeout`.
pub fn session_config(
    url: &IscsiUrl,
    initiator_name: &str,
    role: Role,
    timeout: Duration,
) -> SessionConfig {
    let target = url.target.as_deref().unwrap_or_default();
    let isid = match role {
        Role::Agent => Some(Isid::derive(
            initiator_name,
            &url.portal(),
            &format!("{target}#keyfence-fence"),
        )),
        Role::Failfast => Some(Isid::derive(
            initiator_name,
            &url.portal(),
            &format!("{target}#keyfence-acquire"),
        )),
        Role::App => None,
        Role::Probe => {
            let bits: u64 = rand::random::<u64>() & 0xff_ffff_ffff;
            Isid::new(u64::from(Isid::TYPE_RANDOM) << 46 | bits)
        }
    };
    let mut cfg = SessionConfig {
        initiator_name: Some(initiator_name.to_string()),
        isid,
        login_timeout: timeout,
        ..SessionConfig::default()
    };
    cfg.limits.command_timeout = timeout;
    cfg
}

/// Log in to one path, bounded by `timeout`.
pub async fn connect(
    url: &IscsiUrl,
    initiator_name: &str,
    role: Role,
    timeout: Duration,
) -> Result<Device, String> {
    let cfg = session_config(url, initiator_name, role, timeout);
    match tokio::time::timeout(timeout, Device::connect(url, &cfg)).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => {
            let msg = e.to_string();
            let portal = url.portal();
            Err(if msg.contains(&portal) {
                msg
            } else {
                format!("{portal}: {msg}")
            })
        }
        Err(_) => Err(format!(
            "{}: login timed out after {timeout:?}",
            url.portal()
        )),
    }
}

/// Log in through the first path of `dev` that answers.
pub async fn connect_any(
    dev: &FenceDevice,
    initiator_name: &str,
    role: Role,
    timeout: Duration,
) -> Result<Device, String> {
    let mut errs = Vec::new();
    for p in &dev.paths {
        match connect(p, initiator_name, role, timeout).await {
            Ok(d) => return Ok(d),
            Err(e) => errs.push(e),
        }
    }
    Err(errs.join("; "))
}

/// Resolve the initiator name (explicit, environment, open-iscsi file, host
/// name; see `keyfence_initiator::identity`).
pub fn initiator_name(explicit: Option<&str>) -> Result<String, String> {
    keyfence_initiator::identity::resolve_initiator_name(explicit)
        .map(|n| n.name)
        .map_err(|e| e.to_string())
}

/// CLOCK_MONOTONIC in nanoseconds: system-wide on Linux, so timestamps from
/// different processes compare.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always
    // available on Linux, so clock_gettime only writes into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// A single-threaded tokio runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Format a key the way sg_persist prints it.
pub fn fmt_key(k: u64) -> String {
    format!("0x{k:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_urls_and_rejects_garbage() {
        let d = resolve_devices(
            "iscsi://127.0.0.1:3260/iqn.2026-11.io.keyfence:a/0, iscsi://127.0.0.1:3261/iqn.2026-11.io.keyfence:b/1",
            None,
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].paths[0].lun, Some(1));
        assert!(resolve_devices(" , ", None).is_err());
        assert!(resolve_devices("iscsi://127.0.0.1/", None).is_err());
        let twice = "iscsi://127.0.0.1/iqn.2026-11.io.keyfence:a/0,iscsi://127.0.0.1/iqn.2026-11.io.keyfence:a/0";
        assert!(resolve_devices(twice, None).unwrap_err().contains("twice"));
    }

    #[test]
    fn roles_get_distinct_nexus() {
        let u = IscsiUrl::parse_full("iscsi://127.0.0.1:3260/iqn.2026-11.io.keyfence:a/0").unwrap();
        let n = "iqn.2026-11.io.test:n1";
        let t = Duration::from_secs(1);
        let a = session_config(&u, n, Role::Agent, t).isid.unwrap();
        assert_eq!(a, session_config(&u, n, Role::Agent, t).isid.unwrap());
        assert_ne!(a, Isid::derive(n, &u.portal(), "iqn.2026-11.io.keyfence:a"));
        assert_eq!(session_config(&u, n, Role::App, t).isid, None);
        let p = session_config(&u, n, Role::Probe, t).isid.unwrap();
        assert_eq!(p.type_field(), Isid::TYPE_RANDOM);
        assert_eq!(
            session_config(&u, n, Role::Probe, t).limits.command_timeout,
            t
        );
    }

    #[test]
    fn monotonic_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
