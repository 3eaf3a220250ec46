//! Split brain across gateways: a three-member etcd on loopback (Debian's
//! etcd-server) and two `keyfence serve` gateways, A and B, over one shared
//! backing file. Node 0 works through gateway A, node 1 through gateway B:
//! each registers its key with the fence agent (`fence_keyfence -o on`)
//! and runs a writer process that writes sequence-numbered, node-tagged
//! records to its own region of the LU, reserved Write Exclusive –
//! Registrants Only.
//!
//! Each round, at a random moment, one node (the victim) is cut off from
//! the cluster while its storage path stays up and it keeps writing. The
//! other node (the fencer) notices the silent heartbeat, decides to fence
//! and runs `fence_keyfence -o off` (PREEMPT AND ABORT of the victim's
//! key) through *its own* gateway, then takes the victim's region over with
//! one write through its gateway. The rounds rotate through four modes:
//!
//! * `race`: nothing else happens;
//! * `stop-victim-gw`: shortly after the fence agent starts, the victim's
//!   gateway is frozen (SIGSTOP) for up to 2 s, with the victim's writes
//!   queued in it, and thawed at a random moment;
//! * `stop-fencer-gw`: the same with the fencer's gateway, for up to 0.8 s;
//! * `expire-victim-gw`: the victim's gateway frozen for 2.6–4 s, past its
//!   serving deadline (TTL 3 s − margin 0.5 s after its last confirmed
//!   keep-alive): PREEMPT AND ABORT returns GOOD once its lease expired,
//!   and after the thaw it must refuse what it held (NOT READY), rejoin
//!   and refuse the victim with RESERVATION CONFLICT.
//!
//! Checked every round, from the disk read back through both gateways and
//! from the writers' logs:
//! * no record of the victim is in its region after the takeover write
//!   (a late write: one that reached the medium after the fencer took over);
//! * no write of the victim issued after PREEMPT AND ABORT returned GOOD
//!   was acknowledged;
//! * the victim's writes issued after fencing returned are refused, the
//!   first one answered with RESERVATION CONFLICT unless its gateway had
//!   stopped serving (NOT READY, ASYMMETRIC ACCESS STATE TRANSITION) or
//!   did not answer in time;
//! * every write the fencer's writer got GOOD for is on the disk, and it
//!   keeps writing after fencing.
//!
//! Measured: the time from the fence decision to the victim's first write
//! refused with RESERVATION CONFLICT (p50/p99/max), and the fence agent's
//! run time.
//!
//! Rounds: 4 (one of each mode), or `KEYFENCE_SPLIT_ROUNDS` (`scripts/split-brain.sh --cluster
//! N` runs many). `KEYFENCE_SPLIT_MODES` (comma separated) limits the modes.

mod fence_support;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fence_support::*;
use keyfence_testkit::cmd::signal;
use keyfence_testkit::{ClusterOptions, ClusterRig, Lease};
use rand::Rng;

const IQN: &str = "iqn.2026-11.io.keyfence.test:clsplit";
const NODES: usize = 2;
const REGION: u64 = 256;
const SIZE: u64 = 64 << 20;
/// Heartbeat silence after which the fencer decides to fence.
const SILENCE_MS: u64 = 60;
const TTL_SECS: u64 = 3;
const MARGIN_MS: u64 = 500;
const KEYS: [&str; NODES] = ["0x5c01", "0x5c02"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Race,
    StopVictimGw,
    StopFencerGw,
    ExpireVictimGw,
}

impl Mode {
    const ALL: [Mode; 4] = [
        Mode::Race,
        Mode::StopVictimGw,
        Mode::StopFencerGw,
        Mode::ExpireVictimGw,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Race => "race",
            Mode::StopVictimGw => "stop-victim-gw",
            Mode::StopFencerGw => "stop-fencer-gw",
            Mode::ExpireVictimGw => "expire-victim-gw",
        }
    }

    /// Shortest and longest freeze of the mode's gateway, ms.
    fn freeze_ms(self) -> std::ops::RangeInclusive<u64> {
        match self {
            Mode::Race => 0..=0,
            Mode::StopVictimGw => 0..=2000,
            Mode::StopFencerGw => 0..=800,
            Mode::ExpireVictimGw => 2600..=4000,
        }
    }
}

