//! Messages between agents and the coordinator, and the frame codec that carries
//! them over QUIC streams (or datagrams, one frame each).
//!
//! A frame is `[u8 version][u32 big-endian payload length][payload]`. Version 1
//! is a JSON payload of [`AgentMsg`] or [`CoordMsg`]; an unknown version or a
//! length above the decoder's limit is an error after which the byte stream can no
//! longer be trusted (the decoder stays failed and the connection should be
//! closed). A payload that is not valid JSON for the expected type is reported but
//! the stream stays in sync, so the caller may skip that one message.
//!
//! Every command carries the sender's [`Epoch`]; an agent refuses commands whose
//! epoch is lower than the highest it has seen and answers [`AckResult::Stale`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::epoch::Epoch;
use crate::lsn::Lsn;
use crate::records::Role;

/// Identifier of a coordinator command, echoed in its [`AgentMsg::Ack`].
pub type CommandId = u64;

/// One agent heartbeat: the node's state as its agent saw it at `sent_at_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    pub region: String,
    /// Increases by one per heartbeat of one agent process.
    pub seq: u64,
    /// Unix time in milliseconds on the agent's clock (informational; the
    /// coordinator judges freshness by arrival time).
    pub sent_at_ms: u64,
    pub role: Role,
    /// The agent could query its PostgreSQL in this round.
    pub pg_up: bool,
    /// Current timeline (0 when unknown).
    pub timeline: u32,
    /// `pg_current_wal_insert_lsn()` (primary only).
    #[serde(default)]
    pub write_lsn: Option<Lsn>,
    /// `pg_current_wal_flush_lsn()` on a primary, the flushed received position on a replica.
    #[serde(default)]
    pub flush_lsn: Option<Lsn>,
    /// `pg_last_wal_replay_lsn()` (replica only).
    #[serde(default)]
    pub replay_lsn: Option<Lsn>,
    /// `pg_last_wal_receive_lsn()` (replica only).
    #[serde(default)]
    pub receive_lsn: Option<Lsn>,
    /// `pg_stat_wal_receiver.status = 'streaming'`.
    pub receiver_streaming: bool,
    /// Node name (or `host:port`) the WAL receiver streams from.
    #[serde(default)]
    pub upstream: Option<String>,
    /// `now() - pg_last_xact_replay_timestamp()` in ms, when known (replica only).
    #[serde(default)]
    pub replay_lag_ms: Option<u64>,
    /// Highest epoch the agent has seen (and, on a primary, recorded in its node).
    pub epoch_seen: Epoch,
    /// On a primary streaming invalidations: every change committed up to this
    /// LSN has been applied in every region's cache that is not marked unusable
    /// (its replication slot's confirmable position). The coordinator relays it
    /// to every agent as [`CoordMsg::Horizon`].
    #[serde(default)]
    pub invalidated_lsn: Option<Lsn>,
}

impl Heartbeat {
    /// The furthest WAL position this node is known to hold (for candidate choice and lag).
    pub fn position(&self) -> Option<Lsn> {
        [
            self.write_lsn,
            self.flush_lsn,
            self.receive_lsn,
            self.replay_lsn,
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// Whether this node's WAL receiver streams from `node` (matched by name or `pg_addr`).
    pub fn streams_from(&self, node: &str, pg_addr: &str) -> bool {
        self.receiver_streaming
            && self
                .upstream
                .as_deref()
                .is_some_and(|up| up == node || (!pg_addr.is_empty() && up == pg_addr))
    }
}

/// Outcome of a command, as acknowledged by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AckResult {
    /// Done (commands are idempotent: an already-done command is acknowledged `ok`).
    Ok,
    /// Refused: the command's epoch is lower than `current`, which the agent has seen.
    Stale { current: Epoch },
    /// Tried and failed.
    Failed { message: String },
}

/// Agent → coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    /// First message on a connection.
    Hello {
        node: String,
        region: String,
        epoch_seen: Epoch,
    },
    Heartbeat(Heartbeat),
    /// Tables changed by transactions committed up to `commit_lsn` (primary only).
    Changes {
        batch_id: u64,
        tables: Vec<String>,
        commit_lsn: Lsn,
    },
    /// Acknowledges the command `id`.
    Ack {
        id: CommandId,
        result: AckResult,
    },
}

