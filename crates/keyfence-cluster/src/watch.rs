//! Following one LU's committed states in revision order.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};

use crate::gateway::{GatewayEntry, GatewayRecord};
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

/// What a [`GatewayWatch`] delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// A gateway registered (a new incarnation: new lease).
    Joined(GatewayEntry),
    /// A gateway's registration is gone at `revision`: its lease expired
    /// or was revoked, so it stopped serving. Survivors commit the
    /// nexus-loss effects for its portal groups (docs/cluster.md).
    Left { name: String, revision: i64 },
    /// History was compacted: the full list of registered gateways now.
    Resync {
        gateways: Vec<GatewayEntry>,
        read_at: i64,
    },
}

/// A resumable watch of `gateways/`, like [`LuWatch`] for one LU.
pub struct GatewayWatch {
    cluster: Cluster,
    prefix: String,
    next_revision: i64,
    stream: Option<WatchStream>,
    pending: VecDeque<Result<GatewayEvent, Error>>,
}

impl std::fmt::Debug for GatewayWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayWatch")
            .field("next_revision", &self.next_revision)
            .finish()
    }
}

impl Cluster {
    /// Watch gateway registrations after cluster revision `after`.
    pub fn watch_gateways(&self, after: i64) -> GatewayWatch {
        GatewayWatch {
            cluster: self.clone(),
            prefix: self.keys().gateways(),
            next_revision: after + 1,
            stream: None,
            pending: VecDeque::new(),
        }
    }
}

impl GatewayWatch {
    /// The next membership event; errors leave the watch usable.
    pub async fn next(&mut self) -> Result<GatewayEvent, Error> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return ev;
            }
            if self.stream.is_none() {
                let options = WatchOptions::new()
                    .with_start_revision(self.next_revision)
                    .with_prefix()
                    .with_progress_notify();
                let prefix = self.prefix.clone();
                let stream = self
                    .cluster
                    .call("starting gateway watch", |mut c| {
                        let (prefix, options) = (prefix.clone(), options.clone());
                        async move { c.watch(prefix, Some(options)).await }
                    })
                    .await?;
                self.stream = Some(stream);
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.stream = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    self.stream = None;
                    return Err(Error::from(e));
                }
            };
            if msg.compact_revision() > 0 || (msg.canceled() && !msg.created()) {
                self.stream = None;
                let (gateways, read_at) = self.cluster.gateways_at().await?;
                self.next_revision = read_at + 1;
                return Ok(GatewayEvent::Resync { gateways, read_at });
            }
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                self.next_revision = kv.mod_revision() + 1;
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let name = key.strip_prefix(&self.prefix).unwrap_or(&key).to_owned();
                let item = match ev.event_type() {
                    EventType::Delete => Ok(GatewayEvent::Left {
                        name,
                        revision: kv.mod_revision(),
                    }),
                    EventType::Put => serde_json::from_slice::<GatewayRecord>(kv.value())
                        .map(|record| {
                            GatewayEvent::Joined(GatewayEntry {
                                record,
                                lease: kv.lease(),
                                create_revision: kv.create_revision(),
                            })
                        })
                        .map_err(|e| Error::Corrupt {
                            key,
                            reason: e.to_string(),
                        }),
                };
                self.pending.push_back(item);
            }
        }
    }
}
