//! The agent's decisions, as pure functions of what it observed (time passed in):
//! what to do with the node at start-up, when to fence itself for lack of a
//! lease, whether a command's epoch is stale, whether to rejoin a newer leader
//! on its own, whether a dead postmaster may be restarted, and which address of
//! the leader a standby dials from its region.
//!
//! The I/O shell ([`crate::controller`], [`crate::member`], [`crate::probe`])
//! gathers the inputs and carries out the result; nothing here touches a
//! process, a file or the network. The rules follow `docs/control-path.md`.

use std::time::{Duration, Instant};

use meridian_shared::epoch::Epoch;
use meridian_shared::records::{LeaderRecord, LeaderState, MemberRecord, NodeRef, Role};

/// What the agent found on its machine at start-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalState {
    /// The data directory holds no cluster (`PG_VERSION` missing).
    pub data_dir_empty: bool,
    /// A postmaster runs on the data directory (`postmaster.pid` with a live pid).
    pub postmaster_running: bool,
    /// `standby.signal` exists: the data directory was a standby.
    pub was_standby: bool,
}

/// What to do with the node at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartupAction {
    /// A postmaster already runs (the agent was restarted): keep it, never restart it.
    Adopt,
    /// `initdb` a new cluster and start it as the primary.
    Bootstrap,
    /// Start the existing primary data directory (etcd knows no leader and this
    /// agent may bootstrap: a whole-cluster restart).
    StartPrimary,
    /// Nothing to do until a (serving) leader appears; decide again then.
    WaitForLeader,
    /// Empty data directory: `pg_basebackup` from the leader and start as its standby.
    Clone { from: NodeRef },
    /// A standby data directory: start it as a standby of the leader.
    StartStandby { of: NodeRef },
    /// A primary data directory while another node leads: rewind and follow it.
    Rejoin { of: NodeRef },
    /// This node is (or is becoming) the recorded leader but Postgres is stopped:
    /// do not start it alone; the coordinator sends `Promote`.
    AwaitPromote,
}

fn leader_ref(leader: &LeaderRecord) -> NodeRef {
    NodeRef {
        node: leader.node.clone(),
        region: leader.region.clone(),
        pg_addr: leader.pg_addr.clone(),
    }
}

/// The start-up decision (see [`StartupAction`]).
pub fn decide_startup(
    local: LocalState,
    leader: Option<&LeaderRecord>,
    me: &str,
    bootstrap: bool,
) -> StartupAction {
    if local.postmaster_running {
        return StartupAction::Adopt;
    }
    let Some(leader) = leader else {
        return match (local.data_dir_empty, local.was_standby, bootstrap) {
            (true, _, true) => StartupAction::Bootstrap,
            (false, false, true) => StartupAction::StartPrimary,
            _ => StartupAction::WaitForLeader,
        };
    };
    if leader.node == me {
        return if local.data_dir_empty {
            // The leader's data is gone: only a failover can help.
            StartupAction::WaitForLeader
        } else {
            StartupAction::AwaitPromote
        };
    }
    match leader.state {
        LeaderState::Serving => {
            let of = leader_ref(leader);
            if local.data_dir_empty {
                StartupAction::Clone { from: of }
            } else if local.was_standby {
                StartupAction::StartStandby { of }
            } else {
                StartupAction::Rejoin { of }
            }
        }
        LeaderState::FailingOver => {
            let candidate_is_me = leader.candidate.as_ref().is_some_and(|c| c.node == me);
            if local.data_dir_empty {
                StartupAction::WaitForLeader
            } else if candidate_is_me {
                StartupAction::AwaitPromote
            } else if local.was_standby {
                // A running standby can be chosen or told to follow; a stopped one cannot.
                StartupAction::StartStandby {
                    of: leader_ref(leader),
                }
            } else {
                StartupAction::WaitForLeader
            }
        }
    }
}

/// Whether a node running as primary must stop its Postgres now: its lease was
/// last renewed `ttl - margin` ago or longer, so it may expire before the next
/// renewal and another node may be promoted.
pub fn must_self_fence(
    now: Instant,
    last_renewed: Instant,
    ttl: Duration,
    margin: Duration,
    running_as_primary: bool,
) -> bool {
    running_as_primary && now.saturating_duration_since(last_renewed) >= ttl.saturating_sub(margin)
}

