//! `keyfence pr show`: print the persistent-reservation state of logical
//! units, as a table or as JSON, from either of two places:
//!
//! * `--data-dir DIR`: the state a keyfence target persisted (APTPL) under
//!   its data directory. Reads files only; safe while the target serves.
//! * `--url iscsi://host[:port]/target/lun`: a running target, through
//!   PERSISTENT RESERVE IN (READ FULL STATUS, READ RESERVATION, REPORT
//!   CAPABILITIES); works with any SPC-4 target, not only keyfence.
//!
//! * `--cluster-config FILE` or `--etcd ENDPOINTS`: the committed state of
//!   every clustered LU in etcd (cluster mode, docs/cluster.md), with the
//!   revision, change count and committing gateway of each.
//!
//! All print the same view: PRgeneration, APTPL, the reservation (holder
//! key, type, scope) and every registration (key, initiator port
//! `name,i,0xISID`, relative target port, ALL_TG_PT, holder). A file
//! holds the PRgeneration of the last change; after a restart the target
//! reports zero until the next change (SPC-4: a power on sets it to zero).
//! Exit status: 0 shown, 1 the state could not be read, 2 bad arguments.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keyfence_initiator::{
    Capabilities, Device, FullStatus, IscsiUrl, Isid, PrType, ReadReservation, SessionConfig,
};
use keyfence_lu::reservation::{read_state_file, StateFile};
use keyfence_pr::PrState;
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "keyfence pr",
    about = "Inspect persistent reservation state (persisted files or a live target)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show registrations and the reservation of every persisted LU, or of
    /// the LU at --url.
    Show {
        /// The target's data directory (PR state lives in DIR/pr/).
        #[arg(long, value_name = "DIR", default_value = "keyfence-data")]
        data_dir: PathBuf,
        /// Ask a running target instead: iscsi://host[:port]/target-iqn/lun.
        #[arg(long, value_name = "URL", value_parser = parse_url, conflicts_with = "data_dir")]
        url: Option<IscsiUrl>,
        /// Initiator name to log in with (--url only; default: as the
        /// other keyfence tools resolve it).
        #[arg(long, value_name = "IQN", requires = "url")]
        initiator_name: Option<String>,
        /// ISID to log in with, 12 hex digits (--url only; default derived
        /// from initiator, portal and target).
        #[arg(long, value_name = "ISID", requires = "url")]
        isid: Option<Isid>,
        /// Seconds allowed for connecting and logging in (--url only).
        #[arg(long, value_name = "SECS", default_value_t = 10, requires = "url",
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
        /// Cluster mode: read every clustered LU's committed state from
        /// etcd instead.
        #[command(flatten)]
        etcd: crate::cluster_status::EtcdArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_url(s: &str) -> Result<IscsiUrl, String> {
    let url = IscsiUrl::parse(s).map_err(|e| e.to_string())?;
    url.target().map_err(|e| e.to_string())?;
    url.lun().map_err(|e| e.to_string())?;
    Ok(url)
}

/// The PR state of one LU as shown, whatever its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct LuView {
    /// The state file, or the URL asked.
    source: String,
    target: String,
    lun: u64,
    /// Version counter of the state file (file mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    store_version: Option<u64>,
    /// Where the committed state stands in etcd (cluster mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterView>,
    generation: u32,
    aptpl: bool,
    reservation: Option<ReservationView>,
    registrations: Vec<RegistrationView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct ClusterView {
    /// etcd mod revision of the LU's state record.
    revision: i64,
    /// Number of committed changes.
    seq: u64,
    /// The gateway that committed the last change.
    writer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct ReservationView {
    /// Holder's key, 0x + 16 hex digits (zero for all-registrants types,
    /// as READ RESERVATION reports it).
    key: String,
    /// WE, EA, WE_RO, EA_RO, WE_AR, EA_AR (or 0xN for a type this tool
    /// does not know).
    #[serde(rename = "type")]
    pr_type: String,
    type_code: u8,
    /// "LU" (the only scope SPC-4 keeps).
    scope: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct RegistrationView {
    key: String,
    /// `name,i,0xISID`.
    initiator_port: String,
    relative_target_port: u16,
    all_tg_pt: bool,
    /// This registration's I_T nexus is a reservation holder.
    holder: bool,
}

/// One entry of the output: a view, or why a state file was unreadable.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Shown {
    Lu(LuView),
    Unreadable { source: String, error: String },
}

pub fn run(args: &[OsString]) -> ExitCode {
    let cli: Cli = match crate::cli::parse("keyfence pr", args, 2) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let Cmd::Show {
        data_dir,
        url,
        initiator_name,
        isid,
        timeout,
        etcd,
        json,
    } = cli.cmd;
    if etcd.given() && url.is_some() {
        eprintln!("keyfence pr show: --url and --cluster-config/--etcd exclude each other");
        return ExitCode::from(2);
    }
    let shown = if etcd.given() {
        match crate::cluster_status::runtime().and_then(|rt| rt.block_on(read_cluster(&etcd))) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("keyfence pr show: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        match url {
            Some(url) => {
                let cfg = SessionConfig {
                    initiator_name,
                    isid,
                    login_timeout: Duration::from_secs(timeout),
                    ..SessionConfig::default()
                };
                match read_live(&url, &cfg) {
                    Ok(v) => vec![Shown::Lu(v)],
                    Err(e) => {
                        eprintln!("keyfence pr show: {}: {e}", url.to_url_string());
                        return ExitCode::from(1);
                    }
                }
            }
            None => match read_persisted(&data_dir) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("keyfence pr show: {e}");
                    return ExitCode::from(1);
                }
            },
        }
    };
    let failed = shown.iter().any(|s| matches!(s, Shown::Unreadable { .. }));
    if json {
        match serde_json::to_string_pretty(&shown) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("keyfence pr show: {e}");
                return ExitCode::from(1);
            }
        }
    } else if shown.is_empty() && etcd.given() {
        println!("no clustered LU has PR state in etcd yet");
    } else if shown.is_empty() {
        println!(
            "no persisted PR state under {} (APTPL never set, or cleared)",
            data_dir.join("pr").display()
        );
    } else {
        for s in &shown {
            print!("{}", table(s));
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

// ------------------------------------------------------------ files ---

fn read_persisted(data_dir: &Path) -> Result<Vec<Shown>, String> {
    Ok(state_files(data_dir)?
        .into_iter()
        .filter_map(|path| match read_state_file(&path) {
            Ok(Some(file)) => Some(Shown::Lu(view_of_file(&path, &file))),
            // Removed between listing and reading: APTPL was just cleared.
            Ok(None) => None,
            Err(e) => Some(Shown::Unreadable {
                source: path.display().to_string(),
                error: e.to_string(),
            }),
        })
        .collect())
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

fn key_text(key: u64) -> String {
    format!("0x{key:016x}")
}

fn type_text(code: u8) -> String {
    PrType::from_u8(code).map_or_else(|| format!("0x{code:x}"), |t| t.short_name().to_string())
}

fn scope_text(scope: u8) -> String {
    if scope == 0 {
        "LU".to_string()
    } else {
        format!("0x{scope:x}")
    }
}

// ---------------------------------------------------------- cluster ---

/// Every clustered LU's committed state, sorted by LU id.
async fn read_cluster(etcd: &crate::cluster_status::EtcdArgs) -> Result<Vec<Shown>, String> {
    let c = etcd.connect().await?;
    let mut ids = c.lus().await.map_err(|e| e.to_string())?;
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let source = format!("etcd {}", c.keys().state(&id));
        match c.read(&id).await {
            Ok(s) => {
                let (target, lun) = crate::cluster_status::split_lu_id(&id);
                let mut v = view_of_state(&s.state, source, target, lun);
                v.cluster = Some(ClusterView {
                    revision: s.revision,
                    seq: s.seq,
                    writer: s.writer.clone(),
                });
                out.push(Shown::Lu(v));
            }
            Err(e) if e.is_unavailable() => return Err(e.to_string()),
            Err(e) => out.push(Shown::Unreadable {
                source,
                error: e.to_string(),
            }),
        }
    }
    Ok(out)
}

fn view_of_file(path: &Path, file: &StateFile) -> LuView {
    let state = PrState::from(file.state.clone());
    let mut v = view_of_state(
        &state,
        path.display().to_string(),
        file.target.clone(),
        file.lun,
    );
    v.store_version = Some(file.version);
    v
}

fn view_of_state(state: &PrState, source: String, target: String, lun: u64) -> LuView {
    let reservation = state.reservation.as_ref().map(|r| {
        let key = r
            .holder
            .as_ref()
            .and_then(|h| state.registration(h))
            .map_or(0, |g| g.key);
        ReservationView {
            key: key_text(key),
            pr_type: r.pr_type.short_name().to_string(),
            type_code: r.pr_type.code(),
            scope: scope_text(0),
        }
    });
    LuView {
        source,
        target,
        lun,
        store_version: None,
        cluster: None,
        generation: state.generation,
        aptpl: state.aptpl,
        reservation,
        registrations: state
            .registrations
            .iter()
            .map(|g| RegistrationView {
                key: key_text(g.key),
                initiator_port: g.nexus.initiator.to_string(),
                relative_target_port: g.nexus.target.relative_id,
                all_tg_pt: g.all_tg_pt,
                holder: state.is_holder(&g.nexus),
            })
            .collect(),
    }
}

// ------------------------------------------------------------- live ---

/// How often READ FULL STATUS is repeated when the state changed while it
/// was being read.
const LIVE_READ_ATTEMPTS: usize = 3;

fn read_live(url: &IscsiUrl, cfg: &SessionConfig) -> Result<LuView, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async {
        let dev = Device::connect(url, cfg).await.map_err(|e| e.to_string())?;
        let res = read_live_on(&dev, url).await;
        // Best effort: the answer is already in hand.
        let _ = dev.close().await;
        res
    })
}

