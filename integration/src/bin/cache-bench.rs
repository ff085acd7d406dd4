//! Regional cache, invalidation propagation and read-your-writes benchmark (issue 4).
//!
//! Starts a local cluster (three regions by default, one-way WAN delays
//! us-east:us-west=35ms, us-east:eu-west=40ms, us-west:eu-west=70ms on the Postgres links)
//! and prints three markdown tables:
//!
//! 1. **Cache hit latency** per region's proxy, simple and prepared (extended) protocol,
//!    next to the same read uncached through the proxy (a text without the cache
//!    comment, served by a replica), direct to the region's own node, and direct to it
//!    through the launcher's zero-delay same-region link (the proxy's path). The proxy's
//!    `cache_lookups_total{outcome="hit"}` is read before and after every run, so the table
//!    shows how many of the timed queries really were hits.
//! 2. **Invalidation propagation**: a pub/sub subscriber on `meridian:invalidate` in every
//!    region's Redis, single-row updates committed (paced) through the primary region's
//!    proxy; per region, the time from the client's COMMIT acknowledgement (and, as an
//!    upper bound, from the start of the COMMIT) to the event's arrival. An event belongs
//!    to the first commit whose preceding WAL insert position (read on the primary just
//!    before the transaction) it exceeds: the bench is the only writer of that table.
//! 3. **Read-your-writes**: in each non-primary region a session inserts through its
//!    local proxy and at once reads the row back (`inet_server_port()` tells who served
//!    it); next to plain reads of old rows by a session that never writes. Then, in one
//!    region, again with `recovery_min_apply_delay` on its replica only (reads may go to
//!    another region's replica) and on every replica (reads fall back to the primary
//!    after `ryw_wait`). The proxy's `ryw_reads_total` and `ryw_wait_seconds` are read
//!    around each run.
//!
//! Limits: everything runs on one host (the numbers include the client library and the
//! bench's own scheduling; the launcher's userspace WAN links run inside this process);
//! the local cluster delays only Postgres traffic, not the agents' and coordinators'
//! QUIC control path, so the invalidation numbers exclude the WAN delay a real
//! deployment adds there.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/cache-bench --bin-dir target/release
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use meridian_integration::{eventually, probe};
use meridian_launcher::{connect, ClusterSpec, LocalCluster, WanDelays};
use meridian_shared::cache_keys::{InvalidationEvent, INVALIDATE_CHANNEL};
use meridian_shared::lsn::Lsn;
use tokio_postgres::{Client, SimpleQueryMessage};

#[derive(Parser, Debug)]
#[command(
    about = "Regional cache hit latency, invalidation propagation and read-your-writes \
             on a local multi-region cluster (issue 4); prints markdown tables",
    after_help = "The Meridian programs must be built first: \
                  cargo build --release --workspace --bins"
)]
struct Args {
    /// Directory of meridian-agent, meridian-coordinator, meridian-pgproxy and meridianctl
    /// (default: this program's directory).
    #[arg(long, env = "MERIDIAN_BIN_DIR", value_name = "DIR")]
    bin_dir: Option<std::path::PathBuf>,
    /// Comma-separated regions; the first one's node is the primary.
    #[arg(long, default_value = "us-east,us-west,eu-west", value_delimiter = ',')]
    regions: Vec<String>,
    /// One-way WAN delays between regions (REGION:REGION=DELAY,...; empty: none).
    #[arg(
        long,
        value_name = "A:B=DELAY,...",
        default_value = "us-east:us-west=35ms,us-east:eu-west=40ms,us-west:eu-west=70ms"
    )]
    wan_delay: String,
    /// Phases to run: hit, inval, ryw (comma-separated).
    #[arg(long, default_value = "hit,inval,ryw", value_delimiter = ',')]
    phases: Vec<String>,
    /// Sequential queries per latency measurement (cache hit, uncached, direct).
    #[arg(long, default_value_t = 2000)]
    queries: usize,
    /// Queries per uncached measurement when the proxy's reads go to another region's
    /// replica (every query pays a WAN round trip).
    #[arg(long, default_value_t = 100)]
    remote_queries: usize,
    /// Untimed queries before each latency measurement.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Single-row updates committed through the primary region's proxy.
    #[arg(long, default_value_t = 200)]
    updates: usize,
    /// Pause between two updates.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    update_interval: Duration,
    /// Write-then-read pairs per non-primary region (and plain reads of old rows).
    #[arg(long, default_value_t = 200)]
    ryw_writes: usize,
    /// `recovery_min_apply_delay` for two more read-your-writes runs in one region: set on
    /// that region's replica only, then on every replica (0s: skip both). Above the
    /// proxies' `ryw_wait` (200 ms), post-write reads cannot wait for a delayed replica.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    apply_delay: Duration,
    /// Region of the apply-delay runs (default: the first region without the primary).
    #[arg(long)]
    apply_delay_region: Option<String>,
}

/// Text and prepared forms of the read measured in the hit table.
const CACHED_SIMPLE: &str = "/* meridian:cache ttl=60s */ SELECT k, v FROM bench_items WHERE k = 1";
const CACHED_PREPARED: &str =
    "/* meridian:cache ttl=60s */ SELECT k, v FROM bench_items WHERE k = $1";
