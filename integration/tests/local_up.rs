#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The README's main command, end to end: `meridianctl local up` brings up a
//! three-region cluster, writes `DIR/cluster.json` with the documented fields,
//! every region's DSN takes a write and a read, `meridianctl --dir DIR status
//! --json` answers, and SIGTERM stops every process it started.

use std::time::Duration;

use meridian_integration::eventually;
use meridian_launcher::binaries::Binaries;
use meridian_launcher::process::{alive, signal};
use meridian_launcher::{connect, ClusterFile};
use nix::sys::signal::Signal;

#[tokio::test]
async fn local_up_serves_every_region_and_stops_everything_on_sigterm() {
    let bins = Binaries::locate().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("meridian-up-")
        .tempdir()
        .unwrap();
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let mut up = tokio::process::Command::new(&bins.meridianctl)
        .args(["local", "up", "--dir"])
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
    ] {
        assert!(text.contains(key), "cluster.json lacks {key}: {text}");
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