async fn read_live_on(dev: &Device, url: &IscsiUrl) -> Result<LuView, String> {
    let caps = dev
        .report_capabilities()
        .await
        .map_err(|e| format!("REPORT CAPABILITIES: {e}"))?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let full = dev
            .read_full_status()
            .await
            .map_err(|e| format!("READ FULL STATUS: {e}"))?;
        let resv = dev
            .read_reservation()
            .await
            .map_err(|e| format!("READ RESERVATION: {e}"))?;
        let again = dev
            .read_full_status()
            .await
            .map_err(|e| format!("READ FULL STATUS: {e}"))?;
        // RESERVE / RELEASE do not change the generation, so compare the
        // whole answer: equal reads around READ RESERVATION are one state.
        if again == full || attempt >= LIVE_READ_ATTEMPTS {
            return Ok(view_of_live(url, &caps, &again, &resv));
        }
    }
}

fn view_of_live(
    url: &IscsiUrl,
    caps: &Capabilities,
    full: &FullStatus,
    resv: &ReadReservation,
) -> LuView {
    LuView {
        source: url.to_url_string(),
        target: url.target().unwrap_or_default().to_string(),
        lun: u64::from(url.lun().unwrap_or(0)),
        store_version: None,
        cluster: None,
        generation: full.generation,
        aptpl: caps.ptpl_a,
        reservation: resv.reservation.map(|r| ReservationView {
            key: key_text(r.key),
            pr_type: type_text(r.pr_type),
            type_code: r.pr_type,
            scope: scope_text(r.scope),
        }),
        registrations: full
            .descriptors
            .iter()
            .map(|d| RegistrationView {
                key: key_text(d.key),
                initiator_port: d.transport_id.to_string(),
                relative_target_port: d.relative_target_port,
                all_tg_pt: d.all_tg_pt,
                holder: d.r_holder,
            })
            .collect(),
    }
}

