//! The region's freshness lease, decided without I/O (`cache_keys::fresh_key`,
//! docs/cache.md "Why a served entry is never stale").
//!
//! Watermarks make an entry unservable once the region *learns* of a change; a
//! stalled invalidation stream (the primary's agent frozen, the coordinator
//! gone quiet, a link down) would let the region serve an old entry for as
//! long as the stall lasts. The lease closes that gap end to end: every agent
//! samples its own node's WAL position (replayed on a replica, flushed on the
//! primary) with the time of the probe, and hears the cluster's invalidation
//! horizon (`CoordMsg::Horizon`: every change up to that LSN is applied in
//! every usable region). When a sample taken at `t` is at or below the horizon,
//! the region's Redis holds every change this node had at `t`, so the cache is
//! no older than the node was at `t`; the lease is kept until `t + ttl`. While
//! changes keep committing and the horizon stops moving, samples overtake it
//! and the lease runs out within `ttl`: proxies then read from the replica.
//! With no new WAL the samples stay at the horizon and the lease is renewed,
//! so an idle cluster keeps its cache. Only clocks local to this agent are
//! used (monotonic time between its probe and the Redis write).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;

use crate::state::PgStatus;

/// Samples kept at most (the window is `ttl`; this bounds memory if probes run fast).
const MAX_SAMPLES: usize = 4096;

/// The node's position for a freshness sample: replayed on a replica, flushed
/// on a primary (what the walsender decoding the slot reads up to); none when
/// PostgreSQL did not answer.
pub fn node_position(status: &PgStatus) -> Option<Lsn> {
    match status.in_recovery? {
        true => status.replay_lsn,
        false => status.flush_lsn,
    }
}

/// What to write to the region's Redis: the lease of `epoch`, valid for `ttl`
/// from now; `horizon` is stored as the value (for operators).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub epoch: Epoch,
    pub horizon: Lsn,
    pub ttl: Duration,
}

/// The node's recent positions and the latest horizon heard.
#[derive(Debug, Default)]
pub struct Freshness {
    /// `(probe started, position)`, oldest first.
    samples: VecDeque<(Instant, Lsn)>,
    horizon: Option<(Epoch, Lsn)>,
}

impl Freshness {
    /// The coordinator relayed the horizon of `epoch`. Within an epoch it only
    /// rises; a newer epoch replaces it; an older one is ignored.
    pub fn observe_horizon(&mut self, epoch: Epoch, lsn: Lsn) {
        self.horizon = match self.horizon {
            Some((e, l)) if e == epoch => Some((e, l.max(lsn))),
            Some((e, l)) if e > epoch => Some((e, l)),
            _ => Some((epoch, lsn)),
        };
    }

    /// Drops a horizon of an epoch older than `current` (the agent saw a newer
    /// leader): nothing is known about the new epoch's stream yet.
    pub fn forget_before(&mut self, current: Epoch) {
        if self.horizon.is_some_and(|(e, _)| e < current) {
            self.horizon = None;
        }
    }

