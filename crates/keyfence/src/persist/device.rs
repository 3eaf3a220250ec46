//! The device side of the PR tools: an iSCSI LUN reached through the
//! keyfence initiator, the mapping of initiator errors to sg3_utils exit
//! statuses, and unit-attention clearing after login.

use std::future::Future;

use initiator::commands::{self, Command};
use initiator::{Error, IscsiUrl, Isid};

use super::sgerr::SgCat;

/// A logical unit that runs SCSI commands; the data-in comes back.
pub trait Lun: Send {
    fn execute(&mut self, cmd: Command) -> impl Future<Output = initiator::Result<Vec<u8>>> + Send;
}

/// sg3_utils category of a failed command.
pub fn category(e: &Error) -> SgCat {
    match e {
        Error::ReservationConflict => SgCat::RES_CONFLICT,
        Error::UnitAttention(_) => SgCat::UNIT_ATTENTION,
        Error::CheckCondition(s) => SgCat::from_sense(Some(s)),
        Error::CheckConditionNoSense => SgCat::SENSE,
        Error::Status(s) => SgCat::from_status(*s),
        Error::Timeout { .. } => SgCat::TIMEOUT,
        Error::BadData { .. } => SgCat::MALFORMED,
        _ => SgCat::OTHER,
    }
}

/// Most unit attentions a fresh nexus can have queued that we clear before
/// giving up (bounded: a device that reports UA forever is broken).
pub const MAX_UA_CLEAR: usize = 16;

/// Consume the unit attentions queued for a new I_T nexus (power on, I_T
/// nexus loss, reservations preempted...) with TEST UNIT READY, as the
/// host SCSI layer does before an application sees a device node. Logged
/// to `err` when verbose.
pub async fn clear_unit_attentions<L: Lun>(lun: &mut L, verbose: u32, err: &mut String) {
    for _ in 0..MAX_UA_CLEAR {
        match lun.execute(commands::test_unit_ready()).await {
            Err(Error::UnitAttention(s)) => {
                if verbose > 1 {
                    err.push_str(&format!(
                        "    cleared unit attention: asc=0x{:02x} ascq=0x{:02x}\n",
                        s.asc, s.ascq
                    ));
                }
            }
            _ => return,
        }
    }
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
        let name = initiator::identity::resolve_initiator_name(initiator_name)?;
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
    _private: (),
}

impl IscsiLun {
    pub async fn connect(_t: &Target, _verbose: u32) -> Result<IscsiLun, Error> {
        Err(Error::InvalidArgument(
            "iSCSI sessions are not available in this build".into(),
        ))
    }

    /// Log out (best effort).
    pub async fn close(self) {}
}

impl Lun for IscsiLun {
    async fn execute(&mut self, _cmd: Command) -> initiator::Result<Vec<u8>> {
        Err(Error::SessionClosed)
    }
}
