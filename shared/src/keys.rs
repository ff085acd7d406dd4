//! The etcd key layout of one cluster, all under `/meridian/<cluster>/`.
//!
//! | key | value ([`crate::records`]) |
//! |---|---|
//! | `leader` | [`LeaderRecord`](crate::records::LeaderRecord) |
//! | `epoch` | the current [`Epoch`](crate::epoch::Epoch) as a decimal number |
//! | `members/<node>` | [`MemberRecord`](crate::records::MemberRecord), on the agent's lease |
//! | `coordinator/` | election prefix; value [`CoordinatorRecord`](crate::records::CoordinatorRecord) |
//! | `config` | [`ClusterConfig`](crate::records::ClusterConfig) |
//! | `proxies/<id>` | [`ProxyRecord`](crate::records::ProxyRecord), on the proxy's lease |
//! | `sync` | [`SyncRecord`](crate::records::SyncRecord) (addition to DESIGN §2) |
//!
//! Names (cluster, node, proxy id) must be non-empty and free of `/` and control
//! characters; [`validate_name`] checks that and callers validate their config with
//! it once at start, so the key builders themselves do not fail.

/// A name cannot be used inside a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: must be 1..=128 characters without '/', whitespace or control characters")]
pub struct InvalidName {
    pub name: String,
}

/// Checks that `name` can be a cluster, node or proxy name.
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            name: name.to_string(),
        })
    }
}

/// Key builder for one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys of cluster `cluster` (validate the name with [`validate_name`] first).
    pub fn new(cluster: &str) -> Self {
        Keys {
            prefix: format!("/meridian/{cluster}/"),
        }
    }

    /// `/meridian/<cluster>/`: every key of the cluster (for a prefix watch).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    pub fn epoch(&self) -> String {
        format!("{}epoch", self.prefix)
    }

    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }

    pub fn sync(&self) -> String {
        format!("{}sync", self.prefix)
    }

    /// `members/`: prefix of every member key.
    pub fn members_prefix(&self) -> String {
        format!("{}members/", self.prefix)
    }

    pub fn member(&self, node: &str) -> String {
        format!("{}members/{node}", self.prefix)
    }

    /// The node name of a `members/<node>` key, or `None` for any other key.
    pub fn member_name<'k>(&self, key: &'k str) -> Option<&'k str> {
        Self::child(key, &self.members_prefix())
    }

    /// `coordinator/`: the election name used by coordinators.
    pub fn coordinator_election(&self) -> String {
        format!("{}coordinator/", self.prefix)
    }

    /// `proxies/`: prefix of every proxy key.
    pub fn proxies_prefix(&self) -> String {
        format!("{}proxies/", self.prefix)
    }

    pub fn proxy(&self, id: &str) -> String {
        format!("{}proxies/{id}", self.prefix)
    }

    /// The proxy id of a `proxies/<id>` key, or `None` for any other key.
    pub fn proxy_id<'k>(&self, key: &'k str) -> Option<&'k str> {
        Self::child(key, &self.proxies_prefix())
    }

    fn child<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
        let rest = key.strip_prefix(prefix)?;
        (!rest.is_empty() && !rest.contains('/')).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_design() {
        let keys = Keys::new("local");
        assert_eq!(keys.prefix(), "/meridian/local/");
        assert_eq!(keys.leader(), "/meridian/local/leader");
        assert_eq!(keys.epoch(), "/meridian/local/epoch");
        assert_eq!(keys.config(), "/meridian/local/config");
        assert_eq!(keys.sync(), "/meridian/local/sync");
        assert_eq!(
            keys.member("us-east-1"),
            "/meridian/local/members/us-east-1"
        );
        assert_eq!(keys.members_prefix(), "/meridian/local/members/");
        assert_eq!(keys.coordinator_election(), "/meridian/local/coordinator/");
        assert_eq!(keys.proxy("p1"), "/meridian/local/proxies/p1");
        assert_eq!(keys.proxies_prefix(), "/meridian/local/proxies/");
    }

    #[test]
    fn every_key_is_under_the_prefix_and_clusters_do_not_overlap() {
        let a = Keys::new("a");
        let ab = Keys::new("ab");
        for key in [
            a.leader(),
            a.epoch(),
            a.member("n"),
            a.proxy("p"),
            a.config(),
        ] {
            assert!(key.starts_with(a.prefix()));
            assert!(!key.starts_with(ab.prefix()));
        }
    }

    #[test]
    fn names_are_parsed_back_from_keys() {
        let keys = Keys::new("c");
        assert_eq!(
            keys.member_name(&keys.member("us-west-1")),
            Some("us-west-1")
        );
        assert_eq!(keys.member_name("/meridian/c/members/"), None);
        assert_eq!(keys.member_name("/meridian/c/members/a/b"), None);
        assert_eq!(keys.member_name("/meridian/other/members/a"), None);
        assert_eq!(keys.member_name(&keys.leader()), None);
        assert_eq!(keys.proxy_id(&keys.proxy("px-9")), Some("px-9"));
        assert_eq!(keys.proxy_id(&keys.member("px-9")), None);
    }

    #[test]
    fn name_validation() {
        assert!(validate_name("us-east-1").is_ok());
        assert!(validate_name("node_2.a").is_ok());
        for bad in ["", "a/b", "a b", "a\nb", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
