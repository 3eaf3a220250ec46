//! Striped LBA range locks: COMPARE AND WRITE takes its range exclusively,
//! ordinary writes take theirs shared, so a compare and its write are
//! atomic against every other writer without a lock all sessions share.
//!
//! The LBA space is cut into regions of `REGION_BLOCKS` blocks, each mapped
//! to one of `STRIPES` read-write locks; a range locks the stripes of the
//! regions it covers, in ascending stripe order (no deadlock).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

const STRIPES: usize = 128;
const REGION_SHIFT: u32 = 11; // 2048 blocks per region

#[derive(Debug)]
pub(crate) struct RangeLocks {
    stripes: Vec<RwLock<()>>,
}

pub(crate) enum Guard<'a> {
    #[allow(dead_code)]
    Shared(Vec<RwLockReadGuard<'a, ()>>),
    #[allow(dead_code)]
    Exclusive(Vec<RwLockWriteGuard<'a, ()>>),
}

impl RangeLocks {
    pub fn new() -> Self {
        RangeLocks {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }

    /// Stripe indexes covering `blocks` blocks from `lba`, ascending.
    fn stripes_for(lba: u64, blocks: u64) -> impl Iterator<Item = usize> {
        let first = lba >> REGION_SHIFT;
        let last = (lba.saturating_add(blocks.max(1)) - 1) >> REGION_SHIFT;
        let regions = last - first + 1;
        let mut mask = [false; STRIPES];
        if regions >= STRIPES as u64 {
            mask = [true; STRIPES];
        } else {
            for r in first..=last {
                mask[(r % STRIPES as u64) as usize] = true;
            }
        }
        (0..STRIPES).filter(move |&i| mask[i])
    }

    pub fn shared(&self, lba: u64, blocks: u64) -> Guard<'_> {
        Guard::Shared(
            Self::stripes_for(lba, blocks)
                .map(|i| self.stripes[i].read().unwrap_or_else(|e| e.into_inner()))
                .collect(),
        )
    }

    pub fn exclusive(&self, lba: u64, blocks: u64) -> Guard<'_> {
        Guard::Exclusive(
            Self::stripes_for(lba, blocks)
                .map(|i| self.stripes[i].write().unwrap_or_else(|e| e.into_inner()))
                .collect(),
        )
    }
}

/// An LBA range another gateway's COMPARE AND WRITE holds (cluster mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldRange {
    /// Identifies the hold (the cluster revision that published it).
    pub id: i64,
    pub lba: u64,
    pub blocks: u64,
}

impl HeldRange {
    fn overlaps(&self, lba: u64, blocks: u64) -> bool {
        let end = lba.saturating_add(blocks.max(1));
        let my_end = self.lba.saturating_add(self.blocks.max(1));
        lba < my_end && self.lba < end
    }
}

/// The ranges this gateway holds for other gateways' COMPARE AND WRITEs:
/// a write to the medium that overlaps one waits until it is released.
/// `active` is the fast path: while nothing is held (always, on a
/// single-node LU) a write reads one atomic flag and goes on.
///
/// Ordering with the writes already in flight comes from the stripe
/// locks: a write checks here while it holds its stripes, and whoever
/// holds a new range then takes (and drops) those stripes exclusively
/// ([`crate::LogicalUnit::hold_ranges`]), which waits for every write that
/// checked before the range was set and makes every later check see it.
#[derive(Debug, Default)]
pub(crate) struct HeldRanges {
    active: AtomicBool,
    held: Mutex<Held>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct Held {
    /// Everything is held: which ranges are is not known (yet).
    all: bool,
    ranges: Vec<HeldRange>,
}

impl Held {
    fn blocks(&self, lba: u64, blocks: u64) -> bool {
        self.all || self.ranges.iter().any(|r| r.overlaps(lba, blocks))
    }
}

/// How often a waiting write looks at whether it may still be served.
const HELD_POLL: Duration = Duration::from_millis(20);

impl HeldRanges {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Does a held range overlap `blocks` blocks from `lba`? One atomic
    /// load while nothing is held.
    #[inline]
    pub fn overlaps(&self, lba: u64, blocks: u64) -> bool {
        self.active.load(Ordering::Acquire) && self.lock().blocks(lba, blocks)
    }

    /// Wait until no held range overlaps the blocks: `Ok` then, `Err` as
    /// soon as `may_serve` turns false or `limit` passed.
    pub fn wait_clear(
        &self,
        lba: u64,
        blocks: u64,
        may_serve: impl Fn() -> bool,
        limit: Duration,
    ) -> Result<(), ()> {
        let give_up = Instant::now() + limit;
        let mut h = self.lock();
        while h.blocks(lba, blocks) {
            if !may_serve() || Instant::now() >= give_up {
                return Err(());
            }
            h = self
                .released
                .wait_timeout(h, HELD_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Hold exactly `ranges` (or everything, with `all`); writes waiting
    /// on a range no longer held go on.
    pub fn set(&self, all: bool, ranges: Vec<HeldRange>) {
        let mut h = self.lock();
        h.all = all;
        h.ranges = ranges;
        self.active
            .store(h.all || !h.ranges.is_empty(), Ordering::Release);
        drop(h);
        self.released.notify_all();
    }

    pub fn get(&self) -> (bool, Vec<HeldRange>) {
        let h = self.lock();
        (h.all, h.ranges.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_ranges_overlap() {
        let h = HeldRanges::default();
        assert!(!h.overlaps(0, u64::MAX));
        h.set(
            false,
            vec![HeldRange {
                id: 1,
                lba: 100,
                blocks: 8,
            }],
        );
        assert!(h.overlaps(107, 1));
        assert!(h.overlaps(90, 11));
        assert!(!h.overlaps(108, 4));
        assert!(!h.overlaps(92, 8));
        // Zero blocks (WRITE SAME to the end is never 0 here) count as one.
        assert!(h.overlaps(100, 0));
        h.set(true, Vec::new());
        assert!(h.overlaps(u64::MAX - 1, 1));
        h.set(false, Vec::new());
        assert!(!h.overlaps(100, 8));
        assert!(h.wait_clear(100, 8, || true, Duration::ZERO).is_ok());
        h.set(
            false,
            vec![HeldRange {
                id: 2,
                lba: 0,
                blocks: 1,
            }],
        );
        assert!(h
            .wait_clear(0, 1, || false, Duration::from_secs(5))
            .is_err());
        let t = Instant::now();
        assert!(h
            .wait_clear(0, 1, || true, Duration::from_millis(50))
            .is_err());
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn stripes_cover_ranges() {
        assert_eq!(RangeLocks::stripes_for(0, 1).collect::<Vec<_>>(), vec![0]);
        assert_eq!(
            RangeLocks::stripes_for(2047, 2).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(RangeLocks::stripes_for(u64::MAX - 1, 10).count(), 1);
        assert_eq!(RangeLocks::stripes_for(0, 1 << 40).count(), STRIPES);
        let l = RangeLocks::new();
        let _a = l.shared(0, 10);
        let _b = l.shared(5, 10);
        drop(_a);
        drop(_b);
        let _c = l.exclusive(0, 4096);
    }
}
