//! The write path: starting SCSI commands (task attributes), collecting
//! their data-out (immediate data, unsolicited Data-Out, R2T and solicited
//! Data-Out) under [`DataOutSequence`], and handing the command to
//! [`super::respond`] once its data is in.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::pdu::{DataOut, R2t, ScsiCommand, TaskAttr};
use keyfence_iscsi::sequencing::{DataOutSequence, WriteStart};
use keyfence_iscsi::{Lun, Opcode, Pdu, RejectReason};
use keyfence_lu::{CommandOutcome, LogicalUnit};
use keyfence_scsi::sense::{asc, Asc};
use keyfence_scsi::{ScsiStatus, Sense, SenseKey};
use tracing::debug;

use super::respond::{Counted, Meta};
use super::{Session, SESSION_WRITE_BUDGET};
use crate::server::budget::Held;
use crate::server::metrics::CmdKind;

/// Largest data-out one command may transfer (the transport buffers it
/// whole before the LU executes it).
const MAX_WRITE_BYTES: u32 = 64 << 20;

/// A command collecting Data-Out before it can run.
#[derive(Debug)]
pub(super) struct WriteTask {
    pub lun: Lun,
    lu: Option<Arc<LogicalUnit>>,
    cdb: Bytes,
    /// Response metadata once the command has run.
    meta: Meta,
    seq: DataOutSequence,
    /// Bytes we store and hand to the LU: min(EDTL, wanted).
    collect: u32,
    buf: BytesMut,
    /// `collect` bytes counted against the server's write budget.
    held: Held,
    /// When the command or its last Data-Out arrived.
    last: Instant,
}

impl WriteTask {
    pub fn held_bytes(&self) -> u64 {
        u64::from(self.collect)
    }

    pub fn last_activity(&self) -> Instant {
        self.last
    }

    /// Store data at `offset`, keeping only the first `collect` bytes.
    /// The sequence checks put every byte in order within a burst; bursts
    /// solicited together (MaxOutstandingR2T > 1) may arrive out of order,
    /// and the space between is filled when the earlier burst arrives (the
    /// task only completes once every burst is complete).
    fn store(&mut self, offset: u32, data: &[u8]) {
        let start = offset as usize;
        let end = (offset as usize + data.len()).min(self.collect as usize);
        if start >= end {
            return;
        }
        if start > self.buf.len() {
            self.buf.resize(start, 0);
        }
        let src = &data[..end - start];
        let overlap_end = end.min(self.buf.len());
        self.buf[start..overlap_end].copy_from_slice(&src[..overlap_end - start]);
        if end > overlap_end {
            self.buf.extend_from_slice(&src[overlap_end - start..]);
        }
    }
}

impl Session {
    /// Start a command now or hold it back for task ordering.
    pub(super) fn submit(&mut self, cmd: ScsiCommand) {
        if cmd.immediate && self.busy() >= self.window.size() {
            // Immediate commands bypass the CmdSN window; they must not
            // bypass the resource limit too.
            let pdu = cmd.to_pdu();
            self.reject(RejectReason::ImmediateCommandReject, &pdu.bhs);
            return;
        }
        let wait = match cmd.attr {
            TaskAttr::HeadOfQueue => false,
            TaskAttr::Ordered => {
                !self.deferred.is_empty()
                    || self.ordered_running.is_some()
                    || !self.writes.is_empty()
                    || !self.in_flight.is_empty()
            }
            _ => !self.deferred.is_empty() || self.ordered_running.is_some(),
        };
        if wait {
            self.deferred.push_back(cmd);
            return;
        }
        // A read waits while the session's unsent data-in is at its budget
        // or the server's buffers are in use.
        match self.read_admission(&cmd) {
            Some(held) => self.start(cmd, held),
            None => self.deferred.push_back(cmd),
        }
    }

    /// [`Session::admit_read`] for reads; other commands start at once.
    fn read_admission(&mut self, cmd: &ScsiCommand) -> Option<Option<Held>> {
        if cmd.read && !cmd.write {
            self.admit_read(cmd.expected_data_transfer_length)
        } else {
            Some(None)
        }
    }

    /// `read_held`: a read's place in the server's budget.
    fn start(&mut self, cmd: ScsiCommand, read_held: Option<Held>) {
        let ordered = cmd.attr == TaskAttr::Ordered;
        let itt = cmd.itt;
        self.scsi_command(cmd, read_held);
        if ordered && (self.writes.contains_key(&itt) || self.in_flight.contains_key(&itt)) {
            self.ordered_running = Some(itt);
        }
    }

