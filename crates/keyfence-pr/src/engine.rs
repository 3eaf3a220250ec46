//! The PR engine proper: PERSISTENT RESERVE OUT service actions, PERSISTENT
//! RESERVE IN answers, SPC-2 RESERVE/RELEASE with the SPC-5 5.13.3
//! exceptions, the access decision, and what nexus loss and resets do.
//!
//! Every function takes the current [`PrState`] by reference and returns
//! the successor state (never mutating the input) with the [`Effects`] the
//! caller must carry out. Section numbers refer to SPC-5 (the text matches
//! SPC-4 5.12 plus REPLACE LOST RESERVATION).

use keyfence_scsi::pr_data::{
    Capabilities, FullStatus, FullStatusDescriptor, PrDataError, PrInAction, PrInCdb, PrOutAction,
    PrOutCdb, PrOutParams, PrType, ReadKeys, ReadReservation, RegisterMoveParams,
    ReservationDescriptor, BASIC_PARAM_LEN, LU_SCOPE,
};
use keyfence_scsi::sense::{asc, Asc};
use keyfence_scsi::transport_id::TransportId;
use keyfence_scsi::{InitiatorPort, Nexus, Sense, SenseKey, TargetPort};

use crate::access::{self, Entry};
use crate::state::{PrState, Registration, Reservation};

/// Most registrations one LU holds; beyond this REGISTER fails with
/// INSUFFICIENT REGISTRATION RESOURCES (SPC-5 5.13.7).
pub const MAX_REGISTRATIONS: usize = 2048;

/// Why the engine refused a command: the status the LU returns instead of
/// GOOD. (Not to be confused with the iSCSI Reject PDU.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION with this sense data.
    Check(Sense),
}

impl From<PrDataError> for Refusal {
    fn from(e: PrDataError) -> Self {
        Refusal::Check(e.to_sense())
    }
}

fn check(s: Sense) -> Refusal {
    Refusal::Check(s)
}

/// Sense for the recoverable lost persistent reservation condition.
pub const PR_INFORMATION_LOST: Sense = Sense::new(SenseKey::DataProtect, Asc(0x44, 0x01));

/// The access decision for one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    Conflict,
    /// Terminate with CHECK CONDITION (lost PR information).
    Check(Sense),
}

/// What the persisted copy of the state must become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persist {
    /// APTPL is set: write this state to stable storage before GOOD.
    Save(PrState),
    /// APTPL was cleared: remove the persisted state so a restart does
    /// not resurrect it.
    Erase,
}

/// Side effects of a successful command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Effects {
    /// Unit attentions to establish, one per I_T nexus (SPC-5 5.13.11).
    pub unit_attentions: Vec<(Nexus, Asc)>,
    /// I_T nexuses whose tasks PREEMPT AND ABORT aborts (the PR OUT
    /// command itself excepted, which may be on one of them).
    pub abort_tasks_of: Vec<Nexus>,
    /// `Some` when the persisted state must change before GOOD.
    pub persist: Option<Persist>,
}

/// A successful PR OUT or RESERVE/RELEASE: the successor state and the
/// effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub state: PrState,
    pub effects: Effects,
}

/// What the device server can do, for REPORT CAPABILITIES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Persist through power loss available (a durable store exists).
    pub ptpl_c: bool,
}

impl Features {
    pub fn capabilities(&self, state: &PrState) -> Capabilities {
        Capabilities {
            rlr_c: true,
            crh: true,
            sip_c: true,
            atp_c: true,
            ptpl_c: self.ptpl_c,
            tmv: true,
            // See crate::access: the table implements exactly 011b.
            allow_commands: 0b011,
            ptpl_a: self.ptpl_c && state.aptpl,
            type_mask: Capabilities::type_mask_for(&PrType::ALL),
        }
    }
}

