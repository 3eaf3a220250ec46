//! Live reconfiguration in cluster mode: a three-member etcd on loopback
//! and two `keyfence serve --config FILE` gateways (TPGT 1 and 2) sharing
//! backing files. A LUN added by a reload on both gateways loads the
//! committed PR state and joins the apply/acknowledge protocol before it
//! is served, so a reservation taken through gateway A binds gateway B at
//! once; a LUN removed from gateway B leaves that protocol, so a PREEMPT
//! through A on it does not wait for B, and B, when the LUN is added back,
//! serves the state committed meanwhile.

mod initiator_support;

use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::time::{Duration, Instant};

use initiator_support::{uas, write, Io};
use keyfence_initiator::{Device, PrType, RegisterOptions};
use keyfence_testkit::etcd::EtcdCluster;
use keyfence_testkit::Serve;

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:creload";
const SIZE: u64 = 16 << 20;
const BLOCK: usize = 512;
const X: &str = "iqn.2026-11.test:x";
const Y: &str = "iqn.2026-11.test:y";
const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);
const REPORTED_LUNS_DATA_HAS_CHANGED: (u8, u8) = (0x3f, 0x0e);
/// A fencing PR OUT that had to wait for a gateway that does not serve
/// the LU would wait out lease TTL + margin + two request timeouts (about
/// 11 s with the defaults) and then fail; one that does not wait takes
/// a few etcd round trips.
const PROMPT: Duration = Duration::from_secs(3);

/// A gateway's configuration: cluster table, one open target on an
/// ephemeral portal with TPGT `tpgt`, and `luns` on the shared files.
fn config(endpoints: &[String], gw: &str, tpgt: u16, luns: &[(u16, &Path)]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let mut t = format!(
        "[cluster]\nendpoints = [{}]\ngateway = \"{gw}\"\n\n\
         [[target]]\nname = \"{IQN}\"\nportals = [\"127.0.0.1:0\"]\nfirst_tpgt = {tpgt}\nopen = true\n",
        eps.join(", ")
    );
    for (id, path) in luns {
        t.push_str(&format!(
            "\n[[target.lun]]\nid = {id}\npath = \"{}\"\nsize = \"16MiB\"\n",
            path.display()
        ));
    }
    t
}

struct Gw {
    serve: Serve,
    config: PathBuf,
    tpgt: u16,
    name: String,
}

impl Gw {
    fn rewrite(&self, endpoints: &[String], luns: &[(u16, &Path)]) {
        std::fs::write(&self.config, config(endpoints, &self.name, self.tpgt, luns)).unwrap();
    }

    /// `keyfence reload`: its one-line summary.
    fn reload(&self) -> String {
        let out = Proc::new(KF)
            .args(["reload", "--socket"])
            .arg(self.serve.data_dir().join("keyfence.sock"))
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(
            out.status.success(),
            "keyfence reload on {}: {stderr}\n{}",
            self.name,
            self.serve.log()
        );
        stdout
    }

    fn url(&self, lun: u16) -> String {
        format!("iscsi://{}/{IQN}/{lun}", self.serve.portals()[0])
    }
}

