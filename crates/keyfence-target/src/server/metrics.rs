//! What the server counts, for `GET /metrics` (see [`super::metrics_http`]).
//!
//! The I/O path touches only atomics it reached without a lookup: each
//! logical unit gets its [`LuStats`] when it is opened (at start or by a
//! reload), the session finds it next to the LU it already looks up, and the latency
//! histograms are plain arrays of atomic bucket counters ([`Latency`]),
//! because `prometheus_client`'s `Histogram` takes a mutex on every
//! observation. Rarer events (logins, task management, PR OUT, refusals
//! under hostile load) go through the crate's labelled families, whose
//! lookup takes a read lock; none of them is on the read/write path.
//!
//! Everything is encoded by `prometheus_client` in the Prometheus text
//! format (0.0.4); the per-LU families come from a [`Collector`] that
//! reads the atomics at scrape time, of the LUs served at that moment
//! ([`Metrics::set_lus`] after each reload).
//!
//! Per-LU counting is done only when something reads it
//! ([`Metrics::counts_lus`]: a metrics endpoint is configured). Without
//! one the I/O path neither reads the clock nor touches a counter. With
//! one, a READ or WRITE costs one clock read (at its status; its arrival
//! is the time the connection already took for the socket read that
//! brought it) and three relaxed atomic additions (bytes, bucket, sum).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use keyfence_lu::UnitAttentions;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds (seconds) of the command latency buckets. Reads served
/// from the page cache finish in tens of microseconds.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The same bounds in nanoseconds, for the comparison on the I/O path.
const LATENCY_BUCKETS_NS: [u64; 18] = {
    let mut out = [0u64; 18];
    let mut i = 0;
    while i < 18 {
        // 10 µs .. 10 s are whole numbers of nanoseconds.
        out[i] = (LATENCY_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// A latency histogram without locks: one atomic counter per bucket (the
/// last one counts what is above every bound) and the sum in
/// nanoseconds. A scrape reads the counters one by one, so it may see an
/// observation in a bucket and not yet in the sum; Prometheus tolerates
/// that, and the next scrape is consistent again.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; 19],
    sum_ns: AtomicU64,
}

impl Latency {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_NS.partition_point(|b| *b < ns);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Observations so far (the sum of the bucket counters).
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets = Vec::with_capacity(19);
        let mut count = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Relaxed);
            count += n;
            buckets.push((LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

/// The counters of one logical unit, resolved once when the LU is built.
/// Every READ and WRITE counted is observed in its latency histogram,
/// so the histograms' counts are the numbers of READs and WRITEs (one
/// atomic addition per command fewer than a counter of their own).
#[derive(Debug, Default)]
pub struct LuStats {
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub read_latency: Latency,
    pub write_latency: Latency,
    pub reservation_conflicts: AtomicU64,
}

/// Which family a finished command is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmdKind {
    Read,
    Write,
    /// PERSISTENT RESERVE OUT with this service action.
    PrOut(u8),
    Other,
}

impl CmdKind {
    pub fn of(cdb: &[u8]) -> CmdKind {
        match cdb.first() {
            // READ (6), (10), (12), (16)
            Some(0x08 | 0x28 | 0xa8 | 0x88) => CmdKind::Read,
            // WRITE (6), (10), (12), (16); WRITE AND VERIFY (10), (12), (16)
            Some(0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e) => CmdKind::Write,
            Some(0x5f) => CmdKind::PrOut(cdb.get(1).map_or(0xff, |b| b & 0x1f)),
            _ => CmdKind::Other,
        }
    }
}

/// The `service_action` label of a PR OUT command.
pub(crate) fn pr_out_action_label(sa: u8) -> &'static str {
    match sa {
        0x00 => "register",
        0x01 => "reserve",
        0x02 => "release",
        0x03 => "clear",
        0x04 => "preempt",
        0x05 => "preempt_and_abort",
        0x06 => "register_and_ignore_existing_key",
        0x07 => "register_and_move",
        0x08 => "replace_lost_reservation",
        _ => "other",
    }
}

/// How a login ended (`result` label of `keyfence_logins_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoginResult {
    Success,
    ChapFailure,
    /// Refused without checking: too many failed CHAP attempts.
    ChapThrottled,
    AclRefused,
    TargetNotFound,
    /// Session, connection or TSIH limits.
    OutOfResources,
    Other,
}

impl LoginResult {
    const ALL: [LoginResult; 7] = [
        LoginResult::Success,
        LoginResult::ChapFailure,
        LoginResult::ChapThrottled,
        LoginResult::AclRefused,
        LoginResult::TargetNotFound,
        LoginResult::OutOfResources,
        LoginResult::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            LoginResult::Success => "success",
            LoginResult::ChapFailure => "chap_failure",
            LoginResult::ChapThrottled => "chap_throttled",
            LoginResult::AclRefused => "acl_refused",
            LoginResult::TargetNotFound => "target_not_found",
            LoginResult::OutOfResources => "out_of_resources",
            LoginResult::Other => "other",
        }
    }
}

