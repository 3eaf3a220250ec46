//! The metrics endpoint over real TCP: a server with `metrics` on an
//! ephemeral port, driven by the keyfence initiator library (logins that
//! succeed and fail, reads, writes, PR OUT with each result, a task
//! management function), scraped over HTTP; every counter must have moved
//! by exactly what was done, and `promtool check metrics` must accept the
//! text. Malformed and oversized requests get a 4xx, idle connections are
//! timed out and their number is bounded.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyfence_initiator::pr::RegisterOptions;
use keyfence_initiator::{Device, Error, IscsiUrl, SessionConfig};
use keyfence_scsi::pr_data::PrType;
use keyfence_target::config::Config;
use keyfence_testkit::metrics;
use keyfence_testkit::server::InProcessServer;

const A: &str = "iqn.2026-11.io.keyfence:metrics-a";
const B: &str = "iqn.2026-11.io.keyfence:metrics-b";
const ONE: &str = "iqn.2026-11.io.example:one";
const TWO: &str = "iqn.2026-11.io.example:two";
const STRANGER: &str = "iqn.2026-11.io.example:stranger";
const CHAP: (&str, &str) = ("b-user", "target-b-secret-1");

struct Fixture {
    srv: InProcessServer,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Target A: ACL for ONE and TWO, LUN 0. Target B: open, with CHAP.
    fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
data_dir = "{data}"
metrics = "127.0.0.1:0"

[[target]]
name = "{A}"
portals = ["127.0.0.1:0"]
[[target.acl]]
initiator = "{ONE}"
[[target.acl]]
initiator = "{TWO}"
[[target.lun]]
id = 0
path = "a0.img"
size = "4M"

[[target]]
name = "{B}"
portals = ["127.0.0.1:0"]
open = true
[target.chap]
user = "{cu}"
secret = "{cs}"
[[target.lun]]
id = 0
path = "b0.img"
size = "1M"
"#,
            data = dir.path().join("data").display(),
            cu = CHAP.0,
            cs = CHAP.1,
        );
        let cfg = Config::from_toml(&text, "metrics.toml").unwrap();
        let srv = InProcessServer::from_config(cfg).unwrap();
        Fixture { srv, _dir: dir }
    }

    fn metrics_addr(&self) -> SocketAddr {
        self.srv.metrics_addr().expect("metrics endpoint bound")
    }

    /// The portal of `target`; A's for a target that is not configured.
    fn portal(&self, target: &str) -> SocketAddr {
        let t = self.srv.targets();
        let (_, portals) = t.iter().find(|(n, _)| n == target).unwrap_or(&t[0]);
        portals[0].addr
    }

    fn connect(
        &self,
        initiator: &str,
        target: &str,
        chap: Option<(&str, &str)>,
    ) -> Result<Device, Error> {
        let auth = chap.map(|(u, s)| format!("{u}%{s}@")).unwrap_or_default();
        let url =
            IscsiUrl::parse_full(&format!("iscsi://{auth}{}/{target}/0", self.portal(target)))
                .unwrap();
        let cfg = SessionConfig {
            initiator_name: Some(initiator.into()),
            login_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        self.srv.block_on(Device::connect(&url, &cfg))
    }

    fn scrape(&self) -> Scrape {
        let (status, head, body) = http(
            self.metrics_addr(),
            b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n",
        );
        assert_eq!(status, 200, "{head}\n{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        Scrape::parse(&body)
    }
}

/// Send `request` and read the whole response: (status, head, body).
/// Status 0: the connection closed without a response.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A refused connection may be closed before the request is written.
    let _ = s.write_all(request);
    read_response(&mut s)
}

fn read_response(s: &mut TcpStream) -> (u16, String, String) {
    let mut raw = Vec::new();
    // A reset after a refused request counts as the end of the response.
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8(raw).expect("UTF-8 response");
    if text.is_empty() {
        return (0, String::new(), String::new());
    }
    let (head, body) = text.split_once("\r\n\r\n").expect("response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, head.to_string(), body.to_string())
}

/// One scrape: every sample by `name{labels}` as printed, and the text.
struct Scrape {
    samples: BTreeMap<String, f64>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line.rsplit_once(' ').expect("sample line");
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            assert!(
                samples.insert(key.to_string(), v).is_none(),
                "duplicate {key}"
            );
        }
        Scrape {
            samples,
            text: text.to_string(),
        }
    }

    /// The value of `key` (0 when the series is not there yet).
    fn get(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }

    fn must(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from:\n{}", self.text))
    }
}

/// `after - before` for every series in `keys`, as (key, delta) pairs.
fn deltas<'a>(before: &Scrape, after: &Scrape, keys: &[&'a str]) -> Vec<(&'a str, f64)> {
    keys.iter()
        .map(|k| (*k, after.get(k) - before.get(k)))
        .collect()
}

fn lu(name: &str, target: &str) -> String {
    format!("{name}{{target=\"{target}\",lun=\"0\"}}")
}

