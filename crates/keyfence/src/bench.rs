//! `keyfence bench`: a bounded block I/O load over one iSCSI session with a
//! real queue depth, for comparing targets.
//!
//! Progress goes to stderr once a second; the final summary is one line on
//! stdout:
//!
//! ```text
//! rw=randwrite bs=4096 qd=32 iops=23456.7 mbps=96.08 lat_avg_us=1364 lat_p50_us=1210 lat_p99_us=2950 ios=234567 seconds=10.00
//! ```
//!
//! `mbps` is 10^6 bytes per second. Latency is measured per command from
//! submission to status, including time spent waiting for the target's
//! CmdSN window.
//!
//! `--rw register` measures PERSISTENT RESERVE OUT instead: each command is
//! a REGISTER AND IGNORE EXISTING KEY with a new key, so every one changes
//! the reservation state (and, on a clustered LU, commits to etcd and waits
//! until every gateway applied it). The key is removed at the end.
//!
//! `--rw caw` measures COMPARE AND WRITE: each worker owns one `--bs` range
//! (worker n the n-th), writes a pattern there first and then swaps it with
//! another one, comparing against what it wrote last, so every command
//! must succeed (a MISCOMPARE fails the run). On a clustered LU each one
//! takes the LU's cluster-wide lock.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use keyfence_initiator::commands;
use keyfence_initiator::{Bytes, Device, IscsiUrl, SessionConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    /// PERSISTENT RESERVE OUT, REGISTER AND IGNORE EXISTING KEY.
    Register,
    /// COMPARE AND WRITE, one range per worker.
    Caw,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Register => "register",
            Rw::Caw => "caw",
        }
    }
    fn is_write(self) -> bool {
        matches!(self, Rw::Write | Rw::Randwrite)
    }
    fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }
}

/// Drive block I/O at a fixed queue depth for a fixed time.
#[derive(Debug, Parser)]
#[command(name = "keyfence bench", version)]
struct Args {
    /// iscsi://[user[%secret]@]host[:port]/target-iqn/lun
    url: String,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,
    /// Bytes per I/O (suffixes k, m accepted; a multiple of the block size).
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    bs: u64,
    /// Commands kept outstanding.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    qd: u32,
    /// Seconds to run (fractions allowed).
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    duration: Duration,
    /// Only touch the first this many bytes of the LU (suffixes k, m, g).
    #[arg(long, value_parser = parse_size)]
    size_limit: Option<u64>,
    /// Initiator name (default: resolved as for every keyfence tool).
    #[arg(long)]
    initiator_name: Option<String>,
    /// Negotiate CRC32C header and data digests.
    #[arg(long)]
    digest: bool,
    /// Set FUA on writes.
    #[arg(long)]
    fua: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let m = match t[i..].to_ascii_lowercase().as_str() {
                "k" | "kib" | "kb" => 1u64 << 10,
                "m" | "mib" | "mb" => 1 << 20,
                "g" | "gib" | "gb" => 1 << 30,
                "t" | "tib" | "tb" => 1 << 40,
                other => return Err(format!("unknown size suffix {other:?} (use k, m, g or t)")),
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if v == 0 {
        return Err("size must be positive".into());
    }
    Ok(v)
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (seconds)"))?;
    if !(v > 0.0 && v <= 86_400.0) {
        return Err("duration must be between 0 and 86400 seconds".into());
    }
    Ok(Duration::from_secs_f64(v))
}

pub fn run(args: &[OsString]) -> ExitCode {
    let args: Args = match crate::cli::parse("keyfence bench", args, 2) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyfence bench: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(bench(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyfence bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Log-linear latency histogram in microseconds: exact below 1024 µs, then
/// 64 sub-buckets per power of two (under 1.6 % error).
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum_us: u128,
}

impl Histogram {
    const SUB: u32 = 64;

    fn new() -> Self {
        Histogram {
            buckets: vec![0; 1024 + 54 * Self::SUB as usize],
            count: 0,
            sum_us: 0,
        }
    }

    fn index(us: u64) -> usize {
        if us < 1024 {
            return us as usize;
        }
        let log = 63 - us.leading_zeros(); // >= 10
        let sub = (us >> (log - 6)) & u64::from(Self::SUB - 1);
        (1024 + (log - 10) * Self::SUB + sub as u32) as usize
    }

    fn value(i: usize) -> u64 {
        if i < 1024 {
            return i as u64;
        }
        let j = (i - 1024) as u32;
        let log = j / Self::SUB + 10;
        let sub = u64::from(j % Self::SUB);
        ((1u64 << 6) | sub) << (log - 6)
    }

    fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = Self::index(us).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_us += u128::from(us);
    }

    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
        self.sum_us += o.sum_us;
    }

    fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64) * p / 100.0).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(i);
            }
        }
        Self::value(self.buckets.len() - 1)
    }

    fn mean(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            (self.sum_us / u128::from(self.count)) as u64
        }
    }
}

