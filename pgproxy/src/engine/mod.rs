//! The session as a protocol engine: client and backend messages in, bytes and events
//! out, no I/O, no clock (as quinn-proto's `Connection`). The async shell
//! ([`crate::session`]) reads messages, asks [`Engine::on_client`] what a client message
//! needs, acquires the backend it names, hands the message to [`Engine::dispatch`],
//! feeds every backend message to [`Engine::on_backend`], writes out [`Outbox`] and acts
//! on the [`Event`]s.
//!
//! The state is split by job: [`pipeline`] (what each backend will answer, errors that
//! skip to `Sync`), [`tx`] (the transaction), [`statements`] (prepared statements and
//! portals, their names on each backend), [`params`] (session parameters to replay),
//! [`local`] (statements the proxy answers itself), [`backend_state`] (what the proxy
//! keeps per backend connection). This module routes each message through them.
//!
//! Two kinds of sessions (decided at login, see `docs/pgproxy.md`): **bound** — session
//! pooling with no replica to read from: one backend for life, transparent (its real
//! process id, statement names unchanged, the server's session end is the client's) —
//! and **virtual**: the session moves between backends (read/write split, transaction
//! pooling), its statements and parameters are re-created where it goes.

pub mod backend_state;
pub mod local;
pub mod params;
pub mod pipeline;
pub mod statements;
pub mod tx;

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use meridian_shared::config::PoolMode;
use meridian_shared::lsn::Lsn;
use meridian_sqlroute::{Analysis, Classifier, Deallocate, FunctionCatalog, PinReason, TxEffect};
use tracing::{debug, warn};

use self::backend_state::{BackendState, PARAMS_UNKNOWN};
use self::local::{LocalCmd, LocalStatements, RywState};
use self::params::Params;
use self::pipeline::{Expect, Internal, Pipeline};
use self::statements::{ParsePlan, Statements};
use self::tx::Tx;
use crate::cache::fill::{Fill, Spoiled};
use crate::cache::rules::Bracket;
use crate::cache::Plan;
use crate::error::{ProxyError, Severity};
use crate::protocol::backend::{self as be_msg, BackendKind, ErrorSeverity, TxStatus};
use crate::protocol::frontend::{self, Bind, FrontendMsg, Target};
use crate::route::{self, SessionView, Which};
use crate::ryw;
use crate::wire::{self, Frame};

/// The portal a poison `Execute` names: it never exists.
const POISON_PORTAL: &[u8] = b"meridian_pgproxy_no_such_portal";

/// What the engine is told once, at login.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub mode: PoolMode,
    /// One backend for life, transparent (see the module doc).
    pub bound: bool,
    /// The process id and secret the client was given (`BackendKeyData`).
    pub client_key: (i32, i32),
    /// Learn commit LSNs for read-your-writes.
    pub learns_commits: bool,
    /// Largest result the cache stores.
    pub cache_max_entry: usize,
}

/// What the engine reads from the proxy for one call.
pub struct Env<'a> {
    pub classifier: &'a Classifier,
    pub catalog: &'a FunctionCatalog,
    /// Replica reads are possible now.
    pub replica_available: bool,
    /// The backends the session holds.
    pub held: (bool, bool),
}

impl Env<'_> {
    fn held(&self) -> Option<Which> {
        match self.held {
            (true, _) => Some(Which::Primary),
            (false, true) => Some(Which::Replica),
            _ => None,
        }
    }
}

/// What a client message needs.
#[derive(Debug)]
pub enum Step {
    /// Handled (answered or forwarded); read the next message.
    Done,
    /// The backend now answering must finish first: offer the same message again once
    /// [`Engine::is_waiting_on`] no longer names a backend.
    Wait,
    /// Make sure a backend of this kind is held, then call [`Engine::dispatch`].
    Route(Route),
    /// The client said goodbye.
    Terminate,
}

/// Where a message goes and what the engine learned about it.
#[derive(Debug, Clone)]
pub struct Route {
    pub target: Which,
    pub analysis: Option<Arc<Analysis>>,
}

/// Something the shell must do.
#[derive(Debug)]
pub enum Event {
    /// The session holds nothing on its backends: give them back (transaction pooling).
    Release,
    /// Drop this backend: its server ended it, or it cannot be trusted.
    Discard(Which),
    /// End the client connection once the output is written.
    Close,
    /// A client request was answered completely.
    Answered,
    /// A read being cached completed: store it.
    Store {
        plan: Plan,
        bracket: Bracket,
        messages: Bytes,
    },
    /// A capture grew past the cache's entry limit.
    TooLargeToCache,
    /// An error went to the client (its SQLSTATE).
    Error(String),
}

