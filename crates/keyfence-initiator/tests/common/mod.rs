//! Targets under test for the initiator's integration tests, from the
//! workspace test kit: Debian's tgtd and keyfence's server (in this
//! process), each on loopback with one file-backed LUN. tgtd must be
//! installed: without it the tgtd tests fail, saying how to install it.
#![allow(dead_code)]

use keyfence_initiator::IscsiUrl;
use keyfence_testkit::target::config::{ChapConfig, Limits, Secret};
use keyfence_testkit::{InProcessServer, ServerOptions, Tgtd, TgtdOptions};

pub const TGT_IQN: &str = "iqn.2026-11.io.keyfence:initiator-test";
pub const KEYFENCE_IQN: &str = "iqn.2026-11.io.keyfence:initiator-test";
pub const LUN_SIZE: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tgtd,
    Keyfence,
}

enum Peer {
    Tgtd(Tgtd),
    Keyfence(InProcessServer),
}

pub struct TestTarget {
    pub kind: Kind,
    /// Full URL: portal, target name and the LUN holding the test disk.
    pub url: IscsiUrl,
    pub port: u16,
    pub target_name: String,
    _peer: Peer,
}

pub struct Options {
    /// CHAP account required by the target.
    pub chap: Option<(String, String)>,
    pub size: u64,
    /// Let the target accept CRC32C header and data digests (tgtd; keyfence
    /// always accepts them).
    pub digests: bool,
    /// Send NOP-In pings to idle connections every this many seconds.
    pub nop_interval: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chap: None,
            size: LUN_SIZE,
            digests: false,
            nop_interval: None,
        }
    }
}

impl TestTarget {
    pub fn start(kind: Kind, opts: Options) -> TestTarget {
        match kind {
            Kind::Tgtd => Self::start_tgtd(opts),
            Kind::Keyfence => Self::start_keyfence(opts),
        }
    }

    pub fn start_tgtd(opts: Options) -> TestTarget {
        let t = Tgtd::start(TgtdOptions {
            iqn: TGT_IQN.into(),
            size: opts.size,
            digests: opts.digests,
            chap: opts.chap,
            nop_interval: opts.nop_interval,
        });
        TestTarget {
            kind: Kind::Tgtd,
            url: IscsiUrl::parse(&t.url()).expect("url"),
            port: t.port(),
            target_name: TGT_IQN.to_string(),
            _peer: Peer::Tgtd(t),
        }
    }

    pub fn start_keyfence(opts: Options) -> TestTarget {
        let mut limits = Limits::default();
        if let Some(n) = opts.nop_interval {
            limits.nop_in_interval_secs = n;
            limits.nop_in_timeout_secs = n;
        }
        let s = InProcessServer::start(ServerOptions {
            iqn: KEYFENCE_IQN.into(),
            portals: 1,
            size: opts.size,
            limits,
            chap: opts.chap.map(|(user, secret)| ChapConfig {
                user,
                secret: Secret::new(secret),
                mutual_user: None,
                mutual_secret: None,
            }),
            discovery_chap: None,
        });
        TestTarget {
            kind: Kind::Keyfence,
            url: IscsiUrl::parse(&s.url(0)).expect("url"),
            port: s.portals()[0].port(),
            target_name: KEYFENCE_IQN.to_string(),
            _peer: Peer::Keyfence(s),
        }
    }

    /// The portal URL (no target), for discovery.
    pub fn portal_url(&self) -> IscsiUrl {
        IscsiUrl::parse(&format!("iscsi://127.0.0.1:{}", self.port)).expect("url")
    }
}