struct Counters {
    ios: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicBool,
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let url = IscsiUrl::parse_full(&args.url)?;
    let mut config = SessionConfig {
        initiator_name: args.initiator_name.clone(),
        ..SessionConfig::default()
    };
    config.limits.queue_depth = args.qd;
    if args.digest {
        use keyfence_initiator::Digest;
        config.prefs.header_digest = vec![Digest::Crc32c];
        config.prefs.data_digest = vec![Digest::Crc32c];
    }
    let dev = Device::connect(&url, &config).await?;
    dev.clear_unit_attentions().await?;
    let cap = dev.capacity().await?;
    let bsz = u64::from(cap.block_size);
    if !args.bs.is_multiple_of(bsz) {
        anyhow::bail!(
            "--bs {} is not a multiple of the {}-byte logical block size",
            args.bs,
            bsz
        );
    }
    let io_blocks = u32::try_from(args.bs / bsz)
        .map_err(|_| anyhow::anyhow!("--bs {} is too large", args.bs))?;
    if args.rw == Rw::Caw && io_blocks > 255 {
        anyhow::bail!(
            "--bs {} is {io_blocks} blocks; COMPARE AND WRITE covers at most 255",
            args.bs
        );
    }
    let region = args.size_limit.unwrap_or(u64::MAX).min(cap.bytes());
    let slots = region / args.bs;
    if args.rw == Rw::Caw && slots < u64::from(args.qd) {
        anyhow::bail!(
            "--rw caw needs one {}-byte range per worker: {} do not fit in {region} bytes",
            args.bs,
            args.qd
        );
    }
    if slots == 0 {
        anyhow::bail!(
            "the LU ({} bytes, limited to {region}) holds no {}-byte I/O",
            cap.bytes(),
            args.bs
        );
    }
    let p = dev.session().params();
    eprintln!(
        "keyfence bench: {} {} bs={} qd={} for {:.1}s over {} MiB; MaxRecvDSL={}/{} burst={}/{} ImmediateData={} InitialR2T={} digests={}/{}",
        url,
        args.rw.name(),
        args.bs,
        args.qd,
        args.duration.as_secs_f64(),
        region >> 20,
        p.max_recv_data_segment_length,
        p.max_send_data_segment_length,
        p.first_burst_length,
        p.max_burst_length,
        p.immediate_data,
        p.initial_r2t,
        p.header_digest,
        p.data_digest,
    );

    let payload = if args.rw.is_write() || args.rw == Rw::Caw {
        let mut v = vec![0u8; args.bs as usize];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for chunk in v.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        Bytes::from(v)
    } else {
        Bytes::new()
    };

    let dev = Arc::new(dev);
    let counters = Arc::new(Counters {
        ios: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    });
    let next_seq = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + args.duration;

