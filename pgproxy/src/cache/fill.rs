//! One cache fill as the session sees it: the read's result messages captured as they are
//! forwarded to the client, between the two replay positions that bracket it. Pure: frames in,
//! an entry (or nothing) out.
//!
//! The session queues `pg_last_wal_replay_lsn()` before the read ([`Fill::opened`] when its
//! answer is complete), forwards the read's answer ([`Fill::capture`] sees each message up to
//! its `ReadyForQuery`), and queues the closing position after it; [`Fill::finish`] then
//! yields the entry to store, if everything went right.

use bytes::{Bytes, BytesMut};
use meridian_shared::lsn::Lsn;

use super::rules::Bracket;
use super::Plan;

/// Why a capture stopped being storable (for the metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spoiled {
    TooLarge,
    /// An error, a COPY, an empty query, a row limit: not a plain result.
    NotAResult,
}

/// A fill in progress.
#[derive(Debug)]
pub struct Fill {
    pub plan: Plan,
    lower: Option<Lsn>,
    upper: Option<Lsn>,
    messages: BytesMut,
    spoiled: Option<Spoiled>,
    /// The opening position was answered: the next answer is the read's.
    started: bool,
    /// The read's ReadyForQuery was seen.
    done: bool,
    /// The closing position is queued.
    pub closed: bool,
}

impl Fill {
    pub fn new(plan: Plan) -> Fill {
        Fill {
            plan,
            lower: None,
            upper: None,
            messages: BytesMut::new(),
            spoiled: None,
            started: false,
            done: false,
            closed: false,
        }
    }

    /// The answer to a replay-position query (`None`: NULL or unparsable, e.g. on a primary).
    pub fn position(&mut self, after: bool, lsn: Option<Lsn>) {
        if after {
            self.upper = lsn;
        } else {
            self.lower = lsn;
        }
    }

    /// The opening position's answer is complete.
    pub fn opened(&mut self) {
        self.started = true;
    }

    /// The opening position failed.
    pub fn spoil(&mut self) {
        self.spoiled.get_or_insert(Spoiled::NotAResult);
    }

    /// Sees one backend message while the read's answer is expected; returns `Some` the
    /// first time the capture stops being storable.
    pub fn capture(&mut self, tag: u8, raw: &[u8], max_bytes: usize) -> Option<Spoiled> {
        if !self.started || self.done {
            return None;
        }
        let before = self.spoiled;
        match tag {
            // Result messages, kept as they came off the wire.
            b'2' | b'T' | b'D' | b'C' => {
                if self.spoiled.is_none() {
                    if self.messages.len() + raw.len() <= max_bytes {
                        self.messages.extend_from_slice(raw);
                    } else {
                        self.spoiled = Some(Spoiled::TooLarge);
                        self.messages = BytesMut::new();
                    }
                }
            }
            // Notices go to the client only; a ParseComplete is the proxy's own re-prepare.
            b'N' | b'A' | b'S' | b'1' => {}
            b'Z' => self.done = true,
            _ => {
                self.spoiled.get_or_insert(Spoiled::NotAResult);
            }
        }
        if before.is_none() {
            self.spoiled
        } else {
            None
        }
    }

    /// The entry to store once the closing position arrived: its bracket and messages.
    pub fn finish(self) -> Option<(Plan, Bracket, Bytes)> {
        let (Some(lower), Some(upper)) = (self.lower, self.upper) else {
            return None;
        };
        if self.spoiled.is_some() || !self.done || self.messages.is_empty() || upper < lower {
            return None;
        }
        Some((self.plan, Bracket { lower, upper }, self.messages.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::epoch::Epoch;
    use std::time::Duration;

    fn plan() -> Plan {
        Plan {
            hash: "h".into(),
            tables: vec!["public.t".into()],
            ttl: Duration::from_secs(1),
            epoch: Epoch(1),
        }
    }

    fn run(fill: &mut Fill, tags: &[u8]) {
        for t in tags {
            fill.capture(*t, &[*t, 0, 0, 0, 4], 1 << 20);
        }
    }

    #[test]
    fn a_plain_result_between_two_positions_is_stored() {
        let mut f = Fill::new(plan());
        run(&mut f, b"TD"); // before the opening position's answer: not the read's
        f.position(false, Some(Lsn(10)));
        f.opened();
        run(&mut f, b"TNDDCZ");
        run(&mut f, b"TD"); // after ReadyForQuery: someone else's
        f.position(true, Some(Lsn(12)));
        let (_, bracket, messages) = f.finish().unwrap();
        assert_eq!(
            bracket,
            Bracket {
                lower: Lsn(10),
                upper: Lsn(12)
            }
        );
        let tags: Vec<u8> = messages.chunks(5).map(|c| c[0]).collect();
        assert_eq!(tags, b"TDDC");
    }

    #[test]
    fn errors_copies_size_and_missing_positions_are_not_stored() {
        for tags in [&b"TDEZ"[..], b"GZ", b"IZ", b"TDsZ", b"nCZ"] {
            let mut f = Fill::new(plan());
            f.position(false, Some(Lsn(1)));
            f.opened();
            run(&mut f, tags);
            f.position(true, Some(Lsn(1)));
            assert!(f.finish().is_none(), "{tags:?}");
        }
        let mut big = Fill::new(plan());
        big.opened();
        big.position(false, Some(Lsn(1)));
        assert_eq!(big.capture(b'T', &[0; 8], 10), None);
        assert_eq!(big.capture(b'D', &[0; 8], 10), Some(Spoiled::TooLarge));
        assert_eq!(big.capture(b'D', &[0; 8], 10), None, "reported once");
        run(&mut big, b"CZ");
        big.position(true, Some(Lsn(2)));
        assert!(big.finish().is_none());
        // A primary answers NULL positions; an unfinished read has no ReadyForQuery.
        let mut on_primary = Fill::new(plan());
        on_primary.opened();
        run(&mut on_primary, b"TDCZ");
        on_primary.position(true, None);
        assert!(on_primary.finish().is_none());
        let mut unfinished = Fill::new(plan());
        unfinished.position(false, Some(Lsn(1)));
        unfinished.opened();
        run(&mut unfinished, b"TD");
        unfinished.position(true, Some(Lsn(1)));
        assert!(unfinished.finish().is_none());
    }
}
