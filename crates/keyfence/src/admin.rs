//! `keyfence status` and `keyfence reload`: talk to a running `keyfence
//! serve` over its admin socket (a Unix socket, mode 0600, by default
//! `keyfence.sock` in the data directory).
//!
//! Exit status: 0 done, 1 the server refused or is not running (one line
//! on stderr), 2 bad arguments.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keyfence_target::config::{ADMIN_SOCKET_NAME, DEFAULT_DATA_DIR};
use keyfence_target::server::admin::{self, Request, Response, Status};
use keyfence_target::server::human_size;

/// How long to wait for the server's answer (a reload opens and may grow
/// backing files).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the server's admin socket is.
#[derive(Debug, clap::Args)]
struct SocketArgs {
    /// The admin socket [default: DATA_DIR/keyfence.sock].
    #[arg(long = "socket", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The server's data directory (where its admin socket is by default)
    /// [default: ./keyfence-data].
    #[arg(long = "data-dir", value_name = "DIR", conflicts_with = "socket")]
    data_dir: Option<PathBuf>,
}

impl SocketArgs {
    fn path(&self) -> PathBuf {
        match (&self.socket, &self.data_dir) {
            (Some(s), _) => s.clone(),
            (None, Some(d)) => d.join(ADMIN_SOCKET_NAME),
            (None, None) => PathBuf::from(DEFAULT_DATA_DIR).join(ADMIN_SOCKET_NAME),
        }
    }
}

/// Show what a running keyfence serve is serving: targets, portals,
/// sessions, LUs with their persistent reservations, and limits.
#[derive(Debug, Parser)]
#[command(name = "keyfence status", version)]
struct StatusArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Print the status as JSON (stable field names) instead of tables.
    #[arg(long = "json")]
    json: bool,
}

/// Make a running keyfence serve re-read its configuration file and apply
/// what changed (as SIGHUP does). An invalid configuration is refused as a
/// whole and the old one keeps running.
///
/// Targets, portals, LUNs, ACLs, CHAP secrets, `[limits]` and the metrics
/// address are applied live, in cluster mode too, and so is
/// `[[cluster.gateways]]` (the portal groups advertised for the other
/// gateways). `data_dir`, `admin_socket` and the rest of `[cluster]` need
/// a restart; a served LUN's block size, read-only flag or identity
/// changes by removing it in one reload and adding it back in the next.
#[derive(Debug, Parser)]
#[command(name = "keyfence reload", version)]
struct ReloadArgs {
    #[command(flatten)]
    socket: SocketArgs,
}

/// The clap definition of `keyfence status` (manual pages, completions).
pub fn status_command() -> clap::Command {
    <StatusArgs as clap::CommandFactory>::command()
}

/// The clap definition of `keyfence reload`.
pub fn reload_command() -> clap::Command {
    <ReloadArgs as clap::CommandFactory>::command()
}

