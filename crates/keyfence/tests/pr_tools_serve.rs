//! The PR tools against `keyfence serve` with two portals (two target
//! ports, relative target port identifiers 1 and 2): sg_persist actions
//! across invocations (same initiator port every time), READ FULL STATUS
//! and REGISTER AND MOVE, takeover after a "crash", and the multipath
//! behaviour of mpathpersist: registration on both target ports, rollback
//! on a partial conflict, RELEASE with a dead holder path, --reregister.

mod pr_tools_support;

use std::path::Path;
use std::process::Command;

use keyfence_initiator::Isid;
use pr_tools_support::{check, kf_as as kf, ok, silent, text};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:serve-test";
const INIT_A: &str = "iqn.2026-11.io.keyfence.test:node-a";
const INIT_B: &str = "iqn.2026-11.io.keyfence.test:node-b";

/// `keyfence serve` with two portals (from the workspace test kit).
struct Serve(keyfence_testkit::Serve);

impl Serve {
    fn start() -> Serve {
        Serve(
            keyfence_testkit::Serve::builder(KF)
                .portals(2)
                .target_name(IQN)
                .size("16M")
                .log_level("error")
                .start(),
        )
    }

    fn url(&self, path: usize) -> String {
        self.0.url(path)
    }

    /// The initiator port keyfence derives for `name` on portal `path`.
    fn port_of(&self, name: &str, path: usize) -> String {
        let isid = Isid::derive(name, &self.0.portals()[path].to_string(), IQN);
        format!("{name},i,0x{:012x}", isid.value())
    }
}

/// `persist -n -o -G -S KEY` (REGISTER) as `init` succeeds silently.
fn register(init: &str, key: &str, d: &str) {
    silent(&kf(init, &["persist", "-n", "-o", "-G", "-S", key, d]));
}

/// `persist -n -o -R -T TYPE -K KEY` (RESERVE) as `init` succeeds
/// silently.
fn reserve(init: &str, prtype: &str, key: &str, d: &str) {
    silent(&kf(
        init,
        &["persist", "-n", "-o", "-R", "-T", prtype, "-K", key, d],
    ));
}

#[test]
fn sg_persist_full_cycle_on_keyfence() {
    let s = Serve::start();
    let d = s.url(0);
    register(INIT_A, "0xa1", &d);
    register(INIT_B, "0xb2", &d);
    // Same initiator port in a new invocation: the registration is ours.
    reserve(INIT_A, "5", "0xa1", &d);
    check(
        &kf(INIT_B, &["persist", "-n", "-i", "-r", &d]),
        0,
        "  PR generation=0x2, Reservation follows:\n    Key=0xa1\n    scope: LU_SCOPE,  type: Write Exclusive, registrants only\n",
        "",
    );
    let expect = format!(
        concat!(
            "  PR generation=0x2\n",
            "    Key=0xa1\n",
            "      All target ports bit clear\n",
            "      Relative port address: 0x1\n",
            "      << Reservation holder >>\n",
            "      scope: LU_SCOPE,  type: Write Exclusive, registrants only\n",
            "      Transport Id of initiator:\n",
            "        iSCSI world wide unique port id: {}\n",
            "    Key=0xb2\n",
            "      All target ports bit clear\n",
            "      Relative port address: 0x1\n",
            "      not reservation holder\n",
            "      Transport Id of initiator:\n",
            "        iSCSI world wide unique port id: {}\n",
        ),
        s.port_of(INIT_A, 0),
        s.port_of(INIT_B, 0)
    );
    check(&kf(INIT_B, &["persist", "-n", "-s", &d]), 0, &expect, "");
    // B may not reserve; A's key is not B's to release.
    check(
        &kf(
            INIT_B,
            &["persist", "-n", "-o", "-R", "-T", "5", "-K", "0xb2", &d],
        ),
        24,
        "",
        "PR out (Reserve): Reservation conflict\nkeyfence persist failed: Reservation conflict\n",
    );
    // fence_scsi's fencing step: B preempts and aborts A.
    silent(&kf(
        INIT_B,
        &[
            "persist", "-n", "-o", "-A", "-T", "5", "-K", "0xb2", "-S", "0xa1", "-d", &d,
        ],
    ));
    check(
        &kf(INIT_A, &["persist", "-n", "-k", &d]),
        0,
        "  PR generation=0x3, 1 registered reservation key follows:\n    0xb2\n",
        "",
    );
    // A is fenced: anything it tries conflicts.
    check(
        &kf(
            INIT_A,
            &["persist", "-n", "-o", "-R", "-T", "5", "-K", "0xa1", &d],
        ),
        24,
        "",
        "PR out (Reserve): Reservation conflict\nkeyfence persist failed: Reservation conflict\n",
    );
    // B moves its reservation to A's initiator port on target port 2.
    silent(&kf(
        INIT_B,
        &[
            "persist",
            "-n",
            "-o",
            "-M",
            "-K",
            "0xb2",
            "-S",
            "0xc3",
            "-T",
            "5",
            "-Q",
            "2",
            "-X",
            &s.port_of(INIT_A, 1),
            &d,
        ],
    ));
    check(
        &kf(INIT_A, &["persist", "-n", "-r", &s.url(1)]),
        0,
        "  PR generation=0x4, Reservation follows:\n    Key=0xc3\n    scope: LU_SCOPE,  type: Write Exclusive, registrants only\n",
        "",
    );
    silent(&kf(
        INIT_A,
        &[
            "persist",
            "-n",
            "-o",
            "-L",
            "-T",
            "5",
            "-K",
            "0xc3",
            &s.url(1),
        ],
    ));
    silent(&kf(
        INIT_A,
        &["persist", "-n", "-o", "-C", "-K", "0xc3", &s.url(1)],
    ));
    check(
        &kf(INIT_A, &["persist", "-n", "-i", "-k", &d]),
        0,
        "  PR generation=0x5, there are NO registered reservation keys\n",
        "",
    );
}

