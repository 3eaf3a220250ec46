//! Reservation gate of a logical unit: SPC-4/SPC-5 persistent
//! reservations and SPC-2 RESERVE/RELEASE, driving the sans-IO engine of
//! the `pr` crate.
//!
//! * The fast path, [`Reservations::check`], reads an immutable snapshot
//!   of the state through an `ArcSwap`: no lock shared by sessions.
//! * Commands that change state (PR OUT, RESERVE, RELEASE, the reset
//!   hooks) are serialised by one mutex, computed by the engine on a copy,
//!   made durable first when APTPL requires it, and only then published.
//!   If the store fails the command fails and nothing changes.
//! * PREEMPT AND ABORT then waits, outside that mutex, for the commands of
//!   the preempted nexuses that passed the check before the new state was
//!   published; commands they send afterwards see the new state and are
//!   not waited for. The transport runs PR OUT off its I/O threads
//!   ([`crate::LogicalUnit::is_blocking`]).
//! * Every PR OUT is logged as one structured `tracing` line.

mod file_store;
mod shared;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use keyfence_pr::{
    Access, AccessView, Applied, Effects, Features, Persist, PrState, PrStore, Refusal, StoreError,
};
use keyfence_scsi::pr_data::{PrInCdb, PrOutAction, PrOutCdb, PrType};
use keyfence_scsi::sense::asc;
use keyfence_scsi::{Nexus, Sense, SenseKey};

pub use file_store::{read_state_file, state_path, FileStore, StateFile, FORMAT};
pub use shared::{SharedChange, SharedPrState};

use super::{CommandOutcome, LuEffect, ReservationContext, UaScope};

/// How long PREEMPT AND ABORT waits for the preempted nexuses' commands
/// that are already past the reservation check.
const ABORT_DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// Reservation state of one logical unit.
#[derive(Debug)]
pub struct Reservations {
    ctx: ReservationContext,
    /// The LU's target ports now: `ctx.target_ports` until a reload
    /// changes them ([`Reservations::set_target_ports`]).
    ports: ArcSwap<Vec<keyfence_scsi::TargetPort>>,
    view: ArcSwap<AccessView>,
    writer: Mutex<Writer>,
    /// Held by a PR OUT from before it computes until its PREEMPT AND
    /// ABORT drain is over: drains never overlap, and the writer lock is
    /// not held while one waits (LU resets and nexus loss take it).
    drain: Mutex<()>,
    store: Option<Arc<dyn PrStore>>,
    features: Features,
    /// Cluster mode: the state is committed there; see [`SharedPrState`].
    shared: Option<Arc<dyn SharedPrState>>,
    /// Cluster mode: a committed state has been installed and is being
    /// followed (false until the first install, and after a resync is
    /// requested): commands are refused until then.
    synced: AtomicBool,
}

#[derive(Debug)]
struct Writer {
    /// Version of the persisted copy (0: nothing persisted).
    version: keyfence_pr::Version,
}

impl Reservations {
    /// Build the gate; with `ctx.state_path` the APTPL state is kept in
    /// that file (see [`state_path`]) and restored now. Unreadable state
    /// puts the LU in the recoverable lost-reservation condition (SPC-5
    /// 5.13.5.3.2) until REPLACE LOST RESERVATION.
    pub fn new(ctx: ReservationContext) -> Self {
        let store: Option<Arc<dyn PrStore>> = ctx.state_path.clone().map(|p: PathBuf| {
            let target = ctx
                .target_ports
                .first()
                .map(|t| t.name.to_string())
                .unwrap_or_default();
            Arc::new(FileStore::new(p, &target, ctx.lun)) as Arc<dyn PrStore>
        });
        Self::with_store(ctx, store)
    }

    /// The target ports the LU is reachable through now (ALL_TG_PT,
    /// SPEC_I_PT, READ FULL STATUS).
    pub fn target_ports(&self) -> Arc<Vec<keyfence_scsi::TargetPort>> {
        self.ports.load_full()
    }

    /// Replace the target ports (a reload added or removed portal
    /// groups). Registrations made through a port that is gone stay, as
    /// the I_T nexus they name may come back.
    pub fn set_target_ports(&self, ports: Vec<keyfence_scsi::TargetPort>) {
        self.ports.store(Arc::new(ports));
    }

