//! What the proxy knows from etcd, and the topology it makes of it (pure: the
//! clock and the replicas' health are passed in).
//!
//! [`EtcdView`] holds the last `leader`, `members/`, `config` and `cache/`
//! records the follower ([`crate::follow`]) read or was told by its watch, and
//! when etcd last answered; [`EtcdView::topology`] (through [`topology_from`])
//! turns it into the [`Topology`] the router reads: the serving leader as the
//! primary, unless etcd has been silent for longer than the lease TTL
//! ([`etcd_lost`]) and the failsafe has not confirmed the leader
//! ([`EtcdView::failsafe_until`]); every other member a replica with the state
//! its health polls give it ([`replica_state`]), at its address for the proxy's
//! region ([`leader_addr_for`], [`MemberRecord::pg_addr_for`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::KeyValue;
use meridian_shared::cache_keys::CacheRegionRecord;
use meridian_shared::keys::Keys;
use meridian_shared::records::{self, ClusterConfig, LeaderRecord, MemberRecord, Role};
use tracing::warn;

use crate::health::{ReplicaHealth, ReplicaStatus};
use crate::topology::{Backend, LeaderView, ReplicaState, Topology};

/// The inputs of [`topology_from`] that come from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TopologyParams {
    /// The proxy's region.
    pub region: String,
    pub max_replica_lag: Duration,
    /// Failover hold from the flags/file (etcd `config.failover_hold` overrides it).
    pub failover_hold: Duration,
    /// A poll result older than this counts as a failed poll.
    pub health_stale_after: Duration,
    /// Losing etcd for longer than this makes the leader unknown.
    pub lease_ttl: Duration,
}

/// What the proxy has read from etcd.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EtcdView {
    pub leader: Option<LeaderRecord>,
    pub members: BTreeMap<String, MemberRecord>,
    /// `config.failover_hold`, when the `config` key exists and sets it.
    pub config_hold: Option<Duration>,
    /// region -> `usable` of its `cache/<region>` record (an undecodable
    /// record counts as unusable); a region without a record is absent.
    pub cache_regions: BTreeMap<String, bool>,
    /// The last time etcd answered (`None`: never).
    pub last_contact: Option<Instant>,
    /// While etcd is out of reach: until when every replica confirmed the
    /// leader ([`crate::failsafe`]).
    pub failsafe_until: Option<Instant>,
}

impl EtcdView {
    /// Replaces the view with a full read of the cluster prefix.
    pub fn reset(&mut self, keys: &Keys, kvs: &[KeyValue]) {
        self.leader = None;
        self.members.clear();
        self.config_hold = None;
        self.cache_regions.clear();
        for kv in kvs {
            if let Ok(key) = kv.key_str() {
                self.put(keys, key, kv.value());
            }
        }
    }

    /// Applies a put of `key`; undecodable values count as absent (and are logged).
    pub fn put(&mut self, keys: &Keys, key: &str, value: &[u8]) {
        if key == keys.leader() {
            self.leader = records::decode::<LeaderRecord>("leader", value)
                .map_err(|e| warn!(error = %e, "ignoring the leader record"))
                .ok();
        } else if key == keys.config() {
            self.config_hold = config_hold(value);
        } else if let Some(node) = keys.member_name(key) {
            match records::decode::<MemberRecord>("member", value) {
                Ok(m) => {
                    self.members.insert(node.to_string(), m);
                }
                Err(e) => {
                    warn!(node, error = %e, "ignoring a member record");
                    self.members.remove(node);
                }
            }
        } else if let Some(region) = cache_region(keys, key) {
            let usable = match records::decode::<CacheRegionRecord>("cache region", value) {
                Ok(r) => r.usable,
                Err(e) => {
                    warn!(region, error = %e, "undecodable cache region record: cache unusable");
                    false
                }
            };
            self.cache_regions.insert(region.to_string(), usable);
        }
    }

