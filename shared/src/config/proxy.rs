//! Configuration of `meridian-pgproxy`: listeners, backends (static or
//! followed in etcd), pools, users, routing and TLS. See the README's configuration reference; each field's
//! default is stated in its doc comment and applied by serde.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Top-level pgproxy configuration (the TOML file's root).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address clients connect to. Default `127.0.0.1:6432`.
    pub listen: String,
    /// Address of the admin HTTP server (`/health`, `/metrics`). Default `127.0.0.1:9187`; empty disables it.
    pub admin_listen: String,
    /// Region this proxy serves; replicas of the same region are preferred for reads. Default empty.
    pub region: String,
    /// Default client authentication: `scram-sha-256`, `md5` or `trust`. Default `scram-sha-256`.
    /// `trust` accepts any user and logs in to the backends under the same name (development only).
    pub auth: AuthMethod,
    /// Maximum concurrent client connections; more get SQLSTATE 53300. Default 1000.
    pub max_clients: usize,
    /// Largest client or backend message accepted, in bytes. Default 1 GiB.
    pub max_message_size: usize,
    /// Largest startup packet accepted, in bytes. Default 10000.
    pub max_startup_packet: usize,
    /// Time a client has from its TCP connect to the end of authentication (TLS and
    /// startup packet included); then it is disconnected, with FATAL 57014 once it has
    /// sent its startup packet (like PostgreSQL's `authentication_timeout`). Default `60s`.
    #[serde(with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// Largest message accepted before authentication has succeeded (password, SASL),
    /// in bytes; a longer one is refused with 08P01 as soon as its length is read.
    /// Default 8192.
    pub max_auth_message: usize,
    /// How long SIGTERM waits for running transactions before closing. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_drain: Duration,
    /// Threads of the proxy's async runtime. Default 0: one per CPU. 1 runs everything on
    /// one thread, like PgBouncer (no cross-thread wake-ups; a sidecar with a one-core CPU
    /// limit gains nothing from more). On the 2-core benchmark machine neither setting was
    /// measurably faster (docs/benchmarks.md). Read at start only (SIGHUP does not change it).
    pub worker_threads: usize,
    /// Static topology (used when no etcd is configured).
    pub backends: BackendsConfig,
    /// Follow the leader in etcd instead of a static topology.
    pub etcd: EtcdConfig,
    /// Backend pool settings.
    pub pool: PoolConfig,
    /// Routing settings.
    pub routing: RoutingConfig,
    /// TLS towards clients.
    pub tls: ClientTlsConfig,
    /// TLS towards backends.
    pub backend_tls: BackendTlsConfig,
    /// Users allowed to connect (ignored for users when `auth = "trust"` unless listed).
    pub users: Vec<UserConfig>,
    /// The regional result cache (opt-in).
    pub cache: CacheConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:6432".into(),
            admin_listen: "127.0.0.1:9187".into(),
            region: String::new(),
            auth: AuthMethod::ScramSha256,
            max_clients: 1000,
            max_message_size: 1 << 30,
            max_startup_packet: 10_000,
            client_login_timeout: Duration::from_secs(60),
            max_auth_message: 8192,
            shutdown_drain: Duration::from_secs(30),
            worker_threads: 0,
            backends: BackendsConfig::default(),
            etcd: EtcdConfig::default(),
            pool: PoolConfig::default(),
            routing: RoutingConfig::default(),
            tls: ClientTlsConfig::default(),
            backend_tls: BackendTlsConfig::default(),
            users: Vec::new(),
            cache: CacheConfig::default(),
        }
    }
}

/// Client authentication method.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256", alias = "scram")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

impl std::str::FromStr for AuthMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "scram-sha-256" | "scram" => Ok(AuthMethod::ScramSha256),
            "md5" => Ok(AuthMethod::Md5),
            "trust" => Ok(AuthMethod::Trust),
            other => Err(format!(
                "unknown auth method `{other}` (expected scram-sha-256, md5 or trust)"
            )),
        }
    }
}

