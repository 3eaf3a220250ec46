//! `keyfence takeover`: an initiator that crashed and came back under a
//! new I_T nexus (new ISID) takes its registrations and reservation back
//! from the nexus it lost, in one command:
//!
//! 1. log in with a new ISID (`--isid`, else a random one),
//! 2. READ FULL STATUS to find the old nexus' registrations (same
//!    initiator name, other ISID) and the reservation,
//! 3. REGISTER AND IGNORE EXISTING KEY the new nexus with the key to use
//!    from now on or, when that is the old key itself (the default), with
//!    a temporary key that nobody holds,
//! 4. PREEMPT AND ABORT the old key with the reservation's type, which
//!    moves the reservation to the new nexus when the old key held it,
//!    drops the old registrations and aborts the commands the old nexus
//!    may still have queued,
//! 5. when a temporary key was used, REGISTER the new nexus from it to the
//!    old key,
//! 6. READ FULL STATUS again, report, and verify: the new nexus must be
//!    registered with the key to use, no old nexus of ours may keep the
//!    old key, and the reservation must be the new nexus' when it was
//!    taken. Anything else is a failure (exit 99), never a success.
//!
//! Why the temporary key: PREEMPT (AND ABORT) removes the registrations of
//! every I_T nexus holding the preempted key; only when that key holds the
//! reservation does SPC-4 spare the nexus sending the command. A new nexus
//! registered under the old key would unregister itself whenever the old
//! key was not the holder.
//!
//! `--dry-run` reads the status and reports what would be done; it sends
//! no PERSISTENT RESERVE OUT at all.
//!
//! Exit statuses are sg3_utils' (0 done, 1 syntax, 24 reservation
//! conflict, 15 cannot connect, 99 the result is not what a takeover must
//! leave, ...).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::process::ExitCode;

use keyfence_initiator::{Error, Isid};
use keyfence_scsi::pr_data::FullStatus;
use keyfence_scsi::transport_id::TransportId;

use keyfence_fence::multipath::{basic_params, PROUT_REG, PROUT_REG_IGN};

use crate::persist::device::{self, IscsiLun, Lun, Target};
use crate::persist::format::PR_TYPE_STRS;
use crate::persist::getopt::{self, lo, HasArg, Item, LongOpt};
use crate::persist::sgerr::SgCat;
use crate::persist::{emit, Output};

const PROG: &str = "keyfence takeover";
const PROUT_PREEMPT_ABORT: u8 = 5;

pub(crate) const USAGE: &str = "\
Usage: keyfence takeover [OPTIONS] DEVICE