/// Coordinator → agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordMsg {
    /// Promote this node (`pg_promote`) and record `epoch` in it. Unless
    /// `old_fenced` (the coordinator knows the old primary is fenced: its agent
    /// acknowledged `Fence`, or this is the leader's own epoch), a standby first
    /// leaves its upstream and outwaits the failsafe confirmations it gave
    /// (`failsafe::promotion_wait`). Absent (older coordinators): `false`.
    Promote {
        id: CommandId,
        epoch: Epoch,
        #[serde(default)]
        old_fenced: bool,
    },
    /// Replicate from `leader` at `pg_addr` (rewind or re-clone if needed).
    Follow {
        id: CommandId,
        leader: String,
        pg_addr: String,
        epoch: Epoch,
    },
    /// Stop accepting writes (read-only + terminate client backends, or stop Postgres).
    Fence { id: CommandId, epoch: Epoch },
    /// Set `synchronous_standby_names` on the primary to `value` and reload.
    SetSyncStandbys {
        id: CommandId,
        value: String,
        epoch: Epoch,
    },
    /// Invalidate `tables` in this region's cache up to `lsn`.
    Invalidate {
        id: CommandId,
        tables: Vec<String>,
        lsn: Lsn,
        epoch: Epoch,
    },
    /// Drop this region's whole cache (after a failover).
    FlushCache { id: CommandId, epoch: Epoch },
    /// The coordinator has durably taken the `Changes` batch `batch_id`.
    Ack { batch_id: u64 },
    /// The invalidation horizon of the leader of `epoch`: every change up to
    /// `lsn` is applied in every region's cache not marked unusable (the
    /// primary's [`Heartbeat::invalidated_lsn`], relayed). Not acknowledged; a
    /// lost one only delays the region's freshness lease.
    Horizon { lsn: Lsn, epoch: Epoch },
}

/// Envelope version 1: JSON payload.
pub const VERSION_JSON: u8 = 1;
/// Bytes before the payload: version and length.
pub const HEADER_LEN: usize = 5;
/// Default largest payload accepted by a [`FrameDecoder`]: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("unknown envelope version {0}")]
    UnknownVersion(u8),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid frame payload: {0}")]
    Payload(#[from] serde_json::Error),
}

impl FrameError {
    /// Whether the byte stream is out of sync after this error (close the connection).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, FrameError::Payload(_))
    }
}

