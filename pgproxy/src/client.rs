//! The client side of a session: a framed, buffered stream.
//!
//! Generic over the stream so sessions can be driven over `tokio::io::duplex`
//! in tests. Writes are buffered and sent on [`ClientConn::flush`]; the session
//! flushes when it has nothing more to forward immediately, which batches the
//! many small messages of a result into few syscalls.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
}

pub struct ClientConn<S> {
    pub stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_message: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientConn<S> {
    pub fn new(stream: S, max_message: usize) -> Self {
        ClientConn {
            stream,
            rbuf: BytesMut::with_capacity(8 * 1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
            max_message,
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

    /// Reads the next untagged startup-phase packet.
    pub async fn read_startup(&mut self, max: usize) -> Result<StartupPacket, ClientError> {
        loop {
            if let Some(p) = wire::try_startup(&mut self.rbuf, max)? {
                return Ok(p);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Reads the next tagged message. Cancel-safe: bytes read stay buffered.
    pub async fn read_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some(f) = wire::try_frame(&mut self.rbuf, self.max_message)? {
                wire::shrink_after_large(&mut self.rbuf, 8 * 1024);
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
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
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.stream.flush().await?;
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
}
