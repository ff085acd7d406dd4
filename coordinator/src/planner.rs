//! Failover planning, pure: which replica to promote, and the failover sequence of
//! DESIGN §4 as a resumable state machine.
//!
//! [`choose_candidate`] picks the healthy replica with the highest WAL position,
//! breaking ties by `region_priority`, then the member's `priority` tag, then name;
//! it skips `nofailover` members, replicas on an older timeline, and (unless the
//! operator forces a named node) replicas lagging more than `max_failover_lag`
//! behind the best known primary position. In synchronous mode it only considers
//! members of the recorded synchronous set (the `sync` key) and refuses to choose
//! unless every member of that set is observed, because with `ANY 1 (...)` an
//! acknowledged commit is guaranteed on *one* of them only.
//!
//! The candidate is chosen when the plan is made and written into the
//! `failing_over` leader record, so that a newly elected coordinator finishes the
//! same failover rather than choosing again (two promotions in one epoch). In an
//! automatic failover the detector only fires once no replica streams from the old
//! primary, so the replicas' positions are final at that point; a switchover
//! additionally waits for the target to catch up with the fenced primary.
//!
//! [`FailoverPlan`] holds the intent; [`Observations`] are what the I/O shell last
//! saw in etcd and from the agents; [`next_action`] says what to do next. Steps only
//! move forward, each is complete when observations prove it (so every action is
//! idempotent and may be repeated), and a plan whose epoch is overtaken is abandoned.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Instant;

use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;
use meridian_shared::records::{
    ClusterConfig, LeaderRecord, LeaderState, MemberRecord, NodeRef, Role, SyncMode,
};

use crate::detector::NodeReport;

/// What the planner knows besides members and heartbeats.
#[derive(Clone, Debug)]
pub struct ChoiceContext<'a> {
    pub now: Instant,
    /// The primary being replaced (never a candidate).
    pub old_primary: &'a str,
    /// The best known WAL position of the old primary (lag reference), if any.
    pub primary_lsn: Option<Lsn>,
    /// The cluster's current timeline; replicas reporting an older one are skipped.
    pub timeline: Option<u32>,
    /// The recorded synchronous standby set (`sync` key); used when `sync_mode` is not `off`.
    pub sync_standbys: Option<&'a BTreeSet<String>>,
}

/// The chosen replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeRef,
    /// Its furthest known WAL position.
    pub position: Lsn,
    /// Bytes behind the best known primary position.
    pub lag_bytes: u64,
    pub timeline: u32,
}

/// Why one node was not chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    OldPrimary,
    NotForced,
    /// Heartbeating, but not in `members/` (its lease expired or it never registered).
    NotAMember,
    NoHeartbeat,
    Silent,
    PgDown,
    NotReplica(Role),
    NoFailoverTag,
    NoPosition,
    OldTimeline {
        timeline: u32,
        current: u32,
    },
    Lagging {
        lag_bytes: u64,
        max: u64,
    },
    NotSyncStandby,
    /// A member of the synchronous set is not observed: it may hold commits the others lack.
    SyncStandbyUnobserved,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::OldPrimary => write!(f, "is the old primary"),
            Rejection::NotForced => write!(f, "not the requested node"),
            Rejection::NotAMember => write!(f, "no member record"),
            Rejection::NoHeartbeat => write!(f, "no heartbeat"),
            Rejection::Silent => write!(f, "heartbeats stopped"),
            Rejection::PgDown => write!(f, "postgres down"),
            Rejection::NotReplica(role) => write!(f, "role is {role:?}"),
            Rejection::NoFailoverTag => write!(f, "tagged nofailover"),
            Rejection::NoPosition => write!(f, "no WAL position reported"),
            Rejection::OldTimeline { timeline, current } => {
                write!(f, "on timeline {timeline}, cluster is on {current}")
            }
            Rejection::Lagging { lag_bytes, max } => {
                write!(f, "{lag_bytes} bytes behind (max_failover_lag {max})")
            }
            Rejection::NotSyncStandby => write!(f, "not a synchronous standby"),
            Rejection::SyncStandbyUnobserved => {
                write!(
                    f,
                    "synchronous standby not observed; promoting another could lose commits"
                )
            }
        }
    }
}

/// No node can be promoted; `reasons` says why for each node considered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no failover candidate: {}", describe(.reasons))]
pub struct NoCandidate {
    pub reasons: Vec<(String, Rejection)>,
}

fn describe(reasons: &[(String, Rejection)]) -> String {
    if reasons.is_empty() {
        return "no replicas".to_string();
    }
    reasons
        .iter()
        .map(|(node, why)| format!("{node}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Chooses the replica to promote. `forced` names the operator's target
/// (`failover --to NODE --force`): only that node is considered, and the lag limit
/// and the synchronous-set restriction are waived; health and `nofailover` are not.
pub fn choose_candidate(
    members: &BTreeMap<String, MemberRecord>,
    heartbeats: &BTreeMap<String, NodeReport>,
    config: &ClusterConfig,
    ctx: &ChoiceContext<'_>,
    forced: Option<&str>,
) -> Result<Candidate, NoCandidate> {
    let mut reasons = Vec::new();
    let names: BTreeSet<&String> = members.keys().chain(heartbeats.keys()).collect();

    let sync_set = match (config.sync_mode, ctx.sync_standbys, forced) {
        (SyncMode::Off, _, _) | (_, _, Some(_)) => None,
        (_, Some(set), None) if !set.is_empty() => Some(set),
        _ => None,
    };

    let reference = heartbeats
        .get(ctx.old_primary)
        .and_then(|r| r.heartbeat.position())
        .into_iter()
        .chain(ctx.primary_lsn)
        .max();

    let mut eligible = Vec::new();
    for name in names {
        let rejection = if name == ctx.old_primary {
            Some(Rejection::OldPrimary)
        } else if forced.is_some_and(|f| f != name) {
            Some(Rejection::NotForced)
        } else {
            match health(name, members, heartbeats, config, ctx) {
                Err(why) => Some(why),
                Ok((member, report, position)) => {
                    if sync_set.is_some_and(|set| !set.contains(name)) {
                        Some(Rejection::NotSyncStandby)
                    } else {
                        eligible.push((name.clone(), member, report, position));
                        None
                    }
                }
            }
        };
        if let Some(why) = rejection {
            reasons.push((name.clone(), why));
        }
    }

    if let Some(set) = sync_set {
        let unobserved: Vec<&String> = set
            .iter()
            .filter(|s| !eligible.iter().any(|(name, ..)| name == *s))
            .filter(|s| s.as_str() != ctx.old_primary)
            .collect();
        if !unobserved.is_empty() {
            // Only the whole set together is guaranteed to hold every acknowledged commit.
            for (name, ..) in eligible.drain(..) {
                reasons.push((name, Rejection::SyncStandbyUnobserved));
            }
            for name in unobserved {
                if !reasons.iter().any(|(n, _)| n == name) {
                    reasons.push((name.clone(), Rejection::SyncStandbyUnobserved));
                }
            }
        }
    }

    let best_position = eligible.iter().map(|(.., pos)| *pos).max();
    let reference = reference
        .into_iter()
        .chain(best_position)
        .max()
        .unwrap_or(Lsn::ZERO);

    let mut ranked = Vec::new();
    for (name, member, report, position) in eligible {
        let lag_bytes = reference.saturating_sub(position);
        if forced.is_none() && lag_bytes > config.max_failover_lag {
            reasons.push((
                name,
                Rejection::Lagging {
                    lag_bytes,
                    max: config.max_failover_lag,
                },
            ));
            continue;
        }
        ranked.push((name, member, report, position, lag_bytes));
    }

    ranked.sort_by(|a, b| {
        b.3.cmp(&a.3)
            .then_with(|| {
                config
                    .region_rank(&a.1.region)
                    .cmp(&config.region_rank(&b.1.region))
            })
            .then_with(|| b.1.tags.priority.cmp(&a.1.tags.priority))
            .then_with(|| a.0.cmp(&b.0))
    });
    match ranked.into_iter().next() {
        Some((name, member, report, position, lag_bytes)) => Ok(Candidate {
            node: NodeRef {
                node: name,
                region: member.region.clone(),
                pg_addr: member.pg_addr.clone(),
            },
            position,
            lag_bytes,
            timeline: report.heartbeat.timeline,
        }),
        None => Err(NoCandidate { reasons }),
    }
}

fn health<'m>(
    name: &str,
    members: &'m BTreeMap<String, MemberRecord>,
    heartbeats: &'m BTreeMap<String, NodeReport>,
    config: &ClusterConfig,
    ctx: &ChoiceContext<'_>,
) -> Result<(&'m MemberRecord, &'m NodeReport, Lsn), Rejection> {
    let member = members.get(name).ok_or(Rejection::NotAMember)?;
    let report = heartbeats.get(name).ok_or(Rejection::NoHeartbeat)?;
    if member.tags.nofailover {
        return Err(Rejection::NoFailoverTag);
    }
    if !report.is_fresh(ctx.now, config.suspect_after) {
        return Err(Rejection::Silent);
    }
    let hb = &report.heartbeat;
    if !hb.pg_up {
        return Err(Rejection::PgDown);
    }
    if hb.role != Role::Replica {
        return Err(Rejection::NotReplica(hb.role));
    }
    if let Some(current) = ctx.timeline {
        if hb.timeline < current {
            return Err(Rejection::OldTimeline {
                timeline: hb.timeline,
                current,
            });
        }
    }
    let position = hb.position().ok_or(Rejection::NoPosition)?;
    Ok((member, report, position))
}

/// Why the operator's `failover --to NODE` is refused without `--force`, once
/// NODE was chosen (forcing waived the lag limit and the synchronous set).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unforced {
    #[error("{node} is {lag_bytes} bytes behind (max_failover_lag {max}); use --force to accept the loss")]
    Lagging {
        node: String,
        lag_bytes: u64,
        max: u64,
    },
    #[error(
        "{node} is not a synchronous standby (sync_mode is on); use --force to accept the loss"
    )]
    NotSynchronous { node: String },
}

