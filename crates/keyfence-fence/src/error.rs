//! The error type of keyfence-fence.

use std::path::PathBuf;
use std::time::Duration;

use crate::fmt_key;

/// Everything that can go wrong in multipath PR, device resolution,
/// configuration and fencing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No path of a device could be used (all down, or none configured).
    #[error("no usable path")]
    NoPath,
    /// A SCSI command failed (the device answered with a status, or the
    /// transport below it failed).
    #[error(transparent)]
    Scsi(#[from] keyfence_initiator::Error),
    /// A named step (`READ KEYS`, `host:3260: REGISTER`, ...) failed.
    #[error("{what}: {source}")]
    Command {
        what: String,
        #[source]
        source: keyfence_initiator::Error,
    },
    /// Login on one path failed; the message names the portal.
    #[error("{0}")]
    Login(String),
    /// Login on one path did not finish in time.
    #[error("{portal}: login timed out after {timeout:?}")]
    LoginTimeout { portal: String, timeout: Duration },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The map configuration is invalid (`path` is the file, when known).
    #[error("{}{msg}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Config { path: Option<PathBuf>, msg: String },
    /// A reservation key that does not parse, or a key file entry.
    #[error("{0}")]
    InvalidKey(String),
    /// Running corosync-cmapctl for key derivation failed.
    #[error("{0}")]
    Cmapctl(String),
    /// The initiator name could not be determined.
    #[error("{0}")]
    InitiatorName(String),
    /// An empty device list.
    #[error("no devices given")]
    NoDevices,
    /// A device that looks like an iSCSI URL but is not a valid one.
    #[error("device {name:?}: {source}")]
    BadUrl {
        name: String,
        #[source]
        source: keyfence_initiator::url::UrlError,
    },
    /// A device that is neither an iSCSI URL nor a configured map.
    #[error(
        "device {0:?}: neither an iSCSI URL nor a multipath map in the keyfence configuration"
    )]
    UnknownDevice(String),
    /// The same device twice in one list.
    #[error("device {0:?} is listed twice")]
    DuplicateDevice(String),
    /// Every path of a device failed.
    #[error("{}", join(.0))]
    AllPathsFailed(Vec<Error>),
    /// Some paths of a device failed (the others worked).
    #[error("some paths failed: {}", join(.0))]
    SomePathsFailed(Vec<Error>),
    /// This node's initiator port has no registration on the device.
    #[error("this node is not registered on the device (unfence it with -o on first)")]
    NotRegistered,
    /// Fencing this node's own key.
    #[error("keys cannot be same. You can not fence yourself.")]
    FenceSelf,
    /// PREEMPT AND ABORT got RESERVATION CONFLICT: our own key is gone.
    #[error("PREEMPT AND ABORT: RESERVATION CONFLICT (this node's key {} was removed?)", fmt_key(*.0))]
    PreemptConflict(u64),
    /// The victim's key is still registered after fencing.
    #[error("key {} still registered", fmt_key(*.0))]
    StillRegistered(u64),
    /// Our key is missing right after registering it.
    #[error("key {} not registered after REGISTER", fmt_key(*.0))]
    NotRegisteredAfterRegister(u64),
    /// No reservation right after RESERVE.
    #[error("no reservation after RESERVE")]
    NoReservationAfterReserve,
    /// No reservation exists and none could be created.
    #[error("no reservation exists on the device")]
    NoReservation,
    /// After a coordinator-disk race, a victim key is still registered.
    #[error("key {} is still registered", fmt_key(*.0))]
    VictimStillRegistered(u64),
    /// After taking a device, the reservation is not ours (Debug of what
    /// READ RESERVATION showed).
    #[error("reservation is {0} after taking it")]
    ReservationNotTaken(String),
    /// A per-device job did not finish before its deadline.
    #[error("no answer within {0:?}")]
    Deadline(Duration),
    /// A per-device task panicked or was cancelled.
    #[error("task failed")]
    TaskFailed,
}

fn join(errs: &[Error]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// Wrap a failed SCSI command with the name of the step.
    pub fn command(what: impl Into<String>) -> impl FnOnce(keyfence_initiator::Error) -> Error {
        let what = what.into();
        move |source| Error::Command { what, source }
    }

    /// The initiator error underneath, if a SCSI command or transport failed.
    pub fn scsi(&self) -> Option<&keyfence_initiator::Error> {
        match self {
            Error::Scsi(e) | Error::Command { source: e, .. } => Some(e),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
