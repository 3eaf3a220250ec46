//! The target's full feature phase driven in memory: PDUs in, outbox out,
//! jobs run by the test, time advanced by the test. No socket, no runtime.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keyfence_iscsi::pdu::{DataOut, NopOut, ScsiCommand, TargetPdu, TaskAttr, RESERVED_TAG};
use keyfence_iscsi::{Cdb, Lun, SessionParams};
use keyfence_lu::backend::{BlockBackend, MemBackend};
use keyfence_target::config::Limits;
use keyfence_target::server::harness::{InMemoryTarget, SessionPair};
use keyfence_testkit::raw::{read10, write10};

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
        self.pair.run_jobs();
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

fn lun0() -> Lun {
    Lun::from_number(0).unwrap()
}

/// A command PDU with every field given.
#[allow(clippy::too_many_arguments)]
fn scsi(
    itt: u32,
    cmd_sn: u32,
    cdb: &[u8],
    read: bool,
    write: bool,
    edtl: u32,
    final_bit: bool,
    data: Bytes,
) -> keyfence_iscsi::Pdu {
    ScsiCommand {
        immediate: false,
        final_bit,
        read,
        write,
        attr: TaskAttr::Simple,
        lun: lun0(),
        itt,
        expected_data_transfer_length: edtl,
        cmd_sn,
        exp_stat_sn: 0,
        cdb: Cdb::new(cdb).unwrap(),
        bidi_read_length: None,
        data,
    }
    .to_pdu()
}

fn clear_ua(i: &mut Ini) {
    for _ in 0..4 {
        i.command(&[0; 6], false, false, 0, Bytes::new());
        if i.statuses().0[0].1 == 0 {
            return;
        }
    }
    panic!("TEST UNIT READY keeps failing");
}

#[test]
fn a_short_solicited_sequence_fails_the_command_and_writes_nothing() {
    let t = InMemoryTarget::new(Limits::default(), 1 << 20);
    let mut i = Ini::new(&t, 4);
    clear_ua(&mut i);
    // 128 KiB of 0x11, then a 128 KiB WRITE (two 64 KiB bursts) whose
    // first sequence ends (F) after 32 KiB.
    let old = Bytes::from(vec![0x11u8; 128 << 10]);
    let w = i.command(&write10(0, 256), false, true, 128 << 10, Bytes::new());
    let r2t = match i.pair.recv().unwrap().as_slice() {
        [TargetPdu::R2t(r)] => r.clone(),
        other => panic!("R2T expected, got {other:?}"),
    };
    for k in 0..2u32 {
        let r2t = if k == 0 {
            r2t.clone()
        } else {
            match i.pair.recv().unwrap().as_slice() {
                [TargetPdu::R2t(r)] => r.clone(),
                other => panic!("R2T expected, got {other:?}"),
            }
        };
        let off = r2t.buffer_offset as usize;
        let d = DataOut {
            final_bit: true,
            lun: lun0(),
            itt: w,
            ttt: r2t.ttt,
            exp_stat_sn: 0,
            data_sn: 0,
            buffer_offset: r2t.buffer_offset,
            data: old.slice(off..off + r2t.desired_data_transfer_length as usize),
        };
        i.pair.send(&d.to_pdu());
    }
    assert_eq!(i.statuses().0, vec![(w, 0)]);

    let w = i.command(&write10(0, 256), false, true, 128 << 10, Bytes::new());
    let r2t = match i.pair.recv().unwrap().as_slice() {
        [TargetPdu::R2t(r)] => r.clone(),
        other => panic!("R2T expected, got {other:?}"),
    };
    assert_eq!(r2t.desired_data_transfer_length, 64 << 10);
    let d = DataOut {
        final_bit: true,
        lun: lun0(),
        itt: w,
        ttt: r2t.ttt,
        exp_stat_sn: 0,
        data_sn: 0,
        buffer_offset: 0,
        data: Bytes::from(vec![0x22u8; 32 << 10]),
    };
    i.pair.send(&d.to_pdu());
    let out = i.pair.recv().unwrap();
    let [TargetPdu::ScsiResponse(r)] = out.as_slice() else {
        panic!("the command must end now, got {out:?}");
    };
    assert_eq!((r.itt, r.status), (w, 0x02));
    assert_eq!(r.sense[2] & 0x0f, 0x0b, "ABORTED COMMAND");
    // Nothing of it reached the medium: no zeros, no partial data.
    let rd = i.command(&read10(0, 256), true, false, 128 << 10, Bytes::new());
    let (st, data) = i.statuses();
    assert_eq!(st, vec![(rd, 0)]);
    assert!(data == old, "the failed write changed the medium");
}

#[test]
fn write_without_the_w_bit_reports_the_overflow() {
    let t = InMemoryTarget::new(Limits::default(), 1 << 20);
    let mut i = Ini::new(&t, 5);
    clear_ua(&mut i);
    i.command(&write10(0, 8), false, false, 0, Bytes::new());
    // A WRITE runs off the session's task, as every medium access does.
    i.pair.run_jobs();
    let out = i.pair.recv().unwrap();
    let [TargetPdu::ScsiResponse(r)] = out.as_slice() else {
        panic!("a response expected, got {out:?}");
    };
    assert_eq!(r.residual, keyfence_iscsi::Residual::Overflow(4096));
}

