//! `--transport-id` arguments in every form sg_persist accepts: a symbolic
//! TransportID (`iqn.NAME`, `iqn.NAME,i,0xISID`, `sas,HEX16`, `fcp,HEX16`,
//! `spi,ADDR,RTPI`, `sbp,HEX16`, `srp,HEX32`, `sop,HEX`), a list of hex
//! bytes separated by commas or single spaces, `file=FN` (one TransportID
//! per line, `#` comments) or `-` (the same from stdin).
//!
//! Each TransportID comes back as its SPC-4 encoding, already cut to the
//! length it occupies in a PR OUT parameter list (24 bytes, or the iSCSI
//! ADDITIONAL LENGTH + 4).

use std::io::BufRead;

/// Largest TransportID slot sg_persist keeps (MX_TID_LEN).
pub const MAX_TID_LEN: usize = 256;
/// sg_persist's TransportID array holds 32 slots and refuses the 32nd.
pub const MAX_TIDS: usize = 32;

const HEX_DIGITS: &str = "0123456789aAbBcCdDeEfF";

/// Protocol identifiers (SPC-4 table 444).
mod proto {
    pub const FCP: u8 = 0x0;
    pub const SPI: u8 = 0x1;
    pub const SBP: u8 = 0x3;
    pub const SRP: u8 = 0x4;
    pub const ISCSI: u8 = 0x5;
    pub const SAS: u8 = 0x6;
    pub const SOP: u8 = 0xa;
}

fn hex_pairs(s: &str, n: usize) -> Option<Vec<u8>> {
    let digits = s.get(..n)?;
    if !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..n / 2)
        .map(|k| u8::from_str_radix(&digits[2 * k..2 * k + 2], 16).ok())
        .collect()
}

fn span(s: &str, set: &str) -> usize {
    s.chars().take_while(|c| set.contains(*c)).count()
}

/// Decode a symbolic TransportID. On failure the complaint sg_persist
/// prints goes to `err` and `None` comes back.
pub fn decode_symbolic(s: &str, err: &mut String) -> Option<Vec<u8>> {
    let mut t = vec![0u8; 24];
    let prefix = s.get(..4).map(str::to_ascii_lowercase);
    let rest = s.get(4..).unwrap_or("");
    match prefix.as_deref() {
        Some("sas,") => {
            let ok = span(rest, HEX_DIGITS) == 16;
            match hex_pairs(rest, 16).filter(|_| ok) {
                Some(b) => {
                    t[0] = proto::SAS;
                    t[4..12].copy_from_slice(&b);
                    Some(t)
                }
                None => {
                    err.push_str(&format!("badly formed symbolic SAS TransportID: {rest}\n"));
                    None
                }
            }
        }
        Some("fcp,") | Some("sbp,") => {
            let (name, p) = if prefix.as_deref() == Some("fcp,") {
                ("FCP", proto::FCP)
            } else {
                ("SBP", proto::SBP)
            };
            let ok = span(rest, HEX_DIGITS) == 16;
            match hex_pairs(rest, 16).filter(|_| ok) {
                Some(b) => {
                    t[0] = p;
                    t[8..16].copy_from_slice(&b);
                    Some(t)
                }
                None => {
                    err.push_str(&format!(
                        "badly formed symbolic {name} TransportID: {rest}\n"
                    ));
                    None
                }
            }
        }
        Some("srp,") => {
            let ok = span(rest, HEX_DIGITS) == 32;
            match hex_pairs(rest, 32).filter(|_| ok) {
                Some(b) => {
                    t[0] = proto::SRP;
                    t[8..24].copy_from_slice(&b);
                    Some(t)
                }
                None => {
                    err.push_str(&format!("badly formed symbolic SRP TransportID: {rest}\n"));
                    None
                }
            }
        }
        Some("spi,") => {
            let parsed = rest.split_once(',').and_then(|(a, b)| {
                let a = super::getopt::scan_dec_i64(a)?;
                let b = super::getopt::scan_dec_i64(b)?;
                Some((a as u16, b as u16))
            });
            match parsed {
                Some((addr, rtpi)) => {
                    t[0] = proto::SPI;
                    t[2..4].copy_from_slice(&addr.to_be_bytes());
                    t[6..8].copy_from_slice(&rtpi.to_be_bytes());
                    Some(t)
                }
                None => {
                    err.push_str(&format!("badly formed symbolic SPI TransportID: {rest}\n"));
                    None
                }
            }
        }
        Some("sop,") => match super::getopt::scan_hex_u64(rest).filter(|&v| v <= 0xffff) {
            Some(v) => {
                t[0] = proto::SOP;
                t[2..4].copy_from_slice(&(v as u16).to_be_bytes());
                Some(t)
            }
            None => {
                err.push_str(&format!("badly formed symbolic SOP TransportID: {rest}\n"));
                None
            }
        },
        _ if s.starts_with("iqn.") => {
            let end = s.find([' ', '\t']).unwrap_or(s.len());
            let name = &s[..end];
            let with_isid = name.contains(",i,0x");
            let mut alen = name.len() + 1;
            if alen < 20 {
                alen = 20;
            } else if alen & 3 != 0 {
                alen = (alen / 4 + 1) * 4;
            }
            if alen > 241 {
                err.push_str(&format!("iSCSI name too long, alen={alen}\n"));
                return None;
            }
            let mut t = vec![0u8; (4 + alen).max(24)];
            t[0] = proto::ISCSI | if with_isid { 0x40 } else { 0 };
            t[2..4].copy_from_slice(&(alen as u16).to_be_bytes());
            t[4..4 + name.len()].copy_from_slice(name.as_bytes());
            Some(t)
        }
        _ => {
            err.push_str(&format!("unable to parse symbolic TransportID: {s}\n"));
            None
        }
    }
}

