#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End-to-end tests of the control path (issue 3): a real three-region cluster
//! from the launcher (etcd, two coordinators, three agents running real
//! PostgreSQL with streaming replication, three pgproxies), driven with real
//! clients while processes are killed and nodes are cut off.
//!
//! Each scenario asserts its outcome with deadlines; on failure the logs of
//! every process are printed. The programs must be built first
//! (`cargo build --workspace --bins`; `integration/run-tests.sh` does it).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_integration::eventually;
use meridian_launcher::{connect, ClusterSpec, LocalCluster};
use meridian_shared::records::{ClusterConfig, SyncMode};

const REGIONS: [&str; 3] = ["us-east", "us-west", "eu-west"];
const PRIMARY: &str = "us-east-1";

async fn start(config: Option<ClusterConfig>) -> (tempfile::TempDir, LocalCluster) {
    meridian_shared::telemetry::init();
    let dir = tempfile::Builder::new()
        .prefix("meridian-local-")
        .tempdir()
        .unwrap();
    let mut spec = ClusterSpec::new(dir.path(), &REGIONS);
    spec.config = config;
    match LocalCluster::start(spec).await {
        Ok(c) => (dir, c),
        Err(e) => panic!("the local cluster did not start: {e:?}"),
    }
}

/// Stops the cluster; on a failed scenario prints every log and panics.
async fn finish(mut cluster: LocalCluster, result: anyhow::Result<()>) {
    if let Err(e) = &result {
        eprintln!("{}", cluster.log_tails(60));
        cluster.stop().await;
        panic!("{e:?}");
    }
    cluster.stop().await;
}

/// Inserts rows with increasing ids through one DSN as fast as it can (or every
/// `pause`), reconnecting after errors; remembers acknowledged ids and errors.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    errors: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn spawn(dsn: String, table: &'static str, first_id: i64, pause: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (s, a, e) = (stop.clone(), acked.clone(), errors.clone());
        let task = tokio::spawn(async move {
            let mut id = first_id;
            let mut client = None;
            while !s.load(Ordering::SeqCst) {
                if client.is_none() {
                    match connect(&dsn).await {
                        Ok(c) => client = Some(c),
                        Err(err) => {
                            e.lock().unwrap().push(format!("connect: {err:#}"));
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                }
                let c = client.as_ref().unwrap();
                let sql = format!("INSERT INTO {table} (id) VALUES ({id})");
                match c.simple_query(&sql).await {
                    Ok(_) => a.lock().unwrap().push(id),
                    Err(err) => {
                        e.lock().unwrap().push(format!("insert {id}: {err}"));
                        client = None;
                    }
                }
                id += 1;
                tokio::time::sleep(pause).await;
            }
        });
        Writer {
            stop,
            acked,
            errors,
            task,
        }
    }

    async fn stop(self) -> (Vec<i64>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        let acked = self.acked.lock().unwrap().clone();
        let errors = self.errors.lock().unwrap().clone();
        (acked, errors)
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
}

async fn exec(dsn: &str, sql: &str) -> anyhow::Result<()> {
    connect(dsn).await?.batch_execute(sql).await?;
    Ok(())
}

/// Ids present in `table` on the node (direct connection).
async fn ids_on(cluster: &LocalCluster, node: &str, table: &str) -> anyhow::Result<BTreeSet<i64>> {
    let c = connect(&cluster.node(node)?.direct_dsn("app")).await?;
    let rows = c.query(&format!("SELECT id FROM {table}"), &[]).await?;
    Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
}

async fn timeline_of(cluster: &LocalCluster, node: &str) -> anyhow::Result<(bool, u32)> {
    let c = connect(&cluster.node(node)?.direct_dsn("postgres")).await?;
    let row = c
        .query_one(
            "SELECT pg_is_in_recovery(), \
             COALESCE((SELECT received_tli FROM pg_stat_wal_receiver WHERE status = 'streaming'), \
                      (SELECT timeline_id FROM pg_control_checkpoint()))",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get::<_, i32>(1) as u32))
}

