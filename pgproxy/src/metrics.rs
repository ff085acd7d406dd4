//! Prometheus metrics of the proxy and the admin HTTP server (`/health`, `/metrics`).
//!
//! Every label set is bounded: errors by SQLSTATE class and by the proxy's fixed
//! [`ProxyError::label`], pools by (backend, database, user) only while the pool
//! exists — the series of a pool that is gone are removed at the next render, so
//! clients naming thousands of databases leave no series behind.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::error::ProxyError;
use crate::pool::Pools;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub backend: String,
    pub database: String,
    pub user: String,
    pub state: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub clients: Gauge,
    pub queries: Family<TargetLabel, Counter>,
    pub parse_fallbacks: Counter,
    pub errors: Family<ClassLabel, Counter>,
    /// Errors the proxy itself raised towards clients, by [`ProxyError::label`].
    pub proxy_errors: Family<ReasonLabel, Counter>,
    /// Connections closed by `client_login_timeout` (with or without a FATAL).
    pub login_timeouts: Counter,
    pub latency: Histogram,
    pub backend_connections: Family<PoolLabels, Gauge>,
    /// The pool series written at the last render (removed when their pool is gone).
    pool_series: Mutex<HashSet<PoolLabels>>,
    /// Sessions that waited for a primary (failover hold), and how long in total.
    pub failover_holds: Counter,
    pub failover_hold_seconds: Counter<f64, AtomicU64>,
    /// Holds that ran out (the client got 08006).
    pub failover_hold_timeouts: Counter,
    /// New primary connections refused by the fencing check.
    pub fencing_rejections: Counter,
    /// Sessions waiting for a server connection of a pool now.
    pub pool_waiting: Gauge,
    /// Waits for a server connection that ran out (`pool.query_wait_timeout`; client got 53300).
    pub pool_wait_timeouts: Counter,
    pub topology_epoch: Gauge,
    pub replicas_healthy: Gauge,
    /// 1 while a serving primary is known.
    pub primary_available: Gauge,
    /// Reads with a read-your-writes / causal / staleness requirement, by outcome
    /// (`replica_immediate`, `replica_after_wait`, `primary_fallback`).
    pub ryw_reads: Family<OutcomeLabel, Counter>,
    /// Time such reads waited for a replica to replay their LSN.
    pub ryw_wait_seconds: Histogram,
    /// Cache lookups by outcome: hit, miss, stale, error, bypass.
    pub cache_lookups: Family<OutcomeLabel, Counter>,
    /// Cache stores by outcome: stored, too_large, error.
    pub cache_stores: Family<OutcomeLabel, Counter>,
    /// Time a cache lookup took (Redis round trip included).
    pub cache_lookup_seconds: Histogram,
}

/// A session's handles on `queries{target="primary"|"replica"}`.
pub struct QueryCounters {
    pub primary: Counter,
    pub replica: Counter,
}

