//! SBC-3 commands: reads, writes, verification, WRITE SAME, UNMAP,
//! COMPARE AND WRITE, provisioning status, capacity.

use scsi::cdb::Cdb;
use scsi::sense::asc;
use scsi::Sense;

use super::{CommandOutcome, CommandRequest, LogicalUnit};

impl LogicalUnit {
    pub(super) fn dispatch_other(
        &self,
        _req: &CommandRequest<'_>,
        _c: Cdb,
    ) -> Result<CommandOutcome, Sense> {
        Err(Sense::illegal_request(asc::INVALID_COMMAND_OPERATION_CODE))
    }
}
