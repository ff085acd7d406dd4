//! Watching a serving primary, and the first leader of a new cluster.
//!
//! Bootstrap: with no `leader` key, the member heartbeating as a primary
//! ([`observe::bootstrap_choice`]) becomes the leader of the next epoch.
//! Steady state: the failure detector's verdict on the primary (probing it at
//! least every second, at once when suspect) either starts a failover plan, or,
//! when nobody can be promoted and its Postgres is down under a live agent,
//! restarts it as the primary; then the leader is told its epoch if it has not
//! recorded it, stragglers are re-pointed at it, and the synchronous set is kept.
//! Automatic failover waits while `paused`, and for the agents to reconnect to a
//! newly elected coordinator.

use std::time::{Duration, Instant};

use meridian_shared::records::{LeaderRecord, LeaderState, Role};
use tracing::{debug, info};

use super::term::committed;
use super::{unix_ms, Active, Shell};
use crate::commands::CommandSpec;
use crate::detector::{Hold, SuspectCause, Verdict};
use crate::observe;
use crate::planner::{reconcile_followers, Action, PlanKind};
use crate::store;

/// The primary is probed at least this often even when not suspect.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Time agents get to reconnect to a newly elected coordinator before silence counts.
pub(super) const RECONNECT_GRACE: Duration = Duration::from_secs(1);

impl Active {
    /// Publishes the first leader, then asks it to record its epoch.
    pub(super) async fn bootstrap(&mut self, shell: &mut Shell) {
        let now = Instant::now();
        let suspect_after = self.snap.config.suspect_after;
        let Some((node, timeline)) = observe::bootstrap_choice(
            &self.snap.members,
            self.detector.reports(),
            now,
            suspect_after,
        ) else {
            return;
        };
        let Some(member) = self.snap.members.get(&node) else {
            return;
        };
        let epoch = self.snap.epoch.next();
        let record = LeaderRecord {
            node: node.clone(),
            region: member.region.clone(),
            pg_addr: member.pg_addr.clone(),
            epoch,
            timeline,
            state: LeaderState::Serving,
            since: unix_ms(),
            candidate: None,
        };
        let outcome =
            store::write_epoch_and_leader(&mut shell.etcd, &shell.keys, &self.snap, epoch, &record)
                .await;
        if committed("bootstrap", outcome) {
            shell.event(
                "leader_published",
                Some(&node),
                epoch,
                "bootstrap: first leader".into(),
            );
            self.ensure(
                &node,
                CommandSpec::Promote {
                    epoch,
                    old_fenced: true,
                },
            );
        }
        self.refresh(shell).await;
    }

    /// One tick with `leader` serving.
    pub(super) async fn steady(&mut self, shell: &mut Shell, leader: &LeaderRecord) {
        let now = Instant::now();
        // Right after an election the agents are still reconnecting (backoff up to
        // 1 s): watch a primary not heard from yet as if heard at the end of that.
        let watch_from = now.max(self.elected_at + RECONNECT_GRACE);
        self.detector
            .set_primary(&leader.node, &leader.pg_addr, watch_from);
        let eval = self.detector.evaluate(now);
        let suspect = matches!(
            eval.primary,
            Verdict::Suspect { .. } | Verdict::Failed { .. }
        );
        if !self.probe_inflight
            && (suspect
                || self
                    .last_probe
                    .is_none_or(|t| now.saturating_duration_since(t) >= PROBE_EVERY))
        {
            self.start_probe(&leader.pg_addr, shell.settings.probe_timeout);
        }
        match &eval.primary {
            Verdict::Healthy | Verdict::NoPrimary => self.suspect_since = None,
            Verdict::Suspect { cause, since, hold } => {
                if self.suspect_since != Some(*since) {
                    self.suspect_since = Some(*since);
                    shell.event(
                        "suspect",
                        Some(&leader.node),
                        leader.epoch,
                        format!("{cause:?}"),
                    );
                }
                if let Hold::ProbeOk | Hold::ReplicaStreaming { .. } | Hold::NoWitness = hold {
                    let key = format!("hold:{}", leader.node);
                    self.event_limited(
                        shell,
                        &key,
                        "suspect_held",
                        Some(&leader.node),
                        leader.epoch,
                        format!("not failing over: {hold:?}"),
                    );
                }
                // Postgres crashed under a live agent and no other node is there to
                // take over (no replica heartbeats): restart it as the primary.
                let down_long_enough =
                    now.saturating_duration_since(*since) >= self.snap.config.suspect_after;
                if *cause == SuspectCause::PgDown
                    && *hold == Hold::NoWitness
                    && down_long_enough
                    && !self.snap.config.paused
                {
                    self.restart_old_primary(leader, now);
                }
            }
            Verdict::Failed { reason, .. } => {
                if self.snap.config.paused {
                    let key = format!("paused:{}", leader.node);
                    self.event_limited(
                        shell,
                        &key,
                        "failover_paused",
                        Some(&leader.node),
                        leader.epoch,
                        format!("primary failed ({reason:?}) but automatic failover is paused"),
                    );
                } else if self.within_election_grace(now) {
                    debug!("primary looks failed; still within the election grace period");
                } else {
                    match self.choose(leader, None, false) {
                        Ok(candidate) => {
                            info!(old = %leader.node, candidate = %candidate.node.node, ?reason, "primary failed; failing over");
                            self.start_plan(PlanKind::Failover, leader, candidate, None);
                            self.advance_plan(shell).await;
                            return;
                        }
                        Err(e) => {
                            self.no_candidate(shell, leader, e.to_string());
                            self.restart_old_primary(leader, now);
                        }
                    }
                }
            }
        }

        // The leader records its epoch (bootstrap's Promote{1}, re-sent if lost).
        if self
            .fresh_heartbeat(&leader.node, now)
            .is_some_and(|hb| hb.pg_up && hb.role == Role::Primary && hb.epoch_seen < leader.epoch)
        {
            self.promote_leader(leader);
        }

        let nodes = self.node_observations(now);
        if let Some(Action::SendFollow {
            nodes,
            leader: to,
            pg_addr,
            epoch,
        }) = reconcile_followers(leader, &nodes)
        {
            self.send_follows(shell, &nodes, &to, &pg_addr, epoch);
        }
        self.manage_sync(shell, leader).await;
    }

    /// Nobody can be promoted and the old primary's Postgres is down under a live
    /// agent: ask it to start Postgres again as the primary of the current epoch.
    fn restart_old_primary(&mut self, leader: &LeaderRecord, now: Instant) {
        if self
            .fresh_heartbeat(&leader.node, now)
            .is_some_and(|hb| !hb.pg_up)
        {
            self.promote_leader(leader);
        }
    }

    /// `Promote` to the leader in its own epoch (idempotent on the agent).
    fn promote_leader(&mut self, leader: &LeaderRecord) {
        self.ensure(
            &leader.node,
            CommandSpec::Promote {
                epoch: leader.epoch,
                old_fenced: true,
            },
        );
    }

    /// Probes the primary's Postgres in the background; the result arrives on
    /// `probe_rx`.
    fn start_probe(&mut self, pg_addr: &str, timeout: Duration) {
        let at = Instant::now();
        self.probe_inflight = true;
        self.last_probe = Some(at);
        let tx = self.probe_tx.clone();
        let addr = pg_addr.to_string();
        tokio::spawn(async move {
            let ok = crate::probe::probe(&addr, timeout).await;
            let _ = tx.send((at, ok));
        });
    }
}
