//! Target-side sequencing rules of RFC 7143 at error recovery level 0,
//! without I/O: the command window (CmdSN, ExpCmdSN, MaxCmdSN) and the
//! Data-Out / R2T bookkeeping of one write command.
//!
//! * [`CommandWindow`] admits non-immediate PDUs by CmdSN (section
//!   4.2.2.1): the one at ExpCmdSN runs now, later ones inside the window
//!   wait for the gap to fill, anything outside is ignored. The server
//!   tells it how busy the session is and whether it may take more work;
//!   MaxCmdSN follows, never decreasing, and reaches ExpCmdSN - 1 (the
//!   closed window) when the session has no room.
//! * [`DataOutSequence`] checks every Data-Out of one command against what
//!   was announced and solicited: unsolicited data (immediate data,
//!   FirstBurstLength, InitialR2T), R2Ts within MaxBurstLength and
//!   MaxOutstandingR2T, DataSN per sequence, buffer offsets in order
//!   (DataPDUInOrder=Yes) and the F bit ending a sequence. It says when all
//!   wanted data is in; the caller stores the bytes.

use crate::serial;

/// What to do with a non-immediate PDU that carries a CmdSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// CmdSN = ExpCmdSN inside the window: handle it now (ExpCmdSN has
    /// advanced past it).
    Now,
    /// Inside the window but ahead of ExpCmdSN: hold it until the PDUs
    /// before it have arrived.
    Later,
    /// Outside the window (a duplicate, or beyond MaxCmdSN): ignore it.
    Outside,
}

/// The target's command window of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandWindow {
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    /// Most commands the session holds at once (MaxCmdSN - ExpCmdSN + 1
    /// when idle).
    size: u32,
}

impl CommandWindow {
    /// A window after login: ExpCmdSN as the login left it, closed until
    /// [`CommandWindow::update`] opens it.
    pub fn new(exp_cmd_sn: u32, size: u32) -> Self {
        CommandWindow {
            exp_cmd_sn,
            max_cmd_sn: exp_cmd_sn.wrapping_sub(1),
            size: size.max(1),
        }
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    pub fn max_cmd_sn(&self) -> u32 {
        self.max_cmd_sn
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// ExpCmdSN <= `sn` <= MaxCmdSN.
    pub fn contains(&self, sn: u32) -> bool {
        serial::in_window(sn, self.exp_cmd_sn, self.max_cmd_sn)
    }

    /// No CmdSN is acceptable now (MaxCmdSN = ExpCmdSN - 1).
    pub fn is_closed(&self) -> bool {
        serial::window_closed(self.exp_cmd_sn, self.max_cmd_sn)
    }

    /// Admit a non-immediate PDU with CmdSN `sn`.
    pub fn admit(&mut self, sn: u32) -> Admission {
        if !self.contains(sn) {
            return Admission::Outside;
        }
        if sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            Admission::Now
        } else {
            Admission::Later
        }
    }

    /// A PDU held back by [`Admission::Later`] with CmdSN = ExpCmdSN is
    /// being handled now.
    pub fn advance(&mut self) {
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
    }

    /// Recompute MaxCmdSN from the commands the session holds (`busy`:
    /// running, collecting data, held back by a CmdSN gap or task
    /// attributes). With `saturated` (the session is over a resource
    /// budget) no new CmdSN is granted. MaxCmdSN never decreases (an
    /// initiator ignores a smaller one, section 4.2.2.1), so a grant made
    /// earlier stays valid and the window closes as ExpCmdSN catches up.
    pub fn update(&mut self, busy: u32, saturated: bool) {
        let room = if saturated {
            0
        } else {
            self.size.saturating_sub(busy)
        };
        // room = 0 gives ExpCmdSN - 1: the closed window.
        let m = self.exp_cmd_sn.wrapping_add(room).wrapping_sub(1);
        if serial::gt(m, self.max_cmd_sn) {
            self.max_cmd_sn = m;
        }
    }
}

/// Why a Data-Out does not fit the sequence (each ends the command at
/// ERL 0 with CHECK CONDITION, ABORTED COMMAND and [`DataOutError::asc`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataOutError {
    #[error("Data-Out beyond the expected data transfer length (offset {offset} + {len})")]
    BeyondEdtl { offset: u32, len: u32 },
    #[error("unsolicited Data-Out not expected")]
    UnsolicitedNotExpected,
    #[error("unsolicited Data-Out DataSN {got} (expected {expected})")]
    UnsolicitedDataSn { got: u32, expected: u32 },
    #[error("unsolicited Data-Out at offset {offset} out of order or beyond FirstBurstLength")]
    UnsolicitedOffset { offset: u32 },
    #[error("Data-Out with unknown TTT {ttt:#x}")]
    UnknownTtt { ttt: u32 },
    #[error("solicited Data-Out DataSN {got} (expected {expected})")]
    SolicitedDataSn { got: u32, expected: u32 },
    #[error("solicited Data-Out offset {offset} outside the R2T or out of order")]
    SolicitedOffset { offset: u32 },
    #[error("Data-Out sequence for R2T {ttt:#x} ended (F bit) after {got} of {wanted} bytes")]
    ShortSequence { ttt: u32, got: u32, wanted: u32 },
}

