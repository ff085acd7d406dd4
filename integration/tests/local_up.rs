#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The README's main command, end to end: `meridianctl local up` (with the
//! realistic `--wan-delay` of `integration/local-up.sh`) brings up a
//! three-region cluster, writes `DIR/cluster.json` with the documented fields,
//! every region's DSN takes a write and a read, every region's Redis answers,
//! `meridianctl --dir DIR status --json` answers, and SIGTERM stops every
//! process it started.
//!
//! And the WAN delays themselves, on a small two-region cluster started through
//! the launcher: a statement that must run on the remote primary takes at least
//! a round trip across the 40 ms pair (80 ms), a read served by the local
//! replica does not; standbys stream through their region's link; the agents'
//! QUIC to the coordinator (in the first region) goes through their node's
//! delayed relay, advertised per region in the coordinator's election record;
//! the region's Redis can be stopped and started on the same port; a partition
//! cuts every link of a node, its QUIC relays included; after a failover the old primary rejoins through its
//! region's link of the new primary and the costs swap sides.

use std::time::{Duration, Instant};

use meridian_integration::eventually;
use meridian_launcher::binaries::Binaries;
use meridian_launcher::process::{alive, signal};
use meridian_launcher::redis_server::ping;
use meridian_launcher::{connect, ClusterFile, ClusterSpec, LocalCluster, WanDelays};
use meridian_shared::records::{self, MemberRecord};
use nix::sys::signal::Signal;

/// What `integration/local-up.sh` passes by default.
const REALISTIC_WAN: &str = "us-east:us-west=35ms,us-east:eu-west=40ms,us-west:eu-west=70ms";

/// The one-way delay between the two regions of the WAN test.
const PAIR: Duration = Duration::from_millis(40);

/// The coordinator's view of `node` in `meridianctl status --json` (`silent`,
/// `streaming`, …).
async fn node_state(cluster: &LocalCluster, node: &str) -> anyhow::Result<String> {
    let out = cluster.meridianctl(&["status", "--json"]).await?;
    let status: serde_json::Value = serde_json::from_str(&out)?;
    let state = status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["name"] == node))
        .and_then(|n| n["state"].as_str())
        .map(str::to_owned);
    state.ok_or_else(|| anyhow::anyhow!("{node} not in the status: {status}"))
}

/// `redis://127.0.0.1:PORT` → `127.0.0.1:PORT`.
fn redis_addr(url: &str) -> &str {
    url.trim_start_matches("redis://").trim_end_matches('/')
}

