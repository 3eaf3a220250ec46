//! `keyfence persist` (sg_persist), `keyfence mpathpersist` and
//! `keyfence takeover` run as processes against a real Debian tgtd on
//! loopback. Each test starts its own tgtd from the workspace test kit
//! (own control port, own portal, file-backed LUN in a temporary
//! directory), which tears it down.
//!
//! tgtd ties registrations to the session, not to the initiator port, so
//! every tool invocation (a new session) is a new, unregistered I_T nexus
//! to it: PR OUT commands that need a registration conflict, which is how
//! the RESERVATION CONFLICT exit statuses are exercised here.

mod pr_tools_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keyfence_testkit::{Tgtd, TgtdOptions};
use pr_tools_support::{check, kf_as, silent, text};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:tgtd-test";
const INITIATOR: &str = "iqn.2026-11.io.keyfence.test:cli";
const HEADER: &str = "  IET       VIRTUAL-DISK      0001\n  Peripheral device type: disk\n";

/// tgtd exporting LUN 1 (16 MiB) of `IQN`, from the workspace test kit.
fn tgtd() -> Tgtd {
    Tgtd::start(TgtdOptions {
        iqn: IQN.into(),
        size: 16 << 20,
        ..TgtdOptions::default()
    })
}

/// `keyfence ARGS` as `INITIATOR`.
fn kf(args: &[&str]) -> Output {
    kf_as(INITIATOR, args)
}

#[test]
fn sg_persist_register_read_keys_and_reservation() {
    let t = tgtd();
    let d = t.url();
    check(
        &kf(&["persist", "-i", "-k", "-d", &d]),
        0,
        &format!("{HEADER}  PR generation=0x0, there are NO registered reservation keys\n"),
        "",
    );
    silent(&kf(&[
        "persist", "-n", "-o", "-G", "-S", "0x123abc", "-d", &d,
    ]));
    check(
        &kf(&["persist", "-n", "-i", "-k", "-d", &d]),
        0,
        "  PR generation=0x1, 1 registered reservation key follows:\n    0x123abc\n",
        "",
    );
    // A new invocation is a new nexus to tgtd: REGISTER AND IGNORE adds one.
    silent(&kf(&[
        "persist",
        "-n",
        "--out",
        "--register-ignore",
        "--param-sark=beef",
        &d,
    ]));
    check(
        &kf(&["persist", "-n", "-i", "-k", &d]),
        0,
        "  PR generation=0x2, 2 registered reservation keys follow:\n    0x123abc\n    0xbeef\n",
        "",
    );
    check(
        &kf(&["persist", "-r", &d]),
        0,
        &format!("{HEADER}  PR generation=0x2, there is NO reservation held\n"),
        "",
    );
    check(
        &kf(&["persist", "-n", "-H", "-k", &d]),
        0,
        "  PR generation=0x2, Additional length=16\n 00     00 00 00 00 00 12 3a bc  00 00 00 00 00 00 be ef\n",
        "",
    );
}

#[test]
fn sg_persist_conflicts_exit_24() {
    let t = tgtd();
    let d = t.url();
    silent(&kf(&["persist", "-n", "-o", "-G", "-S", "1", &d]));
    // This invocation's nexus is not registered.
    check(
        &kf(&["persist", "-n", "-o", "-R", "-T", "5", "-K", "1", "-d", &d]),
        24,
        "",
        "PR out (Reserve): Reservation conflict\nkeyfence persist failed: Reservation conflict\n",
    );
    check(
        &kf(&[
            "persist", "-n", "-o", "-P", "-T", "5", "-K", "2", "-S", "1", "-d", &d,
        ]),
        24,
        "",
        "PR out (Preempt): Reservation conflict\nkeyfence persist failed: Reservation conflict\n",
    );
    // tgtd does not implement PREEMPT AND ABORT: ILLEGAL REQUEST, status 5.
    check(
        &kf(&["persist", "-n", "-o", "-A", "-T", "5", "-K", "2", "-S", "1", "-d", &d]),
        5,
        "",
        "PR out (Preempt and abort): bad field in cdb or parameter list (perhaps unsupported service action)\nkeyfence persist failed: Illegal request\n",
    );
    check(
        &kf(&["persist", "-n", "-o", "-C", "-K", "7", &d]),
        24,
        "",
        "PR out (Clear): Reservation conflict\nkeyfence persist failed: Reservation conflict\n",
    );
    // REGISTER with a wrong current key from an unregistered nexus.
    check(
        &kf(&["persist", "-n", "-o", "-G", "-K", "5", "-S", "6", &d]),
        24,
        "",
        "PR out (Register): Reservation conflict\nkeyfence persist failed: Reservation conflict\n",
    );
}

