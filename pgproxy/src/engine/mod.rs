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
//! keeps per backend connection). The engine itself only routes each message through
//! them: [`client`] plans client messages, [`dispatch`] sends them, [`server`] matches
//! backend messages, [`answer_local`] gives the proxy's own answers; [`io`] holds the
//! types that cross the boundary to the shell.
//!
//! Two kinds of sessions (decided at login, see `docs/pgproxy.md`): **bound** — session
//! pooling with no replica to read from: one backend for life, transparent (its real
//! process id, statement names unchanged, the server's session end is the client's) —
//! and **virtual**: the session moves between backends (read/write split, transaction
//! pooling), its statements and parameters are re-created where it goes.

mod answer_local;
pub mod backend_state;
mod client;
mod dispatch;
pub mod io;
pub mod local;
pub mod params;
pub mod pipeline;
mod server;
pub mod statements;
pub mod tx;

pub use self::io::{EngineConfig, Env, Event, Outbox, Refusal, Route, Step};

use std::collections::VecDeque;
use std::sync::Arc;

use meridian_shared::lsn::Lsn;
use meridian_sqlroute::{Analysis, PinReason};

use self::backend_state::BackendState;
use self::local::{LocalStatements, RywState};
use self::params::Params;
use self::pipeline::{Expect, Internal, Pipeline};
use self::statements::Statements;
use self::tx::Tx;
use crate::cache::fill::{Fill, Spoiled};
use crate::error::{ProxyError, Severity};
use crate::protocol::backend::{self as be_msg, ErrorSeverity, TxStatus};
use crate::protocol::frontend::{self};
use crate::route::Which;
use crate::ryw;
use crate::wire::{self, Frame};

/// The portal a poison `Execute` names: it never exists.
pub(crate) const POISON_PORTAL: &[u8] = b"meridian_pgproxy_no_such_portal";

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

    /// The backend whose answers will come without anything more from the client — not
    /// inside COPY IN or a batch not yet ended by Sync, which wait for the client.
    /// What a session ended by the client's Terminate still waits for.
    pub fn owed_without_client(&self) -> Option<Which> {
        if self.copy_in.is_some() || self.pipe.batch.is_some() {
            return None;
        }
        self.pipe.active()
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

    // ----- read-your-writes and the cache -----

    pub(super) fn queue_commit_lsn(&mut self, w: Which) {
        self.send(w, &frontend::query(ryw::COMMIT_LSN_QUERY.as_bytes()));
        self.pipe.expect(w, Expect::Internal(Internal::CommitLsn));
    }

    pub(super) fn close_fill(&mut self, w: Which) {
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

    pub(super) fn capture(&mut self, frame: &Frame) {
        let max = self.cfg.cache_max_entry;
        if let Some(fill) = self.fill.as_mut() {
            if fill.capture(frame.tag, &frame.raw, max) == Some(Spoiled::TooLarge) {
                self.events.push_back(Event::TooLargeToCache);
            }
        }
    }

    pub(super) fn finish_fill(&mut self) {
        if let Some((plan, bracket, messages)) = self.fill.take().and_then(Fill::finish) {
            self.events.push_back(Event::Store {
                plan,
                bracket,
                messages,
            });
        }
    }

    // ----- output -----

    pub(super) fn client(&mut self, f: &Frame) {
        self.out.client.extend_from_slice(&f.raw);
    }

    pub(super) fn send(&mut self, w: Which, f: &Frame) {
        self.out.backend(w).extend_from_slice(&f.raw);
    }

    /// An answer of the proxy's own, in order behind what backends still owe.
    pub(super) fn answer(&mut self, f: Frame) {
        self.pipe.synthetic(Expect::Synthetic(f));
    }

    pub(super) fn drain_synthetic(&mut self) {
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
    pub(super) fn fatal_frame(&mut self, f: &Frame) {
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

pub(crate) fn frontend_flush() -> Frame {
    Frame::new(b'H', &[])
}

/// The proxy is a read-write endpoint: a replica's `in_hot_standby = on` is not shown.
pub(crate) fn client_visible_parameter<'a>(name: &str, value: &'a str) -> &'a str {
    if name == "in_hot_standby" {
        "off"
    } else {
        value
    }
}

/// The analysis of a client's text. A text that is not UTF-8 (another client encoding)
/// is classified from a lossy copy; its session-level SETs cannot be replayed byte for
/// byte, so such a statement pins the session instead.
pub(crate) fn analyze(env: &Env, text: &[u8]) -> Arc<Analysis> {
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
