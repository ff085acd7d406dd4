//! Where the backends are: the primary and the replicas with their regions.
//!
//! The proxy reads the topology from a `watch` channel, so the source can be
//! static (flags or config file) or a watcher that follows the leader in etcd;
//! sessions pick up changes at their next backend acquisition. Replica choice
//! is a pure function of the topology and the proxy's region.

use std::sync::Arc;

use meridian_shared::config::ProxyConfig;
use tokio::sync::watch;

/// One backend server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: Arc<str>,
    pub region: String,
}

/// A snapshot of the cluster as the proxy should use it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    pub primary: Option<Arc<str>>,
    pub replicas: Vec<Backend>,
    /// Fencing epoch of the current leader (0 with a static topology).
    pub epoch: u64,
}

impl Topology {
    /// A static topology from the configuration.
    pub fn from_config(cfg: &ProxyConfig) -> Topology {
        Topology {
            primary: cfg.backends.primary.as_deref().map(Arc::from),
            replicas: cfg
                .backends
                .replicas
                .iter()
                .map(|r| Backend {
                    addr: Arc::from(r.addr.as_str()),
                    region: r.region.clone().unwrap_or_else(|| cfg.region.clone()),
                })
                .collect(),
            epoch: 0,
        }
    }

    /// The replica to read from: one in `region` if any, else any replica.
    /// `salt` spreads sessions over equally good replicas.
    pub fn pick_replica(&self, region: &str, salt: u64) -> Option<&Backend> {
        let local: Vec<&Backend> = self
            .replicas
            .iter()
            .filter(|r| r.region == region)
            .collect();
        let pool: Vec<&Backend> = if local.is_empty() {
            self.replicas.iter().collect()
        } else {
            local
        };
        if pool.is_empty() {
            None
        } else {
            Some(pool[(salt % pool.len() as u64) as usize])
        }
    }
}

pub type TopologyRx = watch::Receiver<Arc<Topology>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn b(addr: &str, region: &str) -> Backend {
        Backend {
            addr: Arc::from(addr),
            region: region.into(),
        }
    }

    #[test]
    fn prefers_local_replica_then_any() {
        let t = Topology {
            primary: Some(Arc::from("p:1")),
            replicas: vec![b("a:1", "us"), b("b:1", "eu")],
            epoch: 1,
        };
        assert_eq!(&*t.pick_replica("eu", 0).unwrap().addr, "b:1");
        assert_eq!(&*t.pick_replica("eu", 7).unwrap().addr, "b:1");
        assert!(t.pick_replica("ap", 0).is_some());
        assert!(Topology::default().pick_replica("eu", 0).is_none());
    }
}