    /// Applies a delete of `key`.
    pub fn delete(&mut self, keys: &Keys, key: &str) {
        if key == keys.leader() {
            self.leader = None;
        } else if key == keys.config() {
            self.config_hold = None;
        } else if let Some(node) = keys.member_name(key) {
            self.members.remove(node);
        } else if let Some(region) = cache_region(keys, key) {
            self.cache_regions.remove(region);
        }
    }

    /// The topology this view gives at `now`.
    pub fn topology(&self, health: &ReplicaHealth, now: Instant, p: &TopologyParams) -> Topology {
        let lost = etcd_lost(self.last_contact, now, p.lease_ttl);
        let confirmed = self.failsafe_until.is_some_and(|until| now < until);
        let leader = if lost && !confirmed {
            None
        } else {
            self.leader.as_ref()
        };
        let cache = !lost && cache_usable(self.cache_regions.get(&p.region).copied());
        let mut t = topology_from(leader, &self.members, health, now, p, cache);
        if let Some(hold) = self.config_hold {
            t.failover_hold = hold;
        }
        t
    }
}

/// `failover_hold` of a `config` value, only when the value sets it.
fn config_hold(value: &[u8]) -> Option<Duration> {
    let raw: serde_json::Value = serde_json::from_slice(value).ok()?;
    raw.get("failover_hold")?;
    match records::decode::<ClusterConfig>("config", value) {
        Ok(c) => Some(c.failover_hold),
        Err(e) => {
            warn!(error = %e, "ignoring the cluster config");
            None
        }
    }
}

/// The region of a `cache/<region>` key (`shared::cache_keys::etcd_region_key`
/// under the cluster prefix), or `None` for any other key.
pub fn cache_region<'k>(keys: &Keys, key: &'k str) -> Option<&'k str> {
    let rest = key.strip_prefix(keys.prefix())?;
    let region = rest.strip_prefix(meridian_shared::cache_keys::etcd_region_key("").as_str())?;
    (!region.is_empty() && !region.contains('/')).then_some(region)
}

/// Whether a region's cache is usable given its `cache/<region>` record's
/// `usable` (`None`: no record, which means usable).
pub fn cache_usable(record: Option<bool>) -> bool {
    record.unwrap_or(true)
}

/// Whether etcd has been out of reach for longer than the lease TTL.
pub fn etcd_lost(last_contact: Option<Instant>, now: Instant, lease_ttl: Duration) -> bool {
    last_contact.is_none_or(|t| now.saturating_duration_since(t) > lease_ttl)
}

/// The topology for a leader record, the members and the replicas' health.
///
/// The primary is the leader's address only while the leader is serving; the
/// replicas are the members with role `replica` (not the leader's node), each
/// with a state from its latest poll: `Ok` when it answered, is in recovery
/// and lags at most `max_replica_lag`.
///
/// Every address is the one for the proxy's region (`p.region`): a replica's
/// [`MemberRecord::pg_addr_for`], and for the primary the leader's member record
/// likewise when that record carries the leader's `pg_addr` (else the leader
/// record's `pg_addr`, e.g. while the leader has no member record).
/// `cache_usable` is passed through to [`Topology::cache_usable`].
pub fn topology_from(
    leader: Option<&LeaderRecord>,
    members: &BTreeMap<String, MemberRecord>,
    health: &ReplicaHealth,
    now: Instant,
    p: &TopologyParams,
    cache_usable: bool,
) -> Topology {
    let state = match leader {
        None => LeaderView::Unknown,
        Some(l) if l.is_serving() => LeaderView::Serving,
        Some(_) => LeaderView::FailingOver,
    };
    let replicas = members
        .iter()
        .filter(|(node, m)| {
            m.role == Role::Replica
                && leader.is_none_or(|l| l.node != **node && l.pg_addr != m.pg_addr)
        })
        .map(|(_, m)| {
            let addr = m.pg_addr_for(&p.region);
            Backend {
                addr: Arc::from(addr),
                region: m.region.clone(),
                state: replica_state(health.get(addr), now, p),
                rtt: health.get(addr).and_then(|s| s.rtt),
            }
        })
        .collect();
    Topology {
        primary: leader
            .filter(|l| l.is_serving())
            .map(|l| Arc::from(leader_addr_for(l, members, &p.region))),
        primary_region: leader.map(|l| l.region.clone()),
        replicas,
        epoch: leader.map_or(0, |l| l.epoch.0),
        state,
        failover_hold: p.failover_hold,
        cache_usable,
    }
}

