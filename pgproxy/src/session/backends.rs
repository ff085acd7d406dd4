//! The backends a session holds (at most a primary and a replica connection) and how it
//! gets them: a [`Connector`] — in production [`PoolConnector`], which takes connections
//! from the pools, holds new writes through a failover (waiting up to the topology's
//! `failover_hold` for a serving, fenced-in primary) and picks the replica; in tests a
//! scripted one. What the engine decided is carried out here: a connection is returned
//! to its pool, dropped as broken, or marked for `DISCARD ALL` before its next user.
//!
//! Errors map to what the client sees in one place: [`refusal`] (the server's own error
//! for a missing database or a refused login, else the proxy's class-08 error).

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::backend::{BackendConn, BackendError, ConnectParams};
use crate::engine::backend_state::Reset;
use crate::engine::Refusal;
use crate::error::ProxyError;
use crate::pool::{self, PoolError, Pooled};
use crate::route::Which;
use crate::shared::Shared;
use crate::wire;

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

/// The failover-hold bookkeeping (pure): a wait that started at `started` may go on
/// until `started + hold`.
pub fn hold_step(started: std::time::Instant, hold: Duration, now: std::time::Instant) -> HoldStep {
    let remaining = (started + hold).saturating_duration_since(now);
    if remaining.is_zero() {
        HoldStep::Fail
    } else {
        HoldStep::Wait(remaining)
    }
}

/// A backend connection held by a session: from a pool, or owned (tests).
#[allow(clippy::large_enum_variant)] // one per session slot; boxing the pooled one costs an allocation per checkout
pub enum Held {
    Pooled(Pooled),
    Owned(Box<BackendConn>),
}

impl Deref for Held {
    type Target = BackendConn;
    fn deref(&self) -> &BackendConn {
        match self {
            Held::Pooled(p) => p,
            Held::Owned(c) => c,
        }
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut BackendConn {
        match self {
            Held::Pooled(p) => &mut *p,
            Held::Owned(c) => c,
        }
    }
}

/// Where a session's backend connections come from.
pub trait Connector: Send + Sync {
    /// A connection of kind `w`; `replica`: the replica read-your-writes chose.
    fn connect(
        &self,
        w: Which,
        replica: Option<Arc<str>>,
    ) -> impl Future<Output = Result<Held, Refusal>> + Send;

    /// A primary connection of the session's own, outside any pool (a bound session: the
    /// server process lives and ends with the client's connection, as directly).
    fn connect_dedicated(&self) -> impl Future<Output = Result<Held, Refusal>> + Send;

    /// Whether held connection `c` of kind `w` may still start a transaction (the
    /// topology still backs it: same primary and epoch, a usable replica).
    fn still_current(&self, w: Which, c: &BackendConn) -> bool;

    /// A replica is there to read from.
    fn replica_available(&self) -> bool;

