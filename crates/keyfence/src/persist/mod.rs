//! `keyfence persist` (also run as `sg_persist`): sg_persist over iSCSI.
//!
//! Same options, same stdout, same stderr wording and the same exit
//! statuses as sg3_utils' sg_persist 0.67, so that cluster scripts which
//! parse sg_persist (Pacemaker's fence_scsi among them) work unchanged;
//! DEVICE is an iSCSI URL instead of a device node. Deliberate
//! differences are listed in [`DIFFERENCES`].

use std::ffi::OsString;
use std::io::Write as _;
use std::process::ExitCode;

pub mod device;
pub mod format;
pub mod getopt;
pub mod opts;
pub mod sgerr;
pub mod tid;

use device::{Lun, Target};
use keyfence_initiator::commands;
use opts::{Action, Opts, PROUT_REG_MOVE};
use sgerr::SgCat;

/// Where keyfence persist knowingly departs from sg_persist.
pub const DIFFERENCES: &str = "\
- DEVICE is an iSCSI URL; failing to connect or log in is reported like
  failing to open a device node (\"error opening file\"), exit status 15.
- An unknown or malformed option exits with status 1 (sg_persist prints
  the usage and exits 0).
- --prout-type values above 0xf are refused (sg_persist keeps the low
  four bits).
- Unit attentions pending for a freshly logged-in I_T nexus are cleared
  with TEST UNIT READY before the PR command, as a host's SCSI layer does
  for a device node.
- PR IN data longer than the allocation length is never read past its
  end: the header still reports the device's count, only the keys that
  were transferred are listed.
- Every invocation logs in with the same ISID (derived from initiator
  name, portal and target), so it is the same I_T nexus each time, as a
  host's device node is; two invocations on one device at the same moment
  share that nexus and the second login reinstates the first session.
- -v adds the initiator's error text instead of sg3_utils' CDB and sense
  dumps; the other stderr lines and all of stdout are unchanged.
- A LUN the target does not have (INQUIRY peripheral qualifier 011b, or
  sense ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED) is a device node
  that does not exist: \"error opening file\" with sg3_utils' text for
  that sense, \"Logical unit not supported\", exit status 15.
";

/// Everything one invocation writes, so that tests can compare it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Entry point: `keyfence persist ARGS` / `sg_persist ARGS`; `prog` is
/// the name it was run as, which its messages carry.
pub fn run(args: &[OsString], prog: &'static str) -> ExitCode {
    let stdin = std::io::stdin();
    let mut lock = stdin.lock();
    let parsed = opts::parse_as(prog, args, &mut lock);
    drop(lock);
    let mut out = Output {
        stderr: parsed.stderr,
        ..Output::default()
    };
    let code = match parsed.action {
        Action::Exit(c) => c,
        Action::Run(o) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(execute(&o, &mut out)),
            Err(e) => {
                out.stderr
                    .push_str(&format!("{prog}: cannot start runtime: {e}\n"));
                SgCat::OTHER
            }
        },
    };
    emit(&out);
    ExitCode::from(code.0)
}

/// Write captured output to the real stdout/stderr.
pub fn emit(out: &Output) {
    let mut so = std::io::stdout().lock();
    let _ = so.write_all(out.stdout.as_bytes());
    let _ = so.flush();
    let mut se = std::io::stderr().lock();
    let _ = se.write_all(out.stderr.as_bytes());
    let _ = se.flush();
}

/// Connect to the device named in `o` and do the work.
pub async fn execute(o: &Opts, out: &mut Output) -> SgCat {
    let target = match Target::from_device(&o.device, o.initiator_name.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            out.stderr.push_str(&format!("{}: {e}\n", o.prog));
            return SgCat::SYNTAX_ERROR;
        }
    };
    let lun = match target.connect(o.verbose).await {
        Ok(l) => l,
        Err(e) => {
            let dev = target.display_name();
            if o.inquiry {
                out.stderr.push_str(&format!(
                    "{}: error opening file (ro): {dev}: {e}\n",
                    o.prog
                ));
            } else {
                out.stderr
                    .push_str(&format!("{}: error opening file {dev} (rw): {e}\n", o.prog));
            }
            return SgCat::FILE_ERROR;
        }
    };
    let code = execute_on(&lun, &target.display_name(), o, out).await;
    lun.close().await;
    code
}

