//! A full-feature iSCSI session over one TCP connection (error recovery
//! level 0).
//!
//! A [`Session`] is a cheap, clonable handle. Any number of tasks may call
//! [`Session::execute`] at once: each command gets its own Initiator Task
//! Tag and CmdSN, and commands are only sent while CmdSN lies inside the
//! target's window (ExpCmdSN..=MaxCmdSN, RFC 7143 §4.2.2.1); beyond that,
//! callers wait for the window to open. Two background tasks own the
//! socket:
//!
//! * the *writer* batches queued PDUs into large writes and stamps each one
//!   with the current ExpStatSN;
//! * the *reader* decodes PDUs, updates the CmdSN window and ExpStatSN,
//!   gathers Data-In, answers R2Ts with Data-Out (from the caller's write
//!   buffer, within MaxBurstLength and the target's
//!   MaxRecvDataSegmentLength), answers target NOP-In pings, and completes
//!   commands.
//!
//! Write data goes out as immediate data (ImmediateData=Yes), then as
//! unsolicited Data-Out up to FirstBurstLength (InitialR2T=No), then as
//! R2T-solicited Data-Out. Any protocol violation by the target ends the
//! session (at ERL 0 there is no recovery within a session): outstanding
//! commands fail with [`Error::ConnectionLost`] and the caller may log in
//! again (see `Device::reconnect`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::pdu::{
    AsyncMessage, Cdb, DataIn, DataOut, LogoutReason, LogoutRequest, LogoutResponse, NopIn, NopOut,
    R2t, Reject, Residual, ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse,
    TextRequest, TextResponse, TmfFunction, TmfResponse, RESERVED_TAG,
};
use keyfence_iscsi::{serial, Lun, Opcode, Pdu, PduCodec, SessionParams};
use keyfence_scsi::Sense;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use crate::commands::Command;
use crate::error::{Error, Result};

/// The outcome of a SCSI command that reached the device server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResult {
    /// The SCSI status byte (see [`keyfence_scsi::ScsiStatus`]).
    pub status: u8,
    /// Sense data, when the target returned any (normally with CHECK
    /// CONDITION).
    pub sense: Option<Sense>,
    /// Data-In received (empty for commands without input).
    pub data: Bytes,
    /// Residual reported by the target for the expected transfer length.
    pub residual: Residual,
}

impl ScsiResult {
    /// The status as a [`keyfence_scsi::ScsiStatus`] (`None` for a value SAM-5 does
    /// not define).
    pub fn scsi_status(&self) -> Option<keyfence_scsi::ScsiStatus> {
        keyfence_scsi::ScsiStatus::from_u8(self.status)
    }

    /// True for GOOD (and CONDITION MET).
    pub fn is_good(&self) -> bool {
        matches!(self.status, 0x00 | 0x04)
    }

    /// Map a non-GOOD status to the matching [`Error`].
    pub fn into_result(self) -> Result<ScsiResult> {
        match self.status {
            0x00 | 0x04 => Ok(self),
            0x02 => Err(Error::from_check_condition(self.sense)),
            0x18 => Err(Error::ReservationConflict),
            s => Err(Error::Status(s)),
        }
    }
}

/// Reply a background task hands to a waiting caller.
enum Reply {
    Scsi(ScsiResult),
    Nop,
    Logout(LogoutResponse),
    Tmf(TmfResponse),
    Text(TextResponse),
}

enum TaskKind {
    Scsi {
        lun: Lun,
        /// Data-In gathered so far.
        data_in: DataInBuf,
        data_in_len: u32,
        next_data_sn: u32,
        /// Write payload, kept for R2Ts.
        data_out: Bytes,
        next_r2t_sn: u32,
    },
    Nop,
    Logout,
    Tmf,
    Text,
}

/// Data-In of one command. The common case, all data in one PDU at offset
/// 0, keeps the received buffer without copying.
enum DataInBuf {
    Empty,
    Single(Bytes),
    Gathered(BytesMut),
}

impl DataInBuf {
    /// Place `data` at `off` (bounds already checked by the caller).
    fn put(&mut self, off: usize, data: Bytes) {
        match self {
            DataInBuf::Empty if off == 0 => *self = DataInBuf::Single(data),
            DataInBuf::Empty => {
                let mut b = BytesMut::with_capacity(off + data.len());
                b.resize(off, 0);
                b.extend_from_slice(&data);
                *self = DataInBuf::Gathered(b);
            }
            DataInBuf::Single(first) => {
                let mut b = BytesMut::with_capacity(first.len() + data.len());
                b.extend_from_slice(first);
                *self = DataInBuf::Gathered(b);
                self.put(off, data);
            }
            DataInBuf::Gathered(b) => {
                let end = off + data.len();
                if off == b.len() {
                    b.extend_from_slice(&data);
                } else {
                    if b.len() < end {
                        b.resize(end, 0);
                    }
                    b[off..end].copy_from_slice(&data);
                }
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            DataInBuf::Empty => Bytes::new(),
            DataInBuf::Single(b) => b,
            DataInBuf::Gathered(b) => b.freeze(),
        }
    }
}

struct Task {
    kind: TaskKind,
    cmd_sn: u32,
    reply: oneshot::Sender<Result<Reply>>,
}

struct State {
    /// CmdSN for the next non-immediate command.
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    next_itt: u32,
    tasks: HashMap<u32, Task>,
    /// Most tasks ever outstanding at once.
    peak: usize,
    /// Queue to the writer; `None` once the session is closed.
    tx: Option<mpsc::UnboundedSender<Pdu>>,
    closed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Woken when the CmdSN window moves or the session closes.
    window: Notify,
    /// Woken to stop the reader (writer failure, logout, drop).
    stop: Notify,
    stop_reason: Mutex<Option<String>>,
    exp_stat_sn: AtomicU32,
    /// Target NOP-In pings answered.
    pings_answered: AtomicU32,
    params: SessionParams,
}

/// Static facts about a logged-in session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub initiator_name: String,
    pub isid: u64,
    pub target_name: String,
    /// Target portal group tag the target reported at login.
    pub tpgt: Option<u16>,
    pub tsih: u16,
    pub portal: String,
    pub discovery: bool,
}

