//! Following the leader in etcd: the topology source of a clustered proxy.
//!
//! With `[etcd] endpoints` set, [`spawn`] starts three kinds of tasks and
//! returns the topology `watch` channel that [`crate::run`] reads:
//!
//! - the **etcd session**: connects, registers `proxies/<id>` on a lease of
//!   `lease_ttl` (kept alive, re-created after any loss), reads everything under
//!   `/meridian/<cluster>/` and then prefix-watches it from the next revision,
//!   so `leader`, `members/` and `config` in [`EtcdView`] never miss an update.
//!   Any error ends the session; a new one starts after a short backoff and
//!   resynchronises from a fresh read.
//! - one **health poller** per replica ([`crate::health`]).
//! - the **publisher**: whenever etcd, replica health or the clock changes,
//!   recomputes the topology with the pure [`topology_from`] and publishes it
//!   if it differs.
//!
//! Proxy-side fencing: the view remembers the last time etcd answered (a lease
//! keep-alive). After more than `lease_ttl` without an answer the leader is
//! treated as unknown ([`etcd_lost`]): writes are held and then refused, reads
//! continue on the replicas last known; unless the failsafe
//! ([`crate::failsafe`], `etcd.failsafe`) confirms the last serving leader, which
//! then stays the primary for as long as every replica confirms it.
//!
//! Addresses are per locality: a member may advertise `pg_addrs` (region ->
//! `host:port` as reached from that region); the proxy dials, and polls, every
//! node at its address for the proxy's own region
//! ([`MemberRecord::pg_addr_for`]). The view also keeps etcd `cache/<region>`
//! records, which give [`Topology::cache_usable`] for the proxy's region.
//!
//! Replicas carry the smoothed round trip of their health polls, so that without a
//! replica in its own region a proxy reads from the nearest one
//! ([`Topology::pick_replica`]). Limits: the `proxies/<id>` key goes away at once only through
//! [`Follower::stop`] (a graceful shutdown revokes the lease), otherwise when
//! its lease expires.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, WatchOptions,
};
use meridian_shared::cache_keys::CacheRegionRecord;
use meridian_shared::config::ProxyConfig;
use meridian_shared::keys::Keys;
use meridian_shared::records::{
    self, ClusterConfig, LeaderRecord, MemberRecord, ProxyRecord, Role,
};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};

use crate::backend::ConnectParams;
use crate::health::{self, ReplicaHealth, ReplicaStatus, ReplicaTable};
use crate::tls::BackendTls;
use crate::topology::{Backend, LeaderView, ReplicaState, Topology, TopologyRx};

