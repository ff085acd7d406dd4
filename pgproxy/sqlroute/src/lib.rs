//! Statement classification for meridian-pgproxy: may a query run on a replica, and what does it
//! do to the transaction and the session?
//!
//! [`Classifier::analyze`] parses a query string (sqlparser, PostgreSQL dialect) into an
//! [`Analysis`] and caches it per exact text in an LRU, because prepared statements and repeated
//! queries dominate real traffic: a cache hit is one hash lookup and an `Arc` clone under a mutex.
//! [`Analysis::is_read`] combines the analysis with a [`FunctionCatalog`] (function volatility
//! learned from the primary's `pg_proc`) into the routing decision. The crate does no I/O and
//! never panics on input; statements the parser rejects are described conservatively (primary,
//! `parsed = false`). The routing rules and their limits are written down in `docs/routing.md`.

mod analysis;
mod catalog;
mod classify;
mod fallback;
mod hints;

use std::num::NonZeroUsize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

pub use analysis::{
    Analysis, Hints, PinReason, SessionEffect, StatementInfo, StatementKind, TxEffect,
};
pub use catalog::{FunctionCatalog, Volatility, SQL_SYNTAX_FUNCTIONS, VOLATILE_READ_SAFE};
pub use hints::parse_hints;

/// Query texts longer than this are analysed but not cached: huge texts (bulk `INSERT`s with
/// inlined values) rarely repeat and would crowd the cache's memory.
pub const MAX_CACHED_SQL_LEN: usize = 64 * 1024;

/// Analyses query strings, with an LRU cache keyed by the exact text.
pub struct Classifier {
    cache: Option<Mutex<LruCache<String, Arc<Analysis>>>>,
}

impl Classifier {
    /// A classifier caching up to `cache_capacity` analyses; 0 disables the cache.
    pub fn new(cache_capacity: usize) -> Self {
        Self {
            cache: NonZeroUsize::new(cache_capacity).map(|cap| Mutex::new(LruCache::new(cap))),
        }
    }

    /// Parse (or fetch from the cache) one query string as sent by a client: a simple Query text
    /// or a Parse message's text, possibly several statements separated by `;`. Thread-safe;
    /// never panics.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        if let Some(cache) = &self.cache {
            let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(hit) = cache.get(sql) {
                return Arc::clone(hit);
            }
        }
        // Parse outside the lock: two sessions missing on the same text both parse it, which
        // is cheaper than serialising every miss.
        let analysis = Arc::new(analyze_uncached(sql));
        if let Some(cache) = &self.cache {
            if sql.len() <= MAX_CACHED_SQL_LEN {
                let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
                cache.put(sql.to_owned(), Arc::clone(&analysis));
            }
        }
        analysis
    }

    /// Number of analyses in the cache.
    pub fn cached(&self) -> usize {
        self.cache.as_ref().map_or(0, |cache| {
            cache.lock().unwrap_or_else(PoisonError::into_inner).len()
        })
    }
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
        let capacity = self.cache.as_ref().map_or(0, |cache| {
            cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .cap()
                .get()
        });
        f.debug_struct("Classifier")
            .field("capacity", &capacity)
            .field("cached", &self.cached())
            .finish()
    }
}

/// Analyse `sql` without the cache (what a cache miss computes).
pub fn analyze_uncached(sql: &str) -> Analysis {
    let hint = parse_hints(sql);
    let (parsed, statements) = if sql.len() <= INLINE_PARSE_MAX_LEN {
        guarded_parse(sql)
    } else if sql.len() <= MAX_PARSED_SQL_LEN {
        parse_on_big_stack(sql)
    } else {
        (false, vec![fallback::unparsed_huge(sql)])
    };
    Analysis {
        parsed,
        statements,
        hint,
    }
}

/// sqlparser is not known to panic on PostgreSQL input, but a panic here would take a client
/// connection (or the proxy) down: treat it as a statement we could not parse.
fn guarded_parse(sql: &str) -> (bool, Vec<StatementInfo>) {
    catch_unwind(AssertUnwindSafe(|| parse_and_classify(sql))).unwrap_or_else(|_| {
        let mut info = StatementInfo::new(StatementKind::Write, false);
        info.session.pins = Some(PinReason::Other);
        (false, vec![info])
    })
}

fn parse_on_big_stack(sql: &str) -> (bool, Vec<StatementInfo>) {
    let stack = (sql.len() * STACK_PER_BYTE).max(4 << 20);
    let result = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("sqlroute-parse".to_owned())
            .stack_size(stack)
            .spawn_scoped(scope, || guarded_parse(sql))
            .ok()
            .and_then(|handle| handle.join().ok())
    });
    result.unwrap_or_else(|| (false, vec![fallback::unparsed_huge(sql)]))
}

fn parse_and_classify(sql: &str) -> (bool, Vec<StatementInfo>) {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(stmts) => (true, stmts.iter().map(classify::classify).collect()),
        Err(_) => fallback::analyze_unparsed(sql),
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
        let first = c.analyze("SELECT 1");
        c.analyze("SELECT 2");
        c.analyze("SELECT 1");
        c.analyze("SELECT 3");
        assert_eq!(c.cached(), 2);
        assert!(Arc::ptr_eq(&first, &c.analyze("SELECT 1")));
        let two = c.analyze("SELECT 2");
        assert_eq!(*two, analyze_uncached("SELECT 2"));
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
                    (0..50).all(|j| c.analyze(&format!("SELECT {}", (i + j) % 8)).parsed)
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().expect("thread"));
        }
        assert_eq!(c.cached(), 8);
    }
}