/// Checks a candidate chosen for `failover --to to` as if it had not been forced:
/// within `max_failover_lag`, and, in synchronous mode with a non-empty recorded
/// set (`sync_standbys`), a member of it.
pub fn check_unforced(
    to: &str,
    candidate: &Candidate,
    config: &ClusterConfig,
    sync_standbys: Option<&BTreeSet<String>>,
) -> Result<(), Unforced> {
    if candidate.lag_bytes > config.max_failover_lag {
        return Err(Unforced::Lagging {
            node: to.to_string(),
            lag_bytes: candidate.lag_bytes,
            max: config.max_failover_lag,
        });
    }
    let keeps_sync = config.sync_mode == SyncMode::Off
        || sync_standbys.is_none_or(|set| set.is_empty() || set.contains(&candidate.node.node));
    if !keeps_sync {
        return Err(Unforced::NotSynchronous {
            node: to.to_string(),
        });
    }
    Ok(())
}

/// Automatic failover or planned switchover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanKind {
    Failover,
    /// The old primary is alive: after fencing it, wait for the target to reach its
    /// final position before promoting (zero loss).
    Switchover,
}

/// The steps of DESIGN §4, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// Write `leader.state = failing_over` and bump `epoch` (one etcd transaction).
    MarkFailingOver,
    /// The old primary's agent confirms `Fence`, or its lease expires.
    AwaitFence,
    /// The candidate runs `pg_promote()` and records the epoch.
    Promote,
    /// Write `leader` = candidate, `state = serving` (etcd transaction).
    PublishLeader,
    /// `Follow` to every other replica.
    RepointReplicas,
    Done,
}

/// A failover in progress (the intent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverPlan {
    pub kind: PlanKind,
    /// The epoch this failover establishes.
    pub epoch: Epoch,
    pub old: NodeRef,
    /// Timeline of the old primary (the published timeline if the candidate's is unknown is this + 1).
    pub old_timeline: u32,
    pub candidate: NodeRef,
    pub step: Step,
}

/// A `failing_over` leader record cannot be resumed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error("leader record is serving; nothing to resume")]
    NotFailingOver,
    #[error("failing_over leader record names no candidate; choose one and start a new plan")]
    NoCandidate,
}

impl FailoverPlan {
    /// A new plan replacing `old` by `candidate`, establishing the epoch after `current`.
    pub fn new(
        kind: PlanKind,
        current: Epoch,
        old: NodeRef,
        old_timeline: u32,
        candidate: NodeRef,
    ) -> Self {
        FailoverPlan {
            kind,
            epoch: current.next(),
            old,
            old_timeline,
            candidate,
            step: Step::MarkFailingOver,
        }
    }

    /// The plan a newly elected coordinator resumes from a `failing_over` record.
    /// It starts at the first step; [`next_action`] skips what observations prove done.
    /// A resumed plan is treated as a failover (a half-done switchover is finished
    /// as a failover, which still never promotes before the old primary is fenced).
    pub fn resume(leader: &LeaderRecord) -> Result<Self, ResumeError> {
        if leader.state != LeaderState::FailingOver {
            return Err(ResumeError::NotFailingOver);
        }
        let candidate = leader.candidate.clone().ok_or(ResumeError::NoCandidate)?;
        Ok(FailoverPlan {
            kind: PlanKind::Failover,
            epoch: leader.epoch,
            old: NodeRef {
                node: leader.node.clone(),
                region: leader.region.clone(),
                pg_addr: leader.pg_addr.clone(),
            },
            old_timeline: leader.timeline,
            candidate,
            step: Step::MarkFailingOver,
        })
    }

    /// The leader record written by step 1.
    pub fn failing_over_record(&self, now_ms: u64) -> LeaderRecord {
        LeaderRecord {
            node: self.old.node.clone(),
            region: self.old.region.clone(),
            pg_addr: self.old.pg_addr.clone(),
            epoch: self.epoch,
            timeline: self.old_timeline,
            state: LeaderState::FailingOver,
            since: now_ms,
            candidate: Some(self.candidate.clone()),
        }
    }

    /// The leader record written by step 5.
    pub fn serving_record(&self, timeline: u32, now_ms: u64) -> LeaderRecord {
        LeaderRecord {
            node: self.candidate.node.clone(),
            region: self.candidate.region.clone(),
            pg_addr: self.candidate.pg_addr.clone(),
            epoch: self.epoch,
            timeline,
            state: LeaderState::Serving,
            since: now_ms,
            candidate: None,
        }
    }