    /// Start held-back commands whose turn has come.
    pub(super) fn release_deferred(&mut self) {
        if let Some(itt) = self.ordered_running {
            if self.writes.contains_key(&itt) || self.in_flight.contains_key(&itt) {
                return;
            }
            self.ordered_running = None;
        }
        while let Some(front) = self.deferred.front() {
            if self.ordered_running.is_some() {
                break;
            }
            if front.attr == TaskAttr::Ordered
                && !(self.writes.is_empty() && self.in_flight.is_empty())
            {
                break;
            }
            let (read, edtl) = (
                front.read && !front.write,
                front.expected_data_transfer_length,
            );
            let held = if read {
                match self.admit_read(edtl) {
                    Some(h) => h,
                    None => break,
                }
            } else {
                None
            };
            let Some(cmd) = self.deferred.pop_front() else {
                break;
            };
            self.start(cmd, held);
        }
    }

    fn scsi_command(&mut self, cmd: ScsiCommand, read_held: Option<Held>) {
        if self.writes.contains_key(&cmd.itt) || self.in_flight.contains_key(&cmd.itt) {
            // ITT in use: a protocol error we answer like LIO does.
            let pdu = cmd.to_pdu();
            self.reject(RejectReason::TaskInProgress, &pdu.bhs);
            return;
        }
        let (lu, stats) = self.lu_and_stats(cmd.lun);
        let counted = stats.map(|stats| Counted {
            stats,
            since: self.last_rx,
        });
        let cdb = cmd.cdb.as_slice();
        let edtl = cmd.expected_data_transfer_length;
        // What the CDB transfers out, for writes and for commands sent
        // with neither R nor W (whose residual must still say that data
        // it wanted was not transferred).
        let wanted_out: Option<u32> = match &lu {
            Some(lu) if cmd.write || !cmd.read => lu
                .data_out_len(cdb)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            None if cmd.write => Some(0),
            _ => None,
        };
        let meta = Meta {
            itt: cmd.itt,
            lun: cmd.lun,
            read: cmd.read,
            write: cmd.write,
            edtl,
            wanted_out,
            kind: CmdKind::of(cdb),
            counted,
        };
        if !cmd.write {
            let cdb = cmd.cdb;
            self.execute(meta, lu, cdb.as_slice(), Bytes::new(), read_held);
            return;
        }
        let wanted = wanted_out.unwrap_or(0);
        let collect = edtl.min(wanted);
        if collect > MAX_WRITE_BYTES {
            // More than the Block Limits we can buffer for one command.
            let field = match cdb.first() {
                Some(0x2a | 0x2e | 0x8a | 0x8e | 0xaa | 0xae) => {
                    Sense::invalid_cdb_field(transfer_length_byte(cdb), None)
                }
                _ => Sense::illegal_request(asc::INVALID_FIELD_IN_CDB),
            };
            self.respond(&meta, CommandOutcome::check_condition(field));
            return;
        }
        let only = self.writes.is_empty();
        let held = (only || self.write_bytes() + u64::from(collect) <= SESSION_WRITE_BUDGET)
            .then(|| self.shared.buffers.try_take(u64::from(collect)))
            .flatten();
        let Some(held) = held else {
            // Too much write data already buffered for this session or the
            // server: the initiator retries when earlier writes complete.
            self.respond(&meta, CommandOutcome::with_status(ScsiStatus::TaskSetFull));
            return;
        };
        let imm = cmd.data.len() as u32;
        let seq = match DataOutSequence::new(WriteStart {
            edtl,
            wanted: collect,
            immediate: imm,
            final_bit: cmd.final_bit,
            initial_r2t: self.params.initial_r2t,
            first_burst_length: self.params.first_burst_length,
        }) {
            Ok(s) => s,
            Err(_) => {
                // Immediate data beyond EDTL or FirstBurstLength.
                let pdu = cmd.to_pdu();
                self.reject(RejectReason::ProtocolError, &pdu.bhs);
                return;
            }
        };
        // COMPARE AND WRITE and WRITE SAME need exactly the data-out their
        // CDB implies; any other expected length fails the command. (Data
        // still on its way for a command answered early arrives for an
        // ITT we no longer know and is dropped.)
        if let Some(lu) = &lu {
            if let Err(sense) = lu.check_data_out_length(cdb, u64::from(edtl)) {
                self.respond(&meta, CommandOutcome::check_condition(sense));
                return;
            }
        }
        // Data the CDB does not want, or EDTL not a whole number of what
        // the command transfers, cannot be executed faithfully.
        if wanted > edtl && edtl > 0 && wanted_out.is_some() {
            if let Some(lu) = &lu {
                let bs = lu.config().block_size;
                if is_block_transfer(cdb) && !edtl.is_multiple_of(bs) {
                    let outcome =
                        CommandOutcome::check_condition(Sense::illegal_request(Asc(0x0e, 0x03)));
                    self.respond(&meta, outcome);
                    return;
                }
            }
        }
        if cmd.final_bit && imm >= collect {
            // Everything came as immediate data: run it now, without
            // copying the data.
            let data = cmd.data.slice(..collect as usize);
            self.execute(meta, lu, cdb, data, None);
            return;
        }
        let mut buf = BytesMut::with_capacity(collect as usize);
        let take = imm.min(collect) as usize;
        buf.extend_from_slice(&cmd.data[..take]);
        let itt = cmd.itt;
        let task = WriteTask {
            lun: cmd.lun,
            lu,
            cdb: Bytes::copy_from_slice(cdb),
            meta,
            seq,
            collect,
            buf,
            held,
            last: self.last_rx,
        };
        self.writes.insert(itt, task);
        self.advance_write(itt);
    }

