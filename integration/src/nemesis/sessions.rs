//! The session guarantees, checked on the history (pure): read-your-writes and monotonic
//! reads within one client session, and the causal token across sessions and regions.
//!
//! Each region's session client owns one register (a counter row keyed by its region) and
//! alternates an increment (a write, on the primary) with a plain read of it (which the
//! proxy sends to the region's replica once it replayed the session's commit); a session
//! is one connection: a reconnect starts a new one, and nothing is owed across it. Each
//! region's causal reader reads another region's register under the token
//! (`meridian.last_commit_lsn`) that register's writer published after an increment.
//!
//! - **Read-your-writes:** a read never returns less than the session's last acknowledged
//!   increment.
//! - **Monotonic reads:** a read never returns less than an earlier read of the session.
//! - **Causal token:** a read under a token never returns less than the value the write
//!   that gave the token returned.
//!
//! With asynchronous replication a failover may lose acknowledged commits, and then a
//! register goes back: a stale read is *explained* when a failover (a fault window in which
//! the acknowledged epoch grew) overlaps the stretch between the operation that set the
//! bound and the read; only unexplained ones are violations there. With synchronous
//! replication every stale read is one.

use std::collections::BTreeMap;

use super::check::Window;
use super::history::{Kind, Op, Outcome};

/// A read that returned less than it owed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// `region/role#session`.
    pub session: String,
    /// When the operation that set the bound started, and when the read ended.
    pub since_ms: u64,
    pub read_end_ms: u64,
    pub read: i64,
    pub owed: i64,
    /// A failover overlaps `since_ms..read_end_ms` (asynchronous replication's window).
    pub in_failover: bool,
}

/// What the session checks found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionVerdicts {
    /// Acknowledged register reads of session clients, and under a causal token.
    pub reads: usize,
    pub causal_reads: usize,
    pub read_your_writes: Vec<Stale>,
    pub monotonic: Vec<Stale>,
    pub causal: Vec<Stale>,
}

impl SessionVerdicts {
    /// The violated properties as sentences; see [`super::check::Verdicts::violations`].
    pub fn violations(&self, synchronous: bool) -> Vec<String> {
        let mut v = Vec::new();
        for (what, stale) in [
            ("read-your-writes", &self.read_your_writes),
            ("monotonic reads", &self.monotonic),
            ("causal token", &self.causal),
        ] {
            let bad: Vec<&Stale> = stale
                .iter()
                .filter(|s| synchronous || !s.in_failover)
                .collect();
            if !bad.is_empty() {
                let shown: Vec<String> = bad
                    .iter()
                    .take(5)
                    .map(|s| {
                        format!(
                            "{} read {} < {} ({}..{} ms)",
                            s.session, s.read, s.owed, s.since_ms, s.read_end_ms
                        )
                    })
                    .collect();
                v.push(format!(
                    "{} {what} violations{}: {}",
                    bad.len(),
                    if synchronous {
                        ""
                    } else {
                        " without a failover"
                    },
                    shown.join(", ")
                ));
            }
        }
        v
    }
}

/// Checks the session operations of `history` (in start order); `failovers`: the fault
/// windows in which a newer epoch took over.
pub fn check(history: &[Op], failovers: &[Window]) -> SessionVerdicts {
    let mut out = SessionVerdicts::default();
    let in_failover = |since: u64, until: u64| {
        failovers
            .iter()
            .any(|w| w.start_ms <= until && w.end_ms >= since)
    };
    // Per session: (value, start) of the last acknowledged write and of the highest read.
    let mut written: BTreeMap<String, (i64, u64)> = BTreeMap::new();
    let mut seen: BTreeMap<String, (i64, u64)> = BTreeMap::new();
    let mut ops: Vec<&Op> = history.iter().collect();
    ops.sort_by_key(|o| (o.start_ms, o.end_ms));
    for op in ops {
        let Outcome::Ok {
            value: Some(value), ..
        } = op.outcome
        else {
            continue;
        };
        let stale = |session: String, (owed, since): (i64, u64)| Stale {
            session,
            since_ms: since,
            read_end_ms: op.end_ms,
            read: value,
            owed,
            in_failover: in_failover(since, op.end_ms),
        };
        match &op.kind {
            Kind::RegWrite { session, .. } => {
                written.insert(session_id(op, *session), (value, op.start_ms));
            }
            Kind::RegRead { session, .. } => {
                out.reads += 1;
                let id = session_id(op, *session);
                if let Some(&bound) = written.get(&id) {
                    if value < bound.0 {
                        out.read_your_writes.push(stale(id.clone(), bound));
                    }
                }
                match seen.get(&id) {
                    Some(&bound) if value < bound.0 => out.monotonic.push(stale(id, bound)),
                    Some(&(max, _)) if value == max => {}
                    _ => {
                        seen.insert(id, (value, op.start_ms));
                    }
                }
            }
            Kind::CausalRead {
                after, written_ms, ..
            } => {
                out.causal_reads += 1;
                if value < *after {
                    out.causal
                        .push(stale(op.client.clone(), (*after, *written_ms)));
                }
            }
            _ => {}
        }
    }
    out
}

