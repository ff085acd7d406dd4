//! Seeded random fault schedules (pure): the same seed and length always give the same
//! schedule, so a failing run is replayed with `MERIDIAN_NEMESIS_SEED`.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// One kind of fault, applied to whatever node or coordinator holds the role when it
/// starts (the primary moves between faults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// `kill -9` of the primary's postmaster (its agent stays): a failover, the old
    /// primary rejoins as a replica.
    KillPrimaryPostmaster,
    /// `kill -9` of the primary's agent only, restarted after the hold.
    KillPrimaryAgent,
    /// The whole primary node lost: `kill -9` of its agent and its postmaster; after
    /// the hold its agent starts again and must bring the node back as a replica.
    KillPrimaryNode,
    /// SIGSTOP of the primary's postmaster and every backend for the hold, then SIGCONT:
    /// a primary that wakes up after a failover must not acknowledge a write.
    PausePrimaryPostgres,
    /// SIGSTOP of the primary's agent for the hold (past the lease TTL the node is
    /// replaced; the agent wakes up to a newer epoch and must fence itself).
    PausePrimaryAgent,
    /// Every link of the primary cut (Postgres from every region, its agent's etcd and
    /// QUIC) for the hold.
    PartitionPrimary,
    /// `kill -9` of the active coordinator, restarted after the hold.
    KillActiveCoordinator,
    /// SIGSTOP of every coordinator for the hold.
    PauseCoordinators,
    /// Every agent's QUIC link to the coordinators cut for the hold (etcd and
    /// Postgres untouched): the coordinators hear no heartbeat at all, and must not
    /// replace a primary that their own probe still reaches.
    CutCoordinatorLinks,
    /// One region's Redis stopped for the hold.
    StopRedis,
    /// WAL replay paused on one replica (`pg_wal_replay_pause`) for the hold: reads
    /// that must see a session's writes may not be served by it.
    PauseReplicaReplay,
    /// One etcd member of three killed (`kill -9`) for the hold, then started again:
    /// the other two keep the quorum, so nothing may fail over and writes go on.
    KillEtcdMember,
    /// Two etcd members of three killed for the hold plus the lease TTL (quorum
    /// lost; the third still accepts connections but answers nothing), then started
    /// again: the failsafe must keep the primary serving, unfenced.
    KillEtcdMajority,
    /// etcd frozen (SIGSTOP of every member) for the hold plus the lease TTL: every
    /// agent, proxy and coordinator loses it. The failsafe must keep the primary
    /// serving, unfenced, through every proxy.
    EtcdLost,
    /// etcd frozen, then (past the lease TTL, the failsafe serving) the primary
    /// partitioned for the hold: it must fence itself with nobody promoted; etcd
    /// returns, a failover follows, then the partition heals.
    EtcdLostPartitionPrimary,
    /// etcd frozen, then the primary's postmaster killed; etcd returns after the
    /// hold and only then is a replica promoted.
    EtcdLostKillPrimary,
}

impl Fault {
    pub const ALL: [Fault; 16] = [
        Fault::KillPrimaryPostmaster,
        Fault::KillPrimaryAgent,
        Fault::KillPrimaryNode,
        Fault::PausePrimaryPostgres,
        Fault::PausePrimaryAgent,
        Fault::PartitionPrimary,
        Fault::KillActiveCoordinator,
        Fault::PauseCoordinators,
        Fault::CutCoordinatorLinks,
        Fault::StopRedis,
        Fault::PauseReplicaReplay,
        Fault::KillEtcdMember,
        Fault::KillEtcdMajority,
        Fault::EtcdLost,
        Fault::EtcdLostPartitionPrimary,
        Fault::EtcdLostKillPrimary,
    ];

    /// The faults of etcd members and of an etcd outage, alone and combined (issue 14 §2).
    pub const ETCD: [Fault; 5] = [
        Fault::KillEtcdMember,
        Fault::KillEtcdMajority,
        Fault::EtcdLost,
        Fault::EtcdLostPartitionPrimary,
        Fault::EtcdLostKillPrimary,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillPrimaryPostmaster => "kill -9 primary postmaster",
            Fault::KillPrimaryAgent => "kill -9 primary agent",
            Fault::KillPrimaryNode => "kill -9 primary node",
            Fault::PausePrimaryPostgres => "SIGSTOP primary postgres",
            Fault::PausePrimaryAgent => "SIGSTOP primary agent",
            Fault::PartitionPrimary => "partition primary",
            Fault::KillActiveCoordinator => "kill -9 active coordinator",
            Fault::PauseCoordinators => "SIGSTOP coordinators",
            Fault::CutCoordinatorLinks => "cut the coordinators' QUIC",
            Fault::StopRedis => "stop a region's redis",
            Fault::PauseReplicaReplay => "pause replay on a replica",
            Fault::KillEtcdMember => "kill -9 one etcd member of three",
            Fault::KillEtcdMajority => "kill -9 two etcd members of three",
            Fault::EtcdLost => "etcd lost",
            Fault::EtcdLostPartitionPrimary => "etcd lost + partition primary",
            Fault::EtcdLostKillPrimary => "etcd lost + kill -9 primary",
        }
    }
}

/// One step of a schedule: quiet time, then the fault for `hold`, then heal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub fault: Fault,
    /// Workload without faults before the fault starts.
    pub quiet: Duration,
    /// How long the fault lasts before it is healed (a kill: until the restart).
    pub hold: Duration,
    /// Which region a per-region fault hits (an index into the cluster's regions).
    pub region: usize,
}

/// `len` steps drawn from `kinds` (all of [`Fault::ALL`] when empty) with `seed`; holds of
/// 2-8 s, quiet times of 1-3 s.
pub fn schedule(seed: u64, len: usize, kinds: &[Fault], regions: usize) -> Vec<Step> {
    let kinds = if kinds.is_empty() {
        &Fault::ALL[..]
    } else {
        kinds
    };
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| Step {
            fault: kinds[rng.random_range(0..kinds.len())],
            quiet: Duration::from_millis(rng.random_range(1_000..=3_000)),
            hold: Duration::from_millis(rng.random_range(2_000..=8_000)),
            region: rng.random_range(0..regions.max(1)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        assert_eq!(schedule(7, 5, &[], 3), schedule(7, 5, &[], 3));
        assert_ne!(schedule(7, 5, &[], 3), schedule(8, 5, &[], 3));
        assert_eq!(schedule(7, 5, &[], 3).len(), 5);
    }

    #[test]
    fn bounds_and_kinds_hold() {
        let mut seen = BTreeSet::new();
        for seed in 0..200 {
            for s in schedule(seed, 4, &[], 3) {
                assert!((2_000..=8_000).contains(&s.hold.as_millis()), "{s:?}");
                assert!((1_000..=3_000).contains(&s.quiet.as_millis()), "{s:?}");
                assert!(s.region < 3);
                seen.insert(s.fault);
            }
        }
        assert_eq!(seen.len(), Fault::ALL.len(), "every kind is drawn");
        let only = schedule(1, 20, &[Fault::StopRedis], 2);
        assert!(only.iter().all(|s| s.fault == Fault::StopRedis));
    }
}
