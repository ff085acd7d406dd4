//! The history checker (pure): what was lost, what was seen that should not have been, and
//! how long writes were unavailable around each fault.
//!
//! - **Lost:** an insert acknowledged to its client whose id is not in the final log
//!   (allowed with asynchronous replication only when it was acknowledged in an epoch
//!   that a failover ended: reported with its size).
//! - **Failed but applied:** an insert that got a definite error (not class 08/57, not a
//!   timeout) whose id is in the final log.
//! - **Phantom:** an id in the final log that no client ever tried to insert.
//! - **Stale-epoch acknowledgement:** an insert acknowledged by a node of epoch `e` although
//!   an insert of a newer epoch had been acknowledged before it started (in real time):
//!   a replaced primary accepted a write after its successor served one.
//! - **Bank:** every read of the total (one statement, one snapshot, wherever it ran) and the
//!   final total equal the initial total; transfers move money, never make or lose it.
//! - **Transfers:** each transfer records its unique id in a ledger in its own transaction.
//!   Every account's final balance must be its start plus what the ledger moved in and out
//!   (a transfer applied twice, or applied without its ledger row, breaks that: no double
//!   transfer); an acknowledged transfer missing from the ledger is lost (asynchronous
//!   replication: allowed only across a failover, as for inserts), one that got a definite
//!   error and is in the ledger was applied although reported failed, and a ledger id no
//!   client tried is a phantom.
//! - **Sessions:** read-your-writes, monotonic reads and the causal token ([`sessions`]).
//! - **Unavailability:** per fault, the longest time within its window (start to converged)
//!   without an acknowledged write.

use std::collections::{BTreeMap, BTreeSet};

use super::history::{Kind, Op, Outcome};
use super::sessions::{self, SessionVerdicts};

/// The database at the end, read from the converged primary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Final {
    pub log_ids: BTreeSet<i64>,
    /// Account -> balance.
    pub balances: BTreeMap<i32, i64>,
    /// The transfer ledger: id -> what it moved.
    pub transfers: BTreeMap<i64, Transfer>,
}

/// One row of the transfer ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub from: i32,
    pub to: i32,
    pub amount: i64,
}

/// The bank as set up: accounts `1..=accounts`, each starting with `start_balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bank {
    pub accounts: i32,
    pub start_balance: i64,
}

impl Bank {
    /// The total, which no transfer changes.
    pub fn total(&self) -> i64 {
        i64::from(self.accounts) * self.start_balance
    }

    /// Accounts whose balance in `fin` is not their start plus what the ledger moved:
    /// `(account, balance, by the ledger)`.
    pub fn ledger_mismatches(&self, fin: &Final) -> Vec<(i32, i64, i64)> {
        let mut by_ledger: BTreeMap<i32, i64> = (1..=self.accounts)
            .map(|a| (a, self.start_balance))
            .collect();
        for t in fin.transfers.values() {
            *by_ledger.entry(t.from).or_default() -= t.amount;
            *by_ledger.entry(t.to).or_default() += t.amount;
        }
        by_ledger
            .into_iter()
            .filter_map(|(a, want)| {
                let got = fin.balances.get(&a).copied().unwrap_or(i64::MIN);
                (got != want).then_some((a, got, want))
            })
            .collect()
    }
}

/// A fault's window in the history's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ms: u64,
    pub end_ms: u64,
}

/// The verdicts of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdicts {
    pub acked_inserts: usize,
    /// Acknowledged inserts by the epoch of the node that committed them (`None`: the
    /// node carried none, which makes the stale-epoch check blind for that write).
    pub acked_by_epoch: BTreeMap<Option<u64>, usize>,
    pub indeterminate_inserts: usize,
    pub lost: Vec<i64>,
    /// Of `lost`, those acknowledged by a node of an epoch older than the newest one that
    /// acknowledged a write: lost in a failover (asynchronous replication's window).
    pub lost_in_failover: Vec<i64>,
    pub failed_but_applied: Vec<i64>,
    pub phantom: Vec<i64>,
    /// `(id, its epoch, the newer epoch acknowledged before it started)`.
    pub stale_epoch_acks: Vec<(i64, u64, u64)>,
    pub total_reads: usize,
    /// Totals read that differ from the expected one.
    pub bad_totals: Vec<i64>,
    pub final_total: i64,
    pub expected_total: i64,
    pub acked_transfers: usize,
    /// Acknowledged transfers missing from the ledger.
    pub lost_transfers: Vec<i64>,
    /// Of `lost_transfers`, those acknowledged in an epoch a failover ended.
    pub lost_transfers_in_failover: Vec<i64>,
    /// Transfers that got a definite error but are in the ledger.
    pub failed_transfers_applied: Vec<i64>,
    /// Ledger ids no client tried.
    pub phantom_transfers: Vec<i64>,
    /// `(account, balance, by the ledger)`: a transfer applied twice or partially.
    pub ledger_mismatches: Vec<(i32, i64, i64)>,
    /// Per window given, the longest stretch without an acknowledged write (ms).
    pub unavailable_ms: Vec<u64>,
    /// Of the windows given, those in which a newer epoch took over (acknowledged writes
    /// of a newer epoch by the window's end than by its start).
    pub failovers: Vec<Window>,
    pub sessions: SessionVerdicts,
}

