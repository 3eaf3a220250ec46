//! One connection (= one session, MaxConnections=1) in full feature phase.
//!
//! A single task per connection reads into one buffer, decodes every
//! complete PDU, handles each (page-cache reads and writes run inline:
//! pread/pwrite are fast and keep latency low), gathers every response in
//! an output queue and sends the queue with vectored writes: headers are
//! copied, large data payloads are not. Commands the LU flags as blocking
//! (cache flushes, FUA, unmapping) run on the blocking pool and report back
//! through a channel, so they never stall the connection.

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::pdu::{
    DataIn, DataOut, InitiatorPdu, LogoutReason, LogoutRequest, LogoutResponse, LogoutResponseCode,
    NopIn, NopOut, R2t, Reject, Residual, ScsiCommand, ScsiResponse, TaskAttr, TaskMgmtRequest,
    TaskMgmtResponse, TextRequest, TmfFunction, TmfResponse, BHS_LEN, RESERVED_TAG,
};
use keyfence_iscsi::text::{SendTargetsEntry, TextContext, TextError, TextResponder};
use keyfence_iscsi::{serial, Lun, Opcode, Pdu, PduCodec, RejectReason, SessionParams};
use keyfence_scsi::sense::asc;
use keyfence_scsi::{Nexus, ScsiStatus, Sense};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::login::{self, Established, SessionKind};
use super::session::{SessionCtl, SessionSlot};
use super::{ListenerInfo, Shared};
use keyfence_lu::{execute_no_lu, CommandOutcome, CommandRequest, LogicalUnit, LuEffect};

/// Data payloads at most this long are copied into the header buffer
/// rather than sent as their own iovec.
const COPY_THRESHOLD: usize = 2048;
/// Largest data-out one command may transfer (the transport buffers it
/// whole before the LU executes it).
const MAX_WRITE_BYTES: u32 = 64 << 20;
/// Most write data one session may have buffered at a time.
const SESSION_WRITE_BUDGET: u64 = 128 << 20;
/// How long an initiator may leave our responses unread before the
/// connection is dropped.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// Read buffer growth step.
const READ_CHUNK: usize = 256 * 1024;

/// Why a connection ends.
#[derive(Debug)]
pub(super) enum ConnEnd {
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

/// The transport: read buffer, codec and gathered output.
pub(super) struct Wire {
    pub rd: OwnedReadHalf,
    pub wr: OwnedWriteHalf,
    pub rbuf: BytesMut,
    pub codec: PduCodec,
    /// Output segments in order; `scratch` is the tail still being filled.
    segs: VecDeque<Bytes>,
    scratch: BytesMut,
    pub peer: SocketAddr,
}

impl Wire {
    pub fn new(sock: TcpStream, peer: SocketAddr) -> Wire {
        let (rd, wr) = sock.into_split();
        Wire {
            rd,
            wr,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            codec: PduCodec::new(),
            segs: VecDeque::new(),
            scratch: BytesMut::with_capacity(16 * 1024),
            peer,
        }
    }

    /// Read more bytes; `Ok(false)` on end of stream.
    pub async fn fill(&mut self) -> std::io::Result<bool> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(READ_CHUNK);
        }
        Ok(self.rd.read_buf(&mut self.rbuf).await? > 0)
    }

    /// Queue a PDU whose BHS is complete except for the lengths, with data
    /// sent without copying when it is large.
    pub fn push(&mut self, bhs: &[u8; BHS_LEN], data: &Bytes) {
        // The codec only fails for over-long data, which callers never
        // produce (data is cut to the peer's limit); drop the PDU rather
        // than panic if that invariant is ever broken.
        if let Err(e) = self
            .codec
            .encode_header(bhs, &[], data.len(), &mut self.scratch)
        {
            warn!(peer = %self.peer, "dropping PDU that cannot be encoded: {e}");
            return;
        }
        if data.is_empty() {
            return;
        }
        if data.len() <= COPY_THRESHOLD {
            self.scratch.extend_from_slice(data);
        } else {
            if !self.scratch.is_empty() {
                self.segs.push_back(self.scratch.split().freeze());
            }
            self.segs.push_back(data.clone());
        }
        let (t, n) = self.codec.data_trailer(data);
        self.scratch.extend_from_slice(&t[..n]);
    }

    pub fn push_pdu(&mut self, pdu: &Pdu) {
        self.push(&pdu.bhs, &pdu.data);
    }

    pub fn has_output(&self) -> bool {
        !self.segs.is_empty() || !self.scratch.is_empty()
    }

    /// Send everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.scratch.is_empty() {
            self.segs.push_back(self.scratch.split().freeze());
        }
        while !self.segs.is_empty() {
            let n = {
                let mut iov: [IoSlice<'_>; 64] = [IoSlice::new(&[]); 64];
                let mut k = 0;
                for s in self.segs.iter().take(64) {
                    iov[k] = IoSlice::new(s);
                    k += 1;
                }
                self.wr.write_vectored(&iov[..k]).await?
            };
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let mut left = n;
            while left > 0 {
                let Some(front) = self.segs.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    self.segs.pop_front();
                } else {
                    let _ = front.split_to(left);
                    left = 0;
                }
            }
        }
        Ok(())
    }
}

