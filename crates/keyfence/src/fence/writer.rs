//! Hidden helpers of the split-brain test.
//!
//! `keyfence fence writer` is one cluster node's application: it registers
//! its key, then writes sequence-numbered records to its own region of the
//! LUN in a loop and logs every outcome with CLOCK_MONOTONIC times (shared
//! by all processes on Linux). While the file `--cut` is absent it also
//! keeps a heartbeat file current; creating `--cut` models the node being
//! cut off from the cluster while it still reaches the storage.
//!
//! Log lines (space separated, times in ns):
//! - `ack SEQ LBA T_ISSUE T_DONE`    write acknowledged with GOOD
//! - `refused SEQ LBA T_ISSUE T_DONE ERROR...`   write failed
//!
//! `keyfence fence scan` reads a region back and prints every valid record
//! as a JSON line.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use keyfence_initiator::Bytes;

use super::key::parse_key;
use super::{connect, monotonic_ns, Role};
use crate::cli::Msg as _;

const MAGIC: &[u8; 8] = b"KFWREC01";
/// Bytes of a record that carry data; the rest of the block is zero.
const RECORD_LEN: usize = 44;

/// One write record as it sits in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub node: u32,
    pub seq: u64,
    pub t_ns: u64,
    pub key: u64,
}

fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Record {
    /// The record as a whole block of `block_size` bytes.
    pub fn encode(&self, block_size: usize) -> Vec<u8> {
        let mut b = vec![0u8; block_size.max(RECORD_LEN)];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.node.to_be_bytes());
        b[12..20].copy_from_slice(&self.seq.to_be_bytes());
        b[20..28].copy_from_slice(&self.t_ns.to_be_bytes());
        b[28..36].copy_from_slice(&self.key.to_be_bytes());
        let sum = fnv1a(&b[0..36]);
        b[36..44].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Ok(None) for a never-written (all zero) block, Err for a block that
    /// is neither zero nor a valid record.
    pub fn decode(b: &[u8]) -> Result<Option<Record>, String> {
        if b.iter().all(|x| *x == 0) {
            return Ok(None);
        }
        let field = |r: std::ops::Range<usize>| -> Result<[u8; 8], String> {
            b.get(r)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| "short block".to_string())
        };
        if b.get(0..8) != Some(MAGIC.as_slice()) {
            return Err("bad magic".into());
        }
        let sum = u64::from_be_bytes(field(36..44)?);
        if fnv1a(&b[0..36]) != sum {
            return Err("bad checksum".into());
        }
        if b[RECORD_LEN..].iter().any(|x| *x != 0) {
            return Err("garbage after the record".into());
        }
        let node_b: [u8; 4] = b[8..12].try_into().map_err(|_| "short block")?;
        Ok(Some(Record {
            node: u32::from_be_bytes(node_b),
            seq: u64::from_be_bytes(field(12..20)?),
            t_ns: u64::from_be_bytes(field(20..28)?),
            key: u64::from_be_bytes(field(28..36)?),
        }))
    }
}