fn modes() -> Vec<Mode> {
    let Ok(s) = std::env::var("KEYFENCE_SPLIT_MODES") else {
        return Mode::ALL.to_vec();
    };
    let v: Vec<Mode> = s
        .split(',')
        .filter(|m| !m.trim().is_empty())
        .map(|m| {
            *Mode::ALL
                .iter()
                .find(|x| x.name() == m.trim())
                .unwrap_or_else(|| {
                    panic!("KEYFENCE_SPLIT_MODES: unknown mode {m:?} (race, stop-victim-gw, stop-fencer-gw, expire-victim-gw)")
                })
        })
        .collect();
    assert!(!v.is_empty(), "KEYFENCE_SPLIT_MODES names no mode");
    v
}

/// Etcd, the shared backing file and gateways A (TPGT 1) and B (TPGT 2).
fn start_rig() -> ClusterRig {
    ClusterRig::start(
        ClusterOptions::new(BIN, IQN)
            .lun_size(SIZE)
            .log_level("warn")
            .lease(Lease {
                ttl_secs: TTL_SECS,
                safety_margin_ms: MARGIN_MS,
                request_timeout_ms: 1000,
            }),
    )
}

fn freeze(pid: u32) {
    keyfence_testkit::cmd::freeze(pid, Duration::from_secs(5));
}

/// Sends SIGCONT to a frozen gateway when dropped (also on a failed
/// assertion), so that stopping the rig never waits on a stopped process.
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

/// p50, p99 (nearest rank) and max of `v`, in ms.
fn percentiles(v: &mut [f64]) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return "n/a".into();
    }
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} rounds)",
        rank(0.50),
        rank(0.99),
        v[v.len() - 1],
        v.len()
    )
}

