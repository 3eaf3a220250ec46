//! A gateway's registration follows a reload of its portal groups
//! (`Gateway::update_portals`) against a real three-member etcd cluster on
//! loopback (Debian's etcd-server; the test fails if it is missing): the
//! record changes under the same lease and registration, watchers see it
//! as the same incarnation, and a registration that is gone is never
//! recreated.

use std::time::Duration;

use keyfence_cluster::{Cluster, ClusterConfig, Error, GatewayEvent, PortalGroup};
use keyfence_testkit::etcd::EtcdCluster;
use tokio::time::timeout;

const TTL: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_millis(500);

async fn connect(etcd: &EtcdCluster, gateway: &str) -> Cluster {
    let c = ClusterConfig {
        lease_ttl_secs: TTL.as_secs(),
        safety_margin_ms: MARGIN.as_millis() as u64,
        request_timeout_ms: 1000,
        prefix: "/kfportals".into(),
        ..ClusterConfig::new(etcd.endpoints(), gateway)
    };
    Cluster::connect(&c).await.expect("connect to etcd")
}

fn groups(list: &[(u16, &str)]) -> Vec<PortalGroup> {
    list.iter()
        .map(|(t, a)| PortalGroup {
            tpgt: *t,
            portals: vec![a.to_string()],
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_groups_change_under_the_same_lease_and_registration() {
    let etcd = EtcdCluster::start(3);
    let c = connect(&etcd, "gwp").await;
    let watcher = connect(&etcd, "watcher").await;
    let gw = c
        .join(groups(&[(1, "127.0.0.1:3260")]), TTL, MARGIN)
        .await
        .expect("join");
    let (before, at) = watcher.gateways_at().await.unwrap();
    assert_eq!(before.len(), 1);
    let mut w = watcher.watch_gateways(at);

    let wider = groups(&[(1, "127.0.0.1:3260"), (4, "127.0.0.1:3263")]);
    gw.update_portals(wider.clone()).await.expect("update");
    let now = c.gateways().await.unwrap();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].record.portal_groups, wider);
    assert_eq!(now[0].record.name, "gwp");
    assert_eq!(now[0].record.ttl_secs, before[0].record.ttl_secs);
    assert_eq!(now[0].lease, gw.lease(), "still under the same lease");
    assert_eq!(
        now[0].create_revision, before[0].create_revision,
        "the same registration, not a new incarnation"
    );
    match timeout(Duration::from_secs(10), w.next()).await {
        Ok(Ok(GatewayEvent::Joined(e))) => {
            assert_eq!(e.lease, gw.lease());
            assert_eq!(e.record.portal_groups, wider);
        }
        other => panic!("expected the updated record from the watch, got {other:?}"),
    }

    // A registration deleted by hand (the lease lives on) is not recreated.
    let key = c.keys().gateway("gwp");
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .expect("raw etcd client");
    raw.delete(key.clone(), None).await.unwrap();
    let e = gw
        .update_portals(groups(&[(4, "127.0.0.1:3263")]))
        .await
        .expect_err("no registration to update");
    assert!(
        matches!(&e, Error::Etcd(m) if m.contains("no longer under its lease")),
        "{e:?}"
    );
    assert!(raw.get(key.clone(), None).await.unwrap().kvs().is_empty());

    // After the lease is gone: refused as a lost lease, nothing written.
    gw.revoke().await.expect("revoke");
    let e = gw
        .update_portals(groups(&[(1, "127.0.0.1:3260")]))
        .await
        .expect_err("lease revoked");
    assert!(matches!(e, Error::LeaseLost(_) | Error::Etcd(_)), "{e:?}");
    assert!(raw.get(key, None).await.unwrap().kvs().is_empty());
}
