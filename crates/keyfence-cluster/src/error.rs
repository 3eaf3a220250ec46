//! The one error type of the crate.

use std::time::Duration;

/// Why etcd could not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailability {
    /// The member we reached has no leader: the cluster lost its quorum
    /// (or is electing one).
    NoLeader,
    /// No answer within the request timeout (a frozen or partitioned
    /// cluster, or a quorum loss the member has not noticed yet).
    Timeout,
    /// No member could be reached at all.
    Unreachable,
}

impl std::fmt::Display for Unavailability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unavailability::NoLeader => "no leader (quorum lost)",
            Unavailability::Timeout => "request timed out",
            Unavailability::Unreachable => "no member reachable",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd did not serve the request; nothing is known to have changed
    /// unless the request was a write whose outcome [`Error::Unknown`]
    /// would report.
    #[error("etcd unavailable: {kind}: {detail}")]
    Unavailable {
        kind: Unavailability,
        detail: String,
    },
    /// A write was sent but its outcome could not be learned (the
    /// answer was lost and reading back failed too).
    #[error("outcome of the write to {key} is unknown: {detail}")]
    Unknown { key: String, detail: String },
    /// etcd answered with an error that is not about availability.
    #[error("etcd error: {0}")]
    Etcd(String),
    /// The compare-and-swap found another revision than the one read.
    #[error("PR state of {lu} changed underneath: expected revision {expected}, found {found}")]
    Conflict {
        lu: String,
        expected: i64,
        found: i64,
    },
    /// [`crate::Cluster::update`] lost the race this many times in a row.
    #[error("PR state of {lu} still contended after {attempts} attempts")]
    Contended { lu: String, attempts: u32 },
    /// A stored value that is not what this version of keyfence wrote.
    #[error("stored value at {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid LU id {id:?}: {reason}")]
    BadLuId { id: String, reason: String },
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    /// Another live gateway holds the name.
    #[error("gateway name {0:?} is held by another live gateway")]
    NameInUse(String),
    /// The gateway's lease is gone: it must stop serving and join again.
    #[error("gateway {0:?} lost its lease")]
    LeaseLost(String),
    /// [`crate::Cluster::wait_applied`] reached its deadline.
    #[error("revision {revision} of {lu} not applied by {pending:?} within {waited:?}")]
    NotApplied {
        lu: String,
        revision: i64,
        pending: Vec<String>,
        waited: Duration,
    },
    /// A blocking call was made on a thread that drives asynchronous
    /// tasks; it would stall the runtime the call itself needs.
    #[error(
        "blocking cluster call on a tokio worker thread (use a plain or spawn_blocking thread)"
    )]
    OnRuntimeThread,
    /// The runtime serving blocking calls has shut down.
    #[error("cluster runtime is gone")]
    RuntimeGone,
}

impl Error {
    /// etcd could not serve the request (quorum loss, timeout, no member).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Unknown { .. })
    }

    pub(crate) fn timeout(after: Duration, what: &str) -> Error {
        Error::Unavailable {
            kind: Unavailability::Timeout,
            detail: format!("{what}: no answer within {after:?}"),
        }
    }
}

impl From<etcd_client::Error> for Error {
    fn from(e: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        match e {
            E::GRpcStatus(s) => {
                let msg = s.message().to_string();
                let lower = msg.to_ascii_lowercase();
                if lower.contains("no leader") || lower.contains("leader changed") {
                    Error::Unavailable {
                        kind: Unavailability::NoLeader,
                        detail: msg,
                    }
                } else if lower.contains("timed out")
                    || i32::from(s.code()) == grpc_code::DEADLINE_EXCEEDED
                {
                    Error::Unavailable {
                        kind: Unavailability::Timeout,
                        detail: msg,
                    }
                } else if i32::from(s.code()) == grpc_code::UNAVAILABLE
                    || i32::from(s.code()) == grpc_code::CANCELLED
                    // The connection broke under the request (a member
                    // killed while it was being served).
                    || (i32::from(s.code()) == grpc_code::UNKNOWN
                        && ["transport", "connection", "broken pipe", "h2 protocol"]
                            .iter()
                            .any(|w| lower.contains(w)))
                {
                    Error::Unavailable {
                        kind: Unavailability::Unreachable,
                        detail: msg,
                    }
                } else {
                    Error::Etcd(format!("{:?}: {msg}", s.code()))
                }
            }
            E::TransportError(t) => Error::Unavailable {
                kind: Unavailability::Unreachable,
                detail: t.to_string(),
            },
            E::IoError(io) => Error::Unavailable {
                kind: Unavailability::Unreachable,
                detail: io.to_string(),
            },
            other => Error::Etcd(other.to_string()),
        }
    }
}

/// gRPC status codes (grpc/doc/statuscodes.md), compared by number so
/// the crate does not depend on tonic directly.
mod grpc_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const UNAVAILABLE: i32 = 14;
}