/// Timeouts and limits of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How long a command may take before it is aborted (ABORT TASK).
    pub command_timeout: Duration,
    /// Most commands this initiator keeps outstanding at once (on top of
    /// the target's CmdSN window).
    pub queue_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            command_timeout: Duration::from_secs(30),
            queue_depth: 128,
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    info: SessionInfo,
    limits: Limits,
    slots: Semaphore,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.shutdown("session handle dropped");
    }
}

/// A logged-in iSCSI session (cheap to clone; all clones share it).
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("info", &self.inner.info)
            .finish()
    }
}

/// The state a login leaves behind, from which the session starts.
pub(crate) struct LoggedIn {
    pub stream: TcpStream,
    /// Bytes read past the last login response (normally none).
    pub leftover: BytesMut,
    pub params: SessionParams,
    pub info: SessionInfo,
    pub cmd_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl Shared {
    fn shutdown(&self, reason: &str) {
        {
            let mut r = self.stop_reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some(reason.to_string());
            }
        }
        self.stop.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fail every outstanding task and refuse new ones.
    fn close(&self, reason: &str) {
        let tasks = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(reason.to_string());
            }
            st.tx = None;
            std::mem::take(&mut st.tasks)
        };
        for (_, t) in tasks {
            let _ = t.reply.send(Err(Error::ConnectionLost(reason.to_string())));
        }
        self.window.notify_waiters();
    }

    /// Take ExpCmdSN/MaxCmdSN from a target PDU (RFC 7143 §4.2.2.1: ignore
    /// values that do not move forward or describe an invalid window).
    fn update_window(&self, exp: u32, max: u32) {
        // MaxCmdSN < ExpCmdSN - 1 is invalid and ignored.
        if serial::lt(max, exp.wrapping_sub(1)) {
            return;
        }
        let moved = {
            let mut st = self.lock();
            let mut moved = false;
            if serial::gt(exp, st.exp_cmd_sn) {
                st.exp_cmd_sn = exp;
                moved = true;
            }
            if serial::gt(max, st.max_cmd_sn) {
                st.max_cmd_sn = max;
                moved = true;
            }
            moved
        };
        if moved {
            self.window.notify_waiters();
        }
    }

    /// Record a StatSN; `consumed` when the PDU carries status (the next
    /// expected StatSN is then one higher).
    fn update_stat_sn(&self, stat_sn: u32, consumed: bool) {
        let next = if consumed {
            stat_sn.wrapping_add(1)
        } else {
            stat_sn
        };
        let cur = self.exp_stat_sn.load(Ordering::Acquire);
        if serial::gt(next, cur) {
            self.exp_stat_sn.store(next, Ordering::Release);
        }
    }

    fn send(&self, st: &State, pdu: Pdu) -> Result<()> {
        match &st.tx {
            Some(tx) => tx.send(pdu).map_err(|_| Error::SessionClosed),
            None => Err(closed_error(st)),
        }
    }
}

fn closed_error(st: &State) -> Error {
    match &st.closed {
        Some(r) => Error::ConnectionLost(r.clone()),
        None => Error::SessionClosed,
    }
}

fn alloc_itt(st: &mut State) -> u32 {
    loop {
        let itt = st.next_itt;
        st.next_itt = st.next_itt.wrapping_add(1);
        if itt != RESERVED_TAG && !st.tasks.contains_key(&itt) {
            return itt;
        }
    }
}