    /// Moves the plan to the step observations justify and returns what to do next.
    pub fn advance(&mut self, obs: &Observations) -> Action {
        let (step, action) = decide(self, obs);
        self.step = step;
        action
    }
}

/// One node as the shell last saw it (from its heartbeats and acks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeObservation {
    /// Heartbeating (fresh report) and its PostgreSQL up.
    pub healthy: bool,
    /// Its agent is heartbeating (fresh report), whether or not its PostgreSQL is up:
    /// it can receive commands (`Fence`, `Follow`).
    pub reachable: bool,
    pub role: Role,
    pub epoch_seen: Epoch,
    pub timeline: u32,
    /// The node its WAL receiver streams from, when streaming.
    pub streaming_from: Option<String>,
    pub position: Option<Lsn>,
}

/// What the shell observed, gathered just before asking for the next action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observations {
    /// Unix ms, for the records' `since`.
    pub now_ms: u64,
    /// Value of the `epoch` key.
    pub stored_epoch: Epoch,
    /// Value of the `leader` key.
    pub leader: Option<LeaderRecord>,
    /// The old primary's agent acknowledged `Fence` with this plan's epoch (or higher).
    pub fence_acked: bool,
    /// The candidate's agent acknowledged `Promote` with this plan's epoch (or
    /// higher): it runs as primary and carries the epoch (the agent acknowledges
    /// only then), which its next heartbeat would also show.
    pub promote_acked: bool,
    /// The old primary's `members/<node>` key still exists (its lease is alive).
    pub old_lease_alive: bool,
    /// The old primary's WAL position after it was fenced (needed by a switchover).
    pub old_final_lsn: Option<Lsn>,
    pub nodes: BTreeMap<String, NodeObservation>,
}

/// Why a plan is given up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AbandonReason {
    /// etcd holds a higher epoch: another coordinator has moved on.
    Superseded { stored: Epoch },
    /// etcd holds this epoch with a different candidate.
    Conflict { candidate: Option<String> },
}

/// What the shell should do next (idempotent; it may repeat it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// In one etcd txn, guarded by the leader's `mod_revision` and by the stored epoch
    /// not exceeding `epoch`: set `epoch` = `epoch` and `leader` = `record`.
    WriteLeaderFailingOver {
        epoch: Epoch,
        record: LeaderRecord,
    },
    /// Send `Fence { epoch }` to the old primary's agent and wait for its ack.
    SendFence {
        node: String,
        epoch: Epoch,
    },
    /// The old primary's agent is unreachable: wait for its lease to expire
    /// (the agent fences its own Postgres before that).
    WaitLeaseExpiry {
        node: String,
    },
    /// Switchover: wait until the candidate reached the fenced primary's final position.
    AwaitCatchUp {
        node: String,
        target: Option<Lsn>,
    },
    /// Send `Promote { epoch }` to the candidate and wait until it reports primary at `epoch`.
    /// `old_fenced`: the old primary's agent acknowledged `Fence` (else the
    /// candidate outwaits the failsafe confirmations it may have given).
    SendPromote {
        node: String,
        epoch: Epoch,
        old_fenced: bool,
    },
    /// Write `record` to `leader` by etcd txn (comparing the leader's `mod_revision`).
    PublishLeader {
        record: LeaderRecord,
    },
    /// Send `Follow` to `nodes`.
    SendFollow {
        nodes: Vec<String>,
        leader: String,
        pg_addr: String,
        epoch: Epoch,
    },
    /// The candidate became unavailable before its promotion was confirmed: choose
    /// another and start a new plan (with a higher epoch, fencing this one's).
    Replan {
        lost: String,
    },
    Abandon(AbandonReason),
    Done,
}

/// What to do next for `plan` given `obs` (pure).
pub fn next_action(plan: &FailoverPlan, obs: &Observations) -> Action {
    decide(plan, obs).1
}

fn decide(plan: &FailoverPlan, obs: &Observations) -> (Step, Action) {
    let epoch = plan.epoch;
    let cand = &plan.candidate.node;
    let mut step = plan.step;
    if step == Step::Done {
        return (step, Action::Done);
    }

    let leader_epoch = obs.leader.as_ref().map(|l| l.epoch);
    let highest = obs.stored_epoch.max(leader_epoch.unwrap_or(Epoch::ZERO));
    if highest > epoch {
        return (
            step,
            Action::Abandon(AbandonReason::Superseded { stored: highest }),
        );
    }
    if let Some(leader) = obs.leader.as_ref().filter(|l| l.epoch == epoch) {
        let theirs = match leader.state {
            LeaderState::FailingOver => leader.candidate.as_ref().map(|c| c.node.clone()),
            LeaderState::Serving => Some(leader.node.clone()),
        };
        if theirs.as_deref() != Some(cand.as_str()) {
            return (
                step,
                Action::Abandon(AbandonReason::Conflict { candidate: theirs }),
            );
        }
    }

    let marked = obs.stored_epoch == epoch && leader_epoch == Some(epoch);
    let published = obs
        .leader
        .as_ref()
        .is_some_and(|l| l.state == LeaderState::Serving && l.node == *cand && l.epoch == epoch);
    let cand_obs = obs.nodes.get(cand);
    let promoted = published
        || obs.promote_acked
        || cand_obs.is_some_and(|n| n.role == Role::Primary && n.epoch_seen >= epoch);
    let fenced = promoted || obs.fence_acked || !obs.old_lease_alive;

    if step == Step::MarkFailingOver && marked {
        step = Step::AwaitFence;
    }
    if step == Step::AwaitFence && fenced {
        step = Step::Promote;
    }
    if step == Step::Promote && promoted {
        step = Step::PublishLeader;
    }
    if step == Step::PublishLeader && published {
        step = Step::RepointReplicas;
    }
    let pending = pending_followers(plan, obs);
    let awaited = pending.iter().any(|n| *n != plan.old.node);
    if step == Step::RepointReplicas && !awaited {
        step = Step::Done;
    }

    let action = match step {
        Step::MarkFailingOver => Action::WriteLeaderFailingOver {
            epoch,
            record: plan.failing_over_record(obs.now_ms),
        },
        Step::AwaitFence => {
            // The agent, not its Postgres, must be reachable: a crashed postmaster under
            // a live agent keeps its lease alive, so only a Fence ack can prove fencing.
            let old_reachable = obs.nodes.get(&plan.old.node).is_some_and(|n| n.reachable);
            if old_reachable || plan.kind == PlanKind::Switchover {
                Action::SendFence {
                    node: plan.old.node.clone(),
                    epoch,
                }
            } else {
                Action::WaitLeaseExpiry {
                    node: plan.old.node.clone(),
                }
            }
        }
        Step::Promote => match cand_obs {
            Some(n) if n.healthy => {
                let caught_up = match (plan.kind, obs.old_final_lsn, n.position) {
                    (PlanKind::Failover, ..) => true,
                    (PlanKind::Switchover, Some(target), Some(pos)) => pos >= target,
                    (PlanKind::Switchover, ..) => false,
                };
                if caught_up {
                    Action::SendPromote {
                        node: cand.clone(),
                        epoch,
                        old_fenced: obs.fence_acked,
                    }
                } else {
                    Action::AwaitCatchUp {
                        node: cand.clone(),
                        target: obs.old_final_lsn,
                    }
                }
            }
            _ => Action::Replan { lost: cand.clone() },
        },
        Step::PublishLeader => {
            let timeline = cand_obs
                .map(|n| n.timeline)
                .filter(|t| *t > plan.old_timeline)
                .unwrap_or(plan.old_timeline + 1);
            Action::PublishLeader {
                record: plan.serving_record(timeline, obs.now_ms),
            }
        }
        Step::RepointReplicas => Action::SendFollow {
            nodes: pending,
            leader: cand.clone(),
            pg_addr: plan.candidate.pg_addr.clone(),
            epoch,
        },
        Step::Done => Action::Done,
    };
    (step, action)
}

