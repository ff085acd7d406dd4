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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_shared::config::PoolConfig;
use prometheus_client::metrics::counter::Counter;
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
    pub message: Arc<str>,
    /// The server's own refusal (SQLSTATE, message), which the client is shown as is.
    pub server: Option<(String, String)>,
    /// The server is unreachable, starting, shutting down or fenced (worth
    /// waiting for during a failover), as opposed to e.g. an authentication error.
    pub unavailable: bool,
}

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
    type Connection = BackendConn;
    type Error = BackendError;

    async fn connect(&self) -> Result<BackendConn, BackendError> {
        match self.connect_checked().await {
            Ok(c) => Ok(c),
            Err(e) => {
                let server = match &e {
                    BackendError::Server { code, message } => Some((code.clone(), message.clone())),
                    _ => None,
                };
                let _ = self.failures.send(Failure {
                    message: Arc::from(e.to_string()),
                    server,
                    unavailable: e.is_unavailable(),
                });
                Err(e)
            }
        }
    }

    async fn is_valid(&self, conn: &mut BackendConn) -> Result<(), BackendError> {
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

    fn has_broken(&self, conn: &mut BackendConn) -> bool {
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
        /// The server's own refusal (SQLSTATE, message), if it refused.
        server: Option<(String, String)>,
    },
    #[error("timed out waiting for a connection to {0}")]
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
            PoolError::Timeout(_) | PoolError::NoPrimary { .. } => true,
        }
    }
}

struct Entry {
    pool: bb8::Pool<Manager>,
    failures: broadcast::Sender<Failure>,
}

/// All pools of a proxy.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Entry>>>,
    fence_rejections: Counter,
}

impl Pools {
    /// Pools that count fencing rejections in `fence_rejections`.
    pub fn new(fence_rejections: Counter) -> Pools {
        Pools {
            pools: Mutex::default(),
            fence_rejections,
        }
    }

    /// The pool for `params`, created with `cfg` if it does not exist yet
    /// (so reloaded pool settings apply to pools created from then on).
    fn entry(&self, params: &ConnectParams, fence: Option<u64>, cfg: &PoolConfig) -> Arc<Entry> {
        let key = PoolKey {
            addr: params.addr.clone(),
            database: params.database.clone(),
            user: params.user.clone(),
            fence,
        };
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = pools.get(&key) {
            return e.clone();
        }
        let (failures, _) = broadcast::channel(16);
        let manager = Manager {
            params: params.clone(),
            fence,
            health_check_after: cfg.health_check_after,
            failures: failures.clone(),
            fence_rejections: self.fence_rejections.clone(),
        };
        let pool = bb8::Pool::builder()
            .max_size(cfg.max_size)
            .min_idle(if cfg.min_size > 0 {
                Some(cfg.min_size)
            } else {
                None
            })
            .idle_timeout(Some(cfg.idle_timeout))
            .connection_timeout(cfg.connect_timeout)
            .retry_connection(false)
            .test_on_check_out(true)
            .build_unchecked(manager);
        let entry = Arc::new(Entry { pool, failures });
        pools.insert(key, entry.clone());
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
        let entry = self.entry(params, fence, cfg);
        let mut failures = entry.failures.subscribe();
        tokio::select! {
            r = entry.pool.get_owned() => r.map_err(|e| match e {
                bb8::RunError::User(e) => PoolError::Backend(e),
                bb8::RunError::TimedOut => PoolError::Timeout(params.addr.clone()),
            }),
            f = failures.recv() => {
                let f = f.unwrap_or_else(|_| Failure {
                    message: Arc::from("connection failed"),
                    server: None,
                    unavailable: true,
                });
                Err(PoolError::ConnectFailed {
                    addr: params.addr.clone(),
                    message: f.message,
                    unavailable: f.unavailable,
                    server: f.server,
                })
            }
        }
    }

    /// (key, connections, idle) of every pool, for metrics.
    pub fn stats(&self) -> Vec<(PoolKey, u32, u32)> {
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
