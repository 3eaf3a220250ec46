//! fence_keyfence, `fence check`, `fence acquire` and `fence race` against
//! real `keyfence serve` targets on 127.0.0.1.

mod fence_support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fence_support::*;

fn three_targets() -> Vec<Target> {
    (1..=3)
        .map(|i| Target::start(&format!("iqn.2026-11.io.keyfence.test:fence{i}"), "16M"))
        .collect()
}

fn list(ts: &[&Target]) -> String {
    ts.iter().map(|t| t.url()).collect::<Vec<_>>().join(",")
}

/// `keyfence fence acquire` of `url` with key `key` as node `node`, with
/// the probe `timing` options; its failfast action writes the reason it
/// was given (`$KEYFENCE_LOST`) to `marker`.
fn spawn_acquire(url: &str, key: &str, node: &str, timing: &[&str], marker: &Path) -> Child {
    Command::new(BIN)
        .args(["fence", "acquire", "-d", url, "-k", key, "--initiator-name"])
        .arg(iname(node))
        .args(timing)
        .arg("--action")
        .arg(format!("echo \"$KEYFENCE_LOST\" > {}", marker.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Poll `done` every 20 ms until it holds; fail saying `what` after
/// `within`.
fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < end, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn agent_unfences_fences_and_reports_status_by_majority() {
    let mut ts = three_targets();
    let tmp = tempfile::tempdir().unwrap();
    let devs = list(&ts.iter().collect::<Vec<_>>());
    let agent = agent_link(tmp.path());
    let store1 = tmp.path().join("n1");
    let store2 = tmp.path().join("n2");

    // Run by its name, as Pacemaker does: metadata.
    let o = run_bounded(
        Command::new(&agent).args(["-o", "metadata"]),
        None,
        Duration::from_secs(10),
    );
    assert_eq!(code(&o), 0);
    let meta = text(&o.stdout);
    assert!(meta.contains("<action name=\"on\" on_target=\"1\" automatic=\"1\"/>"));
    assert!(meta.contains("resource-agent name=\"fence_keyfence\""));

    // Unfence node 1 through the stdin protocol, node 2 with arguments.
    let stdin = format!(
        "# stonith-ng style\naction=on\nkey=11\ndevices={devs}\ninitiator_name={}\nstore_path={}\npcmk_host_list=n1\n",
        iname("n1"),
        store1.display()
    );
    let o = run_bounded(
        &mut Command::new(&agent),
        Some(&stdin),
        Duration::from_secs(30),
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("Ignoring unknown option 'pcmk_host_list=n1'"));
    unfence(&devs, "0x22", "n2", &store2);
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("n2.key"))
            .unwrap()
            .trim(),
        "22"
    );

    let agent_as = |node: &str, args: &[&str]| {
        let mut c = Command::new(&agent);
        c.args(args).args([
            "-d",
            &devs,
            "--initiator-name",
            &iname(node),
            "--timeout",
            "2",
        ]);
        run_bounded(&mut c, None, Duration::from_secs(30))
    };
    let o = agent_as("n1", &["-o", "status", "-k", "22"]);
    assert_eq!((code(&o), text(&o.stdout).trim()), (0, "Status: ON"));
    let o = agent_as("n1", &["-o", "list"]);
    assert_eq!(code(&o), 0);
    assert!(
        text(&o.stdout).contains("0x11,registered on 3 of 3"),
        "{}",
        text(&o.stdout)
    );
    assert!(text(&o.stdout).contains("0x22,registered on 3 of 3"));
    let o = agent_as("n1", &["-o", "monitor"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    // A node cannot fence itself.
    let o = agent_as("n1", &["-o", "off", "-k", "11"]);
    assert_eq!(code(&o), 1);
    assert!(
        text(&o.stderr).contains("You can not fence yourself"),
        "{}",
        text(&o.stderr)
    );
    // Bad input: one-line error, exit 1.
    let o = agent_as("n1", &["-o", "off", "-k", "0"]);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains("key cannot be 0"));
    let o = agent_as("n1", &["-o", "explode", "-k", "22"]);
    assert_eq!(code(&o), 1);

    // One device down: fencing still succeeds on the majority.
    ts[2].stop();
    let o = agent_as("n1", &["-o", "off", "-k", "22"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("Success: Powered OFF"));
    assert!(
        text(&o.stderr).contains(&format!("{}: FAILED", ts[2].url())),
        "the unreachable device is reported: {}",
        text(&o.stderr)
    );
    let o = agent_as("n1", &["-o", "status", "-k", "22"]);
    assert_eq!((code(&o), text(&o.stdout).trim()), (2, "Status: OFF"));
    // The fenced node's watchdog check notices; node 1's does not.
    let store2s = store2.to_str().unwrap();
    let o = keyfence(&[
        "fence",
        "check",
        "--store-path",
        store2s,
        "--initiator-name",
        &iname("n2"),
        "--deadline-ms",
        "3000",
    ]);
    assert_eq!(code(&o), 2, "{}", text(&o.stderr));
    let o = keyfence(&[
        "fence",
        "check",
        "--store-path",
        store1.to_str().unwrap(),
        "--initiator-name",
        &iname("n1"),
        "--deadline-ms",
        "3000",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    // The fenced node cannot fence back: its port has no registration.
    let o = agent_as("n2", &["-o", "off", "-k", "11"]);
    assert_eq!(code(&o), 1);
    assert!(
        text(&o.stderr).contains("not registered"),
        "{}",
        text(&o.stderr)
    );
    // Unfencing needs every device.
    let o = agent_as("n2", &["-o", "on", "-k", "22", "--store-path", store2s]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));

    // Two of three down: no majority, fencing fails.
    ts[1].stop();
    let o = agent_as("n2", &["-o", "off", "-k", "11"]);
    assert_eq!(code(&o), 1);
    assert!(
        text(&o.stderr).contains("a majority is needed"),
        "{}",
        text(&o.stderr)
    );
    let o = agent_as("n1", &["-o", "monitor"]);
    assert_eq!(code(&o), 1);
}

#[test]
fn check_answers_within_its_deadline_when_devices_hang() {
    // A "device" that accepts connections and never says a word.
    let hang = TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_url = format!(
        "iscsi://127.0.0.1:{}/iqn.2026-11.io.keyfence.test:hang/0",
        hang.local_addr().unwrap().port()
    );
    let t = Target::start("iqn.2026-11.io.keyfence.test:check", "16M");
    let tmp = tempfile::tempdir().unwrap();
    unfence(&t.url(), "0x33", "n3", &tmp.path().join("n3"));

    let start = Instant::now();
    let o = keyfence(&[
        "fence",
        "check",
        "-d",
        &hang_url,
        "-k",
        "0x33",
        "--initiator-name",
        &iname("n3"),
        "--deadline-ms",
        "1500",
    ]);
    let took = start.elapsed();
    assert_eq!(code(&o), 2, "{}", text(&o.stderr));
    assert!(took < Duration::from_millis(3000), "check took {took:?}");
    assert!(text(&o.stderr).contains("1 silent"), "{}", text(&o.stderr));

    // One good device among hanging ones is enough, and answers at once.
    let devs = format!("{hang_url},{}", t.url());
    let start = Instant::now();
    let o = keyfence(&[
        "fence",
        "check",
        "-d",
        &devs,
        "-k",
        "0x33",
        "--initiator-name",
        &iname("n3"),
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(start.elapsed() < Duration::from_millis(3000));
    println!(
        "check with one hanging device answered in {:?}",
        start.elapsed()
    );

    // A node that was never unfenced has nothing to lose: exit 0.
    let none = tmp.path().join("never-unfenced");
    let o = keyfence(&[
        "fence",
        "check",
        "--store-path",
        none.to_str().unwrap(),
        "test",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    // Watchdog repair convention.
    let o = keyfence(&["fence", "check", "repair", "7"]);
    assert_eq!(code(&o), 7);
    drop(hang);
}

#[test]
fn acquire_takes_over_and_fails_fast_when_preempted() {
    let t = Target::start("iqn.2026-11.io.keyfence.test:acquire", "16M");
    let tmp = tempfile::tempdir().unwrap();
    let url = t.url();
    // Node B holds the reservation first.
    unfence(&url, "0xb0", "nb", &tmp.path().join("nb"));
    let marker = tmp.path().join("lost");
    let interval_ms = 100u64;
    let acq = spawn_acquire(
        &url,
        "0xa0",
        "na",
        &[
            "--probe-interval",
            &interval_ms.to_string(),
            "--timeout-ms",
            "2000",
            "--max-run-ms",
            "30000",
        ],
        &marker,
    );
    // It preempts B and holds the reservation.
    wait_for(
        "acquire did not preempt node B",
        Duration::from_secs(20),
        || {
            let o = keyfence(&[
                "fence",
                "agent",
                "-o",
                "status",
                "-k",
                "b0",
                "-d",
                &url,
                "--initiator-name",
                &iname("na"),
            ]);
            code(&o) == 2
        },
    );
    let o = keyfence(&["persist", "-n", "-i", "-r", &url]);
    assert!(text(&o.stdout).contains("Key=0xa0"), "{}", text(&o.stdout));
    std::thread::sleep(Duration::from_millis(3 * interval_ms));
    assert!(!marker.exists(), "no false alarm while ownership holds");

    // Node B comes back and fences A.
    unfence(&url, "0xb0", "nb", &tmp.path().join("nb"));
    let t0 = monotonic_ns();
    let o = keyfence(&[
        "fence",
        "agent",
        "-o",
        "off",
        "-k",
        "a0",
        "-d",
        &url,
        "--initiator-name",
        &iname("nb"),
    ]);
    let t1 = monotonic_ns();
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let end = Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(Instant::now() < end, "failfast action never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    let seen = monotonic_ns();
    let out = acq.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let lost_at: u64 = err
        .split("ownership lost at monotonic ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no detection time in {err}"));
    let reason = std::fs::read_to_string(&marker).unwrap();
    assert!(
        reason.contains("no longer registered") || reason.contains("PREEMPTED"),
        "{reason}"
    );
    let from_start = lost_at.saturating_sub(t0) as f64 / 1e6;
    let from_done = lost_at as f64 / 1e6 - t1 as f64 / 1e6;
    println!(
        "failfast: probe interval {interval_ms} ms; detected {from_start:.1} ms after the fence command started, \
         {from_done:.1} ms after it returned; marker seen {:.1} ms after it returned; reason: {}",
        (seen - t1) as f64 / 1e6,
        reason.trim()
    );
    // Bound: one probe interval plus a round trip (and process start-up
    // of the fence command, which is counted in from_start).
    assert!(from_start < (interval_ms + 1000) as f64, "{from_start} ms");
}

#[test]
fn coordinator_race_has_exactly_one_winner() {
    let ts = three_targets();
    let tmp = tempfile::tempdir().unwrap();
    // Listed in different orders on purpose: race sorts them.
    let a_devs = list(&[&ts[0], &ts[1], &ts[2]]);
    let b_devs = list(&[&ts[2], &ts[0], &ts[1]]);
    for round in 0..3 {
        unfence(&a_devs, "0xa1", "sa", &tmp.path().join("sa"));
        unfence(&a_devs, "0xb1", "sb", &tmp.path().join("sb"));
        let lost_a = tmp.path().join(format!("lost-a-{round}"));
        let lost_b = tmp.path().join(format!("lost-b-{round}"));
        let spawn = |devs: &str, me: &str, other: &str, node: &str, marker: &std::path::Path| {
            Command::new(BIN)
                .args([
                    "fence",
                    "race",
                    "-d",
                    devs,
                    "-k",
                    me,
                    "--victim-keys",
                    other,
                ])
                .args(["--initiator-name", &iname(node), "--timeout-ms", "3000"])
                .arg("--action")
                .arg(format!("touch {}", marker.display()))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let a = spawn(&a_devs, "0xa1", "0xb1", "sa", &lost_a);
        let b = spawn(&b_devs, "0xb1", "0xa1", "sb", &lost_b);
        let a = a.wait_with_output().unwrap();
        let b = b.wait_with_output().unwrap();
        let (ca, cb) = (code(&a), code(&b));
        println!(
            "race round {round}: side A exit {ca}\n{}side B exit {cb}\n{}",
            text(&a.stdout),
            text(&b.stdout)
        );
        assert!(
            (ca == 0 && cb == 1) || (ca == 1 && cb == 0),
            "exactly one winner: A {ca} {} B {cb} {}",
            text(&a.stderr),
            text(&b.stderr)
        );
        let (winner, loser_marker, winner_marker, wkey, lkey) = if ca == 0 {
            (&a, &lost_b, &lost_a, "0xa1", "0xb1")
        } else {
            (&b, &lost_a, &lost_b, "0xb1", "0xa1")
        };
        assert!(loser_marker.exists() && !winner_marker.exists());
        assert!(text(&winner.stdout).matches(": won").count() >= 2);
        // The winner's key is on a majority, the loser's on a minority.
        let mut w = 0;
        let mut l = 0;
        for t in &ts {
            let o = keyfence(&["persist", "-n", "-i", "-k", &t.url()]);
            let s = text(&o.stdout);
            w += usize::from(s.contains(wkey));
            l += usize::from(s.contains(lkey));
        }
        assert!(w >= 2 && l <= 1, "winner on {w}, loser on {l}");
    }
    // An even number of coordinator disks is refused.
    let o = keyfence(&[
        "fence",
        "race",
        "-d",
        &list(&[&ts[0], &ts[1]]),
        "-k",
        "1",
        "--victim-keys",
        "2",
        "--initiator-name",
        &iname("x"),
    ]);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains("odd number"));
}

#[test]
fn agent_fences_a_multipath_map_from_the_configuration() {
    let t = Target::start_portals("iqn.2026-11.io.keyfence.test:mpath", "16M", 2);
    let tmp = tempfile::tempdir().unwrap();
    let paths = t.urls();
    let cfg = tmp.path().join("keyfence.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[multipath]]\nname = \"mpathf\"\npaths = [\"{}\", \"{}\"]\n",
            paths[0], paths[1]
        ),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let agent = |node: &str, args: &[&str]| {
        let mut a = vec!["fence", "agent", "--config", cfg_s, "--timeout", "3"];
        a.extend_from_slice(args);
        let n = iname(node);
        a.extend_from_slice(&["--initiator-name", &n]);
        keyfence(&a)
    };
    for (node, key) in [("m1", "0x71"), ("m2", "0x72")] {
        let store = tmp.path().join(node);
        let o = agent(
            node,
            &[
                "-o",
                "on",
                "-k",
                key,
                "-d",
                "/dev/mapper/mpathf",
                "--store-path",
                store.to_str().unwrap(),
            ],
        );
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    }
    // `on` registered both paths (two I_T nexuses per node).
    let o = keyfence(&["persist", "-n", "-i", "-k", &paths[1]]);
    let keys = text(&o.stdout);
    assert_eq!(keys.matches("0x72").count(), 2, "{keys}");
    assert_eq!(keys.matches("0x71").count(), 2, "{keys}");

    let o = agent("m1", &["-o", "off", "-k", "0x72", "-d", "mpathf"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let o = keyfence(&["persist", "-n", "-i", "-k", &paths[0]]);
    assert!(!text(&o.stdout).contains("0x72"), "{}", text(&o.stdout));
    assert_eq!(text(&o.stdout).matches("0x71").count(), 2);
    let o = agent("m1", &["-o", "status", "-k", "0x72", "-d", "mpathf"]);
    assert_eq!(code(&o), 2);
    // A name that is neither a URL nor a map: one-line error.
    let o = agent("m1", &["-o", "status", "-k", "0x72", "-d", "mpathz"]);
    assert_eq!(code(&o), 1);
    assert!(text(&o.stderr).contains("neither an iSCSI URL nor a multipath map"));
}

#[test]
fn acquire_fails_fast_when_the_storage_goes_away() {
    let mut t = Target::start("iqn.2026-11.io.keyfence.test:vanish", "16M");
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("lost");
    let acq = spawn_acquire(
        &t.url(),
        "0xc0",
        "nc",
        &[
            "--probe-interval",
            "50",
            "--timeout-ms",
            "300",
            "--lost-after",
            "600",
            "--max-run-ms",
            "30000",
        ],
        &marker,
    );
    wait_for("acquire did not reserve", Duration::from_secs(20), || {
        let o = keyfence(&["persist", "-n", "-i", "-r", &t.url()]);
        text(&o.stdout).contains("Key=0xc0")
    });
    let gone = Instant::now();
    t.stop();
    let out = acq.wait_with_output().unwrap();
    let took = gone.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let reason = std::fs::read_to_string(&marker).unwrap();
    assert!(reason.contains("not probed successfully"), "{reason}");
    println!(
        "failfast on lost storage after {took:?} (lost-after 600 ms): {}",
        reason.trim()
    );
    // The 600 ms run from the last successful probe, which came up to one
    // probe interval (50 ms) plus its round trip before the target went
    // away: acting earlier than 600 - 2 x 50 ms would be acting too soon.
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn fence_subcommands_document_every_option() {
    for cmd in ["check", "acquire", "race"] {
        let o = keyfence(&["fence", cmd, "-h"]);
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
        let help = text(&o.stdout);
        let lines: Vec<&str> = help.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if !t.starts_with('-') {
                continue;
            }
            // clap puts the description after two spaces on the same line,
            // or on the next, more indented line.
            let same_line = t.contains("  ");
            let next_line = lines
                .get(i + 1)
                .is_some_and(|n| !n.trim().is_empty() && !n.trim_start().starts_with('-'));
            assert!(
                same_line || next_line,
                "`keyfence fence {cmd} -h`: no help for {t:?}\n{help}"
            );
        }
    }
}

#[test]
fn docs_describe_acquire_as_polling_with_its_real_default() {
    let o = keyfence(&["fence", "acquire", "--help"]);
    let help = text(&o.stdout);
    let default = help
        .split("--probe-interval")
        .nth(1)
        .and_then(|s| s.split("[default: ").nth(1))
        .and_then(|s| s.split(']').next())
        .unwrap_or_else(|| panic!("no --probe-interval default in\n{help}"))
        .to_string();
    let readme = include_str!("../../../README.md");
    let bullet = readme
        .split("- `keyfence fence acquire")
        .nth(1)
        .and_then(|s| s.split("\n- ").next())
        .expect("README's acquire bullet");
    let fencing = include_str!("../../../docs/fencing.md");
    let section = fencing
        .split("## Failfast: `keyfence fence acquire`")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/fencing.md's acquire section");
    for (what, text) in [("README.md", bullet), ("docs/fencing.md", section)] {
        // acquire polls: it cannot act "the moment" ownership is lost.
        assert!(!text.contains("the moment"), "{what}: {text}");
        assert!(
            text.contains(&format!("default {default} ms")),
            "{what} must give the probe interval default ({default} ms): {text}"
        );
    }
}
