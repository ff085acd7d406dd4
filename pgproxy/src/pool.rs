//! Backend connection pools (bb8), one per (backend address, database, user).
//!
//! bb8 reports a failed connect only to its error sink and lets `get()` wait
//! for the whole connection timeout (bb8 #227). A proxy must fail fast when a
//! backend is down (failover speed depends on it), so the manager also
//! broadcasts connect failures and [`Pools::get`] returns the first one that
//! happens while it waits. A connection idle for longer than
//! `health_check_after` is checked with a round trip before it is handed out;
//! a broken one, or one not idle outside a transaction, is never handed out.
//! One that a pinned session gave back (`Reset::Discard`: temp tables, locks,
//! listeners, cursors) first gets `DISCARD ALL`, sent on its own because it
//! cannot run inside a multi-statement query.
//!
//! Proxy-side fencing: a pool for the primary of an etcd topology is keyed by
//! the leader's epoch, and every new connection in it must answer
//! `pg_is_in_recovery() = false` and `meridian.epoch = <epoch>` before it is
//! used; anything else is closed and reported as [`BackendError::Fenced`]. The
//! check is pipelined behind the login, so a new primary connection costs no
//! extra round trip (which a failover across a WAN would pay).
//! A new leader or epoch therefore always gets fresh pools; the old ones are
//! dropped by [`Pools::retain_topology`].
//!
//! Pools are keyed by what clients name (database, user), so they must not outlive
//! their use: a pool whose connect failed with an error that waiting cannot cure (the
//! database does not exist, the login is refused) is removed at once, and a pool
//! left without connections is reclaimed once `pool.idle_timeout` has passed since
//! it was last asked for (checked at most once a second, when a pool is asked for or
//! the metrics are rendered). The failure the waiting sessions get is the server's
//! own error ([`PoolError::Failed`]), so a login to a missing database gets 3D000.
//!
//! A session that finds every connection of its pool in use waits in the pool's queue
//! (bb8's waiters, first come first served) for up to `pool.query_wait_timeout`
//! (PgBouncer's setting, 120 s by default), not `pool.connect_timeout`, which bounds
//! each connect attempt on its own; running out is [`PoolError::WaitTimeout`] (53300
//! for the client). Sessions waiting are counted in `pool_waiting_clients`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_shared::config::PoolConfig;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::broadcast;

use crate::backend::{BackendConn, BackendError, ConnectParams};
use crate::engine::backend_state::Reset;
use crate::protocol::backend::TxStatus;
use crate::topology::Topology;

/// The fencing check run on every new primary connection of an etcd topology.
pub const FENCE_QUERY: &str = "SELECT pg_is_in_recovery(), current_setting('meridian.epoch', true)";

/// The key of one pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: Arc<str>,
    pub database: String,
    pub user: String,
    /// The epoch a primary connection must carry (`None`: no check).
    pub fence: Option<u64>,
}

/// A connect failure as broadcast to the sessions waiting on a pool.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The error itself: a server's refusal keeps its SQLSTATE and message.
    pub error: Arc<BackendError>,
}

/// How often pools are checked for reclaiming.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct Manager {
    params: ConnectParams,
    fence: Option<u64>,
    health_check_after: Duration,
    failures: broadcast::Sender<Failure>,
    fence_rejections: Counter,
}

impl Manager {
    async fn connect_checked(&self) -> Result<BackendConn, BackendError> {
        let Some(epoch) = self.fence else {
            return BackendConn::connect(&self.params).await;
        };
        // The check rides behind the login (no round trip of its own); nothing
        // but this SELECT runs before its verdict.
        let (mut conn, rows) = BackendConn::connect_and_query(&self.params, FENCE_QUERY).await?;
        let row = rows.first();
        let in_recovery = row
            .and_then(|r| r.first().cloned().flatten())
            .map(|v| v == "t");
        let carried = row.and_then(|r| r.get(1).cloned().flatten());
        match fence_verdict(in_recovery, carried.as_deref(), epoch) {
            Ok(()) => {
                conn.fence_epoch = Some(epoch);
                Ok(conn)
            }
            Err(reason) => {
                self.fence_rejections.inc();
                conn.terminate().await;
                Err(BackendError::Fenced {
                    addr: self.params.addr.to_string(),
                    reason,
                })
            }
        }
    }
}

