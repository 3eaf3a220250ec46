//! Task management: ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL
//! UNIT RESET, TARGET WARM/COLD RESET, and aborting this session's tasks
//! when another session's command or TMF requires it. A TMF answers once
//! the tasks it aborted that are still running as jobs have finished.

use std::sync::Arc;

use keyfence_iscsi::pdu::{TaskMgmtRequest, TaskMgmtResponse, TmfFunction, TmfResponse};
use keyfence_iscsi::{serial, Lun, Opcode};
use keyfence_scsi::sense::asc;
use tracing::debug;

use super::ConnEnd;
use super::{lun_eq, Job, ResetJob, Session};
use crate::server::session::SessionCtl;

/// A TMF waiting for the tasks it aborted to finish.
#[derive(Debug)]
pub(super) struct PendingTmf {
    itt: u32,
    function: TmfFunction,
    waiting: Vec<u32>,
    after: TmfAfter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TmfAfter {
    Nothing,
    CloseAll,
}

impl Session {
    // ------------------------------------------------------------- aborts

    /// Abort (silently) the tasks of this session matching `f(itt, lun)`.
    /// Returns the ITTs still running on the blocking pool.
    pub(super) fn abort_where(&mut self, f: impl Fn(u32, Lun) -> bool) -> Vec<u32> {
        self.writes.retain(|itt, t| !f(*itt, t.lun));
        self.deferred.retain(|c| !f(c.itt, c.lun));
        let mut running = Vec::new();
        for (itt, fl) in self.in_flight.iter_mut() {
            if f(*itt, fl.lun) {
                fl.aborted = true;
                running.push(*itt);
            }
        }
        // Queued commands not yet started are aborted too; their CmdSN
        // stays taken, so that the commands after them still run when
        // the gap before them fills.
        for q in self.queued.values_mut() {
            let p = &q.pdu;
            if p.opcode_raw() == Opcode::ScsiCommand as u8 && f(p.itt(), p.lun()) {
                q.abort();
            }
        }
        running
    }

    pub(super) fn abort_matching(&mut self, lun_pred: impl Fn(Lun) -> bool) {
        self.abort_where(|_, l| lun_pred(l));
        self.release_deferred();
        self.update_window();
    }

    pub(super) fn finish_tmfs(&mut self, itt: u32) {
        let mut ready = Vec::new();
        for p in &mut self.pending_tmfs {
            p.waiting.retain(|x| *x != itt);
        }
        self.pending_tmfs.retain(|p| {
            if p.waiting.is_empty() {
                ready.push((p.itt, p.function, p.after));
                false
            } else {
                true
            }
        });
        for (tmf_itt, function, after) in ready {
            self.tmf_response(tmf_itt, function, TmfResponse::FunctionComplete);
            if after == TmfAfter::CloseAll {
                self.close_all_after_flush = true;
            }
        }
    }

    fn tmf_response(&mut self, itt: u32, function: TmfFunction, response: TmfResponse) {
        self.shared
            .metrics
            .tmf(tmf_function_label(function), tmf_response_label(response));
        let r = TaskMgmtResponse {
            response,
            itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
        };
        self.push_pdu(&r.to_pdu());
    }

