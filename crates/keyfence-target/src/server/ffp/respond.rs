//! Executing a command and answering it: inline on the connection's task
//! or as a [`Job`] for the blocking pool, then Data-In (cut at
//! MaxRecvDataSegmentLength and MaxBurstLength, status collapsed into the
//! last PDU when it can be) or a SCSI Response with sense and residuals,
//! and the command's effects on other tasks.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use keyfence_iscsi::pdu::{DataIn, Residual, ScsiResponse, RESERVED_TAG};
use keyfence_iscsi::Lun;
use keyfence_lu::{execute_no_lu, CommandOutcome, CommandRequest, LogicalUnit, LuEffect};
use keyfence_scsi::{Nexus, ScsiStatus};

use super::{lun_eq, Session};
use crate::server::acl::LunView;
use crate::server::budget::Held;
use crate::server::metrics::{CmdKind, LuStats};
use crate::server::session::SessionCtl;

/// Commands the LU answers from memory, without touching the medium or
/// taking a lock a blocking command may hold (PERSISTENT RESERVE IN reads
/// the reservation state under the lock a PR OUT holds across its APTPL
/// fsync, so it is not one of them). Everything else runs as a [`Job`].
fn answered_from_memory(cdb: &[u8]) -> bool {
    match cdb.first().copied() {
        // TEST UNIT READY, REQUEST SENSE, INQUIRY, MODE SENSE(6),
        // PREVENT ALLOW MEDIUM REMOVAL, READ CAPACITY(10), MODE SENSE(10),
        // REPORT LUNS, MAINTENANCE IN (target port groups, supported
        // operation codes and task management functions).
        Some(0x00 | 0x03 | 0x12 | 0x1a | 0x1e | 0x25 | 0x5a | 0xa0 | 0xa3) => true,
        // SERVICE ACTION IN(16): READ CAPACITY(16) only (GET LBA STATUS
        // asks the file system for its mapping).
        Some(0x9e) => cdb.get(1).is_some_and(|sa| sa & 0x1f == 0x10),
        _ => false,
    }
}

/// Largest READ tried on the connection's task from the page cache
/// (copying more would hold up the other sessions served by the same
/// worker thread); larger ones go to the session's I/O queue.
const NOWAIT_READ_MAX_BYTES: u64 = 256 << 10;

/// READ(6), READ(10), READ(12), READ(16): commands that do not change the
/// medium or any state of the LU other than unit attentions.
fn is_read(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(0x08 | 0x28 | 0xa8 | 0x88))
}

/// The response metadata a command needs once it has executed.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub itt: u32,
    pub lun: Lun,
    pub read: bool,
    pub write: bool,
    pub edtl: u32,
    /// Bytes of data-out the CDB transfers (None: the CDB does not
    /// decode; reads: None).
    pub wanted_out: Option<u32>,
    /// What the command is counted as.
    pub kind: CmdKind,
    /// Its LU's counters and when it arrived (None: no LU, or nothing
    /// is counted).
    pub counted: Option<Counted>,
}

/// A command counted in its LU's metrics ([`Session::count`]).
#[derive(Debug, Clone)]
pub(crate) struct Counted {
    pub stats: Arc<LuStats>,
    /// When the socket read that brought the command returned: the
    /// session's latest read when the command started, so at or after
    /// its arrival and never after its start. Reusing the time the
    /// connection took for that read saves a clock read per command.
    pub since: Instant,
}

/// A command handed out as a [`Job`].
#[derive(Debug)]
pub(super) struct InFlight {
    pub lun: Lun,
    pub aborted: bool,
    /// A READ (see [`is_read`]): a later READ may overtake it.
    pub read: bool,
    /// Data-in the job may return (counted in the session's read budget).
    pub read_bytes: u64,
    /// Its place in the server's budget (reads), kept until its data-in
    /// has been sent.
    pub read_held: Option<Held>,
}

/// Work to run off the connection's task (it may block): a command, or
/// the LU side of a reset task management function (it takes the LUs'
/// reservation locks, which a PR OUT may hold across an fsync).
pub(crate) enum Job {
    Command(CommandJob),
    Reset(ResetJob),
}

