//! The primary's side of the failsafe ([`meridian_shared::failsafe`]): while
//! this node runs as primary and its member lease has missed a renewal, every
//! [`failsafe::POLL`] write a marker and read how far each standby has got
//! (one connection of its own), and publish until when every replica etcd last
//! listed has confirmed this primary ([`Shared::failsafe_until`]). The fence
//! watchdog ([`crate::member::fence_watchdog`]) stops PostgreSQL once the lease
//! is about to expire and that confirmation does not hold.
//!
//! When the lease is renewed again, the check stops and its state is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_shared::failsafe::{self, Confirmations, Verdict};
use meridian_shared::records::Role;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::decide;
use crate::postgres::PgNode;
use crate::state::Shared;

/// Runs [`failsafe::ROUND_SQL`] and parses it.
pub async fn round(client: &Client) -> Result<failsafe::Round, String> {
    let messages = client
        .simple_query(failsafe::ROUND_SQL)
        .await
        .map_err(|e| crate::controller::pg_message(&e))?;
    let rows: Vec<Vec<Option<String>>> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    failsafe::parse_round(&rows)
}

/// The check loop of node `me`; runs until aborted.
pub async fn run(node: Arc<PgNode>, shared: Arc<Shared>, me: String, lease_ttl: Duration) {
    let mut confirmations = Confirmations::new();
    let mut conn: Option<Client> = None;
    let mut last_verdict: Option<Verdict> = None;
    let mut tick = tokio::time::interval(failsafe::POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = shared.node_state();
        let primary = state.role == Role::Primary && state.fenced_at.is_none();
        if !primary
            || !decide::lease_renewal_missed(Instant::now(), shared.last_renewed(), lease_ttl)
        {
            if last_verdict.take().is_some() {
                tracing::info!("failsafe check ended (lease renewed, or no longer primary)");
            }
            confirmations.reset();
            shared.set_failsafe_until(None);
            conn = None;
            continue;
        }
        if conn.as_ref().is_none_or(Client::is_closed) {
            conn = tokio::time::timeout(
                crate::probe::CONNECT_TIMEOUT,
                crate::probe::connect_local(&node, "failsafe"),
            )
            .await
            .ok()
            .and_then(Result::ok);
        }
        if let Some(client) = &conn {
            let at = Instant::now();
            match tokio::time::timeout(failsafe::POLL * 2, round(client)).await {
                Ok(Ok(r)) => {
                    let leader = shared.leader.borrow().clone();
                    if decide::failsafe_round_counts(leader.as_ref(), &me, r.epoch.as_deref()) {
                        confirmations.record(at, r.marker, &r.standbys);
                    } else {
                        tracing::warn!(epoch = ?r.epoch, leader = ?leader.map(|l| (l.node, l.epoch)),
                            "failsafe: etcd did not last name this node the serving leader in the epoch it carries");
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "failsafe round failed");
                    conn = None;
                }
                Err(_) => {
                    tracing::warn!("failsafe round timed out");
                    conn = None;
                }
            }
        }
        let replicas = shared.replicas();
        let verdict = confirmations.verdict(replicas.iter().map(String::as_str));
        let until = match &verdict {
            Verdict::Confirmed { until } => Some(*until),
            _ => None,
        };
        shared.set_failsafe_until(until);
        if verdict.is_news_after(last_verdict.as_ref()) {
            match &verdict {
                Verdict::Confirmed { .. } => tracing::warn!(
                    replicas = ?replicas,
                    "etcd out of reach: every replica confirms this primary (failsafe), writes go on"
                ),
                Verdict::Unconfirmed { member } => tracing::warn!(
                    member,
                    "etcd out of reach and a replica does not confirm this primary"
                ),
                Verdict::Unchecked => {
                    tracing::warn!("etcd out of reach; failsafe check not answered yet")
                }
            }
        }
        last_verdict = Some(verdict);
    }
}
