//! Table-driven test of the classifier: route, parse status, transaction effect and session
//! effects of well over 90 statements, including the misroutes PgCat is known for.

use meridian_sqlroute::{
    analyze_uncached, Classifier, FunctionCatalog, PinReason, StatementKind, TxEffect,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Route {
    Replica,
    Primary,
}
use Route::{Primary as W, Replica as R};

struct Case {
    sql: &'static str,
    route: Route,
    parsed: bool,
    tx: TxEffect,
    pins: Option<PinReason>,
    set: &'static [(&'static str, &'static str)],
    reset: &'static [&'static str],
    reset_all: bool,
}

fn c(sql: &'static str, route: Route) -> Case {
    Case {
        sql,
        route,
        parsed: true,
        tx: TxEffect::None,
        pins: None,
        set: &[],
        reset: &[],
        reset_all: false,
    }
}

impl Case {
    fn unparsed(mut self) -> Self {
        self.parsed = false;
        self
    }
    fn tx(mut self, tx: TxEffect) -> Self {
        self.tx = tx;
        self
    }
    fn pin(mut self, pin: PinReason) -> Self {
        self.pins = Some(pin);
        self
    }
    fn set(mut self, set: &'static [(&'static str, &'static str)]) -> Self {
        self.set = set;
        self
    }
    fn reset(mut self, reset: &'static [&'static str]) -> Self {
        self.reset = reset;
        self
    }
    fn reset_all(mut self) -> Self {
        self.reset_all = true;
        self
    }
}

/// The catalog a proxy would have after a refresh from a primary with a few user functions.
fn catalog() -> FunctionCatalog {
    let mut cat = FunctionCatalog::with_builtin_defaults();
    for (name, v) in [
        ("nextval", 'v'),
        ("setval", 'v'),
        ("set_config", 'v'),
        ("pg_advisory_lock", 'v'),
        ("pg_try_advisory_lock_shared", 'v'),
        ("pg_advisory_xact_lock", 'v'),
        ("my_plpgsql_that_writes", 'v'),
        ("my_stable_report", 's'),
    ] {
        cat.insert(
            name.to_owned(),
            meridian_sqlroute::Volatility::from_provolatile(v),
        );
    }
    cat
}

const BEGIN_RO: TxEffect = TxEffect::Begin { read_only: true };
const BEGIN_RW: TxEffect = TxEffect::Begin { read_only: false };

