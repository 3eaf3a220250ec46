//! Driving the target's full feature phase in memory, without sockets,
//! tasks or a runtime: for tests and the fuzzer (the way quinn-proto's
//! `Pair` drives a connection).
//!
//! An [`InMemoryTarget`] serves one target with one LUN on a
//! [`MemBackend`] (or a backend the test gives). [`InMemoryTarget::session`] gives a [`SessionPair`]:
//! a session as if its login had just completed, with the initiator's end
//! of the byte stream. The test sends PDUs, lets time pass, runs (or
//! holds back) the commands the session hands out as jobs, and reads the
//! PDUs the session put in its outbox.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use keyfence_iscsi::{Pdu, PduCodec, SessionParams, TargetPdu};
use keyfence_lu::backend::{BlockBackend, MemBackend};
use keyfence_lu::{LogicalUnit, LuConfig, TargetLuns};
use keyfence_scsi::TargetPort;
use tokio::sync::{watch, Semaphore};

use super::budget::Budget;
use super::ffp::{Job, Session};
use super::login::{Established, SessionKind};
use super::session::{SessionKey, SessionTable};
use super::{Live, Portal, Shared, TargetRt};
use crate::config::Limits;

/// The target name an [`InMemoryTarget`] serves.
pub const TARGET_NAME: &str = "iqn.2026-11.io.keyfence:in-memory";

/// A target with one LUN (LUN 0) in memory.
pub struct InMemoryTarget {
    shared: Arc<Shared>,
    _shutdown: watch::Sender<bool>,
}

impl InMemoryTarget {
    /// A target whose LUN 0 has `lun_bytes` (a multiple of 512) of memory.
    pub fn new(limits: Limits, lun_bytes: u64) -> InMemoryTarget {
        Self::with_backend(limits, Arc::new(MemBackend::new(lun_bytes)))
    }

    /// A target whose LUN 0 sits on `backend`.
    pub fn with_backend(limits: Limits, backend: Arc<dyn BlockBackend>) -> InMemoryTarget {
        let addr = "127.0.0.1:3260".parse().expect("a socket address");
        let port = TargetPort::new(TARGET_NAME, 1, 1);
        let lun_list = Arc::new(TargetLuns::new(vec![0]));
        let cfg = LuConfig::new(TARGET_NAME, 0, vec![port], lun_list.clone());
        let lu = LogicalUnit::new(cfg, backend).expect("a valid in-memory LU");
        let target = TargetRt {
            name: TARGET_NAME.into(),
            portals: vec![Portal { tpgt: 1, addr }],
            peer_portals: Vec::new(),
            luns: [(0, Arc::new(lu))].into_iter().collect(),
            lun_list,
            backing: [(0, "memory".to_string())].into_iter().collect(),
            chap: None,
            acl: super::acl::AclTable::open(None),
            stats: [(0, Arc::new(super::metrics::LuStats::default()))]
                .into_iter()
                .collect(),
        };
        let metrics = Arc::new(super::metrics::Metrics::new(true));
        let target = Arc::new(target);
        super::publish_lu_metrics(&metrics, &[Some(target.clone())]);
        let (shutdown_tx, shutdown) = watch::channel(false);
        let shared = Arc::new(Shared {
            connections: Arc::new(Semaphore::new(limits.max_connections as usize)),
            sessions: std::sync::Mutex::new(SessionTable::new(limits.max_sessions)),
            buffers: Budget::new(limits.max_buffered_bytes.0),
            shutdown,
            metrics,
            started: Instant::now(),
            clustered: false,
            cluster: None,
            reload_lock: tokio::sync::Mutex::new(()),
            reloader: Default::default(),
            hooks: Default::default(),
            acceptors: Default::default(),
            live: arc_swap::ArcSwap::from_pointee(Live {
                generation: 0,
                targets: vec![Some(target)],
                limits,
                discovery_chap: None,
                listeners: Vec::new(),
                config: None,
            }),
        });
        InMemoryTarget {
            shared,
            _shutdown: shutdown_tx,
        }
    }

    /// Write data held for all sessions (`limits.max_buffered_bytes`).
    pub fn buffered_bytes(&self) -> u64 {
        self.shared.buffers.used()
    }

    /// The logical unit behind LUN 0.
    pub fn lu(&self) -> Arc<LogicalUnit> {
        self.shared.live().targets[0]
            .as_ref()
            .expect("target 0")
            .luns[&0]
            .clone()
    }

