//! Reservation keys: parsing, and deriving a node's key exactly as
//! fence_scsi does, so a cluster mixing fence_scsi and fence_keyfence
//! agrees on every node's key.
//!
//! fence_scsi builds the key as text and hands it to sg_persist, which reads
//! it as hex:
//! - `key_value=id` (its default): `"%.4s%.4d" % (md5hex(cluster_name),
//!   node_index)`: the first 4 hex digits of the MD5 of the cluster name,
//!   then the node's position in corosync's nodelist (the `N` of
//!   `nodelist.node.N.name`) as at least 4 *decimal* digits;
//! - `key_value=hash`: the first 4 hex digits of md5(cluster name), then the
//!   first 4 hex digits of md5(node name).
//!
//! The cluster name is `totem.cluster_name` from `corosync-cmapctl`.

use std::process::Command;
use std::time::Duration;

use md5::{Digest, Md5};

use crate::{Error, Result};

/// How a node's key is derived (fence_scsi's `key_value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyValue {
    Id,
    Hash,
}

impl std::str::FromStr for KeyValue {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "id" => Ok(KeyValue::Id),
            "hash" => Ok(KeyValue::Hash),
            _ => Err(Error::InvalidKey(format!(
                "key-value has to be 'id' or 'hash', not {s:?}"
            ))),
        }
    }
}

/// Parse a key given in hex (`0x` optional, at most 16 digits, not zero).
pub fn parse_key(s: &str) -> Result<u64> {
    match crate::config::parse_key(s.trim()) {
        None => Err(Error::InvalidKey(format!(
            "invalid key {s:?}: expected up to 16 hex digits (0x optional)"
        ))),
        Some(0) => Err(Error::InvalidKey("key cannot be 0".into())),
        Some(k) => Ok(k),
    }
}

fn md5_hex4(s: &str) -> String {
    let d = Md5::digest(s.as_bytes());
    hex::encode(&d[..2])
}

/// fence_scsi's `key_value=hash` key.
pub fn hash_key(cluster_name: &str, node_name: &str) -> u64 {
    let text = format!("{}{}", md5_hex4(cluster_name), md5_hex4(node_name));
    // 8 hex digits always fit.
    u64::from_str_radix(&text, 16).unwrap_or(0)
}

/// fence_scsi's `key_value=id` key (node index printed in decimal, read as
/// hex, like fence_scsi hands it to sg_persist).
pub fn id_key(cluster_name: &str, node_index: u32) -> Result<u64> {
    let text = format!("{}{:04}", md5_hex4(cluster_name), node_index);
    // md5 prefix (4) + up to 10 decimal digits = at most 14 hex digits.
    u64::from_str_radix(&text, 16).map_err(|e| Error::InvalidKey(format!("key {text}: {e}")))
}

/// `totem.cluster_name` from `corosync-cmapctl totem.cluster_name` output.
pub fn parse_cluster_name(cmap_output: &str) -> Option<String> {
    cmap_output.lines().find_map(|l| {
        let v = l.trim().strip_prefix("totem.cluster_name (str) = ")?;
        let v = v.trim();
        (!v.is_empty()).then(|| v.to_string())
    })
}

/// The nodelist position of `node` in `corosync-cmapctl nodelist` output:
/// the N of `nodelist.node.N.name (str) = node` (or, as fence_scsi falls
/// back to, of `nodelist.node.N.ringX_addr`).
pub fn parse_node_index(cmap_output: &str, node: &str) -> Option<u32> {
    let find = |suffix_ok: &dyn Fn(&str) -> bool| {
        cmap_output.lines().find_map(|l| {
            let (lhs, rhs) = l.trim().split_once(" (str) = ")?;
            if rhs.trim() != node {
                return None;
            }
            let rest = lhs.strip_prefix("nodelist.node.")?;
            let (idx, field) = rest.split_once('.')?;
            suffix_ok(field).then(|| idx.parse::<u32>().ok()).flatten()
        })
    };
    find(&|f| f == "name").or_else(|| {
        find(&|f| {
            f.strip_prefix("ring")
                .and_then(|r| r.strip_suffix("_addr"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    })
}

/// Run corosync-cmapctl with `arg`, bounded by `timeout`.
pub fn cmapctl(path: &str, arg: &str, timeout: Duration) -> Result<String> {
    let mut child = Command::new(path)
        .arg(arg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| Error::Cmapctl(format!("cannot run {path}: {e}")))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Cmapctl(format!(
                    "{path} {arg}: timed out after {timeout:?}"
                )));
            }
            Err(e) => return Err(Error::Cmapctl(format!("{path}: {e}"))),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Cmapctl(format!("{path}: {e}")))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_fence_scsi() {
        // Values computed with fence_scsi's own formulas (Python hashlib):
        // md5("mycluster")[:4] = 6c9d, md5("node1")[:4] = 1645.
        assert_eq!(hash_key("mycluster", "node1"), 0x6c9d_1645);
        assert_eq!(id_key("mycluster", 2).unwrap(), 0x6c9d_0002);
        assert_eq!(id_key("mycluster", 12345).unwrap(), 0x6c9d_12345);
    }

    #[test]
    fn parses_keys() {
        assert_eq!(parse_key("0xAbC").unwrap(), 0xabc);
        assert_eq!(parse_key("123").unwrap(), 0x123);
        assert!(parse_key("0").is_err());
        assert!(parse_key("0x").is_err());
        assert!(parse_key("12345678901234567").is_err());
        assert!(parse_key("xyz").is_err());
        assert!("hash".parse::<KeyValue>().is_ok());
        assert!("name".parse::<KeyValue>().is_err());
    }

    #[test]
    fn parses_cmapctl_output() {
        let nl = "nodelist.local_node_pos (u32) = 0\n\
                  nodelist.node.0.name (str) = alpha\n\
                  nodelist.node.0.nodeid (u32) = 1\n\
                  nodelist.node.0.ring0_addr (str) = 10.0.0.1\n\
                  nodelist.node.1.name (str) = beta\n\
                  nodelist.node.2.ring0_addr (str) = gamma\n";
        assert_eq!(parse_node_index(nl, "alpha"), Some(0));
        assert_eq!(parse_node_index(nl, "beta"), Some(1));
        assert_eq!(parse_node_index(nl, "gamma"), Some(2));
        assert_eq!(parse_node_index(nl, "10.0.0.1"), Some(0));
        assert_eq!(parse_node_index(nl, "delta"), None);
        assert_eq!(
            parse_cluster_name("totem.cluster_name (str) = prod\n").as_deref(),
            Some("prod")
        );
        assert_eq!(parse_cluster_name("Can't get key\n"), None);
    }
}
