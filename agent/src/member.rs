//! The agent's etcd side: the member lease and record (`members/<node>`), and
//! the watch on `leader`, `epoch` and `members/` (the replicas the failsafe asks).
//!
//! The lease is granted with `--lease-ttl`, kept alive every ttl/3 and its last
//! successful renewal recorded in [`Shared`] (the fence watchdog stops a primary
//! when renewals stop: [`decide::must_self_fence`]). A failed renewal or an
//! expired lease is answered with a new lease and the record is put again. The
//! record is rewritten whenever the role changes. The watch keeps
//! [`Shared::leader`] current and raises the highest epoch seen; on any error it
//! re-reads both keys and watches again. [`read_member`] reads another node's
//! record (the leader's regional address, before following it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use meridian_shared::epoch::Epoch;
use meridian_shared::keys::Keys;
use meridian_shared::records::{self, LeaderRecord, MemberRecord, MemberTags, Role};
use tokio::time::Instant;

use crate::decide;
use crate::postgres::{PgNode, StopMode};
use crate::state::Shared;

/// Connects to etcd (lazily usable; requests fail fast while it is down).
pub async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
    Client::connect(endpoints, Some(opts)).await
}

/// What goes into `members/<node>` besides the role.
#[derive(Clone, Debug)]
pub struct MemberInfo {
    pub region: String,
    pub pg_addr: String,
    /// Per-region addresses (`--advertise-pg-addr-for`).
    pub pg_addrs: BTreeMap<String, String>,
    pub agent_addr: String,
    pub tags: MemberTags,
}

impl MemberInfo {
    fn record(&self, role: Role) -> MemberRecord {
        MemberRecord {
            region: self.region.clone(),
            pg_addr: self.pg_addr.clone(),
            agent_addr: self.agent_addr.clone(),
            role,
            tags: self.tags.clone(),
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            pg_addrs: self.pg_addrs.clone(),
        }
    }
}

/// Holds the member lease; returns the lease id in `lease_id` for revocation.
pub async fn hold_lease(
    mut client: Client,
    keys: Keys,
    info: MemberInfo,
    shared: Arc<Shared>,
    ttl: Duration,
    lease_id: Arc<std::sync::atomic::AtomicI64>,
) {
    let key = keys.member(&shared.node);
    let period = ttl / 3;
    let mut role_rx = shared.role_tx.subscribe();
    loop {
        let granted_at = Instant::now();
        let lease = match tokio::time::timeout(
            period,
            client.lease_grant(i64::try_from(ttl.as_secs()).unwrap_or(3), None),
        )
        .await
        {
            Ok(Ok(resp)) => resp.id(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "etcd lease grant failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => {
                tracing::warn!("etcd lease grant timed out");
                continue;
            }
        };
        lease_id.store(lease, std::sync::atomic::Ordering::SeqCst);
        let put = |client: &mut Client, role: Role| {
            let value = records::encode("member", &info.record(role));
            let mut client = client.clone();
            let key = key.clone();
            async move {
                let value = value.map_err(|e| e.to_string())?;
                tokio::time::timeout(
                    period,
                    client.put(key, value, Some(PutOptions::new().with_lease(lease))),
                )
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            }
        };
        let role = *role_rx.borrow_and_update();
        if let Err(e) = put(&mut client, role).await {
            tracing::warn!(error = %e, key, "cannot register the member");
            continue;
        }
        shared.renewed(granted_at.into_std());
        tracing::info!(key, lease, ?role, "member registered");
        let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "etcd keep-alive stream failed");
                continue;
            }
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'kept: loop {
            tokio::select! {
                _ = tick.tick() => {
                    let sent = Instant::now();
                    let renewed = tokio::time::timeout(period, async {
                        keeper.keep_alive().await?;
                        stream.message().await
                    })
                    .await;
                    match renewed {
                        Ok(Ok(Some(resp))) if resp.ttl() > 0 => shared.renewed(sent.into_std()),
                        Ok(Ok(_)) => {
                            tracing::warn!(lease, "member lease expired; granting a new one");
                            break 'kept;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "lease renewal failed");
                            break 'kept;
                        }
                        Err(_) => {
                            tracing::warn!("lease renewal timed out");
                            break 'kept;
                        }
                    }
                }
                changed = role_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let role = *role_rx.borrow_and_update();
                    if let Err(e) = put(&mut client, role).await {
                        tracing::warn!(error = %e, "cannot update the member record");
                        break 'kept;
                    }
                }
            }
        }
    }
}

/// Stops a primary whose lease renewals stopped (checked every 50 ms), unless
/// the failsafe holds ([`crate::failsafe`]).
pub async fn fence_watchdog(
    node: Arc<PgNode>,
    shared: Arc<Shared>,
    ttl: Duration,
    margin: Duration,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let state = shared.node_state();
        let primary = state.role == Role::Primary && state.fenced_at.is_none();
        if !primary {
            continue;
        }
        let now = std::time::Instant::now();
        if !decide::must_self_fence(now, shared.last_renewed(), ttl, margin, true)
            || decide::failsafe_holds(now, shared.failsafe_until())
        {
            continue;
        }
        if !crate::probe::postmaster_alive(&node).await {
            continue;
        }
        let epoch = shared.epoch_seen();
        tracing::error!(%epoch, "member lease not renewed in time and not every replica confirms this primary: stopping PostgreSQL (self-fence)");
        shared
            .metrics
            .self_fences
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        shared.update(|s| {
            s.fenced_at = Some(epoch);
            s.intent = decide::Intent::Idle;
        });
        if let Err(e) = node.stop(StopMode::Immediate).await {
            tracing::error!(error = %e, "self-fence stop failed");
        }
    }
}