/// The sg_persist work on an attached LUN: INQUIRY (unless -n), then the
/// PR IN or PR OUT command, with sg_persist's output.
pub async fn execute_on<L: Lun>(lun: &L, dev: &str, o: &Opts, out: &mut Output) -> SgCat {
    device::clear_unit_attentions(lun, o.verbose, &mut out.stderr).await;
    let mut flagged = false;
    let ret = 'work: {
        if o.inquiry {
            match lun.execute(commands::inquiry(None, 36)).await {
                Ok(inq) if no_lu_here(&inq) => break 'work lu_not_supported(dev, o, out),
                Ok(inq) => out.stdout.push_str(&format::inquiry_header(&inq)),
                Err(e) if lu_not_supported_sense(&e) => break 'work lu_not_supported(dev, o, out),
                Err(e) => {
                    let cat = device::category(&e);
                    out.stdout
                        .push_str(&format!("{}: SCSI INQUIRY failed on {dev}\n", o.prog));
                    if o.verbose > 0 {
                        out.stderr.push_str(&format!("inquiry: {e}\n"));
                    }
                    flagged = true;
                    break 'work cat;
                }
            }
        }
        let r = if o.prin {
            prin_work(lun, o, out).await
        } else {
            prout_work(lun, o, out).await
        };
        match r {
            Ok(cat) => cat,
            Err(Absent) => lu_not_supported(dev, o, out),
        }
    };
    if ret != SgCat::CLEAN && ret != SgCat::FILE_ERROR && o.verbose == 0 && !flagged {
        match ret.describe(false) {
            Some(s) => out.stderr.push_str(&format!("{} failed: {s}\n", o.prog)),
            None => out
                .stderr
                .push_str(&format!("Some error occurred [{}]\n", ret.0)),
        }
    }
    ret
}

/// The logical unit addressed does not exist on the target.
struct Absent;

/// Standard INQUIRY data of a LUN the target does not have: peripheral
/// qualifier 011b (SPC-4 6.6.2).
fn no_lu_here(inq: &[u8]) -> bool {
    inq.first().is_some_and(|b| b >> 5 == 0b011)
}

/// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h).
fn lu_not_supported_sense(e: &keyfence_initiator::Error) -> bool {
    matches!(e, keyfence_initiator::Error::CheckCondition(s)
        if s.key == keyfence_scsi::SenseKey::IllegalRequest && s.asc == 0x25 && s.ascq == 0)
}

/// Report a missing LUN the way a missing device node is reported.
fn lu_not_supported(dev: &str, o: &Opts, out: &mut Output) -> SgCat {
    if o.inquiry {
        out.stderr.push_str(&format!(
            "{}: error opening file (ro): {dev}: Logical unit not supported\n",
            o.prog
        ));
    } else {
        out.stderr.push_str(&format!(
            "{}: error opening file {dev} (rw): Logical unit not supported\n",
            o.prog
        ));
    }
    SgCat::FILE_ERROR
}

async fn prin_work<L: Lun>(lun: &L, o: &Opts, out: &mut Output) -> Result<SgCat, Absent> {
    let alloc = u16::try_from(o.alloc_len).unwrap_or(u16::MAX);
    let data = match lun.execute(device::prin_cmd(o.prin_sa, alloc)).await {
        Ok(d) => d,
        Err(e) if lu_not_supported_sense(&e) => return Err(Absent),
        Err(e) => {
            let cat = device::category(&e);
            let b = format::prin_sa_str(o.prin_sa);
            report_failure(&mut out.stderr, &format!("PR in ({b})"), cat, o.verbose, &e);
            return Ok(cat);
        }
    };
    Ok(
        match format::prin_output(o.prin_sa, &data, o.alloc_len as usize, o.hex, o.verbose) {
            Ok(text) => {
                out.stdout.push_str(&text);
                SgCat::CLEAN
            }
            Err(text) => {
                out.stderr
                    .push_str("Unexpected response for PRIN Report Capabilities\n");
                out.stdout.push_str(&text);
                SgCat::MALFORMED
            }
        },
    )
}

async fn prout_work<L: Lun>(lun: &L, o: &Opts, out: &mut Output) -> Result<SgCat, Absent> {
    let params = opts::prout_parameter_list(o);
    let cmd = device::prout_cmd(o.prout_sa, o.prout_type, params);
    let what = if o.prout_sa == PROUT_REG_MOVE {
        "PR out (register and move)".to_string()
    } else {
        format!("PR out ({})", format::prout_sa_str(o.prout_sa))
    };
    match lun.execute(cmd).await {
        Ok(_) => {
            if o.verbose > 0 {
                if o.prout_sa == PROUT_REG_MOVE {
                    out.stderr
                        .push_str("PR out: 'register and move' command successful\n");
                } else {
                    out.stderr.push_str(&format!(
                        "PR out: command ({}) successful\n",
                        format::prout_sa_str(o.prout_sa)
                    ));
                }
            }
            Ok(SgCat::CLEAN)
        }
        Err(e) if lu_not_supported_sense(&e) => Err(Absent),
        Err(e) => {
            let cat = device::category(&e);
            report_failure(&mut out.stderr, &what, cat, o.verbose, &e);
            Ok(cat)
        }
    }
}

fn report_failure(
    err: &mut String,
    what: &str,
    cat: SgCat,
    verbose: u32,
    e: &keyfence_initiator::Error,
) {
    if verbose > 0 {
        err.push_str(&format!("    {e}\n"));
    }
    match cat {
        SgCat::INVALID_OP => err.push_str(&format!("{what}: command not supported\n")),
        SgCat::ILLEGAL_REQ => err.push_str(&format!(
            "{what}: bad field in cdb or parameter list (perhaps unsupported service action)\n"
        )),
        _ => err.push_str(&format!("{what}: {}\n", cat.category_str(verbose))),
    }
}
