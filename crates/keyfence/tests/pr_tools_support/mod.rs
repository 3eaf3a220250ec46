//! Shared helpers of the PR tool tests (pr_tools_serve, pr_tools_tgtd):
//! `keyfence persist`, `mpathpersist` and `takeover` run as processes as a
//! given initiator, and their exact output checked.
#![allow(dead_code)]

use std::process::{Command, Output};

pub use keyfence_testkit::text;

const KF: &str = env!("CARGO_BIN_EXE_keyfence");

/// `keyfence ARGS` as initiator `init` (`KEYFENCE_INITIATOR_NAME`),
/// bounded, with no configuration file from the environment.
pub fn kf_as(init: &str, args: &[&str]) -> Output {
    keyfence_testkit::run(
        Command::new(KF)
            .args(args)
            .env("KEYFENCE_INITIATOR_NAME", init)
            .env_remove("KEYFENCE_CONFIG"),
    )
}

/// `o` exited with `code` and printed exactly `stdout` and `stderr`.
pub fn check(o: &Output, code: i32, stdout: &str, stderr: &str) {
    assert_eq!(
        (
            o.status.code(),
            text(&o.stdout).as_str(),
            text(&o.stderr).as_str()
        ),
        (Some(code), stdout, stderr)
    );
}

/// `o` exited 0 and printed nothing (a PR OUT action of sg_persist).
pub fn silent(o: &Output) {
    check(o, 0, "", "");
}

/// `o` exited 0: what it printed.
pub fn ok(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    text(&o.stdout)
}
