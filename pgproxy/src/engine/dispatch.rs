//! Sending a routed client message to its backend: the deferred `BEGIN`, the session
//! parameters, statements re-prepared or renamed, what the statement does to the session
//! (pins, `DEALLOCATE`), the commit-LSN query behind commits, a cache fill's brackets;
//! and the answers when no backend could be had or the proxy itself refuses a message.

use std::sync::Arc;

use bytes::Bytes;
use meridian_sqlroute::{Analysis, Deallocate};
use tracing::debug;

use super::backend_state::BackendState;
use super::io::{Env, Event, Refusal, Route};
use super::pipeline::{Expect, Internal};
use super::statements::ParsePlan;
use super::tx::Tx;
use super::{Engine, POISON_PORTAL};
use crate::cache::fill::Fill;
use crate::cache::Plan;
use crate::error::{ProxyError, Severity};
use crate::protocol::backend::{self as be_msg};
use crate::protocol::frontend::{self, FrontendMsg, Target};
use crate::route::Which;
use crate::ryw;
use crate::wire::Frame;

impl Engine {
    /// Sends the client's message to backend `w`, which the session now holds; `fill`
    /// starts capturing a cacheable read's result.
    pub fn dispatch(
        &mut self,
        frame: &Frame,
        msg: &FrontendMsg,
        route: &Route,
        b: &mut BackendState,
        fill: Option<Plan>,
        env: &Env,
    ) {
        let w = route.target;
        if let Some(begin) = self.tx.take_deferred(w) {
            self.send(w, &begin);
            self.pipe.expect(w, Expect::Internal(Internal::Begin));
        }
        if let Some(sql) = self.params.prelude(b) {
            self.send(w, &frontend::query(sql.as_bytes()));
            self.pipe
                .expect(w, Expect::Internal(Internal::Prelude { login: false }));
        }
        if let Some(plan) = fill {
            self.send(
                w,
                &frontend::query(crate::cache::REPLAY_LSN_QUERY.as_bytes()),
            );
            self.pipe
                .expect(w, Expect::Internal(Internal::ReplayLsn { after: false }));
            self.fill = Some(Fill::new(plan));
        }
        match msg {
            FrontendMsg::Query(_) => {
                if let Some(a) = &route.analysis {
                    self.effects_at_dispatch(a, b);
                }
                let commits = self.commits(w, route.analysis.as_deref(), env);
                self.send(w, frame);
                let replay = (w == Which::Replica && !self.tx.in_block()).then(|| frame.clone());
                self.pipe.expect(
                    w,
                    Expect::Query {
                        analysis: route.analysis.clone(),
                        failed: false,
                        replay,
                        answered: false,
                    },
                );
                self.close_fill(w);
                if commits {
                    if route.analysis.as_ref().is_none_or(|a| a.may_copy()) {
                        self.commit_pending = true;
                    } else {
                        self.queue_commit_lsn(w);
                    }
                }
            }
            FrontendMsg::FunctionCall | FrontendMsg::Malformed(b'Q' | b'F') => {
                self.send(w, frame);
                self.pipe.expect(
                    w,
                    Expect::Query {
                        analysis: None,
                        failed: false,
                        replay: None,
                        answered: false,
                    },
                );
            }
            _ => self.dispatch_extended(w, frame, msg, route, b, env),
        }
        self.drain_synthetic();
    }

    pub(super) fn dispatch_extended(
        &mut self,
        w: Which,
        frame: &Frame,
        msg: &FrontendMsg,
        route: &Route,
        b: &mut BackendState,
        env: &Env,
    ) {
        self.pipe.batch = Some(w);
        match msg {
            FrontendMsg::Parse(p) => {
                let analysis = route.analysis.clone().unwrap_or_else(|| {
                    Arc::new(Analysis {
                        parsed: false,
                        statements: Vec::new(),
                        hint: Default::default(),
                    })
                });
                match self.stmts.parse(p, frame, analysis, b) {
                    ParsePlan::Send {
                        frames,
                        client,
                        server,
                    } => {
                        let last = frames.len().saturating_sub(1);
                        for (i, f) in frames.iter().enumerate() {
                            self.send(w, f);
                            self.pipe.expect(
                                w,
                                match (i == last, f.tag) {
                                    (false, b'C') => Expect::Close { swallow: true },
                                    (false, _) => Expect::Parse {
                                        swallow: true,
                                        client: None,
                                        server: None,
                                    },
                                    (true, _) => Expect::Parse {
                                        swallow: false,
                                        client: Some(client.clone()),
                                        server: Some(server.clone()),
                                    },
                                },
                            );
                        }
                    }
                    ParsePlan::AlreadyPrepared => self.pipe.synthetic(Expect::SyntheticParse {
                        client: p.name.clone(),
                    }),
                    ParsePlan::Duplicate(name) => {
                        let e = ProxyError::DuplicatePreparedStatement {
                            name: String::from_utf8_lossy(&name).into_owned(),
                        };
                        self.poison(w, &e, false);
                    }
                }
            }
            FrontendMsg::Bind(m) => {
                let prepared = self.stmts.bind(m, frame, b);
                self.inject(w, &prepared.inject, &prepared.server);
                self.send(w, &prepared.frame);
                self.pipe.expect(
                    w,
                    Expect::Bind {
                        server: prepared.server,
                    },
                );
            }
            FrontendMsg::Describe(Target::Statement, name) => {
                let prepared = self.stmts.describe_statement(name, frame, b);
                self.inject(w, &prepared.inject, &prepared.server);
                self.send(w, &prepared.frame);
                self.pipe.expect(w, Expect::Describe);
            }
            FrontendMsg::Describe(Target::Portal, _) => {
                self.send(w, frame);
                self.pipe.expect(w, Expect::Describe);
            }
            FrontendMsg::Execute { portal, .. } => {
                let stmt = self.stmts.portal(portal);
                let analysis = stmt.as_ref().map(|s| s.analysis.clone());
                if let Some(a) = &analysis {
                    self.effects_at_dispatch(a, b);
                    self.batch_commit |= self.commits(w, Some(a), env);
                }
                if stmt.as_ref().is_none_or(|s| s.analysis.may_copy()) {
                    self.batch_copy = true;
                }
                self.send(w, frame);
                self.pipe.expect(
                    w,
                    Expect::Execute {
                        analysis,
                        server: stmt.map(|s| s.server_name.clone()),
                    },
                );
            }
            FrontendMsg::Close(Target::Statement, name) => {
                if self.stmts.close_statement(name) {
                    self.send(w, frame);
                    self.pipe.expect(w, Expect::Close { swallow: false });
                } else {
                    self.answer(Frame::new(b'3', &[]));
                }
            }
            FrontendMsg::Close(Target::Portal, name) => {
                self.stmts.close_portal(name);
                self.send(w, frame);
                self.pipe.expect(w, Expect::Close { swallow: false });
            }
            FrontendMsg::Sync => {
                self.send(w, frame);
                self.pipe.expect(w, Expect::Sync);
                self.stmts.next_batch();
                self.pipe.batch = None;
                self.pipe.skipping = false;
                self.close_fill(w);
                let may_copy = std::mem::take(&mut self.batch_copy);
                if std::mem::take(&mut self.batch_commit) {
                    if may_copy {
                        self.commit_pending = true;
                    } else {
                        self.queue_commit_lsn(w);
                    }
                }
            }
            FrontendMsg::Malformed(tag) => {
                self.send(w, frame);
                let e = match tag {
                    b'P' => Expect::Parse {
                        swallow: false,
                        client: None,
                        server: None,
                    },
                    b'B' => Expect::Bind { server: None },
                    b'D' => Expect::Describe,
                    b'E' => Expect::Execute {
                        analysis: None,
                        server: None,
                    },
                    _ => Expect::Close { swallow: false },
                };
                self.pipe.expect(w, e);
            }
            _ => {}
        }
    }

