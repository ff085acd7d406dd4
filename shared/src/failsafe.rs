//! The failsafe rule: keeping a primary writable while etcd is out of reach,
//! without ever allowing two writable primaries (docs/control-path.md,
//! "Failsafe").
//!
//! Without etcd nobody can be promoted (the epoch is bumped in etcd first), but
//! a part that lost etcd cannot tell an etcd outage from its own isolation while
//! a coordinator that still reaches etcd promotes a replica. So a primary keeps
//! serving without etcd only while **every replica it knows confirms it**, and
//! a replica being promoted first stops confirming and lets the confirmation
//! it last gave run out.
//!
//! A confirmation is carried by the replication stream itself, so it is as
//! authenticated as replication and needs no clock agreement between hosts:
//! the checker (the primary's agent, and each proxy that lost etcd) notes the
//! instant `at` and then writes a marker into the primary's WAL
//! (`pg_logical_emit_message`, no transaction, no synchronous-commit wait); a
//! standby whose `write_lsn` in `pg_stat_replication` has reached the marker's
//! position received bytes written after `at`, so it was still following this
//! primary at `at`. [`Confirmations`] keeps the markers of the last
//! [`WINDOW`] and, per standby, the newest marker it reached; the primary is
//! confirmed until the oldest of those instants plus [`WINDOW`].
//!
//! The promoted side ([`promotion_wait`]): a standby cut off from its upstream
//! has confirmed nothing after the last message it received, so it promotes no
//! earlier than that instant plus [`WINDOW`] plus [`MARGIN`] (the checker's
//! poll and the time a fence takes). A coordinator that knows the old primary is
//! fenced (its agent acknowledged `Fence`) lets the candidate skip the wait.
//!
//! Everything here is pure: instants are passed in.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::lsn::Lsn;

/// How long one confirmation keeps a primary writable.
pub const WINDOW: Duration = Duration::from_secs(2);
/// What a promoted standby waits beyond [`WINDOW`]: the checkers' poll period
/// and the time to stop a PostgreSQL, with room to spare.
pub const MARGIN: Duration = Duration::from_millis(500);
/// How often a checker writes a marker and reads the standbys' positions.
pub const POLL: Duration = Duration::from_millis(200);

/// One round of the check, run on the primary as one simple-query batch: a
/// marker written in a transaction of its own that commits with
/// `synchronous_commit = local` (flushed at once, so walsenders send it
/// without waiting for the WAL writer, and never waiting for a synchronous
/// standby); then the `application_name` and `write_lsn` of every standby
/// streaming through a permanent physical slot, as Meridian's standbys do (a
/// base backup's temporary slot and logical walsenders, e.g. the invalidation
/// stream, are left out). Parse the rows with [`parse_round`]. A node in
/// recovery fails the batch (no transaction can write there).
pub const ROUND_SQL: &str = "\
BEGIN; SET LOCAL synchronous_commit = local;
SELECT pg_logical_emit_message(true, 'meridian.failsafe', '')::text,
  current_setting('meridian.epoch', true);
COMMIT;
SELECT r.application_name, coalesce(r.write_lsn, '0/0')::text
  FROM pg_stat_replication r
  JOIN pg_replication_slots s ON s.active_pid = r.pid
  WHERE s.slot_type = 'physical' AND NOT s.temporary";

/// What one round of [`ROUND_SQL`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Round {
    /// The marker's position.
    pub marker: Lsn,
    /// The node's `meridian.epoch`, as text (`None`: unset).
    pub epoch: Option<String>,
    /// (`application_name`, `write_lsn`) of each standby.
    pub standbys: Vec<(String, Lsn)>,
}

