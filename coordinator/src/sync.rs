//! Synchronous replication settings, pure: which standbys the primary waits for,
//! the `synchronous_standby_names` value, and the order of changes that keeps
//! acknowledged commits findable at failover.
//!
//! The primary waits for `ANY 1 (...)` of the listed standbys, so an acknowledged
//! commit is on at least one of them. The `sync` key in etcd records a superset of
//! the list PostgreSQL uses at every instant: a standby is added to etcd *before*
//! the primary's setting, and removed from etcd only *after* the primary stopped
//! waiting for it and a remaining standby has caught up. At failover the planner
//! then promotes the most advanced member of the recorded set (and refuses while
//! one of them is unobserved). Mode `on` falls back to asynchronous (an empty
//! list) when no standby is healthy; mode `strict` never empties the list, so
//! commits wait until a listed standby returns.
//!
//! Standby names are the nodes' `application_name` in `primary_conninfo` (the
//! agent sets it to the node name).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use meridian_shared::records::{ClusterConfig, MemberRecord, Role, SyncMode};

use crate::detector::NodeReport;

/// Quotes a standby name as a PostgreSQL identifier (`"a""b"` for `a"b`).
pub fn quote_name(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The `synchronous_standby_names` value for `standbys`: `ANY 1 ("a", "b")`, or
/// empty (asynchronous) when the set is empty.
pub fn synchronous_standby_names(standbys: &BTreeSet<String>) -> String {
    if standbys.is_empty() {
        return String::new();
    }
    let names: Vec<String> = standbys.iter().map(|s| quote_name(s)).collect();
    format!("ANY 1 ({})", names.join(", "))
}

/// Replicas that may serve as synchronous standbys of `primary` at `now`: member,
/// not tagged `nosync`, heartbeating, PostgreSQL up, role replica, streaming from
/// the primary.
pub fn healthy_standbys(
    primary: &str,
    primary_pg_addr: &str,
    members: &BTreeMap<String, MemberRecord>,
    reports: &BTreeMap<String, NodeReport>,
    config: &ClusterConfig,
    now: Instant,
) -> BTreeSet<String> {
    reports
        .iter()
        .filter(|(name, _)| name.as_str() != primary)
        .filter(|(name, _)| members.get(*name).is_some_and(|m| !m.tags.nosync))
        .filter(|(_, r)| r.is_fresh(now, config.suspect_after))
        .filter(|(_, r)| r.heartbeat.pg_up && r.heartbeat.role == Role::Replica)
        .filter(|(_, r)| r.heartbeat.streams_from(primary, primary_pg_addr))
        .map(|(name, _)| name.clone())
        .collect()
}

/// The standby set the primary should wait for.
///
/// `current` is what the primary uses now; in `strict` mode it is kept while no
/// standby is healthy (so commits block rather than lose their guarantee), and if
/// it is empty too, `fallback` (e.g. every replica member) is used.
pub fn desired_standbys(
    mode: SyncMode,
    healthy: &BTreeSet<String>,
    current: &BTreeSet<String>,
    fallback: &BTreeSet<String>,
) -> BTreeSet<String> {
    match mode {
        SyncMode::Off => BTreeSet::new(),
        SyncMode::On => healthy.clone(),
        SyncMode::Strict if !healthy.is_empty() => healthy.clone(),
        SyncMode::Strict if !current.is_empty() => current.clone(),
        SyncMode::Strict => fallback.clone(),
    }
}

/// The next change towards `desired`, keeping `applied ⊆ recorded`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncStep {
    /// Nothing to do.
    InSync,
    /// Write this set to the `sync` key (etcd txn).
    Record(BTreeSet<String>),
    /// Set `synchronous_standby_names` on the primary to `value` (the names of `standbys`).
    Apply {
        standbys: BTreeSet<String>,
        value: String,
    },
    /// The primary no longer waits for some recorded standbys, but no remaining one
    /// has caught up yet: keep them recorded until it has.
    WaitCatchUp,
}