/// Whether a new primary connection may be used for epoch `epoch`: pure, from
/// the answers to [`FENCE_QUERY`].
pub fn fence_verdict(
    in_recovery: Option<bool>,
    carried_epoch: Option<&str>,
    epoch: u64,
) -> Result<(), String> {
    match in_recovery {
        Some(false) => {}
        Some(true) => return Err("the server is in recovery (a standby)".into()),
        None => return Err("no answer to pg_is_in_recovery()".into()),
    }
    match carried_epoch.map(str::trim).filter(|s| !s.is_empty()) {
        Some(e) if e.parse::<u64>().ok() == Some(epoch) => Ok(()),
        Some(e) => Err(format!(
            "the server carries meridian.epoch {e}, the leader's epoch is {epoch}"
        )),
        None => Err(format!(
            "the server carries no meridian.epoch, the leader's epoch is {epoch}"
        )),
    }
}

impl bb8::ManageConnection for Manager {
    /// Boxed: bb8 moves a connection through checkout and return several times per
    /// transaction, and a pointer moves for free where the struct is a few hundred bytes.
    type Connection = Box<BackendConn>;
    type Error = BackendError;

    async fn connect(&self) -> Result<Box<BackendConn>, BackendError> {
        match self.connect_checked().await {
            Ok(c) => Ok(Box::new(c)),
            Err(e) => {
                // The waiting sessions get the error itself; bb8 gets a copy of
                // what it needs (`BackendError` holds an `io::Error`, not `Clone`).
                let copy = match &e {
                    BackendError::Server { code, message } => BackendError::Server {
                        code: code.clone(),
                        message: message.clone(),
                    },
                    other => BackendError::Protocol(other.to_string()),
                };
                let _ = self.failures.send(Failure { error: Arc::new(e) });
                Err(copy)
            }
        }
    }

    async fn is_valid(&self, conn: &mut Box<BackendConn>) -> Result<(), BackendError> {
        // A pinned session's backend comes back with its session state: clean it
        // before the next client sees it (this also proves it alive).
        if conn.state.reset == Reset::Discard {
            return conn.discard_session_state().await;
        }
        if conn.last_used.elapsed() < self.health_check_after {
            return Ok(());
        }
        conn.simple_query("SELECT 1").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut Box<BackendConn>) -> bool {
        conn.broken || conn.state.tx_status != TxStatus::Idle
    }
}

/// A connection checked out of a pool; it returns to the pool when dropped.
pub type Pooled = bb8::PooledConnection<'static, Manager>;

/// Why no backend connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("cannot connect to backend {addr}: {message}")]
    ConnectFailed {
        addr: Arc<str>,
        message: Arc<str>,
        unavailable: bool,
    },
    /// A connect attempt of the pool failed with this error (a server's refusal,
    /// e.g. 3D000 for a missing database, keeps its code and message).
    #[error("cannot connect to backend {addr}: {error}")]
    Failed {
        addr: Arc<str>,
        error: Arc<BackendError>,
    },
    /// Every connection of the pool stayed in use for `pool.query_wait_timeout`.
    #[error("no connection to {addr} became free within {waited:?} (pool of {max_size})")]
    WaitTimeout {
        addr: Arc<str>,
        waited: Duration,
        max_size: u32,
    },
    /// A connect attempt did not finish in time (a black-holed backend).
    #[error("timed out connecting to {0}")]
    Timeout(Arc<str>),
    /// The failover hold ran out without a serving, connectable primary.
    #[error("no primary available: failover in progress (held {held_ms} ms)")]
    NoPrimary { held_ms: u128 },
}

impl PoolError {
    /// Whether waiting (for a failover, a restart) may cure this error.
    pub fn is_unavailable(&self) -> bool {
        match self {
            PoolError::Backend(e) => e.is_unavailable(),
            PoolError::ConnectFailed { unavailable, .. } => *unavailable,
            PoolError::Failed { error, .. } => error.is_unavailable(),
            PoolError::Timeout(_) | PoolError::NoPrimary { .. } => true,
            // A busy pool, not a failing backend: waiting longer is what just ran out.
            PoolError::WaitTimeout { .. } => false,
        }
    }
}