/// What a PR OUT needs to know about the logical unit besides its state.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The LU's target ports (ALL_TG_PT, SPEC_I_PT, REGISTER AND MOVE).
    pub target_ports: &'a [TargetPort],
    /// The initiator ports known to the device server (a SPEC_I_PT iSCSI
    /// TransportID of format 00b registers every one with that name,
    /// SPC-5 7.6.4.6).
    pub known_initiators: &'a [InitiatorPort],
    pub features: Features,
}

// ------------------------------------------------------------ access ---

/// May `nexus` run `cdb` given `state`? One lookup in the table of
/// [`crate::access`]; the holder is always allowed. Scans the
/// registrations; [`AccessView`] answers the same in O(1).
pub fn check_access(state: &PrState, nexus: &Nexus, cdb: &[u8]) -> Access {
    decide(state, nexus, cdb, |n| state.is_registered(n))
}

fn decide(
    state: &PrState,
    nexus: &Nexus,
    cdb: &[u8],
    registered: impl Fn(&Nexus) -> bool,
) -> Access {
    if state.lost && !access::allowed_while_pr_lost(cdb) {
        return Access::Check(PR_INFORMATION_LOST);
    }
    if let Some(h) = &state.spc2 {
        if h != nexus && !access::allowed_under_spc2(cdb) {
            return Access::Conflict;
        }
    }
    let Some(res) = &state.reservation else {
        return Access::Allowed;
    };
    let is_registered = registered(nexus);
    let holder = match &res.holder {
        None => is_registered,
        Some(h) => h == nexus,
    };
    if holder {
        return Access::Allowed;
    }
    match access::entry(cdb, res.pr_type, is_registered) {
        Entry::A => Access::Allowed,
        Entry::C => Access::Conflict,
    }
}

/// An immutable state plus an index of its registered I_T nexuses, built
/// once per state change so the per-command decision is O(1).
#[derive(Debug, Clone, Default)]
pub struct AccessView {
    state: std::sync::Arc<PrState>,
    registered: std::collections::HashSet<Nexus>,
}

impl AccessView {
    pub fn new(state: std::sync::Arc<PrState>) -> Self {
        let registered = state
            .registrations
            .iter()
            .map(|g| g.nexus.clone())
            .collect();
        AccessView { state, registered }
    }

    pub fn state(&self) -> &std::sync::Arc<PrState> {
        &self.state
    }

    /// Same answer as [`check_access`] on the state.
    pub fn check(&self, nexus: &Nexus, cdb: &[u8]) -> Access {
        decide(&self.state, nexus, cdb, |n| self.registered.contains(n))
    }
}

// ------------------------------------------------------------ PR IN ---

/// Answer a PERSISTENT RESERVE IN. Returns the full parameter data; the
/// caller truncates to the ALLOCATION LENGTH.
pub fn pr_in(state: &PrState, cdb: &[u8], features: Features) -> Result<Vec<u8>, Refusal> {
    let c = PrInCdb::parse(cdb).ok_or(check(Sense::invalid_cdb_field(0, None)))?;
    let action =
        PrInAction::from_u8(c.service_action).ok_or(check(Sense::invalid_cdb_field(1, Some(4))))?;
    Ok(match action {
        PrInAction::ReadKeys => ReadKeys {
            generation: state.generation,
            keys: state.registrations.iter().map(|r| r.key).collect(),
        }
        .encode(),
        PrInAction::ReadReservation => ReadReservation {
            generation: state.generation,
            reservation: state.reservation.as_ref().map(|r| ReservationDescriptor {
                key: match &r.holder {
                    None => 0,
                    Some(h) => state.registration(h).map_or(0, |g| g.key),
                },
                scope: LU_SCOPE,
                pr_type: r.pr_type.code(),
            }),
        }
        .encode(),
        PrInAction::ReportCapabilities => features.capabilities(state).encode(),
        PrInAction::ReadFullStatus => full_status(state).encode(),
    })
}

