//! The gRPC admin API (tonic, `proto/admin.proto`, package `meridian.admin.v1`)
//! over a [`ControlHandle`]: status, switchover, failover, pause/resume, dynamic
//! config and a stream of events. `meridianctl` is its client.
//!
//! The API decides nothing about the cluster: operations go to the decision loop
//! through the handle and their answer is passed back; `pause`, `resume` and
//! `SetConfig` change etcd's `config` by a transaction on its `mod_revision` (so
//! two operators cannot overwrite each other's change) after validating it. A
//! standby coordinator (its snapshot says `active == false`) answers reads and
//! refuses every mutation with FAILED_PRECONDITION naming the active
//! coordinator's admin address from the etcd election.

pub mod events;
pub mod settings;

/// Code generated from `proto/admin.proto`.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs
)]
pub mod proto {
    tonic::include_proto!("meridian.admin.v1");
}

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use futures::StreamExt;
use meridian_shared::keys::Keys;
use meridian_shared::records::{self, ClusterConfig, CoordinatorRecord};
use tokio::sync::{broadcast, oneshot, watch};
use tonic::{Request, Response, Status};

use crate::control::{
    ClusterEvent, ClusterStatus, ControlHandle, NodeStatus, Operation, ProxyStatus,
};
use events::EventLog;

/// How long an operation may take in the decision loop before the API gives up
/// waiting for its answer (the operation itself is not cancelled).
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on each etcd request the API makes.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);
/// Attempts of a config read-modify-write that lost a race.
const CONFIG_ATTEMPTS: usize = 5;

