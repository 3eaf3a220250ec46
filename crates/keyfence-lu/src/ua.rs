//! Unit attention conditions, one queue per I_T nexus (SAM-5 5.14, SPC-4
//! 5.14), and the count of each nexus's commands that are past the
//! reservation check, which PREEMPT AND ABORT waits on.
//!
//! The table is read on every command, so lookups are lock free: the map
//! of nexuses lives behind an `ArcSwap` and is replaced (copy on write)
//! only when a nexus is first seen; each nexus has an atomic "pending"
//! flag checked before its queue mutex is touched.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use keyfence_scsi::sense::{asc, Asc};
use keyfence_scsi::{InitiatorPort, Nexus};

/// Most conditions kept per nexus; older ones beyond this are dropped
/// (SAM-5 allows a device server to lose the oldest when it runs out).
const QUEUE_MAX: usize = 16;
/// Nexuses remembered after they are gone, to report I_T NEXUS LOSS.
const LOST_MAX: usize = 4096;

/// The unit attention a new I_T nexus sees first: POWER ON, RESET, OR BUS
/// DEVICE RESET OCCURRED (29h/00h). SAM-5 has a new I_T nexus report a
/// power-on condition; SPC-4 lets a device server report any of the 29h
/// events with the generic 00h qualifier, and that is what tgt reports.
/// Initiator tools key on it: libiscsi's retry after a unit attention
/// recognises 29h/00h but not the specific POWER ON OCCURRED (29h/01h), so
/// `iscsi-ls -s` failed on its first TEST UNIT READY with 29h/01h.
pub const NEW_NEXUS_UA: Asc = asc::POWER_ON_RESET_OR_BUS_DEVICE_RESET;

#[derive(Debug, Default)]
pub(crate) struct NexusUa {
    pending: AtomicBool,
    queue: Mutex<VecDeque<Asc>>,
    /// false once the nexus was lost (kept to report the loss).
    active: AtomicBool,
    /// Commands of this nexus between the reservation check and the end
    /// of their medium access, by the parity of the drain epoch they
    /// entered in (see [`UnitAttentions::begin_drain`]). Only this
    /// nexus's commands touch it, so it is not a point of contention
    /// between sessions.
    inflight: [AtomicU32; 2],
}

/// A command of one nexus that has entered the reservation check; while it
/// lives, a PREEMPT AND ABORT naming this nexus that started draining
/// after it entered does not complete.
#[derive(Debug)]
pub(crate) struct Inflight(Arc<NexusUa>, usize);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.inflight[self.1].fetch_sub(1, Ordering::Release);
    }
}

impl NexusUa {
    /// Queue `code` unless it is pending already; true if queued.
    fn push(&self, code: Asc) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let new = !q.contains(&code);
        if new {
            if q.len() >= QUEUE_MAX {
                q.pop_front();
            }
            q.push_back(code);
        }
        self.pending.store(true, Ordering::Release);
        new
    }

    fn replace(&self, code: Asc) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.clear();
        q.push_back(code);
        self.pending.store(true, Ordering::Release);
    }

    /// Is a unit attention pending (without clearing it)?
    pub(crate) fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    pub(crate) fn take(&self) -> Option<Asc> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let c = q.pop_front();
        if q.is_empty() {
            self.pending.store(false, Ordering::Release);
        }
        c
    }
}

/// A drain begun by [`UnitAttentions::begin_drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain(usize);

