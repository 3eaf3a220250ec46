//! Cluster mode end to end: a three-member etcd on loopback (Debian's
//! etcd-server) and two `keyfence serve` gateways on one shared backing
//! file, each with its own portal group (TPGT 1 and 2), driven over iSCSI
//! by the initiator library.
//!
//! A reservation taken through gateway A binds gateway B at once; a
//! PREEMPT through B delivers REGISTRATIONS PREEMPTED to the victim's
//! nexus on A and takes its write access away there; a write through one
//! gateway is read through the other.

use std::path::Path;
use std::time::{Duration, Instant};

use keyfence_initiator::{
    Bytes, Device, Error, IscsiUrl, Isid, PrType, RegisterOptions, SenseKey, SessionConfig,
};
use keyfence_testkit::etcd::EtcdCluster;
use keyfence_testkit::Serve;

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:cluster";
const BLOCK: usize = 512;
const SIZE: u64 = 64 << 20;
const TEST_LIMIT: Duration = Duration::from_secs(90);
const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);

fn gateway(data_dir: &Path, endpoints: &str, name: &str, tpgt: u16) -> Serve {
    Serve::builder(KF)
        .data_dir(data_dir)
        .target_name(IQN)
        .size("64MiB")
        .log_level("info")
        .args_cluster(endpoints, name, tpgt)
        .start()
}

trait ClusterArgs {
    fn args_cluster(self, endpoints: &str, name: &str, tpgt: u16) -> Self;
}

impl ClusterArgs for keyfence_testkit::ServeBuilder {
    fn args_cluster(self, endpoints: &str, name: &str, tpgt: u16) -> Self {
        self.arg("--cluster")
            .arg(endpoints)
            .arg("--gateway")
            .arg(name)
            .arg("--first-tpgt")
            .arg(tpgt.to_string())
    }
}

/// Log in as `name` through `url` and wait (bounded) until the gateway
/// serves the clustered LU; the unit attentions of the new nexus are
/// consumed.
async fn login(url: &str, name: &str) -> Device {
    let cfg = SessionConfig {
        initiator_name: Some(name.to_string()),
        isid: Some(Isid::new(0x23d0_0000_0001).expect("ISID")),
        login_timeout: Duration::from_secs(5),
        unit_attention_retries: 0,
        ..SessionConfig::default()
    };
    let dev = Device::connect(&IscsiUrl::parse(url).expect("URL"), &cfg)
        .await
        .unwrap_or_else(|e| panic!("login of {name} at {url}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match dev.test_unit_ready().await {
            Ok(()) => break,
            Err(Error::UnitAttention(_)) => {}
            Err(Error::CheckCondition(s))
                if s.key == SenseKey::NotReady
                    && (s.asc, s.ascq) == (0x04, 0x0a)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("TEST UNIT READY of {name} at {url}: {e}"),
        }
    }
    dev
}

async fn uas(dev: &Device) -> Vec<(u8, u8)> {
    dev.clear_unit_attentions()
        .await
        .expect("TEST UNIT READY")
        .iter()
        .map(|s| (s.asc, s.ascq))
        .collect()
}

/// Whether process `pid` holds `file` open, and every such open is
/// `O_DIRECT` (from /proc/PID/fd and /proc/PID/fdinfo).
fn opened_direct(pid: u32, file: &Path) -> bool {
    const O_DIRECT: u32 = 0o40000;
    let want = std::fs::canonicalize(file).expect("canonical backing path");
    let mut opens = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd") {
        let fd = fd.expect("fd entry");
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .expect("fdinfo");
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .expect("flags line");
        if flags & O_DIRECT == 0 {
            return false;
        }
        opens += 1;
    }
    opens > 0
}

#[derive(Debug, PartialEq, Eq)]
enum Io {
    Good,
    Conflict,
}

