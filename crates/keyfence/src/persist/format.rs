//! sg_persist's stdout, byte for byte: the INQUIRY header, the four PR IN
//! decodings, the `-H` hex forms and the TransportID decoding used by READ
//! FULL STATUS. Everything here works on the raw PR IN parameter data
//! (zero-padded to the allocation length, as sg_persist's buffer is), and
//! never reads past it.

use std::fmt::Write as _;

/// PR type names as sg_persist prints them (index: TYPE field, 0..=15).
pub const PR_TYPE_STRS: [&str; 16] = [
    "obsolete [0]",
    "Write Exclusive",
    "obsolete [2]",
    "Exclusive Access",
    "obsolete [4]",
    "Write Exclusive, registrants only",
    "Exclusive Access, registrants only",
    "Write Exclusive, all registrants",
    "Exclusive Access, all registrants",
    "obsolete [9]",
    "obsolete [0xa]",
    "obsolete [0xb]",
    "obsolete [0xc]",
    "obsolete [0xd]",
    "obsolete [0xe]",
    "obsolete [0xf]",
];

/// PR IN service action names (sg_persist's `prin_sa_strs`).
pub fn prin_sa_str(sa: u8) -> String {
    match sa {
        0 => "Read keys".into(),
        1 => "Read reservation".into(),
        2 => "Report capabilities".into(),
        3 => "Read full status".into(),
        4..=7 => format!("[reserved 0x{sa:x}]"),
        _ => format!("service action=0x{sa:x}"),
    }
}

/// PR OUT service action names (sg_persist's `prout_sa_strs`).
pub fn prout_sa_str(sa: u8) -> String {
    match sa {
        0 => "Register".into(),
        1 => "Reserve".into(),
        2 => "Release".into(),
        3 => "Clear".into(),
        4 => "Preempt".into(),
        5 => "Preempt and abort".into(),
        6 => "Register and ignore existing key".into(),
        7 => "Register and move".into(),
        8 => "Replace lost reservation".into(),
        9 => "[reserved 0x9]".into(),
        _ => format!("service action=0x{sa:x}"),
    }
}

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    match b.get(off..off + 2) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    match b.get(off..off + 4) {
        Some(s) => u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    match b.get(off..off + 8) {
        Some(s) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_be_bytes(a)
        }
        None => 0,
    }
}

fn byte(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

/// `%.*s`: the bytes up to the first NUL (at most `n`), lossily as text.
fn c_str(b: &[u8], n: usize) -> String {
    let s = &b[..n.min(b.len())];
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..end]).into_owned()
}

/// The INQUIRY lines sg_persist prints unless `-n` is given.
pub fn inquiry_header(inq: &[u8]) -> String {
    let pdt = byte(inq, 0) & 0x1f;
    let vendor = c_str(inq.get(8..16).unwrap_or(&[]), 8);
    let product = c_str(inq.get(16..32).unwrap_or(&[]), 16);
    let rev = c_str(inq.get(32..36).unwrap_or(&[]), 4);
    let mut s = format!("  {vendor}  {product}  {rev}\n");
    match pdt_str(pdt) {
        Some(name) => {
            let _ = writeln!(s, "  Peripheral device type: {name}");
        }
        None => {
            let _ = writeln!(s, "  Peripheral device type: 0x{pdt:x}");
        }
    }
    s
}

/// sg_get_pdt_str() names (SPC-5 table 'peripheral device type').
fn pdt_str(pdt: u8) -> Option<&'static str> {
    Some(match pdt {
        0x00 => "disk",
        0x01 => "tape",
        0x02 => "printer",
        0x03 => "processor",
        0x04 => "write once optical disk",
        0x05 => "cd/dvd",
        0x06 => "scanner",
        0x07 => "optical memory device",
        0x08 => "medium changer",
        0x09 => "communications",
        0x0a => "graphics [0xa]",
        0x0b => "graphics [0xb]",
        0x0c => "storage array controller",
        0x0d => "enclosure services device",
        0x0e => "simplified direct access device",
        0x0f => "optical card reader/writer device",
        0x10 => "bridge controller commands",
        0x11 => "object based storage",
        0x12 => "automation/driver interface",
        0x13 => "security manager device",
        0x14 => "host managed zoned block device",
        0x1e => "well known logical unit",
        0x1f => "unknown or no device type",
        _ => return None,
    })
}

