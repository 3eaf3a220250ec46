//! `keyfence man DIR` and `keyfence completions SHELL`: manual pages and
//! shell completions for every keyfence command, generated from the
//! definitions the commands parse their arguments with.
//!
//! - Commands parsed by clap (serve, status, reload, bench, pr, fence check/acquire/race,
//!   install-links, man, completions) get pages rendered by clap_mangen
//!   from their clap `Command`, so options, defaults and help texts are the
//!   ones `--help` prints.
//! - The sg3_utils/multipath-tools-compatible tools (`persist`, i.e.
//!   sg_persist, `mpathpersist`), `takeover` and the fence agent parse with
//!   getopt tables of their own, to stay option-for-option compatible. Their
//!   pages are made from the usage text each of them prints for `--help`
//!   (and, for the compatible tools, the list of where they depart from the
//!   originals), and their completions from their getopt tables. Nothing is
//!   written twice, so pages and completions cannot drift from the tools.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Arg, ArgAction, Command, Parser};
use clap_complete::Shell;

use crate::persist::getopt::{HasArg, LongOpt};

/// Write the manual pages of every keyfence command under DIR, laid out
/// as a MANPATH entry: DIR/man1/keyfence.1, DIR/man1/keyfence-serve.1, ...,
/// DIR/man8/fence_keyfence.8 (directories created if missing).
#[derive(Debug, Parser)]
#[command(name = "keyfence man")]
struct ManArgs {
    /// Manual directory, e.g. /usr/local/share/man or ~/.local/share/man.
    dir: PathBuf,
}

/// Print the completion script for SHELL on stdout.
#[derive(Debug, Parser)]
#[command(name = "keyfence completions")]
struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

const ABOUT: &str = "SCSI-3 persistent reservations, an iSCSI target and fencing";

/// A getopt-parsed command: its getopt tables and the text it prints for
/// `--help`.
struct Getopt {
    name: &'static str,
    about: &'static str,
    shorts: &'static str,
    longs: &'static [LongOpt],
    positional: Option<&'static str>,
}

fn getopt_commands() -> [Getopt; 3] {
    [
        Getopt {
            name: "persist",
            about: "sg_persist-compatible persistent reservation tool over iSCSI (also run as sg_persist)",
            shorts: crate::persist::opts::SHORTS,
            longs: crate::persist::opts::LONGS,
            positional: Some("DEVICE"),
        },
        Getopt {
            name: "mpathpersist",
            about: "mpathpersist-compatible multipath persistent reservation tool (also run as mpathpersist)",
            shorts: crate::mpathpersist::options::SHORTS,
            longs: crate::mpathpersist::options::LONGS,
            positional: Some("DEVICE"),
        },
        Getopt {
            name: "takeover",
            about: "take back PR registration and reservation after a new I_T nexus",
            // takeover's short letters are not a table of their own; its
            // long options cover every one of them.
            shorts: "",
            longs: crate::takeover::LONGS,
            positional: Some("DEVICE"),
        },
    ]
}

/// A clap command describing a getopt command's options, for completion
/// only (it never parses anything).
fn getopt_command(g: &Getopt) -> Command {
    let mut cmd = Command::new(g.name)
        .about(g.about)
        .disable_help_flag(true)
        .disable_version_flag(true);
    let mut used_shorts = Vec::new();
    for o in g.longs {
        let short = (o.val.is_ascii_alphanumeric()
            && g.shorts.contains(o.val)
            && !used_shorts.contains(&o.val))
        .then_some(o.val);
        let mut arg = Arg::new(o.name).long(o.name);
        if let Some(c) = short {
            used_shorts.push(c);
            arg = arg.short(c);
        }
        arg = match o.has_arg {
            HasArg::Required => arg.action(ArgAction::Append).value_name("VALUE"),
            HasArg::No => arg.action(ArgAction::Count),
        };
        cmd = cmd.arg(arg);
    }
    if let Some(p) = g.positional {
        cmd = cmd.arg(Arg::new(p).value_name(p));
    }
    cmd
}

/// The fence agent's options, from the table it parses and documents with.
fn agent_command(name: &'static str) -> Command {
    let mut cmd = Command::new(name)
        .about("fence agent for Pacemaker (also run as fence_keyfence)")
        .disable_help_flag(true)
        .disable_version_flag(true);
    for &(long, short, takes, help) in crate::fence::agent::options::OPTIONS {
        let mut arg = Arg::new(long).long(long).help(help);
        if let Some(c) = short {
            arg = arg.short(c);
        }
        arg = if takes {
            arg.action(ArgAction::Append).value_name("VALUE")
        } else {
            arg.action(ArgAction::Count)
        };
        cmd = cmd.arg(arg);
    }
    cmd
}