/// Parses the rows of [`ROUND_SQL`], in order (the marker row first, then one
/// row per standby), each as its text columns.
pub fn parse_round(rows: &[Vec<Option<String>>]) -> Result<Round, String> {
    let (first, rest) = rows.split_first().ok_or("no marker row")?;
    let marker = first
        .first()
        .and_then(Option::as_deref)
        .ok_or("no marker position")?;
    let marker: Lsn = marker
        .parse()
        .map_err(|_| format!("bad marker position {marker:?}"))?;
    let epoch = first.get(1).cloned().flatten();
    let standbys = rest
        .iter()
        .filter_map(|row| {
            let name = row.first()?.clone()?;
            let lsn = row.get(1)?.as_deref()?.parse().unwrap_or(Lsn::ZERO);
            Some((name, lsn))
        })
        .collect();
    Ok(Round {
        marker,
        epoch,
        standbys,
    })
}

/// The verdict of [`Confirmations::verdict`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every known standby confirmed the primary; it may serve writes until `until`.
    Confirmed { until: Instant },
    /// `member` has not confirmed within the window (or ever).
    Unconfirmed { member: String },
    /// No round has run yet.
    Unchecked,
}

impl Verdict {
    /// Whether writes may go on at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        matches!(self, Verdict::Confirmed { until } if now < *until)
    }

    /// Whether this verdict is news after `previous` (worth a log line): the first
    /// one, or a different one, except that a confirmation only moving its `until`
    /// forward is the same news.
    pub fn is_news_after(&self, previous: Option<&Verdict>) -> bool {
        match (previous, self) {
            (Some(Verdict::Confirmed { .. }), Verdict::Confirmed { .. }) => false,
            (Some(a), b) => a != b,
            (None, _) => true,
        }
    }
}

/// Markers written and the standbys' answers to them.
#[derive(Clone, Debug, Default)]
pub struct Confirmations {
    /// Markers of the last [`WINDOW`], oldest first: (written after, position).
    markers: VecDeque<(Instant, Lsn)>,
    /// Standby name -> the newest marker instant it has reached.
    confirmed: BTreeMap<String, Instant>,
    /// Physical standbys seen streaming during this check: they must confirm too,
    /// even when etcd never listed them (a standby that joined late).
    seen: BTreeSet<String>,
}

impl Confirmations {
    pub fn new() -> Confirmations {
        Confirmations::default()
    }

    /// Forgets everything (etcd is back, or the node is no longer the primary).
    pub fn reset(&mut self) {
        *self = Confirmations::default();
    }

    /// Records one round: the marker was written after `at` at position
    /// `marker`; `standbys` are the (`application_name`, `write_lsn`) pairs read
    /// in the same round.
    pub fn record(&mut self, at: Instant, marker: Lsn, standbys: &[(String, Lsn)]) {
        self.markers.push_back((at, marker));
        while self
            .markers
            .front()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) > WINDOW)
        {
            self.markers.pop_front();
        }
        for (name, write_lsn) in standbys {
            self.seen.insert(name.clone());
            // The newest marker this standby's write position has reached.
            let reached = self
                .markers
                .iter()
                .rev()
                .find(|(_, lsn)| write_lsn >= lsn)
                .map(|(t, _)| *t);
            if let Some(t) = reached {
                let entry = self.confirmed.entry(name.clone()).or_insert(t);
                *entry = (*entry).max(t);
            }
        }
    }

    /// Whether every one of `members` (the replicas etcd last listed) and every
    /// standby seen during the check has confirmed within the window.
    pub fn verdict<'a>(&self, members: impl IntoIterator<Item = &'a str>) -> Verdict {
        let Some((last_marker, _)) = self.markers.back() else {
            return Verdict::Unchecked;
        };
        let mut all: BTreeSet<&str> = members.into_iter().collect();
        all.extend(self.seen.iter().map(String::as_str));
        let mut until: Option<Instant> = None;
        for m in all {
            match self.confirmed.get(m) {
                Some(t) => {
                    let u = *t + WINDOW;
                    until = Some(until.map_or(u, |cur| cur.min(u)));
                }
                None => {
                    return Verdict::Unconfirmed {
                        member: m.to_string(),
                    }
                }
            }
        }
        match until {
            Some(until) => Verdict::Confirmed { until },
            // No replica known: nobody can be promoted in its place (a standby
            // that joins must stream from it first, and then it counts).
            None => Verdict::Confirmed {
                until: *last_marker + WINDOW,
            },
        }
    }
}

