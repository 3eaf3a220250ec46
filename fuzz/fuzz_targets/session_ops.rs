//! Sequences of arbitrary initiator operations (SCSI commands with any
//! CmdSN, attributes, CDB and immediate data; Data-Outs with any TTT,
//! DataSN, offset and F bit; NOP-Outs; task management; raw bytes; time
//! passing; jobs run now or later) driven against a target session in
//! memory over an in-memory LU. Nothing may panic, and what the target
//! sends must stay well formed: decodable PDUs, StatSN in sequence,
//! MaxCmdSN never moving back nor below ExpCmdSN - 1, R2Ts within
//! MaxBurstLength, CHECK CONDITION with sense, Data-In offsets in order,
//! and a bounded outbox.
#![no_main]

use std::collections::HashMap;
use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use keyfence_iscsi::pdu::{
    DataOut, NopOut, ScsiCommand, TaskAttr, TaskMgmtRequest, TmfFunction, RESERVED_TAG,
};
use keyfence_iscsi::{serial, Cdb, Lun, SessionParams, TargetPdu};
use keyfence_target::config::Limits;
use keyfence_target::server::harness::{InMemoryTarget, SessionPair};
use libfuzzer_sys::fuzz_target;

const LUN_BYTES: u64 = 256 << 10;

#[derive(Arbitrary, Debug)]
enum CdbChoice {
    TestUnitReady,
    Inquiry { alloc: u8 },
    Read10 { lba: u16, blocks: u8 },
    Write10 { lba: u16, blocks: u8, fua: bool },
    SyncCache,
    PrOut { action: u8, pr_type: u8 },
    PrIn { action: u8 },
    Reserve,
    Release,
    Raw([u8; 16]),
}

