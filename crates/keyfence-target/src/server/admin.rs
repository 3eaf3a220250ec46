//! The admin socket: a local Unix socket through which `keyfence status`
//! reads what the server is doing and `keyfence reload` makes it re-read
//! its configuration.
//!
//! Access control is the file's permissions: the socket is created with
//! mode 0600, so only its owner (and root) can connect. A socket file left
//! by a server that died is replaced; one a live server answers on is an
//! error.
//!
//! The protocol is one request per connection, each a single line of
//! JSON: `{"request":"status"}` or `{"request":"reload"}`. The answer is
//! one line of JSON too: `{"ok":true,"status":{...}}`,
//! `{"ok":true,"reload":"what changed"}` or `{"ok":false,"error":"..."}`.
//! A request longer than [`MAX_REQUEST`] bytes or not complete within
//! [`REQUEST_TIMEOUT`] is answered with an error and the connection closed.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::Shared;

/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 4096;
/// Time a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more wait.
const MAX_CLIENTS: usize = 8;

/// A request to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "lowercase")]
pub enum Request {
    Status,
    Reload,
}

/// The server's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// What a reload changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn error(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            status: None,
            reload: None,
            error: Some(msg.into()),
        }
    }
}

/// What `keyfence status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    /// Reloads applied since the start.
    pub config_generation: u64,
    pub discovery_chap: bool,
    pub targets: Vec<TargetStatus>,
    pub sessions: Vec<SessionStatus>,
    /// `[limits]` in force, by their configuration names.
    pub limits: serde_json::Value,
    /// Where `GET /metrics` is served, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub portals: Vec<PortalStatus>,
    /// "open" (any initiator) or "acl".
    pub access: String,
    pub acl_entries: usize,
    pub chap: bool,
    pub luns: Vec<LunStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortalStatus {
    pub tpgt: u16,
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LunStatus {
    pub lun: u64,
    pub size_bytes: u64,
    pub block_size: u32,
    pub blocks: u64,
    /// "file PATH" or "device PATH".
    pub backing: String,
    pub read_only: bool,
    pub pr: PrSummary,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrSummary {
    pub generation: u32,
    pub registrations: usize,
    pub aptpl: bool,
    pub reservation: Option<ReservationStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReservationStatus {
    /// As SPC-4 names it, e.g. "Write Exclusive, registrants only".
    #[serde(rename = "type")]
    pub pr_type: String,
    pub type_code: u8,
    /// The holding I_T nexus ("INITIATOR,i,0xISID,TARGET,t,TPGT"); `None`
    /// for the all-registrants types, where every registrant holds it.
    pub holder: Option<String>,
    /// The holder's reservation key, hex.
    pub key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStatus {
    pub tsih: u16,
    pub initiator: String,
    /// 12 hex digits.
    pub isid: String,
    /// "normal" or "discovery".
    #[serde(rename = "type")]
    pub kind: String,
    pub target: Option<String>,
    pub tpgt: u16,
    /// The portal the connection came in on.
    pub portal: Option<String>,
    pub peer: String,
    pub age_secs: u64,
    /// Seconds since the Unix epoch when the session started.
    pub since_unix: u64,
    pub params: ParamsStatus,
}

/// The negotiated operational parameters (RFC 7143 section 13).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParamsStatus {
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_recv_data_segment_length: u32,
    pub max_send_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u16,
    pub error_recovery_level: u8,
}

/// The bound admin socket; the file is removed when this is dropped (if it
/// is still the one bound).
#[derive(Debug)]
pub(crate) struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file, so that only this one is removed.
    id: (u64, u64),
}

impl AdminSocket {
    /// Bind `path` with mode 0600, replacing a stale socket file.
    pub fn bind(path: &Path) -> Result<AdminSocket, String> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err("exists and is not a socket; remove it or set admin_socket".into())
            }
            Ok(_) => {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => return Err(
                        "another keyfence serve is listening on it; stop it or set admin_socket"
                            .into(),
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        // Left by a server that is gone.
                        std::fs::remove_file(path)
                            .map_err(|e| format!("cannot remove the stale socket file: {e}"))?;
                    }
                    Err(e) => return Err(format!("cannot check the existing socket file: {e}")),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.to_string()),
        }
        // Created 0600 from the start (no window where others may connect):
        // the umask applies to the socket file bind creates.
        // SAFETY: umask only changes the process's file mode mask; it is
        // restored right after bind.
        let old = unsafe { libc::umask(0o177) };
        let bound = std::os::unix::net::UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let std_listener = bound.map_err(|e| e.to_string())?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot set mode 0600: {e}"))?;
        let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let listener = UnixListener::from_std(std_listener).map_err(|e| e.to_string())?;
        Ok(AdminSocket {
            listener,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answer requests until the server shuts down.
    pub async fn serve(self, shared: Arc<Shared>) {
        let mut shutdown = shared.shutdown.clone();
        let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                r = self.listener.accept() => r,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(path = %self.path.display(), "admin socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = clients.clone().acquire_owned().await else {
                break;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(&shared, stream).await {
                    debug!("admin client: {e}");
                }
                drop(permit);
            });
        }
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

async fn handle(shared: &Arc<Shared>, stream: UnixStream) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    // One byte more than allowed, to tell a long line from a full one.
    let mut rd = BufReader::new(rd.take(MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    let response =
        match tokio::time::timeout(REQUEST_TIMEOUT, rd.read_until(b'\n', &mut line)).await {
            Err(_) => Response::error(format!(
                "no complete request within {} s",
                REQUEST_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) if line.len() > MAX_REQUEST => {
                Response::error(format!("request longer than {MAX_REQUEST} bytes"))
            }
            Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
                Err(e) => Response::error(format!("bad request: {e}")),
                Ok(Request::Status) => Response {
                    ok: true,
                    status: Some(status(shared)),
                    reload: None,
                    error: None,
                },
                Ok(Request::Reload) => match super::reload::reload(shared).await {
                    Ok(summary) => Response {
                        ok: true,
                        status: None,
                        reload: Some(summary),
                        error: None,
                    },
                    Err(e) => Response::error(e.to_string()),
                },
            },
        };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    wr.shutdown().await
}

/// What the server is serving, now.
pub(crate) fn status(shared: &Shared) -> Status {
    let live = shared.live();
    let targets = live
        .targets()
        .map(|(_, t)| TargetStatus {
            name: t.name.clone(),
            portals: t
                .portals
                .iter()
                .map(|p| PortalStatus {
                    tpgt: p.tpgt,
                    address: keyfence_iscsi::text::format_address(p.addr),
                })
                .collect(),
            access: if t.acl.is_open() { "open" } else { "acl" }.into(),
            acl_entries: t.acl.len(),
            chap: t.acl.any_chap(),
            luns: t
                .luns
                .iter()
                .map(|(lun, lu)| {
                    let bs = lu.config().block_size;
                    let blocks = lu.block_count();
                    let pr = lu.reservations().snapshot();
                    let reservation = pr.reservation.as_ref().map(|r| {
                        let key = r.holder.as_ref().and_then(|h| {
                            pr.registration(h).map(|reg| format!("0x{:016x}", reg.key))
                        });
                        ReservationStatus {
                            pr_type: r.pr_type.description().to_string(),
                            type_code: r.pr_type.to_u8(),
                            holder: r.holder.as_ref().map(nexus_name),
                            key,
                        }
                    });
                    LunStatus {
                        lun: *lun,
                        size_bytes: blocks.saturating_mul(u64::from(bs)),
                        block_size: bs,
                        blocks,
                        backing: t.backing.get(lun).cloned().unwrap_or_default(),
                        read_only: lu.config().read_only,
                        pr: PrSummary {
                            generation: pr.generation,
                            registrations: pr.registrations.len(),
                            aptpl: pr.aptpl,
                            reservation,
                        },
                    }
                })
                .collect(),
        })
        .collect();
    let sessions = shared
        .sessions()
        .list()
        .into_iter()
        .map(|(target, i)| SessionStatus {
            tsih: i.tsih,
            initiator: i.initiator.clone(),
            isid: format!("{:012x}", i.isid),
            kind: if target.is_some() {
                "normal"
            } else {
                "discovery"
            }
            .into(),
            target: target.and_then(|t| live.target(t).map(|t| t.name.clone())),
            tpgt: i.tpgt,
            portal: i.local.map(keyfence_iscsi::text::format_address),
            peer: i.peer.to_string(),
            age_secs: i.started.elapsed().as_secs(),
            since_unix: i
                .since
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            params: ParamsStatus {
                header_digest: i.params.header_digest,
                data_digest: i.params.data_digest,
                max_connections: i.params.max_connections,
                initial_r2t: i.params.initial_r2t,
                immediate_data: i.params.immediate_data,
                max_recv_data_segment_length: i.params.max_recv_data_segment_length,
                max_send_data_segment_length: i.params.max_send_data_segment_length,
                max_burst_length: i.params.max_burst_length,
                first_burst_length: i.params.first_burst_length,
                max_outstanding_r2t: i.params.max_outstanding_r2t,
                error_recovery_level: i.params.error_recovery_level,
            },
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        uptime_secs: shared.started.elapsed().as_secs(),
        config_generation: live.generation,
        discovery_chap: live.discovery_chap.is_some(),
        targets,
        sessions,
        limits: serde_json::to_value(&live.limits).unwrap_or_default(),
        metrics: shared.acceptors().metrics_addr().map(|a| a.to_string()),
    }
}

/// An I_T nexus as sg_persist prints a transport ID, with the ISID:
/// `iqn...,i,0x<isid>` and the target port.
fn nexus_name(n: &keyfence_scsi::Nexus) -> String {
    format!(
        "{},i,0x{:012x} -> {},t,0x{:04x}",
        n.initiator.name, n.initiator.isid, n.target.name, n.target.tpgt
    )
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no keyfence server is listening on {} ({err})", .path.display())]
    NotRunning { path: PathBuf, err: std::io::Error },
    #[error("admin socket {}: {err}", .path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("admin socket {}: unreadable answer: {err}", .path.display())]
    Protocol { path: PathBuf, err: String },
}

/// Send `req` to the server listening on `path` and wait (at most
/// `timeout`) for its answer. For `keyfence status` and `keyfence reload`.
pub fn request(path: &Path, req: Request, timeout: Duration) -> Result<Response, ClientError> {
    use std::io::{BufRead, Write};
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|err| ClientError::NotRunning {
            path: path.to_path_buf(),
            err,
        })?;
    let io = |err| ClientError::Io {
        path: path.to_path_buf(),
        err,
    };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(&req).map_err(|e| ClientError::Protocol {
        path: path.to_path_buf(),
        err: e.to_string(),
    })?;
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut answer)
        .map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
        path: path.to_path_buf(),
        err: e.to_string(),
    })
}
