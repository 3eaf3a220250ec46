//! SCSI status codes (SAM-5).

crate::wire_enum! {
    /// The status byte a device server returns for a command.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum ScsiStatus: u8 {
        Good = 0x00 => "GOOD",
        CheckCondition = 0x02 => "CHECK CONDITION",
        ConditionMet = 0x04 => "CONDITION MET",
        Busy = 0x08 => "BUSY",
        ReservationConflict = 0x18 => "RESERVATION CONFLICT",
        TaskSetFull = 0x28 => "TASK SET FULL",
        AcaActive = 0x30 => "ACA ACTIVE",
        TaskAborted = 0x40 => "TASK ABORTED",
    }
}