    /// Build the gate over any store (`None`: no persistence, PTPL_C=0).
    pub fn with_store(ctx: ReservationContext, store: Option<Arc<dyn PrStore>>) -> Self {
        let (state, version) = match &store {
            None => (PrState::default(), 0),
            Some(s) => match s.load() {
                Ok(None) => (PrState::default(), 0),
                Ok(Some((v, st))) => {
                    tracing::info!(
                        lun = ctx.lun,
                        registrations = st.registrations.len(),
                        reserved = st.reservation.is_some(),
                        generation = st.generation,
                        "restored persistent reservations (APTPL)"
                    );
                    (st.after_power_loss(), v)
                }
                Err(e) => {
                    tracing::error!(
                        lun = ctx.lun,
                        error = %e,
                        "persistent reservation information lost; commands fail with \
                         DATA PROTECT until REPLACE LOST RESERVATION"
                    );
                    (
                        PrState {
                            lost: true,
                            ..PrState::default()
                        },
                        0,
                    )
                }
            },
        };
        Reservations {
            features: Features {
                ptpl_c: store.is_some(),
            },
            ports: ArcSwap::from_pointee(ctx.target_ports.clone()),
            ctx,
            view: ArcSwap::from_pointee(AccessView::new(Arc::new(state))),
            writer: Mutex::new(Writer { version }),
            drain: Mutex::new(()),
            store,
            shared: None,
            synced: AtomicBool::new(true),
        }
    }

    /// Build the gate of a clustered LU: its state lives in `shared`.
    /// Until [`Reservations::install`] installs the committed state,
    /// every command but INQUIRY, REPORT LUNS and REQUEST SENSE gets
    /// NOT READY, ASYMMETRIC ACCESS STATE TRANSITION. PTPL_C is 1 (the
    /// shared store is durable).
    pub fn with_shared(ctx: ReservationContext, shared: Arc<dyn SharedPrState>) -> Self {
        Reservations {
            features: Features { ptpl_c: true },
            ports: ArcSwap::from_pointee(ctx.target_ports.clone()),
            ctx,
            view: ArcSwap::from_pointee(AccessView::new(Arc::new(PrState::default()))),
            writer: Mutex::new(Writer { version: 0 }),
            drain: Mutex::new(()),
            store: None,
            shared: Some(shared),
            synced: AtomicBool::new(false),
        }
    }

    /// Is this the gate of a clustered LU?
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Is COMPARE AND WRITE offered? Always on a single-node LU; on a
    /// clustered one only with a cluster-wide lock for it.
    pub fn offers_compare_and_write(&self) -> bool {
        self.shared
            .as_ref()
            .is_none_or(|s| s.offers_compare_and_write())
    }

