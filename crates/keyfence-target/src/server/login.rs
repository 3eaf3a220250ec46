//! The login phase of a connection: feeds Login Requests to
//! [`keyfence_iscsi::login::TargetLogin`], sends its responses, and on success
//! admits the session into the session table (assigning the TSIH the
//! negotiation announced and reinstating an older session with the same
//! initiator port and portal group).
//!
//! Authentication: a target with `[target.chap]` (and discovery with
//! `[discovery_chap]`) offers only AuthMethod=CHAP, so an initiator that
//! cannot prove the secret is refused with status 0201h (authentication
//! failure). The credentials are chosen from the first Login Request; a
//! session that ends up being of another kind or for another target than
//! that request announced must still have passed that kind's or target's
//! CHAP, or it is refused the same way.
//!
//! Access control: a target that is not `open` admits only the initiators
//! its ACL lists (see [`super::acl`]); an initiator's own CHAP replaces the
//! target's. A target this portal does not serve and a target the
//! initiator may not access are refused alike, with status 0202h
//! (authorization failure) on the first Login Request, so that a client
//! cannot tell which target names exist.
//!
//! When CHAP is configured anywhere (`[discovery_chap]`, a target's or an
//! ACL entry's CHAP), such a name is instead answered like a target that
//! requires CHAP: offered CHAP, challenged, and refused with 0201h
//! (authentication failure) against credentials nobody has. Otherwise the
//! challenge an open CHAP target sends to anyone would tell its name apart
//! from an unknown one. RFC 7143 lets a target answer authentication
//! failure before it says anything about the target asked for. Without
//! any CHAP configured there is no secret to protect and 0202h stays.
//!
//! Hostile connections: the first PDU must arrive within
//! `limits.first_pdu_timeout_secs`, and a login's CHAP responses are
//! checked only when the source and initiator name get their turn from
//! the throttle (see [`super::admission`]).

use std::sync::Arc;
use std::time::Duration;

use keyfence_iscsi::keys;
use keyfence_iscsi::login::{LoginStatus, LoginStep, SessionType, TargetLogin, TargetLoginConfig};
use keyfence_iscsi::params::OperationalPrefs;
use keyfence_iscsi::text::{format_address, SendTargetsEntry};
use keyfence_iscsi::{Pdu, SessionParams};
use keyfence_scsi::{InitiatorPort, Nexus};
use tracing::{debug, info, warn};

use super::acl::LunView;
use super::admission::{Ticket, TICKET};
use super::conn::Wire;
use super::metrics::{IdleDrop, LoginResult, Metrics, Refusal};
use super::session::{AdmitError, SessionInfo, SessionKey, SessionSlot};
use super::{ListenerInfo, Live, Shared};
use crate::config::{ChapConfig, Limits};

/// What a session is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SessionKind {
    Discovery,
    Normal { target: usize, tpgt: u16 },
}

/// A connection that completed its login.
pub(super) struct Established {
    pub kind: SessionKind,
    pub initiator: String,
    pub isid: u64,
    pub cid: u16,
    pub params: SessionParams,
    pub exp_cmd_sn: u32,
    pub stat_sn: u32,
    pub registration: SessionSlot,
    /// The LUNs this initiator sees, when its ACL entry maps them.
    pub view: Option<Arc<LunView>>,
    /// The address the connection was accepted on (what SendTargets
    /// advertises for a wildcard portal).
    pub local: Option<std::net::SocketAddr>,
    /// The portal (listener address) it came through: a reload that
    /// removes that portal ends the session.
    pub portal: Option<std::net::SocketAddr>,
}

/// Why a login did not produce a session.
#[derive(Debug)]
pub(super) enum LoginError {
    Io(std::io::Error),
    Framing(String),
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginError::Io(e) => write!(f, "socket error: {e}"),
            LoginError::Framing(e) => write!(f, "bad PDU: {e}"),
        }
    }
}

impl From<std::io::Error> for LoginError {
    fn from(e: std::io::Error) -> Self {
        LoginError::Io(e)
    }
}

