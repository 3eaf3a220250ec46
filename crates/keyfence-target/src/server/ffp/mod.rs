//! A session in full feature phase, without sockets or tasks: PDUs (as
//! bytes) go in, encoded PDUs come out of its [`Outbox`], and commands
//! that must not run on the connection's task come out as [`Job`]s whose
//! [`Completion`]s are fed back. The connection task
//! ([`super::conn`]) drives it with a socket, the blocking pool and
//! timers; tests and the fuzzer ([`super::harness`]) drive it in memory.
//!
//! RFC 7143 rules with no state of ours beyond numbers (the command
//! window, Data-Out / R2T sequencing) live in
//! [`keyfence_iscsi::sequencing`]; this module applies them to the
//! session's tasks:
//!
//! * [`write`]: collecting write data (immediate, unsolicited, R2T).
//! * [`respond`]: executing commands, Data-In and SCSI Response.
//! * [`tmf`]: task management and aborts.

mod respond;
mod tmf;
mod write;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::pdu::{
    AsyncMessage, InitiatorPdu, LogoutReason, LogoutRequest, LogoutResponse, LogoutResponseCode,
    NopIn, NopOut, Reject, ScsiCommand, TextRequest, BHS_LEN, RESERVED_TAG,
};
use keyfence_iscsi::sequencing::{Admission, CommandWindow};
use keyfence_iscsi::text::{SendTargetsEntry, TextContext, TextError, TextResponder};
use keyfence_iscsi::{Lun, Opcode, Pdu, PduCodec, RejectReason, SessionParams};
use keyfence_lu::reservation::Superseded;
use keyfence_lu::LogicalUnit;
use keyfence_lu::UaScope;
use keyfence_scsi::sense::asc;
use keyfence_scsi::Nexus;
use tracing::{debug, info};

use super::acl::{target_lun, LunView};
use super::budget::Held;
use super::login::{self, Established, SessionKind};
use super::metrics::{GaugeGuard, LuStats, WindowClosed};
use super::session::{SessionCtl, SessionSlot};
use super::wire::Outbox;
use super::{Live, Shared, TargetRt};

use respond::InFlight;
use respond::ResetJob;
pub(crate) use respond::{Completion, Job};
use tmf::PendingTmf;
use write::WriteTask;

/// Why a connection ends.
#[derive(Debug)]
pub(crate) enum ConnEnd {
    /// The initiator closed the TCP connection.
    Eof,
    /// Logout completed.
    Logout,
    /// Closed on request (reinstatement, cold reset, shutdown).
    Closed(&'static str),
    /// Socket error.
    Io(std::io::Error),
    /// The initiator broke the protocol beyond recovery at ERL 0.
    Protocol(String),
}

impl std::fmt::Display for ConnEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnEnd::Eof => f.write_str("initiator closed the connection"),
            ConnEnd::Logout => f.write_str("logout"),
            ConnEnd::Closed(why) => f.write_str(why),
            ConnEnd::Io(e) => write!(f, "socket error: {e}"),
            ConnEnd::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}

impl From<std::io::Error> for ConnEnd {
    fn from(e: std::io::Error) -> Self {
        ConnEnd::Io(e)
    }
}

/// Most data-in one session may have read and not yet sent (in its outbox
/// or being read by jobs). A read that does not fit waits (one read runs
/// whatever its size when nothing else is pending), and the command window
/// closes while the session is at the limit.
const SESSION_READ_BUDGET: u64 = 32 << 20;
/// Most write data one session may hold: data collected for commands that
/// have not run, and immediate data of commands held back (CmdSN gap, task
/// attributes). Beyond it commands end with TASK SET FULL and the command
/// window closes.
const SESSION_WRITE_BUDGET: u64 = 128 << 20;
/// How soon a read held back because the server's `max_buffered_bytes`
/// was in use by other sessions tries again.
const READ_RETRY: Duration = Duration::from_millis(5);

/// A non-immediate PDU that arrived ahead of ExpCmdSN.
#[derive(Debug)]
struct Queued {
    pdu: Pdu,
    /// Its data counted against the server's write budget.
    held: Option<Held>,
    /// Its immediate data did not fit the budgets and was dropped: the
    /// command ends with TASK SET FULL when its turn comes.
    over_budget: bool,
    /// Aborted before its turn: its CmdSN is consumed, nothing runs.
    aborted: bool,
}

impl Queued {
    fn abort(&mut self) {
        self.aborted = true;
        self.held = None;
        self.pdu.data = Bytes::new();
    }
}