struct Entry {
    pool: bb8::Pool<Manager>,
    failures: broadcast::Sender<Failure>,
    /// When the pool was last asked for a connection.
    last_wanted: Mutex<Instant>,
    /// `pool.idle_timeout` when the pool was created.
    idle_timeout: Duration,
}

impl Entry {
    fn wanted(&self) {
        *self.last_wanted.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn reclaimable(&self, now: Instant) -> bool {
        let last = *self.last_wanted.lock().unwrap_or_else(|e| e.into_inner());
        reclaimable(self.pool.state().connections, last, self.idle_timeout, now)
    }
}

/// Whether a pool with `connections`, last asked for at `last_wanted`, may be
/// dropped at `now` (pure).
pub fn reclaimable(
    connections: u32,
    last_wanted: Instant,
    idle_timeout: Duration,
    now: Instant,
) -> bool {
    connections == 0 && now.saturating_duration_since(last_wanted) >= idle_timeout
}

/// The metrics the pools keep.
#[derive(Clone, Default)]
pub struct PoolMetrics {
    /// New primary connections refused by the fencing check.
    pub fence_rejections: Counter,
    /// Sessions in [`Pools::get`] now.
    pub waiting: Gauge,
    /// [`PoolError::WaitTimeout`]s.
    pub wait_timeouts: Counter,
}

/// All pools of a proxy.
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Entry>>>,
    metrics: PoolMetrics,
    last_sweep: Mutex<Instant>,
}

impl Default for Pools {
    fn default() -> Self {
        Pools::new(PoolMetrics::default())
    }
}

/// Counts a session in `waiting` while it lives (a cancelled wait included).
struct Waiting(Gauge);