fn session_id(op: &Op, session: u32) -> String {
    format!("{}#{session}", op.client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: &str, start: u64, end: u64, kind: Kind, value: Option<i64>) -> Op {
        Op {
            client: client.into(),
            start_ms: start,
            end_ms: end,
            kind,
            outcome: Outcome::Ok { epoch: None, value },
        }
    }

    fn write(session: u32, at: u64, value: i64) -> Op {
        op(
            "a/session",
            at,
            at + 1,
            Kind::RegWrite {
                key: "a".into(),
                session,
            },
            Some(value),
        )
    }

    fn read(session: u32, at: u64, value: i64) -> Op {
        op(
            "a/session",
            at,
            at + 1,
            Kind::RegRead {
                key: "a".into(),
                session,
            },
            Some(value),
        )
    }

    fn causal(at: u64, after: i64, value: i64) -> Op {
        op(
            "b/causal",
            at,
            at + 1,
            Kind::CausalRead {
                key: "a".into(),
                after,
                written_ms: 5,
            },
            Some(value),
        )
    }

    #[test]
    fn reads_that_keep_up_are_clean() {
        let h = vec![
            write(1, 10, 1),
            read(1, 20, 1),
            write(1, 30, 2),
            read(1, 40, 2),
            // A new session owes nothing to the old one.
            read(2, 50, 1),
            causal(60, 2, 3),
        ];
        let v = check(&h, &[]);
        assert_eq!((v.reads, v.causal_reads), (3, 1));
        assert!(v.violations(true).is_empty(), "{:?}", v.violations(true));
    }

    #[test]
    fn each_stale_read_is_found() {
        let h = vec![
            write(1, 10, 5),
            read(1, 20, 4), // own write not seen
            write(2, 30, 7),
            read(2, 40, 7),
            read(2, 50, 6), // went back (and own write 7 not seen)
            causal(60, 9, 8),
        ];
        let v = check(&h, &[]);
        assert_eq!(v.read_your_writes.len(), 2, "{v:?}");
        assert_eq!(v.read_your_writes[0].owed, 5);
        assert_eq!(v.monotonic.len(), 1, "{v:?}");
        assert_eq!((v.monotonic[0].read, v.monotonic[0].owed), (6, 7));
        assert_eq!(v.causal.len(), 1);
        assert_eq!(v.violations(true).len(), 3, "{:?}", v.violations(true));
        assert_eq!(v.violations(false).len(), 3, "no failover explains them");
    }

    #[test]
    fn a_failover_in_between_explains_a_loss_only_with_asynchronous_replication() {
        let h = vec![write(1, 10, 5), read(1, 100, 4)];
        let failover = Window {
            start_ms: 40,
            end_ms: 60,
        };
        let v = check(&h, &[failover]);
        assert!(v.read_your_writes[0].in_failover);
        assert!(v.violations(false).is_empty());
        assert_eq!(v.violations(true).len(), 1);
        // A failover after the read explains nothing.
        let later = Window {
            start_ms: 200,
            end_ms: 300,
        };
        assert_eq!(check(&h, &[later]).violations(false).len(), 1);
    }
}
