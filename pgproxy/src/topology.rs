//! Where the backends are: the primary and the replicas with their regions,
//! whether the leader is serving, and how healthy each replica is.
//!
//! The proxy reads the topology from a `watch` channel, so the source can be
//! static (flags or config file) or the etcd follower ([`crate::follow`]);
//! sessions pick up changes at their next backend acquisition. Replica choice
//! is a pure function of the topology and the proxy's region. A static
//! topology trusts its replicas (no health polling) and never holds writes
//! (`failover_hold` is zero): there is no failover to wait for.

use std::sync::Arc;
use std::time::Duration;

use meridian_shared::config::ProxyConfig;
use tokio::sync::watch;

/// What the proxy knows about the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeaderView {
    /// Static topology from flags or the config file (no epoch to check).
    #[default]
    Static,
    /// etcd names a serving leader; writes go to it.
    Serving,
    /// etcd says a failover is in progress: writes are held.
    FailingOver,
    /// No leader in etcd, or etcd unreachable for longer than the lease TTL: writes are held.
    Unknown,
}

/// How usable a replica is for reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplicaState {
    /// Answering, in recovery, within `max_replica_lag` (static replicas are always `Ok`).
    #[default]
    Ok,
    /// Answering but replaying more than `max_replica_lag` behind.
    Lagging,
    /// Last poll failed, timed out, or the node is not in recovery.
    Down,
    /// Not polled yet.
    Unknown,
}

/// One backend server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: Arc<str>,
    pub region: String,
    pub state: ReplicaState,
    /// Smoothed round trip of the health poll (`None`: not measured, e.g. static replicas).
    pub rtt: Option<Duration>,
}

impl Backend {
    /// Whether reads may go to this replica.
    pub fn usable(&self) -> bool {
        self.state == ReplicaState::Ok
    }
}

/// The addresses [`Topology::ryw_candidates`] offers a read-your-writes read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RywCandidates {
    pub local: Vec<Arc<str>>,
    pub beside_primary: Vec<Arc<str>>,
    pub primary_local: bool,
}

/// A snapshot of the cluster as the proxy should use it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    /// Where writes go; `None` while no serving leader is known.
    pub primary: Option<Arc<str>>,
    /// The primary's region, when known (from etcd's `leader`; a static topology has none).
    pub primary_region: Option<String>,
    pub replicas: Vec<Backend>,
    /// Fencing epoch of the current leader (0 with a static topology).
    pub epoch: u64,
    pub state: LeaderView,
    /// How long a write waits for a serving, connectable primary (zero: fail at once).
    pub failover_hold: Duration,
    /// Whether this region's result cache may be served from and stored into:
    /// false while etcd `cache/<region>` holds `usable: false` (the region missed
    /// invalidations) and while etcd is out of reach (invalidations cannot be
    /// known to flow); true when the key is absent or usable. A static topology
    /// has no coordinator that could mark it, so it is true there.
    pub cache_usable: bool,
}

impl Topology {
    /// A static topology from the configuration.
    pub fn from_config(cfg: &ProxyConfig) -> Topology {
        Topology {
            primary: cfg.backends.primary.as_deref().map(Arc::from),
            primary_region: None,
            replicas: cfg
                .backends
                .replicas
                .iter()
                .map(|r| Backend {
                    addr: Arc::from(r.addr.as_str()),
                    region: r.region.clone().unwrap_or_else(|| cfg.region.clone()),
                    state: ReplicaState::Ok,
                    rtt: None,
                })
                .collect(),
            epoch: 0,
            state: LeaderView::Static,
            failover_hold: Duration::ZERO,
            cache_usable: true,
        }
    }

    /// Whether a new primary connection must prove it carries [`epoch`](Self::epoch)
    /// (`meridian.epoch`) and is not in recovery.
    pub fn checks_epoch(&self) -> bool {
        self.state != LeaderView::Static
    }

    /// The fencing epoch a new primary connection must carry, if any.
    pub fn fence_epoch(&self) -> Option<u64> {
        self.checks_epoch().then_some(self.epoch)
    }