/// Encodes `msg` as one version-1 frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let payload = serde_json::to_vec(msg)?;
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.push(VERSION_JSON);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Incremental frame decoder: feed bytes as they arrive, pop complete frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_frame: usize,
    failed: Option<(u8, usize)>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder that rejects payloads longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max_frame,
            failed: None,
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete payload, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if let Some(failure) = self.failed {
            return Err(Self::failure_error(failure, self.max_frame));
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        let version = self.buf[0];
        if version != VERSION_JSON {
            self.fail((version, 0));
            return Err(FrameError::UnknownVersion(version));
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len_bytes = [self.buf[1], self.buf[2], self.buf[3], self.buf[4]];
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > self.max_frame {
            self.fail((VERSION_JSON, len));
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(payload))
    }

    /// The next complete message decoded as `T`, `Ok(None)` if more bytes are needed.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_frame()? {
            Some(payload) => Ok(Some(serde_json::from_slice(&payload)?)),
            None => Ok(None),
        }
    }

    fn fail(&mut self, failure: (u8, usize)) {
        self.failed = Some(failure);
        self.buf.clear();
    }

    fn failure_error((version, len): (u8, usize), max: usize) -> FrameError {
        if version != VERSION_JSON {
            FrameError::UnknownVersion(version)
        } else {
            FrameError::TooLarge { len, max }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            node: "us-west-1".into(),
            region: "us-west".into(),
            seq: 42,
            sent_at_ms: 1_700_000_000_123,
            role: Role::Replica,
            pg_up: true,
            timeline: 2,
            write_lsn: None,
            flush_lsn: Some(Lsn(0x300_0100)),
            replay_lsn: Some(Lsn(0x300_0080)),
            receive_lsn: Some(Lsn(0x300_0100)),
            receiver_streaming: true,
            upstream: Some("us-east-1".into()),
            replay_lag_ms: Some(3),
            epoch_seen: Epoch(4),
            invalidated_lsn: None,
        }
    }

    fn agent_msgs() -> Vec<AgentMsg> {
        vec![
            AgentMsg::Hello {
                node: "n".into(),
                region: "r".into(),
                epoch_seen: Epoch(1),
            },
            AgentMsg::Heartbeat(heartbeat()),
            AgentMsg::Changes {
                batch_id: 9,
                tables: vec!["public.t".into()],
                commit_lsn: Lsn(77),
            },
            AgentMsg::Ack {
                id: 5,
                result: AckResult::Stale { current: Epoch(8) },
            },
            AgentMsg::Ack {
                id: 6,
                result: AckResult::Failed {
                    message: "pg_promote timed out".into(),
                },
            },
        ]
    }

    fn coord_msgs() -> Vec<CoordMsg> {
        vec![
            CoordMsg::Promote {
                id: 1,
                epoch: Epoch(2),
                old_fenced: true,
            },
            CoordMsg::Follow {
                id: 2,
                leader: "a".into(),
                pg_addr: "127.0.0.1:5432".into(),
                epoch: Epoch(2),
            },
            CoordMsg::Fence {
                id: 3,
                epoch: Epoch(2),
            },
            CoordMsg::SetSyncStandbys {
                id: 4,
                value: "ANY 1 (\"b\")".into(),
                epoch: Epoch(2),
            },
            CoordMsg::Invalidate {
                id: 5,
                tables: vec!["t".into()],
                lsn: Lsn(10),
                epoch: Epoch(2),
            },
            CoordMsg::FlushCache {
                id: 6,
                epoch: Epoch(2),
            },
            CoordMsg::Ack { batch_id: 9 },
            CoordMsg::Horizon {
                lsn: Lsn(11),
                epoch: Epoch(2),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_frames() {
        let mut dec = FrameDecoder::default();
        for msg in agent_msgs() {
            dec.feed(&encode(&msg).unwrap());
        }
        for msg in agent_msgs() {
            assert_eq!(dec.next_message::<AgentMsg>().unwrap(), Some(msg));
        }
        assert_eq!(dec.next_message::<AgentMsg>().unwrap(), None);
        for msg in coord_msgs() {
            dec.feed(&encode(&msg).unwrap());
            assert_eq!(dec.next_message::<CoordMsg>().unwrap(), Some(msg));
        }
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn json_is_tagged_and_readable() {
        let value = serde_json::to_value(AgentMsg::Heartbeat(heartbeat())).unwrap();
        assert_eq!(value["type"], "heartbeat");
        assert_eq!(value["receive_lsn"], "0/3000100");
        assert_eq!(value["role"], "replica");
        let ack = serde_json::to_value(AgentMsg::Ack {
            id: 1,
            result: AckResult::Ok,
        })
        .unwrap();
        assert_eq!(ack["result"]["status"], "ok");
    }

    #[test]
    fn frame_header_layout() {
        let frame = encode(&CoordMsg::Ack { batch_id: 1 }).unwrap();
        assert_eq!(frame[0], VERSION_JSON);
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(len, frame.len() - HEADER_LEN);
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let frame = encode(&AgentMsg::Heartbeat(heartbeat())).unwrap();
        let mut dec = FrameDecoder::default();
        for (i, byte) in frame.iter().enumerate() {
            assert_eq!(
                dec.next_message::<AgentMsg>().unwrap(),
                None,
                "complete after {i} bytes?"
            );
            dec.feed(&[*byte]);
        }
        assert_eq!(
            dec.next_message::<AgentMsg>().unwrap(),
            Some(AgentMsg::Heartbeat(heartbeat()))
        );
    }

    #[test]
    fn unknown_version_is_fatal_and_sticky() {
        let mut dec = FrameDecoder::default();
        dec.feed(&[9, 0, 0, 0, 2, b'{', b'}']);
        let err = dec.next_frame().unwrap_err();
        assert!(matches!(err, FrameError::UnknownVersion(9)));
        assert!(err.is_fatal());
        dec.feed(&encode(&CoordMsg::Ack { batch_id: 1 }).unwrap());
        assert!(matches!(
            dec.next_frame(),
            Err(FrameError::UnknownVersion(9))
        ));
    }

    #[test]
    fn oversized_frames_are_rejected_before_buffering_them() {
        let mut dec = FrameDecoder::new(16);
        let frame = encode(&AgentMsg::Heartbeat(heartbeat())).unwrap();
        dec.feed(&frame[..HEADER_LEN]);
        let err = dec.next_frame().unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 16, .. }), "{err}");
        assert!(err.is_fatal());
        dec.feed(&frame[HEADER_LEN..]);
        assert_eq!(dec.buffered(), 0);
        assert!(dec.next_frame().is_err());
    }

    #[test]
    fn garbage_payload_is_reported_and_the_stream_stays_in_sync() {
        let mut dec = FrameDecoder::default();
        dec.feed(&[VERSION_JSON, 0, 0, 0, 3, b'x', b'y', b'z']);
        dec.feed(&encode(&CoordMsg::Ack { batch_id: 3 }).unwrap());
        let err = dec.next_message::<CoordMsg>().unwrap_err();
        assert!(!err.is_fatal());
        assert_eq!(
            dec.next_message::<CoordMsg>().unwrap(),
            Some(CoordMsg::Ack { batch_id: 3 })
        );
        // Valid JSON of the wrong shape is a payload error too.
        dec.feed(&encode(&serde_json::json!({"type": "launch_missiles"})).unwrap());
        assert!(matches!(
            dec.next_message::<CoordMsg>(),
            Err(FrameError::Payload(_))
        ));
    }

    #[test]
    fn heartbeat_helpers() {
        let hb = heartbeat();
        assert_eq!(hb.position(), Some(Lsn(0x300_0100)));
        assert!(hb.streams_from("us-east-1", "127.0.0.1:1"));
        assert!(!hb.streams_from("eu-west-1", "127.0.0.1:1"));
        let by_addr = Heartbeat {
            upstream: Some("127.0.0.1:1".into()),
            ..heartbeat()
        };
        assert!(by_addr.streams_from("us-east-1", "127.0.0.1:1"));
        let stopped = Heartbeat {
            receiver_streaming: false,
            ..heartbeat()
        };
        assert!(!stopped.streams_from("us-east-1", ""));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..40), 0..8)) {
            let mut dec = FrameDecoder::new(64);
            for chunk in &chunks {
                dec.feed(chunk);
                while let Ok(Some(_)) = dec.next_message::<AgentMsg>() {}
            }
        }

        #[test]
        fn any_split_of_a_stream_decodes_the_same(split in 0usize..400, batch in 0u64..1000,
                                                  tables in proptest::collection::vec("[a-z]{1,12}", 0..5)) {
            let msgs = vec![
                AgentMsg::Changes { batch_id: batch, tables: tables.clone(), commit_lsn: Lsn(batch) },
                AgentMsg::Heartbeat(heartbeat()),
            ];
            let mut bytes = Vec::new();
            for m in &msgs {
                bytes.extend(encode(m).unwrap());
            }
            let split = split.min(bytes.len());
            let mut dec = FrameDecoder::default();
            let mut out = Vec::new();
            for part in [&bytes[..split], &bytes[split..]] {
                dec.feed(part);
                while let Some(m) = dec.next_message::<AgentMsg>().unwrap() {
                    out.push(m);
                }
            }
            prop_assert_eq!(out, msgs);
        }
    }
}
