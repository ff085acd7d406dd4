//! What the regional cache may store and serve: the pure decisions.
//!
//! [`CacheRules`] turns `[cache]` rules and a statement's `meridian:cache` comment into a TTL;
//! [`eligible`] says whether a read may be cached at all (one statement, a read, every function
//! immutable, every relation an ordinary table the [`RelationCatalog`] knows), and names the
//! tables whose watermarks guard the entry. [`may_serve`] is the serving rule: the watermark
//! check of `shared::cache_keys::entry_is_valid`, plus the session's floor so that a session never
//! reads older data from the cache than it has already seen or written (see `docs/cache.md`).

use std::time::Duration;

use meridian_shared::cache_keys::entry_is_valid;
use meridian_shared::config::CacheConfig;
use meridian_shared::lsn::Lsn;
use meridian_sqlroute::{Analysis, FunctionCatalog, StatementKind, Volatility};
use regex::Regex;

use super::relations::{RelationCatalog, Resolved};

/// Functions written as SQL syntax that always give the same result for the same input.
const PURE_SYNTAX_FUNCTIONS: &[&str] = &["coalesce", "nullif", "greatest", "least", "row"];

/// A rule compiled from `[[cache.rules]]`.
#[derive(Debug)]
enum Matcher {
    /// Every table read must match one of these (`schema.table` or `schema.*`).
    Tables(Vec<String>),
    Pattern(Regex),
}

/// The compiled `[cache]` rules.
#[derive(Debug, Default)]
pub struct CacheRules {
    rules: Vec<(Matcher, Duration)>,
}

impl CacheRules {
    /// Compiles the rules of `cfg` (validated already: a bad pattern is skipped).
    pub fn from_config(cfg: &CacheConfig) -> CacheRules {
        let rules = cfg
            .rules
            .iter()
            .filter_map(|r| {
                let matcher = match &r.pattern {
                    Some(p) => Matcher::Pattern(Regex::new(p).ok()?),
                    None => Matcher::Tables(
                        r.tables
                            .iter()
                            .map(|t| meridian_shared::cache_keys::normalize_table(t.trim()))
                            .collect(),
                    ),
                };
                Some((matcher, r.ttl))
            })
            .collect();
        CacheRules { rules }
    }

    /// Whether no rule is configured (then only commented queries are cached).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The TTL for a read with text `sql` over `tables` (normalized `schema.table`), if any rule
    /// or the statement's own `meridian:cache ttl=` comment asks for caching. The comment wins.
    pub fn ttl(&self, sql: &str, hint: Option<Duration>, tables: &[String]) -> Option<Duration> {
        if let Some(ttl) = hint.filter(|t| !t.is_zero()) {
            return Some(ttl);
        }
        self.rules.iter().find_map(|(m, ttl)| {
            let hit = match m {
                Matcher::Pattern(re) => re.is_match(sql),
                Matcher::Tables(allowed) => {
                    !tables.is_empty()
                        && tables
                            .iter()
                            .all(|t| allowed.iter().any(|a| table_matches(a, t)))
                }
            };
            hit.then_some(*ttl)
        })
    }
}

fn table_matches(rule: &str, table: &str) -> bool {
    match rule.strip_suffix('*') {
        Some(prefix) => table.starts_with(prefix),
        None => rule == table,
    }
}

/// Why a read is not cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not exactly one statement, not parsed, or not a plain read.
    NotASingleRead,
    /// Calls a function that is not immutable.
    Volatile,
    /// Reads a relation that is not an ordinary table (a view, a partitioned table, a
    /// catalog table...).
    Relation,
    /// Reads a relation the catalog did not have at its last load (created since, or not
    /// there at all): the caller asks for an early catalog refresh.
    UnknownRelation,
    /// Reads no table at all (nothing could ever invalidate it, nothing to gain).
    NoTable,
}

