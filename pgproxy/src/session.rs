//! One client session after authentication: routing, backend acquisition,
//! the relay of messages in both directions, and the session state that must
//! survive moving between backends.
//!
//! The relay is full duplex: the session waits at the same time on the client
//! and on the backends it holds, so asynchronous backend messages (notices,
//! notifications) pass through and a dead idle backend is noticed and dropped
//! before the next statement needs it. Every message sent to a backend pushes
//! what it will answer onto the `pending` queue; backend messages are matched
//! against it, which lets the session answer some messages itself (a `Parse`
//! of a statement the backend already holds), swallow the answers to messages
//! it injected (re-preparing a statement, replaying `SET`s), and know exactly
//! when a backend is idle and may go back to the pool.
//!
//! Limits: a client that pipelines statements for different backends is
//! served in order, one backend at a time (the session stops reading the
//! client until the first backend has answered).

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_shared::config::PoolMode;
use meridian_shared::lsn::Lsn;
use meridian_sqlroute::{Analysis, PinReason, TxEffect};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::backend::{BackendConn, BackendError, ConnectParams, Reset};
use crate::cache::fill::{Fill, Spoiled};
use crate::cache::rules::{self as cache_rules, SessionFloor};
use crate::cache::{self, store::Found, Plan};
use crate::cancel::{BackendKey, CancelSlot};
use crate::client::{ClientConn, ClientError};
use crate::metrics::{OutcomeLabel, TargetLabel};
use crate::pool::{self, PoolError, Pooled};
use crate::route::{self, SessionView, Which};
use crate::ryw::{self, Command, RywStep, Setting};
use crate::wire::{self, Frame};
use crate::Shared;

/// How often a primary that failed is retried during a failover hold.
const PRIMARY_RETRY: Duration = Duration::from_millis(100);

/// What a session waiting for a primary does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldStep {
    /// Keep waiting, at most this much longer.
    Wait(Duration),
    /// Give up: the hold (possibly zero) has run out.
    Fail,
}