#[tokio::test]
async fn local_up_serves_every_region_and_stops_everything_on_sigterm() {
    let bins = Binaries::locate().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("meridian-up-")
        .tempdir()
        .unwrap();
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let mut up = tokio::process::Command::new(&bins.meridianctl)
        .args(["local", "up", "--wan-delay", REALISTIC_WAN, "--dir"])
        .arg(dir.path().join("cluster"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let cluster_dir = dir.path().join("cluster");
    // Poll for cluster.json with a deadline, failing early if `local up` exits.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let file = loop {
        let log = || std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
        if let Ok(Some(status)) = up.try_wait() {
            panic!("meridianctl local up exited: {status}\n{}", log());
        }
        match ClusterFile::load(&cluster_dir) {
            Ok(f) => break f,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e:?}\n{}", log()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(file.cluster, "local");
    assert_eq!(file.regions.len(), 3);
    assert_eq!(file.nodes.len(), 3);
    assert_eq!(file.coordinators.len(), 2);
    assert_eq!(
        file.nodes
            .iter()
            .filter(|n| n.initial_role == "primary")
            .count(),
        1
    );
    let text = std::fs::read_to_string(cluster_dir.join("cluster.json")).unwrap();
    for key in [
        "\"etcd\"",
        "\"admin_addr\"",
        "\"proxy_dsn\"",
        "\"proxy_pid\"",
        "\"pg_port\"",
        "\"postmaster_pid\"",
        "\"agent_pid\"",
        "\"initial_role\"",
        "\"redis_url\"",
        "\"redis_pid\"",
    ] {
        assert!(text.contains(key), "cluster.json lacks {key}: {text}");
    }
    for region in &file.regions {
        let url = region
            .redis_url
            .as_deref()
            .expect("a region without redis_url");
        ping(redis_addr(url))
            .await
            .unwrap_or_else(|e| panic!("the Redis of {}: {e:#}", region.name));
    }

    for (i, region) in file.regions.iter().enumerate() {
        let c = connect(&region.proxy_dsn).await.unwrap();
        c.batch_execute("CREATE TABLE IF NOT EXISTS up_check (region text PRIMARY KEY)")
            .await
            .unwrap();
        c.execute("INSERT INTO up_check VALUES ($1)", &[&region.name])
            .await
            .unwrap();
        // Read-your-writes is a later issue: wait for the local replica.
        eventually(
            Duration::from_secs(10),
            "the row through the proxy",
            || async {
                let n: i64 = c
                    .query_one("SELECT count(*) FROM up_check", &[])
                    .await?
                    .get(0);
                anyhow::ensure!(n as usize == i + 1, "{n} rows");
                Ok(())
            },
        )
        .await
        .unwrap();
    }

    let out = tokio::process::Command::new(&bins.meridianctl)
        .arg("--dir")
        .arg(&cluster_dir)
        .args(["status", "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["leader"], "us-east-1", "{status}");
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3, "{status}");

    let mut pids: Vec<u32> = file.coordinators.iter().map(|c| c.pid).collect();
    pids.extend(file.regions.iter().map(|r| r.proxy_pid));
    pids.extend(file.regions.iter().filter_map(|r| r.redis_pid));
    assert_eq!(pids.len(), 2 + 3 + 3, "{pids:?}");
    pids.extend(
        file.nodes
            .iter()
            .flat_map(|n| [n.agent_pid, n.postmaster_pid]),
    );
    assert!(pids.iter().all(|p| *p > 0 && alive(*p)), "{pids:?}");

    signal(up.id().unwrap(), Signal::SIGTERM);
    let exit = tokio::time::timeout(Duration::from_secs(60), up.wait())
        .await
        .expect("local up did not stop within 60 s")
        .unwrap();
    assert!(exit.success(), "local up exited with {exit}");
    eventually(Duration::from_secs(20), "every process gone", || async {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        anyhow::ensure!(left.is_empty(), "still running: {left:?}");
        Ok(())
    })
    .await
    .unwrap();
}

/// Runs `sql` (simple protocol, one round trip) and returns how long it took
/// and the first column of the first row.
async fn timed(c: &tokio_postgres::Client, sql: &str) -> (Duration, String) {
    let started = Instant::now();
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let took = started.elapsed();
    let value = msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default();
    (took, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wan_delay_applies_per_region_pair_and_every_region_has_a_redis() {
    let dir = tempfile::Builder::new()
        .prefix("meridian-wan-")
        .tempdir()
        .unwrap();
    let mut spec = ClusterSpec::new(dir.path(), &["us-east", "eu-west"]);
    spec.coordinators = 1;
    spec.wan_delays = WanDelays::none().with("us-east", "eu-west", PAIR);
    let mut cluster = LocalCluster::start(spec).await.unwrap();
    let result = wan_checks(&mut cluster).await;
    if let Err(e) = &result {
        eprintln!("{e:?}\n{}", cluster.log_tails(40));
    }
    cluster.stop().await;
    result.unwrap();
}

/// Waits until the standby at `dsn` streams from the sender port `link_port` (a region link).
async fn streams_through(
    dsn: &str,
    link_port: &str,
    within: Duration,
    what: &str,
) -> anyhow::Result<()> {
    eventually(within, what, || async {
        let c = connect(dsn).await?;
        let row = c
            .query_one(
                "SELECT status, sender_port::text FROM pg_stat_wal_receiver",
                &[],
            )
            .await?;
        let (status, port): (String, Option<String>) = (row.get(0), row.get(1));
        anyhow::ensure!(
            status == "streaming" && port.as_deref() == Some(link_port),
            "{status} from port {port:?}"
        );
        Ok(())
    })
    .await
}

async fn wan_checks(cluster: &mut LocalCluster) -> anyhow::Result<()> {
    let east = cluster.node("us-east-1")?;
    let west = cluster.node("eu-west-1")?;
    let (east_port, west_port) = (east.pg_port.to_string(), west.pg_port.to_string());

    // Each agent advertises one address per region; pg_addr is its own region's.
    let mut etcd = cluster.etcd_client().await?;
    let resp = etcd.get(cluster.keys.member("us-east-1"), None).await?;
    let kv = resp.kvs().first().expect("members/us-east-1");
    let member: MemberRecord = records::decode("member", kv.value())?;
    assert_eq!(member.pg_addr, east.pg_addr());
    assert_eq!(member.pg_addr_for("us-east"), east.pg_addr());
    assert_eq!(member.pg_addr_for("eu-west"), east.pg_addr_for("eu-west"));
    assert_ne!(east.pg_addr_for("eu-west"), east.pg_addr());

    // The eu-west standby streams from the primary through eu-west's (delayed) link.
    let link_port = east
        .pg_addr_for("eu-west")
        .rsplit_once(':')
        .unwrap()
        .1
        .to_owned();
    let west_dsn = west.direct_dsn("postgres");
    streams_through(
        &west_dsn,
        &link_port,
        Duration::from_secs(30),
        "eu-west-1 to stream through the eu-west link of us-east-1",
    )
    .await?;

    // The agents' QUIC goes to the coordinator (in us-east, the first region)
    // through their own node's relay, each advertised for its region in the
    // election record and delayed by the region pair's delay.
    let coordinator = cluster.active_coordinator().await?;
    let west_relay = west
        .quic_links
        .get(&coordinator.name)
        .expect("eu-west-1's relay to the coordinator");
    let east_relay = east
        .quic_links
        .get(&coordinator.name)
        .expect("us-east-1's relay to the coordinator");
    assert_eq!(
        coordinator.quic_addr_for("eu-west"),
        west_relay.local_addr().to_string()
    );
    assert_eq!(
        coordinator.quic_addr_for("us-east"),
        east_relay.local_addr().to_string()
    );
    assert_ne!(coordinator.quic_addr_for("eu-west"), coordinator.quic_addr);
    assert_eq!(west_relay.control().state().delay, PAIR);
    assert_eq!(east_relay.control().state().delay, Duration::ZERO);
    let before = west_relay.delivered();
    eventually(
        Duration::from_secs(10),
        "eu-west-1's heartbeats (and their acks) to cross its relay",
        || async {
            let (now, clients) = (west_relay.delivered(), west_relay.clients());
            anyhow::ensure!(
                now >= before + 20 && clients >= 1,
                "{} datagrams since, {clients} clients",
                now - before
            );
            Ok(())
        },
    )
    .await?;
    // And that relay is its only path: cut alone, the coordinator stops hearing
    // eu-west-1; healed, it hears it again.
    west_relay.control().cut();
    let cut_result = eventually(
        Duration::from_secs(15),
        "the coordinator to find eu-west-1 silent",
        || async {
            let state = node_state(cluster, "eu-west-1").await?;
            anyhow::ensure!(state == "silent", "eu-west-1 is {state}");
            Ok(())
        },
    )
    .await;
    west_relay.control().heal();
    cut_result?;
    eventually(
        Duration::from_secs(30),
        "the coordinator to hear eu-west-1 again",
        || async {
            let state = node_state(cluster, "eu-west-1").await?;
            anyhow::ensure!(state != "silent", "eu-west-1 is {state}");
            Ok(())
        },
    )
    .await?;

    // etcd sits with the coordinators: eu-west's agent and proxy reach it
    // through links with the pair's delay, us-east's without delay.
    assert_eq!(west.etcd_links[0].control().state().delay, PAIR);
    assert_eq!(east.etcd_links[0].control().state().delay, Duration::ZERO);
    let eu_etcd = &cluster.proxy("eu-west")?.etcd_links[0];
    assert_eq!(eu_etcd.control().state().delay, PAIR);
    assert_eq!(
        cluster.proxy("us-east")?.etcd_links[0]
            .control()
            .state()
            .delay,
        Duration::ZERO
    );
    let url = format!("http://{}", eu_etcd.local_addr());
    let mut via_link = meridian_pgproxy::etcd_client::Client::connect([url.as_str()], None).await?;
    let mut fastest_get = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        via_link.get(cluster.keys.leader(), None).await?;
        fastest_get = fastest_get.min(started.elapsed());
    }
    assert!(
        fastest_get >= PAIR * 2,
        "an etcd get through eu-west's proxy link took {fastest_get:?} < {:?}",
        PAIR * 2
    );

    let eu = connect(&cluster.proxy("eu-west")?.dsn()).await?;
    // Reads in a session that never writes (after a write, read-your-writes
    // would rightly make a read wait for the replica to replay it).
    let eu_reader = connect(&cluster.proxy("eu-west")?.dsn()).await?;
    let us = connect(&cluster.proxy("us-east")?.dsn()).await?;
    // Wait until eu-west's proxy serves reads from its local replica.
    let wp = west_port.clone();
    eventually(
        Duration::from_secs(30),
        "a read through eu-west's proxy served by eu-west-1",
        || {
            let eu = &eu_reader;
            let wp = wp.clone();
            async move {
                let (_, port) = timed(eu, "SELECT inet_server_port()").await;
                anyhow::ensure!(port == wp, "served by port {port}");
                Ok(())
            }
        },
    )
    .await?;
    // Warm the pools: the first primary statement also opens the backend.
    timed(&eu, "/* meridian:primary */ SELECT 1").await;
    timed(&us, "/* meridian:primary */ SELECT 1").await;
    eu.batch_execute("CREATE TABLE IF NOT EXISTS wan_check (id serial PRIMARY KEY)")
        .await?;

    let round_trip = PAIR * 2;
    let mut remote = Vec::new();
    let mut local_reads = Vec::new();
    let mut local_primary = Vec::new();
    for _ in 0..5 {
        let (took, port) = timed(&eu, "/* meridian:primary */ SELECT inet_server_port()").await;
        assert_eq!(port, east_port, "the hinted statement ran elsewhere");
        remote.push(took);
        let (took, _) = timed(&eu, "INSERT INTO wan_check DEFAULT VALUES").await;
        remote.push(took);
        let (took, port) = timed(&eu_reader, "SELECT inet_server_port()").await;
        assert_eq!(port, west_port, "the read was not served by eu-west-1");
        local_reads.push(took);
        let (took, port) = timed(&us, "/* meridian:primary */ SELECT inet_server_port()").await;
        assert_eq!(port, east_port);
        local_primary.push(took);
    }
    eprintln!(
        "eu-west -> primary in us-east: {remote:?}; eu-west local reads: {local_reads:?}; \
         us-east -> its own primary: {local_primary:?}"
    );
    for took in &remote {
        assert!(
            *took >= round_trip,
            "a statement on the remote primary took {took:?} < {round_trip:?}"
        );
    }
    let fastest = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let limit = Duration::from_millis(30);
    assert!(
        fastest(&local_reads) < limit,
        "local replica reads: {local_reads:?}"
    );
    assert!(
        fastest(&local_primary) < limit,
        "us-east to its own primary: {local_primary:?}"
    );

    // One Redis per region, answering; it can be stopped and started again on
    // the same port.
    for region in ["us-east", "eu-west"] {
        let url = cluster.redis_url(region)?;
        ping(redis_addr(&url)).await?;
    }
    let url = cluster.redis_url("eu-west")?;
    let file = cluster.cluster_file();
    let entry = file.regions.iter().find(|r| r.name == "eu-west").unwrap();
    assert_eq!(entry.redis_url.as_deref(), Some(url.as_str()));
    let pid = entry.redis_pid.expect("redis pid");
    cluster.stop_redis("eu-west").await?;
    assert!(!alive(pid), "redis {pid} still runs after stop_redis");
    assert!(ping(redis_addr(&url)).await.is_err());
    cluster.start_redis("eu-west").await?;
    assert_eq!(cluster.redis_url("eu-west")?, url);
    ping(redis_addr(&url)).await?;

    // A partition cuts every link of the node (each region's address), and heal
    // restores them; done quickly, well within the lease TTL.
    let east = cluster.node("us-east-1")?;
    let via = |addr: String| {
        let (host, port) = addr.rsplit_once(':').unwrap();
        format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=2")
    };
    let addrs = [east.pg_addr(), east.pg_addr_for("eu-west")];
    east.partition();
    assert!(
        east.quic_links.values().all(|r| !r.control().state().up),
        "a QUIC relay of us-east-1 is not cut"
    );
    for a in &addrs {
        assert!(
            connect(&via(a.clone())).await.is_err(),
            "{a} still reaches us-east-1 while partitioned"
        );
    }
    east.heal();
    assert!(east.quic_links.values().all(|r| r.control().state().up));
    for a in &addrs {
        connect(&via(a.clone())).await?;
    }

    // After a failover to eu-west-1, the old primary rejoins through us-east's
    // (delayed) link of the new primary, and the costs swap sides.
    cluster.kill_postmaster("us-east-1")?;
    let leader = cluster
        .wait_leader(Duration::from_secs(40), "eu-west-1 to lead", |l| {
            l.node == "eu-west-1" && l.is_serving()
        })
        .await?;
    assert_eq!(leader.pg_addr, cluster.node("eu-west-1")?.pg_addr());
    let link_port = cluster
        .node("eu-west-1")?
        .pg_addr_for("us-east")
        .rsplit_once(':')
        .unwrap()
        .1
        .to_owned();
    let east_dsn = cluster.node("us-east-1")?.direct_dsn("postgres");
    streams_through(
        &east_dsn,
        &link_port,
        Duration::from_secs(60),
        "us-east-1 to rejoin through the us-east link of eu-west-1",
    )
    .await?;
    let us = connect(&cluster.proxy("us-east")?.dsn()).await?;
    let eu = connect(&cluster.proxy("eu-west")?.dsn()).await?;
    let wp = west_port.clone();
    let (remote, local) = eventually(
        Duration::from_secs(30),
        "the proxies to follow the new primary",
        || {
            let (us, eu, wp) = (&us, &eu, wp.clone());
            async move {
                let (far, port) =
                    timed(us, "/* meridian:primary */ SELECT inet_server_port()").await;
                anyhow::ensure!(port == wp, "us-east's primary statement ran on {port}");
                let (near, port) =
                    timed(eu, "/* meridian:primary */ SELECT inet_server_port()").await;
                anyhow::ensure!(port == wp, "eu-west's primary statement ran on {port}");
                Ok((far, near))
            }
        },
    )
    .await?;
    let (far, _) = timed(&us, "/* meridian:primary */ SELECT 1").await;
    let (near, _) = timed(&eu, "/* meridian:primary */ SELECT 1").await;
    eprintln!(
        "after failover: us-east -> eu-west primary {remote:?}, {far:?}; eu-west -> own {local:?}, {near:?}"
    );
    assert!(
        far >= round_trip,
        "us-east to the eu-west primary took {far:?}"
    );
    assert!(
        near < round_trip,
        "eu-west to its own primary took {near:?}"
    );
    Ok(())
}