/// Entry point of a connection task.
pub(super) async fn serve_connection(
    shared: Arc<Shared>,
    info: Arc<ListenerInfo>,
    sock: TcpStream,
    peer: SocketAddr,
) {
    let mut wire = Wire::new(sock, peer);
    debug!(%peer, portal = %info.addr, "connection accepted");
    let timeout = Duration::from_secs(u64::from(shared.limits.login_timeout_secs));
    let mut shutdown = shared.shutdown.clone();
    let attempt = tokio::select! {
        r = tokio::time::timeout(timeout, login::login(&shared, &info, &mut wire)) => r,
        _ = shutdown.wait_for(|s| *s) => {
            debug!(%peer, "target shutting down during login");
            return;
        }
    };
    let est = match attempt {
        Ok(Ok(Some(est))) => est,
        Ok(Ok(None)) => {
            let _ = wire.flush().await;
            debug!(%peer, "login ended without a session");
            return;
        }
        Ok(Err(e)) => {
            let _ = wire.flush().await;
            debug!(%peer, "login failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%peer, "login timed out");
            return;
        }
    };
    let tsih = est.registration.tsih;
    let mut sess = Session::new(shared.clone(), est, peer);
    info!(%peer, tsih, initiator = %sess.initiator, kind = ?sess.kind, "session started");
    let end = sess.run(&mut wire).await;
    sess.finish(&mut wire).await;
    match &end {
        ConnEnd::Eof | ConnEnd::Logout | ConnEnd::Closed(_) => {
            info!(%peer, tsih, "session ended: {end}")
        }
        _ => warn!(%peer, tsih, "session ended: {end}"),
    }
}

/// A command collecting Data-Out before it can run.
#[derive(Debug)]
struct WriteTask {
    lun: Lun,
    lu: Option<Arc<LogicalUnit>>,
    cdb: Bytes,
    edtl: u32,
    /// Bytes the CDB transfers (None when the CDB does not decode).
    wanted: u32,
    /// Bytes we store and hand to the LU: min(EDTL, wanted).
    collect: u32,
    buf: BytesMut,
    received: u32,
    /// Unsolicited data still expected (until a Data-Out with F).
    unsolicited_open: bool,
    unsolicited_limit: u32,
    next_unsol_data_sn: u32,
    /// Offset the next unsolicited Data-Out must start at
    /// (DataPDUInOrder=Yes).
    next_unsol_offset: u32,
    /// Next offset to solicit.
    next_r2t_offset: u32,
    r2t_sn: u32,
    /// Outstanding R2Ts: TTT -> (offset, length, received, next DataSN).
    r2ts: Vec<OpenR2t>,
    read: bool,
}

#[derive(Debug, Clone, Copy)]
struct OpenR2t {
    ttt: u32,
    offset: u32,
    len: u32,
    got: u32,
    next_data_sn: u32,
}

/// A command running on the blocking pool.
#[derive(Debug)]
struct InFlight {
    lun: Lun,
    aborted: bool,
}

/// A TMF waiting for the tasks it aborted to finish.
#[derive(Debug)]
struct PendingTmf {
    itt: u32,
    waiting: Vec<u32>,
    after: TmfAfter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TmfAfter {
    Nothing,
    CloseAll,
}

/// The response metadata a command needs once it has executed.
#[derive(Debug, Clone)]
struct Meta {
    itt: u32,
    lun: Lun,
    read: bool,
    write: bool,
    edtl: u32,
    wanted_out: Option<u32>,
}

struct Completion {
    meta: Meta,
    outcome: CommandOutcome,
}

pub(super) struct Session {
    shared: Arc<Shared>,
    kind: SessionKind,
    initiator: String,
    nexus: Option<Nexus>,
    target: Option<usize>,
    tsih: u16,
    cid: u16,
    params: SessionParams,
    reg: Option<SessionSlot>,
    peer: SocketAddr,

    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    stat_sn: u32,
    window: u32,
    /// Non-immediate PDUs that arrived ahead of ExpCmdSN, by CmdSN.
    queued: HashMap<u32, Pdu>,

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
    done_tx: mpsc::UnboundedSender<Completion>,
    done_rx: mpsc::UnboundedReceiver<Completion>,

    /// Text (SendTargets) exchanges, with continuation.
    text: TextResponder,
    discovered: Vec<SendTargetsEntry>,

    ping: Option<(u32, Instant)>,
    last_rx: Instant,
    closing: Option<ConnEnd>,
    close_all_after_flush: bool,
}

impl Session {
    fn new(shared: Arc<Shared>, est: Established, peer: SocketAddr) -> Session {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let window = shared.limits.max_cmds_per_session;
        let (target, nexus) = match &est.kind {
            SessionKind::Discovery => (None, None),
            SessionKind::Normal { target, tpgt } => {
                let t = &shared.targets[*target];
                let nexus = Nexus::new(
                    keyfence_scsi::InitiatorPort::new(&est.initiator, est.isid),
                    t.target_port(*tpgt),
                );
                (Some(*target), Some(nexus))
            }
        };
        let mut s = Session {
            shared,
            kind: est.kind,
            initiator: est.initiator,
            nexus,
            target,
            tsih: est.registration.tsih,
            cid: est.cid,
            params: est.params,
            reg: Some(est.registration),
            peer,
            exp_cmd_sn: est.exp_cmd_sn,
            max_cmd_sn: est.exp_cmd_sn.wrapping_sub(1),
            stat_sn: est.stat_sn,
            window,
            queued: HashMap::new(),
            writes: HashMap::new(),
            in_flight: HashMap::new(),
            deferred: VecDeque::new(),
            ordered_running: None,
            pending_tmfs: Vec::new(),
            next_ttt: 1,
            done_tx,
            done_rx,
            text: TextResponder::new(),
            discovered: Vec::new(),
            ping: None,
            last_rx: Instant::now(),
            closing: None,
            close_all_after_flush: false,
        };
        s.discovered = login::discovered_targets(&s.shared);
        s.update_window();
        s
    }

    /// MaxCmdSN = ExpCmdSN + window - 1 - (commands still holding
    /// resources), never decreasing.
    fn update_window(&mut self) {
        let busy =
            (self.writes.len() + self.in_flight.len() + self.queued.len() + self.deferred.len())
                as u32;
        let room = self.window.saturating_sub(busy).max(1);
        let m = self.exp_cmd_sn.wrapping_add(room - 1);
        if serial::gt(m, self.max_cmd_sn) {
            self.max_cmd_sn = m;
        }
    }

    fn next_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    fn alloc_ttt(&mut self) -> u32 {
        loop {
            let t = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1);
            if t != RESERVED_TAG && t != 0 {
                return t;
            }
        }
    }

    async fn run(&mut self, wire: &mut Wire) -> ConnEnd {
        let limits = self.shared.limits.clone();
        let nop_interval = Duration::from_secs(u64::from(limits.nop_in_interval_secs));
        let nop_timeout = Duration::from_secs(u64::from(limits.nop_in_timeout_secs));
        let mut shutdown = self.shared.shutdown.clone();
        let mut ctl = match self.reg.as_mut() {
            Some(r) => std::mem::replace(&mut r.ctl, mpsc::unbounded_channel().1),
            None => mpsc::unbounded_channel().1,
        };
        loop {
            // Handle everything already buffered.
            if let Err(end) = self.drain_input(wire) {
                self.closing.get_or_insert(end);
            }
            if wire.has_output() {
                // An initiator that stops reading must not pin the task:
                // bound the wait and keep listening for shutdown and
                // reinstatement meanwhile.
                tokio::select! {
                    r = tokio::time::timeout(WRITE_STALL, wire.flush()) => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return ConnEnd::Io(e),
                        Err(_) => return ConnEnd::Protocol("initiator stopped reading".into()),
                    },
                    _ = shutdown.wait_for(|s| *s) => return ConnEnd::Closed("target shutting down"),
                    Some(c) = ctl.recv() => {
                        match c {
                            SessionCtl::Close => {
                                return ConnEnd::Closed("closed by the target (reinstatement or reset)")
                            }
                            SessionCtl::AbortTasks { lun } => self.abort_matching(wire, |l| {
                                lun.is_none_or(|x| same_lun(l, x))
                            }),
                        }
                        // The unsent output is kept; send it next round.
                        continue;
                    }
                }
            }
            if self.close_all_after_flush {
                self.close_all_after_flush = false;
                self.cold_reset_close();
            }
            if let Some(end) = self.closing.take() {
                return end;
            }
            let deadline = match self.ping {
                Some((_, sent)) => sent + nop_timeout,
                None if !nop_interval.is_zero() => self.last_rx + nop_interval,
                None => Instant::now() + Duration::from_secs(3600),
            };
            tokio::select! {
                r = wire.fill() => match r {
                    Ok(true) => self.last_rx = Instant::now(),
                    Ok(false) => return ConnEnd::Eof,
                    Err(e) => return ConnEnd::Io(e),
                },
                Some(c) = self.done_rx.recv() => self.complete(wire, c),
                Some(c) = ctl.recv() => match c {
                    SessionCtl::Close => return ConnEnd::Closed("closed by the target (reinstatement or reset)"),
                    SessionCtl::AbortTasks { lun } => self.abort_matching(wire, |l| lun.is_none_or(|x| same_lun(l, x))),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    if let Some((_, sent)) = self.ping {
                        if sent.elapsed() >= nop_timeout {
                            return ConnEnd::Protocol("NOP-In ping not answered".into());
                        }
                    } else if !nop_interval.is_zero() && self.last_rx.elapsed() >= nop_interval {
                        self.send_ping(wire);
                    }
                },
                _ = shutdown.wait_for(|s| *s) => return ConnEnd::Closed("target shutting down"),
            }
        }
    }

    /// After the loop: let commands running on the blocking pool finish
    /// (their results are discarded if the socket is gone), then release
    /// the I_T nexus.
    async fn finish(&mut self, wire: &mut Wire) {
        while !self.in_flight.is_empty() {
            match tokio::time::timeout(Duration::from_secs(30), self.done_rx.recv()).await {
                Ok(Some(c)) => self.complete(wire, c),
                _ => break,
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = wire.flush().await;
            let _ = wire.wr.shutdown().await;
        })
        .await;
        if let (Some(nexus), Some(t)) = (&self.nexus, self.target) {
            for lu in self.shared.targets[t].luns.values() {
                lu.nexus_lost(nexus);
            }
        }
        if let Some(reg) = self.reg.take() {
            self.shared.sessions().remove(reg.tsih, &reg.alive);
            drop(reg);
        }
    }

    fn send_ping(&mut self, wire: &mut Wire) {
        let ttt = self.alloc_ttt();
        let nop = NopIn {
            lun: Lun::default(),
            itt: RESERVED_TAG,
            ttt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
            data: Bytes::new(),
        };
        wire.push_pdu(&nop.to_pdu());
        self.ping = Some((ttt, Instant::now()));
        debug!(peer = %self.peer, ttt, "NOP-In ping");
    }

    /// Decode and handle every complete PDU in the read buffer.
    fn drain_input(&mut self, wire: &mut Wire) -> Result<(), ConnEnd> {
        while self.closing.is_none() {
            let pdu = match wire.codec.decode(&mut wire.rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    if let Some((reason, bhs)) = e.reject() {
                        let bhs = *bhs;
                        self.reject(wire, reason, &bhs);
                    }
                    if e.is_fatal() {
                        return Err(ConnEnd::Protocol(e.to_string()));
                    }
                    continue;
                }
            };
            self.ping = None; // any PDU shows the initiator is alive
            self.handle_pdu(wire, pdu)?;
        }
        Ok(())
    }

    fn reject(&mut self, wire: &mut Wire, reason: RejectReason, bhs: &[u8; BHS_LEN]) {
        debug!(peer = %self.peer, ?reason, opcode = bhs[0] & 0x3f, "Reject");
        let mut r = Reject::new(reason, bhs);
        r.stat_sn = self.next_stat_sn();
        r.exp_cmd_sn = self.exp_cmd_sn;
        r.max_cmd_sn = self.max_cmd_sn;
        wire.push_pdu(&r.to_pdu());
    }

    /// CmdSN ordering for a non-immediate PDU that carries a CmdSN.
    /// Returns true when it is to be handled now.
    fn admit(&mut self, pdu: &Pdu) -> bool {
        let sn = pdu.cmd_sn();
        if sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            return true;
        }
        if serial::in_window(sn, self.exp_cmd_sn, self.max_cmd_sn) {
            if self.queued.len() < self.window as usize {
                self.queued.insert(sn, pdu.clone());
            }
        } else {
            debug!(peer = %self.peer, sn, exp = self.exp_cmd_sn, max = self.max_cmd_sn,
                "dropping PDU outside the command window");
        }
        false
    }

    fn handle_pdu(&mut self, wire: &mut Wire, pdu: Pdu) -> Result<(), ConnEnd> {
        let op = match pdu.opcode() {
            Ok(op) => op,
            Err(_) => {
                self.reject(wire, RejectReason::CommandNotSupported, &pdu.bhs);
                return Ok(());
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
        if ordered {
            if !self.admit(&pdu) {
                return Ok(());
            }
            self.dispatch(wire, pdu)?;
            // Commands queued behind this one may now run.
            while let Some(next) = self.queued.remove(&self.exp_cmd_sn) {
                self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
                self.dispatch(wire, next)?;
            }
            self.update_window();
            Ok(())
        } else {
            self.dispatch(wire, pdu)
        }
    }

    fn dispatch(&mut self, wire: &mut Wire, pdu: Pdu) -> Result<(), ConnEnd> {
        let parsed = match InitiatorPdu::parse(&pdu) {
            Ok(p) => p,
            Err(e) => {
                debug!(peer = %self.peer, "malformed PDU: {e}");
                self.reject(wire, e.reject_reason(), &pdu.bhs);
                return Ok(());
            }
        };
        match parsed {
            InitiatorPdu::ScsiCommand(cmd) => {
                if self.target.is_none() {
                    self.reject(wire, RejectReason::ProtocolError, &pdu.bhs);
                } else {
                    self.submit(wire, cmd);
                }
            }
            InitiatorPdu::DataOut(d) => self.data_out(wire, d)?,
            InitiatorPdu::NopOut(n) => self.nop_out(wire, n, &pdu.bhs),
            InitiatorPdu::TaskMgmtRequest(t) => {
                if self.target.is_none() {
                    self.reject(wire, RejectReason::ProtocolError, &pdu.bhs);
                } else {
                    self.task_mgmt(wire, t);
                }
            }
            InitiatorPdu::TextRequest(t) => self.text(wire, t, &pdu.bhs),
            InitiatorPdu::LogoutRequest(l) => self.logout(wire, l),
            InitiatorPdu::SnackRequest(_) => {
                // ERL 0: no SNACK support.
                self.reject(wire, RejectReason::ProtocolError, &pdu.bhs);
            }
            InitiatorPdu::LoginRequest(_) => {
                // A login request in full feature phase is a protocol error.
                self.reject(wire, RejectReason::ProtocolError, &pdu.bhs);
            }
        }
        Ok(())
    }

    // ----------------------------------------------------------------- NOP

    fn nop_out(&mut self, wire: &mut Wire, n: NopOut, bhs: &[u8; BHS_LEN]) {
        if n.itt == RESERVED_TAG {
            // A ping answer (TTT = ours) or a bare CmdSN update: no reply.
            if n.ttt != RESERVED_TAG && self.ping.is_some_and(|(t, _)| t != n.ttt) {
                debug!(peer = %self.peer, ttt = n.ttt, "NOP-Out for an unknown ping");
            }
            if !n.immediate && n.ttt == RESERVED_TAG {
                // ITT reserved must be immediate (RFC 7143 11.18).
                self.reject(wire, RejectReason::ProtocolError, bhs);
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
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
            data,
        };
        wire.push_pdu(&reply.to_pdu());
    }

    // ---------------------------------------------------------- SCSI cmds

    fn lu_for(&self, lun: Lun) -> Option<Arc<LogicalUnit>> {
        let t = &self.shared.targets[self.target?];
        let n = lun.number()?;
        t.luns.get(&u64::from(n)).cloned()
    }

    /// Start a command now or hold it back for task ordering.
    fn submit(&mut self, wire: &mut Wire, cmd: ScsiCommand) {
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
        } else {
            self.start(wire, cmd);
        }
    }

    fn start(&mut self, wire: &mut Wire, cmd: ScsiCommand) {
        let ordered = cmd.attr == TaskAttr::Ordered;
        let itt = cmd.itt;
        self.scsi_command(wire, cmd);
        if ordered && (self.writes.contains_key(&itt) || self.in_flight.contains_key(&itt)) {
            self.ordered_running = Some(itt);
        }
    }

    /// Start held-back commands whose turn has come.
    fn release_deferred(&mut self, wire: &mut Wire) {
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
            let Some(cmd) = self.deferred.pop_front() else {
                break;
            };
            self.start(wire, cmd);
        }
    }

    fn scsi_command(&mut self, wire: &mut Wire, cmd: ScsiCommand) {
        if self.writes.contains_key(&cmd.itt) || self.in_flight.contains_key(&cmd.itt) {
            // ITT in use: a protocol error we answer like LIO does.
            let pdu = cmd.to_pdu();
            self.reject(wire, RejectReason::TaskInProgress, &pdu.bhs);
            return;
        }
        if cmd.immediate && self.writes.len() + self.in_flight.len() >= self.window as usize {
            // Immediate commands bypass the CmdSN window; they must not
            // bypass the resource limit too.
            let pdu = cmd.to_pdu();
            self.reject(wire, RejectReason::ImmediateCommandReject, &pdu.bhs);
            return;
        }
        let lu = self.lu_for(cmd.lun);
        let cdb = cmd.cdb.as_slice();
        let edtl = cmd.expected_data_transfer_length;
        let wanted_out: Option<u32> = if cmd.write {
            match &lu {
                Some(lu) => lu
                    .data_out_len(cdb)
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
                None => Some(0),
            }
        } else {
            None
        };
        let meta = Meta {
            itt: cmd.itt,
            lun: cmd.lun,
            read: cmd.read,
            write: cmd.write,
            edtl,
            wanted_out,
        };
        if !cmd.write {
            let cdb = cmd.cdb;
            self.execute(wire, meta, lu, cdb.as_slice(), Bytes::new());
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
            self.respond(wire, &meta, CommandOutcome::check_condition(field));
            return;
        }
        let buffered: u64 = self.writes.values().map(|t| u64::from(t.collect)).sum();
        if !self.writes.is_empty() && buffered + u64::from(collect) > SESSION_WRITE_BUDGET {
            // Too much write data already buffered for this session: the
            // initiator retries when earlier writes have completed.
            self.respond(
                wire,
                &meta,
                CommandOutcome::with_status(ScsiStatus::TaskSetFull),
            );
            return;
        }
        let unsolicited_limit = if self.params.initial_r2t {
            cmd.data.len() as u32
        } else {
            edtl.min(self.params.first_burst_length)
        };
        let imm = cmd.data.len() as u32;
        if imm > edtl || imm > self.params.first_burst_length {
            let pdu = cmd.to_pdu();
            self.reject(wire, RejectReason::ProtocolError, &pdu.bhs);
            return;
        }
        // COMPARE AND WRITE and WRITE SAME need exactly the data-out their
        // CDB implies; any other expected length fails the command.
        if let Some(lu) = &lu {
            if let Err(sense) = lu.check_data_out_length(cdb, u64::from(edtl)) {
                self.discard_then_respond(wire, meta, &cmd, CommandOutcome::check_condition(sense));
                return;
            }
        }
        // Data the CDB does not want, or EDTL not a whole number of what
        // the command transfers, cannot be executed faithfully.
        if wanted > edtl && edtl > 0 && wanted_out.is_some() {
            if let Some(lu) = &lu {
                let bs = lu.config().block_size;
                if is_block_transfer(cdb) && !edtl.is_multiple_of(bs) {
                    let outcome = CommandOutcome::check_condition(Sense::illegal_request(
                        keyfence_scsi::sense::Asc(0x0e, 0x03),
                    ));
                    self.discard_then_respond(wire, meta, &cmd, outcome);
                    return;
                }
            }
        }
        if cmd.final_bit && imm >= collect {
            // Everything came as immediate data: run it now, without
            // copying the data.
            let data = cmd.data.slice(..collect as usize);
            self.execute(wire, meta, lu, cdb, data);
            return;
        }
        let mut buf = BytesMut::with_capacity(collect as usize);
        let take = imm.min(collect) as usize;
        buf.extend_from_slice(&cmd.data[..take]);
        let mut task = WriteTask {
            lun: cmd.lun,
            lu,
            cdb: Bytes::copy_from_slice(cdb),
            edtl,
            wanted,
            collect,
            buf,
            received: imm,
            unsolicited_open: !cmd.final_bit,
            unsolicited_limit,
            next_unsol_data_sn: 0,
            next_unsol_offset: imm,
            next_r2t_offset: if cmd.final_bit {
                imm
            } else {
                unsolicited_limit
            },
            r2t_sn: 0,
            r2ts: Vec::new(),
            read: cmd.read,
        };
        task.next_r2t_offset = task.next_r2t_offset.min(edtl);
        let _ = task.read;
        self.writes.insert(cmd.itt, task);
        self.advance_write(wire, meta);
    }

    /// Reply at once to a write we will not execute, swallowing the
    /// unsolicited data still on its way.
    fn discard_then_respond(
        &mut self,
        wire: &mut Wire,
        meta: Meta,
        cmd: &ScsiCommand,
        outcome: CommandOutcome,
    ) {
        if !cmd.final_bit {
            // Remaining unsolicited Data-Out PDUs arrive for an ITT we no
            // longer know and are dropped.
        }
        self.respond(wire, &meta, outcome);
    }

    /// Issue R2Ts or execute once all data is in.
    fn advance_write(&mut self, wire: &mut Wire, meta: Meta) {
        let max_burst = self.params.max_burst_length;
        let max_r2t = usize::from(self.params.max_outstanding_r2t.max(1));
        let mut r2ts = Vec::new();
        let done = {
            let Some(t) = self.writes.get_mut(&meta.itt) else {
                return;
            };
            // Solicit what remains of the data we want, once unsolicited
            // data is complete, within MaxOutstandingR2T.
            while !t.unsolicited_open && t.next_r2t_offset < t.collect && t.r2ts.len() < max_r2t {
                let len = (t.collect - t.next_r2t_offset).min(max_burst);
                r2ts.push((t.next_r2t_offset, len, t.r2t_sn));
                t.r2ts.push(OpenR2t {
                    ttt: 0,
                    offset: t.next_r2t_offset,
                    len,
                    got: 0,
                    next_data_sn: 0,
                });
                t.next_r2t_offset += len;
                t.r2t_sn = t.r2t_sn.wrapping_add(1);
            }
            !t.unsolicited_open && t.r2ts.is_empty() && t.received_enough()
        };
        for (offset, len, r2t_sn) in r2ts {
            let ttt = self.alloc_ttt();
            if let Some(t) = self.writes.get_mut(&meta.itt) {
                if let Some(o) = t.r2ts.iter_mut().find(|o| o.offset == offset && o.ttt == 0) {
                    o.ttt = ttt;
                }
            }
            let r2t = R2t {
                lun: meta.lun,
                itt: meta.itt,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn,
                r2t_sn,
                buffer_offset: offset,
                desired_data_transfer_length: len,
            };
            wire.push_pdu(&r2t.to_pdu());
        }
        if done {
            if let Some(t) = self.writes.remove(&meta.itt) {
                self.execute(wire, meta, t.lu, &t.cdb, t.buf.freeze());
            }
        }
    }

    fn data_out(&mut self, wire: &mut Wire, d: DataOut) -> Result<(), ConnEnd> {
        let Some(t) = self.writes.get_mut(&d.itt) else {
            // Data for a task that was answered early or aborted.
            debug!(peer = %self.peer, itt = d.itt, "Data-Out for no active task; dropped");
            return Ok(());
        };
        if let Err((code, why)) = t.accept(&d) {
            // ERL 0 has no within-command recovery: the command ends with
            // CHECK CONDITION, ABORTED COMMAND; Data-Out still on its way
            // for it is dropped.
            debug!(peer = %self.peer, itt = d.itt, "{why}");
            let meta = Meta {
                itt: d.itt,
                lun: t.lun,
                read: false,
                write: true,
                edtl: t.edtl,
                wanted_out: Some(t.wanted),
            };
            self.writes.remove(&d.itt);
            let sense = Sense::new(keyfence_scsi::SenseKey::AbortedCommand, code);
            self.respond(wire, &meta, CommandOutcome::check_condition(sense));
            self.update_window();
            return Ok(());
        }
        let meta = Meta {
            itt: d.itt,
            lun: t.lun,
            read: t.read,
            write: true,
            edtl: t.edtl,
            wanted_out: Some(t.wanted),
        };
        self.advance_write(wire, meta);
        if self.ordered_running.is_some() || !self.deferred.is_empty() {
            self.release_deferred(wire);
        }
        Ok(())
    }

    fn execute(
        &mut self,
        wire: &mut Wire,
        meta: Meta,
        lu: Option<Arc<LogicalUnit>>,
        cdb: &[u8],
        data_out: Bytes,
    ) {
        let Some(nexus) = self.nexus.clone() else {
            return;
        };
        let Some(lu) = lu else {
            let t = &self.shared.targets[self.target.unwrap_or(0)];
            let req = CommandRequest {
                nexus: &nexus,
                cdb,
                data_out: &data_out,
            };
            let outcome = execute_no_lu(&req, &t.lun_list);
            self.respond(wire, &meta, outcome);
            return;
        };
        if lu.is_blocking(cdb) {
            self.in_flight.insert(
                meta.itt,
                InFlight {
                    lun: meta.lun,
                    aborted: false,
                },
            );
            let tx = self.done_tx.clone();
            let cdb = Bytes::copy_from_slice(cdb);
            tokio::task::spawn_blocking(move || {
                let req = CommandRequest {
                    nexus: &nexus,
                    cdb: &cdb,
                    data_out: &data_out,
                };
                let outcome = lu.execute(&req);
                let _ = tx.send(Completion { meta, outcome });
            });
            return;
        }
        let req = CommandRequest {
            nexus: &nexus,
            cdb,
            data_out: &data_out,
        };
        let outcome = lu.execute(&req);
        self.respond(wire, &meta, outcome);
    }

    fn complete(&mut self, wire: &mut Wire, c: Completion) {
        let aborted = self.in_flight.remove(&c.meta.itt).is_none_or(|f| f.aborted);
        if !aborted {
            self.respond(wire, &c.meta, c.outcome);
        }
        self.finish_tmfs(wire, c.meta.itt);
        self.release_deferred(wire);
        self.update_window();
    }

    /// Send Data-In and status for an executed command and carry out its
    /// effects.
    fn respond(&mut self, wire: &mut Wire, meta: &Meta, outcome: CommandOutcome) {
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
        } else {
            let dlen = u32::try_from(data.len()).unwrap_or(u32::MAX);
            (Bytes::new(), Residual::from_lengths(meta.edtl, dlen))
        };
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
                    exp_cmd_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn,
                    data_sn,
                    buffer_offset: off as u32,
                    data: send.slice(off..off + n),
                };
                wire.push(&d.header(), &d.data);
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
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
            exp_data_sn: 0,
            sense,
            response_data: Bytes::new(),
        };
        wire.push_pdu(&r.to_pdu());
    }

    fn apply_effect(&mut self, meta: &Meta, e: &LuEffect) {
        // PREEMPT AND ABORT: the preempted nexus loses its tasks on this LU.
        let LuEffect::AbortTasks { nexus } = e;
        let lun = meta.lun;
        if self.nexus.as_ref() == Some(nexus) {
            let itt = meta.itt;
            self.abort_where(|i, l| i != itt && lun_eq(l, lun));
        }
        if let Some(n) = lun.number().map(u64::from) {
            self.shared.sessions().send_to_nexus(
                nexus,
                Some(self.tsih),
                SessionCtl::AbortTasks { lun: Some(n) },
            );
        }
    }

    // ------------------------------------------------------------- aborts

    /// Abort (silently) the tasks of this session matching `f(itt, lun)`.
    /// Returns the ITTs still running on the blocking pool.
    fn abort_where(&mut self, f: impl Fn(u32, Lun) -> bool) -> Vec<u32> {
        self.writes.retain(|itt, t| !f(*itt, t.lun));
        self.deferred.retain(|c| !f(c.itt, c.lun));
        let mut running = Vec::new();
        for (itt, fl) in self.in_flight.iter_mut() {
            if f(*itt, fl.lun) {
                fl.aborted = true;
                running.push(*itt);
            }
        }
        // Queued commands not yet started are aborted too.
        self.queued.retain(|_, p| {
            let is_cmd = p.opcode_raw() == Opcode::ScsiCommand as u8;
            !(is_cmd && f(p.itt(), p.lun()))
        });
        running
    }

    fn abort_matching(&mut self, wire: &mut Wire, lun_pred: impl Fn(Lun) -> bool) {
        self.abort_where(|_, l| lun_pred(l));
        self.release_deferred(wire);
        self.update_window();
    }

    fn finish_tmfs(&mut self, wire: &mut Wire, itt: u32) {
        let mut ready = Vec::new();
        for p in &mut self.pending_tmfs {
            p.waiting.retain(|x| *x != itt);
        }
        self.pending_tmfs.retain(|p| {
            if p.waiting.is_empty() {
                ready.push((p.itt, p.after));
                false
            } else {
                true
            }
        });
        for (tmf_itt, after) in ready {
            self.tmf_response(wire, tmf_itt, TmfResponse::FunctionComplete);
            if after == TmfAfter::CloseAll {
                self.close_all_after_flush = true;
            }
        }
    }

    fn tmf_response(&mut self, wire: &mut Wire, itt: u32, response: TmfResponse) {
        let r = TaskMgmtResponse {
            response,
            itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
        };
        wire.push_pdu(&r.to_pdu());
    }

    fn task_mgmt(&mut self, wire: &mut Wire, t: TaskMgmtRequest) {
        let Some(target) = self.target else { return };
        let lu = self.lu_for(t.lun);
        let lun_n = t.lun.number().map(u64::from);
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
                    || self.queued.values().any(|p| p.itt() == rtt)
                    || self
                        .deferred
                        .iter()
                        .any(|c| c.itt == rtt && lun_eq(c.lun, t.lun));
                if !known {
                    // Not found. If its CmdSN is in the window but has not
                    // arrived, RFC 7143 11.5.1 says "function complete".
                    let pending = serial::in_window(t.ref_cmd_sn, self.exp_cmd_sn, self.max_cmd_sn);
                    let resp = if pending {
                        TmfResponse::FunctionComplete
                    } else {
                        TmfResponse::TaskDoesNotExist
                    };
                    self.tmf_response(wire, t.itt, resp);
                    return;
                }
                self.abort_where(|i, _| i == rtt)
            }
            TmfFunction::AbortTaskSet | TmfFunction::ClearTaskSet => {
                if lu.is_none() {
                    self.tmf_response(wire, t.itt, TmfResponse::LunDoesNotExist);
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
                    self.tmf_response(wire, t.itt, TmfResponse::LunDoesNotExist);
                    return;
                };
                let lun = t.lun;
                let r = self.abort_where(|_, l| lun_eq(l, lun));
                self.shared.sessions().broadcast_target(
                    target,
                    Some(self.tsih),
                    SessionCtl::AbortTasks { lun: Some(n) },
                );
                lu.lu_reset();
                r
            }
            TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
                let cold = t.function == TmfFunction::TargetColdReset;
                let r = self.abort_where(|_, _| true);
                self.shared.sessions().broadcast_target(
                    target,
                    Some(self.tsih),
                    SessionCtl::AbortTasks { lun: None },
                );
                for lu in self.shared.targets[target].luns.values() {
                    lu.target_reset(cold);
                }
                if cold {
                    after = TmfAfter::CloseAll;
                }
                r
            }
            TmfFunction::TaskReassign => {
                self.tmf_response(wire, t.itt, TmfResponse::ReassignmentNotSupported);
                return;
            }
            TmfFunction::ClearAca => {
                self.tmf_response(wire, t.itt, TmfResponse::FunctionNotSupported);
                return;
            }
        };
        self.release_deferred(wire);
        self.update_window();
        if running.is_empty() {
            self.tmf_response(wire, t.itt, TmfResponse::FunctionComplete);
            if after == TmfAfter::CloseAll {
                self.close_all_after_flush = true;
            }
        } else {
            self.pending_tmfs.push(PendingTmf {
                itt: t.itt,
                waiting: running,
                after,
            });
        }
    }

    /// TARGET COLD RESET: every session of the target is dropped, this one
    /// after its response has been sent.
    fn cold_reset_close(&mut self) {
        if let Some(t) = self.target {
            self.shared
                .sessions()
                .broadcast_target(t, Some(self.tsih), SessionCtl::Close);
        }
        self.closing = Some(ConnEnd::Closed("TARGET COLD RESET"));
    }

    // --------------------------------------------------------------- text

    fn text(&mut self, wire: &mut Wire, t: TextRequest, bhs: &[u8; BHS_LEN]) {
        let own = self.target.map(|i| self.shared.targets[i].name.clone());
        let ctx = TextContext {
            targets: &self.discovered,
            session_target: own.as_deref(),
            max_send_data_segment_length: self.params.max_send_data_segment_length,
        };
        match self.text.handle(&t, &ctx) {
            Ok(mut r) => {
                r.stat_sn = self.next_stat_sn();
                r.exp_cmd_sn = self.exp_cmd_sn;
                r.max_cmd_sn = self.max_cmd_sn;
                wire.push_pdu(&r.to_pdu());
            }
            Err(e) => {
                debug!(peer = %self.peer, "text request: {e}");
                let reason = match e {
                    TextError::UnknownTtt(_) => RejectReason::ProtocolError,
                    _ => RejectReason::InvalidPduField,
                };
                self.reject(wire, reason, bhs);
            }
        }
    }

    // ------------------------------------------------------------- logout

    fn logout(&mut self, wire: &mut Wire, l: LogoutRequest) {
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
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
            time2wait: 0,
            time2retain: 0,
        };
        wire.push_pdu(&r.to_pdu());
        if response == LogoutResponseCode::Success {
            // The logout ends every task: those still collecting data or
            // held back are dropped, running ones finish without status.
            self.abort_where(|_, _| true);
            self.closing = Some(ConnEnd::Logout);
        }
    }
}

