//! Helpers shared by the proxy's end-to-end test files (`proxy_e2e.rs`,
//! `client_compat.rs`, `region_cache.rs`, `proxy_follow.rs`): a meridian-pgproxy
//! running in-process in front of a [`PgCluster`] (static topology, or following
//! etcd), its static trust configuration, waits on replication and on
//! `pg_stat_activity`, and the `psql` binary.
//!
//! Each test binary compiles this module on its own and uses only part of it,
//! hence the `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meridian_integration::{eventually, PgCluster};
use meridian_pgproxy::follow::{self, Follower};
use meridian_pgproxy::topology::Topology;
use meridian_pgproxy::{run, Listeners};
use meridian_shared::config::{AuthMethod, ProxyConfig, ReplicaConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_postgres::NoTls;

/// A proxy running in-process on free ports, with a static topology or
/// following the leader in etcd; stopped on drop.
pub struct Proxy {
    pub port: u16,
    pub admin_port: u16,
    topology: watch::Receiver<Arc<Topology>>,
    follower: Option<Follower>,
    stop: watch::Sender<bool>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Proxy {
    /// A proxy with the static topology of `cfg` (its backends).
    pub async fn start(cfg: ProxyConfig) -> Proxy {
        Proxy::launch(cfg, false).await
    }

    /// A proxy whose topology follows the leader in etcd (`cfg.etcd`), with its
    /// follower (replica polls, its `proxies/<id>` registration).
    pub async fn start_following(cfg: ProxyConfig) -> Proxy {
        Proxy::launch(cfg, true).await
    }

    async fn launch(mut cfg: ProxyConfig, follow_etcd: bool) -> Proxy {
        meridian_shared::telemetry::init();
        let clients = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = clients.local_addr().unwrap().port();
        let admin_port = admin.local_addr().unwrap().port();
        cfg.listen = format!("127.0.0.1:{port}");
        cfg.admin_listen = format!("127.0.0.1:{admin_port}");
        cfg.shutdown_drain = Duration::from_secs(1);
        let (topology, replicas, follower, static_topology) = if follow_etcd {
            cfg.validate().unwrap();
            let f = follow::spawn(&cfg).unwrap();
            (f.topology.clone(), Some(f.replicas.clone()), Some(f), None)
        } else {
            let (tx, rx) = watch::channel(Arc::new(Topology::from_config(&cfg)));
            (rx, None, None, Some(tx))
        };
        let topo_rx = topology.clone();
        let (stop, stop_rx) = watch::channel(false);
        let (cfg_tx, cfg_rx) = watch::channel(Arc::new(cfg));
        tokio::spawn(async move {
            // The senders must outlive the proxy: a closed watch would end its loops.
            let _keep_topology = static_topology;
            let _keep_config = cfg_tx;
            if let Err(e) = run(
                cfg_rx,
                Listeners {
                    clients,
                    admin: Some(admin),
                },
                topo_rx,
                replicas,
                stop_rx,
            )
            .await
            {
                panic!("proxy failed: {e}");
            }
        });
        Proxy {
            port,
            admin_port,
            topology,
            follower,
            stop,
        }
    }

    /// The topology the proxy routes by right now.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.borrow().clone()
    }

    /// Waits until the topology satisfies `f`.
    pub async fn wait_topology(&self, what: &str, f: impl Fn(&Topology) -> bool) {
        eventually(Duration::from_secs(15), what, || async {
            let t = self.topology();
            anyhow::ensure!(f(&t), "topology is {t:?}");
            Ok(())
        })
        .await
        .unwrap();
    }

    /// Graceful stop: the proxy stops and its follower, if any, revokes the
    /// proxy's registration.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(f) = self.follower.take() {
            f.stop().await;
        }
    }

    /// A libpq keyword/value connection string to the proxy, database `postgres`.
    pub fn dsn(&self, user: &str, extra: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres {extra}",
            self.port
        )
    }

    /// The same as a URL (for clients that take only URLs, such as sqlx).
    pub fn url(&self, user: &str) -> String {
        format!(
            "postgres://{user}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// A tokio-postgres client through the proxy; its connection task drops
    /// asynchronous messages (see `client_compat.rs` for one that keeps them).
    pub async fn connect(
        &self,
        user: &str,
        extra: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.dsn(user, extra), NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// A static topology of `cluster` (its primary and replicas) with trust auth.
pub fn trust_config(cluster: &PgCluster) -> ProxyConfig {
    let mut cfg = ProxyConfig {
        auth: AuthMethod::Trust,
        ..Default::default()
    };
    cfg.backends.primary = Some(format!("127.0.0.1:{}", cluster.primary().port()));
    cfg.backends.replicas = cluster
        .replicas()
        .iter()
        .map(|r| ReplicaConfig {
            addr: format!("127.0.0.1:{}", r.port()),
            region: None,
        })
        .collect();
    cfg
}

/// Waits until the count query `sql` returns `expected` (replication is asynchronous).
pub async fn wait_count(c: &tokio_postgres::Client, sql: &str, expected: i64, within: Duration) {
    eventually(within, sql, || async {
        let n: i64 = c.query_one(sql, &[]).await?.get(0);
        anyhow::ensure!(n == expected, "got {n}, want {expected}");
        Ok(())
    })
    .await
    .unwrap();
}

/// Waits until exactly one session on the server of `c` is running `query`.
pub async fn wait_running(c: &tokio_postgres::Client, query: &str) {
    eventually(Duration::from_secs(10), query, || async {
        let n = count_running(c, query).await?;
        anyhow::ensure!(n == 1, "{n} sessions run it");
        Ok(())
    })
    .await
    .unwrap();
}

/// How many sessions on the server of `c` are running `query` right now.
pub async fn count_running(c: &tokio_postgres::Client, query: &str) -> anyhow::Result<i64> {
    Ok(c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
        &[&query],
    )
    .await?
    .get(0))
}

/// The `psql` program: from `PATH`, else PostgreSQL 15's Debian location.
pub fn psql_path() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("psql"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin/psql"))
}
