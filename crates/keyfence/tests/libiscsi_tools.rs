//! libiscsi's command-line tools against `keyfence serve`, run the way a
//! newcomer runs them from the README: they must work out of the box.
//! `iscsi-ls -s` logs in to every target it discovers and sends TEST UNIT
//! READY to each LUN; it retries only on the unit attention 29h/00h, so a
//! target that reports anything else to a new I_T nexus makes it fail.
//! The tools must be installed (libiscsi-bin): without them the test fails,
//! saying how to install them.

use std::process::Command;
use std::time::Duration;

use keyfence_testkit::{code, require, run_bounded, text, Serve};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:libiscsi-tools";

#[test]
fn iscsi_ls_lists_the_target_and_its_lun() {
    let ls = require("iscsi-ls");
    let serve = Serve::builder(KF)
        .target_name(IQN)
        .size("16M")
        .log_level("error")
        .start();
    let portal = serve.portals()[0];
    let o = run_bounded(
        Command::new(ls).args([
            "-s",
            "-i",
            "iqn.2026-11.io.keyfence.test:iscsi-ls",
            &format!("iscsi://{portal}"),
        ]),
        None,
        Duration::from_secs(60),
    );
    let out = text(&o.stdout) + &text(&o.stderr);
    assert_eq!(code(&o), 0, "iscsi-ls -s iscsi://{portal} failed:\n{out}");
    assert!(
        out.lines()
            .any(|l| l.trim() == format!("Target:{IQN} Portal:{portal},1")),
        "target not listed:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("Lun:0") && l.contains("Type:DIRECT_ACCESS")),
        "LUN 0 not listed as a disk:\n{out}"
    );
}
