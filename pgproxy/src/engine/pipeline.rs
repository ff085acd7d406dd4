//! What the backend will answer: one [`Expect`] per message sent to it, in order, plus
//! the answers the proxy gives itself in between ([`Expect::Synthetic`]). Backend
//! messages are matched against the head of the queue.
//!
//! The rules are the protocol's: a simple `Query` or `FunctionCall` is answered by
//! results and one `ReadyForQuery`; each extended message by its completion message; a
//! `Sync` by `ReadyForQuery`; `Flush` by nothing. After an `ErrorResponse` to an extended
//! message the server skips every message up to the next `Sync` ([`Pipeline::prune_to_sync`]):
//! those items get no answer, and when no `Sync` has been sent yet, the client's own
//! messages up to its `Sync` are dropped by the session as the server would drop them
//! ([`Pipeline::skipping`]). Only one backend answers at a time ([`Pipeline::active`]); the
//! extended messages since the last `Sync` all went to [`Pipeline::batch`].

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use meridian_sqlroute::Analysis;

use crate::route::Which;
use crate::wire::Frame;

/// A query the proxy sends on its own; its answer never reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Internal {
    /// The session's parameters replayed on this backend (`login`: the startup
    /// parameters, whose refusal ends the login).
    Prelude { login: bool },
    /// A deferred `BEGIN`.
    Begin,
    /// `pg_current_wal_insert_lsn()` after a commit (read-your-writes).
    CommitLsn,
    /// `pg_last_wal_replay_lsn()` before or after a read being cached.
    ReplayLsn { after: bool },
    /// The proxy's own `Sync` ending a replica's part of a batch that moves to the primary.
    BatchEnd,
}

/// What one message sent to the backend will be answered with.
#[derive(Debug, Clone)]
pub enum Expect {
    /// The client's simple `Query` or `FunctionCall`: results, then `ReadyForQuery`.
    Query {
        analysis: Option<Arc<Analysis>>,
        failed: bool,
        /// A read sent to a replica outside a transaction: the client's message, to run
        /// again on the primary if the replica refuses it before answering anything.
        replay: Option<Frame>,
        /// Something of the answer reached the client (no replay after that).
        answered: bool,
    },
    /// The proxy's own query or `Sync`, up to its `ReadyForQuery`, swallowed.
    Internal(Internal),
    /// `ParseComplete`. `client`: the client's statement name this Parse created (to
    /// forget on failure); `server`: the server-side name (to unmark on failure).
    Parse {
        swallow: bool,
        client: Option<Bytes>,
        server: Option<Bytes>,
    },
    /// `BindComplete`; `server`: the statement bound (its plan may turn out stale).
    Bind { server: Option<Bytes> },
    /// `ParameterDescription`? then `RowDescription`/`NoData`.
    Describe,
    /// Rows, then `CommandComplete`/`EmptyQueryResponse`/`PortalSuspended` (or COPY).
    Execute {
        analysis: Option<Arc<Analysis>>,
        server: Option<Bytes>,
    },
    /// `CloseComplete`.
    Close { swallow: bool },
    /// The client's `Sync`: `ReadyForQuery`.
    Sync,
    /// An answer of the proxy's own, emitted when it reaches the head.
    Synthetic(Frame),
    /// The proxy's `ParseComplete` for the client's statement `client` (the backend holds
    /// the statement already); if an earlier error prunes it, the name was never created.
    SyntheticParse { client: Bytes },
    /// A `ReadyForQuery` of the proxy's own, its status read when it reaches the head.
    SyntheticReady,
    /// An `Execute` of a portal that does not exist, sent to make the backend fail the
    /// batch (and its transaction) as a proxy-raised error would directly; the backend's
    /// error is replaced by `error`. `simple`: followed by a `Sync` and answered like a
    /// simple query (its `ReadyForQuery` is the client's).
    Poison { error: Frame, simple: bool },
}

impl Expect {
    /// Answered by the proxy, not by a backend.
    pub fn is_synthetic(&self) -> bool {
        matches!(
            self,
            Expect::Synthetic(_) | Expect::SyntheticReady | Expect::SyntheticParse { .. }
        )
    }

    /// Ends with `ReadyForQuery`.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Expect::Query { .. }
                | Expect::Internal(_)
                | Expect::Sync
                | Expect::SyntheticReady
                | Expect::Poison { simple: true, .. }
        )
    }

    /// A client request whose answers the client waits for.
    pub fn is_client(&self) -> bool {
        !matches!(
            self,
            Expect::Internal(_)
                | Expect::Parse { swallow: true, .. }
                | Expect::Close { swallow: true }
        )
    }
}

/// The expected answers of the backend currently answering, and the batch state.
#[derive(Debug, Default)]
pub struct Pipeline {
    queue: VecDeque<Expect>,
    /// The backend the queue's backend items were sent to.
    active: Option<Which>,
    /// The backend the extended messages since the client's last `Sync` went to.
    pub batch: Option<Which>,
    /// The current batch failed before its `Sync` reached the server: drop the client's
    /// messages up to its `Sync`.
    pub skipping: bool,
    /// The batch moved off a backend (the proxy's own Sync ended its part): nothing more
    /// may be sent anywhere until that backend has answered everything, because an error
    /// in its part means the rest of the client's batch must be skipped.
    pub draining: bool,
    /// How many answers of the proxy's own are queued (draining them is free when none).
    synthetic: usize,
}

/// What pruning after an extended-protocol error removed (for the session's bookkeeping):
/// the `Parse`s that never ran, as (client name, server name) where known.
#[derive(Debug, Default, PartialEq)]
pub struct Pruned {
    pub parses: Vec<(Option<Bytes>, Option<Bytes>)>,
}

