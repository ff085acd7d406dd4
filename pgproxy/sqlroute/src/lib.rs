//! Statement classification for meridian-pgproxy: may a query run on a replica, and what does it
//! do to the transaction and the session?
//!
//! [`Classifier::analyze`] parses a query string (sqlparser, PostgreSQL dialect) into an
//! [`Analysis`] and caches it per exact text in an LRU, because prepared statements and repeated
//! queries dominate real traffic: a cache hit is one hash lookup and an `Arc` clone under a mutex.
//! Queries that inline their values (a new text every time) are cached by their literal-stripped
//! [`fingerprint`] instead, when the analysis cannot depend on the literals ([`fingerprint`]
//! module); a hit costs one pass over the text instead of a parse.
//! [`Analysis::is_read`] combines the analysis with a [`FunctionCatalog`] (function volatility
//! learned from the primary's `pg_proc`) into the routing decision. The crate does no I/O and
//! never panics on input; statements the parser rejects are described conservatively (primary,
//! `parsed = false`). The routing rules and their limits are written down in `docs/routing.md`.

mod analysis;
mod catalog;
mod classify;
mod fallback;
mod fingerprint;
mod hints;

use std::num::NonZeroUsize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

pub use analysis::{
    Analysis, Deallocate, Hints, PinReason, SessionEffect, StatementInfo, StatementKind, TxEffect,
};
pub use catalog::{FunctionCatalog, Volatility, SQL_SYNTAX_FUNCTIONS, VOLATILE_READ_SAFE};
pub use classify::PRIMARY_STATE_VIEWS;
pub use fingerprint::{fingerprint, reusable, Fingerprint};
pub use hints::parse_hints;

/// Query texts longer than this are analysed but not cached: huge texts (bulk `INSERT`s with
/// inlined values) rarely repeat and would crowd the cache's memory.
pub const MAX_CACHED_SQL_LEN: usize = 64 * 1024;

/// Analyses query strings, with LRU caches keyed by the exact text and by the fingerprint.
pub struct Classifier {
    cache: Option<Mutex<Caches>>,
}

/// The two caches, behind one lock.
struct Caches {
    /// Analyses by exact text: everything that has no fingerprint or whose analysis depends on
    /// literal values (`SET`, `set_config`, transaction control, unparsed texts, ...).
    exact: LruCache<String, Arc<Analysis>>,
    /// Reusable analyses ([`reusable`]) by [`fingerprint`]; their `hint` is the one of the text
    /// that filled the entry and is re-derived for every other text.
    shapes: LruCache<String, Arc<Analysis>>,
}

impl Classifier {
    /// A classifier caching up to `cache_capacity` analyses per cache (exact texts and
    /// fingerprints); 0 disables caching.
    pub fn new(cache_capacity: usize) -> Self {
        Self {
            cache: NonZeroUsize::new(cache_capacity).map(|cap| {
                Mutex::new(Caches {
                    exact: LruCache::new(cap),
                    shapes: LruCache::new(cap),
                })
            }),
        }
    }

    /// Parse (or fetch from the cache) one query string as sent by a client: a simple Query text
    /// or a Parse message's text, possibly several statements separated by `;`. Thread-safe;
    /// never panics. The result always equals [`analyze_uncached`]`(sql)`.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        let Some(cache) = &self.cache else {
            return Arc::new(analyze_uncached(sql));
        };
        if let Some(hit) = lock(cache).exact.get(sql) {
            return Arc::clone(hit);
        }
        // Texts parsed on a helper thread or not at all are never fingerprinted: their
        // analysis may depend on their length.
        let key = if sql.len() <= INLINE_PARSE_MAX_LEN {
            fingerprint(sql)
        } else {
            None
        };
        if let Some(key) = &key {
            let hit = lock(cache).shapes.get(key.text.as_str()).map(Arc::clone);
            if let Some(hit) = hit {
                return with_hints_of(hit, sql);
            }
        }
        // Parse outside the lock: two sessions missing on the same text both parse it, which
        // is cheaper than serialising every miss.
        let (analysis, literals) = analyze_counting(sql);
        let analysis = Arc::new(analysis);
        if sql.len() <= MAX_CACHED_SQL_LEN {
            let mut cache = lock(cache);
            match key {
                // Every literal the lexer replaced is a value in the syntax tree (none was read
                // as an identifier, a type modifier, a COPY option character, ...), and none of
                // them reached the analysis.
                Some(key) if literals == Some(key.literals) && reusable(&analysis) => {
                    // A text without literals (`... WHERE id = $1`, typical of Parse messages)
                    // repeats verbatim: keep it by exact text too, so it hits without a lexer
                    // pass; the fingerprint entry serves it with other leading comments.
                    if key.literals == 0 {
                        cache.exact.put(sql.to_owned(), Arc::clone(&analysis));
                    }
                    cache.shapes.put(key.text, Arc::clone(&analysis));
                }
                _ => {
                    cache.exact.put(sql.to_owned(), Arc::clone(&analysis));
                }
            }
        }
        analysis
    }

    /// Number of analyses in the caches (exact texts and fingerprints).
    pub fn cached(&self) -> usize {
        self.cache.as_ref().map_or(0, |cache| {
            let cache = lock(cache);
            cache.exact.len() + cache.shapes.len()
        })
    }
}