/// One session (= one connection, MaxConnections=1) in full feature phase.
pub(crate) struct Session {
    shared: Arc<Shared>,
    kind: SessionKind,
    initiator: String,
    nexus: Option<Nexus>,
    target: Option<usize>,
    /// The target as configured now (a reload hands the session a new one).
    rt: Option<Arc<TargetRt>>,
    /// The LUNs the initiator sees, when its ACL entry maps them.
    view: Option<Arc<LunView>>,
    /// The address the connection was accepted on.
    local: Option<SocketAddr>,
    /// The portal (listener address) the connection came through.
    portal: Option<SocketAddr>,
    /// The initiator lost access or its portal in a reload and was asked
    /// to log out; the connection is closed at this time if it has not.
    logout_deadline: Option<Instant>,
    /// Why it was asked to log out.
    logout_reason: &'static str,
    tsih: u16,
    cid: u16,
    params: SessionParams,
    reg: Option<SessionSlot>,
    peer: SocketAddr,
    /// Framing of this connection (digests, segment limits), both ways.
    codec: PduCodec,
    /// PDUs to send, encoded.
    out: Outbox,
    /// Commands to run off the connection's task.
    jobs: Vec<Job>,

    window: CommandWindow,
    stat_sn: u32,
    /// Non-immediate PDUs that arrived ahead of ExpCmdSN, by CmdSN.
    queued: HashMap<u32, Queued>,
    /// Data-in expected from read jobs still running.
    read_job_bytes: u64,
    /// Reset task management functions handed out as jobs, not done.
    resets_running: usize,
    /// The server budget's bytes for read data in the outbox, released
    /// once it has been sent.
    out_held: Option<Held>,
    /// A read waits for room in the server's budget (other sessions hold
    /// it): try again at this time.
    read_retry: Option<Instant>,
    /// MaxCmdSN in the last PDU queued for the initiator.
    advertised_max: u32,

    writes: HashMap<u32, WriteTask>,
    in_flight: HashMap<u32, InFlight>,
    /// Commands held back by ORDERED task attribute semantics (SAM-5
    /// 8.5): an ORDERED task waits for every older task, and every newer
    /// task waits for it.
    deferred: VecDeque<ScsiCommand>,
    /// The ORDERED task currently running or collecting data.
    ordered_running: Option<u32>,
    pending_tmfs: Vec<PendingTmf>,
    next_ttt: u32,

    /// Text (SendTargets) exchanges, with continuation.
    text: TextResponder,
    discovered: Vec<SendTargetsEntry>,

    nop_interval: Duration,
    nop_timeout: Duration,
    data_out_timeout: Duration,
    ping: Option<(u32, Instant)>,
    last_rx: Instant,
    closing: Option<ConnEnd>,
    /// A logout's response, sent after the nexus loss ([`Session::end`]).
    logout_response: Option<Pdu>,
    close_all_after_flush: bool,
    /// The window is closed for a budget (counted once per closing).
    saturated: bool,
    /// Holds `keyfence_sessions` up while the session lives.
    _gauge: GaugeGuard,
}

