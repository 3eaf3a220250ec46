//! The systemd service protocol for `keyfence serve` (`Type=notify`):
//! READY=1 once the target serves, WATCHDOG=1 keep-alives while its
//! runtime runs, STOPPING=1 when it shuts down. Every function does
//! nothing when the service manager did not ask for it (no
//! `NOTIFY_SOCKET`, no `WATCHDOG_USEC` for this process).

use std::time::Duration;

use keyfence_target::server::Server;
use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

/// `server` is bound: every portal listens and every LU is open.
pub fn ready(server: &Server) {
    send(&[NotifyState::Ready, NotifyState::Status(&status(server))]);
}

/// One line for `systemctl status`: what is served where.
fn status(server: &Server) -> String {
    let targets = server.portals();
    let mut addrs: Vec<String> = targets
        .iter()
        .flat_map(|(_, ps)| ps.iter().map(|p| p.addr.to_string()))
        .collect();
    addrs.sort();
    addrs.dedup();
    format!(
        "serving {} target(s) on {}",
        targets.len(),
        addrs.join(", ")
    )
}

/// Shutdown has begun (commands in flight finish, then LUs are flushed).
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing commands in flight, flushing"),
    ]);
}

/// When the service manager wants keep-alives (`WATCHDOG_USEC` set, and
/// `WATCHDOG_PID`, if set, this process), spawn a task on the current
/// tokio runtime that sends WATCHDOG=1 every half period and return the
/// period. The task runs on the server's own worker threads, next to the
/// connections and accept loops, so the keep-alives stop when those
/// threads stop making progress (every worker stuck in a blocking call,
/// a deadlock) and systemd then restarts the service.
pub fn spawn_watchdog() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let period = sd_notify::watchdog_enabled()?;
    if period.is_zero() {
        return None;
    }
    let every = period / 2;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
    Some(period)
}
