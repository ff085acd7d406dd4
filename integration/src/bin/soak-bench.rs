//! Load held (issue 14, section 3), on a local two-region cluster (real PostgreSQL
//! streaming replication, etcd, coordinators, agents, one pgproxy per region in
//! transaction mode):
//!
//! - `soak`: `--clients` sessions through us-east's proxy, each a mix of point reads (70 %),
//!   single updates (20 %) and two-update transactions (10 %) with a think time between
//!   operations, for `--duration`, with a failover (kill -9 of the primary's postmaster)
//!   every `--failover-every`. Every `--sample` it prints the operations per second, the
//!   errors and the RSS of the proxy, the agents and the coordinators; at the end the RSS
//!   trend per process (least-squares slope from the second minute on) and every client
//!   error by SQLSTATE, inside and outside the failover windows. It fails when an error
//!   happened outside a failover window or was not of a retryable class (08, 40, 57P01).
//! - `idle`: `--clients` sessions log in through the proxy (one `SELECT 1` each) and stay
//!   idle; the proxy's RSS is sampled as they arrive, and the memory per idle client is the
//!   growth divided by the clients.
//!
//! ```text
//! cargo build --workspace --bins
//! target/debug/soak-bench soak --clients 1000 --duration 10m --failover-every 2m
//! target/debug/soak-bench idle --clients 10000
//! ```
//!
//! Everything runs on one host; the clients' own CPU competes with the cluster's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use meridian_launcher::{connect, ClusterSpec, LocalCluster};
use tokio_postgres::Client;

#[derive(Parser, Debug)]
#[command(about = "Soak and idle-client benchmarks through one proxy of a local cluster")]
struct Args {
    #[command(flatten)]
    dirs: meridian_integration::bench::BenchDirs,
    /// An extra pgproxy option (repeat it), e.g. `--proxy-arg=--pool-idle-timeout=30s`.
    #[arg(long, allow_hyphen_values = true)]
    proxy_arg: Vec<String>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Mixed load with failovers; RSS and errors over time.
    Soak {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        failover_every: Duration,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        sample: Duration,
        /// Mean pause of a client between two operations (uniform in 0.5x-1.5x).
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        think: Duration,
    },
    /// Idle logged-in clients; the proxy's memory per client.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// RSS samples taken as the clients arrive.
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
}

/// Keys of the soak table.
const KEYS: i32 = 1000;
/// Longest one operation may take before it counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Errors this long after a failover window ended still count as the failover's.
const FAILOVER_TAIL: Duration = Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = args.dirs.bin_dir.clone();
    meridian_integration::bench::main(bin_dir.as_deref(), bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    meridian_shared::telemetry::init();
    let dir = args.dirs.work_dir("meridian-soak-")?;
    let clients = match args.mode {
        Mode::Soak { clients, .. } | Mode::Idle { clients, .. } => clients,
    };
    let mut spec = ClusterSpec::new(&dir, &["us-east", "us-west"]);
    spec.proxy_args = vec![
        "--pool-mode".into(),
        "transaction".into(),
        "--max-clients".into(),
        (clients + 100).to_string(),
    ];
    spec.proxy_args.extend(args.proxy_arg.iter().cloned());
    let mut cluster = LocalCluster::start(spec)
        .await
        .context("starting the cluster")?;
    let result = match args.mode {
        Mode::Soak {
            clients,
            duration,
            failover_every,
            sample,
            think,
        } => {
            soak(
                &mut cluster,
                clients,
                duration,
                failover_every,
                sample,
                think,
            )
            .await
        }
        Mode::Idle { clients, steps } => idle(&cluster, clients, steps).await,
    };
    cluster.stop().await;
    result.with_context(|| format!("logs in {}", dir.display()))
}

/// VmRSS of `pid` in KiB (0 when it is gone).
fn rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The RSS of the processes the soak watches, in KiB.
#[derive(Clone, Debug)]
struct Sample {
    at_s: f64,
    ops: u64,
    errors: usize,
    proxy: u64,
    agents: u64,
    coordinators: u64,
}