/// A command to execute off the connection's task.
pub(crate) struct CommandJob {
    meta: Meta,
    lu: Arc<LogicalUnit>,
    nexus: Nexus,
    /// The initiator's LUN mapping, for REPORT LUNS.
    view: Option<Arc<LunView>>,
    read_only: bool,
    cdb: Bytes,
    data_out: Bytes,
    /// The write data's place in the server's budget, until it is written.
    held: Option<Held>,
}

/// LOGICAL UNIT RESET or TARGET WARM/COLD RESET applied to LUs.
pub(crate) struct ResetJob {
    /// The task management request, answered once the reset is done.
    pub tmf_itt: u32,
    pub lus: Vec<Arc<LogicalUnit>>,
    /// None: logical unit reset; Some(cold): target reset.
    pub target_reset: Option<bool>,
}

impl Job {
    /// Run it (blocking).
    pub fn run(self) -> Completion {
        match self {
            Job::Command(c) => Completion::Command(c.run()),
            Job::Reset(r) => {
                for lu in &r.lus {
                    match r.target_reset {
                        None => lu.lu_reset(),
                        Some(cold) => lu.target_reset(cold),
                    }
                }
                Completion::Reset { tmf_itt: r.tmf_itt }
            }
        }
    }
}

impl CommandJob {
    /// Execute the command (blocking).
    fn run(self) -> CommandDone {
        let req = CommandRequest {
            nexus: &self.nexus,
            cdb: &self.cdb,
            data_out: &self.data_out,
            read_only: self.read_only,
            luns: self.view.as_deref().map(LunView::luns),
        };
        let outcome = self.lu.execute(&req);
        drop(self.held);
        CommandDone {
            meta: self.meta,
            outcome,
        }
    }
}

/// The result of a [`Job`].
pub(crate) enum Completion {
    Command(CommandDone),
    Reset { tmf_itt: u32 },
}

/// An executed [`CommandJob`].
pub(crate) struct CommandDone {
    meta: Meta,
    outcome: CommandOutcome,
}

impl Session {
    /// Run a command whose data-out (if any) is in. `held`: the write
    /// data's place in the server's budget, or for a read the place of
    /// its data-in.
    pub(super) fn execute(
        &mut self,
        meta: Meta,
        lu: Option<Arc<LogicalUnit>>,
        cdb: &[u8],
        data_out: Bytes,
        held: Option<Held>,
    ) {
        let Some(nexus) = self.nexus.clone() else {
            return;
        };
        let (held, read_held) = if meta.read && !meta.write {
            (None, held)
        } else {
            (held, None)
        };
        let Some(lu) = lu else {
            let rt = self.rt.clone();
            let none = keyfence_lu::TargetLuns::new(Vec::new());
            let req = CommandRequest {
                nexus: &nexus,
                cdb,
                data_out: &data_out,
                read_only: false,
                luns: None,
            };
            let luns = match (self.view.as_deref(), rt.as_deref()) {
                (Some(v), _) => v.luns(),
                (None, Some(t)) => &*t.lun_list,
                (None, None) => &none,
            };
            let outcome = execute_no_lu(&req, luns);
            self.respond(&meta, outcome);
            if let Some(h) = read_held {
                self.hold_until_sent(h);
            }
            return;
        };
        // Every command that touches the medium or may block (flushes,
        // FUA, reservation changes) runs off the connection's task, on the
        // session's I/O queue; only commands answered from memory (or
        // from the page cache, below) run here.
        let read_only = self.read_only_view(meta.lun);
        // A READ whose data is all in the page cache is answered here
        // without waiting, unless this session has a command other than a
        // READ queued or running (a write it must not overtake, or a
        // reservation change), or a reset that has not been applied.
        if is_read(cdb) && self.resets_running == 0 && !self.non_read_in_flight() {
            let req = CommandRequest {
                nexus: &nexus,
                cdb,
                data_out: &data_out,
                read_only,
                luns: self.view.as_deref().map(LunView::luns),
            };
            if let Some(outcome) = lu.try_read_nowait(&req, NOWAIT_READ_MAX_BYTES) {
                self.respond(&meta, outcome);
                if let Some(h) = read_held {
                    self.hold_until_sent(h);
                }
                return;
            }
        }
        if !answered_from_memory(cdb) || lu.is_blocking(cdb) {
            let read_bytes = if meta.read { u64::from(meta.edtl) } else { 0 };
            self.read_job_bytes += read_bytes;
            self.in_flight.insert(
                meta.itt,
                InFlight {
                    lun: meta.lun,
                    aborted: false,
                    read: is_read(cdb),
                    read_bytes,
                    read_held,
                },
            );
            self.jobs.push(Job::Command(CommandJob {
                meta,
                lu,
                nexus,
                view: self.view.clone(),
                read_only,
                cdb: Bytes::copy_from_slice(cdb),
                data_out,
                held,
            }));
            return;
        }
        let req = CommandRequest {
            nexus: &nexus,
            cdb,
            data_out: &data_out,
            read_only,
            luns: self.view.as_deref().map(LunView::luns),
        };
        let outcome = lu.execute(&req);
        drop(held);
        self.respond(&meta, outcome);
        if let Some(h) = read_held {
            self.hold_until_sent(h);
        }
    }

