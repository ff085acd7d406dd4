//! One client session after authentication: the I/O shell around the protocol engine
//! ([`crate::engine`]). The shell reads client and backend messages, asks the engine
//! what each needs, carries it out — acquiring backends ([`backends`]), consulting the
//! regional cache ([`cache`]), waiting for a replica to replay a session's writes
//! ([`ryw_wait`]) — writes out what the engine produced and acts on its events
//! (release, discard, close, store a cache entry, metrics). It decides nothing about
//! the protocol itself. [`login`] is the session's first phase (the backend side of the
//! login and the startup reply).
//!
//! The relay is full duplex: the session waits at the same time on the client and on
//! the backends it holds, so asynchronous messages (notices, notifications, a server
//! ending its backend) are seen at once. Writes are batched: everything a backend has
//! already sent is handled before the client's output is written.

pub mod backends;
pub mod cache;
pub mod login;
pub mod ryw_wait;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use meridian_shared::config::{PoolMode, ProxyConfig};
use meridian_sqlroute::FunctionCatalog;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::debug;

use self::backends::{Backends, Connector, Held};
use self::cache::{Identity, SessionCache};
use self::ryw_wait::RywChoice;
use crate::backend::BackendError;
use crate::cache::Plan;
use crate::cancel::{BackendKey, CancelSlot};
use crate::client::{ClientConn, ClientError};
use crate::engine::backend_state::Reset;
use crate::engine::{Engine, Env, Event, Refusal, Route, Step};
use crate::error::ProxyError;
use crate::metrics::QueryCounters;
use crate::protocol::frontend::FrontendMsg;
use crate::route::Which;
use crate::shared::Shared;
use crate::topology::TopologyRx;
use crate::wire::{Frame, WireError};

/// The client's output is written once it holds this much, even mid-result.
const WRITE_CLIENT_AT: usize = 64 * 1024;

/// Identity of an authenticated session.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub database: String,
    pub backend_user: String,
    pub backend_password: Option<String>,
    pub mode: PoolMode,
    /// Startup parameters the client sent (and those of its `options`), to apply with SET.
    pub startup_params: Vec<(String, String)>,
}

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Client(#[from] ClientError),
}

enum Input {
    Client(Result<Frame, ClientError>),
    Backend(Which, Result<Frame, BackendError>),
    Shutdown,
}

/// What routing reads from the proxy, kept by the session and refreshed only when it
/// changed (a new function catalog, a topology or configuration change): reading it
/// fresh for every message cost locks and reference counts on the hot path.
pub struct Inputs {
    catalog: Arc<FunctionCatalog>,
    catalog_generation: u64,
    replica_available: bool,
    topology: TopologyRx,
    config: watch::Receiver<Arc<ProxyConfig>>,
}

impl Inputs {
    pub fn new(shared: &Shared, replica_available: bool) -> Inputs {
        let mut topology = shared.topology().clone();
        let mut config = shared.config_rx();
        topology.mark_unchanged();
        config.mark_unchanged();
        Inputs {
            catalog: shared.catalog(),
            catalog_generation: shared.catalog_generation(),
            replica_available,
            topology,
            config,
        }
    }

    fn refresh<C: Connector>(&mut self, shared: &Shared, connector: &C) {
        let generation = shared.catalog_generation();
        if generation != self.catalog_generation {
            self.catalog = shared.catalog();
            self.catalog_generation = generation;
        }
        let topology = self.topology.has_changed().unwrap_or(false);
        let config = self.config.has_changed().unwrap_or(false);
        if topology || config {
            self.topology.mark_unchanged();
            self.config.mark_unchanged();
            self.replica_available = connector.replica_available();
        }
    }
}

/// The client's cancel key: unregistered when the session ends.
pub struct CancelKey {
    shared: Arc<Shared>,
    key: (i32, i32),
    pub slot: CancelSlot,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = None;
        }
        self.shared.cancel().unregister(self.key);
    }
}

