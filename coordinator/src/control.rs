//! The seam between the coordinator's decision loop and its admin surface (gRPC,
//! HTTP, status page): a status snapshot the loop keeps current, a stream of
//! cluster events, and a queue of operator operations the loop carries out.
//!
//! The loop (`daemon`) owns the sending halves and publishes; the admin API only
//! reads the snapshot, subscribes to events, and submits [`Operation`]s, each
//! answered through its oneshot when the loop has finished (or refused) it.

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// One node as the active coordinator sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub region: String,
    /// `primary`, `replica` or `unknown`.
    pub role: String,
    /// `running` (primary serving), `streaming`, `catching_up`, `stopped`,
    /// `fenced`, `silent` (no heartbeat), …
    pub state: String,
    pub timeline: u32,
    /// Bytes behind the primary's last reported position (replicas).
    pub lag_bytes: Option<u64>,
    /// Replay lag in milliseconds as the replica reports it.
    pub lag_ms: Option<u64>,
    pub pg_addr: String,
    /// Whether its agent holds a `members/<node>` lease.
    pub member: bool,
    pub pg_up: bool,
    pub epoch_seen: u64,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms: Option<u64>,
}

/// One registered pgproxy (`proxies/<id>`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub id: String,
    pub region: String,
    pub listen_addr: String,
    pub version: String,
}

/// The whole cluster, as `meridianctl status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster: String,
    /// Name of the coordinator that produced this snapshot.
    pub coordinator: String,
    /// Whether that coordinator is the active one.
    pub active: bool,
    pub epoch: u64,
    pub leader: Option<String>,
    /// `serving`, `failing_over`, or `unknown` (no leader record yet).
    pub state: String,
    pub paused: bool,
    /// `off`, `on` or `strict`.
    pub sync_mode: String,
    pub sync_standbys: Vec<String>,
    pub nodes: Vec<NodeStatus>,
    pub proxies: Vec<ProxyStatus>,
    /// Regions whose result cache is marked unusable (etcd `cache/<region>`,
    /// issue 4): they missed invalidations and their proxies do not cache.
    #[serde(default)]
    pub cache_unusable: Vec<String>,
}

/// Something that happened, for `meridianctl events` and the status page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEvent {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// Short machine-readable kind: `elected`, `suspect`, `failover_started`,
    /// `fenced`, `promoted`, `leader_published`, `follow`, `switchover_started`,
    /// `paused`, `resumed`, `error`, …
    pub kind: String,
    pub node: Option<String>,
    pub epoch: u64,
    pub message: String,
}

/// An operator request the decision loop carries out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Planned, zero-loss change of primary (to the best replica when `to` is None).
    Switchover { to: Option<String> },
    /// Promote `to` now, even though the primary may be healthy; `force` also
    /// accepts a lagging or `nofailover` target.
    Failover { to: String, force: bool },
}

/// Answer to an [`Operation`]: a human-readable outcome or why it was refused.
pub type OperationResult = Result<String, String>;

/// An operation with the channel its answer goes to.
pub type OperationRequest = (Operation, oneshot::Sender<OperationResult>);

/// The admin side's handle.
#[derive(Clone)]
pub struct ControlHandle {
    pub status: watch::Receiver<ClusterStatus>,
    pub events: broadcast::Sender<ClusterEvent>,
    pub operations: mpsc::Sender<OperationRequest>,
}

/// The decision loop's side.
pub struct ControlLoopSide {
    pub status: watch::Sender<ClusterStatus>,
    pub events: broadcast::Sender<ClusterEvent>,
    pub operations: mpsc::Receiver<OperationRequest>,
}

/// Creates both sides.
pub fn channel() -> (ControlHandle, ControlLoopSide) {
    let (status_tx, status_rx) = watch::channel(ClusterStatus::default());
    let (events_tx, _) = broadcast::channel(1024);
    let (ops_tx, ops_rx) = mpsc::channel(16);
    (
        ControlHandle {
            status: status_rx,
            events: events_tx.clone(),
            operations: ops_tx,
        },
        ControlLoopSide {
            status: status_tx,
            events: events_tx,
            operations: ops_rx,
        },
    )
}
