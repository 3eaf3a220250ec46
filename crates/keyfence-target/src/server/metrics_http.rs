//! `GET /metrics` over HTTP/1.x: a small responder on a thread of its
//! own, with its own single-threaded runtime, so that scrapes (and
//! whoever connects to the port) never run on the threads that serve iSCSI
//! sessions. It answers one request per connection and closes it.
//!
//! Why not hyper (which the workspace already has through tonic): the
//! endpoint needs one method on one path, and its bounds must be explicit
//! and testable; hyper's server would need hyper-util for the tokio glue
//! and timers and still leave the connection limit to us. Here every
//! bound is a constant:
//!
//! * at most [`MAX_CONNECTIONS`] connections at once (more are closed at
//!   once, without reading),
//! * the request head (request line and headers) must arrive within
//!   [`READ_TIMEOUT`] (408 otherwise) and fit in [`MAX_HEAD`] bytes (431),
//! * the response must be taken within [`WRITE_TIMEOUT`].
//!
//! Anything but `GET` or `HEAD` of `/metrics` gets a 4xx: 400 for a
//! request line that does not parse, 405 for another method, 404 for
//! another path, 505 for a version other than HTTP/1.0 or 1.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

use super::metrics::Metrics;

/// Scrapes served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// Largest request head accepted.
pub const MAX_HEAD: usize = 8192;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running endpoint: its thread serves until the server shuts down or
/// [`Endpoint::stop`] (a reload moved it) or the endpoint is dropped.
#[derive(Debug)]
pub(crate) struct Endpoint {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Endpoint {
    /// Serve `listener` (bound to `addr`) on a new thread.
    pub fn start(
        listener: std::net::TcpListener,
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Endpoint> {
        let (stop, stopped) = watch::channel(false);
        let thread = spawn(listener, metrics, shutdown, stopped)?;
        Ok(Endpoint {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting; the returned thread ends (closing the socket)
    /// promptly. Scrapes in progress are cut short.
    pub fn stop(mut self) -> Option<std::thread::JoinHandle<()>> {
        let _ = self.stop.send(true);
        self.thread.take()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Serve `listener` on a new thread until `shutdown` or `stop` turns
/// true.
fn spawn(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("keyfence-metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => accept_loop(l, metrics, shutdown, stop).await,
                    Err(e) => warn!("metrics endpoint: {e}"),
                }
            })
        })
}

async fn accept_loop(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = stop.wait_for(|s| *s) => break,
            r = listener.accept() => r,
        };
        let (sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                debug!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics endpoint: {MAX_CONNECTIONS} scrapes in progress; connection closed");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            serve(sock, peer, &metrics).await;
            drop(permit);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Metrics { head_only: bool },
    Error(u16, &'static str),
}

/// Parse a complete request head (up to and including the blank line).
pub(crate) fn parse_head(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Error(400, "request head is not UTF-8");
    };
    let line = text.split("\r\n").next().unwrap_or("");
    let line = line.split('\n').next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Error(400, "malformed request line");
    };
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_alphabetic())
        || !target.starts_with('/')
        || !version.starts_with("HTTP/")
    {
        return Request::Error(400, "malformed request line");
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Request::Error(505, "only HTTP/1.0 and HTTP/1.1 are served");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::Error(405, "only GET and HEAD are served"),
    };
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return Request::Error(404, "the only path served is /metrics");
    }
    Request::Metrics { head_only }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Read the request head: Ok(bytes up to the blank line), or the status
/// to refuse it with.
async fn read_head(sock: &mut TcpStream) -> Result<Vec<u8>, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            if let Some(end) = head_end(&buf) {
                buf.truncate(end);
                return Ok(());
            }
            if buf.len() >= MAX_HEAD {
                return Err(431);
            }
            let want = chunk.len().min(MAX_HEAD + 4 - buf.len());
            match sock.read(&mut chunk[..want]).await {
                Ok(0) | Err(_) => return Err(400),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(())) if buf.len() <= MAX_HEAD => Ok(buf),
        Ok(Ok(())) => Err(431),
        Ok(Err(code)) => Err(code),
        Err(_) => Err(408),
    }
}

/// Where the head ends (after "\r\n\r\n" or "\n\n").
fn head_end(buf: &[u8]) -> Option<usize> {
    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        return Some(i + 4);
    }
    buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

async fn serve(mut sock: TcpStream, peer: SocketAddr, metrics: &Metrics) {
    let response = match read_head(&mut sock).await {
        Err(code) => error_response(code, "request not read"),
        Ok(head) => match parse_head(&head) {
            Request::Error(code, why) => {
                debug!(%peer, code, "metrics endpoint: {why}");
                error_response(code, why)
            }
            Request::Metrics { head_only } => {
                let body = metrics.encode();
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if !head_only {
                    r.push_str(&body);
                }
                r
            }
        },
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        let _ = sock.write_all(response.as_bytes()).await;
        let _ = sock.shutdown().await;
    })
    .await;
}

fn error_response(code: u16, why: &str) -> String {
    let body = format!("{why}\n");
    let allow = if code == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: text/plain; charset=utf-8\r\n{allow}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(code),
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        let ok = Request::Metrics { head_only: false };
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), ok);
        assert_eq!(parse_head(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), ok);
        assert_eq!(
            parse_head(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Request::Metrics { head_only: true }
        );
        let code = |h: &[u8]| match parse_head(h) {
            Request::Error(c, _) => c,
            Request::Metrics { .. } => 200,
        };
        assert_eq!(code(b"POST /metrics HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(code(b"GET / HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(code(b"GET /metrics HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(code(b"GET /metrics\r\n\r\n"), 400);
        assert_eq!(code(b"\x16\x03\x01\x02\x00\x01\r\n\r\n"), 400);
        assert_eq!(code(b"GET  /metrics HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(code(b"G\xffT /metrics HTTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn head_ends_at_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
