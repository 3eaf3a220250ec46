//! sg_persist's command line: every option (short, long, underscore
//! aliases), its argument syntax and its consistency checks, with
//! sg_persist's messages and exit statuses.

use std::ffi::OsString;
use std::io::BufRead;

use super::getopt::{self, lo, HasArg, Item, LongOpt};
use super::sgerr::SgCat;
use super::tid;

/// The sg_persist release whose behaviour this front end reproduces.
pub const SG_PERSIST_VERSION: &str = "0.67 20190913";

/// Default and largest PR IN allocation length (MX_ALLOC_LEN).
pub const MX_ALLOC_LEN: u32 = 8192;

pub const PRIN_RKEY: u8 = 0;
pub const PRIN_RRES: u8 = 1;
pub const PRIN_RCAP: u8 = 2;
pub const PRIN_RFSTAT: u8 = 3;

pub const PROUT_REG: u8 = 0;
pub const PROUT_RES: u8 = 1;
pub const PROUT_REL: u8 = 2;
pub const PROUT_CLEAR: u8 = 3;
pub const PROUT_PREE: u8 = 4;
pub const PROUT_PREE_AB: u8 = 5;
pub const PROUT_REG_IGN: u8 = 6;
pub const PROUT_REG_MOVE: u8 = 7;
pub const PROUT_REPL_LOST: u8 = 8;

/// Private option code for `--initiator-name` (no short form).
const OPT_INITIATOR_NAME: char = '\u{1}';

pub(crate) const SHORTS: &str = "AcCd:GHhiIkK:l:Lm:MnoPQ:rRsS:T:UvVX:yYzZ";

pub(crate) const LONGS: &[LongOpt] = &[
    lo("alloc-length", HasArg::Required, 'l'),
    lo("alloc_length", HasArg::Required, 'l'),
    lo("clear", HasArg::No, 'C'),
    lo("device", HasArg::Required, 'd'),
    lo("help", HasArg::No, 'h'),
    lo("hex", HasArg::No, 'H'),
    lo("in", HasArg::No, 'i'),
    lo("initiator-name", HasArg::Required, OPT_INITIATOR_NAME),
    lo("initiator_name", HasArg::Required, OPT_INITIATOR_NAME),
    lo("maxlen", HasArg::Required, 'm'),
    lo("no-inquiry", HasArg::No, 'n'),
    lo("no_inquiry", HasArg::No, 'n'),
    lo("out", HasArg::No, 'o'),
    lo("param-alltgpt", HasArg::No, 'Y'),
    lo("param_alltgpt", HasArg::No, 'Y'),
    lo("param-aptpl", HasArg::No, 'Z'),
    lo("param_aptpl", HasArg::No, 'Z'),
    lo("param-rk", HasArg::Required, 'K'),
    lo("param_rk", HasArg::Required, 'K'),
    lo("param-sark", HasArg::Required, 'S'),
    lo("param_sark", HasArg::Required, 'S'),
    lo("param-unreg", HasArg::No, 'U'),
    lo("param_unreg", HasArg::No, 'U'),
    lo("preempt", HasArg::No, 'P'),
    lo("preempt-abort", HasArg::No, 'A'),
    lo("preempt_abort", HasArg::No, 'A'),
    lo("prout-type", HasArg::Required, 'T'),
    lo("prout_type", HasArg::Required, 'T'),
    lo("read-full-status", HasArg::No, 's'),
    lo("read_full_status", HasArg::No, 's'),
    lo("read-keys", HasArg::No, 'k'),
    lo("read_keys", HasArg::No, 'k'),
    lo("readonly", HasArg::No, 'y'),
    lo("read-reservation", HasArg::No, 'r'),
    lo("read_reservation", HasArg::No, 'r'),
    lo("read-status", HasArg::No, 's'),
    lo("read_status", HasArg::No, 's'),
    lo("register", HasArg::No, 'G'),
    lo("register-ignore", HasArg::No, 'I'),
    lo("register_ignore", HasArg::No, 'I'),
    lo("register-move", HasArg::No, 'M'),
    lo("register_move", HasArg::No, 'M'),
    lo("release", HasArg::No, 'L'),
    lo("relative-target-port", HasArg::Required, 'Q'),
    lo("relative_target_port", HasArg::Required, 'Q'),
    lo("replace-lost", HasArg::No, 'z'),
    lo("replace_lost", HasArg::No, 'z'),
    lo("report-capabilities", HasArg::No, 'c'),
    lo("report_capabilities", HasArg::No, 'c'),
    lo("reserve", HasArg::No, 'R'),
    lo("transport-id", HasArg::Required, 'X'),
    lo("transport_id", HasArg::Required, 'X'),
    lo("unreg", HasArg::No, 'U'),
    lo("verbose", HasArg::No, 'v'),
    lo("version", HasArg::No, 'V'),
];