/// Whether `analysis` may be cached; on success, the tables (`schema.table`) whose
/// watermarks guard the entry: every ordinary table an unqualified name could resolve to.
pub fn eligible(
    analysis: &Analysis,
    functions: &FunctionCatalog,
    relations: &RelationCatalog,
) -> Result<Vec<String>, Skip> {
    let [stmt] = analysis.statements.as_slice() else {
        return Err(Skip::NotASingleRead);
    };
    if !analysis.parsed || analysis.hint.primary || stmt.kind != StatementKind::Read {
        return Err(Skip::NotASingleRead);
    }
    if stmt.session.pins.is_some() || !stmt.read_only_candidate {
        return Err(Skip::NotASingleRead);
    }
    let all_immutable = stmt.functions.iter().all(|f| {
        PURE_SYNTAX_FUNCTIONS.contains(&f.as_str())
            || functions.volatility(f) == Some(Volatility::Immutable)
    });
    if !all_immutable {
        return Err(Skip::Volatile);
    }
    if stmt.tables.is_empty() {
        return Err(Skip::NoTable);
    }
    let mut tables = Vec::new();
    for t in &stmt.tables {
        match relations.resolve(t) {
            Resolved::Tables(found) => {
                for f in found {
                    if !tables.contains(&f) {
                        tables.push(f);
                    }
                }
            }
            Resolved::NotCacheable => return Err(Skip::Relation),
            Resolved::Unknown => return Err(Skip::UnknownRelation),
        }
    }
    Ok(tables)
}

/// The positions bracketing a cached result: the replica had replayed `lower` before the
/// statement started and `upper` after it ended, so the result reflects every commit up to
/// `lower` and none after `upper`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bracket {
    pub lower: Lsn,
    pub upper: Lsn,
}

/// What the session has seen: its cache reads must not go back before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFloor {
    /// Highest LSN the session's reads through the cache reflected (an upper bound).
    pub seen: Option<Lsn>,
    /// The last entry the session read or filled: `(key, lower)`. Reading it again shows the
    /// same data, so it stays servable even when `seen` has moved past its `lower`.
    pub last: Option<(String, Lsn)>,
}

impl SessionFloor {
    /// Records that the session read `key`'s entry with `bracket`.
    pub fn observe(&mut self, key: &str, bracket: Bracket) {
        self.seen = self.seen.max(Some(bracket.upper));
        self.last = Some((key.to_owned(), bracket.lower));
    }
}

