//! Who may hold a connection before logging in, and how fast a source may
//! guess CHAP secrets.
//!
//! Connections are counted in two pools. One still logging in holds a
//! *login slot* (`limits.max_login_connections` in all, at most
//! `limits.max_login_connections_per_source` per source address) and must
//! send its first PDU within `limits.first_pdu_timeout_secs`; one that
//! completed its login holds a *session connection* permit
//! (`limits.max_connections`) instead. Idle sockets therefore never take
//! the places of logged-in sessions. When every login slot is taken, a new
//! connection displaces a connection that has not sent anything yet, from
//! the source holding the most slots (the oldest of those), so that many
//! idle sockets of one attacker cannot keep a legitimate initiator out.
//!
//! Failed CHAP logins are slowed per source address and per initiator
//! name ([`AuthThrottle`]): after a few free attempts each further
//! attempt waits for its turn, with exponential backoff, and an attempt
//! whose turn is too far away is refused at once (service unavailable).
//!
//! The three limits can change while serving (a reload,
//! [`Admission::set_limits`]): new connections are admitted under the new
//! ones. Connections already logging in keep their slot and the first-PDU
//! deadline they were given; when a limit is lowered below the number of
//! slots in use, new connections are refused (not displacing anyone)
//! until the count is below the new limit.
//!
//! Refusals are logged at WARN at most once per [`LOG_INTERVAL`] per kind,
//! with the number of events since the last line.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::warn;

use crate::config::Limits;

/// Shortest interval between two WARN lines of one kind.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

tokio::task_local! {
    /// The login slot of the connection this task serves (set by the
    /// accept loop around the whole connection).
    pub(super) static TICKET: Arc<Ticket>;
}

/// A WARN line that is printed at most once per [`LOG_INTERVAL`],
/// counting the events it stands for.
#[derive(Debug)]
pub(crate) struct RateLimitedLog {
    what: &'static str,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedLog {
    pub const fn new(what: &'static str) -> RateLimitedLog {
        RateLimitedLog {
            what,
            state: Mutex::new((None, 0)),
        }
    }

    /// Count one event; log it (with the number since the last line) when
    /// the interval has passed. `detail` describes this event.
    pub fn event(&self, detail: impl FnOnce() -> String) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 += 1;
        let now = Instant::now();
        if s.0
            .is_some_and(|last| now.duration_since(last) < LOG_INTERVAL)
        {
            return;
        }
        let n = std::mem::take(&mut s.1);
        s.0 = Some(now);
        drop(s);
        if n <= 1 {
            warn!("{}: {}", self.what, detail());
        } else {
            warn!(
                "{}: {} ({n} times in the last {} s)",
                self.what,
                detail(),
                LOG_INTERVAL.as_secs()
            );
        }
    }
}

/// Why a connection was not given a login slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// This source already has its share of connections logging in.
    PerSource,
    /// Every slot is taken by connections that are already logging in.
    Full,
}

#[derive(Debug)]
struct Slot {
    source: IpAddr,
    accepted: Instant,
    evict: Arc<Notify>,
    /// Sent its first PDU: no longer displaced by newcomers.
    started: bool,
}

#[derive(Debug, Default)]
struct Slots {
    next_id: u64,
    slots: HashMap<u64, Slot>,
    per_source: HashMap<IpAddr, usize>,
}

impl Slots {
    fn remove(&mut self, id: u64) -> Option<Slot> {
        let s = self.slots.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&s.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&s.source);
            }
        }
        Some(s)
    }
}

/// The login slots of a server and its CHAP throttle.
#[derive(Debug)]
pub(crate) struct Admission {
    slots: Mutex<Slots>,
    max_login: AtomicUsize,
    max_per_source: AtomicUsize,
    /// Milliseconds a new connection has to send its first PDU.
    first_pdu_timeout_ms: AtomicU64,
    pub throttle: AuthThrottle,
    pub log_refused: RateLimitedLog,
    pub log_idle: RateLimitedLog,
    pub log_chap: RateLimitedLog,
    evicted: AtomicU64,
}

