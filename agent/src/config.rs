//! The agent's command line (every flag also from `MERIDIAN_AGENT_<FLAG>`), and
//! its validation into an [`AgentConfig`] with errors that name the flag.
//!
//! Stopping the agent (SIGTERM/SIGINT) stops its PostgreSQL node too: the agent
//! is the node's supervisor, so a process manager that stops the agent stops the node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use meridian_shared::keys::validate_name;
use meridian_shared::pki::PkiPaths;
use meridian_shared::records::MemberTags;

/// `meridian-agent`: the sidecar of one PostgreSQL node.
///
/// Supervises the node's postmaster (bootstrap, clone, promote, follow with
/// pg_rewind, fence), holds the node's etcd member lease (and stops a primary
/// before the lease can expire), and heartbeats to the active coordinator over
/// QUIC, executing its commands. SIGTERM/SIGINT: stop heartbeating, revoke the
/// lease, stop PostgreSQL (fast) and exit 0 — stopping the agent stops the node.
#[derive(Parser, Debug, Clone)]
#[command(name = "meridian-agent", version, about, long_about)]
pub struct Args {
    /// TOML file of these settings, keys named like the flags (`data-dir =
    /// "/var/lib/meridian/data"`, `etcd = ["http://etcd-1:2379"]`, `bootstrap =
    /// true`); a flag or its environment variable overrides the file.
    #[arg(long, env = "MERIDIAN_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Node name, unique in the cluster (also its replication slot, with `-` → `_`).
    #[arg(long, env = "MERIDIAN_AGENT_NAME")]
    pub name: String,
    /// Region of the node.
    #[arg(long, env = "MERIDIAN_AGENT_REGION")]
    pub region: String,
    /// Cluster name (etcd prefix `/meridian/<cluster>/`).
    #[arg(long, env = "MERIDIAN_AGENT_CLUSTER", default_value = "meridian")]
    pub cluster: String,
    /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(
        long,
        env = "MERIDIAN_AGENT_ETCD",
        value_delimiter = ',',
        required = true
    )]
    pub etcd: Vec<String>,
    /// PostgreSQL data directory (created, owned by --os-user, mode 0700).
    #[arg(long, env = "MERIDIAN_AGENT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// PostgreSQL port.
    #[arg(long, env = "MERIDIAN_AGENT_PG_PORT", default_value_t = 5432)]
    pub pg_port: u16,
    /// PostgreSQL listen_addresses.
    #[arg(long, env = "MERIDIAN_AGENT_PG_LISTEN", default_value = "127.0.0.1")]
    pub pg_listen: String,
    /// host:port others use to reach this node's PostgreSQL (members/<node>.pg_addr).
    /// Default: --pg-listen:--pg-port.
    #[arg(long, env = "MERIDIAN_AGENT_ADVERTISE_PG_ADDR")]
    pub advertise_pg_addr: Option<String>,
    /// host:port at which nodes and proxies of REGION reach this node's PostgreSQL,
    /// as REGION=HOST:PORT, repeatable (comma-separated in the environment), e.g. a
    /// per-region WAN link or a per-network address. Written to
    /// members/<node>.pg_addrs; a region not listed uses --advertise-pg-addr.
    /// Default: none.
    #[arg(
        long,
        env = "MERIDIAN_AGENT_ADVERTISE_PG_ADDR_FOR",
        value_delimiter = ',',
        value_name = "REGION=HOST:PORT"
    )]
    pub advertise_pg_addr_for: Vec<String>,
    /// Directory of the PostgreSQL server programs. Default: `pg_config --bindir`,
    /// else /usr/lib/postgresql/15/bin.
    #[arg(long, env = "MERIDIAN_AGENT_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,
    /// OS user PostgreSQL runs as when the agent runs as root (created if missing).
    #[arg(long, env = "MERIDIAN_AGENT_OS_USER", default_value = "postgres")]
    pub os_user: String,
    /// Cluster CA certificate (PEM) for the QUIC link.
    #[arg(long, env = "MERIDIAN_AGENT_CA")]
    pub ca: PathBuf,
    /// This agent's certificate (PEM), signed by the cluster CA.
    #[arg(long, env = "MERIDIAN_AGENT_CERT")]
    pub cert: PathBuf,
    /// This agent's private key (PEM).
    #[arg(long, env = "MERIDIAN_AGENT_KEY")]
    pub key: PathBuf,
    /// May initdb a new cluster when etcd has no leader and the data dir is empty
    /// (and start an existing primary data dir when etcd has no leader).
    #[arg(long, env = "MERIDIAN_AGENT_BOOTSTRAP")]
    pub bootstrap: bool,
    /// TTL of the etcd member lease (whole seconds).
    #[arg(long, env = "MERIDIAN_AGENT_LEASE_TTL", default_value = "3s")]
    pub lease_ttl: humantime::Duration,
    /// A primary whose lease was not renewed for lease-ttl minus this stops its
    /// PostgreSQL (immediate) before the lease can expire.
    #[arg(long, env = "MERIDIAN_AGENT_FENCE_MARGIN", default_value = "1s")]
    pub fence_margin: humantime::Duration,
    /// Failsafe: a primary that lost etcd keeps serving while every replica
    /// confirms it over replication (docs/control-path.md, "Failsafe"); `false`
    /// stops it at the fence margin, as without etcd nothing can be confirmed.
    #[arg(
        long,
        env = "MERIDIAN_AGENT_FAILSAFE",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub failsafe: bool,
    /// Heartbeat period (etcd `config.heartbeat_interval` wins when set).
    #[arg(
        long,
        env = "MERIDIAN_AGENT_HEARTBEAT_INTERVAL",
        default_value = "100ms"
    )]
    pub heartbeat_interval: humantime::Duration,
    /// Never promote this node (member tag).
    #[arg(long, env = "MERIDIAN_AGENT_NOFAILOVER")]
    pub nofailover: bool,
    /// Failover tie-breaker among equal candidates, higher wins (member tag). Default none.
    #[arg(long, env = "MERIDIAN_AGENT_PRIORITY")]
    pub priority: Option<u32>,
    /// HTTP address for GET /health and GET /metrics (e.g. 127.0.0.1:8008). Default: off.
    #[arg(long, env = "MERIDIAN_AGENT_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Extra PostgreSQL setting NAME=VALUE for meridian.conf, repeatable (comma-separated
    /// in the environment), e.g. fsync=off. Written last, so it wins.
    #[arg(long, env = "MERIDIAN_AGENT_PG_SETTING", value_delimiter = ',')]
    pub pg_setting: Vec<String>,
    /// Extra pg_hba.conf line, repeatable (`;`-separated in the environment), placed
    /// before the default lines (which trust loopback only, replication included),
    /// e.g. "host all,replication all 10.0.0.0/8 scram-sha-256".
    #[arg(long, env = "MERIDIAN_AGENT_PG_HBA", value_delimiter = ';')]
    pub pg_hba: Vec<String>,
    /// The region's Redis for the result cache (issue 4), e.g. redis://127.0.0.1:6379/.
    /// The agent applies the coordinator's Invalidate/FlushCache there. Default: none
    /// (those commands are acknowledged `Failed: no redis configured`).
    #[arg(long, env = "MERIDIAN_AGENT_REDIS")]
    pub redis: Option<String>,
    /// The database whose changes invalidate the result cache: while this node is primary its
    /// agent decodes that database's WAL (one logical slot). Proxies cache reads of this
    /// database only (their `cache.database`).
    #[arg(
        long,
        env = "MERIDIAN_AGENT_CACHE_DATABASE",
        default_value = "postgres"
    )]
    pub cache_database: String,
    /// How far behind this node the region's cache may be: the agent keeps the region's
    /// freshness lease in Redis only while every change its node had this long ago has been
    /// applied there, so a stalled invalidation stream stops cache hits within this time
    /// (docs/cache.md). Must exceed the invalidation round trip (primary, coordinator, every
    /// region, back) or the cache is never served.
    #[arg(long, env = "MERIDIAN_AGENT_CACHE_LEASE", default_value = "2s")]
    pub cache_lease: humantime::Duration,
}

