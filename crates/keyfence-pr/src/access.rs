//! Which commands a persistent reservation lets through: SPC-5 table 65
//! ("SPC commands that are allowed in the presence of various
//! reservations") and the SBC-3 table for block commands, as ONE table.
//!
//! Each row gives the answer for a command received from an I_T nexus
//! that is not a reservation holder, in the five columns of the standard:
//!
//! | column | reservation type | nexus |
//! |---|---|---|
//! | `we` | Write Exclusive | any non-holder |
//! | `ea` | Exclusive Access | any non-holder |
//! | `reg` | registrants-only / all-registrants | registered |
//! | `we_rr` | WE registrants-only / all-registrants | not registered |
//! | `ea_rr` | EA registrants-only / all-registrants | not registered |
//!
//! Holders are always allowed. Where SPC-5 marks an entry "Allowed (b)"
//! (older standards may conflict) keyfence allows it, and reports ALLOW
//! COMMANDS = 011b in REPORT CAPABILITIES, which is exactly this set:
//! TEST UNIT READY through WE and EA; MODE SENSE, READ ATTRIBUTE, READ
//! BUFFER, RECEIVE DIAGNOSTIC RESULTS, REPORT SUPPORTED OPERATION CODES,
//! REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS and READ DEFECT DATA through
//! WE; RECEIVE COPY RESULTS (LID1 service actions) through neither.
//!
//! PERSISTENT RESERVE OUT and RESERVE/RELEASE(6/10) pass this table: the
//! engine applies SPC-5 table 66 and 5.13.3 itself, per service action.

use keyfence_scsi::pr_data::PrType;

/// Allowed or conflict, as in the standard's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    A,
    C,
}
use Entry::{A, C};

/// How a row recognises its command.
#[derive(Debug, Clone, Copy)]
pub enum Match {
    /// Any CDB with this operation code.
    Op(u8),
    /// Operation code plus service action in byte 1 bits 4-0.
    Sa(u8, u8),
    /// Variable-length CDB (7Fh) with this service action (bytes 8-9).
    Var(u16),
    /// Operation code plus a condition on the CDB.
    When(u8, fn(&[u8]) -> bool),
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub name: &'static str,
    pub matches: Match,
    /// `[we, ea, reg, we_rr, ea_rr]`, see the module documentation.
    pub access: [Entry; 5],
}

const ALL: [Entry; 5] = [A, A, A, A, A];
/// Conflicts with every reservation type unless registered under RR.
const WRITE: [Entry; 5] = [C, C, A, C, C];
/// Allowed through Write Exclusive types only (reads).
const READ: [Entry; 5] = [A, C, A, A, C];

const fn row(name: &'static str, matches: Match, access: [Entry; 5]) -> Row {
    Row {
        name,
        matches,
        access,
    }
}

fn start_stop_power_on(cdb: &[u8]) -> bool {
    // START=1 and POWER CONDITION=0h.
    cdb.get(4).is_some_and(|b| b & 0x01 != 0 && b >> 4 == 0)
}

fn start_stop_other(cdb: &[u8]) -> bool {
    !start_stop_power_on(cdb)
}

fn prevent_zero(cdb: &[u8]) -> bool {
    cdb.get(4).is_some_and(|b| b & 0x03 == 0)
}

fn prevent_nonzero(cdb: &[u8]) -> bool {
    !prevent_zero(cdb)
}