/// Serves the admin API on `listen` until `shutdown` resolves.
pub async fn serve_admin(
    handle: ControlHandle,
    etcd: etcd_client::Client,
    keys: Keys,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("admin API: cannot listen on {listen}: {e}"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let log = EventLog::new(events::DEFAULT_CAPACITY);
    events::spawn_collector(&handle.events, log.clone(), stopped(stop_rx.clone()));
    let service = AdminService {
        handle,
        etcd,
        keys,
        log,
        stop: stop_rx.clone(),
    };
    tracing::info!(%listen, "admin API listening");
    tonic::transport::Server::builder()
        .add_service(proto::admin_server::AdminServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped(stop_rx),
        )
        .await
        .map_err(|e| anyhow::anyhow!("admin API on {listen}: {e}"))
}

/// Resolves once the flag is set (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// The service behind [`serve_admin`].
pub struct AdminService {
    handle: ControlHandle,
    etcd: etcd_client::Client,
    keys: Keys,
    log: Arc<EventLog>,
    stop: watch::Receiver<bool>,
}

impl AdminService {
    /// The election leader's record, if etcd answers and there is one.
    async fn active_coordinator(&self) -> Option<CoordinatorRecord> {
        let mut etcd = self.etcd.clone();
        let name = self.keys.coordinator_election();
        let resp = tokio::time::timeout(ETCD_TIMEOUT, etcd.leader(name))
            .await
            .ok()?
            .ok()?;
        let kv = resp.kv()?;
        records::decode("coordinator", kv.value()).ok()
    }

    /// Refuses a mutation on a standby.
    async fn require_active(&self) -> Result<(), Status> {
        if self.handle.status.borrow().active {
            return Ok(());
        }
        let active = self
            .active_coordinator()
            .await
            .map(|r| r.admin_addr)
            .unwrap_or_else(|| "unknown".to_string());
        Err(Status::failed_precondition(format!(
            "not the active coordinator; active is {active}"
        )))
    }

    /// The current config and the `mod_revision` of its key (`None`: absent, defaults).
    async fn read_config(&self) -> Result<(ClusterConfig, Option<i64>), Status> {
        let key = self.keys.config();
        let mut etcd = self.etcd.clone();
        let resp = tokio::time::timeout(ETCD_TIMEOUT, etcd.get(key.clone(), None))
            .await
            .map_err(|_| Status::unavailable(format!("etcd: reading {key} timed out")))?
            .map_err(|e| Status::unavailable(format!("etcd: reading {key}: {e}")))?;
        match resp.kvs().first() {
            None => Ok((ClusterConfig::default(), None)),
            Some(kv) => {
                let config: ClusterConfig = records::decode("config", kv.value())
                    .map_err(|e| Status::internal(format!("etcd key {key}: {e}")))?;
                Ok((config, Some(kv.mod_revision())))
            }
        }
    }

    /// Read-modify-write of `config`, by txn on its `mod_revision`, retried when
    /// another writer got in between. Returns the new config and whether it changed.
    async fn update_config<F>(&self, change: F) -> Result<(ClusterConfig, bool), Status>
    where
        F: Fn(&ClusterConfig) -> Result<ClusterConfig, Status>,
    {
        let key = self.keys.config();
        for _ in 0..CONFIG_ATTEMPTS {
            let (current, revision) = self.read_config().await?;
            let next = change(&current)?;
            next.validate()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if next == current {
                return Ok((next, false));
            }
            let bytes =
                records::encode("config", &next).map_err(|e| Status::internal(e.to_string()))?;
            let guard = match revision {
                Some(rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
                None => Compare::version(key.clone(), CompareOp::Equal, 0),
            };
            let txn = Txn::new()
                .when([guard])
                .and_then([TxnOp::put(key.clone(), bytes, None)]);
            let mut etcd = self.etcd.clone();
            let resp = tokio::time::timeout(ETCD_TIMEOUT, etcd.txn(txn))
                .await
                .map_err(|_| Status::unavailable(format!("etcd: writing {key} timed out")))?
                .map_err(|e| Status::unavailable(format!("etcd: writing {key}: {e}")))?;
            if resp.succeeded() {
                return Ok((next.clone(), next != current));
            }
            tracing::debug!(%key, "config changed concurrently; retrying");
        }
        Err(Status::aborted(format!(
            "{key} kept changing concurrently ({CONFIG_ATTEMPTS} attempts); try again"
        )))
    }

    /// Hands an operation to the decision loop and waits for its answer.
    async fn submit(&self, op: Operation) -> Result<String, Status> {
        self.require_active().await?;
        let (tx, rx) = oneshot::channel();
        let what = format!("{op:?}");
        tracing::info!(operation = %what, "operator operation submitted");
        self.handle
            .operations
            .send((op, tx))
            .await
            .map_err(|_| Status::unavailable("the decision loop is not running"))?;
        match tokio::time::timeout(OPERATION_TIMEOUT, rx).await {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{what}: no answer from the decision loop within {OPERATION_TIMEOUT:?}"
            ))),
            Ok(Err(_)) => Err(Status::aborted(format!(
                "{what}: the decision loop dropped the operation"
            ))),
            Ok(Ok(Ok(message))) => Ok(message),
            Ok(Ok(Err(refusal))) => Err(Status::failed_precondition(refusal)),
        }
    }

    fn config_reply(config: &ClusterConfig, changed: bool) -> Result<proto::ConfigReply, Status> {
        let json = serde_json::to_string(config).map_err(|e| Status::internal(e.to_string()))?;
        Ok(proto::ConfigReply { json, changed })
    }

    fn note(&self, kind: &str, message: &str) {
        let epoch = self.handle.status.borrow().epoch;
        let _ = self.handle.events.send(ClusterEvent {
            at_ms: events::now_ms(),
            kind: kind.to_string(),
            node: None,
            epoch,
            message: message.to_string(),
        });
    }

    async fn set_paused(&self, paused: bool) -> Result<proto::ConfigReply, Status> {
        self.require_active().await?;
        let (config, changed) = self
            .update_config(|c| {
                Ok(ClusterConfig {
                    paused,
                    ..c.clone()
                })
            })
            .await?;
        if changed {
            if paused {
                self.note("paused", "automatic failover paused by an operator");
            } else {
                self.note("resumed", "automatic failover resumed by an operator");
            }
        }
        Self::config_reply(&config, changed)
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn get_status(
        &self,
        _request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::ClusterStatus>, Status> {
        let status = self.handle.status.borrow().clone();
        let mut reply = status_to_proto(&status);
        if !status.active {
            if let Some(active) = self.active_coordinator().await {
                reply.active_coordinator = active.name;
                reply.active_admin_addr = active.admin_addr;
            }
        }
        Ok(Response::new(reply))
    }

    async fn switchover(
        &self,
        request: Request<proto::SwitchoverRequest>,
    ) -> Result<Response<proto::OperationReply>, Status> {
        let to = request.into_inner().to.filter(|t| !t.is_empty());
        let message = self.submit(Operation::Switchover { to }).await?;
        Ok(Response::new(proto::OperationReply { message }))
    }

    async fn failover(
        &self,
        request: Request<proto::FailoverRequest>,
    ) -> Result<Response<proto::OperationReply>, Status> {
        let req = request.into_inner();
        if req.to.is_empty() {
            return Err(Status::invalid_argument(
                "failover: `to` (target node) is required",
            ));
        }
        let message = self
            .submit(Operation::Failover {
                to: req.to,
                force: req.force,
            })
            .await?;
        Ok(Response::new(proto::OperationReply { message }))
    }

    async fn pause(
        &self,
        _request: Request<proto::PauseRequest>,
    ) -> Result<Response<proto::ConfigReply>, Status> {
        self.set_paused(true).await.map(Response::new)
    }

    async fn resume(
        &self,
        _request: Request<proto::ResumeRequest>,
    ) -> Result<Response<proto::ConfigReply>, Status> {
        self.set_paused(false).await.map(Response::new)
    }

    async fn get_config(
        &self,
        _request: Request<proto::GetConfigRequest>,
    ) -> Result<Response<proto::ConfigReply>, Status> {
        let (config, _) = self.read_config().await?;
        Self::config_reply(&config, false).map(Response::new)
    }

    async fn set_config(
        &self,
        request: Request<proto::SetConfigRequest>,
    ) -> Result<Response<proto::ConfigReply>, Status> {
        self.require_active().await?;
        let req = request.into_inner();
        let whole = if req.json.trim().is_empty() {
            None
        } else {
            Some(
                settings::parse_config_json(&req.json)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            )
        };
        let pairs: Vec<(String, String)> =
            req.settings.into_iter().map(|s| (s.key, s.value)).collect();
        if whole.is_none() && pairs.is_empty() {
            return Err(Status::invalid_argument(
                "SetConfig: give `json` or at least one setting",
            ));
        }
        let (config, changed) = self
            .update_config(|current| {
                let base = whole.clone().unwrap_or_else(|| current.clone());
                settings::apply_settings(&base, &pairs)
                    .map_err(|e| Status::invalid_argument(e.to_string()))
            })
            .await?;
        if changed {
            self.note("config_changed", "cluster config changed by an operator");
        }
        Self::config_reply(&config, changed).map(Response::new)
    }

    type EventsStream = tonic::codegen::BoxStream<proto::Event>;

    async fn events(
        &self,
        request: Request<proto::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let req = request.into_inner();
        let wanted = usize::try_from(req.recent).unwrap_or(usize::MAX);
        let (recent, live) = self.log.subscribe(wanted);
        let head = futures::stream::iter(recent.into_iter().map(|e| Ok(event_to_proto(e))));
        if !req.follow {
            return Ok(Response::new(Box::pin(head)));
        }
        let tail = futures::stream::unfold(
            (live, self.stop.clone()),
            |(mut live, mut stop)| async move {
                let event = tokio::select! {
                    _ = stop.wait_for(|v| *v) => None,
                    received = live.recv() => match received {
                        Ok(event) => Some(event),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            Some(events::lagged_note(n, events::now_ms()))
                        }
                        Err(broadcast::error::RecvError::Closed) => None,
                    },
                };
                event.map(|e| (Ok(event_to_proto(e)), (live, stop)))
            },
        );
        Ok(Response::new(Box::pin(head.chain(tail))))
    }
}

