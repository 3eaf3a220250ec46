//! PREEMPT AND ABORT against a victim that keeps issuing I/O: the
//! preemptor gets GOOD quickly (the wait covers only the victim's commands
//! that were checked against the old reservation, not the ones it keeps
//! sending), and no victim write reaches the medium after that GOOD.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyfence_lu::backend::{BlockBackend, MemBackend};
use keyfence_lu::{CommandOutcome, CommandRequest, LogicalUnit, LuConfig, TargetLuns};
use keyfence_scsi::pr_data::{PrOutAction, PrOutCdb, PrOutParams, PrType};
use keyfence_scsi::{InitiatorPort, Nexus, ScsiStatus, TargetPort};

/// Memory with the latency of a slow disk, counting writes that landed.
#[derive(Debug)]
struct SlowDisk {
    mem: MemBackend,
    delay: Duration,
    writes: AtomicU64,
}

impl BlockBackend for SlowDisk {
    fn len(&self) -> u64 {
        self.mem.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.mem.write_at(buf, offset)?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.mem.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.discard(offset, len)
    }
    fn mapped_ranges(&self, range: Range<u64>, limit: usize) -> io::Result<Vec<Range<u64>>> {
        self.mem.mapped_ranges(range, limit)
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

fn rw10(op: u8, lba: u32) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[8] = 1;
    c
}

fn exec(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], data: &[u8]) -> CommandOutcome {
    lu.execute(&CommandRequest {
        nexus: n,
        cdb,
        data_out: data,
        read_only: false,
        luns: None,
    })
}

fn pr_out(
    lu: &LogicalUnit,
    n: &Nexus,
    sa: PrOutAction,
    t: Option<PrType>,
    key: u64,
    sa_key: u64,
) -> CommandOutcome {
    let data = PrOutParams {
        reservation_key: key,
        service_action_key: sa_key,
        ..Default::default()
    }
    .encode();
    let cdb = PrOutCdb::new(sa, t, data.len() as u32).encode();
    exec(lu, n, &cdb, &data)
}

#[test]
fn preempt_and_abort_is_not_held_up_by_a_busy_victim() {
    let name = "iqn.2026-11.io.keyfence:pa";
    let port = TargetPort::new(name, 1, 1);
    let cfg = LuConfig::new(
        name,
        0,
        vec![port.clone()],
        Arc::new(TargetLuns::new(vec![0])),
    );
    let disk = Arc::new(SlowDisk {
        mem: MemBackend::new(1 << 20),
        delay: Duration::from_millis(3),
        writes: AtomicU64::new(0),
    });
    let lu = Arc::new(LogicalUnit::new(cfg, disk.clone()).unwrap());
    let fencer = Nexus::new(
        InitiatorPort::new("iqn.2026-11.io.keyfence:fencer", 1),
        port.clone(),
    );
    let victim = Nexus::new(
        InitiatorPort::new("iqn.2026-11.io.keyfence:victim", 2),
        port,
    );
    for n in [&fencer, &victim] {
        while exec(&lu, n, &[0; 6], &[]).status != ScsiStatus::Good {}
    }
    let reg = |n: &Nexus, key| pr_out(&lu, n, PrOutAction::Register, None, 0, key).status;
    assert_eq!(reg(&fencer, 0xf), ScsiStatus::Good);
    assert_eq!(reg(&victim, 0xb), ScsiStatus::Good);
    let r = pr_out(
        &lu,
        &victim,
        PrOutAction::Reserve,
        Some(PrType::WriteExclusive),
        0xb,
        0,
    );
    assert_eq!(r.status, ScsiStatus::Good);

    // The victim, reservation holder, writes and reads as fast as its four
    // threads can.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4u32)
        .map(|k| {
            let (lu, victim, stop) = (lu.clone(), victim.clone(), stop.clone());
            std::thread::spawn(move || {
                let block = [0x5au8; 512];
                let mut i = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let lba = k * 64 + i % 64;
                    exec(&lu, &victim, &rw10(0x2a, lba), &block);
                    exec(&lu, &victim, &rw10(0x28, lba), &[]);
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        disk.writes.load(Ordering::SeqCst) > 0,
        "the victim is writing"
    );

    let start = Instant::now();
    let o = pr_out(
        &lu,
        &fencer,
        PrOutAction::PreemptAndAbort,
        Some(PrType::WriteExclusive),
        0xf,
        0xb,
    );
    let took = start.elapsed();
    let writes_at_good = disk.writes.load(Ordering::SeqCst);
    // Let the victim go on for a while: every write it tries now must be
    // refused before it reaches the disk.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(o.status, ScsiStatus::Good, "PREEMPT AND ABORT: {o:?}");
    assert!(
        took < Duration::from_secs(2),
        "PREEMPT AND ABORT took {took:?} with a busy victim"
    );
    assert_eq!(
        disk.writes.load(Ordering::SeqCst),
        writes_at_good,
        "a victim write landed after the preemptor's GOOD"
    );
}