/// sg3_utils `hex2stdout(b, len, no_ascii)` with `no_ascii` 1 (offset at
/// the left, no ASCII column) or -1 (bytes only).
pub fn hex_dump(out: &mut String, b: &[u8], with_address: bool) {
    for (line_no, chunk) in b.chunks(16).enumerate() {
        let mut line = String::new();
        if with_address {
            let _ = write!(line, " {:02x}", line_no * 16);
            while line.len() < 8 {
                line.push(' ');
            }
        }
        for (k, c) in chunk.iter().enumerate() {
            if k == 8 {
                line.push(' ');
            }
            let _ = write!(line, "{c:02x} ");
        }
        let trimmed = line.trim_end_matches(' ');
        out.push_str(trimmed);
        out.push('\n');
    }
}

/// Decode PR IN data the way sg_persist prints it. `buf` is the data
/// returned by the device server; `alloc_len` the allocation length used
/// (sg_persist's buffer size); `hex` the number of `-H` given.
///
/// Returns `Err(text)` for the one malformed case sg_persist refuses (a
/// REPORT CAPABILITIES response whose length field is not 8); `text` is
/// then what goes to stdout before the error.
pub fn prin_output(
    sa: u8,
    buf: &[u8],
    alloc_len: usize,
    hex: u32,
    verbose: u32,
) -> Result<String, String> {
    let mut b = buf[..buf.len().min(alloc_len)].to_vec();
    b.resize(alloc_len, 0);
    let mut s = String::new();
    if sa == 2 {
        if byte(&b, 1) != 8 {
            if hex > 0 {
                let n = (byte(&b, 1) as usize).min(b.len());
                hex_dump(&mut s, &b[..n], true);
            }
            return Err(s);
        }
        if hex > 0 {
            hex_dump(&mut s, &b[..8.min(b.len())], true);
            return Ok(s);
        }
        let f2 = byte(&b, 2);
        let f3 = byte(&b, 3);
        let f4 = byte(&b, 4);
        let f5 = byte(&b, 5);
        let bit = |v: u8, m: u8| u8::from(v & m != 0);
        s.push_str("Report capabilities response:\n");
        let _ = writeln!(
            s,
            "  Replace Lost Reservation Capable(RLR_C): {}",
            bit(f2, 0x80)
        );
        let _ = writeln!(
            s,
            "  Compatible Reservation Handling(CRH): {}",
            bit(f2, 0x10)
        );
        let _ = writeln!(
            s,
            "  Specify Initiator Ports Capable(SIP_C): {}",
            bit(f2, 0x08)
        );
        let _ = writeln!(s, "  All Target Ports Capable(ATP_C): {}", bit(f2, 0x04));
        let _ = writeln!(
            s,
            "  Persist Through Power Loss Capable(PTPL_C): {}",
            bit(f2, 0x01)
        );
        let _ = writeln!(s, "  Type Mask Valid(TMV): {}", bit(f3, 0x80));
        let _ = writeln!(s, "  Allow Commands: {}", (f3 >> 4) & 0x7);
        let _ = writeln!(
            s,
            "  Persist Through Power Loss Active(PTPL_A): {}",
            bit(f3, 0x01)
        );
        if f3 & 0x80 != 0 {
            s.push_str("    Support indicated in Type mask:\n");
            let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[7], bit(f4, 0x80));
            let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[6], bit(f4, 0x40));
            let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[5], bit(f4, 0x20));
            let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[3], bit(f4, 0x08));
            let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[1], bit(f4, 0x02));
            let _ = writeln!(s, "      {}: {}", PR_TYPE_STRS[8], bit(f5, 0x01));
        }
        return Ok(s);
    }
    let pr_gen = be32(&b, 0);
    // sg_persist holds the ADDITIONAL LENGTH in a C int.
    let add_len = be32(&b, 4) as i32;
    if hex > 0 {
        if hex > 1 {
            let n = (i64::from(add_len) + 8).clamp(0, b.len() as i64) as usize;
            hex_dump(&mut s, &b[..n], hex == 2);
        } else {
            let _ = write!(s, "  PR generation=0x{pr_gen:x}, ");
            if add_len <= 0 {
                let _ = writeln!(s, "Additional length={add_len}");
            }
            let room = alloc_len.saturating_sub(8);
            if add_len as u32 as usize > room {
                let _ = writeln!(s, "Additional length too large={add_len}, truncate");
                hex_dump(&mut s, &b[8.min(b.len())..], true);
            } else {
                let _ = writeln!(s, "Additional length={add_len}");
                let n = add_len.max(0) as usize;
                hex_dump(&mut s, &b[8..8 + n], true);
            }
        }
        return Ok(s);
    }
    let body = &b[8.min(b.len())..];
    match sa {
        0 => {
            let _ = write!(s, "  PR generation=0x{pr_gen:x}, ");
            let num = add_len / 8;
            if num > 0 {
                if num == 1 {
                    s.push_str("1 registered reservation key follows:\n");
                } else {
                    let _ = writeln!(s, "{num} registered reservation keys follow:");
                }
                for key in body.chunks_exact(8).take(num as usize) {
                    let _ = writeln!(s, "    0x{:x}", be64(key, 0));
                }
            } else {
                s.push_str("there are NO registered reservation keys\n");
            }
        }
        1 => {
            let _ = write!(s, "  PR generation=0x{pr_gen:x}, ");
            let num = add_len / 16;
            if num > 0 {
                s.push_str("Reservation follows:\n");
                let _ = writeln!(s, "    Key=0x{:x}", be64(body, 0));
                push_scope_type(&mut s, "    ", byte(body, 13));
            } else {
                s.push_str("there is NO reservation held\n");
            }
        }
        3 => {
            let _ = writeln!(s, "  PR generation=0x{pr_gen:x}");
            if add_len == 0 {
                s.push_str("  No full status descriptors\n");
                if verbose > 0 {
                    s.push_str("  So there are no registered IT nexuses\n");
                }
            }
            let total = (add_len.max(0) as usize).min(body.len());
            let mut k = 0usize;
            while k < total {
                let d = &body[k..];
                if d.len() < 24 {
                    break;
                }
                let add_desc_len = be32(d, 20) as usize;
                let _ = writeln!(s, "    Key=0x{:x}", be64(d, 0));
                if d[12] & 0x2 != 0 {
                    s.push_str("      All target ports bit set\n");
                } else {
                    s.push_str("      All target ports bit clear\n");
                    let _ = writeln!(s, "      Relative port address: 0x{:x}", be16(d, 18));
                }
                if d[12] & 0x1 != 0 {
                    s.push_str("      << Reservation holder >>\n");
                    push_scope_type(&mut s, "      ", d[13]);
                } else {
                    s.push_str("      not reservation holder\n");
                }
                if add_desc_len > 0 {
                    let tid_end = (24 + add_desc_len).min(d.len());
                    decode_transport_id(&mut s, "      ", &d[24..tid_end], add_desc_len);
                }
                k = k.saturating_add(24 + add_desc_len);
            }
        }
        _ => {}
    }
    Ok(s)
}