    /// The node was at `position` when the probe that read it started (`at`).
    /// Samples older than `keep` before `at` are dropped: they cannot give a
    /// lease any more.
    pub fn sample(&mut self, at: Instant, position: Lsn, keep: Duration) {
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) >= keep)
            || self.samples.len() >= MAX_SAMPLES
        {
            self.samples.pop_front();
        }
        self.samples.push_back((at, position));
    }

    /// The lease to write at `now`, if any: from the newest sample at or below
    /// the horizon, valid until that sample's time plus `ttl`.
    pub fn lease(&self, now: Instant, ttl: Duration) -> Option<Lease> {
        let (epoch, horizon) = self.horizon?;
        let (at, _) = self
            .samples
            .iter()
            .rev()
            .find(|(_, position)| *position <= horizon)?;
        let left = ttl.checked_sub(now.saturating_duration_since(*at))?;
        (!left.is_zero()).then_some(Lease {
            epoch,
            horizon,
            ttl: left,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(2);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_replica_samples_replay_and_a_primary_its_flush() {
        let replica = PgStatus {
            pg_up: true,
            in_recovery: Some(true),
            flush_lsn: Some(Lsn(30)),
            receive_lsn: Some(Lsn(30)),
            replay_lsn: Some(Lsn(20)),
            ..PgStatus::default()
        };
        assert_eq!(node_position(&replica), Some(Lsn(20)));
        let primary = PgStatus {
            pg_up: true,
            in_recovery: Some(false),
            write_lsn: Some(Lsn(50)),
            flush_lsn: Some(Lsn(40)),
            ..PgStatus::default()
        };
        assert_eq!(node_position(&primary), Some(Lsn(40)));
        assert_eq!(node_position(&PgStatus::default()), None);
    }

    #[test]
    fn no_lease_without_a_horizon_or_a_sample_under_it() {
        let t0 = Instant::now();
        let mut f = Freshness::default();
        f.sample(t0, Lsn(100), TTL);
        assert_eq!(f.lease(t0, TTL), None, "no horizon heard yet");
        f.observe_horizon(Epoch(1), Lsn(90));
        assert_eq!(f.lease(t0, TTL), None, "the node is ahead of every region");
        f.observe_horizon(Epoch(1), Lsn(100));
        assert_eq!(
            f.lease(t0 + ms(300), TTL),
            Some(Lease {
                epoch: Epoch(1),
                horizon: Lsn(100),
                ttl: ms(1700)
            })
        );
    }

    #[test]
    fn under_steady_writes_the_lease_follows_the_newest_sample_the_horizon_covers() {
        let t0 = Instant::now();
        let mut f = Freshness::default();
        // The node advances 10 per 100 ms; the horizon trails it by 300 ms.
        for i in 0..10u64 {
            f.sample(t0 + ms(100 * i), Lsn(100 + 10 * i), TTL);
        }
        f.observe_horizon(Epoch(1), Lsn(160));
        let lease = f.lease(t0 + ms(900), TTL).unwrap();
        assert_eq!(lease.ttl, TTL - ms(300), "from the sample at 600 ms (160)");
    }

    #[test]
    fn a_stalled_horizon_lets_the_lease_run_out_while_changes_go_on() {
        let t0 = Instant::now();
        let mut f = Freshness::default();
        f.observe_horizon(Epoch(1), Lsn(100));
        f.sample(t0, Lsn(100), TTL);
        // The stream stops; the node keeps replaying new commits.
        for i in 1..=19u64 {
            f.sample(t0 + ms(100 * i), Lsn(100 + i), TTL);
        }
        assert_eq!(f.lease(t0 + ms(1900), TTL).map(|l| l.ttl), Some(ms(100)));
        f.sample(t0 + ms(2000), Lsn(120), TTL);
        assert_eq!(f.lease(t0 + ms(2000), TTL), None, "expired with the sample");
        for i in 21..=25u64 {
            f.sample(t0 + ms(100 * i), Lsn(100 + i), TTL);
        }
        assert_eq!(f.lease(t0 + ms(2500), TTL), None);
        // The stream catches up: a lease again, from the newest sample.
        f.observe_horizon(Epoch(1), Lsn(125));
        assert_eq!(f.lease(t0 + ms(2500), TTL).map(|l| l.ttl), Some(TTL));
    }

    #[test]
    fn an_idle_node_keeps_its_lease() {
        let t0 = Instant::now();
        let mut f = Freshness::default();
        f.observe_horizon(Epoch(1), Lsn(100));
        for i in 0..100u64 {
            f.sample(t0 + ms(100 * i), Lsn(100), TTL);
        }
        assert_eq!(f.lease(t0 + ms(9900), TTL).map(|l| l.ttl), Some(TTL));
        assert!(f.samples.len() <= 21, "old samples are dropped");
    }

    #[test]
    fn epochs_replace_and_never_go_back() {
        let t0 = Instant::now();
        let mut f = Freshness::default();
        f.sample(t0, Lsn(50), TTL);
        f.observe_horizon(Epoch(2), Lsn(60));
        f.observe_horizon(Epoch(2), Lsn(55));
        assert_eq!(f.lease(t0, TTL).map(|l| l.horizon), Some(Lsn(60)));
        f.observe_horizon(Epoch(1), Lsn(500));
        assert_eq!(f.lease(t0, TTL).map(|l| l.epoch), Some(Epoch(2)));
        f.observe_horizon(Epoch(3), Lsn(40));
        assert_eq!(f.lease(t0, TTL), None, "epoch 3 has not reached 50 yet");
        f.forget_before(Epoch(3));
        f.observe_horizon(Epoch(3), Lsn(50));
        assert_eq!(f.lease(t0, TTL).map(|l| l.epoch), Some(Epoch(3)));
        f.forget_before(Epoch(4));
        assert_eq!(f.lease(t0, TTL), None, "a newer leader: nothing known");
    }
}