impl Admission {
    pub fn new(limits: &Limits) -> Arc<Admission> {
        Arc::new(Admission {
            slots: Mutex::new(Slots::default()),
            max_login: AtomicUsize::new(limits.max_login_connections as usize),
            max_per_source: AtomicUsize::new(limits.max_login_connections_per_source as usize),
            first_pdu_timeout_ms: AtomicU64::new(
                u64::from(limits.first_pdu_timeout_secs).saturating_mul(1000),
            ),
            throttle: AuthThrottle::default(),
            log_refused: RateLimitedLog::new("connection refused"),
            log_idle: RateLimitedLog::new("connection dropped before login"),
            log_chap: RateLimitedLog::new("login refused: CHAP authentication failed"),
            evicted: AtomicU64::new(0),
        })
    }

    /// Apply the admission limits of `limits` to connections accepted
    /// from now on (see the module doc).
    pub fn set_limits(&self, limits: &Limits) {
        // Under the slot lock, so that an admission sees all three of
        // one configuration.
        let _s = self.slots();
        self.max_login
            .store(limits.max_login_connections as usize, Ordering::Relaxed);
        self.max_per_source.store(
            limits.max_login_connections_per_source as usize,
            Ordering::Relaxed,
        );
        self.first_pdu_timeout_ms.store(
            u64::from(limits.first_pdu_timeout_secs).saturating_mul(1000),
            Ordering::Relaxed,
        );
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A login slot for a new connection from `source`, displacing an
    /// idle connection if every slot is taken.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Arc<Ticket>, Refused> {
        let source = source_group(source);
        let mut s = self.slots();
        let max_login = self.max_login.load(Ordering::Relaxed);
        let mine = s.per_source.get(&source).copied().unwrap_or(0);
        if mine >= self.max_per_source.load(Ordering::Relaxed) {
            return Err(Refused::PerSource);
        }
        if s.slots.len() > max_login {
            // Over a limit lowered by a reload: the connections already
            // logging in keep their slots; newcomers wait for the count
            // to fall below the limit rather than displace one.
            return Err(Refused::Full);
        }
        if s.slots.len() >= max_login {
            // The idle connection of the source with the most slots,
            // the oldest of those.
            let victim = s
                .slots
                .iter()
                .filter(|(_, v)| !v.started)
                .max_by_key(|(_, v)| {
                    (
                        s.per_source.get(&v.source).copied().unwrap_or(0),
                        std::cmp::Reverse(v.accepted),
                    )
                })
                .map(|(id, _)| *id);
            let Some(victim) = victim else {
                return Err(Refused::Full);
            };
            if let Some(v) = s.remove(victim) {
                v.evict.notify_one();
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        let evict = Arc::new(Notify::new());
        let accepted = Instant::now();
        let first_pdu_timeout =
            Duration::from_millis(self.first_pdu_timeout_ms.load(Ordering::Relaxed));
        s.slots.insert(
            id,
            Slot {
                source,
                accepted,
                evict: evict.clone(),
                started: false,
            },
        );
        *s.per_source.entry(source).or_insert(0) += 1;
        Ok(Arc::new(Ticket {
            adm: self.clone(),
            id,
            source,
            accepted,
            first_pdu_timeout,
            evict,
            done: AtomicBool::new(false),
            permit: Mutex::new(None),
        }))
    }

    /// Connections logging in now (for tests and diagnostics).
    #[cfg(test)]
    pub fn in_login(&self) -> usize {
        self.slots().slots.len()
    }
}

/// A connection's claim on a login slot; given back when the login ends
/// (or the connection does). After a successful login it holds the
/// session connection permit instead.
#[derive(Debug)]
pub(crate) struct Ticket {
    adm: Arc<Admission>,
    id: u64,
    pub source: IpAddr,
    pub accepted: Instant,
    /// How long it has to send its first PDU (as configured when it was
    /// accepted).
    pub first_pdu_timeout: Duration,
    evict: Arc<Notify>,
    done: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Ticket {
    pub fn admission(&self) -> &Arc<Admission> {
        &self.adm
    }

    /// Resolves when a newcomer displaced this connection.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }

    /// The first PDU arrived: the slot can no longer be displaced. False
    /// if it already was (the connection must end).
    pub fn started(&self) -> bool {
        let mut s = self.adm.slots();
        match s.slots.get_mut(&self.id) {
            Some(slot) => {
                slot.started = true;
                true
            }
            None => false,
        }
    }

    /// The login ended: give the slot back; on success keep `permit` (a
    /// session connection) for as long as the connection lives.
    pub fn login_done(&self, permit: Option<OwnedSemaphorePermit>) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.adm.slots().remove(self.id);
        }
        if permit.is_some() {
            *self.permit.lock().unwrap_or_else(|e| e.into_inner()) = permit;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.adm.slots().remove(self.id);
        }
    }
}

/// Attempts free of any wait, per key, before the backoff starts.
const FREE_ATTEMPTS: u32 = 3;
/// Wait added by the first attempt past the free ones; doubles with each.
const FIRST_PENALTY: Duration = Duration::from_millis(100);
/// Longest wait one attempt adds.
const MAX_PENALTY: Duration = Duration::from_secs(5);
/// An attempt whose turn is further away than this is refused at once.
pub const MAX_WAIT: Duration = Duration::from_secs(10);
/// What per-source limits count a connection's address under: an IPv4
/// address itself (also when it arrives IPv4-mapped on an IPv6 socket),
/// and for IPv6 its /64 prefix, since one host commonly holds a whole /64
/// and could otherwise take a fresh address for every connection.
pub(crate) fn source_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

/// A key with no attempt for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Keys remembered at most (oldest forgotten first).
const MAX_KEYS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Source(IpAddr),
    Initiator(String),
}

