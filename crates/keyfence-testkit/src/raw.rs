//! A blocking iSCSI initiator that speaks raw PDUs over one TCP
//! connection, for tests that must send what a well-behaved initiator
//! never would (a whole command window in one write, Data-Out that stops
//! short, PDUs split at odd places) or read the target's answers PDU by
//! PDU. It keeps the sequence numbers (CmdSN, ExpStatSN, MaxCmdSN) and
//! the task tags; everything else is left to the test, which may also use
//! the stream and the encoder directly.
//!
//! Every read is bounded by the socket timeout given to
//! [`RawClient::connect`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::keys::TextBuilder;
use keyfence_iscsi::pdu::{
    LoginRequest, LoginResponse, NopOut, Residual, ScsiCommand, Stage, TargetPdu, TaskAttr,
    RESERVED_TAG,
};
use keyfence_iscsi::{Cdb, Lun, Pdu, PduCodec};

/// Data segments both sides declare (MaxRecvDataSegmentLength).
pub const SEGMENT: u32 = 262_144;

/// What a login offers.
#[derive(Debug, Clone)]
pub struct LoginKeys<'a> {
    pub initiator: &'a str,
    /// The target of a normal session; `None` for a discovery session.
    pub target: Option<&'a str>,
    pub isid: u64,
    /// CRC32C header and data digests.
    pub digests: bool,
    pub max_burst: u32,
    pub first_burst: u32,
}

impl<'a> LoginKeys<'a> {
    /// A normal session without digests, ImmediateData=Yes,
    /// InitialR2T=Yes, MaxBurstLength 1 MiB, FirstBurstLength 256 KiB.
    pub fn normal(initiator: &'a str, target: &'a str, isid: u64) -> Self {
        LoginKeys {
            initiator,
            target: Some(target),
            isid,
            digests: false,
            max_burst: 1 << 20,
            first_burst: SEGMENT,
        }
    }
}

/// What a bounded wait for the next PDU saw.
#[derive(Debug)]
pub enum Next {
    Pdu(TargetPdu),
    /// Nothing within the read timeout; the connection is still open.
    Quiet,
    /// The target closed (or reset) the connection, or sent bytes that
    /// are not a PDU.
    Closed,
}

/// One connection of a raw initiator. Its sequence numbers are public so
/// that a test can build PDUs of its own.
pub struct RawClient {
    pub stream: TcpStream,
    codec: PduCodec,
    rbuf: BytesMut,
    pub cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// The last initiator task tag used.
    pub itt: u32,
    /// The session's TSIH once a login succeeded.
    pub tsih: u16,
}

