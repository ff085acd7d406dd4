//! Pure batching of committed transactions into `Changes` batches, and the
//! bookkeeping that decides how far the replication slot may be confirmed.
//!
//! Transactions ([`Batcher::push`]) accumulate into one pending batch (the union
//! of their tables, the highest end LSN). The pending batch is flushed when it
//! is `flush_interval` old or holds `max_txs` transactions, unless
//! `max_in_flight` batches already wait for the coordinator's ack: then it keeps
//! merging (memory stays bounded by the number of tables). Every flushed batch
//! stays in flight until acked; after a reconnect the caller re-sends
//! [`Batcher::in_flight`] in order. [`Batcher::confirmable`] is the highest LSN
//! such that its batch and every earlier one are acked: the only position the
//! slot may report as flushed, so a restart of the agent or the coordinator
//! replays, never loses, a change. Time is passed in; no I/O here.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use meridian_shared::lsn::Lsn;

/// Batching limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Longest a transaction waits in the pending batch (default 10 ms).
    pub flush_interval: Duration,
    /// Transactions after which the pending batch is flushed at once (default 256).
    pub max_txs: usize,
    /// Batches sent but not acked before flushing pauses (default 64).
    pub max_in_flight: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            flush_interval: Duration::from_millis(10),
            max_txs: 256,
            max_in_flight: 64,
        }
    }
}

/// One batch as sent in `AgentMsg::Changes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch_id: u64,
    /// Sorted, deduplicated `schema.table` names.
    pub tables: Vec<String>,
    pub commit_lsn: Lsn,
}

#[derive(Debug)]
struct Pending {
    tables: BTreeSet<String>,
    lsn: Lsn,
    txs: usize,
    since: Instant,
}

#[derive(Debug)]
struct InFlight {
    batch: Batch,
    acked: bool,
}

/// The batching state machine of one replication session.
#[derive(Debug)]
pub struct Batcher {
    cfg: BatcherConfig,
    next_id: u64,
    pending: Option<Pending>,
    in_flight: VecDeque<InFlight>,
    /// Highest LSN of table-less progress seen while nothing was pending.
    idle_lsn: Lsn,
    confirmed: Lsn,
}

impl Batcher {
    /// A batcher whose slot is confirmed up to `start` (its `confirmed_flush_lsn`).
    pub fn new(cfg: BatcherConfig, start: Lsn) -> Self {
        Batcher::with_first_id(cfg, start, 1)
    }

    /// Like [`Batcher::new`], numbering batches from `first_id`: a new
    /// replication session picks a fresh range (e.g. from the clock) so a late
    /// ack for an earlier session's batch cannot confirm one of this session.
    pub fn with_first_id(cfg: BatcherConfig, start: Lsn, first_id: u64) -> Self {
        Batcher {
            cfg,
            next_id: first_id,
            pending: None,
            in_flight: VecDeque::new(),
            idle_lsn: start,
            confirmed: start,
        }
    }

    /// Adds a committed transaction. A transaction without tables only moves
    /// the position (it is confirmed once everything before it is acked).
    /// Returns a batch to send when the pending one became full.
    pub fn push(
        &mut self,
        tables: impl IntoIterator<Item = String>,
        end_lsn: Lsn,
        now: Instant,
    ) -> Option<Batch> {
        let mut tables = tables.into_iter().peekable();
        match &mut self.pending {
            Some(p) => {
                p.tables.extend(tables);
                p.lsn = p.lsn.max(end_lsn);
                p.txs += 1;
            }
            None if tables.peek().is_none() => {
                self.idle_lsn = self.idle_lsn.max(end_lsn);
                self.settle();
                return None;
            }
            None => {
                self.pending = Some(Pending {
                    tables: tables.collect(),
                    lsn: end_lsn,
                    txs: 1,
                    since: now,
                });
            }
        }
        let full = self
            .pending
            .as_ref()
            .is_some_and(|p| p.txs >= self.cfg.max_txs);
        if full {
            self.flush()
        } else {
            None
        }
    }

    /// Progress without changes (a keepalive's WAL end while no transaction is
    /// open): confirmable once everything before it is acked.
    pub fn advance_idle(&mut self, lsn: Lsn) {
        match &mut self.pending {
            Some(p) => p.lsn = p.lsn.max(lsn),
            None => {
                self.idle_lsn = self.idle_lsn.max(lsn);
                self.settle();
            }
        }
    }

