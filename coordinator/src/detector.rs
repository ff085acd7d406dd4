//! Failure detector for the primary (DESIGN §4), pure: inputs and `now` are passed in.
//!
//! It takes the agents' heartbeats (with their arrival time), the results of the
//! coordinator's own probe of the primary's PostgreSQL, and evaluates at `now`:
//!
//! * the primary is **suspect** when its agent has been silent for `suspect_after`
//!   (suspicion starts `suspect_after` after the last heartbeat arrived), or when its
//!   agent reports `pg_up = false` (suspicion starts at the first such heartbeat);
//! * a suspect primary is **failed** only when corroborated: the latest probe of the
//!   primary failed and was taken at or after the suspicion start, at least one
//!   replica is itself heartbeating (a witness: a coordinator that hears nobody knows
//!   nothing), and no heartbeating replica reports its WAL receiver streaming from
//!   the primary.
//!
//! So a dead agent on a healthy primary (probe ok, or replicas streaming) and a
//! coordinator cut off from the primary's region (probe ok, or other regions'
//! replicas still streaming) never produce `Failed`. Limits: the detector trusts the
//! agents' `receiver_streaming`, which PostgreSQL only clears when the replication
//! connection breaks or `wal_receiver_timeout` expires, so agents should run their
//! replicas with a short `wal_receiver_timeout`; it does not decide anything about
//! pausing, which is the caller's business.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meridian_shared::envelope::Heartbeat;
use meridian_shared::records::{ClusterConfig, Role};

/// The latest heartbeat of one node and when it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeReport {
    pub received_at: Instant,
    pub heartbeat: Heartbeat,
}

impl NodeReport {
    /// Whether the report is recent enough at `now` for the node to count as heartbeating.
    pub fn is_fresh(&self, now: Instant, suspect_after: Duration) -> bool {
        now.saturating_duration_since(self.received_at) < suspect_after
    }
}

/// Detector settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectorConfig {
    /// Silence after which a node is suspect (DESIGN default 500 ms).
    pub suspect_after: Duration,
}

impl From<&ClusterConfig> for DetectorConfig {
    fn from(config: &ClusterConfig) -> Self {
        DetectorConfig {
            suspect_after: config.suspect_after,
        }
    }
}

/// Why the primary is suspect (and, when corroborated, why it failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuspectCause {
    /// No heartbeat from the primary's agent for `suspect_after`.
    AgentSilent,
    /// The primary's agent reports that it cannot reach its PostgreSQL.
    PgDown,
}

/// Why a suspect primary is not (yet) declared failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// No probe result taken since the suspicion began.
    AwaitingProbe,
    /// The coordinator's own probe reached the primary's PostgreSQL.
    ProbeOk,
    /// This replica (itself heartbeating) still streams WAL from the primary.
    ReplicaStreaming { node: String },
    /// No replica is heartbeating, so nothing corroborates the failure.
    NoWitness,
}

/// The detector's judgement of the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No primary is known (nothing to fail over from).
    NoPrimary,
    Healthy,
    Suspect {
        cause: SuspectCause,
        since: Instant,
        hold: Hold,
    },
    Failed {
        reason: SuspectCause,
        since: Instant,
    },
}

impl Verdict {
    pub fn is_failed(&self) -> bool {
        matches!(self, Verdict::Failed { .. })
    }
}

/// Health of one node as seen through its agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeHealth {
    /// Heartbeating and PostgreSQL reachable.
    Up,
    /// Heartbeating, but the agent cannot reach its PostgreSQL.
    PgDown,
    /// No heartbeat for `suspect_after` (the node may be fine; its agent or the path is not).
    Silent { for_: Duration },
    /// Expected (it is the primary) but never heard from.
    Unknown,
}

/// One evaluation at `now`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub primary: Verdict,
    pub nodes: BTreeMap<String, NodeHealth>,
    /// Regions none of whose reporting nodes is heartbeating (a cut-off region,
    /// or a cut-off coordinator).
    pub silent_regions: BTreeSet<String>,
}