    /// Where a read-your-writes read from `region` may go (see `ryw::Candidates`): the
    /// usable replicas of `region`, those of the primary's region when that is another
    /// one, and whether the primary is in `region`.
    pub fn ryw_candidates(&self, region: &str) -> RywCandidates {
        let primary_region = self.primary_region.as_deref();
        let in_region = |r: Option<&str>| -> Vec<Arc<str>> {
            self.replicas
                .iter()
                .filter(|b| b.usable() && Some(b.region.as_str()) == r)
                .map(|b| b.addr.clone())
                .collect()
        };
        let primary_local = primary_region == Some(region);
        RywCandidates {
            local: in_region(Some(region)),
            beside_primary: if primary_local {
                Vec::new()
            } else {
                in_region(primary_region)
            },
            primary_local,
        }
    }

    /// The replica to read from: a usable one in `region`, else the nearest usable one in
    /// another region (lowest health-poll round trip; replicas within [`NEAR_ENOUGH`] of
    /// it, or all when none was measured, count as equally near), else `None` (the read
    /// goes to the primary). `salt` spreads sessions over equally good replicas.
    pub fn pick_replica(&self, region: &str, salt: u64) -> Option<&Backend> {
        let usable = || self.replicas.iter().filter(|r| r.usable());
        let local: Vec<&Backend> = usable().filter(|r| r.region == region).collect();
        let pool: Vec<&Backend> = if local.is_empty() {
            nearest(usable().collect())
        } else {
            local
        };
        if pool.is_empty() {
            None
        } else {
            Some(pool[(salt % pool.len() as u64) as usize])
        }
    }

    /// Whether any replica may take reads.
    pub fn has_usable_replica(&self) -> bool {
        self.replicas.iter().any(Backend::usable)
    }

    /// Whether `addr` is a replica that may take reads.
    pub fn is_usable_replica(&self, addr: &str) -> bool {
        self.replicas.iter().any(|r| r.usable() && &*r.addr == addr)
    }

    /// Number of replicas that may take reads (for metrics).
    pub fn usable_replicas(&self) -> usize {
        self.replicas.iter().filter(|r| r.usable()).count()
    }
}

pub type TopologyRx = watch::Receiver<Arc<Topology>>;

/// Round trips closer than this (or than a twentieth of the nearest) count as equally near.
pub const NEAR_ENOUGH: Duration = Duration::from_millis(2);