/// THE table. The first matching row decides; a command not listed is
/// treated like a write (conflict unless registered under RR).
pub static TABLE: &[Row] = &[
    // ---- SPC-5 table 65 ----
    row("ACCESS CONTROL IN", Match::Op(0x86), ALL),
    row("ACCESS CONTROL OUT", Match::Op(0x87), ALL),
    row("CHANGE ALIASES", Match::Sa(0xa4, 0x0b), WRITE),
    row("REMOVE I_T NEXUS", Match::Sa(0xa4, 0x0c), WRITE),
    row("MANAGEMENT PROTOCOL OUT", Match::Sa(0xa4, 0x10), WRITE),
    row("SET IDENTIFYING INFORMATION", Match::Sa(0xa4, 0x06), WRITE),
    row("SET TARGET PORT GROUPS", Match::Sa(0xa4, 0x0a), WRITE),
    row("SET PRIORITY", Match::Sa(0xa4, 0x0e), WRITE),
    row("SET TIMESTAMP", Match::Sa(0xa4, 0x0f), WRITE),
    row(
        "EXTENDED COPY / COPY OPERATION ABORT / tokens",
        Match::Op(0x83),
        WRITE,
    ),
    row("INQUIRY", Match::Op(0x12), ALL),
    row("LOG SELECT", Match::Op(0x4c), WRITE),
    row("LOG SENSE", Match::Op(0x4d), ALL),
    row("MANAGEMENT PROTOCOL IN", Match::Sa(0xa3, 0x10), READ),
    row("REPORT IDENTIFYING INFORMATION", Match::Sa(0xa3, 0x05), ALL),
    row("REPORT TARGET PORT GROUPS", Match::Sa(0xa3, 0x0a), ALL),
    row("REPORT ALIASES", Match::Sa(0xa3, 0x0b), ALL),
    row(
        "REPORT SUPPORTED OPERATION CODES",
        Match::Sa(0xa3, 0x0c),
        READ,
    ),
    row(
        "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
        Match::Sa(0xa3, 0x0d),
        READ,
    ),
    row("REPORT PRIORITY", Match::Sa(0xa3, 0x0e), ALL),
    row("REPORT TIMESTAMP", Match::Sa(0xa3, 0x0f), ALL),
    row("MODE SELECT(6)", Match::Op(0x15), WRITE),
    row("MODE SELECT(10)", Match::Op(0x55), WRITE),
    row("MODE SENSE(6)", Match::Op(0x1a), READ),
    row("MODE SENSE(10)", Match::Op(0x5a), READ),
    row("PERSISTENT RESERVE IN", Match::Op(0x5e), ALL),
    row(
        "PERSISTENT RESERVE OUT (table 66 in engine)",
        Match::Op(0x5f),
        ALL,
    ),
    row("READ ATTRIBUTE", Match::Op(0x8c), READ),
    row("READ BUFFER(10)", Match::Op(0x3c), READ),
    row("READ BUFFER(16)", Match::Op(0x9b), READ),
    row("READ MEDIA SERIAL NUMBER", Match::Sa(0xab, 0x01), ALL),
    row("RECEIVE CREDENTIAL", Match::Var(0x1800), WRITE),
    row("RECEIVE COPY STATUS(LID4)", Match::Sa(0x84, 0x05), ALL),
    row("RECEIVE COPY DATA(LID4)", Match::Sa(0x84, 0x06), ALL),
    row("RECEIVE ROD TOKEN INFORMATION", Match::Sa(0x84, 0x07), ALL),
    row("REPORT ALL ROD TOKENS", Match::Sa(0x84, 0x08), ALL),
    // LID1 RECEIVE COPY RESULTS service actions: not allowed through WE
    // or EA (ALLOW COMMANDS 011b).
    row("RECEIVE COPY RESULTS (LID1)", Match::Op(0x84), WRITE),
    row("RECEIVE DIAGNOSTIC RESULTS", Match::Op(0x1c), READ),
    row("RELEASE(6) (SPC-2, 5.13.3 in engine)", Match::Op(0x17), ALL),
    row(
        "RELEASE(10) (SPC-2, 5.13.3 in engine)",
        Match::Op(0x57),
        ALL,
    ),
    row("RESERVE(6) (SPC-2, 5.13.3 in engine)", Match::Op(0x16), ALL),
    row(
        "RESERVE(10) (SPC-2, 5.13.3 in engine)",
        Match::Op(0x56),
        ALL,
    ),
    row("REPORT LUNS", Match::Op(0xa0), ALL),
    row("REQUEST SENSE", Match::Op(0x03), ALL),
    row("SECURITY PROTOCOL IN", Match::Op(0xa2), READ),
    row("SECURITY PROTOCOL OUT", Match::Op(0xb5), WRITE),
    row("SEND DIAGNOSTIC", Match::Op(0x1d), WRITE),
    row("TEST UNIT READY", Match::Op(0x00), ALL),
    row("WRITE ATTRIBUTE", Match::Op(0x8d), WRITE),
    row("WRITE BUFFER", Match::Op(0x3b), WRITE),
    // ---- SBC-3 ----
    row("COMPARE AND WRITE", Match::Op(0x89), WRITE),
    row("FORMAT UNIT", Match::Op(0x04), WRITE),
    row("READ CAPACITY(16)", Match::Sa(0x9e, 0x10), ALL),
    row("READ LONG(16)", Match::Sa(0x9e, 0x11), READ),
    row("GET LBA STATUS", Match::Sa(0x9e, 0x12), READ),
    row("REPORT REFERRALS", Match::Sa(0x9e, 0x13), READ),
    row("WRITE LONG(16)", Match::Sa(0x9f, 0x11), WRITE),
    row("ORWRITE(16)", Match::Op(0x8b), WRITE),
    row("PRE-FETCH(10)", Match::Op(0x34), READ),
    row("PRE-FETCH(16)", Match::Op(0x90), READ),
    row(
        "PREVENT ALLOW MEDIUM REMOVAL (PREVENT=0)",
        Match::When(0x1e, prevent_zero),
        ALL,
    ),
    row(
        "PREVENT ALLOW MEDIUM REMOVAL (PREVENT<>0)",
        Match::When(0x1e, prevent_nonzero),
        WRITE,
    ),
    row("READ(6)", Match::Op(0x08), READ),
    row("READ(10)", Match::Op(0x28), READ),
    row("READ(12)", Match::Op(0xa8), READ),
    row("READ(16)", Match::Op(0x88), READ),
    row("READ(32)", Match::Var(0x0009), READ),
    row("READ CAPACITY(10)", Match::Op(0x25), ALL),
    row("READ DEFECT DATA(10)", Match::Op(0x37), READ),
    row("READ DEFECT DATA(12)", Match::Op(0xb7), READ),
    row("READ LONG(10)", Match::Op(0x3e), READ),
    row("REASSIGN BLOCKS", Match::Op(0x07), WRITE),
    row("SANITIZE", Match::Op(0x48), WRITE),
    row(
        "START STOP UNIT (START=1, POWER CONDITION=0)",
        Match::When(0x1b, start_stop_power_on),
        ALL,
    ),
    row(
        "START STOP UNIT (other)",
        Match::When(0x1b, start_stop_other),
        WRITE,
    ),
    row("SYNCHRONIZE CACHE(10)", Match::Op(0x35), WRITE),
    row("SYNCHRONIZE CACHE(16)", Match::Op(0x91), WRITE),
    row("UNMAP", Match::Op(0x42), WRITE),
    row("VERIFY(10)", Match::Op(0x2f), READ),
    row("VERIFY(12)", Match::Op(0xaf), READ),
    row("VERIFY(16)", Match::Op(0x8f), READ),
    row("VERIFY(32)", Match::Var(0x000a), READ),
    row("WRITE(6)", Match::Op(0x0a), WRITE),
    row("WRITE(10)", Match::Op(0x2a), WRITE),
    row("WRITE(12)", Match::Op(0xaa), WRITE),
    row("WRITE(16)", Match::Op(0x8a), WRITE),
    row("WRITE(32)", Match::Var(0x000b), WRITE),
    row("WRITE AND VERIFY(10)", Match::Op(0x2e), WRITE),
    row("WRITE AND VERIFY(12)", Match::Op(0xae), WRITE),
    row("WRITE AND VERIFY(16)", Match::Op(0x8e), WRITE),
    row("WRITE AND VERIFY(32)", Match::Var(0x000c), WRITE),
    row("WRITE LONG(10)", Match::Op(0x3f), WRITE),
    row("WRITE SAME(10)", Match::Op(0x41), WRITE),
    row("WRITE SAME(16)", Match::Op(0x93), WRITE),
    row("WRITE SAME(32)", Match::Var(0x000d), WRITE),
    row("ORWRITE(32)", Match::Var(0x000e), WRITE),
    row("XDREAD(10)", Match::Op(0x52), READ),
    row("XDWRITE(10)", Match::Op(0x50), WRITE),
    row("XDWRITEREAD(10)", Match::Op(0x53), WRITE),
    row("XPWRITE(10)", Match::Op(0x51), WRITE),
];