impl Session {
    /// The session of a connection whose login completed; `codec` is the
    /// connection's codec with the negotiated parameters applied.
    pub fn new(
        shared: Arc<Shared>,
        est: Established,
        peer: SocketAddr,
        codec: PduCodec,
        now: Instant,
    ) -> Session {
        let live = shared.live();
        let limits = &live.limits;
        let window = CommandWindow::new(est.exp_cmd_sn, limits.max_cmds_per_session);
        let nop_interval = Duration::from_secs(u64::from(limits.nop_in_interval_secs));
        let nop_timeout = Duration::from_secs(u64::from(limits.nop_in_timeout_secs));
        let data_out_timeout = Duration::from_secs(u64::from(limits.data_out_timeout_secs));
        let (target, nexus, rt) = match &est.kind {
            SessionKind::Discovery => (None, None, None),
            SessionKind::Normal { target, tpgt } => {
                let rt = live.target(*target).cloned();
                let nexus = Nexus::new(
                    keyfence_scsi::InitiatorPort::new(&est.initiator, est.isid),
                    keyfence_scsi::TargetPort::new(
                        rt.as_ref().map_or("", |t| t.name.as_str()),
                        *tpgt,
                        *tpgt,
                    ),
                );
                (Some(*target), Some(nexus), rt)
            }
        };
        let discovered = login::discovered_targets(&live, &est.initiator, est.kind, est.local);
        let gauge = GaugeGuard::new(match est.kind {
            SessionKind::Discovery => &shared.metrics.sessions_discovery,
            SessionKind::Normal { .. } => &shared.metrics.sessions_normal,
        });
        let mut s = Session {
            shared,
            kind: est.kind,
            initiator: est.initiator,
            nexus,
            target,
            rt,
            view: est.view,
            local: est.local,
            portal: est.portal,
            logout_deadline: None,
            logout_reason: "",
            tsih: est.registration.tsih,
            cid: est.cid,
            params: est.params,
            reg: Some(est.registration),
            peer,
            codec,
            out: Outbox::new(),
            jobs: Vec::new(),
            window,
            stat_sn: est.stat_sn,
            queued: HashMap::new(),
            read_job_bytes: 0,
            resets_running: 0,
            out_held: None,
            read_retry: None,
            advertised_max: est.exp_cmd_sn.wrapping_sub(1),
            writes: HashMap::new(),
            in_flight: HashMap::new(),
            deferred: VecDeque::new(),
            ordered_running: None,
            pending_tmfs: Vec::new(),
            next_ttt: 1,
            text: TextResponder::new(),
            discovered,
            nop_interval,
            nop_timeout,
            data_out_timeout,
            ping: None,
            last_rx: now,
            closing: None,
            logout_response: None,
            close_all_after_flush: false,
            saturated: false,
            _gauge: gauge,
        };
        s.update_window();
        // The login response announced the window as it is now.
        s.advertised_max = s.window.max_cmd_sn();
        // A reload between the login's check and now: apply it.
        if live.generation != 0 {
            s.reconfigure(&live, false);
        }
        s
    }

    /// The LUN numbers this session sees (REPORT LUNS), each with the
    /// identity of the LU behind it.
    fn visible_luns(&self) -> Vec<(u64, Option<*const LogicalUnit>)> {
        let numbers = match (&self.view, &self.rt) {
            (Some(v), _) => v.luns().get().to_vec(),
            (None, Some(t)) => t.luns.keys().copied().collect(),
            (None, None) => Vec::new(),
        };
        numbers
            .into_iter()
            .map(|n| {
                let id = match &self.view {
                    Some(v) => v.resolve(n).map(|(id, _)| id),
                    None => Some(n),
                };
                let lu = id
                    .and_then(|id| self.rt.as_ref()?.luns.get(&id))
                    .map(Arc::as_ptr);
                (n, lu)
            })
            .collect()
    }

    /// Take this session's target and LUN view from a reloaded
    /// configuration. LUNs that appeared, disappeared or were mapped
    /// differently give REPORTED LUNS DATA HAS CHANGED (3Fh/0Eh) on the
    /// LUs the session sees now; an initiator that lost access (target
    /// gone, ACL entry removed) sees no LUN any more and is asked to log
    /// out (Asynchronous Message, AsyncEvent 1), and closed after a grace
    /// period. With `notify` false (the session was just admitted under
    /// this configuration) no unit attention is queued.
    fn reconfigure(&mut self, live: &Arc<Live>, notify: bool) {
        let discovered = login::discovered_targets(live, &self.initiator, self.kind, self.local);
        self.discovered = discovered;
        // The portal it came through was removed: the session ends
        // (whatever else changed).
        let portal_gone = self.portal.is_some_and(|a| match self.kind {
            SessionKind::Discovery => !live.listeners.iter().any(|l| l.addr == a),
            // (A removed target is an access loss, handled below.)
            SessionKind::Normal { target, tpgt } => {
                live.target(target).is_some() && !live.groups_at(a).contains(&(target, tpgt))
            }
        });
        if portal_gone && self.logout_deadline.is_none() && self.closing.is_none() {
            self.request_logout(
                "its portal was removed by a reload; the initiator did not log out in time",
            );
        }
        let Some(t) = self.target else {
            return;
        };
        let before = self.visible_luns();
        let access = live
            .target(t)
            .and_then(|rt| rt.acl.access(&self.initiator).map(|a| (rt.clone(), a.view)));
        match access {
            Some((rt, view)) => {
                self.rt = Some(rt);
                self.view = view;
            }
            None => {
                // Keep the target (for the nexus's LUs at the end) but
                // show no LUN: the initiator has no access any more.
                self.view = Some(Arc::new(LunView::empty()));
                if self.logout_deadline.is_none() && self.closing.is_none() {
                    self.request_logout(
                        "access removed by a reload; the initiator did not log out in time",
                    );
                }
            }
        }
        // A LU replaced by another under the same number is a change too.
        let after = self.visible_luns();
        if notify && before != after {
            if let (Some(nexus), Some(rt)) = (&self.nexus, &self.rt) {
                for (n, _) in &after {
                    let id = match &self.view {
                        Some(v) => v.resolve(*n).map(|(id, _)| id),
                        None => Some(*n),
                    };
                    if let Some(lu) = id.and_then(|id| rt.luns.get(&id)) {
                        lu.queue_unit_attention(
                            UaScope::Nexus(nexus),
                            asc::REPORTED_LUNS_DATA_HAS_CHANGED,
                        );
                    }
                }
            }
        }
    }

