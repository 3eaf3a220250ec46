//! Shared helpers of the integration tests that drive a target through the
//! initiator library (pr_e2e, and the cluster tests cluster_e2e,
//! cluster_faults and cluster_interop, whose rig is
//! `keyfence_testkit::cluster`, cluster_reload and block_device): logging
//! in through a gateway and waiting until it serves the clustered LU,
//! reading unit attentions, commands a reservation may refuse.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyfence_initiator::commands::Command;
use keyfence_initiator::{Bytes, Device, Error, IscsiUrl, Isid, SenseKey, SessionConfig};

/// NOT READY, ASYMMETRIC ACCESS STATE TRANSITION: the gateway does not
/// serve the LU (not yet joined, lease in doubt, rejoining).
pub const TRANSITION: (u8, u8) = (0x04, 0x0a);

/// Logical block size of the LUs the tests serve.
pub const BLOCK: usize = 512;

/// A tokio runtime of two worker threads for a synchronous test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A session as initiator `name`, ISID `isid`, consuming no unit attention
/// on its own (`unit_attention_retries: 0`).
pub fn session_config(name: &str, isid: u64) -> SessionConfig {
    SessionConfig {
        initiator_name: Some(name.to_string()),
        isid: Some(Isid::new(isid).expect("ISID")),
        login_timeout: Duration::from_secs(5),
        unit_attention_retries: 0,
        ..SessionConfig::default()
    }
}

/// Log in as `name` (ISID `isid`) through `url` and wait (bounded) until
/// the gateway serves the LU; the new nexus's unit attentions are consumed.
pub async fn login(url: &str, name: &str, isid: u64) -> Device {
    let dev = Device::connect(
        &IscsiUrl::parse(url).expect("URL"),
        &session_config(name, isid),
    )
    .await
    .unwrap_or_else(|e| panic!("login of {name} at {url}: {e}"));
    ready(&dev, Duration::from_secs(20)).await;
    dev
}

