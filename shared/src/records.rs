//! The values stored in etcd under `/meridian/<cluster>/` (see [`crate::keys`]).
//!
//! Every value is a JSON document of one of these serde types. They are the
//! contract between the coordinator (the only writer of `leader`, `epoch` and
//! `sync`), the agents (`members/<node>`), the proxies (`proxies/<id>`) and the
//! operators (`config`). Unknown fields are ignored on read so that a newer
//! writer does not break an older reader during a rolling upgrade; validation of
//! the dynamic [`ClusterConfig`] happens in [`ClusterConfig::validate`] where it
//! is written. Optional fields added after the first release carry
//! `#[serde(default)]`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::epoch::Epoch;

/// A record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot decode {what} record: {source}")]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot encode {what} record: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("invalid cluster config `{key}`: {message}")]
    InvalidConfig { key: &'static str, message: String },
}

/// Encodes a record as the JSON bytes stored in etcd.
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, RecordError> {
    serde_json::to_vec(value).map_err(|source| RecordError::Encode { what, source })
}

/// Decodes the JSON bytes of an etcd value.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, RecordError> {
    serde_json::from_slice(bytes).map_err(|source| RecordError::Decode { what, source })
}

/// Whether the leader is serving writes or a failover is under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaderState {
    /// `node` is the primary of `epoch`; proxies send writes to it.
    Serving,
    /// A failover or switchover to `candidate` is in progress; proxies hold new writes.
    FailingOver,
}

/// A node named with the addresses needed to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeRef {
    pub node: String,
    pub region: String,
    /// `host:port` of the node's PostgreSQL.
    pub pg_addr: String,
}

/// The `leader` key: who takes writes, under which epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The primary (while `failing_over`: the old primary being replaced).
    pub node: String,
    pub region: String,
    /// `host:port` of the primary's PostgreSQL.
    pub pg_addr: String,
    /// The fencing token; the primary's node carries the same value.
    pub epoch: Epoch,
    /// PostgreSQL timeline of the primary.
    pub timeline: u32,
    pub state: LeaderState,
    /// Unix time in milliseconds at which this state began.
    pub since: u64,
    /// While `failing_over`: the node being promoted, so that a newly elected
    /// coordinator finishes the same failover instead of choosing again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<NodeRef>,
}

impl LeaderRecord {
    /// Whether writes may be sent to `node` now.
    pub fn is_serving(&self) -> bool {
        self.state == LeaderState::Serving
    }
}

/// A node's role as its agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Replica,
    /// Postgres is down, starting, or being rebuilt (also any role this version does not know).
    #[serde(other)]
    Unknown,
}

/// Operator tags on a member (Patroni's tags of the same names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberTags {
    /// Never promote this node. Default false.
    #[serde(default)]
    pub nofailover: bool,
    /// Never list this node as a synchronous standby. Default false.
    #[serde(default)]
    pub nosync: bool,
    /// Tie-breaker among equally good candidates: higher wins. Default none (lowest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
}

/// The `members/<node>` key, written by the node's agent on its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub region: String,
    /// `host:port` of the node's PostgreSQL.
    pub pg_addr: String,
    /// `host:port` of the agent (QUIC, for diagnostics).
    pub agent_addr: String,
    pub role: Role,
    #[serde(default)]
    pub tags: MemberTags,
    /// Version of the agent binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Per-locality addresses: region -> `host:port` of the node's PostgreSQL as
    /// reached from that region (the agent's `--advertise-pg-addr-for`, like
    /// CockroachDB's `--locality-advertise-addr`). A region not listed uses
    /// `pg_addr`. Default empty (and omitted), so older records still parse.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pg_addrs: BTreeMap<String, String>,
}

impl MemberRecord {
    /// The address to dial this node's PostgreSQL at from `region`: its
    /// `pg_addrs` entry for that region, else `pg_addr`.
    pub fn pg_addr_for(&self, region: &str) -> &str {
        addr_for(&self.pg_addrs, region, &self.pg_addr)
    }
}

/// `region`'s non-empty entry of a per-locality address map, else `default`.
fn addr_for<'a>(
    per_region: &'a BTreeMap<String, String>,
    region: &str,
    default: &'a str,
) -> &'a str {
    per_region
        .get(region)
        .map(String::as_str)
        .filter(|a| !a.is_empty())
        .unwrap_or(default)
}

/// The `proxies/<id>` key, written by each pgproxy on its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRecord {
    pub region: String,
    pub listen_addr: String,
    pub version: String,
}

