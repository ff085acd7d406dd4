//! Replica health as the proxy itself observes it.
//!
//! One small task per replica keeps one connection (the catalog user's
//! credentials, `routing.catalog_*`) and every `replica_poll_interval` asks
//! `pg_is_in_recovery()`, the replay position and the replay lag, with a short
//! timeout. The answers go into a [`ReplicaTable`], shared and reusable: the
//! follower turns it into replica states of the topology, and read-your-writes
//! can ask [`ReplicaTable::replay_lsn`]. A failed or timed-out poll marks the
//! replica down at once (its connection is dropped and reopened next time).
//!
//! While a read waits for a replica to replay its LSN (read-your-writes), the
//! pollers poll every [`crate::ryw::FAST_POLL`] instead of every interval
//! ([`ReplicaTable::waiting`]); every recorded poll wakes the waiters
//! ([`ReplicaTable::updated`]). The idle interval stays cheap, and a waiting
//! read learns of the replay within ~10 ms plus the poll's round trip.
//! With a static topology, [`follow_static`] runs the same pollers for the
//! configured replicas.
//!
//! Limits: the lag is `now() - pg_last_xact_replay_timestamp()` on the replica,
//! reported as 0 when everything received is replayed (an idle primary must not
//! look like lag); a replica whose WAL receiver stalled therefore looks current
//! until its receive position falls behind, which the coordinator, not the
//! proxy, detects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use meridian_shared::lsn::Lsn;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, Instrument};

use crate::backend::{BackendConn, BackendError, ConnectParams};
use crate::ryw::{Observed, FAST_POLL};
use crate::topology::TopologyRx;

/// The poll query: in recovery, replay LSN, lag in seconds.
pub const POLL_QUERY: &str = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, \
     CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0 \
     ELSE COALESCE(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) END::float8";

/// The result of the latest poll of one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStatus {
    /// The poll answered.
    pub ok: bool,
    /// `pg_is_in_recovery()` (false for a failed poll).
    pub in_recovery: bool,
    /// Last known replay position (kept from earlier polls when this one failed).
    pub replay_lsn: Option<Lsn>,
    /// Replay lag (`None` when the poll failed).
    pub lag: Option<Duration>,
    /// Round trip of the poll query, smoothed over polls: how near the replica is.
    pub rtt: Option<Duration>,
    /// When the poll finished.
    pub at: Instant,
}

/// Latest status per replica address.
pub type ReplicaHealth = HashMap<Arc<str>, ReplicaStatus>;

/// The shared per-replica table: written by the pollers, read by the follower
/// and by anyone who needs a replica's replay position.
#[derive(Clone, Default)]
pub struct ReplicaTable {
    inner: Arc<RwLock<ReplicaHealth>>,
    changed: Arc<Notify>,
    /// Woken (all waiters) after every recorded poll.
    updated: Arc<Notify>,
    /// Reads currently waiting for a replay position.
    waiting: Arc<AtomicUsize>,
    /// Wakes sleeping pollers when a read starts waiting.
    hurry: Arc<Notify>,
}

/// Held while a read waits on the table: pollers poll fast until it is dropped.
pub struct WaitGuard {
    waiting: Arc<AtomicUsize>,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ReplicaTable {
    /// What read-your-writes needs to know about `addr` (`None`: never polled).
    pub fn observed(&self, addr: &str) -> Option<Observed> {
        self.read().get(addr).map(|s| Observed {
            ok: s.ok && s.in_recovery,
            replay_lsn: s.replay_lsn,
            lag: s.lag,
        })
    }

    /// Registers a waiting read: pollers switch to [`FAST_POLL`] (and the
    /// sleeping ones poll at once) until the guard is dropped.
    pub fn wait_guard(&self) -> WaitGuard {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.hurry.notify_waiters();
        WaitGuard {
            waiting: self.waiting.clone(),
        }
    }

    /// Number of reads waiting right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Resolves after the next recorded poll of any replica.
    pub async fn updated(&self) {
        self.updated.notified().await
    }

    /// The last replay position seen on `addr`, if it was ever polled.
    pub fn replay_lsn(&self, addr: &str) -> Option<Lsn> {
        self.read().get(addr).and_then(|s| s.replay_lsn)
    }

    /// The latest status of `addr`.
    pub fn status(&self, addr: &str) -> Option<ReplicaStatus> {
        self.read().get(addr).cloned()
    }

    /// A copy of the whole table.
    pub fn snapshot(&self) -> ReplicaHealth {
        self.read().clone()
    }

    /// Records a poll result; wakes [`changed`](Self::changed) when usability may differ.
    pub fn record(&self, addr: &Arc<str>, mut status: ReplicaStatus) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let prev = map.get(addr);
        if status.replay_lsn.is_none() {
            status.replay_lsn = prev.and_then(|p| p.replay_lsn);
        }
        status.rtt = smooth_rtt(prev.and_then(|p| p.rtt), status.rtt);
        let flipped = prev.is_none_or(|p| p.ok != status.ok || p.in_recovery != status.in_recovery);
        map.insert(addr.clone(), status);
        drop(map);
        self.updated.notify_waiters();
        if flipped {
            self.changed.notify_one();
        }
    }