#[derive(Debug, Clone, Copy)]
struct Record {
    /// Failed attempts plus attempts in progress.
    weight: u32,
    /// When the next attempt may be checked.
    next_turn: Instant,
    last: Instant,
}

/// Backoff of CHAP verification per source address and per initiator
/// name.
#[derive(Debug, Default)]
pub(crate) struct AuthThrottle {
    map: Mutex<HashMap<Key, Record>>,
}

fn penalty(weight: u32) -> Duration {
    if weight < FREE_ATTEMPTS {
        return Duration::ZERO;
    }
    let doublings = (weight - FREE_ATTEMPTS).min(16);
    FIRST_PENALTY
        .saturating_mul(1 << doublings)
        .min(MAX_PENALTY)
}

/// An attempt admitted by [`AuthThrottle::turn`]; report its outcome with
/// [`Attempt::failed`] or [`Attempt::succeeded`] (dropping it counts as
/// neither).
#[derive(Debug)]
pub(crate) struct Attempt<'a> {
    throttle: &'a AuthThrottle,
    keys: Vec<Key>,
    settled: bool,
}

impl AuthThrottle {
    fn keys(source: IpAddr, initiator: Option<&str>) -> Vec<Key> {
        let mut k = vec![Key::Source(source_group(source))];
        if let Some(i) = initiator {
            k.push(Key::Initiator(i.to_ascii_lowercase()));
        }
        k
    }