impl Session {
    pub(crate) fn start(l: LoggedIn, limits: Limits) -> Session {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                cmd_sn: l.cmd_sn,
                exp_cmd_sn: l.exp_cmd_sn,
                max_cmd_sn: l.max_cmd_sn,
                next_itt: 0x1000,
                tasks: HashMap::new(),
                peak: 0,
                tx: Some(tx),
                closed: None,
            }),
            window: Notify::new(),
            stop: Notify::new(),
            stop_reason: Mutex::new(None),
            exp_stat_sn: AtomicU32::new(l.exp_stat_sn),
            pings_answered: AtomicU32::new(0),
            params: l.params.clone(),
        });
        let _ = l.stream.set_nodelay(true);
        let mut codec = PduCodec::new();
        codec.apply(&l.params);
        let (rd, wr) = l.stream.into_split();
        tokio::spawn(writer(wr, rx, codec.clone(), shared.clone()));
        tokio::spawn(reader(rd, l.leftover, codec, shared.clone()));
        let qd = limits.queue_depth.max(1) as usize;
        Session {
            inner: Arc::new(Inner {
                shared,
                info: l.info,
                limits,
                slots: Semaphore::new(qd),
            }),
        }
    }

    /// Names, ISID, TSIH and TPGT of this session.
    pub fn info(&self) -> &SessionInfo {
        &self.inner.info
    }

    /// The negotiated operational parameters.
    pub fn params(&self) -> &SessionParams {
        &self.inner.shared.params
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The SCSI initiator port (`name,i,0xISID`) this session speaks as.
    pub fn initiator_port(&self) -> keyfence_scsi::InitiatorPort {
        keyfence_scsi::InitiatorPort::new(&self.inner.info.initiator_name, self.inner.info.isid)
    }

    /// Why the session closed, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.inner.shared.lock().closed.clone()
    }

    /// How many target NOP-In pings this session has answered.
    pub fn pings_answered(&self) -> u32 {
        self.inner.shared.pings_answered.load(Ordering::Relaxed)
    }

    /// The most tasks (commands, pings, ...) that were outstanding at once.
    pub fn peak_outstanding(&self) -> usize {
        self.inner.shared.lock().peak
    }

    pub fn is_closed(&self) -> bool {
        self.closed_reason().is_some()
    }

    /// Run one SCSI command on `lun`. Returns the status as received; use
    /// [`ScsiResult::into_result`] to turn non-GOOD status into an error.
    pub async fn execute(&self, lun: u16, cmd: &Command) -> Result<ScsiResult> {
        let lun_field = Lun::from_number(lun)
            .ok_or_else(|| Error::InvalidArgument(format!("LUN {lun} is above 16383")))?;
        let cdb = Cdb::new(&cmd.cdb)
            .ok_or_else(|| Error::InvalidArgument(format!("CDB of {} bytes", cmd.cdb.len())))?;
        if cmd.data_in_len > 0 && !cmd.data_out.is_empty() {
            return Err(Error::InvalidArgument(
                "bidirectional commands are not supported".into(),
            ));
        }
        let out_len = u32::try_from(cmd.data_out.len())
            .map_err(|_| Error::InvalidArgument("write larger than 4 GiB".into()))?;
        let _slot = self
            .inner
            .slots
            .acquire()
            .await
            .map_err(|_| Error::SessionClosed)?;
        let p = &self.inner.shared.params;
        let max_send = p.max_send_data_segment_length.max(512) as usize;
        let data = &cmd.data_out;
        // Immediate data, then unsolicited Data-Out, both within FirstBurstLength.
        let first_burst = if p.initial_r2t && !p.immediate_data {
            0
        } else {
            (p.first_burst_length as usize).min(data.len())
        };
        let immediate = if p.immediate_data {
            first_burst.min(max_send)
        } else {
            0
        };
        let unsolicited_end = if p.initial_r2t {
            immediate
        } else {
            first_burst
        };
        let (itt, rx) = self
            .submit(false, |itt, cmd_sn| {
                let mut pdus = Vec::new();
                pdus.push(
                    ScsiCommand {
                        immediate: false,
                        final_bit: unsolicited_end == immediate,
                        read: cmd.data_in_len > 0,
                        write: !data.is_empty(),
                        attr: cmd.attr,
                        lun: lun_field,
                        itt,
                        expected_data_transfer_length: if data.is_empty() {
                            cmd.data_in_len
                        } else {
                            out_len
                        },
                        cmd_sn,
                        exp_stat_sn: 0,
                        cdb: cdb.clone(),
                        bidi_read_length: None,
                        data: data.slice(..immediate),
                    }
                    .to_pdu(),
                );
                data_out_pdus(
                    &mut pdus,
                    lun_field,
                    itt,
                    RESERVED_TAG,
                    data,
                    immediate,
                    unsolicited_end,
                    max_send,
                );
                let kind = TaskKind::Scsi {
                    lun: lun_field,
                    data_in: DataInBuf::Empty,
                    data_in_len: cmd.data_in_len,
                    next_data_sn: 0,
                    data_out: data.clone(),
                    next_r2t_sn: 0,
                };
                (kind, pdus)
            })
            .await?;
        match self.wait(itt, rx, "SCSI command").await {
            Ok(Reply::Scsi(r)) => Ok(r),
            Ok(_) => Err(Error::protocol("unexpected reply type for a SCSI command")),
            Err(e @ Error::Timeout { .. }) => {
                self.abort_after_timeout(lun_field, itt).await;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Queue a new task: wait for a CmdSN window slot (non-immediate
    /// tasks), assign ITT and CmdSN, and hand its PDUs to the writer.
    async fn submit<F>(
        &self,
        immediate: bool,
        build: F,
    ) -> Result<(u32, oneshot::Receiver<Result<Reply>>)>
    where
        F: FnOnce(u32, u32) -> (TaskKind, Vec<Pdu>),
    {
        let shared = &self.inner.shared;
        loop {
            let notified = shared.window.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = shared.lock();
                if st.tx.is_none() {
                    return Err(closed_error(&st));
                }
                let cmd_sn = st.cmd_sn;
                // Immediate PDUs carry the current CmdSN without taking it.
                if immediate || serial::le(cmd_sn, st.max_cmd_sn) {
                    if !immediate {
                        st.cmd_sn = cmd_sn.wrapping_add(1);
                    }
                    let itt = alloc_itt(&mut st);
                    let (kind, pdus) = build(itt, cmd_sn);
                    let (tx, rx) = oneshot::channel();
                    st.tasks.insert(
                        itt,
                        Task {
                            kind,
                            cmd_sn,
                            reply: tx,
                        },
                    );
                    st.peak = st.peak.max(st.tasks.len());
                    for pdu in pdus {
                        if let Err(e) = shared.send(&st, pdu) {
                            st.tasks.remove(&itt);
                            return Err(e);
                        }
                    }
                    return Ok((itt, rx));
                }
            }
            notified.await;
        }
    }

    async fn wait(
        &self,
        itt: u32,
        rx: oneshot::Receiver<Result<Reply>>,
        what: &'static str,
    ) -> Result<Reply> {
        let after = self.inner.limits.command_timeout;
        match tokio::time::timeout(after, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::SessionClosed),
            Err(_) => {
                // SCSI tasks stay registered until ABORT TASK has named
                // them (it needs their CmdSN); others are forgotten now.
                let mut st = self.inner.shared.lock();
                if !matches!(
                    st.tasks.get(&itt).map(|t| &t.kind),
                    Some(TaskKind::Scsi { .. })
                ) {
                    st.tasks.remove(&itt);
                }
                Err(Error::Timeout { what, after })
            }
        }
    }

    /// After a command timed out, ask the target to abort it; if even that
    /// does not complete, the session is unusable and is closed.
    async fn abort_after_timeout(&self, lun: Lun, itt: u32) {
        let r = self.task_management(TmfFunction::AbortTask, lun, itt).await;
        self.inner.shared.lock().tasks.remove(&itt);
        match r {
            Ok(TmfResponse::FunctionComplete) | Ok(TmfResponse::TaskDoesNotExist) => {}
            other => {
                tracing::warn!(itt, ?other, "ABORT TASK failed; closing session");
                self.inner
                    .shared
                    .shutdown("ABORT TASK after timeout failed");
            }
        }
    }

    /// Send a task management function (RFC 7143 §11.5). `referenced_itt`
    /// matters for ABORT TASK only.
    pub async fn task_management(
        &self,
        function: TmfFunction,
        lun: Lun,
        referenced_itt: u32,
    ) -> Result<TmfResponse> {
        let ref_cmd_sn = self
            .inner
            .shared
            .lock()
            .tasks
            .get(&referenced_itt)
            .map(|t| t.cmd_sn);
        let (itt, rx) = self
            .submit(true, |itt, cmd_sn| {
                let pdu = TaskMgmtRequest {
                    immediate: true,
                    function,
                    lun,
                    itt,
                    referenced_task_tag: if function == TmfFunction::AbortTask {
                        referenced_itt
                    } else {
                        RESERVED_TAG
                    },
                    cmd_sn,
                    exp_stat_sn: 0,
                    ref_cmd_sn: ref_cmd_sn.unwrap_or(cmd_sn),
                    exp_data_sn: 0,
                }
                .to_pdu();
                (TaskKind::Tmf, vec![pdu])
            })
            .await?;
        match self.wait(itt, rx, "task management response").await? {
            Reply::Tmf(r) => Ok(r),
            _ => Err(Error::protocol(
                "unexpected reply to a task management request",
            )),
        }
    }

    /// LOGICAL UNIT RESET of `lun`.
    pub async fn lun_reset(&self, lun: u16) -> Result<()> {
        let l = Lun::from_number(lun)
            .ok_or_else(|| Error::InvalidArgument(format!("LUN {lun} is above 16383")))?;
        match self
            .task_management(TmfFunction::LogicalUnitReset, l, RESERVED_TAG)
            .await?
        {
            TmfResponse::FunctionComplete => Ok(()),
            r => Err(Error::TaskManagement(r.to_u8())),
        }
    }

    /// Ping the target with a NOP-Out and return the round-trip time.
    pub async fn nop(&self) -> Result<Duration> {
        let t0 = Instant::now();
        let (itt, rx) = self
            .submit(true, |itt, cmd_sn| {
                let pdu = NopOut {
                    immediate: true,
                    lun: Lun::default(),
                    itt,
                    ttt: RESERVED_TAG,
                    cmd_sn,
                    exp_stat_sn: 0,
                    data: Bytes::new(),
                }
                .to_pdu();
                (TaskKind::Nop, vec![pdu])
            })
            .await?;
        match self.wait(itt, rx, "NOP-In").await? {
            Reply::Nop => Ok(t0.elapsed()),
            _ => Err(Error::protocol("unexpected reply to NOP-Out")),
        }
    }

    /// A text request/response exchange (e.g. `SendTargets=All`),
    /// following continuations (C bit) until the final response. Returns
    /// the concatenated key=value data.
    pub async fn text(&self, request: Bytes) -> Result<Bytes> {
        let mut out = BytesMut::new();
        let mut ttt = RESERVED_TAG;
        let mut data = request;
        // Bounded: a target that never finishes would otherwise loop forever.
        for _ in 0..1024 {
            let req = data.clone();
            let (itt, rx) = self
                .submit(false, move |itt, cmd_sn| {
                    let pdu = TextRequest {
                        immediate: false,
                        final_bit: true,
                        cont: false,
                        lun: Lun::default(),
                        itt,
                        ttt,
                        cmd_sn,
                        exp_stat_sn: 0,
                        data: req,
                    }
                    .to_pdu();
                    (TaskKind::Text, vec![pdu])
                })
                .await?;
            let r = match self.wait(itt, rx, "Text Response").await? {
                Reply::Text(r) => r,
                _ => return Err(Error::protocol("unexpected reply to Text Request")),
            };
            out.extend_from_slice(&r.data);
            if r.final_bit && !r.cont {
                return Ok(out.freeze());
            }
            if r.ttt == RESERVED_TAG {
                return Err(Error::protocol(
                    "Text Response not final but without a Target Transfer Tag",
                ));
            }
            ttt = r.ttt;
            data = Bytes::new();
        }
        Err(Error::protocol("Text Response never became final"))
    }

    /// Log out (close the session) and shut the connection.
    pub async fn logout(&self) -> Result<()> {
        let res = async {
            let (itt, rx) = self
                .submit(true, |itt, cmd_sn| {
                    let pdu = LogoutRequest {
                        immediate: true,
                        reason: LogoutReason::CloseSession,
                        itt,
                        cid: 0,
                        cmd_sn,
                        exp_stat_sn: 0,
                    }
                    .to_pdu();
                    (TaskKind::Logout, vec![pdu])
                })
                .await?;
            match self.wait(itt, rx, "Logout Response").await? {
                Reply::Logout(r)
                    if r.response == keyfence_iscsi::pdu::LogoutResponseCode::Success =>
                {
                    Ok(())
                }
                Reply::Logout(r) => {
                    Err(Error::protocol(format!("logout refused: {:?}", r.response)))
                }
                _ => Err(Error::protocol("unexpected reply to Logout Request")),
            }
        }
        .await;
        self.inner.shared.shutdown("logged out");
        self.inner.shared.close("logged out");
        res
    }
}

/// Append Data-Out PDUs carrying `data[from..to]`, each at most `max_seg`
/// bytes, DataSN from 0, F on the last.
#[allow(clippy::too_many_arguments)]
fn data_out_pdus(
    out: &mut Vec<Pdu>,
    lun: Lun,
    itt: u32,
    ttt: u32,
    data: &Bytes,
    from: usize,
    to: usize,
    max_seg: usize,
) {
    let mut off = from;
    let mut data_sn = 0u32;
    while off < to {
        let end = (off + max_seg).min(to);
        out.push(
            DataOut {
                final_bit: end == to,
                lun,
                itt,
                ttt,
                exp_stat_sn: 0,
                data_sn,
                buffer_offset: off as u32,
                data: data.slice(off..end),
            }
            .to_pdu(),
        );
        data_sn = data_sn.wrapping_add(1);
        off = end;
    }
}

/// Data segments at least this long are written from the caller's buffer
/// (vectored write) instead of being copied into the batch.
const ZERO_COPY_MIN: usize = 16 * 1024;

async fn writer(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Pdu>,
    codec: PduCodec,
    shared: Arc<Shared>,
) {
    const BATCH: usize = 1024 * 1024;
    // The batch as a list of segments: copied small parts and large
    // payloads referenced in place.
    let mut segs: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    let mut small = BytesMut::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        let mut total = 0usize;
        let mut next = Some(first);
        while let Some(mut pdu) = next.take() {
            // Every initiator PDU carries ExpStatSN at bytes 28..32.
            let esn = shared.exp_stat_sn.load(Ordering::Acquire);
            pdu.bhs[28..32].copy_from_slice(&esn.to_be_bytes());
            let before = small.len();
            let r = if pdu.data.len() >= ZERO_COPY_MIN {
                codec
                    .encode_header(&pdu.bhs, &pdu.ahs, pdu.data.len(), &mut small)
                    .map(|()| {
                        segs.push_back(small.split().freeze());
                        segs.push_back(pdu.data.clone());
                        let (trailer, n) = codec.data_trailer(&pdu.data);
                        small.extend_from_slice(&trailer[..n]);
                    })
            } else {
                codec.encode(&pdu, &mut small)
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "cannot encode PDU");
                shared.shutdown(&format!("cannot encode PDU: {e}"));
                return;
            }
            total += small.len().saturating_sub(before) + pdu.data.len();
            if total < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !small.is_empty() {
            segs.push_back(small.split().freeze());
        }
        if let Err(e) = write_segments(&mut wr, &mut segs).await {
            shared.shutdown(&format!("write failed: {e}"));
            return;
        }
        if small.capacity() < 16 * 1024 {
            small = BytesMut::with_capacity(64 * 1024);
        }
    }
    let _ = wr.shutdown().await;
}