pub const USAGE_1: &str = "Usage: sg_persist [OPTIONS] [DEVICE]
  where the main OPTIONS are:
    --clear|-C                 PR Out: Clear
    --help|-h                  print usage message, twice for more
    --in|-i                    request PR In command (default)
    --out|-o                   request PR Out command
    --param-rk=RK|-K RK        PR Out parameter reservation key
                               (RK is in hex)
    --param-sark=SARK|-S SARK    PR Out parameter service action
                                 reservation key (SARK is in hex)
    --preempt|-P               PR Out: Preempt
    --preempt-abort|-A         PR Out: Preempt and Abort
    --prout-type=TYPE|-T TYPE    PR Out type field (see '-hh')
    --read-full-status|-s      PR In: Read Full Status
    --read-keys|-k             PR In: Read Keys (default)
    --read-reservation|-r      PR In: Read Reservation
    --read-status|-s           PR In: Read Full Status
    --register|-G              PR Out: Register
    --register-ignore|-I       PR Out: Register and Ignore
    --register-move|-M         PR Out: Register and Move
                               for '--register-move'
    --release|-L               PR Out: Release
    --replace-lost|-x          PR Out: Replace Lost Reservation
    --report-capabilities|-c   PR In: Report Capabilities
    --reserve|-R               PR Out: Reserve
    --unreg|-U                 optional with PR Out Register and Move

Performs a SCSI PERSISTENT RESERVE (IN or OUT) command. Invoking
'sg_persist DEVICE' will do a PR In Read Keys command. Use '-hh'
for more options and TYPE meanings.
";

pub const USAGE_2: &str = "Usage: sg_persist [OPTIONS] [DEVICE]
  where the other OPTIONS are:
    --alloc-length=LEN|-l LEN    allocation length hex value (used with
                                 PR In only) (default: 8192 (2000 in hex))
    --device=DEVICE|-d DEVICE    supply DEVICE as an option rather than
                                 an argument
    --hex|-H                   output response in hex (for PR In commands)
    --maxlen=LEN|-m LEN        allocation length in decimal, by default.
                               like --alloc-len= (def: 8192, 8k, 2000h)
    --no-inquiry|-n            skip INQUIRY (default: do INQUIRY)
    --param-alltgpt|-Y         PR Out parameter 'ALL_TG_PT'
    --param-aptpl|-Z           PR Out parameter 'APTPL'
    --readonly|-y              open DEVICE read-only (def: read-write)
    --relative-target-port=RTPI|-Q RTPI    relative target port identifier
    --transport-id=TIDS|-X TIDS    one or more TransportIDs can
                                   be given in several forms
    --verbose|-v               output additional debug information
    --version|-V               output version string

For the main options use '--help' or '-h' once.

keyfence: DEVICE is an iSCSI URL, iscsi://[user[%secret]@]host[:port]/target-iqn/lun
    --initiator-name=IQN       initiator name to log in with (default:
                               $KEYFENCE_INITIATOR_NAME, then
                               /etc/iscsi/initiatorname.iscsi, then one
                               derived from the host name)


PR Out TYPE field value meanings:
  0:    obsolete (was 'read shared' in SPC)
  1:    write exclusive
  2:    obsolete (was 'read exclusive')
  3:    exclusive access
  4:    obsolete (was 'shared access')
  5:    write exclusive, registrants only
  6:    exclusive access, registrants only
  7:    write exclusive, all registrants
  8:    exclusive access, all registrants
";

