#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The proxy's half of the regional result cache against a real primary, a real streaming
//! replica and a real Redis: fill on a miss, hit without touching a database, the watermark
//! rule (an invalidation makes the entry unservable, the refill carries the new value), and
//! Redis stopped or frozen (reads keep working uncached, within the lookup timeout).
//!
//! The watermark and the region's freshness lease are written by the test here, standing in
//! for the agents; the whole path
//! (logical decoding, coordinator fan-out, agents applying to each region's Redis) is tested
//! across regions in `control_path.rs`/`cache_regions.rs` style tests with the launcher.

mod common;

use std::time::{Duration, Instant};

use common::{trust_config, wait_count, Proxy};
use meridian_integration::{eventually, probe, PgCluster};
use meridian_launcher::redis_server::RedisServer;
use tokio_postgres::Client;

const CACHED: &str = "/* meridian:cache ttl=60s */ SELECT v FROM items WHERE k = 1";

async fn simple_value(c: &Client, sql: &str) -> String {
    probe::simple_value(c, sql).await.unwrap().expect("one row")
}

async fn metric(admin_port: u16, name: &str, outcome: &str) -> f64 {
    let series = format!("{name}_total{{outcome=\"{outcome}\"}}");
    probe::proxy_metric(&format!("127.0.0.1:{admin_port}"), &series)
        .await
        .unwrap()
}

/// Waits until `sql` through `c` returns `expected` and the proxy counted a new cache hit
/// (one more than when this was called).
async fn wait_for_hit(admin_port: u16, c: &Client, sql: &str, expected: &str, what: &str) {
    let hits = metric(admin_port, "cache_lookups", "hit").await;
    eventually(Duration::from_secs(20), what, || async {
        assert_eq!(simple_value(c, sql).await, expected);
        anyhow::ensure!(metric(admin_port, "cache_lookups", "hit").await > hits);
        Ok(())
    })
    .await
    .unwrap();
}

/// Writes the region's freshness lease of epoch 0 (a static topology's), without expiry,
/// as the agents keep it while invalidations reach the region; `false` deletes it.
async fn set_fresh_lease(redis_url: &str, cluster: &str, held: bool) {
    let mut r = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = meridian_shared::cache_keys::fresh_key(cluster, meridian_shared::epoch::Epoch(0));
    let mut cmd = redis::cmd(if held { "SET" } else { "DEL" });
    cmd.arg(&key);
    if held {
        cmd.arg("0");
    }
    cmd.query_async::<()>(&mut r).await.unwrap();
}