Take back the registration and reservation of this initiator after it
came back under a new I_T nexus: register the new nexus, PREEMPT AND
ABORT the key the old nexus holds, and verify the result. DEVICE is an
iSCSI URL
(iscsi://[user[%secret]@]host[:port]/target-iqn/lun).

Options:
  -K, --param-rk KEY     key for the new nexus (hex; default: the old key)
  -S, --old-key KEY      key of the old nexus (hex; default: the key the
                         device shows for our initiator name under another
                         ISID)
  -T, --prout-type TYPE  reservation type to take (hex 1,3,5,6,7,8; default:
                         the type of the reservation being taken over)
      --isid HEX         ISID for the new nexus (48 bits; default: random)
      --initiator-name IQN
  -n, --dry-run          report what would be done, change nothing
  -v, --verbose
  -h, --help
";

pub(crate) const LONGS: &[LongOpt] = &[
    lo("param-rk", HasArg::Required, 'K'),
    lo("old-key", HasArg::Required, 'S'),
    lo("prout-type", HasArg::Required, 'T'),
    lo("isid", HasArg::Required, 'i'),
    lo("initiator-name", HasArg::Required, 'N'),
    lo("dry-run", HasArg::No, 'n'),
    lo("verbose", HasArg::No, 'v'),
    lo("help", HasArg::No, 'h'),
    lo("device", HasArg::Required, 'd'),
];

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Opts {
    pub device: String,
    pub new_key: Option<u64>,
    pub old_key: Option<u64>,
    pub pr_type: Option<u8>,
    pub isid: Option<Isid>,
    pub initiator_name: Option<String>,
    pub dry_run: bool,
    pub verbose: u32,
}

pub fn parse(args: &[OsString], err: &mut String) -> Result<Option<Opts>, SgCat> {
    let items = getopt::scan(args, "K:S:T:d:nvh", LONGS).map_err(|e| {
        err.push_str(&format!("{PROG}: {}\n{USAGE}", e.0));
        SgCat::SYNTAX_ERROR
    })?;
    let mut o = Opts::default();
    let mut dev = None;
    let hex = |name: &str, v: &str, err: &mut String| {
        keyfence_fence::config::parse_key(v).ok_or_else(|| {
            err.push_str(&format!("{PROG}: bad argument to '--{name}': {v:?}\n"));
            SgCat::SYNTAX_ERROR
        })
    };
    for it in items {
        match it {
            Item::Operand(s) => {
                if dev.replace(s.clone()).is_some() {
                    err.push_str(&format!("{PROG}: unexpected extra argument: {s}\n"));
                    return Err(SgCat::SYNTAX_ERROR);
                }
            }
            Item::Opt(c, a) => {
                let a = a.unwrap_or_default();
                match c {
                    'K' => o.new_key = Some(hex("param-rk", &a, err)?),
                    'S' => o.old_key = Some(hex("old-key", &a, err)?),
                    'T' => match getopt::scan_hex_u32(&a) {
                        Some(t @ (1 | 3 | 5 | 6 | 7 | 8)) => o.pr_type = Some(t as u8),
                        _ => {
                            err.push_str(&format!(
                                "{PROG}: bad argument to '--prout-type': {a:?} (1, 3, 5, 6, 7 or 8)\n"
                            ));
                            return Err(SgCat::SYNTAX_ERROR);
                        }
                    },
                    'i' => {
                        let v = u64::from_str_radix(a.trim_start_matches("0x"), 16)
                            .ok()
                            .and_then(Isid::new);
                        match v {
                            Some(i) => o.isid = Some(i),
                            None => {
                                err.push_str(&format!(
                                    "{PROG}: bad argument to '--isid': {a:?} (12 hex digits at most)\n"
                                ));
                                return Err(SgCat::SYNTAX_ERROR);
                            }
                        }
                    }
                    'N' => o.initiator_name = Some(a),
                    'n' => o.dry_run = true,
                    'v' => o.verbose += 1,
                    'd' => dev = Some(a),
                    _ => {
                        err.push_str(USAGE);
                        return Ok(None);
                    }
                }
            }
        }
    }
    match dev {
        Some(d) => o.device = d,
        None => {
            err.push_str(&format!("{PROG}: no DEVICE given\n{USAGE}"));
            return Err(SgCat::SYNTAX_ERROR);
        }
    }
    Ok(Some(o))
}

pub fn run(args: &[OsString]) -> ExitCode {
    let mut out = Output::default();
    let code = match parse(args, &mut out.stderr) {
        Err(c) => c,
        Ok(None) => SgCat::CLEAN,
        Ok(Some(o)) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(execute(&o, &mut out)),
            Err(e) => {
                out.stderr.push_str(&format!("{PROG}: {e}\n"));
                SgCat::OTHER
            }
        },
    };
    emit(&out);
    ExitCode::from(code.0)
}

fn port_str(t: &TransportId) -> String {
    match t {
        TransportId::Iscsi {
            name,
            isid: Some(i),
        } => format!("{name},i,0x{i:012x}"),
        TransportId::Iscsi { name, isid: None } => name.clone(),
        TransportId::FibreChannel { n_port_name } => format!("fc 0x{n_port_name:016x}"),
        TransportId::Sas { sas_address } => format!("sas 0x{sas_address:016x}"),
    }
}

