#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The regional result cache across three regions with delaying WAN links, end to end:
//! real PostgreSQL streaming replication, the primary's agent decoding its WAL (pgoutput),
//! the coordinator fanning invalidations out over QUIC, each region's agent raising
//! watermarks in its region's Redis, and each region's proxy caching reads there.
//!
//! One cluster, in order: (c) an updated row is invalidated in every region and every region's
//! reader, polling a cached query every few milliseconds, sees the values in commit order
//! (never an older value after a newer one) and ends on the last one; (d) with one region's
//! Redis stopped, its reads keep working (uncached) and follow the updates, and caching comes
//! back with Redis; (f) with the control plane frozen (both coordinators stopped by SIGSTOP, so no
//! invalidation reaches any region) the agents' freshness leases run out, no region serves its
//! cached entry any more, every reader follows an update from its replica, and caching resumes
//! with the coordinators; (e) a failover moves the cache to the new epoch: every region's Redis
//! loses the old epoch's entries and reads go on from the new primary's data.
//!
//! The programs must be built first (`cargo build --workspace --bins`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use meridian_integration::{eventually, probe};
use meridian_launcher::{connect, ClusterSpec, LocalCluster, WanDelays};

const REGIONS: [&str; 3] = ["us-east", "us-west", "eu-west"];
const CACHED: &str = "/* meridian:cache ttl=120s */ SELECT v FROM items WHERE k = 1";

/// What one region's reader saw.
#[derive(Default, Debug)]
struct Seen {
    reads: u64,
    errors: u64,
    last: i64,
    /// `(before, after)` for every value lower than one read earlier.
    backwards: Vec<(i64, i64)>,
}

