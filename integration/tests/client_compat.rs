#![allow(clippy::unwrap_used, clippy::expect_used, clippy::err_expect)]
//! Client compatibility of meridian-pgproxy, end to end: real clients, unchanged,
//! through an in-process proxy in front of a real primary with a streaming
//! replica. psql (`\copy` both ways, `\watch`, Ctrl-C), sqlx (pool, binds,
//! transactions, large results), tokio-postgres (binary results and binary
//! `COPY`), session state pinning in transaction pooling, and TLS to the
//! backends in each of the libpq-like modes.
//!
//! Limits: one host, loopback only; replication is asynchronous, so every read
//! of freshly written rows waits for them with a deadline.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{count_running, psql_path, trust_config, wait_count, Proxy};
use futures::StreamExt;
use meridian_integration::{eventually, PgCluster};
use meridian_shared::config::{BackendTlsMode, PoolMode, ProxyConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, NoTls, Notification};

/// `psql` against the proxy: no `.psqlrc`, stop at the first error.
fn psql(proxy: &Proxy, user: &str) -> Command {
    let mut cmd = Command::new(psql_path());
    cmd.arg(proxy.dsn(user, ""))
        .args(["-X", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `psql -At` with the given `-c` commands and returns its output.
async fn psql_run(proxy: &Proxy, commands: &[&str]) -> Output {
    let mut cmd = psql(proxy, "postgres");
    cmd.arg("-At");
    for c in commands {
        cmd.args(["-c", c]);
    }
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("psql finished within 30 s")
        .unwrap()
}

fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "psql failed: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CSV file in the form `COPY ... TO ... csv` writes back: quotes only where
/// needed, an empty unquoted field for NULL, `""` for the empty string.
fn csv_rows(n: usize) -> String {
    let mut out = String::new();
    for i in 1..=n {
        let last = if i % 10 == 0 { "\"\"" } else { "" };
        out.push_str(&format!(
            "{i},plain-{i},\"comma, {i}\",\"quote \"\"{i}\"\"\",é-{i},{last}\n"
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_round_trips_through_the_proxy() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let proxy = Proxy::start(trust_config(&cluster)).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    let output = dir.path().join("out.csv");
    let rows = 500;
    std::fs::write(&input, csv_rows(rows)).unwrap();

    let out = psql_run(
        &proxy,
        &["CREATE TABLE t (id int, a text, b text, c text, d text, e text)"],
    )
    .await;
    assert_ok(&out);
    // \copy FROM: COPY t FROM STDIN through the proxy (a write: the primary).
    let from = format!("\\copy t FROM '{}' csv", input.display());
    let out = psql_run(&proxy, &[&from]).await;
    assert_eq!(assert_ok(&out).trim(), format!("COPY {rows}"));
    let primary = cluster.primary().client().await.unwrap();
    let n: i64 = primary
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, rows as i64);
    let nulls: i64 = primary
        .query_one("SELECT count(*) FROM t WHERE e IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(nulls, (rows - rows / 10) as i64, "NULL and '' stay apart");

    // \copy TO: COPY t TO STDOUT is a read and runs on the replica, once the rows are there.
    let c = proxy.connect("postgres", "").await.unwrap();
    wait_count(
        &c,
        "SELECT count(*) FROM t",
        rows as i64,
        Duration::from_secs(10),
    )
    .await;
    let to = format!("\\copy t TO '{}' csv", output.display());
    let out = psql_run(&proxy, &[&to]).await;
    assert_eq!(assert_ok(&out).trim(), format!("COPY {rows}"));
    let written = std::fs::read_to_string(&output).unwrap();
    let expected = std::fs::read_to_string(&input).unwrap();
    assert_eq!(written.lines().count(), rows);
    assert_eq!(written, expected, "the CSV round trips byte for byte");
}

/// Reads lines from `lines` until `done` accepts the counts seen so far, or the
/// deadline passes; returns every count printed.
async fn read_counts<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    seen: &mut Vec<i64>,
    within: Duration,
    done: impl Fn(&[i64]) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !done(seen) {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                if let Ok(n) = line.trim().parse::<i64>() {
                    seen.push(n);
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return false,
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_watch_repeats_and_sees_new_rows_once_replicated() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let proxy = Proxy::start(trust_config(&cluster)).await;
    let writer = proxy.connect("postgres", "").await.unwrap();
    writer
        .batch_execute("CREATE TABLE w (id int); INSERT INTO w VALUES (1), (2), (3)")
        .await
        .unwrap();
    wait_count(
        &writer,
        "SELECT count(*) FROM w",
        3,
        Duration::from_secs(10),
    )
    .await;

    // psql 15's \watch has no iteration count: read its output and kill it.
    let mut child: Child = psql(&proxy, "postgres")
        .arg("-At")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"SELECT count(*) FROM w \\watch 0.2\n")
        .await
        .unwrap();
    stdin.flush().await.unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let started = Instant::now();
    let repeated = read_counts(&mut lines, &mut seen, Duration::from_secs(10), |s| {
        s.len() >= 3
    })
    .await;
    assert!(repeated, "\\watch printed only {seen:?}");
    assert!(seen.iter().all(|&n| n == 3), "{seen:?}");
    // Three results 0.2 s apart take at least 0.4 s: they are repeats, not one burst.
    assert!(started.elapsed() >= Duration::from_millis(350), "{seen:?}");

    // A row inserted meanwhile through the proxy appears in a later output.
    writer
        .execute("INSERT INTO w VALUES (4)", &[])
        .await
        .unwrap();
    let before = seen.len();
    let updated = read_counts(&mut lines, &mut seen, Duration::from_secs(10), |s| {
        s.last() == Some(&4)
    })
    .await;
    assert!(updated, "the new row never showed: {seen:?}");
    assert!(seen.len() > before);
    assert!(
        seen.windows(2).all(|p| p[0] <= p[1]),
        "counts went backwards: {seen:?}"
    );

    child.start_kill().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("psql exits once killed")
        .unwrap();
    assert!(!status.success());
    drop(stdin);
}

/// Finds the node of `cluster` whose `pg_stat_activity` shows `query` running.
async fn node_running(cluster: &PgCluster, query: &str) -> u16 {
    let clients = futures::future::try_join_all(cluster.nodes().map(|n| n.client()))
        .await
        .unwrap();
    let ports: Vec<u16> = cluster.nodes().map(|n| n.port()).collect();
    eventually(
        Duration::from_secs(10),
        "the query on some backend",
        || async {
            for (c, port) in clients.iter().zip(&ports) {
                if count_running(c, query).await? == 1 {
                    return Ok(*port);
                }
            }
            anyhow::bail!("not running anywhere yet")
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_cancels_the_running_query() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let proxy = Proxy::start(trust_config(&cluster)).await;
    let sleep = "SELECT pg_sleep(30)";
    let child = psql(&proxy, "postgres")
        .args(["-c", sleep])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let port = node_running(&cluster, sleep).await;
    assert_eq!(
        port,
        cluster.replicas()[0].port(),
        "a read runs on the replica"
    );

    // Ctrl-C: libpq's handler sends a CancelRequest (with the proxy's key) to the proxy.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("psql exits within 5 s of Ctrl-C")
        .unwrap();
    assert!(sent.elapsed() < Duration::from_secs(5));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    let replica = cluster.replicas()[0].client().await.unwrap();
    eventually(Duration::from_secs(5), "the sleep to end", || async {
        let n = count_running(&replica, sleep).await?;
        anyhow::ensure!(n == 0, "{n} sessions still sleep");
        Ok(())
    })
    .await
    .unwrap();

    // The proxy still serves: a new psql session, a read and a write.
    let out = psql_run(
        &proxy,
        &[
            "SELECT 41 + 1",
            "CREATE TABLE after_cancel (x int)",
            "INSERT INTO after_cancel VALUES (1)",
        ],
    )
    .await;
    let stdout = assert_ok(&out);
    assert!(stdout.starts_with("42\n"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_pool_binds_transactions_and_large_results() {
    use sqlx::postgres::PgPoolOptions;
    use sqlx::Row;

    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let direct = cluster.primary().client().await.unwrap();
    direct
        .batch_execute("CREATE TABLE sx (id int primary key, name text, score bigint)")
        .await
        .unwrap();
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        direct.batch_execute("TRUNCATE sx").await.unwrap();
        let mut cfg = trust_config(&cluster);
        cfg.pool.mode = mode;
        if mode == PoolMode::Transaction {
            // Four sqlx connections share two backends per pool. (In session mode
            // each client holds its backends: the pool must be as large as sqlx's.)
            cfg.pool.max_size = 2;
        }
        let proxy = Proxy::start(cfg).await;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&proxy.url("postgres"))
            .await
            .unwrap();

        // Binds: text, ints, NULLs; the statement is prepared and cached by sqlx.
        for i in 0..5i32 {
            let row = sqlx::query(
                "SELECT $1::text AS t, $2::int4 + 1 AS i, $3::int8 AS n, $4::text IS NULL AS null_text",
            )
            .bind(format!("héllo-{i}"))
            .bind(i)
            .bind(Option::<i64>::None)
            .bind(Option::<String>::None)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!(row.get::<String, _>("t"), format!("héllo-{i}"));
            assert_eq!(row.get::<i32, _>("i"), i + 1);
            assert_eq!(row.get::<Option<i64>, _>("n"), None);
            assert!(row.get::<bool, _>("null_text"));
        }

        // Concurrent queries: sqlx opens more connections, each with its own
        // statement cache (in transaction mode they share the proxy's backends).
        let sums = futures::future::try_join_all((0..16i64).map(|k| {
            sqlx::query_scalar::<_, i64>("SELECT sum(g)::int8 FROM generate_series(1, $1::int8) g")
                .bind((k + 1) * 100)
                .fetch_one(&pool)
        }))
        .await
        .unwrap();
        for (k, sum) in sums.into_iter().enumerate() {
            let n = (k as i64 + 1) * 100;
            assert_eq!(sum, n * (n + 1) / 2, "{mode:?}");
        }

        // A transaction rolled back leaves nothing; one committed stays.
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO sx VALUES ($1, $2, $3)")
            .bind(1i32)
            .bind("rolled back")
            .bind(10i64)
            .execute(&mut *tx)
            .await
            .unwrap();
        let inside: i64 = sqlx::query_scalar("SELECT count(*) FROM sx")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(inside, 1, "the transaction sees its own insert ({mode:?})");
        tx.rollback().await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        let ids: Vec<i32> = (1..=3000).collect();
        let names: Vec<String> = ids.iter().map(|i| format!("name-{i}")).collect();
        let scores: Vec<Option<i64>> = ids
            .iter()
            .map(|&i| (i % 7 != 0).then_some(i64::from(i) * 1_000_000_000))
            .collect();
        let done =
            sqlx::query("INSERT INTO sx SELECT * FROM unnest($1::int4[], $2::text[], $3::int8[])")
                .bind(&ids)
                .bind(&names)
                .bind(&scores)
                .execute(&mut *tx)
                .await
                .unwrap();
        assert_eq!(done.rows_affected(), 3000);
        tx.commit().await.unwrap();
        let on_primary: i64 = direct
            .query_one("SELECT count(*) FROM sx", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(on_primary, 3000, "{mode:?}: only the committed rows");

        // fetch_all of a few thousand rows (a read: the replica, once caught up).
        cluster
            .wait_replicas_caught_up(Duration::from_secs(10))
            .await
            .unwrap();
        let rows = sqlx::query("SELECT id, name, score FROM sx WHERE id > $1 ORDER BY id")
            .bind(0i32)
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(rows.len(), 3000, "{mode:?}");
        for (k, row) in rows.iter().enumerate() {
            let id: i32 = row.get("id");
            assert_eq!(id, k as i32 + 1);
            assert_eq!(row.get::<String, _>("name"), format!("name-{id}"));
            let want = (id % 7 != 0).then_some(i64::from(id) * 1_000_000_000);
            assert_eq!(row.get::<Option<i64>, _>("score"), want);
        }
        let big: Vec<(i32, String)> =
            sqlx::query_as("SELECT g, repeat('x', g % 50) FROM generate_series(1, $1) g")
                .bind(5000i32)
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(big.len(), 5000);
        assert_eq!(big[4999], (5000, String::new()));
        assert_eq!(big[48].1.len(), 49);
        // The reads ran on the replica.
        let recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(recovery, "{mode:?}");
        pool.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_binary_results_and_binary_copy() {
    use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};

    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let proxy = Proxy::start(trust_config(&cluster)).await;
    let c = proxy.connect("postgres", "").await.unwrap();
    c.batch_execute(
        "CREATE TABLE bin (id int8 primary key, f float8, b bytea, ts timestamptz, arr int4[], tags text[])",
    )
    .await
    .unwrap();

    // Binary COPY in: every type in PostgreSQL's binary format.
    let types = [
        Type::INT8,
        Type::FLOAT8,
        Type::BYTEA,
        Type::TIMESTAMPTZ,
        Type::INT4_ARRAY,
        Type::TEXT_ARRAY,
    ];
    let epoch_2020 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800);
    let sink = c
        .copy_in("COPY bin FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures::pin_mut!(writer);
    let rows = 2000i64;
    for id in 1..=rows {
        let f = id as f64 / 3.0;
        let b: Vec<u8> = (0..(id % 64) as u8).collect();
        let ts = epoch_2020 + Duration::from_micros(id as u64 * 1_000_001);
        let arr: Option<Vec<i32>> = (id % 5 != 0).then(|| vec![id as i32, -1, i32::MAX]);
        let tags = vec![format!("t{id}"), "ü".to_owned()];
        writer
            .as_mut()
            .write(&[&id, &f, &b, &ts, &arr, &tags])
            .await
            .unwrap();
    }
    assert_eq!(writer.finish().await.unwrap(), rows as u64);
    wait_count(
        &c,
        "SELECT count(*) FROM bin",
        rows,
        Duration::from_secs(10),
    )
    .await;

    // Prepared statement, binary results (tokio-postgres asks binary for every column).
    let stmt = c
        .prepare("SELECT id, f, b, ts, arr, tags FROM bin WHERE id = $1")
        .await
        .unwrap();
    for id in [1i64, 5, 63, 64, 1999] {
        let row = c.query_one(&stmt, &[&id]).await.unwrap();
        assert_eq!(row.get::<_, i64>("id"), id);
        assert_eq!(row.get::<_, f64>("f"), id as f64 / 3.0);
        assert_eq!(
            row.get::<_, Vec<u8>>("b"),
            (0..(id % 64) as u8).collect::<Vec<_>>()
        );
        assert_eq!(
            row.get::<_, SystemTime>("ts"),
            epoch_2020 + Duration::from_micros(id as u64 * 1_000_001)
        );
        let arr: Option<Vec<i32>> = row.get("arr");
        assert_eq!(arr, (id % 5 != 0).then(|| vec![id as i32, -1, i32::MAX]));
        assert_eq!(
            row.get::<_, Vec<String>>("tags"),
            vec![format!("t{id}"), "ü".to_owned()]
        );
    }
    // query_typed: parameter types given, no separate prepare round trip.
    let rows_typed = c
        .query_typed(
            "SELECT $1::int8 * 2, $2::float8, $3::bytea, $4::int4[]",
            &[
                (&21i64, Type::INT8),
                (&0.5f64, Type::FLOAT8),
                (&vec![0u8, 255, 7], Type::BYTEA),
                (&vec![Some(1i32), None, Some(3)], Type::INT4_ARRAY),
            ],
        )
        .await
        .unwrap();
    let r = &rows_typed[0];
    assert_eq!(r.get::<_, i64>(0), 42);
    assert_eq!(r.get::<_, f64>(1), 0.5);
    assert_eq!(r.get::<_, Vec<u8>>(2), vec![0u8, 255, 7]);
    assert_eq!(
        r.get::<_, Vec<Option<i32>>>(3),
        vec![Some(1), None, Some(3)]
    );
    // Text results of the simple protocol, for comparison.
    let text = c
        .simple_query("SELECT f::text, b FROM bin WHERE id = 3")
        .await
        .unwrap();
    let row = text
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(row.get(0), Some("1"));
    assert_eq!(row.get(1), Some("\\x000102"));

    // Binary COPY out, decoded and checked row by row.
    let stream = c
        .copy_out("COPY (SELECT * FROM bin ORDER BY id) TO STDOUT (FORMAT binary)")
        .await
        .unwrap();
    let rows_out = BinaryCopyOutStream::new(stream, &types);
    futures::pin_mut!(rows_out);
    let mut n = 0i64;
    while let Some(row) = rows_out.next().await {
        let row = row.unwrap();
        n += 1;
        assert_eq!(row.get::<i64>(0), n);
        assert_eq!(row.get::<Vec<u8>>(2).len(), (n % 64) as usize);
        assert_eq!(row.get::<Option<Vec<i32>>>(4).is_none(), n % 5 == 0);
    }
    assert_eq!(n, rows);
}

/// A tokio-postgres client through the proxy whose notifications are kept.
async fn connect_listening(
    proxy: &Proxy,
) -> (
    tokio_postgres::Client,
    mpsc::UnboundedReceiver<Notification>,
) {
    let (client, mut conn) = tokio_postgres::connect(&proxy.dsn("postgres", ""), NoTls)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send(n);
            }
        }
    });
    (client, rx)
}

async fn next_notification(rx: &mut mpsc::UnboundedReceiver<Notification>) -> Notification {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a notification within 5 s")
        .expect("the connection is still open")
}

/// Write transactions of another client between a pinned client's statements,
/// so that an unpinned client would be handed other backends.
async fn churn(other: &tokio_postgres::Client) {
    for _ in 0..3 {
        other
            .batch_execute("BEGIN; INSERT INTO churn VALUES (pg_backend_pid()); COMMIT")
            .await
            .unwrap();
    }
}

async fn fetch_ints(c: &tokio_postgres::Client, sql: &str) -> Vec<i32> {
    c.simple_query(sql)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .collect()
}

/// A cluster and a proxy in transaction pooling mode, with a second client
/// (`other`) and its table `churn` for [`churn`].
async fn transaction_pooling() -> (PgCluster, Proxy, tokio_postgres::Client) {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let mut cfg = trust_config(&cluster);
    cfg.pool.mode = PoolMode::Transaction;
    cfg.pool.max_size = 4;
    let proxy = Proxy::start(cfg).await;
    let other = proxy.connect("postgres", "").await.unwrap();
    other
        .batch_execute("CREATE TABLE churn (pid int)")
        .await
        .unwrap();
    (cluster, proxy, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_keeps_a_temp_table_on_its_backend() {
    let (_cluster, proxy, other) = transaction_pooling().await;
    let a = proxy.connect("postgres", "").await.unwrap();
    a.batch_execute("CREATE TEMP TABLE tt (pid int)")
        .await
        .unwrap();
    a.execute("INSERT INTO tt VALUES (pg_backend_pid())", &[])
        .await
        .unwrap();
    for _ in 0..3 {
        churn(&other).await;
        let n: i64 = a
            .query_one("SELECT count(*) FROM tt WHERE pid = pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "the temp table is on the same backend");
    }
    a.batch_execute("BEGIN; INSERT INTO tt VALUES (pg_backend_pid()); COMMIT")
        .await
        .unwrap();
    let n: i64 = a
        .query_one("SELECT count(DISTINCT pid) FROM tt", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // Another client does not see it (it is session state, not a table).
    let err = other
        .query_one("SELECT count(*) FROM tt", &[])
        .await
        .expect_err("temp tables are private to their session");
    assert_eq!(err.code().map(|c| c.code()), Some("42P01"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_keeps_a_session_advisory_lock() {
    let (_cluster, proxy, other) = transaction_pooling().await;
    let l = proxy.connect("postgres", "").await.unwrap();
    let m = proxy.connect("postgres", "").await.unwrap();
    let try_lock = "SELECT pg_try_advisory_lock(4242)";
    l.batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(
            !m.query_one(try_lock, &[]).await.unwrap().get::<_, bool>(0),
            "the lock is still held"
        );
        churn(&other).await;
        l.batch_execute("BEGIN; INSERT INTO churn VALUES (0); COMMIT")
            .await
            .unwrap();
        l.batch_execute("SELECT 1").await.unwrap();
    }
    let unlocked: bool = l
        .query_one("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(unlocked, "the unlock runs on the backend holding the lock");
    assert!(m.query_one(try_lock, &[]).await.unwrap().get::<_, bool>(0));
    let released: bool = m
        .query_one("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_delivers_notifications_across_transactions() {
    let (_cluster, proxy, other) = transaction_pooling().await;
    let (listener, mut notes) = connect_listening(&proxy).await;
    listener.batch_execute("LISTEN ch").await.unwrap();
    churn(&other).await;
    listener.batch_execute("SELECT 1").await.unwrap();
    other.batch_execute("NOTIFY ch, 'one'").await.unwrap();
    let n = next_notification(&mut notes).await;
    assert_eq!((n.channel(), n.payload()), ("ch", "one"));
    listener
        .batch_execute("BEGIN; INSERT INTO churn VALUES (1); COMMIT")
        .await
        .unwrap();
    churn(&other).await;
    other
        .batch_execute("SELECT pg_notify('ch', 'two')")
        .await
        .unwrap();
    let n = next_notification(&mut notes).await;
    assert_eq!((n.channel(), n.payload()), ("ch", "two"));
    assert!(notes.try_recv().is_err(), "each notification arrives once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_keeps_a_with_hold_cursor() {
    let (_cluster, proxy, other) = transaction_pooling().await;
    let h = proxy.connect("postgres", "").await.unwrap();
    h.batch_execute("DECLARE cur CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 10) g")
        .await
        .unwrap();
    churn(&other).await;
    assert_eq!(fetch_ints(&h, "FETCH 3 FROM cur").await, vec![1, 2, 3]);
    churn(&other).await;
    assert_eq!(fetch_ints(&h, "FETCH 3 FROM cur").await, vec![4, 5, 6]);
    h.batch_execute("CLOSE cur").await.unwrap();
}

/// A pinned backend goes back to the pool when its client leaves; the next
/// client must get it without the previous session's temp tables and locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_backend_is_cleaned_before_the_next_client_gets_it() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let mut cfg = trust_config(&cluster);
    cfg.pool.mode = PoolMode::Transaction;
    cfg.pool.max_size = 1;
    let proxy = Proxy::start(cfg).await;
    let direct = cluster.primary().client().await.unwrap();
    let a = proxy.connect("postgres", "").await.unwrap();
    a.batch_execute("CREATE TEMP TABLE leak (x int); SELECT pg_advisory_lock(77)")
        .await
        .unwrap();
    let pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(a);

    // One primary connection in the pool: the next client gets that backend.
    let b = proxy.connect("postgres", "").await.unwrap();
    let again: i32 = eventually(
        Duration::from_secs(5),
        "the backend back in the pool",
        || {
            let b = &b;
            async move {
                let p: i32 = b
                    .query_one("/* meridian:primary */ SELECT pg_backend_pid()", &[])
                    .await?
                    .get(0);
                Ok(p)
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(again, pid, "the pool has a single primary connection");
    let temp: i64 = b
        .query_one(
            "/* meridian:primary */ SELECT count(*) FROM pg_class WHERE relname = 'leak' AND relpersistence = 't'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(temp, 0, "the previous client's temp table is gone");
    let free: bool = direct
        .query_one("SELECT pg_try_advisory_lock(77)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(free, "the previous client's advisory lock was released");
}

/// The reproduction of the pinning bug in the smallest form: a statement
/// prepared before the session is pinned, executed after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_survive_pinning() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let mut cfg = trust_config(&cluster);
        cfg.pool.mode = mode;
        let proxy = Proxy::start(cfg).await;
        let c = proxy.connect("postgres", "").await.unwrap();
        let stmt = c
            .prepare("/* meridian:primary */ SELECT pg_backend_pid()")
            .await
            .unwrap();
        let before: i32 = c.query_one(&stmt, &[]).await.unwrap().get(0);
        c.batch_execute("CREATE TEMP TABLE pinned_by (x int)")
            .await
            .unwrap();
        let after: i32 = c.query_one(&stmt, &[]).await.unwrap().get(0);
        assert_eq!(before, after, "{mode:?}");
        c.execute("INSERT INTO pinned_by VALUES (1)", &[])
            .await
            .unwrap();
    }
}

fn tls_config(cluster: &PgCluster, mode: BackendTlsMode, ca: Option<&Path>) -> ProxyConfig {
    let mut cfg = trust_config(cluster);
    cfg.backend_tls.mode = mode;
    cfg.backend_tls.ca_file = ca.map(Path::to_path_buf);
    cfg.pool.connect_timeout = Duration::from_secs(3);
    cfg
}

/// Whether the backends serving `c` (replica for a read, primary when hinted)
/// talk to the proxy over TLS.
async fn backends_use_tls(c: &tokio_postgres::Client) -> (bool, bool) {
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let read: bool = c.query_one(sql, &[]).await.unwrap().get(0);
    let hinted = format!("/* meridian:primary */ {sql}");
    let primary: bool = c.query_one(&hinted, &[]).await.unwrap().get(0);
    (read, primary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_modes_verify_require_prefer_and_disable() {
    use meridian_shared::pki::{write_dev_pki, PkiPaths};

    let pki = tempfile::tempdir().unwrap();
    write_dev_pki(pki.path(), &["pg"]).unwrap();
    let server = PkiPaths::in_dir(pki.path(), "pg");
    let other_pki = tempfile::tempdir().unwrap();
    write_dev_pki(other_pki.path(), &["elsewhere"]).unwrap();
    let wrong_ca = PkiPaths::in_dir(other_pki.path(), "elsewhere").ca;

    // User `app` may only log in over TLS (hostssl-only for it).
    let cluster = PgCluster::builder()
        .replicas(1)
        .tls(&server.cert, &server.key)
        .hba(["hostnossl all app 127.0.0.1/32 reject"])
        .start()
        .await
        .unwrap();
    let direct = cluster.primary().client().await.unwrap();
    direct
        .batch_execute("CREATE ROLE app LOGIN; CREATE TABLE tl (x int); GRANT ALL ON tl TO app")
        .await
        .unwrap();
    cluster
        .wait_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();

    // verify-full with the CA that signed the servers' certificate (SAN 127.0.0.1).
    let proxy = Proxy::start(tls_config(
        &cluster,
        BackendTlsMode::VerifyFull,
        Some(&server.ca),
    ))
    .await;
    let c = proxy.connect("app", "").await.unwrap();
    assert_eq!(backends_use_tls(&c).await, (true, true));
    assert_eq!(
        c.execute("INSERT INTO tl VALUES (1)", &[]).await.unwrap(),
        1
    );
    assert!(
        c.query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get::<_, bool>(0),
        "reads still go to the replica"
    );
    drop(c);
    drop(proxy);

    // verify-full with a CA that did not sign them: a clear class-08 error.
    let proxy = Proxy::start(tls_config(
        &cluster,
        BackendTlsMode::VerifyFull,
        Some(&wrong_ca),
    ))
    .await;
    let err = proxy
        .connect("app", "")
        .await
        .err()
        .expect("an unknown issuer is refused");
    let db = err.as_db_error().expect("an ErrorResponse from the proxy");
    assert!(db.code().code().starts_with("08"), "{db:?}");
    assert!(db.message().contains("certificate"), "{db:?}");
    drop(proxy);

    // require: encrypted, the chain is not checked (no CA configured).
    for mode in [BackendTlsMode::Require, BackendTlsMode::Prefer] {
        let proxy = Proxy::start(tls_config(&cluster, mode, None)).await;
        let c = proxy.connect("app", "").await.unwrap();
        assert_eq!(backends_use_tls(&c).await, (true, true), "{mode:?}");
        assert_eq!(
            c.execute("INSERT INTO tl VALUES (2)", &[]).await.unwrap(),
            1
        );
    }

    // disable: plaintext, which the hostssl-only user cannot log in with.
    let proxy = Proxy::start(tls_config(&cluster, BackendTlsMode::Disable, None)).await;
    let err = proxy
        .connect("app", "")
        .await
        .err()
        .expect("a plaintext login of a hostssl-only user is refused");
    let db = err.as_db_error().expect("an ErrorResponse from the proxy");
    assert!(
        db.message().contains("no encryption") || db.message().contains("pg_hba.conf"),
        "{db:?}"
    );
    let c = proxy.connect("postgres", "").await.unwrap();
    assert_eq!(backends_use_tls(&c).await, (false, false));
}