impl Verdicts {
    /// Every violated property, as sentences (empty: the run is clean). With `synchronous`
    /// replication no acknowledged write may be lost; with asynchronous replication a loss
    /// is allowed only when a failover explains it ([`Verdicts::lost_in_failover`]).
    pub fn violations(&self, synchronous: bool) -> Vec<String> {
        let mut v = Vec::new();
        let unexplained: Vec<i64> = self
            .lost
            .iter()
            .filter(|id| synchronous || !self.lost_in_failover.contains(id))
            .copied()
            .collect();
        if !unexplained.is_empty() {
            v.push(format!(
                "{} acknowledged inserts lost{}: {:?}",
                unexplained.len(),
                if synchronous {
                    ""
                } else {
                    " without a failover"
                },
                first(&unexplained)
            ));
        }
        if !self.failed_but_applied.is_empty() {
            v.push(format!(
                "{} inserts reported failed were applied: {:?}",
                self.failed_but_applied.len(),
                first(&self.failed_but_applied)
            ));
        }
        if !self.phantom.is_empty() {
            v.push(format!(
                "phantom ids in the log: {:?}",
                first(&self.phantom)
            ));
        }
        if !self.stale_epoch_acks.is_empty() {
            v.push(format!(
                "{} writes acknowledged by a replaced primary: {:?}",
                self.stale_epoch_acks.len(),
                first(&self.stale_epoch_acks)
            ));
        }
        if let Some(n) = self.acked_by_epoch.get(&None) {
            v.push(format!(
                "{n} inserts were acknowledged by a node without meridian.epoch"
            ));
        }
        if !self.bad_totals.is_empty() {
            v.push(format!(
                "{} bank reads saw a total other than {}: {:?}",
                self.bad_totals.len(),
                self.expected_total,
                first(&self.bad_totals)
            ));
        }
        if self.final_total != self.expected_total {
            v.push(format!(
                "the final bank total is {}, not {}",
                self.final_total, self.expected_total
            ));
        }
        let unexplained: Vec<i64> = self
            .lost_transfers
            .iter()
            .filter(|id| synchronous || !self.lost_transfers_in_failover.contains(id))
            .copied()
            .collect();
        if !unexplained.is_empty() {
            v.push(format!(
                "{} acknowledged transfers lost{}: {:?}",
                unexplained.len(),
                if synchronous {
                    ""
                } else {
                    " without a failover"
                },
                first(&unexplained)
            ));
        }
        if !self.failed_transfers_applied.is_empty() {
            v.push(format!(
                "{} transfers reported failed were applied: {:?}",
                self.failed_transfers_applied.len(),
                first(&self.failed_transfers_applied)
            ));
        }
        if !self.phantom_transfers.is_empty() {
            v.push(format!(
                "phantom transfer ids in the ledger: {:?}",
                first(&self.phantom_transfers)
            ));
        }
        if !self.ledger_mismatches.is_empty() {
            v.push(format!(
                "balances disagree with the transfer ledger (account, balance, by the ledger; a transfer applied twice or in part): {:?}",
                first(&self.ledger_mismatches)
            ));
        }
        v.extend(self.sessions.violations(synchronous));
        v
    }
}

fn first<T: Clone>(v: &[T]) -> Vec<T> {
    v.iter().take(10).cloned().collect()
}

