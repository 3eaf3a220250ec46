//! A slow disk or a slow APTPL store must only slow the sessions that use
//! it. The in-process server's LU sits on a backend whose reads of the
//! upper half of the medium take 100 ms (a disk seeking under load), and on
//! an APTPL store whose writes take 1.5 s (an fsync on a busy disk):
//! sessions that flood such reads, or a PR OUT that writes the store while
//! other sessions reset the LU, must leave another session's TEST UNIT
//! READY and 4 KiB reads fast. Every loop is bounded in time.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyfence_initiator::commands;
use keyfence_initiator::pr::RegisterOptions;
use keyfence_initiator::{Device, IscsiUrl, SessionConfig};
use keyfence_lu::backend::BlockBackend;
use keyfence_pr::{PrState, PrStore, StoreError, Version};
use keyfence_target::server::BindHooks;
use keyfence_testkit::server::{InProcessServer, ServerOptions};

const SIZE: u64 = 16 << 20;
const SLOW_READ: Duration = Duration::from_millis(100);
/// Attacking sessions and the reads each keeps in flight.
const ATTACKERS: usize = 4;
const DEPTH: usize = 16;

/// Reads at or above `SIZE / 2` sleep [`SLOW_READ`] while `slow` is set.
#[derive(Debug)]
struct SlowReads {
    inner: Arc<dyn BlockBackend>,
    slow: Arc<AtomicBool>,
    slow_reads: Arc<AtomicU64>,
}

impl SlowReads {
    fn delay(&self, offset: u64) {
        if offset >= SIZE / 2 && self.slow.load(Ordering::SeqCst) {
            self.slow_reads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(SLOW_READ);
        }
    }
}