/// Time allowed for one etcd request (connect, get, put, lease grant, keep-alive).
const ETCD_OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before reconnecting to etcd after a failed session (doubles up to 1 s).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Why an etcd session ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer {0} in time")]
    Timeout(&'static str),
    #[error("etcd {0} stream ended")]
    Closed(&'static str),
    #[error("etcd watch canceled: {0}")]
    Canceled(String),
    #[error("the proxy's lease expired")]
    LeaseExpired,
    #[error("backend TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Everything the follower needs, derived once from the configuration.
#[derive(Debug, Clone)]
pub struct FollowSettings {
    pub endpoints: Vec<String>,
    pub keys: Keys,
    pub proxy_id: String,
    pub record: ProxyRecord,
    pub lease_ttl: Duration,
    pub poll_interval: Duration,
    pub params: TopologyParams,
    /// `etcd.failsafe`.
    pub failsafe: bool,
}

impl FollowSettings {
    /// Settings from a validated config (`etcd.proxy_id` defaults to `<hostname>-<listen port>`).
    pub fn from_config(cfg: &ProxyConfig) -> FollowSettings {
        let e = &cfg.etcd;
        FollowSettings {
            endpoints: e.endpoints.clone(),
            keys: Keys::new(&e.cluster),
            proxy_id: e
                .proxy_id
                .clone()
                .unwrap_or_else(|| default_proxy_id(&cfg.listen)),
            record: ProxyRecord {
                region: cfg.region.clone(),
                listen_addr: cfg.listen.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            lease_ttl: e.lease_ttl,
            failsafe: e.failsafe,
            poll_interval: e.replica_poll_interval,
            params: TopologyParams {
                region: cfg.region.clone(),
                max_replica_lag: e.max_replica_lag,
                failover_hold: e.failover_hold,
                // A poller stuck past its own timeout counts as down.
                health_stale_after: health::poll_timeout(e.replica_poll_interval)
                    + e.replica_poll_interval
                    + Duration::from_secs(1),
                lease_ttl: e.lease_ttl,
            },
        }
    }
}

/// `<hostname>-<port of listen>`, with characters a key cannot hold replaced.
pub fn default_proxy_id(listen: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pgproxy".into());
    let port = listen.rsplit_once(':').map_or("0", |(_, p)| p);
    format!("{host}-{port}")
        .chars()
        .map(|c| {
            if c == '/' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The inputs of [`topology_from`] that come from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TopologyParams {
    /// The proxy's region.
    pub region: String,
    pub max_replica_lag: Duration,
    /// Failover hold from the flags/file (etcd `config.failover_hold` overrides it).
    pub failover_hold: Duration,
    /// A poll result older than this counts as a failed poll.
    pub health_stale_after: Duration,
    /// Losing etcd for longer than this makes the leader unknown.
    pub lease_ttl: Duration,
}

/// What the proxy has read from etcd.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EtcdView {
    pub leader: Option<LeaderRecord>,
    pub members: BTreeMap<String, MemberRecord>,
    /// `config.failover_hold`, when the `config` key exists and sets it.
    pub config_hold: Option<Duration>,
    /// region -> `usable` of its `cache/<region>` record (an undecodable
    /// record counts as unusable); a region without a record is absent.
    pub cache_regions: BTreeMap<String, bool>,
    /// The last time etcd answered (`None`: never).
    pub last_contact: Option<Instant>,
    /// While etcd is out of reach: until when every replica confirmed the
    /// leader ([`crate::failsafe`]).
    pub failsafe_until: Option<Instant>,
}

impl EtcdView {
    /// Replaces the view with a full read of the cluster prefix.
    pub fn reset(&mut self, keys: &Keys, kvs: &[KeyValue]) {
        self.leader = None;
        self.members.clear();
        self.config_hold = None;
        self.cache_regions.clear();
        for kv in kvs {
            if let Ok(key) = kv.key_str() {
                self.put(keys, key, kv.value());
            }
        }
    }

    /// Applies a put of `key`; undecodable values count as absent (and are logged).
    pub fn put(&mut self, keys: &Keys, key: &str, value: &[u8]) {
        if key == keys.leader() {
            self.leader = records::decode::<LeaderRecord>("leader", value)
                .map_err(|e| warn!(error = %e, "ignoring the leader record"))
                .ok();
        } else if key == keys.config() {
            self.config_hold = config_hold(value);
        } else if let Some(node) = keys.member_name(key) {
            match records::decode::<MemberRecord>("member", value) {
                Ok(m) => {
                    self.members.insert(node.to_string(), m);
                }
                Err(e) => {
                    warn!(node, error = %e, "ignoring a member record");
                    self.members.remove(node);
                }
            }
        } else if let Some(region) = cache_region(keys, key) {
            let usable = match records::decode::<CacheRegionRecord>("cache region", value) {
                Ok(r) => r.usable,
                Err(e) => {
                    warn!(region, error = %e, "undecodable cache region record: cache unusable");
                    false
                }
            };
            self.cache_regions.insert(region.to_string(), usable);
        }
    }

    /// Applies a delete of `key`.
    pub fn delete(&mut self, keys: &Keys, key: &str) {
        if key == keys.leader() {
            self.leader = None;
        } else if key == keys.config() {
            self.config_hold = None;
        } else if let Some(node) = keys.member_name(key) {
            self.members.remove(node);
        } else if let Some(region) = cache_region(keys, key) {
            self.cache_regions.remove(region);
        }
    }

    /// The topology this view gives at `now`.
    pub fn topology(&self, health: &ReplicaHealth, now: Instant, p: &TopologyParams) -> Topology {
        let lost = etcd_lost(self.last_contact, now, p.lease_ttl);
        let confirmed = self.failsafe_until.is_some_and(|until| now < until);
        let leader = if lost && !confirmed {
            None
        } else {
            self.leader.as_ref()
        };
        let cache = !lost && cache_usable(self.cache_regions.get(&p.region).copied());
        let mut t = topology_from(leader, &self.members, health, now, p, cache);
        if let Some(hold) = self.config_hold {
            t.failover_hold = hold;
        }
        t
    }
}

/// `failover_hold` of a `config` value, only when the value sets it.
fn config_hold(value: &[u8]) -> Option<Duration> {
    let raw: serde_json::Value = serde_json::from_slice(value).ok()?;
    raw.get("failover_hold")?;
    match records::decode::<ClusterConfig>("config", value) {
        Ok(c) => Some(c.failover_hold),
        Err(e) => {
            warn!(error = %e, "ignoring the cluster config");
            None
        }
    }
}

/// The region of a `cache/<region>` key (`shared::cache_keys::etcd_region_key`
/// under the cluster prefix), or `None` for any other key.
pub fn cache_region<'k>(keys: &Keys, key: &'k str) -> Option<&'k str> {
    let rest = key.strip_prefix(keys.prefix())?;
    let region = rest.strip_prefix(meridian_shared::cache_keys::etcd_region_key("").as_str())?;
    (!region.is_empty() && !region.contains('/')).then_some(region)
}

/// Whether a region's cache is usable given its `cache/<region>` record's
/// `usable` (`None`: no record, which means usable).
pub fn cache_usable(record: Option<bool>) -> bool {
    record.unwrap_or(true)
}

/// Whether etcd has been out of reach for longer than the lease TTL.
pub fn etcd_lost(last_contact: Option<Instant>, now: Instant, lease_ttl: Duration) -> bool {
    last_contact.is_none_or(|t| now.saturating_duration_since(t) > lease_ttl)
}

/// The topology for a leader record, the members and the replicas' health.
///
/// The primary is the leader's address only while the leader is serving; the
/// replicas are the members with role `replica` (not the leader's node), each
/// with a state from its latest poll: `Ok` when it answered, is in recovery
/// and lags at most `max_replica_lag`.
///
/// Every address is the one for the proxy's region (`p.region`): a replica's
/// [`MemberRecord::pg_addr_for`], and for the primary the leader's member record
/// likewise when that record carries the leader's `pg_addr` (else the leader
/// record's `pg_addr`, e.g. while the leader has no member record).
/// `cache_usable` is passed through to [`Topology::cache_usable`].
pub fn topology_from(
    leader: Option<&LeaderRecord>,
    members: &BTreeMap<String, MemberRecord>,
    health: &ReplicaHealth,
    now: Instant,
    p: &TopologyParams,
    cache_usable: bool,
) -> Topology {
    let state = match leader {
        None => LeaderView::Unknown,
        Some(l) if l.is_serving() => LeaderView::Serving,
        Some(_) => LeaderView::FailingOver,
    };
    let replicas = members
        .iter()
        .filter(|(node, m)| {
            m.role == Role::Replica
                && leader.is_none_or(|l| l.node != **node && l.pg_addr != m.pg_addr)
        })
        .map(|(_, m)| {
            let addr = m.pg_addr_for(&p.region);
            Backend {
                addr: Arc::from(addr),
                region: m.region.clone(),
                state: replica_state(health.get(addr), now, p),
                rtt: health.get(addr).and_then(|s| s.rtt),
            }
        })
        .collect();
    Topology {
        primary: leader
            .filter(|l| l.is_serving())
            .map(|l| Arc::from(leader_addr_for(l, members, &p.region))),
        primary_region: leader.map(|l| l.region.clone()),
        replicas,
        epoch: leader.map_or(0, |l| l.epoch.0),
        state,
        failover_hold: p.failover_hold,
        cache_usable,
    }
}

/// The leader's address as reached from `region`: its member record's entry for
/// the region when that record names the leader's `pg_addr`, else `pg_addr`.
pub fn leader_addr_for<'a>(
    leader: &'a LeaderRecord,
    members: &'a BTreeMap<String, MemberRecord>,
    region: &str,
) -> &'a str {
    match members.get(&leader.node) {
        Some(m) if m.pg_addr == leader.pg_addr => m.pg_addr_for(region),
        _ => &leader.pg_addr,
    }
}

/// A replica's state from its latest poll.
pub fn replica_state(
    status: Option<&ReplicaStatus>,
    now: Instant,
    p: &TopologyParams,
) -> ReplicaState {
    let Some(s) = status else {
        return ReplicaState::Unknown;
    };
    if !s.ok || !s.in_recovery || now.saturating_duration_since(s.at) > p.health_stale_after {
        return ReplicaState::Down;
    }
    match s.lag {
        Some(lag) if lag <= p.max_replica_lag => ReplicaState::Ok,
        _ => ReplicaState::Lagging,
    }
}

/// A running follower; dropping it stops every task it started.
pub struct Follower {
    pub topology: TopologyRx,
    /// Replay positions and health of the replicas (for read-your-writes).
    pub replicas: ReplicaTable,
    pub proxy_id: String,
    registration: Registration,
    tasks: Vec<JoinHandle<()>>,
}

/// The client and lease of the current registration, for revoking it on stop.
type Registration = Arc<Mutex<Option<(Client, i64)>>>;

impl Follower {
    /// Stops following and revokes the registration's lease, so `proxies/<id>`
    /// disappears at once (best effort, within a second).
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        let reg = self
            .registration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((mut client, lease)) = reg {
            match tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await {
                Ok(Ok(_)) => info!(proxy = %self.proxy_id, "deregistered from etcd"),
                Ok(Err(e)) => warn!(error = %e, "cannot revoke the proxy's lease"),
                Err(_) => warn!("etcd did not answer the lease revoke in time"),
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts following etcd as configured in `cfg.etcd` (which must be enabled).
/// Returns at once: until etcd answers, the topology has no primary (writes
/// are held) and no replicas.
pub fn spawn(cfg: &ProxyConfig) -> Result<Follower, FollowError> {
    let settings = FollowSettings::from_config(cfg);
    let poll_params = ConnectParams {
        addr: Arc::from(""),
        user: cfg.routing.catalog_user.clone(),
        database: cfg.routing.catalog_database.clone(),
        password: cfg.routing.catalog_password.clone(),
        tls: BackendTls::from_config(&cfg.backend_tls)?,
        connect_timeout: cfg.pool.connect_timeout.min(Duration::from_secs(2)),
        max_message: cfg.max_message_size,
    };
    let initial =
        EtcdView::default().topology(&ReplicaHealth::new(), Instant::now(), &settings.params);
    let (tx, rx) = watch::channel(Arc::new(initial));
    let view = Arc::new(Mutex::new(EtcdView::default()));
    let changed = Arc::new(Notify::new());
    let table = ReplicaTable::default();
    let registration = Registration::default();
    let span = tracing::info_span!("follow", cluster = %settings.keys.prefix(), proxy = %settings.proxy_id);
    let etcd = tokio::spawn(
        etcd_loop(
            settings.clone(),
            view.clone(),
            changed.clone(),
            registration.clone(),
        )
        .instrument(span.clone()),
    );
    let mut tasks = vec![etcd];
    if settings.failsafe {
        tasks.push(tokio::spawn(
            crate::failsafe::check_loop(
                settings.clone(),
                poll_params.clone(),
                view.clone(),
                changed.clone(),
            )
            .instrument(span.clone()),
        ));
    }
    tasks.push(tokio::spawn(
        publish_loop(
            settings.clone(),
            poll_params,
            view,
            changed,
            table.clone(),
            tx,
        )
        .instrument(span),
    ));
    Ok(Follower {
        topology: rx,
        replicas: table,
        proxy_id: settings.proxy_id,
        registration,
        tasks,
    })
}

pub(crate) fn lock(view: &Mutex<EtcdView>) -> std::sync::MutexGuard<'_, EtcdView> {
    view.lock().unwrap_or_else(|e| e.into_inner())
}

async fn etcd_loop(
    s: FollowSettings,
    view: Arc<Mutex<EtcdView>>,
    changed: Arc<Notify>,
    registration: Registration,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        if let Err(e) = etcd_session(&s, &view, &changed, &registration).await {
            warn!(error = %e, "etcd session ended; reconnecting");
        }
        changed.notify_one();
        if started.elapsed() > MAX_BACKOFF * 5 {
            backoff = FIRST_BACKOFF;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn timed<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FollowError> {
    match tokio::time::timeout(ETCD_OP_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(FollowError::Timeout(what)),
    }
}

/// One connection to etcd: register, read, watch and keep the lease alive until something fails.
async fn etcd_session(
    s: &FollowSettings,
    view: &Mutex<EtcdView>,
    changed: &Notify,
    registration: &Mutex<Option<(Client, i64)>>,
) -> Result<(), FollowError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(ETCD_OP_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
    let mut client = timed("connect", Client::connect(&s.endpoints, Some(opts))).await?;

    let ttl_secs = s.lease_ttl.as_secs().max(1) as i64;
    let lease = timed("lease grant", client.lease_grant(ttl_secs, None))
        .await?
        .id();
    let record = records::encode("proxy", &s.record)
        .map_err(|e| FollowError::Canceled(format!("cannot encode the proxy record: {e}")))?;
    timed(
        "put proxies/<id>",
        client.put(
            s.keys.proxy(&s.proxy_id),
            record,
            Some(PutOptions::new().with_lease(lease)),
        ),
    )
    .await?;
    *registration.lock().unwrap_or_else(|e| e.into_inner()) = Some((client.clone(), lease));
    let (mut keeper, mut keep_alive) =
        timed("lease keep-alive", client.lease_keep_alive(lease)).await?;

    let snapshot = timed(
        "get",
        client.get(s.keys.prefix(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = snapshot.header().map_or(0, |h| h.revision());
    {
        let mut v = lock(view);
        v.reset(&s.keys, snapshot.kvs());
        v.last_contact = Some(Instant::now());
        info!(
            revision,
            leader = ?v.leader.as_ref().map(|l| (&l.node, l.epoch.0, l.state)),
            members = v.members.len(),
            "connected to etcd"
        );
    }
    changed.notify_one();
    let mut watch = timed(
        "watch",
        client.watch(
            s.keys.prefix(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        ),
    )
    .await?;

    let mut tick = tokio::time::interval((s.lease_ttl / 3).max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = watch.message() => {
                let resp = m?.ok_or(FollowError::Closed("watch"))?;
                if resp.canceled() {
                    return Err(FollowError::Canceled(resp.cancel_reason().to_string()));
                }
                if resp.events().is_empty() {
                    continue;
                }
                let mut v = lock(view);
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    match ev.event_type() {
                        EventType::Put => v.put(&s.keys, key, kv.value()),
                        EventType::Delete => v.delete(&s.keys, key),
                    }
                    debug!(key, kind = ?ev.event_type(), "etcd change");
                }
                drop(v);
                changed.notify_one();
            }
            _ = tick.tick() => {
                timed("lease keep-alive", keeper.keep_alive()).await?;
            }
            k = keep_alive.message() => {
                let resp = k?.ok_or(FollowError::Closed("lease keep-alive"))?;
                if resp.ttl() <= 0 {
                    return Err(FollowError::LeaseExpired);
                }
                lock(view).last_contact = Some(Instant::now());
            }
        }
    }
}

/// Aborts the tasks it holds when dropped (so the pollers end with the publisher).
#[derive(Default)]
struct Pollers(HashMap<Arc<str>, JoinHandle<()>>);

impl Drop for Pollers {
    fn drop(&mut self) {
        for t in self.0.values() {
            t.abort();
        }
    }
}

async fn publish_loop(
    s: FollowSettings,
    poll_params: ConnectParams,
    view: Arc<Mutex<EtcdView>>,
    changed: Arc<Notify>,
    table: ReplicaTable,
    tx: watch::Sender<Arc<Topology>>,
) {
    let mut pollers = Pollers::default();
    loop {
        let now = Instant::now();
        let snapshot = lock(&view).clone();
        // Poll every member that claims to be a replica.
        let wanted: Vec<Arc<str>> = snapshot
            .members
            .values()
            .filter(|m| m.role == Role::Replica)
            .map(|m| Arc::from(m.pg_addr_for(&s.params.region)))
            .collect();
        pollers.0.retain(|addr, task| {
            let keep = wanted.contains(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        table.retain(&wanted);
        for addr in &wanted {
            if !pollers.0.contains_key(addr) {
                let params = ConnectParams {
                    addr: addr.clone(),
                    ..poll_params.clone()
                };
                let task = tokio::spawn(
                    health::poll_replica(params, s.poll_interval, table.clone())
                        .instrument(tracing::debug_span!("replica_poll", replica = %addr)),
                );
                pollers.0.insert(addr.clone(), task);
            }
        }
        let topology = snapshot.topology(&table.snapshot(), now, &s.params);
        tx.send_if_modified(|cur| {
            if **cur == topology {
                return false;
            }
            info!(
                state = ?topology.state,
                primary = ?topology.primary,
                epoch = topology.epoch,
                replicas_usable = topology.usable_replicas(),
                replicas = topology.replicas.len(),
                "topology changed"
            );
            *cur = Arc::new(topology);
            true
        });
        // A failsafe confirmation that runs out drops the primary at once.
        let wake = snapshot
            .failsafe_until
            .filter(|until| *until > now)
            .map_or(s.poll_interval, |until| {
                until.saturating_duration_since(now).min(s.poll_interval)
            });
        tokio::select! {
            _ = changed.notified() => {}
            _ = table.changed() => {}
            _ = tokio::time::sleep(wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::epoch::Epoch;
    use meridian_shared::records::{LeaderState, MemberTags};

    fn params() -> TopologyParams {
        TopologyParams {
            region: "eu".into(),
            max_replica_lag: Duration::from_secs(5),
            failover_hold: Duration::from_secs(10),
            health_stale_after: Duration::from_secs(3),
            lease_ttl: Duration::from_secs(3),
        }
    }

    fn leader(node: &str, addr: &str, epoch: u64, state: LeaderState) -> LeaderRecord {
        LeaderRecord {
            node: node.into(),
            region: "us".into(),
            pg_addr: addr.into(),
            epoch: Epoch(epoch),
            timeline: 1,
            state,
            since: 0,
            candidate: None,
        }
    }

    fn member(region: &str, addr: &str, role: Role) -> MemberRecord {
        MemberRecord {
            region: region.into(),
            pg_addr: addr.into(),
            agent_addr: "a:1".into(),
            role,
            tags: MemberTags::default(),
            version: None,
            pg_addrs: BTreeMap::new(),
        }
    }

    fn members() -> BTreeMap<String, MemberRecord> {
        BTreeMap::from([
            ("n0".to_string(), member("us", "p:1", Role::Primary)),
            ("n1".to_string(), member("eu", "r1:1", Role::Replica)),
            ("n2".to_string(), member("us", "r2:1", Role::Replica)),
            ("n3".to_string(), member("ap", "x:1", Role::Unknown)),
        ])
    }

    fn ok(lag_ms: u64, at: Instant) -> ReplicaStatus {
        ReplicaStatus {
            ok: true,
            in_recovery: true,
            replay_lsn: None,
            lag: Some(Duration::from_millis(lag_ms)),
            rtt: None,
            at,
        }
    }

    #[test]
    fn serving_leader_is_the_primary_and_replicas_get_their_health() {
        let now = Instant::now();
        let health = ReplicaHealth::from([
            (Arc::from("r1:1"), ok(100, now)),
            (Arc::from("r2:1"), ok(6000, now)),
        ]);
        let l = leader("n0", "p:1", 3, LeaderState::Serving);
        let t = topology_from(Some(&l), &members(), &health, now, &params(), true);
        assert_eq!(t.state, LeaderView::Serving);
        assert_eq!(t.primary.as_deref(), Some("p:1"));
        assert_eq!(t.epoch, 3);
        assert_eq!(t.failover_hold, Duration::from_secs(10));
        let states: Vec<(&str, &str, ReplicaState)> = t
            .replicas
            .iter()
            .map(|b| (&*b.addr, b.region.as_str(), b.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("r1:1", "eu", ReplicaState::Ok),
                ("r2:1", "us", ReplicaState::Lagging)
            ]
        );
        assert_eq!(&*t.pick_replica("eu", 0).unwrap().addr, "r1:1");
        // The lagging local replica of "us" loses to the healthy one elsewhere.
        assert_eq!(&*t.pick_replica("us", 0).unwrap().addr, "r1:1");
    }

    #[test]
    fn failing_over_or_missing_leader_has_no_primary() {
        let now = Instant::now();
        let health = ReplicaHealth::new();
        let l = leader("n0", "p:1", 4, LeaderState::FailingOver);
        let t = topology_from(Some(&l), &members(), &health, now, &params(), true);
        assert_eq!(t.state, LeaderView::FailingOver);
        assert_eq!(t.primary, None);
        assert_eq!(t.epoch, 4);
        assert!(t.checks_epoch());
        // Never polled: known but not usable.
        assert!(t.replicas.iter().all(|r| r.state == ReplicaState::Unknown));
        let t = topology_from(None, &members(), &health, now, &params(), true);
        assert_eq!(t.state, LeaderView::Unknown);
        assert_eq!(t.primary, None);
        assert_eq!(t.epoch, 0);
    }

    #[test]
    fn the_leader_node_is_never_a_replica_even_with_a_stale_member_role() {
        let now = Instant::now();
        let mut m = members();
        m.insert("n1".into(), member("eu", "r1:1", Role::Replica));
        let l = leader("n1", "r1:1", 5, LeaderState::Serving);
        let t = topology_from(Some(&l), &m, &ReplicaHealth::new(), now, &params(), true);
        assert_eq!(t.primary.as_deref(), Some("r1:1"));
        assert!(t.replicas.iter().all(|r| &*r.addr != "r1:1"));
        assert_eq!(t.replicas.len(), 1);
    }

    #[test]
    fn replica_state_rules() {
        let now = Instant::now();
        let p = params();
        assert_eq!(replica_state(None, now, &p), ReplicaState::Unknown);
        assert_eq!(replica_state(Some(&ok(0, now)), now, &p), ReplicaState::Ok);
        assert_eq!(
            replica_state(Some(&ok(5000, now)), now, &p),
            ReplicaState::Ok
        );
        assert_eq!(
            replica_state(Some(&ok(5001, now)), now, &p),
            ReplicaState::Lagging
        );
        assert_eq!(
            replica_state(Some(&health::failed(now)), now, &p),
            ReplicaState::Down
        );
        let promoted = ReplicaStatus {
            in_recovery: false,
            ..ok(0, now)
        };
        assert_eq!(replica_state(Some(&promoted), now, &p), ReplicaState::Down);
        let later = now + Duration::from_secs(4);
        assert_eq!(
            replica_state(Some(&ok(0, now)), later, &p),
            ReplicaState::Down
        );
    }

    #[test]
    fn losing_etcd_longer_than_the_lease_ttl_drops_the_primary_but_keeps_replicas() {
        let now = Instant::now();
        let keys = Keys::new("c");
        let mut v = EtcdView::default();
        let l = leader("n0", "p:1", 2, LeaderState::Serving);
        v.put(
            &keys,
            &keys.leader(),
            &records::encode("leader", &l).unwrap(),
        );
        v.put(
            &keys,
            &keys.member("n1"),
            &records::encode("member", &member("eu", "r1:1", Role::Replica)).unwrap(),
        );
        let health = ReplicaHealth::from([(Arc::from("r1:1"), ok(0, now))]);
        // Never in contact: unknown.
        assert_eq!(v.topology(&health, now, &params()).primary, None);
        v.last_contact = Some(now);
        let t = v.topology(&health, now + Duration::from_secs(3), &params());
        assert_eq!(t.primary.as_deref(), Some("p:1"));
        let t = v.topology(&health, now + Duration::from_millis(3001), &params());
        assert_eq!(t.primary, None);
        assert_eq!(t.state, LeaderView::Unknown);
        assert_eq!(t.replicas.len(), 1);
        assert!(etcd_lost(None, now, Duration::from_secs(3)));
        assert!(!etcd_lost(Some(now), now, Duration::from_secs(3)));
    }

    #[test]
    fn view_applies_puts_and_deletes_and_config_hold_only_when_set() {
        let now = Instant::now();
        let keys = Keys::new("c");
        let mut v = EtcdView {
            last_contact: Some(now),
            ..Default::default()
        };
        v.put(&keys, &keys.config(), br#"{"paused":true}"#);
        assert_eq!(v.config_hold, None);
        assert_eq!(
            v.topology(&ReplicaHealth::new(), now, &params())
                .failover_hold,
            Duration::from_secs(10)
        );
        v.put(&keys, &keys.config(), br#"{"failover_hold":"1s 500ms"}"#);
        assert_eq!(v.config_hold, Some(Duration::from_millis(1500)));
        assert_eq!(
            v.topology(&ReplicaHealth::new(), now, &params())
                .failover_hold,
            Duration::from_millis(1500)
        );
        v.delete(&keys, &keys.config());
        assert_eq!(v.config_hold, None);

        v.put(&keys, &keys.member("n1"), b"not json");
        assert!(v.members.is_empty());
        v.put(
            &keys,
            &keys.member("n1"),
            &records::encode("member", &member("eu", "r1:1", Role::Replica)).unwrap(),
        );
        assert_eq!(v.members.len(), 1);
        v.put(&keys, &keys.proxy("me"), b"{}");
        assert_eq!(v.members.len(), 1);
        v.delete(&keys, &keys.member("n1"));
        assert!(v.members.is_empty());
        let l = leader("n0", "p:1", 1, LeaderState::Serving);
        v.put(
            &keys,
            &keys.leader(),
            &records::encode("leader", &l).unwrap(),
        );
        assert_eq!(v.leader.as_ref(), Some(&l));
        v.delete(&keys, &keys.leader());
        assert_eq!(v.leader, None);
    }

    fn with_addrs(mut m: MemberRecord, addrs: &[(&str, &str)]) -> MemberRecord {
        m.pg_addrs = addrs
            .iter()
            .map(|(r, a)| (r.to_string(), a.to_string()))
            .collect();
        m
    }

    #[test]
    fn addresses_are_the_ones_for_the_proxys_region() {
        let now = Instant::now();
        let m = BTreeMap::from([
            (
                "n0".to_string(),
                with_addrs(
                    member("us", "p:1", Role::Primary),
                    &[("us", "p:1"), ("eu", "p-eu:1")],
                ),
            ),
            (
                "n1".to_string(),
                with_addrs(
                    member("eu", "r1:1", Role::Replica),
                    &[("eu", "r1:1"), ("us", "r1-us:1")],
                ),
            ),
            // No per-region addresses: pg_addr from everywhere.
            ("n2".to_string(), member("ap", "r2:1", Role::Replica)),
        ]);
        let l = leader("n0", "p:1", 3, LeaderState::Serving);
        // Health is keyed by the address actually dialed (the regional one).
        let health = ReplicaHealth::from([
            (Arc::from("r1-us:1"), ok(0, now)),
            (Arc::from("r1:1"), ok(0, now)),
            (Arc::from("r2:1"), ok(0, now)),
        ]);
        let eu = topology_from(Some(&l), &m, &health, now, &params(), true);
        assert_eq!(eu.primary.as_deref(), Some("p-eu:1"));
        let addrs: Vec<&str> = eu.replicas.iter().map(|b| &*b.addr).collect();
        assert_eq!(addrs, vec!["r1:1", "r2:1"]);
        assert!(eu.replicas.iter().all(|b| b.state == ReplicaState::Ok));

        let us_params = TopologyParams {
            region: "us".into(),
            ..params()
        };
        let us = topology_from(Some(&l), &m, &health, now, &us_params, true);
        assert_eq!(us.primary.as_deref(), Some("p:1"));
        let addrs: Vec<&str> = us.replicas.iter().map(|b| &*b.addr).collect();
        assert_eq!(addrs, vec!["r1-us:1", "r2:1"]);
        assert_eq!(us.replicas[0].region, "eu");

        // A region nobody lists: every advertised pg_addr.
        let ap_params = TopologyParams {
            region: "ap".into(),
            ..params()
        };
        let ap = topology_from(Some(&l), &m, &health, now, &ap_params, true);
        assert_eq!(ap.primary.as_deref(), Some("p:1"));

        // The leader without a member record, or with a record naming another
        // address: the leader record's pg_addr.
        let mut no_rec = m.clone();
        no_rec.remove("n0");
        let t = topology_from(Some(&l), &no_rec, &health, now, &params(), true);
        assert_eq!(t.primary.as_deref(), Some("p:1"));
        let mut moved = m.clone();
        moved.get_mut("n0").unwrap().pg_addr = "elsewhere:1".into();
        let t = topology_from(Some(&l), &moved, &health, now, &params(), true);
        assert_eq!(t.primary.as_deref(), Some("p:1"));
        assert_eq!(leader_addr_for(&l, &m, "eu"), "p-eu:1");
    }

    #[test]
    fn cache_is_usable_unless_the_region_is_marked_or_etcd_is_lost() {
        let now = Instant::now();
        let keys = Keys::new("c");
        let key = |r: &str| {
            format!(
                "{}{}",
                keys.prefix(),
                meridian_shared::cache_keys::etcd_region_key(r)
            )
        };
        assert_eq!(cache_region(&keys, &key("eu")), Some("eu"));
        assert_eq!(cache_region(&keys, &keys.leader()), None);
        assert_eq!(
            cache_region(&keys, &format!("{}cache/", keys.prefix())),
            None
        );
        assert_eq!(cache_region(&keys, "/meridian/other/cache/eu"), None);
        assert!(cache_usable(None));
        assert!(cache_usable(Some(true)));
        assert!(!cache_usable(Some(false)));

        let mut v = EtcdView::default();
        let h = ReplicaHealth::new();
        // Never in contact with etcd: not usable.
        assert!(!v.topology(&h, now, &params()).cache_usable);
        v.last_contact = Some(now);
        // No record: usable.
        assert!(v.topology(&h, now, &params()).cache_usable);
        let unusable = CacheRegionRecord {
            usable: false,
            since: 1,
        };
        v.put(
            &keys,
            &key("eu"),
            &records::encode("cache", &unusable).unwrap(),
        );
        assert!(!v.topology(&h, now, &params()).cache_usable);
        // Another region's record does not matter.
        let us_params = TopologyParams {
            region: "us".into(),
            ..params()
        };
        assert!(v.topology(&h, now, &us_params).cache_usable);
        v.put(&keys, &key("eu"), br#"{"usable":true,"since":2}"#);
        assert!(v.topology(&h, now, &params()).cache_usable);
        v.put(&keys, &key("eu"), b"garbage");
        assert!(!v.topology(&h, now, &params()).cache_usable);
        v.delete(&keys, &key("eu"));
        assert!(v.topology(&h, now, &params()).cache_usable);
        v.put(
            &keys,
            &key("eu"),
            &records::encode("cache", &unusable).unwrap(),
        );
        // A full re-read without the key: usable again.
        v.reset(&keys, &[]);
        assert!(v.topology(&h, now, &params()).cache_usable);
        // etcd lost for longer than the lease TTL: not usable.
        let later = now + Duration::from_millis(3001);
        assert!(!v.topology(&h, later, &params()).cache_usable);
    }

    #[test]
    fn default_proxy_id_is_a_valid_name() {
        let id = default_proxy_id("127.0.0.1:6432");
        assert!(id.ends_with("-6432"), "{id}");
        meridian_shared::keys::validate_name(&id).unwrap();
    }
}
