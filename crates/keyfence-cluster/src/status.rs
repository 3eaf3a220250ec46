//! Read-only views for operators (`keyfence cluster status`).

use crate::{Cluster, Error};

impl Cluster {
    /// Seconds left on `lease` as etcd counts them; `None` when etcd does
    /// not know the lease (expired or revoked) or it is 0 (no lease).
    pub async fn lease_time_left(&self, lease: i64) -> Result<Option<i64>, Error> {
        if lease == 0 {
            return Ok(None);
        }
        let r = self
            .call("checking a lease", |mut c| async move {
                c.lease_time_to_live(lease, None).await
            })
            .await;
        match r {
            Ok(resp) if resp.ttl() < 0 => Ok(None),
            Ok(resp) => Ok(Some(resp.ttl())),
            Err(Error::Etcd(m)) if m.contains("lease not found") => Ok(None),
            Err(e) => Err(e),
        }
    }
}