/// The leader's address as reached from `region`: its member record's entry for
/// the region when that record names the leader's `pg_addr`, else `pg_addr`.
pub fn leader_addr_for<'a>(
    leader: &'a LeaderRecord,
    members: &'a BTreeMap<String, MemberRecord>,
    region: &str,
) -> &'a str {
    match members.get(&leader.node) {
        Some(m) if m.pg_addr == leader.pg_addr => m.pg_addr_for(region),
        _ => &leader.pg_addr,
    }
}

/// A replica's state from its latest poll.
pub fn replica_state(
    status: Option<&ReplicaStatus>,
    now: Instant,
    p: &TopologyParams,
) -> ReplicaState {
    let Some(s) = status else {
        return ReplicaState::Unknown;
    };
    if !s.ok || !s.in_recovery || now.saturating_duration_since(s.at) > p.health_stale_after {
        return ReplicaState::Down;
    }
    match s.lag {
        Some(lag) if lag <= p.max_replica_lag => ReplicaState::Ok,
        _ => ReplicaState::Lagging,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::epoch::Epoch;
    use meridian_shared::records::{LeaderState, MemberTags};

    fn params() -> TopologyParams {
        TopologyParams {
            region: "eu".into(),
            max_replica_lag: Duration::from_secs(5),
            failover_hold: Duration::from_secs(10),
            health_stale_after: Duration::from_secs(3),
            lease_ttl: Duration::from_secs(3),
        }
    }

    fn leader(node: &str, addr: &str, epoch: u64, state: LeaderState) -> LeaderRecord {
        LeaderRecord {
            node: node.into(),
            region: "us".into(),
            pg_addr: addr.into(),
            epoch: Epoch(epoch),
            timeline: 1,
            state,
            since: 0,
            candidate: None,
        }
    }

    fn member(region: &str, addr: &str, role: Role) -> MemberRecord {
        MemberRecord {
            region: region.into(),
            pg_addr: addr.into(),
            agent_addr: "a:1".into(),
            role,
            tags: MemberTags::default(),
            version: None,
            pg_addrs: BTreeMap::new(),
        }
    }

    fn members() -> BTreeMap<String, MemberRecord> {
        BTreeMap::from([
            ("n0".to_string(), member("us", "p:1", Role::Primary)),
            ("n1".to_string(), member("eu", "r1:1", Role::Replica)),
            ("n2".to_string(), member("us", "r2:1", Role::Replica)),
            ("n3".to_string(), member("ap", "x:1", Role::Unknown)),
        ])
    }

    fn ok(lag_ms: u64, at: Instant) -> ReplicaStatus {
        ReplicaStatus {
            ok: true,
            in_recovery: true,
            replay_lsn: None,
            lag: Some(Duration::from_millis(lag_ms)),
            rtt: None,
            at,
        }
    }

    #[test]
    fn serving_leader_is_the_primary_and_replicas_get_their_health() {
        let now = Instant::now();
        let health = ReplicaHealth::from([
            (Arc::from("r1:1"), ok(100, now)),
            (Arc::from("r2:1"), ok(6000, now)),
        ]);
        let l = leader("n0", "p:1", 3, LeaderState::Serving);
        let t = topology_from(Some(&l), &members(), &health, now, &params(), true);
        assert_eq!(t.state, LeaderView::Serving);
        assert_eq!(t.primary.as_deref(), Some("p:1"));
        assert_eq!(t.epoch, 3);
        assert_eq!(t.failover_hold, Duration::from_secs(10));
        let states: Vec<(&str, &str, ReplicaState)> = t
            .replicas
            .iter()
            .map(|b| (&*b.addr, b.region.as_str(), b.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("r1:1", "eu", ReplicaState::Ok),
                ("r2:1", "us", ReplicaState::Lagging)
            ]
        );
        assert_eq!(&*t.pick_replica("eu", 0).unwrap().addr, "r1:1");
        // The lagging local replica of "us" loses to the healthy one elsewhere.
        assert_eq!(&*t.pick_replica("us", 0).unwrap().addr, "r1:1");
    }

    #[test]
    fn failing_over_or_missing_leader_has_no_primary() {
        let now = Instant::now();
        let health = ReplicaHealth::new();
        let l = leader("n0", "p:1", 4, LeaderState::FailingOver);
        let t = topology_from(Some(&l), &members(), &health, now, &params(), true);
        assert_eq!(t.state, LeaderView::FailingOver);
        assert_eq!(t.primary, None);
        assert_eq!(t.epoch, 4);
        assert!(t.checks_epoch());
        // Never polled: known but not usable.
        assert!(t.replicas.iter().all(|r| r.state == ReplicaState::Unknown));
        let t = topology_from(None, &members(), &health, now, &params(), true);
        assert_eq!(t.state, LeaderView::Unknown);
        assert_eq!(t.primary, None);
        assert_eq!(t.epoch, 0);
    }

    #[test]
    fn the_leader_node_is_never_a_replica_even_with_a_stale_member_role() {
        let now = Instant::now();
        let mut m = members();
        m.insert("n1".into(), member("eu", "r1:1", Role::Replica));
        let l = leader("n1", "r1:1", 5, LeaderState::Serving);
        let t = topology_from(Some(&l), &m, &ReplicaHealth::new(), now, &params(), true);
        assert_eq!(t.primary.as_deref(), Some("r1:1"));
        assert!(t.replicas.iter().all(|r| &*r.addr != "r1:1"));
        assert_eq!(t.replicas.len(), 1);
    }

    #[test]
    fn replica_state_rules() {
        let now = Instant::now();
        let p = params();
        assert_eq!(replica_state(None, now, &p), ReplicaState::Unknown);
        assert_eq!(replica_state(Some(&ok(0, now)), now, &p), ReplicaState::Ok);
        assert_eq!(
            replica_state(Some(&ok(5000, now)), now, &p),
            ReplicaState::Ok
        );
        assert_eq!(
            replica_state(Some(&ok(5001, now)), now, &p),
            ReplicaState::Lagging
        );
        assert_eq!(
            replica_state(Some(&crate::health::failed(now)), now, &p),
            ReplicaState::Down
        );
        let promoted = ReplicaStatus {
            in_recovery: false,
            ..ok(0, now)
        };
        assert_eq!(replica_state(Some(&promoted), now, &p), ReplicaState::Down);
        let later = now + Duration::from_secs(4);
        assert_eq!(
            replica_state(Some(&ok(0, now)), later, &p),
            ReplicaState::Down
        );
    }

    #[test]
    fn losing_etcd_longer_than_the_lease_ttl_drops_the_primary_but_keeps_replicas() {
        let now = Instant::now();
        let keys = Keys::new("c");
        let mut v = EtcdView::default();
        let l = leader("n0", "p:1", 2, LeaderState::Serving);
        v.put(
            &keys,
            &keys.leader(),
            &records::encode("leader", &l).unwrap(),
        );
        v.put(
            &keys,
            &keys.member("n1"),
            &records::encode("member", &member("eu", "r1:1", Role::Replica)).unwrap(),
        );
        let health = ReplicaHealth::from([(Arc::from("r1:1"), ok(0, now))]);
        // Never in contact: unknown.
        assert_eq!(v.topology(&health, now, &params()).primary, None);
        v.last_contact = Some(now);
        let t = v.topology(&health, now + Duration::from_secs(3), &params());
        assert_eq!(t.primary.as_deref(), Some("p:1"));
        let t = v.topology(&health, now + Duration::from_millis(3001), &params());
        assert_eq!(t.primary, None);
        assert_eq!(t.state, LeaderView::Unknown);
        assert_eq!(t.replicas.len(), 1);
        assert!(etcd_lost(None, now, Duration::from_secs(3)));
        assert!(!etcd_lost(Some(now), now, Duration::from_secs(3)));
    }

    #[test]
    fn view_applies_puts_and_deletes_and_config_hold_only_when_set() {
        let now = Instant::now();
        let keys = Keys::new("c");
        let mut v = EtcdView {
            last_contact: Some(now),
            ..Default::default()
        };
        v.put(&keys, &keys.config(), br#"{"paused":true}"#);
        assert_eq!(v.config_hold, None);
        assert_eq!(
            v.topology(&ReplicaHealth::new(), now, &params())
                .failover_hold,
            Duration::from_secs(10)
        );
        v.put(&keys, &keys.config(), br#"{"failover_hold":"1s 500ms"}"#);
        assert_eq!(v.config_hold, Some(Duration::from_millis(1500)));
        assert_eq!(
            v.topology(&ReplicaHealth::new(), now, &params())
                .failover_hold,
            Duration::from_millis(1500)
        );
        v.delete(&keys, &keys.config());
        assert_eq!(v.config_hold, None);

        v.put(&keys, &keys.member("n1"), b"not json");
        assert!(v.members.is_empty());
        v.put(
            &keys,
            &keys.member("n1"),
            &records::encode("member", &member("eu", "r1:1", Role::Replica)).unwrap(),
        );
        assert_eq!(v.members.len(), 1);
        v.put(&keys, &keys.proxy("me"), b"{}");
        assert_eq!(v.members.len(), 1);
        v.delete(&keys, &keys.member("n1"));
        assert!(v.members.is_empty());
        let l = leader("n0", "p:1", 1, LeaderState::Serving);
        v.put(
            &keys,
            &keys.leader(),
            &records::encode("leader", &l).unwrap(),
        );
        assert_eq!(v.leader.as_ref(), Some(&l));
        v.delete(&keys, &keys.leader());
        assert_eq!(v.leader, None);
    }

    fn with_addrs(mut m: MemberRecord, addrs: &[(&str, &str)]) -> MemberRecord {
        m.pg_addrs = addrs
            .iter()
            .map(|(r, a)| (r.to_string(), a.to_string()))
            .collect();
        m
    }

    #[test]
    fn addresses_are_the_ones_for_the_proxys_region() {
        let now = Instant::now();
        let m = BTreeMap::from([
            (
                "n0".to_string(),
                with_addrs(
                    member("us", "p:1", Role::Primary),
                    &[("us", "p:1"), ("eu", "p-eu:1")],
                ),
            ),
            (
                "n1".to_string(),
                with_addrs(
                    member("eu", "r1:1", Role::Replica),
                    &[("eu", "r1:1"), ("us", "r1-us:1")],
                ),
            ),
            // No per-region addresses: pg_addr from everywhere.
            ("n2".to_string(), member("ap", "r2:1", Role::Replica)),
        ]);
        let l = leader("n0", "p:1", 3, LeaderState::Serving);
        // Health is keyed by the address actually dialed (the regional one).
        let health = ReplicaHealth::from([
            (Arc::from("r1-us:1"), ok(0, now)),
            (Arc::from("r1:1"), ok(0, now)),
            (Arc::from("r2:1"), ok(0, now)),
        ]);
        let eu = topology_from(Some(&l), &m, &health, now, &params(), true);
        assert_eq!(eu.primary.as_deref(), Some("p-eu:1"));
        let addrs: Vec<&str> = eu.replicas.iter().map(|b| &*b.addr).collect();
        assert_eq!(addrs, vec!["r1:1", "r2:1"]);
        assert!(eu.replicas.iter().all(|b| b.state == ReplicaState::Ok));

        let us_params = TopologyParams {
            region: "us".into(),
            ..params()
        };
        let us = topology_from(Some(&l), &m, &health, now, &us_params, true);
        assert_eq!(us.primary.as_deref(), Some("p:1"));
        let addrs: Vec<&str> = us.replicas.iter().map(|b| &*b.addr).collect();
        assert_eq!(addrs, vec!["r1-us:1", "r2:1"]);
        assert_eq!(us.replicas[0].region, "eu");

        // A region nobody lists: every advertised pg_addr.
        let ap_params = TopologyParams {
            region: "ap".into(),
            ..params()
        };
        let ap = topology_from(Some(&l), &m, &health, now, &ap_params, true);
        assert_eq!(ap.primary.as_deref(), Some("p:1"));

        // The leader without a member record, or with a record naming another
        // address: the leader record's pg_addr.
        let mut no_rec = m.clone();
        no_rec.remove("n0");
        let t = topology_from(Some(&l), &no_rec, &health, now, &params(), true);
        assert_eq!(t.primary.as_deref(), Some("p:1"));
        let mut moved = m.clone();
        moved.get_mut("n0").unwrap().pg_addr = "elsewhere:1".into();
        let t = topology_from(Some(&l), &moved, &health, now, &params(), true);
        assert_eq!(t.primary.as_deref(), Some("p:1"));
        assert_eq!(leader_addr_for(&l, &m, "eu"), "p-eu:1");
    }

    #[test]
    fn cache_is_usable_unless_the_region_is_marked_or_etcd_is_lost() {
        let now = Instant::now();
        let keys = Keys::new("c");
        let key = |r: &str| {
            format!(
                "{}{}",
                keys.prefix(),
                meridian_shared::cache_keys::etcd_region_key(r)
            )
        };
        assert_eq!(cache_region(&keys, &key("eu")), Some("eu"));
        assert_eq!(cache_region(&keys, &keys.leader()), None);
        assert_eq!(
            cache_region(&keys, &format!("{}cache/", keys.prefix())),
            None
        );
        assert_eq!(cache_region(&keys, "/meridian/other/cache/eu"), None);
        assert!(cache_usable(None));
        assert!(cache_usable(Some(true)));
        assert!(!cache_usable(Some(false)));

        let mut v = EtcdView::default();
        let h = ReplicaHealth::new();
        // Never in contact with etcd: not usable.
        assert!(!v.topology(&h, now, &params()).cache_usable);
        v.last_contact = Some(now);
        // No record: usable.
        assert!(v.topology(&h, now, &params()).cache_usable);
        let unusable = CacheRegionRecord {
            usable: false,
            since: 1,
        };
        v.put(
            &keys,
            &key("eu"),
            &records::encode("cache", &unusable).unwrap(),
        );
        assert!(!v.topology(&h, now, &params()).cache_usable);
        // Another region's record does not matter.
        let us_params = TopologyParams {
            region: "us".into(),
            ..params()
        };
        assert!(v.topology(&h, now, &us_params).cache_usable);
        v.put(&keys, &key("eu"), br#"{"usable":true,"since":2}"#);
        assert!(v.topology(&h, now, &params()).cache_usable);
        v.put(&keys, &key("eu"), b"garbage");
        assert!(!v.topology(&h, now, &params()).cache_usable);
        v.delete(&keys, &key("eu"));
        assert!(v.topology(&h, now, &params()).cache_usable);
        v.put(
            &keys,
            &key("eu"),
            &records::encode("cache", &unusable).unwrap(),
        );
        // A full re-read without the key: usable again.
        v.reset(&keys, &[]);
        assert!(v.topology(&h, now, &params()).cache_usable);
        // etcd lost for longer than the lease TTL: not usable.
        let later = now + Duration::from_millis(3001);
        assert!(!v.topology(&h, later, &params()).cache_usable);
    }
}