impl DataOutError {
    /// Additional sense code and qualifier (SPC-4 annex D, the 4Bh
    /// family iSCSI uses for data transfer errors).
    pub fn asc(&self) -> (u8, u8) {
        match self {
            DataOutError::UnknownTtt { .. } => (0x4b, 0x01), // INVALID TARGET PORT TRANSFER TAG RECEIVED
            DataOutError::BeyondEdtl { .. } => (0x4b, 0x02), // TOO MUCH WRITE DATA
            DataOutError::UnsolicitedOffset { .. } | DataOutError::SolicitedOffset { .. } => {
                (0x4b, 0x05) // DATA OFFSET ERROR
            }
            _ => (0x4b, 0x00), // DATA PHASE ERROR
        }
    }
}

/// One R2T to send: the caller gives it the TTT it was allocated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2tGrant {
    pub ttt: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_data_transfer_length: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpenR2t {
    ttt: u32,
    offset: u32,
    len: u32,
    got: u32,
    next_data_sn: u32,
}

/// How a write command's data was announced, from its SCSI Command PDU
/// and the session's negotiated parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStart {
    /// Expected Data Transfer Length.
    pub edtl: u32,
    /// Bytes the target wants (at most EDTL): what it solicits up to.
    pub wanted: u32,
    /// Immediate data bytes carried by the command PDU.
    pub immediate: u32,
    /// F bit of the command PDU: no unsolicited Data-Out follows.
    pub final_bit: bool,
    pub initial_r2t: bool,
    pub first_burst_length: u32,
}

/// The Data-Out / R2T state of one write command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOutSequence {
    edtl: u32,
    wanted: u32,
    /// Unsolicited Data-Out still expected (until one with F).
    unsolicited_open: bool,
    unsolicited_limit: u32,
    next_unsol_data_sn: u32,
    next_unsol_offset: u32,
    /// Next offset to solicit.
    next_r2t_offset: u32,
    next_r2t_sn: u32,
    r2ts: Vec<OpenR2t>,
    /// Bytes received in Data-Out and immediate data.
    received: u64,
}

impl DataOutSequence {
    /// Start the sequence of a write command. Fails when the immediate
    /// data exceeds EDTL or FirstBurstLength (a protocol error: reject the
    /// command PDU).
    pub fn new(s: WriteStart) -> Result<Self, DataOutError> {
        if s.immediate > s.edtl || s.immediate > s.first_burst_length {
            return Err(DataOutError::BeyondEdtl {
                offset: 0,
                len: s.immediate,
            });
        }
        let unsolicited_limit = if s.initial_r2t {
            s.immediate
        } else {
            s.edtl.min(s.first_burst_length)
        };
        let mut q = DataOutSequence {
            edtl: s.edtl,
            wanted: s.wanted.min(s.edtl),
            unsolicited_open: !s.final_bit,
            unsolicited_limit,
            next_unsol_data_sn: 0,
            next_unsol_offset: s.immediate,
            next_r2t_offset: s.immediate,
            next_r2t_sn: 0,
            r2ts: Vec::new(),
            received: u64::from(s.immediate),
        };
        if q.unsolicited_open {
            // Solicitation starts after the unsolicited burst; it moves
            // back to where the burst really ended if the initiator ends
            // it early.
            q.next_r2t_offset = unsolicited_limit;
        }
        q.next_r2t_offset = q.next_r2t_offset.min(q.edtl);
        Ok(q)
    }

