//! `keyfence mpathpersist` (also run as `mpathpersist`): multipath-tools'
//! mpathpersist over iSCSI paths.
//!
//! Same options, stdout layout and MPATH_PR_* exit statuses as
//! mpathpersist 0.9.4 (fence_mpath parses them). DEVICE is a map named in
//! keyfence's configuration (see [`config`]), optionally written as
//! `/dev/mapper/NAME`, or an iSCSI URL whose target portals (SendTargets)
//! become the paths. How PR commands are spread over the paths is
//! described in [`multipath`]; deliberate differences in [`DIFFERENCES`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

pub mod config;
pub mod format;
pub mod multipath;

use crate::persist::device::{IscsiLun, Target};
use crate::persist::getopt::{self, lo, HasArg, Item, LongOpt};
use crate::persist::{emit, Output};
use config::{Config, KeySource};
use format::code;
use keyfence_scsi::transport_id::TransportId;
use multipath::{MPath, Multipath, PathInfo};

pub const PROG: &str = "mpathpersist";
const VERSION_STRING: &str = "multipath-tools v0.9.4 (12/19, 2022)\n";

/// Where keyfence mpathpersist knowingly departs from mpathpersist.
pub const DIFFERENCES: &str = "\
- DEVICE is a keyfence map name (or /dev/mapper/NAME) or an iSCSI URL;
  paths are iSCSI sessions, not SCSI devices under dm-multipath.
- REPORT CAPABILITIES prints each flag and type-mask bit as 0 or 1
  (mpathpersist 0.9.4 prints raw mask values such as 128 and reads the
  mask in the wrong byte order).
- -H dumps the raw PR IN data to stderr in sg3_utils' hex layout.
- --transport-id accepts iqn., sas, and fcp, forms and refuses anything
  else (mpathpersist silently ignores an unknown form).
- Extensions: --config FILE, --initiator-name IQN, and --reregister
  (register every path that has no registration, e.g. after it came back).
- After a partial REGISTER AND IGNORE EXISTING KEY failure the successful
  paths are unregistered (their old key is unknown); after a partial
  REGISTER they get their old key back.
";

const SHORTS: &str = "v:Cd:hHioYZK:S:PAT:skrGILcRX:l:f:";
const OPT_CONFIG: char = '\u{1}';
const OPT_INITIATOR_NAME: char = '\u{2}';
const OPT_REREGISTER: char = '\u{3}';

const LONGS: &[LongOpt] = &[
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

const MAX_PARAM_LEN: u32 = 8192;

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

/// Settings that outlive one batch line.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
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

/// Entry point: `keyfence mpathpersist ARGS` / `mpathpersist ARGS`.
pub fn run(args: &[OsString]) -> ExitCode {
    let mut out = Output::default();
    if args.is_empty() {
        out.stderr.push_str("No parameter used\n");
        out.stderr.push_str(VERSION_STRING);
        out.stderr.push_str(USAGE);
        emit(&out);
        return ExitCode::from(code::SYNTAX_ERROR);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{PROG}: cannot start runtime: {e}");
            return ExitCode::from(code::THREAD_ERROR);
        }
    };
    let mut ctx = Ctx::default();
    let status = rt.block_on(handle_args(args, 0, &mut ctx, &mut out));
    emit(&out);
    ExitCode::from(status)
}

/// One command line (line 0) or batch line, then its batch file if any.
pub async fn handle_args(args: &[OsString], line: usize, ctx: &mut Ctx, out: &mut Output) -> u8 {
    let c = match parse(args, line, &mut out.stderr) {
        Ok(c) => c,
        Err(st) => {
            if line == 0 {
                out.stderr.push_str(VERSION_STRING);
                out.stderr.push_str(USAGE);
            } else {
                out.stderr
                    .push_str(&format!("syntax error on line {line} in batch file\n"));
            }
            return st;
        }
    };
    if c.help {
        out.stderr.push_str(VERSION_STRING);
        out.stderr.push_str(USAGE);
        out.stderr
            .push_str("\nkeyfence mpathpersist differs from mpathpersist here:\n");
        out.stderr.push_str(DIFFERENCES);
        return code::SUCCESS;
    }
    if line == 0 {
        ctx.verbose = c.loglevel.unwrap_or(0);
        ctx.config = c.config.clone();
        ctx.initiator_name = c.initiator_name.clone();
    }
    if c.alloc_len.is_some() {
        ctx.alloc_len = c.alloc_len;
    }
    let mut ret = code::SUCCESS;
    if c.device.is_some() && (c.prin || c.prout || c.reregister) {
        ret = execute(&c, ctx, out).await;
    }
    if let Some(batch) = &c.batch {
        let rv = do_batch_file(batch, ctx, out).await;
        if ret == code::SUCCESS {
            ret = rv;
        }
    }
    ret
}

