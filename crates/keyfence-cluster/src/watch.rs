//! Following one LU's committed states in revision order, and gateways
//! joining and leaving, with the resumable watch these and the COMPARE
//! AND WRITE range's watch (range.rs) share.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchOptions, WatchStream};

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
#[derive(Debug)]
pub struct LuWatch(Resumable<LuStateKey>);

/// The subject of a [`LuWatch`].
#[derive(Debug)]
struct LuStateKey {
    lu: LuId,
    key: String,
}

impl Subject for LuStateKey {
    type Event = LuEvent;
    const WHAT: &'static str = "PR state watch";

    fn key(&self) -> &str {
        &self.key
    }

    fn event(&self, event_type: EventType, kv: &KeyValue) -> Result<LuEvent, Error> {
        let state = match event_type {
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
        state.map(LuEvent::Changed)
    }

    async fn resync(&self, cluster: &Cluster) -> Result<(LuEvent, i64), Error> {
        let state = cluster.read(&self.lu).await?;
        let at = state.read_at;
        Ok((LuEvent::Resync(state), at))
    }
}

impl Cluster {
    /// Watch `lu` for changes after cluster revision `after` (typically
    /// the `read_at` of the read the caller started from).
    pub fn watch_lu(&self, lu: &LuId, after: i64) -> LuWatch {
        let subject = LuStateKey {
            lu: lu.clone(),
            key: self.keys().state(lu),
        };
        LuWatch(Resumable::new(self, subject, after))
    }
}

impl LuWatch {
    /// The revision the next event will be at or after.
    pub fn next_revision(&self) -> i64 {
        self.0.next_revision()
    }

    /// The next event. An error (etcd unavailable, a corrupt record)
    /// leaves the watch usable: the next call reconnects from where it
    /// stopped. Callers bound the wait with a timeout.
    pub async fn next(&mut self) -> Result<LuEvent, Error> {
        self.0.next().await
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
#[derive(Debug)]
pub struct GatewayWatch(Resumable<GatewayKeys>);

/// The subject of a [`GatewayWatch`].
#[derive(Debug)]
struct GatewayKeys {
    prefix: String,
}

impl Subject for GatewayKeys {
    type Event = GatewayEvent;
    const WHAT: &'static str = "gateway watch";
    const PREFIX: bool = true;

    fn key(&self) -> &str {
        &self.prefix
    }

    fn event(&self, event_type: EventType, kv: &KeyValue) -> Result<GatewayEvent, Error> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let name = key.strip_prefix(&self.prefix).unwrap_or(&key).to_owned();
        match event_type {
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
        }
    }

    async fn resync(&self, cluster: &Cluster) -> Result<(GatewayEvent, i64), Error> {
        let (gateways, read_at) = cluster.gateways_at().await?;
        Ok((GatewayEvent::Resync { gateways, read_at }, read_at))
    }
}

impl Cluster {
    /// Watch gateway registrations after cluster revision `after`.
    pub fn watch_gateways(&self, after: i64) -> GatewayWatch {
        let subject = GatewayKeys {
            prefix: self.keys().gateways(),
        };
        GatewayWatch(Resumable::new(self, subject, after))
    }
}

impl GatewayWatch {
    /// The next membership event; errors leave the watch usable.
    pub async fn next(&mut self) -> Result<GatewayEvent, Error> {
        self.0.next().await
    }
}

impl Cluster {
    /// Watch `key` from revision `from` until it is deleted (`true`), or
    /// until the watch ends without that: cancelled, history compacted,
    /// stream closed or failed (`false`: read the key again and decide).
    /// Unbounded: the caller bounds it.
    pub(crate) async fn watch_until_deleted(
        &self,
        what: &str,
        key: Vec<u8>,
        from: i64,
    ) -> Result<bool, Error> {
        let options = WatchOptions::new().with_start_revision(from);
        let mut stream = self
            .call(what, |mut c| {
                let (k, o) = (key.clone(), options.clone());
                async move { c.watch(k, Some(o)).await }
            })
            .await?;
        loop {
            match stream.message().await {
                Ok(Some(m)) if !m.canceled() && m.compact_revision() == 0 => {
                    if m.events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        return Ok(true);
                    }
                }
                _ => return Ok(false),
            }
        }
    }
}

/// A key (or every key under a prefix) followed by a [`Resumable`]
/// watch: what its changes, and a full read of it, deliver.
pub(crate) trait Subject {
    /// What the watch delivers.
    type Event;
    /// The watch, for logs and errors.
    const WHAT: &'static str;
    /// Whether [`Subject::key`] is a prefix to watch every key under.
    const PREFIX: bool = false;