    /// Cluster mode: hold the LU's cluster-wide COMPARE AND WRITE lock,
    /// with `blocks` blocks from `lba` held on every other live gateway,
    /// until the returned guard is dropped (`None` on a single-node LU).
    /// Blocks; not on an I/O worker.
    pub(crate) fn compare_and_write_lock(
        &self,
        lba: u64,
        blocks: u64,
    ) -> Result<Option<SharedCawGuard<'_>>, Sense> {
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        shared.lock_compare_and_write(lba, blocks)?;
        Ok(Some(SharedCawGuard(shared.as_ref())))
    }

    /// Cluster mode: install the committed state (the follower of the
    /// shared state calls this for every change, in order) and serve
    /// from it.
    pub fn install(&self, state: PrState) {
        self.publish(Arc::new(state));
        self.synced.store(true, Ordering::Release);
    }

    /// Cluster mode: stop serving until the next [`Reservations::install`]
    /// (the gateway lost its membership and must resynchronise).
    pub fn unsync(&self) {
        self.synced.store(false, Ordering::Release);
    }

    /// Cluster mode: may commands run here now? (Always true otherwise.)
    pub fn may_serve(&self) -> bool {
        match &self.shared {
            None => true,
            Some(s) => self.synced.load(Ordering::Acquire) && s.may_serve(),
        }
    }

    /// The current state (a snapshot).
    pub fn snapshot(&self) -> Arc<PrState> {
        self.view.load().state().clone()
    }

    fn publish(&self, state: Arc<PrState>) {
        self.view.store(Arc::new(AccessView::new(state)));
    }

    /// The reservation decision for `cdb` from `nexus`: `None` to go on,
    /// or the outcome to end the command with (RESERVATION CONFLICT, or
    /// CHECK CONDITION while PR information is lost).
    pub fn gate(&self, nexus: &Nexus, cdb: &[u8]) -> Option<CommandOutcome> {
        // A clustered LU on a gateway that may not serve (lease in doubt,
        // not yet synchronised): ALUA transitioning, so the initiator
        // retries or uses another path. INQUIRY, REPORT LUNS and REQUEST
        // SENSE still work.
        if self.shared.is_some()
            && !matches!(cdb.first(), Some(0x12 | 0xa0 | 0x03))
            && !self.may_serve()
        {
            return Some(CommandOutcome::check_condition(Sense::new(
                SenseKey::NotReady,
                asc::ASYMMETRIC_ACCESS_STATE_TRANSITION,
            )));
        }
        match self.view.load().check(nexus, cdb) {
            Access::Allowed => None,
            Access::Conflict => Some(CommandOutcome::reservation_conflict()),
            Access::Check(s) => Some(CommandOutcome::check_condition(s)),
        }
    }

    /// May `nexus` run `cdb` given the reservations held? false: the LU
    /// answers RESERVATION CONFLICT. (See [`Reservations::gate`] for the
    /// lost-reservation condition, which is a CHECK CONDITION.)
    pub fn check(&self, nexus: &Nexus, cdb: &[u8]) -> bool {
        matches!(self.view.load().check(nexus, cdb), Access::Allowed)
    }

    /// Run PERSISTENT RESERVE IN/OUT, RESERVE(6/10) or RELEASE(6/10).
    pub fn execute(&self, nexus: &Nexus, cdb: &[u8], data_out: &[u8]) -> CommandOutcome {
        match cdb.first() {
            Some(0x5e) => self.pr_in(cdb),
            Some(0x5f) => self.pr_out(nexus, cdb, data_out),
            Some(0x16 | 0x17 | 0x56 | 0x57) => self.spc2(nexus, cdb),
            _ => CommandOutcome::check_condition(Sense::illegal_request(
                asc::INVALID_COMMAND_OPERATION_CODE,
            )),
        }
    }

    fn pr_in(&self, cdb: &[u8]) -> CommandOutcome {
        if cdb.len() < 10 {
            return CommandOutcome::check_condition(Sense::invalid_cdb_field(0, None));
        }
        let state = self.snapshot();
        match keyfence_pr::pr_in(&state, cdb, self.features) {
            Ok(mut data) => {
                let alloc = PrInCdb::parse(cdb).map_or(0, |c| usize::from(c.allocation_length));
                data.truncate(alloc);
                CommandOutcome::data(Bytes::from(data))
            }
            Err(r) => reject_outcome(r),
        }
    }

    fn pr_out(&self, nexus: &Nexus, cdb: &[u8], data: &[u8]) -> CommandOutcome {
        if cdb.len() < 10 {
            return CommandOutcome::check_condition(Sense::invalid_cdb_field(0, None));
        }
        // Initiator ports known to the device server: every nexus the LU
        // has seen, plus this one.
        let mut known: Vec<keyfence_scsi::InitiatorPort> = self
            .ctx
            .unit_attentions
            .known_nexuses()
            .into_iter()
            .map(|n| n.initiator)
            .chain(std::iter::once(nexus.initiator.clone()))
            .collect();
        known.sort();
        known.dedup();
        if let Some(shared) = &self.shared {
            let (n, c, d) = (nexus.clone(), cdb.to_vec(), data.to_vec());
            let ports = self.target_ports().to_vec();
            let features = self.features;
            // PREEMPT AND ABORT may name the issuer's own I_T nexus (its
            // key among the preempted ones, or key zero under an
            // all-registrants reservation). SPC-4 5.12.11.2.6: that nexus's
            // other tasks are aborted, the PERSISTENT RESERVE OUT itself is
            // not. The followers abort every task of the nexuses in the
            // committed change, so the issuer's nexus is left out of it and
            // handled here: its commands past the check are drained, then
            // the transport aborts its other tasks (sparing this one).
            let own_abort = Arc::new(AtomicBool::new(false));
            let own = own_abort.clone();
            let change: SharedChange = Box::new(move |st: &PrState| {
                let ctx = keyfence_pr::Context {
                    target_ports: &ports,
                    known_initiators: &known,
                    features,
                };
                let mut a = keyfence_pr::pr_out(st, &n, &ctx, &c, &d)?;
                let before = a.effects.abort_tasks_of.len();
                a.effects.abort_tasks_of.retain(|v| v != &n);
                // The closure may run again after a conflict: the last run
                // is the one committed.
                own.store(a.effects.abort_tasks_of.len() != before, Ordering::SeqCst);
                Ok(a)
            });
            let (mut outcome, after) = self.commit_shared(shared.as_ref(), change);
            if outcome.status == keyfence_scsi::ScsiStatus::Good && own_abort.load(Ordering::SeqCst)
            {
                if !self.drain_nexuses(std::slice::from_ref(nexus), ABORT_DRAIN_LIMIT) {
                    tracing::error!(
                        lun = self.ctx.lun,
                        "the issuer's own commands did not finish in {ABORT_DRAIN_LIMIT:?}"
                    );
                    outcome = CommandOutcome::check_condition(Sense::new(
                        SenseKey::HardwareError,
                        asc::INTERNAL_TARGET_FAILURE,
                    ));
                } else {
                    outcome.effects.push(LuEffect::AbortTasks {
                        nexus: nexus.clone(),
                    });
                }
            }
            log_pr_out(
                shared.gateway(),
                self.ctx.lun,
                nexus,
                cdb,
                data,
                &outcome,
                after.as_ref(),
            );
            return outcome;
        }
        let drain_turn = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.snapshot();
        let ports = self.target_ports();
        let ctx = keyfence_pr::Context {
            target_ports: &ports,
            known_initiators: &known,
            features: self.features,
        };
        let result = keyfence_pr::pr_out(&before, nexus, &ctx, cdb, data);
        let (mut outcome, after) = match result {
            Ok(applied) => match self.commit(&mut w, applied) {
                Ok((o, st)) => (o, Some(st)),
                Err(o) => (o, None),
            },
            Err(r) => (reject_outcome(r), None),
        };
        drop(w);
        // PREEMPT AND ABORT: the preempted nexuses' commands that passed
        // the reservation check under the old state finish before this
        // command completes; the ones after see the new state and are not
        // waited for. Without this, a fenced node's write could land after
        // the fencer's GOOD.
        let victims: Vec<Nexus> = outcome
            .effects
            .iter()
            .map(|LuEffect::AbortTasks { nexus }| nexus.clone())
            .collect();
        if !victims.is_empty() {
            let d = self.ctx.unit_attentions.begin_drain();
            if !self
                .ctx
                .unit_attentions
                .wait_drained(d, &victims, ABORT_DRAIN_LIMIT)
            {
                // The preemption is in force (and persisted), but we cannot
                // vouch that nothing of the victims lands after we answer:
                // say so rather than GOOD, so the fencer does not trust it.
                tracing::error!(
                    lun = self.ctx.lun,
                    "preempted nexuses' commands did not finish in {ABORT_DRAIN_LIMIT:?}"
                );
                outcome = CommandOutcome::check_condition(Sense::new(
                    SenseKey::HardwareError,
                    asc::INTERNAL_TARGET_FAILURE,
                ));
            }
        }
        drop(drain_turn);
        log_pr_out(
            None,
            self.ctx.lun,
            nexus,
            cdb,
            data,
            &outcome,
            after.as_deref(),
        );
        outcome
    }

    /// Wait until the commands of `nexuses` that passed the reservation
    /// check before this call have finished (false: `limit` passed
    /// first). Drains are serialised with PREEMPT AND ABORT's own, so
    /// their epochs never overlap; cluster mode's followers drain with
    /// this after installing a change.
    pub fn drain_nexuses(&self, nexuses: &[Nexus], limit: Duration) -> bool {
        let _turn = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        let ua = &self.ctx.unit_attentions;
        let d = ua.begin_drain();
        ua.wait_drained(d, nexuses, limit)
    }

    /// Cluster mode: commit through the shared state. The unit
    /// attentions and task aborts of the change reach every gateway
    /// (this one included) through its follower, before this returns.
    fn commit_shared(
        &self,
        shared: &dyn SharedPrState,
        change: SharedChange,
    ) -> (CommandOutcome, Option<PrState>) {
        match shared.commit(change) {
            Ok(st) => (CommandOutcome::good(), Some(st)),
            Err(r) => (reject_outcome(r), None),
        }
    }

    fn spc2(&self, nexus: &Nexus, cdb: &[u8]) -> CommandOutcome {
        if let Some(shared) = &self.shared {
            let (n, c) = (nexus.clone(), cdb.to_vec());
            let change: SharedChange = Box::new(move |st: &PrState| keyfence_pr::spc2(st, &n, &c));
            return self.commit_shared(shared.as_ref(), change).0;
        }
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.snapshot();
        match keyfence_pr::spc2(&before, nexus, cdb) {
            Ok(applied) => match self.commit(&mut w, applied) {
                Ok((o, _)) => o,
                Err(o) => o,
            },
            Err(r) => reject_outcome(r),
        }
    }

    /// Make `applied` durable (if required), publish it, carry out its
    /// effects. On store failure nothing is published.
    fn commit(
        &self,
        w: &mut Writer,
        applied: Applied,
    ) -> Result<(CommandOutcome, Arc<PrState>), CommandOutcome> {
        let Applied { state, effects } = applied;
        let Effects {
            unit_attentions,
            abort_tasks_of,
            persist,
        } = effects;
        if let (Some(p), Some(store)) = (persist, &self.store) {
            let target = match &p {
                Persist::Save(s) => Some(s),
                Persist::Erase => None,
            };
            // A version mismatch means someone else wrote the store since
            // we last did (another process, an operator restoring a
            // backup): our state may be stale, so the command fails and
            // nothing is overwritten. Compare-and-swap must really compare.
            match store.compare_and_swap(w.version, target) {
                Ok(v) => w.version = v,
                Err(e @ StoreError::VersionMismatch { .. }) => {
                    tracing::error!(
                        lun = self.ctx.lun,
                        error = %e,
                        "PR store written by someone else; command failed, nothing overwritten \
                         (restart the target to load the stored state)"
                    );
                    return Err(CommandOutcome::check_condition(store_error_sense(&e)));
                }
                Err(e) => {
                    tracing::error!(lun = self.ctx.lun, error = %e, "cannot persist PR state; command failed, state unchanged");
                    return Err(CommandOutcome::check_condition(store_error_sense(&e)));
                }
            }
        }
        let state = Arc::new(state);
        self.publish(state.clone());
        for (n, code) in &unit_attentions {
            self.ctx.unit_attentions.queue(UaScope::Nexus(n), *code);
        }
        // PREEMPT AND ABORT's wait for the preempted nexuses happens in
        // pr_out, after the writer lock is released.
        let mut outcome = CommandOutcome::good();
        outcome.effects = abort_tasks_of
            .into_iter()
            .map(|nexus| LuEffect::AbortTasks { nexus })
            .collect();
        Ok((outcome, state))
    }

    /// The I_T nexus is gone (session closed or dropped): its SPC-2
    /// reservation, if any, ends. Persistent reservations stay.
    ///
    /// Returns once the change is in force: in cluster mode committed and
    /// applied by every live gateway, so a command through any gateway
    /// after this returns sees it. Blocks (an etcd round trip, or the
    /// writer lock a PR OUT may hold across its fsync): not on an I/O
    /// worker. `superseded` is asked right before the change is computed
    /// (under the writer lock, or before each commit attempt): when it
    /// says a new session of the same nexus has started (a reinstatement
    /// that stopped waiting for this one), the reservation is that
    /// session's and is left alone.
    pub fn on_nexus_loss(&self, nexus: &Nexus, superseded: &Superseded) {
        if self.snapshot().spc2.as_ref() != Some(nexus) {
            return;
        }
        if let Some(shared) = &self.shared {
            let (n, superseded) = (nexus.clone(), superseded.clone());
            let change: SharedChange = Box::new(move |st: &PrState| {
                if superseded() {
                    return Ok(unchanged_or(st, None));
                }
                Ok(unchanged_or(st, keyfence_pr::on_nexus_loss(st, &n)))
            });
            if let Err(r) = shared.commit(change) {
                tracing::error!(
                    lun = self.ctx.lun,
                    nexus = %nexus,
                    refusal = ?r,
                    "the SPC-2 reservation of a lost I_T nexus could not be released"
                );
            }
            return;
        }
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if superseded() {
            return;
        }
        if let Some(st) = keyfence_pr::on_nexus_loss(&self.snapshot(), nexus) {
            self.publish(Arc::new(st));
        }
    }

    /// LOGICAL UNIT RESET: SPC-2 reservation released; in cluster mode
    /// the other gateways establish `asc` for their I_T nexuses too.
    pub fn on_lu_reset(&self, asc: keyfence_scsi::sense::Asc) {
        if let Some(shared) = &self.shared {
            shared.unit_attention_elsewhere(asc);
        }
        self.reset();
    }

    /// TARGET WARM/COLD RESET: SPC-2 reservation released.
    pub fn on_target_reset(&self) {
        self.reset();
    }

    fn reset(&self) {
        if let Some(shared) = &self.shared {
            if self.snapshot().spc2.is_some() {
                shared.commit_detached(Box::new(|st: &PrState| {
                    Ok(unchanged_or(st, keyfence_pr::on_reset(st)))
                }));
            }
            return;
        }
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = keyfence_pr::on_reset(&self.snapshot()) {
            self.publish(Arc::new(st));
        }
    }
}

