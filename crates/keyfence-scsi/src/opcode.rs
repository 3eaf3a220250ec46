//! Operation codes, service actions, and the table of commands keyfence's
//! block device server implements, with their CDB usage bitmaps (SPC-4
//! 6.35 REPORT SUPPORTED OPERATION CODES).
//!
//! The usage bitmap of a command is also the set of CDB bits the device
//! server accepts: [`crate::cdb::parse`] rejects any other bit that is set,
//! so what REPORT SUPPORTED OPERATION CODES reports is true by
//! construction.

pub const TEST_UNIT_READY: u8 = 0x00;
pub const REQUEST_SENSE: u8 = 0x03;
pub const READ_6: u8 = 0x08;
pub const WRITE_6: u8 = 0x0a;
pub const INQUIRY: u8 = 0x12;
pub const MODE_SELECT_6: u8 = 0x15;
pub const RESERVE_6: u8 = 0x16;
pub const RELEASE_6: u8 = 0x17;
pub const MODE_SENSE_6: u8 = 0x1a;
pub const START_STOP_UNIT: u8 = 0x1b;
pub const SEND_DIAGNOSTIC: u8 = 0x1d;
pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
pub const READ_CAPACITY_10: u8 = 0x25;
pub const READ_10: u8 = 0x28;
pub const WRITE_10: u8 = 0x2a;
pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
pub const VERIFY_10: u8 = 0x2f;
pub const PRE_FETCH_10: u8 = 0x34;
pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
pub const READ_DEFECT_DATA_10: u8 = 0x37;
pub const WRITE_SAME_10: u8 = 0x41;
pub const UNMAP: u8 = 0x42;
pub const MODE_SELECT_10: u8 = 0x55;
pub const RESERVE_10: u8 = 0x56;
pub const RELEASE_10: u8 = 0x57;
pub const MODE_SENSE_10: u8 = 0x5a;
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
pub const READ_16: u8 = 0x88;
pub const COMPARE_AND_WRITE: u8 = 0x89;
pub const WRITE_16: u8 = 0x8a;
pub const ORWRITE_16: u8 = 0x8b;
pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
pub const VERIFY_16: u8 = 0x8f;
pub const PRE_FETCH_16: u8 = 0x90;
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
pub const WRITE_SAME_16: u8 = 0x93;
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
pub const REPORT_LUNS: u8 = 0xa0;
pub const MAINTENANCE_IN: u8 = 0xa3;
pub const READ_12: u8 = 0xa8;
pub const WRITE_12: u8 = 0xaa;
pub const WRITE_AND_VERIFY_12: u8 = 0xae;
pub const VERIFY_12: u8 = 0xaf;
pub const READ_DEFECT_DATA_12: u8 = 0xb7;

/// SERVICE ACTION IN(16) service actions.
pub const SAI_READ_CAPACITY_16: u8 = 0x10;
pub const SAI_GET_LBA_STATUS: u8 = 0x12;
/// MAINTENANCE IN service actions.
pub const MI_REPORT_TARGET_PORT_GROUPS: u8 = 0x0a;
pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;

/// The CDB length an operation code implies by its group (SPC-4 4.2.5.1),
/// or `None` for variable-length and vendor-specific groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// One implemented command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    pub opcode: u8,
    /// Service action, for commands that have one.
    pub service_action: Option<u8>,
    pub name: &'static str,
    /// CDB usage bitmap (SPC-4 6.35.3): byte 0 is the operation code, the
    /// SERVICE ACTION field holds the service action itself, and every
    /// other set bit is a bit the device server interprets. Its length is
    /// the CDB length.
    pub usage: &'static [u8],
    /// Nominal and recommended command timeouts, seconds.
    pub nominal_timeout: u32,
    pub recommended_timeout: u32,
}

const fn cmd(
    opcode: u8,
    service_action: Option<u8>,
    name: &'static str,
    usage: &'static [u8],
    recommended_timeout: u32,
) -> CommandInfo {
    CommandInfo {
        opcode,
        service_action,
        name,
        usage,
        nominal_timeout: 0,
        recommended_timeout,
    }
}

// Control byte: NACA (bit 2) is interpreted — and refused, as keyfence does
// not implement ACA.
const C: u8 = 0x04;

