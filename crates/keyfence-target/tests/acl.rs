//! Initiator ACLs and LUN masking over the wire: a server configured with
//! `[[target.acl]]` entries, driven by the keyfence initiator library and
//! by raw Login Requests.
//!
//! Target A (no CHAP) has LUNs 0, 1 and 2:
//! - `…:full` sees every LUN under its own id;
//! - `…:masked` sees LUN 5 (= target LUN 1, read-write) and LUN 0
//!   (= target LUN 2, read-only), nothing else;
//! - `…:rack-*` (a pattern) sees LUN 0 only.
//!
//! Target B has CHAP (`tgt-user`); `…:full` uses it, `…:own` has its own
//! credentials instead.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use keyfence_initiator::commands::{self, Command};
use keyfence_initiator::pr::RegisterOptions;
use keyfence_initiator::{Device, Error, IscsiUrl, SessionConfig};
use keyfence_iscsi::keys::TextBuilder;
use keyfence_iscsi::pdu::{LoginRequest, Stage};
use keyfence_iscsi::{Pdu, PduCodec};
use keyfence_scsi::SenseKey;
use keyfence_target::config::Config;
use keyfence_testkit::server::InProcessServer;

const A: &str = "iqn.2026-11.io.keyfence:acl-a";
const B: &str = "iqn.2026-11.io.keyfence:acl-b";
const FULL: &str = "iqn.2026-11.io.example:full";
const MASKED: &str = "iqn.2026-11.io.example:masked";
const RACK: &str = "iqn.2026-11.io.example:rack-17";
const OWN: &str = "iqn.2026-11.io.example:own";
const STRANGER: &str = "iqn.2026-11.io.example:stranger";
const TARGET_CHAP: (&str, &str) = ("tgt-user", "target-b-secret");
const OWN_CHAP: (&str, &str) = ("own-user", "own-initiator-secret");

struct Fixture {
    srv: InProcessServer,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Targets A (ACL, no CHAP) and B (ACL, target and per-initiator CHAP).
    fn start() -> Fixture {
        Self::start_with(true)
    }

    /// Target A alone: no CHAP configured anywhere on the server.
    fn start_without_chap() -> Fixture {
        Self::start_with(false)
    }

    fn start_with(with_b: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
data_dir = "{data}"

[[target]]
name = "{A}"
portals = ["127.0.0.1:0"]

[[target.acl]]
initiator = "{FULL}"

[[target.acl]]
initiator = "{MASKED}"
[[target.acl.lun]]
lun = 5
target_lun = 1
[[target.acl.lun]]
lun = 0
target_lun = 2
read_only = true

[[target.acl]]
initiator = "iqn.2026-11.io.example:rack-*"
[[target.acl.lun]]
lun = 0

[[target.lun]]
id = 0
path = "a0.img"
size = "1M"
[[target.lun]]
id = 1
path = "a1.img"
size = "1M"
[[target.lun]]
id = 2
path = "a2.img"
size = "1M"

[[target]]
name = "{B}"
portals = ["127.0.0.1:0"]
[target.chap]
user = "{tu}"
secret = "{ts}"

[[target.acl]]
initiator = "{FULL}"

[[target.acl]]
initiator = "{OWN}"
[target.acl.chap]
user = "{ou}"
secret = "{os}"

[[target.lun]]
id = 0
path = "b0.img"
size = "1M"
"#,
            data = dir.path().join("data").display(),
            tu = TARGET_CHAP.0,
            ts = TARGET_CHAP.1,
            ou = OWN_CHAP.0,
            os = OWN_CHAP.1,
        );
        let text = if with_b {
            text
        } else {
            let b = text
                .find("[[target]]\nname = \"iqn.2026-11.io.keyfence:acl-b\"")
                .unwrap();
            text[..b].to_string()
        };
        let cfg = Config::from_toml(&text, "acl.toml").unwrap();
        let srv = InProcessServer::from_config(cfg).unwrap();
        Fixture { srv, _dir: dir }
    }

    fn portal(&self, target: &str) -> SocketAddr {
        let (_, portals) = self
            .srv
            .targets()
            .iter()
            .find(|(n, _)| n == target)
            .expect("configured target");
        portals[0].addr
    }

    fn url(&self, target: &str, lun: u16) -> IscsiUrl {
        IscsiUrl::parse(&format!("iscsi://{}/{target}/{lun}", self.portal(target))).unwrap()
    }

    /// Log in as `initiator` to `target`, through LUN `lun`.
    fn connect(
        &self,
        initiator: &str,
        target: &str,
        lun: u16,
        chap: Option<(&str, &str)>,
    ) -> Result<Device, Error> {
        // The initiator's CHAP credentials go in the URL as user%secret.
        let auth = chap.map(|(u, s)| format!("{u}%{s}@")).unwrap_or_default();
        let url = IscsiUrl::parse_full(&format!(
            "iscsi://{auth}{}/{target}/{lun}",
            self.portal(target)
        ))
        .unwrap();
        let cfg = config(initiator);
        self.srv.block_on(Device::connect(&url, &cfg))
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.srv.block_on(f)
    }
}

