//! Portal groups change by reload in cluster mode: a three-member etcd on
//! loopback and two `keyfence serve --config FILE` gateways, gw1 (TPGT 1,
//! then also 2) and gw2 (TPGT 11), on one shared backing file, each told
//! the other's portal groups in `[[cluster.gateways]]`.
//!
//! * gw1 gains a portal group: it is in gw1's etcd registration before
//!   anyone logs in through it, an initiator logs in through it, and REPORT
//!   TARGET PORT GROUPS and SendTargets through gw2 list it once gw2 has
//!   reloaded too. Changes that cannot apply (a kept portal's TPGT moved,
//!   on this gateway's entry or another's; another `[cluster]` key; a TPGT
//!   another gateway registers) are refused in one line and the old
//!   configuration keeps running. Removing the portal group logs its
//!   session out, while a session through the other portal runs commands
//!   throughout with none failing, and the registration shrinks back.
//! * While etcd has no quorum, a portal group cannot be registered: the
//!   reload that adds it is refused and nothing listens there; once etcd
//!   is back, the same reload applies.
//! * gw1 dies (kill -9) after gaining a portal group: the SPC-2
//!   reservation held through the new TPGT is released by the survivor's
//!   nexus-loss commit, which it could only do because the registration
//!   listed that TPGT.

mod initiator_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyfence_cluster::{Cluster, ClusterConfig, LuId};
use keyfence_initiator::commands::Command;
use keyfence_initiator::{Bytes, Device, IscsiUrl};
use keyfence_testkit::etcd::EtcdCluster;
use keyfence_testkit::Serve;

use initiator_support::{io, port_identity, rtpg, Io, Load};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:cportals";
const SIZE: u64 = 16 << 20;
const BLOCK: usize = 512;
const TTL_SECS: u64 = 3;
/// ISIDs of these tests' sessions: random format, low bits per session.
const ISID_BASE: u64 = 0x23d0_0000_0000;

/// One gateway's entry in `[[cluster.gateways]]`.
#[derive(Clone)]
struct Entry {
    name: &'static str,
    portals: Vec<SocketAddr>,
    first_tpgt: u16,
}

/// Gateway `me`'s configuration: the `[cluster]` table (lease TTL `ttl`)
/// with every gateway's entry, and the target on `me`'s own portals, plus
/// `extra` (more TOML, appended).
fn config_text(endpoints: &[String], me: &Entry, all: &[Entry], ttl: u64, file: &Path) -> String {
    let quote = |v: &mut dyn Iterator<Item = String>| -> String {
        v.map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
    };
    let mut t = format!(
        "[cluster]\nendpoints = [{}]\ngateway = \"{}\"\nlease_ttl_secs = {ttl}\nsafety_margin_ms = 500\nrequest_timeout_ms = 1000\n",
        quote(&mut endpoints.iter().cloned()),
        me.name
    );
    for g in all {
        t += &format!(
            "\n[[cluster.gateways]]\nname = \"{}\"\nportals = [{}]\nfirst_tpgt = {}\n",
            g.name,
            quote(&mut g.portals.iter().map(|a| a.to_string())),
            g.first_tpgt
        );
    }
    t += &format!(
        "\n[[target]]\nname = \"{IQN}\"\nportals = [{}]\nfirst_tpgt = {}\nopen = true\n\n\
         [[target.lun]]\nid = 0\npath = \"{}\"\nsize = \"16MiB\"\n",
        quote(&mut me.portals.iter().map(|a| a.to_string())),
        me.first_tpgt,
        file.display()
    );
    t
}

struct Gw {
    serve: Serve,
    config: PathBuf,
    name: &'static str,
}