/// The static topology: one primary and any number of replicas.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendsConfig {
    /// `host:port` of the primary. No default; required unless the topology comes from etcd.
    pub primary: Option<String>,
    /// Replicas: `host:port` with an optional region. Default none (reads go to the primary).
    pub replicas: Vec<ReplicaConfig>,
}

/// The `[etcd]` section: where the topology comes from when it is not static.
///
/// With `endpoints` set the proxy watches `/meridian/<cluster>/leader`,
/// `members/` and `config`, polls each replica's health itself, registers
/// `proxies/<proxy_id>` on a lease, and `backends.primary`/`backends.replicas`
/// must stay empty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// etcd client endpoints (`http://host:port` or `host:port`). Default none (static topology).
    pub endpoints: Vec<String>,
    /// Cluster name: keys live under `/meridian/<cluster>/`. Default `meridian`.
    pub cluster: String,
    /// This proxy's id, the key `proxies/<proxy_id>`. Default `<hostname>-<listen port>`.
    pub proxy_id: Option<String>,
    /// How long a new write transaction waits for a serving, connectable primary during a
    /// failover. Default `10s`; the cluster's `config.failover_hold` in etcd overrides it when set.
    #[serde(with = "humantime_serde")]
    pub failover_hold: Duration,
    /// TTL of the `proxies/<id>` lease; losing etcd for longer than this stops writes,
    /// unless the failsafe confirms the last leader. Default `3s`.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Failsafe: after losing etcd, keep sending writes to the last serving leader
    /// while every replica etcd last listed confirms it over replication (checked
    /// by this proxy, every 200 ms; the catalog user needs `pg_monitor`). Default
    /// `true` (docs/control-path.md, "Failsafe").
    pub failsafe: bool,
    /// How often each replica's health and replay position are polled. Default `200ms`.
    #[serde(with = "humantime_serde")]
    pub replica_poll_interval: Duration,
    /// A replica whose replay lag exceeds this gets no reads. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub max_replica_lag: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            cluster: "meridian".into(),
            proxy_id: None,
            failover_hold: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(3),
            failsafe: true,
            replica_poll_interval: Duration::from_millis(200),
            max_replica_lag: Duration::from_secs(5),
        }
    }
}

impl EtcdConfig {
    /// Whether the topology comes from etcd.
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (i, e) in self.endpoints.iter().enumerate() {
            let hostport = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .unwrap_or(e);
            check_hostport(&format!("etcd.endpoints[{i}]"), hostport)?;
        }
        crate::keys::validate_name(&self.cluster)
            .map_err(|e| ConfigError::invalid("etcd.cluster", e.to_string()))?;
        if let Some(id) = &self.proxy_id {
            crate::keys::validate_name(id)
                .map_err(|e| ConfigError::invalid("etcd.proxy_id", e.to_string()))?;
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "etcd.lease_ttl",
                "must be at least 1s (etcd leases count whole seconds)",
            ));
        }
        if self.replica_poll_interval.is_zero() {
            return Err(ConfigError::invalid(
                "etcd.replica_poll_interval",
                "must be greater than 0",
            ));
        }
        if self.failover_hold > Duration::from_secs(600) {
            return Err(ConfigError::invalid(
                "etcd.failover_hold",
                "must be at most 10m",
            ));
        }
        Ok(())
    }
}

/// One statically configured replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// `host:port` of the replica.
    pub addr: String,
    /// Region of the replica. Default: the proxy's own region.
    #[serde(default)]
    pub region: Option<String>,
}

/// Pooling mode of a client session.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// One primary and one replica backend per client, acquired on demand, held until the client leaves.
    #[default]
    Session,
    /// Backends go back to the pool at the end of each transaction (unless the session is pinned).
    Transaction,
}

