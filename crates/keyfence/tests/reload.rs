//! `keyfence status`, `keyfence reload` and SIGHUP against a real `keyfence
//! serve --config FILE` process, with sessions of the keyfence initiator
//! library over loopback.
//!
//! The configuration has one target with LUNs 0 and 1 and three
//! initiators: `steady` sees LUN 0 only (its view never changes, so no
//! reload below may disturb it), `watcher` sees every LUN, and `doomed`
//! loses its ACL entry in a reload. Every I/O loop is bounded by a command
//! count and a deadline.

mod initiator_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyfence_initiator::commands;
use keyfence_initiator::pr::RegisterOptions;
use keyfence_initiator::{Device, IscsiUrl, SessionConfig};
use keyfence_scsi::SenseKey;
use keyfence_testkit::metrics::{self, promtool_check};
use keyfence_testkit::{opened_direct, Serve};

use initiator_support::{port_identity, rtpg, Load};

const IQN: &str = "iqn.2026-11.io.keyfence:reload";
const STEADY: &str = "iqn.2026-11.io.example:steady";
const WATCHER: &str = "iqn.2026-11.io.example:watcher";
const DOOMED: &str = "iqn.2026-11.io.example:doomed";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keyfence"))
}

/// The configuration: `luns` as (id, size), and the ACL entries.
fn config_text(luns: &[(u16, &str)], with_doomed: bool) -> String {
    let mut t = format!(
        "[[target]]\nname = \"{IQN}\"\nportals = [\"127.0.0.1:0\"]\n\n\
         [[target.acl]]\ninitiator = \"{STEADY}\"\n[[target.acl.lun]]\nlun = 0\n\n\
         [[target.acl]]\ninitiator = \"{WATCHER}\"\n"
    );
    if with_doomed {
        t.push_str(&format!("\n[[target.acl]]\ninitiator = \"{DOOMED}\"\n"));
    }
    for (id, size) in luns {
        t.push_str(&format!(
            "\n[[target.lun]]\nid = {id}\npath = \"lun{id}.img\"\nsize = \"{size}\"\n"
        ));
    }
    t
}

struct Fixture {
    serve: Serve,
    config: PathBuf,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn start(text: &str) -> Fixture {
        Self::start_with(text, &[])
    }

    /// [`Fixture::start`] with extra `keyfence serve` arguments.
    fn start_with(text: &str, args: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("keyfence.toml");
        std::fs::write(&config, text).unwrap();
        let mut b = Serve::builder(bin()).config(&config);
        for a in args {
            b = b.arg(a);
        }
        let serve = b.start();
        let rt = initiator_support::runtime();
        Fixture {
            serve,
            config,
            rt,
            _dir: dir,
        }
    }

    fn socket(&self) -> PathBuf {
        self.serve.data_dir().join("keyfence.sock")
    }

    fn rewrite(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    fn connect(&self, initiator: &str, lun: u16) -> Device {
        let url =
            IscsiUrl::parse(&format!("iscsi://{}/{IQN}/{lun}", self.serve.portals()[0])).unwrap();
        let cfg = SessionConfig {
            initiator_name: Some(initiator.into()),
            login_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let dev = self
            .rt
            .block_on(Device::connect(&url, &cfg))
            .unwrap_or_else(|e| panic!("{initiator} logs in: {e}\n{}", self.serve.log()));
        // The power-on unit attention of a new nexus.
        self.rt.block_on(dev.clear_unit_attentions()).unwrap();
        dev
    }

    /// Run `keyfence ARGS... --socket SOCK`: (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Proc::new(bin())
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.cli(&["status", "--json"]);
        assert_eq!(code, 0, "keyfence status: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}\n{out}"))
    }

    fn reload(&self) -> String {
        let (code, out, err) = self.cli(&["reload"]);
        assert_eq!(code, 0, "keyfence reload: {err}\n{}", self.serve.log());
        out
    }
}

/// Every unit attention `dev` reports until there is none (bounded).
fn drain_uas(f: &Fixture, dev: &Device, lun: u16) -> Vec<(u8, u8)> {
    f.rt.block_on(async {
        let mut seen = Vec::new();
        for _ in 0..16 {
            let r = dev
                .session()
                .execute(lun, &commands::test_unit_ready())
                .await
                .unwrap();
            match &r.sense {
                Some(s) if r.status == 0x02 && s.key == SenseKey::UnitAttention => {
                    seen.push((s.asc, s.ascq))
                }
                _ => return seen,
            }
        }
        panic!("unit attentions did not stop: {seen:?}");
    })
}