/// Read one PDU; `None` at end of stream.
async fn next_pdu(wire: &mut Wire) -> Result<Option<Pdu>, LoginError> {
    loop {
        match wire.codec.decode(&mut wire.rbuf) {
            Ok(Some(p)) => return Ok(Some(p)),
            Ok(None) => {}
            Err(e) => return Err(LoginError::Framing(e.to_string())),
        }
        if !wire.fill().await? {
            return Ok(None);
        }
    }
}

/// The operational limits we offer, from the configuration.
fn prefs(l: &Limits) -> OperationalPrefs {
    OperationalPrefs {
        max_recv_data_segment_length: l.max_recv_data_segment_length,
        max_burst_length: l.max_burst_length,
        first_burst_length: l.first_burst_length,
        max_outstanding_r2t: u16::try_from(l.max_outstanding_r2t).unwrap_or(u16::MAX),
        ..OperationalPrefs::default()
    }
}

/// Run the login phase. `Ok(None)`: the login failed (the failure
/// response has been queued) or the initiator went away.
pub(super) async fn login(
    shared: &Arc<Shared>,
    info: &ListenerInfo,
    wire: &mut Wire,
) -> Result<Option<Established>, LoginError> {
    let ticket: Option<Arc<Ticket>> = TICKET.try_with(Arc::clone).ok();
    let Some(mut pdu) = first_pdu(ticket.as_deref(), wire, &shared.metrics).await? else {
        return Ok(None);
    };
    // Counted however the login ends from here on (`?` included).
    let mut tally = Tally {
        metrics: &shared.metrics,
        result: LoginResult::Other,
    };
    // The configuration as it is when the login starts; a reload after
    // this reaches the session once it is admitted.
    let live = shared.live();
    let groups = live.groups_at(info.addr);
    // The portal group tag depends on the target asked for, which a
    // listener shared by several targets only learns from the first PDU.
    let first_keys = keys::parse(&pdu.data).ok();
    let first_key = |k: &str| {
        first_keys
            .as_ref()
            .and_then(|p| keys::get(p, k).map(str::to_owned))
    };
    let asked_idx = first_key("TargetName")
        .as_deref()
        .and_then(|n| live.target_by_name(n));
    // Whose CHAP credentials this login is checked against.
    let auth_scope = if first_key("SessionType").as_deref() == Some("Discovery") {
        AuthScope::Discovery
    } else {
        asked_idx.map_or(AuthScope::Unknown, AuthScope::Target)
    };
    let initiator_name = first_key("InitiatorName");
    let chap = required_chap(&live, auth_scope, initiator_name.as_deref().unwrap_or(""));
    let tpgt = asked_idx
        .and_then(|t| groups.iter().find(|(g, _)| *g == t).map(|(_, g)| *g))
        .or_else(|| groups.first().map(|g| g.1))
        .unwrap_or(1);
    let Some(reservation) = TsihReservation::new(shared) else {
        tally.result = LoginResult::OutOfResources;
        warn!(peer = %wire.peer, "no TSIH left; login refused");
        wire.push_pdu(&keyfence_iscsi::login::reject_login(
            &pdu,
            LoginStatus::OUT_OF_RESOURCES,
            0,
        ));
        return Ok(None);
    };
    let tsih = reservation.tsih;
    let mut targets: Vec<String> = groups
        .iter()
        .filter(|(_, g)| *g == tpgt)
        .filter_map(|(t, _)| live.target(*t))
        // A target this initiator may not access is, to it, not here.
        .filter(|t| {
            t.acl
                .access(initiator_name.as_deref().unwrap_or(""))
                .is_some()
        })
        .map(|t| t.name.clone())
        .collect();
    // For the metrics only (the initiator is told nothing): why a named
    // target is not offered to it.
    let hidden = match first_key("TargetName") {
        Some(name) if !targets.iter().any(|t| t.eq_ignore_ascii_case(&name)) => Some(
            match asked_idx.filter(|t| groups.iter().any(|(g, _)| g == t)) {
                Some(_) => LoginResult::AclRefused,
                None => LoginResult::TargetNotFound,
            },
        ),
        _ => None,
    };
    // A normal session naming a target that is not here for it (unknown,
    // served elsewhere or forbidden), while CHAP is configured anywhere:
    // authenticate against credentials nobody has (see the module doc).
    let decoy = match (auth_scope, first_key("TargetName")) {
        (AuthScope::Discovery, _) | (_, None) => None,
        (_, Some(name))
            if targets.iter().any(|t| t.eq_ignore_ascii_case(&name)) || !chap_configured(&live) =>
        {
            None
        }
        (_, Some(name)) => Some((name, unguessable_credential())),
    };
    let mut chap_users = chap
        .map(|c| vec![c.initiator_credential()])
        .unwrap_or_default();
    if let Some((name, cred)) = &decoy {
        targets.push(name.clone());
        chap_users = vec![cred.clone()];
    }
    let chap_in_play = !chap_users.is_empty();
    let cfg = TargetLoginConfig {
        portal_group_tag: tpgt,
        targets,
        tsih,
        prefs: prefs(&live.limits),
        initial_stat_sn: 1,
        cmd_window: live.limits.max_cmds_per_session,
        chap_users,
        chap_mutual: chap.and_then(ChapConfig::target_credential),
        chap_for_discovery: auth_scope == AuthScope::Discovery && chap.is_some(),
        ..TargetLoginConfig::default()
    };
    let mut tl = TargetLogin::new(cfg);
    let result = loop {
        // A CHAP response is checked only on this source's and initiator
        // name's turn (backoff after failures).
        let attempt = match &ticket {
            Some(t) if chap_in_play && carries_chap_response(&pdu) => {
                let throttle = &t.admission().throttle;
                match throttle.turn(t.source, initiator_name.as_deref()).await {
                    Some(a) => Some(a),
                    None => {
                        tally.result = LoginResult::ChapThrottled;
                        t.admission().log_chap.event(|| {
                            format!(
                                "{} (initiator {}): too many failed attempts; refused without checking",
                                wire.peer,
                                initiator_name.as_deref().unwrap_or("?")
                            )
                        });
                        wire.push_pdu(&keyfence_iscsi::login::reject_login(
                            &pdu,
                            LoginStatus::SERVICE_UNAVAILABLE,
                            0,
                        ));
                        break None;
                    }
                }
            }
            _ => None,
        };
        let step = tl.step(&pdu);
        if let Some(a) = attempt {
            match &step {
                LoginStep::Failed { status, .. }
                    if *status == LoginStatus::AUTHENTICATION_FAILURE =>
                {
                    a.failed()
                }
                LoginStep::Failed { .. } => drop(a),
                _ => a.succeeded(),
            }
        }
        match step {
            LoginStep::Respond(r) => {
                wire.push_pdu(&r);
                wire.flush().await?;
            }
            LoginStep::Failed {
                mut response,
                status,
            } => {
                tally.result = if let (Some(h), Some(_)) = (hidden, &decoy) {
                    // Challenged against the decoy credentials.
                    h
                } else if status == LoginStatus::NOT_FOUND {
                    hidden.unwrap_or(LoginResult::TargetNotFound)
                } else if status == LoginStatus::AUTHENTICATION_FAILURE {
                    LoginResult::ChapFailure
                } else if status == LoginStatus::AUTHORIZATION_FAILURE {
                    LoginResult::AclRefused
                } else {
                    LoginResult::Other
                };
                if status == LoginStatus::NOT_FOUND {
                    // Unknown and forbidden targets look the same.
                    info!(
                        peer = %wire.peer,
                        initiator = initiator_name.as_deref().unwrap_or("?"),
                        target = first_key("TargetName").as_deref().unwrap_or("?"),
                        "login refused: no such target, or the initiator is not in its ACL"
                    );
                    deny(&mut response);
                } else if status == LoginStatus::AUTHENTICATION_FAILURE {
                    let peer = wire.peer;
                    let who = initiator_name.as_deref().unwrap_or("?").to_string();
                    match &ticket {
                        Some(t) => t
                            .admission()
                            .log_chap
                            .event(|| format!("{peer} (initiator {who})")),
                        None => warn!(
                            %peer,
                            initiator = %who,
                            "login refused: CHAP authentication failed"
                        ),
                    }
                } else {
                    debug!(peer = %wire.peer, "login failed: {} (0x{:04x})", status.description(), status.code());
                }
                wire.push_pdu(&response);
                break None;
            }
            LoginStep::Complete { response, session } => {
                let s = *session;
                let kind = match s.session_type {
                    SessionType::Discovery => SessionKind::Discovery,
                    SessionType::Normal => {
                        let Some(target) = s
                            .target_name
                            .as_deref()
                            .and_then(|n| live.target_by_name(n))
                        else {
                            tally.result = LoginResult::TargetNotFound;
                            wire.push_pdu(&keyfence_iscsi::login::reject_login(
                                &pdu,
                                LoginStatus::AUTHORIZATION_FAILURE,
                                s.next_stat_sn.wrapping_sub(1),
                            ));
                            break None;
                        };
                        SessionKind::Normal { target, tpgt }
                    }
                };
                // The credentials were picked from the first request; the
                // session must have passed the CHAP its real kind requires.
                let scope = match kind {
                    SessionKind::Discovery => AuthScope::Discovery,
                    SessionKind::Normal { target, .. } => AuthScope::Target(target),
                };
                // The ACL decides on the name the session ends up with.
                let view = match kind {
                    SessionKind::Discovery => None,
                    SessionKind::Normal { target, .. } => {
                        match live
                            .target(target)
                            .and_then(|t| t.acl.access(&s.initiator_name))
                        {
                            Some(a) => a.view,
                            None => {
                                tally.result = LoginResult::AclRefused;
                                info!(
                                    peer = %wire.peer,
                                    initiator = %s.initiator_name,
                                    "login refused: the initiator is not in the target's ACL"
                                );
                                wire.push_pdu(&keyfence_iscsi::login::reject_login(
                                    &pdu,
                                    LoginStatus::AUTHORIZATION_FAILURE,
                                    s.next_stat_sn.wrapping_sub(1),
                                ));
                                break None;
                            }
                        }
                    }
                };
                if let Some(c) = required_chap(&live, scope, &s.initiator_name) {
                    let offered =
                        required_chap(&live, auth_scope, initiator_name.as_deref().unwrap_or(""));
                    if scope != auth_scope
                        || offered != Some(c)
                        || s.chap_name.as_deref() != Some(c.user.as_str())
                    {
                        tally.result = LoginResult::ChapFailure;
                        warn!(
                            peer = %wire.peer,
                            initiator = %s.initiator_name,
                            "login refused: CHAP authentication required"
                        );
                        wire.push_pdu(&keyfence_iscsi::login::reject_login(
                            &pdu,
                            LoginStatus::AUTHENTICATION_FAILURE,
                            s.next_stat_sn.wrapping_sub(1),
                        ));
                        break None;
                    }
                }
                // A place among logged-in connections, held for as long
                // as this connection lives.
                let permit = match shared.connections.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        tally.result = LoginResult::OutOfResources;
                        shared.metrics.refused(Refusal::MaxConnections);
                        if let Some(t) = &ticket {
                            t.admission().log_refused.event(|| {
                                format!(
                                    "{}: max_connections logged-in connections reached; login refused",
                                    wire.peer
                                )
                            });
                        }
                        wire.push_pdu(&keyfence_iscsi::login::reject_login(
                            &pdu,
                            LoginStatus::OUT_OF_RESOURCES,
                            s.next_stat_sn.wrapping_sub(1),
                        ));
                        break None;
                    }
                };
                let initiator = s.initiator_name.to_ascii_lowercase();
                let (target, nexus) = match kind {
                    SessionKind::Discovery => (None, None),
                    SessionKind::Normal { target, tpgt } => (
                        Some(target),
                        live.target(target).map(|t| {
                            Nexus::new(InitiatorPort::new(&initiator, s.isid), t.target_port(tpgt))
                        }),
                    ),
                };
                let key = SessionKey {
                    initiator: initiator.clone(),
                    isid: s.isid,
                    target,
                    tpgt,
                };
                // Session reinstatement (RFC 7143 6.3.5): the old session
                // with this SSID ends before the new one starts.
                let displaced = shared.sessions().displace(&key);
                if let Some(d) = displaced {
                    info!(peer = %wire.peer, initiator = %initiator, isid = format_args!("{:012x}", s.isid), "reinstating session");
                    if tokio::time::timeout(Duration::from_secs(30), d.wait())
                        .await
                        .is_err()
                    {
                        warn!(peer = %wire.peer, "old session did not end within 30 s");
                    }
                }
                let status = SessionInfo {
                    initiator: s.initiator_name.clone(),
                    isid: s.isid,
                    tsih,
                    tpgt,
                    local: wire.rd.local_addr().ok(),
                    peer: wire.peer,
                    params: s.params.clone(),
                    since: std::time::SystemTime::now(),
                    started: std::time::Instant::now(),
                };
                let admitted = shared.sessions().admit(tsih, key, nexus, Some(status));
                match admitted {
                    Ok(registration) => {
                        tally.result = LoginResult::Success;
                        reservation.admitted();
                        if let Some(t) = &ticket {
                            t.login_done(permit);
                        }
                        wire.push_pdu(&response);
                        wire.flush().await?;
                        // Digests and data segment limits apply from the
                        // first full feature phase PDU on.
                        wire.codec.apply(&s.params);
                        break Some(Established {
                            kind,
                            initiator,
                            isid: s.isid,
                            cid: s.cid,
                            params: s.params,
                            exp_cmd_sn: s.exp_cmd_sn,
                            stat_sn: s.next_stat_sn,
                            registration,
                            view,
                            local: wire.rd.local_addr().ok(),
                            portal: Some(info.addr),
                        });
                    }
                    Err(AdmitError::TooManySessions) => {
                        tally.result = LoginResult::OutOfResources;
                        warn!(peer = %wire.peer, "session limit reached; login refused");
                        wire.push_pdu(&keyfence_iscsi::login::reject_login(
                            &pdu,
                            LoginStatus::OUT_OF_RESOURCES,
                            s.next_stat_sn.wrapping_sub(1),
                        ));
                        break None;
                    }
                }
            }
        }
        match next_pdu(wire).await {
            Ok(Some(p)) => pdu = p,
            Ok(None) => break None,
            Err(e) => return Err(e),
        }
    };
    Ok(result)
}

