//! keyfence's multipath map configuration (TOML):
//!
//! ```toml
//! initiator_name = "iqn.2026-11.io.keyfence.host:node1"   # optional
//!
//! [[multipath]]
//! name = "mpatha"
//! reservation_key = "0x123abc"      # or "file" (key kept in prkeys_file)
//! prkeys_file = "/etc/keyfence/prkeys"   # optional, default shown
//! paths = [
//!   "iscsi://10.0.0.1/iqn.2026-11.io.keyfence:disk/0",
//!   "iscsi://10.0.1.1/iqn.2026-11.io.keyfence:disk/0",
//! ]
//! ```
//!
//! Found at `--config FILE`, else `$KEYFENCE_CONFIG`, else
//! `/etc/keyfence/keyfence.toml` (a missing default file just means "no
//! maps"; a missing explicit file is an error).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

fn invalid(msg: impl Into<String>) -> Error {
    Error::Config {
        path: None,
        msg: msg.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub const DEFAULT_CONFIG: &str = "/etc/keyfence/keyfence.toml";
pub const ENV_CONFIG: &str = "KEYFENCE_CONFIG";
pub const DEFAULT_PRKEYS: &str = "/etc/keyfence/prkeys";

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub initiator_name: Option<String>,
    #[serde(default)]
    pub multipath: Vec<MapConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MapConfig {
    pub name: String,
    pub reservation_key: Option<String>,
    pub prkeys_file: Option<PathBuf>,
    pub paths: Vec<String>,
}

/// Where a map's reservation key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    None,
    Key(u64),
    /// `reservation_key = "file"`: the key lives in a prkeys file.
    File(PathBuf),
}

impl MapConfig {
    pub fn key_source(&self) -> Result<KeySource> {
        match self.reservation_key.as_deref().map(str::trim) {
            None | Some("") => Ok(KeySource::None),
            Some("file") => Ok(KeySource::File(
                self.prkeys_file
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_PRKEYS)),
            )),
            Some(k) => parse_key(k).map(KeySource::Key).ok_or_else(|| {
                invalid(format!("map {}: invalid reservation_key {k:?}", self.name))
            }),
        }
    }
}

/// A reservation key as multipath.conf writes it: hex, `0x` optional,
/// at most 16 digits, nothing else.
pub fn parse_key(s: &str) -> Option<u64> {
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if h.is_empty() || h.len() > 16 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(h, 16).ok()
}

impl Config {
    /// Parse and check a configuration: unique non-empty map names, at
    /// least one path per map, every path a valid iSCSI URL, every
    /// reservation key valid. Nothing invalid is skipped.
    pub fn parse(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text).map_err(|e| invalid(e.to_string().trim()))?;
        let mut seen = std::collections::HashSet::new();
        for m in &c.multipath {
            if m.name.is_empty() {
                return Err(invalid("a [[multipath]] entry has an empty name"));
            }
            if !seen.insert(m.name.as_str()) {
                return Err(invalid(format!("map {} is defined twice", m.name)));
            }
            if m.paths.is_empty() {
                return Err(invalid(format!("map {} has no paths", m.name)));
            }
            for p in &m.paths {
                keyfence_initiator::IscsiUrl::parse_full(p)
                    .map_err(|e| invalid(format!("map {}: path {p:?}: {e}", m.name)))?;
            }
            m.key_source()?;
        }
        Ok(c)
    }

    /// Load the configuration: explicit path, else the environment, else
    /// the default file (absent default = empty configuration).
    pub fn load(explicit: Option<&Path>) -> Result<Config> {
        let env = std::env::var_os(ENV_CONFIG).filter(|v| !v.is_empty());
        let (path, must_exist) = match (explicit, env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(e)) => (PathBuf::from(e), true),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(t) => Config::parse(&t).map_err(|e| match e {
                Error::Config { msg, .. } => Error::Config {
                    path: Some(path.clone()),
                    msg,
                },
                e => e,
            }),
            Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Config::default())
            }
            Err(e) => Err(io(&path)(e)),
        }
    }

    pub fn map(&self, name: &str) -> Option<&MapConfig> {
        self.multipath.iter().find(|m| m.name == name)
    }
}

