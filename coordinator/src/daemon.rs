//! The coordinator's I/O shell: the etcd election, the decision loop, and the
//! execution of what the pure modules decide (DESIGN §2-4, docs/control-path.md).
//!
//! [`run`] loops over *terms*: grant a lease (`--election-ttl`, kept alive),
//! campaign in the `coordinator/` election, act as a standby until elected (status
//! with `active = false`, QUIC connections refused with `standby`), then act as the
//! active coordinator until the lease is lost (step down at once: stop acting,
//! close agent connections, campaign again with a new lease) or shutdown (resign,
//! revoke, return).
//!
//! While active, every 50 ms tick: re-read the cluster's keys from etcd (one prefix
//! read every 100 ms, and after every write: polling instead of watches keeps
//! revisions consistent and needs no watch recovery), re-send unacknowledged
//! commands, then either bootstrap the first leader, resume or advance a failover
//! plan ([`crate::planner`]), or in steady state run the failure detector
//! ([`crate::detector`]) with probes of the primary, reconcile followers and keep
//! the synchronous standby set ([`crate::sync`]). Operator operations arrive
//! through [`crate::control`] and become plans too. All writes of `leader`,
//! `epoch` and `sync` are transactions on the revisions read ([`crate::store`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, LeaderKey, ResignOptions};
use meridian_shared::envelope::{AckResult, AgentMsg, CoordMsg};
use meridian_shared::epoch::Epoch;
use meridian_shared::keys::Keys;
use meridian_shared::lsn::Lsn;
use meridian_shared::records::{
    CoordinatorRecord, LeaderRecord, LeaderState, NodeRef, Role, SyncMode, SyncRecord,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::commands::{CommandBook, CommandKind, CommandSpec};
use crate::control::{ClusterEvent, ControlLoopSide, Operation, OperationResult};
use crate::detector::{Detector, DetectorConfig, Hold, SuspectCause, Verdict};
use crate::fanout::{self, Agents, Fanout, FanoutConfig, Out as FanoutOut};
use crate::observe::{self, StatusInput};
use crate::planner::{
    choose_candidate, reconcile_followers, Action, ChoiceContext, FailoverPlan, NoCandidate,
    Observations, PlanKind, Step,
};
use crate::quic::{self, Inbound};
use crate::store::{self, Snapshot, StoreError};
use crate::sync::{desired_standbys, healthy_standbys, SyncStep};

/// Decision loop period.
const TICK: Duration = Duration::from_millis(50);
/// etcd is re-read at least this often while active.
const REFRESH_ACTIVE: Duration = Duration::from_millis(100);
/// ... and while standby.
const REFRESH_STANDBY: Duration = Duration::from_millis(500);
/// The primary is probed at least this often even when not suspect.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A command carried out (`Ok`) whose effect heartbeats do not show yet is sent again after this.
const REDO_AFTER: Duration = Duration::from_secs(5);
/// A candidate that stays unavailable this long before its promotion is replaced.
const REPLAN_AFTER: Duration = Duration::from_secs(1);
/// A switchover whose target does not show the catch-up condition within this
/// time after the fence falls back to the old primary's last reported position.
const CATCH_UP_FALLBACK: Duration = Duration::from_secs(5);
/// Time agents get to reconnect to a newly elected coordinator before silence counts.
const RECONNECT_GRACE: Duration = Duration::from_secs(1);
/// A node with no member key whose agent has been silent this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Repeated events (no candidate, probe holds) are published at most this often.
const EVENT_REPEAT: Duration = Duration::from_secs(5);

/// Everything the loop needs besides its channels.
#[derive(Clone, Debug)]
pub struct Settings {
    pub name: String,
    pub cluster: String,
    /// Value proclaimed in the election.
    pub record: CoordinatorRecord,
    pub election_ttl: Duration,
    pub probe_timeout: Duration,
    pub switchover_drain: Duration,
    pub command_retry: Duration,
}

/// The loop could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("cannot encode the election value: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Resolves once `shutdown` is true (the borrow is not held across an await, so
/// the loop's future stays `Send`).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs the coordinator until `shutdown` turns true: QUIC server on `endpoint`,
/// election and decision loop against `etcd`.
pub async fn run(
    settings: Settings,
    etcd: Client,
    endpoint: quinn::Endpoint,
    control: ControlLoopSide,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let keys = Keys::new(&settings.cluster);
    let (inbound_tx, inbound_rx) = mpsc::channel(4096);
    let (active_tx, active_rx) = watch::channel(false);
    let server = tokio::spawn(quic::serve(endpoint.clone(), active_rx, inbound_tx));
    let mut shell = Shell {
        settings,
        keys,
        etcd,
        control,
        inbound: inbound_rx,
        active_tx,
    };
    let result = shell.terms(&mut shutdown).await;
    endpoint.close(quic::CLOSE_STANDBY.into(), b"standby");
    server.abort();
    result
}

struct Shell {
    settings: Settings,
    keys: Keys,
    etcd: Client,
    control: ControlLoopSide,
    inbound: mpsc::Receiver<Inbound>,
    active_tx: watch::Sender<bool>,
}

enum TermEnd {
    Shutdown,
    LeaseLost,
}

/// Local deadline of the election lease: the send time of the last acknowledged
/// keep-alive plus the TTL (conservative: etcd's own clock started later).
type LeaseDeadline = watch::Receiver<Instant>;

impl Shell {
    async fn terms(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), DaemonError> {
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            match self.term(shutdown).await {
                Ok(TermEnd::Shutdown) => return Ok(()),
                Ok(TermEnd::LeaseLost) => {
                    warn!("election lease lost; stepping down and campaigning again");
                }
                Err(e) => {
                    error!(error = %e, "election term failed; retrying");
                    tokio::select! {
                        () = stopped(shutdown) => return Ok(()),
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
            let _ = self.active_tx.send(false);
        }
    }

    async fn term(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<TermEnd, DaemonError> {
        let ttl_secs = i64::try_from(self.settings.election_ttl.as_secs().max(1)).unwrap_or(2);
        let granted =
            tokio::time::timeout(store::ETCD_TIMEOUT, self.etcd.lease_grant(ttl_secs, None))
                .await
                .map_err(|_| StoreError::Timeout(store::ETCD_TIMEOUT))??;
        let lease = granted.id();
        let ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(2));
        let (deadline_tx, deadline_rx) = watch::channel(Instant::now() + ttl);
        let keeper = tokio::spawn(keep_alive(self.etcd.clone(), lease, ttl, deadline_tx));

        let value = serde_json::to_vec(&self.settings.record)?;
        let mut election = self.etcd.election_client();
        let name = self.keys.coordinator_election();
        let (elected_tx, mut elected_rx) = oneshot::channel();
        let campaign = tokio::spawn(async move {
            let result = election.campaign(name, value, lease).await;
            let _ = elected_tx.send(result);
        });

        let end = self
            .standby_until_elected(shutdown, &mut elected_rx, &deadline_rx)
            .await;
        let end = match end {
            Standby::Elected(key) => {
                info!(coordinator = %self.settings.name, "elected active coordinator");
                let _ = self.active_tx.send(true);
                let end = Active::new(self, &deadline_rx)
                    .run(self, shutdown, &deadline_rx)
                    .await;
                let _ = self.active_tx.send(false);
                if matches!(end, TermEnd::Shutdown) {
                    let mut election = self.etcd.election_client();
                    let _ = tokio::time::timeout(
                        store::ETCD_TIMEOUT,
                        election.resign(Some(ResignOptions::new().with_leader(key))),
                    )
                    .await;
                }
                end
            }
            Standby::Shutdown => TermEnd::Shutdown,
            Standby::LeaseLost => TermEnd::LeaseLost,
            Standby::Failed(e) => {
                campaign.abort();
                keeper.abort();
                return Err(e.into());
            }
        };
        campaign.abort();
        keeper.abort();
        // Revoking deletes the election key at once, so a standby takes over without
        // waiting for the TTL (on lease loss it is gone already).
        let _ = tokio::time::timeout(store::ETCD_TIMEOUT, self.etcd.lease_revoke(lease)).await;
        Ok(end)
    }

    async fn standby_until_elected(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        elected: &mut oneshot::Receiver<Result<etcd_client::CampaignResponse, etcd_client::Error>>,
        deadline: &LeaseDeadline,
    ) -> Standby {
        let mut tick = tokio::time::interval(REFRESH_STANDBY);
        loop {
            tokio::select! {
                () = stopped(shutdown) => return Standby::Shutdown,
                result = &mut *elected => {
                    return match result {
                        Ok(Ok(mut resp)) => match resp.take_leader() {
                            Some(key) => Standby::Elected(key),
                            None => Standby::LeaseLost,
                        },
                        Ok(Err(e)) => Standby::Failed(e),
                        Err(_) => Standby::LeaseLost,
                    };
                }
                Some(msg) = self.inbound.recv() => {
                    // Connections are refused while standby; a late message is dropped.
                    debug!(?msg, "message while standby dropped");
                }
                _ = tick.tick() => {
                    if Instant::now() >= *deadline.borrow() {
                        return Standby::LeaseLost;
                    }
                    self.publish_standby_status().await;
                }
            }
        }
    }

    async fn publish_standby_status(&mut self) {
        let Ok(snap) = store::read_snapshot(&mut self.etcd, &self.keys).await else {
            return;
        };
        let reports = BTreeMap::new();
        let fenced = BTreeSet::new();
        let status = observe::build_status(&StatusInput {
            cluster: &self.settings.cluster,
            coordinator: &self.settings.name,
            active: false,
            leader: snap.leader.as_ref().map(|l| &l.value),
            epoch: snap.epoch,
            config: &snap.config,
            sync: snap.sync.as_ref().map(|s| &s.value),
            members: &snap.members,
            proxies: &snap.proxies,
            reports: &reports,
            fenced: &fenced,
            now: Instant::now(),
        });
        self.control.status.send_replace(status);
    }

    fn event(&self, kind: &str, node: Option<&str>, epoch: Epoch, message: String) {
        info!(kind, node = node.unwrap_or(""), epoch = epoch.0, %message, "cluster event");
        let _ = self.control.events.send(ClusterEvent {
            at_ms: unix_ms(),
            kind: kind.to_string(),
            node: node.map(str::to_string),
            epoch: epoch.0,
            message,
        });
    }
}

enum Standby {
    Elected(LeaderKey),
    Shutdown,
    LeaseLost,
    Failed(etcd_client::Error),
}

/// Keeps `lease` alive, publishing its local deadline; stops when the lease is gone.
async fn keep_alive(client: Client, lease: i64, ttl: Duration, deadline: watch::Sender<Instant>) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let mut client = client;
    let mut keeper = None;
    loop {
        if keeper.is_none() {
            match tokio::time::timeout(period, client.lease_keep_alive(lease)).await {
                Ok(Ok(pair)) => keeper = Some(pair),
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some((k, stream)) = keeper.as_mut() else {
            continue;
        };
        let sent = Instant::now();
        let ok = async {
            k.keep_alive().await.ok()?;
            stream.message().await.ok()?
        };
        match tokio::time::timeout(period, ok).await {
            Ok(Some(resp)) if resp.ttl() > 0 => {
                let _ = deadline
                    .send(sent + Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0)));
            }
            Ok(Some(_)) => {
                // TTL 0: the lease has expired; the term is over.
                let _ = deadline.send(sent);
                return;
            }
            _ => keeper = None,
        }
        tokio::time::sleep(period.saturating_sub(sent.elapsed())).await;
    }
}

/// One agent session.
struct Session {
    id: u64,
    tx: mpsc::UnboundedSender<CoordMsg>,
}

/// A failover or switchover being carried out.
struct PlanRun {
    plan: FailoverPlan,
    reply: Option<oneshot::Sender<OperationResult>>,
    marked_at: Option<Instant>,
    fence_acked_at: Option<Instant>,
    replan_since: Option<Instant>,
    promoted_event: bool,
    waiting_logged: Option<Step>,
}

/// The synchronous set applied on the current primary, as far as this coordinator knows.
#[derive(Clone, Debug)]
struct SyncApplied {
    leader: String,
    epoch: Epoch,
    standbys: BTreeSet<String>,
    /// The primary's position when the setting was acknowledged.
    at_lsn: Lsn,
}

/// State of one active term.
struct Active {
    elected_at: Instant,
    /// The election lease's local deadline: no command goes out after it.
    deadline: LeaseDeadline,
    snap: Snapshot,
    snap_at: Option<Instant>,
    detector: Detector,
    book: CommandBook,
    sessions: BTreeMap<String, Session>,
    plan: Option<PlanRun>,
    probe_tx: mpsc::UnboundedSender<(Instant, bool)>,
    probe_rx: mpsc::UnboundedReceiver<(Instant, bool)>,
    probe_inflight: bool,
    last_probe: Option<Instant>,
    /// Last position each node reported while it was a primary with Postgres up.
    primary_positions: BTreeMap<String, Lsn>,
    fenced: BTreeSet<String>,
    sync_applied: Option<SyncApplied>,
    /// The standby set of each `SetSyncStandbys` value sent (to learn what an ack applied).
    sync_values: BTreeMap<String, BTreeSet<String>>,
    suspect_since: Option<Instant>,
    last_event: BTreeMap<String, Instant>,
    pending_ops: Vec<(Operation, oneshot::Sender<OperationResult>)>,
    /// Invalidation fan-out (issue 4).
    fanout: Fanout,
    /// `cache/<region>` writes to make: (region, usable, reason).
    cache_writes: Vec<(String, bool, String)>,
    /// Regions marked unusable in etcd were handed to `fanout` (first read).
    cache_seeded: bool,
}

impl Active {
    fn new(shell: &Shell, deadline: &LeaseDeadline) -> Self {
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        // Ids unique per process and unlikely to repeat across restarts.
        let first_id = unix_ms().saturating_mul(1000);
        Active {
            elected_at: Instant::now(),
            deadline: deadline.clone(),
            snap: Snapshot::default(),
            snap_at: None,
            detector: Detector::new(DetectorConfig {
                suspect_after: Duration::from_millis(500),
            }),
            book: CommandBook::new(first_id, shell.settings.command_retry),
            sessions: BTreeMap::new(),
            plan: None,
            probe_tx,
            probe_rx,
            probe_inflight: false,
            last_probe: None,
            primary_positions: BTreeMap::new(),
            fenced: BTreeSet::new(),
            sync_applied: None,
            sync_values: BTreeMap::new(),
            suspect_since: None,
            last_event: BTreeMap::new(),
            pending_ops: Vec::new(),
            // Fan-out command ids live far from the command book's.
            fanout: Fanout::new(FanoutConfig::default(), first_id.saturating_add(1 << 40)),
            cache_writes: Vec::new(),
            cache_seeded: false,
        }
    }

    async fn run(
        mut self,
        shell: &mut Shell,
        shutdown: &mut watch::Receiver<bool>,
        deadline: &LeaseDeadline,
    ) -> TermEnd {
        shell.event(
            "elected",
            None,
            Epoch::ZERO,
            format!("{} is the active coordinator", shell.settings.name),
        );
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                () = stopped(shutdown) => break TermEnd::Shutdown,
                Some(msg) = shell.inbound.recv() => self.on_inbound(shell, msg),
                Some(op) = shell.control.operations.recv() => self.pending_ops.push(op),
                Some((at, ok)) = self.probe_rx.recv() => {
                    self.probe_inflight = false;
                    self.detector.observe_probe(at, ok);
                }
                _ = tick.tick() => {
                    if Instant::now() >= *deadline.borrow() {
                        break TermEnd::LeaseLost;
                    }
                    self.on_tick(shell).await;
                }
            }
        };
        let why = match end {
            TermEnd::Shutdown => "shutting down",
            TermEnd::LeaseLost => "election lease lost",
        };
        if let Some(run) = self.plan.take() {
            if let Some(reply) = run.reply {
                let _ = reply.send(Err(format!(
                    "coordinator stepped down ({why}); another coordinator resumes the operation"
                )));
            }
        }
        for (_, reply) in self.pending_ops.drain(..) {
            let _ = reply.send(Err(format!("coordinator stepped down ({why})")));
        }
        shell.event(
            "stepped_down",
            None,
            self.snap.current_epoch(),
            why.to_string(),
        );
        end
    }

    fn send(&self, node: &str, msg: CoordMsg) {
        if Instant::now() >= *self.deadline.borrow() {
            // The lease may be gone and another coordinator in charge.
            debug!(node, ?msg, "command dropped: election lease expired");
            return;
        }
        match self.sessions.get(node) {
            Some(session) => {
                debug!(node, ?msg, "command");
                let _ = session.tx.send(msg);
            }
            None => debug!(node, ?msg, "command queued; agent not connected"),
        }
    }

    fn ensure(&mut self, node: &str, spec: CommandSpec, redo_after: Duration) -> bool {
        match self.book.ensure(node, spec, Instant::now(), redo_after) {
            Some(msg) => {
                self.send(node, msg);
                true
            }
            None => false,
        }
    }

    fn on_inbound(&mut self, shell: &Shell, msg: Inbound) {
        match msg {
            Inbound::Connected {
                node, session, tx, ..
            } => {
                self.sessions
                    .insert(node.clone(), Session { id: session, tx });
                for msg in self.book.pending_for(&node, Instant::now()) {
                    self.send(&node, msg);
                }
            }
            Inbound::Disconnected { node, session } => {
                if self.sessions.get(&node).is_some_and(|s| s.id == session) {
                    self.sessions.remove(&node);
                }
            }
            Inbound::Message {
                node,
                session,
                msg,
                at,
            } => {
                if self.sessions.get(&node).is_none_or(|s| s.id != session) {
                    return; // an older, replaced session
                }
                match msg {
                    AgentMsg::Hello { .. } => {}
                    AgentMsg::Heartbeat(hb) => {
                        if hb.node != node {
                            warn!(session_node = %node, heartbeat_node = %hb.node, "heartbeat names another node; ignored");
                            return;
                        }
                        if hb.pg_up {
                            self.fenced.remove(&node);
                            if hb.role == Role::Primary {
                                if let Some(pos) = hb.position() {
                                    self.primary_positions.insert(node.clone(), pos);
                                }
                            }
                        }
                        self.detector.observe_heartbeat(at, hb);
                    }
                    AgentMsg::Ack { id, result } => self.on_ack(shell, &node, id, result),
                    AgentMsg::Changes {
                        batch_id,
                        tables,
                        commit_lsn,
                    } => self.on_changes(shell, &node, batch_id, tables, commit_lsn),
                }
            }
        }
    }

    fn on_ack(&mut self, shell: &Shell, node: &str, id: u64, result: AckResult) {
        let now = Instant::now();
        let Some(spec) = self.book.ack(node, id, result.clone(), now) else {
            let agents = self.agents();
            let outs = self.fanout.on_ack(node, id, &result, &agents, now);
            self.apply_fanout(shell, outs);
            return;
        };
        let epoch = spec.epoch();
        match (&spec, &result) {
            (CommandSpec::Fence { .. }, AckResult::Ok) => {
                self.fenced.insert(node.to_string());
                if let Some(run) = self.plan.as_mut() {
                    if run.plan.old.node == node
                        && epoch >= run.plan.epoch
                        && run.fence_acked_at.is_none()
                    {
                        run.fence_acked_at = Some(now);
                    }
                }
                shell.event(
                    "fenced",
                    Some(node),
                    epoch,
                    "agent confirmed Fence: Postgres stopped".into(),
                );
            }
            (CommandSpec::SetSyncStandbys { value, .. }, AckResult::Ok) => {
                if let Some(leader) = self.snap.leader.as_ref().map(|l| &l.value) {
                    if leader.node == node {
                        let standbys = self.sync_values.get(value).cloned().unwrap_or_default();
                        let at_lsn = self
                            .primary_positions
                            .get(node)
                            .copied()
                            .unwrap_or(Lsn::ZERO);
                        self.sync_applied = Some(SyncApplied {
                            leader: node.to_string(),
                            epoch,
                            standbys,
                            at_lsn,
                        });
                    }
                }
            }
            (_, AckResult::Ok) => {}
            (_, AckResult::Stale { current }) => {
                warn!(
                    node,
                    ?spec,
                    current = current.0,
                    "agent refused a stale command"
                );
                self.snap_at = None;
            }
            (_, AckResult::Failed { message }) => {
                shell.event(
                    "error",
                    Some(node),
                    epoch,
                    format!("{:?} failed: {message}", spec.kind()),
                );
            }
        }
    }
}