/// READ FULL STATUS data for `state`.
pub fn full_status(state: &PrState) -> FullStatus {
    FullStatus {
        generation: state.generation,
        descriptors: state
            .registrations
            .iter()
            .map(|g| {
                let holder = state.is_holder(&g.nexus);
                FullStatusDescriptor {
                    key: g.key,
                    all_tg_pt: g.all_tg_pt,
                    r_holder: holder,
                    scope: LU_SCOPE,
                    pr_type: match (&state.reservation, holder) {
                        (Some(r), true) => r.pr_type.code(),
                        _ => 0,
                    },
                    relative_target_port: g.nexus.target.relative_id,
                    transport_id: TransportId::for_port(&g.nexus.initiator),
                }
            })
            .collect(),
    }
}

// ----------------------------------------------------------- PR OUT ---

/// Parameters of a decoded PR OUT, either layout.
enum Params {
    Basic(PrOutParams),
    Move(RegisterMoveParams),
}

impl Params {
    fn reservation_key(&self) -> u64 {
        match self {
            Params::Basic(p) => p.reservation_key,
            Params::Move(p) => p.reservation_key,
        }
    }
}

/// A state being changed by one command, collecting effects.
struct Tx {
    st: PrState,
    fx: Effects,
}

impl Tx {
    fn ua(&mut self, nexus: &Nexus, code: Asc) {
        if !self
            .fx
            .unit_attentions
            .iter()
            .any(|(n, c)| n == nexus && *c == code)
        {
            self.fx.unit_attentions.push((nexus.clone(), code));
        }
    }

    /// UA for every registered I_T nexus except `except`.
    fn ua_registrants_except(&mut self, except: &Nexus, code: Asc) {
        let targets: Vec<Nexus> = self
            .st
            .registrations
            .iter()
            .filter(|g| &g.nexus != except)
            .map(|g| g.nexus.clone())
            .collect();
        for n in targets {
            self.ua(&n, code);
        }
    }

    fn bump(&mut self) {
        self.st.generation = self.st.generation.wrapping_add(1);
    }

    /// Set (or add) the registration of `nexus`.
    fn set_key(&mut self, nexus: &Nexus, key: u64, all_tg_pt: bool) {
        match self.st.registrations.iter_mut().find(|g| &g.nexus == nexus) {
            Some(g) => {
                g.key = key;
                g.all_tg_pt = all_tg_pt;
            }
            None => self.st.registrations.push(Registration {
                nexus: nexus.clone(),
                key,
                all_tg_pt,
            }),
        }
    }

    /// Remove the registrations of `nexuses` with what follows for the
    /// reservation (SPC-5 5.13.11.2.3 and table 71). `cmd` is the nexus
    /// the command came through (it gets no unit attention); nexuses
    /// removed together get none either.
    fn unregister(&mut self, nexuses: &[Nexus], cmd: &Nexus) {
        let before = self.st.registrations.len();
        self.st
            .registrations
            .retain(|g| !nexuses.contains(&g.nexus));
        if self.st.registrations.len() == before {
            return;
        }
        let Some(res) = self.st.reservation.clone() else {
            return;
        };
        match &res.holder {
            None => {
                if self.st.registrations.is_empty() {
                    self.st.reservation = None;
                }
            }
            Some(h) if nexuses.contains(h) => {
                self.st.reservation = None;
                if res.pr_type.registrants_only() {
                    self.ua_registrants_except(cmd, asc::RESERVATIONS_RELEASED);
                }
            }
            Some(_) => {}
        }
    }

    fn finish(self, before: &PrState) -> Applied {
        let Tx { st, mut fx } = self;
        if !st.durable_eq(before) {
            if st.aptpl {
                fx.persist = Some(Persist::Save(st.clone()));
            } else if before.aptpl {
                fx.persist = Some(Persist::Erase);
            }
        }
        Applied {
            state: st,
            effects: fx,
        }
    }
}

fn reservation_for(pr_type: PrType, holder: &Nexus) -> Reservation {
    Reservation {
        pr_type,
        holder: (!pr_type.all_registrants()).then(|| holder.clone()),
    }
}

fn resources(count: usize) -> Result<(), Refusal> {
    if count > MAX_REGISTRATIONS {
        return Err(check(Sense::illegal_request(
            asc::INSUFFICIENT_REGISTRATION_RESOURCES,
        )));
    }
    Ok(())
}

