//! The coordinator-disk race that settles a split cluster without quorum
//! (see `keyfence fence race`): on one disk, preempt the other side's keys
//! with this side's key; a side whose key is already gone has lost the
//! disk.

use std::fmt;
use std::time::Duration;

use keyfence_initiator::{Device, Error as ScsiError};

use crate::ops::FENCE_TYPE;
use crate::resolve::FenceDevice;
use crate::session::{connect_any, Role};
use crate::{fmt_key, Error};

/// What happened on one coordinator disk.
#[derive(Debug)]
pub enum DiskOutcome {
    /// Our key is registered and no victim key is; these were preempted.
    Won { preempted: Vec<u64> },
    /// Our key was removed by the other side.
    Lost { mine: u64 },
    /// The disk could not be used (unreachable, error, ambiguous).
    Failed(Error),
}

impl fmt::Display for DiskOutcome {
    /// The detail line (`race` prints it after `won:`/`lost:`/`failed:`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskOutcome::Won { preempted } if preempted.is_empty() => {
                f.write_str("no victim key was registered")
            }
            DiskOutcome::Won { preempted } => {
                let keys: Vec<String> = preempted.iter().map(|k| fmt_key(*k)).collect();
                write!(f, "preempted {}", keys.join(" "))
            }
            DiskOutcome::Lost { mine } => write!(f, "our key {} was removed", fmt_key(*mine)),
            DiskOutcome::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Log in to disk `d` as the agent's port and race on it.
pub async fn race_disk(
    d: &FenceDevice,
    name: &str,
    mine: u64,
    victims: &[u64],
    t: Duration,
) -> DiskOutcome {
    let dev = match connect_any(d, name, Role::Agent, t).await {
        Ok(dev) => dev,
        Err(e) => return DiskOutcome::Failed(e),
    };
    let o = race_on(&dev, mine, victims).await;
    let _ = dev.close().await;
    o
}

/// Preempt every victim key still registered on `dev`, then judge.
pub async fn race_on(dev: &Device, mine: u64, victims: &[u64]) -> DiskOutcome {
    let mut done = Vec::new();
    for &v in victims {
        let keys = match dev.read_keys().await {
            Ok(k) => k.keys,
            Err(e) => return DiskOutcome::Failed(Error::command("READ KEYS")(e)),
        };
        if !keys.contains(&mine) {
            return DiskOutcome::Lost { mine };
        }
        if !keys.contains(&v) {
            continue;
        }
        match dev.preempt_and_abort(mine, v, FENCE_TYPE).await {
            Ok(()) => done.push(v),
            // Our key went away under us, or the victim's did; look again.
            Err(ScsiError::ReservationConflict) => continue,
            Err(e) => {
                return DiskOutcome::Failed(Error::command(format!(
                    "PREEMPT AND ABORT {}",
                    fmt_key(v)
                ))(e))
            }
        }
    }
    match dev.read_keys().await {
        Ok(k) if !k.keys.contains(&mine) => DiskOutcome::Lost { mine },
        Ok(k) => match victims.iter().find(|v| k.keys.contains(v)) {
            Some(v) => DiskOutcome::Failed(Error::VictimStillRegistered(*v)),
            None => DiskOutcome::Won { preempted: done },
        },
        Err(e) => DiskOutcome::Failed(Error::command("READ KEYS")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_read_as_before() {
        assert_eq!(
            DiskOutcome::Won { preempted: vec![] }.to_string(),
            "no victim key was registered"
        );
        assert_eq!(
            DiskOutcome::Won {
                preempted: vec![1, 0x2b]
            }
            .to_string(),
            "preempted 0x1 0x2b"
        );
        assert_eq!(
            DiskOutcome::Lost { mine: 0xa }.to_string(),
            "our key 0xa was removed"
        );
        assert_eq!(
            DiskOutcome::Failed(Error::VictimStillRegistered(3)).to_string(),
            "key 0x3 is still registered"
        );
    }
}