impl std::str::FromStr for PoolMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "session" => Ok(PoolMode::Session),
            "transaction" => Ok(PoolMode::Transaction),
            other => Err(format!(
                "unknown pool mode `{other}` (expected session or transaction)"
            )),
        }
    }
}

/// Backend pool settings, per (backend, database, user).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Default pooling mode. Default `session`.
    pub mode: PoolMode,
    /// Connections kept open per pool even when idle. Default 0.
    pub min_size: u32,
    /// Most connections per pool. Default 50.
    pub max_size: u32,
    /// Idle connections above `min_size` are closed after this. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time allowed to connect and log in to a backend. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A connection idle for longer than this is checked with a round trip before it is handed out. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub health_check_after: Duration,
    /// How long a client waits for a server connection when every connection of its pool is
    /// in use (PgBouncer's `query_wait_timeout`); then it gets 53300. Default `120s`.
    #[serde(with = "humantime_serde")]
    pub query_wait_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            min_size: 0,
            max_size: 50,
            idle_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(5),
            health_check_after: Duration::from_secs(30),
            query_wait_timeout: Duration::from_secs(120),
        }
    }
}

/// Read/write routing settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Send reads to replicas at all. Default true.
    pub replica_reads: bool,
    /// Extra function names treated as read-safe even if volatile. Default none.
    pub read_safe_functions: Vec<String>,
    /// How often function volatility is reloaded from the primary's `pg_proc`. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub catalog_refresh: Duration,
    /// User the catalog refresh logs in as (must be able to read `pg_proc`). Default `postgres`.
    pub catalog_user: String,
    /// Password of `catalog_user`, if the backend asks for one. Default none.
    pub catalog_password: Option<String>,
    /// Database the catalog refresh connects to. Default `postgres`.
    pub catalog_database: String,
    /// Number of distinct statement texts whose analysis is cached. Default 10000.
    pub parse_cache_size: usize,
    /// Read-your-writes: after a session's write commits, its reads go to a replica only
    /// once the replica has replayed the commit. Default true.
    pub read_your_writes: bool,
    /// How long a read waits for a replica to replay the session's required LSN before it
    /// runs on the primary instead. Default `200ms`; at most `10s`.
    #[serde(with = "humantime_serde")]
    pub ryw_wait: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            replica_reads: true,
            read_safe_functions: Vec::new(),
            catalog_refresh: Duration::from_secs(60),
            catalog_user: "postgres".into(),
            catalog_password: None,
            catalog_database: "postgres".into(),
            parse_cache_size: 10_000,
            read_your_writes: true,
            ryw_wait: Duration::from_millis(200),
        }
    }
}

/// TLS offered to clients.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsConfig {
    /// PEM certificate chain. Default none (TLS not offered; SSLRequest answered `N`).
    pub cert: Option<PathBuf>,
    /// PEM private key. Default none.
    pub key: Option<PathBuf>,
    /// Refuse clients that do not use TLS. Default false.
    pub required: bool,
}

/// libpq-like TLS modes towards backends.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTlsMode {
    /// Never use TLS.
    #[default]
    Disable,
    /// Use TLS if the server offers it, without verifying the certificate.
    Prefer,
    /// Require TLS, without verifying the certificate.
    Require,
    /// Require TLS and verify the certificate chain (against `ca_file`) and host name.
    VerifyFull,
}

impl std::str::FromStr for BackendTlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disable" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-full" => Ok(Self::VerifyFull),
            other => Err(format!(
                "unknown backend TLS mode `{other}` (expected disable, prefer, require or verify-full)"
            )),
        }
    }
}

/// TLS towards backends.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendTlsConfig {
    /// `disable`, `prefer`, `require` or `verify-full`. Default `disable`.
    pub mode: BackendTlsMode,
    /// CA bundle (PEM) for `verify-full`. Default none.
    pub ca_file: Option<PathBuf>,
}

