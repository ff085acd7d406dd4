//! [`Shared`]: what every session of one proxy reads — the configuration (replaced on
//! reload), the topology, the pools, the statement classifier and function catalog, the
//! cancel-key registry, metrics, TLS settings, the regional cache and the shutdown signal.
//! Fields are private; sessions and background tasks use the accessors, and admission of a
//! client goes through [`Shared::admit_client`], whose guard keeps the client count right
//! on every exit path.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use meridian_shared::config::ProxyConfig;
use meridian_sqlroute::{Classifier, FunctionCatalog};
use tokio::sync::watch;

use crate::cache::RegionCache;
use crate::cancel::CancelRegistry;
use crate::health::ReplicaTable;
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::tls::BackendTls;
use crate::topology::TopologyRx;

/// State shared by every session of one proxy.
pub struct Shared {
    config: watch::Receiver<Arc<ProxyConfig>>,
    pools: Arc<Pools>,
    topology: TopologyRx,
    replicas: ReplicaTable,
    classifier: Classifier,
    catalog: RwLock<Arc<FunctionCatalog>>,
    /// Bumped whenever the catalog is replaced (sessions cache it until then).
    catalog_generation: AtomicU64,
    cancel: CancelRegistry,
    metrics: Arc<Metrics>,
    backend_tls: Arc<BackendTls>,
    tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
    next_session: AtomicU64,
    clients: AtomicUsize,
    cache: Option<RegionCache>,
    /// Relation names known to be unlogged: reads of them go to the primary.
    unlogged: RwLock<HashSet<String>>,
}

/// At most this many unlogged relation names are remembered (a client cannot make the
/// proxy grow without bound by creating tables; past it, reads of a new one fail over to
/// the primary only for the simple protocol).
const MAX_UNLOGGED: usize = 10_000;

/// Everything [`Shared`] is built from.
pub struct SharedParts {
    pub config: watch::Receiver<Arc<ProxyConfig>>,
    pub pools: Arc<Pools>,
    pub topology: TopologyRx,
    /// Replay positions and lag of the replicas (read-your-writes, staleness bound).
    pub replicas: ReplicaTable,
    pub classifier: Classifier,
    pub catalog: FunctionCatalog,
    pub metrics: Arc<Metrics>,
    pub backend_tls: Arc<BackendTls>,
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub shutdown: watch::Receiver<bool>,
    /// The regional result cache, when `[cache]` is enabled.
    pub cache: Option<RegionCache>,
}

impl Shared {
    pub fn new(p: SharedParts) -> Shared {
        Shared {
            config: p.config,
            pools: p.pools,
            topology: p.topology,
            replicas: p.replicas,
            classifier: p.classifier,
            catalog: RwLock::new(Arc::new(p.catalog)),
            catalog_generation: AtomicU64::new(0),
            cancel: CancelRegistry::default(),
            metrics: p.metrics,
            backend_tls: p.backend_tls,
            tls_acceptor: p.tls_acceptor,
            shutdown: p.shutdown,
            next_session: AtomicU64::new(1),
            clients: AtomicUsize::new(0),
            cache: p.cache,
            unlogged: RwLock::new(HashSet::new()),
        }
    }

    /// The current configuration (replaced on reload).
    pub fn config(&self) -> Arc<ProxyConfig> {
        self.config.borrow().clone()
    }

    pub fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    pub fn topology(&self) -> &TopologyRx {
        &self.topology
    }

    pub fn replicas(&self) -> &ReplicaTable {
        &self.replicas
    }

    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    pub fn catalog(&self) -> Arc<FunctionCatalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes whenever [`Shared::catalog`] does.
    pub fn catalog_generation(&self) -> u64 {
        self.catalog_generation.load(Ordering::Acquire)
    }

    /// A receiver of the configuration, to notice reloads.
    pub fn config_rx(&self) -> watch::Receiver<Arc<ProxyConfig>> {
        self.config.clone()
    }

    pub fn set_catalog(&self, c: FunctionCatalog) {
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(c);
        self.catalog_generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn cancel(&self) -> &CancelRegistry {
        &self.cancel
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn backend_tls(&self) -> &Arc<BackendTls> {
        &self.backend_tls
    }

    pub fn tls_acceptor(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.tls_acceptor.as_ref()
    }

    /// Turns true when the proxy shuts down.
    pub fn shutdown(&self) -> &watch::Receiver<bool> {
        &self.shutdown
    }

    /// A fresh session id (for logs).
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn cache(&self) -> Option<&RegionCache> {
        self.cache.as_ref()
    }

    /// Whether relation `name` (last part of its name) is known to be unlogged.
    pub fn is_unlogged(&self, name: &str) -> bool {
        let set = self.unlogged.read().unwrap_or_else(|e| e.into_inner());
        !set.is_empty() && set.contains(name)
    }

    /// Remembers unlogged relations (see [`Shared::is_unlogged`]).
    pub fn add_unlogged(&self, names: Vec<String>) {
        let mut set = self.unlogged.write().unwrap_or_else(|e| e.into_inner());
        for n in names {
            if set.len() >= MAX_UNLOGGED {
                break;
            }
            set.insert(n);
        }
    }

    /// Counts a client in; `None` when `max_clients` are already connected. The
    /// guard counts it out when dropped.
    pub fn admit_client(self: &Arc<Self>, max_clients: usize) -> Option<ClientGuard> {
        let before = self.clients.fetch_add(1, Ordering::AcqRel);
        let guard = ClientGuard(self.clone());
        self.metrics.clients.inc();
        (before < max_clients).then_some(guard)
    }
}

/// One admitted client (see [`Shared::admit_client`]).
pub struct ClientGuard(Arc<Shared>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.clients.dec();
    }
}
