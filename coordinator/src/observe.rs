//! From raw inputs (etcd records, the agents' heartbeats) to what the decision
//! modules and the admin surface consume, pure (time passed in): the planner's
//! [`NodeObservation`]s, the bootstrap decision, the next change of the
//! synchronous standby set ([`sync_change`], also when the set applied on the
//! primary is unknown), the switchover catch-up test and final position, which
//! departed nodes to forget, and the [`ClusterStatus`] snapshot with each node's
//! state and lag.
//!
//! Replicas may name their upstream by node name or by `host:port`; everything
//! here resolves it to a node name through the members' `pg_addr`, so the
//! planner compares names only.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meridian_shared::envelope::Heartbeat;
use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;
use meridian_shared::records::{
    ClusterConfig, LeaderRecord, MemberRecord, ProxyRecord, Role, SyncMode, SyncRecord,
};

use crate::control::{ClusterStatus, NodeStatus, ProxyStatus};
use crate::detector::NodeReport;
use crate::planner::NodeObservation;
use crate::sync::{
    desired_standbys, healthy_standbys, next_sync_step, synchronous_standby_names, SyncStep,
};

/// The node a heartbeat's WAL receiver streams from, by name, when streaming.
pub fn upstream_node(hb: &Heartbeat, members: &BTreeMap<String, MemberRecord>) -> Option<String> {
    if !hb.receiver_streaming {
        return None;
    }
    let up = hb.upstream.as_deref()?;
    if members.contains_key(up) {
        return Some(up.to_string());
    }
    members
        .iter()
        .find(|(_, m)| !m.pg_addr.is_empty() && m.pg_addr == up)
        .map(|(name, _)| name.clone())
        .or_else(|| Some(up.to_string()))
}

/// The planner's view of every member and every heartbeating node at `now`.
pub fn node_observations(
    members: &BTreeMap<String, MemberRecord>,
    reports: &BTreeMap<String, NodeReport>,
    now: Instant,
    suspect_after: Duration,
) -> BTreeMap<String, NodeObservation> {
    let names: BTreeSet<&String> = members.keys().chain(reports.keys()).collect();
    names
        .into_iter()
        .map(|name| {
            let obs = match reports.get(name) {
                Some(report) => {
                    let fresh = report.is_fresh(now, suspect_after);
                    let hb = &report.heartbeat;
                    NodeObservation {
                        healthy: fresh && hb.pg_up,
                        reachable: fresh,
                        role: hb.role,
                        epoch_seen: hb.epoch_seen,
                        timeline: hb.timeline,
                        streaming_from: upstream_node(hb, members),
                        position: hb.position(),
                    }
                }
                None => NodeObservation {
                    healthy: false,
                    reachable: false,
                    role: members.get(name).map_or(Role::Unknown, |m| m.role),
                    epoch_seen: Epoch::ZERO,
                    timeline: 0,
                    streaming_from: None,
                    position: None,
                },
            };
            (name.clone(), obs)
        })
        .collect()
}

/// The node that becomes the first leader: with no `leader` key, a member whose
/// agent heartbeats (fresh) as a primary with Postgres up. Several such nodes (a
/// misconfiguration): the furthest WAL position, then the smallest name.
/// Returns the node and its timeline.
pub fn bootstrap_choice(
    members: &BTreeMap<String, MemberRecord>,
    reports: &BTreeMap<String, NodeReport>,
    now: Instant,
    suspect_after: Duration,
) -> Option<(String, u32)> {
    reports
        .iter()
        .filter(|(name, _)| members.contains_key(*name))
        .filter(|(_, r)| r.is_fresh(now, suspect_after))
        .filter(|(_, r)| r.heartbeat.pg_up && r.heartbeat.role == Role::Primary)
        .max_by(|(a_name, a), (b_name, b)| {
            a.heartbeat
                .position()
                .cmp(&b.heartbeat.position())
                .then_with(|| b_name.cmp(a_name))
        })
        .map(|(name, r)| (name.clone(), r.heartbeat.timeline))
}

