//! `fence_keyfence`: a fence agent for Pacemaker (stonith), speaking the
//! fence-agents protocol like fence_scsi and fence_mpath.
//!
//! Options come from the command line (`-o off -n node2 -d URL,...`) or,
//! when there are no arguments, as `name=value` lines on stdin (what
//! Pacemaker's fencer sends: `action=`, `plug=`/`port=`, `nodename=`,
//! `devices=`, `key=`, ...). Exit status: 0 success (status: on), 1 failure,
//! 2 status off.
//!
//! - `on` (automatic unfencing on the node itself): register this node's key
//!   on every path of every device from the agent's own initiator port and
//!   create a Write Exclusive – Registrants Only reservation where none
//!   exists. Succeeds when every device did.
//! - `off` (`reboot` is the same: storage fencing cannot power-cycle): with
//!   this node's registered key, PREEMPT AND ABORT the victim's key on every
//!   device in parallel, then verify that the victim's key is gone and a
//!   reservation exists (creating it when none does). Succeeds when a
//!   majority of the devices confirm.
//! - `status`: `Status: ON` (exit 0) while the key is registered on a device,
//!   `Status: OFF` (exit 2) when it is registered nowhere that answered.
//! - `monitor`: a majority of the devices answer READ KEYS.
//! - `list`: the keys registered on the devices.
//! - `validate-all`, `metadata`, `manpage`.
//!
//! The agent logs in as its own initiator port (see [`super::Role::Agent`]),
//! finds this node's key as the key registered for that port (READ FULL
//! STATUS), and never re-registers during `off`: a node that has itself been
//! fenced cannot fence back.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use keyfence_initiator::{Device, Error, PrType, RegisterOptions, SenseKey, TransportId};

use super::key::{self, KeyValue};
use super::{connect, connect_any, fmt_key, FenceDevice, Role};

const DEFAULT_STORE: &str = "/var/run/cluster/fence_keyfence";
const DEFAULT_CMAPCTL: &str = "/usr/sbin/corosync-cmapctl";
const DEFAULT_TIMEOUT_S: f64 = 10.0;
/// The reservation type fencing relies on.
pub const FENCE_TYPE: PrType = PrType::WriteExclusiveRegistrantsOnly;

/// Everything the agent was told.
#[derive(Debug, Clone, PartialEq)]
pub struct Opts {
    pub action: String,
    pub plug: Option<String>,
    pub nodename: Option<String>,
    pub devices: Option<String>,
    pub key: Option<String>,
    pub initiator_name: Option<String>,
    pub timeout: Duration,
    pub verbose: u8,
    pub quiet: bool,
    pub key_value: KeyValue,
    pub cluster_name: Option<String>,
    pub cmap_path: String,
    pub config: Option<PathBuf>,
    pub store_path: PathBuf,
    pub aptpl: bool,
    pub delay: Duration,
    pub help: bool,
    pub version: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            action: "off".into(),
            plug: None,
            nodename: None,
            devices: None,
            key: None,
            initiator_name: None,
            timeout: Duration::from_secs_f64(DEFAULT_TIMEOUT_S),
            verbose: 0,
            quiet: false,
            key_value: KeyValue::Id,
            cluster_name: None,
            cmap_path: DEFAULT_CMAPCTL.into(),
            config: None,
            store_path: PathBuf::from(DEFAULT_STORE),
            aptpl: false,
            delay: Duration::ZERO,
            help: false,
            version: false,
        }
    }
}

/// (long name, short letter, takes a value, metadata description)
const OPTIONS: &[(&str, Option<char>, bool, &str)] = &[
    ("action", Some('o'), true, "Fencing action (on, off, reboot, status, monitor, list, validate-all, metadata)"),
    ("plug", Some('n'), true, "Name of the node to be fenced; its key is derived from it unless key is given"),
    ("port", None, true, "Obsolete name of plug"),
    ("nodename", None, true, "Name of the node (Pacemaker passes the target node); same as plug"),
    ("devices", Some('d'), true, "Comma-separated iSCSI URLs (iscsi://host[:port]/iqn/lun) or multipath map names from the keyfence configuration"),
    ("key", Some('k'), true, "Key (hex) of the node to fence (off, status) or of this node (on)"),
    ("initiator-name", None, true, "iSCSI initiator name of this node (default: environment, /etc/iscsi/initiatorname.iscsi, host name)"),
    ("timeout", Some('t'), true, "Seconds allowed for each device login and each command"),
    ("power-timeout", None, true, "Same as timeout"),
    ("key-value", None, true, "How keys are derived from node names: id (corosync nodelist position) or hash, as fence_scsi"),
    ("cluster-name", None, true, "Cluster name for key derivation (default: totem.cluster_name from corosync-cmapctl)"),
    ("corosync-cmap-path", None, true, "Path to corosync-cmapctl"),
    ("config", None, true, "keyfence configuration file with the multipath maps"),
    ("store-path", None, true, "Where on remembers this node's key and devices (.key and .dev appended)"),
    ("aptpl", Some('a'), false, "Use the APTPL flag for registrations (on)"),
    ("delay", None, true, "Wait this many seconds before fencing"),
    ("verbose", Some('v'), false, "Verbose mode"),
    ("quiet", Some('q'), false, "Disable logging to stderr"),
    ("help", Some('h'), false, "Display help and exit"),
    ("version", Some('V'), false, "Display version information and exit"),
];