    /// What a statement does to the session, taken when it is sent (pinning must hold for
    /// whatever the client pipelines behind it; statements are not transactional).
    pub(super) fn effects_at_dispatch(&mut self, a: &Analysis, b: &mut BackendState) {
        let unlogged: Vec<String> = a
            .statements
            .iter()
            .flat_map(|s| s.creates_unlogged.iter().cloned())
            .collect();
        if !unlogged.is_empty() {
            self.events.push_back(Event::Unlogged(unlogged));
        }
        if let Some(pin) = a.pins() {
            if self.pin.is_none() && !self.cfg.bound {
                debug!(reason = ?pin, "session pinned to its backend");
            }
            self.pin = Some(pin);
        }
        for st in &a.statements {
            match &st.session.deallocate {
                Some(Deallocate::All) => self.stmts.forget_all(Some(b)),
                Some(Deallocate::Name(n)) if self.cfg.bound => {
                    self.stmts.close_statement(n.as_bytes());
                }
                _ => {}
            }
        }
    }

    /// Whether `analysis`, run on `w`, commits data (read-your-writes learns the LSN).
    pub(super) fn commits(&self, w: Which, analysis: Option<&Analysis>, env: &Env) -> bool {
        w == Which::Primary
            && self.cfg.learns_commits
            && analysis.is_some_and(|a| ryw::commit_point(a, env.catalog, self.tx.in_block()))
    }

    /// Sends the swallowed messages that make the backend hold statement `server`.
    pub(super) fn inject(&mut self, w: Which, frames: &[Frame], server: &Option<Bytes>) {
        for f in frames {
            self.send(w, f);
            self.pipe.expect(
                w,
                if f.tag == b'C' {
                    Expect::Close { swallow: true }
                } else {
                    Expect::Parse {
                        swallow: true,
                        client: None,
                        server: server.clone(),
                    }
                },
            );
        }
    }

    /// No backend could be had for the message: it fails, the session lives on.
    pub fn no_backend(&mut self, msg: &FrontendMsg, refusal: Refusal) {
        let frame = match refusal {
            Refusal::Proxy(e) => {
                self.events
                    .push_back(Event::Error(e.sqlstate().as_str().into()));
                e.to_frame(Severity::Error)
            }
            Refusal::Server(f) => {
                self.events
                    .push_back(Event::Error(be_msg::error_info(&f).code));
                be_msg::downgrade_to_error(&f)
            }
        };
        if matches!(self.tx, Tx::Deferred { .. }) {
            self.tx = Tx::Lost;
        }
        self.answer(frame);
        match msg {
            FrontendMsg::Query(_) | FrontendMsg::FunctionCall | FrontendMsg::Sync => {
                self.pipe.synthetic(Expect::SyntheticReady);
            }
            _ => self.pipe.skipping = true,
        }
        self.drain_synthetic();
    }

    /// The proxy's own error inside a request: in order; when a backend holds the
    /// transaction or the batch, it is made to fail too (a poison `Execute` whose error
    /// is replaced by `e`), so the transaction ends up failed exactly as directly.
    pub(super) fn poison(&mut self, w: Which, e: &ProxyError, simple: bool) {
        self.events
            .push_back(Event::Error(e.sqlstate().as_str().into()));
        self.send(w, &frontend::execute(POISON_PORTAL, 0));
        if simple {
            self.send(w, &frontend::sync());
        }
        self.pipe.expect(
            w,
            Expect::Poison {
                error: e.to_frame(Severity::Error),
                simple,
            },
        );
        if !simple {
            self.pipe.batch = Some(w);
            self.pipe.skipping = true;
        }
    }
}