impl Waiting {
    fn new(g: &Gauge) -> Waiting {
        g.inc();
        Waiting(g.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn key_of(params: &ConnectParams, fence: Option<u64>) -> PoolKey {
    PoolKey {
        addr: params.addr.clone(),
        database: params.database.clone(),
        user: params.user.clone(),
        fence,
    }
}

impl Pools {
    /// Pools that count into `metrics`.
    pub fn new(metrics: PoolMetrics) -> Pools {
        Pools {
            pools: Mutex::default(),
            metrics,
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// The number of pools.
    pub fn len(&self) -> usize {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the pools [`reclaimable`] now, at most once per [`SWEEP_EVERY`].
    fn sweep(&self) {
        let now = Instant::now();
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
            if now.saturating_duration_since(*last) < SWEEP_EVERY {
                return;
            }
            *last = now;
        }
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|_, e| !e.reclaimable(now));
    }

    /// Drops the pool of `key` if it is still `entry` and has no connections: its
    /// connect failed in a way waiting cannot cure.
    fn forget_failed(&self, key: &PoolKey, entry: &Arc<Entry>) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if pools.get(key).is_some_and(|e| Arc::ptr_eq(e, entry))
            && entry.pool.state().connections == 0
        {
            pools.remove(key);
        }
    }

    /// The pool for `params`, created with `cfg` if it does not exist yet
    /// (so reloaded pool settings apply to pools created from then on).
    fn entry(&self, key: &PoolKey, params: &ConnectParams, cfg: &PoolConfig) -> Arc<Entry> {
        self.sweep();
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = pools.get(key) {
            e.wanted();
            return e.clone();
        }
        let fence = key.fence;
        let (failures, _) = broadcast::channel(16);
        let manager = Manager {
            params: params.clone(),
            fence,
            health_check_after: cfg.health_check_after,
            failures: failures.clone(),
            fence_rejections: self.metrics.fence_rejections.clone(),
        };
        let pool = bb8::Pool::builder()
            .max_size(cfg.max_size)
            .min_idle(if cfg.min_size > 0 {
                Some(cfg.min_size)
            } else {
                None
            })
            .idle_timeout(Some(cfg.idle_timeout))
            // Idle connections are closed within a reap of their timeout.
            .reaper_rate(cfg.idle_timeout.min(Duration::from_secs(30)))
            // How long a checkout may wait for a free connection; each connect attempt is
            // bounded by `connect_timeout` itself and its failure ends the wait at once.
            .connection_timeout(cfg.query_wait_timeout)
            .retry_connection(false)
            .test_on_check_out(true)
            .build_unchecked(manager);
        let entry = Arc::new(Entry {
            pool,
            failures,
            last_wanted: Mutex::new(Instant::now()),
            idle_timeout: cfg.idle_timeout,
        });
        pools.insert(key.clone(), entry.clone());
        entry
    }

    /// Checks out a connection, failing as soon as a connect attempt fails.
    /// With `fence`, new connections must carry that epoch and not be in recovery.
    pub async fn get(
        &self,
        params: &ConnectParams,
        fence: Option<u64>,
        cfg: &PoolConfig,
    ) -> Result<Pooled, PoolError> {
        let key = key_of(params, fence);
        let entry = self.entry(&key, params, cfg);
        let mut failures = entry.failures.subscribe();
        let _waiting = Waiting::new(&self.metrics.waiting);
        let r = tokio::select! {
            r = entry.pool.get_owned() => r.map_err(|e| match e {
                bb8::RunError::User(e) => PoolError::Backend(e),
                bb8::RunError::TimedOut => {
                    self.metrics.wait_timeouts.inc();
                    PoolError::WaitTimeout {
                        addr: params.addr.clone(),
                        waited: cfg.query_wait_timeout,
                        max_size: cfg.max_size,
                    }
                }
            }),
            f = failures.recv() => Err(match f {
                Ok(f) => PoolError::Failed {
                    addr: params.addr.clone(),
                    error: f.error,
                },
                Err(_) => PoolError::ConnectFailed {
                    addr: params.addr.clone(),
                    message: Arc::from("connection failed"),
                    unavailable: true,
                },
            }),
        };
        if let Err(e) = &r {
            if !e.is_unavailable() && !matches!(e, PoolError::WaitTimeout { .. }) {
                self.forget_failed(&key, &entry);
            }
        }
        r
    }

    /// (key, connections, idle) of every pool, for metrics. Reclaims unused pools first.
    pub fn stats(&self) -> Vec<(PoolKey, u32, u32)> {
        self.sweep();
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .iter()
            .map(|(k, e)| {
                let s = e.pool.state();
                (k.clone(), s.connections, s.idle_connections)
            })
            .collect()
    }

    /// Drops the pools of backends no longer in the topology.
    pub fn retain_addrs(&self, keep: &[Arc<str>]) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|k, _| keep.contains(&k.addr));
    }

    /// Drops every pool `t` does not use: the old primary's after a new leader
    /// or epoch, and those of replicas that left. Connections checked out of a
    /// dropped pool stay with their sessions, which discard them at their next
    /// transaction ([`still_current`]).
    pub fn retain_topology(&self, t: &Topology) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|k, _| pool_in_use(k, t));
    }
}

/// Whether the pool `k` belongs to topology `t` (pure).
pub fn pool_in_use(k: &PoolKey, t: &Topology) -> bool {
    let is_primary = t.primary.as_ref().is_some_and(|p| *p == k.addr) && k.fence == t.fence_epoch();
    let is_replica = k.fence.is_none() && t.replicas.iter().any(|r| r.addr == k.addr);
    is_primary || is_replica
}