/// The first PDU of a connection, within the first-PDU deadline and
/// unless a newcomer displaces this idle connection; `None` if neither.
async fn first_pdu(
    ticket: Option<&Ticket>,
    wire: &mut Wire,
    metrics: &Metrics,
) -> Result<Option<Pdu>, LoginError> {
    let Some(t) = ticket else {
        return next_pdu(wire).await;
    };
    let adm = t.admission();
    let deadline = t.accepted + t.first_pdu_timeout;
    let peer = wire.peer;
    tokio::select! {
        r = tokio::time::timeout_at(deadline, next_pdu(wire)) => match r {
            Ok(Ok(Some(p))) if t.started() => Ok(Some(p)),
            Ok(Ok(Some(_))) => {
                debug!(%peer, "displaced while its first PDU arrived");
                Ok(None)
            }
            Ok(other) => other,
            Err(_) => {
                metrics.idle_dropped(IdleDrop::FirstPduTimeout);
                adm.log_idle.event(|| {
                    format!(
                        "{peer}: no Login Request within {} s",
                        t.first_pdu_timeout.as_secs()
                    )
                });
                Ok(None)
            }
        },
        _ = t.evicted() => {
            metrics.idle_dropped(IdleDrop::Displaced);
            adm.log_idle.event(|| format!("{peer}: idle, displaced by a new connection (login slots full)"));
            Ok(None)
        }
    }
}

