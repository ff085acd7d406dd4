//! The regional result cache as a session uses it: whether a read goes through the
//! cache ([`SessionCache::plan_simple`]), the lookup that may answer it
//! ([`SessionCache::lookup`]), storing what a fill captured, and the extended-protocol
//! hold: a cacheable `Bind` (of a statement prepared earlier), with its portal's
//! `Describe` and an `Execute` of all rows, is held back until its `Sync`, then either
//! answered from the cache or released, in order, to run with a fill. Anything else
//! arriving during a hold releases it unchanged. The serving rule itself is the pure
//! [`cache_rules::may_serve`]; what is kept here is the session's floor of what it has
//! already read (monotonic reads).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use meridian_sqlroute::Analysis;
use tracing::debug;

use crate::cache::rules::{self as cache_rules, Bracket, SessionFloor};
use crate::cache::{self, store::Found, Plan};
use crate::engine::statements::Stmt;
use crate::metrics::TargetLabel;
use crate::protocol::frontend::{FrontendMsg, Target};
use crate::shared::Shared;
use crate::wire::Frame;

/// An extended-protocol execution held back until its Sync.
#[derive(Debug)]
struct Hold {
    plan: Plan,
    stmt: Arc<Stmt>,
    /// The Bind message after its portal and statement names.
    bind_rest: Bytes,
    frames: Vec<Frame>,
    described: bool,
    executed: bool,
}

/// What the hold did with a client message.
#[derive(Debug)]
pub enum Held {
    /// Not taken: handle it as usual.
    No,
    /// Taken into the hold.
    Taken,
    /// The hold ended: handle these messages as usual, in order (`fill`: the Bind among
    /// them starts a cache fill with this plan).
    Release {
        frames: Vec<Frame>,
        fill: Option<Plan>,
    },
    /// The cache answers the held execution with these messages.
    Answer(Bytes),
}

/// Who the session is, for cache keys.
pub struct Identity<'a> {
    pub database: &'a str,
    pub user: &'a str,
    pub params: &'a [(String, String)],
}

#[derive(Default)]
pub struct SessionCache {
    /// What this session has read through the cache (monotonic reads).
    floor: SessionFloor,
    hold: Option<Hold>,
}

impl SessionCache {
    /// The cache plan of a simple-protocol read about to run on a replica.
    pub fn plan_simple(
        &self,
        shared: &Arc<Shared>,
        analysis: &Analysis,
        text: &[u8],
        who: &Identity<'_>,
    ) -> Option<Plan> {
        let cache = shared.cache()?;
        let sql = std::str::from_utf8(text).ok()?;
        cache.plan(
            shared,
            &cache::Request {
                analysis,
                sql,
                identity: &cache::entry::simple_identity(sql),
                database: who.database,
                user: who.user,
                params: who.params,
            },
        )
    }

    /// Looks `plan` up: the entry's messages if they may be served to this session.
    /// `required`: the LSN the session's reads must reflect.
    pub async fn lookup(
        &mut self,
        shared: &Shared,
        plan: &Plan,
        required: Option<meridian_shared::lsn::Lsn>,
    ) -> Option<Bytes> {
        let cache = shared.cache()?;
        let metrics = shared.metrics();
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
                return None;
            }
            Ok(Found::Lagging) => {
                metrics.cache_lookup("lagging");
                return None;
            }
            Err(e) => {
                debug!(error = %e, "cache lookup failed; running the read uncached");
                metrics.cache_lookup(e.outcome());
                return None;
            }
        };
        let Some((bracket, messages)) = cache::entry::decode(&value) else {
            metrics.cache_lookup("miss");
            return None;
        };
        if !cache_rules::may_serve(&plan.hash, bracket, &watermarks, required, &self.floor) {
            metrics.cache_lookup("stale");
            return None;
        }
        metrics.cache_lookup("hit");
        metrics
            .queries
            .get_or_create(&TargetLabel { target: "cache" })
            .inc();
        self.floor.observe(&plan.hash, bracket);
        Some(Bytes::copy_from_slice(messages))
    }

    /// A fill completed: remember it (monotonic reads) and store it in the background.
    pub fn store(&mut self, shared: &Shared, plan: Plan, bracket: Bracket, messages: Bytes) {
        self.floor.observe(&plan.hash, bracket);
        let Some(cache) = shared.cache() else {
            return;
        };
        let store = cache.store.clone();
        let metrics = shared.metrics().clone();
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

    /// Offers a client message to the extended-protocol hold. `stmt`: the statement a
    /// `Bind` binds, with the cache plan of its execution (computed by the caller only
    /// when a hold may start: cache configured, no batch open, nothing held or stalled).
    pub async fn offer(
        &mut self,
        shared: &Shared,
        frame: &Frame,
        msg: &FrontendMsg,
        start: impl FnOnce() -> Option<(Arc<Stmt>, Plan)>,
        who: &Identity<'_>,
        required: Option<meridian_shared::lsn::Lsn>,
    ) -> Held {
        let Some(hold) = self.hold.as_mut() else {
            let FrontendMsg::Bind(b) = msg else {
                return Held::No;
            };
            let Some((stmt, plan)) = start() else {
                return Held::No;
            };
            self.hold = Some(Hold {
                plan,
                stmt,
                bind_rest: b.rest.clone(),
                frames: vec![frame.clone()],
                described: false,
                executed: false,
            });
            return Held::Taken;
        };
        match msg {
            FrontendMsg::Describe(Target::Portal, _) if !hold.executed => {
                hold.described = true;
                hold.frames.push(frame.clone());
                return Held::Taken;
            }
            FrontendMsg::Execute { max_rows: 0, .. } if !hold.executed => {
                hold.executed = true;
                hold.frames.push(frame.clone());
                return Held::Taken;
            }
            FrontendMsg::Sync if hold.executed => {}
            _ => return self.release(frame, None),
        }
        let Some(mut hold) = self.hold.take() else {
            return Held::No;
        };
        let identity = cache::entry::extended_identity(
            &String::from_utf8_lossy(&hold.stmt.query),
            &hold.stmt.param_types,
            hold.described,
            &hold.bind_rest,
        );
        hold.plan.hash = cache::entry::entry_hash(who.database, who.user, who.params, &identity);
        if let Some(messages) = self.lookup(shared, &hold.plan, required).await {
            return Held::Answer(messages);
        }
        let plan = hold.plan.clone();
        self.hold = Some(hold);
        self.release(frame, Some(plan))
    }

    fn release(&mut self, frame: &Frame, fill: Option<Plan>) -> Held {
        let mut frames = self.hold.take().map(|h| h.frames).unwrap_or_default();
        frames.push(frame.clone());
        Held::Release { frames, fill }
    }

    /// Messages are held: the session must not start anything else.
    pub fn holding(&self) -> bool {
        self.hold.is_some()
    }
}

/// The identity of an extended execution of `stmt` bound with `bind_rest`, before its
/// Describe is known (the plan's hash is recomputed at the Sync).
pub fn extended_identity(stmt: &Stmt, bind_rest: &[u8]) -> Vec<u8> {
    cache::entry::extended_identity(
        &String::from_utf8_lossy(&stmt.query),
        &stmt.param_types,
        false,
        bind_rest,
    )
}