/// Execute a PERSISTENT RESERVE OUT received on `nexus`. `data` holds
/// the data-out bytes received (the parameter list is its first
/// PARAMETER LIST LENGTH bytes).
pub fn pr_out(
    state: &PrState,
    nexus: &Nexus,
    ctx: &Context<'_>,
    cdb: &[u8],
    data: &[u8],
) -> Result<Applied, Refusal> {
    let features = ctx.features;
    let c = PrOutCdb::parse(cdb).ok_or(check(Sense::invalid_cdb_field(0, None)))?;
    let action = PrOutAction::from_u8(c.service_action)
        .ok_or(check(Sense::invalid_cdb_field(1, Some(4))))?;
    if state.lost && action != PrOutAction::ReplaceLostReservation {
        return Err(check(PR_INFORMATION_LOST));
    }
    let plen = usize::try_from(c.param_len).unwrap_or(usize::MAX);
    let list = data.get(..plen).ok_or(check(Sense::illegal_request(
        asc::PARAMETER_LIST_LENGTH_ERROR,
    )))?;

    // SPEC_I_PT is valid only for REGISTER (SPC-5 6.16.3); check before
    // the length rules that depend on it.
    if action != PrOutAction::Register
        && action != PrOutAction::RegisterAndMove
        && list.len() >= BASIC_PARAM_LEN
        && list[20] & 0x08 != 0
    {
        return Err(check(Sense::invalid_param_field(20, Some(3))));
    }
    let params = match action {
        PrOutAction::RegisterAndMove => Params::Move(RegisterMoveParams::decode(list)?),
        _ => Params::Basic(PrOutParams::decode(list)?),
    };

    // APTPL=1 without persist-through-power-loss support (SPC-5 6.16.3);
    // the bit is ignored by the other service actions.
    if !features.ptpl_c {
        match (&params, action) {
            (Params::Move(p), _) if p.aptpl => {
                return Err(check(Sense::invalid_param_field(17, Some(0))));
            }
            (
                Params::Basic(p),
                PrOutAction::Register
                | PrOutAction::RegisterAndIgnoreExistingKey
                | PrOutAction::ReplaceLostReservation,
            ) if p.aptpl => return Err(check(Sense::invalid_param_field(20, Some(0)))),
            _ => {}
        }
    }

    // SCOPE and TYPE, where valid (SPC-5 table 216); checked after the
    // reservation key, which is verified "regardless of the SERVICE
    // ACTION and SCOPE field values" (SPC-5 6.16.3).
    // Only RESERVE, RELEASE, PREEMPT, PREEMPT AND ABORT and REPLACE LOST
    // RESERVATION use them, so only their arms below call this.
    let scope_type = || -> Result<PrType, Refusal> {
        if c.scope != LU_SCOPE {
            return Err(check(Sense::invalid_cdb_field(2, Some(7))));
        }
        PrType::from_u8(c.pr_type).ok_or(check(Sense::invalid_cdb_field(2, Some(3))))
    };

    if action == PrOutAction::ReplaceLostReservation {
        let Params::Basic(p) = &params else {
            unreachable!("basic layout decoded for RLR")
        };
        return replace_lost(state, nexus, p, scope_type()?);
    }

    let reg = state.registration(nexus).cloned();
    // Reservation key verification (SPC-5 6.16.3 and table 67).
    match action {
        PrOutAction::RegisterAndIgnoreExistingKey => {}
        PrOutAction::Register => {
            let expected = reg.as_ref().map_or(0, |g| g.key);
            if params.reservation_key() != expected {
                return Err(Refusal::Conflict);
            }
        }
        _ => match &reg {
            Some(g) if g.key == params.reservation_key() => {}
            _ => return Err(Refusal::Conflict),
        },
    }

    let mut tx = Tx {
        st: state.clone(),
        fx: Effects::default(),
    };
    match (&params, action) {
        (Params::Basic(p), PrOutAction::Register | PrOutAction::RegisterAndIgnoreExistingKey) => {
            register(&mut tx, nexus, ctx, p, &tid_offsets(list), reg.is_some())?
        }
        (Params::Basic(_), PrOutAction::Reserve) => reserve(&mut tx, nexus, scope_type()?)?,
        (Params::Basic(_), PrOutAction::Release) => release(&mut tx, nexus, scope_type()?)?,
        (Params::Basic(_), PrOutAction::Clear) => {
            tx.ua_registrants_except(nexus, asc::RESERVATIONS_PREEMPTED);
            tx.st.registrations.clear();
            tx.st.reservation = None;
            tx.bump();
        }
        (Params::Basic(p), PrOutAction::Preempt | PrOutAction::PreemptAndAbort) => preempt(
            &mut tx,
            nexus,
            p.service_action_key,
            scope_type()?,
            action == PrOutAction::PreemptAndAbort,
        )?,
        (Params::Move(p), PrOutAction::RegisterAndMove) => {
            register_and_move(&mut tx, nexus, ctx, p)?
        }
        _ => unreachable!("parameter layout follows the service action"),
    }
    Ok(tx.finish(state))
}