pub struct Session<S, C> {
    shared: Arc<Shared>,
    client: ClientConn<S>,
    conns: Backends<C>,
    engine: Engine,
    login: Login,
    cancel: CancelKey,
    cancel_target: Option<(Which, i32)>,
    cache: SessionCache,
    /// A client message waiting for the backend now answering.
    stalled: Option<Frame>,
    /// Client messages released from a cache hold, handled before reading the client.
    backlog: VecDeque<Frame>,
    /// The released execution's Bind starts a cache fill with this plan.
    fill_next: Option<Plan>,
    salt: u64,
    inputs: Inputs,
    queries: QueryCounters,
    /// When the request being answered started (latency metric).
    started: Option<Instant>,
    closing: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin, C: Connector> Session<S, C> {
    /// Runs the session until the client leaves or the session must end.
    pub async fn run(mut self) -> Result<(), SessionError> {
        let mut shutdown = self.shared.shutdown().clone();
        let result = self.relay(&mut shutdown).await;
        self.finish().await;
        result
    }

    async fn relay(
        &mut self,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        loop {
            if let Some(f) = self.next_ready()? {
                if !self.handle_client(f).await {
                    return self.run_out(shutdown).await;
                }
                self.after_engine().await?;
                continue;
            }
            self.write_out().await?;
            if self.closing {
                return Ok(());
            }
            if *shutdown.borrow() && self.engine.is_idle() && self.stalled.is_none() {
                self.client.write_out(&mut self.engine.out.client).await?;
                self.client
                    .fatal(
                        ProxyError::ShuttingDown.sqlstate().as_str(),
                        &ProxyError::ShuttingDown.message(),
                    )
                    .await;
                return Ok(());
            }
            let input = {
                let read_client = self.stalled.is_none();
                let idle = self.engine.is_idle();
                let Session { client, conns, .. } = self;
                let (primary, replica) = conns.both();
                tokio::select! {
                    biased;
                    r = read_backend(primary), if primary.is_some() => Input::Backend(Which::Primary, r),
                    r = read_backend(replica), if replica.is_some() => Input::Backend(Which::Replica, r),
                    r = client.read_frame(), if read_client => Input::Client(r),
                    _ = shutdown.changed(), if idle => Input::Shutdown,
                }
            };
            match input {
                Input::Client(Ok(f)) => {
                    if !self.handle_client(f).await {
                        return self.run_out(shutdown).await;
                    }
                }
                Input::Client(Err(ClientError::Closed)) => return Ok(()),
                Input::Client(Err(ClientError::Wire(e))) => {
                    let e = match e {
                        WireError::TooLarge { len, max } => ProxyError::MessageTooLong { len, max },
                        _ => ProxyError::InvalidMessage("message length"),
                    };
                    self.engine.fatal(&e);
                    self.after_engine().await?;
                    self.write_out().await?;
                    return Ok(());
                }
                Input::Client(Err(e)) => return Err(e.into()),
                Input::Backend(w, r) => self.on_backend(w, r).await,
                Input::Shutdown => {}
            }
            self.after_engine().await?;
        }
    }

    /// After the client's Terminate: what it sent before runs to its end and the answers
    /// go out before its connection is closed, as PostgreSQL reads a Terminate only
    /// between statements (a client that closes its own socket meanwhile sees that, not
    /// a close by the server; psycopg's `test_socket_closed`). Not inside COPY or an open
    /// batch, whose answers wait for more from the client; a shutdown, a backend that
    /// ends or a client that is gone stops it.
    async fn run_out(
        &mut self,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        loop {
            self.after_engine().await?;
            if self.write_out().await.is_err() {
                return Ok(());
            }
            let Some(w) = self.engine.owed_without_client() else {
                return Ok(());
            };
            if self.closing || *shutdown.borrow() {
                return Ok(());
            }
            let (primary, replica) = self.conns.both();
            let conn = match w {
                Which::Primary => primary,
                Which::Replica => replica,
            };
            if conn.is_none() {
                return Ok(());
            }
            let r = tokio::select! {
                r = read_backend(conn) => r,
                _ = shutdown.changed() => return Ok(()),
            };
            self.on_backend(w, r).await;
        }
    }

    /// A client message that can be handled without reading: a stalled one whose
    /// backend is free now, one released from a cache hold, one already buffered.
    fn next_ready(&mut self) -> Result<Option<Frame>, SessionError> {
        if self.stalled.is_some() {
            if self.engine.is_waiting_on().is_none() {
                return Ok(self.stalled.take());
            }
            return Ok(None);
        }
        if let Some(f) = self.backlog.pop_front() {
            return Ok(Some(f));
        }
        Ok(self.client.try_buffered_frame()?)
    }

    /// Handles one client message; false when the client said goodbye.
    async fn handle_client(&mut self, frame: Frame) -> bool {
        let msg = FrontendMsg::decode(&frame);
        if self.shared.cache().is_some() && self.hold(&frame, &msg).await {
            return true;
        }
        self.inputs.refresh(&self.shared, &self.conns.connector);
        let shared = &self.shared;
        let env = Env {
            classifier: shared.classifier(),
            catalog: &self.inputs.catalog,
            replica_available: !self.engine.config().bound && self.inputs.replica_available,
            held: self.conns.held(),
            unlogged: &|n| shared.is_unlogged(n),
        };
        match self.engine.on_client(&frame, &msg, &env) {
            Step::Done => {}
            Step::Terminate => return false,
            Step::Wait => self.stalled = Some(frame),
            Step::Route(route) => self.dispatch(frame, msg, route).await,
        }
        true
    }

    /// The extended-protocol cache hold; true when it took the message.
    async fn hold(&mut self, frame: &Frame, msg: &FrontendMsg) -> bool {
        let may_start = self.backlog.is_empty()
            && self.stalled.is_none()
            && self.engine.may_use_cache()
            && !self.engine.batch_open();
        let shared = self.shared.clone();
        let engine = &self.engine;
        let conns = &self.conns;
        let start = || {
            let FrontendMsg::Bind(b) = msg else {
                return None;
            };
            if !may_start {
                return None;
            }
            let stmt = engine.lookup_statement(&b.statement)?;
            let catalog = shared.catalog();
            let env = Env {
                classifier: shared.classifier(),
                catalog: &catalog,
                replica_available: conns.connector.replica_available(),
                held: conns.held(),
                unlogged: &|n| shared.is_unlogged(n),
            };
            if engine.read_target(&stmt.analysis, &env) != Which::Replica {
                return None;
            }
            let cache = shared.cache()?;
            let sql = String::from_utf8_lossy(&stmt.query);
            let identity = cache::extended_identity(&stmt, &b.rest);
            let plan = cache.plan(
                &shared,
                &crate::cache::Request {
                    analysis: &stmt.analysis,
                    sql: &sql,
                    identity: &identity,
                    database: &self.login.database,
                    user: &self.login.user,
                    params: engine.params(),
                },
            )?;
            Some((stmt, plan))
        };
        let who = Identity {
            database: &self.login.database,
            user: &self.login.user,
            params: self.engine.params(),
        };
        let required = self
            .engine
            .lookup_statement(match msg {
                FrontendMsg::Bind(b) => &b.statement,
                _ => &[][..],
            })
            .map(|s| self.engine.ryw_need(&s.analysis).lsn)
            .unwrap_or(self.engine.ryw.min_lsn.max(self.engine.ryw.last_commit_lsn));
        match self
            .cache
            .offer(&shared, frame, msg, start, &who, required)
            .await
        {
            cache::Held::No => false,
            cache::Held::Taken => true,
            cache::Held::Answer(messages) => {
                self.engine.answer_cached(messages);
                true
            }
            cache::Held::Release { frames, fill } => {
                self.fill_next = fill;
                self.backlog.extend(frames);
                true
            }
        }
    }

    /// Carries out a routed client message: the cache, read-your-writes, a backend.
    async fn dispatch(&mut self, frame: Frame, msg: FrontendMsg, route: Route) {
        let mut route = route;
        let mut want_replica = None;
        let mut fill = None;
        if route.target == Which::Replica && self.engine.anchored_to().is_none() {
            if let Some(analysis) = route.analysis.clone() {
                let need = self.engine.ryw_need(&analysis);
                if let FrontendMsg::Query(text) = &msg {
                    if self.engine.may_use_cache() {
                        let who = Identity {
                            database: &self.login.database,
                            user: &self.login.user,
                            params: self.engine.params(),
                        };
                        if let Some(plan) =
                            self.cache.plan_simple(&self.shared, &analysis, text, &who)
                        {
                            if let Some(m) = self.cache.lookup(&self.shared, &plan, need.lsn).await
                            {
                                self.engine.answer_cached(m);
                                return;
                            }
                            fill = Some(plan);
                        }
                    }
                }
                let held = self.conns.get(Which::Replica).map(|c| c.addr.clone());
                let fresh = !self.conns.is_stale(Which::Replica);
                let choice = ryw_wait::choose(
                    &self.shared,
                    &need,
                    held.as_ref().map(|a| (a, fresh)),
                    self.engine.is_waiting_on().is_none(),
                    self.salt,
                )
                .await;
                match choice {
                    RywChoice::Primary => {
                        route.target = Which::Primary;
                        fill = None;
                    }
                    RywChoice::Replica(addr) => want_replica = addr,
                }
                if !self.engine.may_send_to(route.target) {
                    self.stalled = Some(frame);
                    return;
                }
            }
        }
        if matches!(msg, FrontendMsg::Bind(_)) {
            if let Some(plan) = self.fill_next.take() {
                if route.target == Which::Replica {
                    fill = Some(plan);
                }
            }
        }
        let w = route.target;
        let keep = self.engine.anchored_to() == Some(w) || self.engine.busy_on(w);
        let shared = &self.shared;
        let held = self.conns.held();
        if !self.conns.holds_usable(w, want_replica.as_ref(), keep) {
            if let Err(refusal) = self.conns.ensure(w, want_replica, keep).await {
                self.engine.no_backend(&msg, refusal);
                return;
            }
        }
        let Some(conn) = self.conns.get(w) else {
            self.engine
                .no_backend(&msg, Refusal::Proxy(ProxyError::NoBackend));
            return;
        };
        let env = Env {
            classifier: shared.classifier(),
            catalog: &self.inputs.catalog,
            replica_available: false,
            held: (held.0 || w == Which::Primary, held.1 || w == Which::Replica),
            unlogged: &|n| shared.is_unlogged(n),
        };
        if self.cancel_target != Some((w, conn.state.pid)) {
            self.cancel_target = Some((w, conn.state.pid));
            let key = BackendKey {
                addr: conn.addr.clone(),
                pid: conn.state.pid,
                secret: conn.secret,
            };
            if let Ok(mut slot) = self.cancel.slot.lock() {
                *slot = Some(key);
            }
        }
        self.engine
            .dispatch(&frame, &msg, &route, &mut conn.state, fill, &env);
        if route.analysis.is_some() {
            match w {
                Which::Primary => self.queries.primary.inc(),
                Which::Replica => self.queries.replica.inc(),
            };
        }
        self.started.get_or_insert_with(Instant::now);
    }

    /// A message (or the end) from backend `w`, and whatever else it already sent.
    async fn on_backend(&mut self, w: Which, r: Result<Frame, BackendError>) {
        let mut r = r;
        loop {
            let Some(conn) = self.conns.get(w) else {
                return;
            };
            match r {
                Ok(f) => self.engine.on_backend(w, &f, &mut conn.state),
                Err(e) => {
                    debug!(backend = ?w, error = %e, "backend connection ended");
                    self.engine.on_backend_ended(w, None);
                    return;
                }
            }
            if self.engine.has_events() || self.engine.out.client.len() >= WRITE_CLIENT_AT {
                return;
            }
            let Some(conn) = self.conns.get(w) else {
                return;
            };
            if !conn.has_buffered_frame() {
                return;
            }
            r = conn.read_frame().await;
        }
    }

    /// Acts on the engine's events and moves its output to the backends.
    async fn after_engine(&mut self) -> Result<(), SessionError> {
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Release => self.conns.release_all(Reset::None).await,
                Event::Discard(w) => self.conns.discard(w),
                Event::Close => self.closing = true,
                Event::Answered => {
                    if let Some(t) = self.started.take() {
                        self.shared
                            .metrics()
                            .latency
                            .observe(t.elapsed().as_secs_f64());
                    }
                }
                Event::Store {
                    plan,
                    bracket,
                    messages,
                } => self.cache.store(&self.shared, plan, bracket, messages),
                Event::TooLargeToCache => self.shared.metrics().cache_store("too_large"),
                Event::Error(code) => self.shared.metrics().error(&code),
                Event::Unlogged(names) => self.shared.add_unlogged(names),
                Event::Replay(frame) => self.backlog.push_front(frame),
            }
        }
        for w in [Which::Primary, Which::Replica] {
            let out = self.engine.out.backend(w);
            if out.is_empty() {
                continue;
            }
            match self.conns.get(w) {
                Some(c) => c.queue_buf(out),
                None => out.clear(),
            }
        }
        if self.engine.out.client.len() >= WRITE_CLIENT_AT {
            self.client.write_out(&mut self.engine.out.client).await?;
        }
        Ok(())
    }

    /// Writes what is queued for the backends, then the client's output.
    async fn write_out(&mut self) -> Result<(), SessionError> {
        for (w, e) in self.conns.flush().await {
            debug!(backend = ?w, error = %e, "writing to a backend failed");
            self.engine.on_backend_ended(w, None);
            self.after_engine().await?;
        }
        if !self.engine.out.client.is_empty() {
            self.client.write_out(&mut self.engine.out.client).await?;
        }
        Ok(())
    }

    /// Gives the backends back: one in the middle of something is dropped; one that
    /// holds pinned state is cleaned before its next user; a bound session's own
    /// connection is closed.
    async fn finish(&mut self) {
        for w in [Which::Primary, Which::Replica] {
            if self.engine.busy_on(w) {
                self.conns.discard(w);
            }
        }
        let reset = if self.engine.pinned().is_some() {
            Reset::Discard
        } else {
            Reset::None
        };
        self.conns.release_all(reset).await;
    }
}

async fn read_backend(c: &mut Option<Held>) -> Result<Frame, BackendError> {
    match c {
        Some(c) => c.read_frame().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