    /// The pending batch, if it is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Batch> {
        let due = self
            .pending
            .as_ref()
            .is_some_and(|p| now.saturating_duration_since(p.since) >= self.cfg.flush_interval);
        if due {
            self.flush()
        } else {
            None
        }
    }

    /// When [`Batcher::poll`] will next have something to flush.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.in_flight.len() >= self.cfg.max_in_flight {
            return None;
        }
        self.pending
            .as_ref()
            .map(|p| p.since + self.cfg.flush_interval)
    }

    fn flush(&mut self) -> Option<Batch> {
        if self.in_flight.len() >= self.cfg.max_in_flight {
            return None;
        }
        let p = self.pending.take()?;
        let batch = Batch {
            batch_id: self.next_id,
            tables: p.tables.into_iter().collect(),
            commit_lsn: p.lsn,
        };
        self.next_id += 1;
        self.in_flight.push_back(InFlight {
            batch: batch.clone(),
            acked: false,
        });
        Some(batch)
    }

    /// The coordinator acked `batch_id`; returns whether it was in flight.
    pub fn ack(&mut self, batch_id: u64) -> bool {
        let Some(f) = self
            .in_flight
            .iter_mut()
            .find(|f| f.batch.batch_id == batch_id)
        else {
            return false;
        };
        f.acked = true;
        self.settle();
        true
    }

    fn settle(&mut self) {
        while self.in_flight.front().is_some_and(|f| f.acked) {
            if let Some(f) = self.in_flight.pop_front() {
                self.confirmed = self.confirmed.max(f.batch.commit_lsn);
            }
        }
        if self.in_flight.is_empty() {
            self.confirmed = self.confirmed.max(self.idle_lsn);
        }
    }

    /// The highest LSN the replication slot may be confirmed to.
    pub fn confirmable(&self) -> Lsn {
        self.confirmed
    }

    /// Batches sent and not acked yet, oldest first (re-send after a reconnect).
    pub fn in_flight(&self) -> impl Iterator<Item = &Batch> {
        self.in_flight.iter().filter(|f| !f.acked).map(|f| &f.batch)
    }

    /// Whether a transaction waits in the pending batch.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn cfg() -> BatcherConfig {
        BatcherConfig {
            flush_interval: Duration::from_millis(10),
            max_txs: 3,
            max_in_flight: 2,
        }
    }

    #[test]
    fn flushes_after_the_interval_with_the_union_of_tables() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(), Lsn(5));
        assert_eq!(b.push(t(&["public.b"]), Lsn(10), t0), None);
        assert_eq!(b.push(t(&["public.a", "public.b"]), Lsn(20), t0), None);
        assert_eq!(b.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(b.poll(t0 + Duration::from_millis(9)), None);
        let batch = b.poll(t0 + Duration::from_millis(10)).unwrap();
        assert_eq!(
            batch,
            Batch {
                batch_id: 1,
                tables: t(&["public.a", "public.b"]),
                commit_lsn: Lsn(20)
            }
        );
        assert_eq!(b.poll(t0 + Duration::from_secs(1)), None);
        assert_eq!(b.confirmable(), Lsn(5), "nothing acked yet");
    }

    #[test]
    fn flushes_at_once_after_max_txs() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(), Lsn(0));
        assert!(b.push(t(&["s.a"]), Lsn(1), t0).is_none());
        assert!(b.push(t(&["s.a"]), Lsn(2), t0).is_none());
        let batch = b.push(t(&["s.c"]), Lsn(3), t0).unwrap();
        assert_eq!(batch.tables, t(&["s.a", "s.c"]));
        assert_eq!(batch.commit_lsn, Lsn(3));
        assert!(!b.has_pending());
    }

    #[test]
    fn confirmation_waits_for_every_earlier_batch() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(20);
        let mut b = Batcher::new(cfg(), Lsn(0));
        b.push(t(&["s.a"]), Lsn(10), t0);
        let one = b.poll(later).unwrap();
        b.push(t(&["s.b"]), Lsn(20), t0);
        let two = b.poll(later).unwrap();
        assert!(b.ack(two.batch_id));
        assert_eq!(b.confirmable(), Lsn(0), "batch 1 is not acked yet");
        assert_eq!(
            b.in_flight().map(|x| x.batch_id).collect::<Vec<_>>(),
            vec![1]
        );
        assert!(b.ack(one.batch_id));
        assert_eq!(b.confirmable(), Lsn(20));
        assert!(!b.ack(one.batch_id), "already settled");
        assert!(!b.ack(99));
    }

    #[test]
    fn table_less_progress_is_confirmed_only_behind_acked_batches() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(20);
        let mut b = Batcher::new(cfg(), Lsn(0));
        // Nothing in flight: confirmed at once.
        assert!(b.push(Vec::new(), Lsn(7), t0).is_none());
        assert_eq!(b.confirmable(), Lsn(7));
        b.push(t(&["s.a"]), Lsn(10), t0);
        let one = b.poll(later).unwrap();
        b.advance_idle(Lsn(15));
        assert_eq!(b.confirmable(), Lsn(7), "batch 1 still in flight");
        b.ack(one.batch_id);
        assert_eq!(b.confirmable(), Lsn(15));
        // Idle progress while a batch is pending joins that batch.
        b.push(t(&["s.a"]), Lsn(20), t0);
        b.advance_idle(Lsn(25));
        let two = b.poll(later).unwrap();
        assert_eq!(two.commit_lsn, Lsn(25));
    }

    #[test]
    fn in_flight_limit_pauses_flushing_and_merges() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(20);
        let mut b = Batcher::new(cfg(), Lsn(0));
        for (i, name) in ["s.a", "s.b"].iter().enumerate() {
            b.push(t(&[name]), Lsn(10 * (i as u64 + 1)), t0);
            assert!(b.poll(later).is_some());
        }
        b.push(t(&["s.c"]), Lsn(30), t0);
        b.push(t(&["s.d"]), Lsn(40), t0);
        assert_eq!(b.poll(later), None, "two batches in flight");
        assert_eq!(b.next_deadline(), None);
        assert_eq!(b.push(t(&["s.e"]), Lsn(50), t0), None, "full but paused");
        b.ack(1);
        let three = b.poll(later).unwrap();
        assert_eq!(three.batch_id, 3);
        assert_eq!(three.tables, t(&["s.c", "s.d", "s.e"]));
        assert_eq!(three.commit_lsn, Lsn(50));
        assert_eq!(b.confirmable(), Lsn(10));
        assert_eq!(
            b.in_flight().map(|x| x.batch_id).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }
}