    /// A normal session of `initiator` / `isid` whose login just
    /// completed with `params`, ExpCmdSN 1 and StatSN 1. A session with
    /// the same initiator port is displaced (told to close) as a login
    /// reinstating it would; it ends when the test ends it.
    pub fn session(&self, initiator: &str, isid: u64, params: SessionParams) -> SessionPair {
        let key = SessionKey {
            initiator: initiator.to_ascii_lowercase(),
            isid,
            target: Some(0),
            tpgt: 1,
        };
        let nexus = keyfence_scsi::Nexus::new(
            keyfence_scsi::InitiatorPort::new(initiator, isid),
            keyfence_scsi::TargetPort::new(TARGET_NAME, 1, 1),
        );
        let registration = {
            let mut t = self.shared.sessions();
            // Reinstatement as a login does it, without waiting for the
            // old session to end (the test decides when it does).
            let _ = t.displace(&key);
            let tsih = t.reserve().expect("a free TSIH");
            t.admit(tsih, key, Some(nexus), None)
                .expect("below the session limit")
        };
        let est = Established {
            kind: SessionKind::Normal { target: 0, tpgt: 1 },
            initiator: initiator.into(),
            isid,
            cid: 1,
            params: params.clone(),
            exp_cmd_sn: 1,
            stat_sn: 1,
            registration,
            view: None,
            local: None,
            portal: None,
        };
        let mut codec = PduCodec::new();
        codec.apply(&params);
        let now = Instant::now();
        let peer = "127.0.0.1:50000".parse().expect("a socket address");
        let session = Session::new(self.shared.clone(), est, peer, codec.clone(), now);
        // The initiator's side: what it sends is what the target receives.
        let mut initiator_codec = PduCodec::new();
        initiator_codec.set_header_digest(params.header_digest);
        initiator_codec.set_data_digest(params.data_digest);
        // What the initiator may send is the target's to check: frame
        // anything the wire format can carry.
        initiator_codec.set_max_send_data_segment_length(0xff_ffff);
        initiator_codec.set_max_recv_data_segment_length(params.max_send_data_segment_length);
        SessionPair {
            session,
            initiator_codec,
            inbound: BytesMut::new(),
            outbound: BytesMut::new(),
            held: Vec::new(),
            now,
        }
    }
}

/// One in-memory session and the initiator's end of its byte stream.
pub struct SessionPair {
    session: Session,
    initiator_codec: PduCodec,
    /// Bytes on their way to the target.
    inbound: BytesMut,
    /// Bytes the target sent, not yet decoded.
    outbound: BytesMut,
    held: Vec<Job>,
    now: Instant,
}

impl SessionPair {
    /// Deliver a PDU to the target (encoded as the initiator would, but
    /// without holding it to the target's MaxRecvDataSegmentLength).
    /// Panics when the PDU cannot be framed at all (data of 16 MiB or
    /// more).
    pub fn send(&mut self, pdu: &Pdu) {
        self.initiator_codec
            .encode(pdu, &mut self.inbound)
            .expect("a PDU the wire format can carry");
        self.session.input(&mut self.inbound, self.now);
    }

    /// Deliver raw bytes to the target.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.inbound.extend_from_slice(bytes);
        self.session.input(&mut self.inbound, self.now);
    }

    /// Let `d` pass and fire the session's timers that are due.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        while self.session.poll_timeout() <= self.now && !self.is_closing() {
            self.session.handle_timeout(self.now);
            if self.session.poll_timeout() <= self.now {
                // A timer that stays due (e.g. a ping just sent is due
                // only later): stop once nothing changes.
                break;
            }
        }
    }

    /// Commands the session handed out to run off its task, collected so
    /// far (not yet run).
    pub fn held_jobs(&mut self) -> usize {
        self.held.extend(self.session.take_jobs());
        self.held.len()
    }

    /// Run every job handed out, in order, and feed the results back
    /// (including jobs those results start).
    pub fn run_jobs(&mut self) {
        loop {
            self.held.extend(self.session.take_jobs());
            if self.held.is_empty() {
                return;
            }
            for job in std::mem::take(&mut self.held) {
                let c = job.run();
                self.session.complete(c);
            }
        }
    }

    /// PDUs the target sent since the last call; an undecodable stream is
    /// an error (the target must always frame correctly).
    pub fn recv(&mut self) -> Result<Vec<TargetPdu>, String> {
        let bytes = self.session.outbox().take_all();
        self.session.flushed();
        self.outbound.extend_from_slice(&bytes);
        let mut out = Vec::new();
        loop {
            match self.initiator_codec.decode(&mut self.outbound) {
                Ok(Some(p)) => out.push(TargetPdu::parse(&p).map_err(|e| e.to_string())?),
                Ok(None) => return Ok(out),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Bytes queued in the outbox (not yet taken by [`SessionPair::recv`]).
    pub fn queued_bytes(&mut self) -> usize {
        self.session.outbox().len()
    }

    /// Whether the session decided to end (logout, protocol error, ...),
    /// and why.
    pub fn closing(&mut self) -> Option<String> {
        let end = self.session.take_closing()?;
        let why = end.to_string();
        self.session.close(end);
        Some(why)
    }

    fn is_closing(&mut self) -> bool {
        self.closing().is_some()
    }

    /// The command window as the target last computed it: (ExpCmdSN,
    /// MaxCmdSN).
    pub fn window(&self) -> (u32, u32) {
        self.session.window()
    }

    /// End the session as its connection task does.
    pub fn end(mut self) {
        self.run_jobs();
        self.session.end();
    }
}