const PLAIN_SIMPLE: &str = "SELECT k, v FROM bench_items WHERE k = 1";
const PLAIN_PREPARED: &str = "SELECT k, v FROM bench_items WHERE k = $1";
/// The table the invalidation phase updates, as the events name it.
const INVAL_TABLE: &str = "public.bench_inval";
/// Old rows of the read-your-writes table (ids 1..=OLD_ROWS).
const OLD_ROWS: i64 = 100;

// ---------------------------------------------------------------------------------------
// Pure helpers: statistics, matching events to commits, who served a read.

/// Summary of a sample of durations, in milliseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    mean: f64,
    max: f64,
}

impl Stats {
    /// `None` for an empty sample.
    fn of_ms(mut ms: Vec<f64>) -> Option<Stats> {
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let r = (p * ms.len() as f64).ceil() as usize;
            ms[r.clamp(1, ms.len()) - 1]
        };
        Some(Stats {
            n: ms.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            max: ms[ms.len() - 1],
        })
    }

    fn of(d: &[Duration]) -> Option<Stats> {
        Stats::of_ms(d.iter().map(|d| d.as_secs_f64() * 1e3).collect())
    }
}

/// One received invalidation event: when (since the bench's time base) and what.
#[derive(Debug, Clone)]
struct Arrival {
    at: Duration,
    event: InvalidationEvent,
}

/// When the invalidation of a commit arrived: the earliest event naming `table` whose LSN
/// is above `before`, the WAL insert position read just before the commit's transaction
/// began. With a single writer of `table` committing sequentially, that is the event of
/// this commit (or of a batch that contains it); earlier commits end at or below `before`.
fn arrival_of(before: Lsn, table: &str, events: &[Arrival]) -> Option<Duration> {
    events
        .iter()
        .filter(|a| a.event.lsn > before && a.event.tables.iter().any(|t| t == table))
        .map(|a| a.at)
        .min()
}

/// A time difference `later - earlier` in milliseconds, negative when `later` is earlier.
fn signed_ms(later: Duration, earlier: Duration) -> f64 {
    later.as_secs_f64() * 1e3 - earlier.as_secs_f64() * 1e3
}

/// Who answered a read, from `inet_server_port()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    LocalReplica,
    Primary,
    Other,
}

fn served_by(port: u16, local_replica: u16, primary: u16) -> Served {
    if port == local_replica {
        Served::LocalReplica
    } else if port == primary {
        Served::Primary
    } else {
        Served::Other
    }
}

fn fmt_ms(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn fmt_us(ms: f64) -> String {
    format!("{:.0}", ms * 1e3)
}

// ---------------------------------------------------------------------------------------
// I/O helpers.

fn first_row(msgs: &[SimpleQueryMessage]) -> Option<&tokio_postgres::SimpleQueryRow> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    })
}

async fn metric(cluster: &LocalCluster, region: &str, series: &str) -> anyhow::Result<f64> {
    probe::proxy_metric(&cluster.proxy(region)?.admin_addr, series).await
}

/// Every outcome of `cache_lookups_total` (docs/cache.md, "Metrics").
const LOOKUP_OUTCOMES: [&str; 7] = [
    "hit", "miss", "stale", "timeout", "error", "bypass", "unusable",
];

/// The proxy's cache lookup counters, in [`LOOKUP_OUTCOMES`] order.
async fn lookups(cluster: &LocalCluster, region: &str) -> anyhow::Result<[f64; 7]> {
    let mut out = [0.0; 7];
    for (slot, outcome) in out.iter_mut().zip(LOOKUP_OUTCOMES) {
        *slot = metric(
            cluster,
            region,
            &format!("cache_lookups_total{{outcome=\"{outcome}\"}}"),
        )
        .await?;
    }
    Ok(out)
}

/// The non-hit lookup outcomes between two readings, e.g. `timeout 2`; `–` when none.
fn other_outcomes(before: &[f64; 7], after: &[f64; 7]) -> String {
    let parts: Vec<String> = LOOKUP_OUTCOMES
        .iter()
        .zip(before.iter().zip(after))
        .skip(1)
        .filter(|(_, (b, a))| *a > *b)
        .map(|(name, (b, a))| format!("{name} {:.0}", a - b))
        .collect();
    if parts.is_empty() {
        "–".into()
    } else {
        parts.join(", ")
    }
}

async fn hits(cluster: &LocalCluster, region: &str) -> anyhow::Result<f64> {
    metric(cluster, region, "cache_lookups_total{outcome=\"hit\"}").await
}

/// The port of the server that answers `SELECT inet_server_port()` through `c`.
async fn server_port(c: &Client) -> anyhow::Result<u16> {
    Ok(probe::simple_value(c, "SELECT inet_server_port()")
        .await?
        .context("no row")?
        .parse()?)
}

/// Node name by Postgres port.
fn node_names(cluster: &LocalCluster) -> BTreeMap<u16, String> {
    cluster
        .nodes
        .iter()
        .map(|n| (n.pg_port, n.name.clone()))
        .collect()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// How a latency sample is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Simple,
    Prepared,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Prepared => "prepared (extended)",
        }
    }
}