/// The backends of `all` as near as the nearest measured one; unmeasured ones only when
/// none is measured.
pub fn nearest(all: Vec<&Backend>) -> Vec<&Backend> {
    let Some(best) = all.iter().filter_map(|b| b.rtt).min() else {
        return all;
    };
    let bound = best + NEAR_ENOUGH.max(best / 20);
    all.into_iter()
        .filter(|b| b.rtt.is_some_and(|r| r <= bound))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(addr: &str, region: &str, state: ReplicaState) -> Backend {
        Backend {
            addr: Arc::from(addr),
            region: region.into(),
            state,
            rtt: None,
        }
    }

    fn measured(addr: &str, region: &str, rtt_ms: u64) -> Backend {
        Backend {
            rtt: Some(Duration::from_millis(rtt_ms)),
            ..b(addr, region, ReplicaState::Ok)
        }
    }

    #[test]
    fn without_a_local_replica_the_nearest_remote_one_is_read() {
        let t = Topology {
            replicas: vec![
                measured("west:1", "us-west", 70),
                measured("east:1", "us-east", 80),
                measured("west:2", "us-west", 72),
                b("unmeasured:1", "ap", ReplicaState::Ok),
                Backend {
                    state: ReplicaState::Down,
                    ..measured("down:1", "eu", 1)
                },
            ],
            ..Topology::default()
        };
        let picked: std::collections::BTreeSet<&str> = (0..8)
            .map(|salt| &*t.pick_replica("eu", salt).unwrap().addr)
            .collect();
        assert_eq!(picked, ["west:1", "west:2"].into_iter().collect());
        // A local replica wins however near the others are.
        let mut with_local = t.clone();
        with_local.replicas.push(measured("eu:1", "eu", 90));
        assert_eq!(&*with_local.pick_replica("eu", 5).unwrap().addr, "eu:1");
        // Nothing measured: every usable replica is a candidate.
        let unmeasured = Topology {
            replicas: vec![
                b("a:1", "x", ReplicaState::Ok),
                b("b:1", "y", ReplicaState::Ok),
            ],
            ..Topology::default()
        };
        assert_eq!(nearest(unmeasured.replicas.iter().collect()).len(), 2);
    }

    #[test]
    fn prefers_local_replica_then_any() {
        let t = Topology {
            primary: Some(Arc::from("p:1")),
            replicas: vec![
                b("a:1", "us", ReplicaState::Ok),
                b("b:1", "eu", ReplicaState::Ok),
            ],
            epoch: 1,
            ..Default::default()
        };
        assert_eq!(&*t.pick_replica("eu", 0).unwrap().addr, "b:1");
        assert_eq!(&*t.pick_replica("eu", 7).unwrap().addr, "b:1");
        assert!(t.pick_replica("ap", 0).is_some());
        assert!(Topology::default().pick_replica("eu", 0).is_none());
    }

    #[test]
    fn unhealthy_or_lagging_local_replica_falls_back_to_another_region_then_primary() {
        let mut t = Topology {
            primary: Some(Arc::from("p:1")),
            replicas: vec![
                b("local:1", "eu", ReplicaState::Lagging),
                b("local:2", "eu", ReplicaState::Down),
                b("far:1", "us", ReplicaState::Ok),
                b("far:2", "ap", ReplicaState::Unknown),
            ],
            state: LeaderView::Serving,
            epoch: 4,
            ..Default::default()
        };
        for salt in 0..5 {
            assert_eq!(&*t.pick_replica("eu", salt).unwrap().addr, "far:1");
        }
        assert!(t.has_usable_replica());
        assert_eq!(t.usable_replicas(), 1);
        assert!(t.is_usable_replica("far:1"));
        assert!(!t.is_usable_replica("local:1"));
        t.replicas[0].state = ReplicaState::Ok;
        assert_eq!(&*t.pick_replica("eu", 3).unwrap().addr, "local:1");
        for r in &mut t.replicas {
            r.state = ReplicaState::Down;
        }
        assert!(t.pick_replica("eu", 0).is_none());
        assert!(!t.has_usable_replica());
    }

    #[test]
    fn static_topology_trusts_replicas_and_checks_no_epoch() {
        let mut cfg = ProxyConfig {
            region: "eu".into(),
            ..Default::default()
        };
        cfg.backends.primary = Some("p:1".into());
        cfg.backends.replicas = vec![meridian_shared::config::ReplicaConfig {
            addr: "r:1".into(),
            region: None,
        }];
        let t = Topology::from_config(&cfg);
        assert_eq!(t.state, LeaderView::Static);
        assert!(!t.checks_epoch());
        assert_eq!(t.fence_epoch(), None);
        assert_eq!(t.failover_hold, Duration::ZERO);
        assert!(t.cache_usable);
        assert!(!Topology::default().cache_usable);
        assert_eq!(&*t.pick_replica("eu", 0).unwrap().addr, "r:1");
        let etcd = Topology {
            state: LeaderView::Serving,
            epoch: 7,
            ..t
        };
        assert_eq!(etcd.fence_epoch(), Some(7));
    }

    #[test]
    fn ryw_candidates_are_the_local_replicas_and_those_beside_the_primary() {
        let t = Topology {
            primary_region: Some("us-east".into()),
            replicas: vec![
                b("w:1", "us-west", ReplicaState::Ok),
                b("w:2", "us-west", ReplicaState::Down),
                b("e:1", "us-east", ReplicaState::Ok),
                b("eu:1", "eu-west", ReplicaState::Ok),
            ],
            ..Default::default()
        };
        let addrs = |v: &[Arc<str>]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let west = t.ryw_candidates("us-west");
        assert_eq!(addrs(&west.local), ["w:1"]);
        assert_eq!(addrs(&west.beside_primary), ["e:1"]);
        assert!(!west.primary_local);
        // In the primary's region its replicas are local, none is "beside" it.
        let east = t.ryw_candidates("us-east");
        assert_eq!(addrs(&east.local), ["e:1"]);
        assert!(east.beside_primary.is_empty());
        assert!(east.primary_local);
        // Unknown primary region (static topology): only local replicas.
        let stat = Topology {
            primary_region: None,
            ..t
        };
        let c = stat.ryw_candidates("us-west");
        assert_eq!(addrs(&c.local), ["w:1"]);
        assert!(c.beside_primary.is_empty() && !c.primary_local);
    }
}