impl RawClient {
    /// Connect to `addr`; reads and writes time out after `timeout`.
    /// Fails the test when the connection cannot be made.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> RawClient {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream.set_read_timeout(Some(timeout)).unwrap();
        stream.set_write_timeout(Some(timeout)).unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            codec: PduCodec::new(),
            rbuf: BytesMut::with_capacity(1 << 16),
            cmd_sn: 1,
            max_cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 0,
            tsih: 0,
        }
    }

    /// Append `pdu`'s wire form to `out` (digests as negotiated).
    pub fn encode(&self, pdu: &Pdu, out: &mut BytesMut) {
        self.codec.encode(pdu, out).expect("encodable PDU");
    }

    /// Send `pdu`; an error means the target closed the connection.
    pub fn try_send(&mut self, pdu: &Pdu) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        self.encode(pdu, &mut out);
        self.stream.write_all(&out)
    }

    /// Send `pdu`, failing the test if it cannot be.
    pub fn send(&mut self, pdu: &Pdu) {
        self.try_send(pdu).expect("send a PDU");
    }

    /// The next PDU, or `None` at end of stream, after the read timeout,
    /// or when the bytes are not a PDU.
    pub fn recv(&mut self) -> Option<Pdu> {
        loop {
            match self.codec.decode(&mut self.rbuf) {
                Ok(Some(p)) => return Some(p),
                Ok(None) => {}
                Err(_) => return None,
            }
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.rbuf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// The next PDU, telling a quiet connection from a closed one.
    pub fn next_or_quiet(&mut self) -> Next {
        loop {
            match self.codec.decode(&mut self.rbuf) {
                Ok(Some(p)) => {
                    return Next::Pdu(TargetPdu::parse(&p).expect("a PDU a target may send"))
                }
                Ok(None) => {}
                Err(_) => return Next::Closed,
            }
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp) {
                Ok(0) => return Next::Closed,
                Ok(n) => self.rbuf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Next::Quiet
                }
                Err(_) => return Next::Closed,
            }
        }
    }

    /// The next PDU parsed, or `None` as for [`RawClient::recv`].
    pub fn next_target(&mut self) -> Option<TargetPdu> {
        TargetPdu::parse(&self.recv()?).ok()
    }

    /// The next PDU parsed; fails the test when none comes.
    pub fn recv_target(&mut self) -> TargetPdu {
        let p = self.recv().expect("a PDU from the target");
        TargetPdu::parse(&p).expect("a PDU a target may send")
    }

    /// Log in, from the operational stage straight to full feature
    /// phase. Returns the last Login Response: a refusal (status class
    /// not 0) ends the login at once; the caller checks the status.
    pub fn login(&mut self, k: &LoginKeys) -> LoginResponse {
        let mut t = TextBuilder::new();
        t.push("InitiatorName", k.initiator);
        match k.target {
            Some(name) => {
                t.push("SessionType", "Normal");
                t.push("TargetName", name);
            }
            None => {
                t.push("SessionType", "Discovery");
            }
        }
        let digest = if k.digests { "CRC32C" } else { "None" };
        t.push("HeaderDigest", digest);
        t.push("DataDigest", digest);
        t.push("MaxRecvDataSegmentLength", &SEGMENT.to_string());
        if k.target.is_some() {
            t.push("ImmediateData", "Yes");
            t.push("InitialR2T", "Yes");
            t.push("MaxBurstLength", &k.max_burst.to_string());
            t.push("FirstBurstLength", &k.first_burst.to_string());
            t.push("ErrorRecoveryLevel", "0");
        }
        let mut data = t.finish();
        for _ in 0..4 {
            let req = LoginRequest {
                transit: true,
                cont: false,
                csg: Stage::Operational,
                nsg: Stage::FullFeature,
                version_max: 0,
                version_min: 0,
                isid: k.isid,
                tsih: self.tsih,
                itt: self.itt,
                cid: 1,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                data,
            };
            self.send(&req.to_pdu());
            let TargetPdu::LoginResponse(r) = self.recv_target() else {
                panic!("expected a login response");
            };
            self.exp_stat_sn = r.stat_sn.wrapping_add(1);
            self.max_cmd_sn = r.max_cmd_sn;
            if r.status_class != 0 || (r.transit && r.nsg == Stage::FullFeature) {
                self.tsih = r.tsih;
                self.itt = self.itt.wrapping_add(1);
                // Full feature phase: the target accepted what we declared.
                self.codec.set_max_send_data_segment_length(SEGMENT);
                self.codec.set_max_recv_data_segment_length(SEGMENT);
                if k.digests && r.status_class == 0 {
                    self.codec.set_header_digest(true);
                    self.codec.set_data_digest(true);
                }
                return r;
            }
            data = Bytes::new();
        }
        panic!("the login did not reach full feature phase in four steps");
    }

    /// A new initiator task tag.
    pub fn next_itt(&mut self) -> u32 {
        self.itt = self.itt.wrapping_add(1);
        self.itt
    }

    /// A SIMPLE command to LUN 0 with the next tag and CmdSN (which it
    /// uses up), not sent: (tag, PDU).
    pub fn command_pdu(
        &mut self,
        cdb: &[u8],
        read: bool,
        write: bool,
        edtl: u32,
        data: Bytes,
    ) -> (u32, Pdu) {
        let itt = self.next_itt();
        let cmd = ScsiCommand {
            immediate: false,
            final_bit: true,
            read,
            write,
            attr: TaskAttr::Simple,
            lun: Lun::from_number(0).unwrap(),
            itt,
            expected_data_transfer_length: edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: Cdb::new(cdb).expect("a valid CDB length"),
            bidi_read_length: None,
            data,
        };
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        (itt, cmd.to_pdu())
    }

    /// Send a SIMPLE command to LUN 0 (see [`RawClient::command_pdu`]);
    /// returns its tag.
    pub fn command(&mut self, cdb: &[u8], read: bool, write: bool, edtl: u32, data: Bytes) -> u32 {
        let (itt, pdu) = self.command_pdu(cdb, read, write, edtl, data);
        self.send(&pdu);
        itt
    }

    /// Answer the target's ping (a NOP-In with a target transfer tag).
    pub fn answer_ping(&mut self, ttt: u32) {
        let n = NopOut {
            immediate: true,
            lun: Lun::default(),
            itt: RESERVED_TAG,
            ttt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: Bytes::new(),
        };
        let _ = self.try_send(&n.to_pdu());
    }

    /// Note the sequence numbers of a PDU that carries status.
    fn saw_status(&mut self, stat_sn: u32, max_cmd_sn: u32) {
        self.exp_stat_sn = stat_sn.wrapping_add(1);
        self.max_cmd_sn = max_cmd_sn;
    }

    /// The data and status of the one command in flight: (data, status,
    /// residual). Pings are answered; any other PDU fails the test, as
    /// does the end of the connection.
    pub fn collect(&mut self) -> (Vec<u8>, u8, Residual) {
        let mut data = Vec::new();
        loop {
            match self.recv_target() {
                TargetPdu::DataIn(d) => {
                    assert_eq!(d.buffer_offset as usize, data.len(), "Data-In out of order");
                    data.extend_from_slice(&d.data);
                    if let Some(st) = d.status {
                        self.saw_status(d.stat_sn, d.max_cmd_sn);
                        return (data, st, d.residual);
                    }
                }
                TargetPdu::ScsiResponse(r) => {
                    self.saw_status(r.stat_sn, r.max_cmd_sn);
                    return (data, r.status, r.residual);
                }
                TargetPdu::NopIn(n) if n.ttt != RESERVED_TAG => self.answer_ping(n.ttt),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The statuses of the next `n` commands to finish, whatever their
    /// data; `None` when the connection ends or times out first.
    pub fn completions(&mut self, n: usize) -> Option<Vec<u8>> {
        let mut st = Vec::with_capacity(n);
        while st.len() < n {
            match self.next_target()? {
                TargetPdu::DataIn(d) => {
                    if let Some(s) = d.status {
                        self.saw_status(d.stat_sn, d.max_cmd_sn);
                        st.push(s);
                    }
                }
                TargetPdu::ScsiResponse(r) => {
                    self.saw_status(r.stat_sn, r.max_cmd_sn);
                    st.push(r.status);
                }
                TargetPdu::NopIn(n) if n.ttt != RESERVED_TAG => self.answer_ping(n.ttt),
                _ => {}
            }
        }
        Some(st)
    }

    /// Run a command without data; its status, or `None` when the
    /// connection ends or times out first. Other PDUs are passed over.
    pub fn status_of(&mut self, cdb: &[u8]) -> Option<u8> {
        let (itt, pdu) = self.command_pdu(cdb, false, false, 0, Bytes::new());
        self.try_send(&pdu).ok()?;
        loop {
            match self.next_target()? {
                TargetPdu::ScsiResponse(r) if r.itt == itt => {
                    self.saw_status(r.stat_sn, r.max_cmd_sn);
                    return Some(r.status);
                }
                TargetPdu::NopIn(n) if n.ttt != RESERVED_TAG => self.answer_ping(n.ttt),
                _ => {}
            }
        }
    }

    /// TEST UNIT READY until the unit attentions of a new I_T nexus are
    /// consumed; fails the test after eight tries.
    pub fn clear_ua(&mut self) {
        for _ in 0..8 {
            if self.status_of(&[0; 6]) == Some(0) {
                return;
            }
        }
        panic!("TEST UNIT READY keeps failing");
    }
}

/// READ (10) of `blocks` blocks at `lba`.
pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// WRITE (10) of `blocks` blocks at `lba`.
pub fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

/// READ (16) of `blocks` blocks at `lba`.
pub fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// WRITE (16) of `blocks` blocks at `lba`.
pub fn write16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = read16(lba, blocks);
    c[0] = 0x8a;
    c
}