impl Gw {
    /// `keyfence reload`: (exit code, stdout, stderr).
    fn try_reload(&self) -> (i32, String, String) {
        let out = Proc::new(KF)
            .args(["reload", "--socket"])
            .arg(self.serve.data_dir().join("keyfence.sock"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn reload(&self) -> String {
        let (code, said, err) = self.try_reload();
        assert_eq!(
            code,
            0,
            "keyfence reload on {}: {err}\n{}",
            self.name,
            self.serve.log()
        );
        said
    }

    /// A reload that must be refused: its one-line reason.
    fn refused(&self) -> String {
        let (code, said, err) = self.try_reload();
        assert_eq!(code, 1, "reload on {} not refused: {said}{err}", self.name);
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    }
}

struct Fixture {
    gws: Vec<Gw>,
    entries: Vec<Entry>,
    endpoints: Vec<String>,
    file: PathBuf,
    rt: tokio::runtime::Runtime,
    etcd_client: Cluster,
    dir: tempfile::TempDir,
    etcd: EtcdCluster,
}

impl Fixture {
    /// etcd, the shared file, gw1 on one portal (TPGT 1) and gw2 on one
    /// (TPGT 11), on ports chosen up front.
    fn start() -> Fixture {
        let etcd = EtcdCluster::start(3);
        let endpoints = etcd.endpoints();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shared.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(SIZE))
            .unwrap();
        let (gws, entries) = keyfence_testkit::port::with_free_ports(2, "two gateways", |ports| {
            let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
            let entries = vec![
                Entry {
                    name: "gw1",
                    portals: vec![addr(ports[0])],
                    first_tpgt: 1,
                },
                Entry {
                    name: "gw2",
                    portals: vec![addr(ports[1])],
                    first_tpgt: 11,
                },
            ];
            let mut gws = Vec::new();
            for e in &entries {
                let config = dir.path().join(format!("{}.toml", e.name));
                std::fs::write(
                    &config,
                    config_text(&endpoints, e, &entries, TTL_SECS, &file),
                )
                .unwrap();
                let serve = Serve::builder(KF)
                    .data_dir(&dir.path().join(e.name))
                    .config(&config)
                    .log_level("info")
                    .try_start()?;
                gws.push(Gw {
                    serve,
                    config,
                    name: e.name,
                });
            }
            Ok((gws, entries))
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let etcd_client = rt
            .block_on(Cluster::connect(&ClusterConfig::new(
                endpoints.clone(),
                "tester",
            )))
            .expect("connect to etcd");
        Fixture {
            gws,
            entries,
            endpoints,
            file,
            rt,
            etcd_client,
            dir,
            etcd,
        }
    }

    /// Write gateway `gw`'s configuration for `entries` (lease TTL `ttl`).
    fn write(&self, gw: usize, entries: &[Entry], ttl: u64) {
        let text = config_text(&self.endpoints, &entries[gw], entries, ttl, &self.file);
        std::fs::write(&self.gws[gw].config, text).unwrap();
    }

    /// The TPGTs and addresses gateway `name` registers in etcd.
    fn registered(&self, name: &str) -> Vec<(u16, Vec<String>)> {
        let list = self
            .rt
            .block_on(self.etcd_client.gateways())
            .expect("list gateways");
        let g = list
            .iter()
            .find(|g| g.record.name == name)
            .unwrap_or_else(|| panic!("gateway {name} not registered"));
        g.record
            .portal_groups
            .iter()
            .map(|p| (p.tpgt, p.portals.clone()))
            .collect()
    }

    fn logs(&self) -> String {
        self.gws
            .iter()
            .map(|g| format!("--- {} ---\n{}", g.name, g.serve.log()))
            .collect()
    }
}

/// Log in through `portal` and wait (bounded) until the LU is served;
/// unit attentions consumed.
async fn login(portal: SocketAddr, name: &str, isid: u64) -> Device {
    initiator_support::login(&format!("iscsi://{portal}/{IQN}/0"), name, ISID_BASE | isid).await
}

/// SendTargets through `portal`: (port, TPGT) of every portal of the
/// target, in TPGT order.
async fn send_targets(portal: SocketAddr) -> Vec<(u16, Option<u16>)> {
    let url = IscsiUrl::parse(&format!("iscsi://{portal}/{IQN}/0")).unwrap();
    let found = keyfence_initiator::login::discover(
        &url,
        &initiator_support::session_config("iqn.2026-11.test:d", ISID_BASE | 9),
    )
    .await
    .unwrap();
    let mut v: Vec<(u16, Option<u16>)> = found
        .iter()
        .find(|t| t.name == IQN)
        .expect("SendTargets lists the target")
        .portals
        .iter()
        .map(|(_, port, tpgt)| (*port, *tpgt))
        .collect();
    v.sort_by_key(|p| p.1);
    v
}

/// The background WRITE/READ load of these tests: LBAs 1024.., at most
/// 120 s.
fn start_load(f: &Fixture, dev: Arc<Device>) -> Load {
    Load::start(&f.rt, dev, 1024, Duration::from_secs(120))
}

/// How long a load may take for the commands a test waits for.
const LOAD_PROGRESS: Duration = Duration::from_secs(30);

/// gw1's reload reported `p3` added as TPGT 2, and gw1's registration
/// lists TPGT 1 (`p1`) and TPGT 2 (`p3`).
fn assert_gw1_gained_tpgt2(f: &Fixture, said: &str, p1: SocketAddr, p3: SocketAddr) {
    assert!(
        said.contains(&format!("portal {p3} (TPGT 2) added")),
        "{said}"
    );
    assert_eq!(
        f.registered("gw1"),
        vec![(1, vec![p1.to_string()]), (2, vec![p3.to_string()])]
    );
}

/// `entries` with gw1 (entry 0) on `portals`.
fn with_gw1(entries: &[Entry], portals: Vec<SocketAddr>) -> Vec<Entry> {
    let mut e = entries.to_vec();
    e[0].portals = portals;
    e
}

/// Add portal `extra` to gw1's entry (as its second portal, TPGT 2) and
/// reload gw1; the port is picked free and another is tried if taken.
fn add_gw1_portal(f: &Fixture) -> (SocketAddr, Vec<Entry>, String) {
    let p1 = f.entries[0].portals[0];
    keyfence_testkit::port::with_free_port("a portal added by reload", |p| {
        let p3 = SocketAddr::from(([127, 0, 0, 1], p));
        let grown = with_gw1(&f.entries, vec![p1, p3]);
        f.write(0, &grown, TTL_SECS);
        match f.gws[0].try_reload() {
            (0, said, _) => Ok((p3, grown, said)),
            (_, _, err) => Err(err),
        }
    })
}

#[test]
fn a_gateway_gains_and_loses_a_portal_group_by_reload() {
    let f = Fixture::start();
    let (p1, p2) = (f.entries[0].portals[0], f.entries[1].portals[0]);
    assert_eq!(f.registered("gw1"), vec![(1, vec![p1.to_string()])]);
    let x = Arc::new(f.rt.block_on(login(p1, "iqn.2026-11.test:x", 1)));
    let y = f.rt.block_on(login(p2, "iqn.2026-11.test:y", 2));
    assert_eq!(f.rt.block_on(rtpg(&y)), vec![(1, vec![1]), (11, vec![11])]);
    let load = start_load(&f, x.clone());
    load.wait_for(200, LOAD_PROGRESS);

    // gw1 gains TPGT 2; it is registered with the cluster by the time the
    // reload returns, before anyone logged in through it.
    let (p3, grown, said) = add_gw1_portal(&f);
    assert_gw1_gained_tpgt2(&f, &said, p1, p3);
    load.wait_for(200, LOAD_PROGRESS);
    let z = f.rt.block_on(login(p3, "iqn.2026-11.test:z", 3));
    assert_eq!(f.rt.block_on(port_identity(&z)), (2, 2));
    assert_eq!(
        f.rt.block_on(rtpg(&z)),
        vec![(1, vec![1]), (2, vec![2]), (11, vec![11])]
    );
    // gw2 still advertises what its configuration says, until it reloads.
    assert_eq!(f.rt.block_on(rtpg(&y)), vec![(1, vec![1]), (11, vec![11])]);
    f.write(1, &grown, TTL_SECS);
    let said = f.gws[1].reload();
    assert!(
        said.contains(&format!("gateway gw1 portal {p3} (TPGT 2) added")),
        "{said}"
    );
    assert_eq!(
        f.rt.block_on(rtpg(&y)),
        vec![(1, vec![1]), (2, vec![2]), (11, vec![11])],
        "REPORT TARGET PORT GROUPS through gw2 after its reload"
    );
    assert_eq!(f.rt.block_on(port_identity(&y)), (11, 11));
    assert_eq!(
        f.rt.block_on(send_targets(p2)),
        vec![
            (p1.port(), Some(1)),
            (p3.port(), Some(2)),
            (p2.port(), Some(11))
        ]
    );

    // Refused, each in one line, and nothing changes: the TPGT of a kept
    // portal moved (gw1's own, then gw1's as gw2 lists it) ...
    f.write(0, &with_gw1(&f.entries, vec![p3, p1]), TTL_SECS);
    let err = f.gws[0].refused();
    assert!(
        err.contains(&format!("portal {p3} would change from TPGT 2 to TPGT 1")),
        "{err}"
    );
    let mut moved = grown.clone();
    moved[0].first_tpgt = 5;
    f.write(1, &moved, TTL_SECS);
    let err = f.gws[1].refused();
    assert!(
        err.contains(&format!(
            "portal {p1} of gateway \"gw1\" would change from TPGT 1 to TPGT 5"
        )),
        "{err}"
    );
    // ... another [cluster] key ...
    f.write(1, &grown, TTL_SECS + 1);
    let err = f.gws[1].refused();
    assert!(
        err.contains("[cluster] changed (lease_ttl_secs; only [[cluster.gateways]] applies live)")
            && err.contains("restart"),
        "{err}"
    );
    // ... a TPGT another gateway registers (gw1 without the list, a second
    // target on TPGT 11).
    let mut text = config_text(&f.endpoints, &grown[0], &[], TTL_SECS, &f.file);
    text += &format!(
        "\n[[target]]\nname = \"{IQN}.two\"\nportals = [\"127.0.0.1:0\"]\nfirst_tpgt = 11\nopen = true\n\n\
         [[target.lun]]\nid = 0\npath = \"{}\"\nsize = \"1MiB\"\n",
        f.dir.path().join("two.img").display()
    );
    std::fs::write(&f.gws[0].config, text).unwrap();
    let err = f.gws[0].refused();
    assert!(
        err.contains("TPGT 11 is registered by gateway \"gw2\""),
        "{err}"
    );
    assert!(!f.dir.path().join("two.img").exists());
    f.write(0, &grown, TTL_SECS);
    f.write(1, &grown, TTL_SECS);
    assert_eq!(
        f.registered("gw1"),
        vec![(1, vec![p1.to_string()]), (2, vec![p3.to_string()])]
    );
    assert_eq!(
        f.rt.block_on(rtpg(&y)),
        vec![(1, vec![1]), (2, vec![2]), (11, vec![11])]
    );
    assert_eq!(f.rt.block_on(port_identity(&z)), (2, 2));

    // gw1 loses TPGT 2 again: its session is logged out, the session
    // through TPGT 1 goes on, and the registration shrinks once the
    // session has gone.
    f.write(0, &f.entries, TTL_SECS);
    let said = f.gws[0].reload();
    assert!(
        said.contains(&format!("portal {p3} (TPGT 2) removed")),
        "{said}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !z.session().is_closed() {
        assert!(
            Instant::now() < deadline,
            "the session through the removed portal is still open\n{}",
            f.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        std::net::TcpStream::connect(p3).is_err(),
        "{p3} still accepts connections"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.registered("gw1") != vec![(1, vec![p1.to_string()])] {
        assert!(
            Instant::now() < deadline,
            "gw1 still registers {:?}\n{}",
            f.registered("gw1"),
            f.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    load.wait_for(200, LOAD_PROGRESS);
    f.write(1, &f.entries, TTL_SECS);
    let said = f.gws[1].reload();
    assert!(
        said.contains(&format!("gateway gw1 portal {p3} (TPGT 2) removed")),
        "{said}"
    );
    assert_eq!(f.rt.block_on(rtpg(&y)), vec![(1, vec![1]), (11, vec![11])]);
    assert_eq!(f.rt.block_on(rtpg(&x)), vec![(1, vec![1]), (11, vec![11])]);
    let (done, failed, errors) = load.finish(&f.rt);
    eprintln!("session through TPGT 1: {done} commands during the portal reloads, {failed} failed");
    assert!(done >= 800, "only {done} commands ran");
    assert_eq!(
        failed, 0,
        "commands of the unaffected session failed: {errors:?}"
    );
    let _ = f.rt.block_on(y.close());
}

#[test]
fn a_gateway_that_dies_after_gaining_a_portal_group_has_its_nexus_loss_committed_there() {
    let mut f = Fixture::start();
    let p2 = f.entries[1].portals[0];
    let (p3, grown, _) = add_gw1_portal(&f);
    f.write(1, &grown, TTL_SECS);
    f.gws[1].reload();
    let lu = LuId::for_lun(IQN, 0).unwrap();
    let (w, y) = f.rt.block_on(async {
        // w holds an SPC-2 reservation through gw1's new TPGT 2.
        let w = login(p3, "iqn.2026-11.test:w", 4).await;
        let r = w
            .execute(&Command::none(vec![0x16, 0, 0, 0, 0, 0]))
            .await
            .map(drop);
        assert_eq!(io("RESERVE(6)", r), Io::Good);
        let y = login(p2, "iqn.2026-11.test:y", 5).await;
        let r = y.write(7, Bytes::from(vec![0x77; BLOCK])).await;
        assert_eq!(io("WRITE through gw2", r), Io::Conflict);
        (w, y)
    });
    let before = f.rt.block_on(f.etcd_client.read(&lu)).unwrap();
    assert_eq!(
        before.state.spc2.as_ref().map(|n| n.target.tpgt),
        Some(2),
        "the SPC-2 holder's nexus names TPGT 2"
    );

    f.gws[0].serve.kill();
    let killed = Instant::now();
    // The survivor commits gw1's nexus loss for TPGT 2 once gw1's lease
    // has expired: the reservation ends.
    f.rt.block_on(async {
        let deadline = killed + Duration::from_secs(30);
        loop {
            let r = y.write(7, Bytes::from(vec![0x77; BLOCK])).await;
            match io("WRITE through gw2", r) {
                Io::Good => break,
                Io::Conflict | Io::Transition => {}
            }
            assert!(
                Instant::now() < deadline,
                "SPC-2 reservation through the dead gateway's new TPGT still held after 30 s\n{}",
                f.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    eprintln!(
        "dead gateway's SPC-2 reservation through its reloaded TPGT released {:?} after kill -9",
        killed.elapsed()
    );
    let after = f.rt.block_on(f.etcd_client.read(&lu)).unwrap();
    assert_eq!(after.state.spc2, None);
    assert_eq!(after.writer, "gw2");
    let losses: Vec<u16> = after
        .unit_attentions
        .iter()
        .filter(|u| u.asc == keyfence_scsi::sense::asc::I_T_NEXUS_LOSS_OCCURRED)
        .filter_map(|u| u.nexus.as_ref().map(|n| n.target.tpgt))
        .collect();
    assert_eq!(
        losses,
        vec![2],
        "I_T NEXUS LOSS for the nexus through TPGT 2"
    );
    drop(w);
    let _ = f.rt.block_on(y.close());
}

#[test]
fn a_portal_group_that_cannot_be_registered_is_not_served() {
    let f = Fixture::start();
    let p1 = f.entries[0].portals[0];
    // Two of three etcd members frozen: no quorum, nothing can be written.
    f.etcd.freeze(1);
    f.etcd.freeze(2);
    let (p3, err) = keyfence_testkit::port::with_free_port("a portal added by reload", |p| {
        let p3 = SocketAddr::from(([127, 0, 0, 1], p));
        f.write(0, &with_gw1(&f.entries, vec![p1, p3]), TTL_SECS);
        match f.gws[0].try_reload() {
            (0, said, _) => panic!("reload applied without etcd: {said}"),
            (_, _, err) if err.contains("cannot listen") => Err(err),
            (_, _, err) => Ok((p3, err)),
        }
    });
    f.etcd.thaw(1);
    f.etcd.thaw(2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("new portal groups") && err.contains("etcd unavailable"),
        "{err}"
    );
    assert!(
        std::net::TcpStream::connect(p3).is_err(),
        "{p3} accepts connections although it is not registered"
    );
    // etcd back: the same configuration applies (the gateway may be
    // joining again after its lease ran out meanwhile).
    let deadline = Instant::now() + Duration::from_secs(30);
    let said = loop {
        match f.gws[0].try_reload() {
            (0, said, _) => break said,
            (_, _, err) => assert!(
                Instant::now() < deadline,
                "reload still refused after etcd came back: {err}\n{}",
                f.logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_gw1_gained_tpgt2(&f, &said, p1, p3);
    let z = f.rt.block_on(login(p3, "iqn.2026-11.test:z", 6));
    assert_eq!(f.rt.block_on(port_identity(&z)), (2, 2));
    let _ = f.rt.block_on(z.close());
}