fn describe(fs: &FullStatus, s: &mut String) {
    let holder = fs.descriptors.iter().find(|d| d.r_holder);
    match holder {
        Some(h) => {
            let _ = writeln!(
                s,
                "    reservation: {} held with key 0x{:x}",
                PR_TYPE_STRS[(h.pr_type & 0xf) as usize],
                h.key
            );
        }
        None => s.push_str("    reservation: none\n"),
    }
    for d in &fs.descriptors {
        let _ = writeln!(
            s,
            "    key 0x{:x}  {}  {}{}",
            d.key,
            port_str(&d.transport_id),
            if d.all_tg_pt {
                "all target ports".to_string()
            } else {
                format!("relative target port {}", d.relative_target_port)
            },
            if d.r_holder { "  (holder)" } else { "" }
        );
    }
}

fn fail(out: &mut Output, what: &str, e: &Error) -> SgCat {
    let cat = device::category(e);
    out.stderr.push_str(&format!("{PROG}: {what}: {e}\n"));
    cat
}

async fn full_status<L: Lun>(lun: &L) -> Result<FullStatus, Error> {
    let data = lun.execute(device::prin_cmd(3, 8192)).await?;
    FullStatus::decode(&data).map_err(|e| Error::BadData {
        what: "READ FULL STATUS data",
        detail: e.to_string(),
    })
}

pub async fn execute(o: &Opts, out: &mut Output) -> SgCat {
    let mut target = match Target::from_device(&o.device, o.initiator_name.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            out.stderr.push_str(&format!("{PROG}: {e}\n"));
            return SgCat::SYNTAX_ERROR;
        }
    };
    let isid = o.isid.unwrap_or_else(|| {
        // Random ISID format (T=10b), 40 random bits.
        let bits: u64 = rand::random::<u64>() & 0xff_ffff_ffff;
        Isid::new(u64::from(Isid::TYPE_RANDOM) << 46 | bits)
            .unwrap_or_else(|| target.effective_isid())
    });
    target.isid = Some(isid);
    let lun = match IscsiLun::connect(&target, o.verbose).await {
        Ok(l) => l,
        Err(e) => {
            out.stderr.push_str(&format!(
                "{PROG}: cannot log in to {}: {e}\n",
                target.display_name()
            ));
            return SgCat::FILE_ERROR;
        }
    };
    let code = takeover_on(&lun, &target, isid, o, out).await;
    lun.close().await;
    code
}

