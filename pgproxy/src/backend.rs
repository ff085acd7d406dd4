//! One connection from the proxy to a PostgreSQL server.
//!
//! Connecting does the whole startup: optional TLS (libpq-like modes), the
//! startup message, authentication (SCRAM-SHA-256 via postgres-protocol's
//! client, md5, cleartext) and collection of `ParameterStatus`/`BackendKeyData`.
//! After that the connection is a framed byte pipe: the session writes client
//! frames into it and reads whole backend frames out of it without decoding
//! rows. The connection also remembers what the pool needs to know about it:
//! its transaction status, which prepared statements it holds, and whether it
//! must be reset before another client may use it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::engine::backend_state::{BackendState, Reset};
use crate::protocol::backend::TxStatus;
use crate::stream::MaybeTls;
use crate::tls::BackendTls;
use crate::wire::{self, Frame};

/// Why a backend connection failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to {0}")]
    Timeout(String),
    #[error("backend i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend closed the connection")]
    Closed,
    #[error("TLS to backend: {0}")]
    Tls(String),
    #[error("backend authentication: {0}")]
    Auth(String),
    #[error("backend error {code}: {message}")]
    Server { code: String, message: String },
    #[error("backend protocol violation: {0}")]
    Protocol(String),
    /// The server failed the proxy-side fencing check (not the current leader's node).
    #[error("backend {addr} refused by fencing: {reason}")]
    Fenced { addr: String, reason: String },
}

impl BackendError {
    /// SQLSTATE reported to the client when this error ends its statement.
    pub fn sqlstate(&self) -> &str {
        match self {
            BackendError::Server { code, .. } => code,
            BackendError::Auth(_) => "28000",
            _ => "08006",
        }
    }

    /// Whether the server is (for now) unreachable, starting up, shutting down or
    /// fenced: what a failover hold waits out. Authentication and other server
    /// errors are not.
    pub fn is_unavailable(&self) -> bool {
        match self {
            BackendError::Connect { .. }
            | BackendError::Timeout(_)
            | BackendError::Io(_)
            | BackendError::Closed
            | BackendError::Fenced { .. } => true,
            BackendError::Server { code, .. } => code.starts_with("57P") || code.starts_with("08"),
            BackendError::Tls(_) | BackendError::Auth(_) | BackendError::Protocol(_) => false,
        }
    }
}

/// What a backend connection is opened with.
#[derive(Clone)]
pub struct ConnectParams {
    pub addr: Arc<str>,
    pub user: String,
    pub database: String,
    pub password: Option<String>,
    pub tls: Arc<BackendTls>,
    pub connect_timeout: Duration,
    pub max_message: usize,
}

pub struct BackendConn {
    stream: MaybeTls,
    rbuf: BytesMut,
    wbuf: BytesMut,
    pub addr: Arc<str>,
    /// The cancel key's secret (the process id is `state.pid`).
    pub secret: i32,
    /// What the session engine knows and keeps about this connection.
    pub state: BackendState,
    /// Set when the connection cannot be trusted any more (I/O error, protocol confusion).
    pub broken: bool,
    pub last_used: Instant,
    /// The leader epoch this connection was fenced in at (primary of an etcd topology).
    pub fence_epoch: Option<u64>,
    max_message: usize,
}

impl BackendConn {
    /// Opens, secures and authenticates a connection.
    pub async fn connect(p: &ConnectParams) -> Result<BackendConn, BackendError> {
        within_connect_timeout(p, async { Ok(Self::connect_inner(p, None).await?.0) }).await
    }

    /// Opens a connection and runs `sql` (simple protocol) on it, all within
    /// `connect_timeout`. The query is pipelined behind the last message of the
    /// authentication exchange (the startup packet when no password is
    /// configured, the password, or the SCRAM client-final message), so it costs
    /// no round trip of its own: a server that refuses the login closes the
    /// connection without running it. Used for the fencing check of every new
    /// primary connection, where a round trip is worth saving (a failover across
    /// a WAN pays it on the critical path).
    pub async fn connect_and_query(
        p: &ConnectParams,
        sql: &str,
    ) -> Result<(BackendConn, Vec<Vec<Option<String>>>), BackendError> {
        within_connect_timeout(p, async {
            let (mut conn, pipelined) = Self::connect_inner(p, Some(sql)).await?;
            let rows = if pipelined {
                conn.read_simple_result().await?
            } else {
                conn.simple_query(sql).await?
            };
            Ok((conn, rows))
        })
        .await
    }