fn lock(cache: &Mutex<Caches>) -> std::sync::MutexGuard<'_, Caches> {
    cache.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `cached` (an analysis of a text with the same fingerprint as `sql`) with the hints of `sql`.
fn with_hints_of(cached: Arc<Analysis>, sql: &str) -> Arc<Analysis> {
    let hint = parse_hints(sql);
    if hint == cached.hint {
        return cached;
    }
    Arc::new(Analysis {
        parsed: cached.parsed,
        statements: cached.statements.clone(),
        hint,
    })
}

/// Texts up to this length are parsed on the caller's stack. sqlparser builds left-deep trees
/// for operator chains (`1+1+1...`, `a OR b OR ...`) without a depth limit, and walking or
/// dropping such a tree recurses once per operator: a long chain would overflow a small stack
/// (a tokio worker has 2 MiB). Longer texts are parsed on a helper thread with a stack sized
/// for the worst case.
pub const INLINE_PARSE_MAX_LEN: usize = 8 * 1024;

/// Texts longer than this are not parsed at all: they are described from their leading
/// keywords (`parsed = false`, so reads among them go to the primary).
pub const MAX_PARSED_SQL_LEN: usize = 256 * 1024;

/// Stack reserved per byte of text on the helper thread (each chain level takes at least two
/// bytes of text and, in an unoptimised build, well under 200 bytes of stack).
const STACK_PER_BYTE: usize = 256;

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let capacity = self
            .cache
            .as_ref()
            .map_or(0, |cache| lock(cache).exact.cap().get());
        f.debug_struct("Classifier")
            .field("capacity", &capacity)
            .field("cached", &self.cached())
            .finish()
    }
}

/// Analyse `sql` without the cache (what a cache miss computes).
pub fn analyze_uncached(sql: &str) -> Analysis {
    analyze_counting(sql).0
}

/// The analysis of `sql` and, when sqlparser accepted the whole text at once, the number of
/// numeric and string literal values in its syntax tree (see [`fingerprint::literal_values`]).
fn analyze_counting(sql: &str) -> (Analysis, Option<usize>) {
    let hint = parse_hints(sql);
    let parsed = if sql.len() <= INLINE_PARSE_MAX_LEN {
        guarded_parse(sql)
    } else if sql.len() <= MAX_PARSED_SQL_LEN {
        parse_on_big_stack(sql)
    } else {
        Classified::unparsed(fallback::unparsed_huge(sql))
    };
    let analysis = Analysis {
        parsed: parsed.parsed,
        statements: parsed.statements,
        hint,
    };
    (analysis, parsed.literals)
}

/// What parsing and classifying one text found.
struct Classified {
    parsed: bool,
    statements: Vec<StatementInfo>,
    /// Literal values in the syntax tree; `None` unless the whole text parsed at once.
    literals: Option<usize>,
}

impl Classified {
    fn unparsed(info: StatementInfo) -> Self {
        Classified {
            parsed: false,
            statements: vec![info],
            literals: None,
        }
    }
}

/// sqlparser is not known to panic on PostgreSQL input, but a panic here would take a client
/// connection (or the proxy) down: treat it as a statement we could not parse.
fn guarded_parse(sql: &str) -> Classified {
    catch_unwind(AssertUnwindSafe(|| parse_and_classify(sql))).unwrap_or_else(|_| {
        let mut info = StatementInfo::new(StatementKind::Write, false);
        info.session.pins = Some(PinReason::Other);
        Classified::unparsed(info)
    })
}

fn parse_on_big_stack(sql: &str) -> Classified {
    let stack = (sql.len() * STACK_PER_BYTE).max(4 << 20);
    let result = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("sqlroute-parse".to_owned())
            .stack_size(stack)
            .spawn_scoped(scope, || guarded_parse(sql))
            .ok()
            .and_then(|handle| handle.join().ok())
    });
    result.unwrap_or_else(|| Classified::unparsed(fallback::unparsed_huge(sql)))
}