    /// Forgets replicas not in `addrs`.
    pub fn retain(&self, addrs: &[Arc<str>]) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| addrs.contains(k));
    }

    /// Resolves when a replica went up or down (or was first seen).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ReplicaHealth> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Exponentially smoothed round trip: a new sample weighs a quarter, so one slow poll on a
/// loaded host does not reorder the replicas. Keeps the last value when a poll failed.
pub fn smooth_rtt(prev: Option<Duration>, sample: Option<Duration>) -> Option<Duration> {
    match (prev, sample) {
        (Some(p), Some(s)) => Some((p * 3 + s) / 4),
        (p, s) => s.or(p),
    }
}

/// Parses one row of [`POLL_QUERY`].
pub fn parse_poll_row(row: &[Option<String>], at: Instant) -> Option<ReplicaStatus> {
    let in_recovery = row.first()?.as_deref()? == "t";
    let replay_lsn = row.get(1)?.as_deref().and_then(|s| s.parse().ok());
    let secs: f64 = row.get(2)?.as_deref()?.parse().ok()?;
    let lag = Duration::try_from_secs_f64(secs.max(0.0)).ok()?;
    Some(ReplicaStatus {
        ok: true,
        in_recovery,
        replay_lsn,
        lag: Some(lag),
        rtt: None,
        at,
    })
}

/// A failed poll.
pub fn failed(at: Instant) -> ReplicaStatus {
    ReplicaStatus {
        ok: false,
        in_recovery: false,
        replay_lsn: None,
        lag: None,
        rtt: None,
        at,
    }
}

/// How long one poll may take: five intervals, at least 1 s (a loaded host
/// must not flap its replicas), at most 5 s.
pub fn poll_timeout(interval: Duration) -> Duration {
    (interval * 5).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// Polls one replica forever (the caller aborts the task when the replica leaves).
pub async fn poll_replica(params: ConnectParams, interval: Duration, table: ReplicaTable) {
    // A poll must finish well within the interval's scale, but not give up on a
    // loaded replica too eagerly.
    let timeout = poll_timeout(interval);
    let mut conn: Option<BackendConn> = None;
    loop {
        let result = tokio::time::timeout(timeout, poll_once(&params, &mut conn)).await;
        let now = Instant::now();
        let status = match result {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(replica = %params.addr, error = %e, "replica poll failed");
                conn = None;
                failed(now)
            }
            Err(_) => {
                debug!(replica = %params.addr, "replica poll timed out");
                conn = None;
                failed(now)
            }
        };
        table.record(&params.addr, status);
        // Register for a hurry-up before looking at the waiting count, so a
        // read that starts waiting in between is not missed.
        let hurry = table.hurry.notified();
        tokio::pin!(hurry);
        hurry.as_mut().enable();
        let pause = next_poll_in(interval, table.waiting());
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = hurry => {}
        }
    }
}

/// The pause before the next poll: the interval, or [`FAST_POLL`] while reads wait.
pub fn next_poll_in(interval: Duration, waiting: usize) -> Duration {
    if waiting > 0 {
        interval.min(FAST_POLL)
    } else {
        interval
    }
}