    /// Is a command other than a READ queued or running (on any LU: two
    /// LUN numbers of an ACL view may name one LU)?
    fn non_read_in_flight(&self) -> bool {
        self.in_flight.values().any(|f| !f.read)
    }

    /// A [`Job`] finished.
    pub fn complete(&mut self, c: Completion) {
        let c = match c {
            Completion::Command(c) => c,
            Completion::Reset { tmf_itt } => {
                self.resets_running -= 1;
                self.finish_tmfs(tmf_itt);
                self.release_deferred();
                self.update_window();
                return;
            }
        };
        let (aborted, read_held) = match self.in_flight.remove(&c.meta.itt) {
            Some(f) => {
                self.read_job_bytes -= f.read_bytes;
                (f.aborted, f.read_held)
            }
            None => (true, None),
        };
        if !aborted {
            self.respond(&c.meta, c.outcome);
            if let Some(h) = read_held {
                self.hold_until_sent(h);
            }
        }
        self.finish_tmfs(c.meta.itt);
        self.release_deferred();
        self.update_window();
    }

    /// Send Data-In and status for an executed command and carry out its
    /// effects.
    pub(super) fn respond(&mut self, meta: &Meta, outcome: CommandOutcome) {
        for e in &outcome.effects {
            self.apply_effect(meta, e);
        }
        let data = &outcome.data_in;
        let status = outcome.status as u8;
        // Residuals (RFC 7143 11.4.5): against what the command wanted to
        // transfer in the direction the initiator announced.
        let (send, residual) = if meta.write {
            let wanted = meta.wanted_out.unwrap_or(0);
            (Bytes::new(), Residual::from_lengths(meta.edtl, wanted))
        } else if meta.read {
            let dlen = u32::try_from(data.len()).unwrap_or(u32::MAX);
            let n = dlen.min(meta.edtl);
            (
                data.slice(..n as usize),
                Residual::from_lengths(meta.edtl, dlen),
            )
        } else if let Some(wanted) = meta.wanted_out.filter(|w| *w > 0) {
            // A command with data-out sent without the W bit: nothing was
            // transferred of what it wanted (overflow against EDTL 0).
            (Bytes::new(), Residual::from_lengths(meta.edtl, wanted))
        } else {
            let dlen = u32::try_from(data.len()).unwrap_or(u32::MAX);
            (Bytes::new(), Residual::from_lengths(meta.edtl, dlen))
        };
        if let Some(c) = &meta.counted {
            self.count(c, meta, outcome.status, send.len());
        }
        let collapse = outcome.sense.is_none()
            && !send.is_empty()
            && matches!(outcome.status, ScsiStatus::Good | ScsiStatus::ConditionMet);
        if !send.is_empty() {
            let seg = self.params.max_send_data_segment_length.max(512) as usize;
            let burst = self.params.max_burst_length.max(512) as usize;
            let total = send.len();
            let mut off = 0usize;
            let mut data_sn = 0u32;
            while off < total {
                let burst_end = (off / burst + 1) * burst;
                let n = seg.min(total - off).min(burst_end - off);
                let last = off + n == total;
                let final_bit = last || off + n == burst_end;
                let with_status = last && collapse;
                let d = DataIn {
                    final_bit,
                    ack: false,
                    status: with_status.then_some(status),
                    residual: if with_status {
                        residual
                    } else {
                        Residual::None
                    },
                    lun: meta.lun,
                    itt: meta.itt,
                    ttt: RESERVED_TAG,
                    stat_sn: if with_status { self.next_stat_sn() } else { 0 },
                    exp_cmd_sn: self.window.exp_cmd_sn(),
                    max_cmd_sn: self.window.max_cmd_sn(),
                    data_sn,
                    buffer_offset: off as u32,
                    data: send.slice(off..off + n),
                };
                self.advertised_max = self.window.max_cmd_sn();
                self.out.push(&self.codec, &d.header(), &d.data);
                off += n;
                data_sn = data_sn.wrapping_add(1);
            }
            if collapse {
                return;
            }
        }
        // The LU knows the sense format its control mode page asks for.
        let sense = match (&outcome.sense, self.lu_for(meta.lun)) {
            (Some(s), Some(lu)) => lu.sense_bytes(s),
            (Some(s), None) => Bytes::copy_from_slice(&s.to_fixed()),
            (None, _) => Bytes::new(),
        };
        let r = ScsiResponse {
            response: 0,
            status,
            residual,
            bidi_read_residual: Residual::None,
            itt: meta.itt,
            snack_tag: 0,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            exp_data_sn: 0,
            sense,
            response_data: Bytes::new(),
        };
        self.push_pdu(&r.to_pdu());
    }