fn parse_and_classify(sql: &str) -> Classified {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(stmts) => Classified {
            parsed: true,
            statements: stmts.iter().map(classify::classify).collect(),
            literals: Some(fingerprint::literal_values(&stmts)),
        },
        Err(_) => {
            let (parsed, statements) = fallback::analyze_unparsed(sql);
            Classified {
                parsed,
                statements,
                literals: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_hits_return_the_same_arc() {
        let c = Classifier::new(2);
        let a = c.analyze("SELECT 1");
        let b = c.analyze("SELECT 1");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(c.cached(), 1);
    }

    #[test]
    fn cache_evicts_least_recently_used() {
        let c = Classifier::new(2);
        // Distinct words, so distinct fingerprints (kept by fingerprint only: they have literals).
        let first = c.analyze("SELECT 1 AS a");
        c.analyze("SELECT 1 AS b");
        c.analyze("SELECT 2 AS a");
        c.analyze("SELECT 1 AS c");
        assert_eq!(c.cached(), 2);
        assert!(Arc::ptr_eq(&first, &c.analyze("SELECT 3 AS a")));
        let two = c.analyze("SELECT 1 AS b");
        assert_eq!(*two, analyze_uncached("SELECT 1 AS b"));
        // The same for texts without a fingerprint (kept by exact text).
        let c = Classifier::new(2);
        let first = c.analyze("SET a = 1");
        c.analyze("SET a = 2");
        c.analyze("SET a = 1");
        c.analyze("SET a = 3");
        assert_eq!(c.cached(), 2);
        assert!(Arc::ptr_eq(&first, &c.analyze("SET a = 1")));
    }

    #[test]
    fn zero_capacity_disables_the_cache() {
        let c = Classifier::new(0);
        let a = c.analyze("SELECT 1");
        let b = c.analyze("SELECT 1");
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(a, b);
        assert_eq!(c.cached(), 0);
    }

    #[test]
    fn texts_differing_in_literals_share_one_entry() {
        let c = Classifier::new(8);
        let a = c.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 1;");
        let b = c.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 98765;");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(c.cached(), 1);
        assert_eq!(
            *b,
            analyze_uncached("SELECT abalance FROM pgbench_accounts WHERE aid = 98765;")
        );
        // Hints come from the text at hand, not from the text that filled the entry.
        let h = c.analyze(
            "/* meridian:min_lsn=0/AB */ SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
        );
        assert_eq!(h.hint.min_lsn.as_deref(), Some("0/AB"));
        let p = c
            .analyze("/* meridian:primary */ SELECT abalance FROM pgbench_accounts WHERE aid = 8;");
        assert!(p.hint.primary && p.hint.min_lsn.is_none());
        assert_eq!(c.cached(), 1);
        // Values that end up in the analysis are never shared.
        let x = c.analyze("SET search_path = 'x'");
        let y = c.analyze("SET search_path = 'y'");
        assert_eq!(x.statements[0].session.set[0].1, "'x'");
        assert_eq!(y.statements[0].session.set[0].1, "'y'");
        let off = c.analyze("SELECT set_config('a', 'v', false)");
        let on = c.analyze("SELECT set_config('a', 'v', true)");
        assert_eq!(off.statements[0].session.set.len(), 1);
        assert!(on.statements[0].session.set.is_empty());
        assert_eq!(c.cached(), 5);
        // A text without literals is kept by exact text and by fingerprint.
        let a = c.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = $1");
        assert_eq!(c.cached(), 7);
        assert!(Arc::ptr_eq(
            &a,
            &c.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = $1")
        ));
        let hinted = c.analyze(
            "/* meridian:min_lsn=1/2 */ SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        );
        assert_eq!(hinted.hint.min_lsn.as_deref(), Some("1/2"));
        assert_eq!(hinted.statements, a.statements);
        assert_eq!(c.cached(), 7);
    }

    #[test]
    fn huge_texts_are_not_cached() {
        let c = Classifier::new(4);
        let sql = format!("SELECT '{}'", "x".repeat(MAX_CACHED_SQL_LEN));
        let a = c.analyze(&sql);
        assert!(a.parsed);
        assert_eq!(c.cached(), 0);
    }

    proptest::proptest! {
        // Without the catch_unwind guard: the parser path itself must not panic.
        #[test]
        fn parse_path_does_not_panic(sql in "[ -~\n]{0,80}") {
            let _ = parse_and_classify(&sql);
        }

        #[test]
        fn parse_path_does_not_panic_on_keyword_soup(
            words in proptest::collection::vec(
                proptest::sample::select(&[
                    "SELECT", "FROM", "t", "FOR", "NO", "KEY", "UPDATE", "SHARE", "TABLE", ";",
                    "(", ")", "'a'", "$$", "BEGIN", "ATOMIC", "END", "DO", "WITH", "x", "AS",
                    "DELETE", "RETURNING", "*", "SET", "LOCAL", "=", "1", "COPY", "TO", "STDOUT",
                ][..]),
                0..30,
            )
        ) {
            let _ = parse_and_classify(&words.join(" "));
        }
    }

    #[test]
    fn classifier_is_shareable_between_threads() {
        let c = Arc::new(Classifier::new(16));
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    (0..50).all(|j| {
                        c.analyze(&format!("SELECT c{} FROM t WHERE x = 1", (i + j) % 8))
                            .parsed
                            && c.analyze(&format!("SELECT {}", i * 100 + j)).parsed
                    })
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().expect("thread"));
        }
        // Eight fingerprints (one per column name) plus one shared by every `SELECT <number>`.
        assert_eq!(c.cached(), 9);
    }
}