/// The primary being watched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedPrimary {
    pub node: String,
    /// `host:port` of its PostgreSQL (replicas may name their upstream by address).
    pub pg_addr: String,
    /// When the detector started watching it (stands in for a heartbeat never received).
    pub since: Instant,
}

/// One result of the coordinator's probe of the primary's PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub at: Instant,
    pub ok: bool,
}

/// The failure detector state.
#[derive(Clone, Debug)]
pub struct Detector {
    config: DetectorConfig,
    primary: Option<WatchedPrimary>,
    reports: BTreeMap<String, NodeReport>,
    pg_down_since: BTreeMap<String, Instant>,
    probe: Option<Probe>,
}

impl Detector {
    pub fn new(config: DetectorConfig) -> Self {
        Detector {
            config,
            primary: None,
            reports: BTreeMap::new(),
            pg_down_since: BTreeMap::new(),
            probe: None,
        }
    }

    /// Changes the settings (e.g. after a `config` update in etcd).
    pub fn set_config(&mut self, config: DetectorConfig) {
        self.config = config;
    }

    pub fn config(&self) -> DetectorConfig {
        self.config
    }

    /// Watches `node` as the primary from `now` on. Probe results of a previous
    /// primary are discarded; re-setting the same primary keeps everything.
    pub fn set_primary(&mut self, node: &str, pg_addr: &str, now: Instant) {
        let same = self
            .primary
            .as_ref()
            .is_some_and(|p| p.node == node && p.pg_addr == pg_addr);
        if !same {
            self.primary = Some(WatchedPrimary {
                node: node.to_string(),
                pg_addr: pg_addr.to_string(),
                since: now,
            });
            self.probe = None;
        }
    }

    /// Stops watching any primary (e.g. while a failover is under way).
    pub fn clear_primary(&mut self) {
        self.primary = None;
        self.probe = None;
    }

    pub fn primary(&self) -> Option<&WatchedPrimary> {
        self.primary.as_ref()
    }

    /// Records a heartbeat that arrived at `at`.
    pub fn observe_heartbeat(&mut self, at: Instant, heartbeat: Heartbeat) {
        if let Some(prev) = self.reports.get(&heartbeat.node) {
            // Out-of-order delivery (datagrams): keep the newest arrival.
            if prev.received_at > at {
                return;
            }
        }
        if heartbeat.pg_up {
            self.pg_down_since.remove(&heartbeat.node);
        } else {
            self.pg_down_since
                .entry(heartbeat.node.clone())
                .or_insert(at);
        }
        self.reports.insert(
            heartbeat.node.clone(),
            NodeReport {
                received_at: at,
                heartbeat,
            },
        );
    }

    /// Records the result of a probe of the primary's PostgreSQL taken at `at`.
    pub fn observe_probe(&mut self, at: Instant, ok: bool) {
        if self.probe.is_none_or(|p| p.at <= at) {
            self.probe = Some(Probe { at, ok });
        }
    }

    /// Forgets a node that left the cluster (its member key is gone for good).
    pub fn forget(&mut self, node: &str) {
        self.reports.remove(node);
        self.pg_down_since.remove(node);
    }

    /// The latest report of every node that has heartbeated.
    pub fn reports(&self) -> &BTreeMap<String, NodeReport> {
        &self.reports
    }

    /// Health of one node at `now`.
    pub fn node_health(&self, node: &str, now: Instant) -> NodeHealth {
        match self.reports.get(node) {
            None => NodeHealth::Unknown,
            Some(report) if !report.is_fresh(now, self.config.suspect_after) => {
                NodeHealth::Silent {
                    for_: now.saturating_duration_since(report.received_at),
                }
            }
            Some(report) if !report.heartbeat.pg_up => NodeHealth::PgDown,
            Some(_) => NodeHealth::Up,
        }
    }