fn spawn_writer(rig: &ClusterRig, dir: &Path, n: usize, region: u64, stop: &Path) -> Child {
    Command::new(BIN)
        .args(["fence", "writer", "--device", &rig.url(n, 0)])
        .args(["--node", &n.to_string(), "--key", KEYS[n]])
        .args(["--region-lba", &region.to_string()])
        .args(["--region-blocks", &REGION.to_string()])
        .args(["--initiator-name", &iname(&format!("clnode{n}"))])
        .arg("--heartbeat")
        .arg(dir.join(format!("hb{n}")))
        .arg("--cut")
        .arg(dir.join(format!("cut{n}")))
        .arg("--stop")
        .arg(stop)
        .arg("--log")
        .arg(dir.join(format!("log{n}")))
        .args(["--max-ms", "60000", "--timeout-ms", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn writer")
}

/// What one round found.
#[derive(Default)]
struct Tally {
    late_writes: usize,
    late_acks: usize,
    transition_refusals: usize,
}

#[test]
fn no_late_write_through_either_gateway_after_fencing() {
    let rounds: usize = std::env::var("KEYFENCE_SPLIT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let modes = modes();
    let rig = start_rig();
    for gw in 0..2 {
        rig.wait_serving(gw, Duration::from_secs(30));
    }
    let tmp = tempfile::tempdir().unwrap();
    let agent = agent_link(tmp.path());
    let mut rng = rand::thread_rng();
    let mut tally = Tally::default();
    let mut refuse_ms = Vec::new();
    let mut fence_ms = Vec::new();
    let mut preempt_ms = Vec::new();
    let mut refuse_aborted_ms = Vec::new();
    let mut refuse_direct_ms = Vec::new();
    let mut preempt_after_thaw = 0usize;
    let mut by_mode: HashMap<&'static str, Vec<f64>> = HashMap::new();
    let mut per_mode: HashMap<&'static str, usize> = HashMap::new();
    let t_start = Instant::now();

    for round in 0..rounds {
        let mode = modes[round % modes.len()];
        *per_mode.entry(mode.name()).or_default() += 1;
        let dir = tmp.path().join(format!("r{round}"));
        std::fs::create_dir_all(&dir).unwrap();
        let t_round = monotonic_ns();
        for gw in 0..2 {
            rig.wait_serving(gw, Duration::from_secs(30));
        }
        // Unfence both nodes, each through its own gateway.
        for (n, key) in KEYS.iter().enumerate() {
            unfence(
                &rig.url(n, 0),
                key,
                &format!("clnode{n}"),
                &dir.join(format!("store{n}")),
            );
        }
        // Regions are reused after 40 rounds: older records do not count.
        let region = |n: usize| ((round % 40) * NODES + n) as u64 * REGION;
        let stop = dir.join("stop");
        let mut writers: Vec<Child> = (0..NODES)
            .map(|n| spawn_writer(&rig, &dir, n, region(n), &stop))
            .collect();
        let end = Instant::now() + Duration::from_secs(20);
        while (0..NODES).any(|n| heartbeat(&dir.join(format!("hb{n}"))).unwrap_or(0) < 20) {
            assert!(Instant::now() < end, "round {round}: writers did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Cut a random node off at a random moment.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..250)));
        let victim = rng.gen_range(0..NODES);
        let fencer = 1 - victim;
        std::fs::write(dir.join(format!("cut{victim}")), b"").unwrap();
        wait_silent(
            &dir.join(format!("hb{victim}")),
            Duration::from_millis(SILENCE_MS),
        );
        let t_decide = monotonic_ns();
        // The freeze of this mode, on its own thread while the agent runs.
        let frozen_gw = match mode {
            Mode::Race => None,
            Mode::StopVictimGw => Some(victim),
            Mode::StopFencerGw => Some(fencer),
            Mode::ExpireVictimGw => Some(victim),
        };
        let freeze_plan = frozen_gw.map(|gw| {
            (
                rig.gateway(gw).pid().expect("gateway running"),
                Duration::from_millis(rng.gen_range(0..15)),
                Duration::from_millis(rng.gen_range(mode.freeze_ms())),
            )
        });
        let freezer = freeze_plan.map(|(pid, after, hold)| {
            std::thread::spawn(move || {
                std::thread::sleep(after);
                let thaw = Thaw(pid);
                freeze(pid);
                let t_frozen = monotonic_ns();
                std::thread::sleep(hold);
                drop(thaw);
                (t_frozen, monotonic_ns())
            })
        });
        let fencer_url = rig.url(fencer, 0);
        let o = run_bounded(
            Command::new(&agent)
                .args(["-o", "off", "-k", KEYS[victim], "-d", &fencer_url, "-v"])
                .args(["--initiator-name", &iname(&format!("clnode{fencer}"))])
                .args(["--timeout", "20"]),
            None,
            Duration::from_secs(60),
        );
        let t_fenced = monotonic_ns();
        let t_preempted = preempt_time(round, &o);
        // The fencer takes the victim's blocks over at once, through its
        // own gateway (which may still be frozen in stop-fencer-gw: the
        // write then waits for the thaw).
        let stamp_node = 100 + fencer as u32;
        stamp(
            &fencer_url,
            stamp_node,
            KEYS[fencer],
            region(victim),
            REGION,
            &format!("clnode{fencer}"),
        );
        let frozen = freezer.map(|f| f.join().expect("freezer thread"));
        let t_thawed = frozen.map(|(_, t)| t);
        // The victim keeps trying; wait (bounded) for one of its writes
        // issued after fencing returned to be refused with RESERVATION
        // CONFLICT (an aborted write gets no status: its writer waits out
        // its 1 s command timeout; a gateway that lost its lease while
        // frozen answers NOT READY until it has rejoined).
        let victim_log = dir.join(format!("log{victim}"));
        let end = Instant::now() + Duration::from_secs(20);
        while !parse_log(&victim_log)
            .iter()
            .any(|l| l.t_issue > t_fenced && l.conflict())
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Give anything still queued in a gateway time to reach the disk.
        std::thread::sleep(Duration::from_millis(100));
        stop_writers(round, &stop, &mut writers);

        // What the disk (through both gateways) and the logs say.
        let rel = |t: u64| (t as f64 - t_preempted as f64) / 1e6;
        for n in 0..NODES {
            let log = parse_log(&dir.join(format!("log{n}")));
            if n == victim {
                for gw in 0..2 {
                    let recs: Vec<Rec> = scan(&rig.url(gw, 0), region(n), REGION)
                        .into_iter()
                        .filter(|r| r.t_ns >= t_round)
                        .collect();
                    let stale: Vec<&Rec> = recs.iter().filter(|r| r.node != stamp_node).collect();
                    tally.late_writes += stale.len();
                    if let Some(r) = stale.first() {
                        let l = log.iter().find(|l| l.seq == r.seq);
                        panic!(
                            "round {round} ({}): LATE WRITE: {} block(s) of the takeover through gateway {fencer} \
                             overwritten by victim node{victim} (gateway {victim}), read through gateway {gw}; \
                             seq {} at lba {} issued {:.3} ms after the preempt, its outcome {:?}; \
                             fence returned {:.3} ms after the preempt{}",
                            mode.name(),
                            stale.len(),
                            r.seq,
                            r.lba,
                            rel(r.t_ns),
                            l.map(|l| format!(
                                "{} at {:.3} ms {}",
                                if l.acked { "ack" } else { "refused" },
                                rel(l.t_done),
                                l.error
                            )),
                            rel(t_fenced),
                            t_thawed
                                .map(|t| format!(", gateway thawed {:.3} ms after it", rel(t)))
                                .unwrap_or_default()
                        );
                    }
                    assert_eq!(
                        recs.len() as u64,
                        REGION,
                        "round {round}: takeover write incomplete through gateway {gw}"
                    );
                }
                // What is deterministic: no write issued after the
                // preempt completed was acknowledged, none landed after
                // the takeover (above).
                tally.late_acks += check_victim_acks(
                    &format!("round {round} ({})", mode.name()),
                    &log,
                    t_preempted,
                    t_fenced,
                );
                // The victim's tries after fencing returned: refused, the
                // first answered one with RESERVATION CONFLICT, or with NOT
                // READY (transition) when its gateway was the frozen one.
                let after: Vec<&LogLine> = log.iter().filter(|l| l.t_issue > t_fenced).collect();
                let first_answered = after
                    .iter()
                    .find(|l| l.conflict() || l.transition() || l.acked)
                    .unwrap_or_else(|| {
                        panic!(
                            "round {round} ({}): the victim got no answer to any write after fencing: {:?}",
                            mode.name(),
                            after.iter().map(|l| &l.error).collect::<Vec<_>>()
                        )
                    });
                let transitions = after.iter().filter(|l| l.transition()).count();
                tally.transition_refusals += transitions;
                assert!(
                    first_answered.conflict()
                        || (first_answered.transition() && frozen_gw == Some(victim)),
                    "round {round} ({}): the victim's first answered write after fencing got {:?}",
                    mode.name(),
                    if first_answered.acked {
                        "GOOD"
                    } else {
                        first_answered.error.as_str()
                    }
                );
                let refused = log
                    .iter()
                    .find(|l| l.conflict() && l.t_done >= t_decide)
                    .unwrap_or_else(|| {
                        panic!(
                            "round {round} ({}): no write of the victim refused with RESERVATION CONFLICT within 20 s",
                            mode.name()
                        )
                    });
                let refused_after = (refused.t_done.saturating_sub(t_decide)) as f64 / 1e6;
                // A write in flight at the preempt that was aborted gets no
                // status: the writer tries again after its command timeout.
                let aborted = log.iter().any(|l| {
                    !l.acked
                        && l.t_done >= t_decide
                        && l.t_done <= refused.t_done
                        && l.error.starts_with("timed out")
                });
                refuse_ms.push(refused_after);
                by_mode.entry(mode.name()).or_default().push(refused_after);
                if aborted {
                    refuse_aborted_ms.push(refused_after);
                } else {
                    refuse_direct_ms.push(refused_after);
                }
                fence_ms.push((t_fenced - t_decide) as f64 / 1e6);
                preempt_ms.push((t_preempted.saturating_sub(t_decide)) as f64 / 1e6);
                if let Some((_, t1)) = frozen {
                    if t1 < t_preempted {
                        preempt_after_thaw += 1;
                    }
                }
                println!(
                    "round {round} ({}): cut node{victim} on gateway {victim}, fenced by node{fencer} through gateway {fencer}; \
                     preempt GOOD {:.1} ms, fence_keyfence returned {:.1} ms, first RESERVATION CONFLICT {:.1} ms after the decision{}; \
                     {} writes acknowledged before{}",
                    mode.name(),
                    (t_preempted.saturating_sub(t_decide)) as f64 / 1e6,
                    (t_fenced - t_decide) as f64 / 1e6,
                    refused_after,
                    if aborted { " (a write in flight was aborted)" } else { "" },
                    log.iter().filter(|l| l.acked).count(),
                    match frozen {
                        Some((t0, t1)) => format!(
                            "; gateway {} frozen from {:.1} to {:.1} ms after the preempt",
                            frozen_gw.unwrap_or(0),
                            rel(t0),
                            rel(t1)
                        ),
                        None => String::new(),
                    }
                );
                continue;
            }
            let recs: Vec<Rec> = scan(&rig.url(n, 0), region(n), REGION)
                .into_iter()
                .filter(|r| r.t_ns >= t_round)
                .collect();
            check_survivor(round, n, &log, &recs, t_fenced);
        }
    }
    let mut modes_run: Vec<String> = Mode::ALL
        .iter()
        .filter_map(|m| per_mode.get(m.name()).map(|c| format!("{} {c}", m.name())))
        .collect();
    modes_run.sort();
    println!(
        "split brain across gateways: {rounds} rounds ({}) in {:.0} s; victim writes landing after the takeover: {}; \
         victim writes issued after the preempt and acknowledged: {}; acknowledgements the victim read after fencing \
         returned (issued before the preempt): {}; NOT READY refusals while the victim's gateway rejoined: {}",
        modes_run.join(", "),
        t_start.elapsed().as_secs_f64(),
        tally.late_writes,
        0, // every round asserts that there is none
        tally.late_acks,
        tally.transition_refusals
    );
    println!(
        "split brain across gateways: fence decision -> victim's first RESERVATION CONFLICT: {}",
        percentiles(&mut refuse_ms)
    );
    println!(
        "split brain across gateways: of which no write in flight was aborted: {}; a write in flight was aborted \
         (no status, the writer's 1 s command timeout first): {}",
        percentiles(&mut refuse_direct_ms),
        percentiles(&mut refuse_aborted_ms)
    );
    println!(
        "split brain across gateways: fence decision -> PREEMPT AND ABORT GOOD: {}; -> fence_keyfence returned: {}",
        percentiles(&mut preempt_ms),
        percentiles(&mut fence_ms)
    );
    for m in Mode::ALL {
        if let Some(v) = by_mode.get_mut(m.name()) {
            println!(
                "split brain across gateways: {}: fence decision -> victim's first RESERVATION CONFLICT: {}",
                m.name(),
                percentiles(v)
            );
        }
    }
    println!(
        "split brain across gateways: PREEMPT AND ABORT returned GOOD after the frozen gateway was thawed \
         (it waited for that gateway) in {preempt_after_thaw} rounds"
    );
}
