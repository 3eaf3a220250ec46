//! Failfast ownership of LUNs (see `keyfence fence acquire`): take a
//! device (register on every path, reserve Write Exclusive – Registrants
//! Only, preempting another holder), then poll it until ownership is
//! found lost.
//!
//! Nothing tells an initiator that it was preempted until it sends a
//! command, so loss is noticed by the next probe: within one probe
//! interval plus one round trip.

use std::fmt;
use std::time::{Duration, Instant};

use keyfence_initiator::{Device, Error as ScsiError};

use crate::ops::FENCE_TYPE;
use crate::resolve::FenceDevice;
use crate::session::{connect, Role};
use crate::{fmt_key, Error, Result};

/// How a device was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Our key already held the reservation.
    AlreadyHeld,
    /// Another key held it and was preempted (and aborted).
    Preempted(u64),
    /// No reservation existed; we reserved.
    Reserved,
}

impl fmt::Display for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Taken::AlreadyHeld => f.write_str("already held the reservation"),
            Taken::Preempted(k) => write!(f, "preempted holder {}", fmt_key(*k)),
            Taken::Reserved => f.write_str("reserved"),
        }
    }
}

/// Register `key` on every path of `d` from the failfast port, reserve
/// (preempting another holder), verify; returns the sessions, one per path.
pub async fn take(
    d: &FenceDevice,
    name: &str,
    key: u64,
    t: Duration,
) -> Result<(Vec<Device>, Taken)> {
    let mut sessions = Vec::new();
    for p in &d.paths {
        let dev = connect(p, name, Role::Failfast, t).await?;
        dev.register_and_ignore(key, &Default::default())
            .await
            .map_err(Error::command(format!(
                "{}: REGISTER AND IGNORE EXISTING KEY",
                p.portal()
            )))?;
        sessions.push(dev);
    }
    let dev = sessions.first().ok_or(Error::NoPath)?;
    let res = dev
        .read_reservation()
        .await
        .map_err(Error::command("READ RESERVATION"))?;
    let how = match res.reservation {
        Some(r) if r.key == key => Taken::AlreadyHeld,
        Some(r) => {
            dev.preempt_and_abort(key, r.key, FENCE_TYPE)
                .await
                .map_err(Error::command(format!(
                    "PREEMPT AND ABORT {}",
                    fmt_key(r.key)
                )))?;
            Taken::Preempted(r.key)
        }
        None => {
            dev.reserve(key, FENCE_TYPE)
                .await
                .map_err(Error::command("RESERVE"))?;
            Taken::Reserved
        }
    };
    let res = dev
        .read_reservation()
        .await
        .map_err(Error::command("READ RESERVATION"))?;
    match res.reservation {
        Some(r) if r.key == key => {}
        other => return Err(Error::ReservationNotTaken(format!("{other:?}"))),
    }
    // Forget the unit attentions our own actions caused.
    for s in &sessions {
        let _ = s.take_unit_attentions();
    }
    Ok((sessions, how))
}

/// Why ownership of a device is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// RESERVATIONS PREEMPTED (2A/03) or REGISTRATIONS PREEMPTED (2A/05).
    UnitAttention(&'static str),
    /// Our key is no longer registered.
    KeyGone(u64),
    /// Another key holds the reservation.
    OtherHolder(u64),
    /// No reservation exists.
    NoReservation,
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loss::UnitAttention(what) => write!(f, "unit attention {what}"),
            Loss::KeyGone(k) => write!(f, "key {} is no longer registered", fmt_key(*k)),
            Loss::OtherHolder(k) => write!(f, "reservation now held by {}", fmt_key(*k)),
            Loss::NoReservation => f.write_str("the reservation is gone"),
        }
    }
}

/// One check on one session: `Some` when ownership is gone.
pub async fn check(s: &Device, key: u64) -> Result<Option<Loss>, ScsiError> {
    let keys = s.read_keys().await?;
    let ua = s.take_unit_attentions();
    if let Some(u) = ua
        .iter()
        .find(|u| u.asc == 0x2a && (u.ascq == 0x03 || u.ascq == 0x05))
    {
        return Ok(Some(Loss::UnitAttention(if u.ascq == 0x03 {
            "RESERVATIONS PREEMPTED"
        } else {
            "REGISTRATIONS PREEMPTED"
        })));
    }
    if !keys.keys.contains(&key) {
        return Ok(Some(Loss::KeyGone(key)));
    }
    let res = s.read_reservation().await?;
    match res.reservation {
        Some(r) if r.key == key => Ok(None),
        Some(r) => Ok(Some(Loss::OtherHolder(r.key))),
        None => Ok(Some(Loss::NoReservation)),
    }
}

/// A device being watched: its sessions (one per path) and when a probe
/// last succeeded.
pub struct Watched {
    pub dev: FenceDevice,
    pub sessions: Vec<Device>,
    pub last_ok: Instant,
}

/// One probe of one device, trying its sessions in turn (a session whose
/// connection failed logs in again as the same port, which keeps the
/// registration): `Ok(Some(loss))` when ownership is gone, `Err` with the
/// last error when no session answered.
pub async fn probe(
    w: &mut Watched,
    name: &str,
    key: u64,
    t: Duration,
) -> Result<Option<Loss>, String> {
    let mut last_err = String::from("no session");
    for i in 0..w.sessions.len() {
        let Some(s) = w.sessions.get_mut(i) else {
            break;
        };
        match tokio::time::timeout(t, check(s, key)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if e.is_connection_error() => {
                last_err = e.to_string();
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

/// Probe every device every `interval` until ownership is lost (returns
/// the reason, prefixed with the device's name) or `until` passes (`None`).
/// A device that cannot be probed for `lost_after` counts as lost.
pub async fn watch(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_as_before() {
        assert_eq!(Taken::Preempted(0xb0).to_string(), "preempted holder 0xb0");
        assert_eq!(
            Loss::UnitAttention("REGISTRATIONS PREEMPTED").to_string(),
            "unit attention REGISTRATIONS PREEMPTED"
        );
        assert_eq!(
            Loss::KeyGone(0xa0).to_string(),
            "key 0xa0 is no longer registered"
        );
        assert_eq!(
            Loss::OtherHolder(0xb0).to_string(),
            "reservation now held by 0xb0"
        );
    }
}
