//! Logical replication from the local primary over the replication protocol
//! (PostgreSQL docs, "Streaming Replication Protocol"), feeding
//! [`pgoutput`](super::pgoutput) and [`batcher`](super::batcher).
//!
//! [`ensure_slot`] creates, over an ordinary tokio-postgres connection, the
//! publication `meridian_all FOR ALL TABLES` and the logical slot
//! `meridian_inval` (pgoutput) when missing, and returns the slot's
//! `confirmed_flush_lsn`. [`ReplicationConn`] is a raw TCP connection started
//! with `replication=database` (trust, cleartext, md5 or SCRAM-SHA-256 via
//! postgres-protocol) that runs `START_REPLICATION ... LOGICAL` and then speaks
//! CopyBoth: `XLogData` (`w`) and primary keepalives (`k`) in, Standby Status
//! Updates (`r`) out. [`run`] drives one session: decoded transactions go to the
//! batcher, due batches to `out` (the QUIC link), acks come back on `acks`, and
//! the status update reports as flushed exactly [`Batcher::confirmable`], never
//! more, so changes not yet acknowledged by the coordinator are re-sent after a
//! restart. Batches not acked within `resend_after` are sent again (the
//! coordinator applies them idempotently). The node must run with
//! `wal_level = logical`. Limits: no TLS to the local server.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use meridian_shared::lsn::Lsn;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::batcher::{Batch, Batcher, BatcherConfig};
use super::pgoutput::{DecodeError, Decoder};

/// Default publication name.
pub const PUBLICATION: &str = "meridian_all";
/// Default logical slot name.
pub const SLOT: &str = "meridian_inval";

/// Largest backend message accepted (a pgoutput message of a very wide row).
const MAX_MESSAGE: usize = 64 << 20;
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: u64 = 946_684_800_000_000;

/// Where and how to stream.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub host: String,
    pub port: u16,
    /// A role with `REPLICATION` (default `postgres`).
    pub user: String,
    pub password: Option<String>,
    /// The database whose changes are streamed (default `postgres`).
    pub database: String,
    pub slot: String,
    pub publication: String,
    /// Standby status update period (default 1 s; also sent at once after an ack).
    pub status_interval: Duration,
    /// Re-send a batch not acked after this long (default 1 s).
    pub resend_after: Duration,
    pub batcher: BatcherConfig,
}

impl StreamConfig {
    /// Defaults for the server at `host:port`.
    pub fn new(host: &str, port: u16) -> StreamConfig {
        StreamConfig {
            host: host.to_owned(),
            port,
            user: "postgres".into(),
            password: None,
            database: "postgres".into(),
            slot: SLOT.into(),
            publication: PUBLICATION.into(),
            status_interval: Duration::from_secs(1),
            resend_after: Duration::from_secs(1),
            batcher: BatcherConfig::default(),
        }
    }
}

/// Why streaming stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("I/O with PostgreSQL at {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("PostgreSQL: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error("PostgreSQL refused: {code} {message}")]
    Server { code: String, message: String },
    #[error("authentication: {0}")]
    Auth(String),
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("pgoutput: {0}")]
    Decode(#[from] DecodeError),
    #[error("invalid name {0:?} (slot and publication names are [a-z0-9_]+)")]
    BadName(String),
    #[error("the server closed the replication stream")]
    Closed,
}

fn check_name(name: &str) -> Result<(), StreamError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StreamError::BadName(name.to_owned()))
    }
}

fn is_duplicate(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| *c == tokio_postgres::error::SqlState::DUPLICATE_OBJECT)
}

async fn sql_client(cfg: &StreamConfig) -> Result<tokio_postgres::Client, StreamError> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .user(&cfg.user)
        .dbname(&cfg.database)
        .application_name("meridian-agent-inval")
        .connect_timeout(Duration::from_secs(5));
    if let Some(pw) = &cfg.password {
        pg.password(pw);
    }
    let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "invalidation setup connection ended");
        }
    });
    Ok(client)
}

