//! Persistent reservations over a multipath device: several iSCSI paths
//! (each its own I_T nexus) to one logical unit, handled the way
//! libmpathpersist handles a dm-multipath map.
//!
//! * PR IN: the first working path answers; a path whose connection fails
//!   is marked down and the next one is tried.
//! * REGISTER / REGISTER AND IGNORE EXISTING KEY: sent on every path in
//!   parallel (once per initiator port when ALL_TG_PT is set, since one
//!   such registration covers every target port). If any path fails with a
//!   SCSI error (RESERVATION CONFLICT above all) the paths that succeeded
//!   are rolled back with REGISTER AND IGNORE EXISTING KEY: to the old key
//!   for REGISTER (the command only succeeded where the old key was the
//!   one given), to unregistered for REGISTER AND IGNORE (the old key is
//!   unknown), so the device is never left half registered.
//! * RESERVE, PREEMPT, PREEMPT AND ABORT, CLEAR: one path; the next one only
//!   if the transport fails before the device answers.
//! * RELEASE: every path in parallel (a release from a non-holder is a
//!   no-op). If the reservation is still held with our key afterwards, the
//!   holder is an I_T nexus we cannot reach (a dead path): read the full
//!   status, CLEAR, then put every registration back with REGISTER +
//!   SPEC_I_PT from a live path on the same target port (grouped by key,
//!   ALL_TG_PT and relative target port).
//! * UNIT ATTENTION is retried (5 times, like libmpathpersist), as is
//!   NOT READY / LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE
//!   TRANSITION.

use std::collections::BTreeMap;
use std::sync::Arc;

use keyfence_initiator::commands::Command;
use keyfence_initiator::{Error as ScsiError, IscsiUrl};
use keyfence_scsi::pr_data::{FullStatus, PrOutParams};
use keyfence_scsi::transport_id::TransportId;

use crate::lun::{prin_cmd, prout_cmd, IscsiLun, Lun, Target};
use crate::{Error, Result};

pub const PRIN_RRES: u8 = 1;
pub const PRIN_RFSTAT: u8 = 3;
pub const PROUT_REG: u8 = 0;
pub const PROUT_REL: u8 = 2;
pub const PROUT_CLEAR: u8 = 3;
pub const PROUT_REG_IGN: u8 = 6;

/// Retries through UNIT ATTENTION / transitioning (libmpathpersist MAXRETRY).
pub const MAX_RETRY: u32 = 5;

/// What we know about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path's URL as shown to the user (no secret).
    pub url: String,
    /// Our initiator port on this path: iSCSI name and ISID.
    pub initiator_name: String,
    pub isid: u64,
    /// RELATIVE TARGET PORT IDENTIFIER of the target port this path uses
    /// (VPD page 83h), when the device reports it.
    pub rtpi: Option<u16>,
}

impl PathInfo {
    /// True when `tid` names this path's initiator port.
    pub fn is_port(&self, tid: &TransportId) -> bool {
        match tid {
            TransportId::Iscsi {
                name,
                isid: Some(i),
            } => name.eq_ignore_ascii_case(&self.initiator_name) && *i == self.isid,
            _ => false,
        }
    }
}

/// One path: its identity and, while it works, its LUN.
pub struct MPath<P> {
    pub info: PathInfo,
    pub lun: Option<Arc<P>>,
    /// Why the path is down.
    pub down: Option<String>,
}

/// A multipath device and a log of what was done (for `-v`).
pub struct Multipath<P> {
    pub name: String,
    pub paths: Vec<MPath<P>>,
    pub log: Vec<String>,
}

/// True for errors after which the path cannot be used (as opposed to the
/// device answering with a SCSI status).
pub fn is_path_error(e: &ScsiError) -> bool {
    e.is_connection_error() || matches!(e, ScsiError::Timeout { .. } | ScsiError::TargetFailure(_))
}