/// The wire form of a node.
pub fn node_to_proto(n: &NodeStatus) -> proto::NodeStatus {
    proto::NodeStatus {
        name: n.name.clone(),
        region: n.region.clone(),
        role: n.role.clone(),
        state: n.state.clone(),
        timeline: n.timeline,
        lag_bytes: n.lag_bytes,
        lag_ms: n.lag_ms,
        pg_addr: n.pg_addr.clone(),
        member: n.member,
        pg_up: n.pg_up,
        epoch_seen: n.epoch_seen,
        last_heartbeat_ms: n.last_heartbeat_ms,
    }
}

/// A node from its wire form.
pub fn node_from_proto(n: proto::NodeStatus) -> NodeStatus {
    NodeStatus {
        name: n.name,
        region: n.region,
        role: n.role,
        state: n.state,
        timeline: n.timeline,
        lag_bytes: n.lag_bytes,
        lag_ms: n.lag_ms,
        pg_addr: n.pg_addr,
        member: n.member,
        pg_up: n.pg_up,
        epoch_seen: n.epoch_seen,
        last_heartbeat_ms: n.last_heartbeat_ms,
    }
}

/// The wire form of a status snapshot (the `active_*` fields are left empty).
pub fn status_to_proto(s: &ClusterStatus) -> proto::ClusterStatus {
    proto::ClusterStatus {
        cluster: s.cluster.clone(),
        coordinator: s.coordinator.clone(),
        active: s.active,
        epoch: s.epoch,
        leader: s.leader.clone(),
        state: s.state.clone(),
        paused: s.paused,
        sync_mode: s.sync_mode.clone(),
        sync_standbys: s.sync_standbys.clone(),
        nodes: s.nodes.iter().map(node_to_proto).collect(),
        proxies: s
            .proxies
            .iter()
            .map(|p| proto::ProxyStatus {
                id: p.id.clone(),
                region: p.region.clone(),
                listen_addr: p.listen_addr.clone(),
                version: p.version.clone(),
            })
            .collect(),
        active_coordinator: String::new(),
        active_admin_addr: String::new(),
    }
}