/// Checks `history` against the final state of `bank`; `windows`: the faults' windows.
pub fn check(history: &[Op], fin: &Final, bank: &Bank, windows: &[Window]) -> Verdicts {
    let expected_total = bank.total();
    let mut verdicts = Verdicts {
        final_total: fin.balances.values().sum(),
        expected_total,
        ledger_mismatches: bank.ledger_mismatches(fin),
        ..Verdicts::default()
    };
    let mut transfers_tried = BTreeSet::new();
    // (id, epoch) of acknowledged transfers.
    let mut acked_transfers: Vec<(i64, Option<u64>)> = Vec::new();
    let mut attempted = BTreeSet::new();
    // (start, end, id, epoch) of acknowledged inserts.
    let mut acked: Vec<(u64, u64, i64, Option<u64>)> = Vec::new();
    for op in history {
        match (&op.kind, &op.outcome) {
            (Kind::Insert { id }, outcome) => {
                attempted.insert(*id);
                match outcome {
                    Outcome::Ok { epoch, .. } => {
                        verdicts.acked_inserts += 1;
                        *verdicts.acked_by_epoch.entry(*epoch).or_default() += 1;
                        acked.push((op.start_ms, op.end_ms, *id, *epoch));
                        if !fin.log_ids.contains(id) {
                            verdicts.lost.push(*id);
                        }
                    }
                    Outcome::Fail { .. } => {
                        if fin.log_ids.contains(id) {
                            verdicts.failed_but_applied.push(*id);
                        }
                    }
                    Outcome::Unknown { .. } => verdicts.indeterminate_inserts += 1,
                }
            }
            (Kind::Transfer { id, .. }, outcome) => {
                transfers_tried.insert(*id);
                let in_ledger = fin.transfers.contains_key(id);
                match outcome {
                    Outcome::Ok { epoch, .. } => {
                        verdicts.acked_transfers += 1;
                        acked_transfers.push((*id, *epoch));
                        if !in_ledger {
                            verdicts.lost_transfers.push(*id);
                        }
                    }
                    Outcome::Fail { .. } if in_ledger => {
                        verdicts.failed_transfers_applied.push(*id)
                    }
                    Outcome::Fail { .. } | Outcome::Unknown { .. } => {}
                }
            }
            (Kind::ReadTotal, Outcome::Ok { value, .. }) => {
                verdicts.total_reads += 1;
                if *value != Some(expected_total) {
                    verdicts.bad_totals.push(value.unwrap_or(i64::MIN));
                }
            }
            _ => {}
        }
    }
    verdicts.phantom = fin.log_ids.difference(&attempted).copied().collect();
    verdicts.phantom_transfers = fin
        .transfers
        .keys()
        .filter(|id| !transfers_tried.contains(id))
        .copied()
        .collect();
    let newest = acked
        .iter()
        .filter_map(|a| a.3)
        .chain(acked_transfers.iter().filter_map(|a| a.1))
        .max();
    verdicts.lost_transfers_in_failover = acked_transfers
        .iter()
        .filter(|(id, e)| !fin.transfers.contains_key(id) && e.is_some_and(|e| Some(e) < newest))
        .map(|(id, _)| *id)
        .collect();
    verdicts.lost_in_failover = acked
        .iter()
        .filter(|a| !fin.log_ids.contains(&a.2) && a.3.is_some_and(|e| Some(e) < newest))
        .map(|a| a.2)
        .collect();
    verdicts.stale_epoch_acks = stale_epoch_acks(&acked);
    let mut ends: Vec<u64> = acked.iter().map(|a| a.1).collect();
    ends.sort_unstable();
    verdicts.unavailable_ms = windows.iter().map(|w| longest_gap(&ends, *w)).collect();
    verdicts.failovers = failovers(&acked, windows);
    verdicts.sessions = sessions::check(history, &verdicts.failovers);
    verdicts
}

/// The windows by whose end a newer epoch had acknowledged a write than by their start.
fn failovers(acked: &[(u64, u64, i64, Option<u64>)], windows: &[Window]) -> Vec<Window> {
    let epoch_by = |t: u64| acked.iter().filter(|a| a.1 <= t).filter_map(|a| a.3).max();
    windows
        .iter()
        .filter(|w| epoch_by(w.end_ms) > epoch_by(w.start_ms))
        .copied()
        .collect()
}

/// Acknowledged inserts whose epoch is older than that of an insert acknowledged before
/// they started.
fn stale_epoch_acks(acked: &[(u64, u64, i64, Option<u64>)]) -> Vec<(i64, u64, u64)> {
    let mut by_end: Vec<(u64, u64)> = acked
        .iter()
        .filter_map(|(_, end, _, e)| e.map(|e| (*end, e)))
        .collect();
    by_end.sort_unstable();
    let mut by_start: Vec<&(u64, u64, i64, Option<u64>)> = acked.iter().collect();
    by_start.sort_unstable_by_key(|a| a.0);
    let mut out = Vec::new();
    let mut newest = 0u64;
    let mut i = 0;
    for (start, _, id, epoch) in by_start {
        while i < by_end.len() && by_end[i].0 < *start {
            newest = newest.max(by_end[i].1);
            i += 1;
        }
        if let Some(e) = epoch {
            if *e < newest {
                out.push((*id, *e, newest));
            }
        }
    }
    out
}