/// A flag has an unusable value.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {message}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub message: String,
}

fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        message: message.into(),
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    pub region: String,
    pub cluster: String,
    pub etcd: Vec<String>,
    pub data_dir: PathBuf,
    pub pg_port: u16,
    pub pg_listen: String,
    pub pg_addr: String,
    /// `--advertise-pg-addr-for`: region -> `host:port` (members/<node>.pg_addrs).
    pub pg_addrs: BTreeMap<String, String>,
    pub pg_bin_dir: Option<PathBuf>,
    pub os_user: String,
    pub pki: PkiPaths,
    pub bootstrap: bool,
    pub lease_ttl: Duration,
    pub fence_margin: Duration,
    /// `--failsafe`.
    pub failsafe: bool,
    pub heartbeat_interval: Duration,
    pub tags: MemberTags,
    pub http_listen: Option<SocketAddr>,
    pub pg_settings: Vec<(String, String)>,
    pub pg_hba: Vec<String>,
    /// `--redis`: the region's Redis URL.
    pub redis: Option<String>,
    /// `--cache-database`.
    pub cache_database: String,
    /// `--cache-lease`.
    pub cache_lease: Duration,
}

impl AgentConfig {
    /// Validates the command line.
    pub fn from_args(args: Args) -> Result<AgentConfig, ConfigError> {
        validate_name(&args.name).map_err(|e| invalid("name", e.to_string()))?;
        validate_name(&args.cluster).map_err(|e| invalid("cluster", e.to_string()))?;
        if args.region.trim().is_empty() {
            return Err(invalid("region", "must not be empty"));
        }
        if args.etcd.iter().all(|e| e.trim().is_empty()) {
            return Err(invalid("etcd", "at least one endpoint is required"));
        }
        let lease_ttl: Duration = args.lease_ttl.into();
        if lease_ttl < Duration::from_secs(1) || lease_ttl.subsec_nanos() != 0 {
            return Err(invalid(
                "lease-ttl",
                format!("{lease_ttl:?}: must be whole seconds, at least 1s"),
            ));
        }
        let fence_margin: Duration = args.fence_margin.into();
        if fence_margin >= lease_ttl {
            return Err(invalid(
                "fence-margin",
                format!("{fence_margin:?} must be below --lease-ttl {lease_ttl:?}"),
            ));
        }
        let heartbeat_interval: Duration = args.heartbeat_interval.into();
        if heartbeat_interval < Duration::from_millis(10) || heartbeat_interval > lease_ttl {
            return Err(invalid(
                "heartbeat-interval",
                format!("{heartbeat_interval:?}: must be between 10ms and --lease-ttl"),
            ));
        }
        let pg_addrs = meridian_shared::records::parse_locality_addrs(&args.advertise_pg_addr_for)
            .map_err(|m| invalid("advertise-pg-addr-for", m))?;
        let pg_addr = match args.advertise_pg_addr {
            Some(addr) => {
                if !is_host_port(&addr) {
                    return Err(invalid(
                        "advertise-pg-addr",
                        format!("{addr:?} is not host:port"),
                    ));
                }
                addr
            }
            None => {
                let first = args.pg_listen.split(',').next().unwrap_or("").trim();
                let host = match first {
                    "" | "*" | "0.0.0.0" => "127.0.0.1",
                    "::" => "::1",
                    other => other,
                };
                format!("{host}:{}", args.pg_port)
            }
        };
        let mut pg_settings = Vec::new();
        for setting in &args.pg_setting {
            let Some((k, v)) = setting.split_once('=') else {
                return Err(invalid(
                    "pg-setting",
                    format!("{setting:?} is not NAME=VALUE"),
                ));
            };
            if k.trim().is_empty() {
                return Err(invalid("pg-setting", format!("{setting:?} has no name")));
            }
            pg_settings.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Ok(AgentConfig {
            name: args.name,
            region: args.region,
            cluster: args.cluster,
            etcd: args
                .etcd
                .into_iter()
                .filter(|e| !e.trim().is_empty())
                .collect(),
            data_dir: args.data_dir,
            pg_port: args.pg_port,
            pg_listen: args.pg_listen,
            pg_addr,
            pg_addrs,
            pg_bin_dir: args.pg_bin_dir,
            os_user: args.os_user,
            pki: PkiPaths {
                ca: args.ca,
                cert: args.cert,
                key: args.key,
            },
            bootstrap: args.bootstrap,
            lease_ttl,
            fence_margin,
            failsafe: args.failsafe,
            heartbeat_interval,
            tags: MemberTags {
                nofailover: args.nofailover,
                nosync: false,
                priority: args.priority,
            },
            http_listen: args.http_listen,
            pg_settings,
            pg_hba: args
                .pg_hba
                .iter()
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty())
                .collect(),
            redis: args
                .redis
                .map(|r| r.trim().to_owned())
                .filter(|r| !r.is_empty()),
            cache_database: {
                let db = args.cache_database.trim().to_owned();
                if db.is_empty() {
                    return Err(invalid("cache-database", "must not be empty"));
                }
                db
            },
            cache_lease: {
                let ttl: Duration = args.cache_lease.into();
                if ttl < heartbeat_interval * 2 {
                    return Err(invalid(
                        "cache-lease",
                        format!("{ttl:?}: must be at least twice --heartbeat-interval"),
                    ));
                }
                ttl
            },
        })
    }
}