impl Metrics {
    /// The query counters of the primary and the replica, for a session to keep: a
    /// label lookup per query hashes the label every time.
    pub fn query_counters(&self) -> QueryCounters {
        let get = |target| self.queries.get_or_create(&TargetLabel { target }).clone();
        QueryCounters {
            primary: get("primary"),
            replica: get("replica"),
        }
    }

    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("meridian_pgproxy");
        let clients = Gauge::default();
        registry.register("clients", "Connected clients", clients.clone());
        let queries = Family::<TargetLabel, Counter>::default();
        registry.register(
            "queries_routed",
            "Statements routed, by target",
            queries.clone(),
        );
        let parse_fallbacks = Counter::default();
        registry.register(
            "parse_fallbacks",
            "Statements the SQL parser could not parse (sent to the primary)",
            parse_fallbacks.clone(),
        );
        let errors = Family::<ClassLabel, Counter>::default();
        registry.register(
            "errors",
            "Errors sent to clients, by SQLSTATE class",
            errors.clone(),
        );
        let proxy_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "proxy_errors",
            "Errors the proxy raised towards clients, by reason",
            proxy_errors.clone(),
        );
        let login_timeouts = Counter::default();
        registry.register(
            "login_timeouts",
            "Connections closed because they did not finish logging in within client_login_timeout",
            login_timeouts.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "query_duration_seconds",
            "Time from a query's arrival to its ReadyForQuery",
            latency.clone(),
        );
        let backend_connections = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "backend_connections",
            "Backend connections per pool and state",
            backend_connections.clone(),
        );
        let failover_holds = Counter::default();
        registry.register(
            "failover_holds",
            "Sessions that waited for a serving, connectable primary",
            failover_holds.clone(),
        );
        let failover_hold_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "failover_hold_seconds",
            "Total time sessions waited for a primary",
            failover_hold_seconds.clone(),
        );
        let failover_hold_timeouts = Counter::default();
        registry.register(
            "failover_hold_timeouts",
            "Waits for a primary that ran out (client got SQLSTATE 08006)",
            failover_hold_timeouts.clone(),
        );
        let fencing_rejections = Counter::default();
        registry.register(
            "fencing_rejections",
            "New primary connections refused: in recovery or not carrying the leader's epoch",
            fencing_rejections.clone(),
        );
        let pool_waiting = Gauge::default();
        registry.register(
            "pool_waiting_clients",
            "Sessions waiting for a server connection (every connection of their pool in use, or one being opened)",
            pool_waiting.clone(),
        );
        let pool_wait_timeouts = Counter::default();
        registry.register(
            "pool_wait_timeouts",
            "Waits for a server connection that ran out after pool.query_wait_timeout (client got SQLSTATE 53300)",
            pool_wait_timeouts.clone(),
        );
        let topology_epoch = Gauge::default();
        registry.register(
            "topology_epoch",
            "Fencing epoch of the leader in the current topology (0: static or unknown)",
            topology_epoch.clone(),
        );
        let replicas_healthy = Gauge::default();
        registry.register(
            "replicas_healthy",
            "Replicas that may take reads (healthy and within max_replica_lag)",
            replicas_healthy.clone(),
        );
        let primary_available = Gauge::default();
        registry.register(
            "primary_available",
            "1 while the topology names a serving primary",
            primary_available.clone(),
        );
        let ryw_reads = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "ryw_reads",
            "Reads that needed a replay position or staleness bound, by outcome",
            ryw_reads.clone(),
        );
        let ryw_wait_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 12));
        registry.register(
            "ryw_wait_seconds",
            "Time reads waited for a replica to replay the session's required LSN",
            ryw_wait_seconds.clone(),
        );
        let cache_lookups = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "cache_lookups",
            "Regional cache lookups by outcome (hit, miss, stale, error, bypass)",
            cache_lookups.clone(),
        );
        let cache_stores = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "cache_stores",
            "Regional cache stores by outcome (stored, too_large, error)",
            cache_stores.clone(),
        );
        let cache_lookup_seconds = Histogram::new(exponential_buckets(0.000_025, 2.0, 12));
        registry.register(
            "cache_lookup_seconds",
            "Time a regional cache lookup took",
            cache_lookup_seconds.clone(),
        );
        Metrics {
            cache_lookups,
            cache_stores,
            cache_lookup_seconds,
            ryw_reads,
            ryw_wait_seconds,
            failover_holds,
            failover_hold_seconds,
            failover_hold_timeouts,
            fencing_rejections,
            pool_waiting,
            pool_wait_timeouts,
            topology_epoch,
            replicas_healthy,
            primary_available,
            registry,
            clients,
            queries,
            parse_fallbacks,
            errors,
            proxy_errors,
            login_timeouts,
            latency,
            backend_connections,
            pool_series: Mutex::default(),
        }
    }

    /// Counts a cache lookup outcome.
    pub fn cache_lookup(&self, outcome: &'static str) {
        self.cache_lookups
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Counts a cache store outcome.
    pub fn cache_store(&self, outcome: &'static str) {
        self.cache_stores
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Counts an error sent to a client by its SQLSTATE's class (the server's errors too).
    pub fn error(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("XX").to_owned();
        self.errors.get_or_create(&ClassLabel { class }).inc();
    }

    /// Counts an error the proxy raised towards a client: by class and by reason.
    pub fn proxy_error(&self, e: &ProxyError) {
        self.error(e.sqlstate().as_str());
        self.proxy_errors
            .get_or_create(&ReasonLabel { reason: e.label() })
            .inc();
    }

    /// Sets the topology gauges.
    pub fn observe_topology(&self, t: &crate::topology::Topology) {
        self.topology_epoch.set(t.epoch as i64);
        self.replicas_healthy.set(t.usable_replicas() as i64);
        self.primary_available.set(i64::from(t.primary.is_some()));
    }

    /// Renders the exposition text, refreshing pool gauges first: the series of pools
    /// that no longer exist are removed.
    pub fn render(&self, pools: &Pools) -> String {
        // Held throughout, so two renders cannot remove each other's fresh series.
        let mut written = self.pool_series.lock().unwrap_or_else(|e| e.into_inner());
        let mut current = HashSet::new();
        for (key, total, idle) in pools.stats() {
            for (state, n) in [("active", total.saturating_sub(idle)), ("idle", idle)] {
                let labels = PoolLabels {
                    backend: key.addr.to_string(),
                    database: key.database.clone(),
                    user: key.user.clone(),
                    state,
                };
                self.backend_connections
                    .get_or_create(&labels)
                    .set(n as i64);
                current.insert(labels);
            }
        }
        for gone in written.difference(&current) {
            self.backend_connections.remove(gone);
        }
        *written = current;
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/health` and `/metrics` until the listener task is dropped.
pub async fn serve_admin(listener: TcpListener, metrics: Arc<Metrics>, pools: Arc<Pools>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let pools = pools.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let pools = pools.clone();
                async move {
                    let (status, ctype, body) = match req.uri().path() {
                        "/health" => (200, "application/json", "{\"status\":\"ok\"}\n".to_owned()),
                        "/metrics" => (
                            200,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            metrics.render(&pools),
                        ),
                        _ => (404, "text/plain", "not found\n".to_owned()),
                    };
                    let resp = Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_default();
                    Ok::<_, Infallible>(resp)
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
