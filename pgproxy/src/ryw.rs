//! Read-your-writes, the causal token and the staleness bound: the pure parts.
//!
//! A session needs, for each read, a replica that has replayed at least
//! `max(last_commit_lsn, min_lsn, hint min_lsn)` ([`Need::lsn`]) and, when the
//! session set `meridian.max_staleness`, whose replay lag is within it
//! ([`Need::max_staleness`]). [`fits`] judges one replica from the shared
//! [`crate::health::ReplicaTable`]; [`ryw_target`] picks the replica, asks to
//! wait (up to `routing.ryw_wait`) or sends the read to the primary. The
//! session does the waiting and the I/O.
//!
//! [`parse_command`] recognises the session commands the proxy answers itself
//! (`SET`/`RESET`/`SHOW` of `meridian.min_lsn`, `meridian.max_staleness`,
//! `meridian.last_commit_lsn`); [`commit_point`] tells whether a statement
//! ends a write transaction, after which (on its idle ReadyForQuery, on the
//! same connection) the proxy asks the primary for its WAL insert position
//! ([`COMMIT_LSN_QUERY`]).
//!
//! Limits: the LSN learned is `pg_current_wal_insert_lsn()` right after the
//! commit, which is ≥ the commit record's end (other sessions' WAL may make it
//! larger; then a read may wait for a little more WAL than its own). When the
//! insert position sits exactly at a WAL page boundary it points past the page
//! header, which no replica reports as replayed until more WAL is written: such
//! a read waits `ryw_wait` and runs on the primary — slower, never stale.

use std::time::Duration;

use meridian_shared::lsn::Lsn;
use meridian_sqlroute::{Analysis, FunctionCatalog, StatementKind, TxEffect};

/// Sent on the primary connection when a committing statement's
/// ReadyForQuery (idle) arrives; its answer is swallowed by the proxy.
pub const COMMIT_LSN_QUERY: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn()::text";

/// How often replicas are polled, and the table re-checked, while a read waits.
pub const FAST_POLL: Duration = Duration::from_millis(10);

/// What a read needs from a replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    /// The replica must have replayed at least this.
    pub lsn: Option<Lsn>,
    /// The replica's replay lag must be at most this.
    pub max_staleness: Option<Duration>,
}

impl Need {
    /// Nothing required: any usable replica will do.
    pub fn is_empty(&self) -> bool {
        self.lsn.is_none() && self.max_staleness.is_none()
    }
}

/// What the proxy last observed about one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The latest poll answered.
    pub ok: bool,
    pub replay_lsn: Option<Lsn>,
    pub lag: Option<Duration>,
}

/// How one replica fits a read's [`Need`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    Yes,
    /// Not yet: it has not replayed enough (or was not polled yet); waiting may help.
    NotYet,
    /// Down, or lagging more than the staleness bound: do not wait for it.
    Never,
}

/// Judges one replica (`None`: never polled).
pub fn fits(need: &Need, obs: Option<&Observed>) -> Fit {
    if need.is_empty() {
        return Fit::Yes;
    }
    let Some(o) = obs else {
        return Fit::NotYet;
    };
    if !o.ok {
        return Fit::Never;
    }
    if let Some(max) = need.max_staleness {
        match o.lag {
            Some(lag) if lag <= max => {}
            _ => return Fit::Never,
        }
    }
    if let Some(lsn) = need.lsn {
        match o.replay_lsn {
            Some(r) if r >= lsn => {}
            _ => return Fit::NotYet,
        }
    }
    Fit::Yes
}

/// Where a read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RywStep {
    /// The local candidate with this index.
    Local(usize),
    /// The candidate beside the primary with this index.
    BesidePrimary(usize),
    /// Wait at most this long for the tracker to advance, then decide again.
    Wait(Duration),
    Primary,
}

/// The replicas a read with a [`Need`] may go to, as seen from the proxy's region.
#[derive(Debug, Clone, Copy, Default)]
pub struct Candidates<'a> {
    /// Usable replicas of the proxy's own region.
    pub local: &'a [Option<Observed>],
    /// Usable replicas of the primary's region, when that is another region: exactly as
    /// near as the primary. Replicas of third regions are never chosen: they may be
    /// farther than the primary, and the primary never makes a read wait.
    pub beside_primary: &'a [Option<Observed>],
    /// Whether the primary is in the proxy's region (then it is as near as a local replica).
    pub primary_local: bool,
}