fn set(o: &mut Opts, name: &str, value: Option<&str>) -> Result<(), String> {
    let v = || value.map(str::to_string).unwrap_or_default();
    let secs = |s: &str| -> Result<Duration, String> {
        let f: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{name}: expected seconds, got {s:?}"))?;
        if !(0.0..=86_400.0).contains(&f) {
            return Err(format!("{name}: {s} is out of range"));
        }
        Ok(Duration::from_secs_f64(f))
    };
    match name {
        "action" | "option" => o.action = v().to_ascii_lowercase(),
        "plug" | "port" => o.plug = Some(v()),
        "nodename" => o.nodename = Some(v()),
        "devices" => o.devices = Some(v()),
        "key" => o.key = Some(v()),
        "initiator-name" => o.initiator_name = Some(v()),
        "timeout" | "power-timeout" => {
            let t = secs(&v())?;
            if t.is_zero() {
                return Err(format!("{name} must be more than 0"));
            }
            o.timeout = t;
        }
        "key-value" => o.key_value = v().parse()?,
        "cluster-name" => o.cluster_name = Some(v()),
        "corosync-cmap-path" => o.cmap_path = v(),
        "config" => o.config = Some(PathBuf::from(v())),
        "store-path" => o.store_path = PathBuf::from(v()),
        "aptpl" => o.aptpl = flag_value(value),
        "delay" => o.delay = secs(&v())?,
        "verbose" => {
            if flag_value(value) {
                o.verbose = o.verbose.saturating_add(1)
            }
        }
        "quiet" => o.quiet = flag_value(value),
        "help" => o.help = true,
        "version" => o.version = true,
        _ => return Err(format!("unknown option {name:?}")),
    }
    Ok(())
}

/// A boolean given on stdin (`verbose=1`, `aptpl=yes`, bare `verbose`).
fn flag_value(v: Option<&str>) -> bool {
    !matches!(
        v.map(|s| s.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "no" | "false" | "off")
    )
}

/// Parse command-line arguments (getopt style: `-o off`, `-ooff`, `-vv`,
/// `--action off`, `--action=off`).
pub fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let name = name.replace('_', "-");
            let Some(&(lname, _, takes, _)) = OPTIONS.iter().find(|o| o.0 == name) else {
                return Err(format!("unknown option --{name}"));
            };
            if takes {
                let val = match inline {
                    Some(v) => v,
                    None => {
                        let v = args
                            .get(i)
                            .ok_or_else(|| format!("--{lname} needs a value"))?;
                        i += 1;
                        v.clone()
                    }
                };
                set(&mut o, lname, Some(&val))?;
            } else if inline.is_some() {
                return Err(format!("--{lname} takes no value"));
            } else {
                set(&mut o, lname, None)?;
            }
        } else if let Some(shorts) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
            let chars: Vec<char> = shorts.chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                j += 1;
                let Some(&(lname, _, takes, _)) = OPTIONS.iter().find(|o| o.1 == Some(c)) else {
                    return Err(format!("unknown option -{c}"));
                };
                if takes {
                    let val: String = if j < chars.len() {
                        let v = chars[j..].iter().collect();
                        j = chars.len();
                        v
                    } else {
                        let v = args.get(i).ok_or_else(|| format!("-{c} needs a value"))?;
                        i += 1;
                        v.clone()
                    };
                    set(&mut o, lname, Some(&val))?;
                } else {
                    set(&mut o, lname, None)?;
                }
            }
        } else {
            return Err(format!("unexpected argument {a:?}"));
        }
    }
    Ok(o)
}

