//! End-to-end test of invalidation in the `meridian-agent` binary (issue 4),
//! with real etcd, PostgreSQL 15, redis-server and a tiny in-test QUIC
//! coordinator (the harness of `agent_daemon.rs`).
//!
//! Scenario: node1 bootstraps as primary with `--redis`; a committed INSERT
//! arrives at the coordinator as `Changes` naming its table; the logical slot is
//! not confirmed past it until the coordinator's `Ack { batch_id }`, then it is;
//! `Invalidate` raises the table's watermark in Redis and deletes the tagged
//! entries; `FlushCache` drops older epochs; without `--redis` (node2's agent is
//! not needed: the unit tests cover it) nothing else changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start(dir: &Path) -> RedisServer {
        let port = free_port();
        let log = std::fs::File::create(dir.join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        RedisServer { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn confirmed_flush(port: u16) -> Option<Lsn> {
    let c = pg(port).await?;
    let row = c
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'meridian_inval'",
            &[],
        )
        .await
        .ok()??;
    row.get::<_, Option<String>>(0)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_agent_streams_changes_and_applies_invalidations_to_redis() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pki_dir = dir.path().join("pki");
    pki::write_dev_pki(&pki_dir, &["coord", "node1"]).unwrap();
    let (_etcd_proc, etcd_url) = start_etcd(dir.path()).await;
    let redis_server = RedisServer::start(dir.path());
    let keys = Keys::new(CLUSTER);
    let mut etcd = etcd_client::Client::connect([etcd_url.clone()], None)
        .await
        .unwrap();
    let mut coord = FakeCoordinator::start(&pki_dir, &mut etcd, &keys).await;
    let env = Env {
        dir,
        etcd_url,
        pki_dir,
    };

    let redis_url = redis_server.url();
    let (_agent1, port1, _data1, _http1) =
        env.agent("node1", "region-node1", true, Some(&redis_url));
    eventually("members/node1 as primary", Duration::from_secs(60), || {
        let mut etcd = etcd.clone();
        let keys = keys.clone();
        async move {
            member(&mut etcd, &keys, "node1")
                .await
                .filter(|(m, _)| m.role == Role::Primary)
        }
    })
    .await;
    coord
        .wait_heartbeat(
            "node1",
            "primary heartbeat",
            Duration::from_secs(30),
            |hb| hb.pg_up && hb.role == Role::Primary,
        )
        .await;
    put_leader(&mut etcd, &keys, "node1", port1, 1, 1).await;
    let promoted = coord
        .command(
            "node1",
            |id| CoordMsg::Promote {
                id,
                epoch: Epoch(1),
                old_fenced: true,
            },
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(promoted, AckResult::Ok);

    // The agent creates the slot once it streams; a committed INSERT becomes a batch.
    eventually("the invalidation slot", Duration::from_secs(30), || async {
        confirmed_flush(port1).await
    })
    .await;
    let c = pg(port1).await.expect("postgres up");
    c.batch_execute("CREATE TABLE public.t (id int primary key); INSERT INTO public.t VALUES (1)")
        .await
        .unwrap();
    let state = coord.state.clone();
    let (from, batch_id, tables, lsn) =
        eventually("Changes naming public.t", Duration::from_secs(15), || {
            let found = state
                .lock()
                .unwrap()
                .changes
                .iter()
                .find(|(_, _, t, _)| t.iter().any(|x| x == "public.t"))
                .cloned();
            async move { found }
        })
        .await;
    assert_eq!(from, "node1");
    assert_eq!(tables, vec!["public.t".to_owned()]);
    let before_ack = confirmed_flush(port1).await.unwrap();
    assert!(
        before_ack < lsn,
        "confirmed {before_ack} before the ack of {lsn}"
    );

    coord.send("node1", CoordMsg::Ack { batch_id });
    let confirmed = eventually(
        "the slot confirmed after the ack",
        Duration::from_secs(15),
        || async { confirmed_flush(port1).await.filter(|l| *l >= lsn) },
    )
    .await;
    assert!(confirmed >= lsn);

    // The heartbeat carries the invalidation horizon once the ack is in; relayed back (what
    // the coordinator does for every agent) it gives the region its freshness lease, which
    // lives no longer than --cache-lease (2 s) unless renewed.
    let hb = coord
        .wait_heartbeat(
            "node1",
            "the horizon past the acked batch",
            Duration::from_secs(15),
            |hb| hb.invalidated_lsn.is_some_and(|h| h >= lsn),
        )
        .await;
    let horizon = hb.invalidated_lsn.unwrap();
    let fresh = meridian_shared::cache_keys::fresh_key(CLUSTER, Epoch(1));
    let mut lease = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let pttl = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("PTTL").arg(&fresh).query(conn).unwrap()
    };
    assert_eq!(pttl(&mut lease), -2, "no lease before a horizon is heard");
    coord.send(
        "node1",
        CoordMsg::Horizon {
            lsn: horizon,
            epoch: Epoch(1),
        },
    );
    eventually("the freshness lease", Duration::from_secs(10), || {
        let ttl = pttl(&mut lease);
        async move { (1..=2000).contains(&ttl).then_some(ttl) }
    })
    .await;
    // A change whose batch is never acked: the node moves past the horizon, the lease is
    // not renewed and runs out.
    c.batch_execute("INSERT INTO public.t VALUES (2)")
        .await
        .unwrap();
    eventually("the lease to run out", Duration::from_secs(10), || {
        let gone = pttl(&mut lease) == -2;
        async move { gone.then_some(()) }
    })
    .await;

    // Invalidate: the watermark rises and the tagged entries go.
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let mut r = redis.get_connection().unwrap();
    let entry = meridian_shared::cache_keys::entry_key(CLUSTER, Epoch(1), "q1");
    let tag = meridian_shared::cache_keys::tag_key(CLUSTER, Epoch(1), "public.t");
    redis::cmd("SET")
        .arg(&entry)
        .arg("rows")
        .query::<()>(&mut r)
        .unwrap();
    redis::cmd("SADD")
        .arg(&tag)
        .arg(&entry)
        .query::<()>(&mut r)
        .unwrap();
    let ack = coord
        .command(
            "node1",
            |id| CoordMsg::Invalidate {
                id,
                tables: tables.clone(),
                lsn,
                epoch: Epoch(1),
            },
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(ack, AckResult::Ok);
    let wm: String = redis::cmd("GET")
        .arg(meridian_shared::cache_keys::watermark_key(
            CLUSTER, "public.t",
        ))
        .query(&mut r)
        .unwrap();
    assert_eq!(wm, lsn.0.to_string());
    let exists: bool = redis::cmd("EXISTS").arg(&entry).query(&mut r).unwrap();
    assert!(!exists, "the tagged entry is deleted");

    // FlushCache drops an older epoch's entries.
    let old = meridian_shared::cache_keys::entry_key(CLUSTER, Epoch(0), "q0");
    redis::cmd("SET")
        .arg(&old)
        .arg("rows")
        .query::<()>(&mut r)
        .unwrap();
    let ack = coord
        .command(
            "node1",
            |id| CoordMsg::FlushCache {
                id,
                epoch: Epoch(1),
            },
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(ack, AckResult::Ok);
    let exists: bool = redis::cmd("EXISTS").arg(&old).query(&mut r).unwrap();
    assert!(!exists, "the older epoch's entry is flushed");
}
