//! mpathpersist's stdout for PR IN data (multipath-tools 0.9.4 layout:
//! the TAB in the keys line, `Key = 0x…`, the trailing blanks), and the
//! MPATH_PR_* exit statuses.

use std::fmt::Write as _;

use keyfence_initiator::Error;
use keyfence_scsi::SenseKey;

use crate::persist::format::{be16, be32, be64, PR_TYPE_STRS};

/// libmpathpersist return statuses (mpath_persist.h), used as exit status.
/// The list is complete even where keyfence never returns a value.
#[allow(dead_code)]
pub mod code {
    pub const SUCCESS: u8 = 0;
    pub const SYNTAX_ERROR: u8 = 1;
    pub const SENSE_NOT_READY: u8 = 2;
    pub const SENSE_MEDIUM_ERROR: u8 = 3;
    pub const SENSE_HARDWARE_ERROR: u8 = 4;
    pub const ILLEGAL_REQ: u8 = 5;
    pub const SENSE_UNIT_ATTENTION: u8 = 6;
    pub const SENSE_INVALID_OP: u8 = 7;
    pub const SENSE_ABORTED_COMMAND: u8 = 8;
    pub const NO_SENSE: u8 = 9;
    pub const SENSE_MALFORMED: u8 = 10;
    pub const RESERV_CONFLICT: u8 = 11;
    pub const FILE_ERROR: u8 = 12;
    pub const DMMP_ERROR: u8 = 13;
    pub const THREAD_ERROR: u8 = 14;
    pub const OTHER: u8 = 15;
}

/// mpath_translate_response(): status of a failed command.
pub fn status_of(e: &Error) -> u8 {
    match e {
        Error::ReservationConflict => code::RESERV_CONFLICT,
        Error::UnitAttention(_) => code::SENSE_UNIT_ATTENTION,
        Error::CheckCondition(s) => match s.key {
            SenseKey::NoSense => code::NO_SENSE,
            SenseKey::RecoveredError => code::SUCCESS,
            SenseKey::NotReady => code::SENSE_NOT_READY,
            SenseKey::MediumError => code::SENSE_MEDIUM_ERROR,
            SenseKey::HardwareError => code::SENSE_HARDWARE_ERROR,
            SenseKey::IllegalRequest => code::ILLEGAL_REQ,
            SenseKey::UnitAttention => code::SENSE_UNIT_ATTENTION,
            SenseKey::AbortedCommand => code::SENSE_ABORTED_COMMAND,
            _ => code::OTHER,
        },
        Error::BadData { .. } => code::SENSE_MALFORMED,
        _ => code::OTHER,
    }
}

/// Status of a failed multipath operation: no usable path is
/// MPATH_PR_DMMP_ERROR, a device's answer is translated as above.
pub fn status_of_fence(e: &keyfence_fence::Error) -> u8 {
    match e {
        keyfence_fence::Error::NoPath => code::DMMP_ERROR,
        e => e.scsi().map_or(code::OTHER, status_of),
    }
}

fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// mpathpersist's dumpHex(..., log=0) for up to 16 bytes.
fn dump_hex(s: &mut String, b: &[u8]) {
    for chunk in b.chunks(16) {
        let mut line = String::from("        ");
        for (k, c) in chunk.iter().enumerate() {
            if k == 8 {
                line.push(' ');
            }
            let _ = write!(line, "{c:02x} ");
        }
        line.pop();
        s.push_str(&line);
        s.push('\n');
    }
}

/// READ KEYS output.
pub fn read_keys(b: &[u8]) -> String {
    let mut s = format!("  PR generation=0x{:x}, ", be32(b, 0));
    let num = be32(b, 4) / 8;
    match num {
        0 => s.push_str("\t0 registered reservation key.\n"),
        1 => s.push_str("\t1 registered reservation key follows:\n"),
        n => {
            let _ = writeln!(s, "\t{n} registered reservation keys follow:");
        }
    }
    let body = b.get(8..).unwrap_or(&[]);
    for k in body.chunks_exact(8).take(num as usize) {
        let _ = writeln!(s, "    0x{:x}", be64(k, 0));
    }
    s
}

