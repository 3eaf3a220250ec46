//! How to log in: who we are, what we offer, how long we wait.

use std::time::Duration;

use keyfence_iscsi::params::OperationalPrefs;

use crate::identity::Isid;
use crate::session::Limits;

/// Everything a login needs besides the URL.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Explicit initiator name; `None` resolves it as
    /// [`crate::identity::resolve_initiator_name`] describes.
    pub initiator_name: Option<String>,
    /// Explicit ISID; `None` derives it from (name, portal, target) so that
    /// separate runs form the same I_T nexus (see [`crate::identity`]).
    pub isid: Option<Isid>,
    /// Operational parameters offered at login (digests, burst sizes,
    /// ImmediateData, InitialR2T, MaxRecvDataSegmentLength, ...).
    pub prefs: OperationalPrefs,
    /// The target's CHAP name and secret for mutual CHAP (we challenge the
    /// target too); our own CHAP credentials come from the URL.
    pub target_chap: Option<(String, String)>,
    /// Time allowed for TCP connect plus the whole login.
    pub login_timeout: Duration,
    pub limits: Limits,
    /// UNIT ATTENTIONs each typed call retries through (0 = report them as
    /// errors). Consumed conditions are kept, see
    /// `Device::take_unit_attentions`.
    pub unit_attention_retries: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            initiator_name: None,
            isid: None,
            prefs: OperationalPrefs::default(),
            target_chap: None,
            login_timeout: Duration::from_secs(15),
            limits: Limits::default(),
            unit_attention_retries: 5,
        }
    }
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("initiator_name", &self.initiator_name)
            .field("isid", &self.isid)
            .field("prefs", &self.prefs)
            .field(
                "target_chap",
                &self.target_chap.as_ref().map(|(n, _)| (n, "<redacted>")),
            )
            .field("login_timeout", &self.login_timeout)
            .field("limits", &self.limits)
            .field("unit_attention_retries", &self.unit_attention_retries)
            .finish()
    }
}