/// Read the key stored for `map` in a prkeys file (lines `0xKEY NAME`,
/// `#` comments), as multipathd keeps them.
pub fn prkeys_lookup(file: &Path, map: &str) -> Result<Option<u64>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(file)(e)),
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        if let (Some(k), Some(n)) = (it.next(), it.next()) {
            if n == map {
                return parse_key(k).map(Some).ok_or_else(|| {
                    Error::InvalidKey(format!("{}: bad key {k:?} for {map}", file.display()))
                });
            }
        }
    }
    Ok(None)
}

/// Record (or with `None`, forget) the key for `map` in a prkeys file,
/// durably: written to a temporary file, fsynced, renamed over the old
/// one, directory fsynced.
pub fn prkeys_store(file: &Path, map: &str, key: Option<u64>) -> Result<()> {
    let err = |e: std::io::Error| io(file)(e);
    let old = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(err(e)),
    };
    let mut out = String::new();
    for line in old.lines() {
        let mut it = line.split_whitespace();
        let is_map = !line.trim_start().starts_with('#')
            && matches!((it.next(), it.next()), (Some(_), Some(n)) if n == map);
        if !is_map {
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some(k) = key {
        out.push_str(&format!("0x{k:016x} {map}\n"));
    }
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        file.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("prkeys"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(out.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, file).map_err(err)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
initiator_name = "iqn.2026-11.io.keyfence.host:n1"
[[multipath]]
name = "mpatha"
reservation_key = "0x123abc"
paths = ["iscsi://127.0.0.1:3260/iqn.2026-11.io.keyfence:d/0", "iscsi://127.0.0.1:3261/iqn.2026-11.io.keyfence:d/0"]

[[multipath]]
name = "mpathb"
reservation_key = "file"
prkeys_file = "/tmp/x"
paths = ["iscsi://127.0.0.1/iqn.2026-11.io.keyfence:e/1"]
"#;

    #[test]
    fn parses_maps() {
        let c = Config::parse(GOOD).unwrap();
        let a = c.map("mpatha").unwrap();
        assert_eq!(a.paths.len(), 2);
        assert_eq!(a.key_source().unwrap(), KeySource::Key(0x123abc));
        assert_eq!(
            c.map("mpathb").unwrap().key_source().unwrap(),
            KeySource::File(PathBuf::from("/tmp/x"))
        );
        assert!(c.map("nope").is_none());
    }

    #[test]
    fn rejects_bad_config() {
        assert!(Config::parse("[[multipath]]\nname=\"a\"\npaths=[]\n")
            .unwrap_err()
            .to_string()
            .contains("no paths"));
        assert!(Config::parse("[[multipath]]\nname=\"a\"\npaths=[\"http://x\"]\n").is_err());
        assert!(Config::parse(
            "[[multipath]]\nname=\"a\"\nreservation_key=\"zz\"\npaths=[\"iscsi://h/iqn.x:y/0\"]\n"
        )
        .unwrap_err()
        .to_string()
        .contains("invalid reservation_key"));
        assert!(Config::parse("bogus = 1\n").is_err());
        let dup = "[[multipath]]\nname=\"a\"\npaths=[\"iscsi://h/iqn.x:y/0\"]\n[[multipath]]\nname=\"a\"\npaths=[\"iscsi://h/iqn.x:y/0\"]\n";
        assert!(Config::parse(dup)
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }

    #[test]
    fn prkeys_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("prkeys");
        assert_eq!(prkeys_lookup(&f, "m").unwrap(), None);
        prkeys_store(&f, "m", Some(0xabc)).unwrap();
        prkeys_store(&f, "n", Some(0x1)).unwrap();
        assert_eq!(prkeys_lookup(&f, "m").unwrap(), Some(0xabc));
        prkeys_store(&f, "m", Some(0xdef)).unwrap();
        assert_eq!(prkeys_lookup(&f, "m").unwrap(), Some(0xdef));
        prkeys_store(&f, "m", None).unwrap();
        assert_eq!(prkeys_lookup(&f, "m").unwrap(), None);
        assert_eq!(prkeys_lookup(&f, "n").unwrap(), Some(1));
    }
}
