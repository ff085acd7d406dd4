//! Negotiation: the untagged packets a client may send before its startup packet —
//! SSLRequest (answered `S` and followed by the TLS handshake when the proxy has a
//! certificate, else `N`), GSSENCRequest (always `N`) and CancelRequest (handed back
//! to the caller, which forwards it) — in the order PostgreSQL 15's
//! `ProcessStartupPacket` accepts them.
//!
//! Like PostgreSQL: bytes that arrived behind an SSLRequest or GSSENCRequest before
//! its answer are refused (FATAL 08P01 "received unencrypted data after SSL request"):
//! they were not protected by the encryption the client asked for and may have been
//! injected. A second SSLRequest (or GSSENCRequest) where PostgreSQL no longer accepts
//! one is an unsupported protocol (0A000 "unsupported frontend protocol 1234.5679").
//! Where PostgreSQL 15 would run the TLS handshake with such bytes still buffered, the
//! proxy refuses at once, in plaintext.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

use super::{Ended, Quiet};
use crate::client::{ClientConn, ClientError};
use crate::error::ProxyError;
use crate::wire::StartupPacket;

/// The client's stream: plain, or TLS after an accepted SSLRequest.
pub enum ClientStream<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// Taken for a TLS handshake that failed: every operation fails.
    Gone,
}

impl<S> ClientStream<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "client stream lost in TLS handshake",
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

/// What the client asked for once negotiation is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiated {
    /// A startup packet: protocol version and parameters, in the order sent.
    Startup {
        version: i32,
        params: Vec<(String, String)>,
    },
    /// A CancelRequest with the proxy's key: forward it, answer nothing, close.
    Cancel { pid: i32, secret: i32 },
}

/// The version field of an SSLRequest / GSSENCRequest seen as a protocol version.
const SSL_AS_VERSION: (u16, u16) = (1234, 5679);
const GSS_AS_VERSION: (u16, u16) = (1234, 5680);

/// Maps a failed read of a startup-phase packet.
pub(super) fn startup_read_error(e: ClientError) -> Ended {
    match e {
        ClientError::TimedOut => Ended::Quiet(Quiet::TimedOut),
        ClientError::Wire(_) => Ended::Refused(ProxyError::InvalidStartupPacket),
        ClientError::Io(_) | ClientError::Closed => Ended::Quiet(Quiet::Left),
    }
}

/// Answers SSLRequests and GSSENCRequests until the client sends its startup
/// packet or a CancelRequest. `tls`: the acceptor when the proxy offers TLS.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<ClientStream<S>>,
    tls: Option<&TlsAcceptor>,
    max_startup_packet: usize,
) -> Result<Negotiated, Ended> {
    // PostgreSQL's ssl_done / gss_done: which requests are no longer accepted.
    let mut ssl_done = false;
    let mut gss_done = false;
    loop {
        let packet = client
            .read_startup(max_startup_packet)
            .await
            .map_err(startup_read_error)?;
        match packet {
            StartupPacket::SslRequest if !ssl_done => {
                let accept = tls.filter(|_| !client.stream.is_tls());
                client.send_raw(if accept.is_some() { b"S" } else { b"N" });
                client.flush().await.map_err(startup_read_error)?;
                if !client.buffer_is_empty() {
                    return Err(Ended::Refused(ProxyError::DataAfterEncryptionRequest {
                        gss: false,
                    }));
                }
                if let Some(acceptor) = accept {
                    start_tls(client, acceptor).await?;
                }
                ssl_done = true;
                gss_done = client.stream.is_tls();
            }
            StartupPacket::GssEncRequest if !gss_done => {
                client.send_raw(b"N");
                client.flush().await.map_err(startup_read_error)?;
                if !client.buffer_is_empty() {
                    return Err(Ended::Refused(ProxyError::DataAfterEncryptionRequest {
                        gss: true,
                    }));
                }
                gss_done = true;
                ssl_done = false;
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                let (major, minor) = if packet == StartupPacket::SslRequest {
                    SSL_AS_VERSION
                } else {
                    GSS_AS_VERSION
                };
                return Err(Ended::Refused(ProxyError::UnsupportedProtocol {
                    major,
                    minor,
                }));
            }
            StartupPacket::Cancel { pid, secret } => return Ok(Negotiated::Cancel { pid, secret }),
            StartupPacket::Startup { version, params } => {
                return Ok(Negotiated::Startup { version, params })
            }
        }
    }
}