fn cases() -> Vec<Case> {
    use PinReason as P;
    use TxEffect as T;
    vec![
        // Plain reads.
        c("SELECT 1", R),
        c("select * from t where id = $1", R),
        c("SELECT now()", R),
        c("SELECT lower(name) FROM t", R),
        c("SELECT count(*), sum(x), coalesce(a, b) FROM t GROUP BY c HAVING max(d) > 1", R),
        c("SELECT CURRENT_TIMESTAMP, current_user, current_date", R),
        c("WITH x AS (SELECT * FROM t) SELECT * FROM x", R),
        c("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 9) SELECT * FROM r", R),
        c("VALUES (1), (2)", R),
        c("TABLE t", R),
        c("SHOW search_path", R),
        c("SHOW ALL", R),
        c("SHOW TRANSACTION ISOLATION LEVEL", R),
        c("EXPLAIN SELECT * FROM t", R),
        c("EXPLAIN DELETE FROM t", R),
        c("EXPLAIN SELECT nextval('s')", R),
        c("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t", R),
        c("EXPLAIN ANALYZE SELECT lower(a) FROM t", R),
        c("EXPLAIN (ANALYZE off) UPDATE t SET a = 1", R),
        c("COPY t TO STDOUT", R),
        c("COPY (SELECT * FROM t WHERE a > 1) TO STDOUT WITH (FORMAT csv)", R),
        c("SELECT * FROM t1 JOIN t2 ON t1.id = t2.id WHERE t1.a IN (SELECT b FROM t3)", R),
        c("SELECT random(), clock_timestamp(), gen_random_uuid()", R),
        c("SELECT pg_is_in_recovery(), inet_server_port()", R),
        c("SELECT pg_sleep(1)", R),
        c("SELECT * FROM generate_series(1, 10) g", R),
        c("SELECT my_stable_report(1)", R),
        c("SELECT 1; SELECT 2", R),
        c("SELECT a FROM t UNION ALL SELECT b FROM u ORDER BY 1 LIMIT 10", R),
        c("SELECT EXISTS (SELECT 1 FROM u WHERE u.id = 1)", R),
        c("/* meridian:cache ttl=30s */ SELECT * FROM t", R),
        c("-- leading comment\nSELECT 1", R),
        c("SELECT 'DELETE FROM t; FOR UPDATE', $$ INSERT $$", R),
        c("", R),
        c("  ;  ", R),
        c("/* only a comment */", R),
        c("SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t", R),
        c("SELECT a::text, CAST(b AS int) FROM t WHERE c IS NOT NULL", R),
        c("SELECT $1::int + $2", R),
        c("SELECT \"Name\" FROM \"People\" WHERE upper(\"Name\") LIKE 'A%'", R),
        // The PgCat misroutes and other function-driven writes.
        c("SELECT nextval('s')", W),
        c("SELECT setval('s', 10)", W),
        c("SELECT my_plpgsql_that_writes()", W),
        c("SELECT * FROM t WHERE id = my_plpgsql_that_writes()", W),
        c("SELECT (SELECT my_plpgsql_that_writes())", W),
        c("SELECT pg_advisory_lock(1)", W).pin(P::AdvisoryLock),
        c("SELECT pg_try_advisory_lock_shared(1, 2)", W).pin(P::AdvisoryLock),
        c("SELECT pg_advisory_xact_lock(1)", W),
        c("SELECT unknown_function(1)", W),
        c("SELECT * FROM f()", W),
        c("WITH x AS (DELETE FROM t WHERE a = 1 RETURNING *) SELECT * FROM x", W),
        c("WITH x AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM x", W),
        c("WITH u AS (UPDATE t SET a = 2 RETURNING *) SELECT count(*) FROM u", W),
        c("WITH a AS (SELECT 1), b AS (DELETE FROM t RETURNING 1) SELECT * FROM a", W),
        c("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", W),
        c("WITH x AS (SELECT id FROM u) DELETE FROM t WHERE id IN (SELECT id FROM x)", W),
        c("COPY (SELECT nextval('s')) TO STDOUT", W),
        // Locking reads.
        c("SELECT * FROM t FOR UPDATE", W),
        c("SELECT * FROM t FOR SHARE SKIP LOCKED", W),
        c("SELECT * FROM t FOR NO KEY UPDATE", W),
        c("SELECT * FROM t WHERE id = 1 FOR KEY SHARE NOWAIT", W),
        c("select * from t for no key update of t", W),
        c("SELECT 1 FOR NO KEY UPDATE", W).unparsed(),
        c("SELECT 1 FOR UPDATE", W).unparsed(),
        c("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)", W),
        c("SELECT id FROM jobs ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED", W),
        c("SELECT id FROM jobs WHERE NOT done ORDER BY id LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED", W),
        c("SELECT 1 AS x FOR UPDATE", W),
        // SELECT INTO, EXPLAIN ANALYZE of writes, multi-statement.
        c("SELECT * INTO t2 FROM t", W),
        c("SELECT * INTO TEMP t2 FROM t", W).pin(P::TempTable),
        c("EXPLAIN ANALYZE DELETE FROM t", W),
        c("EXPLAIN (ANALYZE, FORMAT JSON) INSERT INTO t VALUES (1)", W),
        c("EXPLAIN ANALYZE SELECT nextval('s')", W),
        c("SELECT 1; DELETE FROM t", W),
        // DML and DDL.
        c("INSERT INTO t (a) VALUES ($1)", W),
        c("INSERT INTO t SELECT * FROM u ON CONFLICT DO NOTHING", W),
        c("UPDATE t SET a = a + 1 WHERE id = $1", W),
        c("DELETE FROM t USING u WHERE t.id = u.id", W),
        c("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", W),
        c("TRUNCATE t", W),
        c("CREATE TABLE t3 (a int)", W),
        c("ALTER TABLE t ADD COLUMN b int", W),
        c("DROP TABLE t", W),
        c("CREATE INDEX CONCURRENTLY i ON t (a)", W),
        c("CREATE TEMP TABLE tmp (a int)", W).pin(P::TempTable),
        c("CREATE TEMPORARY TABLE tmp AS SELECT 1", W).pin(P::TempTable),
        c("CREATE TEMP VIEW v AS SELECT 1", W).pin(P::TempTable),
        c("CREATE TEMP SEQUENCE s", W).pin(P::TempTable),
        c("GRANT SELECT ON t TO bob", W),
        c("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END", W),
        // COPY both directions.
        c("COPY t FROM STDIN", W),
        c("COPY t (a, b) FROM STDIN WITH (FORMAT csv)", W),
        c("COPY t TO '/tmp/out'", W),
        // Commands that must run on the primary.
        c("CALL p(1)", W),
        c("DO $$ BEGIN PERFORM 1; END $$", W).unparsed().pin(P::Other),
        c("do language plpgsql $body$ begin create temp table x(a int); end $body$", W)
            .unparsed()
            .pin(P::Other),
        c("ALTER SYSTEM SET work_mem = '64MB'", W).unparsed(),
        c("CHECKPOINT", W).unparsed(),
        c("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", W),
        c("LISTEN chan", W).pin(P::Listen),
        c("NOTIFY chan, 'hi'", W),
        c("UNLISTEN *", W),
        c("PREPARE q (int) AS SELECT * FROM t WHERE id = $1", W).pin(P::SqlPrepare),
        c("EXECUTE q(1)", W),
        c("DECLARE c CURSOR FOR SELECT * FROM t", W),
        c("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t", W).pin(P::HoldCursor),
        c("VACUUM t", W),
        c("ANALYZE t", W),
        c("REFRESH MATERIALIZED VIEW mv", W),
        c("SELECT set_config('search_path', 'app', false)", W).set(&[("search_path", "'app'")]),
        c("SELECT set_config('x.y', $1, false)", W).pin(P::Other),
        c("SELECT set_config('x.y', 'v', true)", W),
        // Garbage and hints.
        c("SELEC * FRM t", W).unparsed().pin(P::Other),
        c("SELECT (", W).unparsed(),
        c("'unterminated", W).unparsed().pin(P::Other),
        c("\u{0}\u{1}\u{7f}", W).unparsed().pin(P::Other),
        c("/* meridian:primary */ SELECT 1", W),
        c("/* meridian:primary */ SELECT * FROM t WHERE id = $1", W),
        c("BEGIN; SELECT 1; DO $$ BEGIN END $$; COMMIT", W)
            .unparsed()
            .tx(T::Commit)
            .pin(P::Other),
        // Transactions.
        c("BEGIN", W).tx(BEGIN_RW),
        c("BEGIN READ ONLY", R).tx(BEGIN_RO),
        c("START TRANSACTION READ ONLY", R).tx(BEGIN_RO),
        c("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", W).tx(BEGIN_RW),
        c("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", R).tx(BEGIN_RO),
        c("BEGIN READ WRITE", W).tx(BEGIN_RW),
        c("BEGIN WORK", W).tx(BEGIN_RW),
        c("SET TRANSACTION READ ONLY", R).tx(T::SetTransactionReadOnly),
        c("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", R).tx(T::Other),
        c("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY", R).tx(T::Other),
        c("COMMIT", R).tx(T::Commit),
        c("END", R).tx(T::Commit),
        c("ROLLBACK", R).tx(T::Rollback),
        c("ABORT", R).tx(T::Rollback),
        c("ROLLBACK TO SAVEPOINT a", R).tx(T::Savepoint),
        c("SAVEPOINT a", R).tx(T::Savepoint),
        c("RELEASE SAVEPOINT a", R).tx(T::Savepoint),
        c("COMMIT AND CHAIN", R).tx(T::Other),
        c("BEGIN READ ONLY; SELECT * FROM t; COMMIT", R).tx(T::Commit),
        c("BEGIN; INSERT INTO t VALUES (1); COMMIT", W).tx(T::Commit),
        c("COMMIT; BEGIN", W).tx(BEGIN_RW),
        c("PREPARE TRANSACTION 'gx'", W).unparsed().tx(T::Other),
        c("COMMIT PREPARED 'gx'", W).unparsed(),
        // Session state.
        c("SET search_path = a, b", R).set(&[("search_path", "a, b")]),
        c("SET search_path TO \"$user\", public", R).set(&[("search_path", "\"$user\", public")]),
        c("SET LOCAL statement_timeout = '5s'", R),
        c("SET LOCAL x = 1", R),
        c("SET SESSION statement_timeout = '5s'", R).set(&[("statement_timeout", "'5s'")]),
        c("SET Application_Name = 'app'", R).set(&[("application_name", "'app'")]),
        c("SET statement_timeout TO DEFAULT", R).reset(&["statement_timeout"]),
        c("SET TIME ZONE 'UTC'", R).set(&[("timezone", "'UTC'")]),
        c("SET TIME ZONE LOCAL", R).reset(&["timezone"]),
        c("SET timezone = 'Europe/Paris'", R).set(&[("timezone", "'Europe/Paris'")]),
        c("SET ROLE app_reader", R).set(&[("role", "app_reader")]),
        c("SET ROLE NONE", R).reset(&["role"]),
        c("SET LOCAL ROLE app_reader", R),
        c("SET SESSION AUTHORIZATION bob", R).pin(P::Other),
        c("SET default_transaction_read_only = on", R)
            .set(&[("default_transaction_read_only", "on")]),
        c("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", R)
            .set(&[("default_transaction_read_only", "on")]),
        c("SET NAMES 'UTF8'", R).set(&[("client_encoding", "'UTF8'")]),
        c("RESET search_path", R).reset(&["search_path"]),
        c("RESET ALL", R).reset_all(),
        c("DISCARD ALL", R).reset_all(),
        c("DISCARD TEMP", R),
        c("DEALLOCATE q", R),
        c("FETCH 10 FROM c", R),
        c("CLOSE c", R),
        c("SET a = 1; SET LOCAL b = 2; RESET c", R).set(&[("a", "1")]).reset(&["c"]),
    ]
}