async fn do_batch_file(file: &str, ctx: &mut Ctx, out: &mut Output) -> u8 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            out.stderr
                .push_str(&format!("unable to open {file}: {e}\n"));
            return code::SYNTAX_ERROR;
        }
    };
    if ctx.verbose >= 2 {
        out.stderr.push_str(&format!("running batch file {file}\n"));
    }
    let mut ret = code::SUCCESS;
    for (n, l) in text.lines().enumerate() {
        let nline = n + 1;
        let mut argv: Vec<OsString> = Vec::new();
        for tok in l.split([' ', '\t']).filter(|t| !t.is_empty()) {
            if tok.starts_with('#') {
                break;
            }
            if argv.is_empty() && tok == PROG {
                continue;
            }
            argv.push(OsString::from(tok));
        }
        if argv.is_empty() {
            continue;
        }
        if ctx.verbose >= 2 {
            let shown: Vec<String> = argv
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            out.stderr.push_str(&format!(
                "## file {file} line {nline}: {PROG} {}\n",
                shown.join(" ")
            ));
        }
        let rv = Box::pin(handle_args(&argv, nline, ctx, out)).await;
        if rv != code::SUCCESS {
            ret = rv;
        }
    }
    ret
}

/// The URLs a DEVICE stands for, and the map's configuration if any.
async fn resolve_paths(
    device: &str,
    cfg: &Config,
    initiator_name: &str,
    out: &mut Output,
) -> Result<
    (
        String,
        Vec<keyfence_initiator::IscsiUrl>,
        Option<config::MapConfig>,
    ),
    u8,
> {
    let name = device.strip_prefix("/dev/mapper/").unwrap_or(device);
    if let Some(m) = cfg.map(name) {
        let urls = m
            .paths
            .iter()
            .filter_map(|p| keyfence_initiator::IscsiUrl::parse_full(p).ok())
            .collect();
        return Ok((m.name.clone(), urls, Some(m.clone())));
    }
    if !device.starts_with("iscsi://") {
        out.stderr.push_str(&format!(
            "{device}: not a multipath map in the keyfence configuration, nor an iSCSI URL\n"
        ));
        return Err(code::FILE_ERROR);
    }
    let url = match keyfence_initiator::IscsiUrl::parse_full(device) {
        Ok(u) => u,
        Err(e) => {
            out.stderr.push_str(&format!("{device}: {e}\n"));
            return Err(code::SYNTAX_ERROR);
        }
    };
    let target = url.target.clone().unwrap_or_default();
    let lun = url.lun.unwrap_or(0);
    let scfg = keyfence_initiator::SessionConfig {
        initiator_name: Some(initiator_name.to_string()),
        ..keyfence_initiator::SessionConfig::default()
    };
    let mut urls = vec![url.clone()];
    match keyfence_initiator::discover(&url, &scfg).await {
        Ok(targets) => {
            for t in targets
                .iter()
                .filter(|t| t.name.eq_ignore_ascii_case(&target))
            {
                for (addr, port, _tpgt) in &t.portals {
                    let mut u = url.clone();
                    u.host = addr.clone();
                    u.port = *port;
                    let u = u.with_target(&target, lun);
                    if !urls.iter().any(|x| x.host == u.host && x.port == u.port) {
                        urls.push(u);
                    }
                }
            }
        }
        Err(e) => out
            .stderr
            .push_str(&format!("{}: SendTargets discovery failed: {e}\n", url)),
    }
    Ok((url.to_string(), urls, None))
}