fn leader_of(value: &[u8]) -> Option<LeaderRecord> {
    match records::decode::<LeaderRecord>("leader", value) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an undecodable leader record");
            None
        }
    }
}

fn epoch_of(value: &[u8]) -> Option<Epoch> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Epoch)
}

async fn watch_once(client: &mut Client, keys: &Keys, shared: &Shared) -> Result<(), String> {
    let resp = client
        .get(keys.leader(), None)
        .await
        .map_err(|e| e.to_string())?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let leader = resp.kvs().first().and_then(|kv| leader_of(kv.value()));
    if let Some(l) = &leader {
        shared.see_epoch(l.epoch);
    }
    shared.leader.send_replace(leader);
    let resp = client
        .get(keys.epoch(), None)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(e) = resp.kvs().first().and_then(|kv| epoch_of(kv.value())) {
        shared.see_epoch(e);
    }
    let prefix = keys.members_prefix();
    let resp = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
    let mut roles: BTreeMap<String, Role> = BTreeMap::new();
    for kv in resp.kvs() {
        member_event(
            keys,
            &mut roles,
            kv.key_str().unwrap_or(""),
            Some(kv.value()),
        );
    }
    shared.set_replicas(replicas_of(&roles, &shared.node));
    let opts = || WatchOptions::new().with_start_revision(revision + 1);
    let mut stream = client
        .watch(keys.leader(), Some(opts()))
        .await
        .map_err(|e| e.to_string())?;
    stream
        .watch(keys.epoch(), Some(opts()))
        .await
        .map_err(|e| e.to_string())?;
    stream
        .watch(prefix.as_str(), Some(opts().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
    let leader_key = keys.leader();
    let epoch_key = keys.epoch();
    while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
        if msg.canceled() {
            return Err(format!("watch canceled: {}", msg.cancel_reason()));
        }
        for event in msg.events() {
            let Some(kv) = event.kv() else { continue };
            let key = kv.key_str().unwrap_or("");
            let put = event.event_type() == EventType::Put;
            if key == leader_key {
                let leader = if put { leader_of(kv.value()) } else { None };
                if let Some(l) = &leader {
                    shared.see_epoch(l.epoch);
                }
                tracing::info!(leader = ?leader.as_ref().map(|l| (&l.node, l.epoch, l.state)), "leader changed");
                shared.leader.send_replace(leader);
            } else if key == epoch_key && put {
                if let Some(e) = epoch_of(kv.value()) {
                    shared.see_epoch(e);
                }
            } else if member_event(keys, &mut roles, key, put.then(|| kv.value())) {
                shared.set_replicas(replicas_of(&roles, &shared.node));
            }
        }
    }
    Err("watch stream ended".into())
}

/// Applies a put (`Some(value)`) or delete of `key` to the members' roles;
/// whether it was a member key.
fn member_event(
    keys: &Keys,
    roles: &mut BTreeMap<String, Role>,
    key: &str,
    value: Option<&[u8]>,
) -> bool {
    let Some(node) = keys.member_name(key) else {
        return false;
    };
    match value.map(|v| records::decode::<MemberRecord>("member", v)) {
        Some(Ok(m)) => {
            roles.insert(node.to_owned(), m.role);
        }
        Some(Err(e)) => {
            tracing::warn!(node, error = %e, "ignoring an undecodable member record");
            roles.remove(node);
        }
        None => {
            roles.remove(node);
        }
    }
    true
}

/// The members registered as replicas, `me` left out: whom the failsafe asks.
pub fn replicas_of(roles: &BTreeMap<String, Role>, me: &str) -> std::collections::BTreeSet<String> {
    roles
        .iter()
        .filter(|(node, role)| node.as_str() != me && **role == Role::Replica)
        .map(|(node, _)| node.clone())
        .collect()
}

/// Keeps [`Shared::leader`], the epoch and the replicas etcd lists current until aborted.
pub async fn watch_leader(mut client: Client, keys: Keys, shared: Arc<Shared>) {
    loop {
        if let Err(e) = watch_once(&mut client, &keys, &shared).await {
            tracing::warn!(error = %e, "etcd leader watch failed; retrying");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The heartbeat interval from etcd `config`, when it sets one.
pub async fn configured_heartbeat(client: &mut Client, keys: &Keys) -> Option<Duration> {
    let resp = tokio::time::timeout(Duration::from_secs(2), client.get(keys.config(), None))
        .await
        .ok()?
        .ok()?;
    let kv = resp.kvs().first()?;
    let value: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
    let text = value.get("heartbeat_interval")?.as_str()?;
    humantime::parse_duration(text).ok()
}

/// The current leader record in etcd (for start-up).
pub async fn read_leader(client: &mut Client, keys: &Keys) -> Result<Option<LeaderRecord>, String> {
    let resp = tokio::time::timeout(Duration::from_secs(3), client.get(keys.leader(), None))
        .await
        .map_err(|_| "reading the leader key timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(resp.kvs().first().and_then(|kv| leader_of(kv.value())))
}

/// The `members/<node>` record of another node, if registered (1 s timeout).
pub async fn read_member(
    client: &mut Client,
    keys: &Keys,
    node: &str,
) -> Result<Option<MemberRecord>, String> {
    let resp = tokio::time::timeout(Duration::from_secs(1), client.get(keys.member(node), None))
        .await
        .map_err(|_| format!("reading members/{node} timed out"))?
        .map_err(|e| e.to_string())?;
    match resp.kvs().first() {
        None => Ok(None),
        Some(kv) => records::decode::<MemberRecord>("member", kv.value())
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}