#[test]
fn takeover_after_a_crash() {
    let s = Serve::start();
    let d = s.url(0);
    register(INIT_A, "0xa1", &d);
    reserve(INIT_A, "6", "0xa1", &d);
    register(INIT_B, "0xb2", &d);
    // A "reboots" and comes back as ISID 0x800000000042.
    let out = ok(&kf(
        INIT_A,
        &["takeover", "--isid", "800000000042", "-K", "0xa2", &d],
    ));
    let new_port = format!("{INIT_A},i,0x800000000042");
    assert!(
        out.starts_with(&format!("takeover of {d} as new I_T nexus {new_port}\n")),
        "{out}"
    );
    assert!(out.contains(&format!(
        "    key 0xa1  {}  relative target port 1  (holder)\n",
        s.port_of(INIT_A, 0)
    )));
    assert!(out.contains("  registered the new nexus with key 0xa2\n"));
    assert!(out.contains(
        "  preempted and aborted key 0xa1 (1 old registration(s), reservation taken as Exclusive Access, registrants only)\n"
    ));
    let after = &out[out.find("  after:\n").expect("after section")..];
    assert_eq!(
        after,
        format!(
            "  after:\n    reservation: Exclusive Access, registrants only held with key 0xa2\n    key 0xb2  {}  relative target port 1\n    key 0xa2  {new_port}  relative target port 1  (holder)\n",
            s.port_of(INIT_B, 0)
        )
    );
    // Nothing left to take over.
    let out = ok(&kf(
        "iqn.2026-11.io.keyfence.test:node-c",
        &["takeover", &d],
    ));
    assert!(out.contains(
        "  no registration of this initiator under another ISID: nothing to take over\n"
    ));
    let o = kf(INIT_A, &["takeover", "-T", "2", &d]);
    assert_eq!(o.status.code(), Some(1));
}

