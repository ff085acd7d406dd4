//! Backend connection pools (bb8), one per (backend address, database, user).
//!
//! bb8 reports a failed connect only to its error sink and lets `get()` wait
//! for the whole connection timeout (bb8 #227). A proxy must fail fast when a
//! backend is down (failover speed depends on it), so the manager also
//! broadcasts connect failures and [`Pools::get`] returns the first one that
//! happens while it waits. A connection idle for longer than
//! `health_check_after` is checked with a round trip before it is handed out;
//! a broken one, or one not idle outside a transaction, is never handed out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_shared::config::PoolConfig;
use tokio::sync::broadcast;

use crate::backend::{BackendConn, BackendError, ConnectParams};

/// The key of one pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: Arc<str>,
    pub database: String,
    pub user: String,
}

pub struct Manager {
    params: ConnectParams,
    health_check_after: Duration,
    failures: broadcast::Sender<Arc<str>>,
}

impl bb8::ManageConnection for Manager {
    type Connection = BackendConn;
    type Error = BackendError;

    async fn connect(&self) -> Result<BackendConn, BackendError> {
        match BackendConn::connect(&self.params).await {
            Ok(c) => Ok(c),
            Err(e) => {
                let _ = self.failures.send(Arc::from(e.to_string()));
                Err(e)
            }
        }
    }

    async fn is_valid(&self, conn: &mut BackendConn) -> Result<(), BackendError> {
        if conn.last_used.elapsed() < self.health_check_after {
            return Ok(());
        }
        conn.simple_query("SELECT 1").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut BackendConn) -> bool {
        conn.broken || conn.tx_status != b'I'
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
    ConnectFailed { addr: Arc<str>, message: Arc<str> },
    #[error("timed out waiting for a connection to {0}")]
    Timeout(Arc<str>),
}

struct Entry {
    pool: bb8::Pool<Manager>,
    failures: broadcast::Sender<Arc<str>>,
}

/// All pools of a proxy.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Entry>>>,
}

impl Pools {
    /// The pool for `params`, created with `cfg` if it does not exist yet
    /// (so reloaded pool settings apply to pools created from then on).
    fn entry(&self, params: &ConnectParams, cfg: &PoolConfig) -> Arc<Entry> {
        let key = PoolKey {
            addr: params.addr.clone(),
            database: params.database.clone(),
            user: params.user.clone(),
        };
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = pools.get(&key) {
            return e.clone();
        }
        let (failures, _) = broadcast::channel(16);
        let manager = Manager {
            params: params.clone(),
            health_check_after: cfg.health_check_after,
            failures: failures.clone(),
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
    pub async fn get(&self, params: &ConnectParams, cfg: &PoolConfig) -> Result<Pooled, PoolError> {
        let entry = self.entry(params, cfg);
        let mut failures = entry.failures.subscribe();
        tokio::select! {
            r = entry.pool.get_owned() => r.map_err(|e| match e {
                bb8::RunError::User(e) => PoolError::Backend(e),
                bb8::RunError::TimedOut => PoolError::Timeout(params.addr.clone()),
            }),
            f = failures.recv() => Err(PoolError::ConnectFailed {
                addr: params.addr.clone(),
                message: f.unwrap_or_else(|_| Arc::from("connection failed")),
            }),
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
}