    /// Connects and logs in; `pipeline` is queued behind the last authentication
    /// message when the exchange allows it (the flag says whether it was sent).
    async fn connect_inner(
        p: &ConnectParams,
        pipeline: Option<&str>,
    ) -> Result<(BackendConn, bool), BackendError> {
        let tcp = TcpStream::connect(&*p.addr)
            .await
            .map_err(|source| BackendError::Connect {
                addr: p.addr.to_string(),
                source,
            })?;
        tcp.set_nodelay(true)?;
        let stream = Self::negotiate_tls(tcp, p).await?;
        let mut conn = BackendConn {
            stream,
            rbuf: BytesMut::with_capacity(READ_BUFFER),
            wbuf: BytesMut::with_capacity(READ_BUFFER),
            addr: p.addr.clone(),
            secret: 0,
            state: BackendState::new(0, Vec::new()),
            broken: false,
            last_used: Instant::now(),
            fence_epoch: None,
            max_message: p.max_message,
        };
        let mut pending = pipeline;
        conn.startup(p, &mut pending).await?;
        Ok((conn, pipeline.is_some() && pending.is_none()))
    }

    /// Queues the pipelined query, if still pending, behind what `wbuf` holds.
    fn queue_pipelined(&mut self, pending: &mut Option<&str>) {
        if let Some(sql) = pending.take() {
            self.queue(&wire::encode_query(sql).raw);
        }
    }