/// The cluster-wide COMPARE AND WRITE lock, released on drop.
pub(crate) struct SharedCawGuard<'a>(&'a dyn SharedPrState);

impl Drop for SharedCawGuard<'_> {
    fn drop(&mut self) {
        self.0.unlock_compare_and_write();
    }
}

/// Has a new session of a lost I_T nexus started meanwhile? See
/// [`Reservations::on_nexus_loss`].
pub type Superseded = Arc<dyn Fn() -> bool + Send + Sync>;

/// A transition without effects: `next`, or `st` unchanged when `None`.
fn unchanged_or(st: &PrState, next: Option<PrState>) -> Applied {
    Applied {
        state: next.unwrap_or_else(|| st.clone()),
        effects: Effects::default(),
    }
}

fn reject_outcome(r: Refusal) -> CommandOutcome {
    match r {
        Refusal::Conflict => CommandOutcome::reservation_conflict(),
        Refusal::Check(s) => CommandOutcome::check_condition(s),
    }
}

/// A store that cannot take the state: out of space is INSUFFICIENT
/// REGISTRATION RESOURCES (SPC-5 5.13.7); anything else is a failure of
/// the device server's nonvolatile memory, HARDWARE ERROR / INTERNAL
/// TARGET FAILURE.
fn store_error_sense(e: &StoreError) -> Sense {
    match e {
        StoreError::NoSpace(_) => Sense::illegal_request(asc::INSUFFICIENT_REGISTRATION_RESOURCES),
        _ => Sense::new(SenseKey::HardwareError, asc::INTERNAL_TARGET_FAILURE),
    }
}

