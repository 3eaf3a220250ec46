//! Fencing operations on devices, the building blocks of the fence agent
//! and of `fence acquire`, `check` and `race`:
//!
//! - [`unfence_device`]: register a key on every path of a device and make
//!   sure a Write Exclusive – Registrants Only reservation exists;
//! - [`fence_device`]: with this node's key, PREEMPT AND ABORT a victim's
//!   key and verify that it is gone and that a reservation exists;
//! - [`own_key`]: the key registered for a session's own initiator port;
//! - [`keys_everywhere`]: READ KEYS on every device;
//! - [`on_all`]: run a job on every device in parallel, each bounded by a
//!   deadline, with one result per device in the order given.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use keyfence_initiator::{
    Device, Error as ScsiError, PrType, RegisterOptions, SenseKey, TransportId,
};

use crate::resolve::FenceDevice;
use crate::session::{connect, connect_any, Role};
use crate::{fmt_key, monotonic_ns, Error, Result};

/// The reservation type fencing relies on.
pub const FENCE_TYPE: PrType = PrType::WriteExclusiveRegistrantsOnly;

/// Outcome of a job on one device.
#[derive(Debug)]
pub struct DevResult<T> {
    /// The device's name.
    pub name: String,
    pub result: Result<T>,
}

/// Run `job` on every device in parallel, each bounded by `deadline`; one
/// result per device, in the order of `devs`.
pub async fn on_all<T, F, Fut>(
    devs: &[FenceDevice],
    deadline: Duration,
    job: F,
) -> Vec<DevResult<T>>
where
    T: Send + 'static,
    F: Fn(FenceDevice) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (i, d) in devs.iter().enumerate() {
        let fut = job(d.clone());
        set.spawn(async move { (i, tokio::time::timeout(deadline, fut).await) });
    }
    let mut out: Vec<Option<Result<T>>> = devs.iter().map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let Ok((i, r)) = r else { continue };
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(r.unwrap_or(Err(Error::Deadline(deadline))));
        }
    }
    out.into_iter()
        .zip(devs)
        .map(|(r, d)| DevResult {
            name: d.name.clone(),
            result: r.unwrap_or(Err(Error::TaskFailed)),
        })
        .collect()
}

/// Deadline for a whole per-device job (login plus a few commands) when
/// each step is bounded by `t`.
pub fn job_deadline(t: Duration) -> Duration {
    t.saturating_mul(4)
}

/// True for a target that does not implement a service action.
pub fn unsupported(e: &ScsiError) -> bool {
    matches!(e, ScsiError::CheckCondition(s) if s.key == SenseKey::IllegalRequest && s.asc == 0x24)
}

/// What [`unfence_device`] left on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfenced {
    /// The key registered.
    pub key: u64,
    /// The key of the reservation holder.
    pub holder: u64,
    /// The reservation's type when it existed before (none was created).
    pub existing_type: Option<u8>,
}

impl fmt::Display for Unfenced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "registered {}; reservation held by {}",
            fmt_key(self.key),
            fmt_key(self.holder)
        )?;
        if let Some(t) = self.existing_type {
            write!(f, " (type {t})")?;
        }
        Ok(())
    }
}

