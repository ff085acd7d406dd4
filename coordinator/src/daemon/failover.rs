//! Carrying out a failover or switchover plan ([`crate::planner::FailoverPlan`]):
//! each tick gathers [`Observations`] (etcd, heartbeats, acknowledged commands),
//! asks the plan for its next [`Action`] and does it: the `failing_over` leader
//! with a new epoch, `Fence` (after the drain, in a switchover), waiting for the
//! old primary's lease or the switchover target's catch-up, `Promote`, the new
//! leader's publication, `Follow` for the others. Every action is idempotent, so
//! a coordinator elected mid-way resumes the plan recorded in the `failing_over`
//! leader. A candidate that stays unavailable before its promotion is replaced
//! (re-plan); a plan whose epoch is overtaken is abandoned. The operator's
//! caller, if any, gets the outcome.

use std::time::{Duration, Instant};

use meridian_shared::epoch::Epoch;
use meridian_shared::records::{LeaderRecord, NodeRef};
use tokio::sync::oneshot;
use tracing::info;

use super::term::committed;
use super::{unix_ms, Active, Shell};
use crate::commands::{CommandKind, CommandSpec};
use crate::control::OperationResult;
use crate::observe;
use crate::planner::{Action, Candidate, FailoverPlan, Observations, PlanKind, Step};
use crate::store;

/// A candidate that stays unavailable this long before its promotion is replaced.
const REPLAN_AFTER: Duration = Duration::from_secs(1);
/// A switchover whose target does not show the catch-up condition within this
/// time after the fence falls back to the old primary's last reported position.
const CATCH_UP_FALLBACK: Duration = Duration::from_secs(5);

/// A failover or switchover being carried out.
pub(super) struct PlanRun {
    plan: FailoverPlan,
    /// The operator's caller (none for an automatic failover).
    pub(super) reply: Option<oneshot::Sender<OperationResult>>,
    /// When the `failing_over` leader was written (a switchover drains from then).
    marked_at: Option<Instant>,
    fence_acked_at: Option<Instant>,
    /// Since when the plan has asked to re-plan.
    replan_since: Option<Instant>,
    promoted_event: bool,
    waiting_logged: Option<Step>,
}

impl PlanRun {
    fn new(plan: FailoverPlan, reply: Option<oneshot::Sender<OperationResult>>) -> Self {
        PlanRun {
            plan,
            reply,
            marked_at: None,
            fence_acked_at: None,
            replan_since: None,
            promoted_event: false,
            waiting_logged: None,
        }
    }

    /// Whether the wait at `step` is not logged yet (it counts as logged from now).
    fn log_waiting(&mut self, step: Step) -> bool {
        let first = self.waiting_logged != Some(step);
        self.waiting_logged = Some(step);
        first
    }
}

/// `leader` as the plan's old primary.
fn node_ref(leader: &LeaderRecord) -> NodeRef {
    NodeRef {
        node: leader.node.clone(),
        region: leader.region.clone(),
        pg_addr: leader.pg_addr.clone(),
    }
}

impl Active {
    /// Plans replacing `leader` by `candidate` in the epoch after the current one.
    pub(super) fn start_plan(
        &mut self,
        kind: PlanKind,
        leader: &LeaderRecord,
        candidate: Candidate,
        reply: Option<oneshot::Sender<OperationResult>>,
    ) {
        self.plan = Some(PlanRun::new(
            FailoverPlan::new(
                kind,
                self.snap.current_epoch(),
                node_ref(leader),
                leader.timeline,
                candidate.node,
            ),
            reply,
        ));
    }

    /// Takes over the failover recorded in a `failing_over` leader.
    pub(super) fn resume(&mut self, shell: &Shell, leader: &LeaderRecord) {
        match FailoverPlan::resume(leader) {
            Ok(plan) => {
                shell.event(
                    "failover_resumed",
                    Some(&plan.candidate.node),
                    plan.epoch,
                    format!(
                        "resuming the failover from {} to {}",
                        plan.old.node, plan.candidate.node
                    ),
                );
                let mut run = PlanRun::new(plan, None);
                run.marked_at = Some(Instant::now());
                self.plan = Some(run);
            }
            // No candidate recorded: choose one and start over with a new epoch.
            Err(e) => match self.choose(leader, None, false) {
                Ok(candidate) => {
                    shell.event(
                        "failover_resumed",
                        Some(&candidate.node.node),
                        leader.epoch,
                        format!("{e}; chose {}", candidate.node.node),
                    );
                    self.start_plan(PlanKind::Failover, leader, candidate, None);
                }
                Err(no) => self.no_candidate(shell, leader, no.to_string()),
            },
        }
    }

