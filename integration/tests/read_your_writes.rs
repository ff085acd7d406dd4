#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End-to-end tests of read-your-writes (issue 4, proxy half) on a real
//! three-region cluster from the launcher: (a) a session that writes and at
//! once reads through region us-west's proxy always sees its row while the
//! us-west replica's replay is paused, and reads go back to that replica once
//! replay resumes; (b) the causal token (`SHOW meridian.last_commit_lsn` →
//! `SET meridian.min_lsn`) carried to eu-west's proxy gives the same guarantee
//! there; (c) `SET meridian.max_staleness` keeps reads off a replica that
//! lags more than the bound. The regions are apart by the demo's one-way WAN
//! delays (35, 40 and 70 ms); us-east, which holds the primary and no replica, reads
//! from the nearest region's replica, and right after its own write from the primary.
//!
//! The programs must be built first (`cargo build --workspace --bins`).

use std::time::Duration;

use anyhow::Context;
use meridian_integration::eventually;
use meridian_launcher::{connect, ClusterSpec, LocalCluster, WanDelays};
use tokio_postgres::{Client, SimpleQueryMessage};

use meridian_integration::probe::{http_get, metric as counter, simple_value as value};

const REGIONS: [&str; 3] = ["us-east", "us-west", "eu-west"];

/// The port of the server that answered a read through `c`.
async fn read_port(c: &Client) -> anyhow::Result<u16> {
    let v = value(c, "SELECT inet_server_port()").await?;
    Ok(v.context("no row")?.parse()?)
}

/// `/metrics` of a proxy's admin server.
async fn metrics(admin: &str) -> anyhow::Result<String> {
    http_get(admin, "/metrics").await
}

