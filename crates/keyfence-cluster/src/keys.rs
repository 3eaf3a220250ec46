//! The key layout under the configured prefix (see docs/cluster.md):
//!
//! ```text
//! <prefix>/lu/<lu>/state        the LU's committed PR state (record.rs)
//! <prefix>/gateways/<name>      a live gateway, under its lease
//! <prefix>/acks/<lu>/<name>     revision of <lu> applied by <name>, under its lease
//! <prefix>/departed/<name>/<lease>  the survivor that handles a departed
//!                               incarnation's nexus loss, under its lease
//! <prefix>/departed/<name>/<lease>/<lu>  that nexus loss is committed on
//!                               <lu>, under a lease of a day
//! <prefix>/locks/<lu>/caw/<name>  gateway <name> holds or waits for <lu>'s
//!                               COMPARE AND WRITE lock, under its lease
//! <prefix>/locks/<lu>/range     the LBA range the lock's holder compares
//!                               and writes, under its lease (range.rs)
//! <prefix>/locks/<lu>/range-acks/<name>  revision of that range <name>
//!                               holds back its writes for, under its lease
//! ```

use std::fmt;

use crate::Error;

/// Longest LU id and gateway name accepted.
pub const MAX_NAME: usize = 255;

/// The cluster-wide name of a logical unit: `<target IQN, lowercase>@lun<N>`
/// or any other name of printable ASCII without `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LuId(String);

impl LuId {
    pub fn new(id: &str) -> Result<LuId, Error> {
        let bad = |reason: &str| {
            Err(Error::BadLuId {
                id: id.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if id.is_empty() || id.len() > MAX_NAME {
            return bad("must be 1 to 255 characters");
        }
        if !id.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return bad("only printable ASCII without '/' and spaces");
        }
        Ok(LuId(id.to_owned()))
    }

    /// The id of LUN `lun` of `target` (iSCSI names compare case-insensitively).
    pub fn for_lun(target: &str, lun: u64) -> Result<LuId, Error> {
        LuId::new(&format!("{}@lun{lun}", target.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A gateway name: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn check_gateway_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("gateway name {name:?} must be 1 to 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "gateway name {name:?} may hold only A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Builds the keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// A prefix starts with `/`, does not end with one, and has no empty
    /// or dot components.
    pub fn check_prefix(p: &str) -> Result<(), String> {
        if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') || p.len() > 128 {
            return Err(format!("{p:?}: expected /name[/name...] (no trailing '/')"));
        }
        if p[1..].split('/').any(|c| {
            c.is_empty() || c == "." || c == ".." || !c.bytes().all(|b| b.is_ascii_graphic())
        }) {
            return Err(format!("{p:?}: empty, dot or non-printable component"));
        }
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn state(&self, lu: &LuId) -> String {
        format!("{}/lu/{lu}/state", self.prefix)
    }

    pub fn gateways(&self) -> String {
        format!("{}/gateways/", self.prefix)
    }

    /// The claim on the nexus-loss work of gateway `name`'s incarnation
    /// with lease `lease` (one survivor does it).
    pub fn departed(&self, name: &str, lease: i64) -> String {
        format!("{}/departed/{name}/{lease:x}", self.prefix)
    }

    /// The marker that the nexus loss of gateway `name`'s incarnation with
    /// lease `lease` has been committed on `lu` (`Cluster::commit_once`).
    pub fn departed_done(&self, name: &str, lease: i64, lu: &LuId) -> String {
        format!("{}/{lu}", self.departed(name, lease))
    }

    pub fn gateway(&self, name: &str) -> String {
        format!("{}{name}", self.gateways())
    }

    pub fn acks(&self, lu: &LuId) -> String {
        format!("{}/acks/{lu}/", self.prefix)
    }

    pub fn ack(&self, lu: &LuId, gateway: &str) -> String {
        format!("{}{gateway}", self.acks(lu))
    }

    /// The COMPARE AND WRITE lock line of `lu` (lock.rs).
    pub fn caw_locks(&self, lu: &LuId) -> String {
        format!("{}/locks/{lu}/caw/", self.prefix)
    }

    pub fn caw_lock(&self, lu: &LuId, gateway: &str) -> String {
        format!("{}{gateway}", self.caw_locks(lu))
    }

    /// The range the COMPARE AND WRITE lock's holder works on (range.rs).
    pub fn caw_range(&self, lu: &LuId) -> String {
        format!("{}/locks/{lu}/range", self.prefix)
    }

    /// The other gateways' acknowledgements of that range.
    pub fn caw_range_acks(&self, lu: &LuId) -> String {
        format!("{}/locks/{lu}/range-acks/", self.prefix)
    }

    pub fn caw_range_ack(&self, lu: &LuId, gateway: &str) -> String {
        format!("{}{gateway}", self.caw_range_acks(lu))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::new("/kf/test");
        let lu = LuId::for_lun("iqn.2026-11.IO.keyfence:T", 3).unwrap();
        assert_eq!(lu.as_str(), "iqn.2026-11.io.keyfence:t@lun3");
        assert_eq!(
            k.state(&lu),
            "/kf/test/lu/iqn.2026-11.io.keyfence:t@lun3/state"
        );
        assert_eq!(k.gateway("gw1"), "/kf/test/gateways/gw1");
        assert_eq!(
            k.ack(&lu, "gw1"),
            "/kf/test/acks/iqn.2026-11.io.keyfence:t@lun3/gw1"
        );
        assert!(k.ack(&lu, "gw1").starts_with(&k.acks(&lu)));
        // The range and its acks are outside the lock's line.
        assert!(!k.caw_range(&lu).starts_with(&k.caw_locks(&lu)));
        assert!(!k.caw_range_ack(&lu, "gw1").starts_with(&k.caw_locks(&lu)));
        assert!(k
            .caw_range_ack(&lu, "gw1")
            .starts_with(&k.caw_range_acks(&lu)));
    }

    #[test]
    fn bad_names() {
        assert!(LuId::new("").is_err());
        assert!(LuId::new("a/b").is_err());
        assert!(LuId::new("a b").is_err());
        assert!(LuId::new(&"x".repeat(256)).is_err());
        assert!(check_gateway_name("gw 1").is_err());
        assert!(check_gateway_name("gw-1.a_b").is_ok());
        assert!(Keys::check_prefix("/").is_err());
        assert!(Keys::check_prefix("/a//b").is_err());
        assert!(Keys::check_prefix("/a/../b").is_err());
        assert!(Keys::check_prefix("/keyfence/prod").is_ok());
    }
}