/// `n` sequential executions of `sql` (simple) or of its prepared form with `k = 1`,
/// each timed at the client; every execution must return a row.
async fn time_reads(
    c: &Client,
    protocol: Protocol,
    simple: &str,
    prepared: &str,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    match protocol {
        Protocol::Simple => {
            for _ in 0..n {
                let t = Instant::now();
                let msgs = c.simple_query(simple).await?;
                out.push(t.elapsed());
                anyhow::ensure!(first_row(&msgs).is_some(), "{simple}: no row");
            }
        }
        Protocol::Prepared => {
            let stmt = c.prepare(prepared).await?;
            for _ in 0..n {
                let t = Instant::now();
                let rows = c.query(&stmt, &[&1i32]).await?;
                out.push(t.elapsed());
                anyhow::ensure!(rows.len() == 1, "{prepared}: {} rows", rows.len());
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Phase 1: cache hit latency.

struct HitRow {
    region: String,
    protocol: Protocol,
    path: String,
    served: String,
    stats: Option<Stats>,
    /// `(hits counted by the proxy during the run, queries sent: warm-up and timed)`.
    hits: Option<(f64, usize)>,
    /// Other lookup outcomes counted during a cached run.
    others: String,
}

/// A timed run: the read's samples and the server port of the connection after it.
struct Timed {
    samples: Vec<Duration>,
    port: u16,
}

/// `warmup` untimed then `n` timed reads on a new connection to `dsn`, driven by a
/// single-threaded runtime on a thread of its own: the client and its connection task
/// share that thread, so the samples carry no cross-thread wake-ups of the bench's own
/// (the launcher's links and the metric reads stay on the main runtime).
async fn time_isolated(
    dsn: String,
    protocol: Protocol,
    sql: (&'static str, &'static str),
    warmup: usize,
    n: usize,
) -> anyhow::Result<Timed> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let run = async {
            let c = connect(&dsn).await?;
            time_reads(&c, protocol, sql.0, sql.1, warmup).await?;
            let samples = time_reads(&c, protocol, sql.0, sql.1, n).await?;
            let port = server_port(&c).await?;
            anyhow::Ok(Timed { samples, port })
        };
        let r = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run));
        let _ = tx.send(r);
    });
    rx.await.context("the timing thread died")?
}

const CACHED: (&str, &str) = (CACHED_SIMPLE, CACHED_PREPARED);
const PLAIN: (&str, &str) = (PLAIN_SIMPLE, PLAIN_PREPARED);

async fn phase_hits(cluster: &LocalCluster, args: &Args) -> anyhow::Result<Vec<HitRow>> {
    let setup = connect(&cluster.proxy(&args.regions[0])?.dsn()).await?;
    setup
        .batch_execute(
            "CREATE TABLE bench_items (k int PRIMARY KEY, v text NOT NULL); \
             INSERT INTO bench_items SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 1000) g",
        )
        .await?;
    let names = node_names(cluster);
    let mut rows = Vec::new();
    for region in &args.regions {
        let proxy = cluster.proxy(region)?;
        let node = cluster
            .nodes
            .iter()
            .find(|n| &n.region == region)
            .with_context(|| format!("no node in {region}"))?;
        // The row must be on the region's node before anything is timed.
        let direct_dsn = node.direct_dsn("app");
        let direct = connect(&direct_dsn).await?;
        let linked_dsn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=app connect_timeout=2",
            node.ingress.local_addr().port()
        );
        eventually(
            Duration::from_secs(30),
            &format!("bench_items on {}", node.name),
            || async {
                let n = probe::simple_value(&direct, "SELECT count(*) FROM bench_items").await?;
                anyhow::ensure!(n.as_deref() == Some("1000"), "{n:?} rows");
                Ok(())
            },
        )
        .await?;
        let c = connect(&proxy.dsn()).await?;
        for protocol in [Protocol::Simple, Protocol::Prepared] {
            eprintln!("hit latency: {region}, {}", protocol.name());
            // Fill the entry and wait until it is served from the cache.
            eventually(
                Duration::from_secs(30),
                &format!("a cache hit in {region} ({})", protocol.name()),
                || async {
                    let before = hits(cluster, region).await?;
                    time_reads(&c, protocol, CACHED_SIMPLE, CACHED_PREPARED, 1).await?;
                    anyhow::ensure!(hits(cluster, region).await? > before, "not a hit yet");
                    Ok(())
                },
            )
            .await?;
            let before = lookups(cluster, region).await?;
            let cached =
                time_isolated(proxy.dsn(), protocol, CACHED, args.warmup, args.queries).await?;
            let after = lookups(cluster, region).await?;
            rows.push(HitRow {
                region: region.clone(),
                protocol,
                path: "cache hit through the proxy".into(),
                served: format!("{region} Redis"),
                stats: Stats::of(&cached.samples),
                hits: Some((after[0] - before[0], args.warmup + args.queries)),
                others: other_outcomes(&before, &after),
            });

            // The uncached read goes where the proxy sends this session's reads: the
            // region's replica, or the nearest one across the WAN.
            let remote = server_port(&c).await? != node.pg_port;
            let n = if remote {
                args.remote_queries
            } else {
                args.queries
            };
            let before = hits(cluster, region).await?;
            let uncached =
                time_isolated(proxy.dsn(), protocol, PLAIN, args.warmup.min(n), n).await?;
            let counted = hits(cluster, region).await? - before;
            anyhow::ensure!(counted == 0.0, "{counted} uncached reads were cache hits");
            let server = names
                .get(&uncached.port)
                .cloned()
                .unwrap_or_else(|| format!("port {}", uncached.port));
            rows.push(HitRow {
                region: region.clone(),
                protocol,
                path: "uncached through the proxy".into(),
                served: if uncached.port != node.pg_port {
                    format!("{server} (no replica in {region}: WAN round trip)")
                } else {
                    server
                },
                stats: Stats::of(&uncached.samples),
                hits: None,
                others: "–".into(),
            });

            let direct_run = time_isolated(
                direct_dsn.clone(),
                protocol,
                PLAIN,
                args.warmup,
                args.queries,
            )
            .await?;
            rows.push(HitRow {
                region: region.clone(),
                protocol,
                path: format!("direct to {}", node.name),
                served: format!("{} ({})", node.name, node.initial_role),
                stats: Stats::of(&direct_run.samples),
                hits: None,
                others: "–".into(),
            });

            // The proxy reaches its region's node through the launcher's zero-delay link
            // (in this process); the same read through that link shows what it adds.
            let linked_run = time_isolated(
                linked_dsn.clone(),
                protocol,
                PLAIN,
                args.warmup,
                args.queries,
            )
            .await?;
            rows.push(HitRow {
                region: region.clone(),
                protocol,
                path: format!(
                    "direct to {} through the launcher's same-region link",
                    node.name
                ),
                served: format!("{} ({})", node.name, node.initial_role),
                stats: Stats::of(&linked_run.samples),
                hits: None,
                others: "–".into(),
            });
        }
    }
    Ok(rows)
}