struct Fixture {
    gws: Vec<Gw>,
    endpoints: Vec<String>,
    files: Vec<PathBuf>,
    rt: tokio::runtime::Runtime,
    _etcd: EtcdCluster,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Fixture {
        let etcd = EtcdCluster::start(3);
        let endpoints = etcd.endpoints();
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = (0..2)
            .map(|i| {
                let p = dir.path().join(format!("shared{i}.img"));
                std::fs::File::create(&p)
                    .and_then(|f| f.set_len(SIZE))
                    .unwrap();
                p
            })
            .collect();
        let mut gws = Vec::new();
        for tpgt in 1..=2u16 {
            let name = format!("gw{tpgt}");
            let config = dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &config,
                config_text_for(&endpoints, &name, tpgt, &files[..1]),
            )
            .unwrap();
            let serve = Serve::builder(KF)
                .data_dir(&dir.path().join(&name))
                .config(&config)
                .log_level("info")
                .start();
            gws.push(Gw {
                serve,
                config,
                tpgt,
                name,
            });
        }
        let rt = initiator_support::runtime();
        Fixture {
            gws,
            endpoints,
            files,
            rt,
            _etcd: etcd,
            _dir: dir,
        }
    }

    /// LUN ids 0..n on the shared files.
    fn luns(&self, ids: &[u16]) -> Vec<(u16, &Path)> {
        ids.iter()
            .map(|i| (*i, self.files[usize::from(*i)].as_path()))
            .collect()
    }

    fn set_luns(&self, gw: usize, ids: &[u16]) {
        self.gws[gw].rewrite(&self.endpoints, &self.luns(ids));
    }

    /// `keyfence cluster status --json`: (gateway, acked revision) of
    /// every gateway serving `lun`, and the committed revision.
    fn acks(&self, lun: u16) -> (Vec<(String, Option<i64>)>, i64) {
        let out = Proc::new(KF)
            .args(["cluster", "status", "--json", "--etcd"])
            .arg(self.endpoints.join(","))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let lu = v["lus"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["lun"] == u64::from(lun))
            .unwrap_or_else(|| panic!("LUN {lun} not in cluster status: {v}"))
            .clone();
        let acks = lu["acks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["gateway"].as_str().unwrap().to_string(),
                    a["acked_revision"].as_i64(),
                )
            })
            .collect();
        (acks, lu["committed_revision"].as_i64().unwrap())
    }
}

fn config_text_for(endpoints: &[String], gw: &str, tpgt: u16, files: &[PathBuf]) -> String {
    let luns: Vec<(u16, &Path)> = files
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u16, p.as_path()))
        .collect();
    config(endpoints, gw, tpgt, &luns)
}

/// Log in as `name` (ISID 0x23d0_0000_0000 | `isid`) through `url` and
/// wait (bounded) until the gateway serves the LU; the new nexus's unit
/// attentions are consumed.
async fn login(url: &str, name: &str, isid: u64) -> Device {
    initiator_support::login(url, name, 0x23d0_0000_0000 | isid).await
}

