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
//!   recomputes the topology with the pure [`crate::etcd_view::topology_from`] and publishes it
//!   if it differs.
//!
//! Proxy-side fencing: the view remembers the last time etcd answered (a lease
//! keep-alive). After more than `lease_ttl` without an answer the leader is
//! treated as unknown ([`crate::etcd_view::etcd_lost`]): writes are held and then refused, reads
//! continue on the replicas last known; unless the failsafe
//! ([`failsafe`], `etcd.failsafe`) confirms the last serving leader, which
//! then stays the primary for as long as every replica confirms it.
//!
//! Addresses are per locality: a member may advertise `pg_addrs` (region ->
//! `host:port` as reached from that region); the proxy dials, and polls, every
//! node at its address for the proxy's own region
//! ([`meridian_shared::records::MemberRecord::pg_addr_for`]). The view also keeps etcd `cache/<region>`
//! records, which give [`Topology::cache_usable`] for the proxy's region.
//!
//! Replicas carry the smoothed round trip of their health polls, so that without a
//! replica in its own region a proxy reads from the nearest one
//! ([`Topology::pick_replica`]). Limits: the `proxies/<id>` key goes away at once only through
//! [`Follower::stop`] (a graceful shutdown revokes the lease), otherwise when
//! its lease expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use meridian_shared::config::ProxyConfig;
use meridian_shared::keys::Keys;
use meridian_shared::records::{self, ProxyRecord, Role};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};

use crate::backend::ConnectParams;
use crate::etcd_view::{leader_addr_for, EtcdView, TopologyParams};
use crate::failsafe;
use crate::health::{self, ReplicaHealth, ReplicaTable};
use crate::tls::BackendTls;
use crate::topology::{Topology, TopologyRx};

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
        let side = FailsafeSide {
            view: view.clone(),
            changed: changed.clone(),
            region: settings.params.region.clone(),
        };
        tasks.push(tokio::spawn(
            failsafe::check_loop(settings.lease_ttl, poll_params.clone(), side)
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

/// The follower's view as the failsafe check sees it.
struct FailsafeSide {
    view: Arc<Mutex<EtcdView>>,
    changed: Arc<Notify>,
    region: String,
}

impl failsafe::View for FailsafeSide {
    fn watched(&self) -> failsafe::Watched {
        let v = lock(&self.view);
        failsafe::Watched {
            leader: v.leader.as_ref().map(|l| {
                let addr = leader_addr_for(l, &v.members, &self.region).to_owned();
                (l.clone(), addr)
            }),
            replicas: v
                .leader
                .as_ref()
                .map(|l| {
                    failsafe::replicas_of(l, &v.members)
                        .into_iter()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            last_contact: v.last_contact,
        }
    }

    fn confirmed_until(&self, until: Option<Instant>) {
        lock(&self.view).failsafe_until = until;
        self.changed.notify_one();
    }
}

fn lock(view: &Mutex<EtcdView>) -> std::sync::MutexGuard<'_, EtcdView> {
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

    #[test]
    fn default_proxy_id_is_a_valid_name() {
        let id = default_proxy_id("127.0.0.1:6432");
        assert!(id.ends_with("-6432"), "{id}");
        meridian_shared::keys::validate_name(&id).unwrap();
    }
}