fn ask(name: &str, socket: &SocketArgs, req: Request) -> Result<Response, ExitCode> {
    match admin::request(&socket.path(), req, ANSWER_TIMEOUT) {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => {
            eprintln!(
                "{name}: {}",
                r.error.as_deref().unwrap_or("the server refused")
            );
            Err(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            Err(ExitCode::from(1))
        }
    }
}

pub fn run_status(args: &[OsString]) -> ExitCode {
    let a: StatusArgs = match crate::cli::parse("keyfence status", args, 2) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let r = match ask("keyfence status", &a.socket, Request::Status) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let Some(status) = r.status else {
        eprintln!("keyfence status: the server's answer has no status");
        return ExitCode::from(1);
    };
    let text = if a.json {
        match serde_json::to_string_pretty(&status) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("keyfence status: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        render(&status)
    };
    // A closed pipe (`keyfence status | head`) is not an error.
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    ExitCode::SUCCESS
}

pub fn run_reload(args: &[OsString]) -> ExitCode {
    let a: ReloadArgs = match crate::cli::parse("keyfence reload", args, 2) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match ask("keyfence reload", &a.socket, Request::Reload) {
        Ok(r) => {
            println!("reloaded: {}", r.reload.as_deref().unwrap_or("no change"));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Columns padded to their widest cell, two spaces apart.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<width$}  ", width = w[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(out, header.to_vec());
    for r in rows {
        line(out, r.iter().map(String::as_str).collect());
    }
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The human-readable status.
fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "keyfence {} (pid {}), up {}, configuration generation {}{}",
        s.version,
        s.pid,
        age(s.uptime_secs),
        s.config_generation,
        if s.discovery_chap {
            ", discovery requires CHAP"
        } else {
            ""
        }
    );
    if let Some(m) = &s.metrics {
        let _ = writeln!(out, "metrics at http://{m}/metrics");
    }
    out.push_str("\nTargets\n");
    let rows: Vec<Vec<String>> = s
        .targets
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.portals
                    .iter()
                    .map(|p| format!("{} (TPGT {})", p.address, p.tpgt))
                    .collect::<Vec<_>>()
                    .join(", "),
                if t.access == "open" {
                    "open".into()
                } else {
                    format!(
                        "ACL, {} {}",
                        t.acl_entries,
                        if t.acl_entries == 1 {
                            "entry"
                        } else {
                            "entries"
                        }
                    )
                },
                if t.chap { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    table(&mut out, &["TARGET", "PORTALS", "ACCESS", "CHAP"], &rows);
    out.push_str("\nLogical units\n");
    let mut rows = Vec::new();
    for t in &s.targets {
        for l in &t.luns {
            let res = match &l.pr.reservation {
                None => "-".to_string(),
                Some(r) => match &r.holder {
                    Some(h) => format!("{} by {h}", r.pr_type),
                    None => format!("{} (all registrants)", r.pr_type),
                },
            };
            rows.push(vec![
                t.name.clone(),
                l.lun.to_string(),
                human_size(l.size_bytes),
                l.block_size.to_string(),
                if l.read_only { "ro" } else { "rw" }.into(),
                format!(
                    "gen {}, {} reg{}{}",
                    l.pr.generation,
                    l.pr.registrations,
                    if l.pr.registrations == 1 { "" } else { "s" },
                    if l.pr.aptpl { ", APTPL" } else { "" }
                ),
                res,
                l.backing.clone(),
            ]);
        }
    }
    table(
        &mut out,
        &[
            "TARGET",
            "LUN",
            "SIZE",
            "BLOCK",
            "MODE",
            "PR",
            "RESERVATION",
            "BACKING",
        ],
        &rows,
    );
    out.push_str("\nSessions\n");
    if s.sessions.is_empty() {
        out.push_str("(none)\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .sessions
            .iter()
            .map(|x| {
                let p = &x.params;
                vec![
                    x.tsih.to_string(),
                    x.initiator.clone(),
                    x.isid.clone(),
                    x.target.clone().unwrap_or_else(|| "(discovery)".into()),
                    format!("{} (TPGT {})", x.portal.as_deref().unwrap_or("?"), x.tpgt),
                    age(x.age_secs),
                    format!(
                        "HD={} DD={} MRDSL={}/{} MBL={} FBL={} R2T={} ID={}",
                        if p.header_digest { "CRC32C" } else { "None" },
                        if p.data_digest { "CRC32C" } else { "None" },
                        p.max_recv_data_segment_length,
                        p.max_send_data_segment_length,
                        p.max_burst_length,
                        p.first_burst_length,
                        if p.initial_r2t { "Yes" } else { "No" },
                        if p.immediate_data { "Yes" } else { "No" },
                    ),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "TSIH",
                "INITIATOR",
                "ISID",
                "TARGET",
                "PORTAL",
                "AGE",
                "PARAMETERS",
            ],
            &rows,
        );
    }
    out.push_str("\nLimits\n");
    if let Some(m) = s.limits.as_object() {
        let rows: Vec<Vec<String>> = m
            .iter()
            .map(|(k, v)| vec![k.clone(), v.to_string()])
            .collect();
        table(&mut out, &["LIMIT", "VALUE"], &rows);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_defaults_to_the_data_dir() {
        let a = StatusArgs::try_parse_from(["keyfence status"]).unwrap();
        assert_eq!(
            a.socket.path(),
            PathBuf::from("keyfence-data/keyfence.sock")
        );
        let a = StatusArgs::try_parse_from(["keyfence status", "--data-dir", "/srv/kf"]).unwrap();
        assert_eq!(a.socket.path(), PathBuf::from("/srv/kf/keyfence.sock"));
        let a =
            StatusArgs::try_parse_from(["keyfence status", "--socket", "/run/k.sock", "--json"])
                .unwrap();
        assert_eq!(a.socket.path(), PathBuf::from("/run/k.sock"));
        assert!(a.json);
        assert!(StatusArgs::try_parse_from([
            "keyfence status",
            "--socket",
            "a",
            "--data-dir",
            "b"
        ])
        .is_err());
    }

    #[test]
    fn tables_align() {
        let mut out = String::new();
        table(
            &mut out,
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(out, "A    BB\nxxx  y\nz    w\n");
        assert_eq!(age(59), "59s");
        assert_eq!(age(61), "1m01s");
        assert_eq!(human_size(1 << 30), "1.0 GiB");
    }
}