fn push_scope_type(s: &mut String, lead: &str, scope_type: u8) {
    let scope = scope_type >> 4;
    if scope == 0 {
        let _ = write!(s, "{lead}scope: LU_SCOPE, ");
    } else {
        let _ = write!(s, "{lead}scope: {scope} ");
    }
    let _ = writeln!(s, " type: {}", PR_TYPE_STRS[(scope_type & 0xf) as usize]);
}

/// sg_decode_transportid_str(lead, tid, len, only_one=true).
/// `declared_len` is the descriptor's ADDITIONAL DESCRIPTOR LENGTH; `tid`
/// may be shorter if the response was truncated.
pub fn decode_transport_id(s: &mut String, lip: &str, tid: &[u8], declared_len: usize) {
    if declared_len < 24 || declared_len & 3 != 0 {
        // sg3_utils prints the size of its own text buffer here (1024),
        // not the TransportID length; reproduced for identical output.
        let _ = writeln!(
            s,
            "{lip}Transport Id short or not multiple of 4 [length=1024]:"
        );
    } else {
        let _ = writeln!(s, "{lip}Transport Id of initiator:");
    }
    let b0 = byte(tid, 0);
    let format = (b0 >> 6) & 0x3;
    let proto = b0 & 0xf;
    let normal_len = tid.len().min(24);
    let unexpected = |s: &mut String| {
        if format != 0 {
            let _ = writeln!(s, "{lip}  [Unexpected TPID format: {format}]");
        }
    };
    match proto {
        0x0 => {
            let _ = writeln!(s, "{lip}  FCP-2 World Wide Name:");
            unexpected(s);
            hex_lead(s, tid.get(8..16).unwrap_or(&[]), lip);
        }
        0x1 => {
            let _ = writeln!(
                s,
                "{lip}  Parallel SCSI initiator SCSI address: 0x{:x}",
                be16(tid, 2)
            );
            unexpected(s);
            let _ = writeln!(
                s,
                "{lip}  relative port number (of corresponding target): 0x{:x}",
                be16(tid, 6)
            );
        }
        0x2 => {
            let _ = writeln!(s, "{lip}  SSA (transport id not defined):");
            let _ = writeln!(s, "{lip}  TPID format: {format}");
            hex_lead(s, &tid[..normal_len], lip);
        }
        0x3 => {
            let _ = writeln!(s, "{lip}  IEEE 1394 EUI-64 name:");
            unexpected(s);
            hex_lead(s, tid.get(8..16).unwrap_or(&[]), lip);
        }
        0x4 => {
            let _ = writeln!(s, "{lip}  RDMA initiator port identifier:");
            unexpected(s);
            hex_lead(s, tid.get(8..24).unwrap_or(&[]), lip);
        }
        0x5 => {
            let _ = write!(s, "{lip}  iSCSI ");
            let num = be16(tid, 2) as usize;
            let name = tid.get(4..).unwrap_or(&[]);
            match format {
                0 => {
                    let _ = writeln!(s, "name: {}", c_str(name, num));
                }
                1 => {
                    let _ = writeln!(s, "world wide unique port id: {}", c_str(name, num));
                }
                _ => {
                    let _ = writeln!(s, "  [Unexpected TPID format: {format}]");
                    hex_lead(s, &tid[..(num + 4).min(tid.len())], lip);
                }
            }
        }
        0x6 => {
            let _ = writeln!(s, "{lip}  SAS address: 0x{:x}", be64(tid, 4));
            unexpected(s);
        }
        0x7 => {
            let _ = writeln!(s, "{lip}  ADT:");
            let _ = writeln!(s, "{lip}  TPID format: {format}");
            hex_lead(s, &tid[..normal_len], lip);
        }
        0x8 => {
            let _ = writeln!(s, "{lip}  ATAPI:");
            let _ = writeln!(s, "{lip}  TPID format: {format}");
            hex_lead(s, &tid[..normal_len], lip);
        }
        0x9 => {
            let _ = writeln!(s, "{lip}  UAS:");
            let _ = writeln!(s, "{lip}  TPID format: {format}");
            hex_lead(s, &tid[..normal_len], lip);
        }
        0xa => {
            let _ = write!(s, "{lip}  SOP ");
            if format == 0 {
                let _ = writeln!(s, "Routing ID: 0x{:x}", be16(tid, 2));
            } else {
                let _ = writeln!(s, "  [Unexpected TPID format: {format}]");
                hex_lead(s, &tid[..normal_len], lip);
            }
        }
        0xb => {
            let _ = writeln!(s, "{lip}  PCIE:");
            let _ = writeln!(s, "{lip}  TPID format: {format}");
            hex_lead(s, &tid[..normal_len], lip);
        }
        0xf => {
            let _ = writeln!(s, "{lip}  No specified protocol");
        }
        _ => {
            let _ = writeln!(
                s,
                "{lip}  unknown protocol id=0x{proto:x}  TPID format={format}"
            );
            hex_lead(s, &tid[..normal_len], lip);
        }
    }
}