/// The row for a command not in the table.
pub static UNLISTED: Row = row("(not listed)", Match::Op(0xff), WRITE);

fn row_matches(r: &Row, cdb: &[u8]) -> bool {
    let Some(&op) = cdb.first() else {
        return false;
    };
    match r.matches {
        Match::Op(o) => o == op,
        Match::Sa(o, sa) => o == op && cdb.get(1).is_some_and(|b| b & 0x1f == sa),
        Match::Var(sa) => {
            op == 0x7f
                && cdb
                    .get(8..10)
                    .is_some_and(|b| u16::from_be_bytes([b[0], b[1]]) == sa)
        }
        Match::When(o, f) => o == op && f(cdb),
    }
}

/// The row that governs `cdb`.
pub fn lookup(cdb: &[u8]) -> &'static Row {
    TABLE
        .iter()
        .find(|r| row_matches(r, cdb))
        .unwrap_or(&UNLISTED)
}

/// The table entry for a command from a non-holder under a reservation
/// of `pr_type`, `registered` telling whether the nexus is registered.
pub fn entry(cdb: &[u8], pr_type: PrType, registered: bool) -> Entry {
    let r = lookup(cdb);
    let col = if !pr_type.registrants_type() {
        if pr_type.write_exclusive() {
            0
        } else {
            1
        }
    } else if registered {
        2
    } else if pr_type.write_exclusive() {
        3
    } else {
        4
    };
    r.access[col]
}