#[test]
fn classification_table() {
    let cat = catalog();
    let cases = cases();
    assert!(cases.len() >= 90, "only {} cases", cases.len());
    let classifier = Classifier::new(1024);
    let mut failures = Vec::new();
    for case in &cases {
        let a = classifier.analyze(case.sql);
        let route = if a.is_read(&cat) { R } else { W };
        let set: Vec<(String, String)> = a
            .statements
            .iter()
            .flat_map(|s| s.session.set.iter().cloned())
            .collect();
        let want_set: Vec<(String, String)> = case
            .set
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let reset: Vec<&str> = a
            .statements
            .iter()
            .flat_map(|s| s.session.reset.iter().map(String::as_str))
            .collect();
        let reset_all = a.statements.iter().any(|s| s.session.reset_all);
        let checks = [
            ("route", route == case.route, format!("{route:?}")),
            ("parsed", a.parsed == case.parsed, format!("{}", a.parsed)),
            (
                "tx",
                a.tx_effect() == case.tx,
                format!("{:?}", a.tx_effect()),
            ),
            ("pins", a.pins() == case.pins, format!("{:?}", a.pins())),
            ("set", set == want_set, format!("{set:?}")),
            ("reset", reset == case.reset, format!("{reset:?}")),
            (
                "reset_all",
                reset_all == case.reset_all,
                format!("{reset_all}"),
            ),
        ];
        for (what, ok, got) in checks {
            if !ok {
                failures.push(format!("{:?}: {what} was {got}", case.sql));
            }
        }
        // The cache must hand back exactly what a fresh analysis computes.
        assert_eq!(
            *a,
            analyze_uncached(case.sql),
            "cache mismatch for {:?}",
            case.sql
        );
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn classifier_and_analysis_are_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Classifier>();
    assert_send_sync::<std::sync::Arc<meridian_sqlroute::Analysis>>();
    assert_send_sync::<FunctionCatalog>();
    assert!(format!("{:?}", Classifier::new(4)).contains("capacity"));
}

#[test]
fn empty_queries_have_no_statements() {
    for sql in ["", " ", ";", " ; ; ", "-- c", "/* c */ ;"] {
        let a = analyze_uncached(sql);
        assert!(a.parsed, "{sql:?}");
        assert!(a.statements.is_empty(), "{sql:?}: {:?}", a.statements);
        assert_eq!(a.tx_effect(), TxEffect::None);
    }
}

#[test]
fn functions_are_found_everywhere() {
    let a = analyze_uncached(
        "WITH c AS (SELECT md5(x) FROM src) \
         SELECT lower(u.name), my.fn(1) FROM public.users u \
         JOIN orders o ON o.uid = u.id \
         CROSS JOIN LATERAL generate_series(1, 2) g \
         WHERE o.total > (SELECT avg(total) FROM orders) \
           AND EXISTS (SELECT 1 FROM c WHERE abs(o.total) > 0)",
    );
    let s = &a.statements[0];
    assert_eq!(s.kind, StatementKind::Read);
    for f in ["md5", "lower", "fn", "generate_series", "avg", "abs"] {
        assert!(
            s.functions.iter().any(|x| x == f),
            "{f} missing from {:?}",
            s.functions
        );
    }
    assert_eq!(s.tables, vec!["src", "public.users", "orders"]);
}

#[test]
fn names_are_folded_like_postgres() {
    let a = analyze_uncached("SELECT \"MyFunc\"(), LOWER(a) FROM \"MyTable\", Other");
    let s = &a.statements[0];
    assert_eq!(s.functions, vec!["MyFunc", "lower"]);
    assert_eq!(s.tables, vec!["MyTable", "other"]);
}

#[test]
fn dml_lists_target_and_source_tables() {
    let a = analyze_uncached("INSERT INTO t SELECT nextval('s'), b FROM u");
    let s = &a.statements[0];
    assert_eq!(s.kind, StatementKind::Write);
    assert_eq!(s.tables, vec!["t", "u"]);
    assert_eq!(s.functions, vec!["nextval"]);
    let a = analyze_uncached("TABLE accounts");
    assert_eq!(a.statements[0].tables, vec!["accounts"]);
}

#[test]
fn utility_kinds() {
    for sql in [
        "SET a = 1",
        "SHOW a",
        "BEGIN",
        "COMMIT",
        "DISCARD ALL",
        "RESET a",
        "SAVEPOINT x",
    ] {
        let a = analyze_uncached(sql);
        assert_eq!(a.statements[0].kind, StatementKind::Utility, "{sql}");
    }
    assert_eq!(
        analyze_uncached("SELECT 1").statements[0].kind,
        StatementKind::Read
    );
    assert_eq!(
        analyze_uncached("LISTEN x").statements[0].kind,
        StatementKind::Write
    );
}

#[test]
fn volatility_comes_from_the_catalog() {
    let a = analyze_uncached("SELECT my_plpgsql_that_writes()");
    let volatile = FunctionCatalog::from_rows([("my_plpgsql_that_writes".to_owned(), 'v')]);
    let stable = FunctionCatalog::from_rows([("my_plpgsql_that_writes".to_owned(), 's')]);
    assert!(!a.is_read(&volatile));
    assert!(a.is_read(&stable));
    // Before the first refresh only the built-in list is known.
    let lower = analyze_uncached("SELECT lower(name) FROM t");
    assert!(!lower.is_read(&FunctionCatalog::new()));
    assert!(lower.is_read(&FunctionCatalog::with_builtin_defaults()));
    let mut extended = FunctionCatalog::new();
    extended.add_read_safe(["lower".to_owned()]);
    assert!(lower.is_read(&extended));
}

#[test]
fn hints_are_reported() {
    let a =
        analyze_uncached("/* meridian:cache ttl=30s */ /* meridian:min_lsn=0/16B3748 */ SELECT 1");
    assert_eq!(a.hint.cache_ttl, Some(std::time::Duration::from_secs(30)));
    assert_eq!(a.hint.min_lsn.as_deref(), Some("0/16B3748"));
    assert!(!a.hint.primary);
    assert!(a.is_read(&FunctionCatalog::new()));
    let a = analyze_uncached("SELECT 1 /* meridian:primary */");
    assert!(!a.hint.primary);
    assert!(a.is_read(&FunctionCatalog::new()));
}

#[test]
fn unparsable_statements_keep_their_neighbours_effects() {
    let a = analyze_uncached("BEGIN; DO $$ BEGIN END $$; SET search_path = x");
    assert!(!a.parsed);
    assert_eq!(a.statements.len(), 3);
    assert_eq!(a.statements[0].tx, BEGIN_RW);
    assert_eq!(a.statements[1].kind, StatementKind::Write);
    assert_eq!(
        a.statements[2].session.set,
        vec![("search_path".to_owned(), "x".to_owned())]
    );
    assert_eq!(a.tx_effect(), BEGIN_RW);
}

#[test]
fn long_operator_chains_do_not_exhaust_a_small_stack() {
    // Parsing and walking a left-deep chain recurses per operator; the classifier must survive
    // it on a 2 MiB stack like a tokio worker's.
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let chain = format!("SELECT {}1 FROM t", "1+".repeat(60_000));
            let parsed = analyze_uncached(&chain);
            let huge = format!(
                "SELECT {}1",
                "1+".repeat(meridian_sqlroute::MAX_PARSED_SQL_LEN)
            );
            let unparsed = analyze_uncached(&huge);
            let insert = format!("INSERT INTO t VALUES {}(1)", "(1),".repeat(70_000));
            (parsed, unparsed, analyze_uncached(&insert))
        })
        .expect("spawn");
    let (parsed, unparsed, insert) = handle.join().expect("no stack overflow");
    assert!(parsed.parsed);
    assert!(parsed.is_read(&FunctionCatalog::new()));
    assert!(!unparsed.parsed);
    assert!(!unparsed.is_read(&FunctionCatalog::new()));
    assert_eq!(unparsed.pins(), None);
    assert!(!insert.parsed);
    assert_eq!(insert.statements[0].kind, StatementKind::Write);
    assert_eq!(insert.pins(), None);
}

