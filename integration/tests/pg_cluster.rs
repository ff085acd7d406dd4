//! The cluster harness itself: a primary and a streaming replica come up
//! quickly, replicate, report their roles, die on kill -9 and leave nothing
//! behind when dropped.

#![allow(clippy::unwrap_used)] // a test binary: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use meridian_integration::{eventually, PgCluster, StopMode};

fn refuses(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_and_replica_replicate_and_the_primary_dies_on_kill9() {
    let started = Instant::now();
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let startup = started.elapsed();
    // A few seconds normally; generous for a loaded 2-core CI machine.
    assert!(
        startup < Duration::from_secs(45),
        "cluster took {startup:?}"
    );
    eprintln!("primary + 1 replica up in {startup:?}");

    let primary = cluster.primary();
    let replica = &cluster.replicas()[0];
    assert_ne!(primary.port(), replica.port());
    assert_eq!(
        primary.dsn("app", "appdb"),
        format!(
            "host=127.0.0.1 port={} user=app dbname=appdb",
            primary.port()
        )
    );
    assert!(primary.data_dir().join("PG_VERSION").exists());
    assert!(replica.data_dir().join("standby.signal").exists());

    let p = primary.client().await.unwrap();
    p.batch_execute("CREATE TABLE harness (id int primary key, note text)")
        .await
        .unwrap();
    p.execute("INSERT INTO harness VALUES (1, 'from the primary')", &[])
        .await
        .unwrap();

    let r = replica.client().await.unwrap();
    let note = eventually(
        Duration::from_secs(20),
        "the row on the replica",
        || async {
            let rows = r
                .query("SELECT note FROM harness WHERE id = 1", &[])
                .await?;
            let row = rows.first().ok_or_else(|| anyhow::anyhow!("no row yet"))?;
            Ok(row.get::<_, String>(0))
        },
    )
    .await
    .unwrap();
    assert_eq!(note, "from the primary");

    let replica_recovering: bool = r
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    let primary_recovering: bool = p
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(replica_recovering);
    assert!(!primary_recovering);

    // The replica streams through its slot.
    let (app, slot_active): (String, bool) = {
        let row = p
            .query_one(
                "SELECT s.application_name, sl.active FROM pg_stat_replication s \
                 JOIN pg_replication_slots sl ON sl.active_pid = s.pid",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(app, replica.name());
    assert!(slot_active);

    // Writes on the replica are refused (read-only standby).
    let err = r
        .batch_execute("INSERT INTO harness VALUES (2, 'x')")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25006"), "{err}");

    // kill -9 of the primary: its port refuses at once, its clients break,
    // the replica keeps serving reads.
    let port = primary.port();
    primary.kill9().await.unwrap();
    assert!(refuses(port), "port {port} still accepts after kill9");
    assert!(p.simple_query("SELECT 1").await.is_err());
    let n: i64 = r
        .query_one("SELECT count(*) FROM harness", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_cluster_kills_every_node_and_removes_its_dir() {
    let cluster = PgCluster::builder()
        .replicas(2)
        .hba(["host all app 127.0.0.1/32 scram-sha-256"])
        .setting("application_name", "harness-test")
        .start()
        .await
        .unwrap();
    let dir = cluster.dir().to_owned();
    let ports: Vec<u16> = cluster.nodes().map(|n| n.port()).collect();
    assert_eq!(ports.len(), 3);

    // The extra HBA line comes first: user app must give a password.
    let p = cluster.primary().client().await.unwrap();
    p.batch_execute("CREATE ROLE app LOGIN PASSWORD 's3cret'")
        .await
        .unwrap();
    let no_password = tokio_postgres::connect(
        &cluster.primary().dsn("app", "postgres"),
        tokio_postgres::NoTls,
    )
    .await;
    assert!(no_password.is_err());
    let (c, conn) = tokio_postgres::connect(
        &format!(
            "{} password=s3cret",
            cluster.primary().dsn("app", "postgres")
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let name: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "app");

    // Both replicas catch up; a stopped one is skipped by the wait.
    cluster
        .wait_replicas_caught_up(Duration::from_secs(20))
        .await
        .unwrap();
    let role_on_replica = eventually(Duration::from_secs(20), "role app on node2", || async {
        let r = cluster.replicas()[1].client().await?;
        let n: i64 = r
            .query_one("SELECT count(*) FROM pg_roles WHERE rolname = 'app'", &[])
            .await?
            .get(0);
        anyhow::ensure!(n == 1, "role not replayed yet");
        Ok(n)
    })
    .await
    .unwrap();
    assert_eq!(role_on_replica, 1);
    cluster.replicas()[0].stop(StopMode::Fast).await.unwrap();
    assert!(refuses(ports[1]));
    cluster
        .wait_replicas_caught_up(Duration::from_secs(20))
        .await
        .unwrap();

    drop(c);
    drop(p);
    drop(cluster);
    for port in ports {
        assert!(refuses(port), "port {port} still open after drop");
    }
    assert!(!dir.exists(), "{} not removed", dir.display());
}