    let mut workers = Vec::new();
    for w in 0..args.qd {
        let dev = dev.clone();
        let counters = counters.clone();
        let next_seq = next_seq.clone();
        let payload = payload.clone();
        let rw = args.rw;
        let fua = args.fua;
        let bs = args.bs;
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::new();
            let mut rng = 0x2545_f491_4f6c_dd1du64 ^ (u64::from(w) + 1).wrapping_mul(0x9e37_79b9);
            // COMPARE AND WRITE: this worker's range holds `a` after the
            // first write, then `b`, `a`, ... (data-out: compare, then write).
            let mut caw = None;
            if rw == Rw::Caw {
                let lba = u64::from(w) * bs / bsz;
                let a = payload.clone();
                let b: Vec<u8> = a.iter().map(|x| !x).collect();
                let swap = |x: &[u8], y: &[u8]| Bytes::from([x, y].concat());
                let (ab, ba) = (swap(&a, &b), swap(&b, &a));
                let first = commands::write16(lba, a, bsz as u32, false)?;
                dev.session()
                    .execute(dev.lun(), &first)
                    .await
                    .and_then(|r| r.into_result())
                    .map_err(|e| anyhow::anyhow!("caw: first write at LBA {lba} failed: {e}"))?;
                caw = Some((lba, [ab, ba]));
            }
            let mut turn = 0usize;
            while Instant::now() < deadline && !counters.failed.load(Ordering::Relaxed) {
                if let Some((lba, data)) = &caw {
                    let cmd = compare_and_write(*lba, io_blocks as u8, data[turn].clone());
                    let t0 = Instant::now();
                    let r = dev.session().execute(dev.lun(), &cmd).await;
                    if let Err(e) = r.and_then(|r| r.into_result()) {
                        counters.failed.store(true, Ordering::Relaxed);
                        return Err(anyhow::anyhow!(
                            "COMPARE AND WRITE at LBA {lba} failed: {e}"
                        ));
                    }
                    hist.record(t0.elapsed());
                    turn ^= 1;
                    counters.ios.fetch_add(1, Ordering::Relaxed);
                    counters.bytes.fetch_add(bs, Ordering::Relaxed);
                    continue;
                }
                let slot = if rw.is_random() {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % slots
                } else {
                    next_seq.fetch_add(1, Ordering::Relaxed) % slots
                };
                let lba = slot * bs / bsz;
                if rw == Rw::Register {
                    // A new key each time: every command changes the state.
                    let key = 0x6b66_0000_0000_0000 | (slot.wrapping_add(1) & 0xffff_ffff);
                    let t0 = Instant::now();
                    if let Err(e) = dev.register_and_ignore(key, &Default::default()).await {
                        counters.failed.store(true, Ordering::Relaxed);
                        return Err(anyhow::anyhow!(
                            "REGISTER AND IGNORE EXISTING KEY failed: {e}"
                        ));
                    }
                    hist.record(t0.elapsed());
                    counters.ios.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let cmd = if rw.is_write() {
                    commands::write16(lba, payload.clone(), bsz as u32, fua)?
                } else {
                    commands::read16(lba, io_blocks, bsz as u32)?
                };
                let t0 = Instant::now();
                let r = dev.session().execute(dev.lun(), &cmd).await;
                let r = r.and_then(|r| r.into_result());
                if let Err(e) = r {
                    counters.failed.store(true, Ordering::Relaxed);
                    return Err(anyhow::anyhow!("{} at LBA {lba} failed: {e}", rw.name()));
                }
                hist.record(t0.elapsed());
                counters.ios.fetch_add(1, Ordering::Relaxed);
                counters.bytes.fetch_add(bs, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }

    let progress = {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            let (mut last_ios, mut last_bytes) = (0u64, 0u64);
            loop {
                tick.tick().await;
                let ios = counters.ios.load(Ordering::Relaxed);
                let bytes = counters.bytes.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>5.1}s] {:>9} IOPS {:>9.2} MB/s",
                    start.elapsed().as_secs_f64(),
                    ios - last_ios,
                    (bytes - last_bytes) as f64 / 1e6
                );
                (last_ios, last_bytes) = (ios, bytes);
            }
        })
    };

    let mut hist = Histogram::new();
    let mut first_err = None;
    for w in workers {
        match w.await {
            Ok(Ok(h)) => hist.merge(&h),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow::anyhow!("worker panicked: {e}"));
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    progress.abort();
    if let Some(e) = first_err {
        return Err(e);
    }
    let ios = counters.ios.load(Ordering::Relaxed);
    let bytes = counters.bytes.load(Ordering::Relaxed);
    println!(
        "rw={} bs={} qd={} iops={:.1} mbps={:.2} lat_avg_us={} lat_p50_us={} lat_p99_us={} ios={} seconds={:.2}",
        args.rw.name(),
        args.bs,
        args.qd,
        ios as f64 / elapsed,
        bytes as f64 / elapsed / 1e6,
        hist.mean(),
        hist.percentile(50.0),
        hist.percentile(99.0),
        ios,
        elapsed
    );
    if args.rw == Rw::Register {
        // Leave no registration behind (REGISTER AND IGNORE with key 0).
        dev.register_and_ignore(0, &Default::default())
            .await
            .map_err(|e| anyhow::anyhow!("removing the benchmark's key: {e}"))?;
    }
    if let Ok(dev) = Arc::try_unwrap(dev) {
        if let Err(e) = dev.close().await {
            tracing::debug!(error = %e, "logout after bench failed");
        }
    }
    Ok(())
}

/// COMPARE AND WRITE (SBC-4 5.3) of `blocks` at `lba`; `data` holds the
/// verify data followed by the write data.
fn compare_and_write(lba: u64, blocks: u8, data: Bytes) -> commands::Command {
    let mut cdb = vec![0u8; 16];
    cdb[0] = 0x89;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[13] = blocks;
    commands::Command::write(cdb, data)
}

/// The clap definition of this command (for manual pages and completions).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("128k"), Ok(128 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12q").is_err());
        assert!(parse_size("99999999999t").is_err());
        assert!(parse_seconds("0").is_err());
        assert_eq!(parse_seconds("1.5"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn histogram_percentiles() {
        let mut h = Histogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.percentile(50.0), 500);
        assert_eq!(h.percentile(99.0), 990);
        assert_eq!(h.mean(), 500);
        let mut h = Histogram::new();
        h.record(Duration::from_micros(100_000));
        let p = h.percentile(99.0);
        assert!((98_400..=100_000).contains(&p), "{p}");
        for us in [1024u64, 5000, 1 << 30] {
            let v = Histogram::value(Histogram::index(us));
            assert!(v <= us && us - v <= us / 64, "{us} -> {v}");
        }
    }
}