/// The value the active coordinator proclaims in the `coordinator/` election.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    pub name: String,
    /// gRPC admin API, `host:port`.
    pub admin_addr: String,
    /// QUIC endpoint agents connect to, `host:port`.
    pub quic_addr: String,
    /// Per-locality QUIC addresses: region -> `host:port` of this coordinator's
    /// QUIC endpoint as reached from that region (its `--advertise-quic-for`,
    /// e.g. a per-region WAN link). A region not listed uses `quic_addr`.
    /// Default empty (and omitted), so older records still parse.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub quic_addrs: BTreeMap<String, String>,
}

impl CoordinatorRecord {
    /// The address an agent of `region` dials: its `quic_addrs` entry for that
    /// region, else `quic_addr`.
    pub fn quic_addr_for(&self, region: &str) -> &str {
        addr_for(&self.quic_addrs, region, &self.quic_addr)
    }
}

/// Parses per-locality address flags (`--advertise-pg-addr-for`,
/// `--advertise-quic-for`): `REGION=HOST:PORT` items, blank items skipped. A
/// region given twice, an empty region or an address that is not `host:port`
/// is an error (the message names the item, not the flag: the caller does).
pub fn parse_locality_addrs(items: &[String]) -> Result<BTreeMap<String, String>, String> {
    let is_host_port = |addr: &str| {
        addr.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    };
    let mut out = BTreeMap::new();
    for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        let Some((region, addr)) = item.split_once('=') else {
            return Err(format!("{item:?} is not REGION=HOST:PORT"));
        };
        let (region, addr) = (region.trim(), addr.trim());
        if region.is_empty() {
            return Err(format!("{item:?} has no region"));
        }
        if !is_host_port(addr) {
            return Err(format!("{item:?}: {addr:?} is not host:port"));
        }
        if out.insert(region.to_owned(), addr.to_owned()).is_some() {
            return Err(format!("region {region:?} given twice"));
        }
    }
    Ok(out)
}

/// The `sync` key: the synchronous standby set the primary may currently wait for.
///
/// Invariant kept by the coordinator: the set in PostgreSQL's
/// `synchronous_standby_names` is always a subset of `standbys` here, so an
/// acknowledged commit is on at least one node listed here (see the
/// coordinator's `sync` module).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// The leader the set belongs to.
    pub leader: String,
    pub epoch: Epoch,
    pub standbys: BTreeSet<String>,
}

/// Synchronous replication mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Asynchronous replication; failover may lose up to `max_failover_lag` bytes.
    #[default]
    Off,
    /// Synchronous to any one healthy standby; falls back to asynchronous when none is healthy.
    On,
    /// Synchronous to any one standby, never falls back: with no healthy standby, commits wait.
    Strict,
}

/// The `config` key: dynamic cluster settings, changed through the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterConfig {
    /// Synchronous replication: `off`, `on` or `strict`. Default `off`.
    pub sync_mode: SyncMode,
    /// A replica further behind the primary's last known position than this (bytes)
    /// is not promoted automatically. Default 1048576 (1 MiB).
    pub max_failover_lag: u64,
    /// How long proxies hold new write transactions during a failover. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub failover_hold: Duration,
    /// Automatic failover disabled (maintenance). Default false.
    pub paused: bool,
    /// Regions in order of preference for a new primary; ties in LSN go to the
    /// earlier region, unlisted regions come last. Default empty.
    pub region_priority: Vec<String>,
    /// Agent heartbeat period. Default `100ms`.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Missing heartbeats for this long make a node suspect. Default `500ms`.
    #[serde(with = "humantime_serde")]
    pub suspect_after: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            sync_mode: SyncMode::Off,
            max_failover_lag: 1 << 20,
            failover_hold: Duration::from_secs(10),
            paused: false,
            region_priority: Vec::new(),
            heartbeat_interval: Duration::from_millis(100),
            suspect_after: Duration::from_millis(500),
        }
    }
}