impl Active {
    // ---------- invalidation fan-out (issue 4) ----------

    /// Healthy connected agents per region.
    fn agents(&self) -> Agents {
        let fresh = self.snap.config.suspect_after;
        fanout::agents_view(
            self.snap
                .members
                .iter()
                .map(|(n, m)| (n.as_str(), m.region.as_str())),
            self.detector
                .reports()
                .iter()
                .map(|(n, r)| (n.as_str(), r.heartbeat.region.as_str(), r.received_at)),
            |n| self.sessions.contains_key(n),
            Instant::now(),
            fresh,
        )
    }

    fn on_changes(
        &mut self,
        shell: &Shell,
        node: &str,
        batch_id: u64,
        tables: Vec<String>,
        commit_lsn: Lsn,
    ) {
        let Some(leader) = self.snap.leader.as_ref().map(|l| &l.value) else {
            return;
        };
        if leader.node != node || leader.state != LeaderState::Serving {
            debug!(
                node,
                batch_id, "changes from a node that is not the serving leader; ignored"
            );
            return;
        }
        let epoch = leader.epoch;
        let agents = self.agents();
        let batch = fanout::ChangesBatch {
            batch_id,
            tables,
            lsn: commit_lsn,
            epoch,
        };
        let outs = self.fanout.on_changes(node, batch, &agents, Instant::now());
        self.apply_fanout(shell, outs);
    }