    /// The primary may change under the session (a topology that follows a leader):
    /// sessions must survive a failover, so none is bound to one backend.
    fn follows_leader(&self) -> bool;
}

/// The client's side of a refusal: the server's own error (a missing database, a login
/// it refused) as it sent it, else the proxy's error without internal detail.
pub fn refusal(e: &PoolError) -> Refusal {
    let backend = match e {
        PoolError::Backend(b) => b,
        PoolError::Failed { error, .. } => error,
        PoolError::NoPrimary { held_ms } => {
            return Refusal::Proxy(ProxyError::NoPrimary { held_ms: *held_ms })
        }
        PoolError::ConnectFailed { .. } | PoolError::Timeout(_) => {
            return Refusal::Proxy(ProxyError::NoBackend)
        }
        PoolError::WaitTimeout {
            waited, max_size, ..
        } => {
            return Refusal::Proxy(ProxyError::PoolWaitTimeout {
                waited_ms: waited.as_millis(),
                pool_size: *max_size,
            })
        }
    };
    match backend {
        BackendError::Server { code, message } => {
            Refusal::Server(wire::error_response("ERROR", code, message))
        }
        // The reason lets the operator fix the proxy's credentials or TLS settings.
        BackendError::Auth(reason) => Refusal::Proxy(ProxyError::BackendLoginFailed {
            reason: reason.clone(),
        }),
        BackendError::Tls(reason) => Refusal::Proxy(ProxyError::BackendTls {
            reason: reason.clone(),
        }),
        _ => Refusal::Proxy(ProxyError::NoBackend),
    }
}

/// Resolves once `topology` names a primary other than `addr` or another fencing epoch
/// (never, if the sender is gone).
async fn primary_replaced(
    topology: &mut tokio::sync::watch::Receiver<Arc<crate::topology::Topology>>,
    addr: &Arc<str>,
    fence: Option<u64>,
) {
    let same = |t: &crate::topology::Topology| {
        t.primary.as_ref() == Some(addr) && t.fence_epoch() == fence
    };
    if topology.wait_for(|t| !same(t)).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The production connector: the proxy's pools, its topology and failover hold.
pub struct PoolConnector {
    shared: Arc<Shared>,
    user: String,
    database: String,
    password: Option<String>,
    /// Spreads sessions over equally good replicas.
    salt: u64,
}

impl PoolConnector {
    pub fn new(
        shared: Arc<Shared>,
        user: String,
        database: String,
        password: Option<String>,
        salt: u64,
    ) -> PoolConnector {
        PoolConnector {
            shared,
            user,
            database,
            password,
            salt,
        }
    }

    fn params(&self, addr: Arc<str>) -> ConnectParams {
        let cfg = self.shared.config();
        ConnectParams {
            addr,
            user: self.user.clone(),
            database: self.database.clone(),
            password: self.password.clone(),
            tls: self.shared.backend_tls().clone(),
            connect_timeout: cfg.pool.connect_timeout,
            max_message: cfg.max_message_size,
        }
    }

    async fn replica(&self, want: Option<Arc<str>>) -> Result<Pooled, PoolError> {
        let cfg = self.shared.config();
        let addr = want.or_else(|| {
            self.shared
                .topology()
                .borrow()
                .pick_replica(&cfg.region, self.salt)
                .map(|b| b.addr.clone())
        });
        let Some(addr) = addr else {
            return Err(PoolError::ConnectFailed {
                addr: Arc::from("(none)"),
                message: Arc::from("no replica is available"),
                unavailable: true,
            });
        };
        let params = self.params(addr);
        self.shared.pools().get(&params, None, &cfg.pool).await
    }

    /// A primary connection, waiting up to the topology's `failover_hold` while no
    /// serving primary is known or the known one cannot be connected to (or fails the
    /// fencing check). A new leader is tried as soon as it is published; the same one
    /// every [`PRIMARY_RETRY`]. Errors that waiting cannot cure (authentication, a
    /// missing database) end the wait at once.
    async fn primary(&self) -> Result<Pooled, PoolError> {
        let mut topology = self.shared.topology().clone();
        let metrics = self.shared.metrics();
        let started = tokio::time::Instant::now();
        let mut waited = false;
        loop {
            let (addr, fence, hold) = {
                let t = topology.borrow_and_update();
                (t.primary.clone(), t.fence_epoch(), t.failover_hold)
            };
            let error = match addr {
                Some(addr) => {
                    let params = self.params(addr.clone());
                    let pool_cfg = self.shared.config().pool.clone();
                    let get = self.shared.pools().get(&params, fence, &pool_cfg);
                    let r = if hold.is_zero() {
                        get.await
                    } else {
                        // A wait for a busy pool is not bounded by the hold (each connect
                        // attempt is, by pool.connect_timeout), but it ends when another
                        // primary or epoch is published: the write goes there instead.
                        tokio::select! {
                            r = get => r,
                            () = primary_replaced(&mut topology, &addr, fence) => continue,
                        }
                    };
                    match r {
                        Ok(c) => {
                            if waited {
                                let held = started.elapsed();
                                metrics.failover_hold_seconds.inc_by(held.as_secs_f64());
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
                    metrics.failover_hold_timeouts.inc();
                    metrics
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
                        metrics.failover_holds.inc();
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
}

impl Connector for PoolConnector {
    async fn connect(&self, w: Which, replica: Option<Arc<str>>) -> Result<Held, Refusal> {
        let r = match w {
            Which::Primary => self.primary().await,
            Which::Replica => self.replica(replica).await,
        };
        r.map(Held::Pooled).map_err(|e| {
            warn!(backend = ?w, error = %e, "no backend for the statement");
            refusal(&e)
        })
    }

    async fn connect_dedicated(&self) -> Result<Held, Refusal> {
        let Some(addr) = self.shared.topology().borrow().primary.clone() else {
            return Err(Refusal::Proxy(ProxyError::NoBackend));
        };
        BackendConn::connect(&self.params(addr))
            .await
            .map(|c| Held::Owned(Box::new(c)))
            .map_err(|e| {
                warn!(error = %e, "no backend for the session");
                refusal(&PoolError::Backend(e))
            })
    }

    fn still_current(&self, w: Which, c: &BackendConn) -> bool {
        let topo = self.shared.topology().borrow();
        match w {
            Which::Primary => pool::still_current(&c.addr, c.fence_epoch, &topo),
            Which::Replica => topo.is_usable_replica(&c.addr),
        }
    }

    fn replica_available(&self) -> bool {
        self.shared.config().routing.replica_reads
            && self.shared.topology().borrow().has_usable_replica()
    }

    fn follows_leader(&self) -> bool {
        self.shared.topology().borrow().checks_epoch()
    }
}

/// The connections a session holds.
pub struct Backends<C> {
    pub connector: C,
    primary: Option<Held>,
    replica: Option<Held>,
}

impl<C: Connector> Backends<C> {
    pub fn new(connector: C) -> Backends<C> {
        Backends {
            connector,
            primary: None,
            replica: None,
        }
    }

    pub fn get(&mut self, w: Which) -> Option<&mut Held> {
        match w {
            Which::Primary => self.primary.as_mut(),
            Which::Replica => self.replica.as_mut(),
        }
    }

    fn get_ref(&self, w: Which) -> Option<&Held> {
        match w {
            Which::Primary => self.primary.as_ref(),
            Which::Replica => self.replica.as_ref(),
        }
    }

    fn slot(&mut self, w: Which) -> &mut Option<Held> {
        match w {
            Which::Primary => &mut self.primary,
            Which::Replica => &mut self.replica,
        }
    }

    /// Which kinds are held.
    pub fn held(&self) -> (bool, bool) {
        (self.primary.is_some(), self.replica.is_some())
    }

    /// Both slots, for waiting on them together.
    pub fn both(&mut self) -> (&mut Option<Held>, &mut Option<Held>) {
        (&mut self.primary, &mut self.replica)
    }

    /// Makes sure a connection of kind `w` is held. A held one the topology no longer
    /// backs is replaced unless `keep` (the transaction or batch runs on it). `replica`:
    /// a replica address read-your-writes requires (a held other replica is replaced).
    pub async fn ensure(
        &mut self,
        w: Which,
        replica: Option<Arc<str>>,
        keep: bool,
    ) -> Result<&mut Held, Refusal> {
        if !self.holds_usable(w, replica.as_ref(), keep) {
            let c = self.connector.connect(w, replica).await?;
            *self.slot(w) = Some(c);
        }
        self.get(w).ok_or(Refusal::Proxy(ProxyError::NoBackend))
    }

    /// True if a usable connection of kind `w` is held, after dropping one the
    /// topology no longer backs (unless `keep`) or that is not the `replica` required.
    /// The common case of [`Backends::ensure`], without building its future.
    pub fn holds_usable(&mut self, w: Which, replica: Option<&Arc<str>>, keep: bool) -> bool {
        let stale = match self.get_ref(w) {
            Some(c) if !keep => {
                let wrong_replica = replica.is_some_and(|a| *a != c.addr);
                wrong_replica || !self.connector.still_current(w, c)
            }
            Some(_) => false,
            None => return false,
        };
        if stale {
            if let Some(mut c) = self.slot(w).take() {
                debug!(backend = ?w, addr = %c.addr, "held backend no longer in the topology; replaced");
                c.broken = !self.connector.still_current(w, &c);
            }
            return false;
        }
        true
    }

    /// Holds a primary connection of the session's own (see [`Connector::connect_dedicated`]).
    pub async fn hold_dedicated(&mut self) -> Result<(), Refusal> {
        let c = self.connector.connect_dedicated().await?;
        self.primary = Some(c);
        Ok(())
    }

    /// A held connection that is no longer backed by the topology (it must not start
    /// new work unless the session is anchored to it).
    pub fn is_stale(&self, w: Which) -> bool {
        self.get_ref(w)
            .is_some_and(|c| !self.connector.still_current(w, c))
    }

    /// Drops connection `w` as broken (its server ended it, or it cannot be trusted).
    pub fn discard(&mut self, w: Which) {
        if let Some(mut c) = self.slot(w).take() {
            c.broken = true;
        }
    }

    /// Gives every connection back to its pool (`reset`: what it needs first); a
    /// connection of the session's own is closed.
    pub async fn release_all(&mut self, reset: Reset) {
        for w in [Which::Primary, Which::Replica] {
            match self.slot(w).take() {
                Some(Held::Owned(c)) => c.terminate().await,
                Some(Held::Pooled(mut c)) => c.state.reset = c.state.reset.max(reset),
                None => {}
            }
        }
    }

    /// Writes out what is queued for each connection; a failed write is returned.
    pub async fn flush(&mut self) -> Vec<(Which, BackendError)> {
        let mut failed = Vec::new();
        for w in [Which::Primary, Which::Replica] {
            if let Some(c) = self.get(w) {
                if c.has_queued() {
                    if let Err(e) = c.flush().await {
                        failed.push((w, e));
                    }
                }
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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

    #[test]
    fn server_errors_pass_through_and_proxy_errors_hide_detail() {
        let e = PoolError::Failed {
            addr: Arc::from("h:1"),
            error: Arc::new(BackendError::Server {
                code: "3D000".into(),
                message: "database \"nope\" does not exist".into(),
            }),
        };
        match refusal(&e) {
            Refusal::Server(f) => assert_eq!(wire::error_fields(&f).1, "3D000"),
            other => panic!("{other:?}"),
        }
        let e = PoolError::ConnectFailed {
            addr: Arc::from("10.1.2.3:5432"),
            message: Arc::from("connection refused"),
            unavailable: true,
        };
        match refusal(&e) {
            Refusal::Proxy(p) => {
                assert_eq!(p.sqlstate().as_str(), "08006");
                assert!(!p.message().contains("10.1.2.3"));
            }
            other => panic!("{other:?}"),
        }
        // The proxy's own credentials or TLS settings: the reason is the operator's key.
        let tls = PoolError::Failed {
            addr: Arc::from("h:1"),
            error: Arc::new(BackendError::Tls(
                "invalid peer certificate: UnknownIssuer".into(),
            )),
        };
        match refusal(&tls) {
            Refusal::Proxy(p) => {
                assert_eq!(p.sqlstate().as_str(), "08006");
                assert!(p.message().contains("certificate"), "{p}");
            }
            other => panic!("{other:?}"),
        }
        match refusal(&PoolError::NoPrimary { held_ms: 5 }) {
            Refusal::Proxy(p) => assert_eq!(p, ProxyError::NoPrimary { held_ms: 5 }),
            other => panic!("{other:?}"),
        }
        match refusal(&PoolError::Timeout(Arc::from("h:1"))) {
            Refusal::Proxy(p) => assert_eq!(p, ProxyError::NoBackend),
            other => panic!("{other:?}"),
        }
        let busy = PoolError::WaitTimeout {
            addr: Arc::from("h:1"),
            waited: Duration::from_secs(2),
            max_size: 3,
        };
        assert!(
            !busy.is_unavailable(),
            "a busy pool does not start a failover hold"
        );
        match refusal(&busy) {
            Refusal::Proxy(p) => {
                assert_eq!(p.sqlstate().as_str(), "53300");
                assert!(
                    p.message().contains("pool.query_wait_timeout (2000 ms)"),
                    "{p}"
                );
                assert!(p.message().contains("all 3 connections"), "{p}");
            }
            other => panic!("{other:?}"),
        }
    }
}