/// One configured user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// User name clients log in with.
    pub name: String,
    /// Cleartext password (prefer `scram_verifier`). Default none.
    #[serde(default)]
    pub password: Option<String>,
    /// A `SCRAM-SHA-256$<iter>:<salt>:<stored>:<server>` verifier as in `pg_authid`. Default none.
    #[serde(default)]
    pub scram_verifier: Option<String>,
    /// Client auth method for this user. Default: the top-level `auth`.
    #[serde(default)]
    pub auth: Option<AuthMethod>,
    /// User name on the backends. Default: `name`.
    #[serde(default)]
    pub backend_user: Option<String>,
    /// Password on the backends. Default: `password`.
    #[serde(default)]
    pub backend_password: Option<String>,
    /// Pooling mode for this user. Default: `pool.mode`.
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    /// Databases this user may connect to. Default: any.
    #[serde(default)]
    pub databases: Vec<String>,
}

impl ProxyConfig {
    /// Checks the whole configuration once; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_addr("listen", &self.listen)?;
        if self.worker_threads > 1024 {
            return Err(ConfigError::invalid(
                "worker_threads",
                "must be at most 1024 (0 means one per CPU)",
            ));
        }
        if !self.admin_listen.is_empty() {
            check_addr("admin_listen", &self.admin_listen)?;
        }
        self.etcd.validate()?;
        self.cache.validate()?;
        if self.routing.ryw_wait > Duration::from_secs(10) {
            return Err(ConfigError::invalid(
                "routing.ryw_wait",
                "must be at most 10s",
            ));
        }
        if self.etcd.enabled() {
            if self.backends.primary.is_some() {
                return Err(ConfigError::invalid(
                    "backends.primary",
                    "not allowed with etcd.endpoints: the primary comes from etcd's `leader`",
                ));
            }
            if !self.backends.replicas.is_empty() {
                return Err(ConfigError::invalid(
                    "backends.replicas",
                    "not allowed with etcd.endpoints: the replicas come from etcd's `members/`",
                ));
            }
        }
        if let Some(p) = &self.backends.primary {
            check_hostport("backends.primary", p)?;
        }
        for (i, r) in self.backends.replicas.iter().enumerate() {
            check_hostport(&format!("backends.replicas[{i}].addr"), &r.addr)?;
        }
        if self.max_clients == 0 {
            return Err(ConfigError::invalid("max_clients", "must be at least 1"));
        }
        if self.max_startup_packet < 8 || self.max_startup_packet > 1 << 20 {
            return Err(ConfigError::invalid(
                "max_startup_packet",
                "must be between 8 bytes and 1 MiB",
            ));
        }
        if self.max_message_size < 1024 {
            return Err(ConfigError::invalid(
                "max_message_size",
                "must be at least 1024 bytes",
            ));
        }
        if self.max_auth_message < 256 || self.max_auth_message > self.max_message_size {
            return Err(ConfigError::invalid(
                "max_auth_message",
                "must be between 256 bytes and max_message_size",
            ));
        }
        if self.client_login_timeout.is_zero()
            || self.client_login_timeout > Duration::from_secs(600)
        {
            return Err(ConfigError::invalid(
                "client_login_timeout",
                "must be greater than 0 and at most 10m",
            ));
        }
        if self.pool.max_size == 0 {
            return Err(ConfigError::invalid("pool.max_size", "must be at least 1"));
        }
        if self.pool.query_wait_timeout.is_zero()
            || self.pool.query_wait_timeout > Duration::from_secs(24 * 3600)
        {
            return Err(ConfigError::invalid(
                "pool.query_wait_timeout",
                "must be greater than 0 and at most 24h",
            ));
        }
        if self.pool.min_size > self.pool.max_size {
            return Err(ConfigError::invalid(
                "pool.min_size",
                "must not exceed pool.max_size",
            ));
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => {
                return Err(ConfigError::invalid("tls.key", "required with tls.cert"))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid("tls.cert", "required with tls.key"))
            }
            (None, None) if self.tls.required => {
                return Err(ConfigError::invalid(
                    "tls.required",
                    "needs tls.cert and tls.key",
                ))
            }
            _ => {}
        }
        if self.backend_tls.mode == BackendTlsMode::VerifyFull && self.backend_tls.ca_file.is_none()
        {
            return Err(ConfigError::invalid(
                "backend_tls.ca_file",
                "required when backend_tls.mode = \"verify-full\"",
            ));
        }
        let mut seen = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let key = format!("users[{i}]");
            if u.name.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    "must not be empty",
                ));
            }
            if !seen.insert(u.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("user `{}` is listed twice", u.name),
                ));
            }
            let method = u.auth.unwrap_or(self.auth);
            match method {
                AuthMethod::ScramSha256 if u.password.is_none() && u.scram_verifier.is_none() => {
                    return Err(ConfigError::invalid(
                        format!("{key}.password"),
                        "scram-sha-256 needs `password` or `scram_verifier`",
                    ))
                }
                AuthMethod::Md5 if u.password.is_none() => {
                    return Err(ConfigError::invalid(
                        format!("{key}.password"),
                        "md5 needs `password`",
                    ))
                }
                _ => {}
            }
            if let Some(v) = &u.scram_verifier {
                if !v.starts_with("SCRAM-SHA-256$") {
                    return Err(ConfigError::invalid(
                        format!("{key}.scram_verifier"),
                        "must look like SCRAM-SHA-256$<iterations>:<salt>:<storedkey>:<serverkey>",
                    ));
                }
            }
        }
        if self.auth != AuthMethod::Trust && self.users.is_empty() {
            return Err(ConfigError::invalid(
                "users",
                "no users configured; add [[users]] or use auth = \"trust\" for development",
            ));
        }
        Ok(())
    }

    /// The configured user entry, if any.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}