/// [`next_sync_step`] when the set applied on the primary may be unknown (a new
/// leader, or a newly elected coordinator): then the desired set is applied at
/// once if the record already covers it, else recorded first.
pub fn sync_step(
    recorded: &BTreeSet<String>,
    applied: Option<&BTreeSet<String>>,
    desired: &BTreeSet<String>,
    remaining_caught_up: bool,
) -> SyncStep {
    match applied {
        Some(applied) => next_sync_step(recorded, applied, desired, remaining_caught_up),
        None if desired.is_subset(recorded) => SyncStep::Apply {
            standbys: desired.clone(),
            value: synchronous_standby_names(desired),
        },
        None => SyncStep::Record(recorded.union(desired).cloned().collect()),
    }
}

/// The recorded synchronous set as it applies to `leader` in `epoch`: the `sync`
/// key's standbys (of whichever leader wrote it: after a failover the old set is
/// still the superset the new primary may wait for), without the leader itself.
pub fn recorded_standbys(sync: Option<&SyncRecord>, leader: &str) -> BTreeSet<String> {
    sync.map(|s| {
        s.standbys
            .iter()
            .filter(|n| n.as_str() != leader)
            .cloned()
            .collect()
    })
    .unwrap_or_default()
}

/// Switchover catch-up: whether `candidate` has everything the fenced primary
/// sent. After a clean (fast) shutdown the primary's walsender sends all WAL
/// before it exits, so a candidate whose receiver stopped streaming after the
/// fence was acknowledged, and which replayed what it received, holds it all.
pub fn caught_up_after_fence(candidate: &NodeReport, fence_acked_at: Instant) -> bool {
    let hb = &candidate.heartbeat;
    candidate.received_at > fence_acked_at
        && !hb.receiver_streaming
        && match (hb.replay_lsn, hb.receive_lsn) {
            (Some(replay), Some(receive)) => replay >= receive,
            _ => true,
        }
}

/// The position a switchover's candidate must reach before its promotion
/// (`Observations::old_final_lsn`), once the old primary's fence was acknowledged
/// at `fence_acked_at`: when the candidate shows it caught up
/// ([`caught_up_after_fence`]), the old primary's last reported position
/// (`old_primary_lsn`), else the candidate's own; when it does not show it within
/// `fallback_after`, the old primary's last reported position (or zero, when it
/// never reported one) so the switchover cannot hang. `None`: keep waiting.
pub fn switchover_final_lsn(
    fence_acked_at: Instant,
    old_primary_lsn: Option<Lsn>,
    candidate: Option<&NodeReport>,
    now: Instant,
    fallback_after: Duration,
) -> Option<Lsn> {
    if candidate.is_some_and(|c| caught_up_after_fence(c, fence_acked_at)) {
        old_primary_lsn.or(candidate.and_then(|c| c.heartbeat.position()))
    } else if now.saturating_duration_since(fence_acked_at) >= fallback_after {
        Some(old_primary_lsn.unwrap_or(Lsn::ZERO))
    } else {
        None
    }
}