    /// How long an initiator that lost access has to log out.
    const LOGOUT_GRACE: Duration = Duration::from_secs(2);

    /// Ask the initiator to log out (RFC 7143 11.9.1, AsyncEvent 1,
    /// Parameter3: seconds it has), closing the connection after that.
    /// `reason`: why, as the connection's end is logged if the initiator
    /// does not log out in time.
    fn request_logout(&mut self, reason: &'static str) {
        let why = reason.split(';').next().unwrap_or(reason);
        info!(peer = %self.peer, tsih = self.tsih, initiator = %self.initiator,
            "{why}: asking the initiator to log out");
        self.logout_reason = reason;
        let m = AsyncMessage {
            lun: Lun::default(),
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            async_event: 1,
            async_vcode: 0,
            parameter1: 0,
            parameter2: 0,
            parameter3: Self::LOGOUT_GRACE.as_secs() as u16,
            sense: Bytes::new(),
            event_data: Bytes::new(),
        };
        self.push_pdu(&m.to_pdu());
        self.logout_deadline = Some(Instant::now() + Self::LOGOUT_GRACE);
    }

    pub fn tsih(&self) -> u16 {
        self.tsih
    }

    pub fn initiator(&self) -> &str {
        &self.initiator
    }

    pub fn kind(&self) -> SessionKind {
        self.kind
    }

    /// (ExpCmdSN, MaxCmdSN) as last announced.
    pub fn window(&self) -> (u32, u32) {
        (self.window.exp_cmd_sn(), self.window.max_cmd_sn())
    }