/// The failover-hold bookkeeping (pure): a wait that started at `started`
/// may go on until `started + hold`.
pub fn hold_step(started: Instant, hold: Duration, now: Instant) -> HoldStep {
    let remaining = (started + hold).saturating_duration_since(now);
    if remaining.is_zero() {
        HoldStep::Fail
    } else {
        HoldStep::Wait(remaining)
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// A statement prepared by the client (named or unnamed).
#[derive(Debug)]
struct Stmt {
    query: String,
    param_types: Vec<u8>,
    hash: u64,
    /// Name on the backends: shared by every client preparing the same text and types.
    server_name: String,
    analysis: Arc<Analysis>,
}

/// What a message sent to the backend will be answered with.
#[derive(Debug)]
enum Pending {
    /// A simple query (or function call); ends with ReadyForQuery.
    Query {
        swallow: bool,
        analysis: Option<Arc<Analysis>>,
        failed: bool,
    },
    Parse {
        swallow: bool,
        server_name: Option<String>,
        client_name: Option<String>,
    },
    Bind,
    Describe,
    Execute {
        analysis: Option<Arc<Analysis>>,
    },
    Close,
    Sync,
    /// The proxy's own commit-LSN query ([`ryw::COMMIT_LSN_QUERY`]): its rows
    /// update `last_commit_lsn`, nothing reaches the client.
    Lsn,
    /// The proxy's `pg_last_wal_replay_lsn()` before (`after: false`) or after a cache fill's
    /// query: its row brackets the captured result, nothing reaches the client.
    ReplayLsn {
        after: bool,
    },
    /// Answered by the proxy itself when it reaches the head of the queue.
    Synthetic(Frame),
}

/// Session-level parameters to replay on every backend the session uses.
#[derive(Debug, Default)]
struct Params {
    list: Vec<(String, String)>,
    hash: u64,
}

impl Params {
    fn set(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        match self.list.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 = value.to_owned(),
            None => self.list.push((name, value.to_owned())),
        }
        self.rehash();
    }
    fn reset(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        self.list.retain(|(n, _)| *n != name);
        self.rehash();
    }
    fn reset_all(&mut self) {
        self.list.clear();
        self.rehash();
    }
    fn rehash(&mut self) {
        self.hash = if self.list.is_empty() {
            0
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.list.hash(&mut h);
            h.finish() | 1
        };
    }
    /// SQL that brings a backend from `conn_hash` to these parameters, if anything is needed.
    fn prelude(&self, conn: &mut BackendConn) -> Option<String> {
        let mut sql = String::new();
        if conn.params_hash != self.hash {
            if conn.params_hash != 0 {
                sql.push_str("RESET ALL;");
            }
            for (name, value) in &self.list {
                sql.push_str("SET ");
                sql.push_str(name);
                sql.push_str(" = ");
                sql.push_str(value);
                sql.push(';');
            }
            conn.params_hash = self.hash;
        }
        (!sql.is_empty()).then_some(sql)
    }
}

enum Event {
    Client(Result<Frame, ClientError>),
    Backend(Which, Result<Frame, BackendError>),
    Shutdown,
}

/// Identity of an authenticated session.
pub struct Login {
    pub user: String,
    pub database: String,
    pub backend_user: String,
    pub backend_password: Option<String>,
    pub mode: PoolMode,
    /// Startup parameters to replay on backends (`SET name = 'value'`).
    pub startup_params: Vec<(String, String)>,
    pub cancel_slot: CancelSlot,
}

pub struct Session<S> {
    shared: Arc<Shared>,
    client: ClientConn<S>,
    login: Login,
    salt: u64,
    primary: Option<Pooled>,
    replica: Option<Pooled>,
    active: Option<Which>,
    pending: VecDeque<Pending>,
    /// Client-visible transaction status.
    tx_status: u8,
    tx_backend: Option<Which>,
    /// The transaction's backend was lost: answer with 25P02 until it ends.
    tx_lost: bool,
    /// A `BEGIN` not yet sent: the next statement decides where the transaction runs.
    lazy_begin: Option<(String, bool)>,
    batch: Option<Which>,
    /// After losing a backend mid-batch: ignore extended messages until Sync.
    skip_until_sync: bool,
    statements: HashMap<String, Arc<Stmt>>,
    unnamed: Option<Arc<Stmt>>,
    last_bound: Option<Arc<Stmt>>,
    params: Params,
    pinned: Option<PinReason>,
    read_only_session: bool,
    copy_in: bool,
    stalled: Option<Frame>,
    query_start: Option<Instant>,
    cancel_target: Option<(Which, i32)>,
    /// The backend's own FATAL error was already forwarded for the current loss.
    loss_reported: bool,
    /// Highest commit LSN of this session's writes (read-your-writes).
    last_commit_lsn: Option<Lsn>,
    /// `SET meridian.min_lsn`: the causal token reads must wait for.
    min_lsn: Option<Lsn>,
    /// `SET meridian.max_staleness`.
    max_staleness: Option<Duration>,
    /// The replica the read-your-writes decision chose for the next acquisition.
    want_replica: Option<Arc<str>>,
    /// The current extended batch executed something that commits.
    batch_commit: bool,
    /// ... and something that may enter COPY FROM STDIN.
    batch_copy: bool,
    /// A committing statement that may enter COPY IN is running on the primary (no query can
    /// be pipelined behind it): learn the commit LSN once its ReadyForQuery says idle.
    commit_pending: bool,
    /// A cacheable read running on a replica whose result is being captured.
    fill: Option<Fill>,
    /// What this session has read through the cache (monotonic reads).
    cache_floor: SessionFloor,
    /// An extended-protocol execution waiting for its Sync (cache lookup).
    hold: Option<Hold>,
    /// Client messages released from a hold, handled before reading the client again.
    backlog: VecDeque<Frame>,
    /// Released messages are being handled: no new hold until their Sync.
    releasing: bool,
    /// The released execution's Bind starts a fill with this plan.
    fill_next: Option<Plan>,
    /// Statements of the extended protocol that are the proxy's own commands (`meridian.*`).
    local_stmts: HashMap<String, Command>,
    /// Portals bound to those statements.
    local_portals: HashMap<String, Command>,
}

/// An extended-protocol execution held back until its Sync, to be answered from the cache.
#[derive(Debug)]
struct Hold {
    plan: Plan,
    stmt: Arc<Stmt>,
    /// The Bind message after its portal and statement names.
    bind_rest: Vec<u8>,
    frames: Vec<Frame>,
    described: bool,
    executed: bool,
}

fn stmt_hash(query: &str, types: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    query.hash(&mut h);
    types.hash(&mut h);
    h.finish()
}

/// The RowDescription of a proxy command's result (`SHOW` has one text column).
fn command_row_description(cmd: &Command) -> Option<Frame> {
    match cmd {
        Command::Show(s) => Some(wire::row_description_text(s.name())),
        _ => None,
    }
}

fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub fn new(shared: Arc<Shared>, client: ClientConn<S>, login: Login, salt: u64) -> Self {
        let mut params = Params::default();
        for (k, v) in &login.startup_params {
            params.set(k, &quote_literal(v));
        }
        Session {
            shared,
            client,
            login,
            salt,
            primary: None,
            replica: None,
            active: None,
            pending: VecDeque::new(),
            tx_status: b'I',
            tx_backend: None,
            tx_lost: false,
            lazy_begin: None,
            batch: None,
            skip_until_sync: false,
            statements: HashMap::new(),
            unnamed: None,
            last_bound: None,
            params,
            pinned: None,
            read_only_session: false,
            copy_in: false,
            stalled: None,
            query_start: None,
            cancel_target: None,
            loss_reported: false,
            last_commit_lsn: None,
            min_lsn: None,
            max_staleness: None,
            want_replica: None,
            batch_commit: false,
            batch_copy: false,
            commit_pending: false,
            fill: None,
            cache_floor: SessionFloor::default(),
            hold: None,
            backlog: VecDeque::new(),
            releasing: false,
            fill_next: None,
            local_stmts: HashMap::new(),
            local_portals: HashMap::new(),
        }
    }

    /// Acquires the first backend to learn the server's parameters for the
    /// client's startup reply; also proves the database exists.
    pub async fn server_params(&mut self) -> Result<Vec<(String, String)>, PoolError> {
        let which = if self.replica_available() {
            Which::Replica
        } else {
            Which::Primary
        };
        let which = match self.acquire_raw(which).await {
            Ok(()) => which,
            Err(e) if which == Which::Replica => {
                debug!(error = %e, "replica unavailable at login, using the primary");
                self.acquire_raw(Which::Primary).await?;
                Which::Primary
            }
            Err(e) => return Err(e),
        };
        let params = self
            .conn(which)
            .map(|c| c.params.clone())
            .unwrap_or_default();
        if self.login.mode == PoolMode::Transaction {
            self.release_all();
        }
        Ok(params)
    }

    /// Ends the connection with a FATAL error (login failures).
    pub async fn fatal(&mut self, code: &str, message: &str) {
        self.client.fatal(code, message).await;
    }

    /// The reply to a successful login: server parameters (overridden by what
    /// the client asked for), the proxy's own cancel key, ReadyForQuery.
    pub fn send_startup_reply(
        &mut self,
        server: &[(String, String)],
        asked: &[(String, String)],
        pid: i32,
        secret: i32,
    ) {
        for (name, value) in server {
            let value = asked
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
                .unwrap_or(value);
            self.client.send(&wire::parameter_status(name, value));
        }
        self.client.send(&wire::backend_key_data(pid, secret));
        self.client.send(&wire::ready_for_query(b'I'));
    }

    pub async fn flush_client(&mut self) -> Result<(), ClientError> {
        self.client.flush().await
    }

    fn replica_available(&self) -> bool {
        self.shared.config().routing.replica_reads
            && self.shared.topology().borrow().has_usable_replica()
    }

    fn conn(&mut self, w: Which) -> Option<&mut Pooled> {
        match w {
            Which::Primary => self.primary.as_mut(),
            Which::Replica => self.replica.as_mut(),
        }
    }

    fn slot(&mut self, w: Which) -> &mut Option<Pooled> {
        match w {
            Which::Primary => &mut self.primary,
            Which::Replica => &mut self.replica,
        }
    }

    fn connect_params(&self, addr: Arc<str>) -> ConnectParams {
        let cfg = self.shared.config();
        ConnectParams {
            addr,
            user: self.login.backend_user.clone(),
            database: self.login.database.clone(),
            password: self.login.backend_password.clone(),
            tls: self.shared.backend_tls().clone(),
            connect_timeout: cfg.pool.connect_timeout,
            max_message: cfg.max_message_size,
        }
    }

    /// Makes sure the session holds a backend of kind `w`.
    async fn acquire(&mut self, w: Which) -> Result<&mut Pooled, PoolError> {
        self.acquire_raw(w).await?;
        self.apply_prelude(w)
    }

    /// Makes sure the session holds a backend of kind `w`; nothing is sent to it.
    ///
    /// Outside a transaction a held backend that the topology no longer backs
    /// (the primary of an older leader or epoch, a replica that is down) is
    /// discarded first, so a new transaction never starts on it.
    async fn acquire_raw(&mut self, w: Which) -> Result<(), PoolError> {
        self.discard_stale(w);
        // The read-your-writes choice applies to this acquisition only.
        let want = self.want_replica.take();
        if self.slot(w).is_some() {
            return Ok(());
        }
        let conn = match w {
            Which::Primary => self.connect_primary().await?,
            Which::Replica => {
                let addr = want.or_else(|| {
                    self.shared
                        .topology()
                        .borrow()
                        .pick_replica(&self.shared.config().region, self.salt)
                        .map(|b| b.addr.clone())
                });
                let Some(addr) = addr else {
                    return Err(PoolError::ConnectFailed {
                        addr: Arc::from("(none)"),
                        message: Arc::from("no replica is available"),
                        unavailable: true,
                    });
                };
                let params = self.connect_params(addr);
                let pool_cfg = self.shared.config().pool.clone();
                self.shared.pools().get(&params, None, &pool_cfg).await?
            }
        };
        *self.slot(w) = Some(conn);
        Ok(())
    }

    /// Drops a held backend of kind `w` that must not start a new transaction.
    fn discard_stale(&mut self, w: Which) {
        if self.tx_backend == Some(w) || !self.pending.is_empty() {
            return;
        }
        if self.held_is_stale(w) {
            let pinned = self.pinned;
            if let Some(mut c) = self.slot(w).take() {
                if let (Which::Primary, Some(reason)) = (w, pinned) {
                    // Its session state (temp tables, locks, listeners) stays behind on
                    // the old primary; it cannot move to a new one.
                    warn!(addr = %c.addr, ?reason, "pinned primary backend replaced by a new leader; its session state is lost");
                } else {
                    debug!(backend = ?w, addr = %c.addr, "held backend no longer in the topology; discarded");
                }
                c.broken = true;
            }
            if self.active == Some(w) {
                self.active = None;
            }
        }
    }

    /// Whether the held backend of kind `w` (if any) is one the topology no
    /// longer backs: a primary of another node or epoch, a replica that is down.
    fn held_is_stale(&self, w: Which) -> bool {
        let topo = self.shared.topology().borrow();
        match (w, self.conn_ref(w)) {
            (Which::Primary, Some(c)) => !pool::still_current(&c.addr, c.fence_epoch, &topo),
            (Which::Replica, Some(c)) => !topo.is_usable_replica(&c.addr),
            (_, None) => false,
        }
    }

    fn conn_ref(&self, w: Which) -> Option<&Pooled> {
        match w {
            Which::Primary => self.primary.as_ref(),
            Which::Replica => self.replica.as_ref(),
        }
    }

    /// A primary connection, waiting up to the topology's `failover_hold` while
    /// no serving primary is known or the known one cannot be connected to (or
    /// fails the fencing check). The wait follows the topology: a new leader is
    /// tried as soon as it is published; the same one is retried every
    /// [`PRIMARY_RETRY`]. Errors that waiting cannot cure (authentication, a
    /// missing database) end the wait at once.
    async fn connect_primary(&mut self) -> Result<Pooled, PoolError> {
        let mut topology = self.shared.topology().clone();
        let started = tokio::time::Instant::now();
        let mut waited = false;
        loop {
            let (addr, fence, hold) = {
                let t = topology.borrow_and_update();
                (t.primary.clone(), t.fence_epoch(), t.failover_hold)
            };
            let deadline = started + hold;
            let error = match addr {
                Some(addr) => {
                    let params = self.connect_params(addr.clone());
                    let pool_cfg = self.shared.config().pool.clone();
                    let get = self.shared.pools().get(&params, fence, &pool_cfg);
                    let r = if hold.is_zero() {
                        get.await
                    } else {
                        // Never wait on one attempt past the hold (a black-holed primary).
                        let until = deadline.max(tokio::time::Instant::now() + PRIMARY_RETRY);
                        tokio::time::timeout_at(until, get)
                            .await
                            .unwrap_or(Err(PoolError::Timeout(addr)))
                    };
                    match r {
                        Ok(c) => {
                            if waited {
                                let held = started.elapsed();
                                self.shared
                                    .metrics()
                                    .failover_hold_seconds
                                    .inc_by(held.as_secs_f64());
                                debug!(?held, "primary available after a failover hold");
                            }
                            return Ok(c);
                        }
                        Err(e) if !e.is_unavailable() => return Err(e),
                        Err(e) => e,
                    }
                }
                None => PoolError::ConnectFailed {
                    addr: Arc::from("(none)"),
                    message: Arc::from("no primary is known"),
                    unavailable: true,
                },
            };
            let now = tokio::time::Instant::now();
            match hold_step(started.into_std(), hold, now.into_std()) {
                HoldStep::Fail => {
                    if hold.is_zero() {
                        return Err(error);
                    }
                    self.shared.metrics().failover_hold_timeouts.inc();
                    self.shared
                        .metrics()
                        .failover_hold_seconds
                        .inc_by(started.elapsed().as_secs_f64());
                    warn!(error = %error, ?hold, "no primary within the failover hold");
                    return Err(PoolError::NoPrimary {
                        held_ms: started.elapsed().as_millis(),
                    });
                }
                HoldStep::Wait(remaining) => {
                    if !waited {
                        waited = true;
                        self.shared.metrics().failover_holds.inc();
                        debug!(error = %error, ?hold, "holding for a primary");
                    }
                    let pause = remaining.min(PRIMARY_RETRY);
                    tokio::select! {
                        r = topology.changed() => {
                            if r.is_err() {
                                tokio::time::sleep(pause).await;
                            }
                        }
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// Queues the replay of the session's parameters on backend `w` if it differs.
    fn apply_prelude(&mut self, w: Which) -> Result<&mut Pooled, PoolError> {
        let params = &self.params;
        let conn = match w {
            Which::Primary => self.primary.as_mut(),
            Which::Replica => self.replica.as_mut(),
        };
        let Some(conn) = conn else {
            return Err(PoolError::Timeout(Arc::from("backend")));
        };
        if let Some(sql) = params.prelude(conn) {
            conn.queue(&wire::encode_query(&sql).raw);
            self.pending.push_back(Pending::Query {
                swallow: true,
                analysis: None,
                failed: false,
            });
            self.active = Some(w);
        }
        match w {
            Which::Primary => self.primary.as_mut(),
            Which::Replica => self.replica.as_mut(),
        }
        .ok_or_else(|| PoolError::Timeout(Arc::from("backend")))
    }

    /// Returns held backends to their pools (transaction mode, or session end).
    fn release_all(&mut self) {
        for w in [Which::Primary, Which::Replica] {
            if let Some(mut c) = self.slot(w).take() {
                if self.pinned.is_some() {
                    c.reset = Reset::Discard;
                }
                drop(c);
            }
        }
        self.active = None;
    }

    fn held(&self) -> Option<Which> {
        if self.primary.is_some() {
            Some(Which::Primary)
        } else if self.replica.is_some() {
            Some(Which::Replica)
        } else {
            None
        }
    }

    fn decide(&self, analysis: &Analysis) -> Which {
        let catalog = self.shared.catalog();
        let view = SessionView {
            in_tx: self.tx_backend,
            pinned: self.pinned.is_some(),
            read_only_session: self.read_only_session,
            replica_available: self.replica_available(),
            held: self.held(),
        };
        let (w, reason) = route::route(analysis, &catalog, view);
        if reason == route::Reason::ParseFailed {
            self.shared.metrics().parse_fallbacks.inc();
        }
        w
    }

    /// Runs the session until the client leaves.
    pub async fn run(mut self) -> Result<(), SessionError> {
        let mut shutdown = self.shared.shutdown().clone();
        let result = self.relay(&mut shutdown).await;
        self.finish().await;
        result
    }

    async fn finish(&mut self) {
        // A backend in the middle of something cannot be reused.
        if !self.pending.is_empty() || self.copy_in {
            for w in [Which::Primary, Which::Replica] {
                if let Some(c) = self.conn(w) {
                    c.broken = true;
                }
            }
        }
        if let Ok(mut slot) = self.login.cancel_slot.lock() {
            *slot = None;
        }
        self.release_all();
    }

    async fn relay(
        &mut self,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        loop {
            if let Some(f) = self.stalled.take() {
                if self.pending.is_empty() {
                    if self.handle_client(f).await? {
                        return Ok(());
                    }
                    continue;
                }
                self.stalled = Some(f);
            }
            // Messages released from a cache hold come before anything newer.
            if self.stalled.is_none() {
                if let Some(f) = self.backlog.pop_front() {
                    if self.handle_client(f).await? {
                        return Ok(());
                    }
                    continue;
                }
            }
            // Drain whatever the client already sent before waiting.
            if self.stalled.is_none() {
                if let Some(f) = self.client.try_buffered_frame()? {
                    if self.handle_client(f).await? {
                        return Ok(());
                    }
                    continue;
                }
            }
            self.flush_backends().await;
            if *shutdown.borrow()
                && self.pending.is_empty()
                && self.tx_status == b'I'
                && self.stalled.is_none()
            {
                self.client
                    .fatal(
                        "57P01",
                        "terminating connection: meridian-pgproxy is shutting down",
                    )
                    .await;
                return Ok(());
            }
            let event = {
                let read_client = self.stalled.is_none();
                let active = self.active;
                let busy = !self.pending.is_empty();
                let Session {
                    client,
                    primary,
                    replica,
                    ..
                } = self;
                tokio::select! {
                    biased;
                    r = read_backend(primary), if primary.is_some() => Event::Backend(Which::Primary, r),
                    r = read_backend(replica), if replica.is_some() => Event::Backend(Which::Replica, r),
                    r = client.read_frame(), if read_client => Event::Client(r),
                    _ = shutdown.changed(), if !busy && active.is_none() => Event::Shutdown,
                }
            };
            match event {
                Event::Client(Err(ClientError::Closed)) => return Ok(()),
                Event::Client(Err(e)) => {
                    if let ClientError::Wire(w) = &e {
                        self.client
                            .fatal("08P01", &format!("invalid message: {w}"))
                            .await;
                    }
                    return Err(e.into());
                }
                Event::Client(Ok(f)) => {
                    if self.handle_client(f).await? {
                        return Ok(());
                    }
                }
                Event::Backend(w, r) => {
                    self.on_backend_result(w, r).await?;
                    // Forward everything already buffered, then flush once.
                    while let Some(c) = self.conn(w) {
                        if !c.has_buffered_frame() {
                            break;
                        }
                        let r = c.read_frame().await;
                        self.on_backend_result(w, r).await?;
                    }
                    if self.client.pending_output() > 0 {
                        self.client.flush().await?;
                    }
                }
                Event::Shutdown => {}
            }
        }
    }

    async fn flush_backends(&mut self) {
        for w in [Which::Primary, Which::Replica] {
            let Some(c) = self.conn(w) else { continue };
            if c.has_queued() {
                if let Err(e) = c.flush().await {
                    let _ = self.backend_lost(w, e).await;
                }
            }
        }
    }

    async fn on_backend_result(
        &mut self,
        w: Which,
        r: Result<Frame, BackendError>,
    ) -> Result<(), SessionError> {
        match r {
            Ok(f) => self.on_backend_frame(w, f).await,
            Err(e) => self.backend_lost(w, e).await,
        }
    }

    /// A backend failed. In-flight work gets a class-08 error; an idle backend is dropped quietly.
    async fn backend_lost(&mut self, w: Which, e: BackendError) -> Result<(), SessionError> {
        self.fill = None;
        if let Some(mut c) = self.slot(w).take() {
            c.broken = true;
        }
        let busy = self.active == Some(w)
            && self.pending.iter().any(|p| {
                !matches!(
                    p,
                    Pending::Lsn | Pending::ReplayLsn { .. } | Pending::Query { swallow: true, .. }
                )
            });
        if !busy {
            // Only the proxy's own queries were in flight: nothing to tell the client.
            if self.active == Some(w) {
                self.pending.clear();
                self.active = None;
            }
            debug!(backend = ?w, error = %e, "idle backend connection lost; dropped");
            if self.tx_backend == Some(w) {
                self.tx_backend = None;
                self.tx_lost = true;
                self.tx_status = b'E';
            }
            return Ok(());
        }
        warn!(backend = ?w, error = %e, "backend connection lost during a statement");
        let in_tx = self.tx_backend == Some(w);
        let message = if in_tx {
            "server connection lost: the transaction was rolled back and may be retried"
        } else {
            "server connection lost while running the statement; it may or may not have been applied"
        };
        // Every request the client is waiting on ends now: each simple query and
        // each Sync gets an error and a ReadyForQuery, in order; extended messages
        // after the last Sync are skipped until the client's next Sync.
        let pending = std::mem::take(&mut self.pending);
        self.active = None;
        self.batch = None;
        self.copy_in = false;
        if in_tx {
            self.tx_backend = None;
            self.tx_lost = true;
            self.tx_status = b'E';
        }
        let mut trailing = false;
        let mut first = true;
        let mut reported = std::mem::take(&mut self.loss_reported);
        let already = reported;
        for p in pending {
            match p {
                Pending::Sync | Pending::Query { swallow: false, .. } => {
                    if !std::mem::take(&mut reported) {
                        let text = if first {
                            message
                        } else {
                            "server connection lost"
                        };
                        self.send_error("08006", text);
                    }
                    self.client.send(&wire::ready_for_query(self.tx_status));
                    first = false;
                    trailing = false;
                }
                Pending::Query { swallow: true, .. } | Pending::Lsn | Pending::ReplayLsn { .. } => {
                }
                _ => trailing = true,
            }
        }
        if trailing || first {
            if first && !already {
                self.send_error("08006", message);
            }
            self.skip_until_sync = true;
        }
        self.client.flush().await?;
        Ok(())
    }

    fn send_error(&mut self, code: &str, message: &str) {
        self.shared.metrics().error(code);
        self.client
            .send(&wire::error_response("ERROR", code, message));
    }

    /// Emits answers the proxy gives itself once they reach the head of the queue.
    fn drain_synthetic(&mut self) {
        while let Some(Pending::Synthetic(_)) = self.pending.front() {
            if let Some(Pending::Synthetic(f)) = self.pending.pop_front() {
                if f.tag == b'Z' {
                    self.tx_status = wire::ready_status(&f);
                }
                self.client.send(&f);
            }
        }
        if self.pending.is_empty() {
            self.active = None;
        }
    }

    fn set_cancel_target(&mut self, w: Which) {
        let Some(c) = self.conn(w) else { return };
        let key = BackendKey {
            addr: c.addr.clone(),
            pid: c.pid,
            secret: c.secret,
        };
        if self.cancel_target == Some((w, key.pid)) {
            return;
        }
        self.cancel_target = Some((w, key.pid));
        if let Ok(mut slot) = self.login.cancel_slot.lock() {
            *slot = Some(key);
        }
    }

    /// Handles one client message. Returns true when the client said goodbye.
    async fn handle_client(&mut self, f: Frame) -> Result<bool, SessionError> {
        tracing::trace!(tag = %(f.tag as char), batch = ?self.batch, "client message");
        match f.tag {
            b'X' => return Ok(true),
            b'S' | b'H' if self.copy_in => {
                // Ignored by the backend in copy-in mode: pass on, expect nothing.
                if let Some(w) = self.active {
                    if let Some(c) = self.conn(w) {
                        c.queue(&f.raw);
                    }
                }
                return Ok(false);
            }
            b'd' | b'c' | b'f' => {
                if self.copy_in {
                    if f.tag != b'd' {
                        self.copy_in = false;
                    }
                    if let Some(w) = self.active {
                        if let Some(c) = self.conn(w) {
                            c.queue(&f.raw);
                        }
                    }
                }
                return Ok(false);
            }
            _ => {}
        }
        if self.copy_in {
            return Err(SessionError::Protocol(format!(
                "unexpected message {:?} during COPY",
                f.tag as char
            )));
        }
        match f.tag {
            b'Q' => self.handle_query(f).await?,
            b'F' => self.handle_function_call(f).await?,
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' => self.handle_extended(f).await?,
            other => {
                self.client
                    .fatal(
                        "08P01",
                        &format!("invalid frontend message type {:?}", other as char),
                    )
                    .await;
                return Err(SessionError::Protocol(format!("message type {other}")));
            }
        }
        Ok(false)
    }

    /// True if the frame must wait until the current backend has answered.
    fn must_stall(&mut self, target: Which, f: &Frame) -> bool {
        let other_busy = self.active.is_some_and(|a| a != target);
        // A held backend the topology no longer backs can only be replaced once it
        // has answered what it was sent (e.g. a Sync after a client's Close): wait
        // for that instead of starting new work on it. Not inside an extended batch
        // (the backend may hold its answers until the batch's Sync) or a transaction.
        let stale_busy =
            self.batch.is_none() && self.tx_backend != Some(target) && self.held_is_stale(target);
        if !self.pending.is_empty() && (other_busy || stale_busy) {
            self.stalled = Some(f.clone());
            return true;
        }
        false
    }

    async fn handle_query(&mut self, f: Frame) -> Result<(), SessionError> {
        // The text is borrowed from a second handle on the frame's bytes (a reference count,
        // no copy), so `f` itself can still be stalled or forwarded.
        let frame = f.clone();
        let sql = match wire::query_text(&frame) {
            Ok(s) => s,
            Err(e) => {
                self.client.fatal("08P01", &e.to_string()).await;
                return Err(SessionError::Protocol(e.to_string()));
            }
        };
        self.query_start = Some(Instant::now());
        let analysis = self.shared.classifier().analyze(sql);
        let tx = analysis.tx_effect();

        if self.tx_lost {
            return self.answer_lost_tx(tx, false).await;
        }
        if let Some(cmd) = ryw::parse_command(sql) {
            if !self.pending.is_empty() {
                self.stalled = Some(f);
                return Ok(());
            }
            return self.answer_command(cmd).await;
        }
        // Transaction start: defer until the transaction's first statement shows where it runs.
        if self.tx_status == b'I'
            && self.pending.is_empty()
            && analysis.statements.len() == 1
            && matches!(tx, TxEffect::Begin { .. })
            && !analysis.hint.primary
        {
            let read_only = matches!(tx, TxEffect::Begin { read_only: true });
            self.lazy_begin = Some((sql.to_owned(), read_only));
            self.client.send(&wire::command_complete("BEGIN"));
            self.client.send(&wire::ready_for_query(b'T'));
            self.tx_status = b'T';
            self.client.flush().await?;
            return Ok(());
        }
        // An empty transaction never touches a backend.
        if self.lazy_begin.is_some()
            && analysis.statements.len() == 1
            && matches!(tx, TxEffect::Commit | TxEffect::Rollback)
        {
            self.lazy_begin = None;
            let tag = if tx == TxEffect::Commit {
                "COMMIT"
            } else {
                "ROLLBACK"
            };
            self.client.send(&wire::command_complete(tag));
            self.client.send(&wire::ready_for_query(b'I'));
            self.tx_status = b'I';
            self.client.flush().await?;
            return Ok(());
        }
        let target = self.target_for(&analysis);
        if self.must_stall(target, &f) {
            return Ok(());
        }
        // The identity is only built when a regional cache is configured (cache_plan is None
        // otherwise): it copies the text.
        let plan = if self.shared.cache().is_some() {
            self.cache_plan(target, &analysis, sql, &cache::entry::simple_identity(sql))
        } else {
            None
        };
        if let Some(plan) = &plan {
            if self.serve_from_cache(plan, &analysis).await? {
                return Ok(());
            }
        }
        let target = self.ryw_route(target, &analysis).await;
        if self.must_stall(target, &f) {
            return Ok(());
        }
        let in_tx = self.tx_backend.is_some() || self.lazy_begin.is_some();
        let commits = target == Which::Primary
            && self.learns_commits()
            && ryw::commit_point(&analysis, &self.shared.catalog(), in_tx);
        if let Err(e) = self.prepare_backend(target).await {
            return self.answer_no_backend(e, true).await;
        }
        self.count_route(target);
        if let Some(plan) = plan.filter(|_| target == Which::Replica && self.fill.is_none()) {
            self.start_fill(target, plan);
        }
        if let Some(c) = self.conn(target) {
            c.queue(&f.raw);
        }
        self.pending.push_back(Pending::Query {
            swallow: false,
            analysis: Some(analysis),
            failed: false,
        });
        self.close_fill(target);
        if commits {
            if ryw::may_copy(sql) {
                self.commit_pending = true;
            } else {
                self.queue_commit_lsn(target);
            }
        }
        self.active = Some(target);
        self.set_cancel_target(target);
        Ok(())
    }

    /// The cache plan of a simple-protocol read about to run on a replica, outside any
    /// transaction, with nothing else in flight.
    fn cache_plan(
        &self,
        target: Which,
        analysis: &Analysis,
        sql: &str,
        identity: &[u8],
    ) -> Option<Plan> {
        let cache = self.shared.cache()?;
        if target != Which::Replica
            || self.tx_backend.is_some()
            || self.lazy_begin.is_some()
            || self.pinned.is_some()
            || self.tx_status != b'I'
        {
            return None;
        }
        cache.plan(
            &self.shared,
            &cache::Request {
                analysis,
                sql,
                identity,
                database: &self.login.database,
                user: &self.login.user,
                params: &self.params.list,
            },
        )
    }

    /// The extended protocol: a cacheable `Bind` (of a statement prepared earlier) starts a hold;
    /// `Describe` of the portal and `Execute` (all rows) join it; its `Sync` is answered from the
    /// cache or releases the held messages, to run with a fill. Anything else releases them
    /// unchanged. Returns true when `f` was taken.
    async fn hold_extended(&mut self, f: &Frame) -> Result<bool, SessionError> {
        let Some(hold) = self.hold.as_mut() else {
            return self.start_hold(f);
        };
        match f.tag {
            b'D' if matches!(wire::target_of(f), Ok((b'P', _))) && !hold.executed => {
                hold.described = true;
                hold.frames.push(f.clone());
                return Ok(true);
            }
            b'E' if !hold.executed && wire::execute_max_rows(f) == Some(0) => {
                hold.executed = true;
                hold.frames.push(f.clone());
                return Ok(true);
            }
            b'S' if hold.executed => {}
            _ => {
                self.release_hold(f, false);
                return Ok(true);
            }
        }
        let Some(mut hold) = self.hold.take() else {
            return Ok(false);
        };
        let identity = cache::entry::extended_identity(
            &hold.stmt.query,
            &hold.stmt.param_types,
            hold.described,
            &hold.bind_rest,
        );
        hold.plan.hash = cache::entry::entry_hash(
            &self.login.database,
            &self.login.user,
            &self.params.list,
            &identity,
        );
        let analysis = hold.stmt.analysis.clone();
        if self.serve_from_cache(&hold.plan, &analysis).await? {
            return Ok(true);
        }
        let plan = hold.plan.clone();
        self.hold = Some(hold);
        self.release_hold(f, true);
        self.fill_next = Some(plan);
        Ok(true)
    }

    fn start_hold(&mut self, f: &Frame) -> Result<bool, SessionError> {
        if f.tag != b'B'
            || self.shared.cache().is_none()
            || self.batch.is_some()
            || self.releasing
            || self.stalled.is_some()
        {
            return Ok(false);
        }
        let Ok((_, stmt_name, rest)) = wire::bind_names(f) else {
            return Ok(false);
        };
        let Some(stmt) = self.lookup_stmt(stmt_name) else {
            return Ok(false);
        };
        let target = self.target_for(&stmt.analysis);
        let identity = cache::entry::extended_identity(&stmt.query, &stmt.param_types, false, rest);
        let Some(plan) = self.cache_plan(target, &stmt.analysis, &stmt.query, &identity) else {
            return Ok(false);
        };
        self.hold = Some(Hold {
            plan,
            bind_rest: rest.to_vec(),
            stmt,
            frames: vec![f.clone()],
            described: false,
            executed: false,
        });
        Ok(true)
    }

    /// Lets the held messages and `f` run as usual (through the backlog, in order).
    fn release_hold(&mut self, f: &Frame, fill: bool) {
        if let Some(hold) = self.hold.take() {
            self.backlog.extend(hold.frames);
            self.releasing = true;
        }
        if !fill {
            self.fill_next = None;
        }
        self.backlog.push_back(f.clone());
    }

    /// Looks `plan` up and answers the client from the cache if the entry may be served.
    async fn serve_from_cache(
        &mut self,
        plan: &Plan,
        analysis: &Analysis,
    ) -> Result<bool, SessionError> {
        let Some(cache) = self.shared.cache() else {
            return Ok(false);
        };
        let metrics = self.shared.metrics().clone();
        let started = Instant::now();
        let found = cache
            .store
            .lookup(plan.epoch, &plan.hash, &plan.tables)
            .await;
        metrics
            .cache_lookup_seconds
            .observe(started.elapsed().as_secs_f64());
        let (value, watermarks) = match found {
            Ok(Found::Entry(value, watermarks)) => (value, watermarks),
            Ok(Found::Miss) => {
                metrics.cache_lookup("miss");
                return Ok(false);
            }
            Err(e) => {
                debug!(error = %e, "cache lookup failed; running the read uncached");
                metrics.cache_lookup(e.outcome());
                return Ok(false);
            }
        };
        let Some((bracket, messages)) = cache::entry::decode(&value) else {
            metrics.cache_lookup("miss");
            return Ok(false);
        };
        let required = self.ryw_need(analysis).lsn;
        if !cache_rules::may_serve(
            &plan.hash,
            bracket,
            &watermarks,
            required,
            &self.cache_floor,
        ) {
            metrics.cache_lookup("stale");
            return Ok(false);
        }
        metrics.cache_lookup("hit");
        metrics
            .queries
            .get_or_create(&TargetLabel { target: "cache" })
            .inc();
        self.cache_floor.observe(&plan.hash, bracket);
        if let Some(start) = self.query_start.take() {
            metrics.latency.observe(start.elapsed().as_secs_f64());
        }
        if self.pending.is_empty() {
            self.client.send_raw(messages);
            self.client.send(&wire::ready_for_query(b'I'));
            self.tx_status = b'I';
            self.client.flush().await?;
        } else {
            // Answers to earlier messages (e.g. a pipelined Close and Sync) come first.
            let answer = Frame {
                tag: b'T',
                raw: bytes::Bytes::copy_from_slice(messages),
            };
            self.pending.push_back(Pending::Synthetic(answer));
            self.pending
                .push_back(Pending::Synthetic(wire::ready_for_query(b'I')));
        }
        Ok(true)
    }

    /// Starts a fill: the opening replay position is queued before the read.
    fn start_fill(&mut self, w: Which, plan: Plan) {
        self.queue_replay_lsn(w, false);
        self.fill = Some(Fill::new(plan));
    }

    /// Queues the closing replay position after the read being filled.
    fn close_fill(&mut self, w: Which) {
        if self.fill.as_ref().is_some_and(|fill| !fill.closed) {
            self.queue_replay_lsn(w, true);
            if let Some(fill) = self.fill.as_mut() {
                fill.closed = true;
            }
        }
    }

    /// Queues the replay-position query bracketing a cache fill on `w`.
    fn queue_replay_lsn(&mut self, w: Which, after: bool) {
        if let Some(c) = self.conn(w) {
            c.queue(&wire::encode_query(cache::REPLAY_LSN_QUERY).raw);
            self.pending.push_back(Pending::ReplayLsn { after });
        }
    }

    /// Captures one result message of the read being filled.
    fn capture(&mut self, f: &Frame) {
        let max = self.shared.config().cache.max_entry_bytes;
        let Some(fill) = self.fill.as_mut() else {
            return;
        };
        if fill.capture(f.tag, &f.raw, max) == Some(Spoiled::TooLarge) {
            self.shared.metrics().cache_store("too_large");
        }
    }

    /// The fill's closing replay position arrived: store the entry in the background.
    fn finish_fill(&mut self) {
        let Some((plan, bracket, messages)) = self.fill.take().and_then(Fill::finish) else {
            return;
        };
        self.cache_floor.observe(&plan.hash, bracket);
        let Some(cache) = self.shared.cache() else {
            return;
        };
        let store = cache.store.clone();
        let metrics = self.shared.metrics().clone();
        let value = cache::entry::encode(bracket, &messages);
        tokio::spawn(async move {
            match store
                .store(plan.epoch, &plan.hash, &plan.tables, value, plan.ttl)
                .await
            {
                Ok(()) => metrics.cache_store("stored"),
                Err(e) => {
                    debug!(error = %e, "cache store failed");
                    metrics.cache_store("error");
                }
            }
        });
    }

    /// Whether the session learns its commit LSNs (`routing.read_your_writes`).
    fn learns_commits(&self) -> bool {
        self.shared.config().routing.read_your_writes
    }

    /// Queues the commit-LSN query on `w` right behind the committing statement (or its
    /// batch's Sync), in the same flush; its answer is swallowed. (Behind a statement that
    /// may enter COPY IN nothing can be pipelined: there it is queued when the statement's
    /// ReadyForQuery arrives, `commit_pending`.) The backend runs it as
    /// soon as the commit is done, so its answer arrives on the heels of the client's
    /// ReadyForQuery: neither the commit nor the session's next statement waits a round
    /// trip for it. (If the statement failed instead, the position learned is merely a
    /// little higher than needed: later reads wait for it, never for less.)
    fn queue_commit_lsn(&mut self, w: Which) {
        if let Some(c) = self.conn(w) {
            c.queue(&wire::encode_query(ryw::COMMIT_LSN_QUERY).raw);
            self.pending.push_back(Pending::Lsn);
        }
    }

    /// What a read needs from a replica: the session's last commit, its
    /// `meridian.min_lsn`, the statement's `min_lsn` hint, its staleness bound.
    fn ryw_need(&self, analysis: &Analysis) -> ryw::Need {
        let hint = analysis
            .hint
            .min_lsn
            .as_deref()
            .and_then(|h| h.parse::<Lsn>().ok());
        let own = if self.learns_commits() {
            self.last_commit_lsn
        } else {
            None
        };
        ryw::Need {
            lsn: own.max(self.min_lsn).max(hint),
            max_staleness: self.max_staleness,
        }
    }

    /// Read-your-writes for a read routed to a replica: keeps a held replica
    /// that fits, else picks one that has replayed the required LSN (waiting
    /// up to `routing.ryw_wait`, with the pollers polling fast meanwhile), else
    /// sends the read to the primary. Outside a transaction only.
    async fn ryw_route(&mut self, target: Which, analysis: &Analysis) -> Which {
        if target != Which::Replica || self.tx_backend.is_some() {
            return target;
        }
        let need = self.ryw_need(analysis);
        if need.is_empty() {
            return target;
        }
        let table = self.shared.replicas().clone();
        let cfg = self.shared.config();
        let metrics = self.shared.metrics().clone();
        let count = |outcome: &'static str, waited: Duration| {
            metrics
                .ryw_reads
                .get_or_create(&OutcomeLabel { outcome })
                .inc();
            metrics.ryw_wait_seconds.observe(waited.as_secs_f64());
        };
        // A held local replica that fits is kept (a held remote one is not: the
        // local replica is preferred again as soon as it catches up).
        if let Some(c) = &self.replica {
            let local = self
                .shared
                .topology()
                .borrow()
                .replicas
                .iter()
                .any(|b| b.addr == c.addr && b.region == cfg.region);
            if local
                && ryw::fits(&need, table.observed(&c.addr).as_ref()) == ryw::Fit::Yes
                && !self.held_is_stale(Which::Replica)
            {
                count("replica_immediate", Duration::ZERO);
                return Which::Replica;
            }
        }
        // A client pipelining behind a statement still running cannot wait here.
        let can_wait = self.pending.is_empty();
        let started = Instant::now();
        let mut guard = None;
        loop {
            let candidates = self.shared.topology().borrow().ryw_candidates(&cfg.region);
            let obs = |v: &[Arc<str>]| -> Vec<Option<ryw::Observed>> {
                v.iter().map(|a| table.observed(a)).collect()
            };
            let waited = if can_wait {
                started.elapsed()
            } else {
                cfg.routing.ryw_wait
            };
            let (local_obs, beside_obs) = (obs(&candidates.local), obs(&candidates.beside_primary));
            let step = ryw::ryw_target(
                &need,
                &ryw::Candidates {
                    local: &local_obs,
                    beside_primary: &beside_obs,
                    primary_local: candidates.primary_local,
                },
                self.salt,
                waited,
                cfg.routing.ryw_wait,
            );
            let addr = match step {
                RywStep::Local(i) => candidates.local.get(i).cloned(),
                RywStep::BesidePrimary(i) => candidates.beside_primary.get(i).cloned(),
                RywStep::Wait(remaining) => {
                    guard.get_or_insert_with(|| table.wait_guard());
                    tokio::select! {
                        _ = table.updated() => {}
                        _ = tokio::time::sleep(remaining.min(ryw::FAST_POLL)) => {}
                    }
                    continue;
                }
                RywStep::Primary => None,
            };
            let waited = started.elapsed();
            let Some(addr) = addr else {
                count("primary_fallback", waited);
                debug!(?need, ?waited, "read-your-writes: read runs on the primary");
                return Which::Primary;
            };
            if let Some(c) = &self.replica {
                if c.addr != addr {
                    if !self.pending.is_empty() {
                        count("primary_fallback", waited);
                        return Which::Primary;
                    }
                    // The held replica is behind: give it back, take the one that fits.
                    self.replica = None;
                    if self.active == Some(Which::Replica) {
                        self.active = None;
                    }
                }
            }
            self.want_replica = Some(addr);
            count(
                if guard.is_some() {
                    "replica_after_wait"
                } else {
                    "replica_immediate"
                },
                waited,
            );
            return Which::Replica;
        }
    }

    /// Answers `SET`/`RESET`/`SHOW` of the proxy's own session settings.
    async fn answer_command(&mut self, cmd: Command) -> Result<(), SessionError> {
        if let Some(rd) = command_row_description(&cmd) {
            self.client.send(&rd);
        }
        for f in self.execute_command(cmd) {
            if f.tag == b'E' {
                self.shared.metrics().error(&wire::error_fields(&f).1);
            }
            self.client.send(&f);
        }
        self.client.send(&wire::ready_for_query(self.tx_status));
        self.client.flush().await?;
        Ok(())
    }

    /// Runs one of the proxy's own commands: its DataRow and CommandComplete, or an
    /// ErrorResponse.
    fn execute_command(&mut self, cmd: Command) -> Vec<Frame> {
        let read_only = |s: Setting| {
            format!(
                "parameter \"{}\" cannot be changed: it is set by the proxy",
                s.name()
            )
        };
        let error = |code: &str, message: &str| wire::error_response("ERROR", code, message);
        match cmd {
            Command::Show(s) => {
                let value = match s {
                    Setting::LastCommitLsn => self.last_commit_lsn.unwrap_or(Lsn::ZERO).to_string(),
                    Setting::MinLsn => self.min_lsn.unwrap_or(Lsn::ZERO).to_string(),
                    Setting::MaxStaleness => ryw::format_staleness(self.max_staleness),
                };
                vec![wire::data_row_text(&value), wire::command_complete("SHOW")]
            }
            Command::Set(Setting::MinLsn, v) => match ryw::parse_min_lsn(&v) {
                Ok(lsn) => {
                    self.min_lsn = lsn;
                    vec![wire::command_complete("SET")]
                }
                Err(e) => vec![error("22023", &e.to_string())],
            },
            Command::Set(Setting::MaxStaleness, v) => match ryw::parse_staleness(&v) {
                Ok(d) => {
                    self.max_staleness = Some(d);
                    vec![wire::command_complete("SET")]
                }
                Err(e) => vec![error("22023", &e.to_string())],
            },
            Command::Set(Setting::LastCommitLsn, _) | Command::Reset(Setting::LastCommitLsn) => {
                vec![error("55P02", &read_only(Setting::LastCommitLsn))]
            }
            Command::Reset(Setting::MinLsn) => {
                self.min_lsn = None;
                vec![wire::command_complete("RESET")]
            }
            Command::Reset(Setting::MaxStaleness) => {
                self.max_staleness = None;
                vec![wire::command_complete("RESET")]
            }
        }
    }

    /// Sends `f` now, or after the answers still expected from a backend.
    fn answer_in_order(&mut self, f: Frame) {
        if self.pending.is_empty() {
            self.client.send(&f);
        } else {
            self.pending.push_back(Pending::Synthetic(f));
        }
    }

    /// The proxy's own `SET`/`RESET`/`SHOW meridian.*` through the extended protocol: a
    /// statement parsed from such a text, its portals, their Describe, Execute and Close are
    /// answered here and never reach a backend. Returns true when `f` was answered.
    fn local_extended(&mut self, f: &Frame) -> Result<bool, SessionError> {
        let protocol = |e: wire::WireError| SessionError::Protocol(e.to_string());
        match f.tag {
            b'P' => {
                let m = wire::parse_msg(f).map_err(protocol)?;
                let Some(cmd) = ryw::parse_command(m.query) else {
                    // A statement of the same name now means something else.
                    if !self.local_stmts.is_empty() {
                        self.local_stmts.remove(m.name);
                    }
                    return Ok(false);
                };
                if m.name.is_empty() {
                    self.unnamed = None;
                } else {
                    self.statements.remove(m.name);
                }
                self.local_stmts.insert(m.name.to_owned(), cmd);
                self.answer_in_order(Frame::new(b'1', &[]));
            }
            b'B' => {
                if self.local_stmts.is_empty() && self.local_portals.is_empty() {
                    return Ok(false);
                }
                let (portal, stmt, _) = wire::bind_names(f).map_err(protocol)?;
                let Some(cmd) = self.local_stmts.get(stmt).cloned() else {
                    self.local_portals.remove(portal);
                    return Ok(false);
                };
                self.local_portals.insert(portal.to_owned(), cmd);
                self.answer_in_order(Frame::new(b'2', &[]));
            }
            b'D' | b'E' | b'C' => {
                if self.local_stmts.is_empty() && self.local_portals.is_empty() {
                    return Ok(false);
                }
                let (kind, name) = if f.tag == b'E' {
                    let mut body = f.body();
                    let portal = wire::read_cstr(&mut body)
                        .ok_or_else(|| SessionError::Protocol("malformed Execute".into()))?;
                    (b'P', portal)
                } else {
                    wire::target_of(f).map_err(protocol)?
                };
                let cmd = if kind == b'S' {
                    self.local_stmts.get(name)
                } else {
                    self.local_portals.get(name)
                };
                let Some(cmd) = cmd.cloned() else {
                    return Ok(false);
                };
                match f.tag {
                    b'D' => {
                        if kind == b'S' {
                            // ParameterDescription: no parameters.
                            self.answer_in_order(Frame::new(b't', &[0, 0]));
                        }
                        let rd =
                            command_row_description(&cmd).unwrap_or_else(|| Frame::new(b'n', &[]));
                        self.answer_in_order(rd);
                    }
                    b'E' => {
                        for out in self.execute_command(cmd) {
                            if out.tag == b'E' {
                                self.shared.metrics().error(&wire::error_fields(&out).1);
                                self.skip_until_sync = true;
                            }
                            self.answer_in_order(out);
                        }
                    }
                    _ => {
                        let name = name.to_owned();
                        if kind == b'S' {
                            self.local_stmts.remove(&name);
                        } else {
                            self.local_portals.remove(&name);
                        }
                        self.answer_in_order(Frame::new(b'3', &[]));
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Where a statement goes, taking a deferred BEGIN into account.
    fn target_for(&self, analysis: &Analysis) -> Which {
        if let Some((_, read_only)) = &self.lazy_begin {
            return route::route_deferred_begin(
                *read_only,
                analysis,
                SessionView {
                    in_tx: None,
                    pinned: self.pinned.is_some(),
                    read_only_session: self.read_only_session,
                    replica_available: self.replica_available(),
                    held: self.held(),
                },
            );
        }
        self.decide(analysis)
    }

    /// Acquires the target backend and sends a deferred BEGIN to it.
    async fn prepare_backend(&mut self, target: Which) -> Result<(), PoolError> {
        self.acquire(target).await?;
        if let Some((begin, _)) = self.lazy_begin.take() {
            if let Some(c) = self.conn(target) {
                c.queue(&wire::encode_query(&begin).raw);
            }
            self.pending.push_back(Pending::Query {
                swallow: true,
                analysis: None,
                failed: false,
            });
            self.active = Some(target);
            self.tx_backend = Some(target);
        }
        Ok(())
    }

    fn count_route(&self, w: Which) {
        let target = match w {
            Which::Primary => "primary",
            Which::Replica => "replica",
        };
        self.shared
            .metrics()
            .queries
            .get_or_create(&TargetLabel { target })
            .inc();
    }

    /// No backend could be had: the statement fails with a class-08 error, the session lives on.
    async fn answer_no_backend(&mut self, e: PoolError, ready: bool) -> Result<(), SessionError> {
        warn!(error = %e, "no backend for statement");
        self.send_error("08006", &format!("meridian-pgproxy: {e}"));
        let had_tx = self.tx_backend.take().is_some();
        if self.lazy_begin.take().is_some() || had_tx {
            self.tx_lost = true;
            self.tx_status = b'E';
        }
        if ready {
            self.client.send(&wire::ready_for_query(self.tx_status));
        } else {
            self.skip_until_sync = true;
        }
        self.client.flush().await?;
        Ok(())
    }

    /// The transaction's backend is gone: behave like PostgreSQL in an aborted transaction.
    async fn answer_lost_tx(&mut self, tx: TxEffect, extended: bool) -> Result<(), SessionError> {
        match tx {
            TxEffect::Commit | TxEffect::Rollback => {
                self.tx_lost = false;
                self.tx_status = b'I';
                self.client.send(&wire::command_complete("ROLLBACK"));
            }
            _ => self.send_error(
                "25P02",
                "current transaction is aborted (its server connection was lost), commands ignored until end of transaction block",
            ),
        }
        if extended {
            if self.tx_status == b'E' {
                self.skip_until_sync = true;
            }
        } else {
            self.client.send(&wire::ready_for_query(self.tx_status));
        }
        self.client.flush().await?;
        Ok(())
    }

    async fn handle_function_call(&mut self, f: Frame) -> Result<(), SessionError> {
        let target = self.tx_backend.unwrap_or(Which::Primary);
        if self.must_stall(target, &f) {
            return Ok(());
        }
        if let Err(e) = self.prepare_backend(target).await {
            return self.answer_no_backend(e, true).await;
        }
        if let Some(c) = self.conn(target) {
            c.queue(&f.raw);
        }
        self.pending.push_back(Pending::Query {
            swallow: false,
            analysis: None,
            failed: false,
        });
        self.active = Some(target);
        self.set_cancel_target(target);
        Ok(())
    }

    /// The statement an extended-protocol message refers to, for routing.
    fn batch_analysis(&self, f: &Frame) -> Option<Arc<Analysis>> {
        match f.tag {
            b'P' => wire::parse_msg(f)
                .ok()
                .map(|m| self.shared.classifier().analyze(m.query)),
            b'B' => {
                let (_, stmt, _) = wire::bind_names(f).ok()?;
                self.lookup_stmt(stmt).map(|s| s.analysis.clone())
            }
            b'D' => match wire::target_of(f).ok()? {
                (b'S', name) => self.lookup_stmt(name).map(|s| s.analysis.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    fn lookup_stmt(&self, name: &str) -> Option<Arc<Stmt>> {
        if name.is_empty() {
            self.unnamed.clone()
        } else {
            self.statements.get(name).cloned()
        }
    }

    async fn handle_extended(&mut self, f: Frame) -> Result<(), SessionError> {
        if self.skip_until_sync {
            if f.tag == b'S' {
                self.skip_until_sync = false;
                self.answer_in_order(wire::ready_for_query(self.tx_status));
                if self.pending.is_empty() {
                    self.client.flush().await?;
                }
            }
            return Ok(());
        }
        if self.local_extended(&f)? {
            return Ok(());
        }
        if self.hold_extended(&f).await? {
            return Ok(());
        }
        if self.tx_lost {
            let tx = self
                .batch_analysis(&f)
                .map(|a| a.tx_effect())
                .unwrap_or(TxEffect::None);
            if f.tag == b'S' {
                self.client.send(&wire::ready_for_query(self.tx_status));
                self.client.flush().await?;
                return Ok(());
            }
            if f.tag == b'E' || f.tag == b'P' {
                return self.answer_lost_tx(tx, true).await;
            }
            return Ok(());
        }
        let target = match self.batch {
            Some(w) => w,
            None => {
                let analysis = self.batch_analysis(&f);
                let w = match (&analysis, f.tag) {
                    (Some(a), _) => self.target_for(a),
                    (None, b'S' | b'H' | b'C')
                        if self.held().is_none() && self.lazy_begin.is_none() =>
                    {
                        // Nothing to send anywhere: answer ourselves.
                        self.answer_locally(&f);
                        self.drain_synthetic();
                        if f.tag != b'H' {
                            self.client.flush().await?;
                        }
                        return Ok(());
                    }
                    (None, _) => self.tx_backend.or(self.held()).unwrap_or(Which::Primary),
                };
                if self.must_stall(w, &f) {
                    return Ok(());
                }
                let w = match &analysis {
                    Some(a) => self.ryw_route(w, a).await,
                    None => w,
                };
                if self.must_stall(w, &f) {
                    return Ok(());
                }
                if let Err(e) = self.prepare_backend(w).await {
                    let ready = f.tag == b'S';
                    return self.answer_no_backend(e, ready).await;
                }
                self.batch = Some(w);
                if analysis.is_some() {
                    self.count_route(w);
                }
                w
            }
        };
        if self.must_stall(target, &f) {
            return Ok(());
        }
        if self.conn(target).is_none() {
            if let Err(e) = self.prepare_backend(target).await {
                return self.answer_no_backend(e, f.tag == b'S').await;
            }
        }
        self.active = Some(target);
        self.set_cancel_target(target);
        match f.tag {
            b'P' => self.forward_parse(target, &f)?,
            b'B' => {
                if let Some(plan) = self.fill_next.take() {
                    if target == Which::Replica && self.fill.is_none() {
                        self.start_fill(target, plan);
                    }
                }
                self.forward_bind(target, &f)?
            }
            b'D' => {
                let (kind, name) =
                    wire::target_of(&f).map_err(|e| SessionError::Protocol(e.to_string()))?;
                if kind == b'S' {
                    let name = name.to_owned();
                    let server = self.ensure_prepared(target, &name);
                    let frame = match server {
                        Some(s) => wire::encode_target(b'D', b'S', &s),
                        None => f,
                    };
                    self.queue_to(target, &frame);
                } else {
                    self.queue_to(target, &f);
                }
                self.pending.push_back(Pending::Describe);
            }
            b'E' => {
                let analysis = self.last_bound.as_ref().map(|s| s.analysis.clone());
                if let Some(a) = &analysis {
                    if target == Which::Primary
                        && ryw::commit_point(a, &self.shared.catalog(), self.tx_backend.is_some())
                    {
                        self.batch_commit = true;
                    }
                }
                if self
                    .last_bound
                    .as_ref()
                    .is_none_or(|s| ryw::may_copy(&s.query))
                {
                    self.batch_copy = true;
                }
                self.queue_to(target, &f);
                self.pending.push_back(Pending::Execute { analysis });
            }
            b'C' => {
                let (kind, name) =
                    wire::target_of(&f).map_err(|e| SessionError::Protocol(e.to_string()))?;
                if kind == b'S' && !name.is_empty() {
                    // Server-side statements stay cached on the backend for reuse.
                    self.statements.remove(name);
                    self.pending
                        .push_back(Pending::Synthetic(Frame::new(b'3', &[])));
                } else {
                    self.queue_to(target, &f);
                    self.pending.push_back(Pending::Close);
                }
            }
            b'H' => self.queue_to(target, &f),
            b'S' => {
                self.queue_to(target, &f);
                self.pending.push_back(Pending::Sync);
                if std::mem::take(&mut self.releasing) {
                    self.close_fill(target);
                }
                let may_copy = std::mem::take(&mut self.batch_copy);
                if std::mem::take(&mut self.batch_commit)
                    && target == Which::Primary
                    && self.learns_commits()
                {
                    if may_copy {
                        self.commit_pending = true;
                    } else {
                        self.queue_commit_lsn(target);
                    }
                }
            }
            _ => {}
        }
        self.drain_synthetic();
        Ok(())
    }

    /// Answers a Sync/Flush/Close that needs no backend.
    fn answer_locally(&mut self, f: &Frame) {
        match f.tag {
            b'S' => self
                .pending
                .push_back(Pending::Synthetic(wire::ready_for_query(self.tx_status))),
            b'C' => {
                if let Ok((b'S', name)) = wire::target_of(f) {
                    self.statements.remove(name);
                }
                self.pending
                    .push_back(Pending::Synthetic(Frame::new(b'3', &[])));
            }
            _ => {}
        }
    }

    fn queue_to(&mut self, w: Which, f: &Frame) {
        if let Some(c) = self.conn(w) {
            c.queue(&f.raw);
        }
    }

    fn forward_parse(&mut self, target: Which, f: &Frame) -> Result<(), SessionError> {
        let m = wire::parse_msg(f).map_err(|e| SessionError::Protocol(e.to_string()))?;
        let hash = stmt_hash(m.query, m.param_types);
        let stmt = Arc::new(Stmt {
            query: m.query.to_owned(),
            param_types: m.param_types.to_vec(),
            hash,
            server_name: format!("mrd_{hash:016x}"),
            analysis: self.shared.classifier().analyze(m.query),
        });
        if m.name.is_empty() {
            self.unnamed = Some(stmt.clone());
            if let Some(c) = self.conn(target) {
                c.unnamed = Some(hash);
                c.queue(&f.raw);
            }
            self.pending.push_back(Pending::Parse {
                swallow: false,
                server_name: None,
                client_name: None,
            });
            return Ok(());
        }
        let client_name = m.name.to_owned();
        self.statements.insert(client_name.clone(), stmt.clone());
        let Some(c) = self.conn(target) else {
            return Ok(());
        };
        if c.prepared.contains(&stmt.server_name) {
            self.pending
                .push_back(Pending::Synthetic(Frame::new(b'1', &[])));
        } else {
            c.prepared.insert(stmt.server_name.clone());
            c.queue(&wire::encode_parse(&stmt.server_name, &stmt.query, &stmt.param_types).raw);
            self.pending.push_back(Pending::Parse {
                swallow: false,
                server_name: Some(stmt.server_name.clone()),
                client_name: Some(client_name),
            });
        }
        Ok(())
    }

    /// Makes sure the client's statement `name` exists on the backend; returns its server name.
    fn ensure_prepared(&mut self, target: Which, name: &str) -> Option<String> {
        let stmt = self.lookup_stmt(name)?;
        let c = self.conn(target)?;
        if name.is_empty() {
            if c.unnamed != Some(stmt.hash) {
                c.unnamed = Some(stmt.hash);
                c.queue(&wire::encode_parse("", &stmt.query, &stmt.param_types).raw);
                self.pending.push_back(Pending::Parse {
                    swallow: true,
                    server_name: None,
                    client_name: None,
                });
            }
            return Some(String::new());
        }
        if !c.prepared.contains(&stmt.server_name) {
            c.prepared.insert(stmt.server_name.clone());
            c.queue(&wire::encode_parse(&stmt.server_name, &stmt.query, &stmt.param_types).raw);
            self.pending.push_back(Pending::Parse {
                swallow: true,
                server_name: Some(stmt.server_name.clone()),
                client_name: None,
            });
        }
        Some(stmt.server_name.clone())
    }

    fn forward_bind(&mut self, target: Which, f: &Frame) -> Result<(), SessionError> {
        let (_, stmt_name, _) =
            wire::bind_names(f).map_err(|e| SessionError::Protocol(e.to_string()))?;
        let stmt_name = stmt_name.to_owned();
        self.last_bound = self.lookup_stmt(&stmt_name);
        let frame = match self.ensure_prepared(target, &stmt_name) {
            Some(server) if !stmt_name.is_empty() => {
                wire::rename_bind(f, &server).map_err(|e| SessionError::Protocol(e.to_string()))?
            }
            _ => f.clone(),
        };
        self.queue_to(target, &frame);
        self.pending.push_back(Pending::Bind);
        Ok(())
    }

    /// Applies the session-level effects of a statement that completed.
    fn apply_effects(&mut self, w: Which, analysis: &Analysis) {
        for st in &analysis.statements {
            let eff = &st.session;
            if eff.reset_all {
                self.params.reset_all();
                self.min_lsn = None;
                self.max_staleness = None;
                self.read_only_session = false;
                if let Some(c) = self.conn(w) {
                    // DISCARD ALL also drops prepared statements; forget ours.
                    c.prepared.clear();
                    c.unnamed = None;
                }
            }
            for name in &eff.reset {
                self.params.reset(name);
                if name.eq_ignore_ascii_case("default_transaction_read_only") {
                    self.read_only_session = false;
                }
            }
            for (name, value) in &eff.set {
                self.params.set(name, value);
                if name.eq_ignore_ascii_case("default_transaction_read_only") {
                    let v = value.trim_matches('\'').to_ascii_lowercase();
                    self.read_only_session = matches!(v.as_str(), "on" | "true" | "1" | "yes");
                }
            }
            if let Some(pin) = eff.pins {
                if self.pinned.is_none() {
                    debug!(reason = ?pin, "session pinned to its primary backend");
                }
                // The backend is cleaned (DISCARD ALL) when it goes back to the pool at the end
                // of the session (`release_all`), not before: the pinned state is the point.
                self.pinned = Some(pin);
            }
            if eff.reset_all || !eff.set.is_empty() || !eff.reset.is_empty() {
                let hash = self.params.hash;
                if let Some(c) = self.conn(w) {
                    c.params_hash = hash;
                }
            }
        }
    }

    async fn on_backend_frame(&mut self, w: Which, f: Frame) -> Result<(), SessionError> {
        tracing::trace!(backend = ?w, tag = %(f.tag as char), pending = ?self.pending.front(), "backend message");
        if self.active != Some(w) || self.pending.is_empty() {
            // Asynchronous message from a backend with nothing in flight.
            match f.tag {
                b'A' | b'N' | b'S' => self.client.send(&f),
                b'E' => {
                    let (sev, code, msg) = wire::error_fields(&f);
                    debug!(backend = ?w, %sev, %code, %msg, "idle backend reported an error; dropping it");
                    if let Some(mut c) = self.slot(w).take() {
                        c.broken = true;
                    }
                }
                _ => {
                    warn!(backend = ?w, tag = %(f.tag as char), "unexpected message from idle backend; dropping it");
                    if let Some(mut c) = self.slot(w).take() {
                        c.broken = true;
                    }
                }
            }
            return Ok(());
        }
        self.drain_synthetic();
        if let Some(Pending::Lsn | Pending::ReplayLsn { .. }) = self.pending.front() {
            match f.tag {
                b'D' => {
                    let lsn = crate::backend::decode_text_row(&f)
                        .ok()
                        .and_then(|r| r.into_iter().next().flatten())
                        .and_then(|t| t.parse::<Lsn>().ok());
                    match (self.pending.front(), lsn) {
                        (Some(Pending::Lsn), Some(lsn)) => {
                            self.last_commit_lsn = self.last_commit_lsn.max(Some(lsn));
                        }
                        (Some(Pending::ReplayLsn { after }), lsn) => {
                            let after = *after;
                            if let Some(fill) = self.fill.as_mut() {
                                fill.position(after, lsn);
                            }
                        }
                        _ => {}
                    }
                }
                b'Z' => self.on_ready(w, f),
                b'N' | b'A' | b'S' => self.client.send(&f),
                b'E' => {
                    let (severity, code, message) = wire::error_fields(&f);
                    if severity == "FATAL" || severity == "PANIC" {
                        debug!(%code, %message, "backend closing during the commit LSN query; dropped");
                        return self.backend_lost(w, BackendError::Closed).await;
                    }
                    self.on_backend_error(w, f)
                }
                _ => {}
            }
            self.drain_synthetic();
            return Ok(());
        }
        let swallowing = matches!(
            self.pending.front(),
            Some(Pending::Query { swallow: true, .. })
        );
        if !swallowing && self.fill.is_some() {
            self.capture(&f);
        }
        match f.tag {
            b'1' => {
                if let Some(Pending::Parse { swallow, .. }) = self.pending.pop_front() {
                    if !swallow {
                        self.client.send(&f);
                    }
                }
            }
            b'2' | b'3' => {
                self.pending.pop_front();
                self.client.send(&f);
            }
            b'n' | b'T' => {
                if matches!(self.pending.front(), Some(Pending::Describe)) {
                    self.pending.pop_front();
                }
                if !swallowing {
                    self.client.send(&f);
                }
            }
            b'C' | b'I' | b's' => {
                if let Some(Pending::Execute { .. }) = self.pending.front() {
                    if let Some(Pending::Execute { analysis }) = self.pending.pop_front() {
                        if f.tag == b'C' {
                            if let Some(a) = analysis {
                                self.apply_effects(w, &a);
                            }
                        }
                    }
                }
                if !swallowing {
                    self.client.send(&f);
                }
            }
            b'E' => {
                let (severity, code, _) = wire::error_fields(&f);
                if severity == "FATAL" || severity == "PANIC" {
                    // The server is closing this connection: report the loss now so
                    // the client's next statement goes to a fresh backend.
                    self.shared.metrics().error(&code);
                    self.client.send(&f);
                    self.loss_reported = true;
                    return self.backend_lost(w, BackendError::Closed).await;
                }
                self.on_backend_error(w, f)
            }
            b'Z' => self.on_ready(w, f),
            b'G' => {
                // The backend ignores Sync and Flush during copy-in mode; a client
                // that pipelined a Sync behind its Execute gets no answer for it.
                self.copy_in = true;
                let head = self.pending.pop_front();
                self.pending.retain(|p| !matches!(p, Pending::Sync));
                if let Some(h) = head {
                    self.pending.push_front(h);
                }
                self.client.send(&f);
            }
            _ => {
                if !swallowing {
                    self.client.send(&f);
                }
            }
        }
        self.drain_synthetic();
        Ok(())
    }

    fn on_backend_error(&mut self, w: Which, f: Frame) {
        let (_, code, message) = wire::error_fields(&f);
        self.copy_in = false;
        match self.pending.front_mut() {
            Some(Pending::Query { swallow: true, .. }) => {
                warn!(backend = ?w, %code, %message, "replaying session state failed");
                return;
            }
            Some(Pending::Lsn) => {
                debug!(%code, %message, "commit LSN query failed");
                return;
            }
            Some(Pending::ReplayLsn { .. }) => {
                debug!(%code, %message, "replay LSN query of a cache fill failed");
                if let Some(fill) = self.fill.as_mut() {
                    fill.spoil();
                }
                return;
            }
            Some(Pending::Query { failed, .. }) => {
                *failed = true;
            }
            _ => {
                // Extended protocol: the backend skips everything up to Sync.
                let mut kept = VecDeque::new();
                let mut reached_sync = false;
                while let Some(p) = self.pending.pop_front() {
                    if reached_sync {
                        kept.push_back(p);
                        continue;
                    }
                    match p {
                        Pending::Sync => {
                            reached_sync = true;
                            kept.push_back(p);
                        }
                        Pending::Parse {
                            server_name,
                            client_name,
                            ..
                        } => {
                            if let Some(name) = server_name {
                                if let Some(c) = self.conn(w) {
                                    c.prepared.remove(&name);
                                }
                            }
                            if let Some(name) = client_name {
                                self.statements.remove(&name);
                            }
                        }
                        _ => {}
                    }
                }
                self.pending = kept;
            }
        }
        self.shared.metrics().error(&code);
        self.client.send(&f);
    }

    fn on_ready(&mut self, w: Which, f: Frame) {
        let status = wire::ready_status(&f);
        if let Some(c) = self.conn(w) {
            c.tx_status = status;
        }
        let item = self.pending.pop_front();
        match item {
            Some(Pending::ReplayLsn { after: true }) => self.finish_fill(),
            Some(Pending::ReplayLsn { after: false }) => {
                if let Some(fill) = self.fill.as_mut() {
                    fill.opened();
                }
            }
            _ => {}
        }
        if matches!(item, Some(Pending::Lsn | Pending::ReplayLsn { .. })) {
            if self.pending.is_empty() {
                self.active = None;
                if status == b'I'
                    && self.login.mode == PoolMode::Transaction
                    && self.pinned.is_none()
                {
                    self.release_all();
                }
            }
            return;
        }
        let swallow = matches!(item, Some(Pending::Query { swallow: true, .. }));
        if let Some(Pending::Query {
            analysis: Some(a),
            failed: false,
            ..
        }) = &item
        {
            let a = a.clone();
            self.apply_effects(w, &a);
        }
        if swallow {
            return;
        }
        self.batch = None;
        self.tx_status = status;
        self.tx_backend = if status == b'I' { None } else { Some(w) };
        if std::mem::take(&mut self.commit_pending) && status == b'I' && w == Which::Primary {
            self.queue_commit_lsn(w);
        }
        self.client.send(&f);
        if let Some(start) = self.query_start.take() {
            self.shared
                .metrics()
                .latency
                .observe(start.elapsed().as_secs_f64());
        }
        if self.pending.is_empty() {
            self.active = None;
            if status == b'I' && self.login.mode == PoolMode::Transaction && self.pinned.is_none() {
                self.release_all();
            }
        }
    }
}

async fn read_backend(c: &mut Option<Pooled>) -> Result<Frame, BackendError> {
    match c {
        Some(c) => c.read_frame().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_step_waits_until_the_hold_runs_out() {
        let t0 = Instant::now();
        let hold = Duration::from_secs(2);
        assert_eq!(hold_step(t0, hold, t0), HoldStep::Wait(hold));
        assert_eq!(
            hold_step(t0, hold, t0 + Duration::from_millis(1500)),
            HoldStep::Wait(Duration::from_millis(500))
        );
        assert_eq!(hold_step(t0, hold, t0 + hold), HoldStep::Fail);
        assert_eq!(
            hold_step(t0, hold, t0 + Duration::from_secs(9)),
            HoldStep::Fail
        );
        // No hold (static topology): fail at once.
        assert_eq!(hold_step(t0, Duration::ZERO, t0), HoldStep::Fail);
    }
}