impl ClusterConfig {
    /// Checks the settings that would make failure detection meaningless.
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.heartbeat_interval.is_zero() {
            return Err(RecordError::InvalidConfig {
                key: "heartbeat_interval",
                message: "must be greater than 0".into(),
            });
        }
        if self.suspect_after < self.heartbeat_interval * 2 {
            return Err(RecordError::InvalidConfig {
                key: "suspect_after",
                message: format!(
                    "must be at least twice heartbeat_interval ({:?}), got {:?}",
                    self.heartbeat_interval, self.suspect_after
                ),
            });
        }
        let mut seen = BTreeSet::new();
        for region in &self.region_priority {
            if !seen.insert(region) {
                return Err(RecordError::InvalidConfig {
                    key: "region_priority",
                    message: format!("region {region:?} listed twice"),
                });
            }
        }
        Ok(())
    }

    /// Rank of a region in `region_priority` (lower is preferred; unlisted regions rank last).
    pub fn region_rank(&self, region: &str) -> usize {
        self.region_priority
            .iter()
            .position(|r| r == region)
            .unwrap_or(self.region_priority.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn leader() -> LeaderRecord {
        LeaderRecord {
            node: "us-east-1".into(),
            region: "us-east".into(),
            pg_addr: "127.0.0.1:15432".into(),
            epoch: Epoch(3),
            timeline: 2,
            state: LeaderState::FailingOver,
            since: 1_700_000_000_000,
            candidate: Some(NodeRef {
                node: "us-west-1".into(),
                region: "us-west".into(),
                pg_addr: "127.0.0.1:15433".into(),
            }),
        }
    }

    #[test]
    fn leader_record_json_shape() {
        let value = serde_json::to_value(leader()).unwrap();
        assert_eq!(value["state"], "failing_over");
        assert_eq!(value["epoch"], 3);
        assert_eq!(value["candidate"]["node"], "us-west-1");
        let back: LeaderRecord = decode("leader", &encode("leader", &leader()).unwrap()).unwrap();
        assert_eq!(back, leader());
        assert!(!back.is_serving());
    }

    #[test]
    fn serving_leader_omits_candidate_and_tolerates_unknown_fields() {
        let raw = json!({"node": "a", "region": "r", "pg_addr": "h:1", "epoch": 1, "timeline": 1,
                         "state": "serving", "since": 5, "added_later": true});
        let rec: LeaderRecord = serde_json::from_value(raw).unwrap();
        assert!(rec.is_serving());
        assert_eq!(rec.candidate, None);
        assert!(serde_json::to_value(&rec)
            .unwrap()
            .get("candidate")
            .is_none());
    }

    #[test]
    fn member_record_defaults_and_unknown_role() {
        let raw = br#"{"region":"eu","pg_addr":"h:1","agent_addr":"h:2","role":"witness"}"#;
        let rec: MemberRecord = decode("member", raw).unwrap();
        assert_eq!(rec.role, Role::Unknown);
        assert_eq!(rec.tags, MemberTags::default());
        let tagged: MemberRecord = serde_json::from_value(json!({"region":"eu","pg_addr":"h:1",
            "agent_addr":"h:2","role":"replica","tags":{"nofailover":true,"priority":5}}))
        .unwrap();
        assert!(tagged.tags.nofailover);
        assert_eq!(tagged.tags.priority, Some(5));
        assert!(decode::<MemberRecord>("member", b"{}").is_err());
    }

    #[test]
    fn member_record_per_region_addresses() {
        // An old record (no pg_addrs) parses and falls back to pg_addr everywhere.
        let old: MemberRecord = decode(
            "member",
            br#"{"region":"eu","pg_addr":"h:1","agent_addr":"h:2","role":"replica"}"#,
        )
        .unwrap();
        assert!(old.pg_addrs.is_empty());
        assert_eq!(old.pg_addr_for("eu"), "h:1");
        assert_eq!(old.pg_addr_for("us"), "h:1");
        // Empty map is not written, so an old reader sees the same JSON as before.
        let text = String::from_utf8(encode("member", &old).unwrap()).unwrap();
        assert!(!text.contains("pg_addrs"), "{text}");

        let rec: MemberRecord = serde_json::from_value(json!({"region":"eu","pg_addr":"h:1",
            "agent_addr":"h:2","role":"primary",
            "pg_addrs":{"eu":"h:1","us":"h:9","ap":""}}))
        .unwrap();
        assert_eq!(rec.pg_addr_for("us"), "h:9");
        assert_eq!(rec.pg_addr_for("eu"), "h:1");
        // Unknown region, or an empty entry: the advertised pg_addr.
        assert_eq!(rec.pg_addr_for("sa"), "h:1");
        assert_eq!(rec.pg_addr_for("ap"), "h:1");
        let back: MemberRecord = decode("member", &encode("member", &rec).unwrap()).unwrap();
        assert_eq!(back, rec);
        assert_eq!(
            serde_json::to_value(&rec).unwrap()["pg_addrs"]["us"],
            json!("h:9")
        );
    }

    #[test]
    fn coordinator_record_per_region_quic_addresses() {
        // An old record (no quic_addrs) parses and falls back to quic_addr.
        let old: CoordinatorRecord = decode(
            "coordinator",
            br#"{"name":"c1","admin_addr":"h:1","quic_addr":"h:2"}"#,
        )
        .unwrap();
        assert!(old.quic_addrs.is_empty());
        assert_eq!(old.quic_addr_for("eu"), "h:2");
        let text = String::from_utf8(encode("coordinator", &old).unwrap()).unwrap();
        assert!(!text.contains("quic_addrs"), "{text}");

        let rec: CoordinatorRecord = serde_json::from_value(json!({"name":"c1",
            "admin_addr":"h:1","quic_addr":"h:2",
            "quic_addrs":{"eu":"h:7","us":"h:8","ap":""}}))
        .unwrap();
        assert_eq!(rec.quic_addr_for("eu"), "h:7");
        assert_eq!(rec.quic_addr_for("us"), "h:8");
        assert_eq!(rec.quic_addr_for("ap"), "h:2");
        assert_eq!(rec.quic_addr_for("sa"), "h:2");
        let back: CoordinatorRecord =
            decode("coordinator", &encode("coordinator", &rec).unwrap()).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn locality_addrs_parse_and_reject_bad_items() {
        let items = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse_locality_addrs(&[]).unwrap().is_empty());
        let map = parse_locality_addrs(&items(&[" eu = 127.0.0.1:1 ", "", "us=[::1]:2"])).unwrap();
        assert_eq!(
            map,
            BTreeMap::from([
                ("eu".to_owned(), "127.0.0.1:1".to_owned()),
                ("us".to_owned(), "[::1]:2".to_owned()),
            ])
        );
        for (bad, want) in [
            ("eu", "REGION=HOST:PORT"),
            ("=h:1", "no region"),
            ("eu=h", "not host:port"),
            ("eu=:1", "not host:port"),
            ("eu=h:port", "not host:port"),
        ] {
            let err = parse_locality_addrs(&items(&[bad])).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
        let err = parse_locality_addrs(&items(&["eu=h:1", "eu=h:2"])).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn cluster_config_defaults_match_design() {
        let cfg: ClusterConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, ClusterConfig::default());
        assert_eq!(cfg.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(cfg.suspect_after, Duration::from_millis(500));
        assert_eq!(cfg.failover_hold, Duration::from_secs(10));
        assert_eq!(cfg.sync_mode, SyncMode::Off);
        cfg.validate().unwrap();
    }

    #[test]
    fn cluster_config_humantime_round_trip() {
        let cfg: ClusterConfig = serde_json::from_value(json!({
            "sync_mode": "strict", "failover_hold": "3s", "suspect_after": "1s 500ms",
            "region_priority": ["us-east", "eu-west"]}))
        .unwrap();
        assert_eq!(cfg.sync_mode, SyncMode::Strict);
        assert_eq!(cfg.failover_hold, Duration::from_secs(3));
        assert_eq!(cfg.suspect_after, Duration::from_millis(1500));
        let text = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<ClusterConfig>(&text).unwrap(), cfg);
        assert_eq!(cfg.region_rank("us-east"), 0);
        assert_eq!(cfg.region_rank("eu-west"), 1);
        assert_eq!(cfg.region_rank("ap-south"), 2);
    }

    #[test]
    fn cluster_config_validation_names_the_key() {
        let cfg = ClusterConfig {
            suspect_after: Duration::from_millis(150),
            ..ClusterConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("suspect_after"), "{err}");
        let cfg = ClusterConfig {
            region_priority: vec!["a".into(), "a".into()],
            ..ClusterConfig::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("region_priority"));
    }

    #[test]
    fn other_records_round_trip() {
        let proxy = ProxyRecord {
            region: "us-east".into(),
            listen_addr: "127.0.0.1:6432".into(),
            version: "0.1.0".into(),
        };
        assert_eq!(
            decode::<ProxyRecord>("proxy", &encode("proxy", &proxy).unwrap()).unwrap(),
            proxy
        );
        let sync = SyncRecord {
            leader: "a".into(),
            epoch: Epoch(2),
            standbys: ["b".to_string(), "c".to_string()].into(),
        };
        let value = serde_json::to_value(&sync).unwrap();
        assert_eq!(value["standbys"], json!(["b", "c"]));
        assert_eq!(serde_json::from_value::<SyncRecord>(value).unwrap(), sync);
    }
}
