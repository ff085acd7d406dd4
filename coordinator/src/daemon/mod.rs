//! The coordinator's I/O shell: the etcd election, the decision loop, and the
//! execution of what the pure modules decide (DESIGN §2-4, docs/control-path.md).
//!
//! [`run`] loops over *terms* (`election`): grant a lease (`--election-ttl`,
//! kept alive), campaign in the `coordinator/` election, act as a standby until
//! elected (status with `active = false`, QUIC connections refused with
//! `standby`), then act as the active coordinator until the lease is lost (step
//! down at once: stop acting, close agent connections, campaign again with a new
//! lease) or shutdown (resign, revoke, return).
//!
//! While active (`term`), every 50 ms tick: re-read the cluster's keys from etcd
//! (one prefix read every 100 ms, and after every write: polling instead of
//! watches keeps revisions consistent and needs no watch recovery), re-send
//! unacknowledged commands (`agents`), run the cache invalidation fan-out
//! (`cache_fanout`), then either bootstrap the first leader, resume or advance a
//! failover plan (`failover`, deciding with [`crate::planner`]), or in steady
//! state (`steady`) run the failure detector ([`crate::detector`]) with probes
//! of the primary, reconcile followers and keep the synchronous standby set
//! (`sync_standbys`, deciding with [`crate::observe::sync_change`]). Operator
//! operations arrive through [`crate::control`] and become plans too
//! (`operations`). All writes of `leader`, `epoch` and `sync` are transactions
//! on the revisions read ([`crate::store`]). Events and the status snapshot go
//! to the admin API through `publish`.
//!
//! This module holds the entry points and the state the submodules share: the
//! `Shell` (what outlives a term) and the `Active` term's state.

mod agents;
mod cache_fanout;
mod election;
mod failover;
mod operations;
mod publish;
mod steady;
mod sync_standbys;
mod term;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::Client;
use meridian_shared::keys::Keys;
use meridian_shared::lsn::Lsn;
use meridian_shared::records::CoordinatorRecord;
use tokio::sync::{mpsc, oneshot, watch};

use crate::commands::CommandBook;
use crate::control::{ControlLoopSide, Operation, OperationResult};
use crate::detector::Detector;
use crate::fanout::Fanout;
use crate::horizon::HorizonRelay;
use crate::quic::{self, Inbound};
use crate::store::{Snapshot, StoreError};

use agents::Session;
use election::LeaseDeadline;
use failover::PlanRun;
use sync_standbys::SyncApplied;

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

/// `0.0.0.0:P` / `[::]:P` → `127.0.0.1:P`, for the default advertised address.
pub fn advertise_default(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", listen.port())
    } else {
        listen.to_string()
    }
}

/// What outlives a term: settings, the etcd client, the admin API's side of the
/// control channels and the QUIC server's inbound messages.
struct Shell {
    settings: Settings,
    keys: Keys,
    etcd: Client,
    control: ControlLoopSide,
    inbound: mpsc::Receiver<Inbound>,
    active_tx: watch::Sender<bool>,
}

/// State of one active term (see [`term`] for its loop).
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
    /// The primary's invalidation horizon, relayed to every agent.
    horizon: HorizonRelay,
    /// Something a decision waits for arrived (a command's ack, a probe's
    /// result, a node reporting its Postgres down): decide now rather than at
    /// the next tick.
    wake: bool,
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