/// When a standby being promoted may become writable: [`WINDOW`] plus
/// [`MARGIN`] after it last heard from its upstream (`last_heard`, an instant
/// on the promoting agent's clock), or at once when the coordinator knows the
/// old primary is fenced.
pub fn promotion_wait(now: Instant, last_heard: Instant, old_fenced: bool) -> Duration {
    if old_fenced {
        return Duration::ZERO;
    }
    (last_heard + WINDOW + MARGIN).saturating_duration_since(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_is_news_when_its_kind_or_member_changes_not_its_until() {
        let t0 = Instant::now();
        let confirmed = |s| Verdict::Confirmed {
            until: t0 + Duration::from_secs(s),
        };
        let unconfirmed = |m: &str| Verdict::Unconfirmed { member: m.into() };
        assert!(Verdict::Unchecked.is_news_after(None));
        assert!(!Verdict::Unchecked.is_news_after(Some(&Verdict::Unchecked)));
        assert!(confirmed(1).is_news_after(Some(&Verdict::Unchecked)));
        assert!(!confirmed(2).is_news_after(Some(&confirmed(1))));
        assert!(unconfirmed("a").is_news_after(Some(&confirmed(2))));
        assert!(!unconfirmed("a").is_news_after(Some(&unconfirmed("a"))));
        assert!(unconfirmed("b").is_news_after(Some(&unconfirmed("a"))));
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    fn s(name: &str, lsn: u64) -> (String, Lsn) {
        (name.to_string(), Lsn(lsn))
    }

    #[test]
    fn rounds_parse_from_text_rows() {
        let text = |v: &[Option<&str>]| v.iter().map(|c| c.map(str::to_string)).collect();
        let rows = vec![
            text(&[Some("0/3000060"), Some("7")]),
            text(&[Some("b"), Some("0/3000000")]),
            text(&[Some("c"), Some("garbage")]),
        ];
        assert_eq!(
            parse_round(&rows),
            Ok(Round {
                marker: "0/3000060".parse().unwrap(),
                epoch: Some("7".into()),
                standbys: vec![s("b", 0x3000000), s("c", 0)],
            })
        );
        assert!(parse_round(&[]).is_err());
        assert!(parse_round(&[text(&[Some("x"), None])]).is_err());
    }

    #[test]
    fn every_known_replica_must_reach_a_marker() {
        let t0 = Instant::now();
        let mut c = Confirmations::new();
        c.record(ms(t0, 0), Lsn(100), &[s("b", 90), s("c", 90)]);
        // Nobody has reached the first marker yet.
        assert_eq!(
            c.verdict(["b", "c"]),
            Verdict::Unconfirmed { member: "b".into() }
        );
        c.record(ms(t0, 200), Lsn(200), &[s("b", 100), s("c", 90)]);
        assert_eq!(
            c.verdict(["b", "c"]),
            Verdict::Unconfirmed { member: "c".into() }
        );
        c.record(ms(t0, 400), Lsn(300), &[s("b", 200), s("c", 100)]);
        // b reached the marker of 200 ms, c the one of 0 ms: the older one bounds it.
        assert_eq!(
            c.verdict(["b", "c"]),
            Verdict::Confirmed {
                until: ms(t0, 0) + WINDOW
            }
        );
        assert!(c.verdict(["b", "c"]).holds(ms(t0, 1999)));
        assert!(!c.verdict(["b", "c"]).holds(ms(t0, 2000)));
    }

    #[test]
    fn a_replica_that_stops_answering_lapses_after_the_window() {
        let t0 = Instant::now();
        let mut c = Confirmations::new();
        let mut lsn = 100;
        for step in 0..5 {
            c.record(ms(t0, step * 200), Lsn(lsn), &[s("b", lsn), s("c", lsn)]);
            lsn += 100;
        }
        // c stops (cut off, or promoted); b goes on.
        for step in 5..20 {
            c.record(ms(t0, step * 200), Lsn(lsn), &[s("b", lsn), s("c", 500)]);
            lsn += 100;
        }
        let v = c.verdict(["b", "c"]);
        // c's newest confirmation is the marker written at 800 ms.
        assert_eq!(
            v,
            Verdict::Confirmed {
                until: ms(t0, 800) + WINDOW
            }
        );
        assert!(!v.holds(ms(t0, 3800)));
        // After the window its markers are gone, so it can never look confirmed again
        // by an old position.
        c.record(ms(t0, 6000), Lsn(lsn), &[s("b", lsn), s("c", 500)]);
        assert!(!c.verdict(["b", "c"]).holds(ms(t0, 6000)));
    }

    #[test]
    fn a_standby_seen_streaming_counts_even_if_etcd_never_listed_it() {
        let t0 = Instant::now();
        let mut c = Confirmations::new();
        c.record(ms(t0, 0), Lsn(100), &[s("b", 100), s("late", 100)]);
        c.record(ms(t0, 200), Lsn(200), &[s("b", 200)]);
        // "late" disappeared from pg_stat_replication but must still confirm.
        let v = c.verdict(["b"]);
        assert_eq!(
            v,
            Verdict::Confirmed {
                until: ms(t0, 0) + WINDOW
            }
        );
        c.record(ms(t0, 2400), Lsn(300), &[s("b", 300)]);
        assert!(!c.verdict(["b"]).holds(ms(t0, 2400)));
    }

    #[test]
    fn a_member_never_seen_is_unconfirmed() {
        let t0 = Instant::now();
        let mut c = Confirmations::new();
        c.record(t0, Lsn(100), &[s("b", 100)]);
        assert_eq!(
            c.verdict(["b", "gone"]),
            Verdict::Unconfirmed {
                member: "gone".into()
            }
        );
        // After a reset nothing counts until a new round ran, and then a
        // member that did not answer it is unconfirmed again.
        c.reset();
        assert_eq!(c.verdict(["b"]), Verdict::Unchecked);
        assert!(!c.verdict(["b"]).holds(t0));
        c.record(t0 + POLL, Lsn(200), &[]);
        assert_eq!(
            c.verdict(["b"]),
            Verdict::Unconfirmed { member: "b".into() }
        );
    }

    #[test]
    fn without_replicas_the_primary_stays_confirmed_while_checked() {
        let t0 = Instant::now();
        let mut c = Confirmations::new();
        assert_eq!(c.verdict([]), Verdict::Unchecked);
        c.record(t0, Lsn(100), &[]);
        assert_eq!(c.verdict([]), Verdict::Confirmed { until: t0 + WINDOW });
    }

    #[test]
    fn the_promoted_side_outwaits_every_confirmation_it_gave() {
        let t0 = Instant::now();
        // Heard last at t0: not before t0 + window + margin.
        assert_eq!(
            promotion_wait(ms(t0, 300), t0, false),
            WINDOW + MARGIN - Duration::from_millis(300)
        );
        assert_eq!(promotion_wait(ms(t0, 5000), t0, false), Duration::ZERO);
        assert_eq!(promotion_wait(t0, t0, true), Duration::ZERO);
        // Any confirmation the checker holds is for a marker written before the
        // standby received it, so it runs out before the standby may promote.
        let mut c = Confirmations::new();
        c.record(t0, Lsn(100), &[s("cand", 100)]);
        let Verdict::Confirmed { until } = c.verdict(["cand"]) else {
            panic!("confirmed")
        };
        let heard = t0; // received no earlier than the marker was written
        assert!(until + MARGIN <= heard + promotion_wait(heard, heard, false));
    }
}