    pub fn edtl(&self) -> u32 {
        self.edtl
    }

    pub fn wanted(&self) -> u32 {
        self.wanted
    }

    /// Bytes received so far (immediate and Data-Out).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Check one Data-Out (its TTT, DataSN, buffer offset, data length and
    /// F bit). On `Ok` the caller stores the data at `buffer_offset`.
    pub fn accept(
        &mut self,
        ttt: u32,
        data_sn: u32,
        buffer_offset: u32,
        len: u32,
        final_bit: bool,
    ) -> Result<(), DataOutError> {
        let end = buffer_offset.checked_add(len);
        if end.is_none_or(|e| e > self.edtl) {
            return Err(DataOutError::BeyondEdtl {
                offset: buffer_offset,
                len,
            });
        }
        if ttt == crate::pdu::RESERVED_TAG {
            if !self.unsolicited_open {
                return Err(DataOutError::UnsolicitedNotExpected);
            }
            if data_sn != self.next_unsol_data_sn {
                return Err(DataOutError::UnsolicitedDataSn {
                    got: data_sn,
                    expected: self.next_unsol_data_sn,
                });
            }
            if buffer_offset != self.next_unsol_offset
                || end.is_none_or(|e| e > self.unsolicited_limit)
            {
                return Err(DataOutError::UnsolicitedOffset {
                    offset: buffer_offset,
                });
            }
            self.next_unsol_data_sn = self.next_unsol_data_sn.wrapping_add(1);
            self.next_unsol_offset += len;
            if final_bit {
                self.unsolicited_open = false;
                // Solicit whatever the burst left out, from where it
                // ended: nothing wanted is ever left unreceived.
                self.next_r2t_offset = self.next_unsol_offset.min(self.edtl);
            }
        } else {
            let Some(i) = self.r2ts.iter().position(|r| r.ttt == ttt) else {
                return Err(DataOutError::UnknownTtt { ttt });
            };
            let r = &mut self.r2ts[i];
            if data_sn != r.next_data_sn {
                return Err(DataOutError::SolicitedDataSn {
                    got: data_sn,
                    expected: r.next_data_sn,
                });
            }
            // DataPDUInOrder=Yes: each PDU continues where the last ended.
            let r_end = r.offset + r.len;
            if buffer_offset != r.offset + r.got || end.is_none_or(|e| e > r_end) {
                return Err(DataOutError::SolicitedOffset {
                    offset: buffer_offset,
                });
            }
            r.next_data_sn = r.next_data_sn.wrapping_add(1);
            r.got += len;
            if r.got >= r.len {
                self.r2ts.swap_remove(i);
            } else if final_bit {
                // The F bit ends the sequence: what it did not deliver
                // would be a hole in the data. ERL 0 cannot ask again.
                return Err(DataOutError::ShortSequence {
                    ttt,
                    got: r.got,
                    wanted: r.len,
                });
            }
        }
        self.received += u64::from(len);
        Ok(())
    }

    /// R2Ts to send now: once unsolicited data is complete, solicit what
    /// is still wanted in bursts of at most `max_burst_length`, keeping at
    /// most `max_outstanding` open. `alloc_ttt` gives each a fresh TTT.
    pub fn solicit(
        &mut self,
        max_burst_length: u32,
        max_outstanding: u16,
        mut alloc_ttt: impl FnMut() -> u32,
    ) -> Vec<R2tGrant> {
        let max_burst = max_burst_length.max(1);
        let max_open = usize::from(max_outstanding.max(1));
        let mut out = Vec::new();
        while !self.unsolicited_open
            && self.next_r2t_offset < self.wanted
            && self.r2ts.len() < max_open
        {
            let len = (self.wanted - self.next_r2t_offset).min(max_burst);
            let g = R2tGrant {
                ttt: alloc_ttt(),
                r2t_sn: self.next_r2t_sn,
                buffer_offset: self.next_r2t_offset,
                desired_data_transfer_length: len,
            };
            self.r2ts.push(OpenR2t {
                ttt: g.ttt,
                offset: g.buffer_offset,
                len,
                got: 0,
                next_data_sn: 0,
            });
            self.next_r2t_offset += len;
            self.next_r2t_sn = self.next_r2t_sn.wrapping_add(1);
            out.push(g);
        }
        out
    }