/// `keyfence fence`, with the subcommands it dispatches to.
fn fence_command() -> Command {
    Command::new("fence")
        .about("I/O fencing: agent (also run as fence_keyfence), check, acquire, race")
        .subcommand_required(true)
        .subcommand(agent_command("agent"))
        .subcommand(crate::fence::check::command().name("check"))
        .subcommand(crate::fence::acquire::command().name("acquire"))
        .subcommand(crate::fence::race::command().name("race"))
}

/// The whole `keyfence` command tree as main.rs dispatches it.
pub fn command() -> Command {
    let [persist, mpathpersist, takeover] = getopt_commands();
    Command::new("keyfence")
        .version(env!("CARGO_PKG_VERSION"))
        .about(ABOUT)
        .subcommand_required(true)
        .subcommand(crate::serve::command().name("serve"))
        .subcommand(crate::admin::status_command().name("status"))
        .subcommand(crate::admin::reload_command().name("reload"))
        .subcommand(getopt_command(&persist).alias("sg_persist"))
        .subcommand(getopt_command(&mpathpersist))
        .subcommand(getopt_command(&takeover))
        .subcommand(crate::pr_show::command().name("pr"))
        .subcommand(crate::cluster_status::command().name("cluster"))
        .subcommand(crate::bench::command().name("bench"))
        .subcommand(fence_command())
        .subcommand(crate::install_links::command().name("install-links"))
        .subcommand(ManArgs::command_for("man"))
        .subcommand(CompletionsArgs::command_for("completions"))
}

trait Named {
    fn command_for(name: &'static str) -> Command;
}

impl<T: clap::CommandFactory> Named for T {
    fn command_for(name: &'static str) -> Command {
        T::command().name(name)
    }
}

/// Escape text for roff's `.nf` block: lines starting with `.` or `'`
/// would be requests, and backslashes are escapes.
fn roff_verbatim(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = line.replace('\\', "\\e");
        if line.starts_with('.') || line.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A page for a command documented by the usage text it prints.
fn text_page(
    title: &str,
    section: &str,
    summary: &str,
    sections: &[(&str, &str)],
    see_also: &str,
) -> String {
    let mut page = format!(
        ".TH {title} {section} \"\" \"keyfence {}\"\n.SH NAME\n{title} \\- {}",
        env!("CARGO_PKG_VERSION"),
        roff_verbatim(summary)
    );
    for (head, body) in sections {
        page.push_str(&format!(".SH \"{}\"\n.nf\n", head.to_uppercase()));
        page.push_str(&roff_verbatim(body));
        page.push_str(".fi\n");
    }
    page.push_str(&format!(".SH \"SEE ALSO\"\n{}", roff_verbatim(see_also)));
    page
}

/// Render one clap command (and its subcommands, each to a page of its
/// own) as `STEM.1`, with BIN as the command line in its synopsis.
fn clap_pages(cmd: Command, stem: &str, bin: &str, out: &mut Vec<(String, Vec<u8>)>) {
    let mut cmd = cmd.display_name(stem.to_string()).bin_name(bin.to_string());
    cmd.build();
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        clap_pages(
            sub.clone(),
            &format!("{stem}-{}", sub.get_name()),
            &format!("{bin} {}", sub.get_name()),
            out,
        );
    }
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .source(concat!("keyfence ", env!("CARGO_PKG_VERSION")))
        .render(&mut buf)
        .expect("rendering into a Vec cannot fail");
    out.push((format!("{stem}.1"), buf));
}

/// Every page: (file name, roff text).
pub fn pages() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let see_also = "keyfence(1), keyfence-persist(1), keyfence-mpathpersist(1), keyfence-serve(1)";
    // keyfence(1): the command list, from the same tree the completions use.
    let mut top = Vec::new();
    clap_mangen::Man::new(command())
        .source(concat!("keyfence ", env!("CARGO_PKG_VERSION")))
        .render(&mut top)
        .expect("rendering into a Vec cannot fail");
    out.push(("keyfence.1".to_string(), top));
    for cmd in [
        crate::serve::command().name("serve"),
        crate::admin::status_command().name("status"),
        crate::admin::reload_command().name("reload"),
        crate::pr_show::command().name("pr"),
        crate::cluster_status::command().name("cluster"),
        crate::bench::command().name("bench"),
        crate::install_links::command().name("install-links"),
        ManArgs::command_for("man"),
        CompletionsArgs::command_for("completions"),
    ] {
        let name = cmd.get_name().to_string();
        clap_pages(
            cmd,
            &format!("keyfence-{name}"),
            &format!("keyfence {name}"),
            &mut out,
        );
    }
    for cmd in [
        crate::fence::check::command().name("check"),
        crate::fence::acquire::command().name("acquire"),
        crate::fence::race::command().name("race"),
    ] {
        let name = cmd.get_name().to_string();
        clap_pages(
            cmd,
            &format!("keyfence-fence-{name}"),
            &format!("keyfence fence {name}"),
            &mut out,
        );
    }
    out.push((
        "keyfence-fence.1".to_string(),
        text_page(
            "keyfence-fence",
            "1",
            "I/O fencing with SCSI-3 persistent reservations",
            &[("Synopsis", crate::fence::USAGE)],
            "fence_keyfence(8), keyfence-fence-check(1), keyfence-fence-acquire(1), keyfence-fence-race(1)",
        )
        .into_bytes(),
    ));
    let persist_usage = format!(
        "{}\n{}",
        crate::persist::opts::USAGE_1,
        crate::persist::opts::USAGE_2
    );
    out.push((
        "keyfence-persist.1".to_string(),
        text_page(
            "keyfence-persist",
            "1",
            "sg_persist-compatible persistent reservation tool over iSCSI (also run as sg_persist or keyfence-sg_persist)",
            &[
                ("Synopsis", &persist_usage),
                ("Differences from sg_persist", crate::persist::DIFFERENCES),
            ],
            "sg_persist(8), keyfence(1)",
        )
        .into_bytes(),
    ));
    out.push((
        "keyfence-mpathpersist.1".to_string(),
        text_page(
            "keyfence-mpathpersist",
            "1",
            "mpathpersist-compatible multipath persistent reservation tool (also run as mpathpersist or keyfence-mpathpersist)",
            &[
                ("Synopsis", crate::mpathpersist::options::USAGE),
                (
                    "Differences from mpathpersist",
                    crate::mpathpersist::DIFFERENCES,
                ),
            ],
            "mpathpersist(8), keyfence(1)",
        )
        .into_bytes(),
    ));
    out.push((
        "keyfence-takeover.1".to_string(),
        text_page(
            "keyfence-takeover",
            "1",
            "take back PR registration and reservation after a new I_T nexus",
            &[("Synopsis", crate::takeover::USAGE)],
            see_also,
        )
        .into_bytes(),
    ));
    out.push((
        "fence_keyfence.8".to_string(),
        text_page(
            "fence_keyfence",
            "8",
            "fence agent for SCSI-3 persistent reservations on iSCSI LUNs",
            &[("Synopsis", &crate::fence::agent::metadata::usage())],
            "keyfence-fence(1), fence_scsi(8), stonith_admin(8)",
        )
        .into_bytes(),
    ));
    out.sort();
    out
}