/// A fully checked sg_persist invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opts {
    /// The name to prefix messages with: the name the tool was run as
    /// (`sg_persist`, or `keyfence persist`).
    pub prog: &'static str,
    pub device: String,
    /// true: PERSISTENT RESERVE IN; false: OUT.
    pub prin: bool,
    pub prin_sa: u8,
    pub prout_sa: u8,
    pub prout_type: u8,
    pub param_rk: u64,
    pub param_sark: u64,
    pub param_rtp: u16,
    pub param_alltgpt: bool,
    pub param_aptpl: bool,
    pub param_unreg: bool,
    /// TransportIDs, each cut to its parameter-list length.
    pub tids: Vec<Vec<u8>>,
    pub alloc_len: u32,
    pub hex: u32,
    pub verbose: u32,
    pub inquiry: bool,
    pub initiator_name: Option<String>,
}

/// Outcome of parsing: run, or stop with an exit status. `stderr` holds
/// whatever sg_persist would have printed to stderr meanwhile (warnings,
/// usage, errors).
#[derive(Debug)]
pub struct Parsed {
    pub action: Action,
    pub stderr: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Run(Box<Opts>),
    Exit(SgCat),
}

/// Parse sg_persist's command line.
/// Parse the arguments of the tool run as `prog` (`sg_persist` or
/// `keyfence persist`; its messages carry that name).
pub fn parse_as(prog: &'static str, args: &[OsString], stdin: &mut dyn BufRead) -> Parsed {
    let mut err = String::new();
    let action = parse_inner(prog, args, stdin, &mut err);
    Parsed {
        action,
        stderr: err,
    }
}

