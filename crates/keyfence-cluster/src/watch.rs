//! Following one LU's committed states in revision order.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};

use crate::keys::LuId;
use crate::record::{self, LuState};
use crate::{Cluster, Error};

/// What a [`LuWatch`] delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LuEvent {
    /// The next committed state, in revision order with nothing skipped
    /// since the previous event. A state whose `seq` did not grow is a
    /// rewrite without change (a seal after a lost answer) and carries no
    /// new unit attentions.
    Changed(LuState),
    /// The history since the last event is gone (compacted): this is a
    /// full read. Changes in between were missed; their unit attentions
    /// are in the state's log if it reaches back far enough
    /// ([`LuState::unit_attentions_after`]).
    Resync(LuState),
}

impl LuEvent {
    pub fn state(&self) -> &LuState {
        match self {
            LuEvent::Changed(s) | LuEvent::Resync(s) => s,
        }
    }
}

/// A resumable watch of one LU's state key. Reconnects after a stream
/// failure from the revision after the last one delivered, so a gateway
/// sees every change in order; falls back to a full read
/// ([`LuEvent::Resync`]) when etcd compacted that history away.
pub struct LuWatch {
    cluster: Cluster,
    lu: LuId,
    key: String,
    next_revision: i64,
    stream: Option<WatchStream>,
    pending: VecDeque<Result<LuEvent, Error>>,
}

impl std::fmt::Debug for LuWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuWatch")
            .field("lu", &self.lu)
            .field("next_revision", &self.next_revision)
            .finish()
    }
}

impl Cluster {
    /// Watch `lu` for changes after cluster revision `after` (typically
    /// the `read_at` of the read the caller started from).
    pub fn watch_lu(&self, lu: &LuId, after: i64) -> LuWatch {
        LuWatch {
            cluster: self.clone(),
            lu: lu.clone(),
            key: self.keys().state(lu),
            next_revision: after + 1,
            stream: None,
            pending: VecDeque::new(),
        }
    }
}

impl LuWatch {
    /// The revision the next event will be at or after.
    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    /// The next event. An error (etcd unavailable, a corrupt record)
    /// leaves the watch usable: the next call reconnects from where it
    /// stopped. Callers bound the wait with a timeout.
    pub async fn next(&mut self) -> Result<LuEvent, Error> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return ev;
            }
            if self.stream.is_none() {
                let options = WatchOptions::new()
                    .with_start_revision(self.next_revision)
                    .with_progress_notify();
                let key = self.key.clone();
                let stream = self
                    .cluster
                    .call("starting watch", |mut c| {
                        let (key, options) = (key.clone(), options.clone());
                        async move { c.watch(key, Some(options)).await }
                    })
                    .await?;
                tracing::debug!(lu = %self.lu, from = self.next_revision, "watch started");
                self.stream = Some(stream);
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.stream = None;
                    tracing::warn!(lu = %self.lu, "watch stream ended; reconnecting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    self.stream = None;
                    let e = Error::from(e);
                    tracing::warn!(lu = %self.lu, error = %e, "watch stream failed");
                    return Err(e);
                }
            };
            if msg.compact_revision() > 0 || (msg.canceled() && !msg.created()) {
                tracing::warn!(
                    lu = %self.lu, from = self.next_revision,
                    compacted = msg.compact_revision(), reason = msg.cancel_reason(),
                    "watch history gone; resynchronising with a full read"
                );
                self.stream = None;
                let state = self.cluster.read(&self.lu).await?;
                self.next_revision = state.read_at + 1;
                return Ok(LuEvent::Resync(state));
            }
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                self.next_revision = kv.mod_revision() + 1;
                let state = match ev.event_type() {
                    EventType::Delete => Ok(LuState::absent(kv.mod_revision())),
                    EventType::Put => record::decode(
                        self.lu.as_str(),
                        kv.value(),
                        kv.mod_revision(),
                        kv.mod_revision(),
                    )
                    .map_err(|reason| Error::Corrupt {
                        key: self.key.clone(),
                        reason,
                    }),
                };
                self.pending.push_back(state.map(LuEvent::Changed));
            }
        }
    }
}
