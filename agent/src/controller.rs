//! The controller: the one task that changes the node's PostgreSQL. It carries
//! out the start-up decision ([`decide::decide_startup`]), the coordinator's
//! commands (`Promote`, `Follow`, `Fence`, `SetSyncStandbys`), the restart of a
//! crashed standby and the rejoin of a stale primary, one at a time.
//!
//! Operations run serially; heartbeats keep flowing meanwhile because the probe
//! and the QUIC link are other tasks. While an operation runs the node state is
//! `busy`, so the probe does not ask for restarts. Every command re-checks its
//! epoch against the highest seen before it acts (`Ack Stale`).
//!
//! Follow: ensure the node's physical slot on the leader; a running standby
//! just gets a new `primary_conninfo` and a reload (and is rewound if it does not
//! stream within a few seconds, i.e. it diverged); a primary (running or not)
//! is stopped, crash-recovered (`postgres --single`) when it did not shut down
//! cleanly, `pg_rewind`-ed from the leader and started as a standby; if rewind
//! fails the data directory is wiped and cloned with `pg_basebackup`.
//!
//! Whatever names the leader's address (a `Follow` command, the `leader` record
//! at start-up or rejoin), the node dials the leader's address for its own
//! region: the leader's `members/<leader>` record is read and
//! [`decide::follow_addr`] picks its `pg_addrs` entry, falling back to the
//! advertised `pg_addr` (no record, etcd unreachable, another address).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use meridian_shared::envelope::{AckResult, CoordMsg};
use meridian_shared::epoch::Epoch;
use meridian_shared::failsafe;
use meridian_shared::keys::Keys;
use meridian_shared::records::{LeaderRecord, Role};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::NoTls;

use crate::config::AgentConfig;
use crate::decide::{self, Intent, LocalState, StartupAction};
use crate::postgres::config::SUPERUSER;
use crate::postgres::{basebackup, replication, Conninfo, PgError, PgNode, StandbyOf};
use crate::probe::postmaster_alive;
use crate::state::Shared;

/// How long a (re)started postmaster may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a reconfigured standby may take to stream before it is rewound.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a rewound node may take to stream before it is re-cloned.
const REWOUND_STREAM_TIMEOUT: Duration = Duration::from_secs(15);
/// Fast shutdown escalates to immediate after this (the contract's 2 s).
const FAST_STOP: Duration = Duration::from_secs(2);
/// Pause before a failed start-up action or rejoin is retried on the timer.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(3);

/// Work for the controller.
#[derive(Debug)]
pub enum Op {
    /// A coordinator command and where its result goes.
    Command {
        msg: CoordMsg,
        reply: oneshot::Sender<AckResult>,
    },
    /// The probe saw a standby's postmaster gone.
    RestartStandby,
}

/// Why an operation failed (rendered into `Ack Failed`).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{0}")]
    Other(String),
}

fn other(msg: impl Into<String>) -> OpError {
    OpError::Other(msg.into())
}

/// Marks the node busy for the guard's lifetime.
struct Busy<'a>(&'a Shared);

impl<'a> Busy<'a> {
    fn new(shared: &'a Shared) -> Busy<'a> {
        shared.update(|s| s.busy = true);
        Busy(shared)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.update(|s| s.busy = false);
    }
}

/// Splits `host:port` (IPv6 hosts may be bracketed).
pub fn split_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

/// The command's name for logs and metrics, and its epoch.
pub fn kind_and_epoch(msg: &CoordMsg) -> (&'static str, Option<Epoch>) {
    match msg {
        CoordMsg::Promote { epoch, .. } => ("promote", Some(*epoch)),
        CoordMsg::Follow { epoch, .. } => ("follow", Some(*epoch)),
        CoordMsg::Fence { epoch, .. } => ("fence", Some(*epoch)),
        CoordMsg::SetSyncStandbys { epoch, .. } => ("set_sync_standbys", Some(*epoch)),
        CoordMsg::Invalidate { epoch, .. } => ("invalidate", Some(*epoch)),
        CoordMsg::FlushCache { epoch, .. } => ("flush_cache", Some(*epoch)),
        CoordMsg::Ack { .. } => ("ack", None),
        CoordMsg::Horizon { epoch, .. } => ("horizon", Some(*epoch)),
    }
}

/// Label of an ack result for metrics.
pub fn result_label(result: &AckResult) -> &'static str {
    match result {
        AckResult::Ok => "ok",
        AckResult::Stale { .. } => "stale",
        AckResult::Failed { .. } => "failed",
    }
}