/// Run one command, retrying UNIT ATTENTION and ALUA transitions.
pub async fn exec_retry<P: Lun>(lun: &P, cmd: &Command) -> Result<Vec<u8>, ScsiError> {
    let mut tries = 0;
    loop {
        match lun.execute(cmd.clone()).await {
            Err(ScsiError::UnitAttention(_)) if tries < MAX_RETRY => tries += 1,
            Err(ScsiError::CheckCondition(s))
                if tries < MAX_RETRY
                    && s.key == keyfence_scsi::SenseKey::NotReady
                    && s.asc == 0x04
                    && s.ascq == 0x0a =>
            {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            r => return r,
        }
    }
}

/// Parameter list of a basic PR OUT (SPC-4 6.16.3); SPEC_I_PT is set when
/// `tids` is not empty.
pub fn basic_params(
    rk: u64,
    sark: u64,
    all_tg_pt: bool,
    aptpl: bool,
    tids: &[TransportId],
) -> Vec<u8> {
    PrOutParams {
        reservation_key: rk,
        service_action_key: sark,
        spec_i_pt: !tids.is_empty(),
        all_tg_pt,
        aptpl,
        transport_ids: tids.to_vec(),
    }
    .encode()
}

fn prout(sa: u8, pr_type: u8, params: Vec<u8>) -> Command {
    prout_cmd(sa, pr_type, params)
}

fn bad_data(what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Scsi(ScsiError::BadData {
        what,
        detail: e.to_string(),
    })
}

/// What happened to one path while a multipath device was opened, in
/// path order (for the caller to report).
#[derive(Debug)]
pub enum PathEvent {
    /// The path logged in and reaches the device.
    Up {
        url: String,
        initiator_port: keyfence_scsi::InitiatorPort,
        rtpi: Option<u16>,
    },
    /// The path could not be used.
    Down { url: String, error: ScsiError },
    /// The path reaches a different logical unit (VPD page 83h logical
    /// unit designators differ) and was logged out again.
    OtherLun { url: String },
}

/// The logical-unit designators of VPD page 83h that identify a logical
/// unit (T10 vendor ID, EUI-64, NAA, SCSI name string).
fn lu_designators(ids: &[keyfence_scsi::vpd::Designator]) -> Vec<Vec<u8>> {
    ids.iter()
        .filter(|d| d.association == 0 && matches!(d.designator_type, 1 | 2 | 3 | 8))
        .map(|d| d.value.clone())
        .collect()
}

impl Multipath<IscsiLun> {
    /// Log in on every path (concurrently) and learn its identity; keep
    /// only the paths that reach the same logical unit as the first one
    /// that answered (VPD page 83h, logical unit designators). Paths that
    /// fail are kept, marked down.
    pub async fn open(
        name: &str,
        urls: Vec<IscsiUrl>,
        initiator_name: &str,
    ) -> (Multipath<IscsiLun>, Vec<PathEvent>) {
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
                    Ok::<_, ScsiError>((lun, rtpi, lu_designators(&ids)))
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
        let mut events = Vec::new();
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
                            ids.is_empty()
                                || first.is_empty()
                                || ids.iter().any(|i| first.contains(i))
                        }
                    };
                    if !same {
                        events.push(PathEvent::OtherLun { url });
                        lun.close().await;
                        continue;
                    }
                    let port = lun.initiator_port();
                    events.push(PathEvent::Up {
                        url: url.clone(),
                        initiator_port: port.clone(),
                        rtpi,
                    });
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
                    paths.push(MPath {
                        info: PathInfo {
                            url: url.clone(),
                            initiator_name: t.initiator_name.clone(),
                            isid: t.effective_isid().value(),
                            rtpi: None,
                        },
                        lun: None,
                        down: Some(e.to_string()),
                    });
                    events.push(PathEvent::Down { url, error: e });
                }
            }
        }
        (Multipath::new(name.to_string(), paths), events)
    }

    /// Log out of every path (best effort).
    pub async fn close(&mut self) {
        for p in std::mem::take(&mut self.paths) {
            if let Some(l) = p.lun.and_then(|a| Arc::try_unwrap(a).ok()) {
                l.close().await;
            }
        }
    }
}

