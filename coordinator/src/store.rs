//! The coordinator's view of etcd: one consistent snapshot of the cluster's keys
//! (a single prefix range read, parsed by the pure [`Snapshot::from_kvs`]) and the
//! guarded writes of `leader`, `epoch` and `sync`.
//!
//! Every write is an etcd transaction comparing the `mod_revision` (or, for a key
//! that must not exist yet, `version == 0`) of each key as the snapshot read it,
//! so a coordinator that lost its election or raced another one changes nothing:
//! the write returns `false` and the caller re-reads and re-plans.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use meridian_shared::epoch::Epoch;
use meridian_shared::keys::Keys;
use meridian_shared::records::{
    self, ClusterConfig, CoordinatorRecord, LeaderRecord, MemberRecord, ProxyRecord, RecordError,
    SyncRecord,
};

/// How long one etcd request may take before the coordinator gives up on it.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(2);

/// Reading or writing etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd request timed out after {0:?}")]
    Timeout(Duration),
    #[error("key {key}: {source}")]
    Record { key: String, source: RecordError },
    #[error("key {key}: {value:?} is not a decimal epoch")]
    Epoch { key: String, value: String },
}

/// A value with the `mod_revision` it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
}

/// One key-value pair as read (key, value, mod_revision, create_revision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawKv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub create_revision: i64,
}

/// The cluster's keys at one etcd revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub revision: i64,
    pub leader: Option<Versioned<LeaderRecord>>,
    /// The `epoch` key (0 when absent).
    pub epoch: Epoch,
    /// `mod_revision` of `epoch` (0 when absent).
    pub epoch_revision: i64,
    pub config: ClusterConfig,
    pub sync: Option<Versioned<SyncRecord>>,
    pub members: BTreeMap<String, MemberRecord>,
    pub proxies: BTreeMap<String, ProxyRecord>,
    /// `cache/<region>` records (regions whose cache was marked unusable).
    pub cache_regions: BTreeMap<String, meridian_shared::cache_keys::CacheRegionRecord>,
    /// The elected coordinator (the election key with the lowest create revision).
    pub coordinator: Option<CoordinatorRecord>,
    /// Values that could not be decoded (reported, otherwise ignored; a bad
    /// `config` falls back to the defaults).
    pub problems: Vec<String>,
}

impl Snapshot {
    /// Parses the keys of one prefix read. A `leader` or `epoch` key that cannot
    /// be decoded is an error: acting on a guess of either could promote twice.
    pub fn from_kvs(keys: &Keys, revision: i64, kvs: &[RawKv]) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot {
            revision,
            ..Snapshot::default()
        };
        let election = keys.coordinator_election();
        let mut elected: Option<(i64, &RawKv)> = None;
        for kv in kvs {
            let key = kv.key.as_str();
            if key == keys.leader() {
                let value =
                    records::decode::<LeaderRecord>("leader", &kv.value).map_err(|source| {
                        StoreError::Record {
                            key: key.to_string(),
                            source,
                        }
                    })?;
                snap.leader = Some(Versioned {
                    value,
                    mod_revision: kv.mod_revision,
                });
            } else if key == keys.epoch() {
                let text = String::from_utf8_lossy(&kv.value).trim().to_string();
                snap.epoch = Epoch(text.parse().map_err(|_| StoreError::Epoch {
                    key: key.to_string(),
                    value: text.clone(),
                })?);
                snap.epoch_revision = kv.mod_revision;
            } else if key == keys.config() {
                match records::decode::<ClusterConfig>("config", &kv.value)
                    .and_then(|c| c.validate().map(|()| c))
                {
                    Ok(config) => snap.config = config,
                    Err(e) => snap.problems.push(format!("{key}: {e} (using defaults)")),
                }
            } else if key == keys.sync() {
                match records::decode::<SyncRecord>("sync", &kv.value) {
                    Ok(value) => {
                        snap.sync = Some(Versioned {
                            value,
                            mod_revision: kv.mod_revision,
                        })
                    }
                    Err(e) => snap.problems.push(format!("{key}: {e}")),
                }
            } else if let Some(node) = keys.member_name(key) {
                match records::decode::<MemberRecord>("member", &kv.value) {
                    Ok(m) => {
                        snap.members.insert(node.to_string(), m);
                    }
                    Err(e) => snap.problems.push(format!("{key}: {e}")),
                }
            } else if let Some(id) = keys.proxy_id(key) {
                if let Ok(p) = records::decode::<ProxyRecord>("proxy", &kv.value) {
                    snap.proxies.insert(id.to_string(), p);
                }
            } else if let Some(region) = key
                .strip_prefix(keys.prefix())
                .and_then(|k| k.strip_prefix("cache/"))
            {
                match records::decode::<meridian_shared::cache_keys::CacheRegionRecord>(
                    "cache region",
                    &kv.value,
                ) {
                    Ok(r) => {
                        snap.cache_regions.insert(region.to_string(), r);
                    }
                    Err(e) => snap.problems.push(format!("{key}: {e}")),
                }
            } else if key.starts_with(&election)
                && elected.is_none_or(|(rev, _)| kv.create_revision < rev)
            {
                elected = Some((kv.create_revision, kv));
            }
        }
        snap.coordinator = elected.and_then(|(_, kv)| {
            records::decode::<CoordinatorRecord>("coordinator", &kv.value).ok()
        });
        Ok(snap)
    }

    /// The highest epoch known (the `epoch` key or the leader record's).
    pub fn current_epoch(&self) -> Epoch {
        self.epoch
            .max(self.leader.as_ref().map_or(Epoch::ZERO, |l| l.value.epoch))
    }

    /// `mod_revision` of `leader` (0 when absent).
    pub fn leader_revision(&self) -> i64 {
        self.leader.as_ref().map_or(0, |l| l.mod_revision)
    }
}