fn check_addr(key: &str, value: &str) -> Result<(), ConfigError> {
    value
        .parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|e| {
            ConfigError::invalid(key, format!("`{value}` is not an ip:port address ({e})"))
        })
}

fn check_hostport(key: &str, value: &str) -> Result<(), ConfigError> {
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(ConfigError::invalid(
            key,
            format!("`{value}` is not a host:port address"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_in_trust_mode() {
        let c = ProxyConfig {
            auth: AuthMethod::Trust,
            ..Default::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn scram_without_users_names_the_key() {
        let err = ProxyConfig::default().validate().unwrap_err().to_string();
        assert!(err.contains("`users`"), "{err}");
    }

    #[test]
    fn cache_section_parses_and_bad_rules_name_their_key() {
        let parse = |extra: &str| {
            toml::from_str::<ProxyConfig>(&format!(
                "auth = \"trust\"\n[cache]\nenabled = true\nredis = \"redis://r:6379\"\n{extra}"
            ))
        };
        let c = parse(
            "timeout = \"5ms\"\n[[cache.rules]]\ntables = [\"items\", \"shop.*\"]\nttl = \"10s\"\n\
             [[cache.rules]]\npattern = \"(?i)^select\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.cache.timeout, Duration::from_millis(5));
        assert_eq!(c.cache.rules[0].ttl, Duration::from_secs(10));
        assert_eq!(c.cache.rules[1].ttl, Duration::from_secs(30));
        assert_eq!(c.cache.max_entry_bytes, 1 << 20);
        for (extra, key) in [
            (
                "[[cache.rules]]\npattern = \"(\"\n",
                "cache.rules[0].pattern",
            ),
            ("[[cache.rules]]\nttl = \"1s\"\n", "cache.rules[0]"),
            (
                "[[cache.rules]]\ntables = [\"t\"]\npattern = \"x\"\n",
                "cache.rules[0]",
            ),
            (
                "[[cache.rules]]\ntables = [\"t\"]\nttl = \"0s\"\n",
                "cache.rules[0].ttl",
            ),
            ("timeout = \"0s\"\n", "cache.timeout"),
        ] {
            let err = parse(extra).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let mut bad_url = ProxyConfig {
            auth: AuthMethod::Trust,
            ..Default::default()
        };
        bad_url.cache.enabled = true;
        bad_url.cache.redis = "localhost:6379".into();
        let err = bad_url.validate().unwrap_err().to_string();
        assert!(err.contains("cache.redis"), "{err}");
    }

    #[test]
    fn login_limits_parse_with_defaults_and_bad_values_name_their_key() {
        let c = ProxyConfig::default();
        assert_eq!(c.client_login_timeout, Duration::from_secs(60));
        assert_eq!(c.max_auth_message, 8192);
        let c: ProxyConfig = toml::from_str(
            "auth = \"trust\"\nclient_login_timeout = \"1500ms\"\nmax_auth_message = 1024\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.client_login_timeout, Duration::from_millis(1500));
        assert_eq!(c.max_auth_message, 1024);
        for (extra, key) in [
            ("client_login_timeout = \"0s\"", "client_login_timeout"),
            ("client_login_timeout = \"11m\"", "client_login_timeout"),
            ("max_auth_message = 10", "max_auth_message"),
            ("max_auth_message = 2000000000", "max_auth_message"),
        ] {
            let c: ProxyConfig = toml::from_str(&format!("auth = \"trust\"\n{extra}\n")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn query_wait_timeout_parses_and_bad_values_name_their_key() {
        assert_eq!(
            ProxyConfig::default().pool.query_wait_timeout,
            Duration::from_secs(120)
        );
        let c: ProxyConfig =
            toml::from_str("auth = \"trust\"\n[pool]\nquery_wait_timeout = \"2s\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.pool.query_wait_timeout, Duration::from_secs(2));
        for bad in ["0s", "25h"] {
            let c: ProxyConfig = toml::from_str(&format!(
                "auth = \"trust\"\n[pool]\nquery_wait_timeout = \"{bad}\"\n"
            ))
            .unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("pool.query_wait_timeout"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_rejected() {
        let err = toml::from_str::<ProxyConfig>("listen = \"127.0.0.1:1\"\nlisten_port = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn full_file_parses() {
        let c: ProxyConfig = toml::from_str(
            r#"
            listen = "0.0.0.0:6432"
            auth = "md5"
            [backends]
            primary = "db1:5432"
            replicas = [{ addr = "db2:5432", region = "eu" }]
            [pool]
            mode = "transaction"
            idle_timeout = "1m"
            [[users]]
            name = "app"
            password = "secret"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.pool.mode, PoolMode::Transaction);
        assert_eq!(c.pool.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.backends.replicas[0].region.as_deref(), Some("eu"));
    }

    #[test]
    fn etcd_section_parses_with_defaults_and_excludes_static_backends() {
        let c: ProxyConfig = toml::from_str(
            r#"
            auth = "trust"
            [etcd]
            endpoints = ["http://127.0.0.1:2379", "127.0.0.1:2380"]
            failover_hold = "1s"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.etcd.enabled());
        assert_eq!(c.etcd.cluster, "meridian");
        assert_eq!(c.etcd.failover_hold, Duration::from_secs(1));
        assert_eq!(c.etcd.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.etcd.replica_poll_interval, Duration::from_millis(200));
        assert_eq!(c.etcd.max_replica_lag, Duration::from_secs(5));
        assert!(!ProxyConfig::default().etcd.enabled());

        let mut bad = c.clone();
        bad.backends.primary = Some("db:5432".into());
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("backends.primary"), "{err}");
        let mut bad = c.clone();
        bad.etcd.cluster = "a/b".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("etcd.cluster"));
        let mut bad = c.clone();
        bad.etcd.lease_ttl = Duration::from_millis(500);
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("etcd.lease_ttl"));
        let mut bad = c;
        bad.etcd.endpoints = vec!["nope".into()];
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("etcd.endpoints[0]"));
        let err = toml::from_str::<ProxyConfig>("[etcd]\nendpoint = []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("endpoint"), "{err}");
    }

    #[test]
    fn bad_primary_names_the_key() {
        let c = ProxyConfig {
            auth: AuthMethod::Trust,
            backends: BackendsConfig {
                primary: Some("nohost".into()),
                replicas: vec![],
            },
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("backends.primary"), "{err}");
    }
}

/// The regional result cache: results of eligible reads stored in the region's Redis
/// (README "Regional cache"). A read is cached when a rule matches it or it carries a
/// `/* meridian:cache ttl=... */` comment, and it is eligible: one statement, a read, outside a
/// transaction, reading only ordinary tables, calling only immutable functions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Use the cache at all. Default false.
    pub enabled: bool,
    /// URL of the region's Redis. Default `redis://127.0.0.1:6379`.
    pub redis: String,
    /// The database whose reads are cached: the one the agents decode for invalidations
    /// (their `--cache-database`). Reads of other databases are never cached. Default `postgres`.
    pub database: String,
    /// Longest a cache lookup or store may take; slower means uncached. Default `20ms`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Results larger than this (bytes of wire messages) are not cached. Default 1 MiB.
    pub max_entry_bytes: usize,
    /// What is cacheable, first match wins. Default none (only commented queries are cached).
    pub rules: Vec<CacheRule>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            redis: "redis://127.0.0.1:6379".into(),
            database: "postgres".into(),
            timeout: Duration::from_millis(20),
            max_entry_bytes: 1 << 20,
            rules: Vec::new(),
        }
    }
}

/// One cache rule: every eligible read that only reads `tables`, or whose text matches
/// `pattern`, is cached for `ttl`. A rule has `tables` or `pattern`, not both.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// Tables as `schema.table` (`public.` may be left out); `schema.*` matches a whole schema.
    #[serde(default)]
    pub tables: Vec<String>,
    /// A regular expression (Rust `regex` syntax) searched in the query text.
    #[serde(default)]
    pub pattern: Option<String>,
    /// How long an entry lives. Default `30s`.
    #[serde(with = "humantime_serde", default = "default_cache_ttl")]
    pub ttl: Duration,
}

fn default_cache_ttl() -> Duration {
    Duration::from_secs(30)
}

impl CacheConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if !(self.redis.starts_with("redis://") || self.redis.starts_with("unix://")) {
            return Err(ConfigError::invalid(
                "cache.redis",
                format!("`{}` is not a redis:// or unix:// URL", self.redis),
            ));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(5) {
            return Err(ConfigError::invalid(
                "cache.timeout",
                "must be greater than 0 and at most 5s",
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let key = format!("cache.rules[{i}]");
            match (&rule.pattern, rule.tables.is_empty()) {
                (Some(_), false) => {
                    return Err(ConfigError::invalid(
                        key.clone(),
                        "has both `tables` and `pattern`",
                    ))
                }
                (None, true) => {
                    return Err(ConfigError::invalid(
                        key.clone(),
                        "needs `tables` or `pattern`",
                    ))
                }
                (Some(p), true) => {
                    if let Err(e) = regex::Regex::new(p) {
                        return Err(ConfigError::invalid(
                            format!("{key}.pattern"),
                            format!("not a valid regular expression: {e}"),
                        ));
                    }
                }
                (None, false) => {
                    if let Some(t) = rule.tables.iter().find(|t| t.trim().is_empty()) {
                        return Err(ConfigError::invalid(
                            format!("{key}.tables"),
                            format!("empty table name {t:?}"),
                        ));
                    }
                }
            }
            if rule.ttl.is_zero() {
                return Err(ConfigError::invalid(
                    format!("{key}.ttl"),
                    "must be greater than 0",
                ));
            }
        }
        Ok(())
    }
}