/// TEST UNIT READY until the LU is served (unit attentions and NOT READY,
/// ASYMMETRIC ACCESS STATE TRANSITION retried) within `bound`.
pub async fn ready(dev: &Device, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        match dev.test_unit_ready().await {
            // Answered from an installed state (a reservation held by
            // another initiator also refuses TEST UNIT READY).
            Ok(()) | Err(Error::ReservationConflict) => return,
            Err(Error::UnitAttention(_)) => {}
            Err(Error::CheckCondition(s))
                if s.key == SenseKey::NotReady && (s.asc, s.ascq) == TRANSITION => {}
            Err(e) => panic!("TEST UNIT READY: {e}"),
        }
        assert!(Instant::now() < deadline, "LU not ready within {bound:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every unit attention pending for the device's I_T nexus, oldest first.
pub async fn uas(dev: &Device) -> Vec<(u8, u8)> {
    dev.clear_unit_attentions()
        .await
        .expect("TEST UNIT READY")
        .iter()
        .map(|s| (s.asc, s.ascq))
        .collect()
}

/// How a command that a reservation may refuse ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    Good,
    /// RESERVATION CONFLICT.
    Conflict,
    /// NOT READY, ASYMMETRIC ACCESS STATE TRANSITION (cluster mode: the
    /// gateway does not serve the LU).
    Transition,
}

/// The [`Io`] of command `what`'s result `r`; any other error fails the
/// test, naming `what`.
pub fn io(what: &str, r: Result<(), Error>) -> Io {
    match r {
        Ok(()) => Io::Good,
        Err(Error::ReservationConflict) => Io::Conflict,
        Err(Error::CheckCondition(s))
            if s.key == SenseKey::NotReady && (s.asc, s.ascq) == TRANSITION =>
        {
            Io::Transition
        }
        Err(e) => panic!("{what}: unexpected {e}"),
    }
}

/// WRITE of one block of `byte` at `lba`.
pub async fn write(dev: &Device, lba: u64, byte: u8) -> Io {
    io(
        "WRITE",
        dev.write(lba, Bytes::from(vec![byte; BLOCK])).await,
    )
}

/// A WRITE and a READ of 4 KiB, back to back, on one session in the
/// background until stopped (bounded: `LOAD_MAX_ROUNDS` rounds and
/// `max_time`), counting every command that did not end GOOD (unit
/// attentions included: the commands go out raw, never retried).
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

/// At most this many WRITE+READ rounds per [`Load`].
pub const LOAD_MAX_ROUNDS: u64 = 200_000;

impl Load {
    /// Start on `rt`, over the 64 4 KiB blocks from `first_lba`.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        dev: Arc<Device>,
        first_lba: u64,
        max_time: Duration,
    ) -> Load {
        let (stop, done, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, d, x) = (stop.clone(), done.clone(), failed.clone());
        let task = rt.spawn(async move {
            let deadline = Instant::now() + max_time;
            let mut errors = Vec::new();
            let mut i: u64 = 0;
            while !s.load(Ordering::Relaxed) && i < LOAD_MAX_ROUNDS && Instant::now() < deadline {
                // WRITE(10) and READ(10) of 8 blocks, sent as they are:
                // no unit attention is retried out of sight.
                let lba = u32::try_from(first_lba + (i % 64) * 8).expect("LBA");
                let cdb = |op: u8| {
                    let mut c = vec![op, 0];
                    c.extend_from_slice(&lba.to_be_bytes());
                    c.extend_from_slice(&[0, 0, 8, 0]);
                    c
                };
                let data = Bytes::from(vec![(i % 251) as u8; 4096]);
                let w = dev.execute_raw(&Command::write(cdb(0x2a), data)).await;
                let r = dev.execute_raw(&Command::read(cdb(0x28), 4096)).await;
                for res in [w, r] {
                    match res {
                        Ok(r) if r.status == 0 => {}
                        other => {
                            x.fetch_add(1, Ordering::Relaxed);
                            if errors.len() < 5 {
                                errors.push(format!("{other:?}"));
                            }
                        }
                    }
                    d.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            errors
        });
        Load {
            stop,
            done,
            failed,
            task,
        }
    }

    /// Wait until `n` more commands completed, failing the test if that
    /// takes longer than `bound`.
    pub fn wait_for(&self, n: u64, bound: Duration) {
        let start = self.done.load(Ordering::Relaxed);
        let deadline = Instant::now() + bound;
        while self.done.load(Ordering::Relaxed) < start + n {
            assert!(Instant::now() < deadline, "the load loop made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stop and return (commands done, commands failed, the first errors).
    pub fn finish(self, rt: &tokio::runtime::Runtime) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = rt.block_on(self.task).expect("load task");
        (
            self.done.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// REPORT TARGET PORT GROUPS through `dev` as (group, relative port ids).
pub async fn rtpg(dev: &Device) -> Vec<(u16, Vec<u16>)> {
    let cdb = vec![0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    let r = dev
        .execute_raw(&Command::read(cdb, 4096))
        .await
        .expect("REPORT TARGET PORT GROUPS");
    assert_eq!(r.status, 0, "REPORT TARGET PORT GROUPS: {r:?}");
    let d = r.data.to_vec();
    let mut groups = Vec::new();
    let mut at = 4;
    while at + 8 <= d.len() {
        let id = u16::from_be_bytes([d[at + 2], d[at + 3]]);
        let n = usize::from(d[at + 7]);
        let ports = (0..n)
            .map(|k| u16::from_be_bytes([d[at + 10 + 4 * k], d[at + 11 + 4 * k]]))
            .collect();
        groups.push((id, ports));
        at += 8 + 4 * n;
    }
    groups
}

/// (relative target port, target port group) of VPD 83h through `dev`.
pub async fn port_identity(dev: &Device) -> (u16, u16) {
    let ds = dev
        .device_identification()
        .await
        .expect("VPD 83h (Device Identification)");
    let find = |ty: u8| {
        let d = ds
            .iter()
            .find(|d| d.association == 1 && d.designator_type == ty)
            .unwrap_or_else(|| panic!("VPD 83h lacks target port type {ty}: {ds:?}"));
        u16::from_be_bytes([d.value[2], d.value[3]])
    };
    (find(4), find(5))
}
