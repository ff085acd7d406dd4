#![allow(clippy::unwrap_used, clippy::expect_used, clippy::err_expect)]
//! End-to-end tests of meridian-pgproxy against a real PostgreSQL primary with
//! a real streaming replica, through real clients (tokio-postgres, psql, pgbench).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{trust_config, wait_count, wait_running, Proxy};
use meridian_integration::PgCluster;
use meridian_shared::config::{AuthMethod, PoolMode, UserConfig};
use tokio_postgres::NoTls;

async fn is_replica(c: &tokio_postgres::Client, sql: &str) -> bool {
    c.query_one(sql, &[]).await.unwrap().get::<_, bool>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_writes_to_the_primary() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let proxy = Proxy::start(trust_config(&cluster)).await;
    let c = proxy.connect("postgres", "").await.unwrap();

    // A plain read runs on the replica.
    assert!(is_replica(&c, "SELECT pg_is_in_recovery()").await);
    let port: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, cluster.replicas()[0].port());

    // Writes run on the primary.
    c.batch_execute("CREATE TABLE rw (id int primary key, v text)")
        .await
        .unwrap();
    c.execute("INSERT INTO rw VALUES (1, 'a')", &[])
        .await
        .unwrap();
    // A write-hinted read runs on the primary.
    assert!(!is_replica(&c, "/* meridian:primary */ SELECT pg_is_in_recovery()").await);
    // nextval writes: primary.
    c.batch_execute("CREATE SEQUENCE s").await.unwrap();
    let n: i64 = c
        .query_one("SELECT nextval('s')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // txid_current() is `stable` in pg_proc but assigns a transaction id: primary (on the
    // replica it fails with 25006).
    let xid: i64 = c
        .query_one("SELECT txid_current()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(xid > 0);

    // A read-write transaction stays on the primary from BEGIN to COMMIT.
    c.batch_execute("BEGIN").await.unwrap();
    assert!(!is_replica(&c, "SELECT pg_is_in_recovery()").await);
    c.execute("INSERT INTO rw VALUES (2, 'b')", &[])
        .await
        .unwrap();
    let seen: i64 = c
        .query_one("SELECT count(*) FROM rw", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 2, "the transaction reads its own write");
    c.batch_execute("COMMIT").await.unwrap();

    // A read-only transaction runs on the replica as a whole.
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert!(is_replica(&c, "SELECT pg_is_in_recovery()").await);
    c.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SET TRANSACTION READ ONLY").await.unwrap();
    assert!(is_replica(&c, "SELECT pg_is_in_recovery()").await);
    c.batch_execute("COMMIT").await.unwrap();

    // The replica catches up and serves the committed rows.
    wait_count(&c, "SELECT count(*) FROM rw", 2, Duration::from_secs(10)).await;

    // The metrics endpoint counts both targets.
    let body = http_get(proxy.admin_port, "/metrics").await;
    assert!(body.contains("target=\"replica\""), "{body}");
    assert!(body.contains("target=\"primary\""), "{body}");
    assert!(http_get(proxy.admin_port, "/health").await.contains("ok"));
}

async fn http_get(port: u16, path: &str) -> String {
    meridian_integration::probe::http_get(&format!("127.0.0.1:{port}"), path)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_survive_backend_switching_in_transaction_mode() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let mut cfg = trust_config(&cluster);
    cfg.pool.mode = PoolMode::Transaction;
    cfg.pool.max_size = 2;
    let proxy = Proxy::start(cfg).await;
    let setup = proxy.connect("postgres", "").await.unwrap();
    setup
        .batch_execute("CREATE TABLE kv (k int primary key, v int); INSERT INTO kv SELECT g, g * 10 FROM generate_series(1, 100) g")
        .await
        .unwrap();
    wait_count(
        &setup,
        "SELECT count(*) FROM kv",
        100,
        Duration::from_secs(10),
    )
    .await;

    // Several clients share two backend connections per pool; each keeps
    // using its own prepared statements, which the proxy re-prepares on
    // whichever backend runs them.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = proxy.connect("postgres", "").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let read = c.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
            let write = c.prepare("UPDATE kv SET v = v WHERE k = $1").await.unwrap();
            for round in 0..40i32 {
                let k = (i * 40 + round) % 100 + 1;
                let v: i32 = c.query_one(&read, &[&k]).await.unwrap().get(0);
                assert_eq!(v, k * 10);
                assert_eq!(c.execute(&write, &[&k]).await.unwrap(), 1);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Session state: a SET survives moving between backends in transaction mode.
    let c = proxy.connect("postgres", "").await.unwrap();
    c.batch_execute("SET application_name = 'meridian-test'")
        .await
        .unwrap();
    for _ in 0..10 {
        let name: String = c
            .query_one("SHOW application_name", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "meridian-test");
        c.execute("UPDATE kv SET v = v WHERE k = 1", &[])
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_copy_and_backend_loss() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let proxy = Proxy::start(trust_config(&cluster)).await;
    let c = proxy.connect("postgres", "").await.unwrap();

    // Cancel reaches the backend that runs the query.
    let token = c.cancel_token();
    let started = std::time::Instant::now();
    let sleeper =
        tokio::spawn(async move { c.batch_execute("SELECT pg_sleep(30)").await.map(|_| c) });
    let direct = cluster.replicas()[0].client().await.unwrap();
    wait_running(&direct, "SELECT pg_sleep(30)").await;
    token.cancel_query(NoTls).await.unwrap();
    let err = sleeper
        .await
        .unwrap()
        .err()
        .expect("the query must be cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // COPY both ways.
    let c = proxy.connect("postgres", "").await.unwrap();
    c.batch_execute("CREATE TABLE cp (id int, name text)")
        .await
        .unwrap();
    {
        use futures::SinkExt;
        let sink = c.copy_in("COPY cp FROM STDIN").await.unwrap();
        futures::pin_mut!(sink);
        let mut data = String::new();
        for i in 0..1000 {
            data.push_str(&format!("{i}\tname-{i}\n"));
        }
        sink.send(bytes::Bytes::from(data)).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 1000);
    }
    // Replication is asynchronous: wait until the replica that serves the read has the rows.
    wait_count(&c, "SELECT count(*) FROM cp", 1000, Duration::from_secs(10)).await;
    {
        use futures::StreamExt;
        let stream = c
            .copy_out("COPY (SELECT * FROM cp ORDER BY id) TO STDOUT")
            .await
            .unwrap();
        futures::pin_mut!(stream);
        let mut all = Vec::new();
        while let Some(chunk) = stream.next().await {
            all.extend_from_slice(&chunk.unwrap());
        }
        let text = String::from_utf8(all).unwrap();
        assert_eq!(text.lines().count(), 1000);
        assert!(text.starts_with("0\tname-0\n"));
    }

    // The backend dies in the middle of a query: the client gets an error,
    // and its next statement runs on a fresh backend.
    let victim = proxy.connect("postgres", "").await.unwrap();
    victim.batch_execute("SELECT 1").await.unwrap();
    let running = tokio::spawn(async move {
        let r = victim.batch_execute("SELECT pg_sleep(20)").await;
        (victim, r)
    });
    wait_running(&direct, "SELECT pg_sleep(20)").await;
    direct
        .batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)'")
        .await
        .unwrap();
    let (victim, r) = running.await.unwrap();
    let err = r.expect_err("the statement must fail");
    let code = err.code().map(|c| c.code().to_owned()).unwrap_or_default();
    assert!(
        code.starts_with("08") || code == "57P01",
        "unexpected error {err:?}"
    );
    let one: i32 = victim.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_md5_wrong_password_and_bad_input() {
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    let mut cfg = trust_config(&cluster);
    cfg.auth = AuthMethod::ScramSha256;
    cfg.users = vec![
        UserConfig {
            name: "app".into(),
            password: Some("s3cret".into()),
            scram_verifier: None,
            auth: None,
            backend_user: Some("postgres".into()),
            backend_password: None,
            pool_mode: None,
            databases: vec![],
        },
        UserConfig {
            name: "legacy".into(),
            password: Some("old".into()),
            scram_verifier: None,
            auth: Some(AuthMethod::Md5),
            backend_user: Some("postgres".into()),
            backend_password: None,
            pool_mode: None,
            databases: vec![],
        },
    ];
    cfg.max_clients = 3;
    let proxy = Proxy::start(cfg).await;

    let c = proxy.connect("app", "password=s3cret").await.unwrap();
    assert_eq!(
        c.query_one("SELECT 41 + 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        42
    );
    let md5 = proxy.connect("legacy", "password=old").await.unwrap();
    md5.batch_execute("SELECT 1").await.unwrap();

    let err = proxy
        .connect("app", "password=wrong")
        .await
        .err()
        .expect("wrong password refused");
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    let err = proxy
        .connect("nobody", "password=x")
        .await
        .err()
        .expect("unknown user refused");
    assert!(
        err.code().is_some_and(|c| c.code().starts_with("28")),
        "{err}"
    );

    // Too many clients: 53300.
    let third = proxy.connect("app", "password=s3cret").await.unwrap();
    let err = proxy
        .connect("app", "password=s3cret")
        .await
        .err()
        .expect("limit enforced");
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    drop(third);

    // Garbage instead of a startup packet gets a protocol-violation error, not a hang.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, 12, 0, 3, 0, 0, 1, 2, 3, 4])
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&reply).contains("08P01"));
    // An unknown protocol version gets 0A000.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, 9, 0, 9, 0, 0, 0]).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&reply).contains("0A000"));

    // Replication-mode startup is refused with a clear message.
    let out = Command::new("psql")
        .arg(format!(
            "{} password=s3cret replication=database",
            proxy.dsn("app", "")
        ))
        .args(["-c", "IDENTIFY_SYSTEM"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replication"),
        "{out:?}"
    );
}

fn pgbench() -> String {
    let dir = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|d| std::path::Path::new(d).join("pgbench").exists())
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into());
    format!("{dir}/pgbench")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_in_all_protocol_modes_has_no_failures() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let mut cfg = trust_config(&cluster);
    cfg.pool.mode = PoolMode::Transaction;
    let proxy = Proxy::start(cfg).await;
    let init = Command::new(pgbench())
        .args([
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let direct = cluster.replicas()[0].client().await.unwrap();
    wait_count(
        &direct,
        "SELECT count(*) FROM pgbench_branches",
        1,
        Duration::from_secs(20),
    )
    .await;
    for mode in ["simple", "extended", "prepared"] {
        for select_only in [true, false] {
            let mut cmd = Command::new(pgbench());
            cmd.args(["-n", "-c", "4", "-j", "2", "-t", "100", "-M", mode])
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &proxy.port.to_string(),
                    "-U",
                    "postgres",
                    "postgres",
                ]);
            if select_only {
                cmd.arg("-S");
            }
            let out = cmd.output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "pgbench -M {mode} (select-only {select_only}) failed: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                stdout.contains("number of transactions actually processed: 400/400"),
                "mode {mode}: {stdout}"
            );
            assert!(
                stdout.contains("number of failed transactions: 0"),
                "mode {mode}: {stdout}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_offered_and_can_be_required() {
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.path().join("proxy.crt");
    let key_path = dir.path().join("proxy.key");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut cfg = trust_config(&cluster);
    cfg.tls.cert = Some(cert_path);
    cfg.tls.key = Some(key_path);
    cfg.tls.required = true;
    let proxy = Proxy::start(cfg).await;

    // psql with sslmode=require negotiates TLS through the proxy.
    let out = Command::new("psql")
        .arg(proxy.dsn("postgres", "sslmode=require"))
        .args(["-Atc", "SELECT 42", "-c", "\\conninfo"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("42"), "{stdout}");
    assert!(stdout.contains("SSL connection"), "{stdout}");

    // Without TLS the proxy refuses, naming the reason.
    let out = Command::new("psql")
        .arg(proxy.dsn("postgres", "sslmode=disable"))
        .args(["-Atc", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridian_settings_work_through_the_extended_protocol() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let proxy = Proxy::start(trust_config(&cluster)).await;
    let c = proxy.connect("postgres", "").await.unwrap();
    c.batch_execute("CREATE TABLE ext (id int)").await.unwrap();
    c.execute("INSERT INTO ext VALUES (1)", &[]).await.unwrap();

    // tokio-postgres prepares every statement: Parse/Describe/Sync, Bind/Execute/Sync.
    let token: String = c
        .query_one("SHOW meridian.last_commit_lsn", &[])
        .await
        .unwrap()
        .get(0);
    let lsn: meridian_shared::lsn::Lsn = token.parse().unwrap();
    assert!(lsn > meridian_shared::lsn::Lsn::ZERO, "{token}");

    let reader = proxy.connect("postgres", "").await.unwrap();
    reader
        .execute(&format!("SET meridian.min_lsn = '{token}'"), &[])
        .await
        .unwrap();
    let shown = reader.prepare("SHOW meridian.min_lsn").await.unwrap();
    for _ in 0..2 {
        let v: String = reader.query_one(&shown, &[]).await.unwrap().get(0);
        assert_eq!(v, token);
    }
    // The token makes the read wait for the commit: the row is there.
    let n: i64 = reader
        .query_one("SELECT count(*) FROM ext", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    // A bad value is an error with its SQLSTATE; the session goes on.
    let err = reader
        .execute("SET meridian.max_staleness = 'soon'", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE)
    );
    reader
        .execute("SET meridian.max_staleness = '2s'", &[])
        .await
        .unwrap();
    let v: String = reader
        .query_one("SHOW meridian.max_staleness", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "2s");
    // An ordinary statement reusing the name space still reaches the database.
    let one: i32 = reader.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

async fn pool_metric(proxy: &Proxy, series: &str) -> f64 {
    meridian_integration::probe::proxy_metric(&format!("127.0.0.1:{}", proxy.admin_port), series)
        .await
        .unwrap()
}

/// Clients beyond `pool.max_size` wait for a server connection instead of failing: in
/// session mode with a replica every session holds a replica connection from its login,
/// so with a pool of two the third login waits until a session leaves. A wait longer than
/// `pool.query_wait_timeout` ends with 53300 naming the setting (an ERROR: the session goes
/// on), counted in the metrics. In transaction mode statements queue for the one connection
/// and all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_pool_wait_for_a_server_connection() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let mut cfg = trust_config(&cluster);
    cfg.pool.max_size = 2;
    cfg.pool.connect_timeout = Duration::from_secs(1);
    let proxy = Proxy::start(cfg.clone()).await;
    let first = proxy.connect("postgres", "").await.unwrap();
    let second = proxy.connect("postgres", "").await.unwrap();
    for c in [&first, &second] {
        assert!(is_replica(c, "SELECT pg_is_in_recovery()").await);
    }
    let third = {
        let proxy_dsn = proxy.dsn("postgres", "");
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&proxy_dsn, NoTls).await?;
            tokio::spawn(conn);
            let v: i32 = c.query_one("SELECT 7", &[]).await?.get(0);
            Ok::<_, tokio_postgres::Error>(v)
        })
    };
    // Queued, not refused: still waiting at twice pool.connect_timeout (the wait used to
    // end there with 08006); counted as waiting.
    let waiting = "pool_waiting_clients";
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while pool_metric(&proxy, waiting).await < 1.0 {
        assert!(
            std::time::Instant::now() < end,
            "no session counted as waiting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The absence of a refusal takes a window to observe.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!third.is_finished(), "the third login must wait, not fail");
    drop(first);
    let v = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third login gets the freed connection")
        .unwrap()
        .unwrap();
    assert_eq!(v, 7);
    assert_eq!(pool_metric(&proxy, waiting).await, 0.0);
    assert_eq!(pool_metric(&proxy, "pool_wait_timeouts_total").await, 0.0);
    drop(second);

    // A short query_wait_timeout, transaction mode, one connection per pool: while one
    // client's transaction holds the primary's connection, another client's write waits that
    // long, then gets 53300 naming the setting; its session goes on once the pool frees up.
    let mut short = cfg.clone();
    short.pool.mode = PoolMode::Transaction;
    short.pool.max_size = 1;
    short.pool.query_wait_timeout = Duration::from_secs(1);
    let proxy = Proxy::start(short).await;
    let holder = proxy.connect("postgres", "").await.unwrap();
    let waiter = proxy.connect("postgres", "").await.unwrap();
    holder
        .batch_execute("CREATE TABLE queued (id int); BEGIN; INSERT INTO queued VALUES (1)")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = waiter
        .batch_execute("INSERT INTO queued VALUES (2)")
        .await
        .expect_err("a write behind a busy pool must end after the wait");
    let waited = started.elapsed();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300", "{db:?}");
    assert!(
        db.message().contains("pool.query_wait_timeout"),
        "{}",
        db.message()
    );
    assert!(
        waited >= Duration::from_millis(900),
        "waited only {waited:?}"
    );
    assert_eq!(pool_metric(&proxy, "pool_wait_timeouts_total").await, 1.0);
    holder.batch_execute("COMMIT").await.unwrap();
    waiter
        .batch_execute("INSERT INTO queued VALUES (3)")
        .await
        .unwrap();

    // Transaction mode, one connection: concurrent statements queue and all succeed.
    let mut tx = cfg;
    tx.pool.mode = PoolMode::Transaction;
    tx.pool.max_size = 1;
    let proxy = Proxy::start(tx).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = proxy.connect("postgres", "").await.unwrap();
        tasks.push(tokio::spawn(async move {
            c.batch_execute("SELECT pg_sleep(0.3)").await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}