/// The takeover steps on a LUN logged in as the new nexus.
pub async fn takeover_on<L: Lun>(
    lun: &L,
    target: &Target,
    isid: Isid,
    o: &Opts,
    out: &mut Output,
) -> SgCat {
    let me = TransportId::Iscsi {
        name: target.initiator_name.to_ascii_lowercase(),
        isid: Some(isid.value()),
    };
    let _ = writeln!(
        out.stdout,
        "takeover of {} as new I_T nexus {}",
        target.display_name(),
        port_str(&me)
    );
    device::clear_unit_attentions(lun, o.verbose, &mut out.stderr).await;
    let before = match full_status(lun).await {
        Ok(f) => f,
        Err(e) => return fail(out, "READ FULL STATUS", &e),
    };
    out.stdout.push_str("  before:\n");
    describe(&before, &mut out.stdout);
    let mine = |t: &TransportId| match t {
        TransportId::Iscsi {
            name,
            isid: Some(i),
        } => name.eq_ignore_ascii_case(&target.initiator_name) && *i != isid.value(),
        _ => false,
    };
    let old: Vec<_> = before
        .descriptors
        .iter()
        .filter(|d| mine(&d.transport_id))
        .collect();
    let old_key = match o.old_key {
        Some(k) => Some(k),
        None => {
            let mut keys: Vec<u64> = old.iter().map(|d| d.key).collect();
            keys.sort_unstable();
            keys.dedup();
            match keys.as_slice() {
                [] => None,
                [k] => Some(*k),
                many => {
                    let list: Vec<String> = many.iter().map(|k| format!("0x{k:x}")).collect();
                    out.stderr.push_str(&format!(
                        "{PROG}: our old nexuses hold several keys ({}); choose one with --old-key\n",
                        list.join(", ")
                    ));
                    return SgCat::CONTRADICT;
                }
            }
        }
    };
    let Some(old_key) = old_key else {
        out.stdout.push_str(
            "  no registration of this initiator under another ISID: nothing to take over\n",
        );
        return SgCat::CLEAN;
    };
    let new_key = o.new_key.unwrap_or(old_key);
    if new_key == 0 {
        out.stderr.push_str(&format!(
            "{PROG}: the reservation key to use must not be 0\n"
        ));
        return SgCat::SYNTAX_ERROR;
    }
    let holder = before.descriptors.iter().find(|d| d.r_holder);
    let pr_type = o
        .pr_type
        .or_else(|| holder.map(|h| h.pr_type & 0xf))
        .unwrap_or(0);
    let takes_reservation = holder.is_some_and(|h| h.key == old_key);
    // PREEMPT AND ABORT removes every registration under the preempted key
    // (when that key is not the reservation holder, SPC-4 spares not even
    // the sending nexus), so the new nexus must not hold the old key while
    // it preempts: when the key is reused it first registers under a
    // temporary key, and moves to the old key afterwards.
    let first_key = if new_key == old_key {
        temporary_key(&before, old_key)
    } else {
        new_key
    };
    let reservation_note = if takes_reservation {
        format!(
            " taking the reservation ({})",
            PR_TYPE_STRS[pr_type as usize]
        )
    } else {
        String::new()
    };
    if o.dry_run {
        let _ = writeln!(
            out.stdout,
            "  dry run: would register the new nexus with {}, PREEMPT AND ABORT key 0x{old_key:x}{reservation_note}{}; nothing was changed",
            if first_key != new_key {
                "a temporary key".to_string()
            } else {
                format!("key 0x{new_key:x}")
            },
            if first_key != new_key {
                format!(", then change the new nexus' key to 0x{new_key:x}")
            } else {
                String::new()
            }
        );
        return SgCat::CLEAN;
    }
    let reg = basic_params(0, first_key, false, false, &[]);
    if let Err(e) = lun.execute(device::prout_cmd(PROUT_REG_IGN, 0, reg)).await {
        return fail(out, "REGISTER AND IGNORE EXISTING KEY", &e);
    }
    if first_key == new_key {
        let _ = writeln!(
            out.stdout,
            "  registered the new nexus with key 0x{new_key:x}"
        );
    } else {
        let _ = writeln!(
            out.stdout,
            "  registered the new nexus with temporary key 0x{first_key:x}"
        );
    }
    let p = basic_params(first_key, old_key, false, false, &[]);
    if let Err(e) = lun
        .execute(device::prout_cmd(PROUT_PREEMPT_ABORT, pr_type, p))
        .await
    {
        let cat = fail(out, "PREEMPT AND ABORT", &e);
        undo_registration(lun, first_key, out).await;
        return cat;
    }
    let _ = writeln!(
        out.stdout,
        "  preempted and aborted key 0x{old_key:x} ({} old registration(s){})",
        old.len(),
        if takes_reservation {
            format!(", reservation taken as {}", PR_TYPE_STRS[pr_type as usize])
        } else {
            String::new()
        }
    );
    if first_key != new_key {
        let p = basic_params(first_key, new_key, false, false, &[]);
        if let Err(e) = lun.execute(device::prout_cmd(PROUT_REG, 0, p)).await {
            let cat = fail(out, "REGISTER (to the key to keep)", &e);
            undo_registration(lun, first_key, out).await;
            return cat;
        }
        let _ = writeln!(out.stdout, "  changed the new nexus' key to 0x{new_key:x}");
    }
    if let Some(h) = holder.filter(|h| h.key != old_key) {
        let _ = writeln!(
            out.stdout,
            "  note: the reservation is held by key 0x{:x}, not ours; it was left alone",
            h.key
        );
    }
    let after = match full_status(lun).await {
        Ok(after) => after,
        Err(e) => return fail(out, "READ FULL STATUS", &e),
    };
    out.stdout.push_str("  after:\n");
    describe(&after, &mut out.stdout);
    match verify(&after, &me, new_key, old_key, takes_reservation, &mine) {
        Ok(()) => SgCat::CLEAN,
        Err(why) => {
            out.stderr
                .push_str(&format!("{PROG}: takeover failed: {why}\n"));
            SgCat::OTHER
        }
    }
}