/// Whether `addr` looks like `host:port`.
fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<AgentConfig, String> {
        let mut argv = vec![
            "meridian-agent",
            "--name",
            "n1",
            "--region",
            "us-east",
            "--etcd",
            "http://127.0.0.1:2379",
            "--data-dir",
            "/tmp/d",
            "--ca",
            "ca.pem",
            "--cert",
            "n1.pem",
            "--key",
            "n1-key.pem",
        ];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        AgentConfig::from_args(args).map_err(|e| e.to_string())
    }

    #[test]
    fn a_config_file_carries_the_settings_and_flags_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "name = \"n2\"\nregion = \"eu-west\"\netcd = [\"http://e1:2379\", \"http://e2:2379\"]\n\
             data-dir = \"/var/lib/m\"\npg-port = 5434\nlease-ttl = \"5s\"\nbootstrap = true\n\
             advertise-pg-addr-for = [\"us-east=wan:5434\"]\n\
             ca = \"ca.pem\"\ncert = \"n2.pem\"\nkey = \"n2-key.pem\"\n",
        )
        .unwrap();
        let from_file = |extra: &[&str]| {
            let mut argv = vec!["meridian-agent", "--config", path.to_str().unwrap()];
            argv.extend_from_slice(extra);
            let argv = meridian_shared::flag_file::expand::<Args>(
                argv.into_iter().map(Into::into).collect(),
                |_| None,
            )
            .unwrap();
            AgentConfig::from_args(Args::try_parse_from(argv).unwrap()).unwrap()
        };
        let c = from_file(&[]);
        assert_eq!((c.name.as_str(), c.region.as_str()), ("n2", "eu-west"));
        assert_eq!(c.etcd, ["http://e1:2379", "http://e2:2379"]);
        assert_eq!(c.pg_port, 5434);
        assert_eq!(c.lease_ttl, Duration::from_secs(5));
        assert!(c.bootstrap);
        let c = from_file(&["--pg-port", "5999", "--name", "n3"]);
        assert_eq!((c.pg_port, c.name.as_str()), (5999, "n3"));
        assert_eq!(c.region, "eu-west");
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.cluster, "meridian");
        assert_eq!(c.pg_port, 5432);
        assert_eq!(c.pg_addr, "127.0.0.1:5432");
        assert_eq!(c.os_user, "postgres");
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.fence_margin, Duration::from_secs(1));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(100));
        assert!(!c.bootstrap);
        assert_eq!(c.tags, MemberTags::default());
        assert_eq!(c.http_listen, None);
    }

    #[test]
    fn flags_and_errors_name_the_flag() {
        let c = parse(&[
            "--pg-port",
            "6000",
            "--pg-listen",
            "*",
            "--nofailover",
            "--priority",
            "7",
            "--pg-setting",
            "fsync=off",
            "--pg-hba",
            "host all all 10.0.0.0/8 trust",
            "--etcd",
            "http://a:1,http://b:2",
        ])
        .unwrap();
        assert_eq!(c.pg_addr, "127.0.0.1:6000");
        assert!(c.tags.nofailover);
        assert_eq!(c.tags.priority, Some(7));
        assert_eq!(c.pg_settings, vec![("fsync".into(), "off".into())]);
        assert_eq!(c.pg_hba, vec!["host all all 10.0.0.0/8 trust".to_owned()]);
        assert!(c.etcd.len() >= 2);
        let err = parse(&["--lease-ttl", "1500ms"]).unwrap_err();
        assert!(err.contains("--lease-ttl"), "{err}");
        let err = parse(&["--fence-margin", "3s"]).unwrap_err();
        assert!(err.contains("--fence-margin"), "{err}");
        let err = parse(&["--advertise-pg-addr", "nohost"]).unwrap_err();
        assert!(err.contains("--advertise-pg-addr"), "{err}");
        let err = parse(&["--pg-setting", "novalue"]).unwrap_err();
        assert!(err.contains("--pg-setting"), "{err}");
    }

    #[test]
    fn advertise_pg_addr_for_regions() {
        assert!(parse(&[]).unwrap().pg_addrs.is_empty());
        let c = parse(&[
            "--advertise-pg-addr",
            "127.0.0.1:7000",
            "--advertise-pg-addr-for",
            "us-east=127.0.0.1:7000",
            "--advertise-pg-addr-for",
            "eu-west=127.0.0.1:7001,us-west=[::1]:7002",
        ])
        .unwrap();
        assert_eq!(c.pg_addr, "127.0.0.1:7000");
        assert_eq!(
            c.pg_addrs,
            BTreeMap::from([
                ("eu-west".to_owned(), "127.0.0.1:7001".to_owned()),
                ("us-east".to_owned(), "127.0.0.1:7000".to_owned()),
                ("us-west".to_owned(), "[::1]:7002".to_owned()),
            ])
        );
        for bad in [
            "eu-west",
            "=127.0.0.1:1",
            "eu-west=127.0.0.1",
            "eu-west=h:notaport",
            "eu=h:1,eu=h:2",
        ] {
            let err = parse(&["--advertise-pg-addr-for", bad]).unwrap_err();
            assert!(err.contains("--advertise-pg-addr-for"), "{bad}: {err}");
        }
    }
}