/// Every command the block device server implements, in operation code
/// order (service actions ascending).
pub static COMMANDS: &[CommandInfo] = &[
    cmd(
        TEST_UNIT_READY,
        None,
        "TEST UNIT READY",
        &[0x00, 0, 0, 0, 0, C],
        5,
    ),
    cmd(
        REQUEST_SENSE,
        None,
        "REQUEST SENSE",
        &[0x03, 0x01, 0, 0, 0xff, C],
        5,
    ),
    cmd(
        READ_6,
        None,
        "READ(6)",
        &[0x08, 0x1f, 0xff, 0xff, 0xff, C],
        30,
    ),
    cmd(
        WRITE_6,
        None,
        "WRITE(6)",
        &[0x0a, 0x1f, 0xff, 0xff, 0xff, C],
        30,
    ),
    cmd(
        INQUIRY,
        None,
        "INQUIRY",
        &[0x12, 0x01, 0xff, 0xff, 0xff, C],
        5,
    ),
    cmd(
        MODE_SELECT_6,
        None,
        "MODE SELECT(6)",
        &[0x15, 0x11, 0, 0, 0xff, C],
        5,
    ),
    cmd(RESERVE_6, None, "RESERVE(6)", &[0x16, 0, 0, 0, 0, C], 5),
    cmd(RELEASE_6, None, "RELEASE(6)", &[0x17, 0, 0, 0, 0, C], 5),
    cmd(
        MODE_SENSE_6,
        None,
        "MODE SENSE(6)",
        &[0x1a, 0x08, 0xff, 0xff, 0xff, C],
        5,
    ),
    cmd(
        START_STOP_UNIT,
        None,
        "START STOP UNIT",
        &[0x1b, 0x01, 0, 0x0f, 0xf7, C],
        30,
    ),
    cmd(
        SEND_DIAGNOSTIC,
        None,
        "SEND DIAGNOSTIC",
        &[0x1d, 0xf7, 0, 0xff, 0xff, C],
        60,
    ),
    cmd(
        PREVENT_ALLOW_MEDIUM_REMOVAL,
        None,
        "PREVENT ALLOW MEDIUM REMOVAL",
        &[0x1e, 0, 0, 0, 0x03, C],
        5,
    ),
    cmd(
        READ_CAPACITY_10,
        None,
        "READ CAPACITY(10)",
        &[0x25, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, C],
        5,
    ),
    cmd(
        READ_10,
        None,
        "READ(10)",
        &[0x28, 0xfc, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, C],
        30,
    ),
    cmd(
        WRITE_10,
        None,
        "WRITE(10)",
        &[0x2a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, C],
        30,
    ),
    cmd(
        WRITE_AND_VERIFY_10,
        None,
        "WRITE AND VERIFY(10)",
        &[0x2e, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, C],
        30,
    ),
    cmd(
        VERIFY_10,
        None,
        "VERIFY(10)",
        &[0x2f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, C],
        30,
    ),
    cmd(
        PRE_FETCH_10,
        None,
        "PRE-FETCH(10)",
        &[0x34, 0x02, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, C],
        30,
    ),
    cmd(
        SYNCHRONIZE_CACHE_10,
        None,
        "SYNCHRONIZE CACHE(10)",
        &[0x35, 0x02, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, C],
        60,
    ),
    cmd(
        READ_DEFECT_DATA_10,
        None,
        "READ DEFECT DATA(10)",
        &[0x37, 0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, C],
        5,
    ),
    cmd(
        WRITE_SAME_10,
        None,
        "WRITE SAME(10)",
        &[0x41, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, C],
        60,
    ),
    cmd(
        UNMAP,
        None,
        "UNMAP",
        &[0x42, 0x01, 0, 0, 0, 0, 0x3f, 0xff, 0xff, C],
        60,
    ),
    cmd(
        MODE_SELECT_10,
        None,
        "MODE SELECT(10)",
        &[0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, C],
        5,
    ),
    cmd(
        RESERVE_10,
        None,
        "RESERVE(10)",
        &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, C],
        5,
    ),
    cmd(
        RELEASE_10,
        None,
        "RELEASE(10)",
        &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, C],
        5,
    ),
    cmd(
        MODE_SENSE_10,
        None,
        "MODE SENSE(10)",
        &[0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, C],
        5,
    ),
    cmd(
        PERSISTENT_RESERVE_IN,
        Some(0x00),
        "PERSISTENT RESERVE IN / READ KEYS",
        &[0x5e, 0x00, 0, 0, 0, 0, 0, 0xff, 0xff, C],
        5,
    ),
    cmd(
        PERSISTENT_RESERVE_IN,
        Some(0x01),
        "PERSISTENT RESERVE IN / READ RESERVATION",
        &[0x5e, 0x01, 0, 0, 0, 0, 0, 0xff, 0xff, C],
        5,
    ),
    cmd(
        PERSISTENT_RESERVE_IN,
        Some(0x02),
        "PERSISTENT RESERVE IN / REPORT CAPABILITIES",
        &[0x5e, 0x02, 0, 0, 0, 0, 0, 0xff, 0xff, C],
        5,
    ),
    cmd(
        PERSISTENT_RESERVE_IN,
        Some(0x03),
        "PERSISTENT RESERVE IN / READ FULL STATUS",
        &[0x5e, 0x03, 0, 0, 0, 0, 0, 0xff, 0xff, C],
        5,
    ),
    cmd(
        PERSISTENT_RESERVE_OUT,
        Some(0x00),
        "PERSISTENT RESERVE OUT / REGISTER",
        &[0x5f, 0x00, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C],
        10,
    ),
    cmd(
        PERSISTENT_RESERVE_OUT,
        Some(0x01),
        "PERSISTENT RESERVE OUT / RESERVE",
        &[0x5f, 0x01, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C],
        10,
    ),
    cmd(
        PERSISTENT_RESERVE_OUT,
        Some(0x02),
        "PERSISTENT RESERVE OUT / RELEASE",
        &[0x5f, 0x02, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C],
        10,
    ),
    cmd(
        PERSISTENT_RESERVE_OUT,
        Some(0x03),
        "PERSISTENT RESERVE OUT / CLEAR",
        &[0x5f, 0x03, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C],
        10,
    ),
    cmd(
        PERSISTENT_RESERVE_OUT,
        Some(0x04),
        "PERSISTENT RESERVE OUT / PREEMPT",
        &[0x5f, 0x04, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C],
        10,
    ),
    cmd(
        PERSISTENT_RESERVE_OUT,
        Some(0x05),
        "PERSISTENT RESERVE OUT / PREEMPT AND ABORT",
        &[0x5f, 0x05, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C],
        10,
    ),
    cmd(
        PERSISTENT_RESERVE_OUT,
        Some(0x06),
        "PERSISTENT RESERVE OUT / REGISTER AND IGNORE EXISTING KEY",
        &[0x5f, 0x06, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C],
        10,
    ),
    cmd(
        PERSISTENT_RESERVE_OUT,
        Some(0x07),
        "PERSISTENT RESERVE OUT / REGISTER AND MOVE",
        &[0x5f, 0x07, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C],
        10,
    ),
    cmd(
        PERSISTENT_RESERVE_OUT,
        Some(0x08),
        "PERSISTENT RESERVE OUT / REPLACE LOST RESERVATION",
        &[0x5f, 0x08, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C],
        10,
    ),
    cmd(
        READ_16,
        None,
        "READ(16)",
        &[
            0x88, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, C,
        ],
        30,
    ),
    cmd(
        COMPARE_AND_WRITE,
        None,
        "COMPARE AND WRITE",
        &[
            0x89, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x3f, C,
        ],
        30,
    ),
    cmd(
        WRITE_16,
        None,
        "WRITE(16)",
        &[
            0x8a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, C,
        ],
        30,
    ),
    cmd(
        ORWRITE_16,
        None,
        "ORWRITE(16)",
        &[
            0x8b, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, C,
        ],
        30,
    ),
    cmd(
        WRITE_AND_VERIFY_16,
        None,
        "WRITE AND VERIFY(16)",
        &[
            0x8e, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, C,
        ],
        30,
    ),
    cmd(
        VERIFY_16,
        None,
        "VERIFY(16)",
        &[
            0x8f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, C,
        ],
        30,
    ),
    cmd(
        PRE_FETCH_16,
        None,
        "PRE-FETCH(16)",
        &[
            0x90, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, C,
        ],
        30,
    ),
    cmd(
        SYNCHRONIZE_CACHE_16,
        None,
        "SYNCHRONIZE CACHE(16)",
        &[
            0x91, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, C,
        ],
        60,
    ),
    cmd(
        WRITE_SAME_16,
        None,
        "WRITE SAME(16)",
        &[
            0x93, 0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x3f, C,
        ],
        60,
    ),
    cmd(
        SERVICE_ACTION_IN_16,
        Some(SAI_READ_CAPACITY_16),
        "READ CAPACITY(16)",
        &[
            0x9e, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x01, C,
        ],
        5,
    ),
    cmd(
        SERVICE_ACTION_IN_16,
        Some(SAI_GET_LBA_STATUS),
        "GET LBA STATUS",
        &[
            0x9e, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            C,
        ],
        5,
    ),
    cmd(
        REPORT_LUNS,
        None,
        "REPORT LUNS",
        &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, C],
        5,
    ),
    cmd(
        MAINTENANCE_IN,
        Some(MI_REPORT_TARGET_PORT_GROUPS),
        "REPORT TARGET PORT GROUPS",
        &[0xa3, 0xea, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, C],
        5,
    ),
    cmd(
        MAINTENANCE_IN,
        Some(MI_REPORT_SUPPORTED_OPCODES),
        "REPORT SUPPORTED OPERATION CODES",
        &[
            0xa3, 0x0c, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, C,
        ],
        5,
    ),
    cmd(
        READ_12,
        None,
        "READ(12)",
        &[
            0xa8, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, C,
        ],
        30,
    ),
    cmd(
        WRITE_12,
        None,
        "WRITE(12)",
        &[
            0xaa, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, C,
        ],
        30,
    ),
    cmd(
        WRITE_AND_VERIFY_12,
        None,
        "WRITE AND VERIFY(12)",
        &[
            0xae, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, C,
        ],
        30,
    ),
    cmd(
        VERIFY_12,
        None,
        "VERIFY(12)",
        &[
            0xaf, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, C,
        ],
        30,
    ),
    cmd(
        READ_DEFECT_DATA_12,
        None,
        "READ DEFECT DATA(12)",
        &[0xb7, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, C],
        5,
    ),
];

