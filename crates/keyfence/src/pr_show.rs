//! `keyfence pr show`: print the persistent-reservation state that a
//! keyfence target persisted (APTPL) under its data directory, as a table
//! or as JSON. Reads files only; safe to run while the target serves.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pr::PrState;
use serde::Serialize;
use target::lu::reservation::{read_state_file, StateFile};

#[derive(Debug, Parser)]
#[command(
    name = "keyfence pr",
    about = "Inspect persistent reservation state persisted by a keyfence target"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show registrations and the reservation of every persisted LU.
    Show {
        /// The target's data directory (PR state lives in DIR/pr/).
        #[arg(long, value_name = "DIR", default_value = "keyfence-data")]
        data_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// One persisted LU as shown.
#[derive(Debug, Serialize)]
struct Shown {
    path: PathBuf,
    #[serde(flatten)]
    file: Option<StateFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn run(args: &[OsString]) -> ExitCode {
    let argv = std::iter::once(OsString::from("keyfence pr")).chain(args.iter().cloned());
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let Cmd::Show { data_dir, json } = cli.cmd;
    let files = match state_files(&data_dir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("keyfence pr show: {e}");
            return ExitCode::from(1);
        }
    };
    let shown: Vec<Shown> = files
        .into_iter()
        .filter_map(|path| match read_state_file(&path) {
            Ok(Some(file)) => Some(Shown {
                path,
                file: Some(file),
                error: None,
            }),
            // Removed between listing and reading: APTPL was just cleared.
            Ok(None) => None,
            Err(e) => Some(Shown {
                path,
                file: None,
                error: Some(e.to_string()),
            }),
        })
        .collect();
    let failed = shown.iter().any(|s| s.error.is_some());
    if json {
        match serde_json::to_string_pretty(&shown) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("keyfence pr show: {e}");
                return ExitCode::from(1);
            }
        }
    } else if shown.is_empty() {
        println!(
            "no persisted PR state under {} (APTPL never set, or cleared)",
            data_dir.join("pr").display()
        );
    } else {
        for s in &shown {
            print_table(s);
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// DIR/pr/<target>/lun<N>.json, sorted.
fn state_files(data_dir: &Path) -> Result<Vec<PathBuf>, String> {
    if !data_dir.is_dir() {
        return Err(format!("{}: not a directory", data_dir.display()));
    }
    let root = data_dir.join("pr");
    let mut out = Vec::new();
    let targets = match std::fs::read_dir(&root) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("{}: {e}", root.display())),
    };
    for t in targets {
        let t = t.map_err(|e| format!("{}: {e}", root.display()))?;
        if !t.path().is_dir() {
            continue;
        }
        let entries =
            std::fs::read_dir(t.path()).map_err(|e| format!("{}: {e}", t.path().display()))?;
        for f in entries {
            let f = f.map_err(|e| format!("{}: {e}", t.path().display()))?;
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with("lun") && name.ends_with(".json") {
                out.push(f.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn print_table(s: &Shown) {
    let Some(file) = &s.file else {
        println!(
            "{}: UNREADABLE: {}",
            s.path.display(),
            s.error.as_deref().unwrap_or("?")
        );
        println!();
        return;
    };
    let state = PrState::from(file.state.clone());
    println!("Target {}  LUN {}", file.target, file.lun);
    println!(
        "  PRgeneration 0x{:x}  APTPL {}  store version {}  ({})",
        state.generation,
        if state.aptpl { "on" } else { "off" },
        file.version,
        s.path.display()
    );
    match &state.reservation {
        None => println!("  Reservation: none"),
        Some(r) => {
            let who = match &r.holder {
                None => "every registrant (all-registrants type)".to_string(),
                Some(h) => format!(
                    "{} via target port {} (rel {})",
                    h.initiator, h.target.tpgt, h.target.relative_id
                ),
            };
            println!(
                "  Reservation: {} ({}), LU scope, held by {}",
                r.pr_type.long_name(),
                r.pr_type.short_name(),
                who
            );
        }
    }
    if state.registrations.is_empty() {
        println!("  Registrations: none");
    } else {
        let width = state
            .registrations
            .iter()
            .map(|g| g.nexus.initiator.to_string().len())
            .max()
            .unwrap_or(0)
            .max("INITIATOR PORT".len());
        println!(
            "  {:<18}  {:<width$}  {:>8}  {:>9}  {}",
            "KEY", "INITIATOR PORT", "REL PORT", "ALL_TG_PT", "HOLDER"
        );
        for g in &state.registrations {
            let holder = if state.is_holder(&g.nexus) {
                match &state.reservation {
                    Some(r) => r.pr_type.short_name(),
                    None => "",
                }
            } else {
                ""
            };
            println!(
                "  0x{:016x}  {:<width$}  {:>8}  {:>9}  {}",
                g.key,
                g.nexus.initiator.to_string(),
                g.nexus.target.relative_id,
                if g.all_tg_pt { "yes" } else { "no" },
                holder
            );
        }
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use pr::{PrStore, PrType, Registration, Reservation};
    use scsi::{InitiatorPort, Nexus, TargetPort};
    use target::lu::reservation::{state_path, FileStore};

    #[test]
    fn lists_persisted_state_and_flags_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert!(state_files(dir.path()).unwrap().is_empty());
        let path = state_path(dir.path(), "iqn.2026-11.io.keyfence:t", 3);
        let store = FileStore::new(path.clone(), "iqn.2026-11.io.keyfence:t", 3);
        let n = Nexus::new(
            InitiatorPort::new("iqn.a", 1),
            TargetPort::new("iqn.2026-11.io.keyfence:t", 1, 1),
        );
        let st = PrState {
            generation: 4,
            aptpl: true,
            registrations: vec![Registration {
                nexus: n.clone(),
                key: 0xabc,
                all_tg_pt: false,
            }],
            reservation: Some(Reservation {
                pr_type: PrType::WriteExclusive,
                holder: Some(n),
            }),
            ..PrState::default()
        };
        store.compare_and_swap(0, Some(&st)).unwrap();
        assert_eq!(state_files(dir.path()).unwrap(), vec![path.clone()]);
        let f = read_state_file(&path).unwrap().unwrap();
        assert_eq!((f.lun, f.version), (3, 1));
        assert!(PrState::from(f.state).durable_eq(&st));
        let args: Vec<OsString> = ["show", "--data-dir"]
            .iter()
            .map(OsString::from)
            .chain([dir.path().as_os_str().to_owned()])
            .collect();
        assert_eq!(run(&args), ExitCode::SUCCESS);
        std::fs::write(&path, b"{ not json").unwrap();
        assert_eq!(run(&args), ExitCode::from(1));
        let bad: Vec<OsString> = vec!["show".into(), "--bogus".into()];
        assert_eq!(run(&bad), ExitCode::from(2));
    }
}