    fn apply_fanout(&mut self, shell: &Shell, outs: Vec<FanoutOut>) {
        let epoch = self.snap.current_epoch();
        for out in outs {
            match out {
                FanoutOut::Send { node, msg } => self.send(&node, msg),
                FanoutOut::AckPrimary { node, batch_id } => {
                    self.send(&node, CoordMsg::Ack { batch_id })
                }
                FanoutOut::MarkUnusable { region, reason } => {
                    shell.event(
                        "cache_unusable",
                        None,
                        epoch,
                        format!("region {region}: cache marked unusable: {reason}"),
                    );
                    self.cache_writes.push((region, false, reason));
                }
                FanoutOut::MarkUsable { region } => {
                    shell.event(
                        "cache_usable",
                        None,
                        epoch,
                        format!("region {region}: cache caught up and usable again"),
                    );
                    self.cache_writes.push((region, true, String::new()));
                }
            }
        }
    }

    async fn fanout_tick(&mut self, shell: &mut Shell) {
        let now = Instant::now();
        if !self.cache_seeded {
            self.cache_seeded = true;
            for (region, rec) in &self.snap.cache_regions {
                if !rec.usable {
                    self.fanout.seed_unusable(region);
                }
            }
        }
        let agents = self.agents();
        let mut outs = self.fanout.tick(&agents, now);
        if let Some(leader) = self.snap.leader.as_ref().map(|l| &l.value) {
            if leader.state == LeaderState::Serving
                && self.fanout.flush_epoch().is_none_or(|e| e < leader.epoch)
            {
                outs.extend(self.fanout.start_flush(leader.epoch, &agents, now));
            }
        }
        self.apply_fanout(shell, outs);
        for (region, usable, reason) in std::mem::take(&mut self.cache_writes) {
            let record = meridian_shared::cache_keys::CacheRegionRecord {
                usable,
                since: unix_ms(),
            };
            match store::write_cache_region(
                &mut shell.etcd,
                &shell.keys,
                &self.snap,
                &region,
                &record,
            )
            .await
            {
                Ok(true) => {
                    if !usable {
                        let outs = self.fanout.unusable_recorded(&region, Instant::now());
                        self.apply_fanout(shell, outs);
                    }
                }
                Ok(false) => {
                    self.snap_at = None;
                    self.cache_writes.push((region, usable, reason));
                }
                Err(e) => {
                    warn!(%region, error = %e, "cannot write the region's cache state");
                    self.cache_writes.push((region, usable, reason));
                }
            }
        }
    }

