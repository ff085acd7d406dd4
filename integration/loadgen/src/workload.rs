//! The I/O side of the load generator: a writer task and a reader task, each
//! with one connection through the proxy that is re-opened after any error, and
//! a reporter that prints the [`Stats`] line of each interval.
//!
//! Writes insert into `meridian_loadgen` (created if missing); reads ask the
//! server that serves them for `cluster_name`, `inet_server_port()` and
//! `pg_is_in_recovery()` (all stable functions, so the proxy routes them as
//! reads) and count the region's rows.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{interval, timeout, MissedTickBehavior};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

use crate::stats::{Outcome, PortNames, Stats};

/// Settings of `meridian-loadgen run`.
pub struct RunConfig {
    pub url: String,
    pub op_timeout: Duration,
    pub region: String,
    pub writes_per_sec: u32,
    pub reads_per_sec: u32,
    pub interval: Duration,
    pub port_names: PortNames,
    pub duration: Option<Duration>,
}

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS meridian_loadgen (\
     id bigserial PRIMARY KEY, region text NOT NULL, run text NOT NULL, seq bigint NOT NULL, \
     written_at timestamptz NOT NULL DEFAULT now())";
const INSERT: &str = "INSERT INTO meridian_loadgen (region, run, seq) VALUES ($1, $2, $3)";
const READ: &str =
    "SELECT current_setting('cluster_name'), inet_server_port(), pg_is_in_recovery(), \
     (SELECT count(*) FROM meridian_loadgen WHERE region = $1)";

type Shared = Arc<Mutex<Stats>>;

fn record(stats: &Shared, outcome: Outcome) {
    // A poisoned lock only means another task panicked mid-update; counters stay usable.
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    s.record(outcome);
}

/// Short reason of an error for the report line: the SQLSTATE when there is one.
fn reason(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            if let Some(db) = pg.as_db_error() {
                return format!("{} {}", db.code().code(), db.message());
            }
            let mut text = pg.to_string();
            let mut source = std::error::Error::source(pg);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            return text;
        }
    }
    format!("{e:#}")
}

async fn connect(url: &str, op_timeout: Duration) -> anyhow::Result<Client> {
    let (client, connection) = timeout(op_timeout, tokio_postgres::connect(url, NoTls))
        .await
        .map_err(|_| anyhow!("connect timed out after {op_timeout:?}"))?
        .context("connect")?;
    tokio::spawn(async move {
        // The connection ends with an error when the proxy or the server goes
        // away; the next statement on the client reports it.
        let _ = connection.await;
    });
    Ok(client)
}

async fn with_timeout<T>(
    op_timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> anyhow::Result<T> {
    Ok(timeout(op_timeout, fut)
        .await
        .map_err(|_| anyhow!("statement timed out after {op_timeout:?}"))??)
}

fn period(per_sec: u32) -> Duration {
    Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1)))
}

/// Opens a connection, makes sure the table exists, and prepares `sql` on it:
/// statements are prepared once per connection, as applications do, so each
/// operation is then one Bind/Execute round trip through the proxy.
async fn open(cfg: &RunConfig, sql: &str) -> anyhow::Result<(Client, Statement)> {
    let client = connect(&cfg.url, cfg.op_timeout).await?;
    with_timeout(cfg.op_timeout, client.batch_execute(CREATE_TABLE)).await?;
    let statement = with_timeout(cfg.op_timeout, client.prepare(sql)).await?;
    Ok((client, statement))
}

async fn writer(cfg: Arc<RunConfig>, stats: Shared) {
    let run = format!(
        "{}-{}",
        cfg.region,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    );
    let mut tick = interval(period(cfg.writes_per_sec));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut conn: Option<(Client, Statement)> = None;
    let mut seq: i64 = 0;
    loop {
        tick.tick().await;
        let started = Instant::now();
        let result: anyhow::Result<()> = async {
            if conn.is_none() {
                conn = Some(open(&cfg, INSERT).await?);
            }
            let (client, insert) = conn.as_ref().ok_or_else(|| anyhow!("no connection"))?;
            seq += 1;
            with_timeout(
                cfg.op_timeout,
                client.execute(insert, &[&cfg.region, &run, &seq]),
            )
            .await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => record(&stats, Outcome::Commit(started.elapsed())),
            Err(e) => {
                record(&stats, Outcome::Error(reason(&e)));
                conn = None;
            }
        }
    }
}

async fn reader(cfg: Arc<RunConfig>, stats: Shared) {
    let mut tick = interval(period(cfg.reads_per_sec));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut conn: Option<(Client, Statement)> = None;
    loop {
        tick.tick().await;
        let started = Instant::now();
        let result: anyhow::Result<Outcome> = async {
            if conn.is_none() {
                conn = Some(open(&cfg, READ).await?);
            }
            let (client, read) = conn.as_ref().ok_or_else(|| anyhow!("no connection"))?;
            let row = with_timeout(cfg.op_timeout, client.query_one(read, &[&cfg.region])).await?;
            let cluster_name: Option<String> = row.try_get(0)?;
            let port: Option<i32> = row.try_get(1)?;
            let replica: bool = row.try_get(2)?;
            Ok(Outcome::Read {
                served_by: cfg.port_names.label(cluster_name.as_deref(), port),
                replica,
                latency: started.elapsed(),
            })
        }
        .await;
        match result {
            Ok(outcome) => record(&stats, outcome),
            Err(e) => {
                record(&stats, Outcome::Error(reason(&e)));
                conn = None;
            }
        }
    }
}

/// Runs until SIGTERM/SIGINT or `duration`, printing a line per interval.
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let stats: Shared = Arc::new(Mutex::new(Stats::default()));
    let mut tasks = tokio::task::JoinSet::new();
    if cfg.writes_per_sec > 0 {
        tasks.spawn(writer(cfg.clone(), stats.clone()));
    }
    if cfg.reads_per_sec > 0 {
        tasks.spawn(reader(cfg.clone(), stats.clone()));
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let start = Instant::now();
    let mut report = interval(cfg.interval);
    report.set_missed_tick_behavior(MissedTickBehavior::Delay);
    report.tick().await;
    loop {
        tokio::select! {
            _ = report.tick() => {
                let line = stats.lock().unwrap_or_else(|p| p.into_inner()).take_line(&cfg.region, start.elapsed());
                println!("{line}");
                if cfg.duration.is_some_and(|d| start.elapsed() >= d) {
                    break;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tasks.abort_all();
    Ok(())
}

/// Runs `sql` once (retrying for `retry_for`) and prints the rows, tab-separated.
pub async fn query_once(
    url: &str,
    op_timeout: Duration,
    retry_for: Duration,
    sql: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + retry_for;
    loop {
        let attempt: anyhow::Result<Vec<SimpleQueryMessage>> = async {
            let client = connect(url, op_timeout).await?;
            with_timeout(op_timeout, client.simple_query(sql)).await
        }
        .await;
        match attempt {
            Ok(messages) => {
                for m in messages {
                    if let SimpleQueryMessage::Row(row) = m {
                        let cols: Vec<&str> =
                            (0..row.len()).map(|i| row.get(i).unwrap_or("")).collect();
                        println!("{}", cols.join("\t"));
                    }
                }
                return Ok(());
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("meridian-loadgen: retrying: {}", reason(&e));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow!("{}", reason(&e))),
        }
    }
}