    fn key(&self) -> &str;

    /// What a put or delete of `kv` (at its mod revision) delivers.
    fn event(&self, event_type: EventType, kv: &KeyValue) -> Result<Self::Event, Error>;

    /// The history since the last event is gone: what a full read
    /// delivers instead, and the revision it was read at.
    fn resync(
        &self,
        cluster: &Cluster,
    ) -> impl std::future::Future<Output = Result<(Self::Event, i64), Error>> + Send;
}

/// A watch that resumes where it stopped: after a stream failure it
/// watches again from the revision after the last event delivered (so
/// nothing is skipped or repeated), and when etcd compacted that history
/// away or cancelled the watch it delivers a full read
/// ([`Subject::resync`]) and goes on from there.
pub(crate) struct Resumable<S: Subject> {
    cluster: Cluster,
    subject: S,
    next_revision: i64,
    stream: Option<WatchStream>,
    pending: VecDeque<Result<S::Event, Error>>,
}

impl<S: Subject + std::fmt::Debug> std::fmt::Debug for Resumable<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resumable")
            .field("subject", &self.subject)
            .field("next_revision", &self.next_revision)
            .finish()
    }
}

impl<S: Subject> Resumable<S> {
    /// Follow `subject` after cluster revision `after`.
    pub(crate) fn new(cluster: &Cluster, subject: S, after: i64) -> Self {
        Resumable {
            cluster: cluster.clone(),
            subject,
            next_revision: after + 1,
            stream: None,
            pending: VecDeque::new(),
        }
    }

    pub(crate) fn next_revision(&self) -> i64 {
        self.next_revision
    }

    /// The next event. An error (etcd unavailable, a stream failure, an
    /// undecodable value) leaves the watch usable: the next call goes on
    /// from where it stopped.
    pub(crate) async fn next(&mut self) -> Result<S::Event, Error> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return ev;
            }
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => {
                    let mut options = WatchOptions::new()
                        .with_start_revision(self.next_revision)
                        .with_progress_notify();
                    if S::PREFIX {
                        options = options.with_prefix();
                    }
                    let key = self.subject.key().to_owned();
                    let stream = self
                        .cluster
                        .call(&format!("starting the {}", S::WHAT), |mut c| {
                            let (key, options) = (key.clone(), options.clone());
                            async move { c.watch(key, Some(options)).await }
                        })
                        .await?;
                    tracing::debug!(
                        watch = S::WHAT,
                        key = self.subject.key(),
                        from = self.next_revision,
                        "watch started"
                    );
                    self.stream.insert(stream)
                }
            };
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.stream = None;
                    tracing::warn!(
                        watch = S::WHAT,
                        key = self.subject.key(),
                        "watch stream ended; reconnecting"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    self.stream = None;
                    let e = Error::from(e);
                    tracing::warn!(watch = S::WHAT, key = self.subject.key(), error = %e, "watch stream failed");
                    return Err(e);
                }
            };
            if msg.compact_revision() > 0 || (msg.canceled() && !msg.created()) {
                tracing::warn!(
                    watch = S::WHAT,
                    key = self.subject.key(),
                    from = self.next_revision,
                    compacted = msg.compact_revision(),
                    reason = msg.cancel_reason(),
                    "watch history gone; resynchronising with a full read"
                );
                self.stream = None;
                let (event, at) = self.subject.resync(&self.cluster).await?;
                self.next_revision = at + 1;
                return Ok(event);
            }
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                self.next_revision = kv.mod_revision() + 1;
                self.pending
                    .push_back(self.subject.event(ev.event_type(), kv));
            }
        }
    }
}