/// READ RESERVATION output.
pub fn read_reservation(b: &[u8]) -> String {
    let gen = be32(b, 0);
    if be32(b, 4) / 8 == 0 {
        return format!("  PR generation=0x{gen:x}, there is NO reservation held \n");
    }
    let mut s = format!("  PR generation=0x{gen:x}, Reservation follows:\n");
    let _ = writeln!(s, "   Key = 0x{:x}", be64(b, 8));
    let st = b.get(21).copied().unwrap_or(0);
    let scope = st >> 4;
    let ty = PR_TYPE_STRS[(st & 0xf) as usize];
    if scope == 0 {
        let _ = writeln!(s, "  scope = LU_SCOPE, type = {ty}");
    } else {
        let _ = writeln!(s, "  scope = {scope}, type = {ty}");
    }
    s
}

/// REPORT CAPABILITIES output; `Err` carries the stderr complaint for a
/// response too short to decode.
pub fn report_capabilities(b: &[u8]) -> Result<String, String> {
    if be16(b, 0) <= 2 {
        return Err("Unexpected response for PRIN Report Capabilities\n".into());
    }
    let f0 = b.get(2).copied().unwrap_or(0);
    let f1 = b.get(3).copied().unwrap_or(0);
    let m4 = b.get(4).copied().unwrap_or(0);
    let m5 = b.get(5).copied().unwrap_or(0);
    let bit = |v: u8, m: u8| u8::from(v & m != 0);
    let mut s = String::from("Report capabilities response:\n");
    let _ = writeln!(
        s,
        "  Compatible Reservation Handling(CRH): {}",
        bit(f0, 0x10)
    );
    let _ = writeln!(
        s,
        "  Specify Initiator Ports Capable(SIP_C): {}",
        bit(f0, 0x08)
    );
    let _ = writeln!(s, "  All Target Ports Capable(ATP_C): {}", bit(f0, 0x04));
    let _ = writeln!(
        s,
        "  Persist Through Power Loss Capable(PTPL_C): {}",
        bit(f0, 0x01)
    );
    let _ = writeln!(s, "  Type Mask Valid(TMV): {}", bit(f1, 0x80));
    let _ = writeln!(s, "  Allow Commands: {}", u8::from((f1 >> 4) & 0x7 != 0));
    let _ = writeln!(
        s,
        "  Persist Through Power Loss Active(PTPL_A): {}",
        bit(f1, 0x01)
    );
    if f1 & 0x80 != 0 {
        s.push_str("    Support indicated in Type mask:\n");
        let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[7], bit(m4, 0x80));
        let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[6], bit(m4, 0x40));
        let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[5], bit(m4, 0x20));
        let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[3], bit(m4, 0x08));
        let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[1], bit(m4, 0x02));
        let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[8], bit(m5, 0x01));
    }
    Ok(s)
}