fn config(dir: &Path, s: &Serve, dead: u16) -> String {
    let p = dir.join("keyfence.toml");
    std::fs::write(
        &p,
        format!(
            concat!(
                "[[multipath]]\nname = \"mpatha\"\nreservation_key = \"0x1234\"\n",
                "paths = [\"{a}\", \"{b}\"]\n",
                "[[multipath]]\nname = \"halfdead\"\nreservation_key = \"0x1234\"\n",
                "paths = [\"iscsi://127.0.0.1:{dead}/{iqn}/0\", \"{b}\"]\n",
            ),
            a = s.url(0),
            b = s.url(1),
            dead = dead,
            iqn = IQN
        ),
    )
    .expect("config");
    p.to_str().expect("utf-8").to_string()
}

fn full_status_regs(init: &str, cfg: &str) -> Vec<(String, String, String)> {
    // (key, relative port line, port) triples from mpathpersist -i -s.
    let out = ok(&kf(
        init,
        &["mpathpersist", "--config", cfg, "-i", "-s", "mpatha"],
    ));
    let lines: Vec<&str> = out.lines().collect();
    let mut regs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some(k) = lines[i].strip_prefix("   Key = ") {
            let rp = lines
                .get(i + 2)
                .map(|l| l.trim().to_string())
                .unwrap_or_default();
            let port = lines[i..]
                .iter()
                .find_map(|l| l.strip_prefix("   iSCSI world wide unique port id: "))
                .unwrap_or("")
                .to_string();
            regs.push((k.to_string(), rp, port));
        }
        i += 1;
    }
    regs.sort();
    regs
}