    pub(super) fn task_mgmt(&mut self, t: TaskMgmtRequest) {
        let Some(target) = self.target else { return };
        let lu = self.lu_for(t.lun);
        // The target's LUN id, which other sessions may know by another
        // number (ACL mapping).
        let lun_n = self.target_lun(t.lun);
        debug!(peer = %self.peer, function = ?t.function, lun = ?lun_n, "task management");
        let mut after = TmfAfter::Nothing;
        let running = match t.function {
            TmfFunction::AbortTask => {
                let rtt = t.referenced_task_tag;
                let known = self.writes.get(&rtt).is_some_and(|w| lun_eq(w.lun, t.lun))
                    || self
                        .in_flight
                        .get(&rtt)
                        .is_some_and(|f| lun_eq(f.lun, t.lun) && !f.aborted)
                    || self
                        .queued
                        .values()
                        .any(|q| !q.aborted && q.pdu.itt() == rtt)
                    || self
                        .deferred
                        .iter()
                        .any(|c| c.itt == rtt && lun_eq(c.lun, t.lun));
                if !known {
                    // Not found. If its CmdSN is in the window but has not
                    // arrived, RFC 7143 11.5.1 says "function complete".
                    let pending = serial::in_window(
                        t.ref_cmd_sn,
                        self.window.exp_cmd_sn(),
                        self.window.max_cmd_sn(),
                    );
                    let resp = if pending {
                        TmfResponse::FunctionComplete
                    } else {
                        TmfResponse::TaskDoesNotExist
                    };
                    self.tmf_response(t.itt, t.function, resp);
                    return;
                }
                self.abort_where(|i, _| i == rtt)
            }
            TmfFunction::AbortTaskSet | TmfFunction::ClearTaskSet => {
                if lu.is_none() {
                    self.tmf_response(t.itt, t.function, TmfResponse::LunDoesNotExist);
                    return;
                }
                let lun = t.lun;
                let r = self.abort_where(|_, l| lun_eq(l, lun));
                if t.function == TmfFunction::ClearTaskSet {
                    if let (Some(n), Some(lu), Some(nexus)) = (lun_n, &lu, &self.nexus) {
                        self.shared.sessions().broadcast_target(
                            target,
                            Some(self.tsih),
                            SessionCtl::AbortTasks { lun: Some(n) },
                        );
                        lu.queue_unit_attention(
                            keyfence_lu::UaScope::AllExcept(nexus),
                            asc::COMMANDS_CLEARED_BY_ANOTHER_INITIATOR,
                        );
                    }
                }
                r
            }
            TmfFunction::LogicalUnitReset => {
                let (Some(lu), Some(n)) = (&lu, lun_n) else {
                    self.tmf_response(t.itt, t.function, TmfResponse::LunDoesNotExist);
                    return;
                };
                let lun = t.lun;
                let mut r = self.abort_where(|_, l| lun_eq(l, lun));
                self.shared.sessions().broadcast_target(
                    target,
                    Some(self.tsih),
                    SessionCtl::AbortTasks { lun: Some(n) },
                );
                // The response waits for the reset, done off this task.
                r.push(self.reset_job(t.itt, vec![lu.clone()], None));
                r
            }
            TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
                let cold = t.function == TmfFunction::TargetColdReset;
                let mut r = self.abort_where(|_, _| true);
                self.shared.sessions().broadcast_target(
                    target,
                    Some(self.tsih),
                    SessionCtl::AbortTasks { lun: None },
                );
                let lus = self
                    .rt
                    .iter()
                    .flat_map(|t| t.luns.values())
                    .cloned()
                    .collect();
                r.push(self.reset_job(t.itt, lus, Some(cold)));
                if cold {
                    after = TmfAfter::CloseAll;
                }
                r
            }
            TmfFunction::TaskReassign => {
                self.tmf_response(t.itt, t.function, TmfResponse::ReassignmentNotSupported);
                return;
            }
            TmfFunction::ClearAca => {
                self.tmf_response(t.itt, t.function, TmfResponse::FunctionNotSupported);
                return;
            }
        };
        self.release_deferred();
        self.update_window();
        if running.is_empty() {
            self.tmf_response(t.itt, t.function, TmfResponse::FunctionComplete);
            if after == TmfAfter::CloseAll {
                self.close_all_after_flush = true;
            }
        } else {
            self.pending_tmfs.push(PendingTmf {
                itt: t.itt,
                function: t.function,
                waiting: running,
                after,
            });
        }
    }

    /// Hand out the LU side of a reset as a job (it takes reservation
    /// locks a PR OUT may hold across an fsync); returns the TMF's ITT,
    /// which the response waits for.
    fn reset_job(
        &mut self,
        tmf_itt: u32,
        lus: Vec<Arc<keyfence_lu::LogicalUnit>>,
        target_reset: Option<bool>,
    ) -> u32 {
        self.resets_running += 1;
        self.jobs.push(Job::Reset(ResetJob {
            tmf_itt,
            lus,
            target_reset,
        }));
        tmf_itt
    }

    /// TARGET COLD RESET: every session of the target is dropped, this one
    /// after its response has been sent.
    pub(super) fn cold_reset_close(&mut self) {
        if let Some(t) = self.target {
            self.shared
                .sessions()
                .broadcast_target(t, Some(self.tsih), SessionCtl::Close);
        }
        self.closing = Some(ConnEnd::Closed("TARGET COLD RESET"));
    }
}

/// The `function` label of `keyfence_task_management_total`.
fn tmf_function_label(f: TmfFunction) -> &'static str {
    match f {
        TmfFunction::AbortTask => "abort_task",
        TmfFunction::AbortTaskSet => "abort_task_set",
        TmfFunction::ClearAca => "clear_aca",
        TmfFunction::ClearTaskSet => "clear_task_set",
        TmfFunction::LogicalUnitReset => "logical_unit_reset",
        TmfFunction::TargetWarmReset => "target_warm_reset",
        TmfFunction::TargetColdReset => "target_cold_reset",
        TmfFunction::TaskReassign => "task_reassign",
    }
}

/// The `response` label of `keyfence_task_management_total`.
fn tmf_response_label(r: TmfResponse) -> &'static str {
    match r {
        TmfResponse::FunctionComplete => "function_complete",
        TmfResponse::TaskDoesNotExist => "task_does_not_exist",
        TmfResponse::LunDoesNotExist => "lun_does_not_exist",
        TmfResponse::TaskStillAllegiant => "task_still_allegiant",
        TmfResponse::ReassignmentNotSupported => "reassignment_not_supported",
        TmfResponse::FunctionNotSupported => "function_not_supported",
        TmfResponse::AuthorizationFailed => "authorization_failed",
        TmfResponse::Rejected => "rejected",
        TmfResponse::Other(_) => "other",
    }
}
