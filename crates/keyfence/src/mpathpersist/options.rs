//! mpathpersist's command line: options (getopt, as mpathpersist 0.9.4
//! spells them), their checks and messages, and the usage text.

use std::ffi::OsString;
use std::path::PathBuf;

use keyfence_scsi::transport_id::TransportId;

use super::format::code;
use super::PROG;
use crate::persist::getopt::{self, lo, HasArg, Item, LongOpt};

pub(crate) const SHORTS: &str = "v:Cd:hHioYZK:S:PAT:skrGILcRX:l:f:";
const OPT_CONFIG: char = '\u{1}';
const OPT_INITIATOR_NAME: char = '\u{2}';
const OPT_REREGISTER: char = '\u{3}';

pub(crate) const LONGS: &[LongOpt] = &[
    lo("verbose", HasArg::Required, 'v'),
    lo("clear", HasArg::No, 'C'),
    lo("device", HasArg::Required, 'd'),
    lo("help", HasArg::No, 'h'),
    lo("hex", HasArg::No, 'H'),
    lo("in", HasArg::No, 'i'),
    lo("out", HasArg::No, 'o'),
    lo("param-alltgpt", HasArg::No, 'Y'),
    lo("param-aptpl", HasArg::No, 'Z'),
    lo("param-rk", HasArg::Required, 'K'),
    lo("param-sark", HasArg::Required, 'S'),
    lo("preempt", HasArg::No, 'P'),
    lo("preempt-abort", HasArg::No, 'A'),
    lo("prout-type", HasArg::Required, 'T'),
    lo("read-full-status", HasArg::No, 's'),
    lo("read-keys", HasArg::No, 'k'),
    lo("read-reservation", HasArg::No, 'r'),
    lo("register", HasArg::No, 'G'),
    lo("register-ignore", HasArg::No, 'I'),
    lo("release", HasArg::No, 'L'),
    lo("report-capabilities", HasArg::No, 'c'),
    lo("reserve", HasArg::No, 'R'),
    lo("transport-id", HasArg::Required, 'X'),
    lo("alloc-length", HasArg::Required, 'l'),
    lo("batch-file", HasArg::Required, 'f'),
    lo("config", HasArg::Required, OPT_CONFIG),
    lo("initiator-name", HasArg::Required, OPT_INITIATOR_NAME),
    lo("reregister", HasArg::No, OPT_REREGISTER),
];

pub const USAGE: &str = "Usage: mpathpersist [OPTIONS] [DEVICE]
 Options:
    --verbose|-v level         verbosity level
                   0           Critical messages
                   1           Error messages
                   2           Warning messages
                   3           Informational messages
                   4           Informational messages with trace enabled
    --clear|-C                 PR Out: Clear
    --device=DEVICE|-d DEVICE  query or change DEVICE
    --batch-file|-f FILE       run commands from FILE
    --help|-h                  output this usage message
    --hex|-H                   output response in hex
    --in|-i                    request PR In command 
    --out|-o                   request PR Out command
    --param-alltgpt|-Y         PR Out parameter 'ALL_TG_PT
    --param-aptpl|-Z           PR Out parameter 'APTPL'
    --read-keys|-k             PR In: Read Keys
    --param-rk=RK|-K RK        PR Out parameter reservation key
    --param-sark=SARK|-S SARK  PR Out parameter service action
                               reservation key (SARK is in hex)
    --preempt|-P               PR Out: Preempt
    --preempt-abort|-A         PR Out: Preempt and Abort
    --prout-type=TYPE|-T TYPE  PR Out command type
    --read-full-status|-s      PR In: Read Full Status
    --read-keys|-k             PR In: Read Keys
    --read-reservation|-r      PR In: Read Reservation
    --register|-G              PR Out: Register
    --register-ignore|-I       PR Out: Register and Ignore
    --release|-L               PR Out: Release
    --report-capabilities|-c   PR In: Report Capabilities
    --reserve|-R               PR Out: Reserve
    --transport-id=TIDS|-X TIDS  TransportIDs can be mentioned
                                 in several forms
    --alloc-length=LEN|-l LEN  PR In: maximum allocation length
 keyfence extensions:
    --config=FILE              map configuration (default $KEYFENCE_CONFIG,
                               then /etc/keyfence/keyfence.toml)
    --initiator-name=IQN       initiator name to log in with
    --reregister               register every path that has no registration