/// Byte offsets of the SPEC_I_PT TransportIDs in a parameter list that
/// decoded successfully (for field pointers).
fn tid_offsets(list: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = BASIC_PARAM_LEN + 4;
    while let Some(rest) = list.get(at..).filter(|r| !r.is_empty()) {
        match TransportId::parse(rest) {
            Ok((_, used)) => {
                out.push(at);
                at += used;
            }
            Err(_) => break,
        }
    }
    out
}

/// REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-5 5.13.7, tables
/// 67-69); the reservation key was verified by the caller. `offsets` are
/// where the TransportIDs start in the parameter list.
fn register(
    tx: &mut Tx,
    nexus: &Nexus,
    ctx: &Context<'_>,
    p: &PrOutParams,
    offsets: &[usize],
    registered: bool,
) -> Result<(), Refusal> {
    let ports = ctx.target_ports;
    if p.spec_i_pt && registered {
        return Err(check(Sense::invalid_param_field(20, Some(3))));
    }
    if !registered && p.service_action_key == 0 {
        // "Do nothing except return GOOD status."
        return Ok(());
    }
    // The I_T nexuses of this initiator port being (un)registered.
    let mut own: Vec<Nexus> = vec![nexus.clone()];
    if p.all_tg_pt {
        for tp in ports {
            let n = Nexus::new(nexus.initiator.clone(), tp.clone());
            if !own.contains(&n) {
                own.push(n);
            }
        }
    }
    if p.service_action_key == 0 {
        tx.unregister(&own, nexus);
    } else {
        // SPEC_I_PT: every TransportID, all or nothing.
        let mut others: Vec<Nexus> = Vec::new();
        if p.spec_i_pt {
            for (i, tid) in p.transport_ids.iter().enumerate() {
                let at = offsets.get(i).copied().unwrap_or(BASIC_PARAM_LEN + 4);
                let field = u16::try_from(at).unwrap_or(u16::MAX);
                // Format 01b names one initiator port; format 00b every
                // initiator port known with that iSCSI name (SPC-5
                // 7.6.4.6). Other protocols cannot reach an iSCSI target.
                let iports: Vec<InitiatorPort> = match tid {
                    TransportId::Iscsi { isid: Some(_), .. } => {
                        tid.initiator_port().into_iter().collect()
                    }
                    TransportId::Iscsi { isid: None, .. } => ctx
                        .known_initiators
                        .iter()
                        .filter(|i| tid.matches(i))
                        .cloned()
                        .collect(),
                    _ => return Err(check(Sense::invalid_param_field(field, None))),
                };
                let tports: Vec<TargetPort> = if p.all_tg_pt {
                    ports.to_vec()
                } else {
                    vec![nexus.target.clone()]
                };
                for port in &iports {
                    for tp in &tports {
                        let n = Nexus::new(port.clone(), tp.clone());
                        if own.contains(&n) || others.contains(&n) {
                            continue;
                        }
                        if tx.st.is_registered(&n) {
                            return Err(check(Sense::invalid_param_field(field, None)));
                        }
                        others.push(n);
                    }
                }
            }
        }
        let new_count = own
            .iter()
            .chain(others.iter())
            .filter(|n| !tx.st.is_registered(n))
            .count();
        resources(tx.st.registrations.len() + new_count)?;
        for n in own.iter().chain(others.iter()) {
            tx.set_key(n, p.service_action_key, p.all_tg_pt);
        }
    }
    tx.st.aptpl = p.aptpl;
    tx.bump();
    Ok(())
}

