//! Where APTPL state lives: a store trait shaped for a shared,
//! versioned store (a file today, etcd-like stores later).
//!
//! The engine decides *what* must be durable ([`crate::Persist`]); a store
//! makes it so. A store write that fails must leave the previous version
//! readable, and the caller must then fail the command and keep its
//! in-memory state unchanged.

use std::sync::Mutex;

use crate::state::PrState;

/// Version of the persisted state; `0` means nothing is persisted.
pub type Version = u64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("PR store I/O error: {0}")]
    Io(String),
    #[error("PR store out of space: {0}")]
    NoSpace(String),
    #[error("persisted PR state is unreadable: {0}")]
    Corrupt(String),
    #[error("PR store version changed underneath: expected {expected}, found {found}")]
    VersionMismatch { expected: Version, found: Version },
}

/// A versioned home for one LU's persistent reservation state.
pub trait PrStore: Send + Sync + std::fmt::Debug {
    /// The persisted state and its version; `Ok(None)` when nothing is
    /// persisted. `Err(Corrupt)` means PR information was lost.
    fn load(&self) -> Result<Option<(Version, PrState)>, StoreError>;

    /// Replace the persisted state (`None`: remove it) if the current
    /// version is `expected`. Durable when it returns `Ok` with the new
    /// version (`0` after a removal).
    fn compare_and_swap(
        &self,
        expected: Version,
        new: Option<&PrState>,
    ) -> Result<Version, StoreError>;
}

/// An in-memory store, for tests and for LUs configured without a data
/// directory (then APTPL is not offered: PTPL_C=0). `fail_writes` makes
/// every write fail, to exercise failure paths.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<(Version, Option<PrState>)>,
    fail: std::sync::atomic::AtomicBool,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn fail_writes(&self, fail: bool) {
        self.fail.store(fail, std::sync::atomic::Ordering::SeqCst);
    }
}

impl PrStore for MemoryStore {
    fn load(&self) -> Result<Option<(Version, PrState)>, StoreError> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Ok(g.1.clone().map(|s| (g.0, s)))
    }

    fn compare_and_swap(
        &self,
        expected: Version,
        new: Option<&PrState>,
    ) -> Result<Version, StoreError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io("injected write failure".into()));
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 != expected {
            return Err(StoreError::VersionMismatch {
                expected,
                found: g.0,
            });
        }
        match new {
            Some(s) => {
                g.0 += 1;
                g.1 = Some(s.durable());
            }
            None => {
                g.0 = 0;
                g.1 = None;
            }
        }
        Ok(g.0)
    }
}
