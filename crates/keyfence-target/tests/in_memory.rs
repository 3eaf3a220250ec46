//! The target's full feature phase driven in memory: PDUs in, outbox out,
//! jobs run by the test, time advanced by the test. No socket, no runtime.

use std::time::Duration;

use bytes::Bytes;
use keyfence_iscsi::pdu::{DataOut, NopOut, ScsiCommand, TargetPdu, TaskAttr, RESERVED_TAG};
use keyfence_iscsi::{Cdb, Lun, SessionParams};
use keyfence_target::config::Limits;
use keyfence_target::server::harness::{InMemoryTarget, SessionPair};

const INITIATOR: &str = "iqn.2026-11.io.keyfence:mem-initiator";

fn params() -> SessionParams {
    SessionParams {
        max_recv_data_segment_length: 65536,
        max_send_data_segment_length: 65536,
        max_burst_length: 65536,
        first_burst_length: 16384,
        initial_r2t: true,
        immediate_data: true,
        ..SessionParams::default()
    }
}

struct Ini {
    pair: SessionPair,
    cmd_sn: u32,
    itt: u32,
}

impl Ini {
    fn new(t: &InMemoryTarget, isid: u64) -> Ini {
        Ini {
            pair: t.session(INITIATOR, isid, params()),
            cmd_sn: 1,
            itt: 0,
        }
    }

    fn command_at(
        &mut self,
        cmd_sn: u32,
        cdb: &[u8],
        read: bool,
        write: bool,
        edtl: u32,
        data: Bytes,
    ) -> u32 {
        self.itt += 1;
        let cmd = ScsiCommand {
            immediate: false,
            final_bit: true,
            read,
            write,
            attr: TaskAttr::Simple,
            lun: Lun::from_number(0).unwrap(),
            itt: self.itt,
            expected_data_transfer_length: edtl,
            cmd_sn,
            exp_stat_sn: 0,
            cdb: Cdb::new(cdb).unwrap(),
            bidi_read_length: None,
            data,
        };
        self.pair.send(&cmd.to_pdu());
        self.itt
    }

    fn command(&mut self, cdb: &[u8], read: bool, write: bool, edtl: u32, data: Bytes) -> u32 {
        let sn = self.cmd_sn;
        self.cmd_sn += 1;
        self.command_at(sn, cdb, read, write, edtl, data)
    }

