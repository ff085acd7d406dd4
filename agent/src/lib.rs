//! meridian-agent: the sidecar of one PostgreSQL node (DESIGN.md §1, §3, §4 and
//! docs/control-path.md).
//!
//! [`run`] wires the parts together: [`postgres`] controls the local server
//! processes; [`decide`] holds the pure decisions; [`controller`] is the one task
//! that changes PostgreSQL (start-up, commands, standby restarts, rejoin);
//! [`probe`] observes PostgreSQL every heartbeat interval; [`member`] holds the
//! etcd lease and member record, watches `leader`/`epoch` and fences a primary
//! whose lease lapses; [`link`] is the QUIC link to the active coordinator;
//! [`http`] serves `/health` and `/metrics`; [`invalidation`] streams the
//! primary's changes to the coordinator and applies cache invalidations to the
//! region's Redis (issue 4).
//!
//! Where the agent goes beyond or refines docs/control-path.md:
//! - slot names lower-case the node name and map every character outside
//!   `[a-z0-9_]` to `_` (the contract's `-` → `_` is the common case);
//! - a primary that crashed (not fenced) also rejoins a newer serving leader by
//!   itself, not only a running one;
//! - `wal_level` stays `logical` (a superset of `replica`, needed for issue 4);
//! - "fenced at epoch N" lives in memory: a restarted agent applies the start-up
//!   decision instead (a recorded leader is never started alone);
//! - etcd `config.heartbeat_interval` is read once at start.

pub mod config;
pub mod controller;
pub mod decide;
pub mod failsafe;
pub mod http;
pub mod invalidation;
pub mod link;
pub mod member;
pub mod postgres;
pub mod probe;
pub mod state;

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use meridian_shared::keys::Keys;
use meridian_shared::records::Role;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::AgentConfig;
use crate::controller::Controller;
use crate::member::MemberInfo;
use crate::postgres::{OsUser, PgBinaries, PgNode, PgNodeSpec, PgSettings};
use crate::state::Shared;

/// Settings every Meridian node gets besides [`PgSettings`]' own: short
/// replication timeouts so a dead peer is noticed in seconds, and a quick
/// retry of WAL retrieval so a re-pointed standby connects at once.
pub const NODE_SETTINGS: &[(&str, &str)] = &[
    ("wal_receiver_timeout", "2s"),
    ("wal_sender_timeout", "2s"),
    ("wal_retrieve_retry_interval", "200ms"),
    ("wal_receiver_status_interval", "1s"),
];

/// The node's PostgreSQL description from the agent's configuration.
pub fn node_spec(cfg: &AgentConfig) -> PgNodeSpec {
    let mut settings = PgSettings {
        listen_addresses: cfg.pg_listen.clone(),
        port: cfg.pg_port,
        ..PgSettings::default()
    };
    settings.extra = NODE_SETTINGS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for (k, v) in &cfg.pg_settings {
        if k == "fsync" {
            settings.fsync = !matches!(v.as_str(), "off" | "false" | "0" | "no");
        } else {
            settings.extra.push((k.clone(), v.clone()));
        }
    }
    PgNodeSpec {
        name: cfg.name.clone(),
        data_dir: cfg.data_dir.clone(),
        settings,
        hba: cfg
            .pg_hba
            .iter()
            .cloned()
            .chain(postgres::config::trust_loopback_hba())
            .collect(),
    }
}