/// `meridianctl status --json`, parsed.
async fn status_json(cluster: &LocalCluster) -> anyhow::Result<serde_json::Value> {
    let out = cluster.meridianctl(&["status", "--json"]).await?;
    Ok(serde_json::from_str(&out)?)
}

fn node_role(status: &serde_json::Value, node: &str) -> Option<String> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["role"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn kill9_of_the_primary_fails_over_and_the_old_primary_rejoins() {
    let (_dir, cluster) = start(None).await;
    let result = async {
        let west = cluster.proxy("eu-west")?.dsn();
        exec(&west, "CREATE TABLE t1 (id bigint PRIMARY KEY)").await?;
        exec(&west, "INSERT INTO t1 VALUES (0)").await?;
        let before = cluster.leader().await?.expect("a leader");
        assert_eq!(before.node, PRIMARY);

        let client = connect(&west).await?;
        let killed_at = Instant::now();
        cluster.kill_postmaster(PRIMARY)?;

        let after = cluster
            .wait_leader(Duration::from_secs(30), "a new serving leader", |l| {
                l.node != PRIMARY && l.is_serving() && l.epoch > before.epoch
            })
            .await?;
        // A write through another region's proxy succeeds again (the session
        // opened before the kill may be cut off once; a retry must work).
        let mut id = 1i64;
        eventually(Duration::from_secs(20), "a write through eu-west", || {
            id += 1;
            let client = &client;
            let west = west.clone();
            async move {
                let sql = format!("INSERT INTO t1 VALUES ({id})");
                if client.simple_query(&sql).await.is_err() {
                    connect(&west).await?.simple_query(&sql).await?;
                }
                Ok(())
            }
        })
        .await?;
        eprintln!(
            "failover: new leader {} (epoch {}, timeline {}), first write {:?} after the kill",
            after.node,
            after.epoch,
            after.timeline,
            killed_at.elapsed()
        );

        // The old primary rejoins as a replica of the new timeline.
        cluster
            .wait_streaming(PRIMARY, Duration::from_secs(60))
            .await?;
        let (in_recovery, tli) = timeline_of(&cluster, PRIMARY).await?;
        assert!(in_recovery, "{PRIMARY} is not a standby");
        let leader_tli = timeline_of(&cluster, &after.node).await?.1;
        assert_eq!(tli, leader_tli, "{PRIMARY} follows another timeline");
        eventually(
            Duration::from_secs(20),
            "status to show the rejoin",
            || async {
                let s = status_json(&cluster).await?;
                anyhow::ensure!(s["leader"] == after.node.as_str(), "{s}");
                anyhow::ensure!(node_role(&s, PRIMARY).as_deref() == Some("replica"), "{s}");
                Ok(())
            },
        )
        .await?;
        // And it replicates what the new primary takes.
        exec(&west, "INSERT INTO t1 VALUES (1000)").await?;
        eventually(
            Duration::from_secs(20),
            "row 1000 on the old primary",
            || async {
                anyhow::ensure!(ids_on(&cluster, PRIMARY, "t1").await?.contains(&1000));
                Ok(())
            },
        )
        .await?;
        Ok(())
    }
    .await;
    finish(cluster, result).await;
}

#[tokio::test]
async fn kill9_of_the_primary_agent_alone_causes_no_failover() {
    let (_dir, mut cluster) = start(None).await;
    let result = async {
        let east = cluster.proxy("us-east")?.dsn();
        exec(&east, "CREATE TABLE t2 (id bigint PRIMARY KEY)").await?;
        let before = cluster.leader().await?.expect("a leader");
        cluster.kill_agent(PRIMARY).await?;
        let writer = Writer::spawn(
            cluster.proxy("us-west")?.dsn(),
            "t2",
            1,
            Duration::from_millis(20),
        );
        // Observing a non-event needs a window: longer than the suspicion time
        // (500 ms) plus the agent's lease TTL (5 s in the launcher) plus a margin.
        let window = Instant::now() + Duration::from_secs(7);
        while Instant::now() < window {
            let now = cluster.leader().await?.expect("a leader");
            assert_eq!(
                (now.node.as_str(), now.epoch, now.is_serving()),
                (PRIMARY, before.epoch, true),
                "the leader changed after only the agent died"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (acked, errors) = writer.stop().await;
        assert!(errors.is_empty(), "writes failed: {errors:?}");
        assert!(acked.len() > 50, "only {} writes in 7 s", acked.len());
        // The agent comes back and adopts the running postmaster.
        let pid = cluster.node(PRIMARY)?.postmaster_pid();
        cluster.start_agent(PRIMARY)?;
        eventually(
            Duration::from_secs(15),
            "the agent's member key",
            || async {
                let mut c = cluster.etcd_client().await?;
                let r = c.get(cluster.keys.member(PRIMARY), None).await?;
                anyhow::ensure!(!r.kvs().is_empty());
                Ok(())
            },
        )
        .await?;
        assert_eq!(
            cluster.node(PRIMARY)?.postmaster_pid(),
            pid,
            "postmaster restarted"
        );
        Ok(())
    }
    .await;
    finish(cluster, result).await;
}

#[tokio::test]
async fn a_partitioned_primary_stops_taking_writes_before_another_node_does() {
    let (_dir, cluster) = start(None).await;
    let result = async {
        let east = cluster.proxy("us-east")?.dsn();
        exec(&east, "CREATE TABLE t3 (id bigint PRIMARY KEY, node text)").await?;
        for n in cluster.nodes.iter().skip(1) {
            cluster.wait_streaming(&n.name, Duration::from_secs(20)).await?;
        }
        let before = cluster.leader().await?.expect("a leader");
        // One writer per node, straight to its real port (bypassing the cut
        // link): records the instant each node acknowledged a write.
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let spans: Arc<Mutex<Vec<(String, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
        let next_id = Arc::new(AtomicU64::new(1));
        for n in &cluster.nodes {
            let dsn = n.direct_dsn("app");
            let name = n.name.clone();
            let (stop, spans, next_id) = (stop.clone(), spans.clone(), next_id.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(c) = connect(&dsn).await {
                        while !stop.load(Ordering::SeqCst) {
                            let id = next_id.fetch_add(1, Ordering::SeqCst);
                            let sql = format!("INSERT INTO t3 VALUES ({id}, '{name}')");
                            match c.simple_query(&sql).await {
                                Ok(_) => spans.lock().unwrap().push((name.clone(), Instant::now())),
                                Err(e) if e.is_closed() => break,
                                Err(_) => {}
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        eventually(Duration::from_secs(10), "writes on the primary", || async {
            anyhow::ensure!(spans.lock().unwrap().iter().any(|(n, _)| n == PRIMARY));
            Ok(())
        })
        .await?;

        cluster.node(PRIMARY)?.partition();
        let after = cluster
            .wait_leader(Duration::from_secs(40), "a new serving leader", |l| {
                l.node != PRIMARY && l.is_serving() && l.epoch > before.epoch
            })
            .await?;
        eventually(Duration::from_secs(20), "a write on the new primary", || async {
            anyhow::ensure!(spans.lock().unwrap().iter().any(|(n, _)| *n == after.node));
            Ok(())
        })
        .await?;
        // Keep hammering a little after the promotion: the old one must stay fenced.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            let _ = t.await;
        }
        let spans = spans.lock().unwrap().clone();
        let last_old = spans
            .iter()
            .filter(|(n, _)| n == PRIMARY)
            .map(|(_, t)| *t)
            .max()
            .expect("the old primary took writes before the cut");
        let first_new = spans
            .iter()
            .filter(|(n, _)| n != PRIMARY)
            .map(|(_, t)| *t)
            .min()
            .expect("the new primary took writes");
        assert!(
            last_old < first_new,
            "two writable primaries: the old one acknowledged a write {:?} after the new one's first",
            last_old - first_new
        );
        let writers: BTreeSet<&str> = spans
            .iter()
            .filter(|(n, _)| n != PRIMARY)
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(writers.len(), 1, "several new primaries took writes: {writers:?}");

        // Healing the partition: the old primary rejoins as a replica.
        cluster.node(PRIMARY)?.heal();
        cluster.wait_streaming(PRIMARY, Duration::from_secs(60)).await?;
        Ok(())
    }
    .await;
    finish(cluster, result).await;
}

#[tokio::test]
async fn the_standby_coordinator_takes_over_in_steady_state_and_mid_failover() {
    let (_dir, mut cluster) = start(None).await;
    let result = async {
        let west = cluster.proxy("us-west")?.dsn();
        exec(&west, "CREATE TABLE t4 (id bigint PRIMARY KEY)").await?;

        // Steady state: kill the active coordinator; the other one takes over.
        let first = cluster.active_coordinator().await?;
        cluster.kill_coordinator(&first.name).await?;
        let second = eventually(
            Duration::from_secs(15),
            "a new active coordinator",
            || async {
                let c = cluster.active_coordinator().await?;
                anyhow::ensure!(c.name != first.name, "still {}", c.name);
                Ok(c)
            },
        )
        .await?;
        let before = cluster.leader().await?.expect("a leader");
        assert_eq!((before.node.as_str(), before.is_serving()), (PRIMARY, true));

        // Mid-failover: the primary's agent and postmaster die, so fencing waits
        // for the agent's lease to expire (seconds); the coordinator is killed
        // while the leader record says failing_over. Restart the first one so a
        // standby exists.
        cluster.restart_coordinator(&first.name)?;
        cluster.kill_agent(PRIMARY).await?;
        cluster.kill_postmaster(PRIMARY)?;
        cluster
            .wait_leader(Duration::from_secs(20), "failing_over", |l| {
                !l.is_serving() && l.epoch > before.epoch
            })
            .await?;
        cluster.kill_coordinator(&second.name).await?;
        let after = cluster
            .wait_leader(Duration::from_secs(40), "a new serving leader", |l| {
                l.node != PRIMARY && l.is_serving() && l.epoch > before.epoch
            })
            .await?;
        let third = cluster.active_coordinator().await?;
        assert_eq!(
            third.name, first.name,
            "the restarted coordinator did not take over"
        );
        eventually(
            Duration::from_secs(20),
            "a write through us-west",
            || async { exec(&west, "INSERT INTO t4 VALUES (1) ON CONFLICT DO NOTHING").await },
        )
        .await?;
        // Every other replica follows the new leader.
        for n in &cluster.nodes {
            if n.name != PRIMARY && n.name != after.node {
                cluster
                    .wait_streaming(&n.name, Duration::from_secs(30))
                    .await?;
            }
        }
        Ok(())
    }
    .await;
    finish(cluster, result).await;
}

#[tokio::test]
async fn a_switchover_under_load_loses_nothing_and_fails_no_new_transaction() {
    let (_dir, cluster) = start(None).await;
    let result = async {
        exec(
            &cluster.proxy("us-east")?.dsn(),
            "CREATE TABLE t5 (id bigint PRIMARY KEY)",
        )
        .await?;
        let writers: Vec<Writer> = REGIONS
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Writer::spawn(
                    cluster.proxy(r).unwrap().dsn(),
                    "t5",
                    (i as i64 + 1) * 1_000_000,
                    Duration::from_millis(5),
                )
            })
            .collect();
        eventually(
            Duration::from_secs(10),
            "writes in every region",
            || async {
                anyhow::ensure!(writers.iter().all(|w| w.acked_count() > 10));
                Ok(())
            },
        )
        .await?;
        let before = cluster.leader().await?.expect("a leader");
        cluster
            .meridianctl(&["switchover", "--to", "us-west-1"])
            .await?;
        cluster
            .wait_leader(Duration::from_secs(30), "us-west-1 serving", |l| {
                l.node == "us-west-1" && l.is_serving() && l.epoch > before.epoch
            })
            .await?;
        let counts: Vec<usize> = writers.iter().map(Writer::acked_count).collect();
        eventually(
            Duration::from_secs(10),
            "writes after the switchover",
            || async {
                anyhow::ensure!(writers
                    .iter()
                    .zip(&counts)
                    .all(|(w, c)| w.acked_count() > c + 10));
                Ok(())
            },
        )
        .await?;
        let mut acked = BTreeSet::new();
        for w in writers {
            let (ids, errors) = w.stop().await;
            assert!(
                errors.is_empty(),
                "client errors during the switchover: {errors:?}"
            );
            acked.extend(ids);
        }
        let present = ids_on(&cluster, "us-west-1", "t5").await?;
        let lost: Vec<&i64> = acked.difference(&present).collect();
        assert!(
            lost.is_empty(),
            "{} acknowledged commits lost: {lost:?}",
            lost.len()
        );
        cluster
            .wait_streaming(PRIMARY, Duration::from_secs(60))
            .await?;
        Ok(())
    }
    .await;
    finish(cluster, result).await;
}

#[tokio::test]
async fn synchronous_mode_loses_no_acknowledged_commit_on_kill9() {
    let config = ClusterConfig {
        sync_mode: SyncMode::On,
        ..ClusterConfig::default()
    };
    let (_dir, cluster) = start(Some(config)).await;
    let result = async {
        exec(
            &cluster.proxy("us-east")?.dsn(),
            "CREATE TABLE t6 (id bigint PRIMARY KEY)",
        )
        .await?;
        // Synchronous replication is in force before the load starts.
        let primary = cluster.node(PRIMARY)?.direct_dsn("postgres");
        eventually(
            Duration::from_secs(20),
            "synchronous_standby_names",
            || async {
                let c = connect(&primary).await?;
                let v: String = c
                    .query_one("SELECT current_setting('synchronous_standby_names')", &[])
                    .await?
                    .get(0);
                anyhow::ensure!(!v.is_empty(), "empty");
                Ok(())
            },
        )
        .await?;
        let writers: Vec<Writer> = REGIONS
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Writer::spawn(
                    cluster.proxy(r).unwrap().dsn(),
                    "t6",
                    (i as i64 + 1) * 1_000_000,
                    Duration::from_millis(2),
                )
            })
            .collect();
        eventually(
            Duration::from_secs(10),
            "writes in every region",
            || async {
                anyhow::ensure!(writers.iter().all(|w| w.acked_count() > 10));
                Ok(())
            },
        )
        .await?;
        let before = cluster.leader().await?.expect("a leader");
        cluster.kill_postmaster(PRIMARY)?;
        let after = cluster
            .wait_leader(Duration::from_secs(30), "a new serving leader", |l| {
                l.node != PRIMARY && l.is_serving() && l.epoch > before.epoch
            })
            .await?;
        let counts: Vec<usize> = writers.iter().map(Writer::acked_count).collect();
        eventually(
            Duration::from_secs(20),
            "writes after the failover",
            || async {
                anyhow::ensure!(writers
                    .iter()
                    .zip(&counts)
                    .all(|(w, c)| w.acked_count() > c + 5));
                Ok(())
            },
        )
        .await?;
        let mut acked = BTreeSet::new();
        for w in writers {
            acked.extend(w.stop().await.0);
        }
        let present = ids_on(&cluster, &after.node, "t6").await?;
        let lost: Vec<&i64> = acked.difference(&present).collect();
        assert!(
            lost.is_empty(),
            "{} acknowledged commits lost: {lost:?}",
            lost.len()
        );
        Ok(())
    }
    .await;
    finish(cluster, result).await;
}