    /// The control channel other tasks reach this session through.
    pub fn take_ctl(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<SessionCtl>> {
        let r = self.reg.as_mut()?;
        Some(std::mem::replace(
            &mut r.ctl,
            tokio::sync::mpsc::unbounded_channel().1,
        ))
    }

    /// What to send.
    pub fn outbox(&mut self) -> &mut Outbox {
        &mut self.out
    }

    /// Commands to run off the connection's task; feed each result back
    /// with [`Session::complete`].
    pub fn take_jobs(&mut self) -> Vec<Job> {
        std::mem::take(&mut self.jobs)
    }

    /// The commands to run off the connection's task, to be drained (the
    /// vector keeps its capacity for the next ones).
    pub fn jobs(&mut self) -> &mut Vec<Job> {
        &mut self.jobs
    }

    /// Commands handed out as jobs and not completed yet.
    pub fn jobs_running(&self) -> usize {
        self.in_flight.len() + self.resets_running
    }

    /// Why the session must end, once its output has been sent.
    pub fn take_closing(&mut self) -> Option<ConnEnd> {
        self.closing.take()
    }

    /// Set the reason to end (the first one wins).
    pub fn close(&mut self, end: ConnEnd) {
        self.closing.get_or_insert(end);
    }

    /// The output queued before has been sent: reads held back for the
    /// data-in budget may start, and the window may open again.
    pub fn flushed(&mut self) {
        self.out_held = None;
        if self.close_all_after_flush {
            self.close_all_after_flush = false;
            self.cold_reset_close();
        }
        if !self.deferred.is_empty() {
            self.release_deferred();
        }
        self.update_window();
        // The initiator saw a closed window: tell it the window is open
        // again (RFC 7143 11.19: a NOP-In with both tags reserved asks
        // for no answer).
        if self.out.is_empty()
            && self.closing.is_none()
            && self.advertised_max.wrapping_add(1) == self.window.exp_cmd_sn()
            && !self.window.is_closed()
        {
            let nop = NopIn {
                lun: Lun::default(),
                itt: RESERVED_TAG,
                ttt: RESERVED_TAG,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.window.exp_cmd_sn(),
                max_cmd_sn: self.window.max_cmd_sn(),
                data: Bytes::new(),
            };
            self.push_pdu(&nop.to_pdu());
        }
    }

    /// A request from another task (reinstatement, another session's
    /// task management).
    pub fn handle_ctl(&mut self, c: SessionCtl) {
        match c {
            SessionCtl::Close => {
                self.close(ConnEnd::Closed(
                    "closed by the target (reinstatement or reset)",
                ));
            }
            SessionCtl::Reconfigure(live) => self.reconfigure(&live, true),
            SessionCtl::AbortTasks { lun } => {
                // `lun` is a target LUN id; this initiator may know it
                // under another number.
                let view = self.view.clone();
                self.abort_matching(|l| {
                    lun.is_none_or(|x| target_lun(view.as_deref(), l) == Some(x))
                });
            }
        }
    }

    /// When [`Session::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Instant {
        let ping = match self.ping {
            Some((_, sent)) => sent + self.nop_timeout,
            None if !self.nop_interval.is_zero() => self.last_rx + self.nop_interval,
            None => self.last_rx + Duration::from_secs(3600),
        };
        let mut due = match self.oldest_write_activity() {
            Some(t) => ping.min(t + self.data_out_timeout),
            None => ping,
        };
        if let Some(r) = self.read_retry {
            due = due.min(r);
        }
        match self.logout_deadline {
            Some(d) => due.min(d),
            None => due,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.logout_deadline.is_some_and(|d| now >= d) {
            self.close(ConnEnd::Closed(self.logout_reason));
            return;
        }
        if self.read_retry.is_some_and(|r| now >= r) {
            self.read_retry = None;
            self.release_deferred();
            self.update_window();
        }
        if let Some(t) = self.oldest_write_activity() {
            if now.duration_since(t) >= self.data_out_timeout {
                self.shared.metrics.data_out_timeouts.inc();
                self.close(ConnEnd::Protocol(format!(
                    "no Data-Out for a write command within {} s",
                    self.data_out_timeout.as_secs()
                )));
                return;
            }
        }
        if let Some((_, sent)) = self.ping {
            if now.duration_since(sent) >= self.nop_timeout {
                self.shared.metrics.nop_timeouts.inc();
                self.close(ConnEnd::Protocol("NOP-In ping not answered".into()));
            }
        } else if !self.nop_interval.is_zero()
            && now.duration_since(self.last_rx) >= self.nop_interval
        {
            self.send_ping(now);
        }
    }

    /// Bytes arrived at `now`: decode and handle every complete PDU in
    /// `rbuf` (what is left is an incomplete PDU).
    pub fn input(&mut self, rbuf: &mut BytesMut, now: Instant) {
        self.last_rx = now;
        while self.closing.is_none() {
            let pdu = match self.codec.decode(rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    if let Some((reason, bhs)) = e.reject() {
                        let bhs = *bhs;
                        self.reject(reason, &bhs);
                    }
                    if e.is_fatal() {
                        self.close(ConnEnd::Protocol(e.to_string()));
                    }
                    continue;
                }
            };
            self.ping = None; // any PDU shows the initiator is alive
            self.handle_pdu(pdu);
        }
    }

    /// The connection is over: release the I_T nexus and the session's
    /// registration. Call after the last job completed (or was given up),
    /// off the I/O workers: the nexus loss takes each LU's reservation
    /// lock (which a PR OUT may hold across its APTPL fsync) and in
    /// cluster mode commits through etcd and waits until every live
    /// gateway applied it. After a logout the Logout Response is queued
    /// only then, so that the initiator's next command, through any
    /// gateway, sees the nexus loss (e.g. its SCSI-2 reservation gone).
    pub fn end(&mut self) {
        self.abort_where(|_, _| true);
        if let (Some(nexus), Some(t), Some(reg)) = (&self.nexus, &self.rt, &self.reg) {
            // The session stays in the table while its nexus loss is
            // applied (without the table's lock: that may take an etcd
            // round trip), so a login of the same nexus displaces it and
            // waits until it is over. Unless a session that reinstated
            // this one (after waiting for it in vain) already uses the
            // nexus: then its unit attentions and SCSI-2 reservation are
            // its own. Asked again right before the change is computed.
            let (shared, alive) = (self.shared.clone(), reg.alive.subscribe());
            let other = nexus.clone();
            let superseded: Superseded =
                Arc::new(move || shared.sessions().has_other_nexus(&other, &alive));
            if !superseded() {
                for lu in t.luns.values() {
                    lu.nexus_lost_unless(nexus, &superseded);
                }
            }
        }
        if let Some(reg) = self.reg.take() {
            self.shared.sessions().remove(reg.tsih, &reg.alive);
            drop(reg);
        }
        if let Some(pdu) = self.logout_response.take() {
            self.push_pdu(&pdu);
        }
    }