    /// Reserve the next turn to check a CHAP response from `source` as
    /// `initiator` and wait for it; `None` (without waiting) when the turn
    /// is more than [`MAX_WAIT`] away.
    pub async fn turn(&self, source: IpAddr, initiator: Option<&str>) -> Option<Attempt<'_>> {
        let (at, attempt) = self.reserve(source, initiator)?;
        tokio::time::sleep_until(at).await;
        Some(attempt)
    }

    /// Reserve the next turn without waiting: when it is, and the attempt.
    pub fn reserve(
        &self,
        source: IpAddr,
        initiator: Option<&str>,
    ) -> Option<(Instant, Attempt<'_>)> {
        let keys = Self::keys(source, initiator);
        let at = {
            let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if m.len() >= MAX_KEYS {
                m.retain(|_, r| now.duration_since(r.last) < FORGET_AFTER);
                while m.len() >= MAX_KEYS {
                    let Some(oldest) = m.iter().min_by_key(|(_, r)| r.last).map(|(k, _)| k.clone())
                    else {
                        break;
                    };
                    m.remove(&oldest);
                }
            }
            let mut at = now;
            for k in &keys {
                if let Some(r) = m.get(k) {
                    if now.duration_since(r.last) >= FORGET_AFTER && r.next_turn <= now {
                        m.remove(k);
                        continue;
                    }
                    at = at.max(r.next_turn);
                }
            }
            if at.duration_since(now) > MAX_WAIT {
                return None;
            }
            for k in &keys {
                let r = m.entry(k.clone()).or_insert(Record {
                    weight: 0,
                    next_turn: now,
                    last: now,
                });
                r.next_turn = r.next_turn.max(at) + penalty(r.weight);
                r.weight = r.weight.saturating_add(1);
                r.last = now;
            }
            at
        };
        Some((
            at,
            Attempt {
                throttle: self,
                keys,
                settled: false,
            },
        ))
    }

    fn settle(&self, keys: &[Key], failed: bool) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            if let Some(r) = m.get_mut(k) {
                r.last = Instant::now();
                if !failed {
                    r.weight = r.weight.saturating_sub(1);
                }
            }
        }
        if !failed {
            // A proven initiator name starts afresh; its source keeps
            // its count (an attacker may hold one good credential).
            for k in keys {
                if let Key::Initiator(_) = k {
                    m.remove(k);
                }
            }
        }
    }
}