/// Register `k` on every path of `dev` from the agent's initiator port,
/// then reserve (Write Exclusive – Registrants Only) unless a reservation
/// exists. Fails unless every path registered.
pub async fn unfence_device(
    dev: &FenceDevice,
    name: &str,
    k: u64,
    aptpl: bool,
    t: Duration,
) -> Result<Unfenced> {
    let opts = RegisterOptions {
        aptpl,
        ..RegisterOptions::default()
    };
    let mut first: Option<Device> = None;
    let mut errs = Vec::new();
    for p in &dev.paths {
        match connect(p, name, Role::Agent, t).await {
            Ok(d) => match d.register_and_ignore(k, &opts).await {
                Ok(()) => {
                    if first.is_none() {
                        first = Some(d);
                    }
                }
                Err(e) => errs.push(Error::command(format!("{}: REGISTER", p.portal()))(e)),
            },
            Err(e) => errs.push(e),
        }
    }
    let Some(d) = first else {
        return Err(Error::AllPathsFailed(errs));
    };
    if !errs.is_empty() {
        return Err(Error::SomePathsFailed(errs));
    }
    let keys = d.read_keys().await.map_err(Error::command("READ KEYS"))?;
    if !keys.keys.contains(&k) {
        return Err(Error::NotRegisteredAfterRegister(k));
    }
    let res = d
        .read_reservation()
        .await
        .map_err(Error::command("READ RESERVATION"))?;
    let done = match res.reservation {
        Some(r) => Unfenced {
            key: k,
            holder: r.key,
            existing_type: Some(r.pr_type),
        },
        None => {
            match d.reserve(k, FENCE_TYPE).await {
                Ok(()) => {}
                // Another node reserved between our read and reserve.
                Err(ScsiError::ReservationConflict) => {}
                Err(e) => return Err(Error::command("RESERVE")(e)),
            }
            let r = d
                .read_reservation()
                .await
                .map_err(Error::command("READ RESERVATION"))?;
            match r.reservation {
                Some(r) => Unfenced {
                    key: k,
                    holder: r.key,
                    existing_type: None,
                },
                None => return Err(Error::NoReservationAfterReserve),
            }
        }
    };
    let _ = d.close().await;
    Ok(done)
}

/// The key registered for this session's own initiator port, if any.
pub async fn own_key(d: &Device) -> Result<Option<u64>, ScsiError> {
    let me = TransportId::for_port(&d.session().initiator_port());
    let fs = d.read_full_status().await?;
    let exact = fs.descriptors.iter().find(|x| x.transport_id == me);
    Ok(exact.map(|x| x.key))
}

/// How the victim's key went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// It was not registered to begin with.
    WasNotRegistered,
    /// PREEMPT AND ABORT removed it.
    PreemptedAndAborted,
    /// The target does not implement PREEMPT AND ABORT; PREEMPT did.
    Preempted,
}

/// What [`fence_device`] achieved on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    pub victim: u64,
    pub how: Removal,
    /// CLOCK_MONOTONIC (ns) when the preemption completed.
    pub preempted_at: Option<u64>,
    /// Key of the reservation holder afterwards.
    pub holder: u64,
    /// PR generation afterwards.
    pub generation: u32,
}

impl fmt::Display for Fenced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.how {
            Removal::WasNotRegistered => "was not registered",
            Removal::PreemptedAndAborted => "preempted and aborted",
            Removal::Preempted => "preempted (PREEMPT AND ABORT unsupported)",
        };
        write!(f, "key {} {how}", fmt_key(self.victim))?;
        if let Some(t) = self.preempted_at {
            write!(f, " (completed at monotonic {t} ns)")?;
        }
        write!(
            f,
            "; reservation held by {} (generation {})",
            fmt_key(self.holder),
            self.generation
        )
    }
}