/// A status snapshot from its wire form (the `active_*` fields are dropped).
pub fn status_from_proto(s: proto::ClusterStatus) -> ClusterStatus {
    ClusterStatus {
        cluster: s.cluster,
        coordinator: s.coordinator,
        active: s.active,
        epoch: s.epoch,
        leader: s.leader,
        state: s.state,
        paused: s.paused,
        sync_mode: s.sync_mode,
        sync_standbys: s.sync_standbys,
        nodes: s.nodes.into_iter().map(node_from_proto).collect(),
        proxies: s
            .proxies
            .into_iter()
            .map(|p| ProxyStatus {
                id: p.id,
                region: p.region,
                listen_addr: p.listen_addr,
                version: p.version,
            })
            .collect(),
        // Not carried by the gRPC form yet.
        cache_unusable: Vec::new(),
    }
}

/// The wire form of an event.
pub fn event_to_proto(e: ClusterEvent) -> proto::Event {
    proto::Event {
        at_ms: e.at_ms,
        kind: e.kind,
        node: e.node,
        epoch: e.epoch,
        message: e.message,
    }
}

/// An event from its wire form.
pub fn event_from_proto(e: proto::Event) -> ClusterEvent {
    ClusterEvent {
        at_ms: e.at_ms,
        kind: e.kind,
        node: e.node,
        epoch: e.epoch,
        message: e.message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_survives_the_wire() {
        let status = ClusterStatus {
            cluster: "c".into(),
            coordinator: "c1".into(),
            active: true,
            epoch: 3,
            leader: Some("n1".into()),
            state: "serving".into(),
            paused: true,
            sync_mode: "on".into(),
            sync_standbys: vec!["n2".into()],
            nodes: vec![NodeStatus {
                name: "n2".into(),
                lag_bytes: Some(5),
                lag_ms: None,
                last_heartbeat_ms: Some(40),
                ..NodeStatus::default()
            }],
            proxies: vec![ProxyStatus {
                id: "p".into(),
                ..ProxyStatus::default()
            }],
            cache_unusable: Vec::new(),
        };
        assert_eq!(status_from_proto(status_to_proto(&status)), status);
        let event = ClusterEvent {
            at_ms: 1,
            kind: "promoted".into(),
            node: Some("n2".into()),
            epoch: 4,
            message: "m".into(),
        };
        assert_eq!(event_from_proto(event_to_proto(event.clone())), event);
    }
}