fn sample_rss(cluster: &LocalCluster) -> (u64, u64, u64) {
    let proxy = cluster
        .proxies
        .iter()
        .find(|p| p.region == "us-east")
        .and_then(|p| p.pid());
    let agents = cluster.nodes.iter().map(|n| rss_kib(n.agent_pid())).sum();
    let coordinators = cluster.coordinators.iter().map(|c| rss_kib(c.pid())).sum();
    (rss_kib(proxy), agents, coordinators)
}

/// Least-squares slope of `points` (x in minutes), per minute.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// One client error: when (ms since the start) and its SQLSTATE (or what else ended it).
type ErrorLog = Arc<Mutex<Vec<(u64, String)>>>;

async fn soak(
    cluster: &mut LocalCluster,
    clients: usize,
    duration: Duration,
    failover_every: Duration,
    sample_every: Duration,
    think: Duration,
) -> anyhow::Result<()> {
    let dsn = cluster
        .proxies
        .iter()
        .find(|p| p.region == "us-east")
        .context("no us-east proxy")?
        .dsn();
    connect(&dsn)
        .await?
        .batch_execute(&format!(
            "CREATE TABLE soak_kv (k int PRIMARY KEY, v bigint NOT NULL);
             INSERT INTO soak_kv SELECT g, 0 FROM generate_series(1, {KEYS}) g;"
        ))
        .await
        .context("creating the soak table")?;
    // Reads of other sessions go to the replicas, which must have replayed the table.
    let leader = cluster.leader().await?.context("no leader")?;
    for node in cluster.nodes.iter().filter(|n| n.name != leader.node) {
        let replica = node.direct_dsn("app");
        meridian_launcher::wait::eventually(
            Duration::from_secs(30),
            &format!("{} to replay the soak table", node.name),
            || {
                let replica = replica.clone();
                async move {
                    let row = connect(&replica)
                        .await?
                        .query_one("SELECT to_regclass('soak_kv') IS NOT NULL", &[])
                        .await?;
                    anyhow::ensure!(row.get::<_, bool>(0), "not yet");
                    Ok(())
                }
            },
        )
        .await?;
    }
    let t0 = Instant::now();
    let ms = move || u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let errors: ErrorLog = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (dsn, stop, ops, errors) = (dsn.clone(), stop.clone(), ops.clone(), errors.clone());
        // Arrivals spread over the first 10 s.
        let delay = Duration::from_millis((i as u64 * 10_000) / clients.max(1) as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            soak_client(dsn, think, stop, ops, errors, ms).await;
        }));
    }
    println!(
        "| t (s) | ops/s | errors | proxy RSS (MiB) | agents RSS (MiB) | coordinators RSS (MiB) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut samples: Vec<Sample> = Vec::new();
    let mut failovers: Vec<(u64, u64, String)> = Vec::new();
    let mut next_sample = t0 + sample_every;
    let mut next_failover = t0 + failover_every;
    let end = t0 + duration;
    let mut last_ops = 0;
    let mut last_errors = 0;
    while Instant::now() < end {
        let wake = next_sample.min(next_failover).min(end);
        tokio::time::sleep_until(wake.into()).await;
        if Instant::now() >= next_failover && Instant::now() < end {
            let start = ms();
            let what = failover(cluster).await?;
            failovers.push((start, ms(), what));
            next_failover += failover_every;
        }
        if Instant::now() >= next_sample {
            let (proxy, agents, coordinators) = sample_rss(cluster);
            let done = ops.load(Ordering::Relaxed);
            let errs = errors.lock().unwrap_or_else(|e| e.into_inner()).len();
            let at_s = t0.elapsed().as_secs_f64();
            // A failover delays the sample: the rate is over the real interval.
            let interval = at_s - samples.last().map_or(0.0, |s: &Sample| s.at_s);
            let s = Sample {
                at_s,
                ops: done - last_ops,
                errors: errs - last_errors,
                proxy,
                agents,
                coordinators,
            };
            println!(
                "| {:.0} | {:.0} | {} | {:.1} | {:.1} | {:.1} |",
                s.at_s,
                s.ops as f64 / interval.max(0.001),
                s.errors,
                mib(s.proxy),
                mib(s.agents),
                mib(s.coordinators)
            );
            (last_ops, last_errors) = (done, errs);
            samples.push(s);
            next_sample += sample_every;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    report_soak(
        &samples,
        &failovers,
        &errors,
        ops.load(Ordering::Relaxed),
        t0,
    )
}

/// kill -9 of the primary's postmaster; waits for a newer serving leader and for the old
/// node streaming from it. Returns what happened, for the report.
async fn failover(cluster: &LocalCluster) -> anyhow::Result<String> {
    let old = cluster.leader().await?.context("no leader")?;
    cluster.kill_postmaster(&old.node)?;
    let new = cluster
        .wait_leader(Duration::from_secs(60), "a new serving leader", |l| {
            l.is_serving() && l.epoch > old.epoch
        })
        .await?;
    cluster
        .wait_streaming(&old.node, Duration::from_secs(120))
        .await?;
    Ok(format!(
        "{} -> {} (epoch {})",
        old.node, new.node, new.epoch
    ))
}

async fn soak_client(
    dsn: String,
    think: Duration,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    errors: ErrorLog,
    ms: impl Fn() -> u64,
) {
    let mut conn: Option<Client> = None;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match tokio::time::timeout(Duration::from_secs(10), connect(&dsn)).await {
                Ok(Ok(c)) => conn = Some(c),
                Ok(Err(e)) => {
                    let code = e
                        .downcast_ref::<tokio_postgres::Error>()
                        .and_then(|e| e.code())
                        .map_or("connect".to_owned(), |c| c.code().to_owned());
                    errors
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((ms(), code));
                    // Pacing of reconnect attempts, not a wait on a condition.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(_) => {
                    errors
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((ms(), "connect timeout".to_owned()));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        let k = rand::random_range(1..=KEYS);
        let roll = rand::random_range(0..100);
        let sql = if roll < 70 {
            format!("SELECT v FROM soak_kv WHERE k = {k}")
        } else if roll < 90 {
            format!("UPDATE soak_kv SET v = v + 1 WHERE k = {k}")
        } else {
            let k2 = k % KEYS + 1;
            format!(
                "BEGIN; UPDATE soak_kv SET v = v + 1 WHERE k = {k}; \
                 UPDATE soak_kv SET v = v - 1 WHERE k = {k2}; COMMIT"
            )
        };
        match tokio::time::timeout(OP_TIMEOUT, c.simple_query(&sql)).await {
            Ok(Ok(_)) => {
                ops.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                let code = e.code().map(|c| c.code().to_owned());
                if c.is_closed() || code.as_deref().is_none_or(|c| c.starts_with("08")) {
                    conn = None;
                }
                errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((ms(), code.unwrap_or_else(|| "connection closed".to_owned())));
            }
            Err(_) => {
                conn = None;
                errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((ms(), "timeout".to_owned()));
            }
        }
        let jitter = rand::random_range(0.5..1.5);
        // Think time of the simulated application, not a wait on a condition.
        tokio::time::sleep(think.mul_f64(jitter)).await;
    }
}

/// Whether an error is what a failover may give a client: the connection or the
/// transaction lost (class 08, 40, the backend terminated).
fn retryable(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("40")
        || code == "57P01"
        || code == "connection closed"
}

fn report_soak(
    samples: &[Sample],
    failovers: &[(u64, u64, String)],
    errors: &ErrorLog,
    ops: u64,
    t0: Instant,
) -> anyhow::Result<()> {
    println!("\nfailovers:");
    for (start, end, what) in failovers {
        println!(
            "- at {:.0} s: {what}, converged in {:.1} s",
            *start as f64 / 1000.0,
            (end - start) as f64 / 1000.0
        );
    }
    println!(
        "\n{ops} operations in {:.0} s ({:.0}/s)",
        t0.elapsed().as_secs_f64(),
        ops as f64 / t0.elapsed().as_secs_f64()
    );
    // The trend from the second minute on (arrivals and warm-up excluded).
    let steady: Vec<&Sample> = samples.iter().filter(|s| s.at_s >= 60.0).collect();
    println!("\n| process | RSS at 1 min (MiB) | max (MiB) | last (MiB) | trend (MiB/min) |");
    println!("|---|---:|---:|---:|---:|");
    for (name, get) in [
        (
            "pgproxy (us-east)",
            (|s: &Sample| s.proxy) as fn(&Sample) -> u64,
        ),
        ("agents (sum of 2)", |s: &Sample| s.agents),
        ("coordinators (sum of 2)", |s: &Sample| s.coordinators),
    ] {
        let points: Vec<(f64, f64)> = steady
            .iter()
            .map(|s| (s.at_s / 60.0, mib(get(s))))
            .collect();
        let first = points.first().map_or(0.0, |p| p.1);
        let last = points.last().map_or(0.0, |p| p.1);
        let max = points.iter().map(|p| p.1).fold(0.0, f64::max);
        println!(
            "| {name} | {first:.1} | {max:.1} | {last:.1} | {:+.2} |",
            slope(&points)
        );
    }
    let errors = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let in_failover = |at: u64| {
        failovers.iter().any(|(s, e, _)| {
            at >= *s && at <= e + u64::try_from(FAILOVER_TAIL.as_millis()).unwrap_or(0)
        })
    };
    let mut by_code: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (at, code) in &errors {
        let entry = by_code.entry(code.clone()).or_default();
        if in_failover(*at) {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }
    println!("\n| client error | during failovers | outside |");
    println!("|---|---:|---:|");
    for (code, (inside, outside)) in &by_code {
        println!("| {code} | {inside} | {outside} |");
    }
    if by_code.is_empty() {
        println!("| none | 0 | 0 |");
    }
    let bad: Vec<String> = by_code
        .iter()
        .filter(|(code, (_, outside))| *outside > 0 || !retryable(code))
        .map(|(code, (i, o))| format!("{code} ({i} during failovers, {o} outside)"))
        .collect();
    anyhow::ensure!(
        bad.is_empty(),
        "errors outside failovers or not retryable: {}",
        bad.join(", ")
    );
    println!("\nverdict: only retryable errors, all during failovers");
    Ok(())
}

async fn idle(cluster: &LocalCluster, clients: usize, steps: usize) -> anyhow::Result<()> {
    let proxy = cluster
        .proxies
        .iter()
        .find(|p| p.region == "us-east")
        .context("no us-east proxy")?;
    let dsn = proxy.dsn();
    // One session first, so that the pool and the caches exist before the baseline.
    connect(&dsn).await?.simple_query("SELECT 1").await?;
    let base = rss_kib(proxy.pid());
    println!("| idle clients | proxy RSS (MiB) | growth per client (KiB) |");
    println!("|---:|---:|---:|");
    println!("| 0 | {:.1} | |", mib(base));
    let mut held: Vec<Client> = Vec::with_capacity(clients);
    let steps = steps.max(1);
    for step in 1..=steps {
        let target = clients * step / steps;
        let new: Vec<anyhow::Result<Client>> = futures::stream::iter(held.len()..target)
            .map(|_| {
                let dsn = dsn.clone();
                async move {
                    let c = connect(&dsn).await?;
                    c.simple_query("SELECT 1").await?;
                    anyhow::Ok(c)
                }
            })
            .buffer_unordered(100)
            .collect()
            .await;
        for c in new {
            held.push(c.context("an idle client could not log in")?);
        }
        let rss = rss_kib(proxy.pid());
        println!(
            "| {} | {:.1} | {:.1} |",
            held.len(),
            mib(rss),
            rss.saturating_sub(base) as f64 / held.len() as f64
        );
    }
    // Every one of them is still there and answers.
    let closed = held.iter().filter(|c| c.is_closed()).count();
    anyhow::ensure!(closed == 0, "{closed} idle clients were disconnected");
    Ok(())
}