/// Why a connection was refused or dropped before its login completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its source already held its share of login slots.
    PerSource,
    /// Every login slot was busy with a login in progress.
    LoginSlotsFull,
    /// `max_connections` logged-in connections (at the end of its login).
    MaxConnections,
}

impl Refusal {
    const ALL: [Refusal; 3] = [
        Refusal::PerSource,
        Refusal::LoginSlotsFull,
        Refusal::MaxConnections,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::PerSource => "per_source",
            Refusal::LoginSlotsFull => "login_slots_full",
            Refusal::MaxConnections => "max_connections",
        }
    }
}

/// Why a connection that never logged in was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdleDrop {
    FirstPduTimeout,
    Displaced,
}

/// Why a session's command window closed (it stops taking new commands
/// until output drains or writes complete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowClosed {
    ReadBudget,
    WriteBudget,
}

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type PrOutLabels = [(&'static str, String); 4];

/// One logical unit as the collector exports it.
#[derive(Debug)]
struct LuEntry {
    target: String,
    lun: String,
    stats: Arc<LuStats>,
    ua: Arc<UnitAttentions>,
}

/// The per-LU families, read from the atomics at each scrape: of the
/// LUs [`Metrics::set_lus`] last published.
#[derive(Debug)]
struct LuCollector {
    lus: Arc<ArcSwap<Vec<LuEntry>>>,
}

impl LuCollector {
    fn counter(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&LuEntry) -> u64,
    ) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for e in self.lus.load().iter() {
            let labels = [("target", e.target.as_str()), ("lun", e.lun.as_str())];
            ConstCounter::new(value(e)).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn histogram(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&LuEntry) -> &Latency,
    ) -> Result<(), std::fmt::Error> {
        let mut m =
            encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for e in self.lus.load().iter() {
            let labels = [("target", e.target.as_str()), ("lun", e.lun.as_str())];
            let (sum, count, buckets) = value(e).snapshot();
            m.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?;
        }
        Ok(())
    }
}

impl Collector for LuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        self.counter(
            e,
            "keyfence_lu_reads",
            "READ commands completed, by logical unit.",
            None,
            |l| l.stats.read_latency.count(),
        )?;
        self.counter(
            e,
            "keyfence_lu_read",
            "Bytes sent to initiators by READ commands.",
            Some(&Unit::Bytes),
            |l| l.stats.read_bytes.load(Relaxed),
        )?;
        self.counter(
            e,
            "keyfence_lu_writes",
            "WRITE and WRITE AND VERIFY commands completed, by logical unit.",
            None,
            |l| l.stats.write_latency.count(),
        )?;
        self.counter(
            e,
            "keyfence_lu_write",
            "Bytes written by WRITE commands that completed with GOOD status.",
            Some(&Unit::Bytes),
            |l| l.stats.write_bytes.load(Relaxed),
        )?;
        self.histogram(
            e,
            "keyfence_lu_read_latency",
            "Time from a READ command's arrival to its status being queued for the initiator.",
            |l| &l.stats.read_latency,
        )?;
        self.histogram(
            e,
            "keyfence_lu_write_latency",
            "Time from a WRITE command's arrival (before its Data-Out) to its status being queued.",
            |l| &l.stats.write_latency,
        )?;
        self.counter(
            e,
            "keyfence_lu_reservation_conflicts",
            "Commands that ended with RESERVATION CONFLICT status.",
            None,
            |l| l.stats.reservation_conflicts.load(Relaxed),
        )?;
        self.counter(
            e,
            "keyfence_lu_unit_attentions_queued",
            "Unit attention conditions queued for I_T nexuses of the logical unit.",
            None,
            |l| l.ua.queued_total(),
        )?;
        Ok(())
    }
}

