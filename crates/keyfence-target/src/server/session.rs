//! The session table: TSIH assignment, the session limit, session
//! reinstatement, and a control channel into every session's task so that
//! one session's task management (LUN RESET, TARGET RESET, PREEMPT AND
//! ABORT) can reach the tasks of others.
//!
//! keyfence negotiates MaxConnections=1, so a session is exactly one
//! connection task; its state lives in that task, not here.

use std::collections::{HashMap, HashSet};

use std::net::SocketAddr;
use std::sync::Arc;

use keyfence_iscsi::SessionParams;
use keyfence_scsi::Nexus;
use tokio::sync::{mpsc, watch};

/// Identity of a session for reinstatement: initiator name (lowercase),
/// ISID and the target portal group it logged in through (the SSID is
/// ISID + TPGT, RFC 7143 section 4.4.1). `target` is `None` for discovery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SessionKey {
    pub initiator: String,
    pub isid: u64,
    pub target: Option<usize>,
    pub tpgt: u16,
}

/// A request another task makes of a session.
#[derive(Debug, Clone)]
pub(crate) enum SessionCtl {
    /// Drop the connection: reinstatement, TARGET COLD RESET, shutdown.
    Close,
    /// Abort, without response, every task addressed to `lun` (all LUNs
    /// when `None`), as a LUN RESET, TARGET WARM RESET, CLEAR TASK SET or
    /// PREEMPT AND ABORT from another I_T nexus requires.
    AbortTasks { lun: Option<u64> },
    /// The configuration was reloaded: take this session's target and
    /// LUN view from it (unit attentions for what changed, a logout
    /// request when the initiator lost access).
    Reconfigure(Arc<super::Live>),
}

