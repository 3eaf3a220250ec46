//! `keyfence fence race`: the coordinator-disk race that settles a split
//! cluster without quorum.
//!
//! Both halves hold registrations on an odd number of small coordinator LUNs
//! (registered with `fence agent -o on` beforehand). When the interconnect
//! fails, each half runs `race` with its own key and the other half's keys:
//! on every disk, in one agreed order (sorted by name, so the order given on
//! the command line does not matter), it preempts the other half's keys. A
//! side whose own key has already been removed on a disk gets RESERVATION
//! CONFLICT there and has lost that disk. The side that wins a majority of
//! the disks continues (exit 0); the other runs its `--action` and exits 1.
//! Since a disk, once won, can no longer be preempted by the loser (its key
//! is gone), exactly one side can hold a majority.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keyfence_fence::race::{race_disk, DiskOutcome};

use super::key::parse_key;
use super::FenceDevice;
use crate::cli::Msg as _;

/// Race the other half of the cluster for a majority of coordinator LUNs.
#[derive(Debug, Parser)]
#[command(name = "keyfence fence race")]
struct Args {
    /// Coordinator LUNs (odd number): iSCSI URLs or multipath map names.
    #[arg(long, short = 'd')]
    devices: String,
    /// This side's key (registered on the coordinator LUNs).
    #[arg(long, short = 'k')]
    key: String,
    /// The other side's keys, comma separated.
    #[arg(long)]
    victim_keys: String,
    /// Command run through `sh -c` when this side loses.
    #[arg(long)]
    action: Option<String>,
    /// iSCSI initiator name of this node (default: $KEYFENCE_INITIATOR_NAME,
    /// /etc/iscsi/initiatorname.iscsi, then one derived from the host name).
    #[arg(long)]
    initiator_name: Option<String>,
    /// keyfence configuration with the multipath maps named in --devices
    /// (default: $KEYFENCE_CONFIG, then /etc/keyfence/keyfence.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Milliseconds allowed for each login and command.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    timeout_ms: u64,
}

pub fn run(args: &[OsString]) -> ExitCode {
    let a: Args = match crate::cli::parse("keyfence fence race", args, 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let setup = || -> Result<(Vec<FenceDevice>, u64, Vec<u64>, String), String> {
        let mut devs = super::resolve_devices(&a.devices, a.config.as_deref()).msg()?;
        if devs.len() % 2 == 0 {
            return Err(format!(
                "{} coordinator devices given: an odd number is needed so that one side wins a majority",
                devs.len()
            ));
        }
        devs.sort_by(|x, y| x.name.cmp(&y.name));
        let mine = parse_key(&a.key).msg()?;
        let victims = a
            .victim_keys
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse_key)
            .collect::<Result<Vec<_>, _>>()
            .msg()?;
        if victims.is_empty() {
            return Err("no --victim-keys given".into());
        }
        if victims.contains(&mine) {
            return Err("this side's key is among the victim keys".into());
        }
        let name = super::initiator_name(a.initiator_name.as_deref()).msg()?;
        Ok((devs, mine, victims, name))
    };
    let (devs, mine, victims, name) = match setup() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("keyfence fence race: {e}");
            return ExitCode::from(1);
        }
    };
    let rt = match super::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyfence fence race: {e}");
            return ExitCode::from(1);
        }
    };
    let t = Duration::from_millis(a.timeout_ms);
    let mut won = 0;
    for d in &devs {
        let o = rt.block_on(async {
            match tokio::time::timeout(t.saturating_mul(4), race_disk(d, &name, mine, &victims, t))
                .await
            {
                Ok(o) => o,
                Err(_) => DiskOutcome::Failed(keyfence_fence::Error::Deadline(t.saturating_mul(4))),
            }
        });
        match &o {
            DiskOutcome::Won { .. } => {
                won += 1;
                println!("{}: won: {o}", d.name);
            }
            DiskOutcome::Lost { .. } => println!("{}: lost: {o}", d.name),
            DiskOutcome::Failed(_) => println!("{}: failed: {o}", d.name),
        }
    }
    if won * 2 > devs.len() {
        println!("race won: {won} of {} coordinator devices", devs.len());
        return ExitCode::SUCCESS;
    }
    println!(
        "race lost: {won} of {} coordinator devices; this side must stop",
        devs.len()
    );
    if let Some(cmd) = &a.action {
        match std::process::Command::new("sh").arg("-c").arg(cmd).status() {
            Ok(s) if !s.success() => eprintln!("action {cmd:?} exited with {s}"),
            Ok(_) => {}
            Err(e) => eprintln!("cannot run action {cmd:?}: {e}"),
        }
    }
    ExitCode::from(1)
}

/// The clap definition of this command (for manual pages and completions).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}