/// Extra statements whose literal values matter to sqlparser or to the analysis, on top of the
/// table's.
const LITERAL_SENSITIVE: &[&str] = &[
    "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
    "SELECT CAST(a AS varchar(10)), b::numeric(12, 2) FROM t",
    "SELECT * FROM t ORDER BY 1 LIMIT 10 OFFSET 5",
    "SELECT * FROM t FETCH FIRST 5 ROWS ONLY",
    "INSERT INTO t VALUES (1, 'a', 2.5, 12345678901)",
    "UPDATE t SET a = 'x', b = 3 WHERE id = 4",
    "SELECT interval '1 day', date '2024-01-01', '{1,2}'::int[]",
    "SELECT set_config('a.b', 'v', false)",
    "SELECT set_config('a.b', 'v', 'off')",
    "SET x = 5",
    "SET statement_timeout = '5s'",
    "EXPLAIN (ANALYZE 1) UPDATE t SET a = 1",
    "EXPLAIN (ANALYZE 'off') UPDATE t SET a = 1",
    "COPY t TO '/tmp/x' WITH (FORMAT 'csv', DELIMITER ';')",
    "/* meridian:min_lsn=0/16B3748 */ SELECT * FROM t WHERE id = 5",
    "/* meridian:cache ttl=30s */ SELECT * FROM t WHERE name = 'x'",
    "SELECT 'a' FROM t WHERE b IN (1, 2, 3) AND c BETWEEN 1.5 AND 2.5",
    "WITH 'x' AS (SELECT 1) SELECT * FROM x",
    "SELECT 'a'.b, c.'d' FROM t",
    "SELECT * FROM 'tbl' WHERE a = 1",
    "SELECT a AS 'alias' FROM t",
    "SELECT 'a'\n'b' FROM t",
    "SELECT * FROM t TABLESAMPLE BERNOULLI (10) REPEATABLE (42)",
    "SELECT to_char(now(), 'YYYY'), ARRAY[1, 2][1]",
];

