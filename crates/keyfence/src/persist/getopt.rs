//! A command-line scanner with GNU `getopt_long` semantics, so that the
//! sg_persist and mpathpersist front ends accept exactly what the C tools
//! accept: clustered short options (`-nik`), attached or separate option
//! arguments (`-K1`, `-K 1`, `--param-rk=1`, `--param-rk 1`), unambiguous
//! long-option prefixes (`--read-k`), operands anywhere (argument
//! permutation) and `--` to end option processing.

use std::ffi::OsString;

/// Whether an option takes an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HasArg {
    No,
    Required,
}

/// One long option: its name, whether it takes an argument and the short
/// option character (or private code) it maps to.
#[derive(Debug, Clone, Copy)]
pub struct LongOpt {
    pub name: &'static str,
    pub has_arg: HasArg,
    pub val: char,
}

pub const fn lo(name: &'static str, has_arg: HasArg, val: char) -> LongOpt {
    LongOpt { name, has_arg, val }
}

/// One scanned item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An option (by its short character or private code) with its argument.
    Opt(char, Option<String>),
    /// An operand (non-option argument), in command-line order.
    Operand(String),
}

/// A scanning error, already worded the way glibc's getopt words it
/// (without the leading "prog: ").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetoptError(pub String);

/// Scan `args` (without argv[0]) against a getopt short-option string
/// (`"AcCd:G..."`, a colon marks a required argument) and a long-option
/// table. Returns every option in order followed by the operands, as GNU
/// getopt's permutation would present them.
pub fn scan(args: &[OsString], shorts: &str, longs: &[LongOpt]) -> Result<Vec<Item>, GetoptError> {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut opts = Vec::new();
    let mut operands = Vec::new();
    let mut i = 0usize;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = a.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let lopt = match_long(name, longs)?;
            match lopt.has_arg {
                HasArg::No => {
                    if inline.is_some() {
                        return Err(GetoptError(format!(
                            "option '--{}' doesn't allow an argument",
                            lopt.name
                        )));
                    }
                    opts.push(Item::Opt(lopt.val, None));
                }
                HasArg::Required => {
                    let v = match inline {
                        Some(v) => v,
                        None => match args.get(i) {
                            Some(v) => {
                                i += 1;
                                v.clone()
                            }
                            None => {
                                return Err(GetoptError(format!(
                                    "option '--{}' requires an argument",
                                    lopt.name
                                )))
                            }
                        },
                    };
                    opts.push(Item::Opt(lopt.val, Some(v)));
                }
            }
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a.chars().skip(1).collect();
            let mut k = 0usize;
            while k < chars.len() {
                let c = chars[k];
                k += 1;
                let pos = if c == ':' { None } else { shorts.find(c) };
                let Some(pos) = pos else {
                    return Err(GetoptError(format!("invalid option -- '{c}'")));
                };
                let needs_arg = shorts[pos + c.len_utf8()..].starts_with(':');
                if !needs_arg {
                    opts.push(Item::Opt(c, None));
                    continue;
                }
                let v = if k < chars.len() {
                    let rest: String = chars[k..].iter().collect();
                    k = chars.len();
                    rest
                } else if let Some(v) = args.get(i) {
                    i += 1;
                    v.clone()
                } else {
                    return Err(GetoptError(format!("option requires an argument -- '{c}'")));
                };
                opts.push(Item::Opt(c, Some(v)));
            }
            continue;
        }
        operands.push(a.clone());
    }
    opts.extend(operands.into_iter().map(Item::Operand));
    Ok(opts)
}