    /// The agent of `node` confirmed a `Fence` of `epoch`.
    pub(super) fn fence_acked(&mut self, node: &str, epoch: Epoch, now: Instant) {
        if let Some(run) = self.plan.as_mut() {
            if run.plan.old.node == node && epoch >= run.plan.epoch && run.fence_acked_at.is_none()
            {
                run.fence_acked_at = Some(now);
            }
        }
    }

    fn observations(&self, run: &PlanRun, now: Instant) -> Observations {
        let plan = &run.plan;
        let reports = self.detector.reports();
        let old_final_lsn = match (plan.kind, run.fence_acked_at) {
            (PlanKind::Switchover, Some(acked_at)) => observe::switchover_final_lsn(
                acked_at,
                self.primary_positions.get(&plan.old.node).copied(),
                reports.get(&plan.candidate.node),
                now,
                CATCH_UP_FALLBACK,
            ),
            _ => None,
        };
        Observations {
            now_ms: unix_ms(),
            stored_epoch: self.snap.epoch,
            leader: self.snap.leader.as_ref().map(|l| l.value.clone()),
            fence_acked: self
                .book
                .acked_ok(&plan.old.node, CommandKind::Fence, plan.epoch),
            promote_acked: self.book.acked_ok(
                &plan.candidate.node,
                CommandKind::Promote,
                plan.epoch,
            ),
            old_lease_alive: self.snap.members.contains_key(&plan.old.node),
            old_final_lsn,
            nodes: self.node_observations(now),
        }
    }

    /// One step of the running plan.
    pub(super) async fn advance_plan(&mut self, shell: &mut Shell) {
        let Some(mut run) = self.plan.take() else {
            return;
        };
        let now = Instant::now();
        if run.fence_acked_at.is_none()
            && self
                .book
                .acked_ok(&run.plan.old.node, CommandKind::Fence, run.plan.epoch)
        {
            run.fence_acked_at = Some(now);
        }
        let obs = self.observations(&run, now);
        let action = run.plan.advance(&obs);
        if run.plan.step >= Step::PublishLeader && !run.promoted_event {
            run.promoted_event = true;
            shell.event(
                "promoted",
                Some(&run.plan.candidate.node),
                run.plan.epoch,
                "candidate runs as primary".into(),
            );
        }
        if !matches!(action, Action::Replan { .. }) {
            run.replan_since = None;
        }
        match self.carry_out(shell, &mut run, action, now).await {
            Some(result) => self.finish(shell, run, result),
            None => self.plan = Some(run),
        }
    }

