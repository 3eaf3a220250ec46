//! `keyfence install-links DIR`: make the names keyfence answers to
//! (`sg_persist`, `mpathpersist`, `fence_keyfence`) symbolic links to the
//! running binary in DIR, so that scripts and fence-agents that call those
//! names find keyfence.
//!
//! An existing entry is replaced only when it is itself a symbolic link to
//! a binary called `keyfence` (an earlier install); anything else is left
//! alone and the command fails before creating any link.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

/// The names keyfence dispatches on (see main.rs).
pub const NAMES: [&str; 3] = ["sg_persist", "mpathpersist", "fence_keyfence"];

const PROG: &str = "keyfence install-links";

/// Create sg_persist, mpathpersist and fence_keyfence as symbolic links to
/// this keyfence binary.
#[derive(Debug, Parser)]
#[command(name = PROG)]
struct Args {
    /// Directory for the links (created if missing), e.g. ~/.local/bin.
    dir: PathBuf,
}

/// What to do with one name.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Create,
    /// A link to another keyfence binary: point it at this one.
    Replace,
    /// Already a link to this binary.
    Keep,
}

fn is_keyfence_link(link: &Path, exe: &Path) -> std::io::Result<Option<Plan>> {
    let meta = match std::fs::symlink_metadata(link) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(Plan::Create)),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_symlink() {
        return Ok(None);
    }
    let to = std::fs::read_link(link)?;
    let to = if to.is_relative() {
        link.parent().unwrap_or(Path::new(".")).join(to)
    } else {
        to
    };
    if std::fs::canonicalize(&to).ok().as_deref() == Some(exe) {
        return Ok(Some(Plan::Keep));
    }
    Ok((to.file_name() == Some(std::ffi::OsStr::new("keyfence"))).then_some(Plan::Replace))
}

/// Plan and create the links; returns the lines to print.
pub fn install(dir: &Path, exe: &Path) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut plans = Vec::new();
    for name in NAMES {
        let link = dir.join(name);
        match is_keyfence_link(&link, exe).map_err(|e| format!("{}: {e}", link.display()))? {
            Some(p) => plans.push((link, p)),
            None => {
                return Err(format!(
                    "{} exists and is not a link to keyfence; not overwriting it (remove it first)",
                    link.display()
                ))
            }
        }
    }
    let mut done = Vec::new();
    for (link, plan) in plans {
        match plan {
            Plan::Keep => {
                done.push(format!("{} -> {} (already)", link.display(), exe.display()));
                continue;
            }
            Plan::Replace => {
                std::fs::remove_file(&link).map_err(|e| format!("{}: {e}", link.display()))?
            }
            Plan::Create => {}
        }
        std::os::unix::fs::symlink(exe, &link).map_err(|e| format!("{}: {e}", link.display()))?;
        done.push(format!("{} -> {}", link.display(), exe.display()));
    }
    Ok(done)
}

pub fn run(args: &[OsString]) -> ExitCode {
    let a: Args = match crate::cli::parse(PROG, args, 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let exe = match std::env::current_exe().and_then(std::fs::canonicalize) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{PROG}: cannot find the running binary: {e}");
            return ExitCode::from(1);
        }
    };
    match install(&a.dir, &exe) {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{PROG}: {e}");
            ExitCode::from(1)
        }
    }
}

/// The clap definition of this command (for manual pages and completions).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_refuses_foreign_files() {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("bin").join("keyfence");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        std::fs::write(&exe, b"").unwrap();
        let exe = std::fs::canonicalize(&exe).unwrap();
        let dir = d.path().join("links");
        let out = install(&dir, &exe).unwrap();
        assert_eq!(out.len(), 3);
        for n in NAMES {
            assert_eq!(std::fs::read_link(dir.join(n)).unwrap(), exe);
        }
        // Again: nothing to do.
        assert!(install(&dir, &exe).unwrap()[0].ends_with("(already)"));
        // A link to an older keyfence is repointed.
        let old = d.path().join("old").join("keyfence");
        std::fs::remove_file(dir.join("mpathpersist")).unwrap();
        std::os::unix::fs::symlink(&old, dir.join("mpathpersist")).unwrap();
        install(&dir, &exe).unwrap();
        assert_eq!(std::fs::read_link(dir.join("mpathpersist")).unwrap(), exe);
        // A real sg_persist is never overwritten, and nothing else changes.
        std::fs::remove_file(dir.join("sg_persist")).unwrap();
        std::fs::write(dir.join("sg_persist"), b"#!/bin/sh\n").unwrap();
        std::fs::remove_file(dir.join("fence_keyfence")).unwrap();
        let e = install(&dir, &exe).unwrap_err();
        assert!(
            e.contains("sg_persist exists and is not a link to keyfence"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(dir.join("sg_persist")).unwrap(),
            b"#!/bin/sh\n"
        );
        assert!(std::fs::symlink_metadata(dir.join("fence_keyfence")).is_err());
    }
}