/// Write every segment, in order, with as few system calls as possible.
async fn write_segments(
    wr: &mut OwnedWriteHalf,
    segs: &mut std::collections::VecDeque<Bytes>,
) -> std::io::Result<()> {
    use bytes::Buf;
    while !segs.is_empty() {
        let slices: Vec<std::io::IoSlice<'_>> = segs
            .iter()
            .take(64)
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        drop(slices);
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(front) = segs.front_mut() else { break };
            if n >= front.len() {
                n -= front.len();
                segs.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

async fn reader(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    mut codec: PduCodec,
    shared: Arc<Shared>,
) {
    let reason = loop {
        let pdu = match codec.decode(&mut buf) {
            Ok(Some(p)) => p,
            Ok(None) => {
                if buf.capacity() - buf.len() < 256 * 1024 {
                    buf.reserve(1024 * 1024);
                }
                tokio::select! {
                    r = rd.read_buf(&mut buf) => match r {
                        Ok(0) => break "target closed the connection".to_string(),
                        Ok(_) => continue,
                        Err(e) => break format!("read failed: {e}"),
                    },
                    _ = shared.stop.notified() => {
                        break shared.stop_reason.lock().unwrap_or_else(|e| e.into_inner())
                            .clone().unwrap_or_else(|| "stopped".into());
                    }
                }
            }
            Err(e) => break format!("bad PDU from target: {e}"),
        };
        if let Err(e) = dispatch(&shared, pdu) {
            tracing::error!(error = %e, "iSCSI protocol error; closing session");
            break e.to_string();
        }
    };
    tracing::debug!(%reason, "session reader stopped");
    shared.close(&reason);
}

fn dispatch(shared: &Shared, pdu: Pdu) -> Result<()> {
    let op = pdu
        .opcode()
        .map_err(|e| Error::protocol(format!("undecodable PDU: {e}")))?;
    let bad = |e: keyfence_iscsi::PduError| Error::protocol(format!("malformed {op:?}: {e}"));
    match op {
        Opcode::DataIn => {
            let d = DataIn::parse(&pdu).map_err(bad)?;
            let (exp, max) = (d.exp_cmd_sn, d.max_cmd_sn);
            if d.status.is_some() {
                shared.update_stat_sn(d.stat_sn, true);
            }
            // Complete first, then open the window for waiting commands.
            on_data_in(shared, d)?;
            shared.update_window(exp, max);
            Ok(())
        }
        Opcode::ScsiResponse => {
            let r = ScsiResponse::parse(&pdu).map_err(bad)?;
            let (exp, max) = (r.exp_cmd_sn, r.max_cmd_sn);
            shared.update_stat_sn(r.stat_sn, true);
            on_response(shared, r)?;
            shared.update_window(exp, max);
            Ok(())
        }
        Opcode::R2t => {
            let r = R2t::parse(&pdu).map_err(bad)?;
            shared.update_window(r.exp_cmd_sn, r.max_cmd_sn);
            shared.update_stat_sn(r.stat_sn, false);
            on_r2t(shared, r)
        }
        Opcode::NopIn => {
            let n = NopIn::parse(&pdu).map_err(bad)?;
            shared.update_window(n.exp_cmd_sn, n.max_cmd_sn);
            shared.update_stat_sn(n.stat_sn, n.itt != RESERVED_TAG);
            on_nop_in(shared, n)
        }
        Opcode::TaskMgmtResponse => {
            let r = TaskMgmtResponse::parse(&pdu).map_err(bad)?;
            shared.update_window(r.exp_cmd_sn, r.max_cmd_sn);
            shared.update_stat_sn(r.stat_sn, true);
            complete(shared, r.itt, Ok(Reply::Tmf(r.response)));
            Ok(())
        }
        Opcode::TextResponse => {
            let r = TextResponse::parse(&pdu).map_err(bad)?;
            shared.update_window(r.exp_cmd_sn, r.max_cmd_sn);
            shared.update_stat_sn(r.stat_sn, true);
            complete(shared, r.itt, Ok(Reply::Text(r)));
            Ok(())
        }
        Opcode::LogoutResponse => {
            let r = LogoutResponse::parse(&pdu).map_err(bad)?;
            shared.update_window(r.exp_cmd_sn, r.max_cmd_sn);
            shared.update_stat_sn(r.stat_sn, true);
            complete(shared, r.itt, Ok(Reply::Logout(r)));
            Ok(())
        }
        Opcode::Reject => {
            let r = Reject::parse(&pdu).map_err(bad)?;
            shared.update_window(r.exp_cmd_sn, r.max_cmd_sn);
            shared.update_stat_sn(r.stat_sn, true);
            let h = &r.rejected_header;
            let itt = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
            let reason = r.reason.to_u8();
            tracing::warn!(reason, itt, "target rejected a PDU");
            complete(shared, itt, Err(Error::Rejected { reason }));
            Ok(())
        }
        Opcode::AsyncMessage => {
            let a = AsyncMessage::parse(&pdu).map_err(bad)?;
            shared.update_window(a.exp_cmd_sn, a.max_cmd_sn);
            shared.update_stat_sn(a.stat_sn, true);
            match a.async_event {
                0 => tracing::info!(
                    sense = ?Sense::parse(&a.sense),
                    "target reported an asynchronous SCSI event"
                ),
                1 => {
                    // RFC 7143 §11.9.1: log out within Parameter3 seconds.
                    tracing::warn!(
                        within_secs = a.parameter3,
                        "target requests logout; logging out"
                    );
                    request_logout(shared)?;
                }
                2 | 3 => tracing::warn!(
                    event = a.async_event,
                    time2wait = a.parameter2,
                    "target will drop the connection"
                ),
                e => tracing::info!(event = e, "asynchronous message"),
            }
            Ok(())
        }
        other => Err(Error::protocol(format!(
            "target sent an initiator opcode {other:?}"
        ))),
    }
}

/// Log out on the target's request. Commands still outstanding fail when
/// the target then closes the connection.
fn request_logout(shared: &Shared) -> Result<()> {
    let mut st = shared.lock();
    if st.tx.is_none()
        || st
            .tasks
            .values()
            .any(|t| matches!(t.kind, TaskKind::Logout))
    {
        return Ok(());
    }
    let itt = alloc_itt(&mut st);
    let cmd_sn = st.cmd_sn;
    let pdu = LogoutRequest {
        immediate: true,
        reason: LogoutReason::CloseSession,
        itt,
        cid: 0,
        cmd_sn,
        exp_stat_sn: 0,
    }
    .to_pdu();
    // Nobody waits for this reply; the session closes when the target
    // drops the connection after its Logout Response.
    let (tx, _rx) = oneshot::channel();
    st.tasks.insert(
        itt,
        Task {
            kind: TaskKind::Logout,
            cmd_sn,
            reply: tx,
        },
    );
    shared.send(&st, pdu)
}

fn complete(shared: &Shared, itt: u32, reply: Result<Reply>) {
    let task = shared.lock().tasks.remove(&itt);
    match task {
        Some(t) => {
            let _ = t.reply.send(reply);
        }
        // A task we gave up on (timeout) may still answer.
        None => tracing::debug!(itt, "response for an unknown or abandoned task"),
    }
}

fn on_data_in(shared: &Shared, d: DataIn) -> Result<()> {
    let mut st = shared.lock();
    let Some(task) = st.tasks.get_mut(&d.itt) else {
        tracing::debug!(itt = d.itt, "Data-In for an unknown or abandoned task");
        return Ok(());
    };
    let TaskKind::Scsi {
        data_in,
        data_in_len,
        next_data_sn,
        ..
    } = &mut task.kind
    else {
        return Err(Error::protocol(format!(
            "Data-In for non-SCSI task 0x{:08x}",
            d.itt
        )));
    };
    if d.data_sn != *next_data_sn {
        return Err(Error::protocol(format!(
            "Data-In DataSN {} where {} was expected",
            d.data_sn, next_data_sn
        )));
    }
    *next_data_sn = next_data_sn.wrapping_add(1);
    let off = d.buffer_offset as usize;
    off.checked_add(d.data.len())
        .filter(|&e| e <= *data_in_len as usize)
        .ok_or_else(|| {
            Error::protocol(format!(
                "Data-In at offset {off} of {} bytes exceeds the expected length {}",
                d.data.len(),
                data_in_len
            ))
        })?;
    data_in.put(off, d.data);
    if let Some(status) = d.status {
        let task = st.tasks.remove(&d.itt);
        drop(st);
        if let Some(Task {
            kind: TaskKind::Scsi { data_in, .. },
            reply,
            ..
        }) = task
        {
            let _ = reply.send(Ok(Reply::Scsi(ScsiResult {
                status,
                sense: None,
                data: data_in.into_bytes(),
                residual: d.residual,
            })));
        }
    }
    Ok(())
}

fn on_response(shared: &Shared, r: ScsiResponse) -> Result<()> {
    let task = shared.lock().tasks.remove(&r.itt);
    let Some(task) = task else {
        tracing::debug!(
            itt = r.itt,
            "SCSI Response for an unknown or abandoned task"
        );
        return Ok(());
    };
    let reply = match task.kind {
        TaskKind::Scsi { data_in, .. } => {
            if r.response != 0 {
                Err(Error::TargetFailure(r.response))
            } else {
                Ok(Reply::Scsi(ScsiResult {
                    status: r.status,
                    sense: if r.sense.is_empty() {
                        None
                    } else {
                        Sense::parse(&r.sense)
                    },
                    data: data_in.into_bytes(),
                    residual: r.residual,
                }))
            }
        }
        _ => Err(Error::protocol("SCSI Response for a non-SCSI task")),
    };
    let _ = task.reply.send(reply);
    Ok(())
}

fn on_r2t(shared: &Shared, r: R2t) -> Result<()> {
    let mut st = shared.lock();
    let Some(task) = st.tasks.get_mut(&r.itt) else {
        tracing::debug!(itt = r.itt, "R2T for an unknown or abandoned task");
        return Ok(());
    };
    let TaskKind::Scsi {
        lun,
        data_out,
        next_r2t_sn,
        ..
    } = &mut task.kind
    else {
        return Err(Error::protocol("R2T for a non-SCSI task"));
    };
    if r.r2t_sn != *next_r2t_sn {
        return Err(Error::protocol(format!(
            "R2TSN {} where {} was expected",
            r.r2t_sn, next_r2t_sn
        )));
    }
    *next_r2t_sn = next_r2t_sn.wrapping_add(1);
    if r.desired_data_transfer_length > shared.params.max_burst_length {
        return Err(Error::protocol(format!(
            "R2T asks for {} bytes, above MaxBurstLength {}",
            r.desired_data_transfer_length, shared.params.max_burst_length
        )));
    }
    let from = r.buffer_offset as usize;
    let to = from + r.desired_data_transfer_length as usize;
    if to > data_out.len() {
        return Err(Error::protocol(format!(
            "R2T for bytes {from}..{to} of a {}-byte write",
            data_out.len()
        )));
    }
    let mut pdus = Vec::new();
    let max_seg = shared.params.max_send_data_segment_length.max(512) as usize;
    let (lun, data) = (*lun, data_out.clone());
    data_out_pdus(&mut pdus, lun, r.itt, r.ttt, &data, from, to, max_seg);
    for p in pdus {
        shared.send(&st, p)?;
    }
    Ok(())
}

fn on_nop_in(shared: &Shared, n: NopIn) -> Result<()> {
    if n.itt != RESERVED_TAG {
        complete(shared, n.itt, Ok(Reply::Nop));
        return Ok(());
    }
    if n.ttt != RESERVED_TAG {
        // A target ping: answer with an immediate NOP-Out echoing the TTT
        // and the ping data (RFC 7143 §11.18), without advancing CmdSN.
        let st = shared.lock();
        let max = shared.params.max_send_data_segment_length as usize;
        let data = n.data.slice(..n.data.len().min(max));
        let pdu = NopOut {
            immediate: true,
            lun: n.lun,
            itt: RESERVED_TAG,
            ttt: n.ttt,
            cmd_sn: st.cmd_sn,
            exp_stat_sn: 0,
            data,
        }
        .to_pdu();
        shared.send(&st, pdu)?;
        shared.pings_answered.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_out_split() {
        let data = Bytes::from(vec![7u8; 10_000]);
        let mut v = Vec::new();
        data_out_pdus(&mut v, Lun::default(), 5, 9, &data, 1000, 9000, 4096);
        let parsed: Vec<DataOut> = v.iter().map(|p| DataOut::parse(p).unwrap()).collect();
        assert_eq!(parsed.len(), 2);
        assert_eq!(
            (parsed[0].buffer_offset, parsed[0].data.len()),
            (1000, 4096)
        );
        assert_eq!(
            (parsed[1].buffer_offset, parsed[1].data.len()),
            (5096, 3904)
        );
        assert_eq!((parsed[0].data_sn, parsed[1].data_sn), (0, 1));
        assert!(!parsed[0].final_bit && parsed[1].final_bit);
        assert!(parsed.iter().all(|d| d.ttt == 9 && d.itt == 5));
    }

    #[test]
    fn data_in_gathering() {
        let mut d = DataInBuf::Empty;
        d.put(0, Bytes::from_static(b"abcd"));
        assert!(matches!(d, DataInBuf::Single(_)));
        d.put(4, Bytes::from_static(b"ef"));
        d.put(8, Bytes::from_static(b"ij"));
        d.put(6, Bytes::from_static(b"gh"));
        assert_eq!(&d.into_bytes()[..], b"abcdefghij");
        let mut d = DataInBuf::Empty;
        d.put(2, Bytes::from_static(b"cd"));
        d.put(0, Bytes::from_static(b"ab"));
        assert_eq!(&d.into_bytes()[..], b"abcd");
    }

    #[test]
    fn status_mapping() {
        let r = |status| ScsiResult {
            status,
            sense: None,
            data: Bytes::new(),
            residual: Residual::None,
        };
        assert!(r(0).into_result().is_ok());
        assert!(matches!(
            r(0x18).into_result(),
            Err(Error::ReservationConflict)
        ));
        assert!(matches!(
            r(0x02).into_result(),
            Err(Error::CheckConditionNoSense)
        ));
        assert!(matches!(r(0x08).into_result(), Err(Error::Status(0x08))));
        let mut cc = r(0x02);
        cc.sense = Some(Sense::unit_attention(
            keyfence_scsi::sense::asc::RESERVATIONS_PREEMPTED,
        ));
        assert!(matches!(cc.into_result(), Err(Error::UnitAttention(_))));
    }
}