/// Whether a primary connection to `addr`, fenced in at `fence`, may start a
/// new transaction under topology `t` (pure).
pub fn still_current(addr: &str, fence: Option<u64>, t: &Topology) -> bool {
    t.primary.as_deref() == Some(addr) && fence == t.fence_epoch()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Backend, LeaderView, ReplicaState};

    fn topo(primary: Option<&str>, epoch: u64, state: LeaderView) -> Topology {
        Topology {
            primary: primary.map(Arc::from),
            primary_region: None,
            replicas: vec![Backend {
                addr: Arc::from("r:1"),
                region: String::new(),
                state: ReplicaState::Down,
                rtt: None,
            }],
            epoch,
            state,
            failover_hold: Duration::from_secs(1),
            cache_usable: false,
        }
    }

    fn key(addr: &str, fence: Option<u64>) -> PoolKey {
        PoolKey {
            addr: Arc::from(addr),
            database: "d".into(),
            user: "u".into(),
            fence,
        }
    }

    #[test]
    fn only_an_empty_pool_unwanted_for_its_idle_timeout_is_reclaimed() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(600);
        assert!(!reclaimable(0, t0, idle, t0 + Duration::from_secs(599)));
        assert!(reclaimable(0, t0, idle, t0 + idle));
        assert!(!reclaimable(1, t0, idle, t0 + Duration::from_secs(6000)));
        // A clock that went backwards reclaims nothing.
        assert!(!reclaimable(0, t0 + idle, idle, t0));
    }

    #[tokio::test]
    async fn a_pool_whose_connect_is_refused_for_good_is_dropped_and_reports_the_error() {
        // A server that answers every startup packet with FATAL 3D000.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let e = crate::wire::error_response(
                    "FATAL",
                    crate::error::SqlState::InvalidCatalogName.as_str(),
                    "database \"nope\" does not exist",
                );
                let _ = s.write_all(&e.raw).await;
            }
        });
        let pools = Pools::default();
        let params = ConnectParams {
            addr: Arc::from(addr.to_string()),
            user: "u".into(),
            database: "nope".into(),
            password: None,
            tls: crate::tls::BackendTls::disabled(),
            connect_timeout: Duration::from_secs(5),
            max_message: 1 << 20,
        };
        let cfg = PoolConfig::default();
        for _ in 0..3 {
            match pools.get(&params, None, &cfg).await {
                Err(PoolError::Failed { error, .. }) => match &*error {
                    BackendError::Server { code, message } => {
                        assert_eq!(code, crate::error::SqlState::InvalidCatalogName.as_str());
                        assert_eq!(message, "database \"nope\" does not exist");
                    }
                    other => panic!("{other:?}"),
                },
                Err(other) => panic!("{other:?}"),
                Ok(_) => panic!("connected"),
            }
            assert!(pools.is_empty(), "the failed pool is gone");
        }
    }

    #[test]
    fn fence_verdict_needs_a_primary_with_the_leaders_epoch() {
        assert!(fence_verdict(Some(false), Some("3"), 3).is_ok());
        assert!(fence_verdict(Some(false), Some(" 3 "), 3).is_ok());
        let e = fence_verdict(Some(false), Some("2"), 3).unwrap_err();
        assert!(e.contains("epoch 2") && e.contains("is 3"), "{e}");
        assert!(fence_verdict(Some(false), None, 3).is_err());
        assert!(fence_verdict(Some(false), Some(""), 3).is_err());
        assert!(fence_verdict(Some(true), Some("3"), 3)
            .unwrap_err()
            .contains("recovery"));
        assert!(fence_verdict(None, Some("3"), 3).is_err());
    }

    #[test]
    fn new_leader_or_epoch_makes_old_primary_pools_and_connections_stale() {
        let t = topo(Some("p:1"), 3, LeaderView::Serving);
        assert!(pool_in_use(&key("p:1", Some(3)), &t));
        assert!(!pool_in_use(&key("p:1", Some(2)), &t));
        assert!(!pool_in_use(&key("old:1", Some(3)), &t));
        assert!(pool_in_use(&key("r:1", None), &t));
        assert!(!pool_in_use(&key("gone:1", None), &t));
        assert!(still_current("p:1", Some(3), &t));
        assert!(!still_current("p:1", Some(2), &t));
        assert!(!still_current("old:1", Some(3), &t));
        let t = topo(None, 4, LeaderView::FailingOver);
        assert!(!pool_in_use(&key("p:1", Some(3)), &t));
        assert!(!still_current("p:1", Some(3), &t));
        // Static topology: no epoch.
        let t = topo(Some("p:1"), 0, LeaderView::Static);
        assert!(pool_in_use(&key("p:1", None), &t));
        assert!(still_current("p:1", None, &t));
    }
}
