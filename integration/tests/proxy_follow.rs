#![allow(clippy::unwrap_used, clippy::expect_used)]
//! meridian-pgproxy following the leader in a real etcd, in front of a real
//! PostgreSQL primary and streaming replica. The test itself writes the
//! `leader` and `members/` records the coordinator and the agents would write,
//! and plays the agent's part on the nodes (`meridian.epoch`, promotion).

mod common;

use std::time::{Duration, Instant};

use common::Proxy;
use meridian_integration::etcd::EtcdServer;
use meridian_integration::{eventually, PgCluster, PgNode, StopMode};
use meridian_pgproxy::etcd_client::Client as EtcdClient;
use meridian_pgproxy::topology::LeaderView;
use meridian_shared::config::{AuthMethod, ProxyConfig};
use meridian_shared::epoch::Epoch;
use meridian_shared::keys::Keys;
use meridian_shared::records::{
    self, LeaderRecord, LeaderState, MemberRecord, MemberTags, NodeRef, ProxyRecord, Role,
};

fn proxy_config(etcd: &EtcdServer, cluster: &str, hold: Duration) -> ProxyConfig {
    let mut cfg = ProxyConfig {
        auth: AuthMethod::Trust,
        region: "eu".into(),
        ..Default::default()
    };
    cfg.etcd.endpoints = etcd.endpoints();
    cfg.etcd.cluster = cluster.into();
    cfg.etcd.proxy_id = Some(format!("{cluster}-proxy"));
    cfg.etcd.failover_hold = hold;
    cfg.etcd.replica_poll_interval = Duration::from_millis(100);
    cfg.pool.connect_timeout = Duration::from_secs(1);
    cfg
}

fn addr(node: &PgNode) -> String {
    format!("127.0.0.1:{}", node.port())
}

fn leader(node: &str, n: &PgNode, epoch: u64, state: LeaderState) -> LeaderRecord {
    LeaderRecord {
        node: node.into(),
        region: "eu".into(),
        pg_addr: addr(n),
        epoch: Epoch(epoch),
        timeline: 1,
        state,
        since: 0,
        candidate: None,
    }
}

async fn put_leader(etcd: &mut EtcdClient, keys: &Keys, l: &LeaderRecord) {
    etcd.put(keys.leader(), records::encode("leader", l).unwrap(), None)
        .await
        .unwrap();
}

async fn put_member(etcd: &mut EtcdClient, keys: &Keys, name: &str, n: &PgNode, role: Role) {
    let m = MemberRecord {
        region: "eu".into(),
        pg_addr: addr(n),
        agent_addr: "127.0.0.1:1".into(),
        role,
        tags: MemberTags::default(),
        version: None,
        pg_addrs: Default::default(),
    };
    etcd.put(
        keys.member(name),
        records::encode("member", &m).unwrap(),
        None,
    )
    .await
    .unwrap();
}

/// Plays the agent: records `epoch` in the node (`ALTER SYSTEM` + reload) and
/// waits until new sessions see it.
async fn set_node_epoch(node: &PgNode, epoch: u64) {
    let c = node.client().await.unwrap();
    // PostgreSQL 15 lets ALTER SYSTEM set a custom parameter only once the
    // session knows it (a placeholder), hence the SET first.
    c.batch_execute(&format!("SET meridian.epoch = '{epoch}'"))
        .await
        .unwrap();
    c.batch_execute(&format!("ALTER SYSTEM SET meridian.epoch = '{epoch}'"))
        .await
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    eventually(
        Duration::from_secs(10),
        "meridian.epoch to apply",
        || async {
            let c = node.client().await?;
            let v: Option<String> = c
                .query_one("SELECT current_setting('meridian.epoch', true)", &[])
                .await?
                .get(0);
            anyhow::ensure!(v.as_deref() == Some(&*epoch.to_string()), "epoch is {v:?}");
            Ok(())
        },
    )
    .await
    .unwrap();
}

/// Waits until a read through `c` runs on a replica (a replica whose health
/// poll was slow on a loaded host takes no reads until the next good poll).
async fn reads_reach_the_replica(c: &tokio_postgres::Client, replica: &PgNode) {
    eventually(
        Duration::from_secs(10),
        "a read to run on the replica",
        || async {
            let row = c
                .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
                .await?;
            let (on, port): (bool, i32) = (row.get(0), row.get(1));
            anyhow::ensure!(on, "the read ran on the primary");
            anyhow::ensure!(port as u16 == replica.port(), "the read ran on port {port}");
            Ok(())
        },
    )
    .await
    .unwrap();
}

async fn http_get(port: u16, path: &str) -> String {
    meridian_integration::probe::http_get(&format!("127.0.0.1:{port}"), path)
        .await
        .unwrap()
}

