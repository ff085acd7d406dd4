//! The proxy's side of the failsafe ([`meridian_shared::failsafe`]): once etcd
//! has missed a keep-alive, this proxy checks the last serving leader itself,
//! every [`failsafe::POLL`], on a connection of its own (the catalog user's
//! credentials, which need `pg_monitor` to see the standbys' positions): it
//! writes a marker and reads how far each standby has got, and reports the
//! instant until which every replica etcd last listed has confirmed that
//! leader in the epoch etcd last gave it ([`View::confirmed_until`]; the
//! follower keeps the leader as the primary past the etcd lease TTL only until
//! then). What it reads of etcd's last word comes through [`View`], so this
//! module knows nothing of the follower's state.
//!
//! The check does not depend on the leader's agent: a proxy stops writing on
//! its own once a replica stops confirming (for instance because it is being
//! promoted), even if the old primary's agent is stopped and cannot fence it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_shared::failsafe::{self, Confirmations, Verdict};
use meridian_shared::records::{LeaderRecord, MemberRecord, Role};
use tracing::{info, warn};

use crate::backend::{BackendConn, ConnectParams};

/// What etcd last said, as the check needs it.
#[derive(Clone, Debug, Default)]
pub struct Watched {
    /// The last serving leader and its address for this proxy's region.
    pub leader: Option<(LeaderRecord, String)>,
    /// The replicas that must confirm it ([`replicas_of`]).
    pub replicas: Vec<String>,
    /// When etcd last answered.
    pub last_contact: Option<Instant>,
}

/// The follower's side, as the check sees it.
pub trait View: Send + Sync + 'static {
    /// etcd's last word.
    fn watched(&self) -> Watched;
    /// The check's verdict: the leader stays the primary until `until` (`None`:
    /// not confirmed, or no check running).
    fn confirmed_until(&self, until: Option<Instant>);
}

/// Whether etcd has missed a keep-alive (sent every `lease_ttl / 3`): the
/// check runs from then on, so that it has an answer before the lease TTL.
pub fn etcd_late(last_contact: Option<Instant>, now: Instant, lease_ttl: Duration) -> bool {
    last_contact.is_some_and(|t| now.saturating_duration_since(t) > lease_ttl / 3 + failsafe::POLL)
}

/// The replicas the leader must be confirmed by: members etcd lists as
/// replicas, the leader's node left out.
pub fn replicas_of<'a>(
    leader: &LeaderRecord,
    members: &'a BTreeMap<String, MemberRecord>,
) -> Vec<&'a str> {
    members
        .iter()
        .filter(|(node, m)| m.role == Role::Replica && **node != leader.node)
        .map(|(node, _)| node.as_str())
        .collect()
}

/// The check loop; runs until aborted. `params`: how to log in to the leader
/// (its address is replaced by the leader's).
pub async fn check_loop(lease_ttl: Duration, params: ConnectParams, view: impl View) {
    let mut confirmations = Confirmations::new();
    let mut conn: Option<BackendConn> = None;
    // The leader (node, epoch) being checked, and the last verdict logged.
    let mut checking: Option<(String, u64)> = None;
    let mut last_verdict: Option<Verdict> = None;
    loop {
        tokio::time::sleep(failsafe::POLL).await;
        let now = Instant::now();
        let watched = view.watched();
        let leader = watched
            .leader
            .filter(|(l, _)| l.is_serving())
            .filter(|_| etcd_late(watched.last_contact, now, lease_ttl));
        let Some((leader, addr)) = leader else {
            if checking.take().is_some() {
                info!("failsafe check ended (etcd answers again, or no serving leader)");
                confirmations.reset();
                conn = None;
                last_verdict = None;
                view.confirmed_until(None);
            }
            continue;
        };
        let key = (leader.node.clone(), leader.epoch.0);
        if checking.as_ref() != Some(&key) {
            confirmations.reset();
            conn = None;
            checking = Some(key);
        }
        if conn.is_none() {
            let p = ConnectParams {
                addr: Arc::from(addr),
                ..params.clone()
            };
            conn = BackendConn::connect(&p).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            let at = Instant::now();
            match tokio::time::timeout(failsafe::POLL * 2, c.simple_query(failsafe::ROUND_SQL))
                .await
            {
                Ok(Ok(rows)) => match failsafe::parse_round(&rows) {
                    Ok(r) if r.epoch.as_deref() == Some(leader.epoch.to_string().as_str()) => {
                        confirmations.record(at, r.marker, &r.standbys);
                    }
                    Ok(r) => {
                        warn!(epoch = ?r.epoch, leader_epoch = %leader.epoch, "failsafe: the leader does not carry the epoch etcd gave it");
                    }
                    Err(e) => {
                        warn!(error = %e, "failsafe: unexpected answer");
                        conn = None;
                    }
                },
                Ok(Err(e)) => {
                    warn!(error = %e, "failsafe round failed");
                    conn = None;
                }
                Err(_) => {
                    warn!("failsafe round timed out");
                    conn = None;
                }
            }
        }
        let verdict = confirmations.verdict(watched.replicas.iter().map(String::as_str));
        view.confirmed_until(match &verdict {
            Verdict::Confirmed { until } => Some(*until),
            _ => None,
        });
        if verdict.is_news_after(last_verdict.as_ref()) {
            match &verdict {
                Verdict::Confirmed { .. } => warn!(
                    leader = %leader.node,
                    epoch = %leader.epoch,
                    "etcd out of reach: every replica confirms the leader (failsafe), writes go on"
                ),
                Verdict::Unconfirmed { member } => warn!(
                    leader = %leader.node,
                    member,
                    "etcd out of reach and a replica does not confirm the leader"
                ),
                Verdict::Unchecked => warn!(
                    leader = %leader.node,
                    "etcd out of reach; the failsafe check has no answer yet"
                ),
            }
        }
        last_verdict = Some(verdict);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::epoch::Epoch;
    use meridian_shared::records::{LeaderState, MemberTags};

    fn member(role: Role) -> MemberRecord {
        MemberRecord {
            region: "r".into(),
            pg_addr: "h:1".into(),
            agent_addr: String::new(),
            role,
            tags: MemberTags::default(),
            version: None,
            pg_addrs: BTreeMap::new(),
        }
    }

    #[test]
    fn the_check_starts_after_a_missed_keep_alive() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        assert!(!etcd_late(None, t0, ttl));
        assert!(!etcd_late(Some(t0), t0 + Duration::from_millis(1200), ttl));
        assert!(etcd_late(Some(t0), t0 + Duration::from_millis(1201), ttl));
    }

    #[test]
    fn the_leader_is_confirmed_by_every_other_replica() {
        let members: BTreeMap<String, MemberRecord> = [
            ("a".to_string(), member(Role::Primary)),
            ("b".to_string(), member(Role::Replica)),
            ("c".to_string(), member(Role::Replica)),
            ("d".to_string(), member(Role::Unknown)),
        ]
        .into();
        let mut leader = LeaderRecord {
            node: "a".into(),
            region: "r".into(),
            pg_addr: "h:1".into(),
            epoch: Epoch(3),
            timeline: 1,
            state: LeaderState::Serving,
            since: 0,
            candidate: None,
        };
        assert_eq!(replicas_of(&leader, &members), vec!["b", "c"]);
        // A stale replica record of the leader's own node never counts.
        leader.node = "b".into();
        assert_eq!(replicas_of(&leader, &members), vec!["c"]);
    }
}
