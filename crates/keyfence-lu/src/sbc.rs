//! SBC-3 commands: reads, writes, verification, WRITE SAME, UNMAP,
//! COMPARE AND WRITE, ORWRITE, PRE-FETCH, SYNCHRONIZE CACHE, capacity and
//! provisioning status.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use keyfence_scsi::cdb::{Cdb, IoFlags};
use keyfence_scsi::sense::asc;
use keyfence_scsi::{ScsiStatus, Sense, SenseKey};

use super::{rangelock, CommandOutcome, CommandRequest, LogicalUnit};

/// Largest READ/WRITE/VERIFY transfer, bytes (VPD B0h MAXIMUM TRANSFER
/// LENGTH); also bounds the memory one command can make the LU allocate.
pub(crate) const MAX_TRANSFER_BYTES: u64 = 16 << 20;
/// Preferred transfer size, bytes.
pub(crate) const OPTIMAL_TRANSFER_BYTES: u64 = 1 << 20;
/// Largest range one UNMAP descriptor may cover, bytes.
pub(crate) const MAX_UNMAP_BYTES: u64 = 256 << 20;
/// Largest WRITE SAME range, bytes (writing it may mean writing every
/// block, so it is bounded like a transfer).
pub(crate) const MAX_WRITE_SAME_BYTES: u64 = MAX_TRANSFER_BYTES;
pub(crate) const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Unmap granularity: file systems deallocate whole pages.
pub(crate) const UNMAP_GRANULARITY_BYTES: u64 = 4096;
/// Largest COMPARE AND WRITE, blocks.
pub(crate) const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 128;
/// Most LBA status descriptors one GET LBA STATUS returns.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 1024;

fn medium_error(code: keyfence_scsi::sense::Asc, e: &std::io::Error) -> Sense {
    tracing::warn!(error = %e, "backend I/O failed");
    Sense::new(SenseKey::MediumError, code)
}

fn write_error(e: std::io::Error) -> Sense {
    medium_error(asc::WRITE_ERROR, &e)
}

fn read_error(e: std::io::Error) -> Sense {
    medium_error(asc::UNRECOVERED_READ_ERROR, &e)
}

/// How long a write waits for a range another gateway's COMPARE AND
/// WRITE holds before it gives up (the hold normally lasts milliseconds;
/// it ends at the latest with the holder's lease).
const HELD_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

fn lba_out_of_range() -> Sense {
    Sense::illegal_request(asc::LBA_OUT_OF_RANGE)
}

/// Byte offset of the TRANSFER LENGTH / NUMBER OF LOGICAL BLOCKS field.
fn length_field(cdb: &[u8]) -> u16 {
    match cdb.first().map(|o| o >> 5) {
        Some(0) => 4,
        Some(1) | Some(2) => 7,
        Some(5) => 6,
        _ => 10,
    }
}

impl LogicalUnit {
    pub(crate) fn max_transfer_blocks(&self) -> u32 {
        (MAX_TRANSFER_BYTES >> self.block_shift) as u32
    }

    pub(crate) fn bytes(&self, blocks: u64) -> u64 {
        blocks << self.block_shift
    }