fn parse_inner(
    prog: &'static str,
    args: &[OsString],
    stdin: &mut dyn BufRead,
    err: &mut String,
) -> Action {
    let items = match getopt::scan(args, SHORTS, LONGS) {
        Ok(v) => v,
        Err(e) => {
            // sg_persist prints the usage and exits 0 here; keyfence exits
            // with SG_LIB_SYNTAX_ERROR so that a typo can never pass for
            // success in a fencing script.
            err.push_str(&format!("{prog}: {}\n", e.0));
            err.push_str(USAGE_1);
            return Action::Exit(SgCat::SYNTAX_ERROR);
        }
    };
    let mut o = Opts {
        prog,
        device: String::new(),
        prin: true,
        prin_sa: 0,
        prout_sa: 0,
        prout_type: 0,
        param_rk: 0,
        param_sark: 0,
        param_rtp: 0,
        param_alltgpt: false,
        param_aptpl: false,
        param_unreg: false,
        tids: Vec::new(),
        alloc_len: MX_ALLOC_LEN,
        hex: 0,
        verbose: 0,
        inquiry: true,
        initiator_name: None,
    };
    let mut device: Option<String> = None;
    let mut help = 0u32;
    let mut num_prin_sa = 0u32;
    let mut num_prout_sa = 0u32;
    let mut want_prin = false;
    let mut want_prout = false;
    let mut version = false;
    let mut prin_sa: Option<u8> = None;
    let mut prout_sa: Option<u8> = None;
    let mut extra: Vec<String> = Vec::new();

    macro_rules! syntax {
        ($($t:tt)*) => {{
            err.push_str(&format!($($t)*));
            err.push('\n');
            return Action::Exit(SgCat::SYNTAX_ERROR);
        }};
    }

    for item in items {
        let (c, arg) = match item {
            Item::Operand(s) => {
                if device.is_none() {
                    device = Some(s);
                } else {
                    extra.push(s);
                }
                continue;
            }
            Item::Opt(c, a) => (c, a.unwrap_or_default()),
        };
        let mut set_out = |sa: u8| {
            prout_sa = Some(sa);
            num_prout_sa += 1;
        };
        match c {
            'A' => set_out(PROUT_PREE_AB),
            'C' => set_out(PROUT_CLEAR),
            'G' => set_out(PROUT_REG),
            'I' => set_out(PROUT_REG_IGN),
            'L' => set_out(PROUT_REL),
            'M' => set_out(PROUT_REG_MOVE),
            'P' => set_out(PROUT_PREE),
            'R' => set_out(PROUT_RES),
            'z' => set_out(PROUT_REPL_LOST),
            'c' | 'k' | 'r' | 's' => {
                prin_sa = Some(match c {
                    'c' => PRIN_RCAP,
                    'k' => PRIN_RKEY,
                    'r' => PRIN_RRES,
                    _ => PRIN_RFSTAT,
                });
                num_prin_sa += 1;
            }
            // Like getopt's optarg, a later -d replaces an earlier one.
            'd' => device = Some(arg),
            'h' => help += 1,
            'H' => o.hex += 1,
            'i' => want_prin = true,
            'o' => want_prout = true,
            'n' => o.inquiry = false,
            'K' => match getopt::scan_hex_u64(&arg) {
                Some(v) => o.param_rk = v,
                None => syntax!("bad argument to '--param-rk'"),
            },
            'S' => match getopt::scan_hex_u64(&arg) {
                Some(v) => o.param_sark = v,
                None => syntax!("bad argument to '--param-sark'"),
            },
            'l' | 'm' => {
                let name = if c == 'm' { "maxlen" } else { "alloc-length" };
                let v = if c == 'm' {
                    getopt::sg_get_num(&arg)
                } else {
                    getopt::scan_hex_u32(&arg)
                };
                match v {
                    None => syntax!("bad argument to '--{name}'"),
                    Some(v) if v > MX_ALLOC_LEN => {
                        syntax!("'--{name}' argument exceeds maximum value ({MX_ALLOC_LEN})")
                    }
                    Some(v) => o.alloc_len = v,
                }
            }
            'Q' => match getopt::scan_hex_u32(&arg) {
                None => syntax!("bad argument to '--relative-target-port'"),
                Some(v) if v > 0xffff => {
                    syntax!("argument to '--relative-target-port' 0 to ffff inclusive")
                }
                Some(v) => o.param_rtp = v as u16,
            },
            'T' => match getopt::scan_hex_u32(&arg) {
                // sg_persist would silently keep the low 4 bits of a larger
                // value; a TYPE that does not fit the field is refused.
                Some(v) if v <= 0xf => o.prout_type = v as u8,
                _ => syntax!("bad argument to '--prout-type'"),
            },
            'U' => o.param_unreg = true,
            'v' => o.verbose += 1,
            'V' => version = true,
            'X' => {
                let mut warn = String::new();
                let r = tid::parse_arg(&arg, stdin, &mut warn);
                err.push_str(&warn);
                match r {
                    // As in sg_persist, a later --transport-id replaces an
                    // earlier one.
                    Ok(t) => o.tids = t,
                    Err(e) => {
                        err.push_str(&e);
                        syntax!("bad argument to '--transport-id'");
                    }
                }
            }
            'y' => {}
            'Y' => o.param_alltgpt = true,
            'Z' => o.param_aptpl = true,
            OPT_INITIATOR_NAME => o.initiator_name = Some(arg),
            other => syntax!("unrecognised switch code 0x{:x} ??", other as u32),
        }
    }
    if !extra.is_empty() {
        for e in &extra {
            err.push_str(&format!("Unexpected extra argument: {e}\n"));
        }
        err.push_str(USAGE_1);
        return Action::Exit(SgCat::SYNTAX_ERROR);
    }
    if help > 0 {
        if help < 2 {
            err.push_str(USAGE_1);
        } else {
            err.push_str(USAGE_2);
            err.push_str("\nkeyfence persist differs from sg_persist here:\n");
            err.push_str(super::DIFFERENCES);
        }
        return Action::Exit(SgCat::CLEAN);
    }
    if version {
        err.push_str(&format!(
            "version: {SG_PERSIST_VERSION} (keyfence {})\n",
            env!("CARGO_PKG_VERSION")
        ));
        return Action::Exit(SgCat::CLEAN);
    }
    let Some(dev) = device else {
        err.push_str("No device name given\n");
        err.push_str(USAGE_1);
        return Action::Exit(SgCat::SYNTAX_ERROR);
    };
    o.device = dev;
    if want_prout && want_prin {
        err.push_str("choose '--in' _or_ '--out' (not both)\n");
        err.push_str(USAGE_1);
        return Action::Exit(SgCat::CONTRADICT);
    } else if want_prout {
        o.prin = false;
        if num_prout_sa != 1 || num_prin_sa != 0 {
            err.push_str(
                ">> For Persistent Reserve Out one and only one appropriate\n>> service action must be chosen (e.g. '--register')\n",
            );
            return Action::Exit(SgCat::CONTRADICT);
        }
    } else {
        if num_prout_sa > 0 {
            err.push_str(
                ">> When a service action for Persistent Reserve Out is chosen the\n>> '--out' option must be given (as a safeguard)\n",
            );
            return Action::Exit(SgCat::CONTRADICT);
        }
        if num_prin_sa == 0 {
            err.push_str(
                ">> No service action given; assume Persistent Reserve In command\n>> with Read Keys service action\n",
            );
            prin_sa = Some(PRIN_RKEY);
        } else if num_prin_sa > 1 {
            err.push_str("Too many service actions given; choose one only\n");
            err.push_str(USAGE_1);
            return Action::Exit(SgCat::CONTRADICT);
        }
    }
    o.prin_sa = prin_sa.unwrap_or(PRIN_RKEY);
    // sg_persist keeps -1 for "no PR OUT service action"; only PR OUT uses it.
    o.prout_sa = prout_sa.unwrap_or(0xff);
    if (o.param_unreg || o.param_rtp != 0) && o.prout_sa != PROUT_REG_MOVE {
        err.push_str("--unreg or --relative-target-port only useful with --register-move\n");
        err.push_str(USAGE_1);
        return Action::Exit(SgCat::CONTRADICT);
    }
    if o.prout_sa == PROUT_REG_MOVE && o.tids.len() != 1 {
        err.push_str("with --register-move one (and only one) --transport-id should be given\n");
        err.push_str(USAGE_1);
        return Action::Exit(SgCat::CONTRADICT);
    }
    if !o.prin
        && matches!(
            o.prout_sa,
            PROUT_RES | PROUT_REL | PROUT_PREE | PROUT_PREE_AB
        )
        && o.prout_type == 0
    {
        err.push_str("warning>>> --prout-type probably needs to be given\n");
    }
    Action::Run(Box::new(o))
}

