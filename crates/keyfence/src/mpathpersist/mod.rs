//! `keyfence mpathpersist` (also run as `mpathpersist`): multipath-tools'
//! mpathpersist over iSCSI paths.
//!
//! Same options, stdout layout and MPATH_PR_* exit statuses as
//! mpathpersist 0.9.4 (fence_mpath parses them). DEVICE is a map named in
//! keyfence's configuration (see [`keyfence_fence::config`]), optionally written as
//! `/dev/mapper/NAME`, or an iSCSI URL whose target portals (SendTargets)
//! become the paths. How PR commands are spread over the paths is
//! described in [`keyfence_fence::multipath`]; deliberate differences in [`DIFFERENCES`].

use std::ffi::OsString;
use std::process::ExitCode;

pub mod format;
pub mod options;
pub mod paths;

use crate::persist::{emit, Output};
use format::code;
use keyfence_fence::config::{self, Config, KeySource};
use keyfence_fence::multipath::{self, Multipath};
use keyfence_fence::IscsiLun;
use options::{parse, BatchSettings, Cmd, MAX_PARAM_LEN, USAGE};

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
    let mut ctx = BatchSettings::default();
    let status = rt.block_on(handle_args(args, 0, &mut ctx, &mut out));
    emit(&out);
    ExitCode::from(status)
}

/// One command line (line 0) or batch line, then its batch file if any.
pub async fn handle_args(
    args: &[OsString],
    line: usize,
    ctx: &mut BatchSettings,
    out: &mut Output,
) -> u8 {
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

async fn do_batch_file(file: &str, ctx: &mut BatchSettings, out: &mut Output) -> u8 {
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

async fn execute(c: &Cmd, ctx: &BatchSettings, out: &mut Output) -> u8 {
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
    let (name, urls, map) = match paths::resolve(&device, &cfg, &iname, out).await {
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
    let mut mp = paths::open(&name, urls, &iname, ctx.verbose, out).await;
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
    mp.close().await;
    ret
}

async fn prin(c: &Cmd, ctx: &BatchSettings, mp: &mut Multipath<IscsiLun>, out: &mut Output) -> u8 {
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
        Err(e) => {
            if ctx.verbose >= 1 && !matches!(e, keyfence_fence::Error::NoPath) {
                out.stderr.push_str(&format!("{}: {e}\n", mp.name));
            }
            out.stderr
                .push_str("Persistent Reserve IN command failed\n");
            format::status_of_fence(&e)
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
            .one_path(&keyfence_fence::lun::prout_cmd(sa, c.prout_type, params))
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
        Err(e) => {
            let status = format::status_of_fence(&e);
            match status {
                code::SENSE_UNIT_ATTENTION => out
                    .stdout
                    .push_str("persistent reserve out: scsi status: Unit Attention\n"),
                code::RESERV_CONFLICT => out
                    .stdout
                    .push_str("persistent reserve out: scsi status: Reservation Conflict\n"),
                _ => {}
            }
            out.stdout.push_str("PR out: command failed\n");
            // NoPath displays as "no usable path".
            out.stderr.push_str(&format!("{}: {e}\n", mp.name));
            status
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
        Err(e) => {
            if !matches!(e, keyfence_fence::Error::NoPath) {
                out.stderr.push_str(&format!("{}: {e}\n", mp.name));
            }
            format::status_of_fence(&e)
        }
    }
}