#[test]
fn a_late_cleanup_of_a_reinstated_session_leaves_the_new_one_alone() {
    let t = InMemoryTarget::new(Limits::default(), 1 << 20);
    let mut old = Ini::new(&t, 6);
    clear_ua(&mut old);
    // The same initiator port logs in again; the old session's task has
    // not ended (the login gave up waiting for it).
    let mut new = Ini::new(&t, 6);
    clear_ua(&mut new);
    let mut other = Ini {
        pair: t.session("iqn.2026-11.io.keyfence:other", 7, params()),
        cmd_sn: 1,
        itt: 0,
    };
    clear_ua(&mut other);
    let r = new.command(&[0x16, 0, 0, 0, 0, 0], false, false, 0, Bytes::new());
    assert_eq!(new.statuses().0, vec![(r, 0)], "RESERVE(6)");
    // Now the old session's task finally ends.
    old.pair.end();
    let tur = new.command(&[0; 6], false, false, 0, Bytes::new());
    assert_eq!(
        new.statuses().0,
        vec![(tur, 0)],
        "no I_T NEXUS LOSS for the live nexus"
    );
    let w = other.command(
        &write10(0, 1),
        false,
        true,
        512,
        Bytes::from(vec![1u8; 512]),
    );
    assert_eq!(
        other.statuses().0,
        vec![(w, 0x18)],
        "the SCSI-2 reservation of the new session still holds"
    );
}

#[test]
fn persistent_reserve_out_runs_as_a_job() {
    let t = InMemoryTarget::new(Limits::default(), 1 << 20);
    let mut i = Ini::new(&t, 8);
    clear_ua(&mut i);
    let mut params = vec![0u8; 24];
    params[8..16].copy_from_slice(&0xabcdu64.to_be_bytes());
    let cdb = [0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    let r = i.command(&cdb, false, true, 24, Bytes::from(params));
    assert_eq!(i.pair.held_jobs(), 1, "PR OUT is handed out");
    assert!(i.pair.recv().unwrap().is_empty());
    i.pair.run_jobs();
    assert_eq!(i.statuses().0, vec![(r, 0)]);
}

#[test]
fn reads_wait_for_the_data_in_budget_and_the_window_closes() {
    let limits = Limits {
        max_cmds_per_session: 4,
        ..Limits::default()
    };
    let t = InMemoryTarget::new(limits, 64 << 20);
    let mut i = Ini::new(&t, 9);
    clear_ua(&mut i);
    let (exp, _) = i.pair.window();
    // A full window of 16 MiB reads, nothing read back yet.
    let big = |lba: u32| {
        let mut c = [0u8; 16];
        c[0] = 0x88;
        c[6..10].copy_from_slice(&(lba * 32768).to_be_bytes());
        c[10..14].copy_from_slice(&32768u32.to_be_bytes());
        c
    };
    for k in 0..4u32 {
        i.pair.send(&scsi(
            100 + k,
            exp + k,
            &big(k % 4),
            true,
            false,
            16 << 20,
            true,
            Bytes::new(),
        ));
    }
    assert_eq!(i.pair.held_jobs(), 2, "two 16 MiB reads fit the budget");
    let (e, m) = i.pair.window();
    assert_eq!((e, m), (exp + 4, exp + 3), "the window is closed");
    // A command beyond MaxCmdSN is ignored.
    i.pair.send(&scsi(
        200,
        exp + 4,
        &[0; 6],
        false,
        false,
        0,
        true,
        Bytes::new(),
    ));
    i.pair.run_jobs();
    assert!(i.pair.queued_bytes() <= (32 << 20) + (1 << 20));
    let mut done = Vec::new();
    let mut nop = None;
    for _ in 0..8 {
        for p in i.pair.recv().unwrap() {
            match p {
                TargetPdu::DataIn(d) => {
                    if d.status.is_some() {
                        done.push(d.itt);
                    }
                }
                TargetPdu::NopIn(n) => nop = Some(n),
                other => panic!("unexpected {other:?}"),
            }
        }
        i.pair.run_jobs();
        assert!(i.pair.queued_bytes() <= (32 << 20) + (1 << 20));
    }
    done.sort();
    assert_eq!(
        done,
        vec![100, 101, 102, 103],
        "every read completes, 200 never runs"
    );
    let nop = nop.expect("a NOP-In announces the open window");
    assert_eq!((nop.itt, nop.ttt), (RESERVED_TAG, RESERVED_TAG));
    assert_eq!(nop.exp_cmd_sn, exp + 4);
    assert!(nop.max_cmd_sn >= exp + 4, "open again");
}

#[test]
fn queued_immediate_data_counts_against_the_server_budget() {
    let limits = Limits {
        max_buffered_bytes: keyfence_target::config::ByteSize(256 << 10),
        ..Limits::default()
    };
    let t = InMemoryTarget::new(limits, 1 << 20);
    let mut i = Ini::new(&t, 10);
    clear_ua(&mut i);
    let (exp, _) = i.pair.window();
    // 24 writes of 16 KiB immediate data each behind a CmdSN gap at exp.
    for k in 1..=24u32 {
        let data = Bytes::from(vec![k as u8; 16 << 10]);
        i.pair.send(&scsi(
            k,
            exp + k,
            &write10(k * 32, 32),
            false,
            true,
            16 << 10,
            true,
            data,
        ));
    }
    assert!(i.pair.recv().unwrap().is_empty());
    let held = t.buffered_bytes();
    assert!(
        held > 0 && held <= 1 << 20,
        "{held} bytes held for queued commands"
    );
    // The gap fills.
    i.pair
        .send(&scsi(99, exp, &[0; 6], false, false, 0, true, Bytes::new()));
    let (st, _) = i.statuses();
    assert_eq!(st.len(), 25);
    let full = st.iter().filter(|s| s.1 == 0x28).count();
    let good = st.iter().filter(|s| s.1 == 0).count();
    assert_eq!(good + full, 25);
    assert!(
        full > 0,
        "commands beyond the budget end with TASK SET FULL"
    );
    assert_eq!(t.buffered_bytes(), 0);
}

#[test]
fn a_write_whose_data_out_stalls_ends_the_connection() {
    let limits = Limits {
        data_out_timeout_secs: 5,
        ..Limits::default()
    };
    let t = InMemoryTarget::new(limits, 1 << 20);
    let mut i = Ini::new(&t, 11);
    clear_ua(&mut i);
    i.command(&write10(0, 64), false, true, 32 << 10, Bytes::new());
    assert_eq!(i.pair.recv().unwrap().len(), 1, "R2T");
    assert!(t.buffered_bytes() >= 32 << 10);
    i.pair.advance(Duration::from_secs(4));
    assert!(i.pair.closing().is_none());
    i.pair.advance(Duration::from_secs(2));
    assert!(i.pair.closing().unwrap().contains("Data-Out"));
    i.pair.end();
    assert_eq!(t.buffered_bytes(), 0);
}

/// Memory whose lower half is "in the page cache": reads of it are served
/// without waiting, reads of the upper half would block.
#[derive(Debug)]
struct HalfCached(MemBackend);

impl BlockBackend for HalfCached {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn try_read_nowait(&self, len: usize, offset: u64) -> Option<Vec<u8>> {
        if offset + len as u64 > self.len() / 2 {
            return None;
        }
        self.0.read_vec(len, offset).ok()
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len)
    }
    fn mapped_ranges(&self, range: Range<u64>, limit: usize) -> io::Result<Vec<Range<u64>>> {
        self.0.mapped_ranges(range, limit)
    }
    fn is_read_only(&self) -> bool {
        self.0.is_read_only()
    }
}

