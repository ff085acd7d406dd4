//! State shared by the agent's tasks: the latest probe of PostgreSQL, the role,
//! the highest epoch seen, the node's intent and fence, the current leader as
//! etcd says, the last lease renewal, the cache's invalidation horizon and
//! freshness samples, the failsafe's inputs and verdict (the replicas etcd
//! lists, when the WAL receiver last heard from upstream), and the counters
//! behind `/metrics`.
//!
//! Everything is behind short-held locks or atomics; no lock is held across an
//! `.await`. Decisions on this state are made in [`crate::decide`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;
use meridian_shared::records::{LeaderRecord, Role};
use tokio::sync::watch;

use crate::decide::Intent;
use crate::invalidation::freshness::{Freshness, Lease};

/// One observation of the local PostgreSQL (a heartbeat's content).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgStatus {
    /// The postmaster runs and answered the probe query.
    pub pg_up: bool,
    /// `pg_is_in_recovery()`, when it answered.
    pub in_recovery: Option<bool>,
    pub timeline: u32,
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub receiver_streaming: bool,
    /// `sender_host:sender_port` of the WAL receiver.
    pub sender: Option<String>,
    pub replay_lag_ms: Option<u64>,
    /// `current_setting('meridian.epoch', true)`.
    pub node_epoch: Option<Epoch>,
    /// How long ago the WAL receiver last received a message from its
    /// upstream (`last_msg_receipt_time`, on this host's clock).
    pub upstream_heard_ms_ago: Option<u64>,
}

/// The node's supervision state, changed by the controller and the fence watchdog.
#[derive(Clone, Debug)]
pub struct NodeState {
    pub role: Role,
    pub intent: Intent,
    /// Set by `Fence` (and self-fencing): no start until `Promote`/`Follow` of an epoch ≥ this.
    pub fenced_at: Option<Epoch>,
    /// The epoch this node was promoted under (0 when never).
    pub node_epoch: Epoch,
    /// An operation on Postgres (start, stop, rewind, clone...) is under way.
    pub busy: bool,
    /// The node this one was told to stream from: `(name, pg_addr)`.
    pub following: Option<(String, String)>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub heartbeats_sent: AtomicU64,
    pub self_fences: AtomicU64,
    pub standby_restarts: AtomicU64,
    pub rewinds: AtomicU64,
    pub clones: AtomicU64,
    commands: Mutex<BTreeMap<(String, String), u64>>,
}

impl Metrics {
    /// Counts one command of `kind` that ended with `result` (`ok`, `stale`, `failed`).
    pub fn command(&self, kind: &str, result: &str) {
        *lock(&self.commands)
            .entry((kind.to_owned(), result.to_owned()))
            .or_default() += 1;
    }