/// Cut a TransportID slot to the length it occupies in a parameter list
/// (sg_persist's compact_transportid_array).
fn compact(mut slot: Vec<u8>) -> Result<Vec<u8>, String> {
    slot.resize(slot.len().max(24), 0);
    let len = if slot[0] & 0xf == proto::ISCSI {
        (u16::from_be_bytes([slot[2], slot[3]]) as usize + 4).max(24)
    } else {
        24
    };
    if len > MAX_TID_LEN {
        return Err(format!(
            "TransportID too long: {len} bytes (at most {MAX_TID_LEN})\n"
        ));
    }
    slot.resize(len, 0);
    Ok(slot)
}

/// Parse one `--transport-id` argument. `stdin` supplies the text for `-`.
/// Errors carry the full stderr text sg_persist would print before
/// "bad argument to '--transport-id'".
pub fn parse_arg(
    arg: &str,
    stdin: &mut dyn BufRead,
    warn: &mut String,
) -> Result<Vec<Vec<u8>>, String> {
    if arg.starts_with('-') || arg.starts_with("file=") || arg.starts_with("FILE=") {
        let text = if arg.starts_with('-') {
            let mut s = String::new();
            stdin
                .read_to_string(&mut s)
                .map_err(|e| format!("decode_file_tids: unable to read stdin: {e}\n"))?;
            s
        } else {
            let fname = &arg[5..];
            std::fs::read_to_string(fname)
                .map_err(|_| format!("decode_file_tids: unable to open {fname}\n"))?
        };
        return parse_file_text(&text, warn);
    }
    let mut err = String::new();
    if let Some(t) = decode_symbolic(arg, &mut err) {
        warn.push_str(&err);
        return Ok(vec![compact(t)?]);
    }
    // sg_persist reports the failed symbolic parse even when the text then
    // turns out to be a hex list.
    warn.push_str(&err);
    let k = span(arg, "0123456789aAbBcCdDeEfF, ");
    if k != arg.chars().count() {
        return Err(format!("build_transportid: error at pos {}\n", k + 1));
    }
    let mut bytes = Vec::new();
    let mut pos = 0usize;
    loop {
        let rest = &arg[pos..];
        let Some(h) = super::getopt::scan_hex_u64(rest) else {
            return Err(format!("build_transportid: error at pos {}\n", pos + 1));
        };
        if h > 0xff {
            return Err(format!(
                "build_transportid: hex number larger than 0xff at pos {}\n",
                pos + 1
            ));
        }
        if bytes.len() >= MAX_TID_LEN {
            return Err("build_transportid: array length exceeded\n".into());
        }
        bytes.push(h as u8);
        match rest.find([',', ' ']) {
            Some(sep) => pos += sep + 1,
            None => break,
        }
    }
    Ok(vec![compact(bytes)?])
}

