//! `keyfence fence acquire`: take ownership of LUNs, then watch them and
//! fail fast.
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
use keyfence_initiator::{Device, Error};

use super::agent::FENCE_TYPE;
use super::key::parse_key;
use super::{connect, fmt_key, monotonic_ns, FenceDevice, Role};
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

struct Watched {
    dev: FenceDevice,
    sessions: Vec<Device>,
    last_ok: Instant,
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
                Ok(Ok((sessions, msg))) => {
                    println!("{}: {msg}", d.name);
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

/// Register on every path, reserve (preempting another holder), verify.
async fn take(
    d: &FenceDevice,
    name: &str,
    key: u64,
    t: Duration,
) -> Result<(Vec<Device>, String), String> {
    let mut sessions = Vec::new();
    for p in &d.paths {
        let dev = connect(p, name, Role::Failfast, t).await.msg()?;
        dev.register_and_ignore(key, &Default::default())
            .await
            .map_err(|e| format!("{}: REGISTER AND IGNORE EXISTING KEY: {e}", p.portal()))?;
        sessions.push(dev);
    }
    let dev = sessions.first().ok_or("device has no paths")?;
    let res = dev
        .read_reservation()
        .await
        .map_err(|e| format!("READ RESERVATION: {e}"))?;
    let how = match res.reservation {
        Some(r) if r.key == key => "already held the reservation".to_string(),
        Some(r) => {
            dev.preempt_and_abort(key, r.key, FENCE_TYPE)
                .await
                .map_err(|e| format!("PREEMPT AND ABORT {}: {e}", fmt_key(r.key)))?;
            format!("preempted holder {}", fmt_key(r.key))
        }
        None => {
            dev.reserve(key, FENCE_TYPE)
                .await
                .map_err(|e| format!("RESERVE: {e}"))?;
            "reserved".to_string()
        }
    };
    let res = dev
        .read_reservation()
        .await
        .map_err(|e| format!("READ RESERVATION: {e}"))?;
    match res.reservation {
        Some(r) if r.key == key => {}
        other => return Err(format!("reservation is {other:?} after taking it")),
    }
    // Forget the unit attentions our own actions caused.
    for s in &sessions {
        let _ = s.take_unit_attentions();
    }
    Ok((
        sessions,
        format!("{how}; holding with key {}", fmt_key(key)),
    ))
}

/// Probe until ownership is lost (returns the reason) or `until` passes.
async fn watch(
    watched: &mut [Watched],
    name: &str,
    key: u64,
    t: Duration,
    interval: Duration,
    lost_after: Duration,
    until: Option<Instant>,
) -> Option<String> {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if until.is_some_and(|u| Instant::now() >= u) {
            return None;
        }
        for w in watched.iter_mut() {
            match probe(w, name, key, t).await {
                Ok(None) => w.last_ok = Instant::now(),
                Ok(Some(reason)) => return Some(format!("{}: {reason}", w.dev.name)),
                Err(e) => {
                    tracing::warn!(device = %w.dev.name, error = %e, "probe failed");
                    if w.last_ok.elapsed() >= lost_after {
                        return Some(format!(
                            "{}: not probed successfully for {:?} (last error: {e})",
                            w.dev.name,
                            w.last_ok.elapsed()
                        ));
                    }
                }
            }
        }
    }
}

/// One probe of one device: Ok(Some(reason)) when ownership is gone.
async fn probe(
    w: &mut Watched,
    name: &str,
    key: u64,
    t: Duration,
) -> Result<Option<String>, String> {
    let mut last_err = String::from("no session");
    for i in 0..w.sessions.len() {
        let Some(s) = w.sessions.get_mut(i) else {
            break;
        };
        let r = tokio::time::timeout(t, check(s, key)).await;
        match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if e.is_connection_error() => {
                last_err = e.to_string();
                // Same initiator port again: the registration is kept.
                if let Some(p) = w.dev.paths.get(i) {
                    if let Ok(d) = connect(p, name, Role::Failfast, t).await {
                        *s = d;
                    }
                }
            }
            Ok(Err(e)) => last_err = e.to_string(),
            Err(_) => last_err = format!("probe timed out after {t:?}"),
        }
    }
    Err(last_err)
}

async fn check(s: &Device, key: u64) -> Result<Option<String>, Error> {
    let keys = s.read_keys().await?;
    let ua = s.take_unit_attentions();
    if let Some(u) = ua
        .iter()
        .find(|u| u.asc == 0x2a && (u.ascq == 0x03 || u.ascq == 0x05))
    {
        let what = if u.ascq == 0x03 {
            "RESERVATIONS PREEMPTED"
        } else {
            "REGISTRATIONS PREEMPTED"
        };
        return Ok(Some(format!("unit attention {what}")));
    }
    if !keys.keys.contains(&key) {
        return Ok(Some(format!(
            "key {} is no longer registered",
            fmt_key(key)
        )));
    }
    let res = s.read_reservation().await?;
    match res.reservation {
        Some(r) if r.key == key => Ok(None),
        Some(r) => Ok(Some(format!("reservation now held by {}", fmt_key(r.key)))),
        None => Ok(Some("the reservation is gone".into())),
    }
}