/// A cluster node's application for the split-brain test.
#[derive(Debug, Parser)]
#[command(name = "keyfence fence writer")]
struct WriterArgs {
    #[arg(long)]
    device: String,
    #[arg(long)]
    node: u32,
    #[arg(long)]
    key: String,
    #[arg(long)]
    region_lba: u64,
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    region_blocks: u64,
    #[arg(long)]
    initiator_name: String,
    #[arg(long)]
    heartbeat: PathBuf,
    /// While this file exists the heartbeat stops (the node is cut off).
    #[arg(long)]
    cut: PathBuf,
    /// When this file exists the writer stops.
    #[arg(long)]
    stop: PathBuf,
    #[arg(long)]
    log: PathBuf,
    /// Hard limit on the run time.
    #[arg(long, default_value_t = 60_000)]
    max_ms: u64,
    /// Command timeout in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

/// Run `fut` to completion on a fresh runtime; on any error print it after
/// `label` and give exit status 1.
fn run_async<T>(
    label: &str,
    fut: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, ExitCode> {
    super::runtime()
        .and_then(|rt| rt.block_on(fut))
        .map_err(|e| {
            eprintln!("{label}: {e}");
            ExitCode::from(1)
        })
}

pub fn run_writer(args: &[OsString]) -> ExitCode {
    let a: WriterArgs = match crate::cli::parse("keyfence fence writer", args, 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match run_async(&format!("writer {}", a.node), writer(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

async fn writer(a: &WriterArgs) -> Result<(), String> {
    let key = parse_key(&a.key).msg()?;
    let url = keyfence_initiator::IscsiUrl::parse_full(&a.device).map_err(|e| e.to_string())?;
    let t = Duration::from_millis(a.timeout_ms);
    let mut dev = connect(&url, &a.initiator_name, Role::App, t).await.msg()?;
    dev.register_and_ignore(key, &Default::default())
        .await
        .map_err(|e| format!("REGISTER: {e}"))?;
    let bs = dev
        .capacity()
        .await
        .map_err(|e| format!("READ CAPACITY: {e}"))?
        .block_size as usize;
    let log = std::fs::File::create(&a.log).map_err(|e| format!("{}: {e}", a.log.display()))?;
    let mut log = std::io::LineWriter::new(log);
    let end = Instant::now() + Duration::from_millis(a.max_ms);
    let mut seq: u64 = 0;
    while Instant::now() < end && !a.stop.exists() {
        seq += 1;
        if !a.cut.exists() {
            let hb = format!("{seq} {}\n", monotonic_ns());
            std::fs::write(&a.heartbeat, hb).map_err(|e| format!("heartbeat: {e}"))?;
        }
        let lba = a.region_lba + seq % a.region_blocks;
        let t_issue = monotonic_ns();
        let rec = Record {
            node: a.node,
            seq,
            t_ns: t_issue,
            key,
        };
        let r = dev.write(lba, Bytes::from(rec.encode(bs))).await;
        let t_done = monotonic_ns();
        let line = match &r {
            Ok(()) => format!("ack {seq} {lba} {t_issue} {t_done}\n"),
            Err(e) => format!("refused {seq} {lba} {t_issue} {t_done} {e}\n"),
        };
        log.write_all(line.as_bytes())
            .map_err(|e| format!("log: {e}"))?;
        if let Err(e) = r {
            if e.is_connection_error() {
                if let Ok(d) = connect(&url, &a.initiator_name, Role::App, t).await {
                    dev = d;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    log.flush().map_err(|e| format!("log: {e}"))?;
    let _ = dev.close().await;
    Ok(())
}

/// Overwrite a region with takeover records (as a surviving node would
/// after fencing): any later write of the fenced node would show.
#[derive(Debug, Parser)]
#[command(name = "keyfence fence stamp")]
struct StampArgs {
    #[arg(long)]
    device: String,
    #[arg(long)]
    node: u32,
    #[arg(long)]
    key: String,
    #[arg(long)]
    region_lba: u64,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    region_blocks: u64,
    #[arg(long)]
    initiator_name: Option<String>,
}

pub fn run_stamp(args: &[OsString]) -> ExitCode {
    let a: StampArgs = match crate::cli::parse("keyfence fence stamp", args, 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match run_async("stamp", stamp(&a)) {
        Ok(t) => {
            println!("stamped at monotonic {t} ns");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Write the whole region with one WRITE through the agent's (registered)
/// port; returns the completion time.
async fn stamp(a: &StampArgs) -> Result<u64, String> {
    let key = parse_key(&a.key).msg()?;
    let url = keyfence_initiator::IscsiUrl::parse_full(&a.device).map_err(|e| e.to_string())?;
    let name = super::initiator_name(a.initiator_name.as_deref()).msg()?;
    let dev = connect(&url, &name, Role::Agent, Duration::from_secs(10))
        .await
        .msg()?;
    let bs = dev
        .capacity()
        .await
        .map_err(|e| format!("READ CAPACITY: {e}"))?
        .block_size as usize;
    let t = monotonic_ns();
    let mut data = Vec::new();
    for i in 0..a.region_blocks {
        let rec = Record {
            node: a.node,
            seq: i,
            t_ns: t,
            key,
        };
        data.extend_from_slice(&rec.encode(bs));
    }
    dev.write(a.region_lba, Bytes::from(data))
        .await
        .map_err(|e| format!("WRITE: {e}"))?;
    let done = monotonic_ns();
    let _ = dev.close().await;
    Ok(done)
}

/// Read a region back.
#[derive(Debug, Parser)]
#[command(name = "keyfence fence scan")]
struct ScanArgs {
    #[arg(long)]
    device: String,
    #[arg(long)]
    region_lba: u64,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    region_blocks: u64,
    #[arg(long)]
    initiator_name: Option<String>,
}

pub fn run_scan(args: &[OsString]) -> ExitCode {
    let a: ScanArgs = match crate::cli::parse("keyfence fence scan", args, 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match run_async("scan", scan(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

async fn scan(a: &ScanArgs) -> Result<(), String> {
    let url = keyfence_initiator::IscsiUrl::parse_full(&a.device).map_err(|e| e.to_string())?;
    let name = super::initiator_name(a.initiator_name.as_deref()).msg()?;
    let dev = connect(&url, &name, Role::Probe, Duration::from_secs(10))
        .await
        .msg()?;
    let bs = dev
        .capacity()
        .await
        .map_err(|e| format!("READ CAPACITY: {e}"))?
        .block_size as usize;
    let mut out = String::new();
    let mut lba = a.region_lba;
    let end = a
        .region_lba
        .checked_add(a.region_blocks)
        .ok_or("region out of range")?;
    while lba < end {
        let n = (end - lba).min(128) as u32;
        let data = dev
            .read(lba, n)
            .await
            .map_err(|e| format!("READ at {lba}: {e}"))?;
        for (i, b) in data.chunks(bs).enumerate() {
            let at = lba + i as u64;
            match Record::decode(b) {
                Ok(Some(r)) => out.push_str(&format!(
                    "{{\"lba\":{at},\"node\":{},\"seq\":{},\"t_ns\":{},\"key\":{}}}\n",
                    r.node, r.seq, r.t_ns, r.key
                )),
                Ok(None) => {}
                Err(e) => out.push_str(&format!("{{\"lba\":{at},\"corrupt\":\"{e}\"}}\n")),
            }
        }
        lba += u64::from(n);
    }
    print!("{out}");
    let _ = dev.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_detect_damage() {
        let r = Record {
            node: 3,
            seq: 77,
            t_ns: 123_456_789,
            key: 0xabc,
        };
        let mut b = r.encode(512);
        assert_eq!(b.len(), 512);
        assert_eq!(Record::decode(&b).unwrap(), Some(r));
        assert_eq!(Record::decode(&[0u8; 512]).unwrap(), None);
        b[15] ^= 1;
        assert!(Record::decode(&b).is_err());
        let mut b = r.encode(512);
        b[300] = 1;
        assert!(Record::decode(&b).is_err());
        assert!(Record::decode(&[1u8; 10]).is_err());
    }
}