/// The routing decision of a read that has a [`Need`]. A fitting local replica wins;
/// else, when the primary is local too, the primary (no wait can beat it); else the read
/// waits (while `waited < ryw_wait`) for a local replica that may still catch up; else a
/// fitting replica beside the primary (sparing the primary a read at the same distance);
/// else the primary. `salt` spreads sessions over equally good replicas.
pub fn ryw_target(
    need: &Need,
    c: &Candidates<'_>,
    salt: u64,
    waited: Duration,
    ryw_wait: Duration,
) -> RywStep {
    let pick = |set: &[Option<Observed>]| -> Option<usize> {
        let ok: Vec<usize> = (0..set.len())
            .filter(|&i| fits(need, set[i].as_ref()) == Fit::Yes)
            .collect();
        (!ok.is_empty()).then(|| ok[(salt % ok.len() as u64) as usize])
    };
    if let Some(i) = pick(c.local) {
        return RywStep::Local(i);
    }
    if c.primary_local {
        return RywStep::Primary;
    }
    let remaining = ryw_wait.saturating_sub(waited);
    let may_catch_up = c
        .local
        .iter()
        .any(|o| fits(need, o.as_ref()) == Fit::NotYet);
    if !remaining.is_zero() && may_catch_up {
        return RywStep::Wait(remaining);
    }
    match pick(c.beside_primary) {
        Some(i) => RywStep::BesidePrimary(i),
        None => RywStep::Primary,
    }
}

/// Whether `analysis`, run on the primary, ends with data committed: a
/// `COMMIT` (or other transaction end read from the backend), or a statement
/// that is not a pure read run outside a transaction (autocommit).
pub fn commit_point(analysis: &Analysis, catalog: &FunctionCatalog, in_tx: bool) -> bool {
    if analysis
        .statements
        .iter()
        .any(|s| matches!(s.tx, TxEffect::Commit | TxEffect::Other))
    {
        return true;
    }
    !in_tx
        && analysis
            .statements
            .iter()
            .any(|s| s.kind != StatementKind::Utility)
        && !analysis.is_read(catalog)
}

/// The settings the proxy keeps per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    MinLsn,
    MaxStaleness,
    LastCommitLsn,
}

impl Setting {
    pub fn name(self) -> &'static str {
        match self {
            Setting::MinLsn => "meridian.min_lsn",
            Setting::MaxStaleness => "meridian.max_staleness",
            Setting::LastCommitLsn => "meridian.last_commit_lsn",
        }
    }

    fn from_name(name: &str) -> Option<Setting> {
        match name.to_ascii_lowercase().as_str() {
            "meridian.min_lsn" => Some(Setting::MinLsn),
            "meridian.max_staleness" => Some(Setting::MaxStaleness),
            "meridian.last_commit_lsn" => Some(Setting::LastCommitLsn),
            _ => None,
        }
    }
}

/// A session command the proxy answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `SET [SESSION] name {=|TO} value` (the value unquoted; `DEFAULT` becomes [`Command::Reset`]).
    Set(Setting, String),
    Reset(Setting),
    Show(Setting),
}

/// A value that does not fit its setting: SQLSTATE 22023.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for parameter \"{setting}\": {reason}")]
pub struct BadValue {
    pub setting: &'static str,
    pub reason: String,
}

/// Recognises `SET`/`RESET`/`SHOW` of one of the proxy's settings (one
/// statement, optional trailing `;`, no leading comment). Anything else is `None`
/// and goes to a backend as usual.
pub fn parse_command(sql: &str) -> Option<Command> {
    let s = sql.trim().trim_end_matches(';').trim_end();
    let (verb, rest) = split_word(s)?;
    match verb.to_ascii_lowercase().as_str() {
        "show" => {
            let (name, tail) = split_word(rest)?;
            tail.is_empty()
                .then_some(())
                .and(Setting::from_name(name).map(Command::Show))
        }
        "reset" => {
            let (name, tail) = split_word(rest)?;
            tail.is_empty()
                .then_some(())
                .and(Setting::from_name(name).map(Command::Reset))
        }
        "set" => {
            let (mut name, mut tail) = split_word(rest)?;
            if name.eq_ignore_ascii_case("session") {
                (name, tail) = split_word(tail)?;
            }
            // `name=value` without blanks.
            let (name, after) = match name.split_once('=') {
                Some((n, v)) => (n, format!("={v} {tail}")),
                None => (name, tail.to_owned()),
            };
            let setting = Setting::from_name(name)?;
            let after = after.trim();
            let value = if let Some(v) = after.strip_prefix('=') {
                v.trim()
            } else {
                let (to, v) = split_word(after)?;
                if !to.eq_ignore_ascii_case("to") {
                    return None;
                }
                v.trim()
            };
            if value.eq_ignore_ascii_case("default") {
                return Some(Command::Reset(setting));
            }
            let value = match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
                Some(inner) => inner.replace("''", "'"),
                None => value.to_owned(),
            };
            Some(Command::Set(setting, value))
        }
        _ => None,
    }
}