#[test]
fn luns_join_and_leave_the_cluster_on_reload() {
    let f = Fixture::start();
    let (a, b) = (&f.gws[0], &f.gws[1]);
    let none = RegisterOptions::default();
    let x0 = f.rt.block_on(login(&a.url(0), X, 1));
    let y0 = f.rt.block_on(login(&b.url(0), Y, 1));

    // LUN 1 is added on both gateways.
    for (i, g) in f.gws.iter().enumerate() {
        f.set_luns(i, &[0, 1]);
        let said = g.reload();
        assert!(said.contains("LUN 1 added"), "{}: {said}", g.name);
    }
    for (d, who) in [(&x0, "x on A"), (&y0, "y on B")] {
        let seen = f.rt.block_on(uas(d));
        assert!(
            seen.contains(&REPORTED_LUNS_DATA_HAS_CHANGED),
            "{who}: no REPORTED LUNS DATA HAS CHANGED after the reload; unit attentions {seen:x?}"
        );
    }

    let x1 = f.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            let x1 = login(&a.url(1), X, 2).await;
            let y1 = login(&b.url(1), Y, 2).await;
            // A reservation through A binds B on the new LUN.
            x1.register(0, 0xa1, &none).await.expect("REGISTER x on A");
            x1.reserve(0xa1, PrType::WriteExclusiveRegistrantsOnly)
                .await
                .expect("RESERVE on A");
            assert_eq!(write(&x1, 1, 0x11).await, Io::Good);
            assert_eq!(write(&y1, 1, 0x22).await, Io::Conflict);
            let r = y1.read_reservation().await.expect("READ RESERVATION on B");
            assert_eq!(r.reservation.map(|d| d.key), Some(0xa1));
            y1.register(0, 0xb1, &none).await.expect("REGISTER y on B");
            assert_eq!(write(&y1, 2, 0x33).await, Io::Good);
            assert_eq!(x1.read(2, 1).await.expect("READ on A")[..], [0x33; BLOCK]);
            // LUN 0 is not reserved.
            assert_eq!(write(&y0, 1, 0x44).await, Io::Good);
            let _ = y1.close().await;
            x1
        })
        .await
        .expect("bounded")
    });
    // Both gateways serve LUN 1 and applied its last change.
    let (acks, committed) = f.acks(1);
    let names: Vec<&str> = acks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["gw1", "gw2"], "{acks:?}");
    assert!(
        acks.iter().all(|(_, r)| *r == Some(committed)),
        "{acks:?} (committed {committed})"
    );

    // LUN 1 leaves gateway B only.
    f.set_luns(1, &[0]);
    let said = b.reload();
    assert!(said.contains("LUN 1 removed"), "{said}");
    let (acks, _) = f.acks(1);
    assert_eq!(
        acks,
        vec![("gw1".to_string(), acks[0].1), ("gw2".to_string(), None)],
        "gw2 no longer serves LUN 1"
    );
    assert!(f
        .rt
        .block_on(uas(&y0))
        .contains(&REPORTED_LUNS_DATA_HAS_CHANGED));

    f.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            // A PREEMPT on LUN 1 through A does not wait for B, which is
            // alive but no longer serves LUN 1.
            let t = Instant::now();
            x1.preempt(0xa1, 0xb1, PrType::WriteExclusiveRegistrantsOnly)
                .await
                .expect("PREEMPT on LUN 1 through A");
            let took = t.elapsed();
            eprintln!("PREEMPT on LUN 1 after gw2 removed it: {took:?}");
            assert!(took < PROMPT, "PREEMPT waited {took:?}");

            // On LUN 0, which both serve, a PREEMPT through A still
            // reaches B's nexus before GOOD.
            x0.register(0, 0xa0, &none).await.expect("REGISTER x LUN 0");
            y0.register(0, 0xb0, &none).await.expect("REGISTER y LUN 0");
            x0.reserve(0xa0, PrType::WriteExclusive)
                .await
                .expect("RESERVE LUN 0");
            let t = Instant::now();
            x0.preempt(0xa0, 0xb0, PrType::WriteExclusive)
                .await
                .expect("PREEMPT on LUN 0 through A");
            let took = t.elapsed();
            eprintln!("PREEMPT on LUN 0 (served by both): {took:?}");
            assert!(took < PROMPT, "PREEMPT waited {took:?}");
            assert_eq!(uas(&y0).await, vec![REGISTRATIONS_PREEMPTED]);
            assert_eq!(write(&y0, 1, 0x55).await, Io::Conflict);
            let _ = x1.close().await;
        })
        .await
        .expect("bounded")
    });

    // LUN 1 back on B: it serves the state committed while it was away
    // (y's registration preempted, x holding the reservation).
    f.set_luns(1, &[0, 1]);
    let said = b.reload();
    assert!(said.contains("LUN 1 added"), "{said}");
    f.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            let y1 = login(&b.url(1), Y, 4).await;
            let k = y1.read_keys().await.expect("READ KEYS on B");
            assert_eq!(k.keys, vec![0xa1]);
            let r = y1.read_reservation().await.expect("READ RESERVATION on B");
            assert_eq!(r.reservation.map(|d| d.key), Some(0xa1));
            assert_eq!(write(&y1, 1, 0x66).await, Io::Conflict);
            let _ = y1.close().await;
        })
        .await
        .expect("bounded")
    });
    let (acks, committed) = f.acks(1);
    assert!(
        acks.len() == 2 && acks.iter().all(|(_, r)| *r == Some(committed)),
        "{acks:?} (committed {committed})"
    );
    for d in [x0, y0] {
        let _ = f.rt.block_on(d.close());
    }
}
