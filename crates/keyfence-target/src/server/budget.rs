//! Byte budgets: how much command data (write data collected before it
//! is executed, read data not yet sent) the server holds. One [`Budget`]
//! is shared by every session of the server (`[limits]
//! max_buffered_bytes`); each piece of memory counted against it is a
//! [`Held`], released when dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A limit on bytes held, shared by holders.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicU64,
    limit: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
        })
    }

    /// Take `n` bytes if they fit under the limit.
    pub fn try_take(self: &Arc<Self>, n: u64) -> Option<Held> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let limit = self.limit.load(Ordering::Relaxed);
            let next = cur.checked_add(n).filter(|v| *v <= limit)?;
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Held {
                        budget: self.clone(),
                        n,
                    })
                }
                Err(v) => cur = v,
            }
        }
    }

    /// Change the limit (a reload); bytes held above a lowered limit are
    /// kept until released.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes counted against a [`Budget`] until dropped.
#[derive(Debug)]
pub(crate) struct Held {
    budget: Arc<Budget>,
    n: u64,
}

impl Held {
    /// Take over `other`'s bytes (of the same budget): both are released
    /// together when `self` is dropped.
    pub fn absorb(&mut self, mut other: Held) {
        debug_assert!(Arc::ptr_eq(&self.budget, &other.budget));
        self.n += other.n;
        other.n = 0;
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.n
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_and_releases() {
        let b = Budget::new(100);
        let a = b.try_take(60).unwrap();
        assert!(b.try_take(41).is_none());
        let c = b.try_take(40).unwrap();
        assert_eq!(b.used(), 100);
        drop(a);
        assert_eq!(b.used(), 40);
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn absorbed_bytes_are_released_together() {
        let b = Budget::new(100);
        let mut a = b.try_take(30).unwrap();
        let c = b.try_take(20).unwrap();
        a.absorb(c);
        assert_eq!(a.bytes(), 50);
        assert_eq!(b.used(), 50);
        drop(a);
        assert_eq!(b.used(), 0);
    }
}