async fn primary_lsn(primary: &Client) -> u64 {
    let row = primary
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_hits_invalidates_and_survives_redis_outages() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let logs = cluster.dir().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut redis = RedisServer::start(cluster.dir(), &logs, "test")
        .await
        .unwrap();
    let mut cfg = trust_config(&cluster);
    cfg.cache.enabled = true;
    cfg.cache.redis = redis.url();
    let cluster_name = cfg.etcd.cluster.clone();
    let proxy = Proxy::start(cfg).await;
    let c = proxy.connect("postgres", "").await.unwrap();
    let primary = cluster.primary().client().await.unwrap();
    primary
        .batch_execute(
            "CREATE TABLE items (k int primary key, v int); INSERT INTO items VALUES (1, 1)",
        )
        .await
        .unwrap();
    wait_count(&c, "SELECT count(*) FROM items", 1, Duration::from_secs(10)).await;

    // Without the region's freshness lease nothing is served from the cache (nobody vouches
    // that invalidations reach this Redis): every lookup counts as lagging.
    eventually(Duration::from_secs(20), "lagging lookups", || async {
        assert_eq!(simple_value(&c, CACHED).await, "1");
        anyhow::ensure!(metric(proxy.admin_port, "cache_lookups", "lagging").await >= 2.0);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(metric(proxy.admin_port, "cache_lookups", "hit").await, 0.0);
    set_fresh_lease(&redis.url(), &cluster_name, true).await;

    // The relation catalog of the database loads on first use; then a miss fills the entry
    // and the next lookup hits.
    wait_for_hit(proxy.admin_port, &c, CACHED, "1", "a cache hit").await;
    assert!(metric(proxy.admin_port, "cache_stores", "stored").await >= 1.0);

    // A change nobody announced: the cache keeps answering with the entry (proof that hits do
    // not reach the replica), while an uncached read sees the new value.
    primary
        .batch_execute("UPDATE items SET v = 2 WHERE k = 1")
        .await
        .unwrap();
    wait_count(
        &c,
        "SELECT count(*) FROM items WHERE v = 2",
        1,
        Duration::from_secs(10),
    )
    .await;
    let got = simple_value(&c, CACHED).await;
    let mut outcomes = String::new();
    for o in [
        "hit", "miss", "stale", "error", "timeout", "bypass", "unusable", "lagging",
    ] {
        outcomes += &format!(
            "{o}={} ",
            metric(proxy.admin_port, "cache_lookups", o).await
        );
    }
    for o in ["stored", "error", "too_large"] {
        outcomes += &format!(
            "store {o}={} ",
            metric(proxy.admin_port, "cache_stores", o).await
        );
    }
    assert_eq!(got, "1", "cached value expected; lookups: {outcomes}");

    // The invalidation (what the agents write): the watermark of public.items rises to the
    // change's LSN. The entry is no longer served; the refill carries the new value.
    let lsn = primary_lsn(&primary).await;
    let mut r = redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = meridian_shared::cache_keys::watermark_key(&cluster_name, "public.items");
    redis::cmd("SET")
        .arg(&key)
        .arg(lsn.to_string())
        .query_async::<()>(&mut r)
        .await
        .unwrap();
    let stale_before = metric(proxy.admin_port, "cache_lookups", "stale").await;
    assert_eq!(simple_value(&c, CACHED).await, "2");
    assert!(metric(proxy.admin_port, "cache_lookups", "stale").await > stale_before);
    // A new session (no history) gets the refilled entry from the cache.
    let other = proxy.connect("postgres", "").await.unwrap();
    wait_for_hit(
        proxy.admin_port,
        &other,
        CACHED,
        "2",
        "a hit on the refilled entry",
    )
    .await;

    // Redis frozen (SIGSTOP): every read still answers, none waits much longer than the
    // lookup timeout, and the failures are counted.
    let pid = nix::unistd::Pid::from_raw(redis.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        assert_eq!(simple_value(&c, CACHED).await, "2");
        slowest = slowest.max(t.elapsed());
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        slowest < Duration::from_millis(500),
        "slowest read {slowest:?}"
    );
    let timeouts = metric(proxy.admin_port, "cache_lookups", "timeout").await
        + metric(proxy.admin_port, "cache_lookups", "bypass").await;
    assert!(timeouts >= 1.0, "timeouts and bypasses: {timeouts}");

    // Redis stopped: reads keep working; once it is back the cache fills and hits again.
    redis.stop().await;
    for _ in 0..5 {
        assert_eq!(simple_value(&c, CACHED).await, "2");
    }
    redis.start_again().await.unwrap();
    set_fresh_lease(&redis.url(), &cluster_name, true).await;
    wait_for_hit(
        proxy.admin_port,
        &other,
        CACHED,
        "2",
        "hits after Redis came back",
    )
    .await;

    // Pipelined behind another read, a fill captures its own result, not its neighbour's.
    let second = "/* meridian:cache ttl=60s */ SELECT v * 10 FROM items WHERE k = 1";
    let (a, b) = futures::join!(
        simple_value(&c, "SELECT 42 FROM items"),
        simple_value(&c, second)
    );
    assert_eq!((a.as_str(), b.as_str()), ("42", "20"));
    wait_for_hit(
        proxy.admin_port,
        &other,
        second,
        "20",
        "a hit on the pipelined fill",
    )
    .await;

    // The extended protocol: a prepared statement's executions are cached per parameter value.
    let by_key = c
        .prepare("/* meridian:cache ttl=60s */ SELECT v, k FROM items WHERE k = $1")
        .await
        .unwrap();
    primary
        .batch_execute("INSERT INTO items VALUES (2, 7)")
        .await
        .unwrap();
    wait_count(&c, "SELECT count(*) FROM items", 2, Duration::from_secs(10)).await;
    let hits = metric(proxy.admin_port, "cache_lookups", "hit").await;
    for _ in 0..3 {
        for (k, v) in [(1, 2), (2, 7)] {
            let row = c.query_one(&by_key, &[&k]).await.unwrap();
            assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (v, k));
        }
        assert!(c.query_opt(&by_key, &[&3]).await.unwrap().is_none());
    }
    let extended_hits = metric(proxy.admin_port, "cache_lookups", "hit").await - hits;
    assert!(extended_hits >= 3.0, "extended hits: {extended_hits}");

    // Never cached: volatile functions, writes, transactions.
    let stores = metric(proxy.admin_port, "cache_stores", "stored").await;
    simple_value(
        &c,
        "/* meridian:cache ttl=60s */ SELECT now()::text FROM items",
    )
    .await;
    c.batch_execute("BEGIN").await.unwrap();
    simple_value(&c, CACHED).await;
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        metric(proxy.admin_port, "cache_stores", "stored").await,
        stores
    );

    // The invalidation stream stalls: a change is made and never announced (no watermark),
    // so the entry stays valid and a new session is served the old value while the lease
    // holds. Once no agent renews the lease it expires: the read goes to the replica and
    // sees the change.
    let late = proxy.connect("postgres", "").await.unwrap();
    wait_for_hit(
        proxy.admin_port,
        &late,
        CACHED,
        "2",
        "a hit before the stall",
    )
    .await;
    primary
        .batch_execute("UPDATE items SET v = 3 WHERE k = 1")
        .await
        .unwrap();
    wait_count(
        &c,
        "SELECT count(*) FROM items WHERE v = 3",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(simple_value(&late, CACHED).await, "2", "still cached");
    set_fresh_lease(&redis.url(), &cluster_name, false).await;
    let lagging = metric(proxy.admin_port, "cache_lookups", "lagging").await;
    assert_eq!(simple_value(&late, CACHED).await, "3");
    assert!(metric(proxy.admin_port, "cache_lookups", "lagging").await > lagging);
}

/// A table created after the database's relation catalog was loaded is not known to the
/// cache until the next load; a cacheable read naming it asks for one at once (at most one
/// per second), so it is cached within seconds, not a whole `routing.catalog_refresh`
/// (an hour here: without the early refresh this test cannot pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_after_the_catalog_loaded_is_cached_within_seconds() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let logs = cluster.dir().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let redis = RedisServer::start(cluster.dir(), &logs, "test")
        .await
        .unwrap();
    let mut cfg = trust_config(&cluster);
    cfg.cache.enabled = true;
    cfg.cache.redis = redis.url();
    cfg.routing.catalog_refresh = Duration::from_secs(3600);
    let cluster_name = cfg.etcd.cluster.clone();
    let proxy = Proxy::start(cfg).await;
    set_fresh_lease(&redis.url(), &cluster_name, true).await;
    let c = proxy.connect("postgres", "").await.unwrap();
    let primary = cluster.primary().client().await.unwrap();
    primary
        .batch_execute(
            "CREATE TABLE items (k int primary key, v int); INSERT INTO items VALUES (1, 1)",
        )
        .await
        .unwrap();
    wait_count(&c, "SELECT count(*) FROM items", 1, Duration::from_secs(10)).await;
    // The catalog loads (with `items`) and serves.
    wait_for_hit(proxy.admin_port, &c, CACHED, "1", "a hit on items").await;

    primary
        .batch_execute(
            "CREATE TABLE later (k int primary key, v int); INSERT INTO later VALUES (1, 7)",
        )
        .await
        .unwrap();
    wait_count(&c, "SELECT count(*) FROM later", 1, Duration::from_secs(10)).await;
    let later = "/* meridian:cache ttl=60s */ SELECT v FROM later WHERE k = 1";
    let started = Instant::now();
    let hits = metric(proxy.admin_port, "cache_lookups", "hit").await;
    eventually(
        Duration::from_secs(10),
        "a hit on the new table",
        || async {
            assert_eq!(simple_value(&c, later).await, "7");
            anyhow::ensure!(metric(proxy.admin_port, "cache_lookups", "hit").await > hits);
            Ok(())
        },
    )
    .await
    .unwrap();
    eprintln!("the new table was cached after {:?}", started.elapsed());
}