fn print_hits(rows: &[HitRow]) {
    println!("| region | protocol | path | served by | queries | p50 (µs) | p99 (µs) | mean (µs) | hits counted by the proxy | other lookup outcomes |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (n, p50, p99, mean) = match r.stats {
            Some(s) => (
                s.n.to_string(),
                fmt_us(s.p50),
                fmt_us(s.p99),
                fmt_us(s.mean),
            ),
            None => ("0".into(), "–".into(), "–".into(), "–".into()),
        };
        let hits = match r.hits {
            Some((counted, n)) if counted as usize == n => format!("{counted:.0}/{n}"),
            Some((counted, n)) => format!("**{counted:.0}/{n}**"),
            None => "–".into(),
        };
        println!(
            "| {} | {} | {} | {} | {n} | {p50} | {p99} | {mean} | {hits} | {} |",
            r.region,
            r.protocol.name(),
            r.path,
            r.served,
            r.others
        );
    }
}

// ---------------------------------------------------------------------------------------
// Phase 2: invalidation propagation.

/// Subscribes to `meridian:invalidate` on `url`; every event is appended to `into` with
/// its arrival time since `base`. Returns once the subscription is confirmed.
async fn subscribe(
    url: &str,
    base: Instant,
    into: Arc<Mutex<Vec<Arrival>>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut pubsub = redis::Client::open(url)?.get_async_pubsub().await?;
    pubsub.subscribe(INVALIDATE_CHANNEL).await?;
    Ok(tokio::spawn(async move {
        let mut stream = pubsub.into_on_message();
        while let Some(msg) = stream.next().await {
            let at = base.elapsed();
            let payload: String = match msg.get_payload() {
                Ok(p) => p,
                Err(_) => continue,
            };
            if let Ok(event) = serde_json::from_str::<InvalidationEvent>(&payload) {
                into.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Arrival { at, event });
            }
        }
    }))
}

struct Commit {
    before: Lsn,
    start: Duration,
    ack: Duration,
}

struct InvalRow {
    region: String,
    wan: Duration,
    matched: usize,
    from_ack: Option<Stats>,
    from_start: Option<Stats>,
}

struct InvalResult {
    primary_region: String,
    commits: usize,
    commit_latency: Option<Stats>,
    rows: Vec<InvalRow>,
}

async fn insert_lsn(primary: &Client) -> anyhow::Result<Lsn> {
    let text = probe::simple_value(primary, "SELECT pg_current_wal_insert_lsn()::text")
        .await?
        .context("no insert LSN")?;
    Ok(text.parse()?)
}

/// One update through `c` as `BEGIN; UPDATE; COMMIT`, the COMMIT timed.
async fn one_update(c: &Client, primary: &Client, base: Instant, v: i64) -> anyhow::Result<Commit> {
    let before = insert_lsn(primary).await?;
    c.batch_execute("BEGIN").await?;
    c.batch_execute(&format!("UPDATE bench_inval SET v = {v} WHERE k = 1"))
        .await?;
    let start = base.elapsed();
    c.batch_execute("COMMIT").await?;
    let ack = base.elapsed();
    Ok(Commit { before, start, ack })
}

