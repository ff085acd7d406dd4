//! The client side of the engine: what a client message needs (its route, a wait, an
//! answer of the proxy's own), decided from the transaction, the open batch, the
//! statement's analysis and what the session holds. A batch that started on a replica
//! and then needs the primary is ended on the replica with the proxy's own Sync first.

use std::sync::Arc;

use bytes::Bytes;
use meridian_sqlroute::{Analysis, TxEffect};

use super::io::{Env, Route, Step};
use super::local::{self};
use super::pipeline::{Expect, Internal};
use super::tx::Tx;
use super::{analyze, frontend_flush, Engine};
use crate::error::ProxyError;
use crate::protocol::frontend::{self, Bind, FrontendMsg, Target};
use crate::route::{self, SessionView, Which};
use crate::wire::{self, Frame};

impl Engine {
    // ----- client messages -----

    /// What client message `msg` (decoded from `frame`) needs.
    pub fn on_client(&mut self, frame: &Frame, msg: &FrontendMsg, env: &Env) -> Step {
        let step = self.plan(frame, msg, env);
        self.drain_synthetic();
        step
    }

    pub(super) fn plan(&mut self, frame: &Frame, msg: &FrontendMsg, env: &Env) -> Step {
        if let Some(w) = self.copy_in {
            return self.copy_message(w, frame, msg);
        }
        match msg {
            FrontendMsg::Terminate => return Step::Terminate,
            FrontendMsg::Unknown(tag) => {
                self.fatal(&ProxyError::UnknownMessageType(*tag));
                return Step::Done;
            }
            // Outside COPY the server ignores these (a COPY that failed leaves the client
            // still sending data).
            FrontendMsg::CopyData | FrontendMsg::CopyDone | FrontendMsg::CopyFail => {
                return Step::Done
            }
            FrontendMsg::Sync => {}
            _ if self.pipe.skipping => return Step::Done,
            _ => {}
        }
        match msg {
            FrontendMsg::Query(text) => self.plan_query(text, env),
            FrontendMsg::FunctionCall | FrontendMsg::Malformed(b'Q' | b'F') => {
                self.plan_opaque(env)
            }
            _ => self.plan_extended(msg, env),
        }
    }

    pub(super) fn copy_message(&mut self, w: Which, frame: &Frame, msg: &FrontendMsg) -> Step {
        match msg {
            FrontendMsg::Terminate => return Step::Terminate,
            FrontendMsg::CopyData | FrontendMsg::Sync | FrontendMsg::Flush => {}
            // CopyDone/CopyFail end COPY mode; anything else makes the server fail the COPY
            // (it consumes the message): either way, what follows is normal traffic.
            _ => self.copy_in = None,
        }
        self.send(w, frame);
        Step::Done
    }

    pub(super) fn plan_query(&mut self, text: &Bytes, env: &Env) -> Step {
        let analysis = analyze(env, text);
        if let Some(w) = self.pipe.batch {
            // A Query in the middle of a batch runs where the batch runs, unless the batch
            // is on a replica and this needs the primary.
            if w == Which::Replica && self.target_for(&analysis, env) == Which::Primary {
                return self.move_batch_off_replica();
            }
            return self.route(w, Some(analysis));
        }
        if self.tx == Tx::Lost {
            self.answer_lost(analysis.tx_effect(), false);
            return Step::Done;
        }
        let bound = self.cfg.bound;
        let stmts = &self.stmts;
        if let Some(cmd) = local::recognise(text, |n| !bound && stmts.is_client_statement(n)) {
            if !self.pipe.is_empty() {
                return Step::Wait;
            }
            self.run_local(&cmd, None, true);
            return Step::Done;
        }
        let single = analysis.statements.len() == 1;
        let tx_effect = analysis.tx_effect();
        if !bound
            && self.tx == Tx::Idle
            && self.pipe.is_empty()
            && single
            && matches!(tx_effect, TxEffect::Begin { .. })
            && !analysis.hint.primary
        {
            // Defer: the transaction's first statement shows where it runs.
            self.tx = Tx::Deferred {
                frame: frontend::query(text),
                read_only: matches!(tx_effect, TxEffect::Begin { read_only: true }),
            };
            self.client(&wire::command_complete("BEGIN"));
            self.client(&wire::ready_for_query(b'T'));
            return Step::Done;
        }
        if matches!(self.tx, Tx::Deferred { .. })
            && single
            && matches!(tx_effect, TxEffect::Commit | TxEffect::Rollback)
        {
            // An empty transaction never touches a backend.
            self.tx = Tx::Idle;
            let tag = if tx_effect == TxEffect::Commit {
                "COMMIT"
            } else {
                "ROLLBACK"
            };
            self.client(&wire::command_complete(tag));
            self.client(&wire::ready_for_query(b'I'));
            return Step::Done;
        }
        let target = self.target_for(&analysis, env);
        self.route(target, Some(analysis))
    }