/// Commands that run while persistent reservation information is lost or
/// nonvolatile memory is not ready (SPC-5 5.13.5.2).
pub fn allowed_while_pr_lost(cdb: &[u8]) -> bool {
    match cdb.first() {
        Some(0x12 | 0x4d | 0x3c | 0x9b | 0xa0 | 0x03 | 0x3b) => true,
        Some(0xa3) => cdb.get(1).is_some_and(|b| b & 0x1f == 0x0a),
        Some(0x1b) => start_stop_power_on(cdb),
        // PERSISTENT RESERVE OUT with REPLACE LOST RESERVATION.
        Some(0x5f) => cdb.get(1).is_some_and(|b| b & 0x1f == 0x08),
        _ => false,
    }
}

/// Commands another I_T nexus may send while an SPC-2 RESERVE(6)/(10)
/// reservation is held (SPC-2 5.5.1): INQUIRY, REQUEST SENSE, REPORT
/// LUNS, and RELEASE (which then has no effect).
pub fn allowed_under_spc2(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(0x12 | 0x03 | 0xa0 | 0x17 | 0x57))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_reachable() {
        // A row shadowed by an earlier row would be dead text.
        for (i, r) in TABLE.iter().enumerate() {
            let mut cdb = [0u8; 16];
            match r.matches {
                Match::Op(o) => cdb[0] = o,
                Match::Sa(o, sa) => {
                    cdb[0] = o;
                    cdb[1] = sa;
                }
                Match::Var(sa) => {
                    cdb[0] = 0x7f;
                    cdb[8..10].copy_from_slice(&sa.to_be_bytes());
                }
                Match::When(o, f) => {
                    cdb[0] = o;
                    // find a byte 4 value satisfying the predicate
                    let v = (0u8..=255)
                        .find(|v| {
                            cdb[4] = *v;
                            f(&cdb)
                        })
                        .expect("predicate satisfiable");
                    cdb[4] = v;
                }
            }
            let hit = lookup(&cdb);
            assert_eq!(hit.name, r.name, "row {i} shadowed by {}", hit.name);
            // The registered column of RR types is always Allowed (SPC-5
            // table 65 and SBC-3).
            assert_eq!(r.access[2], A, "{}", r.name);
        }
    }

    #[test]
    fn representative_entries() {
        let read10 = [0x28u8, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let write10 = [0x2au8, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        use PrType::*;
        assert_eq!(entry(&read10, WriteExclusive, false), A);
        assert_eq!(entry(&read10, WriteExclusive, true), A);
        assert_eq!(entry(&write10, WriteExclusive, true), C);
        assert_eq!(entry(&read10, ExclusiveAccess, true), C);
        assert_eq!(entry(&write10, ExclusiveAccessRegistrantsOnly, true), A);
        assert_eq!(entry(&read10, ExclusiveAccessAllRegistrants, false), C);
        assert_eq!(entry(&read10, WriteExclusiveAllRegistrants, false), A);
        assert_eq!(entry(&write10, WriteExclusiveAllRegistrants, false), C);
        let tur = [0u8; 6];
        assert_eq!(entry(&tur, ExclusiveAccess, false), A);
        let mode_sense = [0x1au8, 0, 0x3f, 0, 0xff, 0];
        assert_eq!(entry(&mode_sense, WriteExclusive, false), A);
        assert_eq!(entry(&mode_sense, ExclusiveAccess, false), C);
        let rtpg = [0xa3u8, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(entry(&rtpg, ExclusiveAccess, false), A);
        let rsoc = [0xa3u8, 0x0c, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(entry(&rsoc, ExclusiveAccess, false), C);
        let rc16 = [0x9eu8, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
        assert_eq!(entry(&rc16, ExclusiveAccess, false), A);
        let sss_start = [0x1bu8, 0, 0, 0, 0x01, 0];
        let sss_stop = [0x1bu8, 0, 0, 0, 0x00, 0];
        assert_eq!(entry(&sss_start, ExclusiveAccess, false), A);
        assert_eq!(entry(&sss_stop, WriteExclusive, false), C);
        let unmap = [0x42u8, 0, 0, 0, 0, 0, 0, 0, 24, 0];
        assert_eq!(entry(&unmap, WriteExclusive, false), C);
        let unknown = [0xc0u8, 0, 0, 0, 0, 0];
        assert_eq!(entry(&unknown, WriteExclusive, false), C);
        assert_eq!(entry(&unknown, WriteExclusiveRegistrantsOnly, true), A);
    }
}