impl BlockBackend for SlowReads {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.delay(offset);
        self.inner.read_at(buf, offset)
    }
    fn read_vec(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        self.delay(offset);
        self.inner.read_vec(len, offset)
    }
    /// A slow read is not in any cache: it would block, and goes to the
    /// session's I/O queue. Others may be served from the page cache.
    fn try_read_nowait(&self, len: usize, offset: u64) -> Option<Vec<u8>> {
        if offset >= SIZE / 2 && self.slow.load(Ordering::SeqCst) {
            return None;
        }
        self.inner.try_read_nowait(len, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn mapped_ranges(&self, range: Range<u64>, limit: usize) -> io::Result<Vec<Range<u64>>> {
        self.inner.mapped_ranges(range, limit)
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn discard_zeroes(&self) -> bool {
        self.inner.discard_zeroes()
    }
    fn prefetch(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.prefetch(offset, len)
    }
}

fn config(initiator: &str) -> SessionConfig {
    SessionConfig {
        initiator_name: Some(initiator.into()),
        login_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

/// The in-process server over a [`SIZE`] LU with `hooks`, and a runtime
/// of its own for the initiators, so that the server's worker threads
/// serve only the server.
fn start(hooks: BindHooks) -> (InProcessServer, IscsiUrl, tokio::runtime::Runtime) {
    let srv = InProcessServer::start_with_hooks(
        ServerOptions {
            size: SIZE,
            ..Default::default()
        },
        hooks,
    );
    let url = IscsiUrl::parse(&srv.url(0)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    (srv, url, rt)
}

/// Log in as `iqn.2026-11.io.keyfence:NAME`, unit attentions consumed.
async fn login(url: &IscsiUrl, name: &str) -> Device {
    let d = Device::connect(url, &config(&format!("iqn.2026-11.io.keyfence:{name}")))
        .await
        .unwrap_or_else(|e| panic!("login of {name}: {e}"));
    d.clear_unit_attentions().await.unwrap();
    d
}

fn p99(mut v: Vec<Duration>) -> Duration {
    assert!(!v.is_empty());
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[test]
fn slow_reads_of_one_session_do_not_stall_another() {
    let slow = Arc::new(AtomicBool::new(false));
    let slow_reads = Arc::new(AtomicU64::new(0));
    let hook = {
        let (slow, slow_reads) = (slow.clone(), slow_reads.clone());
        Arc::new(move |_: &str, _: u64, inner: Arc<dyn BlockBackend>| {
            Arc::new(SlowReads {
                inner,
                slow: slow.clone(),
                slow_reads: slow_reads.clone(),
            }) as Arc<dyn BlockBackend>
        })
    };
    let (srv, url, rt) = start(BindHooks {
        backend: Some(hook),
        pr_store: None,
    });
    let (latencies, reads) = rt.block_on(async move {
        let bystander = login(&url, "bystander").await;
        let mut attackers = Vec::new();
        for k in 0..ATTACKERS {
            attackers.push(Arc::new(login(&url, &format!("flood{k}")).await));
        }
        slow.store(true, Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(3);
        let mut flood = tokio::task::JoinSet::new();
        for (k, d) in attackers.iter().enumerate() {
            for q in 0..DEPTH {
                let d = d.clone();
                flood.spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < until {
                        let lba = (SIZE / 2 / 512) + ((k * DEPTH + q) as u64 * 8) % (SIZE / 1024);
                        let cmd = commands::read16(lba, 8, 512).unwrap();
                        d.execute(&cmd).await.expect("slow read");
                        n += 1;
                    }
                    n
                });
            }
        }
        // Let the flood fill every queue, then measure the bystander.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let latencies = latencies(&bystander, Duration::from_secs(2)).await;
        let mut reads = 0;
        while let Some(n) = flood.join_next().await {
            reads += n.expect("attacker task");
        }
        (latencies, reads)
    });
    let worst = latencies.iter().max().copied().unwrap_or_default();
    let n = latencies.len();
    let p = p99(latencies);
    eprintln!(
        "bystander: {n} commands, p99 {p:?}, worst {worst:?}; attackers completed {reads} \
         slow reads ({} reached the backend)",
        slow_reads.load(Ordering::SeqCst)
    );
    assert!(
        slow_reads.load(Ordering::SeqCst) >= (ATTACKERS * DEPTH) as u64,
        "the flood did not reach the slow reads"
    );
    assert!(
        p < Duration::from_millis(100),
        "another session's commands waited for the slow disk: p99 {p:?}, worst {worst:?}"
    );
    drop(srv);
}

/// An APTPL store whose writes take [`SLOW_STORE`] while `slow` is set.
#[derive(Debug)]
struct SlowStore {
    inner: Arc<dyn PrStore>,
    slow: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
}

const SLOW_STORE: Duration = Duration::from_millis(1500);

impl PrStore for SlowStore {
    fn load(&self) -> Result<Option<(Version, PrState)>, StoreError> {
        self.inner.load()
    }
    fn compare_and_swap(
        &self,
        expected: Version,
        new: Option<&PrState>,
    ) -> Result<Version, StoreError> {
        if self.slow.load(Ordering::SeqCst) {
            self.writes.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(SLOW_STORE);
        }
        self.inner.compare_and_swap(expected, new)
    }
}

/// Measure TEST UNIT READY and 4 KiB reads of `dev` for `how_long`.
async fn latencies(dev: &Device, how_long: Duration) -> Vec<Duration> {
    let mut v = Vec::new();
    let read = commands::read16(0, 8, 512).unwrap();
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        let t = Instant::now();
        dev.test_unit_ready().await.expect("TEST UNIT READY");
        v.push(t.elapsed());
        let t = Instant::now();
        let r = dev.execute(&read).await.expect("4 KiB read");
        v.push(t.elapsed());
        assert_eq!(r.data.len(), 4096);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    v
}

#[test]
fn resets_waiting_for_a_slow_aptpl_write_do_not_stall_another_session() {
    let slow = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let hook = {
        let (slow, writes) = (slow.clone(), writes.clone());
        Arc::new(move |_: &str, _: u64, inner: Arc<dyn PrStore>| {
            Arc::new(SlowStore {
                inner,
                slow: slow.clone(),
                writes: writes.clone(),
            }) as Arc<dyn PrStore>
        })
    };
    let (srv, url, rt) = start(BindHooks {
        backend: None,
        pr_store: Some(hook),
    });
    let (lat, reset_took) = rt.block_on(async move {
        let mut devs = Vec::new();
        for name in ["pr", "reset1", "reset2", "bystander"] {
            devs.push(Arc::new(login(&url, name).await));
        }
        slow.store(true, Ordering::SeqCst);
        // REGISTER with APTPL: the store write holds the LU's reservation
        // lock for SLOW_STORE.
        let pr = devs[0].clone();
        let register = tokio::spawn(async move {
            let opts = RegisterOptions {
                aptpl: true,
                ..Default::default()
            };
            pr.register(0, 0xa, &opts).await
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while writes.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(writes.load(Ordering::SeqCst) > 0, "the APTPL write began");
        // Two other sessions reset the LU: each reset needs that lock.
        let started = Instant::now();
        let resets: Vec<_> = devs[1..3]
            .iter()
            .map(|d| {
                let d = d.clone();
                tokio::spawn(async move { d.session().lun_reset(0).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let lat = latencies(&devs[3], Duration::from_secs(1)).await;
        for r in resets {
            r.await.unwrap().expect("LOGICAL UNIT RESET");
        }
        let reset_took = started.elapsed();
        // The resets aborted the REGISTER's task (SAM-5: a LOGICAL UNIT
        // RESET aborts every task of the LU); its answer never comes.
        register.abort();
        (lat, reset_took)
    });
    let n = lat.len();
    let worst = lat.iter().max().copied().unwrap_or_default();
    let p = p99(lat);
    eprintln!(
        "bystander: {n} commands, p99 {p:?}, worst {worst:?}; the resets took {reset_took:?}"
    );
    // The resets did wait for the store write (they need its lock) ...
    assert!(
        reset_took >= Duration::from_millis(500),
        "the resets did not wait for the APTPL write ({reset_took:?})"
    );
    // ... but nobody else did.
    assert!(
        p < Duration::from_millis(100),
        "another session's commands waited for the APTPL write: p99 {p:?}, worst {worst:?}"
    );
    drop(srv);
}