/// Whether the member lease has missed a renewal (kept alive every `ttl / 3`):
/// the failsafe check runs from then on.
pub fn lease_renewal_missed(now: Instant, last_renewed: Instant, ttl: Duration) -> bool {
    now.saturating_duration_since(last_renewed) > ttl / 3 + Duration::from_millis(100)
}

/// Whether the failsafe keeps a primary whose lease is late writable at `now`:
/// every replica confirmed it until `failsafe_until` ([`meridian_shared::failsafe`]).
pub fn failsafe_holds(now: Instant, failsafe_until: Option<Instant>) -> bool {
    failsafe_until.is_some_and(|until| now < until)
}

/// Whether a failsafe round may count for this node: etcd last named it the
/// serving leader, and the node carries that leader's epoch (`meridian.epoch`,
/// as read in the round). Judged against the leader record, not against the
/// epoch this agent process promoted the node under: an agent restarted beside
/// a running primary adopts it without having promoted it.
pub fn failsafe_round_counts(
    leader: Option<&LeaderRecord>,
    me: &str,
    node_epoch: Option<&str>,
) -> bool {
    leader.is_some_and(|l| {
        l.is_serving() && l.node == me && node_epoch == Some(l.epoch.to_string().as_str())
    })
}

/// The command-vs-epoch rule: a command whose epoch is lower than the highest the
/// agent has seen is refused with that epoch (`Ack Stale { current }`).
pub fn check_command_epoch(command: Epoch, highest_seen: Epoch) -> Result<(), Epoch> {
    if command.is_stale(highest_seen) {
        Err(highest_seen)
    } else {
        Ok(())
    }
}

/// Whether a `Promote` or `Follow` of `command` epoch lifts a fence set at `fenced_at`.
pub fn lifts_fence(fenced_at: Option<Epoch>, command: Epoch) -> bool {
    fenced_at.is_none_or(|at| command >= at)
}

/// Whether this node must fence itself and rejoin `leader` without waiting for a
/// command: another node is the serving leader of an epoch above the one this
/// node was promoted under, while this node's Postgres runs as a primary.
pub fn should_rejoin(
    leader: &LeaderRecord,
    me: &str,
    running_as_primary: bool,
    node_epoch: Epoch,
) -> bool {
    running_as_primary && leader.is_serving() && leader.node != me && leader.epoch > node_epoch
}

/// What the agent wants of its Postgres between commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    /// Nothing yet (waiting for a leader or a command), or fenced.
    Idle,
    /// Run as a primary; a crash is reported, not repaired.
    Primary,
    /// Run as a standby; a crash is repaired at once.
    Standby,
}

/// Whether a dead postmaster is restarted by the agent itself: only a standby,
/// only when no operation is under way and the node is not fenced.
pub fn should_restart(
    intent: Intent,
    postmaster_alive: bool,
    busy: bool,
    fenced: Option<Epoch>,
) -> bool {
    intent == Intent::Standby && !postmaster_alive && !busy && fenced.is_none()
}

/// The role reported for the node: what Postgres said when it answered, else the
/// role it last had (a crashed primary still reports `primary` with `pg_up = false`).
pub fn reported_role(in_recovery: Option<bool>, last: Role) -> Role {
    match in_recovery {
        Some(true) => Role::Replica,
        Some(false) => Role::Primary,
        None => last,
    }
}

/// The physical replication slot of `node` on its upstream: the contract's rule
/// (`-` → `_`), plus lower-casing and `_` for any other character a slot name
/// cannot hold (slot names allow `[a-z0-9_]` only).
pub fn slot_name(node: &str) -> String {
    node.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect()
}

/// `replay_lag_ms` as reported: 0 when everything received is replayed, else
/// the age of the last replayed transaction (never negative).
pub fn replay_lag_ms(caught_up: bool, last_replay_age_ms: Option<i64>) -> Option<u64> {
    if caught_up {
        return Some(0);
    }
    last_replay_age_ms.map(|ms| u64::try_from(ms).unwrap_or(0))
}

/// The `upstream` of a heartbeat: the node name when the WAL receiver's
/// `host:port` is that of a known node, else the address itself.
pub fn upstream_name(sender: Option<&str>, known: &[(&str, &str)]) -> Option<String> {
    let sender = sender?;
    Some(
        known
            .iter()
            .find(|(_, addr)| *addr == sender)
            .map(|(name, _)| (*name).to_owned())
            .unwrap_or_else(|| sender.to_owned()),
    )
}