fn match_long(name: &str, longs: &[LongOpt]) -> Result<LongOpt, GetoptError> {
    if let Some(exact) = longs.iter().find(|l| l.name == name) {
        return Ok(*exact);
    }
    let cands: Vec<&LongOpt> = longs.iter().filter(|l| l.name.starts_with(name)).collect();
    match cands.first() {
        None => Err(GetoptError(format!("unrecognized option '--{name}'"))),
        Some(first) => {
            let ambiguous = cands
                .iter()
                .any(|c| c.val != first.val || c.has_arg != first.has_arg);
            if ambiguous {
                let list: Vec<String> = cands.iter().map(|c| format!("'--{}'", c.name)).collect();
                Err(GetoptError(format!(
                    "option '--{name}' is ambiguous; possibilities: {}",
                    list.join(" ")
                )))
            } else {
                Ok(**first)
            }
        }
    }
}

/// `sscanf(s, "%x")` for a 64-bit target: leading white space, an optional
/// sign, an optional 0x prefix, then hex digits up to the first non-hex
/// character (trailing text is ignored, as the C tools ignore it). A value
/// too large saturates, a minus sign negates modulo 2^64. `None` when no
/// digit could be converted.
pub fn scan_hex_u64(s: &str) -> Option<u64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let t = if (t.starts_with("0x") || t.starts_with("0X"))
        && t.as_bytes().get(2).is_some_and(|b| b.is_ascii_hexdigit())
    {
        &t[2..]
    } else {
        t
    };
    let digits: &str = &t[..t.bytes().take_while(|b| b.is_ascii_hexdigit()).count()];
    if digits.is_empty() {
        return None;
    }
    let v = u64::from_str_radix(digits, 16).unwrap_or(u64::MAX);
    Some(if neg { v.wrapping_neg() } else { v })
}

/// `sscanf(s, "%x")` into a 32-bit unsigned: as [`scan_hex_u64`] with the
/// value truncated the way glibc stores a `long` conversion into an
/// `unsigned int`.
pub fn scan_hex_u32(s: &str) -> Option<u32> {
    scan_hex_u64(s).map(|v| v as u32)
}

/// `sscanf(s, "%d")`: optional white space and sign, then decimal digits.
pub fn scan_dec_i64(s: &str) -> Option<i64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let digits = &t[..t.bytes().take_while(|b| b.is_ascii_digit()).count()];
    if digits.is_empty() {
        return None;
    }
    let v: i64 = digits.parse().unwrap_or(i64::MAX);
    Some(if neg { -v } else { v })
}