/// Parse `name=value` lines as the fencer sends them on stdin. Unknown
/// names are reported in `warnings` and otherwise ignored (as fence-agents
/// do: the fencer passes every resource parameter).
pub fn parse_stdin(text: &str, warnings: &mut Vec<String>) -> Result<Opts, String> {
    let mut o = Opts::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = match line.split_once('=') {
            Some((a, b)) => (a.trim(), Some(b.trim())),
            None => (line, None),
        };
        let name = name.replace('_', "-");
        let known = OPTIONS.iter().find(|o| o.0 == name);
        match known {
            Some(&(lname, _, takes, _)) => {
                if takes && value.is_none() {
                    return Err(format!("stdin line {}: {lname} needs a value", n + 1));
                }
                set(&mut o, lname, value).map_err(|e| format!("stdin line {}: {e}", n + 1))?;
            }
            None if name == "option" => set(&mut o, "action", value)?,
            None => warnings.push(format!("Parse error: Ignoring unknown option '{line}'")),
        }
    }
    Ok(o)
}

struct Log {
    verbose: u8,
    quiet: bool,
}

impl Log {
    fn info(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }
    fn debug(&self, msg: &str) {
        if self.verbose > 0 {
            eprintln!("{msg}");
        }
    }
}

pub fn run(args: &[OsString]) -> ExitCode {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let parsed = if args.is_empty() {
        let mut text = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut text) {
            eprintln!("Failed: cannot read options from stdin: {e}");
            return ExitCode::from(1);
        }
        let mut warnings = Vec::new();
        let r = parse_stdin(&text, &mut warnings);
        for w in warnings {
            eprintln!("{w}");
        }
        r
    } else {
        parse_args(&args)
    };
    let o = match parsed {
        Ok(o) => o,
        Err(e) => {
            eprintln!("Failed: {e}");
            return ExitCode::from(1);
        }
    };
    if o.help {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    }
    if o.version {
        println!("fence_keyfence (keyfence {})", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    ExitCode::from(execute(&o))
}

fn usage() -> String {
    let mut s = String::from(
        "Usage: fence_keyfence [options]   (or options as name=value lines on stdin)\n\
         Fence agent for SCSI-3 persistent reservations on iSCSI LUNs.\nOptions:\n",
    );
    for (name, short, takes, desc) in OPTIONS {
        let head = match (short, takes) {
            (Some(c), true) => format!("  -{c}, --{name}=VALUE"),
            (Some(c), false) => format!("  -{c}, --{name}"),
            (None, true) => format!("      --{name}=VALUE"),
            (None, false) => format!("      --{name}"),
        };
        s.push_str(&format!("{head:<34} {desc}\n"));
    }
    s.push_str("Exit status: 0 success (status: on), 1 failure, 2 status off.\n");
    s
}

/// The XML Pacemaker reads (`-o metadata`).
pub fn metadata() -> String {
    let mut s = String::new();
    s.push_str("<?xml version=\"1.0\" ?>\n");
    s.push_str("<resource-agent name=\"fence_keyfence\" shortdesc=\"Fence agent for SCSI-3 persistent reservations on iSCSI LUNs (keyfence)\" >\n");
    s.push_str("<longdesc>fence_keyfence is an I/O fencing agent that uses SCSI-3 persistent reservations on iSCSI logical units, reached by its own iSCSI initiator. Every node registers its key (derived from the cluster and node names like fence_scsi, or given) on every device and one node creates a \"write exclusive, registrants only\" reservation, so only registered nodes may write. Fencing a node removes its key with PREEMPT AND ABORT, which also aborts its outstanding commands; it succeeds when a majority of the devices confirm. Unfencing (on) runs automatically on the node itself.</longdesc>\n");
    s.push_str("<vendor-url>https://github.com/keyfence/keyfence</vendor-url>\n<parameters>\n");
    for (name, short, takes, desc) in OPTIONS {
        let pname = name.replace('-', "_");
        let required = matches!(*name, "action" | "plug");
        let mixed = match (short, takes) {
            (Some(c), true) => format!("-{c}, --{name}=[{pname}]"),
            (Some(c), false) => format!("-{c}, --{name}"),
            (None, true) => format!("--{name}=[{pname}]"),
            (None, false) => format!("--{name}"),
        };
        let extra = match *name {
            "port" => " deprecated=\"1\"",
            "plug" => " obsoletes=\"port\"",
            _ => "",
        };
        let content = match *name {
            "action" => "<content type=\"string\" default=\"off\" />".to_string(),
            "key-value" => "<content type=\"select\" default=\"id\"><option value=\"id\" /><option value=\"hash\" /></content>".to_string(),
            "timeout" | "power-timeout" => format!("<content type=\"second\" default=\"{DEFAULT_TIMEOUT_S}\" />"),
            "delay" => "<content type=\"second\" default=\"0\" />".to_string(),
            "corosync-cmap-path" => format!("<content type=\"string\" default=\"{DEFAULT_CMAPCTL}\" />"),
            "store-path" => format!("<content type=\"string\" default=\"{DEFAULT_STORE}\" />"),
            _ if !takes => "<content type=\"boolean\" />".to_string(),
            _ => "<content type=\"string\" />".to_string(),
        };
        s.push_str(&format!(
            "\t<parameter name=\"{pname}\" unique=\"0\" required=\"{}\"{extra}>\n\t\t<getopt mixed=\"{}\" />\n\t\t{content}\n\t\t<shortdesc lang=\"en\">{}</shortdesc>\n\t</parameter>\n",
            u8::from(required),
            xml_escape(&mixed),
            xml_escape(desc)
        ));
    }
    s.push_str("</parameters>\n<actions>\n");
    s.push_str("\t<action name=\"on\" on_target=\"1\" automatic=\"1\"/>\n");
    for a in [
        "off",
        "reboot",
        "status",
        "list",
        "monitor",
        "metadata",
        "manpage",
        "validate-all",
    ] {
        s.push_str(&format!("\t<action name=\"{a}\" />\n"));
    }
    s.push_str("</actions>\n</resource-agent>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The key the action is about: explicit; or a plug that is itself a key
/// (`pcmk_host_map="node1:0x1001;node2:0x1002"`, as with fence_mpath);
/// or derived from the node name (nodename, else plug, as fence_scsi).
fn target_key(o: &Opts) -> Result<u64, String> {
    if let Some(k) = o.key.as_deref().filter(|k| !k.trim().is_empty()) {
        return key::parse_key(k);
    }
    if let Some(p) = o.plug.as_deref().map(str::trim) {
        if p.starts_with("0x") || p.starts_with("0X") {
            return key::parse_key(p);
        }
    }
    let node = o
        .nodename
        .as_deref()
        .filter(|p| !p.is_empty())
        .or(o.plug.as_deref().filter(|p| !p.is_empty()))
        .ok_or("nodename or key is required")?;
    let t = o.timeout;
    let cluster = match &o.cluster_name {
        Some(c) => c.clone(),
        None => {
            let out = key::cmapctl(&o.cmap_path, "totem.cluster_name", t)?;
            key::parse_cluster_name(&out).ok_or("cannot get cluster name")?
        }
    };
    match o.key_value {
        KeyValue::Hash => Ok(key::hash_key(&cluster, node)),
        KeyValue::Id => {
            let out = key::cmapctl(&o.cmap_path, "nodelist", t)?;
            let idx = key::parse_node_index(&out, node).ok_or_else(|| {
                format!("unable to parse output of corosync-cmapctl or node {node} does not exist")
            })?;
            key::id_key(&cluster, idx)
        }
    }
}

/// Devices: given, or those `on` remembered in the store.
fn devices(o: &Opts) -> Result<Vec<FenceDevice>, String> {
    let list = match o.devices.as_deref().filter(|d| !d.trim().is_empty()) {
        Some(d) => d.to_string(),
        None => {
            let p = store_file(&o.store_path, "dev");
            let t = std::fs::read_to_string(&p)
                .map_err(|e| format!("no devices given and cannot read {}: {e}", p.display()))?;
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    super::resolve_devices(&list, o.config.as_deref())
}

pub fn store_file(store: &std::path::Path, ext: &str) -> PathBuf {
    let mut s = store.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Run the action; returns the exit status.
pub fn execute(o: &Opts) -> u8 {
    let log = Log {
        verbose: o.verbose,
        quiet: o.quiet,
    };
    let action = o.action.as_str();
    match action {
        "metadata" => {
            print!("{}", metadata());
            return 0;
        }
        "manpage" => {
            print!("{}", usage());
            return 0;
        }
        "on" | "off" | "reboot" | "status" | "monitor" | "list" | "list-status"
        | "validate-all" => {}
        other => {
            eprintln!("Failed: unrecognised action '{other}'");
            return 1;
        }
    }
    let devs = match devices(o) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("Failed: {e}");
            return 1;
        }
    };
    let name = match super::initiator_name(o.initiator_name.as_deref()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("Failed: {e}");
            return 1;
        }
    };
    if action == "validate-all" {
        if o.key.is_none()
            && o.plug.as_deref().is_none_or(str::is_empty)
            && o.nodename.as_deref().is_none_or(str::is_empty)
        {
            eprintln!("Failed: nodename or key is required");
            return 1;
        }
        if let Some(k) = &o.key {
            if let Err(e) = key::parse_key(k) {
                eprintln!("Failed: {e}");
                return 1;
            }
        }
        return 0;
    }
    let needs_key = matches!(action, "on" | "off" | "reboot" | "status");
    let key = if needs_key {
        match target_key(o) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("Failed: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    let rt = match super::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Failed: {e}");
            return 1;
        }
    };
    log.debug(&format!(
        "fence_keyfence: action {action}, initiator {name}, {} device(s), key {}",
        devs.len(),
        key.map(fmt_key).unwrap_or_else(|| "-".into())
    ));
    let ctx = Ctx {
        name,
        timeout: o.timeout,
        aptpl: o.aptpl,
    };
    match (action, key) {
        ("on", Some(k)) => {
            let rc = rt.block_on(action_on(&ctx, &devs, k, &log));
            if rc == 0 {
                remember(o, k, &devs, &log);
            }
            rc
        }
        ("off" | "reboot", Some(k)) => {
            if !o.delay.is_zero() {
                log.debug(&format!("delaying fencing by {:?}", o.delay));
                std::thread::sleep(o.delay);
            }
            let done = if action == "reboot" {
                "Success: Rebooted"
            } else {
                "Success: Powered OFF"
            };
            rt.block_on(action_off(&ctx, &devs, k, &log, done))
        }
        ("status", Some(k)) => rt.block_on(action_status(&ctx, &devs, k, &log)),
        ("monitor", _) => rt.block_on(action_monitor(&ctx, &devs, &log)),
        ("list" | "list-status", _) => rt.block_on(action_list(&ctx, &devs, &log)),
        _ => 1,
    }
}

/// Remember this node's key and devices for `check` and later runs.
fn remember(o: &Opts, k: u64, devs: &[FenceDevice], log: &Log) {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = o.store_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_synced(&store_file(&o.store_path, "key"), &format!("{k:x}\n"))?;
        let mut list = String::new();
        for d in devs {
            list.push_str(&d.name);
            list.push('\n');
        }
        write_synced(&store_file(&o.store_path, "dev"), &list)
    };
    if let Err(e) = write() {
        log.info(&format!(
            "warning: cannot remember key and devices under {}: {e}",
            o.store_path.display()
        ));
    }
}

fn write_synced(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = store_file(path, "tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

struct Ctx {
    name: String,
    timeout: Duration,
    aptpl: bool,
}

/// Outcome of one action on one device.
#[derive(Debug, Clone)]
struct DevResult {
    name: String,
    ok: bool,
    detail: String,
}

/// Run `job` on every device in parallel, each bounded by `deadline`.
async fn on_all<F, Fut>(devs: &[FenceDevice], deadline: Duration, job: F) -> Vec<DevResult>
where
    F: Fn(FenceDevice) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (i, d) in devs.iter().enumerate() {
        let fut = job(d.clone());
        set.spawn(async move { (i, tokio::time::timeout(deadline, fut).await) });
    }
    let mut out: Vec<Option<DevResult>> = vec![None; devs.len()];
    while let Some(r) = set.join_next().await {
        let Ok((i, r)) = r else { continue };
        let (ok, detail) = match r {
            Ok(Ok(d)) => (true, d),
            Ok(Err(e)) => (false, e),
            Err(_) => (false, format!("no answer within {deadline:?}")),
        };
        if let (Some(slot), Some(d)) = (out.get_mut(i), devs.get(i)) {
            *slot = Some(DevResult {
                name: d.name.clone(),
                ok,
                detail,
            });
        }
    }
    out.into_iter()
        .zip(devs)
        .map(|(r, d)| {
            r.unwrap_or_else(|| DevResult {
                name: d.name.clone(),
                ok: false,
                detail: "task failed".into(),
            })
        })
        .collect()
}

fn report(results: &[DevResult], log: &Log) -> usize {
    let mut ok = 0;
    for r in results {
        if r.ok {
            ok += 1;
            log.debug(&format!("{}: {}", r.name, r.detail));
        } else {
            log.info(&format!("{}: FAILED: {}", r.name, r.detail));
        }
    }
    ok
}

/// Deadline for a whole per-device job (login plus a few commands).
fn job_deadline(t: Duration) -> Duration {
    t.saturating_mul(4)
}

/// True for a target that does not implement a service action.
fn unsupported(e: &Error) -> bool {
    matches!(e, Error::CheckCondition(s) if s.key == SenseKey::IllegalRequest && s.asc == 0x24)
}

async fn action_on(ctx: &Ctx, devs: &[FenceDevice], k: u64, log: &Log) -> u8 {
    let (name, t, aptpl) = (ctx.name.clone(), ctx.timeout, ctx.aptpl);
    let results = on_all(devs, job_deadline(t), move |d| {
        let name = name.clone();
        async move { unfence_device(&d, &name, k, aptpl, t).await }
    })
    .await;
    let ok = report(&results, log);
    if ok == devs.len() {
        println!("Success: Powered ON");
        0
    } else {
        eprintln!("Failed: registered on {ok} of {} device(s)", devs.len());
        1
    }
}

/// Register `k` on every path of `dev`, then reserve unless reserved.
async fn unfence_device(
    dev: &FenceDevice,
    name: &str,
    k: u64,
    aptpl: bool,
    t: Duration,
) -> Result<String, String> {
    let opts = RegisterOptions {
        aptpl,
        ..RegisterOptions::default()
    };
    let mut first: Option<Device> = None;
    let mut errs = Vec::new();
    for p in &dev.paths {
        match connect(p, name, Role::Agent, t).await {
            Ok(d) => match d.register_and_ignore(k, &opts).await {
                Ok(()) => {
                    if first.is_none() {
                        first = Some(d);
                    }
                }
                Err(e) => errs.push(format!("{}: REGISTER: {e}", p.portal())),
            },
            Err(e) => errs.push(e),
        }
    }
    let Some(d) = first else {
        return Err(errs.join("; "));
    };
    if !errs.is_empty() {
        return Err(format!("some paths failed: {}", errs.join("; ")));
    }
    let keys = d.read_keys().await.map_err(|e| format!("READ KEYS: {e}"))?;
    if !keys.keys.contains(&k) {
        return Err(format!("key {} not registered after REGISTER", fmt_key(k)));
    }
    let res = d
        .read_reservation()
        .await
        .map_err(|e| format!("READ RESERVATION: {e}"))?;
    let detail = match res.reservation {
        Some(r) => format!(
            "registered {}; reservation held by {} (type {})",
            fmt_key(k),
            fmt_key(r.key),
            r.pr_type
        ),
        None => {
            match d.reserve(k, FENCE_TYPE).await {
                Ok(()) => {}
                // Another node reserved between our read and reserve.
                Err(Error::ReservationConflict) => {}
                Err(e) => return Err(format!("RESERVE: {e}")),
            }
            let r = d
                .read_reservation()
                .await
                .map_err(|e| format!("READ RESERVATION: {e}"))?;
            match r.reservation {
                Some(r) => format!(
                    "registered {}; reservation held by {}",
                    fmt_key(k),
                    fmt_key(r.key)
                ),
                None => return Err("no reservation after RESERVE".into()),
            }
        }
    };
    let _ = d.close().await;
    Ok(detail)
}

async fn action_off(ctx: &Ctx, devs: &[FenceDevice], victim: u64, log: &Log, done: &str) -> u8 {
    let (name, t) = (ctx.name.clone(), ctx.timeout);
    let results = on_all(devs, job_deadline(t), move |d| {
        let name = name.clone();
        async move { fence_device(&d, &name, victim, t).await }
    })
    .await;
    let ok = report(&results, log);
    if ok * 2 > devs.len() {
        println!("{done}");
        0
    } else {
        eprintln!(
            "Failed: fencing of key {} confirmed on {ok} of {} device(s), a majority is needed",
            fmt_key(victim),
            devs.len()
        );
        1
    }
}

/// The key registered for this session's own initiator port, if any.
pub async fn own_key(d: &Device) -> Result<Option<u64>, Error> {
    let me = TransportId::for_port(&d.session().initiator_port());
    let fs = d.read_full_status().await?;
    let exact = fs.descriptors.iter().find(|x| x.transport_id == me);
    Ok(exact.map(|x| x.key))
}

/// PREEMPT AND ABORT `victim` on `dev` with this node's key, then verify.
async fn fence_device(
    dev: &FenceDevice,
    name: &str,
    victim: u64,
    t: Duration,
) -> Result<String, String> {
    let d = connect_any(dev, name, Role::Agent, t).await?;
    let mine = own_key(&d)
        .await
        .map_err(|e| format!("READ FULL STATUS: {e}"))?
        .ok_or("this node is not registered on the device (unfence it with -o on first)")?;
    if mine == victim {
        return Err("keys cannot be same. You can not fence yourself.".into());
    }
    let keys = d.read_keys().await.map_err(|e| format!("READ KEYS: {e}"))?;
    let mut how = "was not registered";
    let mut preempted_at = None;
    if keys.keys.contains(&victim) {
        match d.preempt_and_abort(mine, victim, FENCE_TYPE).await {
            Ok(()) => {
                how = "preempted and aborted";
                preempted_at = Some(super::monotonic_ns());
            }
            Err(e) if unsupported(&e) => {
                d.preempt(mine, victim, FENCE_TYPE)
                    .await
                    .map_err(|e| format!("PREEMPT: {e}"))?;
                how = "preempted (PREEMPT AND ABORT unsupported)";
                preempted_at = Some(super::monotonic_ns());
            }
            Err(Error::ReservationConflict) => {
                return Err(format!(
                    "PREEMPT AND ABORT: RESERVATION CONFLICT (this node's key {} was removed?)",
                    fmt_key(mine)
                ))
            }
            Err(e) => return Err(format!("PREEMPT AND ABORT: {e}")),
        }
    }
    let keys = d.read_keys().await.map_err(|e| format!("READ KEYS: {e}"))?;
    if keys.keys.contains(&victim) {
        return Err(format!("key {} still registered", fmt_key(victim)));
    }
    let mut res = d
        .read_reservation()
        .await
        .map_err(|e| format!("READ RESERVATION: {e}"))?;
    if res.reservation.is_none() {
        // Without a reservation anybody may write: put it back.
        match d.reserve(mine, FENCE_TYPE).await {
            Ok(()) | Err(Error::ReservationConflict) => {}
            Err(e) => return Err(format!("RESERVE: {e}")),
        }
        res = d
            .read_reservation()
            .await
            .map_err(|e| format!("READ RESERVATION: {e}"))?;
    }
    let Some(r) = res.reservation else {
        return Err("no reservation exists on the device".into());
    };
    let _ = d.close().await;
    let at = preempted_at
        .map(|t| format!(" (completed at monotonic {t} ns)"))
        .unwrap_or_default();
    Ok(format!(
        "key {} {how}{at}; reservation held by {} (generation {})",
        fmt_key(victim),
        fmt_key(r.key),
        res.generation
    ))
}

async fn read_keys_on(dev: &FenceDevice, name: &str, t: Duration) -> Result<Vec<u64>, String> {
    let d = connect_any(dev, name, Role::Probe, t).await?;
    let k = d.read_keys().await.map_err(|e| format!("READ KEYS: {e}"));
    let _ = d.close().await;
    Ok(k?.keys)
}

async fn keys_everywhere(ctx: &Ctx, devs: &[FenceDevice]) -> Vec<(DevResult, Vec<u64>)> {
    let (name, t) = (ctx.name.clone(), ctx.timeout);
    let results = on_all(devs, job_deadline(t), move |d| {
        let name = name.clone();
        async move {
            read_keys_on(&d, &name, t)
                .await
                .map(|ks| ks.iter().map(|k| fmt_key(*k)).collect::<Vec<_>>().join(" "))
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| {
            let keys = if r.ok {
                r.detail
                    .split_whitespace()
                    .filter_map(|k| key::parse_key(k).ok())
                    .collect()
            } else {
                Vec::new()
            };
            (r, keys)
        })
        .collect()
}

async fn action_status(ctx: &Ctx, devs: &[FenceDevice], k: u64, log: &Log) -> u8 {
    let all = keys_everywhere(ctx, devs).await;
    let mut answered = 0;
    let mut on = 0;
    for (r, keys) in &all {
        if r.ok {
            answered += 1;
            if keys.contains(&k) {
                on += 1;
            }
            log.debug(&format!("{}: keys [{}]", r.name, r.detail));
        } else {
            log.info(&format!("{}: FAILED: {}", r.name, r.detail));
        }
    }
    if answered == 0 {
        eprintln!("Failed: no device answered");
        return 1;
    }
    if on > 0 {
        println!("Status: ON");
        0
    } else {
        println!("Status: OFF");
        2
    }
}

async fn action_monitor(ctx: &Ctx, devs: &[FenceDevice], log: &Log) -> u8 {
    let all = keys_everywhere(ctx, devs).await;
    let rs: Vec<DevResult> = all.into_iter().map(|(r, _)| r).collect();
    let ok = report(&rs, log);
    if ok * 2 > devs.len() {
        0
    } else {
        eprintln!(
            "Failed: {ok} of {} device(s) answered, a majority is needed to fence",
            devs.len()
        );
        1
    }
}

async fn action_list(ctx: &Ctx, devs: &[FenceDevice], log: &Log) -> u8 {
    let all = keys_everywhere(ctx, devs).await;
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut answered = 0;
    for (r, keys) in &all {
        if r.ok {
            answered += 1;
        } else {
            log.info(&format!("{}: FAILED: {}", r.name, r.detail));
        }
        for k in keys {
            *seen.entry(*k).or_default() += 1;
        }
    }
    if answered == 0 {
        eprintln!("Failed: no device answered");
        return 1;
    }
    for (k, n) in seen {
        println!(
            "{},registered on {n} of {} device(s)",
            fmt_key(k),
            devs.len()
        );
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_command_line_like_getopt() {
        let o = parse_args(&s(&[
            "-o",
            "on",
            "-nnode2",
            "--devices=iscsi://a/iqn.x:y/0",
            "-k",
            "0xab",
            "-vv",
            "--timeout",
            "2.5",
            "--key_value=hash",
            "--initiator-name",
            "iqn.2026-11.io.t:a",
        ]))
        .unwrap();
        assert_eq!(o.action, "on");
        assert_eq!(o.plug.as_deref(), Some("node2"));
        assert_eq!(o.devices.as_deref(), Some("iscsi://a/iqn.x:y/0"));
        assert_eq!(o.key.as_deref(), Some("0xab"));
        assert_eq!(o.verbose, 2);
        assert_eq!(o.timeout, Duration::from_millis(2500));
        assert_eq!(o.key_value, KeyValue::Hash);
        assert!(parse_args(&s(&["--bogus"])).is_err());
        assert!(parse_args(&s(&["-o"])).is_err());
        assert!(parse_args(&s(&["--timeout=0"])).is_err());
        assert!(parse_args(&s(&["--timeout=x"])).is_err());
        assert!(parse_args(&s(&["--verbose=1"])).is_err());
        assert!(parse_args(&s(&["stray"])).is_err());
    }

    #[test]
    fn parses_stdin_like_the_fencer_sends_it() {
        let mut w = Vec::new();
        let o = parse_stdin(
            "# from stonith-ng\naction=reboot\nport=node3\nnodename=node3\ndevices=iscsi://h/iqn.x:y/0\n\
             key_value=hash\ncluster_name=c1\nverbose=1\npcmk_host_map=a:1\nplug=node3\n",
            &mut w,
        )
        .unwrap();
        assert_eq!(o.action, "reboot");
        assert_eq!(o.plug.as_deref(), Some("node3"));
        assert_eq!(o.cluster_name.as_deref(), Some("c1"));
        assert_eq!(o.verbose, 1);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(parse_stdin("timeout=abc\n", &mut w).is_err());
        assert!(parse_stdin("key\n", &mut w).is_err());
        let o = parse_stdin("verbose=0\naptpl=yes\n", &mut w).unwrap();
        assert_eq!(o.verbose, 0);
        assert!(o.aptpl);
    }

    #[test]
    fn derives_key_from_cluster_and_node() {
        let o = Opts {
            plug: Some("node1".into()),
            cluster_name: Some("mycluster".into()),
            key_value: KeyValue::Hash,
            ..Opts::default()
        };
        assert_eq!(target_key(&o).unwrap(), 0x6c9d_1645);
        let o = Opts {
            key: Some("0x10".into()),
            ..o
        };
        assert_eq!(target_key(&o).unwrap(), 0x10);
        assert!(target_key(&Opts::default()).is_err());
        // pcmk_host_map can map node names straight to keys.
        let o = Opts {
            plug: Some("0x1001".into()),
            nodename: Some("node1".into()),
            ..Opts::default()
        };
        assert_eq!(target_key(&o).unwrap(), 0x1001);
        // Otherwise nodename wins over plug, as in fence_scsi.
        let o = Opts {
            plug: Some("other".into()),
            nodename: Some("node1".into()),
            cluster_name: Some("mycluster".into()),
            key_value: KeyValue::Hash,
            ..Opts::default()
        };
        assert_eq!(target_key(&o).unwrap(), 0x6c9d_1645);
    }

    #[test]
    fn metadata_declares_automatic_unfencing() {
        let m = metadata();
        assert!(m.contains("<action name=\"on\" on_target=\"1\" automatic=\"1\"/>"));
        assert!(m.contains("<parameter name=\"devices\""));
        assert!(
            m.contains("<parameter name=\"plug\" unique=\"0\" required=\"1\" obsoletes=\"port\">")
        );
        assert!(m.starts_with("<?xml"));
    }
}
