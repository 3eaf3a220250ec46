//! The agent's device actions (`on`, `off`/`reboot`, `status`, `monitor`,
//! `list`): keyfence-fence's operations run on every device, the results
//! printed the way fence-agents do, and the exit status.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use keyfence_fence::ops::{self, job_deadline, DevResult};
use keyfence_fence::{fmt_key, FenceDevice};

use super::Log;

/// How the agent reaches the devices: its initiator name, the bound on
/// each login and command, and whether registrations persist through
/// power loss (APTPL).
pub struct DeviceAccess {
    pub initiator_name: String,
    pub timeout: Duration,
    pub aptpl: bool,
}

/// Log each device's result (details when verbose, failures always);
/// returns how many succeeded.
fn report<T: Display>(results: &[DevResult<T>], log: &Log) -> usize {
    let mut ok = 0;
    for r in results {
        match &r.result {
            Ok(d) => {
                ok += 1;
                log.debug(&format!("{}: {d}", r.name));
            }
            Err(e) => log.info(&format!("{}: FAILED: {e}", r.name)),
        }
    }
    ok
}

pub async fn on(acc: &DeviceAccess, devs: &[FenceDevice], k: u64, log: &Log) -> u8 {
    let (name, t, aptpl) = (acc.initiator_name.clone(), acc.timeout, acc.aptpl);
    let results = ops::on_all(devs, job_deadline(t), move |d| {
        let name = name.clone();
        async move { ops::unfence_device(&d, &name, k, aptpl, t).await }
    })
    .await;
    let ok = report(&results, log);
    if ok == devs.len() {
        println!("Success: Powered ON");
        0
    } else {
        eprintln!("Failed: registered on {ok} of {} device(s)", devs.len());
        1
    }
}

pub async fn off(
    acc: &DeviceAccess,
    devs: &[FenceDevice],
    victim: u64,
    log: &Log,
    done: &str,
) -> u8 {
    let (name, t) = (acc.initiator_name.clone(), acc.timeout);
    let results = ops::on_all(devs, job_deadline(t), move |d| {
        let name = name.clone();
        async move { ops::fence_device(&d, &name, victim, t).await }
    })
    .await;
    let ok = report(&results, log);
    if ok * 2 > devs.len() {
        println!("{done}");
        0
    } else {
        eprintln!(
            "Failed: fencing of key {} confirmed on {ok} of {} device(s), a majority is needed",
            fmt_key(victim),
            devs.len()
        );
        1
    }
}

fn key_list(keys: &[u64]) -> String {
    keys.iter()
        .map(|k| fmt_key(*k))
        .collect::<Vec<_>>()
        .join(" ")
}

pub async fn status(acc: &DeviceAccess, devs: &[FenceDevice], k: u64, log: &Log) -> u8 {
    let all = ops::keys_everywhere(devs, &acc.initiator_name, acc.timeout).await;
    let mut answered = 0;
    let mut on = 0;
    for r in &all {
        match &r.result {
            Ok(keys) => {
                answered += 1;
                if keys.contains(&k) {
                    on += 1;
                }
                log.debug(&format!("{}: keys [{}]", r.name, key_list(keys)));
            }
            Err(e) => log.info(&format!("{}: FAILED: {e}", r.name)),
        }
    }
    if answered == 0 {
        eprintln!("Failed: no device answered");
        return 1;
    }
    if on > 0 {
        println!("Status: ON");
        0
    } else {
        println!("Status: OFF");
        2
    }
}

pub async fn monitor(acc: &DeviceAccess, devs: &[FenceDevice], log: &Log) -> u8 {
    let all = ops::keys_everywhere(devs, &acc.initiator_name, acc.timeout).await;
    let shown: Vec<DevResult<String>> = all
        .into_iter()
        .map(|r| DevResult {
            name: r.name,
            result: r.result.map(|k| key_list(&k)),
        })
        .collect();
    let ok = report(&shown, log);
    if ok * 2 > devs.len() {
        0
    } else {
        eprintln!(
            "Failed: {ok} of {} device(s) answered, a majority is needed to fence",
            devs.len()
        );
        1
    }
}

pub async fn list(acc: &DeviceAccess, devs: &[FenceDevice], log: &Log) -> u8 {
    let all = ops::keys_everywhere(devs, &acc.initiator_name, acc.timeout).await;
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut answered = 0;
    for r in &all {
        match &r.result {
            Ok(keys) => {
                answered += 1;
                for k in keys {
                    *seen.entry(*k).or_default() += 1;
                }
            }
            Err(e) => log.info(&format!("{}: FAILED: {e}", r.name)),
        }
    }
    if answered == 0 {
        eprintln!("Failed: no device answered");
        return 1;
    }
    for (k, n) in seen {
        println!(
            "{},registered on {n} of {} device(s)",
            fmt_key(k),
            devs.len()
        );
    }
    0
}