/// Log in on every path (concurrently) and learn its identity; keep only
/// the paths that reach the same logical unit as the first one that
/// answered (VPD page 83h, logical unit designators).
async fn open_paths(
    name: &str,
    urls: Vec<keyfence_initiator::IscsiUrl>,
    initiator_name: &str,
    verbose: i64,
    out: &mut Output,
) -> Multipath<IscsiLun> {
    let mut set = tokio::task::JoinSet::new();
    for (i, u) in urls.into_iter().enumerate() {
        let t = Target {
            url: u,
            initiator_name: initiator_name.to_string(),
            isid: None,
        };
        set.spawn(async move {
            let r = async {
                let lun = t.connect(0).await?;
                let ids = lun.device().device_identification().await?;
                let rtpi = ids.iter().find_map(|d| d.relative_target_port());
                let lu_ids: Vec<Vec<u8>> = ids
                    .iter()
                    .filter(|d| d.association == 0 && matches!(d.designator_type, 1 | 2 | 3 | 8))
                    .map(|d| d.value.clone())
                    .collect();
                Ok::<_, keyfence_initiator::Error>((lun, rtpi, lu_ids))
            }
            .await;
            (i, t, r)
        });
    }
    let mut results = Vec::new();
    while let Some(j) = set.join_next().await {
        if let Ok(r) = j {
            results.push(r);
        }
    }
    results.sort_by_key(|(i, ..)| *i);
    let mut lu: Option<Vec<Vec<u8>>> = None;
    let mut paths = Vec::new();
    for (_, t, r) in results {
        let url = t.display_name();
        match r {
            Ok((lun, rtpi, ids)) => {
                let same = match &lu {
                    None => {
                        lu = Some(ids.clone());
                        true
                    }
                    Some(first) => {
                        ids.is_empty() || first.is_empty() || ids.iter().any(|i| first.contains(i))
                    }
                };
                if !same {
                    out.stderr.push_str(&format!(
                        "{name}: path {url} reaches another logical unit; ignored\n"
                    ));
                    lun.close().await;
                    continue;
                }
                let port = lun.initiator_port();
                if verbose >= 3 {
                    out.stderr.push_str(&format!(
                        "{name}: path {url} up (initiator port {},i,0x{:012x}, relative target port {})\n",
                        port.name,
                        port.isid,
                        rtpi.map(|r| r.to_string()).unwrap_or_else(|| "unknown".into())
                    ));
                }
                paths.push(MPath {
                    info: PathInfo {
                        url,
                        initiator_name: port.name.to_string(),
                        isid: port.isid,
                        rtpi,
                    },
                    lun: Some(Arc::new(lun)),
                    down: None,
                });
            }
            Err(e) => {
                if verbose >= 1 {
                    out.stderr
                        .push_str(&format!("{name}: path {url} down: {e}\n"));
                }
                paths.push(MPath {
                    info: PathInfo {
                        url,
                        initiator_name: t.initiator_name.clone(),
                        isid: t.effective_isid().value(),
                        rtpi: None,
                    },
                    lun: None,
                    down: Some(e.to_string()),
                });
            }
        }
    }
    Multipath::new(name.to_string(), paths)
}

async fn execute(c: &Cmd, ctx: &Ctx, out: &mut Output) -> u8 {
    let cfg = match Config::load(ctx.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            out.stderr.push_str(&format!("{PROG}: {e}\n"));
            return code::FILE_ERROR;
        }
    };
    let explicit = ctx
        .initiator_name
        .as_deref()
        .or(cfg.initiator_name.as_deref());
    let iname = match keyfence_initiator::identity::resolve_initiator_name(explicit) {
        Ok(n) => n.name,
        Err(e) => {
            out.stderr.push_str(&format!("{PROG}: {e}\n"));
            return code::SYNTAX_ERROR;
        }
    };
    let device = c.device.clone().unwrap_or_default();
    let (name, urls, map) = match resolve_paths(&device, &cfg, &iname, out).await {
        Ok(v) => v,
        Err(st) => return st,
    };
    let key_source = match map.as_ref().map(|m| m.key_source()).transpose() {
        Ok(k) => k.unwrap_or(KeySource::None),
        Err(e) => {
            out.stderr.push_str(&format!("{PROG}: {e}\n"));
            return code::SYNTAX_ERROR;
        }
    };
    let mut mp = open_paths(&name, urls, &iname, ctx.verbose, out).await;
    if mp.paths.iter().all(|p| p.lun.is_none()) {
        out.stderr.push_str(&format!("{name}: no usable path\n"));
        return code::DMMP_ERROR;
    }
    let ret = if c.reregister {
        reregister(c, &mut mp, &key_source, out).await
    } else if c.prin {
        prin(c, ctx, &mut mp, out).await
    } else {
        prout(c, &mut mp, &key_source, out).await
    };
    if ctx.verbose >= 2 {
        for l in &mp.log {
            out.stderr.push_str(l);
            out.stderr.push('\n');
        }
    }
    for p in std::mem::take(&mut mp.paths) {
        if let Some(l) = p.lun.and_then(|a| Arc::try_unwrap(a).ok()) {
            l.close().await;
        }
    }
    ret
}