/// The value of an unlabelled metric in the exposition text.
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_leader_fences_a_wrong_epoch_and_registers_itself() {
    let (cluster, etcd) = tokio::join!(
        PgCluster::builder().replicas(1).start(),
        EtcdServer::start()
    );
    let (cluster, etcd) = (cluster.unwrap(), etcd.unwrap());
    let primary = cluster.primary();
    let replica = &cluster.replicas()[0];
    set_node_epoch(primary, 1).await;

    let keys = Keys::new("follow1");
    let mut ec = etcd.client().await.unwrap();
    put_member(&mut ec, &keys, "n0", primary, Role::Primary).await;
    put_member(&mut ec, &keys, "n1", replica, Role::Replica).await;
    put_leader(
        &mut ec,
        &keys,
        &leader("n0", primary, 1, LeaderState::Serving),
    )
    .await;

    let proxy =
        Proxy::start_following(proxy_config(&etcd, "follow1", Duration::from_secs(1))).await;

    // (d) The proxy registers itself on its lease.
    let rec = eventually(Duration::from_secs(10), "proxies/<id>", || {
        let mut ec = ec.clone();
        let key = keys.proxy("follow1-proxy");
        async move {
            let r = ec.get(key, None).await?;
            let kv = r.kvs().first().ok_or_else(|| anyhow::anyhow!("no key"))?;
            anyhow::ensure!(kv.lease() != 0, "not on a lease");
            Ok(records::decode::<ProxyRecord>("proxy", kv.value())?)
        }
    })
    .await
    .unwrap();
    assert_eq!(rec.listen_addr, format!("127.0.0.1:{}", proxy.port));
    assert_eq!(rec.region, "eu");

    // (a) Writes go to the leader, reads to the healthy replica.
    proxy
        .wait_topology("a serving primary and a usable replica", |t| {
            t.state == LeaderView::Serving && t.epoch == 1 && t.has_usable_replica()
        })
        .await;
    let c = proxy.connect("postgres", "").await.unwrap();
    c.batch_execute("CREATE TABLE f (id int primary key)")
        .await
        .unwrap();
    c.execute("INSERT INTO f VALUES (1)", &[]).await.unwrap();
    reads_reach_the_replica(&c, replica).await;
    let direct = primary.client().await.unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM f", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the write landed on the leader");

    // (b) The leader record names epoch 2 but the node carries 1: the proxy
    // must not write to it. The write is held, then refused with 08006.
    put_leader(
        &mut ec,
        &keys,
        &leader("n0", primary, 2, LeaderState::Serving),
    )
    .await;
    proxy.wait_topology("epoch 2", |t| t.epoch == 2).await;
    let started = Instant::now();
    let err = c
        .batch_execute("INSERT INTO f VALUES (2)")
        .await
        .expect_err("a write to a node without the leader's epoch must fail");
    let held = started.elapsed();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert!(
        db.message()
            .contains("no primary available: failover in progress (held"),
        "{}",
        db.message()
    );
    assert!(held >= Duration::from_millis(900), "held only {held:?}");
    assert!(held < Duration::from_secs(6), "held {held:?}");
    // Reads still work, on the replica.
    reads_reach_the_replica(&c, replica).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM f", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the refused write was not applied");
    let body = http_get(proxy.admin_port, "/metrics").await;
    assert!(
        metric(&body, "meridian_pgproxy_fencing_rejections_total") >= 1.0,
        "{body}"
    );
    assert!(metric(&body, "meridian_pgproxy_failover_hold_timeouts_total") >= 1.0);
    assert_eq!(metric(&body, "meridian_pgproxy_topology_epoch"), 2.0);

    // Once the node carries epoch 2 (the agent's Promote), writes flow again.
    set_node_epoch(primary, 2).await;
    c.batch_execute("INSERT INTO f VALUES (3)").await.unwrap();
    assert_eq!(
        direct
            .query_one("SELECT count(*) FROM f WHERE id = 3", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1
    );

    // Losing etcd for longer than the lease TTL stops writes; reads go on.
    etcd.pause();
    proxy
        .wait_topology("no primary after losing etcd", |t| {
            t.state == LeaderView::Unknown && t.primary.is_none()
        })
        .await;
    let err = c
        .batch_execute("INSERT INTO f VALUES (4)")
        .await
        .expect_err("no writes without etcd");
    assert_eq!(err.code().map(|c| c.code()), Some("08006"), "{err:?}");
    reads_reach_the_replica(&c, replica).await;
    etcd.resume();
    proxy
        .wait_topology("the leader back after etcd returns", |t| {
            t.state == LeaderView::Serving && t.primary.is_some()
        })
        .await;
    c.batch_execute("INSERT INTO f VALUES (4)").await.unwrap();
    // The registration is re-created after the loss (the old lease may have expired).
    eventually(Duration::from_secs(15), "proxies/<id> again", || {
        let mut ec = ec.clone();
        let key = keys.proxy("follow1-proxy");
        async move {
            let r = ec.get(key, None).await?;
            anyhow::ensure!(!r.kvs().is_empty(), "not registered");
            Ok(())
        }
    })
    .await
    .unwrap();

    // (d) A graceful stop revokes the registration at once: well before the
    // 3 s lease, kept alive every second, could expire (at least 2 s).
    drop(c);
    proxy.stop().await;
    eventually(
        Duration::from_millis(1800),
        "proxies/<id> to be revoked",
        || {
            let mut ec = ec.clone();
            let key = keys.proxy("follow1-proxy");
            async move {
                let r = ec.get(key, None).await?;
                anyhow::ensure!(r.kvs().is_empty(), "still registered");
                Ok(())
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_held_during_failover_completes_on_the_new_primary() {
    let (cluster, etcd) = tokio::join!(
        PgCluster::builder().replicas(1).start(),
        EtcdServer::start()
    );
    let (cluster, etcd) = (cluster.unwrap(), etcd.unwrap());
    let old = cluster.primary();
    let new = &cluster.replicas()[0];
    set_node_epoch(old, 1).await;

    let keys = Keys::new("follow2");
    let mut ec = etcd.client().await.unwrap();
    put_member(&mut ec, &keys, "n0", old, Role::Primary).await;
    put_member(&mut ec, &keys, "n1", new, Role::Replica).await;
    put_leader(&mut ec, &keys, &leader("n0", old, 1, LeaderState::Serving)).await;

    let hold = Duration::from_secs(20);
    let proxy = Proxy::start_following(proxy_config(&etcd, "follow2", hold)).await;
    proxy
        .wait_topology("a serving primary", |t| t.primary.is_some())
        .await;
    let c = proxy.connect("postgres", "").await.unwrap();
    c.batch_execute(
        "CREATE TABLE g (id int primary key, v text); INSERT INTO g VALUES (1, 'before')",
    )
    .await
    .unwrap();
    cluster
        .wait_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();

    // Step 1 of a failover: failing_over, epoch 2. New writes must wait.
    let mut failing = leader("n0", old, 2, LeaderState::FailingOver);
    failing.candidate = Some(NodeRef {
        node: "n1".into(),
        region: "eu".into(),
        pg_addr: addr(new),
    });
    put_leader(&mut ec, &keys, &failing).await;
    proxy
        .wait_topology("failing over", |t| {
            t.state == LeaderView::FailingOver && t.primary.is_none()
        })
        .await;
    let started = Instant::now();
    let mut held_write = tokio::spawn(async move {
        c.batch_execute("INSERT INTO g VALUES (2, 'held')").await?;
        let port: i32 = c
            .query_one("/* meridian:primary */ SELECT inet_server_port()", &[])
            .await?
            .get(0);
        Ok::<_, tokio_postgres::Error>((port, started.elapsed()))
    });
    // The write is held (bounded check: it must not finish while failing over).
    let blocked = tokio::time::timeout(Duration::from_millis(700), &mut held_write).await;
    assert!(
        blocked.is_err(),
        "the write ran while failing over: {blocked:?}"
    );

    // Steps 2-5, done by hand: fence the old primary, promote the candidate,
    // record the epoch in it, publish it as the serving leader.
    old.stop(StopMode::Fast).await.unwrap();
    new.promote().await.unwrap();
    eventually(
        Duration::from_secs(20),
        "the candidate to leave recovery",
        || async {
            anyhow::ensure!(!new.is_in_recovery().await?, "still in recovery");
            Ok(())
        },
    )
    .await
    .unwrap();
    set_node_epoch(new, 2).await;
    put_member(&mut ec, &keys, "n1", new, Role::Primary).await;
    let mut serving = leader("n1", new, 2, LeaderState::Serving);
    serving.timeline = 2;
    put_leader(&mut ec, &keys, &serving).await;

    let (port, elapsed) = tokio::time::timeout(hold + Duration::from_secs(5), held_write)
        .await
        .expect("the held write must finish within the hold")
        .unwrap()
        .expect("the held write must succeed");
    assert_eq!(port as u16, new.port(), "the write ran on the new primary");
    assert!(elapsed < hold, "took {elapsed:?}");
    let direct = new.client().await.unwrap();
    let v: String = direct
        .query_one("SELECT v FROM g WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "held");
    let body = http_get(proxy.admin_port, "/metrics").await;
    assert!(
        metric(&body, "meridian_pgproxy_failover_holds_total") >= 1.0,
        "{body}"
    );
    assert_eq!(metric(&body, "meridian_pgproxy_topology_epoch"), 2.0);

    // A serving primary that refuses connections (restarting) also holds writes.
    let c = proxy.connect("postgres", "").await.unwrap();
    new.stop(StopMode::Fast).await.unwrap();
    let mut held_write =
        tokio::spawn(async move { c.batch_execute("INSERT INTO g VALUES (3, 'restart')").await });
    let blocked = tokio::time::timeout(Duration::from_millis(700), &mut held_write).await;
    assert!(
        blocked.is_err(),
        "the write ran while the primary was down: {blocked:?}"
    );
    new.start().await.unwrap();
    new.wait_ready(Duration::from_secs(30)).await.unwrap();
    tokio::time::timeout(hold, held_write)
        .await
        .expect("the held write must finish within the hold")
        .unwrap()
        .expect("the held write must succeed once the primary is back");
    let direct = new.client().await.unwrap();
    let v: String = direct
        .query_one("SELECT v FROM g WHERE id = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "restart");
}