#[test]
fn mpathpersist_two_paths() {
    let s = Serve::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = keyfence_testkit::port::ClosedPort::new();
    let cfg = config(dir.path(), &s, dead.port());
    let m = |args: &[&str]| {
        let mut a = vec!["mpathpersist", "--config", cfg.as_str()];
        a.extend_from_slice(args);
        kf(INIT_A, &a)
    };
    // Registration lands on both target ports, one nexus each.
    check(
        &m(&[
            "-o",
            "--register",
            "--param-sark=1234",
            "-d",
            "/dev/mapper/mpatha",
        ]),
        0,
        "",
        "",
    );
    let a0 = s.port_of(INIT_A, 0);
    let a1 = s.port_of(INIT_A, 1);
    assert_eq!(
        full_status_regs(INIT_A, &cfg),
        vec![
            (
                "0x1234".into(),
                "Relative port address: 0x1".into(),
                a0.clone()
            ),
            (
                "0x1234".into(),
                "Relative port address: 0x2".into(),
                a1.clone()
            ),
        ]
    );
    check(
        &m(&["-i", "-k", "mpatha"]),
        0,
        "  PR generation=0x2, \t2 registered reservation keys follow:\n    0x1234\n    0x1234\n",
        "",
    );
    // Reserve goes down the first path; the holder is path 0's nexus.
    check(
        &m(&[
            "-o",
            "--reserve",
            "--prout-type=5",
            "--param-rk=1234",
            "mpatha",
        ]),
        0,
        "",
        "",
    );
    check(
        &m(&["-i", "-r", "mpatha"]),
        0,
        "  PR generation=0x2, Reservation follows:\n   Key = 0x1234\n  scope = LU_SCOPE, type = Write Exclusive, registrants only\n",
        "",
    );
    // Path 0 dies; RELEASE through what is left must still free the LU.
    let o = m(&[
        "-v",
        "2",
        "-o",
        "--release",
        "--prout-type=5",
        "--param-rk=1234",
        "halfdead",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    assert!(
        e.contains("halfdead: reservation with key 0x1234 still held after RELEASE on all paths"),
        "{e}"
    );
    assert!(e.contains("cannot restore 1 registration(s) with key 0x1234 on relative target port 1: no live path there"), "{e}");
    check(
        &m(&["-i", "-r", "mpatha"]),
        0,
        "  PR generation=0x4, there is NO reservation held \n",
        "",
    );
    assert_eq!(
        full_status_regs(INIT_A, &cfg),
        vec![(
            "0x1234".into(),
            "Relative port address: 0x2".into(),
            a1.clone()
        )]
    );
    // Path 0 is back: --reregister gives it its registration again.
    check(
        &m(&["--reregister", "mpatha"]),
        0,
        "mpatha: 1 path(s) re-registered with key 0x1234\n",
        "",
    );
    assert_eq!(full_status_regs(INIT_A, &cfg).len(), 2);
    check(
        &m(&["--reregister", "mpatha"]),
        0,
        "mpatha: 0 path(s) re-registered with key 0x1234\n",
        "",
    );
}

#[test]
fn mpathpersist_rolls_back_a_partial_registration() {
    let s = Serve::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = keyfence_testkit::port::ClosedPort::new();
    let cfg = config(dir.path(), &s, dead.port());
    // Path 0's initiator port is already registered with another key, so
    // REGISTER with key 0 conflicts there and succeeds on path 1 only.
    silent(&kf(
        INIT_A,
        &["persist", "-n", "-o", "-G", "-S", "0x999", &s.url(0)],
    ));
    let o = kf(
        INIT_A,
        &[
            "mpathpersist",
            "--config",
            &cfg,
            "-v",
            "2",
            "-o",
            "-G",
            "-S",
            "0x1234",
            "mpatha",
        ],
    );
    assert_eq!(o.status.code(), Some(11));
    assert_eq!(
        text(&o.stdout),
        "persistent reserve out: scsi status: Reservation Conflict\nPR out: command failed\n"
    );
    assert!(text(&o.stderr).contains(&format!(
        "mpatha: rolling back registration on path {} (to key 0x0)\n",
        s.url(1)
    )));
    // Only the pre-existing registration is left.
    assert_eq!(
        full_status_regs(INIT_A, &cfg),
        vec![(
            "0x999".into(),
            "Relative port address: 0x1".into(),
            s.port_of(INIT_A, 0)
        )]
    );
}

#[test]
fn mpathpersist_on_a_url_uses_every_portal() {
    let s = Serve::start();
    // No map: the URL's target portals (SendTargets) become the paths.
    let d = s.url(0);
    silent(&kf(
        INIT_B,
        &["mpathpersist", "-o", "-G", "-S", "0x55", "-d", &d],
    ));
    let out = ok(&kf(INIT_B, &["persist", "-n", "-s", &d]));
    assert!(out.contains("      Relative port address: 0x1\n"), "{out}");
    assert!(out.contains("      Relative port address: 0x2\n"), "{out}");
    assert!(out.contains(&s.port_of(INIT_B, 0)), "{out}");
    assert!(out.contains(&s.port_of(INIT_B, 1)), "{out}");
    check(
        &kf(INIT_B, &["mpathpersist", "-i", "-k", &d]),
        0,
        "  PR generation=0x2, \t2 registered reservation keys follow:\n    0x55\n    0x55\n",
        "",
    );
}

/// The URL of a LUN the target does not have (LUN 7 next to LUN 0).
fn missing_lun(s: &Serve) -> String {
    let d = s.url(0);
    format!("{}7", d.strip_suffix('0').expect("a LUN 0 URL"))
}

#[test]
fn persist_reports_a_missing_lun_as_logical_unit_not_supported() {
    let s = Serve::start();
    let m = missing_lun(&s);
    // Like a device node that does not exist, with sg3_utils' text for
    // ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED, never "bad field in cdb".
    check(
        &kf(INIT_A, &["persist", "-n", "-k", &m]),
        15,
        "",
        &format!("keyfence persist: error opening file {m} (rw): Logical unit not supported\n"),
    );
    check(
        &kf(INIT_A, &["persist", "-n", "-o", "-G", "-S", "0xa1", &m]),
        15,
        "",
        &format!("keyfence persist: error opening file {m} (rw): Logical unit not supported\n"),
    );
    // With INQUIRY (peripheral qualifier 011b): nothing on stdout.
    check(
        &kf(INIT_A, &["persist", "-k", &m]),
        15,
        "",
        &format!("keyfence persist: error opening file (ro): {m}: Logical unit not supported\n"),
    );
}

#[test]
fn persist_messages_carry_the_name_it_was_run_as() {
    let s = Serve::start();
    let m = missing_lun(&s);
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("sg_persist");
    std::os::unix::fs::symlink(KF, &link).expect("symlink");
    let o = keyfence_testkit::run(
        Command::new(&link)
            .args(["-n", "-k", &m])
            .env("KEYFENCE_INITIATOR_NAME", INIT_A),
    );
    check(
        &o,
        15,
        "",
        &format!("sg_persist: error opening file {m} (rw): Logical unit not supported\n"),
    );
    let o = kf(INIT_A, &["persist", "--bogus"]);
    assert!(
        text(&o.stderr).starts_with("keyfence persist: "),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn takeover_keeps_its_key_when_another_node_holds_the_reservation() {
    let s = Serve::start();
    let d = s.url(0);
    for (init, args) in [
        (INIT_B, vec!["persist", "-n", "-o", "-G", "-S", "0xb2", &d]),
        (
            INIT_B,
            vec!["persist", "-n", "-o", "-R", "-T", "5", "-K", "0xb2", &d],
        ),
        (INIT_A, vec!["persist", "-n", "-o", "-G", "-S", "0xa1", &d]),
    ] {
        check(&kf(init, &args), 0, "", "");
    }
    // A comes back as a new nexus and takes over with its old key (the
    // default). PREEMPT AND ABORT of a key that is not the holder removes
    // every nexus registered with it, so the new nexus must not hold that
    // key while it preempts, and must hold it afterwards.
    let out = ok(&kf(INIT_A, &["takeover", "--isid", "800000000043", &d]));
    let new_port = format!("{INIT_A},i,0x800000000043");
    let after = &out[out.find("  after:\n").expect("after section")..];
    assert!(
        after.contains(&format!(
            "    key 0xa1  {new_port}  relative target port 1\n"
        )),
        "{out}"
    );
    assert!(!after.contains(&s.port_of(INIT_A, 0)), "{out}");
    assert!(
        after.contains("    reservation: Write Exclusive, registrants only held with key 0xb2\n"),
        "{out}"
    );
    // The device agrees: B's key and A's, once each.
    let keys = ok(&kf(INIT_B, &["persist", "-n", "-k", &d]));
    assert!(
        keys.contains("2 registered reservation keys follow:\n"),
        "{keys}"
    );
    assert!(
        keys.contains("    0xb2\n") && keys.contains("    0xa1\n"),
        "{keys}"
    );
}

#[test]
fn takeover_dry_run_changes_nothing() {
    let s = Serve::start();
    let d = s.url(0);
    register(INIT_A, "0xa1", &d);
    reserve(INIT_A, "5", "0xa1", &d);
    let before = ok(&kf(INIT_B, &["persist", "-n", "-s", &d]));
    let out = ok(&kf(
        INIT_A,
        &["takeover", "-n", "--isid", "800000000044", &d],
    ));
    assert!(
        out.contains("  dry run: would register the new nexus"),
        "{out}"
    );
    assert!(out.contains("nothing was changed\n"), "{out}");
    assert_eq!(ok(&kf(INIT_B, &["persist", "-n", "-s", &d])), before);
}

#[test]
fn install_links_creates_links_and_refuses_foreign_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    let o = kf(
        INIT_A,
        &["install-links", bin.to_str().expect("utf-8 path")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let exe = std::fs::canonicalize(KF).expect("binary");
    for name in ["sg_persist", "mpathpersist", "fence_keyfence"] {
        assert_eq!(std::fs::read_link(bin.join(name)).expect("link"), exe);
    }
    // The links work: run as sg_persist it is sg_persist.
    let o = keyfence_testkit::run(Command::new(bin.join("sg_persist")).arg("-V"));
    assert!(
        text(&o.stderr).starts_with("version: 0.67"),
        "{}",
        text(&o.stderr)
    );
    // A file that is not a keyfence link is never overwritten.
    std::fs::remove_file(bin.join("mpathpersist")).expect("rm");
    std::fs::write(bin.join("mpathpersist"), "#!/bin/sh\n").expect("write");
    let o = kf(
        INIT_A,
        &["install-links", bin.to_str().expect("utf-8 path")],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("mpathpersist exists and is not a link to keyfence"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(bin.join("mpathpersist")).expect("read"),
        "#!/bin/sh\n"
    );
}
