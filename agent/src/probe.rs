//! The heartbeat probe: every interval, is the postmaster alive (its pid, so a
//! dead postmaster shows within one interval even while sockets linger), and
//! what does PostgreSQL say about itself (recovery, LSNs, timeline, WAL
//! receiver and when it last heard from upstream, replay lag, `meridian.epoch`)?
//!
//! One persistent tokio-postgres connection (connect timeout 300 ms) is reused
//! across rounds and dropped on any error. The result goes to
//! [`Shared::status`]; the role follows it. The probe also asks the controller
//! to restart a crashed standby (the decision is [`decide::should_restart`]).

use std::sync::Arc;
use std::time::Duration;

use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls};
use tracing::Instrument;

use crate::controller::Op;
use crate::decide;
use crate::invalidation::freshness;
use crate::postgres::PgNode;
use crate::state::{PgStatus, Shared};

/// Connect timeout of the probe connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

const PROBE_SQL: &str = "\
SELECT pg_is_in_recovery(),
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn()::text END,
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_flush_lsn()::text END,
  pg_last_wal_receive_lsn()::text,
  pg_last_wal_replay_lsn()::text,
  CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())
       ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
  r.status, r.received_tli, r.sender_host, r.sender_port,
  pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn(),
  (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint,
  current_setting('meridian.epoch', true),
  (extract(epoch FROM clock_timestamp() - r.last_msg_receipt_time) * 1000)::bigint
FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver r ON true";

/// Whether the node's postmaster process is alive: the child we spawned (reaped
/// when it exits, so a zombie does not count) or the pid in `postmaster.pid`.
pub async fn postmaster_alive(node: &PgNode) -> bool {
    if node.is_running() {
        return true;
    }
    matches!(node.pid_file().await, Ok(Some(_)))
}

/// A superuser connection to the node's own PostgreSQL (connect timeout
/// [`CONNECT_TIMEOUT`]), its connection task spawned; `purpose` names it in
/// `application_name` ("meridian-agent {purpose}").
pub(crate) async fn connect_local(
    node: &PgNode,
    purpose: &str,
) -> Result<Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(node.host())
        .port(node.port())
        .user(crate::postgres::config::SUPERUSER)
        .dbname("postgres")
        .application_name(format!("meridian-agent {purpose}"))
        .connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) = cfg.connect(NoTls).await?;
    tokio::spawn(
        async move {
            let _ = connection.await;
        }
        .instrument(tracing::debug_span!("local_connection", purpose)),
    );
    Ok(client)
}

fn lsn(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

async fn query(client: &Client) -> Result<PgStatus, tokio_postgres::Error> {
    let row = client.query_one(PROBE_SQL, &[]).await?;
    let in_recovery: bool = row.try_get(0)?;
    let write_lsn = lsn(row.try_get(1)?);
    let primary_flush = lsn(row.try_get(2)?);
    let receive_lsn = lsn(row.try_get(3)?);
    let replay_lsn = lsn(row.try_get(4)?);
    let tli: Option<i32> = row.try_get(5)?;
    let status: Option<String> = row.try_get(6)?;
    let received_tli: Option<i32> = row.try_get(7)?;
    let sender_host: Option<String> = row.try_get(8)?;
    let sender_port: Option<i32> = row.try_get(9)?;
    let caught_up: Option<bool> = row.try_get(10)?;
    let replay_age: Option<i64> = row.try_get(11)?;
    let epoch: Option<String> = row.try_get(12)?;
    let heard_age: Option<i64> = row.try_get(13)?;
    let timeline = if in_recovery {
        received_tli.or(tli)
    } else {
        tli
    };
    let sender = match (sender_host, sender_port) {
        (Some(h), Some(p)) => Some(format!("{h}:{p}")),
        _ => None,
    };
    Ok(PgStatus {
        pg_up: true,
        in_recovery: Some(in_recovery),
        timeline: timeline.and_then(|t| u32::try_from(t).ok()).unwrap_or(0),
        write_lsn: write_lsn.filter(|_| !in_recovery),
        flush_lsn: if in_recovery {
            receive_lsn
        } else {
            primary_flush
        },
        receive_lsn: receive_lsn.filter(|_| in_recovery),
        replay_lsn: replay_lsn.filter(|_| in_recovery),
        receiver_streaming: status.as_deref() == Some("streaming"),
        sender,
        replay_lag_ms: if in_recovery {
            decide::replay_lag_ms(caught_up.unwrap_or(false), replay_age)
        } else {
            None
        },
        node_epoch: epoch.and_then(|e| e.trim().parse::<u64>().ok()).map(Epoch),
        upstream_heard_ms_ago: heard_age.map(|ms| u64::try_from(ms).unwrap_or(0)),
    })
}

/// One probe round: the status, reusing (or replacing) `conn`.
pub async fn probe_once(node: &PgNode, conn: &mut Option<Client>, timeout: Duration) -> PgStatus {
    if !postmaster_alive(node).await {
        *conn = None;
        return PgStatus::default();
    }
    if conn.as_ref().is_none_or(Client::is_closed) {
        *conn = match tokio::time::timeout(CONNECT_TIMEOUT, connect_local(node, "probe")).await {
            Ok(Ok(c)) => Some(c),
            _ => None,
        };
    }
    let Some(client) = conn.as_ref() else {
        return PgStatus::default();
    };
    match tokio::time::timeout(timeout, query(client)).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "probe query failed");
            *conn = None;
            PgStatus::default()
        }
        Err(_) => {
            tracing::debug!("probe query timed out");
            *conn = None;
            PgStatus::default()
        }
    }
}

/// The probe loop: runs until the task is aborted. Each round's WAL position is
/// also a freshness sample (kept for `cache_lease`, see
/// [`crate::invalidation::freshness`]).
pub async fn run(
    node: Arc<PgNode>,
    shared: Arc<Shared>,
    interval: Duration,
    cache_lease: Duration,
    ops: mpsc::Sender<Op>,
) {
    let mut conn = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let query_timeout = interval.max(Duration::from_millis(300)) * 3;
    loop {
        tick.tick().await;
        let started = std::time::Instant::now();
        let status = probe_once(&node, &mut conn, query_timeout).await;
        if let Some(position) = freshness::node_position(&status) {
            shared.sample_position(started, position, cache_lease);
        }
        if let Some(epoch) = status.node_epoch {
            shared.see_epoch(epoch);
        }
        if let Some(ago) = status.upstream_heard_ms_ago {
            // Measured before the answer came back: dating it from now errs late,
            // which only lengthens a promotion's failsafe wait.
            let now = std::time::Instant::now();
            shared.heard_upstream(now.checked_sub(Duration::from_millis(ago)).unwrap_or(now));
        }
        let in_recovery = status.in_recovery;
        let pg_up = status.pg_up;
        shared.status.send_replace(status);
        let state = shared.node_state();
        if !state.busy {
            let role = decide::reported_role(in_recovery, state.role);
            if role != state.role {
                shared.update(|s| s.role = role);
            }
        }
        if !pg_up {
            let alive = postmaster_alive(&node).await;
            if decide::should_restart(state.intent, alive, state.busy, state.fenced_at) {
                // The controller restarts it (and ignores repeats while busy).
                let _ = ops.try_send(Op::RestartStandby);
            }
        }
    }
}
