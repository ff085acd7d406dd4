//! Failover RTO benchmark (issue 3): a writer commits every 10 ms through a
//! remote region's proxy; the primary's postmaster is killed with SIGKILL; we
//! measure the time from the kill to the first commit acknowledged by the new
//! primary (each insert returns `inet_server_port()`, so a statement that was in
//! flight on the old primary at the kill does not count), and count acknowledged
//! commits missing on the new primary. Repeated `--runs` times on
//! one cluster (after each run the old primary rejoins, then the current
//! primary is killed), in async and in synchronous mode. Prints a table.
//! `--wan-delay` puts the regions that far apart (the launcher's WAN links:
//! Postgres, etcd and QUIC traffic between regions; the coordinators and etcd
//! sit in the first region); without it there is no delay.
//!
//! ```text
//! cargo build --workspace --bins --release
//! MERIDIAN_BIN_DIR=target/release target/release/failover-rto --runs 10
//! MERIDIAN_BIN_DIR=target/release target/release/failover-rto --runs 10 \
//!     --wan-delay us-east:us-west=35ms,us-east:eu-west=40ms,us-west:eu-west=70ms
//! ```

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use meridian_launcher::{connect, ClusterSpec, LocalCluster, WanDelays};
use meridian_shared::records::{ClusterConfig, SyncMode};

#[derive(Parser, Debug)]
#[command(about = "Failover RTO: kill -9 of the primary under a 10 ms writer")]
struct Args {
    /// Runs per mode.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Modes to measure: async, sync (comma-separated).
    #[arg(long, default_value = "async,sync", value_delimiter = ',')]
    modes: Vec<String>,
    /// One-way delays between regions, `A:B=DELAY,...` (regions us-east,
    /// us-west, eu-west); default none.
    #[arg(long, default_value = "")]
    wan_delay: String,
}

const REGIONS: [&str; 3] = ["us-east", "us-west", "eu-west"];

struct Run {
    rto: Duration,
    lost: usize,
    new_leader: String,
}

async fn one_run(cluster: &LocalCluster, table: &str, run: usize) -> anyhow::Result<Run> {
    let leader = cluster.leader().await?.context("no leader")?;
    // The writer goes through a proxy in a region other than the primary's.
    let region = REGIONS
        .iter()
        .find(|r| **r != leader.region)
        .context("one region only")?;
    let dsn = cluster.proxy(region)?.dsn();
    let acked: Arc<Mutex<Vec<(i64, Instant, i32)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let base = (run as i64 + 1) * 10_000_000;
    let writer = {
        let (acked, stop, dsn, table) =
            (acked.clone(), stop.clone(), dsn.clone(), table.to_owned());
        tokio::spawn(async move {
            let mut id = base;
            let mut client = None;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                tick.tick().await;
                if client.is_none() {
                    client = connect(&dsn).await.ok();
                }
                let Some(c) = client.as_ref() else { continue };
                id += 1;
                let sql = format!("INSERT INTO {table} VALUES ({id}) RETURNING inet_server_port()");
                match c.query_one(sql.as_str(), &[]).await {
                    Ok(row) => acked.lock().unwrap_or_else(|e| e.into_inner()).push((
                        id,
                        Instant::now(),
                        row.get(0),
                    )),
                    Err(_) => client = None,
                }
            }
        })
    };
    meridian_launcher::wait::eventually(Duration::from_secs(10), "steady writes", || async {
        anyhow::ensure!(acked.lock().unwrap_or_else(|e| e.into_inner()).len() > 20);
        Ok(())
    })
    .await?;
    let killed_at = Instant::now();
    cluster.kill_postmaster(&leader.node)?;
    let after = cluster
        .wait_leader(Duration::from_secs(60), "a new leader", |l| {
            l.node != leader.node && l.is_serving() && l.epoch > leader.epoch
        })
        .await?;
    let new_port = i32::from(cluster.node(&after.node)?.pg_port);
    meridian_launcher::wait::eventually(
        Duration::from_secs(60),
        "a commit on the new primary",
        || async {
            let a = acked.lock().unwrap_or_else(|e| e.into_inner());
            anyhow::ensure!(a
                .iter()
                .any(|(_, t, port)| *t > killed_at && *port == new_port));
            Ok(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = writer.await;
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let first_after = acked
        .iter()
        .find(|(_, t, port)| *t > killed_at && *port == new_port)
        .map(|(_, t, _)| *t - killed_at)
        .context("no commit on the new primary")?;
    let c = connect(&cluster.node(&after.node)?.direct_dsn("app")).await?;
    let rows = c
        .query(&format!("SELECT id FROM {table} WHERE id > $1"), &[&base])
        .await?;
    let present: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost = acked
        .iter()
        .filter(|(id, _, _)| !present.contains(id))
        .count();
    // The old primary rejoins before the next run.
    cluster
        .wait_streaming(&leader.node, Duration::from_secs(120))
        .await?;
    Ok(Run {
        rto: first_after,
        lost,
        new_leader: after.node,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let wan_delays = WanDelays::parse(&args.wan_delay, &REGIONS.map(String::from))
        .map_err(|e| anyhow::anyhow!(e))?;
    println!("| mode | runs | RTO min (ms) | RTO median (ms) | RTO max (ms) | acked commits lost (total) |");
    println!("|---|---|---|---|---|---|");
    for mode in &args.modes {
        let sync_mode = match mode.as_str() {
            "async" => SyncMode::Off,
            "sync" => SyncMode::On,
            other => anyhow::bail!("--modes: unknown mode {other:?} (async, sync)"),
        };
        let dir = tempfile::Builder::new().prefix("meridian-rto-").tempdir()?;
        let mut spec = ClusterSpec::new(dir.path(), &REGIONS);
        spec.wan_delays = wan_delays.clone();
        spec.config = Some(ClusterConfig {
            sync_mode,
            ..ClusterConfig::default()
        });
        let mut cluster = LocalCluster::start(spec).await?;
        let table = "rto";
        connect(&cluster.proxy("us-east")?.dsn())
            .await?
            .batch_execute("CREATE TABLE rto (id bigint PRIMARY KEY)")
            .await?;
        let mut runs = Vec::new();
        for i in 0..args.runs {
            match one_run(&cluster, table, i).await {
                Ok(r) => {
                    eprintln!(
                        "{mode} run {}: rto {} ms, lost {}, new leader {}",
                        i + 1,
                        ms(r.rto),
                        r.lost,
                        r.new_leader
                    );
                    runs.push(r);
                }
                Err(e) => {
                    eprintln!(
                        "{mode} run {} failed: {e:#}\n{}",
                        i + 1,
                        cluster.log_tails(30)
                    );
                    break;
                }
            }
        }
        cluster.stop().await;
        let mut rtos: Vec<Duration> = runs.iter().map(|r| r.rto).collect();
        rtos.sort();
        if rtos.is_empty() {
            println!("| {mode} | 0 | – | – | – | – |");
            continue;
        }
        println!(
            "| {mode} | {} | {} | {} | {} | {} |",
            rtos.len(),
            ms(rtos[0]),
            ms(rtos[rtos.len() / 2]),
            ms(rtos[rtos.len() - 1]),
            runs.iter().map(|r| r.lost).sum::<usize>()
        );
    }
    Ok(())
}