impl WriteTask {
    /// Check a Data-Out against the sequence this task expects and store
    /// its data.
    fn accept(&mut self, d: &DataOut) -> Result<(), (keyfence_scsi::sense::Asc, String)> {
        use keyfence_scsi::sense::Asc;
        const DATA_PHASE_ERROR: Asc = Asc(0x4b, 0x00);
        const INVALID_TTT: Asc = Asc(0x4b, 0x01);
        const TOO_MUCH_WRITE_DATA: Asc = Asc(0x4b, 0x02);
        const DATA_OFFSET_ERROR: Asc = Asc(0x4b, 0x05);
        let len = d.data.len() as u32;
        let end = d.buffer_offset.checked_add(len);
        if end.is_none_or(|e| e > self.edtl) {
            return Err((
                TOO_MUCH_WRITE_DATA,
                format!("Data-Out beyond EDTL (offset {} + {len})", d.buffer_offset),
            ));
        }
        if d.ttt == RESERVED_TAG {
            if !self.unsolicited_open {
                return Err((DATA_PHASE_ERROR, "unsolicited Data-Out not expected".into()));
            }
            if d.data_sn != self.next_unsol_data_sn {
                return Err((
                    DATA_PHASE_ERROR,
                    format!(
                        "unsolicited Data-Out DataSN {} (expected {})",
                        d.data_sn, self.next_unsol_data_sn
                    ),
                ));
            }
            if d.buffer_offset != self.next_unsol_offset
                || end.is_none_or(|e| e > self.unsolicited_limit)
            {
                return Err((
                    DATA_OFFSET_ERROR,
                    format!(
                        "unsolicited Data-Out at offset {} out of order or beyond FirstBurstLength",
                        d.buffer_offset
                    ),
                ));
            }
            self.next_unsol_data_sn = self.next_unsol_data_sn.wrapping_add(1);
            self.next_unsol_offset = self.next_unsol_offset.saturating_add(len);
            if d.final_bit {
                self.unsolicited_open = false;
            }
        } else {
            let Some(r) = self.r2ts.iter_mut().find(|r| r.ttt == d.ttt) else {
                return Err((
                    INVALID_TTT,
                    format!("Data-Out with unknown TTT {:#x}", d.ttt),
                ));
            };
            if d.data_sn != r.next_data_sn {
                return Err((
                    DATA_PHASE_ERROR,
                    format!(
                        "solicited Data-Out DataSN {} (expected {})",
                        d.data_sn, r.next_data_sn
                    ),
                ));
            }
            let r_end = r.offset + r.len;
            // DataPDUInOrder=Yes: each PDU continues where the last ended.
            if d.buffer_offset != r.offset + r.got || end.is_none_or(|e| e > r_end) {
                return Err((
                    DATA_OFFSET_ERROR,
                    format!(
                        "solicited Data-Out offset {} outside the R2T",
                        d.buffer_offset
                    ),
                ));
            }
            r.next_data_sn = r.next_data_sn.wrapping_add(1);
            r.got += len;
            if d.final_bit || r.got >= r.len {
                let ttt = r.ttt;
                self.r2ts.retain(|x| x.ttt != ttt);
            }
        }
        self.store(d.buffer_offset, &d.data);
        self.received = self.received.saturating_add(len);
        Ok(())
    }