/// Counts a login's result in `keyfence_logins_total` when dropped.
struct Tally<'a> {
    metrics: &'a Metrics,
    result: LoginResult,
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.metrics.login(self.result);
    }
}

/// Does this Login Request carry a CHAP response (possibly the last part
/// of one split over several PDUs)?
fn carries_chap_response(pdu: &Pdu) -> bool {
    pdu.data.windows(7).any(|w| w == b"CHAP_R=")
}

/// Is CHAP required anywhere (discovery, a target or an ACL entry)?
fn chap_configured(live: &Live) -> bool {
    live.discovery_chap.is_some()
        || live
            .targets()
            .any(|(_, t)| t.chap.is_some() || t.acl.any_chap())
}

/// A CHAP name and secret no initiator knows (128 random bits each).
fn unguessable_credential() -> keyfence_iscsi::chap::ChapCredential {
    let (_, name) = keyfence_iscsi::chap::new_challenge();
    let (_, secret) = keyfence_iscsi::chap::new_challenge();
    keyfence_iscsi::chap::ChapCredential::new(keys::encode_hex(&name), secret.to_vec())
}

/// Whose CHAP credentials apply to a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthScope {
    Discovery,
    Target(usize),
    /// A normal session whose target the first request did not name: no
    /// credentials are offered, and the check on completion refuses the
    /// session if the target it names after all requires CHAP.
    Unknown,
}