/// Polls the replicas of a static topology (and follows its reloads) so that
/// read-your-writes knows their replay positions. Runs until aborted.
pub async fn follow_static(
    mut topology: TopologyRx,
    params: ConnectParams,
    interval: Duration,
    table: ReplicaTable,
) {
    let mut pollers: HashMap<Arc<str>, JoinHandle<()>> = HashMap::new();
    loop {
        let wanted: Vec<Arc<str>> = topology
            .borrow_and_update()
            .replicas
            .iter()
            .map(|r| r.addr.clone())
            .collect();
        pollers.retain(|addr, task| {
            let keep = wanted.contains(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        table.retain(&wanted);
        for addr in &wanted {
            if !pollers.contains_key(addr) {
                let p = ConnectParams {
                    addr: addr.clone(),
                    ..params.clone()
                };
                let task = tokio::spawn(
                    poll_replica(p, interval, table.clone())
                        .instrument(tracing::debug_span!("replica_poll", replica = %addr)),
                );
                pollers.insert(addr.clone(), task);
            }
        }
        if topology.changed().await.is_err() {
            break;
        }
    }
    for t in pollers.values() {
        t.abort();
    }
}

async fn poll_once(
    params: &ConnectParams,
    conn: &mut Option<BackendConn>,
) -> Result<ReplicaStatus, BackendError> {
    if conn.is_none() {
        *conn = Some(BackendConn::connect(params).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Err(BackendError::Closed);
    };
    let sent = Instant::now();
    let rows = c.simple_query(POLL_QUERY).await?;
    let now = Instant::now();
    let mut status = rows
        .first()
        .and_then(|r| parse_poll_row(r, now))
        .ok_or_else(|| BackendError::Protocol("unexpected answer to the replica poll".into()))?;
    status.rtt = Some(now - sent);
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_poll_row() {
        let now = Instant::now();
        let row = vec![
            Some("t".to_string()),
            Some("0/3000060".to_string()),
            Some("1.5".to_string()),
        ];
        let s = parse_poll_row(&row, now).unwrap();
        assert!(s.ok && s.in_recovery);
        assert_eq!(s.replay_lsn, Some(Lsn(0x300_0060)));
        assert_eq!(s.lag, Some(Duration::from_millis(1500)));
        // A primary answers f, NULL, 0.
        let s = parse_poll_row(&[Some("f".into()), None, Some("0".into())], now).unwrap();
        assert!(!s.in_recovery);
        assert_eq!(s.replay_lsn, None);
        assert!(parse_poll_row(&[Some("t".into())], now).is_none());
        assert!(parse_poll_row(&[Some("t".into()), None, Some("x".into())], now).is_none());
    }

    #[test]
    fn polls_fast_only_while_reads_wait() {
        let t = ReplicaTable::default();
        let i = Duration::from_millis(200);
        assert_eq!(next_poll_in(i, t.waiting()), i);
        let g = t.wait_guard();
        let g2 = t.wait_guard();
        assert_eq!(t.waiting(), 2);
        assert_eq!(next_poll_in(i, t.waiting()), FAST_POLL);
        assert_eq!(
            next_poll_in(Duration::from_millis(5), 1),
            Duration::from_millis(5)
        );
        drop(g);
        drop(g2);
        assert_eq!(t.waiting(), 0);
        let a: Arc<str> = Arc::from("a:1");
        assert_eq!(t.observed("a:1"), None);
        t.record(&a, failed(Instant::now()));
        assert!(!t.observed("a:1").unwrap().ok);
    }

    #[test]
    fn table_keeps_last_lsn_across_failures_and_forgets_removed() {
        let t = ReplicaTable::default();
        let a: Arc<str> = Arc::from("a:1");
        let now = Instant::now();
        assert_eq!(t.replay_lsn("a:1"), None);
        t.record(
            &a,
            ReplicaStatus {
                ok: true,
                in_recovery: true,
                replay_lsn: Some(Lsn(42)),
                lag: Some(Duration::ZERO),
                rtt: None,
                at: now,
            },
        );
        assert_eq!(t.replay_lsn("a:1"), Some(Lsn(42)));
        t.record(&a, failed(now));
        assert_eq!(t.replay_lsn("a:1"), Some(Lsn(42)));
        assert!(!t.status("a:1").unwrap().ok);
        t.retain(&[]);
        assert_eq!(t.replay_lsn("a:1"), None);
        assert!(t.snapshot().is_empty());
    }
}
