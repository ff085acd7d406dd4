//! Property tests: `analyze` never panics, on arbitrary text and on SQL-like token soup, and a
//! cached analysis is always equal to a fresh one.

use meridian_sqlroute::{analyze_uncached, Classifier, FunctionCatalog, TxEffect};
use proptest::prelude::*;

/// Fragments that steer the generator into the parser's and the pre-checks' interesting paths.
const FRAGMENTS: &[&str] = &[
    "SELECT",
    "select",
    "FROM",
    "t",
    "u",
    "WHERE",
    "a",
    "=",
    "1",
    "$1",
    "(",
    ")",
    ",",
    ";",
    "'x'",
    "'",
    "\"",
    "\"Q\"",
    "$$",
    "$$body$$",
    "/*",
    "*/",
    "--",
    "\n",
    "/* meridian:primary */",
    "/* meridian:cache ttl=5s */",
    "FOR",
    "NO",
    "KEY",
    "UPDATE",
    "SHARE",
    "TABLE",
    "WITH",
    "AS",
    "DELETE",
    "INSERT",
    "INTO",
    "VALUES",
    "RETURNING",
    "*",
    "BEGIN",
    "ATOMIC",
    "END",
    "COMMIT",
    "ROLLBACK",
    "READ",
    "ONLY",
    "SET",
    "LOCAL",
    "RESET",
    "ALL",
    "DO",
    "ALTER",
    "SYSTEM",
    "LISTEN",
    "PREPARE",
    "TRANSACTION",
    "EXPLAIN",
    "ANALYZE",
    "COPY",
    "STDIN",
    "STDOUT",
    "TO",
    "TEMP",
    "CREATE",
    "nextval('s')",
    "pg_advisory_lock(1)",
    "set_config('a','b',false)",
    "::int",
    "+",
    "E'\\n'",
    "ARRAY[1]",
    "[",
    "]",
    "DECLARE",
    "CURSOR",
    "HOLD",
    "SAVEPOINT",
    "DEFAULT",
    "é",
    "\0",
];

fn sqlish() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40).prop_map(|parts| parts.join(" "))
}

fn check(sql: &str, classifier: &Classifier) -> Result<(), TestCaseError> {
    let fresh = analyze_uncached(sql);
    let first = classifier.analyze(sql);
    let cached = classifier.analyze(sql);
    prop_assert_eq!(&*first, &fresh);
    prop_assert_eq!(&*cached, &fresh);
    let catalog = FunctionCatalog::with_builtin_defaults();
    if !fresh.parsed || fresh.hint.primary {
        prop_assert!(!fresh.is_read(&catalog));
    }
    if fresh.statements.is_empty() {
        prop_assert_eq!(fresh.tx_effect(), TxEffect::None);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_on_arbitrary_text(sql in any::<String>()) {
        let classifier = Classifier::new(8);
        check(&sql, &classifier)?;
    }

    #[test]
    fn never_panics_on_sql_like_text(sql in sqlish()) {
        let classifier = Classifier::new(8);
        check(&sql, &classifier)?;
    }

    #[test]
    fn cache_agrees_with_fresh_parse_across_many_texts(texts in prop::collection::vec(sqlish(), 1..20)) {
        // A small cache forces evictions and re-analysis in between.
        let classifier = Classifier::new(3);
        for sql in texts.iter().chain(texts.iter().rev()) {
            prop_assert_eq!(&*classifier.analyze(sql), &analyze_uncached(sql));
        }
    }
}
