//! Split brain: three nodes (three writer processes, each its own initiator
//! name and key) write to one LUN reserved Write Exclusive – Registrants
//! Only. At a random moment one node is cut off from the cluster (its
//! heartbeat stops, its storage path stays up and it keeps writing). A
//! survivor notices the silent heartbeat, decides to fence and runs
//! `fence_keyfence -o off`. Afterwards the LUN is read back: no record the
//! fenced node issued after fencing returned may be on the disk, and no
//! write of the fenced node may have been acknowledged after that moment.
//!
//! Rounds: 5, or `KEYFENCE_SPLIT_ROUNDS` (scripts/split-brain.sh runs many).

mod fence_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fence_support::*;
use rand::Rng;

const NODES: usize = 3;
const REGION: u64 = 256;
/// Heartbeat silence after which the survivors decide to fence.
const SILENCE_MS: u64 = 60;

fn stats(v: &mut [f64]) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return "n/a".into();
    }
    format!(
        "min {:.1} ms, median {:.1} ms, max {:.1} ms",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

#[test]
fn fenced_node_never_writes_after_fencing_returns() {
    let rounds: usize = std::env::var("KEYFENCE_SPLIT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let t = Target::start("iqn.2026-11.io.keyfence.test:splitbrain", "32M");
    let url = t.url();
    let tmp = tempfile::tempdir().unwrap();
    let agent = agent_link(tmp.path());
    let mut rng = rand::thread_rng();
    let keys = ["0x5b01", "0x5b02", "0x5b03"];
    let mut fence_ms = Vec::new();
    let mut refuse_ms = Vec::new();
    let mut late_acks = 0usize;
    let mut stale_blocks = 0usize;

    for round in 0..rounds {
        let dir = tmp.path().join(format!("r{round}"));
        // Regions are reused after 40 rounds: older records do not count.
        let t_round = monotonic_ns();
        std::fs::create_dir_all(&dir).unwrap();
        // Unfence every node (Pacemaker's automatic "on").
        for (n, key) in keys.iter().enumerate() {
            unfence(
                &url,
                key,
                &format!("node{n}"),
                &dir.join(format!("store{n}")),
            );
        }
        let region = |n: usize| ((round % 40) * NODES + n) as u64 * REGION;
        let stop = dir.join("stop");
        let mut writers: Vec<Child> = (0..NODES)
            .map(|n| {
                Command::new(BIN)
                    .args([
                        "fence",
                        "writer",
                        "--device",
                        &url,
                        "--node",
                        &n.to_string(),
                    ])
                    .args(["--key", keys[n], "--region-lba", &region(n).to_string()])
                    .args(["--region-blocks", &REGION.to_string()])
                    .args(["--initiator-name", &iname(&format!("node{n}"))])
                    .arg("--heartbeat")
                    .arg(dir.join(format!("hb{n}")))
                    .arg("--cut")
                    .arg(dir.join(format!("cut{n}")))
                    .arg("--stop")
                    .arg(&stop)
                    .arg("--log")
                    .arg(dir.join(format!("log{n}")))
                    .args(["--max-ms", "30000", "--timeout-ms", "2000"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // Every node is writing.
        let end = Instant::now() + Duration::from_secs(20);
        while (0..NODES).any(|n| heartbeat(&dir.join(format!("hb{n}"))).unwrap_or(0) < 20) {
            assert!(Instant::now() < end, "writers did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Cut a random node off at a random moment.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..250)));
        let victim = rng.gen_range(0..NODES);
        let survivor = (victim + 1 + rng.gen_range(0..NODES - 1)) % NODES;
        std::fs::write(dir.join(format!("cut{victim}")), b"").unwrap();
        // The survivor's membership layer: the victim's heartbeat is silent.
        wait_silent(
            &dir.join(format!("hb{victim}")),
            Duration::from_millis(SILENCE_MS),
        );
        let t_decide = monotonic_ns();
        let o = run_bounded(
            Command::new(&agent)
                .args(["-o", "off", "-k", keys[victim], "-d", &url, "-v"])
                .args(["--initiator-name", &iname(&format!("node{survivor}"))])
                .args(["--timeout", "5"]),
            None,
            Duration::from_secs(30),
        );
        let t_fenced = monotonic_ns();
        let t_preempted = preempt_time(round, &o);
        // The survivor takes the fenced node's blocks over at once.
        let stamp_node = 100 + survivor as u32;
        stamp(
            &url,
            stamp_node,
            keys[survivor],
            region(victim),
            REGION,
            &format!("node{survivor}"),
        );
        // The fenced node keeps trying for a while; survivors keep writing.
        // A write of the fenced node that PREEMPT AND ABORT aborted gets no
        // status (TAS=0): its writer waits out its command timeout (2 s)
        // before the next try, so wait (bounded) for a try issued after
        // fencing returned, which the checks below require to be refused.
        std::thread::sleep(Duration::from_millis(200));
        let victim_log = dir.join(format!("log{victim}"));
        let end = Instant::now() + Duration::from_secs(10);
        while !parse_log(&victim_log).iter().any(|l| l.t_issue > t_fenced) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop_writers(round, &stop, &mut writers);

        // What the disk and the logs say.
        for n in 0..NODES {
            let log = parse_log(&dir.join(format!("log{n}")));
            let recs: Vec<Rec> = scan(&url, region(n), REGION)
                .into_iter()
                .filter(|r| r.t_ns >= t_round)
                .collect();
            if n == victim {
                // Nothing the fenced node sent may land after the takeover.
                let stale: Vec<&Rec> = recs.iter().filter(|r| r.node != stamp_node).collect();
                stale_blocks += stale.len();
                if let Some(r) = stale.first() {
                    panic!(
                        "round {round}: {} takeover block(s) overwritten by the fenced node; seq {} at lba {} was issued {:.3} ms after the preempt",
                        stale.len(),
                        r.seq,
                        r.lba,
                        (r.t_ns as f64 - t_preempted as f64) / 1e6
                    );
                }
                assert_eq!(recs.len() as u64, REGION, "takeover write incomplete");
                // What is deterministic: no write issued after the
                // preempt completed was acknowledged (so none issued after
                // fencing returned, which is later), none landed after the
                // takeover (above).
                late_acks +=
                    check_victim_acks(&format!("round {round}"), &log, t_preempted, t_fenced);
                let refused = log
                    .iter()
                    .find(|l| !l.acked && l.t_done >= t_decide)
                    .expect("the fenced node kept writing and was refused");
                assert!(
                    log.iter().any(|l| !l.acked && l.t_issue > t_fenced),
                    "the fenced node kept trying after fencing"
                );
                fence_ms.push((t_fenced - t_decide) as f64 / 1e6);
                refuse_ms.push(refused.t_done.saturating_sub(t_decide) as f64 / 1e6);
                println!(
                    "round {round}: cut node{victim}, fenced by node{survivor}; fence_keyfence took {:.1} ms; \
                     first refused write {:.1} ms after the decision; {} writes acknowledged before",
                    (t_fenced - t_decide) as f64 / 1e6,
                    refused.t_done.saturating_sub(t_decide) as f64 / 1e6,
                    log.iter().filter(|l| l.acked).count()
                );
                continue;
            }
            // Survivors were not disturbed.
            check_survivor(round, n, &log, &recs, t_fenced);
            assert!(recs.iter().any(|r| r.t_ns > t_fenced));
        }
    }
    println!(
        "split brain: {rounds} rounds; fenced-node writes landing after the takeover: {stale_blocks}; \
         fenced-node writes issued after the preempt and acknowledged: 0; \
         acknowledgements the fenced process read after fencing returned (issued before the preempt): {late_acks}"
    );
    println!(
        "decision -> fence_keyfence returned: {}",
        stats(&mut fence_ms)
    );
    println!(
        "decision -> victim's next write refused: {}",
        stats(&mut refuse_ms)
    );
}
