//! Striped LBA range locks: COMPARE AND WRITE takes its range exclusively,
//! ordinary writes take theirs shared, so a compare and its write are
//! atomic against every other writer without a lock all sessions share.
//!
//! The LBA space is cut into regions of `REGION_BLOCKS` blocks, each mapped
//! to one of `STRIPES` read-write locks; a range locks the stripes of the
//! regions it covers, in ascending stripe order (no deadlock).

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

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

#[cfg(test)]
mod tests {
    use super::*;

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