/// RESERVE (SPC-5 5.13.9).
fn reserve(tx: &mut Tx, nexus: &Nexus, pr_type: PrType) -> Result<(), Refusal> {
    match &tx.st.reservation {
        None => {
            tx.st.reservation = Some(reservation_for(pr_type, nexus));
            Ok(())
        }
        Some(r) if tx.st.is_holder(nexus) && r.pr_type == pr_type => Ok(()),
        Some(_) => Err(Refusal::Conflict),
    }
}

/// RELEASE (SPC-5 5.13.11.2.2).
fn release(tx: &mut Tx, nexus: &Nexus, pr_type: PrType) -> Result<(), Refusal> {
    let Some(r) = tx.st.reservation.clone() else {
        return Ok(());
    };
    if !tx.st.is_holder(nexus) {
        return Ok(());
    }
    if r.pr_type != pr_type {
        return Err(check(Sense::illegal_request(
            asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
        )));
    }
    tx.st.reservation = None;
    if r.pr_type.registrants_type() {
        tx.ua_registrants_except(nexus, asc::RESERVATIONS_RELEASED);
    }
    Ok(())
}

/// PREEMPT and PREEMPT AND ABORT (SPC-5 5.13.11.2.4 - 5.13.11.2.6,
/// table 72, figure 9).
fn preempt(
    tx: &mut Tx,
    nexus: &Nexus,
    sa_key: u64,
    pr_type: PrType,
    abort: bool,
) -> Result<(), Refusal> {
    let res = tx.st.reservation.clone();
    // PREEMPT AND ABORT aborts the commands of every I_T nexus registered
    // with the key, holder or not, or of every registered I_T nexus for
    // key zero under an all-registrants reservation (last paragraph of
    // SPC-5 5.13.11.2.6); the LU spares the PR OUT command itself.
    let ar_zero = sa_key == 0 && res.as_ref().is_some_and(|r| r.pr_type.all_registrants());
    let abort_set: Vec<Nexus> = if abort {
        tx.st
            .registrations
            .iter()
            .filter(|g| ar_zero || g.key == sa_key)
            .map(|g| g.nexus.clone())
            .collect()
    } else {
        Vec::new()
    };
    let holder_key = res
        .as_ref()
        .and_then(|r| r.holder.as_ref())
        .and_then(|h| tx.st.registration(h))
        .map(|g| g.key);
    let preempts_reservation = match &res {
        None => false,
        Some(r) if r.pr_type.all_registrants() => sa_key == 0,
        Some(_) => Some(sa_key) == holder_key,
    };
    if sa_key == 0 && !preempts_reservation {
        // No reservation, or a non-all-registrants one.
        return Err(check(Sense::invalid_param_field(8, None)));
    }

    if preempts_reservation {
        let old = res.expect("reservation present");
        // b) remove the registrations identified by the key (all but the
        // preempting nexus when an all-registrants key of zero).
        let removed: Vec<Nexus> = tx
            .st
            .registrations
            .iter()
            .filter(|g| &g.nexus != nexus && (sa_key == 0 || g.key == sa_key))
            .map(|g| g.nexus.clone())
            .collect();
        tx.st.registrations.retain(|g| !removed.contains(&g.nexus));
        // a), c) release and establish the new reservation.
        tx.st.reservation = Some(reservation_for(pr_type, nexus));
        // e) REGISTRATIONS PREEMPTED to every nexus that lost its
        // registration or reservation.
        for n in &removed {
            tx.ua(n, asc::REGISTRATIONS_PREEMPTED);
        }
        if let Some(h) = &old.holder {
            if h != nexus && !removed.contains(h) {
                tx.ua(h, asc::REGISTRATIONS_PREEMPTED);
            }
        }
        // f) type or scope changed: RESERVATIONS RELEASED to the
        // remaining registrants but the preempting one.
        if old.pr_type != pr_type {
            let keep: Vec<Nexus> = tx
                .st
                .registrations
                .iter()
                .filter(|g| &g.nexus != nexus)
                .map(|g| g.nexus.clone())
                .collect();
            for n in keep {
                if !tx
                    .fx
                    .unit_attentions
                    .iter()
                    .any(|(u, c)| u == &n && *c == asc::REGISTRATIONS_PREEMPTED)
                {
                    tx.ua(&n, asc::RESERVATIONS_RELEASED);
                }
            }
        }
    } else {
        // 5.13.11.2.5: remove the registrations with the key, reservation
        // untouched (unless that empties an all-registrants one).
        let removed: Vec<Nexus> = tx
            .st
            .registrations
            .iter()
            .filter(|g| g.key == sa_key)
            .map(|g| g.nexus.clone())
            .collect();
        if removed.is_empty() {
            return Err(Refusal::Conflict);
        }
        tx.unregister(&removed, nexus);
        for n in &removed {
            if n != nexus {
                tx.ua(n, asc::REGISTRATIONS_PREEMPTED);
            }
        }
    }
    tx.fx.abort_tasks_of = abort_set;
    tx.bump();
    Ok(())
}