/// A small deterministic generator (xorshift), seeded by proptest.
struct Rng(u64);

impl Rng {
    fn gen_range(&mut self, range: std::ops::Range<usize>) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        range.start + (self.0 % (range.end - range.start) as u64) as usize
    }
}

/// A random literal of the same class as `lit` (`'...'` or digits, with an optional fraction).
fn random_literal(lit: &str, rng: &mut Rng) -> String {
    if lit.starts_with('\'') {
        const PIECES: &[&str] = &[
            "",
            "x",
            "''",
            ";",
            "--",
            "/*",
            "*/",
            "$$",
            "\"",
            "FOR UPDATE",
            "'); DELETE FROM t; --",
            "é",
            "\u{1}",
            "on",
            "off",
            "0",
            "true",
            "false",
            "1 day",
            " ",
            "\n",
        ];
        let n = rng.gen_range(0..4);
        let body: String = (0..n)
            .map(|_| PIECES[rng.gen_range(0..PIECES.len())])
            .collect();
        format!("'{body}'")
    } else {
        let digits = |rng: &mut Rng, n: usize| -> String {
            (0..n)
                .map(|_| char::from(b'0' + rng.gen_range(0..10) as u8))
                .collect()
        };
        // Mostly short values, sometimes up to 21 digits (beyond what a fingerprint accepts).
        let int_len = if rng.gen_range(0..4) == 0 {
            rng.gen_range(1..22)
        } else {
            rng.gen_range(1..8)
        };
        let int = digits(rng, int_len);
        if lit.contains('.') {
            let frac_len = rng.gen_range(1..5);
            format!("{int}.{}", digits(rng, frac_len))
        } else {
            int
        }
    }
}