/// sg3_utils hex2str(b, len, leadin, format=1): 16 bytes a line, each line
/// prefixed with the lead-in, an extra space after the 8th byte.
fn hex_lead(s: &mut String, b: &[u8], lip: &str) {
    for chunk in b.chunks(16) {
        let mut line = String::from(lip);
        for (k, c) in chunk.iter().enumerate() {
            if k == 8 {
                line.push(' ');
            }
            let _ = write!(line, "{c:02x} ");
        }
        s.push_str(line.trim_end_matches(' '));
        s.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(gen: u32, keys: &[u64]) -> Vec<u8> {
        let mut v = gen.to_be_bytes().to_vec();
        v.extend(((keys.len() * 8) as u32).to_be_bytes());
        for k in keys {
            v.extend(k.to_be_bytes());
        }
        v
    }

    #[test]
    fn read_keys_text() {
        let out = prin_output(0, &keys(3, &[0x123abc, 0x1]), 8192, 0, 0).unwrap();
        assert_eq!(
            out,
            "  PR generation=0x3, 2 registered reservation keys follow:\n    0x123abc\n    0x1\n"
        );
        let out = prin_output(0, &keys(3, &[0xabc]), 8192, 0, 0).unwrap();
        assert_eq!(
            out,
            "  PR generation=0x3, 1 registered reservation key follows:\n    0xabc\n"
        );
        let out = prin_output(0, &keys(3, &[]), 8192, 0, 0).unwrap();
        assert_eq!(
            out,
            "  PR generation=0x3, there are NO registered reservation keys\n"
        );
    }

    #[test]
    fn read_keys_truncated_by_alloc_len_never_reads_past() {
        // Device says 3 keys but allocation length only holds one.
        let out = prin_output(0, &keys(1, &[1, 2, 3]), 16, 0, 0).unwrap();
        assert_eq!(
            out,
            "  PR generation=0x1, 3 registered reservation keys follow:\n    0x1\n"
        );
    }

    #[test]
    fn read_reservation_text() {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend(16u32.to_be_bytes());
        v.extend(0x123abcu64.to_be_bytes());
        v.extend([0, 0, 0, 0, 0, 0x05, 0, 0]);
        assert_eq!(
            prin_output(1, &v, 8192, 0, 0).unwrap(),
            "  PR generation=0x3, Reservation follows:\n    Key=0x123abc\n    scope: LU_SCOPE,  type: Write Exclusive, registrants only\n"
        );
        let none = [0, 0, 0, 3, 0, 0, 0, 0];
        assert_eq!(
            prin_output(1, &none, 8192, 0, 0).unwrap(),
            "  PR generation=0x3, there is NO reservation held\n"
        );
    }

    fn fs_desc(key: u64, flags: u8, st: u8, rtpi: u16, iqn: &str, isid: Option<&str>) -> Vec<u8> {
        let mut name = iqn.as_bytes().to_vec();
        if let Some(i) = isid {
            name.extend(b",i,0x");
            name.extend(i.as_bytes());
        }
        name.push(0);
        while name.len() & 3 != 0 || name.len() < 20 {
            name.push(0);
        }
        let mut tid = vec![if isid.is_some() { 0x45 } else { 0x05 }, 0];
        tid.extend((name.len() as u16).to_be_bytes());
        tid.extend(&name);
        let mut d = key.to_be_bytes().to_vec();
        d.extend([0, 0, 0, 0, flags, st, 0, 0, 0, 0]);
        d.extend(rtpi.to_be_bytes());
        d.extend((tid.len() as u32).to_be_bytes());
        d.extend(tid);
        d
    }

    #[test]
    fn read_full_status_text() {
        let mut body = fs_desc(
            0xabc,
            0x01,
            0x05,
            1,
            "iqn.1994-05.com.example:a",
            Some("23d000000001"),
        );
        body.extend(fs_desc(0x1, 0x02, 0, 0, "iqn.1994-05.com.example:b", None));
        let mut v = 7u32.to_be_bytes().to_vec();
        v.extend((body.len() as u32).to_be_bytes());
        v.extend(body);
        let expect = concat!(
            "  PR generation=0x7\n",
            "    Key=0xabc\n",
            "      All target ports bit clear\n",
            "      Relative port address: 0x1\n",
            "      << Reservation holder >>\n",
            "      scope: LU_SCOPE,  type: Write Exclusive, registrants only\n",
            "      Transport Id of initiator:\n",
            "        iSCSI world wide unique port id: iqn.1994-05.com.example:a,i,0x23d000000001\n",
            "    Key=0x1\n",
            "      All target ports bit set\n",
            "      not reservation holder\n",
            "      Transport Id of initiator:\n",
            "        iSCSI name: iqn.1994-05.com.example:b\n"
        );
        assert_eq!(prin_output(3, &v, 8192, 0, 0).unwrap(), expect);
        let empty = [0, 0, 0, 9, 0, 0, 0, 0];
        assert_eq!(
            prin_output(3, &empty, 8192, 0, 1).unwrap(),
            "  PR generation=0x9\n  No full status descriptors\n  So there are no registered IT nexuses\n"
        );
    }

    #[test]
    fn full_status_with_lying_lengths_is_bounded() {
        let mut v = 1u32.to_be_bytes().to_vec();
        v.extend(1000u32.to_be_bytes());
        let mut d = 5u64.to_be_bytes().to_vec();
        d.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        d.extend(0xffff_fff0u32.to_be_bytes());
        d.extend([0x05, 0, 0, 200]);
        v.extend(d);
        let out = prin_output(3, &v, 64, 0, 0).unwrap();
        assert_eq!(
            out,
            concat!(
                "  PR generation=0x1\n",
                "    Key=0x5\n",
                "      All target ports bit clear\n",
                "      Relative port address: 0x1\n",
                "      not reservation holder\n",
                "      Transport Id of initiator:\n",
                "        iSCSI name: \n"
            )
        );
    }

    #[test]
    fn report_capabilities_text() {
        let v = [0, 8, 0x9d, 0x81, 0xea, 0x01, 0, 0];
        let expect = concat!(
            "Report capabilities response:\n",
            "  Replace Lost Reservation Capable(RLR_C): 1\n",
            "  Compatible Reservation Handling(CRH): 1\n",
            "  Specify Initiator Ports Capable(SIP_C): 1\n",
            "  All Target Ports Capable(ATP_C): 1\n",
            "  Persist Through Power Loss Capable(PTPL_C): 1\n",
            "  Type Mask Valid(TMV): 1\n",
            "  Allow Commands: 0\n",
            "  Persist Through Power Loss Active(PTPL_A): 1\n",
            "    Support indicated in Type mask:\n",
            "      Write Exclusive, all registrants: 1\n",
            "      Exclusive Access, registrants only: 1\n",
            "      Write Exclusive, registrants only: 1\n",
            "      Exclusive Access: 1\n",
            "      Write Exclusive: 1\n",
            "      Exclusive Access, all registrants: 1\n"
        );
        assert_eq!(prin_output(2, &v, 8192, 0, 0).unwrap(), expect);
        assert!(prin_output(2, &[0, 6, 0, 0, 0, 0], 8192, 0, 0).is_err());
        assert_eq!(
            prin_output(2, &v, 8192, 1, 0).unwrap(),
            " 00     00 08 9d 81 ea 01 00 00\n"
        );
    }

    #[test]
    fn hex_forms() {
        let v = keys(3, &[0x0102030405060708, 0x1112131415161718]);
        assert_eq!(
            prin_output(0, &v, 8192, 1, 0).unwrap(),
            "  PR generation=0x3, Additional length=16\n 00     01 02 03 04 05 06 07 08  11 12 13 14 15 16 17 18\n"
        );
        assert_eq!(
            prin_output(0, &keys(3, &[]), 8192, 1, 0).unwrap(),
            "  PR generation=0x3, Additional length=0\nAdditional length=0\n"
        );
        assert_eq!(
            prin_output(0, &v, 8192, 2, 0).unwrap(),
            " 00     00 00 00 03 00 00 00 10  01 02 03 04 05 06 07 08\n 10     11 12 13 14 15 16 17 18\n"
        );
        assert_eq!(
            prin_output(0, &v, 8192, 3, 0).unwrap(),
            "00 00 00 03 00 00 00 10  01 02 03 04 05 06 07 08\n11 12 13 14 15 16 17 18\n"
        );
    }

    #[test]
    fn inquiry_lines() {
        let mut inq = vec![0u8; 36];
        inq[8..16].copy_from_slice(b"KEYFENCE");
        inq[16..32].copy_from_slice(b"VIRTUAL-DISK    ");
        inq[32..36].copy_from_slice(b"0001");
        assert_eq!(
            inquiry_header(&inq),
            "  KEYFENCE  VIRTUAL-DISK      0001\n  Peripheral device type: disk\n"
        );
        inq[0] = 0x15;
        assert!(inquiry_header(&inq).ends_with("Peripheral device type: 0x15\n"));
    }
}