/// A key for the new nexus to preempt with: not `old_key`, not 0, not any
/// key registered now (so the preemption touches only the old key).
fn temporary_key(fs: &FullStatus, old_key: u64) -> u64 {
    loop {
        let k: u64 = rand::random();
        if k != 0 && k != old_key && !fs.descriptors.iter().any(|d| d.key == k) {
            return k;
        }
    }
}

/// Best effort: unregister the new nexus after a failed step, so a failed
/// takeover does not leave a registration behind.
async fn undo_registration<L: Lun>(lun: &L, key: u64, out: &mut Output) {
    let p = basic_params(key, 0, false, false, &[]);
    match lun.execute(device::prout_cmd(PROUT_REG, 0, p)).await {
        Ok(_) => out
            .stderr
            .push_str(&format!("{PROG}: the new nexus was unregistered again\n")),
        Err(e) => out.stderr.push_str(&format!(
            "{PROG}: could not unregister the new nexus (key 0x{key:x}): {e}\n"
        )),
    }
}

/// What a takeover must have achieved, checked on READ FULL STATUS after
/// it: the new nexus registered with `new_key`, no old nexus of ours left
/// registered, and the reservation on the new nexus when it was taken.
fn verify(
    after: &FullStatus,
    me: &TransportId,
    new_key: u64,
    old_key: u64,
    takes_reservation: bool,
    is_old_nexus: &dyn Fn(&TransportId) -> bool,
) -> Result<(), String> {
    let is_me = |t: &TransportId| match (t, me) {
        (
            TransportId::Iscsi {
                name: a,
                isid: Some(x),
            },
            TransportId::Iscsi {
                name: b,
                isid: Some(y),
            },
        ) => a.eq_ignore_ascii_case(b) && x == y,
        _ => false,
    };
    let Some(mine) = after.descriptors.iter().find(|d| is_me(&d.transport_id)) else {
        return Err(format!(
            "the new I_T nexus {} is not registered",
            port_str(me)
        ));
    };
    if mine.key != new_key {
        return Err(format!(
            "the new I_T nexus is registered with key 0x{:x}, not 0x{new_key:x}",
            mine.key
        ));
    }
    if let Some(d) = after
        .descriptors
        .iter()
        .find(|d| is_old_nexus(&d.transport_id) && d.key == old_key)
    {
        return Err(format!(
            "the old I_T nexus {} is still registered with key 0x{old_key:x}",
            port_str(&d.transport_id)
        ));
    }
    if takes_reservation && !mine.r_holder {
        return Err("the new I_T nexus does not hold the reservation".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfence_scsi::pr_data::FullStatusDescriptor;

    fn p(a: &[&str]) -> (Result<Option<Opts>, SgCat>, String) {
        let v: Vec<OsString> = a.iter().map(OsString::from).collect();
        let mut e = String::new();
        (parse(&v, &mut e), e)
    }

    #[test]
    fn options() {
        let o = p(&[
            "-K",
            "0xabc",
            "--old-key=123",
            "-T",
            "5",
            "--isid",
            "0x80000000abcd",
            "-n",
            "-v",
            "iscsi://h/iqn.a:b/0",
        ])
        .0
        .unwrap()
        .unwrap();
        assert_eq!(o.new_key, Some(0xabc));
        assert_eq!(o.old_key, Some(0x123));
        assert_eq!(o.pr_type, Some(5));
        assert_eq!(o.isid.map(|i| i.value()), Some(0x8000_0000_abcd));
        assert!(o.dry_run);
        assert_eq!(p(&["-T", "2", "x"]).0.unwrap_err(), SgCat::SYNTAX_ERROR);
        assert_eq!(
            p(&["--isid", "1000000000000", "x"]).0.unwrap_err(),
            SgCat::SYNTAX_ERROR
        );
        assert_eq!(p(&["-K", "zz", "x"]).0.unwrap_err(), SgCat::SYNTAX_ERROR);
        assert_eq!(p(&[]).0.unwrap_err(), SgCat::SYNTAX_ERROR);
        assert_eq!(p(&["a", "b"]).0.unwrap_err(), SgCat::SYNTAX_ERROR);
        assert!(p(&["-h"]).0.unwrap().is_none());
    }

    fn desc(name: &str, isid: u64, key: u64, holder: bool) -> FullStatusDescriptor {
        FullStatusDescriptor {
            key,
            all_tg_pt: false,
            r_holder: holder,
            scope: 0,
            pr_type: if holder { 5 } else { 0 },
            relative_target_port: 1,
            transport_id: TransportId::Iscsi {
                name: name.into(),
                isid: Some(isid),
            },
        }
    }

    #[test]
    fn verify_never_accepts_a_takeover_that_left_the_node_unregistered() {
        let me = TransportId::Iscsi {
            name: "iqn.2026-11.io.t:a".into(),
            isid: Some(2),
        };
        let old_nexus = |t: &TransportId| matches!(t, TransportId::Iscsi { name, isid: Some(i) } if name == "iqn.2026-11.io.t:a" && *i != 2);
        let fs = |d: Vec<FullStatusDescriptor>| FullStatus {
            generation: 7,
            descriptors: d,
        };
        // What the old sequence left when the old key was not the holder:
        // the new nexus preempted its own registration away.
        let e = verify(
            &fs(vec![desc("iqn.2026-11.io.t:b", 3, 0xb, true)]),
            &me,
            0xa,
            0xa,
            false,
            &old_nexus,
        )
        .unwrap_err();
        assert!(e.contains("is not registered"), "{e}");
        let good = fs(vec![
            desc("iqn.2026-11.io.t:b", 3, 0xb, false),
            desc("iqn.2026-11.io.t:a", 2, 0xa, true),
        ]);
        assert_eq!(verify(&good, &me, 0xa, 0xa, true, &old_nexus), Ok(()));
        let e = verify(&good, &me, 0xc, 0xa, true, &old_nexus).unwrap_err();
        assert!(e.contains("registered with key 0xa, not 0xc"), "{e}");
        let not_holder = fs(vec![desc("iqn.2026-11.io.t:a", 2, 0xa, false)]);
        let e = verify(&not_holder, &me, 0xa, 0xa, true, &old_nexus).unwrap_err();
        assert!(e.contains("does not hold the reservation"), "{e}");
        let old_left = fs(vec![
            desc("iqn.2026-11.io.t:a", 2, 0xa, true),
            desc("iqn.2026-11.io.t:a", 1, 0xa, false),
        ]);
        let e = verify(&old_left, &me, 0xa, 0xa, true, &old_nexus).unwrap_err();
        assert!(e.contains("still registered"), "{e}");
    }

    #[test]
    fn temporary_key_is_nobody_s() {
        let fs = FullStatus {
            generation: 1,
            descriptors: vec![desc("iqn.2026-11.io.t:a", 1, 0xa, false)],
        };
        for _ in 0..100 {
            let k = temporary_key(&fs, 0xa);
            assert!(k != 0 && k != 0xa);
        }
    }
}