    /// A message whose content does not route it: where the session already is.
    pub(super) fn plan_opaque(&mut self, env: &Env) -> Step {
        let target = self
            .pipe
            .batch
            .or(self.tx.backend())
            .or(env.held())
            .unwrap_or(Which::Primary);
        self.route(target, None)
    }

    pub(super) fn route(&self, target: Which, analysis: Option<Arc<Analysis>>) -> Step {
        if self.pipe.busy_elsewhere(target) {
            return Step::Wait;
        }
        Step::Route(Route { target, analysis })
    }

    pub(super) fn target_for(&self, analysis: &Analysis, env: &Env) -> Which {
        if self.cfg.bound {
            return Which::Primary;
        }
        let view = SessionView {
            in_tx: self.tx.backend(),
            pinned: self.pin.is_some(),
            read_only_session: self.params.read_only(),
            replica_available: env.replica_available,
            held: env.held(),
        };
        let target = match &self.tx {
            Tx::Deferred { read_only, .. } => {
                route::route_deferred_begin(*read_only, analysis, view)
            }
            _ => route::route(analysis, env.catalog, view).0,
        };
        // A hot standby cannot read unlogged relations: outside a transaction such a read
        // goes to the primary.
        if target == Which::Replica
            && view.in_tx.is_none()
            && analysis
                .tables()
                .iter()
                .any(|t| (env.unlogged)(t.rsplit('.').next().unwrap_or(t)))
        {
            return Which::Primary;
        }
        target
    }

    pub(super) fn plan_extended(&mut self, msg: &FrontendMsg, env: &Env) -> Step {
        if self.local_extended(msg) {
            return Step::Done;
        }
        if self.tx == Tx::Lost {
            self.lost_extended(msg, env);
            return Step::Done;
        }
        let analysis = match msg {
            FrontendMsg::Sync => {
                return match self.pipe.batch {
                    Some(w) => self.route(w, None),
                    None => {
                        self.pipe.skipping = false;
                        self.pipe.synthetic(Expect::SyntheticReady);
                        self.drain_synthetic();
                        Step::Done
                    }
                };
            }
            FrontendMsg::Flush => {
                if let Some(w) = self.pipe.batch.or(self.pipe.active()) {
                    self.send(w, &frontend_flush());
                }
                return Step::Done;
            }
            FrontendMsg::Parse(p) if self.stmts.parse_must_wait(p) => {
                // Whether the statement exists depends on an answer still due.
                return Step::Wait;
            }
            FrontendMsg::Bind(Bind {
                statement: name, ..
            })
            | FrontendMsg::Describe(Target::Statement, name)
                if self.stmts.use_must_wait(name) =>
            {
                return Step::Wait;
            }
            FrontendMsg::Parse(p) => Some(analyze(env, &p.query)),
            FrontendMsg::Bind(b) => self.stmts.lookup(&b.statement).map(|s| s.analysis.clone()),
            FrontendMsg::Describe(Target::Statement, name) => {
                self.stmts.lookup(name).map(|s| s.analysis.clone())
            }
            FrontendMsg::Execute { portal, .. } => {
                self.stmts.portal(portal).map(|s| s.analysis.clone())
            }
            FrontendMsg::Close(Target::Statement, name)
                if !self.cfg.bound && self.stmts.is_client_statement(name) =>
            {
                // The server keeps the statement for reuse: the proxy forgets the name and
                // answers. But only once what was sent before it succeeded (after an error
                // the server would skip the Close): make the backend answer everything now.
                if let Some(w) = self.pipe.active() {
                    self.send(w, &frontend_flush());
                    return Step::Wait;
                }
                self.stmts.close_statement(name);
                self.answer(Frame::new(b'3', &[]));
                return Step::Done;
            }
            _ => None,
        };
        let target = match (self.pipe.batch, &analysis) {
            (Some(Which::Replica), Some(a)) if self.target_for(a, env) == Which::Primary => {
                return self.move_batch_off_replica();
            }
            (Some(w), _) => w,
            (None, Some(a)) => self.target_for(a, env),
            (None, None) => return self.plan_opaque(env),
        };
        self.route(target, analysis)
    }

    /// The batch started on a replica and now needs the primary: end the replica's part
    /// with the proxy's own Sync (it only read, so ending its implicit transaction early
    /// changes nothing the client can see) and go on on the primary once the replica has
    /// answered (an error there means the rest of the batch is skipped).
    pub(super) fn move_batch_off_replica(&mut self) -> Step {
        self.send(Which::Replica, &frontend::sync());
        self.pipe
            .expect(Which::Replica, Expect::Internal(Internal::BatchEnd));
        self.stmts.next_batch();
        self.pipe.batch = None;
        self.pipe.draining = true;
        Step::Wait
    }
}
