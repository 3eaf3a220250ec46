//! Login phase (placeholder while the iscsi login state machine lands).
use std::sync::Arc;

use bytes::Bytes;
use iscsi::SessionParams;

use super::conn::Wire;
use super::session::Registration;
use super::{ListenerInfo, Shared};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SessionKind {
    Discovery,
    Normal { target: usize, tpgt: u16 },
}

pub(super) struct Established {
    pub kind: SessionKind,
    pub initiator: String,
    pub isid: u64,
    pub cid: u16,
    pub params: SessionParams,
    pub exp_cmd_sn: u32,
    pub stat_sn: u32,
    pub registration: Registration,
}

#[derive(Debug)]
pub(super) enum LoginError {
    Io(std::io::Error),
}

pub(super) async fn login(
    _shared: &Arc<Shared>,
    _info: &ListenerInfo,
    _wire: &mut Wire,
) -> Result<Option<Established>, LoginError> {
    Ok(None)
}

pub(super) fn text_response(_shared: &Shared, _target: Option<usize>, _data: &Bytes) -> Bytes {
    Bytes::new()
}