/// `sql` with every plain number and standard string literal replaced by a random one of the
/// same class (a test-side scanner, deliberately independent of the fingerprint lexer).
fn vary_literals(sql: &str, rng: &mut Rng) -> String {
    let b = sql.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let prev = if i > 0 { b[i - 1] } else { b' ' };
        let in_word = prev.is_ascii_alphanumeric() || matches!(prev, b'_' | b'$' | b'.');
        if c == b'\'' && !in_word {
            let mut j = i + 1;
            while j < b.len() {
                if b[j] == b'\'' && b.get(j + 1) == Some(&b'\'') {
                    j += 2;
                } else if b[j] == b'\'' {
                    break;
                } else {
                    j += 1;
                }
            }
            let end = (j + 1).min(b.len());
            out.push_str(&random_literal(&sql[i..end], rng));
            i = end;
        } else if c.is_ascii_digit() && !in_word {
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
                j += 1;
            }
            out.push_str(&random_literal(&sql[i..j], rng));
            i = j;
        } else if c == b'"' || c == b'/' || c == b'-' {
            // Copy quoted identifiers and comments through unchanged.
            let close: &[u8] = match (c, b.get(i + 1)) {
                (b'"', _) => b"\"",
                (b'/', Some(b'*')) => b"*/",
                (b'-', Some(b'-')) => b"\n",
                _ => b"",
            };
            let from = i + 1;
            let end = if close.is_empty() {
                from
            } else {
                b[from..]
                    .windows(close.len())
                    .position(|w| w == close)
                    .map_or(b.len(), |p| from + p + close.len())
            };
            out.push_str(&sql[i..end]);
            i = end;
        } else {
            let len = sql[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&sql[i..i + len]);
            i += len;
        }
    }
    out
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(64))]

    /// The fingerprint cache is sound: over every statement of the table and the extra
    /// literal-sensitive ones, with random literal values, an analysis served from the cache
    /// (filled by the original text or by another variant) equals a fresh full parse.
    #[test]
    fn fingerprint_hits_equal_full_parses(seed in proptest::prelude::any::<u64>()) {
        let mut rng = Rng(seed | 1);
        let classifier = Classifier::new(4096);
        let sqls: Vec<&str> = cases()
            .iter()
            .map(|c| c.sql)
            .chain(LITERAL_SENSITIVE.iter().copied())
            .collect();
        for sql in &sqls {
            let first = vary_literals(sql, &mut rng);
            let second = vary_literals(sql, &mut rng);
            for text in [*sql, first.as_str(), second.as_str()] {
                let cached = classifier.analyze(text);
                proptest::prop_assert_eq!(
                    &*cached,
                    &analyze_uncached(text),
                    "cached analysis differs for {:?} (original {:?})",
                    text,
                    sql
                );
            }
        }
    }
}

