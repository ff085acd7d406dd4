//! The QUIC link to the active coordinator (docs/control-path.md, "QUIC link").
//!
//! Find the coordinator through the etcd election (`CoordinatorRecord`, at the
//! address it advertises for this agent's region: [`dial_addr`], which falls back
//! to `quic_addr`), dial it with mutual TLS, open one bidirectional stream, send `Hello`, then a
//! `Heartbeat` every interval, and hand commands to the controller, answering
//! each with an `Ack`. Stale commands are refused here at once; duplicates (the
//! coordinator re-sends unacknowledged commands every second) are not run twice:
//! a command in progress is ignored, a finished one is acknowledged again with
//! its result. `Changes` batches from [`crate::invalidation`] are sent as they
//! come and the coordinator's `Ack { batch_id }` goes back to the stream;
//! `Invalidate`/`FlushCache` are applied to the region's Redis (issue 4).
//! Any close or error (a standby coordinator closes with code 1 "standby"):
//! re-read the election and dial again, backing off 100 ms doubling to 1 s.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::Client;
use meridian_shared::envelope::{
    self, AckResult, AgentMsg, CommandId, CoordMsg, FrameDecoder, Heartbeat,
};
use meridian_shared::keys::Keys;
use meridian_shared::pki::COORDINATOR_SERVER_NAME;
use meridian_shared::records::{self, CoordinatorRecord};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use crate::controller::{kind_and_epoch, Op};
use crate::decide;
use crate::invalidation::{self, LinkSide};
use crate::state::{PgStatus, Shared};

/// Backoff bounds between connection attempts.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Finished commands remembered per connection (for re-sent duplicates).
const DONE_CAPACITY: usize = 256;

/// Builds the heartbeat from the latest probe.
pub fn heartbeat(shared: &Shared, status: &PgStatus, seq: u64) -> Heartbeat {
    let state = shared.node_state();
    let leader = shared.leader.borrow().clone();
    let mut known: Vec<(&str, &str)> = Vec::new();
    if let Some((name, addr)) = &state.following {
        known.push((name, addr));
    }
    if let Some(l) = &leader {
        known.push((&l.node, &l.pg_addr));
    }
    let sent_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Heartbeat {
        node: shared.node.clone(),
        region: shared.region.clone(),
        seq,
        sent_at_ms,
        role: state.role,
        pg_up: status.pg_up,
        timeline: status.timeline,
        write_lsn: status.write_lsn,
        flush_lsn: status.flush_lsn,
        replay_lsn: status.replay_lsn,
        receive_lsn: status.receive_lsn,
        receiver_streaming: status.receiver_streaming,
        upstream: decide::upstream_name(status.sender.as_deref(), &known),
        replay_lag_ms: status.replay_lag_ms,
        epoch_seen: shared.epoch_seen(),
        invalidated_lsn: shared.invalidated(),
    }
}

