//! End-to-end test of the `meridian-agent` binary with real etcd, real
//! PostgreSQL 15 and a tiny in-test QUIC coordinator (mutual TLS, the shared
//! envelope codec, proclaimed in the etcd election as a `CoordinatorRecord`).
//!
//! Scenario: node1 bootstraps and registers as primary on a lease; node2 waits
//! with an empty data dir until a serving leader is written, then clones and
//! streams; `Promote{1}` records the epoch in node1; kill -9 of node1's
//! postmaster shows as `pg_up = false` and the agent does not restart it;
//! `Promote{2}` makes node2 primary on timeline 2; `Follow{node2, 2}` rewinds
//! node1 and it streams from node2; a stale command is refused; SIGTERM stops
//! an agent, its PostgreSQL and its member key.
//!
//! Every process is killed by pid on drop (agents get SIGTERM first, then
//! SIGKILL, then their postmaster is killed), and agent logs are printed when
//! the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

async fn count_rows(port: u16) -> Option<i64> {
    let c = pg(port).await?;
    c.query_one("SELECT count(*) FROM t", &[])
        .await
        .ok()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_clone_promote_crash_failover_and_rewind() {
    let dir = tempfile::tempdir().unwrap();
    // The postgres OS user must reach the data directories.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pki_dir = dir.path().join("pki");
    pki::write_dev_pki(&pki_dir, &["coord", "node1", "node2", "node3"]).unwrap();
    let (_etcd_proc, etcd_url) = start_etcd(dir.path()).await;
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

    // (a) node1 bootstraps: initdb, primary, member record on a lease.
    let (_agent1, port1, data1, http1) = env.agent("node1", "region-node1", true, None);
    let (m1, lease1) = eventually("members/node1 as primary", Duration::from_secs(60), || {
        let mut etcd = etcd.clone();
        let keys = keys.clone();
        async move {
            member(&mut etcd, &keys, "node1")
                .await
                .filter(|(m, _)| m.role == Role::Primary)
        }
    })
    .await;
    assert_ne!(lease1, 0, "the member key is on a lease");
    assert_eq!(m1.pg_addr, format!("127.0.0.1:{port1}"));
    assert!(data1.join("PG_VERSION").exists());

    // Hello first, then heartbeats with sane primary LSNs.
    let hb1 = coord
        .wait_heartbeat(
            "node1",
            "primary heartbeat",
            Duration::from_secs(30),
            |hb| hb.pg_up && hb.role == Role::Primary,
        )
        .await;
    assert_eq!(
        coord
            .state
            .lock()
            .unwrap()
            .hellos
            .first()
            .map(|h| h.0.as_str()),
        Some("node1")
    );
    assert_eq!(hb1.timeline, 1);
    assert!(hb1.write_lsn.is_some_and(|l| l.0 > 0), "{hb1:?}");
    assert!(hb1.flush_lsn.is_some_and(|l| l.0 > 0), "{hb1:?}");
    assert!(hb1.replay_lsn.is_none() && !hb1.receiver_streaming);
    let next = coord
        .wait_heartbeat("node1", "a later heartbeat", Duration::from_secs(5), |hb| {
            hb.seq > hb1.seq
        })
        .await;
    assert!(next.seq > hb1.seq);

    // /health answers 200 with the node's state.
    // (b) node2 with an empty data dir waits while there is no leader.
    let (_agent2, port2, data2, _http2) = env.agent("node2", "region-node2", false, None);
    let (m2, _) = eventually("members/node2", Duration::from_secs(30), || {
        let mut etcd = etcd.clone();
        let keys = keys.clone();
        async move { member(&mut etcd, &keys, "node2").await }
    })
    .await;
    assert_eq!(m2.role, Role::Unknown);
    let waiting = coord
        .wait_heartbeat(
            "node2",
            "a waiting heartbeat",
            Duration::from_secs(30),
            |hb| !hb.pg_up,
        )
        .await;
    assert_eq!(waiting.role, Role::Unknown);
    assert!(
        !data2.join("PG_VERSION").exists(),
        "node2 must not initdb without --bootstrap"
    );

    // The coordinator's part: node1 is the serving leader of epoch 1.
    put_leader(&mut etcd, &keys, "node1", port1, 1, 1).await;
    let hb2 = coord
        .wait_heartbeat(
            "node2",
            "streaming from node1",
            Duration::from_secs(90),
            |hb| hb.pg_up && hb.role == Role::Replica && hb.receiver_streaming,
        )
        .await;
    assert_eq!(hb2.upstream.as_deref(), Some("node1"), "{hb2:?}");
    assert_eq!(hb2.timeline, 1);
    assert!(
        hb2.receive_lsn.is_some() && hb2.replay_lsn.is_some(),
        "{hb2:?}"
    );
    assert_eq!(hb2.epoch_seen, Epoch(1));

    // A crashed standby is restarted by its agent at once and streams again.
    let old_pid2 = postmaster_pid(&data2).expect("node2's postmaster runs");
    kill(Pid::from_raw(old_pid2), Signal::SIGKILL).unwrap();
    let new_pid2 = eventually(
        "node2's postmaster to be restarted",
        Duration::from_secs(30),
        || async { postmaster_pid(&data2).filter(|p| *p != old_pid2) },
    )
    .await;
    assert_ne!(new_pid2, old_pid2);
    coord
        .wait_heartbeat(
            "node2",
            "streaming again after the restart",
            Duration::from_secs(30),
            |hb| hb.pg_up && hb.receiver_streaming,
        )
        .await;

    // A third node clones from the leader too (it is re-pointed after the failover).
    let (_agent3, port3, _data3, http3) = env.agent("node3", "region-node3", false, None);
    coord
        .wait_heartbeat(
            "node3",
            "streaming from node1",
            Duration::from_secs(90),
            |hb| hb.pg_up && hb.receiver_streaming && hb.upstream.as_deref() == Some("node1"),
        )
        .await;

    // (c) Promote{1} to node1 records the epoch in Postgres.
    let ack = coord
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
    assert_eq!(ack, AckResult::Ok);
    let c1 = pg(port1).await.unwrap();
    let epoch: String = c1
        .query_one("SELECT current_setting('meridian.epoch')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(epoch, "1");
    c1.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    eventually(
        "node2 to replay node1's rows",
        Duration::from_secs(20),
        || async { (count_rows(port2).await == Some(2)).then_some(()) },
    )
    .await;
    // Make node3 diverge from node2: node2 stops receiving (an ALTER SYSTEM of
    // primary_conninfo overrides meridian.conf) and node1 commits one more row,
    // which node3 receives and node2 never will.
    let c2 = pg(port2).await.unwrap();
    c2.batch_execute("ALTER SYSTEM SET primary_conninfo = ''")
        .await
        .unwrap();
    c2.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    eventually(
        "node2's WAL receiver to stop",
        Duration::from_secs(20),
        || {
            let c2 = &c2;
            async move {
                let n: i64 = c2
                    .query_one("SELECT count(*) FROM pg_stat_wal_receiver", &[])
                    .await
                    .ok()?
                    .get(0);
                (n == 0).then_some(())
            }
        },
    )
    .await;
    c1.batch_execute("INSERT INTO t VALUES (100)")
        .await
        .unwrap();
    eventually(
        "node3 to replay the row node2 lacks",
        Duration::from_secs(20),
        || async { (count_rows(port3).await == Some(3)).then_some(()) },
    )
    .await;
    assert_eq!(count_rows(port2).await, Some(2));
    drop(c1);
    let (code, body) = http_get(http1, "/health").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"node\":\"node1\"") && body.contains("\"role\":\"primary\""),
        "{body}"
    );
    let (code, metrics) = http_get(http1, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("meridian_agent_commands_total{kind=\"promote\",result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("meridian_agent_heartbeats_sent_total 0\n"),
        "{metrics}"
    );

    // kill -9 of node1's postmaster: pg_up = false within a heartbeat or so, and no restart.
    let pid1 = postmaster_pid(&data1).expect("node1's postmaster runs");
    kill(Pid::from_raw(pid1), Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    let down = coord
        .wait_heartbeat("node1", "pg_up = false", Duration::from_secs(5), |hb| {
            !hb.pg_up
        })
        .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(2),
        "pg_up=false took {:?}",
        killed_at.elapsed()
    );
    assert_eq!(
        down.role,
        Role::Primary,
        "a crashed primary still reports its role"
    );
    let (code, _) = http_get(http1, "/health").await;
    assert_eq!(code, 503, "/health while PostgreSQL is down");
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        assert!(
            postmaster_pid(&data1).is_none(),
            "the agent restarted a crashed primary"
        );
        let hb = coord.heartbeat("node1").unwrap();
        assert!(!hb.pg_up, "node1 reports pg_up again: {hb:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Promote{2} to node2: it becomes primary on timeline 2.
    let ack = coord
        .command(
            "node2",
            |id| CoordMsg::Promote {
                id,
                epoch: Epoch(2),
                // The standby leaves its upstream and outwaits the failsafe.
                old_fenced: false,
            },
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(ack, AckResult::Ok);
    let hb2 = coord
        .wait_heartbeat(
            "node2",
            "primary on timeline 2",
            Duration::from_secs(10),
            |hb| hb.pg_up && hb.role == Role::Primary && hb.timeline == 2,
        )
        .await;
    assert!(hb2.epoch_seen >= Epoch(2));
    c2.batch_execute("ALTER SYSTEM RESET primary_conninfo")
        .await
        .unwrap();
    c2.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    c2.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();

    // Follow{node2, 2} to the other standby: re-pointed (reload), streams on timeline 2.
    let ack = coord
        .command(
            "node3",
            |id| CoordMsg::Follow {
                id,
                leader: "node2".into(),
                pg_addr: format!("127.0.0.1:{port2}"),
                epoch: Epoch(2),
            },
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(ack, AckResult::Ok);
    coord
        .wait_heartbeat(
            "node3",
            "streaming from node2 on timeline 2",
            Duration::from_secs(30),
            |hb| {
                hb.pg_up
                    && hb.receiver_streaming
                    && hb.timeline == 2
                    && hb.upstream.as_deref() == Some("node2")
            },
        )
        .await;
    eventually(
        "node3 to replay node2's row",
        Duration::from_secs(20),
        || async { (count_rows(port3).await == Some(3)).then_some(()) },
    )
    .await;
    let c3 = pg(port3).await.unwrap();
    let lost: i64 = c3
        .query_one("SELECT count(*) FROM t WHERE id = 100", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lost, 0, "node3 kept a row of the abandoned timeline");
    drop(c3);
    let (_, metrics3) = http_get(http3, "/metrics").await;
    assert!(
        metrics3.contains("meridian_agent_rewinds_total 1\n"),
        "the diverged standby was rewound: {metrics3}"
    );

    // A command of an older epoch is refused as stale.
    let ack = coord
        .command(
            "node2",
            |id| CoordMsg::Fence {
                id,
                epoch: Epoch(1),
            },
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(ack, AckResult::Stale { current: Epoch(2) });

    // Follow{node2, 2} to node1: rewind and stream from node2 on timeline 2.
    let ack = coord
        .command(
            "node1",
            |id| CoordMsg::Follow {
                id,
                leader: "node2".into(),
                pg_addr: format!("127.0.0.1:{port2}"),
                epoch: Epoch(2),
            },
            Duration::from_secs(180),
        )
        .await;
    assert_eq!(ack, AckResult::Ok);
    // The coordinator publishes the new leader once the failover is done.
    put_leader(&mut etcd, &keys, "node2", port2, 2, 2).await;
    let hb1 = coord
        .wait_heartbeat(
            "node1",
            "streaming from node2 on timeline 2",
            Duration::from_secs(60),
            |hb| hb.pg_up && hb.role == Role::Replica && hb.receiver_streaming && hb.timeline == 2,
        )
        .await;
    assert_eq!(hb1.upstream.as_deref(), Some("node2"), "{hb1:?}");
    assert!(data1.join("standby.signal").exists());
    c2.batch_execute("INSERT INTO t VALUES (4)").await.unwrap();
    eventually(
        "node1 to replay node2's rows",
        Duration::from_secs(20),
        || async { (count_rows(port1).await == Some(4)).then_some(()) },
    )
    .await;
    let slots: i64 = c2
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'node1' AND active",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1, "node1 streams through its slot on node2");
    drop(c2);

    // It was rewound, not re-cloned.
    let (_, metrics) = http_get(http1, "/metrics").await;
    assert!(
        metrics.contains("meridian_agent_rewinds_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meridian_agent_clones_total 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meridian_agent_commands_total{kind=\"follow\",result=\"ok\"} 1"),
        "{metrics}"
    );

    // SIGTERM: the agent stops its PostgreSQL, revokes its lease and exits 0.
    let mut agent1 = _agent1;
    let status = agent1
        .terminate(Duration::from_secs(30))
        .expect("agent1 exits on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        postmaster_pid(&data1).is_none(),
        "node1's postgres survived its agent"
    );
    let gone = member(&mut etcd, &keys, "node1").await;
    assert!(gone.is_none(), "members/node1 outlived the agent: {gone:?}");
}

/// A raw HTTP/1.1 GET on the agent's port: (status code, body).
async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_and_a_primary_without_lease_fences_itself() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pki_dir = dir.path().join("pki");
    pki::write_dev_pki(&pki_dir, &["coord", "solo"]).unwrap();
    let (etcd_proc, etcd_url) = start_etcd(dir.path()).await;
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

    let (mut first, port, data, _) = env.agent("solo", "r", true, None);
    coord
        .wait_heartbeat("solo", "primary up", Duration::from_secs(60), |hb| {
            hb.pg_up && hb.role == Role::Primary
        })
        .await;
    let pid = postmaster_pid(&data).unwrap();

    // kill -9 of the agent alone leaves PostgreSQL running; a new agent adopts it.
    first.data_dir = None; // its postmaster now belongs to the next agent
    let _ = first.child.kill();
    let _ = first.child.wait();
    drop(first);
    assert_eq!(
        postmaster_pid(&data),
        Some(pid),
        "PostgreSQL died with its agent"
    );
    let _second = {
        // The same node: same data dir and port.
        let p = PkiPaths::in_dir(&env.pki_dir, "solo");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meridian-agent"));
        cmd.env("RUST_LOG", "info,meridian_agent=debug")
            .args([
                "--name",
                "solo",
                "--region",
                "r",
                "--cluster",
                CLUSTER,
                "--bootstrap",
            ])
            .args(["--etcd", &env.etcd_url])
            .arg("--data-dir")
            .arg(&data)
            .args(["--pg-port", &port.to_string()])
            .arg("--ca")
            .arg(&p.ca)
            .arg("--cert")
            .arg(&p.cert)
            .arg("--key")
            .arg(&p.key)
            .args(["--pg-setting", "fsync=off"]);
        let proc = spawn(
            "solo (2nd)",
            &mut cmd,
            env.dir.path().join("agent-solo-2.log"),
            Some(data.clone()),
        );
        proc
    };
    let hellos_before = coord.state.lock().unwrap().hellos.len();
    eventually("a second hello", Duration::from_secs(30), || {
        let n = coord.state.lock().unwrap().hellos.len();
        async move { (n > hellos_before).then_some(()) }
    })
    .await;
    coord
        .wait_heartbeat(
            "solo",
            "adopted primary up",
            Duration::from_secs(30),
            |hb| hb.pg_up && hb.role == Role::Primary,
        )
        .await;
    assert_eq!(
        postmaster_pid(&data),
        Some(pid),
        "the adopted postmaster was restarted"
    );

    // etcd freezes: the lease cannot be renewed, so the primary stops itself
    // before the lease (3 s) can expire: within ttl - margin = 2 s (plus a probe).
    kill(Pid::from_raw(etcd_proc.pid()), Signal::SIGSTOP).unwrap();
    let frozen = Instant::now();
    eventually("the self-fence", Duration::from_secs(10), || async {
        postmaster_pid(&data).is_none().then_some(())
    })
    .await;
    let fenced_after = frozen.elapsed();
    assert!(
        fenced_after < Duration::from_secs(3),
        "self-fence took {fenced_after:?}"
    );
    coord
        .wait_heartbeat(
            "solo",
            "pg_up = false after the fence",
            Duration::from_secs(5),
            |hb| !hb.pg_up,
        )
        .await;

    // etcd is back: the member is registered again, PostgreSQL stays down (fenced)...
    kill(Pid::from_raw(etcd_proc.pid()), Signal::SIGCONT).unwrap();
    eventually("members/solo again", Duration::from_secs(20), || {
        let mut etcd = etcd.clone();
        let keys = keys.clone();
        async move { member(&mut etcd, &keys, "solo").await }
    })
    .await;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(
            postmaster_pid(&data).is_none(),
            "a fenced primary was restarted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...until the coordinator promotes it again.
    let ack = coord
        .command(
            "solo",
            |id| CoordMsg::Promote {
                id,
                epoch: Epoch(1),
                old_fenced: true,
            },
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(ack, AckResult::Ok);
    let c = pg(port).await.unwrap();
    let epoch: String = c
        .query_one("SELECT current_setting('meridian.epoch')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(epoch, "1");
    drop(c);
}