fn result_text(o: &CommandOutcome) -> String {
    match (o.status, &o.sense) {
        (keyfence_scsi::ScsiStatus::Good, _) => "GOOD".into(),
        (keyfence_scsi::ScsiStatus::ReservationConflict, _) => "RESERVATION CONFLICT".into(),
        (_, Some(s)) => format!("CHECK CONDITION {:?} {:02x}/{:02x}", s.key, s.asc, s.ascq),
        (st, None) => format!("{st:?}"),
    }
}

/// One line per PR OUT: who, what, keys, type, result; `gateway` names the
/// cluster gateway that ran it (cluster mode).
fn log_pr_out(
    gateway: Option<&str>,
    lun: u64,
    nexus: &Nexus,
    cdb: &[u8],
    data: &[u8],
    outcome: &CommandOutcome,
    after: Option<&PrState>,
) {
    let c = PrOutCdb::parse(cdb);
    let action = c
        .and_then(|c| PrOutAction::from_u8(c.service_action))
        .map_or("(invalid)", PrOutAction::description);
    let pr_type = c
        .and_then(|c| PrType::from_u8(c.pr_type))
        .map_or("-", PrType::short_name);
    let key = |at: usize| {
        data.get(at..at + 8)
            .map(|b| {
                format!(
                    "0x{:016x}",
                    u64::from_be_bytes(b.try_into().unwrap_or([0; 8]))
                )
            })
            .unwrap_or_else(|| "-".into())
    };
    let result = result_text(outcome);
    let generation = after.map(|s| s.generation);
    let aborts = outcome.effects.len();
    if outcome.status == keyfence_scsi::ScsiStatus::Good {
        tracing::info!(
            gateway,
            lun,
            nexus = %nexus,
            action,
            key = %key(0),
            sa_key = %key(8),
            pr_type,
            result = %result,
            generation,
            aborts,
            "PERSISTENT RESERVE OUT"
        );
    } else {
        tracing::warn!(
            gateway,
            lun,
            nexus = %nexus,
            action,
            key = %key(0),
            sa_key = %key(8),
            pr_type,
            result = %result,
            "PERSISTENT RESERVE OUT"
        );
    }
}

#[cfg(test)]
mod tests;