/// The server's message of a database error (tokio-postgres displays only "db error").
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Quotes a string as an SQL literal (`'` doubled; standard_conforming_strings is on).
pub fn sql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The controller of one node.
pub struct Controller {
    pub node: Arc<PgNode>,
    pub shared: Arc<Shared>,
    pub cfg: Arc<AgentConfig>,
    /// For reading the leader's member record (its regional address).
    etcd: Option<(etcd_client::Client, Keys)>,
    last_restart: Option<Instant>,
    /// When a start-up action or a rejoin last failed.
    last_failure: Option<Instant>,
}

impl Controller {
    pub fn new(node: Arc<PgNode>, shared: Arc<Shared>, cfg: Arc<AgentConfig>) -> Controller {
        Controller {
            node,
            shared,
            cfg,
            etcd: None,
            last_restart: None,
            last_failure: None,
        }
    }

    /// Lets the controller read `members/<leader>` to dial the leader's address
    /// for this node's region (without it, the advertised `pg_addr` is used).
    pub fn with_etcd(mut self, client: etcd_client::Client, keys: Keys) -> Controller {
        self.etcd = Some((client, keys));
        self
    }

    /// The address of `leader` (advertised as `advertised`) as reached from this
    /// node's region; `advertised` when its member record cannot be read.
    async fn leader_addr_for_me(&self, leader: &str, advertised: &str) -> String {
        let member = match &self.etcd {
            None => None,
            Some((client, keys)) => {
                let mut client = client.clone();
                match crate::member::read_member(&mut client, keys, leader).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(%leader, error = %e,
                            "cannot read the leader's member record; dialing its pg_addr");
                        None
                    }
                }
            }
        };
        decide::follow_addr(advertised, member.as_ref(), &self.cfg.region)
    }

    /// What is on disk and running now.
    pub async fn local_state(&self) -> LocalState {
        let dir = self.node.data_dir();
        LocalState {
            data_dir_empty: !dir.join("PG_VERSION").exists(),
            postmaster_running: postmaster_alive(&self.node).await,
            was_standby: dir.join("standby.signal").exists(),
        }
    }

    /// Runs until `ops` closes: start-up first, then operations as they come.
    pub async fn run(mut self, mut ops: mpsc::Receiver<Op>) {
        let mut leader_rx = self.shared.leader.subscribe();
        let mut waiting = !self.startup().await;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                op = ops.recv() => match op {
                    None => return,
                    Some(Op::Command { msg, reply }) => {
                        let result = self.command(msg).await;
                        // A command may have settled the node (e.g. a Follow of a waiting one).
                        if matches!(result, AckResult::Ok) {
                            waiting = false;
                        }
                        let _ = reply.send(result);
                    }
                    Some(Op::RestartStandby) => self.restart_standby().await,
                },
                changed = leader_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if waiting {
                        waiting = !self.startup().await;
                    } else {
                        self.check_rejoin().await;
                    }
                }
                _ = tick.tick() => {
                    // After a failure, retry on the tick only every RETRY_AFTER_FAILURE
                    // (a leader change retries at once).
                    if self.last_failure.is_some_and(|t| t.elapsed() < RETRY_AFTER_FAILURE) {
                        continue;
                    }
                    if waiting {
                        waiting = !self.startup().await;
                    } else {
                        self.check_rejoin().await;
                    }
                }
            }
        }
    }

    /// One start-up decision and its execution; false while waiting for a leader.
    async fn startup(&mut self) -> bool {
        let local = self.local_state().await;
        let leader = self.shared.leader.borrow().clone();
        let action =
            decide::decide_startup(local, leader.as_ref(), &self.cfg.name, self.cfg.bootstrap);
        if action != StartupAction::WaitForLeader {
            tracing::info!(?action, ?local, "start-up decision");
        }
        let result = match action {
            StartupAction::Adopt => {
                let standby = local.was_standby;
                self.shared.update(|s| {
                    s.intent = if standby {
                        Intent::Standby
                    } else {
                        Intent::Primary
                    };
                    s.role = if standby {
                        Role::Replica
                    } else {
                        Role::Primary
                    };
                });
                if standby {
                    if let Some(l) = &leader {
                        let addr = self.leader_addr_for_me(&l.node, &l.pg_addr).await;
                        self.shared
                            .update(|s| s.following = Some((l.node.clone(), addr)));
                    }
                }
                Ok(())
            }
            StartupAction::Bootstrap => self.bootstrap().await,
            StartupAction::StartPrimary => self.start_primary().await,
            StartupAction::WaitForLeader => return false,
            StartupAction::AwaitPromote => {
                self.shared.update(|s| s.intent = Intent::Idle);
                Ok(())
            }
            StartupAction::Clone { from }
            | StartupAction::StartStandby { of: from }
            | StartupAction::Rejoin { of: from } => {
                let epoch = leader.map(|l| l.epoch).unwrap_or_default();
                self.follow(&from.node, &from.pg_addr, epoch).await
            }
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "start-up action failed; deciding again");
                self.last_failure = Some(Instant::now());
                false
            }
        }
    }

    async fn bootstrap(&self) -> Result<(), OpError> {
        let _busy = Busy::new(&self.shared);
        tracing::info!(data_dir = %self.node.data_dir().display(), "initdb (bootstrap)");
        self.node.initdb().await?;
        self.start_and_wait().await?;
        self.shared.update(|s| {
            s.intent = Intent::Primary;
            s.role = Role::Primary;
        });
        Ok(())
    }

    async fn start_primary(&self) -> Result<(), OpError> {
        let _busy = Busy::new(&self.shared);
        self.node.write_config().await?;
        self.start_and_wait().await?;
        self.shared.update(|s| {
            s.intent = Intent::Primary;
            s.role = Role::Primary;
        });
        Ok(())
    }

    async fn start_and_wait(&self) -> Result<(), OpError> {
        self.node.start().await?;
        self.node.wait_ready(READY_TIMEOUT).await?;
        Ok(())
    }

    async fn restart_standby(&mut self) {
        let state = self.shared.node_state();
        let alive = postmaster_alive(&self.node).await;
        if !decide::should_restart(state.intent, alive, state.busy, state.fenced_at) {
            return;
        }
        if self
            .last_restart
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.last_restart = Some(Instant::now());
        self.shared
            .metrics
            .standby_restarts
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!("standby postmaster is gone: restarting it");
        let _busy = Busy::new(&self.shared);
        if let Err(e) = self.start_and_wait().await {
            tracing::error!(error = %e, "restarting the standby failed");
        }
    }

    /// A stale primary (running, or crashed and not restarted) rejoins a newer
    /// serving leader by itself.
    async fn check_rejoin(&mut self) {
        let Some(leader) = self.shared.leader.borrow().clone() else {
            return;
        };
        let state = self.shared.node_state();
        if state.busy || state.fenced_at.is_some() {
            return;
        }
        let status = self.shared.status.borrow().clone();
        let running_primary = status.pg_up && status.in_recovery == Some(false);
        let crashed_primary =
            state.intent == Intent::Primary && !postmaster_alive(&self.node).await;
        let node_epoch = state.node_epoch.max(status.node_epoch.unwrap_or_default());
        if decide::should_rejoin(
            &leader,
            &self.cfg.name,
            running_primary || crashed_primary,
            node_epoch,
        ) {
            tracing::warn!(leader = %leader.node, epoch = %leader.epoch, %node_epoch,
                "another node leads a newer epoch: fencing and rejoining it");
            self.rejoin(&leader).await;
        }
    }

    async fn rejoin(&mut self, leader: &LeaderRecord) {
        if let Err(e) = self
            .follow(&leader.node, &leader.pg_addr, leader.epoch)
            .await
        {
            tracing::error!(error = %e, "rejoin failed; will retry");
            self.last_failure = Some(Instant::now());
        }
    }

    /// Executes one command; the result is its ack.
    pub async fn command(&mut self, msg: CoordMsg) -> AckResult {
        let (kind, epoch) = kind_and_epoch(&msg);
        let result = match epoch {
            Some(epoch) => match decide::check_command_epoch(epoch, self.shared.epoch_seen()) {
                Err(current) => AckResult::Stale { current },
                Ok(()) => {
                    self.shared.see_epoch(epoch);
                    tracing::info!(kind, %epoch, "executing command");
                    match self.execute(msg).await {
                        Ok(()) => AckResult::Ok,
                        Err(e) => {
                            tracing::error!(kind, error = %e, "command failed");
                            AckResult::Failed {
                                message: e.to_string(),
                            }
                        }
                    }
                }
            },
            None => AckResult::Ok,
        };
        self.shared.metrics.command(kind, result_label(&result));
        result
    }

    async fn execute(&mut self, msg: CoordMsg) -> Result<(), OpError> {
        match msg {
            CoordMsg::Promote {
                epoch, old_fenced, ..
            } => self.promote(epoch, old_fenced).await,
            CoordMsg::Follow {
                leader,
                pg_addr,
                epoch,
                ..
            } => self.follow(&leader, &pg_addr, epoch).await,
            CoordMsg::Fence { epoch, .. } => self.fence(epoch).await,
            CoordMsg::SetSyncStandbys { value, .. } => self.set_sync_standbys(&value).await,
            // The cache's messages are handled by the link (`crate::invalidation`) and
            // never reach the controller.
            CoordMsg::Invalidate { .. }
            | CoordMsg::FlushCache { .. }
            | CoordMsg::Ack { .. }
            | CoordMsg::Horizon { .. } => Ok(()),
        }
    }

    async fn promote(&mut self, epoch: Epoch, old_fenced: bool) -> Result<(), OpError> {
        let _busy = Busy::new(&self.shared);
        self.shared.update(|s| {
            if decide::lifts_fence(s.fenced_at, epoch) {
                s.fenced_at = None;
            }
        });
        if let Some(at) = self.shared.node_state().fenced_at {
            return Err(other(format!("fenced at epoch {at}")));
        }
        if !postmaster_alive(&self.node).await {
            if !self.node.data_dir().join("PG_VERSION").exists() {
                return Err(other("no data directory to promote"));
            }
            tracing::info!("starting the stopped node for promotion");
            // Our settings (no standby upstream); standby.signal, if any, stays and
            // the node is promoted below.
            self.node.update_settings(|s| s.standby = None).await?;
            self.start_and_wait().await?;
        }
        // A postmaster that is still starting (crash recovery) must answer first.
        self.node.wait_ready(Duration::from_secs(10)).await?;
        if self.node.is_in_recovery().await? {
            if !old_fenced {
                self.outwait_failsafe().await?;
            }
            tracing::info!("pg_promote");
            self.node.promote().await?;
        }
        let client = self.node.client().await?;
        let sql_err = |e: tokio_postgres::Error| {
            other(format!("recording meridian.epoch: {}", pg_message(&e)))
        };
        // ALTER SYSTEM accepts a custom setting only once the session knows it.
        client
            .batch_execute("SET meridian.epoch = '0'")
            .await
            .map_err(sql_err)?;
        client
            .batch_execute(&format!(
                "ALTER SYSTEM SET meridian.epoch = {}",
                sql_literal(&epoch.to_string())
            ))
            .await
            .map_err(sql_err)?;
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(sql_err)?;
        // The reload is asynchronous: wait until the new value is visible, in
        // a session of its own (the one above has its own SET value).
        let deadline = Instant::now() + Duration::from_secs(10);
        let checker = self.node.client().await?;
        loop {
            let row = checker
                .query_one(
                    "SELECT pg_is_in_recovery(), current_setting('meridian.epoch', true)",
                    &[],
                )
                .await
                .map_err(sql_err)?;
            let in_recovery: bool = row.get(0);
            let value: Option<String> = row.get(1);
            if !in_recovery && value.as_deref() == Some(epoch.to_string().as_str()) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(other(format!(
                    "after promotion: in recovery {in_recovery}, meridian.epoch {value:?} (want {epoch})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.shared.update(|s| {
            s.role = Role::Primary;
            s.intent = Intent::Primary;
            s.node_epoch = s.node_epoch.max(epoch);
            s.following = None;
        });
        tracing::info!(%epoch, "promoted");
        Ok(())
    }

    /// Before a standby becomes writable while its old primary may still be
    /// serving under the failsafe: leave the upstream (no `primary_conninfo`,
    /// reload, the WAL receiver gone) so this node confirms nothing more, then
    /// wait until every confirmation it gave has run out
    /// ([`failsafe::promotion_wait`] from when the receiver last heard).
    async fn outwait_failsafe(&self) -> Result<(), OpError> {
        self.node.update_settings(|s| s.standby = None).await?;
        self.node.reload().await?;
        let client = self.node.client().await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let rows = client
                .query(
                    "SELECT (extract(epoch FROM clock_timestamp() - last_msg_receipt_time) * 1000)::bigint \
                     FROM pg_stat_wal_receiver WHERE pid IS NOT NULL",
                    &[],
                )
                .await
                .map_err(|e| other(format!("reading the WAL receiver: {}", pg_message(&e))))?;
            let now = std::time::Instant::now();
            let Some(row) = rows.first() else { break };
            // Still running: it may hear more until it is gone.
            let ago: Option<i64> = row.get(0);
            let ago = Duration::from_millis(ago.and_then(|a| u64::try_from(a).ok()).unwrap_or(0));
            self.shared
                .heard_upstream(now.checked_sub(ago).unwrap_or(now));
            if now >= deadline {
                // A receiver that does not stop: count it as hearing until now.
                self.shared.heard_upstream(now);
                tracing::warn!("the WAL receiver did not stop within 2 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let wait = failsafe::promotion_wait(
            std::time::Instant::now(),
            self.shared.upstream_heard(),
            false,
        );
        if !wait.is_zero() {
            tracing::info!(
                wait_ms = wait.as_millis() as u64,
                "outwaiting the failsafe confirmations this standby gave its old primary"
            );
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    async fn fence(&mut self, epoch: Epoch) -> Result<(), OpError> {
        let _busy = Busy::new(&self.shared);
        self.shared.update(|s| {
            s.fenced_at = Some(s.fenced_at.map_or(epoch, |at| at.max(epoch)));
            s.intent = Intent::Idle;
        });
        stop_escalating(&self.node, FAST_STOP).await?;
        tracing::info!(%epoch, "fenced");
        Ok(())
    }

    async fn set_sync_standbys(&mut self, value: &str) -> Result<(), OpError> {
        let client = self.node.client().await?;
        let err = |e: tokio_postgres::Error| {
            other(format!("synchronous_standby_names: {}", pg_message(&e)))
        };
        client
            .batch_execute(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = {}",
                sql_literal(value)
            ))
            .await
            .map_err(err)?;
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Makes this node a streaming standby of `leader` at `pg_addr`.
    pub async fn follow(
        &mut self,
        leader: &str,
        pg_addr: &str,
        epoch: Epoch,
    ) -> Result<(), OpError> {
        if leader == self.cfg.name {
            return Err(other("told to follow itself"));
        }
        let regional = self.leader_addr_for_me(leader, pg_addr).await;
        if regional != pg_addr {
            tracing::info!(%leader, advertised = %pg_addr, dialing = %regional,
                "following the leader at its address for this region");
        }
        let pg_addr = regional.as_str();
        let (host, port) = split_addr(pg_addr)
            .ok_or_else(|| other(format!("leader pg_addr {pg_addr:?} is not host:port")))?;
        let _busy = Busy::new(&self.shared);
        self.shared.update(|s| {
            if decide::lifts_fence(s.fenced_at, epoch) {
                s.fenced_at = None;
            }
        });
        if let Some(at) = self.shared.node_state().fenced_at {
            return Err(other(format!("fenced at epoch {at}")));
        }
        let slot = decide::slot_name(&self.cfg.name);
        let mut upstream = Conninfo::new(&host, port, SUPERUSER, None);
        upstream.application_name = Some(self.cfg.name.clone());
        ensure_slot(&upstream, &slot).await?;
        // The timeline the standby must reach: a receiver that streams only the
        // old timeline up to the fork point (a diverged standby) does not count.
        let leader_tli = match leader_timeline(&upstream).await {
            Ok(tli) => Some(tli),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the leader's timeline");
                None
            }
        };
        let standby_of = StandbyOf {
            upstream: upstream.clone(),
            slot: Some(slot),
        };
        self.shared.update(|s| {
            s.intent = Intent::Idle;
            s.following = Some((leader.to_owned(), pg_addr.to_owned()));
        });

        let local = self.local_state().await;
        let mut need_rewind = false;
        if local.data_dir_empty {
            if local.postmaster_running {
                return Err(other(
                    "a postmaster runs on a data directory without PG_VERSION",
                ));
            }
            self.clone_from(&upstream, &standby_of).await?;
            self.start_and_wait().await?;
            if !self
                .wait_streaming(&host, port, leader_tli, STREAM_TIMEOUT)
                .await
            {
                tracing::warn!(%leader, "the new clone is not streaming yet");
            }
        } else if local.postmaster_running {
            if self.node.is_in_recovery().await? {
                tracing::info!(%leader, %pg_addr, "re-pointing the running standby");
                self.node.make_standby(standby_of.clone()).await?;
                self.node.reload().await?;
                if !self
                    .wait_streaming(&host, port, leader_tli, STREAM_TIMEOUT)
                    .await
                {
                    tracing::warn!("standby does not stream from the new leader: rewinding it");
                    need_rewind = true;
                }
            } else {
                tracing::info!("stopping the old primary before rewinding it");
                need_rewind = true;
            }
        } else if local.was_standby {
            self.node.make_standby(standby_of.clone()).await?;
            self.start_and_wait().await?;
            if !self
                .wait_streaming(&host, port, leader_tli, STREAM_TIMEOUT)
                .await
            {
                tracing::warn!("standby does not stream from the leader: rewinding it");
                need_rewind = true;
            }
        } else {
            need_rewind = true;
        }
        if need_rewind {
            stop_escalating(&self.node, FAST_STOP).await?;
            self.shared.update(|s| s.role = Role::Unknown);
            match self.rewind(&upstream).await {
                Ok(()) => {
                    self.node.make_standby(standby_of.clone()).await?;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pg_rewind failed: re-cloning the node");
                    self.clone_from(&upstream, &standby_of).await?;
                }
            }
            self.start_and_wait().await?;
            if !self
                .wait_streaming(&host, port, leader_tli, REWOUND_STREAM_TIMEOUT)
                .await
            {
                // Still diverged (or its WAL is gone on the leader): start over from a copy.
                tracing::warn!(%leader, "the rewound standby does not stream: re-cloning it");
                self.clone_from(&upstream, &standby_of).await?;
                self.start_and_wait().await?;
                if !self
                    .wait_streaming(&host, port, leader_tli, STREAM_TIMEOUT)
                    .await
                {
                    tracing::warn!(%leader, "the re-cloned standby is not streaming yet");
                }
            }
        }
        self.shared.update(|s| {
            s.intent = Intent::Standby;
            s.role = Role::Replica;
            s.node_epoch = Epoch::ZERO;
        });
        tracing::info!(%leader, %pg_addr, %epoch, "following");
        Ok(())
    }

    /// Wipe + `pg_basebackup` (slot already ensured) + standby settings; not started.
    async fn clone_from(&self, upstream: &Conninfo, standby_of: &StandbyOf) -> Result<(), OpError> {
        stop_escalating(&self.node, FAST_STOP).await?;
        self.shared.update(|s| s.role = Role::Unknown);
        wipe_dir(self.node.data_dir()).await?;
        tracing::info!(from = %upstream, "pg_basebackup");
        basebackup(upstream, None, &self.node).await?;
        self.shared.metrics.clones.fetch_add(1, Ordering::Relaxed);
        // pg_basebackup streamed through a temporary slot; from now on the
        // node's own (already ensured) slot keeps the WAL it needs.
        self.node.make_standby(standby_of.clone()).await?;
        Ok(())
    }

    async fn rewind(&self, upstream: &Conninfo) -> Result<(), OpError> {
        let standby_signal = self.node.data_dir().join("standby.signal");
        if standby_signal.exists() {
            tokio::fs::remove_file(&standby_signal)
                .await
                .map_err(|e| other(format!("removing {}: {e}", standby_signal.display())))?;
        }
        replication::crash_recover(&self.node).await?;
        let mut source = upstream.clone();
        source.dbname = Some("postgres".into());
        source.application_name = None;
        // A just-promoted source's control file still names the old timeline
        // until its first checkpoint, and pg_rewind would then find "no rewind
        // required" (see the pg_rewind documentation): checkpoint it first.
        checkpoint(&source).await?;
        tracing::info!(source = %source, "pg_rewind");
        replication::rewind(&self.node, &source).await?;
        self.shared.metrics.rewinds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Waits until the WAL receiver streams from `host:port` and has received
    /// WAL of timeline `tli` (when known).
    async fn wait_streaming(
        &self,
        host: &str,
        port: u16,
        tli: Option<u32>,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let streaming = async {
                let c = self.node.client().await.ok()?;
                let row = c
                    .query_opt(
                        "SELECT status, sender_host, sender_port, received_tli \
                         FROM pg_stat_wal_receiver",
                        &[],
                    )
                    .await
                    .ok()??;
                let status: Option<String> = row.get(0);
                let h: Option<String> = row.get(1);
                let p: Option<i32> = row.get(2);
                let received: Option<i32> = row.get(3);
                Some(decide::streams_from(
                    status.as_deref(),
                    h.as_deref(),
                    p,
                    received,
                    host,
                    port,
                    tli,
                ))
            }
            .await
            .unwrap_or(false);
            if streaming {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn connect_to(conninfo: &Conninfo) -> Result<tokio_postgres::Client, OpError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&conninfo.host)
        .port(conninfo.port)
        .user(&conninfo.user)
        .dbname("postgres")
        .application_name("meridian-agent")
        .connect_timeout(Duration::from_secs(2));
    let (client, conn) = tokio::time::timeout(Duration::from_secs(3), cfg.connect(NoTls))
        .await
        .map_err(|_| {
            other(format!(
                "connecting to {}:{} timed out",
                conninfo.host, conninfo.port
            ))
        })?
        .map_err(|e| {
            other(format!(
                "connecting to {}:{}: {}",
                conninfo.host,
                conninfo.port,
                pg_message(&e)
            ))
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The current timeline of the primary `conninfo` names.
pub async fn leader_timeline(conninfo: &Conninfo) -> Result<u32, OpError> {
    let client = connect_to(conninfo).await?;
    let row = client
        .query_one(
            "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
            &[],
        )
        .await
        .map_err(|e| other(format!("timeline of {conninfo}: {}", pg_message(&e))))?;
    let tli: i32 = row.get(0);
    u32::try_from(tli).map_err(|_| other(format!("timeline {tli} of {conninfo}")))
}

/// `CHECKPOINT` on the server `conninfo` names.
pub async fn checkpoint(conninfo: &Conninfo) -> Result<(), OpError> {
    let client = connect_to(conninfo).await?;
    client.batch_execute("CHECKPOINT").await.map_err(|e| {
        other(format!(
            "CHECKPOINT on {}:{}: {}",
            conninfo.host,
            conninfo.port,
            pg_message(&e)
        ))
    })
}

/// Creates `slot` on the server `upstream` names unless it exists.
pub async fn ensure_slot(upstream: &Conninfo, slot: &str) -> Result<(), OpError> {
    let err = |e: tokio_postgres::Error| {
        other(format!(
            "slot {slot} on {}:{}: {}",
            upstream.host,
            upstream.port,
            pg_message(&e)
        ))
    };
    let client = connect_to(upstream).await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(err)?
        .is_some();
    if !exists {
        match client
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true)",
                &[&slot],
            )
            .await
        {
            Ok(_) => tracing::info!(slot, upstream = %upstream, "created replication slot"),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

fn send_signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

async fn wait_gone(node: &PgNode, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !postmaster_alive(node).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the postmaster: fast (SIGINT), immediate (SIGQUIT) after `fast_for`,
/// SIGKILL of it and its children after 5 s more. Ok when none runs.
pub async fn stop_escalating(node: &PgNode, fast_for: Duration) -> Result<(), PgError> {
    if !postmaster_alive(node).await {
        return Ok(());
    }
    let pid = match node.postmaster_pid().await {
        Ok(pid) => pid,
        Err(PgError::NotRunning { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    send_signal(pid, Signal::SIGINT);
    if wait_gone(node, fast_for).await {
        return Ok(());
    }
    tracing::warn!(pid, "fast shutdown too slow: immediate");
    send_signal(pid, Signal::SIGQUIT);
    if wait_gone(node, Duration::from_secs(5)).await {
        return Ok(());
    }
    tracing::warn!(pid, "immediate shutdown too slow: SIGKILL");
    match node.kill9().await {
        Ok(()) | Err(PgError::NotRunning { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Names a PostgreSQL data directory (or a half-made clone) may hold.
const DATA_DIR_ENTRIES: &[&str] = &[
    "PG_VERSION",
    "base",
    "global",
    "pg_commit_ts",
    "pg_dynshmem",
    "pg_hba.conf",
    "pg_ident.conf",
    "pg_logical",
    "pg_multixact",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat",
    "pg_stat_tmp",
    "pg_subtrans",
    "pg_tblspc",
    "pg_twophase",
    "pg_wal",
    "pg_xact",
    "postgresql.auto.conf",
    "postgresql.conf",
    "postmaster.opts",
    "postmaster.pid",
    "backup_label",
    "backup_label.old",
    "backup_manifest",
    "tablespace_map",
    "tablespace_map.old",
    "standby.signal",
    "recovery.signal",
    "meridian.conf",
    "current_logfiles",
    "log",
    "lost+found",
];

/// Whether a directory holding `names` may be wiped: only PostgreSQL's own
/// entries, so a mistaken `--data-dir` (a home directory, `/`) is never emptied.
pub fn is_wipeable<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.all(|n| DATA_DIR_ENTRIES.contains(&n))
}

/// Removes everything inside `dir` (not `dir` itself, which may be a mount point),
/// refusing when it holds anything a data directory would not.
async fn wipe_dir(dir: &std::path::Path) -> Result<(), OpError> {
    let names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    if !is_wipeable(names.iter().map(String::as_str)) {
        return Err(other(format!(
            "refusing to empty {}: it holds files that are not PostgreSQL's ({})",
            dir.display(),
            names
                .iter()
                .filter(|n| !DATA_DIR_ENTRIES.contains(&n.as_str()))
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(other(format!("reading {}: {e}", dir.display()))),
    };
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| other(format!("reading {}: {e}", dir.display())))?
    {
        let path = entry.path();
        let is_dir = entry.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
        let removed = if is_dir {
            tokio::fs::remove_dir_all(&path).await
        } else {
            tokio::fs::remove_file(&path).await
        };
        removed.map_err(|e| other(format!("removing {}: {e}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split() {
        assert_eq!(
            split_addr("127.0.0.1:5432"),
            Some(("127.0.0.1".into(), 5432))
        );
        assert_eq!(split_addr("[::1]:6000"), Some(("::1".into(), 6000)));
        assert_eq!(split_addr("host"), None);
        assert_eq!(split_addr(":5432"), None);
        assert_eq!(split_addr("h:notaport"), None);
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(sql_literal("3"), "'3'");
        assert_eq!(sql_literal("ANY 1 (\"a\")"), "'ANY 1 (\"a\")'");
        assert_eq!(sql_literal("it's"), "'it''s'");
    }

    #[test]
    fn only_data_directories_are_wiped() {
        assert!(is_wipeable(
            ["PG_VERSION", "base", "pg_wal", "standby.signal"].into_iter()
        ));
        assert!(is_wipeable(std::iter::empty()));
        assert!(!is_wipeable(["base", ".bashrc"].into_iter()));
        assert!(!is_wipeable(["etc", "usr"].into_iter()));
    }

    #[test]
    fn command_kinds() {
        let (kind, epoch) = kind_and_epoch(&CoordMsg::Promote {
            id: 1,
            epoch: Epoch(4),
            old_fenced: false,
        });
        assert_eq!((kind, epoch), ("promote", Some(Epoch(4))));
        assert_eq!(
            kind_and_epoch(&CoordMsg::Ack { batch_id: 1 }),
            ("ack", None)
        );
        assert_eq!(
            result_label(&AckResult::Stale { current: Epoch(1) }),
            "stale"
        );
    }
}
