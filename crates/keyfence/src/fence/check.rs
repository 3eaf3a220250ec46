//! `keyfence fence check`: the watchdog test (fence_scsi_check for
//! keyfence). Exits 0 as soon as one device shows this node's key
//! registered, 2 when no device does — including when no device answers
//! before the hard deadline (default 5 s), so a hung storage path makes the
//! watchdog act instead of blocking it.
//!
//! The watchdog daemon calls a test binary as `CHECK test` and a repair
//! binary as `CHECK repair ERRNO`; `repair N` exits N (so the watchdog goes
//! on to reboot), as fence_scsi_check does.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use clap::Parser;

use crate::cli::Msg as _;

use super::agent::store_file;
use super::key::parse_key;
use super::{connect_any, fmt_key, FenceDevice, Role};

/// Exit 0 while this node's key is registered on at least one device, 2 when
/// it is registered nowhere (or nothing answered before the deadline).
#[derive(Debug, Parser)]
#[command(name = "keyfence fence check")]
struct Args {
    /// Devices (iSCSI URLs or multipath map names); default: those the
    /// agent's `on` remembered in STORE.dev.
    #[arg(long, short = 'd')]
    devices: Option<String>,
    /// This node's key (hex); default: the one `on` remembered in STORE.key.
    #[arg(long, short = 'k')]
    key: Option<String>,
    /// iSCSI initiator name of this node (default: $KEYFENCE_INITIATOR_NAME,
    /// /etc/iscsi/initiatorname.iscsi, then one derived from the host name).
    #[arg(long)]
    initiator_name: Option<String>,
    /// keyfence configuration with the multipath maps named in --devices
    /// (default: $KEYFENCE_CONFIG, then /etc/keyfence/keyfence.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Prefix of the files the agent's `on` wrote.
    #[arg(long, default_value = "/var/run/cluster/fence_keyfence")]
    store_path: PathBuf,
    /// Hard overall deadline in milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    deadline_ms: u64,
    /// Report each device's answer on stderr.
    #[arg(long, short = 'v')]
    verbose: bool,
    /// `test` (ignored) or `repair ERRNO` as the watchdog daemon passes them.
    #[arg(hide = true, num_args = 0..=2)]
    watchdog: Vec<String>,
}

pub fn run(args: &[OsString]) -> ExitCode {
    let a: Args = match crate::cli::parse("keyfence fence check", args, 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match a.watchdog.first().map(String::as_str) {
        None | Some("test") => {}
        Some("repair") => {
            let n = a
                .watchdog
                .get(1)
                .and_then(|s| s.parse::<u8>().ok())
                .unwrap_or(1);
            return ExitCode::from(n);
        }
        Some(other) => {
            eprintln!("keyfence fence check: unexpected argument {other:?}");
            return ExitCode::from(1);
        }
    }
    let deadline = Duration::from_millis(a.deadline_ms);
    // Like fence_scsi_check: a node that was never unfenced (no stored key
    // or devices) has nothing to lose, so the watchdog must not reboot it.
    let stored = |ext: &str| -> Result<Option<String>, String> {
        let p = store_file(&a.store_path, ext);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    };
    let setup = || -> Result<Option<(Vec<FenceDevice>, u64, String)>, String> {
        let list = match &a.devices {
            Some(d) => d.clone(),
            None => match stored("dev")? {
                Some(t) => t
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(","),
                None => return Ok(None),
            },
        };
        let key = match &a.key {
            Some(k) => parse_key(k).msg()?,
            None => match stored("key")? {
                Some(t) => parse_key(t.trim()).msg()?,
                None => return Ok(None),
            },
        };
        let devs = super::resolve_devices(&list, a.config.as_deref()).msg()?;
        let name = super::initiator_name(a.initiator_name.as_deref()).msg()?;
        Ok(Some((devs, key, name)))
    };
    let (devs, key, name) = match setup() {
        Ok(Some(v)) => v,
        Ok(None) => {
            if a.verbose {
                eprintln!(
                    "keyfence fence check: no key or devices stored under {} (node not unfenced): nothing to check",
                    a.store_path.display()
                );
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("keyfence fence check: {e}");
            return ExitCode::from(1);
        }
    };
    let code = check(devs, key, name, deadline, a.verbose);
    ExitCode::from(code)
}

/// Run the check on its own thread and give up at `deadline` whatever the
/// devices do.
pub fn check(
    devs: Vec<FenceDevice>,
    key: u64,
    name: String,
    deadline: Duration,
    verbose: bool,
) -> u8 {
    let (tx, rx) = mpsc::channel::<(String, Result<bool, String>)>();
    let n = devs.len();
    let spawned = std::thread::Builder::new()
        .name("fence-check".into())
        .spawn(move || {
            let rt = match super::runtime() {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(("runtime".into(), Err(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let step = deadline.saturating_mul(2);
                let mut set = tokio::task::JoinSet::new();
                for d in devs {
                    let name = name.clone();
                    let tx = tx.clone();
                    set.spawn(async move {
                        let r = async {
                            // Per-step bounds longer than the overall
                            // deadline: a hanging device is reported as
                            // silent by the deadline below, never as a
                            // login timeout racing it.
                            let dev = connect_any(&d, &name, Role::Probe, step).await.msg()?;
                            let keys = dev
                                .read_keys()
                                .await
                                .map_err(|e| format!("READ KEYS: {e}"))?;
                            let _ = dev.close().await;
                            Ok::<bool, String>(keys.keys.contains(&key))
                        }
                        .await;
                        let _ = tx.send((d.name.clone(), r));
                    });
                }
                while set.join_next().await.is_some() {}
            });
        });
    if let Err(e) = spawned {
        eprintln!("keyfence fence check: cannot start: {e}");
        return 1;
    }
    let end = std::time::Instant::now() + deadline;
    let mut heard = 0;
    let mut unreachable = 0;
    while heard < n {
        let left = end.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((dev, Ok(true))) => {
                if verbose {
                    eprintln!("{dev}: key {} registered", fmt_key(key));
                }
                return 0;
            }
            Ok((dev, Ok(false))) => {
                heard += 1;
                if verbose {
                    eprintln!("{dev}: key {} not registered", fmt_key(key));
                }
            }
            Ok((dev, Err(e))) => {
                heard += 1;
                unreachable += 1;
                eprintln!("{dev}: {e}");
            }
            Err(_) => break,
        }
    }
    let silent = n - heard;
    eprintln!(
        "key {} is not registered on any device ({} without the key, {unreachable} failed, {silent} silent after {deadline:?})",
        fmt_key(key),
        heard - unreachable
    );
    2
}

/// The clap definition of this command (for manual pages and completions).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}