/// TransportIDs from a file's text (or stdin), one a line.
pub fn parse_file_text(text: &str, warn: &mut String) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for (j, line) in text.lines().enumerate().take(512) {
        let m = span(line, " \t");
        let lcp = &line[m..];
        if lcp.is_empty() || lcp.starts_with('#') {
            continue;
        }
        let mut err = String::new();
        let tid = if let Some(t) = decode_symbolic(lcp, &mut err) {
            t
        } else {
            warn.push_str(&err);
            let k = span(lcp, "0123456789aAbBcCdDeEfF ,\t");
            if k < lcp.len() && !lcp[k..].starts_with('#') {
                return Err(format!(
                    "decode_file_tids: syntax error at line {}, pos {}\n",
                    j + 1,
                    m + k + 1
                ));
            }
            let mut bytes = Vec::new();
            let mut pos = 0usize;
            while pos < k {
                let rest = &lcp[pos..k];
                let Some(h) = super::getopt::scan_hex_u64(rest) else {
                    break;
                };
                if h > 0xff {
                    return Err(format!(
                        "decode_file_tids: hex number larger than 0xff in line {}, pos {}\n",
                        j + 1,
                        m + pos + 1
                    ));
                }
                if bytes.len() >= MAX_TID_LEN {
                    return Err("decode_file_tids: array length exceeded\n".into());
                }
                bytes.push(h as u8);
                match rest.find([' ', ',', '\t']) {
                    Some(sep) => {
                        pos += sep;
                        pos += span(&lcp[pos..k], " ,\t");
                    }
                    None => break,
                }
            }
            bytes
        };
        out.push(compact(tid)?);
        if out.len() >= MAX_TIDS {
            return Err("decode_file_tids: array length exceeded\n".into());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &str) -> Result<Vec<Vec<u8>>, String> {
        let mut w = String::new();
        parse_arg(a, &mut std::io::empty(), &mut w)
    }

    #[test]
    fn iscsi_names() {
        let t = &parse("iqn.2026-11.io.keyfence:node1").unwrap()[0];
        // 29 chars + NUL = 30 -> rounded to 32
        assert_eq!(t.len(), 36);
        assert_eq!(&t[..4], &[0x05, 0, 0, 32]);
        assert_eq!(&t[4..33], b"iqn.2026-11.io.keyfence:node1");
        assert!(t[33..].iter().all(|&b| b == 0));
        let t = &parse("iqn.a,i,0x23d000000001").unwrap()[0];
        assert_eq!(t[0], 0x45);
        assert_eq!(t[3], 24);
        assert_eq!(&t[4..26], b"iqn.a,i,0x23d000000001");
        let t = &parse("iqn.x").unwrap()[0];
        assert_eq!(t.len(), 24);
        assert_eq!(t[3], 20);
        let long = format!("iqn.{}", "a".repeat(240));
        assert!(parse(&long).is_err());
    }

    #[test]
    fn hex_list_and_symbolic_forms() {
        let t = &parse("6,0,0,0,50,00,c5,00,05,b3,20,01").unwrap()[0];
        assert_eq!(t.len(), 24);
        assert_eq!(&t[..12], &[6, 0, 0, 0, 0x50, 0, 0xc5, 0, 5, 0xb3, 0x20, 1]);
        let s = &parse("sas,5000c50005b32001").unwrap()[0];
        assert_eq!(s, t);
        let t = &parse("1 2 3").unwrap()[0];
        assert_eq!(&t[..4], &[1, 2, 3, 0]);
        assert_eq!(
            parse("1,2,3g").unwrap_err(),
            "build_transportid: error at pos 6\n"
        );
        assert_eq!(
            parse("1,123").unwrap_err(),
            "build_transportid: hex number larger than 0xff at pos 3\n"
        );
        assert!(parse("sas,123").is_err());
        let f = &parse("fcp,0102030405060708").unwrap()[0];
        assert_eq!(&f[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let p = &parse("spi,7,2").unwrap()[0];
        assert_eq!(&p[..8], &[1, 0, 0, 7, 0, 0, 0, 2]);
    }

    #[test]
    fn file_and_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let fname = dir.path().join("tids");
        std::fs::write(
            &fname,
            "# initiators\n  iqn.a,i,0x1\n\n5,0,0,14, 69,71,6e,2e,62 # trailing\nsas,5000c50005b32001\n",
        )
        .unwrap();
        let v = parse(&format!("file={}", fname.display())).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0][0], 0x45);
        assert_eq!(&v[1][..9], &[5, 0, 0, 0x14, b'i', b'q', b'n', b'.', b'b']);
        assert_eq!(v[2][0], 6);
        let mut w = String::new();
        let mut input = std::io::Cursor::new(b"iqn.c\n".to_vec());
        let v = parse_arg("-", &mut input, &mut w).unwrap();
        assert_eq!(&v[0][4..9], b"iqn.c");
        assert_eq!(
            parse("file=/nonexistent/x").unwrap_err(),
            "decode_file_tids: unable to open /nonexistent/x\n"
        );
        std::fs::write(&fname, "5,0,zz\n").unwrap();
        assert_eq!(
            parse(&format!("file={}", fname.display())).unwrap_err(),
            "decode_file_tids: syntax error at line 1, pos 5\n"
        );
    }
}
