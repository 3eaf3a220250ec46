//! Cluster mode: every gateway's portal groups, one LU identity.
//!
//! Two `keyfence serve` gateways (TPGT 1 and 2) over one backing file and
//! a three-member etcd on loopback, each told the other's portal group
//! (`--peer`). Whatever gateway an initiator asks, SendTargets lists both
//! portals, REPORT TARGET PORT GROUPS reports both groups, the LU has the
//! same NAA and serial, and the target port designators of VPD 83h are
//! the answering gateway's. A REGISTER with ALL_TG_PT and SPEC_I_PT
//! through gateway A registers on gateway B's target port too.

mod initiator_support;

use std::time::Duration;

use initiator_support::{login, session_config};
use keyfence_initiator::commands::Command;
use keyfence_initiator::{
    discover, Bytes, Device, Error, IscsiUrl, PrType, RegisterOptions, TransportId,
};
use keyfence_testkit::{ClusterOptions, ClusterRig};

const KF: &str = env!("CARGO_BIN_EXE_keyfence");
const IQN: &str = "iqn.2026-11.io.keyfence:interop";
const BLOCK: usize = 512;
const TEST_LIMIT: Duration = Duration::from_secs(90);

/// Run `keyfence ARGS`, expect exit 0 and JSON on stdout.
fn kf_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(KF)
        .args(args)
        .output()
        .expect("run keyfence");
    assert!(
        out.status.success(),
        "keyfence {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "keyfence {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// REPORT TARGET PORT GROUPS as (group, ALUA state, relative port ids).
async fn rtpg(dev: &Device) -> (Vec<u8>, Vec<(u16, u8, Vec<u16>)>) {
    let cdb = vec![0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    let r = dev
        .execute(&Command::read(cdb, 4096))
        .await
        .expect("REPORT TARGET PORT GROUPS");
    let d = r.data.to_vec();
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(len + 4, d.len(), "RTPG length");
    let mut groups = Vec::new();
    let mut at = 4;
    while at < d.len() {
        let state = d[at] & 0x0f;
        let id = u16::from_be_bytes([d[at + 2], d[at + 3]]);
        let n = usize::from(d[at + 7]);
        let ports = (0..n)
            .map(|k| {
                let p = at + 8 + 4 * k;
                u16::from_be_bytes([d[p + 2], d[p + 3]])
            })
            .collect();
        groups.push((id, state, ports));
        at += 8 + 4 * n;
    }
    (d, groups)
}

/// (NAA, unit serial, relative target port, target port group).
async fn identity(dev: &Device) -> (Vec<u8>, Vec<u8>, u16, u16) {
    let ds = dev.device_identification().await.expect("VPD 83h");
    let find = |assoc: u8, ty: u8| {
        ds.iter()
            .find(|d| d.association == assoc && d.designator_type == ty)
            .map(|d| d.value.clone())
            .unwrap_or_else(|| panic!("VPD 83h lacks association {assoc} type {ty}: {ds:?}"))
    };
    let naa = find(0, 3);
    let rtp = find(1, 4);
    let tpg = find(1, 5);
    let serial = dev.vpd_page(0x80).await.expect("VPD 80h")[4..].to_vec();
    (
        naa,
        serial,
        u16::from_be_bytes([rtp[2], rtp[3]]),
        u16::from_be_bytes([tpg[2], tpg[3]]),
    )
}

async fn write(dev: &Device, lba: u64, byte: u8) -> Result<(), Error> {
    dev.write(lba, Bytes::from(vec![byte; BLOCK])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gateway_shows_every_portal_group_and_one_identity() {
    // Two gateways over one file, each knowing the other's portal group.
    let opts = ClusterOptions::new(KF, IQN).peers();
    let rig = tokio::task::block_in_place(|| ClusterRig::start(opts));
    let etcd_endpoints = rig.endpoints().join(",");
    let (pa, pb) = (rig.portal(0), rig.portal(1));
    let (url_a, url_b) = (rig.url(0, 0), rig.url(1, 0));
    tokio::time::timeout(TEST_LIMIT, async {
        // SendTargets through either gateway: both portals, each with its TPGT.
        let mut want = vec![
            ("127.0.0.1".to_string(), pa.port(), Some(1)),
            ("127.0.0.1".to_string(), pb.port(), Some(2)),
        ];
        want.sort();
        for url in [&url_a, &url_b] {
            let found = discover(
                &IscsiUrl::parse(url).expect("URL"),
                &session_config("iqn.2026-11.test:d", 0x23d0_0000_0009),
            )
            .await
            .expect("SendTargets");
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].name, IQN);
            let mut got = found[0].portals.clone();
            got.sort();
            assert_eq!(got, want, "SendTargets through {url}");
        }

        let x_a = login(&url_a, "iqn.2026-11.test:x", 0x23d0_0000_0001).await;
        let x_b = login(&url_b, "iqn.2026-11.test:x", 0x23d0_0000_0001).await;
        let y = login(&url_b, "iqn.2026-11.test:y", 0x23d0_0000_0002).await;
        let z = login(&url_b, "iqn.2026-11.test:z", 0x23d0_0000_0003).await;

        // One identity; the target port designators are the answering
        // gateway's.
        let (naa_a, serial_a, rtp_a, tpg_a) = identity(&x_a).await;
        let (naa_b, serial_b, rtp_b, tpg_b) = identity(&y).await;
        assert_eq!(naa_a, naa_b, "NAA differs between gateways");
        assert_eq!(serial_a, serial_b, "unit serial differs between gateways");
        assert!(!serial_a.is_empty());
        assert_eq!((rtp_a, tpg_a), (1, 1));
        assert_eq!((rtp_b, tpg_b), (2, 2));
        // Both gateways report both groups, active/optimized, byte for byte.
        let (raw_a, groups_a) = rtpg(&x_a).await;
        let (raw_b, groups_b) = rtpg(&y).await;
        assert_eq!(groups_a, vec![(1, 0, vec![1]), (2, 0, vec![2])]);
        assert_eq!(raw_a, raw_b);
        assert_eq!(groups_b, groups_a);
        assert_eq!(
            x_a.inquiry().await.expect("INQUIRY").tpgs,
            1,
            "implicit ALUA"
        );

        // x registers through A on every target port (ALL_TG_PT) and y's
        // port with it (SPEC_I_PT); both hold the key on B's port too.
        let y_port = TransportId::Iscsi {
            name: "iqn.2026-11.test:y".into(),
            isid: Some(0x23d0_0000_0002),
        };
        let opts = RegisterOptions {
            all_tg_pt: true,
            spec_i_pt: vec![y_port],
            ..RegisterOptions::default()
        };
        x_a.register(0, 0xa1, &opts).await.expect("REGISTER on A");
        x_a.reserve(0xa1, PrType::WriteExclusiveRegistrantsOnly)
            .await
            .expect("RESERVE on A");
        let fs = z.read_full_status().await.expect("READ FULL STATUS on B");
        let mut regs: Vec<(String, u16, u64, bool)> = fs
            .descriptors
            .iter()
            .map(|d| {
                let TransportId::Iscsi { name, .. } = &d.transport_id else {
                    panic!("not an iSCSI TransportID: {d:?}")
                };
                (name.clone(), d.relative_target_port, d.key, d.all_tg_pt)
            })
            .collect();
        regs.sort();
        assert_eq!(
            regs,
            vec![
                ("iqn.2026-11.test:x".into(), 1, 0xa1, true),
                ("iqn.2026-11.test:x".into(), 2, 0xa1, true),
                ("iqn.2026-11.test:y".into(), 1, 0xa1, true),
                ("iqn.2026-11.test:y".into(), 2, 0xa1, true),
            ],
            "{fs:?}"
        );
        // Registered on B's port: x's and y's nexuses on B may write under
        // Write Exclusive - Registrants Only; the unregistered z may not.
        write(&x_b, 3, 0x31).await.expect("WRITE by x through B");
        write(&y, 4, 0x41).await.expect("WRITE by y through B");
        match write(&z, 5, 0x51).await {
            Err(Error::ReservationConflict) => {}
            other => panic!("WRITE by unregistered z through B: {other:?}"),
        }
        assert_eq!(x_a.read(3, 1).await.expect("READ on A")[..], [0x31; BLOCK]);

        // The operator's views of the same state, from etcd.
        let ep = etcd_endpoints.clone();
        let (status, shown) = tokio::task::spawn_blocking(move || {
            (
                kf_json(&["cluster", "status", "--etcd", &ep, "--json"]),
                kf_json(&["pr", "show", "--etcd", &ep, "--json"]),
            )
        })
        .await
        .expect("keyfence cluster status / pr show");
        let gws = status["gateways"].as_array().expect("gateways");
        let names: Vec<&str> = gws.iter().map(|g| g["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["gwa", "gwb"], "{status}");
        for g in gws {
            let left = g["ttl_left_secs"].as_i64().expect("lease alive");
            assert!(left > 0 && left <= g["ttl_secs"].as_i64().unwrap(), "{g}");
        }
        assert_eq!(gws[1]["portal_groups"][0]["tpgt"], 2);
        let lu = &status["lus"][0];
        assert_eq!(lu["lu"], format!("{IQN}@lun0"));
        let committed = lu["committed_revision"].as_i64().unwrap();
        assert_eq!(lu["writer"], "gwa");
        for a in lu["acks"].as_array().unwrap() {
            // Every change returned GOOD only once applied everywhere.
            assert_eq!(a["acked_revision"].as_i64(), Some(committed), "{a}");
            assert_eq!(a["current"], true);
        }
        let v = &shown[0];
        assert_eq!(v["target"], IQN);
        assert_eq!(v["lun"], 0);
        assert_eq!(v["cluster"]["revision"].as_i64(), Some(committed));
        assert_eq!(v["reservation"]["type"], "WE_RO");
        assert_eq!(v["registrations"].as_array().unwrap().len(), 4, "{v}");
        for d in [x_a, x_b, y, z] {
            let _ = d.close().await;
        }
    })
    .await
    .expect("test bounded");
}