#[test]
fn cached_reads_are_answered_at_once_but_never_pass_a_write() {
    let backend = Arc::new(HalfCached(MemBackend::new(1 << 20)));
    let t = InMemoryTarget::with_backend(Limits::default(), backend);
    let mut i = Ini::new(&t, 9);
    clear_ua(&mut i);
    // Nothing in flight and the data cached: answered without a job.
    let r = i.command(&read10(8, 8), true, false, 4096, Bytes::new());
    assert_eq!(i.pair.held_jobs(), 0, "a cached READ went to the I/O queue");
    assert_eq!(i.statuses(), (vec![(r, 0x00)], vec![0; 4096]));
    // Not cached: a job. A later cached READ passes it (SIMPLE reads may
    // be reordered; neither changes the medium).
    let slow = i.command(&read10(1024, 8), true, false, 4096, Bytes::new());
    assert_eq!(i.pair.held_jobs(), 1);
    let fast = i.command(&read10(8, 8), true, false, 4096, Bytes::new());
    assert_eq!(i.pair.held_jobs(), 1);
    let out = i.pair.recv().unwrap();
    assert!(
        matches!(out.as_slice(), [TargetPdu::DataIn(d)] if d.itt == fast && d.status == Some(0)),
        "{out:?}"
    );
    assert_eq!(i.statuses().0, vec![(slow, 0x00)]);
    // A WRITE waiting on the queue: a READ of its blocks waits behind it
    // and returns the new data, not the cached old data.
    let w = i.command(
        &write10(8, 8),
        false,
        true,
        4096,
        Bytes::from(vec![0x5a; 4096]),
    );
    assert_eq!(i.pair.held_jobs(), 1);
    let after = i.command(&read10(8, 8), true, false, 4096, Bytes::new());
    assert_eq!(i.pair.held_jobs(), 2, "a READ passed a queued WRITE");
    assert!(i.pair.recv().unwrap().is_empty());
    assert_eq!(
        i.statuses(),
        (vec![(w, 0x00), (after, 0x00)], vec![0x5a; 4096])
    );
    // The queue is empty again: cached reads are answered at once.
    let r = i.command(&read10(8, 8), true, false, 4096, Bytes::new());
    assert_eq!(i.pair.held_jobs(), 0);
    assert_eq!(i.statuses(), (vec![(r, 0x00)], vec![0x5a; 4096]));
}