async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(ETCD_TIMEOUT, fut)
        .await
        .map_err(|_| StoreError::Timeout(ETCD_TIMEOUT))?
        .map_err(StoreError::from)
}

/// Reads every key of the cluster in one request.
pub async fn read_snapshot(client: &mut Client, keys: &Keys) -> Result<Snapshot, StoreError> {
    let resp = timed(client.get(keys.prefix(), Some(GetOptions::new().with_prefix()))).await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let kvs: Vec<RawKv> = resp
        .kvs()
        .iter()
        .map(|kv| RawKv {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
        })
        .collect();
    Snapshot::from_kvs(keys, revision, &kvs)
}

/// The guard "`key` is as the snapshot read it": unchanged `mod_revision`, or still absent.
fn unchanged(key: String, mod_revision: i64) -> Compare {
    if mod_revision == 0 {
        Compare::version(key, CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(key, CompareOp::Equal, mod_revision)
    }
}

fn encode<T: serde::Serialize>(
    what: &'static str,
    key: &str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    records::encode(what, value).map_err(|source| StoreError::Record {
        key: key.to_string(),
        source,
    })
}

/// Writes `epoch` and `leader` together, guarded by both keys' revisions in `snap`.
/// Used for the first leader (both absent) and for step 1 of a failover.
pub async fn write_epoch_and_leader(
    client: &mut Client,
    keys: &Keys,
    snap: &Snapshot,
    epoch: Epoch,
    leader: &LeaderRecord,
) -> Result<bool, StoreError> {
    let value = encode("leader", &keys.leader(), leader)?;
    let txn = Txn::new()
        .when(vec![
            unchanged(keys.leader(), snap.leader_revision()),
            unchanged(keys.epoch(), snap.epoch_revision),
        ])
        .and_then(vec![
            TxnOp::put(keys.epoch(), epoch.to_string(), None),
            TxnOp::put(keys.leader(), value, None),
        ]);
    Ok(timed(client.txn(txn)).await?.succeeded())
}

/// Replaces `leader`, guarded by its revision in `snap` (and the epoch key unchanged).
pub async fn write_leader(
    client: &mut Client,
    keys: &Keys,
    snap: &Snapshot,
    leader: &LeaderRecord,
) -> Result<bool, StoreError> {
    let value = encode("leader", &keys.leader(), leader)?;
    let txn = Txn::new()
        .when(vec![
            unchanged(keys.leader(), snap.leader_revision()),
            unchanged(keys.epoch(), snap.epoch_revision),
        ])
        .and_then(vec![TxnOp::put(keys.leader(), value, None)]);
    Ok(timed(client.txn(txn)).await?.succeeded())
}

/// Writes `cache/<region>` (the region's cache usable or not), guarded by the
/// leader unchanged since `snap` (a deposed coordinator writes nothing).
pub async fn write_cache_region(
    client: &mut Client,
    keys: &Keys,
    snap: &Snapshot,
    region: &str,
    record: &meridian_shared::cache_keys::CacheRegionRecord,
) -> Result<bool, StoreError> {
    let key = format!(
        "{}{}",
        keys.prefix(),
        meridian_shared::cache_keys::etcd_region_key(region)
    );
    let value = encode("cache region", &key, record)?;
    let txn = Txn::new()
        .when(vec![unchanged(keys.leader(), snap.leader_revision())])
        .and_then(vec![TxnOp::put(key, value, None)]);
    Ok(timed(client.txn(txn)).await?.succeeded())
}

/// Replaces `sync`, guarded by its revision in `snap` and the leader unchanged.
pub async fn write_sync(
    client: &mut Client,
    keys: &Keys,
    snap: &Snapshot,
    sync: &SyncRecord,
) -> Result<bool, StoreError> {
    let value = encode("sync", &keys.sync(), sync)?;
    let sync_rev = snap.sync.as_ref().map_or(0, |s| s.mod_revision);
    let txn = Txn::new()
        .when(vec![
            unchanged(keys.sync(), sync_rev),
            unchanged(keys.leader(), snap.leader_revision()),
        ])
        .and_then(vec![TxnOp::put(keys.sync(), value, None)]);
    Ok(timed(client.txn(txn)).await?.succeeded())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::records::{LeaderState, Role, SyncMode};

    fn kv(key: String, value: &str, mod_revision: i64, create_revision: i64) -> RawKv {
        RawKv {
            key,
            value: value.as_bytes().to_vec(),
            mod_revision,
            create_revision,
        }
    }

    #[test]
    fn snapshot_parses_every_key() {
        let keys = Keys::new("c");
        let kvs = vec![
            kv(
                keys.leader(),
                r#"{"node":"a","region":"r","pg_addr":"h:1","epoch":3,"timeline":2,"state":"serving","since":1}"#,
                10,
                5,
            ),
            kv(keys.epoch(), "3", 9, 2),
            kv(keys.config(), r#"{"sync_mode":"on","paused":true}"#, 4, 4),
            kv(
                keys.member("a"),
                r#"{"region":"r","pg_addr":"h:1","agent_addr":"h:2","role":"primary"}"#,
                7,
                7,
            ),
            kv(keys.member("b"), "not json", 8, 8),
            kv(
                keys.proxy("px"),
                r#"{"region":"r","listen_addr":"h:3","version":"1"}"#,
                3,
                3,
            ),
            kv(
                format!("{}late", keys.coordinator_election()),
                r#"{"name":"c2","admin_addr":"h:5","quic_addr":"h:6"}"#,
                12,
                12,
            ),
            kv(
                format!("{}early", keys.coordinator_election()),
                r#"{"name":"c1","admin_addr":"h:7","quic_addr":"h:8"}"#,
                11,
                11,
            ),
        ];
        let snap = Snapshot::from_kvs(&keys, 20, &kvs).unwrap();
        let leader = snap.leader.as_ref().unwrap();
        assert_eq!(leader.value.state, LeaderState::Serving);
        assert_eq!(leader.mod_revision, 10);
        assert_eq!(snap.epoch, Epoch(3));
        assert_eq!(snap.epoch_revision, 9);
        assert_eq!(snap.config.sync_mode, SyncMode::On);
        assert!(snap.config.paused);
        assert_eq!(snap.members.len(), 1);
        assert_eq!(snap.members["a"].role, Role::Primary);
        assert_eq!(snap.problems.len(), 1, "{:?}", snap.problems);
        assert!(snap.problems[0].contains("members/b"));
        assert_eq!(snap.proxies["px"].listen_addr, "h:3");
        assert_eq!(snap.coordinator.as_ref().unwrap().name, "c1");
        assert_eq!(snap.current_epoch(), Epoch(3));
        assert_eq!(snap.leader_revision(), 10);
    }

    #[test]
    fn empty_cluster_and_bad_records() {
        let keys = Keys::new("c");
        let snap = Snapshot::from_kvs(&keys, 1, &[]).unwrap();
        assert_eq!(snap.leader, None);
        assert_eq!(snap.epoch, Epoch::ZERO);
        assert_eq!(snap.config, ClusterConfig::default());
        let err = Snapshot::from_kvs(&keys, 1, &[kv(keys.epoch(), "x", 1, 1)]).unwrap_err();
        assert!(err.to_string().contains("/meridian/c/epoch"), "{err}");
        let err = Snapshot::from_kvs(&keys, 1, &[kv(keys.leader(), "{}", 1, 1)]).unwrap_err();
        assert!(err.to_string().contains("/meridian/c/leader"), "{err}");
        // An invalid config falls back to defaults, reported.
        let snap = Snapshot::from_kvs(
            &keys,
            1,
            &[kv(keys.config(), r#"{"suspect_after":"10ms"}"#, 1, 1)],
        )
        .unwrap();
        assert_eq!(snap.config, ClusterConfig::default());
        assert!(snap.problems[0].contains("suspect_after"));
    }
}