/// The link loop: runs until aborted.
pub async fn run(
    mut etcd: Client,
    keys: Keys,
    client_config: quinn::ClientConfig,
    shared: Arc<Shared>,
    ops: mpsc::Sender<Op>,
    interval: Duration,
    mut inval: LinkSide,
) {
    let mut backoff = BACKOFF_MIN;
    let mut seq = 0u64;
    let mut last_error = String::new();
    loop {
        let started = Instant::now();
        let result = session(
            &mut etcd,
            &keys,
            &client_config,
            &shared,
            &ops,
            interval,
            &mut seq,
            &mut inval,
        )
        .await;
        if let Err(e) = result {
            // A repeated failure (e.g. no coordinator elected yet) is logged once.
            if e != last_error {
                tracing::info!(error = %e, "coordinator link down; reconnecting");
            } else {
                tracing::debug!(error = %e, "coordinator link still down");
            }
            last_error = e;
        }
        if started.elapsed() > Duration::from_secs(2) {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The address an agent of `region` dials the elected coordinator at: the
/// record's entry for that region (`--advertise-quic-for`), else `quic_addr`.
pub fn dial_addr<'a>(record: &'a CoordinatorRecord, region: &str) -> &'a str {
    record.quic_addr_for(region)
}

async fn coordinator_addr(
    etcd: &mut Client,
    keys: &Keys,
    region: &str,
) -> Result<(String, SocketAddr), String> {
    let resp = tokio::time::timeout(
        Duration::from_secs(1),
        etcd.leader(keys.coordinator_election()),
    )
    .await
    .map_err(|_| "reading the coordinator election timed out".to_owned())?
    .map_err(|e| format!("reading the coordinator election: {e}"))?;
    let kv = resp
        .kv()
        .ok_or_else(|| "no coordinator is elected".to_owned())?;
    let record: CoordinatorRecord =
        records::decode("coordinator", kv.value()).map_err(|e| e.to_string())?;
    let target = dial_addr(&record, region);
    let addr = tokio::net::lookup_host(target)
        .await
        .map_err(|e| format!("resolving {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolves to nothing"))?;
    Ok((record.name, addr))
}

#[allow(clippy::too_many_arguments)]
async fn session(
    etcd: &mut Client,
    keys: &Keys,
    client_config: &quinn::ClientConfig,
    shared: &Arc<Shared>,
    ops: &mpsc::Sender<Op>,
    interval: Duration,
    seq: &mut u64,
    inval: &mut LinkSide,
) -> Result<(), String> {
    let (coordinator, addr) = coordinator_addr(etcd, keys, &shared.region).await?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().map_err(|e| format!("{e}"))?
    } else {
        "0.0.0.0:0".parse().map_err(|e| format!("{e}"))?
    };
    let endpoint =
        quinn::Endpoint::client(bind).map_err(|e| format!("binding a UDP socket: {e}"))?;
    let connecting = endpoint
        .connect_with(client_config.clone(), addr, COORDINATOR_SERVER_NAME)
        .map_err(|e| format!("dialing {addr}: {e}"))?;
    let conn = tokio::time::timeout(Duration::from_secs(2), connecting)
        .await
        .map_err(|_| format!("QUIC handshake with {addr} timed out"))?
        .map_err(|e| format!("QUIC handshake with {addr}: {e}"))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("opening the stream: {e}"))?;
    let write = |msg: &AgentMsg| envelope::encode(msg).map_err(|e| e.to_string());
    send.write_all(&write(&AgentMsg::Hello {
        node: shared.node.clone(),
        region: shared.region.clone(),
        epoch_seen: shared.epoch_seen(),
    })?)
    .await
    .map_err(|e| format!("sending hello: {e}"))?;
    tracing::info!(%coordinator, %addr, "connected to the coordinator");

    // The reader runs apart so that a read is never cancelled half-way.
    let (bytes_tx, mut bytes_rx) = mpsc::channel::<Result<Vec<u8>, String>>(64);
    let reader = tokio::spawn(
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let item = match recv.read(&mut buf).await {
                    Ok(Some(n)) => Ok(buf[..n].to_vec()),
                    Ok(None) => Err("the coordinator finished the stream".to_owned()),
                    Err(e) => Err(format!("reading: {e}")),
                };
                let end = item.is_err();
                if bytes_tx.send(item).await.is_err() || end {
                    return;
                }
            }
        }
        .instrument(tracing::debug_span!("link_reader")),
    );
    let _reader_guard = AbortOnDrop(reader);

    let (ack_tx, mut ack_rx) = mpsc::channel::<(CommandId, AckResult)>(64);
    let mut inflight: HashSet<CommandId> = HashSet::new();
    let mut done: HashMap<CommandId, AckResult> = HashMap::new();
    let mut done_order: VecDeque<CommandId> = VecDeque::new();
    let mut decoder = FrameDecoder::default();
    let mut status_rx = shared.status.subscribe();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                *seq += 1;
                let status = status_rx.borrow_and_update().clone();
                let hb = heartbeat(shared, &status, *seq);
                send.write_all(&write(&AgentMsg::Heartbeat(hb))?)
                    .await
                    .map_err(|e| format!("sending a heartbeat: {e}"))?;
                shared.metrics.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
            }
            Some(batch) = inval.batches.recv() => {
                let msg = AgentMsg::Changes {
                    batch_id: batch.batch_id,
                    tables: batch.tables,
                    commit_lsn: batch.commit_lsn,
                };
                send.write_all(&write(&msg)?)
                    .await
                    .map_err(|e| format!("sending changes: {e}"))?;
            }
            item = bytes_rx.recv() => {
                let bytes = item.unwrap_or_else(|| Err("reader stopped".into()))?;
                decoder.feed(&bytes);
                loop {
                    let msg = match decoder.next_message::<CoordMsg>() {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) if e.is_fatal() => return Err(format!("bad frame: {e}")),
                        Err(e) => {
                            tracing::warn!(error = %e, "skipping an undecodable message");
                            continue;
                        }
                    };
                    if let Some(reply) = dispatch(msg, shared, ops, &ack_tx, &mut inflight, &done, inval) {
                        send.write_all(&write(&reply)?)
                            .await
                            .map_err(|e| format!("sending an ack: {e}"))?;
                    }
                }
            }
            Some((id, result)) = ack_rx.recv() => {
                inflight.remove(&id);
                if done.insert(id, result.clone()).is_none() {
                    done_order.push_back(id);
                    if done_order.len() > DONE_CAPACITY {
                        if let Some(old) = done_order.pop_front() {
                            done.remove(&old);
                        }
                    }
                }
                send.write_all(&write(&AgentMsg::Ack { id, result })?)
                    .await
                    .map_err(|e| format!("sending an ack: {e}"))?;
            }
            err = conn.closed() => {
                return Err(format!("connection closed: {err}"));
            }
        }
    }
}