/// The longest stretch of `w` without one of the sorted `ends`.
pub fn longest_gap(ends: &[u64], w: Window) -> u64 {
    let mut last = w.start_ms;
    let mut longest = 0;
    for &e in ends.iter().filter(|e| **e > w.start_ms && **e <= w.end_ms) {
        longest = longest.max(e - last);
        last = e;
    }
    longest.max(w.end_ms.saturating_sub(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(id: i64, start: u64, end: u64, outcome: Outcome) -> Op {
        Op {
            client: "c".into(),
            start_ms: start,
            end_ms: end,
            kind: Kind::Insert { id },
            outcome,
        }
    }

    fn ok(epoch: u64) -> Outcome {
        Outcome::Ok {
            epoch: Some(epoch),
            value: None,
        }
    }

    fn total(value: i64) -> Op {
        Op {
            client: "r".into(),
            start_ms: 0,
            end_ms: 1,
            kind: Kind::ReadTotal,
            outcome: Outcome::Ok {
                epoch: None,
                value: Some(value),
            },
        }
    }

    /// One account, holding `total`.
    fn fin(ids: &[i64], total: i64) -> Final {
        Final {
            log_ids: ids.iter().copied().collect(),
            balances: BTreeMap::from([(1, total)]),
            transfers: BTreeMap::new(),
        }
    }

    /// One account, starting with `total`.
    fn bank(total: i64) -> Bank {
        Bank {
            accounts: 1,
            start_balance: total,
        }
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        let h = vec![
            insert(1, 0, 10, ok(1)),
            insert(2, 20, 30, ok(2)),
            insert(
                3,
                25,
                40,
                Outcome::Unknown {
                    error: "closed".into(),
                },
            ),
            insert(
                4,
                50,
                60,
                Outcome::Fail {
                    code: "40001".into(),
                },
            ),
            total(100),
        ];
        // The indeterminate id 3 may or may not be there.
        for ids in [&[1, 2][..], &[1, 2, 3][..]] {
            let v = check(&h, &fin(ids, 100), &bank(100), &[]);
            assert!(v.violations(true).is_empty(), "{:?}", v.violations(true));
            assert_eq!((v.acked_inserts, v.indeterminate_inserts), (2, 1));
            assert_eq!(v.acked_by_epoch.get(&Some(2)), Some(&1));
        }
    }

    #[test]
    fn each_violation_is_found() {
        let h = vec![
            insert(1, 0, 10, ok(1)),
            insert(2, 20, 30, ok(2)),
            insert(
                4,
                50,
                60,
                Outcome::Fail {
                    code: "40001".into(),
                },
            ),
            // Started after an epoch-2 ack ended, acknowledged by epoch 1.
            insert(5, 31, 35, ok(1)),
            total(100),
            total(90),
        ];
        let v = check(&h, &fin(&[2, 4, 5, 99], 95), &bank(100), &[]);
        assert_eq!(v.lost, vec![1]);
        assert_eq!(v.failed_but_applied, vec![4]);
        assert_eq!(v.phantom, vec![99]);
        assert_eq!(v.stale_epoch_acks, vec![(5, 1, 2)]);
        assert_eq!(v.bad_totals, vec![90]);
        // The final total (95 of 100) and, with it, the ledger (no transfer moved 5).
        assert_eq!(v.ledger_mismatches, vec![(1, 95, 100)]);
        assert_eq!(v.violations(true).len(), 7, "{:?}", v.violations(true));
        // Id 1 was acknowledged in epoch 1 and epoch 2 followed: asynchronous replication
        // may lose it in that failover, synchronous may not.
        assert_eq!(v.lost_in_failover, vec![1]);
        assert_eq!(v.violations(false).len(), 6, "{:?}", v.violations(false));
        let blind = vec![insert(
            1,
            0,
            10,
            Outcome::Ok {
                epoch: None,
                value: None,
            },
        )];
        let v = check(&blind, &fin(&[1], 0), &bank(0), &[]);
        assert_eq!(v.violations(true).len(), 1, "{:?}", v.violations(true));
    }

    fn transfer(id: i64, from: i32, to: i32, amount: i64, outcome: Outcome) -> Op {
        Op {
            client: "b".into(),
            start_ms: id as u64 * 10,
            end_ms: id as u64 * 10 + 5,
            kind: Kind::Transfer {
                id,
                from,
                to,
                amount,
            },
            outcome,
        }
    }

    fn ledger(rows: &[(i64, i32, i32, i64)], balances: &[(i32, i64)]) -> Final {
        Final {
            log_ids: BTreeSet::new(),
            balances: balances.iter().copied().collect(),
            transfers: rows
                .iter()
                .map(|&(id, from, to, amount)| (id, Transfer { from, to, amount }))
                .collect(),
        }
    }

    #[test]
    fn transfers_are_checked_against_the_ledger_and_the_balances() {
        let two = Bank {
            accounts: 2,
            start_balance: 50,
        };
        let h = vec![
            transfer(1, 1, 2, 5, ok(1)),
            transfer(
                2,
                2,
                1,
                3,
                Outcome::Unknown {
                    error: "closed".into(),
                },
            ),
            transfer(
                3,
                1,
                2,
                4,
                Outcome::Fail {
                    code: "40001".into(),
                },
            ),
        ];
        // Clean: 1 applied, the indeterminate 2 applied, the failed 3 not.
        let clean = ledger(&[(1, 1, 2, 5), (2, 2, 1, 3)], &[(1, 48), (2, 52)]);
        let v = check(&h, &clean, &two, &[]);
        assert!(v.violations(true).is_empty(), "{:?}", v.violations(true));
        assert_eq!(v.acked_transfers, 1);
        // Transfer 1 applied twice: the total holds, the ledger does not.
        let twice = ledger(&[(1, 1, 2, 5)], &[(1, 40), (2, 60)]);
        let v = check(&h, &twice, &two, &[]);
        assert_eq!(v.final_total, 100);
        assert_eq!(v.ledger_mismatches, vec![(1, 40, 45), (2, 60, 55)]);
        assert_eq!(v.violations(true).len(), 1, "{:?}", v.violations(true));
        // Acknowledged 1 lost, failed 3 applied, 9 never tried.
        let wrong = ledger(&[(3, 1, 2, 4), (9, 2, 1, 1)], &[(1, 47), (2, 53)]);
        let v = check(&h, &wrong, &two, &[]);
        assert_eq!(v.lost_transfers, vec![1]);
        assert_eq!(v.failed_transfers_applied, vec![3]);
        assert_eq!(v.phantom_transfers, vec![9]);
        assert!(v.ledger_mismatches.is_empty());
        assert_eq!(v.violations(true).len(), 3, "{:?}", v.violations(true));
        // Asynchronous: a lost transfer of epoch 1 is explained once epoch 2 acknowledged.
        let mut later = h.clone();
        later.push(insert(7, 100, 110, ok(2)));
        let v = check(&later, &wrong, &two, &[]);
        assert_eq!(v.lost_transfers_in_failover, vec![1]);
        // The insert 7 (epoch 2, the newest) is lost without a failover in both modes.
        assert_eq!(v.violations(false).len(), 3, "{:?}", v.violations(false));
        assert_eq!(v.violations(true).len(), 4, "{:?}", v.violations(true));
    }

    #[test]
    fn overlapping_writes_of_two_epochs_are_not_a_violation() {
        // Started before the newer epoch's ack ended: concurrent, either order is fine.
        let h = vec![insert(1, 0, 30, ok(2)), insert(2, 10, 40, ok(1))];
        assert!(check(&h, &fin(&[1, 2], 0), &bank(0), &[])
            .stale_epoch_acks
            .is_empty());
    }

    #[test]
    fn a_window_is_a_failover_when_a_newer_epoch_acknowledged_by_its_end() {
        let h = vec![
            insert(1, 0, 10, ok(1)),
            insert(2, 150, 160, ok(2)),
            insert(3, 300, 310, ok(2)),
        ];
        let w = |start_ms, end_ms| Window { start_ms, end_ms };
        let v = check(
            &h,
            &fin(&[1, 2, 3], 0),
            &bank(0),
            &[w(20, 200), w(250, 400)],
        );
        assert_eq!(v.failovers, vec![w(20, 200)]);
    }

    #[test]
    fn unavailability_is_the_longest_stretch_without_an_ack_in_the_window() {
        let h: Vec<Op> = [5, 10, 400, 420, 1500]
            .iter()
            .enumerate()
            .map(|(i, end)| insert(i as i64, end - 1, *end, ok(1)))
            .collect();
        let v = check(
            &h,
            &fin(&[0, 1, 2, 3, 4], 0),
            &bank(0),
            &[
                Window {
                    start_ms: 0,
                    end_ms: 1000,
                },
                Window {
                    start_ms: 1400,
                    end_ms: 2000,
                },
            ],
        );
        assert_eq!(v.unavailable_ms, vec![580, 500]);
    }
}
