//! Bookkeeping of the commands the coordinator sends to agents, pure (time passed in).
//!
//! Every command has an id unique in this coordinator process and is kept pending
//! per (node, kind) until its agent acknowledges it; an unacknowledged command is
//! re-sent with the same id after the retry interval (commands are idempotent, see
//! docs/control-path.md). Asking for a different command of the same kind replaces
//! the pending one (e.g. `Follow` of a newer epoch). The last outcome per
//! (node, kind) is kept so that callers can ask "did `node` acknowledge `Fence` of
//! epoch ≥ N", and so that a command already carried out is not sent again before
//! `redo_after` (a `Follow` whose effect is not yet visible in heartbeats, say).
//! This module only decides *what* to send; the QUIC shell sends it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meridian_shared::envelope::{AckResult, CommandId, CoordMsg};
use meridian_shared::epoch::Epoch;

/// The kinds of commands tracked (one pending command per node and kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CommandKind {
    Promote,
    Follow,
    Fence,
    SetSyncStandbys,
}

/// A command without its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandSpec {
    Promote {
        epoch: Epoch,
        /// See `CoordMsg::Promote`.
        old_fenced: bool,
    },
    Follow {
        leader: String,
        pg_addr: String,
        epoch: Epoch,
    },
    Fence {
        epoch: Epoch,
    },
    SetSyncStandbys {
        value: String,
        epoch: Epoch,
    },
}

impl CommandSpec {
    pub fn kind(&self) -> CommandKind {
        match self {
            CommandSpec::Promote { .. } => CommandKind::Promote,
            CommandSpec::Follow { .. } => CommandKind::Follow,
            CommandSpec::Fence { .. } => CommandKind::Fence,
            CommandSpec::SetSyncStandbys { .. } => CommandKind::SetSyncStandbys,
        }
    }

    pub fn epoch(&self) -> Epoch {
        match self {
            CommandSpec::Promote { epoch, .. }
            | CommandSpec::Follow { epoch, .. }
            | CommandSpec::Fence { epoch }
            | CommandSpec::SetSyncStandbys { epoch, .. } => *epoch,
        }
    }

    /// The wire message carrying this command as `id`.
    pub fn to_msg(&self, id: CommandId) -> CoordMsg {
        match self.clone() {
            CommandSpec::Promote { epoch, old_fenced } => CoordMsg::Promote {
                id,
                epoch,
                old_fenced,
            },
            CommandSpec::Follow {
                leader,
                pg_addr,
                epoch,
            } => CoordMsg::Follow {
                id,
                leader,
                pg_addr,
                epoch,
            },
            CommandSpec::Fence { epoch } => CoordMsg::Fence { id, epoch },
            CommandSpec::SetSyncStandbys { value, epoch } => {
                CoordMsg::SetSyncStandbys { id, value, epoch }
            }
        }
    }
}

/// A command sent and not yet acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub id: CommandId,
    pub spec: CommandSpec,
    pub first_sent: Instant,
    pub last_sent: Instant,
    pub attempts: u32,
}

/// The last acknowledged command of one kind on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub spec: CommandSpec,
    pub result: AckResult,
    pub at: Instant,
}

/// Pending commands and last outcomes, per node and kind.
#[derive(Clone, Debug)]
pub struct CommandBook {
    next_id: CommandId,
    retry: Duration,
    pending: BTreeMap<(String, CommandKind), Pending>,
    outcomes: BTreeMap<(String, CommandKind), Outcome>,
}

impl CommandBook {
    /// A book whose ids start at `first_id` and whose unacknowledged commands are
    /// re-sent after `retry`.
    pub fn new(first_id: CommandId, retry: Duration) -> Self {
        CommandBook {
            next_id: first_id,
            retry,
            pending: BTreeMap::new(),
            outcomes: BTreeMap::new(),
        }
    }