    /// Evaluates the primary and every node at `now`.
    pub fn evaluate(&self, now: Instant) -> Evaluation {
        let mut nodes: BTreeMap<String, NodeHealth> = self
            .reports
            .keys()
            .map(|node| (node.clone(), self.node_health(node, now)))
            .collect();
        if let Some(primary) = &self.primary {
            nodes
                .entry(primary.node.clone())
                .or_insert(NodeHealth::Unknown);
        }
        let mut regions: BTreeMap<&str, bool> = BTreeMap::new();
        for report in self.reports.values() {
            let fresh = report.is_fresh(now, self.config.suspect_after);
            *regions
                .entry(report.heartbeat.region.as_str())
                .or_insert(false) |= fresh;
        }
        let silent_regions = regions
            .into_iter()
            .filter(|(_, any_fresh)| !any_fresh)
            .map(|(region, _)| region.to_string())
            .collect();
        Evaluation {
            primary: self.verdict(now),
            nodes,
            silent_regions,
        }
    }

    fn verdict(&self, now: Instant) -> Verdict {
        let Some(primary) = &self.primary else {
            return Verdict::NoPrimary;
        };
        let suspect_after = self.config.suspect_after;
        let report = self.reports.get(&primary.node);
        let last_seen = report.map_or(primary.since, |r| r.received_at.max(primary.since));
        let (cause, since) = if now.saturating_duration_since(last_seen) >= suspect_after {
            (SuspectCause::AgentSilent, last_seen + suspect_after)
        } else if let Some(down) = report
            .filter(|r| !r.heartbeat.pg_up)
            .and_then(|_| self.pg_down_since.get(&primary.node))
        {
            (SuspectCause::PgDown, *down)
        } else {
            return Verdict::Healthy;
        };
        let suspect = |hold| Verdict::Suspect { cause, since, hold };

        match self.probe {
            Some(probe) if probe.at >= since && !probe.ok => {}
            Some(probe) if probe.at >= since => return suspect(Hold::ProbeOk),
            _ => return suspect(Hold::AwaitingProbe),
        }
        let witnesses: Vec<&NodeReport> = self
            .reports
            .values()
            .filter(|r| r.heartbeat.node != primary.node)
            .filter(|r| r.heartbeat.role != Role::Primary)
            .filter(|r| r.is_fresh(now, suspect_after))
            .collect();
        if let Some(streaming) = witnesses
            .iter()
            .find(|r| r.heartbeat.streams_from(&primary.node, &primary.pg_addr))
        {
            return suspect(Hold::ReplicaStreaming {
                node: streaming.heartbeat.node.clone(),
            });
        }
        if witnesses.is_empty() {
            return suspect(Hold::NoWitness);
        }
        Verdict::Failed {
            reason: cause,
            since,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::epoch::Epoch;
    use meridian_shared::lsn::Lsn;

    const MS: Duration = Duration::from_millis(1);

    fn hb(node: &str, region: &str, role: Role) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            region: region.into(),
            seq: 1,
            sent_at_ms: 0,
            role,
            pg_up: true,
            timeline: 1,
            write_lsn: (role == Role::Primary).then_some(Lsn(1000)),
            flush_lsn: Some(Lsn(1000)),
            replay_lsn: None,
            receive_lsn: None,
            receiver_streaming: false,
            upstream: None,
            replay_lag_ms: None,
            epoch_seen: Epoch(1),
            invalidated_lsn: None,
        }
    }

    fn replica(node: &str, region: &str, streaming: bool) -> Heartbeat {
        Heartbeat {
            receiver_streaming: streaming,
            upstream: streaming.then(|| "p".to_string()),
            receive_lsn: Some(Lsn(1000)),
            ..hb(node, region, Role::Replica)
        }
    }

    /// Primary `p` in us-east; replicas `e2` (us-east), `w1` (us-west), `u1` (eu-west),
    /// all heartbeating every 100 ms up to `t0`, replicas streaming from `p`.
    struct World {
        det: Detector,
        t0: Instant,
    }