#[test]
fn literal_variants_of_plain_statements_share_a_fingerprint() {
    use meridian_sqlroute::fingerprint;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // The scanner above must really vary the literals, and plain reads must really share.
    let sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;";
    let shared = (0..20)
        .map(|_| vary_literals(sql, &mut rng))
        .filter(|v| v != sql && fingerprint(v).is_some() && fingerprint(v) == fingerprint(sql))
        .count();
    assert!(
        shared >= 10,
        "only {shared} of 20 variants shared the fingerprint"
    );
    let classifier = Classifier::new(16);
    for i in 0..100 {
        classifier.analyze(&format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {i};"
        ));
    }
    assert_eq!(classifier.cached(), 1);
}

/// Objects in the session's temporary schema pin however they are spelled; DEALLOCATE
/// names what it drops; primary-only state routes to the primary; unlogged relations are
/// recognised where they are created.
#[test]
fn temp_schema_deallocate_primary_state_and_unlogged() {
    use meridian_sqlroute::Deallocate;
    let catalog = FunctionCatalog::with_builtin_defaults();
    for sql in [
        "CREATE TABLE pg_temp.t (x int)",
        "CREATE TABLE PG_TEMP.t (x int)",
        "CREATE VIEW pg_temp.v AS SELECT 1",
        "CREATE SEQUENCE pg_temp.s",
        "CREATE TYPE pg_temp.ty AS (a int)",
        "CREATE DOMAIN pg_temp.d AS int",
        "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE TABLE pg_temp_3.t (x int)",
    ] {
        let a = analyze_uncached(sql);
        assert_eq!(a.pins(), Some(PinReason::TempTable), "{sql}");
    }
    assert_eq!(analyze_uncached("CREATE TABLE app.t (x int)").pins(), None);

    let dealloc = |sql: &str| {
        analyze_uncached(sql).statements[0]
            .session
            .deallocate
            .clone()
    };
    assert_eq!(dealloc("DEALLOCATE ALL"), Some(Deallocate::All));
    assert_eq!(dealloc("DEALLOCATE PREPARE all"), Some(Deallocate::All));
    assert_eq!(
        dealloc("DEALLOCATE _pg3_1"),
        Some(Deallocate::Name("_pg3_1".into()))
    );
    assert_eq!(
        dealloc("DEALLOCATE \"Mixed\""),
        Some(Deallocate::Name("Mixed".into()))
    );
    assert_eq!(dealloc("DISCARD ALL"), Some(Deallocate::All));
    assert_eq!(dealloc("DISCARD PLANS"), None);

    for (sql, primary) in [
        ("SELECT * FROM pg_prepared_xacts", true),
        ("SELECT count(*) FROM pg_catalog.pg_locks", true),
        ("SELECT * FROM pg_stat_activity WHERE pid = 1", false),
        ("SHOW transaction_read_only", true),
        ("SHOW TRANSACTION_READ_ONLY", true),
        ("SHOW search_path", false),
        ("SELECT * FROM myschema.pg_locks", false),
        ("SELECT pg_is_in_recovery()", false),
        ("SELECT current_setting('transaction_read_only')", true),
        ("SELECT current_setting('IN_HOT_STANDBY', true)", true),
        ("SELECT current_setting('app.tenant')", false),
        ("SELECT current_setting($1)", true),
        ("SELECT current_setting($1), current_setting($2)", true),
        ("SELECT 1", false),
    ] {
        let a = analyze_uncached(sql);
        assert_eq!(a.needs_primary(), primary, "{sql}");
        if primary {
            assert!(!a.is_read(&catalog), "{sql}");
        }
    }

    // The setting's name is a literal: texts differing only in it share no analysis.
    let classifier = Classifier::new(16);
    assert!(!classifier
        .analyze("SELECT current_setting('app.tenant')")
        .needs_primary());
    assert!(classifier
        .analyze("SELECT current_setting('transaction_read_only')")
        .needs_primary());

    let unlogged = |sql: &str| analyze_uncached(sql).statements[0].creates_unlogged.clone();
    assert_eq!(unlogged("CREATE UNLOGGED TABLE u1 (x int)"), vec!["u1"]);
    assert_eq!(unlogged("CREATE UNLOGGED TABLE app.U2 (x int)"), vec!["u2"]);
    assert_eq!(unlogged("ALTER TABLE t3 SET UNLOGGED"), vec!["t3"]);
    assert_eq!(unlogged("SELECT 1 INTO UNLOGGED u4"), vec!["u4"]);
    assert!(unlogged("CREATE TABLE t5 (x int)").is_empty());
}
