//! The active term's loop: one `select!` over the agents' messages, operator
//! operations, probe results and a 50 ms tick, until shutdown or the election
//! lease's deadline. Each tick re-reads etcd when due, re-sends commands, runs
//! the cache fan-out, starts queued operations, then does the one thing the
//! `leader` key calls for: bootstrap, advance a plan, resume a failover another
//! coordinator left half done, or steady-state watching. A command's ack, a
//! probe result or a node newly reporting its Postgres down runs that work at
//! once: a failover's steps wait on those, and need not also wait for a tick.
//!
//! Also here: the etcd snapshot refresh (with `paused`/`resumed` events and
//! forgetting departed nodes) and the shared views of that snapshot the other
//! parts of the term read. Stepping down answers every waiting operation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meridian_shared::envelope::Heartbeat;
use meridian_shared::epoch::Epoch;
use meridian_shared::records::LeaderState;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::election::{LeaseDeadline, TermEnd};
use super::{stopped, unix_ms, Active, Shell};
use crate::commands::CommandBook;
use crate::detector::{Detector, DetectorConfig};
use crate::fanout::{Fanout, FanoutConfig};
use crate::observe;
use crate::planner::NodeObservation;
use crate::store::{Snapshot, StoreError};

/// Decision loop period.
const TICK: Duration = Duration::from_millis(50);
/// etcd is re-read at least this often while active.
const REFRESH_ACTIVE: Duration = Duration::from_millis(100);
/// A node with no member key whose agent has been silent this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);

impl Active {
    pub(super) fn new(shell: &Shell, deadline: &LeaseDeadline) -> Self {
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        // Ids unique per process and unlikely to repeat across restarts.
        let first_id = unix_ms().saturating_mul(1000);
        Active {
            elected_at: Instant::now(),
            deadline: deadline.clone(),
            snap: Snapshot::default(),
            snap_at: None,
            detector: Detector::new(DetectorConfig {
                suspect_after: Duration::from_millis(500),
            }),
            book: CommandBook::new(first_id, shell.settings.command_retry),
            sessions: BTreeMap::new(),
            plan: None,
            probe_tx,
            probe_rx,
            probe_inflight: false,
            last_probe: None,
            primary_positions: BTreeMap::new(),
            fenced: BTreeSet::new(),
            sync_applied: None,
            sync_values: BTreeMap::new(),
            suspect_since: None,
            last_event: BTreeMap::new(),
            pending_ops: Vec::new(),
            // Fan-out command ids live far from the command book's.
            fanout: Fanout::new(FanoutConfig::default(), first_id.saturating_add(1 << 40)),
            cache_writes: Vec::new(),
            horizon: crate::horizon::HorizonRelay::default(),
            cache_seeded: false,
            wake: false,
        }
    }

