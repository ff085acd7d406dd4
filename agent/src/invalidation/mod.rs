//! Cache invalidation (issue 4, DESIGN.md §6): on the primary, [`stream`]
//! consumes the logical replication slot, [`pgoutput`] decodes it and
//! [`batcher`] turns committed transactions into `Changes` batches and decides
//! how far the slot may be confirmed (that position, the invalidation horizon,
//! goes out in heartbeats); on every agent, [`redis_apply`] applies the
//! coordinator's `Invalidate` / `FlushCache` to the region's Redis, and
//! [`keep_fresh`] keeps the region's freshness lease there while the horizon
//! covers what the node had a moment ago ([`freshness`]).
//!
//! This module wires them to the rest of the agent: [`run_primary`] streams
//! while the node is a running primary (and stops when it no longer is; the
//! slot is created on a newly promoted primary when streaming starts there),
//! [`LinkSide`] is what the QUIC link uses (batches to send, acks to forward),
//! and [`apply`] carries out one cache command.

pub mod batcher;
pub mod freshness;
pub mod pgoutput;
pub mod redis_apply;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use meridian_shared::envelope::{AckResult, CoordMsg};
use meridian_shared::records::Role;
use tokio::sync::mpsc;

use crate::state::{NodeState, PgStatus, Shared};
use batcher::Batch;
use redis_apply::RedisApplier;
use stream::StreamConfig;

/// The link's side of invalidation.
pub struct LinkSide {
    /// Batches to send as `AgentMsg::Changes`.
    pub batches: mpsc::Receiver<Batch>,
    /// `CoordMsg::Ack { batch_id }` forwarded to the stream.
    pub acks: mpsc::Sender<u64>,
    /// The region's Redis (`--redis`), if configured.
    pub applier: Option<Arc<RedisApplier>>,
}

/// Channels between the link and [`run_primary`]: (link side, batch sender, ack receiver).
pub fn channels(
    applier: Option<Arc<RedisApplier>>,
) -> (LinkSide, mpsc::Sender<Batch>, mpsc::Receiver<u64>) {
    let (batch_tx, batch_rx) = mpsc::channel(256);
    let (ack_tx, ack_rx) = mpsc::channel(256);
    (
        LinkSide {
            batches: batch_rx,
            acks: ack_tx,
            applier,
        },
        batch_tx,
        ack_rx,
    )
}

/// Whether the node is a running, writable primary (the only place to stream from).
pub fn is_streaming_primary(state: &NodeState, status: &PgStatus) -> bool {
    state.role == Role::Primary && status.pg_up && status.in_recovery == Some(false)
}

fn primary_now(shared: &Shared) -> bool {
    let status = shared.status.borrow().clone();
    is_streaming_primary(&shared.node_state(), &status)
}

/// Streams invalidations while the node is a running primary; runs until aborted.
pub async fn run_primary(
    shared: Arc<Shared>,
    cfg: StreamConfig,
    out: mpsc::Sender<Batch>,
    mut acks: mpsc::Receiver<u64>,
) {
    let poll = Duration::from_millis(200);
    loop {
        while !primary_now(&shared) {
            tokio::time::sleep(poll).await;
        }
        let stopped = async {
            while primary_now(&shared) {
                tokio::time::sleep(poll).await;
            }
        };
        let horizon = |lsn| shared.set_invalidated(Some(lsn));
        tokio::select! {
            res = stream::run(&cfg, &out, &mut acks, &horizon) => {
                if let Err(e) = res {
                    tracing::warn!(error = %e, "invalidation stream stopped; restarting in 1 s");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            () = stopped => {
                tracing::info!("no longer a running primary: invalidation stream stopped");
            }
        }
        shared.set_invalidated(None);
    }
}

/// Keeps the region's freshness lease in Redis while [`Shared::freshness_lease`]
/// gives one, checking every `every`; runs until aborted.
pub async fn keep_fresh(
    shared: Arc<Shared>,
    applier: Arc<RedisApplier>,
    ttl: Duration,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held = false;
    loop {
        tick.tick().await;
        let lease = shared.freshness_lease(std::time::Instant::now(), ttl);
        let renewed = match lease {
            Some(lease) => match applier.renew_fresh(&lease).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot renew the cache's freshness lease");
                    false
                }
            },
            None => false,
        };
        if renewed != held {
            held = renewed;
            match lease {
                Some(l) if renewed => tracing::info!(
                    epoch = %l.epoch, horizon = %l.horizon,
                    "cache freshness lease held: invalidations reach this region"
                ),
                _ => tracing::info!(
                    "cache freshness lease not renewed: the invalidation horizon is behind this node (or redis is down); the region's proxies stop serving cached reads when it expires"
                ),
            }
        }
    }
}

/// Carries out `Invalidate` or `FlushCache` (other messages: `Ok`, nothing done).
pub async fn apply(applier: Option<&RedisApplier>, msg: &CoordMsg) -> AckResult {
    let Some(applier) = applier else {
        return AckResult::Failed {
            message: "no redis configured".into(),
        };
    };
    let result = match msg {
        CoordMsg::Invalidate {
            tables, lsn, epoch, ..
        } => applier.invalidate(tables, *lsn, *epoch).await.map(|o| {
            tracing::debug!(raised = o.raised, deleted = o.deleted, %lsn, "invalidated");
        }),
        CoordMsg::FlushCache { epoch, .. } => applier.flush_older_epochs(*epoch).await.map(|n| {
            tracing::info!(%epoch, unlinked = n, "cache of older epochs flushed");
        }),
        _ => Ok(()),
    };
    match result {
        Ok(()) => AckResult::Ok,
        Err(e) => AckResult::Failed {
            message: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::epoch::Epoch;

    #[test]
    fn only_a_running_writable_primary_streams() {
        let shared = Shared::new("n", "r", Role::Primary);
        let state = shared.node_state();
        let up = PgStatus {
            pg_up: true,
            in_recovery: Some(false),
            ..PgStatus::default()
        };
        assert!(is_streaming_primary(&state, &up));
        let recovering = PgStatus {
            in_recovery: Some(true),
            ..up.clone()
        };
        assert!(!is_streaming_primary(&state, &recovering));
        let down = PgStatus {
            pg_up: false,
            ..up.clone()
        };
        assert!(!is_streaming_primary(&state, &down));
        let replica = Shared::new("n", "r", Role::Replica).node_state();
        assert!(!is_streaming_primary(&replica, &up));
    }

    #[tokio::test]
    async fn without_redis_cache_commands_fail_with_a_clear_message() {
        let msg = CoordMsg::FlushCache {
            id: 1,
            epoch: Epoch(2),
        };
        assert_eq!(
            apply(None, &msg).await,
            AckResult::Failed {
                message: "no redis configured".into()
            }
        );
    }
}
