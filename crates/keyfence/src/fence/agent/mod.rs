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
//!
//! Layout: [`options`] (what the agent was told, and the [`Action`]),
//! [`metadata`] (help and Pacemaker metadata), [`actions`] (running an
//! action on the devices); the device operations are keyfence-fence's
//! [`keyfence_fence::ops`].

use std::ffi::OsString;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use super::key::{self, KeyValue};
use super::{fmt_key, FenceDevice};

pub mod actions;
pub mod metadata;
pub mod options;

use metadata::{metadata, usage};
pub use options::{parse_args, parse_stdin, Action, Opts};

/// Where the agent's per-device lines go: failures always (unless quiet),
/// details when verbose.
pub struct Log {
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

/// The key the action is about: explicit; or a plug that is itself a key
/// (`pcmk_host_map="node1:0x1001;node2:0x1002"`, as with fence_mpath);
/// or derived from the node name (nodename, else plug, as fence_scsi).
fn target_key(o: &Opts) -> Result<u64, String> {
    if let Some(k) = o.key.as_deref().filter(|k| !k.trim().is_empty()) {
        return key::parse_key(k).map_err(|e| e.to_string());
    }
    if let Some(p) = o.plug.as_deref().map(str::trim) {
        if p.starts_with("0x") || p.starts_with("0X") {
            return key::parse_key(p).map_err(|e| e.to_string());
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
            let out =
                key::cmapctl(&o.cmap_path, "totem.cluster_name", t).map_err(|e| e.to_string())?;
            key::parse_cluster_name(&out).ok_or("cannot get cluster name")?
        }
    };
    match o.key_value {
        KeyValue::Hash => Ok(key::hash_key(&cluster, node)),
        KeyValue::Id => {
            let out = key::cmapctl(&o.cmap_path, "nodelist", t).map_err(|e| e.to_string())?;
            let idx = key::parse_node_index(&out, node).ok_or_else(|| {
                format!("unable to parse output of corosync-cmapctl or node {node} does not exist")
            })?;
            key::id_key(&cluster, idx).map_err(|e| e.to_string())
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
    super::resolve_devices(&list, o.config.as_deref()).map_err(|e| e.to_string())
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
    let action = &o.action;
    match action {
        Action::Metadata => {
            print!("{}", metadata());
            return 0;
        }
        Action::Manpage => {
            print!("{}", usage());
            return 0;
        }
        Action::Unknown(other) => {
            eprintln!("Failed: unrecognised action '{other}'");
            return 1;
        }
        _ => {}
    }
    let devs = match devices(o) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("Failed: {e}");
            return 1;
        }
    };
    let name = match super::initiator_name(o.initiator_name.as_deref()).map_err(|e| e.to_string()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("Failed: {e}");
            return 1;
        }
    };
    if *action == Action::ValidateAll {
        if o.key.is_none()
            && o.plug.as_deref().is_none_or(str::is_empty)
            && o.nodename.as_deref().is_none_or(str::is_empty)
        {
            eprintln!("Failed: nodename or key is required");
            return 1;
        }
        if let Some(k) = &o.key {
            if let Err(e) = key::parse_key(k).map_err(|e| e.to_string()) {
                eprintln!("Failed: {e}");
                return 1;
            }
        }
        return 0;
    }
    let key = if action.needs_key() {
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
        "fence_keyfence: action {}, initiator {name}, {} device(s), key {}",
        action.name(),
        devs.len(),
        key.map(fmt_key).unwrap_or_else(|| "-".into())
    ));
    let acc = actions::DeviceAccess {
        initiator_name: name,
        timeout: o.timeout,
        aptpl: o.aptpl,
    };
    match (action, key) {
        (Action::On, Some(k)) => {
            let rc = rt.block_on(actions::on(&acc, &devs, k, &log));
            if rc == 0 {
                remember(o, k, &devs, &log);
            }
            rc
        }
        (Action::Off | Action::Reboot, Some(k)) => {
            if !o.delay.is_zero() {
                log.debug(&format!("delaying fencing by {:?}", o.delay));
                std::thread::sleep(o.delay);
            }
            let done = if *action == Action::Reboot {
                "Success: Rebooted"
            } else {
                "Success: Powered OFF"
            };
            rt.block_on(actions::off(&acc, &devs, k, &log, done))
        }
        (Action::Status, Some(k)) => rt.block_on(actions::status(&acc, &devs, k, &log)),
        (Action::Monitor, _) => rt.block_on(actions::monitor(&acc, &devs, &log)),
        (Action::List | Action::ListStatus, _) => rt.block_on(actions::list(&acc, &devs, &log)),
        // Needs a key (computed above) or handled before.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