    async fn negotiate_tls(
        mut tcp: TcpStream,
        p: &ConnectParams,
    ) -> Result<MaybeTls, BackendError> {
        let Some(connector) = p.tls.connector() else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        tcp.write_all(&buf).await?;
        let answer = tcp.read_u8().await?;
        match answer {
            b'S' => {
                let host = p.addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(&p.addr);
                let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                    .map_err(|e| BackendError::Tls(format!("invalid server name {host}: {e}")))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| BackendError::Tls(e.to_string()))?;
                Ok(MaybeTls::Client(Box::new(tls)))
            }
            b'N' if !p.tls.required() => Ok(MaybeTls::Plain(tcp)),
            b'N' => Err(BackendError::Tls(format!(
                "server {} does not support TLS, which backend_tls.mode requires",
                p.addr
            ))),
            other => Err(BackendError::Protocol(format!(
                "unexpected answer {other:#x} to SSLRequest"
            ))),
        }
    }

    /// The startup and authentication exchange. `pending` (a query to pipeline)
    /// is sent behind the message after which the server needs nothing more
    /// from us to log in, and taken when sent.
    async fn startup(
        &mut self,
        p: &ConnectParams,
        pending: &mut Option<&str>,
    ) -> Result<(), BackendError> {
        frontend::startup_message(
            [
                ("user", p.user.as_str()),
                ("database", p.database.as_str()),
                ("application_name", "meridian-pgproxy"),
                ("client_encoding", "UTF8"),
            ],
            &mut self.wbuf,
        )?;
        // Without a password the server must let us in as we are (trust), or
        // the login fails anyway: nothing more will be sent before the query.
        if p.password.is_none() {
            self.queue_pipelined(pending);
        }
        self.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = self.read_startup_message().await?;
            match msg {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = Self::password(p)?;
                    frontend::password_message(pw.as_bytes(), &mut self.wbuf)?;
                    self.queue_pipelined(pending);
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = Self::password(p)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        p.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                    self.queue_pipelined(pending);
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = fallible_next(&mut mechanisms)? {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(BackendError::Auth(
                            "server offers no supported SASL mechanism".into(),
                        ));
                    }
                    let pw = Self::password(p)?;
                    let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        s.message(),
                        &mut self.wbuf,
                    )?;
                    self.flush().await?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| BackendError::Protocol("SASLContinue before SASL".into()))?;
                    s.update(body.data())
                        .map_err(|e| BackendError::Auth(e.to_string()))?;
                    // The client-final message: what follows is the server's
                    // verdict (SASLFinal + AuthenticationOk, or an error).
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                    self.queue_pipelined(pending);
                    self.flush().await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| BackendError::Protocol("SASLFinal before SASL".into()))?;
                    s.finish(body.data())
                        .map_err(|e| BackendError::Auth(format!("server signature: {e}")))?;
                }
                backend::Message::ParameterStatus(body) => {
                    let name = body.name().map_err(BackendError::Io)?.to_owned();
                    let value = body.value().map_err(BackendError::Io)?.to_owned();
                    self.state.server_params.push((name, value));
                }
                backend::Message::BackendKeyData(body) => {
                    self.state.pid = body.process_id();
                    self.secret = body.secret_key();
                }
                backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => {
                    self.state.tx_status = TxStatus::Idle;
                    return Ok(());
                }
                backend::Message::ErrorResponse(body) => {
                    let mut fields = body.fields();
                    let mut code = String::new();
                    let mut message = String::new();
                    while let Some(f) = fallible_next_field(&mut fields)? {
                        match f.0 {
                            b'C' => code = f.1,
                            b'M' => message = f.1,
                            _ => {}
                        }
                    }
                    return Err(if code.starts_with("28") {
                        BackendError::Auth(message)
                    } else {
                        BackendError::Server { code, message }
                    });
                }
                _ => {
                    return Err(BackendError::Protocol(
                        "unexpected message during startup".into(),
                    ))
                }
            }
        }
    }

    fn password(p: &ConnectParams) -> Result<&str, BackendError> {
        p.password.as_deref().ok_or_else(|| {
            BackendError::Auth(format!(
                "server asks a password for user `{}` and none is configured",
                p.user
            ))
        })
    }

    async fn read_startup_message(&mut self) -> Result<backend::Message, BackendError> {
        loop {
            if let Some(m) = backend::Message::parse(&mut self.rbuf)? {
                return Ok(m);
            }
            if self.rbuf.len() > self.max_message {
                return Err(BackendError::Protocol("startup message too large".into()));
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(BackendError::Closed);
            }
        }
    }

    /// A connection over an already logged-in stream (in-process backends of tests).
    pub fn from_stream(
        stream: MaybeTls,
        addr: Arc<str>,
        state: BackendState,
        max_message: usize,
    ) -> BackendConn {
        BackendConn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
            addr,
            secret: 0,
            state,
            broken: false,
            last_used: Instant::now(),
            fence_epoch: None,
            max_message,
        }
    }

    /// Reads one whole backend message. Cancel-safe: bytes read stay buffered.
    pub async fn read_frame(&mut self) -> Result<Frame, BackendError> {
        loop {
            match wire::try_frame(&mut self.rbuf, self.max_message) {
                Ok(Some(f)) => {
                    wire::shrink_after_large(&mut self.rbuf, READ_BUFFER);
                    return Ok(f);
                }
                Ok(None) => {}
                Err(e) => {
                    self.broken = true;
                    return Err(BackendError::Protocol(e.to_string()));
                }
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => {
                    self.broken = true;
                    return Err(BackendError::Closed);
                }
                Ok(_) => {}
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            }
        }
    }

    /// True if a complete frame is already buffered (no read needed).
    pub fn has_buffered_frame(&self) -> bool {
        self.rbuf.len() >= 5 && {
            let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
            len >= 4 && self.rbuf.len() > len as usize
        }
    }

    /// Queues raw message bytes; they are sent on the next [`flush`](Self::flush).
    pub fn queue(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    /// Takes the bytes of `out` to send (no copy when nothing else is queued).
    pub fn queue_buf(&mut self, out: &mut BytesMut) {
        if self.wbuf.is_empty() {
            std::mem::swap(&mut self.wbuf, out);
        } else {
            self.wbuf.extend_from_slice(out);
            out.clear();
        }
    }

    pub fn has_queued(&self) -> bool {
        !self.wbuf.is_empty()
    }

    pub async fn flush(&mut self) -> Result<(), BackendError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        wire::shrink_after_large(&mut self.wbuf, READ_BUFFER);
        if let Err(e) = r {
            self.broken = true;
            return Err(e.into());
        }
        self.last_used = Instant::now();
        Ok(())
    }

    /// Runs a simple query to completion and returns its rows as text (for the
    /// proxy's own checks: health, catalog, epoch). Errors from the server are
    /// returned as [`BackendError::Server`].
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, BackendError> {
        self.queue(&wire::encode_query(sql).raw);
        self.flush().await?;
        self.read_simple_result().await
    }

    /// Reads the answer to a simple query already sent: its rows (text), or
    /// the error it raised, once its `ReadyForQuery` has arrived.
    async fn read_simple_result(&mut self) -> Result<Vec<Vec<Option<String>>>, BackendError> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'D' => rows.push(decode_text_row(&f)?),
                b'S' => {
                    if let Some((name, value)) = crate::protocol::backend::parameter_status(&f) {
                        self.state.observe_parameter(name, value);
                    }
                }
                b'E' => {
                    let (_, code, message) = wire::error_fields(&f);
                    error = Some(BackendError::Server { code, message });
                }
                b'Z' => {
                    self.state.tx_status = crate::protocol::backend::ready_status(&f);
                    self.last_used = Instant::now();
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                b'G' | b'H' | b'W' => {
                    self.broken = true;
                    return Err(BackendError::Protocol("COPY in an internal query".into()));
                }
                _ => {}
            }
        }
    }

    /// Runs `DISCARD ALL` on its own (it cannot run inside a multi-statement
    /// query, which is an implicit transaction) and forgets what it dropped:
    /// prepared statements and session parameters. Used before a connection that
    /// carried a pinned session's state (temp tables, advisory locks, listeners,
    /// cursors) is handed to another client.
    pub async fn discard_session_state(&mut self) -> Result<(), BackendError> {
        self.simple_query("DISCARD ALL").await?;
        self.state.forget_statements();
        self.state.params_hash = 0;
        self.state.reset = Reset::None;
        Ok(())
    }

    /// Sends `Terminate` and closes, ignoring errors (the connection is being dropped).
    pub async fn terminate(mut self) {
        let mut buf = BytesMut::new();
        frontend::terminate(&mut buf);
        let _ = self.stream.write_all(&buf).await;
        let _ = self.stream.shutdown().await;
    }
}

