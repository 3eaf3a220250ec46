//! [`keyfence_pr::PrStore`] over etcd, for code written against the
//! synchronous store trait.
//!
//! The trait is synchronous and the etcd client is not: each call is
//! spawned on a tokio runtime given at construction and the calling
//! thread waits for the answer. That is only sound on a thread that does
//! not drive that runtime's tasks: a plain thread, or a `spawn_blocking`
//! thread. On a tokio worker thread (inside an async task or `block_on`)
//! the call is refused with [`Error::OnRuntimeThread`] rather than
//! stalling the runtime it needs.

use std::sync::mpsc;
use std::time::Duration;

use keyfence_pr::{PrState, PrStore, StoreError, Version};
use tokio::runtime::Handle;

use crate::client::Change;
use crate::keys::LuId;
use crate::{Cluster, Error};

/// One LU's state in etcd behind the synchronous store trait. The
/// version is the etcd mod revision of the LU's state key (0: absent);
/// `compare_and_swap` really compares it: a mismatch is
/// [`StoreError::VersionMismatch`], never an overwrite. The stored state
/// is the whole state given, not only its APTPL part (in cluster mode the
/// record *is* the LU's state; see docs/cluster.md).
#[derive(Debug, Clone)]
pub struct ClusterPrStore {
    cluster: Cluster,
    lu: LuId,
    runtime: Handle,
}

impl ClusterPrStore {
    pub fn new(cluster: Cluster, lu: LuId, runtime: Handle) -> ClusterPrStore {
        ClusterPrStore {
            cluster,
            lu,
            runtime,
        }
    }

    pub fn lu(&self) -> &LuId {
        &self.lu
    }

    /// Run `fut` on the runtime and wait for it, bounded.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        if on_async_thread() {
            return Err(Error::OnRuntimeThread);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        // Every request inside is bounded by the request timeout; a
        // commit whose answer was lost may take a few more to settle.
        let bound = self.cluster.request_timeout() * 6 + Duration::from_secs(1);
        match rx.recv_timeout(bound) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(Error::timeout(bound, "waiting for the cluster runtime"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::RuntimeGone),
        }
    }
}

/// Is this thread driving asynchronous tasks (a tokio worker, or inside
/// `block_on`)? tokio answers that only by panicking in its blocking
/// entry points, so ask one of them on a closed channel, which returns at
/// once when blocking is allowed.
fn on_async_thread() -> bool {
    if Handle::try_current().is_err() {
        return false; // no runtime context at all: a plain thread
    }
    let probe = std::panic::catch_unwind(|| {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        drop(tx);
        let _ = rx.blocking_recv();
    });
    probe.is_err()
}

fn store_error(e: Error) -> StoreError {
    match e {
        Error::Corrupt { key, reason } => StoreError::Corrupt(format!("{key}: {reason}")),
        Error::Conflict {
            expected, found, ..
        } => StoreError::VersionMismatch {
            expected: expected as Version,
            found: found as Version,
        },
        other => StoreError::Io(other.to_string()),
    }
}

impl PrStore for ClusterPrStore {
    fn load(&self) -> Result<Option<(Version, PrState)>, StoreError> {
        let (c, lu) = (self.cluster.clone(), self.lu.clone());
        let st = self
            .run(async move { c.read(&lu).await })
            .map_err(store_error)?;
        Ok((st.revision != 0).then_some((st.revision as Version, st.state)))
    }

    fn compare_and_swap(
        &self,
        expected: Version,
        new: Option<&PrState>,
    ) -> Result<Version, StoreError> {
        let expected_rev = i64::try_from(expected)
            .map_err(|_| StoreError::VersionMismatch { expected, found: 0 })?;
        let (c, lu) = (self.cluster.clone(), self.lu.clone());
        let new = new.cloned();
        self.run(async move {
            match new {
                None => c.remove(&lu, expected_rev).await.map(|_| 0),
                Some(state) => {
                    let base = c.read(&lu).await?;
                    if base.revision != expected_rev {
                        return Err(Error::Conflict {
                            lu: lu.to_string(),
                            expected: expected_rev,
                            found: base.revision,
                        });
                    }
                    let done = c.commit(&lu, &base, Change::from(state)).await?;
                    Ok(done.state.revision)
                }
            }
        })
        .map(|r| r as Version)
        .map_err(store_error)
    }
}