/// Polls `CACHED` through `dsn` every few milliseconds until `stop`, checking that values
/// never go back (they are written in increasing order, so this is the commit order).
fn spawn_reader(
    dsn: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = None;
        while !stop.load(Ordering::Relaxed) {
            if client.is_none() {
                client = connect(&dsn).await.ok();
            }
            let value = match &client {
                Some(c) => probe::simple_value(c, CACHED).await,
                None => Err(anyhow::anyhow!("not connected")),
            };
            match value.ok().flatten().and_then(|v| v.parse::<i64>().ok()) {
                Some(v) => {
                    let mut s = seen.lock().unwrap();
                    s.reads += 1;
                    if v < s.last {
                        let last = s.last;
                        s.backwards.push((last, v));
                    }
                    s.last = s.last.max(v);
                }
                None => {
                    seen.lock().unwrap().errors += 1;
                    client = None;
                }
            }
            // Pacing of the poll, not a wait on a condition.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    })
}

struct Readers {
    stop: Arc<AtomicBool>,
    seen: BTreeMap<&'static str, Arc<Mutex<Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Readers {
    fn start(cluster: &LocalCluster) -> anyhow::Result<Readers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut seen = BTreeMap::new();
        let mut tasks = Vec::new();
        for region in REGIONS {
            let s = Arc::new(Mutex::new(Seen::default()));
            tasks.push(spawn_reader(
                cluster.proxy(region)?.dsn(),
                stop.clone(),
                s.clone(),
            ));
            seen.insert(region, s);
        }
        Ok(Readers { stop, seen, tasks })
    }

    /// Waits until every region's reader has read `value`.
    async fn wait_all(&self, value: i64, within: Duration) -> anyhow::Result<()> {
        eventually(within, &format!("every region reads {value}"), || async {
            for (region, s) in &self.seen {
                let last = s.lock().unwrap().last;
                anyhow::ensure!(last == value, "{region} reads {last}");
            }
            Ok(())
        })
        .await
    }

    fn assert_in_order(&self) {
        for (region, s) in &self.seen {
            let s = s.lock().unwrap();
            assert!(
                s.backwards.is_empty(),
                "{region} read older values after newer ones: {:?}",
                s.backwards
            );
            assert!(s.reads > 0, "{region} read nothing");
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn lookups(cluster: &LocalCluster, region: &str, outcome: &str) -> anyhow::Result<f64> {
    let proxy = cluster.proxy(region)?;
    probe::proxy_metric(
        &proxy.admin_addr,
        &format!("cache_lookups_total{{outcome=\"{outcome}\"}}"),
    )
    .await
}

/// Cache entry and tag keys of `cluster` in a region's Redis, by epoch.
async fn cache_epochs(cluster: &LocalCluster, region: &str) -> anyhow::Result<Vec<u64>> {
    let url = cluster.redis_url(region)?;
    let mut r = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let pattern = meridian_shared::cache_keys::all_epochs_pattern(&cluster.spec.cluster);
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut r).await?;
    let mut epochs: Vec<u64> = keys
        .iter()
        .filter_map(|k| meridian_shared::cache_keys::epoch_of_key(&cluster.spec.cluster, k))
        .map(|e| e.0)
        .collect();
    epochs.sort_unstable();
    epochs.dedup();
    Ok(epochs)
}

async fn update(cluster: &LocalCluster, region: &str, v: i64) -> anyhow::Result<()> {
    let c = connect(&cluster.proxy(region)?.dsn()).await?;
    c.execute("UPDATE items SET v = $1 WHERE k = 1", &[&v])
        .await
        .with_context(|| format!("update to {v} through {region}"))?;
    Ok(())
}

async fn scenario(cluster: &mut LocalCluster) -> anyhow::Result<()> {
    let setup = connect(&cluster.proxy("us-east")?.dsn()).await?;
    setup
        .batch_execute(
            "CREATE TABLE items (k int PRIMARY KEY, v bigint NOT NULL); \
             INSERT INTO items VALUES (1, 0)",
        )
        .await?;
    let readers = Readers::start(cluster)?;
    readers.wait_all(0, Duration::from_secs(30)).await?;
    // Every region caches the row before the updates start.
    for region in REGIONS {
        eventually(
            Duration::from_secs(30),
            &format!("hits in {region}"),
            || async {
                anyhow::ensure!(lookups(cluster, region, "hit").await? > 0.0);
                Ok(())
            },
        )
        .await?;
    }

    // (c) Updates through every region in turn; every region follows them in order.
    // An invalidation unlinks the entry (the next lookup misses), or finds a lookup
    // of an entry filled before the replica replayed the change (stale): with the
    // QUIC fan-out as slow as the WAN, mostly the former.
    let invalidated = || async {
        let mut n = 0.0;
        for region in REGIONS {
            n +=
                lookups(cluster, region, "miss").await? + lookups(cluster, region, "stale").await?;
        }
        anyhow::Ok(n)
    };
    let before = invalidated().await?;
    let mut v = 0;
    for i in 0..24 {
        v += 1;
        update(cluster, REGIONS[i % REGIONS.len()], v).await?;
        // Pacing between commits, so that readers see intermediate values.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    readers.wait_all(v, Duration::from_secs(15)).await?;
    assert!(
        invalidated().await? > before,
        "no cached entry was ever invalidated"
    );

    // (d) us-west's Redis stops: its reads go on, uncached, and follow the updates.
    cluster.stop_redis("us-west").await?;
    for _ in 0..3 {
        v += 1;
        update(cluster, "eu-west", v).await?;
    }
    readers.wait_all(v, Duration::from_secs(15)).await?;
    cluster.start_redis("us-west").await?;
    let hits = lookups(cluster, "us-west", "hit").await?;
    eventually(
        Duration::from_secs(60),
        "us-west caches again once its Redis is back",
        || async {
            anyhow::ensure!(lookups(cluster, "us-west", "hit").await? > hits);
            Ok(())
        },
    )
    .await?;

    // (f) The control plane freezes: invalidations stop reaching every region. Without the
    // freshness lease every region would keep serving the entry of the old value (its TTL is
    // 120 s); with it, each region stops serving within the agents' --cache-lease (2 s) and the
    // readers follow the update from their replicas.
    let mut lagging = BTreeMap::new();
    for region in REGIONS {
        lagging.insert(region, lookups(cluster, region, "lagging").await?);
    }
    cluster.pause_coordinators();
    v += 1;
    let frozen = async {
        update(cluster, "us-west", v).await?;
        readers.wait_all(v, Duration::from_secs(20)).await?;
        for region in REGIONS {
            let now = lookups(cluster, region, "lagging").await?;
            anyhow::ensure!(
                now > lagging[region],
                "{region} counted no lagging lookup while the coordinators were frozen"
            );
        }
        anyhow::Ok(())
    }
    .await;
    cluster.resume_coordinators();
    frozen.context("with the coordinators frozen")?;
    for region in REGIONS {
        let hits = lookups(cluster, region, "hit").await?;
        eventually(
            Duration::from_secs(60),
            &format!("{region} serves cached reads again once the coordinators are back"),
            || async {
                anyhow::ensure!(lookups(cluster, region, "hit").await? > hits);
                Ok(())
            },
        )
        .await?;
    }

    // (e) Failover: the writes stopped and every replica has replayed them (nothing to lose),
    // then the primary is killed. Every region's Redis drops the old epoch's entries and the
    // cache fills again under the new epoch.
    let old = cluster.leader().await?.context("no leader")?;
    for region in REGIONS {
        let epochs = cache_epochs(cluster, region).await?;
        assert!(
            epochs.contains(&old.epoch.0),
            "{region} has no entry of epoch {}: {epochs:?}",
            old.epoch.0
        );
    }
    cluster.kill_postmaster(&old.node)?;
    let new = cluster
        .wait_leader(Duration::from_secs(30), "a new serving leader", |l| {
            l.is_serving() && l.epoch > old.epoch
        })
        .await?;
    for region in REGIONS {
        eventually(
            Duration::from_secs(30),
            &format!("{region} flushed epochs before {}", new.epoch.0),
            || async {
                let epochs = cache_epochs(cluster, region).await?;
                anyhow::ensure!(
                    epochs.iter().all(|e| *e >= new.epoch.0),
                    "epochs {epochs:?}"
                );
                Ok(())
            },
        )
        .await?;
    }
    v += 1;
    let writer_region = REGIONS
        .iter()
        .find(|r| **r != old.region)
        .copied()
        .unwrap_or("us-west");
    eventually(
        Duration::from_secs(30),
        "an update after the failover",
        || update(cluster, writer_region, v),
    )
    .await?;
    readers.wait_all(v, Duration::from_secs(30)).await?;
    eventually(
        Duration::from_secs(30),
        "entries of the new epoch",
        || async {
            let epochs = cache_epochs(cluster, writer_region).await?;
            anyhow::ensure!(epochs.contains(&new.epoch.0), "epochs {epochs:?}");
            Ok(())
        },
    )
    .await?;
    readers.assert_in_order();
    readers.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_invalidation_redis_loss_and_failover_across_regions() {
    meridian_shared::telemetry::init();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(dir.path(), &REGIONS);
    spec.wan_delays = WanDelays::none()
        .with("us-east", "us-west", Duration::from_millis(20))
        .with("us-east", "eu-west", Duration::from_millis(30))
        .with("us-west", "eu-west", Duration::from_millis(40));
    let mut cluster = LocalCluster::start(spec).await.unwrap();
    let result = scenario(&mut cluster).await;
    if let Err(e) = &result {
        eprintln!("{e:#}\n{}", cluster.log_tails(40));
    }
    cluster.stop().await;
    result.unwrap();
}