async fn scenario(cluster: &LocalCluster) -> anyhow::Result<()> {
    let west = cluster.proxy("us-west")?;
    let eu = cluster.proxy("eu-west")?;
    let west_replica = cluster.node("us-west-1")?;
    let eu_replica = cluster.node("eu-west-1")?;

    let setup = connect(&west.dsn()).await?;
    setup
        .batch_execute(
            "CREATE TABLE ryw (id int PRIMARY KEY, v text NOT NULL); \
             CREATE TABLE ryw_east (id int PRIMARY KEY, v text NOT NULL)",
        )
        .await?;
    // Reads through us-west's proxy reach its replica once it is polled healthy.
    eventually(
        Duration::from_secs(30),
        "us-west reads on its replica",
        || {
            let dsn = west.dsn();
            async move {
                let c = connect(&dsn).await?;
                let p = read_port(&c).await?;
                anyhow::ensure!(p == west_replica.pg_port, "read served by port {p}");
                Ok(())
            }
        },
    )
    .await?;

    // us-east holds the primary and no replica: its reads go to the nearest region's
    // replica, us-west (35 ms away), not eu-west (40 ms), as measured by the health polls.
    // Once the polls have measured both, every new session reads from us-west.
    let east = cluster.proxy("us-east")?;
    let east_read_port = || async {
        let c = connect(&east.dsn()).await?;
        read_port(&c).await
    };
    eventually(
        Duration::from_secs(30),
        "a us-east read on us-west",
        || async {
            let p = east_read_port().await?;
            anyhow::ensure!(p == west_replica.pg_port, "read served by port {p}");
            Ok(())
        },
    )
    .await?;
    for _ in 0..8 {
        let p = east_read_port().await?;
        anyhow::ensure!(
            p == west_replica.pg_port,
            "a us-east session read from port {p}, not the nearest replica"
        );
    }

    // A us-east session that writes reads its row back from the primary at once: the
    // primary is in its own region, nearer than any replica could be after catching up.
    let primary = cluster.node("us-east-1")?;
    let s = connect(&east.dsn()).await?;
    for i in 1000..1010i32 {
        s.batch_execute(&format!("INSERT INTO ryw_east VALUES ({i}, 'e{i}')"))
            .await?;
        let row = value(
            &s,
            &format!("SELECT inet_server_port() || ':' || v FROM ryw_east WHERE id = {i}"),
        )
        .await?;
        let want = format!("{}:e{i}", primary.pg_port);
        anyhow::ensure!(
            row.as_deref() == Some(&*want),
            "us-east read after its write: {row:?}, want {want} (the local primary)"
        );
    }

    let app_on_replica = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app connect_timeout=2",
        west_replica.pg_port
    ))
    .await?;
    eventually(
        Duration::from_secs(20),
        "the table on us-west's replica",
        || {
            let c = &app_on_replica;
            async move { Ok(c.batch_execute("SELECT count(*) FROM ryw").await?) }
        },
    )
    .await?;

    // (a) replay paused on us-west's replica: every read after a write sees it.
    let direct = connect(&west_replica.direct_dsn("postgres")).await?;
    direct.batch_execute("SELECT pg_wal_replay_pause()").await?;
    let s = connect(&west.dsn()).await?;
    for i in 0..50i32 {
        if i % 2 == 0 {
            s.batch_execute(&format!("INSERT INTO ryw VALUES ({i}, 'a{i}')"))
                .await?;
            let v = value(&s, &format!("SELECT v FROM ryw WHERE id = {i}")).await?;
            anyhow::ensure!(v.as_deref() == Some(&*format!("a{i}")), "read {i}: {v:?}");
        } else {
            // Extended protocol: the commit LSN is learned behind the Sync.
            let n = s
                .execute("INSERT INTO ryw VALUES ($1, $2)", &[&i, &format!("a{i}")])
                .await?;
            anyhow::ensure!(n == 1);
            let row = s
                .query_opt("SELECT v FROM ryw WHERE id = $1", &[&i])
                .await?;
            let v: Option<String> = row.map(|r| r.get(0));
            anyhow::ensure!(v.as_deref() == Some(&*format!("a{i}")), "read {i}: {v:?}");
        }
    }
    // The paused replica really did not have the rows (the test can fail).
    let seen = value(&app_on_replica, "SELECT count(*) FROM ryw").await?;
    anyhow::ensure!(
        seen.as_deref() == Some("0"),
        "paused replica saw {seen:?} rows"
    );
    let m = metrics(&west.admin_addr).await?;
    let ryw = |outcome: &str| {
        counter(
            &m,
            &format!("meridian_pgproxy_ryw_reads_total{{outcome=\"{outcome}\"}}"),
        )
    };
    let (immediate, after_wait, fallback) = (
        ryw("replica_immediate"),
        ryw("replica_after_wait"),
        ryw("primary_fallback"),
    );
    anyhow::ensure!(
        immediate + after_wait + fallback >= 50.0 && after_wait + fallback >= 1.0,
        "ryw outcomes: {immediate} {after_wait} {fallback}"
    );

    // Replay resumed: the same writing session reads from the local replica again.
    direct
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await?;
    eventually(Duration::from_secs(30), "post-write reads on us-west's replica", || {
        let s = &s;
        async move {
            s.batch_execute("INSERT INTO ryw VALUES (10000 + (random() * 1e6)::int, 'x') ON CONFLICT DO NOTHING")
                .await?;
            let p = read_port(s).await?;
            anyhow::ensure!(p == west_replica.pg_port, "read served by port {p}");
            Ok(())
        }
    })
    .await?;
    let m = metrics(&west.admin_addr).await?;
    anyhow::ensure!(
        counter(
            &m,
            "meridian_pgproxy_ryw_reads_total{outcome=\"replica_immediate\"}"
        ) + counter(
            &m,
            "meridian_pgproxy_ryw_reads_total{outcome=\"replica_after_wait\"}"
        ) >= 1.0,
        "{m}"
    );

    // (b) the causal token crosses to eu-west, whose replica is paused.
    eventually(
        Duration::from_secs(30),
        "eu-west reads on its replica",
        || {
            let dsn = eu.dsn();
            async move {
                let c = connect(&dsn).await?;
                let p = read_port(&c).await?;
                anyhow::ensure!(p == eu_replica.pg_port, "read served by port {p}");
                Ok(())
            }
        },
    )
    .await?;
    let eu_direct = connect(&eu_replica.direct_dsn("postgres")).await?;
    eu_direct
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await?;
    s.batch_execute("INSERT INTO ryw VALUES (-1, 'token')")
        .await?;
    let token = value(&s, "SHOW meridian.last_commit_lsn")
        .await?
        .context("no token")?;
    anyhow::ensure!(token != "0/0", "token {token}");
    let reader = connect(&eu.dsn()).await?;
    // Without the token this session reads the paused replica, which lacks the row.
    let plain = reader
        .simple_query("SELECT inet_server_port(), count(*) FROM ryw WHERE id = -1")
        .await?;
    if let Some(SimpleQueryMessage::Row(r)) = plain
        .iter()
        .find(|m| matches!(m, SimpleQueryMessage::Row(_)))
    {
        if r.get(0) == Some(&*eu_replica.pg_port.to_string()) {
            anyhow::ensure!(r.get(1) == Some("0"), "paused eu-west replica has the row");
        }
    }
    reader
        .batch_execute(&format!("SET meridian.min_lsn = '{token}'"))
        .await?;
    let shown = value(&reader, "SHOW meridian.min_lsn").await?;
    anyhow::ensure!(shown.as_deref() == Some(&*token), "SHOW min_lsn: {shown:?}");
    let v = value(&reader, "SELECT v FROM ryw WHERE id = -1").await?;
    anyhow::ensure!(v.as_deref() == Some("token"), "causal read: {v:?}");
    // The hint form, in a fresh eu-west session.
    let hinted = connect(&eu.dsn()).await?;
    let v = value(
        &hinted,
        &format!("/* meridian:min_lsn={token} */ SELECT v FROM ryw WHERE id = -1"),
    )
    .await?;
    anyhow::ensure!(v.as_deref() == Some("token"), "hinted read: {v:?}");
    // Bad values name the setting.
    let err = reader
        .batch_execute("SET meridian.min_lsn = 'yesterday'")
        .await
        .unwrap_err();
    let db = err.as_db_error().context("not a server error")?;
    anyhow::ensure!(db.code().code() == "22023", "{db:?}");
    anyhow::ensure!(db.message().contains("meridian.min_lsn"), "{db:?}");

    // (c) a staleness bound keeps reads off the paused (lagging) replica.
    let bounded = connect(&eu.dsn()).await?;
    bounded
        .batch_execute("SET meridian.max_staleness = '1s'")
        .await?;
    let shown = value(&bounded, "SHOW meridian.max_staleness").await?;
    anyhow::ensure!(shown.as_deref() == Some("1s"), "{shown:?}");
    eventually(
        Duration::from_secs(20),
        "bounded reads off the lagging replica",
        || {
            let b = &bounded;
            async move {
                let p = read_port(b).await?;
                anyhow::ensure!(
                    p != eu_replica.pg_port,
                    "read served by the lagging replica"
                );
                Ok(())
            }
        },
    )
    .await?;
    eu_direct
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await?;
    bounded
        .batch_execute("RESET meridian.max_staleness")
        .await?;
    let shown = value(&bounded, "SHOW meridian.max_staleness").await?;
    anyhow::ensure!(shown.as_deref() == Some("off"), "{shown:?}");
    Ok(())
}

#[tokio::test]
async fn read_your_writes_across_regions() {
    meridian_shared::telemetry::init();
    let dir = tempfile::Builder::new()
        .prefix("meridian-ryw-")
        .tempdir()
        .unwrap();
    let mut spec = ClusterSpec::new(dir.path(), &REGIONS);
    // The demo's WAN: a write from us-west or eu-west crosses 35 / 40 ms each way to the
    // primary in us-east, and replication pays the same delay back.
    spec.wan_delays = WanDelays::none()
        .with("us-east", "us-west", Duration::from_millis(35))
        .with("us-east", "eu-west", Duration::from_millis(40))
        .with("us-west", "eu-west", Duration::from_millis(70));
    let mut cluster = match LocalCluster::start(spec).await {
        Ok(c) => c,
        Err(e) => panic!("the local cluster did not start: {e:?}"),
    };
    let result = scenario(&cluster).await;
    if let Err(e) = &result {
        eprintln!("{}", cluster.log_tails(60));
        cluster.stop().await;
        panic!("{e:?}");
    }
    cluster.stop().await;
}