    fn push_pdu(&mut self, pdu: &Pdu) {
        self.advertised_max = self.window.max_cmd_sn();
        self.out.push_pdu(&self.codec, pdu);
    }

    /// Commands the session holds: running, collecting data, held back by
    /// a CmdSN gap or by task attributes.
    fn busy(&self) -> u32 {
        (self.writes.len() + self.in_flight.len() + self.queued.len() + self.deferred.len()) as u32
    }

    /// Data-in read and not yet sent.
    fn data_in_pending(&self) -> u64 {
        self.out.len() as u64 + self.read_job_bytes
    }

    /// May a read of `edtl` bytes start now? It must fit the session's
    /// data-in budget (one read runs whatever its size when nothing else
    /// is pending) and the server's `max_buffered_bytes`, where its place
    /// is taken now: `Some(held)` to start it, `None` to hold it back. When
    /// only the server's budget is short, the session tries again after
    /// [`READ_RETRY`].
    fn admit_read(&mut self, edtl: u32) -> Option<Option<Held>> {
        let pending = self.data_in_pending();
        if pending != 0 && pending + u64::from(edtl) > SESSION_READ_BUDGET {
            return None;
        }
        if edtl == 0 {
            return Some(None);
        }
        match self.shared.buffers.try_take(u64::from(edtl)) {
            Some(h) => Some(Some(h)),
            None => {
                self.read_retry
                    .get_or_insert_with(|| Instant::now() + READ_RETRY);
                None
            }
        }
    }

    /// Keep read data's place in the server's budget until the outbox
    /// has been sent.
    fn hold_until_sent(&mut self, held: Held) {
        match &mut self.out_held {
            Some(h) => h.absorb(held),
            None => self.out_held = Some(held),
        }
    }

    /// Write data the session holds (see [`SESSION_WRITE_BUDGET`]).
    fn write_bytes(&self) -> u64 {
        let collecting: u64 = self.writes.values().map(|t| t.held_bytes()).sum();
        let queued: u64 = self.queued.values().map(|q| q.pdu.data.len() as u64).sum();
        let deferred: u64 = self.deferred.iter().map(|c| c.data.len() as u64).sum();
        collecting + queued + deferred
    }

    /// The last Data-Out activity of the write that has waited longest.
    fn oldest_write_activity(&self) -> Option<Instant> {
        self.writes.values().map(|t| t.last_activity()).min()
    }

    /// MaxCmdSN = ExpCmdSN + window - 1 - (commands still holding
    /// resources), never decreasing; no new CmdSN while the session is at
    /// its data-in or write budget.
    fn update_window(&mut self) {
        let busy = self.busy();
        let read_full = self.data_in_pending() >= SESSION_READ_BUDGET;
        let saturated = read_full || self.write_bytes() >= SESSION_WRITE_BUDGET;
        if saturated && !self.saturated {
            self.shared.metrics.window_closed(if read_full {
                WindowClosed::ReadBudget
            } else {
                WindowClosed::WriteBudget
            });
        }
        self.saturated = saturated;
        self.window.update(busy, saturated);
    }

    /// Keep a PDU that arrived ahead of ExpCmdSN, counting its data.
    fn hold_back(&mut self, pdu: Pdu) -> Queued {
        let n = pdu.data.len() as u64;
        if n == 0 || pdu.opcode_raw() != Opcode::ScsiCommand as u8 {
            return Queued {
                pdu,
                held: None,
                over_budget: false,
                aborted: false,
            };
        }
        let held = (self.write_bytes() + n <= SESSION_WRITE_BUDGET)
            .then(|| self.shared.buffers.try_take(n))
            .flatten();
        match held {
            Some(h) => Queued {
                pdu,
                held: Some(h),
                over_budget: false,
                aborted: false,
            },
            None => Queued {
                pdu: Pdu {
                    bhs: pdu.bhs,
                    ahs: pdu.ahs,
                    data: Bytes::new(),
                },
                held: None,
                over_budget: true,
                aborted: false,
            },
        }
    }