/// The serving rule for the entry `key` read at `bracket`, given its tables' watermarks, the
/// LSN the session requires (its last commit, `meridian.min_lsn`, a `min_lsn` comment) and what
/// it has already read through the cache.
pub fn may_serve(
    key: &str,
    bracket: Bracket,
    watermarks: &[(String, Option<Lsn>)],
    required: Option<Lsn>,
    floor: &SessionFloor,
) -> bool {
    if !entry_is_valid(bracket.lower, watermarks) {
        return false;
    }
    if required.is_some_and(|r| r > bracket.lower) {
        return false;
    }
    let same_as_last = floor
        .last
        .as_ref()
        .is_some_and(|(k, l)| k == key && *l == bracket.lower);
    same_as_last || floor.seen.is_none_or(|seen| seen <= bracket.lower)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::config::CacheRule;
    use meridian_sqlroute::analyze_uncached;

    fn relations() -> RelationCatalog {
        RelationCatalog::from_rows([
            ("public", "items", 'r', false, false),
            ("public", "prices", 'r', false, false),
            ("shop", "items", 'r', false, false),
            ("public", "v_items", 'v', false, false),
            ("public", "events", 'p', true, false),
            ("public", "events_2026", 'r', false, true),
        ])
    }

    fn functions() -> FunctionCatalog {
        let mut f = FunctionCatalog::new();
        f.insert("lower".into(), Volatility::Immutable);
        f.insert("count".into(), Volatility::Immutable);
        f.insert("now".into(), Volatility::Stable);
        f.insert("nextval".into(), Volatility::Volatile);
        f
    }

    fn check(sql: &str) -> Result<Vec<String>, Skip> {
        eligible(&analyze_uncached(sql), &functions(), &relations())
    }

    #[test]
    fn plain_reads_of_tables_are_eligible_with_every_resolution_as_tag() {
        assert_eq!(
            check("SELECT lower(name), count(*) FROM prices GROUP BY 1"),
            Ok(vec!["public.prices".to_owned()])
        );
        // Unqualified `items` could be public.items or shop.items, whatever the search_path.
        assert_eq!(
            check("SELECT * FROM items JOIN shop.items s USING (id)"),
            Ok(vec!["public.items".to_owned(), "shop.items".to_owned()])
        );
        assert_eq!(
            check("SELECT * FROM prices WHERE id IN (SELECT id FROM public.items)"),
            Ok(vec!["public.prices".to_owned(), "public.items".to_owned()])
        );
    }

    #[test]
    fn ineligible_reads() {
        assert_eq!(check("SELECT now(), * FROM prices"), Err(Skip::Volatile));
        assert_eq!(check("SELECT nextval('s')"), Err(Skip::Volatile));
        assert_eq!(check("SELECT 1"), Err(Skip::NoTable));
        assert_eq!(check("SELECT * FROM v_items"), Err(Skip::Relation));
        assert_eq!(check("SELECT * FROM events"), Err(Skip::Relation));
        assert_eq!(check("SELECT * FROM events_2026"), Err(Skip::Relation));
        assert_eq!(
            check("SELECT * FROM unknown_table"),
            Err(Skip::UnknownRelation)
        );
        assert_eq!(check("SELECT * FROM pg_class"), Err(Skip::Relation));
        assert_eq!(
            check("SELECT * FROM prices FOR UPDATE"),
            Err(Skip::NotASingleRead)
        );
        assert_eq!(
            check("SELECT 1 FROM prices; SELECT 2 FROM prices"),
            Err(Skip::NotASingleRead)
        );
        assert_eq!(check("UPDATE prices SET p = 1"), Err(Skip::NotASingleRead));
        assert_eq!(
            check("/* meridian:primary */ SELECT * FROM prices"),
            Err(Skip::NotASingleRead)
        );
        assert_eq!(check("BEGIN"), Err(Skip::NotASingleRead));
        assert_eq!(check("SELEC garbage"), Err(Skip::NotASingleRead));
    }

    #[test]
    fn ttl_from_comment_or_first_matching_rule() {
        let cfg = CacheConfig {
            rules: vec![
                CacheRule {
                    tables: vec!["prices".into(), "shop.*".into()],
                    pattern: None,
                    ttl: Duration::from_secs(5),
                },
                CacheRule {
                    tables: vec![],
                    pattern: Some("(?i)from items where id =".into()),
                    ttl: Duration::from_secs(7),
                },
            ],
            ..CacheConfig::default()
        };
        let rules = CacheRules::from_config(&cfg);
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            rules.ttl("x", None, &t(&["public.prices", "shop.items"])),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            rules.ttl("x", None, &t(&["public.prices", "public.items"])),
            None
        );
        assert_eq!(
            rules.ttl(
                "SELECT * FROM items WHERE id = 1",
                None,
                &t(&["public.items"])
            ),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            rules.ttl("x", Some(Duration::from_secs(1)), &t(&["public.prices"])),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            CacheRules::default().ttl("x", None, &t(&["public.prices"])),
            None
        );
    }

    fn b(lower: u64, upper: u64) -> Bracket {
        Bracket {
            lower: Lsn(lower),
            upper: Lsn(upper),
        }
    }

    #[test]
    fn serving_needs_valid_watermarks_and_respects_what_the_session_saw() {
        let wm = |v: Option<u64>| vec![("public.t".to_owned(), v.map(Lsn))];
        let fresh = SessionFloor::default();
        assert!(may_serve("k", b(100, 100), &wm(None), None, &fresh));
        assert!(may_serve("k", b(100, 100), &wm(Some(100)), None, &fresh));
        assert!(!may_serve("k", b(100, 100), &wm(Some(101)), None, &fresh));
        // Read-your-writes: the entry must include the session's commit.
        assert!(!may_serve(
            "k",
            b(100, 120),
            &wm(None),
            Some(Lsn(110)),
            &fresh
        ));
        assert!(may_serve(
            "k",
            b(110, 120),
            &wm(None),
            Some(Lsn(110)),
            &fresh
        ));
        // After reading data as of up to 130, an entry from 100 could be older: no.
        let mut seen = SessionFloor::default();
        seen.observe("other", b(120, 130));
        assert!(!may_serve("k", b(100, 100), &wm(None), None, &seen));
        assert!(may_serve("k", b(130, 140), &wm(None), None, &seen));
        // ...but the very entry it just read stays servable.
        let mut again = SessionFloor::default();
        again.observe("k", b(100, 150));
        assert!(may_serve("k", b(100, 150), &wm(None), None, &again));
        assert!(!may_serve("k", b(99, 150), &wm(None), None, &again));
    }
}