    /// Acts until shutdown or until the lease's `deadline` passes.
    pub(super) async fn run(
        mut self,
        shell: &mut Shell,
        shutdown: &mut watch::Receiver<bool>,
        deadline: &LeaseDeadline,
    ) -> TermEnd {
        shell.event(
            "elected",
            None,
            Epoch::ZERO,
            format!("{} is the active coordinator", shell.settings.name),
        );
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                () = stopped(shutdown) => break TermEnd::Shutdown,
                Some(msg) = shell.inbound.recv() => self.on_inbound(shell, msg),
                Some(op) = shell.control.operations.recv() => self.pending_ops.push(op),
                Some((at, ok)) = self.probe_rx.recv() => {
                    self.probe_inflight = false;
                    self.detector.observe_probe(at, ok);
                    self.wake = true;
                }
                _ = tick.tick() => {
                    if Instant::now() >= *deadline.borrow() {
                        break TermEnd::LeaseLost;
                    }
                    self.wake = false;
                    self.on_tick(shell).await;
                }
            }
            // A failover's steps wait on acks, probes and heartbeats: acting on
            // them at once instead of at the next tick takes up to a tick off
            // each step. The lease deadline is left to the tick branch.
            if std::mem::take(&mut self.wake) && Instant::now() < *deadline.borrow() {
                self.on_tick(shell).await;
            }
        };
        self.step_down(shell, &end);
        end
    }

    /// Answers the running plan's and the queued operations' callers.
    fn step_down(&mut self, shell: &Shell, end: &TermEnd) {
        let why = match end {
            TermEnd::Shutdown => "shutting down",
            TermEnd::LeaseLost => "election lease lost",
        };
        if let Some(run) = self.plan.take() {
            if let Some(reply) = run.reply {
                let _ = reply.send(Err(format!(
                    "coordinator stepped down ({why}); another coordinator resumes the operation"
                )));
            }
        }
        for (_, reply) in self.pending_ops.drain(..) {
            let _ = reply.send(Err(format!("coordinator stepped down ({why})")));
        }
        shell.event(
            "stepped_down",
            None,
            self.snap.current_epoch(),
            why.to_string(),
        );
    }

    async fn on_tick(&mut self, shell: &mut Shell) {
        let now = Instant::now();
        if self
            .snap_at
            .is_none_or(|t| now.saturating_duration_since(t) >= REFRESH_ACTIVE)
        {
            self.refresh(shell).await;
        }
        if self.snap_at.is_none() {
            return; // nothing read from etcd yet: decide nothing
        }
        self.detector
            .set_config(DetectorConfig::from(&self.snap.config));
        self.resend_due(now);
        self.fanout_tick(shell).await;
        for (op, reply) in std::mem::take(&mut self.pending_ops) {
            self.start_operation(shell, op, reply);
        }
        match self.snap.leader.clone().map(|l| l.value) {
            None => self.bootstrap(shell).await,
            Some(_) if self.plan.is_some() => self.advance_plan(shell).await,
            Some(leader) if leader.state == LeaderState::FailingOver => {
                self.resume(shell, &leader);
                self.advance_plan(shell).await;
            }
            Some(leader) => self.steady(shell, &leader).await,
        }
        self.publish_status(shell);
    }

    /// Re-reads the cluster's keys from etcd.
    pub(super) async fn refresh(&mut self, shell: &mut Shell) {
        match crate::store::read_snapshot(&mut shell.etcd, &shell.keys).await {
            Ok(snap) => {
                if self.snap_at.is_some() && snap.config.paused != self.snap.config.paused {
                    let (kind, what) = if snap.config.paused {
                        ("paused", "automatic failover paused")
                    } else {
                        ("resumed", "automatic failover resumed")
                    };
                    shell.event(kind, None, snap.current_epoch(), what.to_string());
                }
                if snap.problems != self.snap.problems {
                    for problem in &snap.problems {
                        warn!(%problem, "undecodable record in etcd");
                    }
                }
                self.snap = snap;
                let now = Instant::now();
                self.snap_at = Some(now);
                let gone = observe::forgotten_nodes(
                    &self.snap.members,
                    self.detector.reports(),
                    now,
                    FORGET_AFTER,
                );
                for name in gone {
                    self.detector.forget(&name);
                    self.fenced.remove(&name);
                }
            }
            Err(e) => {
                let epoch = self.snap.current_epoch();
                self.event_limited(
                    shell,
                    "etcd",
                    "error",
                    None,
                    epoch,
                    format!("cannot read etcd: {e}"),
                );
            }
        }
    }

    /// `node`'s last heartbeat, if received within `suspect_after`.
    pub(super) fn fresh_heartbeat(&self, node: &str, now: Instant) -> Option<&Heartbeat> {
        self.detector
            .reports()
            .get(node)
            .filter(|r| r.is_fresh(now, self.snap.config.suspect_after))
            .map(|r| &r.heartbeat)
    }

    /// The planner's view of every node at `now`.
    pub(super) fn node_observations(&self, now: Instant) -> BTreeMap<String, NodeObservation> {
        observe::node_observations(
            &self.snap.members,
            self.detector.reports(),
            now,
            self.snap.config.suspect_after,
        )
    }

    /// Whether a newly elected coordinator still gives the agents time to
    /// reconnect before it acts on their silence (suspicion time plus their
    /// reconnect backoff).
    pub(super) fn within_election_grace(&self, now: Instant) -> bool {
        let grace = self.snap.config.suspect_after + super::steady::RECONNECT_GRACE;
        now.saturating_duration_since(self.elected_at) < grace
    }
}

/// Logs the outcome of an etcd transaction (`txn` names it) and says whether it
/// was committed; the caller re-reads etcd after it either way.
pub(super) fn committed(txn: &str, outcome: Result<bool, StoreError>) -> bool {
    match outcome {
        Ok(true) => true,
        Ok(false) => {
            debug!(txn, "txn lost a race; re-reading");
            false
        }
        Err(e) => {
            warn!(txn, error = %e, "txn failed");
            false
        }
    }
}