fn promtool_check(text: &str) {
    // Every HELP text is one sentence ending in exactly one period (the
    // encoder adds the period for registered metrics).
    for line in text.lines().filter(|l| l.starts_with("# HELP ")) {
        assert!(
            line.ends_with('.') && !line.ends_with(".."),
            "HELP text must end in one period: {line}"
        );
    }
    metrics::promtool_check(text);
}

fn write10(lba: u32, data: Bytes) -> keyfence_initiator::commands::Command {
    let blocks = (data.len() / 512) as u16;
    let mut cdb = vec![0x2a, 0];
    cdb.extend_from_slice(&lba.to_be_bytes());
    cdb.push(0);
    cdb.extend_from_slice(&blocks.to_be_bytes());
    cdb.push(0);
    keyfence_initiator::commands::Command::write(cdb, data)
}

fn read10(lba: u32, blocks: u16) -> keyfence_initiator::commands::Command {
    let mut cdb = vec![0x28, 0];
    cdb.extend_from_slice(&lba.to_be_bytes());
    cdb.push(0);
    cdb.extend_from_slice(&blocks.to_be_bytes());
    cdb.push(0);
    keyfence_initiator::commands::Command::read(cdb, u32::from(blocks) * 512)
}

#[test]
fn counters_move_by_exactly_what_was_done_and_promtool_accepts_them() {
    let f = Fixture::start();
    let s0 = f.scrape();
    promtool_check(&s0.text);
    // Every LU and every fixed label set is there from the start.
    assert_eq!(s0.must(&lu("keyfence_lu_reads_total", A)), 0.0);
    assert_eq!(s0.must(&lu("keyfence_lu_write_bytes_total", B)), 0.0);
    assert_eq!(s0.must("keyfence_logins_total{result=\"success\"}"), 0.0);
    assert_eq!(s0.must("keyfence_sessions{kind=\"normal\"}"), 0.0);
    assert_eq!(
        s0.must("keyfence_connections_refused_total{reason=\"per_source\"}"),
        0.0
    );

    // Logins: two succeed; an ACL refusal, a wrong CHAP secret and an
    // unknown target fail.
    let one = f.connect(ONE, A, None).unwrap();
    let two = f.connect(TWO, A, None).unwrap();
    assert!(f.connect(STRANGER, A, None).is_err());
    assert!(f
        .connect(ONE, B, Some((CHAP.0, "wrong-secret-00000")))
        .is_err());
    assert!(f
        .connect(ONE, "iqn.2026-11.io.keyfence:nowhere", None)
        .is_err());
    let s1 = f.scrape();
    assert_eq!(
        deltas(
            &s0,
            &s1,
            &[
                "keyfence_logins_total{result=\"success\"}",
                "keyfence_logins_total{result=\"acl_refused\"}",
                "keyfence_logins_total{result=\"chap_failure\"}",
                "keyfence_logins_total{result=\"target_not_found\"}",
                "keyfence_logins_total{result=\"other\"}",
                "keyfence_logins_total{result=\"out_of_resources\"}",
                "keyfence_logins_total{result=\"chap_throttled\"}",
            ]
        ),
        vec![
            ("keyfence_logins_total{result=\"success\"}", 2.0),
            ("keyfence_logins_total{result=\"acl_refused\"}", 1.0),
            ("keyfence_logins_total{result=\"chap_failure\"}", 1.0),
            ("keyfence_logins_total{result=\"target_not_found\"}", 1.0),
            ("keyfence_logins_total{result=\"other\"}", 0.0),
            ("keyfence_logins_total{result=\"out_of_resources\"}", 0.0),
            ("keyfence_logins_total{result=\"chap_throttled\"}", 0.0),
        ]
    );
    assert_eq!(s1.must("keyfence_sessions{kind=\"normal\"}"), 2.0);
    assert_eq!(s1.must("keyfence_connections"), 2.0);

    // Each new nexus starts with a unit attention (power on), cleared
    // here so that the commands below complete as counted.
    f.srv.block_on(async {
        one.clear_unit_attentions().await.unwrap();
        two.clear_unit_attentions().await.unwrap();
    });
    let s2 = f.scrape();
    assert_eq!(
        s2.get(&lu("keyfence_lu_unit_attentions_queued_total", A))
            - s0.get(&lu("keyfence_lu_unit_attentions_queued_total", A)),
        2.0
    );

    // I/O: three 4 KiB writes and two 8 KiB reads.
    f.srv.block_on(async {
        for i in 0..3u32 {
            let r = one
                .session()
                .execute(0, &write10(i * 8, Bytes::from(vec![i as u8; 4096])))
                .await
                .unwrap();
            assert!(r.is_good(), "{r:?}");
        }
        for i in 0..2u32 {
            let r = two.session().execute(0, &read10(i * 16, 16)).await.unwrap();
            assert!(r.is_good(), "{r:?}");
            assert_eq!(r.data.len(), 8192);
        }
    });
    let s3 = f.scrape();
    let io = [
        lu("keyfence_lu_writes_total", A),
        lu("keyfence_lu_write_bytes_total", A),
        lu("keyfence_lu_reads_total", A),
        lu("keyfence_lu_read_bytes_total", A),
        lu("keyfence_lu_write_latency_seconds_count", A),
        lu("keyfence_lu_read_latency_seconds_count", A),
        lu("keyfence_lu_reads_total", B),
    ];
    let io_keys: Vec<&str> = io.iter().map(String::as_str).collect();
    let got: Vec<f64> = deltas(&s2, &s3, &io_keys)
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    assert_eq!(got, vec![3.0, 12288.0, 2.0, 16384.0, 3.0, 2.0, 0.0]);
    // The +Inf bucket holds every observation; the sum is positive.
    assert_eq!(
        s3.must(&format!(
            "keyfence_lu_read_latency_seconds_bucket{{target=\"{A}\",lun=\"0\",le=\"+Inf\"}}"
        )),
        2.0
    );
    assert!(s3.must(&lu("keyfence_lu_write_latency_seconds_sum", A)) > 0.0);

    // PR OUT: both register (GOOD), ONE reserves Write Exclusive (GOOD),
    // TWO's reserve conflicts, ONE's release with the wrong type is a
    // CHECK CONDITION (invalid release).
    f.srv.block_on(async {
        let opts = RegisterOptions::default();
        one.register(0, 0xa1, &opts).await.unwrap();
        two.register(0, 0xb2, &opts).await.unwrap();
        one.reserve(0xa1, PrType::WriteExclusive).await.unwrap();
        assert!(two.reserve(0xb2, PrType::WriteExclusive).await.is_err());
        assert!(one.release(0xa1, PrType::ExclusiveAccess).await.is_err());
    });
    let s4 = f.scrape();
    let pr = |sa: &str, result: &str| {
        format!(
            "keyfence_pr_out_total{{target=\"{A}\",lun=\"0\",service_action=\"{sa}\",result=\"{result}\"}}"
        )
    };
    assert_eq!(s4.must(&pr("register", "good")), 2.0);
    assert_eq!(s4.must(&pr("reserve", "good")), 1.0);
    assert_eq!(s4.must(&pr("reserve", "reservation_conflict")), 1.0);
    assert_eq!(s4.must(&pr("release", "check_condition")), 1.0);
    assert_eq!(
        s4.get(&lu("keyfence_lu_reservation_conflicts_total", A))
            - s3.get(&lu("keyfence_lu_reservation_conflicts_total", A)),
        1.0
    );

    // Task management: a LOGICAL UNIT RESET, which queues a unit
    // attention for both nexuses.
    f.srv.block_on(one.session().lun_reset(0)).unwrap();
    let s5 = f.scrape();
    assert_eq!(
        s5.must(
            "keyfence_task_management_total{function=\"logical_unit_reset\",response=\"function_complete\"}"
        ),
        1.0
    );
    assert_eq!(
        s5.get(&lu("keyfence_lu_unit_attentions_queued_total", A))
            - s4.get(&lu("keyfence_lu_unit_attentions_queued_total", A)),
        2.0
    );
    promtool_check(&s5.text);

    // Sessions end: the gauges come back down.
    f.srv.block_on(async {
        one.close().await.unwrap();
        two.close().await.unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = f.scrape();
        if s.must("keyfence_sessions{kind=\"normal\"}") == 0.0
            && s.must("keyfence_connections") == 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "gauges stayed up:\n{}", s.text);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_requests_get_4xx_and_the_endpoint_is_bounded() {
    let f = Fixture::start();
    let addr = f.metrics_addr();
    let cases: [(&[u8], u16); 6] = [
        (b"BLAH\r\n\r\n", 400),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /secrets HTTP/1.1\r\n\r\n", 404),
        (b"GET /metrics HTTP/3.0\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1\r\n", 400), // closed before the blank line
    ];
    for (req, want) in cases {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(req).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let (status, head, _) = read_response(&mut s);
        assert_eq!(status, want, "{:?}: {head}", String::from_utf8_lossy(req));
    }
    // A head larger than the limit: 431, without waiting for its end.
    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while big.len() < 9000 {
        big.extend_from_slice(
            b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        );
    }
    let (status, _, _) = http(addr, &big);
    assert_eq!(status, 431);

    // Eight idle connections take every slot: a ninth is closed without
    // an answer; the idle ones get 408 after the read timeout, and then
    // scrapes work again.
    let t0 = Instant::now();
    let mut idle: Vec<TcpStream> = (0..8)
        .map(|_| {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s
        })
        .collect();
    // Give the endpoint time to accept them all.
    std::thread::sleep(Duration::from_millis(300));
    let (status, _, _) = http(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 0, "a ninth connection must be closed unanswered");
    for s in &mut idle {
        let (status, _, _) = read_response(s);
        assert_eq!(status, 408);
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    let s = f.scrape();
    assert_eq!(s.must("keyfence_sessions{kind=\"normal\"}"), 0.0);
    // HEAD gives the head only.
    let (status, head, body) = http(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_eq!((status, body.as_str()), (200, ""), "{head}");
}
