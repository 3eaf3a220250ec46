//! The transport of one connection: the socket halves, the read buffer,
//! and the [`Outbox`] of encoded PDUs sent with vectored writes (headers
//! are copied, large data payloads are not).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use keyfence_iscsi::pdu::BHS_LEN;
use keyfence_iscsi::{Pdu, PduCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tracing::warn;

/// Data payloads at most this long are copied into the header buffer
/// rather than sent as their own iovec.
const COPY_THRESHOLD: usize = 2048;
/// Read buffer growth step.
const READ_CHUNK: usize = 256 * 1024;

/// Encoded PDUs waiting to be sent, in order. Large payloads are kept as
/// their own segments (no copy).
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Output segments in order; `scratch` is the tail still being filled.
    segs: VecDeque<Bytes>,
    scratch: BytesMut,
    /// Bytes queued (segments and scratch).
    queued: usize,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox {
            segs: VecDeque::new(),
            scratch: BytesMut::with_capacity(16 * 1024),
            queued: 0,
        }
    }

    /// Queue a PDU whose BHS is complete except for the lengths, framed by
    /// `codec` (digests), with data sent without copying when it is large.
    pub fn push(&mut self, codec: &PduCodec, bhs: &[u8; BHS_LEN], data: &Bytes) {
        let before = self.scratch.len();
        // The codec only fails for over-long data, which callers never
        // produce (data is cut to the peer's limit); drop the PDU rather
        // than panic if that invariant is ever broken.
        if let Err(e) = codec.encode_header(bhs, &[], data.len(), &mut self.scratch) {
            warn!("dropping PDU that cannot be encoded: {e}");
            return;
        }
        self.queued += self.scratch.len() - before;
        if data.is_empty() {
            return;
        }
        if data.len() <= COPY_THRESHOLD {
            self.scratch.extend_from_slice(data);
        } else {
            self.seal();
            self.segs.push_back(data.clone());
        }
        self.queued += data.len();
        let (t, n) = codec.data_trailer(data);
        self.scratch.extend_from_slice(&t[..n]);
        self.queued += n;
    }

    pub fn push_pdu(&mut self, codec: &PduCodec, pdu: &Pdu) {
        self.push(codec, &pdu.bhs, &pdu.data);
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Bytes waiting to be sent.
    pub fn len(&self) -> usize {
        self.queued
    }

    fn seal(&mut self) {
        if !self.scratch.is_empty() {
            self.segs.push_back(self.scratch.split().freeze());
        }
    }

    /// Everything queued as one buffer (for in-memory sessions).
    pub fn take_all(&mut self) -> BytesMut {
        self.seal();
        let mut out = BytesMut::with_capacity(self.queued);
        for s in self.segs.drain(..) {
            out.extend_from_slice(&s);
        }
        self.queued = 0;
        out
    }

    /// Drop `n` bytes from the front (they were written).
    fn consume(&mut self, n: usize) {
        self.queued -= n;
        let mut left = n;
        while left > 0 {
            let Some(front) = self.segs.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                self.segs.pop_front();
            } else {
                let _ = front.split_to(left);
                left = 0;
            }
        }
    }

    /// Send everything queued on `wr`.
    pub async fn write_to(&mut self, wr: &mut OwnedWriteHalf) -> std::io::Result<()> {
        self.seal();
        while !self.segs.is_empty() {
            let n = {
                let mut iov: [IoSlice<'_>; 64] = [IoSlice::new(&[]); 64];
                let mut k = 0;
                for s in self.segs.iter().take(64) {
                    iov[k] = IoSlice::new(s);
                    k += 1;
                }
                wr.write_vectored(&iov[..k]).await?
            };
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.consume(n);
        }
        Ok(())
    }
}

/// The socket of a connection, its read buffer and codec, and the output
/// of the login phase. In full feature phase the session takes the codec
/// and keeps its own [`Outbox`].
pub(crate) struct Wire {
    pub rd: OwnedReadHalf,
    pub wr: OwnedWriteHalf,
    pub rbuf: BytesMut,
    pub codec: PduCodec,
    out: Outbox,
    pub peer: SocketAddr,
}

impl Wire {
    pub fn new(sock: TcpStream, peer: SocketAddr) -> Wire {
        let (rd, wr) = sock.into_split();
        Wire {
            rd,
            wr,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            codec: PduCodec::new(),
            out: Outbox::new(),
            peer,
        }
    }

    /// Read more bytes; `Ok(false)` on end of stream.
    pub async fn fill(&mut self) -> std::io::Result<bool> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(READ_CHUNK);
        }
        Ok(self.rd.read_buf(&mut self.rbuf).await? > 0)
    }

    pub fn push_pdu(&mut self, pdu: &Pdu) {
        self.out.push_pdu(&self.codec, pdu);
    }

    /// Send the login phase's queued output.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.out.write_to(&mut self.wr).await
    }

    /// Send a session's queued output.
    pub async fn send(&mut self, out: &mut Outbox) -> std::io::Result<()> {
        out.write_to(&mut self.wr).await
    }
}