/// REGISTER AND MOVE (SPC-5 5.13.8, table 70).
fn register_and_move(
    tx: &mut Tx,
    nexus: &Nexus,
    ctx: &Context<'_>,
    p: &RegisterMoveParams,
) -> Result<(), Refusal> {
    let ports = ctx.target_ports;
    let Some(res) = tx.st.reservation.clone() else {
        return Err(check(Sense::illegal_request(asc::INVALID_FIELD_IN_CDB)));
    };
    if res.pr_type.all_registrants() || !tx.st.is_holder(nexus) {
        return Err(Refusal::Conflict);
    }
    if p.service_action_key == 0 {
        return Err(check(Sense::invalid_param_field(8, None)));
    }
    let tid_at = RegisterMoveParams::TRANSPORT_ID_OFFSET as u16;
    // The destination is one initiator port: format 01b names it; a
    // format 00b iSCSI name does only when exactly one known initiator
    // port has that name.
    let port = match &p.transport_id {
        TransportId::Iscsi { isid: Some(_), .. } => p.transport_id.initiator_port(),
        TransportId::Iscsi { isid: None, .. } => {
            let mut m = ctx
                .known_initiators
                .iter()
                .filter(|i| p.transport_id.matches(i));
            match (m.next(), m.next()) {
                (Some(one), None) => Some(one.clone()),
                _ => None,
            }
        }
        _ => None,
    }
    .ok_or(check(Sense::invalid_param_field(tid_at, None)))?;
    if port == nexus.initiator {
        return Err(check(Sense::invalid_param_field(tid_at, None)));
    }
    let tp = ports
        .iter()
        .find(|t| t.relative_id == p.relative_target_port)
        .ok_or(check(Sense::invalid_param_field(18, None)))?;
    let dest = Nexus::new(port, tp.clone());
    if !tx.st.is_registered(&dest) {
        resources(tx.st.registrations.len() + 1)?;
    }
    tx.set_key(&dest, p.service_action_key, false);
    tx.st.reservation = Some(Reservation {
        pr_type: res.pr_type,
        holder: Some(dest),
    });
    if p.unreg {
        tx.unregister(std::slice::from_ref(nexus), nexus);
    }
    tx.st.aptpl = p.aptpl;
    tx.bump();
    Ok(())
}

