//! meridian-pgproxy: a PostgreSQL wire-protocol proxy that applications use
//! through an ordinary connection string. It authenticates clients, pools
//! backend connections, sends reads to a replica and writes to the primary,
//! and keeps session state correct while clients move between backends.
//!
//! The crate is a library with a thin `main`: [`run`] takes the listeners and
//! a shutdown signal, so tests run the same proxy in-process.
//!
//! Module map, by phase of a connection: [`handshake`] (TLS, startup, cancel),
//! [`auth`], [`route`] (pure decision), [`pool`]/[`backend`] (connect),
//! [`session`] (relay and session state), [`ryw`] (read-your-writes
//! decisions), [`cancel`], [`metrics`].
//! The topology comes from [`topology`] (static) or [`follow`] (etcd, with
//! replica health from [`health`]).

pub mod auth;
pub mod backend;
pub mod cache;
pub mod cancel;
pub mod catalog;
pub mod client;
pub mod engine;
pub mod error;
pub mod etcd_view;
pub mod failsafe;
pub mod follow;
pub mod fuzz;
pub mod handshake;
pub mod health;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod route;
pub mod ryw;
pub mod session;
pub mod shared;
pub mod stream;
#[cfg(test)]
pub mod testing;
pub mod tls;
pub mod topology;
pub mod wire;

/// The etcd client the follower uses (re-exported for tests and tools).
pub use etcd_client;

use std::sync::Arc;
use std::time::Duration;

use meridian_shared::config::ProxyConfig;
use meridian_sqlroute::{Classifier, FunctionCatalog};

pub use crate::shared::Shared;
use crate::shared::SharedParts;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::backend::ConnectParams;
use crate::health::ReplicaTable;
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::tls::BackendTls;
use crate::topology::TopologyRx;

/// Errors that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] meridian_shared::config::ConfigError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cache.redis: {0}")]
    CacheRedis(#[from] redis::RedisError),
}

/// Keeps pools and metrics in step with the topology: pools of an old primary
/// or epoch, or of replicas that left, are dropped at once.
async fn follow_topology(mut topology: TopologyRx, pools: Arc<Pools>, metrics: Arc<Metrics>) {
    loop {
        {
            let t = topology.borrow_and_update().clone();
            pools.retain_topology(&t);
            metrics.observe_topology(&t);
        }
        if topology.changed().await.is_err() {
            return;
        }
    }
}

/// The proxy's listeners, bound by the caller.
pub struct Listeners {
    pub clients: TcpListener,
    pub admin: Option<TcpListener>,
}

/// Runs the proxy until `shutdown` turns true, then drains: no new clients,
/// running transactions get `shutdown_drain` to finish.
///
/// A new value in `config` (SIGHUP) applies to users, routing and pools created
/// from then on; listeners and TLS keep their start-up settings.
///
/// `replicas` is the replica table kept by the topology's source (the etcd
/// follower's); with `None` (a static topology) the proxy polls the
/// topology's replicas itself, so read-your-writes works in both cases.
pub async fn run(
    config: watch::Receiver<Arc<ProxyConfig>>,
    listeners: Listeners,
    topology: TopologyRx,
    replicas: Option<ReplicaTable>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let cfg = config.borrow().clone();
    cfg.validate()?;
    let backend_tls = BackendTls::from_config(&cfg.backend_tls)?;
    let tls_acceptor = tls::acceptor(&cfg.tls)?;
    let metrics = Arc::new(Metrics::new());
    let pools = Arc::new(Pools::new(crate::pool::PoolMetrics {
        fence_rejections: metrics.fencing_rejections.clone(),
        waiting: metrics.pool_waiting.clone(),
        wait_timeouts: metrics.pool_wait_timeouts.clone(),
    }));
    let mut catalog = FunctionCatalog::with_builtin_defaults();
    catalog.add_read_safe(cfg.routing.read_safe_functions.iter().cloned());
    let mut tasks = tokio::task::JoinSet::new();
    let replicas = match replicas {
        Some(t) => t,
        None => {
            let table = ReplicaTable::default();
            let params = ConnectParams {
                addr: Arc::from(""),
                user: cfg.routing.catalog_user.clone(),
                database: cfg.routing.catalog_database.clone(),
                password: cfg.routing.catalog_password.clone(),
                tls: backend_tls.clone(),
                connect_timeout: cfg.pool.connect_timeout.min(Duration::from_secs(2)),
                max_message: cfg.max_message_size,
            };
            tasks.spawn(health::follow_static(
                topology.clone(),
                params,
                cfg.etcd.replica_poll_interval,
                table.clone(),
            ));
            table
        }
    };
    let region_cache = cache::RegionCache::from_config(&cfg)?;
    let shared = Arc::new(Shared::new(SharedParts {
        cache: region_cache,
        replicas,
        classifier: Classifier::new(cfg.routing.parse_cache_size),
        catalog,
        config,
        pools: pools.clone(),
        topology,
        metrics: metrics.clone(),
        backend_tls,
        tls_acceptor,
        shutdown: shutdown.clone(),
    }));
    if let Some(admin) = listeners.admin {
        tasks.spawn(metrics::serve_admin(admin, metrics.clone(), pools.clone()));
    }
    tasks.spawn(catalog::refresh_loop(shared.clone()));
    tasks.spawn(follow_topology(
        shared.topology().clone(),
        pools.clone(),
        metrics.clone(),
    ));
    info!(listen = %listeners.clients.local_addr()?, "meridian-pgproxy accepting clients");

    let mut sessions = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            r = listeners.clients.accept() => match r {
                Ok((tcp, peer)) => {
                    sessions.spawn(handshake::serve(tcp, peer, shared.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = stop.changed() => {
                if *stop.borrow() { break; }
            }
        }
    }
    drop(listeners.clients);
    let drain = shared.config().shutdown_drain;
    info!(
        sessions = sessions.len(),
        ?drain,
        "shutting down: draining sessions"
    );
    let _ = tokio::time::timeout(drain, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    sessions.abort_all();
    tasks.abort_all();
    Ok(())
}