/// The CHAP a session of this scope by `initiator` must pass, if any: for
/// a target, the initiator's own from the ACL, else the target's.
fn required_chap<'a>(live: &'a Live, scope: AuthScope, initiator: &str) -> Option<&'a ChapConfig> {
    match scope {
        AuthScope::Discovery => live.discovery_chap.as_ref(),
        AuthScope::Target(t) => live
            .target(t)
            .and_then(|t| t.acl.access(initiator))
            .and_then(|a| a.chap),
        AuthScope::Unknown => None,
    }
}

/// Turn a "target not found" Login Response into "authorization
/// failure" (status class and detail are bytes 36 and 37), leaving the
/// rest as it was: a forbidden target and a missing one look the same.
fn deny(response: &mut Pdu) {
    let s = LoginStatus::AUTHORIZATION_FAILURE;
    response.bhs[36] = s.class;
    response.bhs[37] = s.detail;
}

/// A TSIH held for a login in progress; given back when dropped (failed,
/// timed out or abandoned login) unless the session was admitted.
struct TsihReservation {
    shared: Arc<Shared>,
    tsih: u16,
    admitted: std::cell::Cell<bool>,
}

impl TsihReservation {
    fn new(shared: &Arc<Shared>) -> Option<TsihReservation> {
        let tsih = shared.sessions().reserve()?;
        Some(TsihReservation {
            shared: shared.clone(),
            tsih,
            admitted: std::cell::Cell::new(false),
        })
    }

