//! One connection task: the login phase, then the loop that drives the
//! full feature phase [`Session`] with the socket. It reads into one
//! buffer and hands the bytes to the session, sends the session's outbox
//! with vectored writes, runs the session's jobs (every command that
//! touches the medium or may block, except READs served from the page
//! cache without waiting) through its [`SessionIo`] queue on the blocking
//! pool and feeds their completions back, and fires the session's timers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub(crate) use super::ffp::ConnEnd;
use super::ffp::{Completion, Session};
use super::iopool::{Done, SessionIo};
use super::login;
pub(crate) use super::wire::Wire;
use super::{ListenerInfo, Shared};

/// How long an initiator may leave our responses unread before the
/// connection is dropped.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// Entry point of a connection task.
pub(super) async fn serve_connection(
    shared: Arc<Shared>,
    info: Arc<ListenerInfo>,
    sock: TcpStream,
    peer: SocketAddr,
) {
    let mut wire = Wire::new(sock, peer);
    debug!(%peer, portal = %info.addr, "connection accepted");
    let timeout = Duration::from_secs(u64::from(shared.live().limits.login_timeout_secs));
    let mut shutdown = shared.shutdown.clone();
    let attempt = tokio::select! {
        r = tokio::time::timeout(timeout, login::login(&shared, &info, &mut wire)) => r,
        _ = shutdown.wait_for(|s| *s) => {
            debug!(%peer, "target shutting down during login");
            return;
        }
    };
    let est = match attempt {
        Ok(Ok(Some(est))) => est,
        Ok(Ok(None)) => {
            let _ = wire.flush().await;
            debug!(%peer, "login ended without a session");
            return;
        }
        Ok(Err(e)) => {
            let _ = wire.flush().await;
            debug!(%peer, "login failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%peer, "login timed out");
            return;
        }
    };
    let codec = std::mem::take(&mut wire.codec);
    let mut sess = Session::new(shared.clone(), est, peer, codec, Instant::now().into_std());
    let tsih = sess.tsih();
    info!(%peer, tsih, initiator = %sess.initiator(), kind = ?sess.kind(), "session started");
    let (io, mut done) = match SessionIo::new() {
        Ok(q) => q,
        Err(e) => {
            // Out of file descriptors: the session cannot run commands.
            // It ran none; release what its login took and close.
            warn!(%peer, tsih, "session ended: cannot set up its I/O queue: {e}");
            let _ = tokio::task::spawn_blocking(move || sess.end()).await;
            return;
        }
    };
    let end = run(&shared, &mut sess, &mut wire, &io, &mut done).await;
    finish(&mut sess, &mut wire, &io, &mut done).await;
    // Releasing the I_T nexus takes each LU's reservation lock, which a
    // PR OUT may hold across its APTPL fsync, and in cluster mode waits
    // for an etcd commit: not on a worker thread. A logout's response is
    // queued by it, so it is sent only once the nexus loss is in force.
    match tokio::task::spawn_blocking(move || {
        sess.end();
        sess
    })
    .await
    {
        Ok(mut sess) => {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = wire.send(sess.outbox()).await;
                let _ = wire.wr.shutdown().await;
            })
            .await;
        }
        Err(e) => warn!(%peer, tsih, "releasing the I_T nexus failed: {e}"),
    }
    match &end {
        ConnEnd::Eof | ConnEnd::Logout | ConnEnd::Closed(_) => {
            info!(%peer, tsih, "session ended: {end}")
        }
        _ => warn!(%peer, tsih, "session ended: {end}"),
    }
}

/// Hand the session's jobs to its I/O queue.
fn spawn_jobs(sess: &mut Session, io: &Arc<SessionIo>) {
    io.submit(sess.jobs());
}

/// Feed completions to the session (every one waiting, so they are
/// answered with one send).
fn complete_all(sess: &mut Session, batch: impl Iterator<Item = Completion>) {
    for c in batch {
        sess.complete(c);
    }
}

async fn run(
    shared: &Shared,
    sess: &mut Session,
    wire: &mut Wire,
    io: &Arc<SessionIo>,
    done: &mut Done,
) -> ConnEnd {
    let mut shutdown = shared.shutdown.clone();
    let mut ctl = sess
        .take_ctl()
        .unwrap_or_else(|| mpsc::unbounded_channel().1);
    loop {
        spawn_jobs(sess, io);
        if !sess.outbox().is_empty() {
            // An initiator that stops reading must not pin the task:
            // bound the wait and keep listening for shutdown and
            // reinstatement meanwhile.
            tokio::select! {
                r = tokio::time::timeout(WRITE_STALL, wire.send(sess.outbox())) => match r {
                    Ok(Ok(())) => sess.flushed(),
                    Ok(Err(e)) => return ConnEnd::Io(e),
                    Err(_) => return ConnEnd::Protocol("initiator stopped reading".into()),
                },
                _ = shutdown.wait_for(|s| *s) => return ConnEnd::Closed("target shutting down"),
                Some(c) = ctl.recv() => {
                    // The unsent output is kept; send it next round.
                    sess.handle_ctl(c);
                    continue;
                }
            }
        } else {
            sess.flushed();
        }
        if let Some(end) = sess.take_closing() {
            return end;
        }
        let deadline = Instant::from_std(sess.poll_timeout());
        tokio::select! {
            r = wire.fill() => match r {
                Ok(true) => {
                    // Control messages sent before these bytes arrived (a
                    // reload that has returned, an abort) apply to the
                    // commands in them: `select!` may have picked the
                    // socket although both were ready.
                    while let Ok(c) = ctl.try_recv() {
                        sess.handle_ctl(c);
                    }
                    sess.input(&mut wire.rbuf, std::time::Instant::now())
                }
                Ok(false) => return ConnEnd::Eof,
                Err(e) => return ConnEnd::Io(e),
            },
            Some(c) = done.next() => complete_all(sess, c),
            Some(c) = ctl.recv() => sess.handle_ctl(c),
            _ = tokio::time::sleep_until(deadline) => sess.handle_timeout(std::time::Instant::now()),
            _ = shutdown.wait_for(|s| *s) => return ConnEnd::Closed("target shutting down"),
        }
    }
}

/// After the loop: let commands running on the blocking pool finish
/// (their results are discarded if the socket is gone) and send what is
/// left; the caller then releases the I_T nexus, sends what that queued
/// (a logout's response) and closes the socket.
async fn finish(sess: &mut Session, wire: &mut Wire, io: &Arc<SessionIo>, done: &mut Done) {
    loop {
        spawn_jobs(sess, io);
        if sess.jobs_running() == 0 {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(30), done.next()).await {
            Ok(Some(batch)) => complete_all(sess, batch),
            _ => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), wire.send(sess.outbox())).await;
}