/// sg3_utils' `sg_get_num()`: decimal by default, `0x` prefix or `h`
/// suffix for hex, and the dd-style multipliers c, w, b, k, m, g (binary),
/// kb/kd, mb/md, gb/gd (decimal), kib, mib, gib. Returns `None` when the
/// text cannot be decoded or the result does not fit in an `i32`.
pub fn sg_get_num(s: &str) -> Option<u32> {
    let t = s.trim_start_matches([' ', '\t']);
    let end = t.find([' ', '\t', ',', '#']).unwrap_or(t.len());
    let b = &t[..end];
    if b.is_empty() {
        return None;
    }
    let fit = |v: i64| u32::try_from(v).ok().filter(|&v| v <= i32::MAX as u32);
    if let Some(h) = b.strip_prefix("0x").or_else(|| b.strip_prefix("0X")) {
        return scan_hex_u64(h).and_then(|v| fit(i64::try_from(v).ok()?));
    }
    if b.ends_with(['h', 'H']) {
        return scan_hex_u64(b).and_then(|v| fit(i64::try_from(v).ok()?));
    }
    let ndig = b
        .bytes()
        .enumerate()
        .take_while(|(k, c)| c.is_ascii_digit() || (*k == 0 && (*c == b'-' || *c == b'+')))
        .count();
    let num: i64 = b[..ndig].parse().ok()?;
    let suffix = b[ndig..].to_ascii_uppercase();
    let mult: i64 = match suffix.as_str() {
        "" | "C" => 1,
        "W" => 2,
        "B" => 512,
        "K" | "KIB" => 1 << 10,
        "KB" | "KD" => 1000,
        "M" | "MIB" => 1 << 20,
        "MB" | "MD" => 1_000_000,
        "G" | "GIB" => 1 << 30,
        "GB" | "GD" => 1_000_000_000,
        _ => return None,
    };
    fit(num.checked_mul(mult)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONGS: &[LongOpt] = &[
        lo("read-keys", HasArg::No, 'k'),
        lo("read_keys", HasArg::No, 'k'),
        lo("readonly", HasArg::No, 'y'),
        lo("param-rk", HasArg::Required, 'K'),
    ];

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn clustered_and_attached() {
        let r = scan(&os(&["-kK1f", "dev", "-K", "2"]), "kK:", LONGS).unwrap();
        assert_eq!(
            r,
            vec![
                Item::Opt('k', None),
                Item::Opt('K', Some("1f".into())),
                Item::Opt('K', Some("2".into())),
                Item::Operand("dev".into()),
            ]
        );
    }

    #[test]
    fn long_prefixes_and_ambiguity() {
        let r = scan(
            &os(&["--read-k", "--param-rk=5", "--param-rk", "6"]),
            "",
            LONGS,
        )
        .unwrap();
        assert_eq!(r[0], Item::Opt('k', None));
        assert_eq!(r[1], Item::Opt('K', Some("5".into())));
        assert_eq!(r[2], Item::Opt('K', Some("6".into())));
        let e = scan(&os(&["--read"]), "", LONGS).unwrap_err();
        assert_eq!(
            e.0,
            "option '--read' is ambiguous; possibilities: '--read-keys' '--read_keys' '--readonly'"
        );
        // Prefix matching only aliases of the same option is not ambiguous.
        assert_eq!(
            scan(&os(&["--read-"]), "", LONGS).unwrap()[0],
            Item::Opt('k', None)
        );
    }

    #[test]
    fn errors_are_worded_like_glibc() {
        assert_eq!(
            scan(&os(&["--nope"]), "", LONGS).unwrap_err().0,
            "unrecognized option '--nope'"
        );
        assert_eq!(
            scan(&os(&["-q"]), "k", LONGS).unwrap_err().0,
            "invalid option -- 'q'"
        );
        assert_eq!(
            scan(&os(&["-K"]), "K:", LONGS).unwrap_err().0,
            "option requires an argument -- 'K'"
        );
        assert_eq!(
            scan(&os(&["--param-rk"]), "", LONGS).unwrap_err().0,
            "option '--param-rk' requires an argument"
        );
        assert_eq!(
            scan(&os(&["--readonly=1"]), "", LONGS).unwrap_err().0,
            "option '--readonly' doesn't allow an argument"
        );
    }

    #[test]
    fn double_dash_and_lone_dash() {
        let r = scan(&os(&["-", "--", "-k"]), "k", LONGS).unwrap();
        assert_eq!(
            r,
            vec![Item::Operand("-".into()), Item::Operand("-k".into())]
        );
    }

    #[test]
    fn hex_scanning_like_sscanf() {
        assert_eq!(scan_hex_u64("0x123abc"), Some(0x123abc));
        assert_eq!(scan_hex_u64("123ABCzz"), Some(0x123abc));
        assert_eq!(scan_hex_u64("  ff"), Some(0xff));
        assert_eq!(scan_hex_u64("-1"), Some(u64::MAX));
        assert_eq!(scan_hex_u64("1ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(scan_hex_u64("0x"), Some(0));
        assert_eq!(scan_hex_u64("zz"), None);
        assert_eq!(scan_hex_u64(""), None);
        assert_eq!(scan_hex_u32("100000005"), Some(5));
    }

    #[test]
    fn sg_get_num_forms() {
        assert_eq!(sg_get_num("8192"), Some(8192));
        assert_eq!(sg_get_num("8k"), Some(8192));
        assert_eq!(sg_get_num("2000h"), Some(0x2000));
        assert_eq!(sg_get_num("0x2000"), Some(0x2000));
        assert_eq!(sg_get_num("1kb"), Some(1000));
        assert_eq!(sg_get_num("1q"), None);
        assert_eq!(sg_get_num("-1"), None);
        assert_eq!(sg_get_num(""), None);
    }
}