/// Every metric of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The LUs the per-LU families list.
    lus: Arc<ArcSwap<Vec<LuEntry>>>,
    /// Whether the I/O path counts per LU (see the module doc).
    count_lus: std::sync::atomic::AtomicBool,
    pub(crate) sessions_normal: Gauge,
    pub(crate) sessions_discovery: Gauge,
    pub(crate) connections: Gauge,
    logins: Family<Labels1, Counter>,
    pr_out: Family<PrOutLabels, Counter>,
    tmf: Family<Labels2, Counter>,
    refused: Family<Labels1, Counter>,
    idle_dropped: Family<Labels1, Counter>,
    windows_closed: Family<Labels1, Counter>,
    pub(crate) task_set_full: Counter,
    pub(crate) data_out_timeouts: Counter,
    pub(crate) nop_timeouts: Counter,
}

/// A logical unit handed to [`Metrics::new`].
pub(crate) struct LuSource<'a> {
    pub target: &'a str,
    pub lun: u64,
    pub stats: Arc<LuStats>,
    pub ua: Arc<UnitAttentions>,
}

impl Metrics {
    /// The metrics of a server; `count_lus`: whether the I/O path counts
    /// per LU. Its LUs are published by [`Metrics::set_lus`].
    pub(crate) fn new(count_lus: bool) -> Metrics {
        let mut r = Registry::default();
        let sessions = Family::<Labels1, Gauge>::default();
        let sessions_normal = sessions.get_or_create(&[("kind", "normal")]).clone();
        let sessions_discovery = sessions.get_or_create(&[("kind", "discovery")]).clone();
        r.register(
            "keyfence_sessions",
            "iSCSI sessions in full feature phase",
            sessions,
        );
        let connections = Gauge::default();
        r.register(
            "keyfence_connections",
            "Open iSCSI TCP connections, logging in or logged in",
            connections.clone(),
        );
        let logins = Family::<Labels1, Counter>::default();
        for l in LoginResult::ALL {
            let _ = logins.get_or_create(&[("result", l.label())]);
        }
        r.register(
            "keyfence_logins",
            "Completed login attempts, by result",
            logins.clone(),
        );
        let pr_out = Family::<PrOutLabels, Counter>::default();
        r.register(
            "keyfence_pr_out",
            "PERSISTENT RESERVE OUT commands, by logical unit, service action and status",
            pr_out.clone(),
        );
        let tmf = Family::<Labels2, Counter>::default();
        r.register(
            "keyfence_task_management",
            "Task management functions answered, by function and response",
            tmf.clone(),
        );
        let refused = Family::<Labels1, Counter>::default();
        for x in Refusal::ALL {
            let _ = refused.get_or_create(&[("reason", x.label())]);
        }
        r.register(
            "keyfence_connections_refused",
            "Connections refused by admission control, by reason",
            refused.clone(),
        );
        let idle_dropped = Family::<Labels1, Counter>::default();
        for x in [IdleDrop::FirstPduTimeout, IdleDrop::Displaced] {
            let _ = idle_dropped.get_or_create(&[("reason", idle_label(x))]);
        }
        r.register(
            "keyfence_connections_dropped_before_login",
            "Connections dropped before sending a login request, by reason",
            idle_dropped.clone(),
        );
        let windows_closed = Family::<Labels1, Counter>::default();
        for x in [WindowClosed::ReadBudget, WindowClosed::WriteBudget] {
            let _ = windows_closed.get_or_create(&[("reason", window_label(x))]);
        }
        r.register(
            "keyfence_cmdsn_window_closed",
            "Times a session's command window closed because it reached its data-in or write budget",
            windows_closed.clone(),
        );
        let task_set_full = Counter::default();
        r.register(
            "keyfence_write_budget_refusals",
            "Commands answered TASK SET FULL because the session's or server's write budget was full",
            task_set_full.clone(),
        );
        let data_out_timeouts = Counter::default();
        r.register(
            "keyfence_data_out_timeouts",
            "Connections closed because a write command's Data-Out did not arrive in time",
            data_out_timeouts.clone(),
        );
        let nop_timeouts = Counter::default();
        r.register(
            "keyfence_nop_timeouts",
            "Connections closed because a NOP-In ping was not answered in time",
            nop_timeouts.clone(),
        );
        let lus = Arc::new(ArcSwap::from_pointee(Vec::new()));
        r.register_collector(Box::new(LuCollector { lus: lus.clone() }));
        Metrics {
            registry: r,
            lus,
            count_lus: std::sync::atomic::AtomicBool::new(count_lus),
            sessions_normal,
            sessions_discovery,
            connections,
            logins,
            pr_out,
            tmf,
            refused,
            idle_dropped,
            windows_closed,
            task_set_full,
            data_out_timeouts,
            nop_timeouts,
        }
    }