/// Runs the agent until `shutdown` completes, then stops heartbeating, revokes
/// the lease, stops PostgreSQL (fast) and returns. `http` serves `/health` and
/// `/metrics` when given.
pub async fn run(
    cfg: AgentConfig,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let keys = Keys::new(&cfg.cluster);
    let bins = PgBinaries::discover(cfg.pg_bin_dir.clone()).context("--pg-bin-dir")?;
    let user = OsUser::ensure(&cfg.os_user).await.context("--os-user")?;
    let node = Arc::new(PgNode::new(bins, user, node_spec(&cfg)));
    let client_config = meridian_shared::pki::quic_client_config(&cfg.pki, Duration::from_secs(3))
        .context("--ca/--cert/--key")?;
    tokio::pin!(shutdown);
    let mut etcd = loop {
        tokio::select! {
            connected = member::connect(&cfg.etcd) => match connected {
                Ok(client) => break client,
                Err(e) => {
                    tracing::warn!(error = %e, etcd = %cfg.etcd.join(","), "cannot connect to etcd yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
            () = &mut shutdown => return Ok(()),
        }
    };

    // The leader must be known before deciding anything (never bootstrap blind).
    let leader = loop {
        tokio::select! {
            read = member::read_leader(&mut etcd, &keys) => match read {
                Ok(leader) => break leader,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the leader from etcd yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
            () = &mut shutdown => return Ok(()),
        }
    };
    let interval = member::configured_heartbeat(&mut etcd, &keys)
        .await
        .unwrap_or(cfg.heartbeat_interval);

    let dir = node.data_dir();
    let role = if !dir.join("PG_VERSION").exists() {
        Role::Unknown
    } else if dir.join("standby.signal").exists() {
        Role::Replica
    } else {
        Role::Primary
    };
    let shared = Arc::new(Shared::new(&cfg.name, &cfg.region, role));
    if let Some(l) = &leader {
        shared.see_epoch(l.epoch);
    }
    shared.leader.send_replace(leader);

    let span = tracing::info_span!("node", cluster = %cfg.cluster, node = %cfg.name);
    let info = MemberInfo {
        region: cfg.region.clone(),
        pg_addr: cfg.pg_addr.clone(),
        pg_addrs: cfg.pg_addrs.clone(),
        agent_addr: http
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_default(),
        tags: cfg.tags.clone(),
    };
    let lease_id = Arc::new(AtomicI64::new(0));
    let (ops_tx, ops_rx) = mpsc::channel(64);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(
        member::watch_leader(etcd.clone(), keys.clone(), shared.clone()).instrument(span.clone()),
    ));
    let lease_task = tokio::spawn(
        member::hold_lease(
            etcd.clone(),
            keys.clone(),
            info,
            shared.clone(),
            cfg.lease_ttl,
            lease_id.clone(),
        )
        .instrument(span.clone()),
    );
    if cfg.failsafe {
        tasks.push(tokio::spawn(
            failsafe::run(
                node.clone(),
                shared.clone(),
                cfg.name.clone(),
                cfg.lease_ttl,
            )
            .instrument(span.clone()),
        ));
    }
    tasks.push(tokio::spawn(
        member::fence_watchdog(
            node.clone(),
            shared.clone(),
            cfg.lease_ttl,
            cfg.fence_margin,
        )
        .instrument(span.clone()),
    ));
    tasks.push(tokio::spawn(
        probe::run(
            node.clone(),
            shared.clone(),
            interval,
            cfg.cache_lease,
            ops_tx.clone(),
        )
        .instrument(span.clone()),
    ));
    let applier = match &cfg.redis {
        Some(url) => Some(Arc::new(
            invalidation::redis_apply::RedisApplier::new(
                url,
                &cfg.cluster,
                invalidation::redis_apply::RedisApplyConfig::default(),
            )
            .context("--redis")?,
        )),
        None => None,
    };
    if let Some(applier) = &applier {
        tasks.push(tokio::spawn(
            invalidation::keep_fresh(shared.clone(), applier.clone(), cfg.cache_lease, interval)
                .instrument(span.clone()),
        ));
    }
    let (inval_link, batch_tx, ack_rx) = invalidation::channels(applier);
    tasks.push(tokio::spawn(
        invalidation::run_primary(
            shared.clone(),
            invalidation::stream::StreamConfig {
                database: cfg.cache_database.clone(),
                ..invalidation::stream::StreamConfig::new(&node.host(), node.port())
            },
            batch_tx,
            ack_rx,
        )
        .instrument(span.clone()),
    ));
    let link_task = tokio::spawn(
        link::run(
            etcd.clone(),
            keys.clone(),
            client_config,
            shared.clone(),
            ops_tx.clone(),
            interval,
            inval_link,
        )
        .instrument(span.clone()),
    );
    tasks.push(tokio::spawn(
        Controller::new(node.clone(), shared.clone(), cfg.clone())
            .with_etcd(etcd.clone(), keys.clone())
            .run(ops_rx)
            .instrument(span.clone()),
    ));
    if let Some(listener) = http {
        tasks.push(tokio::spawn(
            http::serve(listener, shared.clone()).instrument(span.clone()),
        ));
    }
    tracing::info!(parent: &span, pg_addr = %cfg.pg_addr, heartbeat = ?interval, "agent running");

    shutdown.await;
    tracing::info!(parent: &span, "shutting down: heartbeats stop, lease revoked, PostgreSQL stopped");
    link_task.abort();
    for t in &tasks {
        t.abort();
    }
    lease_task.abort();
    let lease = lease_id.load(Ordering::SeqCst);
    if lease != 0 {
        match tokio::time::timeout(Duration::from_secs(2), etcd.lease_revoke(lease)).await {
            Ok(Ok(_)) => tracing::info!(lease, "member lease revoked"),
            Ok(Err(e)) => tracing::warn!(error = %e, "revoking the member lease failed"),
            Err(_) => tracing::warn!("revoking the member lease timed out"),
        }
    }
    controller::stop_escalating(&node, Duration::from_secs(30))
        .await
        .context("stopping PostgreSQL")?;
    Ok(())
}
