//! `keyfence fence acquire`: take ownership of LUNs, then watch them and
//! fail fast. The device work is keyfence-fence's
//! [`keyfence_fence::failfast`]; this is its command line and output.
//!
//! Ownership: REGISTER AND IGNORE EXISTING KEY with this node's key, then a
//! Write Exclusive – Registrants Only reservation; when another key holds
//! the reservation, PREEMPT AND ABORT it (which removes that node's
//! registrations and takes the reservation over).
//!
//! Watching: every `--probe-interval` the sessions send READ KEYS and READ
//! RESERVATION. Ownership is lost when this node's key is no longer
//! registered, when the reservation is held by another key or gone, when a
//! RESERVATIONS PREEMPTED / REGISTRATIONS PREEMPTED unit attention (2A/03,
//! 2A/05) arrives, or when a device cannot be probed for `--lost-after`.
//! Then `--action` runs at once through `sh -c` (with `KEYFENCE_LOST` set to
//! the reason) and the command exits 1.
//!
//! Detection bound: a preemption is seen at the next probe, i.e. within one
//! probe interval plus one READ KEYS round trip.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use keyfence_fence::failfast::{take, watch, Watched};

use super::key::parse_key;
use super::{fmt_key, monotonic_ns, FenceDevice};
use crate::cli::Msg as _;

/// Take ownership of LUNs, then run a command as soon as it is lost.
#[derive(Debug, Parser)]
#[command(name = "keyfence fence acquire")]
struct Args {
    /// iSCSI URLs or multipath map names, comma separated.
    #[arg(long, short = 'd')]
    devices: String,
    /// This node's key.
    #[arg(long, short = 'k')]
    key: String,
    /// Command run through `sh -c` when a probe finds ownership lost.
    #[arg(long)]
    action: String,
    /// Milliseconds between probes: loss is noticed within one interval
    /// plus one READ KEYS round trip.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    probe_interval: u64,
    /// Milliseconds allowed for each login and command.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    timeout_ms: u64,
    /// Milliseconds a device may go unprobed before ownership counts as lost.
    #[arg(long, default_value_t = 15000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    lost_after: u64,
    /// Stop watching (exit 0) after this many milliseconds; 0 = never.
    #[arg(long, default_value_t = 0)]
    max_run_ms: u64,
    /// iSCSI initiator name of this node (default: $KEYFENCE_INITIATOR_NAME,
    /// /etc/iscsi/initiatorname.iscsi, then one derived from the host name).
    #[arg(long)]
    initiator_name: Option<String>,
    /// keyfence configuration with the multipath maps named in --devices
    /// (default: $KEYFENCE_CONFIG, then /etc/keyfence/keyfence.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: &[OsString]) -> ExitCode {
    let a: Args = match crate::cli::parse("keyfence fence acquire", args, 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let setup = || -> Result<(Vec<FenceDevice>, u64, String), String> {
        Ok((
            super::resolve_devices(&a.devices, a.config.as_deref()).msg()?,
            parse_key(&a.key).msg()?,
            super::initiator_name(a.initiator_name.as_deref()).msg()?,
        ))
    };
    let (devs, key, name) = match setup() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("keyfence fence acquire: {e}");
            return ExitCode::from(1);
        }
    };
    let rt = match super::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyfence fence acquire: {e}");
            return ExitCode::from(1);
        }
    };
    let t = Duration::from_millis(a.timeout_ms);
    let code = rt.block_on(async {
        let mut watched = Vec::new();
        for d in &devs {
            match tokio::time::timeout(t.saturating_mul(4), take(d, &name, key, t)).await {
                Ok(Ok((sessions, how))) => {
                    println!("{}: {how}; holding with key {}", d.name, fmt_key(key));
                    watched.push(Watched {
                        dev: d.clone(),
                        sessions,
                        last_ok: Instant::now(),
                    });
                }
                Ok(Err(e)) => {
                    eprintln!("{}: cannot take ownership: {e}", d.name);
                    return 1;
                }
                Err(_) => {
                    eprintln!("{}: cannot take ownership: no answer within {:?}", d.name, t * 4);
                    return 1;
                }
            }
        }
        println!(
            "acquired {} device(s) with key {}; probing every {} ms (detection bound {} ms + one round trip)",
            watched.len(),
            fmt_key(key),
            a.probe_interval,
            a.probe_interval
        );
        let reason = watch(
            &mut watched,
            &name,
            key,
            t,
            Duration::from_millis(a.probe_interval),
            Duration::from_millis(a.lost_after),
            (a.max_run_ms > 0).then(|| Instant::now() + Duration::from_millis(a.max_run_ms)),
        )
        .await;
        match reason {
            None => 0,
            Some(r) => {
                let at = monotonic_ns();
                eprintln!("ownership lost at monotonic {at} ns: {r}; running {:?}", a.action);
                match tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(&a.action)
                    .env("KEYFENCE_LOST", &r)
                    .status()
                    .await
                {
                    Ok(s) if !s.success() => eprintln!("action exited with {s}"),
                    Ok(_) => {}
                    Err(e) => eprintln!("cannot run action: {e}"),
                }
                1
            }
        }
    });
    ExitCode::from(code)
}

/// The clap definition of this command (for manual pages and completions).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}