/// The size buffers start at and shrink back to after carrying a large message.
const READ_BUFFER: usize = 16 * 1024;

/// `work` bounded by `connect_timeout` (running out is [`BackendError::Timeout`]).
async fn within_connect_timeout<T>(
    p: &ConnectParams,
    work: impl std::future::Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    tokio::time::timeout(p.connect_timeout, work)
        .await
        .unwrap_or_else(|_| Err(BackendError::Timeout(p.addr.to_string())))
}

/// The columns of a text-format `DataRow`.
pub fn decode_text_row(f: &Frame) -> Result<Vec<Option<String>>, BackendError> {
    let body = f.body();
    let bad = || BackendError::Protocol("malformed DataRow".into());
    if body.len() < 2 {
        return Err(bad());
    }
    // The count is an Int16 the server never sends negative; read unsigned, and reserve
    // no more than the body can hold (a column takes at least its 4 length bytes).
    let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let mut pos = 2;
    let mut out = Vec::with_capacity(n.min(body.len() / 4));
    for _ in 0..n {
        let len_bytes = body.get(pos..pos + 4).ok_or_else(bad)?;
        let len = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        pos += 4;
        if len < 0 {
            out.push(None);
        } else {
            let v = body.get(pos..pos + len as usize).ok_or_else(bad)?;
            out.push(Some(String::from_utf8_lossy(v).into_owned()));
            pos += len as usize;
        }
    }
    Ok(out)
}

fn fallible_next<I: fallible_iterator::FallibleIterator<Error = std::io::Error>>(
    it: &mut I,
) -> Result<Option<I::Item>, BackendError> {
    it.next().map_err(BackendError::Io)
}

fn fallible_next_field(
    it: &mut backend::ErrorFields<'_>,
) -> Result<Option<(u8, String)>, BackendError> {
    use fallible_iterator::FallibleIterator;
    Ok(it.next().map_err(BackendError::Io)?.map(|f| {
        (
            f.type_(),
            String::from_utf8_lossy(f.value_bytes()).into_owned(),
        )
    }))
}

/// Sends a `CancelRequest` for (pid, secret) to a backend address (plain TCP, as libpq does).
pub async fn send_cancel(addr: &str, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    let mut buf = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut buf);
    tcp.write_all(&buf).await?;
    // The server closes the connection once it has processed the request.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rows_decode_and_bad_counts_are_errors_not_panics() {
        let mut body = vec![0, 2];
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"42");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        let row = decode_text_row(&Frame::new(b'D', &body)).unwrap();
        assert_eq!(row, vec![Some("42".to_string()), None]);
        // A negative count (found by the fuzz target: it overflowed the capacity) and
        // a count larger than the body.
        for body in [vec![0xff, 0xfe], vec![0x7f, 0xff, 0, 0, 0, 1]] {
            assert!(decode_text_row(&Frame::new(b'D', &body)).is_err());
        }
    }
}