/// Creates the publication and the logical slot when missing; returns the
/// slot's `confirmed_flush_lsn` (where streaming resumes).
pub async fn ensure_slot(cfg: &StreamConfig) -> Result<Lsn, StreamError> {
    check_name(&cfg.slot)?;
    check_name(&cfg.publication)?;
    let client = sql_client(cfg).await?;
    let have_pub = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await?
        .is_some();
    if !have_pub {
        let sql = format!("CREATE PUBLICATION {} FOR ALL TABLES", cfg.publication);
        match client.batch_execute(&sql).await {
            Ok(()) => tracing::info!(publication = %cfg.publication, "publication created"),
            Err(e) if is_duplicate(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let query = "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1";
    if client.query_opt(query, &[&cfg.slot]).await?.is_none() {
        match client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&cfg.slot],
            )
            .await
        {
            Ok(_) => tracing::info!(slot = %cfg.slot, "logical replication slot created"),
            Err(e) if is_duplicate(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let row = client
        .query_opt(query, &[&cfg.slot])
        .await?
        .ok_or_else(|| StreamError::Protocol(format!("slot {} vanished", cfg.slot)))?;
    let text: Option<String> = row.get(0);
    let lsn = text
        .as_deref()
        .unwrap_or("0/0")
        .parse::<Lsn>()
        .map_err(|e| StreamError::Protocol(e.to_string()))?;
    Ok(lsn)
}

/// Drops the slot (when the node stops being the primary); `Ok(false)` if absent.
pub async fn drop_slot(cfg: &StreamConfig) -> Result<bool, StreamError> {
    check_name(&cfg.slot)?;
    let client = sql_client(cfg).await?;
    let row = client
        .query_opt(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await?;
    Ok(row.is_some())
}

/// What the server sent inside CopyBoth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplEvent {
    /// `w`: WAL data (one pgoutput message) ending at `wal_end`.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: bytes::Bytes,
    },
    /// `k`: the server's position; answer at once when `reply_requested`.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// Parses one CopyData payload of the replication stream.
pub fn parse_copy_data(mut payload: bytes::Bytes) -> Result<ReplEvent, StreamError> {
    let short = || StreamError::Protocol("truncated CopyData".into());
    if payload.is_empty() {
        return Err(short());
    }
    match payload.get_u8() {
        b'w' => {
            if payload.len() < 24 {
                return Err(short());
            }
            let wal_start = Lsn(payload.get_u64());
            let wal_end = Lsn(payload.get_u64());
            let _send_time = payload.get_i64();
            Ok(ReplEvent::XLogData {
                wal_start,
                wal_end,
                data: payload,
            })
        }
        b'k' => {
            if payload.len() < 17 {
                return Err(short());
            }
            let wal_end = Lsn(payload.get_u64());
            let _send_time = payload.get_i64();
            let reply_requested = payload.get_u8() == 1;
            Ok(ReplEvent::Keepalive {
                wal_end,
                reply_requested,
            })
        }
        other => Err(StreamError::Protocol(format!(
            "unknown CopyData kind {:?}",
            char::from(other)
        ))),
    }
}

/// A Standby Status Update (`r`), wrapped in CopyData.
pub fn status_update(write: Lsn, flush: Lsn, apply: Lsn, now: SystemTime, reply: bool) -> Vec<u8> {
    let us = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
        .saturating_sub(PG_EPOCH_OFFSET_US);
    let mut m = Vec::with_capacity(39);
    m.put_u8(b'd');
    m.put_u32(4 + 34);
    m.put_u8(b'r');
    m.put_u64(write.0);
    m.put_u64(flush.0);
    m.put_u64(apply.0);
    m.put_u64(us);
    m.put_u8(u8::from(reply));
    m
}

fn error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    (code, message)
}

/// A raw replication-protocol connection.
pub struct ReplicationConn {
    stream: TcpStream,
    rbuf: BytesMut,
    addr: String,
}

impl ReplicationConn {
    /// Connects, authenticates with `replication=database` and waits for ReadyForQuery.
    pub async fn connect(cfg: &StreamConfig) -> Result<ReplicationConn, StreamError> {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr))
            .await
            .map_err(|_| StreamError::Io {
                addr: addr.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|source| StreamError::Io {
                addr: addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let mut conn = ReplicationConn {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            addr,
        };
        let mut buf = BytesMut::new();
        frontend::startup_message(
            [
                ("user", cfg.user.as_str()),
                ("database", cfg.database.as_str()),
                ("replication", "database"),
                ("application_name", "meridian-agent-inval"),
            ],
            &mut buf,
        )
        .map_err(|e| conn.io(e))?;
        conn.write(&buf).await?;
        let mut scram: Option<ScramSha256> = None;
        let password = || {
            cfg.password.as_deref().ok_or_else(|| {
                StreamError::Auth(format!(
                    "server asks a password for user `{}` and none is configured",
                    cfg.user
                ))
            })
        };
        loop {
            let (tag, body) = conn.read_message().await?;
            let mut out = BytesMut::new();
            match tag {
                b'R' => {
                    if body.len() < 4 {
                        return Err(StreamError::Protocol("short authentication message".into()));
                    }
                    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let data = &body[4..];
                    match code {
                        0 => {}
                        3 => {
                            frontend::password_message(password()?.as_bytes(), &mut out)
                                .map_err(|e| conn.io(e))?;
                        }
                        5 => {
                            let salt: [u8; 4] = data
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| StreamError::Protocol("short md5 salt".into()))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                cfg.user.as_bytes(),
                                password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)
                                .map_err(|e| conn.io(e))?;
                        }
                        10 => {
                            let offered = data
                                .split(|b| *b == 0)
                                .any(|m| m == sasl::SCRAM_SHA_256.as_bytes());
                            if !offered {
                                return Err(StreamError::Auth(
                                    "server offers no supported SASL mechanism".into(),
                                ));
                            }
                            let s = ScramSha256::new(
                                password()?.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                s.message(),
                                &mut out,
                            )
                            .map_err(|e| conn.io(e))?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                StreamError::Protocol("SASLContinue before SASL".into())
                            })?;
                            s.update(data)
                                .map_err(|e| StreamError::Auth(e.to_string()))?;
                            frontend::sasl_response(s.message(), &mut out)
                                .map_err(|e| conn.io(e))?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                StreamError::Protocol("SASLFinal before SASL".into())
                            })?;
                            s.finish(data)
                                .map_err(|e| StreamError::Auth(format!("server signature: {e}")))?;
                        }
                        other => {
                            return Err(StreamError::Auth(format!(
                                "unsupported authentication method {other}"
                            )))
                        }
                    }
                }
                b'E' => {
                    let (code, message) = error_fields(&body);
                    return Err(if code.starts_with("28") {
                        StreamError::Auth(message)
                    } else {
                        StreamError::Server { code, message }
                    });
                }
                b'Z' => return Ok(conn),
                b'S' | b'K' | b'N' => {}
                other => {
                    return Err(StreamError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        char::from(other)
                    )))
                }
            }
            if !out.is_empty() {
                conn.write(&out).await?;
            }
        }
    }

    fn io(&self, source: std::io::Error) -> StreamError {
        StreamError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        let res = self.stream.write_all(bytes).await;
        res.map_err(|e| self.io(e))
    }

    /// Starts logical streaming of `slot` from `start`; returns once in CopyBoth.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        publication: &str,
        start: Lsn,
    ) -> Result<(), StreamError> {
        check_name(slot)?;
        check_name(publication)?;
        let sql = format!(
            "START_REPLICATION SLOT {slot} LOGICAL {start} (proto_version '1', publication_names '\"{publication}\"')"
        );
        let mut buf = BytesMut::new();
        frontend::query(&sql, &mut buf).map_err(|e| self.io(e))?;
        self.write(&buf).await?;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => {
                    let (code, message) = error_fields(&body);
                    return Err(StreamError::Server { code, message });
                }
                other => {
                    return Err(StreamError::Protocol(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        char::from(other)
                    )))
                }
            }
        }
    }

    /// The next event of the stream. Cancel-safe: partial input stays buffered.
    pub async fn next_event(&mut self) -> Result<ReplEvent, StreamError> {
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'd' => return parse_copy_data(body.freeze()),
                b'N' => {}
                b'c' => return Err(StreamError::Closed),
                b'E' => {
                    let (code, message) = error_fields(&body);
                    return Err(StreamError::Server { code, message });
                }
                other => {
                    return Err(StreamError::Protocol(format!(
                        "unexpected message {:?} in CopyBoth",
                        char::from(other)
                    )))
                }
            }
        }
    }

    /// Sends a Standby Status Update.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        reply: bool,
    ) -> Result<(), StreamError> {
        let msg = status_update(write, flush, flush, SystemTime::now(), reply);
        self.write(&msg).await
    }

    async fn read_message(&mut self) -> Result<(u8, BytesMut), StreamError> {
        loop {
            if self.rbuf.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                if !(4..=MAX_MESSAGE).contains(&len) {
                    return Err(StreamError::Protocol(format!("message length {len}")));
                }
                if self.rbuf.len() > len {
                    let tag = self.rbuf[0];
                    let mut msg = self.rbuf.split_to(1 + len);
                    msg.advance(5);
                    return Ok((tag, msg));
                }
                self.rbuf.reserve(1 + len - self.rbuf.len());
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| StreamError::Io {
                    addr: self.addr.clone(),
                    source: e,
                })?;
            if n == 0 {
                return Err(StreamError::Closed);
            }
        }
    }
}