    fn event(&self, shell: &Shell, kind: &str, node: Option<&str>, epoch: Epoch, message: String) {
        shell.event(kind, node, epoch, message);
    }

    /// Publishes an event unless one with the same `key` went out within [`EVENT_REPEAT`].
    fn event_limited(
        &mut self,
        shell: &Shell,
        key: &str,
        kind: &str,
        node: Option<&str>,
        epoch: Epoch,
        message: String,
    ) {
        let now = Instant::now();
        if self
            .last_event
            .get(key)
            .is_some_and(|t| now.saturating_duration_since(*t) < EVENT_REPEAT)
        {
            return;
        }
        self.last_event.insert(key.to_string(), now);
        shell.event(kind, node, epoch, message);
    }

    async fn refresh(&mut self, shell: &mut Shell) {
        match store::read_snapshot(&mut shell.etcd, &shell.keys).await {
            Ok(snap) => {
                if self.snap_at.is_some() && snap.config.paused != self.snap.config.paused {
                    let (kind, what) = if snap.config.paused {
                        ("paused", "automatic failover paused")
                    } else {
                        ("resumed", "automatic failover resumed")
                    };
                    shell.event(kind, None, snap.current_epoch(), what.to_string());
                }
                if snap.problems != self.snap.problems {
                    for problem in &snap.problems {
                        warn!(%problem, "undecodable record in etcd");
                    }
                }
                self.snap = snap;
                let now = Instant::now();
                self.snap_at = Some(now);
                // Forget nodes that left: no member key and silent for a long time.
                let gone: Vec<String> = self
                    .detector
                    .reports()
                    .iter()
                    .filter(|(name, r)| {
                        !self.snap.members.contains_key(*name)
                            && now.saturating_duration_since(r.received_at) >= FORGET_AFTER
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in gone {
                    self.detector.forget(&name);
                    self.fenced.remove(&name);
                }
            }
            Err(e) => {
                let epoch = self.snap.current_epoch();
                self.event_limited(
                    shell,
                    "etcd",
                    "error",
                    None,
                    epoch,
                    format!("cannot read etcd: {e}"),
                );
            }
        }
    }

    async fn on_tick(&mut self, shell: &mut Shell) {
        let now = Instant::now();
        if self
            .snap_at
            .is_none_or(|t| now.saturating_duration_since(t) >= REFRESH_ACTIVE)
        {
            self.refresh(shell).await;
        }
        if self.snap_at.is_none() {
            return; // nothing read from etcd yet: decide nothing
        }
        self.detector
            .set_config(DetectorConfig::from(&self.snap.config));
        for (node, msg) in self.book.due(now) {
            self.send(&node, msg);
        }
        self.fanout_tick(shell).await;
        for (op, reply) in std::mem::take(&mut self.pending_ops) {
            self.start_operation(shell, op, reply);
        }
        match self.snap.leader.clone().map(|l| l.value) {
            None => self.bootstrap(shell).await,
            Some(_) if self.plan.is_some() => self.advance_plan(shell).await,
            Some(leader) if leader.state == LeaderState::FailingOver => {
                self.resume(shell, &leader);
                self.advance_plan(shell).await;
            }
            Some(leader) => self.steady(shell, &leader).await,
        }
        self.publish_status(shell);
    }

    fn publish_status(&self, shell: &Shell) {
        let status = observe::build_status(&StatusInput {
            cluster: &shell.settings.cluster,
            coordinator: &shell.settings.name,
            active: true,
            leader: self.snap.leader.as_ref().map(|l| &l.value),
            epoch: self.snap.epoch,
            config: &self.snap.config,
            sync: self.snap.sync.as_ref().map(|s| &s.value),
            members: &self.snap.members,
            proxies: &self.snap.proxies,
            reports: self.detector.reports(),
            fenced: &self.fenced,
            now: Instant::now(),
        });
        let mut status = status;
        status.cache_unusable = self
            .snap
            .cache_regions
            .iter()
            .filter(|(_, r)| !r.usable)
            .map(|(region, _)| region.clone())
            .collect();
        shell.control.status.send_replace(status);
    }

    // ---------- bootstrap ----------

    async fn bootstrap(&mut self, shell: &mut Shell) {
        let now = Instant::now();
        let suspect_after = self.snap.config.suspect_after;
        let Some((node, timeline)) = observe::bootstrap_choice(
            &self.snap.members,
            self.detector.reports(),
            now,
            suspect_after,
        ) else {
            return;
        };
        let Some(member) = self.snap.members.get(&node) else {
            return;
        };
        let epoch = self.snap.epoch.next();
        let record = LeaderRecord {
            node: node.clone(),
            region: member.region.clone(),
            pg_addr: member.pg_addr.clone(),
            epoch,
            timeline,
            state: LeaderState::Serving,
            since: unix_ms(),
            candidate: None,
        };
        match store::write_epoch_and_leader(
            &mut shell.etcd,
            &shell.keys,
            &self.snap,
            epoch,
            &record,
        )
        .await
        {
            Ok(true) => {
                self.event(
                    shell,
                    "leader_published",
                    Some(&node),
                    epoch,
                    "bootstrap: first leader".into(),
                );
                self.ensure(&node, CommandSpec::Promote { epoch }, REDO_AFTER);
            }
            Ok(false) => debug!("bootstrap txn lost a race; re-reading"),
            Err(e) => warn!(error = %e, "bootstrap txn failed"),
        }
        self.refresh(shell).await;
    }

    // ---------- steady state ----------

    async fn steady(&mut self, shell: &mut Shell, leader: &LeaderRecord) {
        let now = Instant::now();
        // Right after an election the agents are still reconnecting (backoff up to
        // 1 s): watch a primary not heard from yet as if heard at the end of that.
        let watch_from = now.max(self.elected_at + RECONNECT_GRACE);
        self.detector
            .set_primary(&leader.node, &leader.pg_addr, watch_from);
        let eval = self.detector.evaluate(now);
        let suspect = matches!(
            eval.primary,
            Verdict::Suspect { .. } | Verdict::Failed { .. }
        );
        if !self.probe_inflight
            && (suspect
                || self
                    .last_probe
                    .is_none_or(|t| now.saturating_duration_since(t) >= PROBE_EVERY))
        {
            self.start_probe(&leader.pg_addr, shell.settings.probe_timeout);
        }
        match &eval.primary {
            Verdict::Healthy | Verdict::NoPrimary => self.suspect_since = None,
            Verdict::Suspect { cause, since, hold } => {
                if self.suspect_since != Some(*since) {
                    self.suspect_since = Some(*since);
                    self.event(
                        shell,
                        "suspect",
                        Some(&leader.node),
                        leader.epoch,
                        format!("{cause:?}"),
                    );
                }
                if let Hold::ProbeOk | Hold::ReplicaStreaming { .. } | Hold::NoWitness = hold {
                    let key = format!("hold:{}", leader.node);
                    self.event_limited(
                        shell,
                        &key,
                        "suspect_held",
                        Some(&leader.node),
                        leader.epoch,
                        format!("not failing over: {hold:?}"),
                    );
                }
                // Postgres crashed under a live agent and no other node is there to
                // take over (no replica heartbeats): restart it as the primary.
                let down_long_enough =
                    now.saturating_duration_since(*since) >= self.snap.config.suspect_after;
                if *cause == SuspectCause::PgDown
                    && *hold == Hold::NoWitness
                    && down_long_enough
                    && !self.snap.config.paused
                {
                    self.restart_old_primary(leader, now);
                }
            }
            Verdict::Failed { reason, .. } => {
                let grace = self.snap.config.suspect_after + Duration::from_secs(1);
                if self.snap.config.paused {
                    let key = format!("paused:{}", leader.node);
                    self.event_limited(
                        shell,
                        &key,
                        "failover_paused",
                        Some(&leader.node),
                        leader.epoch,
                        format!("primary failed ({reason:?}) but automatic failover is paused"),
                    );
                } else if now.saturating_duration_since(self.elected_at) < grace {
                    debug!("primary looks failed; still within the election grace period");
                } else {
                    match self.choose(leader, None, false) {
                        Ok(candidate) => {
                            info!(old = %leader.node, candidate = %candidate.node.node, ?reason, "primary failed; failing over");
                            self.plan = Some(PlanRun::new(
                                FailoverPlan::new(
                                    PlanKind::Failover,
                                    self.snap.current_epoch(),
                                    node_ref(leader),
                                    leader.timeline,
                                    candidate.node,
                                ),
                                None,
                            ));
                            self.advance_plan(shell).await;
                            return;
                        }
                        Err(e) => {
                            let key = format!("nocand:{}", leader.node);
                            self.event_limited(
                                shell,
                                &key,
                                "no_candidate",
                                Some(&leader.node),
                                leader.epoch,
                                e.to_string(),
                            );
                            self.restart_old_primary(leader, now);
                        }
                    }
                }
            }
        }

        // The leader records its epoch (bootstrap's Promote{1}, re-sent if lost).
        if let Some(report) = self.detector.reports().get(&leader.node) {
            let hb = &report.heartbeat;
            if report.is_fresh(now, self.snap.config.suspect_after)
                && hb.pg_up
                && hb.role == Role::Primary
                && hb.epoch_seen < leader.epoch
            {
                self.ensure(
                    &leader.node,
                    CommandSpec::Promote {
                        epoch: leader.epoch,
                    },
                    REDO_AFTER,
                );
            }
        }

        let nodes = observe::node_observations(
            &self.snap.members,
            self.detector.reports(),
            now,
            self.snap.config.suspect_after,
        );
        if let Some(Action::SendFollow {
            nodes,
            leader: to,
            pg_addr,
            epoch,
        }) = reconcile_followers(leader, &nodes)
        {
            self.send_follows(shell, &nodes, &to, &pg_addr, epoch);
        }
        self.manage_sync(shell, leader).await;
    }

    /// Nobody can be promoted and the old primary's Postgres is down under a live
    /// agent: ask it to start Postgres again as the primary of the current epoch.
    fn restart_old_primary(&mut self, leader: &LeaderRecord, now: Instant) {
        if let Some(report) = self.detector.reports().get(&leader.node) {
            if report.is_fresh(now, self.snap.config.suspect_after) && !report.heartbeat.pg_up {
                self.ensure(
                    &leader.node,
                    CommandSpec::Promote {
                        epoch: leader.epoch,
                    },
                    REDO_AFTER,
                );
            }
        }
    }

    fn send_follows(
        &mut self,
        shell: &Shell,
        nodes: &[String],
        leader: &str,
        pg_addr: &str,
        epoch: Epoch,
    ) {
        for node in nodes {
            let spec = CommandSpec::Follow {
                leader: leader.to_string(),
                pg_addr: pg_addr.to_string(),
                epoch,
            };
            if self.ensure(node, spec, REDO_AFTER) {
                self.event(
                    shell,
                    "follow",
                    Some(node),
                    epoch,
                    format!("told to follow {leader} at {pg_addr}"),
                );
            }
        }
    }

    fn start_probe(&mut self, pg_addr: &str, timeout: Duration) {
        let at = Instant::now();
        self.probe_inflight = true;
        self.last_probe = Some(at);
        let tx = self.probe_tx.clone();
        let addr = pg_addr.to_string();
        tokio::spawn(async move {
            let ok = crate::probe::probe(&addr, timeout).await;
            let _ = tx.send((at, ok));
        });
    }

    // ---------- synchronous replication ----------

    async fn manage_sync(&mut self, shell: &mut Shell, leader: &LeaderRecord) {
        let now = Instant::now();
        let config = self.snap.config.clone();
        let reports = self.detector.reports();
        let primary_ok = reports.get(&leader.node).is_some_and(|r| {
            r.is_fresh(now, config.suspect_after)
                && r.heartbeat.pg_up
                && r.heartbeat.role == Role::Primary
        });
        if !primary_ok {
            return;
        }
        let sync_record = self.snap.sync.as_ref().map(|s| &s.value);
        let recorded = observe::recorded_standbys(sync_record, &leader.node);
        let applied = self
            .sync_applied
            .as_ref()
            .filter(|a| a.leader == leader.node && a.epoch == leader.epoch);
        if config.sync_mode == SyncMode::Off && recorded.is_empty() && applied.is_none() {
            return; // asynchronous and nothing ever made synchronous
        }
        let healthy = healthy_standbys(
            &leader.node,
            &leader.pg_addr,
            &self.snap.members,
            reports,
            &config,
            now,
        );
        let current = applied.map(|a| a.standbys.clone()).unwrap_or_default();
        let fallback: BTreeSet<String> = self
            .snap
            .members
            .iter()
            .filter(|(name, m)| name.as_str() != leader.node && !m.tags.nosync)
            .map(|(name, _)| name.clone())
            .collect();
        let desired = desired_standbys(config.sync_mode, &healthy, &current, &fallback);
        let caught_up = desired.is_empty()
            || applied.is_some_and(|a| {
                desired.iter().any(|n| {
                    reports
                        .get(n)
                        .and_then(|r| r.heartbeat.flush_lsn.or(r.heartbeat.receive_lsn))
                        .is_some_and(|pos| pos >= a.at_lsn)
                })
            });
        let step = observe::sync_step(&recorded, applied.map(|a| &a.standbys), &desired, caught_up);
        let record_is_current =
            sync_record.is_some_and(|s| s.leader == leader.node && s.epoch == leader.epoch);
        let write = match step {
            SyncStep::Record(set) => Some(set),
            SyncStep::InSync if !record_is_current && config.sync_mode != SyncMode::Off => {
                Some(desired)
            }
            SyncStep::Apply { standbys, value } => {
                self.sync_values.insert(value.clone(), standbys);
                let spec = CommandSpec::SetSyncStandbys {
                    value,
                    epoch: leader.epoch,
                };
                self.ensure(&leader.node, spec, REDO_AFTER);
                None
            }
            SyncStep::InSync | SyncStep::WaitCatchUp => None,
        };
        if let Some(standbys) = write {
            let record = SyncRecord {
                leader: leader.node.clone(),
                epoch: leader.epoch,
                standbys,
            };
            match store::write_sync(&mut shell.etcd, &shell.keys, &self.snap, &record).await {
                Ok(true) => debug!(?record, "sync record written"),
                Ok(false) => debug!("sync txn lost a race; re-reading"),
                Err(e) => warn!(error = %e, "cannot write the sync record"),
            }
            self.refresh(shell).await;
        }
    }

    // ---------- operations and plans ----------

    fn choose(
        &self,
        old: &LeaderRecord,
        forced: Option<&str>,
        ignore_nofailover: bool,
    ) -> Result<crate::planner::Candidate, NoCandidate> {
        let mut members = self.snap.members.clone();
        if let (Some(target), true) = (forced, ignore_nofailover) {
            if let Some(m) = members.get_mut(target) {
                m.tags.nofailover = false;
            }
        }
        let sync_set = self.snap.sync.as_ref().map(|s| s.value.standbys.clone());
        let ctx = ChoiceContext {
            now: Instant::now(),
            old_primary: &old.node,
            primary_lsn: self.primary_positions.get(&old.node).copied(),
            // Replicas' reported timelines may lag (e.g. read from the last
            // restartpoint); streaming state and positions decide instead.
            timeline: None,
            sync_standbys: sync_set.as_ref(),
        };
        choose_candidate(
            &members,
            self.detector.reports(),
            &self.snap.config,
            &ctx,
            forced,
        )
    }

    /// Whether promoting `node` keeps the synchronous-mode guarantee (always true
    /// when asynchronous or no set is recorded).
    fn in_sync_set(&self, node: &str) -> bool {
        let recorded = self.snap.sync.as_ref().map(|s| &s.value.standbys);
        self.snap.config.sync_mode == SyncMode::Off
            || recorded.is_none_or(|set| set.is_empty() || set.contains(node))
    }

    fn start_operation(
        &mut self,
        shell: &Shell,
        op: Operation,
        reply: oneshot::Sender<OperationResult>,
    ) {
        let refuse = |reply: oneshot::Sender<OperationResult>, why: String| {
            let _ = reply.send(Err(why));
        };
        if self.plan.is_some() {
            return refuse(
                reply,
                "a failover or switchover is already in progress".into(),
            );
        }
        let Some(leader) = self.snap.leader.as_ref().map(|l| l.value.clone()) else {
            return refuse(reply, "no leader yet (cluster not bootstrapped)".into());
        };
        if !leader.is_serving() {
            return refuse(reply, "a failover is in progress".into());
        }
        let now = Instant::now();
        let (kind, candidate) = match &op {
            Operation::Switchover { to } => {
                let old_reachable = self.detector.reports().get(&leader.node).is_some_and(|r| {
                    r.is_fresh(now, self.snap.config.suspect_after) && r.heartbeat.pg_up
                });
                if !old_reachable {
                    return refuse(
                        reply,
                        format!(
                            "the primary {} is not reporting healthy; use failover",
                            leader.node
                        ),
                    );
                }
                if to.as_deref() == Some(leader.node.as_str()) {
                    return refuse(reply, format!("{} is already the primary", leader.node));
                }
                (
                    PlanKind::Switchover,
                    self.choose(&leader, to.as_deref(), false),
                )
            }
            Operation::Failover { to, force } => {
                if *to == leader.node {
                    return refuse(reply, format!("{to} is already the primary"));
                }
                let chosen = self.choose(&leader, Some(to), *force);
                let chosen = match chosen {
                    Ok(c) if !force && c.lag_bytes > self.snap.config.max_failover_lag => {
                        return refuse(reply, format!(
                            "{to} is {} bytes behind (max_failover_lag {}); use --force to accept the loss",
                            c.lag_bytes, self.snap.config.max_failover_lag
                        ));
                    }
                    Ok(c) if !force && !self.in_sync_set(&c.node.node) => {
                        return refuse(reply, format!(
                            "{to} is not a synchronous standby (sync_mode is on); use --force to accept the loss"
                        ));
                    }
                    other => other,
                };
                (PlanKind::Failover, chosen)
            }
        };
        match candidate {
            Ok(candidate) => {
                info!(?op, candidate = %candidate.node.node, "operation accepted");
                self.plan = Some(PlanRun::new(
                    FailoverPlan::new(
                        kind,
                        self.snap.current_epoch(),
                        node_ref(&leader),
                        leader.timeline,
                        candidate.node,
                    ),
                    Some(reply),
                ));
            }
            Err(e) => {
                self.event(shell, "no_candidate", None, leader.epoch, e.to_string());
                refuse(reply, e.to_string())
            }
        }
    }

    fn resume(&mut self, shell: &Shell, leader: &LeaderRecord) {
        match FailoverPlan::resume(leader) {
            Ok(plan) => {
                self.event(
                    shell,
                    "failover_resumed",
                    Some(&plan.candidate.node),
                    plan.epoch,
                    format!(
                        "resuming the failover from {} to {}",
                        plan.old.node, plan.candidate.node
                    ),
                );
                let mut run = PlanRun::new(plan, None);
                run.marked_at = Some(Instant::now());
                self.plan = Some(run);
            }
            Err(e) => {
                // No candidate recorded: choose one and start over with a new epoch.
                match self.choose(leader, None, false) {
                    Ok(candidate) => {
                        self.event(
                            shell,
                            "failover_resumed",
                            Some(&candidate.node.node),
                            leader.epoch,
                            format!("{e}; chose {}", candidate.node.node),
                        );
                        self.plan = Some(PlanRun::new(
                            FailoverPlan::new(
                                PlanKind::Failover,
                                self.snap.current_epoch(),
                                node_ref(leader),
                                leader.timeline,
                                candidate.node,
                            ),
                            None,
                        ));
                    }
                    Err(no) => {
                        let key = format!("nocand:{}", leader.node);
                        self.event_limited(
                            shell,
                            &key,
                            "no_candidate",
                            Some(&leader.node),
                            leader.epoch,
                            no.to_string(),
                        );
                    }
                }
            }
        }
    }

    fn observations(&self, run: &PlanRun, now: Instant) -> Observations {
        let plan = &run.plan;
        let reports = self.detector.reports();
        let old_final_lsn = match (plan.kind, run.fence_acked_at) {
            (PlanKind::Switchover, Some(acked_at)) => {
                let target = self.primary_positions.get(&plan.old.node).copied();
                let cand = reports.get(&plan.candidate.node);
                if cand.is_some_and(|c| observe::caught_up_after_fence(c, acked_at)) {
                    target.or(cand.and_then(|c| c.heartbeat.position()))
                } else if now.saturating_duration_since(acked_at) >= CATCH_UP_FALLBACK {
                    Some(target.unwrap_or(Lsn::ZERO))
                } else {
                    None
                }
            }
            _ => None,
        };
        Observations {
            now_ms: unix_ms(),
            stored_epoch: self.snap.epoch,
            leader: self.snap.leader.as_ref().map(|l| l.value.clone()),
            fence_acked: self
                .book
                .acked_ok(&plan.old.node, CommandKind::Fence, plan.epoch),
            old_lease_alive: self.snap.members.contains_key(&plan.old.node),
            old_final_lsn,
            nodes: observe::node_observations(
                &self.snap.members,
                reports,
                now,
                self.snap.config.suspect_after,
            ),
        }
    }

    async fn advance_plan(&mut self, shell: &mut Shell) {
        let Some(mut run) = self.plan.take() else {
            return;
        };
        let now = Instant::now();
        if run.fence_acked_at.is_none()
            && self
                .book
                .acked_ok(&run.plan.old.node, CommandKind::Fence, run.plan.epoch)
        {
            run.fence_acked_at = Some(now);
        }
        let obs = self.observations(&run, now);
        let action = run.plan.advance(&obs);
        if run.plan.step >= Step::PublishLeader && !run.promoted_event {
            run.promoted_event = true;
            self.event(
                shell,
                "promoted",
                Some(&run.plan.candidate.node),
                run.plan.epoch,
                "candidate runs as primary".into(),
            );
        }
        if !matches!(action, Action::Replan { .. }) {
            run.replan_since = None;
        }
        let epoch = run.plan.epoch;
        match action {
            Action::WriteLeaderFailingOver { epoch, record } => {
                match store::write_epoch_and_leader(
                    &mut shell.etcd,
                    &shell.keys,
                    &self.snap,
                    epoch,
                    &record,
                )
                .await
                {
                    Ok(true) => {
                        run.marked_at = Some(now);
                        let kind = match run.plan.kind {
                            PlanKind::Switchover => "switchover_started",
                            PlanKind::Failover => "failover_started",
                        };
                        self.event(
                            shell,
                            kind,
                            Some(&run.plan.candidate.node),
                            epoch,
                            format!("{} -> {}", run.plan.old.node, run.plan.candidate.node),
                        );
                    }
                    Ok(false) => debug!("failing_over txn lost a race; re-reading"),
                    Err(e) => warn!(error = %e, "cannot write failing_over"),
                }
                self.refresh(shell).await;
            }
            Action::SendFence { node, epoch } => {
                let marked = *run.marked_at.get_or_insert(now);
                let drained = run.plan.kind != PlanKind::Switchover
                    || now.saturating_duration_since(marked) >= shell.settings.switchover_drain;
                if drained {
                    self.ensure(&node, CommandSpec::Fence { epoch }, REDO_AFTER);
                }
            }
            Action::WaitLeaseExpiry { node } => {
                if run.waiting_logged != Some(Step::AwaitFence) {
                    run.waiting_logged = Some(Step::AwaitFence);
                    info!(
                        node,
                        "old primary unreachable; waiting for its lease to expire"
                    );
                }
            }
            Action::AwaitCatchUp { node, target } => {
                if run.waiting_logged != Some(Step::Promote) {
                    run.waiting_logged = Some(Step::Promote);
                    info!(
                        node,
                        ?target,
                        "waiting for the switchover target to catch up"
                    );
                }
            }
            Action::SendPromote { node, epoch } => {
                if self.ensure(&node, CommandSpec::Promote { epoch }, REDO_AFTER) {
                    info!(node, epoch = epoch.0, "promote sent");
                }
            }
            Action::PublishLeader { record } => {
                match store::write_leader(&mut shell.etcd, &shell.keys, &self.snap, &record).await {
                    Ok(true) => {
                        self.event(
                            shell,
                            "leader_published",
                            Some(&record.node),
                            record.epoch,
                            format!(
                                "{} serves epoch {} on timeline {}",
                                record.node, record.epoch, record.timeline
                            ),
                        );
                    }
                    Ok(false) => debug!("publish txn lost a race; re-reading"),
                    Err(e) => warn!(error = %e, "cannot publish the leader"),
                }
                self.refresh(shell).await;
            }
            Action::SendFollow {
                nodes,
                leader,
                pg_addr,
                epoch,
            } => {
                self.send_follows(shell, &nodes, &leader, &pg_addr, epoch);
                // The steady-state reconciler keeps re-pointing stragglers.
                self.finish(
                    shell,
                    run,
                    Ok(format!("{leader} is the primary of epoch {epoch}")),
                );
                return;
            }
            Action::Done => {
                let msg = format!(
                    "{} is the primary of epoch {epoch}",
                    run.plan.candidate.node
                );
                self.finish(shell, run, Ok(msg));
                return;
            }
            Action::Replan { lost } => {
                let since = *run.replan_since.get_or_insert(now);
                // A newly elected coordinator first gives the agents time to reconnect.
                let grace = self.snap.config.suspect_after + Duration::from_secs(1);
                if now.saturating_duration_since(since) >= REPLAN_AFTER
                    && now.saturating_duration_since(self.elected_at) >= grace
                {
                    if let Some(leader) = self.snap.leader.as_ref().map(|l| l.value.clone()) {
                        let old = LeaderRecord {
                            node: run.plan.old.node.clone(),
                            region: run.plan.old.region.clone(),
                            pg_addr: run.plan.old.pg_addr.clone(),
                            ..leader
                        };
                        match self.choose(&old, None, false) {
                            Ok(candidate) if candidate.node.node != lost => {
                                self.event(
                                    shell,
                                    "replan",
                                    Some(&candidate.node.node),
                                    epoch.next(),
                                    format!(
                                        "candidate {lost} became unavailable; promoting {} instead",
                                        candidate.node.node
                                    ),
                                );
                                self.book.cancel(&lost, CommandKind::Promote);
                                run.plan = FailoverPlan::new(
                                    run.plan.kind,
                                    epoch,
                                    run.plan.old.clone(),
                                    run.plan.old_timeline,
                                    candidate.node,
                                );
                                run.replan_since = None;
                                run.promoted_event = false;
                                run.fence_acked_at = None;
                            }
                            _ => {
                                let key = format!("replan:{lost}");
                                self.event_limited(
                                    shell,
                                    &key,
                                    "no_candidate",
                                    Some(&lost),
                                    epoch,
                                    format!("candidate {lost} unavailable and no other candidate"),
                                );
                            }
                        }
                    }
                }
            }
            Action::Abandon(reason) => {
                self.event(
                    shell,
                    "error",
                    Some(&run.plan.candidate.node),
                    epoch,
                    format!("plan abandoned: {reason:?}"),
                );
                self.snap_at = None;
                self.finish(shell, run, Err(format!("abandoned: {reason:?}")));
                return;
            }
        }
        self.plan = Some(run);
    }

    fn finish(&mut self, shell: &Shell, run: PlanRun, result: OperationResult) {
        if result.is_ok() {
            self.event(
                shell,
                "failover_done",
                Some(&run.plan.candidate.node),
                run.plan.epoch,
                format!("{} replaced {}", run.plan.candidate.node, run.plan.old.node),
            );
        }
        self.suspect_since = None;
        self.sync_applied = None;
        if let Some(reply) = run.reply {
            let _ = reply.send(result);
        }
    }
}

impl PlanRun {
    fn new(plan: FailoverPlan, reply: Option<oneshot::Sender<OperationResult>>) -> Self {
        PlanRun {
            plan,
            reply,
            marked_at: None,
            fence_acked_at: None,
            replan_since: None,
            promoted_event: false,
            waiting_logged: None,
        }
    }
}

fn node_ref(leader: &LeaderRecord) -> NodeRef {
    NodeRef {
        node: leader.node.clone(),
        region: leader.region.clone(),
        pg_addr: leader.pg_addr.clone(),
    }
}

/// `0.0.0.0:P` / `[::]:P` → `127.0.0.1:P`, for the default advertised address.
pub fn advertise_default(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", listen.port())
    } else {
        listen.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_address_replaces_the_wildcard() {
        assert_eq!(
            advertise_default("0.0.0.0:7400".parse().unwrap()),
            "127.0.0.1:7400"
        );
        assert_eq!(
            advertise_default("[::]:7400".parse().unwrap()),
            "127.0.0.1:7400"
        );
        assert_eq!(
            advertise_default("10.1.2.3:7400".parse().unwrap()),
            "10.1.2.3:7400"
        );
    }
}