    fn next_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    fn alloc_ttt(next_ttt: &mut u32) -> u32 {
        loop {
            let t = *next_ttt;
            *next_ttt = next_ttt.wrapping_add(1);
            if t != RESERVED_TAG && t != 0 {
                return t;
            }
        }
    }

    fn send_ping(&mut self, now: Instant) {
        let ttt = Self::alloc_ttt(&mut self.next_ttt);
        let nop = NopIn {
            lun: Lun::default(),
            itt: RESERVED_TAG,
            ttt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            data: Bytes::new(),
        };
        self.push_pdu(&nop.to_pdu());
        self.ping = Some((ttt, now));
        debug!(peer = %self.peer, ttt, "NOP-In ping");
    }

    fn reject(&mut self, reason: RejectReason, bhs: &[u8; BHS_LEN]) {
        debug!(peer = %self.peer, ?reason, opcode = bhs[0] & 0x3f, "Reject");
        let mut r = Reject::new(reason, bhs);
        r.stat_sn = self.next_stat_sn();
        r.exp_cmd_sn = self.window.exp_cmd_sn();
        r.max_cmd_sn = self.window.max_cmd_sn();
        self.push_pdu(&r.to_pdu());
    }

    fn handle_pdu(&mut self, pdu: Pdu) {
        let op = match pdu.opcode() {
            Ok(op) => op,
            Err(_) => {
                self.reject(RejectReason::CommandNotSupported, &pdu.bhs);
                return;
            }
        };
        // PDUs that carry a CmdSN are ordered by it unless immediate.
        let ordered = matches!(
            op,
            Opcode::ScsiCommand
                | Opcode::TaskMgmtRequest
                | Opcode::TextRequest
                | Opcode::LogoutRequest
                | Opcode::NopOut
        ) && !pdu.immediate();
        if !ordered {
            self.dispatch(pdu);
            return;
        }
        let sn = pdu.cmd_sn();
        match self.window.admit(sn) {
            Admission::Now => {}
            Admission::Later => {
                if self.queued.len() < self.window.size() as usize && !self.queued.contains_key(&sn)
                {
                    let q = self.hold_back(pdu);
                    self.queued.insert(sn, q);
                }
                self.update_window();
                return;
            }
            Admission::Outside => {
                debug!(peer = %self.peer, sn, exp = self.window.exp_cmd_sn(),
                    max = self.window.max_cmd_sn(), "dropping PDU outside the command window");
                return;
            }
        }
        self.dispatch(pdu);
        // Commands queued behind this one may now run.
        while let Some(next) = self.queued.remove(&self.window.exp_cmd_sn()) {
            self.window.advance();
            let Queued {
                pdu,
                held,
                over_budget,
                aborted,
            } = next;
            drop(held);
            if aborted {
                continue;
            }
            if over_budget {
                self.refuse_over_budget(&pdu);
            } else {
                self.dispatch(pdu);
            }
        }
        self.update_window();
    }

    fn dispatch(&mut self, pdu: Pdu) {
        let parsed = match InitiatorPdu::parse(&pdu) {
            Ok(p) => p,
            Err(e) => {
                debug!(peer = %self.peer, "malformed PDU: {e}");
                self.reject(e.reject_reason(), &pdu.bhs);
                return;
            }
        };
        match parsed {
            InitiatorPdu::ScsiCommand(cmd) => {
                if self.target.is_none() {
                    self.reject(RejectReason::ProtocolError, &pdu.bhs);
                } else {
                    self.submit(cmd);
                }
            }
            InitiatorPdu::DataOut(d) => self.data_out(d),
            InitiatorPdu::NopOut(n) => self.nop_out(n, &pdu.bhs),
            InitiatorPdu::TaskMgmtRequest(t) => {
                if self.target.is_none() {
                    self.reject(RejectReason::ProtocolError, &pdu.bhs);
                } else {
                    self.task_mgmt(t);
                }
            }
            InitiatorPdu::TextRequest(t) => self.text(t, &pdu.bhs),
            InitiatorPdu::LogoutRequest(l) => self.logout(l),
            InitiatorPdu::SnackRequest(_) => {
                // ERL 0: no SNACK support.
                self.reject(RejectReason::ProtocolError, &pdu.bhs);
            }
            InitiatorPdu::LoginRequest(_) => {
                // A login request in full feature phase is a protocol error.
                self.reject(RejectReason::ProtocolError, &pdu.bhs);
            }
        }
    }