/// Write every page to DIR/manN/ (a MANPATH entry's layout).
fn write_pages(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::new();
    for (name, text) in pages() {
        let section = name.rsplit('.').next().unwrap_or("1");
        let sub = dir.join(format!("man{section}"));
        std::fs::create_dir_all(&sub).map_err(|e| format!("{}: {e}", sub.display()))?;
        let path = sub.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// `keyfence man DIR`
pub fn run_man(args: &[OsString]) -> ExitCode {
    let a: ManArgs = match crate::cli::parse("keyfence man", args, 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match write_pages(&a.dir) {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keyfence man: {e}");
            ExitCode::from(1)
        }
    }
}

/// `keyfence completions SHELL`
pub fn run_completions(args: &[OsString]) -> ExitCode {
    let a: CompletionsArgs = match crate::cli::parse("keyfence completions", args, 1) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let mut cmd = command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(a.shell, &mut cmd, "keyfence", &mut out);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_tree_is_consistent() {
        // clap's own checks: duplicate names, short letters, ids.
        command().debug_assert();
        for g in getopt_commands() {
            getopt_command(&g).debug_assert();
        }
    }

    #[test]
    fn getopt_completions_follow_the_tables() {
        let [persist, ..] = getopt_commands();
        let cmd = getopt_command(&persist);
        let reg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some("register"))
            .unwrap();
        assert_eq!(reg.get_short(), Some('G'));
        // Long-only options (val outside the short table) get no letter.
        let a = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some("transport_id"))
            .unwrap();
        assert_eq!(a.get_short(), None, "X is given to transport-id");
    }

    #[test]
    fn every_command_has_a_page() {
        let names: Vec<String> = pages().into_iter().map(|(n, _)| n).collect();
        for sub in command().get_subcommands() {
            let page = format!("keyfence-{}.1", sub.get_name());
            assert!(names.contains(&page), "no page {page} in {names:?}");
        }
        assert!(names.contains(&"fence_keyfence.8".to_string()));
        assert!(names.contains(&"keyfence-pr-show.1".to_string()));
    }

    #[test]
    fn verbatim_text_is_escaped() {
        assert_eq!(roff_verbatim(".x\n'y\na\\b"), "\\&.x\n\\&'y\na\\eb\n");
    }
}