async fn prin(c: &Cmd, ctx: &Ctx, mp: &mut Multipath<IscsiLun>, out: &mut Output) -> u8 {
    let sa = c.prin_sa.unwrap_or(0);
    let alloc = ctx
        .alloc_len
        .unwrap_or(MAX_PARAM_LEN)
        .min(u32::from(u16::MAX)) as u16;
    match mp.prin(sa, alloc).await {
        Ok(data) => {
            if c.hex {
                crate::persist::format::hex_dump(&mut out.stderr, &data, true);
            }
            match sa {
                0 => out.stdout.push_str(&format::read_keys(&data)),
                1 => out.stdout.push_str(&format::read_reservation(&data)),
                2 => match format::report_capabilities(&data) {
                    Ok(s) => out.stdout.push_str(&s),
                    Err(e) => out.stderr.push_str(&e),
                },
                _ => out.stdout.push_str(&format::read_full_status(&data)),
            }
            code::SUCCESS
        }
        Err(f) => {
            if let Some(e) = &f.error {
                if ctx.verbose >= 1 {
                    out.stderr.push_str(&format!("{}: {e}\n", mp.name));
                }
            }
            out.stderr
                .push_str("Persistent Reserve IN command failed\n");
            f.status
        }
    }
}

async fn prout(c: &Cmd, mp: &mut Multipath<IscsiLun>, keys: &KeySource, out: &mut Output) -> u8 {
    let sa = c.prout_sa.unwrap_or(0);
    if let KeySource::Key(k) = keys {
        if sa != 3 && c.rk != *k && c.sark != *k {
            out.stderr.push_str(&format!(
                "{}: configured reservation key doesn't match: 0x{k:x}\n",
                mp.name
            ));
            return code::SYNTAX_ERROR;
        }
    }
    let params = multipath::basic_params(c.rk, c.sark, c.alltgpt, c.aptpl, &c.tids);
    let r = match sa {
        0 | 6 => {
            mp.register(sa, c.rk, c.sark, c.alltgpt, c.aptpl, &c.tids)
                .await
        }
        2 => mp.release(c.rk, c.prout_type, c.aptpl).await,
        _ => mp
            .one_path(&crate::persist::device::prout_cmd(sa, c.prout_type, params))
            .await
            .map(|_| ()),
    };
    match r {
        Ok(()) => {
            if let (KeySource::File(f), 0 | 6) = (keys, sa) {
                let stored = if c.sark != 0 { Some(c.sark) } else { None };
                if let Err(e) = config::prkeys_store(f, &mp.name, stored) {
                    out.stderr.push_str(&format!("{}: {e}\n", mp.name));
                }
            }
            code::SUCCESS
        }
        Err(f) => {
            match f.status {
                code::SENSE_UNIT_ATTENTION => out
                    .stdout
                    .push_str("persistent reserve out: scsi status: Unit Attention\n"),
                code::RESERV_CONFLICT => out
                    .stdout
                    .push_str("persistent reserve out: scsi status: Reservation Conflict\n"),
                _ => {}
            }
            out.stdout.push_str("PR out: command failed\n");
            if let Some(e) = &f.error {
                out.stderr.push_str(&format!("{}: {e}\n", mp.name));
            } else if f.status == code::DMMP_ERROR {
                out.stderr
                    .push_str(&format!("{}: no usable path\n", mp.name));
            }
            f.status
        }
    }
}

async fn reregister(
    c: &Cmd,
    mp: &mut Multipath<IscsiLun>,
    keys: &KeySource,
    out: &mut Output,
) -> u8 {
    let key = if c.sark != 0 {
        Some(c.sark)
    } else {
        match keys {
            KeySource::Key(k) => Some(*k),
            KeySource::File(f) => config::prkeys_lookup(f, &mp.name).ok().flatten(),
            KeySource::None => None,
        }
    };
    let Some(key) = key else {
        out.stderr.push_str(&format!(
            "{}: no reservation key known (give --param-sark or configure reservation_key)\n",
            mp.name
        ));
        return code::SYNTAX_ERROR;
    };
    match mp.reregister(key, c.alltgpt).await {
        Ok(n) => {
            out.stdout.push_str(&format!(
                "{}: {n} path(s) re-registered with key 0x{key:x}\n",
                mp.name
            ));
            code::SUCCESS
        }
        Err(f) => {
            if let Some(e) = &f.error {
                out.stderr.push_str(&format!("{}: {e}\n", mp.name));
            }
            f.status
        }
    }
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