impl CdbChoice {
    fn bytes(&self) -> Vec<u8> {
        match *self {
            CdbChoice::TestUnitReady => vec![0; 6],
            CdbChoice::Inquiry { alloc } => vec![0x12, 0, 0, 0, alloc, 0],
            CdbChoice::Read10 { lba, blocks } | CdbChoice::Write10 { lba, blocks, .. } => {
                let mut c = vec![0u8; 10];
                c[0] = if matches!(self, CdbChoice::Read10 { .. }) {
                    0x28
                } else {
                    0x2a
                };
                if let CdbChoice::Write10 { fua: true, .. } = self {
                    c[1] = 0x08;
                }
                c[4..6].copy_from_slice(&lba.to_be_bytes());
                c[8] = blocks;
                c
            }
            CdbChoice::SyncCache => vec![0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            CdbChoice::PrOut { action, pr_type } => {
                vec![0x5f, action & 0x1f, pr_type & 0x0f, 0, 0, 0, 0, 0, 24, 0]
            }
            CdbChoice::PrIn { action } => vec![0x5e, action & 0x1f, 0, 0, 0, 0, 0, 0x20, 0, 0],
            CdbChoice::Reserve => vec![0x16, 0, 0, 0, 0, 0],
            CdbChoice::Release => vec![0x17, 0, 0, 0, 0, 0],
            CdbChoice::Raw(b) => b.to_vec(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Command {
        /// CmdSN relative to the next in sequence (gaps, duplicates).
        sn_delta: i8,
        immediate: bool,
        final_bit: bool,
        read: bool,
        write: bool,
        attr: u8,
        lun: u8,
        itt: u8,
        edtl: u32,
        cdb: CdbChoice,
        immediate_len: u16,
    },
    DataOut {
        itt: u8,
        /// 0: unsolicited (reserved TTT); otherwise one of the TTTs the
        /// target sent, or any number.
        ttt: u8,
        data_sn: u8,
        offset: u32,
        len: u16,
        final_bit: bool,
    },
    Nop {
        immediate: bool,
        reply_to_ping: bool,
        itt: u8,
        len: u8,
    },
    Tmf {
        function: u8,
        immediate: bool,
        lun: u8,
        itt: u8,
        referenced: u8,
        ref_sn_delta: i8,
    },
    Raw(Vec<u8>),
    RunJobs,
    Advance {
        secs: u8,
    },
}

struct Checker {
    stat_sn: Option<u32>,
    max_cmd_sn: Option<u32>,
    ttts: Vec<u32>,
    ping: Option<u32>,
    offsets: HashMap<u32, u32>,
    max_burst: u32,
}

impl Checker {
    fn window(&mut self, exp: u32, max: u32) {
        assert!(
            serial::ge(max, exp.wrapping_sub(1)),
            "MaxCmdSN {max} below ExpCmdSN {exp} - 1"
        );
        if let Some(m) = self.max_cmd_sn {
            assert!(serial::ge(max, m), "MaxCmdSN moved back from {m} to {max}");
        }
        self.max_cmd_sn = Some(max);
    }

    fn status(&mut self, sn: u32) {
        if let Some(s) = self.stat_sn {
            assert_eq!(sn, s.wrapping_add(1), "StatSN out of sequence");
        }
        self.stat_sn = Some(sn);
    }

    fn check(&mut self, pair: &mut SessionPair) {
        let pdus = pair.recv().expect("the target frames every PDU correctly");
        for p in pdus {
            match p {
                TargetPdu::ScsiResponse(r) => {
                    self.window(r.exp_cmd_sn, r.max_cmd_sn);
                    self.status(r.stat_sn);
                    if r.status == 0x02 {
                        assert!(!r.sense.is_empty(), "CHECK CONDITION without sense");
                    }
                    self.offsets.remove(&r.itt);
                }
                TargetPdu::DataIn(d) => {
                    self.window(d.exp_cmd_sn, d.max_cmd_sn);
                    let at = self.offsets.entry(d.itt).or_insert(0);
                    assert_eq!(d.buffer_offset, *at, "Data-In out of order");
                    *at += d.data.len() as u32;
                    if d.status.is_some() {
                        self.status(d.stat_sn);
                        self.offsets.remove(&d.itt);
                    }
                }
                TargetPdu::R2t(r) => {
                    self.window(r.exp_cmd_sn, r.max_cmd_sn);
                    assert!(r.desired_data_transfer_length <= self.max_burst);
                    assert!(r.desired_data_transfer_length > 0);
                    self.ttts.push(r.ttt);
                    if self.ttts.len() > 64 {
                        self.ttts.remove(0);
                    }
                }
                TargetPdu::NopIn(n) => {
                    self.window(n.exp_cmd_sn, n.max_cmd_sn);
                    if n.itt == RESERVED_TAG {
                        self.ping = Some(n.ttt);
                    } else {
                        self.status(n.stat_sn);
                    }
                }
                TargetPdu::TaskMgmtResponse(r) => {
                    self.window(r.exp_cmd_sn, r.max_cmd_sn);
                    self.status(r.stat_sn);
                }
                TargetPdu::Reject(r) => {
                    self.status(r.stat_sn);
                }
                TargetPdu::TextResponse(r) => {
                    self.window(r.exp_cmd_sn, r.max_cmd_sn);
                    self.status(r.stat_sn);
                }
                TargetPdu::LogoutResponse(r) => {
                    self.status(r.stat_sn);
                }
                other => panic!("a target session never sends {other:?}"),
            }
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut limits = Limits::default();
    limits.max_cmds_per_session = 16;
    let target = InMemoryTarget::new(limits, LUN_BYTES);
    let params = SessionParams {
        max_recv_data_segment_length: 8192,
        max_send_data_segment_length: 8192,
        max_burst_length: 16384,
        first_burst_length: 8192,
        initial_r2t: false,
        immediate_data: true,
        max_outstanding_r2t: 2,
        ..SessionParams::default()
    };
    let mut pair = target.session("iqn.2026-11.io.keyfence:fuzz", 1, params);
    let mut ck = Checker {
        stat_sn: None,
        max_cmd_sn: None,
        ttts: Vec::new(),
        ping: None,
        offsets: HashMap::new(),
        max_burst: 16384,
    };
    let mut next_sn: u32 = 1;
    let lun = |n: u8| Lun::from_number(u16::from(n % 3)).unwrap_or_default();
    for op in ops.into_iter().take(256) {
        match op {
            Op::Command {
                sn_delta,
                immediate,
                final_bit,
                read,
                write,
                attr,
                lun: l,
                itt,
                edtl,
                cdb,
                immediate_len,
            } => {
                let sn = next_sn.wrapping_add(sn_delta as i32 as u32);
                if !immediate && sn_delta == 0 {
                    next_sn = next_sn.wrapping_add(1);
                }
                let bytes = cdb.bytes();
                let Some(cdb) = Cdb::new(&bytes) else {
                    continue;
                };
                let edtl = edtl % (1 << 20);
                let data = Bytes::from(vec![0xa5; usize::from(immediate_len % 10_000)]);
                let cmd = ScsiCommand {
                    immediate,
                    final_bit,
                    read,
                    write,
                    attr: match attr % 4 {
                        0 => TaskAttr::Simple,
                        1 => TaskAttr::Ordered,
                        2 => TaskAttr::HeadOfQueue,
                        _ => TaskAttr::Aca,
                    },
                    lun: lun(l),
                    itt: u32::from(itt),
                    expected_data_transfer_length: edtl,
                    cmd_sn: sn,
                    exp_stat_sn: 0,
                    cdb,
                    bidi_read_length: None,
                    data,
                };
                pair.send(&cmd.to_pdu());
            }
            Op::DataOut {
                itt,
                ttt,
                data_sn,
                offset,
                len,
                final_bit,
            } => {
                let ttt = match ttt {
                    0 => RESERVED_TAG,
                    n if !ck.ttts.is_empty() && n < 200 => ck.ttts[usize::from(n) % ck.ttts.len()],
                    n => u32::from(n),
                };
                let d = DataOut {
                    final_bit,
                    lun: Lun::from_number(0).unwrap_or_default(),
                    itt: u32::from(itt),
                    ttt,
                    exp_stat_sn: 0,
                    data_sn: u32::from(data_sn),
                    buffer_offset: offset % (1 << 20),
                    data: Bytes::from(vec![0x5a; usize::from(len % 8193)]),
                };
                pair.send(&d.to_pdu());
            }
            Op::Nop {
                immediate,
                reply_to_ping,
                itt,
                len,
            } => {
                let (itt, ttt) = match (reply_to_ping, ck.ping) {
                    (true, Some(t)) => (RESERVED_TAG, t),
                    _ => (u32::from(itt), RESERVED_TAG),
                };
                let n = NopOut {
                    immediate,
                    lun: Lun::default(),
                    itt,
                    ttt,
                    cmd_sn: next_sn,
                    exp_stat_sn: 0,
                    data: Bytes::from(vec![1; usize::from(len)]),
                };
                if !immediate {
                    next_sn = next_sn.wrapping_add(1);
                }
                pair.send(&n.to_pdu());
            }
            Op::Tmf {
                function,
                immediate,
                lun: l,
                itt,
                referenced,
                ref_sn_delta,
            } => {
                let Ok(function) = TmfFunction::from_u8(function % 9) else {
                    continue;
                };
                let t = TaskMgmtRequest {
                    immediate,
                    function,
                    lun: lun(l),
                    itt: 0x1000 + u32::from(itt),
                    referenced_task_tag: u32::from(referenced),
                    cmd_sn: next_sn,
                    exp_stat_sn: 0,
                    ref_cmd_sn: next_sn.wrapping_add(ref_sn_delta as i32 as u32),
                    exp_data_sn: 0,
                };
                if !immediate {
                    next_sn = next_sn.wrapping_add(1);
                }
                pair.send(&t.to_pdu());
            }
            Op::Raw(bytes) => pair.send_bytes(&bytes),
            Op::RunJobs => pair.run_jobs(),
            Op::Advance { secs } => pair.advance(Duration::from_secs(u64::from(secs))),
        }
        ck.check(&mut pair);
        assert!(pair.queued_bytes() == 0, "recv drains the outbox");
        if pair.closing().is_some() {
            break;
        }
    }
    pair.run_jobs();
    ck.check(&mut pair);
    pair.end();
});