/// Nodes to forget: heartbeating once, but no member key and silent for
/// `forget_after` (they left the cluster).
pub fn forgotten_nodes(
    members: &BTreeMap<String, MemberRecord>,
    reports: &BTreeMap<String, NodeReport>,
    now: Instant,
    forget_after: Duration,
) -> Vec<String> {
    reports
        .iter()
        .filter(|(name, r)| {
            !members.contains_key(*name)
                && now.saturating_duration_since(r.received_at) >= forget_after
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Everything [`sync_change`] reads.
pub struct SyncInput<'a> {
    /// The serving leader.
    pub leader: &'a LeaderRecord,
    pub members: &'a BTreeMap<String, MemberRecord>,
    pub reports: &'a BTreeMap<String, NodeReport>,
    pub config: &'a ClusterConfig,
    /// The `sync` key.
    pub record: Option<&'a SyncRecord>,
    /// The set the leader acknowledged in its current epoch, and the leader's
    /// position when it did; `None` when unknown (new leader or new coordinator).
    pub applied: Option<(&'a BTreeSet<String>, Lsn)>,
    pub now: Instant,
}

/// One change of the synchronous standby set to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncChange {
    /// Write this set to the `sync` key (for the leader and its epoch).
    Record(BTreeSet<String>),
    /// Send `SetSyncStandbys { value }` to the leader.
    Apply {
        standbys: BTreeSet<String>,
        value: String,
    },
}

/// The next change of the synchronous standby set ([`crate::sync`]), if any.
/// Nothing while the leader does not heartbeat as a primary with Postgres up, or
/// when asynchronous with nothing ever made synchronous. When the set is in sync
/// but the `sync` key was written for another leader or epoch (and the mode is
/// not `off`), it is rewritten for this one.
pub fn sync_change(input: &SyncInput<'_>) -> Option<SyncChange> {
    let SyncInput {
        leader,
        members,
        reports,
        config,
        record,
        applied,
        now,
    } = *input;
    let primary_ok = reports.get(&leader.node).is_some_and(|r| {
        r.is_fresh(now, config.suspect_after)
            && r.heartbeat.pg_up
            && r.heartbeat.role == Role::Primary
    });
    if !primary_ok {
        return None;
    }
    let recorded = recorded_standbys(record, &leader.node);
    if config.sync_mode == SyncMode::Off && recorded.is_empty() && applied.is_none() {
        return None; // asynchronous and nothing ever made synchronous
    }
    let healthy = healthy_standbys(&leader.node, &leader.pg_addr, members, reports, config, now);
    let current = applied.map(|(set, _)| set.clone()).unwrap_or_default();
    let fallback: BTreeSet<String> = members
        .iter()
        .filter(|(name, m)| name.as_str() != leader.node && !m.tags.nosync)
        .map(|(name, _)| name.clone())
        .collect();
    let desired = desired_standbys(config.sync_mode, &healthy, &current, &fallback);
    let caught_up = desired.is_empty()
        || applied.is_some_and(|(_, at_lsn)| {
            desired.iter().any(|n| {
                reports
                    .get(n)
                    .and_then(|r| r.heartbeat.flush_lsn.or(r.heartbeat.receive_lsn))
                    .is_some_and(|pos| pos >= at_lsn)
            })
        });
    let record_is_current =
        record.is_some_and(|s| s.leader == leader.node && s.epoch == leader.epoch);
    match sync_step(&recorded, applied.map(|(set, _)| set), &desired, caught_up) {
        SyncStep::Record(set) => Some(SyncChange::Record(set)),
        SyncStep::Apply { standbys, value } => Some(SyncChange::Apply { standbys, value }),
        SyncStep::InSync if !record_is_current && config.sync_mode != SyncMode::Off => {
            Some(SyncChange::Record(desired))
        }
        SyncStep::InSync | SyncStep::WaitCatchUp => None,
    }
}

/// Everything [`build_status`] reads.
pub struct StatusInput<'a> {
    pub cluster: &'a str,
    pub coordinator: &'a str,
    pub active: bool,
    pub leader: Option<&'a LeaderRecord>,
    pub epoch: Epoch,
    pub config: &'a ClusterConfig,
    pub sync: Option<&'a SyncRecord>,
    pub members: &'a BTreeMap<String, MemberRecord>,
    pub proxies: &'a BTreeMap<String, ProxyRecord>,
    pub reports: &'a BTreeMap<String, NodeReport>,
    /// Nodes whose agent acknowledged `Fence` and that have not reported Postgres up since.
    pub fenced: &'a BTreeSet<String>,
    pub now: Instant,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Replica => "replica",
        Role::Unknown => "unknown",
    }
}

fn mode_name(mode: SyncMode) -> &'static str {
    match mode {
        SyncMode::Off => "off",
        SyncMode::On => "on",
        SyncMode::Strict => "strict",
    }
}