    /// LBA OUT OF RANGE unless `lba..lba+blocks` lies within the medium
    /// (SBC-3 4.5: also for zero blocks when `lba` is past the end).
    pub(crate) fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if lba <= self.blocks() && end <= self.blocks() => Ok(()),
            _ => Err(lba_out_of_range()),
        }
    }

    pub(crate) fn write_protected(&self) -> bool {
        self.cfg.read_only || self.backend.is_read_only() || self.mode.swp.load(Ordering::Relaxed)
    }

    fn check_writable(&self, req: &CommandRequest<'_>) -> Result<(), Sense> {
        if req.read_only || self.write_protected() {
            Err(Sense::new(SenseKey::DataProtect, asc::WRITE_PROTECTED))
        } else {
            Ok(())
        }
    }

    pub(crate) fn check_transfer(&self, cdb: &[u8], blocks: u32) -> Result<(), Sense> {
        if blocks > self.max_transfer_blocks() {
            return Err(Sense::invalid_cdb_field(length_field(cdb), Some(7)));
        }
        Ok(())
    }

    /// How many whole blocks of the `blocks` the CDB asks to write the
    /// data-out holds. When the transport's expected transfer length was
    /// shorter than the CDB's (an underflow the transport reports as
    /// residual), only the blocks actually received are written.
    fn received_blocks(&self, req: &CommandRequest<'_>, blocks: u32) -> u32 {
        let have = (req.data_out.len() as u64) >> self.block_shift;
        have.min(u64::from(blocks)) as u32
    }

    /// The data-out bytes for `blocks` blocks; fewer received than the CDB
    /// implies is an error in the transfer length the CDB gives.
    fn data_out<'a>(&self, req: &CommandRequest<'a>, bytes: u64) -> Result<&'a [u8], Sense> {
        let n = usize::try_from(bytes)
            .map_err(|_| Sense::invalid_cdb_field(length_field(req.cdb), None))?;
        req.data_out
            .get(..n)
            .ok_or_else(|| Sense::invalid_cdb_field(length_field(req.cdb), Some(7)))
    }

    /// Flush when the write must be durable before GOOD: FUA, or the
    /// write cache is disabled.
    fn complete_write(&self, fua: bool) -> Result<(), Sense> {
        if fua || !self.mode.wce.load(Ordering::Relaxed) {
            self.backend.flush().map_err(write_error)?;
        }
        Ok(())
    }

    /// The stripe guard a command modifying the medium holds while it
    /// writes `blocks` blocks from `lba` (`take` takes it shared or
    /// exclusive), taken once no range held for another gateway's COMPARE
    /// AND WRITE overlaps them (cluster mode; one atomic load otherwise).
    fn medium_guard<'a>(
        &'a self,
        lba: u64,
        blocks: u64,
        take: impl Fn() -> rangelock::Guard<'a>,
    ) -> Result<rangelock::Guard<'a>, Sense> {
        loop {
            let g = take();
            if !self.held.overlaps(lba, blocks) {
                return Ok(g);
            }
            drop(g);
            self.held
                .wait_clear(
                    lba,
                    blocks,
                    || self.reservations.may_serve(),
                    HELD_WAIT_LIMIT,
                )
                .map_err(|()| {
                    Sense::new(SenseKey::NotReady, asc::ASYMMETRIC_ACCESS_STATE_TRANSITION)
                })?;
        }
    }

    fn write_guard(&self, lba: u64, blocks: u64) -> Result<rangelock::Guard<'_>, Sense> {
        self.medium_guard(lba, blocks, || self.locks.shared(lba, blocks))
    }

    fn read_blocks(&self, lba: u64, blocks: u64) -> Result<Vec<u8>, Sense> {
        let len = usize::try_from(self.bytes(blocks)).map_err(|_| lba_out_of_range())?;
        self.backend
            .read_vec(len, self.bytes(lba))
            .map_err(read_error)
    }

    pub(super) fn dispatch_other(
        &self,
        req: &CommandRequest<'_>,
        c: Cdb,
    ) -> Result<CommandOutcome, Sense> {
        match c {
            Cdb::Read { lba, blocks, .. } => {
                self.check_transfer(req.cdb, blocks)?;
                self.check_range(lba, blocks.into())?;
                Ok(CommandOutcome::data(self.read_blocks(lba, blocks.into())?))
            }
            Cdb::Write { lba, blocks, flags } => self.write(req, lba, blocks, flags),
            Cdb::Verify {
                lba,
                blocks,
                bytchk,
            } => self.verify(req, lba, blocks, bytchk),
            Cdb::WriteAndVerify {
                lba,
                blocks,
                bytchk,
            } => {
                self.write(
                    req,
                    lba,
                    blocks,
                    IoFlags {
                        dpo: false,
                        fua: true,
                    },
                )?;
                let blocks = self.received_blocks(req, blocks);
                if bytchk == 1 {
                    // Read back what reached the medium and compare.
                    self.verify(req, lba, blocks, 1)
                } else {
                    self.verify(req, lba, blocks, 0)
                }
            }
            Cdb::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
                ..
            } => self.write_same(req, lba, blocks, unmap, ndob),
            Cdb::Unmap { param_len } => self.unmap(req, param_len),
            Cdb::CompareAndWrite { lba, blocks, flags } => {
                self.compare_and_write(req, lba, blocks, flags)
            }
            Cdb::OrWrite { lba, blocks, flags } => self.orwrite(req, lba, blocks, flags),
            Cdb::PreFetch { lba, blocks, .. } => {
                self.check_range(lba, blocks.into())?;
                if blocks == 0 {
                    return Ok(CommandOutcome::good());
                }
                let cached = self
                    .backend
                    .prefetch(self.bytes(lba), self.bytes(blocks.into()))
                    .unwrap_or(false);
                Ok(CommandOutcome::with_status(if cached {
                    ScsiStatus::ConditionMet
                } else {
                    ScsiStatus::Good
                }))
            }
            Cdb::SynchronizeCache { lba, blocks, .. } => {
                self.check_range(lba, blocks.into())?;
                self.backend.flush().map_err(write_error)?;
                Ok(CommandOutcome::good())
            }
            Cdb::ReadCapacity10 => {
                let last = (self.blocks() - 1).min(0xffff_ffff) as u32;
                let mut d = Vec::with_capacity(8);
                d.extend_from_slice(&last.to_be_bytes());
                d.extend_from_slice(&self.cfg.block_size.to_be_bytes());
                Ok(CommandOutcome::data(d))
            }
            Cdb::ReadCapacity16 { alloc_len } => {
                let mut d = vec![0u8; 32];
                d[..8].copy_from_slice(&(self.blocks() - 1).to_be_bytes());
                d[8..12].copy_from_slice(&self.cfg.block_size.to_be_bytes());
                // Byte 13: P_I_EXPONENT 0, LOGICAL BLOCKS PER PHYSICAL BLOCK
                // EXPONENT 0: every logical block is written whole. (The
                // 4 KiB allocation unit of the backing file is reported as
                // the unmap granularity in VPD B0h instead; initiators that
                // read a physical block size of 4 KiB as an alignment for
                // LBA status descriptors misreport unaligned queries.)
                // Byte 14: LBPME, LBPRZ; LOWEST ALIGNED LBA 0.
                d[14] = 0x80
                    | if self.backend.discard_zeroes() {
                        0x40
                    } else {
                        0
                    };
                d.truncate(alloc_len.min(32) as usize);
                Ok(CommandOutcome::data(d))
            }
            Cdb::GetLbaStatus { lba, alloc_len } => self.get_lba_status(lba, alloc_len),
            other => self.dispatch_spc(req, other),
        }
    }

    /// The checks every write-type command makes, then the blocks and data
    /// it will write: `None` when no whole block arrived (nothing to do).
    fn write_data<'r>(
        &self,
        req: &CommandRequest<'r>,
        lba: u64,
        blocks: u32,
    ) -> Result<Option<(u32, &'r [u8])>, Sense> {
        self.check_transfer(req.cdb, blocks)?;
        self.check_writable(req)?;
        self.check_range(lba, blocks.into())?;
        let blocks = self.received_blocks(req, blocks);
        if blocks == 0 {
            return Ok(None);
        }
        Ok(Some((
            blocks,
            self.data_out(req, self.bytes(blocks.into()))?,
        )))
    }

    fn write(
        &self,
        req: &CommandRequest<'_>,
        lba: u64,
        blocks: u32,
        flags: IoFlags,
    ) -> Result<CommandOutcome, Sense> {
        let Some((blocks, data)) = self.write_data(req, lba, blocks)? else {
            return Ok(CommandOutcome::good());
        };
        {
            let _g = self.write_guard(lba, blocks.into())?;
            self.may_submit()?;
            self.backend
                .write_at(data, self.bytes(lba))
                .map_err(write_error)?;
        }
        self.complete_write(flags.fua)?;
        Ok(CommandOutcome::good())
    }

    fn verify(
        &self,
        req: &CommandRequest<'_>,
        lba: u64,
        blocks: u32,
        bytchk: u8,
    ) -> Result<CommandOutcome, Sense> {
        self.check_transfer(req.cdb, blocks)?;
        self.check_range(lba, blocks.into())?;
        if blocks == 0 {
            return Ok(CommandOutcome::good());
        }
        let bs = self.cfg.block_size as usize;
        let expect = match bytchk {
            0 => None,
            1 => Some(self.data_out(req, self.bytes(blocks.into()))?),
            _ => Some(self.data_out(req, bs as u64)?),
        };
        let medium = self.read_blocks(lba, blocks.into())?;
        let Some(expect) = expect else {
            // BYTCHK 0: the medium was readable, which is the check.
            return Ok(CommandOutcome::good());
        };
        let mismatch = if bytchk == 1 {
            first_difference(&medium, expect)
        } else {
            medium
                .chunks(bs)
                .enumerate()
                .find_map(|(i, blk)| first_difference(blk, expect).map(|o| i * bs + o))
        };
        match mismatch {
            None => Ok(CommandOutcome::good()),
            Some(off) => Err(miscompare(off)),
        }
    }

    fn write_same(
        &self,
        req: &CommandRequest<'_>,
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
    ) -> Result<CommandOutcome, Sense> {
        self.check_writable(req)?;
        // NUMBER OF LOGICAL BLOCKS 0 (WSNZ = 0): through the last block.
        let count = if blocks == 0 {
            if lba > self.blocks() {
                return Err(lba_out_of_range());
            }
            self.blocks() - lba
        } else {
            self.check_range(lba, blocks.into())?;
            u64::from(blocks)
        };
        if count > MAX_WRITE_SAME_BYTES >> self.block_shift {
            return Err(Sense::invalid_cdb_field(length_field(req.cdb), Some(7)));
        }
        let bs = self.cfg.block_size as usize;
        let block: &[u8] = if ndob {
            &[]
        } else {
            if req.data_out.len() != bs {
                return Err(Sense::invalid_cdb_field(length_field(req.cdb), Some(7)));
            }
            req.data_out
        };
        if count == 0 {
            return Ok(CommandOutcome::good());
        }
        let _g = self.write_guard(lba, count)?;
        if unmap {
            // Deallocate whatever the data-out holds (with LBPRZ the blocks
            // then read back as zeroes), as initiators expect of UNMAP=1.
            self.may_submit()?;
            self.backend
                .discard(self.bytes(lba), self.bytes(count))
                .map_err(write_error)?;
        } else {
            let chunk_blocks = (OPTIMAL_TRANSFER_BYTES as usize / bs).max(1) as u64;
            let mut pattern = Vec::with_capacity(bs * chunk_blocks.min(count) as usize);
            for _ in 0..chunk_blocks.min(count) {
                if ndob {
                    pattern.resize(pattern.len() + bs, 0);
                } else {
                    pattern.extend_from_slice(block);
                }
            }
            let mut done = 0u64;
            while done < count {
                let n = (count - done).min(chunk_blocks);
                let len = (n as usize) * bs;
                self.may_submit()?;
                self.backend
                    .write_at(&pattern[..len], self.bytes(lba + done))
                    .map_err(write_error)?;
                done += n;
            }
        }
        drop(_g);
        self.complete_write(false)?;
        Ok(CommandOutcome::good())
    }

    fn unmap(&self, req: &CommandRequest<'_>, param_len: u16) -> Result<CommandOutcome, Sense> {
        self.check_writable(req)?;
        if param_len == 0 {
            return Ok(CommandOutcome::good());
        }
        if param_len < 8 {
            return Err(Sense::illegal_request(asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let p = req
            .data_out
            .get(..usize::from(param_len))
            .ok_or(Sense::illegal_request(asc::PARAMETER_LIST_LENGTH_ERROR))?;
        let data_len = usize::from(u16::from_be_bytes([p[0], p[1]]));
        let bd_len = usize::from(u16::from_be_bytes([p[2], p[3]]));
        // SBC-3 5.28.2: the lengths must fit what was sent.
        if data_len + 2 > p.len() || data_len < 6 && bd_len > 0 {
            return Err(Sense::illegal_request(asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        if bd_len + 8 > p.len() {
            return Err(Sense::illegal_request(asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        if bd_len % 16 != 0 {
            return Err(Sense::invalid_param_field(2, None));
        }
        let n = bd_len / 16;
        if n > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::invalid_param_field(2, None));
        }
        let max_blocks = MAX_UNMAP_BYTES >> self.block_shift;
        let mut ranges = Vec::with_capacity(n);
        for i in 0..n {
            let d = &p[8 + 16 * i..8 + 16 * (i + 1)];
            let lba = u64::from_be_bytes(d[..8].try_into().unwrap_or_default());
            let count = u64::from(u32::from_be_bytes(d[8..12].try_into().unwrap_or_default()));
            self.check_range(lba, count)?;
            if count > max_blocks {
                return Err(Sense::invalid_param_field((8 + 16 * i + 8) as u16, None));
            }
            if count > 0 {
                ranges.push((lba, count));
            }
        }
        for (lba, count) in ranges {
            let _g = self.write_guard(lba, count)?;
            self.may_submit()?;
            self.backend
                .discard(self.bytes(lba), self.bytes(count))
                .map_err(write_error)?;
        }
        self.complete_write(false)?;
        Ok(CommandOutcome::good())
    }

    fn compare_and_write(
        &self,
        req: &CommandRequest<'_>,
        lba: u64,
        blocks: u8,
        flags: IoFlags,
    ) -> Result<CommandOutcome, Sense> {
        if blocks > MAX_COMPARE_AND_WRITE_BLOCKS {
            return Err(Sense::invalid_cdb_field(13, Some(7)));
        }
        // The data-out must hold exactly the verify and write instances
        // (also for zero blocks: then there must be none).
        let half = self.bytes(blocks.into()) as usize;
        if req.data_out.len() != 2 * half {
            return Err(Sense::invalid_cdb_field(13, Some(7)));
        }
        self.check_writable(req)?;
        self.check_range(lba, blocks.into())?;
        if blocks == 0 {
            return Ok(CommandOutcome::good());
        }
        let (verify, write) = req.data_out.split_at(half);
        // Clustered: no other gateway's COMPARE AND WRITE runs on the LU,
        // and no other gateway's write reaches these blocks, until the
        // guard is dropped, after this one's write is durable. (This
        // gateway's own writes are kept out by the exclusive stripes.)
        let cluster_lock = self
            .reservations
            .compare_and_write_lock(lba, blocks.into())?;
        {
            let _g = self.locks.exclusive(lba, blocks.into());
            let medium = self.read_blocks(lba, blocks.into())?;
            if let Some(off) = first_difference(&medium, verify) {
                return Err(miscompare(off));
            }
            self.may_submit()?;
            self.backend
                .write_at(write, self.bytes(lba))
                .map_err(write_error)?;
        }
        if cluster_lock.is_some() {
            self.backend.flush().map_err(write_error)?;
        }
        drop(cluster_lock);
        self.complete_write(flags.fua)?;
        Ok(CommandOutcome::good())
    }

    fn orwrite(
        &self,
        req: &CommandRequest<'_>,
        lba: u64,
        blocks: u32,
        flags: IoFlags,
    ) -> Result<CommandOutcome, Sense> {
        let Some((blocks, data)) = self.write_data(req, lba, blocks)? else {
            return Ok(CommandOutcome::good());
        };
        {
            let _g = self.medium_guard(lba, blocks.into(), || {
                self.locks.exclusive(lba, blocks.into())
            })?;
            let mut medium = self.read_blocks(lba, blocks.into())?;
            for (m, d) in medium.iter_mut().zip(data) {
                *m |= d;
            }
            self.may_submit()?;
            self.backend
                .write_at(&medium, self.bytes(lba))
                .map_err(write_error)?;
        }
        self.complete_write(flags.fua)?;
        Ok(CommandOutcome::good())
    }

    fn get_lba_status(&self, lba: u64, alloc_len: u32) -> Result<CommandOutcome, Sense> {
        if lba >= self.blocks() {
            return Err(lba_out_of_range());
        }
        let room = (alloc_len as usize).saturating_sub(8) / 16;
        let want = room.clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
        let bs = u64::from(self.cfg.block_size);
        let start = self.bytes(lba);
        let end = self.bytes(self.blocks());
        let mapped = self
            .backend
            .mapped_ranges(start..end, want)
            .map_err(read_error)?;
        // With the limit reached, what lies past the last range is unknown:
        // report up to there and let the initiator ask again.
        let truncated = mapped.len() >= want;
        // Walk the medium from `lba`: alternate deallocated and mapped
        // extents, a block counting as mapped if any byte of it is.
        let mut descs: Vec<(u64, u64, u8)> = Vec::with_capacity(want);
        let push = |from: u64, to: u64, status: u8, descs: &mut Vec<(u64, u64, u8)>| {
            let mut from = from;
            while from < to && descs.len() < want {
                let n = (to - from).min(u64::from(u32::MAX));
                match descs.last_mut() {
                    Some(last)
                        if last.2 == status
                            && last.0 + last.1 == from
                            && last.1 + n <= u64::from(u32::MAX) =>
                    {
                        last.1 += n
                    }
                    _ => descs.push((from, n, status)),
                }
                from += n;
            }
        };
        let mut cursor = lba;
        for r in mapped {
            let first = (r.start / bs).max(cursor);
            let last = r.end.div_ceil(bs).min(self.blocks());
            if last <= first {
                continue;
            }
            push(cursor, first, 1, &mut descs);
            push(first, last, 0, &mut descs);
            cursor = last;
            if descs.len() >= want {
                break;
            }
        }
        if !truncated {
            push(cursor, self.blocks(), 1, &mut descs);
        }
        let mut d = Vec::with_capacity(8 + 16 * descs.len());
        d.extend_from_slice(&((4 + 16 * descs.len()) as u32).to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        for (l, n, s) in &descs {
            d.extend_from_slice(&l.to_be_bytes());
            d.extend_from_slice(&(*n as u32).to_be_bytes());
            d.extend_from_slice(&[*s, 0, 0, 0]);
        }
        d.truncate(alloc_len as usize);
        Ok(CommandOutcome::data(Bytes::from(d)))
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION, INFORMATION = offset of
/// the first differing byte in the data-out buffer.
fn miscompare(offset: usize) -> Sense {
    Sense::new(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY)
        .with_information(u32::try_from(offset).unwrap_or(u32::MAX))
}
