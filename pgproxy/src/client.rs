//! The client side of a session: a framed, buffered stream.
//!
//! Generic over the stream so sessions can be driven over `tokio::io::duplex`
//! in tests. Writes are buffered and sent on [`ClientConn::flush`]; the session
//! flushes when it has nothing more to forward immediately, which batches the
//! many small messages of a result into few syscalls.
//!
//! Before the session (negotiation and authentication) the connection carries a
//! deadline ([`ClientConn::set_deadline`], `client_login_timeout`): every read and
//! flush fails with [`ClientError::TimedOut`] once it has passed, so a client that
//! sends nothing, dribbles its startup packet or stops halfway through SCRAM
//! cannot hold the connection. The session clears it.

use std::future::Future;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::error::{ProxyError, Severity};
use crate::wire::{self, Frame, StartupPacket, WireError};

/// Errors on the client connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("client closed the connection")]
    Closed,
    #[error("{0}")]
    Wire(#[from] WireError),
    /// The connection's deadline passed (see [`ClientConn::set_deadline`]).
    #[error("the client did not finish in time")]
    TimedOut,
}

pub struct ClientConn<S> {
    pub stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_message: usize,
    deadline: Option<Instant>,
}

/// Runs one I/O step, bounded by `deadline` if there is one.
async fn until<T>(
    deadline: Option<Instant>,
    step: impl Future<Output = std::io::Result<T>>,
) -> Result<T, ClientError> {
    match deadline {
        None => Ok(step.await?),
        Some(d) => match tokio::time::timeout_at(d, step).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ClientError::TimedOut),
        },
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientConn<S> {
    pub fn new(stream: S, max_message: usize) -> Self {
        ClientConn {
            stream,
            rbuf: BytesMut::with_capacity(8 * 1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
            max_message,
            deadline: None,
        }
    }

    /// Takes over bytes already read (e.g. while negotiating TLS).
    pub fn with_buffer(stream: S, max_message: usize, rbuf: BytesMut) -> Self {
        let mut c = Self::new(stream, max_message);
        c.rbuf = rbuf;
        c
    }

    /// Gives back the stream and any bytes read but not consumed.
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.stream, self.rbuf)
    }

    /// Bounds every later read and flush by `deadline` (`None`: unbounded).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Reads the next untagged startup-phase packet.
    pub async fn read_startup(&mut self, max: usize) -> Result<StartupPacket, ClientError> {
        loop {
            if let Some(p) = wire::try_startup(&mut self.rbuf, max)? {
                return Ok(p);
            }
            if until(self.deadline, self.stream.read_buf(&mut self.rbuf)).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Reads the next tagged message. Cancel-safe: bytes read stay buffered.
    pub async fn read_frame(&mut self) -> Result<Frame, ClientError> {
        self.read_frame_limited(self.max_message).await
    }

    /// Reads the next tagged message, refusing one announced longer than `max`
    /// (or than the connection's own limit) as soon as its length is known.
    pub async fn read_frame_limited(&mut self, max: usize) -> Result<Frame, ClientError> {
        let max = max.min(self.max_message);
        loop {
            if let Some(f) = wire::try_frame(&mut self.rbuf, max)? {
                wire::shrink_after_large(&mut self.rbuf, 8 * 1024);
                return Ok(f);
            }
            if until(self.deadline, self.stream.read_buf(&mut self.rbuf)).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Returns a complete buffered frame without reading from the socket.
    pub fn try_buffered_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        Ok(wire::try_frame(&mut self.rbuf, self.max_message)?)
    }

    /// True if no unread bytes are buffered.
    pub fn buffer_is_empty(&self) -> bool {
        self.rbuf.is_empty()
    }

    pub fn send(&mut self, frame: &Frame) {
        self.wbuf.extend_from_slice(&frame.raw);
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    pub fn pending_output(&self) -> usize {
        self.wbuf.len()
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.wbuf.is_empty() {
            until(self.deadline, self.stream.write_all(&self.wbuf)).await?;
            self.wbuf.clear();
        }
        until(self.deadline, self.stream.flush()).await?;
        Ok(())
    }

    /// Writes `buf` (then empties it) and flushes: the session engine's output.
    pub async fn write_out(&mut self, buf: &mut BytesMut) -> Result<(), ClientError> {
        self.flush().await?;
        if !buf.is_empty() {
            self.stream.write_all(buf).await?;
            buf.clear();
            wire::shrink_after_large(buf, 16 * 1024);
        }
        self.stream.flush().await?;
        Ok(())
    }

    /// Sends an `ErrorResponse` and flushes (best effort: the client may be gone).
    pub async fn fatal(&mut self, code: &str, message: &str) {
        self.send(&wire::error_response("FATAL", code, message));
        let _ = self.flush().await;
    }

    /// Sends `error` as a FATAL `ErrorResponse` and flushes, best effort and within
    /// `grace` whatever the connection's deadline (a client that does not read must
    /// not hold the connection open).
    pub async fn refuse(&mut self, error: &ProxyError, grace: std::time::Duration) {
        self.deadline = Some(Instant::now() + grace);
        self.send(&error.to_frame(Severity::Fatal));
        let _ = self.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_deadline_ends_a_read_that_gets_no_bytes() {
        let (server, mut peer) = tokio::io::duplex(1024);
        let mut conn = ClientConn::new(server, 1 << 20);
        conn.set_deadline(Some(Instant::now() + Duration::from_millis(50)));
        // Half a startup packet, then silence.
        peer.write_all(&[0, 0, 0, 40, 0, 3]).await.unwrap();
        let started = std::time::Instant::now();
        let e = conn.read_startup(10_000).await.unwrap_err();
        assert!(matches!(e, ClientError::TimedOut), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Without a deadline the same read would wait: the session clears it.
        conn.set_deadline(None);
        let pending =
            tokio::time::timeout(Duration::from_millis(50), conn.read_startup(10_000)).await;
        assert!(pending.is_err(), "an unbounded read returned: {pending:?}");
    }

    #[tokio::test]
    async fn a_message_announced_over_the_limit_is_refused_before_its_body() {
        let (server, mut peer) = tokio::io::duplex(1024);
        let mut conn = ClientConn::new(server, 1 << 30);
        // A password message announcing 1 GiB; only its header is sent.
        peer.write_all(&[b'p', 0x3f, 0xff, 0xff, 0xc0])
            .await
            .unwrap();
        let e = conn.read_frame_limited(8192).await.unwrap_err();
        assert!(
            matches!(e, ClientError::Wire(WireError::TooLarge { max: 8192, .. })),
            "{e:?}"
        );
    }
}