/// The cluster as `meridianctl status` shows it.
pub fn build_status(input: &StatusInput<'_>) -> ClusterStatus {
    let suspect_after = input.config.suspect_after;
    let leader_name = input.leader.map(|l| l.node.as_str());
    let primary_position: Option<Lsn> = leader_name
        .and_then(|l| input.reports.get(l))
        .and_then(|r| r.heartbeat.position());
    let names: BTreeSet<&String> = input.members.keys().chain(input.reports.keys()).collect();
    let nodes = names
        .into_iter()
        .map(|name| {
            let member = input.members.get(name);
            let report = input.reports.get(name);
            let mut node = NodeStatus {
                name: name.clone(),
                region: member.map(|m| m.region.clone()).unwrap_or_default(),
                role: role_name(member.map_or(Role::Unknown, |m| m.role)).to_string(),
                // A standby coordinator hears no heartbeats: it cannot tell.
                state: if input.active { "silent" } else { "unknown" }.to_string(),
                pg_addr: member.map(|m| m.pg_addr.clone()).unwrap_or_default(),
                member: member.is_some(),
                ..NodeStatus::default()
            };
            if let Some(report) = report {
                let hb = &report.heartbeat;
                node.region = hb.region.clone();
                node.role = role_name(hb.role).to_string();
                node.timeline = hb.timeline;
                node.pg_up = hb.pg_up;
                node.epoch_seen = hb.epoch_seen.0;
                node.lag_ms = hb.replay_lag_ms;
                node.last_heartbeat_ms = Some(
                    u64::try_from(
                        input
                            .now
                            .saturating_duration_since(report.received_at)
                            .as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                );
                if hb.role == Role::Replica {
                    node.lag_bytes = primary_position
                        .zip(hb.replay_lsn.or(hb.position()))
                        .map(|(p, r)| p.saturating_sub(r));
                }
                node.state = if !report.is_fresh(input.now, suspect_after) {
                    "silent"
                } else if input.fenced.contains(name) && !hb.pg_up {
                    "fenced"
                } else if !hb.pg_up {
                    "stopped"
                } else {
                    match hb.role {
                        Role::Primary => "running",
                        Role::Replica
                            if hb.receiver_streaming
                                && node
                                    .lag_bytes
                                    .is_none_or(|lag| lag <= input.config.max_failover_lag) =>
                        {
                            "streaming"
                        }
                        Role::Replica => "catching_up",
                        Role::Unknown => "starting",
                    }
                }
                .to_string();
            }
            node
        })
        .collect();
    ClusterStatus {
        cluster: input.cluster.to_string(),
        coordinator: input.coordinator.to_string(),
        active: input.active,
        epoch: input
            .epoch
            .max(input.leader.map_or(Epoch::ZERO, |l| l.epoch))
            .0,
        leader: leader_name.map(str::to_string),
        state: match input.leader {
            None => "unknown".to_string(),
            Some(l) if l.is_serving() => "serving".to_string(),
            Some(_) => "failing_over".to_string(),
        },
        paused: input.config.paused,
        sync_mode: mode_name(input.config.sync_mode).to_string(),
        sync_standbys: input
            .sync
            .map(|s| s.standbys.iter().cloned().collect())
            .unwrap_or_default(),
        nodes,
        proxies: input
            .proxies
            .iter()
            .map(|(id, p)| ProxyStatus {
                id: id.clone(),
                region: p.region.clone(),
                listen_addr: p.listen_addr.clone(),
                version: p.version.clone(),
            })
            .collect(),
        cache_unusable: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::records::{LeaderState, MemberTags};

    const MS: Duration = Duration::from_millis(1);

    fn member(pg_addr: &str, role: Role) -> MemberRecord {
        MemberRecord {
            region: "r".into(),
            pg_addr: pg_addr.into(),
            agent_addr: "h:0".into(),
            role,
            tags: MemberTags::default(),
            version: None,
            pg_addrs: Default::default(),
        }
    }

    fn hb(node: &str, role: Role, lsn: u64) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            region: "r".into(),
            seq: 1,
            sent_at_ms: 0,
            role,
            pg_up: true,
            timeline: 1,
            write_lsn: (role == Role::Primary).then_some(Lsn(lsn)),
            flush_lsn: Some(Lsn(lsn)),
            replay_lsn: (role == Role::Replica).then_some(Lsn(lsn)),
            receive_lsn: (role == Role::Replica).then_some(Lsn(lsn)),
            receiver_streaming: false,
            upstream: None,
            replay_lag_ms: None,
            epoch_seen: Epoch(1),
            invalidated_lsn: None,
        }
    }

    fn at(heartbeat: Heartbeat, received_at: Instant) -> NodeReport {
        NodeReport {
            received_at,
            heartbeat,
        }
    }

    fn world() -> (
        BTreeMap<String, MemberRecord>,
        BTreeMap<String, NodeReport>,
        Instant,
    ) {
        let now = Instant::now() + Duration::from_secs(10);
        let mut members = BTreeMap::new();
        members.insert("p".to_string(), member("10.0.0.1:5432", Role::Primary));
        members.insert("r1".to_string(), member("10.0.0.2:5432", Role::Replica));
        members.insert("r2".to_string(), member("10.0.0.3:5432", Role::Replica));
        let mut reports = BTreeMap::new();
        reports.insert(
            "p".to_string(),
            at(hb("p", Role::Primary, 5000), now - 50 * MS),
        );
        let mut r1 = hb("r1", Role::Replica, 4000);
        r1.receiver_streaming = true;
        r1.upstream = Some("10.0.0.1:5432".into());
        reports.insert("r1".to_string(), at(r1, now - 50 * MS));
        let mut r2 = hb("r2", Role::Replica, 1000);
        r2.pg_up = false;
        reports.insert("r2".to_string(), at(r2, now - 20 * MS));
        (members, reports, now)
    }

    #[test]
    fn observations_resolve_upstream_addresses_and_separate_reachable_from_healthy() {
        let (members, mut reports, now) = world();
        reports.insert(
            "ghost".to_string(),
            at(hb("ghost", Role::Replica, 1), now - Duration::from_secs(3)),
        );
        let obs = node_observations(&members, &reports, now, 500 * MS);
        assert_eq!(obs["r1"].streaming_from.as_deref(), Some("p"));
        assert!(obs["r1"].healthy && obs["r1"].reachable);
        assert!(!obs["r2"].healthy && obs["r2"].reachable);
        assert!(!obs["ghost"].healthy && !obs["ghost"].reachable);
        assert_eq!(obs["p"].position, Some(Lsn(5000)));
        // A member never heard from is neither.
        let mut members = members;
        members.insert("new".to_string(), member("h:9", Role::Replica));
        let obs = node_observations(&members, &reports, now, 500 * MS);
        assert!(!obs["new"].reachable);
    }

    #[test]
    fn upstream_by_unknown_address_is_kept_verbatim_and_not_streaming_is_none() {
        let (members, _, _) = world();
        let mut h = hb("x", Role::Replica, 1);
        h.upstream = Some("elsewhere:1".into());
        assert_eq!(upstream_node(&h, &members), None);
        h.receiver_streaming = true;
        assert_eq!(upstream_node(&h, &members).as_deref(), Some("elsewhere:1"));
        h.upstream = Some("r1".into());
        assert_eq!(upstream_node(&h, &members).as_deref(), Some("r1"));
    }

    #[test]
    fn bootstrap_needs_a_fresh_member_primary_with_postgres_up() {
        let (members, mut reports, now) = world();
        assert_eq!(
            bootstrap_choice(&members, &reports, now, 500 * MS),
            Some(("p".to_string(), 1))
        );
        reports.get_mut("p").unwrap().heartbeat.pg_up = false;
        assert_eq!(bootstrap_choice(&members, &reports, now, 500 * MS), None);
        reports.get_mut("p").unwrap().heartbeat.pg_up = true;
        reports.get_mut("p").unwrap().received_at = now - Duration::from_secs(1);
        assert_eq!(bootstrap_choice(&members, &reports, now, 500 * MS), None);
        // Not a member (no lease): not chosen either.
        reports.get_mut("p").unwrap().received_at = now;
        let mut no_members = members.clone();
        no_members.remove("p");
        assert_eq!(bootstrap_choice(&no_members, &reports, now, 500 * MS), None);
    }

    #[test]
    fn bootstrap_with_two_primaries_takes_the_furthest() {
        let (mut members, mut reports, now) = world();
        members.insert("q".to_string(), member("h:7", Role::Primary));
        reports.insert("q".to_string(), at(hb("q", Role::Primary, 9000), now));
        assert_eq!(
            bootstrap_choice(&members, &reports, now, 500 * MS).map(|c| c.0),
            Some("q".to_string())
        );
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sync_step_with_unknown_applied_set_keeps_the_record_a_superset() {
        assert_eq!(
            sync_step(&set(&["a", "b"]), None, &set(&["a"]), false),
            SyncStep::Apply {
                standbys: set(&["a"]),
                value: "ANY 1 (\"a\")".into()
            }
        );
        assert_eq!(
            sync_step(&set(&["a"]), None, &set(&["b"]), false),
            SyncStep::Record(set(&["a", "b"]))
        );
        assert_eq!(
            sync_step(&set(&["a"]), Some(&set(&["a"])), &set(&["a"]), false),
            SyncStep::InSync
        );
        let sync = SyncRecord {
            leader: "old".into(),
            epoch: Epoch(3),
            standbys: set(&["new", "b"]),
        };
        assert_eq!(recorded_standbys(Some(&sync), "new"), set(&["b"]));
        assert_eq!(recorded_standbys(None, "new"), set(&[]));
    }

    #[test]
    fn catch_up_requires_a_heartbeat_after_the_fence_without_streaming() {
        let t0 = Instant::now();
        let mut r = hb("c", Role::Replica, 100);
        r.receiver_streaming = true;
        let report = at(r.clone(), t0 + 10 * MS);
        assert!(!caught_up_after_fence(&report, t0));
        r.receiver_streaming = false;
        assert!(!caught_up_after_fence(&at(r.clone(), t0), t0 + 10 * MS));
        assert!(caught_up_after_fence(&at(r.clone(), t0 + 10 * MS), t0));
        r.replay_lsn = Some(Lsn(50));
        assert!(!caught_up_after_fence(&at(r, t0 + 10 * MS), t0));
    }

    #[test]
    fn switchover_final_position_waits_for_catch_up_then_falls_back() {
        let t0 = Instant::now();
        let fallback = 5000 * MS;
        let mut r = hb("c", Role::Replica, 100);
        r.receiver_streaming = true;
        let streaming = at(r.clone(), t0 + 10 * MS);
        r.receiver_streaming = false;
        let caught_up = at(r, t0 + 10 * MS);
        let now = t0 + 20 * MS;
        // Still streaming: wait.
        assert_eq!(
            switchover_final_lsn(t0, Some(Lsn(90)), Some(&streaming), now, fallback),
            None
        );
        // Caught up: the old primary's last position, else the candidate's.
        assert_eq!(
            switchover_final_lsn(t0, Some(Lsn(90)), Some(&caught_up), now, fallback),
            Some(Lsn(90))
        );
        assert_eq!(
            switchover_final_lsn(t0, None, Some(&caught_up), now, fallback),
            Some(Lsn(100))
        );
        // Not shown within the fallback time: the old primary's position, or zero.
        let late = t0 + fallback;
        assert_eq!(
            switchover_final_lsn(t0, Some(Lsn(90)), Some(&streaming), late, fallback),
            Some(Lsn(90))
        );
        assert_eq!(
            switchover_final_lsn(t0, None, None, late, fallback),
            Some(Lsn::ZERO)
        );
        assert_eq!(switchover_final_lsn(t0, None, None, now, fallback), None);
    }

    #[test]
    fn only_departed_and_long_silent_nodes_are_forgotten() {
        let (members, mut reports, now) = world();
        let forget_after = Duration::from_secs(60);
        reports.insert(
            "gone".to_string(),
            at(hb("gone", Role::Replica, 1), now - forget_after),
        );
        reports.insert(
            "recent".to_string(),
            at(
                hb("recent", Role::Replica, 1),
                now - Duration::from_secs(59),
            ),
        );
        // A member silent for long stays (its lease keeps it registered).
        reports.get_mut("r2").unwrap().received_at = now - Duration::from_secs(600);
        assert_eq!(
            forgotten_nodes(&members, &reports, now, forget_after),
            vec!["gone".to_string()]
        );
    }

    fn leader_p(epoch: u64) -> LeaderRecord {
        LeaderRecord {
            node: "p".into(),
            region: "r".into(),
            pg_addr: "10.0.0.1:5432".into(),
            epoch: Epoch(epoch),
            timeline: 1,
            state: LeaderState::Serving,
            since: 0,
            candidate: None,
        }
    }

    fn sync_record(leader: &str, epoch: u64, standbys: &[&str]) -> SyncRecord {
        SyncRecord {
            leader: leader.into(),
            epoch: Epoch(epoch),
            standbys: set(standbys),
        }
    }

    #[test]
    fn sync_change_records_before_applying_and_rewrites_a_stale_record() {
        let (members, reports, now) = world();
        let leader = leader_p(2);
        let on = ClusterConfig {
            sync_mode: SyncMode::On,
            ..ClusterConfig::default()
        };
        let off = ClusterConfig::default();
        let input = |config, record, applied| SyncInput {
            leader: &leader,
            members: &members,
            reports: &reports,
            config,
            record,
            applied,
            now,
        };
        // Asynchronous, nothing ever synchronous: nothing.
        assert_eq!(sync_change(&input(&off, None, None)), None);
        // On: the healthy standby r1 (streaming by address) is recorded first...
        assert_eq!(
            sync_change(&input(&on, None, None)),
            Some(SyncChange::Record(set(&["r1"])))
        );
        // ... then applied.
        let current = sync_record("p", 2, &["r1"]);
        assert_eq!(
            sync_change(&input(&on, Some(&current), None)),
            Some(SyncChange::Apply {
                standbys: set(&["r1"]),
                value: "ANY 1 (\"r1\")".into()
            })
        );
        let applied = set(&["r1"]);
        assert_eq!(
            sync_change(&input(&on, Some(&current), Some((&applied, Lsn(0))))),
            None
        );
        // In sync, but the record is the previous leader's: rewritten for this one.
        let stale = sync_record("old", 1, &["r1"]);
        assert_eq!(
            sync_change(&input(&on, Some(&stale), Some((&applied, Lsn(0))))),
            Some(SyncChange::Record(set(&["r1"])))
        );
        // Off again: the applied set is emptied.
        assert_eq!(
            sync_change(&input(&off, Some(&current), Some((&applied, Lsn(0))))),
            Some(SyncChange::Apply {
                standbys: set(&[]),
                value: String::new()
            })
        );
    }

    #[test]
    fn sync_change_keeps_a_removed_standby_recorded_until_one_remaining_caught_up() {
        let (mut members, mut reports, now) = world();
        members.insert("r3".to_string(), member("10.0.0.4:5432", Role::Replica));
        let mut r3 = hb("r3", Role::Replica, 4000);
        r3.receiver_streaming = true;
        r3.upstream = Some("p".into());
        reports.insert("r3".to_string(), at(r3, now - 10 * MS));
        reports.get_mut("r1").unwrap().heartbeat.pg_up = false;
        let leader = leader_p(2);
        let config = ClusterConfig {
            sync_mode: SyncMode::On,
            ..ClusterConfig::default()
        };
        let record = sync_record("p", 2, &["r1", "r3"]);
        let both = set(&["r1", "r3"]);
        let only_r3 = set(&["r3"]);
        let input = |applied| SyncInput {
            leader: &leader,
            members: &members,
            reports: &reports,
            config: &config,
            record: Some(&record),
            applied,
            now,
        };
        // r1 is down: the primary stops waiting for it first.
        assert_eq!(
            sync_change(&input(Some((&both, Lsn(0))))),
            Some(SyncChange::Apply {
                standbys: only_r3.clone(),
                value: "ANY 1 (\"r3\")".into()
            })
        );
        // r3 (flushed 4000) has not reached the primary's position at the change.
        assert_eq!(sync_change(&input(Some((&only_r3, Lsn(6000))))), None);
        // It has: r1 leaves the record.
        assert_eq!(
            sync_change(&input(Some((&only_r3, Lsn(3000))))),
            Some(SyncChange::Record(only_r3.clone()))
        );
        // The primary itself not heartbeating: nothing is decided.
        let mut silent = reports.clone();
        silent.get_mut("p").unwrap().received_at = now - Duration::from_secs(5);
        let input = SyncInput {
            reports: &silent,
            ..input(Some((&only_r3, Lsn(3000))))
        };
        assert_eq!(sync_change(&input), None);
    }

    #[test]
    fn status_names_states_and_lag() {
        let (members, mut reports, now) = world();
        reports.insert(
            "old".to_string(),
            at(hb("old", Role::Replica, 1), now - Duration::from_secs(2)),
        );
        let mut fenced_hb = hb("f", Role::Primary, 1);
        fenced_hb.pg_up = false;
        reports.insert("f".to_string(), at(fenced_hb, now));
        let leader = LeaderRecord {
            node: "p".into(),
            region: "r".into(),
            pg_addr: "10.0.0.1:5432".into(),
            epoch: Epoch(3),
            timeline: 1,
            state: LeaderState::Serving,
            since: 0,
            candidate: None,
        };
        let config = ClusterConfig::default();
        let fenced = set(&["f"]);
        let proxies = BTreeMap::new();
        let status = build_status(&StatusInput {
            cluster: "c",
            coordinator: "coord-1",
            active: true,
            leader: Some(&leader),
            epoch: Epoch(2),
            config: &config,
            sync: None,
            members: &members,
            proxies: &proxies,
            reports: &reports,
            fenced: &fenced,
            now,
        });
        assert_eq!(status.epoch, 3);
        assert_eq!(status.state, "serving");
        assert_eq!(status.leader.as_deref(), Some("p"));
        let node = |n: &str| status.nodes.iter().find(|s| s.name == n).unwrap().clone();
        assert_eq!(node("p").state, "running");
        assert_eq!(node("r1").state, "streaming");
        assert_eq!(node("r1").lag_bytes, Some(1000));
        assert_eq!(node("r2").state, "stopped");
        assert_eq!(node("old").state, "silent");
        assert!(!node("old").member);
        assert_eq!(node("f").state, "fenced");
        assert_eq!(node("p").last_heartbeat_ms, Some(50));
        assert_eq!(status.sync_mode, "off");

        // A standby coordinator has no heartbeats: members are "unknown", not "silent".
        let none = BTreeMap::new();
        let standby = build_status(&StatusInput {
            active: false,
            reports: &none,
            cluster: "c",
            coordinator: "coord-2",
            leader: Some(&leader),
            epoch: Epoch(3),
            config: &config,
            sync: None,
            members: &members,
            proxies: &proxies,
            fenced: &fenced,
            now,
        });
        assert!(!standby.active);
        assert!(standby.nodes.iter().all(|n| n.state == "unknown"));
        assert_eq!(standby.nodes.len(), members.len());
    }
}