// ------------------------------------------------------------ table ---

fn table(s: &Shown) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let v = match s {
        Shown::Lu(v) => v,
        Shown::Unreadable { source, error } => {
            let _ = writeln!(o, "{source}: UNREADABLE: {error}\n");
            return o;
        }
    };
    let _ = writeln!(o, "Target {}  LUN {}", v.target, v.lun);
    let _ = write!(
        o,
        "  PRgeneration 0x{:x}  APTPL {}",
        v.generation,
        if v.aptpl { "on" } else { "off" }
    );
    if let Some(ver) = v.store_version {
        let _ = write!(o, "  store version {ver}");
    }
    if let Some(c) = &v.cluster {
        let _ = write!(
            o,
            "  revision {} (change {}, by {})",
            c.revision, c.seq, c.writer
        );
    }
    let _ = writeln!(o, "  ({})", v.source);
    match &v.reservation {
        None => {
            let _ = writeln!(o, "  Reservation: none");
        }
        Some(r) => {
            let long = PrType::from_u8(r.type_code).map_or("unknown type", PrType::description);
            let holders: Vec<&RegistrationView> =
                v.registrations.iter().filter(|g| g.holder).collect();
            let who = match PrType::from_u8(r.type_code) {
                Some(t) if t.all_registrants() => {
                    "every registrant (all-registrants type)".to_string()
                }
                _ => match holders.as_slice() {
                    [h] => format!(
                        "{} via relative target port {}",
                        h.initiator_port, h.relative_target_port
                    ),
                    _ => format!("key {}", r.key),
                },
            };
            let _ = writeln!(
                o,
                "  Reservation: {long} ({}), {} scope, key {}, held by {who}",
                r.pr_type, r.scope, r.key
            );
        }
    }
    if v.registrations.is_empty() {
        let _ = writeln!(o, "  Registrations: none");
    } else {
        let width = v
            .registrations
            .iter()
            .map(|g| g.initiator_port.len())
            .max()
            .unwrap_or(0)
            .max("INITIATOR PORT".len());
        let _ = writeln!(
            o,
            "  {:<18}  {:<width$}  {:>8}  {:>9}  HOLDER",
            "KEY", "INITIATOR PORT", "REL PORT", "ALL_TG_PT"
        );
        for g in &v.registrations {
            let holder = match (&v.reservation, g.holder) {
                (Some(r), true) => r.pr_type.as_str(),
                _ => "",
            };
            let _ = writeln!(
                o,
                "  {:<18}  {:<width$}  {:>8}  {:>9}  {holder}",
                g.key,
                g.initiator_port,
                g.relative_target_port,
                if g.all_tg_pt { "yes" } else { "no" },
            );
        }
    }
    o.push('\n');
    o
}

