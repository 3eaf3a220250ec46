//! The `keyfence` binary: one program, several jobs, chosen by subcommand or
//! by the name it is run under (`sg_persist`, `mpathpersist`,
//! `fence_keyfence`).

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

mod admin;
mod bench;
mod cli;
mod cluster_status;
mod fence;
mod install_links;
mod manual;
mod mpathpersist;
mod persist;
mod pr_show;
mod serve;
mod systemd;
mod takeover;

const USAGE: &str = "\
keyfence: SCSI-3 persistent reservations, an iSCSI target and fencing

Usage: keyfence <COMMAND> [ARGS...]

Commands:
  serve         run the iSCSI target (default: iqn.2026-11.io.keyfence:default,
                LUN 0 on 127.0.0.1:3260, data in ./keyfence-data)
  status        show what a running serve serves: targets, sessions, LUs, PR
  reload        make a running serve re-read its configuration (as SIGHUP)
  persist       sg_persist-compatible PR tool over iSCSI (also run as sg_persist)
  mpathpersist  mpathpersist-compatible multipath PR tool (also run as mpathpersist)
  takeover      take back PR registration/reservation after a new I_T nexus
  pr            inspect PR state: `keyfence pr show`
  cluster       inspect a cluster in etcd: `keyfence cluster status`
  bench         block I/O load over iSCSI at a fixed queue depth
  fence         I/O fencing: agent (also run as fence_keyfence), check, acquire, race
  install-links DIR
                make sg_persist, mpathpersist and fence_keyfence in DIR
                symbolic links to this binary
  man DIR       write the manual pages into DIR
  completions SHELL
                print the completion script for bash, zsh, fish, elvish
                or powershell
  help          print this help

Run `keyfence <COMMAND> --help` for a command's options.
";

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = args.first().cloned().unwrap_or_default();
    let prog = Path::new(&argv0)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match prog.as_str() {
        "sg_persist" => return persist::run(&args[1..], "sg_persist"),
        "keyfence-sg_persist" => return persist::run(&args[1..], "keyfence-sg_persist"),
        "mpathpersist" | "keyfence-mpathpersist" => return mpathpersist::run(&args[1..]),
        "fence_keyfence" => return fence::agent_main(&args[1..]),
        _ => {}
    }
    if args.len() < 2 {
        eprint!("{USAGE}");
        return ExitCode::from(1);
    }
    let cmd = args.remove(1).to_string_lossy().into_owned();
    let rest = &args[1..];
    match cmd.as_str() {
        "serve" => serve::run(rest),
        "status" => admin::run_status(rest),
        "reload" => admin::run_reload(rest),
        "persist" => persist::run(rest, "keyfence persist"),
        "sg_persist" => persist::run(rest, "keyfence sg_persist"),
        "mpathpersist" => mpathpersist::run(rest),
        "pr" => pr_show::run(rest),
        "cluster" => cluster_status::run(rest),
        "takeover" => takeover::run(rest),
        "bench" => bench::run(rest),
        "fence" => fence::run(rest),
        "install-links" => install_links::run(rest),
        "man" => manual::run_man(rest),
        "completions" => manual::run_completions(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        "--version" | "-V" => {
            println!("keyfence {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("keyfence: unknown command '{other}'; run `keyfence help`");
            ExitCode::from(1)
        }
    }
}