    /// Count a finished command in its LU's metrics (`sent`: data-in
    /// bytes going to the initiator).
    /// (The number of READs and of WRITEs is their latency histogram's
    /// count: one atomic addition fewer per command.)
    fn count(&self, c: &Counted, meta: &Meta, status: ScsiStatus, sent: usize) {
        let st = &*c.stats;
        match meta.kind {
            CmdKind::Read => {
                st.read_bytes.fetch_add(sent as u64, Relaxed);
                st.read_latency.observe(c.since.elapsed());
            }
            CmdKind::Write => {
                if status == ScsiStatus::Good {
                    let n = meta.edtl.min(meta.wanted_out.unwrap_or(0));
                    st.write_bytes.fetch_add(u64::from(n), Relaxed);
                }
                st.write_latency.observe(c.since.elapsed());
            }
            CmdKind::PrOut(sa) => {
                if let (Some(t), Some(lun)) = (self.rt.clone(), self.target_lun(meta.lun)) {
                    let result = match status {
                        ScsiStatus::Good => "good",
                        ScsiStatus::ReservationConflict => "reservation_conflict",
                        ScsiStatus::CheckCondition => "check_condition",
                        _ => "other",
                    };
                    let name = &t.name;
                    self.shared.metrics.pr_out(name, lun, sa, result);
                }
            }
            CmdKind::Other => {}
        }
        if status == ScsiStatus::ReservationConflict {
            st.reservation_conflicts.fetch_add(1, Relaxed);
        }
        if status == ScsiStatus::TaskSetFull {
            self.shared.metrics.task_set_full.inc();
        }
    }

    fn apply_effect(&mut self, meta: &Meta, e: &LuEffect) {
        // PREEMPT AND ABORT: the preempted nexus loses its tasks on this LU.
        let LuEffect::AbortTasks { nexus } = e;
        let lun = meta.lun;
        if self.nexus.as_ref() == Some(nexus) {
            let itt = meta.itt;
            self.abort_where(|i, l| i != itt && lun_eq(l, lun));
        }
        if let Some(n) = self.target_lun(lun) {
            self.shared.sessions().send_to_nexus(
                nexus,
                Some(self.tsih),
                SessionCtl::AbortTasks { lun: Some(n) },
            );
        }
    }
}