async fn write(dev: &Device, lba: u64, byte: u8) -> Io {
    match dev.write(lba, Bytes::from(vec![byte; BLOCK])).await {
        Ok(()) => Io::Good,
        Err(Error::ReservationConflict) => Io::Conflict,
        Err(e) => panic!("WRITE: unexpected {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_through_one_gateway_binds_the_other() {
    let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .expect("etcd start");
    let endpoints = etcd.endpoints().join(",");
    let dir = tempfile::tempdir().expect("tempdir");
    // One backing file, reached from both gateways' data directories.
    let shared = dir.path().join("shared.img");
    std::fs::File::create(&shared)
        .and_then(|f| f.set_len(SIZE))
        .expect("shared backing file");
    let (da, db) = (dir.path().join("gwa"), dir.path().join("gwb"));
    for d in [&da, &db] {
        std::fs::create_dir_all(d).expect("data dir");
        std::os::unix::fs::symlink(&shared, d.join("lun0.img")).expect("symlink");
    }
    let (a, b) = {
        let (e1, e2) = (endpoints.clone(), endpoints.clone());
        let (da, db) = (da.clone(), db.clone());
        let a = tokio::task::spawn_blocking(move || gateway(&da, &e1, "gwa", 1));
        let b = tokio::task::spawn_blocking(move || gateway(&db, &e2, "gwb", 2));
        (a.await.expect("gateway A"), b.await.expect("gateway B"))
    };
    let (url_a, url_b) = (a.url(0), b.url(0));
    // Gateways on different hosts share no page cache: each serves the
    // clustered LU uncached.
    for (g, name) in [(&a, "A"), (&b, "B")] {
        let pid = g.pid().expect("gateway pid");
        assert!(
            opened_direct(pid, &shared),
            "gateway {name} has not opened the backing file O_DIRECT"
        );
    }
    tokio::time::timeout(TEST_LIMIT, async {
        let x = login(&url_a, "iqn.2026-11.test:x").await;
        let y = login(&url_b, "iqn.2026-11.test:y").await;
        let z = login(&url_b, "iqn.2026-11.test:z").await;
        let none = RegisterOptions::default();

        // x registers and reserves Write Exclusive - Registrants Only
        // through A.
        x.register(0, 0xa1, &none).await.expect("REGISTER x on A");
        x.reserve(0xa1, PrType::WriteExclusiveRegistrantsOnly)
            .await
            .expect("RESERVE on A");
        assert_eq!(write(&x, 1, 0x11).await, Io::Good);
        // Through B: unregistered initiators may read but not write.
        assert_eq!(write(&z, 1, 0x22).await, Io::Conflict);
        assert_eq!(write(&y, 1, 0x22).await, Io::Conflict);
        assert_eq!(z.read(1, 1).await.expect("READ z on B")[..], [0x11; BLOCK]);
        let r = z.read_reservation().await.expect("READ RESERVATION on B");
        assert_eq!(r.reservation.map(|d| d.key), Some(0xa1));
        // y registers through B and may write; B sees both keys.
        y.register(0, 0xb1, &none).await.expect("REGISTER y on B");
        assert_eq!(write(&y, 2, 0x33).await, Io::Good);
        assert_eq!(x.read(2, 1).await.expect("READ x on A")[..], [0x33; BLOCK]);
        assert_eq!(
            y.read_keys().await.expect("READ KEYS").keys,
            vec![0xa1, 0xb1]
        );
        // y preempts x through B: x's nexus on A gets REGISTRATIONS
        // PREEMPTED and loses write access; z on B gets nothing.
        y.preempt(0xb1, 0xa1, PrType::WriteExclusiveRegistrantsOnly)
            .await
            .expect("PREEMPT on B");
        assert_eq!(uas(&x).await, vec![REGISTRATIONS_PREEMPTED]);
        assert_eq!(write(&x, 1, 0x44).await, Io::Conflict);
        assert_eq!(uas(&z).await, vec![]);
        assert_eq!(write(&y, 1, 0x55).await, Io::Good);
        assert_eq!(x.read(1, 1).await.expect("READ x on A")[..], [0x55; BLOCK]);
        let r = x.read_reservation().await.expect("READ RESERVATION on A");
        assert_eq!(r.reservation.map(|d| d.key), Some(0xb1));
        for d in [x, y, z] {
            let _ = d.close().await;
        }
    })
    .await
    .expect("test bounded");
    drop((a, b));
    drop(etcd);
}