/// Runs one replication session until an error (the caller restarts it with a
/// backoff): batches go to `out`, coordinator acks (batch ids) come in on `acks`,
/// and `horizon` hears the confirmable position whenever it may have moved
/// (every change up to it is applied in every region that is not unusable).
pub async fn run(
    cfg: &StreamConfig,
    out: &mpsc::Sender<Batch>,
    acks: &mut mpsc::Receiver<u64>,
    horizon: &(dyn Fn(Lsn) + Sync),
) -> Result<(), StreamError> {
    let start = ensure_slot(cfg).await?;
    let mut conn = ReplicationConn::connect(cfg).await?;
    conn.start_replication(&cfg.slot, &cfg.publication, start)
        .await?;
    tracing::info!(slot = %cfg.slot, %start, "logical replication started");
    let first_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
        .max(1);
    let mut batcher = Batcher::with_first_id(cfg.batcher, start, first_id);
    let mut decoder = Decoder::new();
    let mut received = start;
    let mut reported = start;
    let mut sent_at: std::collections::HashMap<u64, Instant> = std::collections::HashMap::new();
    let mut status_tick = tokio::time::interval(cfg.status_interval);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resend_tick =
        tokio::time::interval(cfg.resend_after.max(Duration::from_millis(10)) / 2);
    resend_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far = Duration::from_secs(3600);
    loop {
        let deadline = batcher
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + far);
        let mut reply_now = false;
        tokio::select! {
            event = conn.next_event() => match event? {
                ReplEvent::XLogData { wal_end, data, .. } => {
                    received = received.max(wal_end);
                    if let Some(tx) = decoder.feed(&data)? {
                        if let Some(b) = batcher.push(tx.tables, tx.end_lsn, Instant::now()) {
                            send(out, &mut sent_at, b);
                        }
                    }
                }
                ReplEvent::Keepalive { wal_end, reply_requested } => {
                    received = received.max(wal_end);
                    if !decoder.in_transaction() {
                        batcher.advance_idle(wal_end);
                    }
                    reply_now = reply_requested;
                }
            },
            ack = acks.recv() => match ack {
                Some(id) => {
                    batcher.ack(id);
                    sent_at.remove(&id);
                }
                None => return Err(StreamError::Protocol("the ack channel closed".into())),
            },
            () = tokio::time::sleep_until(deadline.into()) => {
                if let Some(b) = batcher.poll(Instant::now()) {
                    send(out, &mut sent_at, b);
                }
            }
            _ = status_tick.tick() => reply_now = true,
            _ = resend_tick.tick() => {
                let now = Instant::now();
                for b in batcher.in_flight() {
                    let due = sent_at
                        .get(&b.batch_id)
                        .is_none_or(|t| now.saturating_duration_since(*t) >= cfg.resend_after);
                    if due {
                        tracing::debug!(batch_id = b.batch_id, "re-sending unacked batch");
                        let _ = out.try_send(b.clone());
                        sent_at.insert(b.batch_id, now);
                    }
                }
            }
        }
        let confirmable = batcher.confirmable();
        horizon(confirmable);
        if reply_now || confirmable > reported {
            conn.send_status(received, confirmable, false).await?;
            reported = confirmable;
        }
    }
}