impl Pipeline {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// The backend answering, if any answer is still expected.
    pub fn active(&self) -> Option<Which> {
        if self.queue.is_empty() {
            None
        } else {
            self.active
        }
    }

    /// True if a message for `target` must wait: another backend still has answers due,
    /// or a batch that moved is still [`Pipeline::draining`].
    pub fn busy_elsewhere(&self, target: Which) -> bool {
        let owed = self.queue.iter().any(|e| !e.is_synthetic());
        owed && (self.draining || self.active().is_some_and(|a| a != target))
    }

    /// Records a message sent to backend `w`.
    pub fn expect(&mut self, w: Which, e: Expect) {
        if e.is_synthetic() {
            self.synthetic += 1;
        } else {
            self.active = Some(w);
        }
        self.queue.push_back(e);
    }

    /// Records an answer of the proxy's own, in order behind what is pending.
    pub fn synthetic(&mut self, e: Expect) {
        debug_assert!(e.is_synthetic());
        self.synthetic += 1;
        self.queue.push_back(e);
    }

    pub fn head(&self) -> Option<&Expect> {
        self.queue.front()
    }

    pub fn head_mut(&mut self) -> Option<&mut Expect> {
        self.queue.front_mut()
    }

    pub fn pop(&mut self) -> Option<Expect> {
        let e = self.queue.pop_front();
        if e.as_ref().is_some_and(Expect::is_synthetic) {
            self.synthetic -= 1;
        }
        if self.queue.is_empty() {
            self.draining = false;
        }
        e
    }

    /// Pops the synthetic items now at the head (to emit them).
    pub fn pop_synthetic(&mut self) -> Option<Expect> {
        if self.synthetic > 0 && self.queue.front().is_some_and(Expect::is_synthetic) {
            self.pop()
        } else {
            None
        }
    }

    /// After an `ErrorResponse` answering the head (an extended message): the server
    /// skips everything up to the next `Sync`. Removes those items; sets
    /// [`Pipeline::skipping`] when no `Sync` had been sent yet.
    pub fn prune_to_sync(&mut self) -> Pruned {
        let mut pruned = Pruned::default();
        while let Some(e) = self.queue.front() {
            match e {
                Expect::Sync => return pruned,
                // The proxy's own Sync ends the server's skipping, not the client's batch.
                Expect::Internal(Internal::BatchEnd) => {
                    self.skipping = true;
                    return pruned;
                }
                _ => {}
            }
            match self.pop() {
                Some(Expect::Parse { client, server, .. }) => pruned.parses.push((client, server)),
                Some(Expect::SyntheticParse { client }) => pruned.parses.push((Some(client), None)),
                _ => {}
            }
        }
        self.skipping = true;
        pruned
    }

    /// Everything still expected, removed (the backend was lost).
    pub fn take_all(&mut self) -> Vec<Expect> {
        self.batch = None;
        self.draining = false;
        self.synthetic = 0;
        self.queue.drain(..).collect()
    }

    /// During COPY IN the server ignores `Sync`: the client's Syncs already sent behind
    /// the COPY get no answer.
    pub fn drop_syncs_behind_head(&mut self) {
        // (Syncs are never synthetic: the count stays right.)
        let head = self.queue.pop_front();
        self.queue.retain(|e| !matches!(e, Expect::Sync));
        if let Some(h) = head {
            self.queue.push_front(h);
        }
    }

    /// True if any client request is still unanswered.
    pub fn client_waiting(&self) -> bool {
        self.queue.iter().any(Expect::is_client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &'static [u8]) -> Expect {
        Expect::Parse {
            swallow: false,
            client: Some(Bytes::from_static(name)),
            server: Some(Bytes::from_static(b"mrd_1")),
        }
    }

    #[test]
    fn an_error_prunes_up_to_the_sync_and_keeps_what_follows() {
        let mut p = Pipeline::default();
        let w = Which::Primary;
        p.expect(w, Expect::Bind { server: None });
        p.expect(w, parse(b"s2"));
        p.expect(
            w,
            Expect::Execute {
                analysis: None,
                server: None,
            },
        );
        p.expect(w, Expect::Sync);
        p.expect(w, parse(b"s3"));
        let pruned = p.prune_to_sync();
        assert_eq!(
            pruned.parses,
            vec![(
                Some(Bytes::from_static(b"s2")),
                Some(Bytes::from_static(b"mrd_1"))
            )]
        );
        assert!(!p.skipping);
        assert!(matches!(p.pop(), Some(Expect::Sync)));
        assert!(matches!(p.pop(), Some(Expect::Parse { .. })));
    }

    #[test]
    fn an_error_before_any_sync_makes_the_session_skip() {
        let mut p = Pipeline::default();
        p.expect(Which::Primary, parse(b"a"));
        p.expect(Which::Primary, Expect::Describe);
        p.prune_to_sync();
        assert!(p.skipping);
        assert!(p.is_empty());
        assert_eq!(p.active(), None);
    }

    #[test]
    fn synthetic_items_do_not_make_a_backend_busy() {
        let mut p = Pipeline::default();
        p.synthetic(Expect::SyntheticReady);
        assert!(!p.busy_elsewhere(Which::Replica));
        p.expect(Which::Primary, Expect::Sync);
        assert!(p.busy_elsewhere(Which::Replica));
        assert!(!p.busy_elsewhere(Which::Primary));
    }

    #[test]
    fn copy_in_drops_syncs_sent_behind_it() {
        let mut p = Pipeline::default();
        p.expect(
            Which::Primary,
            Expect::Execute {
                analysis: None,
                server: None,
            },
        );
        p.expect(Which::Primary, Expect::Sync);
        p.drop_syncs_behind_head();
        assert_eq!(p.len(), 1);
    }
}
