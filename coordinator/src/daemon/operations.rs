//! Operator operations (`meridianctl switchover` / `failover`, through
//! [`crate::control`]) and the candidate choice every plan starts from.
//!
//! An operation is refused, with the reason sent back to the caller, while a
//! plan runs, before the first leader, during a failover, for a switchover whose
//! primary does not report healthy, or when it names the current primary; an
//! unforced failover also when its target lags or is outside the synchronous
//! set ([`crate::planner::check_unforced`]). An accepted one becomes a plan whose
//! outcome the caller gets when it ends.

use std::time::Instant;

use meridian_shared::records::LeaderRecord;
use tokio::sync::oneshot;
use tracing::info;

use super::{Active, Shell};
use crate::control::{Operation, OperationResult};
use crate::planner::{
    check_unforced, choose_candidate, Candidate, ChoiceContext, NoCandidate, PlanKind,
};

impl Active {
    /// The replica to promote in place of `old`: `forced` names the operator's
    /// target, whose `nofailover` tag `ignore_nofailover` lifts.
    pub(super) fn choose(
        &self,
        old: &LeaderRecord,
        forced: Option<&str>,
        ignore_nofailover: bool,
    ) -> Result<Candidate, NoCandidate> {
        let mut members = self.snap.members.clone();
        if let (Some(target), true) = (forced, ignore_nofailover) {
            if let Some(m) = members.get_mut(target) {
                m.tags.nofailover = false;
            }
        }
        let sync_set = self.snap.sync.as_ref().map(|s| s.value.standbys.clone());
        let ctx = ChoiceContext {
            now: Instant::now(),
            old_primary: &old.node,
            primary_lsn: self.primary_positions.get(&old.node).copied(),
            // Replicas' reported timelines may lag (e.g. read from the last
            // restartpoint); streaming state and positions decide instead.
            timeline: None,
            sync_standbys: sync_set.as_ref(),
        };
        choose_candidate(
            &members,
            self.detector.reports(),
            &self.snap.config,
            &ctx,
            forced,
        )
    }

    /// Starts `op` as a plan, or answers `reply` with why not.
    pub(super) fn start_operation(
        &mut self,
        shell: &Shell,
        op: Operation,
        reply: oneshot::Sender<OperationResult>,
    ) {
        let refuse = |reply: oneshot::Sender<OperationResult>, why: String| {
            let _ = reply.send(Err(why));
        };
        if self.plan.is_some() {
            return refuse(
                reply,
                "a failover or switchover is already in progress".into(),
            );
        }
        let Some(leader) = self.snap.leader.as_ref().map(|l| l.value.clone()) else {
            return refuse(reply, "no leader yet (cluster not bootstrapped)".into());
        };
        if !leader.is_serving() {
            return refuse(reply, "a failover is in progress".into());
        }
        let now = Instant::now();
        let (kind, candidate) = match &op {
            Operation::Switchover { to } => {
                let old_reachable = self
                    .fresh_heartbeat(&leader.node, now)
                    .is_some_and(|hb| hb.pg_up);
                if !old_reachable {
                    return refuse(
                        reply,
                        format!(
                            "the primary {} is not reporting healthy; use failover",
                            leader.node
                        ),
                    );
                }
                if to.as_deref() == Some(leader.node.as_str()) {
                    return refuse(reply, format!("{} is already the primary", leader.node));
                }
                (
                    PlanKind::Switchover,
                    self.choose(&leader, to.as_deref(), false),
                )
            }
            Operation::Failover { to, force } => {
                if *to == leader.node {
                    return refuse(reply, format!("{to} is already the primary"));
                }
                let chosen = self.choose(&leader, Some(to), *force);
                if let (Ok(c), false) = (&chosen, *force) {
                    let sync_set = self.snap.sync.as_ref().map(|s| &s.value.standbys);
                    if let Err(why) = check_unforced(to, c, &self.snap.config, sync_set) {
                        return refuse(reply, why.to_string());
                    }
                }
                (PlanKind::Failover, chosen)
            }
        };
        match candidate {
            Ok(candidate) => {
                info!(?op, candidate = %candidate.node.node, "operation accepted");
                self.start_plan(kind, &leader, candidate, Some(reply));
            }
            Err(e) => {
                shell.event("no_candidate", None, leader.epoch, e.to_string());
                refuse(reply, e.to_string())
            }
        }
    }
}
