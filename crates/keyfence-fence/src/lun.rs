//! A logical unit as the PR tools see it: the [`Lun`] trait (run one SCSI
//! command), the iSCSI implementation ([`IscsiLun`], [`Target`]), the PR
//! IN/OUT commands built from keyfence-scsi's CDB types, and
//! unit-attention clearing after login.

use std::future::Future;

use keyfence_initiator::commands::{self, Command};
use keyfence_initiator::{Error, IscsiUrl, Isid, Sense};
use keyfence_scsi::pr_data::{PrInCdb, PrOutCdb, LU_SCOPE};

/// A logical unit that runs SCSI commands; the data-in comes back.
pub trait Lun: Send + Sync {
    fn execute(
        &self,
        cmd: Command,
    ) -> impl Future<Output = keyfence_initiator::Result<Vec<u8>>> + Send;
}

/// PERSISTENT RESERVE IN (SPC-4 6.15) for `sa` with allocation length
/// `alloc`. `sa` is sent as given (5 bits), so tools can send service
/// actions the standard does not define.
pub fn prin_cmd(sa: u8, alloc: u16) -> Command {
    let cdb = PrInCdb {
        service_action: sa & 0x1f,
        allocation_length: alloc,
    };
    Command::read(cdb.encode().to_vec(), u32::from(alloc))
}

/// PERSISTENT RESERVE OUT (SPC-4 6.16), LU_SCOPE, with its parameter list.
/// `sa` (5 bits) and `pr_type` (4 bits) are sent as given.
pub fn prout_cmd(sa: u8, pr_type: u8, params: Vec<u8>) -> Command {
    let cdb = PrOutCdb {
        service_action: sa & 0x1f,
        scope: LU_SCOPE,
        pr_type: pr_type & 0x0f,
        // Parameter lists built here are at most a few KiB.
        param_len: u32::try_from(params.len()).unwrap_or(u32::MAX),
    };
    Command::write(cdb.encode().to_vec(), params.into())
}

/// Most unit attentions a fresh nexus can have queued that we clear before
/// giving up (bounded: a device that reports UA forever is broken).
pub const MAX_UA_CLEAR: usize = 16;

/// Consume the unit attentions queued for a new I_T nexus (power on, I_T
/// nexus loss, reservations preempted...) with TEST UNIT READY, as the
/// host SCSI layer does before an application sees a device node. Returns
/// the sense data of the unit attentions cleared, in order.
pub async fn clear_unit_attentions<L: Lun>(lun: &L) -> Vec<Sense> {
    let mut cleared = Vec::new();
    for _ in 0..MAX_UA_CLEAR {
        match lun.execute(commands::test_unit_ready()).await {
            Err(Error::UnitAttention(s)) => cleared.push(s),
            _ => break,
        }
    }
    cleared
}

/// Where to connect: the parsed URL and the initiator identity.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: IscsiUrl,
    pub initiator_name: String,
    /// ISID override; `None` derives it from name, portal and target.
    pub isid: Option<Isid>,
}

impl Target {
    /// Parse a DEVICE argument (an iSCSI URL naming target and LUN) and
    /// resolve the initiator name.
    pub fn from_device(device: &str, initiator_name: Option<&str>) -> Result<Target, Error> {
        let url = IscsiUrl::parse_full(device)?;
        let name = keyfence_initiator::identity::resolve_initiator_name(initiator_name)?;
        Ok(Target {
            url,
            initiator_name: name.name,
            isid: None,
        })
    }

    /// The device as shown in messages (never shows a CHAP secret).
    pub fn display_name(&self) -> String {
        self.url.to_string()
    }

    /// The ISID this target will be logged in with.
    pub fn effective_isid(&self) -> Isid {
        self.isid.unwrap_or_else(|| {
            Isid::derive(
                &self.initiator_name,
                &self.url.portal(),
                self.url.target.as_deref().unwrap_or(""),
            )
        })
    }

    /// Log in and return the LUN.
    pub async fn connect(&self, verbose: u32) -> Result<IscsiLun, Error> {
        IscsiLun::connect(self, verbose).await
    }
}

/// A LUN behind a logged-in iSCSI session.
pub struct IscsiLun {
    dev: keyfence_initiator::Device,
}

impl IscsiLun {
    /// Log in to the target and LUN of `t`.
    pub async fn connect(t: &Target, _verbose: u32) -> Result<IscsiLun, Error> {
        let cfg = keyfence_initiator::SessionConfig {
            initiator_name: Some(t.initiator_name.clone()),
            isid: t.isid,
            // The tools decide themselves how to treat UNIT ATTENTION.
            unit_attention_retries: 0,
            ..keyfence_initiator::SessionConfig::default()
        };
        let dev = keyfence_initiator::Device::connect(&t.url, &cfg).await?;
        Ok(IscsiLun { dev })
    }

    /// The initiator port (name and ISID) this LUN is reached through.
    pub fn initiator_port(&self) -> keyfence_scsi::InitiatorPort {
        self.dev.session().initiator_port()
    }

    pub fn device(&self) -> &keyfence_initiator::Device {
        &self.dev
    }

    /// Log out (best effort: the work is done, a failed logout changes
    /// nothing for the caller).
    pub async fn close(self) {
        if let Err(e) = self.dev.close().await {
            tracing::debug!("logout failed: {e}");
        }
    }
}

impl Lun for IscsiLun {
    async fn execute(&self, cmd: Command) -> keyfence_initiator::Result<Vec<u8>> {
        let r = self.dev.execute_raw(&cmd).await?.into_result()?;
        Ok(r.data.to_vec())
    }
}