/// The address a standby in `region` dials to follow a leader advertised as
/// `advertised` (the `pg_addr` of a `Follow` command or of the `leader` record):
/// the leader's `pg_addrs` entry for `region` (its `members/<leader>` record),
/// when that record describes the same node address; otherwise `advertised`.
/// A record with another `pg_addr` (stale, or a node restarted elsewhere) is not
/// trusted for the regional address.
pub fn follow_addr(advertised: &str, leader_member: Option<&MemberRecord>, region: &str) -> String {
    match leader_member {
        Some(m) if m.pg_addr == advertised => m.pg_addr_for(region).to_owned(),
        _ => advertised.to_owned(),
    }
}

/// Whether a WAL receiver (`pg_stat_wal_receiver`: status, sender host and port,
/// received timeline) streams from `host:port` on timeline `tli` or later. A
/// diverged standby briefly streams the old timeline up to the fork point and
/// then stops, so `streaming` alone is not enough once the timeline is known.
pub fn streams_from(
    status: Option<&str>,
    sender_host: Option<&str>,
    sender_port: Option<i32>,
    received_tli: Option<i32>,
    host: &str,
    port: u16,
    tli: Option<u32>,
) -> bool {
    status == Some("streaming")
        && sender_host == Some(host)
        && sender_port == Some(i32::from(port))
        && tli.is_none_or(|want| {
            received_tli
                .and_then(|t| u32::try_from(t).ok())
                .is_some_and(|got| got >= want)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(node: &str, epoch: u64, state: LeaderState) -> LeaderRecord {
        LeaderRecord {
            node: node.into(),
            region: "r".into(),
            pg_addr: format!("{node}:5432"),
            epoch: Epoch(epoch),
            timeline: 1,
            state,
            since: 0,
            candidate: None,
        }
    }

    #[test]
    fn a_failsafe_round_counts_for_the_serving_leader_in_its_epoch() {
        let l = leader("a", 4, LeaderState::Serving);
        assert!(failsafe_round_counts(Some(&l), "a", Some("4")));
        // An agent restarted beside its primary knows no promotion of its own: the
        // record is what counts.
        assert!(!failsafe_round_counts(Some(&l), "a", Some("3")));
        assert!(!failsafe_round_counts(Some(&l), "a", None));
        assert!(!failsafe_round_counts(Some(&l), "b", Some("4")));
        assert!(!failsafe_round_counts(None, "a", Some("4")));
        let failing = leader("a", 4, LeaderState::FailingOver);
        assert!(!failsafe_round_counts(Some(&failing), "a", Some("4")));
    }

    const EMPTY: LocalState = LocalState {
        data_dir_empty: true,
        postmaster_running: false,
        was_standby: false,
    };
    const PRIMARY_DIR: LocalState = LocalState {
        data_dir_empty: false,
        postmaster_running: false,
        was_standby: false,
    };
    const STANDBY_DIR: LocalState = LocalState {
        data_dir_empty: false,
        postmaster_running: false,
        was_standby: true,
    };

    #[test]
    fn a_running_postmaster_is_always_adopted() {
        let running = LocalState {
            postmaster_running: true,
            ..PRIMARY_DIR
        };
        let other = leader("b", 3, LeaderState::Serving);
        for l in [None, Some(&other)] {
            for bootstrap in [false, true] {
                assert_eq!(
                    decide_startup(running, l, "a", bootstrap),
                    StartupAction::Adopt
                );
            }
        }
    }

    #[test]
    fn bootstrap_only_with_the_flag_and_no_leader() {
        assert_eq!(
            decide_startup(EMPTY, None, "a", true),
            StartupAction::Bootstrap
        );
        assert_eq!(
            decide_startup(EMPTY, None, "a", false),
            StartupAction::WaitForLeader
        );
        let l = leader("b", 1, LeaderState::Serving);
        match decide_startup(EMPTY, Some(&l), "a", true) {
            StartupAction::Clone { from } => assert_eq!(from.node, "b"),
            other => panic!("{other:?}"),
        }
        // A whole-cluster restart: the bootstrap node starts its primary.
        assert_eq!(
            decide_startup(PRIMARY_DIR, None, "a", true),
            StartupAction::StartPrimary
        );
        assert_eq!(
            decide_startup(PRIMARY_DIR, None, "a", false),
            StartupAction::WaitForLeader
        );
        assert_eq!(
            decide_startup(STANDBY_DIR, None, "a", true),
            StartupAction::WaitForLeader
        );
    }

    #[test]
    fn the_recorded_leader_is_never_started_alone() {
        let me = leader("a", 2, LeaderState::Serving);
        assert_eq!(
            decide_startup(PRIMARY_DIR, Some(&me), "a", true),
            StartupAction::AwaitPromote
        );
        assert_eq!(
            decide_startup(STANDBY_DIR, Some(&me), "a", false),
            StartupAction::AwaitPromote
        );
        assert_eq!(
            decide_startup(EMPTY, Some(&me), "a", true),
            StartupAction::WaitForLeader
        );
    }

    #[test]
    fn others_lead_standbys_start_old_primaries_rejoin() {
        let l = leader("b", 2, LeaderState::Serving);
        match decide_startup(STANDBY_DIR, Some(&l), "a", false) {
            StartupAction::StartStandby { of } => assert_eq!(of.pg_addr, "b:5432"),
            other => panic!("{other:?}"),
        }
        match decide_startup(PRIMARY_DIR, Some(&l), "a", false) {
            StartupAction::Rejoin { of } => assert_eq!(of.node, "b"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn during_a_failover() {
        let mut l = leader("b", 2, LeaderState::FailingOver);
        assert_eq!(
            decide_startup(EMPTY, Some(&l), "a", false),
            StartupAction::WaitForLeader
        );
        assert_eq!(
            decide_startup(PRIMARY_DIR, Some(&l), "a", false),
            StartupAction::WaitForLeader
        );
        assert!(matches!(
            decide_startup(STANDBY_DIR, Some(&l), "a", false),
            StartupAction::StartStandby { .. }
        ));
        l.candidate = Some(NodeRef {
            node: "a".into(),
            region: "r".into(),
            pg_addr: "a:5432".into(),
        });
        assert_eq!(
            decide_startup(STANDBY_DIR, Some(&l), "a", false),
            StartupAction::AwaitPromote
        );
    }

    #[test]
    fn self_fence_before_the_lease_can_expire() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        let margin = Duration::from_secs(1);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(!must_self_fence(at(1999), t0, ttl, margin, true));
        assert!(must_self_fence(at(2000), t0, ttl, margin, true));
        assert!(must_self_fence(at(10_000), t0, ttl, margin, true));
        // Only a primary fences itself.
        assert!(!must_self_fence(at(10_000), t0, ttl, margin, false));
        // A renewal after `now` (clock order) never fences.
        assert!(!must_self_fence(t0, at(5), ttl, margin, true));
        // A margin above the TTL fences at once.
        assert!(must_self_fence(t0, t0, ttl, Duration::from_secs(5), true));
    }

    #[test]
    fn the_failsafe_starts_after_a_missed_renewal_and_holds_until_its_deadline() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(!lease_renewal_missed(at(1100), t0, ttl));
        assert!(lease_renewal_missed(at(1101), t0, ttl));
        assert!(!failsafe_holds(at(10), None));
        assert!(failsafe_holds(at(10), Some(at(11))));
        assert!(!failsafe_holds(at(11), Some(at(11))));
    }

    #[test]
    fn stale_commands_are_refused_with_the_current_epoch() {
        assert_eq!(check_command_epoch(Epoch(3), Epoch(3)), Ok(()));
        assert_eq!(check_command_epoch(Epoch(4), Epoch(3)), Ok(()));
        assert_eq!(check_command_epoch(Epoch(2), Epoch(3)), Err(Epoch(3)));
        assert_eq!(check_command_epoch(Epoch(0), Epoch::ZERO), Ok(()));
    }

    #[test]
    fn fences_are_lifted_by_equal_or_newer_epochs() {
        assert!(lifts_fence(None, Epoch(1)));
        assert!(lifts_fence(Some(Epoch(3)), Epoch(3)));
        assert!(lifts_fence(Some(Epoch(3)), Epoch(4)));
        assert!(!lifts_fence(Some(Epoch(3)), Epoch(2)));
    }

    #[test]
    fn rejoin_only_a_stale_running_primary() {
        let l = leader("b", 3, LeaderState::Serving);
        assert!(should_rejoin(&l, "a", true, Epoch(2)));
        assert!(!should_rejoin(&l, "a", false, Epoch(2)), "not a primary");
        assert!(!should_rejoin(&l, "b", true, Epoch(2)), "it is the leader");
        assert!(!should_rejoin(&l, "a", true, Epoch(3)), "not newer");
        let failing = leader("b", 3, LeaderState::FailingOver);
        assert!(!should_rejoin(&failing, "a", true, Epoch(2)), "not serving");
    }

    #[test]
    fn only_standbys_are_restarted() {
        assert!(should_restart(Intent::Standby, false, false, None));
        assert!(!should_restart(Intent::Standby, true, false, None));
        assert!(!should_restart(Intent::Standby, false, true, None));
        assert!(!should_restart(
            Intent::Standby,
            false,
            false,
            Some(Epoch(1))
        ));
        assert!(!should_restart(Intent::Primary, false, false, None));
        assert!(!should_restart(Intent::Idle, false, false, None));
    }

    #[test]
    fn streaming_means_the_right_upstream_and_timeline() {
        let ok =
            |status, host, port, tli, want| streams_from(status, host, port, tli, "h", 5432, want);
        assert!(ok(
            Some("streaming"),
            Some("h"),
            Some(5432),
            Some(2),
            Some(2)
        ));
        assert!(ok(
            Some("streaming"),
            Some("h"),
            Some(5432),
            Some(3),
            Some(2)
        ));
        assert!(ok(Some("streaming"), Some("h"), Some(5432), None, None));
        // A diverged standby streams the old timeline for a moment.
        assert!(!ok(
            Some("streaming"),
            Some("h"),
            Some(5432),
            Some(1),
            Some(2)
        ));
        assert!(!ok(Some("streaming"), Some("h"), Some(5432), None, Some(2)));
        assert!(!ok(
            Some("startup"),
            Some("h"),
            Some(5432),
            Some(2),
            Some(2)
        ));
        assert!(!ok(
            Some("streaming"),
            Some("other"),
            Some(5432),
            Some(2),
            Some(2)
        ));
        assert!(!ok(Some("streaming"), Some("h"), Some(1), Some(2), Some(2)));
        assert!(!ok(None, None, None, None, None));
    }

    #[test]
    fn roles_and_names() {
        assert_eq!(reported_role(Some(true), Role::Primary), Role::Replica);
        assert_eq!(reported_role(Some(false), Role::Replica), Role::Primary);
        assert_eq!(reported_role(None, Role::Primary), Role::Primary);
        assert_eq!(slot_name("us-east-1"), "us_east_1");
        assert_eq!(slot_name("Node.2"), "node_2");
        assert_eq!(replay_lag_ms(true, Some(500)), Some(0));
        assert_eq!(replay_lag_ms(false, Some(500)), Some(500));
        assert_eq!(replay_lag_ms(false, Some(-3)), Some(0));
        assert_eq!(replay_lag_ms(false, None), None);
        let known = [("b", "127.0.0.1:5433")];
        assert_eq!(
            upstream_name(Some("127.0.0.1:5433"), &known).as_deref(),
            Some("b")
        );
        assert_eq!(
            upstream_name(Some("127.0.0.1:9"), &known).as_deref(),
            Some("127.0.0.1:9")
        );
        assert_eq!(upstream_name(None, &known), None);
    }

    #[test]
    fn a_standby_dials_the_leaders_address_for_its_own_region() {
        let mut m = MemberRecord {
            region: "us-east".into(),
            pg_addr: "127.0.0.1:7000".into(),
            agent_addr: String::new(),
            role: Role::Primary,
            tags: Default::default(),
            version: None,
            pg_addrs: [
                ("us-east".to_owned(), "127.0.0.1:7000".to_owned()),
                ("eu-west".to_owned(), "127.0.0.1:7001".to_owned()),
            ]
            .into(),
        };
        assert_eq!(
            follow_addr("127.0.0.1:7000", Some(&m), "eu-west"),
            "127.0.0.1:7001"
        );
        assert_eq!(
            follow_addr("127.0.0.1:7000", Some(&m), "us-east"),
            "127.0.0.1:7000"
        );
        // A region the leader does not list, no record, or a record naming
        // another address: the advertised address.
        assert_eq!(
            follow_addr("127.0.0.1:7000", Some(&m), "ap-south"),
            "127.0.0.1:7000"
        );
        assert_eq!(
            follow_addr("127.0.0.1:7000", None, "eu-west"),
            "127.0.0.1:7000"
        );
        m.pg_addr = "10.0.0.9:5432".into();
        assert_eq!(
            follow_addr("127.0.0.1:7000", Some(&m), "eu-west"),
            "127.0.0.1:7000"
        );
        m.pg_addr = "127.0.0.1:7000".into();
        m.pg_addrs.clear();
        assert_eq!(
            follow_addr("127.0.0.1:7000", Some(&m), "eu-west"),
            "127.0.0.1:7000"
        );
    }
}