    fn admitted(&self) {
        self.admitted.set(true);
    }
}

impl Drop for TsihReservation {
    fn drop(&mut self) {
        if !self.admitted.get() {
            self.shared.sessions().release(self.tsih);
        }
    }
}

/// The targets a session may be told about by SendTargets, with their
/// portals: only targets `initiator` may access (its ACL). A discovery
/// session sees all of those (it passed discovery CHAP if there is any).
/// A normal session sees them too when discovery is open, but only its
/// own target when `[discovery_chap]` is set (it has not proven the
/// discovery credentials).
///
/// A portal bound to a wildcard address (`0.0.0.0`, `[::]`) is advertised
/// with `local`, the address this connection was accepted on, and the
/// portal's port: the initiator reached us there, while a wildcard address
/// means nothing to it.
pub(super) fn discovered_targets(
    live: &Live,
    initiator: &str,
    kind: SessionKind,
    local: Option<std::net::SocketAddr>,
) -> Vec<SendTargetsEntry> {
    let visible = |i: usize| match kind {
        SessionKind::Discovery => true,
        SessionKind::Normal { target, .. } => target == i || live.discovery_chap.is_none(),
    };
    let local_ip = local.map(|a| a.ip().to_canonical());
    live.targets()
        .filter(|(i, t)| visible(*i) && t.acl.access(initiator).is_some())
        .map(|(_, t)| SendTargetsEntry {
            name: t.name.clone(),
            addresses: t
                .portals
                .iter()
                .filter_map(|p| {
                    let ip = p.addr.ip();
                    if !ip.is_unspecified() {
                        return Some((format_address(p.addr), p.tpgt));
                    }
                    let l = local_ip?;
                    // An IPv4 wildcard serves IPv4 only; an IPv6 one
                    // serves both on a dual-stack host.
                    if ip.is_ipv4() && !l.is_ipv4() {
                        return None;
                    }
                    let addr = std::net::SocketAddr::new(l, p.addr.port());
                    Some((format_address(addr), p.tpgt))
                })
                // Cluster mode: the other gateways' portal groups (never
                // wildcards: the configuration refuses them).
                .chain(
                    t.peer_portals
                        .iter()
                        .map(|(_, p)| (format_address(p.addr), p.tpgt)),
                )
                .collect(),
        })
        .collect()
}
