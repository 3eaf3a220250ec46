//! Logging in for fencing: which initiator port (I_T nexus) each role
//! uses, and logins bounded by a timeout.

use std::time::Duration;

use keyfence_initiator::{Device, IscsiUrl, Isid, SessionConfig};

use crate::resolve::FenceDevice;
use crate::{Error, Result};

/// Which initiator port (I_T nexus) a tool logs in as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The fence agent's own port: ISID derived from (name, portal, target,
    /// "fence"), so it never reinstates (and thereby kills) the session of
    /// an application on the same host, and the same on every run.
    Agent,
    /// `fence acquire`'s long-lived port (ISID derived with "acquire"), so
    /// neither the agent nor the application reinstates it.
    Failfast,
    /// The application's port: ISID derived from (name, portal, target), the
    /// same as `keyfence persist` / `mpathpersist` use.
    App,
    /// Read-only probes: a random ISID (PR IN needs no registration).
    Probe,
}

/// Session settings for `role` on `url`, where every login and command is
/// bounded by `timeout`.
pub fn session_config(
    url: &IscsiUrl,
    initiator_name: &str,
    role: Role,
    timeout: Duration,
) -> SessionConfig {
    let target = url.target.as_deref().unwrap_or_default();
    let isid = match role {
        Role::Agent => Some(Isid::derive(
            initiator_name,
            &url.portal(),
            &format!("{target}#keyfence-fence"),
        )),
        Role::Failfast => Some(Isid::derive(
            initiator_name,
            &url.portal(),
            &format!("{target}#keyfence-acquire"),
        )),
        Role::App => None,
        Role::Probe => {
            let bits: u64 = rand::random::<u64>() & 0xff_ffff_ffff;
            Isid::new(u64::from(Isid::TYPE_RANDOM) << 46 | bits)
        }
    };
    let mut cfg = SessionConfig {
        initiator_name: Some(initiator_name.to_string()),
        isid,
        login_timeout: timeout,
        ..SessionConfig::default()
    };
    cfg.limits.command_timeout = timeout;
    cfg
}

/// Log in to one path, bounded by `timeout`. The error names the portal.
pub async fn connect(
    url: &IscsiUrl,
    initiator_name: &str,
    role: Role,
    timeout: Duration,
) -> Result<Device> {
    let cfg = session_config(url, initiator_name, role, timeout);
    match tokio::time::timeout(timeout, Device::connect(url, &cfg)).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => {
            let msg = e.to_string();
            let portal = url.portal();
            Err(Error::Login(if msg.contains(&portal) {
                msg
            } else {
                format!("{portal}: {msg}")
            }))
        }
        Err(_) => Err(Error::LoginTimeout {
            portal: url.portal(),
            timeout,
        }),
    }
}

/// Log in through the first path of `dev` that answers.
pub async fn connect_any(
    dev: &FenceDevice,
    initiator_name: &str,
    role: Role,
    timeout: Duration,
) -> Result<Device> {
    let mut errs = Vec::new();
    for p in &dev.paths {
        match connect(p, initiator_name, role, timeout).await {
            Ok(d) => return Ok(d),
            Err(e) => errs.push(e),
        }
    }
    Err(Error::AllPathsFailed(errs))
}

/// Resolve the initiator name (explicit, environment, open-iscsi file, host
/// name; see `keyfence_initiator::identity`).
pub fn initiator_name(explicit: Option<&str>) -> Result<String> {
    keyfence_initiator::identity::resolve_initiator_name(explicit)
        .map(|n| n.name)
        .map_err(|e| Error::InitiatorName(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_get_distinct_nexus() {
        let u = IscsiUrl::parse_full("iscsi://127.0.0.1:3260/iqn.2026-11.io.keyfence:a/0").unwrap();
        let n = "iqn.2026-11.io.test:n1";
        let t = Duration::from_secs(1);
        let a = session_config(&u, n, Role::Agent, t).isid.unwrap();
        assert_eq!(a, session_config(&u, n, Role::Agent, t).isid.unwrap());
        assert_ne!(a, Isid::derive(n, &u.portal(), "iqn.2026-11.io.keyfence:a"));
        assert_eq!(session_config(&u, n, Role::App, t).isid, None);
        let p = session_config(&u, n, Role::Probe, t).isid.unwrap();
        assert_eq!(p.type_field(), Isid::TYPE_RANDOM);
        assert_eq!(
            session_config(&u, n, Role::Probe, t).limits.command_timeout,
            t
        );
    }
}
