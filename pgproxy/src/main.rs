//! `meridian-pgproxy`: parse flags and config, init telemetry, bind, run.
//! SIGTERM/SIGINT drain and stop; SIGHUP reloads the config file. With
//! `--etcd` the topology follows the leader in etcd (`follow`), else it is
//! static from `--primary`/`--replica` or the file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meridian_pgproxy::auth::ScramKeys;
use meridian_pgproxy::topology::Topology;
use meridian_pgproxy::{follow, run, Listeners};
use meridian_shared::config::{self, AuthMethod, PoolMode, ProxyConfig, ReplicaConfig};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Meridian's Postgres wire-protocol proxy: reads to replicas, writes to the primary.
///
/// Settings come from the config file, then environment variables, then flags
/// (each later source overrides the earlier). Every flag below can also be set
/// through the environment variable shown.
#[derive(Parser, Debug)]
#[command(name = "meridian-pgproxy", version)]
struct Args {
    /// TOML config file (see the README's configuration reference).
    #[arg(long, env = "MERIDIAN_PGPROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Client listen address [default: 127.0.0.1:6432].
    #[arg(long, env = "MERIDIAN_PGPROXY_LISTEN")]
    listen: Option<String>,
    /// Admin HTTP address for /health and /metrics [default: 127.0.0.1:9187; "" disables].
    #[arg(long, env = "MERIDIAN_PGPROXY_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Primary as host:port (static topology).
    #[arg(long, env = "MERIDIAN_PGPROXY_PRIMARY")]
    primary: Option<String>,
    /// Replica as host:port; repeat for several (static topology).
    #[arg(long, env = "MERIDIAN_PGPROXY_REPLICAS", value_delimiter = ',')]
    replica: Vec<String>,
    /// This proxy's region (replicas of the same region are preferred) [default: ""].
    #[arg(long, env = "MERIDIAN_PGPROXY_REGION")]
    region: Option<String>,
    /// Default client auth: scram-sha-256, md5 or trust [default: scram-sha-256].
    /// `trust` lets any user in and logs in to backends under the same name (development only).
    #[arg(long, env = "MERIDIAN_PGPROXY_AUTH")]
    auth: Option<AuthMethod>,
    /// Pooling mode: session or transaction [default: session].
    #[arg(long, env = "MERIDIAN_PGPROXY_POOL_MODE")]
    pool_mode: Option<PoolMode>,
    /// Maximum backend connections per (backend, database, user) pool [default: 50].
    #[arg(long, env = "MERIDIAN_PGPROXY_POOL_SIZE")]
    pool_size: Option<u32>,
    /// Idle connections above the minimum close after this; a pool left without
    /// connections is dropped once it was not asked for this long [default: 10m].
    #[arg(long, env = "MERIDIAN_PGPROXY_POOL_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    pool_idle_timeout: Option<Duration>,
    /// Maximum client connections, counted from accept (clients still logging in
    /// included) [default: 1000].
    #[arg(long, env = "MERIDIAN_PGPROXY_MAX_CLIENTS")]
    max_clients: Option<usize>,
    /// Time a client has from its connect to the end of authentication; then it is
    /// disconnected (FATAL 57014 once it sent its startup packet) [default: 60s].
    #[arg(long, env = "MERIDIAN_PGPROXY_CLIENT_LOGIN_TIMEOUT", value_parser = humantime::parse_duration)]
    client_login_timeout: Option<Duration>,
    /// Largest message accepted before authentication (password, SASL), in bytes;
    /// longer ones are refused with 08P01 [default: 8192].
    #[arg(long, env = "MERIDIAN_PGPROXY_MAX_AUTH_MESSAGE")]
    max_auth_message: Option<usize>,
    /// PEM certificate offered to clients (enables TLS) [default: none].
    #[arg(long, env = "MERIDIAN_PGPROXY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert [default: none].
    #[arg(long, env = "MERIDIAN_PGPROXY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// etcd endpoints, comma-separated (http://host:port): follow the leader in etcd
    /// instead of --primary/--replica, which are then not allowed [default: none].
    #[arg(long, env = "MERIDIAN_PGPROXY_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Cluster name in etcd (keys under /meridian/<cluster>/) [default: meridian].
    #[arg(long, env = "MERIDIAN_PGPROXY_CLUSTER")]
    cluster: Option<String>,
    /// This proxy's id, registered as proxies/<id> in etcd [default: <hostname>-<listen port>].
    #[arg(long, env = "MERIDIAN_PGPROXY_PROXY_ID")]
    proxy_id: Option<String>,
    /// How long new write transactions wait for a serving primary during a failover;
    /// etcd's config.failover_hold overrides it when set [default: 10s].
    #[arg(long, env = "MERIDIAN_PGPROXY_FAILOVER_HOLD", value_parser = humantime::parse_duration)]
    failover_hold: Option<Duration>,
    /// TTL of the proxies/<id> lease; losing etcd for longer stops writes [default: 3s].
    #[arg(long, env = "MERIDIAN_PGPROXY_ETCD_LEASE_TTL", value_parser = humantime::parse_duration)]
    etcd_lease_ttl: Option<Duration>,
    /// After losing etcd, keep writing to the last leader while every replica
    /// confirms it (`true`/`false`) [default: true].
    #[arg(long, env = "MERIDIAN_PGPROXY_FAILSAFE")]
    failsafe: Option<bool>,
    /// How often each replica's health and replay position are polled [default: 200ms].
    #[arg(long, env = "MERIDIAN_PGPROXY_REPLICA_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    replica_poll_interval: Option<Duration>,
    /// Replicas replaying further behind than this get no reads [default: 5s].
    #[arg(long, env = "MERIDIAN_PGPROXY_MAX_REPLICA_LAG", value_parser = humantime::parse_duration)]
    max_replica_lag: Option<Duration>,
    /// How long a read waits for a replica to replay the session's last commit
    /// (or `meridian.min_lsn`) before it runs on the primary [default: 200ms].
    #[arg(long, env = "MERIDIAN_PGPROXY_RYW_WAIT", value_parser = humantime::parse_duration)]
    ryw_wait: Option<Duration>,
    /// Read-your-writes on or off [default: true].
    #[arg(long, env = "MERIDIAN_PGPROXY_READ_YOUR_WRITES")]
    read_your_writes: Option<bool>,
    /// Enable the regional result cache with this Redis (sets `cache.enabled` and `cache.redis`).
    #[arg(long, env = "MERIDIAN_PGPROXY_CACHE_REDIS")]
    cache_redis: Option<String>,
    /// The database whose reads are cached (the agents' `--cache-database`) [default: postgres].
    #[arg(long, env = "MERIDIAN_PGPROXY_CACHE_DATABASE")]
    cache_database: Option<String>,
    /// Longest a cache lookup may take before the read runs uncached [default: 20ms].
    #[arg(long, env = "MERIDIAN_PGPROXY_CACHE_TIMEOUT", value_parser = humantime::parse_duration)]
    cache_timeout: Option<Duration>,
    /// Threads of the async runtime; 0 = one per CPU, 1 = a single-threaded runtime
    /// [default: 0].
    #[arg(long, env = "MERIDIAN_PGPROXY_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

impl Args {
    /// file < env < flags (clap merges env and flags; both override the file).
    fn effective(&self) -> anyhow::Result<ProxyConfig> {
        let mut cfg: ProxyConfig = match &self.config {
            Some(path) => config::load_toml(path)?,
            None => ProxyConfig::default(),
        };
        if let Some(v) = &self.listen {
            cfg.listen = v.clone();
        }
        if let Some(v) = &self.admin_listen {
            cfg.admin_listen = v.clone();
        }
        if let Some(v) = &self.primary {
            cfg.backends.primary = Some(v.clone());
        }
        if !self.replica.is_empty() {
            cfg.backends.replicas = self
                .replica
                .iter()
                .map(|a| ReplicaConfig {
                    addr: a.clone(),
                    region: None,
                })
                .collect();
        }
        if let Some(v) = &self.region {
            cfg.region = v.clone();
        }
        if let Some(v) = self.auth {
            cfg.auth = v;
        }
        if let Some(v) = self.pool_mode {
            cfg.pool.mode = v;
        }
        if let Some(v) = self.pool_idle_timeout {
            cfg.pool.idle_timeout = v;
        }
        if let Some(v) = self.pool_size {
            cfg.pool.max_size = v;
        }
        if let Some(v) = self.max_clients {
            cfg.max_clients = v;
        }
        if let Some(v) = self.client_login_timeout {
            cfg.client_login_timeout = v;
        }
        if let Some(v) = self.max_auth_message {
            cfg.max_auth_message = v;
        }
        if let Some(v) = &self.tls_cert {
            cfg.tls.cert = Some(v.clone());
        }
        if let Some(v) = &self.tls_key {
            cfg.tls.key = Some(v.clone());
        }
        if !self.etcd.is_empty() {
            if self.primary.is_some() || !self.replica.is_empty() {
                anyhow::bail!(
                    "--etcd and --primary/--replica exclude each other: with --etcd the topology comes from etcd"
                );
            }
            cfg.etcd.endpoints = self.etcd.clone();
        }
        if let Some(v) = &self.cluster {
            cfg.etcd.cluster = v.clone();
        }
        if let Some(v) = &self.proxy_id {
            cfg.etcd.proxy_id = Some(v.clone());
        }
        if let Some(v) = self.failover_hold {
            cfg.etcd.failover_hold = v;
        }
        if let Some(v) = self.etcd_lease_ttl {
            cfg.etcd.lease_ttl = v;
        }
        if let Some(v) = self.failsafe {
            cfg.etcd.failsafe = v;
        }
        if let Some(v) = self.replica_poll_interval {
            cfg.etcd.replica_poll_interval = v;
        }
        if let Some(v) = self.max_replica_lag {
            cfg.etcd.max_replica_lag = v;
        }
        if let Some(v) = self.ryw_wait {
            cfg.routing.ryw_wait = v;
        }
        if let Some(v) = self.read_your_writes {
            cfg.routing.read_your_writes = v;
        }
        if let Some(v) = &self.cache_redis {
            cfg.cache.enabled = true;
            cfg.cache.redis = v.clone();
        }
        if let Some(v) = &self.cache_database {
            cfg.cache.database = v.clone();
        }
        if let Some(v) = self.cache_timeout {
            cfg.cache.timeout = v;
        }
        if let Some(v) = self.worker_threads {
            cfg.worker_threads = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn main() -> anyhow::Result<()> {
    meridian_shared::telemetry::init();
    let args = Args::parse();
    let cfg = args.effective()?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    // SCRAM keys of cleartext passwords are derived once, here, not at each login.
    ScramKeys::global().prepare(&cfg);
    let mut runtime = match cfg.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if cfg.worker_threads > 1 {
        runtime.worker_threads(cfg.worker_threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, cfg))
}

/// Binds, starts the etcd follower (if any) and runs until SIGTERM/SIGINT.
async fn serve(args: Args, cfg: ProxyConfig) -> anyhow::Result<()> {
    if cfg.backends.primary.is_none() && !cfg.etcd.enabled() {
        anyhow::bail!("no primary configured: pass --primary HOST:PORT or --etcd URL, or set backends.primary or etcd.endpoints in the config file");
    }
    let clients = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding listen address {}", cfg.listen))?;
    let admin = if cfg.admin_listen.is_empty() {
        None
    } else {
        Some(
            TcpListener::bind(&cfg.admin_listen)
                .await
                .with_context(|| format!("binding admin_listen address {}", cfg.admin_listen))?,
        )
    };
    // With etcd the follower owns the topology (and keeps it across SIGHUP);
    // otherwise it is static and replaced on reload.
    let follower = if cfg.etcd.enabled() {
        let f = follow::spawn(&cfg).context("starting the etcd follower")?;
        tracing::info!(proxy_id = %f.proxy_id, endpoints = ?cfg.etcd.endpoints, "following the leader in etcd");
        Some(f)
    } else {
        None
    };
    let (topo_tx, static_rx) = watch::channel(Arc::new(Topology::from_config(&cfg)));
    let topo_rx = follower.as_ref().map_or(static_rx, |f| f.topology.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (reload_tx, mut reload_rx) = watch::channel(0u64);

    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        let mut n = 0;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => { n += 1; let _ = reload_tx.send(n); }
            }
        }
        let _ = stop_tx.send(true);
    });

    let (config_tx, config_rx) = watch::channel(Arc::new(cfg));
    let replicas = follower.as_ref().map(|f| f.replicas.clone());
    let proxy = run(
        config_rx,
        Listeners { clients, admin },
        topo_rx,
        replicas,
        stop_rx,
    );
    tokio::pin!(proxy);
    loop {
        tokio::select! {
            r = &mut proxy => {
                if let Some(f) = follower {
                    f.stop().await;
                }
                return r.map_err(Into::into);
            }
            _ = reload_rx.changed() => {
                match args.effective() {
                    Ok(new) => {
                        // Derive changed passwords' SCRAM keys off the async workers,
                        // before the new configuration takes logins.
                        let new = Arc::new(new);
                        let prepared = new.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            ScramKeys::global().prepare(&prepared)
                        })
                        .await;
                        tracing::info!("SIGHUP: configuration reloaded");
                        if follower.is_none() {
                            let _ = topo_tx.send(Arc::new(Topology::from_config(&new)));
                        }
                        let _ = config_tx.send(new);
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: configuration not reloaded"),
                }
            }
        }
    }
}