    /// Does `action`; `Some` when the plan is over, with its outcome.
    async fn carry_out(
        &mut self,
        shell: &mut Shell,
        run: &mut PlanRun,
        action: Action,
        now: Instant,
    ) -> Option<OperationResult> {
        let epoch = run.plan.epoch;
        match action {
            Action::WriteLeaderFailingOver { epoch, record } => {
                let outcome = store::write_epoch_and_leader(
                    &mut shell.etcd,
                    &shell.keys,
                    &self.snap,
                    epoch,
                    &record,
                )
                .await;
                if committed("failing_over", outcome) {
                    run.marked_at = Some(now);
                    let kind = match run.plan.kind {
                        PlanKind::Switchover => "switchover_started",
                        PlanKind::Failover => "failover_started",
                    };
                    shell.event(
                        kind,
                        Some(&run.plan.candidate.node),
                        epoch,
                        format!("{} -> {}", run.plan.old.node, run.plan.candidate.node),
                    );
                }
                self.refresh(shell).await;
            }
            Action::SendFence { node, epoch } => {
                let marked = *run.marked_at.get_or_insert(now);
                let drained = run.plan.kind != PlanKind::Switchover
                    || now.saturating_duration_since(marked) >= shell.settings.switchover_drain;
                if drained {
                    self.ensure(&node, CommandSpec::Fence { epoch });
                }
            }
            Action::WaitLeaseExpiry { node } => {
                if run.log_waiting(Step::AwaitFence) {
                    info!(
                        node,
                        "old primary unreachable; waiting for its lease to expire"
                    );
                }
            }
            Action::AwaitCatchUp { node, target } => {
                if run.log_waiting(Step::Promote) {
                    info!(
                        node,
                        ?target,
                        "waiting for the switchover target to catch up"
                    );
                }
            }
            Action::SendPromote {
                node,
                epoch,
                old_fenced,
            } => {
                if self.ensure(&node, CommandSpec::Promote { epoch, old_fenced }) {
                    info!(node, epoch = epoch.0, "promote sent");
                }
            }
            Action::PublishLeader { record } => {
                let outcome =
                    store::write_leader(&mut shell.etcd, &shell.keys, &self.snap, &record).await;
                if committed("publish", outcome) {
                    shell.event(
                        "leader_published",
                        Some(&record.node),
                        record.epoch,
                        format!(
                            "{} serves epoch {} on timeline {}",
                            record.node, record.epoch, record.timeline
                        ),
                    );
                }
                self.refresh(shell).await;
            }
            Action::SendFollow {
                nodes,
                leader,
                pg_addr,
                epoch,
            } => {
                self.send_follows(shell, &nodes, &leader, &pg_addr, epoch);
                // The steady-state reconciler keeps re-pointing stragglers.
                return Some(Ok(format!("{leader} is the primary of epoch {epoch}")));
            }
            Action::Done => {
                return Some(Ok(format!(
                    "{} is the primary of epoch {epoch}",
                    run.plan.candidate.node
                )));
            }
            Action::Replan { lost } => {
                let since = *run.replan_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= REPLAN_AFTER
                    && !self.within_election_grace(now)
                {
                    self.replan(shell, run, &lost);
                }
            }
            Action::Abandon(reason) => {
                shell.event(
                    "error",
                    Some(&run.plan.candidate.node),
                    epoch,
                    format!("plan abandoned: {reason:?}"),
                );
                self.snap_at = None;
                return Some(Err(format!("abandoned: {reason:?}")));
            }
        }
        None
    }

    /// The candidate `lost` became unavailable before its promotion: the same plan
    /// (same epoch, same old primary) with another candidate, if there is one.
    fn replan(&mut self, shell: &Shell, run: &mut PlanRun, lost: &str) {
        let Some(leader) = self.snap.leader.as_ref().map(|l| l.value.clone()) else {
            return;
        };
        let epoch = run.plan.epoch;
        let old = LeaderRecord {
            node: run.plan.old.node.clone(),
            region: run.plan.old.region.clone(),
            pg_addr: run.plan.old.pg_addr.clone(),
            ..leader
        };
        match self.choose(&old, None, false) {
            Ok(candidate) if candidate.node.node != lost => {
                shell.event(
                    "replan",
                    Some(&candidate.node.node),
                    epoch.next(),
                    format!(
                        "candidate {lost} became unavailable; promoting {} instead",
                        candidate.node.node
                    ),
                );
                self.book.cancel(lost, CommandKind::Promote);
                run.plan = FailoverPlan::new(
                    run.plan.kind,
                    epoch,
                    run.plan.old.clone(),
                    run.plan.old_timeline,
                    candidate.node,
                );
                run.replan_since = None;
                run.promoted_event = false;
                run.fence_acked_at = None;
            }
            _ => {
                let key = format!("replan:{lost}");
                self.event_limited(
                    shell,
                    &key,
                    "no_candidate",
                    Some(lost),
                    epoch,
                    format!("candidate {lost} unavailable and no other candidate"),
                );
            }
        }
    }

    /// Ends the plan: `failover_done` on success, the caller answered.
    fn finish(&mut self, shell: &Shell, run: PlanRun, result: OperationResult) {
        if result.is_ok() {
            shell.event(
                "failover_done",
                Some(&run.plan.candidate.node),
                run.plan.epoch,
                format!("{} replaced {}", run.plan.candidate.node, run.plan.old.node),
            );
        }
        self.suspect_since = None;
        self.sync_applied = None;
        if let Some(reply) = run.reply {
            let _ = reply.send(result);
        }
    }
}