/// With the key this node's agent port has registered, PREEMPT AND ABORT
/// `victim` on `dev` (PREEMPT where the target lacks it), then verify that
/// the victim's key is gone and that a reservation exists, creating one
/// when none does. Never registers: a node that has itself been fenced
/// cannot fence back.
pub async fn fence_device(
    dev: &FenceDevice,
    name: &str,
    victim: u64,
    t: Duration,
) -> Result<Fenced> {
    let d = connect_any(dev, name, Role::Agent, t).await?;
    let mine = own_key(&d)
        .await
        .map_err(Error::command("READ FULL STATUS"))?
        .ok_or(Error::NotRegistered)?;
    if mine == victim {
        return Err(Error::FenceSelf);
    }
    let keys = d.read_keys().await.map_err(Error::command("READ KEYS"))?;
    let mut how = Removal::WasNotRegistered;
    let mut preempted_at = None;
    if keys.keys.contains(&victim) {
        match d.preempt_and_abort(mine, victim, FENCE_TYPE).await {
            Ok(()) => {
                how = Removal::PreemptedAndAborted;
                preempted_at = Some(monotonic_ns());
            }
            Err(e) if unsupported(&e) => {
                d.preempt(mine, victim, FENCE_TYPE)
                    .await
                    .map_err(Error::command("PREEMPT"))?;
                how = Removal::Preempted;
                preempted_at = Some(monotonic_ns());
            }
            Err(ScsiError::ReservationConflict) => return Err(Error::PreemptConflict(mine)),
            Err(e) => return Err(Error::command("PREEMPT AND ABORT")(e)),
        }
    }
    let keys = d.read_keys().await.map_err(Error::command("READ KEYS"))?;
    if keys.keys.contains(&victim) {
        return Err(Error::StillRegistered(victim));
    }
    let mut res = d
        .read_reservation()
        .await
        .map_err(Error::command("READ RESERVATION"))?;
    if res.reservation.is_none() {
        // Without a reservation anybody may write: put it back.
        match d.reserve(mine, FENCE_TYPE).await {
            Ok(()) | Err(ScsiError::ReservationConflict) => {}
            Err(e) => return Err(Error::command("RESERVE")(e)),
        }
        res = d
            .read_reservation()
            .await
            .map_err(Error::command("READ RESERVATION"))?;
    }
    let Some(r) = res.reservation else {
        return Err(Error::NoReservation);
    };
    let _ = d.close().await;
    Ok(Fenced {
        victim,
        how,
        preempted_at,
        holder: r.key,
        generation: res.generation,
    })
}

/// READ KEYS on one device through a probe port (no registration needed).
pub async fn read_keys_on(dev: &FenceDevice, name: &str, t: Duration) -> Result<Vec<u64>> {
    let d = connect_any(dev, name, Role::Probe, t).await?;
    let k = d.read_keys().await.map_err(Error::command("READ KEYS"));
    let _ = d.close().await;
    Ok(k?.keys)
}

/// READ KEYS on every device in parallel (each bounded by
/// [`job_deadline`]`(t)`).
pub async fn keys_everywhere(
    devs: &[FenceDevice],
    name: &str,
    t: Duration,
) -> Vec<DevResult<Vec<u64>>> {
    let name = name.to_string();
    on_all(devs, job_deadline(t), move |d| {
        let name = name.clone();
        async move { read_keys_on(&d, &name, t).await }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_read_as_before() {
        let u = Unfenced {
            key: 0xab,
            holder: 0xcd,
            existing_type: Some(5),
        };
        assert_eq!(
            u.to_string(),
            "registered 0xab; reservation held by 0xcd (type 5)"
        );
        let f = Fenced {
            victim: 0x2,
            how: Removal::PreemptedAndAborted,
            preempted_at: Some(7),
            holder: 0x1,
            generation: 9,
        };
        assert_eq!(
            f.to_string(),
            "key 0x2 preempted and aborted (completed at monotonic 7 ns); reservation held by 0x1 (generation 9)"
        );
    }

    #[tokio::test]
    async fn on_all_keeps_order_and_bounds_each_job() {
        let devs: Vec<FenceDevice> = ["a", "b"]
            .iter()
            .map(|n| FenceDevice {
                name: n.to_string(),
                paths: Vec::new(),
                map: None,
            })
            .collect();
        let r = on_all(&devs, Duration::from_millis(50), |d| async move {
            if d.name == "a" {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok(d.name)
        })
        .await;
        assert_eq!(r[0].name, "a");
        assert!(matches!(r[0].result, Err(Error::Deadline(_))));
        assert_eq!(r[1].result.as_deref().ok(), Some("b"));
    }
}