/// Runs the TLS handshake on the plain stream, within the connection's deadline.
async fn start_tls<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientConn<ClientStream<S>>,
    acceptor: &TlsAcceptor,
) -> Result<(), Ended> {
    let ClientStream::Plain(plain) = std::mem::replace(&mut client.stream, ClientStream::Gone)
    else {
        return Err(Ended::Quiet(Quiet::TlsFailed));
    };
    let handshake = acceptor.accept(plain);
    let done = match client.deadline() {
        Some(d) => tokio::time::timeout_at(d, handshake)
            .await
            .map_err(|_| Ended::Quiet(Quiet::TimedOut))?,
        None => handshake.await,
    };
    match done {
        Ok(tls) => {
            client.stream = ClientStream::Tls(Box::new(tls));
            Ok(())
        }
        Err(e) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            Err(Ended::Quiet(Quiet::TlsFailed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SqlState;
    use crate::wire::{CANCEL_REQUEST, GSSENC_REQUEST, PROTOCOL_3_0, SSL_REQUEST};
    use bytes::{BufMut, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn code(c: i32) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_i32(c);
        b.to_vec()
    }

    fn startup(user: &str) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_i32(PROTOCOL_3_0);
        body.put_slice(format!("user\0{user}\0\0").as_bytes());
        let mut b = BytesMut::new();
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(&body);
        b.to_vec()
    }

    fn conn() -> (ClientConn<ClientStream<DuplexStream>>, DuplexStream) {
        let (server, peer) = tokio::io::duplex(64 * 1024);
        (ClientConn::new(ClientStream::Plain(server), 1 << 20), peer)
    }

    /// Sends `writes` one at a time, each after the one-byte answer to the previous,
    /// and returns the outcome and the answers the client got.
    async fn run(writes: Vec<Vec<u8>>) -> (Result<Negotiated, Ended>, Vec<u8>) {
        let (mut c, mut peer) = conn();
        let n = writes.len();
        let client = async move {
            let mut got = Vec::new();
            for (i, w) in writes.into_iter().enumerate() {
                peer.write_all(&w).await.unwrap();
                if i + 1 < n {
                    let mut b = [0u8; 1];
                    peer.read_exact(&mut b).await.unwrap();
                    got.push(b[0]);
                }
            }
            (peer, got)
        };
        let (r, (peer, got)) = tokio::join!(negotiate(&mut c, None, 10_000), client);
        drop(peer);
        (r, got)
    }

    fn refused(r: Result<Negotiated, Ended>) -> ProxyError {
        match r {
            Err(Ended::Refused(e)) => e,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn ssl_then_gss_requests_are_declined_and_the_startup_packet_follows() {
        let (r, got) = run(vec![
            code(SSL_REQUEST),
            code(GSSENC_REQUEST),
            startup("app"),
        ])
        .await;
        assert_eq!(got, b"NN");
        match r.unwrap() {
            Negotiated::Startup { version, params } => {
                assert_eq!(version, PROTOCOL_3_0);
                assert_eq!(params, vec![("user".into(), "app".into())]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_startup_packet_in_the_same_write_as_the_ssl_request_is_refused_after_the_answer() {
        let (mut c, mut peer) = conn();
        let mut both = code(SSL_REQUEST);
        both.extend(startup("app"));
        peer.write_all(&both).await.unwrap();
        let e = refused(negotiate(&mut c, None, 10_000).await);
        assert_eq!(e.sqlstate(), SqlState::ProtocolViolation);
        assert_eq!(e.message(), "received unencrypted data after SSL request");
        // The `N` answer went out first, as PostgreSQL sends it.
        let mut b = [0u8; 1];
        peer.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"N");
    }

    #[tokio::test]
    async fn data_behind_a_gss_request_is_refused_too() {
        let (mut c, mut peer) = conn();
        let mut both = code(GSSENC_REQUEST);
        both.extend(startup("app"));
        peer.write_all(&both).await.unwrap();
        let e = refused(negotiate(&mut c, None, 10_000).await);
        assert_eq!(
            e.message(),
            "received unencrypted data after GSSAPI encryption request"
        );
    }

    #[tokio::test]
    async fn a_repeated_request_is_an_unsupported_protocol_like_postgresql_says() {
        let (r, got) = run(vec![code(GSSENC_REQUEST), code(GSSENC_REQUEST)]).await;
        assert_eq!(got, b"N");
        let e = refused(r);
        assert_eq!(e.sqlstate(), SqlState::FeatureNotSupported);
        assert_eq!(
            e.message(),
            "unsupported frontend protocol 1234.5680: server supports 3.0 to 3.0"
        );
        let (r, got) = run(vec![code(SSL_REQUEST), code(SSL_REQUEST)]).await;
        assert_eq!(got, b"N");
        assert!(refused(r).message().contains("1234.5679"));
    }

    #[tokio::test]
    async fn a_cancel_request_is_handed_back_and_nothing_is_answered() {
        let mut cancel = BytesMut::new();
        cancel.put_i32(16);
        cancel.put_i32(CANCEL_REQUEST);
        cancel.put_i32(7);
        cancel.put_i32(-9);
        let (r, got) = run(vec![cancel.to_vec()]).await;
        assert!(got.is_empty());
        assert_eq!(r.unwrap(), Negotiated::Cancel { pid: 7, secret: -9 });
    }

    #[tokio::test]
    async fn garbage_is_an_invalid_startup_packet_and_silence_times_out_quietly() {
        let (r, _) = run(vec![vec![0, 0, 0, 2]]).await;
        assert_eq!(refused(r), ProxyError::InvalidStartupPacket);
        let (mut c, _peer) = conn();
        c.set_deadline(Some(
            tokio::time::Instant::now() + std::time::Duration::from_millis(30),
        ));
        match negotiate(&mut c, None, 10_000).await {
            Err(Ended::Quiet(Quiet::TimedOut)) => {}
            other => panic!("{other:?}"),
        }
    }
}