    /// `((kind, result), count)` of every command so far.
    pub fn commands(&self) -> Vec<((String, String), u64)> {
        lock(&self.commands)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The state shared by every task of one agent.
#[derive(Debug)]
pub struct Shared {
    pub node: String,
    pub region: String,
    epoch_seen: AtomicU64,
    node_state: Mutex<NodeState>,
    last_renewed: Mutex<Instant>,
    pub status: watch::Sender<PgStatus>,
    pub leader: watch::Sender<Option<LeaderRecord>>,
    /// Bumped whenever the role changes (the member record is rewritten).
    pub role_tx: watch::Sender<Role>,
    pub metrics: Metrics,
    /// While this node streams invalidations: its slot's confirmable position
    /// (sent in heartbeats as `invalidated_lsn`).
    invalidated: Mutex<Option<Lsn>>,
    freshness: Mutex<Freshness>,
    /// The other members etcd last listed as replicas (what the failsafe asks).
    replicas: Mutex<BTreeSet<String>>,
    /// The last instant this node's WAL receiver heard from its upstream (the
    /// agent's start when it never did since).
    upstream_heard: Mutex<Instant>,
    /// While etcd is out of reach: until when every replica confirmed this
    /// primary ([`meridian_shared::failsafe`]).
    failsafe_until: Mutex<Option<Instant>>,
}

impl Shared {
    pub fn new(node: &str, region: &str, role: Role) -> Shared {
        Shared {
            node: node.to_owned(),
            region: region.to_owned(),
            epoch_seen: AtomicU64::new(0),
            node_state: Mutex::new(NodeState {
                role,
                intent: Intent::Idle,
                fenced_at: None,
                node_epoch: Epoch::ZERO,
                busy: false,
                following: None,
            }),
            last_renewed: Mutex::new(Instant::now()),
            status: watch::Sender::new(PgStatus::default()),
            leader: watch::Sender::new(None),
            role_tx: watch::Sender::new(role),
            metrics: Metrics::default(),
            invalidated: Mutex::new(None),
            freshness: Mutex::new(Freshness::default()),
            replicas: Mutex::new(BTreeSet::new()),
            upstream_heard: Mutex::new(Instant::now()),
            failsafe_until: Mutex::new(None),
        }
    }

    /// The highest epoch seen (commands, etcd `epoch`/`leader`, the node itself).
    pub fn epoch_seen(&self) -> Epoch {
        Epoch(self.epoch_seen.load(Ordering::SeqCst))
    }

    /// Raises the highest epoch seen to `epoch` (never lowers it).
    pub fn see_epoch(&self, epoch: Epoch) {
        self.epoch_seen.fetch_max(epoch.0, Ordering::SeqCst);
    }

    /// A copy of the node state.
    pub fn node_state(&self) -> NodeState {
        lock(&self.node_state).clone()
    }

    /// Changes the node state; publishes a role change.
    pub fn update(&self, f: impl FnOnce(&mut NodeState)) {
        let role = {
            let mut s = lock(&self.node_state);
            f(&mut s);
            s.role
        };
        self.role_tx.send_if_modified(|r| {
            let changed = *r != role;
            *r = role;
            changed
        });
    }

    /// The current role.
    pub fn role(&self) -> Role {
        lock(&self.node_state).role
    }

    /// Records a successful lease renewal sent at `at`.
    pub fn renewed(&self, at: Instant) {
        let mut last = lock(&self.last_renewed);
        if at > *last {
            *last = at;
        }
    }

    /// When the lease was last renewed.
    pub fn last_renewed(&self) -> Instant {
        *lock(&self.last_renewed)
    }

    /// Sets (or clears, when the stream stops) this primary's invalidation horizon.
    pub fn set_invalidated(&self, lsn: Option<Lsn>) {
        *lock(&self.invalidated) = lsn;
    }

    /// This primary's invalidation horizon, while it streams.
    pub fn invalidated(&self) -> Option<Lsn> {
        *lock(&self.invalidated)
    }

    /// The coordinator relayed the cluster's invalidation horizon.
    pub fn observe_horizon(&self, epoch: Epoch, lsn: Lsn) {
        lock(&self.freshness).observe_horizon(epoch, lsn);
    }

    /// The probe that started at `at` found the node at `position`.
    pub fn sample_position(&self, at: Instant, position: Lsn, keep: std::time::Duration) {
        lock(&self.freshness).sample(at, position, keep);
    }

    /// The region's freshness lease to write now, if any (never one of an
    /// epoch older than the newest seen).
    pub fn freshness_lease(&self, now: Instant, ttl: std::time::Duration) -> Option<Lease> {
        let mut f = lock(&self.freshness);
        f.forget_before(self.epoch_seen());
        f.lease(now, ttl)
    }

    /// Replaces the replicas etcd lists (this node left out).
    pub fn set_replicas(&self, replicas: BTreeSet<String>) {
        *lock(&self.replicas) = replicas;
    }

    /// The replicas etcd last listed.
    pub fn replicas(&self) -> BTreeSet<String> {
        lock(&self.replicas).clone()
    }

    /// The WAL receiver heard from its upstream at `at` (never moves back).
    pub fn heard_upstream(&self, at: Instant) {
        let mut last = lock(&self.upstream_heard);
        *last = (*last).max(at);
    }

    /// When the WAL receiver last heard from its upstream.
    pub fn upstream_heard(&self) -> Instant {
        *lock(&self.upstream_heard)
    }

    /// Sets (or clears) how long the failsafe keeps this primary writable.
    pub fn set_failsafe_until(&self, until: Option<Instant>) {
        *lock(&self.failsafe_until) = until;
    }

    /// Until when the failsafe keeps this primary writable, if it does.
    pub fn failsafe_until(&self) -> Option<Instant> {
        *lock(&self.failsafe_until)
    }
}
