//! Initiator ACLs and LUN masking at run time: who may log in to a
//! target, which CHAP credentials they must pass, and which LUNs they see
//! under which numbers, read-only or not.
//!
//! A target is either open (any initiator, every LUN, the target's CHAP)
//! or lists its initiators; see [`crate::config::AclConfig`] for how a
//! name is matched. The LU layer knows nothing of this: the session
//! translates the LUN numbers an initiator uses into the target's LUN ids
//! ([`LunView::resolve`]) and tells the LU when the nexus sees it
//! read-only and which LUNs REPORT LUNS lists.

use std::collections::BTreeMap;
use std::sync::Arc;

use keyfence_iscsi::Lun;
use keyfence_lu::TargetLuns;

use crate::config::{AclConfig, ChapConfig, TargetConfig};

/// The LUNs one initiator sees, when its ACL entry maps them.
#[derive(Debug)]
pub(crate) struct LunView {
    /// LUN number the initiator uses -> (target LUN id, read-only).
    map: BTreeMap<u64, (u64, bool)>,
    /// The numbers the initiator sees, for REPORT LUNS.
    list: TargetLuns,
}

impl LunView {
    fn new(acl: &AclConfig) -> Option<LunView> {
        let maps = acl.luns.as_ref()?;
        let map: BTreeMap<u64, (u64, bool)> = maps
            .iter()
            .map(|m| (u64::from(m.lun), (u64::from(m.target_lun()), m.read_only)))
            .collect();
        let list = TargetLuns::new(map.keys().copied().collect());
        Some(LunView { map, list })
    }

    /// No LUN at all (an initiator whose access was removed).
    pub fn empty() -> LunView {
        LunView {
            map: BTreeMap::new(),
            list: TargetLuns::new(Vec::new()),
        }
    }

    /// The target LUN id behind the number `n` the initiator uses, and
    /// whether the initiator may only read it.
    pub fn resolve(&self, n: u64) -> Option<(u64, bool)> {
        self.map.get(&n).copied()
    }

    /// The LUN numbers the initiator sees.
    pub fn luns(&self) -> &TargetLuns {
        &self.list
    }
}

/// The target LUN id a LUN field addresses, through `view` if the
/// session has one.
pub(crate) fn target_lun(view: Option<&LunView>, lun: Lun) -> Option<u64> {
    let n = u64::from(lun.number()?);
    match view {
        Some(v) => v.resolve(n).map(|(t, _)| t),
        None => Some(n),
    }
}

/// A target's access rules.
#[derive(Debug)]
pub(crate) struct AclTable {
    open: bool,
    /// The target's own CHAP, for open targets and entries without theirs.
    chap: Option<ChapConfig>,
    entries: Vec<(AclConfig, Option<Arc<LunView>>)>,
}

/// What an allowed initiator gets.
#[derive(Debug, Clone)]
pub(crate) struct Access<'a> {
    /// The CHAP the initiator must pass, if any.
    pub chap: Option<&'a ChapConfig>,
    /// Its LUN mapping; `None`: every LUN under its own id, read-write as
    /// configured.
    pub view: Option<Arc<LunView>>,
}

impl AclTable {
    pub fn new(t: &TargetConfig) -> AclTable {
        AclTable {
            open: t.open,
            chap: t.chap.clone(),
            entries: t
                .acls
                .iter()
                .map(|a| (a.clone(), LunView::new(a).map(Arc::new)))
                .collect(),
        }
    }

    /// An open target (any initiator, every LUN) with `chap`.
    pub fn open(chap: Option<ChapConfig>) -> AclTable {
        AclTable {
            open: true,
            chap,
            entries: Vec::new(),
        }
    }

    /// What `initiator` (any case) may do; `None`: it may not log in.
    pub fn access(&self, initiator: &str) -> Option<Access<'_>> {
        if self.open {
            return Some(Access {
                chap: self.chap.as_ref(),
                view: None,
            });
        }
        let (acl, view) = self
            .entries
            .iter()
            .filter_map(|e| e.0.matches(initiator).map(|r| (r, e)))
            .max_by_key(|(r, _)| *r)
            .map(|(_, e)| e)?;
        Some(Access {
            chap: acl.chap.as_ref().or(self.chap.as_ref()),
            view: view.clone(),
        })
    }

    /// Does any initiator have to pass CHAP here?
    pub fn any_chap(&self) -> bool {
        self.chap.is_some() || self.entries.iter().any(|(a, _)| a.chap.is_some())
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// How many initiator entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn views_resolve_and_chap_falls_back_to_the_target() {
        let c = Config::from_toml(
            "[[target]]\nname = \"iqn.2026-11.io.keyfence:x\"\nportals = [\"127.0.0.1:1\"]\n\
             [target.chap]\nuser = \"t\"\nsecret = \"target-secret-1\"\n\
             [[target.acl]]\ninitiator = \"iqn.2026-11.io.example:a\"\n\
             [[target.acl.lun]]\nlun = 7\ntarget_lun = 0\nread_only = true\n\
             [[target.acl]]\ninitiator = \"iqn.2026-11.io.example:b\"\n\
             [target.acl.chap]\nuser = \"b\"\nsecret = \"initiator-b-secret\"\n\
             [[target.lun]]\nid = 0\n",
            "c.toml",
        )
        .unwrap();
        let t = AclTable::new(&c.targets[0]);
        let a = t.access("IQN.2026-11.io.example:A").unwrap();
        assert_eq!(a.chap.unwrap().user, "t");
        let v = a.view.unwrap();
        assert_eq!(v.resolve(7), Some((0, true)));
        assert_eq!(v.resolve(0), None);
        assert_eq!(*v.luns().get(), vec![7]);
        assert_eq!(target_lun(Some(&v), Lun::from_number(7).unwrap()), Some(0));
        assert_eq!(target_lun(Some(&v), Lun::from_number(0).unwrap()), None);
        assert_eq!(target_lun(None, Lun::from_number(3).unwrap()), Some(3));
        let b = t.access("iqn.2026-11.io.example:b").unwrap();
        assert_eq!(b.chap.unwrap().user, "b");
        assert!(b.view.is_none());
        assert!(t.access("iqn.2026-11.io.example:c").is_none());
        assert!(!t.is_open());
        assert!(AclTable::open(None).access("anything").is_some());
    }
}