/// Routes one coordinator message; returns an ack to send at once, if any.
fn dispatch(
    msg: CoordMsg,
    shared: &Arc<Shared>,
    ops: &mpsc::Sender<Op>,
    ack_tx: &mpsc::Sender<(CommandId, AckResult)>,
    inflight: &mut HashSet<CommandId>,
    done: &HashMap<CommandId, AckResult>,
    inval: &LinkSide,
) -> Option<AgentMsg> {
    let id = match &msg {
        CoordMsg::Ack { batch_id } => {
            let _ = inval.acks.try_send(*batch_id);
            return None;
        }
        CoordMsg::Horizon { lsn, epoch } => {
            shared.observe_horizon(*epoch, *lsn);
            return None;
        }
        CoordMsg::Promote { id, .. }
        | CoordMsg::Follow { id, .. }
        | CoordMsg::Fence { id, .. }
        | CoordMsg::SetSyncStandbys { id, .. }
        | CoordMsg::Invalidate { id, .. }
        | CoordMsg::FlushCache { id, .. } => *id,
    };
    if inflight.contains(&id) {
        return None;
    }
    if let Some(result) = done.get(&id) {
        return Some(AgentMsg::Ack {
            id,
            result: result.clone(),
        });
    }
    let (kind, epoch) = kind_and_epoch(&msg);
    if let Some(epoch) = epoch {
        if let Err(current) = decide::check_command_epoch(epoch, shared.epoch_seen()) {
            tracing::info!(kind, %epoch, %current, "refusing a stale command");
            shared.metrics.command(kind, "stale");
            let result = AckResult::Stale { current };
            let _ = ack_tx.try_send((id, result));
            inflight.insert(id);
            return None;
        }
        shared.see_epoch(epoch);
    }
    if matches!(
        msg,
        CoordMsg::Invalidate { .. } | CoordMsg::FlushCache { .. }
    ) {
        inflight.insert(id);
        let applier = inval.applier.clone();
        let ack_tx = ack_tx.clone();
        let shared = shared.clone();
        tokio::spawn(
            async move {
                let result = invalidation::apply(applier.as_deref(), &msg).await;
                shared
                    .metrics
                    .command(kind, crate::controller::result_label(&result));
                let _ = ack_tx.send((id, result)).await;
            }
            .in_current_span(),
        );
        return None;
    }
    let (reply, result_rx) = oneshot::channel();
    match ops.try_send(Op::Command { msg, reply }) {
        Ok(()) => {
            inflight.insert(id);
            let ack_tx = ack_tx.clone();
            tokio::spawn(async move {
                if let Ok(result) = result_rx.await {
                    let _ = ack_tx.send((id, result)).await;
                }
            });
        }
        Err(_) => {
            // The controller is backed up; the coordinator re-sends.
            tracing::warn!(kind, id, "controller queue full; dropping a command");
        }
    }
    None
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dials_the_address_advertised_for_its_region() {
        let mut record = CoordinatorRecord {
            name: "c1".into(),
            admin_addr: "127.0.0.1:1".into(),
            quic_addr: "127.0.0.1:2".into(),
            quic_addrs: Default::default(),
        };
        // An old coordinator (no per-region addresses): quic_addr from everywhere.
        assert_eq!(dial_addr(&record, "eu-west"), "127.0.0.1:2");
        record.quic_addrs = [
            ("eu-west".to_owned(), "127.0.0.1:3".to_owned()),
            ("us-east".to_owned(), "127.0.0.1:4".to_owned()),
        ]
        .into();
        assert_eq!(dial_addr(&record, "eu-west"), "127.0.0.1:3");
        assert_eq!(dial_addr(&record, "us-east"), "127.0.0.1:4");
        // A region the coordinator does not list.
        assert_eq!(dial_addr(&record, "ap-south"), "127.0.0.1:2");
    }
}
