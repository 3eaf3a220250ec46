//! I_T nexus identity as SPC-4 and RFC 7143 define it for iSCSI.
//!
//! An iSCSI initiator port is named `<initiator name>,i,0x<ISID>` and a target
//! port `<target name>,t,0x<TPGT>`. Persistent reservations belong to the
//! nexus (the pair), not to a session: a new session with the same initiator
//! name and ISID through the same target port is the same nexus.

use std::fmt;
use std::sync::Arc;

/// An iSCSI initiator port: initiator name plus 48-bit ISID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InitiatorPort {
    /// iSCSI name, compared case-insensitively by normalising to lowercase.
    pub name: Arc<str>,
    /// Initiator session ID (lower 48 bits used).
    pub isid: u64,
}

impl InitiatorPort {
    pub fn new(name: &str, isid: u64) -> Self {
        InitiatorPort {
            name: Arc::from(name.to_ascii_lowercase()),
            isid: isid & 0xffff_ffff_ffff,
        }
    }

    /// The ISID as the 6 bytes that appear on the wire.
    pub fn isid_bytes(&self) -> [u8; 6] {
        let b = self.isid.to_be_bytes();
        [b[2], b[3], b[4], b[5], b[6], b[7]]
    }
}

impl fmt::Display for InitiatorPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},i,0x{:012x}", self.name, self.isid)
    }
}

/// A target port: the target name plus the target portal group tag, and the
/// relative target port identifier it is known by in VPD page 83h and in
/// READ FULL STATUS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetPort {
    pub name: Arc<str>,
    pub tpgt: u16,
    pub relative_id: u16,
}

impl TargetPort {
    pub fn new(name: &str, tpgt: u16, relative_id: u16) -> Self {
        TargetPort {
            name: Arc::from(name.to_ascii_lowercase()),
            tpgt,
            relative_id,
        }
    }
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},t,0x{:04x}", self.name, self.tpgt)
    }
}

/// An I_T nexus: one initiator port talking to one target port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nexus {
    pub initiator: InitiatorPort,
    pub target: TargetPort,
}

impl Nexus {
    pub fn new(initiator: InitiatorPort, target: TargetPort) -> Self {
        Nexus { initiator, target }
    }
}

impl fmt::Display for Nexus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.initiator, self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_rfc7143() {
        let i = InitiatorPort::new("iqn.2026-11.io.Example:node1", 0x23d0_0000_0001);
        assert_eq!(
            i.to_string(),
            "iqn.2026-11.io.example:node1,i,0x23d000000001"
        );
        assert_eq!(i.isid_bytes(), [0x23, 0xd0, 0, 0, 0, 1]);
        let t = TargetPort::new("iqn.2026-11.io.keyfence:default", 1, 1);
        assert_eq!(t.to_string(), "iqn.2026-11.io.keyfence:default,t,0x0001");
    }
}