fn config(initiator: &str) -> SessionConfig {
    SessionConfig {
        initiator_name: Some(initiator.into()),
        login_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

fn login_status<T: std::fmt::Debug>(r: Result<T, Error>) -> (u8, u8) {
    match r {
        Err(Error::Login { class, detail, .. }) => (class, detail),
        other => panic!("expected a login failure, got {other:?}"),
    }
}

/// Run `cmd` on LUN `lun` of `dev`'s session, through any unit attention.
fn run(
    f: &Fixture,
    dev: &Device,
    lun: u16,
    cmd: &Command,
) -> keyfence_initiator::session::ScsiResult {
    f.block_on(async {
        for _ in 0..5 {
            let r = dev.session().execute(lun, cmd).await.unwrap();
            if r.sense
                .as_ref()
                .is_some_and(|s| s.key == SenseKey::UnitAttention)
            {
                continue;
            }
            return r;
        }
        panic!("unit attentions did not stop on LUN {lun}");
    })
}

/// (sense key, ASC, ASCQ) of a CHECK CONDITION.
fn sense_of(r: &keyfence_initiator::session::ScsiResult) -> (SenseKey, u8, u8) {
    assert_eq!(r.status, 0x02, "CHECK CONDITION expected, got {r:?}");
    let s = r.sense.as_ref().expect("sense data");
    (s.key, s.asc, s.ascq)
}

fn report_luns(f: &Fixture, dev: &Device) -> Vec<u16> {
    f.block_on(dev.report_luns()).unwrap()
}

fn write10(lba: u32, data: Bytes) -> Command {
    let blocks = (data.len() / 512) as u16;
    let mut cdb = vec![0x2a, 0];
    cdb.extend_from_slice(&lba.to_be_bytes());
    cdb.push(0);
    cdb.extend_from_slice(&blocks.to_be_bytes());
    cdb.push(0);
    Command::write(cdb, data)
}

fn read10(lba: u32, blocks: u16) -> Command {
    let mut cdb = vec![0x28, 0];
    cdb.extend_from_slice(&lba.to_be_bytes());
    cdb.push(0);
    cdb.extend_from_slice(&blocks.to_be_bytes());
    cdb.push(0);
    Command::read(cdb, u32::from(blocks) * 512)
}

#[test]
fn allowed_initiators_log_in_and_see_their_luns() {
    let f = Fixture::start();
    let full = f.connect(FULL, A, 0, None).unwrap();
    assert_eq!(report_luns(&f, &full), vec![0, 1, 2]);
    // A pattern entry admits a matching name.
    let rack = f.connect(RACK, A, 0, None).unwrap();
    assert_eq!(report_luns(&f, &rack), vec![0]);
    assert_eq!(
        sense_of(&run(&f, &rack, 1, &commands::test_unit_ready())),
        (SenseKey::IllegalRequest, 0x25, 0x00)
    );
    f.block_on(full.close()).unwrap();
    f.block_on(rack.close()).unwrap();
}

#[test]
fn a_denied_initiator_gets_authorization_failure() {
    // No CHAP anywhere on the server: refused on the first request.
    let f = Fixture::start_without_chap();
    assert_eq!(login_status(f.connect(STRANGER, A, 0, None)), (0x02, 0x02));
    let rack = f
        .connect(RACK, A, 0, None)
        .expect("the rack-* pattern admits");
    f.block_on(rack.close()).unwrap();
}

#[test]
fn with_chap_configured_a_denied_initiator_fails_authentication() {
    // CHAP is configured on the server (target B): a name that is not
    // here for the initiator is challenged against credentials nobody
    // has, like a CHAP target with a wrong secret, so the answer does not
    // tell a forbidden target from a missing one.
    let f = Fixture::start();
    assert_eq!(login_status(f.connect(STRANGER, A, 0, None)), (0x02, 0x01));
    assert_eq!(login_status(f.connect(STRANGER, B, 0, None)), (0x02, 0x01));
    assert_eq!(
        login_status(f.connect(STRANGER, B, 0, Some(TARGET_CHAP))),
        (0x02, 0x01)
    );
    // The rack-* pattern is on A only.
    assert_eq!(
        login_status(f.connect(RACK, B, 0, Some(TARGET_CHAP))),
        (0x02, 0x01)
    );
    // A real CHAP target with a wrong secret answers the same.
    assert_eq!(
        login_status(f.connect(FULL, B, 0, Some((TARGET_CHAP.0, "wrong-secret-0000")))),
        (0x02, 0x01)
    );
}

/// The first Login Response to a raw Login Request from `initiator` for
/// `target` on `portal`, as bytes.
fn raw_first_login_response(portal: SocketAddr, initiator: &str, target: &str) -> (Vec<u8>, Bytes) {
    let mut s = TcpStream::connect(portal).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut t = TextBuilder::new();
    t.push("InitiatorName", initiator);
    t.push("SessionType", "Normal");
    t.push("TargetName", target);
    t.push("AuthMethod", "CHAP,None");
    let req = LoginRequest {
        transit: true,
        cont: false,
        csg: Stage::Security,
        nsg: Stage::Operational,
        version_max: 0,
        version_min: 0,
        isid: 0x23d0_0000_0042,
        tsih: 0,
        itt: 7,
        cid: 1,
        cmd_sn: 1,
        exp_stat_sn: 0,
        data: t.finish(),
    };
    let codec = PduCodec::new();
    let mut out = BytesMut::new();
    codec.encode(&req.to_pdu(), &mut out).unwrap();
    s.write_all(&out).unwrap();
    let mut rbuf = BytesMut::new();
    let mut codec = PduCodec::new();
    let pdu: Pdu = loop {
        if let Some(p) = codec.decode(&mut rbuf).unwrap() {
            break p;
        }
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).unwrap();
        assert!(n > 0, "connection closed before a login response");
        rbuf.extend_from_slice(&tmp[..n]);
    };
    (pdu.bhs.to_vec(), pdu.data)
}

#[test]
fn an_unknown_target_and_a_denied_initiator_look_the_same() {
    // (server, expected status of the first response, final status)
    for (f, first, last) in [
        (Fixture::start_without_chap(), (0x02, 0x02), (0x02, 0x02)),
        (Fixture::start(), (0x00, 0x00), (0x02, 0x01)),
    ] {
        let served: Vec<&str> = [A, B]
            .into_iter()
            .filter(|t| f.srv.targets().iter().any(|(n, _)| n == t))
            .collect();
        for target_portal in served {
            let portal = f.portal(target_portal);
            let denied = raw_first_login_response(portal, STRANGER, target_portal);
            let unknown =
                raw_first_login_response(portal, STRANGER, "iqn.2026-11.io.keyfence:no-such");
            assert_eq!(
                denied, unknown,
                "responses differ on {target_portal}'s portal"
            );
            assert_eq!((denied.0[36], denied.0[37]), first);
            // An allowed initiator is not refused there.
            let allowed = raw_first_login_response(portal, FULL, target_portal);
            assert_eq!(allowed.0[36], 0x00, "allowed initiator on {target_portal}");
        }
        // Through the library too.
        let url = IscsiUrl::parse(&format!(
            "iscsi://{}/iqn.2026-11.io.keyfence:no-such/0",
            f.portal(A)
        ))
        .unwrap();
        let r = f.block_on(Device::connect(&url, &config(FULL)));
        assert_eq!(login_status(r), last);
    }
}

#[test]
fn masked_and_remapped_luns() {
    let f = Fixture::start();
    // Write a marker through the full view on target LUN 1 and 2.
    let full = f.connect(FULL, A, 0, None).unwrap();
    let one = Bytes::from(vec![0x11u8; 512]);
    let two = Bytes::from(vec![0x22u8; 512]);
    assert!(run(&f, &full, 1, &write10(3, one.clone())).is_good());
    assert!(run(&f, &full, 2, &write10(3, two.clone())).is_good());

    let masked = f.connect(MASKED, A, 5, None).unwrap();
    assert_eq!(report_luns(&f, &masked), vec![0, 5]);
    // LUN 5 is target LUN 1; LUN 0 is target LUN 2.
    assert_eq!(run(&f, &masked, 5, &read10(3, 1)).data, one);
    assert_eq!(run(&f, &masked, 0, &read10(3, 1)).data, two);
    // Numbers outside the mapping: LOGICAL UNIT NOT SUPPORTED, also the
    // target LUN ids 1 and 2 under their own numbers.
    for lun in [1, 2, 3] {
        assert_eq!(
            sense_of(&run(&f, &masked, lun, &read10(0, 1))),
            (SenseKey::IllegalRequest, 0x25, 0x00),
            "LUN {lun}"
        );
    }
    // INQUIRY of an unmapped LUN: peripheral qualifier 011b.
    let inq = run(&f, &masked, 1, &commands::inquiry(None, 36));
    assert!(inq.is_good());
    assert_eq!(inq.data[0], 0x7f);
    // A read-write mapping writes.
    let five = Bytes::from(vec![0x55u8; 512]);
    assert!(run(&f, &masked, 5, &write10(4, five.clone())).is_good());
    assert_eq!(run(&f, &full, 1, &read10(4, 1)).data, five);
    f.block_on(full.close()).unwrap();
    f.block_on(masked.close()).unwrap();
}

#[test]
fn a_read_only_mapping_is_write_protected_for_that_initiator_only() {
    let f = Fixture::start();
    let masked = f.connect(MASKED, A, 0, None).unwrap();
    let data = Bytes::from(vec![0xeeu8; 512]);
    assert_eq!(
        sense_of(&run(&f, &masked, 0, &write10(8, data.clone()))),
        (SenseKey::DataProtect, 0x27, 0x00)
    );
    // MODE SENSE(6) shows WP for this nexus.
    let ms = Command::read(vec![0x1a, 0, 0x3f, 0, 255, 0], 255);
    assert_eq!(run(&f, &masked, 0, &ms).data[2] & 0x80, 0x80);
    // The same LU (target LUN 2) is writable for `full`, without WP.
    let full = f.connect(FULL, A, 2, None).unwrap();
    assert_eq!(run(&f, &full, 2, &ms).data[2] & 0x80, 0);
    assert!(run(&f, &full, 2, &write10(8, data.clone())).is_good());
    assert_eq!(run(&f, &masked, 0, &read10(8, 1)).data, data);
    f.block_on(full.close()).unwrap();
    f.block_on(masked.close()).unwrap();
}

#[test]
fn per_initiator_chap_overrides_the_targets() {
    let f = Fixture::start();
    // `full` uses the target's CHAP on B.
    assert_eq!(login_status(f.connect(FULL, B, 0, None)), (0x02, 0x01));
    f.block_on(f.connect(FULL, B, 0, Some(TARGET_CHAP)).unwrap().close())
        .unwrap();
    // `own` must use its own credentials; the target's do not work for it.
    assert_eq!(
        login_status(f.connect(OWN, B, 0, Some(TARGET_CHAP))),
        (0x02, 0x01)
    );
    assert_eq!(login_status(f.connect(OWN, B, 0, None)), (0x02, 0x01));
    let own = f.connect(OWN, B, 0, Some(OWN_CHAP)).unwrap();
    assert_eq!(report_luns(&f, &own), vec![0]);
    f.block_on(own.close()).unwrap();
    // And its credentials do not let `full` in.
    assert_eq!(
        login_status(f.connect(FULL, B, 0, Some(OWN_CHAP))),
        (0x02, 0x01)
    );
}

#[test]
fn send_targets_lists_only_accessible_targets() {
    let f = Fixture::start();
    let discover = |initiator: &str| -> Vec<String> {
        let url = f.url(A, 0);
        let mut names: Vec<String> = f
            .block_on(keyfence_initiator::login::discover(
                &url,
                &config(initiator),
            ))
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        names.sort();
        names
    };
    assert_eq!(discover(FULL), vec![A.to_string(), B.to_string()]);
    assert_eq!(discover(MASKED), vec![A.to_string()]);
    assert_eq!(discover(RACK), vec![A.to_string()]);
    assert_eq!(discover(OWN), vec![B.to_string()]);
    assert!(discover(STRANGER).is_empty());
    // (In a normal session keyfence answers SendTargets=All with Reject
    // and lists only the session's own target, so there is nothing more
    // to filter there.)
}

#[test]
fn persistent_reservations_through_a_remapped_lun() {
    let f = Fixture::start();
    let opts = RegisterOptions::default();
    // `masked` registers on LUN 5 = target LUN 1.
    let masked = f.connect(MASKED, A, 5, None).unwrap();
    f.block_on(masked.register(0, 0xaaaa, &opts)).unwrap();
    // `full` sees it on LUN 1 and registers and reserves there.
    let full = f.connect(FULL, A, 1, None).unwrap();
    f.block_on(full.register(0, 0xbbbb, &opts)).unwrap();
    let mut keys = f.block_on(full.read_keys()).unwrap().keys;
    keys.sort();
    assert_eq!(keys, vec![0xaaaa, 0xbbbb]);
    f.block_on(full.reserve(0xbbbb, keyfence_initiator::PrType::WriteExclusive))
        .unwrap();
    // `masked` sees the same state through its number, and the
    // reservation holds against it there.
    let mut keys = f.block_on(masked.read_keys()).unwrap().keys;
    keys.sort();
    assert_eq!(keys, vec![0xaaaa, 0xbbbb]);
    let r = run(&f, &masked, 5, &write10(0, Bytes::from(vec![1u8; 512])));
    assert_eq!(
        r.status, 0x18,
        "RESERVATION CONFLICT through the remapped LUN"
    );
    // `full` registers on target LUN 0, which `masked` cannot address:
    // neither its registrations nor the LU are visible to it.
    let full0 = Device::on_session(full.session().clone(), &f.url(A, 0), 0, &config(FULL));
    f.block_on(full0.register(0, 0xcccc, &opts)).unwrap();
    // READ KEYS (PERSISTENT RESERVE IN, service action 0).
    let pr_in = Command::read(vec![0x5e, 0x00, 0, 0, 0, 0, 0, 0x10, 0, 0], 4096);
    // No number of `masked` reaches target LUN 0: its LUN 0 is target LUN
    // 2, which has no registrations, and other numbers address nothing.
    let r = run(&f, &masked, 0, &pr_in);
    assert!(r.is_good(), "{r:?}");
    assert_eq!(
        &r.data[4..8],
        &[0, 0, 0, 0],
        "no keys on the LU behind its LUN 0"
    );
    for lun in [1, 2] {
        assert_eq!(
            sense_of(&run(&f, &masked, lun, &pr_in)),
            (SenseKey::IllegalRequest, 0x25, 0x00),
            "LUN {lun} of `masked`"
        );
    }
    let keys = f.block_on(masked.read_keys()).unwrap().keys;
    assert!(!keys.contains(&0xcccc), "{keys:x?}");
    f.block_on(full.close()).unwrap();
    f.block_on(masked.close()).unwrap();
}