fn send(
    out: &mpsc::Sender<Batch>,
    sent_at: &mut std::collections::HashMap<u64, Instant>,
    b: Batch,
) {
    sent_at.insert(b.batch_id, Instant::now());
    if out.try_send(b).is_err() {
        tracing::debug!("link busy or down: the batch is re-sent later");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_update_layout() {
        let t = UNIX_EPOCH + Duration::from_micros(PG_EPOCH_OFFSET_US + 42);
        let m = status_update(Lsn(1), Lsn(2), Lsn(3), t, true);
        assert_eq!(m.len(), 39);
        assert_eq!(m[0], b'd');
        assert_eq!(u32::from_be_bytes([m[1], m[2], m[3], m[4]]), 38);
        assert_eq!(m[5], b'r');
        assert_eq!(&m[6..14], &1u64.to_be_bytes());
        assert_eq!(&m[14..22], &2u64.to_be_bytes());
        assert_eq!(&m[22..30], &3u64.to_be_bytes());
        assert_eq!(&m[30..38], &42u64.to_be_bytes());
        assert_eq!(m[38], 1);
    }

    #[test]
    fn copy_data_kinds() {
        let mut k = vec![b'k'];
        k.extend_from_slice(&77u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(k.into()).unwrap(),
            ReplEvent::Keepalive {
                wal_end: Lsn(77),
                reply_requested: true
            }
        );
        let mut w = vec![b'w'];
        w.extend_from_slice(&5u64.to_be_bytes());
        w.extend_from_slice(&9u64.to_be_bytes());
        w.extend_from_slice(&0i64.to_be_bytes());
        w.extend_from_slice(b"B...");
        match parse_copy_data(w.into()).unwrap() {
            ReplEvent::XLogData {
                wal_start,
                wal_end,
                data,
            } => {
                assert_eq!((wal_start, wal_end), (Lsn(5), Lsn(9)));
                assert_eq!(&data[..], b"B...");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_copy_data(vec![b'w', 1].into()).is_err());
        assert!(parse_copy_data(vec![b'x'].into()).is_err());
    }

    #[test]
    fn error_fields_are_read() {
        let body = b"SERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0";
        assert_eq!(
            error_fields(body),
            (
                "42704".to_owned(),
                "replication slot \"x\" does not exist".to_owned()
            )
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("meridian_inval").is_ok());
        assert!(check_name("bad name").is_err());
        assert!(check_name("x'; DROP").is_err());
        assert!(check_name("").is_err());
    }
}