/// The PR OUT parameter list sg_persist sends (SPC-4 6.16.3 / 6.16.4).
pub fn prout_parameter_list(o: &Opts) -> Vec<u8> {
    let tids: Vec<u8> = o.tids.concat();
    if o.prout_sa == PROUT_REG_MOVE {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&o.param_rk.to_be_bytes());
        p[8..16].copy_from_slice(&o.param_sark.to_be_bytes());
        if o.param_unreg {
            p[17] |= 0x2;
        }
        if o.param_aptpl {
            p[17] |= 0x1;
        }
        p[18..20].copy_from_slice(&o.param_rtp.to_be_bytes());
        p[20..24].copy_from_slice(&(tids.len() as u32).to_be_bytes());
        p.extend(tids);
        return p;
    }
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&o.param_rk.to_be_bytes());
    p[8..16].copy_from_slice(&o.param_sark.to_be_bytes());
    if o.param_alltgpt {
        p[20] |= 0x4;
    }
    if o.param_aptpl {
        p[20] |= 0x1;
    }
    if !tids.is_empty() {
        p[20] |= 0x8; // SPEC_I_PT
        p.extend((tids.len() as u32).to_be_bytes());
        p.extend(tids);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: &str = "iscsi://127.0.0.1/iqn.2026-11.io.keyfence:t/0";

    fn p(args: &[&str]) -> Parsed {
        let v: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse_as("sg_persist", &v, &mut std::io::empty())
    }

    fn run_opts(args: &[&str]) -> Opts {
        match p(args).action {
            Action::Run(o) => *o,
            Action::Exit(c) => panic!("{args:?} exited {c:?}"),
        }
    }

    fn exit(args: &[&str]) -> (SgCat, String) {
        let r = p(args);
        match r.action {
            Action::Exit(c) => (c, r.stderr),
            Action::Run(o) => panic!("{args:?} ran {o:?}"),
        }
    }

    #[test]
    fn fence_scsi_command_lines() {
        let o = run_opts(&[
            "-n", "-o", "-A", "-T", "5", "-K", "0x1", "-S", "0x2", "-d", DEV,
        ]);
        assert!(!o.prin && !o.inquiry);
        assert_eq!(
            (o.prout_sa, o.prout_type, o.param_rk, o.param_sark),
            (PROUT_PREE_AB, 5, 1, 2)
        );
        assert_eq!(o.device, DEV);
        let o = run_opts(&["-n", "-o", "-I", "-S", "abc", "-d", DEV]);
        assert_eq!((o.prout_sa, o.param_sark), (PROUT_REG_IGN, 0xabc));
        let o = run_opts(&["-n", "-i", "-k", "-d", DEV]);
        assert!(o.prin);
        assert_eq!(o.prin_sa, PRIN_RKEY);
        let o = run_opts(&["-n", "-i", "-r", "-d", DEV]);
        assert_eq!(o.prin_sa, PRIN_RRES);
    }

    #[test]
    fn every_prin_option() {
        for (flag, sa) in [
            ("-k", PRIN_RKEY),
            ("--read-keys", PRIN_RKEY),
            ("--read_keys", PRIN_RKEY),
            ("-r", PRIN_RRES),
            ("--read-reservation", PRIN_RRES),
            ("--read_reservation", PRIN_RRES),
            ("-s", PRIN_RFSTAT),
            ("--read-status", PRIN_RFSTAT),
            ("--read_status", PRIN_RFSTAT),
            ("--read-full-status", PRIN_RFSTAT),
            ("--read_full_status", PRIN_RFSTAT),
            ("-c", PRIN_RCAP),
            ("--report-capabilities", PRIN_RCAP),
            ("--report_capabilities", PRIN_RCAP),
        ] {
            let o = run_opts(&["--in", flag, DEV]);
            assert_eq!(o.prin_sa, sa, "{flag}");
            assert!(o.prin);
        }
    }

    #[test]
    fn every_prout_option() {
        for (flag, sa) in [
            ("-G", PROUT_REG),
            ("--register", PROUT_REG),
            ("-R", PROUT_RES),
            ("--reserve", PROUT_RES),
            ("-L", PROUT_REL),
            ("--release", PROUT_REL),
            ("-C", PROUT_CLEAR),
            ("--clear", PROUT_CLEAR),
            ("-P", PROUT_PREE),
            ("--preempt", PROUT_PREE),
            ("-A", PROUT_PREE_AB),
            ("--preempt-abort", PROUT_PREE_AB),
            ("--preempt_abort", PROUT_PREE_AB),
            ("-I", PROUT_REG_IGN),
            ("--register-ignore", PROUT_REG_IGN),
            ("--register_ignore", PROUT_REG_IGN),
            ("-z", PROUT_REPL_LOST),
            ("--replace-lost", PROUT_REPL_LOST),
            ("--replace_lost", PROUT_REPL_LOST),
        ] {
            let o = run_opts(&["--out", flag, "-T", "1", DEV]);
            assert_eq!(o.prout_sa, sa, "{flag}");
            assert!(!o.prin);
        }
        for flag in ["-M", "--register-move", "--register_move"] {
            let o = run_opts(&["-o", flag, "-X", "iqn.x", "-Q", "2", "-U", DEV]);
            assert_eq!(o.prout_sa, PROUT_REG_MOVE);
            assert_eq!(o.param_rtp, 2);
            assert!(o.param_unreg);
        }
    }

    #[test]
    fn parameters_in_every_spelling() {
        for args in [
            vec![
                "-o", "-G", "-K", "123abc", "-S", "0x456", "-Y", "-Z", "-T", "5",
            ],
            vec!["-oG", "-K123abc", "-S0x456", "-YZ", "-T5"],
            vec![
                "--out",
                "--register",
                "--param-rk=123abc",
                "--param-sark",
                "0x456",
                "--param-alltgpt",
                "--param-aptpl",
                "--prout-type=5",
            ],
            vec![
                "--out",
                "--register",
                "--param_rk=123abc",
                "--param_sark=0x456",
                "--param_alltgpt",
                "--param_aptpl",
                "--prout_type=5",
            ],
        ] {
            let mut a = args.clone();
            a.push(DEV);
            let o = run_opts(&a);
            assert_eq!(o.param_rk, 0x123abc, "{args:?}");
            assert_eq!(o.param_sark, 0x456);
            assert!(o.param_alltgpt && o.param_aptpl);
            assert_eq!(o.prout_type, 5);
        }
    }

    #[test]
    fn misc_options() {
        let o = run_opts(&["-HHvv", "-n", "-y", "-l", "100", DEV]);
        assert_eq!((o.hex, o.verbose, o.alloc_len), (2, 2, 0x100));
        let o = run_opts(&[
            "--hex",
            "--verbose",
            "--no-inquiry",
            "--readonly",
            "--alloc-length=20",
            DEV,
        ]);
        assert_eq!(
            (o.hex, o.verbose, o.alloc_len, o.inquiry),
            (1, 1, 0x20, false)
        );
        let o = run_opts(&["--no_inquiry", "--alloc_length", "20", DEV]);
        assert_eq!(o.alloc_len, 0x20);
        let o = run_opts(&["-m", "8k", DEV]);
        assert_eq!(o.alloc_len, 8192);
        let o = run_opts(&["--maxlen=100", DEV]);
        assert_eq!(o.alloc_len, 100);
        let o = run_opts(&["--device", DEV]);
        assert_eq!(o.device, DEV);
        let o = run_opts(&["--initiator-name=iqn.2026-11.io.keyfence:a", DEV]);
        assert_eq!(
            o.initiator_name.as_deref(),
            Some("iqn.2026-11.io.keyfence:a")
        );
        let o = run_opts(&["-o", "-G", "-X", "iqn.a,i,0x1", "--transport-id=iqn.b", DEV]);
        assert_eq!(o.tids.len(), 1);
        assert_eq!(&o.tids[0][4..9], b"iqn.b");
        let o = run_opts(&["-o", "-G", "--transport_id", "iqn.c", DEV]);
        assert_eq!(&o.tids[0][4..9], b"iqn.c");
    }

    #[test]
    fn default_is_read_keys_with_notice() {
        let r = p(&[DEV]);
        assert!(matches!(r.action, Action::Run(ref o) if o.prin && o.prin_sa == PRIN_RKEY));
        assert_eq!(
            r.stderr,
            ">> No service action given; assume Persistent Reserve In command\n>> with Read Keys service action\n"
        );
    }

    #[test]
    fn contradictions_exit_31() {
        let (c, e) = exit(&["-i", "-o", "-G", DEV]);
        assert_eq!(c, SgCat::CONTRADICT);
        assert!(e.starts_with("choose '--in' _or_ '--out' (not both)\n"));
        let (c, e) = exit(&["-o", DEV]);
        assert_eq!(c, SgCat::CONTRADICT);
        assert_eq!(
            e,
            ">> For Persistent Reserve Out one and only one appropriate\n>> service action must be chosen (e.g. '--register')\n"
        );
        assert_eq!(exit(&["-o", "-G", "-R", DEV]).0, SgCat::CONTRADICT);
        assert_eq!(exit(&["-o", "-G", "-k", DEV]).0, SgCat::CONTRADICT);
        let (c, e) = exit(&["-G", DEV]);
        assert_eq!(c, SgCat::CONTRADICT);
        assert!(e.contains("'--out' option must be given"));
        let (c, e) = exit(&["-k", "-r", DEV]);
        assert_eq!(c, SgCat::CONTRADICT);
        assert!(e.starts_with("Too many service actions given; choose one only\n"));
        let (c, e) = exit(&["-o", "-G", "-U", DEV]);
        assert_eq!(c, SgCat::CONTRADICT);
        assert!(
            e.starts_with("--unreg or --relative-target-port only useful with --register-move\n")
        );
        assert_eq!(exit(&["-o", "-G", "-Q", "1", DEV]).0, SgCat::CONTRADICT);
        let (c, e) = exit(&["-o", "-M", DEV]);
        assert_eq!(c, SgCat::CONTRADICT);
        assert!(e.starts_with(
            "with --register-move one (and only one) --transport-id should be given\n"
        ));
    }

    #[test]
    fn syntax_errors_exit_1() {
        for (args, msg) in [
            (vec!["-K", "zz", DEV], "bad argument to '--param-rk'\n"),
            (vec!["-S", "", DEV], "bad argument to '--param-sark'\n"),
            (vec!["-T", "x", DEV], "bad argument to '--prout-type'\n"),
            (vec!["-T", "10", DEV], "bad argument to '--prout-type'\n"),
            (vec!["-l", "q", DEV], "bad argument to '--alloc-length'\n"),
            (
                vec!["-l", "2001", DEV],
                "'--alloc-length' argument exceeds maximum value (8192)\n",
            ),
            (
                vec!["-m", "9000", DEV],
                "'--maxlen' argument exceeds maximum value (8192)\n",
            ),
            (vec!["-m", "x", DEV], "bad argument to '--maxlen'\n"),
            (
                vec!["-Q", "10000", DEV],
                "argument to '--relative-target-port' 0 to ffff inclusive\n",
            ),
            (
                vec!["-Q", "g", DEV],
                "bad argument to '--relative-target-port'\n",
            ),
        ] {
            let (c, e) = exit(&args);
            assert_eq!(c, SgCat::SYNTAX_ERROR, "{args:?}");
            assert_eq!(e, msg, "{args:?}");
        }
        let (c, e) = exit(&["-X", "1,zz", DEV]);
        assert_eq!(c, SgCat::SYNTAX_ERROR);
        assert!(
            e.ends_with("build_transportid: error at pos 3\nbad argument to '--transport-id'\n")
        );
        let (c, e) = exit(&["--bogus", DEV]);
        assert_eq!(c, SgCat::SYNTAX_ERROR);
        assert!(e.starts_with("sg_persist: unrecognized option '--bogus'\nUsage: sg_persist"));
        let (c, e) = exit(&["-K"]);
        assert_eq!(c, SgCat::SYNTAX_ERROR);
        assert!(e.starts_with("sg_persist: option requires an argument -- 'K'\n"));
        let (c, e) = exit(&[]);
        assert_eq!(c, SgCat::SYNTAX_ERROR);
        assert!(e.starts_with("No device name given\nUsage:"));
        let (c, e) = exit(&[DEV, "extra"]);
        assert_eq!(c, SgCat::SYNTAX_ERROR);
        assert!(e.starts_with("Unexpected extra argument: extra\nUsage:"));
        let (c, _) = exit(&["-d", DEV, DEV]);
        assert_eq!(c, SgCat::SYNTAX_ERROR);
    }

    #[test]
    fn help_and_version_exit_0() {
        let (c, e) = exit(&["-h"]);
        assert_eq!((c, e.as_str()), (SgCat::CLEAN, USAGE_1));
        let (c, e) = exit(&["-hh"]);
        assert_eq!(c, SgCat::CLEAN);
        assert!(e.starts_with(USAGE_2));
        assert!(e.ends_with(super::super::DIFFERENCES));
        let (c, e) = exit(&["--help", "--help"]);
        assert_eq!(c, SgCat::CLEAN);
        assert!(e.starts_with(USAGE_2));
        let (c, e) = exit(&["-V"]);
        assert_eq!(c, SgCat::CLEAN);
        assert!(e.starts_with("version: 0.67 20190913"));
    }

    #[test]
    fn missing_type_warning() {
        let r = p(&["-o", "-R", "-K", "1", DEV]);
        assert!(matches!(r.action, Action::Run(_)));
        assert_eq!(
            r.stderr,
            "warning>>> --prout-type probably needs to be given\n"
        );
    }

    #[test]
    fn parameter_lists() {
        let o = run_opts(&["-o", "-G", "-K", "1", "-S", "2", "-Y", "-Z", DEV]);
        let pl = prout_parameter_list(&o);
        assert_eq!(pl.len(), 24);
        assert_eq!(&pl[0..8], &1u64.to_be_bytes());
        assert_eq!(&pl[8..16], &2u64.to_be_bytes());
        assert_eq!(pl[20], 0x05);
        let o = run_opts(&["-o", "-G", "-S", "2", "-X", "iqn.x", DEV]);
        let pl = prout_parameter_list(&o);
        assert_eq!(pl[20], 0x08);
        assert_eq!(&pl[24..28], &24u32.to_be_bytes());
        assert_eq!(pl.len(), 24 + 4 + 24);
        let o = run_opts(&[
            "-o", "-M", "-K", "1", "-S", "2", "-X", "iqn.x", "-Q", "3", "-U", "-Z", "-T", "5", DEV,
        ]);
        let pl = prout_parameter_list(&o);
        assert_eq!(pl[17], 0x03);
        assert_eq!(&pl[18..20], &[0, 3]);
        assert_eq!(&pl[20..24], &24u32.to_be_bytes());
        assert_eq!(pl.len(), 48);
        assert_eq!(&pl[24..29], &[5, 0, 0, 20, b'i']);
    }
}