async fn phase_inval(cluster: &LocalCluster, args: &Args) -> anyhow::Result<InvalResult> {
    let leader = cluster.leader().await?.context("no leader")?;
    let primary_region = leader.region.clone();
    let primary = connect(&cluster.node(&leader.node)?.direct_dsn("app")).await?;
    let c = connect(&cluster.proxy(&primary_region)?.dsn()).await?;
    c.batch_execute(
        "CREATE TABLE bench_inval (k int PRIMARY KEY, v bigint NOT NULL); \
         INSERT INTO bench_inval VALUES (1, 0)",
    )
    .await?;
    let base = Instant::now();
    let mut events: BTreeMap<String, Arc<Mutex<Vec<Arrival>>>> = BTreeMap::new();
    let mut tasks = Vec::new();
    for region in &args.regions {
        let into = Arc::new(Mutex::new(Vec::new()));
        tasks.push(subscribe(&cluster.redis_url(region)?, base, into.clone()).await?);
        events.insert(region.clone(), into);
    }
    let snapshot = |region: &str| -> Vec<Arrival> {
        events
            .get(region)
            .map(|e| e.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    };
    // The pipeline works end to end before anything is timed: a first update reaches
    // every region.
    let warm = one_update(&c, &primary, base, -1).await?;
    for region in &args.regions {
        eventually(
            Duration::from_secs(30),
            &format!("the first invalidation event in {region}"),
            || async {
                anyhow::ensure!(arrival_of(warm.before, INVAL_TABLE, &snapshot(region)).is_some());
                Ok(())
            },
        )
        .await?;
    }
    eprintln!(
        "invalidation: {} updates through {primary_region}'s proxy",
        args.updates
    );
    let mut commits = Vec::with_capacity(args.updates);
    let mut tick = tokio::time::interval(args.update_interval);
    for i in 0..args.updates {
        tick.tick().await;
        commits.push(one_update(&c, &primary, base, i as i64 + 1).await?);
    }
    // Every commit's event in every region, or the deadline.
    let last = commits.last().map(|c| c.before).unwrap_or(warm.before);
    for region in &args.regions {
        let waited = eventually(
            Duration::from_secs(20),
            &format!("the last invalidation event in {region}"),
            || async {
                anyhow::ensure!(arrival_of(last, INVAL_TABLE, &snapshot(region)).is_some());
                Ok(())
            },
        )
        .await;
        if let Err(e) = waited {
            eprintln!("{e:#}");
        }
    }
    for t in tasks {
        t.abort();
    }
    let mut rows = Vec::new();
    for region in &args.regions {
        let arrivals = snapshot(region);
        let mut from_ack = Vec::new();
        let mut from_start = Vec::new();
        for commit in &commits {
            if let Some(at) = arrival_of(commit.before, INVAL_TABLE, &arrivals) {
                from_ack.push(signed_ms(at, commit.ack));
                from_start.push(signed_ms(at, commit.start));
            }
        }
        rows.push(InvalRow {
            region: region.clone(),
            wan: cluster.spec.wan_delays.get(&primary_region, region),
            matched: from_ack.len(),
            from_ack: Stats::of_ms(from_ack),
            from_start: Stats::of_ms(from_start),
        });
    }
    Ok(InvalResult {
        primary_region,
        commits: commits.len(),
        commit_latency: Stats::of_ms(commits.iter().map(|c| signed_ms(c.ack, c.start)).collect()),
        rows,
    })
}

fn print_inval(r: &InvalResult) {
    if let Some(s) = r.commit_latency {
        println!(
            "{} commits through {}'s proxy; COMMIT round trip at the client p50 {} ms, p99 {} ms.",
            r.commits,
            r.primary_region,
            fmt_ms(s.p50),
            fmt_ms(s.p99)
        );
        println!();
    }
    println!("| region | one-way WAN delay from {} (Postgres links) | events matched | ack → event p50 (ms) | p99 (ms) | max (ms) | COMMIT start → event p50 (ms) | p99 (ms) | max (ms) |", r.primary_region);
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        let three = |s: Option<Stats>| match s {
            Some(s) => format!("{} | {} | {}", fmt_ms(s.p50), fmt_ms(s.p99), fmt_ms(s.max)),
            None => "– | – | –".into(),
        };
        println!(
            "| {} | {} ms | {}/{} | {} | {} |",
            row.region,
            row.wan.as_millis(),
            row.matched,
            r.commits,
            three(row.from_ack),
            three(row.from_start)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Phase 3: read-your-writes.

struct RywRow {
    region: String,
    config: String,
    writes: usize,
    local: usize,
    primary: usize,
    other: usize,
    missing: usize,
    write: Option<Stats>,
    post_write_read: Option<Stats>,
    plain_read: Option<Stats>,
    plain_local: usize,
    /// Proxy counters during the run: replica_immediate, replica_after_wait, primary_fallback.
    outcomes: [f64; 3],
    /// Mean time a post-write read spent in the proxy's read-your-writes wait
    /// (`ryw_wait_seconds` sum / count over the run), ms.
    proxy_wait_ms: Option<f64>,
}

const RYW_OUTCOMES: [&str; 3] = [
    "replica_immediate",
    "replica_after_wait",
    "primary_fallback",
];

/// The proxy's read-your-writes counters, then `ryw_wait_seconds` sum and count.
async fn ryw_outcomes(cluster: &LocalCluster, region: &str) -> anyhow::Result<[f64; 5]> {
    let mut out = [0.0; 5];
    for (slot, outcome) in out.iter_mut().zip(RYW_OUTCOMES) {
        *slot = metric(
            cluster,
            region,
            &format!("ryw_reads_total{{outcome=\"{outcome}\"}}"),
        )
        .await?;
    }
    out[3] = metric(cluster, region, "ryw_wait_seconds_sum").await?;
    out[4] = metric(cluster, region, "ryw_wait_seconds_count").await?;
    Ok(out)
}

/// Parses `(inet_server_port(), v)` from a read.
fn port_and_value(msgs: &[SimpleQueryMessage]) -> anyhow::Result<(u16, Option<String>)> {
    let row = first_row(msgs).context("no row")?;
    let port = row.get(0).context("NULL port")?.parse()?;
    Ok((port, row.get(1).map(str::to_owned)))
}

async fn ryw_run(
    cluster: &LocalCluster,
    region: &str,
    config: &str,
    first_id: i64,
    writes: usize,
) -> anyhow::Result<RywRow> {
    let leader = cluster.leader().await?.context("no leader")?;
    let primary_port = cluster.node(&leader.node)?.pg_port;
    let replica = cluster
        .nodes
        .iter()
        .find(|n| n.region == region)
        .with_context(|| format!("no node in {region}"))?;
    let dsn = cluster.proxy(region)?.dsn();
    // Reads of a fresh session land on the region's replica.
    eventually(
        Duration::from_secs(30),
        &format!("{region}'s reads on its replica"),
        || {
            let dsn = dsn.clone();
            async move {
                let p = server_port(&connect(&dsn).await?).await?;
                anyhow::ensure!(p == replica.pg_port, "read served by port {p}");
                Ok(())
            }
        },
    )
    .await?;
    let writer = connect(&dsn).await?;
    let reader = connect(&dsn).await?;
    let before = ryw_outcomes(cluster, region).await?;
    let (mut local, mut primary, mut other, mut missing) = (0, 0, 0, 0);
    let mut write_t = Vec::with_capacity(writes);
    let mut read_t = Vec::with_capacity(writes);
    for i in 0..writes {
        let id = first_id + i as i64;
        let t0 = Instant::now();
        writer
            .batch_execute(&format!("INSERT INTO bench_ryw VALUES ({id}, 'w{id}')"))
            .await?;
        let t1 = Instant::now();
        let msgs = writer
            .simple_query(&format!(
                "SELECT inet_server_port(), v FROM bench_ryw WHERE id = {id}"
            ))
            .await?;
        let t2 = Instant::now();
        write_t.push(t1 - t0);
        read_t.push(t2 - t1);
        let (port, v) = port_and_value(&msgs)?;
        if v.as_deref() != Some(&*format!("w{id}")) {
            missing += 1;
        }
        match served_by(port, replica.pg_port, primary_port) {
            Served::LocalReplica => local += 1,
            Served::Primary => primary += 1,
            Served::Other => other += 1,
        }
    }
    let after = ryw_outcomes(cluster, region).await?;
    let mut plain_t = Vec::with_capacity(writes);
    let mut plain_local = 0;
    for i in 0..writes {
        let id = (i as i64 % OLD_ROWS) + 1;
        let t = Instant::now();
        let msgs = reader
            .simple_query(&format!(
                "SELECT inet_server_port(), v FROM bench_ryw WHERE id = {id}"
            ))
            .await?;
        plain_t.push(t.elapsed());
        let (port, v) = port_and_value(&msgs)?;
        anyhow::ensure!(v.is_some(), "old row {id} missing through {region}");
        if port == replica.pg_port {
            plain_local += 1;
        }
    }
    Ok(RywRow {
        region: region.to_owned(),
        config: config.to_owned(),
        writes,
        local,
        primary,
        other,
        missing,
        write: Stats::of(&write_t),
        post_write_read: Stats::of(&read_t),
        plain_read: Stats::of(&plain_t),
        plain_local,
        outcomes: [
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
        ],
        proxy_wait_ms: (after[4] > before[4])
            .then(|| (after[3] - before[3]) / (after[4] - before[4]) * 1e3),
    })
}

/// Sets (or with `None` resets) `recovery_min_apply_delay` on `node` and waits until it
/// is in effect.
async fn set_apply_delay(
    cluster: &LocalCluster,
    node: &str,
    delay: Option<Duration>,
) -> anyhow::Result<()> {
    let c = connect(&cluster.node(node)?.direct_dsn("postgres")).await?;
    let want = match delay {
        Some(d) => {
            let ms = d.as_millis();
            c.batch_execute(&format!(
                "ALTER SYSTEM SET recovery_min_apply_delay = '{ms}ms'"
            ))
            .await?;
            ms
        }
        None => {
            c.batch_execute("ALTER SYSTEM RESET recovery_min_apply_delay")
                .await?;
            0
        }
    };
    c.batch_execute("SELECT pg_reload_conf()").await?;
    eventually(
        Duration::from_secs(10),
        &format!("recovery_min_apply_delay = {want}ms on {node}"),
        || async {
            let v = probe::simple_value(
                &c,
                "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'",
            )
            .await?;
            anyhow::ensure!(v.as_deref() == Some(&*want.to_string()), "{v:?}");
            Ok(())
        },
    )
    .await
}

async fn phase_ryw(cluster: &LocalCluster, args: &Args) -> anyhow::Result<Vec<RywRow>> {
    let leader = cluster.leader().await?.context("no leader")?;
    let setup = connect(&cluster.proxy(&leader.region)?.dsn()).await?;
    setup
        .batch_execute(&format!(
            "CREATE TABLE bench_ryw (id bigint PRIMARY KEY, v text NOT NULL); \
             INSERT INTO bench_ryw SELECT g, 'old' || g FROM generate_series(1, {OLD_ROWS}) g"
        ))
        .await?;
    for n in cluster.nodes.iter().filter(|n| n.name != leader.node) {
        let c = connect(&n.direct_dsn("app")).await?;
        eventually(
            Duration::from_secs(30),
            &format!("old rows on {}", n.name),
            || async {
                let v = probe::simple_value(&c, "SELECT count(*) FROM bench_ryw").await?;
                anyhow::ensure!(v.as_deref() == Some(&*OLD_ROWS.to_string()), "{v:?}");
                Ok(())
            },
        )
        .await?;
    }
    let mut rows = Vec::new();
    let others: Vec<(usize, &String)> = args
        .regions
        .iter()
        .enumerate()
        .filter(|(_, r)| **r != leader.region)
        .collect();
    for (i, region) in &others {
        eprintln!("read-your-writes: {region}");
        let first_id = (*i as i64 + 1) * 1_000_000;
        rows.push(ryw_run(cluster, region, "default", first_id, args.ryw_writes).await?);
    }
    if !args.apply_delay.is_zero() {
        let region = match &args.apply_delay_region {
            Some(r) => r.clone(),
            None => others
                .first()
                .map(|(_, r)| (*r).clone())
                .context("no replica region")?,
        };
        let node = cluster
            .nodes
            .iter()
            .find(|n| n.region == region)
            .with_context(|| format!("--apply-delay-region: no node in {region}"))?
            .name
            .clone();
        anyhow::ensure!(
            node != leader.node,
            "--apply-delay-region: {region} holds the primary"
        );
        let delay = humantime::format_duration(args.apply_delay).to_string();
        // (a) Only the region's own replica lags: post-write reads may go to another
        // region's replica that has replayed the commit. (b) Every replica lags: they must
        // fall back to the primary after `ryw_wait`.
        let replicas: Vec<String> = cluster
            .nodes
            .iter()
            .filter(|n| n.name != leader.node)
            .map(|n| n.name.clone())
            .collect();
        let configs = [
            (
                vec![node.clone()],
                format!("recovery_min_apply_delay = {delay} on {node} only"),
            ),
            (
                replicas.clone(),
                format!("recovery_min_apply_delay = {delay} on every replica"),
            ),
        ];
        let mut result = Ok(());
        for (k, (delayed, config)) in configs.iter().enumerate() {
            eprintln!("read-your-writes: {region} with {config}");
            for n in delayed {
                set_apply_delay(cluster, n, Some(args.apply_delay)).await?;
            }
            let first_id = 50_000_000 + k as i64 * 1_000_000;
            match ryw_run(cluster, &region, config, first_id, args.ryw_writes).await {
                Ok(row) => rows.push(row),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        for n in &replicas {
            set_apply_delay(cluster, n, None).await?;
        }
        result?;
    }
    Ok(rows)
}

fn print_ryw(rows: &[RywRow]) {
    println!("| region | configuration | writes | post-write reads on local replica / primary / another region's replica | rows missing | write p50 (ms) | post-write read p50 (ms) | p99 (ms) | plain read of an old row p50 (ms) | p99 (ms) | plain reads on local replica | proxy ryw_reads_total: immediate / after wait / primary fallback | mean ryw wait in the proxy (ms) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let p = |s: Option<Stats>, f: fn(&Stats) -> f64| {
        s.map(|s| fmt_ms(f(&s))).unwrap_or_else(|| "–".into())
    };
    for r in rows {
        println!(
            "| {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} | {}/{} | {:.0} / {:.0} / {:.0} | {} |",
            r.region,
            r.config,
            r.writes,
            r.local,
            r.primary,
            r.other,
            r.missing,
            p(r.write, |s| s.p50),
            p(r.post_write_read, |s| s.p50),
            p(r.post_write_read, |s| s.p99),
            p(r.plain_read, |s| s.p50),
            p(r.plain_read, |s| s.p99),
            r.plain_local,
            r.writes,
            r.outcomes[0],
            r.outcomes[1],
            r.outcomes[2],
            r.proxy_wait_ms.map(fmt_ms).unwrap_or_else(|| "–".into()),
        );
    }
}

// ---------------------------------------------------------------------------------------

async fn bench(cluster: &LocalCluster, args: &Args) -> anyhow::Result<()> {
    let load_start = load_average();
    let want = |p: &str| args.phases.iter().any(|x| x == p);
    if want("hit") {
        let rows = phase_hits(cluster, args).await?;
        println!(
            "### Cache hit latency ({} sequential queries per row)\n",
            args.queries
        );
        print_hits(&rows);
        println!();
    }
    if want("inval") {
        let r = phase_inval(cluster, args).await?;
        println!("### Invalidation propagation\n");
        print_inval(&r);
        println!();
    }
    if want("ryw") {
        let rows = phase_ryw(cluster, args).await?;
        println!("### Read-your-writes (ryw_wait 200 ms, the default)\n");
        print_ryw(&rows);
        println!();
    }
    println!(
        "Load average (1/5/15 min) at the start of the measurements: {load_start}; at the end: {}.",
        load_average()
    );
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    for p in &args.phases {
        anyhow::ensure!(
            matches!(p.as_str(), "hit" | "inval" | "ryw"),
            "--phases: unknown phase {p:?} (hit, inval, ryw)"
        );
    }
    anyhow::ensure!(args.regions.len() >= 2, "--regions: at least two regions");
    let dir = tempfile::Builder::new()
        .prefix("meridian-cache-bench-")
        .tempdir()?;
    let regions: Vec<&str> = args.regions.iter().map(String::as_str).collect();
    let mut spec = ClusterSpec::new(dir.path(), &regions);
    spec.wan_delays =
        WanDelays::parse(&args.wan_delay, &spec.regions).map_err(|e| anyhow::anyhow!(e))?;
    eprintln!(
        "starting a local cluster: regions {}, WAN delay {}",
        args.regions.join(","),
        spec.wan_delays
    );
    let mut cluster = LocalCluster::start(spec).await?;
    println!(
        "Local cluster: regions {} (primary {}), one-way WAN delay {}.\n",
        args.regions.join(", "),
        args.regions[0],
        cluster.spec.wan_delays
    );
    let result = bench(&cluster, &args).await;
    if let Err(e) = &result {
        eprintln!("{e:#}\n{}", cluster.log_tails(30));
    }
    cluster.stop().await;
    result
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = args.bin_dir.clone();
    meridian_integration::bench::main(bin_dir.as_deref(), run(args))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use meridian_shared::epoch::Epoch;

    fn arrival(ms: u64, lsn: u64, tables: &[&str]) -> Arrival {
        Arrival {
            at: Duration::from_millis(ms),
            event: InvalidationEvent {
                tables: tables.iter().map(|t| t.to_string()).collect(),
                lsn: Lsn(lsn),
                epoch: Epoch(1),
            },
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Stats::of_ms((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((s.n, s.p50, s.p99, s.max), (100, 50.0, 99.0, 100.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
        let one = Stats::of_ms(vec![7.0]).unwrap();
        assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
        assert!(Stats::of_ms(Vec::new()).is_none());
        let d = Stats::of(&[Duration::from_micros(250), Duration::from_micros(50)]).unwrap();
        assert_eq!((d.p50, d.p99), (0.05, 0.25));
    }

    #[test]
    fn an_event_belongs_to_the_first_commit_it_exceeds() {
        let t = INVAL_TABLE;
        let events = vec![
            arrival(10, 100, &[t]),
            arrival(12, 150, &["public.other"]),
            // One batch carrying the second and third commits.
            arrival(30, 300, &["public.other", t]),
        ];
        // First commit: WAL insert position 90 before it, its event ends at 100.
        assert_eq!(
            arrival_of(Lsn(90), t, &events),
            Some(Duration::from_millis(10))
        );
        // Second commit began after 100: the other table's event does not count.
        assert_eq!(
            arrival_of(Lsn(100), t, &events),
            Some(Duration::from_millis(30))
        );
        assert_eq!(
            arrival_of(Lsn(200), t, &events),
            Some(Duration::from_millis(30))
        );
        // Not arrived (yet).
        assert_eq!(arrival_of(Lsn(300), t, &events), None);
        // Arrival order does not matter.
        let mut rev = events.clone();
        rev.reverse();
        assert_eq!(
            arrival_of(Lsn(90), t, &rev),
            Some(Duration::from_millis(10))
        );
    }

    #[test]
    fn signed_differences_and_formats() {
        let ms = Duration::from_millis;
        assert_eq!(signed_ms(ms(30), ms(10)), 20.0);
        assert_eq!(signed_ms(ms(10), ms(30)), -20.0);
        assert_eq!(fmt_ms(3.24), "3.2");
        assert_eq!(fmt_ms(123.6), "124");
        assert_eq!(fmt_us(0.0875), "88");
    }

    #[test]
    fn other_outcomes_list_the_non_hit_increases() {
        let before = [10.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(
            other_outcomes(&before, &[2010.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
            "–"
        );
        assert_eq!(
            other_outcomes(&before, &[2008.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0]),
            "timeout 2"
        );
        assert_eq!(
            other_outcomes(&before, &[10.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0]),
            "miss 2, stale 1"
        );
    }

    #[test]
    fn reads_are_attributed_by_port() {
        assert_eq!(served_by(5001, 5001, 5000), Served::LocalReplica);
        assert_eq!(served_by(5000, 5001, 5000), Served::Primary);
        assert_eq!(served_by(5002, 5001, 5000), Served::Other);
    }
}