impl PartialEq for SessionCtl {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (SessionCtl::Close, SessionCtl::Close) => true,
            (SessionCtl::AbortTasks { lun: a }, SessionCtl::AbortTasks { lun: b }) => a == b,
            (SessionCtl::Reconfigure(a), SessionCtl::Reconfigure(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// What `keyfence status` shows of a session.
#[derive(Debug, Clone)]
pub(crate) struct SessionInfo {
    /// The initiator name as it logged in.
    pub initiator: String,
    pub isid: u64,
    pub tsih: u16,
    pub tpgt: u16,
    /// The portal the connection was accepted on, and the initiator's end.
    pub local: Option<SocketAddr>,
    pub peer: SocketAddr,
    pub params: SessionParams,
    pub since: std::time::SystemTime,
    pub started: std::time::Instant,
}

#[derive(Debug)]
struct Entry {
    key: SessionKey,
    nexus: Option<Nexus>,
    info: Option<Arc<SessionInfo>>,
    ctl: mpsc::UnboundedSender<SessionCtl>,
    /// Closes (sender dropped) when the session's task has ended.
    gone: watch::Receiver<()>,
}

/// What the session task keeps: dropping it removes the session.
#[derive(Debug)]
pub(crate) struct SessionSlot {
    pub tsih: u16,
    pub ctl: mpsc::UnboundedReceiver<SessionCtl>,
    /// Held until the session task has finished cleaning up.
    pub alive: watch::Sender<()>,
}

/// A session that must end before a new one with the same key can start.
#[derive(Debug)]
pub(crate) struct Displaced {
    pub gone: watch::Receiver<()>,
}

impl Displaced {
    pub async fn wait(mut self) {
        while self.gone.changed().await.is_ok() {}
    }
}

/// Why a session could not be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdmitError {
    TooManySessions,
}

#[derive(Debug)]
pub(crate) struct SessionTable {
    max: usize,
    next_tsih: u16,
    sessions: HashMap<u16, Entry>,
    /// TSIHs handed to logins in progress.
    reserved: HashSet<u16>,
}

impl SessionTable {
    pub fn new(max: u32) -> Self {
        SessionTable {
            max: max as usize,
            next_tsih: 1,
            sessions: HashMap::new(),
            reserved: HashSet::new(),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Ask the session with `key`, if any, to close for reinstatement.
    pub fn displace(&mut self, key: &SessionKey) -> Option<Displaced> {
        let (&tsih, e) = self.sessions.iter().find(|(_, e)| &e.key == key)?;
        let _ = e.ctl.send(SessionCtl::Close);
        let gone = e.gone.clone();
        // It no longer counts as the session for this key.
        self.sessions.remove(&tsih);
        Some(Displaced { gone })
    }

    /// A TSIH for a login in progress: non-zero, not used by a session
    /// or another login. Give it back with [`Self::release`] if the login
    /// fails.
    pub fn reserve(&mut self) -> Option<u16> {
        let mut tsih = self.next_tsih;
        for _ in 0..=u16::MAX {
            if tsih != 0 && !self.sessions.contains_key(&tsih) && !self.reserved.contains(&tsih) {
                self.next_tsih = tsih.wrapping_add(1);
                self.reserved.insert(tsih);
                return Some(tsih);
            }
            tsih = tsih.wrapping_add(1);
        }
        None
    }

    pub fn release(&mut self, tsih: u16) {
        self.reserved.remove(&tsih);
    }

    /// The TSIHs of the logins in progress (reserved, not yet admitted).
    pub fn logins_in_progress(&self) -> HashSet<u16> {
        self.reserved.clone()
    }

    /// Admit a new session under its reserved TSIH.
    pub fn admit(
        &mut self,
        tsih: u16,
        key: SessionKey,
        nexus: Option<Nexus>,
        info: Option<SessionInfo>,
    ) -> Result<SessionSlot, AdmitError> {
        self.reserved.remove(&tsih);
        if self.sessions.len() >= self.max {
            return Err(AdmitError::TooManySessions);
        }
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (alive, gone) = watch::channel(());
        self.sessions.insert(
            tsih,
            Entry {
                key,
                nexus,
                info: info.map(Arc::new),
                ctl: ctl_tx,
                gone,
            },
        );
        Ok(SessionSlot {
            tsih,
            ctl: ctl_rx,
            alive,
        })
    }

    /// Remove the session `tsih` (when it is still the registered one).
    pub fn remove(&mut self, tsih: u16, alive: &watch::Sender<()>) {
        if let Some(e) = self.sessions.get(&tsih) {
            if e.gone.same_channel(&alive.subscribe()) {
                self.sessions.remove(&tsih);
            }
        }
    }

    /// The session limit (a reload may change it; sessions above a lowered
    /// limit stay, new ones wait until there is room).
    pub fn set_max(&mut self, max: u32) {
        self.max = max as usize;
    }

    /// Every session: its target (`None`: discovery) and what status shows.
    pub fn list(&self) -> Vec<(Option<usize>, Arc<SessionInfo>)> {
        let mut v: Vec<_> = self
            .sessions
            .values()
            .filter_map(|e| e.info.clone().map(|i| (e.key.target, i)))
            .collect();
        v.sort_by_key(|(_, i)| i.tsih);
        v
    }

    /// Send `ctl` to every session.
    pub fn broadcast(&self, ctl: &SessionCtl) {
        for e in self.sessions.values() {
            let _ = e.ctl.send(ctl.clone());
        }
    }

    /// Is a session of I_T nexus `nexus` registered other than the one
    /// whose task holds the sender of `alive`? (A session that reinstated
    /// that one after waiting for it in vain.)
    pub fn has_other_nexus(&self, nexus: &Nexus, alive: &watch::Receiver<()>) -> bool {
        self.sessions
            .values()
            .any(|e| e.nexus.as_ref() == Some(nexus) && !e.gone.same_channel(alive))
    }

    /// Send `ctl` to every normal session of `target`, except `skip`.
    pub fn broadcast_target(&self, target: usize, skip: Option<u16>, ctl: SessionCtl) {
        for (tsih, e) in &self.sessions {
            if e.key.target == Some(target) && Some(*tsih) != skip {
                let _ = e.ctl.send(ctl.clone());
            }
        }
    }

    /// Send `ctl` to the sessions whose I_T nexus is `nexus`, except `skip`.
    pub fn send_to_nexus(&self, nexus: &Nexus, skip: Option<u16>, ctl: SessionCtl) {
        for (tsih, e) in &self.sessions {
            if e.nexus.as_ref() == Some(nexus) && Some(*tsih) != skip {
                let _ = e.ctl.send(ctl.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(isid: u64) -> SessionKey {
        SessionKey {
            initiator: "iqn.2026-11.io.example:i".into(),
            isid,
            target: Some(0),
            tpgt: 1,
        }
    }

    #[test]
    fn tsih_is_unique_nonzero_and_limit_holds() {
        let mut t = SessionTable::new(2);
        let (ta, tb) = (t.reserve().unwrap(), t.reserve().unwrap());
        assert_ne!(ta, 0);
        assert_ne!(ta, tb, "reserved TSIHs differ");
        let a = t.admit(ta, key(1), None, None).unwrap();
        let _b = t.admit(tb, key(2), None, None).unwrap();
        let tc = t.reserve().unwrap();
        assert_eq!(
            t.admit(tc, key(3), None, None).unwrap_err(),
            AdmitError::TooManySessions
        );
        t.remove(a.tsih, &a.alive);
        assert_eq!(t.len(), 1);
        let tc = t.reserve().unwrap();
        assert!(t.admit(tc, key(3), None, None).is_ok());
    }

    #[tokio::test]
    async fn reinstatement_closes_the_old_session_and_waits_for_it() {
        let mut t = SessionTable::new(4);
        let tsih = t.reserve().unwrap();
        let mut old = t.admit(tsih, key(7), None, None).unwrap();
        let d = t.displace(&key(7)).expect("old session found");
        assert_eq!(old.ctl.recv().await, Some(SessionCtl::Close));
        assert_eq!(t.len(), 0);
        // The old task ends: its registration is dropped.
        let waiter = tokio::spawn(d.wait());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        t.remove(old.tsih, &old.alive);
        drop(old);
        waiter.await.unwrap();
        assert!(t.displace(&key(7)).is_none());
    }

    #[test]
    fn remove_ignores_a_reused_tsih() {
        let mut t = SessionTable::new(4);
        let tsih = t.reserve().unwrap();
        let a = t.admit(tsih, key(1), None, None).unwrap();
        let _d = t.displace(&key(1));
        t.next_tsih = a.tsih;
        let tsih = t.reserve().unwrap();
        let b = t.admit(tsih, key(1), None, None).unwrap();
        assert_eq!(a.tsih, b.tsih);
        t.remove(a.tsih, &a.alive);
        assert_eq!(t.len(), 1, "the new session with the reused TSIH stays");
    }
}