    /// Every wanted byte is in: no unsolicited data or R2T outstanding and
    /// nothing left to solicit.
    pub fn is_complete(&self) -> bool {
        !self.unsolicited_open && self.r2ts.is_empty() && self.next_r2t_offset >= self.wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::RESERVED_TAG;

    #[test]
    fn window_admits_in_order_and_holds_gaps() {
        let mut w = CommandWindow::new(10, 4);
        assert!(w.is_closed(), "closed until the session opens it");
        assert_eq!(w.admit(10), Admission::Outside);
        w.update(0, false);
        assert_eq!((w.exp_cmd_sn(), w.max_cmd_sn()), (10, 13));
        assert_eq!(w.admit(12), Admission::Later);
        assert_eq!(w.admit(10), Admission::Now);
        assert_eq!(w.exp_cmd_sn(), 11);
        assert_eq!(w.admit(10), Admission::Outside, "duplicate");
        assert_eq!(w.admit(14), Admission::Outside, "beyond MaxCmdSN");
        assert_eq!(w.admit(11), Admission::Now);
        w.advance(); // the held 12
        assert_eq!(w.exp_cmd_sn(), 13);
    }

    #[test]
    fn a_saturated_session_closes_the_window() {
        let mut w = CommandWindow::new(1, 4);
        w.update(0, false);
        assert_eq!(w.max_cmd_sn(), 4);
        // Four commands admitted and all still busy: no new grant.
        for sn in 1..=4 {
            assert_eq!(w.admit(sn), Admission::Now);
        }
        w.update(4, false);
        assert_eq!(w.max_cmd_sn(), 4);
        assert!(w.is_closed());
        assert_eq!(
            w.admit(5),
            Admission::Outside,
            "CmdSN = ExpCmdSN but the window is closed"
        );
        // Over budget: closed even with commands done.
        w.update(0, true);
        assert!(w.is_closed());
        w.update(1, false);
        assert_eq!(w.max_cmd_sn(), 7);
        // Never decreases.
        w.update(4, false);
        assert_eq!(w.max_cmd_sn(), 7);
    }

    #[test]
    fn window_wraps() {
        let mut w = CommandWindow::new(u32::MAX, 3);
        w.update(0, false);
        assert_eq!(w.max_cmd_sn(), 1);
        assert_eq!(w.admit(0), Admission::Later);
        assert_eq!(w.admit(u32::MAX), Admission::Now);
        w.advance();
        assert_eq!(w.exp_cmd_sn(), 1);
    }

    fn start(edtl: u32, immediate: u32, final_bit: bool, initial_r2t: bool) -> DataOutSequence {
        DataOutSequence::new(WriteStart {
            edtl,
            wanted: edtl,
            immediate,
            final_bit,
            initial_r2t,
            first_burst_length: 4096,
        })
        .unwrap()
    }

    fn ttts() -> impl FnMut() -> u32 {
        let mut n = 0;
        move || {
            n += 1;
            n
        }
    }

    #[test]
    fn solicited_write_in_bursts() {
        let mut q = start(10_000, 1000, true, true);
        let g = q.solicit(4096, 1, ttts());
        assert_eq!(g.len(), 1);
        assert_eq!(
            (
                g[0].buffer_offset,
                g[0].desired_data_transfer_length,
                g[0].r2t_sn
            ),
            (1000, 4096, 0)
        );
        assert!(
            q.solicit(4096, 1, ttts()).is_empty(),
            "MaxOutstandingR2T = 1"
        );
        q.accept(g[0].ttt, 0, 1000, 2048, false).unwrap();
        assert_eq!(
            q.accept(g[0].ttt, 0, 3048, 2048, true),
            Err(DataOutError::SolicitedDataSn {
                got: 0,
                expected: 1
            })
        );
        q.accept(g[0].ttt, 1, 3048, 2048, true).unwrap();
        let mut alloc = ttts();
        let g2 = q.solicit(4096, 1, &mut alloc);
        assert_eq!(
            (
                g2[0].buffer_offset,
                g2[0].desired_data_transfer_length,
                g2[0].r2t_sn
            ),
            (5096, 4096, 1)
        );
        q.accept(g2[0].ttt, 0, 5096, 4096, true).unwrap();
        let g3 = q.solicit(4096, 1, &mut alloc);
        assert_eq!(g3[0].desired_data_transfer_length, 10_000 - 9192);
        assert!(!q.is_complete());
        q.accept(g3[0].ttt, 0, 9192, 808, true).unwrap();
        assert!(q.is_complete());
        assert_eq!(q.received(), 10_000);
    }

    #[test]
    fn a_short_solicited_sequence_fails() {
        let mut q = start(8192, 0, true, true);
        let g = q.solicit(8192, 1, ttts());
        assert_eq!(
            q.accept(g[0].ttt, 0, 0, 4096, true),
            Err(DataOutError::ShortSequence {
                ttt: g[0].ttt,
                got: 4096,
                wanted: 8192
            })
        );
    }

    #[test]
    fn unsolicited_data_checks() {
        // InitialR2T=No: up to FirstBurstLength unsolicited.
        let mut q = start(10_000, 1024, false, false);
        assert!(
            q.solicit(4096, 1, ttts()).is_empty(),
            "not before the burst ends"
        );
        assert_eq!(
            q.accept(RESERVED_TAG, 1, 1024, 1024, false),
            Err(DataOutError::UnsolicitedDataSn {
                got: 1,
                expected: 0
            })
        );
        assert_eq!(
            q.accept(RESERVED_TAG, 0, 2048, 1024, false),
            Err(DataOutError::UnsolicitedOffset { offset: 2048 })
        );
        assert_eq!(
            q.accept(RESERVED_TAG, 0, 1024, 4096, false),
            Err(DataOutError::UnsolicitedOffset { offset: 1024 }),
            "beyond FirstBurstLength"
        );
        q.accept(RESERVED_TAG, 0, 1024, 1024, true).unwrap();
        assert_eq!(
            q.accept(RESERVED_TAG, 1, 2048, 1, false),
            Err(DataOutError::UnsolicitedNotExpected)
        );
        // The burst ended early: solicitation starts where it ended.
        let g = q.solicit(1 << 20, 1, ttts());
        assert_eq!(
            (g[0].buffer_offset, g[0].desired_data_transfer_length),
            (2048, 10_000 - 2048)
        );
        assert_eq!(
            q.accept(77, 0, 2048, 10, false),
            Err(DataOutError::UnknownTtt { ttt: 77 })
        );
        assert_eq!(
            q.accept(g[0].ttt, 0, 2048, 9000, false),
            Err(DataOutError::BeyondEdtl {
                offset: 2048,
                len: 9000
            })
        );
    }

    #[test]
    fn immediate_data_over_first_burst_is_refused() {
        let r = DataOutSequence::new(WriteStart {
            edtl: 10_000,
            wanted: 10_000,
            immediate: 5000,
            final_bit: true,
            initial_r2t: true,
            first_burst_length: 4096,
        });
        assert!(r.is_err());
    }

    #[test]
    fn overflow_data_is_not_solicited() {
        // EDTL larger than the command wants: solicit only what it wants.
        let mut q = DataOutSequence::new(WriteStart {
            edtl: 8192,
            wanted: 4096,
            immediate: 0,
            final_bit: true,
            initial_r2t: true,
            first_burst_length: 4096,
        })
        .unwrap();
        let g = q.solicit(1 << 20, 1, ttts());
        assert_eq!(g[0].desired_data_transfer_length, 4096);
        q.accept(g[0].ttt, 0, 0, 4096, true).unwrap();
        assert!(q.is_complete());
    }
}