impl<P: Lun + 'static> Multipath<P> {
    pub fn new(name: String, paths: Vec<MPath<P>>) -> Self {
        Multipath {
            name,
            paths,
            log: Vec::new(),
        }
    }

    fn up(&self) -> Vec<usize> {
        (0..self.paths.len())
            .filter(|&i| self.paths[i].lun.is_some())
            .collect()
    }

    fn mark_down(&mut self, i: usize, why: &ScsiError) {
        let p = &mut self.paths[i];
        self.log
            .push(format!("{}: path {} failed: {why}", self.name, p.info.url));
        p.lun = None;
        p.down = Some(why.to_string());
    }

    /// Run `cmd` on the first path that works.
    pub async fn one_path(&mut self, cmd: &Command) -> Result<(usize, Vec<u8>)> {
        for i in self.up() {
            let Some(lun) = self.paths[i].lun.clone() else {
                continue;
            };
            match exec_retry(&*lun, cmd).await {
                Ok(d) => return Ok((i, d)),
                Err(e) if is_path_error(&e) => self.mark_down(i, &e),
                Err(e) => return Err(Error::Scsi(e)),
            }
        }
        Err(Error::NoPath)
    }

    /// PERSISTENT RESERVE IN on the first working path.
    pub async fn prin(&mut self, sa: u8, alloc: u16) -> Result<Vec<u8>> {
        self.one_path(&prin_cmd(sa, alloc)).await.map(|(_, d)| d)
    }

    /// Run per-path commands on the given paths concurrently; results in
    /// the same order. Path errors mark the path down.
    async fn parallel(
        &mut self,
        jobs: Vec<(usize, Command)>,
    ) -> Vec<(usize, Result<(), ScsiError>)> {
        let mut set = tokio::task::JoinSet::new();
        for (slot, (i, cmd)) in jobs.into_iter().enumerate() {
            if let Some(lun) = self.paths[i].lun.clone() {
                set.spawn(async move { (slot, i, exec_retry(&*lun, &cmd).await.map(|_| ())) });
            }
        }
        let mut out = Vec::new();
        while let Some(j) = set.join_next().await {
            match j {
                Ok(r) => out.push(r),
                Err(e) => self
                    .log
                    .push(format!("{}: path task failed: {e}", self.name)),
            }
        }
        out.sort_by_key(|(slot, _, _)| *slot);
        let mut res = Vec::new();
        for (_, i, r) in out {
            if let Err(e) = &r {
                if is_path_error(e) {
                    self.mark_down(i, e);
                }
            }
            res.push((i, r));
        }
        res
    }

    /// REGISTER (`sa` 0) or REGISTER AND IGNORE EXISTING KEY (`sa` 6) on
    /// every path, rolling back on partial failure.
    pub async fn register(
        &mut self,
        sa: u8,
        rk: u64,
        sark: u64,
        all_tg_pt: bool,
        aptpl: bool,
        tids: &[TransportId],
    ) -> Result<()> {
        let mut targets = self.up();
        if all_tg_pt {
            let mut seen = std::collections::HashSet::new();
            targets.retain(|&i| {
                let p = &self.paths[i].info;
                seen.insert((p.initiator_name.to_ascii_lowercase(), p.isid))
            });
        }
        if targets.is_empty() {
            return Err(Error::NoPath);
        }
        let cmd = prout(sa, 0, basic_params(rk, sark, all_tg_pt, aptpl, tids));
        let jobs = targets.iter().map(|&i| (i, cmd.clone())).collect();
        let results = self.parallel(jobs).await;
        let ok: Vec<usize> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(i, _)| *i)
            .collect();
        let mut scsi_errors: Vec<ScsiError> = results
            .into_iter()
            .filter_map(|(_, r)| r.err())
            .filter(|e| !is_path_error(e))
            .collect();
        if scsi_errors.is_empty() {
            if ok.is_empty() {
                return Err(Error::NoPath);
            }
            return Ok(());
        }
        // Partial failure: undo what succeeded.
        if !ok.is_empty() && sark != 0 {
            let back_to = if sa == PROUT_REG { rk } else { 0 };
            let rb = prout(
                PROUT_REG_IGN,
                0,
                basic_params(0, back_to, all_tg_pt, aptpl, &[]),
            );
            for &i in &ok {
                self.log.push(format!(
                    "{}: rolling back registration on path {} (to key 0x{back_to:x})",
                    self.name, self.paths[i].info.url
                ));
            }
            let jobs = ok.iter().map(|&i| (i, rb.clone())).collect();
            for (i, r) in self.parallel(jobs).await {
                if let Err(e) = r {
                    self.log.push(format!(
                        "{}: rollback on path {} failed: {e}",
                        self.name, self.paths[i].info.url
                    ));
                }
            }
        }
        let pos = scsi_errors
            .iter()
            .position(|e| matches!(e, ScsiError::ReservationConflict))
            .unwrap_or(0);
        Err(Error::Scsi(scsi_errors.swap_remove(pos)))
    }

    /// RELEASE on every path; recover a reservation held by a dead path.
    pub async fn release(&mut self, rk: u64, pr_type: u8, aptpl: bool) -> Result<()> {
        let targets = self.up();
        if targets.is_empty() {
            return Err(Error::NoPath);
        }
        let cmd = prout(PROUT_REL, pr_type, basic_params(rk, 0, false, aptpl, &[]));
        let results = self
            .parallel(targets.iter().map(|&i| (i, cmd.clone())).collect())
            .await;
        if results
            .iter()
            .all(|(_, r)| matches!(r, Err(e) if is_path_error(e)))
        {
            return Err(Error::NoPath);
        }
        if let Some(e) = results
            .into_iter()
            .filter_map(|(_, r)| r.err())
            .find(|e| !is_path_error(e))
        {
            return Err(Error::Scsi(e));
        }
        let resv = self.prin(PRIN_RRES, 8192).await?;
        let rr = keyfence_scsi::pr_data::ReadReservation::decode(&resv)
            .map_err(|e| bad_data("READ RESERVATION data", e))?;
        match rr.reservation {
            Some(r) if r.key == rk && rk != 0 => {
                self.log.push(format!(
                    "{}: reservation with key 0x{rk:x} still held after RELEASE on all paths: \
                     the holder path is unreachable; clearing and re-registering",
                    self.name
                ));
                self.recover_dead_holder(rk).await
            }
            _ => Ok(()),
        }
    }

    /// READ FULL STATUS, CLEAR, and put every registration back.
    async fn recover_dead_holder(&mut self, rk: u64) -> Result<()> {
        let data = self.prin(PRIN_RFSTAT, 8192).await?;
        let fs = FullStatus::decode(&data).map_err(|e| bad_data("READ FULL STATUS data", e))?;
        // (key, all_tg_pt, rtpi) -> initiator ports
        let mut groups: BTreeMap<(u64, bool, u16), Vec<TransportId>> = BTreeMap::new();
        for d in &fs.descriptors {
            let rtpi = if d.all_tg_pt {
                0
            } else {
                d.relative_target_port
            };
            let g = groups.entry((d.key, d.all_tg_pt, rtpi)).or_default();
            if !g.contains(&d.transport_id) {
                g.push(d.transport_id.clone());
            }
        }
        self.one_path(&prout(
            PROUT_CLEAR,
            0,
            basic_params(rk, 0, false, false, &[]),
        ))
        .await?;
        // Pick a sender per group: a live path on the right target port,
        // preferably one whose own registration is part of the group.
        let mut plan = Vec::new();
        let mut lost = Vec::new();
        for ((key, atp, rtpi), ports) in groups {
            let cands: Vec<usize> = self
                .up()
                .into_iter()
                .filter(|&i| atp || self.paths[i].info.rtpi == Some(rtpi))
                .collect();
            let member = cands
                .iter()
                .copied()
                .find(|&i| ports.iter().any(|t| self.paths[i].info.is_port(t)));
            match member.or_else(|| cands.first().copied()) {
                Some(i) => plan.push((member.is_some(), i, key, atp, ports)),
                None => lost.push((key, atp, rtpi, ports.len())),
            }
        }
        // Senders that are not members register and unregister again, so
        // they go first, while no sender is registered yet.
        plan.sort_by_key(|(member, ..)| *member);
        let mut first_err = None;
        for (member, i, key, atp, ports) in plan {
            let me = self.paths[i].info.clone();
            let others: Vec<TransportId> = ports.into_iter().filter(|t| !me.is_port(t)).collect();
            let Some(lun) = self.paths[i].lun.clone() else {
                continue;
            };
            let reg = prout(PROUT_REG, 0, basic_params(0, key, atp, false, &others));
            let r = exec_retry(&*lun, &reg).await;
            self.log.push(format!(
                "{}: re-registered key 0x{key:x} for {} initiator port(s){} via {}: {}",
                self.name,
                others.len() + usize::from(member),
                if atp { " on all target ports" } else { "" },
                me.url,
                match &r {
                    Ok(_) => "ok".to_string(),
                    Err(e) => e.to_string(),
                }
            ));
            if let Err(e) = r {
                first_err.get_or_insert(e);
                continue;
            }
            if !member {
                let unreg = prout(PROUT_REG, 0, basic_params(key, 0, false, false, &[]));
                if let Err(e) = exec_retry(&*lun, &unreg).await {
                    self.log.push(format!(
                        "{}: could not unregister helper path {}: {e}",
                        self.name, me.url
                    ));
                    first_err.get_or_insert(e);
                }
            }
        }
        for (key, atp, rtpi, n) in lost {
            self.log.push(format!(
                "{}: cannot restore {n} registration(s) with key 0x{key:x} on {}: no live path there",
                self.name,
                if atp { "all target ports".to_string() } else { format!("relative target port {rtpi}") }
            ));
        }
        match first_err {
            Some(e) => Err(Error::Scsi(e)),
            None => Ok(()),
        }
    }

    /// Register every live path whose initiator port has no registration
    /// (paths that came back after a REGISTER went out), with `key`.
    /// Returns how many paths were registered.
    pub async fn reregister(&mut self, key: u64, all_tg_pt: bool) -> Result<usize> {
        let data = self.prin(PRIN_RFSTAT, 8192).await?;
        let fs = FullStatus::decode(&data).map_err(|e| bad_data("READ FULL STATUS data", e))?;
        let missing: Vec<usize> = self
            .up()
            .into_iter()
            .filter(|&i| {
                let p = &self.paths[i].info;
                !fs.descriptors.iter().any(|d| {
                    p.is_port(&d.transport_id)
                        && (d.all_tg_pt
                            || p.rtpi.is_none()
                            || p.rtpi == Some(d.relative_target_port))
                })
            })
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let cmd = prout(
            PROUT_REG_IGN,
            0,
            basic_params(0, key, all_tg_pt, false, &[]),
        );
        let mut n = 0;
        let mut err = None;
        for (i, r) in self
            .parallel(missing.iter().map(|&i| (i, cmd.clone())).collect())
            .await
        {
            match r {
                Ok(()) => {
                    n += 1;
                    self.log.push(format!(
                        "{}: registered returning path {}",
                        self.name, self.paths[i].info.url
                    ));
                }
                Err(e) if !is_path_error(&e) => {
                    err.get_or_insert(e);
                }
                Err(_) => {}
            }
        }
        match err {
            Some(e) => Err(Error::Scsi(e)),
            None => Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A scripted path: answers PR OUT per service action, counts calls.
    struct Fake {
        /// Outcome for any PR OUT / PR IN: None = GOOD.
        fail: Mutex<Option<fn() -> ScsiError>>,
        seen: Mutex<Vec<(u8, u8, Vec<u8>)>>,
    }

    impl Fake {
        fn new(fail: Option<fn() -> ScsiError>) -> Arc<Fake> {
            Arc::new(Fake {
                fail: Mutex::new(fail),
                seen: Mutex::new(Vec::new()),
            })
        }
        fn seen(&self) -> Vec<(u8, u8, Vec<u8>)> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl Lun for Fake {
        async fn execute(&self, cmd: Command) -> keyfence_initiator::Result<Vec<u8>> {
            self.seen
                .lock()
                .unwrap()
                .push((cmd.cdb[0], cmd.cdb[1] & 0x1f, cmd.data_out.to_vec()));
            let f = *self.fail.lock().unwrap();
            match f {
                Some(mk) => Err(mk()),
                None if cmd.cdb[0] == 0x5e => Ok(vec![0, 0, 0, 1, 0, 0, 0, 0]),
                None => Ok(Vec::new()),
            }
        }
    }

    fn path(n: u64, lun: &Arc<Fake>) -> MPath<Fake> {
        MPath {
            info: PathInfo {
                url: format!("p{n}"),
                initiator_name: "iqn.x:y".into(),
                isid: n,
                rtpi: Some(n as u16),
            },
            lun: Some(lun.clone()),
            down: None,
        }
    }

    fn conflict() -> ScsiError {
        ScsiError::ReservationConflict
    }
    fn gone() -> ScsiError {
        ScsiError::ConnectionLost("reset".into())
    }

    #[tokio::test]
    async fn prin_fails_over_on_path_errors_only() {
        let a = Fake::new(Some(gone));
        let b = Fake::new(None);
        let mut mp = Multipath::new("m".into(), vec![path(1, &a), path(2, &b)]);
        let d = mp.prin(0, 8192).await.unwrap();
        assert_eq!(d, vec![0, 0, 0, 1, 0, 0, 0, 0]);
        assert!(mp.paths[0].lun.is_none(), "failed path is marked down");
        assert_eq!(b.seen().len(), 1);
        // A SCSI error is the device's answer: no failover.
        let c = Fake::new(Some(conflict));
        let d2 = Fake::new(None);
        let mut mp = Multipath::new("m".into(), vec![path(1, &c), path(2, &d2)]);
        assert!(matches!(
            mp.prin(0, 8192).await.unwrap_err(),
            Error::Scsi(ScsiError::ReservationConflict)
        ));
        assert!(d2.seen().is_empty());
        // No path at all.
        let mut mp: Multipath<Fake> = Multipath::new("m".into(), vec![]);
        assert!(matches!(mp.prin(0, 8192).await.unwrap_err(), Error::NoPath));
    }

    #[tokio::test]
    async fn register_ignore_rollback_unregisters() {
        let a = Fake::new(None);
        let b = Fake::new(Some(conflict));
        let mut mp = Multipath::new("m".into(), vec![path(1, &a), path(2, &b)]);
        let e = mp
            .register(PROUT_REG_IGN, 0, 0x77, false, false, &[])
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Scsi(ScsiError::ReservationConflict)));
        let seen = a.seen();
        assert_eq!(seen.len(), 2, "registration then rollback on the good path");
        let (_, sa, p) = &seen[1];
        assert_eq!(*sa, PROUT_REG_IGN);
        assert_eq!(
            &p[8..16],
            &0u64.to_be_bytes(),
            "rolled back to unregistered"
        );
        // REGISTER rolls back to the key it replaced.
        let a = Fake::new(None);
        let b = Fake::new(Some(conflict));
        let mut mp = Multipath::new("m".into(), vec![path(1, &a), path(2, &b)]);
        mp.register(PROUT_REG, 0x11, 0x22, false, false, &[])
            .await
            .unwrap_err();
        let (_, _, p) = &a.seen()[1];
        assert_eq!(&p[8..16], &0x11u64.to_be_bytes());
        // Unregistering (SARK 0) is never rolled back.
        let a = Fake::new(None);
        let b = Fake::new(Some(conflict));
        let mut mp = Multipath::new("m".into(), vec![path(1, &a), path(2, &b)]);
        mp.register(PROUT_REG, 0x11, 0, false, false, &[])
            .await
            .unwrap_err();
        assert_eq!(a.seen().len(), 1);
    }

    #[tokio::test]
    async fn all_tg_pt_registers_once_per_initiator_port() {
        let a = Fake::new(None);
        let b = Fake::new(None);
        let mut p2 = path(2, &b);
        p2.info.isid = 1; // same initiator port as path 1, other target port
        let mut mp = Multipath::new("m".into(), vec![path(1, &a), p2]);
        mp.register(PROUT_REG, 0, 0x5, true, false, &[])
            .await
            .unwrap();
        assert_eq!(a.seen().len() + b.seen().len(), 1);
        assert_eq!(a.seen()[0].2[20], 0x04, "ALL_TG_PT set");
        // Without ALL_TG_PT each I_T nexus registers.
        let a = Fake::new(None);
        let b = Fake::new(None);
        let mut p2 = path(2, &b);
        p2.info.isid = 1;
        let mut mp = Multipath::new("m".into(), vec![path(1, &a), p2]);
        mp.register(PROUT_REG, 0, 0x5, false, false, &[])
            .await
            .unwrap();
        assert_eq!((a.seen().len(), b.seen().len()), (1, 1));
    }

    #[tokio::test]
    async fn one_path_commands_skip_dead_paths() {
        let a = Fake::new(Some(gone));
        let b = Fake::new(None);
        let mut mp = Multipath::new("m".into(), vec![path(1, &a), path(2, &b)]);
        let cmd = prout_cmd(1, 5, basic_params(5, 0, false, false, &[]));
        let (i, _) = mp.one_path(&cmd).await.unwrap();
        assert_eq!(i, 1);
        assert_eq!(b.seen()[0].1, 1);
    }

    #[test]
    fn parameter_list_with_transport_ids() {
        let t = TransportId::Iscsi {
            name: "iqn.a".into(),
            isid: Some(1),
        };
        let p = basic_params(1, 2, true, true, std::slice::from_ref(&t));
        assert_eq!(p[20], 0x0d);
        let len = u32::from_be_bytes([p[24], p[25], p[26], p[27]]) as usize;
        assert_eq!(p.len(), 28 + len);
        assert_eq!(TransportId::parse(&p[28..]).unwrap().0, t);
    }
}