/// Reachable nodes (agent heartbeating, Postgres up or not: a crashed former
/// primary is rebuilt by its agent on `Follow`) other than the candidate that do
/// not yet follow it in this epoch.
/// The old primary is told to follow too but not waited for (it may need a rewind;
/// its agent also rejoins by itself when it sees it is not the leader of the epoch).
fn pending_followers(plan: &FailoverPlan, obs: &Observations) -> Vec<String> {
    not_following(&plan.candidate.node, plan.epoch, &obs.nodes)
}

fn not_following(
    leader: &str,
    epoch: Epoch,
    nodes: &BTreeMap<String, NodeObservation>,
) -> Vec<String> {
    nodes
        .iter()
        .filter(|(name, _)| name.as_str() != leader)
        .filter(|(_, n)| n.reachable)
        .filter(|(_, n)| {
            !(n.role == Role::Replica
                && n.epoch_seen >= epoch
                && n.streaming_from.as_deref() == Some(leader))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Steady state (no failover in progress): `Follow` for every reachable node that
/// does not stream from the serving leader in its epoch, e.g. replicas a crashed
/// coordinator had not re-pointed yet, or a former primary that came back.
/// `None` while the leader is not serving or everyone follows.
pub fn reconcile_followers(
    leader: &LeaderRecord,
    nodes: &BTreeMap<String, NodeObservation>,
) -> Option<Action> {
    if !leader.is_serving() {
        return None;
    }
    let pending = not_following(&leader.node, leader.epoch, nodes);
    (!pending.is_empty()).then(|| Action::SendFollow {
        nodes: pending,
        leader: leader.node.clone(),
        pg_addr: leader.pg_addr.clone(),
        epoch: leader.epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::envelope::Heartbeat;
    use meridian_shared::records::MemberTags;
    use std::time::Duration;

    // ---------- candidate choice ----------

    fn member(region: &str) -> MemberRecord {
        MemberRecord {
            region: region.into(),
            pg_addr: format!("{region}:5432"),
            agent_addr: format!("{region}:7000"),
            role: Role::Replica,
            tags: MemberTags::default(),
            version: None,
            pg_addrs: Default::default(),
        }
    }

    fn report(node: &str, region: &str, role: Role, lsn: u64, at: Instant) -> NodeReport {
        NodeReport {
            received_at: at,
            heartbeat: Heartbeat {
                node: node.into(),
                region: region.into(),
                seq: 1,
                sent_at_ms: 0,
                role,
                pg_up: true,
                timeline: 1,
                write_lsn: (role == Role::Primary).then_some(Lsn(lsn)),
                flush_lsn: Some(Lsn(lsn)),
                replay_lsn: Some(Lsn(lsn)),
                receive_lsn: (role == Role::Replica).then_some(Lsn(lsn)),
                receiver_streaming: false,
                upstream: None,
                replay_lag_ms: None,
                epoch_seen: Epoch(1),
                invalidated_lsn: None,
            },
        }
    }

    struct Pool {
        members: BTreeMap<String, MemberRecord>,
        beats: BTreeMap<String, NodeReport>,
        now: Instant,
    }

    impl Pool {
        /// Old primary `p` (us-east, at 10_000) plus the given replicas `(name, region, lsn)`.
        fn new(replicas: &[(&str, &str, u64)]) -> Self {
            let now = Instant::now() + Duration::from_secs(10);
            let mut pool = Pool {
                members: BTreeMap::new(),
                beats: BTreeMap::new(),
                now,
            };
            pool.members.insert("p".into(), member("us-east"));
            pool.beats.insert(
                "p".into(),
                report(
                    "p",
                    "us-east",
                    Role::Primary,
                    10_000,
                    now - Duration::from_secs(2),
                ),
            );
            for (name, region, lsn) in replicas {
                pool.members.insert(name.to_string(), member(region));
                pool.beats.insert(
                    name.to_string(),
                    report(
                        name,
                        region,
                        Role::Replica,
                        *lsn,
                        now - Duration::from_millis(50),
                    ),
                );
            }
            pool
        }

        fn ctx(&self) -> ChoiceContext<'_> {
            ChoiceContext {
                now: self.now,
                old_primary: "p",
                primary_lsn: None,
                timeline: Some(1),
                sync_standbys: None,
            }
        }

        fn choose(
            &self,
            config: &ClusterConfig,
            forced: Option<&str>,
        ) -> Result<Candidate, NoCandidate> {
            choose_candidate(&self.members, &self.beats, config, &self.ctx(), forced)
        }
    }

    fn reason_of(err: &NoCandidate, node: &str) -> Rejection {
        err.reasons
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("no reason for {node} in {err}"))
    }

    #[test]
    fn highest_lsn_wins() {
        let pool = Pool::new(&[
            ("a", "us-west", 9_000),
            ("b", "eu-west", 9_500),
            ("c", "us-east", 8_000),
        ]);
        let c = pool.choose(&ClusterConfig::default(), None).unwrap();
        assert_eq!(c.node.node, "b");
        assert_eq!(c.node.pg_addr, "eu-west:5432");
        assert_eq!(c.position, Lsn(9_500));
        assert_eq!(c.lag_bytes, 500);
    }

    #[test]
    fn ties_go_by_region_priority_then_tag_priority_then_name() {
        let mut pool = Pool::new(&[
            ("a", "us-west", 9_000),
            ("b", "eu-west", 9_000),
            ("c", "ap", 9_000),
        ]);
        let mut config = ClusterConfig {
            region_priority: vec!["eu-west".into(), "us-west".into()],
            ..ClusterConfig::default()
        };
        assert_eq!(pool.choose(&config, None).unwrap().node.node, "b");
        config.region_priority.clear();
        assert_eq!(pool.choose(&config, None).unwrap().node.node, "a");
        pool.members.get_mut("c").unwrap().tags.priority = Some(10);
        assert_eq!(pool.choose(&config, None).unwrap().node.node, "c");
    }

    #[test]
    fn nofailover_silent_down_and_non_replicas_are_skipped() {
        let mut pool = Pool::new(&[
            ("tagged", "r", 9_900),
            ("silent", "r", 9_900),
            ("down", "r", 9_900),
            ("primaryish", "r", 9_900),
            ("ghost", "r", 9_900),
            ("ok", "r", 9_000),
        ]);
        pool.members.get_mut("tagged").unwrap().tags.nofailover = true;
        pool.beats.get_mut("silent").unwrap().received_at = pool.now - Duration::from_secs(1);
        pool.beats.get_mut("down").unwrap().heartbeat.pg_up = false;
        pool.beats.get_mut("primaryish").unwrap().heartbeat.role = Role::Primary;
        pool.members.remove("ghost");
        let c = pool.choose(&ClusterConfig::default(), None).unwrap();
        assert_eq!(c.node.node, "ok");
        pool.members.get_mut("ok").unwrap().tags.nofailover = true;
        let err = pool.choose(&ClusterConfig::default(), None).unwrap_err();
        assert_eq!(reason_of(&err, "tagged"), Rejection::NoFailoverTag);
        assert_eq!(reason_of(&err, "silent"), Rejection::Silent);
        assert_eq!(reason_of(&err, "down"), Rejection::PgDown);
        assert_eq!(
            reason_of(&err, "primaryish"),
            Rejection::NotReplica(Role::Primary)
        );
        assert_eq!(reason_of(&err, "ghost"), Rejection::NotAMember);
        assert_eq!(reason_of(&err, "p"), Rejection::OldPrimary);
        assert!(
            err.to_string().contains("tagged: tagged nofailover"),
            "{err}"
        );
    }

    #[test]
    fn lagging_replicas_are_skipped_unless_forced() {
        let pool = Pool::new(&[("far", "r", 1_000)]);
        let config = ClusterConfig {
            max_failover_lag: 4_096,
            ..ClusterConfig::default()
        };
        let err = pool.choose(&config, None).unwrap_err();
        assert_eq!(
            reason_of(&err, "far"),
            Rejection::Lagging {
                lag_bytes: 9_000,
                max: 4_096
            }
        );
        let forced = pool.choose(&config, Some("far")).unwrap();
        assert_eq!(forced.node.node, "far");
        assert_eq!(forced.lag_bytes, 9_000);
    }

    #[test]
    fn lag_reference_uses_the_best_known_primary_position() {
        let pool = Pool::new(&[("a", "r", 9_000)]);
        let config = ClusterConfig {
            max_failover_lag: 2_000,
            ..ClusterConfig::default()
        };
        let ctx = ChoiceContext {
            primary_lsn: Some(Lsn(20_000)),
            ..pool.ctx()
        };
        let err = choose_candidate(&pool.members, &pool.beats, &config, &ctx, None).unwrap_err();
        assert!(matches!(
            reason_of(&err, "a"),
            Rejection::Lagging {
                lag_bytes: 11_000,
                ..
            }
        ));
    }

    #[test]
    fn forced_considers_only_the_named_node_and_keeps_health_checks() {
        let mut pool = Pool::new(&[("a", "r", 9_900), ("b", "r", 9_000)]);
        let config = ClusterConfig::default();
        assert_eq!(pool.choose(&config, Some("b")).unwrap().node.node, "b");
        pool.members.get_mut("b").unwrap().tags.nofailover = true;
        let err = pool.choose(&config, Some("b")).unwrap_err();
        assert_eq!(reason_of(&err, "b"), Rejection::NoFailoverTag);
        assert_eq!(reason_of(&err, "a"), Rejection::NotForced);
    }

    #[test]
    fn replicas_on_an_old_timeline_are_skipped() {
        let mut pool = Pool::new(&[("a", "r", 9_900), ("b", "r", 9_000)]);
        pool.beats.get_mut("a").unwrap().heartbeat.timeline = 0;
        let c = pool.choose(&ClusterConfig::default(), None).unwrap();
        assert_eq!(c.node.node, "b");
    }

    #[test]
    fn sync_mode_only_promotes_a_synchronous_standby() {
        let pool = Pool::new(&[
            ("async", "r", 9_900),
            ("s1", "r", 9_800),
            ("s2", "r", 9_700),
        ]);
        let config = ClusterConfig {
            sync_mode: SyncMode::On,
            ..ClusterConfig::default()
        };
        let set: BTreeSet<String> = ["s1".to_string(), "s2".to_string()].into();
        let ctx = ChoiceContext {
            sync_standbys: Some(&set),
            ..pool.ctx()
        };
        let c = choose_candidate(&pool.members, &pool.beats, &config, &ctx, None).unwrap();
        assert_eq!(c.node.node, "s1");
        // Off: the async replica is fine.
        let off = ClusterConfig::default();
        let c = choose_candidate(&pool.members, &pool.beats, &off, &ctx, None).unwrap();
        assert_eq!(c.node.node, "async");
    }

    #[test]
    fn sync_mode_refuses_when_a_sync_standby_is_unobserved() {
        let mut pool = Pool::new(&[("s1", "r", 9_800), ("s2", "r", 9_700)]);
        pool.beats.get_mut("s1").unwrap().received_at = pool.now - Duration::from_secs(5);
        let config = ClusterConfig {
            sync_mode: SyncMode::Strict,
            ..ClusterConfig::default()
        };
        let set: BTreeSet<String> = ["s1".to_string(), "s2".to_string()].into();
        let ctx = ChoiceContext {
            sync_standbys: Some(&set),
            ..pool.ctx()
        };
        let err = choose_candidate(&pool.members, &pool.beats, &config, &ctx, None).unwrap_err();
        assert_eq!(reason_of(&err, "s2"), Rejection::SyncStandbyUnobserved);
        // The operator can still force it (accepting possible loss).
        let forced =
            choose_candidate(&pool.members, &pool.beats, &config, &ctx, Some("s2")).unwrap();
        assert_eq!(forced.node.node, "s2");
    }

    #[test]
    fn sync_mode_with_an_empty_set_behaves_as_async() {
        let pool = Pool::new(&[("a", "r", 9_900)]);
        let config = ClusterConfig {
            sync_mode: SyncMode::On,
            ..ClusterConfig::default()
        };
        let empty = BTreeSet::new();
        let ctx = ChoiceContext {
            sync_standbys: Some(&empty),
            ..pool.ctx()
        };
        assert_eq!(
            choose_candidate(&pool.members, &pool.beats, &config, &ctx, None)
                .unwrap()
                .node
                .node,
            "a"
        );
    }

    #[test]
    fn unforced_failover_respects_the_lag_limit_and_the_synchronous_set() {
        let candidate = |lag_bytes| Candidate {
            node: node_ref("a"),
            position: Lsn(100),
            lag_bytes,
            timeline: 1,
        };
        let config = ClusterConfig {
            max_failover_lag: 1000,
            ..ClusterConfig::default()
        };
        assert_eq!(check_unforced("a", &candidate(1000), &config, None), Ok(()));
        let lagging = check_unforced("a", &candidate(1001), &config, None).unwrap_err();
        assert_eq!(
            lagging.to_string(),
            "a is 1001 bytes behind (max_failover_lag 1000); use --force to accept the loss"
        );
        // Synchronous mode: only a member of a non-empty recorded set.
        let sync = ClusterConfig {
            sync_mode: SyncMode::On,
            ..config.clone()
        };
        let others: BTreeSet<String> = ["b".to_string()].into();
        let with_a: BTreeSet<String> = ["a".to_string()].into();
        assert_eq!(
            check_unforced("a", &candidate(0), &sync, Some(&others)),
            Err(Unforced::NotSynchronous { node: "a".into() })
        );
        assert_eq!(
            check_unforced("a", &candidate(0), &sync, Some(&with_a)),
            Ok(())
        );
        assert_eq!(
            check_unforced("a", &candidate(0), &sync, Some(&BTreeSet::new())),
            Ok(())
        );
        assert_eq!(check_unforced("a", &candidate(0), &sync, None), Ok(()));
        // Asynchronous: the recorded set does not matter.
        assert_eq!(
            check_unforced("a", &candidate(0), &config, Some(&others)),
            Ok(())
        );
    }

    #[test]
    fn no_replicas_at_all() {
        let pool = Pool::new(&[]);
        let err = pool.choose(&ClusterConfig::default(), None).unwrap_err();
        assert_eq!(err.reasons, vec![("p".to_string(), Rejection::OldPrimary)]);
    }

    // ---------- failover state machine ----------

    fn node_ref(name: &str) -> NodeRef {
        NodeRef {
            node: name.into(),
            region: format!("{name}-region"),
            pg_addr: format!("{name}:5432"),
        }
    }

    fn replica_obs(upstream: &str, epoch: u64) -> NodeObservation {
        NodeObservation {
            healthy: true,
            reachable: true,
            role: Role::Replica,
            epoch_seen: Epoch(epoch),
            timeline: 1,
            streaming_from: Some(upstream.into()),
            position: Some(Lsn(9_000)),
        }
    }

    fn plan() -> FailoverPlan {
        FailoverPlan::new(
            PlanKind::Failover,
            Epoch(4),
            node_ref("old"),
            1,
            node_ref("cand"),
        )
    }

    fn serving_old() -> LeaderRecord {
        LeaderRecord {
            node: "old".into(),
            region: "old-region".into(),
            pg_addr: "old:5432".into(),
            epoch: Epoch(4),
            timeline: 1,
            state: LeaderState::Serving,
            since: 1,
            candidate: None,
        }
    }

    /// The cluster right after the old primary crashed (agent dead too, lease alive).
    fn initial_obs() -> Observations {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "old".to_string(),
            NodeObservation {
                healthy: false,
                reachable: false,
                role: Role::Primary,
                epoch_seen: Epoch(4),
                timeline: 1,
                streaming_from: None,
                position: Some(Lsn(10_000)),
            },
        );
        let mut cand = replica_obs("old", 4);
        cand.streaming_from = None;
        nodes.insert("cand".to_string(), cand);
        let mut other = replica_obs("old", 4);
        other.streaming_from = None;
        nodes.insert("other".to_string(), other);
        Observations {
            now_ms: 1_000,
            stored_epoch: Epoch(4),
            leader: Some(serving_old()),
            fence_acked: false,
            promote_acked: false,
            old_lease_alive: true,
            old_final_lsn: None,
            nodes,
        }
    }

    /// Applies the effect of `action` to the world, as a well-behaved shell and agents would.
    fn apply(action: &Action, obs: &mut Observations) {
        match action {
            Action::WriteLeaderFailingOver { epoch, record } => {
                obs.stored_epoch = *epoch;
                obs.leader = Some(record.clone());
            }
            Action::WaitLeaseExpiry { .. } => obs.old_lease_alive = false,
            Action::SendFence { .. } => obs.fence_acked = true,
            Action::SendPromote { node, epoch, .. } => {
                let n = obs.nodes.get_mut(node).unwrap();
                n.role = Role::Primary;
                n.epoch_seen = *epoch;
                n.timeline = 2;
                n.streaming_from = None;
            }
            Action::PublishLeader { record } => obs.leader = Some(record.clone()),
            Action::SendFollow {
                nodes,
                leader,
                epoch,
                ..
            } => {
                for name in nodes {
                    if name != "old" {
                        let n = obs.nodes.get_mut(name).unwrap();
                        n.streaming_from = Some(leader.clone());
                        n.epoch_seen = *epoch;
                    }
                }
            }
            other => panic!("unexpected action {other:?}"),
        }
    }

    /// Runs a plan to completion, returning the actions taken.
    fn run(plan: &mut FailoverPlan, obs: &mut Observations) -> Vec<Action> {
        let mut actions = Vec::new();
        for _ in 0..20 {
            let action = plan.advance(obs);
            if action == Action::Done {
                return actions;
            }
            apply(&action, obs);
            actions.push(action);
        }
        panic!("plan did not finish: {actions:?}");
    }

    fn kinds(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .map(|a| match a {
                Action::WriteLeaderFailingOver { .. } => "mark",
                Action::SendFence { .. } => "fence",
                Action::WaitLeaseExpiry { .. } => "lease",
                Action::AwaitCatchUp { .. } => "catchup",
                Action::SendPromote { .. } => "promote",
                Action::PublishLeader { .. } => "publish",
                Action::SendFollow { .. } => "follow",
                Action::Replan { .. } => "replan",
                Action::Abandon(_) => "abandon",
                Action::Done => "done",
            })
            .collect()
    }

    #[test]
    fn full_failover_runs_the_design_sequence() {
        let mut plan = plan();
        assert_eq!(plan.epoch, Epoch(5));
        let mut obs = initial_obs();
        let actions = run(&mut plan, &mut obs);
        assert_eq!(
            kinds(&actions),
            ["mark", "lease", "promote", "publish", "follow"]
        );
        match &actions[0] {
            Action::WriteLeaderFailingOver { epoch, record } => {
                assert_eq!(*epoch, Epoch(5));
                assert_eq!(record.state, LeaderState::FailingOver);
                assert_eq!(record.node, "old");
                assert_eq!(
                    record.candidate.as_ref().map(|c| c.node.as_str()),
                    Some("cand")
                );
            }
            other => panic!("{other:?}"),
        }
        match &actions[3] {
            Action::PublishLeader { record } => {
                assert_eq!(record.node, "cand");
                assert_eq!(record.epoch, Epoch(5));
                assert_eq!(record.timeline, 2);
                assert!(record.is_serving());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            actions[4],
            Action::SendFollow {
                nodes: vec!["other".into()],
                leader: "cand".into(),
                pg_addr: "cand:5432".into(),
                epoch: Epoch(5)
            }
        );
        assert_eq!(plan.step, Step::Done);
    }

    #[test]
    fn reachable_old_agent_is_fenced_by_command_and_told_to_follow() {
        let mut plan = plan();
        let mut obs = initial_obs();
        let old = obs.nodes.get_mut("old").unwrap();
        old.healthy = true;
        old.reachable = true;
        let actions = run(&mut plan, &mut obs);
        assert_eq!(
            kinds(&actions),
            ["mark", "fence", "promote", "publish", "follow"]
        );
        match &actions[4] {
            Action::SendFollow { nodes, .. } => {
                assert_eq!(nodes, &["old".to_string(), "other".to_string()])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn never_promotes_before_the_old_primary_is_fenced() {
        let mut plan = plan();
        let mut obs = initial_obs();
        apply(&plan.advance(&obs), &mut obs);
        for _ in 0..5 {
            let action = plan.advance(&obs);
            assert_eq!(action, Action::WaitLeaseExpiry { node: "old".into() });
            assert_eq!(plan.step, Step::AwaitFence);
        }
    }

    #[test]
    fn resume_after_coordinator_crash_at_each_step() {
        // Reference run, recording the world after each action.
        let mut reference = plan();
        let mut obs = initial_obs();
        let mut snapshots = vec![obs.clone()];
        for _ in 0..10 {
            let action = reference.advance(&obs);
            if action == Action::Done {
                break;
            }
            apply(&action, &mut obs);
            snapshots.push(obs.clone());
        }
        let all = ["mark", "lease", "promote", "publish", "follow"];
        // Crash after k actions: the new coordinator reads `leader` and resumes.
        for (k, snapshot) in snapshots.iter().enumerate().skip(1) {
            let leader = snapshot.leader.clone().unwrap();
            let mut world = snapshot.clone();
            if leader.state == LeaderState::Serving {
                // Published: nothing left to resume but the followers, which the
                // steady-state reconciler handles; the leader is already right.
                assert_eq!(leader.node, "cand");
                assert_eq!(
                    FailoverPlan::resume(&leader),
                    Err(ResumeError::NotFailingOver)
                );
                continue;
            }
            let mut resumed = FailoverPlan::resume(&leader).unwrap();
            assert_eq!(resumed.epoch, Epoch(5), "after {k} actions");
            assert_eq!(resumed.candidate.node, "cand");
            let rest = run(&mut resumed, &mut world);
            assert_eq!(kinds(&rest), all[k..].to_vec(), "after {k} actions");
            assert_eq!(world.leader.as_ref().map(|l| l.node.as_str()), Some("cand"));
        }
    }

    #[test]
    fn resume_with_a_plan_held_in_memory_at_each_step_repeats_nothing_done() {
        // A crash can also happen between doing an action and recording the step:
        // the plan's step is behind the world. Observations must carry it forward.
        let mut reference = plan();
        let mut obs = initial_obs();
        for done in 1..=5 {
            let action = reference.advance(&obs);
            apply(&action, &mut obs);
            let mut stale = plan(); // step MarkFailingOver, world advanced by `done` actions
            let rest = run(&mut stale, &mut obs.clone());
            let all = ["mark", "lease", "promote", "publish", "follow"];
            // Every step already done is recognised from observations and skipped.
            assert_eq!(kinds(&rest), all[done..].to_vec(), "after {done} actions");
        }
    }

    #[test]
    fn promotion_confirmed_but_not_published_skips_to_publish() {
        let mut obs = initial_obs();
        let mut plan = plan();
        apply(&plan.advance(&obs), &mut obs);
        // Another coordinator already promoted cand, then crashed; the lease is still alive.
        let c = obs.nodes.get_mut("cand").unwrap();
        c.role = Role::Primary;
        c.epoch_seen = Epoch(5);
        c.timeline = 2;
        let mut resumed = FailoverPlan::resume(obs.leader.as_ref().unwrap()).unwrap();
        assert!(matches!(
            resumed.advance(&obs),
            Action::PublishLeader { .. }
        ));
    }

    #[test]
    fn higher_epoch_in_etcd_abandons_the_plan() {
        let mut plan = plan();
        let mut obs = initial_obs();
        apply(&plan.advance(&obs), &mut obs);
        obs.stored_epoch = Epoch(6);
        assert_eq!(
            plan.advance(&obs),
            Action::Abandon(AbandonReason::Superseded { stored: Epoch(6) })
        );
    }

    #[test]
    fn same_epoch_with_another_candidate_is_a_conflict() {
        let mut obs = initial_obs();
        let other = FailoverPlan::new(
            PlanKind::Failover,
            Epoch(4),
            node_ref("old"),
            1,
            node_ref("other"),
        );
        apply(&next_action(&other, &obs), &mut obs);
        assert_eq!(
            next_action(&plan(), &obs),
            Action::Abandon(AbandonReason::Conflict {
                candidate: Some("other".into())
            })
        );
    }

    #[test]
    fn a_promote_ack_publishes_without_waiting_for_the_next_heartbeat() {
        let mut plan = plan();
        let mut obs = initial_obs();
        let mut action = plan.advance(&obs);
        while !matches!(action, Action::SendPromote { .. }) {
            apply(&action, &mut obs);
            action = plan.advance(&obs);
        }
        // Not promoted yet: the plan asks again.
        assert!(matches!(plan.advance(&obs), Action::SendPromote { .. }));
        // The ack arrives before a heartbeat shows the candidate as primary.
        obs.promote_acked = true;
        assert_eq!(obs.nodes["cand"].role, Role::Replica);
        match plan.advance(&obs) {
            Action::PublishLeader { record } => {
                assert_eq!((record.node.as_str(), record.epoch), ("cand", plan.epoch));
            }
            other => panic!("expected the leader's publication, got {other:?}"),
        }
    }

    #[test]
    fn candidate_lost_before_promotion_asks_for_a_new_plan() {
        let mut plan = plan();
        let mut obs = initial_obs();
        apply(&plan.advance(&obs), &mut obs);
        apply(&plan.advance(&obs), &mut obs);
        let cand = obs.nodes.get_mut("cand").unwrap();
        cand.healthy = false;
        cand.reachable = false;
        assert_eq!(
            plan.advance(&obs),
            Action::Replan {
                lost: "cand".into()
            }
        );
        assert_eq!(plan.step, Step::Promote);
    }

    #[test]
    fn switchover_waits_for_the_target_to_catch_up() {
        let mut plan = FailoverPlan::new(
            PlanKind::Switchover,
            Epoch(4),
            node_ref("old"),
            1,
            node_ref("cand"),
        );
        let mut obs = initial_obs();
        let old = obs.nodes.get_mut("old").unwrap();
        old.healthy = true;
        old.reachable = true;
        apply(&plan.advance(&obs), &mut obs);
        assert!(matches!(plan.advance(&obs), Action::SendFence { .. }));
        obs.fence_acked = true;
        assert_eq!(
            plan.advance(&obs),
            Action::AwaitCatchUp {
                node: "cand".into(),
                target: None
            }
        );
        obs.old_final_lsn = Some(Lsn(10_000));
        assert!(matches!(plan.advance(&obs), Action::AwaitCatchUp { .. }));
        obs.nodes.get_mut("cand").unwrap().position = Some(Lsn(10_000));
        assert_eq!(
            plan.advance(&obs),
            Action::SendPromote {
                node: "cand".into(),
                epoch: Epoch(5),
                old_fenced: true,
            }
        );
    }

    #[test]
    fn steps_never_go_backwards() {
        let mut plan = plan();
        let mut obs = initial_obs();
        apply(&plan.advance(&obs), &mut obs);
        apply(&plan.advance(&obs), &mut obs); // lease expired
        assert_eq!(plan.step, Step::AwaitFence);
        let action = plan.advance(&obs);
        assert!(matches!(action, Action::SendPromote { .. }));
        // The old agent comes back and re-registers: fencing stays done.
        obs.old_lease_alive = true;
        assert!(matches!(plan.advance(&obs), Action::SendPromote { .. }));
        assert_eq!(plan.step, Step::Promote);
    }

    #[test]
    fn steady_state_reconciles_followers_of_a_serving_leader() {
        let mut obs = initial_obs();
        let mut leader = plan().serving_record(2, 9);
        leader.pg_addr = "cand:5432".into();
        let old = obs.nodes.get_mut("old").unwrap();
        old.healthy = true;
        old.reachable = true;
        obs.nodes.insert("cand".into(), replica_obs("x", 5));
        obs.nodes.insert("done".into(), replica_obs("cand", 5));
        assert_eq!(
            reconcile_followers(&leader, &obs.nodes),
            Some(Action::SendFollow {
                nodes: vec!["old".into(), "other".into()],
                leader: "cand".into(),
                pg_addr: "cand:5432".into(),
                epoch: Epoch(5)
            })
        );
        obs.nodes.retain(|name, _| name == "done" || name == "cand");
        assert_eq!(reconcile_followers(&leader, &obs.nodes), None);
        leader.state = LeaderState::FailingOver;
        obs.nodes.insert("lagger".into(), replica_obs("old", 4));
        assert_eq!(reconcile_followers(&leader, &obs.nodes), None);
    }

    #[test]
    fn unreachable_replicas_are_not_waited_for() {
        let mut plan = plan();
        let mut obs = initial_obs();
        let other = obs.nodes.get_mut("other").unwrap();
        other.healthy = false;
        other.reachable = false;
        let actions = run(&mut plan, &mut obs);
        assert_eq!(kinds(&actions), ["mark", "lease", "promote", "publish"]);
    }

    #[test]
    fn crashed_postgres_under_a_live_agent_is_fenced_by_command_not_lease() {
        // kill -9 of the postmaster: the agent heartbeats on (pg_up = false) and
        // keeps its lease alive, so waiting for the lease would wait forever.
        let mut plan = plan();
        let mut obs = initial_obs();
        let old = obs.nodes.get_mut("old").unwrap();
        old.healthy = false;
        old.reachable = true;
        apply(&plan.advance(&obs), &mut obs);
        assert_eq!(
            plan.advance(&obs),
            Action::SendFence {
                node: "old".into(),
                epoch: Epoch(5)
            }
        );
        let actions = run(&mut plan, &mut obs);
        assert_eq!(kinds(&actions), ["fence", "promote", "publish", "follow"]);
        // The old node (Postgres down, agent up) is told to follow, so it rejoins.
        match &actions[3] {
            Action::SendFollow { nodes, .. } => assert!(nodes.contains(&"old".to_string())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reconcile_includes_reachable_nodes_whose_postgres_is_down() {
        let leader = plan().serving_record(2, 9);
        let mut nodes = BTreeMap::new();
        let mut down = replica_obs("old", 4);
        down.healthy = false;
        down.role = Role::Unknown;
        nodes.insert("old".to_string(), down);
        let mut gone = replica_obs("old", 4);
        gone.healthy = false;
        gone.reachable = false;
        nodes.insert("gone".to_string(), gone);
        match reconcile_followers(&leader, &nodes) {
            Some(Action::SendFollow { nodes, .. }) => assert_eq!(nodes, vec!["old".to_string()]),
            other => panic!("{other:?}"),
        }
    }

    // ---------- property: crashes, lost messages and lease/agent noise ----------

    #[derive(Clone, Debug)]
    enum Event {
        /// The coordinator asks for the next action; the effect is lost when `lost`.
        Step { lost: bool },
        /// The coordinator crashes; a new one reads `leader` and resumes.
        Crash,
        /// The old primary's lease expires (its agent fenced Postgres before that).
        LeaseExpires,
        /// The old primary's agent becomes reachable / unreachable.
        ToggleOldAgent,
        /// The old primary's agent acknowledges a Fence it received.
        FenceAck,
    }

    fn event() -> impl proptest::strategy::Strategy<Value = Event> {
        use proptest::prelude::*;
        prop_oneof![
            4 => any::<bool>().prop_map(|lost| Event::Step { lost }),
            1 => Just(Event::Crash),
            1 => Just(Event::LeaseExpires),
            1 => Just(Event::ToggleOldAgent),
            1 => Just(Event::FenceAck),
        ]
    }

    struct Sim {
        obs: Observations,
        plan: Option<FailoverPlan>,
        fence_received: bool,
        fenced_ever: bool,
    }

    impl Sim {
        fn new(old_reachable: bool) -> Self {
            let mut obs = initial_obs();
            let old = obs.nodes.get_mut("old").unwrap();
            old.healthy = old_reachable;
            old.reachable = old_reachable;
            Sim {
                obs,
                plan: Some(plan()),
                fence_received: false,
                fenced_ever: false,
            }
        }

        /// What a newly elected coordinator does on reading etcd.
        fn recover(&mut self) {
            let leader = self.obs.leader.clone().unwrap();
            self.plan = match leader.state {
                LeaderState::FailingOver => Some(FailoverPlan::resume(&leader).unwrap()),
                // Not yet marked: it detects the failure again and plans the same.
                LeaderState::Serving if leader.epoch == Epoch(4) => Some(plan()),
                LeaderState::Serving => None,
            };
        }

        fn step(&mut self, lost: bool) {
            let Some(plan) = self.plan.as_mut() else {
                let leader = self.obs.leader.clone().unwrap();
                if let Some(follow) = reconcile_followers(&leader, &self.obs.nodes) {
                    if !lost {
                        apply(&follow, &mut self.obs);
                    }
                }
                return;
            };
            let action = plan.advance(&self.obs);
            match &action {
                Action::SendPromote { .. } => assert!(self.fenced_ever, "promote before fencing"),
                Action::PublishLeader { record } => {
                    let c = &self.obs.nodes["cand"];
                    assert!(
                        c.role == Role::Primary && c.epoch_seen >= Epoch(5),
                        "publish before promotion"
                    );
                    assert_eq!(record.node, "cand");
                }
                Action::WriteLeaderFailingOver { epoch, record } => {
                    assert_eq!(*epoch, Epoch(5));
                    assert_eq!(
                        record.candidate.as_ref().map(|c| c.node.as_str()),
                        Some("cand")
                    );
                }
                Action::Abandon(_) | Action::Replan { .. } => panic!("unexpected {action:?}"),
                _ => {}
            }
            if action == Action::Done {
                self.plan = None;
                return;
            }
            if lost {
                return;
            }
            match action {
                Action::SendFence { .. } => {
                    if self.obs.nodes["old"].reachable {
                        self.fence_received = true;
                    }
                }
                Action::WaitLeaseExpiry { .. } | Action::AwaitCatchUp { .. } => {}
                other => apply(&other, &mut self.obs),
            }
        }

        fn handle(&mut self, event: &Event) {
            match event {
                Event::Step { lost } => self.step(*lost),
                Event::Crash => self.recover(),
                Event::LeaseExpires => {
                    self.obs.old_lease_alive = false;
                    self.fenced_ever = true;
                }
                Event::ToggleOldAgent => {
                    let old = self.obs.nodes.get_mut("old").unwrap();
                    old.healthy = !old.healthy;
                    old.reachable = old.healthy;
                }
                Event::FenceAck => {
                    if self.fence_received {
                        self.obs.fence_acked = true;
                        self.fenced_ever = true;
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn failover_is_safe_and_converges_under_crashes_and_losses(
            old_reachable in proptest::prelude::any::<bool>(),
            events in proptest::collection::vec(event(), 0..60),
        ) {
            let mut sim = Sim::new(old_reachable);
            for event in &events {
                sim.handle(event);
            }
            // Afterwards: one more crash, the lease runs out, messages get through.
            sim.recover();
            sim.handle(&Event::LeaseExpires);
            for _ in 0..10 {
                sim.step(false);
            }
            proptest::prop_assert!(sim.plan.is_none(), "not done: {:?}", sim.plan);
            let leader = sim.obs.leader.clone().unwrap();
            proptest::prop_assert!(leader.is_serving());
            proptest::prop_assert_eq!(leader.node.as_str(), "cand");
            proptest::prop_assert_eq!(leader.epoch, Epoch(5));
            proptest::prop_assert_eq!(sim.obs.stored_epoch, Epoch(5));
            let other = &sim.obs.nodes["other"];
            proptest::prop_assert_eq!(other.streaming_from.as_deref(), Some("cand"));
        }
    }
}