/// The clap definition of this command (for manual pages and completions).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfence_initiator::{FullStatusDescriptor, ReservationDescriptor, TransportId};
    use keyfence_lu::reservation::{state_path, FileStore};
    use keyfence_pr::{PrStore, Registration, Reservation};
    use keyfence_scsi::{InitiatorPort, Nexus, TargetPort};

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

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
        assert!(PrState::from(f.state.clone()).durable_eq(&st));
        let v = view_of_file(&path, &f);
        assert_eq!(
            v.reservation,
            Some(ReservationView {
                key: "0x0000000000000abc".into(),
                pr_type: "WE".into(),
                type_code: 1,
                scope: "LU".into(),
            })
        );
        assert_eq!(
            v.registrations,
            vec![RegistrationView {
                key: "0x0000000000000abc".into(),
                initiator_port: "iqn.a,i,0x000000000001".into(),
                relative_target_port: 1,
                all_tg_pt: false,
                holder: true,
            }]
        );
        let t = table(&Shown::Lu(v));
        assert!(
            t.contains("Reservation: Write Exclusive (WE), LU scope, key 0x0000000000000abc, held by iqn.a,i,0x000000000001 via relative target port 1"),
            "{t}"
        );
        let mut a = args(&["show", "--data-dir"]);
        a.push(dir.path().as_os_str().to_owned());
        assert_eq!(run(&a), ExitCode::SUCCESS);
        std::fs::write(&path, b"{ not json").unwrap();
        assert_eq!(run(&a), ExitCode::from(1));
        assert_eq!(run(&args(&["show", "--bogus"])), ExitCode::from(2));
    }

    #[test]
    fn arguments_are_checked() {
        // URL without a LUN, URL and data dir together, ISID too long,
        // initiator name without --url: usage errors.
        for bad in [
            &[
                "show",
                "--url",
                "iscsi://127.0.0.1/iqn.2026-11.io.keyfence:t",
            ][..],
            &["show", "--url", "http://127.0.0.1/x/0"],
            &[
                "show",
                "--url",
                "iscsi://127.0.0.1/iqn.x:t/0",
                "--data-dir",
                "d",
            ],
            &[
                "show",
                "--url",
                "iscsi://127.0.0.1/iqn.x:t/0",
                "--isid",
                "0x1234567890123",
            ],
            &["show", "--initiator-name", "iqn.x:i"],
            &[
                "show",
                "--url",
                "iscsi://127.0.0.1/iqn.x:t/0",
                "--timeout",
                "0",
            ],
        ] {
            assert_eq!(run(&args(bad)), ExitCode::from(2), "{bad:?}");
        }
        // Nobody listens on port 1 of loopback: a runtime error.
        assert_eq!(
            run(&args(&[
                "show",
                "--url",
                "iscsi://127.0.0.1:1/iqn.x:t/0",
                "--initiator-name",
                "iqn.2026-11.io.keyfence.test:show"
            ])),
            ExitCode::from(1)
        );
    }

    #[test]
    fn live_view_from_pr_in_data() {
        let url = IscsiUrl::parse("iscsi://127.0.0.1:3260/iqn.2026-11.io.keyfence:t/2").unwrap();
        let caps = Capabilities {
            ptpl_a: true,
            ..Capabilities::default()
        };
        let d = |key, port: &str, rel, atp, holder| FullStatusDescriptor {
            key,
            all_tg_pt: atp,
            r_holder: holder,
            scope: 0,
            pr_type: if holder { 7 } else { 0 },
            relative_target_port: rel,
            transport_id: TransportId::parse_iscsi_text(port).unwrap(),
        };
        let full = FullStatus {
            generation: 9,
            descriptors: vec![
                d(0x11, "iqn.a,i,0x000000000001", 1, true, true),
                d(0x11, "iqn.a,i,0x000000000001", 2, true, true),
                d(0x22, "iqn.b,i,0x80000000000b", 2, false, true),
            ],
        };
        let resv = ReadReservation {
            generation: 9,
            reservation: Some(ReservationDescriptor {
                key: 0,
                scope: 0,
                pr_type: 7,
            }),
        };
        let v = view_of_live(&url, &caps, &full, &resv);
        assert_eq!((v.lun, v.generation, v.aptpl), (2, 9, true));
        assert_eq!(v.target, "iqn.2026-11.io.keyfence:t");
        assert_eq!(v.reservation.as_ref().unwrap().pr_type, "WE_AR");
        assert_eq!(v.registrations[2].initiator_port, "iqn.b,i,0x80000000000b");
        let t = table(&Shown::Lu(v));
        assert!(t.contains("held by every registrant"), "{t}");
        assert!(
            t.contains(
                "  0x0000000000000022  iqn.b,i,0x80000000000b         2         no  WE_AR\n"
            ),
            "{t}"
        );
    }
}