/// Bytes for the client and for each backend, written out by the shell.
#[derive(Debug, Default)]
pub struct Outbox {
    pub client: BytesMut,
    primary: BytesMut,
    replica: BytesMut,
}

impl Outbox {
    pub fn backend(&mut self, w: Which) -> &mut BytesMut {
        match w {
            Which::Primary => &mut self.primary,
            Which::Replica => &mut self.replica,
        }
    }
}

pub struct Engine {
    cfg: EngineConfig,
    pipe: Pipeline,
    tx: Tx,
    stmts: Statements,
    local: LocalStatements,
    params: Params,
    pub ryw: RywState,
    pin: Option<PinReason>,
    /// The backend is in COPY IN mode: client copy messages go straight to it.
    copy_in: Option<Which>,
    /// The request being answered (a Query, or a batch up to its Sync) saw an error.
    unit_failed: bool,
    /// The open batch executed something that commits / may enter COPY IN.
    batch_commit: bool,
    batch_copy: bool,
    /// Learn the commit LSN once this statement's ReadyForQuery says idle.
    commit_pending: bool,
    fill: Option<Fill>,
    /// The login's error, sent as FATAL once its ReadyForQuery arrives.
    login_error: Option<Frame>,
    logging_in: bool,
    pub out: Outbox,
    events: VecDeque<Event>,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Engine {
        let transparent = cfg.bound;
        Engine {
            cfg,
            pipe: Pipeline::default(),
            tx: Tx::Idle,
            stmts: Statements::new(transparent),
            local: LocalStatements::default(),
            params: Params::default(),
            ryw: RywState::default(),
            pin: None,
            copy_in: None,
            unit_failed: false,
            batch_commit: false,
            batch_copy: false,
            commit_pending: false,
            fill: None,
            login_error: None,
            logging_in: false,
            out: Outbox::default(),
            events: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The backend a waiting message waits for (`None`: go ahead).
    pub fn is_waiting_on(&self) -> Option<Which> {
        self.pipe.active()
    }

    /// Nothing in flight, no transaction, no COPY: the session may end or move.
    pub fn is_idle(&self) -> bool {
        self.pipe.is_empty() && !self.tx.in_block() && self.copy_in.is_none()
    }

    /// Something is in flight on `w` (its connection cannot be reused as it is).
    pub fn busy_on(&self, w: Which) -> bool {
        self.pipe.active() == Some(w) || self.copy_in == Some(w) || self.pipe.batch == Some(w)
    }

    /// The transaction's backend, or the batch's: what must not be swapped out.
    pub fn anchored_to(&self) -> Option<Which> {
        self.tx.backend().or(self.pipe.batch)
    }

    pub fn tx_status(&self) -> TxStatus {
        self.tx.status()
    }

    pub fn pinned(&self) -> Option<PinReason> {
        self.pin
    }

    pub fn params(&self) -> &[(String, String)] {
        self.params.list()
    }

    /// The login's answer is still due.
    pub fn logging_in(&self) -> bool {
        self.logging_in
    }

    /// Events are waiting for [`Engine::poll_event`].
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Extended messages were sent since the client's last Sync.
    pub fn batch_open(&self) -> bool {
        self.pipe.batch.is_some()
    }

    /// A message may go to `w` now (nothing is owed by another backend).
    pub fn may_send_to(&self, w: Which) -> bool {
        !self.pipe.busy_elsewhere(w)
    }

    /// The client's statement `name` (protocol level).
    pub fn lookup_statement(&self, name: &[u8]) -> Option<Arc<statements::Stmt>> {
        self.stmts.lookup(name)
    }

    /// Where a statement with `analysis` would run now.
    pub fn read_target(&self, analysis: &Analysis, env: &Env) -> Which {
        self.target_for(analysis, env)
    }

    /// A read may use the regional cache: no transaction, nothing pinned or in flight.
    pub fn may_use_cache(&self) -> bool {
        !self.cfg.bound && self.pin.is_none() && self.tx == Tx::Idle && self.pipe.is_empty()
    }

    /// What a read needs from a replica (read-your-writes, causal token, staleness).
    pub fn ryw_need(&self, analysis: &Analysis) -> ryw::Need {
        let hint = analysis
            .hint
            .min_lsn
            .as_deref()
            .and_then(|h| h.parse::<Lsn>().ok());
        let own = self
            .cfg
            .learns_commits
            .then_some(self.ryw.last_commit_lsn)
            .flatten();
        ryw::Need {
            lsn: own.max(self.ryw.min_lsn).max(hint),
            max_staleness: self.ryw.max_staleness,
        }
    }

    // ----- login -----

    /// Starts the login on backend `w`: the startup parameters are applied (a refusal is
    /// the client's FATAL) and the reply — the server's `ParameterStatus` values, the
    /// client's key, `ReadyForQuery` — follows their answer.
    pub fn start_login(&mut self, w: Which, b: &mut BackendState, startup: &[(String, String)]) {
        for (name, value) in startup {
            self.params.set(name, &params::quote_literal(value));
        }
        match self.params.prelude(b) {
            Some(sql) => {
                self.logging_in = true;
                self.send(w, &frontend::query(sql.as_bytes()));
                self.pipe
                    .expect(w, Expect::Internal(Internal::Prelude { login: true }));
            }
            None => self.login_reply(b),
        }
    }

    fn login_reply(&mut self, b: &BackendState) {
        self.release_if_idle();
        self.logging_in = false;
        for (name, value) in &b.server_params {
            let value = client_visible_parameter(name, value);
            self.client(&wire::parameter_status(name, value));
        }
        let (pid, secret) = self.cfg.client_key;
        self.client(&wire::backend_key_data(pid, secret));
        self.client(&wire::ready_for_query(b'I'));
    }

    // ----- client messages -----

    /// What client message `msg` (decoded from `frame`) needs.
    pub fn on_client(&mut self, frame: &Frame, msg: &FrontendMsg, env: &Env) -> Step {
        let step = self.plan(frame, msg, env);
        self.drain_synthetic();
        step
    }

    fn plan(&mut self, frame: &Frame, msg: &FrontendMsg, env: &Env) -> Step {
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

    fn copy_message(&mut self, w: Which, frame: &Frame, msg: &FrontendMsg) -> Step {
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

    fn plan_query(&mut self, text: &Bytes, env: &Env) -> Step {
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
    fn plan_opaque(&mut self, env: &Env) -> Step {
        let target = self
            .pipe
            .batch
            .or(self.tx.backend())
            .or(env.held())
            .unwrap_or(Which::Primary);
        self.route(target, None)
    }

    fn route(&self, target: Which, analysis: Option<Arc<Analysis>>) -> Step {
        if self.pipe.busy_elsewhere(target) {
            return Step::Wait;
        }
        Step::Route(Route { target, analysis })
    }

    fn target_for(&self, analysis: &Analysis, env: &Env) -> Which {
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
        if let Tx::Deferred { read_only, .. } = &self.tx {
            return route::route_deferred_begin(*read_only, analysis, view);
        }
        route::route(analysis, env.catalog, view).0
    }

    fn plan_extended(&mut self, msg: &FrontendMsg, env: &Env) -> Step {
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
    fn move_batch_off_replica(&mut self) -> Step {
        self.send(Which::Replica, &frontend::sync());
        self.pipe
            .expect(Which::Replica, Expect::Internal(Internal::BatchEnd));
        self.stmts.next_batch();
        self.pipe.batch = None;
        self.pipe.draining = true;
        Step::Wait
    }

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
            FrontendMsg::Query(text) => {
                if let Some(a) = &route.analysis {
                    self.effects_at_dispatch(a, b);
                }
                let commits = self.commits(w, route.analysis.as_deref(), env);
                self.send(w, frame);
                self.pipe.expect(
                    w,
                    Expect::Query {
                        analysis: route.analysis.clone(),
                        failed: false,
                    },
                );
                self.close_fill(w);
                if commits {
                    if ryw::may_copy_bytes(text) {
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
                    },
                );
            }
            _ => self.dispatch_extended(w, frame, msg, route, b, env),
        }
        self.drain_synthetic();
    }

    fn dispatch_extended(
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
                if stmt.as_ref().is_none_or(|s| ryw::may_copy_bytes(&s.query)) {
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
    fn effects_at_dispatch(&mut self, a: &Analysis, b: &mut BackendState) {
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
    fn commits(&self, w: Which, analysis: Option<&Analysis>, env: &Env) -> bool {
        w == Which::Primary
            && self.cfg.learns_commits
            && analysis.is_some_and(|a| ryw::commit_point(a, env.catalog, self.tx.in_block()))
    }

    /// Sends the swallowed messages that make the backend hold statement `server`.
    fn inject(&mut self, w: Which, frames: &[Frame], server: &Option<Bytes>) {
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
    fn poison(&mut self, w: Which, e: &ProxyError, simple: bool) {
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

    // ----- statements the proxy answers -----

    /// Runs a local command: the simple protocol's answer ends with ReadyForQuery.
    fn run_local(&mut self, cmd: &LocalCmd, _portal: Option<&[u8]>, simple: bool) {
        if simple {
            if let Some(rd) = local::row_description(cmd) {
                self.client(&rd);
            }
        }
        let result = match cmd {
            LocalCmd::Meridian(c) => self.ryw.execute(c),
            LocalCmd::Deallocate(name) => {
                self.stmts.deallocate(name);
                Ok(vec![wire::command_complete("DEALLOCATE")])
            }
            LocalCmd::EndLostTransaction => {
                self.tx = Tx::Idle;
                Ok(vec![wire::command_complete("ROLLBACK")])
            }
        };
        match result {
            Ok(frames) => {
                for f in frames {
                    self.answer(f);
                }
                if simple {
                    self.pipe.synthetic(Expect::SyntheticReady);
                }
            }
            Err(e) => match self.tx.backend() {
                Some(w) => self.poison(w, &e, simple),
                None => {
                    self.events
                        .push_back(Event::Error(e.sqlstate().as_str().into()));
                    self.answer(e.to_frame(Severity::Error));
                    if self.tx.in_block() {
                        self.tx = Tx::Lost;
                    }
                    if simple {
                        self.pipe.synthetic(Expect::SyntheticReady);
                    } else {
                        self.pipe.skipping = true;
                    }
                }
            },
        }
        self.drain_synthetic();
    }

    /// The extended protocol on the proxy's own statements. True when `msg` was answered.
    fn local_extended(&mut self, msg: &FrontendMsg) -> bool {
        match msg {
            FrontendMsg::Parse(p) => {
                let bound = self.cfg.bound;
                let stmts = &self.stmts;
                let Some(cmd) =
                    local::recognise(&p.query, |n| !bound && stmts.is_client_statement(n))
                else {
                    if !self.local.is_empty() {
                        self.local.forget_statement(&p.name);
                    }
                    return false;
                };
                self.stmts.close_statement(&p.name);
                self.local.prepare(p.name.clone(), cmd);
                self.answer(Frame::new(b'1', &[]));
            }
            _ if self.local.is_empty() => return false,
            FrontendMsg::Bind(b) => {
                if !self.local.bind(&b.portal, &b.statement) {
                    return false;
                }
                self.answer(Frame::new(b'2', &[]));
            }
            FrontendMsg::Describe(target, name) => {
                let cmd = match target {
                    Target::Statement => self.local.statement(name),
                    Target::Portal => self.local.portal(name),
                };
                let Some(cmd) = cmd.cloned() else {
                    return false;
                };
                if *target == Target::Statement {
                    self.answer(Frame::new(b't', &[0, 0]));
                }
                self.answer(local::row_description(&cmd).unwrap_or_else(|| Frame::new(b'n', &[])));
            }
            FrontendMsg::Execute { portal, .. } => {
                let Some(cmd) = self.local.portal(portal).cloned() else {
                    return false;
                };
                self.run_local(&cmd, Some(portal), false);
            }
            FrontendMsg::Close(target, name) => {
                let known = match target {
                    Target::Statement => self.local.forget_statement(name),
                    Target::Portal => self.local.forget_portal(name),
                };
                if known.is_none() {
                    return false;
                }
                self.answer(Frame::new(b'3', &[]));
            }
            _ => return false,
        }
        self.drain_synthetic();
        true
    }

    /// The transaction is lost: PostgreSQL's aborted-transaction answers, by the proxy.
    fn answer_lost(&mut self, tx: TxEffect, extended: bool) {
        if matches!(tx, TxEffect::Commit | TxEffect::Rollback) {
            self.tx = Tx::Idle;
            self.answer(wire::command_complete("ROLLBACK"));
        } else {
            let e = ProxyError::TransactionLost;
            self.events
                .push_back(Event::Error(e.sqlstate().as_str().into()));
            self.answer(e.to_frame(Severity::Error));
            if extended {
                self.pipe.skipping = true;
            }
        }
        if !extended {
            self.pipe.synthetic(Expect::SyntheticReady);
        }
        self.drain_synthetic();
    }

    fn lost_extended(&mut self, msg: &FrontendMsg, env: &Env) {
        match msg {
            FrontendMsg::Sync => {
                self.pipe.skipping = false;
                self.pipe.synthetic(Expect::SyntheticReady);
            }
            FrontendMsg::Flush => {}
            FrontendMsg::Parse(p)
                if matches!(
                    analyze(env, &p.query).tx_effect(),
                    TxEffect::Commit | TxEffect::Rollback
                ) =>
            {
                // As in an aborted transaction: COMMIT/ROLLBACK parse, and run as ROLLBACK.
                self.local
                    .prepare(p.name.clone(), LocalCmd::EndLostTransaction);
                self.answer(Frame::new(b'1', &[]));
            }
            _ => self.answer_lost(TxEffect::None, true),
        }
    }

    /// The cache answered a read: its messages and `ReadyForQuery`, in order.
    pub fn answer_cached(&mut self, messages: Bytes) {
        self.pipe.synthetic(Expect::Synthetic(Frame {
            tag: b'T',
            raw: messages,
        }));
        self.pipe.synthetic(Expect::SyntheticReady);
        self.drain_synthetic();
    }

    // ----- backend messages -----

    /// One message from backend `w`.
    pub fn on_backend(&mut self, w: Which, frame: &Frame, b: &mut BackendState) {
        let kind = BackendKind::of(frame);
        match kind {
            BackendKind::Notice => {
                if !matches!(self.pipe.head(), Some(Expect::Internal(_))) {
                    self.client(frame);
                }
                return;
            }
            BackendKind::ParameterStatus => {
                if let Some((name, value)) = be_msg::parameter_status(frame) {
                    b.observe_parameter(name, value);
                    if !self.logging_in {
                        let name = String::from_utf8_lossy(name);
                        let value = String::from_utf8_lossy(value);
                        let shown = client_visible_parameter(&name, &value);
                        self.client(&wire::parameter_status(&name, shown));
                    }
                }
                return;
            }
            BackendKind::Notification => {
                // A notification from this session's own backend names the process the
                // client knows as its own.
                match be_msg::notification_pid(frame) {
                    Some(pid) if pid == b.pid && pid != self.cfg.client_key.0 => {
                        let f = be_msg::with_notification_pid(frame, self.cfg.client_key.0);
                        self.client(&f);
                    }
                    _ => self.client(frame),
                }
                return;
            }
            _ => {}
        }
        if self.pipe.active() != Some(w) {
            return self.idle_backend_message(w, frame, kind);
        }
        self.drain_synthetic();
        let Some(head) = self.pipe.head() else {
            return;
        };
        let internal = matches!(head, Expect::Internal(_));
        let describe = matches!(head, Expect::Describe);
        let execute = matches!(head, Expect::Execute { .. });
        if !internal && self.fill.is_some() {
            self.capture(frame);
        }
        match kind {
            BackendKind::Error => self.on_error(w, frame, b),
            BackendKind::ReadyForQuery => self.on_ready(w, frame, b),
            BackendKind::ParseComplete => {
                if let Some(Expect::Parse {
                    swallow,
                    client,
                    server,
                }) = self.pipe.pop()
                {
                    self.stmts.parse_done(client.as_deref(), server.as_deref());
                    if !swallow {
                        self.client(frame);
                    }
                }
            }
            BackendKind::CloseComplete => {
                if let Some(Expect::Close { swallow }) = self.pipe.pop() {
                    if !swallow {
                        self.client(frame);
                    }
                }
            }
            BackendKind::BindComplete => {
                self.pipe.pop();
                self.client(frame);
            }
            BackendKind::RowDescription | BackendKind::NoData if describe => {
                self.pipe.pop();
                self.client(frame);
            }
            BackendKind::CommandComplete
            | BackendKind::EmptyQuery
            | BackendKind::PortalSuspended
                if execute =>
            {
                if let Some(Expect::Execute {
                    analysis: Some(a), ..
                }) = self.pipe.pop()
                {
                    if kind == BackendKind::CommandComplete {
                        self.params.stage(a.clone());
                        self.settle_unpin(&a);
                    }
                }
                self.client(frame);
            }
            BackendKind::DataRow if internal => self.internal_row(frame),
            BackendKind::CopyInResponse => {
                self.copy_in = Some(w);
                if execute {
                    // The server ignores the Sync sent behind the COPY: the client sends
                    // another after CopyDone, and it must reach the server.
                    self.pipe.drop_syncs_behind_head();
                    self.pipe.batch = Some(w);
                }
                self.client(frame);
            }
            BackendKind::Other(tag) => {
                warn!(backend = ?w, tag = %(tag as char), "unexpected message from backend; dropping it");
                self.on_backend_ended(w, None);
            }
            _ if internal => {}
            _ => self.client(frame),
        }
        self.drain_synthetic();
    }

    /// A message from a backend that owes no answer.
    fn idle_backend_message(&mut self, w: Which, frame: &Frame, kind: BackendKind) {
        if kind == BackendKind::Error && be_msg::error_info(frame).severity == ErrorSeverity::Fatal
        {
            // The server is ending the session (a timeout, an administrator, a shutdown).
            return self.on_backend_ended(w, Some(frame));
        }
        warn!(backend = ?w, tag = %(frame.tag as char), "unexpected message from an idle backend; dropping it");
        self.events.push_back(Event::Discard(w));
    }

    fn internal_row(&mut self, frame: &Frame) {
        let lsn = crate::backend::decode_text_row(frame)
            .ok()
            .and_then(|r| r.into_iter().next().flatten())
            .and_then(|t| t.parse::<Lsn>().ok());
        match self.pipe.head() {
            Some(Expect::Internal(Internal::CommitLsn)) => {
                self.ryw.last_commit_lsn = self.ryw.last_commit_lsn.max(lsn);
            }
            Some(Expect::Internal(Internal::ReplayLsn { after })) => {
                let after = *after;
                if let Some(fill) = self.fill.as_mut() {
                    fill.position(after, lsn);
                }
            }
            _ => {}
        }
    }

    fn on_error(&mut self, w: Which, frame: &Frame, b: &mut BackendState) {
        let info = be_msg::error_info(frame);
        if info.severity == ErrorSeverity::Fatal {
            return self.on_backend_ended(w, Some(frame));
        }
        self.copy_in = None;
        let Some(head) = self.pipe.head_mut() else {
            return;
        };
        match head {
            Expect::Query { failed, .. } => {
                *failed = true;
                self.unit_failed = true;
            }
            Expect::Sync => self.unit_failed = true,
            Expect::Internal(Internal::Prelude { login: true }) => {
                self.login_error = Some(frame.clone());
                return;
            }
            Expect::Internal(Internal::Prelude { login: false }) => {
                warn!(code = %info.code, message = %info.message, "replaying session parameters failed");
                b.params_hash = PARAMS_UNKNOWN;
                return;
            }
            Expect::Internal(Internal::ReplayLsn { .. }) => {
                if let Some(fill) = self.fill.as_mut() {
                    fill.spoil();
                }
                return;
            }
            Expect::Internal(Internal::Begin) => {
                // The deferred BEGIN failed: the client's statement behind it tells the rest.
                self.unit_failed = true;
            }
            Expect::Internal(_) => {
                debug!(code = %info.code, message = %info.message, "internal query failed");
                return;
            }
            Expect::Poison { error, simple } => {
                let (error, simple) = (error.clone(), *simple);
                self.client(&error);
                self.unit_failed = true;
                if !simple {
                    self.prune(b);
                }
                return;
            }
            Expect::Bind { server } | Expect::Execute { server, .. } => {
                if info.code == "0A000" && info.message.contains("cached plan must not change") {
                    if let Some(s) = server.clone() {
                        b.stale.insert(s);
                    }
                }
                self.unit_failed = true;
                self.prune(b);
            }
            Expect::Synthetic(_) | Expect::SyntheticReady | Expect::SyntheticParse { .. } => {}
            Expect::Parse { .. } | Expect::Describe | Expect::Close { .. } => {
                self.unit_failed = true;
                self.prune(b);
            }
        }
        self.events.push_back(Event::Error(info.code));
        self.client(frame);
    }

    /// The server skips everything up to the next Sync after an extended-protocol error.
    fn prune(&mut self, b: &mut BackendState) {
        let pruned = self.pipe.prune_to_sync();
        for (client, server) in &pruned.parses {
            self.stmts
                .parse_failed(client.as_deref(), server.as_deref(), b);
        }
        if self.fill.is_some() {
            if let Some(f) = self.fill.as_mut() {
                f.spoil();
            }
        }
    }

    fn on_ready(&mut self, w: Which, frame: &Frame, b: &mut BackendState) {
        let status = be_msg::ready_status(frame);
        b.tx_status = status;
        let item = loop {
            match self.pipe.pop() {
                Some(e) if e.is_terminal() => break e,
                Some(other) => debug!(?other, "ReadyForQuery answered an unanswered message"),
                None => return,
            }
        };
        match item {
            Expect::Internal(Internal::Prelude { login: true }) => match self.login_error.take() {
                Some(e) => self.fatal_frame(&e),
                None => self.login_reply(b),
            },
            Expect::Internal(Internal::ReplayLsn { after: true }) => self.finish_fill(),
            Expect::Internal(Internal::ReplayLsn { after: false }) => {
                if let Some(fill) = self.fill.as_mut() {
                    fill.opened();
                }
            }
            Expect::Internal(Internal::Begin) => self.tx.on_ready(w, status),
            Expect::Internal(_) => {
                // The backend's status is the transaction's, whoever asked.
                if self.tx.backend() == Some(w) || status != TxStatus::Idle {
                    self.tx.on_ready(w, status);
                }
            }
            Expect::Query { analysis, failed } => {
                if let (Some(a), false) = (&analysis, failed) {
                    self.params.stage(a.clone());
                    self.settle_unpin(a);
                }
                self.client_ready(w, status, frame, b);
            }
            _ => self.client_ready(w, status, frame, b),
        }
        self.release_if_idle();
    }

    /// The ReadyForQuery ending a client's request.
    fn client_ready(&mut self, w: Which, status: TxStatus, frame: &Frame, b: &mut BackendState) {
        let was_failed = self.tx.status() == TxStatus::Failed;
        self.tx.on_ready(w, status);
        if status == TxStatus::Idle {
            let committed = !std::mem::take(&mut self.unit_failed) && !was_failed;
            if self.params.settle(committed, Some(b)).reset_all {
                self.ryw.reset_all();
            }
            self.stmts.end_of_transaction();
            if std::mem::take(&mut self.commit_pending) && w == Which::Primary {
                self.queue_commit_lsn(w);
            }
        }
        self.client(frame);
        self.events.push_back(Event::Answered);
    }

    /// `DISCARD ALL` completed: nothing of the session is left on the server to pin.
    fn settle_unpin(&mut self, a: &Analysis) {
        let discard_all = a
            .statements
            .iter()
            .any(|s| s.session.reset_all && matches!(s.session.deallocate, Some(Deallocate::All)));
        if discard_all && a.pins().is_none() {
            self.pin = None;
        }
    }

    fn release_if_idle(&mut self) {
        if self.cfg.mode == PoolMode::Transaction
            && !self.cfg.bound
            && self.pin.is_none()
            && self.is_idle()
            && self.pipe.batch.is_none()
            && !self.pipe.skipping
        {
            self.events.push_back(Event::Release);
        }
    }

    /// Backend `w` ended (`fatal`: the server's last word). Where the session had state
    /// there that cannot move (bound session, open transaction, pinned state, COPY, the
    /// login), the client's connection ends with the server's error, as directly;
    /// otherwise what was waiting on it fails and the session goes on elsewhere.
    pub fn on_backend_ended(&mut self, w: Which, fatal: Option<&Frame>) {
        self.events.push_back(Event::Discard(w));
        let unmovable = self.cfg.bound
            || self.logging_in
            || self.tx.backend() == Some(w)
            || (w == Which::Primary && self.pin.is_some())
            || self.copy_in == Some(w);
        if unmovable {
            let in_tx = self.tx.in_block();
            match fatal {
                Some(f) => self.fatal_frame(f),
                None => self.fatal(&ProxyError::BackendLost { in_tx }),
            }
            return;
        }
        self.fill = None;
        if self.pipe.active() != Some(w) {
            return;
        }
        let pending = self.pipe.take_all();
        if !pending.iter().any(Expect::is_client) {
            debug!(backend = ?w, "idle backend ended; dropped");
            return;
        }
        let mut first = Some(match fatal {
            Some(f) => be_msg::downgrade_to_error(f),
            None => ProxyError::BackendLost { in_tx: false }.to_frame(Severity::Error),
        });
        let mut trailing = false;
        for e in pending {
            match e {
                Expect::Query { .. } | Expect::Sync | Expect::Poison { simple: true, .. } => {
                    let error = first.take().unwrap_or_else(|| {
                        ProxyError::BackendLost { in_tx: false }.to_frame(Severity::Error)
                    });
                    self.client(&error);
                    self.client(&wire::ready_for_query(self.tx.status().byte()));
                    trailing = false;
                }
                e if e.is_client() && !e.is_synthetic() => trailing = true,
                _ => {}
            }
        }
        if let Some(error) = first {
            self.client(&error);
            trailing = true;
        }
        if trailing {
            self.pipe.skipping = true;
        }
        self.unit_failed = false;
        self.events.push_back(Event::Answered);
    }

    // ----- read-your-writes and the cache -----

    fn queue_commit_lsn(&mut self, w: Which) {
        self.send(w, &frontend::query(ryw::COMMIT_LSN_QUERY.as_bytes()));
        self.pipe.expect(w, Expect::Internal(Internal::CommitLsn));
    }

    fn close_fill(&mut self, w: Which) {
        if self.fill.as_ref().is_some_and(|f| !f.closed) {
            self.send(
                w,
                &frontend::query(crate::cache::REPLAY_LSN_QUERY.as_bytes()),
            );
            self.pipe
                .expect(w, Expect::Internal(Internal::ReplayLsn { after: true }));
            if let Some(f) = self.fill.as_mut() {
                f.closed = true;
            }
        }
    }

    fn capture(&mut self, frame: &Frame) {
        let max = self.cfg.cache_max_entry;
        if let Some(fill) = self.fill.as_mut() {
            if fill.capture(frame.tag, &frame.raw, max) == Some(Spoiled::TooLarge) {
                self.events.push_back(Event::TooLargeToCache);
            }
        }
    }

    fn finish_fill(&mut self) {
        if let Some((plan, bracket, messages)) = self.fill.take().and_then(Fill::finish) {
            self.events.push_back(Event::Store {
                plan,
                bracket,
                messages,
            });
        }
    }

    // ----- output -----

    fn client(&mut self, f: &Frame) {
        self.out.client.extend_from_slice(&f.raw);
    }

    fn send(&mut self, w: Which, f: &Frame) {
        self.out.backend(w).extend_from_slice(&f.raw);
    }

    /// An answer of the proxy's own, in order behind what backends still owe.
    fn answer(&mut self, f: Frame) {
        self.pipe.synthetic(Expect::Synthetic(f));
    }

    fn drain_synthetic(&mut self) {
        while let Some(e) = self.pipe.pop_synthetic() {
            match e {
                Expect::Synthetic(f) => self.client(&f),
                Expect::SyntheticParse { client } => {
                    self.stmts.parse_done(Some(&client), None);
                    self.client(&Frame::new(b'1', &[]));
                }
                _ => {
                    let z = wire::ready_for_query(self.tx.status().byte());
                    self.client(&z);
                    self.events.push_back(Event::Answered);
                }
            }
        }
    }

    /// Ends the connection with the proxy's own FATAL error.
    pub fn fatal(&mut self, e: &ProxyError) {
        self.logging_in = false;
        self.events
            .push_back(Event::Error(e.sqlstate().as_str().into()));
        self.client(&e.to_frame(Severity::Fatal));
        self.events.push_back(Event::Close);
    }

    /// Ends the connection with a server's error as FATAL.
    fn fatal_frame(&mut self, f: &Frame) {
        self.logging_in = false;
        let info = be_msg::error_info(f);
        self.events.push_back(Event::Error(info.code.clone()));
        let frame = if info.severity == ErrorSeverity::Fatal {
            f.clone()
        } else {
            wire::error_response("FATAL", &info.code, &info.message)
        };
        self.client(&frame);
        self.events.push_back(Event::Close);
    }
}

/// Why no backend could be had.
#[derive(Debug)]
pub enum Refusal {
    Proxy(ProxyError),
    /// The server's own `ErrorResponse` (a missing database, a refused login).
    Server(Frame),
}

fn frontend_flush() -> Frame {
    Frame::new(b'H', &[])
}

/// The proxy is a read-write endpoint: a replica's `in_hot_standby = on` is not shown.
fn client_visible_parameter<'a>(name: &str, value: &'a str) -> &'a str {
    if name == "in_hot_standby" {
        "off"
    } else {
        value
    }
}

/// The analysis of a client's text. A text that is not UTF-8 (another client encoding)
/// is classified from a lossy copy; its session-level SETs cannot be replayed byte for
/// byte, so such a statement pins the session instead.
fn analyze(env: &Env, text: &[u8]) -> Arc<Analysis> {
    match std::str::from_utf8(text) {
        Ok(s) => env.classifier.analyze(s),
        Err(_) => {
            let a = env.classifier.analyze(&String::from_utf8_lossy(text));
            let sets = a
                .statements
                .iter()
                .any(|s| !s.session.set.is_empty() || !s.session.reset.is_empty());
            if !sets {
                return a;
            }
            let mut a = (*a).clone();
            for st in &mut a.statements {
                st.session.set.clear();
                st.session.reset.clear();
                st.session.pins.get_or_insert(PinReason::Other);
            }
            Arc::new(a)
        }
    }
}

#[cfg(test)]
mod tests;