impl Attempt<'_> {
    /// The response was wrong: the attempt keeps counting.
    pub fn failed(mut self) {
        self.settled = true;
        self.throttle.settle(&self.keys, true);
    }

    /// The response was right.
    pub fn succeeded(mut self) {
        self.settled = true;
        self.throttle.settle(&self.keys, false);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.settled {
            // Neither proven nor disproven (the login failed otherwise or
            // the connection went away): do not count it against anyone.
            let mut m = self.throttle.map.lock().unwrap_or_else(|e| e.into_inner());
            for k in &self.keys {
                if let Some(r) = m.get_mut(k) {
                    r.weight = r.weight.saturating_sub(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_login: u32, per_source: u32) -> Limits {
        Limits {
            max_login_connections: max_login,
            max_login_connections_per_source: per_source,
            ..Limits::default()
        }
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_64_prefix() {
        let g = |s: &str| source_group(s.parse().unwrap());
        assert_eq!(g("2001:db8:1:2::1"), g("2001:db8:1:2:ffff:0:0:7"));
        assert_ne!(g("2001:db8:1:2::1"), g("2001:db8:1:3::1"));
        assert_eq!(g("::1"), g("::2"));
        assert_eq!(g("::ffff:127.0.0.5"), g("127.0.0.5"));
        assert_ne!(g("127.0.0.5"), g("127.0.0.6"));
        // Two connections from one /64 share its per-source slots.
        let adm = Admission::new(&limits(10, 2));
        let a = adm.admit("2001:db8::1".parse().unwrap()).unwrap();
        let b = adm.admit("2001:db8::2".parse().unwrap()).unwrap();
        assert_eq!(
            adm.admit("2001:db8::3".parse().unwrap()).unwrap_err(),
            Refused::PerSource
        );
        assert!(adm.admit("2001:db8:0:1::3".parse().unwrap()).is_ok());
        drop((a, b));
    }

    #[tokio::test]
    async fn slots_per_source_and_displacement() {
        let adm = Admission::new(&limits(4, 3));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.1".parse().unwrap();
        let t: Vec<_> = (0..3).map(|_| adm.admit(a).unwrap()).collect();
        assert_eq!(adm.admit(a).unwrap_err(), Refused::PerSource);
        let b1 = adm.admit(b).unwrap();
        assert_eq!(adm.in_login(), 4);
        // Full: the next one displaces one of a's idle connections.
        assert!(b1.started());
        let b2 = adm.admit(b).unwrap();
        assert_eq!(adm.in_login(), 4);
        assert!(!t[0].started(), "the oldest of the biggest source went");
        assert!(t[1].started() && t[2].started());
        // Everyone has started: nothing left to displace.
        assert!(b2.started());
        assert_eq!(adm.admit(b).unwrap_err(), Refused::Full);
        b1.login_done(None);
        assert_eq!(adm.in_login(), 3);
        drop(b1);
        drop(t);
        assert_eq!(adm.in_login(), 1);
    }

    #[tokio::test]
    async fn limits_change_for_newcomers_only() {
        let adm = Admission::new(&limits(4, 2));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let held: Vec<_> = (0..2).map(|_| adm.admit(a).unwrap()).collect();
        assert_eq!(adm.admit(a).unwrap_err(), Refused::PerSource);
        // Raised: a third from the same source is admitted.
        adm.set_limits(&Limits {
            first_pdu_timeout_secs: 9,
            ..limits(4, 3)
        });
        let third = adm.admit(a).unwrap();
        assert_eq!(third.first_pdu_timeout, Duration::from_secs(9));
        assert_eq!(held[0].first_pdu_timeout, Duration::from_secs(5));
        assert!(held.iter().all(|t| t.started()) && third.started());
        // Lowered below the count: nobody is dropped (their slots stay,
        // none is displaced), newcomers are refused until the count is
        // below the new limits.
        adm.set_limits(&limits(2, 1));
        assert_eq!(adm.admit(a).unwrap_err(), Refused::PerSource);
        assert_eq!(adm.admit(b).unwrap_err(), Refused::Full);
        assert_eq!(adm.in_login(), 3);
        let idle = {
            drop(third);
            // 2 in use, limit 2: b may displace an idle one only; all
            // have started, so it is refused.
            assert_eq!(adm.admit(b).unwrap_err(), Refused::Full);
            drop(held);
            adm.admit(b).unwrap()
        };
        assert_eq!(adm.in_login(), 1);
        assert_eq!(adm.admit(b).unwrap_err(), Refused::PerSource);
        drop(idle);
    }

    #[test]
    fn guesses_back_off_per_key() {
        let th = AuthThrottle::default();
        let src: IpAddr = "127.0.0.9".parse().unwrap();
        let now = Instant::now();
        // 300 guesses at once: a few free turns, then turns spaced by
        // 0.1, 0.2, 0.4, ... s; those more than 10 s away are refused.
        let got: Vec<_> = (0..300)
            .filter_map(|_| th.reserve(src, Some("iqn.x")))
            .collect();
        assert_eq!(got.len(), 10, "turns given");
        let within_1s = got
            .iter()
            .filter(|(at, _)| at.duration_since(now) < Duration::from_secs(1))
            .count();
        assert!(within_1s <= 7, "{within_1s} guesses within a second");
        let last = got.last().unwrap().0.duration_since(now);
        assert!(last >= Duration::from_secs(6), "{last:?}");
        for (_, a) in got {
            a.failed();
        }
        // The same name from another source queues behind them too: its
        // turn is over 10 s away, so it is refused now.
        let other: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(th.reserve(other, Some("iqn.x")).is_none());
        // Another source and name is not affected.
        let (at, a) = th.reserve(other, Some("iqn.y")).unwrap();
        assert!(at <= Instant::now());
        a.succeeded();
        // Attempts that neither passed nor failed do not count.
        let fresh: IpAddr = "127.0.0.7".parse().unwrap();
        for _ in 0..20 {
            let (at, a) = th.reserve(fresh, None).unwrap();
            assert!(at <= Instant::now());
            drop(a);
        }
    }
}