    // ----------------------------------------------------------------- NOP

    fn nop_out(&mut self, n: NopOut, bhs: &[u8; BHS_LEN]) {
        if n.itt == RESERVED_TAG {
            // A ping answer (TTT = ours) or a bare CmdSN update: no reply.
            if n.ttt != RESERVED_TAG && self.ping.is_some_and(|(t, _)| t != n.ttt) {
                debug!(peer = %self.peer, ttt = n.ttt, "NOP-Out for an unknown ping");
            }
            if !n.immediate && n.ttt == RESERVED_TAG {
                // ITT reserved must be immediate (RFC 7143 11.18).
                self.reject(RejectReason::ProtocolError, bhs);
            }
            return;
        }
        let max = self.params.max_send_data_segment_length as usize;
        let data = if n.data.len() > max {
            n.data.slice(..max)
        } else {
            n.data
        };
        let reply = NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: RESERVED_TAG,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            data,
        };
        self.push_pdu(&reply.to_pdu());
    }

    // --------------------------------------------------------------- text

    fn text(&mut self, t: TextRequest, bhs: &[u8; BHS_LEN]) {
        let own = self.rt.as_ref().map(|t| t.name.clone());
        let ctx = TextContext {
            targets: &self.discovered,
            session_target: own.as_deref(),
            max_send_data_segment_length: self.params.max_send_data_segment_length,
        };
        match self.text.handle(&t, &ctx) {
            Ok(mut r) => {
                r.stat_sn = self.next_stat_sn();
                r.exp_cmd_sn = self.window.exp_cmd_sn();
                r.max_cmd_sn = self.window.max_cmd_sn();
                self.push_pdu(&r.to_pdu());
            }
            Err(e) => {
                debug!(peer = %self.peer, "text request: {e}");
                let reason = match e {
                    TextError::UnknownTtt(_) => RejectReason::ProtocolError,
                    _ => RejectReason::InvalidPduField,
                };
                self.reject(reason, bhs);
            }
        }
    }

    // ------------------------------------------------------------- logout

    fn logout(&mut self, l: LogoutRequest) {
        let response = match l.reason {
            LogoutReason::CloseSession => LogoutResponseCode::Success,
            LogoutReason::CloseConnection if l.cid == self.cid => LogoutResponseCode::Success,
            LogoutReason::CloseConnection => LogoutResponseCode::CidNotFound,
            LogoutReason::RemoveConnectionForRecovery => LogoutResponseCode::RecoveryNotSupported,
        };
        let r = LogoutResponse {
            response,
            itt: l.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            time2wait: 0,
            time2retain: 0,
        };
        if response == LogoutResponseCode::Success {
            // The logout ends every task: those still collecting data or
            // held back are dropped, running ones finish without status.
            // The response goes out once the nexus loss is in force
            // ([`Session::end`]).
            self.abort_where(|_, _| true);
            self.logout_response = Some(r.to_pdu());
            self.closing = Some(ConnEnd::Logout);
        } else {
            self.push_pdu(&r.to_pdu());
        }
    }

    fn lu_for(&self, lun: Lun) -> Option<Arc<LogicalUnit>> {
        let t = self.rt.as_ref()?;
        t.luns.get(&self.target_lun(lun)?).cloned()
    }

    /// The LU behind `lun` and its counters (None when not counted), with
    /// one resolution of the LUN.
    fn lu_and_stats(&self, lun: Lun) -> (Option<Arc<LogicalUnit>>, Option<Arc<LuStats>>) {
        let Some((t, id)) = self.rt.as_ref().zip(self.target_lun(lun)) else {
            return (None, None);
        };
        let Some(lu) = t.luns.get(&id) else {
            return (None, None);
        };
        (Some(lu.clone()), t.stats.get(&id).cloned())
    }

    /// The target LUN id behind a LUN field of this session.
    fn target_lun(&self, lun: Lun) -> Option<u64> {
        target_lun(self.view.as_deref(), lun)
    }

    /// Does this initiator see `lun` read-only (its ACL maps it so)?
    fn read_only_view(&self, lun: Lun) -> bool {
        match (&self.view, lun.number()) {
            (Some(v), Some(n)) => v.resolve(u64::from(n)).is_some_and(|(_, ro)| ro),
            _ => false,
        }
    }
}

/// Do two LUN fields address the same logical unit?
fn lun_eq(a: Lun, b: Lun) -> bool {
    a == b || a.number().is_some_and(|n| b.number() == Some(n))
}