    impl World {
        fn new() -> Self {
            let start = Instant::now();
            let mut det = Detector::new(DetectorConfig {
                suspect_after: 500 * MS,
            });
            det.set_primary("p", "10.0.0.1:5432", start);
            let mut world = World { det, t0: start };
            for i in 0..=10 {
                let at = start + i * 100 * MS;
                world.beat_all(at, true, true);
            }
            world.t0 = start + 1000 * MS;
            world
        }

        fn beat_all(&mut self, at: Instant, primary: bool, streaming: bool) {
            if primary {
                self.det
                    .observe_heartbeat(at, hb("p", "us-east", Role::Primary));
            }
            self.beat_replicas(at, &["e2", "w1", "u1"], streaming);
        }

        fn beat_replicas(&mut self, at: Instant, which: &[&str], streaming: bool) {
            for (node, region) in [("e2", "us-east"), ("w1", "us-west"), ("u1", "eu-west")] {
                if which.contains(&node) {
                    self.det
                        .observe_heartbeat(at, replica(node, region, streaming));
                }
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
    }

    #[test]
    fn steady_state_is_healthy() {
        let w = World::new();
        let eval = w.det.evaluate(w.at(50));
        assert_eq!(eval.primary, Verdict::Healthy);
        assert!(eval.nodes.values().all(|h| *h == NodeHealth::Up));
        assert!(eval.silent_regions.is_empty());
    }

    #[test]
    fn silence_below_suspect_after_is_healthy_then_suspect() {
        let mut w = World::new();
        // Replicas keep beating, the primary's agent stops at t0.
        for i in 1..=6 {
            w.beat_replicas(w.at(i * 100), &["e2", "w1", "u1"], true);
        }
        assert_eq!(w.det.evaluate(w.at(499)).primary, Verdict::Healthy);
        match w.det.evaluate(w.at(500)).primary {
            Verdict::Suspect { cause, since, hold } => {
                assert_eq!(cause, SuspectCause::AgentSilent);
                assert_eq!(since, w.at(500));
                assert_eq!(hold, Hold::AwaitingProbe);
            }
            other => panic!("expected suspect, got {other:?}"),
        }
    }

    #[test]
    fn crashed_primary_fails_when_probe_fails_and_replicas_stopped_streaming() {
        let mut w = World::new();
        // Postgres and its agent die at t0; replicas' receivers disconnect.
        for i in 1..=7 {
            w.beat_replicas(w.at(i * 100), &["e2", "w1", "u1"], false);
        }
        // A failed probe from before the suspicion started does not count.
        w.det.observe_probe(w.at(200), false);
        assert!(matches!(
            w.det.evaluate(w.at(600)).primary,
            Verdict::Suspect {
                hold: Hold::AwaitingProbe,
                ..
            }
        ));
        w.det.observe_probe(w.at(650), false);
        assert_eq!(
            w.det.evaluate(w.at(700)).primary,
            Verdict::Failed {
                reason: SuspectCause::AgentSilent,
                since: w.at(500)
            }
        );
    }

    #[test]
    fn dead_agent_on_healthy_primary_probe_ok_is_not_failed() {
        let mut w = World::new();
        // Agent killed; Postgres fine, so replicas keep streaming and the probe succeeds.
        for i in 1..=20 {
            w.beat_replicas(w.at(i * 100), &["e2", "w1", "u1"], true);
            w.det.observe_probe(w.at(i * 100 + 10), true);
        }
        let verdict = w.det.evaluate(w.at(2000)).primary;
        assert!(
            matches!(
                verdict,
                Verdict::Suspect {
                    hold: Hold::ProbeOk,
                    ..
                }
            ),
            "{verdict:?}"
        );
        assert_eq!(
            w.det.evaluate(w.at(2000)).nodes["p"],
            NodeHealth::Silent { for_: 2000 * MS }
        );
    }

    #[test]
    fn dead_agent_with_replicas_streaming_is_not_failed_even_if_probe_fails() {
        let mut w = World::new();
        for i in 1..=20 {
            w.beat_replicas(w.at(i * 100), &["e2", "w1", "u1"], true);
        }
        // E.g. the coordinator's path to the primary's Postgres is broken.
        w.det.observe_probe(w.at(1900), false);
        let verdict = w.det.evaluate(w.at(2000)).primary;
        match verdict {
            Verdict::Suspect {
                hold: Hold::ReplicaStreaming { node },
                ..
            } => assert_eq!(node, "e2"),
            other => panic!("expected hold by a streaming replica, got {other:?}"),
        }
    }

    #[test]
    fn coordinator_cut_off_from_primary_region_probe_ok_is_not_failed() {
        let mut w = World::new();
        // All of us-east (p and e2) goes silent to the coordinator; the others beat on,
        // still streaming, and the probe (which takes another path) succeeds.
        for i in 1..=20 {
            w.beat_replicas(w.at(i * 100), &["w1", "u1"], true);
        }
        w.det.observe_probe(w.at(1950), true);
        let eval = w.det.evaluate(w.at(2000));
        assert!(matches!(
            eval.primary,
            Verdict::Suspect {
                hold: Hold::ProbeOk,
                ..
            }
        ));
        assert_eq!(eval.silent_regions, BTreeSet::from(["us-east".to_string()]));
        assert!(matches!(eval.nodes["e2"], NodeHealth::Silent { .. }));
    }

    #[test]
    fn coordinator_cut_off_from_primary_region_probe_failing_is_held_by_remote_replicas() {
        let mut w = World::new();
        for i in 1..=20 {
            w.beat_replicas(w.at(i * 100), &["w1", "u1"], true);
        }
        w.det.observe_probe(w.at(1950), false);
        let verdict = w.det.evaluate(w.at(2000)).primary;
        assert!(
            matches!(
                verdict,
                Verdict::Suspect {
                    hold: Hold::ReplicaStreaming { .. },
                    ..
                }
            ),
            "{verdict:?}"
        );
    }

    #[test]
    fn isolated_coordinator_hears_nobody_and_does_not_fail_over() {
        let mut w = World::new();
        w.det.observe_probe(w.at(900), false);
        let eval = w.det.evaluate(w.at(1000));
        assert_eq!(
            eval.primary,
            Verdict::Suspect {
                cause: SuspectCause::AgentSilent,
                since: w.at(500),
                hold: Hold::NoWitness
            }
        );
        assert_eq!(eval.silent_regions.len(), 3);
    }

    #[test]
    fn pg_down_reported_by_agent_fails_fast() {
        let mut w = World::new();
        let mut down = hb("p", "us-east", Role::Primary);
        down.pg_up = false;
        w.det.observe_heartbeat(w.at(100), down.clone());
        w.beat_replicas(w.at(100), &["e2", "w1", "u1"], true);
        // Replicas still report streaming from before the crash: held.
        w.det.observe_probe(w.at(120), false);
        assert!(matches!(
            w.det.evaluate(w.at(130)).primary,
            Verdict::Suspect {
                cause: SuspectCause::PgDown,
                hold: Hold::ReplicaStreaming { .. },
                ..
            }
        ));
        w.det.observe_heartbeat(w.at(200), down);
        w.beat_replicas(w.at(200), &["e2", "w1", "u1"], false);
        // Well below suspect_after: corroborated by agent, probe and replicas.
        assert_eq!(
            w.det.evaluate(w.at(210)).primary,
            Verdict::Failed {
                reason: SuspectCause::PgDown,
                since: w.at(100)
            }
        );
        assert_eq!(w.det.node_health("p", w.at(210)), NodeHealth::PgDown);
    }

    #[test]
    fn pg_down_with_probe_ok_is_not_failed_and_recovery_clears_suspicion() {
        let mut w = World::new();
        let mut down = hb("p", "us-east", Role::Primary);
        down.pg_up = false;
        w.det.observe_heartbeat(w.at(100), down);
        w.beat_replicas(w.at(100), &["e2", "w1", "u1"], false);
        w.det.observe_probe(w.at(150), true);
        assert!(matches!(
            w.det.evaluate(w.at(160)).primary,
            Verdict::Suspect {
                hold: Hold::ProbeOk,
                ..
            }
        ));
        w.det
            .observe_heartbeat(w.at(200), hb("p", "us-east", Role::Primary));
        assert_eq!(w.det.evaluate(w.at(210)).primary, Verdict::Healthy);
    }

    #[test]
    fn a_newer_ok_probe_overrides_an_older_failure_and_stale_results_are_ignored() {
        let mut w = World::new();
        for i in 1..=8 {
            w.beat_replicas(w.at(i * 100), &["e2", "w1", "u1"], false);
        }
        w.det.observe_probe(w.at(700), true);
        w.det.observe_probe(w.at(600), false); // arrives late, older: ignored
        assert!(matches!(
            w.det.evaluate(w.at(800)).primary,
            Verdict::Suspect {
                hold: Hold::ProbeOk,
                ..
            }
        ));
        w.det.observe_probe(w.at(750), false);
        assert!(w.det.evaluate(w.at(800)).primary.is_failed());
    }

    #[test]
    fn replicas_naming_upstream_by_address_count_as_streaming() {
        let mut w = World::new();
        for i in 1..=8 {
            let at = w.at(i * 100);
            let mut r = replica("w1", "us-west", true);
            r.upstream = Some("10.0.0.1:5432".into());
            w.det.observe_heartbeat(at, r);
        }
        w.det.observe_probe(w.at(790), false);
        assert!(matches!(
            w.det.evaluate(w.at(800)).primary,
            Verdict::Suspect {
                hold: Hold::ReplicaStreaming { .. },
                ..
            }
        ));
    }

    #[test]
    fn a_silent_replica_is_not_a_witness_for_streaming() {
        let mut w = World::new();
        // w1 last said "streaming" at t0 and then went silent; u1 beats, not streaming.
        for i in 1..=8 {
            w.beat_replicas(w.at(i * 100), &["u1"], false);
        }
        w.det.observe_probe(w.at(700), false);
        assert!(w.det.evaluate(w.at(800)).primary.is_failed());
    }

    #[test]
    fn primary_never_heard_from_becomes_suspect_after_watch_start() {
        let start = Instant::now();
        let mut det = Detector::new(DetectorConfig {
            suspect_after: 500 * MS,
        });
        assert_eq!(det.evaluate(start).primary, Verdict::NoPrimary);
        det.set_primary("p", "h:1", start);
        assert_eq!(det.evaluate(start + 400 * MS).primary, Verdict::Healthy);
        assert_eq!(
            det.evaluate(start + 400 * MS).nodes["p"],
            NodeHealth::Unknown
        );
        assert!(matches!(
            det.evaluate(start + 500 * MS).primary,
            Verdict::Suspect { .. }
        ));
    }

    #[test]
    fn changing_primary_discards_old_probe_results() {
        let mut w = World::new();
        w.det.observe_probe(w.at(600), false);
        w.det.set_primary("w1", "10.0.0.2:5432", w.at(600));
        w.det.set_primary("w1", "10.0.0.2:5432", w.at(650)); // same primary: no reset
        assert_eq!(w.det.primary().map(|p| p.since), Some(w.at(600)));
        for i in 7..=12 {
            w.beat_replicas(w.at(i * 100), &["e2", "u1"], false);
        }
        // w1 silent since t0 but watched only since 600: suspect at 1100, no probe yet.
        assert!(matches!(
            w.det.evaluate(w.at(1200)).primary,
            Verdict::Suspect {
                hold: Hold::AwaitingProbe,
                ..
            }
        ));
    }
}