#[test]
fn sg_persist_capabilities_and_unsupported_full_status() {
    let t = tgtd();
    let d = t.url();
    check(
        &kf(&["persist", "-n", "-c", &d]),
        0,
        concat!(
            "Report capabilities response:\n",
            "  Replace Lost Reservation Capable(RLR_C): 0\n",
            "  Compatible Reservation Handling(CRH): 0\n",
            "  Specify Initiator Ports Capable(SIP_C): 0\n",
            "  All Target Ports Capable(ATP_C): 0\n",
            "  Persist Through Power Loss Capable(PTPL_C): 0\n",
            "  Type Mask Valid(TMV): 1\n",
            "  Allow Commands: 0\n",
            "  Persist Through Power Loss Active(PTPL_A): 0\n",
            "    Support indicated in Type mask:\n",
            "      Write Exclusive, all registrants: 1\n",
            "      Exclusive Access, registrants only: 1\n",
            "      Write Exclusive, registrants only: 1\n",
            "      Exclusive Access: 1\n",
            "      Write Exclusive: 1\n",
            "      Exclusive Access, all registrants: 1\n"
        ),
        "",
    );
    // tgtd does not implement READ FULL STATUS.
    check(
        &kf(&["persist", "-n", "-s", &d]),
        5,
        "",
        "PR in (Read full status): bad field in cdb or parameter list (perhaps unsupported service action)\nkeyfence persist failed: Illegal request\n",
    );
}

#[test]
fn sg_persist_argv0_dispatch_and_no_service_action_notice() {
    let t = tgtd();
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("sg_persist");
    std::os::unix::fs::symlink(KF, &link).expect("symlink");
    let o = keyfence_testkit::run(
        Command::new(&link)
            .args(["-n", &t.url()])
            .env("KEYFENCE_INITIATOR_NAME", INITIATOR),
    );
    check(
        &o,
        0,
        "  PR generation=0x0, there are NO registered reservation keys\n",
        ">> No service action given; assume Persistent Reserve In command\n>> with Read Keys service action\n",
    );
}

#[test]
fn sg_persist_unreachable_device_and_bad_urls() {
    let closed = keyfence_testkit::port::ClosedPort::new();
    let d = format!("iscsi://127.0.0.1:{}/{IQN}/1", closed.port());
    let o = kf(&["persist", "-k", &d]);
    assert_eq!(o.status.code(), Some(15));
    assert!(text(&o.stdout).is_empty());
    let e = text(&o.stderr);
    assert!(
        e.starts_with(&format!("keyfence persist: error opening file (ro): {d}: ")),
        "{e}"
    );
    let o = kf(&["persist", "-n", "-k", &d]);
    assert_eq!(o.status.code(), Some(15));
    assert!(
        text(&o.stderr).starts_with(&format!("keyfence persist: error opening file {d} (rw): "))
    );
    let o = kf(&["persist", "-k", "/dev/sda"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).starts_with("keyfence persist: invalid iSCSI URL"));
}