    fn received_enough(&self) -> bool {
        self.buf.len() as u32 >= self.collect
    }

    /// Store data at `offset`, keeping only the first `collect` bytes.
    fn store(&mut self, offset: u32, data: &[u8]) {
        let start = offset as usize;
        let end = (offset as usize + data.len()).min(self.collect as usize);
        if start >= end {
            return;
        }
        let have = self.buf.len();
        if start > have {
            // A hole (offsets are checked in order, so this is rare): fill
            // with zeroes until the data that fills it arrives.
            self.buf.resize(start, 0);
        }
        let src = &data[..end - start];
        if start == self.buf.len() {
            self.buf.extend_from_slice(src);
        } else {
            let overlap_end = end.min(self.buf.len());
            self.buf[start..overlap_end].copy_from_slice(&src[..overlap_end - start]);
            if end > overlap_end {
                self.buf.extend_from_slice(&src[overlap_end - start..]);
            }
        }
        let _ = (self.edtl, self.wanted);
    }
}

/// Do two LUN fields address the same logical unit?
fn lun_eq(a: Lun, b: Lun) -> bool {
    a == b || a.number().is_some_and(|n| b.number() == Some(n))
}

/// Does the LUN field `l` address LUN number `n` (in any of the
/// encodings an initiator may use for it)?
fn same_lun(l: Lun, n: u64) -> bool {
    l.number().is_some_and(|m| u64::from(m) == n)
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