/// Does the operation code carry a service action in CDB byte 1?
pub fn has_service_action(opcode: u8) -> bool {
    matches!(
        opcode,
        PERSISTENT_RESERVE_IN | PERSISTENT_RESERVE_OUT | SERVICE_ACTION_IN_16 | MAINTENANCE_IN
    )
}

/// The implemented command with this operation code and (for commands
/// with service actions) service action. `COMMANDS` is sorted, so this is
/// a binary search.
pub fn lookup(opcode: u8, service_action: Option<u8>) -> Option<&'static CommandInfo> {
    let key = (
        opcode,
        service_action.filter(|_| has_service_action(opcode)),
    );
    COMMANDS
        .binary_search_by(|c| (c.opcode, c.service_action).cmp(&key))
        .ok()
        .map(|i| &COMMANDS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        let mut prev = (0u8, None);
        for (i, c) in COMMANDS.iter().enumerate() {
            assert_eq!(Some(c.usage.len()), cdb_len(c.opcode), "{}", c.name);
            assert_eq!(c.usage[0], c.opcode, "{}", c.name);
            if i > 0 {
                assert!(
                    (c.opcode, c.service_action) > prev,
                    "{} out of order",
                    c.name
                );
            }
            prev = (c.opcode, c.service_action);
            if let Some(sa) = c.service_action {
                assert_eq!(c.usage[1] & 0x1f, sa, "{}", c.name);
            }
        }
        assert_eq!(lookup(0x9e, Some(0x10)).unwrap().name, "READ CAPACITY(16)");
        assert!(lookup(0x9e, Some(0x11)).is_none());
        assert!(has_service_action(0xa3));
        assert!(!has_service_action(0x28));
        assert_eq!(lookup(0x28, Some(3)).unwrap().name, "READ(10)");
        assert!(lookup(0x5e, None).is_none());
        // has_service_action agrees with the table.
        for c in COMMANDS {
            assert_eq!(
                has_service_action(c.opcode),
                c.service_action.is_some(),
                "{}",
                c.name
            );
            assert_eq!(lookup(c.opcode, c.service_action), Some(c));
        }
    }
}