";

pub const MAX_PARAM_LEN: u32 = 8192;

/// One parsed command (one command line or one batch-file line).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmd {
    pub device: Option<String>,
    pub prin: bool,
    pub prout: bool,
    pub prin_sa: Option<u8>,
    pub prout_sa: Option<u8>,
    pub prout_type: u8,
    pub rk: u64,
    pub sark: u64,
    pub alltgpt: bool,
    pub aptpl: bool,
    pub tids: Vec<TransportId>,
    pub hex: bool,
    pub alloc_len: Option<u32>,
    pub loglevel: Option<i64>,
    pub batch: Option<String>,
    pub config: Option<PathBuf>,
    pub initiator_name: Option<String>,
    pub reregister: bool,
    pub help: bool,
}

/// Settings that outlive one batch line: given on the command line,
/// they hold for every line of its batch file.
#[derive(Debug, Clone, Default)]
pub struct BatchSettings {
    pub verbose: i64,
    pub config: Option<PathBuf>,
    pub initiator_name: Option<String>,
    pub alloc_len: Option<u32>,
}

/// Parse one command line; `line` is 0 for argv, else the batch line.
pub fn parse(args: &[OsString], line: usize, err: &mut String) -> Result<Cmd, u8> {
    let items = match getopt::scan(args, SHORTS, LONGS) {
        Ok(v) => v,
        Err(e) => {
            err.push_str(&format!("{PROG}: {}\n", e.0));
            err.push_str("unrecognised switch code 0x3f ??\n");
            return Err(code::SYNTAX_ERROR);
        }
    };
    let mut c = Cmd::default();
    let mut num_prin = 0;
    let mut num_prout = 0;
    let mut extra = Vec::new();
    for it in items {
        let (o, arg) = match it {
            Item::Operand(s) => {
                if c.device.is_none() {
                    c.device = Some(s);
                } else {
                    extra.push(s);
                }
                continue;
            }
            Item::Opt(o, a) => (o, a.unwrap_or_default()),
        };
        match o {
            'f' => {
                if line != 0 {
                    err.push_str("ERROR: -f option not allowed in batch file\n");
                    return Err(code::SYNTAX_ERROR);
                }
                if c.batch.is_some() {
                    err.push_str("ERROR: -f option can be used at most once\n");
                    return Err(code::SYNTAX_ERROR);
                }
                c.batch = Some(arg);
            }
            'v' => {
                if line == 0 {
                    match getopt::scan_dec_i64(&arg) {
                        Some(v) => c.loglevel = Some(v),
                        None => {
                            err.push_str("bad argument to '--verbose'\n");
                            return Err(code::SYNTAX_ERROR);
                        }
                    }
                }
            }
            'C' | 'P' | 'A' | 'G' | 'I' | 'L' | 'R' => {
                c.prout_sa = Some(match o {
                    'G' => 0,
                    'R' => 1,
                    'L' => 2,
                    'C' => 3,
                    'P' => 4,
                    'A' => 5,
                    _ => 6,
                });
                num_prout += 1;
            }
            's' | 'k' | 'r' | 'c' => {
                c.prin_sa = Some(match o {
                    'k' => 0,
                    'r' => 1,
                    'c' => 2,
                    _ => 3,
                });
                num_prin += 1;
            }
            'd' => c.device = Some(arg),
            'h' => c.help = true,
            'H' => c.hex = true,
            'i' => c.prin = true,
            'o' => c.prout = true,
            'Y' => c.alltgpt = true,
            'Z' => c.aptpl = true,
            'K' | 'S' => match getopt::scan_hex_u64(&arg) {
                Some(v) if o == 'K' => c.rk = v,
                Some(v) => c.sark = v,
                None => {
                    err.push_str(if o == 'K' {
                        "bad argument to '--param-rk'\n"
                    } else {
                        "bad argument to '--param-sark'\n"
                    });
                    return Err(code::SYNTAX_ERROR);
                }
            },
            'T' => match getopt::scan_hex_u32(&arg) {
                Some(v) if v <= 0xf => c.prout_type = v as u8,
                _ => {
                    err.push_str("bad argument to '--prout-type'\n");
                    return Err(code::SYNTAX_ERROR);
                }
            },
            'X' => {
                let lower = arg.get(..4).map(str::to_ascii_lowercase);
                let known = arg.starts_with("iqn.")
                    || matches!(lower.as_deref(), Some("sas,") | Some("fcp,"));
                let mut msg = String::new();
                let tid = known
                    .then(|| crate::persist::tid::decode_symbolic(&arg, &mut msg))
                    .flatten()
                    .and_then(|b| TransportId::parse(&b).ok().map(|(t, _)| t));
                match tid {
                    Some(t) if c.tids.len() < crate::persist::tid::MAX_TIDS => c.tids.push(t),
                    _ => {
                        err.push_str(&msg);
                        err.push_str("bad argument to '--transport-id'\n");
                        return Err(code::SYNTAX_ERROR);
                    }
                }
            }
            'l' => match getopt::scan_dec_i64(&arg).and_then(|v| u32::try_from(v).ok()) {
                None => {
                    err.push_str("bad argument to '--alloc-length'\n");
                    return Err(code::SYNTAX_ERROR);
                }
                Some(v) if v > MAX_PARAM_LEN => {
                    err.push_str(&format!(
                        "'--alloc-length' argument exceeds maximum limit({MAX_PARAM_LEN})\n"
                    ));
                    return Err(code::SYNTAX_ERROR);
                }
                Some(v) => c.alloc_len = Some(v),
            },
            OPT_CONFIG => c.config = Some(PathBuf::from(arg)),
            OPT_INITIATOR_NAME => c.initiator_name = Some(arg),
            OPT_REREGISTER => c.reregister = true,
            other => {
                err.push_str(&format!(
                    "unrecognised switch code 0x{:x} ??\n",
                    other as u32
                ));
                return Err(code::SYNTAX_ERROR);
            }
        }
    }
    if c.help {
        return Ok(c);
    }
    if !extra.is_empty() {
        for e in extra {
            err.push_str(&format!("Unexpected extra argument: {e}\n"));
        }
        return Err(code::SYNTAX_ERROR);
    }
    if c.reregister {
        if c.prin || c.prout {
            err.push_str("--reregister is an action of its own: drop '--in'/'--out'\n");
            return Err(code::SYNTAX_ERROR);
        }
    } else if !c.prin && !c.prout {
        if c.batch.is_none() {
            err.push_str("choose either '--in' or '--out' \n");
            return Err(code::SYNTAX_ERROR);
        }
        return Ok(c);
    } else if c.prin && c.prout {
        err.push_str("choose either '--in' or '--out' \n");
        return Err(code::SYNTAX_ERROR);
    } else if c.prout {
        if num_prout != 1 || num_prin != 0 {
            err.push_str(" For Persistent Reserve Out only one appropriate\n service action must be chosen \n");
            return Err(code::SYNTAX_ERROR);
        }
    } else {
        if num_prout > 0 {
            err.push_str(" When a service action for Persistent Reserve Out is chosen the\n '--out' option must be given \n");
            return Err(code::SYNTAX_ERROR);
        }
        if num_prin == 0 {
            err.push_str(" No service action given for Persistent Reserve IN\n");
            return Err(code::SYNTAX_ERROR);
        }
        if num_prin > 1 {
            err.push_str(" Too many service actions given; choose one only\n");
            return Err(code::SYNTAX_ERROR);
        }
    }
    if c.prout && matches!(c.prout_sa, Some(1) | Some(2) | Some(4) | Some(5)) && c.prout_type == 0 {
        err.push_str("Warning: --prout-type probably needs to be given\n");
    }
    if c.device.is_none() {
        err.push_str("No device name given \n");
        return Err(code::SYNTAX_ERROR);
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> (Result<Cmd, u8>, String) {
        let v: Vec<OsString> = args.iter().map(OsString::from).collect();
        let mut e = String::new();
        (parse(&v, 0, &mut e), e)
    }

    #[test]
    fn fence_mpath_command_lines() {
        let (c, e) = p(&[
            "-o",
            "--preempt-abort",
            "--prout-type=5",
            "--param-rk=1",
            "--param-sark=2",
            "-d",
            "/dev/mapper/m",
        ]);
        let c = c.unwrap();
        assert_eq!((c.prout_sa, c.prout_type, c.rk, c.sark), (Some(5), 5, 1, 2));
        assert_eq!(e, "");
        let c = p(&["-o", "--register", "--param-sark=abc", "-d", "m"])
            .0
            .unwrap();
        assert_eq!((c.prout_sa, c.sark), (Some(0), 0xabc));
        let c = p(&["-i", "-r", "-d", "m"]).0.unwrap();
        assert_eq!(c.prin_sa, Some(1));
        let c = p(&["-i", "-k", "-d", "m"]).0.unwrap();
        assert_eq!(c.prin_sa, Some(0));
    }

    #[test]
    fn every_option() {
        let c = p(&[
            "-v",
            "3",
            "-oIYZH",
            "-S",
            "5",
            "-X",
            "iqn.a,i,0x1",
            "-X",
            "sas,5000c50005b32001",
            "-l",
            "100",
            "m",
        ])
        .0
        .unwrap();
        assert_eq!(c.loglevel, Some(3));
        assert!(c.alltgpt && c.aptpl && c.hex && c.prout);
        assert_eq!(c.prout_sa, Some(6));
        assert_eq!(c.tids.len(), 2);
        assert_eq!(c.alloc_len, Some(100));
        for (f, sa) in [
            ("-C", 3),
            ("-P", 4),
            ("-A", 5),
            ("-G", 0),
            ("-I", 6),
            ("-L", 2),
            ("-R", 1),
        ] {
            assert_eq!(p(&["-o", f, "-T", "1", "m"]).0.unwrap().prout_sa, Some(sa));
        }
        for (f, sa) in [
            ("-k", 0),
            ("-r", 1),
            ("-c", 2),
            ("-s", 3),
            ("--read-full-status", 3),
            ("--report-capabilities", 2),
        ] {
            assert_eq!(p(&["-i", f, "m"]).0.unwrap().prin_sa, Some(sa));
        }
        let c = p(&[
            "--config=/x",
            "--initiator-name",
            "iqn.a:b",
            "--reregister",
            "m",
        ])
        .0
        .unwrap();
        assert!(c.reregister);
        assert_eq!(c.config, Some(PathBuf::from("/x")));
        let c = p(&["-f", "/tmp/b"]).0.unwrap();
        assert_eq!(c.batch.as_deref(), Some("/tmp/b"));
    }

    #[test]
    fn errors() {
        assert_eq!(p(&["-k", "m"]).1, "choose either '--in' or '--out' \n");
        assert_eq!(p(&["-i", "-o", "-k", "m"]).0.unwrap_err(), 1);
        assert_eq!(
            p(&["-o", "m"]).1,
            " For Persistent Reserve Out only one appropriate\n service action must be chosen \n"
        );
        assert_eq!(
            p(&["-i", "m"]).1,
            " No service action given for Persistent Reserve IN\n"
        );
        assert_eq!(
            p(&["-i", "-k", "-r", "m"]).1,
            " Too many service actions given; choose one only\n"
        );
        assert!(p(&["-i", "-G", "m"])
            .1
            .contains("'--out' option must be given"));
        assert_eq!(p(&["-i", "-k"]).1, "No device name given \n");
        assert_eq!(
            p(&["-K", "q", "-i", "-k", "m"]).1,
            "bad argument to '--param-rk'\n"
        );
        assert_eq!(p(&["-v", "x"]).1, "bad argument to '--verbose'\n");
        assert_eq!(
            p(&["-X", "foo", "-o", "-G", "m"]).1,
            "bad argument to '--transport-id'\n"
        );
        assert_eq!(
            p(&["-l", "9000", "-i", "-k", "m"]).1,
            "'--alloc-length' argument exceeds maximum limit(8192)\n"
        );
        assert_eq!(
            p(&["-i", "-k", "m", "n"]).1,
            "Unexpected extra argument: n\n"
        );
        assert_eq!(p(&["--bogus"]).0.unwrap_err(), 1);
        let v: Vec<OsString> = ["-f", "x"].iter().map(OsString::from).collect();
        let mut e = String::new();
        assert_eq!(parse(&v, 3, &mut e).unwrap_err(), 1);
        assert_eq!(e, "ERROR: -f option not allowed in batch file\n");
        assert_eq!(
            p(&["-o", "-R", "-K", "1", "m"]).1,
            "Warning: --prout-type probably needs to be given\n"
        );
    }
}