    /// Does the I/O path count per LU (a metrics endpoint is
    /// configured)? A reload that adds or removes the endpoint changes it
    /// ([`Metrics::set_counts_lus`]).
    pub(crate) fn counts_lus(&self) -> bool {
        self.count_lus.load(Relaxed)
    }

    /// Count per LU from now on (the LUs' [`LuStats`] are handed to the
    /// sessions with the configuration, which decides what is counted).
    pub(crate) fn set_counts_lus(&self, on: bool) {
        self.count_lus.store(on, Relaxed);
    }

    /// The LUs the per-LU families list from now on (at start and after
    /// every reload): scrapes show added LUs and no longer show removed
    /// ones.
    pub(crate) fn set_lus<'a>(&self, lus: impl IntoIterator<Item = LuSource<'a>>) {
        let lus = lus
            .into_iter()
            .map(|l| LuEntry {
                target: l.target.to_string(),
                lun: l.lun.to_string(),
                stats: l.stats,
                ua: l.ua,
            })
            .collect();
        self.lus.store(Arc::new(lus));
    }

    /// Everything in the Prometheus text exposition format (0.0.4).
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(8192);
        // Writing into a String cannot fail; an encoder error would be a
        // bug in a metric, and the scrape gets what was written.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut s, &self.registry);
        s
    }

    pub(crate) fn login(&self, r: LoginResult) {
        self.logins.get_or_create(&[("result", r.label())]).inc();
    }

    pub(crate) fn refused(&self, r: Refusal) {
        self.refused.get_or_create(&[("reason", r.label())]).inc();
    }

    pub(crate) fn idle_dropped(&self, r: IdleDrop) {
        self.idle_dropped
            .get_or_create(&[("reason", idle_label(r))])
            .inc();
    }

    pub(crate) fn window_closed(&self, r: WindowClosed) {
        self.windows_closed
            .get_or_create(&[("reason", window_label(r))])
            .inc();
    }

    pub(crate) fn pr_out(&self, target: &str, lun: u64, sa: u8, status: &'static str) {
        self.pr_out
            .get_or_create(&[
                ("target", target.to_string()),
                ("lun", lun.to_string()),
                ("service_action", pr_out_action_label(sa).to_string()),
                ("result", status.to_string()),
            ])
            .inc();
    }

    pub(crate) fn tmf(&self, function: &'static str, response: &'static str) {
        self.tmf
            .get_or_create(&[("function", function), ("response", response)])
            .inc();
    }
}

fn idle_label(r: IdleDrop) -> &'static str {
    match r {
        IdleDrop::FirstPduTimeout => "first_pdu_timeout",
        IdleDrop::Displaced => "displaced",
    }
}

fn window_label(r: WindowClosed) -> &'static str {
    match r {
        WindowClosed::ReadBudget => "read_budget",
        WindowClosed::WriteBudget => "write_budget",
    }
}

/// Holds a gauge up by one for its lifetime.
#[derive(Debug)]
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(g: &Gauge) -> GaugeGuard {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_inclusive_upper_bounds() {
        let l = Latency::default();
        l.observe(Duration::from_micros(50));
        l.observe(Duration::from_micros(51));
        l.observe(Duration::from_secs(60));
        let (sum, count, b) = l.snapshot();
        assert_eq!(count, 3);
        assert_eq!(l.count(), 3);
        assert_eq!(b[2], (0.000_05, 1));
        assert_eq!(b[3], (0.000_1, 1));
        assert_eq!(b[18], (f64::INFINITY, 1));
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), 3);
        assert!((sum - 60.000_101).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn command_kinds() {
        assert_eq!(CmdKind::of(&[0x28, 0, 0]), CmdKind::Read);
        assert_eq!(CmdKind::of(&[0x8a]), CmdKind::Write);
        assert_eq!(CmdKind::of(&[0x5f, 0x21]), CmdKind::PrOut(1));
        assert_eq!(CmdKind::of(&[0x12]), CmdKind::Other);
        assert_eq!(CmdKind::of(&[]), CmdKind::Other);
        assert_eq!(pr_out_action_label(5), "preempt_and_abort");
    }
}