/// Decides the next step. `recorded` is the `sync` key, `applied` what the primary
/// acknowledged. `remaining_caught_up` says whether a member of `desired` has
/// flushed the primary's WAL up to the position it had when `applied` was set
/// (pass `true` when `desired` is empty: that is a deliberate fallback to async).
pub fn next_sync_step(
    recorded: &BTreeSet<String>,
    applied: &BTreeSet<String>,
    desired: &BTreeSet<String>,
    remaining_caught_up: bool,
) -> SyncStep {
    if !desired.is_subset(recorded) {
        // Additions go to etcd first (keep what is applied recorded, too).
        let grown = recorded.union(desired).cloned().collect();
        return SyncStep::Record(grown);
    }
    if applied != desired {
        return SyncStep::Apply {
            standbys: desired.clone(),
            value: synchronous_standby_names(desired),
        };
    }
    if recorded != desired {
        return if remaining_caught_up {
            SyncStep::Record(desired.clone())
        } else {
            SyncStep::WaitCatchUp
        };
    }
    SyncStep::InSync
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::envelope::Heartbeat;
    use meridian_shared::epoch::Epoch;
    use meridian_shared::lsn::Lsn;
    use meridian_shared::records::MemberTags;
    use std::time::Duration;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_are_any_one_of_quoted_standbys() {
        assert_eq!(synchronous_standby_names(&set(&[])), "");
        assert_eq!(synchronous_standby_names(&set(&["b"])), "ANY 1 (\"b\")");
        assert_eq!(
            synchronous_standby_names(&set(&["us-west-1", "eu-west-1"])),
            "ANY 1 (\"eu-west-1\", \"us-west-1\")"
        );
        assert_eq!(quote_name("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn desired_set_per_mode() {
        let healthy = set(&["a", "b"]);
        let none = set(&[]);
        let current = set(&["c"]);
        let all = set(&["a", "b", "c"]);
        assert_eq!(
            desired_standbys(SyncMode::Off, &healthy, &current, &all),
            none
        );
        assert_eq!(
            desired_standbys(SyncMode::On, &healthy, &current, &all),
            healthy
        );
        // `on` falls back to async when no standby is healthy.
        assert_eq!(desired_standbys(SyncMode::On, &none, &current, &all), none);
        assert_eq!(
            desired_standbys(SyncMode::Strict, &healthy, &current, &all),
            healthy
        );
        // `strict` never empties the list.
        assert_eq!(
            desired_standbys(SyncMode::Strict, &none, &current, &all),
            current
        );
        assert_eq!(desired_standbys(SyncMode::Strict, &none, &none, &all), all);
    }

    #[test]
    fn adding_a_standby_records_it_before_applying() {
        let step = next_sync_step(&set(&["a"]), &set(&["a"]), &set(&["a", "b"]), false);
        assert_eq!(step, SyncStep::Record(set(&["a", "b"])));
        let step = next_sync_step(&set(&["a", "b"]), &set(&["a"]), &set(&["a", "b"]), false);
        assert_eq!(
            step,
            SyncStep::Apply {
                standbys: set(&["a", "b"]),
                value: "ANY 1 (\"a\", \"b\")".into()
            }
        );
        assert_eq!(
            next_sync_step(
                &set(&["a", "b"]),
                &set(&["a", "b"]),
                &set(&["a", "b"]),
                false
            ),
            SyncStep::InSync
        );
    }

    #[test]
    fn removing_a_standby_applies_first_and_unrecords_after_catch_up() {
        let recorded = set(&["a", "b"]);
        let step = next_sync_step(&recorded, &set(&["a", "b"]), &set(&["b"]), false);
        assert!(matches!(step, SyncStep::Apply { ref standbys, .. } if *standbys == set(&["b"])));
        assert_eq!(
            next_sync_step(&recorded, &set(&["b"]), &set(&["b"]), false),
            SyncStep::WaitCatchUp
        );
        assert_eq!(
            next_sync_step(&recorded, &set(&["b"]), &set(&["b"]), true),
            SyncStep::Record(set(&["b"]))
        );
    }

    #[test]
    fn replacing_a_standby_keeps_applied_within_recorded_at_every_step() {
        let mut recorded = set(&["a"]);
        let mut applied = set(&["a"]);
        let desired = set(&["b"]);
        for _ in 0..6 {
            match next_sync_step(&recorded, &applied, &desired, true) {
                SyncStep::Record(s) => recorded = s,
                SyncStep::Apply { standbys, .. } => applied = standbys,
                SyncStep::InSync => break,
                SyncStep::WaitCatchUp => panic!("caught up was given"),
            }
            assert!(applied.is_subset(&recorded), "{applied:?} ⊄ {recorded:?}");
        }
        assert_eq!((recorded, applied), (desired.clone(), desired));
    }

    #[test]
    fn fallback_to_async_clears_the_setting_then_the_record() {
        let recorded = set(&["a"]);
        let step = next_sync_step(&recorded, &set(&["a"]), &set(&[]), true);
        assert_eq!(
            step,
            SyncStep::Apply {
                standbys: set(&[]),
                value: String::new()
            }
        );
        assert_eq!(
            next_sync_step(&recorded, &set(&[]), &set(&[]), true),
            SyncStep::Record(set(&[]))
        );
    }

    fn report(node: &str, role: Role, upstream: Option<&str>, at: Instant) -> NodeReport {
        NodeReport {
            received_at: at,
            heartbeat: Heartbeat {
                node: node.into(),
                region: "r".into(),
                seq: 1,
                sent_at_ms: 0,
                role,
                pg_up: true,
                timeline: 1,
                write_lsn: None,
                flush_lsn: Some(Lsn(1)),
                replay_lsn: None,
                receive_lsn: None,
                receiver_streaming: upstream.is_some(),
                upstream: upstream.map(str::to_string),
                replay_lag_ms: None,
                epoch_seen: Epoch(1),
                invalidated_lsn: None,
            },
        }
    }

    #[test]
    fn healthy_standbys_are_fresh_streaming_replicas_without_nosync() {
        let now = Instant::now() + Duration::from_secs(5);
        let fresh = now - Duration::from_millis(50);
        let stale = now - Duration::from_secs(2);
        let member = |nosync| MemberRecord {
            region: "r".into(),
            pg_addr: "h:1".into(),
            agent_addr: "h:2".into(),
            role: Role::Replica,
            tags: MemberTags {
                nosync,
                ..MemberTags::default()
            },
            version: None,
            pg_addrs: Default::default(),
        };
        let mut members = BTreeMap::new();
        let mut reports = BTreeMap::new();
        for (name, nosync, rep) in [
            (
                "good",
                false,
                report("good", Role::Replica, Some("p"), fresh),
            ),
            (
                "byaddr",
                false,
                report("byaddr", Role::Replica, Some("p:5432"), fresh),
            ),
            (
                "nosync",
                true,
                report("nosync", Role::Replica, Some("p"), fresh),
            ),
            (
                "stale",
                false,
                report("stale", Role::Replica, Some("p"), stale),
            ),
            (
                "cascade",
                false,
                report("cascade", Role::Replica, Some("good"), fresh),
            ),
            ("idle", false, report("idle", Role::Replica, None, fresh)),
            ("p", false, report("p", Role::Primary, None, fresh)),
        ] {
            members.insert(name.to_string(), member(nosync));
            reports.insert(name.to_string(), rep);
        }
        reports.insert(
            "unregistered".into(),
            report("unregistered", Role::Replica, Some("p"), fresh),
        );
        let got = healthy_standbys(
            "p",
            "p:5432",
            &members,
            &reports,
            &ClusterConfig::default(),
            now,
        );
        assert_eq!(got, set(&["byaddr", "good"]));
    }
}