/// Which nexuses a unit attention is queued for.
#[derive(Debug, Clone, Copy)]
pub enum UaScope<'a> {
    /// Exactly this I_T nexus.
    Nexus(&'a Nexus),
    /// Every I_T nexus of this initiator port (any target port).
    InitiatorPort(&'a InitiatorPort),
    /// Every I_T nexus except this one.
    AllExcept(&'a Nexus),
    /// Every I_T nexus.
    All,
}

/// The unit attention queues of one logical unit. Shared (`Arc`) with the
/// reservation engine, which queues RESERVATIONS PREEMPTED and the like.
#[derive(Debug, Default)]
pub struct UnitAttentions {
    map: ArcSwap<HashMap<Nexus, Arc<NexusUa>>>,
    writer: Mutex<()>,
    /// Drain epoch: commands count themselves in flight under its parity;
    /// [`UnitAttentions::begin_drain`] moves it on.
    epoch: AtomicU64,
    /// Conditions queued so far (for metrics).
    queued: AtomicU64,
}

impl UnitAttentions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of `nexus`, creating it with a power-on unit attention
    /// when the nexus is new to this LU (see [`NEW_NEXUS_UA`]).
    pub(crate) fn entry(&self, nexus: &Nexus) -> Arc<NexusUa> {
        if let Some(e) = self.map.load().get(nexus) {
            if !e.active.load(Ordering::Acquire) {
                e.active.store(true, Ordering::Release);
            }
            return e.clone();
        }
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.map.load_full();
        if let Some(e) = cur.get(nexus) {
            e.active.store(true, Ordering::Release);
            return e.clone();
        }
        let mut next: HashMap<Nexus, Arc<NexusUa>> = (*cur).clone();
        if next.len() >= LOST_MAX {
            next.retain(|_, e| e.active.load(Ordering::Acquire));
        }
        let e = Arc::new(NexusUa::default());
        e.active.store(true, Ordering::Release);
        e.push(NEW_NEXUS_UA);
        self.queued.fetch_add(1, Ordering::Relaxed);
        next.insert(nexus.clone(), e.clone());
        self.map.store(Arc::new(next));
        e
    }

    /// Take (clear) the oldest unit attention pending for `nexus`. A nexus
    /// never seen before has [`NEW_NEXUS_UA`] pending.
    pub fn take(&self, nexus: &Nexus) -> Option<Asc> {
        self.entry(nexus).take()
    }

    /// Is a unit attention pending for `nexus` (without clearing it)?
    pub fn peek(&self, nexus: &Nexus) -> Option<Asc> {
        let e = self.entry(nexus);
        if !e.pending.load(Ordering::Acquire) {
            return None;
        }
        let q = e.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.front().copied()
    }

    /// Queue `code` for the nexuses in `scope`. Nexuses this LU has not
    /// seen yet get [`NEW_NEXUS_UA`] when they appear, which supersedes.
    pub fn queue(&self, scope: UaScope<'_>, code: Asc) {
        if let UaScope::Nexus(n) = scope {
            if self.entry(n).push(code) {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let map = self.map.load();
        for (n, e) in map.iter() {
            let hit = match scope {
                UaScope::Nexus(_) => unreachable!("handled above"),
                UaScope::InitiatorPort(i) => &n.initiator == i,
                UaScope::AllExcept(x) => n != x,
                UaScope::All => true,
            };
            if hit && e.push(code) {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The nexus is gone: on its return it reports I_T NEXUS LOSS OCCURRED
    /// instead of anything queued before.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        if let Some(e) = self.map.load().get(nexus) {
            e.active.store(false, Ordering::Release);
            e.replace(asc::I_T_NEXUS_LOSS_OCCURRED);
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Mark a command of `e`'s nexus in flight before it is checked
    /// against the reservation. The fences pair with the ones in
    /// [`UnitAttentions::begin_drain`] and [`UnitAttentions::wait_drained`]:
    /// either a drain begun after the state was published waits for this
    /// command, or this command sees the new reservation.
    pub(crate) fn enter(&self, e: &Arc<NexusUa>) -> Inflight {
        let slot = (self.epoch.load(Ordering::SeqCst) & 1) as usize;
        e.inflight[slot].fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Inflight(e.clone(), slot)
    }

    /// Start a drain after publishing a new reservation state: commands
    /// entering from now on are counted apart from those already in
    /// flight, which may have been checked against the old state. Returns
    /// the token for [`UnitAttentions::wait_drained`]. Drains must not
    /// overlap (the caller serialises them): the next one reuses the
    /// other counter.
    pub fn begin_drain(&self) -> Drain {
        fence(Ordering::SeqCst);
        let old = self.epoch.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Drain((old & 1) as usize)
    }

    /// Wait until no command of `nexuses` counted before `drain` began is
    /// still running (they finish their medium access or fail; commands
    /// entering after it see the state published before it and are not
    /// waited for, however many the nexus keeps sending). Called by
    /// PREEMPT AND ABORT after publishing, so that no write of a preempted
    /// nexus lands after the command completes. Returns false if `limit`
    /// passed first.
    pub fn wait_drained(&self, drain: Drain, nexuses: &[Nexus], limit: Duration) -> bool {
        fence(Ordering::SeqCst);
        let start = Instant::now();
        let map = self.map.load();
        for n in nexuses {
            let Some(e) = map.get(n) else { continue };
            let mut spins = 0u32;
            while e.inflight[drain.0].load(Ordering::SeqCst) != 0 {
                if start.elapsed() > limit {
                    return false;
                }
                spins += 1;
                if spins < 64 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        true
    }

    /// The I_T nexuses this LU has seen (active or lost); the PR engine
    /// takes them as the initiator ports known to the device server.
    pub fn known_nexuses(&self) -> Vec<Nexus> {
        self.map.load().keys().cloned().collect()
    }

    /// A reset: every nexus's queue is replaced by `code`.
    pub fn reset_all(&self, code: Asc) {
        for e in self.map.load().values() {
            e.replace(code);
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Unit attention conditions queued since the LU was created (one
    /// per nexus they were queued for; a condition already pending for a
    /// nexus is not counted again).
    pub fn queued_total(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfence_scsi::TargetPort;

    fn nexus(i: &str, isid: u64) -> Nexus {
        Nexus::new(
            InitiatorPort::new(i, isid),
            TargetPort::new("iqn.2026-11.io.keyfence:t", 1, 1),
        )
    }

    #[test]
    fn new_nexus_reports_power_on_once() {
        let ua = UnitAttentions::new();
        let a = nexus("iqn.a", 1);
        // 29h/00h, not 29h/01h: libiscsi's tools retry only on the former.
        assert_eq!(ua.take(&a), Some(Asc(0x29, 0x00)));
        assert_eq!(ua.take(&a), None);
        // A second nexus of the same initiator is new too.
        let a2 = nexus("iqn.a", 2);
        assert_eq!(ua.peek(&a2), Some(Asc(0x29, 0x00)));
    }

    #[test]
    fn scopes_and_dedup() {
        let ua = UnitAttentions::new();
        let a = nexus("iqn.a", 1);
        let b = nexus("iqn.b", 1);
        let a2 = nexus("iqn.a", 2);
        // The same initiator port through another target port.
        let a_t2 = Nexus::new(
            a.initiator.clone(),
            TargetPort::new("iqn.2026-11.io.keyfence:t", 2, 2),
        );
        for n in [&a, &b, &a2, &a_t2] {
            ua.take(n);
        }
        ua.queue(UaScope::AllExcept(&a), asc::MODE_PARAMETERS_CHANGED);
        ua.queue(UaScope::AllExcept(&a), asc::MODE_PARAMETERS_CHANGED);
        ua.queue(
            UaScope::InitiatorPort(&a.initiator),
            asc::RESERVATIONS_PREEMPTED,
        );
        assert_eq!(ua.take(&a), Some(asc::RESERVATIONS_PREEMPTED));
        assert_eq!(ua.take(&a), None);
        assert_eq!(ua.take(&b), Some(asc::MODE_PARAMETERS_CHANGED));
        assert_eq!(ua.take(&b), None);
        assert_eq!(ua.peek(&a2), Some(asc::MODE_PARAMETERS_CHANGED));
        assert_eq!(ua.take(&a2), Some(asc::MODE_PARAMETERS_CHANGED));
        assert_eq!(ua.take(&a2), None);
        assert_eq!(ua.take(&a_t2), Some(asc::MODE_PARAMETERS_CHANGED));
        assert_eq!(ua.take(&a_t2), Some(asc::RESERVATIONS_PREEMPTED));
        ua.nexus_lost(&b);
        assert_eq!(ua.take(&b), Some(asc::I_T_NEXUS_LOSS_OCCURRED));
        ua.reset_all(asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
        assert_eq!(ua.take(&a), Some(asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED));
        assert_eq!(ua.take(&a), None);
    }
}
