//! Talking with the agents: their QUIC sessions, commands sent through the
//! [`CommandBook`](crate::commands::CommandBook) (kept until acknowledged, re-sent
//! on reconnect and periodically), and what arrives from them: heartbeats for the
//! detector, command acknowledgements, change batches for the cache fan-out, and
//! the primary's invalidation horizon, relayed to every agent.
//!
//! Nothing is sent once the election lease's local deadline has passed: another
//! coordinator may be in charge by then. A message from a session that has been
//! replaced by a newer one of the same node is dropped.

use std::time::{Duration, Instant};

use meridian_shared::envelope::{AckResult, AgentMsg, CoordMsg};
use meridian_shared::epoch::Epoch;
use meridian_shared::records::{LeaderState, Role};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Active, Shell};
use crate::commands::CommandSpec;
use crate::quic::Inbound;

/// A command carried out (`Ok`) whose effect heartbeats do not show yet is sent again after this.
const REDO_AFTER: Duration = Duration::from_secs(5);

/// One agent session.
pub(super) struct Session {
    id: u64,
    tx: mpsc::UnboundedSender<CoordMsg>,
}

impl Active {
    /// Sends `msg` to `node` if its agent is connected and the lease still holds.
    pub(super) fn send(&self, node: &str, msg: CoordMsg) {
        if Instant::now() >= *self.deadline.borrow() {
            // The lease may be gone and another coordinator in charge.
            debug!(node, ?msg, "command dropped: election lease expired");
            return;
        }
        match self.sessions.get(node) {
            Some(session) => {
                debug!(node, ?msg, "command");
                let _ = session.tx.send(msg);
            }
            None => debug!(node, ?msg, "command queued; agent not connected"),
        }
    }

    /// Makes sure `node` carries out `spec`: sends it unless the same command is
    /// pending or was carried out less than [`REDO_AFTER`] ago. True when sent.
    pub(super) fn ensure(&mut self, node: &str, spec: CommandSpec) -> bool {
        match self.book.ensure(node, spec, Instant::now(), REDO_AFTER) {
            Some(msg) => {
                self.send(node, msg);
                true
            }
            None => false,
        }
    }

    /// Re-sends the commands whose acknowledgement is overdue.
    pub(super) fn resend_due(&mut self, now: Instant) {
        for (node, msg) in self.book.due(now) {
            self.send(&node, msg);
        }
    }

    /// Tells each of `nodes` to follow `leader` (a `follow` event per command sent).
    pub(super) fn send_follows(
        &mut self,
        shell: &Shell,
        nodes: &[String],
        leader: &str,
        pg_addr: &str,
        epoch: Epoch,
    ) {
        for node in nodes {
            let spec = CommandSpec::Follow {
                leader: leader.to_string(),
                pg_addr: pg_addr.to_string(),
                epoch,
            };
            if self.ensure(node, spec) {
                shell.event(
                    "follow",
                    Some(node),
                    epoch,
                    format!("told to follow {leader} at {pg_addr}"),
                );
            }
        }
    }

    pub(super) fn on_inbound(&mut self, shell: &Shell, msg: Inbound) {
        match msg {
            Inbound::Connected {
                node, session, tx, ..
            } => {
                self.horizon.forget(&node);
                self.sessions
                    .insert(node.clone(), Session { id: session, tx });
                for msg in self.book.pending_for(&node, Instant::now()) {
                    self.send(&node, msg);
                }
            }
            Inbound::Disconnected { node, session } => {
                if self.sessions.get(&node).is_some_and(|s| s.id == session) {
                    self.sessions.remove(&node);
                    self.horizon.forget(&node);
                }
            }
            Inbound::Message {
                node,
                session,
                msg,
                at,
            } => {
                if self.sessions.get(&node).is_none_or(|s| s.id != session) {
                    return; // an older, replaced session
                }
                match msg {
                    AgentMsg::Hello { .. } => {}
                    AgentMsg::Heartbeat(hb) => {
                        if hb.node != node {
                            warn!(session_node = %node, heartbeat_node = %hb.node, "heartbeat names another node; ignored");
                            return;
                        }
                        // A node newly reporting its Postgres down may start a
                        // failover: decide at once.
                        let was_up = self
                            .detector
                            .reports()
                            .get(&node)
                            .is_none_or(|r| r.heartbeat.pg_up);
                        self.wake |= was_up && !hb.pg_up;
                        if hb.pg_up {
                            self.fenced.remove(&node);
                            if hb.role == Role::Primary {
                                if let Some(pos) = hb.position() {
                                    self.primary_positions.insert(node.clone(), pos);
                                }
                            }
                        }
                        if let Some(lsn) = hb.invalidated_lsn {
                            self.relay_horizon(&node, lsn);
                        }
                        self.detector.observe_heartbeat(at, hb);
                    }
                    AgentMsg::Ack { id, result } => self.on_ack(shell, &node, id, result),
                    AgentMsg::Changes {
                        batch_id,
                        tables,
                        commit_lsn,
                    } => self.on_changes(shell, &node, batch_id, tables, commit_lsn),
                }
            }
        }
    }

    /// Relays the serving leader's invalidation horizon to every connected agent.
    fn relay_horizon(&mut self, from: &str, lsn: meridian_shared::lsn::Lsn) {
        let leader = self
            .snap
            .leader
            .as_ref()
            .map(|l| &l.value)
            .filter(|l| l.state == LeaderState::Serving)
            .map(|l| (l.node.as_str(), l.epoch));
        let outs =
            self.horizon
                .on_heartbeat(from, lsn, leader, self.sessions.keys().map(String::as_str));
        for (node, msg) in outs {
            self.send(&node, msg);
        }
    }

    fn on_ack(&mut self, shell: &Shell, node: &str, id: u64, result: AckResult) {
        let now = Instant::now();
        let Some(spec) = self.book.ack(node, id, result.clone(), now) else {
            // Not a command of the book: an invalidation of the fan-out.
            self.on_fanout_ack(shell, node, id, &result, now);
            return;
        };
        // A plan or an operation may be waiting for this ack.
        self.wake = true;
        let epoch = spec.epoch();
        match (&spec, &result) {
            (CommandSpec::Fence { .. }, AckResult::Ok) => {
                self.fenced.insert(node.to_string());
                self.fence_acked(node, epoch, now);
                shell.event(
                    "fenced",
                    Some(node),
                    epoch,
                    "agent confirmed Fence: Postgres stopped".into(),
                );
            }
            (CommandSpec::SetSyncStandbys { value, .. }, AckResult::Ok) => {
                self.sync_standbys_acked(node, value, epoch);
            }
            (_, AckResult::Ok) => {}
            (_, AckResult::Stale { current }) => {
                warn!(
                    node,
                    ?spec,
                    current = current.0,
                    "agent refused a stale command"
                );
                self.snap_at = None;
            }
            (_, AckResult::Failed { message }) => {
                shell.event(
                    "error",
                    Some(node),
                    epoch,
                    format!("{:?} failed: {message}", spec.kind()),
                );
            }
        }
    }
}