/// READ FULL STATUS output.
pub fn read_full_status(b: &[u8]) -> String {
    let mut s = format!("  PR generation=0x{:x} \n", be32(b, 0));
    let add_len = be32(b, 4) as usize;
    let body = b.get(8..).unwrap_or(&[]);
    let total = add_len.min(body.len());
    let mut k = 0usize;
    while k + 24 <= total {
        let d = &body[k..total];
        let tid_len = be32(d, 20) as usize;
        let _ = writeln!(s, "   Key = 0x{:x}", be64(d, 0));
        if d[12] & 0x02 != 0 {
            s.push_str("      All target ports bit set\n");
        } else {
            s.push_str("      All target ports bit clear\n");
            let _ = writeln!(s, "      Relative port address: 0x{:x}", be16(d, 18));
        }
        if d[12] & 0x01 != 0 {
            s.push_str("      << Reservation holder >>\n");
            let scope = d[13] >> 4;
            if scope == 0 {
                s.push_str("      scope: LU_SCOPE, ");
            } else {
                let _ = write!(s, "      scope: {scope} ");
            }
            let _ = writeln!(s, " type: {}", PR_TYPE_STRS[(d[13] & 0xf) as usize]);
        } else {
            s.push_str("      not reservation holder\n");
        }
        let tid = &d[24..(24 + tid_len).min(d.len())];
        if !tid.is_empty() {
            let format = tid[0] >> 6;
            match tid[0] & 0xf {
                0x0 => {
                    s.push_str("   FCP-2 ");
                    if format != 0 {
                        let _ = writeln!(s, " [Unexpected format code: {format}]");
                    }
                    dump_hex(&mut s, tid.get(8..16).unwrap_or(&[]));
                }
                0x5 => {
                    s.push_str("   iSCSI ");
                    let n = be16(tid, 2) as usize;
                    let name = tid.get(4..(4 + n).min(tid.len())).unwrap_or(&[]);
                    match format {
                        0 => {
                            let _ = writeln!(s, "name: {}", c_str(name));
                        }
                        1 => {
                            let _ = writeln!(s, "world wide unique port id: {}", c_str(name));
                        }
                        f => {
                            let _ = writeln!(s, "  [Unexpected format code: {f}]");
                            dump_hex(&mut s, name);
                        }
                    }
                }
                0x6 => {
                    s.push_str("   SAS ");
                    if format != 0 {
                        let _ = writeln!(s, " [Unexpected format code: {format}]");
                    }
                    dump_hex(&mut s, tid.get(4..12).unwrap_or(&[]));
                }
                _ => {}
            }
        }
        k = k.saturating_add(24 + tid_len);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_layout() {
        let mut v = vec![0, 0, 0, 3, 0, 0, 0, 16];
        v.extend(0x123abcu64.to_be_bytes());
        v.extend(1u64.to_be_bytes());
        assert_eq!(
            read_keys(&v),
            "  PR generation=0x3, \t2 registered reservation keys follow:\n    0x123abc\n    0x1\n"
        );
        assert_eq!(
            read_keys(&[0, 0, 0, 3, 0, 0, 0, 0]),
            "  PR generation=0x3, \t0 registered reservation key.\n"
        );
        assert_eq!(
            read_keys(&[0, 0, 0, 3, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 9]),
            "  PR generation=0x3, \t1 registered reservation key follows:\n    0x9\n"
        );
    }

    #[test]
    fn reservation_layout() {
        let mut v = vec![0, 0, 0, 4, 0, 0, 0, 16];
        v.extend(0xabcu64.to_be_bytes());
        v.extend([0, 0, 0, 0, 0, 0x05, 0, 0]);
        assert_eq!(
            read_reservation(&v),
            "  PR generation=0x4, Reservation follows:\n   Key = 0xabc\n  scope = LU_SCOPE, type = Write Exclusive, registrants only\n"
        );
        assert_eq!(
            read_reservation(&[0, 0, 0, 4, 0, 0, 0, 0]),
            "  PR generation=0x4, there is NO reservation held \n"
        );
    }

    #[test]
    fn full_status_layout() {
        let name = b"iqn.a,i,0x1\0";
        let mut tid = vec![0x45, 0, 0, 12];
        tid.extend(name);
        tid.resize(24, 0);
        let mut d = 7u64.to_be_bytes().to_vec();
        d.extend([0, 0, 0, 0, 0x01, 0x05, 0, 0, 0, 0, 0, 2]);
        d.extend((tid.len() as u32).to_be_bytes());
        d.extend(&tid);
        let mut v = vec![0, 0, 0, 5];
        v.extend((d.len() as u32).to_be_bytes());
        v.extend(d);
        assert_eq!(
            read_full_status(&v),
            concat!(
                "  PR generation=0x5 \n",
                "   Key = 0x7\n",
                "      All target ports bit clear\n",
                "      Relative port address: 0x2\n",
                "      << Reservation holder >>\n",
                "      scope: LU_SCOPE,  type: Write Exclusive, registrants only\n",
                "   iSCSI world wide unique port id: iqn.a,i,0x1\n"
            )
        );
    }

    #[test]
    fn capabilities_layout() {
        assert!(report_capabilities(&[0, 2]).is_err());
        let s = report_capabilities(&[0, 8, 0x0d, 0x81, 0xea, 0x01, 0, 0]).unwrap();
        assert!(s.starts_with(
            "Report capabilities response:\n  Compatible Reservation Handling(CRH): 0\n"
        ));
        assert!(s.contains("  Persist Through Power Loss Capable(PTPL_C): 1\n"));
        assert!(s.ends_with("      Exclusive Access, all registrants: 1\n"));
    }

    #[test]
    fn statuses() {
        assert_eq!(
            status_of(&Error::ReservationConflict),
            code::RESERV_CONFLICT
        );
        let ua =
            keyfence_scsi::Sense::unit_attention(keyfence_scsi::sense::asc::RESERVATIONS_PREEMPTED);
        assert_eq!(
            status_of(&Error::UnitAttention(ua)),
            code::SENSE_UNIT_ATTENTION
        );
        let ir = keyfence_scsi::Sense::invalid_cdb_field(1, None);
        assert_eq!(status_of(&Error::CheckCondition(ir)), code::ILLEGAL_REQ);
        assert_eq!(status_of(&Error::SessionClosed), code::OTHER);
    }
}
