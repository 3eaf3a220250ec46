//! The agent's options: the fence-agents option table, getopt-style
//! command-line parsing and the fencer's `name=value` lines on stdin, and
//! the [`Action`] they select.

use std::path::PathBuf;
use std::time::Duration;

use super::key::KeyValue;

pub(super) const DEFAULT_STORE: &str = "/var/run/cluster/fence_keyfence";
pub(super) const DEFAULT_CMAPCTL: &str = "/usr/sbin/corosync-cmapctl";
pub(super) const DEFAULT_TIMEOUT_S: f64 = 10.0;

/// What the agent is asked to do (fence-agents action names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    On,
    Off,
    Reboot,
    Status,
    Monitor,
    List,
    ListStatus,
    ValidateAll,
    Metadata,
    Manpage,
    /// An action name the agent does not know (reported when run).
    Unknown(String),
}

impl Action {
    /// Parse an action name (case-insensitive).
    pub fn parse(s: &str) -> Action {
        match s.to_ascii_lowercase().as_str() {
            "on" => Action::On,
            "off" => Action::Off,
            "reboot" => Action::Reboot,
            "status" => Action::Status,
            "monitor" => Action::Monitor,
            "list" => Action::List,
            "list-status" => Action::ListStatus,
            "validate-all" => Action::ValidateAll,
            "metadata" => Action::Metadata,
            "manpage" => Action::Manpage,
            other => Action::Unknown(other.to_string()),
        }
    }

    /// The fence-agents name.
    pub fn name(&self) -> &str {
        match self {
            Action::On => "on",
            Action::Off => "off",
            Action::Reboot => "reboot",
            Action::Status => "status",
            Action::Monitor => "monitor",
            Action::List => "list",
            Action::ListStatus => "list-status",
            Action::ValidateAll => "validate-all",
            Action::Metadata => "metadata",
            Action::Manpage => "manpage",
            Action::Unknown(s) => s,
        }
    }

    /// True for the actions that need the key of a node.
    pub fn needs_key(&self) -> bool {
        matches!(
            self,
            Action::On | Action::Off | Action::Reboot | Action::Status
        )
    }
}

/// Everything the agent was told.
#[derive(Debug, Clone, PartialEq)]
pub struct Opts {
    pub action: Action,
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
            action: Action::Off,
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
pub(crate) const OPTIONS: &[(&str, Option<char>, bool, &str)] = &[
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
        "action" | "option" => o.action = Action::parse(&v()),
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
        "key-value" => {
            o.key_value = v()
                .parse()
                .map_err(|e: keyfence_fence::Error| e.to_string())?
        }
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
        assert_eq!(o.action, Action::On);
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
        assert_eq!(o.action, Action::Reboot);
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
    fn actions_are_parsed_once() {
        for a in [
            Action::On,
            Action::Off,
            Action::Reboot,
            Action::Status,
            Action::Monitor,
            Action::List,
            Action::ListStatus,
            Action::ValidateAll,
            Action::Metadata,
            Action::Manpage,
        ] {
            assert_eq!(Action::parse(a.name()), a);
        }
        assert_eq!(Action::parse("ReBoot"), Action::Reboot);
        assert_eq!(Action::parse("fly"), Action::Unknown("fly".into()));
        let o = parse_args(&s(&["-o", "STATUS"])).unwrap();
        assert_eq!(o.action, Action::Status);
    }
}