    /// Issue R2Ts, or execute once all data is in.
    fn advance_write(&mut self, itt: u32) {
        let max_burst = self.params.max_burst_length;
        let max_r2t = self.params.max_outstanding_r2t;
        let Some(t) = self.writes.get_mut(&itt) else {
            return;
        };
        let next_ttt = &mut self.next_ttt;
        let grants = t
            .seq
            .solicit(max_burst, max_r2t, || Session::alloc_ttt(next_ttt));
        let lun = t.lun;
        let done = t.seq.is_complete();
        for g in grants {
            let r2t = R2t {
                lun,
                itt,
                ttt: g.ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.window.exp_cmd_sn(),
                max_cmd_sn: self.window.max_cmd_sn(),
                r2t_sn: g.r2t_sn,
                buffer_offset: g.buffer_offset,
                desired_data_transfer_length: g.desired_data_transfer_length,
            };
            self.push_pdu(&r2t.to_pdu());
        }
        if done {
            if let Some(t) = self.writes.remove(&itt) {
                // The data and its place in the budget move to the command.
                let WriteTask {
                    meta,
                    lu,
                    cdb,
                    buf,
                    held,
                    ..
                } = t;
                self.execute(meta, lu, &cdb, buf.freeze(), Some(held));
            }
        }
    }

    pub(super) fn data_out(&mut self, d: DataOut) {
        let Some(t) = self.writes.get_mut(&d.itt) else {
            // Data for a task that was answered early or aborted.
            debug!(peer = %self.peer, itt = d.itt, "Data-Out for no active task; dropped");
            return;
        };
        let len = d.data.len() as u32;
        if let Err(e) = t
            .seq
            .accept(d.ttt, d.data_sn, d.buffer_offset, len, d.final_bit)
        {
            // ERL 0 has no within-command recovery: the command ends with
            // CHECK CONDITION, ABORTED COMMAND; Data-Out still on its way
            // for it is dropped.
            debug!(peer = %self.peer, itt = d.itt, "{e}");
            let (a, q) = e.asc();
            if let Some(t) = self.writes.remove(&d.itt) {
                let sense = Sense::new(SenseKey::AbortedCommand, Asc(a, q));
                self.respond(&t.meta, CommandOutcome::check_condition(sense));
            }
            self.release_deferred();
            self.update_window();
            return;
        }
        t.store(d.buffer_offset, &d.data);
        t.last = self.last_rx;
        self.advance_write(d.itt);
        if self.ordered_running.is_some() || !self.deferred.is_empty() {
            self.release_deferred();
        }
    }
}

impl Session {
    /// A command whose immediate data did not fit the write budgets when
    /// it arrived ahead of ExpCmdSN: TASK SET FULL, the initiator retries.
    pub(super) fn refuse_over_budget(&mut self, pdu: &Pdu) {
        if pdu.opcode_raw() != Opcode::ScsiCommand as u8 {
            return;
        }
        let Ok(cmd) = ScsiCommand::parse(pdu) else {
            self.reject(RejectReason::InvalidPduField, &pdu.bhs);
            return;
        };
        let meta = Meta {
            itt: cmd.itt,
            lun: cmd.lun,
            read: cmd.read,
            write: false,
            edtl: cmd.expected_data_transfer_length,
            wanted_out: None,
            kind: CmdKind::Other,
            counted: None,
        };
        self.shared.metrics.task_set_full.inc();
        self.respond(&meta, CommandOutcome::with_status(ScsiStatus::TaskSetFull));
    }
}

/// Offset of the TRANSFER LENGTH field of a WRITE / WRITE AND VERIFY CDB.
fn transfer_length_byte(cdb: &[u8]) -> u16 {
    match cdb.first() {
        Some(0xaa | 0xae) => 6,
        Some(0x8a | 0x8e) => 10,
        _ => 7,
    }
}

/// READ/WRITE-family CDBs whose transfer is counted in logical blocks.
fn is_block_transfer(cdb: &[u8]) -> bool {
    matches!(
        cdb.first(),
        Some(0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x93 | 0x41 | 0x89 | 0x8b)
    )
}