/// REPLACE LOST RESERVATION (SPC-5 5.13.11.3).
fn replace_lost(
    state: &PrState,
    nexus: &Nexus,
    p: &PrOutParams,
    pr_type: PrType,
) -> Result<Applied, Refusal> {
    if !state.lost {
        return Err(check(Sense::illegal_request(
            asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
        )));
    }
    if p.all_tg_pt {
        return Err(check(Sense::invalid_param_field(20, Some(2))));
    }
    if p.reservation_key != 0 {
        return Err(check(Sense::invalid_param_field(0, None)));
    }
    if p.service_action_key == 0 {
        return Err(check(Sense::invalid_param_field(8, None)));
    }
    let st = PrState {
        generation: 0,
        aptpl: p.aptpl,
        registrations: vec![Registration {
            nexus: nexus.clone(),
            key: p.service_action_key,
            all_tg_pt: false,
        }],
        reservation: Some(reservation_for(pr_type, nexus)),
        lost: false,
        spc2: state.spc2.clone(),
    };
    let persist = Some(if st.aptpl {
        Persist::Save(st.clone())
    } else {
        Persist::Erase
    });
    Ok(Applied {
        state: st,
        effects: Effects {
            persist,
            ..Effects::default()
        },
    })
}

// ------------------------------------------------- SPC-2 RESERVE/RELEASE ---

/// RESERVE(6)/(10) and RELEASE(6)/(10) as SPC-2 defines them, with the
/// SPC-5 5.13.3 exceptions (CRH=1). Third-party reservations and extents
/// are not supported (INVALID FIELD IN CDB).
pub fn spc2(state: &PrState, nexus: &Nexus, cdb: &[u8]) -> Result<Applied, Refusal> {
    let op = *cdb
        .first()
        .ok_or(check(Sense::invalid_cdb_field(0, None)))?;
    let reserve = matches!(op, 0x16 | 0x56);
    if !matches!(op, 0x16 | 0x17 | 0x56 | 0x57) {
        return Err(check(Sense::invalid_cdb_field(0, None)));
    }
    let b1 = cdb.get(1).copied().unwrap_or(0);
    // (6): 3RDPTY bit 4, third party id bits 3-1, extent bit 0.
    // (10): 3RDPTY bit 4, LONGID bit 1, extent bit 0.
    let bad = if op & 0x40 == 0 { b1 & 0x1f } else { b1 & 0x13 };
    if bad != 0 {
        let bit = 7 - (bad.leading_zeros() as u8);
        return Err(check(Sense::invalid_cdb_field(1, Some(bit))));
    }
    let unchanged = || Applied {
        state: state.clone(),
        effects: Effects::default(),
    };
    let rr = state
        .reservation
        .as_ref()
        .is_some_and(|r| r.pr_type.registrants_type());
    if state.is_holder(nexus) || (rr && state.is_registered(nexus)) {
        return Ok(unchanged());
    }
    if !state.registrations.is_empty() {
        return Err(Refusal::Conflict);
    }
    let mut st = state.clone();
    if reserve {
        match &state.spc2 {
            Some(h) if h != nexus => return Err(Refusal::Conflict),
            _ => st.spc2 = Some(nexus.clone()),
        }
    } else if state.spc2.as_ref() == Some(nexus) {
        st.spc2 = None;
    }
    Ok(Applied {
        state: st,
        effects: Effects::default(),
    })
}

/// The I_T nexus is gone: its SPC-2 reservation ends. Persistent
/// reservations and registrations are kept (SPC-5 5.13.1).
pub fn on_nexus_loss(state: &PrState, nexus: &Nexus) -> Option<PrState> {
    (state.spc2.as_ref() == Some(nexus)).then(|| PrState {
        spc2: None,
        ..state.clone()
    })
}

/// LOGICAL UNIT RESET, hard reset: SPC-2 reservations end, persistent
/// ones stay.
pub fn on_reset(state: &PrState) -> Option<PrState> {
    state.spc2.is_some().then(|| PrState {
        spc2: None,
        ..state.clone()
    })
}