    /// The statuses (ITT, status) in the outbox, and the Data-In bytes.
    fn statuses(&mut self) -> (Vec<(u32, u8)>, Vec<u8>) {
        let mut st = Vec::new();
        let mut data = Vec::new();
        for p in self.pair.recv().unwrap() {
            match p {
                TargetPdu::ScsiResponse(r) => st.push((r.itt, r.status)),
                TargetPdu::DataIn(d) => {
                    data.extend_from_slice(&d.data);
                    if let Some(s) = d.status {
                        st.push((d.itt, s));
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (st, data)
    }
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x2a;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = write10(lba, blocks);
    c[0] = 0x28;
    c
}

#[test]
fn write_with_r2t_then_read_back_in_memory() {
    let t = InMemoryTarget::new(Limits::default(), 1 << 20);
    let mut i = Ini::new(&t, 1);
    // A new nexus first sees its unit attention, then GOOD.
    let a = i.command(&[0; 6], false, false, 0, Bytes::new());
    assert_eq!(i.statuses().0, vec![(a, 0x02)]);
    let b = i.command(&[0; 6], false, false, 0, Bytes::new());
    assert_eq!(i.statuses().0, vec![(b, 0x00)]);

    // 8 KiB WRITE: 1 KiB immediate data, the rest solicited by one R2T.
    let payload: Vec<u8> = (0..8192u32).map(|x| (x % 251) as u8).collect();
    let w = i.command(
        &write10(4, 16),
        false,
        true,
        8192,
        Bytes::copy_from_slice(&payload[..1024]),
    );
    let out = i.pair.recv().unwrap();
    let [TargetPdu::R2t(r2t)] = out.as_slice() else {
        panic!("one R2T expected, got {out:?}");
    };
    assert_eq!(
        (
            r2t.itt,
            r2t.buffer_offset,
            r2t.desired_data_transfer_length,
            r2t.r2t_sn
        ),
        (w, 1024, 7168, 0)
    );
    // Two Data-Outs for the R2T.
    for (k, (off, len)) in [(1024u32, 4096u32), (5120, 3072)].into_iter().enumerate() {
        let d = DataOut {
            final_bit: off + len == 8192,
            lun: Lun::from_number(0).unwrap(),
            itt: w,
            ttt: r2t.ttt,
            exp_stat_sn: 0,
            data_sn: k as u32,
            buffer_offset: off,
            data: Bytes::copy_from_slice(&payload[off as usize..(off + len) as usize]),
        };
        i.pair.send(&d.to_pdu());
    }
    assert_eq!(i.statuses().0, vec![(w, 0x00)]);

    let r = i.command(&read10(4, 16), true, false, 8192, Bytes::new());
    let (st, data) = i.statuses();
    assert_eq!(st, vec![(r, 0x00)]);
    assert_eq!(data, payload);
    i.pair.end();
}

#[test]
fn cmdsn_gap_holds_commands_and_window_follows() {
    let t = InMemoryTarget::new(Limits::default(), 1 << 20);
    let mut i = Ini::new(&t, 2);
    let (exp, max) = i.pair.window();
    assert_eq!((exp, max), (1, Limits::default().max_cmds_per_session));
    // CmdSN 2 arrives before 1: held.
    let second = i.command_at(2, &[0; 6], false, false, 0, Bytes::new());
    assert!(i.pair.recv().unwrap().is_empty());
    let first = i.command_at(1, &[0; 6], false, false, 0, Bytes::new());
    let (st, _) = i.statuses();
    assert_eq!(
        st.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![first, second]
    );
    assert_eq!(i.pair.window().0, 3);
    // A duplicate CmdSN is ignored.
    i.command_at(2, &[0; 6], false, false, 0, Bytes::new());
    assert!(i.pair.recv().unwrap().is_empty());
}

#[test]
fn blocking_commands_are_jobs_and_pings_time_out() {
    let t = InMemoryTarget::new(Limits::default(), 1 << 20);
    let mut i = Ini::new(&t, 3);
    i.command(&[0; 6], false, false, 0, Bytes::new());
    i.statuses();
    // SYNCHRONIZE CACHE(10) runs off the connection's task.
    let s = i.command(
        &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        false,
        false,
        0,
        Bytes::new(),
    );
    assert_eq!(i.pair.held_jobs(), 1);
    assert!(
        i.pair.recv().unwrap().is_empty(),
        "no status before the job ran"
    );
    i.pair.run_jobs();
    assert_eq!(i.statuses().0, vec![(s, 0x00)]);

    // Silence: a NOP-In ping after nop_in_interval_secs, then the end.
    let limits = Limits::default();
    i.pair
        .advance(Duration::from_secs(u64::from(limits.nop_in_interval_secs)));
    let out = i.pair.recv().unwrap();
    let [TargetPdu::NopIn(ping)] = out.as_slice() else {
        panic!("a ping expected, got {out:?}");
    };
    assert_eq!(ping.itt, RESERVED_TAG);
    assert!(i.pair.closing().is_none());
    // Answering keeps the session.
    let answer = NopOut {
        immediate: true,
        lun: Lun::default(),
        itt: RESERVED_TAG,
        ttt: ping.ttt,
        cmd_sn: i.cmd_sn,
        exp_stat_sn: 0,
        data: Bytes::new(),
    };
    i.pair.send(&answer.to_pdu());
    i.pair.advance(Duration::from_secs(
        u64::from(limits.nop_in_timeout_secs) + 1,
    ));
    assert!(i.pair.closing().is_none());
    // Not answering ends it.
    i.pair
        .advance(Duration::from_secs(u64::from(limits.nop_in_interval_secs)));
    assert_eq!(i.pair.recv().unwrap().len(), 1);
    i.pair
        .advance(Duration::from_secs(u64::from(limits.nop_in_timeout_secs)));
    assert!(i.pair.closing().unwrap().contains("NOP-In"));
}