#[test]
fn sg_persist_option_errors_through_the_binary() {
    let d = "iscsi://127.0.0.1/iqn.2026-11.io.keyfence:x/0";
    let o = kf(&["persist", "-i", "-o", "-G", d]);
    assert_eq!(o.status.code(), Some(31));
    assert!(text(&o.stderr).starts_with("choose '--in' _or_ '--out' (not both)\n"));
    assert_eq!(kf(&["persist", "-G", d]).status.code(), Some(31));
    assert_eq!(kf(&["persist", "-o", "-M", d]).status.code(), Some(31));
    assert_eq!(kf(&["persist", "--bogus", d]).status.code(), Some(1));
    assert_eq!(
        kf(&["persist", "-K", "xyz", "-o", "-G", d]).status.code(),
        Some(1)
    );
    assert_eq!(kf(&["persist"]).status.code(), Some(1));
    let o = kf(&["persist", "-V"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(text(&o.stderr).starts_with("version: 0.67 20190913"));
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("keyfence.toml");
    std::fs::write(&p, body).expect("config");
    p
}

#[test]
fn mpathpersist_over_tgtd() {
    let t = tgtd();
    let d = t.url();
    check(
        &kf(&["mpathpersist", "-i", "-k", "-d", &d]),
        0,
        "  PR generation=0x0, \t0 registered reservation key.\n",
        "",
    );
    silent(&kf(&[
        "mpathpersist",
        "-o",
        "--register",
        "--param-sark=123abc",
        "-d",
        &d,
    ]));
    check(
        &kf(&["mpathpersist", "--in", "--read-keys", "-d", &d]),
        0,
        "  PR generation=0x1, \t1 registered reservation key follows:\n    0x123abc\n",
        "",
    );
    check(
        &kf(&["mpathpersist", "-i", "-r", "-d", &d]),
        0,
        "  PR generation=0x1, there is NO reservation held \n",
        "",
    );
    // New nexus, not registered: conflict, MPATH_PR_RESERV_CONFLICT (11).
    let o = kf(&[
        "mpathpersist",
        "-o",
        "--reserve",
        "--prout-type=5",
        "--param-rk=123abc",
        "-d",
        &d,
    ]);
    assert_eq!(o.status.code(), Some(11));
    assert_eq!(
        text(&o.stdout),
        "persistent reserve out: scsi status: Reservation Conflict\nPR out: command failed\n"
    );
    // tgtd has no READ FULL STATUS: ILLEGAL REQUEST (5).
    let o = kf(&["mpathpersist", "-i", "-s", "-d", &d]);
    assert_eq!(o.status.code(), Some(5));
    assert_eq!(text(&o.stderr), "Persistent Reserve IN command failed\n");
}

#[test]
fn mpathpersist_map_with_a_dead_path_and_key_check() {
    let t = tgtd();
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = keyfence_testkit::port::ClosedPort::new();
    let dead = closed.port();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[[multipath]]\nname = \"mpatha\"\nreservation_key = \"0xabc\"\npaths = [\"iscsi://127.0.0.1:{dead}/{IQN}/1\", \"{}\"]\n",
            t.url()
        ),
    );
    let c = cfg.to_str().expect("utf-8");
    silent(&kf(&[
        "mpathpersist",
        "--config",
        c,
        "-o",
        "-G",
        "-S",
        "abc",
        "-d",
        "/dev/mapper/mpatha",
    ]));
    check(
        &kf(&["mpathpersist", "--config", c, "-i", "-k", "mpatha"]),
        0,
        "  PR generation=0x1, \t1 registered reservation key follows:\n    0xabc\n",
        "",
    );
    // Keys other than the configured one are refused before anything is sent.
    let o = kf(&[
        "mpathpersist",
        "--config",
        c,
        "-o",
        "-G",
        "-S",
        "def",
        "mpatha",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "mpatha: configured reservation key doesn't match: 0xabc\n"
    );
    // Unknown map.
    let o = kf(&["mpathpersist", "--config", c, "-i", "-k", "mpathz"]);
    assert_eq!(o.status.code(), Some(12));
    // All paths dead: MPATH_PR_DMMP_ERROR.
    let cfg2 = write_config(
        dir.path(),
        &format!("[[multipath]]\nname = \"m\"\npaths = [\"iscsi://127.0.0.1:{dead}/{IQN}/1\"]\n"),
    );
    let o = kf(&[
        "mpathpersist",
        "--config",
        cfg2.to_str().expect("utf-8"),
        "-i",
        "-k",
        "m",
    ]);
    assert_eq!(o.status.code(), Some(13));
    assert_eq!(text(&o.stderr), "m: no usable path\n");
}

#[test]
fn mpathpersist_batch_file() {
    let t = tgtd();
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "# register, then read\nmpathpersist -o -G -S 0x77 -d {u}\n\n-i -k -d {u}   # comment\n-i -q\n",
            u = t.url()
        ),
    )
    .expect("batch");
    let o = kf(&["mpathpersist", "-f", batch.to_str().expect("utf-8")]);
    assert_eq!(
        text(&o.stdout),
        "  PR generation=0x1, \t1 registered reservation key follows:\n    0x77\n"
    );
    // Line 5 has a syntax error: reported, and the status says so.
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("syntax error on line 5 in batch file\n"));
}

#[test]
fn mpathpersist_usage_errors() {
    let o = kf(&["mpathpersist"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).starts_with("No parameter used\nmultipath-tools v0.9.4"));
    let o = kf(&["mpathpersist", "-k", "m"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).starts_with("choose either '--in' or '--out' \n"));
    let o = kf(&["mpathpersist", "-h"]);
    assert_eq!(o.status.code(), Some(0));
}