fn split_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(s.len());
    let end = if end == 0 { 1 } else { end };
    Some((&s[..end], s[end..].trim_start()))
}

/// Parses a value for `meridian.min_lsn` (`X/Y`; `0/0` or empty clears it).
pub fn parse_min_lsn(v: &str) -> Result<Option<Lsn>, BadValue> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let lsn: Lsn = v
        .parse()
        .map_err(|e: meridian_shared::lsn::LsnParseError| BadValue {
            setting: Setting::MinLsn.name(),
            reason: e.to_string(),
        })?;
    Ok((lsn != Lsn::ZERO).then_some(lsn))
}

/// Parses a value for `meridian.max_staleness` (a duration such as `2s`, `500ms`;
/// a bare number means seconds).
pub fn parse_staleness(v: &str) -> Result<Duration, BadValue> {
    let v = v.trim();
    let bad = |reason: String| BadValue {
        setting: Setting::MaxStaleness.name(),
        reason,
    };
    if let Ok(secs) = v.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| bad(format!("{v:?} is not a non-negative duration")));
    }
    humantime::parse_duration(v).map_err(|e| bad(format!("{v:?}: {e} (e.g. '2s' or '500ms')")))
}

/// How `SHOW` displays a duration.
pub fn format_staleness(d: Option<Duration>) -> String {
    match d {
        None => "off".into(),
        Some(d) => humantime::format_duration(d).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_sqlroute::Classifier;

    const MS: Duration = Duration::from_millis(1);

    fn obs(lsn: u64, lag_ms: u64) -> Option<Observed> {
        Some(Observed {
            ok: true,
            replay_lsn: Some(Lsn(lsn)),
            lag: Some(MS * lag_ms as u32),
        })
    }

    fn need(lsn: u64) -> Need {
        Need {
            lsn: Some(Lsn(lsn)),
            max_staleness: None,
        }
    }

    #[test]
    fn fits_checks_lsn_staleness_and_health() {
        assert_eq!(fits(&Need::default(), None), Fit::Yes);
        assert_eq!(fits(&need(10), None), Fit::NotYet);
        assert_eq!(fits(&need(10), obs(9, 0).as_ref()), Fit::NotYet);
        assert_eq!(fits(&need(10), obs(10, 0).as_ref()), Fit::Yes);
        assert_eq!(fits(&need(10), obs(11, 0).as_ref()), Fit::Yes);
        let down = Observed {
            ok: false,
            replay_lsn: Some(Lsn(99)),
            lag: None,
        };
        assert_eq!(fits(&need(10), Some(&down)), Fit::Never);
        let stale = Need {
            lsn: None,
            max_staleness: Some(MS * 2000),
        };
        assert_eq!(fits(&stale, obs(1, 1999).as_ref()), Fit::Yes);
        assert_eq!(fits(&stale, obs(1, 2000).as_ref()), Fit::Yes);
        assert_eq!(fits(&stale, obs(1, 2001).as_ref()), Fit::Never);
        let both = Need {
            lsn: Some(Lsn(50)),
            max_staleness: Some(MS * 100),
        };
        assert_eq!(fits(&both, obs(40, 10).as_ref()), Fit::NotYet);
        assert_eq!(fits(&both, obs(40, 500).as_ref()), Fit::Never);
    }

    /// The decision for `need(10)` before any wait, with the default 200 ms `ryw_wait`.
    fn at_once(c: &Candidates<'_>) -> RywStep {
        ryw_target(&need(10), c, 0, Duration::ZERO, MS * 200)
    }

    fn local(local: &[Option<Observed>]) -> Candidates<'_> {
        Candidates {
            local,
            ..Candidates::default()
        }
    }

    #[test]
    fn local_replica_that_caught_up_is_used_at_once() {
        let wait = MS * 200;
        let step = ryw_target(&need(10), &local(&[obs(10, 0)]), 0, Duration::ZERO, wait);
        assert_eq!(step, RywStep::Local(0));
        // Among several fitting local replicas the salt chooses.
        let set = [obs(5, 0), obs(12, 0), obs(20, 0)];
        let step = ryw_target(&need(10), &local(&set), 1, Duration::ZERO, wait);
        assert_eq!(step, RywStep::Local(2));
        // Even when the primary is local too.
        let c = Candidates {
            primary_local: true,
            ..local(&set)
        };
        assert_eq!(
            ryw_target(&need(10), &c, 1, Duration::ZERO, wait),
            RywStep::Local(2)
        );
    }

    #[test]
    fn lagging_local_replica_is_waited_for_then_one_beside_the_primary_then_the_primary() {
        let wait = MS * 200;
        let n = need(10);
        let (behind, caught_up) = ([obs(5, 0)], [obs(10, 0)]);
        let c = Candidates {
            local: &behind,
            beside_primary: &caught_up,
            primary_local: false,
        };
        // Local behind, the primary's region caught up: wait for the local one first.
        assert_eq!(
            ryw_target(&n, &c, 0, MS * 50, wait),
            RywStep::Wait(MS * 150)
        );
        // The wait ran out: the replica beside the primary, as near as the primary.
        assert_eq!(ryw_target(&n, &c, 0, wait, wait), RywStep::BesidePrimary(0));
        // Nobody fits after the wait: the primary.
        let also_behind = [obs(9, 0)];
        let c = Candidates {
            beside_primary: &also_behind,
            ..c
        };
        assert_eq!(ryw_target(&n, &c, 0, MS * 201, wait), RywStep::Primary);
        // ryw_wait = 0: never wait.
        assert_eq!(
            ryw_target(&n, &local(&behind), 0, Duration::ZERO, Duration::ZERO),
            RywStep::Primary
        );
        // A local replica that is down is not waited for.
        let down = [Some(Observed {
            ok: false,
            replay_lsn: None,
            lag: None,
        })];
        assert_eq!(
            ryw_target(&n, &local(&down), 0, Duration::ZERO, wait),
            RywStep::Primary
        );
    }

    #[test]
    fn a_local_primary_is_read_at_once_instead_of_waiting() {
        // The primary's own region: its replica lags, the primary is as near.
        let behind = [obs(5, 0)];
        let c = Candidates {
            local: &behind,
            primary_local: true,
            ..Candidates::default()
        };
        assert_eq!(at_once(&c), RywStep::Primary);
        // No replica of its own: the primary, never a wait for a replica across the WAN.
        let c = Candidates {
            primary_local: true,
            ..Candidates::default()
        };
        assert_eq!(at_once(&c), RywStep::Primary);
    }

    #[test]
    fn without_a_local_replica_the_primary_is_not_waited_against() {
        // No replica in this region, the primary's region lags: the primary at once.
        let behind = [obs(5, 0)];
        let c = Candidates {
            beside_primary: &behind,
            ..Candidates::default()
        };
        assert_eq!(at_once(&c), RywStep::Primary);
        let caught_up = [obs(10, 0)];
        let c = Candidates {
            beside_primary: &caught_up,
            ..Candidates::default()
        };
        assert_eq!(at_once(&c), RywStep::BesidePrimary(0));
    }

    #[test]
    fn staleness_bound_chooses_a_replica_beside_the_primary_or_the_primary_without_waiting() {
        let wait = MS * 200;
        let n = Need {
            lsn: None,
            max_staleness: Some(MS * 1000),
        };
        let (lagging, fresh, stale) = ([obs(1, 5000)], [obs(1, 10)], [obs(1, 3000)]);
        let c = Candidates {
            local: &lagging,
            beside_primary: &fresh,
            primary_local: false,
        };
        assert_eq!(
            ryw_target(&n, &c, 0, Duration::ZERO, wait),
            RywStep::BesidePrimary(0)
        );
        let c = Candidates {
            beside_primary: &stale,
            ..c
        };
        assert_eq!(
            ryw_target(&n, &c, 0, Duration::ZERO, wait),
            RywStep::Primary
        );
    }

    /// No message may be pipelined behind a COPY (the commit-LSN query waits for it):
    /// the statement's analysis says which texts are one.
    #[test]
    fn copy_statements_are_recognised() {
        let c = Classifier::new(0);
        let may_copy = |sql: &str| c.analyze(sql).may_copy();
        assert!(may_copy("COPY t FROM STDIN"));
        assert!(may_copy("  copy t (a) from stdin csv"));
        assert!(may_copy("BEGIN; COPY t FROM STDIN; COMMIT"));
        assert!(may_copy("/* x */\ncopy\tt from stdin"));
        assert!(may_copy("COPY t FROM STDIN WITH (FORMAT nonsense, a b c"));
        assert!(!may_copy("INSERT INTO copy_log VALUES (1)"));
        assert!(!may_copy("UPDATE t SET v = 'xcopyx'"));
        assert!(!may_copy("INSERT INTO t VALUES (1)"));
    }

    #[test]
    fn commit_points() {
        let c = Classifier::new(16);
        let cat = FunctionCatalog::with_builtin_defaults();
        let cp = |sql: &str, in_tx: bool| commit_point(&c.analyze(sql), &cat, in_tx);
        assert!(cp("INSERT INTO t VALUES (1)", false));
        assert!(!cp("INSERT INTO t VALUES (1)", true));
        assert!(cp("COMMIT", true));
        assert!(cp("END", true));
        assert!(cp("BEGIN; INSERT INTO t VALUES (1); COMMIT", false));
        assert!(!cp("SELECT 1", false));
        assert!(!cp("SET search_path = a", false));
        assert!(!cp("ROLLBACK", true));
        assert!(cp("SELECT nextval('s')", false));
    }

    #[test]
    fn parses_session_commands() {
        use Command::*;
        use Setting::*;
        assert_eq!(
            parse_command("SHOW meridian.last_commit_lsn"),
            Some(Show(LastCommitLsn))
        );
        assert_eq!(
            parse_command("  show MERIDIAN.MIN_LSN ;"),
            Some(Show(MinLsn))
        );
        assert_eq!(
            parse_command("SET meridian.min_lsn = '0/16B3748'"),
            Some(Set(MinLsn, "0/16B3748".into()))
        );
        assert_eq!(
            parse_command("set session meridian.min_lsn to '1/2';"),
            Some(Set(MinLsn, "1/2".into()))
        );
        assert_eq!(
            parse_command("SET meridian.max_staleness='2s'"),
            Some(Set(MaxStaleness, "2s".into()))
        );
        assert_eq!(
            parse_command("SET meridian.max_staleness = 500ms"),
            Some(Set(MaxStaleness, "500ms".into()))
        );
        assert_eq!(
            parse_command("SET meridian.max_staleness TO DEFAULT"),
            Some(Reset(MaxStaleness))
        );
        assert_eq!(
            parse_command("RESET meridian.max_staleness"),
            Some(Reset(MaxStaleness))
        );
        assert_eq!(parse_command("SHOW search_path"), None);
        assert_eq!(parse_command("SET meridian.epoch = 3"), None);
        assert_eq!(parse_command("SHOW meridian.min_lsn; SELECT 1"), None);
        assert_eq!(parse_command("SET LOCAL meridian.min_lsn = '0/1'"), None);
        assert_eq!(parse_command("SELECT 1"), None);
        assert_eq!(parse_command(""), None);
    }

    #[test]
    fn parses_values() {
        assert_eq!(parse_min_lsn("0/16B3748"), Ok(Some(Lsn(0x16B_3748))));
        assert_eq!(parse_min_lsn("0/0"), Ok(None));
        assert_eq!(parse_min_lsn(""), Ok(None));
        let e = parse_min_lsn("yesterday").unwrap_err();
        assert_eq!(e.setting, "meridian.min_lsn");
        assert!(e.to_string().contains("meridian.min_lsn"));
        assert_eq!(parse_staleness("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_staleness("500ms"), Ok(MS * 500));
        assert_eq!(parse_staleness("1.5"), Ok(MS * 1500));
        assert!(parse_staleness("-1").is_err());
        let e = parse_staleness("soon").unwrap_err();
        assert_eq!(e.setting, "meridian.max_staleness");
        assert_eq!(format_staleness(None), "off");
        assert_eq!(format_staleness(Some(Duration::from_secs(2))), "2s");
    }
}