    /// Makes sure `spec` is carried out on `node`; returns the message to send now,
    /// if any. Nothing is sent while the same command is pending (re-sending is
    /// [`CommandBook::due`]'s job), nor within `redo_after` of the same command's
    /// `Ok`, nor within the retry interval of its failure.
    pub fn ensure(
        &mut self,
        node: &str,
        spec: CommandSpec,
        now: Instant,
        redo_after: Duration,
    ) -> Option<CoordMsg> {
        let key = (node.to_string(), spec.kind());
        if self.pending.get(&key).is_some_and(|p| p.spec == spec) {
            return None;
        }
        if let Some(outcome) = self.outcomes.get(&key).filter(|o| o.spec == spec) {
            let wait = if outcome.result == AckResult::Ok {
                redo_after
            } else {
                self.retry
            };
            if now.saturating_duration_since(outcome.at) < wait {
                return None;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let msg = spec.to_msg(id);
        self.pending.insert(
            key,
            Pending {
                id,
                spec,
                first_sent: now,
                last_sent: now,
                attempts: 1,
            },
        );
        Some(msg)
    }

    /// Unacknowledged commands whose retry interval has passed, to send again now.
    pub fn due(&mut self, now: Instant) -> Vec<(String, CoordMsg)> {
        let retry = self.retry;
        self.pending
            .iter_mut()
            .filter(|(_, p)| now.saturating_duration_since(p.last_sent) >= retry)
            .map(|((node, _), p)| {
                p.last_sent = now;
                p.attempts += 1;
                (node.clone(), p.spec.to_msg(p.id))
            })
            .collect()
    }

    /// Every pending command of `node` (to send at once when its agent reconnects).
    pub fn pending_for(&mut self, node: &str, now: Instant) -> Vec<CoordMsg> {
        self.pending
            .iter_mut()
            .filter(|((n, _), _)| n == node)
            .map(|(_, p)| {
                p.last_sent = now;
                p.attempts += 1;
                p.spec.to_msg(p.id)
            })
            .collect()
    }

    /// Records `node`'s acknowledgement of `id`. Returns the command it completes,
    /// or `None` for an unknown id (e.g. a late ack of a replaced command).
    pub fn ack(
        &mut self,
        node: &str,
        id: CommandId,
        result: AckResult,
        now: Instant,
    ) -> Option<CommandSpec> {
        let key = self
            .pending
            .iter()
            .find(|((n, _), p)| n == node && p.id == id)
            .map(|(key, _)| key.clone())?;
        let pending = self.pending.remove(&key)?;
        self.outcomes.insert(
            key,
            Outcome {
                spec: pending.spec.clone(),
                result,
                at: now,
            },
        );
        Some(pending.spec)
    }

    /// The pending command of `kind` on `node`.
    pub fn pending(&self, node: &str, kind: CommandKind) -> Option<&Pending> {
        self.pending.get(&(node.to_string(), kind))
    }

    /// The last outcome of `kind` on `node`.
    pub fn outcome(&self, node: &str, kind: CommandKind) -> Option<&Outcome> {
        self.outcomes.get(&(node.to_string(), kind))
    }

    /// Whether `node` acknowledged `Ok` a command of `kind` with epoch ≥ `epoch`.
    pub fn acked_ok(&self, node: &str, kind: CommandKind, epoch: Epoch) -> bool {
        self.outcome(node, kind)
            .is_some_and(|o| o.result == AckResult::Ok && o.spec.epoch() >= epoch)
    }

    /// Stops re-sending `kind` to `node` (the command is no longer wanted).
    pub fn cancel(&mut self, node: &str, kind: CommandKind) {
        self.pending.remove(&(node.to_string(), kind));
    }

    /// Number of commands waiting for an acknowledgement.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: Duration = Duration::from_secs(1);

    fn fence(epoch: u64) -> CommandSpec {
        CommandSpec::Fence {
            epoch: Epoch(epoch),
        }
    }

    fn id_of(msg: &CoordMsg) -> CommandId {
        match msg {
            CoordMsg::Promote { id, .. }
            | CoordMsg::Follow { id, .. }
            | CoordMsg::Fence { id, .. }
            | CoordMsg::SetSyncStandbys { id, .. }
            | CoordMsg::Invalidate { id, .. }
            | CoordMsg::FlushCache { id, .. } => *id,
            CoordMsg::Ack { .. } | CoordMsg::Horizon { .. } => panic!("not a command"),
        }
    }

    #[test]
    fn a_command_is_sent_once_and_resent_with_the_same_id_until_acked() {
        let t0 = Instant::now();
        let mut book = CommandBook::new(100, RETRY);
        let msg = book.ensure("a", fence(2), t0, RETRY).unwrap();
        assert_eq!(
            msg,
            CoordMsg::Fence {
                id: 100,
                epoch: Epoch(2)
            }
        );
        assert_eq!(book.ensure("a", fence(2), t0, RETRY), None);
        assert!(book.due(t0 + Duration::from_millis(999)).is_empty());
        let due = book.due(t0 + RETRY);
        assert_eq!(due, vec![("a".to_string(), msg.clone())]);
        assert!(book.due(t0 + RETRY + Duration::from_millis(10)).is_empty());
        assert_eq!(book.pending("a", CommandKind::Fence).unwrap().attempts, 2);
        assert_eq!(
            book.ack("a", 100, AckResult::Ok, t0 + RETRY),
            Some(fence(2))
        );
        assert!(book.due(t0 + RETRY * 5).is_empty());
        assert!(book.acked_ok("a", CommandKind::Fence, Epoch(2)));
        assert!(!book.acked_ok("a", CommandKind::Fence, Epoch(3)));
        assert_eq!(book.pending_count(), 0);
    }

    #[test]
    fn ids_are_unique_and_a_new_spec_replaces_the_pending_one() {
        let t0 = Instant::now();
        let mut book = CommandBook::new(1, RETRY);
        let first = book.ensure("a", fence(2), t0, RETRY).unwrap();
        let other_node = book.ensure("b", fence(2), t0, RETRY).unwrap();
        let newer = book.ensure("a", fence(3), t0, RETRY).unwrap();
        let ids = [id_of(&first), id_of(&other_node), id_of(&newer)];
        assert_eq!(ids, [1, 2, 3]);
        // The ack of the replaced command completes nothing.
        assert_eq!(book.ack("a", 1, AckResult::Ok, t0), None);
        assert!(!book.acked_ok("a", CommandKind::Fence, Epoch(2)));
        // An ack from the wrong node completes nothing either.
        assert_eq!(book.ack("b", 3, AckResult::Ok, t0), None);
        assert_eq!(book.ack("a", 3, AckResult::Ok, t0), Some(fence(3)));
    }

    #[test]
    fn done_commands_are_redone_only_after_redo_after_and_failures_after_retry() {
        let t0 = Instant::now();
        let redo = Duration::from_secs(5);
        let mut book = CommandBook::new(1, RETRY);
        let follow = CommandSpec::Follow {
            leader: "p".into(),
            pg_addr: "h:1".into(),
            epoch: Epoch(1),
        };
        book.ensure("a", follow.clone(), t0, redo).unwrap();
        book.ack("a", 1, AckResult::Ok, t0);
        assert_eq!(book.ensure("a", follow.clone(), t0 + RETRY, redo), None);
        assert!(book.ensure("a", follow.clone(), t0 + redo, redo).is_some());
        book.ack(
            "a",
            2,
            AckResult::Failed {
                message: "x".into(),
            },
            t0 + redo,
        );
        assert_eq!(
            book.ensure("a", follow.clone(), t0 + redo + RETRY / 2, redo),
            None
        );
        assert!(book.ensure("a", follow, t0 + redo + RETRY, redo).is_some());
        assert!(!book.acked_ok("a", CommandKind::Follow, Epoch(1)));
    }

    #[test]
    fn reconnect_resends_only_that_nodes_commands_and_cancel_stops_them() {
        let t0 = Instant::now();
        let mut book = CommandBook::new(1, RETRY);
        book.ensure("a", fence(2), t0, RETRY);
        book.ensure(
            "a",
            CommandSpec::Promote {
                epoch: Epoch(2),
                old_fenced: true,
            },
            t0,
            RETRY,
        );
        book.ensure("b", fence(2), t0, RETRY);
        assert_eq!(book.pending_for("a", t0).len(), 2);
        book.cancel("a", CommandKind::Fence);
        let due = book.due(t0 + RETRY);
        let nodes: Vec<&str> = due.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(nodes, ["a", "b"]);
        assert!(matches!(due[0].1, CoordMsg::Promote { .. }));
    }
}