fn lun_sizes(status: &serde_json::Value) -> Vec<(u64, u64)> {
    status["targets"][0]["luns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["lun"].as_u64().unwrap(),
                l["size_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The background WRITE/READ load of these tests: LBAs 0.., at most 60 s.
fn start_load(f: &Fixture, dev: Arc<Device>) -> Load {
    Load::start(&f.rt, dev, 0, Duration::from_secs(60))
}

/// How long a load may take for the commands a test waits for.
const LOAD_PROGRESS: Duration = Duration::from_secs(20);

#[test]
fn status_shows_targets_sessions_lus_and_limits() {
    let f = Fixture::start(&config_text(&[(0, "4M"), (1, "4M")], true));
    // File permissions are the access control.
    let mode = std::fs::metadata(f.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");
    let watcher = f.connect(WATCHER, 1);
    f.rt.block_on(watcher.register_and_ignore(0xabc, &RegisterOptions::default()))
        .unwrap();
    f.rt.block_on(watcher.reserve(0xabc, keyfence_scsi::pr_data::PrType::WriteExclusive))
        .unwrap();
    let info = watcher.session().info().clone();

    let s = f.status();
    assert_eq!(s["pid"].as_u64(), f.serve.pid().map(u64::from));
    assert_eq!(s["config_generation"], 0);
    let t = &s["targets"][0];
    assert_eq!(t["name"], IQN);
    assert_eq!(t["access"], "acl");
    assert_eq!(t["acl_entries"], 3);
    assert_eq!(t["portals"][0]["tpgt"], 1);
    assert_eq!(t["portals"][0]["address"], f.serve.portals()[0].to_string());
    assert_eq!(lun_sizes(&s), vec![(0, 4 << 20), (1, 4 << 20)]);
    let l1 = &t["luns"][1];
    assert_eq!(l1["block_size"], 512);
    assert_eq!(l1["read_only"], false);
    assert!(l1["backing"].as_str().unwrap().ends_with("lun1.img"));
    assert_eq!(l1["pr"]["registrations"], 1);
    assert_eq!(l1["pr"]["generation"], 1);
    let res = &l1["pr"]["reservation"];
    assert_eq!(res["type"], "Write Exclusive");
    assert_eq!(res["type_code"], 1);
    assert_eq!(res["key"], "0x0000000000000abc");
    assert!(
        res["holder"].as_str().unwrap().starts_with(WATCHER),
        "{res}"
    );
    assert!(t["luns"][0]["pr"]["reservation"].is_null());

    let sessions = s["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let x = &sessions[0];
    assert_eq!(x["initiator"], WATCHER);
    assert_eq!(x["tsih"], u64::from(info.tsih));
    assert_eq!(x["isid"], format!("{:012x}", info.isid));
    assert_eq!(x["type"], "normal");
    assert_eq!(x["target"], IQN);
    assert_eq!(x["tpgt"], 1);
    assert_eq!(x["portal"], f.serve.portals()[0].to_string());
    assert!(x["age_secs"].as_u64().unwrap() < 60);
    let p = &x["params"];
    let want = watcher.session().params();
    assert_eq!(p["immediate_data"], want.immediate_data);
    assert_eq!(p["max_burst_length"], want.max_burst_length);
    assert_eq!(p["header_digest"], want.header_digest);

    assert_eq!(s["limits"]["max_sessions"], 64);
    assert_eq!(s["limits"]["max_cmds_per_session"], 128);

    // The tables show the same.
    let (code, out, _) = f.cli(&["status"]);
    assert_eq!(code, 0);
    for want in [IQN, WATCHER, "Write Exclusive", "4.0 MiB", "max_sessions"] {
        assert!(out.contains(want), "{want} missing from:\n{out}");
    }
    f.rt.block_on(Arc::new(watcher).session().logout()).unwrap();
}

#[test]
fn status_without_a_server_says_so_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Proc::new(bin())
        .args(["status", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no keyfence server is listening"), "{err}");
    // Usage errors are 2.
    let out = Proc::new(bin())
        .args(["status", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Proc::new(bin())
        .args(["reload", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn reload_adds_and_removes_luns_and_acls_under_load() {
    let f = Fixture::start(&config_text(&[(0, "4M"), (1, "4M")], true));
    let steady = Arc::new(f.connect(STEADY, 0));
    let watcher = f.connect(WATCHER, 0);
    let doomed = f.connect(DOOMED, 0);
    assert_eq!(f.rt.block_on(watcher.report_luns()).unwrap(), vec![0, 1]);

    let load = start_load(&f, steady.clone());
    load.wait_for(200, LOAD_PROGRESS);
    // LUN 1 goes, LUN 2 comes, `doomed` loses its ACL entry.
    f.rewrite(&config_text(&[(0, "4M"), (2, "4M")], false));
    let said = f.reload();
    assert!(said.contains("LUN 1 removed"), "{said}");
    assert!(said.contains("LUN 2 added"), "{said}");
    assert!(said.contains("ACL changed"), "{said}");
    load.wait_for(200, LOAD_PROGRESS);

    // The watcher is told, then sees the new LUNs.
    let uas = drain_uas(&f, &watcher, 0);
    assert!(
        uas.contains(&(0x3f, 0x0e)),
        "REPORTED LUNS DATA HAS CHANGED expected: {uas:?}"
    );
    assert_eq!(f.rt.block_on(watcher.report_luns()).unwrap(), vec![0, 2]);
    let r =
        f.rt.block_on(watcher.session().execute(1, &commands::test_unit_ready()))
            .unwrap();
    let s = r.sense.expect("LUN 1 is gone");
    assert_eq!((s.key, s.asc, s.ascq), (SenseKey::IllegalRequest, 0x25, 0));
    let r =
        f.rt.block_on(watcher.session().execute(2, &commands::test_unit_ready()))
            .unwrap();
    // A nexus new to LUN 2 first sees its power-on unit attention.
    assert!(r.status == 0 || r.sense.is_some_and(|s| s.key == SenseKey::UnitAttention));

    // The initiator that lost access is asked to log out and is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !doomed.session().is_closed() {
        assert!(
            Instant::now() < deadline,
            "the de-ACLed session is still open\n{}",
            f.serve.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = f.status();
    let names: Vec<&str> = s["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["initiator"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&DOOMED), "{names:?}");
    assert_eq!(s["config_generation"], 1);
    // It cannot come back.
    let url = IscsiUrl::parse(&format!("iscsi://{}/{IQN}/0", f.serve.portals()[0])).unwrap();
    let cfg = SessionConfig {
        initiator_name: Some(DOOMED.into()),
        ..Default::default()
    };
    assert!(f.rt.block_on(Device::connect(&url, &cfg)).is_err());

    // And back: LUN 1 returns, `doomed` is allowed again.
    f.rewrite(&config_text(&[(0, "4M"), (1, "4M"), (2, "4M")], true));
    f.reload();
    load.wait_for(200, LOAD_PROGRESS);
    let uas = drain_uas(&f, &watcher, 0);
    assert!(uas.contains(&(0x3f, 0x0e)), "{uas:?}");
    assert_eq!(f.rt.block_on(watcher.report_luns()).unwrap(), vec![0, 1, 2]);
    let back = f.connect(DOOMED, 0);

    let (done, failed, errors) = load.finish(&f.rt);
    eprintln!("unaffected session: {done} commands during two reloads, {failed} failed");
    assert!(done >= 600, "only {done} commands ran");
    assert_eq!(
        failed, 0,
        "commands of the unaffected session failed: {errors:?}"
    );
    // The unaffected session saw no unit attention either.
    assert!(drain_uas(&f, &steady, 0).is_empty());
    assert_eq!(f.rt.block_on(steady.report_luns()).unwrap(), vec![0]);
    f.rt.block_on(back.close()).unwrap();
    f.rt.block_on(watcher.close()).unwrap();
}

#[test]
fn raising_size_grows_the_lu_with_capacity_data_has_changed() {
    let f = Fixture::start(&config_text(&[(0, "4M"), (1, "4M")], false));
    let watcher = f.connect(WATCHER, 1);
    let steady = f.connect(STEADY, 0);
    let before = f.rt.block_on(watcher.read_capacity16()).unwrap();
    assert_eq!(before.blocks(), 8192);
    f.rewrite(&config_text(&[(0, "4M"), (1, "8M")], false));
    let said = f.reload();
    assert!(said.contains("LUN 1 grows to 8388608 bytes"), "{said}");
    let uas = drain_uas(&f, &watcher, 1);
    assert_eq!(
        uas,
        vec![(0x2a, 0x09)],
        "CAPACITY DATA HAS CHANGED expected"
    );
    let after = f.rt.block_on(watcher.read_capacity16()).unwrap();
    assert_eq!(after.blocks(), 16384);
    // The new blocks are there, durably in the file.
    f.rt.block_on(watcher.write(16383, Bytes::from(vec![7u8; 512])))
        .unwrap();
    assert_eq!(
        f.rt.block_on(watcher.read(16383, 1)).unwrap(),
        Bytes::from(vec![7u8; 512])
    );
    let file = f.serve.data_dir().join("lun1.img");
    assert_eq!(std::fs::metadata(file).unwrap().len(), 8 << 20);
    assert_eq!(lun_sizes(&f.status()), vec![(0, 4 << 20), (1, 8 << 20)]);
    // LUN 0 did not change: its nexuses are not disturbed.
    assert!(drain_uas(&f, &steady, 0).is_empty());
}

#[test]
fn an_invalid_config_is_rejected_whole_and_the_old_one_keeps_serving() {
    let f = Fixture::start(&config_text(&[(0, "4M")], false));
    let watcher = f.connect(WATCHER, 0);
    // A typo, and a valid LUN addition in the same file: nothing applies.
    let mut bad = config_text(&[(0, "4M"), (1, "4M")], false);
    bad.push_str("blok_size = 512\n");
    f.rewrite(&bad);
    let (code, out, err) = f.cli(&["reload"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("rejected") && err.contains("blok_size"),
        "{err}"
    );
    assert!(f.serve.log().contains("new configuration rejected"));
    // Still LUN 0 only, no unit attention, I/O works.
    assert_eq!(f.rt.block_on(watcher.report_luns()).unwrap(), vec![0]);
    assert!(drain_uas(&f, &watcher, 0).is_empty());
    f.rt.block_on(watcher.write(0, Bytes::from(vec![1u8; 512])))
        .unwrap();
    assert_eq!(f.status()["config_generation"], 0);
    // A change that needs a restart says so and changes nothing either.
    // (A LUN added in the same file is not applied either.)
    f.rewrite(&config_text(&[(0, "4M"), (1, "4M")], false).replace(
        "path = \"lun0.img\"\n",
        "path = \"lun0.img\"\nblock_size = 4096\n",
    ));
    let (code, _, err) = f.cli(&["reload"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("LUN 0: block_size") && err.contains("restart"),
        "{err}"
    );
    assert!(!lun_file_exists(f.serve.data_dir(), 1));
    assert_eq!(f.status()["config_generation"], 0);
}

/// `direct` of a served LUN is fixed, as `read_only` is: changing it needs
/// the LUN removed and added back. A LUN added by a reload with
/// `direct = true` is served uncached.
#[test]
fn direct_is_refused_for_a_served_lun_and_applied_to_an_added_one() {
    let f = Fixture::start(&config_text(&[(0, "4M")], false));
    let pid = f.serve.pid().unwrap();
    let lun0 = f.serve.data_dir().join("lun0.img");
    assert!(!opened_direct(pid, &lun0));
    let direct0 = config_text(&[(0, "4M")], false)
        .replace("path = \"lun0.img\"", "path = \"lun0.img\"\ndirect = true");
    f.rewrite(&direct0);
    let (code, out, err) = f.cli(&["reload"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("LUN 0") && err.contains("direct") && err.contains("remove the LUN"),
        "{err}"
    );
    assert!(!opened_direct(pid, &lun0));
    assert_eq!(f.status()["config_generation"], 0);
    // LUN 1 added uncached; LUN 0 as it was.
    let mut added = config_text(&[(0, "4M")], false);
    added.push_str("\n[[target.lun]]\nid = 1\npath = \"lun1.img\"\nsize = \"4M\"\ndirect = true\n");
    f.rewrite(&added);
    f.reload();
    assert!(opened_direct(pid, &f.serve.data_dir().join("lun1.img")));
    assert!(!opened_direct(pid, &lun0));
    let watcher = f.connect(WATCHER, 1);
    let data = Bytes::from((0..4096u32).map(|i| (i % 247) as u8).collect::<Vec<u8>>());
    f.rt.block_on(watcher.write(8, data.clone())).unwrap();
    assert_eq!(f.rt.block_on(watcher.read(8, 8)).unwrap(), data);
}

fn lun_file_exists(dir: &Path, id: u16) -> bool {
    dir.join(format!("lun{id}.img")).exists()
}

#[test]
fn sighup_reloads_and_aptpl_state_survives_removal() {
    let f = Fixture::start(&config_text(&[(0, "4M"), (1, "4M")], false));
    let watcher = f.connect(WATCHER, 1);
    let aptpl = RegisterOptions {
        aptpl: true,
        ..Default::default()
    };
    f.rt.block_on(watcher.register_and_ignore(0x77, &aptpl))
        .unwrap();
    // LUN 1 goes away, by SIGHUP.
    f.rewrite(&config_text(&[(0, "4M")], false));
    let pid = f.serve.pid().expect("serve runs") as libc::pid_t;
    // SAFETY: signalling the child process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.status()["config_generation"] != 1 {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload\n{}",
            f.serve.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(lun_sizes(&f.status()), vec![(0, 4 << 20)]);
    assert!(f.serve.log().contains("SIGHUP"));
    // Back again: the APTPL registration was kept in the data directory.
    f.rewrite(&config_text(&[(0, "4M"), (1, "4M")], false));
    f.reload();
    let uas = drain_uas(&f, &watcher, 1);
    assert!(!uas.is_empty());
    let keys = f.rt.block_on(watcher.read_keys()).unwrap();
    assert_eq!(keys.keys, vec![0x77], "{keys:?}");
    assert_eq!(f.status()["targets"][0]["luns"][1]["pr"]["aptpl"], true);
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    // A socket file nobody listens on any more (a server that died).
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let config = dir.path().join("kf.toml");
    std::fs::write(&config, config_text(&[(0, "4M")], false)).unwrap();
    let serve = Serve::builder(bin())
        .config(&config)
        .arg("--admin-socket")
        .arg(&sock)
        .start();
    let out = Proc::new(bin())
        .args(["status", "--json", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", serve.log());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second server wanting the same socket fails to start, saying why.
    let other = dir.path().join("other-data");
    let out = keyfence_testkit::cmd::run_bounded(
        Proc::new(bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&other)
            .arg("--admin-socket")
            .arg(&sock),
        None,
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another keyfence serve is listening"), "{err}");
    // The running server's socket still answers.
    let out = Proc::new(bin())
        .args(["status", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    drop(serve);
    // Removed at shutdown.
    assert!(!sock.exists());
}

/// `GET /metrics` from the address `keyfence serve` printed at start.
fn scrape(f: &Fixture) -> String {
    metrics::scrape(f.serve.metrics_addr())
}

/// The value of the per-LU sample `name` of LUN `lun`, if it is exported.
fn lu_sample(text: &str, name: &str, lun: u16) -> Option<f64> {
    let key = format!("{name}{{target=\"{IQN}\",lun=\"{lun}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.parse().unwrap())
}

#[test]
fn luns_added_by_reload_are_scraped_and_removed_ones_are_not() {
    let f = Fixture::start_with(
        &config_text(&[(0, "4M"), (1, "4M")], false),
        &["--metrics", "127.0.0.1:0"],
    );
    let before = scrape(&f);
    promtool_check(&before);
    assert_eq!(lu_sample(&before, "keyfence_lu_reads_total", 0), Some(0.0));
    assert_eq!(lu_sample(&before, "keyfence_lu_reads_total", 1), Some(0.0));
    assert_eq!(lu_sample(&before, "keyfence_lu_reads_total", 2), None);
    let watcher = f.connect(WATCHER, 0);
    f.rt.block_on(watcher.read(0, 1)).unwrap();

    // LUN 1 goes, LUN 2 comes: the next scrape shows LUN 2 and not LUN 1,
    // and LUN 0 (kept) keeps its count.
    f.rewrite(&config_text(&[(0, "4M"), (2, "4M")], false));
    f.reload();
    let after = scrape(&f);
    promtool_check(&after);
    assert_eq!(lu_sample(&after, "keyfence_lu_reads_total", 0), Some(1.0));
    assert_eq!(lu_sample(&after, "keyfence_lu_reads_total", 1), None);
    assert_eq!(lu_sample(&after, "keyfence_lu_reads_total", 2), Some(0.0));
    assert!(lu_sample(&after, "keyfence_lu_unit_attentions_queued_total", 2).is_some());

    // The new LU counts what is done to it.
    let uas = drain_uas(&f, &watcher, 0);
    assert!(uas.contains(&(0x3f, 0x0e)), "{uas:?}");
    // LUN 2's own unit attentions (power on, REPORTED LUNS DATA HAS CHANGED).
    drain_uas(&f, &watcher, 2);
    let mut cdb = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0];
    for _ in 0..3 {
        let r =
            f.rt.block_on(
                watcher
                    .session()
                    .execute(2, &commands::Command::read(cdb.clone(), 4096)),
            )
            .unwrap();
        assert_eq!(r.status, 0, "{r:?}");
    }
    cdb[0] = 0x2a;
    let w = commands::Command::write(cdb, Bytes::from(vec![5u8; 4096]));
    let r = f.rt.block_on(watcher.session().execute(2, &w)).unwrap();
    assert_eq!(r.status, 0, "{r:?}");
    let counted = scrape(&f);
    promtool_check(&counted);
    assert_eq!(lu_sample(&counted, "keyfence_lu_reads_total", 2), Some(3.0));
    assert_eq!(
        lu_sample(&counted, "keyfence_lu_read_bytes_total", 2),
        Some(3.0 * 4096.0)
    );
    assert_eq!(
        lu_sample(&counted, "keyfence_lu_writes_total", 2),
        Some(1.0)
    );
    assert_eq!(
        lu_sample(&counted, "keyfence_lu_read_latency_seconds_count", 2),
        Some(3.0)
    );
    f.rt.block_on(watcher.close()).unwrap();
}

/// `config_text` with the target's portals replaced by `portals`.
fn with_portals(text: &str, portals: &[&str]) -> String {
    let list: Vec<String> = portals.iter().map(|p| format!("\"{p}\"")).collect();
    text.replace(
        "portals = [\"127.0.0.1:0\"]",
        &format!("portals = [{}]", list.join(", ")),
    )
}

fn wait_closed(f: &Fixture, dev: &Device, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dev.session().is_closed() {
        assert!(
            Instant::now() < deadline,
            "{what}: the session is still open\n{}",
            f.serve.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reload_adds_and_removes_a_portal_under_load_on_another() {
    let base = config_text(&[(0, "4M")], false);
    let f = Fixture::start(&base);
    let first = f.serve.portals()[0];
    let steady = Arc::new(f.connect(STEADY, 0));
    assert_eq!(f.rt.block_on(rtpg(&steady)), vec![(1, vec![1])]);
    let load = start_load(&f, steady.clone());
    load.wait_for(200, LOAD_PROGRESS);

    // A second portal (TPGT 2) comes, while the first one carries I/O.
    let added = keyfence_testkit::port::with_free_port("a reloaded portal", |p| {
        let addr = format!("127.0.0.1:{p}");
        f.rewrite(&with_portals(&base, &["127.0.0.1:0", &addr]));
        match f.cli(&["reload"]) {
            (0, said, _) => Ok((addr, said)),
            (_, _, err) => Err(err),
        }
    });
    let (addr, said) = added;
    assert!(
        said.contains(&format!("portal {addr} (TPGT 2) added")),
        "{said}"
    );
    load.wait_for(200, LOAD_PROGRESS);

    // Log in through it: the new target port is everywhere.
    let url = IscsiUrl::parse(&format!("iscsi://{addr}/{IQN}/0")).unwrap();
    let cfg = SessionConfig {
        initiator_name: Some(WATCHER.into()),
        login_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let watcher =
        f.rt.block_on(Device::connect(&url, &cfg))
            .unwrap_or_else(|e| panic!("login through the new portal: {e}\n{}", f.serve.log()));
    f.rt.block_on(watcher.clear_unit_attentions()).unwrap();
    assert_eq!(
        f.rt.block_on(rtpg(&watcher)),
        vec![(1, vec![1]), (2, vec![2])]
    );
    assert_eq!(f.rt.block_on(port_identity(&watcher)), (2, 2));
    // New commands of the session on the first portal see the new set too.
    assert_eq!(
        f.rt.block_on(rtpg(&steady)),
        vec![(1, vec![1]), (2, vec![2])]
    );
    assert_eq!(f.rt.block_on(port_identity(&steady)), (1, 1));
    let durl = IscsiUrl::parse(&format!("iscsi://{first}/{IQN}/0")).unwrap();
    let found =
        f.rt.block_on(keyfence_initiator::login::discover(&durl, &cfg))
            .unwrap();
    let mut portals: Vec<(String, u16, Option<u16>)> = found
        .iter()
        .find(|t| t.name == IQN)
        .expect("SendTargets lists the target")
        .portals
        .clone();
    portals.sort_by_key(|p| p.2);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(
        portals,
        vec![
            ("127.0.0.1".to_string(), first.port(), Some(1)),
            ("127.0.0.1".to_string(), port, Some(2))
        ]
    );

    // Moving the new portal to the first position would change its TPGT:
    // refused, nothing changes.
    f.rewrite(&with_portals(&base, &[&addr, "127.0.0.1:0"]));
    let (code, _, err) = f.cli(&["reload"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("portal {addr} would change from TPGT 2 to TPGT 1")),
        "{err}"
    );
    assert!(!watcher.session().is_closed());

    // Remove it again: its session ends, the other one keeps going.
    f.rewrite(&base);
    let said = f.reload();
    assert!(
        said.contains(&format!("portal {addr} (TPGT 2) removed")),
        "{said}"
    );
    wait_closed(&f, &watcher, "session through the removed portal");
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "{addr} still accepts connections"
    );
    load.wait_for(200, LOAD_PROGRESS);
    assert_eq!(f.rt.block_on(rtpg(&steady)), vec![(1, vec![1])]);
    let (done, failed, errors) = load.finish(&f.rt);
    eprintln!(
        "session on the other portal: {done} commands during two portal reloads, {failed} failed"
    );
    assert!(done >= 600, "only {done} commands ran");
    assert_eq!(
        failed, 0,
        "commands of the unaffected session failed: {errors:?}"
    );
    assert!(drain_uas(&f, &steady, 0).is_empty());
    assert_eq!(f.status()["config_generation"], 2);

    // The same address can be added back (the socket was closed).
    f.rewrite(&with_portals(&base, &["127.0.0.1:0", &addr]));
    let said = f.reload();
    assert!(said.contains("added"), "{said}");
    let again = f.rt.block_on(Device::connect(&url, &cfg)).unwrap();
    f.rt.block_on(again.close()).unwrap();
}

#[test]
fn a_busy_portal_address_rejects_the_whole_reload() {
    let base = config_text(&[(0, "4M")], false);
    let f = Fixture::start(&base);
    let watcher = f.connect(WATCHER, 0);
    // Someone else holds the address; the same reload also adds a LUN.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let text = with_portals(
        &config_text(&[(0, "4M"), (1, "4M")], false),
        &["127.0.0.1:0", &addr],
    );
    f.rewrite(&text);
    let (code, out, err) = f.cli(&["reload"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("rejected") && err.contains(&format!("cannot listen on {addr}")),
        "{err}"
    );
    // Nothing of it applied.
    assert!(!lun_file_exists(f.serve.data_dir(), 1));
    let s = f.status();
    assert_eq!(s["config_generation"], 0);
    assert_eq!(
        s["targets"][0]["portals"].as_array().unwrap().len(),
        1,
        "{s}"
    );
    assert_eq!(f.rt.block_on(watcher.report_luns()).unwrap(), vec![0]);
    assert!(drain_uas(&f, &watcher, 0).is_empty());
    // Once the address is free the same file applies.
    drop(busy);
    let said = f.reload();
    assert!(
        said.contains("LUN 1 added") && said.contains("(TPGT 2) added"),
        "{said}"
    );
}

/// A raw TCP connection to the portal that sends nothing: it holds a
/// login slot (if admitted) until the first-PDU timeout.
fn hold(f: &Fixture) -> std::net::TcpStream {
    std::net::TcpStream::connect(f.serve.portals()[0]).unwrap()
}

/// Is `s` still open after `wait` (the server neither closed nor reset
/// it)?
fn still_open(s: &mut std::net::TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    // Data or end of file: the server answered or closed it.
    match s.peek(&mut [0u8; 1]) {
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Wait (bounded) until the server closed `s`; how long that took.
fn closed_within(s: &mut std::net::TcpStream, limit: Duration) -> Option<Duration> {
    use std::io::Read;
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    match s.read(&mut [0u8; 1]) {
        Ok(0) => Some(start.elapsed()),
        Err(e)
            if !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Some(start.elapsed())
        }
        _ => None,
    }
}

fn try_login(f: &Fixture, initiator: &str) -> Result<Device, String> {
    let url = IscsiUrl::parse(&format!("iscsi://{}/{IQN}/0", f.serve.portals()[0])).unwrap();
    let cfg = SessionConfig {
        initiator_name: Some(initiator.into()),
        login_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    f.rt.block_on(Device::connect(&url, &cfg))
        .map_err(|e| e.to_string())
}

fn with_limits(per_source: u32, first_pdu_secs: u32) -> String {
    format!(
        "[limits]\nmax_login_connections_per_source = {per_source}\nfirst_pdu_timeout_secs = {first_pdu_secs}\n\n{}",
        config_text(&[(0, "4M")], false)
    )
}

#[test]
fn admission_limits_change_on_reload_without_dropping_anyone() {
    const N: u32 = 2;
    let f = Fixture::start(&with_limits(N, 60));
    let steady = Arc::new(f.connect(STEADY, 0));
    let load = start_load(&f, steady.clone());
    load.wait_for(100, LOAD_PROGRESS);

    // N connections logging in (silent) from 127.0.0.1 take its share.
    let mut held: Vec<_> = (0..N).map(|_| hold(&f)).collect();
    for s in &mut held {
        assert!(
            still_open(s, Duration::from_millis(500)),
            "held connection closed"
        );
    }
    let mut over = hold(&f);
    assert!(
        closed_within(&mut over, Duration::from_secs(10)).is_some(),
        "connection N+1 from one source was admitted"
    );
    assert!(try_login(&f, WATCHER).is_err(), "login N+1 admitted");

    // Raised to N+2: a new connection from the same source is admitted
    // and logs in, while the N still hold their slots.
    f.rewrite(&with_limits(N + 2, 60));
    let said = f.reload();
    assert!(said.contains("limits changed"), "{said}");
    let watcher = try_login(&f, WATCHER)
        .unwrap_or_else(|e| panic!("login after raising the limit: {e}\n{}", f.serve.log()));
    f.rt.block_on(watcher.clear_unit_attentions()).unwrap();
    held.push(hold(&f));
    for s in &mut held {
        assert!(
            still_open(s, Duration::from_millis(300)),
            "held connection closed"
        );
    }
    assert_eq!(held.len() as u32, N + 1);

    // Lowered to 1 (below the N+1 logging in) with a 1 s first-PDU
    // timeout: nobody is dropped — the connections logging in keep their
    // slot and the 60 s they were given, the sessions keep working — and
    // new connections are refused.
    f.rewrite(&with_limits(1, 1));
    f.reload();
    let mut refused = hold(&f);
    assert!(
        closed_within(&mut refused, Duration::from_secs(10)).is_some(),
        "a connection was admitted over the lowered limit"
    );
    assert!(
        try_login(&f, DOOMED).is_err(),
        "login over the lowered limit"
    );
    std::thread::sleep(Duration::from_secs(2));
    for s in &mut held {
        assert!(
            still_open(s, Duration::from_millis(300)),
            "a connection already logging in was dropped by the reload"
        );
    }
    f.rt.block_on(watcher.read(0, 1))
        .expect("the session logged in under the raised limit works");
    load.wait_for(200, LOAD_PROGRESS);

    // Once the count is below the new limit, a connection is admitted
    // again, under the new 1 s first-PDU timeout.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let took = loop {
        let mut s = hold(&f);
        let start = Instant::now();
        match closed_within(&mut s, Duration::from_secs(10)) {
            Some(t) if start.elapsed() >= Duration::from_millis(500) => break t,
            // Refused at once: the held slots are not given back yet.
            _ => {
                assert!(Instant::now() < deadline, "never admitted again");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(
        took < Duration::from_secs(5),
        "first-PDU timeout took {took:?}"
    );

    let (done, failed, errors) = load.finish(&f.rt);
    eprintln!("established session: {done} commands during three limit reloads, {failed} failed");
    assert_eq!(
        failed, 0,
        "commands of the established session failed: {errors:?}"
    );
    assert!(drain_uas(&f, &steady, 0).is_empty());
    assert_eq!(f.status()["limits"]["max_login_connections_per_source"], 1);
    f.rt.block_on(watcher.close()).unwrap();
}

fn metrics_in_status(f: &Fixture) -> Option<String> {
    f.status()["metrics"].as_str().map(str::to_string)
}

fn with_metrics(addr: Option<&str>) -> String {
    let base = config_text(&[(0, "4M")], false);
    match addr {
        Some(a) => format!("metrics = \"{a}\"\n\n{base}"),
        None => base,
    }
}

/// Nothing accepts connections on `addr` any more (bounded wait: the old
/// endpoint's thread closes its socket promptly).
fn wait_refused(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_metrics_endpoint_moves_stops_and_starts_on_reload() {
    let f = Fixture::start(&with_metrics(Some("127.0.0.1:0")));
    let first = metrics_in_status(&f).expect("status names the metrics endpoint");
    let watcher = f.connect(WATCHER, 0);
    f.rt.block_on(watcher.read(0, 1)).unwrap();
    assert_eq!(
        lu_sample(&metrics::scrape(&first), "keyfence_lu_reads_total", 0),
        Some(1.0)
    );

    // A busy address rejects the whole reload; the old endpoint stays.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    f.rewrite(&with_metrics(Some(&busy_addr)));
    let (code, _, err) = f.cli(&["reload"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("cannot listen for metrics on {busy_addr}")),
        "{err}"
    );
    assert_eq!(metrics_in_status(&f).as_deref(), Some(first.as_str()));
    metrics::scrape(&first);
    drop(busy);

    // Moved: the new address serves (the counters carry on), the old
    // one is closed.
    let (moved, said) = keyfence_testkit::port::with_free_port("a reloaded metrics address", |p| {
        let addr = format!("127.0.0.1:{p}");
        f.rewrite(&with_metrics(Some(&addr)));
        match f.cli(&["reload"]) {
            (0, said, _) => Ok((addr, said)),
            (_, _, err) => Err(err),
        }
    });
    assert!(
        said.contains(&format!("metrics endpoint on {moved}")),
        "{said}"
    );
    assert_eq!(metrics_in_status(&f).as_deref(), Some(moved.as_str()));
    let text = metrics::scrape(&moved);
    promtool_check(&text);
    assert_eq!(lu_sample(&text, "keyfence_lu_reads_total", 0), Some(1.0));
    wait_refused(&first);

    // Removed: nothing listens, status says none.
    f.rewrite(&with_metrics(None));
    let said = f.reload();
    assert!(said.contains("metrics endpoint removed"), "{said}");
    wait_refused(&moved);
    assert_eq!(metrics_in_status(&f), None);

    // Back: the per-LU families are counted again from now on.
    f.rewrite(&with_metrics(Some("127.0.0.1:0")));
    f.reload();
    let back = metrics_in_status(&f).expect("metrics endpoint back");
    assert_eq!(
        lu_sample(&metrics::scrape(&back), "keyfence_lu_reads_total", 0),
        Some(0.0)
    );
    f.rt.block_on(watcher.read(0, 1)).unwrap();
    f.rt.block_on(watcher.read(0, 1)).unwrap();
    assert_eq!(
        lu_sample(&metrics::scrape(&back), "keyfence_lu_reads_total", 0),
        Some(2.0)
    );
    assert!(drain_uas(&f, &watcher, 0).is_empty());
    f.rt.block_on(watcher.close()).unwrap();
}
